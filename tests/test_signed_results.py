"""End-to-end signatures, the parent's side (issue 22): with auth on, a result counts only with
the signature of the child that registered the connection, over an attempt it held, and keeps
that proof; a child id lives on one connection; what the parent sends is signed."""

import contextlib
import json
import subprocess
import sys

from conftest import ROOT, commitment, wait_until, write_chain

import chain as chains
import auth
import common
import parent as parents
import test_security as security
from rpc import PeerUnavailable, RpcClient
from test_security import signed_registration, signed_result

# The fixtures of the parent-side security tests: a parent with auth on (jobs 1-3 made, hotkeys
# c1 and c2 allowed) and the test's hotkeys.
wallets, parent = security.wallets, security.parent


def holds(wallets, name, fields, signature):
    return auth.Verifier.holds(wallets[name].ss58_address, fields, signature)


def registered(parent, wallets, child_id, signer=None):
    client = parent.connect()
    reply = client.call("registerChild",
                        **signed_registration(client, wallets, signer or child_id, child_id))
    assert reply == {"success": True, "message": f"registered as {child_id}"}
    return client


def weights(tmp_path):
    """The weights the parent would set now (chain.weight_table, as the WeightSetter)."""
    cfg = common.load_config(tmp_path / "parent.toml")
    neurons = [chains.Neuron(i, f"5Miner{i:03d}", 0) for i in (1, 2, 3)]
    with contextlib.closing(common.Database(cfg.pg_database, parents.SCHEMA)) as db:
        return chains.weight_table(db, cfg.weights, neurons, set())


def jobs_json(tmp_path):
    run = subprocess.run([sys.executable, ROOT / "validator.py", "jobs", "--json", "--config",
                          tmp_path / "parent.toml"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return {job["job_id"]: job for job in json.loads(run.stdout)}


def test_injected_results_are_refused_and_recorded_nowhere_and_a_signed_one_keeps_its_proof(
        tmp_path, parent, wallets):
    c1 = registered(parent, wallets, "c1")
    registered(parent, wallets, "c2")
    assert [(j["jobId"], j["attempt"]) for j in c1.call("requestJobs", childId="c1",
                                                        maxJobs=3)["jobs"]] == \
        [(1, 1), (2, 1), (3, 1)]
    before = weights(tmp_path)
    score = '{"score": 7}'
    good = signed_result(wallets, "c1", 1, 1, True, score)
    injected = [
        {"jobId": 1, "success": True, "result": score, "attempt": 1},  # no signature
        dict(good, signature=signed_result(wallets, "c1", 2, 1, True, score)["signature"]),
        dict(good, signature=signed_result(wallets, "c1", 1, 1, True, '{"score": 1}')
             ["signature"]),  # over another result text
        signed_result(wallets, "c1", 1, 1, True, score, signer="c2"),  # another allowed hotkey
        signed_result(wallets, "c1", 1, 2, True, score),  # an attempt c1 never held
    ]
    # Written into c1's registered connection, by each way a result reaches the parent.
    replies = c1.call("reportJobCompletions", childId="c1", results=injected)["replies"]
    replies += c1.call("requestJobs", childId="c1", maxJobs=0, results=injected)["replies"]
    replies += [c1.call("reportJobCompletion", childId="c1", **result) for result in injected]
    assert [r["acknowledged"] for r in replies] == [False] * 15
    assert all(r["message"].startswith("refused: ") for r in replies), replies
    assert "never this child's" in replies[4]["message"]
    # Recorded nowhere, counted, and the weights are what they were.
    assert {job["status"] for job in jobs_json(tmp_path).values()} == {"assigned"}
    assert weights(tmp_path) == before == []
    stats = json.loads(c1.call("getStats")["json"])
    assert stats["auth_failures"] == 15
    assert stats["children"][0]["total_jobs_completed"] == 0
    parent.wait_for_log(r"Refused the result of job 1 from child 'c1' from 127\.0\.0\.1:\d+: "
                        r"its signature does not hold")

    # The child's own signature over its attempt is recorded, with its proof, and the reply
    # is the parent's signed word.
    [reply] = c1.call("reportJobCompletions", childId="c1", results=[good])["replies"]
    assert (reply["acknowledged"], reply["message"]) == (True, "recorded")
    assert holds(wallets, "parent", auth.reply_fields("c1", 1, 1, True, "recorded"),
                 reply["signature"])
    job = jobs_json(tmp_path)[1]
    assert (job["status"], job["result"], job["result_hotkey"], job["result_attempt"]) == \
        ("completed", score, wallets["c1"].ss58_address, 1)
    # Anyone with c1's ss58 address can check which child vouched for this score.
    proof = auth.result_fields("c1", 1, job["result_attempt"], True, job["result"])
    assert auth.Verifier.holds(job["result_hotkey"], proof,
                                 bytes.fromhex(job["result_signature"]))
    assert [(row.uid, row.score) for row in weights(tmp_path)] == [(1, 7.0)]
    # A refused reply is signed too: the child can tell the parent's refusal from a forgery.
    refused = c1.call("reportJobCompletion", childId="c1", **injected[0])
    assert holds(wallets, "parent", auth.reply_fields("c1", 1, 1, False, refused["message"]),
                 refused["signature"])


def test_a_child_id_registered_on_a_second_connection_closes_the_first(parent, wallets):
    first = registered(parent, wallets, "c1")
    shown = r"Child c1 registered from (127\.0\.0\.1:\d+) \(endpoint 127\.0\.0\.1:9000\)"
    earlier = parent.wait_for_log(shown + r"\n")[1]
    second = registered(parent, wallets, "c1")
    line = parent.wait_for_log(shown + f"; closed its earlier connection from {earlier}\n")
    assert line[1] != earlier
    # The first connection is gone: its next call fails, or (on the new connection the client
    # opens) is refused: it is not registered.
    with contextlib.suppress(PeerUnavailable):
        assert first.call("requestJobs", childId="c1", maxJobs=1) == {
            "jobs": [], "replies": [], "revoked": [], "error": "not allowed"}
    assert len(second.call("requestJobs", childId="c1", maxJobs=1)["jobs"]) == 1


def test_jobs_revocations_and_jobs_sent_again_carry_the_parents_signature(tmp_path, parent,
                                                                         wallets):
    c1 = registered(parent, wallets, "c1")
    jobs = c1.call("requestJobs", childId="c1", maxJobs=2, heldJobs=[])["jobs"]
    assert [job["jobId"] for job in jobs] == [1, 2]

    def signed(job):
        fields = auth.job_fields("c1", {k: v for k, v in job.items() if k != "signature"})
        return holds(wallets, "parent", fields, job["signature"])
    assert all(map(signed, jobs))
    # What it covers: changed on the way, or sent to another child, it holds no more.
    assert not signed(dict(jobs[0], hfRepoCommit="f" * 40))
    assert not signed(dict(jobs[0], randomSeed=jobs[0]["randomSeed"] ^ 1))
    assert not auth.Verifier.holds(wallets["parent"].ss58_address, auth.job_fields(
        "c2", {k: v for k, v in jobs[0].items() if k != "signature"}), jobs[0]["signature"])

    # A job the child lacks is sent again after the redelivery grace, signed afresh.
    with common.connect(common.load_config(tmp_path / "parent.toml").pg_database) as conn:
        conn.execute("update jobs set assigned_at = now() - interval '1 minute'")
        parents.cancel_job(common.Database(conn.info.dsn, parents.SCHEMA), 2)
    answer = c1.call("requestJobs", childId="c1", maxJobs=0, heldJobs=[2])
    [again] = answer["jobs"]
    assert (again["jobId"], again["attempt"]) == (1, 1) and signed(again)
    [revoked] = answer["revoked"]
    assert (revoked["jobId"], revoked["attempt"], revoked["reason"]) == \
        (2, 1, "cancelled by the operator")
    assert holds(wallets, "parent", auth.revocation_fields("c1", 2, 1, revoked["reason"]),
                 revoked["signature"])


def test_with_auth_off_results_need_no_signature_and_carry_no_proof(tmp_path, parent_config,
                                                                    processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config()
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 1 ")
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).parent_port)
    assert client.call("registerChild", childId="c1", endpoint="127.0.0.1:9")["success"]
    [job] = client.call("requestJobs", childId="c1", maxJobs=1)["jobs"]
    assert "signature" not in job or not job["signature"]
    assert client.call("reportJobCompletion", childId="c1", jobId=1, success=True,
                       result="{}") == {"acknowledged": True, "message": "recorded"}
    wait_until(lambda: jobs_json(tmp_path)[1]["status"] == "completed", 10, "the result")
    assert jobs_json(tmp_path)[1]["result_signature"] is None
    assert "Child c1 completed job 1" in proc.log()


def test_a_job_handed_to_its_child_again_records_that_childs_result_of_the_earlier_attempt(
        tmp_path, parent, wallets):
    """The chaos run's case (seed 58213): a job taken back while its child still ran it, then
    handed to the same child again as attempt 2. The child, which held the job and never saw
    the newer delivery (or ignored it), reports over attempt 1: the result counts, with that
    proof, because the rule is "from the current holder, over an attempt it held"."""
    c1 = registered(parent, wallets, "c1")
    assert [j["attempt"] for j in c1.call("requestJobs", childId="c1", maxJobs=1)["jobs"]] == [1]
    requeue = subprocess.run([sys.executable, ROOT / "validator.py", "requeue", "1", "--config",
                              tmp_path / "parent.toml"], capture_output=True, text=True,
                             timeout=60)
    assert requeue.returncode == 0, requeue.stderr

    def handed_again():  # the parent takes the operator's change within a second
        jobs = c1.call("requestJobs", childId="c1", maxJobs=3)["jobs"]
        return [j["attempt"] for j in jobs if j["jobId"] == 1]
    assert wait_until(handed_again, 30, "job 1 handed to c1 again") == [2]
    score = '{"score": 3}'
    [reply] = c1.call("reportJobCompletions", childId="c1",
                      results=[signed_result(wallets, "c1", 1, 1, True, score)])["replies"]
    assert (reply["acknowledged"], reply["message"]) == (True, "recorded")
    job = jobs_json(tmp_path)[1]
    assert (job["status"], job["child_id"], len(job["attempts"]), job["result_attempt"]) == \
        ("completed", "c1", 2, 1)
    assert holds(wallets, "c1", auth.result_fields("c1", 1, 1, True, score),
                 bytes.fromhex(job["result_signature"]))
