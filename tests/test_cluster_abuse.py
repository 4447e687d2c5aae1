"""Wrong tokens for a call owned by another node: refused by the owner before the call's inbox,
and counted against the sender's ``auth_failure_rate`` on the node it reached.

Real processes: a real ``redis-server`` and two signal_srv nodes; the attackers are raw TCP
connections from another loopback address.
"""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest

from signal_srv.client import SignalingClient
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer
from tests.services import RedisServer, needs
from tests.test_abuse import metric, statuses, wrong_leave_flood
from tests.test_cluster import start_node, stop_cleanly

pytestmark = needs("redis-server", "redis-cli")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveServer]]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    started = [start_node(redis.url, f"w{i}", mailbox_size=2, auth_failure_rate=1.0, auth_failure_burst=10)
               for i in range(2)]
    yield started
    stop_cleanly(*started)
    redis.stop()


async def test_bridged_wrong_tokens_never_fail_the_participants_own_requests(nodes: list[LiveServer]) -> None:
    owner, edge = (SignalingClient(node.base_url, timeout=TIMEOUT) for node in nodes)
    host = await owner.create_call()
    call_id = host["call_id"]
    attackers = await wrong_leave_flood(nodes[1].port, call_id)  # through the node that does not own the call

    async def own_requests() -> list[int]:
        bearer = {"Authorization": f"Bearer {host['peer_token']}"}
        return [(await edge.request("GET", f"/apiv2/config?call_id={call_id}", headers=bearer))[0]
                for _ in range(20)]

    own, *attacked = await asyncio.gather(own_requests(), *(statuses(s) for s in attackers))
    assert own == [200] * 20  # none of them found the call's inbox full of wrong tokens
    codes = [code for stream_codes in attacked for code in stream_codes]
    assert set(codes) == {401, 429} and codes.count(401) == 10  # the edge counts the owner's refusals
    assert await metric(edge, 'signal_srv_rate_limited_total{limit="auth"}') == 390
    assert (await edge.leave(call_id, host["peer_token"]))["status"] == "ended"
