"""Bounces: a provider's report, after accepting a message, that it could not be delivered.

The gateway's webhook handlers verify the provider's signature and parse its events into
`Bounce`s (each provider's format lives with the provider); what a bounce does is decided here,
from plain data: the notification is marked failed with the provider's reason and, for a hard
bounce, the user's email is turned off. The client hears of it as `notification.bounced`. Only
a notification that the bounce's provider sent to the bounce's address is touched: a webhook's
signature does not always cover what its events say (Mailgun's covers only its token).
"""

from __future__ import annotations

import logging

from common.data.store import StatusStore
from common.delivery.interface import Bounce
from common.logs import DEFAULT_PROJECT, log_context, project_var
from common.lookups.clients import ServiceClient, ServiceUnavailable
from common.metrics import Metrics
from common.web.validation import parse_uuid

log = logging.getLogger(__name__)


def _same_address(a: str | None, b: str | None) -> bool:
    """Whether two addresses are one (case folded: a provider may report the domain, or all of
    it, in another case); no address is no one's."""
    return a is not None and b is not None and a.strip().casefold() == b.strip().casefold()


async def _address(users: ServiceClient, user_id: str) -> str | None:
    """The address the email worker sends this user's email to: the profile's, as the user
    service has it now (None when the user is gone). The user service down: ServiceUnavailable,
    so the webhook is answered 503 and the provider sends it again."""
    reply = await users.get_user(user_id)
    if reply.status == 404:
        return None
    if reply.status != 200 or not isinstance(reply.data, dict):
        raise ServiceUnavailable(f"{users.name} answered {reply.status} for a bounce's user")
    email = reply.data.get("email")
    return email if isinstance(email, str) else None


async def apply(store: StatusStore, users: ServiceClient, metrics: Metrics, bounces: list[Bounce]) -> int:
    """Apply each bounce to its notification; returns how many named one of ours. A bounce
    applies only to an email notification that its provider sent (the notification's recorded
    provider) to the address it names (the user's email, case folded): a provider's word about
    one message never fails another, nor turns off an address it did not send to. Any other
    event is ignored (and the webhook still answered 2xx: any other answer only makes the
    provider send it again and again)."""
    applied = 0
    for bounce in bounces:
        notification_id = parse_uuid(bounce.notification_id or "")
        row = await store.get(notification_id) if notification_id is not None else None
        if row is None or row["notification_type"] != "email":
            log.info("%s bounce event for no known email notification ignored", bounce.provider)
            continue
        with log_context(row["correlation_id"], str(row["id"])):
            if row["provider"] != bounce.provider:
                log.warning(
                    "%s bounce event ignored: the notification was sent by %s",
                    bounce.provider,
                    row["provider"] or "no provider",
                )
                continue
            # The user of the notification's project, as the user service scopes them.
            token = project_var.set(await store.project_of(row["id"]) or DEFAULT_PROJECT)
            try:
                address = await _address(users, row["user_id"])
                if not _same_address(address, bounce.recipient):
                    log.warning(
                        "%s bounce event ignored: its recipient is not the address the notification went to",
                        bounce.provider,
                    )
                    continue
                if bounce.suppress:
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
