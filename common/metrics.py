"""Prometheus metrics, one registry per application so several apps can share a process (tests).

Declared as data: one row per metric (attribute, kind, name, help, labels); `Metrics` builds
them all on its registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# attribute, kind, metric name, labels (space-separated), help
_DEFINITIONS: tuple[tuple[str, type, str, str, str], ...] = (
    ("http_requests", Counter, "notify_http_requests_total", "method route status",
     "HTTP requests answered"),
    ("http_latency", Histogram, "notify_http_request_duration_seconds", "method route",
     "Time to answer an HTTP request"),
    ("accepted", Counter, "notify_notifications_accepted_total", "channel",
     "Notifications accepted (202)"),
    ("skipped", Counter, "notify_notifications_skipped_total", "channel",
     "Notifications not sent: user opted out"),
    ("delivered", Counter, "notify_notifications_delivered_total", "channel provider",
     "Notifications delivered"),
    ("failed", Counter, "notify_notifications_failed_total", "channel reason",
     "Notifications that ended failed"),
    ("retried", Counter, "notify_notifications_retried_total", "channel",
     "Attempts sent to a retry queue"),
    ("duplicates", Counter, "notify_duplicate_deliveries_skipped_total", "channel",
     "Redelivered messages acknowledged without sending: already final"),
    ("reclaimed", Counter, "notify_reclaimed_total", "channel",
     "Notifications taken over after a worker died mid-attempt: possibly sent twice"),
    ("deferred_in_progress", Counter, "notify_deferred_in_progress_total", "channel",
     "Redelivered messages put back because another consumer holds the notification"),
    ("delivery_latency", Histogram, "notify_delivery_duration_seconds", "channel",
     "Time spent in one delivery attempt"),
    ("end_to_end_latency", Histogram, "notify_end_to_end_latency_seconds", "channel",
     "From acceptance to delivery"),
    ("cache_lookups", Counter, "notify_cache_lookups_total", "cache result",
     "Cache lookups by outcome (hit, miss, error)"),
    ("reconciled", Counter, "notify_reconciled_total", "channel from_status",
     "Notifications the reconciler published again: their message was lost or never came back"),
    ("store_retries", Counter, "notify_store_retries_total", "channel step",
     "Status-store steps retried after an infrastructure error, the message held meanwhile"),
    ("in_flight", Gauge, "notify_worker_in_flight", "channel",
     "Messages being processed now"),
    # Send later: what waits, how late the dispatcher released it, what was cancelled.
    ("scheduled", Gauge, "notify_scheduled_notifications", "channel",
     "Notifications scheduled to be sent later (send_at, send_at_local or quiet hours), now"),
    ("dispatch_lag", Histogram, "notify_dispatch_lag_seconds", "channel",
     "From a scheduled notification's send_at to its release by the dispatcher"),
    ("cancelled", Counter, "notify_notifications_cancelled_total", "channel",
     "Notifications cancelled by a client before they were sent"),
    # Email delivery: provider health, bounces and unsubscribes.
    ("circuit_state", Gauge, "notify_circuit_state", "provider",
     "Circuit breaker per provider: 0 closed, 1 open, 2 half-open"),
    ("provider_failures", Counter, "notify_provider_failures_total", "channel provider kind",
     "Failed calls to a delivery provider, by class (transient, permanent)"),
    ("bounces", Counter, "notify_email_bounces_total", "provider",
     "Bounce and drop events received from email providers' webhooks"),
    ("unsubscribes", Counter, "notify_unsubscribes_total", "channel",
     "Users who turned a channel off through an unsubscribe link"),
    # Client status webhooks.
    ("webhook_deliveries", Counter, "notify_webhook_deliveries_total", "outcome",
     "Webhook delivery attempts by outcome (delivered, retried, failed, deferred: over the"
     " per-endpoint or per-key concurrency, sent round again)"),
    ("webhook_latency", Histogram, "notify_webhook_attempt_duration_seconds", "",
     "Time a client's endpoint took to answer one webhook attempt"),
    # Load shedding at the gateway (common/web/admission.py).
    ("shed", Counter, "notify_shed_total", "reason",
     "Accept requests answered 503 overloaded without being worked on: queue_full (the waiting"
     " room was full), waited_too_long (no slot within ACCEPT_TIME_BUDGET)"),
    ("in_hand", Gauge, "notify_gateway_in_hand", "kind",
     "Work the gateway holds now: accepting (accept requests worked on), waiting (for a slot),"
     " outbox (rows handed to the outbox and not yet confirmed by the broker)"),
    ("accept_limit", Gauge, "notify_accept_concurrency_limit", "",
     "Accept requests the gateway lets in at once now: adapts between 4 and ACCEPT_CONCURRENCY"),
    ("webhooks_disabled", Counter, "notify_webhook_endpoints_disabled_total", "reason",
     "Client webhook endpoints disabled: answered 410 (gone) or failed for WEBHOOK_DISABLE_AFTER (failing)"),
)  # fmt: skip


class Metrics:
    http_requests: Counter
    http_latency: Histogram
    accepted: Counter
    skipped: Counter
    delivered: Counter
    failed: Counter
    retried: Counter
    duplicates: Counter
    reclaimed: Counter
    deferred_in_progress: Counter
    delivery_latency: Histogram
    end_to_end_latency: Histogram
    cache_lookups: Counter
    reconciled: Counter
    store_retries: Counter
    in_flight: Gauge
    scheduled: Gauge
    dispatch_lag: Histogram
    cancelled: Counter
    circuit_state: Gauge
    provider_failures: Counter
    bounces: Counter
    unsubscribes: Counter
    webhook_deliveries: Counter
    webhook_latency: Histogram
    webhooks_disabled: Counter
    shed: Counter
    in_hand: Gauge
    accept_limit: Gauge

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        for attribute, kind, name, labels, text in _DEFINITIONS:
            extra: dict[str, Any] = {"buckets": _LATENCY_BUCKETS} if kind is Histogram else {}
            setattr(self, attribute, kind(name, text, labels.split(), registry=self.registry, **extra))
