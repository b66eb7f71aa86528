"""The parent's durable queue: leases and failover, fencing, priorities, per-child caps, push,
operator commands, and kill -9 at any moment."""

import json
import random
import subprocess
import sys

import pytest
from conftest import ROOT, commitment, wait_until, write_chain

import common
from rpc import RpcClient
import chain as chains
import parent


def add_jobs(state, count, first=1):
    snapshot = chains.ChainSnapshot(100, [chains.Commitment(**commitment(i))
                                          for i in range(first, first + count)])
    return state.intake.add_commitments(snapshot)


def register(state, *child_ids):
    for child_id in child_ids:
        state.register_child(child_id, f"127.0.0.1:{9000 + len(child_id)}")


def ids(jobs):
    return [job["jobId"] for job in jobs]


def job_row(state, job_id):
    return state.db.query("select * from jobs where job_id = %s", (job_id,))[0]


def age_child(state, child_id, seconds):
    state.db.query("update children set last_seen = last_seen - %s where child_id = %s",
                   (seconds, child_id))


def test_jobs_of_a_vanished_child_go_back_to_the_front_of_the_queue(make_state):
    state = make_state(child_timeout_seconds=60.0)
    state.leases.started -= 3600  # the parent has been up for an hour
    add_jobs(state, 4)
    register(state, "lost", "alive")
    assert ids(state.request_jobs("lost", 2)) == [1, 2]
    age_child(state, "lost", 61)
    state.leases.expire()
    assert [job_row(state, i)["status"] for i in (1, 2)] == ["pending", "pending"]
    # alive, lost
    assert [c["active"] for c in state.statistics.stats()["children"]] == [True, False]
    # Given-back jobs are served before jobs that never left, and count an attempt.
    assert ids(state.request_jobs("alive", 3)) == [1, 2, 3]
    assert job_row(state, 1)["attempts"] == 2
    # The vanished child's late report is acknowledged but not recorded.
    assert state.report_completion("lost", 1, True, "{}") == \
        (True, "not recorded: job 1 is assigned and not held by lost")
    assert state.report_completion("alive", 1, True, '{"score": 1}') == (True, "recorded")
    assert job_row(state, 1)["result"] == '{"score": 1}'
    [lost] = [c for c in state.statistics.stats()["children"] if c["child_id"] == "lost"]
    # Its report shows it is back (active), but it completed nothing.
    assert (lost["active"], lost["total_jobs_sent"], lost["total_jobs_completed"]) == \
        (True, 2, 0)


def test_after_a_restart_children_get_child_timeout_to_come_back(make_state):
    state = make_state(child_timeout_seconds=60.0)
    add_jobs(state, 1)
    register(state, "c1")
    state.request_jobs("c1", 1)
    age_child(state, "c1", 3600)  # the parent was down for an hour
    make_state(child_timeout_seconds=60.0).leases.expire()
    assert job_row(state, 1)["status"] == "assigned"


def test_the_idle_upkeep_is_one_statement_and_acts_when_something_is_due(make_state,
                                                                         monkeypatch):
    """Every second the running parent checks its leases and the operator's changes: when
    neither is due, that is one statement (one transaction), not two transactions of which one
    locks rows; an expired lease and a changed queue are still acted on."""
    state = make_state(child_timeout_seconds=60.0)
    state.leases.started -= 3600  # the parent has been up for an hour
    add_jobs(state, 3)
    register(state, "c1", "c2")
    assert ids(state.request_jobs("c1", 1)) == [1]
    transactions = []
    real = state.db.transaction
    monkeypatch.setattr(state.db, "transaction", lambda: transactions.append(1) or real())
    for _ in range(5):
        state.leases.upkeep()
    assert len(transactions) == 5
    monkeypatch.undo()
    age_child(state, "c1", 61)
    parent.requeue_job(state.db, 3, priority=5)
    state.leases.upkeep()
    assert job_row(state, 1)["status"] == "pending"  # given back
    assert ids(state.request_jobs("c2", 3)) == [3, 1, 2]  # the operator's priority is seen


def test_a_job_past_max_retries_ends_failed_with_the_reason(make_state):
    state = make_state(job_timeout_seconds=0.0, jobs={"max_retries": 1})
    add_jobs(state, 1)
    register(state, "slow")
    for attempt in (1, 2):
        assert ids(state.request_jobs("slow", 1)) == [1]
        state.leases.expire()
    row = job_row(state, 1)
    assert (row["status"], row["attempts"], row["success"]) == ("failed", 2, False)
    assert json.loads(row["result"]) == {
        "error": "gave up after 2 attempts; the last: not finished within 0s"}
    assert state.request_jobs("slow", 1) == []
    assert state.statistics.stats()["failed_jobs"] == 1


def test_each_child_holds_at_most_max_jobs_per_child(make_state):
    state = make_state(max_jobs_per_child=3)
    add_jobs(state, 10)
    register(state, "greedy")
    assert len(state.request_jobs("greedy", 100)) == 3
    assert state.request_jobs("greedy", 100) == []
    state.report_completion("greedy", 1, True, "{}")
    assert ids(state.request_jobs("greedy", 100)) == [4]


def test_a_heartbeat_takes_no_job_but_keeps_the_child_active(make_state):
    state = make_state(child_timeout_seconds=60.0)
    add_jobs(state, 2)
    register(state, "c1")
    age_child(state, "c1", 61)
    assert not state.statistics.stats()["children"][0]["active"]
    assert state.request_jobs("c1", 0) == []
    assert state.statistics.stats()["children"][0]["active"]
    assert state.statistics.stats()["pending_jobs"] == 2


def test_higher_priority_first_and_an_operator_can_change_it(make_state):
    state = make_state()
    add_jobs(state, 4)
    register(state, "c1", "c2")
    assert parent.requeue_job(state.db, 3, priority=5) == "job 3 is pending with priority 5"
    state.queue.reload()  # the running parent does this every second
    assert ids(state.request_jobs("c1", 2)) == [3, 1]
    # Requeue an assigned job: it is served first again; its holder can no longer record it.
    parent.requeue_job(state.db, 1)
    state.queue.reload()
    assert ids(state.request_jobs("c2", 1)) == [1]
    assert state.report_completion("c1", 1, True, "{}")[1].startswith("not recorded")
    assert parent.cancel_job(state.db, 2) == "job 2 is cancelled"
    state.queue.reload()
    assert ids(state.request_jobs("c2", 5)) == [4]
    with pytest.raises(common.Refused, match="job 2 is cancelled: only pending or assigned"):
        parent.cancel_job(state.db, 2)
    with pytest.raises(common.Refused, match="no job 99"):
        parent.requeue_job(state.db, 99)
    stats = state.statistics.stats()
    assert (stats["pending_jobs"], stats["pending_by_priority"]) == (0, {})


def test_a_re_registered_child_keeps_its_counters(make_state):
    state = make_state()
    add_jobs(state, 2)
    register(state, "c1")
    state.request_jobs("c1", 2)
    state.report_completion("c1", 1, True, "{}")
    state = make_state()  # the parent restarts; the child registers again
    state.register_child("c1", "10.0.0.9:8002")
    [child] = state.statistics.stats()["children"]
    assert (child["endpoint"], child["total_jobs_sent"], child["total_jobs_completed"],
            child["active_jobs"]) == ("10.0.0.9:8002", 2, 1, 1)
    assert state.report_completion("c1", 2, True, "{}") == (True, "recorded")


def test_the_child_ids_a_parent_knows_are_bounded(make_state, monkeypatch):
    """Each id is a row and an entry of every getStats answer: with auth off anyone may
    register ids, so past MAX_CHILDREN a new one is refused; a known one still registers."""
    monkeypatch.setattr(parent, "MAX_CHILDREN", 3)
    state = make_state()
    for name in ("c1", "c2", "c3"):  # at the limit
        register(state, name)
    with pytest.raises(common.Refused, match="knows 3 child ids already, its limit"):
        register(state, "c4")
    assert state.register_child("c2", "10.0.0.2:8002") == "registered as c2"
    assert [c["child_id"] for c in state.statistics.stats()["children"]] == ["c1", "c2", "c3"]


def test_push_sends_new_jobs_to_the_child_with_room_and_falls_back_to_pull(
        tmp_path, parent_config, child_config, processes):
    write_chain(tmp_path / "chain.json", 100, [])
    config = parent_config(push_jobs=True, max_jobs_per_child=2)
    port = common.load_config(config).parent_port
    parent_proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    # A long poll interval: jobs that reach the child quickly can only have been pushed.
    child = processes(["child.py", "--config", child_config(
        "pushy", port, poll_interval=30.0, max_concurrent_jobs=1,
        evaluator={"demo_seconds": 0.5})], tmp_path / "child.log")
    child.wait_for_log("Successfully registered")
    write_chain(tmp_path / "chain.json", 101, [commitment(1), commitment(2)])
    parent_proc.wait_for_log(r"Pushed job 1 to child pushy, \d+ ms after it was created")
    # The child has one slot: the second push is refused and the job stays pending.
    parent_proc.wait_for_log(r"Push of job 2 to child pushy refused \(no free slot\)")
    # When job 1 is done the child reports it and, having a free slot again, pulls job 2.
    parent_proc.wait_for_log("Child pushy completed job 1")
    parent_proc.wait_for_log("Sending 1 jobs to child pushy")
    parent_proc.wait_for_log("Child pushy completed job 2")
    assert "Pushed job 2" not in parent_proc.log()


def test_operator_commands_steer_a_running_parent(tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    config = parent_config()
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 3 ")

    def cli(*args):
        run = subprocess.run([sys.executable, ROOT / "validator.py", *args, "--config", config],
                             capture_output=True, text=True, timeout=60)
        return run.returncode, run.stdout.strip(), run.stderr.strip()

    assert cli("requeue", "3", "--priority", "9") == (0, "job 3 is pending with priority 9", "")
    assert cli("cancel", "2") == (0, "job 2 is cancelled", "")
    assert cli("cancel", "2")[::2] == (2, "error: job 2 is cancelled: only pending or assigned "
                                          "jobs can be cancelled")
    code, out, _ = cli("jobs", "--json")
    assert code == 0
    assert [(j["job_id"], j["status"], j["priority"]) for j in json.loads(out)] == \
        [(1, "pending", 0), (2, "cancelled", 0), (3, "pending", 9)]
    code, out, _ = cli("jobs", "--status", "cancelled")
    assert code == 0 and out.splitlines()[1].split()[:4] == ["2", "5Miner002",
                                                            "org/model-2@00000000", "cancelled"]
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).parent_port)
    client.call("registerChild", childId="c1", endpoint="127.0.0.1:1")
    proc.wait_for_log("Loaded 2 pending jobs from the database")
    assert [j["jobId"] for j in client.call("requestJobs", childId="c1", maxJobs=5)["jobs"]] \
        == [3, 1]
    stats = json.loads(client.call("getStats")["json"])
    assert stats["children"][0]["active_jobs"] == 2


def test_kill_9_of_the_parent_loses_no_job_and_records_no_result_twice(
        tmp_path, parent_config, child_config, processes):
    """Kill the parent at random moments while two children work, restart it each time, and
    check the final databases. The seed is printed so that a failure can be replayed."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    chain = tmp_path / "chain.json"
    write_chain(chain, 100, [commitment(i, block=100) for i in range(1, 11)])
    config = parent_config(job_timeout_seconds=5.0, neuron={"sync_frequency": 0.1})
    parent_cfg = common.load_config(config)
    start = lambda n: processes(["parent.py", "--config", config], tmp_path / f"parent{n}.log")
    proc = start(0)
    proc.wait_for_log("Parent validator serving")
    for name in ("k1", "k2"):
        processes(["child.py", "--config", child_config(name, parent_cfg.parent_port,
                                                        evaluator={"demo_seconds": 0.1})],
                  tmp_path / f"{name}.log")
    miners = 10
    with common.connect(parent_cfg.pg_database) as db:
        def completed():
            return db.execute("select count(*) as n from jobs where status = 'completed'"
                              ).fetchone()["n"]
        for kill in range(1, 5):
            miners += 5  # more miners commit while the parent is up
            write_chain(chain, 100 + kill, [commitment(i, block=100 + kill)
                                            for i in range(1, miners + 1)])
            target = completed() + rng.randint(0, 4)
            wait_until(lambda: completed() >= target, 60, f"{target} completed jobs")
            proc.kill()
            proc = start(kill)
        wait_until(lambda: completed() == miners, 90, f"all {miners} jobs completed")
        jobs = db.execute("select job_id, status, result from jobs").fetchall()
        recorded = db.execute("select job_id, count(*) as n from assignments "
                              "where outcome = 'completed' group by job_id").fetchall()
    assert len(jobs) == miners and all(j["status"] == "completed" for j in jobs)
    assert {r["job_id"]: r["n"] for r in recorded} == {j["job_id"]: 1 for j in jobs}


def test_jobs_whose_answer_was_lost_are_sent_again(make_state):
    state = make_state(max_jobs_per_child=5)
    add_jobs(state, 6)
    register(state, "c1")
    assert ids(state.request_jobs("c1", 3)) == [1, 2, 3]  # the answer never arrives
    # Just assigned: it may be a push on its way, so nothing is sent twice yet.
    assert ids(state.request_jobs("c1", 1, held_ids=[2])) == [4]
    state.db.query("update jobs set assigned_at = assigned_at - interval '1 minute'")
    # The child holds only jobs 2 and 4: it gets 1 and 3 again, then new work.
    assert ids(state.request_jobs("c1", 3, held_ids=[2, 4])) == [1, 3, 5]
    state.db.query("update jobs set assigned_at = assigned_at - interval '1 minute'")
    assert ids(state.request_jobs("c1", 5, held_ids=[1, 2, 3, 4, 5])) == []  # the cap of 4
    # A client that does not say what it holds (the seed's) never gets a job twice.
    state.report_completion("c1", 1, True, "{}")
    assert ids(state.request_jobs("c1", 5)) == [6]
    assert [row["attempts"] for row in state.db.query(
        "select attempts from jobs order by job_id")] == [1, 1, 1, 1, 1, 1]


def test_an_unreadable_chain_is_retried_while_rpc_keeps_serving(
        tmp_path, parent_config, processes, rpc):
    config = parent_config()  # its commitments file does not exist yet
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("Chain sync failed \\(will retry\\): commitments file .* does not exist")
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).parent_port)
    assert client.call("ping") == {"pong": "pong from parent"}
    (tmp_path / "chain.json").write_text('{"block": 5, "commitm')  # half-written
    wait_until(lambda: client.call("ping"), what="a ping while the chain is broken")
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    proc.wait_for_log("New job 1 ", timeout=20)
    proc.wait_for_log(r"Chain sync recovered after \d+ failed attempts")
    assert proc.log().count("Chain sync failed") == 1
