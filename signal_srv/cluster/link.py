"""``RedisLink``: the node's connections to Redis (or a Redis Cluster), and whether it answers.

Connecting never blocks start-up: until Redis first answers, and whenever a command fails
for lack of a connection, the link is ``reachable = False`` and ``run`` raises
``Unavailable``, which the edges turn into ``503 unavailable``. Every command's round trip
and every failure is counted for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from signal_srv.cluster.stats import ClusterStats
from signal_srv.errors import Unavailable

__all__ = ["RedisLink", "SCRIPTS"]

logger = logging.getLogger(__name__)

SCRIPTS = ("claim", "fenced", "index_put", "index_drop", "listing", "heartbeat", "live", "append", "snapshot",
           "take")
RECONNECT_INTERVAL = 0.5
POOL_SIZE = 64
T = TypeVar("T")

Client = Redis | RedisCluster


class RedisLink:
    """Two clients: one for commands, one for the blocking inbox read (which holds its connection)."""

    def __init__(self, url: str, timeout: float, stats: ClusterStats, block_ms: int) -> None:
        self.url = url
        self.timeout = timeout
        self.stats = stats
        self.block_ms = block_ms
        self.client: Client | None = None
        self.blocking: Client | None = None
        self.scripts: dict[str, AsyncScript] = {}
        self.reachable = False
        self.back_since = -math.inf  # monotonic: when Redis answered again after its last outage
        self.last_outage = 0.0  # how long that outage lasted (seconds)
        self._down_since = 0.0
        self.cluster = False
        self.connected = asyncio.Event()
        self._slots = asyncio.Semaphore(POOL_SIZE)  # commands in flight (the blocking inbox read has its own client)
        self._connector: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._connector = asyncio.ensure_future(self._connect_until_done())

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
        for client in (self.client, self.blocking):
            if client is not None:
                await client.aclose()

    async def _connect_until_done(self) -> None:
        warned = False
        while True:
            try:
                await self._connect()
                return
            except (RedisError, OSError) as exc:
                if not warned:
                    logger.warning("Redis at %s is unreachable (%s); retrying every %.1f s",
                                   _shown(self.url), type(exc).__name__, RECONNECT_INTERVAL)
                    warned = True
                self.stats.redis_errors += 1
            await asyncio.sleep(RECONNECT_INTERVAL)

    async def _connect(self) -> None:
        probe = Redis.from_url(self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        try:
            info = await probe.info("cluster")
        finally:
            await probe.aclose()
        self.cluster = bool(info.get("cluster_enabled"))
        self.client = self._client(self.timeout)
        self.blocking = self._client(self.timeout + self.block_ms / 1000)
        folder = resources.files("signal_srv.cluster") / "lua"
        self.scripts = {n: self.client.register_script((folder / f"{n}.lua").read_text()) for n in SCRIPTS}
        await self.client.ping()
        self.reachable = True
        self.connected.set()
        logger.info("connected to %s at %s", "a Redis Cluster" if self.cluster else "Redis", _shown(self.url))

    def _client(self, socket_timeout: float) -> Client:
        # A short retry hides the first command's ConnectionError on a pooled connection
        # after Redis restarts; a real outage still fails well within ask_timeout.
        options: dict[str, Any] = dict(
            decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=self.timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        )
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        # A burst of requests waits for a pooled connection instead of failing at the pool's size.
        pool = BlockingConnectionPool.from_url(self.url, max_connections=POOL_SIZE, timeout=self.timeout,
                                               retry_on_error=[RedisConnectionError, RedisTimeoutError], **options)
        return Redis(connection_pool=pool)

    async def run(self, command: Callable[[Client], Awaitable[T]]) -> T:
        """Run one command (or pipeline) against the command client, timed and counted.

        Raises ``Unavailable`` when Redis cannot be reached or does not answer in time.
        """
        client = self.client
        if client is None:
            raise Unavailable()
        # A burst of commands (thousands of sockets reconnecting at once) waits for a connection
        # here: that wait is this node's queue, not Redis failing to answer, so it is not timed.
        async with self._slots:
            started = time.perf_counter()
            try:
                result = await asyncio.wait_for(command(client), self.timeout)
            except (RedisError, OSError, TimeoutError) as exc:
                self.failed(exc)
                raise Unavailable() from None
        self.stats.redis_seconds.observe(time.perf_counter() - started)
        self.succeeded()
        return result

    async def load_scripts(self) -> None:
        """Load every script into Redis again (after a restart, Redis knows none of them)."""
        async def load(client: Client) -> None:
            for script in self.scripts.values():
                script.sha = await client.script_load(script.script)

        await self.run(load)

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.run(lambda client: self.scripts[name](keys=keys, args=args, client=client))

    def failed(self, exc: BaseException) -> None:
        self.stats.redis_errors += 1
        if self.reachable:
            logger.warning("lost Redis: %s", type(exc).__name__)
            self._down_since = time.monotonic()
        self.reachable = False

    def succeeded(self) -> None:
        if not self.reachable and self.connected.is_set():
            logger.info("Redis answers again")
            self.back_since = time.monotonic()
            self.last_outage = self.back_since - self._down_since
        self.reachable = True


def _shown(url: str) -> str:
    """The URL without its password, for log lines."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
