"""The one consumer loop both workers run. A worker module supplies only its delivery step.

For each message: parse it → claim the notification in the status store (a notification that is
already final is acknowledged and not sent again) → deliver → record the outcome. A transient
failure moves the message to the retry queue for its attempt; a permanent one, or the last
attempt, marks it failed and puts a copy in failed.queue with the reason in its headers.
Every message is settled exactly once, by the `message.process()` block around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

import topology
from common import amqp, db, resources, templating
from common.cache import Lookups
from common.clients import ServiceClient, ServiceUnavailable, TemplateCache
from common.config import Config
from common.http import CONFIG_KEY, METRICS_KEY, base_app
from common.logs import log_context
from common.metrics import Metrics
from common.resources import Broker
from common.store import StatusStore

log = logging.getLogger("worker")

# What every worker holds; the providers are each worker's own.
DB_KEY = web.AppKey("notifications_db", db.Database)
STORE_KEY = web.AppKey("status_store", StatusStore)
BROKER_KEY = web.AppKey("broker", Broker)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)

SHUTDOWN_GRACE = 20.0
STORE_OUTAGE_BACKOFF = 1.0


class DeliveryError(Exception):
    """A delivery attempt failed; `transient` decides retry queue or failed.

    `retry_after` (seconds, from a provider's Retry-After) picks a retry queue at least that
    long. `defer` waits in the retry queue without using up an attempt (every provider's
    circuit is open: nothing was tried). `carry` is merged into the message for the next
    attempt, e.g. which devices already have it, so a retry resends only what failed.
    """

    def __init__(
        self,
        reason: str,
        *,
        transient: bool,
        provider: str | None = None,
        retry_after: float | None = None,
        defer: bool = False,
        carry: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.provider = provider
        self.retry_after = retry_after
        self.defer = defer
        self.carry = carry or {}


class Skip(Exception):
    """Not to be sent after all (the user opted out since it was accepted): recorded `skipped`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    notification_id: uuid.UUID
    attempt: int
    body: dict[str, Any]
    record: dict[str, Any]


@dataclass
class Delivered:
    provider: str
    template_version: int | None = None
    language: str | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Deliver = Callable[[Job], Awaitable[Delivered]]


@dataclass(frozen=True)
class Prepared:
    user: dict[str, Any]
    template: dict[str, Any]
    parts: dict[str, str]


class Preparer:
    """The first half of every delivery: the user's profile (from the Redis cache when it is
    there), the pinned template version (cached: versions never change), the preference checked
    again, and the rendering, once. Failures are classified here for both channels."""

    def __init__(self, app: web.Application, channel: str) -> None:
        config = app[CONFIG_KEY]
        session = app[HTTP_KEY]
        self.channel = channel
        self.users = ServiceClient(
            session, config.user_service_url, config.internal_api_token, "user service"
        )
        template_service = ServiceClient(
            session, config.template_service_url, config.internal_api_token, "template service"
        )
        self.templates = TemplateCache(template_service)
        self.lookups = Lookups(app[REDIS_KEY], self.users, template_service)

    async def prepare(self, job: Job) -> Prepared:
        body = job.body
        try:
            user = await self.lookups.user(str(body["user_id"]))
            template = await self.templates.get(
                body["template_code"], body["language"], body["template_version"]
            )
        except ServiceUnavailable as exc:
            raise DeliveryError(str(exc), transient=True) from exc
        if user.status == 404:
            raise DeliveryError("user no longer exists", transient=False)
        if template.status != 200:
            raise DeliveryError(f"template: {template.message}", transient=False)
        if user.status != 200:
            raise DeliveryError(f"user service answered {user.status}", transient=True)
        if not user.data.get("preferences", {}).get(self.channel, True):
            # Checked again at sending time: an opt-out or a bounce since acceptance wins.
            raise Skip(f"user opted out of {self.channel} notifications")
        try:
            parts = await templating.render(self.channel, template.data, body.get("variables") or {})
        except templating.RenderError as exc:
            raise DeliveryError(f"template: {exc.message}", transient=False) from exc
        return Prepared(user.data, template.data, parts)


class Worker:
    def __init__(
        self,
        channel: str,
        config: Config,
        store: StatusStore,
        broker: Broker,
        metrics: Metrics,
        deliver: Deliver,
    ) -> None:
        self.channel = channel
        self.config = config
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.deliver = deliver
        self.in_flight: set[asyncio.Task[None]] = set()

    async def consume(self) -> None:
        # Declared (same arguments, from the topology table) rather than looked up: a robust
        # channel restores the consumers only of queues it declared, after a reconnect.
        spec = next(q for q in topology.table(self.config) if q.name == amqp.work_queue(self.channel))
        queue = await self.broker.channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        async with queue.iterator() as messages:
            async for message in messages:
                # Prefetch bounds how many run at once: the broker sends no more than that.
                task = asyncio.create_task(self.handle(message))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)

    async def drain(self, timeout: float) -> None:
        if self.in_flight:
            log.info("waiting for %d message(s) in flight", len(self.in_flight))
            await asyncio.wait(self.in_flight, timeout=timeout)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        gauge = self.metrics.in_flight.labels(self.channel)
        gauge.inc()
        try:
            async with message.process(requeue=False, ignore_processed=True):
                await self._process(message)
        except Exception:  # noqa: BLE001 - already logged; the message was settled above
            pass
        finally:
            gauge.dec()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            body = orjson.loads(message.body)
            notification_id = uuid.UUID(str(body["notification_id"]))
            attempt = int(body.get("attempt", 1))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            await self._poison(message, f"unparseable message: {type(exc).__name__}: {exc}")
            return
        correlation_id = body.get("correlation_id") or (message.headers or {}).get("x-correlation-id")
        with log_context(str(correlation_id) if correlation_id else None, str(notification_id)):
            try:
                await self._attempt(message, body, notification_id, attempt)
            except db.DatabaseError as exc:
                # Without the store nothing can be recorded: hand the message back and slow down.
                log.warning("status store unavailable, message requeued: %s", exc)
                await asyncio.sleep(STORE_OUTAGE_BACKOFF)
                await message.nack(requeue=True)
            except Exception:
                log.exception("unexpected error; message dead-lettered to failed.queue")
                await self.store.record(notification_id, "failed", error="internal error in worker")
                self.metrics.failed.labels(self.channel, "internal").inc()
                raise  # process() rejects it; the work queue dead-letters it to failed.queue

    async def _attempt(
        self,
        message: AbstractIncomingMessage,
        body: dict[str, Any],
        notification_id: uuid.UUID,
        attempt: int,
    ) -> None:
        record = await self.store.claim(notification_id, attempt, self.config.claim_timeout)
        if record is None:
            existing = await self.store.get(notification_id)
            if existing is None:
                await self._poison(message, "unknown notification_id")
            elif existing["status"] == "sending":
                # Another consumer holds it (a redelivery raced the first copy): look again
                # after a retry delay; its lease runs out if that consumer died.
                self.metrics.deferred_in_progress.labels(self.channel).inc()
                await self._to_retry_queue(
                    message, body, notification_id, 1, attempt, "in progress elsewhere"
                )
            else:
                self.metrics.duplicates.labels(self.channel).inc()
                log.info("already %s: acknowledged without sending again", existing["status"])
            return
        if record.pop("reclaimed", False):
            self.metrics.reclaimed.labels(self.channel).inc()
            log.warning("taking over an attempt a worker did not finish: it may be sent twice")
        started = time.perf_counter()
        try:
            delivered = await self.deliver(Job(notification_id, attempt, body, record))
        except DeliveryError as exc:
            await self._failed_attempt(message, body, notification_id, attempt, exc)
            return
        except Skip as exc:
            await self.store.record(notification_id, "skipped", error=exc.reason)
            self.metrics.skipped.labels(self.channel).inc()
            log.info("skipped: %s", exc.reason)
            return
        finally:
            self.metrics.delivery_latency.labels(self.channel).observe(time.perf_counter() - started)
        await self.store.record(
            notification_id,
            "delivered",
            provider=delivered.provider,
            error=delivered.detail,
            template_version=delivered.template_version,
            language=delivered.language,
        )
        self.metrics.delivered.labels(self.channel, delivered.provider).inc()
        created = record.get("created_at")
        if created is not None:
            self.metrics.end_to_end_latency.labels(self.channel).observe(
                max(0.0, time.time() - created.timestamp())
            )
        log.info("delivered by %s on attempt %d", delivered.provider, attempt)

    async def _failed_attempt(
        self,
        message: AbstractIncomingMessage,
        body: dict[str, Any],
        notification_id: uuid.UUID,
        attempt: int,
        exc: DeliveryError,
    ) -> None:
        delays = self.config.retry_delays
        if exc.transient and (exc.defer or attempt < self.config.max_attempts):
            # The retry queue for this attempt, or a later one when the provider asked for a
            # longer wait; a deferral waits in the first one and keeps its attempt number.
            index = 1 if exc.defer else attempt
            if exc.retry_after is not None:
                longer = [i for i, d in enumerate(delays, start=1) if i >= index and d >= exc.retry_after]
                index = longer[0] if longer else len(delays)
            next_attempt = attempt if exc.defer else index + 1
            # Published before the status changes: a crash in between leaves a duplicate
            # message, which the claim step turns into a no-op, never a lost one.
            await self._to_retry_queue(
                message, {**body, **exc.carry}, notification_id, index, next_attempt, exc.reason
            )
            await self.store.record(notification_id, "retrying", error=exc.reason, provider=exc.provider)
            self.metrics.retried.labels(self.channel).inc()
            log.warning(
                "attempt %d %s (%s); attempt %d follows in %gs",
                attempt,
                "deferred" if exc.defer else "failed",
                exc.reason,
                next_attempt,
                delays[index - 1],
            )
            return
        reason = exc.reason if not exc.transient else f"retries exhausted: {exc.reason}"
        await self.store.record(notification_id, "failed", error=reason, provider=exc.provider)
        await self._dead_letter(message.body, reason, notification_id, attempt, message.priority)
        self.metrics.failed.labels(self.channel, "transient" if exc.transient else "permanent").inc()
        log.error("failed after %d attempt(s): %s", attempt, reason)

    async def _to_retry_queue(
        self,
        message: AbstractIncomingMessage,
        body: dict[str, Any],
        notification_id: uuid.UUID,
        index: int,
        next_attempt: int,
        reason: str,
    ) -> None:
        await amqp.publish(
            self.broker.channel.default_exchange,
            amqp.retry_queue(self.channel, index),
            {**body, "attempt": next_attempt},
            correlation_id=body.get("correlation_id"),
            priority=message.priority or 0,
            message_id=str(notification_id),
            headers={"x-last-error": reason[:500]},
        )

    async def _poison(self, message: AbstractIncomingMessage, reason: str) -> None:
        await self._dead_letter(message.body, reason, None, 0, message.priority)
        self.metrics.failed.labels(self.channel, "poison").inc()
        log.error("poison message moved to failed.queue: %s", reason)

    async def _dead_letter(
        self,
        raw: bytes,
        reason: str,
        notification_id: uuid.UUID | None,
        attempts: int,
        priority: int | None,
    ) -> None:
        headers: dict[str, Any] = {
            "x-failure-reason": reason[:1000],
            "x-channel": self.channel,
            "x-attempts": attempts,
            "x-failed-at": int(time.time()),
        }
        if notification_id is not None:
            headers["x-notification-id"] = str(notification_id)
        await self.broker.exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=priority or 0,
            ),
            routing_key=amqp.FAILED_ROUTING_KEY,
            timeout=10,
        )


def consumer(
    channel: str, deliver_factory: Callable[[web.Application], Deliver]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running the consumer; on shutdown it stops taking messages, lets the
    ones in flight finish, then returns (the connection closes after it)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        worker = Worker(
            channel, app[CONFIG_KEY], app[STORE_KEY], app[BROKER_KEY], app[METRICS_KEY], deliver_factory(app)
        )
        task = asyncio.create_task(worker.consume(), name=f"{channel}-consumer")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await worker.drain(SHUTDOWN_GRACE)

    return ctx


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORE_KEY] = StatusStore(app[DB_KEY])
    yield


def worker_app(
    service: str,
    channel: str,
    config: Config,
    providers: Callable[[web.Application], AsyncIterator[None]],
    deliver_factory: Callable[[web.Application], Deliver],
) -> web.Application:
    """A worker: its resources, its providers, then the consumer (closed first on shutdown)."""
    app = base_app(service, config)
    app.cleanup_ctx.append(resources.database(DB_KEY, lambda c: c.notifications_db_url, "postgres"))
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(resources.broker(BROKER_KEY, prefetch=config.worker_prefetch))
    app.cleanup_ctx.append(resources.http_client(HTTP_KEY))
    app.cleanup_ctx.append(resources.redis_client(REDIS_KEY))
    app.cleanup_ctx.append(providers)
    app.cleanup_ctx.append(consumer(channel, deliver_factory))
    return app
