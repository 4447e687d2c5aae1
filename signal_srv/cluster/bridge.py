"""The bridge between a socket or request on one node and the call's owner on another.

Each node reads one Redis Stream, its inbox, and every other node appends to it through
its ``Outbox``, the node's single ordered path of writes. A stream is durable and ordered:
a reader that lost its connection resumes from the last entry id it handled, so no frame
is dropped or reordered by a blip (pub/sub would drop them silently); a message that an
outbox sent twice (its first reply was lost) carries the same sender number and is dropped.

- Socket side: ``RemoteCall`` stands in for the owner's actor; the socket's events go to
  the owner's inbox and the owner's frames for it come back through this node's inbox.
- Owner side: a ``RemoteSocket`` stands in for the socket in the actor; its ``send``,
  ``close`` and ``reply_error`` append to the socket's node's inbox.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from signal_srv.actor import CallActor, CallSummary, Socket, new_conn
from signal_srv.call import Connect, Disconnect, End, Event, Identify, Leave, Restart
from signal_srv.cluster.directory import inbox_key
from signal_srv.cluster.link import RedisLink
from signal_srv.cluster.outbox import Outbox
from signal_srv.cluster.stats import ClusterStats
from signal_srv.cluster.wire import (
    Describe,
    decode_error,
    decode_event,
    decode_result,
    encode_error,
    encode_event,
    encode_result,
)
from signal_srv.errors import CallBusy, CallEnded, CallMoved, CallNotFound, SignalError, Unauthorized, Unavailable

if TYPE_CHECKING:
    from signal_srv.registry import Registry

__all__ = ["Bridge", "RemoteCall", "RemoteSocket", "SERVICE_RESTART"]

logger = logging.getLogger(__name__)

SERVICE_RESTART = 1012  # RFC 6455: the server is restarting; reconnect
RETRY_PAUSE = 0.2
BATCH = 500
DESCRIBE_TIMEOUT = 30.0  # the asker gives up first (after its ask_timeout); this only bounds the wait here


class RemoteSocket:
    """On the owner: a participant's socket that lives on another node."""

    awaiting_pong_since: float | None = None  # the socket's own node runs its heartbeat

    def __init__(self, bridge: Bridge, node: str, conn: int, call_id: str) -> None:
        self.bridge = bridge
        self.node = node
        self.remote_conn = conn
        self.call_id = call_id
        self.conn = new_conn()

    def send(self, text: str) -> None:
        self.bridge.to_node(self.node, {"k": "send", "conn": self.remote_conn, "text": text})
        self.bridge.stats.bridged["out"] += 1

    def reply_error(self, code: str, message: str) -> None:
        self.bridge.to_node(self.node, {"k": "err", "conn": self.remote_conn, "code": code, "message": message})

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.bridge.forget_remote(self)
        self.bridge.to_node(self.node, {"k": "close", "conn": self.remote_conn, "code": code, "reason": reason})

    def heartbeat(self, now: float) -> None:
        pass

    def abort(self) -> None:
        pass


@dataclasses.dataclass(frozen=True, slots=True)
class _Moved:
    """The owner's answer to a connect that took the call over: the connect's answer, from here."""

    reply: asyncio.Future[Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    future: asyncio.Future[Any]
    call: RemoteCall
    event: Event | Describe
    socket: Socket | None


def _wrong_token(actor: CallActor, event: Event | Describe) -> bool:
    """A participant's request or connect whose token digest is none of the call's participants'
    (the connect's own peer's): the owner refuses it before the call's inbox, as a local edge does."""
    if isinstance(event, Connect):
        return not actor.vouches_for(event.token_digest, event.peer_id)
    digest = event.token_digest if isinstance(event, (Leave, Identify, End)) else None  # None: an administrator's end
    return digest is not None and not actor.vouches_for(digest)


def _never(actor: CallActor, node: str, done: Callable[[dict[str, Any], int], None]) -> bool:
    return False


def _cannot_adopt(data: dict[str, Any], epoch: int) -> CallActor:
    raise CallNotFound()


@dataclasses.dataclass(slots=True)
class _Bridged:
    socket: Socket
    owner: str
    call_id: str


class RemoteCall:
    """On a socket's or request's node: a call whose actor runs on ``owner``."""

    def __init__(self, bridge: Bridge, call_id: str, owner: str) -> None:
        self.bridge = bridge
        self.call_id = call_id
        self.owner = owner
        self.local: CallActor | None = None  # set when the call moved here on this socket's connect

    def tell(self, event: Event, socket: Socket | None = None) -> bool:
        if self.local is not None:
            return self.local.tell(event, socket)
        self.bridge.tell(self, event)
        return True

    async def put(self, event: Event, socket: Socket | None = None) -> None:
        if self.local is not None:
            await self.local.put(event, socket)
        else:
            self.bridge.tell(self, event)

    async def ask(self, event: Event, timeout: float, socket: Socket | None = None) -> Any:
        if self.local is not None:
            return await self.local.ask(event, timeout, socket)
        return await self.bridge.ask(self, event, timeout, socket)

    async def describe(self, timeout: float, peers: bool = False) -> CallSummary:
        summary: CallSummary = await self.bridge.ask(self, Describe(peers), timeout, None)
        return summary

    def vouches_for(self, digest: bytes, peer_id: str | None = None) -> bool:
        """Token digests are known to the owner only: none is refused here, unless the call moved here."""
        return self.local.vouches_for(digest, peer_id) if self.local is not None else True


class Bridge:
    """This node's inbox reader and the two halves of every bridged call."""

    def __init__(
        self, node_id: str, link: RedisLink, outbox: Outbox, stats: ClusterStats,
        heartbeat_interval: float, heartbeat_timeout: float,
    ) -> None:
        self.node_id = node_id
        self.link = link
        self.outbox = outbox
        self.stats = stats
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.registry: Registry | None = None
        # Set by the placement: hand an idle call over to a node (its data and new epoch, once
        # the epoch moved), adopt a call handed to us, where a call that left us went,
        # whether a call ended here (rather than left), and what to do about a node that
        # let a call go or is leaving.
        self.hand_over: Callable[[CallActor, str, Callable[[dict[str, Any], int], None]], bool] = _never
        self.adopt: Callable[[dict[str, Any], int], CallActor] = _cannot_adopt
        self.moved_to: Callable[[str], str | None] = lambda call_id: None
        self.ended_here: Callable[[str], bool] = lambda call_id: True
        self.owner_doubtful: Callable[[str], None] = lambda node: None
        self._inbox = inbox_key(node_id)
        self.inbox_ready = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._arrivals: dict[str, asyncio.Future[CallActor | None]] = {}  # calls a connect here may take over
        self._held_back: dict[str, list[dict[str, Any]]] = {}  # messages for those calls, until they arrive
        self._deferred: set[asyncio.Task[None]] = set()
        self._bridged: dict[int, _Bridged] = {}  # socket side: conn -> our socket, bridged to an owner
        self._remote: dict[tuple[str, int], RemoteSocket] = {}  # owner side: (node, conn) -> stand-in
        self._heard: dict[str, int] = {}  # sender -> the number of its last message handled here

    def to_node(self, node: str, message: dict[str, Any]) -> None:
        self.outbox.append(inbox_key(node), message)

    # Socket side ------------------------------------------------------------------------

    def tell(self, call: RemoteCall, event: Event) -> None:
        if isinstance(event, Disconnect):
            self._bridged.pop(event.conn, None)
        else:
            self.stats.bridged["out"] += 1
        self.to_node(call.owner, {"k": "tell", "from": self.node_id, "call": call.call_id, "ev": encode_event(event)})

    async def ask(self, call: RemoteCall, event: Event | Describe, timeout: float, socket: Socket | None) -> Any:
        """Send ``event`` to the owner and wait for its answer (``CallBusy`` if late, ``Unavailable`` if cut off)."""
        request = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request] = _Pending(future, call, event, socket)
        conn = event.conn if isinstance(event, Connect) else None
        if conn is not None and socket is not None:
            self._bridged[conn] = _Bridged(socket, call.owner, call.call_id)
        # A socket's connect offers to take the call over: the owner hands it over if idle.
        arrival = self._expect_arrival(call.call_id) if conn is not None else None
        self.to_node(call.owner, {"k": "ask", "id": request, "from": self.node_id, "call": call.call_id,
                                  "ev": encode_event(event), "move": conn is not None})
        try:
            answer = await asyncio.wait_for(future, timeout)
            if isinstance(answer, _Moved):  # the call is ours now, and the connect already in its inbox
                answer = await asyncio.wait_for(asyncio.shield(answer.reply), timeout)
        except TimeoutError:
            if not self.link.reachable:
                raise Unavailable() from None
            raise CallBusy("the call did not answer in time") from None
        except SignalError as exc:
            if conn is not None:
                self._bridged.pop(conn, None)
            if isinstance(exc, CallMoved):
                self.owner_doubtful(call.owner)  # it let the call go: look it up afresh
            raise
        finally:
            self._pending.pop(request, None)
            if arrival is not None:
                self._arrived(call.call_id, arrival, None)  # a no-op if the call arrived
        return answer

    def _expect_arrival(self, call_id: str) -> asyncio.Future[CallActor | None]:
        arrival: asyncio.Future[CallActor | None] = asyncio.get_running_loop().create_future()
        if call_id not in self._arrivals:
            self._arrivals[call_id] = arrival
        return arrival

    async def arriving(self, call_id: str) -> CallActor | None:
        """The call, if a connect on this node is taking it over right now (between the epoch move and adoption)."""
        arrival = self._arrivals.get(call_id)
        return await asyncio.shield(arrival) if arrival is not None else None

    def _arrived(self, call_id: str, arrival: asyncio.Future[CallActor | None], actor: CallActor | None) -> None:
        """The call a connect offered to take over is here now (or not): handle what waited for it, in order."""
        if self._arrivals.get(call_id) is arrival:
            del self._arrivals[call_id]
        if not arrival.done():
            arrival.set_result(actor)
        for message in self._held_back.pop(call_id, ()):
            if message["k"] == "ask":
                self._on_ask(message)
            else:
                self._defer(self._on_tell(message))

    def _defer(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._deferred.add(task)
        task.add_done_callback(self._deferred.discard)


    def _on_reply(self, message: dict[str, Any]) -> None:
        pending = self._pending.get(message["id"])
        if "moved" in message:
            # Adopted at once, even if the asker gave up, and with the connect queued at once,
            # before the next inbox entry (which may be for this call, and find it idle).
            actor = self.adopt(message["moved"], message["epoch"])
            arrival = self._arrivals.get(actor.call_id)
            if pending is not None and isinstance(pending.event, Connect) and not pending.future.done():
                self._bridged.pop(pending.event.conn, None)
                pending.call.local = actor
                try:
                    pending.future.set_result(_Moved(actor.ask_nowait(pending.event, pending.socket)))
                except SignalError as exc:
                    pending.future.set_exception(exc)
            if arrival is not None:
                self._arrived(actor.call_id, arrival, actor)
        elif pending is None or pending.future.done():
            return
        elif "error" in message:
            pending.future.set_exception(decode_error(message["error"]))
        else:
            pending.future.set_result(decode_result(message["result"]))

    def _on_frame(self, message: dict[str, Any]) -> None:
        bridged = self._bridged.get(message["conn"])
        if bridged is None:
            return
        kind = message["k"]
        if kind == "send":
            self.stats.bridged["in"] += 1
            bridged.socket.send(message["text"])
        elif kind == "err":
            bridged.socket.reply_error(message["code"], message["message"])
        else:
            del self._bridged[message["conn"]]
            bridged.socket.close(message["code"], message["reason"])

    # Owner side -------------------------------------------------------------------------

    def _actor(self, call_id: str) -> CallActor | None:
        assert self.registry is not None
        return self.registry.local(call_id)

    def _on_ask(self, message: dict[str, Any]) -> None:
        reply_to, request = message["from"], message["id"]
        actor = self._actor(message["call"])
        if actor is None and self._forward(message):
            return
        event = decode_event(message["ev"])
        socket: RemoteSocket | None = None
        wrong_token = actor is not None and _wrong_token(actor, event)  # refused below, and moves nothing
        # A connect moves an idle call to the socket's node (unless it was forwarded back here: it stays).
        if actor is not None and not wrong_token and message.get("move") and reply_to != self.node_id:
            if self.hand_over(actor, reply_to, lambda data, epoch: self._handed_over(data, epoch, reply_to, request)):
                return
        try:
            if actor is None:
                # Not held here (any more): gone for good if it ended here, else the asker looks again.
                raise CallNotFound() if self.ended_here(message["call"]) else CallMoved()
            if wrong_token:
                raise Unauthorized()  # refused before the call's inbox, as on the node that got it
            if isinstance(event, Describe):
                described = asyncio.ensure_future(actor.describe(DESCRIBE_TIMEOUT, event.peers))
                described.add_done_callback(lambda done: self._answered(done, reply_to, request, None))
                return
            if isinstance(event, Connect):
                socket = RemoteSocket(self, reply_to, event.conn, actor.call_id)
                self._remote[(reply_to, event.conn)] = socket
                event = dataclasses.replace(event, conn=socket.conn)
            answer = actor.ask_nowait(event, socket)
        except SignalError as exc:
            if socket is not None:
                self.forget_remote(socket)
            self._reply(reply_to, request, error=encode_error(exc))
            return
        answer.add_done_callback(lambda done: self._answered(done, reply_to, request, socket))

    def _answered(self, done: asyncio.Future[Any], reply_to: str, request: int, socket: RemoteSocket | None) -> None:
        exc = done.exception()
        if exc is None:
            self._reply(reply_to, request, result=encode_result(done.result()))
            return
        if socket is not None:
            self.forget_remote(socket)
        error = exc if isinstance(exc, SignalError) else CallBusy()
        self._reply(reply_to, request, error=encode_error(error))

    def _handed_over(self, data: dict[str, Any], epoch: int, reply_to: str, request: int) -> None:
        """Runs right after the epoch moved: the answer jumps ahead of messages forwarded meanwhile.

        If the move was refused (another node owns the call now), the asker looks the call up again."""
        answer = {"moved": data, "epoch": epoch} if epoch else {"error": encode_error(CallMoved())}
        self.outbox.append(inbox_key(reply_to), {"k": "reply", "id": request, **answer}, first=True)

    def _forward(self, message: dict[str, Any]) -> bool:
        """Pass a message for a call that moved away on to its new owner (in order); False if it did not move."""
        node = self.moved_to(message["call"])
        if node is None or node == self.node_id:
            return False
        self.to_node(node, message)
        return True

    def _reply(self, node: str, request: int, **answer: Any) -> None:
        self.to_node(node, {"k": "reply", "id": request, **answer})

    async def _on_tell(self, message: dict[str, Any]) -> None:
        actor = self._actor(message["call"])
        if actor is None and self._forward(message):
            return
        event = decode_event(message["ev"])
        conn = getattr(event, "conn", None)
        socket = self._remote.get((message["from"], conn)) if conn is not None else None
        if actor is None or socket is None or isinstance(event, Describe):
            if conn is not None and not isinstance(event, Disconnect):
                # A socket this node does not know (it dropped it, or the call left): make it reconnect.
                self.to_node(message["from"], {"k": "close", "conn": conn, "code": SERVICE_RESTART,
                                               "reason": "reconnect"})
            return
        if isinstance(event, Disconnect):
            self.forget_remote(socket)
        else:
            self.stats.bridged["in"] += 1
        event = dataclasses.replace(event, conn=socket.conn)  # type: ignore[type-var,arg-type]
        try:
            if not actor.tell(event, socket=socket):
                await actor.put(event, socket=socket)  # keeps this socket's order; waits for room
        except (CallEnded, CallMoved):
            pass

    def forget_remote(self, socket: RemoteSocket) -> None:
        if self._remote.get((socket.node, socket.remote_conn)) is socket:
            del self._remote[(socket.node, socket.remote_conn)]

    # Nodes that went away -----------------------------------------------------------------

    def nodes_gone(self, live: set[str]) -> None:
        """Close our sockets bridged to a node whose lease lapsed, fail what waits for its answers (the
        asker finds the call anew), and disconnect its sockets from our calls."""
        connecting = set()
        for pending in list(self._pending.values()):
            if pending.call.owner not in live and not pending.future.done():
                if isinstance(pending.event, Connect):
                    connecting.add(pending.event.conn)  # its socket looks the call up again, and stays open
                pending.future.set_exception(CallMoved("the call's node went away; it is taken over"))
        for conn, bridged in list(self._bridged.items()):
            if bridged.owner not in live and conn not in connecting:
                del self._bridged[conn]
                bridged.socket.close(SERVICE_RESTART, "owner node gone")
        for socket in list(self._remote.values()):
            if socket.node not in live:
                self.forget_remote(socket)
                actor = self._actor(socket.call_id)
                if actor is not None and actor.alive:
                    actor.tell(Disconnect(socket.conn))

    def owner_gone(self, call_id: str) -> None:
        """This node took ``call_id`` over: our sockets bridged to its old owner reconnect, now to us."""
        for conn, bridged in list(self._bridged.items()):
            if bridged.call_id == call_id:
                del self._bridged[conn]
                bridged.socket.close(SERVICE_RESTART, "owner node gone")

    def close_bridged(self, reason: str) -> None:
        """Close every socket bridged from here with 1012, so that each reconnects and is attached anew."""
        for conn, bridged in list(self._bridged.items()):
            del self._bridged[conn]
            bridged.socket.close(SERVICE_RESTART, reason)

    def restart_bridged(self) -> int:
        """This node stops: ask each bridged socket's owner to tell it to reconnect (``server_shutdown``
        with its ``seq``, then 1012, come back through our inbox). Returns how many were asked."""
        for conn, bridged in self._bridged.items():
            self.to_node(bridged.owner, {"k": "tell", "from": self.node_id, "call": bridged.call_id,
                                         "ev": encode_event(Restart(conn))})
        return len(self._bridged)

    def leaving(self, nodes: set[str]) -> None:
        """Tell ``nodes`` that this one gives up its lease now (they take its calls over at once)."""
        for node in nodes - {self.node_id}:
            self.to_node(node, {"k": "leaving", "from": self.node_id})

    @property
    def bridged(self) -> int:
        return len(self._bridged)

    # Loops ----------------------------------------------------------------------------------

    async def reset_inbox(self) -> None:
        """Empty this node's inbox before it takes its lease: a node id used again after a restart
        must not replay what was sent to its previous run (answers to requests it no longer has)."""
        await self.link.run(lambda r: r.delete(self._inbox))
        self.inbox_ready.set()

    async def read_inbox(self) -> None:
        """Handle this node's inbox in order, forever; after a failure resume from the last entry."""
        await self.inbox_ready.wait()
        last = "0-0"
        while True:
            client = self.link.blocking
            if client is None:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            try:
                batches: Any = await client.xread({self._inbox: last}, count=BATCH, block=self.link.block_ms)
            except Exception as exc:  # noqa: BLE001 - any failure: count it, pause, resume from `last`
                self.link.failed(exc)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self.link.succeeded()
            for _, entries in batches or ():
                for entry_id, fields in entries:
                    last = entry_id
                    await self._dispatch(json.loads(fields["m"]))

    async def _dispatch(self, message: dict[str, Any]) -> None:
        sender, number = message.get("o"), message.get("i", 0)
        if sender is not None:
            if number <= self._heard.get(sender, 0):
                return  # sent twice (its first reply was lost): handled already
            self._heard[sender] = number
        kind = message["k"]
        call_id = message.get("call")
        if call_id in self._arrivals and self._actor(call_id) is None:
            # For a call on its way here (another node may know its new owner before we do).
            self._held_back.setdefault(call_id, []).append(message)
            return
        try:
            if kind == "tell":
                await self._on_tell(message)
            elif kind == "ask":
                self._on_ask(message)
            elif kind == "reply":
                self._on_reply(message)
            elif kind == "leaving":
                self.owner_doubtful(message["from"])
            else:
                self._on_frame(message)
        except Exception:
            logger.exception("could not handle a bridged %r message", kind)

    async def heartbeat(self) -> None:
        """Ping the sockets bridged from here (the owner's actor cannot); drop the silent ones."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = time.monotonic()
            for bridged in list(self._bridged.values()):
                socket = bridged.socket
                since = socket.awaiting_pong_since
                if since is not None and now - since >= self.heartbeat_timeout:
                    socket.abort()  # its on_close tells the owner
                elif since is None:
                    socket.heartbeat(now)
