"""A workflow triggered for a topic: one run per subscriber as of the trigger, made in pages from
PostgreSQL, idempotent, and resumed by another gateway when the one fanning out is SIGKILLed."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from common.data import db
from tests.conftest import API_KEY, Stack
from tests.features.workflows.test_api import VARIABLES, put, trigger, wait_run
from tests.processes import ServiceProcess


async def _users(stack: Stack, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    for start in range(0, count, 1000):
        chunk = [{"id": u, "email": f"{u}@example.com", "name": u} for u in ids[start : start + 1000]]
        response = await stack.gateway.post(
            "/api/v1/users/bulk", json={"users": chunk}, headers=stack.headers()
        )
        assert response.status == 200, await response.text()
    return ids


async def _topic(stack: Stack, key: str, user_ids: list[str]) -> None:
    response = await stack.gateway.put(f"/api/v1/topics/{key}", json={"name": key}, headers=stack.headers())
    assert response.status in (200, 201), await response.text()
    for start in range(0, len(user_ids), 1000):
        response = await stack.gateway.post(
            f"/api/v1/topics/{key}/subscribers",
            json={"user_ids": user_ids[start : start + 1000]},
            headers=stack.headers(),
        )
        assert response.status == 200, await response.text()


async def _batch(stack: Stack, key: str, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = await stack.gateway.get(
            f"/api/v1/workflows/{key}/batches/{batch_id}", headers=stack.headers()
        )
        assert response.status == 200, await response.text()
        batch = (await response.json())["data"]
        if batch["status"] == "done":
            return batch
        assert time.monotonic() < deadline, f"the fan-out did not finish: {batch}"
        await asyncio.sleep(0.1)


async def test_a_topic_trigger_makes_one_run_per_subscriber_of_its_moment(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    tag = uuid.uuid4().hex[:8]
    users = await _users(stack, f"t{tag}", 1200)  # three pages of the fan-out
    topic = f"topic-{tag}"
    # A subscriber that is no user (the API subscribes only users: one left behind, written in
    # SQL): counted, no run.
    await _topic(stack, topic, users)
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        await notes.execute(
            "INSERT INTO topic_subscribers (client_id, topic_key, user_id) SELECT client_id, key, %s"
            " FROM topics WHERE key = %s",
            f"ghost-{tag}",
            topic,
        )
    finally:
        await notes.close()
    key = f"wf-topic-{tag}"
    status, body = await put(
        stack,
        key,
        {"name": "Digest", "steps": [{"name": "mail", "type": "email", "template_code": template["code"]}]},
    )
    assert status == 201, body

    status, body, headers = await trigger(stack, key, {"topic": topic}, request_id=f"topic-{tag}")
    assert status == 202, body
    batch_id = body["data"]["batch_id"]
    assert body["data"]["runs"] == [] and body["data"]["rejected"] == []
    # Subscribed after the trigger: not one of its recipients.
    late = (await _users(stack, f"late{tag}", 1))[0]
    await _topic(stack, topic, [late])

    batch = await _batch(stack, key, batch_id)
    assert batch["runs_made"] == 1200 and batch["subscribers_unknown"] == 1, batch

    runs: list[dict[str, Any]] = []
    after = None
    while True:
        query = f"/api/v1/workflow-runs/?batch_id={batch_id}&limit=100" + (f"&after={after}" if after else "")
        response = await stack.gateway.get(query, headers=stack.headers())
        assert response.status == 200, await response.text()
        page = await response.json()
        runs += page["data"]
        after = page["meta"]["next"]
        if not page["meta"]["has_next"]:
            break
    assert sorted(r["user_id"] for r in runs) == users
    assert {r["batch_id"] for r in runs} == {batch_id}

    # The same trigger again: the same fan-out, nothing more; another body under its request_id: 422.
    status, again, headers = await trigger(stack, key, {"topic": topic}, request_id=f"topic-{tag}")
    assert (
        status == 202 and again["data"]["batch_id"] == batch_id and headers["Idempotent-Replayed"] == "true"
    )
    status, conflict, _ = await trigger(
        stack, key, {"topic": topic}, request_id=f"topic-{tag}", payload={**VARIABLES, "x": 1}
    )
    assert status == 422, conflict
    status, missing, _ = await trigger(stack, key, {"topic": f"none-{tag}"})
    assert status == 404, missing
    status, bad, _ = await trigger(stack, key, {"topic": "no spaces", "extra": 1})
    assert status == 400 and "to" in bad["data"]["fields"], bad

    # Every run sends its one email.
    await wait_run(stack, runs[0]["run_id"], "completed", timeout=60)
    deadline = time.monotonic() + 90
    while len(set(stack.smtp.notification_ids())) < 1200:
        assert time.monotonic() < deadline, f"{len(set(stack.smtp.notification_ids()))} of 1200 emails"
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)
    assert all(n == 1 for n in Counter(stack.smtp.notification_ids()).values())


async def test_a_fan_out_whose_gateway_is_sigkilled_is_finished_by_another(
    stack_factory: Any, tmp_path: Path
) -> None:
    stack: Stack = await stack_factory()  # its gateway survives and takes the fan-out over
    tag = uuid.uuid4().hex[:8]
    users = await _users(stack, f"k{tag}", 3000)
    topic = f"topic-{tag}"
    await _topic(stack, topic, users)
    key = f"wf-kill-{tag}"
    # The runs wait an hour: the test counts runs made, not emails.
    status, body = await put(stack, key, {"name": "Later", "steps": [{"type": "delay", "duration": 3600}]})
    assert status == 201, body
    doomed = ServiceProcess("gateway.py", stack.config, tmp_path / "doomed.log")
    await doomed.start()
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            trigger_body = {"to": {"topic": topic}, "payload": {}, "request_id": f"kill-{tag}"}
            async with session.post(
                f"{doomed.url}/api/v1/workflows/{key}/trigger", json=trigger_body
            ) as response:
                assert response.status == 202, await response.text()
                batch_id = (await response.json())["data"]["batch_id"]
        deadline = time.monotonic() + 20
        while not await database.fetchval("SELECT count(*) FROM workflow_runs WHERE batch_id = %s", batch_id):
            assert time.monotonic() < deadline, "no run was made"
            await asyncio.sleep(0.01)
        doomed.signal(signal.SIGKILL)  # mid fan-out: its lease holds the rest for a while
        await doomed.wait(10)
        await _batch(stack, key, batch_id, timeout=60)
        rows = await database.fetch("SELECT user_id FROM workflow_runs WHERE batch_id = %s", batch_id)
    finally:
        await database.close()
        doomed.stop()
    made = Counter(r["user_id"] for r in rows)
    assert sorted(made) == users and set(made.values()) == {1}
