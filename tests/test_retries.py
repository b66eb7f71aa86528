"""Transient failures, the parent's side (issue 26): a failure the child marks `retryable` (not
the miner's) ends its attempt, not the job; the job is tried again after a backoff that doubles,
by another child first, within maxRetries + 1 attempts; a child whose evaluations keep failing
that way rests. All of it in the database: a new ParentState keeps it."""

import json
import logging
import time

import prometheus_client
from conftest import free_port, wait_until

import auth
import parent as parents
import test_security as security
import validator
from test_queue import add_jobs, ids, job_row, register
from test_security import signed_registration

# The fixtures of the parent-side security tests: a parent process with auth on (jobs 1-3
# made, hotkeys c1 and c2 allowed) and the test's hotkeys.
wallets, parent = security.wallets, security.parent

REASON = "the evaluator exited 75 (EX_TEMPFAIL): the GPU is busy"


def transient(job_id, reason=REASON, attempt=0):
    return parents.Result(job_id, False, json.dumps({"error": reason}), attempt, b"", True)


def report(state, child_id, *results):
    return state.report_completions(child_id, results)


def attempts(state, job_id):
    return [(a["attempt"], a["child_id"], a["outcome"], a["reason"]) for a in state.db.query(
        "select * from assignments where job_id = %s order by attempt", (job_id,))]


def counter(name, **labels):
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def waits(state):
    """Of each pending job that failed transiently: the time from the end of its last attempt
    to when it is due (jobs.retry_at)."""
    return [row["wait"] for row in state.db.query(
        "select extract(epoch from j.retry_at - a.finished_at)::float8 as wait from jobs j "
        "join assignments a on a.job_id = j.job_id and a.attempt = j.attempts "
        "where j.status = 'pending' and j.retry_at is not null")]


def upkeep_until_queued(state, timeout=10.0):
    """Run the active parent's upkeep until a retried job is due (it joins the queue)."""
    wait_until(lambda: state.leases.upkeep() or len(state.queue), timeout,
               "the retried job to be due")


def test_a_transient_failure_is_retried_after_its_backoff_by_another_child(make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    keys = {"jobs": {"retry_backoff_seconds": 2.0}}
    state = make_state(**keys)
    add_jobs(state, 1)
    register(state, "c1", "c2")
    assert ids(state.request_jobs("c1", 1)) == [1]
    retried = counter("validator_jobs_retried_total")
    assert report(state, "c1", transient(1)) == [
        (True, "recorded as a transient failure: the job will be retried in 2s")]
    assert counter("validator_jobs_retried_total") == retried + 1
    assert f"Job 1 failed transiently on child c1 (attempt 1 of 4): {REASON}; tried again in " \
           "2s, by another child when one is free" in caplog.text

    # Pending again, with the time it is due; nobody gets it before.
    row = job_row(state, 1)
    assert (row["status"], row["child_id"], row["attempts"]) == ("pending", None, 1)
    [wait] = waits(state)
    assert 2.0 <= wait < 2.5
    assert state.request_jobs("c1", 1) == [] and state.request_jobs("c2", 1) == []
    assert attempts(state, 1) == [(1, "c1", "retryable", REASON)]

    # A restart keeps the wait, and which child failed it.
    state = make_state(**keys)
    assert state.request_jobs("c2", 1) == []
    upkeep_until_queued(state)
    # Due now: for one more backoff, not to the child that failed it, while another asks.
    assert state.request_jobs("c1", 1) == []
    assert ids(state.request_jobs("c2", 1)) == [1]
    assert report(state, "c2", (1, True, '{"score": 0.5}')) == [(True, "recorded")]
    assert attempts(state, 1) == [(1, "c1", "retryable", REASON), (2, "c2", "completed", None)]
    [job] = parents.list_jobs(state.db)
    assert job["attempts"] == [
        {"attempt": 1, "child_id": "c1", "outcome": "retryable", "reason": REASON},
        {"attempt": 2, "child_id": "c2", "outcome": "completed", "reason": None}]
    assert (job["status"], job["result"]) == ("completed", '{"score": 0.5}')
    table = validator.format_jobs([job]).splitlines()
    assert table[0].split()[-2:] == ["last", "attempt"] and table[1].endswith("completed")


def test_a_job_failing_transiently_every_time_fails_after_its_attempts_with_every_reason(
        make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    state = make_state(jobs={"retry_backoff_seconds": 0.1, "max_retries": 2})
    add_jobs(state, 1)
    register(state, "c1")  # the only child: after the window the job retries there
    answers, waited = [], []
    for attempt in (1, 2, 3):
        if attempt > 1:
            upkeep_until_queued(state)
        wait_until(lambda: state.request_jobs("c1", 1), 10, f"attempt {attempt} for c1")
        assert job_row(state, 1)["attempts"] == attempt
        answers += report(state, "c1", transient(1, f"{REASON} ({attempt})", attempt))
        waited += waits(state)
    # The backoff doubles: 0.1 s, then 0.2 s (the database's figures: from the end of the
    # attempt, give or take the transaction's time); the third attempt was the last.
    assert answers == [
        (True, "recorded as a transient failure: the job will be retried in 0.1s"),
        (True, "recorded as a transient failure: the job will be retried in 0.2s"),
        (True, "recorded as a transient failure; the job failed after 3 attempts")]
    assert len(waited) == 2 and 0.1 <= waited[0] < 0.6 and 0.2 <= waited[1] < 0.7
    row = job_row(state, 1)
    assert (row["status"], row["success"], row["attempts"]) == ("failed", False, 3)
    assert json.loads(row["result"]) == {
        "error": f"gave up after 3 attempts: {REASON} (3)",
        "attempts": [{"attempt": k, "child": "c1", "outcome": "retryable",
                      "reason": f"{REASON} ({k})"} for k in (1, 2, 3)]}
    assert f"Job 1 failed after 3 attempts, every one transient: {REASON} (3)" in caplog.text
    assert state.request_jobs("c1", 1) == []
    assert state.statistics.stats()["failed_jobs"] == 1
    # The cap: an hour, or the base if it is longer.
    cfg = state.cfg
    assert [parents.retry_backoff(cfg, n) for n in (1, 2, 3, 40, 300)] == \
        [0.1, 0.2, 0.4, 3600.0, 3600.0]
    cfg.jobs.retry_backoff_seconds = 5000.0
    assert parents.retry_backoff(cfg, 2) == 5000.0


def test_a_failure_that_is_not_retryable_is_final_at_once_and_keeps_its_reason(make_state):
    state = make_state(jobs={"retry_backoff_seconds": 0.1})
    add_jobs(state, 2)
    register(state, "c1")
    assert ids(state.request_jobs("c1", 2)) == [1, 2]
    assert report(state, "c1", (1, False, '{"error": "the model does not load"}'),
                  parents.Result(2, True, '{"score": 1}', 0, b"", True)) == \
        [(True, "recorded"), (True, "recorded")]
    assert [job_row(state, i)["status"] for i in (1, 2)] == ["failed", "completed"]
    assert attempts(state, 1) == [(1, "c1", "failed", "the model does not load")]
    assert attempts(state, 2) == [(1, "c1", "completed", None)]  # the flag on a success: none
    assert job_row(state, 1)["retry_at"] is None and len(state.queue) == 0


def test_a_transient_failure_sent_again_is_acknowledged_and_not_counted_as_ignored(
        make_state):
    state = make_state(jobs={"retry_backoff_seconds": 0.1})
    add_jobs(state, 1)
    register(state, "c1", "c2")
    assert ids(state.request_jobs("c1", 1)) == [1]
    assert report(state, "c1", transient(1, attempt=1))[0][1].startswith(
        "recorded as a transient failure")
    ignored = counter("validator_reports_ignored_total")
    # Its answer was lost: the child sends it again, in a poll and on its own, naming its
    # attempt or not.
    assert report(state, "c1", transient(1, attempt=1), transient(1)) == \
        [(True, "already recorded")] * 2
    assert state.poll("c1", 0, results=[transient(1, attempt=1)])[1] == \
        [(True, "already recorded")]
    # Handed to it again (the only child that asks, after the window): the old report of
    # attempt 1 does not end attempt 2.
    upkeep_until_queued(state)
    wait_until(lambda: state.request_jobs("c1", 1), 10, "attempt 2 for c1")
    assert report(state, "c1", transient(1, attempt=1)) == [(True, "already recorded")]
    assert counter("validator_reports_ignored_total") == ignored
    assert (job_row(state, 1)["status"], attempts(state, 1)[1][2]) == ("assigned", None)
    # Another child's report of the job is ignored, and counted.
    assert report(state, "c2", transient(1))[0] == \
        (True, "not recorded: job 1 is assigned and not held by c2")
    assert counter("validator_reports_ignored_total") == ignored + 1


def resting(state, child_id):
    [child] = [c for c in state.statistics.stats()["children"] if c["child_id"] == child_id]
    return child["resting_seconds"], child["transient_in_a_row"]


def resting_metric(state):
    [family] = [f for f in parents.QueueMetrics(state.statistics).collect()
                if f.name == "validator_child_resting"]
    return {sample.labels["child"]: sample.value for sample in family.samples}


def test_a_child_whose_evaluations_keep_failing_transiently_rests(make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    keys = {"unhealthy_after": 2, "rest_seconds": 1.0, "jobs": {"retry_backoff_seconds": 600.0}}
    state = make_state(**keys)
    add_jobs(state, 8)
    register(state, "c1", "c2")
    assert ids(state.request_jobs("c1", 2)) == [1, 2]
    report(state, "c1", transient(1), transient(2, "no disk for the job"))
    line = "Child c1 rests for 1s: its last 2 evaluations failed transiently (the last: " \
           "no disk for the job)"
    assert caplog.text.count("Child c1 rests for") == 1 and line in caplog.text
    # No job for it, though there are some (c2 gets one); its heartbeat still counts.
    assert state.request_jobs("c1", 5) == []
    assert ids(state.request_jobs("c2", 1)) == [3]
    seconds, in_a_row = resting(state, "c1")
    assert 0 < seconds <= 1.0 and in_a_row == 2
    assert resting(state, "c2") == (0.0, 0)
    assert resting_metric(state) == {"c1": 1.0, "c2": 0.0}
    assert "s left (2 transient failures in a row)" in validator.format_stats(
        state.statistics.stats())

    # After the rest it gets jobs again; its next evaluation failing too rests it twice as long.
    assert ids(wait_until(lambda: state.request_jobs("c1", 1), 10, "c1's rest to end")) == [4]
    assert caplog.text.count("Child c1 rested; it gets jobs again") == 1
    assert resting_metric(state)["c1"] == 0.0
    report(state, "c1", transient(4))
    assert f"Child c1 rests for 2s: its last 3 evaluations failed transiently (the last: " \
           f"{REASON})" in caplog.text

    # A restart keeps the rest.
    state = make_state(**keys)
    assert state.request_jobs("c1", 1) == []
    assert resting(state, "c1")[0] > 0
    assert ids(wait_until(lambda: state.request_jobs("c1", 1), 10, "c1's second rest")) == [5]
    # A success ends the run: two more transient failures rest it for rest_seconds again.
    report(state, "c1", (5, True, "{}"))
    assert resting(state, "c1") == (0.0, 0)
    assert ids(state.request_jobs("c1", 2)) == [6, 7]
    report(state, "c1", transient(6))
    assert resting(state, "c1") == (0.0, 1)
    caplog.clear()
    report(state, "c1", transient(7))
    assert "Child c1 rests for 1s: its last 2 evaluations" in caplog.text


def test_a_resting_child_gets_no_push_nor_a_job_it_failed_lately(make_state, rpc, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    state = make_state(unhealthy_after=1, rest_seconds=600.0,
                       jobs={"retry_backoff_seconds": 0.2})
    add_jobs(state, 2)
    for child_id in ("c1", "c2"):  # nothing listens at their endpoints: a push fails
        state.register_child(child_id, f"127.0.0.1:{free_port()}")
    pusher = parents.Pusher(state, rpc)
    assert ids(state.request_jobs("c1", 1)) == [1]
    report(state, "c1", transient(1))  # c1 rests now
    caplog.clear()
    pusher.push()
    assert "Push of job 2 to child c2 refused" in caplog.text
    assert "child c1" not in caplog.text
    # c1's rest is over and job 1 is due, but c1 failed it lately: a push passes it over.
    state.db.query("update children set resting_until = 1 where child_id = 'c1'")
    parents.cancel_job(state.db, 2)
    state.queue.reload()  # the running parent takes the operator's change
    upkeep_until_queued(state)
    state.db.query("update children set last_seen = 0 where child_id = 'c2'")  # c2 inactive
    caplog.clear()
    pusher.push()
    assert "Push of job" not in caplog.text
    assert job_row(state, 1)["status"] == "pending" and len(state.queue) == 1


def test_with_auth_on_the_flag_is_covered_by_the_childs_signature(parent, wallets):
    client = parent.connect()
    reply = client.call("registerChild", **signed_registration(client, wallets, "c1", "c1"))
    assert reply["success"]
    assert [j["jobId"] for j in client.call("requestJobs", childId="c1", maxJobs=1)["jobs"]] \
        == [1]
    text = json.dumps({"error": REASON})

    def signed(retryable):
        message = auth.signed_message(*auth.result_fields("c1", 1, 1, False, text, retryable))
        return {"jobId": 1, "success": False, "result": text, "attempt": 1, "retryable": True,
                "signature": wallets["c1"].sign(message)}
    # Signed as a final failure, sent as a transient one: refused, and the job stays c1's.
    forged = client.call("reportJobCompletion", childId="c1", **signed(False))
    assert (forged["acknowledged"], forged["message"]) == (
        False, f"refused: its signature does not hold for the child's hotkey "
               f"{wallets['c1'].ss58_address}")
    stats = json.loads(client.call("getStats")["json"])
    assert (stats["pending_jobs"], stats["children"][0]["active_jobs"]) == (2, 1)
    # Signed as what it is: recorded as a transient failure, over the wire, in a poll.
    [reply] = client.call("requestJobs", childId="c1", maxJobs=0,
                          results=[signed(True)])["replies"]
    assert (reply["acknowledged"], reply["message"]) == (
        True, "recorded as a transient failure: the job will be retried in 30s")
    parent.wait_for_log(r"Job 1 failed transiently on child c1 \(attempt 1 of 4\)")
    stats = json.loads(client.call("getStats")["json"])
    assert (stats["pending_jobs"], stats["children"][0]["active_jobs"]) == (3, 0)
    assert stats["children"][0]["transient_in_a_row"] == 1


def test_the_window_for_other_children_starts_when_the_job_joins_the_queue():
    """The upkeep moves due jobs into the queue once a second: a window shorter than that,
    counted from the due time, was over before the job could be taken, and the child that
    failed it, holding a poll like the others, took it again as often as not."""
    queue = parents.PendingQueue(None, lambda attempts: 0.3)
    now = time.time()
    queue.wait([(now - 5.0, (0, 0, 7), frozenset({"c1"}), now - 4.7)])  # due 5 s ago
    queue.release_due()
    assert queue.pop(1, "c1") == []  # passed over: c2 may take it
    assert queue.pop(1, "c2") == [(0, 0, 7)]
