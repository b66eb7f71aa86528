"""A loopback subtensor node for tests: a websocket JSON-RPC server on 127.0.0.1 that answers
the requests the bittensor SDK's own transport sends, from finney's recorded bytes (tests/finney:
the runtime's metadata and a recorded metagraph of subnet 1; see its README).

What the recordings lack is encoded here with the SDK's codec over the RECORDED metadata, never
a type registry written by hand: a miner's commitment, a hyperparameter set for a test, the
metagraph at a later block, the events of a block that included our extrinsic.

The node is one chain at a head block that a test moves on (`advance`). It serves every block
it made with the state of now (a test reads one block per sync), answers the methods the SDK
calls, counts every request it receives (`requests`, a batch counted per request), and can be
told to misbehave on one method (`fault`).

A runtime upgrade (`Chain(upgrade_at=U)`): as on finney between the two recordings of
tests/finney, blocks before U hold the code of spec 343, block U and later that of spec 475
(`state_getRuntimeVersion` per block hash). The SDK decodes a block with the runtime of its
parent, so block U is still read at 343 and U+1 on at 475. Spec 475's metadata exists only as V14
(`state_getMetadata`): its V15 request is answered None, as the SDK expects of a runtime without
it, and its state is encoded with the SDK's codec over that recorded V14. V14 describes no
runtime API, and the SDK decodes none at such a runtime but a frozen legacy few: a runtime API
(get_metagraph) is served at blocks read at 343 only."""

import asyncio
import contextlib
import gzip
import hashlib
import itertools
import json
import threading
from pathlib import Path

from bittensor._transport.codec import RuntimeCodec, strip_option_opaque_metadata
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

FINNEY = Path(__file__).resolve().parent / "finney"
NETUID = 1  # the recorded metagraph's subnet (Apex)
GENESIS = "0x2f0555cc76fc2840a25a6ea3b9637146806f1f44b090c175ffde2a7e5ab36c03"  # finney's
# Blocks the node's finalized head lags its best head (GRANDPA on finney: some 2 to 3).
FINALITY_LAG = 2


def _recorded():
    with gzip.open(FINNEY / "metagraph_requests.json.gz", "rt") as f:
        pairs = json.load(f)
    with gzip.open(FINNEY / "metadata_v15.hex.gz", "rt") as f:
        metadata_hex = f.read().strip()
    return {pair["method"]: pair for pair in pairs}, metadata_hex


RECORDED, METADATA_ANSWER = _recorded()  # METADATA_ANSWER: Option<OpaqueMetadata>, as sent
RUNTIME_VERSION = RECORDED["state_getRuntimeVersion"]["result"]
CODEC = RuntimeCodec(strip_option_opaque_metadata(bytes.fromhex(METADATA_ANSWER[2:])),
                     spec_version=RUNTIME_VERSION["specVersion"],
                     transaction_version=RUNTIME_VERSION["transactionVersion"],
                     spec_name=RUNTIME_VERSION["specName"], ss58_format=42)
CODECS = {CODEC.spec_version: CODEC}


def _spec475():
    """Spec 475's recorded V14 metadata, checked against its published digest."""
    with gzip.open(FINNEY / "metadata_v14_spec475.scale.gz", "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != SPEC475_SHA256:
        raise ValueError("tests/finney/metadata_v14_spec475.scale.gz is not the recorded bytes")
    version = dict(RUNTIME_VERSION, specVersion=475, transactionVersion=1)
    return raw, version, RuntimeCodec(raw, spec_version=475, transaction_version=1,
                                      spec_name=version["specName"], ss58_format=42)


SPEC475_SHA256 = "e181ddacd13d1050e82a2afea8e58ba5d3fc84504fa92d2884c91df8c9dd8020"
# RUNTIME_475 keeps the recorded version's api list (spec 343's): the SDK reads only the spec
# name and the two versions.
METADATA_475, RUNTIME_475, CODEC_475 = _spec475()
CODECS[475] = CODEC_475
VERSIONS = {343: RUNTIME_VERSION, 475: RUNTIME_475}
RECORDED_BLOCK = RECORDED["chain_getBlockHash"]["params"][0]
RECORDED_HASH = RECORDED["chain_getBlockHash"]["result"]
RECORDED_PARENT = RECORDED["chain_getHeader"]["result"]["parentHash"]


def api_type(api, method):
    return CODEC.runtime_api_map[api][method]["output"]


def recorded_metagraph():
    """Subnet 1 at the recorded block, as SubnetInfoRuntimeApi.get_metagraph returns it: the
    recorded get_selective_mechagraph answer (every field asked for) decoded with the recorded
    metadata, keeping the fields of the Metagraph type."""
    call = RECORDED["state_call"]
    selective = CODEC.decode(api_type("SubnetInfoRuntimeApi", "get_selective_mechagraph"),
                             bytes.fromhex(call["result"][2:]))
    return {field: selective[field] for field in METAGRAPH_FIELDS}


def _metagraph_fields():
    """The field names of the runtime's Metagraph type, from the recorded metadata."""
    output = int(api_type("SubnetInfoRuntimeApi", "get_metagraph").split("::")[1])
    types = {t["id"]: t for t in CODEC.registry_types()}
    option = types[output]
    inner = option["type"]["def"]["variant"]["variants"][1]["fields"][0]["type"]
    return [f["name"] for f in types[inner]["type"]["def"]["composite"]["fields"]]


METAGRAPH_FIELDS = _metagraph_fields()


def storage_key(pallet, item, params=(), codec=CODEC):
    return "0x" + codec.storage_key(codec.storage_entry(pallet, item), list(params)).hex()


def scale(pallet, item, value, codec=CODEC):
    return "0x" + codec.encode(codec.storage_entry(pallet, item).value_type, value).hex()


def compact(n):
    return bytes(CODEC.encode_compact(n))


EVENTS_KEY = storage_key("System", "Events")
DISPATCH_INFO = {"weight": {"ref_time": 10**9, "proof_size": 0}, "class": "Normal",
                 "pays_fee": "Yes"}
SUCCESS_EVENT = {"phase": {"ApplyExtrinsic": 0}, "topics": [], "event": {"System": {
    "ExtrinsicSuccess": {"dispatch_info": DISPATCH_INFO}}}}


def failure_event(pallet_index, error_index):
    """System.ExtrinsicFailed with a pallet's error (its index in the metadata)."""
    return {"phase": {"ApplyExtrinsic": 0}, "topics": [], "event": {"System": {
        "ExtrinsicFailed": {"dispatch_error": {"Module": {
            "index": pallet_index, "error": "0x" + bytes([error_index, 0, 0, 0]).hex()}},
            "dispatch_info": DISPATCH_INFO}}}}
WEIGHT_CALLS = {"set_weights", "set_mechanism_weights", "commit_weights",
                "commit_mechanism_weights", "commit_timelocked_weights",
                "commit_timelocked_mechanism_weights", "commit_crv3_mechanism_weights"}


class Chain:
    """Subnet 1 as recorded on finney, from the recorded block on; a test changes it through the
    methods below (each an act of the real chain), under `lock`, from any thread."""

    def __init__(self, miners=None, upgrade_at=None):
        self.lock = threading.RLock()
        self.upgrade_at = upgrade_at  # first block whose state holds spec 475's code
        self.failure = None    # (pallet index, error index): included extrinsics fail so
        self.head = RECORDED_BLOCK
        self.graph = recorded_metagraph()
        if miners is not None:
            self.keep_uids(miners)
        self.commitments = {}  # hotkey -> its CommitmentOf value (a Registration)
        self.revealed = {}     # hotkey -> its RevealedCommitments value
        self.overrides = []    # (pallet, item, params, value) set by a test, at either spec
        self.blocks = {}       # hash -> {"number", "extrinsics", "events"} of blocks we made
        self.extrinsics = []   # every extrinsic submitted, as hex
        self.decoded = []      # ... decoded with the metadata of the block that included it
        self._storage = {}     # spec -> {storage key: SCALE hex}, built from the above
        self.numbers = {GENESIS: 0}  # hash -> number of every block hash the node gave out

    # -- what a test changes ------------------------------------------------------------------

    def keep_uids(self, count):
        """Only the first `count` uids stay registered (a smaller subnet)."""
        with self.lock:
            uids = self.graph["num_uids"]
            for field, value in self.graph.items():
                if isinstance(value, list) and len(value) == uids:
                    self.graph[field] = value[:count]
            self.graph["num_uids"] = count
            self._storage = {}

    def upgrade(self):
        """A runtime upgrade: the next block sets spec 475's code (its state holds it)."""
        with self.lock:
            self.upgrade_at = self.head + 1
            self.advance()

    def advance(self, blocks=1):
        with self.lock:
            self.head += blocks
            self._storage = {}

    def commit(self, hotkey, text, block=None):
        """set_commitment(text) by hotkey: Raw fields of up to 128 bytes, as the pallet keeps
        them."""
        raw = text.encode()
        fields = [{f"Raw{len(chunk)}": "0x" + chunk.hex()}
                  for chunk in (raw[i:i + 128] for i in range(0, len(raw), 128))]
        self._register(hotkey, fields, block)

    def seal(self, hotkey, block=None, reveal_round=5_123_456):
        """A timelocked commitment, not yet revealed."""
        self._register(hotkey, [{"TimelockEncrypted": {
            "encrypted": "0x" + bytes([0xff, 0x13] * 40).hex(), "reveal_round": reveal_round}}],
            block)

    def _register(self, hotkey, fields, block):
        with self.lock:
            self.commitments[hotkey] = {"deposit": 0, "block": self.head if block is None
                                        else block, "info": {"fields": fields}}
            self._storage = {}

    def reveal(self, hotkey, text, block=None):
        """The chain decrypted hotkey's timelocked commitment: it drops the sealed field (the
        whole entry, nothing else being left) and keeps (SCALE bytes, reveal block)."""
        with self.lock:
            self.commitments.pop(hotkey, None)
            raw = text.encode()
            self.revealed[hotkey] = [("0x" + (compact(len(raw)) + raw).hex(),
                                      self.head if block is None else block)]
            self._storage = {}

    def register(self, uid, hotkey, stake_rao=0):
        """hotkey takes uid (the one there before is deregistered)."""
        with self.lock:
            g = self.graph
            g["hotkeys"][uid] = hotkey
            g["block_at_registration"][uid] = self.head
            g["last_update"][uid] = 0
            g["total_stake"][uid] = g["alpha_stake"][uid] = stake_rao
            g["tao_stake"][uid] = 0
            self._storage = {}

    def set_last_update(self, uid, block):
        """uid set weights at `block` (0: never)."""
        with self.lock:
            self.graph["last_update"][uid] = block
            self._storage = {}

    def set_storage(self, pallet, item, params, value):
        """A storage item the recording lacks (a hyperparameter, a rate-limit state), encoded
        at each spec whose metadata has it."""
        with self.lock:
            self.overrides.append((pallet, item, tuple(params), value))
            self._storage = {}

    def fail_with(self, pallet, error):
        """Extrinsics included from now on fail with this pallet error (by name, at 475)."""
        ir = next(p for p in CODEC_475.metadata_ir().pallets if p.name == pallet)
        with self.lock:
            self.failure = (ir.index, next(e.index for e in ir.errors if e.name == error))

    def spec_at(self, number):
        """The spec whose code block `number`'s state holds."""
        return 475 if self.upgrade_at is not None and number >= self.upgrade_at else 343

    def codec_reading(self, number):
        """The codec the SDK decodes block `number` with: its parent's runtime."""
        return CODECS[self.spec_at(max(number - 1, 0))]

    def hotkeys(self):
        with self.lock:
            return list(self.graph["hotkeys"])

    # -- what the node serves ------------------------------------------------------------------

    def block_hash(self, number):
        """The recorded block's hash; the blocks after it get hashes of the node's own."""
        if number == 0:
            return GENESIS
        block_hash = RECORDED_HASH if number == RECORDED_BLOCK else \
            RECORDED_PARENT if number == RECORDED_BLOCK - 1 else \
            "0x" + hashlib.blake2b(b"loopback %d" % number, digest_size=32).hexdigest()
        with self.lock:
            self.numbers[block_hash] = number
        return block_hash

    def number_of(self, block_hash):
        """The number of a block the node gave out (None: the head); None if unknown."""
        with self.lock:
            return self.head if block_hash is None else self.numbers.get(block_hash)

    def nonce(self, address):
        with self.lock:
            return sum(1 for e in self.decoded if signer(e) == address)

    def header(self, number):
        """The recorded header, renumbered and chained to its parent."""
        header = json.loads(json.dumps(RECORDED["chain_getHeader"]["result"]))
        if number != RECORDED_BLOCK:
            header.update(number=hex(number), parentHash=self.block_hash(number - 1))
        else:
            self.block_hash(number - 1)  # the recorded parent's hash is known from now on
        return header

    def storage(self, number=None):
        """{key: SCALE hex} of every item this node keeps at block `number` (None: the head),
        encoded with the metadata the SDK reads that block with; rebuilt after a change."""
        with self.lock:
            codec = self.codec_reading(self.head if number is None else number)
            if codec.spec_version not in self._storage:
                self._storage[codec.spec_version] = self._build_storage(codec)
            return self._storage[codec.spec_version]

    def _build_storage(self, codec):
        g, items = self.graph, {}

        def put(pallet, item, params_list, values):
            entry = codec.storage_entry(pallet, item)
            keys = codec.storage_key_batch(entry, [list(p) for p in params_list])
            items.update(("0x" + key.hex(), "0x" + codec.encode(entry.value_type, v).hex())
                         for key, v in zip(keys, values))

        put("Commitments", "CommitmentOf", [(NETUID, h) for h in self.commitments],
            list(self.commitments.values()))
        put("Commitments", "RevealedCommitments", [(NETUID, h) for h in self.revealed],
            list(self.revealed.values()))
        put("SubtensorModule", "Uids", [(NETUID, h) for h in g["hotkeys"]],
            range(len(g["hotkeys"])))
        # The hyperparameters setting weights reads, with the recorded metagraph's values.
        for item, value in (("WeightsSetRateLimit", g["weights_rate_limit"]),
                            ("CommitRevealWeightsEnabled", g["commit_reveal_weights_enabled"]),
                            ("MaxWeightsLimit", g["max_weights_limit"]),
                            ("MinAllowedWeights", g["min_allowed_weights"]),
                            ("Tempo", g["tempo"]),
                            ("RevealPeriodEpochs", g["commit_reveal_period"]),
                            ("LastUpdate", g["last_update"])):
            put("SubtensorModule", item, [(NETUID,)], [value])
        if codec is CODEC_475:  # an item spec 343 lacks: the subnet runs Yuma consensus
            put("SubtensorModule", "SubnetEpochConsensus", [(NETUID,)], ["Yuma"])
        for pallet, item, params, value in self.overrides:
            if pallet != "SubtensorModule" or item in STORAGE_ITEMS[codec.spec_version]:
                put(pallet, item, [params], [value])
        return items

    def metagraph(self, number):
        """get_metagraph's answer at block `number` (SCALE hex)."""
        with self.lock:
            graph = dict(self.graph, block=number,
                         blocks_since_last_step=number - self.graph["last_step"])
            return "0x" + CODEC.encode(api_type("SubnetInfoRuntimeApi", "get_metagraph"),
                                       graph).hex()

    def include(self, extrinsic_hex):
        """A new block with this signed extrinsic, which succeeds (a weights call sets its
        signer's LastUpdate) or fails with `failure`. Returns (the block's hash, None)."""
        with self.lock:
            self.head += 1
            codec = self.codec_reading(self.head)
            extrinsic = codec.decode_extrinsic(extrinsic_hex)
            self.extrinsics.append(extrinsic_hex)
            self.decoded.append(extrinsic)
            block_hash = self.block_hash(self.head)
            event = SUCCESS_EVENT if self.failure is None else failure_event(*self.failure)
            self.blocks[block_hash] = {"number": self.head, "extrinsics": [extrinsic_hex],
                                       "events": scale("System", "Events", [event], codec)}
            hotkey = signer(extrinsic)
            if self.failure is None and extrinsic["call"]["call_function"] in WEIGHT_CALLS \
                    and hotkey in self.graph["hotkeys"]:
                self.graph["last_update"][self.graph["hotkeys"].index(hotkey)] = self.head
            self._storage = {}
            return block_hash, None



def signer(extrinsic):
    return extrinsic["address"]


STORAGE_ITEMS = {spec: {item.name for pallet in codec.metadata_ir().pallets
                        if pallet.name == "SubtensorModule" for item in pallet.storage}
                 for spec, codec in CODECS.items()}


class Node:
    """The websocket JSON-RPC server in a thread of its own, serving `chain`. `requests` lists
    (method, params) of every request received; `connections` the connections open now."""

    def __init__(self, chain):
        self.chain = chain
        self.requests, self.connections = [], set()
        self._fault = None  # (kind, method, seconds) while set: see fault()
        self.ticks = set()  # runtime APIs after whose answer the chain makes a block
        self._subscriptions = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loopback-node",
                                       daemon=True)
        self.thread.start()
        self.server = None
        self.port = 0
        self.accept()

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}"

    def _call(self, coro, timeout=10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def accept(self):
        """Listen (again, on the same port): the node is up."""
        async def start():
            self.server = await serve(self._serve, "127.0.0.1", self.port, max_size=2**26)
            self.port = self.server.sockets[0].getsockname()[1]
        self._call(start())

    def refuse(self):
        """Stop listening and drop every connection: a connection is refused."""
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        self._call(stop())

    def fault(self, kind=None, method=None, seconds=0.0):
        """Until fault() again, answer each request for `method` (a JSON-RPC method, or a
        runtime API as state_call names it) badly: "close" the connection instead, answer
        "late" (after `seconds`), answer "garbage" (not JSON), an "undecodable" result, or an
        "error" object."""
        self._fault = (kind, method, seconds) if kind else None

    def close(self):
        with contextlib.suppress(Exception):
            self.refuse()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)

    def count(self, since=0):
        return len(self.requests) - since

    # -- the methods ---------------------------------------------------------------------------

    def dispatch(self, method, params):
        """The result of one request, as a subtensor node answers it."""
        chain = self.chain
        if method in ("chain_getHead", "chain_getFinalizedHead"):
            lag = FINALITY_LAG if method == "chain_getFinalizedHead" else 0
            return chain.block_hash(chain.head - lag)
        if method == "chain_getBlockHash":
            number = params[0] if params else None
            number = chain.head if number is None else number
            return chain.block_hash(number) if number <= chain.head else None
        if method == "chain_getHeader":
            number = chain.number_of(params[0] if params else None)
            return None if number is None else chain.header(number)
        if method == "chain_getBlock":
            number = chain.number_of(params[0] if params else None)
            made = chain.blocks.get(params[0] if params else None, {})
            return None if number is None else {
                "block": {"header": chain.header(number),
                          "extrinsics": made.get("extrinsics", [])}, "justifications": None}
        if method == "state_getRuntimeVersion":
            return VERSIONS[chain.spec_at(self._number((params + [None])[0]))]
        if method == "state_getMetadata":
            if chain.spec_at(self._number((params + [None])[0])) == 475:
                return "0x" + METADATA_475.hex()
            raise _not_found("no V14 recording of spec 343 here; its V15 is served")
        if method == "state_call":
            result = self._runtime_call(*params)
            if params[0] in self.ticks:
                chain.advance()
            return result
        if method.startswith("state_") and method in STORAGE_METHODS:
            return self._storage(method, params)
        if method == "account_nextIndex":
            return chain.nonce(params[0])
        if method == "author_submitAndWatchExtrinsic":
            return f"sub{next(self._subscriptions)}"
        if method == "author_unwatchExtrinsic":
            return True
        if method == "system_chain":
            return "Bittensor"
        raise NodeError({"code": -32601, "message": "Method not found"})

    def _at(self, block_hash):
        if self.chain.number_of(block_hash) is None:
            raise _not_found(f"UnknownBlock: State already discarded for {block_hash}")
        return block_hash

    def _number(self, block_hash):
        return self.chain.number_of(self._at(block_hash))

    def _runtime_call(self, name, params_hex, block_hash=None):
        number = self._number(block_hash)
        if name == "Metadata_metadata_at_version":  # None: spec 475 has only its V14 here
            return "0x00" if self.chain.spec_at(number) == 475 else METADATA_ANSWER
        if name == "SubnetInfoRuntimeApi_get_metagraph" \
                and self.chain.codec_reading(number) is CODEC:
            netuid = int.from_bytes(bytes.fromhex(params_hex.removeprefix("0x")), "little")
            return self.chain.metagraph(number) if netuid == NETUID else "0x00"
        raise _not_found(f"Execution failed: Other: Exported method {name} is not found")

    def _storage(self, method, params):
        if method == "state_getKeysPaged":
            prefix, count, start, block_hash = (params + [None])[:4]
            keys = sorted(k for k in self._items(self._at(block_hash)) if k.startswith(prefix))
            return [k for k in keys if k > (start or prefix)][:count]
        if method == "state_getStorageAt":
            return self._items(self._at((params + [None])[1])).get(params[0])
        keys, block_hash = params[0], self._at((params + [None])[1])  # state_queryStorageAt
        items = self._items(block_hash)
        return [{"block": block_hash or self.chain.block_hash(self.chain.head),
                 "changes": [[key, items.get(key)] for key in keys]}]

    def _items(self, block_hash):
        items = self.chain.storage(self.chain.number_of(block_hash))
        made = self.chain.blocks.get(block_hash)
        return dict(items, **{EVENTS_KEY: made["events"]}) if made else items

    # -- the connection -------------------------------------------------------------------------

    async def _serve(self, ws):
        self.connections.add(ws)
        tasks = set()
        try:
            async for text in ws:
                frame = json.loads(text)
                for request in frame if isinstance(frame, list) else [frame]:
                    self.requests.append((request["method"], request.get("params") or []))
                    task = asyncio.create_task(self._answer(ws, request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(ws)
            for task in list(tasks):
                task.cancel()

    async def _answer(self, ws, request):
        method, params = request["method"], request.get("params") or []
        reply = {"jsonrpc": "2.0", "id": request["id"]}
        fault = self._fault
        if fault and fault[1] in (method, params[0] if params else None):
            kind, _, seconds = fault
            if kind == "close":
                return await ws.close(1011, "node restarting")
            if kind == "garbage":
                return await ws.send("\x00\x9c<html>502 Bad Gateway" + "\ufffd" * 20)
            if kind == "error":
                reply["error"] = {"code": -32000, "message": "Client error: Execution failed: "
                                  "Runtime panicked: out of memory"}
                return await ws.send(json.dumps(reply))
            if kind == "undecodable":
                reply["result"] = "0x01" + "ff" * 40
                return await ws.send(json.dumps(reply))
            await asyncio.sleep(seconds)  # "late"
        try:
            reply["result"] = self.dispatch(method, params)
        except NodeError as e:
            reply["error"] = e.args[0]
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(reply))
        if method == "author_submitAndWatchExtrinsic" and "result" in reply:
            await self._watch(ws, reply["result"], params[0])

    async def _watch(self, ws, subscription, extrinsic_hex):
        """The extrinsic's status updates: ready, then in a new block (or invalid)."""
        def update(result):
            return json.dumps({"jsonrpc": "2.0", "method": "author_extrinsicUpdate",
                               "params": {"subscription": subscription, "result": result}})
        with contextlib.suppress(ConnectionClosed):
            await ws.send(update("ready"))
            block_hash, why_not = self.chain.include(extrinsic_hex)
            await ws.send(update({"inBlock": block_hash} if block_hash else {"invalid": why_not}))


class NodeError(Exception):
    """A JSON-RPC error object to answer with."""


STORAGE_METHODS = {"state_getKeysPaged", "state_getStorageAt", "state_queryStorageAt"}


def _not_found(what):
    return NodeError({"code": -32000, "message": f"Client error: {what}"})
