"""The cluster's wire format: call events, answers and refusals as JSON-ready dicts.

Events cross nodes when a socket or request reaches a node that does not own the call,
and every event a call accepts is written to its log in this form; answers are a
summary, a join's result or a peer id, and a refusal names its ``SignalError`` class.
Events carry a peer token's digest (base64), never the token.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from signal_srv import errors
from signal_srv.actor import CallSummary, Joined
from signal_srv.call import (
    Connect,
    Disconnect,
    End,
    Event,
    Expire,
    Identify,
    Join,
    Leave,
    Receive,
    Remove,
    Restart,
    Shutdown,
)
from signal_srv.messages import Ping, Relay
from signal_srv.peer_tokens import token_digest

__all__ = ["Describe", "decode_error", "decode_event", "decode_result", "decode_summary", "encode_error",
           "encode_event", "encode_result", "encode_summary"]


@dataclasses.dataclass(frozen=True, slots=True)
class Describe:
    """Ask the owner for the call's summary (not a call event: the actor answers it without a turn)."""

    peers: bool = False


_EVENTS: dict[str, type] = {cls.__name__: cls for cls in (Join, Leave, End, Remove, Connect, Disconnect, Receive,
                                                          Identify, Expire, Shutdown, Restart, Describe)}
_ERRORS: dict[str, type[errors.SignalError]] = {
    name: cls for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.SignalError)
}


def encode_event(event: Event | Describe) -> dict[str, Any]:
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    if fields.get("token_digest") is not None:
        fields["token_digest"] = base64.b64encode(fields["token_digest"]).decode()
    if isinstance(event, Receive):
        message = event.message
        fields["message"] = dataclasses.asdict(message) if isinstance(message, Relay) else {"cseq": message.cseq}
    return {"t": type(event).__name__, **fields}


def decode_event(data: dict[str, Any]) -> Event | Describe:
    fields = dict(data)
    cls = _EVENTS[fields.pop("t")]
    if "token" in fields:  # written by a version that kept the token itself
        token = fields.pop("token")
        fields["token_digest"] = None if token is None else token_digest(token)
    elif fields.get("token_digest") is not None:
        fields["token_digest"] = base64.b64decode(fields["token_digest"])
    if cls is Receive:
        message = fields["message"]
        fields["message"] = Relay(**message) if "type" in message else Ping(message.get("cseq"))
    event: Event | Describe = cls(**fields)
    return event


def encode_summary(summary: CallSummary) -> dict[str, Any]:
    return {f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)}


def decode_summary(data: dict[str, Any]) -> CallSummary:
    fields: dict[str, Any] = {f.name: data.get(f.name) for f in dataclasses.fields(CallSummary)}
    if fields["peers"] is not None:
        fields["peers"] = tuple(fields["peers"])
    return CallSummary(**fields)


def encode_result(result: Any) -> dict[str, Any]:
    if isinstance(result, Joined):
        return {"joined": {"role": result.role, "polite": result.polite, "summary": encode_summary(result.summary)}}
    if isinstance(result, CallSummary):
        return {"summary": encode_summary(result)}
    return {"peer_id": result}


def decode_result(data: dict[str, Any]) -> Any:
    if "joined" in data:
        joined = data["joined"]
        return Joined(joined["role"], joined["polite"], decode_summary(joined["summary"]))
    if "summary" in data:
        return decode_summary(data["summary"])
    return data["peer_id"]


def encode_error(exc: errors.SignalError) -> dict[str, str]:
    return {"class": type(exc).__name__, "message": exc.message}


def decode_error(data: dict[str, str]) -> errors.SignalError:
    cls = _ERRORS.get(data.get("class", ""), errors.SignalError)
    return cls(data.get("message"))
