"""The signaling socket against the real server: relay, state, holding, reconnect, auth, limits."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any, Callable

import pytest
from tornado.iostream import IOStream, StreamClosedError

from signal_srv.client import Connection, SignalingClient
from signal_srv.registry import Registry
from tests.conftest import TIMEOUT


class Pair:
    """A call with both participants' credentials and connected sockets."""

    def __init__(self, host: dict[str, Any], guest: dict[str, Any], a: Connection, b: Connection) -> None:
        self.host, self.guest, self.a, self.b = host, guest, a, b
        self.call_id = host["call_id"]


async def make_pair(client: SignalingClient) -> Pair:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    a = await client.connect_as(host)
    await a.wait_for("state", subject=host["peer_id"])
    b = await client.connect_as(guest)
    await b.wait_for("state", subject=guest["peer_id"])
    await a.wait_for("state", subject=guest["peer_id"], event="connected")
    return Pair(host, guest, a, b)


async def assert_relays(pair: Pair, tag: str = "check") -> None:
    """Both directions still relay within the call."""
    pair.a.send("message", tag)
    assert (await pair.b.wait_for("message"))["payload"] == tag
    pair.b.send("message", tag)
    assert (await pair.a.wait_for("message"))["payload"] == tag


async def raw_socket(port: int, query: str, rcvbuf: int | None = None) -> IOStream:
    """A WebSocket that completes the handshake and then neither reads nor answers pings."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    stream = IOStream(sock)
    await stream.connect(("127.0.0.1", port))
    await stream.write(
        f"GET /apiv2/ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101")
    return stream


def query_of(creds: dict[str, Any]) -> str:
    return f"call_id={creds['call_id']}&peer_id={creds['peer_id']}&token={creds['peer_token']}"


async def test_two_calls_relay_only_within_themselves_and_end_independently(client: SignalingClient) -> None:
    one, two = await make_pair(client), await make_pair(client)
    one.a.send("offer", {"sdp": "one-offer"})
    two.a.send("offer", {"sdp": "two-offer"})
    offer = await one.b.wait_for("offer")
    assert offer == {"type": "offer", "call_id": one.call_id, "from": one.host["peer_id"],
                     "payload": {"sdp": "one-offer"}, "seq": offer["seq"]}
    assert (await two.b.wait_for("offer"))["payload"] == {"sdp": "two-offer"}
    one.b.send("answer", {"sdp": "one-answer"})
    for i in range(3):
        one.a.send("candidate", {"candidate": f"c{i}", "sdpMid": "0", "sdpMLineIndex": 0})
    assert (await one.a.wait_for("answer"))["payload"] == {"sdp": "one-answer"}
    assert [(await one.b.wait_for("candidate"))["payload"]["candidate"] for _ in range(3)] == ["c0", "c1", "c2"]

    await client.end(one.call_id, one.host["peer_token"])
    for conn in (one.a, one.b):
        ended = await conn.wait_for("call_ended")
        assert (ended["call_id"], ended["reason"]) == (one.call_id, "ended")
        assert await conn.wait_closed() == (1000, "ended")
    await assert_relays(two)
    # Nothing of call one ever reached call two, and nobody got their own message back.
    for conn in (two.a, two.b):
        assert all(m.get("call_id") == two.call_id for m in conn.skipped)
    assert not any(m.get("type") == "offer" for m in one.a.skipped)


async def test_state_carries_call_id_and_counts_and_reaches_only_that_call(client: SignalingClient) -> None:
    other = await make_pair(client)
    host = await client.create_call()
    a = await client.connect_as(host)
    first = await a.receive()
    assert first == {
        "type": "state", "call_id": host["call_id"], "status": "waiting", "peer_id": host["peer_id"],
        "polite": False, "participants": {"count": 1, "connected": 1, "max": 2},
        "event": "connected", "subject": host["peer_id"], "last_cseq": None, "seq": 0,
    }
    guest = await client.join(host["call_id"])
    joined = await a.receive()
    assert (joined["event"], joined["subject"], joined["status"], joined["peer_id"]) == (
        "joined", guest["peer_id"], "active", host["peer_id"])
    assert joined["participants"] == {"count": 2, "connected": 1, "max": 2}
    b = await client.connect_as(guest)
    mine = await b.receive()
    assert (mine["peer_id"], mine["polite"], mine["subject"], mine["seq"]) == (guest["peer_id"], True, guest["peer_id"], 0)
    assert (await a.receive())["participants"] == {"count": 2, "connected": 2, "max": 2}
    await assert_relays(other)
    assert not [m for m in other.a.skipped + other.b.skipped if m.get("call_id") != other.call_id]


async def test_messages_before_the_peer_connects_are_delivered_in_order(client: SignalingClient) -> None:
    host = await client.create_call()
    a = await client.connect_as(host)
    a.send("offer", "too early")
    error = await a.wait_for("error")
    assert error["code"] == "no_peer"
    guest = await client.join(host["call_id"])
    for i in range(5):
        a.send("candidate", i)
    a.send("ping")
    await a.wait_for("pong")  # the five candidates are held by now
    b = await client.connect_as(guest)
    assert (await b.receive())["type"] == "state"
    assert [(await b.receive())["payload"] for _ in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.settings(ws_buffer_limit=3)
async def test_held_messages_are_bounded_by_ws_buffer_limit(client: SignalingClient) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    a = await client.connect_as(host)
    for i in range(4):
        a.send("candidate", i)
    error = await a.wait_for("error")
    assert error["code"] == "buffer_full" and "3" in error["message"]
    b = await client.connect_as(guest)
    await b.wait_for("state")
    assert [(await b.receive())["payload"] for _ in range(3)] == [0, 1, 2]


async def test_reconnect_after_a_dropped_socket_gets_the_held_messages(client: SignalingClient) -> None:
    pair = await make_pair(client)
    pair.b.abort()
    gone = await pair.a.wait_for("state", event="disconnected")
    assert gone["subject"] == pair.guest["peer_id"] and gone["participants"]["connected"] == 1
    pair.a.send("candidate", "while away")
    pair.a.send("ping")
    await pair.a.wait_for("pong")
    b = await client.connect_as(pair.guest)
    assert (await b.receive())["event"] == "connected"
    assert (await b.receive())["payload"] == "while away"
    await assert_relays(Pair(pair.host, pair.guest, pair.a, b))


async def test_a_second_socket_of_the_same_peer_replaces_the_first_with_4409(client: SignalingClient) -> None:
    pair = await make_pair(client)
    newer = await client.connect_as(pair.guest)
    assert await pair.b.wait_closed() == (4409, "replaced")
    await newer.wait_for("state")
    await assert_relays(Pair(pair.host, pair.guest, pair.a, newer))


async def refused_with(client: SignalingClient, call_id: str, peer_id: str, token: str, **kw: Any) -> tuple[Any, Any]:
    conn = await client.connect(call_id, peer_id, token, **kw)
    return await conn.wait_closed()


async def test_socket_auth_failures_close_with_4401_or_4404(client: SignalingClient) -> None:
    pair, other = await make_pair(client), await make_pair(client)
    host = pair.host
    assert await refused_with(client, host["call_id"], host["peer_id"], "wrong") == (4401, "unauthorized")
    assert await refused_with(client, host["call_id"], host["peer_id"], other.host["peer_token"]) == (4401, "unauthorized")
    assert await refused_with(client, host["call_id"], other.host["peer_id"], other.host["peer_token"]) == (4401, "unauthorized")
    assert await refused_with(client, "nope", host["peer_id"], host["peer_token"]) == (4404, "call_not_found")
    assert await refused_with(client, host["call_id"], host["peer_id"], "") == (4400, "call_id, peer_id and token are required")
    await assert_relays(pair)


async def test_foreign_origin_is_refused(client: SignalingClient, log_guard: Any) -> None:
    log_guard.expect("signal_srv.ws", "refused a socket from origin https://evil.example")
    log_guard.expect("signal_srv.access", "^403 ")
    host = await client.create_call()
    with pytest.raises(Exception) as info:
        await client.connect_as(host, origin="https://evil.example")
    assert "403" in str(info.value)
    same = await client.connect_as(host, origin=client.base_url)
    assert (await same.receive())["type"] == "state"


@pytest.mark.settings(allowed_origins=("https://app.example",))
async def test_allowed_origins_admits_the_listed_origin(client: SignalingClient) -> None:
    host = await client.create_call()
    conn = await client.connect_as(host, origin="https://app.example")
    assert (await conn.receive())["type"] == "state"


@pytest.mark.parametrize(("frame", "code", "message"), [
    ("{not json", "bad_message", "invalid JSON"),
    ("[1]", "bad_message", "message must be a JSON object"),
    ('{"payload": 1}', "bad_message", "'type' is missing"),
    ('{"type": 5}', "bad_message", "'type' must be a string"),
    ('{"type": "offer"}', "bad_message", "'payload' is missing from 'offer'"),
    ('{"type": "dance", "payload": 1}', "unknown_type", "unknown type 'dance'"),
    ('{"type": "offer", "payload": NaN}', "bad_message", "NaN is not valid JSON"),
    ('{"type": "offer", "payload": "\\ud800"}', "bad_message", "lone surrogate"),
    ('{"type": "offer", "payload": ' + "[" * 5000 + "]" * 5000 + "}", "bad_message", "nested too deeply"),
    ('{"type": "offer", "payload": ' + "9" * 5000 + "}", "bad_message", "invalid JSON"),
    ('{"type": "offer", "payload": "' + "x" * 65400 + '"}', "bad_message", "payload too large"),
], ids=["invalid-json", "not-object", "no-type", "type-not-string", "no-payload", "unknown-type", "nan",
        "lone-surrogate", "deep", "huge-int", "payload-too-large"])
async def test_bad_frames_get_an_error_and_the_socket_and_call_keep_working(
    client: SignalingClient, frame: str, code: str, message: str
) -> None:
    pair, other = await make_pair(client), await make_pair(client)
    pair.a.send_raw(frame)
    error = await pair.a.wait_for("error")
    assert error["code"] == code and message in error["message"]
    await assert_relays(pair)
    await assert_relays(other)


async def test_frame_over_max_message_size_closes_with_1009(client: SignalingClient) -> None:
    pair, other = await make_pair(client), await make_pair(client)
    pair.a.send_raw(json.dumps({"type": "offer", "payload": "x" * 70000}))
    code, _ = await pair.a.wait_closed()
    assert code == 1009
    await assert_relays(other)
    a = await client.connect_as(pair.host)
    await assert_relays(Pair(pair.host, pair.guest, a, pair.b))


async def test_binary_frame_closes_with_1003(client: SignalingClient) -> None:
    pair = await make_pair(client)
    pair.a.send_raw(b"\x00\x01")
    assert await pair.a.wait_closed() == (1003, "binary frames are not accepted")
    gone = await pair.b.wait_for("state", event="disconnected")
    assert gone["subject"] == pair.host["peer_id"]


async def test_ping_frame_gets_pong(client: SignalingClient) -> None:
    pair = await make_pair(client)
    pair.a.send("ping")
    pong = await pair.a.receive()
    assert pong["type"] == "pong" and isinstance(pong["seq"], int)


async def test_leaving_through_rest_closes_the_leavers_socket_and_tells_the_other(client: SignalingClient) -> None:
    pair = await make_pair(client)
    await client.leave(pair.call_id, pair.guest["peer_token"])
    ended = await pair.b.wait_for("call_ended")
    assert ended["reason"] == "left"
    assert await pair.b.wait_closed() == (1000, "left")
    state = await pair.a.wait_for("state", event="left")
    assert (state["subject"], state["reason"], state["status"], state["participants"]["count"]) == (
        pair.guest["peer_id"], "left", "waiting", 1)


async def test_last_leave_and_expiry_close_sockets_with_call_ended(client: SignalingClient) -> None:
    host = await client.create_call()
    a = await client.connect_as(host)
    await client.leave(host["call_id"], host["peer_token"])
    assert (await a.wait_for("call_ended"))["reason"] == "left"
    assert await a.wait_closed() == (1000, "left")


@pytest.mark.settings(heartbeat_interval=0.2, heartbeat_timeout=0.2)
async def test_a_socket_that_stops_answering_pings_is_disconnected_but_keeps_its_slot(
    client: SignalingClient, http_server_port: tuple[Any, int]
) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    a = await client.connect_as(host)
    mute = await raw_socket(http_server_port[1], query_of(guest))
    await a.wait_for("state", event="connected", subject=guest["peer_id"])
    gone = await a.wait_for("state", event="disconnected")
    assert gone["subject"] == guest["peer_id"] and gone["participants"] == {"count": 2, "connected": 1, "max": 2}
    mute.close()
    b = await client.connect_as(guest)
    assert (await b.receive())["participants"]["connected"] == 2


@pytest.mark.settings(call_ttl=0.3, heartbeat_interval=0.1, heartbeat_timeout=0.1)
async def test_a_connected_quiet_call_never_expires_and_expires_once_sockets_are_gone(
    client: SignalingClient, registry: Registry
) -> None:
    pair = await make_pair(client)
    await asyncio.sleep(5 * 0.3)  # the scenario itself: five TTLs of silence, only heartbeats flow
    assert await registry.sweep() == 0
    assert (await client.get_call(pair.call_id))["status"] == "active"
    await assert_relays(pair)
    pair.a.close()
    pair.b.close()
    await registry.wait_ended(pair.call_id, TIMEOUT)
    assert registry.statistics().ended == {"expired": 1}


async def read_frame(stream: IOStream) -> tuple[int, bytes]:
    """The next frame the server sent (unmasked): its opcode and payload."""
    head = await stream.read_bytes(2)
    size = head[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", await stream.read_bytes(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await stream.read_bytes(8))[0]
    return head[0] & 0x0F, await stream.read_bytes(size)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll a server-side fact that has no event of its own, for at most TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def flood_until_cut_off(a: Connection, peer_id: str, *others: Pair) -> None:
    """Relay big messages to ``peer_id`` until ``a`` hears it disconnected; ``others`` must relay on."""
    for _ in range(40):
        for _ in range(10):
            a.send("message", "x" * 60000)
        a.send("ping")
        await a.wait_for("pong")
        for other in others:
            await assert_relays(other)
        if any(m.get("event") == "disconnected" and m.get("subject") == peer_id for m in a.skipped):
            return
    pytest.fail("the slow reader was never closed")


SLOW_READER = {"max_message_size": 65536, "ws_write_buffer_limit": 131072}


async def call_with_slow_reader(client: SignalingClient, port: int) -> tuple[Connection, str, IOStream]:
    """A call whose host socket ``a`` reads, and whose guest's socket has a tiny receive buffer and does not."""
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    a = await client.connect_as(host)
    slow = await raw_socket(port, query_of(guest), rcvbuf=4096)
    await a.wait_for("state", event="connected", subject=guest["peer_id"])
    return a, guest["peer_id"], slow


@pytest.mark.settings(**SLOW_READER, ws_close_grace=4 * TIMEOUT)
async def test_a_slow_reader_that_reads_again_within_the_grace_gets_close_1013(
    client: SignalingClient, http_server_port: tuple[Any, int], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.ws", "closing a socket whose reader fell")
    a, guest_id, slow = await call_with_slow_reader(client, http_server_port[1])
    await flood_until_cut_off(a, guest_id)
    frames = []
    while (frame := await asyncio.wait_for(read_frame(slow), TIMEOUT))[0] != 0x8:
        frames.append(frame)
    opcode, payload = frame
    assert (struct.unpack("!H", payload[:2])[0], payload[2:]) == (1013, b"slow reader")
    # Frames were dropped whole, never cut: everything before the close parses, in order.
    texts = [json.loads(data) for op, data in frames if op == 0x1]
    seqs = [m["seq"] for m in texts]
    assert texts and seqs == sorted(set(seqs))
    await slow.write(bytes([0x88, 0x82, 0, 0, 0, 0]) + struct.pack("!H", 1013))  # masked with zeros
    with pytest.raises(StreamClosedError):
        await asyncio.wait_for(slow.read_bytes(1), TIMEOUT)


@pytest.mark.settings(**SLOW_READER, ws_close_grace=0.2)
async def test_a_slow_reader_that_never_reads_again_is_cut_after_the_grace_and_stalls_nobody(
    client: SignalingClient, registry: Registry, http_server_port: tuple[Any, int], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.ws", "closing a socket whose reader fell")
    other = await make_pair(client)
    a, guest_id, slow = await call_with_slow_reader(client, http_server_port[1])
    assert registry.metrics.sockets == 4
    await flood_until_cut_off(a, guest_id, other)
    await wait_until(lambda: registry.metrics.sockets == 3, "the slow reader's connection is freed")
    with pytest.raises(StreamClosedError):  # what the kernel still held, then the end of the connection
        while True:
            await asyncio.wait_for(read_frame(slow), TIMEOUT)
    await assert_relays(other)
    a.send("ping")
    await a.wait_for("pong")
