"""One request, many recipients: batches (a bulk request, a notification to a topic), topics and
their subscribers, and the topic fan-out.

- `store.py`: the SQL of `batches`, `topics` and `topic_subscribers`;
- `recipient`: one recipient's notification, decided by the acceptance decision
  (`common/sending/decision.py`), with an id derived from (batch, user), so a replay or a
  resumed fan-out inserts nothing twice (the `(client_id, request_id)` constraint decides);
- `Fanout`: the consumer of `fanout.queue`. A notification to a topic stores its batch and
  publishes one fan-out message; each message is one page: the consumer reads the topic's
  subscribers (as of the batch's creation) by user_id after the batch's cursor, inserts the page
  with `StatusStore.create_many`, hands the rows to the outbox, moves the batch's cursor and
  publishes a continuation message for the rest, behind whatever is queued already: the pages of
  every batch in progress take turns, so a large topic of one project does not hold up another
  project's small one. Before each page it waits while the channel's work queue holds more than
  `QUEUE_BOUND` messages or the outbox more than a page unconfirmed (back-pressure, and memory
  bounded by a page). The cursor moves only from where the page started (compare and set): of
  two messages on one page (a redrive's or a replay's duplicate) one goes on, the other stops,
  and a continuation the batch has moved past is dropped unread. A fan-out that dies is
  redelivered and resumes from its cursor; a page done again inserts nothing (the ids conflict)
  and rows inserted but never published are the relay's, so no recipient gets two and none is
  skipped. A fan-out that fails for another reason than the infrastructure's is tried
  `FANOUT_ATTEMPTS` times in all, the pause doubling, and then the batch is failed with the
  reason (`failed_at`, `fanout_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web

from common import background
from common.broker import amqp
from common.broker.consumer import Consumer, FailedRoute
from common.broker.outbox import Outbox
from common.data.store import NewNotification, StatusStore
from common.faults import hold, is_infrastructure
from common.features.bulk.store import BatchStore, notification_id, recipient_request_id
from common.keys import (
    BATCHES_KEY,
    BROKER_KEY,
    CONFIG_KEY,
    DB_KEY,
    FANOUT_KEY,
    OUTBOX_KEY,
    REDIS_KEY,
    STORE_KEY,
    USERS_KEY,
)
from common.logs import correlation_id_var, project_var
from common.lookups.cache import profiles
from common.lookups.clients import ServiceClient
from common.sending.decision import Send, accept

log = logging.getLogger(__name__)

PAGE = 500
# A message that names no cursor: the fan-out goes on from wherever its batch is.
ANYWHERE = object()
# Back-pressure: a fan-out waits while its channel's work queue holds more than this, or while
# the outbox has more than a page not yet confirmed by the broker.
QUEUE_BOUND = 5000
PRESSURE_PAUSE = 0.2
# A fan-out whose batch has not moved for this long (or RECONCILE_AFTER, if longer) is published again.
STALLED_AFTER = 60.0
# A fan-out failing on something other than the infrastructure (which is waited out, however
# long) is not going to heal by itself: tried this many times in all, pausing FAILURE_PAUSE,
# then twice that, ..., at most FAILURE_PAUSE_MAX, between tries; then its batch is failed.
FANOUT_ATTEMPTS = 5
FAILURE_PAUSE = 1.0
FAILURE_PAUSE_MAX = 30.0


def recipient(send: Send, user: dict[str, Any], variables: dict[str, Any]) -> NewNotification:
    """One recipient of a batch, decided as a single notification is, under its own id and
    idempotency key (per batch and user)."""
    assert send.batch_id is not None
    user_id = str(user["id"])
    return accept(
        send,
        user_id,
        user,
        notification_id=notification_id(send.batch_id, user_id),
        request_id=recipient_request_id(send.request_id, user_id),
        variables=variables,
    )


class Fanout:
    def __init__(
        self,
        batches: BatchStore,
        store: StatusStore,
        outbox: Outbox,
        broker: amqp.Broker,
        channel: AbstractChannel,
        redis: aioredis.Redis,
        users: ServiceClient,
    ) -> None:
        self.batches = batches
        self.store = store
        self.outbox = outbox
        self.broker = broker
        self.channel = channel
        self.redis = redis
        self.users = users
        self.page = PAGE
        self.queue_bound = QUEUE_BOUND
        self.max_attempts = FANOUT_ATTEMPTS
        self.failure_pause = FAILURE_PAUSE
        self.stalled_after = STALLED_AFTER  # the redrive's threshold (set by `fanout`)
        # One fan-out at a time per gateway (its channel's prefetch is 1); an unparseable
        # message is a dead letter in failed.queue, as the workers' are.
        self.consumer = Consumer(
            broker,
            amqp.FANOUT,
            self.handle,
            channel=channel,
            concurrent=False,
            failed=FailedRoute(lambda: broker.exchange, amqp.FAILED_ROUTING_KEY),
        )

    async def start(self, batch_id: uuid.UUID) -> bool:
        """Publish a topic batch's fan-out message, unless one was published recently or the
        fan-out is moving (a replay of the request while it runs publishes nothing); whether it
        was published. A broker that refuses is logged: the redrive publishes it later."""
        if not await self.batches.claim_publish(batch_id, self.stalled_after):
            return False
        try:
            await self.publish(batch_id)
        except Exception as exc:  # noqa: BLE001 - stored: a replay or the redrive publishes it later
            log.warning("fan-out of batch %s not published now (%s); the redrive will", batch_id, exc)
            with contextlib.suppress(Exception):
                await self.batches.unclaim_publish(batch_id)
            return False
        return True

    async def publish(self, batch_id: uuid.UUID, after: str | None = None) -> None:
        """A message for the batch's next page: the one after `after` (a continuation, published
        by the page before), or, without it, wherever the batch's cursor is (a start, a replay,
        the redrive)."""
        body: dict[str, Any] = {"batch_id": str(batch_id)}
        if after is not None:
            body["after"] = after
        await amqp.publish(self.broker.exchange, amqp.FANOUT, body, message_id=str(batch_id), timeout=5.0)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """The handler `self.consumer` runs (it acknowledges the message when this returns)."""
        try:
            body = orjson.loads(message.body)
            batch_id = uuid.UUID(str(body["batch_id"]))
            after = body.get("after", ANYWHERE)
            if after is not ANYWHERE and not isinstance(after, str):
                raise TypeError(f"after is {type(after).__name__}, not a string")
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            log.error("fan-out message unparseable, to failed.queue: %s", exc)
            await self.consumer.dead_letter(message, f"unparseable message: {type(exc).__name__}: {exc}")
            return
        # Redelivered (its consumer died, or it was put back after a failure): from wherever the
        # batch is, since the page it was for may be done and its continuation never published.
        if message.redelivered:
            after = ANYWHERE
        try:
            await self.run(batch_id, after)
        except Exception as exc:  # noqa: BLE001 - logged; the message goes back, or the batch fails
            await self._failed(message, batch_id, exc)

    async def _failed(self, message: AbstractIncomingMessage, batch_id: uuid.UUID, exc: Exception) -> None:
        """The batch row keeps its cursor: the message goes back and the fan-out resumes. An
        infrastructure error is waited out; any other counts as a try, and after the last the
        batch is failed with the reason and the message dropped."""
        reason = f"{type(exc).__name__}: {exc}"
        if is_infrastructure(exc):
            log.warning("fan-out of batch %s interrupted: %s", batch_id, reason)
            pause = 1.0
        else:
            attempts = await hold(
                "recording a failed fan-out", lambda: self.batches.failed_attempt(batch_id, reason)
            )
            if attempts is None or attempts >= self.max_attempts:
                if attempts is not None:
                    await hold("failing a batch", lambda: self.batches.fail(batch_id))
                log.error(
                    "fan-out of batch %s failed for good after %s tries: %s", batch_id, attempts, reason
                )
                with contextlib.suppress(Exception):
                    await message.ack()
                return
            log.warning(
                "fan-out of batch %s failed (try %d of %d): %s", batch_id, attempts, self.max_attempts, reason
            )
            pause = min(self.failure_pause * 2 ** (attempts - 1), FAILURE_PAUSE_MAX)
        # Paused while still holding the message: nacked at once, it would be redelivered (here
        # or to another gateway) at once, and the pause would be none.
        await asyncio.sleep(pause)
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)

    async def _pressure(self, channel: str, batch_id: uuid.UUID) -> None:
        """Wait while the work queue or the outbox holds more than its bound (the batch row is
        touched meanwhile: a fan-out that waits is not a stalled one)."""
        name = amqp.work_queue(channel)
        touched = time.monotonic()
        while True:
            # The underlying channel: a robust channel answers a passive declare of a queue it
            # declared before from its cache, with the count of that time.
            underlay = await self.channel.get_underlay_channel()
            depth = (await underlay.queue_declare(name, passive=True)).message_count or 0
            if depth <= self.queue_bound and self.outbox.backlog <= self.page:
                return
            if time.monotonic() - touched > STALLED_AFTER / 4:
                touched = time.monotonic()
                await self.batches.touch([batch_id])
            await asyncio.sleep(PRESSURE_PAUSE)

    async def run(self, batch_id: uuid.UUID, after: object = ANYWHERE) -> None:
        """One page of the batch's fan-out, then a continuation message for the rest (or the
        batch marked fanned out). `after`: the cursor the message was published for; a message
        the batch has moved past is a duplicate (the redrive's, a replay's) and does nothing."""
        batch = await hold("reading a batch", lambda: self.batches.get(batch_id))
        if batch is None or batch["kind"] != "topic":
            log.warning("fan-out of batch %s: no such topic batch; dropped", batch_id)
            return
        if batch["fanned_out_at"] is not None or batch["failed_at"] is not None:
            return
        cursor: str | None = batch["fanout_cursor"]
        if after is not ANYWHERE and after != cursor:
            log.debug("fan-out of batch %s: a message for a page done already; dropped", batch_id)
            return
        send = Send.from_stored(batch)
        token = correlation_id_var.set(send.correlation_id)
        # The batch's project: the profiles it reads are that project's users.
        project = project_var.set(send.client_id)
        try:
            await self._pressure(send.notification_type, batch_id)
            page = await hold(
                "reading subscribers",
                lambda: self.batches.subscribers(
                    send.client_id,
                    batch["topic_key"],
                    after=cursor,
                    limit=self.page,
                    as_of=batch["created_at"],
                ),
            )
            if page:
                rejected = await self._page(send, [str(r["user_id"]) for r in page])
                last = str(page[-1]["user_id"])
                # Only the consumer that moves the cursor goes on: two on one page (a duplicate
                # message) leave one continuation, not two.
                moved = await hold(
                    "moving the fan-out cursor",
                    lambda: self.batches.advance(batch_id, cursor, last, rejected),
                )
                if not moved:
                    return
                if len(page) == self.page:
                    # The rest behind the messages already queued: every other batch's next page
                    # comes before this one's, whichever project it is.
                    await hold("publishing the rest of a fan-out", lambda: self.publish(batch_id, last))
                    return
            await hold("finishing a fan-out", lambda: self.batches.fanned_out(batch_id))
            log.info("fan-out of batch %s done", batch_id)
        finally:
            project_var.reset(project)
            correlation_id_var.reset(token)

    async def _page(self, send: Send, user_ids: list[str]) -> int:
        """Insert and hand to the outbox one page; returns how many users no longer exist."""
        found = await profiles(self.redis, self.users, user_ids)
        new = [recipient(send, found[u], send.variables) for u in user_ids if u in found]
        if new:
            rows = await hold("storing a fan-out page", lambda: self.store.create_many(new))
            for row in rows:
                if isinstance(row, BaseException):
                    raise row
                if row is not None and row["status"] == "pending":
                    self.outbox.submit(row)
        return len(user_ids) - len(new)


async def redrive_round(batches: BatchStore, fanout: Fanout, stalled_after: float) -> None:
    """Publish again every fan-out whose batch has not moved for `stalled_after` seconds."""
    stalled = await batches.stalled_fanouts(stalled_after)
    for batch_id in stalled:
        await fanout.publish(batch_id)
    if stalled:
        await batches.touch(stalled, published=True)
        log.warning("published %d stalled fan-out(s) again", len(stalled))


async def fanout(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: the batch store (BATCHES_KEY), the fan-out consumer on a channel of its
    own (FANOUT_KEY), and a loop publishing again any fan-out that has not moved for a while."""
    config = app[CONFIG_KEY]
    broker = app[BROKER_KEY]
    batches = BatchStore(app[DB_KEY])
    app[BATCHES_KEY] = batches
    channel = await amqp.open_channel(broker.connection, prefetch=1)
    worker = Fanout(batches, app[STORE_KEY], app[OUTBOX_KEY], broker, channel, app[REDIS_KEY], app[USERS_KEY])
    app[FANOUT_KEY] = worker
    stalled_after = max(STALLED_AFTER, config.reconcile_after)
    worker.stalled_after = stalled_after
    stop = asyncio.Event()
    redriver = asyncio.create_task(
        background.rounds(
            stop, stalled_after / 4, lambda: redrive_round(batches, worker, stalled_after), "fan-out redrive"
        ),
        name="fanout-redrive",
    )
    worker.consumer.start()
    try:
        yield
    finally:
        await worker.consumer.stop(0)
        await background.stop(redriver, stop.set)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 5)
