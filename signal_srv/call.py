"""The rules of one call, as a pure synchronous state machine (no I/O, no clock, no asyncio).

Rules:
- A call holds at most ``max_participants`` (2) participants; one more join gets ``call_full``.
- Status follows the participants: ``waiting`` with fewer than two, ``active`` with two or
  more. ``ended`` is terminal: every event is refused with ``CallEnded``.
- Leaving frees the slot; the last participant out ends the call; any participant may end it.
  An administrator (authorized at the edge) may end the call or remove a participant, which
  leaves with reason ``removed``.
- A participant may carry who it is in the application (``identity``, ``name``, from the
  token it joined with); ``state`` frames show each participant the other one as ``peer``.
- A participant proves who it is with its peer token, which the call knows only by its
  SHA-256 digest (``peer_tokens.token_digest``, taken at the edge); digests are compared
  in constant time.
- A relayed message goes to every other participant, never to the sender: at once to a
  connected socket, or held in order for one that has joined but is not connected, and
  delivered when it connects. Held messages are kept as JSON text, bounded per participant
  (``hold_limit`` messages, ``hold_bytes`` bytes) and per process (``HeldBudget``); past a
  bound the new message is refused with ``BufferFull`` and nothing already held is lost.
- Every frame sent to a participant carries ``seq``, increasing by one per participant and
  continuing across its reconnects. The last frames sent are kept (``resume_limit``,
  ``resume_bytes``) so that a socket reconnecting with ``last_seq`` gets what it missed.
- A participant may number its own frames with ``cseq``. The call remembers the highest
  ``cseq`` it accepted from each participant, tells it as ``last_cseq`` in the ``state``
  frame of every connect, and drops a frame whose ``cseq`` it already accepted: a client
  that resends what it is not sure arrived never gets it relayed twice.
- ``Restart`` (the node running the call stops, and another carries the call on): the
  affected sockets get ``server_shutdown`` with ``reconnect`` and close with 1012; their
  participants keep their slots, as after any disconnect.
- Timers, all on one monotonic deadline (``Call.deadline``):
  - ``ttl``: runs only while no participant has a connected socket and nothing happens,
    so a live call whose sockets answer heartbeats never expires (reason ``expired``);
  - ``unclaimed_ttl``: a call that nobody joined and whose host never connected
    (``unclaimed``);
  - ``departure_timeout``: once the call is claimed, a participant without a connected
    socket for this long leaves (``state`` with ``event: left, reason: timeout``);
  - ``max_duration`` (0: none): a hard cap (``max_duration``).
  ``Call.expiry`` says which of them would end the call first, and when, if nothing happened.

``Call.handle(event, now)`` validates first and raises a ``SignalError`` without changing
anything, or changes the call and returns the effects for the actor to carry out.
"""

from __future__ import annotations

import hmac
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from signal_srv import messages
from signal_srv.errors import BufferFull, CallEnded, CallFull, NoPeer, ParticipantNotFound, Unauthorized
from signal_srv.messages import Ping, Relay

__all__ = [
    "TRANSITIONS",
    "Call",
    "CallRules",
    "Close",
    "Connect",
    "Disconnect",
    "Effect",
    "End",
    "Event",
    "Expire",
    "Expiry",
    "HeldBudget",
    "Identify",
    "Join",
    "Leave",
    "Notify",
    "Participant",
    "Receive",
    "Remove",
    "Restart",
    "Send",
    "Shutdown",
    "Status",
    "StatusChanged",
    "is_expired",
]


class Status(str, Enum):
    WAITING = "waiting"
    ACTIVE = "active"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class CallRules:
    """Limits and timeouts (seconds) shared by every call of a server."""

    ttl: float = 3600.0
    unclaimed_ttl: float = 300.0
    departure_timeout: float = 60.0
    max_duration: float = 0.0
    max_participants: int = 2
    hold_limit: int = 64
    hold_bytes: int = 262144
    held_bytes_total: int = 128 * 1024 * 1024
    resume_limit: int = 64
    resume_bytes: int = 262144


class HeldBudget:
    """Bytes of messages held for absent participants, across every call that shares it."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit


# Events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """A new participant; ``identity`` and ``name`` come from its access token (None without)."""

    peer_id: str
    token_digest: bytes
    identity: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    token_digest: bytes


@dataclass(frozen=True, slots=True)
class End:
    """End the call: by the participant whose token has this digest, or (None) by an administrator."""

    token_digest: bytes | None


@dataclass(frozen=True, slots=True)
class Remove:
    """An administrator (authorized at the edge) removes participant ``peer_id``."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class Connect:
    peer_id: str
    token_digest: bytes
    conn: int
    last_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Disconnect:
    conn: int


@dataclass(frozen=True, slots=True)
class Receive:
    conn: int
    message: Relay | Ping


@dataclass(frozen=True, slots=True)
class Identify:
    """Which participant's token has this digest? (For requests that need a peer's identity.)"""

    token_digest: bytes


@dataclass(frozen=True, slots=True)
class Expire:
    """A deadline may have passed; the call checks which, if any."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The server is stopping."""


@dataclass(frozen=True, slots=True)
class Restart:
    """The call goes on on another node: socket ``conn`` (None: every socket) must reconnect."""

    conn: int | None = None


Event = Union[Join, Leave, End, Remove, Connect, Disconnect, Receive, Identify, Expire, Shutdown, Restart]

# Effects -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    conn: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StatusChanged:
    old: Status
    new: Status
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Notify:
    """A lifecycle event for observers (webhooks, logs): joined, left, ended."""

    event: str
    peer_id: str | None = None
    reason: str | None = None
    identity: str | None = None
    name: str | None = None


Effect = Union[Send, Close, StatusChanged, Notify]

_ANY_EVENT = frozenset({Join, Leave, End, Remove, Connect, Disconnect, Receive, Identify, Expire, Shutdown, Restart})

# Which events each status accepts; anything else is refused and changes nothing.
# waiting --2nd join--> active --leave--> waiting; either --end/expire/last leave/shutdown--> ended
TRANSITIONS: dict[Status, frozenset[type]] = {
    Status.WAITING: _ANY_EVENT,
    Status.ACTIVE: _ANY_EVENT,
    Status.ENDED: frozenset(),
}

# RFC 6455 close codes and the application codes (4xxx) the README documents.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
SERVICE_RESTART = 1012
REPLACED = 4409


def is_expired(last_activity: float, ttl: float, now: float) -> bool:
    """True once ``ttl`` seconds have passed since ``last_activity`` (monotonic seconds)."""
    return now - last_activity >= ttl


@dataclass(frozen=True, slots=True)
class Expiry:
    """The moment (monotonic seconds) a call would end if nothing happened, and the end reason."""

    at: float
    reason: str


@dataclass(slots=True)
class Participant:
    peer_id: str
    token_digest: bytes  # SHA-256 of its peer token (peer_tokens.token_digest): the token itself is never kept
    role: str
    away_since: float | None
    identity: str | None = None
    name: str | None = None
    conn: int | None = None
    seq: int = 0
    cseq: int | None = None  # the highest cseq accepted from this participant
    # Created on first use: most participants never need them (a deque costs ~760 bytes).
    held: deque[str] | None = None  # relayed frames without their seq, stamped on delivery
    held_bytes: int = 0
    sent: deque[tuple[int, str]] | None = None
    sent_bytes: int = 0

    @property
    def polite(self) -> bool:
        """Perfect negotiation: the host is impolite, everyone else yields."""
        return self.role != "host"

    def missed_since(self, last_seq: int) -> list[str] | None:
        """The frames sent after ``last_seq``, or None if some of them are no longer kept."""
        if not -1 <= last_seq < self.seq:
            return None
        missed = [text for seq, text in self.sent or () if seq > last_seq]
        if len(missed) != self.seq - 1 - last_seq:
            return None
        return missed


class Call:
    """One call's participants, status and deadline; see the module docstring for the rules."""

    def __init__(
        self, call_id: str, now: float, rules: CallRules = CallRules(), held_budget: HeldBudget | None = None
    ) -> None:
        self.call_id = call_id
        self.rules = rules
        self.held_budget = held_budget if held_budget is not None else HeldBudget(rules.held_bytes_total)
        self.status = Status.WAITING
        self.end_reason: str | None = None
        self.created = now
        self.last_activity = now
        self.claimed = False
        self.participants: dict[str, Participant] = {}
        self._by_conn: dict[int, Participant] = {}
        self._relay_fields: dict[str, str] = {}  # peer_id -> messages.relay_fields(), made on its first relay

    # Queries ---------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        return len(self._by_conn)

    @property
    def max_participants(self) -> int:
        return self.rules.max_participants

    def participant(self, peer_id: str) -> Participant:
        return self.participants[peer_id]

    def expiry(self) -> Expiry | None:
        """When and why the call would end if nothing happened from now on, or None if it would not.

        The earliest timer that ends the whole call: ``max_duration`` (even a live call),
        ``unclaimed``, and, while no socket is connected, ``expired`` (the inactivity TTL)
        and ``timeout`` (once the last absent participant's departure is due). On a tie,
        the reason is the one ``Expire`` reports.
        """
        at, reason = self._earliest_end()
        return Expiry(at, reason) if reason else None

    def deadline(self) -> float | None:
        """The next moment a timer is due (monotonic seconds): the call's expiry or a departure, or None."""
        at, _ = self._earliest_end()
        if self.claimed:
            for p in self.participants.values():
                if p.away_since is not None:
                    at = min(at, p.away_since + self.rules.departure_timeout)
        return None if at == math.inf else at

    def _earliest_end(self) -> tuple[float, str]:
        """``expiry`` without the allocation (it runs before every envelope): ``(inf, "")`` for none."""
        if self.status is Status.ENDED:
            return math.inf, ""
        rules = self.rules
        at, reason = math.inf, ""  # a later timer wins only if strictly earlier: ties keep Expire's order
        if rules.max_duration:
            at, reason = self.created + rules.max_duration, "max_duration"
        if not self.claimed and self.created + rules.unclaimed_ttl < at:
            at, reason = self.created + rules.unclaimed_ttl, "unclaimed"
        if not self._by_conn:
            if self.last_activity + rules.ttl < at:
                at, reason = self.last_activity + rules.ttl, "expired"
            if self.claimed:
                last_away = max(p.away_since for p in self.participants.values() if p.away_since is not None)
                if last_away + rules.departure_timeout < at:
                    at, reason = last_away + rules.departure_timeout, "timeout"
        return at, reason

    # Transitions -----------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply one event. Raises a ``SignalError`` and changes nothing if it is refused."""
        if type(event) not in TRANSITIONS[self.status]:
            raise CallEnded()
        effects: list[Effect] = getattr(self, _HANDLERS[type(event)])(event, now)
        if type(event) is not Expire:
            self.last_activity = now
        return effects

    def _join(self, event: Join, now: float) -> list[Effect]:
        if len(self.participants) >= self.rules.max_participants:
            raise CallFull()
        has_host = any(p.role == "host" for p in self.participants.values())
        joiner = Participant(event.peer_id, event.token_digest, "guest" if has_host else "host", away_since=now,
                             identity=event.identity, name=event.name)
        self.participants[joiner.peer_id] = joiner
        if len(self.participants) > 1:
            self._claim(now)
        effects = self._update_status()
        effects.append(Notify("participant_joined", joiner.peer_id, None, joiner.identity, joiner.name))
        effects += self._broadcast_state("joined", joiner.peer_id)
        return effects

    def _leave(self, event: Leave, now: float) -> list[Effect]:
        return self._remove(self.authenticate(event.token_digest), "left")

    def _end_by(self, event: End, now: float) -> list[Effect]:
        if event.token_digest is not None:
            self.authenticate(event.token_digest)
        return self._end("ended")

    def _remove_by_admin(self, event: Remove, now: float) -> list[Effect]:
        p = self.participants.get(event.peer_id)
        if p is None:
            raise ParticipantNotFound()
        return self._remove(p, "removed")

    def _identify(self, event: Identify, now: float) -> list[Effect]:
        self.authenticate(event.token_digest)
        return []

    def _connect(self, event: Connect, now: float) -> list[Effect]:
        p = self.participants.get(event.peer_id)
        if p is None or not hmac.compare_digest(p.token_digest, event.token_digest):
            raise Unauthorized("unknown peer or wrong token")
        effects: list[Effect] = []
        if p.conn is not None:
            del self._by_conn[p.conn]
            effects.append(Close(p.conn, REPLACED, "replaced"))
        p.conn, p.away_since = event.conn, None
        self._by_conn[event.conn] = p
        self._claim(now)
        if event.last_seq is not None:
            missed = p.missed_since(event.last_seq)
            if missed is None:
                effects.append(self._deliver(p, messages.error(
                    "resume_failed", f"frames after seq {event.last_seq} are no longer kept; renegotiate")))
            else:
                effects += [Send(event.conn, text) for text in missed]
        effects += [self._deliver(q, self.state_for(q, "connected", p.peer_id, last_cseq=q is p))
                    for q in self.participants.values() if q.conn is not None]
        effects += [self._deliver_frame(p, frame) for frame in self._take_held(p)]
        return effects

    def _disconnect(self, event: Disconnect, now: float) -> list[Effect]:
        p = self._by_conn.pop(event.conn, None)
        if p is None:
            return []  # a replaced or already closed socket
        p.conn, p.away_since = None, now
        return self._broadcast_state("disconnected", p.peer_id)

    def _receive(self, event: Receive, now: float) -> list[Effect]:
        sender = self._by_conn.get(event.conn)
        if sender is None:
            raise Unauthorized("this socket is no longer attached to the call")
        cseq = event.message.cseq
        if cseq is not None and sender.cseq is not None and cseq <= sender.cseq:
            return []  # accepted before (a client resending after a reconnect): drop it
        if isinstance(event.message, Ping):
            sender.cseq = cseq if cseq is not None else sender.cseq
            return [self._deliver(sender, messages.pong())]
        others = [p for p in self.participants.values() if p is not sender]
        if not others:
            raise NoPeer()
        fields = self._relay_fields.get(sender.peer_id)
        if fields is None:
            fields = self._relay_fields[sender.peer_id] = messages.relay_fields(self.call_id, sender.peer_id)
        frame = messages.relayed(event.message, self.call_id, sender.peer_id, fields)
        if len(others) == 1 and others[0].conn is not None:  # a 1:1 call with both sockets connected
            if cseq is not None:
                sender.cseq = cseq
            return [self._deliver_frame(others[0], frame)]
        absent = [p for p in others if p.conn is None]
        if absent:
            self._check_room(absent, len(frame))
        if cseq is not None:
            sender.cseq = cseq
        effects: list[Effect] = []
        for p in others:
            if p.conn is None:
                self._hold(p, frame)
            else:
                effects.append(self._deliver_frame(p, frame))
        return effects

    def _expire(self, event: Expire, now: float) -> list[Effect]:
        rules = self.rules
        if rules.max_duration and now >= self.created + rules.max_duration:
            return self._end("max_duration")
        if not self.claimed and now >= self.created + rules.unclaimed_ttl:
            return self._end("unclaimed")
        if not self._by_conn and is_expired(self.last_activity, rules.ttl, now):
            return self._end("expired")
        effects: list[Effect] = []
        if self.claimed:
            for p in list(self.participants.values()):
                if p.away_since is not None and now >= p.away_since + rules.departure_timeout:
                    effects += self._remove(p, "timeout")
                    if self.status is Status.ENDED:
                        break
        return effects

    def _shutdown(self, event: Shutdown, now: float) -> list[Effect]:
        return self._end("shutdown", messages.server_shutdown(), GOING_AWAY)

    def _restart(self, event: Restart, now: float) -> list[Effect]:
        leaving = [p for p in self.participants.values()
                   if p.conn is not None and event.conn in (None, p.conn)]
        effects: list[Effect] = []
        for p in leaving:
            effects += self._close(p, messages.server_shutdown(reconnect=True), SERVICE_RESTART, "server restart")
            p.away_since = now
        for p in leaving:
            effects += self._broadcast_state("disconnected", p.peer_id)
        return effects

    # Helpers ---------------------------------------------------------------------------

    def drop_held(self) -> None:
        """Free the bytes of every message held in this call (it has ended or crashed)."""
        for p in self.participants.values():
            self._take_held(p)

    def _check_room(self, absent: list[Participant], size: int) -> None:
        """Raise ``BufferFull`` unless a frame of ``size`` can be held for each of ``absent``."""
        rules = self.rules
        for p in absent:
            if p.held and len(p.held) >= rules.hold_limit:
                raise BufferFull(f"{rules.hold_limit} messages are already held for the other participant"
                                 " (ws_buffer_limit)")
            if p.held_bytes + size > rules.hold_bytes:
                raise BufferFull(f"{p.held_bytes} bytes are already held for the other participant; this message"
                                 f" would pass ws_buffer_bytes ({rules.hold_bytes})")
        if not self.held_budget.fits(size * len(absent)):
            raise BufferFull("the server already holds as many bytes for absent participants as it may"
                             " (held_bytes_total); retry later")

    def _hold(self, p: Participant, frame: str) -> None:
        if p.held is None:
            p.held = deque()
        p.held.append(frame)
        p.held_bytes += len(frame)
        self.held_budget.used += len(frame)

    def _take_held(self, p: Participant) -> deque[str]:
        """Empty ``p``'s held messages, freeing their bytes; return them in order."""
        held, p.held = p.held or deque(), None
        self.held_budget.used -= p.held_bytes
        p.held_bytes = 0
        return held

    def authenticate(self, digest: bytes) -> Participant:
        """The participant whose token has ``digest`` (compared in constant time), or ``Unauthorized``."""
        found = None
        for p in self.participants.values():
            if hmac.compare_digest(p.token_digest, digest):
                found = p
        if found is None:
            raise Unauthorized()
        return found

    def _claim(self, now: float) -> None:
        """Someone connected or joined: from now on absent participants are timed out."""
        if not self.claimed:
            self.claimed = True
            for p in self.participants.values():
                if p.away_since is not None:
                    p.away_since = max(p.away_since, now)

    def _remove(self, leaver: Participant, reason: str) -> list[Effect]:
        effects = self._close(leaver, messages.call_ended(self.call_id, reason), NORMAL_CLOSURE, reason)
        self._take_held(leaver)
        del self.participants[leaver.peer_id]
        self._relay_fields.pop(leaver.peer_id, None)
        effects.append(Notify("participant_left", leaver.peer_id, reason, leaver.identity, leaver.name))
        if not self.participants:
            return effects + self._end(reason)
        effects += self._update_status()
        effects += self._broadcast_state("left", leaver.peer_id, reason)
        return effects

    def _update_status(self) -> list[Effect]:
        new = Status.ACTIVE if len(self.participants) >= 2 else Status.WAITING
        if new is self.status:
            return []
        old, self.status = self.status, new
        return [StatusChanged(old, new)]

    def _end(
        self,
        reason: str,
        farewell: dict[str, Any] | None = None,
        code: int = NORMAL_CLOSURE,
    ) -> list[Effect]:
        effects: list[Effect] = []
        for p in self.participants.values():
            effects += self._close(p, farewell or messages.call_ended(self.call_id, reason), code, reason)
        self.drop_held()
        old, self.status, self.end_reason = self.status, Status.ENDED, reason
        effects += [Notify("call_ended", None, reason), StatusChanged(old, Status.ENDED, reason)]
        return effects

    def _close(self, p: Participant, farewell: dict[str, Any], code: int, reason: str) -> list[Effect]:
        if p.conn is None:
            return []
        send = self._deliver(p, farewell)
        del self._by_conn[send.conn]
        p.conn = None
        return [send, Close(send.conn, code, reason)]

    def _deliver(self, p: Participant, message: dict[str, Any]) -> Send:
        return self._deliver_frame(p, messages.to_json(message))

    def _deliver_frame(self, p: Participant, frame: str) -> Send:
        """Stamp ``frame`` with the participant's next seq, keep it for a resume, send it."""
        assert p.conn is not None
        seq, p.seq = p.seq, p.seq + 1
        text = messages.with_seq(frame, seq)
        if p.sent is None:
            p.sent = deque()
        p.sent.append((seq, text))
        p.sent_bytes += len(text)
        while len(p.sent) > self.rules.resume_limit or p.sent_bytes > self.rules.resume_bytes:
            p.sent_bytes -= len(p.sent.popleft()[1])
        return Send(p.conn, text)

    def _broadcast_state(self, event: str, subject: str, reason: str | None = None) -> list[Effect]:
        return [self._deliver(p, self.state_for(p, event, subject, reason))
                for p in self.participants.values() if p.conn is not None]

    def state_for(
        self, p: Participant, event: str, subject: str, reason: str | None = None, last_cseq: bool = False
    ) -> dict[str, Any]:
        """The ``state`` frame as participant ``p`` sees it.

        ``peer_id`` is always its own; ``peer`` (present once someone else has joined) is the
        other participant: the first other one to have joined, in a call of more than two.
        ``last_cseq``: add the highest ``cseq`` accepted from ``p`` (its own connect's state).
        """
        state: dict[str, Any] = {
            "type": "state",
            "call_id": self.call_id,
            "status": self.status.value,
            "peer_id": p.peer_id,
            "polite": p.polite,
            "participants": {
                "count": len(self.participants),
                "connected": len(self._by_conn),
                "max": self.rules.max_participants,
            },
            "event": event,
            "subject": subject,
        }
        if reason is not None:
            state["reason"] = reason
        if last_cseq:
            state["last_cseq"] = p.cseq
        other = next((o for o in self.participants.values() if o is not p), None)
        if other is not None:
            state["peer"] = {"peer_id": other.peer_id, "identity": other.identity, "name": other.name,
                             "connected": other.conn is not None}
        return state


_HANDLERS: dict[type, str] = {
    Join: "_join",
    Leave: "_leave",
    End: "_end_by",
    Remove: "_remove_by_admin",
    Connect: "_connect",
    Disconnect: "_disconnect",
    Receive: "_receive",
    Identify: "_identify",
    Expire: "_expire",
    Shutdown: "_shutdown",
    Restart: "_restart",
}
