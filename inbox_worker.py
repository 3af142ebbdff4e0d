"""Inbox worker (:8005): consumes in_app.queue and delivers each notification into the user's
inbox.

The consuming, retry and dead-letter logic is common/delivery/worker.py, as for email and push;
this module is the delivery step: the user and the preference checked again, the in_app template
rendered (title and body autoescaped), the message stored in the inbox (`inbox_messages`, in the
notifications database) and then announced to the user's open event streams on every gateway.

Delivered means stored. The store is ours, so the one duplicate window the other channels have
(sent, then the worker dies before recording) is closed here: the message is inserted once per
notification (its id is unique in the inbox), and a redelivered notification finds its message
there and is recorded delivered without a second one. See docs/architecture.md.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

import topology
from common.config import Config, load_config
from common.delivery.interface import Delivered, Job
from common.delivery.worker import Preparer, worker_app
from common.features.inbox import live
from common.features.inbox.store import InboxStore
from common.keys import DB_KEY, REDIS_KEY
from common.logs import setup_logging
from common.runner import run
from common.sending.preferences import origin_of

log = logging.getLogger("inbox_worker")


class InboxDelivery:
    """Prepare (profile, preference, render), store in the inbox once, announce."""

    def __init__(self, app: web.Application) -> None:
        self.preparer = Preparer(app, "in_app")
        self.inbox = InboxStore(app[DB_KEY])
        self.redis = app[REDIS_KEY]

    async def deliver(self, job: Job) -> Delivered:
        prepared = await self.preparer.prepare(job)
        parts, template, record = prepared.parts, prepared.template, job.record
        origin = origin_of(record)
        metadata = record.get("metadata") or job.body.get("metadata") or {}
        project = str(record.get("client_id") or job.body.get("client_id"))
        # A database error here is our infrastructure's: the worker loop defers the attempt.
        message, created = await self.inbox.deliver(
            project=project,
            user_id=str(job.body["user_id"]),
            notification_id=job.notification_id,
            workflow_key=origin.workflow_key if origin is not None else None,
            title=parts["title"],
            body=parts["body"],
            link=parts.get("link") or None,
            image_url=parts.get("image_url") or None,
            data=_data(metadata),
        )
        if created and message.get("event_seq") is not None:
            await live.announce(self.redis, project, str(job.body["user_id"]), int(message["event_seq"]))
        else:
            log.info(
                "notification %s was in the inbox already: recorded, not stored again", job.notification_id
            )
        return Delivered("inbox", template_version=template["version"], language=template["language"])


def _data(metadata: Any) -> dict[str, Any]:
    """What the message carries for the page showing it: the notification's metadata, without
    the `workflow` entry a run writes there (its origin, not the client's data)."""
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if k != "workflow"}


def create_app(config: Config) -> web.Application:
    return worker_app(
        "inbox_worker",
        "in_app",
        config,
        declare=topology.declare,
        providers=None,
        delivery=InboxDelivery,
    )


def main() -> None:
    config = load_config("internal_api_token")
    setup_logging("inbox_worker", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8005)


if __name__ == "__main__":
    main()
