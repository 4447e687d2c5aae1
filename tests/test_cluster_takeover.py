"""Calls outlive their node: write-ahead to Redis, takeover by survivors, a frozen owner, a graceful stop.

Real processes throughout: a real ``redis-server``, and signal_srv nodes that are killed
with SIGKILL, frozen with SIGSTOP, or stopped with SIGTERM by the test, by their pid.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Iterator

import pytest

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import RedisServer, needs
from tests.test_cluster import LEASE, start_node, stop_cleanly

pytestmark = needs("redis-server", "redis-cli")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def survivors(redis: RedisServer) -> Iterator[list[LiveServer]]:
    started = [start_node(redis.url, f"s{i}", unclaimed_ttl=4) for i in range(2)]
    yield started
    stop_cleanly(*started)


def taken_over_by(nodes: list[LiveServer], call_id: str, marks: list[int], timeout: float) -> LiveServer:
    """The node that logs taking ``call_id`` over (after ``marks``), within ``timeout``."""
    pattern = re.compile(f"call {re.escape(call_id)} taken over")
    deadline = time.monotonic() + timeout
    while True:
        for node, mark in zip(nodes, marks):
            if any(pattern.search(line) for line in node.lines[mark:]):
                return node
        assert time.monotonic() < deadline, f"nobody took {call_id} over"
        with nodes[0]._logged:  # woken by the next line of the first node, or after a moment to look at the others
            nodes[0]._logged.wait(0.05)


async def test_a_dead_nodes_call_is_taken_over_with_no_client_and_its_timer_goes_on(
    redis: RedisServer, survivors: list[LiveServer]
) -> None:
    doomed = start_node(redis.url, "doomed", unclaimed_ttl=4)
    try:
        api = SignalingClient(doomed.base_url, timeout=TIMEOUT)
        created_at = time.monotonic()
        host = await api.create_call()  # nobody joins or connects: it ends as unclaimed 4 s after its creation
        marks = [node.mark() for node in survivors]
        doomed.kill()
        killed = time.monotonic()
        heir = taken_over_by(survivors, host["call_id"], marks, LEASE + TIMEOUT)
        assert time.monotonic() - killed <= LEASE + 1.0
        heir_api = SignalingClient(heir.base_url, timeout=TIMEOUT)
        assert (await heir_api.get_call(host["call_id"]))["expires_reason"] == "unclaimed"
        # The replayed call knows the host's token (by its digest), and nothing else.
        config = f"/apiv2/config?call_id={host['call_id']}"
        for wrong in ("wrong", host["peer_token"][:-1]):
            status, _, _ = await heir_api.request("GET", config, headers={"Authorization": f"Bearer {wrong}"})
            assert status == 401
        refused = await heir_api.connect(host["call_id"], host["peer_id"], "wrong")
        assert await refused.wait_closed() == (4401, "unauthorized")
        status, _, _ = await heir_api.request("GET", config, headers={"Authorization": f"Bearer {host['peer_token']}"})
        assert status == 200
        line = heir.wait_for_log(f"call {re.escape(host['call_id'])} ended \\(unclaimed\\) after", timeout=TIMEOUT)
        lasted = float(re.search(r"after ([\d.]+) s", line).group(1))  # type: ignore[union-attr]
        assert 3.9 <= lasted <= 4.6  # its own 4 s: no fresh TTL, no early end
        assert time.monotonic() - created_at >= 4.0
        status, _, _ = await heir_api.request("GET", f"/apiv2/calls/{host['call_id']}")
        assert status == 404
        assert redis.cli("EXISTS", f"sig:call:{{{host['call_id']}}}", f"sig:call:{{{host['call_id']}}}:log") == "0"
    finally:
        doomed.kill()


async def test_a_frozen_owner_finds_its_call_moved_changes_nothing_and_closes_its_sockets(
    redis: RedisServer, survivors: list[LiveServer]
) -> None:
    frozen = start_node(redis.url, "frozen", unclaimed_ttl=4)
    try:
        api = SignalingClient(frozen.base_url, timeout=TIMEOUT)
        s0, s1 = (SignalingClient(node.base_url, timeout=TIMEOUT) for node in survivors)
        host = await api.create_call()
        a = await api.connect_as(host, numbered=True)  # the call stays on the node to be frozen
        guest = await s0.join(host["call_id"])
        b = await s0.connect_as(guest, numbered=True)  # bridged to it
        await a.wait_for("state", subject=guest["peer_id"], event="connected")
        a.send("message", "before")
        assert (await b.wait_for("message"))["payload"] == "before"

        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            a.send("message", "into the frozen node")  # read, decided and refused after the thaw: never relayed by it
            assert await b.wait_closed(LEASE + TIMEOUT) == (1012, "owner node gone")
            b = await s1.resume(b)  # the survivor takes the call over
            b.send("message", "while it was frozen")
            mark = frozen.mark()
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        frozen.wait_for_log(f"call {re.escape(host['call_id'])} is owned by another node now", since=mark)
        assert await a.wait_closed() == (1012, "call moved")
        a = await s0.resume(a)  # resends what the frozen node never got into Redis
        assert (await a.wait_for("message"))["payload"] == "while it was frozen"
        assert (await b.wait_for("message"))["payload"] == "into the frozen node"
        assert not [m for m in a.skipped + b.skipped if m.get("type") == "message"]
        assert not frozen.problems()
        await s1.end(host["call_id"], host["peer_token"])
    finally:
        if frozen.process is not None:
            frozen.process.send_signal(signal.SIGCONT)
        frozen.kill()


async def test_a_stopped_node_hands_its_calls_over_and_its_clients_reconnect_without_loss(
    redis: RedisServer, survivors: list[LiveServer]
) -> None:
    leaving = start_node(redis.url, "leaving", unclaimed_ttl=4)
    try:
        api = SignalingClient(leaving.base_url, timeout=TIMEOUT)
        s0, s1 = (SignalingClient(node.base_url, timeout=TIMEOUT) for node in survivors)
        owned = await api.create_call()  # owned by the leaving node, one socket there and one bridged from s0
        owned_guest = await api.join(owned["call_id"])
        a = await api.connect_as(owned, numbered=True)
        b = await s0.connect_as(owned_guest, numbered=True)
        elsewhere = await s1.create_call()  # owned by s1, the guest's socket on the leaving node
        elsewhere_guest = await s1.join(elsewhere["call_id"])
        c = await s1.connect_as(elsewhere, numbered=True)
        d = await api.connect_as(elsewhere_guest, numbered=True)
        await a.wait_for("state", subject=owned_guest["peer_id"], event="connected")
        await c.wait_for("state", subject=elsewhere_guest["peer_id"], event="connected")

        leaving.terminate()
        for conn in (a, b, d):
            farewell = await conn.wait_for("server_shutdown")
            assert (farewell["reconnect"], farewell["seq"]) == (True, conn.last_seq)
            assert await conn.wait_closed() == (1012, "server restart")
        assert leaving.wait_exited() == 0
        a = await s1.resume(a)
        b = await s0.resume(b)
        d = await s0.resume(d)
        for sender, receiver, tag in ((a, b, "after"), (b, a, "back"), (c, d, "too"), (d, c, "both")):
            sender.send("message", tag)
            assert (await receiver.wait_for("message"))["payload"] == tag
        assert not [m for m in a.skipped + b.skipped + c.skipped + d.skipped
                    if m.get("type") in ("call_ended", "error")]
        assert not leaving.problems()
        for call, on in ((owned, s0), (elsewhere, s1)):
            await on.end(call["call_id"], call["peer_token"])
    finally:
        leaving.kill()


async def test_what_redis_holds_for_a_call_is_bounded_and_goes_when_the_call_ends(
    redis: RedisServer, survivors: list[LiveServer]
) -> None:
    api = SignalingClient(survivors[0].base_url, timeout=TIMEOUT)
    host = await api.create_call()
    guest = await api.join(host["call_id"])
    a = await api.connect_as(host)
    b = await api.connect_as(guest)
    await a.wait_for("state", subject=guest["peer_id"], event="connected")
    for i in range(700):
        a.send("candidate", {"i": i})
    for i in range(700):
        assert (await b.wait_for("candidate"))["payload"]["i"] == i
    key = f"sig:call:{{{host['call_id']}}}"
    assert 0 < int(redis.cli("XLEN", key + ":log")) <= 256  # trimmed at each snapshot
    assert int(redis.cli("HGET", key, "snap_n")) >= 512
    assert 0 < int(redis.cli("TTL", key)) <= 900 and 0 < int(redis.cli("TTL", key + ":log")) <= 900
    await api.end(host["call_id"], host["peer_token"])
    await a.wait_closed()
    assert redis.cli("EXISTS", key, key + ":log") == "0"
