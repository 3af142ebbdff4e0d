"""The SQL of client status webhooks: endpoints (with their secrets and rotation) and deliveries
(queued by the status store in the statement that records a final status, `common/data/store.py`;
claimed, finished, relayed and redriven here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from common.data import db
from common.features.webhooks.signing import new_secret

SECRET_OVERLAP_HOURS = 24  # the old secret keeps signing alongside the new one after a rotation


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


_ENDPOINT_COLUMNS = (
    "id, url, events, description, failing_since, disabled_at, disabled_reason, created_at, updated_at, "
    "CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END"
    " AS previous_secret_expires_at"
)
_DELIVERY_COLUMNS = (
    "d.id, d.seq, d.endpoint_id, d.event_id, d.event_type, d.notification_id, d.payload, d.status, "
    "d.attempts, d.last_status_code, d.last_error, d.created_at, d.updated_at, d.delivered_at"
)


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
        self, client_id: str, url: str, events: list[str], description: str | None, limit: int
    ) -> db.Row | None:
        """The endpoint created, or None when the key has `limit` already. Under the key's lock,
        so that concurrent creations cannot pass the limit together."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", f"webhook-endpoints\x1f{client_id}"
            )
            if (
                await tx.fetchval("SELECT count(*) FROM webhook_endpoints WHERE client_id = %s", client_id)
                >= limit
            ):
                return None
            row = await tx.fetchrow(
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
            "SELECT id, endpoint_id, client_id, status, attempts FROM webhook_deliveries"
            " WHERE publish_pending"
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
            SELECT id, endpoint_id, client_id, status, attempts FROM webhook_deliveries
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
                RETURNING t.id, t.endpoint_id, t.client_id, t.event_id, t.event_type, t.payload, t.claim_token
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
