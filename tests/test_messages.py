"""Wire-format parsing, without a server."""

from __future__ import annotations

import json
import re

import pytest

from signal_srv.errors import BadMessage, UnknownType
from signal_srv.messages import MAX_CSEQ, RELAY_TYPES, Ping, Relay, loads, parse, relayed, to_json, with_seq

SIZE = 65536


@pytest.mark.parametrize("kind", sorted(RELAY_TYPES))
def test_every_relay_type_round_trips_its_payload_untouched(kind: str) -> None:
    payload = {"type": "offer", "sdp": "v=0\r\n", "candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host",
               "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": None, "emoji": "\U0001F600"}
    payload_json = json.dumps(payload, ensure_ascii=False, indent=1)
    message = parse(f'{{ "type" : "{kind}", "payload" :{payload_json}\n}}', SIZE)
    assert message == Relay(kind, payload_json)


def test_a_relayed_frame_carries_the_payload_as_written() -> None:
    relay = parse('{"payload": {"b": 2.50, "a": [1e2, "\\u00e9"]}, "type": "message", "extra": 1}', SIZE)
    frame = relayed(relay, "C", "P")
    assert frame == '{"type":"message","call_id":"C","from":"P","payload":{"b": 2.50, "a": [1e2, "\\u00e9"]}}'
    assert json.loads(with_seq(frame, 7))["seq"] == 7


def test_the_last_of_duplicate_members_counts_as_in_json() -> None:
    assert parse('{"type": "offer", "payload": 1, "payload": [2]}', SIZE) == Relay("offer", "[2]")


@pytest.mark.parametrize(("text", "expected"), [
    ('{"type":"candidate","payload":{"candidate":"c","sdpMid":"0"}}', Relay("candidate", '{"candidate":"c","sdpMid":"0"}')),
    ('{"type":"offer","payload":"v=0\\r\\n"}', Relay("offer", '"v=0\\r\\n"')),
    ('{"type":"offer","payload":1,"payload":2}', Relay("offer", "2")),  # not compact: the general path
    ('{"type":"offer","payload":1} ', Relay("offer", "1")),
    ('{"type":"bye","payload":null}', Relay("bye", "null")),
])
def test_compact_frames_parse_as_the_general_path_does(text: str, expected: Relay) -> None:
    assert parse(text, SIZE) == expected


@pytest.mark.parametrize("payload", [
    "Infinity", "NaN", '{"\\udfff": 1}', '"\\ud800"', "[1,]", "[" * 5000, "1" * 5000, '{"a": 1', "",
])
def test_a_compact_frame_is_refused_as_its_spaced_form_is(payload: str) -> None:
    errors = []
    for text in ('{"type":"offer","payload":' + payload + "}", '{"type": "offer", "payload": ' + payload + "}"):
        with pytest.raises(BadMessage) as info:
            parse(text, SIZE)
        errors.append(re.sub(r": line \d+ column \d+ \(char \d+\)", "", str(info.value)))
    assert errors[0] == errors[1]


def test_ping_parses() -> None:
    assert parse('{"type": "ping"}', SIZE) == Ping()


def test_cseq_is_read_from_relays_and_pings() -> None:
    assert parse('{"type": "offer", "payload": 1, "cseq": 7}', SIZE) == Relay("offer", "1", 7)
    assert parse('{"type": "ping", "cseq": 0}', SIZE) == Ping(0)
    assert parse(f'{{"type": "ping", "cseq": {MAX_CSEQ}}}', SIZE) == Ping(MAX_CSEQ)
    assert parse('{"type": "bye", "payload": null, "cseq": null}', SIZE) == Relay("bye", "null")


def test_the_compact_form_with_cseq_parses_as_the_general_one() -> None:
    for text in ('{"type":"candidate","payload":{"a":[1,2]},"cseq":12}', '{"type":"offer","payload":"x","cseq":0}',
                 '{"type":"bye","payload":null,"cseq":null}', '{"type":"message","payload":1,"cseq":007}',
                 '{"type":"message","payload":1,"cseq":-3}'):
        try:
            fast = parse(text, SIZE)
        except BadMessage as exc:
            fast = exc  # type: ignore[assignment]
        try:
            general = parse(text.replace(":", ": "), SIZE)
        except BadMessage as exc:
            general = exc  # type: ignore[assignment]
        assert type(fast) is type(general), text
        if isinstance(fast, Relay) and isinstance(general, Relay):
            assert (fast.type, json.loads(fast.payload_json), fast.cseq) == (
                general.type, json.loads(general.payload_json), general.cseq), text
    assert parse('{"type":"candidate","payload":{"a":1},"cseq":12}', SIZE) == Relay("candidate", '{"a":1}', 12)


@pytest.mark.parametrize("cseq", ["-1", "1.5", "true", '"3"', "[1]", str(MAX_CSEQ + 1)])
def test_a_cseq_that_is_not_a_whole_number_in_range_is_a_bad_message(cseq: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse(f'{{"type": "message", "payload": 1, "cseq": {cseq}}}', SIZE)
    assert "'cseq' must be a whole number" in str(info.value)


@pytest.mark.parametrize(("text", "error", "message"), [
    ("", BadMessage, "invalid JSON"),
    ("null", BadMessage, "must be a JSON object"),
    ('{"type": null}', BadMessage, "'type' is missing"),
    ('{"type": ["offer"]}', BadMessage, "'type' must be a string"),
    ('{"type": "answer"}', BadMessage, "'payload' is missing from 'answer'"),
    ('{"type": "hello", "payload": 1}', UnknownType, "unknown type 'hello'"),
    ('{"type": "offer", "payload": Infinity}', BadMessage, "Infinity is not valid JSON"),
    ('{"type": "offer", "payload": {"\\udfff": 1}}', BadMessage, "lone surrogate"),
    ('{"type": "offer", "payload": 1} x', BadMessage, "invalid JSON"),
    ('{"type": "offer", "payload": [1,]}', BadMessage, "invalid JSON"),
    ('{"type": "offer" "payload": 1}', BadMessage, "invalid JSON"),
    ('{"type": "offer", "\\ud800": 1}', BadMessage, "lone surrogate"),
    ('[{"type": "offer"}]', BadMessage, "must be a JSON object"),
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
