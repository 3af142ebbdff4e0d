"""Projects, against the real stack: a client key sees and changes only its project's
notifications, batches and topics (webhook endpoints: tests/test_webhooks.py); another project's
id answers 404 and never shows in a list; two keys of one project share everything."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.conftest import API_KEY, Stack

OTHER = "test-other-project-key-0123"
SECOND = "test-second-default-key-0123"  # a second key of project "default", API_KEY's


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _stack(stack_factory: Any) -> Stack:
    stack: Stack = await stack_factory(gateway_api_keys=(API_KEY, f"other:{OTHER}", f"default:{SECOND}"))
    return stack


async def _delivered(stack: Stack) -> dict[str, Any]:
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send_email(user["id"], template["code"], request_id=f"iso-{uuid.uuid4()}")
    assert status == 202, body
    return await stack.wait_for(body["data"]["notification_id"], "delivered")


async def test_another_projects_notification_is_404_everywhere_and_in_no_list(stack_factory: Any) -> None:
    stack = await _stack(stack_factory)
    record = await _delivered(stack)
    nid = record["notification_id"]
    for method, path in (
        ("GET", f"/api/v1/notifications/{nid}"),
        ("POST", f"/api/v1/notifications/{nid}/retry"),
        ("POST", f"/api/v1/notifications/{nid}/cancel"),
    ):
        response = await stack.gateway.request(method, path, headers=_auth(OTHER))
        assert response.status == 404, (method, path, await response.text())
    for query in ({}, {"user_id": record["user_id"]}, {"status": "delivered"}):
        listed = await (
            await stack.gateway.get("/api/v1/notifications/", params=query, headers=_auth(OTHER))
        ).json()
        assert listed["data"] == [], query
    # A second key of the same project sees it, in a read and in a list.
    same = await stack.gateway.get(f"/api/v1/notifications/{nid}", headers=_auth(SECOND))
    assert same.status == 200
    listed = await (await stack.gateway.get("/api/v1/notifications/", headers=_auth(SECOND))).json()
    assert [n["notification_id"] for n in listed["data"]] == [nid]
    # Retry by the owner's project is what it was: 409, a delivered one is not retried.
    mine = await stack.gateway.post(f"/api/v1/notifications/{nid}/retry", headers=_auth(SECOND))
    assert mine.status == 409


async def test_batches_and_topics_belong_to_their_project(stack_factory: Any) -> None:
    stack = await _stack(stack_factory)
    user = await stack.create_user()
    template = await stack.create_template()
    bulk = await stack.gateway.post(
        "/api/v1/notifications/bulk",
        json={
            "notification_type": "email",
            "template_code": template["code"],
            "variables": {"name": "Ada", "link": "https://example.com"},
            "request_id": f"bulk-{time.time_ns()}",
            "recipients": [{"user_id": user["id"]}],
        },
        headers=_auth(API_KEY),
    )
    assert bulk.status == 202, await bulk.text()
    batch_id = (await bulk.json())["data"]["batch_id"]
    assert (await stack.gateway.get(f"/api/v1/batches/{batch_id}", headers=_auth(OTHER))).status == 404
    assert (await stack.gateway.get(f"/api/v1/batches/{batch_id}", headers=_auth(SECOND))).status == 200
    theirs = await (
        await stack.gateway.get("/api/v1/notifications/", params={"batch_id": batch_id}, headers=_auth(OTHER))
    ).json()
    assert theirs["data"] == []

    key = f"topic-{time.time_ns()}"
    put = await stack.gateway.put(f"/api/v1/topics/{key}", json={"name": "Mine"}, headers=_auth(API_KEY))
    assert put.status == 201
    added = await stack.gateway.post(
        f"/api/v1/topics/{key}/subscribers", json={"user_ids": [user["id"]]}, headers=_auth(SECOND)
    )
    assert added.status == 200  # the same project's other key
    assert (await stack.gateway.get(f"/api/v1/topics/{key}", headers=_auth(OTHER))).status == 404
    listed = await stack.gateway.get(f"/api/v1/topics/{key}/subscribers", headers=_auth(OTHER))
    assert listed.status == 404
    # The same key in the other project is another topic, with no subscribers.
    own = await stack.gateway.put(f"/api/v1/topics/{key}", json={"name": "Theirs"}, headers=_auth(OTHER))
    assert own.status == 201
    topic = await (await stack.gateway.get(f"/api/v1/topics/{key}", headers=_auth(OTHER))).json()
    assert topic["data"]["name"] == "Theirs" and topic["data"]["subscribers"] == 0
    mine = await (await stack.gateway.get(f"/api/v1/topics/{key}", headers=_auth(API_KEY))).json()
    assert mine["data"]["name"] == "Mine" and mine["data"]["subscribers"] == 1
