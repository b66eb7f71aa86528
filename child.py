"""A child validator: takes evaluation jobs from the parent validator, keeps them in its own
PostgreSQL through pgqueuer, runs each through the evaluator, and reports every result back.

The protocol, as the child lives it (the calls are those of validator.capnp):
- registerChild on every new connection to a parent. Unless auth is off, the child first asks
  for the connection's challenge (and checks the parent's clock against its own), and signs
  its registration over it with its hotkey. A standby parent refuses it, and the child turns
  to the next of parent_hosts.
- Then every poll is one requestJobs call: `results`, the finished results not reported yet;
  `maxJobs`, the room for jobs; `heldJobs`, the jobs held and not reported (the parent sends
  again any of its jobs that is missing); `waitMs`, how long an idle child lets the parent
  hold the call until a job comes (long polling). Its answer: `jobs` to queue, `replies`
  (which results the parent acknowledged: only those are marked reported, so the jobs table
  is also the outbox), and `revoked`, the jobs no longer ours, which are cancelled and whose
  evaluations are stopped.
- Unless auth is off, what the parent hands over is signed by parent_hotkey and checked
  (Seals): a job over all its fields (one that fails is neither stored nor run), each answer
  to a result, each revocation (of the attempt held). Each result carries the attempt it is
  about and the child's signature.
- reportJobCompletions sends a backlog of results (after an outage) before the poll;
  reportJobCompletion, one call per result, serves a parent of an older version.
- receiveJob: the parent may push a job (the call signed by its hotkey unless auth is off,
  its nonce kept in our database; the job signed as a pulled one).
- ping and getStats (the queue counts) answer anyone.
The child rides out outages of the parent and of its database, and stops in stages on SIGTERM
or SIGINT.

The order of this file: the schema; ChildService, the RPC service; the protocol (register,
Parents, poll, report_results); Seals, what the child signs and checks; ChildStore, the
store's protocol side, composed of IncomingJobs, OutgoingResults and RunState, and the keys of
pgqueuer's queue; run(), the main loop, and the shutdown. What a first reading can skip
follows, one part per concern: running a job (the evaluator itself is evaluator.py); the
Worker (pgqueuer's consumer); GroupCommit; crash recovery; and patches of pgqueuer's internals.

    python child.py --config validator_child.toml
"""

import asyncio
import concurrent.futures
import contextlib
import datetime
import functools
import json
import threading
import time

import capnp
import prometheus_client
import psycopg

import auth
import common
import evaluator
import pages
from evaluator import (Abandoned, Evaluations, GpuPool, LogsDirectory, Revoked, evaluate,
                       failure)
from common import Refused, log
from rpc import REFUSALS, PeerUnavailable, RpcClient, RpcThread, ServiceBase, Unimplemented

# The schema, step by step (common.Database applies the steps a database lacks).
SCHEMA = ["""
create table if not exists child_jobs (
    job_id      bigint primary key,          -- the parent's job id
    job         jsonb not null,              -- the EvaluationJobData as received
    status      text not null default 'queued'
                check (status in ('queued', 'running', 'completed', 'failed')),
    received_at timestamptz not null default now(),
    started_at  timestamptz,
    finished_at timestamptz,
    result      text,
    reported_at timestamptz                  -- null while the parent has not acknowledged
);
-- Starts of the job. pgqueuer hands a job whose worker died out again without counting it.
alter table child_jobs add column if not exists attempts integer not null default 0;
create index if not exists child_jobs_outbox on child_jobs (finished_at)
    where finished_at is not null and reported_at is null;
""", """
-- Each time the parent sends a job again after our report, the job goes on pgqueuer's queue
-- under a new key (job_id/deliveries): the earlier entry may still be finishing, and an entry
-- of an earlier delivery must not run the job.
alter table child_jobs add column if not exists deliveries integer not null default 1;
""", """
-- The jobs held (not reported yet), which every poll counts: a few, among the many reported
-- jobs kept for retention_days.
create index if not exists child_jobs_held on child_jobs (job_id) where reported_at is null;
""", """
-- The process group of the job's running evaluator, {"group", "boot", "start"} (see
-- process_identity): what a child that died left running is killed at the next start.
alter table child_jobs add column if not exists evaluator jsonb;
""", """
-- A job the parent took back (cancelled, or handed to another child) ends 'cancelled': its
-- evaluation is stopped and nothing is reported.
alter table child_jobs drop constraint if exists child_jobs_status_check;
alter table child_jobs add constraint child_jobs_status_check
    check (status in ('queued', 'running', 'completed', 'failed', 'cancelled'));
""", auth.NONCES_SCHEMA, """
-- A failure that is not the miner's (evaluator.Ended.retryable): reported so, and signed so;
-- the parent gives the job out again.
alter table child_jobs add column if not exists retryable boolean not null default false;
"""]

EVALUATE = "evaluate"  # the pgqueuer entrypoint
UNSENT_TEXT = dict.fromkeys(("minerHotkey", "hfRepoId", "hfRepoCommit", "envProvider", "envName",
                             "logsPath"), "")
PRUNE_EVERY = 3600.0  # seconds between deletions of what is older than retention_days
REPORT_BATCH = 100  # results per call at most; and at most common.RESULTS_BUDGET bytes of them
# Bytes a result takes in a message besides its text: its struct in the list (32: jobId,
# success and attempt, two pointers), its text's NUL and padding (up to 8), and its signature
# (64); 104, rounded up.
RESULT_OVERHEAD = 128
MAX_WAIT = 5.0  # seconds an idle poll may wait for a job at the parent: below the call timeout
EVALUATIONS = prometheus_client.Histogram(
    "validator_evaluation_seconds", "Evaluations, by outcome", ["outcome"],
    buckets=(0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200))


# ---------------------------------------------------------------------------------------------
# The RPC service: the parent may push a job; anyone may ping or read the queue counts
# ---------------------------------------------------------------------------------------------

class ChildService(ServiceBase):
    """One per connection. A receiveJob whose call is signed by parent_hotkey (any, with auth
    off) registers the connection: it is the parent's pusher."""

    role = "child"

    def __init__(self, cfg, store, wake, stop, seals):
        super().__init__()
        self.cfg, self.store, self.wake, self.stop = cfg, store, wake, stop
        self.seals = seals

    def receive_job(self, job, timestamp=0, nonce="", signature=b""):
        self.seals.check_push(job, timestamp, nonce, signature, self.peer)
        self.registered = True  # our parent's connection: the limits of a registered one
        if self.stop.is_set():
            raise Refused("the child is stopping")
        if not job.get("jobId") or not job.get("hfRepoId"):
            raise Refused("job has no jobId or hfRepoId")
        refusal = self.seals.job_refusal(job)
        if refusal:  # the parent sends it again, freshly signed, after its redelivery grace
            raise Refused(refusal)
        if self.store.incoming.holds(job["jobId"]):
            return {"accepted": True, "message": "already have this job"}
        if self.store.disk.low():
            raise Refused(f"the disk is low: {self.store.disk.refusal()}")
        if self.store.incoming.free_slots() < 1:
            raise Refused("no free slot")
        accepted = self.store.add_jobs([job])
        self.wake.set()
        return {"accepted": True, "message": "queued" if accepted else "already have this job"}

    def get_stats(self):
        """The queue's counts, and what the disk guard says (DiskGuard)."""
        return {"json": json.dumps({**self.store.counts(), "disk_low": self.store.disk.low(),
                                    "disk_free_mb": self.store.disk.free_mb()})}


# ---------------------------------------------------------------------------------------------
# The protocol: register on each connection, then poll (report results, take and drop jobs)
# ---------------------------------------------------------------------------------------------

async def register(cfg, seals, endpoint, capability, parent_endpoint):
    """registerChild, on every new connection to a parent (RpcClient's on_connect). With auth
    on it is signed over the challenge the parent chose for this connection: recorded, it is
    worth nothing on any other. A standby parent raises common.Standby (Parents turns to the
    next); a refusal raises Refused, which the main loop retries."""
    signed = {}
    if seals.identity:
        challenge = await parent_challenge(cfg, capability, parent_endpoint)
        signed = seals.registration(endpoint, challenge)
    reply = await capability.registerChild(childId=cfg.validator_id, endpoint=endpoint,
                                           **signed)
    if reply.message.startswith("standby"):
        raise common.Standby(reply.message)
    if not reply.success:
        raise Refused(f"the parent refused the registration: {reply.message}")
    log.info("Successfully registered with parent validator as %s at %s", cfg.validator_id,
             parent_endpoint)


async def parent_challenge(cfg, capability, parent_endpoint):
    """The challenge the parent hands out for this connection. Its clock comes with it: signed
    calls between the two are refused when the clocks are too far apart, so say so first."""
    try:
        reply = await capability.challenge()
    except capnp.KjException as e:
        if str(e.type) != "UNIMPLEMENTED":
            raise  # the connection broke: RpcClient makes it PeerUnavailable
        reply = None  # built before challenge existed
    if reply is not None and reply.error.startswith("standby"):
        raise common.Standby(reply.error)
    if reply is None or reply.error or not reply.challenge:
        raise Refused(f"the parent at {parent_endpoint} gives no challenge to sign "
                      f"({reply.error if reply else 'it does not serve challenge'}): a parent "
                      "older than this child cannot check a registration with auth on; "
                      "upgrade the parent")
    ahead = time.time() - reply.time / 1000
    if abs(ahead) > cfg.auth_max_clock_skew_seconds:
        log.warning("This child's clock is %.0f s %s the parent's at %s, more than "
                    "auth_max_clock_skew_seconds (%g): signed calls between them may be "
                    "refused; fix the clocks (NTP)", abs(ahead),
                    "ahead of" if ahead > 0 else "behind", parent_endpoint,
                    cfg.auth_max_clock_skew_seconds)
    return reply.challenge


class Parents:
    """The parent validators this child may work for (parent_hosts), one RpcClient each. Calls
    go to the current one; when it is unreachable or a standby, to the next, in order. Only
    when none of them takes a call does it fail (PeerUnavailable), and the child backs off.
    Results wait in the child's database until a parent acknowledges them, so those finished
    during a takeover go to the parent that is active next."""

    def __init__(self, clients):
        self.clients, self.current = clients, 0

    @property
    def timeout(self):
        return self.clients[0].timeout

    @timeout.setter
    def timeout(self, seconds):
        for client in self.clients:
            client.timeout = seconds

    def call(self, method, **params):
        first, failures = self.current, []
        for _ in self.clients:
            client = self.clients[self.current]
            try:
                reply = client.call(method, **params)
            except PeerUnavailable as e:
                failures.append(str(e))  # it names the parent
            except common.Standby as e:  # it refused the registration
                failures.append(f"{client.host}:{client.port}: {e}")
            else:
                reason = reply.get(REFUSALS[method][1], "")
                if not reason.startswith("standby"):
                    if self.current != first:
                        log.info("Now working with parent %s:%d (%s)", client.host,
                                 client.port, "; ".join(failures))
                    return reply
                client.close()  # the next connection registers again
                failures.append(f"{client.host}:{client.port}: {reason}")
            self.current = (self.current + 1) % len(self.clients)
        raise PeerUnavailable("; ".join(failures))

    def close(self):
        self.clients[self.current].close()


def poll(parent, store, seals, interval=0.0, evaluations=None):
    """One round with the parent: report finished results and ask for as many jobs as there
    is room for (0 is a heartbeat), in one requestJobs call, and queue the jobs. A backlog of
    results (after an outage) goes first, in reportJobCompletions calls; so do the results a
    parent of an older version ignored in requestJobs. The jobs the parent revoked (no longer
    ours) are cancelled, and those running are stopped (`evaluations`). Returns the seconds
    after its start at which the next poll is due (`interval` is the poll_interval). `seals`:
    the child's Seals, which sign what it sends and check what the parent sends.

    A child with nothing queued or running and no result to report lets the parent hold the
    call until it has a job for it (long polling), up to the interval or MAX_WAIT: it always
    has a request open, and gets a new job at once. Such a child polls again as soon as that
    call is over; a parent that does not hold calls answers at once, and the child then waits
    out the rest itself."""
    rows, more, free, held = store.poll_state()
    if more:
        report_results(parent, store, seals)
        rows, more, free, held = store.poll_state()
    idle = free == store.incoming.capacity
    wait = min(interval, MAX_WAIT) if idle and not rows else 0.0
    # Without heldJobs (more than a message should carry) the parent sends nothing again.
    held = {"heldJobs": held} if len(held) <= common.MAX_HELD_JOBS else {}
    reply = parent.call("requestJobs", childId=seals.child_id, maxJobs=free, **held,
                        results=[seals.result(row) for row in rows], waitMs=int(wait * 1000))
    # A parent built from the seed's schema answers neither error nor replies.
    if reply.get("error"):
        log.warning("Parent refused the job request: %s; registering again", reply["error"])
        parent.close()
        return interval
    replies = reply.get("replies", [])
    if rows and not replies:
        report_results(parent, store, seals)
        rows = []
    reported = acknowledged(rows, replies, seals)
    store.add_jobs([job for job in reply.get("jobs", []) if not seals.job_refusal(job)],
                   reported=reported, revoked=seals.revocations(reply.get("revoked", [])),
                   stop=evaluations.revoke if evaluations else None)
    if idle and rows and len(reported) == len(rows):
        return 0.0  # it reported its last results: its next poll may be held
    return wait or interval


def report_results(parent, store, seals):
    """Send every finished, unreported result, oldest first, in calls of up to REPORT_BATCH
    results and common.RESULTS_BUDGET bytes; a result is marked reported only once the parent
    acknowledged it, so a crash or an outage at any point resends it later. `seals` as for
    poll."""
    while rows := store.outgoing.unreported(limit=REPORT_BATCH):
        results = [seals.result(row) for row in rows]
        try:
            reply = parent.call("reportJobCompletions", childId=seals.child_id, results=results)
        except Unimplemented:  # a parent of an older version: one call per result
            replies = [parent.call("reportJobCompletion", childId=seals.child_id, **result)
                       for result in results]
        else:
            if reply["error"]:
                log.warning("Parent refused the results: %s; registering again", reply["error"])
                parent.close()
                return
            replies = reply["replies"]
        done = acknowledged(rows, replies, seals)
        store.outgoing.mark_reported(done)
        if len(done) < len(rows):
            return  # the rest waits for the next round, not a tight loop


def acknowledged(rows, replies, seals):
    """The ids of the results the parent acknowledged, by an answer that is its own (Seals);
    the others are logged, and kept to be reported again."""
    done, not_taken = [], []
    for row, answer in zip(rows, replies):
        if not seals.reply_holds(row, answer):
            continue  # logged there
        if answer["acknowledged"]:
            done.append(row["job_id"])
        else:
            not_taken.append((row["job_id"], answer.get("message", "")))
    if not_taken:  # one line a call: a parent that takes none would fill the log otherwise
        log.warning("Parent did not take the result of job %s: %s",
                    ", ".join(str(job_id) for job_id, _ in not_taken[:10])
                    + (f" and {len(not_taken) - 10} more" if len(not_taken) > 10 else ""),
                    not_taken[0][1])
    return done


# ---------------------------------------------------------------------------------------------
# Seals: what the child signs, and checks of what the parent sends (auth on)
# ---------------------------------------------------------------------------------------------

class Seals:
    """What this child signs and checks, one method per kind of message; auth's *_fields
    say what each signature covers (docs/security.md). Without an identity and a verifier
    (auth off) nothing is signed and everything is taken, as before signatures existed.
    What the parent sends that fails a check is counted and logged (Verifier.count)."""

    def __init__(self, child_id, identity=None, verifier=None, parent_hotkey=""):
        self.child_id, self.identity, self.verifier = child_id, identity, verifier
        self.parent_hotkey = parent_hotkey

    def registration(self, endpoint, challenge):
        """registerChild's signed parameters, bound to the connection's challenge."""
        fields = auth.registration_fields(self.child_id, endpoint, self.parent_hotkey,
                                            challenge)
        timestamp, nonce, signature = self.identity.sign(*fields)
        return {"hotkey": self.identity.hotkey, "timestamp": timestamp, "nonce": nonce,
                "signature": signature}

    def check_push(self, job, timestamp, nonce, signature, peer):
        """Only our parent may push, proven by a fresh signature of the call (its nonce spent
        in our database, so a replay is refused after a restart too); raises Refused."""
        if self.verifier:
            reason = self.verifier.check(
                self.parent_hotkey, auth.push_fields(self.child_id, job.get("jobId")),
                timestamp, nonce, signature)
            if reason:
                self.verifier.refuse(f"receiveJob of job {job.get('jobId')}", reason, peer)

    def job_refusal(self, job):
        """None if the job (pulled or pushed) is the parent's as it signed it, over all its
        fields and our id; else why it must be neither stored nor run."""
        if self._holds(auth.job_fields(self.child_id, job), job):
            return None
        return self._refused(f"job {job.get('jobId')}", "its signature does not hold for "
                             f"parent_hotkey {self.parent_hotkey} over what it asks to evaluate")

    def revocations(self, revoked):
        """{job id: (reason, attempt)} of the revocations to apply, of those the parent sent:
        with auth on, those it signed, each of the attempt it names (IncomingJobs.revoke
        applies it only to that attempt's copy); with auth off, all, of any attempt (None)."""
        taken = {}
        for r in revoked:  # a parent of an older version sends no attempt: 0
            job_id, reason, attempt = r["jobId"], r.get("reason", ""), r.get("attempt", 0)
            if not self.verifier:
                taken[job_id] = (reason, None)
            elif self._holds(auth.revocation_fields(self.child_id, job_id, attempt, reason),
                             r):
                taken[job_id] = (reason, attempt)
            else:
                self._refused(f"revocation of job {job_id}", "its signature does not hold "
                              f"for parent_hotkey {self.parent_hotkey}; the job goes on")
        return taken

    def reply_holds(self, row, answer):
        """True if the parent's answer to our result (`row`) is its own; else it counts as
        not acknowledged."""
        fields = auth.reply_fields(self.child_id, row["job_id"], row["attempt"],
                                     answer["acknowledged"], answer.get("message", ""))
        if self._holds(fields, answer):
            return True
        self._refused(f"answer to the result of job {row['job_id']}", "its signature does "
                      f"not hold for parent_hotkey {self.parent_hotkey}; the result is kept "
                      "and reported again")
        return False

    def result(self, row):
        """The JobResult of a finished job (OutgoingResults' row), signed."""
        message = {"jobId": row["job_id"], "attempt": row["attempt"],
                   "success": row["status"] == "completed", "result": row["result"] or "",
                   "retryable": bool(row.get("retryable"))}
        if self.identity:
            message["signature"] = self.identity.seal(auth.result_fields(
                self.child_id, message["jobId"], message["attempt"], message["success"],
                message["result"], message["retryable"]))
        return message

    def _holds(self, fields, message):
        return not self.verifier or self.verifier.holds(self.parent_hotkey, fields,
                                                        message.get("signature", b""))

    def _refused(self, what, reason):
        self.verifier.count(what, reason, "the parent")
        return reason


# ---------------------------------------------------------------------------------------------
# The store's protocol side: the jobs table, which is also the outbox of results
# ---------------------------------------------------------------------------------------------

class ChildStore:
    """The child's database: jobs received, their state, and the results to report. Composed
    of one part per concern: `incoming` (the jobs the parent gives and takes back, and the
    room for more), `outgoing` (the results not reported yet) and `runs` (each job's start and
    end). A poll's two transactions span parts, so they are here: poll_state reads what a poll
    sends, add_jobs commits its answer. What a child that died left behind is undone first
    (recover_at_start)."""

    def __init__(self, dsn, capacity, max_result_bytes=common.MAX_RESULT_BYTES, disk=None):
        self.db = common.Database(dsn, SCHEMA)
        recover_at_start(self.db, max_result_bytes)
        self.disk = disk or common.DiskGuard(0)
        self.incoming = IncomingJobs(self.db, capacity, self.disk)
        self.outgoing = OutgoingResults(self.db)
        self.runs = RunState(self.db)

    def poll_state(self):
        """What a poll sends, read in one transaction: (the oldest results not reported yet,
        as many as one call carries; whether more are waiting; room; ids of the jobs held)."""
        with self.db.transaction() as conn:
            rows = self.outgoing.unreported_in(conn, REPORT_BATCH)
            free, held, finished = self.incoming.holdings_in(conn)
        return rows, finished > len(rows), free, held

    def add_jobs(self, jobs, reported=(), revoked=(), stop=None):
        """Store jobs and put them on the pgqueuer queue, all in one transaction. Returns the
        ones that are to run: new jobs, and jobs we already reported that the parent sends
        again (it has no result of ours for this assignment: a requeue, an expired lease, a
        report it did not record) as a later attempt. A job we hold and have not reported yet
        is ignored. `reported`: ids of results the parent acknowledged, marked reported in the
        same transaction (a poll's answer is one commit); `revoked`: {job id: (reason,
        attempt)} of jobs the parent took back, cancelled first (see IncomingJobs.revoke);
        `stop(job id, reason)` stops the evaluation of each, once that is committed."""
        # A sender may leave text fields out: "". The same job twice in one call is one job.
        # A job's signature was checked (Seals.job_refusal); it is not kept.
        jobs = {job["jobId"]: {**UNSENT_TEXT, **{name: value for name, value in job.items()
                                                 if name != "signature"}} for job in jobs}
        if not jobs and not reported and not revoked:
            return []
        with self.db.transaction() as conn:
            if reported:
                self.outgoing.mark_reported_in(conn, reported)
            cancelled, ignored = self.incoming.revoke(conn, revoked) if revoked else ([], [])
            queued = self.incoming.store_jobs(conn, jobs) if jobs else []
        for row in cancelled:  # logged and stopped once committed
            log.info("Job %d cancelled by the parent (%s): %s", row["job_id"], row["reason"],
                     "its evaluation is stopped" if row["status"] == "running"
                     else "dropped before it started")
            if stop:
                stop(row["job_id"], row["reason"])
        for row in ignored:  # an earlier attempt's revocation, sent again
            log.warning("Ignored the parent's revocation of job %d: it takes back attempt %d, "
                        "and the copy held is attempt %d", row["job_id"], row["revoked"],
                        row["attempt"])
        for job, delivery in queued:
            log.info("Received job %d (%s@%s)%s, queued", job["jobId"], job["hfRepoId"],
                     job["hfRepoCommit"] or "default", " again" if delivery > 1 else "")
        return [job for job, _ in queued]

    def counts(self):
        rows = self.db.query("select status, count(*) as n from child_jobs group by status")
        counts = {status: 0 for status in ("queued", "running", "completed", "failed",
                                           "cancelled")}
        counts.update({row["status"]: row["n"] for row in rows})
        counts["unreported"] = self.db.query(
            "select count(*) as n from child_jobs where finished_at is not null "
            "and reported_at is null")[0]["n"]
        return counts

    def prune(self, days):
        """Delete reported jobs and pgqueuer's log and statistics older than `days`. A result
        not yet reported is kept whatever its age: it is the outbox."""
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
        with self.db.transaction() as conn:
            jobs = conn.execute("delete from child_jobs where reported_at < %s",
                                (cutoff,)).rowcount
            logs = conn.execute("delete from pgqueuer_log where created < %s", (cutoff,)).rowcount
            conn.execute("delete from pgqueuer_statistics where created < %s", (cutoff,))
        if jobs or logs:
            log.info("Pruned %d reported jobs and %d queue log rows older than %g days",
                     jobs, logs, days)


class IncomingJobs:
    """The jobs the parent gave us and we have not reported: the room they leave (the queued
    and running ones count against the capacity), the jobs stored and queued as they come, and
    those the parent takes back, cancelled."""

    def __init__(self, db, capacity, disk):
        self.db = db
        self.capacity = capacity  # jobs held at most, running or queued
        self.disk = disk  # while it is low, there is no room

    def holdings(self):
        """(room for jobs, ids of the jobs we hold and have not reported): what a poll tells
        the parent, which sends again any job it gave us that is missing (its answer was
        lost). The room counts the queued and running jobs against the capacity."""
        with self.db.transaction() as conn:
            return self.holdings_in(conn)[:2]

    def holdings_in(self, conn):
        """(room, ids of the jobs held, how many of them are finished)."""
        row = conn.execute(
            "select count(*) filter (where status in ('queued', 'running')) as busy, "
            "count(*) filter (where finished_at is not null) as finished, "
            "coalesce(array_agg(job_id) filter (where reported_at is null), '{}') as held "
            "from child_jobs where reported_at is null").fetchone()
        room = 0 if self.disk.low() else max(0, self.capacity - row["busy"])
        return room, row["held"], row["finished"]

    def holds(self, job_id):
        """True if we have the job and have not reported it: a copy of it needs no slot."""
        return bool(self.db.query("select 1 from child_jobs where job_id = %s "
                                  "and reported_at is null", (job_id,)))

    def free_slots(self):
        return self.holdings()[0]

    @staticmethod
    def revoke(conn, revoked):
        """Cancel the unfinished jobs among `revoked`, {job id: (reason, attempt)}, whose copy
        is of that attempt (None: of any); returns (their rows: job_id, status before, reason;
        the rows of those held as another attempt: job_id, attempt, revoked). They end
        'cancelled', free their slot and are settled (reported_at: the parent wants no result
        of them). A queued job's queue entry then runs nothing; a running one's evaluation is
        stopped by the caller (Evaluations.revoke), once this is committed. A job that
        finished already keeps its result, which the parent will acknowledge without recording
        it."""
        held = conn.execute(
            "select job_id, status, coalesce((job->>'attempt')::bigint, 0) as attempt "
            "from child_jobs where job_id = any(%b) and finished_at is null "
            "order by job_id for update", (list(revoked),)).fetchall()
        cancelled, ignored = [], []
        for row in held:
            reason, attempt = revoked[row["job_id"]]
            if attempt in (None, row["attempt"]):
                cancelled.append(dict(row, reason=reason))
            else:
                ignored.append(dict(row, revoked=attempt))
        conn.execute(
            "update child_jobs c set status = 'cancelled', finished_at = now(), "
            "reported_at = now(), result = jsonb_build_object('cancelled', r.reason)::text "
            "from unnest(%b::bigint[], %b::text[]) as r(job_id, reason) "
            "where c.job_id = r.job_id",
            ([row["job_id"] for row in cancelled], [row["reason"] for row in cancelled]))
        return cancelled, ignored

    @staticmethod
    def store_jobs(conn, jobs):
        """jobs: {job id: job}; returns [(job, delivery)] of those to run. A job we reported
        runs again only as a later attempt than the one we ran (when both are known: a parent
        of an older version sends none), so a copy of a job we reported, sent again, runs
        nothing."""
        # %b: arrays go in binary; psycopg quotes them as text slowly (a regex per element).
        columns = (list(jobs), [json.dumps(job) for job in jobs.values()])
        deliveries = {row["job_id"]: row["deliveries"] for row in conn.execute(
            "insert into child_jobs (job_id, job) select * from unnest(%b::bigint[], "
            "%b::jsonb[]) on conflict (job_id) do nothing returning job_id, deliveries",
            columns)}
        deliveries.update((row["job_id"], row["deliveries"]) for row in conn.execute(
            "update child_jobs c set job = s.job, status = 'queued', received_at = now(), "
            "started_at = null, finished_at = null, result = null, retryable = false, "
            "reported_at = null, attempts = 0, deliveries = deliveries + 1 "
            "from unnest(%b::bigint[], %b::jsonb[]) as s(job_id, job) "
            "where c.job_id = s.job_id and reported_at is not null "
            "and (coalesce((s.job->>'attempt')::bigint, 0) = 0 "
            "or coalesce((c.job->>'attempt')::bigint, 0) = 0 "
            "or (s.job->>'attempt')::bigint > (c.job->>'attempt')::bigint) "
            "returning c.job_id, deliveries", columns))
        queued = [(job, deliveries[job_id]) for job_id, job in jobs.items()
                  if job_id in deliveries]
        if queued:
            enqueue(conn, [(job["jobId"], delivery) for job, delivery in queued])
        return queued


class OutgoingResults:
    """The outbox: the results finished and not acknowledged by the parent yet, oldest first.
    A result leaves it only once the parent acknowledged it."""

    def __init__(self, db):
        self.db = db

    def unreported(self, limit=REPORT_BATCH):
        with self.db.transaction() as conn:
            return self.unreported_in(conn, limit)

    @staticmethod
    def unreported_in(conn, limit):
        """The oldest results not reported yet: up to `limit`, and as many as fit in
        common.RESULTS_BUDGET bytes, which is always one at least (a result is at most
        max_result_bytes, itself at most a half of the budget)."""
        return conn.execute(
            "select job_id, status, result, attempt, retryable from (select job_id, status, "
            "result, retryable, finished_at, coalesce((job->>'attempt')::bigint, 0) as attempt, "
            "sum(octet_length(result) + %s) over (order by finished_at, job_id) as size "
            "from child_jobs where finished_at is not null and reported_at is null "
            "order by finished_at, job_id limit %s) oldest where size <= %s "
            "order by finished_at, job_id",
            (RESULT_OVERHEAD, limit, common.RESULTS_BUDGET)).fetchall()

    def mark_reported(self, job_ids):
        with self.db.transaction() as conn:
            self.mark_reported_in(conn, job_ids)

    @staticmethod
    def mark_reported_in(conn, job_ids):
        conn.execute("update child_jobs set reported_at = now() where job_id = any(%b)",
                     (list(job_ids),))


class RunState:
    """Each job's run as the table records it: its start (counted: a job whose evaluation
    kills the child again and again fails), its evaluator's process group, and its end or its
    return to the queue. The starts and the ends of jobs that run at once share a transaction
    each (GroupCommit)."""

    def __init__(self, db):
        self.db = db
        self.lost_to_outage = set()  # jobs whose last start ended as the database went away
        self.starts = GroupCommit(self.db, self._start_many)
        self.finishes = GroupCommit(self.db, self._finish_many)

    def start(self, job_id, delivery=None):
        """Mark a job running, count the start, and return (job, starts so far). None if this
        queue entry has nothing to run: the job has a result (pgqueuer handed the entry out
        again after a crash that came after the result was stored), or the parent has sent
        the job again since and the entry of that delivery runs it. A start that ended because
        the database went away did not kill this process: it is not counted."""
        counted = 0 if job_id in self.lost_to_outage else 1
        row = self.starts.call((job_id, delivery, counted))
        self.lost_to_outage.discard(job_id)
        return (row["job"], row["attempts"]) if row else None

    @staticmethod
    def _start_many(conn, starts):
        """starts: [(job_id, delivery, 1 to count the start or 0)]; one row or None each."""
        rows = conn.execute(
            "update child_jobs c set status = 'running', started_at = now(), "
            "attempts = attempts + s.counted from unnest(%b::bigint[], %b::integer[], "
            "%b::integer[]) as s(job_id, delivery, counted) "
            "where c.job_id = s.job_id and finished_at is null "
            "and deliveries = coalesce(s.delivery, deliveries) "
            "returning c.job_id, s.delivery, job, attempts",
            [list(column) for column in zip(*starts)]).fetchall()
        # Keyed by delivery too: of two entries of one job, only the current one may run it.
        started = {(row["job_id"], row["delivery"]): row for row in rows}
        return [started.get((job_id, delivery)) for job_id, delivery, _ in starts]

    def put_back(self, job_id):
        """Undo a start that the shutdown interrupted: it was no fault of the job's."""
        self.db.query("update child_jobs set status = 'queued', started_at = null, "
                      "attempts = attempts - 1, evaluator = null "
                      "where job_id = %s and finished_at is null",
                      (job_id,))

    def finish(self, job_id, success, result, retryable=False):
        """Record a job's end (an evaluator.Ended, unpacked)."""
        try:
            self.finishes.call((job_id, "completed" if success else "failed", result,
                                bool(retryable and not success)))
        except common.DatabaseUnavailable:
            self.lost_to_outage.add(job_id)
            raise

    @staticmethod
    def _finish_many(conn, finishes):
        """finishes: [(job_id, status, result, retryable)]."""
        conn.execute("update child_jobs c set status = s.status, result = s.result, "
                     "retryable = s.retryable, finished_at = now(), evaluator = null "
                     "from unnest(%b::bigint[], %b::text[], %b::text[], %b::boolean[]) "
                     "as s(job_id, status, result, retryable) "
                     "where c.job_id = s.job_id and finished_at is null",
                     [list(column) for column in zip(*finishes)])
        return [None] * len(finishes)

    def record_evaluator(self, job_id, group, gpus=None):
        """Its process group (what a restart kills), and the GPUs it holds (the dashboard)."""
        self.db.query("update child_jobs set evaluator = %s where job_id = %s",
                      (psycopg.types.json.Jsonb(dict(evaluator.process_identity(group) or {},
                                                     group=group, gpus=gpus)), job_id))


def queue_key(job_id, delivery):
    """A job's key and payload on pgqueuer's queue."""
    return f"{job_id}/{delivery}"


def parse_queue_key(key):
    """(job id, delivery); delivery is None for a key written before deliveries were counted."""
    job_id, _, delivery = key.partition("/")
    return int(job_id), int(delivery) if delivery else None


def enqueue(conn, deliveries):
    """Put deliveries, [(job id, delivery)], on pgqueuer's queue; a key already there is kept."""
    from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries
    keys = [queue_key(job_id, delivery) for job_id, delivery in deliveries]
    SyncQueries(SyncPsycopgDriver(conn)).enqueue(
        [EVALUATE] * len(keys), [key.encode() for key in keys], [0] * len(keys),
        dedupe_key=keys, on_conflict="skip")


# ---------------------------------------------------------------------------------------------
# Main: start the parts, poll until stopped, then stop in stages
# ---------------------------------------------------------------------------------------------

def run(cfg, stop):
    check_limits(cfg)
    common.setup_logging(cfg)
    child_id, data, slots = cfg.validator_id, common.data_dir(cfg), evaluation_slots(cfg)
    logs = LogsDirectory(data / "logs", cfg.evaluator.max_logs_total_mb * common.MB)
    logs.path.mkdir(exist_ok=True)
    evaluator.clear_scratch(data)  # no evaluation runs yet: what is there is left over
    disk = common.DiskGuard(cfg.min_free_disk_mb, [data])
    dsn = common.database_dsn(cfg, stop)
    store = ChildStore(dsn, slots + cfg.prefetch_jobs, cfg.max_result_bytes, disk)
    disk.guard_database(store.db)
    wake = threading.Event()
    # SIGTERM or SIGINT sets `stop`; this also ends the loop's wait for the next poll.
    threading.Thread(target=lambda: (stop.wait(), wake.set()), name="stop", daemon=True).start()
    gpus = GpuPool(cfg.evaluator.gpus, cfg.evaluator.gpus_per_job) if cfg.evaluator.gpus \
        else None
    evaluations = Evaluations(store.runs.record_evaluator, gpus)

    common.serve_metrics(cfg)
    pages.serve_child(cfg, dsn, store, logs.path)  # with dashboard_port
    worker = Worker(dsn, slots, cfg.worker_heartbeat_seconds,
                    functools.partial(run_job, cfg, store, evaluations, logs, wake))
    worker.start()
    rpc = RpcThread()
    seals = Seals(child_id, *auth.hotkey_auth(cfg, cfg.child_port, store.db),
                  cfg.parent_hotkey)
    tls_server, tls_client = auth.tls_contexts(cfg)
    port = rpc.serve(cfg.listen_host, cfg.child_port,
                     lambda: ChildService(cfg, store, wake, stop, seals), cfg, tls_server)
    endpoint = f"{cfg.child_host}:{port}"
    log.info("Child validator %s serving on %s:%d", child_id, cfg.listen_host, port)

    parent = Parents([RpcClient(rpc, *common.split_endpoint(at), tls=tls_client,
                                on_connect=functools.partial(register, cfg, seals, endpoint,
                                                             parent_endpoint=at))
                      for at in parent_endpoints(cfg)])
    try:
        work(cfg, stop, wake, parent, store, seals, evaluations, logs)
    finally:
        log.info("Child validator %s stopping: no new jobs; running evaluations have up to %gs",
                 child_id, cfg.shutdown_grace_seconds)
        shut_down(cfg, worker, evaluations,
                  lambda quiet: report_before_exit(parent, store, seals, quiet))
        rpc.stop()
        store.db.close()


def check_limits(cfg):
    """The child's own keys, beyond the types that load_config checks."""
    for key, least in (("max_attempts", 1), ("prefetch_jobs", 0),
                       ("worker_heartbeat_seconds", 1.0),
                       ("max_backoff_seconds", 0.1), ("retention_days", 0.0),
                       ("shutdown_grace_seconds", 0.0)):
        if getattr(cfg, key) < least:
            raise common.ConfigError(f"{cfg.config_path}: key '{key}' must be at least {least:g}")
    gpus, per_job = cfg.evaluator.gpus, cfg.evaluator.gpus_per_job
    twice = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
    if twice:
        raise common.ConfigError(f"{cfg.config_path}: key 'evaluator.gpus' lists GPU "
                                 f"{twice[0]!r} twice: two evaluations would share it")
    if gpus and len(gpus) < per_job:
        raise common.ConfigError(f"{cfg.config_path}: key 'evaluator.gpus_per_job' is "
                                 f"{per_job}, more than the {len(gpus)} GPUs of evaluator.gpus")


def evaluation_slots(cfg):
    """How many evaluations run at once: max_concurrent_jobs, and with [evaluator] gpus no
    more than there are gpus_per_job devices for."""
    gpus, per_job = cfg.evaluator.gpus, cfg.evaluator.gpus_per_job
    if not gpus or len(gpus) // per_job >= cfg.max_concurrent_jobs:
        return cfg.max_concurrent_jobs
    log.info("Running at most %d evaluations at once, not max_concurrent_jobs (%d): %d GPUs, "
             "%d per evaluation", len(gpus) // per_job, cfg.max_concurrent_jobs, len(gpus),
             per_job)
    return len(gpus) // per_job


def parent_endpoints(cfg):
    """parent_hosts, or the seed's parent_host and parent_port."""
    return cfg.parent_hosts or [f"{cfg.parent_host}:{cfg.parent_port}"]


def work(cfg, stop, wake, parent, store, seals, evaluations=None, logs=None):
    """Until `stop`: report results, ask for jobs, and every hour delete what is too old (in
    the database, and in `logs`, the LogsDirectory). `seals`: what the child signs and
    checks (see poll)."""
    parent_down = common.Outage("Parent unreachable", "Reconnected to the parent",
                                cfg.max_backoff_seconds)
    database_down = common.Outage("Database unavailable", "Database available again",
                                  cfg.max_backoff_seconds)
    # A refused registration is retried too: the cause may pass (the parent's database is
    # down) or need the operator (a bad child_host), and the log says which.
    refused = common.Outage("Registration refused", "Registered after all",
                            cfg.max_backoff_seconds)
    next_prune = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        try:
            if time.monotonic() >= next_prune:
                store.prune(cfg.retention_days)
                if logs and (deleted := logs.prune(cfg.retention_days)):
                    log.info("Deleted %d evaluator logs older than %g days", deleted,
                             cfg.retention_days)
                next_prune = time.monotonic() + PRUNE_EVERY
            due = poll(parent, store, seals, cfg.poll_interval, evaluations)
        except PeerUnavailable as e:
            if not stop.is_set():  # else the parent stopped along with us: nothing to retry
                stop.wait(parent_down.failed(e))
            continue
        except common.DatabaseUnavailable as e:
            stop.wait(database_down.failed(e))
            continue
        except Refused as e:
            stop.wait(refused.failed(e))
            continue
        parent_down.succeeded()
        database_down.succeeded()
        refused.succeeded()
        wake.wait(max(0.0, due - (time.monotonic() - started)))
        wake.clear()


def shut_down(cfg, worker, evaluations, report):
    """Stop in stages: take no new job; give the running evaluations shutdown_grace_seconds to
    finish, reporting their results; then kill those still running, whose jobs stay queued for
    the next start. Queued jobs that never started stay queued too."""
    worker.stop_taking()
    deadline = time.monotonic() + cfg.shutdown_grace_seconds
    while not worker.wait(min(cfg.poll_interval, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            stopped = evaluations.abandon()
            log.warning("Shutdown grace of %gs expired: stopping the running evaluations "
                        "(%d evaluator process groups: SIGTERM, SIGKILL after %gs); their jobs "
                        "stay queued for the next start", cfg.shutdown_grace_seconds, stopped,
                        cfg.evaluator.stop_grace_seconds)
            if not worker.wait(cfg.evaluator.stop_grace_seconds + 5.0):
                log.error("The job worker did not stop; its jobs run again after a restart")
            break
        report(quiet=True)
    report(quiet=False)


def report_before_exit(parent, store, seals, quiet):
    """Report what is finished, if the parent and the database let us; what is left is sent
    after the next start."""
    parent.timeout = min(parent.timeout, 5.0)  # the shutdown must not wait long for a report
    try:
        report_results(parent, store, seals)
    except (PeerUnavailable, Refused, common.DatabaseUnavailable) as e:
        if not quiet:
            log.warning("Results not reported before stopping (%s); they will be after the "
                        "next start", e)


def main(argv=None):
    return common.role_main(run, "Run a child validator.", is_parent=False, argv=argv)


# ---------------------------------------------------------------------------------------------
# Running a job: what the Worker calls for each queue entry it hands out
# ---------------------------------------------------------------------------------------------

def run_job(cfg, store, evaluations, logs, wake, key):
    """Run the job of a queue entry that pgqueuer handed out (on a worker thread) and store
    its result."""
    job_id, delivery = parse_queue_key(key)
    evaluations.begin(job_id)
    try:
        evaluate_job(cfg, store, evaluations, logs, wake, job_id, delivery)
    finally:
        if evaluations.end(job_id):
            wake.set()  # its slot is free: ask for another job now


def evaluate_job(cfg, store, evaluations, logs, wake, job_id, delivery):
    started = store.runs.start(job_id, delivery)
    if started is None:
        return
    job, attempts = started
    if attempts > cfg.max_attempts:
        # Each earlier start ended with this process dying: running it again would too.
        store.runs.finish(job_id, *failure(f"evaluation killed its worker {attempts - 1} times"))
        log.warning("Job %d failed: its evaluation killed this child validator %d times",
                    job_id, attempts - 1)
        wake.set()
        return
    if store.disk.low():  # another child, or this one later, evaluates it
        store.runs.finish(job_id, *failure(f"refused by the disk guard: "
                                          f"{store.disk.refusal()}", retryable=True))
        log.warning("Job %d refused by the disk guard: %s", job_id, store.disk.refusal())
        wake.set()
        return
    kind = "the DEMO evaluator" if not cfg.evaluator.command else "the evaluator"
    log.info("Evaluating job %d with %s (attempt %d)", job_id, kind, attempts)
    started_at = time.monotonic()
    try:
        ended = evaluate(cfg, job, logs, evaluations)
    except Abandoned:
        store.runs.put_back(job_id)
        log.warning("Job %d was stopped by the shutdown; it stays queued", job_id)
        raise
    except Revoked:
        return  # recorded cancelled and logged when the parent's answer came
    store.runs.finish(job_id, *ended)
    outcome = "succeeded" if ended.success else "transient" if ended.retryable else "failed"
    EVALUATIONS.labels(outcome).observe(time.monotonic() - started_at)
    log.info("Job %d %s: %s", job_id, "failed transiently" if ended.retryable else outcome,
             ended.result[:200])
    wake.set()


# ---------------------------------------------------------------------------------------------
# The Worker: a pgqueuer consumer on its own thread and event loop, which runs the jobs
# ---------------------------------------------------------------------------------------------

ASYNCPG_PARAMS = {"host", "port", "user", "password", "database"}


class Worker:
    """Runs queued jobs, up to max_concurrent_jobs at once. pgqueuer's consumer is asyncio-only;
    it lives on this thread, and the evaluations on a thread pool, so callers never see asyncio.

    The consumer uses pgqueuer's asyncpg driver: asyncpg delivers NOTIFY through a callback
    without holding the connection, whereas pgqueuer's psycopg driver waits for NOTIFY on the
    connection it queries with, which stalls every query up to a second while the queue is idle.

    pgqueuer gives a job whose worker stopped beating (its process died) to a worker again once
    the last beat is `heartbeat` seconds old. This one looks for such jobs every heartbeat / 3
    seconds, so a job is taken again about 1.3 heartbeats after its worker died. A consumer
    that loses its database connection is started again, with backoff.
    """

    def __init__(self, dsn, slots, heartbeat, run_job):
        self.dsn, self.slots, self.heartbeat, self.run_job = dsn, slots, heartbeat, run_job
        self.pool = concurrent.futures.ThreadPoolExecutor(slots, thread_name_prefix="evaluate")
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.error, self.failures = None, 0
        # The running consumer's loop and PgQueuer, for stop_taking() on another thread.
        self.lock, self.consumer = threading.Lock(), None
        self.thread = threading.Thread(target=self._thread, name="worker", daemon=True)

    def start(self):
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error

    def _thread(self):
        while not self.stopping.is_set():
            try:
                asyncio.run(self._consume())
            except Exception as e:
                if not self.ready.is_set():  # it never ran: start() raises this
                    self.error = e
                    self.ready.set()
                    return
                if self.failures == 0:
                    log.warning("The job worker lost its database connection (will retry): "
                                "%s: %s", type(e).__name__, e)
                self.failures += 1
                self.stopping.wait(min(30.0, 2.0 ** self.failures))

    async def _consume(self):
        import asyncpg
        from pgqueuer import AsyncpgDriver, PgQueuer, RetryRequested
        # asyncpg takes no key=value DSN; psycopg parses either form for it.
        params = psycopg.conninfo.conninfo_to_dict(self.dsn)
        params["database"] = params.pop("dbname", None)
        if params.get("port"):
            params["port"] = int(params["port"])
        # This session only hands out queue entries and records their ends; the child_jobs
        # rows decide what runs (RunState.start runs nothing for an entry handed out again),
        # and they are committed durably on another connection, whose commits also flush the
        # WAL written before them. So its commits need not wait for the disk: a crash of the
        # server can only undo its last entries' moves, which are then made again.
        connection = await asyncpg.connect(**{k: v for k, v in params.items()
                                              if k in ASYNCPG_PARAMS and v},
                                           server_settings={"synchronous_commit": "off"})
        record_job_ends_at_once()
        pgq = PgQueuer(AsyncpgDriver(connection))
        loop = asyncio.get_running_loop()
        running = [0]  # evaluations between their hand-out and their end (this loop's only)
        recheck_only_with_a_free_slot(pgq.qm, lambda: running[0] >= self.slots)

        @pgq.entrypoint(EVALUATE, concurrency_limit=self.slots)
        async def run(job):
            running[0] += 1
            try:
                await loop.run_in_executor(self.pool, self.run_job, job.payload.decode())
            except Abandoned:
                raise RetryRequested(reason="the child stopped during the evaluation") from None
            except common.DatabaseUnavailable as e:
                log.warning("Job %d: %s; it runs again in 5s",
                            parse_queue_key(job.payload.decode())[0], e)
                raise RetryRequested(datetime.timedelta(seconds=5), str(e)) from None
            finally:
                running[0] -= 1  # before pgqueuer records the end, whose notice wakes the loop

        if self.failures:
            log.info("The job worker reconnected after %d failed attempts", self.failures)
            self.failures = 0
        # stop_taking() wakes this loop; registered under the lock, so that a stop asked
        # before the registration is seen here and one asked after it reaches this loop.
        with self.lock:
            self.consumer = (loop, pgq)
            if self.stopping.is_set():
                pgq.shutdown.set()
        self.ready.set()
        try:
            await pgq.run(batch_size=self.slots, max_concurrent_tasks=2 * self.slots,
                          heartbeat_timeout=datetime.timedelta(seconds=self.heartbeat),
                          dequeue_timeout=datetime.timedelta(seconds=self.heartbeat / 3))
        finally:
            with self.lock:  # before the loop closes: nothing may be scheduled on it after
                self.consumer = None
            with contextlib.suppress(Exception):  # a broken connection cannot close cleanly
                await connection.close(timeout=5)

    def stop_taking(self):
        """Take no new job; the running ones go on (pgqueuer waits for them)."""
        self.stopping.set()
        with self.lock:
            if self.consumer:
                loop, pgq = self.consumer
                loop.call_soon_threadsafe(pgq.shutdown.set)

    def wait(self, timeout):
        """Wait up to `timeout` seconds for the running jobs to end; True once they have."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        self.pool.shutdown()
        return True


# ---------------------------------------------------------------------------------------------
# GroupCommit: the starts and ends of jobs that run at once share a transaction
# ---------------------------------------------------------------------------------------------

class GroupCommit:
    """What several threads ask for at once runs in one transaction: the first caller runs
    run_batch(conn, items) (which returns one result per item) for every item waiting, again
    and again until none is left, while the others wait for their item's result. A result is
    returned only once its transaction committed; a failure reaches every item of its batch.
    The evaluations a pgqueuer batch starts together thus share one commit for their starts
    and one for their ends, instead of queueing for the connection one by one."""

    def __init__(self, db, run_batch):
        self.db, self.run_batch = db, run_batch
        self.lock = threading.Lock()
        self.waiting, self.running = [], False

    def call(self, item):
        done = concurrent.futures.Future()
        with self.lock:
            self.waiting.append((item, done))
            leader, self.running = not self.running, True
        if leader:
            self._run_all()
        return done.result()

    def _run_all(self):
        while True:
            with self.lock:
                batch, self.waiting = self.waiting, []
                if not batch:
                    self.running = False
                    return
            try:
                with self.db.transaction() as conn:
                    results = self.run_batch(conn, [item for item, _ in batch])
            except Exception as e:
                for _, done in batch:
                    done.set_exception(e)
            else:
                for (_, done), result in zip(batch, results):
                    done.set_result(result)


# ---------------------------------------------------------------------------------------------
# Crash recovery: what a child that died left in its database and its process table
# ---------------------------------------------------------------------------------------------

def recover_at_start(db, max_result_bytes):
    """Install pgqueuer's tables if they are missing, then undo what a child that died left
    behind, in one transaction. The advisory lock makes two processes that start on one
    database do this one after the other."""
    from pgqueuer.adapters.persistence.qb import QueryBuilderEnvironment
    with db.transaction() as conn:
        conn.execute("select pg_advisory_xact_lock(7340512)")
        if conn.execute("select to_regclass('pgqueuer') as t").fetchone()["t"] is None:
            conn.execute(QueryBuilderEnvironment().build_install_query())
        requeue_orphans(conn)
        refuse_oversized(conn, max_result_bytes)
        kill_left_behind(conn)


def requeue_orphans(conn):
    """Put back on the queue the unfinished jobs that have no queue entry (pgqueuer drops
    the entry of a job whose run raised an error we did not expect): else they would hold
    a slot forever."""
    orphans = conn.execute(
        "select job_id, deliveries from child_jobs c where finished_at is null "
        "and not exists (select 1 from pgqueuer q where q.entrypoint = %s "
        "and split_part(q.dedupe_key, '/', 1) = c.job_id::text) order by job_id",
        (EVALUATE,)).fetchall()
    if orphans:
        enqueue(conn, [(row["job_id"], row["deliveries"]) for row in orphans])
        log.warning("Queued again %d unfinished jobs that were missing from the queue: %s",
                    len(orphans), ", ".join(str(row["job_id"]) for row in orphans))


def refuse_oversized(conn, max_result_bytes):
    """A result not reported yet that is over max_result_bytes (stored under an earlier
    config) would be refused by the parent at every try, or not fit in a message: it is
    replaced by a failure that says so."""
    oversized = conn.execute(
        "update child_jobs set status = 'failed', result = json_build_object('error', "
        "'result of ' || octet_length(result) || ' bytes is over max_result_bytes (' "
        "|| %s || ')')::text where finished_at is not null and reported_at is null "
        "and octet_length(result) > %s returning job_id",
        (max_result_bytes, max_result_bytes)).fetchall()
    for row in oversized:
        log.warning("Job %d failed: its result is over max_result_bytes (%d)",
                    row["job_id"], max_result_bytes)


def kill_left_behind(conn):
    """Kill the evaluator process groups that a child that died left running: the
    evaluators die with it (die_with_parent), but not what they started. Their jobs run
    again, and two runs of one job at once would share the GPU."""
    rows = conn.execute("select job_id, evaluator from child_jobs "
                        "where evaluator is not null").fetchall()
    conn.execute("update child_jobs set evaluator = null where evaluator is not null")
    for row in rows:
        if evaluator.kill_group(row["evaluator"]):
            log.warning("Killed the evaluator processes that job %d left running "
                        "(process group %d)", row["job_id"], row["evaluator"]["group"])


# ---------------------------------------------------------------------------------------------
# pgqueuer's patches: each job's end recorded at once, not on a 0.1 s timer; and no re-check
# of a full worker's queue every 0.1 s
# ---------------------------------------------------------------------------------------------

JOB_END_RETRY = 5.0  # seconds between tries to record a job's end in pgqueuer after a failure


def record_job_ends_at_once():
    """Make pgqueuer record each job's end as soon as the job ends.

    pgqueuer 1.6's consumer keeps the ends of jobs in a buffer (JobStatusLogBuffer, made
    inside QueueManager.run, with no setting for it) and writes them when batch_size ends are
    waiting or every 0.1 s. Until then a finished job's entry still counts as running, so the
    freed slot waits for that timer before it takes the next queued job, and the timer wakes
    the consumer ten times a second while nothing runs. Our jobs take seconds, not
    microseconds: one write per job end costs nothing, so this buffer writes each end at once
    (the buffer's size is 1) and its timer only retries a write that failed. This replaces a
    class inside pgqueuer, so it applies only to the version it was written and tested for
    (requirements.txt pins it); another version keeps pgqueuer's own buffer."""
    from pgqueuer.core import buffers
    if pgqueuer_version() != "1.6.0" or hasattr(buffers.JobStatusLogBuffer, "at_once"):
        return

    class JobEndsAtOnce(buffers.JobStatusLogBuffer):
        at_once = True

        def __init__(self, max_size, repository, **_):
            super().__init__(max_size=1, repository=repository,
                             timeout=datetime.timedelta(seconds=JOB_END_RETRY))

    buffers.JobStatusLogBuffer = JobEndsAtOnce


def recheck_only_with_a_free_slot(queue_manager, full):
    """Make pgqueuer's consumer wait for a change of its queue, not re-check it every 0.1 s,
    while every slot is busy (`full()`).

    pgqueuer 1.6 re-checks its queue every 0.1 s as long as a job waits in it
    (QueueManager._effective_dequeue_timeout counts queued work, not free room). With
    prefetch_jobs and every slot busy, that is a dequeue and a count query ten times a second
    for as long as the evaluations run, and none of them can hand anything out: the room is
    counted in SQL, and only a job's end frees it. A job's end (done, failed or retried)
    changes its queue entry, and pgqueuer notifies every change of its queue, which wakes the
    consumer; `full()` is false by then (the slot is counted free before pgqueuer records the
    end), so that wake-up, and any with a free slot, looks at the queue as pgqueuer does. The
    check every heartbeat / 3 stays (it takes the jobs of a worker that died). Like
    record_job_ends_at_once, this reaches inside pgqueuer: only for the version it was
    written and tested for."""
    own = getattr(queue_manager, "_effective_dequeue_timeout", None)
    if pgqueuer_version() != "1.6.0" or own is None:
        return

    async def dequeue_timeout(timeout):
        return timeout if full() else await own(timeout)

    queue_manager._effective_dequeue_timeout = dequeue_timeout


def pgqueuer_version():
    import pgqueuer
    return pgqueuer.__version__


if __name__ == "__main__":
    raise SystemExit(main())
