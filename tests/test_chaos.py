"""Chaos with real processes: nodes restarted, killed and frozen, and Redis restarted, in the middle of
a burst of 200 calls whose sockets number their frames (``cseq``) and reconnect by themselves.

Each case ends with every message delivered once and in order, and no call ended that the
stress tool did not end itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest

from signal_srv.client import Session, SignalingClient
from signal_srv.stress import StressOptions, StressResult, run_stress
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import RedisServer, needs
from tests.test_cluster import LEASE, start_node, stop_cleanly

pytestmark = [needs("redis-server", "redis-cli"), pytest.mark.e2e]  # real processes, some 30 s

CHAOS = StressOptions(calls=200, candidates=20, end_fraction=0.3, pace=0.1, reconnect=True, timeout=TIMEOUT * 2,
                      duration=TIMEOUT * 12, seed=14)


class Cluster:
    """A real Redis (AOF on) and three nodes, which a test may restart, kill or freeze."""

    def __init__(self, folder: Path) -> None:
        self.redis = RedisServer(folder, appendonly=True).start()
        self.nodes = [start_node(self.redis.url, f"c{i}") for i in range(3)]
        self.urls = [node.base_url for node in self.nodes]
        self.retired: list[LiveServer] = []

    def restart(self, i: int) -> None:
        """SIGTERM (the node hands its calls over), then a new process on the same port and node_id."""
        old = self.nodes[i]
        old.terminate()
        assert old.wait_exited() == 0, "".join(old.lines[-30:])
        assert not old.problems(), old.problems()
        self.retired.append(old)
        self.nodes[i] = start_node(self.redis.url, f"c{i}", port=old.port)

    def survivors(self, but: int) -> list[LiveServer]:
        return [node for i, node in enumerate(self.nodes) if i != but]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path)
    try:
        yield started
        for node in started.retired + started.nodes:
            assert not node.problems(), node.problems()
        stop_cleanly(*[node for node in started.nodes if node.process is not None and node.process.poll() is None])
    finally:
        for node in started.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
            node.kill()
        started.redis.stop()


def assert_exact(result: StressResult) -> None:
    assert result.failures == [] and result.ok, result.failures[:5]
    assert (result.calls_ok, result.lost, result.duplicated, result.reordered, result.misrouted) == (200, 0, 0, 0, 0)
    assert (result.ended_unasked, result.unexpected_closes, result.seq_gaps) == (0, 0, 0)
    assert result.delivered == result.sent > 0


def logged_at(line: str) -> float:
    """The wall-clock time of a server log line (its local-time stamp)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def test_a_node_killed_mid_burst_loses_nothing_and_its_calls_are_served_again_within_its_lease(
    cluster: Cluster,
) -> None:
    killed: list[float] = []
    marks = [node.mark() for node in cluster.nodes]

    async def kill() -> None:
        cluster.nodes[1].kill()
        killed.append(time.time())

    result = await run_stress(cluster.urls, CHAOS, during=kill)
    assert_exact(result)
    assert result.reconnects > 0
    takeovers = [logged_at(line) for i, node in enumerate(cluster.nodes) if i != 1
                 for line in node.lines[marks[i]:] if " taken over from c1/" in line]
    assert takeovers and max(takeovers) - killed[0] <= LEASE + 1.0


async def test_a_rolling_restart_of_every_node_loses_nothing(cluster: Cluster) -> None:
    async def roll() -> None:
        for i in range(3):
            await asyncio.to_thread(cluster.restart, i)

    result = await run_stress(cluster.urls, CHAOS, during=roll)
    assert_exact(result)
    assert result.reconnects > 0


async def test_a_node_frozen_past_its_lease_changes_nothing_when_it_wakes(cluster: Cluster) -> None:
    frozen = cluster.nodes[1]
    assert frozen.process is not None
    marks = [node.mark() for node in cluster.nodes]

    async def freeze() -> None:
        frozen.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            for node, mark in zip(cluster.survivors(1), marks[::2]):
                await asyncio.to_thread(node.wait_for_log, "nodes gone.*c1/", LEASE + TIMEOUT, mark)
        finally:
            frozen.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        await asyncio.to_thread(frozen.wait_for_log, "lease had run out", TIMEOUT, marks[1])

    result = await run_stress(cluster.urls, CHAOS, during=freeze)
    assert_exact(result)
    assert any("is owned by another node now" in line for line in frozen.lines[marks[1]:])


async def test_a_redis_restart_with_aof_keeps_every_call(cluster: Cluster) -> None:
    async def restart_redis() -> None:
        await asyncio.to_thread(cluster.redis.stop)
        await asyncio.to_thread(cluster.redis.start)

    result = await run_stress(cluster.urls, CHAOS, during=restart_redis)
    assert_exact(result)


async def test_two_calls_in_parallel_with_the_owner_of_one_killed_between_offer_and_answer(
    cluster: Cluster,
) -> None:
    apis = [SignalingClient(url, timeout=TIMEOUT) for url in cluster.urls]

    async def pair(create: int, host_on: int, guest_on: int) -> tuple[dict, Session, Session]:
        host = await apis[create].create_call()
        guest = await apis[(create + 1) % 3].join(host["call_id"])
        a = await Session([apis[host_on], *apis], host).open()
        await a.wait_for("state", subject=host["peer_id"])
        b = await Session([apis[guest_on], *apis], guest).open()
        await a.wait_for("state", subject=guest["peer_id"], event="connected")
        return host, a, b

    one_host, one_a, one_b = await pair(1, 1, 2)  # owned by node 1 (its first socket is there)
    two_host, two_a, two_b = await pair(0, 0, 2)
    one_a.send("offer", {"sdp": "one-offer"})
    two_a.send("offer", {"sdp": "two-offer"})
    assert (await one_b.wait_for("offer"))["payload"] == {"sdp": "one-offer"}
    cluster.nodes[1].kill()  # between offer and answer: the host's socket and the call's owner die
    one_b.send("answer", {"sdp": "one-answer"})
    assert (await two_b.wait_for("offer"))["payload"] == {"sdp": "two-offer"}
    two_b.send("answer", {"sdp": "two-answer"})
    assert (await one_a.wait_for("answer", timeout=LEASE + TIMEOUT))["payload"] == {"sdp": "one-answer"}
    assert (await two_a.wait_for("answer"))["payload"] == {"sdp": "two-answer"}
    for i in range(3):
        one_a.send("candidate", {"i": i})
        two_b.send("candidate", {"i": i})
    assert [(await one_b.wait_for("candidate"))["payload"]["i"] for _ in range(3)] == [0, 1, 2]
    assert [(await two_a.wait_for("candidate"))["payload"]["i"] for _ in range(3)] == [0, 1, 2]
    assert one_a.reconnects >= 1 and two_a.reconnects == two_b.reconnects == 0
    await apis[0].end(one_host["call_id"], one_host["peer_token"])
    await apis[2].end(two_host["call_id"], two_host["peer_token"])
    for session, call_id in ((one_a, one_host["call_id"]), (one_b, one_host["call_id"]),
                             (two_a, two_host["call_id"]), (two_b, two_host["call_id"])):
        ended = await session.wait_for("call_ended")
        assert (ended["call_id"], ended["reason"]) == (call_id, "ended")
