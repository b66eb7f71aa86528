"""Hostile peers at the RPC server (issue 14, items 2 and 3): a flood of idle connections does
not lock out an allowed child nor `validator.py status`, and a huge call from a connection that
never registered is dropped before it is read, without costing the parent its CPU or memory."""

import contextlib
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, IdleFlood, commitment, wait_until, write_chain

import common
from rpc import RpcClient


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    """Hotkeys made with the bittensor SDK, without passwords: name -> keypair."""
    import bittensor
    path = tmp_path_factory.mktemp("wallets")
    keys = {"path": str(path)}
    for name in ("parent", "c1"):
        wallet = bittensor.Wallet(name="test", hotkey=name, path=str(path))
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        keys[name] = wallet.hotkey
    return keys


def identity(wallets, name):
    return {"wallet_path": wallets["path"], "wallet_name": "test", "hotkey_name": name}


@pytest.fixture
def parent(tmp_path, parent_config, processes, wallets):
    """A parent with auth on that allows child c1, and three jobs."""
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    config = parent_config(auth="on", **identity(wallets, "parent"), log_level="INFO",
                           allowed_child_hotkeys=[wallets["c1"].ss58_address],
                           rpc_register_timeout_seconds=2.0)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 3 ")
    proc.config, proc.port = config, common.load_config(config).parent_port
    return proc


def status(parent):
    run = subprocess.run([sys.executable, ROOT / "validator.py", "status", "--config",
                          parent.config, "--parent-port", str(parent.port), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_a_flood_of_idle_connections_locks_out_neither_a_child_nor_status(
        tmp_path, parent, child_config, processes, wallets):
    flood = IdleFlood(parent.port, addresses=30, per_address=10)  # 300: more than 256 connections
    try:
        wait_until(lambda: flood.opened >= 400, what="the server closing idle connections")
        assert status(parent)["total_children"] == 0
        child = processes(["child.py", "--config", child_config(
            "c1", parent.port, auth="on", **identity(wallets, "c1"),
            parent_hotkey=wallets["parent"].ss58_address)], tmp_path / "c1.log")
        for job_id in (1, 2, 3):
            parent.wait_for_log(f"Child c1 completed job {job_id}")
        assert status(parent)["children"][0]["total_jobs_completed"] == 3
        opened = flood.opened
        wait_until(lambda: flood.opened > opened + 100, what="the flood going on")
    finally:
        flood.stop()
    assert child.proc.poll() is None
    assert "Parent unreachable" not in child.log()
    parent.wait_for_log(r"Closed RPC connections lately \(last from 127\.0\.0\.\d+:\d+\): .*"
                        r"unregistered, closed to make room")


def memory_peak_mb(pid):
    """The process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def recorded_huge_request_jobs(held):
    """The bytes a pycapnp client sends for a requestJobs with `held` heldJobs (8 bytes each)
    on a new connection (its bootstrap, then the call), recorded from a real client."""
    recorder = socket.create_server(("127.0.0.1", 0))
    script = "\n".join([
        "import asyncio, capnp",
        f"schema = capnp.load({str(common.HERE / 'validator.capnp')!r})",
        "async def main():",
        "    stream = await capnp.AsyncIoStream.create_connection(host='127.0.0.1', "
        f"port={recorder.getsockname()[1]})",
        "    svc = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.ValidatorJobsService)",
        "    request = svc.requestJobs_request()",
        "    request.childId = 'intruder'",
        f"    request.init('heldJobs', {held})",
        "    await request.send()",
        "asyncio.run(capnp.run(main()))"])
    client = subprocess.Popen([sys.executable, "-c", script])
    try:
        recorder.settimeout(30)
        conn, _ = recorder.accept()
        conn.settimeout(2)  # the client waits for an answer: 2 s of silence ends the message
        data = bytearray()
        with contextlib.suppress(socket.timeout):
            while chunk := conn.recv(1 << 20):
                data += chunk
        conn.close()
    finally:
        client.kill()
        client.wait()
        recorder.close()
    assert len(data) > 8 * held
    return bytes(data)


def seconds_to_answer_or_drop(port, message, outcome):
    """Send `message` on a new connection; note in outcome how long until the server answered
    (a byte) or closed the connection, from the first byte sent (None: not within 60 s)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)
    started = time.monotonic()
    try:
        sock.sendall(message)
        sock.recv(1)
    except socket.timeout:
        outcome.append(None)
        return
    except OSError:  # reset or broken pipe: dropped
        pass
    finally:
        sock.close()
    outcome.append(time.monotonic() - started)


def test_huge_calls_from_unregistered_connections_are_dropped_before_they_are_read(parent):
    message = recorded_huge_request_jobs(held=7_800_000)  # 62 MB
    outcome = []
    senders = [threading.Thread(target=seconds_to_answer_or_drop,
                                args=(parent.port, message, outcome)) for _ in range(8)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert all(seconds is not None and seconds < 1.0 for seconds in outcome), outcome
    assert memory_peak_mb(parent.proc.pid) < 300
    # The parent goes on serving at once: its CPU was not spent on the calls.
    started = time.monotonic()
    assert status(parent)["pending_jobs"] == 3
    assert time.monotonic() - started < 10
    assert "Traceback" not in parent.log()


def frame_header(size_bytes):
    """The header of a Cap'n Proto frame whose message (one segment) is size_bytes long."""
    return struct.pack("<II", 0, size_bytes // 8)


@pytest.mark.parametrize("over", [False, True], ids=["at-the-limit", "past-the-limit"])
def test_the_message_limit_of_an_unregistered_connection_holds_at_its_edge(
        tmp_path, parent_config, processes, over):
    write_chain(tmp_path / "chain.json", 100, [])
    limit = 2048
    config = parent_config(rpc_unregistered_max_message_bytes=limit,
                           rpc_register_timeout_seconds=3.0)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("Parent validator serving")
    sock = socket.create_connection(("127.0.0.1", common.load_config(config).parent_port))
    # Only the header: a message past the limit is refused before its body arrives.
    sock.sendall(frame_header(limit + 8 if over else limit))
    closed, _, _ = select.select([sock], [], [], 1.5)
    if over:
        assert closed and sock.recv(1) == b""
    else:
        assert not closed  # the server waits for the body (until the register timeout)
    sock.close()


def test_a_registered_connection_sends_what_its_traffic_needs(
        tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(max_result_bytes=1 << 20)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 1 ")
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).parent_port)
    assert client.call("registerChild", childId="c1", endpoint="127.0.0.1:1")["success"]
    [job] = client.call("requestJobs", childId="c1", maxJobs=1)["jobs"]
    result = json.dumps({"details": "x" * ((1 << 20) - 20)})  # a 1 MiB result: 16 x the limit
    reply = client.call("requestJobs", childId="c1", maxJobs=0, heldJobs=[job["jobId"]],
                        results=[{"jobId": job["jobId"], "success": True, "result": result}])
    assert reply["replies"] == [{"acknowledged": True, "message": "recorded"}]
    # Lists are counted before they are decoded; past a limit the call gets a message.
    reply = client.call("requestJobs", childId="c1", maxJobs=0, heldJobs=[1] * 10_001)
    assert reply["error"] == "10001 heldJobs in one call; the limit is 10000"
    assert client.call("requestJobs", childId="c1", maxJobs=0,
                       heldJobs=[1] * 10_000)["error"] == ""


def test_a_flood_of_a_childs_port_does_not_stop_its_parents_pushes(
        tmp_path, parent_config, child_config, processes, wallets):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(auth="on", **identity(wallets, "parent"), push_jobs=True,
                           allowed_child_hotkeys=[wallets["c1"].ss58_address])
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("New job 1 ")
    port = common.load_config(config).parent_port
    # Polls 30 s apart: a new job reaches the child by a push or not at all.
    path = child_config("c1", port, auth="on", **identity(wallets, "c1"), poll_interval=30.0,
                        parent_hotkey=wallets["parent"].ss58_address)
    child = processes(["child.py", "--config", path], tmp_path / "c1.log")
    parent.wait_for_log("Child c1 completed job 1")
    flood = IdleFlood(common.load_config(path).child_port, addresses=30, per_address=10)
    try:
        wait_until(lambda: flood.opened >= 400, what="the child closing idle connections")
        for block, job_id in ((101, 2), (102, 3)):
            write_chain(tmp_path / "chain.json", block,
                        [commitment(i) for i in range(1, job_id + 1)])
            parent.wait_for_log(f"Pushed job {job_id} to child c1", timeout=20)
    finally:
        flood.stop()
    assert child.proc.poll() is None
