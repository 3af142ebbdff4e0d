"""Workflows, their versions and their runs, in notifications_db (migrations/notifications_db/020).

Runs live beside the notifications they make so that their timers are rows, not memory: an
engine takes due runs with `FOR UPDATE SKIP LOCKED` and pushes their `due_at` a lease ahead, so
several gateways share them and a run whose engine died is due again when the lease ends. Every
write of a run is a compare-and-set on its `revision`: an engine that lost a run (its lease ran
out, a cancel came) learns it and drops what it decided.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.data.db import Database, Json, Row
from common.features.workflows.definition import Definition
from common.vocabulary import ACTIVE_RUN, FINAL_STATUSES, sql_list

_ACTIVE = f"({sql_list(ACTIVE_RUN)})"
RUN_COLUMNS = (
    "id, project_id, workflow_key, version, user_id, request_id, body_hash, cancellation_key, batch_id, "
    "status, step_index, revision, due_at, waiting_on, payload, recipient, steps, reason, "
    "correlation_id, merged_into, created_at, updated_at"
)


@dataclass(frozen=True)
class NewRun:
    id: uuid.UUID
    project_id: str
    workflow_key: str
    version: int
    user_id: str
    request_id: str
    body_hash: str
    cancellation_key: str | None
    payload: dict[str, Any]
    recipient: dict[str, Any]
    steps: list[dict[str, Any]]
    correlation_id: str
    batch_id: uuid.UUID | None = None


class WorkflowStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Versions never change once written: kept by (project, key, version), bounded.
        self._versions: dict[tuple[str, str, int], Definition] = {}

    # --- definitions ---------------------------------------------------------------------------

    async def put(self, project_id: str, key: str, definition: Definition) -> tuple[int, bool]:
        """A new version, made current; (version, whether the workflow is new). Concurrent PUTs
        of one key serialise on its row, so each gets a version of its own."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                """
                INSERT INTO workflows (project_id, key, current_version, latest_version)
                VALUES (%s, %s, 1, 1)
                ON CONFLICT (project_id, key) DO UPDATE
                    SET latest_version = workflows.latest_version + 1,
                        current_version = workflows.latest_version + 1, updated_at = now()
                RETURNING latest_version, (xmax = 0) AS created
                """,
                project_id,
                key,
            )
            assert row is not None
            await tx.execute(
                "INSERT INTO workflow_versions (project_id, key, version, definition)"
                " VALUES (%s, %s, %s, %s)",
                project_id,
                key,
                row["latest_version"],
                Json(definition.as_json()),
            )
        return int(row["latest_version"]), bool(row["created"])

    async def get(self, project_id: str, key: str, version: int | None = None) -> Row | None:
        """The workflow with the definition of `version` (default: the current one)."""
        return await self.db.fetchrow(
            """
            SELECT w.key, w.current_version, w.latest_version, w.created_at, w.updated_at,
                   v.version, v.definition, v.created_at AS version_created_at
            FROM workflows w JOIN workflow_versions v
              ON v.project_id = w.project_id AND v.key = w.key
             AND v.version = coalesce(%s, w.current_version)
            WHERE w.project_id = %s AND w.key = %s
            """,
            version,
            project_id,
            key,
        )

    async def definition(self, project_id: str, key: str, version: int) -> Definition | None:
        cache_key = (project_id, key, version)
        found = self._versions.get(cache_key)
        if found is None:
            row = await self.get(project_id, key, version)
            if row is None:
                return None
            found = Definition.from_json(row["definition"])
            if len(self._versions) >= 1024:
                self._versions.pop(next(iter(self._versions)))
            self._versions[cache_key] = found
        return found

    async def page(
        self, project_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> tuple[list[Row], bool]:
        rows = await self.db.fetch(
            """
            SELECT w.key, w.current_version, w.latest_version, w.created_at, w.updated_at,
                   v.version, v.definition
            FROM workflows w JOIN workflow_versions v
              ON v.project_id = w.project_id AND v.key = w.key AND v.version = w.current_version
            WHERE w.project_id = %s AND (%s::timestamptz IS NULL OR (w.created_at, w.key) < (%s, %s))
            ORDER BY w.created_at DESC, w.key DESC LIMIT %s
            """,
            project_id,
            after[0] if after else None,
            after[0] if after else None,
            after[1] if after else None,
            limit + 1,
        )
        return rows[:limit], len(rows) > limit

    async def versions(self, project_id: str, key: str) -> list[Row]:
        return await self.db.fetch(
            """
            SELECT v.version, v.definition, v.created_at, (v.version = w.current_version) AS current
            FROM workflow_versions v JOIN workflows w ON w.project_id = v.project_id AND w.key = v.key
            WHERE v.project_id = %s AND v.key = %s ORDER BY v.version DESC LIMIT 1000
            """,
            project_id,
            key,
        )

    async def activate(self, project_id: str, key: str, version: int) -> bool:
        count = await self.db.execute(
            """
            UPDATE workflows SET current_version = %s, updated_at = now()
            WHERE project_id = %s AND key = %s
              AND EXISTS (SELECT 1 FROM workflow_versions
                          WHERE project_id = %s AND key = %s AND version = %s)
            """,
            version,
            project_id,
            key,
            project_id,
            key,
            version,
        )
        return count == 1

    # --- runs ----------------------------------------------------------------------------------

    async def create_runs(self, runs: Sequence[NewRun]) -> list[Row]:
        """Each run inserted, or the one made before under the same (project, workflow,
        request_id, user): the answer says which (`created`), in the order given."""
        if not runs:
            return []
        rows = [
            {
                "id": str(r.id),
                "project_id": r.project_id,
                "workflow_key": r.workflow_key,
                "version": r.version,
                "user_id": r.user_id,
                "request_id": r.request_id,
                "body_hash": r.body_hash,
                "cancellation_key": r.cancellation_key,
                "batch_id": str(r.batch_id) if r.batch_id else None,
                "payload": r.payload,
                "recipient": r.recipient,
                "steps": r.steps,
                "correlation_id": r.correlation_id,
            }
            for r in runs
        ]
        found = await self.db.fetch(
            f"""
            WITH r AS (
                SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r(
                    id uuid, project_id text, workflow_key text, version integer, user_id text,
                    request_id text, body_hash text, cancellation_key text, batch_id uuid,
                    payload jsonb, recipient jsonb, steps jsonb, correlation_id text)
            ), ins AS (
                INSERT INTO workflow_runs (id, project_id, workflow_key, version, user_id, request_id,
                    body_hash, cancellation_key, batch_id, payload, recipient, steps, correlation_id,
                    due_at)
                SELECT id, project_id, workflow_key, version, user_id, request_id, body_hash,
                    cancellation_key, batch_id, payload, recipient, steps, correlation_id, now()
                FROM r
                ON CONFLICT (project_id, workflow_key, request_id, user_id) DO NOTHING
                RETURNING {RUN_COLUMNS}
            )
            SELECT ins.*, true AS created FROM ins
            UNION ALL
            SELECT {", ".join("w." + c.strip() for c in RUN_COLUMNS.split(","))}, false AS created
            FROM r JOIN workflow_runs w
              ON w.project_id = r.project_id AND w.workflow_key = r.workflow_key
             AND w.request_id = r.request_id AND w.user_id = r.user_id
            WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.user_id = r.user_id)
            """,
            Json(rows),
        )
        by_user = {row["user_id"]: row for row in found}
        return [by_user[r.user_id] for r in runs if r.user_id in by_user]

    async def take_due(self, limit: int, lease: float) -> list[Row]:
        """Runs due now, taken for `lease` seconds: their due_at moves a lease ahead, so another
        engine leaves them alone until then, and takes them again if this one dies."""
        return await self.db.fetch(
            f"""
            WITH d AS (
                SELECT id FROM workflow_runs
                WHERE status IN {_ACTIVE} AND due_at <= now()
                ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED
            )
            UPDATE workflow_runs w SET due_at = now() + make_interval(secs => %s)
            FROM d WHERE w.id = d.id
            RETURNING {", ".join("w." + c.strip() for c in RUN_COLUMNS.split(","))}
            """,
            limit,
            lease,
        )

    async def write(
        self,
        run: Row,
        *,
        status: str,
        step_index: int,
        steps: list[dict[str, Any]],
        due_at: datetime | None,
        waiting_on: uuid.UUID | None = None,
        reason: str | None = None,
        merged_into: uuid.UUID | None = None,
    ) -> bool:
        """The run's new state, if nobody wrote it since `run` was read (revision); else False.
        A run that ends with a digest window still open (it failed: its version is gone) stops
        carrying it: the window is cancelled, so the next event of its key opens a new one
        rather than merging into a run that will never send."""
        count = await self.db.fetchval(
            f"""
            WITH r AS (
                UPDATE workflow_runs
                SET status = %s, step_index = %s, steps = %s, due_at = %s, waiting_on = %s,
                    reason = coalesce(%s, reason), merged_into = coalesce(%s, merged_into),
                    revision = revision + 1, updated_at = now()
                WHERE id = %s AND revision = %s AND status IN {_ACTIVE}
                RETURNING id, status
            ), windows AS (
                UPDATE workflow_digests SET status = 'cancelled', closed_at = clock_timestamp()
                WHERE carrier IN (SELECT id FROM r WHERE status NOT IN {_ACTIVE}) AND status = 'open'
            )
            SELECT count(*) FROM r
            """,
            status,
            step_index,
            Json(steps),
            due_at,
            waiting_on,
            reason,
            merged_into,
            run["id"],
            run["revision"],
        )
        return count == 1

    async def wait_for_notification(
        self,
        run: Row,
        step_index: int,
        steps: list[dict[str, Any]],
        notification_id: uuid.UUID,
        recheck: float,
    ) -> bool:
        """The run waits for its step's notification: due again at once if that notification is
        already final (read in the same statement), else after `recheck` seconds, in case the
        wake-up trigger fired between the engine's reading and this write."""
        count = await self.db.execute(
            f"""
            UPDATE workflow_runs
            SET status = 'waiting', step_index = %s, steps = %s, waiting_on = %s, revision = revision + 1,
                updated_at = now(),
                due_at = CASE WHEN EXISTS (
                    SELECT 1 FROM notifications WHERE id = %s
                      AND status IN ({sql_list(FINAL_STATUSES)}))
                  THEN now() ELSE now() + make_interval(secs => %s) END
            WHERE id = %s AND revision = %s AND status IN {_ACTIVE}
            """,
            step_index,
            Json(steps),
            notification_id,
            notification_id,
            recheck,
            run["id"],
            run["revision"],
        )
        return count == 1

    async def run(self, project_id: str, run_id: uuid.UUID) -> Row | None:
        return await self.db.fetchrow(
            f"SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = %s AND project_id = %s", run_id, project_id
        )

    async def notification_statuses(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, Row]:
        if not ids:
            return {}
        rows = await self.db.fetch(
            "SELECT id, status, error FROM notifications WHERE id = ANY(%s::uuid[])", [str(i) for i in ids]
        )
        return {row["id"]: row for row in rows}

    async def inbox_states(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, Row]:
        """When the in-app messages of these notifications were seen and read (none when not
        delivered yet): what `steps.<name>.read` and `.seen` see, read when a condition is
        evaluated, since a user reads long after delivery."""
        if not ids:
            return {}
        rows = await self.db.fetch(
            "SELECT notification_id, seen_at, read_at FROM inbox_messages"
            " WHERE notification_id = ANY(%s::uuid[])",
            [str(i) for i in ids],
        )
        return {row["notification_id"]: row for row in rows}

    async def runs_page(
        self,
        project_id: str,
        *,
        workflow_key: str | None,
        user_id: str | None,
        status: str | None,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        batch_id: uuid.UUID | None = None,
    ) -> tuple[list[Row], bool]:
        rows = await self.db.fetch(
            f"""
            SELECT {RUN_COLUMNS} FROM workflow_runs
            WHERE project_id = %s
              AND (%s::text IS NULL OR workflow_key = %s)
              AND (%s::text IS NULL OR user_id = %s)
              AND (%s::text IS NULL OR status = %s)
              AND (%s::uuid IS NULL OR batch_id = %s::uuid)
              AND (%s::timestamptz IS NULL OR (created_at, id) < (%s, %s::uuid))
            ORDER BY created_at DESC, id DESC LIMIT %s
            """,
            project_id,
            workflow_key,
            workflow_key,
            user_id,
            user_id,
            status,
            status,
            str(batch_id) if batch_id else None,
            str(batch_id) if batch_id else None,
            after[0] if after else None,
            after[0] if after else None,
            str(after[1]) if after else None,
            limit + 1,
        )
        return rows[:limit], len(rows) > limit

    async def cancel(
        self,
        project_id: str,
        *,
        reason: str,
        run_id: uuid.UUID | None = None,
        workflow_key: str | None = None,
        cancellation_key: str | None = None,
        user_id: str | None = None,
    ) -> list[Row]:
        """Every unfinished run chosen (one by `run_id`, or those of a workflow with a
        cancellation key, optionally of one user) stopped; its revision moves, so an engine
        holding one drops what it decided. The runs are returned with the notifications they
        made. Called with neither a run nor a cancellation key, it stops nothing."""
        if run_id is None and (workflow_key is None or cancellation_key is None):
            return []
        return await self.db.fetch(
            f"""
            WITH c AS (
            UPDATE workflow_runs
            SET status = 'cancelled', reason = %s, due_at = NULL,
                revision = revision + 1, updated_at = now(),
                steps = (SELECT coalesce(jsonb_agg(CASE WHEN s->>'status' IN ('pending', 'waiting')
                             THEN s || '{{"status": "cancelled", "reason": "run cancelled"}}'::jsonb
                             ELSE s END ORDER BY n), '[]'::jsonb)
                         FROM jsonb_array_elements(steps) WITH ORDINALITY AS t(s, n))
            WHERE project_id = %s AND status IN {_ACTIVE}
              AND (%s::uuid IS NULL OR id = %s::uuid)
              AND (%s::text IS NULL OR workflow_key = %s)
              AND (%s::text IS NULL OR cancellation_key = %s)
              AND (%s::text IS NULL OR user_id = %s)
            RETURNING id, steps
            ), windows AS (
                -- A window its carrier no longer carries: cancelled with it, so that the next
                -- event of its key opens a new one.
                UPDATE workflow_digests SET status = 'cancelled', closed_at = clock_timestamp()
                WHERE carrier IN (SELECT id FROM c) AND status = 'open'
            )
            SELECT id, steps FROM c
            """,
            reason,
            project_id,
            str(run_id) if run_id else None,
            str(run_id) if run_id else None,
            workflow_key,
            workflow_key,
            cancellation_key,
            cancellation_key,
            user_id,
            user_id,
        )


__all__ = ["NewRun", "WorkflowStore"]
