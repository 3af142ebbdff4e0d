"""Prometheus metrics, one registry per application so several apps can share a process (tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "notify_http_requests_total",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "notify_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.accepted = Counter(
            "notify_notifications_accepted_total",
            "Notifications accepted (202)",
            ["channel"],
            registry=r,
        )
        self.skipped = Counter(
            "notify_notifications_skipped_total",
            "Notifications not sent: user opted out",
            ["channel"],
            registry=r,
        )
        self.delivered = Counter(
            "notify_notifications_delivered_total",
            "Notifications delivered",
            ["channel", "provider"],
            registry=r,
        )
        self.failed = Counter(
            "notify_notifications_failed_total",
            "Notifications that ended failed",
            ["channel", "reason"],
            registry=r,
        )
        self.retried = Counter(
            "notify_notifications_retried_total",
            "Attempts sent to a retry queue",
            ["channel"],
            registry=r,
        )
        self.duplicates = Counter(
            "notify_duplicate_deliveries_skipped_total",
            "Redelivered messages acknowledged without sending: already final",
            ["channel"],
            registry=r,
        )
        self.reclaimed = Counter(
            "notify_reclaimed_total",
            "Notifications taken over after a worker died mid-attempt: possibly sent twice",
            ["channel"],
            registry=r,
        )
        self.deferred_in_progress = Counter(
            "notify_deferred_in_progress_total",
            "Redelivered messages put back because another consumer holds the notification",
            ["channel"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "notify_delivery_duration_seconds",
            "Time spent in one delivery attempt",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "notify_end_to_end_latency_seconds",
            "From acceptance to delivery",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "notify_cache_lookups_total",
            "Cache lookups by outcome (hit, miss, error)",
            ["cache", "result"],
            registry=r,
        )
        self.in_flight = Gauge(
            "notify_worker_in_flight",
            "Messages being processed now",
            ["channel"],
            registry=r,
        )
        # Email delivery: provider health, bounces and unsubscribes.
        self.circuit_state = Gauge(
            "notify_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 open, 2 half-open",
            ["provider"],
            registry=r,
        )
        self.provider_failures = Counter(
            "notify_provider_failures_total",
            "Failed calls to a delivery provider, by class (transient, permanent)",
            ["channel", "provider", "kind"],
            registry=r,
        )
        self.bounces = Counter(
            "notify_email_bounces_total",
            "Bounce and drop events received from email providers' webhooks",
            ["provider"],
            registry=r,
        )
        self.unsubscribes = Counter(
            "notify_unsubscribes_total",
            "Users who turned a channel off through an unsubscribe link",
            ["channel"],
            registry=r,
        )
