"""A status store that can run for years: notifications older than RETENTION_DAYS go by whole
monthly partitions, newer ones stay, and the notification endpoints answer throughout;
idempotency stays exact across partitions; lists page by keyset."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from common.config import Config
from common.data import db, retention
from tests.conftest import Stack
from tests.test_faults import send_many, wait_delivered


async def _backdate(database: db.Database, ids: list[str], days: int) -> None:
    """Move notifications (with their keys and history) `days` into the past, partitions and all."""
    past = datetime.now(UTC) - timedelta(days=days + 1)
    for parent in retention.PARENTS:
        await database.fetchval("SELECT notify_ensure_partitions(%s, %s, now())", parent, past)
    shift = f"created_at - interval '{days} days'"
    for table, column in (
        ("notifications", "id"),
        ("notification_keys", "notification_id"),
        ("notification_events", "notification_id"),
    ):
        await database.execute(
            f"UPDATE {table} SET created_at = {shift} WHERE {column} = ANY(%s::uuid[])", ids
        )


async def _partition_of(database: db.Database, parent: str, notification_id: str) -> str | None:
    return await database.fetchval(
        f"SELECT tableoid::regclass::text FROM {parent} WHERE id = %s", notification_id
    )


async def test_old_notifications_go_by_partition_newer_stay_endpoints_answer(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(retention_days=90)
    database = await db.connect(stack.config.notifications_db_url, maxsize=2)
    try:
        # Made ahead by the services' upkeep at start: this month and the next three.
        names = [name for name, _, _ in await retention.partitions(database, "notifications")]
        ahead = (datetime.now(UTC).replace(day=1) + timedelta(days=31 * retention.MONTHS_AHEAD)).strftime(
            "%Y_%m"
        )
        assert f"notifications_p{ahead}" in names, names

        user = await stack.create_user()
        code = (await stack.create_template())["code"]
        old = await send_many(stack, user["id"], code, 6)
        unfinished = await send_many(stack, user["id"], code, 1)
        month_old = await send_many(stack, user["id"], code, 4)
        new = await send_many(stack, user["id"], code, 4)
        await wait_delivered(stack, user["id"], 15, timeout=30)
        await _backdate(database, old, 200)
        await _backdate(database, unfinished, 300)
        # Not final (scheduled far ahead, say): its whole month stays until it is.
        await database.execute(
            "UPDATE notifications SET status = 'retrying', updated_at = now() WHERE id = %s", unfinished[0]
        )
        await _backdate(database, month_old, 30)
        old_partition = await _partition_of(database, "notifications", old[0])
        kept_partition = await _partition_of(database, "notifications", unfinished[0])
        assert old_partition and kept_partition and old_partition != kept_partition

        answers: list[int] = []
        stop = asyncio.Event()

        async def keep_reading() -> None:
            # The endpoints, all the while: the newer notifications, a list, an idempotent replay.
            while not stop.is_set():
                for notification_id in (month_old[0], new[0]):
                    response = await stack.gateway.get(
                        f"/api/v1/notifications/{notification_id}", headers=stack.headers()
                    )
                    answers.append(response.status)
                response = await stack.gateway.get(
                    f"/api/v1/notifications/?user_id={user['id']}&limit=5", headers=stack.headers()
                )
                answers.append(response.status)

        reader = asyncio.create_task(keep_reading())
        await asyncio.sleep(0.2)
        done = await retention.upkeep(database, retention_days=90)
        await asyncio.sleep(0.2)
        stop.set()
        await reader

        assert answers and set(answers) == {200}, answers
        assert old_partition in done.dropped and kept_partition in done.kept
        remaining = [name for name, _, _ in await retention.partitions(database, "notifications")]
        assert old_partition not in remaining and kept_partition in remaining
        for notification_id in old:
            response = await stack.gateway.get(
                f"/api/v1/notifications/{notification_id}", headers=stack.headers()
            )
            assert response.status == 404
        assert not await database.fetchval(
            "SELECT count(*) FROM notification_keys WHERE notification_id = ANY(%s::uuid[])", old
        )
        assert not await database.fetchval(
            "SELECT count(*) FROM notification_events WHERE notification_id = ANY(%s::uuid[])", old
        )
        for notification_id in [*unfinished, *month_old, *new]:
            record = await stack.notification(notification_id)
            assert record["history"], record
        # Nothing deleted row by row in what stays: the newer partitions saw no deletes.
        month_old_partition = await _partition_of(database, "notifications", month_old[0])
        deletes = await database.fetchval(
            "SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = %s", month_old_partition
        )
        assert not deletes
    finally:
        await database.close()


async def test_a_request_id_replays_exactly_across_partitions(stack_factory: Any) -> None:
    """Idempotency stays exact with the keys in a table of their own: a replay finds the original
    wherever its partition is; a different body is a conflict."""
    stack: Stack = await stack_factory()
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    body = {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": code,
        "variables": {"name": "N", "link": "l"},
        "request_id": str(uuid.uuid4()),
    }
    status, first, _ = await stack.send(body)
    assert status == 202
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        await _backdate(database, [first["data"]["notification_id"]], 45)
    finally:
        await database.close()
    status, again, headers = await stack.send(body)
    assert status == 202 and headers.get("Idempotent-Replayed") == "true"
    assert again["data"]["notification_id"] == first["data"]["notification_id"]
    status, conflict, _ = await stack.send({**body, "variables": {"name": "Other", "link": "l"}})
    assert status == 422 and conflict["error"] == "idempotency_conflict"


async def test_keyset_pages_return_every_row_once_while_new_ones_arrive(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    # Accepted together: group commit gives many of them the same created_at, the id breaks ties.
    existing = await send_many(stack, user["id"], code, 45, concurrency=15)
    arriving = asyncio.create_task(send_many(stack, user["id"], code, 40, concurrency=2))

    seen: list[str] = []
    query = f"/api/v1/notifications/?user_id={user['id']}&limit=7"
    response = await stack.gateway.get(query, headers=stack.headers())
    body = await response.json()
    assert response.status == 200, body
    while True:
        seen += [row["notification_id"] for row in body["data"]]
        await asyncio.sleep(0.05)  # new notifications land between pages
        cursor = body["meta"]["next"]
        if cursor is None:
            break
        response = await stack.gateway.get(f"{query}&after={cursor}", headers=stack.headers())
        body = await response.json()
        assert response.status == 200, body
        assert body["meta"]["page"] is None
    await arriving
    assert len(seen) == len(set(seen)), "a row came twice"
    assert set(existing) <= set(seen), "a row was skipped"
    # Newest first throughout, in the list's own order.
    first = await stack.gateway.get(
        f"/api/v1/notifications/?user_id={user['id']}&limit=100", headers=stack.headers()
    )
    order = [row["notification_id"] for row in (await first.json())["data"]]
    assert [i for i in order if i in set(seen)] == seen

    response = await stack.gateway.get(f"{query}&after=not-a-cursor", headers=stack.headers())
    body = await response.json()
    assert response.status == 400 and "after" in body["data"]["fields"], body


async def test_finished_workflow_state_past_retention_is_purged_the_rest_kept(base_config: Config) -> None:
    # No stack: a gateway's own upkeep round would purge some of these rows first and the count
    # returned here would be short.
    database = await db.connect(base_config.notifications_db_url, maxsize=2)
    project = f"purge-{uuid.uuid4().hex[:8]}"
    old, fresh, waiting = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        for run_id, status, age in (
            (old, "completed", 100),
            (fresh, "completed", 1),
            (waiting, "waiting", 100),
        ):
            await database.execute(
                "INSERT INTO workflow_runs (id, project_id, workflow_key, version, user_id, request_id,"
                " body_hash, status, updated_at) VALUES (%s, %s, 'wf', 1, 'u', %s, 'h', %s,"
                " now() - make_interval(days => %s))",
                run_id, project, str(run_id), status, age,
            )  # fmt: skip
        for digest_id, status, age in ((old, "closed", 100), (fresh, "closed", 1), (waiting, "open", 100)):
            await database.execute(
                "INSERT INTO workflow_digests (id, project_id, workflow_key, user_id, step, digest_key,"
                " carrier, status, closes_at, closed_at) VALUES (%s, %s, 'wf', 'u', 'd', %s, %s, %s, now(),"
                " CASE WHEN %s = 'open' THEN NULL ELSE now() - make_interval(days => %s) END)",
                digest_id, project, str(digest_id), digest_id, status, status, age,
            )  # fmt: skip
            await database.execute(
                "INSERT INTO workflow_digest_events (run_id, step, digest_id, payload, occurred_at)"
                " VALUES (%s, 'd', %s, '{}', now())",
                digest_id, digest_id,
            )  # fmt: skip
        for run_id, age in ((old, 40), (fresh, 1)):
            await database.execute(
                "INSERT INTO workflow_throttle_passes (run_id, step, project_id, workflow_key, user_id,"
                " throttle_key, passed_at)"
                " VALUES (%s, 't', %s, 'wf', 'u', '', now() - make_interval(days => %s))",
                run_id, project, age,
            )  # fmt: skip
        assert (
            await retention.purge_finished(database, 90) >= 3
        )  # a run, a window (its events go with it), a place
        for table, column in (
            ("workflow_runs", "id"),
            ("workflow_digests", "id"),
            ("workflow_digest_events", "run_id"),
            ("workflow_throttle_passes", "run_id"),
        ):
            left = {
                r[column]
                for r in await database.fetch(
                    f"SELECT {column} FROM {table} WHERE {column} = ANY(%s::uuid[])",
                    [str(old), str(fresh), str(waiting)],
                )
            }
            expected = {fresh} if table == "workflow_throttle_passes" else {fresh, waiting}
            assert left == expected, (table, left)
    finally:
        await database.close()


async def test_one_far_future_notification_keeps_its_month_but_not_its_neighbours(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(retention_days=90)
    database = await db.connect(stack.config.notifications_db_url, maxsize=2)
    try:
        user = await stack.create_user()
        code = (await stack.create_template())["code"]
        neighbours = await send_many(stack, user["id"], code, 5)
        scheduled = await send_many(stack, user["id"], code, 1)
        await wait_delivered(stack, user["id"], 6, timeout=30)
        await _backdate(database, [*neighbours, *scheduled], 200)
        await database.execute(
            "UPDATE notifications SET status = 'scheduled', updated_at = now() WHERE id = %s", scheduled[0]
        )
        month = await _partition_of(database, "notifications", scheduled[0])
        assert month == await _partition_of(database, "notifications", neighbours[0])

        done = await retention.upkeep(database, retention_days=90)

        assert month in done.kept and done.purged >= len(neighbours)
        for notification_id in neighbours:
            response = await stack.gateway.get(
                f"/api/v1/notifications/{notification_id}", headers=stack.headers()
            )
            assert response.status == 404
        for table in ("notification_keys", "notification_events"):
            assert not await database.fetchval(
                f"SELECT count(*) FROM {table} WHERE notification_id = ANY(%s::uuid[])", neighbours
            ), table
        record = await stack.notification(scheduled[0])
        assert record["status"] == "scheduled" and record["history"], record
        assert await database.fetchval(
            "SELECT count(*) FROM notification_keys WHERE notification_id = %s", scheduled[0]
        )
    finally:
        await database.close()


async def test_webhook_deliveries_batches_and_fanouts_past_retention_are_purged(base_config: Config) -> None:
    database = await db.connect(base_config.notifications_db_url, maxsize=2)
    client = f"purge-{uuid.uuid4().hex[:8]}"
    endpoint = uuid.uuid4()
    try:
        await database.execute(
            "INSERT INTO webhook_endpoints (id, client_id, url, events, secret)"
            " VALUES (%s, %s, 'https://example.com/h', ARRAY['notification.delivered'], 'whsec_x')",
            endpoint, client,
        )  # fmt: skip
        deliveries = {}
        for name, status, age in (
            ("old", "delivered", 100),
            ("fresh", "delivered", 1),
            ("open", "retrying", 100),
        ):
            deliveries[name] = uuid.uuid4()
            await database.execute(
                "INSERT INTO webhook_deliveries (id, endpoint_id, client_id, event_id, event_type, payload,"
                " status, publish_pending, updated_at)"
                " VALUES (%s, %s, %s, %s, 'notification.delivered', '{}', %s, false,"
                " now() - make_interval(days => %s))",
                deliveries[name], endpoint, client, uuid.uuid4(), status, age,
            )  # fmt: skip
            await database.execute(
                "INSERT INTO webhook_attempts (delivery_id, attempt, status_code) VALUES (%s, 1, 200)",
                deliveries[name],
            )
        batches = {}
        for name, kind, fanned, age in (
            ("old", "bulk", False, 100),
            ("fresh", "bulk", False, 1),
            ("fanning", "topic", False, 100),  # a topic fan-out not over yet
            ("fanned", "topic", True, 100),
        ):
            batches[name] = uuid.uuid4()
            await database.execute(
                "INSERT INTO batches (id, client_id, request_id, body_hash, kind, fanned_out_at, updated_at)"
                " VALUES (%s, %s, %s, 'h', %s, CASE WHEN %s THEN now() END,"
                " now() - make_interval(days => %s))",
                batches[name], client, name, kind, fanned, age,
            )  # fmt: skip
        fanouts = {}
        for name, done_age in (("old", 100), ("fresh", 1), ("running", None)):
            fanouts[name] = uuid.uuid4()
            await database.execute(
                "INSERT INTO workflow_fanouts (id, project_id, workflow_key, version, topic_key, request_id,"
                " body_hash, done_at) VALUES (%s, %s, 'wf', 1, 't', %s, 'h',"
                " now() - make_interval(days => %s))",
                fanouts[name], client, name, done_age,
            )  # fmt: skip

        assert await retention.purge_finished(database, 90) >= 4

        async def left(table: str, ids: dict[str, uuid.UUID]) -> set[str]:
            rows = await database.fetch(
                f"SELECT id FROM {table} WHERE id = ANY(%s::uuid[])", list(ids.values())
            )
            found = {r["id"] for r in rows}
            return {name for name, i in ids.items() if i in found}

        assert await left("webhook_deliveries", deliveries) == {"fresh", "open"}
        assert not await database.fetchval(
            "SELECT count(*) FROM webhook_attempts WHERE delivery_id = %s", deliveries["old"]
        )
        assert await left("batches", batches) == {"fresh", "fanning"}
        assert await left("workflow_fanouts", fanouts) == {"fresh", "running"}
    finally:
        await database.execute("DELETE FROM webhook_endpoints WHERE id = %s", endpoint)
        await database.execute("DELETE FROM batches WHERE client_id = %s", client)
        await database.execute("DELETE FROM workflow_fanouts WHERE project_id = %s", client)
        await database.close()
