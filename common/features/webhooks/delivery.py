"""Client status webhooks, their delivery.

A notification reaching a final status queues one delivery per endpoint of its client (API key)
subscribed to the event, in the very statement that records the status (`common/data/store.py`),
so no event is lost whatever RabbitMQ does meanwhile. From there on, the same guarantees as a
notification:

- the relay publishes queued deliveries to webhooks.queue, and, as a reconciler, publishes again
  any delivery not final that has not moved for longer than it should have (its message was lost);
  both on `background.rounds`;
- the consumer (the one consumer loop, `common/broker/consumer.py`) hands each message to
  `WebhookDelivery.handle`, which claims the delivery (a lease with a token: a redelivered
  message is acknowledged without a second POST once the delivery is final), POSTs it signed per
  Standard Webhooks (`signing.py`), records the attempt, and finishes it or sends it to the retry
  queue for its attempt (webhooks.retry.N, on RETRY_DELAYS); exhausted, it is `failed` and a copy
  goes to webhooks.failed. Store steps that fail for infrastructure reasons are held and retried
  (`common.faults.hold`), never turned into a failed delivery;
- 2xx is success; 410 disables the endpoint; anything else (a redirect is not followed) is
  retried. An endpoint whose every attempt failed for WEBHOOK_DISABLE_AFTER is disabled.

Receivers are clients' URLs: every request goes through the SSRF guard
(`common/delivery/egress.py`), with a 10 s timeout and the response body read no further than a
few KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web

from common import background
from common.broker import amqp
from common.broker.consumer import Consumer, FailedRoute
from common.config import Config
from common.data import db
from common.delivery.egress import (
    NonPublicAddress,
    UnsafeEndpoint,
    allow_list,
    check_endpoint,
    guarded_session,
)
from common.delivery.interface import DeliveryError, Retry, decide, redrive_attempt
from common.faults import hold
from common.features.webhooks.signing import signed_headers, webhook_id
from common.features.webhooks.store import Answer, WebhookStore
from common.keys import BROKER_KEY, CONFIG_KEY, DB_KEY, METRICS_KEY, WEBHOOKS_KEY
from common.metrics import Metrics

log = logging.getLogger("webhooks")

SEND_TIMEOUT = 10.0
RESPONSE_CAP = 4096  # bytes of a receiver's answer read; the rest is not our business
LEASE = 3 * SEND_TIMEOUT
RELAY_INTERVAL = 0.5
RELAY_BATCH = 200
PUBLISH_TIMEOUT = 3.0
SHUTDOWN_GRACE = SEND_TIMEOUT + 5.0
# In flight at once in one process, per endpoint and per API key: a slow receiver holds at most
# this many of the consumer's prefetch slots, and the rest go on for everyone else's.
PER_ENDPOINT = 2
PER_CLIENT = 8


# --- sending ---------------------------------------------------------------------------------


class Sender:
    def __init__(self, session: aiohttp.ClientSession, allowed_hosts: frozenset[str]) -> None:
        self.session = session
        self.allowed_hosts = allowed_hosts

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        try:
            check_endpoint(url, self.allowed_hosts)
        except UnsafeEndpoint as exc:
            return Answer(None, 0, f"refused: {exc}", refused=True)
        started = time.perf_counter()
        try:
            async with self.session.post(
                url,
                data=body,
                headers={**headers, "Content-Type": "application/json", "User-Agent": "notify-webhooks/1"},
                allow_redirects=False,
            ) as response:
                status = response.status
                text = (await response.content.read(RESPONSE_CAP)).decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            latency = int((time.perf_counter() - started) * 1000)
            cause = getattr(exc, "os_error", exc)
            if isinstance(cause, NonPublicAddress):
                return Answer(None, latency, f"refused: {cause}", refused=True)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            return Answer(None, latency, f"no answer: {reason}"[:500])
        latency = int((time.perf_counter() - started) * 1000)
        if 200 <= status < 300:
            return Answer(status, latency)
        what = "redirect not followed" if 300 <= status < 400 else "answered"
        return Answer(status, latency, f"{what}: HTTP {status} {text[:300]}".strip())


# --- the relay and the consumer ----------------------------------------------------------------


def _message(delivery_id: uuid.UUID, attempt: int, endpoint_id: Any, client_id: Any) -> dict[str, Any]:
    return {
        "delivery_id": str(delivery_id),
        "attempt": attempt,
        "endpoint_id": str(endpoint_id),
        "client_id": client_id,
    }


class Fairness:
    """Deliveries in flight in this process by endpoint and by key. A delivery over either
    limit is not sent now: it goes round through the first retry queue, its attempt unspent."""

    def __init__(self, per_endpoint: int = PER_ENDPOINT, per_client: int = PER_CLIENT) -> None:
        self.per_endpoint = per_endpoint
        self.per_client = per_client
        self.endpoints: dict[str, int] = {}
        self.clients: dict[str, int] = {}

    def take(self, endpoint_id: str, client_id: str) -> bool:
        if (
            self.endpoints.get(endpoint_id, 0) >= self.per_endpoint
            or self.clients.get(client_id, 0) >= self.per_client
        ):
            return False
        self.endpoints[endpoint_id] = self.endpoints.get(endpoint_id, 0) + 1
        self.clients[client_id] = self.clients.get(client_id, 0) + 1
        return True

    def give(self, endpoint_id: str, client_id: str) -> None:
        for counts, key in ((self.endpoints, endpoint_id), (self.clients, client_id)):
            counts[key] -= 1
            if not counts[key]:
                del counts[key]


class WebhookDelivery:
    """The relay (publishing what the store queued) and the consumer of webhooks.queue."""

    def __init__(
        self,
        store: WebhookStore,
        broker: amqp.Broker,
        channel: AbstractChannel,
        sender: Sender,
        config: Config,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.broker = broker
        self.channel = channel
        self.sender = sender
        self.config = config
        self.metrics = metrics
        self.fairness = Fairness()
        # Dead letters go straight to webhooks.failed, through the consumer channel's default exchange.
        self.consumer = Consumer(
            broker,
            amqp.WEBHOOKS,
            self.handle,
            channel=channel,
            failed=FailedRoute(lambda: channel.default_exchange, amqp.WEBHOOKS_FAILED_QUEUE),
            publish_timeout=PUBLISH_TIMEOUT,
        )
        reconcile_every = min(max(config.reconcile_after / 4, 0.5), 30.0)
        self._reconcile_every = reconcile_every
        self._next_reconcile = time.monotonic() + reconcile_every

    # relay

    async def _publish(self, row: db.Row, attempt: int) -> None:
        await amqp.publish(
            self.broker.exchange,
            amqp.WEBHOOKS,
            _message(row["id"], attempt, row["endpoint_id"], row["client_id"]),
            message_id=str(row["id"]),
            timeout=PUBLISH_TIMEOUT,
        )

    async def relay_once(self) -> int:
        """Publish every delivery queued and not yet confirmed; returns how many went."""
        async with self.store.db.transaction() as tx:
            rows = await self.store.unpublished(tx, RELAY_BATCH)
            results = await asyncio.gather(
                *(self._publish(r, max(1, r["attempts"] + 1)) for r in rows), return_exceptions=True
            )
            sent = [r["id"] for r, result in zip(rows, results, strict=True) if result is None]
            await self.store.mark_published(tx, sent)
        if len(sent) < len(rows):
            log.warning(
                "relay published %d of %d webhook deliveries; the rest next round", len(sent), len(rows)
            )
        return len(sent)

    def _attempt_of(self, row: db.Row) -> int:
        return redrive_attempt(row["status"], row["attempts"], self.config.max_attempts)

    async def reconcile_once(self) -> int:
        config = self.config
        async with self.store.db.transaction() as tx:
            rows = await self.store.stalled(tx, config.reconcile_after, config.retry_delays, RELAY_BATCH)
            results = await asyncio.gather(
                *(self._publish(r, self._attempt_of(r)) for r in rows), return_exceptions=True
            )
            sent = [r["id"] for r, result in zip(rows, results, strict=True) if result is None]
            await self.store.redriven(tx, sent)
        if sent:
            log.warning(
                "reconciler: %d webhook deliveries had no message in flight; published again", len(sent)
            )
        return len(sent)

    async def relay_round(self) -> None:
        """One round of the relay, and every few rounds the reconciler's."""
        await self.relay_once()
        if time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + self._reconcile_every
            await self.reconcile_once()

    # consumer

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """The handler `self.consumer` runs for each message (which it settles); an unexpected
        error rejects it to webhooks.failed, and the delivery, left `sending`, is picked up
        again by the reconciler once its lease has run out."""
        await self._process(message)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            body = orjson.loads(message.body)
            delivery_id, attempt = uuid.UUID(str(body["delivery_id"])), int(body.get("attempt", 1))
            # Absent from messages published before the fields were: those go unlimited.
            endpoint_id, client_id = str(body.get("endpoint_id", "")), str(body.get("client_id", ""))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            await self._dead_letter(message, f"unparseable message: {type(exc).__name__}: {exc}")
            return
        if endpoint_id and not self.fairness.take(endpoint_id, client_id):
            await self._to_retry_queue(delivery_id, 1, attempt, endpoint_id, client_id)
            self.metrics.webhook_deliveries.labels("deferred").inc()
            return
        try:
            await self._attempt(message, delivery_id, attempt, endpoint_id, client_id)
        finally:
            if endpoint_id:
                self.fairness.give(endpoint_id, client_id)

    async def _attempt(
        self,
        message: AbstractIncomingMessage,
        delivery_id: uuid.UUID,
        attempt: int,
        endpoint_id: str,
        client_id: str,
    ) -> None:
        # Chosen before the first try: a claim whose answer timed out is found again as ours.
        token = uuid.uuid4()
        claimed = await hold(
            "claiming a webhook delivery", lambda: self.store.claim(delivery_id, attempt, LEASE, token)
        )
        if claimed is None:
            await self._not_claimed(delivery_id, attempt, endpoint_id, client_id)
            return
        if claimed["disabled_at"] is not None:
            # Queued before its endpoint was disabled: not sent, and not held against it again.
            await self._finish(claimed, attempt, "failed", Answer(None, 0, "endpoint disabled"), counts=False)
            await self._dead_letter(message, "endpoint disabled", delivery_id)
            return
        at = datetime.now(UTC).replace(microsecond=0)
        keys = [k for k in (claimed["secret"], claimed["previous_secret"]) if k]
        body_bytes = orjson.dumps(claimed["payload"])
        headers = signed_headers(webhook_id(claimed["event_id"]), body_bytes, keys, at)
        answer = await self.sender.post(claimed["url"], body_bytes, headers)
        if not answer.refused:
            self.metrics.webhook_latency.observe(answer.latency_ms / 1000)
        await self._settle(message, claimed, attempt, answer)

    async def _settle(
        self, message: AbstractIncomingMessage, claimed: db.Row, attempt: int, answer: Answer
    ) -> None:
        delivery_id = claimed["id"]
        if answer.ok:
            await self._finish(claimed, attempt, "delivered", answer)
            self.metrics.webhook_deliveries.labels("delivered").inc()
            log.info("webhook %s delivered on attempt %d (%s)", delivery_id, attempt, answer.status_code)
            return
        gone = answer.status_code == 410
        reason = answer.error or "failed"
        decision = (
            decide(DeliveryError(reason, transient=True), attempt, self.config.retry_delays)
            if not gone and not answer.refused
            else None
        )
        if isinstance(decision, Retry):
            # Published before the status changes, as for notifications: a crash in between
            # leaves a duplicate message (a no-op at the claim), never a lost delivery.
            published = await self._to_retry_queue(
                delivery_id,
                decision.queue,
                decision.next_attempt,
                claimed["endpoint_id"],
                claimed["client_id"],
            )
            await self._finish(claimed, attempt, "retrying", answer)
            self.metrics.webhook_deliveries.labels("retried").inc()
            log.warning(
                "webhook %s attempt %d failed (%s); attempt %d follows%s",
                delivery_id,
                attempt,
                reason,
                decision.next_attempt,
                "" if published else " when the reconciler publishes it again",
            )
            return
        final = reason if gone or answer.refused else f"retries exhausted: {reason}"
        await self._finish(
            claimed, attempt, "failed", Answer(answer.status_code, answer.latency_ms, final), gone=gone
        )
        await self._dead_letter(message, final, delivery_id)
        self.metrics.webhook_deliveries.labels("failed").inc()
        log.error("webhook %s failed after %d attempt(s): %s", delivery_id, attempt, final)

    async def _finish(
        self,
        claimed: db.Row,
        attempt: int,
        status: str,
        answer: Answer,
        *,
        gone: bool = False,
        counts: bool = True,
    ) -> None:
        done = await hold(
            f"recording webhook delivery {status}",
            lambda: self.store.finish(
                claimed["id"],
                claimed["claim_token"],
                attempt,
                status,
                answer,
                gone=gone,
                counts=counts,
                disable_after=self.config.webhook_disable_after,
            ),
        )
        if done is None:
            log.warning("webhook %s: %s not recorded, the claim was taken over", claimed["id"], status)
        elif done["disabled_now"]:
            self.metrics.webhooks_disabled.labels("gone" if gone else "failing").inc()
            log.warning("webhook endpoint %s disabled: %s", claimed["endpoint_id"], done["disabled_reason"])

    async def _not_claimed(
        self, delivery_id: uuid.UUID, attempt: int, endpoint_id: str, client_id: str
    ) -> None:
        status = await hold("reading a webhook delivery", lambda: self.store.status(delivery_id))
        if status is None:
            log.info("webhook delivery %s no longer exists (endpoint deleted): dropped", delivery_id)
        elif status == "sending":
            # Another consumer holds it: look again after a retry delay (its lease runs out if
            # that consumer died); if the broker will not take it, the reconciler will.
            await self._to_retry_queue(delivery_id, 1, attempt, endpoint_id, client_id)
        else:
            log.info(
                "webhook delivery %s already %s: acknowledged without sending again", delivery_id, status
            )

    async def _to_retry_queue(
        self, delivery_id: uuid.UUID, queue: int, next_attempt: int, endpoint_id: Any, client_id: Any
    ) -> bool:
        return await self.consumer.retry(
            _message(delivery_id, next_attempt, endpoint_id, client_id), queue, message_id=str(delivery_id)
        )

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, delivery_id: uuid.UUID | None = None
    ) -> None:
        await self.consumer.dead_letter(
            message, reason, delivery_id=str(delivery_id) if delivery_id else None
        )


async def webhooks(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: the webhook store (WEBHOOKS_KEY), the relay and the consumer, on a
    channel of their own whose prefetch bounds how many deliveries run at once. On shutdown the
    consumer stops taking messages and lets those in flight finish, then the relay stops."""
    config = app[CONFIG_KEY]
    broker = app[BROKER_KEY]
    store = WebhookStore(app[DB_KEY])
    app[WEBHOOKS_KEY] = store
    allowed = allow_list(config.webhook_allowed_hosts)
    session = guarded_session(allowed, SEND_TIMEOUT)
    channel = await amqp.open_channel(broker.connection, prefetch=config.worker_prefetch)
    delivery = WebhookDelivery(store, broker, channel, Sender(session, allowed), config, app[METRICS_KEY])
    relay_stop = asyncio.Event()
    relay = asyncio.create_task(
        background.rounds(
            relay_stop, RELAY_INTERVAL, delivery.relay_round, "webhook relay", lambda: broker.ready
        ),
        name="webhook-relay",
    )
    delivery.consumer.start()
    try:
        yield
    finally:
        await delivery.consumer.stop(SHUTDOWN_GRACE)
        await background.stop(relay, relay_stop.set)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 5)
        await session.close()
