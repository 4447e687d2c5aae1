"""A call's whole state as plain JSON-ready data, so that another process can carry it on.

Pure: no clock is read here. Monotonic instants mean nothing in another process, so they
travel as wall-clock times, converted with the ``(monotonic, wall)`` pair the caller read
at one moment on each side.
"""

from __future__ import annotations

import base64
import dataclasses
from collections import deque
from typing import Any

from signal_srv.call import Call, CallRules, HeldBudget, Participant, Status

__all__ = ["call_from_dict", "call_to_dict"]

_CALL_TIMES = ("created", "last_activity")
_PARTICIPANT_TIMES = ("away_since",)


def call_to_dict(call: Call, mono_now: float, wall_now: float) -> dict[str, Any]:
    """``call`` as data. Only a call with no connected socket can be carried (its sockets stay here)."""
    if call.connected:
        raise ValueError("a call with connected sockets cannot be carried to another process")
    offset = wall_now - mono_now
    data: dict[str, Any] = {
        "call_id": call.call_id, "status": call.status.value, "end_reason": call.end_reason,
        "claimed": call.claimed, **{name: getattr(call, name) + offset for name in _CALL_TIMES},
    }
    data["participants"] = [_participant_to_dict(p, offset) for p in call.participants.values()]
    return data


def call_from_dict(
    data: dict[str, Any], rules: CallRules, held_budget: HeldBudget, mono_now: float, wall_now: float
) -> Call:
    """The call ``call_to_dict`` described, on this process's monotonic clock; its held frames count
    against ``held_budget``."""
    offset = mono_now - wall_now
    call = Call(data["call_id"], data["created"] + offset, rules, held_budget)
    call.status, call.end_reason, call.claimed = Status(data["status"]), data["end_reason"], data["claimed"]
    call.last_activity = data["last_activity"] + offset
    for item in data["participants"]:
        p = _participant_from_dict(item, offset)
        call.participants[p.peer_id] = p
        held_budget.used += p.held_bytes
    return call


def _participant_to_dict(p: Participant, offset: float) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if f.name in _PARTICIPANT_TIMES and value is not None:
            value += offset
        elif isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        elif isinstance(value, deque):
            value = list(value)
        data[f.name] = value
    return data


def _participant_from_dict(data: dict[str, Any], offset: float) -> Participant:
    values = dict(data)
    for name in _PARTICIPANT_TIMES:
        if values.get(name) is not None:
            values[name] += offset
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
