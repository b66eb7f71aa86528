"""The parent validator: reads miners' commitments from the chain, turns each new one into an
evaluation job, and hands jobs to child validators over Cap'n Proto RPC.

Its life, top to bottom: the database schema; the chain sources (a JSON file or the bittensor
SDK); ParentState, the one shared state behind every RPC connection (PostgreSQL is the truth, an
in-memory deque mirrors the pending jobs); the RPC service; and main(), the chain loop.

    python parent.py --config validator_parent.toml
"""

import collections
import dataclasses
import hashlib
import json
import re
import threading
import time

import common
from common import Refused, log

SCHEMA_SQL = """
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
    child_id       text,                     -- the child holding the job (or that finished it)
    attempts       integer not null default 0,
    created_at     timestamptz not null default now(),
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

-- One row per hand-over of a job to a child; the per-child counters are counted from here.
create table if not exists assignments (
    job_id      bigint not null references jobs,
    attempt     integer not null,
    child_id    text not null references children,
    assigned_at timestamptz not null default now(),
    finished_at timestamptz,
    primary key (job_id, attempt)
);
create index if not exists assignments_child on assignments (child_id);

create table if not exists chain_state (
    key   text primary key,
    value bigint not null
);
"""


# ---------------------------------------------------------------------------------------------
# The chain: a snapshot of every miner's latest commitment at one block
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Commitment:
    hotkey: str
    uid: int | None
    block: int      # block the commitment was published at
    stake: float    # in the subnet's stake units (alpha)
    data: str       # the raw text the miner committed


@dataclasses.dataclass(frozen=True)
class ChainSnapshot:
    block: int
    commitments: list


class ChainUnavailable(Exception):
    """The chain source could not be read this time; the loop retries with backoff."""


class FileChain:
    """A chain read from a JSON file that another process rewrites (write, then rename):
    {"block": N, "commitments": [{"hotkey", "uid", "block", "stake", "data"}, ...]}"""

    def __init__(self, path):
        self.path = path

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            return ChainSnapshot(int(doc["block"]), [
                Commitment(str(c["hotkey"]), c.get("uid"), int(c["block"]),
                           float(c.get("stake", 0.0)), str(c["data"]))
                for c in doc["commitments"]])
        except FileNotFoundError:
            raise ChainUnavailable(f"commitments file {self.path} does not exist") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ChainUnavailable(f"commitments file {self.path} is malformed: {e!r}") from None


class BittensorChain:
    """The real chain through the bittensor SDK: one metagraph read per sync (neurons, stakes
    and commitments at one block) on one reused connection. The only code importing bittensor."""

    def __init__(self, network, netuid):
        self.network, self.netuid = network, netuid
        self.subtensor = None

    def read(self):
        import bittensor
        try:
            if self.subtensor is None:
                self.subtensor = bittensor.Subtensor(self.network)
            graph = self.subtensor.subnets.metagraph(self.netuid)
        except Exception as e:  # the SDK raises many types for a node that is down or slow
            self.subtensor = None
            raise ChainUnavailable(f"chain {self.network}: {type(e).__name__}: {e}") from None
        if graph is None:
            raise ChainUnavailable(f"subnet {self.netuid} does not exist on {self.network}")
        return ChainSnapshot(graph.block, [
            Commitment(n.hotkey, n.uid, n.commitment.block, n.total_stake.amount,
                       n.commitment.value)
            for n in graph.neurons if n.commitment is not None and n.commitment.value])


def open_chain(cfg):
    sub = cfg.subtensor
    if sub.network == "file":
        if not sub.commitments_file:
            raise common.ConfigError(
                f"{cfg.config_path}: key 'subtensor.commitments_file' is required "
                'when subtensor.network = "file"')
        return FileChain(sub.commitments_file)
    return BittensorChain(sub.address or sub.network, sub.netuid)


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
REVISION = re.compile(r"[\w.-]{1,128}")


def parse_commitment(text):
    """A miner's commitment -> (repo_id, revision). Accepts the JSON miners commit,
    {"provider": "HF", "repo_id": "org/name", "revision": "<sha>"}, or "org/name@<sha>".
    A JSON commitment without a revision means the repo's default branch (revision "")."""
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("commitment is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ValueError("commitment JSON is not an object")
        if str(doc.get("provider", "HF")).upper() != "HF":
            raise ValueError(f"unsupported provider {doc.get('provider')!r}")
        repo_id, revision = doc.get("repo_id"), doc.get("revision", "")
    else:
        repo_id, _, revision = text.partition("@")
        if not revision:
            raise ValueError("commitment is neither JSON nor repo_id@revision")
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"invalid repo_id {repo_id!r}")
    if not isinstance(revision, str) or (revision and not REVISION.fullmatch(revision)):
        raise ValueError(f"invalid revision {revision!r}")
    return repo_id, revision


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


class ParentState:
    def __init__(self, db, cfg):
        self.db, self.cfg = db, cfg
        self.lock = threading.Lock()  # guards the deque; the database serializes itself
        rows = db.query("select job_id from jobs where status = 'pending' order by job_id")
        self.pending = collections.deque(row["job_id"] for row in rows)
        self.skipped = set()  # bad commitments already logged, so each is logged once
        if self.pending:
            log.info("Reloaded %d pending jobs from the database", len(self.pending))

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
            new = []
            for c in snapshot.commitments:
                if c.hotkey in neuron.allowed_validators or c.stake < neuron.min_stake_threshold:
                    continue
                if oldest is not None and c.block < oldest:
                    continue
                try:
                    repo_id, revision = parse_commitment(c.data)
                except ValueError as e:
                    if (c.hotkey, c.data) not in self.skipped:
                        self.skipped.add((c.hotkey, c.data))
                        log.warning("Skipping commitment of %s at block %d: %s",
                                    c.hotkey, c.block, e)
                    continue
                job = self._insert_job(conn, c, repo_id, revision)
                if job:
                    new.append(job)
            conn.execute("insert into chain_state values ('last_block', %s) on conflict (key) "
                         "do update set value = greatest(chain_state.value, excluded.value)",
                         (snapshot.block,))
        with self.lock:
            self.pending.extend(job["job_id"] for job in new)
        for job in new:
            log.info("New job %d for miner %s: %s@%s (block %d)", job["job_id"],
                     job["miner_hotkey"], job["hf_repo_id"], job["hf_repo_commit"] or "default",
                     job["commit_block"])
        return [job["job_id"] for job in new]

    def _insert_job(self, conn, c, repo_id, revision):
        digest = fingerprint(c.hotkey, repo_id, revision)
        return conn.execute(
            # INSERT ... SELECT: a known fingerprint inserts nothing and takes no job id.
            """insert into jobs (fingerprint, submission_id, miner_hotkey, miner_uid, hf_repo_id,
                   hf_repo_commit, commit_block, env_provider, env_name, random_seed, max_retries)
               select %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s
               where not exists (select 1 from jobs where fingerprint = %s)
               returning *""",
            (digest, int(digest[:15], 16), c.hotkey, c.uid, repo_id, revision, c.block,
             self.cfg.jobs.env_provider, self.cfg.jobs.env_name, int(digest[16:24], 16),
             self.cfg.jobs.max_retries, digest)).fetchone()

    # -- RPC side (each call runs on a worker thread of the RPC loop) --------------------------

    def register_child(self, child_id, endpoint):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", child_id):
            raise Refused("childId must be 1-64 letters, digits, '_', '.' or '-'")
        try:
            common.split_endpoint(endpoint)
        except ValueError as e:
            raise Refused(str(e)) from None
        self.db.query(
            """insert into children (child_id, endpoint, last_seen) values (%s, %s, %s)
               on conflict (child_id) do update set endpoint = excluded.endpoint,
                   last_seen = excluded.last_seen""", (child_id, endpoint, time.time()))
        log.info("Child %s registered from %s", child_id, endpoint)
        return f"registered as {child_id}"

    def _seen(self, conn, child_id):
        if not conn.execute("update children set last_seen = %s where child_id = %s "
                            "returning 1", (time.time(), child_id)).fetchone():
            raise Refused(f"unknown child {child_id!r}: call registerChild first")

    def request_jobs(self, child_id, max_jobs):
        """Hand up to max_jobs pending jobs to the child. The assignment is committed before
        the jobs leave; if the commit fails the jobs go back to the front of the deque."""
        with self.lock:
            taken = [self.pending.popleft() for _ in range(min(max_jobs, len(self.pending)))]
        try:
            with self.db.transaction() as conn:
                self._seen(conn, child_id)
                rows = conn.execute(
                    """update jobs set status = 'assigned', child_id = %s, attempts = attempts + 1
                       where job_id = any(%s) and status = 'pending'
                       returning *""", (child_id, taken)).fetchall()
                for row in rows:
                    conn.execute("insert into assignments (job_id, attempt, child_id) "
                                 "values (%s, %s, %s)", (row["job_id"], row["attempts"], child_id))
        except BaseException:
            with self.lock:
                self.pending.extendleft(reversed(taken))
            raise
        if rows:
            log.info("Sending %d jobs to child %s", len(rows), child_id)
        return [job_message(row) for row in sorted(rows, key=lambda r: r["job_id"])]

    def report_completion(self, child_id, job_id, success, result):
        """Record a child's result; returns (acknowledged, message). Only the child holding the
        job can record it; a repeated report of a recorded result is acknowledged again."""
        status = "completed" if success else "failed"
        with self.db.transaction() as conn:
            self._seen(conn, child_id)
            row = conn.execute(
                """update jobs set status = %s, success = %s, result = %s, finished_at = now()
                   where job_id = %s and status = 'assigned' and child_id = %s
                   returning attempts""", (status, success, result, job_id, child_id)).fetchone()
            if row:
                conn.execute("update assignments set finished_at = now() "
                             "where job_id = %s and attempt = %s", (job_id, row["attempts"]))
            else:
                job = conn.execute("select status, child_id from jobs where job_id = %s",
                                   (job_id,)).fetchone()
        if row:
            log.info("Child %s completed job %s", child_id, job_id)
            if not success:
                log.warning("Job %s failed on child %s: %s", job_id, child_id, result[:300])
            return True, "recorded"
        if job is None:
            return False, f"unknown job {job_id}"
        if job["child_id"] == child_id and job["status"] in ("completed", "failed"):
            return True, "already recorded"
        log.warning("Ignored a report of job %s from child %s: the job is %s (holder %s)",
                    job_id, child_id, job["status"], job["child_id"])
        return True, f"not recorded: job {job_id} is {job['status']} and not held by {child_id}"

    def stats(self):
        """The seed design's statistics."""
        now = time.time()
        rows = self.db.query(
            """select c.child_id, c.endpoint, c.last_seen,
                 (select count(*) from jobs j
                   where j.child_id = c.child_id and j.status = 'assigned') as active_jobs,
                 (select count(*) from assignments a where a.child_id = c.child_id)
                   as total_jobs_sent,
                 (select count(*) from assignments a
                   where a.child_id = c.child_id and a.finished_at is not null)
                   as total_jobs_completed
               from children c order by c.child_id""")
        children = [dict(row, active=now - row["last_seen"] < self.cfg.child_timeout_seconds)
                    for row in rows]
        with self.lock:
            pending = len(self.pending)
        return {
            "total_children": len(children),
            "active_children": sum(c["active"] for c in children),
            "pending_jobs": pending,
            "children": [{key: c[key] for key in (
                "child_id", "endpoint", "active", "last_seen", "active_jobs",
                "total_jobs_sent", "total_jobs_completed")} for c in children],
        }


# ---------------------------------------------------------------------------------------------
# The RPC service: one object per connection, all pointing at the one ParentState
# ---------------------------------------------------------------------------------------------

class ParentService(common.ServiceBase):
    role = "parent"

    def __init__(self, state):
        self.state = state

    async def registerChild(self, childId, endpoint, _context, **kwargs):
        message, error = await common.answer(self.state.register_child, childId, endpoint)
        return not error, error or message

    async def requestJobs(self, childId, maxJobs, _context, **kwargs):
        jobs, error = await common.answer(self.state.request_jobs, childId, maxJobs)
        _context.results.jobs = jobs or []
        _context.results.error = error

    async def reportJobCompletion(self, childId, jobId, success, result, _context, **kwargs):
        outcome, error = await common.answer(
            self.state.report_completion, childId, jobId, success, result)
        return outcome or (False, error)

    async def getStats(self, _context, **kwargs):
        stats, error = await common.answer(self.state.stats)
        return json.dumps(stats if not error else {"error": error})


# ---------------------------------------------------------------------------------------------
# Main: start the RPC service, then read the chain every sync_frequency seconds
# ---------------------------------------------------------------------------------------------

def run(cfg, stop):
    common.setup_logging(cfg)
    chain = open_chain(cfg)
    db = common.Database(common.database_dsn(cfg), SCHEMA_SQL)
    state = ParentState(db, cfg)
    rpc = common.RpcThread()
    port = rpc.serve(cfg.listen_host, cfg.parent_port, lambda: ParentService(state))
    log.info("Parent validator serving on %s:%d", cfg.listen_host, port)
    failures = 0
    while not stop.is_set():
        try:
            state.add_commitments(chain.read())
        except (ChainUnavailable, common.DatabaseUnavailable) as e:
            if failures == 0:
                log.warning("Chain sync failed (will retry): %s", e)
            failures += 1
            stop.wait(min(cfg.neuron.sync_frequency, 2 ** min(failures, 6)))
            continue
        if failures:
            log.info("Chain sync recovered after %d failed attempts", failures)
        failures = 0
        stop.wait(cfg.neuron.sync_frequency)
    log.info("Parent validator stopping")
    rpc.stop()
    db.close()


def main(argv=None):
    return common.role_main(run, "Run the parent validator.", is_parent=True, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
