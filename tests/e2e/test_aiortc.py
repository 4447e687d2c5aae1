"""Two aiortc peers per call negotiate through signal_srv and talk over a real data channel.

ICE, DTLS and SCTP run for real, on 127.0.0.1 only: the peers get no ICE servers
(``RTCConfiguration(iceServers=[])``, so no STUN request leaves the machine) and the
``loopback_ice`` fixture makes aioice gather host candidates on 127.0.0.1 alone (aioice
skips loopback by default and has no option for it, so the fixture replaces its
``get_host_addresses``; every test also checks the SDP carries no other address).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Iterator

import pytest

from tests.e2e.support import E2E_TIMEOUT, ServerThread, skip_or_fail

pytestmark = pytest.mark.e2e

SCENARIO_TIMEOUT = 50.0
PARALLEL_CALLS = 10
MESSAGES_PER_PEER = 5
CANDIDATE_ADDRESS = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+", re.MULTILINE)


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """aiortc installed, and aioice gathering host candidates on 127.0.0.1 only."""
    try:
        import aioice.ice
        import aiortc  # noqa: F401
    except ImportError:
        skip_or_fail("aiortc is missing: pip install aiortc")
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    yield


def run(coroutine: Any) -> Any:
    """Run one scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, SCENARIO_TIMEOUT))


class Peer:
    """One participant: an aiortc connection with a data channel, negotiated with "perfect negotiation".

    The host is impolite: on crossed offers it ignores the guest's. The guest is polite:
    it drops its own offer and answers. aiortc cannot roll a description back, so the
    polite side replaces the connection that made its offer with a fresh one.
    """

    def __init__(self, client: Any, credentials: dict[str, Any]) -> None:
        self.client = client
        self.me = credentials
        self.polite: bool = credentials["polite"]
        self.conn: Any = None
        self.relayed: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self.state_changed = asyncio.Event()
        self.received: asyncio.Queue[str] = asyncio.Queue()
        self.open = asyncio.Event()
        self.making_offer = False
        self.ignored_offers = 0
        self.replaced_offers = 0
        self.sdp: list[str] = []
        self.pc = self._new_connection()
        self._reader: asyncio.Task[None] | None = None

    def _new_connection(self) -> Any:
        from aiortc import RTCConfiguration, RTCPeerConnection

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel("chat", negotiated=True, id=0)
        channel.on("open", lambda: self.open.set() if pc is self.pc else None)
        channel.on("message", lambda message: self.received.put_nowait(message))
        self.channel = channel
        return pc

    async def connect(self) -> None:
        self.conn = await self.client.connect(self.me["call_id"], self.me["peer_id"], self.me["peer_token"])
        self._reader = asyncio.create_task(self._read())

    async def wait_state(self, predicate: Any) -> dict[str, Any]:
        """The first `state` frame (seen so far or to come) for which ``predicate`` holds."""
        async def poll() -> dict[str, Any]:
            while True:
                for state in self.states:
                    if predicate(state):
                        return state
                await self.state_changed.wait()
                self.state_changed.clear()

        return await asyncio.wait_for(poll(), E2E_TIMEOUT)

    async def offer(self) -> None:
        pc = self.pc
        self.making_offer = True
        try:
            await pc.setLocalDescription(await pc.createOffer())
            if pc is self.pc:
                self._send_description("offer")
        finally:
            self.making_offer = False

    async def _read(self) -> None:
        from signal_srv.client import ConnectionClosed

        while True:
            try:
                message = await self.conn.receive(timeout=SCENARIO_TIMEOUT)
            except ConnectionClosed:
                return
            if message["type"] == "state":
                self.states.append(message)
                self.state_changed.set()
            elif message["type"] in ("offer", "answer"):
                self.relayed.append(message)
                await self._on_description(message["payload"])
            else:
                self.relayed.append(message)

    async def _on_description(self, payload: dict[str, Any]) -> None:
        from aiortc import RTCSessionDescription

        is_offer = payload["type"] == "offer"
        collision = is_offer and (self.making_offer or self.pc.signalingState != "stable")
        if collision and not self.polite:
            self.ignored_offers += 1
            return
        if collision:
            self.replaced_offers += 1
            old, self.pc = self.pc, self._new_connection()
            await old.close()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=payload["sdp"], type=payload["type"]))
        if is_offer:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            self._send_description("answer")

    def _send_description(self, kind: str) -> None:
        description = self.pc.localDescription
        self.sdp.append(description.sdp)
        self.conn.send(kind, {"type": description.type, "sdp": description.sdp})

    async def wait_open(self) -> None:
        await asyncio.wait_for(self.open.wait(), E2E_TIMEOUT)

    async def receive_text(self) -> str:
        return await asyncio.wait_for(self.received.get(), E2E_TIMEOUT)

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.pc.close()


async def open_call(client: Any) -> tuple[Peer, Peer]:
    """Create a call, join it, and connect both participants' sockets."""
    host = Peer(client, await client.create_call())
    guest = Peer(client, await client.join(host.me["call_id"]))
    await host.connect()
    await guest.connect()
    for peer in (host, guest):
        await peer.wait_state(lambda s: s["participants"]["connected"] == 2)
    return host, guest


async def exchange(host: Peer, guest: Peer) -> None:
    """Each side sends tagged messages over the data channel; each receives exactly the other's."""
    call_id = host.me["call_id"]
    for peer in (host, guest):
        for i in range(MESSAGES_PER_PEER):
            peer.channel.send(f"{call_id}/{peer.me['role']}/{i}")
    for peer, other in ((host, guest), (guest, host)):
        got = [await peer.receive_text() for _ in range(MESSAGES_PER_PEER)]
        assert got == [f"{call_id}/{other.me['role']}/{i}" for i in range(MESSAGES_PER_PEER)]


def assert_signaling_stayed_in_call(host: Peer, guest: Peer) -> None:
    """Every relayed frame came from the other participant of the same call; ICE stayed on loopback."""
    call_id = host.me["call_id"]
    for peer, other in ((host, guest), (guest, host)):
        assert peer.relayed, f"{peer.me['role']} received no relayed frame"
        for message in peer.relayed:
            assert (message["call_id"], message["from"]) == (call_id, other.me["peer_id"])
        for state in peer.states:
            assert state["call_id"] == call_id and state["peer_id"] == peer.me["peer_id"]
        for sdp in peer.sdp:
            addresses = set(CANDIDATE_ADDRESS.findall(sdp))
            assert addresses == {"127.0.0.1"}, f"candidates outside loopback: {addresses}"


async def one_call(base_url: str) -> tuple[Peer, Peer]:
    from signal_srv.client import SignalingClient

    client = SignalingClient(base_url, timeout=E2E_TIMEOUT)
    host, guest = await open_call(client)
    try:
        await host.offer()
        for peer in (host, guest):
            await peer.wait_open()
        await exchange(host, guest)
        assert_signaling_stayed_in_call(host, guest)
        assert host.pc.connectionState == guest.pc.connectionState == "connected"
    finally:
        await host.close()
        await guest.close()
    return host, guest


def test_two_aiortc_peers_exchange_data_channel_messages(server: ServerThread, loopback_ice: None) -> None:
    host, guest = run(one_call(server.url))
    assert (host.polite, guest.polite) == (False, True)
    assert host.ignored_offers == guest.replaced_offers == 0


def test_ten_calls_in_parallel_have_no_cross_talk(server: ServerThread, loopback_ice: None) -> None:
    async def scenario() -> list[tuple[Peer, Peer]]:
        return list(await asyncio.gather(*(one_call(server.url) for _ in range(PARALLEL_CALLS))))

    pairs = run(scenario())
    call_ids = {host.me["call_id"] for host, _ in pairs}
    assert len(call_ids) == PARALLEL_CALLS


def test_crossed_offers_still_connect_because_the_guest_is_polite(
    server: ServerThread, loopback_ice: None
) -> None:
    async def scenario() -> tuple[Peer, Peer]:
        from signal_srv.client import SignalingClient

        host, guest = await open_call(SignalingClient(server.url, timeout=E2E_TIMEOUT))
        try:
            # Both make and send an offer before either has read the other's: a true glare.
            await asyncio.gather(host.offer(), guest.offer())
            for peer in (host, guest):
                await peer.wait_open()
            await exchange(host, guest)
            assert_signaling_stayed_in_call(host, guest)
            offers = [[m for m in p.relayed if m["type"] == "offer"] for p in (host, guest)]
            assert len(offers[0]) == len(offers[1]) == 1, "each side should have received one offer"
        finally:
            await host.close()
            await guest.close()
        return host, guest

    host, guest = run(scenario())
    assert host.ignored_offers == 1, "the impolite host ignores the crossing offer"
    assert guest.replaced_offers == 1, "the polite guest drops its own offer and answers"
    assert host.ignored_offers + guest.ignored_offers == 1
