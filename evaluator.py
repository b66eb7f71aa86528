"""Running an evaluator: one process per job, the job as JSON on its stdin, one JSON object
on its stdout, and nothing it does can cost the child more than its limits.

Its parts: evaluate(), one job's run and what its end means (Ended: a result, or a failure,
its reason, and whether it is the miner's or transient); what an evaluator is told (its
environment, its scratch directory); the DEMO evaluator; Evaluations, the running evaluators,
their GPUs (GpuPool) and their stops; process handling (Process: each evaluator in its own
process group, stopped with SIGTERM and then SIGKILL, dead with the child; its stdout read up
to max_result_bytes; its exit awaited without polling); and bounded logs (BoundedLog, each
evaluation's stderr; LogsDirectory, all of them).

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
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import common
from common import log

# ---------------------------------------------------------------------------------------------
# The evaluator: one process per job, the job as JSON on stdin, one JSON object on stdout
# ---------------------------------------------------------------------------------------------

MB = common.MB
EX_TEMPFAIL = 75  # sysexits.h: "try again later", an evaluator's way to say it is not the miner


class Ended(NamedTuple):
    """How an evaluation ended: its result is always one JSON object, the evaluator's own on
    success, {"error": reason} on failure. `retryable`: the failure is not the miner's (the
    parent gives the job out again, docs/protocol.md)."""
    success: bool
    result: str
    retryable: bool = False


class Abandoned(Exception):
    """The child stopped and killed the evaluation: the job must run again after a restart."""


class Revoked(Exception):
    """The parent took the job back and its evaluation was stopped: nothing is reported."""


def failure(reason, retryable=False):
    return Ended(False, json.dumps({"error": reason}), retryable)


def evaluate(cfg, job, logs, running=None):
    """Run one job; returns Ended. `logs`: the LogsDirectory (or a path to one) its stderr goes
    to. Raises Abandoned if `running` (an Evaluations) was abandoned meanwhile, Revoked if the
    job was revoked."""
    running = running or Evaluations()
    logs = logs if isinstance(logs, LogsDirectory) else LogsDirectory(logs)
    if not cfg.evaluator.command:
        return demo_evaluate(cfg, job, running)
    job_id, timeout = job["jobId"], cfg.evaluator.timeout_seconds
    if not shutil.which(cfg.evaluator.command[0]):
        return failure(f"cannot start the evaluator: {cfg.evaluator.command[0]} is not an "
                       "executable file", retryable=True)
    # Its devices and its scratch directory are its own until the last process of its group
    # is gone: a stopping evaluator keeps them through its grace.
    with contextlib.ExitStack() as own:
        try:
            gpus = own.enter_context(running.devices())
            scratch = own.enter_context(scratch_directory(logs.path.parent, job_id))
            stderr = own.enter_context(logs.open(job_id, job, cfg.evaluator.max_log_bytes))
            env = evaluator_environment(cfg, job, scratch, gpus, time.time() + timeout)
            process = running.popen(job_id, cfg.evaluator.command, env,
                                    cfg.evaluator.stop_grace_seconds)
            process.gpus = gpus
        except OSError as e:
            return failure(f"cannot start the evaluator: {e.strerror or e}"
                           f"{f' ({e.filename})' if e.filename else ''}", retryable=True)
        try:
            out, stopped = process.exchange(json.dumps(job).encode(), cfg.max_result_bytes,
                                            timeout, stderr,
                                            functools.partial(running.started, job_id, process))
        finally:
            running.forget(job_id)
    return what_it_means(cfg, running, job_id, process.proc.returncode, out, stopped)


def what_it_means(cfg, running, job_id, code, out, stopped):
    """The Ended of an evaluator that exited with `code` after printing `out`; `stopped`:
    why the child stopped it, None if it ended on its own."""
    if stopped in ("revoked", "abandoned"):
        running.check(job_id)  # raises
    if stopped == "timeout":
        return failure(f"evaluator timed out after {cfg.evaluator.timeout_seconds:g}s")
    if stopped == "output":  # the parent would refuse it forever
        return failure(f"evaluator printed more than max_result_bytes "
                       f"({cfg.max_result_bytes} bytes) and was stopped")
    if code == EX_TEMPFAIL:
        return failure(f"evaluator exited with code {EX_TEMPFAIL} (EX_TEMPFAIL: a transient "
                       "failure)", retryable=True)
    if code < 0:
        return failure(f"evaluator was killed by {signal_name(-code)}, which the child did not "
                       "send (the kernel's OOM killer, or an operator)", retryable=True)
    if code != 0:
        return failure(f"evaluator exited with code {code}")
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
    return Ended(True, text)


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def evaluator_environment(cfg, job, scratch, gpus, deadline):
    """The child's environment, plus what the evaluator is told about its job (README, "The
    evaluator")."""
    env = dict(os.environ, VALIDATOR_JOB_ID=str(job["jobId"]),
               VALIDATOR_ATTEMPT=str(job.get("attempt", 0)),
               VALIDATOR_RETRY_COUNT=str(job.get("retryCount", 0)),
               VALIDATOR_SCRATCH_DIR=str(scratch), VALIDATOR_DEADLINE=f"{deadline:.3f}",
               VALIDATOR_STOP_GRACE_SECONDS=f"{cfg.evaluator.stop_grace_seconds:g}")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


@contextlib.contextmanager
def scratch_directory(data_dir, job_id):
    """A directory of the job's own under data_dir/scratch: made empty before its evaluator
    starts, deleted after its last process ended (on data_dir's filesystem: the disk guard
    counts it)."""
    path = data_dir / "scratch" / f"job-{job_id}"
    shutil.rmtree(path, ignore_errors=True)  # what a run that died left
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clear_scratch(data_dir):
    """At start: no evaluation runs, so every scratch directory is left over."""
    shutil.rmtree(data_dir / "scratch", ignore_errors=True)


def demo_evaluate(cfg, job, running):
    """The built-in DEMO evaluator: waits demo_seconds and returns a score derived from the
    job, so that the same submission always scores the same. It evaluates nothing."""
    running.wait(job["jobId"], cfg.evaluator.demo_seconds)
    digest = hashlib.sha256(f"{job['hfRepoId']}@{job['hfRepoCommit']}#{job['randomSeed']}"
                            .encode()).digest()
    score = int.from_bytes(digest[:4], "big") / 2**32
    return Ended(True, json.dumps({"score": round(score, 4), "evaluator": "demo"}))


# ---------------------------------------------------------------------------------------------
# The running evaluations: their processes, their GPUs, and how they are stopped
# ---------------------------------------------------------------------------------------------

class Evaluations:
    """The evaluations running now, by job id, with their evaluator's Process: a shutdown
    whose grace has expired stops them all (and none can start after that); a job the parent
    takes back is stopped alone (revoke). Each evaluator dies with the child (start_process),
    and `record(job_id, group)` keeps its group in the database, so that the next start kills
    what it started (kill_left_behind). `gpus`: the GpuPool the evaluators share, if any."""

    def __init__(self, record=None, gpus=None):
        self.changed = threading.Condition()
        # job id -> evaluations between begin() and end(): two queue entries of one job may
        # be handed out at once (only the current delivery's runs the evaluator).
        self.running = collections.Counter()
        self.processes = {}  # job id -> the Process of its evaluator
        self.revoked = {}  # job id -> reason, for running jobs the parent took back
        self.abandoned = threading.Event()
        self.record, self.gpus = record, gpus

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

    @contextlib.contextmanager
    def devices(self):
        """The GPUs of one evaluation (None without a GpuPool), given back when it is over."""
        if self.gpus is None:
            yield None
            return
        taken = self.gpus.take()
        try:
            yield taken
        finally:
            self.gpus.give_back(taken)

    def popen(self, job_id, command, env, grace):
        with self.changed:
            self.check(job_id)
            process = Process(start_process(command, env), grace)
            self.processes[job_id] = process
        return process

    def started(self, job_id, process):
        """Keep the evaluator's process group in the database (`record`). Called once it has
        its job: the evaluator need not wait for this transaction to start working."""
        if self.record:
            try:
                self.record(job_id, process.proc.pid, process.gpus)
            except common.DatabaseUnavailable:  # the evaluator still dies with the child
                log.warning("Job %d: the evaluator's process group %d is not recorded: the "
                            "database is unavailable", job_id, process.proc.pid)

    def forget(self, job_id):
        """The evaluator has ended, and no process of its group is left."""
        with self.changed:
            self.processes.pop(job_id, None)

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
        """Stop the job's evaluation, if it runs (gracefully: Process.stop). Call it once the
        job is recorded cancelled, so that what the evaluation ends with is not stored."""
        with self.changed:
            if job_id not in self.running:
                return
            self.revoked[job_id] = reason
            if job_id in self.processes:
                self.processes[job_id].stop("revoked")
            self.changed.notify_all()

    def abandon(self):
        """Stop every evaluation (the shutdown's grace expired); returns how many evaluator
        processes were told to stop."""
        with self.changed:
            self.abandoned.set()
            for process in self.processes.values():
                process.stop("abandoned")
            self.changed.notify_all()
            return len(self.processes)


class GpuPool:
    """`[evaluator] gpus`, handed out `per_job` at a time: no two evaluations hold one device
    at once. The child runs at most `slots` evaluations (child.evaluation_slots), so a take
    always finds enough free devices."""

    def __init__(self, gpus, per_job):
        self.free, self.per_job = list(gpus), per_job
        self.slots = len(gpus) // per_job
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            if len(self.free) < self.per_job:  # a bug, not a load: refuse rather than share
                raise RuntimeError(f"no {self.per_job} free GPUs of {self.free}")
            taken, self.free = self.free[:self.per_job], self.free[self.per_job:]
            return taken

    def give_back(self, taken):
        with self.lock:
            self.free.extend(taken)


# ---------------------------------------------------------------------------------------------
# Process handling: each evaluator in its own process group, stopped gently, dead with the child
# ---------------------------------------------------------------------------------------------

SETPRIV = shutil.which("setpriv")  # util-linux
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LIBC = ctypes.CDLL(None, use_errno=True)
GROUP_LOOK_SECONDS = 0.02  # between looks for the last process of a stopping group


# Run by setpriv once the parent-death signal is set: if the child died before that, this
# process's parent is no longer the child, and it must not run.
STILL_OURS = '[ "$PPID" = "$0" ] || exit 1; exec "$@"'


def start_process(command, env):
    """Start an evaluator in a session (and process group) of its own, so that stopping the
    group stops whatever it started too. The kernel sends it SIGKILL when the thread that
    started it ends, however the child validator dies (kill -9 included): util-linux's setpriv
    asks for it (PR_SET_PDEATHSIG), then a shell checks that its parent is still the child
    (STILL_OURS) and executes the evaluator. That thread is one of the Worker's evaluation
    threads, which live as long as the process. Without a Python preexec_fn CPython starts
    the process with vfork, some 10 ms cheaper than the full fork a preexec_fn needs; without
    setpriv, the preexec_fn it is."""
    options = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
               "env": env, "start_new_session": True}
    if SETPRIV:
        return subprocess.Popen([SETPRIV, "--pdeathsig", "KILL", "--", "/bin/sh", "-c",
                                 STILL_OURS, str(os.getpid()), *command], **options)
    return subprocess.Popen(command, preexec_fn=die_with_parent(os.getpid()), **options)


def die_with_parent(parent_pid):
    """A Popen preexec_fn, where setpriv is missing: as setpriv does, and if the child died
    before this ran, the evaluator exits at once."""
    def in_the_evaluator():
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)
    return in_the_evaluator


class Process:
    """One evaluator process and its group. A stop is graceful: SIGTERM to the group, and
    SIGKILL to what is left of it `grace` seconds later. It is asked from any thread (stop())
    and carried out by the thread that runs the evaluation (exchange()), which alone signals
    the group, and only until it has seen the group's end: no signal can reach a group id
    that was freed and given to another process."""

    def __init__(self, proc, grace):
        self.proc, self.grace = proc, grace
        self.gpus = None  # the devices it holds (Evaluations.devices), for the record
        self.lock = threading.Lock()
        self.why = None  # why it is being stopped: "timeout", "output", "revoked", "abandoned"
        self.wake_read, self.wake_write = os.pipe()
        self.over = False  # its group is gone, its pipes closed

    def stop(self, why):
        """Ask for a stop; the first reason asked is the one kept."""
        with self.lock:
            if self.why is None and not self.over:
                self.why = why
                os.write(self.wake_write, b"!")

    def exchange(self, job, limit, timeout, stderr, sent=lambda: None):
        """Write the job to the evaluator's stdin, call `sent`, read its stdout up to `limit`
        bytes (past it, the evaluator is stopped: "output", so that one printing without end
        costs no more than `limit` of memory) and its stderr into `stderr` (a BoundedLog),
        until its group is gone; stopped after `timeout` seconds ("timeout"). Returns (what it
        printed, None if it was stopped for its output; why it was stopped, None if it ended
        on its own)."""
        printed = bytearray()

        def read():
            while chunk := self.proc.stdout.read1(1 << 16):
                if len(printed) + len(chunk) > limit:
                    self.stop("output")
                    return
                printed.extend(chunk)

        readers = [threading.Thread(target=read, name=f"evaluator-{self.proc.pid}", daemon=True),
                   threading.Thread(target=stderr.read_from, args=(self.proc.stderr,),
                                    name=f"evaluator-log-{self.proc.pid}", daemon=True)]
        for reader in readers:
            reader.start()
        with contextlib.suppress(BrokenPipeError):  # it may exit without reading the job
            self.proc.stdin.write(job)
            self.proc.stdin.close()
        try:
            sent()
            self._wait(time.monotonic() + timeout)
        except BaseException:
            self._signal(signal.SIGKILL)  # the wait was cut short: nothing of it may stay
            raise
        finally:
            # A process of its group may hold stdout open: the group is gone first.
            for reader in readers:
                reader.join()
            with self.lock:
                self.over = True
                for stream in (self.proc.stdout, self.proc.stderr):
                    stream.close()
                os.close(self.wake_read)
                os.close(self.wake_write)
        return (None if self.why == "output" else bytes(printed)), self.why

    def _wait(self, deadline):
        """Until the evaluator exits, stopping it at `deadline` or when asked; then until the
        rest of its group is gone (at once if it ended on its own, else within the grace)."""
        grace_ends = None
        with exit_watch(self.proc.pid, self.wake_read) as watch:
            while self.proc.poll() is None:
                now = time.monotonic()
                with self.lock:
                    if grace_ends is None and (self.why or now >= deadline):
                        self.why = self.why or "timeout"
                        grace_ends = now + self.grace
                        self._signal(signal.SIGTERM)
                if grace_ends is not None and now >= grace_ends:
                    self._signal(signal.SIGKILL)
                    self.proc.wait()
                    break
                watch((grace_ends if grace_ends is not None else deadline) - now)
        if grace_ends is not None:
            while self._group_lives() and time.monotonic() < grace_ends:
                time.sleep(GROUP_LOOK_SECONDS)  # not our children: no event tells their end
        self._signal(signal.SIGKILL)
        # Dead processes of the group free their devices once they are reaped; a moment.
        for _ in range(int(1 / GROUP_LOOK_SECONDS)):
            if not self._group_lives():
                return
            time.sleep(GROUP_LOOK_SECONDS)

    def _signal(self, signum):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def _group_lives(self):
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


@contextlib.contextmanager
def exit_watch(pid, wake):
    """A function that waits up to n seconds for process `pid` to exit or for `wake` to be
    readable (whose bytes it takes). Popen.wait with a timeout polls, napping up to 50 ms
    between looks, so each evaluation's end waited some 25 ms for the next look; a pidfd (Linux
    5.3 and later) becomes readable when its process exits. Without one, it looks every 50 ms."""
    watch = select.poll()
    watch.register(wake, select.POLLIN)
    try:
        pidfd = os.pidfd_open(pid)
        watch.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # not Linux, or an older kernel
        pidfd = None

    def wait(seconds):
        seconds = max(0.0, seconds if pidfd is not None else min(seconds, 0.05))
        for fd, _ in watch.poll(seconds * 1000):
            if fd == wake:
                os.read(wake, 64)

    try:
        yield wait
    finally:
        if pidfd is not None:
            os.close(pidfd)


# ---------------------------------------------------------------------------------------------
# Bounded logs: each evaluator's stderr, and the directory that keeps them
# ---------------------------------------------------------------------------------------------

DROPPED_ROOM = 200  # bytes the line that says what was dropped takes at most


class BoundedLog:
    """What an evaluator writes to stderr, read through a pipe (so none of its writes fails,
    whatever the disk holds) and kept in its log file up to `limit` bytes: the first half as
    it comes, the newest half in memory until the evaluator is over, and between them one
    line that says how much was dropped. A write that fails (a full disk) drops what it had
    to write and says so at the end; the pipe is read to its end regardless."""

    def __init__(self, path, limit):
        self.path, self.limit = path, limit
        self.file = open(path, "ab", buffering=0)
        self.head_left = limit // 2
        self.tail, self.tail_size = collections.deque(), 0
        self.tail_limit = limit - limit // 2 - DROPPED_ROOM
        self.dropped = self.written = 0
        self.error = None  # the first write error

    def read_from(self, pipe):
        while chunk := pipe.read1(1 << 16):
            self._take(chunk)

    def _take(self, chunk):
        if self.head_left:
            head, chunk = chunk[:self.head_left], chunk[self.head_left:]
            self.head_left -= len(head)
            self._write(head)
        if not chunk:
            return
        self.tail.append(chunk)
        self.tail_size += len(chunk)
        while self.tail_size > self.tail_limit:
            extra, oldest = self.tail_size - self.tail_limit, self.tail[0]
            cut = min(extra, len(oldest))
            if cut == len(oldest):
                self.tail.popleft()
            else:
                self.tail[0] = oldest[cut:]
            self.tail_size -= cut
            self.dropped += cut

    def _write(self, data):
        if self.error is None:
            try:
                self.file.write(data)
                self.written += len(data)
                return
            except OSError as e:
                self.error = e
        self.dropped += len(data)

    def close(self):
        """Write the newest half after the line that says what was dropped; returns the bytes
        this evaluation added to the file."""
        tail, self.tail = b"".join(self.tail), collections.deque()
        if self.dropped:
            why = f"; writing failed: {self.error.strerror}" if self.error else ""
            self._write(f"\n[... the child validator dropped {self.dropped} bytes of this log "
                        f"here (max_log_bytes is {self.limit}{why}) ...]\n".encode())
        self._write(tail)
        self.file.close()
        return self.written


class LogsDirectory:
    """Where the evaluators' logs go (data_dir/logs): one file a job, named by the parent,
    each evaluation adding at most max_log_bytes (BoundedLog); all of them together at most
    `total_limit` bytes, the oldest deleted first, and none older than retention_days
    (prune). The total is counted as logs close, and the directory is listed only when it is
    over the limit, not at every evaluation."""

    def __init__(self, path, total_limit=None):
        self.path, self.total_limit = Path(path), total_limit
        self.lock = threading.Lock()
        self.open_paths = collections.Counter()
        self.total = None  # bytes, once listed

    def file_of(self, job_id, job):
        """The log file of a job: the parent names it (its last part only), inside this
        directory."""
        name = Path(job.get("logsPath") or "").name
        return self.path / (name if name not in ("", ".", "..") else f"job-{job_id}.log")

    @contextlib.contextmanager
    def open(self, job_id, job, limit):
        path = self.file_of(job_id, job)
        with self.lock:
            self.open_paths[path] += 1
        log_file = BoundedLog(path, limit)
        try:
            yield log_file
        finally:
            written = log_file.close()
            with self.lock:
                self.open_paths[path] -= 1
                if not self.open_paths[path]:
                    del self.open_paths[path]
            self.added(written)

    def added(self, size):
        if self.total_limit is None:
            return
        with self.lock:
            if self.total is not None:
                self.total += size
            if self.total is None or self.total > self.total_limit:
                self._trim()

    def _trim(self):
        """Delete the oldest closed logs until the rest take 90% of the limit at most (so that
        the next listing is some evaluations away)."""
        files = sorted(self._files(), key=lambda f: f[1])  # oldest first
        total, deleted, freed = sum(size for _, _, size in files), 0, 0
        for path, _, size in files:
            if total <= self.total_limit * 0.9:
                break
            if path in self.open_paths:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total, deleted, freed = total - size, deleted + 1, freed + size
        self.total = total
        if deleted:
            log.warning("Deleted the %d oldest evaluator logs (%.1f MB): the logs directory "
                        "was over max_logs_total_mb (%d)", deleted, freed / MB,
                        self.total_limit // MB)

    def _files(self):
        with os.scandir(self.path) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        yield Path(entry.path), stat.st_mtime, stat.st_size

    def prune(self, days):
        """Delete the closed logs older than `days`; returns how many."""
        cutoff, deleted = time.time() - days * 86400, 0
        with self.lock:
            for path, mtime, size in list(self._files()):
                if mtime < cutoff and path not in self.open_paths:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        deleted += 1
                        if self.total is not None:
                            self.total -= size
        return deleted


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
