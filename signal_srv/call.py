"""The rules of one call, as a pure synchronous state machine (no I/O, no clock, no asyncio).

Rules:
- A call holds at most ``max_participants`` (2) participants; one more join gets ``call_full``.
- Status follows the participants: ``waiting`` with fewer than two, ``active`` with two or
  more. ``ended`` is terminal: every event is refused with ``CallEnded``.
- Leaving frees the slot; the last participant out ends the call; any participant may end it.
- A relayed message goes to every other participant, never to the sender: at once to a
  connected socket, or held in order (up to ``hold_limit``) for one that has joined but is
  not connected, and delivered when it connects.
- Every frame sent to a participant carries ``seq``, increasing by one per participant.
- The inactivity TTL runs only while no participant has a connected socket: a live call
  whose sockets answer heartbeats never expires.

``Call.handle(event, now)`` validates first and raises a ``SignalError`` without changing
anything, or changes the call and returns the effects for the actor to carry out.
"""

from __future__ import annotations

import hmac
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from signal_srv import messages
from signal_srv.errors import (
    BufferFull,
    CallEnded,
    CallFull,
    NoPeer,
    SignalError,
    Unauthorized,
)
from signal_srv.messages import Ping, Relay

__all__ = [
    "TRANSITIONS",
    "Call",
    "Close",
    "Connect",
    "Disconnect",
    "Effect",
    "End",
    "Event",
    "Expire",
    "Join",
    "Leave",
    "Participant",
    "Receive",
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


# Events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    peer_id: str
    token: str


@dataclass(frozen=True, slots=True)
class Leave:
    token: str


@dataclass(frozen=True, slots=True)
class End:
    token: str


@dataclass(frozen=True, slots=True)
class Connect:
    peer_id: str
    token: str
    conn: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    conn: int


@dataclass(frozen=True, slots=True)
class Receive:
    conn: int
    message: Relay | Ping


@dataclass(frozen=True, slots=True)
class Expire:
    """A deadline may have passed; the call checks which, if any."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The server is stopping."""


Event = Union[Join, Leave, End, Connect, Disconnect, Receive, Expire, Shutdown]

# Effects -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    message: dict[str, Any]


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


Effect = Union[Send, Close, StatusChanged]

_ANY_EVENT = frozenset({Join, Leave, End, Connect, Disconnect, Receive, Expire, Shutdown})

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
REPLACED = 4409


def is_expired(last_activity: float, ttl: float, now: float) -> bool:
    """True once ``ttl`` seconds have passed since ``last_activity`` (monotonic seconds)."""
    return now - last_activity >= ttl


@dataclass(slots=True)
class Participant:
    peer_id: str
    token: bytes
    role: str
    conn: int | None = None
    seq: int = 0
    held: deque[dict[str, Any]] = field(default_factory=deque)

    @property
    def polite(self) -> bool:
        """Perfect negotiation: the host is impolite, everyone else yields."""
        return self.role != "host"

    def stamp(self, message: dict[str, Any]) -> dict[str, Any]:
        message["seq"] = self.seq
        self.seq += 1
        return message


class Call:
    """One call's participants, status and deadline; see the module docstring for the rules."""

    def __init__(
        self,
        call_id: str,
        now: float,
        *,
        ttl: float,
        max_participants: int = 2,
        hold_limit: int = 64,
    ) -> None:
        self.call_id = call_id
        self.status = Status.WAITING
        self.end_reason: str | None = None
        self.ttl = ttl
        self.max_participants = max_participants
        self.hold_limit = hold_limit
        self.created = now
        self.last_activity = now
        self.participants: dict[str, Participant] = {}
        self._by_conn: dict[int, Participant] = {}

    # Queries ---------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        return len(self._by_conn)

    def deadline(self) -> float | None:
        """When the call expires (monotonic seconds), or None while a socket is connected."""
        if self.status is Status.ENDED or self._by_conn:
            return None
        return self.last_activity + self.ttl

    def participant(self, peer_id: str) -> Participant:
        return self.participants[peer_id]

    # Transitions -----------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply one event. Raises a ``SignalError`` and changes nothing if it is refused."""
        if type(event) not in TRANSITIONS[self.status]:
            raise CallEnded()
        effects = getattr(self, _HANDLERS[type(event)])(event, now)
        if type(event) is not Expire:
            self.last_activity = now
        return effects

    def _join(self, event: Join, now: float) -> list[Effect]:
        if len(self.participants) >= self.max_participants:
            raise CallFull()
        has_host = any(p.role == "host" for p in self.participants.values())
        joiner = Participant(event.peer_id, event.token.encode(), "guest" if has_host else "host")
        self.participants[joiner.peer_id] = joiner
        effects = self._update_status()
        effects += self._broadcast_state("joined", joiner.peer_id)
        return effects

    def _leave(self, event: Leave, now: float) -> list[Effect]:
        leaver = self._authenticate(event.token)
        effects = self._close(leaver, messages.call_ended(self.call_id, "left"), NORMAL_CLOSURE, "left")
        del self.participants[leaver.peer_id]
        if not self.participants:
            return effects + self._end("left")
        effects += self._update_status()
        effects += self._broadcast_state("left", leaver.peer_id, "left")
        return effects

    def _end_by(self, event: End, now: float) -> list[Effect]:
        self._authenticate(event.token)
        return self._end("ended")

    def _connect(self, event: Connect, now: float) -> list[Effect]:
        p = self.participants.get(event.peer_id)
        if p is None or not hmac.compare_digest(p.token, event.token.encode("utf-8", "replace")):
            raise Unauthorized("unknown peer or wrong token")
        effects: list[Effect] = []
        if p.conn is not None:
            del self._by_conn[p.conn]
            effects.append(Close(p.conn, REPLACED, "replaced"))
        p.conn = event.conn
        self._by_conn[event.conn] = p
        effects += self._broadcast_state("connected", p.peer_id)
        while p.held:
            effects.append(Send(event.conn, p.stamp(p.held.popleft())))
        return effects

    def _disconnect(self, event: Disconnect, now: float) -> list[Effect]:
        p = self._by_conn.pop(event.conn, None)
        if p is None:
            return []  # a replaced or already closed socket
        p.conn = None
        return self._broadcast_state("disconnected", p.peer_id)

    def _receive(self, event: Receive, now: float) -> list[Effect]:
        sender = self._by_conn.get(event.conn)
        if sender is None:
            raise Unauthorized("this socket is no longer attached to the call")
        if isinstance(event.message, Ping):
            return [Send(event.conn, sender.stamp(messages.pong()))]
        others = [p for p in self.participants.values() if p is not sender]
        if not others:
            raise NoPeer()
        if any(p.conn is None and len(p.held) >= self.hold_limit for p in others):
            raise BufferFull(f"{self.hold_limit} messages are already held for the other participant")
        effects: list[Effect] = []
        for p in others:
            message = messages.relayed(event.message, self.call_id, sender.peer_id)
            if p.conn is None:
                p.held.append(message)
            else:
                effects.append(Send(p.conn, p.stamp(message)))
        return effects

    def _expire(self, event: Expire, now: float) -> list[Effect]:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        return self._end("expired")

    def _shutdown(self, event: Shutdown, now: float) -> list[Effect]:
        return self._end("shutdown", messages.server_shutdown(), GOING_AWAY)

    # Helpers ---------------------------------------------------------------------------

    def _authenticate(self, token: str) -> Participant:
        given = token.encode("utf-8", "replace")
        found = None
        for p in self.participants.values():
            if hmac.compare_digest(p.token, given):
                found = p
        if found is None:
            raise Unauthorized()
        return found

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
        old, self.status, self.end_reason = self.status, Status.ENDED, reason
        effects.append(StatusChanged(old, Status.ENDED, reason))
        return effects

    def _close(self, p: Participant, farewell: dict[str, Any], code: int, reason: str) -> list[Effect]:
        if p.conn is None:
            return []
        conn, p.conn = p.conn, None
        del self._by_conn[conn]
        return [Send(conn, p.stamp(dict(farewell))), Close(conn, code, reason)]

    def _broadcast_state(self, event: str, subject: str, reason: str | None = None) -> list[Effect]:
        return [Send(p.conn, p.stamp(self.state_for(p, event, subject, reason)))
                for p in self.participants.values() if p.conn is not None]

    def state_for(
        self, p: Participant, event: str, subject: str, reason: str | None = None
    ) -> dict[str, Any]:
        """The ``state`` frame as participant ``p`` sees it (``peer_id`` is always its own)."""
        state: dict[str, Any] = {
            "type": "state",
            "call_id": self.call_id,
            "status": self.status.value,
            "peer_id": p.peer_id,
            "polite": p.polite,
            "participants": {
                "count": len(self.participants),
                "connected": len(self._by_conn),
                "max": self.max_participants,
            },
            "event": event,
            "subject": subject,
        }
        if reason is not None:
            state["reason"] = reason
        return state


_HANDLERS: dict[type, str] = {
    Join: "_join",
    Leave: "_leave",
    End: "_end_by",
    Connect: "_connect",
    Disconnect: "_disconnect",
    Receive: "_receive",
    Expire: "_expire",
    Shutdown: "_shutdown",
}
