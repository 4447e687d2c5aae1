"""Wire-format parsing, without a server."""

from __future__ import annotations

import json

import pytest

from signal_srv.errors import BadMessage, UnknownType
from signal_srv.messages import RELAY_TYPES, Ping, Relay, loads, parse, to_json

SIZE = 65536


@pytest.mark.parametrize("kind", sorted(RELAY_TYPES))
def test_every_relay_type_round_trips_its_payload_untouched(kind: str) -> None:
    payload = {"type": "offer", "sdp": "v=0\r\n", "candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host",
               "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": None, "emoji": "\U0001F600"}
    message = parse(json.dumps({"type": kind, "payload": payload}), SIZE)
    assert message == Relay(kind, to_json(payload))
    assert json.loads(message.payload_json) == payload


def test_ping_parses() -> None:
    assert parse('{"type": "ping"}', SIZE) == Ping()


@pytest.mark.parametrize(("text", "error", "message"), [
    ("", BadMessage, "invalid JSON"),
    ("null", BadMessage, "must be a JSON object"),
    ('{"type": null}', BadMessage, "'type' is missing"),
    ('{"type": ["offer"]}', BadMessage, "'type' must be a string"),
    ('{"type": "answer"}', BadMessage, "'payload' is missing from 'answer'"),
    ('{"type": "hello", "payload": 1}', UnknownType, "unknown type 'hello'"),
    ('{"type": "offer", "payload": Infinity}', BadMessage, "Infinity is not valid JSON"),
    ('{"type": "offer", "payload": {"\\udfff": 1}}', BadMessage, "lone surrogate"),
])
def test_malformed_frames_raise_errors_that_name_the_problem(text: str, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        parse(text, SIZE)
    assert message in str(info.value)
    assert info.value.code in ("bad_message", "unknown_type")


def test_escaped_surrogate_pairs_are_fine() -> None:
    assert loads('"\\ud83d\\ude00"') == "\U0001F600"


def test_to_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        to_json({"x": float("nan")})
