"""BittensorChain against the real bittensor SDK (v11), with an in-memory chain at the SDK's
lowest seam: a fake `bittensor.Substrate` passed as Client(substrate=...). Everything above it
(Client, the block pinning, the metagraph and commitment decoding) is the SDK's own code.

The fake answers with values shaped as the SDK's transport decodes them from SCALE. Where the
shape is the risk (the Commitments pallet's values, the storage values setting weights reads)
the value goes through the SDK's own codec (chain_codec: encoded to SCALE, decoded back). The
metagraph's columns are written here in the shapes that codec gives: an AccountId is an ss58
string, a Compact<AlphaCurrency> a plain int (rao), Vec<Compact<u8>> a list of ints, an Option
the value or None. A value of the wrong shape would make the SDK read None or "", which the
assertions on real values below would catch."""

import asyncio
import collections
import dataclasses
import json
import subprocess
import sys
import time

import bittensor
import bittensor_core
import pytest
from chain_codec import decoded
from conftest import ROOT, wait_until

import chain as chains

NETUID = 2
RAO = 10**9
# SubtensorModule's storage values that setting weights reads, by their runtime types (the
# epoch consensus mode is an enum, answered as its variant's name).
STORAGE_TYPES = {
    "WeightsSetRateLimit": "u64", "CommitRevealWeightsEnabled": "bool",
    "MaxWeightsLimit": "u16", "MinAllowedWeights": "u16", "Tempo": "u16",
    "RevealPeriodEpochs": "u64", "LastEpochBlock": "u64", "PendingEpochAt": "u64",
    "SubnetEpochIndex": "u64", "BlocksSinceLastStep": "u64"}


def hotkey(i):
    """A real ss58 address (format 42), as the transport decodes an AccountId."""
    return bittensor_core.ss58_encode(i.to_bytes(4, "big") + bytes(28), 42)


def scale_compact(n):
    if n < 2**6:
        return bytes([n << 2])
    if n < 2**14:
        return ((n << 2) | 1).to_bytes(2, "little")
    return ((n << 2) | 2).to_bytes(4, "little")


@dataclasses.dataclass
class Neuron:
    hotkey: str
    stake: float                  # total_stake: the stake weight (alpha + tao_weight x root TAO)
    text: str | None = None       # the commitment's plaintext; None: no commitment
    block: int = 0                # the block it was committed at
    sealed: bool = False          # committed timelocked
    revealed_at: int | None = None  # ...and decrypted by the chain at this block
    validator: bool = False
    last_update: int = 0          # block this hotkey last set weights (0: never)
    registered_at: int = 1        # block it took its uid


class FakeSubstrate:
    """An in-memory subnet at one block, answering the bittensor.Substrate protocol. Every call
    is recorded; a read at another block than the current one is refused, as a pruned node would.
    `fail` makes the metagraph call raise; `hang` ("connect" or "runtime_call") makes that call
    wait until cancelled, and then take `cancel_seconds` more to give up."""

    def __init__(self, block, neurons, deregistered=()):
        self.block, self.neurons, self.deregistered = block, list(neurons), list(deregistered)
        self.calls, self.cancelled = [], []
        self.fail, self.hang, self.cancel_seconds = None, None, 0.0
        self.token_symbols = {}
        # The subnet's hyperparameters, as SubtensorModule storage holds them.
        self.hyperparameters = {
            "WeightsSetRateLimit": 100, "CommitRevealWeightsEnabled": False,
            "MaxWeightsLimit": 65535, "MinAllowedWeights": 1, "Tempo": 360,
            "SubnetEpochConsensus": "Yuma", "RevealPeriodEpochs": 1, "LastEpochBlock": 0,
            "PendingEpochAt": 0, "SubnetEpochIndex": 0, "BlocksSinceLastStep": 7}
        # What submit() answers: an ExtrinsicResult, or None for success. `lands` says
        # whether the call takes effect (a timed-out submission may still land).
        self.answer, self.lands, self.submit_seconds = None, True, 0.0
        self.seconds_per_block = 12.0
        self.submitted = []  # (call, signature over the call) for each submit

    def balance(self, rao, netuid=0):
        return bittensor.Balance(int(rao), netuid, self.token_symbols.get(netuid))

    @staticmethod
    def hash(block):
        return "0x" + block.to_bytes(32, "big").hex()

    def record(self, name, *args):
        self.calls.append((name, args))

    def check_block(self, block_hash):
        if block_hash != self.hash(self.block):
            raise bittensor.ChainError(f"State already discarded for {block_hash}")

    async def maybe_hang(self, stage):
        if self.hang == stage:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(stage)
                await asyncio.sleep(self.cancel_seconds)
                self.cancelled.append("gave up")
                raise

    async def connect(self):
        self.record("connect")
        await self.maybe_hang("connect")

    async def close(self):
        self.record("close")

    async def block_number(self):
        self.record("block_number")
        return self.block

    async def block_hash(self, block=None):
        self.record("block_hash", block)
        return self.hash(self.block if block is None else block)

    async def query(self, module, storage_function, params=None, block_hash=None):
        """The single-item reads of setting weights (a metagraph read makes none)."""
        self.record("query", module, storage_function, params, block_hash)
        if block_hash is not None:
            self.check_block(block_hash)
        assert module == "SubtensorModule", f"unexpected read of {module}.{storage_function}"
        if storage_function in self.hyperparameters:
            assert params == [NETUID]
            value = self.hyperparameters[storage_function]
            kind = STORAGE_TYPES.get(storage_function)
            return decoded(kind, value) if kind else value
        if storage_function == "Uids":
            return decoded("Option<u16>", next((uid for uid, n in enumerate(self.neurons)
                                                if [NETUID, n.hotkey] == params), None))
        if storage_function == "LastUpdate":  # by uid
            assert params == [NETUID]
            return decoded("Vec<u64>", [n.last_update for n in self.neurons])
        raise AssertionError(f"unexpected read of {module}.{storage_function}")

    async def block_time(self):
        return self.seconds_per_block

    async def compose(self, call):
        """The call unchanged, so that a test reads its params (what would be sent)."""
        self.record("compose", call)
        return call

    async def estimate_fee(self, call, keypair):
        return self.balance(10**5)

    async def submit(self, call, keypair, **options):
        """Signs the call as the chain would check it, and lands it: the signer's LastUpdate
        becomes this block."""
        self.record("submit", call, keypair.ss58_address, options)
        self.submitted.append((call, keypair.sign(repr(call).encode())))
        if self.lands and (self.answer is None or self.answer.success):
            for n in self.neurons:
                if n.hotkey == keypair.ss58_address:
                    n.last_update = self.block
        await asyncio.sleep(self.submit_seconds)  # a slow answer, after the call landed
        if self.answer is not None:  # (a failed ExtrinsicResult is falsy)
            return self.answer
        return bittensor.ExtrinsicResult(success=True, message="included")

    async def runtime_call(self, api, method, params, block_hash=None):
        self.record("runtime_call", api, method, params, block_hash)
        await self.maybe_hang("runtime_call")
        if self.fail:
            raise self.fail
        assert (api, method) == ("SubnetInfoRuntimeApi", "get_metagraph")
        self.check_block(block_hash)
        return self.metagraph() if params == [NETUID] else None  # Option<Metagraph>

    async def query_map(self, module, storage_function, params=None, block_hash=None):
        self.record("query_map", module, storage_function, params, block_hash)
        if (module, storage_function) == ("SubtensorModule", "TokenSymbol"):
            return [(0, "τ"), (NETUID, "β")]
        self.check_block(block_hash)
        committed = [n for n in self.neurons + self.deregistered
                     if n.text is not None and params == [NETUID]]
        if (module, storage_function) == ("Commitments", "CommitmentOf"):
            # Revealing removes the TimelockEncrypted field, and with it (our sealed
            # commitments have no other field) the entry: only RevealedCommitments keeps it.
            return [(n.hotkey, self.registration(n)) for n in committed
                    if not (n.sealed and n.revealed_at is not None)]
        if (module, storage_function) == ("Commitments", "RevealedCommitments"):
            # (SCALE bytes of the plaintext, reveal block): a compact length, then the text.
            return [(n.hotkey, decoded("RevealedCommitments", [
                        (scale_compact(len(n.text.encode())) + n.text.encode(), n.revealed_at)]))
                    for n in committed if n.revealed_at is not None]
        raise AssertionError(f"unexpected map read {module}.{storage_function}")

    def registration(self, n):
        """A Commitments.CommitmentOf value: the text in Raw fields of up to 128 bytes."""
        if n.sealed:
            fields = [{"TimelockEncrypted": {"encrypted": "0x" + bytes([0xff, 0x13] * 40).hex(),
                                             "reveal_round": 5_123_456}}]
        else:
            raw = n.text.encode()
            fields = [{f"Raw{len(chunk)}": "0x" + chunk.hex()}
                      for chunk in (raw[i:i + 128] for i in range(0, len(raw), 128))]
        return decoded("Registration", {"deposit": 0, "block": n.block, "info": {"fields": fields}})

    def metagraph(self):
        """SubnetInfoRuntimeApi.get_metagraph as decoded: one column per field, by uid."""
        count = len(self.neurons)
        zeros = [0] * count
        stakes = [round(n.stake * RAO) for n in self.neurons]
        # A real uid on finney: alpha 11468.72, total_stake (the stake weight) 58036.81. The
        # columns differ here too, so that reading the wrong one fails a test.
        alphas = [round(n.stake * RAO * 11468.72 / 58036.81) for n in self.neurons]
        roots = [round((n.stake * RAO - alpha) / 0.18) for n, alpha in zip(self.neurons, alphas)]
        return {
            "netuid": NETUID, "name": list(b"apex"), "symbol": list("β".encode()),
            "identity": None, "network_registered_at": 10, "owner_hotkey": hotkey(9999),
            "owner_coldkey": hotkey(9998), "block": self.block, "tempo": 360,
            "last_step": self.block - 7, "blocks_since_last_step": 7, "tao_in": 1000 * RAO,
            "alpha_in": 4000 * RAO, "moving_price": {"bits": 1 << 30}, "num_uids": count,
            "max_uids": 256, "hotkeys": [n.hotkey for n in self.neurons],
            "coldkeys": [hotkey(5000 + uid) for uid in range(count)],
            "identities": [None] * count,
            "axons": [{"block": 0, "version": 0, "ip": 0, "port": 0, "ip_type": 4,
                       "protocol": 0, "placeholder1": 0, "placeholder2": 0}] * count,
            "active": [True] * count, "validator_permit": [n.validator for n in self.neurons],
            "pruning_score": zeros, "last_update": [n.last_update for n in self.neurons],
            "emission": zeros, "dividends": zeros, "incentives": zeros, "consensus": zeros,
            "trust": zeros, "rank": zeros,
            "block_at_registration": [n.registered_at for n in self.neurons],
            "alpha_stake": alphas, "tao_stake": roots, "total_stake": stakes,
        }

    def names(self):
        return [name for name, _ in self.calls]


def submission(repo_id, revision):
    return json.dumps({"provider": "HF", "repo_id": repo_id, "revision": revision})


pytestmark = pytest.mark.usefixtures("token_symbol_cache")


def test_a_sync_returns_each_visible_commitment_with_its_hotkey_uid_stake_and_block(
        make_chain, token_symbol_cache):
    long_text = submission("a-research-org/a-rather-long-model-name-for-this-subnet-v2",
                           "0123456789abcdef0123456789abcdef01234567")
    assert len(long_text) > 128  # two Raw fields on chain
    hot = [hotkey(i) for i in range(7)]
    fake = FakeSubstrate(1200, [
        Neuron(hot[0], 250_000.0, validator=True),
        Neuron(hot[1], 5000.0, long_text, block=1195),
        Neuron(hot[2], 1234.5, "org/two@" + "b" * 40, block=1190),
        Neuron(hot[3], 800.0, "org/sealed@" + "c" * 40, block=1199, sealed=True),
        Neuron(hot[4], 42.0),
        Neuron(hot[5], 3000.25, submission("org/five", "e" * 40), block=1150, sealed=True,
               revealed_at=1160),
    ], deregistered=[Neuron(hot[6], 0.0, "org/gone@" + "f" * 40, block=1100)])
    chain = make_chain(fake)

    snapshot = chain.read()

    assert snapshot == chains.ChainSnapshot(1200, [
        chains.Commitment(hot[1], 1, 1195, 5000.0, long_text),
        chains.Commitment(hot[2], 2, 1190, 1234.5, "org/two@" + "b" * 40),
        # timelocked, then decrypted by the chain, which dropped the commitment's entry: the
        # plaintext, at its reveal block (the commit block is gone from the chain)
        chains.Commitment(hot[5], 5, 1160, 3000.25, submission("org/five", "e" * 40)),
    ],  # not: no commitment (0, 4), still sealed (3), deregistered (6)
        # registered: every neuron, whether it committed or not; not the deregistered one
        {hot[i]: i for i in range(6)})
    # Every read was pinned to the one block the sync started at.
    pinned = [args[-1] for name, args in fake.calls if name in ("runtime_call", "query_map")
              and args[:2] != ("SubtensorModule", "TokenSymbol")]
    assert pinned == [fake.hash(1200)] * 3
    assert {args for name, args in fake.calls if name == "block_hash"} == {(1200,)}
    assert token_symbol_cache.exists()


def test_per_sync_the_same_few_calls_whatever_the_number_of_miners(make_chain):
    per_sync = {}
    for miners in (4, 64):
        fake = FakeSubstrate(500, [Neuron(hotkey(i), 2000.0 + i, f"org/m{i}@{i:040x}", block=490)
                                   for i in range(miners)])
        chain = make_chain(fake)
        first = chain.read()
        fake.calls.clear()
        fake.block = 510
        second = chain.read()
        assert [c.data for c in first.commitments] == [f"org/m{i}@{i:040x}"
                                                      for i in range(miners)]
        assert second.block == 510 and second.commitments[-1].stake == 2000.0 + miners - 1
        assert "connect" not in fake.names()  # the second sync reused the connection
        per_sync[miners] = collections.Counter(fake.names())
    # One block number, a hash for each of the three pinned reads (the transport caches it),
    # the metagraph runtime call, and the two Commitments maps (committed and revealed).
    assert per_sync[4] == per_sync[64] == {"block_number": 1, "block_hash": 3,
                                           "runtime_call": 1, "query_map": 2}


def test_new_revisions_become_jobs_and_recommitted_or_ineligible_ones_do_not(
        make_chain, make_state):
    v, m1, m2, m3, m4 = (hotkey(i) for i in range(100, 105))
    state = make_state(neuron={"min_stake_threshold": 1000.0, "allowed_validators": [v],
                               "max_commitment_lookback": 3, "load_old_nodes": False})
    fake = FakeSubstrate(100, [
        Neuron(v, 1_000_000.0, submission("org/validator", "a" * 40), block=99, validator=True),
        Neuron(m1, 5000.0, submission("org/one", "1" * 40), block=99),
        Neuron(m2, 999.0, submission("org/two", "2" * 40), block=99),  # below the threshold
        Neuron(m3, 5000.0, submission("org/three", "3" * 40), block=50),  # stale
        Neuron(m4, 5000.0, submission("org/four", "4" * 40), block=98),
    ])
    chain = make_chain(fake)

    first = state.intake.add_commitments(chain.read())

    # Ten blocks later m1 commits the same submission again and m4 a new revision.
    fake.block = 110
    fake.neurons[1].block = 108
    fake.neurons[4].text, fake.neurons[4].block = submission("org/four", "5" * 40), 109
    snapshot = chain.read()
    assert [(c.hotkey, c.block) for c in snapshot.commitments if c.hotkey in (m1, m4)] == [
        (m1, 108), (m4, 109)]
    second = state.intake.add_commitments(snapshot)

    rows = state.db.query("select job_id, miner_hotkey, miner_uid, hf_repo_id, hf_repo_commit, "
                          "commit_block from jobs order by job_id")
    # The oldest submission first: its jobs get the lowest ids, and the queue serves by id.
    assert [tuple(row.values())[1:] for row in rows] == [
        (m4, 4, "org/four", "4" * 40, 98),
        (m1, 1, "org/one", "1" * 40, 99),
        (m4, 4, "org/four", "5" * 40, 109),
    ]
    assert first == [row["job_id"] for row in rows[:2]] and second == [rows[2]["job_id"]]
    assert fake.names().count("connect") == 1


def test_an_sdk_error_is_a_short_chain_unavailable_and_the_next_sync_reconnects(make_chain):
    fake = FakeSubstrate(300, [Neuron(hotkey(1), 5000.0, "org/one@" + "1" * 40, block=299)])
    chain = make_chain(fake)
    chain.read()
    fake.fail = bittensor.RpcConnectionError("connection reset by peer\n  at frame 12")

    with pytest.raises(chains.ChainUnavailable) as failure:
        chain.read()

    assert str(failure.value) == "chain local: RpcConnectionError: connection reset by peer"
    assert failure.value.__cause__ is None and failure.value.__suppress_context__
    assert fake.names()[-1] == "close"  # the connection was dropped
    fake.fail = None
    assert chain.read().commitments[0].hotkey == hotkey(1)
    assert fake.names().count("connect") == 2


@pytest.mark.parametrize("stage, cancel_seconds", [
    ("connect", 0.0), ("runtime_call", 0.0),
    ("runtime_call", 3.0),  # a call that is slow to give up does not hold the parent either
])
def test_a_node_that_does_not_answer_is_given_up_at_the_deadline(make_chain, stage,
                                                                 cancel_seconds):
    fake = FakeSubstrate(300, [Neuron(hotkey(1), 5000.0, "org/one@" + "1" * 40, block=299)])
    chain = make_chain(fake, timeout=0.5)
    fake.hang, fake.cancel_seconds = stage, cancel_seconds

    started = time.monotonic()
    with pytest.raises(chains.ChainUnavailable, match=r"^chain local: no answer within 0.5s$"):
        chain.read()

    assert time.monotonic() - started < 2.5
    assert fake.cancelled[0] == stage  # the SDK's pending call was cancelled, not left behind
    assert fake.names()[-1] == "close"  # and the connection dropped
    fake.hang = None
    assert [c.hotkey for c in chain.read().commitments] == [hotkey(1)]
    assert fake.names().count("connect") == 2
    wait_until(lambda: fake.cancelled == [stage, "gave up"], timeout=10, what="the hung call")


def test_a_subnet_that_does_not_exist_is_reported_and_keeps_the_connection(make_chain):
    fake = FakeSubstrate(300, [Neuron(hotkey(1), 5000.0, "org/one@" + "1" * 40, block=299)])
    chain = make_chain(fake, netuid=7)
    with pytest.raises(chains.ChainUnavailable, match="^subnet 7 does not exist on local$"):
        chain.read()
    assert "close" not in fake.names()


def test_the_file_chain_never_imports_bittensor(tmp_path):
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"block": 5, "commitments": []}))
    code = ("import sys, parent, common\nimport chain as chains\n"
            "cfg = common.load_config(sys.argv[1])\n"
            "assert chains.open_chain(cfg).read() == chains.ChainSnapshot(5, [])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bittensor'))\n")
    config = tmp_path / "p.toml"
    config.write_text('pg_database = "postgresql://unused/x"\nis_parent_validator = true\n'
                      f'[subtensor]\nnetwork = "file"\ncommitments_file = "{path}"\n')
    result = subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
