"""Erasure, against the real stack: after `DELETE /api/v1/users/{id}` no row of the
notifications database holds the person's name, address or variables; ids, statuses and
timestamps stay."""

from __future__ import annotations

import uuid
from typing import Any

from common.data import db
from tests.conftest import Stack


async def _rows_mentioning(stack: Stack, *needles: str) -> list[str]:
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        found = []
        for table in ("notifications", "notification_events", "webhook_deliveries", "topic_subscribers"):
            for needle in needles:
                rows = await database.fetch(
                    f"SELECT 1 FROM {table} AS t WHERE t::text ILIKE %s", f"%{needle}%"
                )
                if rows:
                    found.append(f"{table}: {needle}")
        return found
    finally:
        await database.close()


async def test_erasure_leaves_no_trace_of_the_person_and_keeps_the_record(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    secret_name = f"Secretname{uuid.uuid4().hex[:8]}"
    user = await stack.create_user(name=secret_name)
    template = await stack.create_template()
    topic = f"erasure-{uuid.uuid4().hex[:8]}"
    assert (
        await stack.gateway.put(f"/api/v1/topics/{topic}", json={"name": "T"}, headers=stack.headers())
    ).status == 201
    added = await stack.gateway.post(
        f"/api/v1/topics/{topic}/subscribers", json={"user_ids": [user["id"]]}, headers=stack.headers()
    )
    assert added.status == 200
    status, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": secret_name, "link": "https://example.com/private"},
            "metadata": {"note": secret_name},
            "request_id": f"erase-{uuid.uuid4()}",
        }
    )
    assert status == 202
    nid = body["data"]["notification_id"]
    await stack.wait_for(nid, "delivered")
    assert await _rows_mentioning(stack, secret_name, user["email"])

    erased = await stack.gateway.delete(f"/api/v1/users/{user['id']}", headers=stack.headers())
    assert erased.status == 200, await erased.text()

    assert await _rows_mentioning(stack, secret_name, user["email"], "example.com/private") == []
    record = await stack.notification(nid)
    assert (
        record["status"] == "delivered"
        and record["notification_id"] == nid
        and record["user_id"] == user["id"]
    )
    assert record["variables"] == {} and record["metadata"] == {}
    gone = await stack.gateway.get(f"/api/v1/users/{user['id']}", headers=stack.headers())
    assert gone.status == 404
    subscribers = await (
        await stack.gateway.get(f"/api/v1/topics/{topic}/subscribers", headers=stack.headers())
    ).json()
    assert subscribers["data"] == []
    # A notification to the erased id is refused like one to an unknown user.
    status, body, _ = await stack.send_email(
        user["id"],
        template["code"],
        variables={"name": "x", "link": "https://example.com"},
        request_id=f"after-{uuid.uuid4()}",
    )
    assert status == 404, body
    # Erasing again: 404, and still nothing to find.
    again = await stack.gateway.delete(f"/api/v1/users/{user['id']}", headers=stack.headers())
    assert again.status == 404
