"""The actor's inbox: its order when a frame is handled at once instead of queued, and its bound."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from signal_srv.actor import CallActor
from signal_srv.call import Connect, Identify, Join, Leave, Receive
from signal_srv.messages import Relay
from signal_srv.peer_tokens import token_digest
from signal_srv.registry import Registry
from tests.conftest import TIMEOUT


class RecordingSocket:
    """The network edge of one participant: records what the actor sends it."""

    def __init__(self) -> None:
        self.awaiting_pong_since: float | None = None
        self.frames: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.closed: tuple[int | None, str | None] | None = None

    def send(self, text: str) -> None:
        self.frames.append(json.loads(text))

    def reply_error(self, code: str, message: str) -> None:
        self.errors.append(code)

    def heartbeat(self, now: float) -> None:
        pass

    def abort(self) -> None:
        self.closed = (None, None)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = (code, reason)

    def relayed(self) -> list[Any]:
        return [frame["payload"] for frame in self.frames if frame["type"] == "message"]


async def connected_pair(registry: Registry) -> tuple[CallActor, RecordingSocket, RecordingSocket, str]:
    """A call with both participants' sockets attached; the guest's token digest."""
    created = registry.create()
    actor = created.actor
    await actor.ask(Join("guest", token_digest("guest-token")), TIMEOUT)
    host, guest = RecordingSocket(), RecordingSocket()
    await actor.ask(Connect(created.peer_id, token_digest(created.peer_token), 1), TIMEOUT, socket=host)
    await actor.ask(Connect("guest", token_digest("guest-token"), 2), TIMEOUT, socket=guest)
    return actor, host, guest, token_digest("guest-token")


async def test_a_frame_to_an_idle_actor_is_relayed_before_tell_returns(registry: Registry) -> None:
    actor, host, guest, _ = await connected_pair(registry)
    assert actor.tell(Receive(1, Relay("message", '"now"')), socket=host)
    assert guest.relayed() == ["now"]


async def test_a_frame_told_behind_a_queued_request_waits_its_turn(registry: Registry) -> None:
    actor, host, guest, guest_digest = await connected_pair(registry)
    assert actor.tell(Receive(1, Relay("message", '"before"')), socket=host)
    left = actor.ask_nowait(Leave(guest_digest))
    assert actor.tell(Receive(1, Relay("message", '"after"')), socket=host)  # queued: the leave comes first
    await left
    await actor.ask(Join("third", token_digest("third")), TIMEOUT)  # a round trip: everything told so far is handled
    assert guest.relayed() == ["before"]
    assert host.errors == ["no_peer"]


@pytest.mark.settings(mailbox_size=2)
async def test_a_put_to_a_full_inbox_waits_for_room_and_keeps_its_turn(registry: Registry) -> None:
    actor, host, guest, guest_digest = await connected_pair(registry)
    asked = actor.ask_nowait(Identify(guest_digest))  # straight to the waiting loop
    frames = [actor.tell(Receive(1, Relay("message", f'"{n}"')), socket=host) for n in (1, 2, 0)]
    assert frames == [True, True, False]  # two fill the inbox, the third is refused
    put = asyncio.ensure_future(actor.put(Receive(1, Relay("message", '"3"')), socket=host))
    await asyncio.wait_for(put, TIMEOUT)
    assert await asked == "guest"
    await actor.ask(Identify(guest_digest), TIMEOUT)
    assert guest.relayed() == ["1", "2", "3"]


async def test_timers_due_within_a_millisecond_leave_the_actor_running() -> None:
    """uvloop answers call_at with a plain Handle (no when()) for a time less than a millisecond away."""
    registry = Registry(heartbeat_interval=0.0002, heartbeat_timeout=60.0)
    try:
        actor, host, guest, guest_digest = await connected_pair(registry)
        for _ in range(200):  # each one passes the loop while a heartbeat timer is pending
            assert await actor.ask(Identify(guest_digest), TIMEOUT) == "guest"
        assert actor.alive
    finally:
        await registry.close(TIMEOUT)
