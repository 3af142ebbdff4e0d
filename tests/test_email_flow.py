"""The walking skeleton: an email notification travels gateway → RabbitMQ → worker → SMTP."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client import generate_latest

from common.broker.amqp import work_queue
from common.keys import METRICS_KEY
from tests.conftest import API_KEY, INTERNAL_TOKEN, Stack, failed_queue_messages


def _notification(user_id: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "notification_type": "email",
        "user_id": user_id,
        "template_code": code,
        "variables": {"name": "Ada", "link": "https://example.com/start"},
        "request_id": f"req-{uuid.uuid4()}",
        "priority": 5,
        **extra,
    }


async def test_email_arrives_rendered_and_status_is_tracked(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, headers = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202, body
    assert body["success"] is True and body["error"] is None
    assert body["data"]["status"] == "pending"
    notification_id = body["data"]["notification_id"]
    correlation_id = headers["X-Correlation-ID"]

    record = await stack.wait_for(notification_id, "delivered")
    assert record["attempts"] == 1
    assert record["provider"] == "smtp"
    assert record["template_version"] == 1 and record["language"] == "en"
    assert [h["status"] for h in record["history"]] == ["pending", "sending", "delivered"]

    [message] = stack.smtp.to(user["email"])
    assert message["Subject"] == "Welcome, Ada!"
    assert message["X-Notification-ID"] == notification_id
    assert message["X-Correlation-ID"] == correlation_id
    html_part, text_part = message.get_body(("html",)), message.get_body(("plain",))
    assert html_part is not None and text_part is not None
    html, text = html_part.get_content(), text_part.get_content()
    assert "Hello Ada" in html and "https://example.com/start" in html
    assert "Hello Ada" in text

    everything = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert API_KEY not in everything and INTERNAL_TOKEN not in everything  # no secret in a log line
    about_it = [r for r in caplog.records if getattr(r, "notification_id", None) == notification_id]
    assert {r.name for r in about_it} >= {"gateway", "worker"}
    assert {getattr(r, "correlation_id", None) for r in about_it} == {correlation_id}


async def test_correlation_id_travels_in_the_amqp_message(stack_factory: Any, amqp_channel: Any) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send(
        _notification(user["id"], template["code"]), **{"X-Correlation-ID": "trace-abc-123"}
    )
    assert status == 202
    queue = await amqp_channel.get_queue(work_queue("email"))
    message = await queue.get(no_ack=True, timeout=5)
    assert message.headers["x-correlation-id"] == "trace-abc-123"
    assert message.correlation_id == "trace-abc-123"
    assert message.priority == 5
    assert message.delivery_mode == 2  # persistent
    payload = orjson.loads(message.body)
    assert payload["notification_id"] == body["data"]["notification_id"]
    assert payload["correlation_id"] == "trace-abc-123"
    assert payload["attempt"] == 1
    assert set(payload) >= {
        "request_id",
        "user_id",
        "notification_type",
        "template_code",
        "language",
        "variables",
        "priority",
        "metadata",
        "created_at",
    }


async def test_replay_returns_the_original_answer_and_sends_once(stack: Stack) -> None:
    user = await stack.create_user()
    template = await stack.create_template()
    request = _notification(user["id"], template["code"])
    first_status, first, _ = await stack.send(request)
    second_status, second, second_headers = await stack.send(request)
    assert first_status == second_status == 202
    assert second["data"]["notification_id"] == first["data"]["notification_id"]
    assert second_headers["Idempotent-Replayed"] == "true"
    await stack.wait_for(first["data"]["notification_id"], "delivered")

    changed = {**request, "variables": {"name": "Grace", "link": "https://example.com"}}
    status, body, _ = await stack.send(changed)
    assert status == 422
    assert body["error"] == "idempotency_conflict" and request["request_id"] in body["message"]

    await asyncio.sleep(0.5)  # time for a second email, were one to be sent
    assert len(stack.smtp.to(user["email"])) == 1


async def test_twenty_concurrent_identical_requests_make_one_notification(stack: Stack) -> None:
    user = await stack.create_user()
    template = await stack.create_template()
    request = _notification(user["id"], template["code"])
    answers = await asyncio.gather(*(stack.send(request) for _ in range(20)))
    accepted = {body["data"]["notification_id"] for status, body, _ in answers if status == 202}
    assert len(accepted) == 1
    assert {status for status, _, _ in answers} <= {202, 409}
    for status, body, headers in answers:
        if status == 409:
            assert body["error"] == "request_in_progress" and headers["Retry-After"]
    await stack.wait_for(accepted.pop(), "delivered")
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(user["email"])) == 1
    listing = await stack.gateway.get(f"/api/v1/notifications/?user_id={user['id']}", headers=stack.headers())
    listed = await listing.json()
    assert len(listed["data"]) == 1 and listed["meta"]["has_next"] is False


async def test_idempotency_keys_are_scoped_per_project(stack_factory: Any) -> None:
    """Two projects may use one request_id; two keys of one project share its idempotency keys."""
    keys = ("key-one-aaaaaaaa", "two:key-two-bbbbbbbb", "two:key-three-cccccccc")
    stack = await stack_factory(workers=False, gateway_api_keys=keys)
    code = f"scoped-{time.time_ns()}"
    request_id = f"same-{time.time_ns()}"
    ids = []
    for key in ("key-one-aaaaaaaa", "key-two-bbbbbbbb", "key-three-cccccccc"):
        headers = {"Authorization": f"Bearer {key}"}
        if key != "key-three-cccccccc":  # the third key's project has them already
            user = (
                await (
                    await stack.gateway.post(
                        "/api/v1/users/",
                        headers=headers,
                        json={
                            "name": "Scoped",
                            "email": f"s-{time.time_ns()}@example.com",
                            "password": "long enough pw",
                        },
                    )
                ).json()
            )["data"]
            created = await stack.gateway.post(
                "/api/v1/templates/",
                headers=headers,
                json={"code": code, "notification_type": "email", "subject": "Hi", "body": "<p>Hi</p>"},
            )
            assert created.status == 201, await created.text()
        request = {**_notification(user["id"], code), "request_id": request_id}
        sent = await stack.gateway.post("/api/v1/notifications/", json=request, headers=headers)
        assert sent.status == 202, await sent.text()
        ids.append(((await sent.json())["data"]["notification_id"], sent.headers.get("Idempotent-Replayed")))
    (first, _), (second, _), (third, replayed) = ids
    assert first != second and third == second and replayed == "true"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"X-API-Key": "nope"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
async def test_missing_or_wrong_api_key_is_401(stack_factory: Any, headers: dict[str, str]) -> None:
    stack = await stack_factory(workers=False)
    for method, path in (
        ("POST", "/api/v1/notifications/"),
        ("GET", "/api/v1/notifications/"),
        ("GET", "/api/v1/users/"),
        ("POST", "/api/v1/templates/"),
    ):
        response = await stack.gateway.request(method, path, json={}, headers=headers)
        body = await response.json()
        assert response.status == 401, (method, path)
        assert body["success"] is False and body["error"] == "unauthorized"
        assert "Authorization" in body["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"notification_type": "sms"}, "notification_type"),
        ({"notification_type": None}, "notification_type"),
        ({"user_id": "not a user id"}, "user_id"),
        ({"user_id": 42}, "user_id"),
        ({"template_code": ""}, "template_code"),
        ({"template_code": "bad code/../x"}, "template_code"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 256}, "request_id"),
        ({"request_id": None}, "request_id"),
        ({"variables": ["a"]}, "variables"),
        ({"metadata": "x"}, "metadata"),
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"priority": True}, "priority"),
        ({"language": "english!"}, "language"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_each_malformed_field_is_a_400_naming_it(
    stack_factory: Any, change: dict[str, Any], field: str
) -> None:
    stack = await stack_factory(workers=False)
    request = {**_notification(str(uuid.uuid4()), "welcome"), **change}
    request = {k: v for k, v in request.items() if v is not None}
    status, body, _ = await stack.send(request)
    assert status == 400, body
    assert body["error"] == "validation_error"
    assert field in body["data"]["fields"] and field in body["message"]


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"', b'{"a": '])
async def test_a_body_that_is_not_a_json_object_is_a_400(stack_factory: Any, raw: bytes) -> None:
    stack = await stack_factory(workers=False)
    response = await stack.gateway.post("/api/v1/notifications/", data=raw, headers=stack.headers())
    body = await response.json()
    assert response.status == 400 and body["error"] == "invalid_json"


async def test_unknown_user_and_unknown_template_are_404(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    template = await stack.create_template()
    status, body, _ = await stack.send(_notification(str(uuid.uuid4()), template["code"]))
    assert status == 404 and body["error"] == "user_not_found"
    user = await stack.create_user()
    status, body, _ = await stack.send(_notification(user["id"], "no-such-template"))
    assert status == 404 and body["error"] == "template_not_found"
    response = await stack.gateway.get(f"/api/v1/notifications/{uuid.uuid4()}", headers=stack.headers())
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await stack.gateway.get("/api/v1/notifications/not-a-uuid", headers=stack.headers())
    assert response.status == 404


async def test_transient_smtp_failures_retry_with_the_configured_delays(stack: Stack) -> None:
    stack.smtp.script = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202, body
    record = await stack.wait_for(body["data"]["notification_id"], "delivered", timeout=20)
    assert record["attempts"] == 3
    assert [h["status"] for h in record["history"]] == [
        "pending",
        "sending",
        "retrying",
        "sending",
        "retrying",
        "sending",
        "delivered",
    ]
    assert "451" in record["history"][2]["detail"]
    first, second, third = stack.smtp.attempts
    delays = stack.config.retry_delays
    assert delays[0] <= second - first < delays[0] + 1.0
    assert delays[1] <= third - second < delays[1] + 1.0
    assert len(stack.smtp.to(user["email"])) == 1


async def test_exhausted_retries_end_failed_in_the_failed_queue(stack: Stack, amqp_channel: Any) -> None:
    stack.smtp.script = ["421 4.7.0 Busy"] * 3
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202, body
    notification_id = body["data"]["notification_id"]
    record = await stack.wait_for(notification_id, "failed", timeout=20)
    assert record["attempts"] == 3 == stack.config.max_attempts
    assert record["error"].startswith("retries exhausted: SMTP 421")
    [dead] = await failed_queue_messages(amqp_channel)
    assert dead.headers["x-notification-id"] == notification_id
    assert "421" in str(dead.headers["x-failure-reason"])


async def test_permanent_smtp_failure_fails_at_once_into_failed_queue(
    stack: Stack, amqp_channel: Any
) -> None:
    stack.smtp.script = ["550 5.1.1 Mailbox does not exist"]
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202, body
    notification_id = body["data"]["notification_id"]
    record = await stack.wait_for(notification_id, "failed")
    assert record["attempts"] == 1
    assert "550" in record["error"] and "Mailbox does not exist" in record["error"]
    [dead] = await failed_queue_messages(amqp_channel)
    assert dead.headers["x-notification-id"] == notification_id
    assert "550" in str(dead.headers["x-failure-reason"])
    assert orjson.loads(dead.body)["notification_id"] == notification_id
    assert stack.smtp.messages == []

    listing = await stack.gateway.get(
        "/api/v1/notifications/?status=failed&limit=100", headers=stack.headers()
    )
    assert notification_id in {n["notification_id"] for n in (await listing.json())["data"]}


async def test_user_who_opted_out_is_skipped_and_nothing_is_sent(stack: Stack) -> None:
    user = await stack.create_user(preferences={"email": False, "push": True})
    template = await stack.create_template()
    status, body, _ = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202 and body["data"]["status"] == "skipped"
    record = await stack.notification(body["data"]["notification_id"])
    assert record["status"] == "skipped" and "opted out" in record["error"]
    await asyncio.sleep(0.5)
    assert stack.smtp.messages == []


async def test_redelivered_message_of_a_delivered_notification_is_not_sent_again(
    stack: Stack, amqp_channel: Any
) -> None:
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202, body
    notification_id = body["data"]["notification_id"]
    await stack.wait_for(notification_id, "delivered")
    # The same message once more, as RabbitMQ would redeliver it after a lost ack.
    exchange = await amqp_channel.get_exchange("notifications.direct")
    await exchange.publish(
        aio_pika.Message(orjson.dumps({"notification_id": notification_id, "attempt": 1})),
        routing_key="email",
    )
    for _ in range(100):
        if _metric(_worker_metrics(stack), "notify_duplicate_deliveries_skipped_total") >= 1:
            break
        await asyncio.sleep(0.05)
    assert _metric(_worker_metrics(stack), "notify_duplicate_deliveries_skipped_total") == 1
    assert len(stack.smtp.to(user["email"])) == 1
    record = await stack.notification(notification_id)
    assert record["status"] == "delivered" and record["attempts"] == 1


def _worker_metrics(stack: Stack) -> str:
    return generate_latest(stack.apps["email_worker"][METRICS_KEY].registry).decode()


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )
