"""The engine's state machine under interleavings, against the real PostgreSQL: several engines
share due runs, are killed mid-round (their task cancelled at a random await), leases run out,
notifications go final at random moments, runs are cancelled; seeded, so a failure replays.

The sender here writes a notification row with the key the engine derives (as the gateway's does,
through notification_keys), and a "worker" task moves them to final statuses, which the wake-up
trigger turns into due runs: what is checked is the engine, its store and the trigger."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from typing import Any

import pytest

from common.config import Config
from common.data import db
from common.data.db import Row
from common.features.workflows.definition import Definition, Step, parse
from common.features.workflows.engine import Engine, StepFailed
from common.features.workflows.steps import initial_states, notification_key
from common.features.workflows.store import NewRun, WorkflowStore

PROJECT = "interleavings"


class TableSender:
    """Makes a step's notification as the gateway does: its key first, only a new key gets a row."""

    def __init__(self, database: db.Database) -> None:
        self.db = database
        self.made: Counter[tuple[str, str]] = Counter()
        self.cancelled: list[uuid.UUID] = []

    async def send(
        self, run: Row, step: Step, definition: Definition, digest: dict[str, Any] | None = None
    ) -> Row:
        if run["payload"].get("erased"):
            raise StepFailed("user not found (erased)")
        notification_id, request_id = notification_key(run["id"], step)
        async with self.db.transaction() as tx:
            key = await tx.fetchrow(
                """INSERT INTO notification_keys (client_id, request_id, notification_id, created_at)
                   VALUES (%s, %s, %s, now()) ON CONFLICT DO NOTHING RETURNING created_at""",
                PROJECT,
                request_id,
                notification_id,
            )
            if key is not None:
                await tx.execute(
                    """INSERT INTO notifications (id, client_id, request_id, body_hash, user_id,
                           notification_type, template_code, status, correlation_id, workflow_run_id,
                           step, created_at)
                       VALUES (%s, %s, %s, '', %s, %s, 't', 'pending', 'c', %s, %s, %s)""",
                    notification_id,
                    PROJECT,
                    request_id,
                    str(uuid.uuid4()),
                    step.type,
                    run["id"],
                    step.name,
                    key["created_at"],
                )
                self.made[(str(run["id"]), step.name)] += 1
        row = await self.db.fetchrow(
            "SELECT id, status, error FROM notifications WHERE id = %s", notification_id
        )
        assert row is not None
        return row

    async def cancel(self, project_id: str, notification_id: uuid.UUID) -> None:
        self.cancelled.append(notification_id)
        await self.db.execute(
            "UPDATE notifications SET status = 'cancelled' WHERE id = %s AND status = 'pending'",
            notification_id,
        )


@pytest.fixture
async def database(base_config: Config) -> Any:
    database = await db.connect(base_config.notifications_db_url, maxsize=20)
    await database.execute("DELETE FROM workflow_runs WHERE project_id = %s", PROJECT)
    await database.execute("DELETE FROM workflows WHERE project_id = %s", PROJECT)
    await database.execute("DELETE FROM notification_keys WHERE client_id = %s", PROJECT)
    await database.execute("DELETE FROM notifications WHERE client_id = %s", PROJECT)
    yield database
    await database.close()


async def _worker(database: db.Database, rng: random.Random, stop: asyncio.Event) -> None:
    """Moves pending notifications of this project to a final status, a few at a time."""
    while not stop.is_set():
        rows = await database.fetch(
            "SELECT id, step FROM notifications WHERE client_id = %s AND status = 'pending' LIMIT 20", PROJECT
        )
        for row in rows:
            status = "failed" if row["step"] == "push" and rng.random() < 0.5 else "delivered"
            await database.execute("UPDATE notifications SET status = %s WHERE id = %s", status, row["id"])
        await asyncio.sleep(rng.uniform(0.005, 0.05))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_run_completes_and_every_step_makes_one_notification(
    database: db.Database, seed: int
) -> None:
    rng = random.Random(seed)
    definition, errors = parse(
        {
            "name": "interleavings",
            "steps": [
                {"name": "push", "type": "push", "template_code": "p"},
                {"name": "wait", "type": "delay", "duration": 0.2},
                {
                    "name": "email",
                    "type": "email",
                    "template_code": "e",
                    "if": "steps.push.status != 'delivered'",
                },
                {"name": "vip", "type": "email", "template_code": "v", "if": "payload.vip"},
            ],
        }
    )
    assert definition is not None, errors
    store = WorkflowStore(database)
    version, _ = await store.put(PROJECT, "wf", definition)
    runs = [
        NewRun(
            id=uuid.uuid4(),
            project_id=PROJECT,
            workflow_key="wf",
            version=version,
            user_id=f"user-{i}",
            request_id="r",
            body_hash="h",
            cancellation_key=f"c{i % 10}",
            payload={"vip": i % 3 == 0, "erased": i % 17 == 0},
            recipient={"id": f"user-{i}"},
            steps=initial_states(definition),
            correlation_id="c",
        )
        for i in range(80)
    ]
    await store.create_runs(runs)
    sender = TableSender(database)
    stop = asyncio.Event()
    worker = asyncio.create_task(_worker(database, rng, stop))

    async def engine_life() -> None:
        """An engine that is killed (its task cancelled) at a random moment, then replaced."""
        while not stop.is_set():
            engine = Engine(store, sender, batch=rng.choice([5, 20, 50]), lease=0.5, recheck=0.3)
            life = asyncio.create_task(engine.loop(stop, 0.02))
            await asyncio.sleep(rng.uniform(0.01, 0.4))
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)

    engines = [asyncio.create_task(engine_life()) for _ in range(3)]
    await asyncio.sleep(0.3)
    cancelled = await store.cancel(PROJECT, reason="by key", workflow_key="wf", cancellation_key="c7")
    await asyncio.sleep(rng.uniform(0, 0.2))
    # One run stopped on its own, as the console does, while engines hold it or not.
    cancelled += await store.cancel(PROJECT, reason="in the console", run_id=runs[rng.randrange(80)].id)
    # Neither a run nor a key chosen: nothing stops.
    assert await store.cancel(PROJECT, reason="nothing", workflow_key="wf") == []
    try:
        for _ in range(600):
            left = await database.fetchval(
                "SELECT count(*) FROM workflow_runs"
                " WHERE project_id = %s AND status IN ('running', 'waiting')",
                PROJECT,
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0, f"{left} runs unfinished"
    finally:
        stop.set()
        await asyncio.gather(worker, *engines, return_exceptions=True)

    assert all(n == 1 for n in sender.made.values()), [k for k, n in sender.made.items() if n > 1]
    rows = await database.fetch("SELECT * FROM workflow_runs WHERE project_id = %s", PROJECT)
    cancelled_ids = {r["id"] for r in cancelled}
    made = await database.fetch(
        "SELECT workflow_run_id, step, status FROM notifications WHERE client_id = %s", PROJECT
    )
    by_run: dict[uuid.UUID, dict[str, str]] = {}
    for n in made:
        by_run.setdefault(n["workflow_run_id"], {})[n["step"]] = n["status"]
    for run in rows:
        if run["id"] in cancelled_ids:
            assert run["status"] == "cancelled"
            continue
        assert run["status"] == "completed", run
        states = {s["name"]: s for s in run["steps"]}
        sent = by_run.get(run["id"], {})
        if run["payload"]["erased"]:
            assert sent == {} and states["push"]["status"] == "failed", run
            continue
        # The push step's notification and the step agree; the fallback ran exactly when it failed.
        assert states["push"]["notification_status"] == sent["push"]
        assert ("email" in sent) == (sent["push"] != "delivered"), (sent, states)
        assert ("vip" in sent) == run["payload"]["vip"], (sent, states)
        assert states["wait"]["status"] == "completed"
        for name, status in sent.items():
            assert states[name]["notification_status"] == status
    # Every notification the engines made belongs to a step that says so.
    assert sum(len(v) for v in by_run.values()) == len(sender.made)


async def test_a_run_keeps_its_version_and_a_missing_one_fails_the_run(database: db.Database) -> None:
    store = WorkflowStore(database)
    first, _ = parse({"name": "v1", "steps": [{"type": "delay", "duration": 1}]})
    second, _ = parse({"name": "v2", "steps": [{"type": "email", "template_code": "x"}]})
    assert first and second
    v1, created = await store.put(PROJECT, "versions", first)
    v2, created_again = await store.put(PROJECT, "versions", second)
    assert (v1, created, v2, created_again) == (1, True, 2, False)
    assert await store.definition(PROJECT, "versions", 1) == first
    assert await store.activate(PROJECT, "versions", 1) and not await store.activate(PROJECT, "versions", 9)
    current = await store.get(PROJECT, "versions")
    assert current is not None and current["version"] == 1 and current["latest_version"] == 2
