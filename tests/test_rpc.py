"""Every RPC method over a real socket, against real parent and child processes."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ROOT, commitment, free_port, run_foreign_client, wait_until, write_chain

import child
import common
from rpc import PeerUnavailable, RpcClient, Unimplemented


@pytest.fixture
def parent(start_parent):
    """A running parent with three jobs pending; .client is our RPC client to it."""
    return start_parent()


@pytest.fixture
def start_parent(tmp_path, parent_config, processes, rpc):
    """start_parent(**config_keys): the `parent` fixture's parent, with these keys."""
    return lambda **keys: run_parent(tmp_path, parent_config(**keys), processes, rpc)


def run_parent(tmp_path, config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log(r"New job 3 ")
    port = common.load_config(config).parent_port
    proc.port, proc.dsn = port, common.load_config(config).pg_database
    proc.client = RpcClient(rpc, "127.0.0.1", port)
    return proc


def register(client, child_id="c1", endpoint="127.0.0.1:9999"):
    return client.call("registerChild", childId=child_id, endpoint=endpoint)


def test_ping_answers_with_the_role(parent):
    assert parent.client.call("ping") == {"pong": "pong from parent"}


def test_register_child_accepts_a_valid_child_and_refuses_bad_values(parent):
    assert register(parent.client) == {"success": True, "message": "registered as c1"}
    # The caller's address, and the endpoint it claims.
    parent.wait_for_log(r"Child c1 registered from 127\.0\.0\.1:\d+ "
                        r"\(endpoint 127\.0\.0\.1:9999\)\n", timeout=5)
    assert register(parent.client, child_id="") == {
        "success": False, "message": "childId must be 1-64 letters, digits, '_', '.' or '-'"}
    assert register(parent.client, endpoint="nowhere") == {
        "success": False, "message": "endpoint 'nowhere' is not host:port"}


def test_request_jobs_hands_out_each_pending_job_once(parent):
    refused = parent.client.call("requestJobs", childId="stranger", maxJobs=5)
    assert refused == {"jobs": [], "replies": [], "revoked": [],
                       "error": "unknown child 'stranger': call registerChild first"}
    register(parent.client, "c1")
    register(parent.client, "c2")
    assert parent.client.call("requestJobs", childId="c1", maxJobs=0)["jobs"] == []
    first = parent.client.call("requestJobs", childId="c1", maxJobs=2)
    second = parent.client.call("requestJobs", childId="c2", maxJobs=5)
    assert (first["error"], second["error"]) == ("", "")
    assert [j["jobId"] for j in first["jobs"]] == [1, 2]
    assert [j["jobId"] for j in second["jobs"]] == [3]
    assert first["jobs"][0]["hfRepoId"] == "org/model-1"
    parent.wait_for_log("Sending 2 jobs to child c1")
    assert parent.client.call("requestJobs", childId="c2", maxJobs=5)["jobs"] == []


def test_request_jobs_records_the_results_it_carries_before_it_assigns(start_parent):
    parent = start_parent(max_jobs_per_child=2)
    register(parent.client, "c1")
    assert [j["jobId"] for j in parent.client.call(
        "requestJobs", childId="c1", maxJobs=2)["jobs"]] == [1, 2]

    def poll(*results, max_jobs=2):
        return parent.client.call("requestJobs", childId="c1", maxJobs=max_jobs,
                                  heldJobs=[1, 2], results=[
                                      {"jobId": job_id, "success": job_id != 2, "result": "{}"}
                                      for job_id in results])

    assert poll(1, 999, max_jobs=0) == {"jobs": [], "error": "", "revoked": [], "replies": [
        {"acknowledged": True, "message": "recorded"},
        {"acknowledged": False, "message": "unknown job 999"}]}
    refused = poll(*[2] * 1001)  # nothing of a refused call is recorded
    assert (refused["jobs"], refused["replies"]) == ([], [])
    assert refused["error"] == "1001 results in one call; the limit is 1000"
    # The job its result frees makes room, within max_jobs_per_child, in the same call.
    reply = poll(2)
    assert [j["jobId"] for j in reply["jobs"]] == [3]
    assert reply["replies"] == [{"acknowledged": True, "message": "recorded"}]
    parent.wait_for_log("Job 2 failed on child c1")
    stats = json.loads(parent.client.call("getStats")["json"])
    assert (stats["failed_jobs"], stats["children"][0]["total_jobs_completed"]) == (1, 2)


def test_a_request_that_may_wait_is_answered_when_a_job_comes(tmp_path, parent, rpc):
    """waitMs: with no job for the child, the parent holds the call open until one is created,
    then answers with it; with none, it answers empty when the wait is over."""
    register(parent.client, "c1")
    assert len(parent.client.call("requestJobs", childId="c1", maxJobs=5)["jobs"]) == 3
    assert parent.client.call("requestJobs", childId="c1", maxJobs=5, waitMs=200) == {
        "jobs": [], "replies": [], "revoked": [], "error": ""}

    def last_seen():
        return json.loads(parent.client.call("getStats")["json"])["children"][0]["last_seen"]

    seen, answer = last_seen(), {}
    held = threading.Thread(target=lambda: answer.update(RpcClient(
        rpc, "127.0.0.1", parent.port).call("requestJobs", childId="c1", maxJobs=5,
                                            waitMs=5000)))
    held.start()
    wait_until(lambda: last_seen() > seen, 10, "the held call to reach the parent")
    write_chain(tmp_path / "chain.json", 101, [commitment(i) for i in (1, 2, 3, 4)])
    held.join(10)
    assert [job["jobId"] for job in answer["jobs"]] == [4]


def test_a_child_polls_again_at_once_only_when_its_next_poll_is_held(parent, make_dsn):
    """child.poll returns when the next poll is due: an idle child that reported all its
    results polls again at once, since that poll is held; one whose result was refused does
    not (it would ask again and again)."""
    register(parent.client, "c1")
    store, seals = child.ChildStore(make_dsn(), 4), child.Seals("c1")
    assert child.poll(parent.client, store, seals, 0.5) == 0.5  # idle: held, answered with jobs
    assert store.incoming.holdings() == (1, [1, 2, 3])
    for job_id in (1, 2, 3):
        store.runs.start(job_id)
        store.runs.finish(job_id, True, "{}")
    assert child.poll(parent.client, store, seals, 0.5) == 0.0  # the last results, taken
    assert store.outgoing.unreported() == []
    assert child.poll(parent.client, store, seals, 0.5) == 0.5  # held; no job came
    store.add_jobs([{"jobId": 999}])
    store.runs.start(999)
    store.runs.finish(999, True, "{}")
    assert child.poll(parent.client, store, seals, 0.5) == 0.5  # unknown job 999: refused
    assert [row["job_id"] for row in store.outgoing.unreported()] == [999]
    store.db.close()


def test_report_job_completion_records_only_the_holders_result(parent):
    register(parent.client, "c1")
    register(parent.client, "c2")
    [job] = parent.client.call("requestJobs", childId="c1", maxJobs=1)["jobs"]

    def report(child_id, job_id=job["jobId"]):
        return parent.client.call("reportJobCompletion", childId=child_id, jobId=job_id,
                                  success=True, result='{"score": 0.5}')

    assert report("c2") == {"acknowledged": True,
                            "message": "not recorded: job 1 is assigned and not held by c2"}
    assert report("c1") == {"acknowledged": True, "message": "recorded"}
    parent.wait_for_log("Child c1 completed job 1")
    assert report("c1") == {"acknowledged": True, "message": "already recorded"}
    assert report("c1", job_id=999) == {"acknowledged": False, "message": "unknown job 999"}
    assert parent.log().count("completed job 1") == 1


def test_report_job_completions_answers_each_result_of_one_call(parent):
    register(parent.client, "c1")
    register(parent.client, "c2")
    parent.client.call("requestJobs", childId="c1", maxJobs=2)
    parent.client.call("requestJobs", childId="c2", maxJobs=1)

    def report(child_id, *job_ids, result="{}"):
        return parent.client.call("reportJobCompletions", childId=child_id, results=[
            {"jobId": job_id, "success": job_id != 2, "result": result} for job_id in job_ids])

    assert report("c1", 1, 2, 3, 999) == {"error": "", "replies": [
        {"acknowledged": True, "message": "recorded"},
        {"acknowledged": True, "message": "recorded"},
        {"acknowledged": True, "message": "not recorded: job 3 is assigned and not held by c1"},
        {"acknowledged": False, "message": "unknown job 999"}]}
    assert report("c1", 1)["replies"] == [{"acknowledged": True, "message": "already recorded"}]
    big = "x" * ((1 << 20) + 1)
    too_big = "result of job 3 is 1048577 bytes; the limit is 1048576 (max_result_bytes)"
    # Recorded as a failure that says why: refused, the child would send it again forever.
    assert report("c2", 3, result=big)["replies"] == [
        {"acknowledged": True, "message": f"recorded as failed: {too_big}"}]
    with common.connect(parent.dsn) as conn:
        assert conn.execute("select success, result from jobs where job_id = 3").fetchall() \
            == [{"success": False, "result": json.dumps({"error": too_big})}]
    assert report("c2")["replies"] == []  # a heartbeat, in effect
    assert report("stranger", 3) == {
        "replies": [], "error": "unknown child 'stranger': call registerChild first"}
    parent.wait_for_log("Job 2 failed on child c1")
    stats = json.loads(parent.client.call("getStats")["json"])
    assert (stats["failed_jobs"], stats["children"][0]["total_jobs_completed"]) == (2, 2)
    assert stats["children"][1]["total_jobs_completed"] == 1  # c2's job 3, too big
    assert parent.log().count("completed job 1\n") == 1


def start_older_parent(tmp_path, jobs):
    """A parent of an older version, built from the seed's interface text: it ignores what the
    seed lacks (the results a poll carries, waitMs) and has no reportJobCompletions. Each
    requestJobs answers `jobs`; it prints each call, and "serving" once it listens."""
    (tmp_path / "seed.capnp").write_text(SEED_SCHEMA)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, capnp
        schema = capnp.load({str(tmp_path / "seed.capnp")!r})
        class OlderParent(schema.ValidatorJobsService.Server):
            async def registerChild(self, childId, endpoint, **_):
                return True, "registered"
            async def requestJobs(self, childId, maxJobs, **_):
                print("requestJobs", maxJobs, flush=True)
                return {jobs!r}
            async def reportJobCompletion(self, childId, jobId, success, result, **_):
                print(jobId, result, flush=True)
                return jobId != 8
        async def main():
            server = await capnp.AsyncIoStream.create_server(
                lambda stream: capnp.TwoPartyServer(stream, bootstrap=OlderParent())
                .on_disconnect(), "127.0.0.1", {port})
            print("serving", flush=True)
            await server.serve_forever()
        asyncio.run(capnp.run(main()))
    """)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "serving\n"
    proc.port = port
    return proc


def test_a_child_reports_one_by_one_to_a_parent_without_the_batch_method(tmp_path, make_dsn,
                                                                          rpc):
    """The child falls back to the seed's reportJobCompletion for the results an older parent
    ignored in requestJobs."""
    older_parent = start_older_parent(tmp_path, [{"jobId": 9, "hfRepoId": "org/nine"}])
    try:
        store = child.ChildStore(make_dsn(), 4)
        store.add_jobs([{"jobId": n, "hfRepoId": "org/m"} for n in (7, 8)])
        for n in (7, 8):
            store.runs.start(n)
            store.runs.finish(n, True, f'{{"score": {n}}}')
        client = RpcClient(rpc, "127.0.0.1", older_parent.port)
        # Reported apart, and one not taken: the next poll is due after the interval.
        assert child.poll(client, store, child.Seals("c1"), interval=2.0) == 2.0
        assert [older_parent.stdout.readline() for _ in range(3)] == [
            "requestJobs 4\n", '7 {"score": 7}\n', '8 {"score": 8}\n']
        # 7 is reported; 8 was not taken, and is kept; 9 came with the poll.
        assert store.incoming.holdings() == (3, [8, 9])
        store.db.close()
        # The client remembers the answer for this connection: the next round asks no more
        # (with the peer gone, asking would fail with PeerUnavailable).
        older_parent.kill()
        older_parent.wait()
        with pytest.raises(Unimplemented):
            client.call("reportJobCompletions", childId="c1", results=[])
    finally:
        older_parent.kill()
        older_parent.wait()


def test_an_idle_child_polls_an_older_parent_once_per_interval(tmp_path, make_dsn, rpc,
                                                               child_config):
    """An older parent answers a poll that may wait at once: the idle child then waits out its
    poll_interval itself, instead of asking again and again."""
    older_parent = start_older_parent(tmp_path, [])
    cfg = common.load_config(child_config("c1", older_parent.port, poll_interval=0.5))
    store = child.ChildStore(cfg.pg_database, 4)
    stop = threading.Event()
    loop = threading.Thread(target=child.work, args=(
        cfg, stop, threading.Event(), RpcClient(rpc, "127.0.0.1", older_parent.port),
        store, child.Seals("c1")))
    loop.start()
    try:
        polls = []
        for _ in range(3):
            assert older_parent.stdout.readline() == "requestJobs 4\n"
            polls.append(time.monotonic())
        assert polls[2] - polls[0] >= 0.9  # two intervals of 0.5 s; at once if it did not wait
    finally:
        stop.set()
        loop.join(10)
        store.db.close()
        older_parent.kill()
        older_parent.wait()


def test_get_stats_uses_the_seed_format(parent):
    register(parent.client, "c1", "10.1.1.1:8002")
    parent.client.call("requestJobs", childId="c1", maxJobs=2)
    parent.client.call("reportJobCompletion", childId="c1", jobId=1, success=True, result="{}")
    parent.client.call("reportJobCompletion", childId="c1", jobId=2, success=False,
                       result='{"error": "bad model"}')
    stats = json.loads(parent.client.call("getStats")["json"])
    [child] = stats.pop("children")
    assert 0 <= stats.pop("oldest_pending_age") < 60
    assert stats == {"total_children": 1, "active_children": 1, "pending_jobs": 1,
                     "pending_by_priority": {"0": 1}, "failed_jobs": 1, "cancelled_jobs": {},
                     "auth_failures": 0,
                     "role": "active", "active_parent": f"localhost:{parent.port}",
                     "leadership_epoch": 1, "open_submissions": 1,
                     "cross_checks": {"open": 0, "agreed": 0, "settled": 0, "disagreed": 0,
                                      "void": 0}}
    assert child.pop("last_seen") > 0
    assert child == {"child_id": "c1", "endpoint": "10.1.1.1:8002", "active": True,
                     "active_jobs": 0, "total_jobs_sent": 2, "total_jobs_completed": 2,
                     "resting_seconds": 0.0, "transient_in_a_row": 0, "cross_checks": 0,
                     "cross_check_agreements": 0, "cross_check_disagreements": 0,
                     "quarantined": False, "quarantine_reason": None}


def test_the_status_command_prints_the_parents_statistics(parent):
    register(parent.client, "c1", "10.1.1.1:8002")
    run = subprocess.run([sys.executable, ROOT / "validator.py", "status", "--parent-host",
                          "127.0.0.1", "--parent-port", str(parent.port), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)
    assert stats["pending_jobs"] == 3 and stats["children"][0]["child_id"] == "c1"
    table = subprocess.run([sys.executable, ROOT / "validator.py", "status", "--parent-host",
                            "127.0.0.1", "--parent-port", str(parent.port)],
                           capture_output=True, text=True, timeout=60)
    assert "pending jobs: 3" in table.stdout and "10.1.1.1:8002" in table.stdout
    down = subprocess.run([sys.executable, ROOT / "validator.py", "status", "--parent-port",
                           "1"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
    assert down.stderr.startswith("error: parent validator unreachable: localhost:1")


def test_a_parent_refuses_receive_job_with_a_message(parent):
    reply = parent.client.call("receiveJob", job={"jobId": 1})
    assert reply == {"accepted": False,
                     "message": "receiveJob is not served by a parent validator"}


def test_a_child_accepts_a_pushed_job_once_and_runs_it(tmp_path, parent, child_config,
                                                       processes, rpc):
    config = child_config("pushed", parent.port, max_concurrent_jobs=1,
                          evaluator={"demo_seconds": 3.0})
    child = processes(["child.py", "--config", config], tmp_path / "child.log")
    child.wait_for_log("Successfully registered with parent validator as pushed")
    # The child took a job by polling; its one slot is busy, so a push is refused.
    child.wait_for_log(r"Evaluating job \d+")
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).child_port)
    assert client.call("ping") == {"pong": "pong from child"}
    job = {"jobId": 77, "hfRepoId": "org/pushed", "hfRepoCommit": "abc", "logsPath": "x.log"}
    assert client.call("receiveJob", job=job) == {"accepted": False, "message": "no free slot"}
    assert client.call("registerChild", childId="x", endpoint="h:1") == {
        "success": False, "message": "registerChild is not served by a child validator"}
    stats = json.loads(client.call("getStats")["json"])
    assert stats["running"] + stats["queued"] == 1


def test_a_client_built_from_the_seed_interface_text_talks_to_the_parent(tmp_path, parent):
    """The seed's IDL, without our added fields, compiled separately."""
    (tmp_path / "seed.capnp").write_text(SEED_SCHEMA)
    run = run_foreign_client(tmp_path / "seed.capnp", parent.port, """
        print((await svc.ping()).pong)
        r = await svc.registerChild(childId="seedling", endpoint="127.0.0.1:1")
        print(r.success, r.message)
        r = await svc.requestJobs(childId="seedling", maxJobs=2)
        print([(j.jobId, j.hfRepoId) for j in r.jobs])
        r = await svc.reportJobCompletion(childId="seedling", jobId=1, success=True, result="{}")
        print(r.acknowledged)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "pong from parent", "True registered as seedling",
        "[(1, 'org/model-1'), (2, 'org/model-2')]", "True"]
    parent.wait_for_log("Child seedling completed job 1")


SEED_SCHEMA = """@0xa007a6fdaf5da8da;
struct EvaluationJobData {
  jobId @0 :UInt64; submissionId @1 :UInt64; minerHotkey @2 :Text; hfRepoId @3 :Text;
  hfRepoCommit @4 :Text; envProvider @5 :Text; envName @6 :Text; logsPath @7 :Text;
  randomSeed @8 :UInt32; maxRetries @9 :UInt8; retryCount @10 :UInt8; createdAt @11 :UInt64;
}
interface ValidatorJobsService {
  registerChild @0 (childId: Text, endpoint: Text) -> (success: Bool, message: Text);
  requestJobs @1 (childId: Text, maxJobs: UInt32) -> (jobs: List(EvaluationJobData));
  reportJobCompletion @2 (childId: Text, jobId: UInt64, success: Bool, result: Text) -> (acknowledged: Bool);
  receiveJob @3 (job: EvaluationJobData) -> (accepted: Bool, message: Text);
  ping @4 () -> (pong: Text);
}
"""


def test_a_dead_peer_raises_peer_unavailable(rpc):
    client = RpcClient(rpc, "127.0.0.1", free_port(), timeout=5)
    with pytest.raises(PeerUnavailable, match="127.0.0.1"):
        client.call("ping")


def test_a_child_with_a_free_slot_queues_a_pushed_job_once(tmp_path, parent, child_config,
                                                           processes, rpc):
    config = child_config("roomy", parent.port, max_concurrent_jobs=5)
    child = processes(["child.py", "--config", config], tmp_path / "child.log")
    child.wait_for_log(r"Job 3 succeeded")
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).child_port)
    job = {"jobId": 77, "hfRepoId": "org/pushed", "hfRepoCommit": "abc", "logsPath": "x.log"}
    assert client.call("receiveJob", job=job) == {"accepted": True, "message": "queued"}
    assert client.call("receiveJob", job=job) == {"accepted": True,
                                                  "message": "already have this job"}
    child.wait_for_log("Job 77 succeeded")
    # The parent never issued job 77: it says so, and the child keeps the result.
    child.wait_for_log("Parent did not take the result of job 77: unknown job 77")
    assert child.log().count("Evaluating job 77") == 1


FAILED_CALLS = """
import gc, sys, time
sys.path.insert(0, {root!r})
from rpc import PeerUnavailable, RpcClient, RpcThread, ServiceBase

class Service(ServiceBase):
    def get_stats(self):
        time.sleep(1.0)
        return {{"json": "{{}}"}}

    def report_job_completions(self, childId, results=()):
        return {{"replies": [{{"acknowledged": True, "message": ""}} for _ in results]}}

rpc = RpcThread()
client = RpcClient(rpc, "127.0.0.1", rpc.serve("127.0.0.1", 0, Service), timeout=0.3)
client.call("ping")
failures = []
for method, params in [
        # 70 MiB: over Cap'n Proto's 64 MiB message limit, which the sender enforces.
        ("reportJobCompletions", {{"childId": "c", "results": [
            {{"jobId": i, "success": True, "result": "x" * (1 << 20)}} for i in range(70)]}}),
        ("getStats", {{}})]:  # answered after the client's timeout
    try:
        client.call(method, **params)
    except PeerUnavailable as e:
        failures.append(str(e))
gc.collect()  # here, on the main thread: any capnp object left in a cycle is freed now
print(failures, client.call("ping"))
"""


def test_a_failed_call_never_frees_a_capnp_object_off_the_rpc_thread():
    """A call that fails (too large for a message, timed out) left its capability and promise
    in a reference cycle; the garbage collector freed them on whatever thread it ran, and the
    process aborted ("No event loop is running on this thread")."""
    proc = subprocess.run([sys.executable, "-c", FAILED_CALLS.format(root=str(ROOT))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "event loop" not in proc.stderr
    failures, pong = proc.stdout.rsplit("] ", 1)
    assert failures.count("PeerUnavailable") == 0 and failures.count("127.0.0.1") == 2
    assert "timed out" in failures and "pong from validator" in pong
