"""Random and malformed frames on a live signaling socket always get the documented answer.

For every frame hypothesis makes (JSON-ish messages with any payload, random text, NaN and
Infinity, lone surrogate escapes, deep nesting, huge integers, wrong types, binary and
oversized frames), ``expected_answer`` says what the README promises: a relay to the other
participant, a ``pong``, an error frame (``bad_message`` / ``unknown_type`` / ``no_peer`` /
``buffer_full``) with the socket kept open, or a close (1003 binary, 1009 too large). Each
answer is checked exactly: a ping after every frame proves nothing else was sent. Afterwards
the fuzzed call and a bystander call still relay, and the server logged no error.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.live_server import Closed, LiveServer, SyncSocket, http, live_server_fixture

MAX_MESSAGE_SIZE = 16384  # bytes per frame; larger: close 1009
RELAY_OVERHEAD = 256  # README: room the server keeps for its envelope around a payload
BUFFER_LIMIT = 4
RELAY_TYPES = ("offer", "answer", "candidate", "bye", "message")

live_server = live_server_fixture(max_message_size=MAX_MESSAGE_SIZE, ws_buffer_limit=BUFFER_LIMIT)


# The oracle: the README's table, written out -------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


def expected_answer(frame: str | bytes) -> tuple[str, Any]:
    """("close", code) | ("error", code) | ("pong", None) | ("relay", (type, payload))."""
    if isinstance(frame, bytes):
        return "close", 1003
    if len(frame.encode("utf-8")) > MAX_MESSAGE_SIZE:
        return "close", 1009
    if len(frame) > MAX_MESSAGE_SIZE - RELAY_OVERHEAD:
        return "error", "bad_message"
    try:
        value = json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return "error", "bad_message"
    if _has_lone_surrogate(value) or _has_non_finite(value) or not isinstance(value, dict):
        return "error", "bad_message"
    kind = value.get("type")
    if not isinstance(kind, str):
        return "error", "bad_message"
    if kind == "ping":
        return "pong", None
    if kind not in RELAY_TYPES:
        return "error", "unknown_type"
    if "payload" not in value:
        return "error", "bad_message"
    return "relay", (kind, value["payload"])


# Frames --------------------------------------------------------------------------------

_strings = st.text(max_size=30) | st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00", "\u2028", "\x00"])
_numbers = (st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from([10**300, -(2**63), 0.1, -0.0, 1e308]))
_json = st.recursive(
    st.none() | st.booleans() | _numbers | _strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_strings, inner, max_size=4),
    max_leaves=20,
)
_type = st.sampled_from([*RELAY_TYPES, "ping"]) | _strings | st.sampled_from(["OFFER", "Ping", "state", "error"])


@st.composite
def _messages(draw: st.DrawFn) -> str:
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["type"] = draw(_type | _json) if draw(st.integers(0, 5)) == 0 else draw(_type)
    if draw(st.integers(0, 5)):
        message["payload"] = draw(_json)
    message.update(draw(st.dictionaries(_strings, _json, max_size=2)))
    return json.dumps(message, ensure_ascii=draw(st.booleans()) or _has_lone_surrogate(message))


_specials = st.sampled_from([
    "", " ", "null", "[]", "{}", '"offer"', "42", "{", '{"type":', "NaN", "[NaN]",
    '{"type": "message", "payload": NaN}', '{"type": "message", "payload": Infinity}',
    '{"type": "message", "payload": -Infinity}', '{"type": "message", "payload": "\\ud800"}',
    '{"type": "message", "payload": {"\\udc00": 1}}', '{"type": null, "payload": 1}',
    '{"type": 5, "payload": 1}', '{"type": ["offer"], "payload": 1}', '{"type": "offer"}',
    '{"payload": 1}', '{"type": "offer", "payload": 1, "type": "nope"}', "\ufeff{}",
    '{"type": "message", "payload": ' + "[" * 5000 + "]" * 5000 + "}", "[" * 10000,
    '{"type": "message", "payload": ' + "1" * 5000 + "}",
    '{"type": "' + "x" * 200 + '", "payload": 1}',
    '{"type": "message", "payload": "' + "a" * (MAX_MESSAGE_SIZE - RELAY_OVERHEAD) + '"}',
    '{"type": "message", "payload": "' + "a" * (MAX_MESSAGE_SIZE - RELAY_OVERHEAD - 40) + '"}',
    '{"type": "message", "payload": "' + "\u00e9" * (MAX_MESSAGE_SIZE // 2) + '"}',
    "x" * (MAX_MESSAGE_SIZE + 1),
])

FRAMES = st.one_of(
    _messages(),
    _specials,
    st.text(max_size=200),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    st.binary(max_size=50),
)


# The rig: a fuzzed call, a call with one participant, and a bystander call -------------


class Pair:
    """A call with both participants connected; ``a`` is reconnected whenever it is closed."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        _, self.host, _ = http("POST", server.base_url + "/apiv2/calls")
        _, self.guest, _ = http("POST", server.base_url + f"/apiv2/calls/{self.host['call_id']}/join")
        self.a = self._connect(self.host)
        self.b = self._connect(self.guest)
        self.sync(self.a)

    def _connect(self, creds: dict[str, Any]) -> SyncSocket:
        ws = SyncSocket.for_peer(self.server, creds["call_id"], creds["peer_id"], creds["peer_token"])
        first = ws.recv()
        assert first["type"] == "state" and first["event"] == "connected", first
        return ws

    def reconnect_a(self) -> None:
        self.a = self._connect(self.host)

    @staticmethod
    def sync(ws: SyncSocket, pongs: int = 1) -> list[dict[str, Any]]:
        """Ping, and return every frame before the ``pongs``-th pong (a pong already due counts)."""
        ws.send_json({"type": "ping"})
        frames: list[dict[str, Any]] = []
        while True:
            frame = ws.recv()
            if frame["type"] == "pong" and sum(f["type"] == "pong" for f in frames) == pongs - 1:
                return frames
            frames.append(frame)

    def assert_relays(self, tag: str) -> None:
        for sender, receiver in ((self.a, self.b), (self.b, self.a)):
            sender.send_json({"type": "message", "payload": tag})
            assert self.sync(sender) == []  # its pong comes after the relay was written to the receiver
            frames = [f for f in self.sync(receiver) if f["type"] != "state"]
            assert [f["payload"] for f in frames] == [tag], frames

    def close(self) -> None:
        self.a.close()
        self.b.close()
        http("POST", self.server.base_url + f"/apiv2/calls/{self.host['call_id']}/end",
             headers={"Authorization": f"Bearer {self.host['peer_token']}"})


@pytest.fixture(scope="module")
def rig(live_server: LiveServer) -> Iterator[dict[str, Any]]:
    fuzzed, bystander = Pair(live_server), Pair(live_server)
    _, solo, _ = http("POST", live_server.base_url + "/apiv2/calls")
    alone = SyncSocket.for_peer(live_server, solo["call_id"], solo["peer_id"], solo["peer_token"])
    assert alone.recv()["event"] == "connected"
    yield {"fuzzed": fuzzed, "bystander": bystander, "alone": alone}
    fuzzed.close()
    bystander.close()
    alone.close()


def _check_frame(rig: dict[str, Any], frame: str | bytes) -> None:
    pair: Pair = rig["fuzzed"]
    kind, detail = expected_answer(frame)
    if isinstance(frame, bytes):
        pair.a.send_bytes(frame)
    else:
        pair.a.send_text(frame)
    if kind == "close":
        with pytest.raises(Closed) as closed:
            got = pair.a.recv()
            raise AssertionError(f"expected close {detail}, got {got}")
        assert closed.value.code == detail, closed.value
        pair.reconnect_a()
        assert [f["event"] for f in Pair.sync(pair.b)] == ["disconnected", "connected"]
        return
    before_pong = Pair.sync(pair.a, pongs=2 if kind == "pong" else 1)
    if kind == "error":
        assert [(f["type"], f.get("code")) for f in before_pong] == [("error", detail)], before_pong
        assert isinstance(before_pong[0]["message"], str) and before_pong[0]["message"]
    elif kind == "pong":
        assert [f["type"] for f in before_pong] == ["pong"], before_pong
    else:
        assert before_pong == [], before_pong
        relay_type, payload = detail
        relayed = Pair.sync(pair.b)
        assert len(relayed) == 1, relayed
        assert relayed[0]["type"] == relay_type and relayed[0]["from"] == pair.host["peer_id"], relayed
        assert relayed[0]["call_id"] == pair.host["call_id"] and relayed[0]["payload"] == payload, relayed
        rig["alone"].send_text(frame)
        assert [f.get("code") for f in Pair.sync(rig["alone"])] == ["no_peer"]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(frame=FRAMES)
def test_every_frame_gets_its_documented_answer(rig: dict[str, Any], frame: str | bytes) -> None:
    _check_frame(rig, frame)


@pytest.mark.parametrize("frame", [
    "x" * (MAX_MESSAGE_SIZE + 1),
    b"\x00\x01binary",
    '{"type": "message", "payload": "' + "\u00e9" * (MAX_MESSAGE_SIZE // 2) + '"}',
    '{"type": "message", "payload": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"type": "message", "payload": "\\ud800"}',
    '{"type": "message", "payload": NaN}',
    '{"type": "nope", "payload": 1}',
    '{"type": "offer", "payload": {"type": "offer", "sdp": "v=0"}}',
], ids=["oversized", "binary", "oversized-in-bytes", "deep", "surrogate", "nan", "unknown", "offer"])
def test_named_malformed_frames(rig: dict[str, Any], frame: str | bytes) -> None:
    """The cases the README names, each once, whatever hypothesis drew."""
    _check_frame(rig, frame)


def test_held_messages_past_the_limit_get_buffer_full(live_server: LiveServer) -> None:
    _, host, _ = http("POST", live_server.base_url + "/apiv2/calls")
    http("POST", live_server.base_url + f"/apiv2/calls/{host['call_id']}/join")  # joined, never connects
    ws = SyncSocket.for_peer(live_server, host["call_id"], host["peer_id"], host["peer_token"])
    assert ws.recv()["event"] == "connected"
    for i in range(BUFFER_LIMIT):
        ws.send_json({"type": "candidate", "payload": {"candidate": f"c{i}"}})
    assert Pair.sync(ws) == []
    for _ in range(2):
        ws.send_json({"type": "candidate", "payload": {"candidate": "one too many"}})
        assert [f.get("code") for f in Pair.sync(ws)] == ["buffer_full"]
    ws.close()


def test_invalid_utf8_drops_only_that_socket(rig: dict[str, Any]) -> None:
    """Tornado aborts the TCP connection on invalid UTF-8 (no close frame: 1006, or 1007)."""
    pair: Pair = rig["fuzzed"]
    pair.a.send_bytes(b'{"type": "message", "payload": "\xff\xfe"}', opcode=0x1)
    with pytest.raises(Closed) as closed:
        pair.a.recv()
    assert closed.value.code in (None, 1007), closed.value
    pair.reconnect_a()
    assert [f["event"] for f in Pair.sync(pair.b)] == ["disconnected", "connected"]


def test_out_of_range_number_is_relayed_as_written() -> None:
    """Valid JSON text (RFC 8259 sets no range); the payload is never decoded to be encoded again."""
    server = LiveServer().start()  # its own process: a crash would log an ERROR
    try:
        pair = Pair(server)
        pair.a.send_text('{"type": "message", "payload": [1e400, -1E+999]}')
        assert Pair.sync(pair.a) == []
        frames = Pair.sync(pair.b)
        assert [f["payload"] for f in frames] == [[math.inf, -math.inf]]
        assert not server.problems(), server.problems()
    finally:
        server.stop()


def test_server_and_calls_are_healthy_after_fuzzing(rig: dict[str, Any], live_server: LiveServer) -> None:
    """Runs last in this module: both calls still relay, and the server logged no error."""
    rig["fuzzed"].assert_relays("after fuzzing")
    rig["bystander"].assert_relays("bystander")
    status, body, _ = http("GET", live_server.base_url + "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert not live_server.problems(), live_server.problems()


def test_unicode_digit_last_seq_is_refused_with_4400() -> None:
    server = LiveServer().start()  # its own process: the bug logs an ERROR
    try:
        _, host, _ = http("POST", server.base_url + "/apiv2/calls")
        ws = SyncSocket(f"{server.ws_url}/apiv2/ws?call_id={host['call_id']}&peer_id={host['peer_id']}"
                        f"&token={host['peer_token']}&last_seq=%C2%B2")
        assert ws.wait_closed().code == 4400
        assert not [line for line in server.lines if host["peer_token"] in line]
    finally:
        server.stop()
