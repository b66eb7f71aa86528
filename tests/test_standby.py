"""Two parents on one database (docs/operations.md, two parents): one active, one standby that
takes over by itself, fenced, with real processes and one real PostgreSQL server."""

import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, commitment, free_port, run_foreign_client, wait_until, write_chain, \
    write_toml
from test_metrics import scrape
from test_rpc import SEED_SCHEMA

import common
from rpc import RpcClient
import parent

TAKEN = "Leadership taken"
STANDBY = "Parent validator is a standby"


@pytest.fixture
def two_parents(tmp_path, make_dsn, processes):
    """two_parents(**keys) -> configs of parents "a" and "b": one database, one chain file, the
    same settings but their ports. Start one with start(name)."""
    dsn = make_dsn()

    class Pair:
        def __init__(self, **keys):
            self.dsn, self.configs, self.ports, self.procs = dsn, {}, {}, {}
            self.metrics_ports = {}
            for name in ("a", "b"):
                self.ports[name], self.metrics_ports[name] = free_port(), free_port()
                self.configs[name] = write_toml(tmp_path / f"parent_{name}.toml", {
                    "pg_database": dsn, "is_parent_validator": True, "auth": "off",
                    "jobs": {"cross_check": 0.0},  # the tests count each job once
                    "listen_host": "127.0.0.1", "parent_host": "127.0.0.1",
                    "parent_port": self.ports[name], "log_level": "DEBUG",
                    "metrics_port": self.metrics_ports[name],
                    "leader_timeout_seconds": 4.0,
                    "subtensor": {"network": "file",
                                  "commitments_file": str(tmp_path / "chain.json")},
                    "neuron": {"sync_frequency": 0.2}, **keys})

        def start(self, name):
            self.procs[name] = processes(["parent.py", "--config", self.configs[name]],
                                         tmp_path / f"parent_{name}.log")
            return self.procs[name]

        def endpoint(self, name):
            return f"127.0.0.1:{self.ports[name]}"

        def query(self, sql, params=None):
            with common.connect(dsn) as conn:
                return conn.execute(sql, params).fetchall()

    return Pair


def client(rpc, pair, name):
    return RpcClient(rpc, "127.0.0.1", pair.ports[name], timeout=30)


def stats(rpc, pair, name):
    import json
    return json.loads(client(rpc, pair, name).call("getStats")["json"])


def terminate_leaders_lock_connection(dsn):
    """What the server does to the connection of a parent whose machine vanished."""
    with common.connect(dsn) as conn:
        pids = [row["pid"] for row in conn.execute(
            "select pid from pg_locks where locktype = 'advisory' and objid = %s and granted "
            "and database = (select oid from pg_database where datname = current_database())",
            (parent.LEADERSHIP_LOCK,))]
        assert len(pids) == 1
        conn.execute("select pg_terminate_backend(%s)", (pids[0],))


def test_two_parents_starting_at_once_exactly_one_is_active_and_the_standby_refuses_work(
        tmp_path, two_parents, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    pair = two_parents()
    procs = {name: pair.start(name) for name in ("a", "b")}  # at the same moment
    for proc in procs.values():  # the active one takes the lead before it serves
        proc.wait_for_log("Parent validator serving on")
    roles = {name: stats(rpc, pair, name)["role"] for name in procs}
    assert sorted(roles.values()) == ["active", "standby"]
    active = next(name for name, role in roles.items() if role == "active")
    standby = next(name for name, role in roles.items() if role == "standby")
    procs[active].wait_for_log("New job 3 ")
    assert pair.query("select epoch, endpoint from leadership") == [
        {"epoch": 1, "endpoint": pair.endpoint(active)}]

    # The standby: ping and getStats (the shared database's figures), and "standby" else.
    to_standby = client(rpc, pair, standby)
    assert to_standby.call("ping") == {"pong": "pong from parent"}
    seen = stats(rpc, pair, standby)
    assert (seen["role"], seen["active_parent"], seen["pending_jobs"]) == \
        ("standby", pair.endpoint(active), 3)
    refusal = f"standby: this parent is a standby; the active parent is {pair.endpoint(active)}"
    assert to_standby.call("registerChild", childId="c1", endpoint="127.0.0.1:9") == \
        {"success": False, "message": refusal}
    assert to_standby.call("requestJobs", childId="c1", maxJobs=3) == \
        {"jobs": [], "replies": [], "revoked": [], "error": refusal}
    assert to_standby.call("reportJobCompletion", childId="c1", jobId=1, success=True,
                           result="{}") == {"acknowledged": False, "message": refusal}
    assert pair.query("select count(*) as n from children") == [{"n": 0}]
    assert "New job" not in procs[standby].log()

    # What an operator sees: each parent's role, and a metric.
    run = subprocess.run([sys.executable, ROOT / "validator.py", "status", "--parents",
                          pair.endpoint("a"), pair.endpoint("b")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[:2] == [
        f"parent {pair.endpoint(name)}: " + (
            "active (leadership epoch 1)" if name == active else
            f"standby; the active parent is {pair.endpoint(active)}") for name in ("a", "b")]
    for name, value in ((active, 1), (standby, 0)):
        assert scrape(pair.metrics_ports[name])[("validator_parent_active", ())] == value
    assert "Traceback" not in procs[active].log() + procs[standby].log()


def test_kill_9_of_the_active_parent_during_60_jobs_loses_and_repeats_nothing(
        tmp_path, two_parents, child_config, processes):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, 61)])
    pair = two_parents()
    a = pair.start("a")
    a.wait_for_log(TAKEN)
    b = pair.start("b")
    b.wait_for_log(STANDBY)
    children = {}
    for name in ("c1", "c2"):
        path = child_config(name, pair.ports["a"],
                            parent_hosts=[pair.endpoint("a"), pair.endpoint("b")],
                            max_concurrent_jobs=3, max_backoff_seconds=1.0,
                            evaluator={"demo_seconds": 0.5})
        children[name] = processes(["child.py", "--config", path], tmp_path / f"{name}.log")

    def completed():
        return pair.query("select count(*) as n from jobs where status = 'completed'")[0]["n"]
    wait_until(lambda: completed() >= 10, 60, "10 completed jobs")
    a.kill()
    killed = time.monotonic()
    b.wait_for_log(TAKEN, timeout=15)
    b.wait_for_log("Parent validator active")
    assert time.monotonic() - killed < 15
    wait_until(lambda: completed() == 60, 120, "60 completed jobs")

    assert pair.query("select count(*) as n from jobs") == [{"n": 60}]
    # Each job was recorded once: one completed assignment, whatever ran twice.
    assert pair.query("select job_id from assignments where outcome = 'completed' "
                      "group by job_id having count(*) <> 1") == []
    assert pair.query("select count(*) as n from assignments where outcome = 'completed'") == \
        [{"n": 60}]
    assert "completed job" in b.log()
    for name, proc in children.items():
        assert f"registered with parent validator as {name} at {pair.endpoint('a')}" in proc.log()
        proc.wait_for_log(f"registered with parent validator as {name} at "
                          f"{pair.endpoint('b')}")
        assert f"Now working with parent {pair.endpoint('b')}" in proc.log()
    for name, proc in children.items():
        assert proc.stop() == 0
        with common.connect(common.load_config(tmp_path / f"{name}.toml").pg_database) as conn:
            assert conn.execute("select count(*) as n from child_jobs where reported_at is null"
                                ).fetchone()["n"] == 0
    assert pair.query("select epoch, endpoint from leadership") == [
        {"epoch": 2, "endpoint": pair.endpoint("b")}]


def test_a_frozen_active_parent_is_fenced_when_resumed_and_becomes_a_standby(
        tmp_path, two_parents, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    pair = two_parents()
    a = pair.start("a")
    a.wait_for_log("New job 3 ")
    b = pair.start("b")
    b.wait_for_log(STANDBY)
    to_a = client(rpc, pair, "a")
    to_a.call("registerChild", childId="c1", endpoint="127.0.0.1:9")
    assert [j["jobId"] for j in to_a.call("requestJobs", childId="c1", maxJobs=2)["jobs"]] == \
        [1, 2]

    a.proc.send_signal(signal.SIGSTOP)
    terminate_leaders_lock_connection(pair.dsn)
    b.wait_for_log(TAKEN)
    # A report sent to the frozen parent, which it reads when it resumes.
    replies = []
    sender = threading.Thread(target=lambda: replies.append(to_a.call(
        "reportJobCompletion", childId="c1", jobId=1, success=True, result="{}")))
    sender.start()
    a.proc.send_signal(signal.SIGCONT)
    sender.join(60)
    assert replies[0]["acknowledged"] is False
    assert replies[0]["message"].startswith("standby")
    a.wait_for_log("Leadership lost: lost the connection that holds the leadership lock")
    a.wait_for_log(f"{STANDBY}; the active parent is {pair.endpoint('b')}")
    assert pair.query("select job_id, status from jobs order by job_id") == [
        {"job_id": 1, "status": "assigned"}, {"job_id": 2, "status": "assigned"},
        {"job_id": 3, "status": "pending"}]
    assert stats(rpc, pair, "a")["role"] == "standby"

    # The result goes to the active parent instead, and is recorded there once.
    to_b = client(rpc, pair, "b")
    to_b.call("registerChild", childId="c1", endpoint="127.0.0.1:9")
    for message in ("recorded", "already recorded"):
        assert to_b.call("reportJobCompletion", childId="c1", jobId=1, success=True,
                         result="{}") == {"acknowledged": True, "message": message}
    assert pair.query("select job_id from assignments where outcome = 'completed'") == \
        [{"job_id": 1}]
    assert "Child c1 completed job 1" not in a.log()


def test_a_parent_that_lost_its_lock_without_knowing_writes_nothing(make_dsn, tmp_path):
    """The fence itself, in one process: parent A's lock connection is dropped by the server
    and B takes over before A notices; every write A tries then is refused; and a takeover
    waits for a transaction of the old epoch still running."""
    import chain as chains
    dsn = make_dsn()
    cfg = common.load_config(write_toml(tmp_path / "p.toml", {
        "pg_database": dsn, "is_parent_validator": True, "auth": "off",
        "jobs": {"cross_check": 0.0},
        "subtensor": {"network": "file", "commitments_file": "unused.json"}}))
    states = {name: parent.ParentState(common.Database(dsn, parent.SCHEMA), cfg,
                                       leadership=parent.Leadership(dsn, f"{name}:1", 4.0))
              for name in ("a", "b")}
    a, b = states["a"], states["b"]
    assert a.leadership.take() and not b.leadership.take()
    snapshot = chains.ChainSnapshot(100, [
        chains.Commitment(f"5Miner{i}", i, 100, 1.0,
                          f'{{"provider": "HF", "repo_id": "org/m{i}", "revision": "{i:040x}"}}')
        for i in (1, 2, 3)])
    assert a.intake.add_commitments(snapshot) == [1, 2, 3]
    a.register_child("c1", "127.0.0.1:9")
    assert [row["job_id"] for row in a.assign("c1", 2)] == [1, 2]

    terminate_leaders_lock_connection(dsn)
    with a.fenced():  # A's transaction of epoch 1, begun before the takeover, still running
        taker = threading.Thread(target=b.leadership.take)
        taker.start()
        with common.connect(dsn) as conn:
            wait_until(lambda: conn.execute(
                "select 1 from pg_stat_activity where wait_event_type = 'Lock' "
                "and datname = current_database() "
                "and application_name = 'validator parent leadership'").fetchone(),
                30, "the takeover waiting for the old epoch's transaction")
        assert b.leadership.epoch is None
    taker.join(30)
    assert b.leadership.epoch == 2

    assert a.leadership.active()  # A has not noticed
    refused = "standby: this parent is a standby; the active parent is b:1"
    with pytest.raises(common.Standby, match=refused):
        a.report_completions("c1", [(1, True, "{}")])
    with pytest.raises(common.Standby, match=refused):
        a.assign("c1", 1)
    with pytest.raises(common.Standby, match=refused):
        a.leases.expire()
    with pytest.raises(common.Standby, match=refused):
        a.intake.add_commitments(chains.ChainSnapshot(101, [
            *snapshot.commitments,
            chains.Commitment("5Miner4", 4, 101, 1.0, "org/m4@" + "4" * 40)]))
    assert len(a.queue) == 1  # the job A could not hand out is back on its queue
    rows = b.db.query("select job_id, status from jobs order by job_id")
    assert [(r["job_id"], r["status"]) for r in rows] == \
        [(1, "assigned"), (2, "assigned"), (3, "pending")]
    assert a.leadership.confirm().startswith("lost the connection that holds the leadership")

    b.take_over()
    assert b.report_completions("c1", [(1, True, "{}")]) == [(True, "recorded")]
    assert [row["job_id"] for row in b.assign("c1", 5)] == [3]


def test_a_seed_configured_child_and_a_seed_built_client_work_with_the_active_parent(
        tmp_path, two_parents, child_config, processes):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    pair = two_parents()
    pair.start("a").wait_for_log("New job 3 ")
    pair.start("b").wait_for_log(STANDBY)
    (tmp_path / "seed.capnp").write_text(SEED_SCHEMA)
    flow = """
        print((await svc.ping()).pong)
        r = await svc.registerChild(childId="seedling", endpoint="127.0.0.1:1")
        print(r.success, r.message)
        r = await svc.requestJobs(childId="seedling", maxJobs=1)
        print([(j.jobId, j.hfRepoId) for j in r.jobs])
        r = await svc.reportJobCompletion(childId="seedling", jobId=1, success=True, result="{}")
        print(r.acknowledged)
    """
    run = run_foreign_client(tmp_path / "seed.capnp", pair.ports["a"], flow)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "pong from parent", "True registered as seedling", "[(1, 'org/model-1')]", "True"]
    run = run_foreign_client(tmp_path / "seed.capnp", pair.ports["b"], flow)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[:2] == [
        "pong from parent", "False standby: this parent is a standby; the active parent is "
        f"{pair.endpoint('a')}"]

    # A child with only the seed's parent_host and parent_port, as today.
    child = processes(["child.py", "--config", child_config("c1", pair.ports["a"])],
                      tmp_path / "c1.log")
    child.wait_for_log(f"registered with parent validator as c1 at {pair.endpoint('a')}")
    for job_id in (2, 3):
        child.wait_for_log(f"Job {job_id} succeeded")
    wait_until(lambda: pair.query("select count(*) as n from jobs where status = 'completed'"
                                  ) == [{"n": 3}], 30, "3 completed jobs")
    assert child.stop() == 0


def test_a_takeover_whose_queue_cannot_be_loaded_gives_the_lead_back_and_tries_again(
        make_dsn, tmp_path):
    """PostgreSQL restarted between taking the lock and loading the queue (seen under pg_ctl
    restart): the parent died with "lost the connection to PostgreSQL". Now it gives the
    leadership back and stands by, and its next try leads with the queue loaded."""
    dsn = make_dsn()
    cfg = common.load_config(write_toml(tmp_path / "p.toml", {
        "pg_database": dsn, "is_parent_validator": True, "auth": "off",
        "jobs": {"cross_check": 0.0},
        "subtensor": {"network": "file", "commitments_file": "unused.json"}}))
    state = parent.ParentState(common.Database(dsn, parent.SCHEMA), cfg,
                               leadership=parent.Leadership(dsn, "a:1", 4.0))
    # The state's connection dies as in a restart of the server: its next use fails.
    with common.connect(dsn) as admin:
        admin.execute("select pg_terminate_backend(%s)", (state.db.conn.info.backend_pid,))
    with pytest.raises(common.DatabaseUnavailable):
        parent.take_the_lead(state)
    assert not state.leadership.active()
    assert parent.stand_by(threading.Event(), state)
    assert state.leadership.active() and state.queue.version is not None
