"""Prometheus metrics (prometheus-client), one registry per app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    denials: Counter
    cost: Counter
    upstream_latency: Histogram
    admit_latency: Histogram
    queue_depth: Gauge
    projection_lag_events: Gauge
    projection_lag_seconds: Gauge
    projection_failing: Gauge
    replica_lag_bytes: Gauge
    replica_lag_seconds: Gauge


def create_metrics(queue_depth: Callable[[], float]) -> Metrics:
    registry = CollectorRegistry(auto_describe=True)
    depth = Gauge(
        "ledger_event_writer_queue_depth",
        "Appends waiting for the group-commit writer",
        registry=registry,
    )
    depth.set_function(queue_depth)
    return Metrics(
        registry=registry,
        requests=Counter("ledger_requests", "Proxied requests", ["route", "status"], registry=registry),
        denials=Counter("ledger_budget_denials", "Requests denied by a budget", registry=registry),
        cost=Counter(
            "ledger_cost_usd",
            "Recorded spend in USD (for dashboards, not accounting)",
            registry=registry,
        ),
        upstream_latency=Histogram(
            "ledger_upstream_latency_seconds",
            "Time to the upstream's full answer",
            ["provider"],
            buckets=_LATENCY,
            registry=registry,
        ),
        admit_latency=Histogram(
            "ledger_admit_latency_seconds",
            "Budget decision and durable admission",
            buckets=_LATENCY,
            registry=registry,
        ),
        queue_depth=depth,
        projection_lag_events=Gauge(
            "ledger_projection_lag_events",
            "Events a projection is behind the log head",
            ["projection"],
            registry=registry,
        ),
        projection_lag_seconds=Gauge(
            "ledger_projection_lag_seconds",
            "Age of the oldest event a projection has not applied",
            ["projection"],
            registry=registry,
        ),
        projection_failing=Gauge(
            "ledger_projection_failing",
            "1 while a projection cannot apply its next batch (see `ledger projections status`)",
            ["projection"],
            registry=registry,
        ),
        replica_lag_bytes=Gauge(
            "ledger_replica_lag_bytes",
            "WAL the read replica (LEDGER_DATABASE_READ_URL) has not replayed yet",
            registry=registry,
        ),
        replica_lag_seconds=Gauge(
            "ledger_replica_lag_seconds",
            "Age of the read replica's last replayed commit while it is behind (0: caught up)",
            registry=registry,
        ),
    )


def render(metrics: Metrics) -> web.Response:
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
