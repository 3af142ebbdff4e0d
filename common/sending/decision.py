"""The acceptance decision: what one recipient's notification is when it is accepted.

Every way in (a single notification, a bulk request, a topic's fan-out, and a workflow's channel
step) decides here, the same way:

- the user opted out → `skipped`, with the rule that said so (`opted_out`): for a workflow's step
  the most specific rule wins (that workflow, then its category, then the channel switch), and a
  `critical` workflow goes out whatever the user opted out of;
- `send_at`, `send_at_local` or the user's quiet hours put it later → `scheduled` for then;
- otherwise `pending`, to be published by the outbox.

`Send` is the shared part of a send: one notification's, or every recipient's of a batch. A topic
batch stores it (`stored()`) and its fan-out reads it back (`Send.from_stored`), so the fan-out,
perhaps on another gateway hours later, decides exactly as the request would have.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common.data.store import NewNotification
from common.logs import correlation_id_var
from common.sending import schedule
from common.sending.preferences import Origin, opted_out


@dataclass(frozen=True)
class Send:
    """What every recipient of a send shares (the template version and language are pinned
    at acceptance: a later update or rollback does not change what the send renders)."""

    client_id: str
    request_id: str
    body_hash: str
    notification_type: str
    template_code: str
    language: str | None
    template_version: int | None
    priority: int
    metadata: dict[str, Any]
    when: schedule.When
    correlation_id: str
    variables: dict[str, Any]
    batch_id: uuid.UUID | None = None
    send_at_local: str | None = None  # as the client wrote it, kept for a stored batch

    @classmethod
    def of(
        cls,
        client_id: str,
        payload: Mapping[str, Any],
        body_hash: str,
        when: schedule.When,
        template: Mapping[str, Any],
        *,
        batch_id: uuid.UUID | None = None,
    ) -> Send:
        """From a parsed request (`common/sending/parsing.py`) and its template version."""
        return cls(
            client_id=client_id,
            request_id=payload["request_id"],
            body_hash=body_hash,
            notification_type=payload["notification_type"],
            template_code=payload["template_code"],
            language=template["language"],
            template_version=template["version"],
            priority=payload["priority"],
            metadata=payload["metadata"],
            when=when,
            correlation_id=correlation_id_var.get() or uuid.uuid4().hex,
            variables=payload["variables"],
            batch_id=batch_id,
            send_at_local=payload.get("send_at_local"),
        )

    def stored(self) -> dict[str, Any]:
        """The part a batch row keeps (its `payload`), read back by `from_stored`."""
        return {
            "notification_type": self.notification_type,
            "template_code": self.template_code,
            "language": self.language,
            "template_version": self.template_version,
            "priority": self.priority,
            "metadata": self.metadata,
            "variables": self.variables,
            "send_at": self.when.send_at.isoformat() if self.when.send_at else None,
            "send_at_local": self.send_at_local,
            "correlation_id": self.correlation_id,
        }

    @classmethod
    def from_stored(cls, batch: Mapping[str, Any]) -> Send:
        """The shared part of a stored batch (its row: id, client_id, request_id, body_hash, payload)."""
        p = batch["payload"]
        send_at = datetime.fromisoformat(p["send_at"]) if p.get("send_at") else None
        local = schedule.parse_hhmm(p["send_at_local"]) if p.get("send_at_local") else None
        return cls(
            client_id=batch["client_id"],
            request_id=batch["request_id"],
            body_hash=batch["body_hash"],
            notification_type=p["notification_type"],
            template_code=p["template_code"],
            language=p["language"],
            template_version=p["template_version"],
            priority=p["priority"],
            metadata=p["metadata"],
            when=schedule.When(send_at, local),
            correlation_id=p["correlation_id"],
            variables=p["variables"],
            batch_id=batch["id"],
            send_at_local=p.get("send_at_local"),
        )


def recipient_of(user_id: str, user: Mapping[str, Any]) -> dict[str, Any]:
    """Who a notification is for, as its template sees it (`recipient`), from the profile."""
    return {
        "id": user_id,
        "name": user.get("name"),
        "email": user.get("email"),
        "phone": user.get("phone"),
        "language": user.get("language"),
        "timezone": user.get("timezone"),
        "data": user.get("data") or {},
    }


def accept(
    send: Send,
    user_id: str,
    user: Mapping[str, Any],
    *,
    notification_id: uuid.UUID,
    request_id: str | None = None,
    variables: dict[str, Any] | None = None,
    now: datetime | None = None,
    origin: Origin | None = None,
    step: str | None = None,
    workflow_run_id: uuid.UUID | None = None,
) -> NewNotification:
    """One recipient's notification (`user` is their profile), decided: opted out → skipped,
    later → scheduled, else pending. `request_id` is the recipient's idempotency key (the
    send's own by default); `variables` the recipient's (the send's by default); `origin` the
    workflow (and `workflow_run_id`, `step` the run and step) it comes from."""
    channel = send.notification_type
    preferences = user.get("preferences") or {}
    reason = opted_out(preferences, channel, origin)
    opted_in = reason is None
    later = schedule.plan(
        now or datetime.now(UTC),
        send.when,
        schedule.zone(user.get("timezone")),
        schedule.QuietHours.of(preferences.get("quiet_hours")),
        urgent=send.priority >= schedule.URGENT_PRIORITY,
    )
    status = "skipped" if not opted_in else "scheduled" if later.send_at else "pending"
    return NewNotification(
        id=notification_id,
        client_id=send.client_id,
        request_id=request_id if request_id is not None else send.request_id,
        body_hash=send.body_hash,
        user_id=user_id,
        notification_type=channel,
        template_code=send.template_code,
        language=send.language,
        template_version=send.template_version,
        priority=send.priority,
        correlation_id=send.correlation_id,
        status=status,
        error=reason,
        variables=send.variables if variables is None else variables,
        metadata=send.metadata,
        send_at=later.send_at if opted_in else None,
        detail=later.reason if opted_in else None,
        batch_id=send.batch_id,
        # Pinned like the template version: a later profile change does not alter what an
        # accepted notification renders.
        recipient=recipient_of(user_id, user),
        workflow_run_id=workflow_run_id,
        step=step,
    )
