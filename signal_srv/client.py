"""``SignalingClient``: an asyncio client for the REST API and the signaling socket.

Used by the tests, the stress tool and scripts; the reference for front-end authors.
Every wait has a timeout.

A ``Connection`` is one socket. A numbered one (``numbered=True``) puts ``cseq`` on every
frame it sends and keeps the frames the server has not confirmed; ``resume`` carries them
to the next socket and resends what the server's ``last_cseq`` says it did not accept.
A ``Session`` does all of that by itself: it reconnects whenever the server closes for a
reason that is not final (a restart, a crash, an overload), at once with jitter after a
``server_shutdown`` that says ``reconnect``, with backoff otherwise, and moves on to the
next node it knows when one does not answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import deque
from typing import Any, Sequence
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from signal_srv.messages import to_json

__all__ = ["ApiError", "Connection", "ConnectionClosed", "DEFAULT_TIMEOUT", "FINAL_CLOSE", "Session",
           "SignalingClient"]

DEFAULT_TIMEOUT = 10.0

# Close codes after which reconnecting with the same credentials cannot help: the call
# ended, the socket was refused (bad query, token, unknown call), replaced or misbehaved.
FINAL_CLOSE = frozenset({1000, 1003, 1007, 1008, 1009, 4400, 4401, 4404, 4409})

UNACKED_LIMIT = 10_000  # numbered frames kept for a resend; older ones are forgotten
ABANDONED_CONNECT_WINDOW = 60.0  # seconds a connect given up on may still be taken on by a slow node
READ_WAIT = 3600.0  # the background reader's wait for a frame (it just waits again)


class ApiError(Exception):
    """The server answered a request with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The socket closed while a message was awaited."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"socket closed ({code} {reason})")
        self.code = code
        self.reason = reason


class SignalingClient:
    """REST calls against ``base_url`` (e.g. ``http://127.0.0.1:8080``) and socket connects.

    ``access_token``: for a server with ``auth=jwt``, the application's token sent on create,
    join, list and get (each of those methods also takes one of its own).
    """

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT, access_token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.access_token = access_token
        self.http = AsyncHTTPClient()

    async def request(
        self, method: str, path: str, *, body: str | bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Send one request; return status, decoded JSON body and headers (never raises for 4xx/5xx)."""
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        response = await self.http.fetch(
            HTTPRequest(self.base_url + path, method=method, body=body, headers=headers,
                        request_timeout=self.timeout, allow_nonstandard_methods=True),
            raise_error=False,
        )
        if response.code == 599:
            raise ConnectionError(f"{method} {path}: {response.error}")
        data = json.loads(response.body) if response.body else {}
        return response.code, data, dict(response.headers)

    async def _call(self, method: str, path: str, token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        status, data, _ = await self.request(method, path, headers=headers)
        if status >= 400:
            error = data.get("error", {})
            raise ApiError(status, error.get("code", "unknown"), error.get("message", ""))
        return data

    async def create_call(self, *, reuse_last: bool = False, access_token: str | None = None) -> dict[str, Any]:
        """Create a call; its host credentials are in the answer."""
        path = "/apiv2/calls" + ("?reuse_last=true" if reuse_last else "")
        return await self._call("POST", path, access_token or self.access_token)

    async def list_calls(
        self, status: str | None = None, limit: int | None = None, *, access_token: str | None = None
    ) -> list[dict[str, Any]]:
        query = urlencode({k: v for k, v in (("status", status), ("limit", limit)) if v is not None})
        data = await self._call("GET", "/apiv2/calls" + (f"?{query}" if query else ""), access_token or self.access_token)
        return list(data["calls"])

    async def get_call(self, call_id: str, *, access_token: str | None = None) -> dict[str, Any]:
        return await self._call("GET", f"/apiv2/calls/{call_id}", access_token or self.access_token)

    async def join(self, call_id: str, *, access_token: str | None = None) -> dict[str, Any]:
        return await self._call("POST", f"/apiv2/calls/{call_id}/join", access_token or self.access_token)

    async def remove(self, call_id: str, peer_id: str, access_token: str) -> dict[str, Any]:
        """Remove a participant (an access token with the admin grant)."""
        return await self._call("POST", f"/apiv2/calls/{call_id}/participants/{peer_id}/remove", access_token)

    async def leave(self, call_id: str, token: str) -> dict[str, Any]:
        return await self._call("POST", f"/apiv2/calls/{call_id}/leave", token)

    async def end(self, call_id: str, token: str) -> dict[str, Any]:
        """End a call: ``token`` is a participant's peer token, or an access token with the admin grant."""
        return await self._call("POST", f"/apiv2/calls/{call_id}/end", token)

    async def ice_servers(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/apiv2/config"))["ice_servers"])

    async def connect(
        self, call_id: str, peer_id: str, token: str, *, origin: str | None = None, numbered: bool = False,
        carry: Connection | None = None, **query: Any,
    ) -> Connection:
        """Open a participant's socket. A refusal shows as a close code on the first read.

        ``numbered``: put ``cseq`` on every frame sent; the connection is returned once the
        server's first ``state`` said which ``cseq`` it accepted last (see ``Connection``).
        ``carry``: the participant's previous connection (see ``resume``).
        """
        params = urlencode({"call_id": call_id, "peer_id": peer_id, "token": token, **query})
        url = self.base_url.replace("http", "ws", 1) + f"/apiv2/ws?{params}"
        headers = {"Origin": origin} if origin else {}
        ws = await asyncio.wait_for(
            websocket_connect(HTTPRequest(url, headers=headers, request_timeout=self.timeout)), self.timeout)
        connection = Connection(ws, self.timeout, (call_id, peer_id, token), numbered=numbered)
        if carry is not None:
            connection.last_seq = carry.last_seq
        if numbered:
            try:
                await connection.synchronize(carry)
            except BaseException:
                ws.close()  # given up on: the server must not keep it as the participant's socket
                raise
        return connection

    async def connect_as(self, credentials: dict[str, Any], **query: Any) -> Connection:
        """Connect with the answer of ``create_call`` or ``join``."""
        return await self.connect(credentials["call_id"], credentials["peer_id"], credentials["peer_token"], **query)

    async def resume(self, old: Connection) -> Connection:
        """Reconnect ``old``'s participant asking for every frame after the last one it received.

        The new connection first yields the missed frames, in order, then live ones; if the
        server can no longer replay, its first frame is an ``error`` with code ``resume_failed``
        (renegotiate, e.g. with an ICE restart). A numbered ``old`` hands its unconfirmed
        frames over: the new one resends those the server did not accept, before any other.
        """
        call_id, peer_id, token = old.credentials
        return await self.connect(call_id, peer_id, token, last_seq=old.last_seq, numbered=old.numbered, carry=old)


def _retrieve(written: asyncio.Future[None]) -> None:
    """A write that failed because the socket closed meanwhile: the close shows on the next read."""
    if not written.cancelled():
        written.exception()


class _Numbering:
    """A participant's ``cseq`` count and its unconfirmed frames, shared by its successive connections.

    Numbered frames are written by ``writer``, the newest connection once it has resent what
    the server did not accept; until then (or after it closed) they only wait in ``unacked``.
    """

    def __init__(self) -> None:
        self.cseq = 0
        self.unacked: deque[tuple[int, str]] = deque()
        self.writer: Connection | None = None

    def send(self, message: dict[str, Any]) -> None:
        self.cseq += 1
        message["cseq"] = self.cseq
        text = to_json(message)
        self.unacked.append((self.cseq, text))
        if len(self.unacked) > UNACKED_LIMIT:
            self.unacked.popleft()
        if self.writer is not None:
            try:
                self.writer.send_raw(text)
            except WebSocketClosedError:
                self.writer = None  # kept: the next connection resends it

    def acknowledge(self, accepted: int) -> None:
        """The server accepted every frame up to ``accepted``; numbering goes on after it."""
        while self.unacked and self.unacked[0][0] <= accepted:
            self.unacked.popleft()
        self.cseq = max(self.cseq, accepted)


class Connection:
    """One signaling socket: send frames, receive them with a timeout.

    Numbered (``numbered=True``): every frame sent carries ``cseq``, one more than the last,
    continuing from the ``last_cseq`` the server states on connect; frames stay in
    ``unacked`` until a later connect's ``last_cseq`` confirms them.
    """

    def __init__(
        self, ws: WebSocketClientConnection, timeout: float = DEFAULT_TIMEOUT,
        credentials: tuple[str, str, str] = ("", "", ""), numbered: bool = False,
    ) -> None:
        self.ws = ws
        self.timeout = timeout
        self.credentials = credentials
        self.numbered = numbered
        self.numbering = _Numbering()
        self.last_seq = -1
        self.skipped: list[dict[str, Any]] = []
        self._early: deque[dict[str, Any]] = deque()  # frames read while synchronizing, not yet received
        self._closed: ConnectionClosed | None = None

    def send(self, type: str, payload: Any = None) -> None:
        message: dict[str, Any] = {"type": type}
        if payload is not None or type != "ping":
            message["payload"] = payload
        if self.numbered:
            self.numbering.send(message)
            return
        self.send_raw(to_json(message))

    @property
    def cseq(self) -> int:
        """The last ``cseq`` used (numbered connections)."""
        return self.numbering.cseq

    @property
    def unacked(self) -> deque[tuple[int, str]]:
        """Numbered frames the server has not confirmed yet, oldest first."""
        return self.numbering.unacked

    def send_raw(self, data: str | bytes) -> None:
        self.ws.write_message(data, binary=isinstance(data, bytes)).add_done_callback(_retrieve)

    @property
    def synchronized(self) -> bool:
        """A numbered connection that got its connect's ``state`` (it did not close before)."""
        return self._closed is None

    async def synchronize(self, carried: Connection | None = None) -> None:
        """Read up to this connect's own ``state`` (kept for ``receive``); then resend what it did not accept.

        ``carried``: the previous connection of the same participant, whose unconfirmed
        frames are resent here. A close before that state is kept for ``receive`` too.
        """
        numbering = self.numbering = carried.numbering if carried is not None else self.numbering
        numbering.writer = None  # until the server says what it has: what is sent meanwhile waits
        peer_id = self.credentials[1]
        while True:
            try:
                message = await self._read(self.timeout)
            except ConnectionClosed as closed:
                self._closed = closed
                return
            self._early.append(message)
            if message.get("type") == "state" and message.get("subject") == peer_id and "last_cseq" in message:
                break
        numbering.acknowledge(message["last_cseq"] if isinstance(message["last_cseq"], int) else 0)
        for _, text in numbering.unacked:
            self.send_raw(text)
        numbering.writer = self

    async def _read(self, timeout: float) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.read_message(), timeout)
        if text is None:
            raise ConnectionClosed(self.ws.close_code, self.ws.close_reason)
        message = dict(json.loads(text))
        if isinstance(message.get("seq"), int):
            self.last_seq = message["seq"]
        return message

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame, decoded. Raises ``ConnectionClosed`` or ``TimeoutError``."""
        if self._early:
            return self._early.popleft()
        if self._closed is not None:
            raise self._closed
        return await self._read(timeout or self.timeout)

    async def wait_for(self, type: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """The next frame of ``type`` (and with ``fields``); frames skipped on the way go to ``skipped``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        while True:
            message = await self.receive(max(deadline - loop.time(), 0.001))
            if message.get("type") == type and all(message.get(k) == v for k, v in fields.items()):
                return message
            self.skipped.append(message)

    async def wait_closed(self, timeout: float | None = None) -> tuple[int | None, str | None]:
        """Read until the socket closes; return its close code and reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        while True:
            try:
                self.skipped.append(await self.receive(max(deadline - loop.time(), 0.001)))
            except ConnectionClosed as closed:
                return closed.code, closed.reason

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame, like a lost network."""
        self.ws.protocol.stream.close()  # type: ignore[union-attr]


class Session:
    """A participant's socket that outlives a server restart, a crashed node or a dropped network.

    Frames are numbered (``cseq``). A reader in the background takes the frames off the
    socket as they come, and when the socket closes for a reason that is not final
    (anything but ``FINAL_CLOSE``) it reconnects with ``last_seq``: ``receive`` yields every
    frame of the participant's stream once and in order, and the new socket resends what
    the server did not accept, whether or not anyone was reading. After a
    ``server_shutdown`` that says ``reconnect`` it reconnects at once, after a random pause
    of up to ``restart_jitter`` seconds (so that a restarting node's clients do not all
    arrive in the same instant); after other closes, with full-jitter exponential backoff
    (``backoff``: first and longest pause). A node that cannot be reached is left for the
    next one in ``clients``. Closed for good (a final close, or ``attempts`` failures in a
    row), ``receive`` raises ``ConnectionClosed``.
    """

    def __init__(
        self, clients: SignalingClient | Sequence[SignalingClient], credentials: dict[str, Any], *,
        restart_jitter: float = 0.5, backoff: tuple[float, float] = (0.1, 5.0), attempts: int = 20,
    ) -> None:
        self.clients = [clients] if isinstance(clients, SignalingClient) else list(clients)
        self.credentials = credentials
        self.restart_jitter = restart_jitter
        self.backoff = backoff
        self.attempts = attempts
        self.reconnects = 0
        self.conn: Connection | None = None
        self._node = 0
        self._failures = 0  # reconnects in a row that gave no working socket
        self._abandoned_at = -math.inf  # when a connect was given up on (timed out)
        self._restarting = False  # the server announced a restart: reconnect at once
        self._stopped = False
        self._frames: asyncio.Queue[dict[str, Any] | ConnectionClosed] = asyncio.Queue()
        self._closed: ConnectionClosed | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def client(self) -> SignalingClient:
        return self.clients[self._node % len(self.clients)]

    async def open(self) -> Session:
        """Connect for the first time (a refusal shows on the first ``receive``)."""
        self.conn = await self.client.connect_as(self.credentials, numbered=True)
        self._reader = asyncio.ensure_future(self._read())
        return self

    def send(self, type: str, payload: Any = None) -> None:
        """Send a numbered frame; while reconnecting it waits, and goes out first on the next socket."""
        assert self.conn is not None
        self.conn.send(type, payload)

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame of the stream, across reconnects. Raises ``ConnectionClosed`` once closed for good."""
        assert self.conn is not None
        if self._closed is not None and self._frames.empty():
            raise self._closed
        item = await asyncio.wait_for(self._frames.get(), timeout or self.conn.timeout)
        if isinstance(item, ConnectionClosed):
            self._closed = item
            raise item
        return item

    async def wait_for(self, type: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """The next frame of ``type`` (and with ``fields``), across reconnects."""
        assert self.conn is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.conn.timeout)
        while True:
            message = await self.receive(max(deadline - loop.time(), 0.001))
            if message.get("type") == type and all(message.get(k) == v for k, v in fields.items()):
                return message

    async def _read(self) -> None:
        """Take every frame off the socket as it comes, reconnecting when it closes (the background reader)."""
        assert self.conn is not None
        while True:
            try:
                message = await self.conn.receive(READ_WAIT)
            except TimeoutError:
                continue
            except ConnectionClosed as closed:
                if self._stopped or (closed.code in FINAL_CLOSE and not self._replaced_by_own(closed)):
                    self._frames.put_nowait(closed)
                    return
                try:
                    await self._reconnect()
                except ConnectionClosed as gave_up:
                    self._frames.put_nowait(gave_up)
                    return
                continue
            if message.get("type") == "server_shutdown" and message.get("reconnect"):
                self._restarting = True
            self._frames.put_nowait(message)

    async def _reconnect(self) -> None:
        """Open the next socket; its frames (and its close, if it closed at once) are read as any."""
        assert self.conn is not None
        loop = asyncio.get_running_loop()
        first, longest = self.backoff
        while True:
            if self._failures >= self.attempts:
                raise ConnectionClosed(None, f"gave up after {self.attempts} attempts to reconnect")
            if self._restarting:
                pause = random.uniform(0, self.restart_jitter)
            else:
                pause = random.uniform(0, min(longest, first * 2 ** self._failures))
            self._restarting = False
            await asyncio.sleep(pause)
            try:
                conn = await self.client.resume(self.conn)
            except TimeoutError:
                conn = None
                self._abandoned_at = loop.time()  # a node that does not answer may still take it, later
            except (OSError, HTTPClientError, WebSocketClosedError):
                conn = None
            if conn is not None:
                self.conn = conn  # even if it closed at once: the frames it read before are the stream's
            if conn is None or not conn.synchronized:
                self._failures += 1
                self._node += 1  # that node does not serve the call now: try the next one
                if conn is None:
                    continue
                return
            self._failures = 0
            self.reconnects += 1
            return

    def _replaced_by_own(self, closed: ConnectionClosed) -> bool:
        """Replaced (4409) by a connect of this session's own that it had given up on, which a node that
        was frozen or slow took on late: not another client, so take the participant back."""
        loop = asyncio.get_running_loop()
        return closed.code == 4409 and loop.time() - self._abandoned_at < ABANDONED_CONNECT_WINDOW

    def close(self) -> None:
        """Close for good (no reconnect)."""
        self._stopped = True
        if self.conn is not None:
            self.conn.close(1000, "bye")
