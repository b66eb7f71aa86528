"""A child validator: takes evaluation jobs from the parent validator, keeps them in its own
PostgreSQL through pgqueuer, runs each through the evaluator, and reports every result back.

Its life, top to bottom: the database schema; ChildStore (the jobs table, which is also the
outbox of results not yet reported); the evaluator; the pgqueuer worker thread that runs jobs;
the RPC service (the parent may push a job with receiveJob); and main(), the loop that
registers, reports results and asks the parent for as many jobs as it has free slots.

    python child.py --config validator_child.toml
"""

import asyncio
import concurrent.futures
import datetime
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import psycopg

import common
from common import PeerUnavailable, Refused, log

SCHEMA_SQL = """
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
create index if not exists child_jobs_outbox on child_jobs (finished_at)
    where finished_at is not null and reported_at is null;
"""

EVALUATE = "evaluate"  # the pgqueuer entrypoint
ASYNCPG_PARAMS = {"host", "port", "user", "password", "database"}


class ChildStore:
    """The child's database: jobs received, their state, and the results to report."""

    def __init__(self, dsn, cfg):
        from pgqueuer.adapters.persistence.qb import QueryBuilderEnvironment
        self.cfg = cfg
        self.db = common.Database(dsn, SCHEMA_SQL)
        with self.db.transaction() as conn:
            conn.execute("select pg_advisory_xact_lock(7340512)")
            if conn.execute("select to_regclass('pgqueuer') as t").fetchone()["t"] is None:
                conn.execute(QueryBuilderEnvironment().build_install_query())

    def add_job(self, job):
        """Store a job and put it on the pgqueuer queue in one transaction. A job id already
        stored is ignored. Returns True if the job is new."""
        from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
        from pgqueuer.queries import SyncQueries
        with self.db.transaction() as conn:
            if not conn.execute("insert into child_jobs (job_id, job) values (%s, %s) "
                                "on conflict (job_id) do nothing returning 1",
                                (job["jobId"], json.dumps(job))).fetchone():
                return False
            SyncQueries(SyncPsycopgDriver(conn)).enqueue(
                EVALUATE, str(job["jobId"]).encode(), dedupe_key=str(job["jobId"]),
                on_conflict="skip")
        log.info("Received job %d (%s@%s), queued", job["jobId"], job["hfRepoId"],
                 job["hfRepoCommit"] or "default")
        return True

    def free_slots(self):
        busy = self.db.query("select count(*) as n from child_jobs "
                             "where status in ('queued', 'running')")[0]["n"]
        return max(0, self.cfg.max_concurrent_jobs - busy)

    def start(self, job_id):
        """Mark a job running and return it, or None if it already has a result (a job that
        pgqueuer hands out again after a crash that came after the result was stored)."""
        row = self.db.query("update child_jobs set status = 'running', started_at = now() "
                            "where job_id = %s and finished_at is null returning job", (job_id,))
        return row[0]["job"] if row else None

    def finish(self, job_id, success, result):
        self.db.query("update child_jobs set status = %s, result = %s, finished_at = now() "
                      "where job_id = %s and finished_at is null",
                      ("completed" if success else "failed", result, job_id))

    def unreported(self, limit=100):
        return self.db.query(
            "select job_id, status, result from child_jobs where finished_at is not null "
            "and reported_at is null order by finished_at, job_id limit %s", (limit,))

    def mark_reported(self, job_id):
        self.db.query("update child_jobs set reported_at = now() where job_id = %s", (job_id,))

    def counts(self):
        rows = self.db.query("select status, count(*) as n from child_jobs group by status")
        counts = {status: 0 for status in ("queued", "running", "completed", "failed")}
        counts.update({row["status"]: row["n"] for row in rows})
        counts["unreported"] = self.db.query(
            "select count(*) as n from child_jobs where finished_at is not null "
            "and reported_at is null")[0]["n"]
        return counts


# ---------------------------------------------------------------------------------------------
# The evaluator: one process per job, the job as JSON on stdin, one JSON object on stdout
# ---------------------------------------------------------------------------------------------

def failure(reason):
    return False, json.dumps({"error": reason})


def evaluate(cfg, job, logs_dir):
    """Run one job; returns (success, result text). The result is always a JSON object: the
    evaluator's own on success, {"error": reason} on failure."""
    if not cfg.evaluator.command:
        return demo_evaluate(cfg, job)
    # The parent names the log file; only its last component is used, inside our logs_dir.
    log_path = logs_dir / (Path(job["logsPath"]).name or f"job-{job['jobId']}.log")
    timeout = cfg.evaluator.timeout_seconds
    with open(log_path, "ab") as stderr:
        try:
            proc = subprocess.Popen(cfg.evaluator.command, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        except OSError as e:
            return failure(f"cannot start the evaluator: {e.strerror or e}")
        try:
            out, _ = proc.communicate(json.dumps(job).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its own session: this kills whatever it started too
            proc.communicate()
            return failure(f"evaluator timed out after {timeout:g}s")
    if proc.returncode != 0:
        return failure(f"evaluator exited with code {proc.returncode}")
    try:
        result = json.loads(out)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return failure("evaluator did not print one JSON object on stdout")
    return True, json.dumps(result)


def demo_evaluate(cfg, job):
    """The built-in DEMO evaluator: waits demo_seconds and returns a score derived from the
    job, so that the same submission always scores the same. It evaluates nothing."""
    time.sleep(cfg.evaluator.demo_seconds)
    digest = hashlib.sha256(f"{job['hfRepoId']}@{job['hfRepoCommit']}#{job['randomSeed']}"
                            .encode()).digest()
    score = int.from_bytes(digest[:4], "big") / 2**32
    return True, json.dumps({"score": round(score, 4), "evaluator": "demo"})


# ---------------------------------------------------------------------------------------------
# The worker: a pgqueuer consumer on its own thread and event loop
# ---------------------------------------------------------------------------------------------

class Worker:
    """Runs queued jobs, up to max_concurrent_jobs at once. pgqueuer's consumer is asyncio-only;
    it lives on this thread, and the evaluations on a thread pool, so callers never see asyncio.

    The consumer uses pgqueuer's asyncpg driver: asyncpg delivers NOTIFY through a callback
    without holding the connection, whereas pgqueuer's psycopg driver waits for NOTIFY on the
    connection it queries with, which stalls every query up to a second while the queue is idle.
    """

    def __init__(self, dsn, slots, run_job):
        self.dsn, self.slots, self.run_job = dsn, slots, run_job
        self.pool = concurrent.futures.ThreadPoolExecutor(slots, thread_name_prefix="evaluate")
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._thread, name="worker", daemon=True)

    def start(self):
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error

    def _thread(self):
        try:
            asyncio.run(self._consume())
        except Exception as e:
            self.error = e
            log.exception("The job worker stopped")
        finally:
            self.ready.set()

    async def _consume(self):
        import asyncpg
        from pgqueuer import AsyncpgDriver, PgQueuer
        # asyncpg takes no key=value DSN; psycopg parses either form for it.
        params = psycopg.conninfo.conninfo_to_dict(self.dsn)
        params["database"] = params.pop("dbname", None)
        if params.get("port"):
            params["port"] = int(params["port"])
        connection = await asyncpg.connect(**{k: v for k, v in params.items()
                                              if k in ASYNCPG_PARAMS and v})
        self.pgq = PgQueuer(AsyncpgDriver(connection))
        self.loop = asyncio.get_running_loop()

        @self.pgq.entrypoint(EVALUATE, concurrency_limit=self.slots)
        async def run(job):
            await self.loop.run_in_executor(self.pool, self.run_job, int(job.payload))

        self.ready.set()
        try:
            await self.pgq.run(batch_size=self.slots, max_concurrent_tasks=2 * self.slots,
                               heartbeat_timeout=datetime.timedelta(seconds=30),
                               dequeue_timeout=datetime.timedelta(seconds=10))
        finally:
            await connection.close()

    def stop(self):
        """Stop taking jobs and wait for the running ones to finish."""
        if self.thread.is_alive() and self.error is None:
            self.loop.call_soon_threadsafe(self.pgq.shutdown.set)
            self.thread.join()
        self.pool.shutdown()


# ---------------------------------------------------------------------------------------------
# The RPC service: the parent may push a job; anyone may ping or read the queue counts
# ---------------------------------------------------------------------------------------------

class ChildService(common.ServiceBase):
    role = "child"

    def __init__(self, store, wake):
        self.store, self.wake = store, wake

    def _receive(self, job):
        if self.store.free_slots() < 1:
            raise Refused("no free slot")
        accepted = self.store.add_job(job)
        self.wake.set()
        return "queued" if accepted else "already have this job"

    async def receiveJob(self, job, _context, **kwargs):
        message, error = await common.answer(self._receive, job.to_dict())
        return not error, error or message

    async def getStats(self, _context, **kwargs):
        counts, error = await common.answer(self.store.counts)
        return json.dumps(counts if not error else {"error": error})


# ---------------------------------------------------------------------------------------------
# Main: register, then report results and ask for work every poll_interval seconds
# ---------------------------------------------------------------------------------------------

def report_results(parent, store, child_id):
    """Send every finished, unreported result, oldest first; a result is marked reported only
    once the parent acknowledged it, so a crash or an outage at any point resends it later."""
    for row in store.unreported():
        reply = parent.call("reportJobCompletion", childId=child_id, jobId=row["job_id"],
                            success=row["status"] == "completed", result=row["result"] or "")
        if reply["acknowledged"]:
            store.mark_reported(row["job_id"])
        else:
            log.warning("Parent did not take the result of job %d: %s",
                        row["job_id"], reply["message"])


def request_jobs(parent, store, child_id):
    """Ask for as many jobs as there are free slots (0 is a heartbeat) and queue them."""
    reply = parent.call("requestJobs", childId=child_id, maxJobs=store.free_slots())
    if reply["error"]:
        log.warning("Parent refused the job request: %s; registering again", reply["error"])
        parent.close()
    for job in reply["jobs"]:
        store.add_job(job)


def run(cfg, stop):
    common.setup_logging(cfg)
    child_id = cfg.validator_id
    logs_dir = common.data_dir(cfg) / "logs"
    logs_dir.mkdir(exist_ok=True)
    dsn = common.database_dsn(cfg)
    store = ChildStore(dsn, cfg)
    wake = threading.Event()

    def run_job(job_id):
        job = store.start(job_id)
        if job is None:
            return
        kind = "the DEMO evaluator" if not cfg.evaluator.command else "the evaluator"
        log.info("Evaluating job %d with %s", job_id, kind)
        success, result = evaluate(cfg, job, logs_dir)
        store.finish(job_id, success, result)
        log.info("Job %d %s: %s", job_id, "succeeded" if success else "failed", result[:200])
        wake.set()

    worker = Worker(dsn, cfg.max_concurrent_jobs, run_job)
    worker.start()
    rpc = common.RpcThread()
    port = rpc.serve(cfg.listen_host, cfg.child_port, lambda: ChildService(store, wake))
    endpoint = f"{cfg.child_host}:{port}"
    log.info("Child validator %s serving on %s:%d", child_id, cfg.listen_host, port)

    async def register(capability):
        reply = await capability.registerChild(childId=child_id, endpoint=endpoint)
        if not reply.success:
            raise Refused(f"the parent refused the registration: {reply.message}")
        log.info("Successfully registered with parent validator as %s", child_id)

    parent = common.RpcClient(rpc, cfg.parent_host, cfg.parent_port, on_connect=register)
    failures = 0
    try:
        while not stop.is_set():
            try:
                report_results(parent, store, child_id)
                request_jobs(parent, store, child_id)
            except PeerUnavailable as e:
                if failures == 0:
                    log.warning("Parent unreachable (will retry): %s", e)
                failures += 1
                stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.8, 1.2))
                continue
            if failures:
                log.info("Reconnected to the parent after %d failed attempts", failures)
            failures = 0
            wake.wait(cfg.poll_interval)
            wake.clear()
    finally:
        log.info("Child validator %s stopping", child_id)
        worker.stop()
        rpc.stop()
        store.db.close()


def main(argv=None):
    return common.role_main(run, "Run a child validator.", is_parent=False, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
