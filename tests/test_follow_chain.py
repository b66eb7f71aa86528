"""The queue follows the chain: a miner's new submission supersedes its open jobs, a miner who
left the subnet has its open jobs cancelled, only a read that succeeded cancels anything; and
the parent tells a child which of the jobs it holds are no longer its own. Real PostgreSQL."""

import json
import re
import urllib.request

import pytest
from conftest import commitment, free_port, wait_until, write_chain

import chain as chains
import common
import parent


def snapshot(block, commitments, neurons=None):
    return chains.ChainSnapshot(block, [chains.Commitment(**c) for c in commitments], neurons)


def status(state):
    return {row["job_id"]: (row["status"], row["result"]) for row in state.db.query(
        "select job_id, status, result from jobs order by job_id")}


def cancelled(reason):
    return ("cancelled", json.dumps({"cancelled": reason}))


def register(state, *child_ids):
    for child_id in child_ids:
        state.register_child(child_id, "127.0.0.1:9000")


def test_a_new_submission_supersedes_the_miners_pending_and_assigned_jobs(make_state):
    state = make_state()
    register(state, "c1")
    state.intake.add_commitments(snapshot(100, [commitment(1), commitment(2), commitment(3)]))
    # Job 1 is assigned, job 2 pending, job 3 completed; then all three miners commit anew.
    assert [job["jobId"] for job in state.request_jobs("c1", 1)] == [1]
    parent.requeue_job(state.db, 3, priority=1)  # served before job 2
    state.queue.reload()
    assert [job["jobId"] for job in state.request_jobs("c1", 1)] == [3]
    assert state.report_completion("c1", 3, True, '{"score": 1}') == (True, "recorded")
    new = state.intake.add_commitments(snapshot(101, [
        commitment(i, block=101, revision=f"{i:x}" * 40) for i in (1, 2, 3)]))
    assert new == [4, 5, 6]
    assert status(state) == {
        1: cancelled("superseded by job 4"), 2: cancelled("superseded by job 5"),
        3: ("completed", '{"score": 1}'),  # a job that ended is never touched
        4: ("pending", None), 5: ("pending", None), 6: ("pending", None)}
    # The assignments of the cancelled jobs are closed; the holder's late result is ignored.
    assert {row["job_id"]: row["outcome"] for row in state.db.query(
        "select job_id, outcome from assignments")} == {1: "withdrawn", 3: "completed"}
    assert state.report_completion("c1", 1, True, "{}") == (
        True, "not recorded: job 1 is cancelled and not held by c1")
    stats = state.statistics.stats()
    assert (stats["cancelled_jobs"], stats["children"][0]["active_jobs"]) == (
        {"superseded": 2}, 0)
    assert [job["jobId"] for job in state.request_jobs("c1", 5)] == [4, 5, 6]


def test_evaluate_latest_only_false_keeps_every_submission(make_state):
    state = make_state(neuron={"evaluate_latest_only": False})
    state.intake.add_commitments(snapshot(100, [commitment(1)]))
    state.intake.add_commitments(snapshot(101, [commitment(1, block=101, revision="e" * 40)]))
    assert status(state) == {1: ("pending", None), 2: ("pending", None)}


def test_the_jobs_of_a_miner_that_left_the_subnet_are_cancelled(make_state):
    state = make_state()
    register(state, "c1")
    state.intake.add_commitments(snapshot(100, [commitment(i) for i in (1, 2, 3, 4)]))
    assert [job["jobId"] for job in state.request_jobs("c1", 1)] == [1]
    # Miner 1 (assigned) and miner 2 (pending) deregistered: uid 2 went to another hotkey;
    # miner 3 is still registered but did not commit again; miner 4 is registered elsewhere
    # than the uid it committed from (it left, and came back).
    neurons = {"5Miner003": 3, "5NewMiner": 2, "5Miner004": 9}
    state.intake.add_commitments(snapshot(101, [], neurons))
    assert status(state) == {1: cancelled("miner deregistered"),
                             2: cancelled("miner deregistered"),
                             3: ("pending", None), 4: cancelled("miner deregistered")}
    assert state.statistics.stats()["cancelled_jobs"] == {"deregistered": 3}


def test_the_file_chain_lists_the_registered_neurons(tmp_path):
    path = tmp_path / "chain.json"
    write_chain(path, 120, [commitment(1)], neurons=[{"hotkey": "5Miner001", "uid": 1},
                                                     {"hotkey": "5Quiet", "uid": 7}])
    assert chains.FileChain(path).read().neurons == {"5Miner001": 1, "5Quiet": 7}
    write_chain(path, 120, [commitment(1), commitment(2)])  # without "neurons": the committers
    assert chains.FileChain(path).read().neurons == {"5Miner001": 1, "5Miner002": 2}
    path.write_text(json.dumps({"block": 120, "commitments": [], "neurons": "everyone"}))
    with pytest.raises(chains.ChainUnavailable, match="malformed"):
        chains.FileChain(path).read()


def test_a_failed_read_cancels_nothing(tmp_path, parent_config, processes):
    chain = tmp_path / "chain.json"
    write_chain(chain, 100, [commitment(1), commitment(2)])
    config = parent_config(metrics_port=free_port())
    cfg = common.load_config(config)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 2 ")

    def statuses():
        with common.connect(cfg.pg_database) as db:
            return [row["status"] for row in db.execute(
                "select status from jobs order by job_id")]

    def failed_reads():
        text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics_port}/metrics").read()
        return float(re.search(rb"^validator_chain_read_failures_total (\S+)$", text,
                               re.M)[1])

    # Reads that fail: a missing file, one half written, one whose neurons are garbled. Two
    # more failed reads after each: one of them surely read what was written.
    for write in (chain.unlink, lambda: chain.write_text('{"block": 101, "commitments": []'),
                  lambda: write_chain(chain, 102, [], neurons="nobody")):
        write()
        failures = failed_reads()
        wait_until(lambda: failed_reads() >= failures + 2, 30, "two more failed reads")
    assert statuses() == ["pending", "pending"]
    assert "cancelled" not in proc.log()
    # A read that succeeds and finds miner 2 gone cancels its job.
    write_chain(chain, 103, [commitment(1)])
    proc.wait_for_log("Job 2 cancelled: miner deregistered")
    assert statuses() == ["pending", "cancelled"]
    assert "Job 1 cancelled" not in proc.log()


def test_a_poll_revokes_the_held_jobs_that_are_no_longer_the_childs(make_state):
    state = make_state(child_timeout_seconds=60.0, max_jobs_per_child=10)
    state.leases.started -= 3600
    register(state, "c1", "c2")
    state.intake.add_commitments(snapshot(100, [commitment(i) for i in range(1, 6)]))
    assert [job["jobId"] for job in state.request_jobs("c1", 5)] == [1, 2, 3, 4, 5]
    parent.cancel_job(state.db, 1)
    parent.requeue_job(state.db, 2)
    state.queue.reload()
    assert [job["jobId"] for job in state.request_jobs("c2", 1)] == [2]  # handed to c2
    state.intake.add_commitments(snapshot(101, [commitment(i) for i in (1, 2, 3, 4)] +
                                   [commitment(5, block=101, revision="a" * 40)]))  # job 6
    assert state.report_completion("c1", 4, True, "{}") == (True, "recorded")
    jobs, replies, revoked = state.poll("c1", 0, held_ids=[1, 2, 3, 4, 5, 99],
                                        results=[(4, True, "{}")])
    # Each names the attempt taken back: the latest that c1 held (job 99 it never held).
    assert revoked == [{"jobId": 1, "attempt": 1, "reason": "cancelled by the operator"},
                       {"jobId": 2, "attempt": 1, "reason": "handed to child c2"},
                       {"jobId": 5, "attempt": 1, "reason": "superseded by job 6"}]
    # Without heldJobs (a seed-built client) nothing is revoked.
    assert state.poll("c1", 0)[2] == []
    # A lease that expired: the job is back in the queue; the old holder is told.
    state.db.query("update children set last_seen = last_seen - 61 where child_id = 'c1'")
    state.leases.expire()
    assert state.poll("c1", 0, held_ids=[3])[2] == [
        {"jobId": 3, "attempt": 1, "reason": "given back to the queue"}]
    # ...unless this very poll hands it back to the same child: it is its own again.
    jobs, _, revoked = state.poll("c1", 5, held_ids=[3])
    assert 3 in [job["jobId"] for job in jobs] and revoked == []
