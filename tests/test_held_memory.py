"""Messages held for an absent participant cost their bytes, not the objects of a parsed payload.

The abusive pattern: create a call, join a guest that never connects, and send 64 frames of
about 65 KB shaped ``{"type": "message", "payload": [{}, {}, ...]}``. Kept as parsed Python
objects, each call cost about 96 MiB of the server's memory; kept as text, it costs about
the 4 MiB of text it holds. Measured on a real server process through its ``/proc`` RSS.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any, Iterator

import pytest

from signal_srv.client import SignalingClient
from signal_srv.registry import Registry
from tests.conftest import TIMEOUT
from tests.live_server import LiveServer, SyncSocket, http
from tests.test_robustness import crash_on_receive

MAX_MESSAGE_SIZE = 65536
RELAY_OVERHEAD = 256  # messages.RELAY_OVERHEAD: the largest client frame is this much under the limit
FRAMES = 64  # ws_buffer_limit's default
MIB = 1024 * 1024

# About 65 KB of empty objects: some 21 700 dicts once parsed, about 1.5 MB of Python objects.
_EMPTIES = (MAX_MESSAGE_SIZE - RELAY_OVERHEAD - len('{"type":"message","payload":[]}') + 1) // 3
ABUSIVE_FRAME = '{"type":"message","payload":[' + ",".join(["{}"] * _EMPTIES) + "]}"

# What an abusive call may cost the server with all 64 frames held: their text (64 x 65 KB,
# 4 MiB) and slack for the allocator (measured: 4.8 MiB). Parsed payloads cost 96 MiB a call.
RSS_PER_CALL_ALL_HELD = 12 * MIB
# ... and on the defaults, where ws_buffer_bytes (256 KiB) holds 4 of them (measured: 0.4 MiB).
RSS_PER_CALL_DEFAULTS = 2 * MIB
HELD_ON_DEFAULTS = 4  # 262144 // 65.3 KB, the frame with the server's envelope


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


class AbusiveCall:
    """A call whose guest joined and never connects; the host floods it with held frames."""

    def __init__(self, server: LiveServer) -> None:
        status, self.host, _ = http("POST", server.base_url + "/apiv2/calls")
        assert status == 201
        status, self.guest, _ = http("POST", f"{server.base_url}/apiv2/calls/{self.host['call_id']}/join")
        assert status == 200
        self.server = server
        self.socket = SyncSocket.for_peer(server, self.host["call_id"], self.host["peer_id"], self.host["peer_token"])
        assert self.socket.recv()["event"] == "connected"

    def flood(self, frames: int = FRAMES) -> list[dict[str, Any]]:
        """Send ``frames`` abusive frames; the error frames they got, once the server handled them all."""
        for _ in range(frames):
            self.socket.send_text(ABUSIVE_FRAME)
        self.socket.send_json({"type": "ping"})
        errors = []
        while (frame := self.socket.recv())["type"] != "pong":
            if frame["type"] == "error":
                errors.append(frame)
        return errors

    def connect_guest(self) -> SyncSocket:
        return SyncSocket.for_peer(self.server, self.host["call_id"], self.guest["peer_id"], self.guest["peer_token"])


@pytest.fixture
def roomy_server() -> Iterator[LiveServer]:
    """Bytes bounds high enough that every abusive frame is held: only their form is measured."""
    server = LiveServer(ws_buffer_bytes=8 * MIB, held_bytes_total=256 * MIB).start()
    yield server
    assert server.stop() == 0
    assert server.problems() == []


@pytest.fixture
def default_server() -> Iterator[LiveServer]:
    server = LiveServer().start()
    yield server
    assert server.stop() == 0
    assert server.problems() == []


def rss_per_abusive_call(server: LiveServer, calls: int = 4) -> tuple[float, list[AbusiveCall]]:
    """RSS growth of ``server`` per abusive call, after a first one warmed the allocator up."""
    pid = server.process.pid  # type: ignore[union-attr]
    made = [AbusiveCall(server)]
    made[0].flood()
    before = rss_bytes(pid)
    for _ in range(calls):
        made.append(AbusiveCall(server))
        made[-1].flood()
    return (rss_bytes(pid) - before) / calls, made


def held_bytes_gauge(server: LiveServer) -> float:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    return float(re.search(r"^signal_srv_held_bytes (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_held_frames_cost_their_text_not_their_parsed_payload(roomy_server: LiveServer) -> None:
    per_call, calls = rss_per_abusive_call(roomy_server)
    assert per_call < RSS_PER_CALL_ALL_HELD, f"{per_call / MIB:.1f} MiB of RSS per abusive call"
    guest = calls[-1].connect_guest()
    assert guest.recv()["type"] == "state"
    assert [guest.recv()["payload"] == [{}] * _EMPTIES for _ in range(FRAMES)] == [True] * FRAMES
    for call in calls:
        call.socket.close()
    guest.close()


def test_on_the_defaults_an_abusive_call_costs_little_and_gets_buffer_full(default_server: LiveServer) -> None:
    per_call, calls = rss_per_abusive_call(default_server)
    assert per_call < RSS_PER_CALL_DEFAULTS, f"{per_call / MIB:.1f} MiB of RSS per abusive call"
    call = AbusiveCall(default_server)
    errors = call.flood()
    assert len(errors) == FRAMES - HELD_ON_DEFAULTS
    assert {e["code"] for e in errors} == {"buffer_full"} and "ws_buffer_bytes" in errors[0]["message"]
    guest = call.connect_guest()
    assert guest.recv()["type"] == "state"
    for _ in range(HELD_ON_DEFAULTS):  # nothing accepted was lost ...
        assert len(guest.recv()["payload"]) == _EMPTIES
    guest.send_json({"type": "ping"})
    assert guest.recv()["type"] == "pong"  # ... and nothing refused was held
    call.socket.send_text(ABUSIVE_FRAME)  # connected now: relayed at once
    assert len(guest.recv()["payload"]) == _EMPTIES
    for s in [guest] + [c.socket for c in calls + [call]]:
        s.close()


def test_held_bytes_total_bounds_the_process_and_frees_on_delivery() -> None:
    server = LiveServer(ws_buffer_bytes=4 * MAX_MESSAGE_SIZE, held_bytes_total=6 * MAX_MESSAGE_SIZE).start()
    try:
        first, second = AbusiveCall(server), AbusiveCall(server)
        assert first.flood(4) == []
        refused = second.flood(4)  # only 2 more fit in the process
        assert len(refused) == 2 and {e["code"] for e in refused} == {"buffer_full"}
        assert "held_bytes_total" in refused[0]["message"]
        assert held_bytes_gauge(server) > 5 * len(ABUSIVE_FRAME)
        guest = first.connect_guest()  # delivered: their bytes are free again
        assert guest.recv()["type"] == "state"
        for _ in range(4):
            assert len(guest.recv()["payload"]) == _EMPTIES
        assert second.flood(2) == []
        for s in (first.socket, second.socket, guest):
            s.close()
        assert http("POST", f"{server.base_url}/apiv2/calls/{second.host['call_id']}/end",
                    headers={"Authorization": f"Bearer {second.host['peer_token']}"})[0] == 200
        assert held_bytes_gauge(server) == 0  # an ended call frees what it held
    finally:
        assert server.stop() == 0
    assert server.problems() == []


async def test_a_crashed_call_frees_what_it_held(client: SignalingClient, registry: Registry, log_guard: Any) -> None:
    log_guard.expect("signal_srv.actor", "crashed; ending it")
    host = await client.create_call()
    await client.join(host["call_id"])
    socket = await client.connect_as(host)
    await socket.wait_for("state")
    socket.send("message", "x" * 1000)
    socket.send("ping")
    await socket.wait_for("pong")
    assert registry.held.used > 1000
    crash_on_receive(registry.get(host["call_id"]))
    socket.send("message", "boom")
    assert await socket.wait_closed() == (1011, "internal error")
    assert registry.held.used == 0
