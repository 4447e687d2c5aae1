"""End-to-end support: a real signal_srv in its own thread, optionally inside a private netns.

The server runs in a thread with its own event loop, so a test can drive aiortc or
Playwright from its own loop (or synchronously) and only ever talk to the server over
sockets, like a real client.

``netns`` makes a private network namespace that nothing outside this machine can reach:
``unshare --net`` creates it, with ``lo`` up and a veth pair whose two ends both stay
inside it (one end carries a private address, so Chromium has a non-loopback interface to
gather ICE candidates on). No interface of the namespace is connected to the host's
network, so a packet sent there can only reach the namespace itself. Threads enter it
with ``setns(2)``; every socket they open, and every process they start (a browser),
lives in it.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import subprocess
import threading
from typing import Any, Callable, TypeVar

import pytest
from tornado.netutil import bind_sockets

from signal_srv.app import make_app
from signal_srv.config import Config
from signal_srv.server import make_server

__all__ = ["E2E_TIMEOUT", "NetNamespace", "ServerThread", "e2e_config", "in_ci", "run_in_netns", "setns"]

T = TypeVar("T")

# One timeout for each wait on a real WebRTC stack (ICE + DTLS take seconds, not ms).
E2E_TIMEOUT = 20.0 * float(os.environ.get("SIGNAL_SRV_TEST_TIMEOUT_SCALE", "1"))

CLONE_NEWNET = 0x40000000

# Addresses that exist only inside the test's own namespace (RFC 1918, never routed out:
# the namespace has no link to the host).
NETNS_ADDRESS = "10.213.7.1"

_NETNS_SETUP = f"""
set -e
echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
ip link set lo up
ip link add e2e0 type veth peer name e2e1
ip addr add {NETNS_ADDRESS}/24 dev e2e0
ip link set e2e0 up
ip link set e2e1 up
echo ready
read _
"""


# Network namespace ---------------------------------------------------------------------


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path`` (``/proc/PID/ns/net``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetNamespace:
    """A private network namespace, held open by an ``unshare --net`` shell until ``close()``."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", _NETNS_SETUP],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        ready = self.process.stdout.readline() if self.process.stdout else ""
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"could not set up a network namespace: {self._stderr()}")
        self.path = f"/proc/{self.process.pid}/ns/net"

    def _stderr(self) -> str:
        try:
            return self.process.communicate(timeout=5)[1].strip()
        except (subprocess.TimeoutExpired, ValueError):
            return "(no output)"

    def addresses(self) -> str:
        """``ip -brief address`` inside the namespace, for failure messages."""
        return subprocess.run(["nsenter", f"--net={self.path}", "ip", "-brief", "address"],
                              capture_output=True, text=True, timeout=5).stdout

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the shell's `read` returns and the namespace goes away
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()


def run_in_netns(netns: NetNamespace | None, func: Callable[[], T], timeout: float) -> T:
    """Run ``func()`` in a fresh thread inside ``netns`` and return its result (or raise its error)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            if netns is not None:
                setns(netns.path)
            outcome["result"] = func()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="e2e-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(func, '__name__', func)} did not finish within {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


# Server --------------------------------------------------------------------------------


class ServerThread:
    """signal_srv (``make_app(config)``) on 127.0.0.1 and a free port, in its own thread and loop.

    Like ``signal_srv.server.serve()``, minus the signal handlers (those only work in the
    main thread), the metrics port and the sweeper. Inside ``netns``, the listening socket
    belongs to that namespace.
    """

    def __init__(self, config: Config, netns: NetNamespace | None = None) -> None:
        self.config = config
        self.netns = netns
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="signal-srv", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(E2E_TIMEOUT) or self._error is not None:
            raise RuntimeError("signal_srv did not start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(E2E_TIMEOUT)
        assert not self._thread.is_alive(), "signal_srv did not stop"

    def _run(self) -> None:
        try:
            if self.netns is not None:
                setns(self.netns.path)
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    async def _serve(self) -> None:
        app = make_app(self.config)
        registry = app.settings["registry"]
        server = make_server(app, self.config)
        sockets = bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await registry.close()
        await server.close_all_connections()


def e2e_config(**options: Any) -> Config:
    """Defaults for end-to-end runs: any free port, heartbeats short enough to notice a drop."""
    base = {"port": 0, "heartbeat_interval": 5.0, "heartbeat_timeout": 5.0}
    return dataclasses.replace(Config(), **{**base, **options})


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; in CI (CI=true) a missing prerequisite is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: end-to-end prerequisites must be installed)")
    pytest.skip(reason)
