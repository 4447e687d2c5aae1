"""``ClusterStats``: what a cluster node counts, exported on ``/metrics`` next to the server's own figures."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from signal_srv.metrics import Metrics

if TYPE_CHECKING:
    from signal_srv.cluster.log import Journal

__all__ = ["ClusterStats"]


class ClusterStats:
    def __init__(self, metrics: Metrics, owned: Callable[[], int]) -> None:
        self.bridged: Counter[str] = Counter()  # frames between this node and others, by direction
        self.redis_errors = 0
        self.lost_calls = 0
        self.taken_over = 0
        self.journal: Journal | None = None
        self.redis_seconds = Histogram(
            "signal_srv_redis_round_trip_seconds", "round trip of one Redis command or pipeline",
            registry=metrics.prometheus,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
        )
        self._owned = owned
        metrics.prometheus.register(self)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("signal_srv_calls_owned", "calls whose owner is this node", value=self._owned())
        bridged = CounterMetricFamily(
            "signal_srv_frames_bridged", "socket frames carried between this node and a call's owner, by direction",
            labels=["direction"])
        for direction in ("in", "out"):
            bridged.add_metric([direction], self.bridged.get(direction, 0))
        yield bridged
        yield CounterMetricFamily("signal_srv_redis_errors", "Redis commands that failed", value=self.redis_errors)
        yield CounterMetricFamily("signal_srv_calls_lost", "calls this node found owned elsewhere (fenced out)",
                                  value=self.lost_calls)
        yield CounterMetricFamily("signal_srv_calls_taken_over",
                                  "calls this node took over from a node whose lease lapsed", value=self.taken_over)
        if self.journal is not None:
            yield CounterMetricFamily("signal_srv_log_entries", "call events written ahead to Redis",
                                      value=self.journal.entries)
            yield CounterMetricFamily("signal_srv_log_snapshots", "call snapshots written to Redis",
                                      value=self.journal.snapshots)
