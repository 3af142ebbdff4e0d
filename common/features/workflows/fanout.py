"""A workflow triggered for a topic: one run per subscriber, made page by page from PostgreSQL.

The trigger stores one `workflow_fanouts` row (idempotent per project, workflow and request_id)
and answers 202 with its id as `batch_id`; no subscriber is read in the request. A fan-out round
takes one unfinished fan-out with `FOR UPDATE SKIP LOCKED`, pushing its `due_at` a lease ahead
(several gateways share them, and one whose gateway died is due again), reads a page of the
topic's subscribers as of the trigger (by user_id after its cursor), looks up their profiles,
makes their runs (`WorkflowStore.create_runs`: the runs' unique key makes a page done twice make
nothing twice), and moves the cursor, or marks the fan-out done after the last page. Runs are
then the engine's, like any other; back-pressure is the engine's own pace, since runs wait as rows.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from common.background import sleep
from common.data import topics
from common.data.db import Database, Json, Row
from common.features.workflows.steps import initial_states
from common.features.workflows.store import NewRun, WorkflowStore
from common.logs import project_var
from common.lookups.cache import profiles
from common.lookups.clients import ServiceClient
from common.sending.decision import recipient_of

log = logging.getLogger("workflows.fanout")

PAGE = 500  # subscribers per page: one profile lookup and one insert of runs
LEASE = 10.0  # seconds a gateway holds a fan-out it took (a page takes well under one); a
# stale holder that wakes late only redoes a page, which makes nothing twice

_COLUMNS = (
    "id, project_id, workflow_key, version, topic_key, request_id, body_hash, cancellation_key, "
    "payload, correlation_id, cursor, runs, rejected, done_at, created_at, updated_at"
)


class FanoutStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, row: dict[str, Any]) -> tuple[Row, bool]:
        """The fan-out stored, or the one stored before under the same request_id (`created` says)."""
        found = await self.db.fetchrow(
            f"""
            WITH ins AS (
                INSERT INTO workflow_fanouts (id, project_id, workflow_key, version, topic_key,
                    request_id, body_hash, cancellation_key, payload, correlation_id)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (project_id, workflow_key, request_id) DO NOTHING
                RETURNING {_COLUMNS}
            )
            SELECT *, true AS created FROM ins
            UNION ALL
            SELECT {_COLUMNS}, false AS created FROM workflow_fanouts
            WHERE project_id = %s AND workflow_key = %s AND request_id = %s
              AND NOT EXISTS (SELECT 1 FROM ins)
            """,
            str(row["id"]), row["project_id"], row["workflow_key"], row["version"], row["topic_key"],
            row["request_id"], row["body_hash"], row["cancellation_key"], Json(row["payload"]),
            row["correlation_id"], row["project_id"], row["workflow_key"], row["request_id"],
        )  # fmt: skip
        assert found is not None
        return found, bool(found["created"])

    async def take(self, lease: float) -> Row | None:
        return await self.db.fetchrow(
            f"""
            WITH d AS (
                SELECT id FROM workflow_fanouts WHERE done_at IS NULL AND due_at <= now()
                ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED
            )
            UPDATE workflow_fanouts f SET due_at = now() + make_interval(secs => %s)
            FROM d WHERE f.id = d.id
            RETURNING {", ".join("f." + c.strip() for c in _COLUMNS.split(","))}
            """,
            lease,
        )

    async def advance(self, fanout_id: uuid.UUID, cursor: str, runs: int, rejected: int, done: bool) -> None:
        """A page done: the cursor moved, the counts added; due again at once unless done."""
        await self.db.execute(
            """
            UPDATE workflow_fanouts SET cursor = %s, runs = runs + %s, rejected = rejected + %s,
                done_at = CASE WHEN %s THEN now() END, due_at = CASE WHEN %s THEN NULL ELSE now() END,
                updated_at = now()
            WHERE id = %s
            """,
            cursor, runs, rejected, done, done, str(fanout_id),
        )  # fmt: skip

    async def finish(self, fanout_id: uuid.UUID) -> None:
        await self.db.execute(
            "UPDATE workflow_fanouts SET done_at = now(), due_at = NULL, updated_at = now() WHERE id = %s",
            str(fanout_id),
        )

    async def get(self, project_id: str, fanout_id: uuid.UUID) -> Row | None:
        return await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM workflow_fanouts WHERE project_id = %s AND id = %s",
            project_id,
            str(fanout_id),
        )


class TopicFanout:
    def __init__(
        self,
        fanouts: FanoutStore,
        workflows: WorkflowStore,
        redis: aioredis.Redis,
        users: ServiceClient,
        on_runs: Callable[[], None],
        *,
        page: int = PAGE,
        lease: float = LEASE,
    ) -> None:
        self.fanouts = fanouts
        self.workflows = workflows
        self.redis = redis
        self.users = users
        self.on_runs = on_runs
        self.page = page
        self.lease = lease
        self.wake = asyncio.Event()

    async def round(self) -> bool:
        """One page of one due fan-out; False when none was due."""
        fanout = await self.fanouts.take(self.lease)
        if fanout is None:
            return False
        project = fanout["project_id"]
        definition = await self.workflows.definition(project, fanout["workflow_key"], fanout["version"])
        if definition is None:  # the workflow was deleted since: nothing to run
            await self.fanouts.finish(fanout["id"])
            return True
        page = await topics.subscribers(
            self.workflows.db,
            project,
            fanout["topic_key"],
            after=fanout["cursor"],
            limit=self.page,
            as_of=fanout["created_at"],
        )
        if not page:
            await self.fanouts.finish(fanout["id"])
            return True
        user_ids = [str(r["user_id"]) for r in page]
        token = project_var.set(project)  # the profile lookups are that project's users
        try:
            known = await profiles(self.redis, self.users, user_ids)
        finally:
            project_var.reset(token)
        steps = initial_states(definition)
        runs = [
            NewRun(
                id=uuid.uuid4(),
                project_id=project,
                workflow_key=fanout["workflow_key"],
                version=int(fanout["version"]),
                user_id=user_id,
                request_id=fanout["request_id"],
                body_hash=fanout["body_hash"],
                cancellation_key=fanout["cancellation_key"],
                payload=fanout["payload"],
                recipient=recipient_of(user_id, known[user_id]),
                steps=steps,
                correlation_id=fanout["correlation_id"] or uuid.uuid4().hex,
                batch_id=fanout["id"],
            )
            for user_id in user_ids
            if user_id in known
        ]
        made = await self.workflows.create_runs(runs)
        created = sum(1 for row in made if row["created"])
        await self.fanouts.advance(
            fanout["id"], user_ids[-1], created, len(user_ids) - len(runs), len(page) < self.page
        )
        if created:
            self.on_runs()
        return True

    async def loop(self, stopping: asyncio.Event, interval: float) -> None:
        """Pages while there are due fan-outs; then after `interval` seconds or a trigger's wake-up."""
        while not stopping.is_set():
            busy = False
            try:
                busy = await self.round()
            except Exception as exc:  # noqa: BLE001 - the fan-out is due again when its lease ends
                log.warning("workflow fan-out round failed: %s: %s", type(exc).__name__, exc)
            if busy:
                continue
            await _wait(self.wake, lambda: sleep(stopping, interval))


async def _wait(wake: asyncio.Event, sleeping: Callable[[], Awaitable[None]]) -> None:
    wake.clear()
    waker = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({waker, asyncio.ensure_future(sleeping())}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waker.cancel()
