"""Generated calls whose sizes and counts are drawn up to and past every limit of the RPC
surface (list lengths, text sizes, message sizes, results per call), from a registered child
and from connections that never registered, at a live parent: it never dies, every refusal is
a message (or, for a message over an unregistered connection's limit, a closed connection), and
no result it acknowledged is lost."""

import json

from conftest import commitment, write_chain
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import common
from rpc import PeerUnavailable, RpcClient

RESULT_LIMIT = 2048  # max_result_bytes
MESSAGE_LIMIT = 4096  # rpc_unregistered_max_message_bytes
HELD_LIMIT, RESULTS_LIMIT = 10_000, 1000  # common.MAX_HELD_JOBS, parent.MAX_RESULTS_PER_REPORT
# A JobResult's struct: two data words (jobId; success and attempt) and two pointers (result,
# signature), sent whole even when attempt and signature are unset.
RESULT_STRUCT = 32


def around(*edges):
    """Counts or sizes at, just under and just over each edge, and small ones."""
    return st.sampled_from(sorted({0, 1, 2, *(n + d for n in edges for d in (-1, 0, 1))}))


CALLS = st.fixed_dictionaries({
    "registered": st.booleans(),
    "method": st.sampled_from(["registerChild", "requestJobs", "reportJobCompletions",
                               "reportJobCompletion", "ping", "getStats"]),
    "text": around(64, MESSAGE_LIMIT // 2, MESSAGE_LIMIT),  # an id or endpoint this long
    "held": around(MESSAGE_LIMIT // 8, HELD_LIMIT),
    "results": around(MESSAGE_LIMIT // 40, RESULTS_LIMIT),
    "result_size": around(RESULT_LIMIT, MESSAGE_LIMIT),
    "success": st.booleans(),
    "pick": st.integers(0, 2**16),
})


EDGE = {"registered": True, "text": 8, "held": 0, "results": 0, "result_size": 0,
        "success": True, "pick": 0}


def params(call, jobs):
    """The call's parameters, and the fewest bytes its message can take: what it carries."""
    method, n = call["method"], call["text"]
    ids = sorted(jobs) or [1]
    results = [{"jobId": ids[(call["pick"] + k) % len(ids)], "success": call["success"],
                "result": "r" * call["result_size"]} for k in range(call["results"])]
    if method == "registerChild":
        endpoint = "h" * max(1, n - 5) + ":8000"
        return {"childId": "good", "endpoint": endpoint}, len(endpoint)
    if method == "requestJobs":
        held = [ids[(call["pick"] + k) % len(ids)] for k in range(call["held"])]
        return ({"childId": "good", "maxJobs": call["pick"] % 3, "heldJobs": held,
                 "results": results},
                8 * len(held) + (call["result_size"] + RESULT_STRUCT) * len(results))
    if method == "reportJobCompletions":
        return ({"childId": "good", "results": results},
                (call["result_size"] + RESULT_STRUCT) * len(results))

    if method == "reportJobCompletion":
        if results:
            return {"childId": "good", **results[0]}, call["result_size"]
        return {"childId": "x" * n, "jobId": 1, "success": True, "result": ""}, n
    return {}, 0


def expected_refusal(call):
    """The message a registered call must be refused with for its counts, or None."""
    if call["method"] == "requestJobs" and call["held"] > HELD_LIMIT:
        return f"{call['held']} heldJobs in one call; the limit is {HELD_LIMIT}"
    if call["method"] in ("requestJobs", "reportJobCompletions") and \
            call["results"] > RESULTS_LIMIT:
        return f"{call['results']} results in one call; the limit is {RESULTS_LIMIT}"
    return None


def refusals(method, reply):
    """The refusal messages in a reply (empty: nothing refused)."""
    if method == "registerChild":
        return [] if reply["success"] else [reply["message"]]
    if method in ("requestJobs", "reportJobCompletions"):
        return ([reply["error"]] if reply["error"] else []) + [
            r["message"] for r in reply["replies"] if not r["acknowledged"]]
    if method == "reportJobCompletion":
        return [] if reply["acknowledged"] else [reply["message"]]
    return []


def test_sizes_and_counts_up_to_and_past_every_limit(tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, 31)])
    config = parent_config(max_jobs_per_child=4, max_result_bytes=RESULT_LIMIT,
                           rpc_unregistered_max_message_bytes=MESSAGE_LIMIT, log_level="INFO")
    cfg = common.load_config(config)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 30 ")
    child = RpcClient(rpc, "127.0.0.1", cfg.parent_port)
    assert child.call("registerChild", childId="good", endpoint="127.0.0.1:1")["success"]
    jobs = {job["jobId"] for job in child.call("requestJobs", childId="good", maxJobs=4)["jobs"]}
    recorded, dropped = {}, []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(CALLS)
    # Each limit just past its edge, whatever the draws: a result, a list, a message.
    @example(dict(EDGE, method="requestJobs", results=1, result_size=RESULT_LIMIT + 1))
    @example(dict(EDGE, method="requestJobs", results=2, result_size=RESULT_LIMIT))
    @example(dict(EDGE, method="requestJobs", held=HELD_LIMIT + 1))
    @example(dict(EDGE, method="reportJobCompletions", results=RESULTS_LIMIT + 1))
    @example(dict(EDGE, method="registerChild", registered=False, text=MESSAGE_LIMIT + 1))
    def fuzz(call):
        method = call["method"]
        values, least_bytes = params(call, jobs)
        # Framing, pointers and padding add at most this much.
        most_bytes = least_bytes + 512 + 16 * len(values.get("results", []))
        client = child if call["registered"] else RpcClient(rpc, "127.0.0.1",
                                                                    cfg.parent_port)
        try:
            reply = client.call(method, **values)
        except PeerUnavailable:
            # Only a connection that never registered is dropped, for a message over its limit.
            assert not call["registered"] and most_bytes > MESSAGE_LIMIT, call
            dropped.append(least_bytes)
            return
        finally:
            if client is not child:
                client.close()
        # Within its limit, an unregistered connection is answered (refused or not).
        assert call["registered"] or least_bytes <= MESSAGE_LIMIT, call
        for message in refusals(method, reply):
            assert message and "Traceback" not in message, reply
        if call["registered"] and expected_refusal(call):
            assert reply["error"] == expected_refusal(call)
        jobs.update(job["jobId"] for job in reply.get("jobs", []))
        sent = values.get("results", [values] if method == "reportJobCompletion" else [])
        answers = reply.get("replies", [reply] if method == "reportJobCompletion" else [])
        for result, answer in zip(sent, answers) if values.get("childId") == "good" else ():
            too_big = len(result["result"]) > RESULT_LIMIT
            if answer["message"] == "recorded":
                assert not too_big, (result["jobId"], answer)
                recorded[result["jobId"]] = (result["success"], result["result"])
            elif answer["message"].startswith("recorded as failed: "):
                # Over max_result_bytes: a failure that says so, so that it is not resent.
                assert too_big, (result["jobId"], answer)
                reason = answer["message"].removeprefix("recorded as failed: ")
                recorded[result["jobId"]] = (False, json.dumps({"error": reason}))

    fuzz()
    assert dropped and recorded
    assert proc.proc.poll() is None
    assert child.call("ping") == {"pong": "pong from parent"}
    assert "Traceback" not in proc.log()
    # Every result the parent acknowledged as recorded is in its database, as it was sent.
    with common.connect(cfg.pg_database) as db:
        rows = {r["job_id"]: (r["success"], r["result"]) for r in db.execute(
            "select job_id, success, result from jobs where status in ('completed', 'failed')")}
    assert {job_id: rows.get(job_id) for job_id in recorded} == recorded
    stats = json.loads(child.call("getStats")["json"])
    assert stats["total_children"] == 1
