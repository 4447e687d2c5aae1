"""A hypothesis state machine drives random create/join/leave/end/connect/disconnect/relay
sequences against a live server process and checks every answer against a small model.

The model is the README's rules, written independently of ``call.py``: two seats per call,
the first participant (or the next joiner after the host left) is the impolite host, a third
join is ``409 call_full``, a wrong token is ``401``, an ended call is ``404`` for everything
and ``4404`` on a socket, the last one out ends the call, relays go to the other participant
only (held while it is not connected), and every server frame carries the next ``seq`` of
its recipient. After each step every open socket is synchronised with a ping: the frames
before its ``pong`` must be exactly the ones the model predicts, in order.

Expiry is not modelled: the TTL timers (``call_ttl``, ``unclaimed_ttl``,
``departure_timeout``) are wall-time deadlines, so a random sequence could only observe them
by sleeping or polling. They keep their defaults (minutes), which no run comes near.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.live_server import Closed, LiveServer, SyncSocket, http, live_server_fixture

live_server = live_server_fixture()

MAX_LIVE_CALLS = 3
UNKNOWN_CALL = "A" * 22


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
    peers: list[Peer] = field(default_factory=list)
    ended: bool = False

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


class SignalingModel(RuleBasedStateMachine):
    server: LiveServer  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[MCall] = []
        self.counter = itertools.count()

    # Helpers ---------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.server.base_url + path

    def post(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        status, body, _ = http("POST", self.url(path), headers=headers)
        return status, body

    def live(self) -> list[MCall]:
        return [c for c in self.calls if not c.ended]

    def all_peers(self) -> list[Peer]:
        return [p for c in self.calls for p in c.peers]

    def pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

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

    @precondition(lambda self: len(self.live()) < MAX_LIVE_CALLS)
    @rule()
    def create(self) -> None:
        status, body = self.post("/apiv2/calls")
        assert status == 201, body
        c = MCall(body["call_id"])
        self.calls.append(c)
        self.seat(c, body)
        self.check_summary(c, body)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99))
    def join(self, i: int) -> None:
        c = self.pick(self.calls, i)
        status, body = self.post(f"/apiv2/calls/{c.call_id}/join")
        if c.ended:
            assert (status, body["error"]["code"]) == (404, "call_not_found")
        elif len(c.seated) >= 2:
            assert (status, body["error"]["code"]) == (409, "call_full")
        else:
            assert status == 200, body
            p = self.seat(c, body)
            self.check_summary(c, body)
            self.state(c, "joined", p)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), action=st.sampled_from(["leave", "end"]))
    def leave_or_end(self, i: int, action: str) -> None:
        p = self.pick(self.all_peers(), i)
        c = p.call
        status, body = self.post(f"/apiv2/calls/{c.call_id}/{action}", p.token)
        if c.ended:
            assert (status, body["error"]["code"]) == (404, "call_not_found")
            return
        if not p.seated:
            assert (status, body["error"]["code"]) == (401, "unauthorized")
            return
        assert status == 200, body
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
            self.state(c, "left", p)

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99), j=st.integers(0, 99))
    def wrong_token(self, i: int, j: int) -> None:
        """A token of another call (or none) is 401 on a live call, 404 on an ended one."""
        c = self.pick(self.calls, i)
        others = [p for p in self.all_peers() if p.call is not c]
        token = self.pick(others, j).token if others else None
        status, body = self.post(f"/apiv2/calls/{c.call_id}/end", token)
        if c.ended and token is not None:
            assert (status, body["error"]["code"]) == (404, "call_not_found")
        else:
            assert (status, body["error"]["code"]) == (401, "unauthorized")

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 99))
    def connect(self, i: int) -> None:
        p = self.pick(self.all_peers(), i)
        c = p.call
        ws = SyncSocket.for_peer(self.server, c.call_id, p.peer_id, p.token)
        if c.ended or not p.seated:
            closed = ws.wait_closed()
            assert closed.code == (4404 if c.ended else 4401), closed
            return
        if p.ws is not None:
            self.drain(p)
            self.expect_close(p, 4409)
            self.read_expected(p.ws, p.expected)
        p.ws = ws
        self.state(c, "connected", p)
        for kind, payload in p.held:
            self.expect_frame(p, {"type": kind, "call_id": c.call_id, "payload": payload})
        p.held.clear()
        for q in c.connected:
            self.drain(q)

    @precondition(lambda self: any(p.ws is not None for p in self.all_peers()))
    @rule(i=st.integers(0, 99))
    def disconnect(self, i: int) -> None:
        p = self.pick([p for p in self.all_peers() if p.ws is not None], i)
        self.drain(p)
        p.ws.close()
        p.ws = None
        self.state(p.call, "disconnected", p)
        for q in p.call.connected:
            self.drain(q)

    @precondition(lambda self: any(p.ws is not None for p in self.all_peers()))
    @rule(i=st.integers(0, 99), kind=st.sampled_from(["offer", "answer", "candidate", "bye", "message"]))
    def relay(self, i: int, kind: str) -> None:
        p = self.pick([p for p in self.all_peers() if p.ws is not None], i)
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
        status, body, _ = http("GET", self.url(f"/apiv2/calls/{c.call_id}"))
        if c.ended:
            assert (status, body["error"]["code"]) == (404, "call_not_found")
        else:
            assert status == 200, body
            self.check_summary(c, body)
            assert (body["expires_at"] is None) == bool(c.connected), body

    @rule()
    def list_calls(self) -> None:
        status, body, _ = http("GET", self.url("/apiv2/calls?limit=500"))
        assert status == 200, body
        listed = {s["call_id"]: s for s in body["calls"]}
        for c in self.calls:
            if c.ended:
                assert c.call_id not in listed
            else:
                self.check_summary(c, listed[c.call_id])

    @rule()
    def unknown_call(self) -> None:
        status, body = self.post(f"/apiv2/calls/{UNKNOWN_CALL}/join")
        assert (status, body["error"]["code"]) == (404, "call_not_found")

    # Invariant: every open socket got exactly the predicted frames -----------------------

    @invariant()
    def sockets_in_sync(self) -> None:
        for p in self.all_peers():
            if p.ws is None:
                continue
            if not p.seated or p.call.ended:
                self.read_expected(p.ws, p.expected)  # its farewell and close
                p.ws = None
                continue
            p.ws.send_json({"type": "ping"})
            self.expect_frame(p, {"type": "pong"})
            self.read_expected(p.ws, p.expected)

    def teardown(self) -> None:
        for p in self.all_peers():
            if p.ws is not None:
                p.ws.close()
        for c in self.live():
            self.post(f"/apiv2/calls/{c.call_id}/end", c.seated[0].token)


def test_random_call_sequences_follow_the_rules(live_server: LiveServer) -> None:
    SignalingModel.server = live_server
    mark = live_server.mark()
    run_state_machine_as_test(SignalingModel, settings=settings(
        max_examples=30, stateful_step_count=20, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))
    assert not live_server.problems_since(mark), live_server.problems_since(mark)
    status, body, _ = http("GET", live_server.base_url + "/healthz")
    assert status == 200 and body["calls"] == {"waiting": 0, "active": 0}, body
