"""The chain side as an operator runs it: `[subtensor] address = "ws://..."`, BittensorChain built
by open_chain (no substrate= seam), the SDK's own websocket transport, and a loopback node
(tests/loopback_node.py) answering with finney's recorded bytes: the runtime's metadata and
subnet 1's metagraph at block 6852690 (hotkeys, uids, stake weights as finney encoded them).
Commitments, hyperparameters and later blocks are encoded with the SDK's codec over the recorded
metadata. The in-memory seam tests (test_bittensor_chain, test_weights) stay, for speed."""

import json
import logging
import subprocess
import sys
import threading
import time

import psutil
import psycopg
import pytest
from conftest import ROOT, free_port, wait_until, write_toml
from loopback_node import NETUID, RECORDED_BLOCK, Chain, Node
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
    assert jobs(dsn) == [
        (hot[3], 3, "a-research-org/a-rather-long-model-name-for-this-subnet-v2",
         "0123456789abcdef0123456789abcdef01234567", RECORDED_BLOCK, "pending", None),
        (hot[10], 10, "org/ten", "a" * 40, RECORDED_BLOCK - 1, "pending", None)]

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
        (hot[3], 3, "a-research-org/a-rather-long-model-name-for-this-subnet-v2",
         "0123456789abcdef0123456789abcdef01234567", RECORDED_BLOCK, "cancelled", cancelled[0]),
        (hot[10], 10, "org/ten", "a" * 40, RECORDED_BLOCK - 1, "cancelled", cancelled[1]),
        (hot[3], 3, "org/three", "b" * 40, head, "pending", None),
        (hot[13], 13, "org/thirteen", "c" * 40, head, "pending", None)]
    assert "Chain sync failed" not in proc.log()
    assert proc.stop() == 0
    assert not node.connections  # the parent closed its websocket
