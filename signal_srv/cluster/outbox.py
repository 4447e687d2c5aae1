"""``Outbox``: the node's one ordered path of writes to Redis.

Everything a node writes about its calls goes through it, in the order it was queued:
appends to other nodes' inboxes, the calls' log entries and snapshots (fenced scripts),
and one-off work such as a compare-and-set. Appends and scripts queued while a batch is in
flight go out together in the next one, as one pipeline (one round trip per batch, however
many calls wrote). When Redis cannot be reached the batch is sent again, whole and in
order, until it can: every script is idempotent (a log entry carries its number, a
compare-and-set recognises its own result), and every inbox message carries the number
its sender gave it, so that a receiver drops one that arrives twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import secrets
import time
from collections import deque
from typing import Any, Awaitable, Callable, TypeVar

from redis.exceptions import NoScriptError

from signal_srv.cluster.link import RedisLink
from signal_srv.cluster.stats import ClusterStats
from signal_srv.errors import Unavailable

__all__ = ["Outbox"]

logger = logging.getLogger(__name__)

STREAM_MAXLEN = 100_000  # entries kept in an inbox (approximately); a reader is never that far behind
INBOX_TTL = 3600.0  # an inbox nobody reads (its node is gone) disappears after this long
OUTBOX_LIMIT = 100_000  # inbox messages held while Redis is unreachable; older ones are dropped beyond it
RETRY_PAUSE = 0.2
BATCH = 500
T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class _Append:
    key: str
    message: dict[str, Any]
    text: str = ""  # set when first sent, with the sender's number; a resend sends the same text


@dataclasses.dataclass(slots=True)
class _Script:
    name: str
    keys: list[str]
    args: list[Any]
    done: Callable[[Any], None]


@dataclasses.dataclass(slots=True)
class _Work:
    work: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


_Item = _Append | _Script | _Work


class Outbox:
    """Inbox appends and scripts, pipelined one batch at a time, and one-off work, strictly in order."""

    def __init__(self, link: RedisLink, stats: ClusterStats, sender: str) -> None:
        self.link = link
        self.stats = stats
        self.sender = f"{sender}/{secrets.token_hex(4)}"  # this process: a restart numbers afresh
        self._numbers = itertools.count(1)
        self._items: deque[_Item] = deque()
        self._appends = 0
        self._wake = asyncio.Event()
        self._expired_at: dict[str, float] = {}

    def append(self, key: str, message: dict[str, Any], first: bool = False) -> None:
        """Queue an inbox append; ``first`` puts it ahead of everything queued (used between two items)."""
        if self._appends >= OUTBOX_LIMIT:
            self._drop_oldest_append()
        item = _Append(key, message)
        if first:
            self._items.appendleft(item)
        else:
            self._items.append(item)
        self._appends += 1
        self._wake.set()

    def _drop_oldest_append(self) -> None:
        for i, item in enumerate(self._items):
            if isinstance(item, _Append):
                del self._items[i]
                self._appends -= 1
                self.stats.redis_errors += 1
                return

    def script(self, name: str, keys: list[str], args: list[Any], done: Callable[[Any], None]) -> None:
        """Queue a script for the next batch; ``done(result)`` runs once Redis has run it."""
        self._items.append(_Script(name, keys, args, done))
        self._wake.set()

    def call(self, work: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Run ``work`` after every write queued before it; its result or error comes in the future."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._items.append(_Work(work, future))
        self._wake.set()
        return future

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                head = self._items[0]
                if isinstance(head, _Work):
                    self._items.popleft()
                    await self._run_work(head)
                else:
                    await self._send_batch()

    async def _run_work(self, item: _Work) -> None:
        try:
            result = await item.work()
        except Exception as exc:  # noqa: BLE001 - handed to whoever queued the work
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            if not item.future.done():
                item.future.set_result(result)

    async def _send_batch(self) -> None:
        batch: list[_Append | _Script] = []
        while self._items and len(batch) < BATCH and not isinstance(self._items[0], _Work):
            batch.append(self._items.popleft())  # type: ignore[arg-type]
        now = time.monotonic()
        keys = {item.key for item in batch if isinstance(item, _Append)}
        expire = [key for key in keys if now - self._expired_at.get(key, -INBOX_TTL) > INBOX_TTL / 4]
        for item in batch:
            if isinstance(item, _Append) and not item.text:
                item.text = json.dumps({**item.message, "o": self.sender, "i": next(self._numbers)},
                                       separators=(",", ":"))
        try:
            results = await self.link.run(lambda client: self._pipeline(client, batch, expire))
            if any(isinstance(r, NoScriptError) for r in results):
                await self.link.load_scripts()  # Redis restarted and forgot them: load, then send it all again
                results = await self.link.run(lambda client: self._pipeline(client, batch, expire))
        except Unavailable:
            self._items.extendleft(reversed(batch))
            await asyncio.sleep(RETRY_PAUSE)
            return
        for key in expire:
            self._expired_at[key] = now
        self._appends -= sum(isinstance(item, _Append) for item in batch)
        for item, result in zip(batch, results):
            if isinstance(item, _Script):
                if isinstance(result, Exception):
                    logger.error("Redis refused the %s script: %s", item.name, result)
                item.done(result)

    async def _pipeline(self, client: Any, batch: list[_Append | _Script], expire: list[str]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for item in batch:
            if isinstance(item, _Append):
                pipe.xadd(item.key, {"m": item.text}, maxlen=STREAM_MAXLEN, approximate=True)
            else:
                # execute_command: a Redis Cluster pipeline blocks its evalsha() method, but routes
                # EVALSHA by its keys like any other command.
                pipe.execute_command("EVALSHA", self.link.scripts[item.name].sha, len(item.keys), *item.keys,
                                     *item.args)
        for key in expire:
            pipe.pexpire(key, int(INBOX_TTL * 1000))
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results
