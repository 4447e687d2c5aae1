"""Configuration: embedded defaults < conf file (``--conf``) < ``SIGNAL_SRV_*`` env < flags.

Everything is read and checked once, at start-up, into a frozen ``Config``; a bad value
raises ``ConfigError`` naming the option, the value and the rule. This is the only module
that uses ``tornado.options`` (through a private ``OptionParser``, never the global one).

The environment is shared with whatever runs the process: Kubernetes injects service-link
variables (``SIGNAL_SRV_SERVICE_HOST``, ``SIGNAL_SRV_PORT=tcp://10.0.0.12:8080``, ...) for a
Service named ``signal-srv``. So a ``SIGNAL_SRV_*`` variable that names no option, or a
``*_PORT`` option whose value is such a link, is ignored and reported by ``ignored_environment``
for the log, instead of stopping the server.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import urllib.parse
import types
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

from signal_srv import auth
from signal_srv.errors import ConfigError
from signal_srv.hosts import is_host_pattern
from signal_srv.messages import is_decimal

__all__ = ["ENV_PREFIX", "EVENT_LOOPS", "Config", "ignored_environment", "load_config", "option_parser",
           "uvloop_installed"]

ENV_PREFIX = "SIGNAL_SRV_"
NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")

# Kubernetes (and Docker's legacy links) set <SERVICE>_PORT=tcp://<host>:<port>.
_SERVICE_LINK = re.compile(r"(?:tcp|udp|sctp)://[^\s/]+:\d+")


@dataclass(frozen=True, slots=True)
class Config:
    """Every option; seconds are floats."""

    conf: str = ""
    address: str = "127.0.0.1"
    port: int = 8080
    listen_backlog: int = 4096
    event_loop: str = "auto"
    call_ttl: float = 3600.0
    cleanup_interval: float = 10800.0
    max_participants: int = 2
    max_calls: int = 100000
    list_calls: str = "public"
    log_level: str = "info"
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ("localhost",)
    heartbeat_interval: float = 20.0
    heartbeat_timeout: float = 60.0
    ws_buffer_limit: int = 64
    ws_buffer_bytes: int = 262144
    held_bytes_total: int = 134217728
    ws_write_buffer_limit: int = 1048576
    ws_close_grace: float = 5.0
    max_message_size: int = 65536
    max_body_size: int = 4096
    mailbox_size: int = 256
    ask_timeout: float = 5.0
    ice_servers: str = "[]"
    xheaders: bool = False
    rate_create: float = 5.0
    rate_create_burst: int = 20
    rate_join: float = 10.0
    rate_join_burst: int = 20
    ws_rate: float = 50.0
    ws_rate_burst: int = 200
    ws_bytes_rate: float = 65536.0
    ws_bytes_burst: int = 262144
    ws_reconnect_rate: float = 1.0
    ws_reconnect_burst: int = 10
    ws_ip_rate: float = 200.0
    ws_ip_rate_burst: int = 400
    ws_ip_bytes_rate: float = 262144.0
    ws_ip_bytes_burst: int = 524288
    ws_ip_connect_rate: float = 10.0
    ws_ip_connect_burst: int = 20
    ws_sockets_per_ip: int = 100
    auth_failure_rate: float = 1.0
    auth_failure_burst: int = 20
    max_sockets: int = 200000
    http_connections_per_ip: int = 200
    http_idle_timeout: float = 60.0
    http_body_timeout: float = 30.0
    shutdown_timeout: float = 10.0
    metrics_port: int = 0
    log_format: str = "text"
    unclaimed_ttl: float = 300.0
    departure_timeout: float = 60.0
    max_call_duration: float = 0.0
    resume_buffer: int = 64
    resume_buffer_bytes: int = 262144
    turn_uris: tuple[str, ...] = ()
    turn_secret: str = field(default="", repr=False)
    turn_credential_ttl: float = 86400.0
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)
    webhook_timeout: float = 5.0
    webhook_retries: int = 3
    webhook_queue_size: int = 1000
    auth: str = "none"
    jwt_secret: str = field(default="", repr=False)
    jwt_secret_file: str = ""
    jwt_public_key: str = ""
    jwks_url: str = ""
    jwks_refresh_interval: float = 5.0
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway: float = 5.0
    redis_url: str = field(default="", repr=False)
    node_id: str = ""
    node_lease: float = 5.0


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Config))

_HELP = {
    "conf": "path of a conf file (Python syntax, see conf/dev.conf); none: embedded defaults",
    "address": "address to listen on",
    "port": "TCP port to listen on (0: any free port)",
    "listen_backlog": "connections the kernel queues for the server to accept (capped by net.core.somaxconn)",
    "event_loop": "'auto': uvloop if it is installed (pip install 'signal_srv[fast]'), else asyncio; "
                  "'asyncio'; 'uvloop'",
    "call_ttl": "seconds a call without connected sockets or traffic lives before it expires",
    "cleanup_interval": "seconds between background sweeps that reap expired calls",
    "max_participants": "participants a call holds (2 for 1:1 calls)",
    "max_calls": "live calls before POST /apiv2/calls answers 503 capacity",
    "list_calls": "'public': GET /apiv2/calls lists calls, POST ?reuse_last=true joins one; 'off': both answer 404",
    "log_level": "one of " + ", ".join(LOG_LEVELS),
    "allowed_origins": "comma-separated extra origins allowed to open sockets ('*': any);"
                       " the same origin on an allowed host always is",
    "allowed_hosts": "comma-separated host names the server answers to ('*.example.org': its subdomains; '*': any);"
                     " IP literals always; other hosts get 400",
    "heartbeat_interval": "seconds between WebSocket pings to every socket of a call",
    "heartbeat_timeout": "seconds a socket may leave a ping unanswered before it is dropped as dead",
    "ws_buffer_limit": "relayed messages held for a joined participant that is not connected",
    "ws_buffer_bytes": "bytes of relayed messages held for a joined participant that is not connected",
    "held_bytes_total": "bytes of relayed messages held for participants not connected, in the whole process",
    "ws_write_buffer_limit": "bytes queued to a slow socket before it is closed with 1013",
    "ws_close_grace": "seconds a socket closed as a slow reader (1013) has to read its close frame before it is cut",
    "max_message_size": "largest WebSocket frame accepted, in bytes (larger: close 1009)",
    "max_body_size": "largest REST request body, in bytes (larger: 413)",
    "mailbox_size": "envelopes queued for one call before REST requests get 503 call_busy",
    "ask_timeout": "seconds a request waits for its call to answer before 503 call_busy",
    "ice_servers": 'JSON list of RTCIceServer dicts for clients, e.g. [{"urls": "stun:stun.example.org"}]',
    "xheaders": "trust X-Forwarded-For / X-Real-IP / X-Scheme (only behind a reverse proxy)",
    "rate_create": "calls one client IP may create per second, sustained (0: no limit)",
    "rate_create_burst": "calls one client IP may create in a burst",
    "rate_join": "joins one client IP may make per second, sustained (0: no limit)",
    "rate_join_burst": "joins one client IP may make in a burst",
    "ws_rate": "frames (control frames and fragments too) one participant may send per second, sustained "
               "(0: no limit)",
    "ws_rate_burst": "frames one participant may send in a burst",
    "ws_bytes_rate": "frame bytes one participant may send per second, sustained (0: no limit)",
    "ws_bytes_burst": "frame bytes one participant may send in a burst",
    "ws_reconnect_rate": "socket connects one participant may make per second, sustained (0: no limit)",
    "ws_reconnect_burst": "socket connects one participant may make in a burst",
    "ws_ip_rate": "frames all sockets of one client IP may send per second together, sustained (0: no limit)",
    "ws_ip_rate_burst": "frames all sockets of one client IP may send in a burst",
    "ws_ip_bytes_rate": "frame bytes all sockets of one client IP may send per second together, sustained "
                        "(0: no limit)",
    "ws_ip_bytes_burst": "frame bytes all sockets of one client IP may send in a burst",
    "ws_ip_connect_rate": "socket connects (handshakes) one client IP may make per second, sustained (0: no limit)",
    "ws_ip_connect_burst": "socket connects one client IP may make in a burst",
    "ws_sockets_per_ip": "open signaling sockets one client IP may have (0: no limit)",
    "auth_failure_rate": "wrong tokens one client IP may send per second before 429 / close 1008 (0: no limit)",
    "auth_failure_burst": "wrong tokens one client IP may send in a burst",
    "max_sockets": "open signaling sockets in the process before new ones are closed with 1013",
    "http_connections_per_ip": "HTTP connections one TCP peer may have open (0: no limit; not applied with xheaders)",
    "http_idle_timeout": "seconds a connection may take to send a request's headers, counted from its opening "
                         "or the end of the previous response (so also the keep-alive idle time)",
    "http_body_timeout": "seconds a request may take to send its body",
    "shutdown_timeout": "seconds a graceful shutdown may take before the process exits anyway",
    "metrics_port": "serve /metrics on this port only (0: on the main port)",
    "log_format": "'text' or 'json' (one JSON object per line, for log shippers)",
    "unclaimed_ttl": "seconds a call nobody joined and whose host never connected lives",
    "departure_timeout": "seconds a participant may be without a connected socket before it leaves the call",
    "max_call_duration": "seconds a call may last at most (0: no limit)",
    "resume_buffer": "frames kept per participant for a reconnect with last_seq",
    "resume_buffer_bytes": "bytes of frames kept per participant for a reconnect with last_seq",
    "turn_uris": "comma-separated TURN URIs to hand out with time-limited credentials (needs turn_secret)",
    "turn_secret": "shared secret of the TURN server (coturn use-auth-secret / static-auth-secret)",
    "turn_credential_ttl": "seconds a TURN credential stays valid",
    "webhook_url": "URL that receives lifecycle events as signed JSON POSTs (empty: none)",
    "webhook_secret": "secret for the X-Signal-Srv-Signature HMAC-SHA256 of each webhook body",
    "webhook_timeout": "seconds one webhook delivery attempt may take",
    "webhook_retries": "retries of a webhook delivery after a 5xx, a timeout or a connection error",
    "webhook_queue_size": "webhook events queued before new ones are dropped (and counted)",
    "auth": "'none': anyone may create, join and list calls; 'jwt': only with the application's signed tokens",
    "jwt_secret": "HS256 secret of the application's tokens, at least 32 bytes (set it in the environment)",
    "jwt_secret_file": "path of a file holding the HS256 secret instead of jwt_secret",
    "jwt_public_key": "path of a PEM public key verifying the tokens: RSA (RS256) or EC P-256 (ES256)",
    "jwks_url": "URL of the JSON Web Key Set (JWKS) whose keys verify the tokens (RS256/ES256)",
    "jwks_refresh_interval": "seconds at least between two JWKS fetches triggered by tokens of unknown keys",
    "jwt_audience": "the aud claim every token must carry (empty: not checked)",
    "jwt_issuer": "the iss claim every token must carry (empty: not checked)",
    "jwt_leeway": "seconds of clock skew allowed on a token's exp, nbf and iat",
    "redis_url": "redis:// or rediss:// URL of the Redis (or Redis Cluster) shared by a cluster of nodes "
                 "(empty: one process, no Redis)",
    "node_id": "this process's name in the cluster, logs, /healthz and metrics (empty: <host>-<random>, new per start)",
    "node_lease": "seconds without a heartbeat after which a cluster node counts as gone",
}

_TYPES = {bool: bool, int: int, float: float, str: str, tuple: str}


def option_parser() -> OptionParser:
    """A private parser with every option defined (type, default, help)."""
    parser = OptionParser()
    for f in dataclasses.fields(Config):
        default: Any = f.default
        multiple = isinstance(default, tuple)
        parser.define(
            f.name, default=list(default) if multiple else default,
            type=_TYPES[type(default)], help=_HELP[f.name], multiple=multiple,
        )
    return parser


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the ``Config`` from a command line (``argv[0]`` is the program) and an environment.

    Prints the help and exits 0 on ``--help``. Raises ``ConfigError`` for anything invalid,
    except the environment variables ``ignored_environment`` reports.
    """
    parser = option_parser()
    args = list(argv[1:])
    if "--help" in args or "-h" in args:
        parser.print_help(sys.stdout)
        raise SystemExit(0)
    env = _env_args(environ)
    conf = _last_value("conf", env + args)
    if conf:
        _apply_file(parser, conf)
    for source, arg in [("environment", a) for a in env] + [("command line", a) for a in args]:
        _apply_arg(parser, arg, source)
    values = {name: value for name, value in parser.as_dict().items() if name != "help"}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    return _checked(Config(**values))


def ignored_environment(environ: Mapping[str, str]) -> list[str]:
    """One line per ``SIGNAL_SRV_*`` variable that ``load_config`` ignores, and why (for the log)."""
    return [problem for key, value in sorted(environ.items()) if (problem := _env_problem(key, value)) is not None]


def _env_problem(key: str, value: str) -> str | None:
    """Why the variable ``key`` is not an option setting, or None when it is one (or not ours)."""
    if not key.startswith(ENV_PREFIX):
        return None
    name = key[len(ENV_PREFIX):].lower()
    if name not in _OPTION_NAMES:
        return f"ignoring {key}: signal_srv has no option {name!r} (see --help)"
    if name.endswith("port") and _SERVICE_LINK.fullmatch(value):
        return (f"ignoring {key}={value!r}: a Kubernetes service link, not a port number; "
                f"set --{name}=<number> or {key}=<number> in the container's env (see README, Kubernetes)")
    return None


def _env_args(environ: Mapping[str, str]) -> list[str]:
    return [f"--{key[len(ENV_PREFIX):].lower()}={value}" for key, value in sorted(environ.items())
            if key.startswith(ENV_PREFIX) and _env_problem(key, value) is None]


def _last_value(name: str, args: list[str]) -> str:
    value = ""
    for arg in args:
        key, _, rest = arg.lstrip("-").partition("=")
        if key.replace("-", "_") == name:
            value = rest
    return value


def _apply_arg(parser: OptionParser, arg: str, source: str) -> None:
    if not arg.startswith("-"):
        raise ConfigError(f"unexpected argument {arg!r} on the {source}: options look like --name=value")
    name = arg.lstrip("-").partition("=")[0].replace("-", "_")
    if name not in parser:
        raise ConfigError(f"unknown option --{name} on the {source} (see --help)")
    try:
        parser.parse_command_line(["signal-srv", arg], final=False)
    except (OptionsError, ValueError) as exc:
        raise ConfigError(f"--{name} on the {source}: {exc}") from None


def _apply_file(parser: OptionParser, path: str) -> None:
    try:
        with open(path, "rb") as f:
            source = f.read()
        namespace: dict[str, Any] = {"__file__": os.path.abspath(path)}
        exec(compile(source, path, "exec"), namespace)
    except OSError as exc:
        raise ConfigError(f"conf: cannot read {path!r}: {exc.strerror}") from None
    except Exception as exc:
        raise ConfigError(f"conf: {path!r} is not a valid conf file: {exc}") from None
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if name not in defaults or name == "conf":
            raise ConfigError(f"conf: {path!r} sets unknown option {name!r}")
        default = defaults[name]
        if isinstance(value, str) and not isinstance(default, str):
            _apply_arg(parser, f"--{name}={value}", f"conf file {path!r}")
            continue
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, tuple) and isinstance(value, (list, tuple)):
            value = list(value)
        try:
            setattr(parser, name, value)
        except OptionsError as exc:
            raise ConfigError(f"conf: {path!r}: {exc}") from None


def uvloop_installed() -> bool:
    """Whether the optional ``uvloop`` (the ``fast`` extra) can be imported."""
    return importlib.util.find_spec("uvloop") is not None


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {rule}")


def _checked(c: Config) -> Config:
    for name in ("call_ttl", "cleanup_interval", "heartbeat_interval", "heartbeat_timeout", "ask_timeout",
                 "shutdown_timeout", "ws_close_grace", "unclaimed_ttl", "departure_timeout", "turn_credential_ttl",
                 "webhook_timeout", "node_lease", "http_idle_timeout", "http_body_timeout"):
        value = getattr(c, name)
        _require(math.isfinite(value) and value > 0, name, value, "must be a number of seconds > 0")
    _require(0 <= c.port <= 65535, "port", c.port, "must be between 0 and 65535")
    _require(c.listen_backlog >= 1, "listen_backlog", c.listen_backlog, "must be at least 1")
    _require(c.event_loop in EVENT_LOOPS, "event_loop", c.event_loop, "must be one of " + ", ".join(EVENT_LOOPS))
    _require(c.event_loop != "uvloop" or uvloop_installed(), "event_loop", c.event_loop,
             "uvloop is not installed (pip install 'signal_srv[fast]')")
    _require(2 <= c.max_participants <= 16, "max_participants", c.max_participants, "must be between 2 and 16")
    for name in ("max_calls", "ws_buffer_limit", "mailbox_size", "max_sockets", "rate_create_burst",
                 "rate_join_burst", "ws_rate_burst", "ws_bytes_burst", "ws_reconnect_burst",
                 "ws_ip_rate_burst", "ws_ip_bytes_burst", "ws_ip_connect_burst", "auth_failure_burst",
                 "resume_buffer", "resume_buffer_bytes", "webhook_queue_size"):
        _require(getattr(c, name) >= 1, name, getattr(c, name), "must be at least 1")
    for name in ("ws_sockets_per_ip", "http_connections_per_ip"):
        _require(getattr(c, name) >= 0, name, getattr(c, name), "must be at least 0 (0: no limit)")
    for name in ("rate_create", "rate_join", "ws_rate", "ws_bytes_rate", "ws_reconnect_rate", "ws_ip_rate",
                 "ws_ip_bytes_rate", "ws_ip_connect_rate", "auth_failure_rate"):
        value = getattr(c, name)
        _require(math.isfinite(value) and value >= 0, name, value, "must be a rate per second >= 0 (0: no limit)")
    _require(0 <= c.metrics_port <= 65535, "metrics_port", c.metrics_port, "must be between 0 and 65535")
    _require(c.log_format in ("text", "json"), "log_format", c.log_format, "must be 'text' or 'json'")
    _require(c.list_calls in ("public", "off"), "list_calls", c.list_calls, "must be 'public' or 'off'")
    _require(c.log_level in LOG_LEVELS, "log_level", c.log_level, "must be one of " + ", ".join(LOG_LEVELS))
    _require(c.max_message_size >= 1024, "max_message_size", c.max_message_size, "must be at least 1024 bytes")
    _require(c.max_body_size >= 256, "max_body_size", c.max_body_size, "must be at least 256 bytes")
    _require(c.ws_buffer_bytes >= c.max_message_size, "ws_buffer_bytes", c.ws_buffer_bytes,
             f"must be at least max_message_size ({c.max_message_size})")
    _require(c.held_bytes_total >= c.ws_buffer_bytes, "held_bytes_total", c.held_bytes_total,
             f"must be at least ws_buffer_bytes ({c.ws_buffer_bytes})")
    _require(c.ws_write_buffer_limit >= 2 * c.max_message_size, "ws_write_buffer_limit", c.ws_write_buffer_limit,
             f"must be at least twice max_message_size ({c.max_message_size})")
    _require(math.isfinite(c.max_call_duration) and c.max_call_duration >= 0, "max_call_duration",
             c.max_call_duration, "must be a number of seconds >= 0 (0: no limit)")
    _require(c.webhook_retries >= 0, "webhook_retries", c.webhook_retries, "must be at least 0")
    _require(not c.turn_uris or bool(c.turn_secret), "turn_uris", ",".join(c.turn_uris),
             "needs turn_secret to sign the credentials")
    _require(all(u.startswith(("turn:", "turns:")) for u in c.turn_uris), "turn_uris", ",".join(c.turn_uris),
             "every URI must start with turn: or turns:")
    _require(not c.webhook_url or c.webhook_url.startswith(("http://", "https://")), "webhook_url",
             c.webhook_url, "must be an http:// or https:// URL")
    _require(not c.webhook_url or bool(c.webhook_secret), "webhook_url", c.webhook_url,
             "needs webhook_secret to sign the events")
    _require(all(is_host_pattern(h) for h in c.allowed_hosts), "allowed_hosts", ",".join(c.allowed_hosts),
             "every entry must be a host name without scheme or port, '*.' and a domain, '*', or an IP address")
    _check_ice_servers(c.ice_servers)
    _check_redis_url(c.redis_url)
    _require(not c.node_id or bool(NODE_ID.fullmatch(c.node_id)), "node_id", c.node_id,
             "must be 1 to 64 letters, digits, '.', '_' or '-'")
    _require(c.node_lease >= 1, "node_lease", c.node_lease, "must be at least 1 second")
    return _checked_auth(c)


def _checked_auth(c: Config) -> Config:
    """The access-control options; reads ``jwt_secret_file`` into ``jwt_secret``. Never prints a secret."""
    _require(c.auth in ("none", "jwt"), "auth", c.auth, "must be 'none' or 'jwt'")
    _require(math.isfinite(c.jwt_leeway) and c.jwt_leeway >= 0, "jwt_leeway", c.jwt_leeway,
             "must be a number of seconds >= 0")
    _require(math.isfinite(c.jwks_refresh_interval) and c.jwks_refresh_interval > 0, "jwks_refresh_interval",
             c.jwks_refresh_interval, "must be a number of seconds > 0")
    sources = [name for name in ("jwt_secret", "jwt_secret_file", "jwt_public_key", "jwks_url") if getattr(c, name)]
    if c.auth == "none":
        if sources:
            raise ConfigError(f"{sources[0]} is set but auth is 'none': set auth = 'jwt' to use it, or remove it")
        return c
    if len(sources) != 1:
        raise ConfigError("auth=jwt needs exactly one of jwt_secret, jwt_secret_file, jwt_public_key, jwks_url"
                          + (f" (set: {', '.join(sources)})" if sources else ""))
    if c.jwt_secret_file:
        try:
            with open(c.jwt_secret_file, encoding="utf-8") as f:
                c = dataclasses.replace(c, jwt_secret=f.read().rstrip("\r\n"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"jwt_secret_file: cannot read {c.jwt_secret_file!r}: "
                              f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from None
    if c.jwt_secret and len(c.jwt_secret.encode()) < auth.MIN_SECRET_BYTES:
        raise ConfigError(f"jwt_secret: must be at least {auth.MIN_SECRET_BYTES} bytes (RFC 7518 section 3.2)")
    if c.jwt_public_key:
        try:
            auth.load_public_key(c.jwt_public_key)
        except ValueError as exc:
            raise ConfigError(f"jwt_public_key: {exc}") from None
    _require(not c.jwks_url or c.jwks_url.startswith(("http://", "https://")), "jwks_url", c.jwks_url,
             "must be an http:// or https:// URL")
    return c


def _check_redis_url(url: str) -> None:
    """Empty, or ``redis[s]://[user:password@]host[:port][/db]``; the password never reaches the message."""
    if not url:
        return
    rule = "must look like redis://[:password@]host[:port][/db] or rediss://..."
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"redis_url: {rule}") from None
    shown = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.hostname or ''}:{port or ''}"))
    _require(parts.scheme in ("redis", "rediss") and bool(parts.hostname), "redis_url", shown, rule)
    db = parts.path.lstrip("/")
    _require(db == "" or is_decimal(db), "redis_url", shown, "the database after '/' must be a number")


def _check_ice_servers(text: str) -> None:
    rule = 'must be a JSON list of objects with "urls", e.g. [{"urls": "stun:stun.example.org:3478"}]'
    try:
        servers = json.loads(text)
    except ValueError:
        raise ConfigError(f"ice_servers={text!r}: {rule}") from None
    ok = isinstance(servers, list) and all(isinstance(s, dict) and "urls" in s for s in servers)
    _require(ok, "ice_servers", text, rule)
