"""Bad and hostile input on the RPC port: each bad connection is closed, each bad value gets a
message that names it (never a traceback), and registered children are served throughout."""

import json
import os
import socket
import struct
import time

import pytest
from conftest import commitment, run_foreign_client, wait_until, write_chain

import common
from rpc import RpcClient


@pytest.fixture
def parent(tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    config = parent_config(rpc_idle_timeout_seconds=1.0, rpc_register_timeout_seconds=1.0,
                           rpc_max_connections=40, max_jobs_per_child=2, max_result_bytes=1000)
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 3 ")
    proc.port = common.load_config(config).parent_port
    proc.config = config
    proc.client = RpcClient(rpc, "127.0.0.1", proc.port)
    assert proc.client.call("registerChild", childId="good", endpoint="127.0.0.1:1")["success"]
    return proc


def raw_connection(port, payload=b""):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def closed_by_server(sock, within=10.0):
    """True once the server has closed the connection (recv gives b'' or a reset)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


def frame(segment_sizes, body):
    """A Cap'n Proto stream frame: segment count - 1, each segment's size in words, padding."""
    header = struct.pack(f"<I{len(segment_sizes)}I", len(segment_sizes) - 1, *segment_sizes)
    return header + b"\0" * (-len(header) % 8) + body


@pytest.mark.parametrize("payload", [
    os.urandom(4096),
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    struct.pack("<II", 2**31 - 1, 1) + b"\0" * 64,  # claims 2^31 segments
    frame([4], os.urandom(32)),  # a well-formed frame with a junk message
], ids=["random-bytes", "http", "2^31-segments", "junk-body"])
def test_garbage_closes_that_connection_and_others_are_served(parent, payload):
    sock = raw_connection(parent.port, payload)
    assert parent.client.call("ping") == {"pong": "pong from parent"}
    assert closed_by_server(sock)
    assert parent.client.call("requestJobs", childId="good", maxJobs=1)["error"] == ""


def test_silent_and_half_sent_connections_are_closed_after_the_idle_timeout(parent):
    silent = raw_connection(parent.port)
    half = raw_connection(parent.port, frame([100], b"\0" * 80))  # 800 bytes promised, 80 sent
    start = time.monotonic()
    assert closed_by_server(silent) and closed_by_server(half)
    assert time.monotonic() - start < 8
    # A client that keeps calling is never idle.
    for _ in range(3):
        assert parent.client.call("ping")["pong"]
        time.sleep(0.5)
    assert parent.client.call("requestJobs", childId="good", maxJobs=0)["error"] == ""


def still_open(sock):
    """True while the server has not closed the connection (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def test_hundreds_of_idle_connections_never_displace_a_registered_child(parent):
    socks = []
    for _ in range(10):  # the child polls now and then, as a child does, while they pile up
        socks += [raw_connection(parent.port) for _ in range(30)]
        assert parent.client.call("requestJobs", childId="good", maxJobs=0)["error"] == ""
    # From one address at most rpc_max_unregistered_per_address (8) unregistered connections
    # stay open: each newer one closed the oldest.
    wait_until(lambda: sum(map(still_open, socks)) <= 8, what="the oldest idle ones closed")
    assert not any(map(still_open, socks[:-8]))
    for _ in range(5):  # the registered child's own connection keeps working
        started = time.monotonic()
        assert parent.client.call("requestJobs", childId="good", maxJobs=0)["error"] == ""
        assert time.monotonic() - started < 2
    assert RpcClient(parent.client.rpc, "127.0.0.1", parent.port).call("ping")
    assert all(closed_by_server(s) for s in socks)  # the rest within rpc_register_timeout
    parent.wait_for_log(r"Closed RPC connections lately \(last from 127\.0\.0\.1:\d+\): "
                        r"\d+ unregistered, closed to make room")


def stats(parent):
    return json.loads(parent.client.call("getStats")["json"])


def test_bad_values_get_a_message_that_names_them_and_change_nothing(parent):
    before = stats(parent)
    call = parent.client.call
    assert call("requestJobs", childId="nobody", maxJobs=5) == {
        "jobs": [], "replies": [], "revoked": [],
        "error": "unknown child 'nobody': call registerChild first"}
    assert call("registerChild", childId="", endpoint="127.0.0.1:1") == {
        "success": False, "message": "childId must be 1-64 letters, digits, '_', '.' or '-'"}
    assert call("registerChild", childId="x" * 65, endpoint="h:1")["success"] is False
    for endpoint in ("nohost", "h:0", "h:99999", ":80", "h:port", "h h:1", "[zz]:1"):
        assert call("registerChild", childId="c", endpoint=endpoint) == {
            "success": False, "message": f"endpoint {endpoint!r} is not host:port"}
    assert call("registerChild", childId="c", endpoint="h\0:1") == {
        "success": False, "message": "a text parameter contains a NUL character"}
    assert call("reportJobCompletion", childId="good", jobId=2**64 - 1, success=True,
                result="{}") == {"acknowledged": False, "message": f"unknown job {2**64 - 1}"}
    after = stats(parent)
    assert [c["child_id"] for c in after["children"]] == ["good"]
    assert (after["pending_jobs"], after["failed_jobs"]) == (before["pending_jobs"], 0)
    # maxJobs of 2^32-1 is capped by max_jobs_per_child.
    assert len(call("requestJobs", childId="good", maxJobs=2**32 - 1)["jobs"]) == 2
    assert "Traceback" not in parent.log()


def test_a_result_over_max_result_bytes_is_recorded_as_a_failure_that_says_so(parent):
    [job] = parent.client.call("requestJobs", childId="good", maxJobs=1)["jobs"]
    big = "x" * 60_000_000
    reply = parent.client.call("reportJobCompletion", childId="good", jobId=job["jobId"],
                               success=True, result=big)
    assert reply == {"acknowledged": True, "message": f"recorded as failed: result of job "
                     f"{job['jobId']} is 60000000 bytes; the limit is 1000 (max_result_bytes)"}
    assert parent.client.call("reportJobCompletion", childId="good", jobId=job["jobId"],
                              success=True, result="{}") == {"acknowledged": True,
                                                            "message": "already recorded"}


def test_text_that_is_not_utf8_gets_a_message_not_a_traceback(tmp_path, parent):
    # Data and Text look alike on the wire; this schema sends raw bytes where Text is due.
    schema = (common.HERE / "validator.capnp").read_text()
    schema = schema.replace("registerChild @0 (childId :Text", "registerChild @0 (childId :Data")
    (tmp_path / "bytes.capnp").write_text(schema)
    run = run_foreign_client(tmp_path / "bytes.capnp", parent.port, """
        r = await svc.registerChild(childId=b"bad\\xff\\xfe", endpoint="h:1")
        print(r.success, r.message)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False a text parameter is not valid UTF-8"
    assert [c["child_id"] for c in stats(parent)["children"]] == ["good"]


def test_a_childs_port_closes_garbage_and_refuses_bad_jobs_with_a_message(
        tmp_path, parent, child_config, processes, rpc):
    config = child_config("sturdy", parent.port, rpc_idle_timeout_seconds=1.0)
    child = processes(["child.py", "--config", config], tmp_path / "child.log")
    child.wait_for_log("Successfully registered")
    port = common.load_config(config).child_port
    sock = raw_connection(port, b"GET / HTTP/1.1\r\n\r\n")
    client = RpcClient(rpc, "127.0.0.1", port)
    assert client.call("receiveJob", job={"hfRepoId": "org/m"}) == {
        "accepted": False, "message": "job has no jobId or hfRepoId"}
    assert client.call("requestJobs", childId="x", maxJobs=1) == {
        "jobs": [], "replies": [], "revoked": [],
        "error": "requestJobs is not served by a child validator"}
    assert json.loads(client.call("getStats")["json"])["queued"] >= 0
    assert closed_by_server(sock)
    assert "Traceback" not in child.log()
