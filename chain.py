"""The parent validator's side of the chain: everything that reads the subnet (and, with
bittensor, the one module that imports the SDK besides the wallet code in common.py).

Its parts: the snapshot a sync works on (every miner's latest commitment at one block); the two
chain sources, FileChain (a JSON file another process rewrites) and BittensorChain (the real
chain through the bittensor SDK); open_chain, which picks one from the config; and
parse_commitment, which turns a miner's committed text into the repository to evaluate.
"""

import asyncio
import dataclasses
import json
import re
import threading

import common


# ---------------------------------------------------------------------------------------------
# The chain: a snapshot of every miner's latest commitment at one block
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Commitment:
    hotkey: str
    uid: int | None
    block: int      # block the commitment was published at
    stake: float    # in the subnet's stake units (alpha)
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
        # The SDK is async. Its connection lives on this loop, run by a thread of its own so
        # that the websocket is kept alive between syncs, not only while the parent reads.
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bittensor",
                                       daemon=True)
        self.thread.start()

    def read(self):
        try:
            graph = self._run(self._metagraph(), self.timeout)
        except Exception as e:  # the SDK raises many types for a node that is down or slow
            self._disconnect()
            raise ChainUnavailable(f"chain {self.network}: {self._describe(e)}") from None
        if graph is None:
            raise ChainUnavailable(f"subnet {self.netuid} does not exist on {self.network}")
        return ChainSnapshot(graph.block, [
            Commitment(n.hotkey, n.uid, n.commitment.block, n.total_stake.amount,
                       n.commitment.value)
            # value is None while a timelocked commitment is sealed: nothing to evaluate yet.
            for n in graph.neurons if n.commitment is not None and n.commitment.value],
            {n.hotkey: n.uid for n in graph.neurons})

    async def _metagraph(self):
        if self.client is None:
            # Kept before connecting, so that a connection failing half-way is closed too.
            self.client = self.sdk.Client(self.network, substrate=self.substrate)
            await self.client.connect()
        return await self.client.subnets.metagraph(self.netuid)

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

    def _describe(self, error):
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
