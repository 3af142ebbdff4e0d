"""The shared status store (notifications_db): every notification's state and its history.

The gateway writes a notification before publishing it (or, to be sent later, as `scheduled`
until the dispatcher releases it to `pending`); workers move it through
sending → retrying → delivered | failed; a client may cancel one no worker has claimed yet.
Each change also appends a history event, in the same statement, so the record and its history
cannot disagree; a change to a final status also queues the client's webhook deliveries
(`webhook_deliveries`, which `common/features/webhooks/delivery.py` relays), in that statement
too, so an event is never lost between the two.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

import orjson

from common.data.db import Database, Executor, InputError, Row
from common.data.statements import (
    _PUBLIC_COLUMNS,
    CLAIM_MANY,
    CREATE_MANY,
    EVENTS,
    EXTEND,
    MARK_PUBLISHED,
    RECORD_MANY,
    _webhook_deliveries,
)


@dataclass(frozen=True)
class NewNotification:
    id: uuid.UUID
    client_id: str
    request_id: str
    body_hash: str
    user_id: str
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
    # The bulk request or topic fan-out it belongs to (`common/features/bulk/fanout.py`).
    batch_id: uuid.UUID | None = None
    # Who it is for, as templates see it (`recipient`), pinned at acceptance.
    recipient: dict[str, Any] | None = None
    # The workflow run and step that made it (`common/features/workflows/`), if one did.
    workflow_run_id: uuid.UUID | None = None
    step: str | None = None


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


class StatusStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, n: NewNotification) -> Row | None:
        """Insert, unless (client_id, request_id) exists: then None, and nothing is written.
        The statement of `create_many`, for one."""
        return (await self._insert([n]))[0]

    async def create_many(self, batch: list[NewNotification]) -> list[Row | BaseException | None]:
        """`create` for many at once, in one statement (group commit): for each, its row, or None
        when its (client_id, request_id) already existed (or came twice in this batch: the first
        wins). If the statement fails on one row's data, each is tried alone, so only the bad one
        fails."""
        try:
            return list(await self._insert(batch))
        except InputError:
            alone: list[Row | BaseException | None] = []
            for n in batch:
                try:
                    alone.append(await self.create(n))
                except InputError as exc:
                    alone.append(exc)
            return alone

    async def _insert(self, batch: list[NewNotification]) -> list[Row | None]:
        # Ordered by key: two batches locking the same keys lock them in one order, no deadlock.
        # Built field by field: dataclasses.asdict deep-copies the variables, on the hot path.
        ordered = sorted(batch, key=lambda n: (n.client_id, n.request_id))
        rows = [
            {**{f.name: getattr(n, f.name) for f in fields(n)}, "publish_pending": n.status == "pending"}
            for n in ordered
        ]
        found = await self.db.fetch_statement(CREATE_MANY, {"rows": orjson.dumps(rows).decode()})
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

    async def get(self, notification_id: uuid.UUID, project: str | None = None) -> Row | None:
        """A notification; with `project`, only if it is that project's (another project's id
        reads as unknown). Without, for the system's own steps (workers, bounces, loops)."""
        if project is None:
            return await self.db.fetchrow(
                f"SELECT {_PUBLIC_COLUMNS} FROM notifications WHERE id = %s", notification_id
            )
        return await self.db.fetchrow(
            f"SELECT {_PUBLIC_COLUMNS} FROM notifications WHERE id = %s AND client_id = %s",
            notification_id,
            project,
        )

    async def project_of(self, notification_id: uuid.UUID) -> str | None:
        """The project a notification belongs to (for the system's steps that act for it)."""
        value = await self.db.fetchval("SELECT client_id FROM notifications WHERE id = %s", notification_id)
        return None if value is None else str(value)

    async def engagement(self, notification_id: uuid.UUID) -> Row | None:
        """When an in-app notification's message was seen and read in the inbox (None when it
        is not there: another channel, or not delivered yet)."""
        return await self.db.fetchrow(
            "SELECT seen_at, read_at FROM inbox_messages WHERE notification_id = %s", notification_id
        )

    async def engaged(self, db: Executor, events: list[tuple[uuid.UUID, str]]) -> None:
        """A user saw or read in-app notifications (`notification.seen`, `notification.read`):
        a history entry each and the client's webhook queued, in `db`'s transaction (the inbox
        change's). The status stays `delivered`."""
        if not events:
            return
        await db.execute(
            f"""
            WITH v AS (
                SELECT * FROM unnest(%(ids)s::uuid[], %(events)s::text[]) AS v(id, event_type)
            ), n AS (
                SELECT t.id, t.attempts, t.client_id, t.request_id, t.user_id, t.notification_type,
                    t.status, t.error, t.provider, t.workflow_run_id, t.step, v.event_type
                FROM notifications AS t JOIN v ON v.id = t.id WHERE t.id = ANY(%(ids)s::uuid[])
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, split_part(event_type, '.', 2), attempts, 'in the inbox' FROM n
            ), {_webhook_deliveries("n")}
            SELECT count(*) FROM n
            """,
            {"ids": [e[0] for e in events], "events": [e[1] for e in events]},
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
        project: str,
        user_id: str | None,
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
        where: list[str] = ["client_id = %s"]
        args: list[Any] = [project]
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

    async def requeue_failed(self, notification_id: uuid.UUID, project: str) -> Row | None:
        """A failed notification of `project` back to pending, for a manual retry; None if not
        failed (or not the project's)."""
        return await self.db.fetchrow(
            f"""
            WITH n AS (
                UPDATE notifications
                SET status = 'pending', publish_pending = true, updated_at = now()
                WHERE id = %s AND client_id = %s AND status = 'failed'
                RETURNING {_PUBLIC_COLUMNS}
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'pending', attempts, 'manual retry' FROM n
            )
            SELECT * FROM n
            """,
            notification_id,
            project,
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
            f"SELECT {_PUBLIC_COLUMNS}, client_id FROM notifications"
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
                    t.status, t.error, t.provider, t.workflow_run_id, t.step,
                    'notification.skipped' AS event_type
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'skipped', attempts, error FROM n
            ), {_webhook_deliveries("n")}
            SELECT count(*) FROM n
            """,
            {"ids": [s[0] for s in skipped], "reasons": [s[1] for s in skipped]},
        )

    async def cancel(self, notification_id: uuid.UUID, project: str) -> Row | None:
        """A compare-and-set: `scheduled`, or `pending` not yet claimed by a worker, becomes
        `cancelled` (final); None when it was in any other state. A message already published
        finds it cancelled at the claim, and is not sent. The client's `notification.cancelled`
        webhook is queued in the same statement."""
        return await self.db.fetchrow(
            f"""
            WITH n AS (
                UPDATE notifications SET status = 'cancelled', publish_pending = false, updated_at = now()
                WHERE id = %s AND client_id = %s AND status IN ('scheduled', 'pending')
                RETURNING {_PUBLIC_COLUMNS}, client_id, 'notification.cancelled' AS event_type
            ), e AS (
                INSERT INTO notification_events (notification_id, status, attempt, detail)
                SELECT id, 'cancelled', attempts, 'cancelled by the client before it was sent' FROM n
            ), {_webhook_deliveries("n")}
            SELECT {_PUBLIC_COLUMNS} FROM n
            """,
            notification_id,
            project,
        )

    async def scheduled_counts(self) -> dict[str, int]:
        """How many wait, per channel (for the gauge)."""
        rows = await self.db.fetch(
            "SELECT notification_type, count(*) AS n FROM notifications"
            " WHERE status = 'scheduled' GROUP BY notification_type"
        )
        return {r["notification_type"]: int(r["n"]) for r in rows}
