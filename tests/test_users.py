"""User service through the gateway: users, preferences, devices, login, and the Redis cache."""

from __future__ import annotations

import logging
import time
import uuid
from base64 import urlsafe_b64encode
from typing import Any

import pytest

from common.data import db
from common.keys import METRICS_KEY
from tests.conftest import Stack
from tests.smtp_sink import free_port

PASSWORD = "correct horse battery"


def b64(raw: bytes) -> str:
    return urlsafe_b64encode(raw).rstrip(b"=").decode()


WEBPUSH: dict[str, Any] = {
    "endpoint": "https://push.example.com/send/abc123",
    "keys": {"p256dh": b64(b"\x04" + b"\x01" * 64), "auth": b64(b"\x02" * 16)},
}


async def call(
    stack: Stack, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else stack.headers()
    response = await stack.gateway.request(method, path, json=body, headers=headers)
    return response.status, await response.json()


def _unique_email(tag: str = "user") -> str:
    return f"{tag}-{time.time_ns()}@Example.com"


async def test_create_read_update_list_delete(stack: Stack) -> None:
    email = _unique_email()
    status, body = await call(
        stack,
        "POST",
        "/api/v1/users/",
        {
            "name": "Grace",
            "email": email,
            "password": PASSWORD,
            "push_token": "fcm-token-1",
            "preferences": {"email": True, "push": False},
            "language": "pt_br",
            "timezone": "Europe/Lisbon",
        },
    )
    assert status == 201, body
    user = body["data"]
    assert user["email"] == email and user["language"] == "pt-BR" and user["timezone"] == "Europe/Lisbon"
    assert user["preferences"] == {"email": True, "push": False, "in_app": True}
    assert [(d["platform"], d["token"]) for d in user["devices"]] == [("fcm", "fcm-token-1")]
    assert "password" not in str(body) and "password_hash" not in user

    status, body = await call(stack, "GET", f"/api/v1/users/{user['id']}")
    assert status == 200 and body["data"]["name"] == "Grace" and len(body["data"]["devices"]) == 1

    status, body = await call(
        stack, "PATCH", f"/api/v1/users/{user['id']}", {"name": "Grace H.", "preferences": {"push": True}}
    )
    assert status == 200, body
    assert body["data"]["name"] == "Grace H."
    assert body["data"]["preferences"] == {"email": True, "push": True, "in_app": True}

    status, body = await call(stack, "GET", "/api/v1/users/?page=1&limit=2")
    assert status == 200 and len(body["data"]) <= 2
    assert body["meta"]["limit"] == 2 and body["meta"]["total"] >= 1 and body["meta"]["page"] == 1

    status, body = await call(stack, "DELETE", f"/api/v1/users/{user['id']}")
    assert status == 200
    status, body = await call(stack, "GET", f"/api/v1/users/{user['id']}")
    assert status == 404 and body["error"] == "not_found"
    status, body = await call(stack, "GET", f"/api/v1/users/{user['id']}/devices")
    assert status == 404


async def test_several_users_may_share_an_email_address(stack: Stack) -> None:
    """Email is not the identity (issue 25): two accounts of a product may share an address."""
    email = _unique_email("dup")
    first = await stack.create_user(email=email)
    status, body = await call(
        stack, "POST", "/api/v1/users/", {"name": "X", "email": email.upper(), "password": PASSWORD}
    )
    assert status == 201 and body["data"]["id"] != first["id"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@b.c\r\nBcc: x@y.z"}, "email"),
        ({"name": ""}, "name"),
        ({"password": "short"}, "password"),
        ({"preferences": {"sms": True}}, "preferences.sms"),
        ({"preferences": {"email": "yes"}}, "preferences.email"),
        ({"preferences": []}, "preferences"),
        ({"language": "!!"}, "language"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"role": "admin"}, "role"),
    ],
)
async def test_bad_user_fields_are_400_naming_them(
    stack_factory: Any, change: dict[str, Any], field: str
) -> None:
    stack = await stack_factory(workers=False)
    body = {"name": "X", "email": _unique_email(), "password": PASSWORD, **change}
    status, answer = await call(stack, "POST", "/api/v1/users/", body)
    assert status == 400, answer
    assert answer["error"] == "validation_error" and field in answer["data"]["fields"]


async def test_preferences_read_and_write_with_errors_named(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    path = f"/api/v1/users/{user['id']}/preferences"
    status, body = await call(stack, "GET", path)
    assert status == 200 and body["data"] == {"email": True, "push": True, "in_app": True}
    status, body = await call(stack, "PUT", path, {"push": False})
    assert status == 200 and body["data"] == {"email": True, "push": False, "in_app": True}
    status, body = await call(stack, "PUT", path, {"sms": False})
    assert status == 400 and "sms" in body["data"]["fields"]
    status, body = await call(stack, "PUT", path, {"email": "no"})
    assert status == 400 and body["data"]["fields"] == {"email": "must be true or false"}
    status, body = await call(stack, "PUT", f"/api/v1/users/{uuid.uuid4()}/preferences", {"email": False})
    assert status == 404


async def test_turning_email_off_skips_the_very_next_notification(stack: Stack) -> None:
    user = await stack.create_user()
    template = await stack.create_template()
    request = {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": template["code"],
        "variables": {"name": "A", "link": "l"},
    }
    status, body, _ = await stack.send({**request, "request_id": str(uuid.uuid4())})
    await stack.wait_for(body["data"]["notification_id"], "delivered")  # the profile is cached now
    status, _ = await call(stack, "PUT", f"/api/v1/users/{user['id']}/preferences", {"email": False})
    assert status == 200
    status, body, _ = await stack.send({**request, "request_id": str(uuid.uuid4())})
    assert status == 202 and body["data"]["status"] == "skipped"


async def test_a_repeated_lookup_is_served_from_redis(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    registry = stack.apps["user_service"][METRICS_KEY].registry

    def lookups(result: str) -> float:
        value = registry.get_sample_value("notify_cache_lookups_total", {"cache": "user", "result": result})
        return value or 0.0

    hits, misses = lookups("hit"), lookups("miss")
    for _ in range(3):
        status, _ = await call(stack, "GET", f"/api/v1/users/{user['id']}")
        assert status == 200
    assert lookups("miss") == misses + 1
    assert lookups("hit") == hits + 2
    # A write invalidates: the next read misses once, then hits again.
    await call(stack, "PATCH", f"/api/v1/users/{user['id']}", {"name": "Changed"})
    status, body = await call(stack, "GET", f"/api/v1/users/{user['id']}")
    assert body["data"]["name"] == "Changed"


async def test_without_redis_users_are_created_read_and_notified(
    stack_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    stack = await stack_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    user = await stack.create_user()
    status, body = await call(stack, "GET", f"/api/v1/users/{user['id']}")
    assert status == 200 and body["data"]["email"] == user["email"]
    status, body = await call(stack, "GET", f"/api/v1/users/{user['id']}")
    assert status == 200
    template = await stack.create_template()
    status, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": "A", "link": "l"},
            "request_id": str(uuid.uuid4()),
        }
    )
    assert status == 202
    await stack.wait_for(body["data"]["notification_id"], "delivered")
    warnings = [r.getMessage() for r in caplog.records if "redis unavailable" in r.getMessage()]
    # Logged once by each component that noticed (the user service's profile cache; the
    # gateway's and the worker's lookups), not once per request.
    assert sum("serving from PostgreSQL" in w for w in warnings) == 1
    assert sum("asking the services directly" in w for w in warnings) <= 2
    async with stack.gateway.session.get(stack.urls["user_service"] + "/health") as response:
        health = await response.json()
    assert response.status == 200 and health["data"]["status"] == "degraded"
    assert health["data"]["checks"]["redis"].startswith("down")


async def test_devices_fcm_onesignal_webpush(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    path = f"/api/v1/users/{user['id']}/devices"
    status, fcm = await call(stack, "POST", path, {"platform": "fcm", "token": "tok-1"})
    assert status == 201 and fcm["data"]["platform"] == "fcm"
    status, again = await call(stack, "POST", path, {"platform": "fcm", "token": "tok-1"})
    assert status == 201 and again["data"]["id"] == fcm["data"]["id"]  # same token: one device
    status, _ = await call(stack, "POST", path, {"platform": "onesignal", "token": "sub-1"})
    assert status == 201
    status, web = await call(stack, "POST", path, {"platform": "webpush", "subscription": WEBPUSH})
    assert status == 201 and web["data"]["token"] == WEBPUSH["endpoint"]
    assert web["data"]["subscription"] == WEBPUSH
    status, listing = await call(stack, "GET", path)
    assert status == 200 and sorted(d["platform"] for d in listing["data"]) == ["fcm", "onesignal", "webpush"]
    status, _ = await call(stack, "DELETE", f"{path}/{fcm['data']['id']}")
    assert status == 200
    status, listing = await call(stack, "GET", path)
    assert sorted(d["platform"] for d in listing["data"]) == ["onesignal", "webpush"]
    status, body = await call(stack, "DELETE", f"{path}/{fcm['data']['id']}")
    assert status == 404 and body["error"] == "not_found"


@pytest.mark.parametrize(
    ("device", "field"),
    [
        ({"platform": "sms", "token": "x"}, "platform"),
        ({"platform": "fcm"}, "token"),
        ({"platform": "webpush"}, "subscription"),
        (
            {"platform": "webpush", "subscription": {**WEBPUSH, "endpoint": "http://push.example.com/x"}},
            "subscription.endpoint",
        ),
        (
            {
                "platform": "webpush",
                "subscription": {**WEBPUSH, "keys": {**WEBPUSH["keys"], "p256dh": b64(b"\x04" * 10)}},
            },
            "subscription.keys.p256dh",
        ),
        (
            {"platform": "webpush", "subscription": {**WEBPUSH, "keys": {**WEBPUSH["keys"], "auth": "!!!"}}},
            "subscription.keys.auth",
        ),
    ],
)
async def test_malformed_devices_are_400_naming_the_field(
    stack_factory: Any, device: dict[str, Any], field: str
) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    status, body = await call(stack, "POST", f"/api/v1/users/{user['id']}/devices", device)
    assert status == 400, body
    assert field in body["data"]["fields"]


async def test_login_and_the_self_service_boundary(
    stack_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack = await stack_factory(workers=False)
    me = await stack.create_user(email=_unique_email("me"))
    other = await stack.create_user(email=_unique_email("other"))

    response = await stack.gateway.post(
        "/api/v1/auth/login", json={"email": me["email"].upper(), "password": PASSWORD}
    )
    login = await response.json()
    assert response.status == 200, login
    token = login["data"]["access_token"]
    assert login["data"]["token_type"] == "bearer" and login["data"]["expires_in"] == 3600

    wrong = await stack.gateway.post(
        "/api/v1/auth/login", json={"email": me["email"], "password": "wrong password"}
    )
    unknown = await stack.gateway.post(
        "/api/v1/auth/login", json={"email": "nobody@example.com", "password": PASSWORD}
    )
    assert wrong.status == unknown.status == 401
    assert await wrong.json() == await unknown.json()

    assert (await call(stack, "GET", f"/api/v1/users/{me['id']}", token=token))[0] == 200
    status, body = await call(
        stack, "PUT", f"/api/v1/users/{me['id']}/preferences", {"push": False}, token=token
    )
    assert status == 200 and body["data"]["push"] is False
    status, _ = await call(
        stack, "POST", f"/api/v1/users/{me['id']}/devices", {"platform": "fcm", "token": "mine"}, token=token
    )
    assert status == 201
    forbidden: tuple[tuple[str, str, Any], ...] = (
        ("GET", f"/api/v1/users/{other['id']}", None),
        ("PATCH", f"/api/v1/users/{other['id']}", {"name": "pwned"}),
        ("PUT", f"/api/v1/users/{other['id']}/preferences", {"email": False}),
        ("GET", f"/api/v1/users/{other['id']}/devices", None),
        ("GET", "/api/v1/users/", None),
        ("POST", "/api/v1/users/", {"name": "x", "email": _unique_email(), "password": PASSWORD}),
        ("POST", "/api/v1/notifications/", {"notification_type": "email"}),
        ("GET", "/api/v1/notifications/", None),
        ("GET", "/api/v1/templates/", None),
    )
    for method, path, payload in forbidden:
        status, answer = await call(stack, method, path, payload, token=token)
        assert status == 403, (method, path, answer)
        assert answer["error"] == "forbidden"
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert (await call(stack, "GET", f"/api/v1/users/{me['id']}", token=tampered))[0] == 401

    # Neither the password nor the token appears in a log line.
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert PASSWORD not in text and token not in text


async def test_the_user_service_itself_accepts_only_internal_or_user_tokens(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    url = stack.urls["user_service"] + "/api/v1/users/"
    session = stack.gateway.session
    for headers in ({}, stack.headers(), {"Authorization": "Bearer nope"}):
        async with session.get(url, headers=headers) as response:
            assert response.status == 401
    async with session.get(
        url, headers={"Authorization": f"Bearer {stack.config.internal_api_token}"}
    ) as response:
        assert response.status == 200


async def test_login_against_a_hash_written_by_hand_is_refused_not_a_500(stack: Stack) -> None:
    # A row another tool wrote (an import, a fix by hand) holds no hash of ours: it matches nothing.
    email = f"{uuid.uuid4().hex}@example.com"
    users_db = await db.connect(stack.config.users_db_url)
    try:
        await users_db.execute(
            "INSERT INTO users (name, email, password_hash) VALUES ('Hand', %s, 'x')", email
        )
    finally:
        await users_db.close()
    response = await stack.gateway.post("/api/v1/auth/login", json={"email": email, "password": "x"})
    assert response.status == 401, await response.text()
    assert (await response.json())["error"] == "invalid_credentials"
