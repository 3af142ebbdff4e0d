"""One request, many recipients: batches (a bulk request, a notification to a topic), topics and
their subscribers, and the topic fan-out.

- `BatchStore`: the SQL of `batches`, `topics` and `topic_subscribers` (notifications_db);
- `profiles`: many users' profiles at once, from the Redis cache (one MGET) and the user
  service's batch lookup for the misses;
- `recipient`: one recipient's notification, decided as the single accept path decides it
  (preference, quiet hours, `send_at`), with an id derived from (batch, user), so a replay or a
  resumed fan-out inserts nothing twice (the `(client_id, request_id)` constraint decides);
- `Fanout`: the consumer of `fanout.queue`. A notification to a topic stores its batch and
  publishes one fan-out message; the consumer walks the topic's subscribers (as of the batch's
  creation) by user_id in pages, inserts each page with `StatusStore.create_many`, hands the rows
  to the outbox and moves the batch's cursor. Before each page it waits while the channel's work
  queue holds more than `QUEUE_BOUND` messages or the outbox more than a page unconfirmed
  (back-pressure, and memory bounded by a page). A fan-out that dies is redelivered and resumes
  from its cursor; a page done again inserts nothing (the ids conflict) and rows inserted but
  never published are the relay's, so no recipient gets two and none is skipped. A fan-out that
  fails for another reason than the infrastructure's is tried `FANOUT_ATTEMPTS` times in all,
  the pause doubling, and then the batch is failed with the reason (`failed_at`, `fanout_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from redis.exceptions import RedisError

from common import amqp, db, schedule
from common.cache import user_key
from common.clients import ServiceClient
from common.faults import hold, is_infrastructure
from common.http import CONFIG_KEY
from common.logs import correlation_id_var
from common.outbox import Outbox
from common.store import FINAL_STATUSES, NewNotification, StatusStore

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 1000
PAGE = 500
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

_BATCH_COLUMNS = (
    "id, client_id, request_id, body_hash, kind, topic_key, payload, total, rejected, result, "
    "fanout_cursor, fanned_out_at, fanout_attempts, fanout_error, failed_at, created_at, updated_at"
)


def notification_id(batch_id: uuid.UUID, user_id: uuid.UUID | str) -> uuid.UUID:
    """A recipient's notification id: the same for the same batch and user, every time."""
    return uuid.uuid5(batch_id, str(user_id))


# Between a batch's request_id and a recipient's user id in the recipient's idempotency key. A
# client's request_id cannot hold it (REQUEST_ID_RE refuses control characters), so no single
# notification's key can equal a recipient's, whatever the client picks.
RECIPIENT_SEPARATOR = "\x1f"  # ASCII unit separator


def recipient_request_id(request_id: str, user_id: uuid.UUID | str) -> str:
    """A batch recipient's request_id: the same for the same request and user, every time."""
    return f"{request_id}{RECIPIENT_SEPARATOR}{user_id}"


class BatchStore:
    def __init__(self, database: db.Database) -> None:
        self.db = database

    # batches

    async def create(
        self,
        *,
        client_id: str,
        request_id: str,
        body_hash: str,
        kind: str,
        topic_key: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> tuple[db.Row, bool]:
        """The batch for (client_id, request_id), and whether this call created it. A topic's
        total is its subscriber count at this moment (the fan-out sends to those)."""
        row = await self.db.fetchrow(
            f"""
            INSERT INTO batches (id, client_id, request_id, body_hash, kind, topic_key, payload, total)
            VALUES (%s, %s, %s, %s, %s, %s, %s,
                    CASE WHEN %s::text IS NULL THEN 0 ELSE (SELECT count(*) FROM topic_subscribers
                         WHERE client_id = %s AND topic_key = %s) END)
            ON CONFLICT (client_id, request_id) DO NOTHING
            RETURNING {_BATCH_COLUMNS}
            """,
            uuid.uuid4(),
            client_id,
            request_id,
            body_hash,
            kind,
            topic_key,
            orjson.dumps(payload or {}).decode(),
            topic_key,
            client_id,
            topic_key,
        )
        if row is not None:
            return row, True
        existing = await self.by_request(client_id, request_id)
        if existing is None:  # deleted meanwhile: not expected, but not a crash either
            raise ConnectionError("batch vanished while being created")
        return existing, False

    async def by_request(self, client_id: str, request_id: str) -> db.Row | None:
        return await self.db.fetchrow(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE client_id = %s AND request_id = %s",
            client_id,
            request_id,
        )

    async def get(self, batch_id: uuid.UUID) -> db.Row | None:
        return await self.db.fetchrow(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = %s", batch_id)

    async def finish_bulk(self, batch_id: uuid.UUID, result: dict[str, Any]) -> None:
        await self.db.execute(
            "UPDATE batches SET result = %s, total = %s, rejected = %s, updated_at = now() WHERE id = %s",
            orjson.dumps(result).decode(),
            result["total"],
            len(result["rejected"]),
            batch_id,
        )

    async def advance(self, batch_id: uuid.UUID, cursor: uuid.UUID, rejected: int) -> None:
        """Move a fan-out's cursor forward (never back: a second consumer on the same batch
        only ever repeats pages, which insert nothing)."""
        await self.db.execute(
            "UPDATE batches SET fanout_cursor = %s, rejected = rejected + %s, updated_at = now()"
            " WHERE id = %s AND (fanout_cursor IS NULL OR fanout_cursor < %s)",
            cursor,
            rejected,
            batch_id,
            cursor,
        )

    async def fanned_out(self, batch_id: uuid.UUID) -> None:
        await self.db.execute(
            "UPDATE batches SET fanned_out_at = coalesce(fanned_out_at, now()), updated_at = now()"
            " WHERE id = %s",
            batch_id,
        )

    async def failed_attempt(self, batch_id: uuid.UUID, reason: str) -> int | None:
        """Count one failed try of a fan-out, with its reason; how many so far (None: no batch)."""
        return await self.db.fetchval(
            "UPDATE batches SET fanout_attempts = fanout_attempts + 1, fanout_error = %s,"
            " updated_at = now() WHERE id = %s RETURNING fanout_attempts",
            reason[:2000],
            batch_id,
        )

    async def fail(self, batch_id: uuid.UUID) -> None:
        await self.db.execute(
            "UPDATE batches SET failed_at = coalesce(failed_at, now()), updated_at = now() WHERE id = %s",
            batch_id,
        )

    async def counts(self, batch_id: uuid.UUID) -> tuple[dict[str, int], datetime | None]:
        """Its notifications by status, and when the last became final (None while any is not)."""
        rows = await self.db.fetch(
            "SELECT status, count(*) AS n, max(updated_at) AS last FROM notifications"
            " WHERE batch_id = %s GROUP BY status",
            batch_id,
        )
        by_status = {r["status"]: int(r["n"]) for r in rows}
        done = all(r["status"] in FINAL_STATUSES for r in rows)
        last = max((r["last"] for r in rows), default=None) if done else None
        return by_status, last

    async def existing(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        rows = await self.db.fetch("SELECT id, status FROM notifications WHERE id = ANY(%s)", ids)
        return {r["id"]: r["status"] for r in rows}

    async def stalled_fanouts(self, older_than: float) -> list[uuid.UUID]:
        rows = await self.db.fetch(
            "SELECT id FROM batches WHERE kind = 'topic' AND fanned_out_at IS NULL AND failed_at IS NULL"
            " AND updated_at < now() - make_interval(secs => %s) ORDER BY updated_at LIMIT 100",
            older_than,
        )
        return [r["id"] for r in rows]

    async def touch(self, batch_ids: list[uuid.UUID]) -> None:
        await self.db.execute("UPDATE batches SET updated_at = now() WHERE id = ANY(%s)", batch_ids)

    # topics

    async def put_topic(self, client_id: str, key: str, name: str) -> tuple[db.Row, bool]:
        row = await self.db.fetchrow(
            """
            INSERT INTO topics (client_id, key, name) VALUES (%s, %s, %s)
            ON CONFLICT (client_id, key) DO UPDATE SET name = EXCLUDED.name, updated_at = now()
            RETURNING key, name, created_at, updated_at, (xmax = 0) AS created
            """,
            client_id,
            key,
            name,
        )
        assert row is not None
        return row, bool(row.pop("created"))

    async def topic(self, client_id: str, key: str) -> db.Row | None:
        return await self.db.fetchrow(
            "SELECT key, name, created_at, updated_at, (SELECT count(*) FROM topic_subscribers s"
            " WHERE s.client_id = t.client_id AND s.topic_key = t.key) AS subscribers"
            " FROM topics t WHERE client_id = %s AND key = %s",
            client_id,
            key,
        )

    async def topic_exists(self, client_id: str, key: str) -> bool:
        return bool(
            await self.db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM topics WHERE client_id = %s AND key = %s)", client_id, key
            )
        )

    async def subscribe(self, client_id: str, key: str, user_ids: list[uuid.UUID]) -> int:
        """Adds the ones not yet subscribed; returns how many were added."""
        rows = await self.db.fetch(
            """
            INSERT INTO topic_subscribers (client_id, topic_key, user_id)
            SELECT %s, %s, u FROM unnest(%s::uuid[]) AS u
            ON CONFLICT DO NOTHING RETURNING user_id
            """,
            client_id,
            key,
            user_ids,
        )
        return len(rows)

    async def unsubscribe(self, client_id: str, key: str, user_id: uuid.UUID) -> bool:
        return (
            await self.db.execute(
                "DELETE FROM topic_subscribers WHERE client_id = %s AND topic_key = %s AND user_id = %s",
                client_id,
                key,
                user_id,
            )
            > 0
        )

    async def subscribers(
        self,
        client_id: str,
        key: str,
        *,
        after: uuid.UUID | None,
        limit: int,
        as_of: datetime | None = None,
    ) -> list[db.Row]:
        """A page of subscribers by user_id after `after` (keyset); `as_of` leaves out those
        who subscribed later (a fan-out sends to the subscribers of its moment)."""
        return await self.db.fetch(
            """
            SELECT user_id, created_at FROM topic_subscribers
            WHERE client_id = %s AND topic_key = %s
              AND (%s::uuid IS NULL OR user_id > %s::uuid)
              AND (%s::timestamptz IS NULL OR created_at <= %s::timestamptz)
            ORDER BY user_id LIMIT %s
            """,
            client_id,
            key,
            after,
            after,
            as_of,
            as_of,
            limit,
        )


async def profiles(
    redis: aioredis.Redis, users: ServiceClient, user_ids: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Many users' profiles: one MGET of the cache, the misses from the user service in batch
    lookups. Users that do not exist are absent from the answer. Redis down: all from the service."""
    ids = list(dict.fromkeys(user_ids))
    found: dict[str, dict[str, Any]] = {}
    if ids:
        try:
            cached = await redis.mget([user_key(u) for u in ids])
        except (RedisError, OSError) as exc:
            log.debug("profile cache unavailable for a batch lookup: %s", exc)
            cached = [None] * len(ids)
        for user_id, raw in zip(ids, cached, strict=True):
            if raw:
                found[user_id] = orjson.loads(raw)
    missing = [u for u in ids if u not in found]
    for start in range(0, len(missing), MAX_RECIPIENTS):
        for profile in await users.lookup_users(missing[start : start + MAX_RECIPIENTS]):
            found[str(profile["id"])] = profile
    return found


@dataclass(frozen=True)
class Common:
    """What every recipient of a batch shares."""

    batch_id: uuid.UUID
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


def recipient(common: Common, user: dict[str, Any], variables: dict[str, Any]) -> NewNotification:
    """One recipient's notification, decided as a single notification is: opted out → skipped,
    `send_at` or quiet hours → scheduled, else pending."""
    channel = common.notification_type
    preferences = user.get("preferences") or {}
    opted_in = bool(preferences.get(channel, True))
    later = schedule.plan(
        datetime.now(UTC),
        common.when,
        schedule.zone(user.get("timezone")),
        schedule.QuietHours.of(preferences.get("quiet_hours")),
        urgent=common.priority >= schedule.URGENT_PRIORITY,
    )
    status = "skipped" if not opted_in else "scheduled" if later.send_at else "pending"
    user_id = uuid.UUID(str(user["id"]))
    return NewNotification(
        id=notification_id(common.batch_id, user_id),
        client_id=common.client_id,
        # Per (client, request_id, user): the idempotency key of one recipient of the batch.
        request_id=recipient_request_id(common.request_id, user_id),
        body_hash=common.body_hash,
        user_id=user_id,
        notification_type=channel,
        template_code=common.template_code,
        language=common.language,
        template_version=common.template_version,
        priority=common.priority,
        correlation_id=common.correlation_id,
        status=status,
        error=None if opted_in else f"user opted out of {channel} notifications",
        variables=variables,
        metadata=common.metadata,
        send_at=later.send_at if opted_in else None,
        detail=later.reason if opted_in else None,
        batch_id=common.batch_id,
    )


def common_of(batch: db.Row) -> Common:
    """The shared part of a topic batch, from its stored payload."""
    p = batch["payload"]
    send_at = datetime.fromisoformat(p["send_at"]) if p.get("send_at") else None
    local = schedule.parse_hhmm(p["send_at_local"]) if p.get("send_at_local") else None
    return Common(
        batch_id=batch["id"],
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

    async def publish(self, batch_id: uuid.UUID) -> None:
        await amqp.publish(
            self.broker.exchange,
            amqp.FANOUT,
            {"batch_id": str(batch_id)},
            message_id=str(batch_id),
            timeout=5.0,
        )

    async def consume(self) -> None:
        name = amqp.work_queue(amqp.FANOUT)
        queue = await self.channel.declare_queue(name, durable=True, arguments=dict(self.broker.queues[name]))
        async with queue.iterator() as messages:
            async for message in messages:
                await self.handle(message)  # one fan-out at a time per gateway

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            batch_id = uuid.UUID(str(orjson.loads(message.body)["batch_id"]))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            log.error("fan-out message unparseable, to failed.queue: %s", exc)
            await message.reject(requeue=False)
            return
        try:
            await self.run(batch_id)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the message goes back, or the batch fails
            await self._failed(message, batch_id, exc)
            return
        await message.ack()

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

    async def run(self, batch_id: uuid.UUID) -> None:
        batch = await hold("reading a batch", lambda: self.batches.get(batch_id))
        if batch is None or batch["kind"] != "topic":
            log.warning("fan-out of batch %s: no such topic batch; dropped", batch_id)
            return
        if batch["fanned_out_at"] is not None or batch["failed_at"] is not None:
            return
        common = common_of(batch)
        token = correlation_id_var.set(common.correlation_id)
        try:
            cursor: uuid.UUID | None = batch["fanout_cursor"]
            while True:
                await self._pressure(common.notification_type, batch_id)
                page = await hold(
                    "reading subscribers",
                    lambda c=cursor: self.batches.subscribers(  # type: ignore[misc]
                        common.client_id,
                        batch["topic_key"],
                        after=c,
                        limit=self.page,
                        as_of=batch["created_at"],
                    ),
                )
                if not page:
                    break
                rejected = await self._page(common, [str(r["user_id"]) for r in page])
                cursor = page[-1]["user_id"]
                await hold(
                    "moving the fan-out cursor",
                    lambda c=cursor, n=rejected: self.batches.advance(  # type: ignore[misc]
                        batch_id, c, n
                    ),
                )
                if len(page) < self.page:
                    break
            await hold("finishing a fan-out", lambda: self.batches.fanned_out(batch_id))
            log.info("fan-out of batch %s done", batch_id)
        finally:
            correlation_id_var.reset(token)

    async def _page(self, common: Common, user_ids: list[str]) -> int:
        """Insert and hand to the outbox one page; returns how many users no longer exist."""
        found = await profiles(self.redis, self.users, user_ids)
        new = [recipient(common, found[u], common.variables) for u in user_ids if u in found]
        if new:
            rows = await hold("storing a fan-out page", lambda: self.store.create_many(new))
            for row in rows:
                if isinstance(row, BaseException):
                    raise row
                if row is not None and row["status"] == "pending":
                    self.outbox.submit(row)
        return len(user_ids) - len(new)


FANOUT_KEY = web.AppKey("fanout", Fanout)
BATCHES_KEY = web.AppKey("batches", BatchStore)


def fanout(
    db_key: web.AppKey[db.Database],
    store_key: web.AppKey[StatusStore],
    outbox_key: web.AppKey[Outbox],
    broker_key: web.AppKey[amqp.Broker],
    redis_key: web.AppKey[aioredis.Redis],
    users: Callable[[web.Application], ServiceClient],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the batch store (BATCHES_KEY), the fan-out consumer on a channel of its
    own (FANOUT_KEY), and a loop publishing again any fan-out that has not moved for a while."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        broker = app[broker_key]
        batches = BatchStore(app[db_key])
        app[BATCHES_KEY] = batches
        channel = await amqp.open_channel(broker.connection, prefetch=1)
        worker = Fanout(batches, app[store_key], app[outbox_key], broker, channel, app[redis_key], users(app))
        app[FANOUT_KEY] = worker
        stalled_after = max(STALLED_AFTER, config.reconcile_after)
        stop = asyncio.Event()

        async def redrive() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), stalled_after / 4)
                if stop.is_set():
                    break
                try:
                    stalled = await batches.stalled_fanouts(stalled_after)
                    for batch_id in stalled:
                        await worker.publish(batch_id)
                    if stalled:
                        await batches.touch(stalled)
                        log.warning("published %d stalled fan-out(s) again", len(stalled))
                except Exception as exc:
                    if not is_infrastructure(exc):
                        log.exception("fan-out redrive failed")

        consumer = asyncio.create_task(worker.consume(), name="fanout-consumer")
        redriver = asyncio.create_task(redrive(), name="fanout-redrive")
        try:
            yield
        finally:
            stop.set()
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await asyncio.gather(redriver, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)

    return ctx
