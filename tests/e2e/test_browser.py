"""The demo page in real browsers: headless Chromium pages call each other through signal_srv.

Everything (the server's listening socket, Playwright's driver and Chromium) runs inside
a private network namespace made by the ``netns`` fixture, so Chromium has a
non-loopback interface to gather ICE candidates on and nothing can leave the machine.
Chromium is Debian's (``/usr/bin/chromium``), never a browser downloaded by Playwright.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.e2e.support import E2E_TIMEOUT, NetNamespace, ServerThread, e2e_config, run_in_netns, skip_or_fail
from tests.live_server import LiveServer
from tests.services import Nginx, RedisServer

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("SIGNAL_SRV_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = E2E_TIMEOUT * 1000
# Every test runs its scenario within this bound (the brief: each e2e test under 60 s).
SCENARIO_TIMEOUT = 55.0

CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

# Makes getUserMedia fail as if the person clicked "Block" on the permission prompt.
REFUSE_CAMERA = """
navigator.mediaDevices.getUserMedia = () =>
  Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));
"""


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium and Playwright's Python package; skipped (failed under CI=true) without them."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        skip_or_fail(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("the playwright Python package is missing: pip install playwright")
    return CHROMIUM


class Browser:
    """One Chromium profile; its tabs are ``DemoPage``s."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.tabs: list[DemoPage] = []

    def tab(self, name: str, url: str, init_script: str | None = None) -> DemoPage:
        page = DemoPage(self, name, init_script)
        page.page.goto(url)
        return page

    def assert_no_page_errors(self) -> None:
        """No uncaught error, and nothing the page's Content Security Policy had to refuse."""
        errors = [f"{tab.name}: {line}" for tab in self.tabs for line in tab.console
                  if line.startswith("pageerror") or "Content Security Policy" in line]
        assert not errors, "errors in the demo page:\n" + "\n".join(errors)


@contextlib.contextmanager
def browser(executable: str) -> Iterator[Browser]:
    """A headless Chromium with fake camera and microphone and a fresh profile."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="signal-srv-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
        )
        context.set_default_timeout(WAIT_MS)
        try:
            chrome = Browser(context)
            yield chrome
            chrome.assert_no_page_errors()
        finally:
            context.close()


class DemoPage:
    """One tab of the demo page, read through its ``window.demo`` hook."""

    def __init__(self, browser: Browser, name: str, init_script: str | None = None) -> None:
        self.name = name
        self.tabs = browser.tabs  # so a failure can show what the other side saw too
        self.tabs.append(self)
        self.page = browser.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        if init_script:
            self.page.add_init_script(init_script)

    def new_call(self) -> str:
        """Click "New call"; return the invite link once the socket is up."""
        self.page.click("#new-call")
        self.wait("demo.state !== null && demo.socket === 'open'")
        return str(self.page.input_value("#invite-link"))

    def value(self, expression: str) -> Any:
        return self.page.evaluate(f"() => {expression}")

    def wait(self, expression: str) -> None:
        try:
            self.page.wait_for_function(f"() => {expression}", timeout=WAIT_MS)
        except Exception as exc:
            reports = "\n\n".join(tab.report() for tab in [self] + [t for t in self.tabs if t is not self])
            raise AssertionError(f"{self.name}: timed out waiting for {expression}\n\n{reports}") from exc

    def wait_connected(self) -> None:
        self.wait("demo.pc !== null && demo.pc.connectionState === 'connected'")

    def wait_remote_video_playing(self, frames: int = 10) -> None:
        """The remote <video> decodes new frames and has a picture size."""
        start = self.value("demo.remoteFrames")
        self.wait(f"demo.remoteFrames >= {start + frames} && demo.remoteVideo.videoWidth > 0")

    def report(self) -> str:
        try:
            details = self.value(
                "({phase: demo.phase, notice: demo.notice, socket: demo.socket, state: demo.state,"
                " pc: demo.pc && [demo.pc.connectionState, demo.pc.iceConnectionState,"
                " demo.pc.iceGatheringState, demo.pc.signalingState], events: demo.events})")
        except Exception as exc:
            details = f"(page unreadable: {exc})"
        return f"{self.name}: {details}\nconsole: " + "\n".join(self.console[-30:])


def run(netns: NetNamespace, scenario: Callable[[], None]) -> None:
    run_in_netns(netns, scenario, SCENARIO_TIMEOUT)


def start_call(chrome: Browser, url: str, label: str) -> tuple[DemoPage, DemoPage, str]:
    """A host page creates a call, a guest page opens its invite link; both get connected."""
    host = chrome.tab(f"{label}-host", url + "/")
    invite = host.new_call()
    call_id = host.value("demo.callId")
    assert invite == f"{url}/?call={call_id}"
    guest = chrome.tab(f"{label}-guest", invite)
    for page in (host, guest):
        page.wait_connected()
    return host, guest, call_id


def assert_in_active_call(page: DemoPage, call_id: str) -> None:
    state = page.value("demo.state")
    assert state["call_id"] == call_id
    assert state["status"] == "active"
    assert state["participants"]["count"] == 2
    assert page.value("document.querySelector('#call-status').textContent") == "active"
    assert page.value("document.querySelector('#participants').textContent").startswith("2 of 2")


def test_two_calls_at_once_connect_and_one_hang_up_leaves_the_other_connected(
    chromium: str, netns: NetNamespace, netns_server: ServerThread
) -> None:
    url = netns_server.url

    def scenario() -> None:
        with browser(chromium) as chrome:
            host1, guest1, call1 = start_call(chrome, url, "call1")
            assert (host1.value("demo.role"), host1.value("demo.polite")) == ("host", False)
            assert (guest1.value("demo.role"), guest1.value("demo.polite")) == ("guest", True)
            host2, guest2, call2 = start_call(chrome, url, "call2")
            assert call1 != call2

            for page, call_id in ((host1, call1), (guest1, call1), (host2, call2), (guest2, call2)):
                page.wait_connected()
                page.wait_remote_video_playing()
                assert_in_active_call(page, call_id)

            ARTIFACTS.mkdir(exist_ok=True)
            host1.page.screenshot(path=str(ARTIFACTS / "browser-connected.png"), full_page=True)

            host1.page.click("#hang-up")
            for page in (host1, guest1):
                page.wait("demo.phase === 'ended' && demo.pc.connectionState === 'closed'")
                assert "The call was ended." in page.value("demo.notice")
            gone = host1.value(f"fetch('/apiv2/calls/{call1}').then(r => r.status)")
            assert gone == 404

            for page, call_id in ((host2, call2), (guest2, call2)):
                page.wait_remote_video_playing()
                assert page.value("demo.pc.connectionState") == "connected"
                assert_in_active_call(page, call_id)

            # The page that hung up can start a fresh call right away.
            host1.new_call()
            assert host1.value("demo.callId") not in (call1, call2)
            assert host1.value("demo.state.status") == "waiting"
            assert host1.value("demo.sending") is True
            assert host1.value("demo.notice") == ""

    run(netns, scenario)


def test_full_and_unknown_calls_get_a_clear_message(
    chromium: str, netns: NetNamespace, netns_server: ServerThread
) -> None:
    url = netns_server.url

    def scenario() -> None:
        with browser(chromium) as chrome:
            host, guest, call_id = start_call(chrome, url, "full")
            third = chrome.tab("third", f"{url}/?call={call_id}")
            third.wait("demo.phase === 'error'")
            assert "This call is full" in third.value("demo.notice")
            assert third.value("demo.pc") is None

            unknown = chrome.tab("unknown", f"{url}/?call=no-such-call")
            unknown.wait("demo.phase === 'error'")
            assert "does not exist" in unknown.value("demo.notice")

            # The refused pages changed nothing for the two participants.
            for page in (host, guest):
                page.wait_remote_video_playing()
                assert_in_active_call(page, call_id)

    run(netns, scenario)


def test_refused_camera_still_receives_the_other_side(
    chromium: str, netns: NetNamespace, netns_server: ServerThread
) -> None:
    url = netns_server.url

    def scenario() -> None:
        with browser(chromium) as chrome:
            host = chrome.tab("host", url + "/")
            invite = host.new_call()
            guest = chrome.tab("guest-no-camera", invite, init_script=REFUSE_CAMERA)
            for page in (host, guest):
                page.wait_connected()
            assert guest.value("demo.sending") is False
            assert "access was refused" in guest.value("demo.notice")
            guest.wait_remote_video_playing()
            assert host.value("demo.remoteFrames") == 0

    run(netns, scenario)


def test_reload_rejoins_with_the_same_credentials_and_reconnects_media(
    chromium: str, netns: NetNamespace, netns_server: ServerThread
) -> None:
    url = netns_server.url

    def scenario() -> None:
        with browser(chromium) as chrome:
            host, guest, call_id = start_call(chrome, url, "reload")
            peer_id = guest.value("demo.state.peer_id")
            guest.page.reload()
            guest.wait("demo.state !== null")
            assert guest.value("demo.state.peer_id") == peer_id
            assert guest.value("demo.role") == "guest"
            for page in (host, guest):
                page.wait_connected()
                page.wait_remote_video_playing()
                assert_in_active_call(page, call_id)
            assert any("the other side has a new connection" in e for e in host.value("demo.events"))

            host.page.reload()
            for page in (host, guest):
                page.wait_connected()
                page.wait_remote_video_playing()
            assert host.value("demo.role") == "host"

    run(netns, scenario)


def test_signaling_drop_reconnects_with_backoff_and_the_call_goes_on(
    chromium: str, netns: NetNamespace, netns_server: ServerThread
) -> None:
    url = netns_server.url
    if shutil.which("ss") is None:
        skip_or_fail("ss (iproute2) is missing")

    def scenario() -> None:
        with browser(chromium) as chrome:
            host, guest, call_id = start_call(chrome, url, "drop")
            # Destroy every TCP connection of the server's port, like a network drop.
            subprocess.run(["ss", "-K", "-t", f"sport = :{netns_server.port}"], check=True,
                           capture_output=True, timeout=10)
            for page in (host, guest):
                page.wait("demo.events.some(e => e.includes('signaling reconnecting (close code 1006)'))")
                page.wait("demo.socket === 'open' && demo.state.participants.connected === 2")
                assert any("resuming after seq" in e for e in page.value("demo.events"))
                assert page.value("demo.pc.connectionState") == "connected"
                page.wait_remote_video_playing()

            # Signaling works again: the host sees at once a guest that leaves ...
            status = guest.value(
                "(() => { const c = JSON.parse(sessionStorage.getItem('signal_srv.call.' + demo.callId));"
                " return fetch(`/apiv2/calls/${c.call_id}/leave`, {method: 'POST',"
                " headers: {Authorization: `Bearer ${c.peer_token}`}}).then(r => r.status); })()")
            assert status == 200
            host.wait("demo.state.event === 'left' && demo.state.participants.count === 1")
            assert "The other participant left" in host.value("demo.notice")
            guest.wait("demo.phase === 'ended'")

            # ... and calls the next person who opens the invite link.
            newcomer = chrome.tab("drop-newcomer", f"{url}/?call={call_id}")
            for page in (host, newcomer):
                page.wait_connected()
                page.wait_remote_video_playing()
                assert_in_active_call(page, call_id)
            assert host.value("demo.notice") == ""

    run(netns, scenario)


def test_a_cluster_node_that_stops_hands_its_call_over_and_both_pages_go_on(
    chromium: str, netns: NetNamespace, tmp_path: Path
) -> None:
    for program in ("redis-server", "nginx"):
        if shutil.which(program) is None:
            skip_or_fail(f"{program} is missing: apt-get install {program}")

    def scenario() -> None:
        redis = RedisServer(tmp_path).start()
        nodes = [LiveServer(redis_url=redis.url, node_id=f"b{i}", node_lease=2, allowed_origins="*",
                            heartbeat_interval=5, heartbeat_timeout=5).start() for i in range(2)]
        proxy = None
        try:
            for node in nodes:
                node.wait_for_log("holds its lease")
            proxy = Nginx(tmp_path, [node.port for node in nodes]).start()
            with browser(chromium) as chrome:
                host, guest, call_id = start_call(chrome, proxy.base_url, "restart")
                for page in (host, guest):
                    page.wait_remote_video_playing()
                member = redis.cli("HGET", f"sig:call:{{{call_id}}}", "owner")
                owner = next(node for i, node in enumerate(nodes) if member.startswith(f"b{i}/"))
                owner.terminate()  # SIGTERM: the node hands the call over
                assert owner.wait_exited() == 0
                for page in (host, guest):
                    page.wait("demo.events.some(e => e.includes('signaling reconnecting (close code 1012)'))")
                    page.wait("demo.socket === 'open' && demo.state.participants.connected === 2")
                    assert page.value("demo.phase") == "in_call"
                    assert page.value("demo.pc.connectionState") == "connected"
                    page.wait_remote_video_playing()
                    assert_in_active_call(page, call_id)
                assert not owner.problems(), owner.problems()
                host.page.click("#hang-up")  # signaling works through the node that took the call over
                for page in (host, guest):
                    page.wait("demo.phase === 'ended'")
                    assert "The call was ended." in page.value("demo.notice")
        finally:
            if proxy is not None:
                proxy.stop()
            for node in nodes:
                node.stop()
            redis.stop()

    run(netns, scenario)


def answer_as_aiortc_guest(base_url: str, call_id: str, frames: int) -> dict[str, Any]:
    """Join ``call_id`` as an aiortc peer that only answers, and read ``frames`` video frames.

    Runs on its own event loop (in the caller's thread, so inside the netns). It uses the
    browser's trickled candidates as they come, which is what a non-browser client of the
    demo must do; its own candidates travel inline in its answer.
    """
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.sdp import candidate_from_sdp

    from signal_srv.client import SignalingClient

    async def main() -> dict[str, Any]:
        client = SignalingClient(base_url, timeout=E2E_TIMEOUT)
        me = await client.join(call_id)
        conn = await client.connect_as(me)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        video: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: video.set_result(track) if track.kind == "video" and not video.done() else None)

        async def signaling() -> None:
            while True:
                message = await conn.receive(timeout=SCENARIO_TIMEOUT)
                payload = message.get("payload") or {}
                if message["type"] == "offer":
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=payload["sdp"], type="offer"))
                    await pc.setLocalDescription(await pc.createAnswer())
                    conn.send("answer", {"type": "answer", "sdp": pc.localDescription.sdp})
                elif message["type"] == "candidate" and payload.get("candidate"):
                    candidate = candidate_from_sdp(payload["candidate"].split(":", 1)[1])
                    candidate.sdpMid = payload.get("sdpMid")
                    candidate.sdpMLineIndex = payload.get("sdpMLineIndex")
                    await pc.addIceCandidate(candidate)

        reader = asyncio.create_task(signaling())
        try:
            track = await asyncio.wait_for(video, E2E_TIMEOUT)
            sizes = [(f.width, f.height) for f in [await asyncio.wait_for(track.recv(), E2E_TIMEOUT)
                                                   for _ in range(frames)]]
            return {"state": pc.connectionState, "sizes": sizes, "polite": me["polite"]}
        finally:
            reader.cancel()
            conn.close()
            await pc.close()

    return asyncio.run(main())


def test_the_demo_page_calls_an_aiortc_peer(
    chromium: str, netns: NetNamespace, netns_server: ServerThread
) -> None:
    try:
        import aiortc  # noqa: F401
    except ImportError:
        skip_or_fail("aiortc is missing: pip install aiortc")
    url = netns_server.url

    def scenario() -> None:
        with browser(chromium) as chrome:
            host = chrome.tab("host", url + "/")
            host.new_call()
            call_id = host.value("demo.callId")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                guest = pool.submit(run_in_netns, netns, lambda: answer_as_aiortc_guest(url, call_id, 5),
                                    SCENARIO_TIMEOUT - 10)
                host.wait_connected()
                result = guest.result(timeout=SCENARIO_TIMEOUT - 10)
            assert result["polite"] is True
            assert result["state"] == "connected"
            assert len(result["sizes"]) == 5 and all(w > 0 and h > 0 for w, h in result["sizes"])

    run(netns, scenario)


E2E_SECRET = "an-end-to-end-secret-of-at-least-32-bytes"


@pytest.fixture
def jwt_server(netns: NetNamespace) -> Iterator[ServerThread]:
    """A real signal_srv with ``auth=jwt`` on 127.0.0.1 inside ``netns``."""
    thread = ServerThread(e2e_config(auth="jwt", jwt_secret=E2E_SECRET), netns)
    thread.start()
    yield thread
    thread.stop()


def test_with_auth_jwt_the_page_calls_with_the_tokens_its_application_gives_it(
    chromium: str, netns: NetNamespace, jwt_server: ServerThread
) -> None:
    from signal_srv.tokens import mint

    url = jwt_server.url

    def scenario() -> None:
        with browser(chromium) as chrome:
            stranger = chrome.tab("stranger", url + "/")
            stranger.page.click("#new-call")
            stranger.wait("demo.phase === 'error'")
            assert "only signed-in users" in stranger.value("demo.notice")

            # The application's backend mints a token and opens the page with it in the fragment.
            host = chrome.tab("host", f"{url}/#token={mint(E2E_SECRET, 'alice', grants=['create'], name='Alice')}")
            assert host.value("location.hash") == ""  # taken out of the address bar at once
            invite = host.new_call()
            call_id = host.value("demo.callId")
            assert invite == f"{url}/?call={call_id}"  # the invite carries no token
            intruder = chrome.tab("intruder", f"{invite}#token={mint(E2E_SECRET, 'eve', grants=['join'], call_id='x' * 22)}")
            intruder.wait("demo.phase === 'error'")
            assert "does not allow this" in intruder.value("demo.notice")

            guest_token = mint(E2E_SECRET, "bob", grants=["join"], name="Bob", call_id=call_id)
            guest = chrome.tab("guest", f"{invite}#token={guest_token}")
            for page in (host, guest):
                page.wait_connected()
                page.wait_remote_video_playing()
                assert_in_active_call(page, call_id)
            host.wait("demo.peer && demo.peer.connected")
            assert (host.value("demo.peer.identity"), host.value("demo.peer.name")) == ("bob", "Bob")
            assert host.value("document.querySelector('#peer-name').textContent") == "Bob"
            assert guest.value("document.querySelector('#peer-name').textContent") == "Alice"
            ARTIFACTS.mkdir(exist_ok=True)
            host.page.screenshot(path=str(ARTIFACTS / "browser-jwt.png"), full_page=True)

            # An administrator removes the guest: both pages say what happened.
            admin = mint(E2E_SECRET, "ops", grants=["admin"])
            guest_id = host.value("demo.peer.peer_id")
            status = host.value(f"fetch('/apiv2/calls/{call_id}/participants/{guest_id}/remove', "
                                f"{{method: 'POST', headers: {{Authorization: 'Bearer {admin}'}}}}).then(r => r.status)")
            assert status == 200
            guest.wait("demo.phase === 'ended'")
            assert "You were removed from the call." in guest.value("demo.notice")
            host.wait("demo.state.participants.count === 1")
            assert "was removed from the call" in host.value("demo.notice")

    run(netns, scenario)
