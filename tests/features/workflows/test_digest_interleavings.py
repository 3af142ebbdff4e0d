"""The digest window's store operations under interleavings, against the real PostgreSQL: runs of
a few keys join at random moments, their engines are killed mid-join (the task cancelled at a
random await, its transaction rolled back) and take the step up again, carriers close their
windows as they fall due, twice sometimes, and are killed mid-close too; seeded, so a failure
replays. What must hold: every event in exactly one window, a window's count at its close is the
count it ends with (nothing joins a window that has gone), the counts add up to the events, and
no two windows of a key are open at once. The throttle gets the same treatment."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from common.config import Config
from common.data import db
from common.features.workflows.digests import DigestStore, Window
from common.features.workflows.store import WorkflowStore

PROJECT = "digest-interleavings"
STEP = "digest"


@pytest.fixture
async def database(base_config: Config) -> Any:
    database = await db.connect(base_config.notifications_db_url, maxsize=20)
    await database.execute("DELETE FROM workflow_digests WHERE project_id = %s", PROJECT)
    await database.execute("DELETE FROM workflow_throttle_passes WHERE project_id = %s", PROJECT)
    yield database
    await database.close()


def _run(i: int, key: str) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "project_id": PROJECT,
        "workflow_key": "wf",
        "user_id": "user-1",
        "payload": {"n": i, "key": key},
    }


async def _killed_sometimes(rng: random.Random, work: Any) -> Any:
    """`work()` run to its end, or cancelled at a random moment (an engine SIGKILLed mid-step) and
    run again, as a run whose lease ran out is taken up again; its answer at the end."""
    while True:
        task = asyncio.ensure_future(work())
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0, 0.01))
            task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            await asyncio.sleep(rng.uniform(0, 0.02))


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("DIGEST_SEEDS", "1 2 3").split()])
async def test_joins_closes_and_crashes_keep_every_event_once(database: db.Database, seed: int) -> None:
    rng = random.Random(seed)
    store = DigestStore(database)
    keys = ["a", "b", "c"]
    runs = [_run(i, rng.choice(keys)) for i in range(150)]
    answers: dict[uuid.UUID, Window] = {}
    closed_with: dict[uuid.UUID, int] = {}
    stop = asyncio.Event()

    async def join(run: dict[str, Any]) -> None:
        await asyncio.sleep(rng.uniform(0, 1.0))
        closes_at = datetime.now(UTC) + timedelta(seconds=rng.uniform(0.05, 0.3))
        answers[run["id"]] = await _killed_sometimes(
            rng, lambda: store.join(run, STEP, run["payload"]["key"], closes_at, None)
        )

    async def carriers() -> None:
        """Each due window closed by its carrier, sometimes twice, sometimes killed mid-close."""
        while not stop.is_set():
            due = await database.fetch(
                "SELECT id FROM workflow_digests"
                " WHERE project_id = %s AND status = 'open' AND closes_at <= now()",
                PROJECT,
            )
            for row in due:
                held = await _killed_sometimes(rng, lambda row=row: store.close(row["id"], 1000))
                closed_with.setdefault(row["id"], held["count"])
                if rng.random() < 0.2:  # a second engine repeats the close: the same answer
                    again = await store.close(row["id"], 1000)
                    assert again["count"] == closed_with[row["id"]]
            await asyncio.sleep(rng.uniform(0, 0.03))

    closer = asyncio.create_task(carriers())
    await asyncio.gather(*(join(r) for r in runs))
    # The last windows fall due and close.
    for _ in range(200):
        if not await database.fetchval(
            "SELECT count(*) FROM workflow_digests WHERE project_id = %s AND status = 'open'", PROJECT
        ):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await closer

    windows = await database.fetch("SELECT * FROM workflow_digests WHERE project_id = %s", PROJECT)
    members = await database.fetch(
        "SELECT e.run_id, e.digest_id FROM workflow_digest_events e"
        " JOIN workflow_digests d ON d.id = e.digest_id WHERE d.project_id = %s",
        PROJECT,
    )
    by_window: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
    for m in members:
        by_window[m["digest_id"]].add(m["run_id"])
    # Every event in exactly one window, the one its join answered.
    assert sorted(m["run_id"] for m in members) == sorted(r["id"] for r in runs)
    for m in members:
        assert answers[m["run_id"]].id == m["digest_id"]
    for w in windows:
        assert w["status"] == "closed"
        # Nothing joined after the close: the count the carrier sent is the count it has.
        assert closed_with[w["id"]] == len(by_window[w["id"]]), w
        assert w["carrier"] in by_window[w["id"]]
        assert answers[w["carrier"]].carrier == w["carrier"]
    assert sum(closed_with.values()) == len(runs)
    # A key's windows follow one another: none opens before the one before it closed.
    for key in keys:
        mine = sorted((w for w in windows if w["digest_key"] == key), key=lambda w: w["opened_at"])
        for before, after in itertools.pairwise(mine):
            assert after["opened_at"] >= before["closed_at"], (before, after)


async def test_lookback_lets_a_quiet_key_go_at_once_and_digests_the_burst(database: db.Database) -> None:
    store = DigestStore(database)
    far = datetime.now(UTC) + timedelta(hours=1)
    first, second, third = (_run(i, "k") for i in range(3))
    alone = await store.join(first, STEP, "k", far, 60)
    assert alone.status == "closed" and alone.carrier == first["id"]  # nothing closed lately
    opened = await store.join(second, STEP, "k", far, 60)
    assert opened.status == "open" and opened.carrier == second["id"]  # a window closed a moment ago
    joined = await store.join(third, STEP, "k", far, 60)
    assert joined.id == opened.id and joined.carrier == second["id"]
    # A repeated step answers the same, and counts nothing twice.
    assert await store.join(third, STEP, "k", far, 60) == joined
    held = await store.close(opened.id, 1)
    assert held["count"] == 2 and held["events"] == [second["payload"]] and held["last"] == third["payload"]
    assert (await store.close(alone.id, 100))["events"] == [first["payload"]]


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_throttle_lets_exactly_its_limit_through_under_crashes(
    database: db.Database, seed: int
) -> None:
    rng = random.Random(seed)
    store = DigestStore(database)
    runs = [_run(i, "t") for i in range(40)]
    passed: dict[uuid.UUID, bool] = {}

    async def reach(run: dict[str, Any]) -> None:
        await asyncio.sleep(rng.uniform(0, 0.2))
        passed[run["id"]] = await _killed_sometimes(rng, lambda: store.throttle(run, "throttle", "t", 3, 60))
        if passed[run["id"]] and rng.random() < 0.5:  # the step repeated: it passes again, same place
            assert await store.throttle(run, "throttle", "t", 3, 60)

    await asyncio.gather(*(reach(r) for r in runs))
    assert sum(passed.values()) == 3
    assert (
        await database.fetchval(
            "SELECT count(*) FROM workflow_throttle_passes WHERE project_id = %s", PROJECT
        )
        == 3
    )
    # Another key has places of its own; an interval of the window later, so does this one.
    assert await store.throttle(_run(99, "u"), "throttle", "u", 3, 60)
    await database.execute(
        "UPDATE workflow_throttle_passes SET passed_at = passed_at - interval '61 seconds'"
        " WHERE project_id = %s AND throttle_key = 't'",
        PROJECT,
    )
    assert await store.throttle(_run(100, "t"), "throttle", "t", 3, 60)


async def test_a_carrier_that_fails_gives_up_its_window_and_the_next_event_opens_another(
    database: db.Database,
) -> None:
    store = DigestStore(database)
    runs = WorkflowStore(database)
    far = datetime.now(UTC) + timedelta(hours=1)
    carrier = _run(0, "k")
    await database.execute(
        "INSERT INTO workflow_runs (id, project_id, workflow_key, version, user_id, request_id, body_hash,"
        " status) VALUES (%s, %s, 'wf', 1, 'user-1', %s, 'h', 'waiting')",
        carrier["id"], PROJECT, str(carrier["id"]),
    )  # fmt: skip
    window = await store.join(carrier, STEP, "k", far, None)
    assert window.carrier == carrier["id"] and window.status == "open"
    row = await database.fetchrow("SELECT * FROM workflow_runs WHERE id = %s", carrier["id"])
    assert row is not None
    # Its version gone, the engine fails the run at the digest step.
    assert await runs.write(
        row, status="failed", step_index=0, steps=[], due_at=None, reason="workflow version is gone"
    )
    assert (
        await database.fetchval("SELECT status FROM workflow_digests WHERE id = %s", window.id) == "cancelled"
    )
    later = await store.join(_run(1, "k"), STEP, "k", far, None)
    assert later.id != window.id and later.status == "open" and later.carrier != carrier["id"]
    await database.execute("DELETE FROM workflow_runs WHERE project_id = %s", PROJECT)
