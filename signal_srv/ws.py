"""The WebSocket edge: ``SignalingSocket`` attaches a participant's socket to its call's actor.

Authentication and unknown calls are reported after the upgrade with close codes (a
browser cannot read a refused handshake's status): 4400 bad query, 4401 wrong peer or
token, 4404 no such call, 4409 replaced by a newer socket of the same participant.

Every frame a socket receives, control frames and fragments included, is charged to its
participant's and its address's ``Budget`` before anything else is done with it
(``protocol.GuardedProtocol``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Awaitable
from urllib.parse import urlparse

from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from signal_srv import messages
from signal_srv.actor import new_conn
from signal_srv.call import Connect, Disconnect, Receive
from signal_srv.config import Config
from signal_srv.errors import (
    CallBusy,
    CallEnded,
    CallMoved,
    CallNotFound,
    ShuttingDown,
    SignalError,
    Unauthorized,
    Unavailable,
)
from signal_srv.headers import add_security_headers
from signal_srv.hosts import host_allowed
from signal_srv.limits import Budget, Limits
from signal_srv.logs import redact
from signal_srv.metrics import Metrics
from signal_srv.peer_tokens import token_digest
from signal_srv.placement import CallRef
from signal_srv.protocol import GuardedProtocol
from signal_srv.registry import Registry

__all__ = ["SignalingSocket"]

logger = logging.getLogger(__name__)

# RFC 6455 section 7.4.1 codes, and the application codes documented in the README.
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
BAD_QUERY = 4400
SERVICE_RESTART = 1012
UNAUTHORIZED = 4401
CALL_NOT_FOUND = 4404

# Frames refused by the rate limit, in a row, before the socket is closed with 1008.
RATE_STRIKES = 10

# Times a connect looks its call up again because the call moved to another node meanwhile.
MOVE_RETRIES = 3


def _drop_unstarted_frames(stream: IOStream) -> int:
    """Drop the queued frames of which no byte has been written yet; return the bytes dropped.

    Every frame is one ``IOStream.write``, whose future records the stream offset where the
    frame ends. The first of those beyond what was written ends the frame now on the wire:
    it is kept whole (cut in the middle, the peer would read payload as frame headers), and
    everything queued after it is dropped, its write futures failed with ``StreamClosedError``.
    (With permessage-deflate context takeover this would break the stream; sockets here are
    not compressed.)
    """
    written = stream._total_write_done_index
    pending = stream._write_futures
    keep_until = next((end for end, _ in pending if end > written), written)
    buffer = stream._write_buffer
    keep = keep_until - written
    dropped = len(buffer) - keep
    if dropped <= 0:
        return 0
    head = bytearray()
    while len(head) < keep:
        with buffer.peek(keep - len(head)) as view:
            head += view
            size = len(view)
        buffer.advance(size)
    buffer.clear()
    buffer.append(head)
    stream._total_write_index = keep_until
    while pending and pending[-1][0] > keep_until:
        pending.pop()[1].set_exception(StreamClosedError())
    return dropped


class SignalingSocket(WebSocketHandler):
    """``GET /apiv2/ws?call_id=&peer_id=&token=``: one participant's signaling socket."""

    __slots__ = ("registry", "config", "limits", "metrics", "conn", "awaiting_pong_since", "_actor", "_closed",
                 "_counted", "_ip", "_budget", "_ip_budget", "_strikes")  # see GuardedProtocol's

    def initialize(self, registry: Registry, config: Config, limits: Limits, metrics: Metrics) -> None:
        self.registry = registry
        self.config = config
        self.limits = limits
        self.metrics = metrics
        self.conn = new_conn()
        self.awaiting_pong_since: float | None = None
        self._actor: CallRef | None = None
        self._closed = False
        self._counted = False
        self._ip: str | None = None
        self._budget: Budget | None = None
        self._ip_budget: Budget | None = None
        self._strikes = 0

    def set_default_headers(self) -> None:
        add_security_headers(self)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Tornado's own line would print the request URL, and with it the peer token.
        logger.error("uncaught exception in socket %s", redact(self.request.uri or ""), exc_info=(typ, value, tb))

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if isinstance(protocol, WebSocketProtocol13):
            return GuardedProtocol(self, protocol.mask_outgoing, protocol.params)
        return protocol

    def _stream(self) -> IOStream | None:
        """The upgraded connection's stream (None once closed)."""
        return getattr(self.ws_connection, "stream", None)

    def check_origin(self, origin: str) -> bool:
        """``allowed_origins``, or the same origin on one of ``allowed_hosts`` (``Host`` alone proves nothing)."""
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        if super().check_origin(origin) and host_allowed(urlparse(origin).hostname or "", self.config.allowed_hosts):
            return True
        logger.warning("refused a socket from origin %s", origin[:200])
        return False

    def prepare(self) -> None:
        """Refuse a handshake before upgrading it: while the server stops, with ``503
        shutting_down``; over its address's connect rate, with ``429`` (the cheapest answer to a
        connect flood: a browser sees a failed connect and backs off).

        (A draining server closes every connection after its answer, which would turn a ``101``
        into ``Connection: close``, a broken upgrade; a plain 503 tells the client to go
        elsewhere or come back, as a REST request would be told.)
        """
        if self.registry.closing:
            error = ShuttingDown()
            self.set_status(error.status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.set_header("Retry-After", "1")
            self.finish(messages.to_json({"error": {"code": error.code, "message": error.message}}))
            return
        now = time.monotonic()
        self._ip_budget = self.limits.budgets.of_ip(self.request.remote_ip or "", now)
        wait = self._ip_budget.connect(now)
        if wait:
            self.metrics.rate_limited["ws_ip_connect"] += 1
            self.set_status(429)
            self.set_header("Retry-After", str(math.ceil(wait)))
            self.finish()

    async def open(self, *args: Any, **kwargs: Any) -> None:
        """Check the socket in, cheapest checks first; only a socket whose token is right
        counts against ``max_sockets`` and reaches the call's inbox."""
        stream = self._stream()
        assert stream is not None
        stream.max_write_buffer_size = self.config.ws_write_buffer_limit
        # The handshake's answer is on the wire; its headers (security headers included, about
        # 1.5 KB) would otherwise stay with the socket for its whole life.
        self._headers = HTTPHeaders()
        checked = await self._checked_request()
        if checked is None:
            return
        actor, call_id, peer_id, digest, resume_from = checked
        if not actor.vouches_for(digest, peer_id):
            self._refuse_unauthorized()
            return
        if not self._check_in(call_id, peer_id):
            return
        for attempt in range(MOVE_RETRIES):
            if attempt:  # the call moved to another node meanwhile: look it up where it lives now
                found = await self._find(call_id)
                if found is None:
                    return
                actor = found
            try:
                # Set before the await, so a close that races the join still reaches the actor.
                self._actor = actor
                await actor.ask(Connect(peer_id, digest, self.conn, resume_from), self.config.ask_timeout, socket=self)
            except CallMoved:
                self._actor = None  # not attached
                continue
            except CallNotFound:
                self._refuse(CALL_NOT_FOUND, "call_not_found")
            except Unauthorized:
                self._actor = None
                self._refuse_unauthorized()
            except CallBusy:
                self._refuse(TRY_AGAIN_LATER, "call_busy")
            except Unavailable:
                self._refuse(TRY_AGAIN_LATER, "unavailable")
            else:
                logger.info("socket of %s joined call %s", peer_id, call_id)
            return
        self._refuse(SERVICE_RESTART, "call moved")

    async def _checked_request(self) -> tuple[CallRef, str, str, bytes, int | None] | None:
        """The call, call_id, peer_id, the token's digest and resume point; or None, the socket closed."""
        ip = self.request.remote_ip or ""
        if not self.limits.sockets_per_ip.acquire(ip):
            self.metrics.rate_limited["ws_ip"] += 1
            self.close(TRY_AGAIN_LATER, "too many sockets from your address")
            return None
        self._ip = ip
        if self.registry.closing:
            self.close(TRY_AGAIN_LATER, "server busy")
            return None
        call_id = self.get_query_argument("call_id", "")
        peer_id = self.get_query_argument("peer_id", "")
        token = self.get_query_argument("token", "")
        last_seq = self.get_query_argument("last_seq", None)
        if not (call_id and peer_id and token):
            self.close(BAD_QUERY, "call_id, peer_id and token are required")
            return None
        digest = token_digest(token)  # the token itself goes no further
        resume_from = None if last_seq is None else -1 if last_seq == "-1" else messages.whole_number(last_seq)
        if last_seq is not None and resume_from is None:
            self.close(BAD_QUERY, "last_seq must be a whole number")
            return None
        call = await self._find(call_id)
        return None if call is None else (call, call_id, peer_id, digest, resume_from)

    async def _find(self, call_id: str) -> CallRef | None:
        """The call, here or on its node; or None, and the socket is closed (or was, meanwhile)."""
        try:
            call = await self.registry.find(call_id)
        except CallNotFound:
            self.close(CALL_NOT_FOUND, "call_not_found")
            return None
        except ShuttingDown:
            self.close(TRY_AGAIN_LATER, "server busy")  # it began to stop while this socket opened
            return None
        except Unavailable:
            self.close(TRY_AGAIN_LATER, "unavailable")
            return None
        if self._closing():
            return None  # the client went away, or this socket was told to reconnect, while the call was looked up
        return call

    def _check_in(self, call_id: str, peer_id: str) -> bool:
        """Take a connect from the participant's budget and a place under ``max_sockets``."""
        now = time.monotonic()
        budget = self.limits.budgets.of(call_id, peer_id, now)
        wait = budget.connect(now)
        if wait:
            self.metrics.rate_limited["ws_connect"] += 1
            self.close(TRY_AGAIN_LATER, f"reconnecting too fast; retry in {wait:.1f} s")
            return False
        if self.metrics.sockets >= self.limits.max_sockets:
            self.close(TRY_AGAIN_LATER, "server busy")
            return False
        self.metrics.sockets += 1
        self._counted = True
        self._budget = budget
        return True

    def _refuse_unauthorized(self) -> None:
        """4401, or 1008 once this address is over its wrong-token limits."""
        wait = self.limits.auth_failures.take(self._ip or "", time.monotonic())
        if wait:
            self.metrics.rate_limited["auth"] += 1
            self.close(POLICY_VIOLATION, f"too many wrong tokens from your address; retry in {wait:.0f} s")
        else:
            self.close(UNAUTHORIZED, "unauthorized")

    def _closing(self) -> bool:
        """Closed, or closing (a close this server began is complete only once the client answers it)."""
        return self._closed or self.ws_connection is None or self.ws_connection.is_closing()

    def _refuse(self, code: int, reason: str) -> None:
        self._actor = None
        self.close(code, reason)

    def heartbeat(self, now: float) -> None:
        """Send a protocol ping; the actor drops the socket if no pong comes in time."""
        if self.awaiting_pong_since is None:
            self.awaiting_pong_since = now
        try:
            self.ping()
        except WebSocketClosedError:
            pass
        except StreamBufferFullError:
            self._close_slow_reader()

    def on_pong(self, data: bytes) -> None:
        self.awaiting_pong_since = None

    def abort(self) -> None:
        """Drop a dead peer's connection at once, without waiting for a closing handshake."""
        stream = self._stream()
        if stream is not None:
            stream.close()

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Hand the frame to the actor at once; only a full inbox returns an awaitable.

        Tornado awaits a returned awaitable before it reads the next frame, which keeps the
        socket's order and applies back-pressure; returning None spares a Task per frame.
        """
        self.awaiting_pong_since = None
        try:
            return self._receive(message)
        except Exception:
            self._internal_error()
            return None

    def _internal_error(self) -> None:
        # An exception escaping on_message would drop the TCP connection without a close frame.
        logger.exception("unexpected error handling a frame; closing the socket")
        self.close(INTERNAL_ERROR, "internal error")

    def _receive(self, message: str | bytes) -> Awaitable[None] | None:
        if isinstance(message, bytes):
            self.close(UNSUPPORTED_DATA, "binary frames are not accepted")
            return None
        try:
            parsed = messages.parse(message, self.config.max_message_size)
        except SignalError as exc:
            self.reply_error(exc.code, exc.message)
            return None
        actor = self._actor
        if actor is None:
            return None
        event = Receive(self.conn, parsed)
        try:
            if actor.tell(event, socket=self):
                return None
        except (CallEnded, CallMoved):
            return None  # the actor closes this socket as it stops
        return self._put_when_room(actor, event)

    async def _put_when_room(self, actor: CallRef, event: Receive) -> None:
        try:
            await actor.put(event, socket=self)
        except (CallEnded, CallMoved):
            pass
        except Exception:
            self._internal_error()

    def admit(self, size: int) -> bool:
        """Charge one received frame of ``size`` bytes to the participant's budget, then its address's.

        False if it is over: the frame is dropped and answered with a ``rate_limited``
        error, and after ``RATE_STRIKES`` such frames in a row the socket is closed with 1008.
        """
        budget, ip_budget = self._budget, self._ip_budget
        if budget is None or ip_budget is None:
            return True
        now = time.monotonic()
        wait = budget.charge(now, size) or ip_budget.charge(now, size)
        if not wait:
            self._strikes = 0
            return True
        self.metrics.rate_limited["ws"] += 1
        self._strikes += 1
        if self._strikes >= RATE_STRIKES:
            self.close(POLICY_VIOLATION, "rate limit exceeded")
        else:
            self.reply_error("rate_limited", f"too many frames or bytes per second; retry in {wait:.2f} s")
        return False

    def reply_error(self, code: str, message: str) -> None:
        """Answer a bad frame with an ``error`` frame; the socket stays open."""
        self.metrics.errors[code] += 1
        self.send(messages.to_json(messages.error(code, message)))

    def on_close(self) -> None:
        self._closed = True
        if self._counted:
            self._counted = False
            self.metrics.sockets -= 1
        if self._ip is not None:
            self.limits.sockets_per_ip.release(self._ip)
            self._ip = None
        self._detach()

    def _detach(self) -> None:
        """Tell the call (once) that this socket is gone, so its participant counts as disconnected."""
        actor, self._actor = self._actor, None
        if actor is None:
            return
        try:
            if not actor.tell(Disconnect(self.conn)):
                # A disconnect must not be lost, or the participant would look connected forever.
                self.registry.defer(actor.put(Disconnect(self.conn)))
        except (CallEnded, CallMoved):
            pass

    def send(self, text: str) -> None:
        """Send a frame without waiting; a reader too slow to keep up is closed with 1013."""
        protocol = self.ws_connection
        try:
            if not isinstance(protocol, GuardedProtocol):
                raise WebSocketClosedError()
            protocol.send_text(text)
        except WebSocketClosedError:
            logger.debug("dropped a frame for a closed socket")
        except StreamBufferFullError:
            self._close_slow_reader()

    def _close_slow_reader(self) -> None:
        logger.warning("closing a socket whose reader fell %d bytes behind", self.config.ws_write_buffer_limit)
        self.close_with_grace(TRY_AGAIN_LATER, "slow reader", drop_unsent=True)

    def close_with_grace(self, code: int, reason: str, *, drop_unsent: bool = False) -> None:
        """Close with ``code``; cut the connection if the closing handshake is not done in ``ws_close_grace``
        (instead of the ``CLOSE_GRACE`` every other close gets).

        The participant counts as disconnected at once. With ``drop_unsent``, queued frames
        not yet started are dropped first, so that the close frame is next on the wire and the
        memory they held is freed now; a reader that reads again within the grace gets it.
        """
        protocol, stream = self.ws_connection, self._stream()
        if protocol is None or stream is None or protocol.is_closing():
            return
        if drop_unsent:
            logger.debug("dropped %d queued bytes before closing with %d", _drop_unstarted_frames(stream), code)
        stream.max_write_buffer_size = None  # the close frame must not be refused
        self._detach()
        if isinstance(protocol, GuardedProtocol):
            protocol.grace = self.config.ws_close_grace
        self.close(code, reason)
