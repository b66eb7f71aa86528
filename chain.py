"""The parent validator's side of the chain: everything that reads the subnet or writes to it
(and, with bittensor, the one module that imports the SDK besides the wallet code in auth.py).

Its parts: the snapshot a sync works on (every miner's latest commitment at one block); the two
chain sources, FileChain (a JSON file another process rewrites) and BittensorChain (the real
chain through the bittensor SDK); open_chain, which picks one from the config;
parse_commitment, which turns a miner's committed text into the repository to evaluate; and
the weights ([weights]): the scores of the jobs table, aggregated per miner, which
WeightSetter sets on chain from the parent's loop and weights_report shows to the operator.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import threading
import time

import prometheus_client

import auth
import common
import scores
from common import log


# ---------------------------------------------------------------------------------------------
# The chain: a snapshot of every miner's latest commitment at one block
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Commitment:
    hotkey: str
    uid: int | None
    block: int      # block it was committed at; once the chain revealed a timelocked one, the
                    # reveal block (the chain drops the sealed entry, and the commit block)
    stake: float    # stake weight in the subnet's units: its alpha plus tao_weight x root TAO
    data: str       # the raw text the miner committed


@dataclasses.dataclass(frozen=True)
class ChainSnapshot:
    block: int
    commitments: list
    # {hotkey: uid} of every neuron registered at `block`, whether it committed or not: a
    # miner missing here has left the subnet. None: the commitments' hotkeys and uids.
    neurons: dict = None

    def __post_init__(self):
        if self.neurons is None:
            object.__setattr__(self, "neurons", {c.hotkey: c.uid for c in self.commitments})


class ChainUnavailable(Exception):
    """The chain source could not be read this time; the loop retries with backoff."""


class FileChain:
    """A chain read from a JSON file that another process rewrites (write, then rename):
    {"block": N, "commitments": [{"hotkey", "uid", "block", "stake", "data"}, ...],
     "neurons": [{"hotkey", "uid"}, ...]}; without "neurons", the miners registered are those
    that committed."""

    def __init__(self, path):
        self.path = path

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            neurons = doc.get("neurons")
            return ChainSnapshot(int(doc["block"]), [
                Commitment(str(c["hotkey"]), c.get("uid"), int(c["block"]),
                           float(c.get("stake", 0.0)), str(c["data"]))
                for c in doc["commitments"]],
                None if neurons is None else {str(n["hotkey"]): n.get("uid") for n in neurons})
        except FileNotFoundError:
            raise ChainUnavailable(f"commitments file {self.path} does not exist") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ChainUnavailable(f"commitments file {self.path} is malformed: {e!r}") from None

    def close(self):
        pass


class BittensorChain:
    """The real chain through the bittensor SDK (v11): one metagraph read per sync (neurons,
    stakes and commitments pinned to one block) on one reused connection. The only code
    importing bittensor. `substrate` is the SDK's test seam, an in-memory bittensor.Substrate;
    without it the SDK connects to `network` (a name or a ws:// URL)."""

    def __init__(self, network, netuid, timeout=60.0, substrate=None):
        import bittensor
        self.sdk, self.network, self.netuid = bittensor, network, netuid
        self.timeout, self.substrate = timeout, substrate
        self.client = None  # connected bittensor.Client; None: the next read connects
        self.spec = None    # the runtime's spec version at the last read
        # The SDK is async. Its connection lives on this loop, run by a thread of its own so
        # that the websocket is kept alive between syncs, not only while the parent reads.
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bittensor",
                                       daemon=True)
        self.thread.start()

    def read(self):
        try:
            graph, spec = self._run(self._metagraph(), self.timeout)
        except Exception as e:  # the SDK raises many types for a node that is down or slow
            self._disconnect()
            raise ChainUnavailable(f"chain {self.network}: {self.describe(e)}") from None
        if self.spec is not None and spec != self.spec:
            log.info("Chain runtime upgraded: spec %d -> %d (the SDK loaded its metadata)",
                     self.spec, spec)
        self.spec = spec
        if graph is None:
            raise ChainUnavailable(f"subnet {self.netuid} does not exist on {self.network}")
        return ChainSnapshot(graph.block, [
            Commitment(n.hotkey, n.uid, n.commitment.block, n.total_stake.amount,
                       n.commitment.value)
            # value is None while a timelocked commitment is sealed: nothing to evaluate yet.
            for n in graph.neurons if n.commitment is not None and n.commitment.value],
            {n.hotkey: n.uid for n in graph.neurons})

    async def _metagraph(self):
        # spec_version: the SDK's transport re-checks the head's runtime at most once a block
        # (one request) and, after an upgrade, fetches the new metadata, saying nothing. An
        # in-memory substrate has no runtime to upgrade.
        client = await self._connected()
        graph = await client.subnets.metagraph(self.netuid)
        return graph, (await client.spec_version() if self.substrate is None else None)

    async def _connected(self):
        if self.client is None:
            # Kept before connecting, so that a connection failing half-way is closed too.
            self.client = self.sdk.Client(self.network, substrate=self.substrate)
            await self.client.connect()
        return self.client

    # -- weights (see WeightSetter) ----------------------------------------------------------

    def subnet(self, hotkey):
        """The subnet as the weights need it, every value read at one block."""
        try:
            return self._run(self._subnet(hotkey), self.timeout)
        except ChainUnavailable:
            raise
        except Exception as e:
            self._disconnect()
            raise ChainUnavailable(f"chain {self.network}: {self.describe(e)}") from None

    async def _subnet(self, hotkey):
        view = await (await self._connected()).at()
        graph, rate_limit, commit_reveal, block_seconds = await asyncio.gather(
            view.subnets.metagraph(self.netuid, commitments=False),
            view.hyperparameters.weights_rate_limit(self.netuid),
            view.subnets.commit_reveal_enabled(self.netuid),
            self.client.block_time())
        if graph is None:
            raise ChainUnavailable(f"subnet {self.netuid} does not exist on {self.network}")
        ours = graph.by_hotkey(hotkey)
        return Subnet(
            graph.block, graph.tempo, [Neuron(n.uid, n.hotkey, n.block_at_registration)
                                       for n in graph.neurons],
            uid=ours.uid if ours else None,
            # LastUpdate is 0 until the hotkey first sets weights.
            since_update=graph.block - ours.last_update if ours and ours.last_update else None,
            rate_limit=int(rate_limit or 0), commit_reveal=bool(commit_reveal),
            block_seconds=float(block_seconds))

    def set_weights(self, weights, signer, timeout):
        """Start setting {uid: weight} with the SDK's SetWeights intent, signed by `signer`
        (a bittensor wallet or keypair); returns a concurrent Future of its ExtrinsicResult.
        The main loop collects it later: an inclusion takes a block or two."""
        intent = self.sdk.SetWeights(netuid=self.netuid, weights=weights)
        # Inclusion, not finalization: finalization may lag minutes behind.
        coro = self.client.execute(intent, signer, wait_for_inclusion=True,
                                   wait_for_finalization=False)
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)

    def plan_weights(self, weights, signer):
        """The SDK's dry run of setting {uid: weight}: {uid: u16 value} it would send, or a
        text saying why there is none (commit-reveal seals them; the plan failed)."""
        try:
            plan = self._run(self.client.plan(self.sdk.SetWeights(netuid=self.netuid,
                                                                  weights=weights), signer),
                             self.timeout)
        except Exception as e:
            return f"the SDK's dry run failed: {self.describe(e)}"
        params = getattr(plan.call, "params", None)
        if params is None and hasattr(plan.call, "data"):
            params = self._call_args(plan.call)
        if "dests" not in (params or {}):
            return "commit-reveal: the values are sealed in a timelocked commit"
        return dict(zip(params["dests"], params["weights"]))

    def _call_args(self, call):
        """{name: value} of a call the SDK's transport composed (SCALE bytes, decoded back
        with the head's runtime, the one it was composed with); {} if it cannot be read."""
        try:
            decoded = self._run(self.client.decode_scale("Call", call.data), self.timeout)
        except Exception:
            return {}
        return {arg["name"]: arg["value"] for arg in decoded.get("call_args") or []}

    def _run(self, coro, timeout):
        # The SDK sets no deadline per call (its transport waits 60 s for each frame, then
        # retries and rotates endpoints), so each read gets one here. wait_for cancels the
        # SDK's pending requests; the wait on this thread covers a cancellation that hangs.
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 1.0)
        finally:
            future.cancel()

    def _disconnect(self):
        client, self.client = self.client, None
        if client is not None:
            try:
                self._run(client.close(), 5.0)
            except Exception:  # best effort: it already failed; the next read opens another
                pass

    def describe(self, error):
        if isinstance(error, TimeoutError) and not str(error):
            return f"no answer within {self.timeout:g}s"
        lines = str(error).strip().splitlines() or ["no detail"]
        return f"{type(error).__name__}: {lines[0][:200]}"

    def close(self):
        self._disconnect()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)
        if not self.thread.is_alive():
            self.loop.close()


def open_chain(cfg):
    sub = cfg.subtensor
    if sub.network == "file":
        if not sub.commitments_file:
            raise common.ConfigError(
                f"{cfg.config_path}: key 'subtensor.commitments_file' is required "
                'when subtensor.network = "file"')
        return FileChain(sub.commitments_file)
    return BittensorChain(sub.address or sub.network, sub.netuid)


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
REVISION = re.compile(r"[\w.-]{1,128}")


def parse_commitment(text):
    """A miner's commitment -> (repo_id, revision). Accepts the JSON miners commit,
    {"provider": "HF", "repo_id": "org/name", "revision": "<sha>"}, or "org/name@<sha>".
    A JSON commitment without a revision means the repo's default branch (revision "")."""
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("commitment is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ValueError("commitment JSON is not an object")
        if str(doc.get("provider", "HF")).upper() != "HF":
            raise ValueError(f"unsupported provider {doc.get('provider')!r}")
        repo_id, revision = doc.get("repo_id"), doc.get("revision", "")
    else:
        repo_id, _, revision = text.partition("@")
        if not revision:
            raise ValueError("commitment is neither JSON nor repo_id@revision")
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"invalid repo_id {repo_id!r}")
    if not isinstance(revision, str) or (revision and not REVISION.fullmatch(revision)):
        raise ValueError(f"invalid revision {revision!r}")
    return repo_id, revision


# ---------------------------------------------------------------------------------------------
# Weights ([weights] enabled = true): the scores in the jobs table become weights on chain
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    registered_at: int  # block the hotkey took the uid (0: unknown, as on a file chain)


@dataclasses.dataclass(frozen=True)
class Subnet:
    """What setting weights needs to know, every value read at one block."""
    block: int
    tempo: int
    neurons: list                     # [Neuron]: the hotkeys registered now
    uid: int | None = None            # our hotkey's uid; None: not registered
    since_update: int | None = None   # blocks since we last set weights; None: never
    rate_limit: int = 0               # weights_rate_limit: blocks between two sets
    commit_reveal: bool = False
    block_seconds: float = 12.0


@dataclasses.dataclass(frozen=True)
class WeightRow:
    uid: int
    hotkey: str
    score: float
    weight: float  # the score over the sum of the scores


def weight_table(db, settings, neurons, skipped):
    """[WeightRow] by uid for the registered neurons with a score: their submissions' scores,
    aggregated (scores.py says how). A job without a valid score is logged once (its id is
    added to `skipped`)."""
    return scores.weight_table(db, settings, neurons, skipped, WeightRow)


def record_attempt(db, block, weights, commit_reveal):
    """A new row in weight_attempts, before the weights are sent; returns its id."""
    with db.transaction() as conn:
        attempt = conn.execute(
            "insert into weight_attempts (block, uids, weights, commit_reveal) "
            "values (%s, %s, %s, %s) returning attempt_id",
            (block, list(weights), list(weights.values()), commit_reveal)).fetchone()
        conn.execute("delete from weight_attempts where attempt_id <= %s",
                     (attempt["attempt_id"] - MAX_ATTEMPT_ROWS,))
    return attempt["attempt_id"]


def last_attempts(db, count=5):
    return db.query("select attempt_id, attempted_at, block, uids, weights, commit_reveal, "
                    "success, message from weight_attempts order by attempt_id desc limit %s",
                    (count,))


MAX_ATTEMPT_ROWS = 10_000  # weight_attempts keeps the newest this many
SUBMIT_BLOCKS = 4  # a submission waits this many blocks for its inclusion, then gives up

WEIGHT_ATTEMPTS = prometheus_client.Counter(
    "validator_weight_attempts", "Attempts to set weights, by outcome", ["outcome"])
WEIGHTS_SET_BLOCK = prometheus_client.Gauge(
    "validator_weights_last_set_block", "Block of the last successful set of weights")
# As the chain counts them at each check: what the alert "weights not set for two intervals"
# compares (deploy/alerts.yml). Before the first check, or with our hotkey never having set
# weights, since_update is -1.
WEIGHTS_SINCE_UPDATE = prometheus_client.Gauge(
    "validator_weights_blocks_since_update", "Blocks since our hotkey last set weights (-1: never)")
WEIGHTS_INTERVAL = prometheus_client.Gauge(
    "validator_weights_interval_blocks",
    "Blocks between two sets of weights ([weights] every_blocks, or the tempo)")
WEIGHTS_SINCE_UPDATE.set(-1)


@dataclasses.dataclass
class Submission:
    attempt: int      # its weight_attempts row
    interval: int     # blocks until the next set
    subnet: Subnet
    uids: int         # how many uids it weighs
    timeout: float
    future: object    # concurrent.futures.Future of the SDK's ExtrinsicResult


class WeightSetter:
    """Sets weights every [weights] every_blocks (default: the subnet's tempo). Each check
    reads the subnet at one block and waits out the interval and weights_rate_limit as the
    chain counts them from our last update, so a restart, or a submission that timed out but
    landed, does not set twice. Then it starts the SDK's SetWeights intent (which quantizes,
    applies max_weight_limit and min_allowed_weights, and commits timelocked when the subnet
    has commit-reveal on) and returns; a later call records its answer. Nothing here sleeps:
    a wait is the time of the next check. `clock` is for tests."""

    def __init__(self, cfg, db, chain, signer, clock=time.monotonic):
        self.settings, self.netuid = cfg.weights, cfg.subtensor.netuid
        self.db, self.chain, self.signer, self.clock = db, chain, signer, clock
        self.hotkey = signer.ss58_address
        self.next_check = 0.0
        self.submission = None  # the one in flight
        self.skipped = set()    # jobs whose bad score was logged
        self.idle = None        # the last reason there was nothing to set, said once
        self.outage = common.Outage("Weights: cannot read the subnet",
                                    "Weights: the subnet can be read again", 300.0)

    def maybe_set(self):
        """Called by the parent's loop every second or so; returns at once unless a check is
        due or a submission has its answer."""
        try:
            if self.submission and self.submission.future.done():
                self._finish(self.submission)
                self.submission = None
            if not self.submission and self.clock() >= self.next_check:
                self._check()
                self.outage.succeeded()
        except (ChainUnavailable, common.DatabaseUnavailable) as e:
            self.next_check = self.clock() + self.outage.failed(e)

    def _check(self):
        subnet = self.chain.subnet(self.hotkey)
        interval = max(1, self.settings.every_blocks or subnet.tempo)
        if subnet.uid is None:
            return self._nothing(subnet, interval, f"our hotkey {self.hotkey} is not "
                                                   f"registered on subnet {self.netuid}")
        since = subnet.since_update
        WEIGHTS_SINCE_UPDATE.set(-1 if since is None else since)
        WEIGHTS_INTERVAL.set(interval)
        wait = 0 if since is None else max(interval - since, subnet.rate_limit - since)
        if wait > 0:
            log.debug("Weights: last set %d blocks ago; next in %d blocks", since, wait)
            self.next_check = self.clock() + wait * subnet.block_seconds
            return
        rows = weight_table(self.db, self.settings, subnet.neurons, self.skipped)
        weights = {row.uid: row.weight for row in rows if row.weight > 0}
        if not weights:
            return self._nothing(subnet, interval, "no registered miner has a score above 0")
        self.idle = None
        attempt = record_attempt(self.db, subnet.block, weights, subnet.commit_reveal)
        timeout = SUBMIT_BLOCKS * subnet.block_seconds
        self.submission = Submission(attempt, interval, subnet, len(weights), timeout,
                                     self.chain.set_weights(weights, self.signer, timeout))

    def _nothing(self, subnet, interval, reason):
        if reason != self.idle:
            log.info("Weights: nothing set at block %d: %s", subnet.block, reason)
            self.idle = reason
        self.next_check = self.clock() + interval * subnet.block_seconds

    def _finish(self, sub):
        outcome, blocks = "failed", sub.interval  # a failure is tried again next interval
        try:
            result = sub.future.result()
        except (TimeoutError, concurrent.futures.CancelledError):
            message = (f"no answer within {sub.timeout:g}s; it may still land (the next "
                       "attempt reads the chain's last update first)")
        except Exception as e:  # the SDK refuses before signing, or the node failed
            message = self.chain.describe(e)
            if getattr(e, "code", None) == self.chain.sdk.ErrorCode.RATE_LIMITED:
                outcome, blocks = "rate_limited", 1  # the next check reads the wait
        else:
            outcome = "set" if result.success else "failed"
            message = result.message or outcome
            if result.success and result.data.get("reveal_round"):
                message += f" (timelocked: revealed at drand round {result.data['reveal_round']})"
        message = " ".join(message.split())[:1000]  # one line, whatever the node said
        self.db.query("update weight_attempts set success = %s, message = %s "
                      "where attempt_id = %s", (outcome == "set", message, sub.attempt))
        WEIGHT_ATTEMPTS.labels(outcome).inc()
        if outcome == "set":
            WEIGHTS_SET_BLOCK.set(sub.subnet.block)
            log.info("Weights set on subnet %d for %d uids (block %d%s)", self.netuid, sub.uids,
                     sub.subnet.block, ", commit-reveal" if sub.subnet.commit_reveal else "")
        elif outcome == "rate_limited":
            log.info("Weights: rate limited by the chain; waiting: %s", message)
        else:
            log.warning("Weights not set (tried again in %d blocks): %s", blocks, message)
        self.next_check = self.clock() + blocks * sub.subnet.block_seconds


def open_weights(cfg, chain, db):
    """The parent's WeightSetter, or None when [weights] is off."""
    if not cfg.weights.enabled:
        return None
    if isinstance(chain, FileChain):
        raise common.ConfigError(f'{cfg.config_path}: key \'weights.enabled\' needs a real '
                                 'chain; a file chain (subtensor.network = "file") has none '
                                 'to set weights on')
    return WeightSetter(cfg, db, chain, auth.Identity(cfg).keypair)


def weights_report(cfg, db, chain):
    """The weights the parent would set now, for `validator.py weights`: {"block", "rows":
    [{uid, hotkey, score, weight, u16}], "note", "attempts"}. On a real chain the u16 values
    are the SDK's dry run's (client.plan); a file chain has only its snapshot's hotkeys."""
    note, u16 = "", {}
    if isinstance(chain, FileChain):
        snapshot = chain.read()
        block = snapshot.block
        neurons = [Neuron(uid, hotkey, 0) for hotkey, uid in snapshot.neurons.items()
                   if uid is not None]
        note = "a file chain: there is no chain to set these weights on"
        rows = weight_table(db, cfg.weights, neurons, set())
    else:
        signer = auth.Identity(cfg).keypair
        subnet = chain.subnet(signer.ss58_address)
        block = subnet.block
        rows = weight_table(db, cfg.weights, subnet.neurons, set())
        weights = {row.uid: row.weight for row in rows if row.weight > 0}
        if subnet.uid is None:
            note = f"our hotkey {signer.ss58_address} is not registered on the subnet"
        elif weights:
            u16 = chain.plan_weights(weights, signer)
            note, u16 = (u16, {}) if isinstance(u16, str) else ("", u16)
    if not any(row.weight > 0 for row in rows):
        note = "; ".join(filter(None, [note, "nothing to set: no registered miner has a score "
                                             "above 0"]))
    return {"block": block, "note": note, "attempts": last_attempts(db),
            "rows": [dict(dataclasses.asdict(row), u16=u16.get(row.uid)) for row in rows]}
