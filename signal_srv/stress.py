"""``signal-srv-stress``: many concurrent calls at once, with exact-delivery verification.

Each call: create, join, both sockets connect, an offer (~2 KB) and an answer, then K
candidates (~200 B) each way. A fraction of the calls is ended mid-run; once those have
ended, every other call sends one more message each way (proving it was unaffected) and
is ended too. Every relayed payload carries a ``stress`` tag (call id, sender role,
per-sender number, send time), so the receiver can tell a lost, duplicated, misrouted or
reordered message; any of those, and any unexpected error frame or close, makes the run
fail (exit status 1).

With ``cut_fraction`` > 0, in that seeded fraction of the calls one participant's socket is
cut without a close frame in the middle of the candidate burst (like a phone switching
network), while frames to it are on the wire and while the other side sends on; it then
reconnects with ``SignalingClient.resume()`` and must get every missed frame once, in order,
with its original ``seq``. A ``resume_failed`` answer is counted as a failure of its own.

With ``reconnect`` (``--reconnect``, and always with ``--chaos``) every socket numbers its
frames (``cseq``) and is a ``Session``: when the server closes it for a reason that is not
final (a node restarting, dying or frozen) it reconnects by itself, to the next node if
need be, with ``last_seq``, and resends what the server did not accept; every message must
still arrive once, in order, and no call may end unless the tool ended it. ``pace`` spreads
each side's candidates over time, so that a burst is still going when something happens to
the servers; ``run_stress(during=...)`` runs that something once every call is bursting,
and every call waits for it to finish before it ends.

With ``jwt_secret`` (``--auth=jwt``) every create and join carries an access token the
tool mints itself (host ``stress-<n>-host``, guest ``stress-<n>-guest``), and every
``state`` frame must name the other participant with its identity.

The core is importable (``run_stress``) so tests can drive it in-process; ``main()`` adds
the command line, a self-spawned server (``spawn_server``), the live line and the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Sequence

from tornado.httpclient import AsyncHTTPClient

from signal_srv.client import ApiError, Connection, ConnectionClosed, Session, SignalingClient
from signal_srv.spawn import raise_nofile, spawn_server
from signal_srv.tokens import mint

__all__ = [
    "StressOptions",
    "StressResult",
    "main",
    "percentiles",
    "run_stress",
]

RELAY_TYPES = frozenset({"offer", "answer", "candidate", "bye", "message"})
MAX_FAILURES_KEPT = 20

# Options and results -------------------------------------------------------------------


@dataclass(frozen=True)
class StressOptions:
    calls: int = 200
    candidates: int = 10
    end_fraction: float = 0.3
    cut_fraction: float = 0.0  # calls in which one socket is cut mid-burst and resumed
    duration: float = 120.0  # the whole run is cut off after this many seconds
    timeout: float = 10.0  # every single wait
    sdp_size: int = 2000
    candidate_size: int = 200
    http_concurrency: int = 64  # REST requests in flight
    connect_concurrency: int = 200  # WebSocket handshakes in flight
    seed: int | None = None
    jwt_secret: str = field(default="", repr=False)  # a server with auth=jwt: mint tokens with its secret
    reconnect: bool = False  # sockets number their frames and reconnect by themselves (see the docstring)
    pace: float = 0.0  # seconds between two candidates of one side (0: as fast as possible)


@dataclass
class StressResult:
    calls: int = 0
    calls_ok: int = 0
    calls_failed: int = 0
    calls_unfinished: int = 0
    ended_mid_run: int = 0
    cuts: int = 0
    replayed: int = 0  # relayed messages a resumed socket got before its "connected" state
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    misrouted: int = 0
    reordered: int = 0
    seq_gaps: int = 0
    resume_failed: int = 0
    unexpected_errors: int = 0
    unexpected_closes: int = 0
    ended_unasked: int = 0  # call_ended frames for calls the tool did not end
    reconnects: int = 0  # sockets that reconnected by themselves (reconnect mode)
    reconnected_at: list[float] = field(default_factory=list)  # time.monotonic() of each reconnect
    elapsed: float = 0.0
    exchange_time: float = 0.0
    latency_ms: dict[str, list[float]] = field(
        default_factory=lambda: {"create": [], "join": [], "connect": [], "resume": [], "relay_hop": []})
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        bad = (self.calls_failed, self.calls_unfinished, self.lost, self.duplicated, self.misrouted,
               self.reordered, self.seq_gaps, self.resume_failed, self.unexpected_errors, self.unexpected_closes,
               self.ended_unasked)
        return self.calls > 0 and not any(bad)

    def fail(self, text: str) -> None:
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(text)

    def to_dict(self) -> dict[str, Any]:
        counts = {k: v for k, v in vars(self).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {
            "ok": self.ok,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in counts.items()},
            "messages_per_s": round(self.delivered / self.exchange_time, 1) if self.exchange_time else 0.0,
            "calls_per_s": round(self.calls_ok / self.elapsed, 1) if self.elapsed else 0.0,
            "latency_ms": {k: percentiles(v) for k, v in self.latency_ms.items()},
            "failures": list(self.failures),
        }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max (nearest rank), rounded to 0.01; zeros for an empty list."""
    if not values:
        return {"n": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    last = len(ordered) - 1

    def rank(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))], 2)

    return {"n": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": round(ordered[-1], 2)}


# One participant's socket ----------------------------------------------------------------


class Side:
    """A participant's socket and everything it has received, checked as it arrives."""

    def __init__(self, run: _Run, call_id: str, role: str, peer_id: str, token: str,
                 client: SignalingClient | None = None) -> None:
        self.run, self.call_id, self.role, self.peer_id, self.token = run, call_id, role, peer_id, token
        self.client = client or run.client  # the node this side's socket connects to
        self.conn: Connection | Session | None = None
        self.other_peer_id = ""
        self.other_identity: str | None = None
        self.sent = 0  # relayed messages this side sent
        self.seen: set[int] = set()  # numbers received from the other side
        self.max_seen = -1
        self.last_seq: int | None = None  # the highest server seq recorded
        self.seq_holes: set[int] = set()  # seqs skipped by a jump, not (yet) arrived
        self.resume_from: int | None = None  # last_seq of the latest resume
        self.resume_failed = False
        self.replaying = False  # on a resumed socket, until the state that announces it
        self.both_connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.ended_reason: str | None = None
        self.expect_close = False
        self._wanted = 0
        self._arrived = asyncio.Event()
        self._pong = asyncio.Event()
        self._reading = asyncio.Event()  # cleared: the reader stops taking frames off the socket
        self._reading.set()
        self.cut_conn: Connection | None = None  # the socket that was cut; its end is no close
        self.reader: asyncio.Task[None] | None = None

    def send(self, kind: str, body: dict[str, Any]) -> None:
        assert self.conn is not None
        body["stress"] = {"call": self.call_id, "from": self.role, "n": self.sent, "t": time.perf_counter()}
        self.sent += 1
        self.run.result.sent += 1
        self.conn.send(kind, body)

    async def wait_received(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` distinct messages from the other side have arrived.

        False at the timeout, or at once after a failed resume (what it skipped never comes).
        """
        self._wanted = count
        self._arrived.clear()
        if len(self.seen) >= count:
            return True
        if self.resume_failed:
            return False
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return len(self.seen) >= count

    async def barrier(self, timeout: float) -> None:
        """Send a ping and wait for its pong: the server has handled every frame this side sent."""
        assert self.conn is not None
        self._pong.clear()
        self.conn.send("ping")
        await asyncio.wait_for(self._pong.wait(), timeout)

    def pause(self) -> None:
        """Stop taking frames off the socket (the one already awaited still comes)."""
        self._reading.clear()

    def unpause(self) -> None:
        self._reading.set()

    def cut(self) -> None:
        """Drop the socket without a close frame, like a lost network.

        Whatever it still yields (frames already buffered in this process) is discarded as
        lost on the wire; its reader ends at the drop without counting it as a close.
        """
        assert isinstance(self.conn, Connection)
        self.cut_conn = self.conn
        self.conn.abort()

    async def read_all(self, deadline: float) -> None:
        """Read and check every frame until the socket closes or is cut (or the deadline)."""
        conn = self.conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        was_cut = False
        reconnects = 0
        try:
            while True:
                await self._reading.wait()
                frame = await conn.receive(max(deadline - loop.time(), 0.001))
                if isinstance(conn, Session) and conn.reconnects != reconnects:
                    self.run.result.reconnects += conn.reconnects - reconnects
                    self.run.result.reconnected_at.append(time.monotonic())
                    reconnects = conn.reconnects
                if conn is not self.cut_conn:  # what the cut socket still yields is lost with it
                    self._check(frame)
        except ConnectionClosed as closed:
            was_cut = conn is self.cut_conn
            if not was_cut:
                self.close_code = closed.code
        except TimeoutError:
            self.run.result.fail(f"{self.call_id[:8]} {self.role}: socket still open at the deadline")
        except Exception as exc:  # a broken frame is a finding, not a crash of the tool
            self.run.result.unexpected_errors += 1
            self.run.result.fail(f"{self.call_id[:8]} {self.role}: {type(exc).__name__}: {exc}")
        finally:
            if not was_cut:
                self.closed.set()

    def _check(self, frame: dict[str, Any]) -> None:
        result = self.run.result
        kind = frame.get("type")
        if kind not in ("pong", "error", "server_shutdown") and frame.get("call_id") != self.call_id:
            # Another call's frame: its seq belongs to another stream, so it is not checked here.
            result.misrouted += 1
            result.fail(f"{self.call_id[:8]} {self.role}: got a {kind} frame of call {str(frame.get('call_id'))[:8]}")
            return
        order = self._check_seq(frame)
        if order == "repeated":
            return
        if kind == "pong":
            self._pong.set()
        elif kind == "error":
            self._check_error(frame)
        elif kind in RELAY_TYPES:
            self._check_relayed(frame, late=order == "late")
        elif kind == "state":  # joined, connected, disconnected (a cut): none is unexpected
            self._check_peer(frame)
            if frame.get("event") == "connected" and frame.get("subject") == self.peer_id:
                self.replaying = False
            if frame.get("participants", {}).get("connected", 0) >= 2:
                self.both_connected.set()
        elif kind == "call_ended":
            self.ended_reason = frame.get("reason")
            if not self.expect_close:
                result.ended_unasked += 1
                result.fail(f"{self.call_id[:8]} {self.role}: the call ended ({self.ended_reason}) though nobody ended it")
        elif kind == "server_shutdown" and frame.get("reconnect") and self.run.options.reconnect:
            pass  # a node hands the call over: the session reconnects
        else:
            result.unexpected_errors += 1
            result.fail(f"{self.call_id[:8]} {self.role}: unexpected frame {json.dumps(frame)[:200]}")

    def _check_peer(self, frame: dict[str, Any]) -> None:
        """A state frame names this side as ``peer_id`` and the other participant as ``peer``."""
        peer = frame.get("peer")
        want = (self.peer_id, self.other_peer_id, self.other_identity)
        got = (frame.get("peer_id"), peer.get("peer_id"), peer.get("identity")) if isinstance(peer, dict) else want
        if got != want and self.other_peer_id:
            self.run.result.misrouted += 1
            self.run.result.fail(f"{self.call_id[:8]} {self.role}: a state frame names {got}, want {want}")

    def _check_seq(self, frame: dict[str, Any]) -> Literal["next", "late", "repeated"]:
        """Check the server's ``seq``: "next", "late" (reordered: it fills an earlier jump) or "repeated".

        A resume replays only frames after the last one recorded, with their original seq, so
        the stream stays gapless across a cut and a repeated seq is always a fault (counted as
        duplicated; the frame is not looked at further). A jump leaves holes; a frame that
        fills one later is counted as reordered, and holes never filled are counted as seq
        gaps when the call is settled.
        """
        seq = frame.get("seq")
        if not isinstance(seq, int):
            return "next"
        result, last = self.run.result, self.last_seq
        if last is not None and seq <= last:
            if seq not in self.seq_holes:
                result.duplicated += 1
                result.fail(f"{self.call_id[:8]} {self.role}: server seq {seq} again (after {last})")
                return "repeated"
            self.seq_holes.discard(seq)
            result.reordered += 1
            result.fail(f"{self.call_id[:8]} {self.role}: server seq {seq} arrived after {last}")
            return "late"
        # resume_failed carries the next seq: what it skips is counted as lost, not as a gap.
        if last is not None and not _is_resume_failed(frame):
            self.seq_holes.update(range(last + 1, seq))
        self.last_seq = seq
        return "next"

    def _check_error(self, frame: dict[str, Any]) -> None:
        result = self.run.result
        if _is_resume_failed(frame):
            self.resume_failed, self.replaying = True, False
            self._arrived.set()
            result.resume_failed += 1
            result.fail(f"{self.call_id[:8]} {self.role}: resume_failed after seq {self.resume_from} "
                        "(raise the server's resume_buffer / resume_buffer_bytes)")
            return
        result.unexpected_errors += 1
        hint = ""
        if frame.get("code") == "buffer_full":
            hint = " (raise the server's ws_buffer_limit and ws_buffer_bytes for cut runs)"
        result.fail(f"{self.call_id[:8]} {self.role}: unexpected frame {json.dumps(frame)[:200]}{hint}")

    def _check_relayed(self, frame: dict[str, Any], late: bool) -> None:
        """Check a relayed message's tag; ``late``: its seq was already counted as reordered."""
        result = self.run.result
        payload = frame.get("payload")
        tag = payload.get("stress") if isinstance(payload, dict) else None
        if not isinstance(tag, dict) or tag.get("call") != self.call_id:
            result.misrouted += 1
            result.fail(f"{self.call_id[:8]} {self.role}: got a message tagged for another call")
            return
        if tag.get("from") == self.role or frame.get("from") != self.other_peer_id:
            result.misrouted += 1
            result.fail(f"{self.call_id[:8]} {self.role}: got a message not sent by the other participant")
            return
        n = int(tag["n"])
        if n in self.seen:
            result.duplicated += 1
            result.fail(f"{self.call_id[:8]} {self.role}: message {n} arrived twice")
            return
        if n < self.max_seen and not late:
            result.reordered += 1
            result.fail(f"{self.call_id[:8]} {self.role}: message {n} arrived after {self.max_seen}")
        self.seen.add(n)
        self.max_seen = max(self.max_seen, n)
        result.delivered += 1
        result.replayed += self.replaying
        result.latency_ms["relay_hop"].append(1000.0 * (time.perf_counter() - float(tag["t"])))
        if len(self.seen) >= self._wanted:
            self._arrived.set()


def _is_resume_failed(frame: dict[str, Any]) -> bool:
    return frame.get("type") == "error" and frame.get("code") == "resume_failed"


# The run ---------------------------------------------------------------------------------


class _Run:
    def __init__(
        self, base_urls: Sequence[str], options: StressOptions, during: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.options = options
        self.during = during
        self.bursting = 0  # calls that reached their candidate burst (or gave up before it)
        self.during_done = asyncio.Event()
        if during is None:
            self.during_done.set()
        self.result = StressResult(calls=options.calls)
        http = AsyncHTTPClient(force_instance=True, max_clients=options.http_concurrency)
        self.clients = [SignalingClient(url, timeout=options.timeout) for url in base_urls]
        for client in self.clients:
            client.http = http
        self.client = self.clients[0]
        self.rest_slots = asyncio.Semaphore(options.http_concurrency)
        self.connect_slots = asyncio.Semaphore(options.connect_concurrency)
        rng = random.Random(options.seed)
        enders = round(options.calls * options.end_fraction)
        self.ends_mid_run = set(rng.sample(range(options.calls), enders))
        self.mid_run_pending = enders
        cut = sorted(rng.sample(range(options.calls), round(options.calls * options.cut_fraction)))
        self.cut_role = {index: rng.choice(("host", "guest")) for index in cut}  # whose socket is cut
        self.mid_run_done = asyncio.Event()
        if not enders:
            self.mid_run_done.set()
        self.sides: list[Side] = []
        self.connected = 0
        self.first_offer: float | None = None
        self.last_delivery = 0.0
        self.sdp = sdp_like(options.sdp_size)
        self.candidate = candidate_like(options.candidate_size)

    async def rest(self, name: str, work: Any) -> dict[str, Any]:
        async with self.rest_slots:
            started = time.perf_counter()
            answer: dict[str, Any] = await work
        self.result.latency_ms[name].append(1000.0 * (time.perf_counter() - started))
        return answer

    async def connect(self, side: Side, deadline: float) -> None:
        async with self.connect_slots:
            started = time.perf_counter()
            if self.options.reconnect:
                first = self.clients.index(side.client)
                nodes = self.clients[first:] + self.clients[:first]
                credentials = {"call_id": side.call_id, "peer_id": side.peer_id, "peer_token": side.token}
                side.conn = await Session(nodes, credentials, backoff=(0.05, 1.0)).open()
            else:
                side.conn = await side.client.connect(side.call_id, side.peer_id, side.token)
        self.result.latency_ms["connect"].append(1000.0 * (time.perf_counter() - started))
        self.connected += 1
        side.reader = asyncio.ensure_future(side.read_all(deadline))

    async def resume(self, side: Side, deadline: float) -> None:
        """Once the cut socket's reader has stopped, reconnect with its last seq and read on."""
        old = side.conn
        assert isinstance(old, Connection) and side.reader is not None
        await asyncio.wait_for(asyncio.shield(side.reader), self.options.timeout)
        if side.last_seq is not None:
            old.last_seq = side.last_seq  # the last frame recorded (not one discarded after the cut)
        side.resume_from, side.replaying = old.last_seq, True
        async with self.connect_slots:
            started = time.perf_counter()
            side.conn = await side.client.resume(old)
        self.result.latency_ms["resume"].append(1000.0 * (time.perf_counter() - started))
        side.reader = asyncio.ensure_future(side.read_all(deadline))

    def reach_burst(self) -> None:
        """One more call is bursting (or failed before); once all are, ``during`` starts."""
        self.bursting += 1
        if self.bursting == self.options.calls and self.during is not None:
            asyncio.ensure_future(self._run_during(self.during))

    async def _run_during(self, during: Callable[[], Awaitable[None]]) -> None:
        try:
            await during()
        except Exception as exc:  # noqa: BLE001 - what went wrong is the run's finding
            self.result.unexpected_errors += 1
            self.result.fail(f"during the burst: {type(exc).__name__}: {exc}")
        finally:
            self.during_done.set()

    async def call(self, index: int, deadline: float) -> None:
        """One call from creation to its verified end; counts it ok or failed."""
        mid_run = index in self.ends_mid_run
        sides: list[Side] = []
        bursting = [False]
        try:
            ok = await self._call(index, mid_run, self.cut_role.get(index), sides, deadline, bursting)
        except Exception as exc:  # any failure of the server or the network is a finding, not a crash
            ok = False
            self.result.unexpected_errors += 1
            self.result.fail(f"call #{index}: {type(exc).__name__}: {exc}")
        finally:
            if not bursting[0]:
                self.reach_burst()
            if mid_run:
                self.mid_run_pending -= 1
                if self.mid_run_pending == 0:
                    self.mid_run_done.set()
        ok = self._settle(sides) and ok
        if ok:
            self.result.calls_ok += 1
        else:
            self.result.calls_failed += 1

    def access_token(self, sub: str, grant: str) -> str | None:
        """With ``jwt_secret``, a token for ``sub`` holding ``grant``, valid for the whole run."""
        secret = self.options.jwt_secret
        return mint(secret, sub, grants=[grant], ttl=self.options.duration + 60) if secret else None

    def node(self, index: int, offset: int) -> SignalingClient:
        """With several nodes: call ``index``'s create, join, host and guest each go to the next node."""
        return self.clients[(index + offset) % len(self.clients)]

    async def _call(
        self, index: int, mid_run: bool, cut_role: str | None, sides: list[Side], deadline: float,
        bursting: list[bool],
    ) -> bool:
        timeout = self.options.timeout
        host_sub, guest_sub = f"stress-{index}-host", f"stress-{index}-guest"
        created = await self.rest("create", self.node(index, 0).create_call(
            access_token=self.access_token(host_sub, "create")))
        call_id = created["call_id"]
        joined = await self.rest("join", self.node(index, 1).join(
            call_id, access_token=self.access_token(guest_sub, "join")))
        host = Side(self, call_id, "host", created["peer_id"], created["peer_token"], self.node(index, 2))
        guest = Side(self, call_id, "guest", joined["peer_id"], joined["peer_token"], self.node(index, 3))
        host.other_peer_id, guest.other_peer_id = guest.peer_id, host.peer_id
        if self.options.jwt_secret:
            host.other_identity, guest.other_identity = guest_sub, host_sub
        sides += [host, guest]
        self.sides += sides
        await asyncio.gather(self.connect(host, deadline), self.connect(guest, deadline))
        await asyncio.wait_for(asyncio.gather(host.both_connected.wait(), guest.both_connected.wait()), timeout)
        if self.first_offer is None:
            self.first_offer = time.perf_counter()
        ok = await self._exchange(host, guest, cut_role, deadline, bursting)
        left = max(deadline - asyncio.get_running_loop().time(), 0.001)
        await asyncio.wait_for(self.during_done.wait(), left)  # calls end once the servers are left alone
        if mid_run:
            self.result.ended_mid_run += 1
            return await self._end(call_id, host, sides) and ok
        await asyncio.wait_for(self.mid_run_done.wait(), max(deadline - asyncio.get_running_loop().time(), 0.001))
        for side in sides:
            side.send("message", {"text": "still here"})
        ok = all([await s.wait_received(o.sent, timeout) for s, o in ((host, guest), (guest, host))]) and ok
        return await self._end(call_id, guest, sides) and ok

    async def _exchange(
        self, host: Side, guest: Side, cut_role: str | None, deadline: float, bursting: list[bool],
    ) -> bool:
        timeout, k = self.options.timeout, self.options.candidates
        host.send("offer", {"type": "offer", "sdp": self.sdp})
        if not await guest.wait_received(1, timeout):
            return False
        guest.send("answer", {"type": "answer", "sdp": self.sdp})
        if not await host.wait_received(1, timeout):
            return False
        bursting[0] = True
        self.reach_burst()
        half = k // 2 if cut_role else k
        for i in range(half):
            for side in (host, guest):
                self.send_candidate(side, i)
            if self.options.pace:
                await asyncio.sleep(self.options.pace)  # a sending rate, not a wait for something
        if cut_role:
            away, other = (host, guest) if cut_role == "host" else (guest, host)
            await self._cut(away, other, range(half, k), deadline)
        done = [await host.wait_received(guest.sent, timeout), await guest.wait_received(host.sent, timeout)]
        self.last_delivery = time.perf_counter()
        return all(done)

    def send_candidate(self, side: Side, i: int) -> None:
        side.send("candidate", {"candidate": self.candidate, "sdpMid": "0", "sdpMLineIndex": i % 2})

    async def _cut(self, away: Side, other: Side, rest: range, deadline: float) -> None:
        """Cut ``away``'s socket mid-burst while ``other`` sends on; resume it; then ``away`` sends its rest.

        The pings make each step certain rather than likely: everything ``away`` sent reached
        the server before the cut (only what the server sends may be lost, which is what a
        resume recovers); the first half of ``other``'s rest was sent to ``away``'s socket
        but never read (lost on the wire); the second half reached the server while ``away``
        was gone (held for it, or sent to the dead socket).
        """
        timeout = self.options.timeout
        on_the_wire, while_away = rest[:(len(rest) + 1) // 2], rest[(len(rest) + 1) // 2:]
        await away.barrier(timeout)
        away.pause()
        try:
            for i in on_the_wire:
                self.send_candidate(other, i)
            await other.barrier(timeout)
            away.cut()
            self.result.cuts += 1
            for i in while_away:
                self.send_candidate(other, i)
            await other.barrier(timeout)
        finally:
            away.unpause()
        await self.resume(away, deadline)
        for i in rest:
            self.send_candidate(away, i)

    async def _end(self, call_id: str, by: Side, sides: list[Side]) -> bool:
        if self.options.reconnect:
            # Both attached again (a ping through and its pong back): a side still reconnecting
            # when the call ends would find it gone (4404) instead of reading its end.
            await asyncio.gather(*(side.barrier(self.options.timeout) for side in sides))
        for side in sides:
            side.expect_close = True
        if isinstance(by.conn, Session):
            await self._end_through(by.conn, call_id, by.token)
        else:
            await self.rest_plain(by.client.end(call_id, by.token))
        await asyncio.wait_for(asyncio.gather(*(s.closed.wait() for s in sides)), self.options.timeout)
        return True

    async def _end_through(self, session: Session, call_id: str, token: str) -> None:
        """End through the node the session is on now; if that node is going, through the next one.

        A retry may find the call ended by the attempt whose answer was lost: 404 then is success.
        """
        for attempt in range(len(session.clients) + 2):
            client = session.clients[(session.clients.index(session.client) + attempt) % len(session.clients)]
            try:
                await self.rest_plain(client.end(call_id, token))
                return
            except ApiError as exc:
                if exc.status == 404 and attempt:
                    return
                if exc.status != 503:
                    raise
            except ConnectionError:
                pass
            await asyncio.sleep(0.1 * (attempt + 1))  # a node on its way down or up: try again shortly
        raise ConnectionError(f"no node ended call {call_id[:8]}")

    async def rest_plain(self, work: Any) -> None:
        async with self.rest_slots:
            await work

    def _settle(self, sides: list[Side]) -> bool:
        """Count what each side missed and check how it closed; True if the call was clean."""
        ok = True
        for side in sides:
            other = sides[1] if side is sides[0] else sides[0]
            missing = other.sent - len(side.seen)
            if missing > 0:
                ok = False
                self.result.lost += missing
                self.result.fail(f"{side.call_id[:8]} {side.role}: {missing} message(s) never arrived")
            if side.seq_holes:
                ok = False
                self.result.seq_gaps += len(side.seq_holes)
                self.result.fail(f"{side.call_id[:8]} {side.role}: server seq {sorted(side.seq_holes)[:5]} never arrived")
            if not side.expect_close:
                continue
            if side.ended_reason != "ended" or side.close_code != 1000:
                ok = False
                self.result.unexpected_closes += 1
                self.result.fail(f"{side.call_id[:8]} {side.role}: ended with {side.ended_reason!r}, "
                                 f"close {side.close_code} (want 'ended', 1000)")
        for side in sides:
            if side.closed.is_set() and not side.expect_close:
                ok = False
                self.result.unexpected_closes += 1
                self.result.fail(f"{side.call_id[:8]} {side.role}: closed early with {side.close_code}")
        return ok

    async def finish(self) -> None:
        """Close whatever is still open and wait briefly for the readers."""
        for side in self.sides:
            if side.conn is not None and not side.closed.is_set():
                side.conn.close()
        readers = [s.reader for s in self.sides if s.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=self.options.timeout)
        self.client.http.close()


async def run_stress(
    base_url: str | Sequence[str], options: StressOptions, progress: Any = None,
    during: Callable[[], Awaitable[None]] | None = None,
) -> StressResult:
    """Run the whole stress test against ``base_url`` (or the nodes of a cluster); never raises for server faults.

    With several URLs, each call is created on one node, joined through the next, and its
    host's and guest's sockets connect to the two after that, so that they are never on
    the same node. ``progress(run)`` is called twice a second while running, if given.
    ``during()`` runs once every call is in its candidate burst (see the module docstring).
    """
    run = _Run([base_url] if isinstance(base_url, str) else list(base_url), options, during)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    deadline = loop.time() + options.duration
    tasks = [asyncio.ensure_future(run.call(i, deadline)) for i in range(options.calls)]
    ticker = asyncio.ensure_future(_tick(run, progress)) if progress else None
    _, pending = await asyncio.wait(tasks, timeout=options.duration)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
        run.result.calls_unfinished = len(pending)
        run.result.fail(f"{len(pending)} call(s) unfinished after --duration {options.duration:g} s")
        run.result.calls_failed += len(pending)
    if ticker is not None:
        ticker.cancel()
    await run.finish()
    result = run.result
    result.elapsed = time.perf_counter() - started
    if run.first_offer is not None:
        result.exchange_time = max(run.last_delivery - run.first_offer, 1e-6)
    return result


async def _tick(run: _Run, progress: Any) -> None:
    while True:
        await asyncio.sleep(0.5)  # a display refresh, not a wait for a condition
        progress(run)


def sdp_like(size: int) -> str:
    lines = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0"]
    i = 0
    while sum(len(x) + 2 for x in lines) < size:
        lines.append(f"a=fingerprint-{i}:sha-256 " + ":".join(f"{(i * 7 + j) % 256:02X}" for j in range(16)))
        i += 1
    return "\r\n".join(lines)[:size]


def candidate_like(size: int) -> str:
    text = "candidate:842163049 1 udp 1677729535 127.0.0.1 54400 typ srflx raddr 0.0.0.0 rport 0 generation 0"
    return (text + " ufrag " + "x" * size)[:size]


# Command line ------------------------------------------------------------------------------


def format_table(result: StressResult, options: StressOptions) -> str:
    d = result.to_dict()
    lines = [
        f"signal-srv-stress: {'OK' if result.ok else 'FAILED'}  ({options.calls} calls, "
        f"{options.candidates} candidates each way, {options.end_fraction:.0%} ended mid-run, "
        f"{options.cut_fraction:.0%} cut and resumed, auth={'jwt' if options.jwt_secret else 'none'}, "
        f"{d['elapsed']:.1f} s)",
        *([f"  sockets    reconnecting (cseq); reconnected {d['reconnects']}  calls ended unasked "
           f"{d['ended_unasked']}"] if options.reconnect else []),
        f"  calls      ok {d['calls_ok']}  failed {d['calls_failed']}  unfinished {d['calls_unfinished']}  "
        f"ended mid-run {d['ended_mid_run']}  cut {d['cuts']} (replayed {d['replayed']})",
        f"  messages   sent {d['sent']}  delivered {d['delivered']}  lost {d['lost']}  duplicated {d['duplicated']}  "
        f"misrouted {d['misrouted']}  reordered {d['reordered']}",
        f"  errors     unexpected errors {d['unexpected_errors']}  unexpected closes {d['unexpected_closes']}  "
        f"seq gaps {d['seq_gaps']}  resume failed {d['resume_failed']}",
        f"  throughput {d['messages_per_s']} messages/s, {d['calls_per_s']} calls/s",
        "  latency ms        n      p50      p95      p99      max",
    ]
    for name, p in d["latency_ms"].items():
        lines.append(f"    {name:<10} {p['n']:>7} {p['p50']:>8.2f} {p['p95']:>8.2f} {p['p99']:>8.2f} {p['max']:>8.2f}")
    lines += [f"  ! {text}" for text in result.failures]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="signal-srv-stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="server to test, e.g. http://127.0.0.1:8080 (default: spawn one)")
    p.add_argument("--urls", help="nodes of a cluster, comma-separated: each call's host and guest sockets go to "
                                  "two different nodes, its create and join to others (exact-delivery checks as ever)")
    p.add_argument("--spawn", action="store_true", help="start a server on a free 127.0.0.1 port (the default)")
    p.add_argument("--calls", type=int, default=StressOptions.calls, help="concurrent calls (default %(default)s)")
    p.add_argument("--candidates", type=int, default=StressOptions.candidates,
                   help="candidates each way per call (default %(default)s)")
    p.add_argument("--end-fraction", type=float, default=StressOptions.end_fraction,
                   help="fraction of calls ended mid-run (default %(default)s)")
    p.add_argument("--cut-fraction", type=float, default=StressOptions.cut_fraction,
                   help="fraction of calls in which one socket is cut mid-burst without a close frame and "
                        "resumed with last_seq (default %(default)s)")
    p.add_argument("--duration", type=float, default=StressOptions.duration,
                   help="cap on the whole run, seconds (default %(default)s)")
    p.add_argument("--timeout", type=float, default=StressOptions.timeout,
                   help="cap on every single wait, seconds (default %(default)s)")
    p.add_argument("--seed", type=int, help="seed choosing the calls ended mid-run and the calls cut")
    p.add_argument("--server-dir", help="with --spawn: run signal_srv from this source tree (e.g. a git snapshot)")
    p.add_argument("--auth", choices=("none", "jwt"), default="none",
                   help="jwt: mint an access token for every create and join (a spawned server gets auth=jwt and "
                        "a random secret; with --url, the secret comes from SIGNAL_SRV_JWT_SECRET)")
    p.add_argument("--reconnect", action="store_true",
                   help="sockets number their frames (cseq) and reconnect by themselves after any close that is "
                        "not final, to the next node if need be")
    p.add_argument("--pace", type=float, default=StressOptions.pace,
                   help="seconds between two candidates of one side, so that a burst lasts (default %(default)s)")
    p.add_argument("--chaos", choices=("rolling", "kill", "freeze", "redis"),
                   help="start Redis and --nodes nodes of its own, and once every call is bursting: restart every "
                        "node in turn (rolling), kill -9 one (kill), SIGSTOP one past its lease (freeze), or restart "
                        "Redis (redis); implies --reconnect (and --pace 0.1 unless given)")
    p.add_argument("--nodes", type=int, default=3, help="with --chaos: the nodes to start (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args(argv)
    if args.chaos and (args.url or args.urls or args.spawn or args.server_dir or args.auth == "jwt"):
        p.error("--chaos starts its own cluster: no --url, --urls, --spawn, --server-dir or --auth=jwt")
    if args.chaos and (args.nodes < 2 or args.cut_fraction):
        p.error("--chaos needs --nodes >= 2 and no --cut-fraction")
    if args.reconnect and args.cut_fraction:
        p.error("--reconnect and --cut-fraction exclude each other")
    if args.auth == "jwt" and (args.url or args.urls) and not os.environ.get("SIGNAL_SRV_JWT_SECRET"):
        p.error("--auth=jwt with --url or --urls needs the servers' secret in SIGNAL_SRV_JWT_SECRET")
    if sum(bool(x) for x in (args.url, args.urls, args.spawn)) > 1:
        p.error("--url, --urls and --spawn exclude each other")
    if (args.calls < 1 or args.candidates < 0 or not 0 <= args.end_fraction <= 1
            or not 0 <= args.cut_fraction <= 1 or args.duration <= 0):
        p.error("need --calls >= 1, --candidates >= 0, 0 <= --end-fraction <= 1, 0 <= --cut-fraction <= 1, "
                "--duration > 0")
    return args


def _progress_line(run: _Run) -> None:
    r = run.result
    errors = (r.lost + r.duplicated + r.misrouted + r.reordered + r.resume_failed + r.unexpected_errors
              + r.unexpected_closes)
    sys.stdout.write(f"\r  sockets connected {run.connected}/{2 * run.options.calls}  relayed {r.delivered}/{r.sent}"
                     f"  calls done {r.calls_ok + r.calls_failed}  errors {errors}   ")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: exit 0 on exact delivery, 1 on any fault."""
    args = parse_args(argv)
    secret = ""
    if args.auth == "jwt":
        secret = os.environ["SIGNAL_SRV_JWT_SECRET"] if args.url or args.urls else secrets.token_urlsafe(32)
    pace = args.pace if args.pace or not args.chaos else 0.1
    options = StressOptions(calls=args.calls, candidates=args.candidates, end_fraction=args.end_fraction,
                            cut_fraction=args.cut_fraction, duration=args.duration, timeout=args.timeout,
                            seed=args.seed, jwt_secret=secret, reconnect=args.reconnect or bool(args.chaos), pace=pace)
    raise_nofile(4 * options.calls + 1024)
    live = _progress_line if sys.stdout.isatty() and not args.json else None
    if args.chaos:
        from signal_srv.chaos import ChaosCluster

        cluster = ChaosCluster(args.nodes).start()
        try:
            result = asyncio.run(run_stress(cluster.urls, options, live, during=cluster.fault(args.chaos)))
        finally:
            cluster.stop()
    else:
        urls = args.urls.split(",") if args.urls else [args.url] if args.url else []
        server = None if urls else spawn_server(options.calls, server_dir=args.server_dir,
                                                cuts=options.cut_fraction > 0, jwt_secret=secret)
        try:
            result = asyncio.run(run_stress(urls or [server.base_url], options, live))  # type: ignore[union-attr]
        finally:
            if server is not None:
                server.stop()
    if live:
        sys.stdout.write("\n")
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result, options))
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
