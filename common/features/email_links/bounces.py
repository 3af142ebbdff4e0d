"""Bounces: a provider's report, after accepting a message, that it could not be delivered.

The gateway's webhook handlers verify the provider's signature and parse its events into
`Bounce`s (each provider's format lives with the provider); what a bounce does is decided here,
from plain data: the notification is marked failed with the provider's reason and, for a hard
bounce, the user's email is turned off. The client hears of it as `notification.bounced`.
"""

from __future__ import annotations

import logging

from common.data.store import StatusStore
from common.delivery.interface import Bounce
from common.logs import DEFAULT_PROJECT, log_context, project_var
from common.lookups.clients import ServiceClient
from common.metrics import Metrics
from common.web.validation import parse_uuid

log = logging.getLogger(__name__)


async def apply(store: StatusStore, users: ServiceClient, metrics: Metrics, bounces: list[Bounce]) -> int:
    """Apply each bounce to its notification; returns how many named one of ours. An event
    naming no email notification of ours is ignored (and the webhook still answered 2xx: any
    other answer only makes the provider send it again and again)."""
    applied = 0
    for bounce in bounces:
        notification_id = parse_uuid(bounce.notification_id or "")
        row = await store.get(notification_id) if notification_id is not None else None
        if row is None or row["notification_type"] != "email":
            log.info("%s bounce event for no known email notification ignored", bounce.provider)
            continue
        with log_context(row["correlation_id"], str(row["id"])):
            if bounce.suppress:
                # The user of the notification's project, as the user service scopes them.
                token = project_var.set(await store.project_of(row["id"]) or DEFAULT_PROJECT)
                try:
                    await users.turn_off(row["user_id"], "email")
                finally:
                    project_var.reset(token)
            if row["status"] != "failed":
                reason = f"bounced ({bounce.provider}): {bounce.reason}"[:2000]
                await store.record(
                    row["id"],
                    "failed",
                    error=reason,
                    provider=bounce.provider,
                    webhook_event="notification.bounced",
                )
            metrics.bounces.labels(bounce.provider).inc()
            log.warning(
                "%s reported a bounce: %s%s",
                bounce.provider,
                bounce.reason,
                "; email turned off for this user" if bounce.suppress else "",
            )
        applied += 1
    return applied
