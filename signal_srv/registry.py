"""``Registry``: maps ``call_id`` to its actor, indexes live calls by status, reaps ended ones.

The registry owns the actor tasks. An actor is dropped from every index the moment its
call ends (through the status callback) and, as a backstop, when its task finishes; a
periodic ``sweep`` expires any call whose deadline passed without its actor noticing.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import heapq
import itertools
import logging
import secrets
import time
from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Iterator


from signal_srv.actor import CallActor, CallSummary, Joined
from signal_srv.call import Call, CallRules, Expire, HeldBudget, Notify, Status, StatusChanged
from signal_srv.errors import CallEnded, CallMoved, CallNotFound, Capacity, ShuttingDown
from signal_srv.metrics import Metrics
from signal_srv.peer_tokens import token_digest
from signal_srv.placement import CallRef, LocalPlacement, Placement
from signal_srv.snapshot import call_from_dict

if TYPE_CHECKING:
    from signal_srv.webhooks import Webhooks

__all__ = ["Registry", "Statistics", "new_id", "new_ids"]

logger = logging.getLogger(__name__)

SWEEP_BATCH = 1000  # calls examined between two yields to the event loop
RESTART_ROUNDS = 3  # passes over the calls when a node stops and hands them over


def new_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def new_ids(count: int) -> list[str]:
    """``count`` ids of 128 random bits each, from one read of the system's random source."""
    raw = secrets.token_bytes(16 * count)
    return [base64.urlsafe_b64encode(raw[i:i + 16]).rstrip(b"=").decode() for i in range(0, 16 * count, 16)]


def _who(peer_id: str | None, identity: str | None, name: str | None) -> dict[str, str]:
    """A webhook's fields about a participant: its peer_id, and identity and name when it has them."""
    fields = (("peer_id", peer_id), ("identity", identity), ("name", name))
    return {key: value for key, value in fields if value is not None}


@dataclass(frozen=True, slots=True)
class Statistics:
    calls: int
    waiting: int
    active: int
    tasks: int
    created: int
    ended: dict[str, int]
    sweeps: int


@dataclass(frozen=True, slots=True)
class Created:
    actor: CallActor
    peer_id: str
    peer_token: str
    joined: Joined


class Registry:
    """All live calls of this process. Not thread-safe: use it from the IOLoop only."""

    def __init__(
        self,
        rules: CallRules = CallRules(),
        *,
        max_calls: int = 100000,
        mailbox_size: int = 256,
        heartbeat_interval: float = 20.0,
        heartbeat_timeout: float = 60.0,
        metrics: Metrics | None = None,
        webhooks: Webhooks | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.rules = rules
        self.held = HeldBudget(rules.held_bytes_total)
        self.placement: Placement = placement if placement is not None else LocalPlacement()
        self.metrics = metrics if metrics is not None else Metrics()
        self.webhooks = webhooks
        self.closing = False
        self.max_calls = max_calls
        self.mailbox_size = mailbox_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._actors: dict[str, CallActor] = {}
        self._by_order: dict[int, CallActor] = {}
        self._order: dict[Status, list[int]] = {Status.WAITING: [], Status.ACTIVE: []}
        self._tasks: set[asyncio.Task[None]] = set()
        self._counter = itertools.count()
        self._created = 0
        self._ended: Counter[str] = Counter()
        self._sweeps = 0
        self._sweeper: asyncio.Future[None] | None = None
        self.placement.attach(self)

    def __len__(self) -> int:
        return len(self._actors)

    # Creating and finding calls --------------------------------------------------------

    async def open_call(self, identity: str | None = None, name: str | None = None) -> Created:
        """Create a call here and publish it through the placement (``Unavailable`` if it cannot be)."""
        self.check_capacity()
        call_id = new_id()
        await self.placement.claim(call_id)
        created = self.create(identity, name, call_id=call_id)
        await self.placement.flush()  # listed everywhere (and, in a cluster, written whole) before its creator hears of it
        if not created.actor.alive:
            raise CallMoved()  # another node took it over meanwhile: this one may not hand it out
        return created

    def create(self, identity: str | None = None, name: str | None = None, call_id: str | None = None) -> Created:
        """Create a call with its host as first participant.

        Raises ``Capacity`` at ``max_calls``, ``ShuttingDown`` once ``close`` has begun.
        ``identity`` and ``name``: who the host is in the application (from its access token).
        ``call_id``: the id the placement claimed for it (default: a new one).
        The host's new peer token is returned for its creator's answer; the call keeps its digest.
        """
        self.check_capacity()
        if call_id is None:
            call_id, peer_id, peer_token = new_ids(3)
            while call_id in self._actors:
                call_id = new_id()
        else:
            peer_id, peer_token = new_ids(2)
        actor = self._actor_for(Call(call_id, time.monotonic(), self.rules, self.held))
        joined = actor.start(peer_id, token_digest(peer_token), identity, name)
        self._run(actor)
        self._created += 1
        actor.log.info("call %s created", call_id)
        self.placement.begin(actor)
        self.placement.changed(actor)
        if self.webhooks is not None:
            self.webhooks.start()
            self.webhooks.emit("call_created", call_id, **_who(peer_id, identity, name))
        return Created(actor, peer_id, peer_token, joined)

    def adopt(self, data: dict[str, Any]) -> CallActor:
        """Carry on a call another process handed over (see ``CallActor.hand_over``)."""
        actor = self.carry_on(call_from_dict(data, self.rules, self.held, time.monotonic(), time.time()),
                              data["created_at"])
        actor.log.info("call %s moved here", actor.call_id)
        return actor

    def carry_on(self, call: Call, created_at: str) -> CallActor:
        """Run a call that another process held until now (moved here, or taken over from a dead node)."""
        actor = self._actor_for(call, created_at)
        self._run(actor)
        self.placement.changed(actor)
        return actor

    def hand_over(self, call_id: str, settled: bool = True) -> dict[str, Any] | None:
        """The call as data for another process, which owns it from now on; None unless it is idle here."""
        actor = self._actors.get(call_id)
        data = actor.hand_over(settled) if actor is not None else None
        if actor is not None and data is not None:
            self._forget(actor, publish=False)
            actor.log.info("call %s handed over", call_id)
        return data

    def _actor_for(self, call: Call, created_at: str | None = None) -> CallActor:
        return CallActor(
            call, order=next(self._counter), mailbox_size=self.mailbox_size, on_status=self._status_changed,
            heartbeat_interval=self.heartbeat_interval, heartbeat_timeout=self.heartbeat_timeout,
            metrics=self.metrics, on_notify=self._notify, created_at=created_at, journal=self.placement.journal,
        )

    def _run(self, actor: CallActor) -> None:
        self._actors[actor.call_id] = actor
        self._by_order[actor.order] = actor
        insort(self._order[actor.call.status], actor.order)
        task = asyncio.ensure_future(actor.run())
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, actor=actor))

    def check_capacity(self) -> None:
        """Raise ``ShuttingDown`` or ``Capacity`` when no call may be created now."""
        if self.closing:
            raise ShuttingDown()
        if len(self._actors) >= self.max_calls:
            raise Capacity(f"{self.max_calls} calls are live; try again later")

    def get(self, call_id: str) -> CallActor:
        """The live call's actor.

        Raises ``CallNotFound`` for unknown, ended or expired calls, and ``ShuttingDown`` once
        ``close`` has begun (the calls are ending because this process stops, not for good).
        """
        if self.closing:
            raise ShuttingDown()
        actor = self._actors.get(call_id)
        if actor is None or not actor.alive:
            raise CallNotFound()
        return actor

    def local(self, call_id: str) -> CallActor | None:
        """The actor of a call held by this process, if any."""
        return self._actors.get(call_id)

    def release(self, actor: CallActor, code: int, reason: str) -> None:
        """Drop a call that another node owns now: it did not end, so nothing counts it as ended."""
        self._forget(actor, publish=False)
        actor.relinquish(code, reason)

    async def find(self, call_id: str) -> CallRef:
        """The live call, here or on the node that owns it.

        Raises ``CallNotFound``, ``ShuttingDown`` (as ``get``) or ``Unavailable`` (the placement cannot tell).
        """
        if call_id not in self._actors:
            if self.closing:
                raise ShuttingDown()
            return await self.placement.locate(call_id)
        return self.get(call_id)

    async def find_calls(self, status: Status | None = None, limit: int = 50, peers: bool = False) -> list[CallSummary]:
        """Summaries of live calls wherever they run, newest first (``peers``: with participants)."""
        return await self.placement.listing(status, limit, peers)

    async def wait_ended(self, call_id: str, timeout: float) -> None:
        """Wait until the call has ended and its actor has stopped (at once if it is gone)."""
        actor = self._actors.get(call_id)
        if actor is not None:
            await asyncio.wait_for(asyncio.shield(actor.finished), timeout)

    def list(self, status: Status | None = None, limit: int = 50, peers: bool = False) -> list[CallSummary]:
        """Summaries of live calls, newest first, optionally of one status (``peers``: with participants)."""
        return [actor.summary(peers) for actor in itertools.islice(self._newest(status), limit)]

    async def newest_waiting(self, peers: bool = False) -> CallSummary | None:
        return next(iter(await self.find_calls(Status.WAITING, 1, peers)), None)

    def _newest(self, status: Status | None) -> Iterator[CallActor]:
        statuses = [status] if status is not None else [Status.WAITING, Status.ACTIVE]
        orders = heapq.merge(*(reversed(self._order[s]) for s in statuses), reverse=True)
        return (self._by_order[o] for o in orders)

    # Keeping the indexes true ----------------------------------------------------------

    def _status_changed(self, actor: CallActor, change: StatusChanged) -> None:
        self._unindex(actor, change.old)
        if change.new is Status.ENDED:
            self._forget(actor)
            self._ended[change.reason or "error"] += 1
        else:
            insort(self._order[change.new], actor.order)
            self.placement.changed(actor)

    def _notify(self, actor: CallActor, effect: Notify) -> None:
        if effect.peer_id is not None and actor.alive:
            self.placement.changed(actor)
        if self.webhooks is None:
            return
        fields = _who(effect.peer_id, effect.identity, effect.name)
        if effect.reason is not None:
            fields["reason"] = effect.reason
        self.webhooks.emit(effect.event, actor.call_id, **fields)

    def _unindex(self, actor: CallActor, status: Status) -> None:
        orders = self._order.get(status)
        if orders is None:
            return
        i = bisect_left(orders, actor.order)
        if i < len(orders) and orders[i] == actor.order:
            del orders[i]

    def _forget(self, actor: CallActor, publish: bool = True) -> None:
        if self._actors.get(actor.call_id) is actor:
            del self._actors[actor.call_id]
            del self._by_order[actor.order]
            for status in self._order:
                self._unindex(actor, status)
            if publish:
                self.placement.released(actor)

    def _finished(self, task: asyncio.Task[None], *, actor: CallActor) -> None:
        self._tasks.discard(task)
        if self._actors.get(actor.call_id) is actor and actor.relinquished:
            self._forget(actor, publish=False)  # it goes on elsewhere
        elif self._actors.get(actor.call_id) is actor:
            actor.log.error("call %s stopped without ending; dropping it", actor.call_id)
            self._forget(actor)
            self._ended["error"] += 1

    def defer(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the background, owned by the registry (awaited on ``close``)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Reaping ---------------------------------------------------------------------------

    def start_sweeping(self, interval: float) -> None:
        """Sweep every ``interval`` seconds, on the monotonic clock.

        Not a ``PeriodicCallback``: that schedules on ``IOLoop.time()``, the wall clock, so a
        clock set back would postpone the sweeps.
        """
        self._sweeper = asyncio.ensure_future(self._sweep_every(interval))

    async def _sweep_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.sweep()

    async def sweep(self) -> int:
        """Tell every call whose deadline has passed to expire; return how many were told.

        Yields to the event loop every ``SWEEP_BATCH`` calls, so a large registry never
        blocks the loop for long.
        """
        told = 0
        actors = list(self._actors.values())
        for start in range(0, len(actors), SWEEP_BATCH):
            now = time.monotonic()
            for actor in actors[start:start + SWEEP_BATCH]:
                if actor.overdue(now):
                    try:
                        told += actor.tell(Expire())
                    except (CallEnded, CallMoved):
                        pass
            await asyncio.sleep(0)
        self._sweeps += 1
        if told:
            logger.info("sweep expired %d calls", told)
        return told

    def max_inbox_depth(self) -> int:
        return max((a.inbox_depth for a in self._actors.values()), default=0)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop, and wait for the actors: end every call (sockets get ``server_shutdown`` and 1001), or,
        where the placement keeps calls beyond this process (a cluster), hand them over."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.placement.keeps_calls:
            await self.placement.hand_off(self._restart_all)
        else:
            await asyncio.gather(*(a.shutdown() for a in list(self._actors.values())), return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
        if self.webhooks is not None:
            await self.webhooks.close(timeout)
        await self.placement.close()

    async def _restart_all(self) -> None:
        """Every call stops here without ending (sockets get ``server_shutdown`` with ``reconnect``, 1012)."""
        stopped = 0
        for _ in range(RESTART_ROUNDS):  # a call moved here meanwhile (its move began before we stopped) goes too
            actors = list(self._actors.values())
            if not actors:
                break
            await asyncio.gather(*(a.restart() for a in actors), return_exceptions=True)
            for actor in actors:
                self._forget(actor, publish=False)
            stopped += len(actors)
        logger.info("%d calls stop here and go on elsewhere", stopped)

    def statistics(self) -> Statistics:
        return Statistics(
            calls=len(self._actors),
            waiting=len(self._order[Status.WAITING]),
            active=len(self._order[Status.ACTIVE]),
            tasks=len(self._tasks),
            created=self._created,
            ended=dict(self._ended),
            sweeps=self._sweeps,
        )
