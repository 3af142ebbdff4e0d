"""The shared status store (notifications_db): every notification's state and its history.

The gateway writes a notification before publishing it (or, to be sent later, as `scheduled`
until the dispatcher releases it to `pending`); workers move it through
sending → retrying → delivered | failed; a client may cancel one no worker has claimed yet.
Each change also appends a history event, in the same statement, so the record and its history
cannot disagree; a change to a final status also queues the client's webhook deliveries
(`webhook_deliveries`, the outbox `common/webhooks.py` relays), in that statement too, so an event
is never lost between the two.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

import orjson

from common.db import Database, Executor, InputError, Row, Statement

FINAL_STATUSES = ("delivered", "failed", "skipped", "cancelled")
STATUSES = ("scheduled", "pending", "sending", "retrying", "delivered", "failed", "skipped", "cancelled")

# Final statuses the client hears about by webhook, as `notification.<status>`.
WEBHOOK_STATUSES = ("delivered", "failed", "skipped", "cancelled")
_WEBHOOK_STATUS_LIST = ", ".join(f"'{s}'" for s in WEBHOOK_STATUSES)


def _webhook_deliveries(source: str) -> str:
    """CTEs (`ev`, `wd`) queueing one webhook delivery per endpoint of the notification's client
    subscribed to its event, for each row of the CTE `source` whose `event_type` is not NULL.
    One event id per event, shared by its endpoints: the `webhook-id` a receiver dedupes on."""
    return f"""
    ev AS MATERIALIZED (
        SELECT src.*, gen_random_uuid() AS event_id FROM {source} AS src
        WHERE src.event_type IS NOT NULL
    ), wd AS (
        INSERT INTO webhook_deliveries
            (id, endpoint_id, client_id, event_id, event_type, notification_id, payload)
        SELECT gen_random_uuid(), ep.id, ep.client_id, ev.event_id, ev.event_type, ev.id,
            jsonb_build_object(
                'type', ev.event_type,
                'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'data', jsonb_build_object(
                    'notification_id', ev.id, 'request_id', ev.request_id, 'user_id', ev.user_id,
                    'notification_type', ev.notification_type, 'status', ev.status,
                    'error', ev.error, 'provider', ev.provider, 'attempts', ev.attempts))
        FROM ev JOIN webhook_endpoints AS ep
          ON ep.client_id = ev.client_id AND ep.disabled_at IS NULL
             AND ev.event_type = ANY(ep.events)
    )"""


_PUBLIC_COLUMNS = (
    "id, request_id, user_id, notification_type, template_code, template_version, language, "
    "variables, metadata, priority, status, attempts, error, provider, correlation_id, "
    "publish_pending, created_at, updated_at, delivered_at, send_at, batch_id"
)


_NEW_COLUMNS = (
    "id, client_id, request_id, body_hash, user_id, notification_type, template_code, language, "
    "template_version, variables, metadata, priority, status, error, correlation_id, publish_pending, "
    "send_at, batch_id"
)
# Idempotency: the key goes in first, in the same statement; only a new key gets a notification.
# Keys live in notification_keys, not in the (partitioned) notifications table, whose unique
# constraints would have to include the partition key: migrations/notifications_db/006.
_NEW_KEYS = """
        INSERT INTO notification_keys (client_id, request_id, notification_id, created_at)
        SELECT client_id, request_id, id, now() FROM {source}
        ON CONFLICT (client_id, request_id) DO NOTHING
        RETURNING notification_id, created_at"""
_CREATE_MANY = f"""
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
            id uuid, client_id text, request_id text, body_hash text, user_id uuid,
            notification_type text, template_code text, language text, template_version integer,
            variables jsonb, metadata jsonb, priority smallint, status text, error text,
            correlation_id text, publish_pending boolean, send_at timestamptz, detail text,
            batch_id uuid)
    ), k AS ({_NEW_KEYS.format(source="r")}
    ), n AS (
        INSERT INTO notifications ({_NEW_COLUMNS}, created_at)
        SELECT {_NEW_COLUMNS}, k.created_at FROM r JOIN k ON k.notification_id = r.id
        RETURNING {_PUBLIC_COLUMNS}, client_id,
            CASE WHEN status IN ({_WEBHOOK_STATUS_LIST}) THEN 'notification.' || status END AS event_type
    ), e AS (
        INSERT INTO notification_events (notification_id, status, detail)
        SELECT n.id, n.status, coalesce(r.detail, n.error) FROM n JOIN r ON r.id = n.id
    ), {_webhook_deliveries("n")}
    SELECT {_PUBLIC_COLUMNS} FROM n
"""
CREATE_MANY = Statement("notify_create_many", _CREATE_MANY, [("rows", "jsonb")])


@dataclass(frozen=True)
class NewNotification:
    id: uuid.UUID
    client_id: str
    request_id: str
    body_hash: str
    user_id: uuid.UUID
    notification_type: str
    template_code: str
    language: str | None
    template_version: int | None
    priority: int
    correlation_id: str
    status: str = "pending"
    error: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    send_at: datetime | None = None
    # The first history entry's detail when it is not the error (why it is scheduled).
    detail: str | None = None
    # The bulk request or topic fan-out it belongs to (`common/batches.py`).
    batch_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Claim:
    notification_id: uuid.UUID
    attempt: int
    token: uuid.UUID


@dataclass(frozen=True)
class Outcome:
    """One write of `StatusStore.record`: the new status and what goes with it."""

    notification_id: uuid.UUID
    status: str
    attempt: int | None = None
    error: str | None = None
    provider: str | None = None
    device: str | None = None
    template_version: int | None = None
    language: str | None = None
    claim: uuid.UUID | None = None
    detail: str | None = None
    webhook_event: str | None = None


@dataclass(frozen=True)
class Event:
    """A history entry of `StatusStore.events`."""

    notification_id: uuid.UUID
    status: str
    attempt: int
    provider: str | None = None
    device: str | None = None
    detail: str | None = None


K = TypeVar("K")
V = TypeVar("V")


def _distinct(items: list[V], key: Callable[[V], K]) -> Iterator[list[V]]:
    """The items in parts in which no key comes twice, first comers first: one statement can
    change a row only once."""
    while items:
        seen: set[K] = set()
        part: list[V] = []
        rest: list[V] = []
        for item in items:
            k = key(item)
            (rest if k in seen else part).append(item)
            seen.add(k)
        yield part
        items = rest


# Rows are locked in id order: two batches naming the same notifications cannot deadlock. The
# `id = ANY(ids)` beside each join on the input rows is there for the planner: it cannot tell how
# many rows a jsonb_to_recordset or an unnest holds (it guesses 10 or 100), and on a table whose
# statistics are stale (or a fresh one) it would rather hash-join a scan of every partition than
# look each id up; with the ids as an array it looks them up in the primary key, whatever the
# statistics say, which a plan prepared once must do.
_CLAIM_MANY = f"""
    WITH c AS (
        SELECT * FROM unnest(%(ids)s::uuid[], %(attempts)s::integer[], %(tokens)s::uuid[])
            AS c(id, attempt, token)
    ), old AS (
        SELECT t.id, t.status AS previous, t.claim_token AS previous_token, c.attempt, c.token
        FROM notifications AS t JOIN c ON c.id = t.id
        WHERE t.id = ANY(%(ids)s::uuid[])
        ORDER BY t.id FOR UPDATE OF t
    ), n AS (
        UPDATE notifications AS t
        SET status = 'sending', attempts = old.attempt, updated_at = now(),
            claim_token = old.token,
            lease_until = now() + make_interval(secs => %(lease)s)
        FROM old
        WHERE t.id = old.id AND t.id = ANY(%(ids)s::uuid[]) AND (
            old.previous IN ('pending', 'retrying')
            OR (old.previous = 'sending' AND coalesce(t.lease_until, t.updated_at) < now())
            OR (old.previous = 'sending' AND old.previous_token = old.token)
        )
        RETURNING {", ".join("t." + c.strip() for c in _PUBLIC_COLUMNS.split(","))}, t.claim_token,
            old.previous = 'sending' AND old.previous_token IS DISTINCT FROM old.token AS reclaimed,
            old.previous = 'sending' AND old.previous_token = old.token AS again
    ), e AS (
        INSERT INTO notification_events (notification_id, status, attempt, detail)
        SELECT id, 'sending', attempts,
               CASE WHEN reclaimed THEN 'taken over from a worker that did not finish' END
        FROM n WHERE NOT again
    )
    SELECT * FROM n
"""
CLAIM_MANY = Statement(
    "notify_claim_many",
    _CLAIM_MANY,
    [("ids", "uuid[]"), ("attempts", "integer[]"), ("tokens", "uuid[]"), ("lease", "float8")],
)

_RECORD_MANY = f"""
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
            i integer, notification_id uuid, status text, attempt integer, error text,
            provider text, device text, template_version integer, language text, claim uuid,
            detail text, webhook_event text)
    ), cur AS (
        SELECT t.id, t.status AS before, t.claim_token AS token
        FROM notifications AS t JOIN r ON r.notification_id = t.id
        WHERE t.id = ANY(%(ids)s::uuid[])
        ORDER BY t.id FOR UPDATE OF t
    ), n AS (
        UPDATE notifications AS t SET
            status = r.status,
            attempts = coalesce(r.attempt, t.attempts),
            error = CASE WHEN r.status = 'delivered' THEN NULL ELSE coalesce(r.error, t.error) END,
            provider = coalesce(r.provider, t.provider),
            template_version = coalesce(r.template_version, t.template_version),
            language = coalesce(r.language, t.language),
            delivered_at = CASE WHEN r.status = 'delivered' THEN now() ELSE t.delivered_at END,
            lease_until = NULL,
            updated_at = now()
        FROM cur JOIN r ON r.notification_id = cur.id
        WHERE t.id = cur.id AND t.id = ANY(%(ids)s::uuid[])
          AND (r.claim IS NULL OR (t.claim_token = r.claim AND t.status = 'sending'))
        RETURNING t.id, t.attempts, t.client_id, t.request_id, t.user_id, t.notification_type,
            t.status, t.error, t.provider, r.provider AS event_provider, r.device,
            coalesce(r.detail, r.error) AS event_detail,
            CASE WHEN t.status IN ({_WEBHOOK_STATUS_LIST})
                  AND (cur.before <> t.status OR r.webhook_event IS NOT NULL)
                 THEN coalesce(r.webhook_event, 'notification.' || t.status) END
                AS event_type
    ), e AS (
        INSERT INTO notification_events (notification_id, status, attempt, provider, device, detail)
        SELECT id, status, attempts, event_provider, device, event_detail FROM n
    ), {_webhook_deliveries("n")}
    SELECT r.i, EXISTS (SELECT 1 FROM n WHERE n.id = r.notification_id)
        OR EXISTS (SELECT 1 FROM cur WHERE cur.id = r.notification_id
                   AND cur.token = r.claim AND cur.before = r.status) AS done
    FROM r
"""
RECORD_MANY = Statement("notify_record_many", _RECORD_MANY, [("rows", "jsonb"), ("ids", "uuid[]")])

# Every statement that changes many notifications locks them in id order first, as the claim
# and the record do: a publish mark of 500 and a worker's batch of claims meeting on the same
# rows in two orders would deadlock, and the loser's rows be published again by the relay.
MARK_PUBLISHED = Statement(
    "notify_mark_published",
    """
    WITH locked AS (
        SELECT id FROM notifications WHERE id = ANY(%(ids)s::uuid[]) AND publish_pending
        ORDER BY id FOR UPDATE
    )
    UPDATE notifications AS n SET publish_pending = false FROM locked
    WHERE n.id = locked.id AND n.id = ANY(%(ids)s::uuid[])
    """,
    [("ids", "uuid[]")],
)
EXTEND = Statement(
    "notify_extend",
    """
    WITH locked AS (
        SELECT n.id FROM notifications AS n
        JOIN unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) AS c(id, token) ON n.id = c.id
        WHERE n.id = ANY(%(ids)s::uuid[]) AND n.claim_token = c.token AND n.status = 'sending'
        ORDER BY n.id FOR UPDATE OF n
    )
    UPDATE notifications AS n SET lease_until = now() + make_interval(secs => %(lease)s)
    FROM locked WHERE n.id = locked.id AND n.id = ANY(%(ids)s::uuid[])
    """,
    [("lease", "float8"), ("ids", "uuid[]"), ("tokens", "uuid[]")],
)
EVENTS = Statement(
    "notify_events",
    "INSERT INTO notification_events (notification_id, status, attempt, provider, device, detail)"
    " SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS e(notification_id uuid, status text,"
    " attempt integer, provider text, device text, detail text)",
    [("rows", "jsonb")],
)


class StatusStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, n: NewNotification) -> Row | None:
        """Insert, unless (client_id, request_id) exists: then None, and nothing is written."""
        # Built field by field: dataclasses.asdict deep-copies the variables, on the hot path.
        values = {f.name: getattr(n, f.name) for f in fields(n)}
        values["publish_pending"] = n.status == "pending"
        return await self.db.fetchrow(
            f"""
            WITH v AS (
                SELECT %(id)s::uuid AS id, %(client_id)s::text AS client_id,
                    %(request_id)s::text AS request_id
            ), k AS ({_NEW_KEYS.format(source="v")}
            ), n AS (
                INSERT INTO notifications (id, client_id, request_id, body_hash, user_id,
                    notification_type, template_code, language, template_version, variables,
                    metadata, priority, status, error, correlation_id, publish_pending, send_at,
                    batch_id, created_at)
                SELECT %(id)s, %(client_id)s, %(request_id)s, %(body_hash)s, %(user_id)s,
                    %(notification_type)s, %(template_code)s, %(language)s, %(template_version)s,
                    %(variables)s,
                    %(metadata)s, %(priority)s, %(status)s, %(error)s, %(correlation_id)s,
                    %(publish_pending)s, %(send_at)s, %(batch_id)s, k.created_at
                FROM k
                RETURNING {_PUBLIC_COLUMNS}, client_id,
                    CASE WHEN status IN ({_WEBHOOK_STATUS_LIST}) THEN 'notification.' || status END
                        AS event_type
            ), e AS (
                INSERT INTO notification_events (notification_id, status, detail)
                SELECT id, status, coalesce(%(detail)s, error) FROM n
            ), {_webhook_deliveries("n")}
            SELECT {_PUBLIC_COLUMNS} FROM n
            """,
            values,
        )

    async def create_many(self, batch: list[NewNotification]) -> list[Row | BaseException | None]:
        """`create` for many at once, in one statement (group commit): for each, its row, or None
        when its (client_id, request_id) already existed (or came twice in this batch: the first
        wins). If the statement fails on one row's data, each is tried alone, so only the bad one
        fails."""
        # Ordered by key: two batches locking the same keys lock them in one order, no deadlock.
        ordered = sorted(batch, key=lambda n: (n.client_id, n.request_id))
        rows = [
            {**{f.name: getattr(n, f.name) for f in fields(n)}, "publish_pending": n.status == "pending"}
            for n in ordered
        ]
        try:
            found = await self.db.fetch_statement(CREATE_MANY, {"rows": orjson.dumps(rows).decode()})
        except InputError:
            alone: list[Row | BaseException | None] = []
            for n in batch:
                try:
                    alone.append(await self.create(n))
                except InputError as exc:
                    alone.append(exc)
            return alone
        by_id = {row["id"]: row for row in found}
        return [by_id.get(n.id) for n in batch]

    async def by_request(self, client_id: str, request_id: str) -> Row | None:
        # By the key's (id, created_at): one partition is read, found at run time.
        return await self.db.fetchrow(
            f"SELECT {_PUBLIC_COLUMNS}, body_hash FROM notifications"
            " WHERE (id, created_at) = (SELECT notification_id, created_at FROM notification_keys"
            " WHERE client_id = %s AND request_id = %s)",
            client_id,
            request_id,
        )

    async def get(self, notification_id: uuid.UUID) -> Row | None:
        return await self.db.fetchrow(
            f"SELECT {_PUBLIC_COLUMNS} FROM notifications WHERE id = %s", notification_id
        )

    async def history(self, notification_id: uuid.UUID) -> list[Row]:
        return await self.db.fetch(
            "SELECT status, attempt, provider, device, detail, created_at"
            " FROM notification_events WHERE notification_id = %s ORDER BY id",
            notification_id,
        )

    async def list_page(
        self,
        *,
        user_id: uuid.UUID | None,
        status: str | None,
        limit: int,
        page: int = 1,
        after: tuple[datetime, uuid.UUID] | None = None,
        batch_id: uuid.UUID | None = None,
    ) -> tuple[list[Row], bool]:
        """A page, newest first, and whether more follow. No count(*): on a table of millions
        it costs a scan per request; one extra row says whether there is a next page. `after`
        (the created_at and id of the last row seen) pages by keyset, at any depth, for the
        cost of one page; `page` by OFFSET, which callers cap."""
        where: list[str] = []
        args: list[Any] = []
        if user_id is not None:
            where.append("user_id = %s")
            args.append(user_id)
        if status is not None:
            where.append("status = %s")
            args.append(status)
        if batch_id is not None:
            where.append("batch_id = %s")
            args.append(batch_id)
        if after is not None:
            where.append("(created_at, id) < (%s, %s)")
            args.extend(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self.db.fetch(
            f"SELECT {_PUBLIC_COLUMNS} FROM notifications {clause}"
            " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
            *args,
            limit + 1,
            0 if after is not None else (page - 1) * limit,
        )
        return rows[:limit], len(rows) > limit

    async def mark_published(self, notification_ids: list[uuid.UUID], db: Executor | None = None) -> None:
        if notification_ids:
            await (db or self.db).execute_statement(MARK_PUBLISHED, {"ids": notification_ids})

    async def claim(
        self, notification_id: uuid.UUID, attempt: int, lease: float, token: uuid.UUID
    ) -> Row | None:
        """Start an attempt: the notification moves to `sending` under a lease held by the
        caller's `token`, which every later write of this attempt must present. Claiming again
        with the same token returns the claim (a retry after a timeout whose first try did
        reach the database must not find its own claim taken).

        None when it is final, unknown, or `sending` under a live lease (another consumer is on
        it right now). A `sending` whose lease ran out was claimed by a worker that died between
        sending and recording: it is taken over (`reclaimed` is true) and may be a duplicate.
        """
        return (await self.claim_many([Claim(notification_id, attempt, token)], lease))[0]

    async def claim_many(self, claims: list[Claim], lease: float) -> list[Row | None]:
        """`claim` for many at once: one statement for a batch (a worker's messages in flight),
        each claim judged on its own. A notification named twice is claimed in two statements,
        so the second copy meets the first's claim as any other consumer would."""
        found: dict[tuple[uuid.UUID, uuid.UUID], Row] = {}
        for part in _distinct(claims, lambda c: c.notification_id):
            rows = await self.db.fetch_statement(
                CLAIM_MANY,
                {
                    "ids": [c.notification_id for c in part],
                    "attempts": [c.attempt for c in part],
                    "tokens": [c.token for c in part],
                    "lease": lease,
                },
            )
            for row in rows:
                found[(row["id"], row.pop("claim_token"))] = row
        return [found.get((c.notification_id, c.token)) for c in claims]

    async def extend(self, claims: dict[uuid.UUID, uuid.UUID], lease: float) -> int:
        """Keep claims alive while their deliveries run, in one statement (notification id ->
        claim token); a claim no longer ours is left alone. Returns how many were extended."""
        if not claims:
            return 0
        return await self.db.execute_statement(
            EXTEND, {"lease": lease, "ids": list(claims), "tokens": list(claims.values())}
        )

    async def record(
        self,
        notification_id: uuid.UUID,
        status: str,
        *,
        attempt: int | None = None,
        error: str | None = None,
        provider: str | None = None,
        device: str | None = None,
        template_version: int | None = None,
        language: str | None = None,
        claim: uuid.UUID | None = None,
        detail: str | None = None,
        webhook_event: str | None = None,
    ) -> bool:
        """Move to `status`, keeping the reason and provider; appends the history event.

        With `claim`, a compare-and-set: written only while that claim is still the
        notification's (a worker whose lease was taken over changes nothing). The token stays
        on the row after the write, so writing the same outcome again with the same claim (a
        retry after a timeout whose first try did reach the database) is a success that changes
        nothing. False when nothing was written.

        Moving into a final status queues the client's webhook event `notification.<status>`
        (or `webhook_event`, e.g. `notification.bounced`, which is queued even without a change
        of status), in this statement: a success that changed nothing queues nothing."""
        outcome = Outcome(
            notification_id,
            status,
            attempt=attempt,
            error=error,
            provider=provider,
            device=device,
            template_version=template_version,
            language=language,
            claim=claim,
            detail=detail,
            webhook_event=webhook_event,
        )
        return (await self.record_many([outcome]))[0]

    async def record_many(self, outcomes: list[Outcome]) -> list[bool]:
        """`record` for many at once: one statement for a batch, each outcome its own
        compare-and-set. A notification named twice is written in two statements, in order."""
        done: dict[int, bool] = {}
        for part in _distinct(list(enumerate(outcomes)), lambda item: item[1].notification_id):
            rows = [{f.name: getattr(o, f.name) for f in fields(o)} | {"i": i} for i, o in part]
            values = {"rows": orjson.dumps(rows).decode(), "ids": [o.notification_id for _, o in part]}
            for row in await self.db.fetch_statement(RECORD_MANY, values):
                done[row["i"]] = bool(row["done"])
        return [done.get(i, False) for i in range(len(outcomes))]

    async def events(self, events: list[Event]) -> None:
        """History entries that do not change a notification's state (each device's result), in
        one statement however many."""
        if events:
            rows = [{f.name: getattr(e, f.name) for f in fields(e)} for e in events]
            await self.db.execute_statement(EVENTS, {"rows": orjson.dumps(rows).decode()})

    async def device_outcomes(self, notification_id: uuid.UUID) -> dict[str, str]:
        """Each device's latest result for this notification (push fan-out history)."""
        rows = await self.db.fetch(
            "SELECT DISTINCT ON (device) device, status FROM notification_events"
            " WHERE notification_id = %s AND device IS NOT NULL ORDER BY device, id DESC",
            notification_id,
        )
        return {r["device"]: r["status"] for r in rows}

    async def requeue_failed(self, notification_id: uuid.UUID) -> Row | None:
        """A failed notification back to pending, for a manual retry; None if not failed."""
        return await self.db.fetchrow(
            f"""
            WITH n AS (
                UPDATE notifications
                SET status = 'pending', publish_pending = true, updated_at = now()
                WHERE id = %s AND status = 'failed'
                RETURNING {_PUBLIC_COLUMNS}
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'pending', attempts, 'manual retry' FROM n
            )
            SELECT * FROM n
            """,
            notification_id,
        )

    async def unpublished(
        self, db: Executor, older_than: float, limit: int, exclude: list[uuid.UUID] | None = None
    ) -> list[Row]:
        """Rows accepted but not confirmed by the broker, oldest first; locked for this relay.
        `exclude`: rows the caller's own outbox is publishing (a long queue on a busy machine)."""
        return await db.fetch(
            f"SELECT {_PUBLIC_COLUMNS} FROM notifications"
            " WHERE publish_pending AND updated_at < now() - make_interval(secs => %s)"
            " AND NOT (id = ANY(%s::uuid[]))"
            " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED",
            older_than,
            exclude or [],
            limit,
        )

    async def stalled(self, db: Executor, after: float, delays: tuple[float, ...], limit: int) -> list[Row]:
        """Notifications not final that have not moved for longer than they should have, beyond
        the margin `after`: `pending` though published, `retrying` past its retry delay,
        `sending` past its lease. Oldest first; locked for this reconciler (SKIP LOCKED)."""
        return await db.fetch(
            f"""
            SELECT {_PUBLIC_COLUMNS} FROM notifications
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

    async def redriven(self, db: Executor, rows: list[Row]) -> None:
        """Note in each history that the reconciler published it again, and restart its clock
        (a lease that ran out stays run out, so the next claim takes it over)."""
        if not rows:
            return
        await db.execute(
            """
            WITH n AS (
                UPDATE notifications SET updated_at = now(),
                    lease_until = CASE WHEN status = 'sending' THEN now() ELSE lease_until END
                WHERE id = ANY(%(ids)s::uuid[])
                RETURNING id, status, attempts
            )
            INSERT INTO notification_events (notification_id, status, attempt, detail)
            SELECT id, status, attempts, 'republished by the reconciler: its message was lost' FROM n
            """,
            {"ids": [r["id"] for r in rows]},
        )

    # --- send later: the dispatcher, the reconciler and cancel ---------------------------------

    async def due(self, db: Executor, limit: int, late_by: float = 0.0) -> list[Row]:
        """Scheduled notifications due (by `late_by` seconds or more), soonest first; locked for
        this dispatcher (SKIP LOCKED: several run at once, each row goes to one of them)."""
        return await db.fetch(
            f"SELECT {_PUBLIC_COLUMNS} FROM notifications"
            " WHERE status = 'scheduled' AND send_at <= now() - make_interval(secs => %s)"
            " ORDER BY send_at LIMIT %s FOR UPDATE SKIP LOCKED",
            late_by,
            limit,
        )

    async def release(self, db: Executor, ids: list[uuid.UUID], detail: str | None = None) -> list[Row]:
        """Scheduled → pending, left to publish (the relay publishes it if this process does not)."""
        if not ids:
            return []
        return await db.fetch(
            f"""
            WITH n AS (
                UPDATE notifications SET status = 'pending', publish_pending = true, updated_at = now()
                WHERE id = ANY(%(ids)s::uuid[]) AND status = 'scheduled'
                RETURNING {_PUBLIC_COLUMNS}
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'pending', attempts, %(detail)s FROM n
            )
            SELECT * FROM n
            """,
            {"ids": ids, "detail": detail},
        )

    async def hold(self, db: Executor, held: list[tuple[uuid.UUID, datetime, str | None]]) -> None:
        """Scheduled ones found due that must wait again (quiet hours changed): a new send_at."""
        if not held:
            return
        await db.execute(
            """
            WITH v AS (
                SELECT * FROM unnest(%(ids)s::uuid[], %(times)s::timestamptz[], %(details)s::text[])
                    AS v(id, send_at, detail)
            ), n AS (
                UPDATE notifications AS t SET send_at = v.send_at, updated_at = now()
                FROM v WHERE t.id = v.id AND t.status = 'scheduled'
                RETURNING t.id, t.attempts, v.detail
            )
            INSERT INTO notification_events (notification_id, status, attempt, detail)
            SELECT id, 'scheduled', attempts, detail FROM n
            """,
            {"ids": [h[0] for h in held], "times": [h[1] for h in held], "details": [h[2] for h in held]},
        )

    async def skip_scheduled(self, db: Executor, skipped: list[tuple[uuid.UUID, str]]) -> None:
        """Scheduled ones whose user opted out while they waited: skipped, with the reason (and
        the client's `notification.skipped` webhook queued in the same statement)."""
        if not skipped:
            return
        await db.execute(
            f"""
            WITH v AS (
                SELECT * FROM unnest(%(ids)s::uuid[], %(reasons)s::text[]) AS v(id, reason)
            ), n AS (
                UPDATE notifications AS t SET status = 'skipped', error = v.reason, updated_at = now()
                FROM v WHERE t.id = v.id AND t.status = 'scheduled'
                RETURNING t.id, t.attempts, t.client_id, t.request_id, t.user_id, t.notification_type,
                    t.status, t.error, t.provider, 'notification.skipped' AS event_type
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'skipped', attempts, error FROM n
            ), {_webhook_deliveries("n")}
            SELECT count(*) FROM n
            """,
            {"ids": [s[0] for s in skipped], "reasons": [s[1] for s in skipped]},
        )

    async def cancel(self, notification_id: uuid.UUID) -> Row | None:
        """A compare-and-set: `scheduled`, or `pending` not yet claimed by a worker, becomes
        `cancelled` (final); None when it was in any other state. A message already published
        finds it cancelled at the claim, and is not sent. The client's `notification.cancelled`
        webhook is queued in the same statement."""
        return await self.db.fetchrow(
            f"""
            WITH n AS (
                UPDATE notifications SET status = 'cancelled', publish_pending = false, updated_at = now()
                WHERE id = %s AND status IN ('scheduled', 'pending')
                RETURNING {_PUBLIC_COLUMNS}, client_id, 'notification.cancelled' AS event_type
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'cancelled', attempts, 'cancelled by the client before it was sent' FROM n
            ), {_webhook_deliveries("n")}
            SELECT {_PUBLIC_COLUMNS} FROM n
            """,
            notification_id,
        )

    async def scheduled_counts(self) -> dict[str, int]:
        """How many wait, per channel (for the gauge)."""
        rows = await self.db.fetch(
            "SELECT notification_type, count(*) AS n FROM notifications"
            " WHERE status = 'scheduled' GROUP BY notification_type"
        )
        return {r["notification_type"]: int(r["n"]) for r in rows}
