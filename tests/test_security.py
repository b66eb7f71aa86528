"""Hotkey authentication: only allowed child validators register, each connection serves only
the child that registered on it, and a child takes pushed jobs only from its parent."""

import contextlib
import json
import re
import shutil
import socket
import subprocess
import struct
import sys
import threading
import time
import types

import pytest
from conftest import ROOT, commitment, free_port, wait_until, write_chain, write_toml

import auth
import common
from rpc import PeerUnavailable, RpcClient


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    """Hotkeys made with the bittensor SDK, without passwords: name -> keypair."""
    import bittensor
    path = tmp_path_factory.mktemp("wallets")
    keys = {}
    for name in ("parent", "c1", "c2", "stranger"):
        wallet = bittensor.Wallet(name="test", hotkey=name, path=str(path))
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        keys[name] = wallet.hotkey
    keys["path"] = str(path)
    return keys


def identity(wallets, name):
    return {"wallet_path": wallets["path"], "wallet_name": "test", "hotkey_name": name}


@pytest.fixture
def parent(tmp_path, parent_config, processes, rpc, wallets):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    config = parent_config(auth="on", auth_window_seconds=30.0, **identity(wallets, "parent"),
                           allowed_child_hotkeys=[wallets["c1"].ss58_address,
                                                  wallets["c2"].ss58_address])
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 3 ")
    proc.port = common.load_config(config).parent_port
    proc.connect = lambda: RpcClient(rpc, "127.0.0.1", proc.port)
    return proc


def signed_registration(client, wallets, signer, child_id, claimed=None, timestamp=None,
                        nonce=None):
    """registerChild's parameters, signed by `signer` (claiming `claimed`'s hotkey) over the
    challenge that `client`'s connection is given first, as a real child does."""
    challenge = client.call("challenge")["challenge"]
    endpoint = "127.0.0.1:9000"
    timestamp = timestamp or int(time.time() * 1000)
    nonce = nonce or f"nonce-{time.monotonic_ns()}"
    message = auth.signed_message(*auth.registration_fields(
        child_id, endpoint, wallets["parent"].ss58_address, challenge), timestamp, nonce)
    return {"childId": child_id, "endpoint": endpoint, "timestamp": timestamp, "nonce": nonce,
            "hotkey": wallets[claimed or signer].ss58_address,
            "signature": wallets[signer].sign(message)}


def signed_result(wallets, child_id, job_id, attempt, success, result, signer=None):
    """A JobResult as a child with auth on reports it: signed by `signer` (the child)."""
    message = auth.signed_message(*auth.result_fields(child_id, job_id, attempt, success,
                                                          result))
    return {"jobId": job_id, "success": success, "result": result, "attempt": attempt,
            "signature": wallets[signer or child_id].sign(message)}


REFUSED = {"success": False, "message": "not allowed"}


def test_only_allowed_hotkeys_with_good_fresh_signatures_register(parent, wallets):
    client = parent.connect()
    assert client.call("registerChild",
                       **signed_registration(client, wallets, "stranger", "x")) == REFUSED
    # c2 signs but claims to be c1
    assert client.call("registerChild",
                       **signed_registration(client, wallets, "c2", "x", claimed="c1")) == REFUSED
    stale = int(time.time() * 1000) - 60_000
    assert client.call("registerChild", **signed_registration(
        client, wallets, "c1", "x", timestamp=stale)) == REFUSED
    unsigned = {"childId": "x", "endpoint": "127.0.0.1:1"}
    assert client.call("registerChild", **unsigned) == REFUSED
    good = signed_registration(client, wallets, "c1", "c1")
    assert client.call("registerChild", **good) == {"success": True, "message": "registered as c1"}
    # A replay, on a connection given its own challenge, or none.
    other = parent.connect()
    other.call("challenge")
    assert other.call("registerChild", **good) == REFUSED
    assert parent.connect().call("registerChild", **good) == REFUSED
    # A challenge serves one registration, answered or not.
    assert client.call("registerChild", **dict(good, nonce="another-nonce")) == REFUSED
    stats = json.loads(client.call("getStats")["json"])
    assert stats["auth_failures"] == 7 and [c["child_id"] for c in stats["children"]] == ["c1"]
    log = parent.log()
    # Logged with the caller's address (our client's side of its connection), then
    # rate-limited.
    assert re.search(r"Refused registration of 'x' from 127\.0\.0\.1:\d+: hotkey", log)
    assert log.count("Refused ") == 1


def test_a_connection_serves_only_the_child_registered_on_it(parent, wallets):
    first, second = parent.connect(), parent.connect()
    assert first.call("registerChild",
                      **signed_registration(first, wallets, "c1", "c1"))["success"]
    [job] = first.call("requestJobs", childId="c1", maxJobs=1)["jobs"]
    # Another connection, not registered, or registered as another child, cannot act as c1.
    assert second.call("requestJobs", childId="c1", maxJobs=5) == {
        "jobs": [], "replies": [], "revoked": [], "error": "not allowed"}
    assert second.call("registerChild",
                       **signed_registration(second, wallets, "c2", "c2"))["success"]
    assert second.call("requestJobs", childId="c1", maxJobs=5)["error"] == "not allowed"
    result = signed_result(wallets, "c1", job["jobId"], job["attempt"], True, "{}")
    assert second.call("reportJobCompletion", childId="c1", **result) == {
        "acknowledged": False, "message": "not allowed"}
    # c2's hotkey cannot take over the id c1 registered with.
    assert second.call("registerChild",
                       **signed_registration(second, wallets, "c2", "c1")) == REFUSED
    assert first.call("reportJobCompletion", childId="c1", **result)["message"] == "recorded"


def test_signed_children_run_the_whole_job_flow_and_take_pushes_only_from_the_parent(
        tmp_path, parent, child_config, processes, rpc, wallets):
    config = child_config("c1", parent.port, auth="on", **identity(wallets, "c1"),
                          parent_hotkey=wallets["parent"].ss58_address)
    child = processes(["child.py", "--config", config], tmp_path / "c1.log")
    child.wait_for_log("Successfully registered with parent validator as c1")
    for job_id in (1, 2, 3):
        parent.wait_for_log(f"Child c1 completed job {job_id}")
    # receiveJob: unsigned, or signed by another hotkey, is refused; the parent's is taken.
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).child_port)
    job = {"jobId": 50, "attempt": 1, "hfRepoId": "org/pushed", "hfRepoCommit": "abc"}

    def sealed(signer):  # the job's own signature, over all its fields
        return {**job, "signature": wallets[signer].sign(
            auth.signed_message(*auth.job_fields("c1", job)))}

    assert client.call("receiveJob", job=sealed("parent")) == {"accepted": False,
                                                               "message": "not allowed"}

    def signed(signer):
        timestamp, nonce = int(time.time() * 1000), f"n-{time.monotonic_ns()}"
        message = auth.signed_message("receiveJob", "c1", 50, timestamp, nonce)
        return {"timestamp": timestamp, "nonce": nonce, "signature": wallets[signer].sign(message)}

    assert client.call("receiveJob", job=sealed("parent"), **signed("stranger"))["accepted"] \
        is False
    # The call is the parent's, but the job is not as the parent signed it: refused, with why.
    for job_not_sealed in (job, sealed("stranger"), {**sealed("parent"), "hfRepoCommit": "def"}):
        answer = client.call("receiveJob", job=job_not_sealed, **signed("parent"))
        assert answer["accepted"] is False
        assert answer["message"].startswith("its signature does not hold for parent_hotkey")
    assert client.call("receiveJob", job=sealed("parent"), **signed("parent")) == {
        "accepted": True, "message": "queued"}
    child.wait_for_log("Refused receiveJob of job 50")


def test_auth_off_is_announced_loudly(tmp_path, parent_config, processes):
    write_chain(tmp_path / "chain.json", 100, [])
    proc = processes(["parent.py", "--config", parent_config(auth="off")], tmp_path / "p.log")
    proc.wait_for_log(r'AUTH IS OFF \(auth = "off"\): anyone who reaches port \d+ can register')


def test_a_child_needs_its_parents_hotkey_unless_auth_is_off(tmp_path):
    from conftest import write_toml
    path = write_toml(tmp_path / "c.toml", {"pg_database": "x", "validator_id": "c1"})
    with pytest.raises(common.ConfigError, match="key 'parent_hotkey'"):
        common.load_config(path)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name):
    """A CA and one certificate it signs, valid for localhost and 127.0.0.1."""
    directory.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", f"/CN={name}-ca", cwd=directory)
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=localhost",
            cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.crt", "-days", "1", "-extfile", "san.ext",
            cwd=directory)
    return {"tls_cert": str(directory / "node.crt"), "tls_key": str(directory / "node.key"),
            "tls_ca": str(directory / "ca.crt")}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make test certificates")
    directory = tmp_path_factory.mktemp("tls")
    return {"good": make_ca(directory / "good", "good"),
            "rogue": make_ca(directory / "rogue", "rogue")}


def tls_client(rpc, port, keys):
    cfg = types.SimpleNamespace(config_path="test", **keys)
    return RpcClient(rpc, "127.0.0.1", port, tls=auth.tls_contexts(cfg)[1])


def test_signed_children_over_mutual_tls_run_the_job_flow_and_others_are_refused(
        tmp_path, parent_config, child_config, processes, rpc, wallets, certificates):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    good = certificates["good"]
    config = parent_config(auth="on", **identity(wallets, "parent"), **good, push_jobs=True,
                           allowed_child_hotkeys=[wallets["c1"].ss58_address])
    port = common.load_config(config).parent_port
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log(r"Parent validator serving on 127.0.0.1:\d+ \(TLS 1.3\)")
    child = processes(["child.py", "--config", child_config(
        "c1", port, auth="on", **identity(wallets, "c1"), **good, parent_host="localhost",
        # Polls rarer than the chain's: job 4 is pushed, not taken by a poll in between.
        poll_interval=2.0, parent_hotkey=wallets["parent"].ss58_address)], tmp_path / "c1.log")
    child.wait_for_log("Successfully registered with parent validator as c1")
    for job_id in (1, 2, 3):
        parent.wait_for_log(f"Child c1 completed job {job_id}")
    write_chain(tmp_path / "chain.json", 101, [commitment(i) for i in (1, 2, 3, 4)])
    parent.wait_for_log("Pushed job 4 to child c1")  # the parent's client side of TLS too
    parent.wait_for_log("Child c1 completed job 4")

    plaintext = RpcClient(rpc, "127.0.0.1", port, timeout=5)
    with pytest.raises(PeerUnavailable):
        plaintext.call("ping")
    # A client certificate from another CA is refused; so is a server the client cannot trust.
    with pytest.raises(PeerUnavailable):
        tls_client(rpc, port, dict(good, tls_cert=certificates["rogue"]["tls_cert"],
                                   tls_key=certificates["rogue"]["tls_key"])).call("ping")
    with pytest.raises(PeerUnavailable):
        tls_client(rpc, port, certificates["rogue"]).call("ping")
    assert tls_client(rpc, port, good).call("ping") == {"pong": "pong from parent"}
    status = subprocess.run([sys.executable, ROOT / "validator.py", "status", "--parent-port",
                             str(port), "--config", config, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["children"][0]["child_id"] == "c1"


def test_unreadable_tls_files_name_the_keys(tmp_path):
    cfg = types.SimpleNamespace(config_path="x.toml", tls_cert=str(tmp_path / "none.crt"),
                                tls_key=str(tmp_path / "none.key"), tls_ca="")
    with pytest.raises(common.ConfigError, match="x.toml: keys 'tls_cert', 'tls_key', 'tls_ca'"):
        auth.tls_contexts(cfg)


def test_a_tls_handshake_that_never_comes_is_closed_after_the_register_timeout(
        tmp_path, parent_config, processes, certificates):
    write_chain(tmp_path / "chain.json", 100, [])
    config = parent_config(**certificates["good"], rpc_register_timeout_seconds=1.0)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log(r"Parent validator serving on 127.0.0.1:\d+ \(TLS 1.3\)")
    silent = socket.create_connection(("127.0.0.1", common.load_config(config).parent_port))
    silent.settimeout(10)  # asyncio's own handshake deadline is 60 s
    started = time.monotonic()
    assert silent.recv(1) == b""
    assert time.monotonic() - started < 5
    silent.close()


# -- A registration captured on the wire and replayed ------------------------------------------

class RecordingProxy:
    """Between one client and 127.0.0.1:target_port, on loopback: passes the bytes both ways
    and records them, in the order they went, as ("sent" or "answered", bytes). At most 1 MiB
    is recorded."""

    LIMIT = 1 << 20

    def __init__(self, target_port):
        self.target_port, self.transcript, self.recorded = target_port, [], 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.pumps = []
        threading.Thread(target=self._accept, name="recording-proxy", daemon=True).start()

    def _accept(self):
        with self.listener:
            client, _ = self.listener.accept()  # one connection only
        server = socket.create_connection(("127.0.0.1", self.target_port))
        for source, sink, kind in ((client, server, "sent"), (server, client, "answered")):
            pump = threading.Thread(target=self._pump, args=(source, sink, kind), daemon=True)
            pump.start()
            self.pumps.append(pump)

    def _pump(self, source, sink, kind):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self.lock:  # recorded before it passes: the order is the wire's
                    if self.recorded + len(data) <= self.LIMIT:
                        self.transcript.append((kind, data))
                        self.recorded += len(data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def closed(self):
        return len(self.pumps) == 2 and not any(pump.is_alive() for pump in self.pumps)

    def sent(self):
        return b"".join(data for kind, data in self.transcript if kind == "sent")


def messages(data):
    """How many whole Cap'n Proto messages (frames) `data` holds."""
    count = at = 0
    while at + 4 <= len(data):
        segments = int.from_bytes(data[at:at + 4], "little") + 1
        header = (4 + 4 * segments + 7) // 8 * 8
        if at + header > len(data):
            break
        sizes = struct.unpack_from(f"<{segments}I", data, at + 4)
        at += header + 8 * sum(sizes)
        if at <= len(data):
            count += 1
    return count


def replay(transcript, port):
    """Send the recorded client bytes on a new connection to `port`, each chunk once as many
    messages came back as the recorded client had got before sending it (question ids are
    reused only once answered). Returns (the replayer's address, all it got back)."""
    received, answered = b"", b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        address = "127.0.0.1:%d" % sock.getsockname()[1]
        for kind, data in transcript:
            if kind == "answered":
                answered += data
                continue
            while messages(received) < messages(answered):
                more = sock.recv(65536)
                assert more, "the parent closed the replayed connection"
                received += more
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(TimeoutError, OSError):
            while more := sock.recv(65536):
                received += more
    return address, received


def honest_registration(rpc, port, wallets, child_id="c1"):
    """What a real child with auth on does on a new connection: challenge, registerChild
    signed over that challenge (auth.Identity, as the child signs), then a poll."""
    me = auth.Identity(types.SimpleNamespace(config_path="test", **identity(wallets, child_id)))
    client = RpcClient(rpc, "127.0.0.1", port)
    challenge = client.call("challenge")["challenge"]
    endpoint = "127.0.0.1:9000"
    timestamp, nonce, signature = me.sign(*auth.registration_fields(
        child_id, endpoint, wallets["parent"].ss58_address, challenge))
    registered = client.call("registerChild", childId=child_id, endpoint=endpoint,
                             hotkey=me.hotkey, timestamp=timestamp, nonce=nonce,
                             signature=signature)
    polled = client.call("requestJobs", childId=child_id, maxJobs=1)
    client.close()
    return registered, polled


def test_a_registration_captured_on_the_wire_is_refused_by_every_parent_at_every_time(
        tmp_path, make_dsn, processes, rpc, wallets):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2, 3)])
    dsn, configs, ports = make_dsn(), {}, {}
    for name in ("a", "b"):  # two parents on one database, as in test_standby
        ports[name] = free_port()
        configs[name] = write_toml(tmp_path / f"parent_{name}.toml", {
            "pg_database": dsn, "is_parent_validator": True, "auth": "on",
            **identity(wallets, "parent"), "allowed_child_hotkeys": [wallets["c1"].ss58_address],
            "listen_host": "127.0.0.1", "parent_host": "127.0.0.1", "parent_port": ports[name],
            "log_level": "DEBUG", "leader_timeout_seconds": 4.0,
            "subtensor": {"network": "file", "commitments_file": str(tmp_path / "chain.json")},
            "neuron": {"sync_frequency": 0.2}})
    runs = {}

    def start(name, log_name):
        runs[name] = processes(["parent.py", "--config", configs[name]], tmp_path / log_name)
        return runs[name]

    def query(sql):
        with common.connect(dsn) as conn:
            return conn.execute(sql).fetchall()

    def handed_out():
        return query("select job_id, attempt, child_id from assignments order by 1, 2")

    def replayed_and_refused(name, transcript):
        before, failures = handed_out(), stats(name)["auth_failures"]
        address, answers = replay(transcript, ports[name])
        assert b"not allowed" in answers and b"registered as" not in answers
        # Counted (its log line is rate-limited: one every 10 s), never registered, no job.
        wait_until(lambda: stats(name)["auth_failures"] > failures, 10, "the refusal counted")
        assert f"Child c1 registered from {address}" not in runs[name].log()
        assert handed_out() == before
        return address

    def stats(name):
        return json.loads(RpcClient(rpc, "127.0.0.1", ports[name]).call("getStats")["json"])

    start("a", "a.log").wait_for_log("New job 3 ")
    proxy = RecordingProxy(ports["a"])
    registered, polled = honest_registration(rpc, proxy.port, wallets)
    assert registered == {"success": True, "message": "registered as c1"}
    assert [job["jobId"] for job in polled["jobs"]] == [1]
    wait_until(proxy.closed, 10, "the recorded connection to close")
    to_active = proxy.transcript
    assert b"c1" in proxy.sent() and handed_out() == [{"job_id": 1, "attempt": 1,
                                                       "child_id": "c1"}]

    # (a) to the same parent
    address = replayed_and_refused("a", to_active)
    runs["a"].wait_for_log(rf"Refused registration of 'c1' from {address}: bad signature")
    # (b) after its restart: the challenge is new, whatever the nonces remembered
    assert runs["a"].stop() == 0
    start("a", "a2.log").wait_for_log("Leadership taken")
    address = replayed_and_refused("a", to_active)
    runs["a"].wait_for_log(rf"Refused registration of 'c1' from {address}: bad signature")

    # (c) sent to the standby, which refused it (standby), replayed to the active parent
    start("b", "b.log").wait_for_log("Parent validator is a standby")
    proxy = RecordingProxy(ports["b"])
    registered, polled = honest_registration(rpc, proxy.port, wallets)
    assert registered["message"].startswith("standby") and polled["jobs"] == []
    wait_until(proxy.closed, 10, "the recorded connection to close")
    to_standby = proxy.transcript
    replayed_and_refused("a", to_standby)

    # (d) to the standby once it took over after a kill -9 of the active parent
    runs["a"].kill()
    runs["b"].wait_for_log("Parent validator active", timeout=15)
    address = replayed_and_refused("b", to_standby)
    runs["b"].wait_for_log(rf"Refused registration of 'c1' from {address}: bad signature")
    replayed_and_refused("b", to_active)
    assert "Traceback" not in runs["a"].log() + runs["b"].log()
