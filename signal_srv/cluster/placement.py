"""``ClusterPlacement``: the Redis implementation of the ``Placement`` seam.

A call is owned by one node, recorded in Redis with an epoch; the owner logs everything
its calls decide before a client sees it (``Journal``, write-ahead). Each node keeps a
lease (renewed every third of ``node_lease``); other nodes reach its calls through the
bridge while the lease holds. When a lease lapses, or the node resigns it on a graceful
stop, the surviving nodes take its calls over: each at once when a request or a socket
for it arrives, and all of them as soon as the lapse is seen (the node the call hashes
to among the live ones takes it; another one if that one has not within a few beats).
Taking over is a compare-and-set of the epoch that also reads the call's snapshot and
log, which replay into exactly the call its owner had. Every write about an owned call is
fenced by its epoch: a refusal means another node owns the call now, and this node lets
go of it, changes nothing, and closes its sockets so that they reconnect.

A node is one process here (``member``: its ``node_id`` and a random suffix), so that
a node restarted under the same ``node_id`` is not mistaken for the one that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from signal_srv.actor import CallActor, CallSummary
from signal_srv.call import Status
from signal_srv.cluster.bridge import SERVICE_RESTART, Bridge, RemoteCall
from signal_srv.cluster.directory import Command, Directory, Heartbeat, Owner
from signal_srv.cluster.link import RedisLink
from signal_srv.cluster.log import Journal, replay
from signal_srv.cluster.outbox import Outbox
from signal_srv.cluster.stats import ClusterStats
from signal_srv.config import Config
from signal_srv.errors import CallMoved, CallNotFound, Unavailable
from signal_srv.metrics import Metrics
from signal_srv.placement import CallRef

if TYPE_CHECKING:
    from signal_srv.registry import Registry

__all__ = ["ClusterPlacement"]

logger = logging.getLogger(__name__)

KEY_TTL = 900.0  # a call's records outlive a node that owns it by at most this long
BLOCK_MS = 1000  # longest wait of one inbox read; bounds how long a dead connection goes unnoticed
FORGET_NODES_AFTER = 10  # leases: a node gone this long (and owning no call) is forgotten
CLOSE_TIMEOUT = 2.0
MOVED_KEPT = 10_000  # handed-over calls remembered, to pass late messages on to their new owner
TAKEOVERS_AT_ONCE = 32  # takeovers of a lapsed node's calls in flight at a time
SECOND_CHANCE_BEATS = 3  # beats a lapsed node's call waits for the node it hashes to, before any takes it
WATCH_MARGIN = 0.05  # seconds after a peer's lease end at which its lapse is checked


class ClusterPlacement:
    """Calls owned here are logged and published in Redis; calls owned elsewhere are reached or taken over."""

    keeps_calls = True

    def __init__(self, config: Config, node_id: str, metrics: Metrics) -> None:
        self.node_id = node_id
        self.member = f"{node_id}/{secrets.token_hex(4)}"
        self.lease = config.node_lease
        self.registry: Registry | None = None
        self._epochs: dict[str, int] = {}  # calls owned here -> their epoch
        self._moved: dict[str, str] = {}  # calls handed over -> their new owner (most recent MOVED_KEPT)
        self._ended: dict[str, None] = {}  # calls that ended here (most recent MOVED_KEPT)
        self.stats = ClusterStats(metrics, owned=lambda: len(self._epochs))
        self.link = RedisLink(config.redis_url, min(config.ask_timeout / 2, 2.0), self.stats, BLOCK_MS)
        self.directory = Directory(self.link, self.member, KEY_TTL, config.node_lease)
        self.outbox = Outbox(self.link, self.stats, self.member)
        self.journal = Journal(self.outbox, self.member, KEY_TTL, 4 * config.resume_buffer_bytes, self._refused)
        self.stats.journal = self.journal
        self.bridge = Bridge(self.member, self.link, self.outbox, self.stats,
                             config.heartbeat_interval, config.heartbeat_timeout)
        self._dirty: dict[str, CallActor] = {}
        self._live: set[str] = set()
        self._lease_ends: dict[str, float] = {}  # live nodes as of the last beat -> when their lease ends (monotonic)
        self._wake_lease = asyncio.Event()  # beat now (a node said it leaves)
        self._leased = False
        self._leaving = False
        self._cursor = "0"
        self._taking: dict[str, asyncio.Future[CallActor]] = {}
        self._orphan_beats: dict[str, int] = {}  # lapsed nodes' calls seen, and in how many beats
        self._adopting: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, registry: Registry) -> None:
        self.registry = registry
        self.bridge.registry = registry
        self.bridge.hand_over = self._hand_over
        self.bridge.adopt = self._adopt
        self.bridge.moved_to = self._moved.get
        self.bridge.ended_here = self._ended.__contains__
        self.bridge.owner_doubtful = self._doubt

    async def start(self) -> None:
        self.link.start()
        self._lease_task = asyncio.ensure_future(self._keep_lease())
        loops = (self.outbox.run(), self.bridge.read_inbox(), self.bridge.heartbeat(), self._keep_keys())
        self._tasks = [self._lease_task, *(asyncio.ensure_future(loop) for loop in loops)]

    async def close(self) -> None:
        """After the registry stopped its calls: flush what they wrote, give up the lease, disconnect."""
        if self._tasks:
            try:
                await asyncio.wait_for(self.outbox.call(self._resign), CLOSE_TIMEOUT)
            except (TimeoutError, Unavailable):
                logger.warning("could not reach Redis to leave the cluster cleanly")
        for task in self._tasks:
            task.cancel()
        if self._adopting is not None:
            self._adopting.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.close()

    async def _resign(self) -> None:
        await self.directory.resign()

    def ready(self) -> bool:
        return self.link.reachable and self._leased and not self._leaving

    def health(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "redis": "ok" if self.link.reachable else "unreachable"}

    # Calls owned here ----------------------------------------------------------------------

    async def claim(self, call_id: str) -> None:
        if not self.ready():
            raise Unavailable()
        if not await self.directory.claim(call_id):
            raise Unavailable("a call id collided; try again")
        self._epochs[call_id] = 1

    def begin(self, actor: CallActor) -> None:
        self.journal.begin(actor, self._epochs[actor.call_id])

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
                self._write(self.directory.fenced(actor.call_id, epoch, "touch"), self._held(actor, epoch))
                self._write(self.directory.publish(actor.summary(peers=True), epoch))

    def released(self, actor: CallActor) -> None:
        epoch = self._epochs.pop(actor.call_id, None)
        self.journal.forget(actor.call_id)
        _remember(self._ended, actor.call_id, None)
        if epoch is not None:
            self._unpublish(actor.call_id, epoch)

    def _unpublish(self, call_id: str, epoch: int) -> None:
        self._write(self.directory.unpublish(call_id, epoch))
        self._write(self.directory.fenced(call_id, epoch, "delete"))

    def _write(self, command: Command, done: Callable[[Any], None] = lambda result: None) -> None:
        """Queue a script in the node's ordered pipeline, after everything its calls logged so far."""
        self.journal.flush()
        self.outbox.script(*command, done)

    def _held(self, actor: CallActor, epoch: int) -> Callable[[Any], None]:
        """What to do with a fenced write's result: a refusal means another node owns the call now."""
        def check(result: Any) -> None:
            if result != 1 and self._epochs.get(actor.call_id) == epoch:
                self._lost(actor)
        return check

    def _refused(self, call_id: str) -> None:
        """The journal's write for a call was refused: another node took it."""
        actor = self.registry.local(call_id) if self.registry is not None else None
        if actor is not None:
            self._lost(actor)

    def _lost(self, actor: CallActor) -> None:
        """Another node owns the call now: change nothing more, and send its sockets there."""
        if self._epochs.pop(actor.call_id, None) is None or self.registry is None:
            return
        self.journal.forget(actor.call_id)
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
        data = self.registry.hand_over(actor.call_id, settled=self.journal.idle(actor.call_id))
        if data is None:
            return False
        data["n"] = self.journal.last_entry(actor.call_id)
        del self._epochs[actor.call_id]
        self.journal.forget(actor.call_id)
        _remember(self._moved, actor.call_id, node)

        def moved(result: Any) -> None:
            new_epoch = result if isinstance(result, int) else 0
            if not new_epoch and self._moved.get(actor.call_id) == node:
                del self._moved[actor.call_id]  # refused: another node owns the call; it is looked up afresh
            done(data, new_epoch)

        self._write(self.directory.fenced(actor.call_id, epoch, "move", node), moved)
        return True

    def _adopt(self, data: dict[str, Any], epoch: int) -> CallActor:
        assert self.registry is not None
        self._epochs[data["call_id"]] = epoch
        self._moved.pop(data["call_id"], None)
        actor = self.registry.adopt(data)
        self.journal.begin(actor, epoch, data["n"])
        if self._leaving:  # it moved here as this node stops: it goes on elsewhere, as the others do
            asyncio.ensure_future(actor.restart())
        return actor

    # Calls owned elsewhere -------------------------------------------------------------------

    async def locate(self, call_id: str) -> CallRef:
        try:
            return await self._locate(call_id)
        except CallMoved:  # another node took the call over as this one tried to: it lives there now
            return await self._locate(call_id)

    async def _locate(self, call_id: str) -> CallRef:
        if call_id in self._taking:
            return await asyncio.shield(self._taking[call_id])
        moved_to = self._moved.get(call_id)
        if moved_to is not None and self._holds_lease(moved_to):
            return RemoteCall(self.bridge, call_id, moved_to)  # handed over from here (Redis may not say so yet)
        owner = await self.directory.owner(call_id)
        if owner is None:
            raise CallNotFound()
        if owner[0] != self.member and self._holds_lease(owner[0]):
            return RemoteCall(self.bridge, call_id, owner[0])  # (if it died since the last beat, see nodes_gone)
        # Not live as of the last beat: read the leases now, before taking the call over.
        live = await self.directory.live_nodes()
        if owner[0] == self.member:
            # Moved here while we looked, or on its way (between the epoch move and its adoption).
            assert self.registry is not None
            arrived = self.registry.local(call_id) or await self.bridge.arriving(call_id)
            if arrived is not None and arrived.alive:
                return arrived
            moved_to = self._moved.get(call_id)
            if moved_to is not None:  # handed over from here, its epoch move still on its way to Redis
                return RemoteCall(self.bridge, call_id, moved_to)
        elif owner[0] in live:
            return RemoteCall(self.bridge, call_id, owner[0])
        return await self._take_over(call_id, owner)

    def _doubt(self, node: str) -> None:
        """``node`` let a call go or is leaving: read its lease afresh, and beat soon to see it lapse."""
        if self._lease_ends.pop(node, None) is not None:
            self._wake_lease.set()

    def _holds_lease(self, node: str) -> bool:
        """Live as of the last beat, and its lease has not run out since."""
        return self._lease_ends.get(node, -math.inf) > time.monotonic()

    def _may_take_over(self) -> bool:
        """Not for a lease after Redis came back from an outage long enough for leases to lapse
        meanwhile (a third of one: nodes renew every third): their nodes are about to renew them."""
        link = self.link
        held_off = link.last_outage >= self.lease / 3 and time.monotonic() - link.back_since < self.lease
        return self.ready() and not held_off

    async def _take_over(self, call_id: str, owner: Owner) -> CallActor:
        """Carry on a call whose owner's lease lapsed, from its snapshot and log. Raises ``CallNotFound``
        (no such call, or it had ended), ``Unavailable`` (not now), or returns where it lives now."""
        if call_id in self._taking:
            return await asyncio.shield(self._taking[call_id])
        assert self.registry is not None
        held = self.registry.local(call_id)
        if held is not None and held.alive:
            return held  # taken over here meanwhile (as the owner was read)
        if not self._may_take_over():
            raise Unavailable("the call's node is gone and this node cannot take it over yet; try again")
        taking: asyncio.Future[CallActor] = asyncio.get_running_loop().create_future()
        taking.add_done_callback(_retrieve)
        self._taking[call_id] = taking
        try:
            actor = await self._take(call_id, owner)
        except BaseException as exc:
            taking.set_exception(exc)
            raise
        else:
            taking.set_result(actor)
            return actor
        finally:
            del self._taking[call_id]

    async def _take(self, call_id: str, owner: Owner) -> CallActor:
        assert self.registry is not None
        taken = await self.directory.take(call_id, owner)
        if taken is None:
            raise CallMoved()  # another node was first: the asker looks the call up again
        call, last = replay(taken, self.registry.rules, self.registry.held, time.monotonic(), time.time())
        if call.status is Status.ENDED:  # its end was logged, not yet cleaned up
            self._unpublish(call_id, taken.epoch)
            raise CallNotFound()
        self._epochs[call_id] = taken.epoch
        self.bridge.owner_gone(call_id)
        actor = self.registry.carry_on(call, taken.snapshot["created_at"])
        self.journal.begin(actor, taken.epoch, last)
        self.stats.taken_over += 1
        actor.log.info("call %s taken over from %s (epoch %d, %d entries replayed)", call_id, owner[0],
                       taken.epoch, len(taken.entries))
        return actor

    async def listing(self, status: Status | None, limit: int, peers: bool = False) -> list[CallSummary]:
        return await self.directory.listing(status, limit, peers)

    # A graceful stop ---------------------------------------------------------------------------

    async def hand_off(self, restart: Callable[[], Awaitable[None]]) -> None:
        """Stop owning calls: log their last decision (every socket is to reconnect), then resign the
        lease, and only then let the sockets hear it, so that they reconnect to nodes that take the
        calls over at once. Sockets bridged from here to other owners get the same from their owners."""
        self._leaving = True
        self.journal.close_gate()
        asked = self.bridge.restart_bridged()
        await restart()
        try:
            await asyncio.wait_for(self.journal.durable(), CLOSE_TIMEOUT)
        except (TimeoutError, Unavailable):
            logger.warning("could not write the calls' last state to Redis; survivors take them over from the"
                           " last state written")
        if self._lease_task is not None:
            self._lease_task.cancel()
        try:
            await asyncio.wait_for(self.outbox.call(self._resign), CLOSE_TIMEOUT)
        except (TimeoutError, Unavailable):
            pass  # the lease lapses by itself
        self.bridge.leaving(self._live)
        self.journal.open_gate()
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while asked and self.bridge.bridged and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the owners' answers arrive through the inbox; nothing to wait on
        self.bridge.close_bridged("server restart")
        logger.info("left the cluster; %d calls handed over", len(self._epochs))
        self._epochs.clear()

    # Background loops ------------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        await self.link.connected.wait()
        while True:
            pause = self.lease / 3
            try:
                if not self.bridge.inbox_ready.is_set():
                    await self.bridge.reset_inbox()
                pause = await self._beat()
            except Unavailable:
                self._leased = False
            except Exception:
                logger.exception("renewing the lease failed")
            self._wake_lease.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_lease.wait(), pause)

    async def _beat(self) -> float:
        """Renew the lease and act on what it tells; returns the seconds until the next beat."""
        self._cursor, beat = await self.directory.heartbeat(self._cursor, self.lease * FORGET_NODES_AFTER)
        now = time.monotonic()
        self._lease_ends = {node: now + left for node, left in beat.live.items()}
        live = set(beat.live)
        gone = self._live - live
        self._live = live
        if not self._leased:
            logger.info("node %s holds its lease (%.1f s) in the cluster", self.member, self.lease)
        self._leased = True
        if beat.lapsed and self._epochs:
            self._verify_all()
        if gone:
            logger.info("nodes gone (lease lapsed): %s", ", ".join(sorted(gone)))
            self.bridge.nodes_gone(live)
        if beat.orphaned and self._may_take_over() and (self._adopting is None or self._adopting.done()):
            self._adopting = asyncio.ensure_future(self._adopt_orphans(beat))
        # Beat again right after the next peer's lease would run out, to see a lapse at once.
        ends = [left for node, left in beat.live.items() if node != self.member]
        return min([self.lease / 3, *(left + WATCH_MARGIN for left in ends)])

    def _verify_all(self) -> None:
        """Our lease ran out (this process was frozen, or cut off): every call may have been taken over.
        Check each (the ones lost are let go), and make every bridged socket attach anew."""
        logger.warning("this node's lease had run out; checking its %d calls", len(self._epochs))
        assert self.registry is not None
        for call_id in list(self._epochs):
            actor = self.registry.local(call_id)
            if actor is not None:
                self._write(self.directory.fenced(call_id, self._epochs[call_id], "touch"),
                            self._held(actor, self._epochs[call_id]))
        self.bridge.close_bridged("reconnect")

    async def _adopt_orphans(self, beat: Heartbeat) -> None:
        """Take over the calls of nodes whose lease lapsed: those that hash to this node among the live
        ones, and any that waited ``SECOND_CHANCE_BEATS`` beats for another node."""
        live = sorted(beat.live)
        slots = asyncio.Semaphore(TAKEOVERS_AT_ONCE)
        seen: set[str] = set()
        tasks: list[asyncio.Task[None]] = []
        try:
            for node in beat.orphaned:
                cursor = 0
                while True:
                    cursor, calls = await self.directory.owned_by(node, cursor)
                    for call_id in calls:
                        seen.add(call_id)
                        beats = self._orphan_beats[call_id] = self._orphan_beats.get(call_id, 0) + 1
                        if _hashed_to(call_id, live) != self.member and beats <= SECOND_CHANCE_BEATS:
                            continue
                        await slots.acquire()
                        task = asyncio.ensure_future(self._adopt_orphan(call_id, node))
                        task.add_done_callback(lambda _: slots.release())
                        tasks.append(task)
                    if not cursor:
                        break
        except Unavailable:
            pass  # the next beat looks again
        await asyncio.gather(*tasks, return_exceptions=True)
        self._orphan_beats = {c: n for c, n in self._orphan_beats.items() if c in seen}

    async def _adopt_orphan(self, call_id: str, node: str) -> None:
        if self.registry is None or self.registry.local(call_id) is not None or self._leaving:
            return
        try:
            owner, live = await asyncio.gather(self.directory.owner(call_id), self.directory.live_nodes())
            if owner is None:
                await self.directory.forget_entry(call_id, node)  # the call is gone; so goes its entry
            elif owner[0] not in live:
                await self._take_over(call_id, owner)
        except (CallNotFound, CallMoved, Unavailable):
            pass  # gone, taken by another node, or not now: the next beat looks again

    async def _keep_keys(self) -> None:
        """Renew the records of our calls before they expire (fenced: a refusal means we lost one)."""
        await self.link.connected.wait()
        while True:
            await asyncio.sleep(KEY_TTL / 3)
            assert self.registry is not None
            for call_id in list(self._epochs):
                actor = self.registry.local(call_id)
                epoch = self._epochs.get(call_id)
                if actor is not None and epoch is not None:
                    self._write(self.directory.fenced(call_id, epoch, "touch"), self._held(actor, epoch))
                    await asyncio.sleep(0)


def _remember(kept: dict[str, Any], key: str, value: Any) -> None:
    """Add to a record of recent calls that keeps the newest ``MOVED_KEPT``."""
    kept[key] = value
    while len(kept) > MOVED_KEPT:
        del kept[next(iter(kept))]


def _hashed_to(call_id: str, live: list[str]) -> str:
    """The live node a lapsed node's call goes to (rendezvous hashing: the same answer on every node)."""
    return max(live, key=lambda node: hashlib.blake2b(f"{call_id}/{node}".encode(), digest_size=8).digest())


async def _nothing() -> None:
    pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


