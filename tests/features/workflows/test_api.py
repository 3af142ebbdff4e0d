"""Workflows against the real stack (PostgreSQL, Redis, RabbitMQ, the SMTP sink, the push worker):
definitions and versions, triggers, delays, conditions, fallback, cancellation, preferences per
workflow and category, critical workflows, and what a notification made by a run says of it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from common.data import db
from tests.conftest import Stack

VARIABLES = {"name": "Ada", "link": "https://example.com"}


def _key() -> str:
    return f"wf-{uuid.uuid4().hex[:10]}"


async def put(stack: Stack, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await stack.gateway.put(f"/api/v1/workflows/{key}", json=body, headers=stack.headers())
    return response.status, await response.json()


async def trigger(stack: Stack, key: str, to: Any, **fields: Any) -> tuple[int, dict[str, Any], Any]:
    body = {"to": to, "payload": VARIABLES, "request_id": f"t-{uuid.uuid4()}", **fields}
    response = await stack.gateway.post(
        f"/api/v1/workflows/{key}/trigger", json=body, headers=stack.headers()
    )
    return response.status, await response.json(), response.headers


async def run_of(stack: Stack, run_id: str) -> dict[str, Any]:
    response = await stack.gateway.get(f"/api/v1/workflow-runs/{run_id}", headers=stack.headers())
    assert response.status == 200, await response.text()
    return (await response.json())["data"]


async def wait_run(stack: Stack, run_id: str, *statuses: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = await run_of(stack, run_id)
        if run["status"] in statuses:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run stayed {run['status']!r}, wanted {statuses}: {run}")
        await asyncio.sleep(0.1)


def _steps(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["steps"]}


async def test_a_delay_then_a_condition_on_the_payload(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    pro, free = await stack.create_user(), await stack.create_user()
    key = _key()
    status, body = await put(
        stack,
        key,
        {
            "name": "Welcome series",
            "steps": [
                {"name": "hello", "type": "email", "template_code": template["code"]},
                {"name": "wait", "type": "delay", "duration": "PT1S"},
                {
                    "name": "upsell",
                    "type": "email",
                    "template_code": template["code"],
                    "if": "payload.plan == 'pro'",
                },
            ],
        },
    )
    assert status == 201, body
    assert body["data"]["version"] == 1 and [s["name"] for s in body["data"]["steps"]] == [
        "hello",
        "wait",
        "upsell",
    ]
    started = time.monotonic()
    runs = {}
    for user, plan in ((pro, "pro"), (free, "free")):
        status, body, _ = await trigger(stack, key, user["id"], payload={**VARIABLES, "plan": plan})
        assert status == 202, body
        [made] = body["data"]["runs"]
        assert made["user_id"] == user["id"]
        runs[plan] = made["run_id"]
    done_pro = await wait_run(stack, runs["pro"], "completed")
    done_free = await wait_run(stack, runs["free"], "completed")
    assert time.monotonic() - started >= 1.0  # the delay held the second step back
    steps_pro, steps_free = _steps(done_pro), _steps(done_free)
    assert [s["status"] for s in done_pro["steps"]] == ["completed"] * 3
    assert steps_pro["hello"]["notification_status"] == "delivered"
    assert steps_free["upsell"] == {**steps_free["upsell"], "status": "skipped", "reason": "condition false"}
    assert "notification_id" not in steps_free["upsell"]
    assert len(stack.smtp.to(pro["email"])) == 2
    assert len(stack.smtp.to(free["email"])) == 1
    # The notification a step made says which run and step made it.
    made = await stack.notification(steps_pro["upsell"]["notification_id"])
    assert made["workflow_run_id"] == runs["pro"] and made["step"] == "upsell"
    assert made["status"] == "delivered"


async def test_push_to_a_user_without_a_device_falls_back_to_email(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(push=True)
    email = await stack.create_template()
    push = await stack.create_template(
        notification_type="push", subject=None, title="Hi {{ name }}", body="Open {{ link }}"
    )
    user = await stack.create_user()
    key = _key()
    status, body = await put(
        stack,
        key,
        {
            "name": "Order shipped",
            "steps": [
                {"name": "push", "type": "push", "template_code": push["code"]},
                {
                    "name": "email",
                    "type": "email",
                    "template_code": email["code"],
                    "if": "steps.push.status != 'delivered'",
                },
            ],
        },
    )
    assert status == 201, body
    status, body, _ = await trigger(stack, key, [user["id"]])
    assert status == 202, body
    run = await wait_run(stack, body["data"]["runs"][0]["run_id"], "completed")
    steps = _steps(run)
    assert steps["push"]["status"] == "failed" and steps["push"]["notification_status"] == "failed"
    assert "no push devices" in steps["push"]["reason"]
    assert steps["email"]["status"] == "completed"
    assert len(stack.smtp.to(user["email"])) == 1


async def test_a_cancelled_run_sends_nothing(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    user, other = await stack.create_user(), await stack.create_user()
    key = _key()
    steps = [
        {"type": "delay", "duration": 1.5},
        {"name": "reminder", "type": "email", "template_code": template["code"]},
    ]
    assert (await put(stack, key, {"name": "Cart", "steps": steps}))[0] == 201
    status, body, _ = await trigger(stack, key, [user["id"], other["id"]], cancellation_key="cart-1")
    assert status == 202, body
    by_user = {r["user_id"]: r["run_id"] for r in body["data"]["runs"]}
    response = await stack.gateway.post(
        f"/api/v1/workflows/{key}/cancel",
        json={"cancellation_key": "cart-1", "user_id": user["id"]},
        headers=stack.headers(),
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["data"] == {"cancelled": 1}
    kept = await wait_run(stack, by_user[other["id"]], "completed")
    cancelled = await run_of(stack, by_user[user["id"]])
    assert cancelled["status"] == "cancelled" and cancelled["due_at"] is None
    assert [s["status"] for s in cancelled["steps"]] == ["cancelled", "cancelled"]
    assert _steps(kept)["reminder"]["notification_status"] == "delivered"
    await asyncio.sleep(0.5)
    assert stack.smtp.to(user["email"]) == [] and len(stack.smtp.to(other["email"])) == 1
    # Cancelling again finds nothing left to stop.
    again = await stack.gateway.post(
        f"/api/v1/workflows/{key}/cancel", json={"cancellation_key": "cart-1"}, headers=stack.headers()
    )
    assert (await again.json())["data"] == {"cancelled": 0}


async def test_a_run_keeps_its_version_while_a_new_one_is_put(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    first, second = await stack.create_template(), await stack.create_template()
    user = await stack.create_user()
    key = _key()
    one = {
        "name": "V",
        "steps": [
            {"type": "delay", "duration": 1},
            {"name": "mail", "type": "email", "template_code": first["code"]},
        ],
    }
    assert (await put(stack, key, one))[0] == 201
    _, body, _ = await trigger(stack, key, user["id"])
    old_run = body["data"]["runs"][0]["run_id"]
    status, body = await put(
        stack,
        key,
        {"name": "V", "steps": [{"name": "mail", "type": "email", "template_code": second["code"]}]},
    )
    assert status == 200 and body["data"]["version"] == 2 and body["data"]["current_version"] == 2
    _, body, _ = await trigger(stack, key, user["id"])
    new_run = body["data"]["runs"][0]["run_id"]
    done_old, done_new = (
        await wait_run(stack, old_run, "completed"),
        await wait_run(stack, new_run, "completed"),
    )
    assert done_old["version"] == 1 and done_new["version"] == 2
    old_mail = await stack.notification(_steps(done_old)["mail"]["notification_id"])
    new_mail = await stack.notification(_steps(done_new)["mail"]["notification_id"])
    assert old_mail["template_code"] == first["code"] and new_mail["template_code"] == second["code"]

    versions = await stack.gateway.get(f"/api/v1/workflows/{key}/versions", headers=stack.headers())
    listed = (await versions.json())["data"]
    assert [(v["version"], v["current"]) for v in listed] == [(2, True), (1, False)]
    back = await stack.gateway.post(f"/api/v1/workflows/{key}/versions/1/activate", headers=stack.headers())
    assert back.status == 200 and (await back.json())["data"]["current_version"] == 1
    missing = await stack.gateway.post(
        f"/api/v1/workflows/{key}/versions/9/activate", headers=stack.headers()
    )
    assert missing.status == 404
    for odd in ("\u00b2", "\u0661", "99999999999"):
        refused = await stack.gateway.post(
            f"/api/v1/workflows/{key}/versions/{odd}/activate", headers=stack.headers()
        )
        assert refused.status == 404, odd
    _, body, _ = await trigger(stack, key, user["id"])
    assert (await run_of(stack, body["data"]["runs"][0]["run_id"]))["version"] == 1


async def test_preferences_per_workflow_and_category_and_critical_workflows(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    by_category = await stack.create_user(preferences={"categories": {"comments": {"email": False}}})
    by_workflow = await stack.create_user(
        preferences={"categories": {"comments": False}, "workflows": {"mentions": {"email": True}}}
    )
    opted_out = await stack.create_user(preferences={"email": False})
    step = [{"name": "mail", "type": "email", "template_code": template["code"]}]
    for key, extra in (
        ("replies", {"category": "comments"}),
        ("mentions", {"category": "comments"}),
        ("reset", {"critical": True}),
    ):
        status, body = await put(stack, key, {"name": key, "steps": step, **extra})
        assert status in (200, 201), body

    async def mail_step(key: str, user: dict[str, Any]) -> dict[str, Any]:
        status, body, _ = await trigger(stack, key, user["id"])
        assert status == 202, body
        return _steps(await wait_run(stack, body["data"]["runs"][0]["run_id"], "completed"))["mail"]

    skipped = await mail_step("replies", by_category)
    assert skipped["status"] == "skipped" and skipped["reason"] == "user opted out of category comments"
    # The most specific rule wins: this workflow is on although its category is off.
    assert (await mail_step("mentions", by_workflow))["notification_status"] == "delivered"
    assert (await mail_step("replies", by_workflow))["reason"] == "user opted out of category comments"
    # A critical workflow reaches a user who switched email off; an ordinary one does not.
    assert (await mail_step("reset", opted_out))["notification_status"] == "delivered"
    assert (await mail_step("replies", opted_out))["reason"] == "user opted out of email notifications"
    assert len(stack.smtp.to(opted_out["email"])) == 1
    bad = await stack.gateway.put(
        f"/api/v1/users/{opted_out['id']}/preferences",
        json={"workflows": {"reset": {"sms": False}}},
        headers=stack.headers(),
    )
    assert bad.status == 400 and "workflows.reset" in (await bad.json())["data"]["fields"]


async def test_triggers_are_idempotent_per_request_and_recipient(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    user = await stack.create_user()
    key = _key()
    steps = [{"type": "email", "template_code": template["code"]}]
    assert (await put(stack, key, {"name": "Once", "steps": steps}))[0] == 201
    body = {"to": [user["id"], "nobody-here"], "payload": VARIABLES, "request_id": "same"}
    first = await stack.gateway.post(f"/api/v1/workflows/{key}/trigger", json=body, headers=stack.headers())
    again = await stack.gateway.post(f"/api/v1/workflows/{key}/trigger", json=body, headers=stack.headers())
    one, two = (await first.json())["data"], (await again.json())["data"]
    assert first.status == again.status == 202
    assert one["runs"] == two["runs"] and len(one["runs"]) == 1
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert one["rejected"] == [
        {"user_id": "nobody-here", "error": "user_not_found: User nobody-here does not exist."}
    ]
    changed = await stack.gateway.post(
        f"/api/v1/workflows/{key}/trigger",
        json={**body, "payload": {**VARIABLES, "x": 1}},
        headers=stack.headers(),
    )
    assert changed.status == 422 and (await changed.json())["error"] == "idempotency_conflict"
    await wait_run(stack, one["runs"][0]["run_id"], "completed")
    await asyncio.sleep(0.3)
    assert len(stack.smtp.to(user["email"])) == 1
    status, body, _ = await trigger(stack, "no-such-workflow", user["id"])
    assert status == 404

    listed = await stack.gateway.get(
        f"/api/v1/workflow-runs/?workflow={key}&user_id={user['id']}&status=completed",
        headers=stack.headers(),
    )
    assert [r["run_id"] for r in (await listed.json())["data"]] == [one["runs"][0]["run_id"]]


async def test_bad_definitions_and_triggers_get_a_clear_4xx(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False)
    email = await stack.create_template()
    user = await stack.create_user()
    mail = {"type": "email", "template_code": email["code"]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "x", "steps": [{"type": "sms"}]}, "steps[0].type"),
        ({"name": "x", "steps": [{**mail, "name": "a"}, {**mail, "name": "a"}]}, "steps[1].name"),
        (
            {"name": "x", "steps": [{"type": "push", "template_code": email["code"]}]},
            "steps[0].template_code",
        ),
        (
            {"name": "x", "steps": [{"type": "email", "template_code": "missing-template"}]},
            "steps[0].template_code",
        ),
        ({"name": "x", "steps": [{"type": "delay", "duration": "P31D"}]}, "steps[0].duration"),
        ({"name": "x", "steps": [mail] * 21}, "steps"),
        ({"name": "x", "steps": [{**mail, "if": "payload.__class__"}]}, "steps[0].if"),
        ({"name": "x", "steps": [{**mail, "if": "cycler.__init__"}]}, "steps[0].if"),
        ({"name": "x", "steps": [{**mail, "if": "payload.a ==="}]}, "steps[0].if"),
    ]
    for body, field in cases:
        status, answer = await put(stack, _key(), body)
        assert status == 422 and field in answer["data"]["fields"], (body, answer)
    bad_key = await stack.gateway.put("/api/v1/workflows/a%20b", json={}, headers=stack.headers())
    assert bad_key.status == 400
    key = _key()
    assert (await put(stack, key, {"name": "ok", "steps": [mail]}))[0] == 201
    big = {"blob": "x" * 70_000}
    status, answer, _ = await trigger(stack, key, user["id"], payload=big)
    assert status == 413 and "payload" in answer["data"]["fields"]
    status, answer, _ = await trigger(stack, key, ["ok", "bad id with spaces"])
    assert status == 400 and "to[1]" in answer["data"]["fields"]
    status, answer, _ = await trigger(stack, key, [f"u{i}" for i in range(1001)])
    assert status == 413
    status, answer, _ = await trigger(stack, key, user["id"], request_id=None)
    assert status == 400 and "request_id" in answer["data"]["fields"]
    for path in (
        "/api/v1/workflow-runs/not-a-uuid",
        f"/api/v1/workflow-runs/{uuid.uuid4()}",
        "/api/v1/workflows/nope",
    ):
        assert (await stack.gateway.get(path, headers=stack.headers())).status == 404
    listed = await stack.gateway.get("/api/v1/workflow-runs/?status=nope", headers=stack.headers())
    assert listed.status == 400


async def test_workflows_list_by_keyset_and_belong_to_their_project(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False)
    email = await stack.create_template()
    keys = [_key() for _ in range(3)]
    for key in keys:
        assert (
            await put(stack, key, {"name": key, "steps": [{"type": "email", "template_code": email["code"]}]})
        )[0] == 201
    seen: list[str] = []
    url = "/api/v1/workflows/?limit=2"
    while True:
        page = await (await stack.gateway.get(url, headers=stack.headers())).json()
        seen += [w["key"] for w in page["data"]]
        if not page["meta"]["has_next"]:
            break
        url = f"/api/v1/workflows/?limit=2&after={page['meta']['next']}"
    assert [k for k in seen if k in keys] == list(reversed(keys))


async def test_a_run_notification_carries_its_run_and_step_in_webhooks(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(webhook_allowed_hosts=("127.0.0.1",))
    template = await stack.create_template()
    user = await stack.create_user()
    endpoint = await stack.gateway.post(
        "/api/v1/webhooks/endpoints",
        json={"url": "http://127.0.0.1:9/hook", "events": ["notification.delivered"]},
        headers=stack.headers(),
    )
    assert endpoint.status == 201, await endpoint.text()
    key = _key()
    assert (
        await put(
            stack,
            key,
            {"name": "W", "steps": [{"name": "mail", "type": "email", "template_code": template["code"]}]},
        )
    )[0] == 201
    _, body, _ = await trigger(stack, key, user["id"])
    run_id = body["data"]["runs"][0]["run_id"]
    await wait_run(stack, run_id, "completed")
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        payloads = await database.fetch(
            "SELECT payload FROM webhook_deliveries WHERE payload->'data'->>'workflow_run_id' = %s", run_id
        )
    finally:
        await database.close()
    assert [p["payload"]["data"]["step"] for p in payloads] == ["mail"]


async def test_erasing_a_user_stops_their_runs_and_forgets_their_payload(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    user = await stack.create_user()
    key = _key()
    steps = [{"type": "delay", "duration": 2}, {"type": "email", "template_code": template["code"]}]
    assert (await put(stack, key, {"name": "E", "steps": steps}))[0] == 201
    secret = f"Secret{uuid.uuid4().hex[:8]}"
    _, body, _ = await trigger(stack, key, user["id"], payload={**VARIABLES, "name": secret})
    run_id = body["data"]["runs"][0]["run_id"]
    erased = await stack.gateway.delete(f"/api/v1/users/{user['id']}", headers=stack.headers())
    assert erased.status == 200, await erased.text()
    run = await run_of(stack, run_id)
    assert run["status"] == "cancelled" and run["reason"] == "user erased" and run["payload"] == {}
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        found = await database.fetch("SELECT 1 FROM workflow_runs AS t WHERE t::text ILIKE %s", f"%{secret}%")
    finally:
        await database.close()
    assert found == []
    await asyncio.sleep(2.5)
    assert stack.smtp.to(user["email"]) == []


async def test_the_unsubscribe_link_of_a_workflow_email_turns_off_its_category(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    user = await stack.create_user(preferences={"categories": {"billing": {"push": False}}})
    key = _key()
    step = [{"name": "mail", "type": "email", "template_code": template["code"]}]
    assert (await put(stack, key, {"name": "News", "category": "news", "steps": step}))[0] == 201
    _, body, _ = await trigger(stack, key, user["id"])
    await wait_run(stack, body["data"]["runs"][0]["run_id"], "completed")
    [message] = stack.smtp.to(user["email"])
    link = str(message["List-Unsubscribe"]).strip("<>")
    path = link[link.index("/api/v1/unsubscribe/") :]
    clicked = await stack.gateway.post(path, data="List-Unsubscribe=One-Click")
    assert clicked.status == 200, await clicked.text()
    assert (await clicked.json())["data"]["category"] == "news"
    prefs = await stack.gateway.get(f"/api/v1/users/{user['id']}/preferences", headers=stack.headers())
    found = (await prefs.json())["data"]
    # That category's email is off; email as a whole and the other category are as they were.
    assert found["email"] is True
    assert found["categories"] == {"billing": {"push": False}, "news": {"email": False}}
    _, body, _ = await trigger(stack, key, user["id"])
    run = await wait_run(stack, body["data"]["runs"][0]["run_id"], "completed")
    assert _steps(run)["mail"]["reason"] == "user opted out of category news"
