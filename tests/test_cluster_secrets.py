"""No peer token reaches Redis: a cluster keeps and forwards only each token's SHA-256 digest.

Real processes: a ``redis-server`` writing an append-only file (``appendfsync always``),
two signal_srv nodes, and ``redis-cli monitor`` watching every command Redis runs. A call
goes through everything that carries a token (a create, a join and a socket bridged from
the other node, the call moving to where its first socket lands, a bridged identify, leave
and end); what Redis holds, its AOF file and the monitor's output must show each
participant's digest and never its token, in clear or encoded.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis as redis_py

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import RedisMonitor, RedisServer, needs
from tests.test_cluster import start_node, stop_cleanly

pytestmark = needs("redis-server", "redis-cli")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(redis: RedisServer) -> Iterator[list[LiveServer]]:
    started = [start_node(redis.url, f"k{i}") for i in range(2)]
    yield started
    stop_cleanly(*started)


@pytest.fixture
def monitor(redis: RedisServer) -> Iterator[RedisMonitor]:
    watching = RedisMonitor(redis).start()
    yield watching
    watching.stop()


def leaked_forms(token: str) -> list[bytes]:
    """The token, and the encodings a store might hold it in (of its text and of its 128 random bits)."""
    forms = []
    for raw in (token.encode(), base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))):
        forms += [raw, base64.b64encode(raw).rstrip(b"="), base64.urlsafe_b64encode(raw).rstrip(b"="),
                  raw.hex().encode(), raw.hex().upper().encode()]
    return forms


def digest_form(token: str) -> bytes:
    """The token's digest as the server writes it (base64)."""
    return base64.b64encode(hashlib.sha256(token.encode()).digest())


def everything_in(server: RedisServer) -> bytes:
    """Every key and value Redis holds, read by type."""
    client = redis_py.Redis(port=server.port)
    try:
        held = []
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            value: Any = {
                b"string": lambda: client.get(key),
                b"hash": lambda: client.hgetall(key),
                b"stream": lambda: client.xrange(key),
                b"list": lambda: client.lrange(key, 0, -1),
                b"set": lambda: client.smembers(key),
                b"zset": lambda: client.zrange(key, 0, -1, withscores=True),
            }[kind]()
            held.append(key + b" " + repr(value).encode())
        return b"\n".join(held)
    finally:
        client.close()


def append_only_file(server: RedisServer) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(Path(server.folder).rglob("*.aof")))


def assert_holds_digests_only(where: str, text: bytes, tokens: list[str], live: bool = True) -> None:
    for token in tokens:
        leaks = [form for form in leaked_forms(token) if form in text]
        assert not leaks, f"{where} holds a peer token: {leaks}"
        if live:
            assert digest_form(token) in text, f"{where} lacks the digest of a peer token"


async def test_redis_its_aof_and_its_monitor_see_token_digests_never_tokens(
    redis: RedisServer, nodes: list[LiveServer], monitor: RedisMonitor
) -> None:
    first, second = (SignalingClient(node.base_url, timeout=TIMEOUT) for node in nodes)
    host = await first.create_call()
    call_id = host["call_id"]
    guest = await second.join(call_id)  # bridged to the owner
    a = await second.connect_as(host)  # the call moves here, written whole with both participants
    await a.wait_for("state", subject=host["peer_id"])
    b = await first.connect_as(guest)  # bridged to the new owner
    await a.wait_for("state", subject=guest["peer_id"], event="connected")
    a.send("message", "hello")
    assert (await b.wait_for("message"))["payload"] == "hello"
    guest_bearer = {"Authorization": f"Bearer {guest['peer_token']}"}
    status, _, _ = await first.request("GET", f"/apiv2/config?call_id={call_id}", headers=guest_bearer)
    assert status == 200  # an identify, bridged
    tokens = [host["peer_token"], guest["peer_token"]]
    assert_holds_digests_only("Redis", everything_in(redis), tokens)

    stolen = {"Authorization": f"Bearer {digest_form(guest['peer_token']).decode()}"}
    status, body, _ = await first.request("POST", f"/apiv2/calls/{call_id}/end", headers=stolen)
    assert (status, body["error"]["code"]) == (401, "unauthorized")  # what Redis holds opens nothing
    assert (await first.leave(call_id, guest["peer_token"]))["status"] == "waiting"
    assert (await first.end(call_id, host["peer_token"]))["status"] == "ended"
    assert await a.wait_closed() == (1000, "ended")

    assert_holds_digests_only("redis-cli monitor", monitor.seen_until(f"done {call_id}").encode(), tokens)
    assert_holds_digests_only("the append-only file", append_only_file(redis), tokens)
    assert_holds_digests_only("Redis after the end", everything_in(redis), tokens, live=False)
