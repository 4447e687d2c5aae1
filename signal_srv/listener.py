"""The HTTP server's TCP edge: a cap on connections per client, and an accept loop that
pauses instead of spinning when the process runs out of file descriptors.

Tornado's accept handler lets ``EMFILE`` escape: the listening socket stays readable, so the
loop calls it again at once, logging a traceback each time, and starves every connection
already open. Here accepting pauses for ``ACCEPT_PAUSE`` seconds instead (one warning per
burst, at most one per ``BURST_GAP``; ``signal_srv_accept_paused_total`` counts every pause)
and resumes as soon as a retry succeeds.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any, Callable, Iterable

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from signal_srv.drain import DrainingHTTPServer
from signal_srv.limits import OpenCount
from signal_srv.metrics import Metrics

__all__ = ["ACCEPT_PAUSE", "GuardedHTTPServer"]

logger = logging.getLogger(__name__)

ACCEPT_PAUSE = 0.1
# At most one warning per this many seconds, however often accepting pauses and resumes.
BURST_GAP = 60.0
ACCEPTS_PER_WAKEUP = 128  # Tornado's own batch (netutil._DEFAULT_BACKLOG)
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class GuardedHTTPServer(DrainingHTTPServer):
    """``DrainingHTTPServer`` with ``connections_per_ip`` (0: none) open connections per TCP peer, counted
    until a request ends the connection or upgrades it to a WebSocket, and a pausing accept loop."""

    def initialize(  # type: ignore[override]
        self, *args: Any, metrics: Metrics, connections_per_ip: int = 0, **kwargs: Any
    ) -> None:
        super().initialize(*args, **kwargs)
        self.metrics = metrics
        self.per_ip = OpenCount(connections_per_ip)
        self._peer_of: dict[IOStream, str] = {}

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        peer = address[0] if isinstance(address, tuple) else ""
        if not self.per_ip.acquire(peer):
            self.metrics.rate_limited["http_ip"] += 1
            stream.close()
            return
        self._peer_of[stream] = peer
        super().handle_stream(stream, address)

    def on_close(self, server_conn: Any) -> None:
        peer = self._peer_of.pop(server_conn.stream, None)
        if peer is not None:
            self.per_ip.release(peer)
        super().on_close(server_conn)

    def _accept_on(self, sock: socket.socket) -> Callable[[], None]:
        """Start accepting on ``sock``; the returned callable stops it (as Tornado's does)."""
        return _Acceptor(sock, self._handle_connection, self.metrics).stop


class _Acceptor:
    """Accepts connections on one listening socket and hands them to ``handle``."""

    def __init__(self, sock: socket.socket, handle: Callable[[socket.socket, Any], None], metrics: Metrics) -> None:
        self.sock = sock
        self.handle = handle
        self.metrics = metrics
        self.loop = IOLoop.current()
        self.stopped = False
        self.timer: object | None = None
        self.paused_since: float | None = None
        self.pauses = 0
        self.warned_at = -BURST_GAP
        self.loop.add_handler(sock, self._accept, IOLoop.READ)

    def _accept(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self.stopped:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                self._pause(exc)
                return
            if self.paused_since is not None:
                logger.info("accepting connections again after %.1f s (%d pauses)",
                            time.monotonic() - self.paused_since, self.pauses)
                self.paused_since, self.pauses = None, 0
            self.handle(connection, address)

    def _pause(self, exc: OSError) -> None:
        self.loop.remove_handler(self.sock)
        self.timer = self.loop.call_later(ACCEPT_PAUSE, self._resume)
        self.pauses += 1
        self.metrics.accept_paused += 1
        now = time.monotonic()
        if self.paused_since is None:
            self.paused_since = now
        if now - self.warned_at >= BURST_GAP:
            self.warned_at = now
            logger.warning("cannot accept connections (%s); pausing accepts until descriptors free up", exc.strerror)

    def _resume(self) -> None:
        self.timer = None
        if not self.stopped:
            self.loop.add_handler(self.sock, self._accept, IOLoop.READ)

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.loop.remove_timeout(self.timer)
        else:
            self.loop.remove_handler(self.sock)
