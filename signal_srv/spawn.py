"""Starting ``python -m signal_srv`` processes for the tools (stress, chaos, bench, hostile),
and the options that keep a server's abuse limits from throttling them.

A server is started on a free 127.0.0.1 port, from this package or from another source
tree (``server_dir``, e.g. a ``git archive`` snapshot, for before/after comparisons), and
only the options its own ``--help`` lists are passed, so that an older tree still starts.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "CUT_LIMITS",
    "GENEROUS_LIMITS",
    "Spawned",
    "free_port",
    "raise_nofile",
    "server_env",
    "server_options",
    "spawn",
    "spawn_server",
    "wait_ready",
]

# Server options the spawned server gets, when (and only when) its --help lists them:
# per-IP and per-socket rate limits must not throttle a load generator that runs on
# 127.0.0.1 by design (0: no limit).
GENEROUS_LIMITS: dict[str, str] = {
    "rate_create": "0",
    "rate_join": "0",
    "ws_rate": "0",
    "ws_bytes_rate": "0",
    "ws_reconnect_rate": "0",
    "ws_ip_rate": "0",
    "ws_ip_bytes_rate": "0",
    "ws_ip_connect_rate": "0",
    "ws_sockets_per_ip": "0",
    "auth_failure_rate": "0",
    "http_connections_per_ip": "0",
}

# And, for runs with cuts: a participant that is away gets everything it missed only if the
# server holds and keeps that many frames for it (see README, "Lossless resume").
CUT_LIMITS: dict[str, str] = {
    "ws_buffer_limit": "1024",
    "ws_buffer_bytes": str(4 * 1024 * 1024),
    "resume_buffer": "1024",
    "resume_buffer_bytes": str(4 * 1024 * 1024),
}


def raise_nofile(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (capped by the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(server_dir: str | None) -> dict[str, str] | None:
    """The environment for a server run from ``server_dir`` (e.g. a git snapshot), or None to inherit."""
    if not server_dir:
        return None
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.path.abspath(server_dir) + (os.pathsep + path if path else "")}


def server_options(server_dir: str | None = None) -> set[str]:
    """Option names (with underscores) that ``python -m signal_srv --help`` lists."""
    out = subprocess.run([sys.executable, "-m", "signal_srv", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=server_dir or None, env=server_env(server_dir)).stdout
    names = set()
    for line in out.splitlines():
        word = line.strip().split(" ")[0]
        if word.startswith("--"):
            names.add(word[2:].replace("-", "_"))
    return names


@dataclass
class Spawned:
    process: subprocess.Popen[bytes]
    base_url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(
    argv: list[str], port: int, cpu: int | None = None, server_dir: str | None = None,
    env: dict[str, str] | None = None,
) -> Spawned:
    """Start a server process (``env``: added to its environment) and wait (at most 15 s) until it listens."""
    environ = {**(server_env(server_dir) or os.environ), **(env or {})}
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=server_dir or None, env=environ)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(process.pid, {cpu})
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}: {' '.join(argv)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return Spawned(process, base_url)
        except OSError:
            time.sleep(0.05)  # polling a child's port: there is no event to wait on
    process.kill()
    raise RuntimeError(f"server did not listen on port {port} within 15 s")


def wait_ready(base_url: str, timeout: float = 15.0) -> None:
    """Until a spawned server answers ``/readyz`` with 200 (a cluster node: once it holds its lease)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(base_url + "/readyz", timeout=5).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url} did not get ready within {timeout:g} s")
        time.sleep(0.05)  # polling a child process: there is no event to wait on


def spawn_server(
    calls: int = 0, cpu: int | None = None, extra: Sequence[str] = (), server_dir: str | None = None,
    cuts: bool = False, jwt_secret: str = "",
) -> Spawned:
    """``python -m signal_srv`` on a free port, quiet, with room for ``calls`` calls.

    ``server_dir``: run the server from that source tree instead (e.g. a ``git archive``
    snapshot, for before/after comparisons). ``cuts``: also hold and keep frames generously
    for participants that are away (``CUT_LIMITS``). ``jwt_secret``: run it with
    ``auth=jwt`` and that secret (passed in its environment, never on its command line).
    """
    raise_nofile(max(4 * calls + 1024, 4096))
    known = server_options(server_dir)
    port = free_port()
    argv = [sys.executable, "-m", "signal_srv", f"--port={port}", "--address=127.0.0.1", "--log_level=warning",
            f"--max_calls={max(100000, 4 * calls)}"]
    limits = {**GENEROUS_LIMITS, **(CUT_LIMITS if cuts else {})}
    argv += [f"--{name}={value}" for name, value in limits.items() if name in known]
    env = {"SIGNAL_SRV_AUTH": "jwt", "SIGNAL_SRV_JWT_SECRET": jwt_secret} if jwt_secret else None
    return spawn(argv + list(extra), port, cpu, server_dir, env)
