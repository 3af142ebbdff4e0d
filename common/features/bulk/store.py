"""The SQL of one request, many recipients: `batches` (a bulk request, a notification to a
topic), `topics` and `topic_subscribers` (notifications_db), and the ids of a batch's recipients."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson

from common.data import db, topics
from common.vocabulary import FINAL_STATUSES

_BATCH_COLUMNS = (
    "id, client_id, request_id, body_hash, kind, topic_key, payload, total, rejected, result, "
    "fanout_cursor, fanned_out_at, fanout_attempts, fanout_error, failed_at, fanout_published_at, "
    "created_at, updated_at"
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

    async def advance(self, batch_id: uuid.UUID, start: str | None, cursor: str, rejected: int) -> bool:
        """Move a fan-out's cursor from `start` (the page's) to `cursor` (its last subscriber),
        counting the page's rejected users; False when the cursor is no longer at `start` (a
        second consumer on the same page moved it first: the page is counted once)."""
        moved = await self.db.fetchval(
            "UPDATE batches SET fanout_cursor = %s, rejected = rejected + %s, updated_at = now()"
            " WHERE id = %s AND fanout_cursor IS NOT DISTINCT FROM %s RETURNING id",
            cursor,
            rejected,
            batch_id,
            start,
        )
        return moved is not None

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

    async def touch(self, batch_ids: list[uuid.UUID], *, published: bool = False) -> None:
        """Mark the batches as moving now (and, `published`, their fan-out message as sent now)."""
        await self.db.execute(
            "UPDATE batches SET updated_at = now(),"
            " fanout_published_at = CASE WHEN %s THEN now() ELSE fanout_published_at END"
            " WHERE id = ANY(%s)",
            published,
            batch_ids,
        )

    async def claim_publish(self, batch_id: uuid.UUID, stalled_after: float) -> bool:
        """Whether the caller is to publish the batch's fan-out message now (and it is recorded as
        published): yes for an unfinished fan-out whose message was never published, or that
        nothing has touched for `stalled_after` seconds; no while a message published or a
        fan-out in progress is recent. One of concurrent callers wins."""
        claimed = await self.db.fetchval(
            "UPDATE batches SET fanout_published_at = now(), updated_at = now()"
            " WHERE id = %s AND kind = 'topic' AND fanned_out_at IS NULL AND failed_at IS NULL"
            " AND (fanout_published_at IS NULL OR updated_at < now() - make_interval(secs => %s))"
            " RETURNING id",
            batch_id,
            stalled_after,
        )
        return claimed is not None

    async def unclaim_publish(self, batch_id: uuid.UUID) -> None:
        """The message claimed was not published after all: the next replay publishes it."""
        await self.db.execute("UPDATE batches SET fanout_published_at = NULL WHERE id = %s", batch_id)

    # topics

    async def put_topic(self, client_id: str, key: str, name: str, limit: int) -> tuple[db.Row, bool] | None:
        """The topic created or renamed, and whether it was created; None when it would be new
        and the project has `limit` topics already. Under the project's lock, so that concurrent
        creations cannot pass the limit together (a rename is not counted)."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", f"topics\x1f{client_id}"
            )
            renamed = await tx.fetchrow(
                "UPDATE topics SET name = %s, updated_at = now() WHERE client_id = %s AND key = %s"
                " RETURNING key, name, created_at, updated_at",
                name,
                client_id,
                key,
            )
            if renamed is not None:
                return renamed, False
            if await tx.fetchval("SELECT count(*) FROM topics WHERE client_id = %s", client_id) >= limit:
                return None
            row = await tx.fetchrow(
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
        return await topics.exists(self.db, client_id, key)

    async def subscribe(self, client_id: str, key: str, user_ids: list[str], limit: int) -> int | None:
        """Adds the ones not yet subscribed; returns how many were added, or None (and adds
        none) when the topic would have more than `limit` subscribers. Counted and inserted
        under the topic's lock, so that concurrent adds cannot pass the limit together."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                f"topic-subscribers\x1f{client_id}\x1f{key}",
            )
            have = await tx.fetchval(
                "SELECT count(*) FROM topic_subscribers WHERE client_id = %s AND topic_key = %s",
                client_id,
                key,
            )
            new = await tx.fetchval(
                "SELECT count(DISTINCT u) FROM unnest(%s::text[]) AS u WHERE NOT EXISTS (SELECT 1"
                " FROM topic_subscribers s WHERE s.client_id = %s AND s.topic_key = %s AND s.user_id = u)",
                user_ids,
                client_id,
                key,
            )
            if int(have) + int(new) > limit:
                return None
            rows = await tx.fetch(
                """
                INSERT INTO topic_subscribers (client_id, topic_key, user_id)
                SELECT %s, %s, u FROM unnest(%s::text[]) AS u
                ON CONFLICT DO NOTHING RETURNING user_id
                """,
                client_id,
                key,
                user_ids,
            )
        return len(rows)

    async def unsubscribe(self, client_id: str, key: str, user_id: str) -> bool:
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
        self, client_id: str, key: str, *, after: str | None, limit: int, as_of: datetime | None = None
    ) -> list[db.Row]:
        return await topics.subscribers(self.db, client_id, key, after=after, limit=limit, as_of=as_of)
