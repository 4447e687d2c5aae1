"""Hostile clients against the real server: what they can learn, make it store or make it log.

Each test is an attack from the security review, through real HTTP and WebSocket requests.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from tornado.iostream import IOStream

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer, SyncSocket, http


@pytest.mark.settings(list_calls="off")
async def test_reuse_last_is_refused_like_listing_when_listing_is_off(client: SignalingClient) -> None:
    victim = await client.create_call()
    status, body, _ = await client.request("POST", "/apiv2/calls?reuse_last=true")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert victim["call_id"] not in json.dumps(body)
    assert (await client.request("GET", "/apiv2/calls"))[0] == 404  # the same answer as listing
    assert (await client.get_call(victim["call_id"]))["participants"]["count"] == 1
    status, created, _ = await client.request("POST", "/apiv2/calls?reuse_last=false")
    assert status == 201 and created["call_id"] != victim["call_id"]


def series(metrics_text: str) -> list[str]:
    """The metric series of a Prometheus text page (its sample lines, without values)."""
    return [line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")]


async def test_made_up_methods_and_paths_add_no_metric_series(client: SignalingClient) -> None:
    async def scrape() -> list[str]:
        response = await client.http.fetch(client.base_url + "/metrics")
        return series(response.body.decode())

    async def flood(i: int) -> None:
        assert (await client.request(f"X{i:06d}", "/healthz"))[0] == 405
        assert (await client.request(f"Y{i:06d}", f"/no/such/path/{i}"))[0] == 405
        assert (await client.request("GET", f"/no/such/path/{i}"))[0] == 404

    await flood(0)
    await scrape()
    before = await scrape()
    for i in range(1, 201):
        await flood(i)
    after = await scrape()
    assert after == before
    assert any('method="other"' in s for s in after) and any('route="other"' in s for s in after)


HUGE = "9" * 5000  # over Python's 4300-digit limit for int()


@pytest.mark.parametrize("limit", [HUGE, "1" * 19, "0" * 4999 + "1"], ids=["5000 digits", "19", "leading zeros"])
async def test_a_huge_limit_is_400_not_a_crash(client: SignalingClient, limit: str) -> None:
    status, body, _ = await client.request("GET", f"/apiv2/calls?limit={limit}")
    assert (status, body["error"]["code"]) == (400, "bad_request")


async def raw_request(port: int, head: str) -> bytes:
    """Send a request head over a plain TCP connection; everything the server answers until it closes."""
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", port))
    await stream.write(head.encode())
    return await asyncio.wait_for(stream.read_until_close(), TIMEOUT)


async def test_a_huge_content_length_is_400_not_a_crash(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    answer = await raw_request(port, f"POST /apiv2/calls HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                     f"Content-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n{{}}")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "bad_request"


async def test_a_huge_last_seq_closes_the_socket_with_4400(client: SignalingClient) -> None:
    host = await client.create_call()
    socket = await client.connect_as(host, last_seq=HUGE)
    assert await socket.wait_closed() == (4400, "last_seq must be a whole number")
    again = await client.connect_as(host, last_seq="1" * 19)
    assert await again.wait_closed() == (4400, "last_seq must be a whole number")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_tokens_are_redacted_under_percent_encoded_names(log_format: str) -> None:
    server = LiveServer(log_format=log_format).start()
    try:
        status, host, _ = http("POST", server.base_url + "/apiv2/calls")
        assert status == 201
        token = host["peer_token"]
        for name in ("tok%65n", "%74oken", "%74%6F%6B%65%6E"):
            # These names are "token" to the server: the socket is accepted.
            query = f"call_id={host['call_id']}&peer_id={host['peer_id']}&{name}={token}"
            socket = SyncSocket(f"{server.ws_url}/apiv2/ws?{query}")
            assert socket.recv()["type"] == "state"
            socket.close()
            http("GET", f"{server.base_url}/apiv2/calls?{name}={token}&peer_%74oken={token}")
        http("GET", f"{server.base_url}/apiv2/calls?Tok%65n={token}")
        status, _, _ = http("GET", server.base_url + "/healthz")  # its access line follows the others
        assert status == 200
    finally:
        assert server.stop() == 0
    access = [line for line in server.lines if "/apiv2/calls?" in line or "/apiv2/ws?" in line]
    assert len(access) >= 7
    assert not [line for line in server.lines if token in line]
    assert all("=[redacted]" in line for line in access)
