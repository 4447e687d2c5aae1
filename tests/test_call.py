"""The call state machine, driven directly: no event loop, no network."""

from __future__ import annotations

import copy
import json

import pytest

from signal_srv.call import (
    TRANSITIONS,
    Call,
    CallRules,
    Close,
    Connect,
    Disconnect,
    End,
    Event,
    Expire,
    Expiry,
    HeldBudget,
    Identify,
    Join,
    Notify,
    Leave,
    Receive,
    Remove,
    Restart,
    Send,
    Shutdown,
    Status,
    StatusChanged,
    is_expired,
)
from signal_srv.errors import BufferFull, CallEnded, CallFull, NoPeer, ParticipantNotFound, SignalError, Unauthorized
from signal_srv.messages import Ping, Relay, to_json
from signal_srv.peer_tokens import token_digest as d  # the call knows a peer token only by its digest

TTL = 10.0


RULES = CallRules(ttl=TTL, unclaimed_ttl=1000.0, departure_timeout=1000.0, hold_limit=3)


def relay(kind: str, payload: object) -> Relay:
    return Relay(kind, to_json(payload))


def make_call(participants: int = 1, rules: CallRules = RULES) -> Call:
    call = Call("c1", 0.0, rules)
    for i in range(participants):
        call.handle(Join(f"p{i}", d(f"t{i}")), 0.0)
    return call


def in_status(status: Status) -> Call:
    if status is Status.WAITING:
        return make_call(1)
    call = make_call(2)
    if status is Status.ENDED:
        call.handle(End(d("t0")), 1.0)
    return call


def sends(effects: list, conn: int) -> list[dict]:
    return [json.loads(e.text) for e in effects if isinstance(e, Send) and e.conn == conn]


ALL_EVENTS = [
    Join("new", d("tn")), Leave(d("t0")), End(d("t0")), End(None), Remove("p0"), Connect("p0", d("t0"), 1),
    Disconnect(1),
    Receive(1, Ping()), Identify(d("t0")), Expire(), Shutdown(), Restart(),
]


REFUSED = [(s, e) for s in Status for e in ALL_EVENTS if type(e) not in TRANSITIONS[s]]


@pytest.mark.parametrize(("status", "event"), REFUSED, ids=lambda v: getattr(v, "value", type(v).__name__))
def test_events_outside_the_table_are_refused_and_change_nothing(status: Status, event: object) -> None:
    call = in_status(status)
    before = (call.status, copy.deepcopy(call.participants))
    with pytest.raises(CallEnded):
        call.handle(event, 2.0)  # type: ignore[arg-type]
    assert (call.status, call.participants) == before


def test_ended_is_terminal() -> None:
    assert TRANSITIONS[Status.ENDED] == frozenset()


def test_first_join_is_host_second_is_guest_and_call_becomes_active() -> None:
    call = make_call(1)
    assert call.participant("p0").role == "host" and not call.participant("p0").polite
    effects = call.handle(Join("p1", d("t1")), 1.0)
    assert StatusChanged(Status.WAITING, Status.ACTIVE) in effects
    assert call.participant("p1").role == "guest" and call.participant("p1").polite
    assert call.status is Status.ACTIVE


def test_third_join_gets_call_full_and_changes_nothing() -> None:
    call = make_call(2)
    with pytest.raises(CallFull):
        call.handle(Join("p2", d("t2")), 1.0)
    assert list(call.participants) == ["p0", "p1"]
    assert call.status is Status.ACTIVE


def test_leave_of_active_call_returns_it_to_waiting_and_frees_the_slot() -> None:
    call = make_call(2)
    effects = call.handle(Leave(d("t1")), 1.0)
    assert StatusChanged(Status.ACTIVE, Status.WAITING) in effects
    assert list(call.participants) == ["p0"]
    call.handle(Join("p2", d("t2")), 2.0)
    assert call.participant("p2").role == "guest"


def test_host_slot_is_taken_by_the_next_joiner_when_the_host_left() -> None:
    call = make_call(2)
    call.handle(Leave(d("t0")), 1.0)
    call.handle(Join("p2", d("t2")), 2.0)
    assert call.participant("p2").role == "host"


def test_last_leave_ends_the_call() -> None:
    call = make_call(1)
    effects = call.handle(Leave(d("t0")), 1.0)
    assert effects[-1] == StatusChanged(Status.WAITING, Status.ENDED, "left")
    assert call.status is Status.ENDED and call.end_reason == "left"


@pytest.mark.parametrize("event", [Leave(d("wrong")), End(d("wrong")), Leave(d("")), End(d("t0\u00e9")),
                                   Leave(b"t0"), End(d("t0")[:-1]), Identify(d("t0")[::-1])])
def test_wrong_token_is_unauthorized(event: object) -> None:
    call = make_call(2)
    with pytest.raises(Unauthorized):
        call.handle(event, 1.0)  # type: ignore[arg-type]
    assert call.status is Status.ACTIVE and len(call.participants) == 2


def test_a_participant_is_known_by_its_token_digest_only() -> None:
    call = make_call(2)
    assert [p.token_digest for p in call.participants.values()] == [d("t0"), d("t1")]
    assert call.authenticate(d("t1")).peer_id == "p1"
    kept = repr(vars(call)) + "".join(repr(p) for p in call.participants.values())
    assert "t0'" not in kept and "t1'" not in kept


def test_end_closes_every_socket_with_call_ended() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)
    effects = call.handle(End(d("t1")), 2.0)
    for conn, seq in ((10, 2), (11, 1)):
        assert sends(effects, conn)[-1] == {"type": "call_ended", "call_id": "c1", "reason": "ended", "seq": seq}
        assert Close(conn, 1000, "ended") in effects
    assert effects[-1] == StatusChanged(Status.ACTIVE, Status.ENDED, "ended")


def test_connect_with_wrong_token_or_unknown_peer_is_unauthorized() -> None:
    call = make_call(2)
    for event in (Connect("p0", d("t1"), 1), Connect("nobody", d("t0"), 1)):
        with pytest.raises(Unauthorized):
            call.handle(event, 1.0)
    assert call.connected == 0


def test_connect_sends_state_to_every_connected_participant() -> None:
    call = make_call(2)
    first = call.handle(Connect("p0", d("t0"), 10), 1.0)
    assert sends(first, 10) == [{
        "type": "state", "call_id": "c1", "status": "active", "peer_id": "p0", "polite": False,
        "participants": {"count": 2, "connected": 1, "max": 2}, "event": "connected", "subject": "p0",
        "last_cseq": None, "seq": 0, "peer": {"peer_id": "p1", "identity": None, "name": None, "connected": False},
    }]
    second = call.handle(Connect("p1", d("t1"), 11), 1.0)
    assert [m["peer_id"] for m in sends(second, 10)] == ["p0"]
    assert [m["peer_id"] for m in sends(second, 11)] == ["p1"]
    assert "last_cseq" not in sends(second, 10)[0] and sends(second, 11)[0]["last_cseq"] is None
    assert all(m["subject"] == "p1" and m["participants"]["connected"] == 2 for m in sends(second, 10) + sends(second, 11))


def test_second_socket_of_a_peer_replaces_the_first_with_4409() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    effects = call.handle(Connect("p0", d("t0"), 20), 2.0)
    assert effects[0] == Close(10, 4409, "replaced")
    assert call.handle(Disconnect(10), 3.0) == []  # the replaced socket's close changes nothing
    assert call.participant("p0").conn == 20


def test_relay_goes_only_to_the_other_participant() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)
    effects = call.handle(Receive(10, relay("offer", {"sdp": "x"})), 2.0)
    assert [e.conn for e in effects] == [11]
    assert sends(effects, 11) == [{"type": "offer", "call_id": "c1", "from": "p0", "payload": {"sdp": "x"}, "seq": 1}]


def test_relay_without_other_participant_is_no_peer() -> None:
    call = make_call(1)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    with pytest.raises(NoPeer):
        call.handle(Receive(10, relay("offer", 1)), 2.0)


def test_relay_to_a_joined_but_unconnected_peer_is_held_in_order_up_to_the_limit() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    for i in range(3):
        assert call.handle(Receive(10, relay("candidate", i)), 2.0) == []
    with pytest.raises(BufferFull):
        call.handle(Receive(10, relay("candidate", 3)), 2.0)
    effects = call.handle(Connect("p1", d("t1"), 11), 3.0)
    delivered = sends(effects, 11)
    assert delivered[0]["type"] == "state"
    assert [(m["payload"], m["seq"]) for m in delivered[1:]] == [(0, 1), (1, 2), (2, 3)]


def test_held_messages_are_bounded_in_bytes_per_participant_and_per_budget() -> None:
    budget = HeldBudget(limit=2500)
    call = Call("c1", 0.0, CallRules(ttl=TTL, hold_bytes=1000), budget)
    other = Call("c2", 0.0, CallRules(ttl=TTL, hold_bytes=10000), budget)
    for c in (call, other):
        c.handle(Join("p0", d("t0")), 0.0)
        c.handle(Join("p1", d("t1")), 0.0)
        c.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Receive(10, relay("message", "x" * 400)), 2.0)
    call.handle(Receive(10, relay("message", "x" * 400)), 2.0)
    with pytest.raises(BufferFull, match="ws_buffer_bytes"):
        call.handle(Receive(10, relay("message", "x" * 400)), 2.0)
    other.handle(Receive(10, relay("message", "x" * 1200)), 2.0)
    with pytest.raises(BufferFull, match="held_bytes_total"):
        other.handle(Receive(10, relay("message", "x" * 400)), 2.0)
    delivered = sends(call.handle(Connect("p1", d("t1"), 11), 3.0), 11)
    assert [m["payload"] for m in delivered[1:]] == ["x" * 400] * 2
    other.handle(Receive(10, relay("message", "x" * 400)), 4.0)  # delivery freed the budget
    other.handle(Leave(d("t1")), 5.0)
    assert budget.used == 0  # and so does a leave (or the end of the call)


def test_held_messages_are_delivered_once() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Receive(10, relay("candidate", 0)), 2.0)
    assert [m.get("payload") for m in sends(call.handle(Connect("p1", d("t1"), 11), 3.0), 11)] == [None, 0]
    call.handle(Disconnect(11), 4.0)
    assert [m["type"] for m in sends(call.handle(Connect("p1", d("t1"), 12), 5.0), 12)] == ["state"]
    assert [m["type"] for m in sends(call.handle(Connect("p1", d("t1"), 13), 6.0), 13)] == ["state"]  # a replacement


def test_ping_is_answered_with_pong_to_the_sender_only() -> None:
    call = make_call(1)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    effects = call.handle(Receive(10, Ping()), 2.0)
    assert [e.conn for e in effects] == [10] and sends(effects, 10) == [{"type": "pong", "seq": 1}]


def test_traffic_from_a_detached_socket_is_refused() -> None:
    call = make_call(2)
    with pytest.raises(Unauthorized):
        call.handle(Receive(99, Ping()), 1.0)


def test_deadline_runs_only_without_connected_sockets() -> None:
    call = make_call(1)
    assert call.deadline() == TTL
    call.handle(Connect("p0", d("t0"), 10), 5.0)
    assert call.deadline() is None
    assert call.handle(Expire(), 1000.0) == []  # a live call never expires
    call.handle(Disconnect(10), 1000.0)
    assert call.deadline() == 1000.0 + TTL


def test_expire_ends_the_call_only_after_the_deadline() -> None:
    call = make_call(2)
    assert call.handle(Expire(), TTL - 0.1) == []
    assert call.status is Status.ACTIVE
    effects = call.handle(Expire(), TTL)
    assert effects[-1] == StatusChanged(Status.ACTIVE, Status.ENDED, "expired")


def test_activity_pushes_the_deadline() -> None:
    call = make_call(2)
    call.handle(Leave(d("t1")), 8.0)
    assert call.deadline() == 8.0 + TTL


def test_shutdown_sends_server_shutdown_and_closes_with_1001() -> None:
    call = make_call(1)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    effects = call.handle(Shutdown(), 2.0)
    assert sends(effects, 10) == [{"type": "server_shutdown", "seq": 1}]
    assert Close(10, 1001, "shutdown") in effects


def test_leave_closes_the_leavers_socket_and_tells_the_other() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)
    effects = call.handle(Leave(d("t1")), 2.0)
    assert sends(effects, 11)[-1]["type"] == "call_ended" and sends(effects, 11)[-1]["reason"] == "left"
    assert Close(11, 1000, "left") in effects
    state = sends(effects, 10)[-1]
    assert (state["event"], state["subject"], state["reason"], state["status"]) == ("left", "p1", "left", "waiting")


def test_seq_continues_across_reconnects() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Disconnect(10), 2.0)
    effects = call.handle(Connect("p0", d("t0"), 12), 3.0)
    assert sends(effects, 12)[0]["seq"] == 1


@pytest.mark.parametrize(("last", "now", "expired"), [(0.0, 9.9, False), (0.0, 10.0, True), (5.0, 14.0, False)])
def test_is_expired(last: float, now: float, expired: bool) -> None:
    assert is_expired(last, TTL, now) is expired


def test_every_refusal_is_a_signal_error() -> None:
    assert all(issubclass(e, SignalError) for e in (CallEnded, CallFull, NoPeer, BufferFull, Unauthorized))


TIMED = CallRules(ttl=1000.0, unclaimed_ttl=30.0, departure_timeout=10.0, max_duration=500.0, hold_limit=3)


def test_a_call_nobody_claimed_ends_as_unclaimed() -> None:
    call = make_call(1, TIMED)
    assert call.deadline() == 30.0
    assert call.handle(Expire(), 29.9) == []
    assert call.handle(Expire(), 30.0)[-1] == StatusChanged(Status.WAITING, Status.ENDED, "unclaimed")


def test_a_host_that_connected_claims_the_call() -> None:
    call = make_call(1, TIMED)
    call.handle(Connect("p0", d("t0"), 10), 5.0)
    assert call.claimed and call.deadline() == 500.0
    assert call.handle(Expire(), 31.0) == []


def test_a_participant_away_past_departure_timeout_leaves_and_frees_the_slot() -> None:
    call = make_call(1, TIMED)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Join("p1", d("t1")), 2.0)  # never connects: a ghost
    assert call.deadline() == 12.0
    effects = call.handle(Expire(), 12.0)
    state = sends(effects, 10)[-1]
    assert (state["event"], state["subject"], state["reason"], state["status"]) == ("left", "p1", "timeout", "waiting")
    assert Notify("participant_left", "p1", "timeout") in effects
    assert list(call.participants) == ["p0"] and call.status is Status.WAITING
    call.handle(Join("p2", d("t2")), 13.0)
    assert call.status is Status.ACTIVE


def test_a_reconnect_within_the_departure_window_keeps_the_slot() -> None:
    call = make_call(2, TIMED)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)
    call.handle(Disconnect(11), 2.0)
    call.handle(Connect("p1", d("t1"), 12), 11.9)
    assert call.handle(Expire(), 12.0) == [] and len(call.participants) == 2


def test_the_last_participant_timing_out_ends_the_call() -> None:
    call = make_call(1, TIMED)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Disconnect(10), 2.0)
    effects = call.handle(Expire(), 12.0)
    assert effects[-1] == StatusChanged(Status.WAITING, Status.ENDED, "timeout")


def test_max_duration_ends_even_a_live_call() -> None:
    call = make_call(2, TIMED)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)
    effects = call.handle(Expire(), 500.0)
    assert sends(effects, 10)[-1]["reason"] == "max_duration"
    assert effects[-1] == StatusChanged(Status.ACTIVE, Status.ENDED, "max_duration")


def _call_with(rules: CallRules, *events: tuple[Event, float]) -> Call:
    call = Call("c1", 0.0, rules)
    call.handle(Join("p0", d("t0")), 0.0)
    for event, now in events:
        call.handle(event, now)
    return call


EXPIRY = CallRules(ttl=100.0, unclaimed_ttl=30.0, departure_timeout=10.0, max_duration=500.0)


@pytest.mark.parametrize(("call", "expected"), [
    pytest.param(_call_with(EXPIRY), Expiry(30.0, "unclaimed"), id="nobody joined"),
    pytest.param(_call_with(EXPIRY, (Join("p1", d("t1")), 2.0)), Expiry(12.0, "timeout"), id="joined, no sockets"),
    pytest.param(_call_with(EXPIRY, (Connect("p0", d("t0"), 10), 1.0), (Join("p1", d("t1")), 2.0),
                            (Disconnect(10), 4.0)),
                 Expiry(14.0, "timeout"), id="the last departure ends it, not the first"),
    pytest.param(_call_with(EXPIRY, (Connect("p0", d("t0"), 10), 1.0), (Join("p1", d("t1")), 2.0)),
                 Expiry(500.0, "max_duration"), id="live, a ghost departs"),
    pytest.param(_call_with(CallRules(ttl=100.0, unclaimed_ttl=30.0, departure_timeout=10.0),
                            (Connect("p0", d("t0"), 10), 1.0), (Join("p1", d("t1")), 2.0)), None, id="live, no cap"),
    pytest.param(_call_with(CallRules(ttl=5.0, unclaimed_ttl=30.0)), Expiry(5.0, "expired"), id="idle ttl first"),
    pytest.param(_call_with(CallRules(ttl=5.0, departure_timeout=10.0), (Join("p1", d("t1")), 2.0)),
                 Expiry(7.0, "expired"), id="ttl from the last activity"),
    pytest.param(_call_with(CallRules(ttl=30.0, unclaimed_ttl=30.0)), Expiry(30.0, "unclaimed"), id="a tie"),
    pytest.param(_call_with(EXPIRY, (End(d("t0")), 1.0)), None, id="ended"),
])
def test_expiry_is_when_and_why_the_call_ends_if_nothing_happens(call: Call, expected: Expiry | None) -> None:
    assert call.expiry() == expected
    ended: Expiry | None = None  # what really happens when every later deadline passes with nothing else
    while ended is None and (due := call.deadline()) is not None:
        if any(isinstance(e, StatusChanged) and e.new is Status.ENDED for e in call.handle(Expire(), due)):
            ended = Expiry(due, call.end_reason or "")
    assert ended == expected


def test_lifecycle_notifications() -> None:
    call = make_call(1)
    assert Notify("participant_joined", "p1") in call.handle(Join("p1", d("t1")), 1.0)
    assert Notify("participant_left", "p1", "left") in call.handle(Leave(d("t1")), 2.0)
    assert Notify("call_ended", None, "ended") in call.handle(End(d("t0")), 3.0)


def test_identify_answers_only_for_a_participants_token() -> None:
    call = make_call(2)
    assert call.handle(Identify(d("t1")), 1.0) == []
    assert call.authenticate(d("t1")).peer_id == "p1"
    with pytest.raises(Unauthorized):
        call.handle(Identify(d("nope")), 1.0)


def connected_pair(rules: CallRules = RULES) -> Call:
    call = make_call(2, rules)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)  # p1 sees seq 0 (its state)
    return call


def test_a_resume_with_last_seq_replays_exactly_what_was_missed() -> None:
    call = connected_pair()
    for i in range(5):
        call.handle(Receive(10, relay("candidate", i)), 2.0)  # p1 gets seq 1..5
    call.handle(Disconnect(11), 3.0)
    call.handle(Receive(10, relay("candidate", 5)), 3.0)  # held while away
    delivered = sends(call.handle(Connect("p1", d("t1"), 12, last_seq=2), 4.0), 12)
    assert [(m["seq"], m.get("payload")) for m in delivered] == [
        (3, 2), (4, 3), (5, 4), (6, None), (7, 5)]
    assert delivered[3]["type"] == "state"


def test_a_resume_beyond_what_is_kept_fails_and_starts_fresh() -> None:
    call = connected_pair(CallRules(ttl=TTL, resume_limit=3))
    for i in range(6):
        call.handle(Receive(10, relay("candidate", i)), 2.0)
    delivered = sends(call.handle(Connect("p1", d("t1"), 12, last_seq=1), 3.0), 12)
    assert delivered[0]["type"] == "error" and delivered[0]["code"] == "resume_failed"
    assert [m["type"] for m in delivered[1:]] == ["state"]
    assert [m["seq"] for m in delivered] == [7, 8]


@pytest.mark.parametrize("last_seq", [-2, 99])
def test_an_impossible_last_seq_fails_the_resume(last_seq: int) -> None:
    call = connected_pair()
    delivered = sends(call.handle(Connect("p1", d("t1"), 12, last_seq=last_seq), 2.0), 12)
    assert delivered[0]["code"] == "resume_failed"


def test_resume_buffer_is_bounded_in_bytes() -> None:
    call = connected_pair(CallRules(ttl=TTL, resume_bytes=1000))
    for _ in range(10):
        call.handle(Receive(10, relay("message", "x" * 300)), 2.0)
    assert call.participant("p1").sent_bytes <= 1000


def test_state_shows_each_participant_the_other_with_identity_and_name() -> None:
    call = Call("c1", 0.0, RULES)
    call.handle(Join("p0", d("t0"), "alice@app", "Alice"), 0.0)
    alone = sends(call.handle(Connect("p0", d("t0"), 10), 1.0), 10)[0]
    assert "peer" not in alone and alone["peer_id"] == "p0"
    joined = call.handle(Join("p1", d("t1"), "bob@app", None), 1.0)
    assert Notify("participant_joined", "p1", None, "bob@app", None) in joined
    seen_by_host = sends(joined, 10)[0]
    assert (seen_by_host["peer_id"], seen_by_host["subject"]) == ("p0", "p1")
    assert seen_by_host["peer"] == {"peer_id": "p1", "identity": "bob@app", "name": None, "connected": False}
    seen_by_guest = sends(call.handle(Connect("p1", d("t1"), 11), 2.0), 11)[0]
    assert seen_by_guest["peer_id"] == "p1"
    assert seen_by_guest["peer"] == {"peer_id": "p0", "identity": "alice@app", "name": "Alice", "connected": True}


def test_remove_takes_a_participant_out_with_reason_removed() -> None:
    call = make_call(2)
    call.handle(Connect("p0", d("t0"), 10), 1.0)
    call.handle(Connect("p1", d("t1"), 11), 1.0)
    effects = call.handle(Remove("p1"), 2.0)
    assert sends(effects, 11)[-1]["type"] == "call_ended" and sends(effects, 11)[-1]["reason"] == "removed"
    assert Close(11, 1000, "removed") in effects
    left = sends(effects, 10)[-1]
    assert (left["event"], left["subject"], left["reason"], left["status"]) == ("left", "p1", "removed", "waiting")
    assert "peer" not in left
    assert Notify("participant_left", "p1", "removed") in effects
    assert list(call.participants) == ["p0"]
    with pytest.raises(ParticipantNotFound):
        call.handle(Remove("p1"), 3.0)
    call.handle(Remove("p0"), 3.0)
    assert call.status is Status.ENDED and call.end_reason == "removed"


def test_an_administrators_end_needs_no_peer_token() -> None:
    call = make_call(2)
    effects = call.handle(End(None), 1.0)
    assert effects[-1] == StatusChanged(Status.ACTIVE, Status.ENDED, "ended")


def numbered(kind: str, payload: object, cseq: int) -> Relay:
    return Relay(kind, to_json(payload), cseq)


def test_a_frame_whose_cseq_was_accepted_is_dropped_and_last_cseq_says_how_far() -> None:
    call = connected_pair()
    for cseq in (1, 2, 3):
        assert sends(call.handle(Receive(10, numbered("candidate", cseq, cseq)), 2.0), 11)
    call.handle(Disconnect(10), 3.0)
    state = sends(call.handle(Connect("p0", d("t0"), 12), 4.0), 12)[0]
    assert (state["event"], state["subject"], state["last_cseq"]) == ("connected", "p0", 3)
    for cseq in (2, 3):  # resent after the reconnect: accepted before, so dropped
        assert call.handle(Receive(12, numbered("candidate", cseq, cseq)), 5.0) == []
    relayed = sends(call.handle(Receive(12, numbered("candidate", 4, 4)), 5.0), 11)
    assert [m["payload"] for m in relayed] == [4] and "cseq" not in relayed[0]
    assert call.participant("p0").cseq == 4 and call.participant("p1").cseq is None


def test_frames_without_cseq_are_never_dropped_and_a_refused_frame_is_not_accepted() -> None:
    call = connected_pair()
    call.handle(Receive(10, numbered("message", "a", 5)), 2.0)
    assert sends(call.handle(Receive(10, relay("message", "b")), 2.0), 11)  # no cseq: as ever
    assert call.participant("p0").cseq == 5
    lone = make_call(1)
    lone.handle(Connect("p0", d("t0"), 10), 1.0)
    with pytest.raises(NoPeer):
        lone.handle(Receive(10, numbered("offer", "o", 1)), 2.0)
    assert lone.participant("p0").cseq is None
    assert sends(lone.handle(Receive(10, Ping(1)), 2.0), 10)[0]["type"] == "pong"
    assert lone.handle(Receive(10, Ping(1)), 2.0) == []


def test_restart_tells_every_socket_to_reconnect_and_keeps_the_call() -> None:
    call = connected_pair()
    effects = call.handle(Restart(), 2.0)
    assert sends(effects, 10) == [{"type": "server_shutdown", "reconnect": True, "seq": 2}]
    assert sends(effects, 11) == [{"type": "server_shutdown", "reconnect": True, "seq": 1}]
    assert Close(10, 1012, "server restart") in effects and Close(11, 1012, "server restart") in effects
    assert call.status is Status.ACTIVE and call.connected == 0
    assert [p.away_since for p in call.participants.values()] == [2.0, 2.0]
    resumed = sends(call.handle(Connect("p1", d("t1"), 12, last_seq=0), 3.0), 12)
    assert [(m["type"], m["seq"]) for m in resumed] == [("server_shutdown", 1), ("state", 2)]


def test_restart_of_one_socket_tells_the_other_participant_it_disconnected() -> None:
    call = connected_pair()
    effects = call.handle(Restart(11), 2.0)
    assert [m["type"] for m in sends(effects, 11)] == ["server_shutdown"]
    state = sends(effects, 10)[0]
    assert (state["event"], state["subject"], state["participants"]["connected"]) == ("disconnected", "p1", 1)
    assert call.handle(Restart(99), 2.0) == []
