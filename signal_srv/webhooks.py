"""``Webhooks``: signed lifecycle events POSTed to one URL, off the calls' path.

``emit`` is synchronous and O(1): it stamps the event (id, time), serialises it and puts it
on a bounded queue, or drops and counts it when the queue is full. One delivery task POSTs
the events in emit order, retrying connection errors, timeouts and 5xx with exponential
backoff; a 4xx (or 3xx) is final. A slow or dead receiver therefore costs queue slots and
dropped events, never a delayed call.

Each body is signed: ``X-Signal-Srv-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
Neither the secret nor the URL's query or credentials ever reach a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.queues import Queue, QueueEmpty, QueueFull

if TYPE_CHECKING:
    from signal_srv.metrics import Metrics

__all__ = ["EVENTS", "OUTCOMES", "Webhooks", "sign"]

logger = logging.getLogger(__name__)

EVENTS = frozenset({"call_created", "participant_joined", "participant_left", "call_ended"})
OUTCOMES = ("delivered", "failed", "dropped", "retried")  # keys of the ``webhooks`` counter
SIGNATURE_HEADER = "X-Signal-Srv-Signature"
USER_AGENT = "signal-srv-webhooks"


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _utc_now() -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T16:00:00.000Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_url(url: str) -> str:
    """``url`` without credentials, query or fragment, fit for a log line."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


@dataclass(frozen=True, slots=True)
class _Event:
    id: str
    event: str
    call_id: str
    body: bytes


class _Refused(Exception):
    """The receiver answered with a status that retrying will not change (3xx, 4xx)."""


class Webhooks:
    """Delivers lifecycle events to ``url``; use from the IOLoop only (not thread-safe).

    ``metrics.webhooks`` (a ``Counter``; created if missing) counts events ``delivered``,
    ``failed`` (retries exhausted or refused) and ``dropped`` (queue full or closed), and
    ``retried`` attempts. ``backoff`` is the first retry delay; each next one doubles, up
    to ``max_backoff``.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        queue_size: int = 1000,
        timeout: float = 5.0,
        retries: int = 3,
        metrics: Metrics | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        if queue_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("queue_size >= 1, timeout > 0, retries >= 0 and backoff >= 0 are required")
        self.url = url
        self._secret = secret
        self.queue_size = queue_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        counts = getattr(metrics, "webhooks", None)
        if counts is None:
            counts = Counter()
            if metrics is not None:
                setattr(metrics, "webhooks", counts)
        self.counts: Counter[str] = counts
        self._queue: Queue[_Event] = Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._http: AsyncHTTPClient | None = None
        self._in_flight: _Event | None = None
        self._closed = False
        self._dropping = 0  # events dropped in the current burst (0: not dropping)
        self._failing = 0  # events failed in a row (0: the receiver is fine)

    def __repr__(self) -> str:
        return f"Webhooks({_safe_url(self.url)!r}, queued={self._queue.qsize()})"

    @property
    def pending(self) -> int:
        """Events queued and not yet being delivered."""
        return self._queue.qsize()

    # Producing -----------------------------------------------------------------------

    def emit(self, event: str, call_id: str, **fields: object) -> None:
        """Queue one event without blocking; never awaits, never raises.

        ``event`` is one of ``EVENTS``; ``fields`` (e.g. ``peer_id``, ``reason``) join the
        body after ``id``, ``event``, ``time`` and ``call_id``, which they cannot replace.
        Never pass a secret (a peer token) as a field. When the queue is full, or after
        ``close``, the event is dropped and counted.
        """
        try:
            if event not in EVENTS:
                logger.error("webhook event %r for call %s is not one of %s; dropped", event, call_id, sorted(EVENTS))
                return
            self._put(self._stamp(event, call_id, fields))
        except Exception:
            logger.exception("webhook %s for call %s could not be queued", event, call_id)

    def _stamp(self, event: str, call_id: str, fields: dict[str, object]) -> _Event:
        event_id = secrets.token_urlsafe(12)
        payload: dict[str, object] = {"id": event_id, "event": event, "time": _utc_now(), "call_id": call_id}
        for key, value in fields.items():
            payload.setdefault(key, value)
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        return _Event(event_id, event, call_id, body)

    def _put(self, item: _Event) -> None:
        depth = self._queue.qsize()
        if not self._closed:
            try:
                self._queue.put_nowait(item)
            except QueueFull:
                pass
            else:
                # Low-water mark, as in websockets' max_queue: a burst ends only once the
                # queue has drained to half, so a queue hovering at full logs nothing more.
                if self._dropping and depth <= self.queue_size // 2:
                    logger.warning("webhook queue accepts events again; dropped %d events", self._dropping)
                    self._dropping = 0
                return
        self.counts["dropped"] += 1
        if not self._dropping:
            why = "webhooks are closed" if self._closed else f"webhook queue full ({self.queue_size} events)"
            logger.warning("%s; dropping events (first: %s for call %s)", why, item.event, item.call_id)
        self._dropping += 1

    # Delivering ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery task on the running loop (once; later calls do nothing)."""
        if self._task is None and not self._closed:
            self._http = AsyncHTTPClient(force_instance=True)
            self._task = asyncio.get_running_loop().create_task(self._run())
            logger.info("webhooks to %s", _safe_url(self.url))

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            self._in_flight = item
            try:
                await self._deliver(item)
            except Exception:
                self.counts["failed"] += 1
                logger.exception("webhook %s %s for call %s: delivery crashed", item.event, item.id, item.call_id)
            finally:
                self._in_flight = None
                self._queue.task_done()

    async def _deliver(self, item: _Event) -> None:
        """POST ``item`` until it is accepted, refused, or out of retries; count the outcome."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.counts["retried"] += 1
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                await self._post(item)
            except _Refused as exc:
                self._failed(item, f"refused: {exc}; not retried")
                return
            except Exception as exc:  # connection error, timeout (599), 5xx
                last = _describe(exc)
                logger.debug("webhook %s attempt %d failed: %s", item.id, attempt + 1, last)
                continue
            self.counts["delivered"] += 1
            if self._failing:
                logger.info("webhook receiver accepts events again after %d failed", self._failing)
                self._failing = 0
            return
        self._failed(item, f"{last}; gave up after {self.retries + 1} attempts")

    async def _post(self, item: _Event) -> None:
        assert self._http is not None
        request = HTTPRequest(
            self.url, method="POST", body=item.body, headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self._secret, item.body),
                "X-Signal-Srv-Event": item.event,
                "X-Signal-Srv-Delivery": item.id,
            },
            connect_timeout=self.timeout, request_timeout=self.timeout,
            follow_redirects=False, user_agent=USER_AGENT,
        )
        response = await self._http.fetch(request, raise_error=False)
        if response.code >= 500:
            raise HTTPClientError(response.code)
        if not 200 <= response.code < 300:
            raise _Refused(f"HTTP {response.code}")

    def _failed(self, item: _Event, why: str) -> None:
        self.counts["failed"] += 1
        if self._failing:
            logger.debug("webhook %s %s for call %s failed: %s", item.event, item.id, item.call_id, why)
        else:
            logger.warning(
                "webhook %s %s for call %s failed: %s (further failures are logged at DEBUG until one succeeds)",
                item.event, item.id, item.call_id, why,
            )
        self._failing += 1

    # Stopping ------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop.

        Events still undelivered then (queued or in flight) are counted as dropped; events
        emitted after ``close`` are dropped too.
        """
        if self._closed:
            return
        self._closed = True
        in_flight = 0
        if self._task is not None:
            try:
                await self._queue.join(timeout=timedelta(seconds=timeout))
            except TimeoutError:
                pass
            in_flight = int(self._in_flight is not None)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._dropping:
            logger.warning("webhooks closing; dropped %d events in the last burst", self._dropping)
            self._dropping = 0
        left = in_flight + self._drain()
        if left:
            self.counts["dropped"] += left
            logger.warning("webhooks closed with %d events undelivered", left)
        if self._http is not None:
            self._http.close()
            self._http = None

    def _drain(self) -> int:
        count = 0
        while True:
            try:
                self._queue.get_nowait()
            except QueueEmpty:
                return count
            self._queue.task_done()
            count += 1


def _describe(exc: Exception) -> str:
    """A short cause for a log line; never the URL (it may carry credentials)."""
    if isinstance(exc, HTTPClientError):
        return "timeout" if exc.code == 599 and "Timeout" in str(exc) else f"HTTP {exc.code}"
    return type(exc).__name__ + (f": {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else "")
