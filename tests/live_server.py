"""A real ``python -m signal_srv`` process on a free loopback port, for synchronous test clients.

Hypothesis rules and schemathesis run synchronously, while the pytest-tornasync server runs
on the test thread's IOLoop; so these tests talk to a server in its own process, over real
HTTP and WebSockets, exactly as a browser would. The process logs at INFO to a pipe that a
thread drains; ``problems()`` returns its ERROR lines and tracebacks, so a test can assert
that nothing went wrong inside the server, not only that the answers looked right.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import lru_cache
from typing import Any, Iterator, Mapping

import pytest
import websocket

from tests.conftest import LIMITS_OFF, TEST_LOOP, TIMEOUT, server_environ

__all__ = ["Closed", "LiveServer", "SyncSocket", "http", "live_server_fixture"]

_LISTENING = re.compile(r"listening on http://[^:/]+:(\d+)/")

# Limits raised so that a test's own bounded burst of requests is never throttled; a
# test about the limits themselves lives elsewhere (tests/test_limits.py).
GENEROUS = {
    "max_calls": "100000",
    "max_sockets": "100000",
    "event_loop": TEST_LOOP,
    **{name: str(value) for name, value in LIMITS_OFF.items()},
}


@lru_cache(maxsize=1)
def known_options() -> frozenset[str]:
    """The option names ``python -m signal_srv --help`` lists (so new limits are raised too)."""
    out = subprocess.run(
        [sys.executable, "-m", "signal_srv", "--help"], capture_output=True, text=True, timeout=TIMEOUT * 4
    ).stdout
    return frozenset(m.replace("-", "_") for m in re.findall(r"^\s+--([\w-]+)", out, re.M))


class LiveServer:
    """One server process; ``base_url``/``ws_url`` once started, ``stop()`` to end it.

    ``env`` adds variables to the process's environment (which is the test's otherwise);
    ``nofile`` sets its open-file limit (RLIMIT_NOFILE), e.g. to provoke EMFILE.
    """

    def __init__(self, env: Mapping[str, str] | None = None, nofile: int | None = None, **options: Any) -> None:
        self.nofile = nofile
        known = known_options()
        merged = {**GENEROUS, **{k: str(v) for k, v in options.items()}}
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise ValueError(f"signal_srv does not know the options {unknown}")
        args = [f"--{k}={v}" for k, v in merged.items() if k in known]
        self.args = [sys.executable, "-m", "signal_srv", "--address=127.0.0.1", "--port=0", "--log_level=info", *args]
        self.env = server_environ(**(env or {}))
        self.lines: list[str] = []
        self.port = 0
        self._listening = threading.Event()
        self._logged = threading.Condition()
        self.process: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        nofile = self.nofile
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env,
            text=True, encoding="utf-8", errors="replace",
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        self._drain = threading.Thread(target=self._read_log, name="live-server-log", daemon=True)
        self._drain.start()
        if not self._listening.wait(TIMEOUT * 4):
            self.stop()
            raise RuntimeError("signal_srv did not start listening:\n" + "".join(self.lines[-30:]))
        status, body, _ = http("GET", self.base_url + "/healthz")
        if status != 200 or body.get("status") != "ok":
            self.stop()
            raise RuntimeError(f"/healthz answered {status} {body}")
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            with self._logged:
                self.lines.append(line)
                self._logged.notify_all()
            match = _LISTENING.search(line)
            if match and not self._listening.is_set():
                self.port = int(match.group(1))
                self._listening.set()

    def wait_for_log(self, pattern: str, timeout: float = TIMEOUT, since: int = 0) -> str:
        """Block until the server logs a line matching ``pattern`` (a regex) after position ``since``
        (see ``mark``); return that line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        with self._logged:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"the server never logged /{pattern}/:\n" + "".join(self.lines[-30:])
                self._logged.wait(remaining)

    def terminate(self) -> None:
        """Send SIGTERM and return at once (``wait_exited()`` waits for the exit)."""
        assert self.process is not None
        self.process.terminate()

    def wait_exited(self) -> int:
        """Wait for the process to exit by itself (a second SIGTERM could cut its last steps)."""
        assert self.process is not None
        code = self.process.wait(TIMEOUT * 4)
        if self._drain is not None:
            self._drain.join(TIMEOUT)
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would (no shutdown, no goodbye to the cluster)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def problems(self) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks the server logged so far."""
        return [line.rstrip() for line in list(self.lines)
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]

    def mark(self) -> int:
        """A position in the log, for ``problems_since``."""
        return len(self.lines)

    def problems_since(self, mark: int) -> list[str]:
        return [line.rstrip() for line in list(self.lines)[mark:]
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]

    def stop(self) -> int | None:
        """SIGTERM, then wait for the graceful shutdown (kill if it hangs); the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT * 4)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        if self._drain is not None:
            self._drain.join(TIMEOUT)
        return self.process.returncode


def http(
    method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    """One synchronous request: status, decoded JSON body (``None`` if empty or not JSON), headers."""
    if body is None and method == "POST":
        body = b""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), dict(exc.headers)
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    return status, data, got


def live_server_fixture(**options: Any) -> Any:
    """A module-scoped fixture running one server with ``options`` for all tests of the module."""

    @pytest.fixture(scope="module")
    def live_server() -> Iterator[LiveServer]:
        server = LiveServer(**options).start()
        yield server
        status = server.stop()
        assert status == 0, f"signal_srv exited with {status}:\n" + "".join(server.lines[-30:])

    return live_server


class Closed(Exception):
    """The server closed the socket (``code`` is None when it dropped TCP without a close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class SyncSocket:
    """A blocking WebSocket client (websocket-client) whose reads all have a timeout."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        self.ws = websocket.create_connection(url, timeout=timeout, enable_multithread=False)
        self.closed: Closed | None = None

    @classmethod
    def for_peer(cls, server: LiveServer, call_id: str, peer_id: str, token: str) -> SyncSocket:
        return cls(f"{server.ws_url}/apiv2/ws?call_id={call_id}&peer_id={peer_id}&token={token}")

    def send_text(self, text: str) -> None:
        self.ws.send(text, websocket.ABNF.OPCODE_TEXT)

    def send_json(self, message: Any) -> None:
        self.send_text(json.dumps(message))

    def send_bytes(self, data: bytes, opcode: int = websocket.ABNF.OPCODE_BINARY) -> None:
        self.ws.send(data, opcode)

    def recv(self) -> Any:
        """The next text frame, decoded. Raises ``Closed`` (after the closing handshake) or a timeout.

        Heartbeat pings (answered by websocket-client itself) are skipped: each call pings
        from a random phase, so one can arrive at any moment.
        """
        if self.closed is not None:
            raise self.closed
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as exc:
                self.closed = Closed(None, str(exc))
                raise self.closed from None
            if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                self.closed = Closed(code, data[2:].decode("utf-8", "replace"))
                self.ws.shutdown()
                raise self.closed
            assert opcode == websocket.ABNF.OPCODE_TEXT, f"unexpected opcode {opcode}"
            return json.loads(data)

    def wait_closed(self) -> Closed:
        """Read until the server closes; return the close (frames on the way are skipped)."""
        while True:
            try:
                self.recv()
            except Closed as closed:
                return closed

    def close(self) -> None:
        """Close from our side (closing handshake with a timeout), as a browser tab would."""
        if self.closed is None:
            try:
                self.ws.close(timeout=TIMEOUT)
            except (OSError, websocket.WebSocketException):
                pass
            self.closed = Closed(1000, "closed by the client")
        self.ws.shutdown()
