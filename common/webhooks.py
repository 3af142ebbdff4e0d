"""Client status webhooks: endpoints, events, signing, and their delivery.

A notification reaching a final status queues one delivery per endpoint of its client (API key)
subscribed to the event, in the very statement that records the status (`common/store.py`), so
no event is lost whatever RabbitMQ does meanwhile. From there on, the same guarantees as a
notification:

- the relay publishes queued deliveries to webhooks.queue, and, as a reconciler, publishes again
  any delivery not final that has not moved for longer than it should have (its message was lost);
- the consumer claims a delivery (a lease with a token: a redelivered message is acknowledged
  without a second POST once the delivery is final), POSTs it signed per Standard Webhooks,
  records the attempt, and finishes it or sends it to the retry queue for its attempt
  (webhooks.retry.N, on RETRY_DELAYS); exhausted, it is `failed` and a copy goes to
  webhooks.failed. Store steps that fail for infrastructure reasons are held and retried
  (`common.faults.hold`), never turned into a failed delivery;
- 2xx is success; 410 disables the endpoint; anything else (a redirect is not followed) is
  retried. An endpoint whose every attempt failed for WEBHOOK_DISABLE_AFTER is disabled.

Receivers are clients' URLs: every request goes through the SSRF guard (`common/egress.py`),
with a 10 s timeout and the response body read no further than a few KiB.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from standardwebhooks import Webhook

from common import amqp, background, db
from common.config import Config
from common.delivery import DeliveryError, Retry, decide, redrive_attempt
from common.egress import NonPublicAddress, UnsafeEndpoint, allow_list, check_endpoint, guarded_session
from common.faults import hold, is_infrastructure
from common.http import CONFIG_KEY, METRICS_KEY
from common.metrics import Metrics

log = logging.getLogger("webhooks")

EVENT_TYPES = (
    "notification.delivered",
    "notification.failed",
    "notification.bounced",
    "notification.skipped",
    "notification.cancelled",
)
SEND_TIMEOUT = 10.0
RESPONSE_CAP = 4096  # bytes of a receiver's answer read; the rest is not our business
SECRET_OVERLAP_HOURS = 24  # the old secret keeps signing alongside the new one after a rotation
LEASE = 3 * SEND_TIMEOUT
RELAY_INTERVAL = 0.5
RELAY_BATCH = 200
PUBLISH_TIMEOUT = 3.0
SHUTDOWN_GRACE = SEND_TIMEOUT + 5.0

_ENDPOINT_COLUMNS = (
    "id, url, events, description, failing_since, disabled_at, disabled_reason, created_at, updated_at, "
    "CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END"
    " AS previous_secret_expires_at"
)
_DELIVERY_COLUMNS = (
    "d.id, d.seq, d.endpoint_id, d.event_id, d.event_type, d.notification_id, d.payload, d.status, "
    "d.attempts, d.last_status_code, d.last_error, d.created_at, d.updated_at, d.delivered_at"
)


# --- signing ---------------------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_id(event_id: uuid.UUID) -> str:
    return f"msg_{event_id.hex}"


def signed_headers(msg_id: str, body: bytes, keys: Sequence[str], at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers: one `v1,` signature per secret (two while a rotation's
    old secret still signs), over `id.timestamp.body`. Signed at sending time, so a retry
    hours later carries a timestamp the receiver's tolerance accepts."""
    text = body.decode()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(msg_id, at, text) for key in keys),
    }


# --- the store -------------------------------------------------------------------------------


def endpoint_view(row: db.Row) -> dict[str, Any]:
    view = dict(row)
    view["disabled"] = view["disabled_at"] is not None
    return view


class WebhookStore:
    """Endpoints and deliveries in notifications_db. Every query a client makes is scoped by
    its `client_id`: another key's endpoint is not found, never forbidden."""

    def __init__(self, database: db.Database) -> None:
        self.db = database

    # endpoints

    async def create_endpoint(
        self, client_id: str, url: str, events: list[str], description: str | None
    ) -> db.Row:
        row = await self.db.fetchrow(
            "INSERT INTO webhook_endpoints (id, client_id, url, events, description, secret)"
            f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_ENDPOINT_COLUMNS}, secret",
            uuid.uuid4(),
            client_id,
            url,
            events,
            description,
            new_secret(),
        )
        assert row is not None
        return row

    async def endpoints(self, client_id: str, page: int, limit: int) -> tuple[list[db.Row], int]:
        total = await self.db.fetchval(
            "SELECT count(*) FROM webhook_endpoints WHERE client_id = %s", client_id
        )
        rows = await self.db.fetch(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE client_id = %s"
            " ORDER BY created_at, id LIMIT %s OFFSET %s",
            client_id,
            limit,
            (page - 1) * limit,
        )
        return rows, int(total or 0)

    async def endpoint(self, client_id: str, endpoint_id: uuid.UUID) -> db.Row | None:
        return await self.db.fetchrow(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = %s AND client_id = %s",
            endpoint_id,
            client_id,
        )

    async def delete_endpoint(self, client_id: str, endpoint_id: uuid.UUID) -> bool:
        # Its deliveries go with it (ON DELETE CASCADE); messages still queued find nothing.
        count = await self.db.execute(
            "DELETE FROM webhook_endpoints WHERE id = %s AND client_id = %s", endpoint_id, client_id
        )
        return count > 0

    async def rotate_secret(self, client_id: str, endpoint_id: uuid.UUID) -> db.Row | None:
        return await self.db.fetchrow(
            f"""
            UPDATE webhook_endpoints SET
                previous_secret = secret,
                previous_secret_expires_at = now() + make_interval(hours => %s),
                secret = %s,
                updated_at = now()
            WHERE id = %s AND client_id = %s
            RETURNING {_ENDPOINT_COLUMNS}, secret
            """,
            SECRET_OVERLAP_HOURS,
            new_secret(),
            endpoint_id,
            client_id,
        )

    # deliveries, as the API shows them

    async def deliveries(
        self, client_id: str, endpoint_id: uuid.UUID, after: int | None, limit: int
    ) -> list[db.Row]:
        """Newest first, by keyset: `after` is the `seq` of the last row of the previous page."""
        rows = await self.db.fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries AS d"
            " WHERE d.endpoint_id = %s AND d.client_id = %s AND (%s::bigint IS NULL OR d.seq < %s::bigint)"
            " ORDER BY d.seq DESC LIMIT %s",
            endpoint_id,
            client_id,
            after,
            after,
            limit,
        )
        await self._with_history(rows)
        return rows

    async def _with_history(self, rows: list[db.Row]) -> None:
        if not rows:
            return
        attempts = await self.db.fetch(
            "SELECT delivery_id, attempt, status_code, latency_ms, error, created_at"
            " FROM webhook_attempts WHERE delivery_id = ANY(%s::uuid[]) ORDER BY id",
            [r["id"] for r in rows],
        )
        history: dict[uuid.UUID, list[db.Row]] = {r["id"]: [] for r in rows}
        for attempt in attempts:
            history[attempt.pop("delivery_id")].append(attempt)
        for row in rows:
            row["history"] = history[row["id"]]

    async def replay(self, client_id: str, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> db.Row | None:
        """A final delivery queued again, as a new series of attempts with the same webhook-id
        (the same event: a receiver that already has it may ignore it). None when there is no
        such delivery, or it is not final, or its endpoint is disabled."""
        rows = await self.db.fetch(
            f"""
            UPDATE webhook_deliveries AS d SET
                status = 'pending', attempts = 0, publish_pending = true, updated_at = now()
            FROM webhook_endpoints AS e
            WHERE d.id = %s AND d.endpoint_id = %s AND d.client_id = %s
              AND e.id = d.endpoint_id AND e.disabled_at IS NULL
              AND d.status IN ('delivered', 'failed')
            RETURNING {_DELIVERY_COLUMNS}
            """,
            delivery_id,
            endpoint_id,
            client_id,
        )
        await self._with_history(rows)
        return rows[0] if rows else None

    async def delivery(self, client_id: str, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> db.Row | None:
        rows = await self.db.fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries AS d"
            " WHERE d.id = %s AND d.endpoint_id = %s AND d.client_id = %s",
            delivery_id,
            endpoint_id,
            client_id,
        )
        await self._with_history(rows)
        return rows[0] if rows else None

    # the relay

    async def unpublished(self, tx: db.Executor, limit: int) -> list[db.Row]:
        return await tx.fetch(
            "SELECT id, status, attempts FROM webhook_deliveries WHERE publish_pending"
            " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED",
            limit,
        )

    async def mark_published(self, tx: db.Executor, ids: list[uuid.UUID]) -> None:
        if ids:
            await tx.execute(
                "UPDATE webhook_deliveries SET publish_pending = false WHERE id = ANY(%s::uuid[])", ids
            )

    async def stalled(
        self, tx: db.Executor, after: float, delays: tuple[float, ...], limit: int
    ) -> list[db.Row]:
        """Deliveries not final, published, that have not moved for longer than they should
        have (as `StatusStore.stalled` for notifications): their message was lost."""
        return await tx.fetch(
            """
            SELECT id, status, attempts FROM webhook_deliveries
            WHERE status IN ('pending', 'retrying', 'sending') AND NOT publish_pending
              AND updated_at < now() - make_interval(secs => %(after)s)
              AND CASE status
                  WHEN 'pending' THEN true
                  WHEN 'retrying' THEN updated_at < now() - make_interval(secs => %(after)s
                      + coalesce((%(delays)s::float8[])[attempts], %(longest)s))
                  ELSE coalesce(lease_until, updated_at) < now() - make_interval(secs => %(after)s)
              END
            ORDER BY updated_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
            """,
            {"after": after, "delays": list(delays), "longest": max(delays, default=0), "limit": limit},
        )

    async def redriven(self, tx: db.Executor, ids: list[uuid.UUID]) -> None:
        if ids:
            await tx.execute(
                "UPDATE webhook_deliveries SET updated_at = now(),"
                " lease_until = CASE WHEN status = 'sending' THEN now() ELSE lease_until END"
                " WHERE id = ANY(%s::uuid[])",
                ids,
            )

    # the consumer

    async def claim(
        self, delivery_id: uuid.UUID, attempt: int, lease: float, token: uuid.UUID
    ) -> db.Row | None:
        """Start an attempt under a lease held by the caller's `token` (as `StatusStore.claim`:
        claiming again with the same token, after a timeout whose first try did reach the
        database, finds the claim its own), with what sending needs: the payload, the endpoint's
        URL and the secrets that sign now. None when final, unknown, or held by another consumer
        right now."""
        return await self.db.fetchrow(
            """
            WITH old AS (
                SELECT id, status AS previous, claim_token AS previous_token
                FROM webhook_deliveries WHERE id = %(id)s FOR UPDATE
            ), d AS (
                UPDATE webhook_deliveries AS t
                SET status = 'sending', attempts = %(attempt)s, updated_at = now(),
                    claim_token = %(token)s,
                    lease_until = now() + make_interval(secs => %(lease)s)
                FROM old
                WHERE t.id = old.id AND (
                    old.previous IN ('pending', 'retrying')
                    OR (old.previous = 'sending' AND (
                        coalesce(t.lease_until, t.updated_at) < now() OR old.previous_token = %(token)s))
                )
                RETURNING t.id, t.endpoint_id, t.event_id, t.event_type, t.payload, t.claim_token
            )
            SELECT d.*, e.url, e.secret, e.disabled_at,
                   CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
                       AS previous_secret
            FROM d JOIN webhook_endpoints AS e ON e.id = d.endpoint_id
            """,
            {"id": delivery_id, "attempt": attempt, "lease": lease, "token": token},
        )

    async def status(self, delivery_id: uuid.UUID) -> str | None:
        value = await self.db.fetchval("SELECT status FROM webhook_deliveries WHERE id = %s", delivery_id)
        return str(value) if value is not None else None

    async def finish(
        self,
        delivery_id: uuid.UUID,
        claim: uuid.UUID,
        attempt: int,
        status: str,
        answer: Answer,
        *,
        gone: bool,
        counts: bool,
        disable_after: float,
    ) -> db.Row | None:
        """Record an attempt and its delivery's new status (a compare-and-set on the claim) and,
        when the attempt `counts` for the endpoint's health, its failing streak: cleared by a
        success; a 410, or failing for `disable_after` seconds, disables the endpoint. Returns
        `disabled_reason` when this attempt disabled it; None when the claim was lost. The token
        stays on the row: recording the same outcome again with it (a retry after a timeout whose
        first try did reach the database) is a success that writes nothing twice."""
        return await self.db.fetchrow(
            """
            WITH cur AS (
                SELECT status AS before, claim_token AS token FROM webhook_deliveries
                WHERE id = %(id)s FOR UPDATE
            ), d AS (
                UPDATE webhook_deliveries SET
                    status = %(status)s, last_status_code = %(code)s, last_error = %(error)s,
                    delivered_at = CASE WHEN %(status)s = 'delivered' THEN now() ELSE delivered_at END,
                    lease_until = NULL, updated_at = now()
                WHERE id = %(id)s AND claim_token = %(claim)s AND status = 'sending'
                RETURNING id, endpoint_id
            ), a AS (
                INSERT INTO webhook_attempts (delivery_id, attempt, status_code, latency_ms, error)
                SELECT id, %(attempt)s, %(code)s, %(latency)s, %(error)s FROM d
            ), e AS (
                UPDATE webhook_endpoints AS ep SET
                    failing_since = CASE WHEN %(ok)s THEN NULL ELSE coalesce(ep.failing_since, now()) END,
                    disabled_at = CASE WHEN ep.disabled_at IS NULL AND (%(gone)s OR (NOT %(ok)s
                            AND ep.failing_since <= now() - make_interval(secs => %(after)s)))
                        THEN now() ELSE ep.disabled_at END,
                    disabled_reason = CASE
                        WHEN ep.disabled_at IS NOT NULL THEN ep.disabled_reason
                        WHEN %(gone)s THEN 'the endpoint answered 410 Gone'
                        WHEN NOT %(ok)s AND ep.failing_since <= now() - make_interval(secs => %(after)s)
                        THEN 'every delivery failed since '
                             || to_char(ep.failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                             || ' (WEBHOOK_DISABLE_AFTER)'
                        END,
                    updated_at = now()
                FROM d WHERE ep.id = d.endpoint_id AND %(counts)s
                RETURNING ep.disabled_at = now() AS disabled_now, ep.disabled_reason
            )
            SELECT d.id, e.disabled_now, e.disabled_reason FROM d LEFT JOIN e ON true
            UNION ALL
            SELECT %(id)s, false, NULL FROM cur
            WHERE NOT EXISTS (SELECT 1 FROM d) AND token = %(claim)s AND before = %(status)s
            """,
            {
                "id": delivery_id,
                "claim": claim,
                "status": status,
                "attempt": attempt,
                "code": answer.status_code,
                "latency": answer.latency_ms,
                "error": answer.error,
                "ok": answer.ok,
                "gone": gone,
                "counts": counts,
                "after": disable_after,
            },
        )


# --- sending ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one POST came to: the receiver's status code (None when there was no answer)."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    refused: bool = False  # the SSRF guard would not let it go: retrying cannot help

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


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


def _message(delivery_id: uuid.UUID, attempt: int) -> dict[str, Any]:
    return {"delivery_id": str(delivery_id), "attempt": attempt}


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
        self.in_flight: set[asyncio.Task[None]] = set()

    # relay

    async def _publish(self, delivery_id: uuid.UUID, attempt: int) -> None:
        await amqp.publish(
            self.broker.exchange,
            amqp.WEBHOOKS,
            _message(delivery_id, attempt),
            message_id=str(delivery_id),
            timeout=PUBLISH_TIMEOUT,
        )

    async def relay_once(self) -> int:
        """Publish every delivery queued and not yet confirmed; returns how many went."""
        async with self.store.db.transaction() as tx:
            rows = await self.store.unpublished(tx, RELAY_BATCH)
            results = await asyncio.gather(
                *(self._publish(r["id"], max(1, r["attempts"] + 1)) for r in rows), return_exceptions=True
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
                *(self._publish(r["id"], self._attempt_of(r)) for r in rows), return_exceptions=True
            )
            sent = [r["id"] for r, result in zip(rows, results, strict=True) if result is None]
            await self.store.redriven(tx, sent)
        if sent:
            log.warning(
                "reconciler: %d webhook deliveries had no message in flight; published again", len(sent)
            )
        return len(sent)

    async def relay_loop(self, stopping: asyncio.Event) -> None:
        reconcile_every = min(max(self.config.reconcile_after / 4, 0.5), 30.0)
        next_reconcile = time.monotonic() + reconcile_every
        while not stopping.is_set():
            await background.sleep(stopping, RELAY_INTERVAL)
            if stopping.is_set() or not self.broker.ready:
                continue
            try:
                await self.relay_once()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + reconcile_every
                    await self.reconcile_once()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("webhook relay round failed: %s: %s", type(exc).__name__, exc)

    # consumer

    async def consume(self) -> None:
        # Declared again, identically, on this channel: a robust channel restores consumers
        # only of queues it declared itself, after a reconnect.
        name = amqp.work_queue(amqp.WEBHOOKS)
        queue = await self.channel.declare_queue(name, durable=True, arguments=dict(self.broker.queues[name]))
        async with queue.iterator() as messages:
            async for message in messages:
                task = asyncio.create_task(self.handle(message))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)

    async def drain(self, timeout: float) -> None:
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=timeout)
        for task in list(self.in_flight):
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            async with message.process(requeue=False, ignore_processed=True):
                try:
                    await self._process(message)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
                    raise
                except Exception:
                    # Rejected to webhooks.failed; the delivery, left `sending`, is picked up
                    # again by the reconciler once its lease has run out.
                    log.exception("unexpected error handling a webhook delivery")
                    raise
        except Exception:  # noqa: BLE001 - logged above; the message was settled by process()
            pass

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            body = orjson.loads(message.body)
            delivery_id, attempt = uuid.UUID(str(body["delivery_id"])), int(body.get("attempt", 1))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            await self._dead_letter(message, f"unparseable message: {type(exc).__name__}: {exc}")
            return
        # Chosen before the first try: a claim whose answer timed out is found again as ours.
        token = uuid.uuid4()
        claimed = await hold(
            "claiming a webhook delivery", lambda: self.store.claim(delivery_id, attempt, LEASE, token)
        )
        if claimed is None:
            await self._not_claimed(delivery_id, attempt)
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
            published = await self._to_retry_queue(delivery_id, decision.queue, decision.next_attempt)
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

    async def _not_claimed(self, delivery_id: uuid.UUID, attempt: int) -> None:
        status = await hold("reading a webhook delivery", lambda: self.store.status(delivery_id))
        if status is None:
            log.info("webhook delivery %s no longer exists (endpoint deleted): dropped", delivery_id)
        elif status == "sending":
            # Another consumer holds it: look again after a retry delay (its lease runs out if
            # that consumer died); if the broker will not take it, the reconciler will.
            await self._to_retry_queue(delivery_id, 1, attempt)
        else:
            log.info(
                "webhook delivery %s already %s: acknowledged without sending again", delivery_id, status
            )

    async def _to_retry_queue(self, delivery_id: uuid.UUID, queue: int, next_attempt: int) -> bool:
        try:
            await amqp.publish(
                self.channel.default_exchange,
                amqp.retry_queue(amqp.WEBHOOKS, queue),
                _message(delivery_id, next_attempt),
                message_id=str(delivery_id),
                timeout=PUBLISH_TIMEOUT,
            )
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            log.warning("could not queue the webhook retry: %s: %s", type(exc).__name__, exc)
            return False
        return True

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, delivery_id: uuid.UUID | None = None
    ) -> None:
        """A copy in webhooks.failed with the reason in its headers; if the broker will not take
        it, the message is rejected and the work queue dead-letters it there all the same."""
        headers: dict[str, Any] = {"x-failure-reason": reason[:1000], "x-failed-at": int(time.time())}
        if delivery_id is not None:
            headers["x-delivery-id"] = str(delivery_id)
        copy = aio_pika.Message(
            message.body,
            content_type="application/json",
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await amqp.publish_message(self.channel.default_exchange, copy, amqp.WEBHOOKS_FAILED_QUEUE)
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            await message.reject(requeue=False)


WEBHOOKS_KEY = web.AppKey("webhooks", WebhookStore)


def webhooks(
    db_key: web.AppKey[db.Database], broker_key: web.AppKey[amqp.Broker]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the webhook store (WEBHOOKS_KEY), the relay and the consumer, on a
    channel of their own whose prefetch bounds how many deliveries run at once. On shutdown the
    consumer stops taking messages and lets those in flight finish, then the relay stops."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        broker = app[broker_key]
        store = WebhookStore(app[db_key])
        app[WEBHOOKS_KEY] = store
        allowed = allow_list(config.webhook_allowed_hosts)
        session = guarded_session(allowed, SEND_TIMEOUT)
        channel = await amqp.open_channel(broker.connection, prefetch=config.worker_prefetch)
        sender = Sender(session, allowed)
        delivery = WebhookDelivery(store, broker, channel, sender, config, app[METRICS_KEY])
        relay_stop = asyncio.Event()
        relay = asyncio.create_task(delivery.relay_loop(relay_stop), name="webhook-relay")
        consumer = asyncio.create_task(delivery.consume(), name="webhook-consumer")
        try:
            yield
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await delivery.drain(SHUTDOWN_GRACE)
            await background.stop(relay, relay_stop.set)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)
            await session.close()

    return ctx
