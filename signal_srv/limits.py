"""Token buckets for abuse limits: per client IP on the REST edge, per socket on the WebSocket edge.

Pure: time is a parameter. A bucket holds up to ``burst`` tokens and refills at ``rate``
tokens per second; a request takes one token or is refused with the seconds to wait.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "RateLimiter", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> float:
        """Take one token; return 0.0 if granted, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class RateLimiter:
    """One token bucket per key (a client IP). ``rate <= 0`` turns the limit off.

    Memory stays bounded: when more than ``max_keys`` buckets exist, the ones that have
    refilled completely (indistinguishable from new ones) are dropped.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """0.0 if ``key`` may go ahead, else the seconds it should wait."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.prune(now)
            bucket = self._buckets[key] = TokenBucket.full(self.rate, self.burst, now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        """Drop the buckets that have refilled completely; past ``max_keys``, the oldest half too."""
        self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full(now)}
        if len(self._buckets) >= self.max_keys:
            keys = list(self._buckets)
            self._buckets = {k: self._buckets[k] for k in keys[len(keys) // 2:]}


class Limits:
    """The process's abuse limits, shared by the REST and WebSocket edges."""

    def __init__(self, *, rate_create: float, rate_create_burst: float, rate_join: float,
                 rate_join_burst: float, max_sockets: int) -> None:
        self.create = RateLimiter(rate_create, rate_create_burst)
        self.join = RateLimiter(rate_join, rate_join_burst)
        self.max_sockets = max_sockets
