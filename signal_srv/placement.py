"""Where a call lives and how to reach it: the one seam between the edges and a cluster.

The registry and the socket edge ask a ``Placement`` for any call this process does not
hold, and tell it when a call held here is created, changes or ends. ``LocalPlacement``
is the single-process answer (every call is here, or nowhere); the Redis-backed cluster
answer lives in ``signal_srv.cluster`` and is the only code that knows Redis exists.
"""

from __future__ import annotations

import secrets
import socket
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from signal_srv.call import Event, Status
from signal_srv.errors import CallNotFound

if TYPE_CHECKING:
    from signal_srv.actor import CallActor, CallSummary, Journal, Socket
    from signal_srv.config import Config
    from signal_srv.metrics import Metrics
    from signal_srv.registry import Registry

__all__ = ["CallRef", "LocalPlacement", "Placement", "make_placement", "new_node_id"]


def new_node_id() -> str:
    """``<host>-<8 hex digits>``: unique per process start, readable in logs."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "._-")[:40] or "node"
    return f"{host}-{secrets.token_hex(4)}"


class CallRef(Protocol):
    """A live call, wherever it runs: a local ``CallActor`` or a bridge to the node that owns it."""

    call_id: str

    def tell(self, event: Event, socket: Socket | None = None) -> bool: ...

    async def put(self, event: Event, socket: Socket | None = None) -> None: ...

    async def ask(self, event: Event, timeout: float, socket: Socket | None = None) -> Any: ...

    async def describe(self, timeout: float, peers: bool = False) -> CallSummary: ...

    def vouches_for(self, digest: bytes, peer_id: str | None = None) -> bool:
        """False only if ``digest`` is surely no participant's token digest (``peer_id``'s): refuse it unasked."""


class Placement(Protocol):
    """Ownership and reachability of calls; every method may raise ``Unavailable``."""

    node_id: str

    @property
    def journal(self) -> Journal | None:
        """Where the calls held here log what they decide (None: nowhere)."""

    @property
    def keeps_calls(self) -> bool:
        """True: calls outlive this process (a graceful stop hands them over)."""

    def attach(self, registry: Registry) -> None:
        """Called once by the registry whose calls this placement publishes."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool:
        """True while calls can be created and found (the shared store, if any, answers)."""

    async def claim(self, call_id: str) -> None:
        """Record that a new call is created here; raises ``Unavailable`` if that cannot be done."""

    async def locate(self, call_id: str) -> CallRef:
        """A call not held by this process. Raises ``CallNotFound`` or ``Unavailable``."""

    def begin(self, actor: CallActor) -> None:
        """A call was created here (its actor exists, its loop has not run yet)."""

    def changed(self, actor: CallActor) -> None:
        """A call held here changed status or participants."""

    async def flush(self) -> None:
        """Return once every change reported so far is visible to every node."""

    def released(self, actor: CallActor) -> None:
        """A call held here ended."""

    async def listing(self, status: Status | None, limit: int, peers: bool = False) -> list[CallSummary]:
        """Summaries of live calls everywhere, newest first (``peers``: with participants)."""

    def health(self) -> dict[str, Any]:
        """Fields for ``/healthz``."""

    async def hand_off(self, restart: Callable[[], Awaitable[None]]) -> None:
        """Graceful stop of a node whose calls go on elsewhere; ``restart`` stops every call here."""


class LocalPlacement:
    """One process: every call lives here, so nothing needs publishing."""

    journal = None
    keeps_calls = False

    def __init__(self, node_id: str = "") -> None:
        self.node_id = node_id or new_node_id()
        self._registry: Registry | None = None

    def attach(self, registry: Registry) -> None:
        self._registry = registry

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    async def claim(self, call_id: str) -> None:
        pass

    async def locate(self, call_id: str) -> CallRef:
        raise CallNotFound()

    def begin(self, actor: CallActor) -> None:
        pass

    def changed(self, actor: CallActor) -> None:
        pass

    async def flush(self) -> None:
        pass

    def released(self, actor: CallActor) -> None:
        pass

    async def listing(self, status: Status | None, limit: int, peers: bool = False) -> list[CallSummary]:
        assert self._registry is not None
        return self._registry.list(status, limit, peers)

    def health(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "redis": "none"}

    async def hand_off(self, restart: Callable[[], Awaitable[None]]) -> None:
        raise NotImplementedError("one process keeps no call beyond its life")


def make_placement(config: Config, metrics: Metrics) -> Placement:
    """``LocalPlacement`` without ``redis_url``; the Redis cluster placement with it."""
    node_id = config.node_id or new_node_id()
    if not config.redis_url:
        return LocalPlacement(node_id)
    from signal_srv.cluster import ClusterPlacement  # only a cluster node loads the Redis client

    return ClusterPlacement(config, node_id, metrics)
