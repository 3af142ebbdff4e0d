"""Digest windows and throttle places, as rows of notifications_db (migration 022).

One decision, one transaction, one lock: a run reaching a digest step takes the advisory lock of
its (project, workflow, user, step, key), then joins the open window or opens one; the partial
unique index on open windows backs the lock. Closing a window is one UPDATE of its row, which a
join holds `FOR UPDATE` while it adds its event: a join either lands before the close (and is
counted) or finds the window closed and opens the next one. Never lost, never counted twice:
each event is one row keyed by (run, step), so a run whose engine died and repeats its step
finds where it went. A window's count and events are read from those rows when it closes.

A throttle step is the same shape: under the key's lock, the passes of the last `window` are
counted, and the run takes a place if fewer than `limit` did. Events are listed oldest first by
when their run was triggered, not by when an engine got to them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.data.db import Database, Json, Row

_EVENTS = """
    SELECT count(*) AS count,
           (SELECT coalesce(jsonb_agg(payload ORDER BY occurred_at, seq), '[]'::jsonb) FROM (
               SELECT payload, occurred_at, seq FROM workflow_digest_events WHERE digest_id = %(id)s
               ORDER BY occurred_at, seq LIMIT %(max)s) AS f) AS events,
           (SELECT payload FROM workflow_digest_events WHERE digest_id = %(id)s
            ORDER BY occurred_at, seq LIMIT 1) AS first,
           (SELECT payload FROM workflow_digest_events WHERE digest_id = %(id)s
            ORDER BY occurred_at DESC, seq DESC LIMIT 1) AS last
    FROM workflow_digest_events WHERE digest_id = %(id)s
"""


@dataclass(frozen=True)
class Window:
    """The window a run's event went into."""

    id: uuid.UUID
    carrier: uuid.UUID
    status: str  # open, closed, cancelled
    opened_at: datetime
    closes_at: datetime


def _lock_name(kind: str, run: Row, step: str, key: str) -> str:
    # U+001F cannot occur in a workflow key, a user id or a step name.
    return "\x1f".join((kind, run["project_id"], run["workflow_key"], run["user_id"], step, key))


def _window(row: Row) -> Window:
    return Window(row["id"], row["carrier"], row["status"], row["opened_at"], row["closes_at"])


class DigestStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def join(
        self, run: Row, step: str, key: str, closes_at: datetime, lookback: float | None
    ) -> Window:
        """The window the run's event is in: the one it joined before (a repeated step), the
        open one for its key, or a new one that closes at `closes_at` (carried by this run). With
        `lookback` (seconds), when no window of the key closed within that long, the event is a
        window of its own, closed at once: the run goes on without waiting."""
        where = {
            "project": run["project_id"],
            "workflow": run["workflow_key"],
            "user": run["user_id"],
            "step": step,
            "key": key,
        }
        async with self.db.transaction() as tx:
            # The lock first: an earlier attempt of this step whose engine died mid-COMMIT may
            # still be committing; under the lock, the statement after it sees that commit.
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", _lock_name("digest", run, step, key)
            )
            before = await tx.fetchrow(
                "SELECT d.* FROM workflow_digest_events e JOIN workflow_digests d ON d.id = e.digest_id"
                " WHERE e.run_id = %s AND e.step = %s",
                run["id"],
                step,
            )
            if before is not None:
                return _window(before)
            found = await tx.fetchrow(
                """
                SELECT * FROM workflow_digests
                WHERE project_id = %(project)s AND workflow_key = %(workflow)s AND user_id = %(user)s
                  AND step = %(step)s AND digest_key = %(key)s AND status = 'open'
                FOR UPDATE
                """,
                where,
            )
            if found is None:
                quiet = lookback is not None and not await tx.fetchval(
                    """
                    SELECT EXISTS (SELECT 1 FROM workflow_digests
                        WHERE project_id = %(project)s AND workflow_key = %(workflow)s
                          AND user_id = %(user)s AND step = %(step)s AND digest_key = %(key)s
                          AND status = 'closed' AND closed_at > now() - make_interval(secs => %(lookback)s))
                    """,
                    {**where, "lookback": lookback or 0},
                )
                found = await tx.fetchrow(
                    """
                    INSERT INTO workflow_digests (id, project_id, workflow_key, user_id, step, digest_key,
                        carrier, status, opened_at, closes_at, closed_at)
                    VALUES (%(id)s, %(project)s, %(workflow)s, %(user)s, %(step)s, %(key)s, %(carrier)s,
                        CASE WHEN %(quiet)s THEN 'closed' ELSE 'open' END, clock_timestamp(),
                        CASE WHEN %(quiet)s THEN clock_timestamp() ELSE %(closes_at)s END,
                        CASE WHEN %(quiet)s THEN clock_timestamp() END)
                    RETURNING *
                    """,
                    {
                        **where,
                        "id": uuid.uuid4(),
                        "carrier": run["id"],
                        "quiet": quiet,
                        "closes_at": closes_at,
                    },
                )
                assert found is not None
            await tx.execute(
                "INSERT INTO workflow_digest_events (run_id, step, digest_id, payload, occurred_at)"
                " VALUES (%s, %s, %s, %s, coalesce(%s, now()))",
                run["id"],
                step,
                found["id"],
                Json(run["payload"]),
                run.get("created_at"),
            )
            return _window(found)

    async def close(self, digest_id: uuid.UUID, max_events: int) -> dict[str, Any]:
        """The window closed (if it was open; again, it changes nothing) and what it holds:
        `count`, `events` (the first `max_events` payloads, oldest first), `first`, `last`, and
        when it opened and closed."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                """
                UPDATE workflow_digests
                SET status = CASE WHEN status = 'open' THEN 'closed' ELSE status END,
                    closed_at = coalesce(closed_at, clock_timestamp())
                WHERE id = %s RETURNING opened_at, closes_at, closed_at
                """,
                digest_id,
            )
            # A statement of its own: it sees every join committed before the UPDATE took the row.
            held = await tx.fetchrow(_EVENTS, {"id": digest_id, "max": max_events})
        assert row is not None and held is not None
        return {**held, "count": int(held["count"]), **row}

    async def held(self, digest_id: uuid.UUID, max_events: int) -> dict[str, Any]:
        """What a window holds now (the close's answer, read again for a later step)."""
        held = await self.db.fetchrow(_EVENTS, {"id": digest_id, "max": max_events})
        assert held is not None
        return {**held, "count": int(held["count"])}

    async def count_open_windows(self, runs: list[Row]) -> None:
        """Each digest step of these runs still waiting for its window given the events gathered
        so far (`count`), for a run's view; a closed one says its final count already."""
        waiting = [
            s for run in runs for s in run["steps"] if s.get("type") == "digest" and s["status"] == "waiting"
        ]
        if not waiting:
            return
        rows = await self.db.fetch(
            "SELECT digest_id, count(*) AS n FROM workflow_digest_events"
            " WHERE digest_id = ANY(%s::uuid[]) GROUP BY digest_id",
            [s["digest_id"] for s in waiting],
        )
        counts = {str(r["digest_id"]): int(r["n"]) for r in rows}
        for state in waiting:
            state["count"] = counts.get(state["digest_id"], 0)

    async def throttle(self, run: Row, step: str, key: str, limit: int, window: float) -> bool:
        """Whether the run passes: it did before (a repeated step), or fewer than `limit` runs of
        its key passed within the last `window` seconds and it takes a place now."""
        async with self.db.transaction() as tx:
            # The lock first, as in `join`: an earlier attempt may still be committing.
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                _lock_name("throttle", run, step, key),
            )
            if await tx.fetchval(
                "SELECT EXISTS (SELECT 1 FROM workflow_throttle_passes WHERE run_id = %s AND step = %s)",
                run["id"],
                step,
            ):
                return True
            where = {
                "project": run["project_id"],
                "workflow": run["workflow_key"],
                "user": run["user_id"],
                "step": step,
                "key": key,
                "window": window,
            }
            chosen = """project_id = %(project)s AND workflow_key = %(workflow)s AND user_id = %(user)s
                AND step = %(step)s AND throttle_key = %(key)s"""
            # Places older than the window count no more: gone, so the table stays small.
            await tx.execute(
                f"DELETE FROM workflow_throttle_passes WHERE {chosen}"
                " AND passed_at <= now() - make_interval(secs => %(window)s)",
                where,
            )
            taken = await tx.fetchval(f"SELECT count(*) FROM workflow_throttle_passes WHERE {chosen}", where)
            if int(taken) >= limit:
                return False
            await tx.execute(
                """
                INSERT INTO workflow_throttle_passes
                    (run_id, step, project_id, workflow_key, user_id, throttle_key)
                VALUES (%(run)s, %(step)s, %(project)s, %(workflow)s, %(user)s, %(key)s)
                """,
                {**where, "run": run["id"]},
            )
            return True
