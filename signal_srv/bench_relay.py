"""Relay figures for ``python -m signal_srv.bench --relay``: the cost of a relayed frame against the floor.

The load is what a WebRTC call sends through a signaling server: each pair runs an
exchange of an SDP offer and answer (about 2 KB each) and six ICE candidates (about
250 B each), one message in flight per pair, each message sent by the side that
received the previous one. Against signal_srv and the bare-Tornado floor, each on a
fresh process pinned to one core and run on the same event loop:

- R1 closed loop: exchanges back to back at 100, 500, 1 000 and 2 000 connected pairs
  (one server, grown from level to level); relayed msgs/s;
- R2 paced: 1 000 pairs, each starting an exchange after a think time of 1-3 s (2 s on
  average, about 4 000 msgs/s offered); hop latency p50/p99 and the server's CPU;
- R3 RSS per connected pair (call and sockets), on the paced server before its load starts;
- R4 2 000 pairs connecting at once: the time until every pair is ready, and errors.

With ``--event-loop both`` every server runs once on asyncio and once on uvloop in each
round, so that the loops are compared in the same run too.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from signal_srv.bench import (
    FLOOR,
    SIGNAL,
    Load,
    Pair,
    Row,
    Window,
    Ws,
    connect_storm,
    rss_bytes,
    start,
)

__all__ = ["RelayPlan", "SCRIPT", "make_relay_plan", "relay_rows", "run_relay"]


def _frame(kind: str, payload: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "payload": payload}, separators=(",", ":")).encode()


def _sdp(kind: str, size: int = 1950) -> str:
    """An SDP of about ``size`` characters, with the line shapes (and CRLFs) a browser writes."""
    lines = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
             "a=extmap-allow-mixed", "a=msid-semantic: WMS stream", "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8",
             "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:abcd", "a=ice-pwd:0123456789abcdefghijklmn",
             "a=ice-options:trickle", "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
             f"a=setup:{'actpass' if kind == 'offer' else 'active'}", "a=mid:0", "a=sendrecv",
             "a=rtpmap:111 opus/48000/2", "a=fmtp:111 minptime=10;useinbandfec=1"]
    i = 0
    while sum(len(line) + 2 for line in lines) < size:
        lines.append(f"a=rtcp-fb:{96 + i % 30} nack pli ccm fir goog-remb transport-cc {i}")
        i += 1
    return "\r\n".join(lines) + "\r\n"


def _candidate(i: int) -> bytes:
    return _frame("candidate", {
        "candidate": f"candidate:{842163049 + i} 1 udp 2122260223 192.168.{i}.23 {50000 + i} typ host "
                     f"generation 0 ufrag abcd network-id {i + 1} network-cost 10",
        "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "abcd"})


OFFER = _frame("offer", {"type": "offer", "sdp": _sdp("offer")})
ANSWER = _frame("answer", {"type": "answer", "sdp": _sdp("answer")})
# One exchange: message i is sent by the side that received message i - 1 (a first), so a
# sends the even ones and b the odd ones; each message is different, so that only a relay
# of what the other side sent counts (see bench.Load).
SCRIPT: tuple[bytes, ...] = (OFFER, ANSWER, *(_candidate(i) for i in range(6)))


class Exchanges:
    """Drives every pair of a ``Load`` through ``SCRIPT``, one message in flight per pair.

    ``think``: None for a closed loop (the next exchange starts when the last one ends),
    else the range of seconds a pair waits between exchanges.
    """

    def __init__(self, load: Load, think: tuple[float, float] | None) -> None:
        self.load = load
        self.think = think
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random(1)
        self.running = True
        self.measuring = False
        self.received = 0
        self.hops: list[float] = []
        self.steps: dict[int, int] = {}
        load.relay(self.on_relay, SCRIPT[0::2], SCRIPT[1::2])

    def begin(self, pairs: Sequence[Pair]) -> None:
        for p in pairs:
            if self.think is None:
                self.fire(p)
            else:
                self.loop.call_later(self.rng.uniform(0, self.think[1]), self.fire, p)

    def fire(self, p: Pair) -> None:
        if self.running:
            self.steps[id(p)] = 0
            self._send(p, p.a, 0)

    def _send(self, p: Pair, ws: Ws, step: int) -> None:
        p.sent_at = time.perf_counter()
        ws.send(SCRIPT[step])

    def on_relay(self, ws: Ws, data: bytes) -> None:
        p: Pair = ws.pair
        self.received += 1
        if self.measuring:
            self.hops.append(1000.0 * (time.perf_counter() - p.sent_at))
        step = self.steps.get(id(p), 0) + 1
        if step < len(SCRIPT):
            self.steps[id(p)] = step
            self._send(p, ws, step)
        elif self.think is None:
            self.fire(p)
        elif self.running:
            self.loop.call_later(self.rng.uniform(*self.think), self.fire, p)

    async def measure(self, warm_up: float, seconds: float, pid: int) -> dict[str, Any]:
        """Let the load run ``warm_up`` s, then measure ``seconds`` s; stop it and let it drain."""
        from signal_srv.stress import percentiles

        await asyncio.sleep(warm_up)  # a stretch of time at full load, not a wait for an event
        self.measuring, received, stray = True, self.received, self.load.stray
        window = Window(pid)
        await asyncio.sleep(seconds)  # the measured stretch
        usage = window.close()
        self.measuring = self.running = False
        # A stray frame (an error, say) stalls its pair: a refused frame fails the figure, it does not slow it.
        figures = {"msgs_per_s": round((self.received - received) / usage["seconds"]),
                   "stray_frames": self.load.stray - stray, "hop_ms": percentiles(self.hops), **usage}
        await asyncio.sleep(0.5)  # in-flight exchanges drain before the next phase
        self.load.idle()
        return figures


@dataclass
class RelayPlan:
    rounds: int
    closed_levels: tuple[int, ...]
    closed_seconds: float
    paced_pairs: int
    paced_seconds: float
    storm_pairs: int
    loops: tuple[str, ...]
    server_dir: str | None = None
    think: tuple[float, float] = (1.0, 3.0)


def make_relay_plan(quick: bool, loops: Sequence[str], server_dir: str | None) -> RelayPlan:
    if quick:
        return RelayPlan(rounds=1, closed_levels=(100, 500, 1000, 2000), closed_seconds=2.0, paced_pairs=1000,
                         paced_seconds=4.0, storm_pairs=2000, loops=tuple(loops), server_dir=server_dir)
    return RelayPlan(rounds=3, closed_levels=(100, 500, 1000, 2000), closed_seconds=4.0, paced_pairs=1000,
                     paced_seconds=8.0, storm_pairs=2000, loops=tuple(loops), server_dir=server_dir)


async def closed_levels(kind: str, loop: str, plan: RelayPlan) -> dict[str, Any]:
    """R1 on one fresh server, grown from level to level."""
    target = start(kind, max(plan.closed_levels), plan.server_dir, event_loop=loop)
    load = Load(target)
    figures: dict[str, Any] = {}
    try:
        for pairs in plan.closed_levels:
            errors = await load.connect(await load.create(pairs - len(load.pairs)), 500, timeout=120)
            exchanges = Exchanges(load, None)
            exchanges.begin(load.pairs)
            measured = await exchanges.measure(1.0, plan.closed_seconds, target.server.process.pid)
            figures[f"closed_{pairs}"] = {**measured, "connect_errors": errors}
    finally:
        target.server.stop()  # the server closes first: no TIME_WAIT piles up on the client side
        load.close()
    return figures


async def paced_level(kind: str, loop: str, plan: RelayPlan) -> dict[str, Any]:
    """R3 (RSS per connected pair) then R2 (the paced load) on one fresh server."""
    target = start(kind, plan.paced_pairs, plan.server_dir, event_loop=loop)
    pid = target.server.process.pid
    load = Load(target)
    try:
        base = rss_bytes(pid)  # before the creates: a call's own memory counts too
        errors = await load.connect(await load.create(plan.paced_pairs), 500, timeout=120)
        rss_per_pair = round((rss_bytes(pid) - base) / max(len(load.pairs), 1))
        exchanges = Exchanges(load, plan.think)
        exchanges.begin(load.pairs)
        paced = await exchanges.measure(plan.think[1], plan.paced_seconds, pid)
    finally:
        target.server.stop()
        load.close()
    return {"paced": paced, "rss_per_pair_bytes": rss_per_pair, "connect_errors": errors}


async def run_relay(plan: RelayPlan, say: Callable[[str], None]) -> dict[str, Any]:
    """Every relay figure for every (server, loop) variant; the order alternates per round."""
    variants = [(kind, loop) for loop in plan.loops for kind in (FLOOR, SIGNAL)]
    raw: dict[str, list[dict[str, Any]]] = {_key(k, lp): [] for k, lp in variants}
    for r in range(plan.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        runs: dict[str, dict[str, Any]] = {_key(k, lp): {} for k, lp in variants}
        for kind, loop in order:
            say(f"  round {r + 1}: relay closed loop {'/'.join(map(str, plan.closed_levels))} pairs on {kind} ({loop})")
            runs[_key(kind, loop)].update(await closed_levels(kind, loop, plan))
        for kind, loop in order:
            say(f"  round {r + 1}: relay paced {plan.paced_pairs} pairs on {kind} ({loop})")
            runs[_key(kind, loop)].update(await paced_level(kind, loop, plan))
        for kind, loop in order:
            say(f"  round {r + 1}: {plan.storm_pairs} pairs connecting at once on {kind} ({loop})")
            runs[_key(kind, loop)]["storm"] = await connect_storm(kind, plan.storm_pairs, plan.server_dir,
                                                                  event_loop=loop)
        for key, figures in runs.items():
            raw[key].append(figures)
    return raw


def _key(kind: str, loop: str) -> str:
    return f"{kind}/{loop}"


def _median(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else None


def relay_rows(plan: RelayPlan, raw: dict[str, list[dict[str, Any]]]) -> list[Row]:
    """The R rows for each loop: signal_srv against the floor on the same loop."""
    rows: list[Row] = []
    for loop in plan.loops:
        s_runs, f_runs = raw[_key(SIGNAL, loop)], raw[_key(FLOOR, loop)]
        tag = "" if plan.loops == ("asyncio",) else f" [{loop}]"

        def both(*path: str) -> tuple[float | None, float | None]:
            return _median(s_runs, *path), _median(f_runs, *path)

        def client(*path: str) -> float | None:
            values = [v for v in (_median(s_runs, *path, "client_cpu"), _median(f_runs, *path, "client_cpu"))
                      if v is not None]
            return max(values) if values else None

        for pairs in plan.closed_levels:
            name = f"closed_{pairs}"
            s, f = both(name, "msgs_per_s")
            errors = (_median(s_runs, name, "stray_frames") or 0) + (_median(s_runs, name, "connect_errors") or 0)
            rows.append(Row(f"R1 relay msgs/s, closed, {pairs} pairs{tag}", s, f, "msg/s", ">= 0.9x floor",
                            bool(s and f and s >= 0.9 * f and not errors), client(name),
                            f"server CPU {_pair(*both(name, 'server_cpu'))}; CPU us/msg "
                            f"{_pair(_per_msg(s_runs, name), _per_msg(f_runs, name))}"
                            + (f"; errors {errors:g}" if errors else "")))
        for q in ("p50", "p99"):
            s, f = both("paced", "hop_ms", q)
            rows.append(Row(f"R2 paced hop {q}, {plan.paced_pairs} pairs{tag}", s, f, "ms",
                            "<= 2x floor" if q == "p99" else "(measured)",
                            bool(s is not None and f and s <= 2 * f) if q == "p99" else None, client("paced")))
        s, f = both("paced", "server_cpu")
        valid = f is not None and f <= 0.8
        rows.append(Row(f"R2 paced server CPU, {plan.paced_pairs} pairs{tag}", s, f, "core",
                        "<= 1.25x floor", bool(valid and s is not None and f and s <= 1.25 * f) if valid else None,
                        client("paced"), f"relayed {_pair(*both('paced', 'msgs_per_s'))} msgs/s"
                        + ("" if valid else "; the floor used > 80 % of a core: no target at this load")))
        s, f = both("rss_per_pair_bytes")
        rows.append(Row(f"R3 RSS per connected pair{tag}", s, f, "B", "<= 1.3x floor",
                        bool(s is not None and f and s <= 1.3 * f)))
        s, f = both("storm", "seconds")
        errors = (_median(s_runs, "storm", "errors") or 0)
        rows.append(Row(f"R4 {plan.storm_pairs} pairs connecting at once{tag}", s, f, "s", "0 errors, <= 1.3x",
                        bool(not errors and s is not None and f and s <= 1.3 * f), client("storm"),
                        f"errors {errors:g}; server CPU-s {_pair(_cpu_seconds(s_runs), _cpu_seconds(f_runs))}"))
    if len(plan.loops) > 1:
        rows += _loop_rows(plan, raw)
    return rows


def _loop_rows(plan: RelayPlan, raw: dict[str, list[dict[str, Any]]]) -> list[Row]:
    """Each server on its second loop against itself on its first: what the loop alone changes."""
    first, second = plan.loops[0], plan.loops[1]
    rows = []
    for kind in (FLOOR, SIGNAL):
        a, b = raw[_key(kind, second)], raw[_key(kind, first)]
        for pairs in plan.closed_levels:
            name = f"closed_{pairs}"
            rows.append(Row(f"{kind} msgs/s, {pairs} pairs, {second}/{first}", _median(a, name, "msgs_per_s"),
                            _median(b, name, "msgs_per_s"), "msg/s", "(measured)", None))
        rows.append(Row(f"{kind} paced hop p99, {second}/{first}", _median(a, "paced", "hop_ms", "p99"),
                        _median(b, "paced", "hop_ms", "p99"), "ms", "(measured)", None))
    return rows


def _per_msg(runs: list[dict[str, Any]], name: str) -> float | None:
    """Median server CPU microseconds per relayed message: what a share of a busy core does not change."""
    values = [1e6 * r[name]["server_cpu"] / r[name]["msgs_per_s"] for r in runs if r.get(name, {}).get("msgs_per_s")]
    return statistics.median(values) if values else None


def _cpu_seconds(runs: list[dict[str, Any]]) -> float | None:
    values = [r["storm"]["server_cpu"] * r["storm"]["seconds"] for r in runs if "storm" in r]
    return statistics.median(values) if values else None


def _pair(s: float | None, f: float | None) -> str:
    """``signal_srv vs floor`` for a note."""
    return " vs ".join("-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in (s, f))
