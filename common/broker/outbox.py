"""The outbox: a notification is stored first, then published from its stored row.

- `message(row)`: the AMQP body built from a stored row (the gateway and the relay send the same);
- `Outbox.submit(row)`: a committed row, published off the request's path in batches (their
  confirms awaited together) and marked published in one UPDATE per batch;
- `relay`: a loop republishing rows stored but never confirmed by the broker (an outage, a crash
  between commit and publish). Rows are locked with SKIP LOCKED so several gateways relay
  without publishing one row twice; a mark lost in a crash only makes the relay publish that
  row again, which the workers' claim step makes harmless;
- `reconcile`: a loop that makes the status store the single source of truth. A notification
  not final that has not moved for longer than it should have (`pending` though published,
  `retrying` past its retry delay, `sending` past its lease), beyond RECONCILE_AFTER, had its
  message lost (a purged or deleted queue, a broker node gone, a worker gone): it is published
  again from its row. Redelivery is harmless: the claim step dedupes. It also guards the
  scheduled ones: one due for longer than RECONCILE_AFTER had no dispatcher to release it
  (`common/features/accept/dispatcher.py`), and is released and published here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from common import background
from common.broker import amqp
from common.config import Config
from common.data.db import Executor
from common.data.store import StatusStore
from common.delivery.interface import redrive_attempt
from common.keys import BROKER_KEY, CONFIG_KEY, METRICS_KEY, OUTBOX_KEY, STORE_KEY
from common.metrics import Metrics

log = logging.getLogger(__name__)

RELAY_INTERVAL = 1.0
RELAY_AGE = 5.0
RELAY_BATCH = 500
PUBLISH_BATCH = 500
# Off the request's path (the 202 goes out once the row is committed), so it can wait for a
# confirm that a busy machine makes slow: giving up early only hands the row to the relay,
# which publishes it a second time.
PUBLISH_TIMEOUT = 10.0
# Rows waiting in memory to be published, at most; beyond, the relay publishes them from the
# store: memory stays bounded whatever the broker does.
MAX_BACKLOG = 1000
# After a publish failed, requests leave publishing to the relay for this long (or until the
# relay gets one through): a broker that does not answer must not cost every request a timeout.
BROKER_SUSPECT_FOR = 5.0
RECONCILE_BATCH = 500


def message(row: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    return {
        "notification_id": row["id"],
        "request_id": row["request_id"],
        "user_id": row["user_id"],
        "notification_type": row["notification_type"],
        "template_code": row["template_code"],
        "language": row["language"],
        "template_version": row["template_version"],
        "variables": row["variables"],
        "priority": row["priority"],
        "metadata": row["metadata"],
        "correlation_id": row["correlation_id"],
        "attempt": attempt,
        "created_at": row["created_at"],
    }


class Outbox:
    def __init__(self, store: StatusStore, broker: amqp.Broker, config: Config, metrics: Metrics) -> None:
        self.store = store
        self.broker = broker
        self.config = config
        self.metrics = metrics
        self._queue: list[dict[str, Any]] = []
        self._publishing = 0
        self._wakeup = asyncio.Event()
        self._suspect_until = 0.0
        # Submitted and not yet confirmed and marked: the relay leaves these to this process.
        self._in_hand: set[Any] = set()

    async def _send(self, row: dict[str, Any], attempt: int = 1) -> None:
        await amqp.publish(
            self.broker.exchange,
            row["notification_type"],
            message(row, attempt),
            correlation_id=row["correlation_id"],
            priority=row["priority"],
            message_id=str(row["id"]),
            timeout=PUBLISH_TIMEOUT,
        )

    @property
    def backlog(self) -> int:
        """Rows handed to `submit` and not yet confirmed (a fan-out waits while it is long)."""
        return len(self._queue) + self._publishing

    def submit(self, row: dict[str, Any]) -> None:
        """Publish a committed row, soon, off the caller's path: the caller has its answer once
        the row is stored. Published in batches with their confirms awaited together; whatever
        does not get through stays unpublished in the store for the relay."""
        if self.broker.ready and time.monotonic() >= self._suspect_until and len(self._queue) < MAX_BACKLOG:
            self._queue.append(row)
            self._in_hand.add(row["id"])
            self._wakeup.set()

    async def publish_pending(self) -> None:
        batch, self._queue = self._queue[:PUBLISH_BATCH], self._queue[PUBLISH_BATCH:]
        if not self._queue:
            self._wakeup.clear()
        if not batch:
            return
        self._publishing = len(batch)
        try:
            results = await asyncio.gather(*(self._send(row) for row in batch), return_exceptions=True)
        finally:
            self._publishing = 0
        confirmed = [row["id"] for row, result in zip(batch, results, strict=True) if result is None]
        failed = [result for result in results if result is not None]
        if failed:
            # A broker that does not answer must not cost every request's publish a timeout.
            self._suspect_until = time.monotonic() + BROKER_SUSPECT_FOR
            self._in_hand.difference_update(row["id"] for row in self._queue)
            self._queue.clear()
            log.warning(
                "%d publish(es) failed, the relay will retry: %s: %s",
                len(failed),
                type(failed[0]).__name__,
                failed[0],
            )
        try:
            await self.store.mark_published(confirmed)
        except Exception as exc:  # noqa: BLE001 - unmarked rows are published again by the relay: harmless
            log.warning("could not mark %d notification(s) published: %s", len(confirmed), exc)
        finally:
            self._in_hand.difference_update(row["id"] for row in batch)

    async def publish_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._wakeup.wait()
            await self.publish_pending()
        while self._queue:  # what was accepted before the stop
            await self.publish_pending()

    def stop_publishing(self, stopping: asyncio.Event) -> Callable[[], None]:
        def wake() -> None:
            stopping.set()
            self._wakeup.set()

        return wake

    @property
    def can_publish(self) -> bool:
        return self.broker.ready and time.monotonic() >= self._suspect_until

    async def publish_locked(self, tx: Executor, rows: list[dict[str, Any]]) -> int:
        """Publish rows this transaction holds locked, and mark those the broker confirmed, in
        it: no relay can take them meanwhile (SKIP LOCKED), so none is published twice by
        two processes. Returns how many were confirmed; the rest stay for the relay."""
        # Sent in order on one channel; the confirms are awaited together.
        results = await asyncio.gather(*(self._send(row) for row in rows), return_exceptions=True)
        confirmed = [row["id"] for row, result in zip(rows, results, strict=True) if result is None]
        await self.store.mark_published(confirmed, tx)
        return len(confirmed)

    async def relay_once(self) -> None:
        async with self.store.db.transaction() as tx:
            rows = await self.store.unpublished(tx, RELAY_AGE, RELAY_BATCH, exclude=list(self._in_hand))
            confirmed = await self.publish_locked(tx, rows)
        if confirmed:
            self._suspect_until = 0.0
        if rows:
            log.info("relay published %d of %d notification(s) left unpublished", confirmed, len(rows))

    async def relay_loop(self, stopping: asyncio.Event) -> None:
        await background.rounds(stopping, RELAY_INTERVAL, self.relay_once, "relay", lambda: self.broker.ready)

    def _attempt_of(self, row: dict[str, Any]) -> int:
        return redrive_attempt(row["status"], row["attempts"], self.config.max_attempts)

    async def reconcile_once(self) -> int:
        config = self.config
        async with self.store.db.transaction() as tx:
            rows = await self.store.stalled(tx, config.reconcile_after, config.retry_delays, RECONCILE_BATCH)
            results = await asyncio.gather(
                *(self._send(row, self._attempt_of(row)) for row in rows), return_exceptions=True
            )
            sent = [row for row, result in zip(rows, results, strict=True) if result is None]
            await self.store.redriven(tx, sent)
        for row, result in zip(rows, results, strict=True):
            if result is None:
                self.metrics.reconciled.labels(row["notification_type"], row["status"]).inc()
                log.warning(
                    "reconciler: notification %s was %s with no message in flight; published again",
                    row["id"],
                    row["status"],
                )
            else:
                log.warning("reconciler: could not publish %s again: %s", row["id"], result)
        return len(sent) + await self._release_overdue()

    async def _release_overdue(self) -> int:
        """Scheduled ones due for longer than RECONCILE_AFTER: no dispatcher released them."""
        async with self.store.db.transaction() as tx:
            rows = await self.store.due(tx, RECONCILE_BATCH, late_by=self.config.reconcile_after)
            released = await self.store.release(
                tx, [r["id"] for r in rows], "released by the reconciler: no dispatcher released it when due"
            )
        for row in released:
            self.metrics.reconciled.labels(row["notification_type"], "scheduled").inc()
            log.warning("reconciler: notification %s was scheduled and overdue; released", row["id"])
        for row in released:
            self.submit(row)
        return len(released)

    async def reconcile_loop(self, stopping: asyncio.Event) -> None:
        interval = min(max(self.config.reconcile_after / 4, 0.5), 30.0)
        await background.rounds(
            stopping, interval, self.reconcile_once, "reconcile", lambda: self.broker.ready
        )


async def outbox(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: the outbox (OUTBOX_KEY), its mark batching, its relay and the
    reconciler; on shutdown the loops stop, then the marks left are written."""
    box = Outbox(app[STORE_KEY], app[BROKER_KEY], app[CONFIG_KEY], app[METRICS_KEY])
    app[OUTBOX_KEY] = box
    publish_stop, relay_stop, reconcile_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    publisher = asyncio.create_task(box.publish_loop(publish_stop), name="outbox-publisher")
    relay = asyncio.create_task(box.relay_loop(relay_stop), name="outbox-relay")
    reconcile = asyncio.create_task(box.reconcile_loop(reconcile_stop), name="reconciler")
    try:
        yield
    finally:
        await background.stop(reconcile, reconcile_stop.set)
        await background.stop(relay, relay_stop.set)
        await background.stop(publisher, box.stop_publishing(publish_stop))
