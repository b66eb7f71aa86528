"""The parent validator: reads miners' commitments from the chain, turns each new one into an
evaluation job, and hands jobs to child validators over Cap'n Proto RPC.

Its life, top to bottom: the database schema; ParentState, the one shared state behind every
RPC connection (PostgreSQL is the truth, an in-memory queue mirrors the pending jobs, and
Arrivals wakes the polls of idle children held open until a job comes), with its leases and
the optional pusher; the operator's commands; the RPC service; and run(), the loop that reads
the chain (chain.py) every sync_frequency seconds and looks after the leases every second.

    python parent.py --config validator_parent.toml
"""

import asyncio
import contextlib
import hashlib
import heapq
import json
import re
import threading
import time

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from psycopg.rows import tuple_row

import chain as chains
import common
from common import Refused, log

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
"""]


def fingerprint(hotkey, repo_id, revision):
    return hashlib.sha256(f"{hotkey}\n{repo_id}\n{revision}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The shared state behind every RPC connection and the chain loop
# ---------------------------------------------------------------------------------------------

def job_message(row):
    """A jobs row as an EvaluationJobData message."""
    return {
        "jobId": row["job_id"], "submissionId": row["submission_id"],
        "minerHotkey": row["miner_hotkey"], "hfRepoId": row["hf_repo_id"],
        "hfRepoCommit": row["hf_repo_commit"], "envProvider": row["env_provider"],
        "envName": row["env_name"], "logsPath": f"job-{row['job_id']}.log",
        "randomSeed": row["random_seed"], "maxRetries": row["max_retries"],
        "retryCount": max(0, row["attempts"] - 1),
        "createdAt": int(row["created_at"].timestamp() * 1000),
    }


def replies_message(answers):
    """(acknowledged, message) pairs as ReportReply messages."""
    return [{"acknowledged": a, "message": m} for a, m in answers]


REDELIVERY_GRACE_SECONDS = 10.0  # longer than a push (receiveJob) may take
MAX_RESULTS_PER_REPORT = 1000  # one reportJobCompletions call: one transaction of this size
MAX_HELD_JOBS = 10_000  # ids in one requestJobs' heldJobs: a child holds far fewer
MAX_WAIT_SECONDS = 5.0  # a requestJobs call is held at most this long (its waitMs)

JOBS_FINISHED = prometheus_client.Counter(
    "validator_jobs_finished", "Jobs that ended, by outcome", ["outcome"])
JOBS_RETURNED = prometheus_client.Counter(
    "validator_jobs_returned", "Jobs given back to the queue by an expired lease, by reason",
    ["reason"])
REPORTS_IGNORED = prometheus_client.Counter(
    "validator_reports_ignored", "Late or foreign results, acknowledged but not recorded")
CHAIN_READS = prometheus_client.Histogram("validator_chain_read_seconds", "Chain reads")
CHAIN_FAILURES = prometheus_client.Counter("validator_chain_read_failures", "Failed chain reads")


def returned_position():
    """Queue position of a job given back: ahead of every new job of its priority (those have
    position 0 and go by job id), behind the jobs given back before it."""
    return int(time.time() * 1000) - 2**53


def queue_entry(row):
    return (-row["priority"], row["position"], row["job_id"])


class PendingQueue:
    """The pending jobs in serving order: highest priority first, then jobs given back, then by
    job id. It mirrors the jobs table; a stale entry (a job cancelled meanwhile) is harmless,
    because a job is handed out only if the database still says it is pending. on_push() is
    called after jobs were added."""

    def __init__(self, entries=(), on_push=None):
        self.heap = list(entries)  # (-priority, position, job_id), as queue_entry() makes
        heapq.heapify(self.heap)
        self.on_push = on_push

    def push(self, entries):
        size = len(self.heap)
        for entry in entries:
            heapq.heappush(self.heap, entry)
        if len(self.heap) > size and self.on_push:
            self.on_push()

    def pop(self, count):
        return [heapq.heappop(self.heap) for _ in range(min(count, len(self.heap)))]

    def __len__(self):
        return len(self.heap)

    def ids(self):
        """The job ids in serving order."""
        return [job_id for *_, job_id in sorted(self.heap)]


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


class ParentState:
    def __init__(self, db, cfg, identity=None, verifier=None):
        self.db, self.cfg = db, cfg
        self.identity, self.verifier = identity, verifier  # None, None: auth is off
        # Guards the queue. Taken inside a database transaction, never around one: no deadlock.
        self.lock = threading.Lock()
        self.started = time.time()
        self.skipped = set()  # bad commitments already logged, so each is logged once
        self.arrivals = Arrivals()
        self.queue, self.queue_version = PendingQueue(), None
        self.reload_queue()

    def reload_queue(self):
        """Rebuild the queue from the database at start and whenever an operator changed it."""
        rows = self.db.query("select value from chain_state where key = 'queue_version'")
        version = rows[0]["value"] if rows else 0
        if version == self.queue_version:
            return
        with self.db.transaction() as conn, self.lock:
            # Plain tuples, not dict rows: a million pending jobs must stay cheap to hold.
            cursor = conn.cursor(row_factory=tuple_row)
            self.queue = PendingQueue(cursor.execute(
                "select -priority, position, job_id from jobs where status = 'pending'"),
                self.arrivals.notify)
        if self.queue:
            self.arrivals.notify()
        if self.queue or self.queue_version is not None:
            log.info("Loaded %d pending jobs from the database", len(self.queue))
        self.queue_version = version

    # -- chain side --------------------------------------------------------------------------

    def add_commitments(self, snapshot):
        """Create a job for every new, eligible commitment in the snapshot. Each job and its
        fingerprint are written in one transaction, with the block reached, so a crash never
        loses a commitment nor makes it twice. Returns the new job ids."""
        neuron = self.cfg.neuron
        with self.db.transaction() as conn:
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
                    repo_id, revision = chains.parse_commitment(c.data)
                except ValueError as e:
                    if (c.hotkey, c.data) not in self.skipped:
                        self.skipped.add((c.hotkey, c.data))
                        log.warning("Skipping commitment of %s at block %d: %s",
                                    c.hotkey, c.block, e)
                    continue
                digest = fingerprint(c.hotkey, repo_id, revision)
                eligible.setdefault(digest, (c, repo_id, revision))
            new = self._insert_jobs(conn, eligible) if eligible else []
            conn.execute("insert into chain_state values ('last_block', %s) on conflict (key) "
                         "do update set value = greatest(chain_state.value, excluded.value)",
                         (snapshot.block,))
        with self.lock:
            self.queue.push(queue_entry(job) for job in new)
        for job in new:
            log.info("New job %d for miner %s: %s@%s (block %d)", job["job_id"],
                     job["miner_hotkey"], job["hf_repo_id"], job["hf_repo_commit"] or "default",
                     job["commit_block"])
        return [job["job_id"] for job in new]

    def _insert_jobs(self, conn, eligible):
        """Insert a job for each {fingerprint: (commitment, repo id, revision)} not known yet,
        in the snapshot's order, in one statement; returns the new jobs' rows."""
        jobs = self.cfg.jobs
        columns = list(zip(*((digest, int(digest[:15], 16), c.hotkey, c.uid, repo_id, revision,
                              c.block, int(digest[16:24], 16))
                             for digest, (c, repo_id, revision) in eligible.items())))
        return conn.execute(
            # A known fingerprint inserts nothing and takes no job id.
            """insert into jobs (fingerprint, submission_id, miner_hotkey, miner_uid, hf_repo_id,
                   hf_repo_commit, commit_block, env_provider, env_name, random_seed, max_retries)
               select s.fingerprint, s.submission_id, s.hotkey, s.uid, s.repo_id, s.revision,
                      s.block, %s, %s, s.seed, %s
               from unnest(%b::text[], %b::bigint[], %b::text[], %b::integer[], %b::text[],
                           %b::text[], %b::bigint[], %b::bigint[]) with ordinality
                    as s(fingerprint, submission_id, hotkey, uid, repo_id, revision, block, seed,
                         n)
               where not exists (select 1 from jobs j where j.fingerprint = s.fingerprint)
               order by s.n
               returning *""",
            (jobs.env_provider, jobs.env_name, jobs.max_retries,
             *[list(column) for column in columns])).fetchall()

    # -- leases: jobs come back from children that vanish or take too long --------------------

    def expire_leases(self):
        """Give back the jobs of children unseen for child_timeout_seconds and jobs assigned
        longer than job_timeout_seconds. Each return uses an attempt; a job that has used
        more than maxRetries of them ends failed with the reason."""
        cfg, now = self.cfg, time.time()
        # After a restart every child looks unseen: give them child_timeout to come back.
        lost_before = now - cfg.child_timeout_seconds \
            if now - self.started >= cfg.child_timeout_seconds else 0
        returned = []
        with self.db.transaction() as conn:
            rows = conn.execute(
                """select j.job_id, j.child_id, j.attempts, j.max_retries, j.priority,
                          c.last_seen < %s as child_lost
                   from jobs j join children c on c.child_id = j.child_id
                   where j.status = 'assigned' and (c.last_seen < %s or
                         j.assigned_at < now() - make_interval(secs => %s))
                   for update of j""",
                (lost_before, lost_before, cfg.job_timeout_seconds)).fetchall()
            for row in rows:
                reason = (f"child {row['child_id']} unseen for {cfg.child_timeout_seconds:g}s"
                          if row["child_lost"] else
                          f"not finished within {cfg.job_timeout_seconds:g}s")
                JOBS_RETURNED.labels("child_lost" if row["child_lost"] else "timeout").inc()
                entry = self._give_back(conn, row, reason)
                if entry:
                    returned.append(entry)
        with self.lock:
            self.queue.push(returned)

    def _give_back(self, conn, row, reason):
        conn.execute("update assignments set finished_at = now(), outcome = 'expired' "
                     "where job_id = %s and attempt = %s", (row["job_id"], row["attempts"]))
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

    # -- RPC side (each call runs on a worker thread of the RPC loop) --------------------------

    def register_child(self, child_id, endpoint, hotkey="", peer="an unknown address"):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", child_id):
            raise Refused("childId must be 1-64 letters, digits, '_', '.' or '-'")
        try:
            common.split_endpoint(endpoint)
        except ValueError as e:
            raise Refused(str(e)) from None
        # A child that registers again keeps its id, its counters and the jobs it holds; an id
        # first registered with a hotkey stays with that hotkey.
        if not self.db.query(
                """insert into children (child_id, endpoint, last_seen, hotkey)
                   values (%s, %s, %s, %s)
                   on conflict (child_id) do update set endpoint = excluded.endpoint,
                       last_seen = excluded.last_seen, hotkey = excluded.hotkey
                   where children.hotkey in ('', excluded.hotkey) returning 1""",
                (child_id, endpoint, time.time(), hotkey)):
            self.verifier.refuse(f"registration of {child_id!r}",  # only with auth on
                                 f"the id belongs to another hotkey than {hotkey}", peer)
        log.info("Child %s registered from %s", child_id, endpoint)
        return f"registered as {child_id}"

    def _seen(self, conn, child_id):
        """Note that the child is alive; returns how many jobs it holds."""
        row = conn.execute(
            """update children set last_seen = %s where child_id = %s returning
               (select count(*) from jobs where child_id = %s and status = 'assigned') as held""",
            (time.time(), child_id, child_id)).fetchone()
        if not row:
            raise Refused(f"unknown child {child_id!r}: call registerChild first")
        return row["held"]

    def assign(self, child_id, count):
        """Take up to `count` jobs off the queue and record them as the child's, before they
        leave. If the transaction fails the jobs go back on the queue. `count` may be a
        function of the transaction's connection, to decide in the same transaction."""
        taken = []
        try:
            with self.db.transaction() as conn:
                if callable(count):
                    count = count(conn)
                with self.lock:
                    taken = self.queue.pop(count)
                if not taken:
                    return []
                rows = conn.execute(
                    """update jobs set status = 'assigned', child_id = %s,
                           attempts = attempts + 1, assigned_at = now()
                       where job_id = any(%b) and status = 'pending'
                       returning *""", (child_id, [job_id for *_, job_id in taken])).fetchall()
                conn.execute("insert into assignments (job_id, attempt, child_id) "
                             "select unnest(%b::bigint[]), unnest(%b::integer[]), %s",
                             ([r["job_id"] for r in rows], [r["attempts"] for r in rows],
                              child_id))
        except BaseException:
            with self.lock:
                self.queue.push(taken)
            raise
        return sorted(rows, key=queue_entry)

    def request_jobs(self, child_id, max_jobs, held_ids=None):
        """A child's poll without results: see poll(); returns the jobs."""
        return self.poll(child_id, max_jobs, held_ids)[0]

    def poll(self, child_id, max_jobs, held_ids=None, results=()):
        """A child's poll: its results, [(job_id, success, result)], recorded first (see
        report_completions), then up to max_jobs, within max_jobs_per_child; 0 is a heartbeat.
        If the child says which jobs it holds (held_ids), jobs assigned to it that it lacks
        (an answer lost when a connection or the parent died) are sent again first. All in
        one transaction. Returns (jobs, one (acknowledged, message) per result)."""
        lost, recorded = [], []

        def room(conn):
            recorded[:] = [self._record(conn, child_id, results)] if results else []
            held = self._seen(conn, child_id)
            # A job assigned moments ago may be a push still on its way to the child.
            lost[:] = [] if held_ids is None else conn.execute(
                """select * from jobs where child_id = %s and status = 'assigned'
                   and not job_id = any(%b) and assigned_at < now() - make_interval(secs => %s)
                   order by job_id""",
                (child_id, list(held_ids), REDELIVERY_GRACE_SECONDS)).fetchall()
            return min(max_jobs - len(lost), self.cfg.max_jobs_per_child - held)

        rows = self.assign(child_id, room)
        answers = self._answers(child_id, results, *recorded[0]) if results else []
        if lost:
            log.warning("Child %s lacks %d of its jobs (%s): sending them again", child_id,
                        len(lost), ", ".join(str(row["job_id"]) for row in lost))
        if rows:
            log.info("Sending %d jobs to child %s", len(rows), child_id)
        return [job_message(row) for row in lost + rows], answers

    def withdraw(self, row):
        """Undo an assignment that never reached the child (a refused push)."""
        with self.db.transaction() as conn:
            conn.execute("delete from assignments where job_id = %s and attempt = %s",
                         (row["job_id"], row["attempts"]))
            conn.execute("update jobs set status = 'pending', child_id = null, "
                         "attempts = attempts - 1 where job_id = %s and status = 'assigned'",
                         (row["job_id"],))
        with self.lock:
            self.queue.push([queue_entry(row)])

    def report_completion(self, child_id, job_id, success, result):
        """One result: see report_completions."""
        return self.report_completions(child_id, [(job_id, success, result)])[0]

    def report_completions(self, child_id, results):
        """Record a child's results, [(job_id, success, result)], in one transaction; returns
        one (acknowledged, message) per result. Only the child holding a job records its
        result; a repeated report of a recorded result is acknowledged again."""
        with self.db.transaction() as conn:
            self._seen(conn, child_id)
            outcome = self._record(conn, child_id, results)
        # Logged only once committed: the log never shows a result the database lacks.
        return self._answers(child_id, results, *outcome)

    def _record(self, conn, child_id, results):
        """Write the results that fit; returns what _answers needs to answer each."""
        sizes = [len(result.encode()) for _, _, result in results]
        # A job id past bigint, the type of jobs.job_id, is of no job (an error in an array).
        fits = [r for r, size in zip(results, sizes)
                if size <= self.cfg.max_result_bytes and r[0] < 2**63]
        recorded = {row["job_id"] for row in conn.execute(
            """with reported as (
                   select * from unnest(%b::bigint[], %b::boolean[], %b::text[])
                       as r(job_id, success, result)),
               finished as (
                   update jobs set status = case when reported.success then 'completed'
                                            else 'failed' end,
                       success = reported.success, result = reported.result,
                       finished_at = now()
                   from reported where jobs.job_id = reported.job_id
                       and jobs.status = 'assigned' and jobs.child_id = %s
                   returning jobs.job_id, jobs.attempts, jobs.status),
               closed as (
                   update assignments set finished_at = now(), outcome = finished.status
                   from finished where assignments.job_id = finished.job_id
                       and assignments.attempt = finished.attempts)
               select job_id from finished""",
            ([job_id for job_id, _, _ in fits], [success for _, success, _ in fits],
             [result for _, _, result in fits], child_id))}
        others = {row["job_id"]: row for row in conn.execute(
            "select job_id, status, child_id from jobs where job_id = any(%b)",
            ([job_id for job_id, _, _ in results if job_id < 2**63],))}
        return sizes, recorded, others

    def _answers(self, child_id, results, sizes, recorded, others):
        answers = []
        for (job_id, success, result), size in zip(results, sizes):
            if size > self.cfg.max_result_bytes:
                outcome = "too big", size
            elif job_id in recorded:
                outcome = "recorded", None
                recorded.discard(job_id)  # the same result twice in one call: once recorded
            else:
                outcome = "not held", others.get(job_id)
            answers.append(self._answer(child_id, job_id, success, result, *outcome))
        return answers

    def _answer(self, child_id, job_id, success, result, outcome, detail):
        if outcome == "too big":
            return False, (f"result of job {job_id} is {detail} bytes; the limit is "
                           f"{self.cfg.max_result_bytes} (max_result_bytes)")
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

    def children(self):
        now = time.time()
        rows = self.db.query(
            """select c.child_id, c.endpoint, c.last_seen,
                 (select count(*) from jobs j
                   where j.child_id = c.child_id and j.status = 'assigned') as active_jobs,
                 (select count(*) from assignments a where a.child_id = c.child_id)
                   as total_jobs_sent,
                 (select count(*) from assignments a where a.child_id = c.child_id
                   and a.outcome in ('completed', 'failed')) as total_jobs_completed
               from children c order by c.child_id""")
        return [dict(row, active=now - row["last_seen"] < self.cfg.child_timeout_seconds)
                for row in rows]

    def stats(self):
        """The seed design's statistics, plus the queue by priority, its oldest job's age and
        the number of failed jobs."""
        children = self.children()
        queue = self.db.query(
            """select priority, count(*) as n, extract(epoch from now() - min(created_at))
                 as oldest from jobs where status = 'pending' group by priority""")
        failed = self.db.query("select count(*) as n from jobs where status = 'failed'")[0]["n"]
        return {
            "total_children": len(children),
            "active_children": sum(c["active"] for c in children),
            "pending_jobs": sum(row["n"] for row in queue),
            "children": [{key: c[key] for key in (
                "child_id", "endpoint", "active", "last_seen", "active_jobs",
                "total_jobs_sent", "total_jobs_completed")} for c in children],
            "pending_by_priority": {str(row["priority"]): row["n"] for row in
                                    sorted(queue, key=lambda r: -r["priority"])},
            "oldest_pending_age": max((float(row["oldest"]) for row in queue), default=None),
            "failed_jobs": failed,
            "auth_failures": self.verifier.failures if self.verifier else 0,
        }


class QueueMetrics:
    """The queue's gauges for Prometheus, read from the database at each scrape, so that they
    always agree with it."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        try:
            stats = self.state.stats()
        except common.DatabaseUnavailable:
            return
        pending = GaugeMetricFamily("validator_jobs_pending", "Pending jobs, by priority",
                                    labels=["priority"])
        for priority, count in stats["pending_by_priority"].items():
            pending.add_metric([priority], count)
        assigned = GaugeMetricFamily("validator_jobs_assigned", "Jobs each child holds",
                                     labels=["child"])
        for child in stats["children"]:
            assigned.add_metric([child["child_id"]], child["active_jobs"])
        yield pending
        yield assigned
        yield GaugeMetricFamily("validator_oldest_pending_age_seconds",
                                "Age of the oldest pending job",
                                value=stats["oldest_pending_age"] or 0.0)
        yield GaugeMetricFamily("validator_active_children", "Children seen lately",
                                value=stats["active_children"])


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
            self.clients[endpoint] = common.RpcClient(self.rpc, host, port, timeout=2.0,
                                                      tls=self.tls)
        return self.clients[endpoint]

    def push(self):
        cap = self.state.cfg.max_jobs_per_child
        free = {c["child_id"]: [cap - c["active_jobs"], c["endpoint"]]
                for c in self.state.children() if c["active"]}
        while free and len(self.state.queue):
            child_id = max(free, key=lambda k: free[k][0])
            room, endpoint = free[child_id]
            if room <= 0:
                return
            rows = self.state.assign(child_id, 1)
            if not rows:
                continue
            job = rows[0]
            signed = {}
            if self.state.identity:
                signed = dict(zip(("timestamp", "nonce", "signature"), self.state.identity.sign(
                    "receiveJob", child_id, job["job_id"])))
            try:
                reply = self.client(endpoint).call("receiveJob", job=job_message(job), **signed)
                accepted, message = reply["accepted"], reply["message"]
            except common.PeerUnavailable as e:
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


# -- operators: list and steer jobs (python validator.py jobs | requeue | cancel) ---------------

def list_jobs(db, status=None):
    return db.query(
        """select job_id, miner_hotkey, hf_repo_id, hf_repo_commit, status, priority, child_id,
                  attempts, extract(epoch from now() - created_at) as age, result
           from jobs where %(status)s::text is null or status = %(status)s
           order by job_id""", {"status": status})


def requeue_job(db, job_id, priority=None):
    """Put a job back at the front of its priority's queue (optionally with a new priority),
    whatever its state; the child holding it can no longer record a result."""
    with db.transaction() as conn:
        row = conn.execute(
            """update jobs set status = 'pending', child_id = null, position = %s,
                   priority = coalesce(%s, priority), success = null, result = null,
                   finished_at = null
               where job_id = %s returning priority""",
            (returned_position(), priority, job_id)).fetchone()
        if not row:
            raise Refused(f"no job {job_id}")
        _close_assignment(conn, job_id)
    return f"job {job_id} is pending with priority {row['priority']}"


def cancel_job(db, job_id):
    with db.transaction() as conn:
        row = conn.execute("select status from jobs where job_id = %s for update",
                           (job_id,)).fetchone()
        if not row:
            raise Refused(f"no job {job_id}")
        if row["status"] not in ("pending", "assigned"):
            raise Refused(f"job {job_id} is {row['status']}: only pending or assigned jobs "
                          "can be cancelled")
        conn.execute("update jobs set status = 'cancelled', finished_at = now() "
                     "where job_id = %s", (job_id,))
        _close_assignment(conn, job_id)
    return f"job {job_id} is cancelled"


def _close_assignment(conn, job_id):
    conn.execute("update assignments set finished_at = now(), outcome = 'withdrawn' "
                 "where job_id = %s and finished_at is null", (job_id,))
    # The running parent rebuilds its queue when this number changes.
    conn.execute("insert into chain_state values ('queue_version', 1) on conflict (key) "
                 "do update set value = chain_state.value + 1")


# ---------------------------------------------------------------------------------------------
# The RPC service: one object per connection, all pointing at the one ParentState
# ---------------------------------------------------------------------------------------------

class ParentService(common.ServiceBase):
    """One per connection. With auth on, a connection serves only the child that registered
    on it, with a hotkey in allowed_child_hotkeys and a fresh signature; a call for any other
    child is refused before its parameters are decoded. With auth off, a call a child makes
    (registerChild, requestJobs, report...) that is answered registers the connection."""

    role = "parent"
    CHILD_METHODS = ("requestJobs", "reportJobCompletion", "reportJobCompletions")
    LIST_LIMITS = {"requestJobs": {"heldJobs": MAX_HELD_JOBS, "results": MAX_RESULTS_PER_REPORT},
                   "reportJobCompletions": {"results": MAX_RESULTS_PER_REPORT}}

    def __init__(self, state):
        super().__init__()
        self.state, self.child_id = state, None

    def precheck(self, method, params):
        verifier = self.state.verifier
        if verifier and method in self.CHILD_METHODS and params.childId != self.child_id:
            verifier.refuse(f"{method} for {params.childId!r}",
                            f"the connection is registered as {self.child_id!r}", self.peer)
        super().precheck(method, params)

    def registers(self, method):
        return method == "registerChild" or (
            not self.state.verifier and method in self.CHILD_METHODS)

    def register_child(self, childId, endpoint, hotkey="", timestamp=0, nonce="",
                       signature=b""):
        verifier = self.state.verifier
        if verifier:
            if hotkey not in self.state.cfg.allowed_child_hotkeys:
                verifier.refuse(f"registration of {childId!r}",
                                f"hotkey {hotkey!r} is not in allowed_child_hotkeys", self.peer)
            reason = verifier.check(hotkey, ["registerChild", childId, endpoint,
                                             self.state.identity.hotkey], timestamp, nonce,
                                    signature)
            if reason:
                verifier.refuse(f"registration of {childId!r}", reason, self.peer)
        message = self.state.register_child(childId, endpoint, hotkey if verifier else "",
                                            self.peer)
        self.child_id = childId
        return {"success": True, "message": message}

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
        with self.state.arrivals.watch() as arrived:
            jobs, replies = await asyncio.to_thread(
                self.state.poll, childId, maxJobs, heldJobs, results)
            while not jobs and maxJobs and await wait_until(arrived, deadline):
                arrived.clear()
                jobs, _ = await asyncio.to_thread(self.state.poll, childId, maxJobs, heldJobs)
        return {"jobs": jobs, "replies": replies_message(replies)}

    def report_job_completion(self, childId, jobId, success, result):
        acknowledged, message = self.state.report_completion(childId, jobId, success, result)
        return {"acknowledged": acknowledged, "message": message}

    def report_job_completions(self, childId, results=()):
        return {"replies": replies_message(
            self.state.report_completions(childId, self._results(results)))}

    @staticmethod
    def _results(results):
        return [(r.get("jobId", 0), r.get("success", False), r.get("result", ""))
                for r in results]

    def get_stats(self):
        return {"json": json.dumps(self.state.stats())}


# ---------------------------------------------------------------------------------------------
# Main: start the RPC service, then read the chain every sync_frequency seconds
# ---------------------------------------------------------------------------------------------

def run(cfg, stop):
    common.setup_logging(cfg)
    chain = chains.open_chain(cfg)
    db = common.Database(common.database_dsn(cfg, stop), SCHEMA)
    identity, verifier = common.hotkey_auth(cfg, cfg.parent_port)
    tls_server, tls_client = common.tls_contexts(cfg)
    state = ParentState(db, cfg, identity, verifier)
    if cfg.metrics_port:
        prometheus_client.REGISTRY.register(QueueMetrics(state))
        common.serve_metrics(cfg)
    rpc = common.RpcThread()
    port = rpc.serve(cfg.listen_host, cfg.parent_port, lambda: ParentService(state), cfg,
                     tls_server)
    log.info("Parent validator serving on %s:%d%s", cfg.listen_host, port,
             " (TLS 1.3)" if tls_server else "")
    pusher = Pusher(state, rpc, tls_client) if cfg.push_jobs else None
    sync = common.Outage("Chain sync failed", "Chain sync recovered", cfg.neuron.sync_frequency)
    upkeep = common.Outage("Queue upkeep failed", "Queue upkeep recovered", 30.0)
    next_sync = next_upkeep = time.monotonic()
    while not stop.is_set():
        if time.monotonic() >= next_sync:
            try:
                try:
                    with CHAIN_READS.time():
                        snapshot = chain.read()
                except chains.ChainUnavailable:
                    CHAIN_FAILURES.inc()
                    raise
                if state.add_commitments(snapshot) and pusher:
                    pusher.push()
                sync.succeeded()
                next_sync = time.monotonic() + cfg.neuron.sync_frequency
            except (chains.ChainUnavailable, common.DatabaseUnavailable) as e:
                next_sync = time.monotonic() + sync.failed(e)
        if time.monotonic() >= next_upkeep:
            # Leases, an operator's changes and pushes are checked every second, whatever
            # the chain's pace.
            try:
                state.expire_leases()
                state.reload_queue()
                if pusher:
                    pusher.push()
                upkeep.succeeded()
                next_upkeep = time.monotonic() + 1.0
            except common.DatabaseUnavailable as e:
                next_upkeep = time.monotonic() + upkeep.failed(e)
        stop.wait(max(0.0, min(next_sync, next_upkeep) - time.monotonic()))
    log.info("Parent validator stopping")
    rpc.stop()
    db.close()


def main(argv=None):
    return common.role_main(run, "Run the parent validator.", is_parent=True, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
