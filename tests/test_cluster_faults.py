"""Cluster faults with real processes: Redis missing at start, Redis lost and back, a bad redis_url."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import RedisServer, free_port, needs
from tests.test_cluster import LEASE, pair_across, start_node, stop_cleanly

pytestmark = needs("redis-server", "redis-cli")

ASK_TIMEOUT = 2.0
RESUME_WITHIN = 5.0


async def assert_unavailable(api: SignalingClient, method: str, path: str) -> None:
    started = time.monotonic()
    status, body, headers = await api.request(method, path)
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "unavailable", "1"), (method, path)
    assert time.monotonic() - started < ASK_TIMEOUT


async def test_without_redis_at_start_a_node_serves_503_and_joins_when_redis_comes(tmp_path: Path) -> None:
    port = free_port()
    node = LiveServer(redis_url=f"redis://127.0.0.1:{port}/0", node_id="early", node_lease=LEASE,
                      ask_timeout=ASK_TIMEOUT).start()
    redis = RedisServer(tmp_path, port=port)
    try:
        api = SignalingClient(node.base_url, timeout=TIMEOUT)
        status, health, _ = await api.request("GET", "/healthz")
        assert (status, health["node_id"], health["redis"]) == (200, "early", "unreachable")
        status, ready, headers = await api.request("GET", "/readyz")
        assert (status, ready, headers["Retry-After"]) == (503, {"status": "unavailable"}, "1")
        for method, path in [("POST", "/apiv2/calls"), ("GET", "/apiv2/calls"), ("GET", "/apiv2/calls/someone"),
                             ("POST", "/apiv2/calls/someone/join"), ("POST", "/apiv2/calls?reuse_last=true")]:
            await assert_unavailable(api, method, path)
        socket = await api.connect("someone", "peer", "token")
        assert await socket.wait_closed() == (1013, "unavailable")

        mark = node.mark()
        redis.start()
        back = time.monotonic()
        node.wait_for_log("holds its lease", since=mark, timeout=RESUME_WITHIN)
        assert time.monotonic() - back <= RESUME_WITHIN
        assert (await api.request("GET", "/readyz"))[:2] == (200, {"status": "ready"})
        host = await api.create_call()
        assert (await api.get_call(host["call_id"]))["status"] == "waiting"
        stop_cleanly(node)
    finally:
        node.kill()
        redis.stop()


async def test_redis_lost_while_running_gives_503_crashes_nothing_and_service_resumes(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path, appendonly=True).start()
    nodes = [start_node(redis.url, f"r{i}", ask_timeout=ASK_TIMEOUT) for i in range(2)]
    try:
        a, b = (SignalingClient(node.base_url, timeout=TIMEOUT) for node in nodes)
        pair = await pair_across(a, b, a, b)  # owned by r0, the guest's socket bridged from r1
        marks = [node.mark() for node in nodes]
        redis.stop()
        for node, mark in zip(nodes, marks):
            node.wait_for_log("lost Redis", since=mark)
        for api in (a, b):
            await assert_unavailable(api, "POST", "/apiv2/calls")
            await assert_unavailable(api, "GET", "/apiv2/calls")
            assert (await api.request("GET", "/readyz"))[:2] == (503, {"status": "unavailable"})
        await assert_unavailable(b, "GET", "/apiv2/calls/not-held-here")
        # The owner still decides for its own call, and the bridged socket's frame waits in order.
        assert (await a.get_call(pair.call_id))["status"] == "active"
        pair.b.send("message", "sent while Redis was away")
        pair.a.send("message", "owner side")

        marks = [node.mark() for node in nodes]
        redis.start()
        back = time.monotonic()
        for node, mark in zip(nodes, marks):
            node.wait_for_log("holds its lease", since=mark, timeout=RESUME_WITHIN)
        assert time.monotonic() - back <= RESUME_WITHIN
        assert (await pair.a.wait_for("message"))["payload"] == "sent while Redis was away"
        assert (await pair.b.wait_for("message"))["payload"] == "owner side"
        for api in (a, b):
            assert (await api.request("GET", "/readyz"))[0] == 200
            created = await api.create_call()
            assert created["call_id"] in [c["call_id"] for c in await (b if api is a else a).list_calls()]
        await b.end(pair.call_id, pair.guest["peer_token"])
        stop_cleanly(*nodes)
    finally:
        for node in nodes:
            node.kill()
        redis.stop()


def test_a_bad_redis_url_stops_the_server_with_status_2_and_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "signal_srv", "--redis_url=http://:secret@example.org"],
                          capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("signal-srv: configuration error: redis_url")
    assert "secret" not in done.stderr


