"""Fixtures: a real signal_srv app on a free port per test, a client, and the log guard."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from typing import Any, Iterator

import pytest
from hypothesis import settings
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.web import Application

from signal_srv.app import make_app, make_registry
from signal_srv.client import SignalingClient
from signal_srv.config import Config
from signal_srv.registry import Registry
from signal_srv.server import make_server

# The abuse limits a test's own bounded load could trip; tests about a limit turn it back on.
LIMITS_OFF: dict[str, Any] = {
    "rate_create": 0.0, "rate_join": 0.0, "ws_rate": 0.0, "ws_bytes_rate": 0.0, "ws_reconnect_rate": 0.0,
    "ws_ip_rate": 0.0, "ws_ip_bytes_rate": 0.0, "ws_ip_connect_rate": 0.0, "ws_sockets_per_ip": 0,
    "auth_failure_rate": 0.0, "http_connections_per_ip": 0,
}

# One timeout for every wait in the tests; scale it on slow machines.
TIMEOUT = 5.0 * float(os.environ.get("SIGNAL_SRV_TEST_TIMEOUT_SCALE", "1"))

# Hypothesis: under CI=true the same examples on every run (derandomized, no example
# database), so what the suite catches it catches every time, and a failure prints the blob
# that replays it; elsewhere fresh random examples, which may find something new. Tests that
# set no max_examples (test_model.py) take it from here: enough in CI to catch every seeded
# bug of the call rules the model can see, fewer on a developer's machine.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, max_examples=50)
settings.register_profile("dev", database=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")

# The event loop every test runs on, in-process and in the server processes the tests start:
# asyncio's, or uvloop's with SIGNAL_SRV_TEST_LOOP=uvloop (.ci/run runs the suite on both).
TEST_LOOP = os.environ.get("SIGNAL_SRV_TEST_LOOP", "asyncio")
if TEST_LOOP == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
elif TEST_LOOP != "asyncio":
    raise RuntimeError(f"SIGNAL_SRV_TEST_LOOP={TEST_LOOP!r}: expected asyncio or uvloop")


def server_environ(**extra: str) -> dict[str, str]:
    """The environment for a server process a test starts: this one's, without the test
    settings (``SIGNAL_SRV_TEST_*`` name no server option, and the server would warn about them)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_SRV_TEST_")}, **extra}


@pytest.fixture
def config(request: pytest.FixtureRequest) -> Config:
    """Test defaults (abuse limits off), overridden with ``@pytest.mark.settings(...)``."""
    options: dict[str, Any] = {"port": 0, **LIMITS_OFF}
    for marker in reversed(list(request.node.iter_markers("settings"))):
        options.update(marker.kwargs)
    return dataclasses.replace(Config(), **options)


@pytest.fixture
def registry(config: Config, io_loop: IOLoop) -> Iterator[Registry]:
    registry = make_registry(config)
    yield registry
    io_loop.run_sync(registry.close, timeout=TIMEOUT)


@pytest.fixture
def app(config: Config, registry: Registry) -> Iterator[Application]:
    application = make_app(config, registry)
    yield application
    if application.settings["auth"] is not None:
        application.settings["auth"].close()


@pytest.fixture
def http_server(app: Application, config: Config, io_loop: IOLoop, http_server_port: tuple[Any, int]) -> Iterator[HTTPServer]:
    """The app behind the same HTTP server settings as production (replaces the plugin's)."""
    server = make_server(app, config)
    server.add_socket(http_server_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=TIMEOUT)


@pytest.fixture
def base_url(http_server: Any, http_server_port: tuple[Any, int]) -> str:
    return f"http://127.0.0.1:{http_server_port[1]}"


@pytest.fixture
def port(http_server: Any, http_server_port: tuple[Any, int]) -> int:
    """The test server's port, for raw sockets."""
    return http_server_port[1]


@pytest.fixture
def client(base_url: str) -> SignalingClient:
    return SignalingClient(base_url, timeout=TIMEOUT)


class LogGuard(logging.Handler):
    """Collects WARNING and above; the test fails on any record it did not ``expect``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.expected: list[tuple[str, re.Pattern[str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def expect(self, logger: str, pattern: str) -> None:
        """Declare that a WARNING+ record from ``logger`` matching ``pattern`` may appear."""
        self.expected.append((logger, re.compile(pattern)))

    def unexpected(self) -> list[str]:
        return [
            f"{r.levelname} {r.name}: {r.getMessage()}"
            for r in self.records
            if not any(r.name.startswith(name) and p.search(r.getMessage()) for name, p in self.expected)
        ]


@pytest.fixture(autouse=True)
def log_guard() -> Iterator[LogGuard]:
    guard = LogGuard()
    root = logging.getLogger()
    root.addHandler(guard)
    yield guard
    root.removeHandler(guard)
    unexpected = guard.unexpected()
    assert not unexpected, f"unexpected log records: {unexpected}"


@pytest.fixture
def debug_logs() -> Iterator[list[str]]:
    """Every log line at every level, formatted as the server would print it."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s %(call_id)s", defaults={"call_id": ""}))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.setLevel(old_level)
    root.removeHandler(handler)
