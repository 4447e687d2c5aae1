"""Abuse limits: token buckets per client IP and per participant, and open connections per IP.

Pure: time is a parameter. A bucket holds up to ``burst`` tokens and refills at ``rate``
tokens per second; taking ``cost`` tokens (1 per request or frame, or a frame's bytes) is
granted, or refused with the seconds to wait.
Every keyed map here stays bounded in memory: a bucket that has refilled completely is
indistinguishable from a new one, so it can be dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Protocol, TypeVar

from signal_srv.config import Config

__all__ = ["Budget", "Budgets", "Limits", "OpenCount", "RateLimiter", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; return 0.0 if granted, else the seconds until it would be.

        A cost above ``burst`` is granted from a full bucket, which it leaves in debt.
        """
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(cost, self.burst)
        if self.tokens >= need:
            self.tokens -= cost
            return 0.0
        return (need - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class _Refills(Protocol):
    def is_full(self, now: float) -> bool: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=_Refills)

# A keyed map is pruned once it has doubled since the last pruning (and holds at least this many).
PRUNE_FLOOR = 1024


class _BoundedMap(Generic[K, V]):
    """Values that refill over time, per key, created by ``make(now)`` on first use.

    Pruning drops the values that have refilled completely, once the map has doubled since
    the last pruning (amortised O(1) per use), and never lets it pass ``max_keys``: there it
    also drops the oldest half. Memory follows the keys active in the last refill period.
    """

    def __init__(self, make: Callable[[float], V], max_keys: int) -> None:
        self.make = make
        self.max_keys = max_keys
        self._items: dict[K, V] = {}
        self._prune_at = min(PRUNE_FLOOR, max_keys)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, now: float) -> V:
        value = self._items.get(key)
        if value is None:
            if len(self._items) >= self._prune_at:
                self._prune(now)
            value = self._items[key] = self.make(now)
        return value

    def _prune(self, now: float) -> None:
        kept = {k: v for k, v in self._items.items() if not v.is_full(now)}
        if len(kept) >= self.max_keys:
            keys = list(kept)
            kept = {k: kept[k] for k in keys[len(keys) // 2:]}
        self._items = kept
        self._prune_at = min(self.max_keys, max(PRUNE_FLOOR, 2 * len(kept)))


class RateLimiter:
    """One token bucket per key (a client IP). ``rate <= 0`` turns the limit off."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: _BoundedMap[str, TokenBucket] = _BoundedMap(
            lambda now: TokenBucket.full(self.rate, self.burst, now), max_keys)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """0.0 if ``key`` may go ahead, else the seconds it should wait."""
        if not self.enabled:
            return 0.0
        return self._buckets.get(key, now).take(now)


def _bucket(rate: float, burst: float, now: float) -> TokenBucket | None:
    """A full bucket, or None when ``rate <= 0`` turns the limit off."""
    return TokenBucket.full(rate, max(burst, 1.0), now) if rate > 0 else None


@dataclass(slots=True)
class Budget:
    """What one participant (or all sockets of one client IP) may send: frames and bytes per
    second, and connects.

    It belongs to the participant, not to a socket, so a reconnect goes on from what is
    left. A ``None`` bucket is a limit turned off.
    """

    frames: TokenBucket | None
    bytes: TokenBucket | None
    connects: TokenBucket | None

    @classmethod
    def full(cls, now: float, frames: tuple[float, float], size: tuple[float, float],
             connects: tuple[float, float]) -> Budget:
        """A full budget from ``(rate, burst)`` pairs; a rate <= 0 turns that limit off."""
        return cls(_bucket(*frames, now), _bucket(*size, now), _bucket(*connects, now))

    def charge(self, now: float, size: int) -> float:
        """Take one frame of ``size`` bytes; 0.0 if granted, else the seconds to wait."""
        wait = self.frames.take(now) if self.frames is not None else 0.0
        if not wait and self.bytes is not None:
            wait = self.bytes.take(now, size)
        return wait

    def connect(self, now: float) -> float:
        """Take one socket connect; 0.0 if granted, else the seconds to wait."""
        return self.connects.take(now) if self.connects is not None else 0.0

    def is_full(self, now: float) -> bool:
        return all(b is None or b.is_full(now) for b in (self.frames, self.bytes, self.connects))


class Budgets:
    """A ``Budget`` per participant, keyed by ``(call_id, peer_id)``, and one per client IP that all
    of its sockets share; both bounded in memory."""

    def __init__(self, config: Config, max_keys: int = 100000) -> None:
        c = config
        self._participants: _BoundedMap[tuple[str, str], Budget] = _BoundedMap(lambda now: Budget.full(
            now, (c.ws_rate, c.ws_rate_burst), (c.ws_bytes_rate, c.ws_bytes_burst),
            (c.ws_reconnect_rate, c.ws_reconnect_burst)), max_keys)
        self._ips: _BoundedMap[str, Budget] = _BoundedMap(lambda now: Budget.full(
            now, (c.ws_ip_rate, c.ws_ip_rate_burst), (c.ws_ip_bytes_rate, c.ws_ip_bytes_burst),
            (c.ws_ip_connect_rate, c.ws_ip_connect_burst)), max_keys)

    def __len__(self) -> int:
        return len(self._participants) + len(self._ips)

    def of(self, call_id: str, peer_id: str, now: float) -> Budget:
        """The participant's budget, created full on first use."""
        return self._participants.get((call_id, peer_id), now)

    def of_ip(self, ip: str, now: float) -> Budget:
        """The client address's budget, created full on first use."""
        return self._ips.get(ip, now)


class OpenCount:
    """Open connections per client IP, with a cap (``cap <= 0``: none). IPs at zero are dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    def acquire(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (and nothing counted) at the cap."""
        if 0 < self.cap <= self._open[ip]:
            return False
        self._open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]


class Limits:
    """The process's abuse limits, shared by the REST and WebSocket edges."""

    def __init__(self, config: Config) -> None:
        self.create = RateLimiter(config.rate_create, config.rate_create_burst)
        self.join = RateLimiter(config.rate_join, config.rate_join_burst)
        self.auth_failures = RateLimiter(config.auth_failure_rate, config.auth_failure_burst)
        self.max_sockets = config.max_sockets
        self.budgets = Budgets(config)
        self.sockets_per_ip = OpenCount(config.ws_sockets_per_ip)
