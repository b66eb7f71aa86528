"""The parent validator: reads miners' commitments from the chain, turns each new one into an
evaluation job, keeps the queue of jobs in PostgreSQL, and hands jobs to child validators over
Cap'n Proto RPC (validator.capnp).

The protocol, as the parent serves it (a standby answers ping, getStats and challenge only).
With auth on, everything that decides weights is signed: jobs, replies and revocations by the
parent (auth.job_fields, reply_fields, revocation_fields), results by the child.
- challenge(): 32 random bytes for this connection, and the parent's clock.
- registerChild(childId, endpoint, hotkey, signature...): a child says who it is and where it
  listens. An id that registers again keeps its counters and the jobs it holds; with auth on,
  its hotkey must be in allowed_child_hotkeys and sign the call over this connection's
  challenge (used once), the connection then serves that child only, and the id's earlier
  connection is closed.
- requestJobs(childId, maxJobs, heldJobs, results, waitMs): the child's poll, in one
  transaction: its results are recorded first; jobs assigned to it that it lacks (heldJobs) are
  sent again; then up to maxJobs new ones, within max_jobs_per_child (0 is a heartbeat). The
  answer's `revoked` lists the jobs it holds that are no longer its own (cancelled, given back,
  handed to another child): it stops them. With waitMs, a poll that gets nothing is held open
  until a job arrives or the wait is over.
- reportJobCompletion(s)(childId, results): results outside a poll. Only the child holding a job
  records its result; a repeated report is acknowledged again; one over max_result_bytes is
  recorded as a failure that says so. With auth on, only a result signed by the hotkey that
  registered the connection, over an attempt that child held, is recorded, with that proof.
  A failure marked retryable (not the miner's) ends the attempt, not the job: it is handed out
  again after a backoff, to another child first, within maxRetries; a child whose evaluations
  keep failing that way rests (gets no new job) for a while.
- receiveJob, which the parent calls on a child with push_jobs = true: a pending job sent straight
  to the child with the most free room; a refused one stays pending.
- ping, and getStats: the statistics as JSON (the queue, the children, this parent's role).
Between the calls the parent reads the chain (chain.py) every sync_frequency seconds (new
commitments make jobs; the open jobs of superseded submissions and of miners who left are
cancelled), and every second gives back the jobs whose lease expired: of a child unseen for
child_timeout_seconds, or not finished within job_timeout_seconds.

The order of this file: the protocol first, then what a first reading can skip.
- SCHEMA, the limits of one call, the metrics.
- ParentService: the RPC service, one per connection, its methods named as in the schema.
- ParentState: the one state behind every connection, and the protocol's side of it (register,
  poll, report, assign, withdraw); its parts are the pending queue, the leases, the chain
  intake and the statistics. Reports: results checked, recorded and answered. LiveChildren:
  the one connection of each child id. The messages it answers with.
- run(), stand_by(), lead(), main(): the main loop. It stands by until this parent is the active
  one of the parents that share the database, then reads the chain, looks after the leases and
  sets weights when due, until stopped or until the leadership is lost.
- PendingQueue and Arrivals: the pending jobs mirrored in memory, and the held polls they wake.
- Leases: jobs come back from children that vanish or take too long.
- Retries and Rests: transient failures, tried again later; children that keep failing rest.
- ChainIntake: commitments become jobs, and the queue follows the chain.
- Statistics and QueueMetrics: getStats and the Prometheus gauges.
- Leadership: of the parents that share one database, one is active, fenced by an epoch.
- Pusher: receiveJob, with push_jobs = true.
- The operator's commands: list_jobs, requeue_job, cancel_job, and cancel_jobs that the chain
  intake uses too.

    python parent.py --config validator_parent.toml
"""

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import re
import secrets
import threading
import time
import types
from typing import NamedTuple

import prometheus_client
import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from psycopg.rows import tuple_row

import chain as chains
import auth
import common
import crosschecks
import pages
import scores
from common import Refused, log
from rpc import PeerUnavailable, RpcClient, RpcThread, ServiceBase

# The schema, step by step (common.Database applies the steps a database lacks).
SCHEMA = ["""
create table if not exists jobs (
    job_id         bigserial primary key,
    fingerprint    text not null unique,     -- hotkey + commitment content: one job per submission
    submission_id  bigint not null,
    miner_hotkey   text not null,
    miner_uid      integer,
    hf_repo_id     text not null,
    hf_repo_commit text not null,
    commit_block   bigint not null,
    env_provider   text not null,
    env_name       text not null,
    random_seed    bigint not null,
    max_retries    integer not null,
    status         text not null default 'pending'
                   check (status in ('pending', 'assigned', 'completed', 'failed', 'cancelled')),
    priority       integer not null default 0,   -- higher is served first
    position       bigint not null default 0,    -- within a priority: returned jobs (< 0) first
    child_id       text,                     -- the child holding the job (or that finished it)
    attempts       integer not null default 0,   -- times assigned
    created_at     timestamptz not null default now(),
    assigned_at    timestamptz,
    finished_at    timestamptz,
    success        boolean,
    result         text
);
create index if not exists jobs_pending on jobs (job_id) where status = 'pending';

create table if not exists children (
    child_id      text primary key,
    endpoint      text not null,
    registered_at timestamptz not null default now(),
    last_seen     double precision not null  -- unix seconds
);
-- The hotkey that registered the child id: no other hotkey may take the id over.
alter table children add column if not exists hotkey text not null default '';

-- One row per hand-over of a job to a child; the per-child counters are counted from here.
create table if not exists assignments (
    job_id      bigint not null references jobs,
    attempt     integer not null,
    child_id    text not null references children,
    assigned_at timestamptz not null default now(),
    finished_at timestamptz,
    outcome     text check (outcome in ('completed', 'failed', 'expired', 'withdrawn')),
    primary key (job_id, attempt)
);
create index if not exists assignments_child on assignments (child_id);

create table if not exists chain_state (
    key   text primary key,
    value bigint not null
);
""", """
-- Heartbeats, reports, leases and the statistics look up the jobs a child holds.
create index if not exists jobs_assigned on jobs (child_id) where status = 'assigned';
""", """
-- Why a job was cancelled (its result says it in words): counted by the statistics.
alter table jobs add column if not exists cancel_reason text
    check (cancel_reason in ('operator', 'superseded', 'deregistered'));
-- Each sync looks up the open jobs of the miners that committed anew.
create index if not exists jobs_open on jobs (miner_hotkey)
    where status in ('pending', 'assigned');
""", """
-- One row per attempt to set weights on chain ([weights], chain.WeightSetter).
create table if not exists weight_attempts (
    attempt_id    bigserial primary key,
    attempted_at  timestamptz not null default now(),
    block         bigint not null,               -- the block the weights were computed at
    uids          integer[] not null,
    weights       double precision[] not null,   -- normalized scores; the SDK quantizes them
    commit_reveal boolean not null,              -- the subnet's commit-reveal, at that block
    success       boolean,                       -- null: no answer (yet)
    message       text not null default ''
);
""", """
-- Which of the parents sharing this database is active (docs/operations.md, two parents). The
-- epoch goes up at each takeover; every transaction that hands out, records or gives back a
-- job checks it (Leadership.fence).
create table if not exists leadership (
    singleton boolean primary key default true check (singleton),
    epoch     bigint not null,
    endpoint  text not null,               -- the active parent's host:port, for the standbys
    since     timestamptz not null default now()
);
insert into leadership (epoch, endpoint) values (0, '') on conflict do nothing;
""", """
-- The proof of a result recorded with auth on: the child's signature over it
-- (auth.result_fields), the hotkey it holds for and the attempt it names, so that anyone
-- with the child's ss58 address can check later which child vouched for which score.
alter table jobs add column if not exists result_signature bytea;
alter table jobs add column if not exists result_hotkey text;
alter table jobs add column if not exists result_attempt integer;
""" + auth.NONCES_SCHEMA, """
-- Transient failures (a failure that is not the miner's: Retries) and the rests of children
-- whose evaluations keep failing that way (Rests): in the database, so that a restart or a
-- takeover by another parent keeps the waits.
alter table assignments drop constraint if exists assignments_outcome_check;
alter table assignments add constraint assignments_outcome_check
    check (outcome in ('completed', 'failed', 'expired', 'withdrawn', 'retryable'));
alter table assignments add column if not exists reason text;  -- why the attempt ended
alter table jobs add column if not exists retry_at timestamptz;  -- not handed out before
alter table children add column if not exists transient_in_a_row integer not null default 0;
alter table children add column if not exists rests_in_a_row integer not null default 0;
alter table children add column if not exists resting_until double precision not null
    default 0;  -- unix seconds
""", """
-- Suites ([[jobs.suite]]): a submission makes one job per entry and repeat, and they share the
-- submission's fingerprint. The fingerprint is no longer unique; (fingerprint, entry, repeat)
-- is. Jobs made before suites are entry 0, repeat 0.
alter table jobs add column if not exists suite_entry integer not null default 0;
alter table jobs add column if not exists suite_repeat integer not null default 0;
alter table jobs drop constraint if exists jobs_fingerprint_key;
create unique index if not exists jobs_submission_job
    on jobs (fingerprint, suite_entry, suite_repeat);
""", """
-- The weight of the job's suite entry when its submission was made: a change of the suite
-- does not change how a submission made before it is scored (scores.py).
alter table jobs add column if not exists suite_weight double precision not null default 1;
""", """
-- A result's text is kept result_retention_days (Retention); then what it scored under
-- score_key, and the SHA-256 of the text its proof covers, stay in its place.
alter table jobs add column if not exists result_sha256 text;
alter table jobs add column if not exists result_score double precision;
alter table jobs add column if not exists result_pruned_at timestamptz;
create index if not exists jobs_results_kept on jobs (finished_at)
    where result is not null and status in ('completed', 'failed');
""", crosschecks.SCHEMA]

# What one call, one answer or one peer may cost the parent at most, and its wait for a push.
REDELIVERY_GRACE_SECONDS = 10.0  # longer than a push (receiveJob) may take
MAX_RESULTS_PER_REPORT = 1000  # one reportJobCompletions call: one transaction of this size
# Jobs in one answer, those sent again included: each is under 1 KiB (its texts are bounded by
# parse_commitment, MAX_HOTKEY_CHARS and the config), so an answer stays far under the message
# limit.
MAX_JOBS_PER_ANSWER = 1000
MAX_HOTKEY_CHARS = 64  # an ss58 address has 47-48
MAX_WAIT_SECONDS = 5.0  # a requestJobs call is held at most this long (its waitMs)
MAX_CHILDREN = 10_000  # child ids the parent knows at most; a new one past it is refused
JOBS_PER_STATEMENT = 10_000  # a sync inserts its new jobs in statements of this many rows at most


class Result(NamedTuple):
    """One result a child reports (a JobResult); a child with auth on also sends the attempt
    it held and its signature over both (auth.result_fields). `retryable`: a failure that is
    not the miner's, to be tried again."""
    job_id: int
    success: bool
    result: str
    attempt: int = 0
    signature: bytes = b""
    retryable: bool = False

JOBS_FINISHED = prometheus_client.Counter(
    "validator_jobs_finished", "Jobs that ended, by outcome", ["outcome"])
JOBS_RETURNED = prometheus_client.Counter(
    "validator_jobs_returned", "Jobs given back to the queue by an expired lease, by reason",
    ["reason"])
JOBS_RETRIED = prometheus_client.Counter(
    "validator_jobs_retried", "Jobs given back to the queue after a transient failure")
REPORTS_IGNORED = prometheus_client.Counter(
    "validator_reports_ignored", "Late or foreign results, acknowledged but not recorded")
CHAIN_READS = prometheus_client.Histogram("validator_chain_read_seconds", "Chain reads")
CHAIN_FAILURES = prometheus_client.Counter("validator_chain_read_failures", "Failed chain reads")
PARENT_ACTIVE = prometheus_client.Gauge(
    "validator_parent_active", "1 while this parent is the active one, 0 while a standby")


# ---------------------------------------------------------------------------------------------
# The RPC service: one object per connection, all pointing at the one ParentState
# ---------------------------------------------------------------------------------------------

class ParentService(ServiceBase):
    """One per connection. With auth on, a connection serves only the child that registered
    on it, with a hotkey in allowed_child_hotkeys and a signature over the challenge this
    connection was given (so a registration recorded anywhere else is worth nothing here); a
    call for any other child is refused before its parameters are decoded, and a result counts
    only with that hotkey's signature. With auth off, a call a child makes (registerChild,
    requestJobs, report...) that is answered registers the connection."""

    role = "parent"
    CHILD_METHODS = ("requestJobs", "reportJobCompletion", "reportJobCompletions")
    LIST_LIMITS = {"requestJobs": {"heldJobs": common.MAX_HELD_JOBS,
                                   "results": MAX_RESULTS_PER_REPORT},
                   "reportJobCompletions": {"results": MAX_RESULTS_PER_REPORT}}

    def __init__(self, state):
        super().__init__()
        self.state, self.child_id = state, None
        self.hotkey = None  # with auth on: the hotkey that registered child_id here
        self.issued = None  # the challenge handed out on this connection, until a registration
        self.open = True  # until the connection closed

    def precheck(self, method, params):
        if method in self.CHILD_METHODS:
            self._check_active()
        verifier = self.state.verifier
        if verifier and method in self.CHILD_METHODS and params.childId != self.child_id:
            verifier.refuse(f"{method} for {params.childId!r}",
                            f"the connection is registered as {self.child_id!r}", self.peer)
        super().precheck(method, params)

    def registers(self, method):
        return method == "registerChild" or (
            not self.state.verifier and method in self.CHILD_METHODS)

    def challenge(self):
        """What a child signs into its registration on this connection. A standby answers
        too: its challenge is as worthless anywhere else, and the child learns its clock."""
        self.issued = secrets.token_bytes(32)
        return {"challenge": self.issued, "time": int(time.time() * 1000)}

    def register_child(self, childId, endpoint, hotkey="", timestamp=0, nonce="",
                       signature=b""):
        challenge, self.issued = self.issued, None  # used once, whatever the answer
        self._check_active()
        verifier = self.state.verifier
        if verifier:
            what = f"registration of {childId!r}"
            if hotkey not in self.state.cfg.allowed_child_hotkeys:
                verifier.refuse(what, f"hotkey {hotkey!r} is not in allowed_child_hotkeys",
                                self.peer)
            if challenge is None:
                verifier.refuse(what, "no challenge on this connection (call challenge "
                                "first)", self.peer)
            reason = verifier.check(hotkey, auth.registration_fields(
                childId, endpoint, self.state.identity.hotkey, challenge), timestamp, nonce,
                signature)
            if reason:
                verifier.refuse(what, reason, self.peer)
        message = self.state.register_child(childId, endpoint, hotkey if verifier else "",
                                            self)
        self.child_id, self.hotkey = childId, hotkey if verifier else None
        return {"success": True, "message": message}

    def connection_closed(self):
        self.open = False
        self.state.live.forget(self.child_id, self)

    def _check_active(self):
        """A standby answers ping, getStats and challenge only."""
        if self.state.leadership:
            self.state.leadership.refuse_unless_active()

    async def request_jobs(self, childId, maxJobs, heldJobs=None, results=(), waitMs=0):
        """A poll; with waitMs, one that gets no job waits for one (see Arrivals), then
        polls again, until it gets jobs or the wait is over. pycapnp cancels a call whose
        connection dropped, so the held call of a child that died takes no job. A client built
        from the seed's schema sends neither heldJobs (no redelivery then), results nor waitMs."""
        results, cfg = self._results(results), self.state.cfg
        # With push_jobs the pusher sends the new jobs; a held call would race it.
        wait = 0 if cfg.push_jobs else min(waitMs / 1000, MAX_WAIT_SECONDS,
                                           cfg.rpc_idle_timeout_seconds / 2)
        deadline = time.monotonic() + wait
        with self.state.queue.arrivals.watch() as arrived:
            jobs, answers, revoked = await asyncio.to_thread(
                self.state.poll, childId, maxJobs, heldJobs, results, self)
            while not jobs and not revoked and maxJobs and await wait_until(arrived, deadline):
                arrived.clear()
                jobs, _, revoked = await asyncio.to_thread(
                    self.state.poll, childId, maxJobs, heldJobs)
        return {"jobs": jobs, "replies": self._replies(childId, results, answers),
                "revoked": revoked}

    def report_job_completion(self, childId, jobId, success, result, attempt=0,
                              signature=b"", retryable=False):
        results = [Result(jobId, success, result, attempt, signature, retryable)]
        [reply] = self._replies(childId, results,
                                self.state.report_completions(childId, results, self))
        return reply

    def report_job_completions(self, childId, results=()):
        results = self._results(results)
        return {"replies": self._replies(
            childId, results, self.state.report_completions(childId, results, self))}

    @staticmethod
    def _results(results):
        return [Result(r.get("jobId", 0), r.get("success", False), r.get("result", ""),
                       r.get("attempt", 0), r.get("signature", b""), r.get("retryable", False))
                for r in results]

    def _replies(self, child_id, results, answers):
        """The answers to the results as ReportReply messages, signed with auth on."""
        return [sealed(self.state.identity, {"acknowledged": ok, "message": message},
                       auth.reply_fields(child_id, r.job_id, r.attempt, ok, message))
                for r, (ok, message) in zip(results, answers)]

    def get_stats(self):
        return {"json": json.dumps(self.state.statistics.stats())}


# ---------------------------------------------------------------------------------------------
# The protocol: the parent's side of each call, on the one state shared by every connection
# ---------------------------------------------------------------------------------------------

class ParentState:
    """The one state behind every RPC connection and the main loop. PostgreSQL is the truth;
    this side of it is the protocol (each call runs on a worker thread of the RPC loop). Its
    parts: `queue`, the pending jobs mirrored in memory (PendingQueue); `leases` (Leases);
    `intake`, the chain's commitments made jobs (ChainIntake); `statistics` (Statistics);
    `retention`, results' texts kept for a while (Retention); `checks`, the cross-checks
    (crosschecks.CrossChecks); `disk`, the DiskGuard.

    `leadership`: the parent's Leadership, whose epoch every transaction that hands out,
    records or gives back a job checks; None for a ParentState alone on its database (tests)."""

    def __init__(self, db, cfg, identity=None, verifier=None, leadership=None):
        self.db, self.cfg = db, cfg
        self.identity, self.verifier = identity, verifier  # None, None: auth is off
        self.leadership = leadership
        self.queue = PendingQueue(db, lambda attempts: retry_backoff(cfg, attempts))
        self.leases = Leases(db, cfg, self.queue, self.fenced)
        self.intake = ChainIntake(cfg, self.queue, self.fenced)
        self.statistics = Statistics(db, cfg, verifier, leadership)
        self.checks = crosschecks.CrossChecks(cfg, self.queue, self.fenced, returned_position)
        self.reports = Reports(cfg, verifier, self.queue, self.checks)
        self.live = LiveChildren()
        self.retention = Retention(db, cfg, self.fenced)
        # While it says the disk is low no result is recorded (the children keep them).
        self.disk = common.DiskGuard(0)
        if not leadership:  # else take_over() loads it: a standby holds no queue
            self.queue.reload()

    @contextlib.contextmanager
    def fenced(self):
        """A transaction that writes only if this parent leads the current epoch."""
        with self.db.transaction() as conn:
            if self.leadership:
                self.leadership.fence(conn)
            yield conn

    def take_over(self):
        """This parent became the active one: rebuild the queue from the database, and give
        the children child_timeout_seconds to come over before their jobs are taken back."""
        self.leases.started = time.time()
        self.queue.reload(anew=True)
        self.checks.took_over()
        log.info("Parent validator active: %d pending jobs", self.queue.pending())

    def step_down(self):
        self.queue.clear()

    def register_child(self, child_id, endpoint, hotkey="", connection=None):
        """Register (or register again) child_id, from `connection` (its ParentService); with
        auth on, its earlier connection, if still open, is closed."""
        peer = getattr(connection, "peer", "an unknown address")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", child_id):
            raise Refused("childId must be 1-64 letters, digits, '_', '.' or '-'")
        try:
            common.split_endpoint(endpoint)
        except ValueError as e:
            raise Refused(str(e)) from None
        # A child that registers again keeps its id, its counters and the jobs it holds; an id
        # first registered with a hotkey stays with that hotkey. The ids are bounded: each is a
        # row here and an entry of every getStats answer.
        with self.db.transaction() as conn:
            if conn.execute("select count(*) >= %s and not bool_or(child_id = %s) as full "
                            "from children", (MAX_CHILDREN, child_id)).fetchone()["full"]:
                raise Refused(f"the parent knows {MAX_CHILDREN} child ids already, its limit: "
                              "register with one of them")
            taken = conn.execute(
                """insert into children (child_id, endpoint, last_seen, hotkey)
                   values (%s, %s, %s, %s)
                   on conflict (child_id) do update set endpoint = excluded.endpoint,
                       last_seen = excluded.last_seen, hotkey = excluded.hotkey
                   where children.hotkey in ('', excluded.hotkey) returning 1""",
                (child_id, endpoint, time.time(), hotkey)).fetchone() is None
        if taken:
            self.verifier.refuse(f"registration of {child_id!r}",  # only with auth on
                                 f"the id belongs to another hotkey than {hotkey}", peer)
        # With auth on, one live connection per child id: an attacker who wrote into the
        # earlier one loses it. With auth off, as before: anyone may act for any id anyway.
        earlier = self.live.bind(child_id, connection) if self.verifier and connection \
            else None
        if earlier:
            earlier.close_connection()
        log.info("Child %s registered from %s (endpoint %s)%s", child_id, peer, endpoint,
                 f"; closed its earlier connection from {earlier.peer}" if earlier else "")
        return f"registered as {child_id}"

    def _seen(self, conn, child_id):
        """Note that the child is alive; returns how many jobs it holds, until when it rests
        (Rests), and whether it is quarantined (crosschecks.py)."""
        row = conn.execute(
            """update children set last_seen = %s where child_id = %s returning resting_until,
               quarantined_at is not null as quarantined,
               (select count(*) from jobs where child_id = %s and status = 'assigned') as held""",
            (time.time(), child_id, child_id)).fetchone()
        if not row:
            raise Refused(f"unknown child {child_id!r}: call registerChild first")
        return row["held"], row["resting_until"], row["quarantined"]

    def assign(self, child_id, count):
        """Take up to `count` jobs off the queue and record them as the child's, before they
        leave. If the transaction fails the jobs go back on the queue. `count` may be a
        function of the transaction's connection, to decide in the same transaction."""
        taken = []
        try:
            with self.fenced() as conn:
                if callable(count):
                    count = count(conn)
                taken = self.queue.pop(count, child_id)
                if not taken:
                    return []
                rows = conn.execute(
                    """update jobs set status = 'assigned', child_id = %s,
                           attempts = attempts + 1, assigned_at = now(), retry_at = null
                       where job_id = any(%b) and status = 'pending'
                       returning *""", (child_id, [job_id for *_, job_id in taken])).fetchall()
                conn.execute("insert into assignments (job_id, attempt, child_id) "
                             "select unnest(%b::bigint[]), unnest(%b::integer[]), %s",
                             ([r["job_id"] for r in rows], [r["attempts"] for r in rows],
                              child_id))
        except BaseException:
            self.queue.push(taken)
            raise
        return sorted(rows, key=queue_entry)

    def request_jobs(self, child_id, max_jobs, held_ids=None):
        """A child's poll without results: see poll(); returns the jobs."""
        return self.poll(child_id, max_jobs, held_ids)[0]

    def poll(self, child_id, max_jobs, held_ids=None, results=(), connection=None):
        """A child's poll: its results (Result, or (job_id, success, result)) recorded first
        (see Reports), then up to max_jobs, within max_jobs_per_child (none while it rests:
        Rests, nor while it is quarantined: crosschecks.py); 0 is a heartbeat.
        If the child says which jobs it holds (held_ids), jobs assigned to it that it lacks
        (an answer lost when a connection or the parent died) are sent again first, and the
        jobs it holds that are no longer its own are revoked. All in one transaction.
        Returns (jobs, one (acknowledged, message) per result, revoked jobs as
        {"jobId", "attempt", "reason"}); jobs and revocations signed with auth on."""
        lost, recorded, revoked, rest = [], [], [], [None]
        results = [Result(*r) for r in results]
        unproven = self.reports.check(child_id, results, connection)
        held_back = bool(results) and self.disk.low()

        def room(conn):
            recorded[:] = [self.reports.record(conn, child_id, results, unproven, connection)] \
                if results and not held_back else []
            held, resting_until, quarantined = self._seen(conn, child_id)
            rest[0] = self.reports.rests.gate(conn, child_id, resting_until)
            # A job assigned moments ago may be a push still on its way to the child.
            lost[:] = [] if held_ids is None else conn.execute(
                """select * from jobs where child_id = %s and status = 'assigned'
                   and not job_id = any(%b) and assigned_at < now() - make_interval(secs => %s)
                   order by job_id limit %s""",
                (child_id, list(held_ids), REDELIVERY_GRACE_SECONDS,
                 MAX_JOBS_PER_ANSWER)).fetchall()
            revoked[:] = [] if held_ids is None else not_its_own(
                conn, child_id, held_ids, [r.job_id for r in results])
            # A resting child keeps its jobs, and gets those it lacks again, but no new one; a
            # quarantined one holds none (crosschecks.py) and gets none.
            return 0 if rest[0] == "resting" or quarantined else min(
                min(max_jobs, MAX_JOBS_PER_ANSWER) - len(lost), self.cfg.max_jobs_per_child - held)

        rows = self.assign(child_id, room)
        answers = self.held_back(results) if held_back else \
            self.reports.answers(child_id, results, recorded[0], connection) if results else []
        if rest[0] == "rested":
            log.info("Child %s rested; it gets jobs again", child_id)
        if lost:
            log.warning("Child %s lacks %d of its jobs (%s): sending them again", child_id,
                        len(lost), ", ".join(str(row["job_id"]) for row in lost))
        if rows:
            log.info("Sending %d jobs to child %s", len(rows), child_id)
        # A job given back and handed to the same child again is its own once more.
        again = {row["job_id"] for row in rows}
        revoked = [r for r in revoked if r["jobId"] not in again]
        for r in revoked:
            log.info("Child %s holds job %d, no longer its own (%s): telling it to stop",
                     child_id, r["jobId"], r["reason"])
        identity = self.identity
        return ([job_message(row, child_id, identity) for row in lost + rows], answers,
                [sealed(identity, r, auth.revocation_fields(child_id, r["jobId"], r["attempt"],
                                                              r["reason"])) for r in revoked])

    def withdraw(self, row):
        """Undo an assignment that never reached the child (a refused push)."""
        with self.fenced() as conn:
            conn.execute("delete from assignments where job_id = %s and attempt = %s",
                         (row["job_id"], row["attempts"]))
            conn.execute("update jobs set status = 'pending', child_id = null, "
                         "attempts = attempts - 1 where job_id = %s and status = 'assigned'",
                         (row["job_id"],))
        self.queue.push([queue_entry(row)])

    def report_completion(self, child_id, job_id, success, result):
        """One result: see report_completions."""
        return self.report_completions(child_id, [(job_id, success, result)])[0]

    def report_completions(self, child_id, results, connection=None):
        """Record a child's results (Result, or (job_id, success, result)) in one transaction,
        as `connection` (its ParentService) reports them; returns one (acknowledged, message)
        per result. See Reports."""
        results = [Result(*r) for r in results]
        unproven = self.reports.check(child_id, results, connection)
        held_back = self.disk.low()
        with self.fenced() as conn:
            self._seen(conn, child_id)
            if held_back:
                return self.held_back(results)
            outcome = self.reports.record(conn, child_id, results, unproven, connection)
        # Logged only once committed: the log never shows a result the database lacks.
        return self.reports.answers(child_id, results, outcome, connection)


    def held_back(self, results):
        """The answers to results not recorded while the disk is low: the child keeps them
        and sends them again at its next polls (its outbox is its database)."""
        return [(False, f"not recorded: the parent's disk is low ({self.disk.refusal()}); "
                        "kept by the child until there is room")] * len(results)


class Reports:
    """The results children report, in a poll or on their own: checked, recorded, answered.
    Only the child holding a job records its result; a repeated report of a recorded result
    is acknowledged again; one over max_result_bytes is recorded as a failure that says so.

    With auth on (a verifier), a result counts only if it carries the signature of the hotkey
    that registered the connection's child (auth.result_fields) and names an attempt that
    child held at that job (assignments). Whatever someone else writes into a registered
    connection is refused ("refused: ..."), counted, and recorded nowhere: results decide
    weights. A recorded result keeps its proof: the signature, the hotkey and the attempt."""

    def __init__(self, cfg, verifier, queue, checks):
        self.cfg, self.verifier, self.checks = cfg, verifier, checks
        self.retries, self.rests = Retries(cfg, queue), Rests(cfg)

    def check(self, child_id, results, connection):
        """With auth on, {index: why not} of the results whose signature does not hold. CPU
        only: done before the transaction, which holds row locks."""
        if not self.verifier:
            return {}
        hotkey = getattr(connection, "hotkey", None)
        return {i: f"its signature does not hold for the child's hotkey {hotkey}"
                for i, r in enumerate(results) if not (hotkey and self.verifier.holds(
                    hotkey, auth.result_fields(child_id, r.job_id, r.attempt, r.success,
                                               r.result, r.retryable), r.signature))}

    def record(self, conn, child_id, results, unproven, connection):
        """Write the results that may be, in the caller's transaction; returns what answers()
        needs (Recorded). A result over max_result_bytes is recorded as a failure that says so:
        refused, the child would send it again at every poll (a child whose max_result_bytes is
        larger than ours); its proof covers the text the child sent. A transient failure (see
        Retries) ends its attempt, not the job; either kind counts towards the child's rests. A
        job it completes may be drawn for a cross-check (crosschecks.py)."""
        refused = self._foreign_attempts(conn, child_id, results, unproven)
        sizes = [len(r.result.encode()) for r in results]
        hotkey = getattr(connection, "hotkey", None)
        # A job id past bigint, the type of jobs.job_id, is of no job (an error in an array).
        kept = [i for i, r in enumerate(results) if r.job_id < 2**63 and i not in refused]
        transient = {i for i in kept if results[i].retryable and not results[i].success
                     and sizes[i] <= self.cfg.max_result_bytes}  # a flag on a success: ignored
        finished = self._finish(conn, child_id, [self._row(results[i], sizes[i], hotkey)
                                                 for i in kept if i not in transient])
        recorded = set(finished)
        if any(group is not None for _, group in finished.values()):
            self.checks.due = True  # a check's job ended: it may settle
        twins = self.checks.drawn(conn, child_id, [
            job_id for job_id, (status, group) in finished.items()
            if status == "completed" and group is None])
        retried, resent = self.retries.record(conn, child_id,
                                              [results[i] for i in sorted(transient)])
        others = {row["job_id"]: row for row in conn.execute(
            "select job_id, status, child_id from jobs where job_id = any(%b)",
            ([results[i].job_id for i in kept],))}
        rest = self.rests.record(conn, child_id, self._outcomes(
            [results[i] for i in kept], recorded, retried))
        return Recorded(sizes, recorded, others, refused, retried, resent, rest, twins)

    @staticmethod
    def _finish(conn, child_id, written):
        """Record the results that end their jobs; returns {job id: (status, check_group)} of
        the jobs they ended."""
        columns = [list(column) for column in zip(*written)] or [[] for _ in range(7)]
        return {row["job_id"]: (row["status"], row["check_group"]) for row in conn.execute(
            """with reported as (
                   select * from unnest(%b::bigint[], %b::boolean[], %b::text[], %b::bytea[],
                                        %b::text[], %b::integer[], %b::text[])
                       as r(job_id, success, result, signature, hotkey, attempt, reason)),
               finished as (
                   update jobs set status = case when reported.success then 'completed'
                                            else 'failed' end,
                       success = reported.success, result = reported.result,
                       result_signature = reported.signature, result_hotkey = reported.hotkey,
                       result_attempt = reported.attempt, finished_at = now()
                   from reported where jobs.job_id = reported.job_id
                       and jobs.status = 'assigned' and jobs.child_id = %s
                   returning jobs.job_id, jobs.attempts, jobs.status, jobs.check_group,
                       reported.reason),
               closed as (
                   update assignments set finished_at = now(), outcome = finished.status,
                       reason = finished.reason
                   from finished where assignments.job_id = finished.job_id
                       and assignments.attempt = finished.attempts)
               select job_id, status, check_group from finished""", (*columns, child_id))}

    @staticmethod
    def _outcomes(results, recorded, retried):
        """[(transient, reason)] of the results recorded, in the order the child sent them."""
        outcomes, seen = [], set()
        for r in results:
            if r.job_id in seen or (r.job_id not in recorded and r.job_id not in retried):
                continue
            seen.add(r.job_id)
            transient = r.job_id in retried
            outcomes.append((transient, retried[r.job_id].reason if transient else None))
        return outcomes

    def _row(self, r, size, hotkey):
        """A result as written: its proof with auth on (nothing vouches for it with auth off),
        and for a failure, its reason."""
        limit = self.cfg.max_result_bytes
        success, text = (False, json.dumps({"error": too_big(r.job_id, size, limit)})) \
            if size > limit else (r.success, r.result)
        proof = (bytes(r.signature), hotkey, r.attempt) if self.verifier else (None, None, None)
        return (r.job_id, success, text, *proof, None if success else failure_reason(text))

    def _foreign_attempts(self, conn, child_id, results, unproven):
        """With auth on: the unproven results, and those naming an attempt at the job that
        this child never held (a signed result of an earlier attempt is no result of this
        one, and one of another child's attempt is not this child's to give)."""
        if not self.verifier:
            return unproven
        held = {(row["job_id"], row["attempt"]) for row in conn.execute(
            "select job_id, attempt from assignments where child_id = %s and job_id = any(%b)",
            (child_id, [r.job_id for r in results if r.job_id < 2**63]))}
        refused = dict(unproven)
        for i, r in enumerate(results):
            if i not in refused and (r.job_id, r.attempt) not in held:
                refused[i] = f"attempt {r.attempt} of job {r.job_id} was never this child's"
        return refused

    def answers(self, child_id, results, outcome, connection):
        """Once committed: one (acknowledged, message) per result; the refused ones are
        counted; the retried jobs join the queue's waiting ones, and a rest begun is logged."""
        self.retries.committed(outcome.retried)
        self.rests.committed(child_id, outcome.rest)
        self.checks.made(outcome.twins)
        recorded, retried = set(outcome.recorded), dict(outcome.retried)
        answers = []
        for i, (r, size) in enumerate(zip(results, outcome.sizes)):
            if i in outcome.refused:
                self.verifier.count(f"the result of job {r.job_id} from child {child_id!r}",
                                    outcome.refused[i],
                                    getattr(connection, "peer", "an unknown address"))
                answers.append((False, f"refused: {outcome.refused[i]}"))
                continue
            if r.job_id in retried:
                answers.append(retried.pop(r.job_id).answer())  # twice in one call: once
                continue
            if r.job_id in outcome.resent:
                answers.append((True, "already recorded"))  # its answer was lost
                continue
            if r.job_id in recorded:
                recorded.discard(r.job_id)  # the same result twice in one call: once recorded
                if size > self.cfg.max_result_bytes:
                    found = "too big", size
                else:
                    found = "recorded", None
            else:
                found = "not held", outcome.others.get(r.job_id)
            answers.append(self._answer(child_id, r.job_id, r.success, r.result, *found))
        return answers

    def _answer(self, child_id, job_id, success, result, outcome, detail):
        if outcome == "too big":
            JOBS_FINISHED.labels("failed").inc()
            reason = too_big(job_id, detail, self.cfg.max_result_bytes)
            log.warning("Job %s failed on child %s: %s", job_id, child_id, reason)
            return True, f"recorded as failed: {reason}"
        if outcome == "recorded":
            JOBS_FINISHED.labels("completed" if success else "failed").inc()
            log.info("Child %s completed job %s", child_id, job_id)
            if not success:
                log.warning("Job %s failed on child %s: %s", job_id, child_id, result[:300])
            return True, "recorded"
        if detail is None:
            return False, f"unknown job {job_id}"
        if detail["child_id"] == child_id and detail["status"] in ("completed", "failed"):
            return True, "already recorded"
        REPORTS_IGNORED.inc()
        log.warning("Ignored a report of job %s from child %s: the job is %s (holder %s)",
                    job_id, child_id, detail["status"], detail["child_id"])
        return True, (f"not recorded: job {job_id} is {detail['status']} "
                      f"and not held by {child_id}")


class Recorded(NamedTuple):
    """What Reports.record wrote, for its answers: the results' sizes; the ids of the jobs
    they ended; {job id: row} of the jobs named; {index: why} of the refused results;
    {job id: Retry} of the transient failures recorded; the ids of the jobs whose transient
    failure this child had reported before; the rest it began (Rest, or None); and the
    cross-checks' twins it made (crosschecks.Twin)."""
    sizes: list
    recorded: set
    others: dict
    refused: dict
    retried: dict
    resent: set
    rest: object
    twins: list


class LiveChildren:
    """With auth on, the connection (ParentService) each registered child id is live on: a
    registration on a new connection closes the earlier one, so that no two connections act
    for one child. Keyed by registered child ids (at most MAX_CHILDREN); an entry goes when
    its connection closes."""

    def __init__(self):
        # Registrations run on worker threads, closings on the RPC loop.
        self.lock = threading.Lock()
        self.connections = {}  # child id -> its connection

    def bind(self, child_id, connection):
        """child_id is live on `connection` now; returns its earlier connection if still open."""
        with self.lock:
            self._drop(connection.child_id, connection)  # the id it served before, if any
            earlier = self.connections.get(child_id)
            if connection.open:  # else closed meanwhile: nothing to forget later
                self.connections[child_id] = connection
        return earlier if earlier not in (None, connection) and earlier.open else None

    def forget(self, child_id, connection):
        with self.lock:
            self._drop(child_id, connection)

    def _drop(self, child_id, connection):
        if self.connections.get(child_id) is connection:
            del self.connections[child_id]


# -- the messages the protocol answers with -----------------------------------------------------

def sealed(identity, message, fields):
    """The message with the parent's signature over `fields` (auth on: an identity)."""
    if identity:
        message["signature"] = identity.seal(fields)
    return message


def job_message(row, child_id=None, identity=None):
    """A jobs row as an EvaluationJobData message for child_id: with auth on, signed over all
    of its fields and the child id, so that nobody can change what the child evaluates."""
    message = {
        "jobId": row["job_id"], "submissionId": row["submission_id"],
        "minerHotkey": row["miner_hotkey"], "hfRepoId": row["hf_repo_id"],
        "hfRepoCommit": row["hf_repo_commit"], "envProvider": row["env_provider"],
        "envName": row["env_name"], "logsPath": f"job-{row['job_id']}.log",
        "randomSeed": row["random_seed"], "maxRetries": row["max_retries"],
        "retryCount": max(0, row["attempts"] - 1),
        "createdAt": int(row["created_at"].timestamp() * 1000),
        "attempt": row["attempts"],
    }
    return sealed(identity, message, auth.job_fields(child_id, message))


def not_its_own(conn, child_id, held_ids, reported_ids):
    """The jobs among held_ids that the child no longer holds at the parent: cancelled,
    given back to the queue, handed to another child, or finished by another one. Its
    own results, and jobs the parent never issued, are not among them. Each with the latest
    attempt at it that the child held (0: none), which its revocation names."""
    rows = conn.execute(
        """select job_id, status, child_id, result,
                  (select coalesce(max(a.attempt), 0) from assignments a
                   where a.job_id = jobs.job_id and a.child_id = %s) as attempt
           from jobs where job_id = any(%b) and not job_id = any(%b)
             and not (child_id is not distinct from %s
                      and status in ('assigned', 'completed', 'failed'))
           order by job_id""",
        (child_id, [j for j in held_ids if j < 2**63], [j for j in reported_ids if j < 2**63],
         child_id)).fetchall()
    return [{"jobId": row["job_id"], "attempt": row["attempt"],
             "reason": revocation_reason(row)} for row in rows]


def revocation_reason(row):
    """Why a job a child holds is no longer its own, from the job's row at the parent."""
    if row["status"] == "cancelled":
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return str(json.loads(row["result"])["cancelled"])
        return "cancelled"
    if row["status"] == "pending":
        return "given back to the queue"
    if row["status"] == "assigned":
        return f"handed to child {row['child_id']}"
    return f"{row['status']} by child {row['child_id']}"


def too_big(job_id, size, limit):
    return f"result of job {job_id} is {size} bytes; the limit is {limit} (max_result_bytes)"


# ---------------------------------------------------------------------------------------------
# Main: start the RPC service; stand by until this parent is the active one; then read the
# chain every sync_frequency seconds, until stopped or until the leadership is lost
# ---------------------------------------------------------------------------------------------

def run(cfg, stop):
    common.setup_logging(cfg)
    chain = chains.open_chain(cfg)  # read only while active
    dsn = common.database_dsn(cfg, stop)
    # A transaction left open by this parent frozen mid-way must not hold up a takeover for
    # long: the server ends such a session after leader_timeout_seconds.
    db = common.Database(dsn, SCHEMA, session="set idle_in_transaction_session_timeout = "
                                              f"{int(cfg.leader_timeout_seconds * 1000)}")
    weights = chains.open_weights(cfg, chain, db)  # None unless [weights] enabled
    identity, verifier = auth.hotkey_auth(cfg, cfg.parent_port, db)
    tls_server, tls_client = auth.tls_contexts(cfg)
    leadership = Leadership(dsn, f"{cfg.parent_host}:{cfg.parent_port}",
                            cfg.leader_timeout_seconds)
    state = ParentState(db, cfg, identity, verifier, leadership)
    state.disk = common.DiskGuard(cfg.min_free_disk_mb, [common.data_dir(cfg)],
                                  stops="recording no result and making no job",
                                  resumes="recording results and making jobs")
    state.disk.guard_database(db)
    if cfg.metrics_port:
        prometheus_client.REGISTRY.register(QueueMetrics(state.statistics))
        common.serve_metrics(cfg)
    pages.serve_parent(cfg, dsn, state, weights)  # with dashboard_port
    PARENT_ACTIVE.set(0)
    # A parent that can lead at once serves as the active one from its first call.
    with contextlib.suppress(common.DatabaseUnavailable):  # else stand_by() tries again
        take_the_lead(state)
    rpc = RpcThread()
    port = rpc.serve(cfg.listen_host, cfg.parent_port, lambda: ParentService(state), cfg,
                     tls_server)
    log.info("Parent validator serving on %s:%d%s", cfg.listen_host, port,
             " (TLS 1.3)" if tls_server else "")
    pusher = Pusher(state, rpc, tls_client) if cfg.push_jobs else None
    while not stop.is_set():
        if not leadership.active() and not stand_by(stop, state):
            break
        lead(cfg, stop, state, chain, pusher, weights)
    log.info("Parent validator stopping")
    rpc.stop()
    if leadership.active():  # after the RPC service stopped: never two parents serving
        leadership.resign()
    db.close()


def take_the_lead(state):
    """Take the leadership if it is free, and then the queue; True if this parent now leads.
    A database that fails between the two (restarted meanwhile) gives the leadership back: a
    parent serves only with its queue loaded."""
    leadership = state.leadership
    if not leadership.take():
        return False
    try:
        state.take_over()
    except common.DatabaseUnavailable as e:
        leadership.step_down(f"the queue could not be loaded ({e})")
        raise
    return True


def stand_by(stop, state):
    """Until `stop`, try to take the leadership every STANDBY_RETRY_SECONDS; True once taken.
    Meanwhile the RPC service answers ping and getStats and refuses the rest ("standby")."""
    leadership = state.leadership
    outage = common.Outage("Leadership check failed", "Leadership check recovered", 30.0)
    announced = None
    while not stop.is_set():
        try:
            if take_the_lead(state):
                outage.succeeded()
                return True
            outage.succeeded()
            if leadership.active_parent != announced:
                announced = leadership.active_parent
                log.info("Parent validator is a standby; the active parent is %s",
                         announced or "unknown")
            stop.wait(STANDBY_RETRY_SECONDS)
        except common.DatabaseUnavailable as e:
            stop.wait(outage.failed(e))
    return False


def lead(cfg, stop, state, chain, pusher, weights):
    """The active parent's loop: read the chain every sync_frequency seconds; every second
    confirm the leadership, look after the leases and take an operator's changes. Returns on
    `stop`, or when the leadership is lost (this parent is then a standby)."""
    leadership = state.leadership
    sync = common.Outage("Chain sync failed", "Chain sync recovered", cfg.neuron.sync_frequency)
    upkeep = common.Outage("Queue upkeep failed", "Queue upkeep recovered", 30.0)
    next_sync = next_upkeep = time.monotonic()
    while not stop.is_set():
        if time.monotonic() >= next_upkeep:
            lost = leadership.confirm()
            if lost:
                leadership.step_down(lost)
                state.step_down()
                return
            # Leases, an operator's changes and pushes are checked every second, whatever
            # the chain's pace.
            try:
                state.leases.upkeep()
                state.retention.maybe_prune()  # hourly
                state.checks.maybe_settle()
                if pusher:
                    pusher.push()
                upkeep.succeeded()
                next_upkeep = time.monotonic() + 1.0
            except common.Standby:
                next_upkeep = time.monotonic()  # confirm() says why, at once
                continue
            except common.DatabaseUnavailable as e:
                next_upkeep = time.monotonic() + upkeep.failed(e)
        if time.monotonic() >= next_sync and not state.disk.low():
            try:
                if state.intake.add_commitments(read_chain(chain)) and pusher:
                    pusher.push()
                sync.succeeded()
                next_sync = time.monotonic() + cfg.neuron.sync_frequency
            except common.Standby:
                next_upkeep = time.monotonic()
                continue
            except (chains.ChainUnavailable, common.DatabaseUnavailable) as e:
                next_sync = time.monotonic() + sync.failed(e)
        if weights:
            weights.maybe_set()  # returns at once unless a check is due
        stop.wait(max(0.0, min(next_sync, next_upkeep) - time.monotonic()))


def read_chain(chain):
    """One read of the chain (a ChainSnapshot), timed and its failures counted."""
    try:
        with CHAIN_READS.time():
            return chain.read()
    except chains.ChainUnavailable:
        CHAIN_FAILURES.inc()
        raise


def main(argv=None):
    return common.role_main(run, "Run the parent validator.", is_parent=True, argv=argv)


# =============================================================================================
# What a first reading can skip: the parts of ParentState, and the hardening around it
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# The pending queue: the pending jobs mirrored in memory, and the held polls they wake
# ---------------------------------------------------------------------------------------------

class PendingQueue:
    """The pending jobs in serving order: highest priority first, then jobs given back, then by
    job id. It mirrors the jobs table; a stale entry (a job cancelled meanwhile) is harmless,
    because a job is handed out only if the database still says it is pending. Once loaded
    from the database, each push that adds jobs wakes the held polls (arrivals).

    A job that failed transiently (Retries) waits apart, in `waiting` by the time it is due
    (jobs.retry_at), until release_due() moves it into the queue; then for one more backoff
    (`avoid`) a child that failed it passes it over. So no poll looks at a job it cannot take
    beyond MAX_PASSED_OVER of them, and none scans the waiting ones. A cross-check's job never
    goes to a child that did another job of its check (`never`, crosschecks.py); such jobs
    wait in a heap of their own (`checks`), so that those a child may not take, however many,
    never hold up the jobs behind them."""

    def __init__(self, db, backoff):
        self.db = db
        self.backoff = backoff  # attempts -> the wait after a transient failure (retry_backoff)
        # Guards the queue. Taken inside a database transaction, never around one: no deadlock.
        self.lock = threading.Lock()
        self.heap = []  # (-priority, position, job_id), as queue_entry() makes
        self.checks = []  # the same, of the jobs in `never`
        self.waiting = []  # (due, entry): not to be handed out before due (unix time)
        self.avoid = {}  # job id -> (child ids that failed it transiently, until unix time)
        self.never = {}  # job id of a cross-check's job -> the child ids it never goes to
        self.version = None  # chain_state's queue_version when last loaded
        self.arrivals = Arrivals()
        self.on_push = None  # arrivals.notify once loaded: a standby's queue wakes no poll

    def reload(self, anew=False):
        """Rebuild the queue from the database at start and whenever an operator changed it;
        anew, whatever the version (this parent took over)."""
        if anew:
            self.version = None
        rows = self.db.query("select value from chain_state where key = 'queue_version'")
        version = rows[0]["value"] if rows else 0
        if version == self.version:
            return
        with self.db.transaction() as conn, self.lock:
            # Plain tuples, not dict rows: a million pending jobs must stay cheap to hold.
            cursor = conn.cursor(row_factory=tuple_row)
            self.heap = list(cursor.execute("select -priority, position, job_id from jobs "
                                            "where status = 'pending' and retry_at is null"))
            self._load_retries(cursor)
            self.never = {job_id: frozenset(children) for job_id, children in cursor.execute(
                """select j.job_id, array(select distinct o.child_id from jobs o
                                          where o.check_group = j.check_group
                                            and o.job_id <> j.job_id and o.child_id is not null)
                   from jobs j where j.status = 'pending' and j.check_round > 0""")}
            if self.never:
                self.checks = [entry for entry in self.heap if entry[2] in self.never]
                self.heap = [entry for entry in self.heap if entry[2] not in self.never]
            heapq.heapify(self.heap)
            heapq.heapify(self.checks)
            self.on_push = self.arrivals.notify
        if len(self):
            self.arrivals.notify()
        if len(self) or self.waiting or self.version is not None:
            log.info("Loaded %d pending jobs from the database%s", self.pending(),
                     f" ({len(self.waiting)} of them wait to be tried again)"
                     if self.waiting else "")
        self.version = version

    def _load_retries(self, cursor):
        """The pending jobs that failed transiently: due, or still waiting; and the children
        they avoid meanwhile (every child whose attempt at them failed transiently)."""
        now, self.waiting, self.avoid = time.time(), [], {}
        for priority, position, job_id, due, attempts, children in cursor.execute(
                """select -priority, position, job_id, extract(epoch from retry_at)::float8,
                          attempts, array(select distinct a.child_id from assignments a
                                          where a.job_id = jobs.job_id
                                            and a.outcome = 'retryable')
                   from jobs where status = 'pending' and retry_at is not null"""):
            entry = (priority, position, job_id)
            if due > now:
                self.waiting.append((due, entry))
            else:
                self.heap.append(entry)
            # The window other children get starts when the job joins the queue: now, if due.
            until = max(due, now) + self.backoff(max(attempts, 1))
            if children:
                self.avoid[job_id] = (frozenset(children), until)
        heapq.heapify(self.waiting)

    def clear(self):
        with self.lock:
            self.heap, self.checks, self.waiting = [], [], []
            self.avoid, self.never, self.on_push = {}, {}, None

    def push(self, entries):
        with self.lock:
            size = len(self)
            for entry in entries:
                heapq.heappush(self.checks if entry[2] in self.never else self.heap, entry)
            if len(self) > size and self.on_push:
                self.on_push()

    def push_avoiding(self, entries):
        """Jobs of cross-checks, [(entry, the children each never goes to)]."""
        with self.lock:
            for entry, children in entries:
                self.never[entry[2]] = children
        self.push(entry for entry, _ in entries)

    def forget_avoiding(self, job_ids):
        """The jobs of a settled cross-check: they are final, and no longer avoid anyone."""
        with self.lock:
            for job_id in job_ids:
                self.never.pop(job_id, None)

    def wait(self, retries):
        """Jobs that failed transiently, [(due, entry, child ids to avoid, until)]: each joins
        the queue when due, and until `until` is no job for those children."""
        with self.lock:
            for due, entry, children, until in retries:
                heapq.heappush(self.waiting, (due, entry))
                self.avoid[entry[2]] = (children, until)

    def release_due(self):
        """Move the waiting jobs that are due into the queue (the upkeep, every second). The
        window in which a job goes to other children than those it avoids starts now: the
        upkeep's second may have eaten a short one, and the child that failed it, holding a
        poll like the others, would take it as often as not."""
        now = time.time()
        with self.lock:
            size = len(self)
            while self.waiting and self.waiting[0][0] <= now:
                due, entry = heapq.heappop(self.waiting)
                heapq.heappush(self.checks if entry[2] in self.never else self.heap, entry)
                if entry[2] in self.avoid:
                    children, until = self.avoid[entry[2]]
                    self.avoid[entry[2]] = (children, now + (until - due))
            if len(self) > size and self.on_push:
                self.on_push()

    def pop(self, count, child_id=None):
        """Up to `count` entries for child_id, in serving order (of both heaps): a job that
        child failed transiently lately, or a cross-check's it may not take, is passed over and
        stays (at most MAX_PASSED_OVER of each heap: then the child gets fewer this time)."""
        now, taken, passed, skipped = time.time(), [], [], []
        with self.lock:
            while len(taken) < count:
                while self.checks and self._barred(self.checks[0], child_id, now) \
                        and len(skipped) < MAX_PASSED_OVER:
                    skipped.append(heapq.heappop(self.checks))
                check = self.checks[0] if self.checks and not self._barred(
                    self.checks[0], child_id, now) else None
                if check and (not self.heap or check < self.heap[0]):
                    self.avoid.pop(check[2], None)
                    taken.append(heapq.heappop(self.checks))
                    continue
                if not self.heap:
                    break
                entry = heapq.heappop(self.heap)
                if self._barred(entry, child_id, now):
                    passed.append(entry)
                    if len(passed) >= MAX_PASSED_OVER:
                        break
                    continue
                self.avoid.pop(entry[2], None)
                taken.append(entry)
            for entry in passed:  # back, waking nobody: they were there already
                heapq.heappush(self.heap, entry)
            for entry in skipped:
                heapq.heappush(self.checks, entry)
        return taken

    def _barred(self, entry, child_id, now):
        """Whether child_id may not take the job now: it failed it transiently lately, or it
        did another job of its cross-check."""
        children, until = self.avoid.get(entry[2], ((), 0))
        return until > now and child_id in children or child_id in self.never.get(entry[2], ())

    def __len__(self):
        return len(self.heap) + len(self.checks)

    def pending(self):
        """The pending jobs: in the queue, and waiting to be tried again."""
        return len(self) + len(self.waiting)

    def ids(self):
        """The job ids in serving order (of those not waiting)."""
        return [job_id for *_, job_id in sorted(self.heap + self.checks)]


class Arrivals:
    """Wakes the requestJobs calls that the parent holds open (long polling) when jobs become
    pending. A call watches before it looks at the queue, so a job pushed between its look and
    its wait still wakes it. notify() may be called from any thread; the watchers wait on
    the RPC thread's event loop."""

    def __init__(self):
        self.lock = threading.Lock()
        self.watchers = set()

    @contextlib.contextmanager
    def watch(self):
        """An asyncio.Event, set (on the caller's loop) each time jobs become pending."""
        arrived = asyncio.Event()
        watcher = (asyncio.get_running_loop(), arrived)
        with self.lock:
            self.watchers.add(watcher)
        try:
            yield arrived
        finally:
            with self.lock:
                self.watchers.discard(watcher)

    def notify(self):
        with self.lock:
            watchers = list(self.watchers)
        for loop, arrived in watchers:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(arrived.set)


async def wait_until(event, deadline):
    """Wait for the event until the time.monotonic() deadline; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), deadline - time.monotonic())
    except TimeoutError:
        return False
    return True


def returned_position():
    """Queue position of a job given back: ahead of every new job of its priority (those have
    position 0 and go by job id), behind the jobs given back before it."""
    return int(time.time() * 1000) - 2**53


def queue_entry(row):
    return (-row["priority"], row["position"], row["job_id"])


# ---------------------------------------------------------------------------------------------
# Leases: jobs come back from children that vanish or take too long
# ---------------------------------------------------------------------------------------------

# The leases that expired: of a child unseen since lost_before, or older than job_timeout.
EXPIRED_LEASES = """from jobs j join children c on c.child_id = j.child_id
    where j.status = 'assigned' and (c.last_seen < %(lost_before)s or
          j.assigned_at < now() - make_interval(secs => %(job_timeout)s))"""


class Leases:
    """A job handed to a child is leased to it: the lease expires when the child is unseen for
    child_timeout_seconds or the job is not finished within job_timeout_seconds, and the job
    goes back to the queue, or fails once it has used up its attempts."""

    def __init__(self, db, cfg, queue, fenced):
        self.db, self.cfg, self.queue, self.fenced = db, cfg, queue, fenced
        self.started = time.time()  # when this parent became active

    def upkeep(self):
        """The active parent's check every second: give back the expired leases, take an
        operator's changes to the queue, and queue the retried jobs that are due (they wait
        in memory: no statement). Mostly neither of the first two is due, and one plain
        statement says so: an idle parent costs the database one query a second for this,
        not two transactions of which one takes a row lock."""
        row = self.db.query(
            f"""select (select value from chain_state where key = 'queue_version') as version,
                       exists (select 1 {EXPIRED_LEASES}) as expired""",
            self._limits())[0]
        self.queue.release_due()
        if row["expired"]:
            self.expire()
        if (row["version"] or 0) != self.queue.version:
            self.queue.reload()

    def _limits(self):
        now = time.time()
        # After a restart every child looks unseen: give them child_timeout to come back.
        lost_before = now - self.cfg.child_timeout_seconds \
            if now - self.started >= self.cfg.child_timeout_seconds else 0
        return {"lost_before": lost_before, "job_timeout": self.cfg.job_timeout_seconds}

    def expire(self):
        """Give back the jobs of children unseen for child_timeout_seconds and jobs assigned
        longer than job_timeout_seconds. Each return uses an attempt; a job that has used
        more than maxRetries of them ends failed with the reason."""
        cfg, returned = self.cfg, []
        with self.fenced() as conn:
            rows = conn.execute(
                f"""select j.job_id, j.child_id, j.attempts, j.max_retries, j.priority,
                           c.last_seen < %(lost_before)s as child_lost
                    {EXPIRED_LEASES} for update of j""", self._limits()).fetchall()
            for row in rows:
                reason = (f"child {row['child_id']} unseen for {cfg.child_timeout_seconds:g}s"
                          if row["child_lost"] else
                          f"not finished within {cfg.job_timeout_seconds:g}s")
                JOBS_RETURNED.labels("child_lost" if row["child_lost"] else "timeout").inc()
                entry = self._give_back(conn, row, reason)
                if entry:
                    returned.append(entry)
        self.queue.push(returned)

    def _give_back(self, conn, row, reason):
        conn.execute("update assignments set finished_at = now(), outcome = 'expired', "
                     "reason = %s where job_id = %s and attempt = %s",
                     (reason, row["job_id"], row["attempts"]))
        if row["attempts"] > row["max_retries"]:
            error = f"gave up after {row['attempts']} attempts; the last: {reason}"
            conn.execute("update jobs set status = 'failed', success = false, result = %s, "
                         "finished_at = now() where job_id = %s",
                         (json.dumps({"error": error}), row["job_id"]))
            log.warning("Job %d failed: %s", row["job_id"], error)
            JOBS_FINISHED.labels("failed").inc()
            return None
        position = returned_position()
        conn.execute("update jobs set status = 'pending', child_id = null, position = %s "
                     "where job_id = %s", (position, row["job_id"]))
        log.warning("Job %d returned to the queue: %s (attempt %d of %d)", row["job_id"], reason,
                    row["attempts"], row["max_retries"] + 1)
        return (-row["priority"], position, row["job_id"])


# ---------------------------------------------------------------------------------------------
# Transient failures: the job is tried again later, and a child that keeps failing rests
# ---------------------------------------------------------------------------------------------

MAX_REASON_CHARS = 500  # why an attempt ended (assignments.reason), at most
MAX_RETRY_BACKOFF_SECONDS = 3600.0  # the longest wait before a retry, unless the base is longer
MAX_REST_SECONDS = 86400.0  # the longest rest, unless rest_seconds is longer
MAX_PASSED_OVER = 100  # jobs a poll passes over because its child failed them (PendingQueue.pop)
REASON_PARSED_BYTES = 64 << 10  # a longer failure's reason is the start of its text


def retry_backoff(cfg, attempts):
    """The wait before a job whose attempt `attempts` failed transiently is handed out again:
    retry_backoff_seconds, doubled at each attempt after the first, capped."""
    base = cfg.jobs.retry_backoff_seconds
    return min(base * 2.0 ** min(attempts - 1, 64), max(base, MAX_RETRY_BACKOFF_SECONDS))


def failure_reason(text):
    """Why a failed attempt ended, from its result text: its "error", else the text itself; at
    most MAX_REASON_CHARS, and storable (no NUL, no lone surrogate from a JSON escape)."""
    doc = None
    if len(text) <= REASON_PARSED_BYTES:
        with contextlib.suppress(ValueError, RecursionError):  # not JSON, or nested too deep
            doc = json.loads(text)
    error = doc.get("error") if isinstance(doc, dict) else None
    reason = (error if isinstance(error, str) else text)[:MAX_REASON_CHARS]
    return reason.replace("\x00", "").encode("utf-8", "replace").decode()


class Retry(NamedTuple):
    """A transient failure recorded: the job goes back to the queue at `due` (unix time), for
    one more `delay` not to the children in `avoid`; or, `delay` None, it failed for good."""
    job_id: int
    child_id: str
    attempt: int
    of: int  # the attempts a job may have: maxRetries + 1
    reason: str
    delay: float | None
    due: float | None
    entry: tuple  # its queue_entry()
    avoid: frozenset  # the children whose attempts at it failed transiently
    every_one_transient: bool

    def answer(self):
        if self.delay is None:
            return True, (f"recorded as a transient failure; the job failed after "
                          f"{self.attempt} attempts")
        return True, f"recorded as a transient failure: the job will be retried in {self.delay:g}s"


class Retries:
    """Transient failures. A child says a failure is not the miner's (`retryable`: its
    evaluator could not start or exited 75, it was killed by a signal the child did not send,
    the disk guard refused it). Only the job's holder records one, once: its attempt ends
    'retryable' with the reason, and the job goes back to the queue, not to be handed out
    before retry_backoff_seconds (doubled at each attempt), and for one more such wait not to
    a child that failed it transiently (PendingQueue: `waiting`, `avoid`). It has the budget of
    expired leases, maxRetries + 1 attempts; then it fails with every attempt's reason."""

    def __init__(self, cfg, queue):
        self.cfg, self.queue = cfg, queue

    def record(self, conn, child_id, results):
        """In the caller's transaction, the child's transient failures: returns ({job id:
        Retry} of those recorded, the ids of those it had reported before)."""
        if not results:
            return {}, set()
        reasons = [failure_reason(r.result) for r in results]
        # A failure of an attempt that ended 'retryable' already is that report sent again.
        jobs = {}
        for row in conn.execute(
                """select j.job_id, j.attempts, j.max_retries, j.priority, r.reason
                   from unnest(%b::bigint[], %b::bigint[], %b::text[]) with ordinality
                        as r(job_id, attempt, reason, n)
                   join jobs j on j.job_id = r.job_id
                   where j.status = 'assigned' and j.child_id = %s and not exists (
                       select 1 from assignments a where a.job_id = r.job_id
                           and a.attempt = r.attempt and a.outcome = 'retryable')
                   order by r.n for update of j""",
                ([r.job_id for r in results], [r.attempt for r in results], reasons,
                 child_id)):
            jobs.setdefault(row["job_id"], row)  # the same job twice in one call: the first
        retried = self._end_attempts(conn, child_id, list(jobs.values()))
        return retried, self._resent(conn, child_id, [r for r in results if r.job_id not in jobs])

    def _end_attempts(self, conn, child_id, rows):
        """End the attempts of the jobs `rows`, and each job's turn: back to the queue after
        its backoff, or failed when its attempts are used up."""
        ids = [row["job_id"] for row in rows]
        conn.execute(
            """update assignments a set finished_at = now(), outcome = 'retryable',
                   reason = r.reason
               from unnest(%b::bigint[], %b::integer[], %b::text[]) as r(job_id, attempt, reason)
               where a.job_id = r.job_id and a.attempt = r.attempt""",
            (ids, [row["attempts"] for row in rows], [row["reason"] for row in rows]))
        history = {}
        for a in conn.execute("select job_id, attempt, child_id, outcome, reason from assignments "
                              "where job_id = any(%b) order by job_id, attempt", (ids,)):
            history.setdefault(a["job_id"], []).append(a)
        now, position, retried = time.time(), returned_position(), {}
        for row in rows:
            attempts = history[row["job_id"]]
            delay = retry_backoff(self.cfg, row["attempts"]) \
                if row["attempts"] <= row["max_retries"] else None
            retried[row["job_id"]] = Retry(
                row["job_id"], child_id, row["attempts"], row["max_retries"] + 1, row["reason"],
                delay, None if delay is None else now + delay,
                (-row["priority"], position, row["job_id"]),
                frozenset(a["child_id"] for a in attempts if a["outcome"] == "retryable"),
                all(a["outcome"] == "retryable" for a in attempts))
        back = [r for r in retried.values() if r.delay is not None]
        conn.execute(
            """update jobs set status = 'pending', child_id = null, position = %s,
                   retry_at = to_timestamp(r.due)
               from unnest(%b::bigint[], %b::float8[]) as r(job_id, due)
               where jobs.job_id = r.job_id""",
            (position, [r.job_id for r in back], [r.due for r in back]))
        given_up = [r for r in retried.values() if r.delay is None]
        conn.execute(
            """update jobs set status = 'failed', success = false, result = r.result,
                   result_signature = null, result_hotkey = null, result_attempt = null,
                   finished_at = now()
               from unnest(%b::bigint[], %b::text[]) as r(job_id, result)
               where jobs.job_id = r.job_id""",
            ([r.job_id for r in given_up],
             [gave_up_result(history[r.job_id], r.reason) for r in given_up]))
        return retried

    @staticmethod
    def _resent(conn, child_id, results):
        """The job ids of `results` (transient failures not recorded now) that this child had
        reported before, its answer lost: the attempt each names (or, naming none, the child's
        latest at the job) ended 'retryable'."""
        if not results:
            return set()
        ended = {}
        for a in conn.execute("select job_id, attempt, outcome from assignments "
                              "where child_id = %s and job_id = any(%b) order by attempt",
                              (child_id, [r.job_id for r in results])):
            ended[a["job_id"], a["attempt"]] = ended[a["job_id"], 0] = a["outcome"]
        return {r.job_id for r in results if ended.get((r.job_id, r.attempt)) == "retryable"}

    def committed(self, retried):
        """Once the transaction committed: the retried jobs wait in the queue, and the log."""
        for r in retried.values():
            if r.delay is None:
                JOBS_FINISHED.labels("failed").inc()
                log.warning("Job %d failed after %d attempts, %s: %s", r.job_id, r.attempt,
                            "every one transient" if r.every_one_transient
                            else "the last one transient", r.reason)
                continue
            JOBS_RETRIED.inc()
            log.warning("Job %d failed transiently on child %s (attempt %d of %d): %s; tried "
                        "again in %gs, by another child when one is free", r.job_id,
                        r.child_id, r.attempt, r.of, r.reason, r.delay)
        self.queue.wait([(r.due, r.entry, r.avoid, r.due + r.delay)
                         for r in retried.values() if r.delay is not None])


def gave_up_result(attempts, reason):
    """The result of a job whose last attempt failed transiently with none left."""
    return json.dumps({
        "error": f"gave up after {len(attempts)} attempts: {reason}",
        "attempts": [{"attempt": a["attempt"], "child": a["child_id"], "outcome": a["outcome"],
                      "reason": a["reason"]} for a in attempts]})


class Rest(NamedTuple):
    """A rest begun: how long, after how many transient failures in a row, the last one's
    reason."""
    seconds: float
    failures: int
    reason: str


class Rests:
    """A child whose last unhealthy_after evaluations all failed transiently rests: it gets no
    new job (from a poll or a push) for rest_seconds, doubled for each rest in a row, capped.
    Meanwhile its results and heartbeats count and it keeps the jobs it holds. A result that is
    not a transient failure ends the run; a transient failure after a rest (while its failures
    in a row are still unhealthy_after or more) rests it again. The counts are the children
    table's: they survive a restart and a takeover."""

    def __init__(self, cfg):
        self.cfg = cfg

    def record(self, conn, child_id, outcomes):
        """In the caller's transaction: count the child's results recorded now, [(transient,
        reason)] in order; returns the Rest begun, or None."""
        if not any(transient for transient, _ in outcomes):
            if outcomes:  # the common case: one statement, which mostly changes nothing
                conn.execute("update children set transient_in_a_row = 0, rests_in_a_row = 0 "
                             "where child_id = %s and (transient_in_a_row > 0 "
                             "or rests_in_a_row > 0)", (child_id,))
            return None
        row = conn.execute("select transient_in_a_row, rests_in_a_row, resting_until "
                           "from children where child_id = %s for update", (child_id,)).fetchone()
        if row is None:
            return None
        in_a_row, rests, until = row["transient_in_a_row"], row["rests_in_a_row"], \
            row["resting_until"]
        now, rest = time.time(), None
        for transient, reason in outcomes:
            if not transient:
                in_a_row = rests = 0
                continue
            in_a_row += 1
            # Jobs handed out before a rest that fail during it do not lengthen it.
            if in_a_row >= self.cfg.unhealthy_after and until <= now:
                rests += 1
                seconds = min(self.cfg.rest_seconds * 2.0 ** min(rests - 1, 64),
                              max(self.cfg.rest_seconds, MAX_REST_SECONDS))
                until, rest = now + seconds, Rest(seconds, in_a_row, reason)
        conn.execute("update children set transient_in_a_row = %s, rests_in_a_row = %s, "
                     "resting_until = %s where child_id = %s", (in_a_row, rests, until, child_id))
        return rest

    @staticmethod
    def gate(conn, child_id, resting_until):
        """At a poll, with the child's resting_until: "resting" while it rests (no new job);
        "rested" at its first poll after a rest, which ends it; else None."""
        if not resting_until:
            return None
        if resting_until > time.time():
            return "resting"
        conn.execute("update children set resting_until = 0 where child_id = %s", (child_id,))
        return "rested"

    @staticmethod
    def committed(child_id, rest):
        if rest:
            log.warning("Child %s rests for %gs: its last %d evaluations failed transiently "
                        "(the last: %s)", child_id, rest.seconds, rest.failures, rest.reason)


# ---------------------------------------------------------------------------------------------
# The chain intake: commitments become jobs, and the queue follows the chain
# ---------------------------------------------------------------------------------------------

def fingerprint(hotkey, repo_id, revision):
    return hashlib.sha256(f"{hotkey}\n{repo_id}\n{revision}".encode()).hexdigest()


class ChainIntake:
    """What each sync does with the chain's snapshot: a job for every new, eligible commitment,
    and the cancel of the open jobs that no longer matter."""

    def __init__(self, cfg, queue, fenced):
        self.cfg, self.queue, self.fenced = cfg, queue, fenced
        self.skipped = set()  # bad commitments already logged, so each is logged once
        self.last_sync = None  # (unix time, ChainSnapshot) of the last sync: the dashboard's

    def add_commitments(self, snapshot):
        """Create the jobs of every new, eligible commitment in the snapshot: one per entry and
        repeat of the suite (suite_of). A submission's jobs, its fingerprint and the block
        reached are written in one transaction, so a crash never loses a commitment nor makes
        any of its jobs twice. Returns the new job ids."""
        with self.fenced() as conn:
            eligible = self._eligible(conn, snapshot)
            new = self._insert_jobs(conn, eligible) if eligible else []
            cancelled = self._cancel_left_behind(conn, snapshot, new)
            conn.execute("insert into chain_state values ('last_block', %s) on conflict (key) "
                         "do update set value = greatest(chain_state.value, excluded.value)",
                         (snapshot.block,))
        self.last_sync = (time.time(), snapshot)
        self.queue.push(queue_entry(job) for job in new)
        self._log_new(eligible, new)
        for job_id, reason in cancelled:
            log.info("Job %d cancelled: %s", job_id, reason)
        return [job["job_id"] for job in new]

    @staticmethod
    def _log_new(eligible, new):
        """One line per new submission: its job, or the range of its jobs (consecutive ids)."""
        ids = {}
        for job in new:
            ids.setdefault(job["fingerprint"], []).append(job["job_id"])
        for digest, job_ids in ids.items():
            c, repo_id, revision = eligible[digest]
            what = f"job {job_ids[0]}" if len(job_ids) == 1 else \
                f"jobs {job_ids[0]}-{job_ids[-1]} ({len(job_ids)})"
            log.info("New %s for miner %s: %s@%s (block %d)", what, c.hotkey, repo_id,
                     revision or "default", c.block)

    def _eligible(self, conn, snapshot):
        """{fingerprint: (commitment, repo id, revision)} of the snapshot's commitments that may
        make a job: of a miner (not a validator) with enough stake, recent enough, readable."""
        neuron = self.cfg.neuron
        row = conn.execute("select value from chain_state where key = 'last_block'").fetchone()
        last_block = row["value"] if row else None
        if last_block is None and neuron.load_old_nodes:
            oldest = None
        else:
            oldest = (last_block if last_block is not None else snapshot.block) \
                - neuron.max_commitment_lookback
        eligible = {}
        for c in snapshot.commitments:
            if c.hotkey in neuron.allowed_validators or c.stake < neuron.min_stake_threshold:
                continue
            if oldest is not None and c.block < oldest:
                continue
            try:
                # Every text of a job is bounded, so that an answer of MAX_JOBS_PER_ANSWER
                # jobs is too: a file chain's hotkeys are not ss58 addresses by nature.
                if not 1 <= len(c.hotkey) <= MAX_HOTKEY_CHARS:
                    raise ValueError(f"a hotkey of {len(c.hotkey)} characters")
                repo_id, revision = chains.parse_commitment(c.data)
            except ValueError as e:
                if (c.hotkey, c.data) not in self.skipped:
                    self.skipped.add((c.hotkey, c.data))
                    log.warning("Skipping commitment of %s at block %d: %s",
                                c.hotkey[:MAX_HOTKEY_CHARS], c.block, e)
                continue
            digest = fingerprint(c.hotkey, repo_id, revision)
            eligible.setdefault(digest, (c, repo_id, revision))
        # A submission made once is never made again, whatever the suite is now.
        known = conn.execute("select distinct fingerprint from jobs where fingerprint = any(%s)",
                             (list(eligible),)).fetchall()
        for row in known:
            del eligible[row["fingerprint"]]
        # The oldest submission first: its jobs get the lowest ids, and the queue serves by id.
        return dict(sorted(eligible.items(), key=lambda item: item[1][0].block))

    def _cancel_left_behind(self, conn, snapshot, new):
        """The queue follows the chain: cancel the pending and assigned jobs that no longer
        matter, in the transaction that read the snapshot. With evaluate_latest_only, those of
        a miner's older submissions when a new one got a job; and those of miners no longer
        registered at the uid they committed from (the uid went to another hotkey). Only a
        snapshot that was read whole gets here: a failed read cancels nothing. A job that
        ended is never touched. Returns [(job id, reason)]."""
        cancelled = []
        if new and self.cfg.neuron.evaluate_latest_only:
            # A submission's jobs have consecutive ids: the jobs of a hotkey below the first
            # job of its newest submission are those of its older submissions.
            latest = {}  # hotkey -> (fingerprint, first job id) of its newest submission
            for job in new:  # by job id
                hotkey, digest = job["miner_hotkey"], job["fingerprint"]
                if latest.get(hotkey, ("",))[0] != digest:
                    latest[hotkey] = (digest, job["job_id"])
            newest = {hotkey: first for hotkey, (_, first) in latest.items()}
            cancelled += cancel_jobs(conn, "superseded", """
                select j.job_id, 'superseded by job ' || n.job_id
                from jobs j join unnest(%b::text[], %b::bigint[]) as n(hotkey, job_id)
                     on j.miner_hotkey = n.hotkey and j.job_id < n.job_id
                where j.status in ('pending', 'assigned')""",
                (list(newest), list(newest.values())))
        neurons = snapshot.neurons
        cancelled += cancel_jobs(conn, "deregistered", """
            select j.job_id, 'miner deregistered' from jobs j
            where j.status in ('pending', 'assigned') and not exists (
                select 1 from unnest(%b::text[], %b::integer[]) as n(hotkey, uid)
                where n.hotkey = j.miner_hotkey
                  and (n.uid is null or j.miner_uid is null or n.uid = j.miner_uid))""",
            (list(neurons), list(neurons.values())))
        return cancelled

    def _insert_jobs(self, conn, eligible):
        """Insert the jobs of each {fingerprint: (commitment, repo id, revision)}, one per entry
        and repeat of the suite, in the given order, in statements of JOBS_PER_STATEMENT rows
        at most; returns the new jobs (job_id, priority, position, miner_hotkey, fingerprint)."""
        suite = suite_of(self.cfg)
        # The seed comes from this parent's randomness, drawn once and kept with the job: no
        # miner can know it before its evaluation (it was once derived from the commitment).
        # 32 bits: the wire's randomSeed is a UInt32.
        rows = ((digest, int(digest[:15], 16), c.hotkey, c.uid, repo_id, revision, c.block,
                 secrets.randbits(32), n, entry.env_provider, entry.env_name, repeat,
                 entry.weight)
                for digest, (c, repo_id, revision) in eligible.items()
                for n, entry in enumerate(suite) for repeat in range(entry.repeats))
        new = []
        while chunk := list(itertools.islice(rows, JOBS_PER_STATEMENT)):
            new += conn.execute(
                # A job made already inserts nothing and takes no job id.
                """insert into jobs (fingerprint, submission_id, miner_hotkey, miner_uid,
                       hf_repo_id, hf_repo_commit, commit_block, random_seed, suite_entry,
                       env_provider, env_name, suite_repeat, suite_weight, max_retries)
                   select s.fingerprint, s.submission_id, s.hotkey, s.uid, s.repo_id,
                          s.revision, s.block, s.seed, s.entry, s.provider, s.env, s.repeat,
                          s.weight, %s
                   from unnest(%b::text[], %b::bigint[], %b::text[], %b::integer[], %b::text[],
                               %b::text[], %b::bigint[], %b::bigint[], %b::integer[],
                               %b::text[], %b::text[], %b::integer[], %b::float8[])
                        with ordinality
                        as s(fingerprint, submission_id, hotkey, uid, repo_id, revision, block,
                             seed, entry, provider, env, repeat, weight, n)
                   where not exists (select 1 from jobs j where j.fingerprint = s.fingerprint
                                     and j.suite_entry = s.entry and j.suite_repeat = s.repeat)
                   order by s.n
                   returning job_id, priority, position, miner_hotkey, fingerprint""",
                (self.cfg.jobs.max_retries, *[list(column) for column in zip(*chunk)])
            ).fetchall()
        return new


def suite_of(cfg):
    """The suite a new submission is evaluated on: [[jobs.suite]], or without it one entry
    of [jobs] env_provider and env_name, one repeat, weight 1."""
    jobs = cfg.jobs
    return jobs.suite or [types.SimpleNamespace(env_provider=jobs.env_provider,
                                                env_name=jobs.env_name, repeats=1, weight=1.0)]


# ---------------------------------------------------------------------------------------------
# Statistics: getStats, the children's counters, and the queue's gauges for Prometheus
# ---------------------------------------------------------------------------------------------

class Retention:
    """A finished job's result text is kept `result_retention_days`; then it is replaced by
    what scores.py needs (its score under score_key, None if it had none) and the SHA-256 of
    the text, beside its proof (signature, hotkey, attempt). Pruned in statements of BATCH
    jobs, each its own transaction, oldest first. docs/security.md says what a proof proves
    once its text is gone."""

    BATCH = 1000
    EVERY = 3600.0  # seconds between prunes

    def __init__(self, db, cfg, fenced):
        self.db, self.cfg, self.fenced = db, cfg, fenced
        self.next = time.monotonic()

    def maybe_prune(self):
        if self.cfg.result_retention_days and time.monotonic() >= self.next:
            self.next = time.monotonic() + self.EVERY
            pruned = self.prune()
            if pruned:
                log.info("Kept the score and digest of %d results finished over %g days ago; "
                         "their text is deleted (result_retention_days)", pruned,
                         self.cfg.result_retention_days)

    def prune(self):
        """Prune every result past its retention; returns how many."""
        total = 0
        while True:
            with self.fenced() as conn:
                rows = conn.execute(
                    """select job_id, result from jobs where result is not null
                           and status in ('completed', 'failed')
                           and finished_at < now() - make_interval(secs => %s)
                       order by finished_at limit %s for update skip locked""",
                    (self.cfg.result_retention_days * 86400, self.BATCH)).fetchall()
                if not rows:
                    return total
                digests = [hashlib.sha256(row["result"].encode()).hexdigest() for row in rows]
                kept = [scores.job_score(row["result"], self.cfg.weights.score_key)[0]
                        for row in rows]
                conn.execute(
                    """update jobs set result = null, result_pruned_at = now(),
                           result_sha256 = p.digest, result_score = p.score
                       from unnest(%b::bigint[], %b::text[], %b::float8[]) as p(job_id, digest,
                                                                              score)
                       where jobs.job_id = p.job_id""",
                    ([row["job_id"] for row in rows], digests, kept))
            total += len(rows)


CHECK_OUTCOMES = ("open", "agreed", "settled", "disagreed", "void")  # crosschecks.py


class Statistics:
    """getStats' statistics, and the children's counters that the pusher sizes its pushes by:
    read from the database at each call, so that they always agree with it."""

    def __init__(self, db, cfg, verifier, leadership):
        self.db, self.cfg, self.verifier, self.leadership = db, cfg, verifier, leadership

    def children(self):
        now = time.time()
        rows = self.db.query(
            """select c.child_id, c.endpoint, c.last_seen,
                 greatest(c.resting_until - %s, 0)::float8 as resting_seconds,
                 c.transient_in_a_row,
                 (select count(*) from jobs j
                   where j.child_id = c.child_id and j.status = 'assigned') as active_jobs,
                 (select count(*) from assignments a where a.child_id = c.child_id)
                   as total_jobs_sent,
                 (select count(*) from assignments a where a.child_id = c.child_id
                   and a.outcome in ('completed', 'failed')) as total_jobs_completed,
                 k.cross_checks, k.cross_check_agreements,
                 k.cross_checks - k.cross_check_agreements as cross_check_disagreements,
                 c.quarantined_at is not null as quarantined, c.quarantine_reason
               from children c cross join lateral (
                   select count(*) as cross_checks,
                          count(*) filter (where agreed) as cross_check_agreements
                   from child_checks where child_id = c.child_id) k
               order by c.child_id""", (now,))
        return [dict(row, active=now - row["last_seen"] < self.cfg.child_timeout_seconds)
                for row in rows]

    def stats(self):
        """The seed design's statistics, plus the queue by priority, its oldest job's age, the
        number of failed jobs and of cancelled ones by reason, the submissions with an open job,
        and this parent's role: "active" or "standby" (which reads the same database), with
        the active parent's host:port."""
        children = self.children()
        leader = self.db.query("select epoch, endpoint from leadership")[0]
        queue = self.db.query(
            """select priority, count(*) as n, extract(epoch from now() - min(created_at))
                 as oldest from jobs where status = 'pending' group by priority""")
        failed = self.db.query("select count(*) as n from jobs where status = 'failed'")[0]["n"]
        # A submission is open while any of its jobs (one per entry and repeat) is.
        submissions = self.db.query(
            "select count(distinct fingerprint) as n from jobs "
            "where status in ('pending', 'assigned')")[0]["n"]
        # Before reasons were recorded only an operator could cancel a job.
        cancelled = self.db.query(
            "select coalesce(cancel_reason, 'operator') as reason, count(*) as n from jobs "
            "where status = 'cancelled' group by 1 order by 1")
        checks = self.db.query("select coalesce(outcome, 'open') as outcome, count(*) as n "
                               "from cross_checks group by 1")
        return {
            "total_children": len(children),
            "active_children": sum(c["active"] for c in children),
            "pending_jobs": sum(row["n"] for row in queue),
            "children": [{key: c[key] for key in (
                "child_id", "endpoint", "active", "last_seen", "active_jobs",
                "total_jobs_sent", "total_jobs_completed", "resting_seconds",
                "transient_in_a_row", "cross_checks", "cross_check_agreements",
                "cross_check_disagreements", "quarantined", "quarantine_reason")}
                for c in children],
            "pending_by_priority": {str(row["priority"]): row["n"] for row in
                                    sorted(queue, key=lambda r: -r["priority"])},
            "oldest_pending_age": max((float(row["oldest"]) for row in queue), default=None),
            "failed_jobs": failed,
            "open_submissions": submissions,
            "cancelled_jobs": {row["reason"]: row["n"] for row in cancelled},
            "cross_checks": {outcome: next((row["n"] for row in checks
                                            if row["outcome"] == outcome), 0)
                             for outcome in CHECK_OUTCOMES},
            "auth_failures": self.verifier.failures if self.verifier else 0,
            "role": "active" if not self.leadership or self.leadership.active() else "standby",
            "active_parent": leader["endpoint"],
            "leadership_epoch": leader["epoch"],
        }


class QueueMetrics:
    """The queue's gauges for Prometheus, read from the database at each scrape, so that they
    always agree with it."""

    def __init__(self, statistics):
        self.statistics = statistics

    def collect(self):
        try:
            stats = self.statistics.stats()
        except common.DatabaseUnavailable:
            return
        pending = GaugeMetricFamily("validator_jobs_pending", "Pending jobs, by priority",
                                    labels=["priority"])
        for priority, count in stats["pending_by_priority"].items():
            pending.add_metric([priority], count)
        assigned = GaugeMetricFamily("validator_jobs_assigned", "Jobs each child holds",
                                     labels=["child"])
        resting = GaugeMetricFamily("validator_child_resting",
                                    "1 while a child rests after transient failures in a row",
                                    labels=["child"])
        quarantined = GaugeMetricFamily(
            "validator_child_quarantined", "1 while a child is quarantined by its cross-checks",
            labels=["child"])
        child_checks = CounterMetricFamily(
            "validator_child_cross_checks", "Each child's settled cross-checks, agreed or not",
            labels=["child", "outcome"])
        for child in stats["children"]:
            assigned.add_metric([child["child_id"]], child["active_jobs"])
            resting.add_metric([child["child_id"]], 1 if child["resting_seconds"] else 0)
            quarantined.add_metric([child["child_id"]], 1 if child["quarantined"] else 0)
            child_checks.add_metric([child["child_id"], "agreed"],
                                    child["cross_check_agreements"])
            child_checks.add_metric([child["child_id"], "disagreed"],
                                    child["cross_check_disagreements"])
        checks = CounterMetricFamily("validator_cross_checks", "Cross-checks, by outcome",
                                     labels=["outcome"])
        for outcome, count in stats["cross_checks"].items():
            if outcome != "open":
                checks.add_metric([outcome], count)
        yield GaugeMetricFamily("validator_cross_checks_open", "Cross-checks not settled yet",
                                value=stats["cross_checks"]["open"])
        cancelled = GaugeMetricFamily("validator_jobs_cancelled", "Cancelled jobs, by reason",
                                      labels=["reason"])
        for reason, count in stats["cancelled_jobs"].items():
            cancelled.add_metric([reason], count)
        yield from (pending, assigned, resting, quarantined, child_checks, checks, cancelled)
        yield GaugeMetricFamily("validator_oldest_pending_age_seconds",
                                "Age of the oldest pending job",
                                value=stats["oldest_pending_age"] or 0.0)
        yield GaugeMetricFamily("validator_active_children", "Children seen lately",
                                value=stats["active_children"])


# ---------------------------------------------------------------------------------------------
# Leadership: of the parents that share one database, one is active and the others stand by
# ---------------------------------------------------------------------------------------------

LEADERSHIP_LOCK = 7340513  # the advisory lock the active parent holds (7340512 guards the DDL)
STANDBY_RETRY_SECONDS = 1.0  # a standby tries to take the lock this often


class Leadership:
    """The active parent holds an advisory lock on a connection of its own. When its process
    or that connection dies, PostgreSQL releases the lock and a standby takes it: a takeover
    raises the epoch in the leadership table. Every transaction that hands out, records or gives
    back a job checks the epoch under a share lock (fence), so a parent that lost the lock
    without knowing it (frozen, cut off, then back) writes nothing, and a takeover waits for
    the transactions of the old epoch still running (at most leader_timeout_seconds: the
    parent's connections are closed by the server when idle in a transaction that long).

    The server notices a vanished machine by TCP keepalives on the lock connection, set to
    give up after about leader_timeout_seconds; a dead process closes its socket at once."""

    def __init__(self, dsn, endpoint, timeout):
        self.dsn, self.endpoint, self.timeout = dsn, endpoint, timeout
        self.conn = None  # the lock connection: tries to take the lock, then holds it
        self.epoch = None  # the epoch this parent leads; None while a standby
        self.active_parent = ""  # host:port of the active parent, as last read

    def active(self):
        return self.epoch is not None

    def _connect(self):
        idle, interval = max(1, int(self.timeout / 2)), max(1, int(self.timeout / 6))
        conn = common.connect(self.dsn, application_name="validator parent leadership",
                              keepalives=1, keepalives_idle=idle,
                              keepalives_interval=interval, keepalives_count=3,
                              tcp_user_timeout=int(self.timeout * 1000))
        # The same on the server's side of the socket: it drops a vanished parent's session.
        conn.execute(f"set tcp_keepalives_idle = {idle}; "
                     f"set tcp_keepalives_interval = {interval}; set tcp_keepalives_count = 3; "
                     f"set tcp_user_timeout = {int(self.timeout * 1000)}; "
                     f"set statement_timeout = {int(self.timeout * 3000)}")
        return conn

    def take(self):
        """Try to become the active parent; True if this parent now is."""
        try:
            if self.conn is None or self.conn.closed or self.conn.broken:
                self.conn = self._connect()
            with self.conn.transaction():
                if not self.conn.execute("select pg_try_advisory_lock(%s) as got",
                                         (LEADERSHIP_LOCK,)).fetchone()["got"]:
                    self.active_parent = self.conn.execute(
                        "select endpoint from leadership").fetchone()["endpoint"]
                    return False
                previous = self.conn.execute(
                    "select epoch, endpoint from leadership for update").fetchone()
                self.conn.execute("update leadership set epoch = epoch + 1, endpoint = %s, "
                                  "since = now()", (self.endpoint,))
        except psycopg.Error as e:
            self._drop()
            raise common.DatabaseUnavailable(f"leadership: {first_line(e)}") from None
        self.epoch, self.active_parent = previous["epoch"] + 1, self.endpoint
        PARENT_ACTIVE.set(1)
        log.info("Leadership taken: this parent (%s) is active, epoch %d; the previous active "
                 "parent was %s", self.endpoint, self.epoch, previous["endpoint"] or "none")
        return True

    def confirm(self):
        """While active: None if this parent still holds the lock and leads the epoch, else
        why not."""
        try:
            row = self.conn.execute("select epoch, endpoint from leadership").fetchone()
        except psycopg.Error as e:
            return f"lost the connection that holds the leadership lock ({first_line(e)})"
        if row["epoch"] != self.epoch:
            return f"parent {row['endpoint']} took over (epoch {row['epoch']})"
        return None

    def step_down(self, reason):
        log.warning("Leadership lost: %s; this parent stops serving jobs and is a standby",
                    reason)
        self.epoch, self.active_parent = None, ""  # the next try to take over reads it
        PARENT_ACTIVE.set(0)
        self._drop()

    def resign(self):
        self.epoch = None
        self._drop()
        log.info("Leadership released: a standby may take over")

    def _drop(self):
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()  # releases the lock if the session still holds it
        self.conn = None

    def fence(self, conn):
        """In a transaction that hands out, records or gives back a job: refuse it unless
        this parent leads the current epoch. The share lock makes a takeover wait for it."""
        row = conn.execute("select epoch, endpoint from leadership for share").fetchone()
        if self.epoch is None or row["epoch"] != self.epoch:
            raise common.Standby(standby_message(row["endpoint"]))

    def refuse_unless_active(self):
        if self.epoch is None:
            raise common.Standby(standby_message(self.active_parent))


def standby_message(active_parent):
    return f"standby: this parent is a standby; the active parent is {active_parent or 'unknown'}"


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------------
# The pusher: receiveJob, the seed's direct send, with push_jobs = true
# ---------------------------------------------------------------------------------------------

class Pusher:
    """With push_jobs = true: send pending jobs straight to the active children with the most
    free capacity (receiveJob, the seed's direct send). A refused or failed push leaves the job
    pending for the next pull, and that child is left alone until the next round."""

    def __init__(self, state, rpc, tls=None):
        self.state, self.rpc, self.tls = state, rpc, tls
        self.clients = {}  # endpoint -> RpcClient

    def client(self, endpoint):
        if endpoint not in self.clients:
            host, port = common.split_endpoint(endpoint)
            self.clients[endpoint] = RpcClient(self.rpc, host, port, timeout=2.0,
                                                      tls=self.tls)
        return self.clients[endpoint]

    def push(self):
        cap = self.state.cfg.max_jobs_per_child
        free = {c["child_id"]: [cap - c["active_jobs"], c["endpoint"]]
                for c in self.state.statistics.children()
                if c["active"] and not c["resting_seconds"] and not c["quarantined"]}
        while free and len(self.state.queue):
            child_id = max(free, key=lambda k: free[k][0])
            room, endpoint = free[child_id]
            if room <= 0:
                return
            queued = len(self.state.queue)
            rows = self.state.assign(child_id, 1)
            if not rows:
                if len(self.state.queue) >= queued:  # only jobs this child failed lately
                    del free[child_id]
                continue
            job = rows[0]
            signed = {}
            if self.state.identity:
                signed = dict(zip(("timestamp", "nonce", "signature"), self.state.identity.sign(
                    *auth.push_fields(child_id, job["job_id"]))))
            try:
                reply = self.client(endpoint).call(
                    "receiveJob", job=job_message(job, child_id, self.state.identity), **signed)
                accepted, message = reply["accepted"], reply["message"]
            except PeerUnavailable as e:
                accepted, message = False, str(e)
            if accepted:
                free[child_id][0] -= 1
                latency = time.time() - job["created_at"].timestamp()
                log.info("Pushed job %d to child %s, %.0f ms after it was created",
                         job["job_id"], child_id, latency * 1000)
            else:
                self.state.withdraw(job)
                del free[child_id]
                log.info("Push of job %d to child %s refused (%s); it stays pending",
                         job["job_id"], child_id, message)


# ---------------------------------------------------------------------------------------------
# The operator's commands: list and steer jobs (python validator.py jobs | requeue | cancel)
# ---------------------------------------------------------------------------------------------

def list_jobs(db, status=None):
    """The jobs, each with its attempts ({attempt, child_id, outcome, reason}: at most
    maxRetries + 1, so at most 256 a job), and the proof of each result recorded with auth on:
    the child's signature (hex) over auth.result_fields, its hotkey and the attempt, for anyone
    to check."""
    return db.query(
        """select job_id, miner_hotkey, hf_repo_id, hf_repo_commit, status, priority, child_id,
                  (select coalesce(json_agg(json_build_object(
                              'attempt', a.attempt, 'child_id', a.child_id,
                              'outcome', a.outcome, 'reason', a.reason) order by a.attempt),
                          '[]')
                   from assignments a where a.job_id = jobs.job_id) as attempts,
                  extract(epoch from now() - created_at) as age, result,
                  encode(result_signature, 'hex') as result_signature, result_hotkey,
                  result_attempt, extract(epoch from retry_at - now()) as retry_in
           from jobs where %(status)s::text is null or status = %(status)s
           order by job_id""", {"status": status})


def requeue_job(db, job_id, priority=None):
    """Put a job back at the front of its priority's queue (optionally with a new priority),
    whatever its state; the child holding it can no longer record a result."""
    with db.transaction() as conn:
        row = conn.execute(
            """update jobs set status = 'pending', child_id = null, position = %s,
                   priority = coalesce(%s, priority), success = null, result = null,
                   finished_at = null, retry_at = null
               where job_id = %s returning priority""",
            (returned_position(), priority, job_id)).fetchone()
        if not row:
            raise Refused(f"no job {job_id}")
        _close_assignment(conn, job_id)
    return f"job {job_id} is pending with priority {row['priority']}"


def cancel_job(db, job_id):
    """Cancel a pending or assigned job; its holder stops it at its next poll."""
    with db.transaction() as conn:
        row = conn.execute("select status from jobs where job_id = %s for update",
                           (job_id,)).fetchone()
        if not row:
            raise Refused(f"no job {job_id}")
        if row["status"] not in ("pending", "assigned"):
            raise Refused(f"job {job_id} is {row['status']}: only pending or assigned jobs "
                          "can be cancelled")
        cancel_jobs(conn, "operator", "select %s::bigint, 'cancelled by the operator'",
                    (job_id,))
        _close_assignment(conn, job_id)
    return f"job {job_id} is cancelled"


def cancel_jobs(conn, kind, doomed, params):
    """Cancel the jobs that the query `doomed` selects as (job_id, reason), if they are still
    pending or assigned: kind ('operator', 'superseded' or 'deregistered') is counted by the
    statistics, the reason goes in the result as {"cancelled": reason}. Their holders are told
    at their next poll (see ParentState.poll). Returns [(job id, reason)]."""
    rows = conn.execute(
        f"""with doomed(job_id, reason) as ({doomed}),
            cancelled as (
                update jobs set status = 'cancelled', cancel_reason = %s, finished_at = now(),
                    result = jsonb_build_object('cancelled', doomed.reason)::text
                from doomed
                -- checked again on the row itself: a result recorded meanwhile stays
                where jobs.job_id = doomed.job_id and jobs.status in ('pending', 'assigned')
                returning jobs.job_id, doomed.reason),
            closed as (
                update assignments set finished_at = now(), outcome = 'withdrawn'
                from cancelled where assignments.job_id = cancelled.job_id
                    and assignments.finished_at is null)
            select job_id, reason from cancelled order by job_id""",
        (*params, kind)).fetchall()
    return [(row["job_id"], row["reason"]) for row in rows]


def _close_assignment(conn, job_id):
    conn.execute("update assignments set finished_at = now(), outcome = 'withdrawn' "
                 "where job_id = %s and finished_at is null", (job_id,))
    # The running parent rebuilds its queue when this number changes.
    conn.execute("insert into chain_state values ('queue_version', 1) on conflict (key) "
                 "do update set value = chain_state.value + 1")


if __name__ == "__main__":
    raise SystemExit(main())
