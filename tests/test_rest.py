"""The v2 REST API against the real server over real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from signal_srv.client import ApiError, SignalingClient
from signal_srv.registry import Registry
from tests.conftest import TIMEOUT


async def error_of(awaitable: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        await awaitable
    return info.value.status, info.value.code


async def test_create_answers_201_with_location_and_host_credentials(client: SignalingClient) -> None:
    status, body, headers = await client.request("POST", "/apiv2/calls")
    assert status == 201
    assert headers["Location"] == f"/apiv2/calls/{body['call_id']}"
    assert body["status"] == "waiting" and body["role"] == "host" and body["polite"] is False
    assert body["participants"] == {"count": 1, "max": 2}
    assert body["created_at"].endswith("Z") and body["expires_at"] > body["created_at"]
    assert len(body["call_id"]) >= 16 and body["peer_token"] != body["peer_id"]


async def test_posts_in_a_row_and_concurrently_always_create_new_calls(client: SignalingClient) -> None:
    first = [await client.create_call() for _ in range(20)]
    await client.join(first[0]["call_id"])  # earlier calls are waiting or active
    together = await asyncio.gather(*(client.request("POST", "/apiv2/calls") for _ in range(200)))
    assert {status for status, _, _ in together} == {201}
    ids = [c["call_id"] for c in first] + [body["call_id"] for _, body, _ in together]
    assert len(set(ids)) == 220


async def test_waiting_and_active_calls_live_side_by_side(client: SignalingClient) -> None:
    a, b = await client.create_call(), await client.create_call()
    await client.join(a["call_id"])
    assert (await client.get_call(a["call_id"]))["status"] == "active"
    assert (await client.get_call(b["call_id"]))["status"] == "waiting"
    assert [c["call_id"] for c in await client.list_calls("active")] == [a["call_id"]]
    assert [c["call_id"] for c in await client.list_calls("waiting")] == [b["call_id"]]


async def test_one_host_holds_several_calls_each_with_its_own_peer_id(client: SignalingClient) -> None:
    calls = [await client.create_call() for _ in range(5)]
    guests = [await client.join(c["call_id"]) for c in calls]
    peer_ids = [c["peer_id"] for c in calls] + [g["peer_id"] for g in guests]
    assert len(set(peer_ids)) == 10
    assert all(g["role"] == "guest" and g["polite"] is True and g["status"] == "active" for g in guests)


async def test_three_concurrent_joins_seat_exactly_one_guest(client: SignalingClient) -> None:
    call = await client.create_call()
    results = await asyncio.gather(*(client.request("POST", f"/apiv2/calls/{call['call_id']}/join") for _ in range(3)))
    codes = sorted(status for status, _, _ in results)
    assert codes == [200, 409, 409]
    assert {body["error"]["code"] for status, body, _ in results if status == 409} == {"call_full"}
    assert (await client.get_call(call["call_id"]))["participants"] == {"count": 2, "max": 2}


async def test_joins_in_different_calls_are_independent(client: SignalingClient) -> None:
    a, b = await client.create_call(), await client.create_call()
    await client.join(a["call_id"])
    assert await error_of(client.join(a["call_id"])) == (409, "call_full")
    assert (await client.join(b["call_id"]))["status"] == "active"


async def test_unknown_call_is_404_everywhere(client: SignalingClient) -> None:
    assert await error_of(client.get_call("nope")) == (404, "call_not_found")
    assert await error_of(client.join("nope")) == (404, "call_not_found")
    assert await error_of(client.leave("nope", "x")) == (404, "call_not_found")
    assert await error_of(client.end("nope", "x")) == (404, "call_not_found")


async def test_lists_are_exact_while_calls_change_status_newest_first(client: SignalingClient) -> None:
    calls = [await client.create_call() for _ in range(6)]
    ids = [c["call_id"] for c in calls]
    guest = await client.join(ids[1])
    await client.join(ids[4])
    assert [c["call_id"] for c in await client.list_calls("waiting")] == [ids[5], ids[3], ids[2], ids[0]]
    assert [c["call_id"] for c in await client.list_calls("active")] == [ids[4], ids[1]]
    await client.leave(ids[1], guest["peer_token"])  # back to waiting, in creation order
    assert [c["call_id"] for c in await client.list_calls("waiting")] == [ids[5], ids[3], ids[2], ids[1], ids[0]]
    await client.end(ids[3], calls[3]["peer_token"])
    assert [c["call_id"] for c in await client.list_calls()] == [ids[5], ids[4], ids[2], ids[1], ids[0]]
    assert [c["call_id"] for c in await client.list_calls(limit=2)] == [ids[5], ids[4]]
    assert [c["call_id"] for c in await client.list_calls("waiting", limit=1)] == [ids[5]]


@pytest.mark.parametrize("query", ["status=ended", "status=", "limit=0", "limit=501", "limit=x", "limit=-1"])
async def test_bad_list_query_is_400(client: SignalingClient, query: str) -> None:
    status, body, _ = await client.request("GET", f"/apiv2/calls?{query}")
    assert status == 400 and body["error"]["code"] == "bad_request"


@pytest.mark.settings(list_calls="off")
async def test_listing_can_be_turned_off(client: SignalingClient) -> None:
    await client.create_call()
    assert await error_of(client.list_calls()) == (404, "not_found")


async def test_reuse_last_returns_the_newest_waiting_call_without_credentials(client: SignalingClient) -> None:
    status, created, _ = await client.request("POST", "/apiv2/calls?reuse_last=true")
    assert status == 201
    newest = await client.create_call()
    status, reused, _ = await client.request("POST", "/apiv2/calls?reuse_last=true")
    assert status == 200 and reused["reused"] is True and reused["call_id"] == newest["call_id"]
    assert "peer_token" not in reused and "peer_id" not in reused
    for call in (created, newest):
        await client.join(call["call_id"])
    status, fresh, _ = await client.request("POST", "/apiv2/calls?reuse_last=true")
    assert status == 201 and fresh["call_id"] not in (created["call_id"], newest["call_id"])


async def test_leave_and_end_need_a_participants_bearer_token(client: SignalingClient) -> None:
    a, b = await client.create_call(), await client.create_call()
    path = f"/apiv2/calls/{a['call_id']}/end"
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"},
                    {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {b['peer_token']}"}):
        status, body, _ = await client.request("POST", path, headers=headers)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        assert a["peer_token"] not in body["error"]["message"] and b["peer_token"] not in body["error"]["message"]
    assert (await client.get_call(a["call_id"]))["status"] == "waiting"


async def test_leave_frees_the_slot_and_last_leave_ends_the_call(client: SignalingClient) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    assert (await client.leave(host["call_id"], guest["peer_token"]))["status"] == "waiting"
    again = await client.join(host["call_id"])
    assert again["status"] == "active"
    await client.leave(host["call_id"], again["peer_token"])
    assert (await client.leave(host["call_id"], host["peer_token"]))["status"] == "ended"
    assert await error_of(client.get_call(host["call_id"])) == (404, "call_not_found")


async def test_end_removes_the_call_at_once_and_leaves_others_untouched(client: SignalingClient) -> None:
    a, b = await client.create_call(), await client.create_call()
    guest = await client.join(a["call_id"])
    assert (await client.end(a["call_id"], guest["peer_token"]))["status"] == "ended"
    assert await error_of(client.get_call(a["call_id"])) == (404, "call_not_found")
    assert await error_of(client.join(a["call_id"])) == (404, "call_not_found")
    assert await error_of(client.end(a["call_id"], a["peer_token"])) == (404, "call_not_found")
    assert [c["call_id"] for c in await client.list_calls()] == [b["call_id"]]
    assert (await client.join(b["call_id"]))["status"] == "active"


async def test_current_is_gone(client: SignalingClient) -> None:
    await client.create_call()
    status, body, _ = await client.request("GET", "/apiv2/calls/current")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert "removed" in body["error"]["message"]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/apiv2/nowhere", 404, "not_found"),
    ("GET", "/nowhere", 404, "not_found"),
    ("DELETE", "/apiv2/calls", 405, "method_not_allowed"),
    ("PUT", "/apiv2/calls/x/join", 405, "method_not_allowed"),
])
async def test_unknown_route_or_method(client: SignalingClient, method: str, path: str, status: int, code: str) -> None:
    got, body, _ = await client.request(method, path, body=b"" if method in ("PUT", "DELETE") else None)
    assert (got, body["error"]["code"]) == (status, code)


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [
    (b"{not json", "application/json", 400, "bad_request"),
    (b"[1, 2]", "application/json", 400, "bad_request"),
    (b'{"a": NaN}', "application/json", 400, "bad_request"),
    (b"[" * 4000, "application/json", 400, "bad_request"),
    (b"{}", "text/plain", 415, "unsupported_media_type"),
    (b"x" * 5000, "application/json", 413, "payload_too_large"),
], ids=["not-json", "not-object", "nan", "deep", "text-plain", "too-large"])
async def test_malformed_bodies_get_precise_errors(
    client: SignalingClient, body: bytes, content_type: str, status: int, code: str
) -> None:
    got, answer, _ = await client.request("POST", "/apiv2/calls", body=body, headers={"Content-Type": content_type})
    assert (got, answer["error"]["code"]) == (status, code)
    assert await client.list_calls() == []


async def test_a_json_object_body_is_accepted(client: SignalingClient) -> None:
    status, _, _ = await client.request("POST", "/apiv2/calls", body=b"{}", headers={"Content-Type": "application/json"})
    assert status == 201


@pytest.mark.settings(max_calls=3)
async def test_create_past_max_calls_is_503_capacity_with_retry_after(client: SignalingClient, log_guard: Any) -> None:
    log_guard.expect("signal_srv.access", "^503 POST /apiv2/calls ")
    calls = [await client.create_call() for _ in range(3)]
    status, body, headers = await client.request("POST", "/apiv2/calls")
    assert (status, body["error"]["code"]) == (503, "capacity") and headers["Retry-After"]
    assert (await client.join(calls[0]["call_id"]))["status"] == "active"
    await client.end(calls[1]["call_id"], calls[1]["peer_token"])
    assert (await client.create_call())["status"] == "waiting"


@pytest.mark.settings(call_ttl=0.3)
async def test_idle_call_expires_without_any_request(client: SignalingClient, registry: Registry) -> None:
    call = await client.create_call()
    await registry.wait_ended(call["call_id"], TIMEOUT)
    assert await error_of(client.get_call(call["call_id"])) == (404, "call_not_found")
    assert await client.list_calls() == []
    assert registry.statistics().ended == {"expired": 1}


@pytest.mark.settings(call_ttl=0.5)
async def test_activity_extends_the_ttl(client: SignalingClient, registry: Registry) -> None:
    call = await client.create_call()
    first = call["expires_at"]
    guest = await client.join(call["call_id"])
    assert guest["expires_at"] > first
    await client.leave(call["call_id"], guest["peer_token"])
    assert (await client.get_call(call["call_id"]))["expires_at"] >= guest["expires_at"]


@pytest.mark.settings(call_ttl=0.2, max_calls=2)
async def test_expired_calls_never_block_new_ones(client: SignalingClient, registry: Registry, log_guard: Any) -> None:
    log_guard.expect("signal_srv.access", "^503 POST /apiv2/calls ")
    old = [await client.create_call() for _ in range(2)]
    assert await error_of(client.create_call()) == (503, "capacity")
    for call in old:
        await registry.wait_ended(call["call_id"], TIMEOUT)
    assert (await client.create_call())["status"] == "waiting"


@pytest.mark.settings(call_ttl=0.2, cleanup_interval=0.05)
async def test_nothing_piles_up_with_the_periodic_sweep_running(client: SignalingClient, registry: Registry) -> None:
    registry.start_sweeping(0.05)
    calls = [await client.create_call() for _ in range(30)]
    assert await registry.sweep() == 0  # nothing is overdue yet: the sweep leaves live calls alone
    for call in calls:
        await registry.wait_ended(call["call_id"], TIMEOUT)
    stats = registry.statistics()
    assert (stats.calls, stats.waiting, stats.active, stats.ended) == (0, 0, 0, {"expired": 30})
    assert stats.sweeps >= 1
