"""The child's side of end-to-end signing (auth on): it runs only the jobs its parent signed,
over every field; it signs each result with the attempt it is about; it takes only the answers
and revocations the parent signed; its registration is bound to the connection's challenge;
a pushed call's nonce is kept in its database. The parent here is a fake one, served in the
test process, that signs with a test wallet's key and can alter what it signed."""

import functools
import json
import logging
import os
import re
import sys
import threading
import time
import types

import pytest
from conftest import wait_until
import test_security
from test_security import identity

import child
import auth
import common
from rpc import RpcClient, ServiceBase

CHILD = "c1"
wallets = test_security.wallets  # the fixture: hotkeys "parent", "c1", ...


def seal(keypair, fields):
    return keypair.sign(auth.signed_message(*fields))


class FakeParentState:
    """What the fake parent hands out and what it was sent. `pending`: jobs to hand out, each
    signed as it goes, then passed through `alter` (job -> job: what an attacker on the wire
    does). `forge_replies`: answer results with a signature that does not hold. `revoked`:
    the Revocations of the next answer. `clock_offset`: seconds its clock is off."""

    def __init__(self, keypair):
        self.keypair = keypair
        self.pending, self.alter, self.revoked = [], (lambda job: job), []
        self.forge_replies, self.clock_offset = False, 0.0
        self.results, self.registrations = [], []
        self.lock = threading.Lock()

    def signed_job(self, job):
        return self.alter({**job, "signature": seal(self.keypair, auth.job_fields(CHILD, job))})

    def revocation(self, job_id, attempt, reason="cancelled by the operator", forged=False):
        signature = seal(self.keypair, auth.revocation_fields(CHILD, job_id, attempt, reason))
        return {"jobId": job_id, "attempt": attempt, "reason": reason,
                "signature": bytes(64) if forged else signature}

    def replies(self, results):
        with self.lock:
            self.results += results
        return [{"acknowledged": True, "message": "recorded",
                 "signature": bytes(64) if self.forge_replies else seal(
                     self.keypair, auth.reply_fields(CHILD, r["jobId"], r.get("attempt", 0),
                                                       True, "recorded"))}
                for r in results]


class FakeParent(ServiceBase):
    """One per connection, as a parent's service: challenge, registerChild (checked against
    the connection's challenge), requestJobs and reportJobCompletions."""

    role = "parent"

    def __init__(self, state):
        super().__init__()
        self.state, self.challenge_bytes = state, None

    def challenge(self):
        self.challenge_bytes = os.urandom(32)
        return {"challenge": self.challenge_bytes,
                "time": int((time.time() + self.state.clock_offset) * 1000)}

    def register_child(self, childId, endpoint, hotkey="", timestamp=0, nonce="",
                       signature=b""):
        fields = auth.registration_fields(childId, endpoint, self.state.keypair.ss58_address,
                                            self.challenge_bytes or b"")
        held = auth.Verifier.holds(hotkey, [*fields, timestamp, nonce], signature)
        self.state.registrations.append(held)
        return {"success": held, "message": "registered" if held else "not allowed"}

    def request_jobs(self, childId, maxJobs, heldJobs=None, results=(), waitMs=0):
        with self.state.lock:
            jobs, self.state.pending = (self.state.pending[:maxJobs],
                                        self.state.pending[maxJobs:])
            revoked, self.state.revoked = self.state.revoked, []
        return {"jobs": [self.state.signed_job(job) for job in jobs],
                "replies": self.state.replies(list(results)), "revoked": revoked}

    def report_job_completions(self, childId, results=()):
        return {"replies": self.state.replies(list(results))}


class NoChallengeParent(FakeParent):
    challenge = None  # a parent of the version before challenge: ServiceBase refuses the call


@pytest.fixture
def fake_parent(rpc, wallets):
    state = FakeParentState(wallets["parent"])
    state.port = rpc.serve("127.0.0.1", 0, lambda: FakeParent(state))
    return state


def job(job_id, attempt=1, **fields):
    return {"jobId": job_id, "attempt": attempt, "submissionId": job_id,
            "minerHotkey": f"5Miner{job_id}", "hfRepoId": f"org/model-{job_id}",
            "hfRepoCommit": f"{job_id:040x}", "envProvider": "HF", "randomSeed": 1000 + job_id,
            "logsPath": f"job-{job_id}.log", **fields}


def seals(wallets, db, skew=10.0):
    cfg = types.SimpleNamespace(config_path="test", **identity(wallets, CHILD))
    return child.Seals(CHILD, auth.Identity(cfg),
                       auth.Verifier(60.0, skew, auth.NonceLedger(db)),
                       wallets["parent"].ss58_address)


def registering_client(rpc, port, child_seals, skew=10.0):
    cfg = types.SimpleNamespace(validator_id=CHILD, auth_max_clock_skew_seconds=skew)
    return RpcClient(rpc, "127.0.0.1", port, on_connect=functools.partial(
        child.register, cfg, child_seals, "127.0.0.1:9000",
        parent_endpoint=f"127.0.0.1:{port}"))


# An evaluator that notes each job it is started for, then scores it.
MARKING_EVALUATOR = """
import json, sys
job = json.load(sys.stdin)
with open(sys.argv[1], "a") as f:
    f.write(f"{job['jobId']} {job['hfRepoId']} {job['hfRepoCommit']} {job['randomSeed']}\\n")
print(json.dumps({"score": 0.5}))
"""


def test_a_job_altered_after_the_parent_signed_it_is_refused_pulled_or_pushed(
        tmp_path, fake_parent, child_config, processes, rpc, wallets):
    """Its repository, revision or seed changed on the wire: the child neither stores nor
    runs it, and says so; the jobs as signed run, and their results carry the attempt and the
    child's signature."""
    marks = tmp_path / "marks"
    (tmp_path / "evaluator.py").write_text(MARKING_EVALUATOR)
    alterations = {2: {"hfRepoId": "org/other"}, 3: {"hfRepoCommit": "f" * 40},
                   4: {"randomSeed": 7}}
    fake_parent.pending = [job(n, attempt=n) for n in (1, 2, 3, 4)]
    fake_parent.alter = lambda sent: {**sent, **alterations.get(sent["jobId"], {})}
    config = child_config(CHILD, fake_parent.port, auth="on", **identity(wallets, CHILD),
                          parent_hotkey=wallets["parent"].ss58_address,
                          evaluator={"command": [sys.executable, str(tmp_path / "evaluator.py"),
                                                 str(marks)]})
    proc = processes(["child.py", "--config", config], tmp_path / "c1.log")
    proc.wait_for_log("Successfully registered with parent validator as c1")
    assert fake_parent.registrations[0] is True  # signed over this connection's challenge
    wait_until(lambda: fake_parent.results, 30, "the result of job 1")
    proc.wait_for_log(r"Refused job 2 from the parent: its signature does not hold for "
                      r"parent_hotkey")

    # Pushed: the call is the parent's (its outer signature holds), the job is not as signed.
    cfg = common.load_config(config)
    pusher = RpcClient(rpc, "127.0.0.1", cfg.child_port)

    def push(sent):
        timestamp, nonce = int(time.time() * 1000), f"n-{time.monotonic_ns()}"
        call = seal(wallets["parent"], ["receiveJob", CHILD, sent["jobId"], timestamp, nonce])
        return pusher.call("receiveJob", job=sent, timestamp=timestamp, nonce=nonce,
                           signature=call)

    altered = {**fake_parent.signed_job(job(5)), "hfRepoCommit": "e" * 40}
    answer = push(altered)
    assert answer["accepted"] is False
    assert answer["message"].startswith("its signature does not hold for parent_hotkey")
    assert push(fake_parent.signed_job(job(6))) == {"accepted": True, "message": "queued"}
    wait_until(lambda: len(fake_parent.results) == 2, 30, "the result of job 6")

    assert marks.read_text().splitlines() == [
        f"{n} org/model-{n} {n:040x} {1000 + n}" for n in (1, 6)]
    with common.connect(cfg.pg_database) as conn:
        stored = conn.execute("select job_id, job from child_jobs order by job_id").fetchall()
    assert [row["job_id"] for row in stored] == [1, 6]
    assert "signature" not in stored[0]["job"] and stored[0]["job"]["attempt"] == 1
    for result in fake_parent.results:
        fields = auth.result_fields(CHILD, result["jobId"], result["attempt"],
                                      result["success"], result["result"])
        assert auth.Verifier.holds(wallets[CHILD].ss58_address, fields, result["signature"])
    assert [(r["jobId"], r["attempt"]) for r in fake_parent.results] == [(1, 1), (6, 1)]


def finished_store(make_dsn, jobs):
    store = child.ChildStore(make_dsn(), 4)
    store.add_jobs(jobs)
    for sent in jobs:
        store.runs.start(sent["jobId"])
        store.runs.finish(sent["jobId"], True, json.dumps({"score": sent["jobId"]}))
    return store


def test_an_answer_to_a_result_with_a_bad_signature_acknowledges_nothing(
        fake_parent, make_dsn, rpc, wallets, caplog):
    store = finished_store(make_dsn, [job(7, attempt=3)])
    child_seals = seals(wallets, store.db)
    client = registering_client(rpc, fake_parent.port, child_seals)
    fake_parent.forge_replies = True
    child.poll(client, store, child_seals)
    [sent] = fake_parent.results
    assert sent["attempt"] == 3 and auth.Verifier.holds(
        wallets[CHILD].ss58_address,
        auth.result_fields(CHILD, 7, 3, True, json.dumps({"score": 7})), sent["signature"])
    assert [row["job_id"] for row in store.outgoing.unreported()] == [7]  # kept
    assert "Refused answer to the result of job 7 from the parent: its signature" in caplog.text
    fake_parent.forge_replies = False
    child.poll(client, store, child_seals)
    assert len(fake_parent.results) == 2 and store.outgoing.unreported() == []
    store.db.close()


class StoppedEvaluations:
    def __init__(self):
        self.stopped = []

    def revoke(self, job_id, reason):
        self.stopped.append(job_id)


def test_a_forged_revocation_stops_nothing(fake_parent, make_dsn, rpc, wallets, caplog):
    """A revocation whose signature does not hold, or that takes back another attempt than
    the one held (an earlier one's, sent again), is ignored; the parent's own is applied."""
    store = child.ChildStore(make_dsn(), 4)
    store.add_jobs([job(1, attempt=2), job(2, attempt=2)])
    child_seals, evaluations = seals(wallets, store.db), StoppedEvaluations()
    client = registering_client(rpc, fake_parent.port, child_seals)
    fake_parent.revoked = [fake_parent.revocation(1, 2, forged=True),
                           fake_parent.revocation(2, 1)]
    child.poll(client, store, child_seals, evaluations=evaluations)
    assert store.counts()["queued"] == 2 and evaluations.stopped == []
    assert "Refused revocation of job 1 from the parent: its signature" in caplog.text
    assert ("Ignored the parent's revocation of job 2: it takes back attempt 1, and the copy "
            "held is attempt 2") in caplog.text
    fake_parent.revoked = [fake_parent.revocation(1, 2), fake_parent.revocation(2, 2)]
    child.poll(client, store, child_seals, evaluations=evaluations)
    assert store.counts()["cancelled"] == 2 and evaluations.stopped == [1, 2]
    store.db.close()


def test_a_pushed_job_replayed_after_a_restart_of_the_child_is_refused(
        make_dsn, rpc, wallets):
    dsn = make_dsn()
    cfg = types.SimpleNamespace(validator_id=CHILD)
    parent_key = wallets["parent"]
    sent = job(3)
    timestamp, nonce = int(time.time() * 1000), "nonce-replayed-after-restart"
    push = {"job": {**sent, "signature": seal(parent_key, auth.job_fields(CHILD, sent))},
            "timestamp": timestamp, "nonce": nonce,
            "signature": seal(parent_key, ["receiveJob", CHILD, 3, timestamp, nonce])}
    answers = []
    for _ in range(2):  # the second child process: the same database, nothing in memory
        store = child.ChildStore(dsn, 2)
        service = functools.partial(child.ChildService, cfg, store, threading.Event(),
                                    threading.Event(), seals(wallets, store.db))
        answers.append(RpcClient(rpc, "127.0.0.1", rpc.serve("127.0.0.1", 0, service))
                       .call("receiveJob", **push))
        store.db.close()
    assert answers == [{"accepted": True, "message": "queued"},
                       {"accepted": False, "message": "not allowed"}]


def test_a_reported_job_runs_again_only_as_a_later_attempt(make_dsn):
    """A job the parent sends again after our report is a new hand-over only if its attempt
    is later than the one we ran: a copy of one we ran, replayed, runs nothing."""
    store = finished_store(make_dsn, [job(4, attempt=2)])
    store.outgoing.mark_reported([4])
    for attempt in (1, 2):
        assert store.add_jobs([job(4, attempt=attempt)]) == []
    assert not store.incoming.holds(4)
    assert [j["attempt"] for j in store.add_jobs([job(4, attempt=3)])] == [3]
    assert store.incoming.holdings() == (3, [4])
    store.db.close()


def test_the_childs_clock_off_the_parents_is_logged(fake_parent, make_dsn, rpc, wallets,
                                                    caplog):
    store = child.ChildStore(make_dsn(), 1)
    fake_parent.clock_offset = -30.0
    registering_client(rpc, fake_parent.port, seals(wallets, store.db), skew=10.0).call("ping")
    assert fake_parent.registrations == [True]
    assert re.search(r"This child's clock is 30 s ahead of the parent's at 127\.0\.0\.1:\d+, "
                     r"more than auth_max_clock_skew_seconds \(10\).*fix the clocks \(NTP\)",
                     caplog.text)
    store.db.close()


def test_a_child_with_auth_on_is_refused_by_a_parent_without_challenge(
        tmp_path, rpc, make_dsn, wallets):
    """Whether the parent answers challenge with a refusal (a ServiceBase without it) or does
    not know the method (built from the seed's interface text): a clear refusal, no call."""
    from test_rpc import start_older_parent
    store = child.ChildStore(make_dsn(), 1)
    state = FakeParentState(wallets["parent"])
    older = start_older_parent(tmp_path, [])
    try:
        for port in (rpc.serve("127.0.0.1", 0, lambda: NoChallengeParent(state)), older.port):
            client = registering_client(rpc, port, seals(wallets, store.db))
            with pytest.raises(common.Refused, match=r"gives no challenge to sign .*a parent "
                               "older than this child cannot check a registration with auth "
                               "on; upgrade the parent"):
                client.call("ping")
        assert state.registrations == []
        # Auth off: no challenge is asked for, and the seed-built parent registers the child.
        plain = registering_client(rpc, older.port, child.Seals(CHILD))
        assert plain.call("requestJobs", childId=CHILD, maxJobs=0)["jobs"] == []
    finally:
        older.kill()
        older.wait()
        store.db.close()


@pytest.fixture(autouse=True)
def _log_everything(caplog):
    caplog.set_level(logging.INFO, logger="validator")
