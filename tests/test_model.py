"""A hypothesis state machine drives random create/join/leave/end/expire/connect/disconnect/relay
sequences against a live server process and checks every answer against a small model.

The model is the README's rules, written independently of ``call.py``: two seats per call,
the first participant (or the next joiner after the host left) is the impolite host, a third
join is ``409 call_full``, a wrong token is ``401``, an ended call is ``404`` for everything
and ``4404`` on a socket, the last one out ends the call, relays go to the other participant
only (held while it is not connected), and every server frame carries the next ``seq`` of
its recipient. After each step every open socket is synchronised with a ping: the frames
before its ``pong`` must be exactly the ones the model predicts, in order.

Expiry. The server runs with a short ``call_ttl`` (``TTL``) and ``unclaimed_ttl`` /
``departure_timeout`` far beyond any run, so only the inactivity TTL can end a call behind
the model's back. A call expires ``TTL`` after its last activity (an accepted REST request,
socket traffic, a connect or a disconnect) while no socket is connected. The model keeps,
per call, the client-side monotonic window ``[lo, hi]`` of its last activity: ``lo`` just
before the request or frame went out, ``hi`` once its effect was observed. The server and
the test share the system's monotonic clock, so a call with no connected socket:

- is certainly alive until ``lo + TTL`` (``EARLY`` absorbs clock granularity only: load can
  make the server late, never early);
- may be gone from then on: every check that touches it accepts both outcomes, and
  updates the model to what it saw (``404`` / ``4404``: gone for good; an accepted request:
  that was activity);
- should be gone by ``hi + TTL + SLACK``, but a loaded machine can make the server later
  still, so ordinary rules treat that as "may be gone" too. Only ``wait_for_expiry`` insists,
  with a bound of ``LATE`` past ``hi + TTL``.

A connected socket keeps its call alive however long, and expiry needs a call without one,
so no socket the model holds can ever receive ``call_ended`` with reason ``expired``: such a
frame fails the test like any other unexpected frame.

Every activity is made observable before the next step, so ``hi`` is a true bound: a
client-side close is confirmed by the other participant's ``disconnected`` frame or, with
nobody left connected, by ``expires_at`` turning non-null on ``GET /apiv2/calls/<id>``
(a read: not activity, and not handled by the call's actor). A socket the server closed
itself (after a REST leave, or replaced by a reconnect) is still reported to the call as a
disconnect once the client drops it, which the server counts as activity; the model waits
until the ``signal_srv_sockets`` gauge shows every such socket gone (so its disconnect is
queued to the call before anything later) and extends ``hi`` to that moment.

Whether a call has expired depends on timing, so what a rule sees may differ when
hypothesis replays a case. Preconditions therefore depend only on which rules ran, never on
what the server answered (hypothesis requires the same draws on a replay): rules without
anything to act on (no open socket, no idle call) do nothing. Heartbeat pings, which start
at a random phase of ``heartbeat_interval``, may arrive on any socket and are skipped.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import TIMEOUT
from tests.live_server import Closed, LiveServer, SyncSocket, http, live_server_fixture

TTL = 0.4  # call_ttl of the server under test, in seconds
SLACK = 0.25  # how late a loaded server may plausibly notice a deadline or a socket's close
EARLY = 0.005  # how early a deadline may look: float and millisecond rounding only (load only delays)
LATE = 0.3 * TIMEOUT  # a call still alive this long after hi + TTL is a failure (1.5 s unscaled)
POLL = 0.02  # seconds between two polls of an observable state
MAX_WAITS = 1  # wait_for_expiry rules per example (each takes about TTL)

live_server = live_server_fixture(call_ttl=TTL, unclaimed_ttl=3600, departure_timeout=3600)

MAX_CALLS = 5  # per example
UNKNOWN_CALL = "A" * 22

_SOCKETS_GAUGE = re.compile(r"^signal_srv_sockets (\S+)$", re.M)


@dataclass
class Peer:
    call: MCall
    peer_id: str
    token: str
    role: str
    seated: bool = True  # False once it left (its token is then wrong for the call)
    ws: SyncSocket | None = None
    seq: int = 0  # the seq of the next frame the server sends it
    held: list[tuple[str, Any]] = field(default_factory=list)  # (type, payload) waiting for it to connect
    expected: deque[dict[str, Any]] = field(default_factory=deque)  # frames its socket should get next


@dataclass
class MCall:
    call_id: str
    lo: float  # the call's last activity happened at or after lo (monotonic) ...
    hi: float  # ... and at or before hi
    peers: list[Peer] = field(default_factory=list)
    ended: bool = False
    expired: bool = False  # ended by the TTL, as observed

    @property
    def seated(self) -> list[Peer]:
        return [p for p in self.peers if p.seated]

    @property
    def connected(self) -> list[Peer]:
        return [p for p in self.seated if p.ws is not None]

    @property
    def status(self) -> str:
        return "ended" if self.ended else "active" if len(self.seated) >= 2 else "waiting"


def matches(actual: Any, expected: Any) -> bool:
    """``expected`` is a subset of ``actual`` (nested dicts compared the same way)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and matches(actual[k], v) for k, v in expected.items())
    return bool(actual == expected)


def is_not_found(status: int, body: Any) -> bool:
    return status == 404 and body["error"]["code"] == "call_not_found"


def monotonic_of(iso: str) -> float:
    """An ISO time of the server (``2026-11-25T16:13:09.627Z``) on this process's monotonic clock."""
    wall = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    return wall - (time.time() - time.monotonic())


class SignalingModel(RuleBasedStateMachine):
    server: LiveServer  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[MCall] = []
        self.counter = itertools.count()
        self.waits = 0
        self.dropped: list[MCall] = []  # live calls with a server-closed socket we just dropped
        self.sent = self.received = 0.0  # monotonic times around the last request

    # Helpers ---------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.server.base_url + path

    def request(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        """One request; ``self.sent`` / ``self.received`` bracket it on the monotonic clock."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        self.sent = time.monotonic()
        status, body, _ = http(method, self.url(path), headers=headers)
        self.received = time.monotonic()
        return status, body

    def post(self, path: str, token: str | None = None) -> tuple[int, Any]:
        return self.request("POST", path, token)

    def live(self) -> list[MCall]:
        return [c for c in self.calls if not c.ended]

    def all_peers(self) -> list[Peer]:
        return [p for c in self.calls for p in c.peers]

    def idle(self) -> list[MCall]:
        """Live calls without a connected socket: the ones the TTL can end."""
        return [c for c in self.live() if not c.connected]

    def pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    def pick_preferring(self, preferred: list[Any], items: list[Any], i: int, prefer: bool) -> Any:
        """From ``preferred`` if asked and there are any, else from ``items``: steps on ended calls
        and departed peers stay possible, but do not crowd out the ones that change a live call."""
        return self.pick(preferred if prefer and preferred else items, i)

    # Expiry model ------------------------------------------------------------------------

    def touch(self, c: MCall, sent: float, received: float) -> None:
        """An activity of ``c`` happened between ``sent`` and ``received``."""
        c.lo, c.hi = sent, received

    def may_be_gone(self, c: MCall, now: float) -> bool:
        return not c.ended and not c.connected and now >= c.lo + TTL - EARLY

    def gone(self, c: MCall, now: float, what: str) -> None:
        """The server says ``c`` no longer exists (seen at ``now``): it must have expired."""
        assert not c.ended
        assert not c.connected, f"{what}: call {c.call_id} is gone while {len(c.connected)} socket(s) are connected"
        assert now >= c.lo + TTL - EARLY, (
            f"{what}: call {c.call_id} gone {now - c.lo:.3f} s after its last activity began (call_ttl {TTL})")
        c.ended = c.expired = True
        for p in c.peers:
            p.held.clear()

    def check_expires_at(self, c: MCall, body: dict[str, Any]) -> None:
        """``expires_at`` is ``null`` while a socket is connected, else last activity + TTL."""
        if c.connected:
            assert body["expires_at"] is None, body
            return
        assert body["expires_at"] is not None, body
        expires = monotonic_of(body["expires_at"])
        assert c.lo + TTL - EARLY <= expires <= c.hi + TTL + SLACK, (
            f"expires_at is {expires - c.lo:.3f} s after the last activity began, "
            f"{expires - c.hi:.3f} s after it was seen (call_ttl {TTL})")

    def wait_gone(self, c: MCall, by: float) -> None:
        """Poll ``GET /apiv2/calls/<id>`` (a read, not activity) until 404, at most until ``by``."""
        while True:
            status, body = self.request("GET", f"/apiv2/calls/{c.call_id}")
            if is_not_found(status, body):
                self.gone(c, self.received, "wait_for_expiry")
                return
            assert status == 200, body
            self.check_summary(c, body)
            self.check_expires_at(c, body)
            assert self.received < by, (
                f"call {c.call_id} still alive {self.received - c.hi - TTL:.3f} s after its deadline "
                f"(last activity seen {self.received - c.hi:.3f} s ago, call_ttl {TTL})")
            time.sleep(POLL)

    def sync_sockets(self) -> None:
        """Wait until the server has seen every socket we dropped go (its disconnect is queued)."""
        want = sum(p.ws is not None for p in self.all_peers())
        deadline = time.monotonic() + TIMEOUT
        while True:
            with urllib.request.urlopen(self.url("/metrics"), timeout=TIMEOUT) as response:
                text = response.read().decode()
            match = _SOCKETS_GAUGE.search(text)
            assert match is not None, text[:500]
            if float(match.group(1)) == want:
                break
            assert time.monotonic() < deadline, f"signal_srv_sockets stays {match.group(1)}, expected {want}"
            time.sleep(POLL)
        now = time.monotonic()
        for c in self.dropped:
            if not c.ended:
                c.hi = max(c.hi, now)
        self.dropped.clear()

    # Frames ----------------------------------------------------------------------------

    def expect_frame(self, p: Peer, frame: dict[str, Any]) -> None:
        """``p``'s socket will get ``frame`` next, stamped with ``p``'s next seq."""
        p.expected.append({**frame, "seq": p.seq})
        p.seq += 1

    def expect_close(self, p: Peer, code: int) -> None:
        p.expected.append({"close": code})

    def state(self, c: MCall, event: str, subject: Peer) -> None:
        """Every connected participant of ``c`` gets a ``state`` frame about ``subject``."""
        for p in c.connected:
            self.expect_frame(p, {
                "type": "state", "call_id": c.call_id, "status": c.status, "peer_id": p.peer_id,
                "polite": p.role != "host", "event": event, "subject": subject.peer_id,
                "participants": {"count": len(c.seated), "connected": len(c.connected), "max": 2},
            })

    def read_expected(self, ws: SyncSocket, expected: deque[dict[str, Any]]) -> None:
        while expected:
            want = expected.popleft()
            try:
                got = ws.recv()
            except Closed as closed:
                assert want.get("close") == closed.code, f"expected {want}, socket closed with {closed.code}"
                continue
            assert "close" not in want, f"expected close {want['close']}, got {got}"
            assert matches(got, want), f"expected {want}\n got {got}"

    def drain(self, p: Peer) -> None:
        if p.ws is not None:
            self.read_expected(p.ws, p.expected)

    def check_summary(self, c: MCall, body: dict[str, Any], count: int | None = None) -> None:
        assert body["call_id"] == c.call_id
        assert body["status"] == c.status
        assert body["participants"] == {"count": len(c.seated) if count is None else count, "max": 2}

    def seat(self, c: MCall, body: dict[str, Any]) -> Peer:
        role = "guest" if any(p.role == "host" for p in c.seated) else "host"
        assert body["role"] == role and body["polite"] == (role != "host"), body
        p = Peer(c, body["peer_id"], body["peer_token"], role)
        c.peers.append(p)
        return p

    # Rules -----------------------------------------------------------------------------

    @initialize()
    def connected_pair(self) -> None:
        """Start from an active call with both participants connected (which never expires).

        With a ``call_ttl`` of ``TTL``, a call the random steps make is often gone before
        they join and connect both sides, so without this the rules that need a connected
        pair (a disconnect the other side is told of, the host leaving and a new host
        joining, messages held and delivered on a reconnect) would be rare.
        """
        self.create()
        c = self.calls[-1]
        self.join(len(self.calls) - 1)
        for p in list(c.seated):
            self.connect(self.all_peers().index(p))

    @precondition(lambda self: len(self.calls) < MAX_CALLS)
    @rule()
    def create(self) -> None:
        status, body = self.post("/apiv2/calls")
        assert status == 201, body
        c = MCall(body["call_id"], self.sent, self.received)
        self.calls.append(c)
        self.seat(c, body)
        self.check_summary(c, body)
        self.check_expires_at(c, body)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), live=st.booleans())
    def join(self, i: int, live: bool = False) -> None:
        c = self.pick_preferring(self.live(), self.calls, i, live)
        status, body = self.post(f"/apiv2/calls/{c.call_id}/join")
        if c.ended:
            assert is_not_found(status, body), (status, body)
        elif is_not_found(status, body):
            self.gone(c, self.received, "join")
        elif len(c.seated) >= 2:
            assert (status, body["error"]["code"]) == (409, "call_full")  # refused: not activity
        else:
            assert status == 200, body
            self.touch(c, self.sent, self.received)
            p = self.seat(c, body)
            self.check_summary(c, body)
            self.check_expires_at(c, body)
            self.state(c, "joined", p)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), action=st.sampled_from(["leave", "end"]), live=st.booleans())
    def leave_or_end(self, i: int, action: str, live: bool = False) -> None:
        p = self.pick_preferring([p for c in self.live() for p in c.seated], self.all_peers(), i, live)
        c = p.call
        status, body = self.post(f"/apiv2/calls/{c.call_id}/{action}", p.token)
        if c.ended:
            assert is_not_found(status, body), (status, body)
            return
        if is_not_found(status, body):
            self.gone(c, self.received, action)
            return
        if not p.seated:
            assert (status, body["error"]["code"]) == (401, "unauthorized")
            return
        assert status == 200, body
        self.touch(c, self.sent, self.received)
        if action == "end":
            for q in c.connected:
                self.expect_frame(q, {"type": "call_ended", "call_id": c.call_id, "reason": "ended"})
                self.expect_close(q, 1000)
            count = len(c.seated)
            c.ended = True
            self.check_summary(c, body, count)
            return
        if p.ws is not None:
            self.expect_frame(p, {"type": "call_ended", "call_id": c.call_id, "reason": "left"})
            self.expect_close(p, 1000)
        p.seated = False
        p.held.clear()
        if not c.seated:
            c.ended = True
            self.check_summary(c, body, 0)
        else:
            self.check_summary(c, body)
            self.check_expires_at(c, body)
            self.state(c, "left", p)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), j=st.integers(0, 99), digest=st.booleans())
    def wrong_token(self, i: int, j: int, digest: bool) -> None:
        """A token of another call (or none), or the digest the server keeps of a participant's own
        token (``digest``: what Redis holds), is 401 on a live call, 404 on an ended one."""
        c = self.pick(self.calls, i)
        others = [p for p in self.all_peers() if p.call is not c]
        token = self.pick(others, j).token if others else None
        if digest and c.seated:
            token = base64.b64encode(hashlib.sha256(self.pick(c.seated, j).token.encode()).digest()).decode()
        status, body = self.post(f"/apiv2/calls/{c.call_id}/end", token)
        if token is None:
            assert (status, body["error"]["code"]) == (401, "unauthorized")  # before the call is looked up
        elif c.ended:
            assert is_not_found(status, body), (status, body)
        elif is_not_found(status, body):
            self.gone(c, self.received, "end with a wrong token")
        else:
            assert (status, body["error"]["code"]) == (401, "unauthorized")  # refused: not activity

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), away=st.booleans())
    def connect(self, i: int, away: bool = False) -> None:
        p = self.pick_preferring([p for c in self.live() for p in c.seated if p.ws is None], self.all_peers(), i, away)
        c = p.call
        sent = time.monotonic()
        ws = SyncSocket.for_peer(self.server, c.call_id, p.peer_id, p.token)
        if c.ended or not p.seated:
            closed = ws.wait_closed()
            if not c.ended and closed.code == 4404:
                self.gone(c, time.monotonic(), "connect of a peer that left")
                return
            assert closed.code == (4404 if c.ended else 4401), closed
            return
        first = None
        if not c.connected:  # the call may have expired: its first answer is our state frame or 4404
            try:
                first = ws.recv()
            except Closed as closed:
                assert closed.code == 4404, closed
                self.gone(c, time.monotonic(), "connect")
                return
        if p.ws is not None:
            self.drain(p)
            self.expect_close(p, 4409)
            self.read_expected(p.ws, p.expected)
            self.dropped.append(c)  # its disconnect still reaches the call
        p.ws = ws
        self.state(c, "connected", p)
        if first is not None:
            want = p.expected.popleft()
            assert matches(first, want), f"expected {want}\n got {first}"
        for kind, payload in p.held:
            self.expect_frame(p, {"type": kind, "call_id": c.call_id, "payload": payload})
        p.held.clear()
        for q in c.connected:
            self.drain(q)
        self.touch(c, sent, time.monotonic())

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99))
    def disconnect(self, i: int) -> None:
        open_ = [p for p in self.all_peers() if p.ws is not None]
        if not open_:
            return
        p = self.pick(open_, i)
        c = p.call
        self.drain(p)
        sent = time.monotonic()
        p.ws.close()
        p.ws = None
        self.state(c, "disconnected", p)
        for q in c.connected:
            self.drain(q)  # their "disconnected" frame: the server has handled it
        if c.connected:
            self.touch(c, sent, time.monotonic())
            return
        # Nobody is left to tell: wait until the call shows an expiry time (a read, not activity).
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, body = self.request("GET", f"/apiv2/calls/{c.call_id}")
            if is_not_found(status, body):  # handled, then expired while we polled
                self.touch(c, sent, self.received)
                self.gone(c, self.received, "disconnect")
                return
            assert status == 200, body
            self.check_summary(c, body)
            if body["expires_at"] is not None:
                self.touch(c, sent, self.received)
                self.check_expires_at(c, body)
                return
            assert self.received < deadline, f"call {c.call_id} still shows a connected socket"
            time.sleep(POLL)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), kind=st.sampled_from(["offer", "answer", "candidate", "bye", "message"]))
    def relay(self, i: int, kind: str) -> None:
        open_ = [p for p in self.all_peers() if p.ws is not None]
        if not open_:
            return
        p = self.pick(open_, i)
        payload = {"n": next(self.counter), "kind": kind}
        p.ws.send_json({"type": kind, "payload": payload})
        others = [q for q in p.call.seated if q is not p]
        if not others:
            p.expected.append({"type": "error", "code": "no_peer"})  # error frames are not stamped
            self.drain(p)
            return
        for q in others:
            frame = {"type": kind, "call_id": p.call.call_id, "from": p.peer_id, "payload": payload}
            if q.ws is None:
                q.held.append((kind, payload))
            else:
                self.expect_frame(q, frame)
                self.drain(q)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99))
    def get_call(self, i: int) -> None:
        c = self.pick(self.calls, i)
        status, body = self.request("GET", f"/apiv2/calls/{c.call_id}")
        if c.ended:
            assert is_not_found(status, body), (status, body)
        elif is_not_found(status, body):
            self.gone(c, self.received, "get")
        else:
            assert status == 200, body
            self.check_summary(c, body)
            self.check_expires_at(c, body)

    @rule()
    def list_calls(self) -> None:
        status, body = self.request("GET", "/apiv2/calls?limit=500")
        assert status == 200, body
        listed = {s["call_id"]: s for s in body["calls"]}
        for c in self.calls:
            if c.ended:
                assert c.call_id not in listed
            elif c.call_id not in listed:
                self.gone(c, self.received, "list")
            else:
                self.check_summary(c, listed[c.call_id])
                self.check_expires_at(c, listed[c.call_id])

    @rule()
    def unknown_call(self) -> None:
        status, body = self.post(f"/apiv2/calls/{UNKNOWN_CALL}/join")
        assert is_not_found(status, body), (status, body)

    @precondition(lambda self: self.waits < MAX_WAITS and self.calls)
    @rule(i=st.integers(0, 99))
    def wait_for_expiry(self, i: int) -> None:
        """Let an idle call expire: it answers until its deadline, then 404, at most ``LATE`` late.

        Every other idle call whose deadline has surely passed by then must be gone too.
        """
        self.waits += 1
        if not self.idle():
            return
        c = self.pick(self.idle(), i)
        self.wait_gone(c, max(time.monotonic(), c.hi + TTL) + LATE)
        now = time.monotonic()
        for d in self.idle():
            if now > d.hi + TTL + SLACK:
                self.wait_gone(d, d.hi + TTL + LATE)

    # Invariant: every open socket got exactly the predicted frames -----------------------

    @invariant()
    def sockets_in_sync(self) -> None:
        for p in self.all_peers():
            if p.ws is None:
                continue
            if not p.seated or p.call.ended:
                self.read_expected(p.ws, p.expected)  # its farewell and close
                p.ws = None
                if not p.call.ended:
                    self.dropped.append(p.call)  # its disconnect still reaches the call
                continue
            p.ws.send_json({"type": "ping"})
            self.expect_frame(p, {"type": "pong"})
            self.read_expected(p.ws, p.expected)
        if self.dropped:
            self.sync_sockets()

    def teardown(self) -> None:
        for p in self.all_peers():
            if p.ws is not None:
                p.ws.close()
        for c in self.live():
            self.post(f"/apiv2/calls/{c.call_id}/end", c.seated[0].token)


def test_random_call_sequences_follow_the_rules(live_server: LiveServer) -> None:
    SignalingModel.server = live_server
    mark = live_server.mark()
    # max_examples comes from the Hypothesis profile (tests/conftest.py): a fixed set under CI=true.
    run_state_machine_as_test(SignalingModel, settings=settings(
        stateful_step_count=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
    ))
    assert not live_server.problems_since(mark), live_server.problems_since(mark)
    status, body, _ = http("GET", live_server.base_url + "/healthz")
    assert status == 200 and body["calls"] == {"waiting": 0, "active": 0}, body
