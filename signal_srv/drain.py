"""``DrainingHTTPServer``: an HTTP server that stops without cutting the requests in flight.

Tornado's ``close_all_connections()`` closes every connection, also one whose request has
arrived in part (headers without their body, say): behind a proxy that is a 502 for the
user. ``drain()`` closes only the idle keep-alive connections, lets every request that has
begun to arrive be answered, with ``Connection: close``, closes each connection once its
answer is written, and returns when none is left. The caller bounds how long that may take.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Awaitable

from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPConnection, HTTPHeaders, HTTPMessageDelegate, RequestStartLine, ResponseStartLine
from tornado.iostream import IOStream

__all__ = ["DrainingHTTPServer"]


def _has_unread_bytes(stream: IOStream) -> bool:
    """True if part of a next request has arrived: in Tornado's read buffer, or not yet read."""
    if stream._read_buffer_size > 0:
        return True
    if stream.closed():
        return False
    try:
        return bool(stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing there (BlockingIOError), or the peer is gone
        return False


class DrainingHTTPServer(HTTPServer):
    """``HTTPServer`` plus ``drain()``; it knows which connections are between requests."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self._requests: dict[object, HTTPConnection] = {}  # connection -> its request being served
        self._draining = False
        self._drained = asyncio.Event()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def drain(self) -> None:
        """Close idle connections, answer the requests that have begun, return when all are closed.

        Call ``stop()`` first, so that no new connection arrives.
        """
        self._draining = True
        self.conn_params.no_keep_alive = True  # requests whose headers arrive from now on
        for conn in list(self._connections):
            request = self._requests.get(conn)
            if isinstance(request, HTTP1Connection):
                # Its headers arrived before the drain: Tornado's own flag for "Connection: close,
                # and close after the answer" (no public way to set it once the headers are read).
                request._disconnect_on_finish = True
            elif request is None and not _has_unread_bytes(conn.stream):
                conn.stream.close()
        if self._connections:
            await self._drained.wait()

    def start_request(self, server_conn: object, request_conn: HTTPConnection) -> HTTPMessageDelegate:
        # Tornado calls this before it reads each request of a connection: the previous one is answered.
        self._requests.pop(server_conn, None)
        stream: IOStream = server_conn.stream  # type: ignore[attr-defined]
        if self._draining and not _has_unread_bytes(stream):
            stream.close()
        return _Watched(super().start_request(server_conn, request_conn), self._requests, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        self._requests.pop(server_conn, None)
        if self._draining and not self._connections:
            self._drained.set()


class _Watched(HTTPMessageDelegate):
    """Passes a request through, recording while it is being served that its connection is busy."""

    def __init__(
        self, delegate: HTTPMessageDelegate, requests: dict[object, HTTPConnection], conn: object,
        request: HTTPConnection,
    ) -> None:
        self.delegate, self.requests, self.conn, self.request = delegate, requests, conn, request

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> Awaitable[None] | None:
        self.requests[self.conn] = self.request
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()
