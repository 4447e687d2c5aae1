"""``make_app(config)``: routes, Tornado settings and dependency injection, with no globals."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from tornado.web import Application, RequestHandler, StaticFileHandler

from signal_srv.config import Config
from signal_srv.registry import Registry
from signal_srv.rest import (
    CallHandler,
    CallsHandler,
    ConfigHandler,
    CurrentCallHandler,
    EndHandler,
    HealthHandler,
    JoinHandler,
    LeaveHandler,
    NotFoundHandler,
    ReadyHandler,
)
from signal_srv.ws import SignalingSocket

__all__ = ["STATIC_DIR", "log_request", "make_app", "make_registry", "redact"]

access_log = logging.getLogger("signal_srv.access")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|peer_token)=)[^&#]*")


def redact(uri: str) -> str:
    """The URI with secret query values replaced, fit for a log line."""
    return _SECRET_QUERY.sub(r"\1[redacted]", uri)


def log_request(handler: RequestHandler) -> None:
    """Access log line without secrets: INFO, WARNING for 503 (overload), ERROR for other 5xx."""
    status = handler.get_status()
    request = handler.request
    log = access_log.info if status < 500 else access_log.warning if status == 503 else access_log.error
    log("%d %s %s (%s) %.2fms", status, request.method, redact(request.uri or ""),
        request.remote_ip, 1000.0 * request.request_time())


def make_registry(config: Config) -> Registry:
    return Registry(
        call_ttl=config.call_ttl,
        max_calls=config.max_calls,
        max_participants=config.max_participants,
        hold_limit=config.ws_buffer_limit,
        mailbox_size=config.mailbox_size,
        heartbeat_interval=config.heartbeat_interval,
        heartbeat_timeout=config.heartbeat_timeout,
    )


def make_app(config: Config, registry: Registry | None = None) -> Application:
    """The Tornado application; ``app.settings["registry"]`` is its call registry."""
    if registry is None:
        registry = make_registry(config)
    deps: dict[str, Any] = {"registry": registry, "config": config}
    call = r"/apiv2/calls/([^/]+)"
    routes = [
        (r"/apiv2/calls", CallsHandler, deps),
        (r"/apiv2/calls/current", CurrentCallHandler, deps),
        (call, CallHandler, deps),
        (call + "/join", JoinHandler, deps),
        (call + "/leave", LeaveHandler, deps),
        (call + "/end", EndHandler, deps),
        (r"/apiv2/config", ConfigHandler, deps),
        (r"/apiv2/ws", SignalingSocket, deps),
        (r"/healthz", HealthHandler, deps),
        (r"/readyz", ReadyHandler, deps),
        (r"/()", StaticFileHandler, {"path": STATIC_DIR, "default_filename": "index.html"}),
        (r"/([\w-]+\.(?:html|js|css|svg|ico))", StaticFileHandler, {"path": STATIC_DIR}),
    ]
    return Application(
        routes,
        registry=registry,
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        websocket_max_message_size=config.max_message_size,
    )
