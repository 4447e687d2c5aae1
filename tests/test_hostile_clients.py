"""Hostile clients against the real server: what they can learn, make it store or make it log.

Each test is an attack from the security review, through real HTTP and WebSocket requests.
"""

from __future__ import annotations

import json

import pytest

from signal_srv.client import SignalingClient


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
