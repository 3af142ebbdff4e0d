"""Users by the client's own ids (issue 25), against the real stack: identify (upsert), bulk
identify, tokens a client's backend mints, optional passwords, shared addresses, projects."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from tests.conftest import API_KEY, Stack

OTHER = "test-other-users-key-0123"


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _call(
    stack: Stack, method: str, path: str, body: Any = None, key: str = API_KEY, **headers: str
) -> Any:
    response = await stack.gateway.request(method, path, json=body, headers={**_auth(key), **headers})
    return response.status, await response.json()


async def test_identify_twice_then_a_notification_by_the_clients_own_id_is_delivered(stack: Stack) -> None:
    user_id = f"crm:{uuid.uuid4().hex[:8]}@acme|7"
    email = f"ident-{time.time_ns()}@example.com"
    status, body = await _call(stack, "PUT", f"/api/v1/users/{user_id}", {"email": email, "name": "Ada"})
    assert status == 201 and body["data"]["id"] == user_id and body["data"]["name"] == "Ada"
    status, body = await _call(
        stack,
        "PUT",
        f"/api/v1/users/{user_id}",
        {"name": "Ada L.", "data": {"plan": "pro"}, "phone": "+351 912 345 678"},
    )
    assert status == 200 and body["data"]["name"] == "Ada L." and body["data"]["email"] == email
    assert body["data"]["data"] == {"plan": "pro"} and body["data"]["phone"] == "+351 912 345 678"
    template = await stack.create_template(
        body="<p>Hi {{ recipient.name }} ({{ recipient.data.plan }}) {{ name }}</p>"
    )
    status, sent, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user_id,
            "template_code": template["code"],
            "variables": {"name": "n", "link": "l"},
            "request_id": f"ident-{uuid.uuid4()}",
        }
    )
    assert status == 202, sent
    record = await stack.wait_for(sent["data"]["notification_id"], "delivered")
    assert record["user_id"] == user_id
    [message] = stack.smtp.to(email)
    html = message.get_body(("html",))
    assert html is not None and "Hi Ada L. (pro)" in html.get_content()


async def test_ids_outside_the_rule_and_oversized_data_are_refused_naming_them(stack: Stack) -> None:
    status, body = await _call(stack, "PUT", "/api/v1/users/has%20space", {"name": "x"})
    assert status == 400 and "id" in body["data"]["fields"]
    status, body = await _call(stack, "POST", "/api/v1/users/", {"id": "x" * 129, "name": "x"})
    assert status == 400 and "id" in body["data"]["fields"]
    status, body = await _call(stack, "PUT", "/api/v1/users/big-data", {"data": {"blob": "x" * 17_000}})
    assert status == 413 and "data" in body["data"]["fields"]
    # With an id, POST creates that user once; a UUID is assigned without one.
    own = f"own-{uuid.uuid4().hex[:8]}"
    assert (await _call(stack, "POST", "/api/v1/users/", {"id": own, "name": "A"}))[0] == 201
    assert (await _call(stack, "POST", "/api/v1/users/", {"id": own, "name": "A"}))[0] == 409
    status, body = await _call(stack, "POST", "/api/v1/users/", {"name": "No password"})
    assert status == 201 and uuid.UUID(body["data"]["id"])


async def test_bulk_identify_creates_updates_and_rejects_by_index(stack: Stack) -> None:
    prefix = uuid.uuid4().hex[:8]
    users = [
        {"id": f"{prefix}-{i}", "name": f"U{i}", "email": f"{prefix}-{i}@example.com"} for i in range(1000)
    ]
    users[500] = {"id": "bad id!", "name": "Bad"}
    started = time.perf_counter()
    status, body = await _call(stack, "POST", "/api/v1/users/bulk", {"users": users})
    elapsed = time.perf_counter() - started
    assert status == 200, body
    assert body["data"]["created"] == 999 and body["data"]["updated"] == 0
    [rejected] = body["data"]["rejected"]
    assert rejected["index"] == 500 and rejected["id"] == "bad id!" and "id" in rejected["error"]
    assert elapsed < 30
    again = [{"id": f"{prefix}-{i}", "data": {"n": i}} for i in range(10)]
    status, body = await _call(stack, "POST", "/api/v1/users/bulk", {"users": [*again, again[0]]})
    assert status == 200 and body["data"]["created"] == 0 and body["data"]["updated"] == 10
    assert (
        body["data"]["rejected"][0]["index"] == 10 and "listed before" in body["data"]["rejected"][0]["error"]
    )
    status, body = await _call(stack, "GET", f"/api/v1/users/{prefix}-3")
    assert body["data"]["name"] == "U3" and body["data"]["data"] == {"n": 3}
    status, _ = await _call(
        stack, "POST", "/api/v1/users/bulk", {"users": [{"id": f"x{i}"} for i in range(1001)]}
    )
    assert status == 413


async def test_fifty_concurrent_identifies_of_one_id_make_one_user(stack: Stack) -> None:
    user_id = f"race-{uuid.uuid4().hex[:8]}"
    answers = await asyncio.gather(
        *(_call(stack, "PUT", f"/api/v1/users/{user_id}", {"name": f"N{i}"}) for i in range(50))
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(201) == 1 and statuses.count(200) == 49, statuses
    status, body = await _call(stack, "GET", f"/api/v1/users/{user_id}")
    assert status == 200 and body["data"]["id"] == user_id


async def test_a_minted_token_reaches_only_its_user(stack: Stack) -> None:
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    for user_id in (a, b):
        assert (await _call(stack, "PUT", f"/api/v1/users/{user_id}", {"name": user_id}))[0] == 201
    status, body = await _call(stack, "POST", f"/api/v1/users/{a}/token")
    assert status == 200 and body["data"]["token_type"] == "bearer" and body["data"]["expires_in"] > 0
    token = body["data"]["access_token"]
    mine = await stack.gateway.get(
        f"/api/v1/users/{a}/preferences", headers={"Authorization": f"Bearer {token}"}
    )
    assert mine.status == 200
    for path in (f"/api/v1/users/{b}/preferences", f"/api/v1/users/{b}", "/api/v1/users/"):
        response = await stack.gateway.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status in (403, 404), path
    minted = await stack.gateway.post(
        f"/api/v1/users/{b}/token", headers={"Authorization": f"Bearer {token}"}
    )
    assert minted.status == 403  # a user's token cannot mint another's
    assert (await _call(stack, "POST", "/api/v1/users/nobody-here/token"))[0] == 404


async def test_login_among_users_with_a_password_and_a_shared_address(stack: Stack) -> None:
    email = f"shared-{time.time_ns()}@example.com"
    for name, password in (
        ("With", "correct horse battery"),
        ("Without", None),
        ("Other", "another long pw"),
    ):
        body = {"name": name, "email": email, **({"password": password} if password else {})}
        assert (await _call(stack, "POST", "/api/v1/users/", body))[0] == 201
    ok = await stack.gateway.post(
        "/api/v1/auth/login", json={"email": email, "password": "correct horse battery"}
    )
    assert ok.status == 200
    wrong = await stack.gateway.post("/api/v1/auth/login", json={"email": email, "password": "not the one"})
    assert wrong.status == 401


async def test_users_belong_to_their_project(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False, gateway_api_keys=(API_KEY, f"other:{OTHER}"))
    user_id = f"shared-{uuid.uuid4().hex[:8]}"
    assert (await _call(stack, "PUT", f"/api/v1/users/{user_id}", {"name": "Mine"}))[0] == 201
    for method, path, body in (
        ("GET", f"/api/v1/users/{user_id}", None),
        ("PATCH", f"/api/v1/users/{user_id}", {"name": "Hijack"}),
        ("PUT", f"/api/v1/users/{user_id}/preferences", {"email": False}),
        ("POST", f"/api/v1/users/{user_id}/token", None),
    ):
        status, _ = await _call(stack, method, path, body, key=OTHER)
        assert status == 404, (method, path)
    status, listed = await _call(stack, "GET", "/api/v1/users/", key=OTHER)
    assert user_id not in [u["id"] for u in listed["data"]]
    # The same id in the other project is another user.
    assert (await _call(stack, "PUT", f"/api/v1/users/{user_id}", {"name": "Theirs"}, key=OTHER))[0] == 201
    assert (await _call(stack, "GET", f"/api/v1/users/{user_id}"))[1]["data"]["name"] == "Mine"
    assert (await _call(stack, "GET", f"/api/v1/users/{user_id}", key=OTHER))[1]["data"]["name"] == "Theirs"
    status, _ = await _call(stack, "DELETE", f"/api/v1/users/{user_id}", key=OTHER)
    assert status == 200
    assert (await _call(stack, "GET", f"/api/v1/users/{user_id}"))[0] == 200
