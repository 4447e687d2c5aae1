"""``SignalingClient``: an asyncio client for the REST API and the signaling socket.

Used by the tests, the stress tool and scripts; the reference for front-end authors.
Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from signal_srv.messages import to_json

__all__ = ["ApiError", "Connection", "ConnectionClosed", "SignalingClient", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 10.0


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
        self, call_id: str, peer_id: str, token: str, *, origin: str | None = None, **query: Any
    ) -> Connection:
        """Open a participant's socket. A refusal shows as a close code on the first read."""
        params = urlencode({"call_id": call_id, "peer_id": peer_id, "token": token, **query})
        url = self.base_url.replace("http", "ws", 1) + f"/apiv2/ws?{params}"
        headers = {"Origin": origin} if origin else {}
        ws = await asyncio.wait_for(
            websocket_connect(HTTPRequest(url, headers=headers, request_timeout=self.timeout)), self.timeout)
        return Connection(ws, self.timeout, (call_id, peer_id, token))

    async def connect_as(self, credentials: dict[str, Any], **query: Any) -> Connection:
        """Connect with the answer of ``create_call`` or ``join``."""
        return await self.connect(credentials["call_id"], credentials["peer_id"], credentials["peer_token"], **query)

    async def resume(self, old: Connection) -> Connection:
        """Reconnect ``old``'s participant asking for every frame after the last one it received.

        The new connection first yields the missed frames, in order, then live ones; if the
        server can no longer replay, its first frame is an ``error`` with code ``resume_failed``
        (renegotiate, e.g. with an ICE restart).
        """
        call_id, peer_id, token = old.credentials
        new = await self.connect(call_id, peer_id, token, last_seq=old.last_seq)
        new.last_seq = old.last_seq
        return new


class Connection:
    """One signaling socket: send frames, receive them with a timeout."""

    def __init__(
        self, ws: WebSocketClientConnection, timeout: float = DEFAULT_TIMEOUT,
        credentials: tuple[str, str, str] = ("", "", ""),
    ) -> None:
        self.ws = ws
        self.timeout = timeout
        self.credentials = credentials
        self.last_seq = -1
        self.skipped: list[dict[str, Any]] = []

    def send(self, type: str, payload: Any = None) -> None:
        message: dict[str, Any] = {"type": type}
        if payload is not None or type != "ping":
            message["payload"] = payload
        self.send_raw(to_json(message))

    def send_raw(self, data: str | bytes) -> None:
        self.ws.write_message(data, binary=isinstance(data, bytes))

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame, decoded. Raises ``ConnectionClosed`` or ``TimeoutError``."""
        text = await asyncio.wait_for(self.ws.read_message(), timeout or self.timeout)
        if text is None:
            raise ConnectionClosed(self.ws.close_code, self.ws.close_reason)
        message = dict(json.loads(text))
        if isinstance(message.get("seq"), int):
            self.last_seq = message["seq"]
        return message

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
