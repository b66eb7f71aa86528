"""deploy/alerts.yml: Prometheus takes the rules (`promtool check rules`), each alert fires on
the series that should fire it and stays quiet on a near miss (`promtool test rules
tests/alerts/alerts_test.yml`), and every alert has both kinds of case. promtool comes with
Debian's prometheus package, which .ci/run installs."""

import re
import shutil
import subprocess

import pytest
from conftest import ROOT

RULES = ROOT / "deploy" / "alerts.yml"
CASES = ROOT / "tests" / "alerts" / "alerts_test.yml"


def promtool(*args):
    assert shutil.which("promtool"), "promtool is missing: apt-get install prometheus"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          cwd=CASES.parent)


def test_prometheus_takes_the_rules():
    run = promtool("check", "rules", str(RULES))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in run.stdout


def test_each_alert_fires_when_it_should_and_not_otherwise():
    run = promtool("test", "rules", CASES.name)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def alert_names():
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)


def evaluations():
    """(alert name, whether it is expected to fire) for each eval of the test cases."""
    found = []
    for block in CASES.read_text().split("- eval_time:")[1:]:
        name = re.search(r"alertname: (\w+)", block)[1]
        quiet = re.search(r"exp_alerts: \[\]", block) is not None
        found.append((name, not quiet))
    return found


@pytest.mark.parametrize("alert", alert_names())
def test_every_alert_has_a_case_that_fires_and_one_that_does_not(alert):
    outcomes = {fires for name, fires in evaluations() if name == alert}
    assert outcomes == {True, False}, f"{alert}: cases {outcomes or 'none'}"
