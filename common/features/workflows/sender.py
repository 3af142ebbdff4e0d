"""A channel step's notification: made through the same acceptance decision as every other
notification (`common/sending/decision.py`), stored by the status store, published by the outbox.

Its id and request_id are derived from the run and the step (`steps.notification_key`), so an
engine that made it and died before writing the run, or two engines racing on one run, find the
same notification instead of making a second: one notification per run and step.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from common.broker.outbox import Outbox
from common.data.db import Row
from common.data.store import NewNotification, StatusStore
from common.features.workflows.definition import Definition, Step
from common.features.workflows.engine import StepFailed
from common.features.workflows.steps import notification_key
from common.group_commit import Batcher
from common.logs import log_context, project_var
from common.lookups.cache import CachedLookups
from common.lookups.clients import ServiceUnavailable
from common.metrics import Metrics
from common.rendering import templating
from common.sending import schedule
from common.sending.decision import Send, accept
from common.sending.preferences import Origin


@dataclass
class StepSender:
    status: StatusStore
    accepts: Batcher[NewNotification, Row | None]  # the gateway's group commit of accepts
    lookups: CachedLookups
    outbox: Outbox
    metrics: Metrics

    async def send(
        self, run: Row, step: Step, definition: Definition, digest: dict[str, Any] | None = None
    ) -> Row:
        notification_id, request_id = notification_key(run["id"], step)
        existing = await self.status.get(notification_id)
        if existing is not None:
            return existing
        channel = step.channel
        assert channel is not None
        code = str(step.options["template_code"])
        token = project_var.set(run["project_id"])
        try:
            with log_context(run["correlation_id"], str(notification_id)):
                try:
                    user, template, _ = await self.lookups.user_and_template(
                        run["user_id"], code, step.options.get("language") or run["recipient"].get("language")
                    )
                except ServiceUnavailable:
                    raise  # infrastructure: the run is due again when its lease ends
                if user.status == 404:
                    raise StepFailed("user no longer exists")
                if template.status == 404:
                    raise StepFailed(f"template {code!r} does not exist")
                if user.status != 200 or template.status != 200:
                    raise ServiceUnavailable(f"lookups answered {user.status}/{template.status}")
                if template.data["notification_type"] != channel:
                    raise StepFailed(f"template {code!r} is a {template.data['notification_type']} template")
                variables = dict(run["payload"])
                if digest is not None:
                    variables["digest"] = digest  # what the window gathered, for `digest.events`
                problem = templating.missing_variables(channel, template.data, variables)
                if problem is not None:
                    raise StepFailed(f"{problem.code}: {problem.message}")
                origin = Origin(run["workflow_key"], definition.category, definition.critical)
                send = Send(
                    client_id=run["project_id"],
                    request_id=request_id,
                    body_hash=run["body_hash"],
                    notification_type=channel,
                    template_code=code,
                    language=template.data["language"],
                    template_version=template.data["version"],
                    priority=schedule.URGENT_PRIORITY if definition.critical else 0,
                    metadata=origin.as_metadata(),
                    when=schedule.When(None, None),
                    correlation_id=run["correlation_id"] or uuid.uuid4().hex,
                    variables=variables,
                    batch_id=run["batch_id"],
                )
                new = accept(
                    send,
                    run["user_id"],
                    user.data,
                    notification_id=notification_id,
                    origin=origin,
                    workflow_run_id=run["id"],
                    step=step.name,
                )
                row = await self.accepts.submit(new)
                if row is None:  # another engine made it meanwhile
                    row = await self.status.get(notification_id)
                    if row is None:
                        raise ServiceUnavailable("the step's notification was not found after a race")
                    return row
                if new.status == "skipped":
                    self.metrics.skipped.labels(channel).inc()
                else:
                    self.metrics.accepted.labels(channel).inc()
                if row["status"] == "pending":
                    self.outbox.submit(row)
                return row
        finally:
            project_var.reset(token)

    async def cancel(self, project_id: str, notification_id: uuid.UUID) -> None:
        await self.status.cancel(notification_id, project_id)
