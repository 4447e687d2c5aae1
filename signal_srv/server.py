"""``main()``: load the configuration, serve, and shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from tornado.web import Application

from signal_srv.app import make_app, make_metrics_app
from signal_srv.auth import Verifier
from signal_srv.config import Config, ignored_environment, load_config, uvloop_installed
from signal_srv.drain import DrainingHTTPServer
from signal_srv.errors import ConfigError
from signal_srv.listener import GuardedHTTPServer
from signal_srv.logs import setup_logging
from signal_srv.placement import new_node_id
from signal_srv.registry import Registry

__all__ = ["loop_factory", "main", "make_server", "serve"]

logger = logging.getLogger(__name__)

# Headroom above max_body_size: our handlers answer 413 themselves; this is the backstop.
BODY_BACKSTOP = 1024

# Each call allocates a few dozen long-lived objects (actor, queue, task, participants), so
# the default young-generation threshold (700) makes the cyclic GC run every few creates and
# walk ever more survivors: measured 52 us per created call with the defaults, 24 us with these.
GC_THRESHOLDS = (10_000, 20, 20)


def make_server(app: Application, config: Config) -> GuardedHTTPServer:
    """The HTTP server for ``app``, with the proxy, body-size, timeout and per-client settings of ``config``.

    Tornado times a request's headers and an idle keep-alive connection with one timer
    (``idle_connection_timeout``). Behind a proxy (``xheaders``) every connection comes from
    the proxy, so connections per client are left for the proxy to cap.
    """
    return GuardedHTTPServer(
        app, xheaders=config.xheaders, max_body_size=config.max_body_size + BODY_BACKSTOP,
        idle_connection_timeout=config.http_idle_timeout, body_timeout=config.http_body_timeout,
        metrics=app.settings["metrics"], connections_per_ip=0 if config.xheaders else config.http_connections_per_ip,
    )


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Listen and serve until ``stop`` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    stop = stop or asyncio.Event()
    app = make_app(config)
    registry: Registry = app.settings["registry"]
    auth: Verifier | None = app.settings["auth"]
    servers = [make_server(app, config)]
    servers[0].listen(config.port, config.address, backlog=config.listen_backlog)
    if config.metrics_port:
        servers.append(make_server(make_metrics_app(registry, config), config))
        servers[1].listen(config.metrics_port, config.address, backlog=config.listen_backlog)
    registry.start_sweeping(config.cleanup_interval)
    await registry.placement.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("signal_srv node %s listening on http://%s:%d/ (event loop: %s)", registry.placement.node_id,
                config.address, _bound_port(servers[0]), type(loop).__module__.partition(".")[0])
    await stop.wait()
    logger.info("signal_srv stopping: %d live calls", len(registry))
    try:
        await asyncio.wait_for(_shut_down(servers, registry, config.shutdown_timeout), config.shutdown_timeout)
    except TimeoutError:
        logger.warning("shutdown took longer than %.1f s; exiting anyway, cutting %d HTTP connections",
                       config.shutdown_timeout, sum(server.open_connections for server in servers))
        for server in servers:
            # Closed first, a request still waiting for its body ends quietly; cancelled at exit,
            # its handler would answer (and log) a 500.
            await server.close_all_connections()
    if auth is not None:
        auth.close()
    logger.info("signal_srv stopped")


async def _shut_down(servers: Sequence[DrainingHTTPServer], registry: Registry, timeout: float) -> None:
    """Stop listening, then end the calls and drain the HTTP connections side by side.

    Requests that arrive meanwhile are answered: ``503 shutting_down`` where they need a call.
    """
    for server in servers:
        server.stop()
    await asyncio.gather(registry.close(timeout), *(server.drain() for server in servers))


def _bound_port(server: DrainingHTTPServer) -> int:
    for sock in server._sockets.values():  # type: ignore[attr-defined]
        return int(sock.getsockname()[1])
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: exit status 2 on a bad configuration, 0 after a clean shutdown."""
    try:
        config = load_config(list(argv) if argv is not None else sys.argv, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"signal-srv: configuration error: {exc}\n")
        raise SystemExit(2) from None
    config = dataclasses.replace(config, node_id=config.node_id or new_node_id())
    setup_logging(config.log_level, config.log_format, config.node_id)
    for problem in ignored_environment(os.environ):
        logger.warning("configuration: %s", problem)
    gc.freeze()  # start-up objects (modules, config) need never be scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        runner.run(serve(config))


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop ``event_loop`` names: uvloop's (``uvloop``, or ``auto`` with uvloop
    installed), or None for asyncio's own."""
    if event_loop == "asyncio" or (event_loop == "auto" and not uvloop_installed()):
        return None
    import uvloop

    return uvloop.new_event_loop  # type: ignore[no-any-return]
