"""A cancelled job stops where it runs: an operator's cancel or requeue, and a lease that
expired and moved, stop the evaluator on the child that held the job, within poll_interval +
1 s; nothing is reported, and the slot runs the next job. Real processes, real evaluators."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, commitment, process_alive, wait_until, write_chain

import common

POLL_INTERVAL = 1.0

# Each run appends its pid to <dir>/job-<id>.pids. A job's first run sleeps (the evaluation
# that is stopped); a later run, and any other job's, finishes at once.
EVALUATOR = textwrap.dedent("""
    import json, os, sys, time
    job = json.load(sys.stdin)
    path = os.path.join(sys.argv[1], "job-%d.pids" % job["jobId"])
    first = not os.path.exists(path)
    with open(path, "a") as f:
        f.write("%d\\n" % os.getpid())
    time.sleep(120 if first and job["jobId"] == 1 else 0.1)
    print(json.dumps({"score": 0.5, "pid": os.getpid()}))
""")


@pytest.fixture
def evaluator(tmp_path):
    """(command, pids(job_id)): an evaluator that records its runs; every run still alive at
    the end of the test is killed (a child killed -9 leaves its evaluators running)."""
    (tmp_path / "evaluator.py").write_text(EVALUATOR)
    runs = tmp_path / "runs"
    runs.mkdir()

    def pids(job_id):
        path = runs / f"job-{job_id}.pids"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    yield [sys.executable, str(tmp_path / "evaluator.py"), str(runs)], pids
    for path in runs.iterdir():
        for pid in map(int, path.read_text().split()):
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


def cli(config, *args):
    run = subprocess.run([sys.executable, ROOT / "validator.py", *args, "--config", config],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def query(dsn, sql):
    with common.connect(dsn) as db:
        return db.execute(sql).fetchall()


def assert_stopped_within_the_bound(pid, since):
    """The evaluator's process is gone within poll_interval + 1 s of `since`."""
    wait_until(lambda: not process_alive(pid), 30, f"evaluator {pid} to be stopped")
    assert time.monotonic() - since <= POLL_INTERVAL + 1.0


def test_an_operator_cancel_stops_the_running_evaluator_and_frees_its_slot(
        tmp_path, parent_config, child_config, processes, evaluator):
    command, pids = evaluator
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config()
    parent_cfg = common.load_config(config)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    child_path = child_config("c1", parent_cfg.parent_port, max_concurrent_jobs=1,
                              poll_interval=POLL_INTERVAL, evaluator={"command": command})
    child = processes(["child.py", "--config", child_path], tmp_path / "child.log")
    [pid] = wait_until(lambda: pids(1), 30, "job 1's evaluator to start")
    # A second job waits at the parent while the only slot is busy.
    write_chain(tmp_path / "chain.json", 101, [commitment(1), commitment(2)])
    parent.wait_for_log("New job 2 ")
    assert cli(config, "cancel", "1") == "job 1 is cancelled"
    assert_stopped_within_the_bound(pid, time.monotonic())
    child.wait_for_log(r"Job 1 cancelled by the parent \(cancelled by the operator\): its "
                       r"evaluation is stopped")
    # The slot is free at once: job 2 runs and is reported.
    parent.wait_for_log("Child c1 completed job 2")
    child_dsn = common.load_config(child_path).pg_database
    [row] = query(child_dsn, "select status, result, attempts from child_jobs where job_id = 1")
    assert (row["status"], json.loads(row["result"]), row["attempts"]) == (
        "cancelled", {"cancelled": "cancelled by the operator"}, 1)
    [row] = query(parent_cfg.pg_database, "select status, result from jobs where job_id = 1")
    assert (row["status"], row["result"]) == ("cancelled",
                                              '{"cancelled": "cancelled by the operator"}')
    # Nothing of job 1 was reported: no result, no failure, no ignored report.
    assert "completed job 1\n" not in parent.log() and "Job 1 failed" not in parent.log()
    assert "Ignored a report of job 1" not in parent.log()
    assert child.log().count("Job 1 cancelled by the parent") == 1
    assert "Job 1 succeeded" not in child.log() and "Job 1 failed" not in child.log()
    assert json.loads(cli(config, "jobs", "--status", "cancelled", "--json"))[0]["job_id"] == 1


def test_a_lease_that_expired_and_moved_stops_on_the_old_holder(
        tmp_path, parent_config, child_config, processes, evaluator):
    """The old holder was frozen past child_timeout_seconds; its job went to another child.
    When it comes back, it stops its evaluator and reports nothing; the new holder's result
    is the one recorded."""
    command, pids = evaluator
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(child_timeout_seconds=3.0)
    parent_cfg = common.load_config(config)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    children = {}
    for name in ("old", "new"):
        path = child_config(name, parent_cfg.parent_port, poll_interval=POLL_INTERVAL,
                            evaluator={"command": command})
        children[name] = processes(["child.py", "--config", path], tmp_path / f"{name}.log")
        if name == "old":
            [pid] = wait_until(lambda: pids(1), 30, "job 1's evaluator to start on 'old'")
    children["new"].wait_for_log("Successfully registered with parent validator as new")
    children["old"].proc.send_signal(signal.SIGSTOP)  # its evaluator runs on, unwatched
    try:
        parent.wait_for_log("Job 1 returned to the queue: child old unseen for 3s")
        parent.wait_for_log("Child new completed job 1")
    finally:
        children["old"].proc.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    assert process_alive(pid)
    assert_stopped_within_the_bound(pid, resumed)
    children["old"].wait_for_log(r"Job 1 cancelled by the parent \(completed by child new\)")
    [row] = query(parent_cfg.pg_database, "select status, child_id, result from jobs")
    assert (row["status"], row["child_id"]) == ("completed", "new")
    assert json.loads(row["result"])["pid"] == pids(1)[1]  # the new holder's run
    assert "Ignored a report of job 1" not in parent.log()
