"""Prometheus metrics and JSON logs: scraped over HTTP and parsed as Prometheus parses them."""

import json
import urllib.request

from conftest import commitment, free_port, wait_until, write_chain
from prometheus_client.parser import text_string_to_metric_families

import common


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_metrics_endpoints_show_the_queue_and_what_happened(
        tmp_path, parent_config, child_config, processes):
    chain = tmp_path / "chain.json"
    write_chain(chain, 100, [commitment(i) for i in (1, 2, 3)])
    parent_metrics, child_metrics = free_port(), free_port()
    config = parent_config(metrics_port=parent_metrics, log_format="json")
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log('"message": "New job 3 ')
    metrics = scrape(parent_metrics)
    assert metrics[("validator_jobs_pending", (("priority", "0"),))] == 3
    assert metrics[("validator_chain_read_seconds_count", ())] >= 1

    lines = [json.loads(line) for line in parent.log().splitlines()]
    assert {"time", "level", "validator", "message"} <= set(lines[0])
    assert all(line["validator"] == "parent" for line in lines)
    port = common.load_config(config).parent_port
    processes(["child.py", "--config", child_config("m1", port, metrics_port=child_metrics)],
              tmp_path / "child.log")

    def finished():
        return scrape(parent_metrics).get(
            ("validator_jobs_finished_total", (("outcome", "completed"),)), 0) == 3
    wait_until(finished, 30, "3 finished jobs in the parent's metrics")
    metrics = scrape(parent_metrics)
    assert metrics[("validator_rpc_calls_total", (("method", "registerChild"),))] == 1
    assert metrics[("validator_rpc_calls_total", (("method", "requestJobs"),))] >= 1
    # The results travel with the polls: no call of their own.
    assert ("validator_rpc_calls_total", (("method", "reportJobCompletions"),)) not in metrics
    assert metrics[("validator_jobs_assigned", (("child", "m1"),))] == 0
    assert metrics[("validator_active_children", ())] == 1
    assert ("validator_jobs_pending", (("priority", "0"),)) not in metrics
    child = scrape(child_metrics)
    assert child[("validator_evaluation_seconds_count", (("outcome", "succeeded"),))] == 3
