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
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from signal_srv.errors import BadMessage, UnknownType

__all__ = [
    "MAX_CSEQ",
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
    "relay_fields",
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

# The largest cseq a client may send: every JSON parser reads integers up to 2**53 - 1 exactly.
MAX_CSEQ = 2**53 - 1
MAX_CSEQ_DIGITS = len(str(MAX_CSEQ))

# More digits than any count, length or seq the server takes: longer numbers are refused
# before int() sees them (over 4300 digits it raises, and long before that it is slow).
MAX_DIGITS = 18

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Relay:
    """A message to pass on, untouched, to the other participant of the call.

    ``payload_json`` is the payload's JSON text exactly as the sender wrote it (validated):
    relaying it costs a copy, not a second encode. ``cseq``: the sender's number for this
    frame, if it numbers them (see ``Call``).
    """

    type: str
    payload_json: str
    cseq: int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """An application-level ping, for clients that cannot see protocol pings."""

    cseq: int | None = None


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
    relay = _compact_relay(text)
    if relay is not None:
        return relay
    members = _object_members(text)
    kind = members["type"][0] if "type" in members else None
    if kind is None:
        raise BadMessage("'type' is missing")
    if not isinstance(kind, str):
        raise BadMessage("'type' must be a string")
    cseq = _cseq(members["cseq"][0]) if "cseq" in members else None
    if kind in RELAY_TYPES:
        if "payload" not in members:
            raise BadMessage(f"'payload' is missing from {kind!r}")
        _, start, end = members["payload"]
        return Relay(kind, text[start:end], cseq)
    if kind == "ping":
        return Ping(cseq)
    raise UnknownType(f"unknown type {kind[:40]!r}; expected one of ping, {', '.join(sorted(RELAY_TYPES))}")


def _cseq(value: Any) -> int | None:
    """The frame's ``cseq``: null, or a whole number from 0 to ``MAX_CSEQ``."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_CSEQ:
        raise BadMessage(f"'cseq' must be a whole number from 0 to {MAX_CSEQ}")
    return value


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Numbers are left to the C scanner's own float(): an out-of-range number is valid JSON text,
# and payloads are relayed as written, never encoded again.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _object_members(text: str) -> dict[str, tuple[Any, int, int]]:
    """Each member of the JSON object ``text``: its value, and where its text starts and ends.

    As strict as ``loads`` (NaN, Infinity and lone surrogates are refused). Raises
    ``BadMessage``, with json's own explanation for text that is not valid JSON.
    """
    try:
        members = _scan_object(text)
    except RecursionError:
        raise BadMessage("JSON nested too deeply") from None
    except (ValueError, StopIteration):
        members = None
    if members is None:
        value = loads(text)  # invalid JSON raises here, with json's message
        raise BadMessage("message must be a JSON object" if not isinstance(value, dict) else "invalid JSON")
    if _SURROGATE_ESCAPE.search(text):
        for key, (value, _, _) in members.items():
            _check_unicode(key)
            _check_unicode(value)
    return members


_TYPE_START = '{"type":"'
_PAYLOAD_KEY = '","payload":'
_CSEQ_KEY = ',"cseq":'


def _compact_relay(text: str) -> Relay | None:
    """``text`` as a ``Relay`` if it is exactly ``{"type":"<relay type>","payload":<value>}``, or that
    with ``,"cseq":<digits>`` before the closing brace, the forms browsers' ``JSON.stringify`` and
    our client write; else None, and ``parse`` takes the general path. It accepts nothing the
    general path refuses, and fails the way it does."""
    if not text.startswith(_TYPE_START):
        return None
    quote = text.find('"', len(_TYPE_START))
    kind = text[len(_TYPE_START):quote]
    if kind not in RELAY_TYPES or not text.startswith(_PAYLOAD_KEY, quote):
        return None
    start = quote + len(_PAYLOAD_KEY)
    try:
        value, end = _DECODER.scan_once(text, start)  # type: ignore[attr-defined]
    except RecursionError:
        raise BadMessage("JSON nested too deeply") from None
    except (ValueError, StopIteration):
        return None  # the general path says what is wrong
    cseq = None
    if text.startswith(_CSEQ_KEY, end):
        digits = text[end + len(_CSEQ_KEY):-1]
        if not (text.endswith("}") and is_decimal(digits) and len(digits) <= MAX_CSEQ_DIGITS
                and (digits == "0" or digits[0] != "0")):
            return None  # the general path says what is wrong
        cseq = _cseq(int(digits))
    elif end != len(text) - 1 or text[end] != "}":
        return None
    if _SURROGATE_ESCAPE.search(text, start):
        _check_unicode(value)
    return Relay(kind, text[start:end], cseq)


def _skip_space(text: str, i: int) -> int:
    match = _WHITESPACE.match(text, i)
    return match.end() if match else i


def _scan_object(text: str) -> dict[str, tuple[Any, int, int]] | None:
    """The members of a top-level JSON object with their spans, or None if ``text`` is not one."""
    skip, scan = _skip_space, _DECODER.scan_once  # type: ignore[attr-defined]
    i = skip(text, 0)
    if text[i:i + 1] != "{":
        return None
    i = skip(text, i + 1)
    members: dict[str, tuple[Any, int, int]] = {}
    if text[i:i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i:i + 1] != '"':
                return None
            key, i = scanstring(text, i + 1, True)
            i = skip(text, i)
            if text[i:i + 1] != ":":
                return None
            start = skip(text, i + 1)
            value, end = scan(text, start)
            members[key] = (value, start, end)
            i = skip(text, end)
            if text[i:i + 1] == ",":
                i = skip(text, i + 1)
            elif text[i:i + 1] == "}":
                i += 1
                break
            else:
                return None
    return members if skip(text, i) == len(text) else None


def to_json(message: Any) -> str:
    """Encode a server frame as compact, strict JSON."""
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


_TYPE_HEADS = {kind: '{"type":' + to_json(kind) for kind in RELAY_TYPES}


def relay_fields(call_id: str, sender: str) -> str:
    """The JSON text a frame relayed from ``sender`` carries between its type and its payload.

    The same for every frame of that sender, so a call computes it once (see ``relayed``).
    """
    return f',"call_id":{to_json(call_id)},"from":{to_json(sender)},"payload":'


def relayed(relay: Relay, call_id: str, sender: str, fields: str | None = None) -> str:
    """The frame the other participant gets, as JSON text without its ``seq`` (see ``with_seq``).

    ``fields``: ``relay_fields(call_id, sender)``, if the caller keeps it.
    """
    head = _TYPE_HEADS.get(relay.type) or '{"type":' + to_json(relay.type)
    return head + (fields or relay_fields(call_id, sender)) + relay.payload_json + "}"


def with_seq(frame: str, seq: int) -> str:
    """``frame`` (a JSON object's text with at least one member) with ``"seq"`` added last."""
    return f'{frame[:-1]},"seq":{seq}}}'


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def pong() -> dict[str, Any]:
    return {"type": "pong"}


def call_ended(call_id: str, reason: str) -> dict[str, Any]:
    return {"type": "call_ended", "call_id": call_id, "reason": reason}


def server_shutdown(reconnect: bool = False) -> dict[str, Any]:
    """The farewell of a stopping server; ``reconnect``: the call goes on elsewhere, reconnect at once."""
    return {"type": "server_shutdown", "reconnect": True} if reconnect else {"type": "server_shutdown"}
