"""Hostile clients within the per-frame and per-request limits, against the real server.

Each test plays one attack over real sockets on loopback, bounded in count, and checks that
the server refuses it cheaply and that the participants it must not touch are untouched.
A second client address is a second loopback address (127.0.0.2): Linux routes all of
127.0.0.0/8 to ``lo``, so the server sees a different peer with no proxy in between.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import urllib.request

import pytest
from tornado.iostream import IOStream, StreamClosedError

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer, http
from tests.test_ws import assert_relays, make_pair, query_of

OTHER_IP = "127.0.0.2"

PING, PONG, TEXT, CONTINUATION, CLOSE = 0x9, 0xA, 0x1, 0x0, 0x8


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 section 5.2)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def tcp(port: int, source: str = "127.0.0.1") -> IOStream:
    sock = socket.socket()
    sock.bind((source, 0))
    stream = IOStream(sock)
    await asyncio.wait_for(stream.connect(("127.0.0.1", port)), TIMEOUT)
    return stream


class RawSocket:
    """A WebSocket spoken byte by byte, to send what no well-behaved client library would."""

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, port: int, query: str, source: str = "127.0.0.1") -> RawSocket:
        stream = await tcp(port, source)
        await stream.write(
            f"GET /apiv2/ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(stream)

    def send(self, data: bytes) -> None:
        self.stream.write(data).add_done_callback(lambda f: f.exception())

    async def read(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        first, second = await asyncio.wait_for(self.stream.read_bytes(2), TIMEOUT)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.stream.read_bytes(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.stream.read_bytes(8))[0]
        return first & 0x0F, await asyncio.wait_for(self.stream.read_bytes(n), TIMEOUT)

    async def read_until(self, needle: bytes) -> bytes:
        """The payload of the next text frame that contains ``needle``."""
        while True:
            opcode, payload = await self.read()
            if opcode == TEXT and needle in payload:
                return payload

    async def close_code(self) -> tuple[int, str]:
        """Read until the server's close frame; its code and reason (we do not answer it)."""
        while True:
            opcode, payload = await self.read()
            if opcode == CLOSE:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    async def dropped(self) -> bool:
        """True once the server has closed the TCP connection."""
        try:
            await asyncio.wait_for(self.stream.read_until_close(), TIMEOUT)
        except StreamClosedError:
            pass
        return True


async def metric(client: SignalingClient, name: str) -> float:
    """The value of one series of /metrics (0 if absent), e.g. ``signal_srv_rate_limited_total{limit="ws"}``."""
    text = (await client.http.fetch(client.base_url + "/metrics")).body.decode()
    found = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


# Item 3: control frames, fragments, and reading after a close -----------------------------


@pytest.mark.settings(ws_rate=50.0, ws_rate_burst=20)
async def test_a_ping_flood_is_closed_with_1008_and_counted(client: SignalingClient, port: int) -> None:
    pair, other = await make_pair(client), await make_pair(client)
    host = await client.create_call()
    flood = await RawSocket.open(port, query_of(host))
    flood.send(b"".join(frame(PING, b"x") for _ in range(2000)))
    assert await flood.close_code() == (1008, "rate limit exceeded")
    assert await metric(client, 'signal_srv_rate_limited_total{limit="ws"}') >= 10
    await assert_relays(pair)
    await assert_relays(other)


async def test_endless_empty_continuation_frames_are_closed(client: SignalingClient, port: int) -> None:
    pair = await make_pair(client)
    host = await client.create_call()
    sock = await RawSocket.open(port, query_of(host))
    sock.send(frame(TEXT, b'{"type": "message", "payload": ', fin=False))
    sock.send(b"".join(frame(CONTINUATION, fin=False) for _ in range(1000)))
    assert await sock.close_code() == (1008, "a message may come in at most 128 frames")
    await assert_relays(pair)


@pytest.mark.settings(ws_rate=0.01, ws_rate_burst=5)
async def test_every_fragment_counts_against_the_frame_rate(client: SignalingClient, port: int) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    b = await client.connect_as(guest)
    sock = await RawSocket.open(port, query_of(host))
    parts = [b'{"type": "message", ', b'"payload": ', b'"in eight', b" frames", b", too many", b" for a", b" burst", b' of 5"}']
    sock.send(frame(TEXT, parts[0], fin=False) + b"".join(frame(CONTINUATION, p, fin=p == parts[-1]) for p in parts[1:]))
    assert b'"code":"rate_limited"' in await sock.read_until(b'"error"')
    b.send("message", "after")  # the guest's own budget is untouched
    assert b'"payload":"after"' in await sock.read_until(b'"after"')
    assert await metric(client, 'signal_srv_messages_relayed_total{type="message"}') == 1  # not the fragmented one


@pytest.mark.parametrize(("query", "code"), [
    ("call_id=x&peer_id=y", 4400), ("call_id={call_id}&peer_id={peer_id}&token=wrong", 4401)])
async def test_after_a_refusal_the_server_reads_nothing_more(
    client: SignalingClient, port: int, query: str, code: int
) -> None:
    host = await client.create_call()
    sock = await RawSocket.open(port, query.format(**host))
    assert (await sock.close_code())[0] == code
    sock.send(b"".join(frame(TEXT, b"not json") for _ in range(200)))  # and no closing reply
    assert await sock.dropped()
    assert await metric(client, 'signal_srv_errors_total{code="bad_message"}') == 0


# Item 4: budgets per participant, reconnects, sockets per address, relaying ---------------


@pytest.mark.settings(ws_rate=0.01, ws_rate_burst=5)
async def test_the_frame_budget_is_the_participants_and_survives_a_reconnect(client: SignalingClient) -> None:
    pair = await make_pair(client)
    for i in range(5):
        pair.a.send("candidate", i)
    assert [(await pair.b.wait_for("candidate"))["payload"] for _ in range(5)] == [0, 1, 2, 3, 4]
    pair.a.close()
    await pair.b.wait_for("state", event="disconnected")
    again = await client.connect_as(pair.host)
    await again.wait_for("state", subject=pair.host["peer_id"])
    again.send("candidate", "over")
    assert (await again.wait_for("error"))["code"] == "rate_limited"


@pytest.mark.settings(ws_bytes_rate=1.0, ws_bytes_burst=10000)
async def test_a_bytes_budget_refuses_big_frames_past_the_burst(client: SignalingClient) -> None:
    pair = await make_pair(client)
    for tag in ("one", "two", "three"):
        pair.a.send("message", tag + "x" * 4000)
    error = await pair.a.wait_for("error")
    assert error["code"] == "rate_limited" and "10000" not in error["message"]
    assert [(await pair.b.wait_for("message"))["payload"][:3] for _ in range(2)] == ["one", "two"]
    assert await metric(client, 'signal_srv_rate_limited_total{limit="ws"}') == 1


@pytest.mark.settings(ws_reconnect_rate=0.01, ws_reconnect_burst=3)
async def test_connects_per_participant_are_limited_and_leave_the_current_socket_alone(
    client: SignalingClient,
) -> None:
    pair = await make_pair(client)  # the host's first connect
    current = pair.a
    for _ in range(2):
        newer = await client.connect_as(pair.host)
        await newer.wait_for("state", subject=pair.host["peer_id"])
        assert (await current.wait_closed())[0] == 4409
        current = newer
    refused = await client.connect_as(pair.host)
    code, reason = await refused.wait_closed()
    assert code == 1013 and reason is not None and reason.startswith("reconnecting too fast")
    await assert_relays(type(pair)(pair.host, pair.guest, current, pair.b))
    connected = [m for m in pair.b.skipped if m.get("event") == "connected"]
    assert len(connected) == 2  # the other participant saw the two accepted reconnects only
    assert await metric(client, 'signal_srv_rate_limited_total{limit="ws_connect"}') == 1


@pytest.mark.settings(ws_sockets_per_ip=2)
async def test_open_sockets_per_client_address_are_capped(client: SignalingClient, port: int) -> None:
    calls = [await client.create_call() for _ in range(3)]
    guest = await client.join(calls[0]["call_id"])
    watcher = await RawSocket.open(port, query_of(guest), source=OTHER_IP)
    first = await RawSocket.open(port, query_of(calls[0]))
    await RawSocket.open(port, query_of(calls[1]))
    third = await RawSocket.open(port, query_of(calls[2]))
    assert await third.close_code() == (1013, "too many sockets from your address")
    first.stream.close()
    await watcher.read_until(b'"event":"disconnected"')
    again = await RawSocket.open(port, query_of(calls[2]))
    assert b'"event":"connected"' in await again.read_until(b'"state"')
    assert await metric(client, 'signal_srv_rate_limited_total{limit="ws_ip"}') == 1


@pytest.mark.settings(ws_ip_rate=0.01, ws_ip_rate_burst=3)
async def test_the_sockets_of_one_address_share_its_frame_budget(client: SignalingClient, port: int) -> None:
    pair = await make_pair(client)  # both participants on 127.0.0.1
    for i in range(3):
        pair.a.send("message", i)
    assert [(await pair.b.wait_for("message"))["payload"] for _ in range(3)] == [0, 1, 2]
    pair.b.send("message", "the address's fourth frame")
    assert (await pair.b.wait_for("error"))["code"] == "rate_limited"
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    elsewhere = await RawSocket.open(port, query_of(host), source=OTHER_IP)
    receiver = await RawSocket.open(port, query_of(guest), source="127.0.0.3")
    elsewhere.send(frame(TEXT, b'{"type": "message", "payload": "from another address"}'))
    assert b"from another address" in await receiver.read_until(b'"message"')


@pytest.mark.settings(ws_ip_connect_rate=0.01, ws_ip_connect_burst=2)
async def test_handshakes_over_the_address_connect_rate_are_refused_before_the_upgrade(
    client: SignalingClient, port: int
) -> None:
    host = await client.create_call()
    for _ in range(2):
        await RawSocket.open(port, query_of(host))
    stream = await tcp(port)
    await stream.write(f"GET /apiv2/ws?{query_of(host)} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 429") and b"Retry-After: 100" in head
    assert await RawSocket.open(port, query_of(host), source=OTHER_IP)
    assert await metric(client, 'signal_srv_rate_limited_total{limit="ws_ip_connect"}') == 1


async def test_a_payload_is_relayed_as_the_sender_wrote_it(client: SignalingClient, port: int) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    sender = await client.connect_as(host)
    receiver = await RawSocket.open(port, query_of(guest))
    payload = '{ "sdp" : "v=0\\r\\n", "n": [2.50, 1E2, -0.0], "\u00e9": "\\u00e9" }'
    sender.send_raw('{"payload": ' + payload + ', "type": "offer"}')
    relayed = (await receiver.read_until(b'"offer"')).decode()
    assert f'"payload":{payload},"seq":' in relayed



# Item 7: wrong tokens never crowd out authorized work ------------------------------------


async def wrong_leave_flood(port: int, call_id: str, connections: int = 40, each: int = 10) -> list[IOStream]:
    """``connections`` connections from ``OTHER_IP``, each with ``each`` pipelined leaves of ``call_id``
    under a wrong token, written before anything is read (see ``statuses``)."""
    request = (f"POST /apiv2/calls/{call_id}/leave HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {'w' * 22}\r\n"
               "Content-Length: 0\r\n\r\n").encode()
    streams = [await tcp(port, OTHER_IP) for _ in range(connections)]
    for stream in streams:
        await stream.write(request * each)
    return streams


async def statuses(stream: IOStream, count: int = 10) -> list[int]:
    """The status codes of the next ``count`` answers on ``stream``."""
    codes = []
    for _ in range(count):
        head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), TIMEOUT)
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await stream.read_bytes(length)
        codes.append(int(head.split()[1]))
    return codes


@pytest.mark.settings(mailbox_size=2, auth_failure_rate=1.0, auth_failure_burst=10)
async def test_pipelined_wrong_tokens_never_fail_the_participants_own_requests(client: SignalingClient, port: int) -> None:
    host = await client.create_call()
    call_id = host["call_id"]
    attackers = await wrong_leave_flood(port, call_id)

    async def own_requests() -> list[int]:
        bearer = {"Authorization": f"Bearer {host['peer_token']}"}
        return [(await client.request("GET", f"/apiv2/config?call_id={call_id}", headers=bearer))[0]
                for _ in range(20)]

    own, *attacked = await asyncio.gather(own_requests(), *(statuses(s) for s in attackers))
    assert own == [200] * 20
    codes = [code for stream_codes in attacked for code in stream_codes]
    assert set(codes) == {401, 429} and codes.count(401) == 10
    assert await metric(client, 'signal_srv_rate_limited_total{limit="auth"}') == 390
    assert (await client.leave(call_id, host["peer_token"]))["status"] == "ended"


@pytest.mark.settings(auth_failure_rate=0.01, auth_failure_burst=2)
async def test_wrong_tokens_past_the_limit_close_sockets_with_1008(client: SignalingClient, port: int) -> None:
    host = await client.create_call()
    closes = []
    for _ in range(3):
        sock = await RawSocket.open(port, f"call_id={host['call_id']}&peer_id={host['peer_id']}&token=wrong")
        closes.append((await sock.close_code())[0])
    assert closes == [4401, 4401, 1008]
    right = await client.connect_as(host)
    assert (await right.receive())["type"] == "state"  # the right token from the same address still works


# Item 9: only authenticated sockets count against max_sockets -----------------------------


@pytest.mark.settings(max_sockets=2)
async def test_bogus_handshakes_neither_count_nor_get_a_participant_closed(client: SignalingClient, port: int) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    a = await client.connect_as(host)
    await a.wait_for("state", subject=host["peer_id"])
    bogus = await asyncio.gather(*(
        RawSocket.open(port, f"call_id={host['call_id']}&peer_id={guest['peer_id']}&token=wrong", source=OTHER_IP)
        for _ in range(30)))
    b = await client.connect_as(guest)
    assert (await b.receive())["event"] == "connected"
    assert [(await s.close_code())[0] for s in bogus] == [4401] * 30  # none of them answers the close
    await assert_relays(type("P", (), {"a": a, "b": b})())  # type: ignore[arg-type]


# Item 6: HTTP timeouts, connections per address, running out of descriptors ---------------


async def closed_by_server(stream: IOStream) -> bool:
    try:
        await asyncio.wait_for(stream.read_until_close(), TIMEOUT)
    except StreamClosedError:
        pass
    return True


@pytest.mark.settings(http_idle_timeout=0.2)
async def test_headers_that_never_end_and_idle_keep_alive_connections_are_closed(port: int) -> None:
    partial, idle = await tcp(port), await tcp(port)
    await partial.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await idle.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await asyncio.wait_for(idle.read_until(b"\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 200")
    assert await closed_by_server(partial)
    assert await closed_by_server(idle)


@pytest.mark.settings(http_body_timeout=0.2)
async def test_a_body_that_never_arrives_is_dropped(port: int) -> None:
    stream = await tcp(port)
    await stream.write(b"POST /apiv2/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"a\":")
    assert await closed_by_server(stream)


@pytest.mark.settings(http_connections_per_ip=3)
async def test_connections_per_client_address_are_capped(client: SignalingClient, port: int) -> None:
    held = [await tcp(port) for _ in range(3)]
    for stream in held:
        await stream.write(b"GET /healthz HTTP/1.1\r\n")  # headers left unfinished: the connection stays open
    over = await tcp(port)
    assert await closed_by_server(over)
    elsewhere = await tcp(port, OTHER_IP)
    await elsewhere.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await asyncio.wait_for(elsewhere.read_until(b"\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 200")
    held[0].close()
    assert await healthz_answers(port), "a freed place was not given to a new connection"
    assert await metric(client, 'signal_srv_rate_limited_total{limit="http_ip"}') >= 1


async def healthz_answers(port: int) -> bool:
    """Retry ``GET /healthz`` on new connections until one is answered (False after TIMEOUT)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while loop.time() < deadline:
        stream = await tcp(port)
        try:
            await stream.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await asyncio.wait_for(stream.read_until(b"\r\n"), max(deadline - loop.time(), 0.01))
        except (StreamClosedError, asyncio.TimeoutError):
            continue
        finally:
            stream.close()
        return head.startswith(b"HTTP/1.1 200")
    return False


def test_out_of_descriptors_the_server_pauses_accepting_then_answers_again() -> None:
    server = LiveServer(nofile=64).start()  # its own process, with its own small open-file limit
    try:
        held = []
        for _ in range(100):  # more than the server can hold; the rest wait in the listen backlog
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            held.append(conn)
        server.wait_for_log("cannot accept connections")
        for conn in held:
            conn.close()
        status, body, _ = http("GET", server.base_url + "/healthz")
        assert (status, body["status"]) == (200, "ok")
        metrics = urllib.request.urlopen(server.base_url + "/metrics", timeout=TIMEOUT).read().decode()
        paused = float(re.search(r"^signal_srv_accept_paused_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
        assert paused >= 1
        assert sum("cannot accept connections" in line for line in server.lines) == 1  # one warning per burst
        assert not server.problems(), server.problems()[:5]
    finally:
        server.stop()


@pytest.mark.settings(http_connections_per_ip=1, xheaders=True)
async def test_behind_a_proxy_connections_are_not_capped_per_peer(port: int) -> None:
    """Every connection comes from the proxy then: capping them per client is the proxy's job."""
    held = await tcp(port)
    await held.write(b"GET /healthz HTTP/1.1\r\n")
    assert await healthz_answers(port)
