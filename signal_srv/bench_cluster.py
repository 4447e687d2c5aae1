"""Cluster figures for ``python -m signal_srv.bench --cluster``, as ratios to the single-process server.

Every server process (nodes and Redis) is pinned to one core and the load client to the
other, so each mode gets the same budget: one core. The figures, on 200 connected pairs:

- (a) single-process mode against "today" (``--baseline-dir``, e.g. a snapshot of main):
  closed-loop relay msgs/s (T1) and paced hop p99 (T2);
- (b) a cluster node (``redis_url``) with both sockets of each call on it;
- (c) two nodes, each call's sockets on different nodes (every frame bridged);
- (d) server-side CPU per relayed frame in each mode (nodes and Redis together), and
  from it a projection of msgs/s per machine at 8 and 16 cores.

Every cluster figure includes the write-ahead log (each accepted event is in Redis before
its frames go out). Then, on ``DURABLE_CALLS`` calls with both sockets connected (as
reconnecting ``Session``s) and an offer and an answer exchanged:

- (e) Redis memory per connected call;
- (f) a graceful restart (SIGTERM) of the node that holds them all: time until every
  client has reconnected (to the other node, which takes the calls over);
- (g) ``kill -9`` of the node that holds them all: time until a fresh node has taken every
  one of them over (``node_lease`` included; nobody reconnects, so these are the
  takeovers a survivor starts by itself).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Sequence

from signal_srv.bench import (
    CLIENT_CPU,
    SERVER_CPU,
    SIGNAL,
    WS_KEY,
    Load,
    Target,
    Ws,
    closed_loop,
    cpu_seconds,
    machine,
    own_cpu_seconds,
    paced,
)

__all__ = ["run_cluster_bench"]

CALLS = 200
SECONDS = 3.0  # each measured window; the whole run stays under a minute
DURABLE_CALLS = 1000
LEASE = 2.0  # node_lease of the nodes of figures (e)-(g)


def _redis(folder: str) -> tuple[subprocess.Popen[bytes], str]:
    from signal_srv.spawn import free_port

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--save", "",
         "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    os.sched_setaffinity(process.pid, {SERVER_CPU})
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)  # polling a child's port: there is no event to wait on
    return process, f"redis://127.0.0.1:{port}/0"


async def _mode(ports_of: Sequence[Any], pids: Sequence[int]) -> dict[str, Any]:
    """Closed loop and paced figures on ``CALLS`` pairs; the first server creates, sockets a/b on ports_of[0]/[-1]."""
    first, last = ports_of[0], ports_of[-1]
    load = Load(first, b_port=last.port)
    try:
        paths = await load.create(CALLS)
        errors = await load.connect(paths, 200, timeout=60)
        cpu = sum(cpu_seconds(pid) for pid in pids)
        closed = await closed_loop(load, SECONDS)
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu
        relayed = closed["msgs_per_s"] * closed["seconds"]
        hops = await paced(load, SECONDS)
    finally:
        load.close()
    return {"connect_errors": errors, "msgs_per_s": closed["msgs_per_s"], "client_cpu": closed["client_cpu"],
            "hop_p99_ms": hops["hop_ms"]["p99"], "hop_p50_ms": hops["hop_ms"]["p50"],
            "cpu_us_per_frame": round(1e6 * cpu / max(relayed, 1), 1)}


def _redis_memory(url: str) -> int:
    port = url.rsplit(":", 1)[1].split("/")[0]
    info = subprocess.run(["redis-cli", "-p", port, "info", "memory"], capture_output=True, text=True).stdout
    return int(re.search(r"^used_memory:(\d+)", info, re.M).group(1))  # type: ignore[union-attr]


def _owned(base_url: str) -> int:
    text = urllib.request.urlopen(base_url + "/metrics", timeout=5).read().decode()
    return int(float(re.search(r"^signal_srv_calls_owned (\S+)", text, re.M).group(1)))  # type: ignore[union-attr]


async def _until(condition: Any, timeout: float = 120.0) -> float:
    """Seconds until ``condition()`` holds (checked every 10 ms: these are processes of their own)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("the cluster did not get there in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


class _Conn(Ws):
    """The bench's light socket, telling its participant when it is lost."""

    def __init__(self, participant: _Participant) -> None:
        super().__init__(participant.text)
        self.participant = participant
        self.ready.set_result(None)  # (the bench's pairs wait on it; a participant waits on its own state)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.participant.lost(self)


class _Participant:
    """One participant on light sockets: when its node closes its socket, it reconnects to the next node
    at once, after a random pause of up to 0.5 s, with ``last_seq`` (as ``Session`` and demo.js do)."""

    def __init__(self, path: str, ports: list[int]) -> None:
        self.path, self.ports = path, ports
        self.peer_id = path.split("peer_id=")[1].split("&")[0]
        self.last_seq = -1
        self.conn: _Conn | None = None
        self.joined = asyncio.get_running_loop().create_future()
        self.rejoined: asyncio.Future[None] | None = None  # set when the first socket is lost
        self._rejoining = False

    def text(self, ws: Ws, data: bytes) -> None:
        frame = json.loads(data)
        self.last_seq = frame.get("seq", self.last_seq)
        if frame.get("type") == "state" and frame.get("subject") == self.peer_id and frame.get("event") == "connected":
            done = self.rejoined if self.joined.done() else self.joined
            if done is not None and not done.done():
                done.set_result(None)

    def lost(self, conn: _Conn) -> None:
        if conn is not self.conn or not self.joined.done():
            return
        if self.rejoined is None:
            self.rejoined = asyncio.get_running_loop().create_future()
        if not self.rejoined.done() and not self._rejoining:
            asyncio.ensure_future(self._rejoin())

    async def open(self, port: int) -> None:
        path = self.path if self.last_seq < 0 else f"{self.path}&last_seq={self.last_seq}"
        self.conn = conn = _Conn(self)
        await asyncio.get_running_loop().create_connection(lambda: conn, "127.0.0.1", port)
        assert conn.transport is not None
        conn.transport.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
                              "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        await conn.handshake

    async def _rejoin(self) -> None:
        assert self.rejoined is not None
        self._rejoining = True
        try:
            await asyncio.sleep(random.uniform(0, 0.5))
            for attempt in range(50):
                try:
                    await self.open(self.ports[(attempt + 1) % len(self.ports)])
                    return  # (if this socket is lost before its state, ``lost`` starts over)
                except (OSError, ConnectionError):
                    await asyncio.sleep(random.uniform(0, 0.1 * 2 ** min(attempt, 4)))
            if not self.rejoined.done():
                self.rejoined.set_exception(ConnectionError(f"{self.peer_id} could not reconnect"))
        finally:
            self._rejoining = False


async def _durable_calls(a: Target, b: Target, count: int) -> list[_Participant]:
    """``count`` calls on ``a``, both sockets there, ~1.5 KB sent by each side (an offer, an answer)."""
    paths = await Load(a).create(count)
    slots = asyncio.Semaphore(200)

    async def one(path: str, sdp: bytes) -> _Participant:
        async with slots:
            participant = _Participant(path, [a.port, b.port])
            await participant.open(a.port)
            await asyncio.wait_for(participant.joined, 30)
        assert participant.conn is not None
        participant.conn.send(b'{"type":"message","payload":{"sdp":"' + sdp + b'"}}')
        return participant

    return list(await asyncio.gather(*(one(path, bytes([c]) * 1500) for pair in paths
                                       for path, c in zip(pair, b"oa"))))


async def _durability(url: str, server: Any, say: Any) -> dict[str, Any]:
    """Figures (e), (f) and (g); see the module docstring."""
    cluster = [f"--redis_url={url}", f"--node_lease={LEASE}"]
    a, b = server([*cluster, "--node_id=dur-a"]), server([*cluster, "--node_id=dur-b"])
    before = _redis_memory(url)
    say(f"(e) {DURABLE_CALLS} connected calls")
    participants = await _durable_calls(a, b, DURABLE_CALLS)
    per_call = (_redis_memory(url) - before) / DURABLE_CALLS
    say("(f) graceful restart of their node")
    client_cpu, server_cpu = own_cpu_seconds(), cpu_seconds(b.server.process.pid)
    a.server.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    await _until(lambda: all(p.rejoined is not None and p.rejoined.done() for p in participants))
    restart = time.monotonic() - started
    failed = sum(p.rejoined is not None and p.rejoined.exception() is not None for p in participants)
    client_cpu = (own_cpu_seconds() - client_cpu) / restart
    server_cpu = (cpu_seconds(b.server.process.pid) - server_cpu) / restart
    say("(g) kill -9 of their node")
    c = server([*cluster, "--node_id=dur-c"])
    b.server.process.kill()
    takeover = await _until(lambda: _owned(c.server.base_url) >= DURABLE_CALLS)
    return {"redis_bytes_per_call": round(per_call), "restart_reconnect_s": round(restart, 2),
            "restart_client_cpu": round(client_cpu, 2), "restart_server_cpu": round(server_cpu, 2),
            "restart_failed": failed,
            "takeover_s": round(takeover, 2), "lease_s": LEASE, "calls": DURABLE_CALLS}


async def _measure(baseline_dir: str | None, say: Any) -> dict[str, Any]:
    from signal_srv.spawn import spawn_server, wait_ready

    results: dict[str, Any] = {}
    spawned: list[Any] = []

    def server(extra: Sequence[str] = (), server_dir: str | None = None) -> Target:
        s = spawn_server(CALLS, cpu=SERVER_CPU, extra=extra, server_dir=server_dir)
        spawned.append(s)
        if any(arg.startswith("--redis_url") for arg in extra):
            wait_ready(s.base_url)
        return Target(SIGNAL, s, int(s.base_url.rsplit(":", 1)[1]))

    folder = tempfile.mkdtemp(prefix="signal-srv-bench-")
    redis, url = _redis(folder)
    try:
        if baseline_dir:
            say("(a) today's server")
            t = server(server_dir=baseline_dir)
            results["today"] = await _mode([t], [t.server.process.pid])
            t.server.stop()
        say("single process")
        t = server()
        results["single"] = await _mode([t], [t.server.process.pid])
        t.server.stop()
        say("(b) cluster node, both sockets on the owner")
        t = server([f"--redis_url={url}", "--node_id=bench-b"])
        results["owner"] = await _mode([t], [t.server.process.pid, redis.pid])
        t.server.stop()
        say("(c) two nodes, sockets on different nodes")
        a = server([f"--redis_url={url}", "--node_id=bench-c1"])
        b = server([f"--redis_url={url}", "--node_id=bench-c2"])
        results["bridged"] = await _mode([a, b], [a.server.process.pid, b.server.process.pid, redis.pid])
        a.server.stop()
        b.server.stop()
        results["durable"] = await _durability(url, server, say)
    finally:
        for s in spawned:
            s.stop()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return results


def _rows(r: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    single = r["single"]
    rows: list[tuple[str, Any, str, str]] = [
        ("single-process paced hop p99 ms (reference)", single["hop_p99_ms"], "", f"p50 {single['hop_p50_ms']} ms")]

    def ratio(mode: str, key: str) -> float:
        return round(r[mode][key] / max(single[key], 1e-9), 2)

    if "today" in r:
        rows += [("(a) single-process msgs/s vs today", round(single["msgs_per_s"] / r["today"]["msgs_per_s"], 2),
                  ">= 0.95x", f"{single['msgs_per_s']} vs {r['today']['msgs_per_s']}"),
                 ("(a) single-process hop p99 vs today", round(single["hop_p99_ms"] / r["today"]["hop_p99_ms"], 2),
                  "<= 1.05x", f"{single['hop_p99_ms']} vs {r['today']['hop_p99_ms']} ms")]
    for mode, label, floor in (("owner", "(b) owner-local, write-ahead", 0.5), ("bridged", "(c) cross-node, write-ahead",
                                                                                    0.3)):
        rows += [(f"{label} relay msgs/s", ratio(mode, "msgs_per_s"), f">= {floor}x",
                  f"{r[mode]['msgs_per_s']} vs {single['msgs_per_s']}"),
                 (f"{label} paced hop p99 ms", r[mode]["hop_p99_ms"], "<= 5 ms", f"p50 {r[mode]['hop_p50_ms']} ms")]
    for mode in ("single", "owner", "bridged"):
        per_frame = r[mode]["cpu_us_per_frame"]
        projection = ", ".join(f"{cores} cores ~{round(cores * 1e6 / per_frame):,} msg/s" for cores in (8, 16))
        rows.append((f"(d) CPU per relayed frame, {mode}", per_frame, "us", projection))
    durable = r["durable"]
    calls = durable["calls"]
    rows += [
        ("(e) Redis memory per connected call", durable["redis_bytes_per_call"], "B",
         "both sockets, offer and answer (~1.5 KB each)"),
        (f"(f) graceful restart, {calls} calls: all reconnected", durable["restart_reconnect_s"], "s",
         f"{2 * calls} clients, 0-0.5 s jitter each, {durable['restart_failed']} failed; CPU: client"
         f" {durable['restart_client_cpu']:.0%}, new owner node {durable['restart_server_cpu']:.0%}"),
        (f"(g) kill -9, {calls} calls: all taken over", durable["takeover_s"], "s",
         f"node_lease {durable['lease_s']:g} s included"),
    ]
    return rows


def run_cluster_bench(baseline_dir: str | None, as_json: bool) -> None:
    """Measure, then print a table (or JSON) of the cluster figures."""
    from signal_srv.spawn import raise_nofile

    if shutil.which("redis-server") is None:
        raise SystemExit("the cluster figures need redis-server (apt-get install redis-server)")
    raise_nofile(8 * CALLS + 4096)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {CLIENT_CPU})
    results = asyncio.run(_measure(baseline_dir, lambda text: print(text, flush=True, file=sys.stderr)))
    rows = _rows(results)
    if as_json:
        print(json.dumps({"machine": machine(), **results, "rows": rows}, indent=1))
        return
    print(f"signal_srv cluster figures, {CALLS} pairs, {SECONDS:g} s windows, {machine()}")
    print(f"servers (nodes and Redis) pinned to CPU {SERVER_CPU}, client to CPU {CLIENT_CPU}")
    for name, value, target, note in rows:
        print(f"{name:45} {value!s:>10}  {target:10} {note}")
