"""The WebSocket wire format: parsing client frames into typed values and building server frames.

Client frames are JSON objects ``{"type": ..., "payload": ...}``. Parsing rejects what
would break the other participant's ``JSON.parse`` or our own encoder (NaN, Infinity,
lone surrogates, absurd nesting) with ``BadMessage`` naming the problem.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from signal_srv.errors import BadMessage, UnknownType

__all__ = [
    "RELAY_TYPES",
    "RELAY_OVERHEAD",
    "Ping",
    "Relay",
    "call_ended",
    "error",
    "is_decimal",
    "loads",
    "parse",
    "pong",
    "relayed",
    "server_shutdown",
    "to_json",
    "whole_number",
    "with_seq",
]

RELAY_TYPES = frozenset({"offer", "answer", "candidate", "bye", "message"})

# Room left for the envelope the server adds around a payload ("call_id", "from", "seq"),
# so that a relayed frame still fits the peer's max_message_size.
RELAY_OVERHEAD = 256

# More digits than any count, length or seq the server takes: longer numbers are refused
# before int() sees them (over 4300 digits it raises, and long before that it is slow).
MAX_DIGITS = 18

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Relay:
    """A message to pass on, untouched, to the other participant of the call.

    ``payload_json`` is the payload as compact JSON text: a parsed payload can cost some
    25 times its size in Python objects, and the call may hold the message for a while.
    """

    type: str
    payload_json: str


@dataclass(frozen=True, slots=True)
class Ping:
    """An application-level ping, for clients that cannot see protocol pings."""


def _reject_constant(name: str) -> Any:
    raise BadMessage(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadMessage(f"number {text[:40]} is out of range")
    return value


def is_decimal(text: str) -> bool:
    """True for ASCII digits only (``str.isdigit`` also accepts e.g. superscripts)."""
    return text.isascii() and text.isdigit()


def whole_number(text: str) -> int | None:
    """``text`` as a non-negative int if it is 1 to ``MAX_DIGITS`` ASCII digits, else None."""
    return int(text) if len(text) <= MAX_DIGITS and is_decimal(text) else None


def loads(text: str | bytes) -> Any:
    """Decode strict JSON; raise ``BadMessage`` for anything a browser could not decode back."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadMessage("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"invalid JSON: {exc}") from None
    if isinstance(text, str) and _SURROGATE_ESCAPE.search(text):
        _check_unicode(value)
    return value


def _check_unicode(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadMessage("string contains a lone surrogate") from None
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


def parse(text: str, max_size: int) -> Relay | Ping:
    """Parse one client text frame.

    Raises ``BadMessage`` (not JSON, not an object, missing type, payload too large)
    or ``UnknownType``.
    """
    if len(text) > max_size - RELAY_OVERHEAD:
        raise BadMessage(f"payload too large: at most {max_size - RELAY_OVERHEAD} characters")
    value = loads(text)
    if not isinstance(value, dict):
        raise BadMessage("message must be a JSON object")
    kind = value.get("type")
    if kind is None:
        raise BadMessage("'type' is missing")
    if not isinstance(kind, str):
        raise BadMessage("'type' must be a string")
    if kind in RELAY_TYPES:
        if "payload" not in value:
            raise BadMessage(f"'payload' is missing from {kind!r}")
        return Relay(kind, _compact(value["payload"]))
    if kind == "ping":
        return Ping()
    raise UnknownType(f"unknown type {kind[:40]!r}; expected one of ping, {', '.join(sorted(RELAY_TYPES))}")


def _compact(payload: Any) -> str:
    try:
        return to_json(payload)
    except RecursionError:
        raise BadMessage("JSON nested too deeply") from None


def to_json(message: Any) -> str:
    """Encode a server frame as compact, strict JSON."""
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


def relayed(relay: Relay, call_id: str, sender: str) -> str:
    """The frame the other participant gets, as JSON text without its ``seq`` (see ``with_seq``)."""
    return (f'{{"type":{to_json(relay.type)},"call_id":{to_json(call_id)},"from":{to_json(sender)},'
            f'"payload":{relay.payload_json}}}')


def with_seq(frame: str, seq: int) -> str:
    """``frame`` (a JSON object's text with at least one member) with ``"seq"`` added last."""
    return f'{frame[:-1]},"seq":{seq}}}'


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def pong() -> dict[str, Any]:
    return {"type": "pong"}


def call_ended(call_id: str, reason: str) -> dict[str, Any]:
    return {"type": "call_ended", "call_id": call_id, "reason": reason}


def server_shutdown() -> dict[str, Any]:
    return {"type": "server_shutdown"}
