"""The dispatcher: releases scheduled notifications when they are due.

One loop per gateway, one indexed query per round (`StatusStore.due`: `status = 'scheduled' AND
send_at <= now()`, soonest first, `FOR UPDATE SKIP LOCKED`, in batches), so several gateways
share the work and each notification is released by one of them. A round, in one transaction:
the user's preference and quiet hours are looked at again (they may have changed while it
waited) → each due row is released to `pending` (publish_pending), held again until its quiet
hours end, or skipped → the released ones published, confirmed and marked → commit.

What a crash loses is repaired elsewhere: killed before the commit, the rows are still
`scheduled` and the next round (of any gateway) takes them (any already published go again, and
the workers' claim sends them once); those the broker did not confirm are committed `pending`
and unpublished, and the outbox relay publishes them. A dispatcher that does not run at all is
covered by the reconciler, which releases what is overdue by RECONCILE_AFTER
(`common/broker/outbox.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from common import background
from common.broker.outbox import Outbox
from common.data.store import StatusStore
from common.keys import CONFIG_KEY, LOOKUPS_KEY, METRICS_KEY, OUTBOX_KEY, STORE_KEY
from common.logs import project_var
from common.lookups.cache import CachedLookups
from common.lookups.clients import ServiceUnavailable
from common.metrics import Metrics
from common.sending import schedule
from common.vocabulary import CHANNELS

log = logging.getLogger(__name__)

DISPATCH_BATCH = 500
GAUGE_INTERVAL = 5.0
LOOKUP_CONCURRENCY = 32


class Dispatcher:
    def __init__(
        self,
        store: StatusStore,
        outbox: Outbox,
        lookups: CachedLookups,
        metrics: Metrics,
        interval: float,
        batch: int = DISPATCH_BATCH,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.lookups = lookups
        self.metrics = metrics
        self.interval = interval
        self.batch = batch
        self._lookup_slots = asyncio.Semaphore(LOOKUP_CONCURRENCY)

    async def _user(self, project: str, user_id: str) -> dict[str, Any] | None:
        async with self._lookup_slots:
            project_var.set(project)  # this task's own context: the row's project
            try:
                reply = await self.lookups.user(user_id)
            except ServiceUnavailable as exc:
                log.warning("dispatch without re-checking user %s: %s", user_id, exc)
                return None
        return reply.data if reply.status == 200 else None

    async def _users(self, rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any] | None]:
        """Each row's user, as their project's user service knows them now."""
        ids = list({(row["client_id"], str(row["user_id"])) for row in rows})
        found = await asyncio.gather(*(self._user(p, u) for p, u in ids))
        return dict(zip(ids, found, strict=True))

    async def dispatch_once(self) -> int:
        """One round; returns how many due rows it handled (a full batch: more may be due)."""
        async with self.store.db.transaction() as tx:
            rows = await self.store.due(tx, self.batch)
            if not rows:
                return 0
            users = await self._users(rows)
            now = datetime.now(UTC)
            send: list[uuid.UUID] = []
            held: list[tuple[uuid.UUID, datetime, str | None]] = []
            skipped: list[tuple[uuid.UUID, str]] = []
            for row in rows:
                verdict = schedule.recheck(row, users.get((row["client_id"], str(row["user_id"]))), now)
                if verdict.skip is not None:
                    skipped.append((row["id"], verdict.skip))
                elif verdict.hold_until is not None:
                    held.append((row["id"], verdict.hold_until, verdict.detail))
                else:
                    send.append(row["id"])
            released = await self.store.release(tx, send)
            await self.store.hold(tx, held)
            await self.store.skip_scheduled(tx, skipped)
            if self.outbox.can_publish:
                # Published while still locked: a relay elsewhere, seeing them pending and
                # unpublished for a while (a large round on a busy machine), cannot publish
                # them too. What the broker does not confirm is left to the relay.
                await self.outbox.publish_locked(tx, released)
        for row in released:
            lag = (now - row["send_at"]).total_seconds() if row["send_at"] is not None else 0.0
            self.metrics.dispatch_lag.labels(row["notification_type"]).observe(max(0.0, lag))
        for row_id, _ in skipped:
            log.info("scheduled notification %s skipped at dispatch: user opted out", row_id)
        return len(rows)

    async def update_gauge(self) -> None:
        counts = await self.store.scheduled_counts()
        for channel in CHANNELS:
            self.metrics.scheduled.labels(channel).set(counts.get(channel, 0))

    async def run(self, stopping: asyncio.Event) -> None:
        gauge_due = 0.0
        while not stopping.is_set():
            handled = 0
            try:
                handled = await self.dispatch_once()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("dispatch round failed: %s: %s", type(exc).__name__, exc)
            if time.monotonic() >= gauge_due:
                gauge_due = time.monotonic() + GAUGE_INTERVAL
                try:
                    await self.update_gauge()
                except Exception as exc:  # noqa: BLE001 - a gauge is not worth a failure
                    log.debug("scheduled gauge not updated: %s", exc)
            if handled < self.batch:
                await background.sleep(stopping, self.interval)


async def _dispatch(app: web.Application, stopping: asyncio.Event) -> None:
    interval = app[CONFIG_KEY].dispatch_interval
    box = Dispatcher(app[STORE_KEY], app[OUTBOX_KEY], app[LOOKUPS_KEY], app[METRICS_KEY], interval)
    await box.run(stopping)


# A cleanup context running the dispatcher; put it after the outbox's, so it stops first.
dispatcher = background.loop("dispatcher", _dispatch)
