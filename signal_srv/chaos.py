"""``signal-srv-stress --chaos``: a cluster of its own, and one fault in the middle of the burst.

The tool starts ``redis-server`` (AOF on, in a temporary folder) and ``--nodes`` signal_srv
nodes on free 127.0.0.1 ports, runs the stress test against them with every socket
numbered and reconnecting (``StressOptions.reconnect``), and once every call is bursting
does one of:

- ``rolling``: stop each node in turn with SIGTERM (it hands its calls over) and start it
  again on the same port under the same ``node_id``;
- ``kill``: SIGKILL one node (its calls are taken over when its lease lapses);
- ``freeze``: SIGSTOP one node past its lease, then SIGCONT (it finds its calls moved);
- ``redis``: stop Redis and start it again from its append-only file.

Every process it starts is stopped by its pid at the end. The run passes (exit status 0)
only if every message arrived once and in order and no call ended that the tool did not end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Awaitable, Callable

from signal_srv.spawn import GENEROUS_LIMITS, Spawned, free_port, spawn, wait_ready

__all__ = ["CHAOS", "ChaosCluster"]

CHAOS = ("rolling", "kill", "freeze", "redis")
LEASE = 2.0  # node_lease of the nodes it starts: a lapse is seen within seconds
NODE_OPTIONS = ("--max_calls=100000", "--log_level=error",
                *(f"--{name}={value}" for name, value in GENEROUS_LIMITS.items()))


class ChaosCluster:
    """Redis and ``count`` nodes, started and stopped by their pids."""

    def __init__(self, count: int) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("--chaos needs redis-server (apt-get install redis-server)")
        self.folder = tempfile.mkdtemp(prefix="signal-srv-chaos-")
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.nodes: list[Spawned] = []
        self.ports = [free_port() for _ in range(count)]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self) -> ChaosCluster:
        self.start_redis()
        self.nodes = [self._node(i) for i in range(len(self.ports))]
        return self

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", self.folder,
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"],
                             capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)  # polling a child's port: there is no event to wait on

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)

    def _node(self, i: int) -> Spawned:
        argv = [sys.executable, "-m", "signal_srv", f"--port={self.ports[i]}", "--address=127.0.0.1",
                f"--redis_url=redis://127.0.0.1:{self.redis_port}/0", f"--node_id=chaos-{i}",
                f"--node_lease={LEASE}", *NODE_OPTIONS]
        node = spawn(argv, self.ports[i])
        wait_ready(node.base_url)
        return node

    def restart(self, i: int) -> None:
        """SIGTERM (its calls are handed over), wait for the exit, start it again on its port."""
        self.nodes[i].process.terminate()
        self.nodes[i].process.wait(30)
        self.nodes[i] = self._node(i)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
            node.stop()
        self.stop_redis()
        shutil.rmtree(self.folder, ignore_errors=True)

    def fault(self, chaos: str) -> Callable[[], Awaitable[None]]:
        """The ``during`` action of the stress run for ``chaos`` (one of ``CHAOS``)."""
        async def rolling() -> None:
            for i in range(len(self.nodes)):
                await asyncio.to_thread(self.restart, i)

        async def kill() -> None:
            self.nodes[-1].process.kill()

        async def freeze() -> None:
            victim = self.nodes[-1].process
            os.kill(victim.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(LEASE + 1.0)  # the fault itself: frozen past its lease
            finally:
                os.kill(victim.pid, signal.SIGCONT)

        async def redis() -> None:
            await asyncio.to_thread(self.stop_redis)
            await asyncio.to_thread(self.start_redis)

        return {"rolling": rolling, "kill": kill, "freeze": freeze, "redis": redis}[chaos]
