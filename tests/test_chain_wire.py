"""The chain side as an operator runs it: `[subtensor] address = "ws://..."`, BittensorChain built
by open_chain (no substrate= seam), the SDK's own websocket transport, and a loopback node
(tests/loopback_node.py) answering with finney's recorded bytes: the runtime's metadata and
subnet 1's metagraph at block 6852690 (hotkeys, uids, stake weights as finney encoded them).
Commitments, hyperparameters and later blocks are encoded with the SDK's codec over the recorded
metadata. The in-memory seam tests (test_bittensor_chain, test_weights) stay, for speed."""

import json
import logging
import re
import subprocess
import sys
import threading

import psutil
import psycopg
import pytest
from conftest import ROOT, wait_until, write_toml
from loopback_node import CODEC_475, GENESIS, NETUID, RECORDED_BLOCK, Chain, Node
from test_weights import Clock, add_job, score

import chain as chains
import common
import parent

RAO = 10**9


def submission(repo_id, revision):
    return json.dumps({"provider": "HF", "repo_id": repo_id, "revision": revision})


@pytest.fixture
def node(tmp_path, monkeypatch, token_symbol_cache):
    """A loopback node serving subnet 1 as recorded; the SDK's caches are the test's own (its
    runtime cache would otherwise skip the metadata download in later runs)."""
    monkeypatch.setenv("BITTENSOR_RUNTIME_CACHE_DIR", str(tmp_path / "runtime-cache"))
    served = Node(Chain())
    yield served
    served.close()


def jobs(dsn):
    """The jobs table's rows ([] until the parent made its schema)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("select to_regclass('jobs')").fetchone()[0] is None:
            return []
        return conn.execute("select miner_hotkey, miner_uid, hf_repo_id, hf_repo_commit, "
                            "commit_block, status, result from jobs order by job_id").fetchall()


def test_the_parent_process_follows_finneys_subnet_through_the_sdks_transport(
        node, parent_config, make_dsn, processes, tmp_path):
    chain, dsn = node.chain, make_dsn()
    hot = chain.hotkeys()
    stakes = chain.graph["total_stake"]
    # Real stake weights of subnet 1 (rao): uid 0 is below 10, uids 3, 10 and 13 above.
    assert (stakes[0], stakes[3], stakes[10], stakes[13]) == (
        2557172316, 32787516319, 34938289496, 31905441385)
    long_text = submission("a-research-org/a-rather-long-model-name-for-this-subnet-v2",
                           "0123456789abcdef0123456789abcdef01234567")
    chain.commit(hot[0], submission("org/zero", "0" * 40))      # stake below the threshold
    chain.commit(hot[3], long_text)                              # two Raw fields on chain
    chain.commit(hot[10], submission("org/ten", "a" * 40), block=RECORDED_BLOCK - 1)
    chain.seal(hot[13])                                          # sealed: nothing yet
    config = parent_config(pg_database=dsn, neuron={"min_stake_threshold": 10.0},
                           subtensor={"network": "finney", "address": node.url,
                                      "netuid": NETUID})
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")

    wait_until(lambda: len(jobs(dsn)) == 2, what="the first sync's jobs")
    # The oldest submission first (uid 10's, a block earlier): the lower job id.
    assert jobs(dsn) == [
        (hot[10], 10, "org/ten", "a" * 40, RECORDED_BLOCK - 1, "pending", None),
        (hot[3], 3, "a-research-org/a-rather-long-model-name-for-this-subnet-v2",
         "0123456789abcdef0123456789abcdef01234567", RECORDED_BLOCK, "pending", None)]

    # Two blocks on: uid 3 commits a new revision, uid 10 goes to a new hotkey, and the
    # chain reveals uid 13's timelocked commitment.
    chain.advance(2)
    chain.commit(hot[3], submission("org/three", "b" * 40))
    chain.register(10, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", 50 * RAO)
    chain.reveal(hot[13], submission("org/thirteen", "c" * 40))
    head = RECORDED_BLOCK + 2
    cancelled = [('{"cancelled": "superseded by job 3"}'), '{"cancelled": "miner deregistered"}']
    wait_until(lambda: len(jobs(dsn)) == 4 and jobs(dsn)[1][5] == "cancelled",
               what="the second sync's jobs")
    assert jobs(dsn) == [
        (hot[10], 10, "org/ten", "a" * 40, RECORDED_BLOCK - 1, "cancelled", cancelled[1]),
        (hot[3], 3, "a-research-org/a-rather-long-model-name-for-this-subnet-v2",
         "0123456789abcdef0123456789abcdef01234567", RECORDED_BLOCK, "cancelled", cancelled[0]),
        (hot[3], 3, "org/three", "b" * 40, head, "pending", None),
        (hot[13], 13, "org/thirteen", "c" * 40, head, "pending", None)]
    assert "Chain sync failed" not in proc.log()
    assert proc.stop() == 0
    assert not node.connections  # the parent closed its websocket


# ---------------------------------------------------------------------------------------------
# Weights. The recorded runtime of block 6852690 (spec 343) has no
# SubtensorModule.SubnetEpochConsensus, which bittensor 11.3's SetWeights intent reads before it
# plans or signs: on that runtime the SDK cannot set weights at all (the first two tests).
# finney's spec 475 has it: the node upgrades to it at block UPGRADE (its state holds the new
# code; the SDK reads it at 343, its parent's runtime, and every later block at 475).
#
# Spec 475 is recorded as V14 metadata only, and V14 describes no runtime API: the SDK cannot
# even encode SubnetInfoRuntimeApi.get_metagraph at a block it reads at 475. So the subnet read
# (a runtime API) is served from block UPGRADE, read at 343, and the chain makes its next block
# right after that answer (Node.ticks): the SDK's intent then reads, plans and signs at 475.
# ---------------------------------------------------------------------------------------------

MISSING = "StorageFunctionNotFound: storage function SubtensorModule.SubnetEpochConsensus " \
          "not found"
UPGRADE = RECORDED_BLOCK + 1
U16 = [(3, 65535), (4, 21845)]  # the plan of weights 0.75 and 0.25: max-upscaled to u16


@pytest.fixture
def upgraded(tmp_path, monkeypatch, token_symbol_cache):
    """A loopback node whose head is block UPGRADE, the first whose state holds spec 475."""
    monkeypatch.setenv("BITTENSOR_RUNTIME_CACHE_DIR", str(tmp_path / "runtime-cache"))
    chain = Chain(upgrade_at=UPGRADE)
    chain.advance()
    served = Node(chain)
    served.ticks.add(METAGRAPH)
    yield served
    served.close()


def parent_with_weights(node, tmp_path, make_dsn):
    """(cfg, db, wallet): a parent with [weights] on a ws:// address; its hotkey holds uid 7
    of the recorded subnet, and miners of uids 3 and 4 have scores."""
    import bittensor
    wallet = bittensor.Wallet(name="test", hotkey="parent", path=str(tmp_path / "wallets"))
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    node.chain.register(7, wallet.hotkey.ss58_address, 5000 * RAO)
    dsn = make_dsn()
    path = write_toml(tmp_path / "parent.toml", {
        "pg_database": dsn, "is_parent_validator": True, "auth": "off",
        "wallet_path": str(tmp_path / "wallets"), "wallet_name": "test",
        "hotkey_name": "parent", "subtensor": {"address": node.url, "netuid": NETUID},
        "weights": {"enabled": True, "every_blocks": 10}})
    db = common.Database(dsn, parent.SCHEMA)
    hot = node.chain.hotkeys()
    add_job(db, hot[3], RECORDED_BLOCK - 10, score(3.0))
    add_job(db, hot[4], RECORDED_BLOCK - 10, score(1.0))
    return common.load_config(path), db, wallet


@pytest.fixture
def ours(node, tmp_path, make_dsn):
    cfg, db, wallet = parent_with_weights(node, tmp_path, make_dsn)
    yield cfg, db, wallet
    db.close()


@pytest.fixture
def ours475(upgraded, tmp_path, make_dsn):
    cfg, db, wallet = parent_with_weights(upgraded, tmp_path, make_dsn)
    yield cfg, db, wallet
    db.close()


def submitted(node):
    return [m for m, _ in node.requests if m.startswith("author_")]


def weights_command(cfg):
    result = subprocess.run([sys.executable, "validator.py", "weights", "--json", "--config",
                             cfg.config_path], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def set_once(cfg, db, wallet, clock):
    """One due check of a WeightSetter on BittensorChain as open_chain builds it, until the
    submission has its answer."""
    setter = chains.WeightSetter(cfg, db, chains.open_chain(cfg), wallet.hotkey, clock)
    try:
        setter.maybe_set()
        wait_until(lambda: setter.maybe_set() or setter.submission is None, what="the answer")
    finally:
        setter.chain.close()
    return setter


def test_the_weights_command_shows_the_weights_and_why_the_sdk_has_no_plan(node, ours):
    cfg, _, _ = ours
    report = weights_command(cfg)
    assert report["block"] == RECORDED_BLOCK
    assert [(r["uid"], r["weight"], r["u16"]) for r in report["rows"]] == [
        (3, 0.75, None), (4, 0.25, None)]
    assert report["note"] == f"the SDK's dry run failed: {MISSING}"
    assert submitted(node) == []


def test_a_due_set_is_refused_by_the_sdk_before_signing_and_tried_again(node, ours):
    cfg, db, wallet = ours
    clock = Clock()
    setter = set_once(cfg, db, wallet, clock)
    [row] = db.query("select block, uids, success, message from weight_attempts")
    assert (row["block"], row["uids"], row["success"]) == (RECORDED_BLOCK, [3, 4], False)
    assert row["message"] == MISSING
    assert submitted(node) == []
    assert setter.next_check == pytest.approx(clock.now + 10 * 12.0)  # the next interval


def test_at_spec_475_the_weights_command_prints_the_sdks_u16_plan(upgraded, ours475):
    cfg, _, _ = ours475
    upgraded.chain.set_storage("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    report = weights_command(cfg)
    assert report["block"] == UPGRADE and report["note"] == ""
    assert [(r["uid"], r["weight"], r["u16"]) for r in report["rows"]] == [
        (3, 0.75, 65535), (4, 0.25, 21845)]
    assert submitted(upgraded) == []
    # The SDK planned at 475: it downloaded that metadata (V15 asked for, none, then V14).
    assert [m for m, _ in upgraded.requests if m == "state_getMetadata"] == ["state_getMetadata"]


def signed_at_475(node, wallet):
    """The one extrinsic the node received, decoded with spec 475's metadata, after checking
    that it is signed by our hotkey with a valid sr25519 signature over its signing payload."""
    from bittensor.sp_core import Keypair
    assert [m for m in submitted(node) if m != "author_unwatchExtrinsic"] == [
        "author_submitAndWatchExtrinsic"]
    [raw] = node.chain.extrinsics
    extrinsic = CODEC_475.decode_extrinsic(raw)
    assert extrinsic["address"] == wallet.hotkey.ss58_address
    period, phase = extrinsic["era"]  # mortal: born at the last block of its phase
    head = node.chain.head
    born = head - (head - phase) % period
    call = CODEC_475.compose_call("SubtensorModule", extrinsic["call"]["call_function"],
                                  {a["name"]: a["value"] for a in extrinsic["call"]["call_args"]})
    signature = extrinsic["signature"]
    signature = bytes.fromhex((signature.get("Sr25519") if isinstance(signature, dict)
                               else signature).removeprefix("0x"))
    key = Keypair(ss58_address=wallet.hotkey.ss58_address)

    def payload(era_block):
        return CODEC_475.signature_payload(
            call, era={"period": period, "phase": phase}, nonce=extrinsic["nonce"],
            tip=extrinsic["tip"], tip_asset_id=None, genesis_hash=GENESIS,
            era_block_hash=node.chain.block_hash(era_block))
    # Born at `born`, or a period earlier if the head passed a block of its phase since.
    assert any(key.verify(payload(b), signature) for b in (born, born - period))
    assert not key.verify(payload(born - 1), signature)  # over other bytes: not valid
    return extrinsic["call"]


def args(call):
    return {a["name"]: a["value"] for a in call["call_args"]}


def test_a_due_set_sends_one_extrinsic_signed_by_our_hotkey(upgraded, ours475, caplog):
    cfg, db, wallet = ours475
    caplog.set_level(logging.INFO)
    upgraded.chain.set_storage("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    set_once(cfg, db, wallet, Clock())
    call = signed_at_475(upgraded, wallet)
    assert (call["call_module"], call["call_function"]) == ("SubtensorModule",
                                                            "set_mechanism_weights")
    assert (args(call)["netuid"], args(call)["mecid"]) == (NETUID, 0)
    assert list(zip(args(call)["dests"], args(call)["weights"])) == U16
    [row] = db.query("select block, uids, commit_reveal, success, message from weight_attempts")
    assert (row["block"], row["uids"], row["commit_reveal"], row["success"]) == (
        UPGRADE, [3, 4], False, True)
    assert row["message"] == "Success"
    assert f"Weights set on subnet {NETUID} for 2 uids (block {UPGRADE})" in caplog.messages
    # The chain counts our weights as set: its LastUpdate of uid 7 is the including block.
    assert upgraded.chain.graph["last_update"][7] == upgraded.chain.head


def test_with_commit_reveal_on_the_set_is_one_timelocked_commit(upgraded, ours475):
    cfg, db, wallet = ours475  # the recorded subnet has commit-reveal on
    set_once(cfg, db, wallet, Clock())
    call = signed_at_475(upgraded, wallet)
    assert call["call_function"] == "commit_timelocked_mechanism_weights"
    commit = args(call)
    assert (commit["netuid"], commit["mecid"], commit["commit_reveal_version"]) == (NETUID, 0, 4)
    # The plan is sealed (drand timelock): the uids and values cannot be read before the round.
    assert len(bytes.fromhex(commit["commit"].removeprefix("0x"))) > 100
    [row] = db.query("select commit_reveal, success, message from weight_attempts")
    assert (row["commit_reveal"], row["success"]) == (True, True)
    assert row["message"] == f"Success (timelocked: revealed at drand round " \
                             f"{commit['reveal_round']})"


def test_a_chain_error_in_the_events_is_recorded_as_a_failed_attempt(upgraded, ours475, caplog):
    cfg, db, wallet = ours475
    upgraded.chain.set_storage("SubtensorModule", "CommitRevealWeightsEnabled", [NETUID], False)
    upgraded.chain.fail_with("SubtensorModule", "NeuronNoValidatorPermit")
    clock = Clock()
    setter = set_once(cfg, db, wallet, clock)
    call = args(signed_at_475(upgraded, wallet))
    assert list(zip(call["dests"], call["weights"])) == U16
    [row] = db.query("select success, message from weight_attempts")
    assert row["success"] is False
    # The SDK's text for pallet 7's error 15 at spec 475 (its docs in the recorded metadata).
    assert row["message"] == "The caller is attempting to set non-self weights without being " \
                             "a permitted validator."
    assert f"Weights not set (tried again in 10 blocks): {row['message']}" in caplog.messages
    assert setter.next_check == pytest.approx(clock.now + 10 * 12.0)
    assert upgraded.chain.graph["last_update"][7] != upgraded.chain.head  # nothing was set


def test_within_the_rate_limit_nothing_is_sent_and_the_check_waits_for_the_block(
        upgraded, ours475):
    cfg, db, wallet = ours475
    upgraded.ticks.clear()
    upgraded.chain.set_last_update(7, UPGRADE - 5)  # the recorded rate limit: 100 blocks
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, chains.open_chain(cfg), wallet.hotkey, clock)
    try:
        setter.maybe_set()
        reads = upgraded.count()
        for _ in range(20):
            setter.maybe_set()
    finally:
        setter.chain.close()
    assert upgraded.count() == reads and submitted(upgraded) == []
    assert db.query("select * from weight_attempts") == []
    assert setter.next_check == pytest.approx(clock.now + 95 * 12.0)


def test_a_rate_limit_only_the_475_state_shows_is_refused_by_the_sdk_unsent(upgraded, ours475):
    """The subnet read (block UPGRADE) says our weights are due; in the next block, read at
    475, LastUpdate says we set them 3 blocks ago (another process with our hotkey did)."""
    cfg, db, wallet = ours475
    last_update = list(upgraded.chain.graph["last_update"])
    last_update[7] = UPGRADE - 2
    upgraded.chain.set_storage("SubtensorModule", "LastUpdate", [NETUID], last_update)
    clock = Clock()
    setter = set_once(cfg, db, wallet, clock)
    assert submitted(upgraded) == []
    [row] = db.query("select success, message from weight_attempts")
    assert row["success"] is False and "rate limit is 100 blocks" in row["message"]
    assert setter.next_check == pytest.approx(clock.now + 12.0)  # the next check reads the wait


# ---------------------------------------------------------------------------------------------
# Faults on the wire, through the parent's own loop (parent.run)
# ---------------------------------------------------------------------------------------------

SYNC_FAILED = "Chain sync failed (will retry): chain ws://127.0.0.1:"
METAGRAPH = "SubnetInfoRuntimeApi_get_metagraph"
COMMITMENTS = "state_queryStorageAt"  # the sync's second half: the commitments' values

# (fault, the request it hits, the chain's deadline, what the one log line says)
FAULTS = {
    # The SDK reconnects and sends the request again, 5 times, then gives up.
    "close": ("close", COMMITMENTS, 10.0,
              "RpcConnectionError: RPC request failed after exhausting endpoint retries: "
              r"received 1011 \(internal error\) node restarting"),
    "late": ("late", METAGRAPH, 1.0, "no answer within 1s"),
    # The SDK drops a frame that is not JSON and waits on.
    "garbage": ("garbage", COMMITMENTS, 1.0, "no answer within 1s"),
    "error": ("error", METAGRAPH, 5.0,
              "ChainError: Client error: Execution failed: Runtime panicked: out of memory$"),
    "undecodable": ("undecodable", METAGRAPH, 5.0, "ValueError: compact value wider than u128"),
    "refused": ("refused", None, 5.0, "RpcConnectionError: could not connect to any endpoint: "
                                      r"\[Errno 111\]"),
}


@pytest.fixture
def running_parent(node, parent_config, make_dsn, monkeypatch):
    """start(timeout) -> the dsn of parent.run, in a thread, on the node; the chain is opened
    by open_chain, then given `timeout` (open_chain's is 60 s)."""
    threads = []
    stop = threading.Event()

    def start(timeout):
        opened = chains.open_chain

        def open_chain(cfg):
            chain = opened(cfg)
            chain.timeout = timeout
            return chain
        monkeypatch.setattr(chains, "open_chain", open_chain)
        dsn = make_dsn()
        cfg = common.load_config(parent_config(
            pg_database=dsn, subtensor={"network": "finney", "address": node.url,
                                        "netuid": NETUID}))
        thread = threading.Thread(target=parent.run, args=(cfg, stop))
        thread.start()
        threads.append(thread)
        return dsn

    yield start
    stop.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()


def sync_said(caplog, level=logging.WARNING):
    """What the parent said about its chain syncs, at `level` or above."""
    return [r.getMessage() for r in caplog.records if r.name == common.log.name
            and r.levelno >= level and r.getMessage().startswith("Chain sync")]


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_on_the_wire_skips_the_sync_with_one_line_and_loses_nothing(
        node, running_parent, caplog, name):
    kind, method, timeout, why = FAULTS[name]
    caplog.set_level(logging.INFO)
    hot = node.chain.hotkeys()
    node.chain.commit(hot[3], submission("org/three", "3" * 40))
    dsn = running_parent(timeout)
    wait_until(lambda: len(jobs(dsn)) == 1, what="the first sync's job")

    # Mid-fault uid 3 leaves and uid 10 commits: a half-read must neither cancel uid 3's job
    # (its hotkey seems gone) nor lose uid 10's commitment.
    if kind == "refused":
        node.refuse()
    else:
        node.fault(kind, method, seconds=timeout + 1.0)
    failures_before = len(node.requests)
    node.chain.advance()
    node.chain.register(3, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY")
    node.chain.commit(hot[10], submission("org/ten", "a" * 40))
    wait_until(lambda: any(line.startswith(SYNC_FAILED) for line in sync_said(caplog)),
               timeout=timeout * 6 + 10, what="the failed sync's line")
    assert [row[5] for row in jobs(dsn)] == ["pending"]
    if kind == "refused":
        node.accept()
    node.fault(None)

    wait_until(lambda: len(jobs(dsn)) == 2, timeout=30, what="the next sync's job")
    assert [(row[0], row[5]) for row in jobs(dsn)] == [(hot[3], "cancelled"),
                                                       (hot[10], "pending")]
    [line] = sync_said(caplog)  # one line for the whole outage, saying why
    assert line.startswith(SYNC_FAILED) and re.search(why, line), line
    wait_until(lambda: any(m.startswith("Chain sync recovered after") for m in
                           sync_said(caplog, logging.INFO)), what="the recovery's line")
    assert len(node.requests) > failures_before


def test_a_hundred_syncs_with_faults_leak_no_connection_thread_or_memory(node, parent_config):
    """BittensorChain as open_chain builds it, read 100 times; every tenth read meets a fault
    (an undecodable answer, a refused connection), after which the chain drops its connection
    and the next read opens another. Its deadline is 2 s: after a refusal the SDK has been seen
    to leave the read waiting until the deadline, and closing its client after a failed read
    to wait out our 5-s bound on the close (websocket close handshakes that never finish)."""
    cfg = common.load_config(parent_config(subtensor={"network": "finney",
                                                      "address": node.url, "netuid": NETUID}))
    chain = chains.open_chain(cfg)
    chain.timeout = 2.0
    faults = [("undecodable", METAGRAPH), ("refused", None)]
    process = psutil.Process()
    try:
        for _ in range(10):  # warm-up: the codec, the caches
            chain.read()
        threads, memory = threading.active_count(), process.memory_info().rss
        failed = 0
        for i in range(100):
            kind, method = faults[i // 10 % len(faults)] if i % 10 == 9 else (None, None)
            node.refuse() if kind == "refused" else node.fault(kind, method)
            try:
                assert chain.read().block == RECORDED_BLOCK
            except chains.ChainUnavailable:
                failed += 1
            if kind == "refused":
                node.accept()
        node.fault(None)
        assert chain.read().block == RECORDED_BLOCK
        assert failed == 10
        assert len(node.connections) == 1  # only the connection in use is open
        assert threading.active_count() == threads
        assert process.memory_info().rss - memory < 30 * 2**20
    finally:
        chain.close()
    wait_until(lambda: not node.connections, timeout=5, what="the connection closed")


# ---------------------------------------------------------------------------------------------
# A runtime upgrade under a running parent
# ---------------------------------------------------------------------------------------------

UPGRADED = "Chain runtime upgraded: spec 343 -> 475 (the SDK loaded its metadata)"


def test_a_parent_running_across_the_runtime_upgrade_keeps_syncing_with_one_line(
        node, running_parent, caplog):
    """The upgrade's block is read at 343 (its parent's runtime) while the head's runtime is
    475: the SDK fetches 475's metadata, the parent says so once and loses nothing. The next
    block is read at 475, where the SDK cannot encode get_metagraph (V14 describes no runtime
    API and no recording of 475's V15 exists here): that sync fails with one line and cancels
    nothing, which on finney (which serves V15) it would not."""
    caplog.set_level(logging.INFO)
    chain, hot = node.chain, node.chain.hotkeys()
    chain.commit(hot[3], submission("org/three", "3" * 40))
    dsn = running_parent(5.0)
    wait_until(lambda: len(jobs(dsn)) == 1, what="the first sync's job")
    threads = threading.active_count()

    chain.upgrade()
    chain.commit(hot[10], submission("org/ten", "a" * 40))
    wait_until(lambda: len(jobs(dsn)) == 2, what="the sync at the upgrade's block")
    wait_until(lambda: UPGRADED in caplog.messages, timeout=20, what="the upgrade's line")
    syncs = sum(1 for m, p in node.requests if p and p[0] == METAGRAPH)
    wait_until(lambda: sum(1 for m, p in node.requests if p and p[0] == METAGRAPH) >= syncs + 3,
               what="three more syncs")
    assert caplog.messages.count(UPGRADED) == 1
    assert [m for m, _ in node.requests].count("state_getMetadata") == 1
    assert [(row[0], row[4], row[5]) for row in jobs(dsn)] == [
        (hot[3], RECORDED_BLOCK, "pending"), (hot[10], RECORDED_BLOCK + 1, "pending")]
    assert sync_said(caplog) == []
    assert len(node.connections) == 1 and threading.active_count() == threads

    chain.advance()  # read at 475: no runtime API to read the neurons with
    wait_until(lambda: sync_said(caplog), what="the failed sync's line")
    [line] = sync_said(caplog)
    assert line.startswith(SYNC_FAILED) and line.endswith(
        "ValueError: Runtime API Call 'SubnetInfoRuntimeApi.get_metagraph' not found in "
        "registry"), line
    assert [row[5] for row in jobs(dsn)] == ["pending", "pending"]  # nothing cancelled
