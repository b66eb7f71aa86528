"""Generated requests, valid in shape but arbitrary in value, thrown at a live parent for a
bounded time; afterwards it still answers and its database is consistent."""

import json

from conftest import commitment, write_chain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common
from rpc import RpcClient

TEXT = st.one_of(st.text(max_size=80), st.sampled_from(
    ["good", "c1", "", "h:1", "::", "x:8", "nul\0", "[::1]:80", "é:1"]))
U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
CALLS = st.one_of(
    st.tuples(st.just("registerChild"), st.fixed_dictionaries(
        {"childId": TEXT, "endpoint": TEXT})),
    st.tuples(st.just("requestJobs"), st.fixed_dictionaries(
        {"childId": TEXT, "maxJobs": U32},
        optional={"heldJobs": st.lists(st.one_of(U64, st.integers(0, 20)), max_size=5)})),
    st.tuples(st.just("reportJobCompletion"), st.fixed_dictionaries(
        {"childId": TEXT, "jobId": st.one_of(U64, st.integers(0, 20)), "success": st.booleans(),
         "result": st.one_of(st.text(max_size=200), st.just("a\0b"))})),
    st.tuples(st.just("reportJobCompletions"), st.fixed_dictionaries(
        {"childId": TEXT, "results": st.lists(st.fixed_dictionaries(
            {"jobId": st.one_of(U64, st.integers(0, 20)), "success": st.booleans(),
             "result": st.one_of(st.text(max_size=200), st.just("a\0b"))}), max_size=4)})),
    st.tuples(st.just("receiveJob"), st.fixed_dictionaries({"job": st.fixed_dictionaries(
        {"jobId": U64, "hfRepoId": TEXT, "randomSeed": U32})})),
    st.tuples(st.just("ping"), st.just({})),
    st.tuples(st.just("getStats"), st.just({})),
)


def test_generated_requests_leave_the_parent_answering_and_consistent(
        tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, 9)])
    config = parent_config(max_jobs_per_child=3)
    cfg = common.load_config(config)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 8 ")
    client = RpcClient(rpc, "127.0.0.1", cfg.parent_port)
    client.call("registerChild", childId="good", endpoint="127.0.0.1:1")
    answered = []

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(CALLS)
    def fuzz(call):
        method, params = call
        reply = client.call(method, **params)  # a transport failure fails the test
        answered.append(method)
        assert isinstance(reply, dict)

    fuzz()
    assert len(answered) == 300
    assert client.call("ping") == {"pong": "pong from parent"}
    assert "Traceback" not in proc.log()
    with common.connect(cfg.pg_database) as db:
        jobs = db.execute("select job_id, status, child_id, attempts from jobs").fetchall()
        open_assignments = db.execute(
            "select job_id, count(*) as n from assignments where finished_at is null "
            "group by job_id").fetchall()
        children = {r["child_id"] for r in db.execute("select child_id from children")}
    assigned = {j["job_id"] for j in jobs if j["status"] == "assigned"}
    # Every assigned job is held by a registered child, under exactly one open assignment.
    assert {r["job_id"]: r["n"] for r in open_assignments} == dict.fromkeys(assigned, 1)
    assert all(j["child_id"] in children for j in jobs if j["status"] == "assigned")
    assert len(jobs) == 8
    stats = json.loads(client.call("getStats")["json"])
    assert stats["pending_jobs"] == sum(j["status"] == "pending" for j in jobs)
