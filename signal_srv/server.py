"""``main()``: load the configuration, serve, and shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Sequence

from tornado.httpserver import HTTPServer

from signal_srv.app import make_app
from signal_srv.config import Config, load_config
from signal_srv.errors import ConfigError

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)

# Headroom above max_body_size: our handlers answer 413 themselves; this is the backstop.
BODY_BACKSTOP = 1024


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Listen and serve until ``stop`` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    stop = stop or asyncio.Event()
    app = make_app(config)
    registry = app.settings["registry"]
    server = HTTPServer(app, xheaders=config.xheaders, max_body_size=config.max_body_size + BODY_BACKSTOP)
    sockets = server.listen(config.port, config.address) or []
    registry.start_sweeping(config.cleanup_interval)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("signal_srv listening on http://%s:%d/", config.address, _bound_port(server, config))
    await stop.wait()
    logger.info("signal_srv stopping: %d live calls", len(registry))
    server.stop()
    await registry.close()
    await server.close_all_connections()
    logger.info("signal_srv stopped")
    del sockets


def _bound_port(server: HTTPServer, config: Config) -> int:
    for sock in server._sockets.values():  # type: ignore[attr-defined]
        return int(sock.getsockname()[1])
    return config.port


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: exit status 2 on a bad configuration, 0 after a clean shutdown."""
    try:
        config = load_config(list(argv) if argv is not None else sys.argv, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"signal-srv: configuration error: {exc}\n")
        raise SystemExit(2) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(config))
