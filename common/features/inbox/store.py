"""The SQL of the in-app inbox: messages (`inbox_messages`) and the log of every change to a
user's inbox (`inbox_events`, whose `seq` is the Server-Sent Events id).

Every change writes its `inbox_events` row in the transaction that makes it, under a lock per
(project, user) taken first: a user's events then commit in the order of their `seq`, so a
stream that has sent everything up to `seq` n and reads "after n" can never skip one that was
still being committed (an identity value is handed out at insert time, not at commit). Other
users' changes do not wait on it.

Every read and change is scoped by project and user: another user's message is not found.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any, Literal

from aiohttp import web

from common.data import db
from common.data.store import StatusStore
from common.keys import DB_KEY, INBOX_KEY, STORE_KEY

Status = Literal["unread", "read", "all"]
Action = Literal["read", "unread", "seen", "archive", "unarchive"]
ACTIONS: tuple[Action, ...] = ("read", "unread", "seen", "archive", "unarchive")

_COLUMNS = (
    "id, seq, project_id, user_id, notification_id, workflow_key, title, body, link, image_url,"
    " data, created_at, seen_at, read_at, archived_at, updated_at"
)
_MESSAGE_FIELDS = tuple(c.strip() for c in _COLUMNS.split(","))

_STATUS = {
    "unread": "read_at IS NULL",
    "read": "read_at IS NOT NULL",
    "all": "true",
}

# action: (what it sets, the state in which it changes anything, the event's action)
_CHANGES: dict[Action, tuple[str, str, str]] = {
    "read": (
        "read_at = now(), seen_at = coalesce(seen_at, now())",
        "read_at IS NULL",
        "read",
    ),
    "unread": ("read_at = NULL", "read_at IS NOT NULL", "unread"),
    "seen": ("seen_at = now()", "seen_at IS NULL", "seen"),
    "archive": ("archived_at = now()", "archived_at IS NULL", "archived"),
    "unarchive": ("archived_at = NULL", "archived_at IS NOT NULL", "unarchived"),
}

_COUNTS = (
    "SELECT count(*) FILTER (WHERE read_at IS NULL) AS unread,"
    " count(*) FILTER (WHERE seen_at IS NULL) AS unseen, count(*) AS total"
    " FROM inbox_messages WHERE project_id = %(project)s AND user_id = %(user)s AND archived_at IS NULL"
)

_EVENT = (
    "INSERT INTO inbox_events (project_id, user_id, kind, action, message_id)"
    " VALUES (%(project)s, %(user)s, %(kind)s, %(action)s, %(message)s) RETURNING seq"
)


async def _lock(tx: db.Executor, project: str, user_id: str) -> None:
    """The user's inbox lock, until the transaction ends (see the module's docstring)."""
    await tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", f"inbox\x1f{project}\x1f{user_id}"
    )


def _counts(row: db.Row | None) -> dict[str, int]:
    row = row or {}
    return {name: int(row.get(name) or 0) for name in ("unread", "unseen", "total")}


class InboxStore:
    """Inbox messages and events in notifications_db."""

    def __init__(self, database: db.Database, status: StatusStore | None = None) -> None:
        self.db = database
        # Where a read or a seen is told to the notification's history and the client's
        # webhooks (`notification.read`, `notification.seen`), in the change's transaction;
        # the inbox worker, which only delivers, has none.
        self.status = status

    # delivery (the inbox worker)

    async def deliver(
        self,
        *,
        project: str,
        user_id: str,
        notification_id: uuid.UUID,
        workflow_key: str | None,
        title: str,
        body: str,
        link: str | None,
        image_url: str | None,
        data: dict[str, Any],
    ) -> tuple[db.Row, bool]:
        """The message of `notification_id`, put in the user's inbox once: (its row, created).
        A message created comes with its `message` event, in one transaction; the row's
        `event_seq` is that event's seq (None when it was there already), to `announce`."""
        values = {
            "id": uuid.uuid4(),
            "project": project,
            "user": user_id,
            "notification": notification_id,
            "workflow": workflow_key,
            "title": title,
            "body": body,
            "link": link,
            "image": image_url,
            "data": db.Json(data),
        }
        async with self.db.transaction() as tx:
            await _lock(tx, project, user_id)
            row = await tx.fetchrow(
                "INSERT INTO inbox_messages (id, project_id, user_id, notification_id, workflow_key,"
                " title, body, link, image_url, data)"
                " VALUES (%(id)s, %(project)s, %(user)s, %(notification)s, %(workflow)s, %(title)s,"
                " %(body)s, %(link)s, %(image)s, %(data)s)"
                f" ON CONFLICT (notification_id) DO NOTHING RETURNING {_COLUMNS}",
                values,
            )
            if row is None:
                existing = await tx.fetchrow(
                    f"SELECT {_COLUMNS} FROM inbox_messages WHERE notification_id = %s", notification_id
                )
                assert existing is not None
                existing["event_seq"] = None
                return existing, False
            row["event_seq"] = await tx.fetchval(
                _EVENT,
                {
                    "project": project,
                    "user": user_id,
                    "kind": "message",
                    "action": "delivered",
                    "message": row["id"],
                },
            )
        return row, True

    # reads

    async def messages(
        self,
        project: str,
        user_id: str,
        *,
        status: Status = "all",
        archived: bool = False,
        after: int | None = None,
        limit: int = 20,
    ) -> list[db.Row]:
        """Newest first, by keyset: `after` is the `seq` of the last row of the previous page."""
        where = _STATUS[status]
        shelf = "archived_at IS NOT NULL" if archived else "archived_at IS NULL"
        return await self.db.fetch(
            f"SELECT {_COLUMNS} FROM inbox_messages"
            " WHERE project_id = %(project)s AND user_id = %(user)s"
            f" AND {where} AND {shelf}"
            " AND (%(after)s::bigint IS NULL OR seq < %(after)s::bigint)"
            " ORDER BY seq DESC LIMIT %(limit)s",
            {"project": project, "user": user_id, "after": after, "limit": limit},
        )

    async def counts(self, project: str, user_id: str) -> dict[str, int]:
        """{unread, unseen, total} of the messages not archived."""
        return _counts(await self.db.fetchrow(_COUNTS, {"project": project, "user": user_id}))

    async def latest_seq(self, project: str, user_id: str) -> int:
        """The seq of the user's last event (0 when there is none)."""
        value = await self.db.fetchval(
            "SELECT max(seq) FROM inbox_events WHERE project_id = %s AND user_id = %s", project, user_id
        )
        return int(value or 0)

    async def events_after(self, project: str, user_id: str, seq: int, limit: int) -> list[db.Row]:
        """The user's events with a seq above `seq`, oldest first, each with the current state of
        its message under `message` (None for read_all and seen_all, and for a message since
        deleted)."""
        fields = ", ".join(f"m.{c} AS m_{c}" for c in _MESSAGE_FIELDS)
        rows = await self.db.fetch(
            f"SELECT e.seq AS event_seq, e.kind, e.action, e.message_id, {fields}"
            " FROM inbox_events AS e LEFT JOIN inbox_messages AS m ON m.id = e.message_id"
            " WHERE e.project_id = %s AND e.user_id = %s AND e.seq > %s ORDER BY e.seq LIMIT %s",
            project,
            user_id,
            seq,
            limit,
        )
        events = []
        for row in rows:
            message = {c: row.pop(f"m_{c}") for c in _MESSAGE_FIELDS}
            row["seq"] = row.pop("event_seq")
            row["message"] = message if message["id"] is not None else None
            events.append(row)
        return events

    async def read_state(
        self, notification_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[datetime | None, datetime | None]]:
        """{notification_id: (seen_at, read_at)} of the notifications that have a message."""
        ids = list(notification_ids)
        if not ids:
            return {}
        rows = await self.db.fetch(
            "SELECT notification_id, seen_at, read_at FROM inbox_messages"
            " WHERE notification_id = ANY(%s::uuid[])",
            ids,
        )
        return {r["notification_id"]: (r["seen_at"], r["read_at"]) for r in rows}

    # changes

    async def mark(
        self, project: str, user_id: str, message_id: uuid.UUID, action: Action
    ) -> tuple[db.Row, int | None] | None:
        """One message read, unread, seen, archived or unarchived: (its row, the seq of the
        `message.updated` event written, or None when it was so already); None when the user
        has no such message."""
        sets, when, event = _CHANGES[action]
        scope = {"id": message_id, "project": project, "user": user_id}
        async with self.db.transaction() as tx:
            await _lock(tx, project, user_id)
            row = await tx.fetchrow(
                f"UPDATE inbox_messages SET {sets}, updated_at = now()"
                " WHERE id = %(id)s AND project_id = %(project)s AND user_id = %(user)s"
                f" AND {when} RETURNING {_COLUMNS}",
                scope,
            )
            if row is None:
                current = await tx.fetchrow(
                    f"SELECT {_COLUMNS} FROM inbox_messages"
                    " WHERE id = %(id)s AND project_id = %(project)s AND user_id = %(user)s",
                    scope,
                )
                return None if current is None else (current, None)
            seq = await tx.fetchval(
                _EVENT,
                {
                    "project": project,
                    "user": user_id,
                    "kind": "message.updated",
                    "action": event,
                    "message": message_id,
                },
            )
            if action in ("read", "seen"):
                await self._engaged(tx, [row["notification_id"]], action)
        return row, int(seq)

    async def _engaged(self, tx: db.Executor, notification_ids: list[uuid.UUID], action: str) -> None:
        if self.status is not None:
            await self.status.engaged(tx, [(i, f"notification.{action}") for i in notification_ids])

    async def read_all(self, project: str, user_id: str) -> tuple[dict[str, int], int | None]:
        """Every unread message read (archived ones too): (the counts after, the event's seq or
        None when nothing was unread)."""
        return await self._all(
            project,
            user_id,
            "read_at = now(), seen_at = coalesce(seen_at, now())",
            "read_at IS NULL",
            "read_all",
        )

    async def seen_all(self, project: str, user_id: str) -> tuple[dict[str, int], int | None]:
        """Every unseen message seen: (the counts after, the event's seq or None)."""
        return await self._all(project, user_id, "seen_at = now()", "seen_at IS NULL", "seen_all")

    async def _all(
        self, project: str, user_id: str, sets: str, when: str, action: str
    ) -> tuple[dict[str, int], int | None]:
        values = {"project": project, "user": user_id, "action": action}
        async with self.db.transaction() as tx:
            await _lock(tx, project, user_id)
            # One statement: the messages changed and, when there were any, the one event.
            done = await tx.fetchrow(
                f"""
                WITH changed AS (
                    UPDATE inbox_messages SET {sets}, updated_at = now()
                    WHERE project_id = %(project)s AND user_id = %(user)s AND {when}
                    RETURNING notification_id
                ), event AS (
                    INSERT INTO inbox_events (project_id, user_id, kind, action, message_id)
                    SELECT %(project)s, %(user)s, 'message.updated', %(action)s, NULL
                    WHERE EXISTS (SELECT 1 FROM changed)
                    RETURNING seq
                )
                SELECT (SELECT seq FROM event) AS seq, ARRAY(SELECT notification_id FROM changed) AS ids
                """,
                values,
            )
            assert done is not None
            seq = done["seq"]
            await self._engaged(tx, list(done["ids"]), action.removesuffix("_all"))
            counts = _counts(await tx.fetchrow(_COUNTS, values))
        return counts, None if seq is None else int(seq)


async def inbox_store(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: the inbox store over the gateway's database (INBOX_KEY)."""
    app[INBOX_KEY] = InboxStore(app[DB_KEY], app[STORE_KEY])
    yield
