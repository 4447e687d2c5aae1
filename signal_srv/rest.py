"""The REST edge: JSON handlers that turn requests into actor messages and errors into answers.

``ApiHandler.write_error`` is the one place where a failure becomes an HTTP response.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from tornado.web import HTTPError, RequestHandler, stream_request_body

from signal_srv import messages, turn
from signal_srv.actor import CallSummary, Joined
from signal_srv.auth import Claims, Verifier, looks_like_jwt
from signal_srv.call import End, Event, Identify, Join, Leave, Remove, Status
from signal_srv.config import Config
from signal_srv.errors import (
    BadRequest,
    Capacity,
    Forbidden,
    HostNotAllowed,
    MissingToken,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ShuttingDown,
    SignalError,
    Unauthorized,
    UnsupportedMediaType,
)
from signal_srv.headers import add_security_headers
from signal_srv.limits import Limits, RateLimiter
from signal_srv.metrics import Metrics
from signal_srv.peer_tokens import token_digest
from signal_srv.registry import Registry, new_ids

__all__ = [
    "ApiHandler",
    "CallHandler",
    "CallsHandler",
    "ConfigHandler",
    "CurrentCallHandler",
    "EndHandler",
    "HealthHandler",
    "HostRefusedHandler",
    "JsonHandler",
    "JoinHandler",
    "LeaveHandler",
    "MetricsHandler",
    "NotFoundHandler",
    "ReadyHandler",
    "RemoveHandler",
]

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
RETRY_AFTER = {503: "1"}

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


class JsonHandler(RequestHandler):
    """JSON out, and the single mapping of errors to ``{"error": {code, message}}``."""

    metrics: Metrics | None = None

    def set_default_headers(self) -> None:
        add_security_headers(self)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def reply(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.finish(messages.to_json(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, SignalError):
            status, code, message = exc.status, exc.code, exc.message
        elif isinstance(exc, HTTPError) and exc.status_code in _HTTP_CODES:
            status, code, message = exc.status_code, _HTTP_CODES[exc.status_code], self._reason
        else:
            status, code, message = 500, "internal_error", "internal error; see the server log"
        if self.metrics is not None:
            self.metrics.errors[code] += 1
        self.clear()
        self.set_default_headers()
        if isinstance(exc, (Unauthorized, Forbidden)):
            self.set_header("WWW-Authenticate", exc.challenge)
        if isinstance(exc, RateLimited):
            self.set_header("Retry-After", str(max(1, math.ceil(exc.retry_after))))
        elif status in RETRY_AFTER:
            self.set_header("Retry-After", RETRY_AFTER[status])
        if status == 405:
            self.set_header("Allow", ", ".join(_allowed_methods(type(self))))
        if isinstance(exc, ShuttingDown):
            self.set_header("Connection", "close")
        self.set_status(status)
        self.finish(messages.to_json({"error": {"code": code, "message": message}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, (SignalError, HTTPError)):
            logger.debug("%s %s: %s", self.request.method, self.request.path, value)
        else:
            logger.error("uncaught exception in %s %s", self.request.method, self.request.path,
                         exc_info=(typ, value, tb))


@stream_request_body
class ApiHandler(JsonHandler):
    """JSON in and out for the call API, with the server's registry, config, limits and token verifier."""

    registry: Registry
    config: Config
    limits: Limits
    metrics: Metrics
    auth: Verifier | None

    def initialize(
        self, registry: Registry, config: Config, limits: Limits, metrics: Metrics, auth: Verifier | None = None
    ) -> None:
        self.registry = registry
        self.config = config
        self.limits = limits
        self.metrics = metrics
        self.auth = auth
        self._body = bytearray()
        self._too_large = False

    def prepare(self) -> None:
        length = self.request.headers.get("Content-Length")
        if length is None or not messages.is_decimal(length):
            return  # none, or malformed: Tornado's HTTP layer refuses the latter
        size = messages.whole_number(length)
        if size is None:
            raise BadRequest(f"Content-Length has more than {messages.MAX_DIGITS} digits")
        if size > self.config.max_body_size:
            raise PayloadTooLarge(f"request body over {self.config.max_body_size} bytes")

    def data_received(self, chunk: bytes) -> None:
        # Raising here would drop the connection without an answer; flag it instead.
        if len(self._body) + len(chunk) > self.config.max_body_size:
            self._too_large = True
        elif not self._too_large:
            self._body += chunk

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object; an empty body is ``{}``."""
        if self._too_large:
            raise PayloadTooLarge(f"request body over {self.config.max_body_size} bytes")
        if not self._body.strip():
            return {}
        content_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise UnsupportedMediaType(f"the body must be application/json, not {content_type or 'untyped'!r}")
        try:
            value = messages.loads(bytes(self._body))
        except SignalError as exc:
            raise BadRequest(exc.message) from None
        if not isinstance(value, dict):
            raise BadRequest("the body must be a JSON object")
        return value

    def check_rate(self, limiter: RateLimiter, name: str) -> None:
        """Refuse with 429 when this client IP is over ``limiter``'s rate."""
        wait = limiter.take(self.request.remote_ip or "", time.monotonic())
        if wait:
            self.metrics.rate_limited[name] += 1
            raise RateLimited(f"too many {name} requests from your address; retry in {wait:.1f} s", wait)

    def ice_servers(self, peer_id: str | None) -> list[dict[str, Any]]:
        """``ice_servers``, with TURN credentials when ``peer_id`` is an authenticated peer."""
        c = self.config
        return turn.ice_servers(c.ice_servers, c.turn_uris, c.turn_secret, peer_id, time.time(), c.turn_credential_ttl)

    def credentials(self, joined: Joined, peer_id: str, token: str, claims: Claims | None) -> dict[str, Any]:
        """The answer to a create or a join: the call, the peer's secret and its ICE servers.

        With ``auth=jwt`` also who the peer is (``identity``, ``name``), from its access token.
        """
        body = joined.summary.to_dict()
        body.update(role=joined.role, polite=joined.polite, peer_id=peer_id, peer_token=token,
                    ice_servers=self.ice_servers(peer_id))
        if claims is not None:
            body.update(identity=claims.identity, name=claims.name)
        return body

    def bearer_token(self, what: str = "peer_token") -> str:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MissingToken(f"send Authorization: Bearer <{what}>")
        return token.strip()

    async def authorize(self, *grants: str, call_id: str | None = None, token: str | None = None) -> Claims | None:
        """With ``auth=jwt``: the caller's verified access token, holding ``grants`` and valid for ``call_id``.

        None with ``auth=none``. Raises ``Unauthorized`` (401) for a missing or bad token and
        ``Forbidden`` (403) for a good one that does not allow the request.
        """
        if self.auth is None:
            return None
        claims = await self.auth.verify(token or self.bearer_token("access token"))
        claims.require(*grants, call_id=call_id)
        return claims

    async def as_participant(self, call_id: str, digest: bytes, event: Event) -> Any:
        """Ask the call ``event`` for the participant whose peer token has ``digest``.

        A wrong token never reaches the call's inbox: it is refused here (or, for a call owned
        by another node, by that node before its inbox) with ``401``, or ``429`` once this
        client IP is over ``auth_failure_rate``. Raises ``CallNotFound`` too.
        """
        try:
            call = await self.registry.find(call_id)
            if not call.vouches_for(digest):
                raise Unauthorized()
            return await call.ask(event, self.config.ask_timeout)
        except Unauthorized:
            wait = self.limits.auth_failures.take(self.request.remote_ip or "", time.monotonic())
            if wait:
                self.metrics.rate_limited["auth"] += 1
                raise RateLimited(f"too many wrong tokens from your address; retry in {wait:.1f} s", wait) from None
            raise


def _admin(claims: Claims | None) -> bool:
    """Whether the answer may show who is in a call: only to a token with the admin grant."""
    return claims is not None and claims.admin


def _who(claims: Claims | None) -> tuple[str | None, str | None]:
    """The identity and name a new participant carries (None, None with ``auth=none``)."""
    return (claims.identity, claims.name) if claims is not None else (None, None)


def _allowed_methods(cls: type[RequestHandler]) -> list[str]:
    return [m for m in cls.SUPPORTED_METHODS if getattr(cls, m.lower()) is not getattr(RequestHandler, m.lower())]




class CallsHandler(ApiHandler):
    """``POST /apiv2/calls`` creates a call; ``GET /apiv2/calls`` lists live calls."""

    async def post(self) -> None:
        self.json_body()
        reuse_last = self._flag("reuse_last")
        if reuse_last and self.config.list_calls == "off":
            # It hands out a stranger's waiting call, as listing would.
            raise NotFound("reuse_last is turned off on this server, as listing calls is")
        self.check_rate(self.limits.create, "create")
        claims = await self.authorize("create", *(("list", "join") if reuse_last else ()))
        if reuse_last:
            newest = await self.registry.newest_waiting(_admin(claims))
            if newest is not None:
                self.reply(200, {**newest.to_dict(), "reused": True})
                return
        created = await self.registry.open_call(*_who(claims))
        joined = created.joined
        self.set_header("Location", f"/apiv2/calls/{created.actor.call_id}")
        self.reply(201, self.credentials(joined, created.peer_id, created.peer_token, claims))

    async def get(self) -> None:
        if self.config.list_calls == "off":
            raise NotFound("listing calls is turned off on this server")
        claims = await self.authorize("list")
        status = self.get_query_argument("status", None)
        if status not in (None, Status.WAITING.value, Status.ACTIVE.value):
            raise BadRequest("status must be 'waiting' or 'active'")
        limit = messages.whole_number(self.get_query_argument("limit", str(DEFAULT_LIMIT)))
        if limit is None or not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        calls = await self.registry.find_calls(Status(status) if status else None, limit, _admin(claims))
        self.reply(200, {"calls": [c.to_dict() for c in calls]})

    def _flag(self, name: str) -> bool:
        value = self.get_query_argument(name, "false").lower()
        if value not in ("true", "false", "1", "0"):
            raise BadRequest(f"{name} must be true or false")
        return value in ("true", "1")


class CurrentCallHandler(ApiHandler):
    """``/apiv2/calls/current`` is gone: there is no current call in v2."""

    def prepare(self) -> None:
        raise NotFound("/apiv2/calls/current was removed; use the call_id from the invite link")


class CallHandler(ApiHandler):
    """``GET /apiv2/calls/<call_id>``."""

    async def get(self, call_id: str) -> None:
        claims = await self.authorize(call_id=call_id)
        call = await self.registry.find(call_id)
        self.reply(200, (await call.describe(self.config.ask_timeout, _admin(claims))).to_dict())


class JoinHandler(ApiHandler):
    """``POST /apiv2/calls/<call_id>/join`` seats a guest."""

    async def post(self, call_id: str) -> None:
        self.json_body()
        self.check_rate(self.limits.join, "join")
        claims = await self.authorize("join", call_id=call_id)
        actor = await self.registry.find(call_id)
        peer_id, token = new_ids(2)
        joined: Joined = await actor.ask(Join(peer_id, token_digest(token), *_who(claims)), self.config.ask_timeout)
        self.reply(200, self.credentials(joined, peer_id, token, claims))


class LeaveHandler(ApiHandler):
    """``POST /apiv2/calls/<call_id>/leave`` frees the caller's slot."""

    async def post(self, call_id: str) -> None:
        self.json_body()
        digest = token_digest(self.bearer_token())
        summary: CallSummary = await self.as_participant(call_id, digest, Leave(digest))
        self.reply(200, summary.to_dict())


class EndHandler(ApiHandler):
    """``POST /apiv2/calls/<call_id>/end`` ends the call for everyone.

    By a participant (its peer token), or with ``auth=jwt`` by an access token with ``admin``.
    """

    async def post(self, call_id: str) -> None:
        self.json_body()
        token = self.bearer_token()
        summary: CallSummary
        if self.auth is not None and looks_like_jwt(token):
            await self.authorize("admin", call_id=call_id, token=token)
            summary = await (await self.registry.find(call_id)).ask(End(None), self.config.ask_timeout)
        else:
            digest = token_digest(token)
            summary = await self.as_participant(call_id, digest, End(digest))
        self.reply(200, summary.to_dict())


class RemoveHandler(ApiHandler):
    """``POST /apiv2/calls/<call_id>/participants/<peer_id>/remove``: an administrator removes a participant.

    The participant leaves with reason ``removed``; it needs ``auth=jwt`` and an ``admin`` token.
    """

    async def post(self, call_id: str, peer_id: str) -> None:
        self.json_body()
        token = self.bearer_token("access token")
        if self.auth is None:
            raise Forbidden("removing a participant needs auth=jwt and an access token with the admin grant")
        await self.authorize("admin", call_id=call_id, token=token)
        summary: CallSummary = await (await self.registry.find(call_id)).ask(Remove(peer_id), self.config.ask_timeout)
        self.reply(200, summary.to_dict())


class ConfigHandler(ApiHandler):
    """``GET /apiv2/config``: what a client needs to build its ``RTCPeerConnection``.

    With ``?call_id=`` and a participant's bearer token, TURN credentials are included.
    """

    async def get(self) -> None:
        call_id = self.get_query_argument("call_id", None)
        peer_id = None
        if call_id is not None:
            digest = token_digest(self.bearer_token())
            peer_id = await self.as_participant(call_id, digest, Identify(digest))
        self.reply(200, {"ice_servers": self.ice_servers(peer_id)})


class HealthHandler(ApiHandler):
    """``GET /healthz``: the process is alive and its loop answers; its node id and Redis state."""

    def get(self) -> None:
        stats = self.registry.statistics()
        self.reply(200, {"status": "ok", "calls": {"waiting": stats.waiting, "active": stats.active},
                         **self.registry.placement.health()})


class ReadyHandler(ApiHandler):
    """``GET /readyz``: 200 while this node accepts new calls; 503 at capacity, shutting down or cut off."""

    def get(self) -> None:
        try:
            self.registry.check_capacity()
        except (Capacity, ShuttingDown) as exc:
            status = "shutting_down" if isinstance(exc, ShuttingDown) else "at_capacity"
        else:
            status = "ready" if self.registry.placement.ready() else "unavailable"
        if status != "ready":
            self.set_header("Retry-After", RETRY_AFTER[503])
            self.reply(503, {"status": status})
        else:
            self.reply(200, {"status": status})


class MetricsHandler(JsonHandler):
    """``GET /metrics`` in the Prometheus text format."""

    def initialize(self, metrics: Metrics, **_: Any) -> None:
        self.metrics = self.exporter = metrics

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.exporter.render())


@stream_request_body
class RefusingHandler(JsonHandler):
    """Answers every request with the error ``prepare`` raises, without reading its body.

    Needs nothing but the metrics, so that any application can route to it.
    """

    route_label = "other"  # one metric label for every unknown path or host

    def initialize(self, metrics: Metrics | None = None, **_: Any) -> None:
        self.metrics = metrics

    def data_received(self, chunk: bytes) -> None:
        pass


class NotFoundHandler(RefusingHandler):
    """Every unknown route."""

    def prepare(self) -> None:
        raise NotFound(f"no route for {self.request.path[:100]}")


class HostRefusedHandler(RefusingHandler):
    """Every request whose ``Host`` is not in ``allowed_hosts``."""

    def prepare(self) -> None:
        raise HostNotAllowed(f"this server does not answer to the host {self.request.host_name[:100]!r}")
