"""deploy/grafana-dashboard.json is a dashboard Grafana imports as it is, and it cannot drift
from the code: every metric its queries (and deploy/alerts.yml's rules) use is one that a
running parent or child exports."""

import json
import re
import urllib.request

from conftest import ROOT, commitment, free_port, wait_until, write_chain

import common

BOARD = ROOT / "deploy" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "alerts.yml"
SUFFIXES = ("_bucket", "_count", "_sum")  # a histogram's series, named after its family


def board():
    return json.loads(BOARD.read_text())


def queries():
    return [target["expr"] for panel in board()["panels"] for target in panel.get("targets", [])]


def metric_names(expressions):
    return {name for expr in expressions for name in re.findall(r"\bvalidator_\w+", expr)}


def exported(port):
    """The metric families a validator's /metrics names (HELP/TYPE lines come even before a
    labelled metric has its first sample), and the sample names."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return set(re.findall(r"^# TYPE (\w+) ", text, re.M)) | \
        set(re.findall(r"^(\w+)[{ ]", text, re.M))


def known(name, names):
    return name in names or any(name.endswith(s) and name[:-len(s)] in names for s in SUFFIXES)


def test_the_board_is_a_dashboard_grafana_imports():
    doc = board()
    assert doc["title"] and doc["uid"] and doc["schemaVersion"] >= 30
    # The data source is a variable the importer picks: no uid of anybody's Grafana inside.
    assert [v["type"] for v in doc["templating"]["list"]] == ["datasource"]
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24


def test_every_metric_the_board_and_the_alerts_use_is_exported(tmp_path, parent_config,
                                                               child_config, processes):
    used = metric_names(queries()) | metric_names(RULES.read_text().splitlines())
    assert len(used) >= 15
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2)])
    parent_port, child_port = free_port(), free_port()
    config = parent_config(metrics_port=parent_port)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("New job 2 ")
    processes(["child.py", "--config", child_config("g1", common.load_config(config).parent_port,
                                                    metrics_port=child_port)],
              tmp_path / "child.log")
    parent.wait_for_log("Child g1 completed job 2")
    names = wait_until(lambda: exported(parent_port) | exported(child_port), 10, "a scrape")
    missing = sorted(name for name in used if not known(name, names))
    assert not missing, f"used by the board or the alerts, exported by no validator: {missing}"
