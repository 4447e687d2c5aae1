"""``CallActor``: the one coroutine that owns a call's state, sockets and deadline.

Everything that changes a call arrives as an envelope on the actor's own bounded queue.
The loop takes an envelope, feeds its event to the pure ``Call`` and carries out the
effects; the only ``await`` in the loop is the queue read, so no other coroutine can see
or change a half-updated call and no lock is needed.

One shortcut keeps that order: a frame (``Receive``) told to an actor whose loop waits on
an empty inbox is handled at once, on the teller's stack, by the same code the loop runs.
It is the envelope the loop would take next, nothing can come between, and it spares each
relayed frame a trip through the queue and a task switch.

With a ``Journal`` (a cluster node), the effects of an accepted event (frames, closes,
the answer to a request) are carried out only once the journal has the event in Redis:
write-ahead, so that another node can carry the call on exactly where a dead owner left
it. The loop does not wait for that; it goes on deciding, and the journal releases the
decisions in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, cast

from tornado.queues import Queue, QueueFull

from signal_srv import messages
from signal_srv.call import (
    SERVICE_RESTART,
    Call,
    Close,
    Connect,
    Disconnect,
    Effect,
    Event,
    Expire,
    Identify,
    Join,
    Leave,
    Notify,
    Receive,
    Remove,
    Restart,
    Send,
    Shutdown,
    Status,
    StatusChanged,
)
from signal_srv.errors import CallBusy, CallEnded, CallMoved, SignalError
from signal_srv.messages import Relay
from signal_srv.metrics import Metrics
from signal_srv.snapshot import call_to_dict

__all__ = ["CallActor", "CallSummary", "Envelope", "Joined", "Journal", "Socket", "iso_time", "new_conn"]

logger = logging.getLogger(__name__)

INTERNAL_ERROR = 1011  # RFC 6455: the server hit an unexpected condition


_conns = itertools.count(1)


def new_conn() -> int:
    """A socket's id for the calls of this process: never used twice (``id()`` of a freed socket would be)."""
    return next(_conns)


class Socket(Protocol):
    """What the actor needs of a participant's WebSocket (see ``ws.SignalingSocket``)."""

    awaiting_pong_since: float | None

    def send(self, text: str) -> None: ...

    def reply_error(self, code: str, message: str) -> None: ...

    def heartbeat(self, now: float) -> None: ...

    def abort(self) -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Journal(Protocol):
    """What the actor needs of a write-ahead log (see ``signal_srv.cluster.log``).

    ``done(ok)`` runs once Redis has what was logged (``ok``), or refused it because another
    node owns the call now (not ``ok``: nothing of that decision may be carried out).
    """

    def record(self, actor: CallActor, event: Event, now: float, done: Callable[[bool], None]) -> None: ...

    def after(self, actor: CallActor, done: Callable[[bool], None]) -> None: ...

    def settled(self, actor: CallActor) -> Awaitable[None]: ...

    def room(self) -> Awaitable[Any] | None: ...

    @property
    def full(self) -> bool: ...


@dataclass(slots=True)
class Envelope:
    event: Event
    reply: asyncio.Future[Any] | None = None
    socket: Socket | None = None


_WAKE_UP = Envelope(Expire())  # posted by the actor's timer; checked by identity

_CHANGES_PARTICIPANTS = frozenset({Join, Leave, Remove, Expire})


@dataclass(frozen=True, slots=True)
class CallSummary:
    """A read-only snapshot of a call, as the REST API shows it.

    ``peers`` (who is in the call) is filled in only for administrators' answers.
    """

    call_id: str
    status: str
    count: int
    max: int
    created_at: str
    expires_at: float | None
    expires_reason: str | None
    peers: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "call_id": self.call_id,
            "status": self.status,
            "participants": {"count": self.count, "max": self.max},
            "created_at": self.created_at,
            "expires_at": iso_time(self.expires_at) if self.expires_at is not None else None,
            "expires_reason": self.expires_reason,
        }
        if self.peers is not None:
            body["peers"] = list(self.peers)
        return body


@dataclass(frozen=True, slots=True)
class Joined:
    """The answer to a ``Join``: the joiner's role and the call right after it joined."""

    role: str
    polite: bool
    summary: CallSummary


def iso_time(wall: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T16:00:00.000Z``."""
    millis = int(wall * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + f".{millis % 1000:03d}Z"


class CallActor:
    """Owns one ``Call``; talk to it with ``tell``, ``put`` or ``ask``.

    ``on_status(actor, effect)`` is called synchronously when the call changes status,
    so that the registry's index is never stale.

    ``vouches_for`` answers from an index of the participants' token digests that the actor
    publishes as a new, never-mutated dict whenever someone joins or leaves: a participant's
    token never changes while it is in the call, so the edges can refuse a wrong token
    without queueing it (it must never crowd out authorized work). The call's own check,
    inside the loop, stays the authority: a token that passed here can still be refused there.
    """

    def __init__(
        self,
        call: Call,
        *,
        order: int,
        mailbox_size: int,
        on_status: Callable[[CallActor, StatusChanged], None],
        heartbeat_interval: float = 20.0,
        heartbeat_timeout: float = 60.0,
        metrics: Metrics | None = None,
        on_notify: Callable[[CallActor, Notify], None] | None = None,
        created_at: str | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.call = call
        self.journal = journal
        self._on_notify = on_notify
        self._metrics = metrics if metrics is not None else Metrics()
        self.call_id = call.call_id
        self.order = order
        self.created_at = created_at or iso_time(time.time())
        self._queue: Queue[Envelope] = Queue(maxsize=mailbox_size)
        self._sockets: dict[int, Socket] = {}
        self._closing: set[int] = set()  # sockets whose close is decided, not yet carried out (write-ahead)
        self._on_status = on_status
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._alive = True
        self._released: tuple[int, str] | None = None
        self._unhandled = 0  # envelopes queued by tell/put/ask and not yet taken by the loop
        # A random phase, so that calls created in a burst do not all ping at the same moment.
        self._pinged_at = time.monotonic() - random.random() * heartbeat_interval
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # when _timer is due (uvloop answers call_at with a plain Handle when it is due already)
        self._getter: asyncio.Future[Envelope] | None = None  # the loop's pending read of an empty inbox
        self._handling_now = False
        self._failure: Exception | None = None  # a frame handled on a teller's stack crashed the call
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished_deciding: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log = logging.LoggerAdapter(logger, {"call_id": self.call_id})
        self._token_holders: dict[bytes, str] = {}
        self._publish_tokens()  # an adopted call comes with its participants

    # Interface used by handlers --------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def relinquished(self) -> bool:
        """Stopped without ending: another node carries the call on."""
        return self._released is not None

    @property
    def inbox_depth(self) -> int:
        return self._queue.qsize()

    def summary(self, peers: bool = False) -> CallSummary:
        """A consistent snapshot: it runs between two events, never in the middle of one.

        ``peers``: also list the participants (peer_id, identity, name, role, connected).
        """
        call = self.call
        expiry = call.expiry()
        expires = None if expiry is None else time.time() + (expiry.at - time.monotonic())
        listed = None
        if peers:
            listed = tuple({"peer_id": p.peer_id, "identity": p.identity, "name": p.name, "role": p.role,
                            "connected": p.conn is not None} for p in call.participants.values())
        return CallSummary(
            call.call_id, call.status.value, len(call.participants), call.max_participants,
            self.created_at, expires, None if expiry is None else expiry.reason, listed,
        )

    def start(self, peer_id: str, digest: bytes, identity: str | None = None, name: str | None = None) -> Joined:
        """Seat the host, whose peer token has ``digest``; called once, before ``run`` starts."""
        self.call.handle(Join(peer_id, digest, identity, name), time.monotonic())
        self._publish_tokens()
        host = self.call.participant(peer_id)
        return Joined(host.role, host.polite, self.summary())

    def vouches_for(self, digest: bytes, peer_id: str | None = None) -> bool:
        """Whether ``digest`` is a participant's token digest (``peer_id``'s, if given), without the inbox.

        A plain dict lookup is safe: the caller cannot choose a digest, only a token hashed
        into one, so the lookup's timing tells it nothing about a participant's token.
        """
        holder = self._token_holders.get(digest)
        return holder is not None and (peer_id is None or holder == peer_id)

    def _publish_tokens(self) -> None:
        self._token_holders = {p.token_digest: p.peer_id for p in self.call.participants.values()}

    def overdue(self, now: float) -> bool:
        """True if the call's deadline has passed (the sweep's backstop check)."""
        deadline = self.call.deadline()
        return deadline is not None and now >= deadline

    def tell(self, event: Event, socket: Socket | None = None) -> bool:
        """Queue an event without waiting; False if the inbox is full. Raises ``CallEnded``.

        A ``Receive`` that finds the loop idle is handled before this returns (see the module docstring).
        """
        self._check_alive()
        if type(event) is Receive and self._idle():
            self._handle_now(Envelope(event, None, socket))
            return True
        try:
            self._queue.put_nowait(Envelope(event, None, socket))
        except QueueFull:
            return False
        self._unhandled += 1
        return True

    async def put(self, event: Event, socket: Socket | None = None) -> None:
        """Queue an event, waiting for room: the back-pressure path for socket traffic."""
        self._check_alive()
        await self._queue.put(Envelope(event, None, socket))
        self._unhandled += 1

    async def ask(self, event: Event, timeout: float, socket: Socket | None = None) -> Any:
        """Queue an event and wait for the call's answer, at most ``timeout`` seconds.

        Raises the ``SignalError`` the call refused the event with, ``CallEnded`` if the
        actor stops first, or ``CallBusy`` if the inbox is full or the answer is late.
        """
        reply = self.ask_nowait(event, socket)
        try:
            return await asyncio.wait_for(asyncio.shield(reply), timeout)
        except TimeoutError:
            raise CallBusy("the call did not answer in time") from None

    def ask_nowait(self, event: Event, socket: Socket | None = None) -> asyncio.Future[Any]:
        """Queue an event now and return the future of its answer (see ``ask``)."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._check_alive()
        try:
            self._queue.put_nowait(Envelope(event, reply, socket))
        except QueueFull:
            self.log.warning("inbox full (%d envelopes), refusing %s", self._queue.maxsize, type(event).__name__)
            raise CallBusy() from None
        self._unhandled += 1
        return reply

    async def describe(self, timeout: float, peers: bool = False) -> CallSummary:
        """The call's summary (``CallRef``'s way to read it wherever the call runs).

        With a journal, answered once everything it reflects is in Redis.
        """
        self._check_alive()
        summary = self.summary(peers)
        if self.journal is not None:
            logged: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.journal.after(self, logged.set_result)
            try:
                if not await asyncio.wait_for(logged, timeout):
                    raise CallMoved()
            except TimeoutError:
                raise CallBusy("the call did not answer in time") from None
        return summary

    def _check_alive(self) -> None:
        if not self._alive:
            raise CallMoved() if self._released is not None else CallEnded()

    def _idle(self) -> bool:
        """True while the loop waits on an empty inbox and nothing is on its way to it.

        Once anything is queued (an envelope, or the timer's wake-up) the loop's read is
        resolved, and everything goes through the inbox until the loop waits again.
        """
        getter = self._getter
        return (getter is not None and not getter.done() and not self._handling_now
                and (self.journal is None or not self.journal.full))

    def _handle_now(self, envelope: Envelope) -> None:
        """Process ``envelope`` as the loop would; a crash ends the call from the loop, as there."""
        self._handling_now = True
        try:
            self._process(envelope)
        except Exception as exc:
            self._failure, self._alive = exc, False
            try:
                self._queue.put_nowait(_WAKE_UP)
            except QueueFull:
                pass  # then the loop's read is resolved already
        finally:
            self._handling_now = False

    # The loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Process envelopes until the call ends; then fail what is left and close sockets."""
        crashed = False
        try:
            while self.call.status is not Status.ENDED:
                if self.journal is not None:
                    full = self.journal.room()
                    if full is not None:
                        await full  # Redis has not confirmed enough of what was logged: decide no more for now
                envelope = await self._next()
                if self._failure is not None:
                    raise self._failure
                if self._released is not None:
                    if envelope is not None:
                        self._unhandled -= 1
                        self._refuse_moved(envelope)
                    break
                if envelope is None:
                    self._on_timer()
                else:
                    self._unhandled -= 1
                    self._process(envelope)
            self.finished_deciding.set_result(None)
            if self.journal is not None:
                await self.journal.settled(self)  # the last decisions are carried out before the sockets close
        except Exception:
            crashed = True
            self.log.exception("call %s crashed; ending it", self.call_id)
        finally:
            self._teardown(crashed)

    async def _next(self) -> Envelope | None:
        """The next envelope, or None when a timer (expiry, heartbeat) is due first.

        One timer per actor, re-armed only when the wake time moves earlier, posts a wake-up
        envelope; a get(timeout=...) per envelope would create and cancel a timer each time.
        """
        wake = self._wake_time()
        if wake is not None and time.monotonic() >= wake:
            return None  # checked first, so a steady stream of envelopes cannot starve the timers
        if wake is not None and (self._timer is None or wake < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            # The loop's clock is time.monotonic() (uvloop's too, in whole milliseconds);
            # IOLoop.time() is the wall clock.
            self._timer, self._timer_at = asyncio.get_running_loop().call_at(wake, self._wake_up), wake
        if self._queue.qsize():
            envelope = self._queue.get_nowait()
        else:
            self._getter = cast("asyncio.Future[Envelope]", self._queue.get())
            try:
                envelope = await self._getter
            finally:
                self._getter = None
        return None if envelope is _WAKE_UP else envelope

    def _wake_up(self) -> None:
        self._timer = None
        try:
            self._queue.put_nowait(_WAKE_UP)
        except QueueFull:
            pass  # a busy actor checks its wake time before each envelope anyway

    def _wake_time(self) -> float | None:
        deadline, heartbeat = self.call.deadline(), self._heartbeat_due()
        if deadline is None or heartbeat is None:
            return heartbeat if deadline is None else deadline
        return min(deadline, heartbeat)

    def _on_timer(self) -> None:
        now = time.monotonic()
        heartbeat = self._heartbeat_due()
        if heartbeat is not None and now >= heartbeat:
            self._heartbeat(now)
        deadline = self.call.deadline()
        if deadline is not None and now >= deadline:
            self._process(Envelope(Expire()))

    # Heartbeat: one timer per call pings all of its sockets ------------------------------

    def _heartbeat_due(self) -> float | None:
        if not self._sockets:
            return None
        due = self._pinged_at + self._heartbeat_interval
        for socket in self._sockets.values():
            if socket.awaiting_pong_since is not None:
                due = min(due, socket.awaiting_pong_since + self._heartbeat_timeout)
        return due

    def _heartbeat(self, now: float) -> None:
        for conn, socket in list(self._sockets.items()):
            since = socket.awaiting_pong_since
            if since is not None and now - since >= self._heartbeat_timeout:
                del self._sockets[conn]
                self.log.info("call %s: a socket missed its pong for %.1f s; dropping it", self.call_id, now - since)
                socket.abort()  # its on_close reports the disconnect through the inbox
        if now >= self._pinged_at + self._heartbeat_interval:
            self._pinged_at = now
            for socket in self._sockets.values():
                socket.heartbeat(now)

    def _process(self, envelope: Envelope) -> None:
        event = envelope.event
        now = time.monotonic()
        try:
            effects = self.call.handle(event, now)
        except SignalError as exc:
            self.log.debug("refused %s: %s", type(event).__name__, exc.code)
            if self.journal is None:
                self._refuse(envelope, exc)
            elif envelope.reply is None and getattr(event, "conn", None) in self._closing:
                pass  # a frame that raced its socket's decided close: its client resends it on its next socket
            else:  # a refusal too rests on what was decided before: answer once that is in Redis
                refusal = exc
                self.journal.after(self, lambda ok: self._refuse(envelope, refusal if ok else CallMoved()))
            return
        if type(event) is Receive and type(event.message) is Relay:
            self._metrics.relayed[event.message.type] += 1
        elif type(event) in _CHANGES_PARTICIPANTS:
            self._publish_tokens()
        elif envelope.socket is not None and isinstance(event, Connect):
            self._sockets[event.conn] = envelope.socket
        elif isinstance(event, Disconnect):
            self._sockets.pop(event.conn, None)
        result = self._result(event) if envelope.reply is not None else None
        if self.journal is None:
            self._decided(envelope, result, effects, True)
        else:
            self._closing.update(effect.conn for effect in effects if type(effect) is Close)
            self.journal.record(self, event, now, lambda ok: self._decided(envelope, result, effects, ok))
        if type(event) is Restart and event.conn is None:
            self.relinquish(SERVICE_RESTART, "server restart")

    def _decided(self, envelope: Envelope, result: Any, effects: list[Effect], ok: bool) -> None:
        """Carry out a decision (``ok``), or drop it: refused, it never happened (another node owns the call)."""
        reply = envelope.reply
        if reply is not None and not reply.done():
            if ok:
                reply.set_result(result)
            else:
                reply.set_exception(CallMoved())
        if ok:
            self._carry_out(effects)

    def _result(self, event: Event) -> CallSummary | Joined | str:
        if isinstance(event, Identify):
            return self.call.authenticate(event.token_digest).peer_id
        summary = self.summary()
        if isinstance(event, Join):
            joiner = self.call.participant(event.peer_id)
            return Joined(joiner.role, joiner.polite, summary)
        return summary

    def _refuse_moved(self, envelope: Envelope) -> None:
        """An envelope for a call that left this node: ask the sender to find it where it lives now."""
        if envelope.reply is not None and not envelope.reply.done():
            envelope.reply.set_exception(CallMoved())
        elif envelope.reply is None and envelope.socket is not None and isinstance(envelope.event, Connect):
            envelope.socket.close(*(self._released or (SERVICE_RESTART, "call moved")))

    def _refuse(self, envelope: Envelope, exc: SignalError) -> None:
        if envelope.reply is not None:
            if not envelope.reply.done():
                envelope.reply.set_exception(exc)
        elif envelope.socket is not None:
            envelope.socket.reply_error(exc.code, exc.message)

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            if type(effect) is Send:
                socket = self._sockets.get(effect.conn)
                if socket is not None:
                    socket.send(effect.text)
            elif type(effect) is Close:
                self._closing.discard(effect.conn)
                socket = self._sockets.pop(effect.conn, None)
                if socket is not None:
                    socket.close(effect.code, effect.reason)
            elif type(effect) is StatusChanged:
                self._status_changed(effect)
            elif type(effect) is Notify:
                self._notify(effect)

    def _notify(self, effect: Notify) -> None:
        if effect.peer_id is not None:
            self.log.info("call %s: %s %s (%s)", self.call_id, effect.event, effect.peer_id, effect.reason or "-")
        if self._on_notify is not None:
            self._on_notify(self, effect)

    def _status_changed(self, effect: StatusChanged) -> None:
        if effect.new is Status.ENDED:
            self._alive = False
            self.log.info(
                "call %s ended (%s) after %.1f s", self.call_id, effect.reason,
                time.monotonic() - self.call.created,
            )
        else:
            self.log.info("call %s is %s", self.call_id, effect.new.value)
        self._on_status(self, effect)

    def _teardown(self, crashed: bool) -> None:
        self._alive = False
        if not self.finished_deciding.done():
            self.finished_deciding.set_result(None)
        self.call.drop_held()
        if self._timer is not None:
            self._timer.cancel()
        if crashed:
            ended = messages.to_json(messages.call_ended(self.call_id, "error"))
            for socket in self._sockets.values():
                socket.send(ended)
                socket.close(INTERNAL_ERROR, "internal error")
            self._sockets.clear()
            if self.call.status is not Status.ENDED:
                old = self.call.status
                self.call.status, self.call.end_reason = Status.ENDED, "error"
                self._notify(Notify("call_ended", None, "error"))
                self._on_status(self, StatusChanged(old, Status.ENDED, "error"))
        while self._queue.qsize():
            envelope = self._queue.get_nowait()
            if self._released is not None:
                self._refuse_moved(envelope)
                continue
            if envelope.reply is not None and not envelope.reply.done():
                envelope.reply.set_exception(CallEnded())
            if envelope.socket is not None and isinstance(envelope.event, Connect):
                envelope.socket.close(4404, "call_not_found")
        code, reason = self._released or (1000, "call ended")
        for socket in self._sockets.values():
            socket.close(code, reason)
        self._sockets.clear()
        self.finished.set_result(None)

    def hand_over(self, settled: bool = True) -> dict[str, Any] | None:
        """The call as data for its new owner, and stop; None (and nothing changes) unless it is idle.

        Idle: alive, nothing queued and no socket attached, so nothing is in flight and
        there is no one to tell; ``settled``: the journal, if any, waits for nothing of it.
        Runs between two envelopes, like ``summary``.
        """
        # _unhandled, not the queue's size: an envelope handed straight to the waiting loop is in neither.
        if not self._alive or not settled or self._unhandled or self._sockets or self.call.connected:
            return None
        data = call_to_dict(self.call, time.monotonic(), time.time())
        data["created_at"] = self.created_at
        self.call.drop_held()  # the held frames travel with the data, and count against the new owner's budget
        self.relinquish(1000, "call moved")
        return data

    def relinquish(self, code: int, reason: str) -> None:
        """Stop at once without ending the call, which another node owns now.

        Pending asks fail with ``CallEnded``; sockets are closed with ``code`` so that the
        clients reconnect, and find the call where it lives now.
        """
        if self._alive:
            self._alive = False
            self._released = (code, reason)
            try:
                self._queue.put_nowait(_WAKE_UP)
            except QueueFull:
                pass  # the loop takes an envelope soon anyway, and stops there

    async def shutdown(self) -> None:
        """End the call because the server stops; sockets get ``server_shutdown`` and 1001.

        Waits for room in the inbox, so envelopes already queued are handled first.
        """
        if self._alive:
            await self._queue.put(Envelope(Shutdown()))
            self._unhandled += 1

    async def restart(self) -> None:
        """Stop here without ending the call, which another node carries on: every socket gets
        ``server_shutdown`` with ``reconnect`` and 1012. Returns once the loop has decided that
        (what it decides is carried out as the journal releases it)."""
        if self._alive:
            await self._queue.put(Envelope(Restart()))
            self._unhandled += 1
            await asyncio.shield(self.finished_deciding)
