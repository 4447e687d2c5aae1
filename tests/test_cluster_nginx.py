"""The documented proxy (conf/nginx-cluster.conf) in front of three nodes: a call's sockets meet on one node."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import Nginx, RedisServer, needs
from tests.test_cluster import bridged_frames, pair_across, start_node, stop_cleanly

pytestmark = needs("redis-server", "redis-cli", "nginx")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[LiveServer], Nginx]]:
    folder: Path = tmp_path_factory.mktemp("proxied")
    redis = RedisServer(folder).start()
    nodes = [start_node(redis.url, f"p{i}", xheaders="True") for i in range(3)]
    nginx = Nginx(folder, [node.port for node in nodes]).start()
    try:
        yield nodes, nginx
        stop_cleanly(*(node for node in nodes if node.process and node.process.poll() is None))
    finally:
        nginx.stop()
        for node in nodes:
            node.kill()
        redis.stop()


def socket_node(nodes: list[LiveServer], peer_id: str) -> LiveServer:
    """The node that logged this peer's socket joining (each node's log is waited on in turn)."""
    pattern = f"socket of {re.escape(peer_id)} joined"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for node in nodes:
            try:
                node.wait_for_log(pattern, timeout=0.05)
            except AssertionError:
                continue
            return node
    raise AssertionError(f"no node logged the socket of {peer_id}")


async def test_behind_the_proxy_a_calls_frames_stay_on_one_node(cluster: tuple[list[LiveServer], Nginx]) -> None:
    nodes, nginx = cluster
    api = SignalingClient(nginx.base_url, timeout=TIMEOUT)
    for _ in range(6):
        pair = await pair_across(api, api, api, api)
        host, guest, a, b = pair.host, pair.guest, pair.a, pair.b
        assert socket_node(nodes, host["peer_id"]) is socket_node(nodes, guest["peer_id"])
        before = [bridged_frames(node) for node in nodes]
        a.send("offer", {"sdp": "o"})
        assert (await b.wait_for("offer"))["payload"] == {"sdp": "o"}
        b.send("answer", {"sdp": "a"})
        assert (await a.wait_for("answer"))["payload"] == {"sdp": "a"}
        assert [bridged_frames(node) for node in nodes] == before
        assert (await api.get_call(host["call_id"]))["status"] == "active"
        await api.end(host["call_id"], host["peer_token"])
        assert await b.wait_closed() == (1000, "ended")
    created_on = {node.base_url for node in nodes if any("call " in line and " created" in line for line in node.lines)}
    assert len(created_on) > 1  # creates are spread over the nodes


async def test_the_proxy_fails_over_when_a_node_is_down(cluster: tuple[list[LiveServer], Nginx]) -> None:
    nodes, nginx = cluster
    nodes[2].kill()
    api = SignalingClient(nginx.base_url, timeout=TIMEOUT)
    for _ in range(6):
        host = await api.create_call()
        guest = await api.join(host["call_id"])
        a = await api.connect_as(host)
        b = await api.connect_as(guest)
        await b.wait_for("state", subject=guest["peer_id"])
        b.send("message", "via a live node")
        assert (await a.wait_for("message"))["payload"] == "via a live node"
        await api.end(host["call_id"], guest["peer_token"])
