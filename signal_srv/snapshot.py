"""A call's whole state as plain JSON-ready data, so that another process can carry it on.

Pure: no clock is read here. A snapshot keeps the instants (``created``, ``last_activity``,
each participant's ``away_since``) as the monotonic readings of the process that wrote it,
with that process's ``(monotonic, wall)`` pair read at one moment (``clock``): restored as
they are, the events logged after the snapshot (stamped on the same clock) replay exactly;
``rebase`` then moves every instant onto this process's monotonic clock through the wall
clock, the only one two processes share.

The socket ids (``conn``) of connected participants travel too, so that events logged
about those sockets replay; the process that carries the call on disconnects them (its
sockets are its own).

A participant's peer token is kept as its digest (``Participant.token_digest``, base64),
never as the token.
"""

from __future__ import annotations

import base64
import dataclasses
from collections import deque
from typing import Any

from signal_srv.call import Call, CallRules, HeldBudget, Participant, Status
from signal_srv.peer_tokens import token_digest

__all__ = ["call_from_dict", "call_to_dict", "rebase", "restore"]

_CALL_TIMES = ("created", "last_activity")


def call_to_dict(call: Call, mono_now: float, wall_now: float) -> dict[str, Any]:
    """``call`` as data, its instants on the monotonic clock that read ``mono_now`` at ``wall_now``."""
    data: dict[str, Any] = {
        "call_id": call.call_id, "status": call.status.value, "end_reason": call.end_reason,
        "claimed": call.claimed, "clock": [mono_now, wall_now], **{name: getattr(call, name) for name in _CALL_TIMES},
    }
    data["participants"] = [_participant_to_dict(p) for p in call.participants.values()]
    return data


def restore(data: dict[str, Any], rules: CallRules, held_budget: HeldBudget) -> Call:
    """The call ``call_to_dict`` described, on the clock of the process that wrote it.

    Its held frames count against ``held_budget``.
    """
    call = Call(data["call_id"], data["created"], rules, held_budget)
    call.status, call.end_reason, call.claimed = Status(data["status"]), data["end_reason"], data["claimed"]
    call.last_activity = data["last_activity"]
    for item in data["participants"]:
        p = _participant_from_dict(item)
        call.participants[p.peer_id] = p
        if p.conn is not None:
            call._by_conn[p.conn] = p
        held_budget.used += p.held_bytes
    return call


def rebase(call: Call, clock: list[float], mono_now: float, wall_now: float) -> None:
    """Move ``call``'s instants from ``clock`` (a snapshot's ``(monotonic, wall)`` pair) onto ours."""
    offset = (wall_now - mono_now) - (clock[1] - clock[0])
    call.created -= offset
    call.last_activity -= offset
    for p in call.participants.values():
        if p.away_since is not None:
            p.away_since -= offset


def call_from_dict(
    data: dict[str, Any], rules: CallRules, held_budget: HeldBudget, mono_now: float, wall_now: float
) -> Call:
    """``restore`` and ``rebase`` in one: the call on this process's clock."""
    call = restore(data, rules, held_budget)
    rebase(call, data["clock"], mono_now, wall_now)
    return call


def _participant_to_dict(p: Participant) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        elif isinstance(value, deque):
            value = list(value)
        data[f.name] = value
    return data


def _participant_from_dict(data: dict[str, Any]) -> Participant:
    values = dict(data)
    if "token" in values:  # written by a version that kept the token itself
        token = base64.b64decode(values.pop("token")).decode("utf-8", "surrogatepass")
        values["token_digest"] = base64.b64encode(token_digest(token)).decode()
    defaults = Participant("", b"", "", None)
    for f in dataclasses.fields(Participant):
        default = getattr(defaults, f.name)
        value = values.get(f.name, default)
        if isinstance(default, bytes):
            value = base64.b64decode(value)
        elif f.name in ("held", "sent") and value is not None:
            value = deque(tuple(v) if f.name == "sent" else v for v in value)
        values[f.name] = value
    return Participant(**{f.name: values[f.name] for f in dataclasses.fields(Participant)})
