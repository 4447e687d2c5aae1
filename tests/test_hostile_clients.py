"""Hostile clients against the real server: what they can learn, make it store or make it log.

Each test is an attack from the security review, through real HTTP and WebSocket requests.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

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


@pytest.mark.parametrize("request_line", ["POST /apiv2/calls", "GET /healthz", "GET /metrics", "GET /",
                                          "GET /apiv2/openapi.json", "GET /apiv2/ws"])
async def test_a_huge_content_length_is_400_not_a_crash(base_url: str, request_line: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    answer = await raw_request(port, f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                     f"Content-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n{{}}")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    if body:  # the JSON routes answer; Tornado refuses for the others before they see the request
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


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def assert_secure(headers: dict[str, str]) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (name, headers)
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "camera=(self)" in headers["Permissions-Policy"] and "microphone=(self)" in headers["Permissions-Policy"]
    assert "Server" not in headers, headers["Server"]


async def test_the_demo_page_carries_its_security_policy(client: SignalingClient) -> None:
    response = await client.http.fetch(client.base_url + "/?call=AAAAAAAAAAAAAAAAAAAAAA")
    headers = dict(response.headers)
    assert headers["Content-Type"].startswith("text/html")
    assert_secure(headers)
    policy = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split("; ")}
    assert policy["default-src"] == ["'self'"] and policy["object-src"] == ["'none'"]
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
    for name in ("demo.js", "demo.css"):
        assert_secure(dict((await client.http.fetch(f"{client.base_url}/{name}")).headers))


async def test_json_answers_are_not_stored_and_reveal_no_server_version(client: SignalingClient) -> None:
    answers = [
        await client.request("POST", "/apiv2/calls"),  # credentials
        await client.request("GET", "/apiv2/calls/AAAAAAAAAAAAAAAAAAAAAA"),  # an error
        await client.request("GET", "/no/such/path"),
        await client.request("DELETE", "/healthz"),
    ]
    assert [status for status, _, _ in answers] == [201, 404, 404, 405]
    for _, _, headers in answers:
        assert headers["Cache-Control"] == "no-store"
        assert headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert_secure(headers)


async def handshake(base_url: str, query: str, headers: dict[str, str] | None = None) -> str:
    """Open a socket over plain TCP with ``headers`` (Host: 127.0.0.1:port unless given); the answer's head."""
    port = int(base_url.rsplit(":", 1)[1])
    lines = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", port))
    await stream.write((f"GET /apiv2/ws?{query} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                        + "".join(f"{k}: {v}\r\n" for k, v in lines.items()) + "\r\n").encode())
    try:
        return (await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), TIMEOUT)).decode()
    finally:
        stream.close()


def socket_query(credentials: dict[str, Any]) -> str:
    return f"call_id={credentials['call_id']}&peer_id={credentials['peer_id']}&token={credentials['peer_token']}"


async def test_the_socket_handshake_reveals_no_server_version(base_url: str, client: SignalingClient) -> None:
    head = await handshake(base_url, socket_query(await client.create_call()))
    assert head.startswith("HTTP/1.1 101")
    assert "\r\nserver:" not in head.lower() and "nosniff" in head


# DNS rebinding: a page on evil.example, its name rebound to 127.0.0.1, sends Host: evil.example.


async def test_a_rebound_host_is_refused_on_a_default_server(base_url: str, client: SignalingClient) -> None:
    host = await client.create_call()
    head = await handshake(base_url, socket_query(host), {"Host": "evil.example", "Origin": "http://evil.example"})
    assert head.startswith("HTTP/1.1 400 ")
    for method, path in (("GET", "/apiv2/calls"), ("POST", "/apiv2/calls"), ("GET", f"/apiv2/calls/{host['call_id']}"),
                         ("GET", "/"), ("GET", "/metrics"), ("GET", "/no/such/path")):
        status, body, headers = await client.request(method, path, headers={"Host": "evil.example:8080"})
        assert (status, body["error"]["code"]) == (400, "host_not_allowed"), (method, path)
        assert headers["Cache-Control"] == "no-store"
    assert [c["call_id"] for c in await client.list_calls()] == [host["call_id"]]  # nothing was created


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "LocalHost.", "[::1]", "10.1.2.3"])
async def test_ip_literals_and_localhost_are_served_on_a_default_server(client: SignalingClient, name: str) -> None:
    status, _, _ = await client.request("GET", "/healthz", headers={"Host": f"{name}:8080"})
    assert status == 200


async def test_the_same_origin_counts_only_on_an_allowed_host(
    base_url: str, client: SignalingClient, log_guard: Any
) -> None:
    log_guard.expect("signal_srv.ws", "refused a socket from origin")
    query = socket_query(await client.create_call())
    port = base_url.rsplit(":", 1)[1]
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        head = await handshake(base_url, query, {"Host": origin.split("//")[1], "Origin": origin})
        assert head.startswith("HTTP/1.1 101"), origin
    head = await handshake(base_url, query, {"Origin": "http://evil.example"})  # Host: 127.0.0.1
    assert head.startswith("HTTP/1.1 403 ")


@pytest.mark.settings(allowed_hosts=("call.example.org", "*.calls.example.org"))
async def test_allowed_hosts_names_the_hosts_served(base_url: str, client: SignalingClient, log_guard: Any) -> None:
    log_guard.expect("signal_srv.ws", "refused a socket from origin")
    for name, served in (("call.example.org", True), ("a.calls.example.org", True), ("calls.example.org", False),
                         ("localhost", False), ("127.0.0.1", True), ("evil.example", False)):
        status, _, _ = await client.request("GET", "/healthz", headers={"Host": name})
        assert status == (200 if served else 400), name
    query = socket_query(await client.create_call())
    head = await handshake(base_url, query, {"Host": "call.example.org", "Origin": "https://call.example.org"})
    assert head.startswith("HTTP/1.1 101")
    head = await handshake(base_url, query, {"Origin": "http://evil.example"})
    assert head.startswith("HTTP/1.1 403 ")


@pytest.mark.settings(allowed_hosts=("*",))
async def test_allowed_hosts_star_serves_any_host(base_url: str, client: SignalingClient) -> None:
    head = await handshake(base_url, socket_query(await client.create_call()),
                           {"Host": "any.example", "Origin": "http://any.example"})
    assert head.startswith("HTTP/1.1 101")
