"""Prometheus metrics: plain counters on the hot path, turned into metric families at scrape time.

Each app has its own ``CollectorRegistry``: nothing is registered globally.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from signal_srv.registry import Registry

__all__ = ["Metrics"]


class Metrics:
    """What the edges and the actors count; read by ``/metrics``."""

    def __init__(self) -> None:
        self.relayed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.webhooks: Counter[str] = Counter()
        self.sockets = 0
        self.accept_paused = 0
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "signal_srv_http_request_duration_seconds", "REST request latency by route",
            ["route", "method"], registry=self.prometheus,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )

    def watch(self, registry: Registry) -> None:
        """Export the registry's figures with these counters."""
        self.prometheus.register(_Collector(self, registry))

    def render(self) -> bytes:
        return generate_latest(self.prometheus)


class _Collector:
    def __init__(self, metrics: Metrics, registry: Registry) -> None:
        self.metrics = metrics
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        stats = self.registry.statistics()
        node = GaugeMetricFamily("signal_srv_node", "this process's node id (always 1)", labels=["node_id"])
        node.add_metric([self.registry.placement.node_id], 1)
        yield node
        calls = GaugeMetricFamily("signal_srv_calls", "live calls by status", labels=["status"])
        calls.add_metric(["waiting"], stats.waiting)
        calls.add_metric(["active"], stats.active)
        yield calls
        yield CounterMetricFamily("signal_srv_calls_created", "calls created", value=stats.created)
        ended = CounterMetricFamily("signal_srv_calls_ended", "calls ended, by reason", labels=["reason"])
        for reason in ("ended", "left", "timeout", "expired", "unclaimed", "max_duration", "error", "shutdown"):
            ended.add_metric([reason], stats.ended.get(reason, 0))
        yield ended
        yield GaugeMetricFamily("signal_srv_sockets", "signaling sockets connected", value=self.metrics.sockets)
        yield GaugeMetricFamily("signal_srv_actor_tasks", "running call actors", value=stats.tasks)
        yield GaugeMetricFamily("signal_srv_held_bytes", "bytes of messages held for participants not connected",
                                value=self.registry.held.used)
        yield GaugeMetricFamily("signal_srv_inbox_depth_max", "deepest call inbox right now",
                                value=self.registry.max_inbox_depth())
        yield from (
            _counter("signal_srv_messages_relayed", "messages relayed, by type", "type", self.metrics.relayed),
            _counter("signal_srv_errors", "error answers, by code", "code", self.metrics.errors),
            _counter("signal_srv_rate_limited", "requests refused by a rate limit, by limit", "limit",
                     self.metrics.rate_limited),
        )
        yield CounterMetricFamily("signal_srv_accept_paused", "pauses of the accept loop for want of file "
                                  "descriptors", value=self.metrics.accept_paused)
        webhooks = CounterMetricFamily(
            "signal_srv_webhooks", "webhook events by outcome (retried: extra attempts)", labels=["outcome"])
        for outcome in ("delivered", "failed", "dropped", "retried"):
            webhooks.add_metric([outcome], self.metrics.webhooks.get(outcome, 0))
        yield webhooks


def _counter(name: str, documentation: str, label: str, counts: Counter[str]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family
