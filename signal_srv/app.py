"""``make_app(config)``: routes, Tornado settings and dependency injection, with no globals."""

from __future__ import annotations

import os
from typing import Any

from tornado.httputil import HTTPServerRequest
from tornado.web import Application

from signal_srv.auth import make_verifier
from signal_srv.call import CallRules
from signal_srv.config import Config
from signal_srv.headers import DemoFileHandler
from signal_srv.hosts import host_allowed
from signal_srv.limits import Limits
from signal_srv.logs import log_request
from signal_srv.metrics import Metrics
from signal_srv.openapi import OpenApiHandler
from signal_srv.placement import make_placement
from signal_srv.registry import Registry
from signal_srv.rest import (
    CallHandler,
    CallsHandler,
    ConfigHandler,
    CurrentCallHandler,
    EndHandler,
    HealthHandler,
    HostRefusedHandler,
    JoinHandler,
    LeaveHandler,
    MetricsHandler,
    NotFoundHandler,
    ReadyHandler,
    RemoveHandler,
)
from signal_srv.webhooks import Webhooks
from signal_srv.ws import SignalingSocket

__all__ = ["STATIC_DIR", "GuardedApplication", "make_app", "make_metrics_app", "make_registry"]

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


class GuardedApplication(Application):
    """An ``Application`` that answers only to ``allowed_hosts`` (see ``hosts``).

    A request to another host, a socket handshake too, gets ``400 host_not_allowed`` before
    any route sees it.
    """

    def __init__(self, routes: list[Any], *, allowed_hosts: tuple[str, ...], **settings: Any) -> None:
        super().__init__(routes, **settings)
        self.allowed_hosts = allowed_hosts

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> Any:
        if not host_allowed(request.host_name, self.allowed_hosts):
            return self.get_handler_delegate(request, HostRefusedHandler, self.settings.get("default_handler_args"))
        return super().find_handler(request, **kwargs)


def make_registry(config: Config) -> Registry:
    """A registry for ``config``, with its own ``Metrics`` and placement (a cluster's with ``redis_url``)."""
    rules = CallRules(
        ttl=config.call_ttl,
        unclaimed_ttl=config.unclaimed_ttl,
        departure_timeout=config.departure_timeout,
        max_duration=config.max_call_duration,
        max_participants=config.max_participants,
        hold_limit=config.ws_buffer_limit,
        hold_bytes=config.ws_buffer_bytes,
        held_bytes_total=config.held_bytes_total,
        resume_limit=config.resume_buffer,
        resume_bytes=config.resume_buffer_bytes,
    )
    metrics = Metrics()
    webhooks = None
    if config.webhook_url:
        webhooks = Webhooks(
            config.webhook_url, config.webhook_secret, queue_size=config.webhook_queue_size,
            timeout=config.webhook_timeout, retries=config.webhook_retries, metrics=metrics,
        )
    return Registry(
        rules,
        metrics=metrics,
        webhooks=webhooks,
        max_calls=config.max_calls,
        mailbox_size=config.mailbox_size,
        heartbeat_interval=config.heartbeat_interval,
        heartbeat_timeout=config.heartbeat_timeout,
        placement=make_placement(config, metrics),
    )


def make_app(config: Config, registry: Registry | None = None) -> Application:
    """The Tornado application; ``app.settings["registry"]`` is its call registry.

    ``app.settings["auth"]`` is its token verifier (None with ``auth=none``); close it on
    shutdown. ``/metrics`` is served here unless ``metrics_port`` asks for ``make_metrics_app``.
    """
    if registry is None:
        registry = make_registry(config)
    registry.metrics.watch(registry)
    limits = Limits(config)
    deps: dict[str, Any] = {"registry": registry, "config": config, "limits": limits, "metrics": registry.metrics}
    auth = make_verifier(config)
    api = {**deps, "auth": auth}  # the REST handlers; the socket keeps using peer tokens
    call = r"/apiv2/calls/([^/]+)"
    routes: list[Any] = [
        # First: Tornado tries the routes in order, and reconnects come in storms.
        (r"/apiv2/ws", SignalingSocket, deps),
        (r"/apiv2/calls", CallsHandler, api),
        (r"/apiv2/calls/current", CurrentCallHandler, api),
        (call, CallHandler, api),
        (call + "/join", JoinHandler, api),
        (call + "/leave", LeaveHandler, api),
        (call + "/end", EndHandler, api),
        (call + r"/participants/([^/]+)/remove", RemoveHandler, api),
        (r"/apiv2/config", ConfigHandler, api),
        (r"/healthz", HealthHandler, api),
        (r"/readyz", ReadyHandler, api),
        (r"/apiv2/openapi.json", OpenApiHandler, {}),
        *([] if config.metrics_port else [(r"/metrics", MetricsHandler, deps)]),
        (r"/()", DemoFileHandler, {"path": STATIC_DIR, "default_filename": "index.html"}),
        (r"/([\w-]+\.(?:html|js|css|svg|ico))", DemoFileHandler, {"path": STATIC_DIR}),
    ]
    return GuardedApplication(
        routes,
        allowed_hosts=config.allowed_hosts,
        registry=registry,
        auth=auth,
        default_handler_class=NotFoundHandler,
        default_handler_args=api,
        log_function=log_request,
        websocket_max_message_size=config.max_message_size,
        metrics=registry.metrics,
    )


def make_metrics_app(registry: Registry, config: Config) -> Application:
    """``/metrics`` alone, for a separate, non-public ``metrics_port``."""
    deps = {"metrics": registry.metrics}
    return GuardedApplication([(r"/metrics", MetricsHandler, deps)], allowed_hosts=config.allowed_hosts,
                              default_handler_class=NotFoundHandler, default_handler_args=deps,
                              log_function=log_request, metrics=registry.metrics)
