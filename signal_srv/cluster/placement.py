"""``ClusterPlacement``: the Redis implementation of the ``Placement`` seam.

A call is owned by the node that created it, recorded in Redis with an epoch. The node
keeps a lease (renewed every third of ``node_lease``); other nodes reach its calls through
the bridge while the lease holds, and stop listing or finding them once it lapses. Every
write about an owned call is fenced by its epoch: a refusal means another node owns the
call now, and this node lets go of it and closes its sockets so that they reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from signal_srv.actor import CallActor, CallSummary
from signal_srv.call import Status
from signal_srv.cluster.bridge import SERVICE_RESTART, Bridge, Outbox, RemoteCall
from signal_srv.cluster.directory import Directory
from signal_srv.cluster.link import RedisLink
from signal_srv.cluster.stats import ClusterStats
from signal_srv.config import Config
from signal_srv.errors import CallNotFound, Unavailable
from signal_srv.metrics import Metrics
from signal_srv.placement import CallRef

if TYPE_CHECKING:
    from signal_srv.registry import Registry

__all__ = ["ClusterPlacement"]

logger = logging.getLogger(__name__)

KEY_TTL = 900.0  # a call's ownership record outlives a dead owner by at most this long
BLOCK_MS = 1000  # longest wait of one inbox read; bounds how long a dead connection goes unnoticed
FORGET_NODES_AFTER = 10  # leases: a node gone this long is dropped, and its calls from the index
CLOSE_TIMEOUT = 2.0
MOVED_KEPT = 10_000  # handed-over calls remembered, to pass late messages on to their new owner


class ClusterPlacement:
    """Calls owned here are published in Redis; calls owned elsewhere are reached through the bridge."""

    def __init__(self, config: Config, node_id: str, metrics: Metrics) -> None:
        self.node_id = node_id
        self.lease = config.node_lease
        self.registry: Registry | None = None
        self._epochs: dict[str, int] = {}  # calls owned here -> their epoch
        self._moved: dict[str, str] = {}  # calls handed over -> their new owner (most recent MOVED_KEPT)
        self.stats = ClusterStats(metrics, owned=lambda: len(self._epochs))
        self.link = RedisLink(config.redis_url, min(config.ask_timeout / 2, 2.0), self.stats, BLOCK_MS)
        self.directory = Directory(self.link, node_id, KEY_TTL, config.node_lease)
        self.outbox = Outbox(self.link, self.stats)
        self.bridge = Bridge(node_id, self.link, self.outbox, self.stats,
                             config.heartbeat_interval, config.heartbeat_timeout)
        self._dirty: dict[str, CallActor] = {}
        self._stale: set[str] = set()  # owned calls whose index entry could not be written
        self._live: set[str] = set()
        self._leased = False
        self._cursor = "0"
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, registry: Registry) -> None:
        self.registry = registry
        self.bridge.registry = registry
        self.bridge.hand_over = self._hand_over
        self.bridge.adopt = self._adopt
        self.bridge.moved_to = self._moved.get

    async def start(self) -> None:
        self.link.start()
        loops = (self.outbox.run(), self.bridge.read_inbox(), self.bridge.heartbeat(), self._keep_lease(),
                 self._keep_keys())
        self._tasks = [asyncio.ensure_future(loop) for loop in loops]

    async def close(self) -> None:
        """After the registry ended its calls: flush what they wrote, give up the lease, disconnect."""
        if self._tasks:
            try:
                await asyncio.wait_for(self.outbox.call(self._resign), CLOSE_TIMEOUT)
            except (TimeoutError, Unavailable):
                logger.warning("could not reach Redis to leave the cluster cleanly")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.close()

    async def _resign(self) -> None:
        await self.directory.resign()

    def ready(self) -> bool:
        return self.link.reachable and self._leased

    def health(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "redis": "ok" if self.link.reachable else "unreachable"}

    # Calls owned here ----------------------------------------------------------------------

    async def claim(self, call_id: str) -> None:
        if not self.ready():
            raise Unavailable()
        if not await self.directory.claim(call_id):
            raise Unavailable("a call id collided; try again")
        self._epochs[call_id] = 1

    def changed(self, actor: CallActor) -> None:
        if actor.call_id not in self._epochs:
            return
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._publish_dirty)
        self._dirty[actor.call_id] = actor

    async def flush(self) -> None:
        self._publish_dirty()
        await self.outbox.call(_nothing)

    def _publish_dirty(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for actor in dirty.values():
            epoch = self._epochs.get(actor.call_id)
            if epoch is not None and actor.alive:
                self._queue(self._publish(actor, actor.summary(peers=True), epoch))

    async def _publish(self, actor: CallActor, summary: CallSummary, epoch: int) -> None:
        try:
            held = await self.directory.fenced(actor.call_id, epoch, "touch") and await self.directory.publish(
                summary, epoch)
        except Unavailable:
            self._stale.add(actor.call_id)
            return
        self._stale.discard(actor.call_id)
        if not held:
            self._lost(actor)

    def released(self, actor: CallActor) -> None:
        epoch = self._epochs.pop(actor.call_id, None)
        self._stale.discard(actor.call_id)
        if epoch is not None:
            self._queue(self._unpublish(actor.call_id, epoch))

    async def _unpublish(self, call_id: str, epoch: int) -> None:
        try:
            await self.directory.unpublish(call_id, epoch)
            await self.directory.fenced(call_id, epoch, "delete")
        except Unavailable:
            pass  # the entry goes with the lease, the record with its TTL

    def _queue(self, work: Awaitable[None]) -> None:
        self.outbox.call(lambda: work).add_done_callback(_report)

    def _lost(self, actor: CallActor) -> None:
        """Another node took the call: change nothing more, and send its sockets there."""
        if self._epochs.pop(actor.call_id, None) is None or self.registry is None:
            return
        self.stats.lost_calls += 1
        actor.log.warning("call %s is owned by another node now; closing its sockets here", actor.call_id)
        self.registry.release(actor, SERVICE_RESTART, "call moved")

    # Moving a call to where its traffic lands -------------------------------------------------

    def _hand_over(self, actor: CallActor, node: str, done: Callable[[dict[str, Any], int], None]) -> bool:
        """Give an idle call to ``node`` by a compare-and-set of its epoch; False if it is not idle.

        ``done(data, new epoch)`` runs in the outbox right after the compare-and-set (epoch 0: it failed).
        """
        assert self.registry is not None
        epoch = self._epochs.get(actor.call_id)
        if epoch is None or not self.ready():
            return False
        data = self.registry.hand_over(actor.call_id)
        if data is None:
            return False
        del self._epochs[actor.call_id]
        self._moved[actor.call_id] = node
        while len(self._moved) > MOVED_KEPT:
            del self._moved[next(iter(self._moved))]

        async def move() -> None:
            try:
                new_epoch = await self.directory.fenced(actor.call_id, epoch, "move", node)
            except Unavailable:
                new_epoch = 0
            done(data, new_epoch)

        self._queue(move())
        return True

    def _adopt(self, data: dict[str, Any], epoch: int) -> CallActor:
        assert self.registry is not None
        self._epochs[data["call_id"]] = epoch
        self._moved.pop(data["call_id"], None)
        return self.registry.adopt(data)

    # Calls owned elsewhere -------------------------------------------------------------------

    async def locate(self, call_id: str) -> CallRef:
        # Both at once: the owner's lease is read now, not from the last heartbeat, so a
        # request never waits ask_timeout for a node that is gone.
        if call_id in self._moved:
            return RemoteCall(self.bridge, call_id, self._moved[call_id])
        owner, live = await asyncio.gather(self.directory.owner(call_id), self.directory.live_nodes())
        if owner is not None and owner[0] == self.node_id:
            # Moved here while we looked, or on its way (between the epoch move and its adoption).
            assert self.registry is not None
            arrived = self.registry.local(call_id) or await self.bridge.arriving(call_id)
            if arrived is not None and arrived.alive:
                return arrived
        if owner is None or owner[0] == self.node_id or owner[0] not in live:
            raise CallNotFound()
        return RemoteCall(self.bridge, call_id, owner[0])

    async def listing(self, status: Status | None, limit: int, peers: bool = False) -> list[CallSummary]:
        return await self.directory.listing(status, limit, peers)

    # Background loops ------------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        await self.link.connected.wait()
        while True:
            try:
                if not self.bridge.inbox_ready.is_set():
                    await self.bridge.reset_inbox()
                await self._beat()
            except Unavailable:
                self._leased = False
            await asyncio.sleep(self.lease / 3)

    async def _beat(self) -> None:
        self._cursor, live = await self.directory.heartbeat(self._cursor, self.lease * FORGET_NODES_AFTER)
        gone = self._live - live
        self._live = live
        if not self._leased:
            logger.info("node %s holds its lease (%.1f s) in the cluster", self.node_id, self.lease)
        self._leased = True
        if gone:
            logger.info("nodes gone (lease lapsed): %s", ", ".join(sorted(gone)))
            self.bridge.nodes_gone(live)

    async def _keep_keys(self) -> None:
        """Renew the ownership records of our calls (fenced: a refusal means we lost one); retry stale entries."""
        await self.link.connected.wait()
        while True:
            await asyncio.sleep(min(KEY_TTL / 3, 5.0 if self._stale else KEY_TTL / 3))
            assert self.registry is not None
            for call_id in list(self._epochs):
                actor = self.registry.local(call_id)
                if actor is not None:
                    self._refresh(actor, call_id in self._stale)
                    await asyncio.sleep(0)

    def _refresh(self, actor: CallActor, republish: bool) -> None:
        epoch = self._epochs[actor.call_id]
        if republish:
            self._queue(self._publish(actor, actor.summary(peers=True), epoch))
        else:
            self._queue(self._touch(actor, epoch))

    async def _touch(self, actor: CallActor, epoch: int) -> None:
        try:
            held = await self.directory.fenced(actor.call_id, epoch, "touch")
        except Unavailable:
            return
        if not held:
            self._lost(actor)


async def _nothing() -> None:
    pass


def _report(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.error("a cluster write failed", exc_info=done.exception())
