"""Running an evaluator: one process per job, the job as JSON on its stdin, one JSON object
on its stdout, and nothing it does can cost the child more than its limits.

Its parts: evaluate(), one job's run and what its end means (a result, or a failure and its
reason); the DEMO evaluator; Evaluations, the running evaluators and how they are stopped;
process handling (each evaluator in its own process group, dead with the child); and bounded
output (stdout read up to max_result_bytes, the exit awaited without polling).

child.py calls evaluate() for each job a worker thread takes (child.run_job).
"""

import collections
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import select
import signal
import subprocess
import threading
from pathlib import Path

import common
from common import log

# ---------------------------------------------------------------------------------------------
# The evaluator: one process per job, the job as JSON on stdin, one JSON object on stdout
# ---------------------------------------------------------------------------------------------

class Abandoned(Exception):
    """The child stopped and killed the evaluation: the job must run again after a restart."""


class Revoked(Exception):
    """The parent took the job back and its evaluation was stopped: nothing is reported."""


def evaluate(cfg, job, logs_dir, running=None):
    """Run one job; returns (success, result text). The result is always a JSON object: the
    evaluator's own on success, {"error": reason} on failure. Raises Abandoned if `running`
    (an Evaluations) was abandoned meanwhile, Revoked if the job was revoked."""
    running = running or Evaluations()
    job_id = job["jobId"]
    if not cfg.evaluator.command:
        return demo_evaluate(cfg, job, running)
    # The parent names the log file; only its last component is used, inside our logs_dir.
    log_path = logs_dir / (Path(job["logsPath"]).name or f"job-{job['jobId']}.log")
    timeout = cfg.evaluator.timeout_seconds
    with open(log_path, "ab") as stderr:
        try:
            proc = running.popen(job_id, cfg.evaluator.command, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr)
        except OSError as e:
            return failure(f"cannot start the evaluator: {e.strerror or e}")
        try:
            out = exchange(proc, json.dumps(job).encode(), cfg.max_result_bytes, timeout,
                           functools.partial(running.started, job_id, proc))
        except subprocess.TimeoutExpired:
            return failure(f"evaluator timed out after {timeout:g}s")
        finally:
            running.forget(job_id)
    if job_id in running.revoked:
        raise Revoked(running.revoked[job_id])
    if out is None:  # the parent would refuse it forever
        return failure(f"evaluator printed more than max_result_bytes "
                       f"({cfg.max_result_bytes} bytes) and was stopped")
    if proc.returncode != 0:
        running.check(job_id)
        return failure(f"evaluator exited with code {proc.returncode}")
    try:
        result = json.loads(out)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return failure("evaluator did not print one JSON object on stdout")
    text = json.dumps(result)  # escapes non-ASCII text: it may be longer than what was printed
    if len(text) > cfg.max_result_bytes:
        return failure(f"evaluator printed a result of {len(text)} bytes as JSON; "
                       f"max_result_bytes is {cfg.max_result_bytes}")
    return True, text


def demo_evaluate(cfg, job, running):
    """The built-in DEMO evaluator: waits demo_seconds and returns a score derived from the
    job, so that the same submission always scores the same. It evaluates nothing."""
    running.wait(job["jobId"], cfg.evaluator.demo_seconds)
    digest = hashlib.sha256(f"{job['hfRepoId']}@{job['hfRepoCommit']}#{job['randomSeed']}"
                            .encode()).digest()
    score = int.from_bytes(digest[:4], "big") / 2**32
    return True, json.dumps({"score": round(score, 4), "evaluator": "demo"})


def failure(reason):
    return False, json.dumps({"error": reason})


# ---------------------------------------------------------------------------------------------
# Process handling: each evaluator in its own process group, killed with the child or alone
# ---------------------------------------------------------------------------------------------

class Evaluations:
    """The evaluations running now, by job id, with their evaluator's process group: a
    shutdown whose grace has expired kills them all (and none can start after that); a job
    the parent takes back is stopped alone (revoke). Each evaluator dies with the child
    (die_with_parent), and `record(job_id, group)` keeps its group in the database, so that
    the next start kills what it started (kill_left_behind)."""

    def __init__(self, record=None):
        self.changed = threading.Condition()
        # job id -> evaluations between begin() and end(): two queue entries of one job may
        # be handed out at once (only the current delivery's runs the evaluator).
        self.running = collections.Counter()
        self.groups = {}  # job id -> the process group of its evaluator
        self.revoked = {}  # job id -> reason, for running jobs the parent took back
        self.abandoned = threading.Event()
        self.record = record

    def begin(self, job_id):
        """Before the job's start is recorded: from now on revoke() reaches it."""
        with self.changed:
            self.running[job_id] += 1

    def end(self, job_id):
        """The evaluation is over; returns the reason if the parent took the job back."""
        with self.changed:
            self.running[job_id] -= 1
            if self.running[job_id] > 0:
                return self.revoked.get(job_id)
            del self.running[job_id]
            return self.revoked.pop(job_id, None)

    def popen(self, job_id, command, **options):
        with self.changed:
            self.check(job_id)
            # Its own session: killing the group kills whatever the evaluator started too.
            proc = subprocess.Popen(command, start_new_session=True,
                                    preexec_fn=die_with_parent(os.getpid()), **options)
            self.groups[job_id] = proc.pid
        return proc

    def started(self, job_id, proc):
        """Keep the evaluator's process group in the database (`record`). Called once it has
        its job: the evaluator need not wait for this transaction to start working."""
        if self.record:
            try:
                self.record(job_id, proc.pid)
            except common.DatabaseUnavailable:  # the evaluator still dies with the child
                log.warning("Job %d: the evaluator's process group %d is not recorded: the "
                            "database is unavailable", job_id, proc.pid)

    def forget(self, job_id):
        """The evaluator has ended (exchange killed what it left in its group)."""
        with self.changed:
            self.groups.pop(job_id, None)

    def check(self, job_id):
        """Raise Abandoned or Revoked if the evaluation of this job must stop."""
        if self.abandoned.is_set():
            raise Abandoned()
        if job_id in self.revoked:
            raise Revoked(self.revoked[job_id])

    def wait(self, job_id, seconds):
        """Sleep up to `seconds` (the DEMO evaluator's work); raises as check() does."""
        with self.changed:
            self.changed.wait_for(lambda: self.abandoned.is_set() or job_id in self.revoked,
                                  seconds)
            self.check(job_id)

    def revoke(self, job_id, reason):
        """Stop the job's evaluation, if it runs: kill its process group. Call it once the
        job is recorded cancelled, so that what the evaluation ends with is not stored."""
        with self.changed:
            if job_id not in self.running:
                return
            self.revoked[job_id] = reason
            if job_id in self.groups:
                kill_process_group(self.groups[job_id])
            self.changed.notify_all()

    def abandon(self):
        with self.changed:
            self.abandoned.set()
            for group in self.groups.values():
                kill_process_group(group)
            self.changed.notify_all()
            return len(self.groups)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid):
    """A Popen preexec_fn: the kernel sends the evaluator SIGKILL when the thread that started
    it ends, however the child validator dies (kill -9 included). That thread is one of the
    Worker's evaluation threads, which live as long as the process. If the child died before
    this ran, the evaluator exits at once."""
    def in_the_evaluator():
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)
    return in_the_evaluator


def process_identity(pid):
    """What tells process `pid` from a later one with the same id: the boot it ran in and its
    start time (clock ticks after boot). None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return {"boot": boot_id(), "start": int(stat.rsplit(")", 1)[1].split()[19])}


def boot_id():
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def kill_group(recorded):
    """Kill the process group `recorded` ({"group", "boot", "start"}) if it is still the one
    recorded: not after a reboot, nor if its id now names a newer process. While any process
    of the group lives, Linux gives its id to no other process. True if it was killed."""
    now = process_identity(recorded["group"])
    if recorded.get("boot") != boot_id() or (now and now["start"] != recorded.get("start")):
        return False
    try:
        os.killpg(recorded["group"], signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def kill_process_group(group):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Bounded output: an evaluator's stdout read up to max_result_bytes, its exit awaited
# ---------------------------------------------------------------------------------------------

def exchange(proc, job, limit, timeout, sent=lambda: None):
    """Write the job to the evaluator's stdin, call `sent`, and read its stdout until it
    exits; returns what it printed, or None if that was over `limit` bytes: then its process
    group is killed at once, so that an evaluator printing without end costs no more than
    `limit` of memory. Raises subprocess.TimeoutExpired (its group killed) after `timeout`
    seconds."""
    printed, over = bytearray(), []

    def read():
        while chunk := proc.stdout.read1(1 << 16):
            if len(printed) + len(chunk) > limit:
                over.append(True)
                kill_process_group(proc.pid)
                return
            printed.extend(chunk)

    reader = threading.Thread(target=read, name=f"evaluator-{proc.pid}", daemon=True)
    reader.start()
    with contextlib.suppress(BrokenPipeError):  # it may exit without reading the job
        proc.stdin.write(job)
        proc.stdin.close()
    try:
        sent()
        wait_for_exit(proc, timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid)
        proc.wait()
        raise
    finally:
        # A process the evaluator left behind may hold stdout open: its group goes first.
        kill_process_group(proc.pid)
        reader.join()
        proc.stdout.close()
    return None if over else bytes(printed)


def wait_for_exit(proc, timeout):
    """proc.wait(timeout), woken by the exit itself. Popen.wait with a timeout polls, napping
    up to 50 ms between looks, so each evaluation's end waited some 25 ms for the next look.
    A pidfd (Linux 5.3 and later) becomes readable when its process exits."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or an older kernel
        return proc.wait(timeout)
    try:
        watch = select.poll()
        watch.register(pidfd, select.POLLIN)
        if not watch.poll(timeout * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()
