"""The child validator's durability: its outbox across parent outages and its own kill -9, its
reconnection, the cap on evaluations that kill it, retention, and the staged shutdown. Real
parent and child processes, real ports, real PostgreSQL."""

import asyncio
import concurrent.futures
import json
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import (ROOT, commitment, free_port, process_alive, wait_until,
                      write_chain)

import child
import common


class Cluster:
    """One parent and one child 'c1' as processes, each restartable with its own config and
    database; every run writes its own log file."""

    def __init__(self, tmp_path, processes, parent_path, child_path):
        self.tmp_path, self.processes = tmp_path, processes
        self.paths = {"parent": parent_path, "child": child_path}
        self.dsn = {role: common.load_config(path).pg_database
                    for role, path in self.paths.items()}
        self.runs = {"parent": 0, "child": 0}

    def start(self, role):
        self.runs[role] += 1
        proc = self.processes([f"{role}.py", "--config", self.paths[role]],
                              self.tmp_path / f"{role}{self.runs[role]}.log")
        setattr(self, role, proc)
        return proc

    def logs(self, role):
        return "".join((self.tmp_path / f"{role}{n}.log").read_text()
                       for n in range(1, self.runs[role] + 1))

    def query(self, role, sql, params=None):
        with common.connect(self.dsn[role]) as db:
            return db.execute(sql, params).fetchall()

    def parent_status(self):
        return {r["job_id"]: r["status"] for r in self.query(
            "parent", "select job_id, status from jobs order by job_id")}

    def child_rows(self):
        return self.query("child", "select * from child_jobs order by job_id")


@pytest.fixture
def cluster(tmp_path, parent_config, child_config, processes):
    """cluster(n, **child_keys): a chain with n commitments, configs for a parent and a child."""
    def make(commitments, **child_keys):
        write_chain(tmp_path / "chain.json", 100,
                    [commitment(i) for i in range(1, commitments + 1)])
        parent_path = parent_config()
        child_path = child_config("c1", common.load_config(parent_path).parent_port,
                                  **child_keys)
        return Cluster(tmp_path, processes, parent_path, child_path)
    return make


def start_both(c):
    c.start("parent").wait_for_log("Parent validator serving")
    c.start("child").wait_for_log("Successfully registered with parent validator as c1")


def outbox_filled(c):
    """The child has jobs, all of them finished, and results it could not report."""
    rows = c.child_rows()
    return rows and all(r["finished_at"] for r in rows) and \
        any(r["reported_at"] is None for r in rows)


def assert_each_result_recorded_once(c, count):
    job_ids = list(range(1, count + 1))
    assert c.parent_status() == {j: "completed" for j in job_ids}
    recorded = c.query("parent", "select job_id, count(*) as n from assignments "
                                 "where outcome = 'completed' group by job_id")
    assert {r["job_id"]: r["n"] for r in recorded} == {j: 1 for j in job_ids}
    parent_logs = c.logs("parent")
    assert [parent_logs.count(f"Child c1 completed job {j}\n") for j in job_ids] == \
        [1] * count
    rows = c.child_rows()
    assert [r["job_id"] for r in rows] == job_ids
    assert all(r["status"] == "completed" and r["reported_at"] for r in rows)


# -- the outbox ---------------------------------------------------------------------------------

def test_results_finished_while_the_parent_is_down_reach_it_once_it_is_back(cluster):
    c = cluster(4, max_concurrent_jobs=2, max_backoff_seconds=0.5,
                evaluator={"demo_seconds": 2.0})
    start_both(c)
    # Both slots busy: the child asks for nothing more until a job ends, so stopping the
    # parent now cannot lose an answer to a job request.
    wait_until(lambda: len(c.child_rows()) == 2, what="the child holding two jobs")
    assert c.parent.stop() == 0
    c.child.wait_for_log(r"Parent unreachable \(will retry\)")
    wait_until(lambda: outbox_filled(c), what="results waiting in the child's outbox")
    c.start("parent")
    wait_until(lambda: c.parent_status() == {j: "completed" for j in (1, 2, 3, 4)}, 60,
               "all four jobs completed at the parent")
    c.child.wait_for_log(r"Reconnected to the parent after \d+ failed attempts")
    assert c.child.log().count("Parent unreachable") == 1
    assert_each_result_recorded_once(c, 4)


def test_results_in_the_outbox_of_a_killed_child_reach_the_parent_once(cluster):
    c = cluster(3, max_concurrent_jobs=2, max_backoff_seconds=0.5,
                evaluator={"demo_seconds": 1.5})
    start_both(c)
    wait_until(lambda: len(c.child_rows()) == 2, what="the child holding two jobs")
    c.parent.kill()  # so that no result can be reported
    wait_until(lambda: outbox_filled(c), what="results waiting in the child's outbox")
    c.child.kill()
    assert c.child.proc.returncode == -signal.SIGKILL
    c.start("parent")
    c.start("child")
    wait_until(lambda: c.parent_status() == {1: "completed", 2: "completed", 3: "completed"},
               60, "all three jobs completed at the parent")
    assert_each_result_recorded_once(c, 3)
    assert "Evaluating job 1 " not in c.child.log()  # it was not run again


def result_printer(size, gate):
    """An evaluator that waits for the file `gate`, then prints a JSON object of `size` bytes."""
    return ["sh", "-c", "cat > /dev/null; while [ ! -e \"$0\" ]; do sleep 0.05; done; "
            "printf '{\"pad\": \"'; head -c \"$1\" /dev/zero | tr '\\0' x; printf '\"}'",
            str(gate), str(size - 11)]


def test_a_backlog_of_results_at_max_result_bytes_reaches_the_parent_once(
        tmp_path, parent_config, child_config, processes):
    """150 results of max_result_bytes each (1 MiB) finish while the parent is stopped
    (SIGSTOP). In batches of 100 they made a call over Cap'n Proto's 64 MiB limit: it failed
    at every try, and the failed call crashed the child."""
    count, size, gate = 150, 1 << 20, tmp_path / "gate"
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, count + 1)])
    parent_path = parent_config(max_jobs_per_child=count)
    child_path = child_config("c1", common.load_config(parent_path).parent_port,
                              max_concurrent_jobs=8, prefetch_jobs=count,
                              max_backoff_seconds=0.5,
                              evaluator={"command": result_printer(size, gate)})
    c = Cluster(tmp_path, processes, parent_path, child_path)
    start_both(c)
    wait_until(lambda: len(c.child_rows()) == count, 60, f"the child holding {count} jobs")
    c.parent.proc.send_signal(signal.SIGSTOP)
    try:
        gate.touch()
        wait_until(lambda: c.query("child", "select count(*) as n from child_jobs where "
                                            "status = 'completed'")[0]["n"] == count, 120,
                   "every evaluation finished while the parent is stopped")
        c.child.wait_for_log(r"Parent unreachable \(will retry\)")
    finally:
        c.parent.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: set(c.parent_status().values()) == {"completed"}, 120,
               "every result recorded at the parent")
    assert_each_result_recorded_once(c, count)
    assert {len(r["result"]) for r in c.query("parent", "select result from jobs")} == {size}
    assert c.child.proc.poll() is None
    assert "Traceback" not in c.child.log() and "event loop" not in c.child.log()


# -- capacity -----------------------------------------------------------------------------------

def test_prefetch_jobs_wait_queued_at_the_child_while_its_slots_run(cluster):
    c = cluster(5, max_concurrent_jobs=1, prefetch_jobs=2, shutdown_grace_seconds=0,
                evaluator={"demo_seconds": 60.0})
    start_both(c)
    wait_until(lambda: sorted(r["status"] for r in c.child_rows()) ==
               ["queued", "queued", "running"], what="one job running and two queued")

    def polls():
        return c.query("parent", "select last_seen from children")[0]["last_seen"]
    seen = polls()
    wait_until(lambda: polls() > seen, what="the next poll")
    seen = polls()
    wait_until(lambda: polls() > seen, what="another poll")
    # Full: the polls asked for nothing more.
    assert len(c.child_rows()) == 3
    assert sorted(c.parent_status().values()) == ["assigned"] * 3 + ["pending"] * 2


def test_an_idle_child_gets_a_new_job_without_waiting_out_its_poll_interval(cluster, tmp_path):
    c = cluster(1, poll_interval=60.0)
    start_both(c)
    wait_until(lambda: c.parent_status() == {1: "completed"}, what="the first job's result")
    write_chain(tmp_path / "chain.json", 101, [commitment(i) for i in (1, 2)])
    # The idle child's poll is held open at the parent, which answers it with the new job.
    wait_until(lambda: c.parent_status() == {1: "completed", 2: "completed"}, 20,
               "the new job's result, long before the child's next poll_interval (60 s)")


# -- reconnection -------------------------------------------------------------------------------

def test_a_child_registers_again_by_itself_when_the_parent_restarts(cluster, tmp_path):
    c = cluster(0, max_backoff_seconds=0.5)
    start_both(c)
    c.parent.kill()
    c.child.wait_for_log(r"Parent unreachable \(will retry\)")
    c.start("parent").wait_for_log("Child c1 registered from 127.0.0.1:")
    wait_until(lambda: c.child.log().count(
        "Successfully registered with parent validator as c1") == 2, what="a second registration")
    c.child.wait_for_log(r"Reconnected to the parent after \d+ failed attempts")
    assert c.child.log().count("Parent unreachable") == 1
    # The new registration is good for work.
    write_chain(tmp_path / "chain.json", 101, [commitment(1)])
    c.parent.wait_for_log("Child c1 completed job 1")


def test_a_lost_database_connection_is_logged_once_and_the_child_carries_on(
        cluster, tmp_path, pg_admin_dsn):
    c = cluster(0, max_backoff_seconds=0.5, worker_heartbeat_seconds=3.0)
    start_both(c)
    database = psycopg.conninfo.conninfo_to_dict(c.dsn["child"])["dbname"]
    with common.connect(pg_admin_dsn) as admin:
        terminated = admin.execute(
            "select pg_terminate_backend(pid) as ok from pg_stat_activity "
            "where datname = %s and pid <> pg_backend_pid()", (database,)).fetchall()
    assert len(terminated) >= 2  # the loop's connection and the job worker's
    c.child.wait_for_log(r"Database unavailable \(will retry\)")
    c.child.wait_for_log(r"Database available again after \d+ failed attempts")
    c.child.wait_for_log(r"The job worker lost its database connection \(will retry\)")
    c.child.wait_for_log(r"The job worker reconnected after \d+ failed attempts")
    write_chain(tmp_path / "chain.json", 101, [commitment(1)])
    c.parent.wait_for_log("Child c1 completed job 1")
    assert c.child.proc.poll() is None
    assert c.child.log().count("Database unavailable") == 1


# -- attempts -----------------------------------------------------------------------------------

def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(cluster):
    # The evaluator runs in its own session, but its parent process is the child validator.
    killer = [sys.executable, "-c", "import os; os.kill(os.getppid(), 9)"]
    c = cluster(1, max_attempts=2, worker_heartbeat_seconds=2.0, max_backoff_seconds=0.5,
                evaluator={"command": killer})
    c.start("parent").wait_for_log("Parent validator serving")
    for attempt in (1, 2):
        proc = c.start("child")
        wait_until(lambda: proc.proc.poll() is not None, 60,
                   f"attempt {attempt} to kill the child validator")
        assert proc.proc.returncode == -signal.SIGKILL
        assert f"Evaluating job 1 with the evaluator (attempt {attempt})" in proc.log()
    c.start("child")
    c.parent.wait_for_log("Child c1 completed job 1")
    error = {"error": "evaluation killed its worker 2 times"}
    [job] = c.query("parent", "select status, result from jobs")
    assert (job["status"], json.loads(job["result"])) == ("failed", error)
    [row] = c.child_rows()
    assert (row["status"], row["attempts"], json.loads(row["result"])) == ("failed", 3, error)
    assert row["reported_at"] is not None
    assert "Evaluating job 1" not in c.child.log()
    assert c.child.proc.poll() is None


# -- retention and schema -----------------------------------------------------------------------

def test_old_reported_jobs_and_queue_log_rows_are_pruned_at_start(tmp_path, child_config,
                                                                    processes):
    config = child_config("c1", free_port())  # no parent: pruning does not need one
    cfg = common.load_config(config)
    child.ChildStore(cfg.pg_database, 2).db.close()  # the schema
    days_ago = "now() - make_interval(days => %s)"
    with common.connect(cfg.pg_database) as db:
        for job_id, finished, reported in ((1, 10, 9), (2, 2, 1), (3, 10, None)):
            db.execute(f"insert into child_jobs (job_id, job, status, finished_at, reported_at) "
                       f"values (%s, '{{}}', 'completed', {days_ago}, {days_ago})",
                       (job_id, finished, reported))
        for job_id, age in ((901, 8), (902, 1)):
            db.execute("insert into pgqueuer_log (job_id, status, priority, entrypoint, created) "
                       f"values (%s, 'successful', 0, 'evaluate', {days_ago})", (job_id, age))
    proc = processes(["child.py", "--config", config], tmp_path / "child.log")
    proc.wait_for_log("Pruned 1 reported jobs and 1 queue log rows older than 7 days")
    with common.connect(cfg.pg_database) as db:
        jobs = db.execute("select job_id from child_jobs order by job_id").fetchall()
        logs = db.execute("select job_id from pgqueuer_log where job_id > 900").fetchall()
    # A result never reported stays whatever its age: it is the outbox.
    assert [r["job_id"] for r in jobs] == [2, 3]
    assert [r["job_id"] for r in logs] == [902]


@pytest.mark.parametrize("key, value, least", [("max_attempts", 0, "1"),
                                               ("prefetch_jobs", -1, "0")])
def test_a_limit_out_of_range_is_refused_at_start(child_config, key, value, least):
    config = child_config("c1", free_port(), **{key: value})
    run = subprocess.run([sys.executable, ROOT / "child.py", "--config", config],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == f"error: {config}: key '{key}' must be at least {least}\n"


def test_the_schema_is_idempotent_and_upgrades_an_older_jobs_table(make_dsn):
    dsn = make_dsn()
    with common.connect(dsn) as db:
        db.execute("create table child_jobs (job_id bigint primary key, job jsonb not null, "
                   "status text not null default 'queued', received_at timestamptz not null "
                   "default now(), started_at timestamptz, finished_at timestamptz, "
                   "result text, reported_at timestamptz)")
        db.execute("insert into child_jobs (job_id, job) values (1, '{}')")
    for _ in range(2):
        child.ChildStore(dsn, 1).db.close()
    with common.connect(dsn) as db:
        assert db.execute("select attempts from child_jobs").fetchall() == [{"attempts": 0}]


def test_a_job_sent_again_after_it_was_reported_runs_again(make_dsn):
    """The parent sends a job only while it has no result of ours for it (an operator's
    requeue, an expired lease, a report it did not record); a copy of a job we hold and have
    not reported is a duplicate."""
    store = child.ChildStore(make_dsn(), 2)
    job = {"jobId": 4, "hfRepoId": "org/m", "hfRepoCommit": "abc"}
    full = {**child.UNSENT_TEXT, **job}  # text fields the sender left out are stored as ""
    assert store.add_jobs([job]) == [full]
    assert store.add_jobs([job]) == []
    assert store.incoming.holdings() == (1, [4])
    assert store.runs.start(4, 1) == (full, 1)
    store.runs.finish(4, True, "{}")
    assert store.add_jobs([job]) == [] and store.incoming.holds(4)
    assert store.incoming.holdings() == (2, [4])  # finished, not reported: no slot, still held
    store.outgoing.mark_reported([4])
    assert not store.incoming.holds(4) and store.incoming.holdings() == (2, [])
    # One batch: the job sent again, a new one, and a copy of that new one.
    other = {"jobId": 5, "hfRepoId": "org/n"}
    assert [j["jobId"] for j in store.add_jobs([job, other, other])] == [4, 5]
    [row] = store.db.query("select status, attempts, result, reported_at from child_jobs "
                           "where job_id = 4")
    assert row == {"status": "queued", "attempts": 0, "result": None, "reported_at": None}
    queued = store.db.query("select payload from pgqueuer where status = 'queued' order by id")
    assert [bytes(r["payload"]) for r in queued] == [b"4/1", b"4/2", b"5/1"]
    # The entry of the first delivery, handed out again (say after a crash), runs nothing.
    assert store.runs.start(4, 1) is None
    assert store.runs.start(4, 2) == (full, 1)
    store.db.close()


def test_a_job_sent_again_while_its_first_run_is_finishing_runs_again(make_dsn):
    """The parent may send a job again (it took it back while we ran it) as soon as we report
    it, while pgqueuer has not yet let go of the queue entry that ran it."""
    dsn = make_dsn()
    store = child.ChildStore(dsn, 2)
    job = {"jobId": 4, "hfRepoId": "org/m"}
    runs = queue.Queue()

    def run_job(key):
        job_id, delivery = child.parse_queue_key(key)
        started = store.runs.start(job_id, delivery)
        if started and runs.empty():
            store.runs.finish(job_id, False, "{}")
            store.outgoing.mark_reported([job_id])
            store.add_jobs([job])  # its entry is still picked: this one is handling it
        runs.put(started is not None)

    store.add_jobs([job])
    worker = child.Worker(dsn, 2, 3.0, run_job)
    worker.start()
    try:
        assert runs.get(timeout=30) is True
        assert runs.get(timeout=30) is True  # the second delivery ran
    finally:
        worker.stop_taking()
        assert worker.wait(30)
    assert store.incoming.holdings() == (1, [4])
    store.db.close()


def test_a_freed_slot_takes_the_next_queued_job_at_once(make_dsn, monkeypatch):
    """A job's end is recorded in pgqueuer when the job ends: until then its entry counts as
    running, and the freed slot would not take the job queued behind it. Here the buffer's
    timer is two minutes, so only the write at the job's end can free the slot: job 2 waits
    for job 3, which can only run in the slot that job 1 left."""
    monkeypatch.setattr(child, "JOB_END_RETRY", 120.0)
    dsn = make_dsn()
    store = child.ChildStore(dsn, 3)
    ran, third_ran = queue.Queue(), threading.Event()

    def run_job(key):
        job_id, delivery = child.parse_queue_key(key)
        if store.runs.start(job_id, delivery):
            if job_id == 2:
                third_ran.wait(30)
            elif job_id == 3:
                third_ran.set()
            store.runs.finish(job_id, True, "{}")
            ran.put(job_id)

    store.add_jobs([{"jobId": n, "hfRepoId": f"org/{n}"} for n in (1, 2, 3)])
    worker = child.Worker(dsn, 2, 30.0, run_job)
    worker.start()
    try:
        assert third_ran.wait(30), "job 3 never ran: the slot job 1 left stayed taken"
        assert sorted(ran.get(timeout=30) for _ in range(3)) == [1, 2, 3]
    finally:
        worker.stop_taking()
        assert worker.wait(30)
    store.db.close()


def voluntary_switches(thread):
    """How many times `thread` went to sleep and was woken (Linux counts it per thread)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M).group(1))


def test_an_idle_worker_sleeps_and_its_queue_session_does_not_wait_for_the_disk(make_dsn):
    """An idle worker's thread wakes only for pgqueuer's slow timers (heartbeats, health
    checks, the queue's re-check every heartbeat / 3), not ten times a second for a timer of
    its own or for pgqueuer's buffer of job ends; and a stop still reaches it at once. Its
    session's commits (queue entries handed out and ended) do not wait for the disk."""
    dsn = make_dsn()
    store = child.ChildStore(dsn, 2)
    ran = queue.Queue()

    def run_job(key):
        job_id, delivery = child.parse_queue_key(key)
        if store.runs.start(job_id, delivery):
            store.runs.finish(job_id, True, "{}")
            ran.put(job_id)

    worker = child.Worker(dsn, 2, 30.0, run_job)
    worker.start()
    try:
        store.add_jobs([{"jobId": 1, "hfRepoId": "org/a"}])  # the worker is in its loop once
        assert ran.get(timeout=30) == 1                     # it ran a job and recorded its end
        wait_until(lambda: not store.db.query("select 1 from pgqueuer"), 30, "the job's end")
        before = voluntary_switches(worker.thread)
        time.sleep(3.0)  # the window measured: nothing to wait for
        woken = voluntary_switches(worker.thread) - before
        assert woken < 25, f"an idle worker's thread woke {woken} times in 3 s"
        # Its queue entries' moves are not waited for on disk (see Worker._consume).
        loop, pgq = worker.consumer
        [row] = asyncio.run_coroutine_threadsafe(
            pgq.connection.fetch("show synchronous_commit"), loop).result(30)
        assert row["synchronous_commit"] == "off"
    finally:
        worker.stop_taking()
        assert worker.wait(30)
    store.db.close()


def test_a_full_worker_with_a_job_queued_waits_for_a_slot_not_a_timer(make_dsn):
    """With every slot busy and a job queued behind them (prefetch_jobs), nothing can be
    handed out until a job ends, and the end of a job wakes the worker (its queue entry's
    change is notified): so the worker's thread does not re-check the queue ten times a
    second meanwhile (pgqueuer's re-poll for queued work), and the queued job still starts
    as soon as the slot is free."""
    dsn = make_dsn()
    store = child.ChildStore(dsn, 2)
    started, release, ran = queue.Queue(), threading.Event(), queue.Queue()

    def run_job(key):
        job_id, delivery = child.parse_queue_key(key)
        if store.runs.start(job_id, delivery):
            started.put(job_id)
            if job_id == 1:
                release.wait(60)
            store.runs.finish(job_id, True, "{}")
            ran.put(job_id)

    # Its queue's own re-check comes every heartbeat / 3 (200 s): only the wake-up at job 1's
    # end can start job 2 within the test's deadlines.
    worker = child.Worker(dsn, 1, 600.0, run_job)
    worker.start()
    try:
        store.add_jobs([{"jobId": n, "hfRepoId": f"org/{n}"} for n in (1, 2)])
        assert started.get(timeout=30) == 1  # its one slot is busy; job 2 is queued
        wait_until(lambda: store.db.query("select 1 from pgqueuer where status = 'queued'"),
                   30, "job 2 to be queued")
        before = voluntary_switches(worker.thread)
        time.sleep(3.0)  # the window measured: no slot frees in it
        woken = voluntary_switches(worker.thread) - before
        assert started.empty(), "job 2 started while the slot was busy"
        assert woken < 25, f"a full worker's thread woke {woken} times in 3 s"
        release.set()
        assert started.get(timeout=30) == 2  # the freed slot takes it
        assert sorted(ran.get(timeout=30) for _ in range(2)) == [1, 2]
    finally:
        release.set()
        worker.stop_taking()
        assert worker.wait(30)
    store.db.close()


def test_calls_made_while_a_transaction_runs_share_the_next_one(make_dsn):
    """Group commit, as the evaluations' starts and ends use it: each caller gets its own
    result, only once its transaction committed; a failure reaches the callers of its batch
    and no other."""
    db = common.Database(make_dsn(), [])
    batches, first_running, release = [], threading.Event(), threading.Event()

    def run_batch(conn, items):
        batches.append(items)
        if len(batches) == 1:
            first_running.set()
            release.wait(30)
        if "fail" in items:
            raise common.DatabaseUnavailable("lost the connection")
        return [conn.execute("select %s::integer * 10 as n", (n,)).fetchone()["n"]
                for n in items]

    group = child.GroupCommit(db, run_batch)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.call, 1)
        assert first_running.wait(30)
        rest = [pool.submit(group.call, n) for n in range(2, 9)]
        wait_until(lambda: len(group.waiting) == 7, 30, "the other calls to wait")
        assert not any(f.done() for f in rest)
        release.set()
        assert [f.result(30) for f in [first, *rest]] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert batches == [[1], [2, 3, 4, 5, 6, 7, 8]]
    with pytest.raises(common.DatabaseUnavailable):
        group.call("fail")
    assert group.call(9) == 90 and batches[-1] == [9]
    db.close()


def test_of_two_entries_of_one_job_started_together_only_the_current_one_runs(make_dsn):
    store = child.ChildStore(make_dsn(), 2)
    store.add_jobs([{"jobId": 4}])
    store.runs.finish(4, True, "{}")
    store.outgoing.mark_reported([4])
    store.add_jobs([{"jobId": 4}])  # sent again: delivery 2
    with store.db.transaction() as conn:
        stale, current = store.runs._start_many(conn, [(4, 1, 1), (4, 2, 1)])
    assert stale is None and (current["job_id"], current["attempts"]) == (4, 1)
    store.db.close()


def test_an_entry_queued_before_deliveries_were_counted_runs_its_job(make_dsn):
    """A queue entry written by an older version has the job id alone as its key."""
    store = child.ChildStore(make_dsn(), 2)
    store.add_jobs([{"jobId": 7}, {"jobId": 8}])
    assert child.parse_queue_key("7") == (7, None)
    with store.db.transaction() as conn:  # both legacy: the delivery array holds only nulls
        started = store.runs._start_many(conn, [(7, None, 1), (8, None, 1)])
    assert [(row["job_id"], row["attempts"]) for row in started] == [(7, 1), (8, 1)]
    store.db.close()


def test_unfinished_jobs_missing_from_the_queue_are_queued_again_at_start(make_dsn):
    dsn = make_dsn()
    store = child.ChildStore(dsn, 3)
    store.add_jobs([{"jobId": n} for n in (1, 2, 3)])
    store.runs.finish(3, True, "{}")
    # pgqueuer drops the entry of a run that raised an error we did not foresee.
    store.db.query("delete from pgqueuer where payload in ('1/1', '3/1')")
    store.db.close()
    store = child.ChildStore(dsn, 3)
    queued = store.db.query("select payload from pgqueuer order by payload")
    assert [bytes(r["payload"]) for r in queued] == [b"1/1", b"2/1"]
    store.db.close()


def test_a_start_cut_short_by_a_database_outage_is_not_counted(make_dsn, pg_admin_dsn):
    """max_attempts guards against a job whose evaluation kills the child; a result lost to a
    database outage is no such thing."""
    store = child.ChildStore(make_dsn(), 1)
    store.add_jobs([{"jobId": 9}])
    assert store.runs.start(9, 1)[1] == 1
    pid = store.db.query("select pg_backend_pid() as pid")[0]["pid"]
    with common.connect(pg_admin_dsn) as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: not admin.execute("select 1 from pg_stat_activity where pid = %s",
                                             (pid,)).fetchone(), 10, "the backend to end")
    with pytest.raises(common.DatabaseUnavailable):
        store.runs.finish(9, True, "{}")
    assert store.runs.start(9, 1)[1] == 1  # the same count: the start was not the job's fault
    assert store.runs.start(9, 1)[1] == 2  # a start that ended otherwise counts
    store.db.close()


# -- staged shutdown ----------------------------------------------------------------------------

def test_sigterm_lets_the_running_evaluation_finish_and_report_before_exit(cluster):
    c = cluster(2, max_concurrent_jobs=1, evaluator={"demo_seconds": 2.0})
    start_both(c)
    c.child.wait_for_log("Evaluating job 1 ")
    c.child.proc.send_signal(signal.SIGTERM)
    assert c.child.proc.wait(30) == 0
    # Reported before the exit; and no new job was taken on the way out.
    assert c.parent_status() == {1: "completed", 2: "pending"}
    [row] = c.child_rows()
    assert row["status"] == "completed" and row["reported_at"] is not None
    assert "Job 1 succeeded" in c.child.log()


SLOW_EVALUATOR = """
    import json, os, subprocess, sys, time
    from pathlib import Path
    job = json.load(sys.stdin)
    here = Path(sys.argv[1])
    sleeper = subprocess.Popen(["sleep", "60"])  # in its process group: killed with it
    (here / "pids.tmp").write_text(f"{os.getpid()} {sleeper.pid}")
    os.replace(here / "pids.tmp", here / "pids")
    time.sleep(float((here / "seconds").read_text()))
    sleeper.kill()
    print(json.dumps({"score": 1.0}))
"""


def test_after_the_grace_running_evaluations_are_killed_and_their_jobs_run_after_restart(
        cluster, tmp_path):
    (tmp_path / "evaluator.py").write_text(textwrap.dedent(SLOW_EVALUATOR))
    (tmp_path / "seconds").write_text("60")
    c = cluster(1, shutdown_grace_seconds=1.0, evaluator={
        "command": [sys.executable, str(tmp_path / "evaluator.py"), str(tmp_path)]})
    start_both(c)
    pids = wait_until(lambda: (tmp_path / "pids").exists() and
                      (tmp_path / "pids").read_text().split(), what="the evaluator running")
    began = time.monotonic()
    c.child.proc.send_signal(signal.SIGTERM)
    assert c.child.proc.wait(30) == 0
    assert time.monotonic() - began < 1.0 + 10  # the grace, plus a few seconds at most
    c.child.wait_for_log(r"Shutdown grace of 1s expired: stopping the running evaluations "
                         r"\(1 evaluator process groups: SIGTERM, SIGKILL after 10s\)")
    for pid in map(int, pids):
        wait_until(lambda: not process_alive(pid), 10,
                   f"process {pid} of the evaluator's group gone")
    # The job is queued again, its start not counted, and the parent was told nothing.
    [row] = c.child_rows()
    assert (row["status"], row["attempts"], row["finished_at"], row["reported_at"]) == \
        ("queued", 0, None, None)
    assert [r["status"] for r in c.query("child", "select status from pgqueuer")] == ["queued"]
    assert c.parent_status() == {1: "assigned"}

    (tmp_path / "seconds").write_text("0")
    c.start("child")
    c.parent.wait_for_log("Child c1 completed job 1")
    assert_each_result_recorded_once(c, 1)
    assert c.child_rows()[0]["attempts"] == 1


HELD_EVALUATOR = """
    import json, os, subprocess, sys, time
    from pathlib import Path
    job = json.load(sys.stdin)
    here = Path(sys.argv[1])
    with open(here / "runs", "a") as runs:
        runs.write(f"{job['jobId']}\\n")
    helper = subprocess.Popen(["sleep", "60"])  # in the evaluator's process group
    # A temporary file of its own: the two jobs' evaluators run at once.
    (here / f"pids-{job['jobId']}.tmp").write_text(f"{os.getpid()} {helper.pid}")
    os.replace(here / f"pids-{job['jobId']}.tmp", here / f"pids-{job['jobId']}")
    while (here / "hold").exists():
        time.sleep(0.05)
    helper.kill()
    print(json.dumps({"score": 1.0}))
"""


def test_evaluators_die_with_a_child_killed_with_sigkill_and_run_once_after_its_restart(
        cluster, tmp_path):
    """The evaluators of a child killed with -9 die with it (the kernel's parent-death
    signal); what they started is killed at the next start, before their jobs run again.
    They used to live on beside the restarted child's new runs of the same jobs."""
    (tmp_path / "evaluator.py").write_text(textwrap.dedent(HELD_EVALUATOR))
    (tmp_path / "hold").touch()
    c = cluster(2, max_concurrent_jobs=2, worker_heartbeat_seconds=2.0, max_backoff_seconds=0.5,
                evaluator={"command": [sys.executable, str(tmp_path / "evaluator.py"),
                                       str(tmp_path)]})
    start_both(c)
    pids = {job_id: wait_until(lambda: (tmp_path / f"pids-{job_id}").exists() and list(map(
        int, (tmp_path / f"pids-{job_id}").read_text().split())), what=f"job {job_id} running")
        for job_id in (1, 2)}
    c.child.kill()
    for evaluator, helper in pids.values():
        wait_until(lambda: not process_alive(evaluator), 10,
                   f"evaluator {evaluator} gone with the child")
        assert process_alive(helper)  # in the evaluator's group: the next start kills it
    (tmp_path / "hold").unlink()
    c.start("child")
    for job_id, (_, helper) in pids.items():
        wait_until(lambda: not process_alive(helper), 30,
                   f"process {helper} left by job {job_id} gone")
        c.child.wait_for_log(f"Killed the evaluator processes that job {job_id} left running")
    wait_until(lambda: c.parent_status() == {1: "completed", 2: "completed"}, 60,
               "both jobs completed")
    assert sorted((tmp_path / "runs").read_text().split()) == ["1", "1", "2", "2"]
    assert_each_result_recorded_once(c, 2)
    assert [r["evaluator"] for r in c.child_rows()] == [None, None]


def test_results_are_reported_in_batches_cut_by_bytes_and_an_oversized_one_fails(
        make_dsn, monkeypatch):
    dsn = make_dsn()
    store = child.ChildStore(dsn, 10)
    store.add_jobs([{"jobId": n, "hfRepoId": "org/m"} for n in range(1, 6)])
    for n, size in zip(range(1, 6), (300, 300, 300, 50, 2000)):
        store.runs.start(n, 1)
        store.runs.finish(n, True, json.dumps({"pad": "x" * (size - 11)}))
    monkeypatch.setattr(common, "RESULTS_BUDGET", 2 * (300 + child.RESULT_OVERHEAD))
    rows, more, _, _ = store.poll_state()
    assert [r["job_id"] for r in rows] == [1, 2] and more  # by bytes, not by count
    store.outgoing.mark_reported([1, 2])
    assert [r["job_id"] for r in store.outgoing.unreported()] == [3, 4]
    store.db.close()
    # A result over max_result_bytes (stored under an earlier config) fails at the next start,
    # instead of being refused by the parent at every try.
    store = child.ChildStore(dsn, 10, max_result_bytes=1000)
    [row] = store.db.query("select status, result from child_jobs where job_id = 5")
    assert (row["status"], json.loads(row["result"])) == (
        "failed", {"error": "result of 2000 bytes is over max_result_bytes (1000)"})
    assert [r["job_id"] for r in store.outgoing.unreported()] == [3, 4, 5]  # its failure fits
    store.db.close()
