"""Fixtures for the end-to-end tests (see ``support.py``) and the ``e2e`` marker."""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest

from tests.e2e.support import NetNamespace, ServerThread, e2e_config, skip_or_fail


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test with a real WebRTC stack (aiortc, Chromium)")


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """A real signal_srv on 127.0.0.1 of this machine."""
    thread = ServerThread(e2e_config())
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A private network namespace (see ``support.py``); skipped where it cannot be made."""
    for tool in ("unshare", "ip", "nsenter"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (util-linux / iproute2)")
    try:
        namespace = NetNamespace()
    except (OSError, RuntimeError) as exc:
        skip_or_fail(f"cannot create a network namespace here: {exc}")
    yield namespace
    namespace.close()


@pytest.fixture
def netns_server(netns: NetNamespace) -> Iterator[ServerThread]:
    """A real signal_srv on 127.0.0.1 inside ``netns``."""
    thread = ServerThread(e2e_config(), netns)
    thread.start()
    yield thread
    thread.stop()

