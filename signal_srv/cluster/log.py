"""The write-ahead log of the calls a node owns, and their replay on the node that takes one over.

Write-ahead: the actor hands every event its call accepted to the ``Journal``, with what it
decided (frames to send, answers to give); the journal writes the event to the call's log
in Redis and only once Redis has it lets the actor carry the decision out. So nothing a
client sees (a frame, an answer, a close) can be missing from Redis when the node dies. The
events of one loop turn go out together, one fenced script per call in one pipeline (see
``Outbox``): a node that is no longer the call's owner has its entries refused, and learns
from that refusal that it lost the call.

In Redis, per call (keys with the call's hash tag): ``sig:call:{<id>}`` holds the owner,
the epoch, ``n`` (the number of the last entry) and the last snapshot (``snap``, which
covers the entries up to ``snap_n``), and ``sig:call:{<id>}:log`` the entries after it, as
stream entries ``0-<n>``: ``{"n", "t": the owner's monotonic time of the event, "ev": the
event}``. A snapshot is written when a node starts to own a call (created, moved in or taken
over) and after ``SNAPSHOT_EVERY`` entries, or once the entries since the last one outweigh
the call's resume buffers, and drops the entries it covers: what Redis holds for a call is
bounded by what a resume needs. Both keys expire with the ownership record, and go when
the call ends.

Replay (``replay``): the snapshot is restored on the clock of the node that wrote it, the
entries after it go through ``Call.handle`` with the times they were stamped with, so the
call comes out exactly as its owner had it; then its instants move onto this node's
clock, and its sockets, which were on other processes, are disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from signal_srv.call import Call, CallRules, Disconnect, Event, HeldBudget
from signal_srv.cluster.directory import Taken, call_key, log_key
from signal_srv.cluster.outbox import Outbox
from signal_srv.cluster.wire import decode_event, encode_event
from signal_srv.errors import SignalError
from signal_srv.snapshot import call_to_dict, rebase, restore

if TYPE_CHECKING:
    from signal_srv.actor import CallActor

__all__ = ["Journal", "replay"]

logger = logging.getLogger(__name__)

SNAPSHOT_EVERY = 256  # entries between two snapshots of a call (fewer if they are large)
UNCONFIRMED_LIMIT = 32 * 1024 * 1024  # bytes of entries Redis has not confirmed yet; beyond, calls wait

Done = Callable[[bool], None]  # True: Redis has the entry; False: refused (another node owns the call)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class _Log:
    """The journal's record of one call owned here."""

    __slots__ = ("call_id", "epoch", "n", "count", "size", "pending", "callbacks", "inflight", "tail", "unrun",
                 "lost", "waiters")

    def __init__(self, call_id: str, epoch: int, n: int) -> None:
        self.call_id = call_id
        self.epoch = epoch
        self.n = n  # the last entry's number
        self.count = 0  # entries since the last snapshot
        self.size = 0  # their bytes
        self.pending: list[str] = []  # entries of this loop turn, not yet handed to the outbox
        self.callbacks: list[Done] = []  # what runs once they are in Redis
        self.inflight = 0  # batches in the outbox, not yet confirmed
        self.tail: list[Done] | None = None  # the callbacks of the newest batch in flight
        self.unrun = 0  # callbacks that have not run yet
        self.lost = False
        self.waiters: list[asyncio.Future[None]] = []


class Journal:
    """Write-ahead logging of the calls owned here; see the module docstring."""

    def __init__(
        self, outbox: Outbox, node_id: str, key_ttl: float, snapshot_bytes: int, on_refused: Callable[[str], None],
    ) -> None:
        self.outbox = outbox
        self.node_id = node_id
        self.ttl_ms = int(key_ttl * 1000)
        self.snapshot_bytes = snapshot_bytes  # entries' bytes since the last snapshot that call for a new one
        self.on_refused = on_refused
        self.entries = 0  # written, for /metrics
        self.snapshots = 0
        self._logs: dict[str, _Log] = {}
        self._dirty: dict[str, _Log] = {}
        self._unconfirmed = 0
        self._room = asyncio.Event()
        self._room.set()
        self._gate: list[tuple[_Log, Done]] | None = None

    # What the actor uses ------------------------------------------------------------------

    def record(self, actor: CallActor, event: Event, now: float, done: Done) -> None:
        """Log ``event`` (accepted at monotonic ``now``); ``done`` runs once Redis has it, or refused it."""
        log = self._logs.get(actor.call_id)
        if log is None or log.lost:
            done(False)
            return
        log.n += 1
        text = _dumps({"n": log.n, "t": now, "ev": encode_event(event)})
        log.pending.append(text)
        log.callbacks.append(done)
        log.unrun += 1
        log.count += 1
        log.size += len(text)
        self._mark(log)
        if log.count >= SNAPSHOT_EVERY or log.size >= self.snapshot_bytes:
            self._snapshot(actor, log)

    def after(self, actor: CallActor, done: Done) -> None:
        """Run ``done`` once everything the call logged so far is in Redis (at once if it is)."""
        log = self._logs.get(actor.call_id)
        if log is None:
            done(True)
        elif log.lost:
            done(False)
        elif log.pending:
            log.callbacks.append(done)
            log.unrun += 1
        elif log.tail is not None:
            log.tail.append(done)
            log.unrun += 1
        else:
            log.unrun += 1
            self._run(log, [done], True)

    async def settled(self, actor: CallActor) -> None:
        """Return once every decision the call logged has been carried out (or dropped, if refused)."""
        log = self._logs.get(actor.call_id)
        if log is not None and log.unrun:
            waiter = asyncio.get_running_loop().create_future()
            log.waiters.append(waiter)
            await waiter

    @property
    def full(self) -> bool:
        """Redis has not confirmed enough of what was logged: calls should decide no more for now."""
        return not self._room.is_set()

    def room(self) -> asyncio.Future[Any] | None:
        """None while Redis keeps up; else something to await before deciding more (back-pressure)."""
        if self._room.is_set():
            return None
        return asyncio.ensure_future(self._room.wait())

    # What the placement uses --------------------------------------------------------------

    def begin(self, actor: CallActor, epoch: int, n: int = 0) -> None:
        """This node owns the call from now on, at ``epoch``: write its whole state; entries follow ``n``."""
        log = self._logs[actor.call_id] = _Log(actor.call_id, epoch, n)
        self._snapshot(actor, log)

    def last_entry(self, call_id: str) -> int:
        log = self._logs.get(call_id)
        return log.n if log is not None else 0

    def idle(self, call_id: str) -> bool:
        """Nothing of the call waits for Redis."""
        log = self._logs.get(call_id)
        return log is None or not log.unrun

    def forget(self, call_id: str) -> None:
        """The call ended or left this node; its log is no longer written here."""
        log = self._logs.pop(call_id, None)
        if log is not None:
            self._dirty.pop(call_id, None)
            log.lost = True

    def flush(self) -> None:
        """Hand every entry of this loop turn to the outbox (it runs by itself at the end of each turn)."""
        dirty, self._dirty = self._dirty, {}
        for log in dirty.values():
            if log.pending and not log.lost:
                self._send(log)

    async def durable(self) -> None:
        """Return once everything logged so far is in Redis."""
        self.flush()
        await self.outbox.call(_nothing)

    def close_gate(self) -> None:
        """From now on, hold back what logged decisions would carry out, in order, until ``open_gate``."""
        if self._gate is None:
            self._gate = []

    def open_gate(self) -> None:
        gate, self._gate = self._gate, None
        for log, done in gate or ():
            self._call(log, done, True)

    # Inside -------------------------------------------------------------------------------

    def _mark(self, log: _Log) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self.flush)
        self._dirty[log.call_id] = log

    def _send(self, log: _Log) -> None:
        texts, callbacks = log.pending, log.callbacks
        log.pending, log.callbacks = [], []
        size = sum(map(len, texts))
        self._unconfirmed += size
        if self._unconfirmed > UNCONFIRMED_LIMIT:
            self._room.clear()
        log.inflight += 1
        log.tail = callbacks
        first = log.n - len(texts) + 1
        self.entries += len(texts)
        self.outbox.script(
            "append", [call_key(log.call_id), log_key(log.call_id)],
            [self.node_id, log.epoch, self.ttl_ms, first, *texts],
            lambda result: self._confirmed(log, callbacks, size, result))

    def _confirmed(self, log: _Log, callbacks: list[Done], size: int, result: Any) -> None:
        self._unconfirmed -= size
        if self._unconfirmed <= UNCONFIRMED_LIMIT // 2:
            self._room.set()
        log.inflight -= 1
        if log.tail is callbacks:
            log.tail = None
        if result != 1:
            self._refused(log)
        self._run(log, callbacks, result == 1 and not log.lost)

    def _snapshot(self, actor: CallActor, log: _Log) -> None:
        if log.pending:
            self._dirty.pop(log.call_id, None)
            self._send(log)
        data = call_to_dict(actor.call, time.monotonic(), time.time())
        data.update(n=log.n, created_at=actor.created_at)
        log.count = log.size = 0
        self.snapshots += 1
        self.outbox.script(
            "snapshot", [call_key(log.call_id), log_key(log.call_id)],
            [self.node_id, log.epoch, self.ttl_ms, log.n, _dumps(data)],
            lambda result: self._snapshot_written(log, result))

    def _snapshot_written(self, log: _Log, result: Any) -> None:
        if result != 1:
            self._refused(log)

    def _refused(self, log: _Log) -> None:
        """Another node owns the call now: nothing more of it is written or carried out here."""
        if log.lost:
            return
        log.lost = True
        pending, log.pending, log.callbacks = log.callbacks, [], []
        self._dirty.pop(log.call_id, None)
        if self._logs.get(log.call_id) is log:
            self.on_refused(log.call_id)
        self._run(log, pending, False)

    def _run(self, log: _Log, callbacks: list[Done], ok: bool) -> None:
        for done in callbacks:
            if ok and self._gate is not None:
                self._gate.append((log, done))
            else:
                self._call(log, done, ok)

    def _call(self, log: _Log, done: Done, ok: bool) -> None:
        try:
            done(ok)
        except Exception:
            logger.exception("call %s: carrying out a logged decision failed", log.call_id)
        log.unrun -= 1
        if not log.unrun:
            waiters, log.waiters = log.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


async def _nothing() -> None:
    pass


def replay(taken: Taken, rules: CallRules, held: HeldBudget, mono_now: float, wall_now: float) -> tuple[Call, int]:
    """The call as its last owner had it, on this node's clock, with its old sockets disconnected.

    Returns the call and the number of its last log entry. Its held frames count against ``held``
    (past its limit if need be: they were accepted already).
    """
    snapshot = taken.snapshot
    unbounded = HeldBudget(2**62)  # the owner accepted every logged frame: replay refuses none
    call = restore(snapshot, rules, unbounded)
    last = int(snapshot["n"])
    for entry in taken.entries:
        if entry["n"] <= last:
            continue
        last = entry["n"]
        event = decode_event(entry["ev"])
        try:
            call.handle(event, entry["t"])  # type: ignore[arg-type]
        except SignalError as exc:  # a node with other call rules wrote it: carry on from what is known
            logger.warning("call %s: replaying entry %d (%s) failed: %s", call.call_id, last,
                           type(event).__name__, exc.code)
    rebase(call, snapshot["clock"], mono_now, wall_now)
    for p in list(call.participants.values()):
        if p.conn is not None:
            call.handle(Disconnect(p.conn), mono_now)
    call.held_budget = held
    held.used += sum(p.held_bytes for p in call.participants.values())
    return call, last
