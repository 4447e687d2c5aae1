"""Real ``redis-server`` and ``nginx`` processes for cluster tests, on free ports in temporary folders.

Each process runs in its own session and is stopped by its pid (SIGTERM, then SIGKILL);
readiness is read from the process's own output, never guessed with a sleep. Tests that
need them are skipped when the Debian packages are missing, except under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterable

import pytest

from tests.conftest import TIMEOUT

__all__ = ["Nginx", "RedisMonitor", "RedisServer", "free_port", "needs", "redis_cluster"]

ROOT = Path(__file__).resolve().parent.parent


def needs(*programs: str) -> Any:
    """Skip (fail under CI) when a program the test starts is not installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing and os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs {missing}: .ci/run installs them")
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (apt-get install)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P below 55536 whose cluster bus port P + 10000 is free too."""
    for _ in range(100):
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class _Process:
    """A child process whose output is read by a thread, so a test can wait for a line."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._new_line = threading.Condition()

    def _spawn(self, args: list[str], ready: str) -> None:
        self.lines = []
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        with self._new_line:
            if not self._new_line.wait_for(lambda: any(ready in line for line in self.lines), TIMEOUT * 2):
                self.stop()
                raise RuntimeError(f"{args[0]} did not start:\n" + "".join(self.lines[-20:]))

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within the timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)


class RedisServer(_Process):
    """``redis-server`` on a free port with its data in ``folder`` (AOF on request, cluster on request)."""

    def __init__(self, folder: Path, *, appendonly: bool = False, cluster: bool = False, port: int = 0) -> None:
        super().__init__()
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.folder = folder / str(self.port)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                     "--save", "", "--protected-mode", "no",
                     "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
        if cluster:
            self.args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.folder / "nodes.conf")]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._spawn(self.args, "Ready to accept connections")
        return self

    def cli(self, *args: str) -> str:
        """Run ``redis-cli`` against this server; its output."""
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=TIMEOUT)
        return done.stdout.strip()


class RedisMonitor(_Process):
    """``redis-cli monitor``: every command a Redis server runs, one line each, in ``lines``."""

    def __init__(self, redis: RedisServer) -> None:
        super().__init__()
        self.redis = redis

    def start(self) -> RedisMonitor:
        self._spawn(["redis-cli", "-p", str(self.redis.port), "monitor"], "OK")
        return self

    def seen_until(self, marker: str) -> str:
        """Everything monitored up to a command that echoes ``marker``, sent now."""
        self.redis.cli("ECHO", marker)
        with self._new_line:
            if not self._new_line.wait_for(lambda: any(marker in line for line in self.lines), TIMEOUT):
                raise AssertionError(f"redis-cli monitor never showed {marker!r}")
            return "".join(self.lines)


def redis_cluster(folder: Path, masters: int = 3) -> list[RedisServer]:
    """A local Redis Cluster of ``masters`` masters and no replicas, all slots assigned."""
    servers = [RedisServer(folder, cluster=True).start() for _ in range(masters)]
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=TIMEOUT * 4,
    )
    for server in servers:
        with server._new_line:
            server._new_line.wait_for(lambda s=server: any("Cluster state changed: ok" in line for line in s.lines),
                                      TIMEOUT * 2)
    return servers


class Nginx(_Process):
    """nginx without root, with ``conf/nginx-cluster.conf``'s routing in front of ``upstreams``."""

    def __init__(self, folder: Path, upstreams: Iterable[int]) -> None:
        super().__init__()
        self.port = free_port()
        self.folder = folder / f"nginx-{self.port}"
        self.folder.mkdir(parents=True)
        servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in upstreams)
        routing = (ROOT / "conf" / "nginx-cluster.conf").read_text()
        routing = routing.replace("    server 127.0.0.1:8081;\n    server 127.0.0.1:8082;\n    server 127.0.0.1:8083;\n",
                                  servers)
        routing = routing.replace("listen 443 ssl;", f"listen 127.0.0.1:{self.port};")
        routing = "\n".join(line for line in routing.splitlines() if not line.strip().startswith(("ssl_", "http2")))
        routing = routing.replace("/var/log/nginx/", f"{self.folder}/")
        temp = "".join(f"    {kind}_temp_path {self.folder}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.folder / "nginx.conf").write_text(
            f"pid {self.folder}/nginx.pid;\nerror_log stderr notice;\nworker_processes 1;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n{temp}{routing}\n}}\n")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        conf = ["-p", str(self.folder), "-c", str(self.folder / "nginx.conf")]
        subprocess.run(["nginx", "-t", *conf], check=True, capture_output=True, timeout=TIMEOUT)
        self._spawn(["nginx", *conf, "-g", "daemon off;"], "start worker process")
        return self
