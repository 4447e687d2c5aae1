"""Calls that behave like real calls: phase timeouts, lossless resume, TURN credentials."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any, Awaitable

import pytest

from signal_srv.client import SignalingClient
from signal_srv.registry import Registry
from signal_srv.turn import turn_credential
from tests.conftest import TIMEOUT
from tests.test_ws import Pair, assert_relays, make_pair


@pytest.mark.settings(unclaimed_ttl=0.2)
async def test_a_call_nobody_joined_or_connected_to_ends_as_unclaimed(
    client: SignalingClient, registry: Registry
) -> None:
    unclaimed, claimed = await client.create_call(), await client.create_call()
    conn = await client.connect_as(claimed)
    await conn.wait_for("state")
    await registry.wait_ended(unclaimed["call_id"], TIMEOUT)
    assert registry.statistics().ended == {"unclaimed": 1}
    assert (await client.get_call(claimed["call_id"]))["status"] == "waiting"


@pytest.mark.settings(departure_timeout=0.2)
async def test_a_ghost_guest_times_out_and_the_call_is_joinable_again(client: SignalingClient) -> None:
    host = await client.create_call()
    a = await client.connect_as(host)
    ghost = await client.join(host["call_id"])
    left = await a.wait_for("state", event="left")
    assert (left["subject"], left["reason"], left["status"], left["participants"]["count"]) == (
        ghost["peer_id"], "timeout", "waiting", 1)
    guest = await client.join(host["call_id"])
    b = await client.connect_as(guest)
    await b.wait_for("state")
    await assert_relays(Pair(host, guest, a, b))


@pytest.mark.settings(departure_timeout=0.3)
async def test_a_reconnect_inside_the_departure_window_keeps_the_slot(client: SignalingClient) -> None:
    pair = await make_pair(client)
    pair.b.abort()
    await pair.a.wait_for("state", event="disconnected")
    b = await client.resume(pair.b)
    await b.wait_for("state", event="connected")
    await assert_relays(Pair(pair.host, pair.guest, pair.a, b))
    assert (await client.get_call(pair.call_id))["participants"]["count"] == 2


async def test_numbered_frames_survive_a_cut_once_each_and_in_order(client: SignalingClient) -> None:
    pair = await make_pair(client)
    a = await client.connect_as(pair.host, numbered=True)  # replaces the pair's first socket
    await pair.b.wait_for("state", event="connected", subject=pair.host["peer_id"])
    for i in range(3):
        a.send("candidate", {"i": i})
    assert [(await pair.b.wait_for("candidate"))["payload"]["i"] for _ in range(3)] == [0, 1, 2]
    a.abort()
    await pair.b.wait_for("state", event="disconnected")
    a.send("candidate", {"i": 3})  # while cut off: kept, and sent first on the next socket
    resumed = await client.resume(a)
    state = await resumed.wait_for("state", subject=pair.host["peer_id"], event="connected")
    assert state["last_cseq"] == 3  # the frames before the cut were accepted: not resent
    resumed.send("candidate", {"i": 4})
    assert [(await pair.b.wait_for("candidate"))["payload"]["i"] for _ in range(2)] == [3, 4]
    resumed.send_raw(json.dumps({"type": "candidate", "payload": {"i": 2}, "cseq": 3}))  # a stale resend
    resumed.send("message", "after")
    assert (await pair.b.wait_for("message"))["payload"] == "after"
    assert not [m for m in pair.b.skipped if m.get("type") == "candidate"]


async def test_a_fresh_numbered_client_continues_after_the_servers_last_cseq(client: SignalingClient) -> None:
    pair = await make_pair(client)
    first = await client.connect_as(pair.host, numbered=True)
    first.send("message", "one")
    assert (await pair.b.wait_for("message"))["payload"] == "one"
    first.close()
    await pair.b.wait_for("state", event="disconnected")
    second = await client.connect_as(pair.host, numbered=True)  # knows nothing of the first one's numbers
    assert second.cseq == 1
    second.send("message", "two")
    assert (await pair.b.wait_for("message"))["payload"] == "two"


@pytest.mark.settings(max_call_duration=0.3)
async def test_max_call_duration_ends_a_live_call(client: SignalingClient) -> None:
    pair = await make_pair(client)
    for conn in (pair.a, pair.b):
        assert (await conn.wait_for("call_ended"))["reason"] == "max_duration"
        assert await conn.wait_closed() == (1000, "max_duration")


# expires_at is read off the wall clock and converted from the monotonic deadline, and it is
# rounded down to the millisecond: this much either way is conversion, not a wrong timer.
SKEW = 0.02


async def timed(request: Awaitable[dict[str, Any]]) -> tuple[float, dict[str, Any], float]:
    """The answer of ``request`` and the wall-clock window it was handled in."""
    before = time.time()
    answer = await request
    return before, answer, time.time()


def assert_expires(summary: dict[str, Any], reason: str, seconds: float, window: tuple[float, float]) -> None:
    """``expires_at`` is ``seconds`` after a moment inside ``window``, by the timer ``reason``."""
    assert summary["expires_reason"] == reason, summary
    at = datetime.fromisoformat(summary["expires_at"]).timestamp()
    assert window[0] + seconds - SKEW <= at <= window[1] + seconds + SKEW, (at - window[0], summary)


async def assert_ends_as_advertised(registry: Registry, summary: dict[str, Any]) -> None:
    """The call ends for the advertised reason, and not before the advertised time."""
    await registry.wait_ended(summary["call_id"], TIMEOUT)
    assert time.time() >= datetime.fromisoformat(summary["expires_at"]).timestamp() - SKEW
    assert registry.statistics().ended == {summary["expires_reason"]: 1}


async def test_a_fresh_call_advertises_the_default_unclaimed_ttl_not_the_call_ttl(client: SignalingClient) -> None:
    before, host, after = await timed(client.create_call())
    assert_expires(host, "unclaimed", 300, (before, after))


@pytest.mark.settings(call_ttl=10, unclaimed_ttl=0.3, departure_timeout=0.3)
async def test_expires_at_of_a_call_nobody_joined_is_the_unclaimed_ttl(
    client: SignalingClient, registry: Registry
) -> None:
    before, host, after = await timed(client.create_call())
    assert_expires(host, "unclaimed", 0.3, (before, after))
    assert_expires(await client.get_call(host["call_id"]), "unclaimed", 0.3, (before, after))
    await assert_ends_as_advertised(registry, host)


@pytest.mark.settings(call_ttl=10, unclaimed_ttl=0.3, departure_timeout=0.3)
async def test_expires_at_of_a_joined_call_without_sockets_is_the_departure_timeout(
    client: SignalingClient, registry: Registry
) -> None:
    host = await client.create_call()
    before, guest, after = await timed(client.join(host["call_id"]))
    assert_expires(guest, "timeout", 0.3, (before, after))
    await assert_ends_as_advertised(registry, guest)


@pytest.mark.settings(call_ttl=0.3, unclaimed_ttl=10, departure_timeout=10)
async def test_expires_at_of_an_idle_call_is_the_call_ttl_from_its_last_activity(
    client: SignalingClient, registry: Registry
) -> None:
    before, host, after = await timed(client.create_call())
    assert_expires(host, "expired", 0.3, (before, after))
    before, guest, after = await timed(client.join(host["call_id"]))
    assert_expires(guest, "expired", 0.3, (before, after))
    await assert_ends_as_advertised(registry, guest)


@pytest.mark.settings(max_call_duration=0.4)
async def test_expires_at_of_a_live_call_is_its_max_duration(client: SignalingClient, registry: Registry) -> None:
    before, host, after = await timed(client.create_call())
    summary = await connect_both(client, host)
    assert_expires(summary, "max_duration", 0.4, (before, after))
    await assert_ends_as_advertised(registry, summary)


async def connect_both(client: SignalingClient, host: dict[str, Any]) -> dict[str, Any]:
    """Join a guest, connect both participants, and return the call's summary then."""
    guest = await client.join(host["call_id"])
    for who in (host, guest):
        conn = await client.connect_as(who)
        await conn.wait_for("state", subject=who["peer_id"])
    return await client.get_call(host["call_id"])


@pytest.mark.settings(departure_timeout=0.2)
async def test_a_live_call_without_max_duration_has_no_expiry_even_while_a_guest_departs(
    client: SignalingClient,
) -> None:
    host = await client.create_call()
    a = await client.connect_as(host)
    await a.wait_for("state", subject=host["peer_id"])
    ghost = await client.join(host["call_id"])
    assert (ghost["expires_at"], ghost["expires_reason"]) == (None, None)  # its departure frees a slot only
    await a.wait_for("state", event="left")
    summary = await client.get_call(host["call_id"])
    assert (summary["status"], summary["expires_at"], summary["expires_reason"]) == ("waiting", None, None)


@pytest.mark.settings(resume_buffer=1000, ws_buffer_limit=1000)
async def test_cutting_the_connection_mid_burst_and_resuming_loses_and_repeats_nothing(
    client: SignalingClient,
) -> None:
    pair = await make_pair(client)
    for i in range(300):
        pair.a.send("candidate", i)
    got = [(await pair.b.wait_for("candidate"))["payload"] for _ in range(40)]
    pair.b.abort()  # no close frame: frames in flight are lost on the wire
    b = await client.resume(pair.b)
    while len(got) < 300:
        message = await b.receive()
        if message["type"] == "candidate":
            got.append(message["payload"])
    assert got == list(range(300))
    pair.a.send("ping")
    await pair.a.wait_for("pong")
    assert not [m for m in pair.a.skipped if m.get("type") == "error"]  # nothing was refused either


@pytest.mark.settings(resume_buffer=4)
async def test_a_resume_the_server_cannot_serve_says_resume_failed(client: SignalingClient) -> None:
    pair = await make_pair(client)
    for i in range(10):
        pair.a.send("candidate", i)
    for _ in range(10):
        await pair.b.wait_for("candidate")
    b = await client.connect_as(pair.guest, last_seq=0)
    first = await b.receive()
    assert first["type"] == "error" and first["code"] == "resume_failed"
    assert (await b.receive())["type"] == "state"


async def test_a_malformed_last_seq_is_refused(client: SignalingClient) -> None:
    host = await client.create_call()
    conn = await client.connect_as(host, last_seq="x")
    assert await conn.wait_closed() == (4400, "last_seq must be a whole number")


def test_turn_credential_matches_an_independent_hmac_sha1() -> None:
    # printf '%s' "1700000000:peer" | openssl dgst -sha1 -hmac north -binary | base64
    assert turn_credential("north", "peer", 1699913600, 86400) == ("1700000000:peer", "89/L5HunFtWT5RS8MeW1TQ9ayqg=")


TURN = {"turn_uris": ("turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"),
        "turn_secret": "north", "turn_credential_ttl": 600.0,
        "ice_servers": '[{"urls": "stun:stun.example.org:3478"}]'}


def assert_turn_entry(servers: list[dict[str, Any]], peer_id: str) -> None:
    stun, turn = servers
    assert stun == {"urls": "stun:stun.example.org:3478"}
    assert turn["urls"] == list(TURN["turn_uris"])
    expiry, _, who = turn["username"].partition(":")
    assert who == peer_id and 590 <= int(expiry) - time.time() <= 601
    assert turn_credential("north", peer_id, int(expiry) - 600, 600) == (turn["username"], turn["credential"])


@pytest.mark.settings(**TURN)
async def test_create_join_and_config_hand_out_turn_credentials_not_the_secret(
    client: SignalingClient, debug_logs: list[str]
) -> None:
    host = await client.create_call()
    guest = await client.join(host["call_id"])
    assert_turn_entry(host["ice_servers"], host["peer_id"])
    assert_turn_entry(guest["ice_servers"], guest["peer_id"])
    status, body, _ = await client.request(
        "GET", f"/apiv2/config?call_id={host['call_id']}", headers={"Authorization": f"Bearer {guest['peer_token']}"})
    assert status == 200
    assert_turn_entry(body["ice_servers"], guest["peer_id"])
    assert (await client.request("GET", "/apiv2/config"))[1] == {"ice_servers": [{"urls": "stun:stun.example.org:3478"}]}
    status, body, _ = await client.request(
        "GET", f"/apiv2/config?call_id={host['call_id']}", headers={"Authorization": "Bearer wrong"})
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    everything = json.dumps([host, guest]) + "\n".join(debug_logs)
    assert "north" not in everything


async def test_both_participants_observe_the_same_order_of_events(client: SignalingClient) -> None:
    pair = await make_pair(client)
    a2 = await client.connect_as(pair.host)  # replaces the host's socket
    b_saw = [await pair.b.wait_for("state")]
    b2 = await client.connect_as(pair.guest)  # replaces the guest's socket
    b_saw.append(await b2.wait_for("state"))
    a_saw = [await a2.wait_for("state"), await a2.wait_for("state")]
    def events(frames: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return [(m["event"], m["subject"], m["participants"]["connected"]) for m in frames]
    assert events(a_saw) == events(b_saw) == [
        ("connected", pair.host["peer_id"], 2), ("connected", pair.guest["peer_id"], 2)]
    assert [m["peer_id"] for m in a_saw] == [pair.host["peer_id"]] * 2
    assert [m["peer_id"] for m in b_saw] == [pair.guest["peer_id"]] * 2
