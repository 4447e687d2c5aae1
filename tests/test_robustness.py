"""Fault isolation, races, clean-up at scale, clocks, secrets in logs, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import time_machine

from signal_srv.actor import CallActor
from signal_srv.call import End, Receive
from signal_srv.client import ApiError, SignalingClient
from signal_srv.registry import Registry
from signal_srv.logs import JsonFormatter
from signal_srv.peer_tokens import token_digest
from tests.conftest import TIMEOUT, server_environ
from tests.test_ws import assert_relays, make_pair

ROOT = Path(__file__).resolve().parent.parent


def crash_on_receive(actor: CallActor) -> None:
    """Make the next frame a socket sends to ``actor`` crash it, as a bug in the call would."""
    handle = actor.call.handle

    def explode(event: Any, now: float) -> Any:
        if isinstance(event, Receive):
            raise RuntimeError("injected fault")
        return handle(event, now)

    actor.call.handle = explode  # type: ignore[method-assign]


async def test_a_crash_in_one_actor_ends_only_that_call(
    client: SignalingClient, registry: Registry, log_guard: Any
) -> None:
    log_guard.expect("signal_srv.actor", "crashed; ending it")
    bad, good = await make_pair(client), await make_pair(client)
    crash_on_receive(registry.get(bad.call_id))
    bad.a.send("message", "boom")
    for conn in (bad.a, bad.b):
        ended = await conn.wait_for("call_ended")
        assert (ended["call_id"], ended["reason"]) == (bad.call_id, "error")
        assert await conn.wait_closed() == (1011, "internal error")
    with pytest.raises(ApiError) as info:
        await client.get_call(bad.call_id)
    assert info.value.code == "call_not_found"
    await assert_relays(good)
    assert registry.statistics().ended == {"error": 1}
    crashes = [r for r in log_guard.records if "crashed" in r.getMessage()]
    assert len(crashes) == 1 and crashes[0].exc_info and bad.call_id in crashes[0].getMessage()


async def test_end_racing_joins_leaves_no_half_changed_call(client: SignalingClient, registry: Registry) -> None:
    calls = [await client.create_call() for _ in range(20)]
    results = await asyncio.gather(*(
        op for c in calls for op in (
            client.request("POST", f"/apiv2/calls/{c['call_id']}/join"),
            client.request("POST", f"/apiv2/calls/{c['call_id']}/end",
                           headers={"Authorization": f"Bearer {c['peer_token']}"}),
        )
    ))
    joins, ends = results[0::2], results[1::2]
    assert {status for status, _, _ in ends} == {200}
    assert {status for status, _, _ in joins} <= {200, 404}
    assert registry.statistics().calls == 0 and await client.list_calls() == []


async def test_many_joins_at_once_seat_exactly_one(client: SignalingClient) -> None:
    call = await client.create_call()
    results = await asyncio.gather(*(client.request("POST", f"/apiv2/calls/{call['call_id']}/join") for _ in range(50)))
    assert sorted(status for status, _, _ in results) == [200] + [409] * 49


async def test_end_racing_relay_delivers_a_prefix_in_order_then_call_ended(client: SignalingClient) -> None:
    pair = await make_pair(client)
    for i in range(50):
        pair.a.send("candidate", i)
    await client.end(pair.call_id, pair.guest["peer_token"])
    received = []
    while True:
        message = await pair.b.receive()
        if message["type"] == "call_ended":
            break
        if message["type"] == "candidate":
            received.append(message["payload"])
    assert received == list(range(len(received)))
    assert await pair.b.wait_closed() == (1000, "ended")


async def test_leave_racing_a_reconnect_ends_in_one_consistent_state(client: SignalingClient) -> None:
    for _ in range(10):
        pair = await make_pair(client)
        pair.b.abort()
        reconnect, leave = await asyncio.gather(client.connect_as(pair.guest),
                                                client.leave(pair.call_id, pair.guest["peer_token"]))
        assert leave["participants"]["count"] == 1
        code, _ = await reconnect.wait_closed()
        assert code in (4401, 1000)  # refused as a stranger, or attached and then told it left
        state = await pair.a.wait_for("state", event="left")
        assert state["participants"] == {"count": 1, "connected": 1, "max": 2}


@pytest.mark.settings(call_ttl=2.0)
async def test_ten_thousand_calls_leave_nothing_behind(registry: Registry) -> None:
    expiring = []
    for i in range(10_000):
        created = registry.create()
        if i % 2:
            expiring.append(created.actor.call_id)
        else:
            await created.actor.ask(End(token_digest(created.peer_token)), TIMEOUT)
    for call_id in expiring:
        await registry.wait_ended(call_id, TIMEOUT)
    stats = registry.statistics()
    assert (len(registry), stats.waiting, stats.active) == (0, 0, 0)
    assert stats.ended == {"ended": 5000, "expired": 5000}
    await asyncio.wait_for(_until(lambda: registry.statistics().tasks == 0), TIMEOUT)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)  # yields to the loop: the actors' done-callbacks run in between


@pytest.mark.settings(call_ttl=60.0)
async def test_a_wall_clock_jump_neither_expires_nor_revives(client: SignalingClient, registry: Registry) -> None:
    live = await client.create_call()
    ended = await client.create_call()
    await client.end(ended["call_id"], ended["peer_token"])
    for jump in (timedelta(hours=5), timedelta(hours=-5)):
        with time_machine.travel(datetime.now(timezone.utc) + jump, tick=True):
            assert (await client.get_call(live["call_id"]))["status"] == "waiting"
            assert await registry.sweep() == 0
            with pytest.raises(ApiError):
                await client.get_call(ended["call_id"])
    assert [c["call_id"] for c in await client.list_calls()] == [live["call_id"]]


async def test_peer_tokens_never_reach_a_log_line_or_another_participant(
    client: SignalingClient, debug_logs: list[str], log_guard: Any
) -> None:
    pair = await make_pair(client)
    tokens = [pair.host["peer_token"], pair.guest["peer_token"]]
    wrong = await client.connect(pair.call_id, pair.host["peer_id"], pair.guest["peer_token"])
    await wrong.wait_closed()
    await assert_relays(pair)
    await client.request("POST", f"/apiv2/calls/{pair.call_id}/end", headers={"Authorization": f"Bearer {tokens[0]}x"})
    await client.leave(pair.call_id, tokens[1])
    await client.end(pair.call_id, tokens[0])
    assert any("[redacted]" in line for line in debug_logs)
    assert not [line for line in debug_logs for t in tokens if t in line]
    frames = json.dumps(pair.a.skipped + pair.b.skipped)
    assert not [t for t in tokens if t in frames]


def test_json_log_lines_carry_the_call_id() -> None:
    logger = logging.getLogger("signal_srv.actor")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "call %s ended", ("C1",), None,
                               extra={"call_id": "C1"})
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"], line["call_id"]) == (
        "INFO", "signal_srv.actor", "call C1 ended", "C1")


@pytest.mark.e2e
async def test_sigterm_tells_every_socket_and_exits_0(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signal_srv", "--port=0", "--shutdown_timeout=5",
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=server_environ(PYTHONUNBUFFERED="1"),
    )
    try:
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), TIMEOUT * 2)
        port = int(re.search(rb"http://127.0.0.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
        client = SignalingClient(f"http://127.0.0.1:{port}", timeout=TIMEOUT)
        pair = await make_pair(client)
        process.send_signal(signal.SIGTERM)
        for conn in (pair.a, pair.b):
            assert (await conn.wait_for("server_shutdown"))["type"] == "server_shutdown"
            assert await conn.wait_closed() == (1001, "shutdown")
        assert await asyncio.wait_for(process.wait(), TIMEOUT * 2) == 0
        with pytest.raises(ConnectionError):
            await client.create_call()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_puts_metrics_on_their_own_port_when_asked(io_loop: Any) -> None:
    from tornado.httpclient import AsyncHTTPClient
    from tornado.testing import bind_unused_port

    from signal_srv.config import Config
    from signal_srv.server import serve

    ports = []
    for _ in range(2):
        sock, port = bind_unused_port()
        sock.close()
        ports.append(port)
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(Config(port=ports[0], metrics_port=ports[1]), stop))
    http = AsyncHTTPClient()

    async def fetch(port: int, path: str) -> int:
        return (await http.fetch(f"http://127.0.0.1:{port}{path}", raise_error=False)).code

    await asyncio.sleep(0)  # serve() listens before its first await
    assert await asyncio.wait_for(fetch(ports[1], "/metrics"), TIMEOUT) == 200
    assert await asyncio.wait_for(fetch(ports[0], "/metrics"), TIMEOUT) == 404
    assert await asyncio.wait_for(fetch(ports[0], "/healthz"), TIMEOUT) == 200
    stop.set()
    await asyncio.wait_for(server, TIMEOUT)


@pytest.mark.parametrize("formatter", ["text", "json"])
def test_log_output_redacts_tokens_whatever_logged_them(formatter: str) -> None:
    from signal_srv.logs import TextFormatter

    record = logging.getLogger("tornado.application").makeRecord(
        "tornado.application", logging.ERROR, __file__, 1,
        "Uncaught exception GET /apiv2/ws?call_id=C&peer_id=P&token=s3cr3t (127.0.0.1)", (), None)
    line = (TextFormatter() if formatter == "text" else JsonFormatter()).format(record)
    assert "s3cr3t" not in line and "token=[redacted]" in line


@pytest.mark.settings(mailbox_size=2)
async def test_a_full_inbox_refuses_asks_with_call_busy_and_tells_with_false(
    client: SignalingClient, registry: Registry, log_guard: Any
) -> None:
    from signal_srv.call import Identify, Join
    from signal_srv.errors import CallBusy

    log_guard.expect("signal_srv.actor", "inbox full")
    call = await client.create_call()
    actor = registry.get(call["call_id"])
    # No await until the ask, so the actor cannot drain its inbox in between. The first
    # envelope goes straight to the waiting actor, the next two fill the inbox.
    accepted = [actor.tell(Identify(token_digest(call["peer_token"]))) for _ in range(4)]
    assert accepted == [True, True, True, False]
    with pytest.raises(CallBusy):
        await actor.ask(Join("p", token_digest("t")), TIMEOUT)
    assert (await client.join(call["call_id"]))["status"] == "active"  # drained: it answers again
