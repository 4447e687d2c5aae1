"""Fixtures for the end-to-end tests (see ``support.py``); the ``e2e`` marker is in pytest.ini."""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest

from tests.e2e.support import NetNamespace, ServerThread, e2e_config, skip_or_fail


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

