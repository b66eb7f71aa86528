"""The Cap'n Proto transport both roles use: pycapnp's RPC made synchronous, and hardened so that
a peer that has not proven who it is costs almost nothing.

Its parts, in order:
- SCHEMA, validator.capnp loaded once; the RPC metrics.
- PeerUnavailable and Unimplemented, what a call to the other validator can fail with.
- RpcThread: the one thread that owns the asyncio loop and pycapnp's KJ loop. run() takes a
  coroutine from any thread and returns its value; serve() listens (an address it cannot take
  is a ConfigError naming the key: listen_error); stop() releases everything.
- Connections: the open connections of one server and their limits (rpc_* keys): how many,
  how long idle, how large a message before the connection is registered.
- FrameGuard: reads each message's frame header before pycapnp does, and drops a connection
  whose message is over its limit before it is read.
- ServiceBase: what a role's service subclasses. It turns each method of the schema into a plain
  method with the snake_case name (requestJobs -> request_jobs), and every failure into a
  controlled answer (REFUSALS), never a traceback.
- RpcClient: a synchronous client over one persistent connection, reconnecting when it breaks.

The hooks a service uses: `role`; LIST_LIMITS (most items of a list parameter, checked before
decoding); precheck(method, params) (refuse on what costs nothing to read); registers(method)
(an answered call of this method registers the connection); `peer` and `address` (set when the
connection opens); `registered`; close_connection() (from any thread) and connection_closed()
(called once it closed). A method raises common.Refused to answer with a message.

Invariants, each of which aborts the whole process when broken (field notes):
- one KJ loop per process: one RpcThread, shared by the servers and clients of a validator;
- every capnp object is created and freed on the RPC thread (see forget_frames);
- the schema is loaded once, here only.
"""

import asyncio
import collections
import errno
import gc
import ipaddress
import json
import os
import re
import struct
import threading
import time
import types

import capnp
import prometheus_client

from common import (CONFIG_KEYS, HERE, MAX_MESSAGE_BYTES, ConfigError, DatabaseUnavailable,
                    Refused, log)

# Loaded once, here only: loading the same schema id twice aborts the process.
SCHEMA = capnp.load(str(HERE / "validator.capnp"))

RPC_CALLS = prometheus_client.Counter(
    "validator_rpc_calls", "RPC calls served, by method", ["method"])
RPC_REFUSALS = prometheus_client.Counter(
    "validator_rpc_refusals", "RPC calls answered with a refusal or an error, by method",
    ["method"])


class PeerUnavailable(Exception):
    """The other validator could not be reached, or the connection broke during a call."""


class Unimplemented(Exception):
    """The other validator does not serve this method (an older version): the connection is
    fine, and the caller may fall back to a method it does serve."""


class RpcThread:
    """A daemon thread running the event loop that pycapnp needs, for servers and clients alike.
    There must be only one per process: a second KJ loop on one thread aborts the process."""

    def __init__(self):
        started = threading.Event()
        self.loop = None
        self.servers, self.clients = [], []

        async def main():
            self.loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            started.set()
            await self._stopped.wait()
            await self._release()

        self.thread = threading.Thread(
            target=lambda: asyncio.run(capnp.run(main())), name="rpc", daemon=True)
        self.thread.start()
        started.wait()

    async def _release(self):
        # Every capnp object must die on this thread while the KJ loop still runs; one
        # released later, on another thread, aborts the process.
        for server in self.servers:
            server.close()
        for client in self.clients:
            client._cap = client._client = None
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gc.collect()  # the capnp objects in reference cycles die here too, not at exit

    def run(self, coroutine, timeout=None):
        result, error = asyncio.run_coroutine_threadsafe(
            self._contained(coroutine), self.loop).result(timeout)
        if error:
            raise error
        return result

    @staticmethod
    async def _contained(coroutine):
        # A failure's traceback holds the coroutine's frames, and their capnp objects with
        # them. Freed on the caller's thread, one of those aborts the process, so the error
        # crosses over bare (see forget_frames).
        try:
            return await coroutine, None
        except Exception as e:
            forget_frames(e)
            e.__context__ = e.__cause__ = None
            return None, e

    def serve(self, host, port, service_factory, limits=None, tls=None):
        """Listen on host:port; each connection gets service_factory() as its bootstrap object,
        under `limits` (the rpc_* keys of a config; None: their defaults), see Connections.
        With `tls` (an ssl.SSLContext) only TLS connections are taken. Returns the bound port
        (useful with port 0)."""
        limits = limits or types.SimpleNamespace(
            **{key: rule[1] for key, rule in CONFIG_KEYS.items() if key.startswith("rpc_")})
        connections = Connections(limits)

        def accept():
            # What capnp.AsyncIoStream.create_server does for each connection, with a
            # FrameGuard between the transport and pycapnp's protocol.
            guard = FrameGuard(connections.message_limit)
            guard.inner = capnp.AsyncIoStream._connect(
                lambda stream: connections.serve(stream, guard, service_factory()))
            return guard

        async def start():
            # A TLS connection reaches Connections only after its handshake: one that stalls
            # before is closed by asyncio after the same deadline as an unregistered one.
            return await asyncio.get_running_loop().create_server(
                accept, host, port, ssl=tls,
                ssl_handshake_timeout=limits.rpc_register_timeout_seconds if tls else None)

        try:
            server = self.run(start(), timeout=10)
        except OSError as e:
            if not hasattr(limits, "config_path"):
                raise
            raise listen_error(host, port, limits, e) from None
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def stop(self):
        if self.loop and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopped.set)
            self.thread.join(timeout=5)


def listen_error(host, port, cfg, error):
    """The one line an operator reads when a validator cannot listen (a ConfigError, which
    common.role_main prints): the address, why, and the key of cfg to change."""
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    key = "listen_host" if error.errno == errno.EADDRNOTAVAIL else (
        "parent_port" if cfg.is_parent_validator else "child_port")
    hint = ", or stop the process that holds the port" if error.errno == errno.EADDRINUSE else ""
    return ConfigError(f"{cfg.config_path}: cannot listen on {host}:{port}: {reason}; change "
                       f"key '{key}'{hint}")


RPC_CONNECTIONS_CLOSED = prometheus_client.Counter(
    "validator_rpc_connections_closed", "Connections the RPC server closed, by reason",
    ["reason"])


class Connections:
    """The open connections of one RPC server, and the limits that keep any peer from holding
    it: every size and count here holds whatever peers do.

    A connection is unregistered until its service says otherwise (service.registered: the
    parent's after a registerChild that checked out, the child's after a signed receiveJob).
    An unregistered connection must make a call within rpc_register_timeout_seconds of opening
    and of its last call (a status query's ping or getStats does), may send messages of at most
    rpc_unregistered_max_message_bytes, and is one of at most rpc_max_unregistered, and of at
    most rpc_max_unregistered_per_address from its address (an IPv6 /64 counts as one). A new
    connection that would pass a limit closes the oldest unregistered one of the address that
    holds the most. A registered connection is never evicted: it is closed only after
    rpc_idle_timeout_seconds without a call, and may send what Cap'n Proto takes. Past
    rpc_max_connections with none unregistered to evict, a new connection is closed at once."""

    def __init__(self, limits):
        self.limits = limits
        self.open = {}  # service -> its stream, oldest first
        self.closed, self.last_log = collections.Counter(), 0.0

    def message_limit(self, service):
        if service is not None and service.registered:
            return MAX_MESSAGE_BYTES
        return self.limits.rpc_unregistered_max_message_bytes

    async def serve(self, stream, guard, service):
        service.peer, service.address = peer_address(guard.transport)
        guard.service = service
        if not self._make_room(service):
            self._close(stream, service, "full")
            return
        self.open[service] = stream
        server = capnp.TwoPartyServer(stream, bootstrap=service)
        disconnected = asyncio.ensure_future(server.on_disconnect())
        # The service may close its own connection from a worker thread (close_connection):
        # the stream is closed here, on the loop that owns it.
        closing, loop = asyncio.Event(), asyncio.get_running_loop()
        service._close_connection = lambda: loop.call_soon_threadsafe(closing.set)
        closed = asyncio.ensure_future(closing.wait())
        try:
            while not disconnected.done():
                idle, allowed = time.monotonic() - service.last_call, self._allowed_idle(service)
                if closed.done() or (idle >= allowed and not service.calls):
                    self._close(stream, service, "closed by its service" if closed.done()
                                else "idle" if service.registered else "unregistered")
                    break
                await asyncio.wait({disconnected, closed}, timeout=max(0.05, allowed - idle),
                                   return_when=asyncio.FIRST_COMPLETED)
            if guard.refused:
                self._count(service, "too large")
        except asyncio.CancelledError:  # we are stopping
            pass
        finally:
            self.open.pop(service, None)
            service._close_connection = lambda: None
            disconnected.cancel()
            closed.cancel()
            service.connection_closed()

    def _allowed_idle(self, service):
        if service.registered:
            return self.limits.rpc_idle_timeout_seconds
        return self.limits.rpc_register_timeout_seconds

    def _make_room(self, newcomer):
        """Close what the newcomer's arrival puts over a limit; False if it cannot come in."""
        limits = self.limits
        unregistered = [s for s in self.open if not s.registered]
        by_address = collections.defaultdict(list)
        for service in unregistered:
            by_address[service.address].append(service)
        if len(by_address[newcomer.address]) >= limits.rpc_max_unregistered_per_address:
            victim = by_address[newcomer.address][0]
        elif unregistered and (len(unregistered) >= limits.rpc_max_unregistered
                               or len(self.open) >= limits.rpc_max_connections):
            victim = max(by_address.values(), key=len)[0]  # max keeps the first, the oldest
        elif len(self.open) >= limits.rpc_max_connections:
            return False
        else:
            return True
        self._close(self.open.pop(victim), victim, "evicted")
        return True

    def _close(self, stream, service, reason):
        log.debug("Closing the connection from %s (%s)", service.peer, reason)
        self._count(service, reason)
        stream.close()

    def _count(self, service, reason):
        """Count a closing; say how many at most once every 10 s (a flood must not flood the
        log)."""
        RPC_CONNECTIONS_CLOSED.labels(reason).inc()
        self.closed[reason] += 1
        if time.monotonic() - self.last_log >= 10.0:
            self.last_log = time.monotonic()
            log.warning("Closed RPC connections lately (last from %s): %s", service.peer,
                        ", ".join(f"{n} {CLOSINGS[r]}" for r, n in sorted(self.closed.items())))
            self.closed.clear()


CLOSINGS = {
    "full": "refused: rpc_max_connections open, all registered",
    "evicted": "unregistered, closed to make room (rpc_max_unregistered, "
               "rpc_max_unregistered_per_address)",
    "unregistered": "without a call within rpc_register_timeout_seconds",
    "idle": "idle for rpc_idle_timeout_seconds",
    "too large": "sent a message over the connection's limit",
    "closed by its service": "closed by the validator (a child registered on a newer one)",
}


class FrameGuard(asyncio.BufferedProtocol):
    """Stands between a connection's transport and pycapnp's protocol (`inner`) and reads the
    Cap'n Proto frame headers as the bytes arrive. Each header gives the message's size (its
    segment table) before the message is read: one larger than message_limit(service) allows,
    or with more segments than Cap'n Proto takes, never reaches pycapnp, which would read it
    whole and decode it; the connection is closed instead. Everything else passes untouched."""

    MAX_SEGMENTS = 512  # as Cap'n Proto's own reader

    def __init__(self, message_limit):
        self.message_limit, self.service, self.inner = message_limit, None, None
        self.transport, self.buffer = None, None
        self.header = bytearray()  # the current frame header, as far as it has arrived
        self.body_left = 0  # bytes of the current message still to pass
        self.refused = None  # the size of the message refused, if one was

    def connection_made(self, transport):
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, error):
        self.inner.connection_lost(error)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self):
        self.inner.pause_writing()

    def resume_writing(self):
        self.inner.resume_writing()

    def get_buffer(self, size_hint):
        self.buffer = self.inner.get_buffer(size_hint)
        return self.buffer

    def buffer_updated(self, size):
        data, self.buffer = memoryview(self.buffer)[:size], None
        if self.refused is None:
            self.refused = self._check(data)
            if self.refused is None:
                self.inner.buffer_updated(size)
                return
            log.debug("Closing the connection from %s: a message of %d bytes, over its "
                      "limit of %d", self.service and self.service.peer, self.refused,
                      self.message_limit(self.service))
        self.transport.abort()

    def _check(self, data):
        """Follow the frames through `data`; the size of a message that may not pass, or None."""
        at = 0
        while at < len(data):
            if self.body_left:
                step = min(self.body_left, len(data) - at)
                self.body_left, at = self.body_left - step, at + step
                continue
            # A header: the number of segments less one (4 bytes), each segment's size in
            # 8-byte words (4 bytes each), padded to a multiple of 8 bytes; then the segments.
            segments = int.from_bytes(self.header[:4], "little") + 1 if len(self.header) >= 4 \
                else None
            need = 4 if segments is None else (4 + 4 * segments + 7) // 8 * 8
            take = min(need - len(self.header), len(data) - at)
            self.header += data[at:at + take]
            at += take
            if len(self.header) == 4:
                segments = int.from_bytes(self.header, "little") + 1
                if segments > self.MAX_SEGMENTS:
                    return 8 * segments  # at least
            elif len(self.header) == need:
                # The message's size as Cap'n Proto counts it (its limit): its segments.
                self.body_left = 8 * sum(struct.unpack_from(f"<{segments}I", self.header, 4))
                if self.body_left > self.message_limit(self.service):
                    return self.body_left
                self.header.clear()
        return None


# For each method: the results that say "refused", and the field that carries the reason.
REFUSALS = {
    "registerChild": ({"success": False}, "message"),
    "requestJobs": ({"jobs": [], "replies": [], "revoked": []}, "error"),
    "reportJobCompletion": ({"acknowledged": False}, "message"),
    "reportJobCompletions": ({"replies": []}, "error"),
    "receiveJob": ({"accepted": False}, "message"),
    "challenge": ({}, "error"),
    "ping": ({}, "pong"),
    "getStats": ({}, "json"),
}


class ServiceBase(SCHEMA.ValidatorJobsService.Server):
    """One object per connection. Each RPC method is answered by a plain method of the role's
    subclass with the snake_case name (request_jobs for requestJobs), which gets the call's
    parameters by their wire names and returns the results as a dict, or raises Refused. It
    runs on a worker thread, off the event loop; a coroutine method (one that waits, as the
    parent's held requestJobs does) runs on the loop. A method the role does not serve, a text
    parameter that is not UTF-8, or any failure is answered with a message, never with an
    exception: pycapnp would send the client our traceback.

    Before the parameters are decoded, precheck() looks at what costs nothing to read: the
    lengths of lists (LIST_LIMITS) and whatever the role checks; the message itself was
    bounded before it was read (FrameGuard). A call that registers() the connection lifts the
    limits of an unregistered one (see Connections)."""

    role = "validator"
    LIST_LIMITS = {}  # method -> {list parameter: most items}

    def __init__(self):
        self.last_call = time.monotonic()  # for the idle timeouts of this connection
        self.calls = 0  # in progress: a connection is not idle while it waits for an answer
        self.registered = False
        self.peer, self.address = "an unknown address", "unknown"  # RpcThread.serve sets them
        self._close_connection = lambda: None  # Connections.serve sets it while open

    def close_connection(self):
        """Close this connection; from any thread (a worker's too), at once, calls in
        progress or not."""
        self._close_connection()

    def connection_closed(self):
        """Called on the RPC loop once this connection closed, for whatever reason."""

    def ping(self):
        return {"pong": f"pong from {self.role}"}

    def precheck(self, method, params):
        """Raise Refused for a call that is refused on what its reader shows cheaply."""
        for name, most in self.LIST_LIMITS.get(method, {}).items():
            if len(getattr(params, name)) > most:
                raise Refused(f"{len(getattr(params, name))} {name} in one call; the limit is "
                              f"{most}")

    def registers(self, method):
        """True if an answered (not refused) call of `method` registers the connection."""
        return False

    async def _serve(self, method, context):
        self.last_call, self.calls = time.monotonic(), self.calls + 1
        RPC_CALLS.labels(method).inc()
        handler = getattr(self, re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), method), None)
        try:
            if handler is None:
                raise Refused(f"{method} is not served by a {self.role} validator")
            try:
                self.precheck(method, context.params)
                params = context.params.to_dict()
            except UnicodeDecodeError:
                raise Refused("a text parameter is not valid UTF-8") from None
            if contains_nul(params):  # PostgreSQL text cannot hold one
                raise Refused("a text parameter contains a NUL character")
            answer = (handler(**params) if asyncio.iscoroutinefunction(handler)
                      else asyncio.to_thread(handler, **params))
            # The reason field is always set: an unset text field is absent from to_dict().
            results = {REFUSALS[method][1]: "", **await answer}
            self.registered = self.registered or self.registers(method)
        except Refused as e:
            RPC_REFUSALS.labels(method).inc()
            results = refusal(method, str(e))
        except DatabaseUnavailable as e:
            RPC_REFUSALS.labels(method).inc()
            log.debug("RPC method %s: %s", method, e)  # the main loop logs the outage
            results = refusal(method, f"the {self.role}'s database is unavailable; "
                                      "try again later")
        except Exception:
            RPC_REFUSALS.labels(method).inc()
            log.exception("RPC method %s failed", method)
            results = refusal(method, "internal error in the validator; see its log")
        finally:
            self.last_call, self.calls = time.monotonic(), self.calls - 1
        for field, value in results.items():
            setattr(context.results, field, value)

    def __getattr__(self, name):
        # pycapnp answers a call of method M with <M>_context(context) if there is one: every
        # method in REFUSALS goes through _serve, which decodes the parameters itself.
        method = name.removesuffix("_context")
        if method != name and method in REFUSALS:
            return lambda context: self._serve(method, context)
        raise AttributeError(name)


def peer_address(transport):
    """(host:port to show, the address its limits count by: an IPv4 address or an IPv6 /64)."""
    peer = transport.get_extra_info("peername") if transport else None
    if not peer:
        return "an unknown address", "unknown"
    shown = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    address = ipaddress.ip_address(peer[0].split("%")[0])
    if address.version == 6 and not address.ipv4_mapped:
        return shown, str(ipaddress.ip_network(f"{address}/64", strict=False))
    return shown, str(getattr(address, "ipv4_mapped", None) or address)


def contains_nul(value):
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, (dict, list)):
        return any(map(contains_nul, value.values() if isinstance(value, dict) else value))
    return False


def refusal(method, reason):
    results, field = REFUSALS[method]
    return {**results, field: json.dumps({"error": reason}) if method == "getStats" else reason}


class RpcClient:
    """A synchronous client for a ValidatorJobsService on host:port over one persistent
    connection, opened on first use and again after it breaks. `on_connect(capability)` is an
    optional coroutine run on every new connection before any other call (a child registers)."""

    def __init__(self, rpc, host, port, timeout=10.0, on_connect=None, tls=None):
        self.rpc, self.host, self.port, self.tls = rpc, host, port, tls
        self.timeout = timeout
        self.on_connect = on_connect
        self._cap = None
        self._client = None
        self._unimplemented = set()  # methods the peer on this connection does not serve
        rpc.clients.append(self)

    async def _capability(self):
        if self._cap is None:
            stream = await capnp.AsyncIoStream.create_connection(
                host=self.host, port=self.port, ssl=self.tls,
                server_hostname=self.host if self.tls else None)
            self._client = capnp.TwoPartyClient(stream)
            cap = self._client.bootstrap().cast_as(SCHEMA.ValidatorJobsService)
            self._unimplemented.clear()  # the peer may have been upgraded meanwhile
            if self.on_connect:
                await self.on_connect(cap)
            self._cap = cap
        return self._cap

    async def _call(self, method, params):
        reused = self._cap is not None
        if reused and method in self._unimplemented:  # learned on this connection
            raise Unimplemented(f"{self.host}:{self.port} does not serve {method}")
        try:
            cap = await asyncio.wait_for(self._capability(), self.timeout)
            response = await asyncio.wait_for(getattr(cap, method)(**params), self.timeout)
            return response.to_dict()
        except (OSError, asyncio.TimeoutError, capnp.KjException) as e:
            forget_frames(e)
            if isinstance(e, capnp.KjException) and str(e.type) == "UNIMPLEMENTED":
                self._unimplemented.add(method)
                raise Unimplemented(f"{self.host}:{self.port} does not serve {method}") from None
            self._cap = self._client = None
            if reused and isinstance(e, capnp.KjException):
                # The peer closed a connection we had not used for a while (its idle timeout,
                # or a restart): try once on a new one. Every call here is safe to repeat.
                return await self._call(method, params)
            raise PeerUnavailable(f"{self.host}:{self.port}: {describe(e)}") from None

    def call(self, method, **params):
        """Call `method` and return its results as a dict. Raises PeerUnavailable, or
        Unimplemented for a method the peer does not serve."""
        return self.rpc.run(self._call(method, params))

    def close(self):
        async def drop():
            self._cap = self._client = None
        self.rpc.run(drop(), timeout=5)


def forget_frames(error):
    """Drop the frames that a failed call's exception, and those it chains, hold.

    asyncio.wait_for keeps the call's exception in its future, and the exception's traceback
    holds wait_for's frame, which holds that future: a reference cycle, which also holds the
    capability and the call's promise (RpcClient._call's frame). Only the garbage collector
    frees a cycle, on whatever thread it happens to run; a capnp object freed off the RPC
    thread aborts the process ("No event loop is running on this thread"), or corrupts it.
    Without the frames there is no cycle, and everything is freed here, on the RPC thread."""
    chained = [error]
    while chained:
        error = chained.pop()
        if error is not None and error.__traceback__ is not None:
            error.__traceback__ = None
            chained += [error.__context__, error.__cause__]


def describe(error):
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, capnp.KjException):
        return f"connection {str(error.type).lower()}"
    return error.strerror or type(error).__name__
