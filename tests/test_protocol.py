"""The socket's frame reader (signal_srv/protocol.py) against raw RFC 6455 bytes, however they arrive."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from signal_srv.client import SignalingClient
from tests.test_abuse import CONTINUATION, PING, PONG, TEXT, RawSocket, frame
from tests.test_ws import assert_relays, make_pair, query_of

MESSAGE = json.dumps({"type": "message", "payload": "x" * 300}, separators=(",", ":")).encode()


async def raw_host_and_guest(client: SignalingClient, port: int) -> tuple[RawSocket, Any]:
    """The host on a raw socket, the guest on the client; both connected."""
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    raw = await RawSocket.open(port, query_of(host))
    b = await client.connect_as(guest)
    await raw.read_until(b'"connected":2')
    return raw, b


async def test_a_fragmented_message_with_a_ping_between_its_parts_arrives_whole(
    client: SignalingClient, port: int
) -> None:
    raw, guest = await raw_host_and_guest(client, port)
    parts = [MESSAGE[:7], MESSAGE[7:150], MESSAGE[150:]]
    raw.send(frame(TEXT, parts[0], fin=False) + frame(PING, b"between") + frame(CONTINUATION, parts[1], fin=False)
             + frame(CONTINUATION, parts[2]))
    assert await raw.read() == (PONG, b"between")
    assert (await guest.wait_for("message"))["payload"] == "x" * 300


async def test_frames_that_arrive_a_few_bytes_at_a_time_or_many_at_once_are_read_whole(
    client: SignalingClient, port: int
) -> None:
    raw, guest = await raw_host_and_guest(client, port)
    one = frame(TEXT, MESSAGE)  # a 16-bit extended length: its header arrives in pieces too
    for i in range(0, len(one), 3):
        await raw.stream.write(one[i:i + 3])
    raw.send(b"".join(frame(TEXT, json.dumps({"type": "message", "payload": n}).encode()) for n in range(20)))
    assert (await guest.wait_for("message"))["payload"] == "x" * 300
    assert [(await guest.wait_for("message"))["payload"] for _ in range(20)] == list(range(20))


@pytest.mark.parametrize("bad", [
    pytest.param(bytes([0x80 | 0x40 | TEXT]) + frame(TEXT, b"{}")[1:], id="reserved bit"),
    pytest.param(struct.pack("!BBH", 0x80 | PING, 0x80 | 126, 200) + b"\0" * 204, id="control frame of 200 bytes"),
    pytest.param(frame(PING, b"x", fin=False), id="fragmented control frame"),
    pytest.param(frame(CONTINUATION, b"x"), id="continuation of nothing"),
    pytest.param(frame(TEXT, b"{", fin=False) + frame(TEXT, b"{}"), id="new message inside a fragmented one"),
])
async def test_a_frame_that_breaks_the_protocol_drops_only_its_connection(
    client: SignalingClient, port: int, bad: bytes
) -> None:
    pair = await make_pair(client)
    raw, _ = await raw_host_and_guest(client, port)
    raw.send(bad)
    assert await raw.dropped()
    await assert_relays(pair)


async def test_a_frame_declared_too_big_is_closed_with_1009_before_its_payload_arrives(
    client: SignalingClient, port: int
) -> None:
    raw, _ = await raw_host_and_guest(client, port)
    raw.send(struct.pack("!BBQ", 0x80 | TEXT, 0x80 | 127, 10 ** 9))  # and nothing more
    assert await raw.close_code() == (1009, "message too big")
