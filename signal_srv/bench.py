"""``python -m signal_srv.bench``: signal_srv against a bare-Tornado floor, as ratios from one run.

Both servers run as separate processes pinned to CPU 0; this process (the load client)
pins itself to CPU 1. Each figure is taken on a fresh server process, floor and
signal_srv alternating (A/B, then B/A in the next round), with the same client code and
the same load. The floor (``--floor-server``) is the least a relay can do on Tornado: a
JSON ``POST`` that returns an id, and a WebSocket that pairs two sockets by key and
forwards text frames. The load client speaks HTTP/1.1 keep-alive and WebSocket on raw
asyncio protocols, so that it costs far less CPU per message than the servers it drives;
every figure still reports the client's CPU and is flagged when the client used >= 90 %
of its core (then it understates the server).

Everything targets 127.0.0.1; every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import gc
import itertools
import json
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlencode

if TYPE_CHECKING:
    from signal_srv.spawn import Spawned
    from signal_srv.stress import StressOptions

__all__ = ["main", "floor_server", "sweep_probe"]

# The floor and the sweep probe run as their own processes, from --server-dir when given
# (so that a snapshot's signal_srv is measured); this module is run there by path, which
# is why nothing from signal_srv is imported at the top.
RUN_BY_PATH = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"

SERVER_CPU, CLIENT_CPU = 0, 1
# The floor listens with signal_srv's default listen_backlog: with Tornado's default (128) a
# connect storm overflows the accept queue, and the figure measures SYN retry timers.
FLOOR_BACKLOG = 4096
CLIENT_BOUND = 0.90
SIGNAL, FLOOR = "signal_srv", "floor"
WS_KEY = base64.b64encode(b"signal-srv-bench").decode()
try:
    from tornado.speedups import websocket_mask as _mask  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the pure-Python fallback
    from tornado.util import _websocket_mask_python as _mask


# The floor server ------------------------------------------------------------------------


def floor_server(port: int, heartbeat: float = 20.0, event_loop: str = "asyncio") -> None:
    """Run the floor on 127.0.0.1:``port`` until killed, on asyncio's loop or uvloop's."""
    if event_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop(uvloop.new_event_loop())
    from tornado.ioloop import IOLoop
    from tornado.web import Application, RequestHandler
    from tornado.websocket import WebSocketHandler

    counter = itertools.count(1)
    rooms: dict[str, list[Any]] = {}

    class Post(RequestHandler):
        def post(self) -> None:
            self.write({"id": f"k{next(counter)}"})

    class Relay(WebSocketHandler):
        def open(self) -> None:  # type: ignore[override]
            self.key = self.get_query_argument("key")
            rooms.setdefault(self.key, []).append(self)

        def on_message(self, message: str | bytes) -> None:
            for other in rooms.get(self.key, ()):
                if other is not self:
                    other.write_message(message)

        def on_close(self) -> None:
            room = rooms.get(self.key, [])
            if self in room:
                room.remove(self)
            if not room:
                rooms.pop(self.key, None)

    app = Application([(r"/calls", Post), (r"/ws", Relay)], websocket_ping_interval=heartbeat,
                      websocket_ping_timeout=heartbeat)
    app.listen(port, "127.0.0.1", backlog=FLOOR_BACKLOG)
    IOLoop.current().start()


# The sweep probe (T9 and the registered-call size of T4) ----------------------------------


async def _sweep_probe(calls: int) -> dict[str, float]:
    from signal_srv.app import make_registry
    from signal_srv.config import Config

    registry = make_registry(Config(max_calls=calls + 1))
    gc.collect()
    before = rss_bytes(os.getpid())
    started = time.perf_counter()
    for i in range(calls):
        registry.create()
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the new actors reach their first queue read
    await asyncio.sleep(0)
    create_s = time.perf_counter() - started
    gc.collect()
    per_call = (rss_bytes(os.getpid()) - before) / calls
    lags: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.001)  # the lag monitor's tick, not a wait for a condition
            lags.append(1000.0 * (loop.time() - before - 0.001))

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.05)
    sweeps = []
    for _ in range(3):
        t = time.perf_counter()
        await registry.sweep()
        sweeps.append(1000.0 * (time.perf_counter() - t))
    stop.set()
    await watcher
    await registry.close(timeout=30)
    return {"calls": calls, "create_s": round(create_s, 2), "bytes_per_registered_call": round(per_call),
            "sweep_ms": round(max(sweeps), 1), "max_loop_lag_ms": round(max(lags), 2)}


def sweep_probe(calls: int) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(_sweep_probe(calls))))


# Process measurements -----------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """CPU used by the server and by this client over a measured stretch of wall time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall, self.server, self.client = time.perf_counter(), cpu_seconds(pid), own_cpu_seconds()

    def close(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        return {"seconds": round(wall, 2),
                "server_cpu": round((cpu_seconds(self.pid) - self.server) / wall, 3),
                "client_cpu": round((own_cpu_seconds() - self.client) / wall, 3)}


# The load client: HTTP keep-alive and WebSocket on raw protocols -------------------------


class Http(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:head_end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self.buffer) < head_end + 4 + length:
            return
        body = bytes(self.buffer[head_end + 4:head_end + 4 + length])
        del self.buffer[:head_end + 4 + length]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((int(head[0].split()[1]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def post(self, path: str, headers: str = "") -> tuple[int, bytes]:
        """``headers``: extra header lines, each ending in CRLF."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: 0\r\n\r\n".encode())
        return await self.waiter


class Ws(asyncio.Protocol):
    """One client WebSocket: answers pings, hands text frames to ``on_text(ws, data)``."""

    def __init__(self, on_text: Callable[[Ws, bytes], None]) -> None:
        self.on_text = on_text
        self.buffer = bytearray()
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.pair: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:12])
            del self.buffer[:end + 4]
            if b" 101" not in status:
                self.handshake.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                return
            self.open = True
            self.handshake.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buf, pos, size = self.buffer, 0, len(self.buffer)
        while size - pos >= 2:
            opcode, length, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head:pos + head + length])
            pos += head + length
            if opcode == 1:
                self.on_text(self, payload)
            elif opcode == 9:
                self._write(0x8A, payload)
            elif opcode == 8:
                self.open = False
                if self.transport is not None:
                    self.transport.close()
        del buf[:pos]

    def _write(self, first: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([first, 0x80 | n]) if n < 126 else bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
        key = os.urandom(4)
        assert self.transport is not None
        self.transport.write(head + key + _mask(key, payload))

    def send(self, payload: bytes) -> None:
        if self.open:
            self._write(0x81, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError("connection lost during the handshake"))
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost before the pair was ready"))
            self.ready.exception()  # seen here: a socket refused at its handshake has nobody waiting for it


async def http_connect(port: int, source: str | None = None) -> Http:
    """A keep-alive connection to 127.0.0.1:``port``, from the loopback address ``source`` if given."""
    _, protocol = await asyncio.get_running_loop().create_connection(
        Http, "127.0.0.1", port, local_addr=(source, 0) if source else None)
    return protocol


async def ws_connect(port: int, path: str, on_text: Callable[[Ws, bytes], None], source: str | None = None) -> Ws:
    _, ws = await asyncio.get_running_loop().create_connection(
        lambda: Ws(on_text), "127.0.0.1", port, local_addr=(source, 0) if source else None)
    assert ws.transport is not None
    ws.transport.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        ).encode())
    await ws.handshake
    return ws


# Targets: how each server makes a pair --------------------------------------------------------


@dataclass
class Target:
    kind: str
    server: Spawned
    port: int
    headers: str = ""  # with auth=jwt: the Authorization line of an access token (create and join)

    @property
    def create_path(self) -> str:
        return "/apiv2/calls" if self.kind == SIGNAL else "/calls"

    async def create(self, http: Http) -> tuple[int, bytes]:
        return await http.post(self.create_path, self.headers)

    async def pair_paths(self, http: Http) -> tuple[str, str]:
        """Create (and for signal_srv, join) one call; the two sockets' paths."""
        status, body = await self.create(http)
        if status not in (200, 201):
            raise ConnectionError(f"create answered {status}: {body[:200]!r}")
        created = json.loads(body)
        if self.kind == FLOOR:
            path = "/ws?" + urlencode({"key": created["id"]})
            return path, path
        status, body = await http.post(f"/apiv2/calls/{created['call_id']}/join", self.headers)
        if status != 200:
            raise ConnectionError(f"join answered {status}: {body[:200]!r}")
        joined = json.loads(body)
        return tuple(  # type: ignore[return-value]
            "/apiv2/ws?" + urlencode({"call_id": c["call_id"], "peer_id": c["peer_id"], "token": c["peer_token"]})
            for c in (created, joined))


@dataclass
class Pair:
    a: Ws
    b: Ws
    sent_at: float = 0.0


class Load:
    """Pairs of sockets against one target; what the other side of a pair sent goes to ``on_relay``.

    Only a frame that carries the payload a pair's other side sends (see ``relay``) counts
    as relayed: an echo, an error frame or a pong must not inflate a figure; those are
    counted in ``stray``.
    """

    def __init__(self, target: Target, b_port: int | None = None) -> None:
        self.target = target
        self.ports = (target.port, b_port or target.port)  # where each pair's two sockets connect
        self.pairs: list[Pair] = []
        self.errors = 0
        self.stray = 0
        self.on_relay: Callable[[Ws, bytes], None] = lambda ws, data: None
        self._to_a: tuple[bytes, ...] = ()
        self._to_b: tuple[bytes, ...] = ()

    def relay(self, on_relay: Callable[[Ws, bytes], None], a_sends: bytes | Sequence[bytes],
              b_sends: bytes | Sequence[bytes]) -> None:
        """Hand ``on_relay`` the frames that carry the payload of (one of) ``a_sends`` to b and
        of ``b_sends`` to a."""
        def payloads(sends: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
            return tuple(carried(m) for m in ([sends] if isinstance(sends, bytes) else sends))

        self.on_relay, self._to_b, self._to_a = on_relay, payloads(a_sends), payloads(b_sends)

    def idle(self) -> None:
        """Count nothing as relayed (between phases, or while only heartbeats flow)."""
        self.on_relay = lambda ws, data: None
        self._to_a = self._to_b = ()

    def _on_text(self, ws: Ws, data: bytes) -> None:
        if data.startswith(b'{"type":"state"'):
            if b'"connected":2' in data and not ws.ready.done():
                ws.ready.set_result(None)
            return
        pair: Pair | None = ws.pair
        expected = self._to_b if pair is not None and ws is pair.b else self._to_a
        if pair is not None and any(payload in data for payload in expected):
            self.on_relay(ws, data)
        else:
            self.stray += 1

    async def create(self, count: int, concurrency: int = 50) -> list[tuple[str, str]]:
        paths: list[tuple[str, str]] = []
        conns = [await http_connect(self.target.port) for _ in range(min(concurrency, count))]

        async def worker(http: Http, share: int) -> None:
            for _ in range(share):
                paths.append(await self.target.pair_paths(http))

        shares = [count // len(conns) + (i < count % len(conns)) for i in range(len(conns))]
        await asyncio.gather(*(worker(h, s) for h, s in zip(conns, shares)))
        for h in conns:
            assert h.transport is not None
            h.transport.close()
        return paths

    async def connect(self, paths: Sequence[tuple[str, str]], concurrency: int | None, timeout: float) -> int:
        """Open both sockets of every pair and wait until each pair is ready; return the errors."""
        slots = asyncio.Semaphore(concurrency or len(paths) * 2)

        async def one(path: str, port: int) -> Ws:
            async with slots:
                ws = await ws_connect(port, path, self._on_text)
            if self.target.kind == FLOOR:
                ws.ready.set_result(None)  # the floor pairs synchronously in open()
            return ws

        async def pair(a_path: str, b_path: str) -> None:
            try:
                if self.ports[0] == self.ports[1]:
                    a, b = await asyncio.gather(one(a_path, self.ports[0]), one(b_path, self.ports[1]))
                else:  # a first, so that the call lives where a is and b is bridged
                    a = await one(a_path, self.ports[0])
                    b = await one(b_path, self.ports[1])
                await asyncio.gather(a.ready, b.ready)
            except (OSError, ConnectionError):
                self.errors += 1
                return
            a.pair = b.pair = p = Pair(a, b)
            self.pairs.append(p)

        await asyncio.wait_for(asyncio.gather(*(pair(a, b) for a, b in paths)), timeout)
        return self.errors

    def close(self) -> None:
        for p in self.pairs:
            for ws in (p.a, p.b):
                if ws.transport is not None:
                    ws.transport.close()


# Scenarios -------------------------------------------------------------------------------------



def candidate(sdp_mid: str) -> bytes:
    return json.dumps({"type": "candidate", "payload": {
        "candidate": "candidate:842163049 1 udp 1677729535 127.0.0.1 54400 typ srflx raddr 0.0.0.0 rport 0 "
                     "generation 0 ufrag abcd network-id 1 network-cost 10", "sdpMid": sdp_mid, "sdpMLineIndex": 0}},
        separators=(",", ":")).encode()


# Each side of a pair sends its own candidate, so an echo is told apart from a relay.
CANDIDATE_A, CANDIDATE_B = candidate("0"), candidate("1")
OFFER = json.dumps({"type": "offer", "payload": {"type": "offer", "sdp": "v=0\r\n" + "a=x-bench:" + "y" * 1990}},
                   separators=(",", ":")).encode()
ANSWER = OFFER.replace(b'"offer"', b'"answer"')


def carried(message: bytes) -> bytes:
    """The bytes of ``message``'s payload as both servers relay it (signal_srv re-encodes it compactly)."""
    return b'"payload":' + json.dumps(json.loads(message)["payload"], separators=(",", ":")).encode()


async def post_rate(target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
    """T7: POST requests/s at ``concurrency`` keep-alive connections."""
    conns = [await http_connect(target.port) for _ in range(concurrency)]
    latencies: list[float] = []
    loop = asyncio.get_running_loop()

    async def worker(http: Http, until: float) -> None:
        while loop.time() < until:
            t = time.perf_counter()
            status, _ = await target.create(http)
            if status in (200, 201):
                latencies.append(1000.0 * (time.perf_counter() - t))

    await asyncio.gather(*(worker(h, loop.time() + 0.5) for h in conns))  # warm-up
    latencies.clear()
    window = Window(target.server.process.pid)
    await asyncio.gather(*(worker(h, loop.time() + seconds) for h in conns))
    usage = window.close()
    for h in conns:
        assert h.transport is not None
        h.transport.close()
    from signal_srv.stress import percentiles

    return {"req_per_s": round(len(latencies) / usage["seconds"]), "latency_ms": percentiles(latencies), **usage}


async def closed_loop(load: Load, seconds: float) -> dict[str, Any]:
    """T1: every pair ping-pongs a candidate-sized message as fast as the relay allows."""
    count = 0
    running = True

    def on_relay(ws: Ws, data: bytes) -> None:
        nonlocal count
        count += 1
        if running:
            ws.send(CANDIDATE_A if ws is ws.pair.a else CANDIDATE_B)

    load.relay(on_relay, CANDIDATE_A, CANDIDATE_B)
    for p in load.pairs:
        p.a.send(CANDIDATE_A)
    await asyncio.sleep(1.0)  # warm-up at full load: a measured stretch of time, not a wait for an event
    start_count, start_stray, window = count, load.stray, Window(load.target.server.process.pid)
    await asyncio.sleep(seconds)  # the measured stretch
    measured, stray, usage = count - start_count, load.stray - start_stray, window.close()
    running = False
    await asyncio.sleep(0.5)  # let in-flight messages drain before the next phase
    load.idle()
    return {"msgs_per_s": round(measured / usage["seconds"]), "stray_frames": stray, **usage}


async def paced(
    load: Load, seconds: float, low: float = 1.0, high: float = 3.0, active: int | None = None,
    offer: bytes = OFFER, answer: bytes = ANSWER,
) -> dict[str, Any]:
    """T2/T3: each of the first ``active`` pairs (default: all) does one ``offer`` -> ``answer``
    exchange every ``low``-``high`` s; the others stay idle. Hop and round-trip latency."""
    hops: list[float] = []
    trips: list[float] = []
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    running = True
    measuring = False

    def fire(p: Pair) -> None:
        if running:
            p.sent_at = time.perf_counter()
            p.a.send(offer)
            loop.call_later(rng.uniform(low, high), fire, p)

    def on_relay(ws: Ws, data: bytes) -> None:
        p: Pair = ws.pair
        elapsed = 1000.0 * (time.perf_counter() - p.sent_at)
        if ws is p.b:
            if measuring:
                hops.append(elapsed)
            ws.send(answer)
        elif measuring:
            trips.append(elapsed)

    load.relay(on_relay, offer, answer)
    for p in load.pairs[:active]:
        loop.call_later(rng.uniform(0, high - low), fire, p)
    await asyncio.sleep(high)  # ramp-up: every pair has started its cycle
    measuring, start_stray, window = True, load.stray, Window(load.target.server.process.pid)
    await asyncio.sleep(seconds)  # the measured stretch
    measuring, stray, usage = False, load.stray - start_stray, window.close()
    running = False
    await asyncio.sleep(0.3)  # in-flight exchanges drain
    load.idle()
    from signal_srv.stress import percentiles

    return {"hop_ms": percentiles(hops), "round_trip_ms": percentiles(trips), "stray_frames": stray, **usage}


async def create_latency(target: Target, count: int) -> dict[str, Any]:
    """Sequential create latency on one keep-alive connection."""
    http = await http_connect(target.port)
    latencies = []
    for _ in range(count):
        t = time.perf_counter()
        await target.create(http)
        latencies.append(1000.0 * (time.perf_counter() - t))
    assert http.transport is not None
    http.transport.close()
    from signal_srv.stress import percentiles

    return percentiles(latencies)


# Running figures on fresh servers --------------------------------------------------------------


def helper_argv(*args: str) -> list[str]:
    """Run this module, by path, as a helper process (the floor or the sweep probe)."""
    return [sys.executable, "-c", RUN_BY_PATH, os.path.abspath(__file__), *args]


def start(kind: str, calls: int, server_dir: str | None, auth: str = "none", event_loop: str = "asyncio") -> Target:
    """A fresh server of ``kind`` on ``event_loop`` (asyncio or uvloop); signal_srv with ``auth="jwt"``
    gets a random secret, and the target an access token minted with it (grants create and join)
    for every create and join."""
    from signal_srv.spawn import free_port, server_options, spawn, spawn_server
    from signal_srv.tokens import mint

    headers = ""
    if kind == SIGNAL:
        secret = base64.urlsafe_b64encode(os.urandom(32)).decode() if auth == "jwt" else ""
        # A server that predates the option runs on asyncio; a newer one would pick uvloop by itself.
        loop = [f"--event_loop={event_loop}"] if "event_loop" in server_options(server_dir) else []
        if event_loop != "asyncio" and not loop:
            raise RuntimeError(f"the signal_srv in {server_dir or '.'} has no event_loop option")
        server = spawn_server(calls, cpu=SERVER_CPU, server_dir=server_dir, jwt_secret=secret, extra=loop)
        if secret:
            headers = f"Authorization: Bearer {mint(secret, 'bench', grants=['create', 'join'], ttl=3600)}\r\n"
    else:
        port = free_port()
        server = spawn(helper_argv("--floor-server", f"--port={port}", f"--event-loop={event_loop}"), port,
                       SERVER_CPU)
    return Target(kind, server, int(server.base_url.rsplit(":", 1)[1]), headers)


async def level(kind: str, calls: int, plan: Plan) -> dict[str, Any]:
    """One fresh server holding ``calls`` connected pairs: memory, paced, create latency, closed loop."""
    target = start(kind, calls, plan.server_dir, plan.auth)
    figures: dict[str, Any] = {}
    load = Load(target)
    try:
        await create_latency(target, 20)  # warm the server's code paths
        gc.collect()
        base_rss = rss_bytes(target.server.process.pid)
        paths = await load.create(calls)
        t = time.perf_counter()
        figures["connect_errors"] = await load.connect(paths, 500, timeout=120)
        figures["connect_s"] = round(time.perf_counter() - t, 2)
        figures["rss_per_call_bytes"] = round((rss_bytes(target.server.process.pid) - base_rss) / calls)
        if calls in plan.paced_levels:
            figures["paced"] = await paced(load, plan.paced_seconds)
        if calls in (plan.small, plan.large):
            # T3: the same load (100 calls, an exchange every 0.2-0.6 s) with the rest idle.
            figures["growth"] = await paced(load, plan.paced_seconds, 0.2, 0.6, active=plan.small)
            figures["create_ms"] = await create_latency(target, 200)
        if calls in plan.closed_levels:
            figures["closed"] = await closed_loop(load, plan.closed_seconds)
    finally:
        target.server.stop()  # the server closes first: no TIME_WAIT piles up on the client side
        load.close()
    return figures


async def connect_storm(
    kind: str, calls: int, server_dir: str | None, auth: str = "none", event_loop: str = "asyncio",
) -> dict[str, Any]:
    """T8: ``calls`` pre-created calls connect all their sockets at once."""
    target = start(kind, calls, server_dir, auth, event_loop)
    load = Load(target)
    try:
        paths = await load.create(calls)
        window = Window(target.server.process.pid)
        errors = await load.connect(paths, None, timeout=60)
        usage = window.close()
    finally:
        target.server.stop()
        load.close()
    return {"errors": errors, "pairs": len(load.pairs), **usage}


async def post_figure(kind: str, plan: Plan, auth: str | None = None) -> dict[str, Any]:
    """T7 on a fresh server (``auth``: of signal_srv, instead of the plan's)."""
    target = start(kind, 0, plan.server_dir, auth or plan.auth)
    try:
        return await post_rate(target, 50, plan.post_seconds)
    finally:
        target.server.stop()


async def stress_figure(plan: Plan) -> dict[str, Any]:
    from signal_srv.spawn import spawn_server
    from signal_srv.stress import run_stress

    secret = base64.urlsafe_b64encode(os.urandom(32)).decode() if plan.auth == "jwt" else ""
    server = spawn_server(plan.stress.calls, cpu=SERVER_CPU, server_dir=plan.server_dir, jwt_secret=secret)
    try:
        window = Window(server.process.pid)
        result = await run_stress(server.base_url, dataclasses.replace(plan.stress, jwt_secret=secret))
        usage = window.close()
    finally:
        server.stop()
    d = result.to_dict()
    keep = ("ok", "calls_ok", "calls_failed", "sent", "delivered", "lost", "duplicated", "misrouted", "reordered",
            "unexpected_errors", "unexpected_closes", "messages_per_s", "latency_ms")
    return {**{k: d[k] for k in keep}, **usage}


RSS_LIMIT = 2 * 1024 ** 3  # T5: calls held within 2 GiB of server RSS
SCALE_P99_MS = 50.0  # T5: paced p99 under load at each level
T5_TARGET = T6_CALLS = 20000
T6_TARGET_PCT = 5.0
FD_HEADROOM = 600  # descriptors per process kept for the listener, epoll, HTTP connections, pipes, logs


def fd_call_cap() -> int | None:
    """Calls (2 sockets each) that both sides can hold under the hard ``RLIMIT_NOFILE``, or None if unlimited.

    The client holds both sockets of each call and the server the other ends, so each side
    needs 2 descriptors per call; a spawned server inherits this process's hard limit, so the
    smaller of the two is this one's."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return None
    return max(0, (hard - FD_HEADROOM) // 2) // 100 * 100


def scale_steps(plan: Plan) -> tuple[list[int], int | None]:
    """T5's levels: the plan's nominal steps up to the fd cap, then the cap itself if it is lower than the last."""
    cap = fd_call_cap()
    steps = [n for n in plan.scale_steps if cap is None or n <= cap]
    if cap is not None and plan.scale_steps and cap < max(plan.scale_steps) and cap not in steps:
        steps.append(cap)
    return steps, cap


async def idle_cpu(load: Load, seconds: float) -> dict[str, Any]:
    """T6: the server's CPU with every pair idle (only heartbeats) over ``seconds`` (>= one heartbeat interval)."""
    load.idle()
    await asyncio.sleep(2.0)  # settle after the last paced window: a stretch of time, not a wait for an event
    window = Window(load.target.server.process.pid)
    await asyncio.sleep(seconds)  # the measured stretch
    usage = window.close()
    calls = len(load.pairs)
    pct = 100.0 * usage["server_cpu"]
    per_1000 = 1000.0 * pct / calls if calls else None
    return {"calls": calls, "server_cpu_pct": round(pct, 2),
            "pct_per_1000_calls": None if per_1000 is None else round(per_1000, 3),
            "extrapolated_pct_at_20000": None if per_1000 is None else round(per_1000 * T6_CALLS / 1000, 2),
            "rss_bytes": rss_bytes(load.target.server.process.pid), **usage}


async def scale_figure(kind: str, plan: Plan) -> dict[str, Any]:
    """T5 then T6 on one fresh server: step up the connected calls (heartbeats on, default 20 s);
    at each level record RSS and a short paced window over ``plan.scale_active`` calls; stop at the
    first level with errors, RSS over 2 GiB or p99 over 50 ms. Then, with every call left connected
    (the largest level reached), the server's idle CPU over one heartbeat interval."""
    steps, cap = scale_steps(plan)
    target = start(kind, max(steps), plan.server_dir, plan.auth)
    pid = target.server.process.pid
    load = Load(target)
    levels: list[dict[str, Any]] = []
    stopped_by = "fd_limit" if cap is not None and cap < T5_TARGET else "none"
    held = 0
    try:
        await create_latency(target, 20)
        base_rss = rss_bytes(pid)
        for calls in steps:
            step: dict[str, Any] = {"calls": calls}
            levels.append(step)
            try:
                paths = await load.create(calls - len(load.pairs))
                t = time.perf_counter()
                step["errors"] = await load.connect(paths, 500, timeout=120)
                step["connect_s"] = round(time.perf_counter() - t, 2)
                step["rss_bytes"] = rss = rss_bytes(pid)
                step["rss_per_call_bytes"] = round((rss - base_rss) / max(len(load.pairs), 1))
                step["paced"] = await paced(load, plan.scale_seconds, 0.2, 0.6, active=plan.scale_active)
            except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
                step["failure"] = f"{type(exc).__name__}: {exc}"[:200]
                stopped_by = "error"
                break
            p99 = step["paced"]["hop_ms"].get("p99")
            if step["errors"]:
                stopped_by = "error"
            elif rss > RSS_LIMIT:
                stopped_by = "rss"
            elif p99 is None or p99 > SCALE_P99_MS:
                stopped_by = "p99"
            else:
                step["passed"] = True
                held = calls
                continue
            break
        if target.server.process.poll() is None and load.pairs:
            heartbeat = await idle_cpu(load, plan.heartbeat_seconds)
        else:
            heartbeat = {"failure": "no server or no calls left to measure"}
    finally:
        target.server.stop()
        load.close()
    last = levels[-1] if levels else {}
    per_call = last.get("rss_per_call_bytes")
    return {"held": held, "stopped_by": stopped_by, "fd_cap_calls": cap, "levels": levels,
            "rss_at_held_bytes": next((lv["rss_bytes"] for lv in levels if lv["calls"] == held), None),
            "p99_at_held_ms": next((lv["paced"]["hop_ms"].get("p99") for lv in levels if lv["calls"] == held), None),
            # an extrapolation, labelled as such: calls whose RSS would reach 2 GiB at the last level's cost per call
            "extrapolated_calls_in_2gib": round((RSS_LIMIT - base_rss) / per_call) if per_call else None,
            "heartbeat": heartbeat}


def probe(calls: int, server_dir: str | None) -> dict[str, Any]:
    import subprocess

    process = subprocess.Popen(helper_argv("--sweep-probe", f"--calls={calls}"), stdout=subprocess.PIPE, text=True,
                               cwd=server_dir or None)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(process.pid, {SERVER_CPU})
    out, _ = process.communicate(timeout=300)
    return dict(json.loads(out.strip().splitlines()[-1]))


@dataclass
class Plan:
    rounds: int
    paced_levels: tuple[int, ...]
    closed_levels: tuple[int, ...]
    paced_seconds: float
    closed_seconds: float
    post_seconds: float
    storm_calls: int
    sweep_calls: int
    stress: StressOptions
    small: int = 0
    large: int = 0
    levels: tuple[int, ...] = field(default=())
    server_dir: str | None = None
    # T5/T6 (full plan only): nominal steps, capped at run time by the open-file limit
    scale_steps: tuple[int, ...] = field(default=())
    scale_seconds: float = 5.0
    scale_active: int = 100
    heartbeat_seconds: float = 20.0
    auth: str = "none"  # of every signal_srv server (T7's auth comparison runs both)
    hostile_seconds: float = 6.0


def make_plan(quick: bool, server_dir: str | None, auth: str = "none") -> Plan:
    from signal_srv.stress import StressOptions

    if quick:
        return Plan(rounds=1, paced_levels=(100, 1000), closed_levels=(500, 1000), paced_seconds=4,
                    closed_seconds=2, post_seconds=2, storm_calls=1000, sweep_calls=20000,
                    stress=StressOptions(calls=300, candidates=10, end_fraction=0.3, duration=60),
                    small=100, large=1000, levels=(100, 500, 1000), server_dir=server_dir, auth=auth)
    return Plan(rounds=2, paced_levels=(100, 1000, 5000), closed_levels=(500, 1000), paced_seconds=10,
                closed_seconds=5, post_seconds=5, storm_calls=2000, sweep_calls=100000,
                stress=StressOptions(calls=1000, candidates=20, end_fraction=0.3, duration=180),
                small=100, large=5000, levels=(100, 500, 1000, 5000), server_dir=server_dir,
                scale_steps=(2500, 5000, 7500, 10000, 15000, 20000), scale_seconds=5.0, scale_active=100,
                heartbeat_seconds=20.0, auth=auth, hostile_seconds=10.0)


async def run_plan(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """Every figure for both servers; A/B order alternates per round."""
    raw: dict[str, dict[str, list[Any]]] = {SIGNAL: {}, FLOOR: {}}

    async def both(name: str, make: Callable[[str], Awaitable[Any]], r: int) -> None:
        for kind in ((FLOOR, SIGNAL) if r % 2 == 0 else (SIGNAL, FLOOR)):
            say(f"  round {r + 1}: {name} on {kind}")
            raw[kind].setdefault(name, []).append(await make(kind))

    from signal_srv.spawn import server_options

    auths = ("none", "jwt") if "auth" in server_options(plan.server_dir) else ()  # a snapshot may predate auth
    for r in range(plan.rounds):
        await both("post", lambda k: post_figure(k, plan), r)
        for auth in auths if r % 2 == 0 else auths[::-1]:  # the cost of verifying tokens
            say(f"  round {r + 1}: post on {SIGNAL} with auth={auth}")
            raw[SIGNAL].setdefault(f"post_auth_{auth}", []).append(await post_figure(SIGNAL, plan, auth))
        for calls in plan.levels:
            await both(f"level_{calls}", lambda k, c=calls: level(k, c, plan), r)  # type: ignore[misc]
        await both("storm", lambda k: connect_storm(k, plan.storm_calls, plan.server_dir, plan.auth), r)
    if plan.scale_steps:  # once, not per round: it is the longest figure (about 1.5 min per server)
        steps, cap = scale_steps(plan)
        for kind in (FLOOR, SIGNAL):
            say(f"  scale + heartbeat on {kind}: steps {', '.join(map(str, steps))} calls"
                + (f" (open-file cap {cap})" if cap is not None else ""))
            raw[kind]["scale"] = [await scale_figure(kind, plan)]
    say(f"  sweep probe (signal_srv registry in-process, {plan.sweep_calls} idle calls)")
    sweep = probe(plan.sweep_calls, plan.server_dir)
    say(f"  stress tool: {plan.stress.calls} calls, {plan.stress.candidates} candidates, "
        f"{plan.stress.end_fraction:.0%} ended mid-run")
    stress = await stress_figure(plan)
    from signal_srv.hostile import hostile_figure

    say("  one hostile IP: a victim's relay latency alone, then with one attacker address at the default limits")
    hostile = await hostile_figure(plan.server_dir, plan.hostile_seconds)
    return {"raw": raw, "sweep": sweep, "stress": stress, "hostile": hostile}


# Summarising -------------------------------------------------------------------------------------


def _pick(runs: list[Any], path: Sequence[str]) -> float | None:
    values = []
    for run in runs:
        for key in path:
            run = run.get(key) if isinstance(run, dict) else None
        if isinstance(run, (int, float)):
            values.append(float(run))
    return statistics.median(values) if values else None


@dataclass
class Row:
    figure: str
    signal: float | None
    floor: float | None
    unit: str
    target: str
    met: bool | None
    client_cpu: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.signal is None or not self.floor:
            return None
        return self.signal / self.floor


def summarise(plan: Plan, results: dict[str, Any]) -> list[Row]:
    raw, rows = results["raw"], []

    def get(kind: str, name: str, *path: str) -> float | None:
        return _pick(raw[kind].get(name, []), path)

    def client(name: str, *path: str) -> float | None:
        values = [v for v in (get(SIGNAL, name, *path, "client_cpu"), get(FLOOR, name, *path, "client_cpu"))
                  if v is not None]
        return max(values) if values else None

    for calls in plan.closed_levels:
        s, f = get(SIGNAL, f"level_{calls}", "closed", "msgs_per_s"), get(FLOOR, f"level_{calls}", "closed", "msgs_per_s")
        ratio = s / f if s and f else None
        rows.append(Row(f"T1 relay msgs/s, closed loop, {calls} calls", s, f, "msg/s", ">= 0.65x (0.8x)",
                        ratio is not None and ratio >= 0.65, client(f"level_{calls}", "closed"),
                        f"server CPU {get(SIGNAL, f'level_{calls}', 'closed', 'server_cpu')}"))
    mid = 1000 if 1000 in plan.paced_levels else max(plan.paced_levels)
    name = f"level_{mid}"
    for q in ("p50", "p99"):
        s, f = get(SIGNAL, name, "paced", "hop_ms", q), get(FLOOR, name, "paced", "hop_ms", q)
        limit = 1.0 if q == "p50" else 5.0
        met = s is not None and s <= limit and (q == "p50" or (f is not None and s <= 2 * f))
        rows.append(Row(f"T2 paced hop {q}, {mid} calls", s, f, "ms", f"<= {limit:g} ms" + (", <= 2x floor" if q == "p99" else ""),
                        met, client(name, "paced")))
    small, large = plan.small, plan.large
    s_small, s_large = get(SIGNAL, f"level_{small}", "growth", "hop_ms", "p99"), get(SIGNAL, f"level_{large}", "growth", "hop_ms", "p99")
    f_small, f_large = get(FLOOR, f"level_{small}", "growth", "hop_ms", "p99"), get(FLOOR, f"level_{large}", "growth", "hop_ms", "p99")
    sg = s_large / s_small if s_large and s_small else None
    fg = f_large / f_small if f_large and f_small else None
    rows.append(Row(f"T3 paced p99 growth {large} vs {small} calls", sg, fg, "x", "<= 1.5x", sg is not None and sg <= 1.5,
                    client(f"level_{large}", "growth"), f"p99 {_fmt(s_small)} -> {_fmt(s_large)} ms; "
                    "100 calls paced, rest idle"))
    cs, cl = get(SIGNAL, f"level_{small}", "create_ms", "p50"), get(SIGNAL, f"level_{large}", "create_ms", "p50")
    rows.append(Row(f"T3 create p50 growth {large} vs {small} calls", cl / cs if cs and cl else None, None, "x",
                    "flat", cs is not None and cl is not None and cl / cs <= 1.5, None, f"{cs} -> {cl} ms"))
    for calls in (c for c in (1000, 5000) if c in plan.levels):
        s, f = get(SIGNAL, f"level_{calls}", "rss_per_call_bytes"), get(FLOOR, f"level_{calls}", "rss_per_call_bytes")
        rows.append(Row(f"T4 RSS per connected call, {calls} calls", s, f, "B", "<= 1.5x floor",
                        s is not None and f is not None and s <= 1.5 * f))
    if "scale" in raw[SIGNAL] and "scale" in raw[FLOOR]:
        rows += scale_rows(raw[SIGNAL]["scale"][0], raw[FLOOR]["scale"][0])
    reg = results["sweep"]["bytes_per_registered_call"]
    rows.append(Row("T4 RSS per registered call (no sockets)", reg, None, "B", "<= 3 KB", reg <= 3072))
    s, f = get(SIGNAL, "post", "req_per_s"), get(FLOOR, "post", "req_per_s")
    rows.append(Row("T7 POST req/s, concurrency 50", s, f, "req/s", ">= 0.5x", s is not None and f is not None and s >= 0.5 * f,
                    client("post")))
    s, f = get(SIGNAL, "post_auth_jwt", "req_per_s"), get(SIGNAL, "post_auth_none", "req_per_s")
    cost = f"; ~{1e6 * (1 / s - 1 / f):.0f} us more server time per create" if s and f else ""
    rows.append(Row("T7 POST req/s, auth=jwt (HS256) vs auth=none", s, f, "req/s", "(measured)", None,
                    client("post_auth_jwt"), "floor column: signal_srv with auth=none" + cost))
    s, f = get(SIGNAL, "storm", "seconds"), get(FLOOR, "storm", "seconds")
    errs = (get(SIGNAL, "storm", "errors") or 0) + 0
    rows.append(Row(f"T8 {plan.storm_calls} calls connecting at once", s, f, "s", "0 errors, <= 2x",
                    errs == 0 and s is not None and f is not None and s <= 2 * f, client("storm"), f"errors {errs:g}"))
    sweep = results["sweep"]
    rows.append(Row(f"T9 loop lag during sweep, {sweep['calls']} idle calls", sweep["max_loop_lag_ms"], None, "ms",
                    "<= 50 ms", sweep["max_loop_lag_ms"] <= 50, None, f"sweep {sweep['sweep_ms']} ms"))
    st = results["stress"]
    faults = sum(st[k] for k in ("lost", "duplicated", "misrouted", "reordered", "unexpected_errors", "unexpected_closes"))
    rows.append(Row(f"T10 stress {plan.stress.calls} calls x {plan.stress.candidates} cand.", faults, None, "faults",
                    "0", st["ok"], st["client_cpu"], f"{st['delivered']} delivered, {st['messages_per_s']} msg/s"))
    if "hostile" in results:
        from signal_srv.hostile import hostile_row

        rows.append(hostile_row(results["hostile"]))
    return rows


def scale_rows(s: dict[str, Any], f: dict[str, Any]) -> list[Row]:
    """T5 and T6 rows, saying plainly when the open-file limit, not RSS or latency, set the figure."""
    def why(run: dict[str, Any]) -> str:
        held, cap, by = run["held"], run["fd_cap_calls"], run["stopped_by"]
        if by == "fd_limit":
            return f"capped by the open-file limit at {cap} calls (not by RSS or p99)"
        if by == "none":
            return "every step passed"
        failed = run["levels"][-1] if run["levels"] else {}
        p99 = failed.get("paced", {}).get("hop_ms", {}).get("p99")
        detail = (f"{by} at {failed.get('calls')} calls (errors {failed.get('errors')}, p99 {_fmt(p99)} ms, "
                  f"RSS {mib(failed.get('rss_bytes'))}{', ' + failed['failure'] if 'failure' in failed else ''})")
        return f"stopped by {detail}" if held else f"failed at the first step: {detail}"

    def mib(v: Any) -> str:
        return "-" if v is None else f"{v / 1024 ** 2:,.0f} MiB"

    def client_max(*runs: dict[str, Any]) -> float | None:
        values = [lv["paced"].get("client_cpu") for run in runs for lv in run["levels"] if "paced" in lv]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    capped = s["stopped_by"] == "fd_limit"
    met = None if capped else (s["held"] >= T5_TARGET)
    note = (f"signal_srv: {why(s)}, RSS {mib(s['rss_at_held_bytes'])}, p99 {_fmt(s['p99_at_held_ms'])} ms, "
            f"~{_fmt(s['extrapolated_calls_in_2gib'])} in 2 GiB (RSS extrapolation); "
            f"floor: {why(f)}, RSS {mib(f['rss_at_held_bytes'])}, ~{_fmt(f['extrapolated_calls_in_2gib'])} in 2 GiB")
    if capped:
        note += f"; the {T5_TARGET:,} target is not measurable here"
    rows = [Row("T5 scale: calls held, <= 2 GiB, p99 <= 50 ms", s["held"], f["held"], "calls",
                f"{T5_TARGET:,}, 0 err, p99<=50ms", met, client_max(s, f), note)]
    sh, fh = s["heartbeat"], f["heartbeat"]
    if "calls" in sh:
        usage = f"server {sh['server_cpu_pct']:.2f} % over {sh['seconds']:.0f} s, {sh['pct_per_1000_calls']:.3f} %/1000 calls"
        floor_note = (f"; floor (Tornado pings, 20 s) {fh['server_cpu_pct']:.2f} % at {fh['calls']}" if "calls" in fh else "")
        rows.append(Row(f"T6 idle CPU, {sh['calls']} calls, heartbeats 20 s", sh["server_cpu_pct"],
                        fh.get("server_cpu_pct"), "% core", "(measured)", None,
                        max(sh["client_cpu"], fh.get("client_cpu", 0.0)), usage + floor_note))
        ext, fext = sh["extrapolated_pct_at_20000"], fh.get("extrapolated_pct_at_20000")
        rows.append(Row(f"T6 heartbeat CPU at {T6_CALLS:,} calls (EXTRAPOLATED)", ext, fext, "% core",
                        f"<= {T6_TARGET_PCT:g} % of a core", ext is not None and ext <= T6_TARGET_PCT, None,
                        f"linear extrapolation from {sh['calls']} calls (open-file limit), idle baseline included"))
    else:
        rows.append(Row("T6 heartbeat CPU", None, None, "% core", f"<= {T6_TARGET_PCT:g} %", None, None,
                        str(sh.get("failure", ""))))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def format_rows(rows: Iterable[Row]) -> str:
    lines = [f"{'figure':<44} {'signal_srv':>11} {'floor':>10} {'ratio':>6} {'unit':<6} {'target':<22} {'met':<4} "
             f"{'client':>6}  note"]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        cpu = "-" if r.client_cpu is None else f"{r.client_cpu:.0%}" + ("!" if r.client_cpu >= CLIENT_BOUND else "")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"{r.figure:<44} {_fmt(r.signal):>11} {_fmt(r.floor):>10} {ratio:>6} {r.unit:<6} {r.target:<22} "
                     f"{met:<4} {cpu:>6}  {r.note}")
    lines.append("client: CPU of the load client's core during the figure (max over both servers); "
                 "'!' = client-bound (>= 90 %), the figure understates the server")
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model or 'unknown CPU'}), Python {sys.version.split()[0]}, {sys.platform}"


def load_average() -> str:
    """The machine's 1/5/15-minute load averages: how much else was running during the figures."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "-"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m signal_srv.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a one-minute version (fewer levels, shorter windows)")
    p.add_argument("--json", action="store_true", help="print every raw figure and the summary as JSON")
    p.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--server-dir", help="run signal_srv from this source tree (e.g. a git archive snapshot)")
    p.add_argument("--auth", choices=("none", "jwt"), default="none",
                   help="run every signal_srv server with auth=jwt, the load minting its tokens (the create-rate "
                        "comparison of auth=jwt and auth=none runs either way)")
    p.add_argument("--cluster", action="store_true",
                   help="cluster figures instead: (a)-(d) as ratios to the single-process server (needs redis-server)")
    p.add_argument("--baseline-dir", help="with --cluster: the source tree of 'today' for figure (a)")
    p.add_argument("--hostile", action="store_true",
                   help="only the 'one hostile IP' figure (about 25 s): a victim's relay p99 alone and under attack")
    p.add_argument("--relay", action="store_true",
                   help="only the relay figures R1-R4 (offer/answer/candidate exchanges; about 5 min per loop, "
                        "75 s with --quick)")
    p.add_argument("--event-loop", choices=("asyncio", "uvloop", "both"), default="asyncio",
                   help="with --relay: the loop both servers run on ('both': each server on each loop)")
    p.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sweep-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=100000, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.floor_server:
        floor_server(args.port, event_loop=args.event_loop)
        return
    if args.sweep_probe:
        sweep_probe(args.calls)
        return
    if args.cluster:
        from signal_srv.bench_cluster import run_cluster_bench

        run_cluster_bench(args.baseline_dir, args.json)
        return
    from signal_srv.spawn import raise_nofile

    plan = make_plan(args.quick, args.server_dir, args.auth)
    raise_nofile(4 * max(plan.levels) + 4096)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {CLIENT_CPU})
    started, load_before = time.perf_counter(), load_average()
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"signal_srv bench ({'quick' if args.quick else 'full'}) on {machine()}")
    if args.hostile:
        from signal_srv.hostile import hostile_figure, hostile_row

        results = {"hostile": asyncio.run(hostile_figure(plan.server_dir, plan.hostile_seconds))}
        rows = [hostile_row(results["hostile"])]
    elif args.relay:
        from signal_srv.bench_relay import make_relay_plan, relay_rows, run_relay

        loops = ("asyncio", "uvloop") if args.event_loop == "both" else (args.event_loop,)
        relay_plan = make_relay_plan(args.quick, loops, args.server_dir)
        plan.rounds = relay_plan.rounds
        results = {"relay": asyncio.run(run_relay(relay_plan, say))}
        rows = relay_rows(relay_plan, results["relay"])
    else:
        results = asyncio.run(run_plan(plan, say))
        rows = summarise(plan, results)
    elapsed = round(time.perf_counter() - started)
    loads = f"load average {load_before} at the start, {load_average()} at the end"
    report = json.dumps({"machine": machine(), "mode": "quick" if args.quick else "full", "seconds": elapsed,
                         "load_average": loads,
                         "summary": [{**vars(r), "ratio": r.ratio} for r in rows], **results}, indent=1)
    if args.save:
        with open(args.save, "w") as f:
            f.write(report + "\n")
    if args.json:
        print(report)
    else:
        print(f"signal_srv vs bare-Tornado floor, {'quick' if args.quick else 'full'} run, {elapsed} s, {machine()}")
        print(f"server pinned to CPU {SERVER_CPU}, client to CPU {CLIENT_CPU}; medians of {plan.rounds} A/B round(s); "
              f"signal_srv auth={plan.auth}; {loads}")
        print(format_rows(rows))


if __name__ == "__main__":
    main()
