"""Cluster mode with real processes: three signal_srv nodes sharing a real ``redis-server``.

Any node answers for any call, exactly as one node would: the call's owner decides, and
the other nodes bridge requests and socket frames to it through Redis.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from signal_srv.client import Connection, SignalingClient
from signal_srv.stress import StressOptions, run_stress
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import RedisServer, needs, redis_cluster

pytestmark = needs("redis-server", "redis-cli")

LEASE = 2.0


def start_node(redis_url: str, node_id: str, **options: Any) -> LiveServer:
    """A node that holds its lease in the cluster (so other nodes can reach its calls)."""
    node = LiveServer(redis_url=redis_url, node_id=node_id, node_lease=LEASE, **options).start()
    node.wait_for_log("holds its lease")
    return node


def stop_cleanly(*nodes: LiveServer) -> None:
    for node in nodes:
        status = node.stop()
        assert status == 0, f"node exited with {status}:\n" + "".join(node.lines[-30:])
        assert not node.problems(), node.problems()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(redis: RedisServer) -> Iterator[list[LiveServer]]:
    started = [start_node(redis.url, f"n{i}") for i in range(3)]
    yield started
    stop_cleanly(*started)


@pytest.fixture
def apis(nodes: list[LiveServer]) -> list[SignalingClient]:
    return [SignalingClient(node.base_url, timeout=TIMEOUT) for node in nodes]


class Pair:
    def __init__(self, host: dict[str, Any], guest: dict[str, Any], a: Connection, b: Connection) -> None:
        self.host, self.guest, self.a, self.b = host, guest, a, b
        self.call_id = host["call_id"]


async def pair_across(create: SignalingClient, join: SignalingClient,
                      host_on: SignalingClient, guest_on: SignalingClient) -> Pair:
    """A call created on one node, joined through another, its two sockets on two more."""
    host = await create.create_call()
    guest = await join.join(host["call_id"])
    a = await host_on.connect_as(host)
    await a.wait_for("state", subject=host["peer_id"])
    b = await guest_on.connect_as(guest)
    await b.wait_for("state", subject=guest["peer_id"])
    await a.wait_for("state", subject=guest["peer_id"], event="connected")
    return Pair(host, guest, a, b)


async def test_two_calls_in_parallel_with_each_calls_sockets_on_different_nodes(apis: list[SignalingClient]) -> None:
    one = await pair_across(apis[0], apis[1], apis[1], apis[2])
    two = await pair_across(apis[2], apis[2], apis[0], apis[1])
    one.a.send("offer", {"sdp": "one-offer"})
    two.a.send("offer", {"sdp": "two-offer"})
    offer = await one.b.wait_for("offer")
    assert offer == {"type": "offer", "call_id": one.call_id, "from": one.host["peer_id"],
                     "payload": {"sdp": "one-offer"}, "seq": offer["seq"]}
    assert (await two.b.wait_for("offer"))["payload"] == {"sdp": "two-offer"}
    one.b.send("answer", {"sdp": "one-answer"})
    for i in range(3):
        one.a.send("candidate", {"candidate": f"c{i}", "sdpMid": "0", "sdpMLineIndex": 0})
    assert (await one.a.wait_for("answer"))["payload"] == {"sdp": "one-answer"}
    candidates = [await one.b.wait_for("candidate") for _ in range(3)]
    assert [c["payload"]["candidate"] for c in candidates] == ["c0", "c1", "c2"]
    assert [c["seq"] for c in candidates] == [offer["seq"] + 1, offer["seq"] + 2, offer["seq"] + 3]

    await apis[2].end(one.call_id, one.host["peer_token"])
    for conn in (one.a, one.b):
        ended = await conn.wait_for("call_ended")
        assert (ended["call_id"], ended["reason"]) == (one.call_id, "ended")
        assert await conn.wait_closed() == (1000, "ended")
    for tag in ("still", "here"):
        two.a.send("message", tag)
        assert (await two.b.wait_for("message"))["payload"] == tag
        two.b.send("message", tag)
        assert (await two.a.wait_for("message"))["payload"] == tag
    for conn in (two.a, two.b):
        assert all(m.get("call_id") == two.call_id for m in conn.skipped)
    status, body, _ = await apis[1].request("GET", f"/apiv2/calls/{one.call_id}")
    assert (status, body["error"]["code"]) == (404, "call_not_found")
    await apis[0].end(two.call_id, two.guest["peer_token"])


async def test_answers_are_the_same_on_every_node(apis: list[SignalingClient]) -> None:
    host = await apis[0].create_call()
    call_id = host["call_id"]
    seen = [await api.get_call(call_id) for api in apis]
    assert seen[0] == seen[1] == seen[2] and seen[0]["status"] == "waiting"
    token = {"Authorization": f"Bearer {host['peer_token']}"}
    status, config, _ = await apis[2].request("GET", f"/apiv2/config?call_id={call_id}", headers=token)
    assert (status, config) == (200, {"ice_servers": []})
    status, body, _ = await apis[1].request("POST", f"/apiv2/calls/{call_id}/end",
                                            headers={"Authorization": "Bearer wrong"})
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    for api in apis:
        status, body, _ = await api.request("GET", "/apiv2/calls/no-such-call")
        assert (status, body["error"]["code"]) == (404, "call_not_found")
    assert (await apis[1].end(call_id, host["peer_token"]))["status"] == "ended"
    status, _, _ = await apis[2].request("GET", f"/apiv2/calls/{call_id}")
    assert status == 404


async def test_fifty_joins_at_once_over_three_nodes_admit_exactly_one(apis: list[SignalingClient]) -> None:
    host = await apis[0].create_call()
    path = f"/apiv2/calls/{host['call_id']}/join"
    answers = await asyncio.gather(*(apis[i % 3].request("POST", path) for i in range(50)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] + [409] * 49
    assert {body["error"]["code"] for status, body, _ in answers if status == 409} == {"call_full"}
    assert (await apis[1].get_call(host["call_id"]))["participants"] == {"count": 2, "max": 2}
    await apis[2].end(host["call_id"], host["peer_token"])


async def test_listing_and_reuse_last_are_cluster_wide_newest_first(apis: list[SignalingClient]) -> None:
    first = await apis[0].create_call()
    second = await apis[1].create_call()
    await apis[0].join(second["call_id"])
    third = await apis[2].create_call()
    ours = {first["call_id"], second["call_id"], third["call_id"]}
    for api in apis:
        listed = [c["call_id"] for c in await api.list_calls() if c["call_id"] in ours]
        assert listed == [third["call_id"], second["call_id"], first["call_id"]]
        waiting = [c for c in await api.list_calls("waiting") if c["call_id"] in ours]
        assert [c["call_id"] for c in waiting] == [third["call_id"], first["call_id"]]
        assert all(c["status"] == "waiting" for c in waiting)
        active = [c for c in await api.list_calls("active") if c["call_id"] in ours]
        assert [(c["call_id"], c["participants"]["count"]) for c in active] == [(second["call_id"], 2)]
    assert len(await apis[1].list_calls(limit=2)) == 2
    reused = await apis[1].create_call(reuse_last=True)
    assert (reused["call_id"], reused["reused"]) == (third["call_id"], True)
    for call in (first, second, third):
        await apis[1].end(call["call_id"], call["peer_token"])
    assert not [c for c in await apis[0].list_calls() if c["call_id"] in ours]


async def test_a_fenced_out_owner_changes_nothing_and_closes_its_sockets(
    apis: list[SignalingClient], nodes: list[LiveServer], redis: RedisServer
) -> None:
    host = await apis[0].create_call()
    call_id = host["call_id"]
    a = await apis[0].connect_as(host)
    await a.wait_for("state", subject=host["peer_id"])
    # What a takeover by another node (here one that went away again) does: compare-and-set the owner and epoch.
    assert redis.cli("HSET", f"sig:call:{{{call_id}}}", "owner", "elsewhere", "epoch", "2") == "0"
    mark = nodes[0].mark()
    status, body, headers = await apis[0].request("POST", f"/apiv2/calls/{call_id}/join")
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "unavailable", "1")  # refused: not done
    assert await a.wait_closed() == (1012, "call moved")  # it lets go, and its socket reconnects
    nodes[0].wait_for_log(f"call {re.escape(call_id)} is owned by another node now", since=mark)
    # "elsewhere" holds no lease: the next node asked takes the call over, as Redis has it (without that join).
    assert (await apis[1].get_call(call_id))["participants"] == {"count": 1, "max": 2}
    b = await apis[2].connect_as(host)
    await b.wait_for("state", subject=host["peer_id"])
    await apis[2].end(call_id, host["peer_token"])
    assert await b.wait_closed() == (1000, "ended")


def bridged_frames(node: LiveServer) -> int:
    text = urllib.request.urlopen(node.base_url + "/metrics", timeout=TIMEOUT).read().decode()
    return sum(int(float(v)) for v in re.findall(r'signal_srv_frames_bridged_total\{direction="\w+"\} (\S+)', text))


async def test_a_call_moves_to_the_node_where_its_first_socket_lands(
    apis: list[SignalingClient], nodes: list[LiveServer]
) -> None:
    marks = [node.mark() for node in nodes]
    host = await apis[0].create_call()
    guest = await apis[2].join(host["call_id"])
    a = await apis[1].connect_as(host)
    await a.wait_for("state", subject=host["peer_id"])
    nodes[0].wait_for_log(f"call {re.escape(host['call_id'])} handed over", since=marks[0])
    nodes[1].wait_for_log(f"call {re.escape(host['call_id'])} moved here", since=marks[1])
    b = await apis[1].connect_as(guest)
    await b.wait_for("state", subject=guest["peer_id"])
    await a.wait_for("state", subject=guest["peer_id"], event="connected")
    before = [bridged_frames(node) for node in nodes]
    for i in range(20):
        a.send("candidate", {"i": i})
        b.send("candidate", {"i": i})
    assert [(await b.wait_for("candidate"))["payload"]["i"] for _ in range(20)] == list(range(20))
    assert [(await a.wait_for("candidate"))["payload"]["i"] for _ in range(20)] == list(range(20))
    assert [bridged_frames(node) for node in nodes] == before  # relayed where both sockets are
    assert (await apis[0].get_call(host["call_id"]))["status"] == "active"  # the old owner still finds it
    await apis[0].end(host["call_id"], host["peer_token"])
    assert await a.wait_closed() == (1000, "ended")


async def test_a_socket_with_a_wrong_token_is_refused_and_moves_no_call(
    apis: list[SignalingClient], nodes: list[LiveServer]
) -> None:
    marks = [node.mark() for node in nodes]
    host = await apis[0].create_call()
    refused = await apis[1].connect(host["call_id"], host["peer_id"], "wrong")
    assert await refused.wait_closed() == (4401, "unauthorized")
    a = await apis[2].connect_as(host)  # the right token: the call moves, to this socket's node
    await a.wait_for("state", subject=host["peer_id"])
    nodes[2].wait_for_log(f"call {re.escape(host['call_id'])} moved here", since=marks[2])
    assert not any("moved here" in line for line in nodes[1].lines[marks[1]:])
    await apis[1].end(host["call_id"], host["peer_token"])
    assert await a.wait_closed() == (1000, "ended")


async def test_metrics_and_health_name_the_node_and_count_cluster_work(apis: list[SignalingClient]) -> None:
    pair = await pair_across(apis[0], apis[0], apis[0], apis[1])  # the host's socket keeps the call on n0
    pair.b.send("message", "over the bridge")
    assert (await pair.a.wait_for("message"))["payload"] == "over the bridge"
    status, health, _ = await apis[1].request("GET", "/healthz")
    assert (status, health["node_id"], health["redis"]) == (200, "n1", "ok")
    text = (await apis[1].http.fetch(apis[1].base_url + "/metrics")).body.decode()
    assert 'signal_srv_node{node_id="n1"} 1.0' in text
    assert re.search(r'signal_srv_frames_bridged_total\{direction="out"\} [1-9]', text)
    assert re.search(r"signal_srv_redis_round_trip_seconds_count [1-9]", text)
    owner = (await apis[0].http.fetch(apis[0].base_url + "/metrics")).body.decode()
    assert re.search(r"signal_srv_calls_owned [1-9]", owner)
    assert "signal_srv_redis_errors_total 0.0" in owner
    await apis[1].end(pair.call_id, pair.host["peer_token"])


async def resume_attached(api: SignalingClient, conn: Connection) -> Connection:
    """Resume ``conn`` through ``api``, again after a ``1013`` (try again later), as a client does."""
    for _ in range(20):
        conn = await api.resume(conn)
        if conn.synchronized:
            return conn
        code, _ = await conn.wait_closed()
        assert code == 1013, code
    raise AssertionError("never attached")


async def test_a_killed_nodes_call_is_taken_over_within_its_lease_and_nothing_is_lost(
    apis: list[SignalingClient], nodes: list[LiveServer], redis: RedisServer
) -> None:
    doomed = start_node(redis.url, "doomed")
    try:
        api = SignalingClient(doomed.base_url, timeout=TIMEOUT)
        host = await api.create_call()
        on_owner = await api.connect_as(host, numbered=True)  # the call stays where its first socket is
        guest = await apis[1].join(host["call_id"])
        bridged = await apis[0].connect_as(guest, numbered=True)  # a socket on n0, bridged to the doomed owner
        await on_owner.wait_for("state", subject=guest["peer_id"], event="connected")
        for i in range(3):
            on_owner.send("candidate", {"i": i})
            bridged.send("candidate", {"i": i})
        assert [(await bridged.wait_for("candidate"))["payload"]["i"] for _ in range(3)] == [0, 1, 2]
        assert [(await on_owner.wait_for("candidate"))["payload"]["i"] for _ in range(3)] == [0, 1, 2]
        on_owner.send("candidate", {"i": 3})  # racing the kill: in Redis or not, it arrives exactly once
        doomed.kill()
        killed = time.monotonic()
        assert (await on_owner.wait_closed())[0] in (None, 1006)
        host_again = await resume_attached(apis[1], on_owner)  # through a survivor, which takes the call over
        assert time.monotonic() - killed <= LEASE + 1.0
        assert await bridged.wait_closed() == (1012, "owner node gone")
        guest_again = await resume_attached(apis[2], bridged)
        assert (await guest_again.wait_for("candidate"))["payload"]["i"] == 3
        guest_again.send("candidate", {"i": 3})
        assert (await host_again.wait_for("candidate"))["payload"]["i"] == 3
        assert not [m for m in guest_again.skipped + host_again.skipped if m.get("type") == "candidate"]
        listed = {c["call_id"]: c for c in await apis[0].list_calls()}
        assert listed[host["call_id"]]["participants"]["count"] == 2
        await apis[0].end(host["call_id"], guest["peer_token"])
        for conn in (host_again, guest_again):
            assert (await conn.wait_for("call_ended"))["reason"] == "ended"
    finally:
        doomed.kill()


@needs("redis-server", "redis-cli")
async def test_a_call_across_nodes_on_a_redis_cluster_of_three_masters(tmp_path: Path) -> None:
    servers = redis_cluster(tmp_path)
    nodes: list[LiveServer] = []
    try:
        nodes = [start_node(servers[i].url, f"c{i}") for i in range(2)]
        api = [SignalingClient(node.base_url, timeout=TIMEOUT) for node in nodes]
        pairs = [await pair_across(api[0], api[1], api[0], api[1]) for _ in range(3)]
        for pair in pairs:
            pair.a.send("offer", {"sdp": pair.call_id})
            pair.b.send("answer", {"sdp": pair.call_id})
        for pair in pairs:
            assert (await pair.b.wait_for("offer"))["payload"] == {"sdp": pair.call_id}
            assert (await pair.a.wait_for("answer"))["payload"] == {"sdp": pair.call_id}
        listed = {c["call_id"] for c in await api[1].list_calls("active")}
        assert {p.call_id for p in pairs} <= listed
        for pair in pairs:
            await api[1].end(pair.call_id, pair.host["peer_token"])
            assert await pair.a.wait_closed() == (1000, "ended")
        stop_cleanly(*nodes)
    finally:
        for node in nodes:
            node.kill()
        for server in servers:
            server.stop()


async def test_stress_over_three_nodes_with_host_and_guest_on_different_nodes_has_zero_faults(
    nodes: list[LiveServer],
) -> None:
    options = StressOptions(calls=200, candidates=5, end_fraction=0.3, timeout=TIMEOUT * 2, duration=TIMEOUT * 12,
                            seed=13)
    result = await run_stress([node.base_url for node in nodes], options)
    assert result.failures == [] and result.ok, result.failures[:5]
    assert (result.calls_ok, result.lost, result.duplicated, result.misrouted, result.reordered) == (200, 0, 0, 0, 0)
    assert result.delivered == result.sent > 0
    for node in nodes:
        assert not node.problems(), node.problems()
