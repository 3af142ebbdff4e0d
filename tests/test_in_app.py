"""The in_app channel end to end (PostgreSQL, Redis, RabbitMQ, the inbox worker): a notification
stored in the user's inbox once, whatever is redelivered; the preference; escaping; what the
client hears of a read; and a workflow that emails only the user who did not read."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from standardwebhooks import Webhook

import inbox_worker
from common.data import db
from common.features.inbox.store import InboxStore
from tests.conftest import Stack, _serve
from tests.features.workflows.test_api import put, trigger, wait_run
from tests.test_webhooks import Receiver, _endpoint, receiver  # noqa: F401 - the fixture


async def _in_app_template(stack: Stack) -> dict[str, Any]:
    return await stack.create_template(
        notification_type="in_app",
        subject=None,
        title="New comment from {{ name }}",
        body="<p>{{ name }} wrote: {{ comment }}</p>",
        link="https://example.com/posts/{{ post }}",
    )


def _send_body(user_id: str, code: str, **fields: Any) -> dict[str, Any]:
    return {
        "notification_type": "in_app",
        "user_id": user_id,
        "template_code": code,
        "variables": {"name": "Bob", "comment": "<script>alert(1)</script> & more", "post": "42"},
        "metadata": {"post_id": 42},
        "request_id": f"req-{uuid.uuid4()}",
        **fields,
    }


async def _messages(stack: Stack, user_id: str) -> list[dict[str, Any]]:
    response = await stack.gateway.get(
        "/api/v1/inbox/messages", params={"user_id": user_id, "status": "all"}, headers=stack.headers()
    )
    assert response.status == 200, await response.text()
    return list((await response.json())["data"])


async def test_an_in_app_notification_is_stored_in_the_inbox_escaped_and_delivered(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(workers=False, inbox=True)
    template = await _in_app_template(stack)
    user = await stack.create_user()
    status, body, _ = await stack.send(_send_body(user["id"], template["code"]))
    assert status == 202, body
    done = await stack.wait_for(body["data"]["notification_id"], "delivered")
    assert done["provider"] == "inbox"
    assert done["seen_at"] is None and done["read_at"] is None
    [message] = await _messages(stack, user["id"])
    assert message["notification_id"] == body["data"]["notification_id"]
    assert message["title"] == "New comment from Bob"
    # The template's markup kept, the variables' escaped: no script reaches the page.
    assert message["body"] == "<p>Bob wrote: &lt;script&gt;alert(1)&lt;/script&gt; &amp; more</p>"
    assert message["link"] == "https://example.com/posts/42"
    assert message["data"] == {"post_id": 42} and message["read_at"] is None

    # Read by the user: the notification says when, and its history has it.
    read = await stack.gateway.post(
        f"/api/v1/inbox/messages/{message['id']}/read",
        params={"user_id": user["id"]},
        headers=stack.headers(),
    )
    assert read.status == 200, await read.text()
    after = await stack.notification(body["data"]["notification_id"])
    assert after["status"] == "delivered" and after["read_at"] is not None
    assert "read" in [entry["status"] for entry in after["history"]]


async def test_the_in_app_preference_off_skips_it(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False, inbox=True)
    template = await _in_app_template(stack)
    user = await stack.create_user(preferences={"in_app": False})
    status, body, _ = await stack.send(_send_body(user["id"], template["code"]))
    assert status == 202, body
    assert body["data"]["status"] == "skipped", body
    assert await _messages(stack, user["id"]) == []


async def test_a_notification_stored_before_its_worker_died_is_delivered_without_a_second_message(
    stack_factory: Any,
) -> None:
    """The window the other channels have (sent, then the worker dies before recording) is
    closed: the message is stored once per notification, so the redelivery only records it."""
    stack: Stack = await stack_factory(workers=False)  # no inbox worker yet: it stays pending
    template = await _in_app_template(stack)
    user = await stack.create_user()
    status, body, _ = await stack.send(_send_body(user["id"], template["code"]))
    assert status == 202 and body["data"]["status"] == "pending", body
    notification_id = uuid.UUID(body["data"]["notification_id"])
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        # What a worker that stored the message and then died left behind.
        _, created = await InboxStore(database).deliver(
            project="default", user_id=user["id"], notification_id=notification_id, workflow_key=None,
            title="stored by a worker that died", body="b", link=None, image_url=None, data={},
        )  # fmt: skip
        assert created
    finally:
        await database.close()
    worker = await _serve(inbox_worker.create_app(stack.config))
    try:
        done = await stack.wait_for(str(notification_id), "delivered")
        assert done["provider"] == "inbox"
        messages = await _messages(stack, user["id"])
        assert [m["title"] for m in messages] == ["stored by a worker that died"]
    finally:
        await worker.close()


async def test_a_workflow_emails_only_the_user_who_did_not_read_the_in_app_message(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory(inbox=True)
    in_app = await _in_app_template(stack)
    email = await stack.create_template()
    reader, ignorer = await stack.create_user(), await stack.create_user()
    key = f"wf-{uuid.uuid4().hex[:10]}"
    status, body = await put(
        stack,
        key,
        {
            "name": "Comment",
            "steps": [
                {"name": "inbox", "type": "in_app", "template_code": in_app["code"]},
                {"name": "wait", "type": "delay", "duration": "PT2S"},
                {
                    "name": "remind",
                    "type": "email",
                    "template_code": email["code"],
                    "if": "not steps.inbox.read",
                },
            ],
        },
    )
    assert status == 201, body
    runs = {}
    payload = {"name": "Bob", "comment": "hi", "post": "7", "link": "https://example.com"}
    for user in (reader, ignorer):
        status, made, _ = await trigger(stack, key, user["id"], payload=payload)
        assert status == 202, made
        runs[user["id"]] = made["data"]["runs"][0]["run_id"]
    # The reader reads within the delay.
    deadline = time.monotonic() + 10
    while not (messages := await _messages(stack, reader["id"])):
        assert time.monotonic() < deadline, "the in-app message never arrived"
        await asyncio.sleep(0.05)
    read = await stack.gateway.post(
        f"/api/v1/inbox/messages/{messages[0]['id']}/read",
        params={"user_id": reader["id"]},
        headers=stack.headers(),
    )
    assert read.status == 200, await read.text()
    done = {user_id: await wait_run(stack, run_id, "completed") for user_id, run_id in runs.items()}
    reader_steps = {s["name"]: s for s in done[reader["id"]]["steps"]}
    ignorer_steps = {s["name"]: s for s in done[ignorer["id"]]["steps"]}
    assert reader_steps["remind"]["status"] == "skipped", reader_steps
    assert ignorer_steps["remind"]["notification_status"] == "delivered", ignorer_steps
    assert stack.smtp.to(reader["email"]) == []
    assert len(stack.smtp.to(ignorer["email"])) == 1


async def test_the_client_hears_of_a_seen_and_a_read_by_signed_webhook(
    stack_factory: Any,
    receiver: Receiver,  # noqa: F811 - the fixture imported above
) -> None:
    stack: Stack = await stack_factory(workers=False, inbox=True, webhook_allowed_hosts=("127.0.0.1",))
    endpoint = await _endpoint(stack, receiver.url("/engaged"), ["notification.seen", "notification.read"])
    template = await _in_app_template(stack)
    user = await stack.create_user()
    status, body, _ = await stack.send(_send_body(user["id"], template["code"]))
    assert status == 202, body
    await stack.wait_for(body["data"]["notification_id"], "delivered")
    [message] = await _messages(stack, user["id"])
    for action in ("seen", "read", "read"):  # a read of a read message changes nothing
        answer = await stack.gateway.post(
            f"/api/v1/inbox/messages/{message['id']}/{action}", params={"user_id": user["id"]},
            headers=stack.headers(),
        )  # fmt: skip
        assert answer.status == 200, await answer.text()
    got = await receiver.wait("/engaged", 2)
    events = [Webhook(endpoint["secret"]).verify(r.body, r.headers) for r in got]
    # Two deliveries, each sent on its own: they may arrive in either order.
    assert sorted(e["type"] for e in events) == ["notification.read", "notification.seen"]
    assert {e["data"]["notification_id"] for e in events} == {body["data"]["notification_id"]}
    assert all(e["data"]["status"] == "delivered" for e in events)
    await asyncio.sleep(0.5)
    assert len(receiver.at("/engaged")) == 2
