"""Abuse limits against the real server: per-IP rates, socket rate, socket cap, metrics."""

from __future__ import annotations

from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from signal_srv.client import SignalingClient
from signal_srv.limits import RateLimiter, TokenBucket
from tests.test_ws import assert_relays, make_pair


def test_token_bucket_grants_a_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0


def test_rate_limiter_keeps_a_bucket_per_key_and_bounds_its_memory() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_keys=100)
    assert limiter.take("a", 0.0) == 0.0 and limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0
    for i in range(1000):
        limiter.take(f"ip{i}", 0.0)
    assert len(limiter) <= 100


@pytest.mark.settings(rate_create=1.0, rate_create_burst=3)
async def test_creating_too_fast_from_one_ip_is_429_with_retry_after(client: SignalingClient) -> None:
    answers = [await client.request("POST", "/apiv2/calls") for _ in range(4)]
    assert [status for status, _, _ in answers] == [201, 201, 201, 429]
    _, body, headers = answers[-1]
    assert body["error"]["code"] == "rate_limited" and headers["Retry-After"] == "1"
    assert (await client.join(answers[0][1]["call_id"]))["status"] == "active"  # other routes unaffected


@pytest.mark.settings(rate_join=1.0, rate_join_burst=2)
async def test_joining_too_fast_from_one_ip_is_429(client: SignalingClient) -> None:
    calls = [await client.create_call() for _ in range(3)]
    answers = [await client.request("POST", f"/apiv2/calls/{c['call_id']}/join") for c in calls]
    assert [status for status, _, _ in answers] == [200, 200, 429]


@pytest.mark.settings(rate_create=1.0, rate_create_burst=1, xheaders=True)
async def test_behind_a_proxy_the_limit_is_per_forwarded_address(client: SignalingClient) -> None:
    def post(ip: str) -> Any:
        return client.request("POST", "/apiv2/calls", headers={"X-Real-IP": ip})
    assert [(await post("10.0.0.1"))[0], (await post("10.0.0.1"))[0], (await post("10.0.0.2"))[0]] == [201, 429, 201]


@pytest.mark.settings(rate_create=1.0, rate_create_burst=1)
async def test_without_xheaders_forwarded_addresses_are_ignored(client: SignalingClient) -> None:
    first = await client.request("POST", "/apiv2/calls", headers={"X-Real-IP": "10.0.0.1"})
    second = await client.request("POST", "/apiv2/calls", headers={"X-Real-IP": "10.0.0.2"})
    assert (first[0], second[0]) == (201, 429)


@pytest.mark.settings(ws_rate=1.0, ws_rate_burst=5)
async def test_a_socket_over_its_frame_rate_gets_rate_limited_then_1008(client: SignalingClient) -> None:
    pair, other = await make_pair(client), await make_pair(client)
    for i in range(5):
        pair.a.send("candidate", i)
    pair.a.send("candidate", "over")
    error = await pair.a.wait_for("error")
    assert error["code"] == "rate_limited"
    assert [(await pair.b.wait_for("candidate"))["payload"] for _ in range(5)] == [0, 1, 2, 3, 4]
    for _ in range(12):
        pair.a.send("candidate", "flood")
    assert await pair.a.wait_closed() == (1008, "rate limit exceeded")
    await assert_relays(other)


@pytest.mark.settings(max_sockets=2)
async def test_sockets_past_max_sockets_are_closed_with_1013(client: SignalingClient) -> None:
    pair = await make_pair(client)
    host = await client.create_call()
    third = await client.connect_as(host)
    assert await third.wait_closed() == (1013, "server busy")
    pair.b.close()
    await pair.a.wait_for("state", event="disconnected")
    again = await client.connect_as(host)
    assert (await again.receive())["type"] == "state"


async def test_metrics_count_calls_sockets_relays_and_errors(client: SignalingClient) -> None:
    pair = await make_pair(client)
    await client.create_call()
    pair.a.send("offer", {"sdp": "x"})
    await pair.b.wait_for("offer")
    pair.a.send_raw("nonsense")
    await pair.a.wait_for("error")
    await client.request("GET", "/apiv2/calls/nope")
    response = await client.http.fetch(client.base_url + "/metrics")
    text = response.body.decode()
    assert response.headers["Content-Type"].startswith("text/plain")
    for line in (
        'signal_srv_calls{status="waiting"} 1.0', 'signal_srv_calls{status="active"} 1.0',
        "signal_srv_calls_created_total 2.0", "signal_srv_sockets 2.0",
        'signal_srv_messages_relayed_total{type="offer"} 1.0',
        'signal_srv_errors_total{code="bad_message"} 1.0', 'signal_srv_errors_total{code="call_not_found"} 1.0',
        'signal_srv_http_request_duration_seconds_count{method="POST",route="CallsHandler"} 2.0',
    ):
        assert line in text, line
    assert pair.host["peer_token"] not in text


async def test_health_and_readiness(client: SignalingClient, registry: Any) -> None:
    status, body, _ = await client.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok", "calls": {"waiting": 0, "active": 0},
                                    "node_id": registry.placement.node_id, "redis": "none"})
    assert (await client.request("GET", "/readyz"))[:2] == (200, {"status": "ready"})


@pytest.mark.settings(max_calls=1)
async def test_readyz_is_503_at_capacity(client: SignalingClient, log_guard: Any) -> None:
    log_guard.expect("signal_srv.access", "^503 GET /readyz")
    await client.create_call()
    status, body, headers = await client.request("GET", "/readyz")
    assert (status, body, headers["Retry-After"]) == (503, {"status": "at_capacity"}, "1")


async def test_while_shutting_down_readyz_and_create_answer_503(
    client: SignalingClient, registry: Any, log_guard: Any
) -> None:
    log_guard.expect("signal_srv.access", "^503 ")
    pair = await make_pair(client)
    await registry.close()
    assert (await pair.a.wait_for("server_shutdown"))["type"] == "server_shutdown"
    status, body, _ = await client.request("GET", "/readyz")
    assert (status, body) == (503, {"status": "shutting_down"})
    status, body, headers = await client.request("POST", "/apiv2/calls")
    assert (status, body["error"]["code"], headers["Retry-After"], headers["Connection"]) == (
        503, "shutting_down", "1", "close")
    token = {"Authorization": f"Bearer {pair.host['peer_token']}"}
    for method, path in [("GET", ""), ("POST", "/join"), ("POST", "/end")]:
        status, body, _ = await client.request(method, f"/apiv2/calls/{pair.call_id}{path}", headers=token)
        assert (status, body["error"]["code"]) == (503, "shutting_down"), (method, path)
    with pytest.raises(HTTPClientError) as refused:  # refused at the handshake: nothing is upgraded any more
        await client.connect_as(pair.host)
    assert refused.value.code == 503
