"""The one consumer loop both workers run. A worker module supplies only its delivery step.

For each message: parse it into a `Job` → claim the notification in the status store (one that is
already final is acknowledged and not sent again) → deliver → record the outcome. What follows a
failed attempt is `delivery.decide`: the retry queue for its attempt, or failed (and a copy in
failed.queue with the reason in its headers). Every message is settled exactly once, by the
`message.process()` block around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from common import background, resources
from common.broker import amqp
from common.broker.consumer import Consumer, FailedRoute
from common.config import Config
from common.data import db, retention
from common.data.store import Claim, Outcome, StatusStore
from common.delivery.interface import Delivered, Delivery, DeliveryError, Fail, Job, Retry, Skip, decide
from common.faults import hold, is_infrastructure
from common.group_commit import Batcher
from common.keys import (
    BROKER_KEY,
    CONFIG_KEY,
    HTTP_KEY,
    METRICS_KEY,
    REDIS_KEY,
    RENDER_KEY,
    STORE_KEY,
)
from common.logs import log_context, project_var
from common.lookups.cache import CachedLookups, TemplateVersionCache
from common.lookups.clients import ServiceUnavailable, services
from common.metrics import Metrics
from common.rendering import templating
from common.sending.decision import recipient_of
from common.sending.preferences import opted_out, origin_of
from common.web.http import base_app

log = logging.getLogger("worker")

# What every worker holds; the providers are each worker's own.

SHUTDOWN_GRACE = 20.0
BATCH_WINDOW = 0.025  # seconds a claim or a record waits for others to share its statement
RETRY_PUBLISH_TIMEOUT = 5.0

T = TypeVar("T")


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
        clients = services(app[CONFIG_KEY], app[HTTP_KEY])
        self.channel = channel
        self.renderer = app[RENDER_KEY]
        self.users = clients.users
        self.templates = TemplateVersionCache(clients.templates)
        self.lookups = CachedLookups(app[REDIS_KEY], clients.users, clients.templates)

    async def prepare(self, job: Job) -> Prepared:
        body = job.body
        try:
            user = await self.lookups.user(str(body["user_id"]))
            template = await self.templates.get(
                body["template_code"], body["language"], body["template_version"]
            )
        except ServiceUnavailable as exc:
            # Our own services, not the provider: wait without using up an attempt.
            raise DeliveryError(str(exc), transient=True, defer=True, provider_fault=False) from exc
        if user.status == 404:
            raise DeliveryError("user no longer exists", transient=False)
        if template.status != 200:
            raise DeliveryError(f"template: {template.message}", transient=False)
        if user.status != 200:
            raise DeliveryError(f"user service answered {user.status}", transient=True)
        # Checked again at sending time: an opt-out or a bounce since acceptance wins (a critical
        # workflow's step goes out whatever the user opted out of).
        reason = opted_out(user.data.get("preferences") or {}, self.channel, origin_of(job.record))
        if reason is not None:
            raise Skip(reason)
        try:
            # Who it is for as pinned at acceptance; rows accepted before that: the profile now.
            recipient = job.record.get("recipient") or recipient_of(str(body["user_id"]), user.data)
            parts = await self.renderer.render(
                self.channel, template.data, body.get("variables") or {}, recipient
            )
        except templating.RenderError as exc:
            raise DeliveryError(f"template: {exc.message}", transient=False) from exc
        return Prepared(user.data, template.data, parts)


def parse(message: AbstractIncomingMessage) -> Job:
    """The job a message carries; ValueError (and friends) when it is not one of ours."""
    body = orjson.loads(message.body)
    return Job(
        notification_id=uuid.UUID(str(body["notification_id"])),
        attempt=int(body.get("attempt", 1)),
        body=body,
        priority=message.priority or 0,
    )


class Worker:
    """Consumes one channel's work queue. Infrastructure errors never fail a notification
    (`common/faults.py`): a store write that does not go through is retried, holding the
    message, until it does; a broker that does not take a retry leaves the notification to the
    reconciler; a service that does not answer defers the attempt without using it up."""

    def __init__(
        self,
        channel: str,
        config: Config,
        store: StatusStore,
        broker: amqp.Broker,
        metrics: Metrics,
        delivery: Delivery,
    ) -> None:
        self.channel = channel
        self.config = config
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.delivery = delivery
        # The one consumer loop (common/broker/consumer.py) takes, settles and drains messages;
        # dead letters go to failed.queue through the exchange, as the topology routes them.
        self.consumer = Consumer(
            broker,
            channel,
            self.handle,
            failed=FailedRoute(lambda: broker.exchange, amqp.FAILED_ROUTING_KEY),
            publish_timeout=RETRY_PUBLISH_TIMEOUT,
        )
        self.claims: dict[uuid.UUID, uuid.UUID] = {}
        # Group commit: the messages in flight claim and record together, one statement (one
        # transaction, one round trip) for each batch rather than two for every message. The
        # broker hands messages over one by one as earlier ones are acknowledged, so they come
        # staggered: the window is wide enough to gather them, and small beside a delivery.
        self.claiming: Batcher[Claim, db.Row | None] = Batcher(
            lambda batch: store.claim_many(batch, config.claim_timeout),
            size=config.worker_prefetch,
            delay=BATCH_WINDOW,
        )
        self.recording: Batcher[Outcome, bool] = Batcher(
            store.record_many, size=config.worker_prefetch, delay=BATCH_WINDOW
        )

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """The handler `self.consumer` runs for each message (which it settles)."""
        gauge = self.metrics.in_flight.labels(self.channel)
        gauge.inc()
        try:
            await self._process(message)
        finally:
            gauge.dec()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            job = parse(message)
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            await self._poison(message, f"unparseable message: {type(exc).__name__}: {exc}")
            return
        correlation_id = job.body.get("correlation_id") or (message.headers or {}).get("x-correlation-id")
        with log_context(str(correlation_id) if correlation_id else None, str(job.notification_id)):
            await self._attempt(message, job)

    async def _hold(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        def retried() -> None:
            self.metrics.store_retries.labels(self.channel, what).inc()

        return await hold(what, step, on_retry=retried)

    async def _attempt(self, message: AbstractIncomingMessage, job: Job) -> None:
        # The token is chosen here, before the first try: a claim that reached the database
        # though its answer timed out is found again as ours by the next try.
        token = uuid.uuid4()
        job = replace(job, claim=token)
        claim = Claim(job.notification_id, job.attempt, token)
        claimed = await self._hold("claim", lambda: self.claiming.submit(claim))
        if claimed is None:
            await self._not_claimed(message, job)
            return
        claimed.pop("again", None)
        if claimed.pop("reclaimed", False):
            self.metrics.reclaimed.labels(self.channel).inc()
            log.warning("taking over an attempt a worker did not finish: it may be sent twice")
        job = replace(job, record=claimed)
        # This task acts for the notification's project: its user and template are that project's.
        project_var.set(claimed.get("client_id") or project_var.get())
        with self._lease(job):
            started = time.perf_counter()
            outcome = await self._deliver(job)
            self.metrics.delivery_latency.labels(self.channel).observe(time.perf_counter() - started)
            if isinstance(outcome, Delivered):
                await self._delivered(job, outcome)
            elif isinstance(outcome, Skip):
                await self._write(job, "skipped", error=outcome.reason)
                self.metrics.skipped.labels(self.channel).inc()
                log.info("skipped: %s", outcome.reason)
            else:
                await self._failed_attempt(message, job, outcome)

    async def _deliver(self, job: Job) -> Delivered | Skip | DeliveryError:
        try:
            return await self.delivery.deliver(job)
        except (DeliveryError, Skip) as exc:
            return exc
        except Exception as exc:
            if is_infrastructure(exc):
                return DeliveryError(
                    f"infrastructure: {type(exc).__name__}: {exc}",
                    transient=True,
                    defer=True,
                    provider_fault=False,
                )
            log.exception("unexpected error in the delivery step")
            return DeliveryError("internal error in worker", transient=False)

    @contextlib.contextmanager
    def _lease(self, job: Job) -> Iterator[None]:
        """While the delivery and its recording run, the claim is among those `keep_claims`
        extends, so a slow provider does not let another worker take it over and send again."""
        assert job.claim is not None
        self.claims[job.notification_id] = job.claim
        try:
            yield
        finally:
            self.claims.pop(job.notification_id, None)

    async def keep_claims(self, stopping: asyncio.Event) -> None:
        """Extend every claim in flight, in one statement every third of a lease."""
        lease = self.config.claim_timeout
        await background.rounds(
            stopping, lease / 3, lambda: self.store.extend(dict(self.claims), lease), "claim extension"
        )

    async def _write(self, job: Job, status: str, **fields: Any) -> bool:
        """Record this attempt's outcome, as a compare-and-set on its claim."""
        outcome = Outcome(job.notification_id, status, claim=job.claim, **fields)
        written = await self._hold(f"recording {status}", lambda: self.recording.submit(outcome))
        if not written:
            log.warning("%s not recorded: the claim was taken over by another worker meanwhile", status)
        return written

    async def _delivered(self, job: Job, delivered: Delivered) -> None:
        # Held until it goes through: giving the message back now would send it again.
        await self._write(
            job,
            "delivered",
            provider=delivered.provider,
            error=delivered.detail,
            template_version=delivered.template_version,
            language=delivered.language,
        )
        self.metrics.delivered.labels(self.channel, delivered.provider).inc()
        created = job.record.get("created_at")
        if created is not None:
            self.metrics.end_to_end_latency.labels(self.channel).observe(
                max(0.0, time.time() - created.timestamp())
            )
        log.info("delivered by %s on attempt %d", delivered.provider, job.attempt)

    async def _not_claimed(self, message: AbstractIncomingMessage, job: Job) -> None:
        existing = await self._hold("reading the status", lambda: self.store.get(job.notification_id))
        if existing is None:
            await self._poison(message, "unknown notification_id")
        elif existing["status"] == "sending":
            # Another consumer holds it (a redelivery raced the first copy): look again after a
            # retry delay; its lease runs out if that consumer died. If the broker will not
            # take it, this copy goes: the holder, or the reconciler, sees it through.
            self.metrics.deferred_in_progress.labels(self.channel).inc()
            await self._to_retry_queue(job, 1, job.attempt, "in progress elsewhere")
        elif existing["status"] == "cancelled":
            # Cancelled after it was published: the claim refused it, and that is the point.
            log.info("cancelled before it was sent: acknowledged without sending")
        else:
            self.metrics.duplicates.labels(self.channel).inc()
            log.info("already %s: acknowledged without sending again", existing["status"])

    async def _failed_attempt(self, message: AbstractIncomingMessage, job: Job, exc: DeliveryError) -> None:
        decision = decide(exc, job.attempt, self.config.retry_delays)
        if isinstance(decision, Retry):
            # Published before the status changes: a crash in between leaves a duplicate
            # message, which the claim step turns into a no-op, never a lost one.
            carried = replace(job, body={**job.body, **exc.carry})
            published = await self._to_retry_queue(carried, decision.queue, decision.next_attempt, exc.reason)
            detail = (
                None if published else f"{exc.reason} (not queued for retry: the reconciler sends it again)"
            )
            await self._write(job, "retrying", error=exc.reason, provider=exc.provider, detail=detail)
            self.metrics.retried.labels(self.channel).inc()
            log.warning(
                "attempt %d %s (%s); attempt %d follows in %gs",
                job.attempt,
                "deferred" if exc.defer else "failed",
                exc.reason,
                decision.next_attempt,
                decision.delay if published else decision.delay + self.config.reconcile_after,
            )
            return
        assert isinstance(decision, Fail)
        await self._write(job, "failed", error=decision.reason, provider=exc.provider)
        await self._dead_letter(message, decision.reason, job.notification_id, job.attempt)
        self.metrics.failed.labels(self.channel, "transient" if exc.transient else "permanent").inc()
        log.error("failed after %d attempt(s): %s", job.attempt, decision.reason)

    async def _to_retry_queue(self, job: Job, queue: int, next_attempt: int, reason: str) -> bool:
        """False when the broker did not take it (down, or the queue is gone)."""
        return await self.consumer.retry(
            {**job.body, "attempt": next_attempt},
            queue,
            message_id=str(job.notification_id),
            correlation_id=job.body.get("correlation_id"),
            priority=job.priority,
            headers={"x-last-error": reason[:500]},
        )

    async def _poison(self, message: AbstractIncomingMessage, reason: str) -> None:
        await self._dead_letter(message, reason, None, 0)
        self.metrics.failed.labels(self.channel, "poison").inc()
        log.error("poison message moved to failed.queue: %s", reason)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, notification_id: uuid.UUID | None, attempts: int
    ) -> None:
        await self.consumer.dead_letter(
            message,
            reason,
            channel=self.channel,
            attempts=attempts,
            notification_id=notification_id and str(notification_id),
        )


DeliveryFactory = Callable[[web.Application], Delivery]


def consumer(channel: str, delivery: DeliveryFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running the consumer; on shutdown it stops taking messages, lets the
    ones in flight finish, then returns (the connection closes after it)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        worker = Worker(
            channel, app[CONFIG_KEY], app[STORE_KEY], app[BROKER_KEY], app[METRICS_KEY], delivery(app)
        )
        worker.consumer.start()
        beating = asyncio.Event()
        heartbeat = asyncio.create_task(worker.keep_claims(beating), name=f"{channel}-claims")
        try:
            yield
        finally:
            # The iterator is cancelled (it holds no query); then the messages in flight finish.
            await worker.consumer.stop(SHUTDOWN_GRACE)
            await worker.claiming.close()
            await worker.recording.close()
            await background.stop(heartbeat, beating.set)

    return ctx


def worker_app(
    service: str,
    channel: str,
    config: Config,
    *,
    declare: amqp.Declare,
    providers: resources.CleanupCtx | None,
    delivery: DeliveryFactory,
) -> web.Application:
    """A worker: its resources, its providers (none for a channel that delivers into our own
    store), then the consumer (closed first on shutdown)."""
    app = base_app(service, config)
    app.cleanup_ctx.append(resources.database(lambda c: c.notifications_db_url, "postgres"))
    app.cleanup_ctx.append(resources.status_store)
    app.cleanup_ctx.append(retention.keep_up)
    app.cleanup_ctx.append(amqp.broker(declare, prefetch=config.worker_prefetch))
    app.cleanup_ctx.append(resources.http_client)
    app.cleanup_ctx.append(resources.redis_client())
    app.cleanup_ctx.append(resources.render_pool())
    if providers is not None:
        app.cleanup_ctx.append(providers)
    app.cleanup_ctx.append(consumer(channel, delivery))
    return app
