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
