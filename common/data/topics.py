"""Reading a topic's subscribers (notifications_db `topics`, `topic_subscribers`): shared by every
feature that sends to a topic (bulk sends, workflow triggers); the topics API that writes them is
the bulk feature's."""

from __future__ import annotations

from datetime import datetime

from common.data.db import Database, Row


async def exists(db: Database, project: str, key: str) -> bool:
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM topics WHERE client_id = %s AND key = %s)", project, key
        )
    )


async def subscribers(
    db: Database, project: str, key: str, *, after: str | None, limit: int, as_of: datetime | None = None
) -> list[Row]:
    """A page of subscribers by user_id after `after` (keyset); `as_of` leaves out those who
    subscribed later (a fan-out sends to the subscribers of its moment)."""
    return await db.fetch(
        """
        SELECT user_id, created_at FROM topic_subscribers
        WHERE client_id = %s AND topic_key = %s
          AND (%s::text IS NULL OR user_id > %s::text)
          AND (%s::timestamptz IS NULL OR created_at <= %s::timestamptz)
        ORDER BY user_id LIMIT %s
        """,
        project,
        key,
        after,
        after,
        as_of,
        as_of,
        limit,
    )
