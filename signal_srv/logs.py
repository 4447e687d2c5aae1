"""The logging policy: access lines without secrets, text or JSON output, redaction as a backstop.

Peer tokens ride in the socket URL's query, so every URL is redacted before it is logged,
and the output formatters redact once more whatever a library logs on its own. Parameter
names are compared decoded, as the server reads them: ``tok%65n=`` is a ``token`` too.
"""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import unquote_plus

from tornado.web import RequestHandler

from signal_srv.metrics import Metrics

__all__ = [
    "HTTP_METHODS", "SECRET_PARAMETERS", "JsonFormatter", "log_request", "redact", "route_label", "setup_logging",
]

access_log = logging.getLogger("signal_srv.access")

# Metric labels come from fixed sets, so no request can add a series: see ``route_label``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

SECRET_PARAMETERS = frozenset({"token", "peer_token"})

# A query parameter (name=value) anywhere in a text; the name is matched as written.
_QUERY_PARAMETER = re.compile(r"(?<=[?&;])([^=&;?#\s'\"]+)=([^&;#\s'\"]*)")


def redact(text: str) -> str:
    """``text`` with the values of secret query parameters replaced, fit for a log line."""
    return _QUERY_PARAMETER.sub(_redact_parameter, text) if "=" in text else text


def _redact_parameter(match: re.Match[str]) -> str:
    if unquote_plus(match.group(1)).strip().lower() in SECRET_PARAMETERS:
        return match.group(1) + "=[redacted]"
    return match.group(0)


def log_request(handler: RequestHandler) -> None:
    """Access log line: INFO, WARNING for 503 (overload), ERROR for other 5xx; feeds the latency histogram."""
    status = handler.get_status()
    request = handler.request
    seconds = request.request_time()
    level = logging.INFO if status < 500 else logging.WARNING if status == 503 else logging.ERROR
    if access_log.isEnabledFor(level):  # redacting the URL is most of the line's cost
        access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, redact(request.uri or ""),
                       request.remote_ip, 1000.0 * seconds)
    metrics = getattr(handler, "metrics", None)
    if isinstance(metrics, Metrics):
        method = request.method if request.method in HTTP_METHODS else "other"
        metrics.request_seconds.labels(route_label(handler), method).observe(seconds)


def route_label(handler: RequestHandler) -> str:
    """The route's handler class, or ``other`` for a handler that stands for no route."""
    return getattr(handler, "route_label", None) or type(handler).__name__


class TextFormatter(logging.Formatter):
    """``time level logger: message``, redacted; ``time [node] level ...`` when a node id is given."""

    def __init__(self, node_id: str = "") -> None:
        node = f"[{node_id}] " if node_id else ""
        super().__init__(f"%(asctime)s {node}%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``node_id``, and ``call_id`` when the record carries one; redacted."""

    def __init__(self, node_id: str = "") -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if self.node_id:
            entry["node_id"] = self.node_id
        for key in ("call_id", "peer_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def setup_logging(level: str, output_format: str, node_id: str = "") -> None:
    """Log to stderr at ``level`` in ``text`` or ``json``, every line naming ``node_id``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(node_id) if output_format == "json" else TextFormatter(node_id))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
