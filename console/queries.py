"""What the console reads from the status store beyond what `common/data/store.py` offers the API:
counts for the overview, a keyset-paged search, the recent failures."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.data.db import Database, Row
from common.web import cursors

# What a list shows of each notification; the store's columns that a newer schema adds (send_at)
# are read only when they exist, see `Queries.columns`.
_LIST_COLUMNS = (
    "id, request_id, user_id, notification_type, template_code, status, attempts, error, provider, "
    "created_at, updated_at"
)


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    next_cursor: str | None


class Queries:
    """The console's reads, all of one project's notifications (the signed-in session's)."""

    def __init__(self, db: Database, project: str) -> None:
        self.db = db
        self.project = project

    async def counts(self) -> dict[str, dict[str, int]]:
        """Notifications accepted in the last hour and the last day, by their status now."""
        rows = await self.db.fetch(
            "SELECT status,"
            " count(*) FILTER (WHERE created_at > now() - interval '1 hour') AS hour,"
            " count(*) AS day"
            " FROM notifications WHERE client_id = %s AND created_at > now() - interval '1 day'"
            " GROUP BY status",
            self.project,
        )
        return {r["status"]: {"hour": int(r["hour"]), "day": int(r["day"])} for r in rows}

    async def per_minute(self, minutes: int = 60) -> list[dict[str, Any]]:
        """Accepted and delivered in each of the last `minutes` minutes, oldest first (empty
        minutes included, so a chart's x axis is time)."""
        return await self.db.fetch(
            """
            WITH m AS (
                SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => %(n)s - 1),
                                       date_trunc('minute', now()), interval '1 minute') AS minute
            ), recent AS (
                SELECT created_at, delivered_at FROM notifications
                WHERE client_id = %(project)s AND (
                    created_at > date_trunc('minute', now()) - make_interval(mins => %(n)s)
                    OR delivered_at > date_trunc('minute', now()) - make_interval(mins => %(n)s))
            )
            SELECT m.minute,
                (SELECT count(*) FROM recent WHERE date_trunc('minute', created_at) = m.minute) AS accepted,
                (SELECT count(*) FROM recent WHERE date_trunc('minute', delivered_at) = m.minute)
                    AS delivered
            FROM m ORDER BY m.minute
            """,
            {"n": minutes, "project": self.project},
        )

    async def search(
        self, *, q: str, status: str | None, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> Page:
        """Newest first, `limit` at a time; `after` is where the previous page ended. `q` is a
        notification id, a user id or a request_id."""
        where: list[str] = ["client_id = %(project)s"]
        args: dict[str, Any] = {"limit": limit + 1, "project": self.project}
        if q:
            try:
                ident = uuid.UUID(q)
            except ValueError:
                where.append("(user_id = %(q)s OR request_id = %(q)s)")
                args["q"] = q
            else:
                where.append("(id = %(ident)s OR user_id = %(q)s OR request_id = %(q)s)")
                args.update(ident=ident, q=q)
        if status:
            where.append("status = %(status)s")
            args["status"] = status
        if after is not None:
            where.append("(created_at, id) < (%(after_at)s, %(after_id)s)")
            args.update(after_at=after[0], after_id=after[1])
        clause = f"WHERE {' AND '.join(where)}"
        rows = await self.db.fetch(
            f"SELECT {_LIST_COLUMNS} FROM notifications {clause}"
            " ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
            args,
        )
        return _page(rows, limit)

    async def failures(self, limit: int = 50) -> list[Row]:
        """The most recent failures, newest failure first."""
        return await self.db.fetch(
            f"SELECT {_LIST_COLUMNS} FROM notifications WHERE client_id = %s AND status = 'failed'"
            " ORDER BY updated_at DESC, id DESC LIMIT %s",
            self.project,
            limit,
        )

    async def webhook_deliveries(self, notification_id: uuid.UUID) -> list[Row]:
        """The status webhooks sent about one notification: to which endpoint, and how it went."""
        return await self.db.fetch(
            "SELECT d.event_type, d.status, d.attempts, d.last_status_code, d.last_error,"
            " d.created_at, d.delivered_at, e.url"
            " FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            " WHERE d.notification_id = %s AND d.client_id = %s ORDER BY d.seq",
            notification_id,
            self.project,
        )

    async def failed_total(self) -> int:
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM notifications WHERE client_id = %s AND status = 'failed'", self.project
            )
            or 0
        )


def _page(rows: list[Row], limit: int) -> Page:
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = cursors.encode(rows[-1]["created_at"], rows[-1]["id"]) if more and rows else None
    return Page(rows, cursor)
