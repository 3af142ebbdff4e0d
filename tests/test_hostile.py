"""Hostile input: every bad request gets a clear 4xx and a bounded cost (never a 500, never 503
for what the client sent)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, Stack


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for n in range(depth - 1):
        value = {"k": value} if n % 2 else [value]
    return value


def _raw_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [33, 300, 1100])
@pytest.mark.parametrize("field", ["variables", "metadata"])
async def test_deep_json_is_a_400_naming_the_field(stack_factory: Any, field: str, depth: int) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    body = {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": "welcome",
        "request_id": str(uuid.uuid4()),
        "variables": {"name": "Ada"},
        "metadata": {},
    }
    if depth > 200:  # beyond what orjson writes (and, at 1,100, reads): built as bytes
        body[field] = "PLACEHOLDER"
        raw = orjson.dumps(body).replace(b'"PLACEHOLDER"', b'{"deep": ' + _raw_nested(depth) + b"}")
    else:
        body[field] = {"deep": _nested(depth)}
        raw = orjson.dumps(body)
    response = await stack.gateway.post(
        "/api/v1/notifications/",
        data=raw,
        headers={**stack.headers(), "Content-Type": "application/json"},
    )
    answer = await response.json()
    assert response.status == 400, answer
    assert answer["error"] == "validation_error"
    assert "32 levels" in answer["data"]["fields"][field]


async def test_32_levels_are_accepted(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    code = f"deep-{time.time_ns()}"
    await stack.create_template(code, subject="s", body="<p>{{ name }}</p>")
    status, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": code,
            "request_id": str(uuid.uuid4()),
            "variables": {"name": "Ada", "nested": _nested(31)},
            "metadata": {"deep": _nested(31)},
        }
    )
    assert status == 202, body


async def test_deep_json_to_the_other_services_is_refused_too(stack: Stack) -> None:
    code = f"deepr-{time.time_ns()}"
    await stack.create_template(code, subject="s", body="b")
    for path, body in (
        (f"/api/v1/templates/{code}/render", {"variables": {"x": _nested(300)}}),
        (
            "/api/v1/users/",
            {"name": "x", "email": "d@example.com", "password": "p" * 8, "preferences": _nested(40)},
        ),
    ):
        response = await stack.gateway.post(path, json=body, headers=stack.headers())
        answer = await response.json()
        assert response.status == 400, answer
        assert any("32 levels" in v for v in answer["data"]["fields"].values())


async def _login(stack: Stack, email: str, password: str, address: str | None = None) -> Any:
    """Through the gateway, or (with `address`) straight to the user service as the gateway
    would call it, to stand for a client at that address."""
    body = {"email": email, "password": password}
    if address is None:
        return await stack.gateway.post("/api/v1/auth/login", json=body, headers=stack.headers())
    return await stack.gateway.session.post(
        stack.urls["user_service"] + "/api/v1/auth/login",
        json=body,
        headers={"Authorization": f"Bearer {stack.config.internal_api_token}", "X-Forwarded-For": address},
    )


async def test_logins_are_throttled_per_email_and_per_address(stack_factory: Any) -> None:
    # An unusual window gives this test Redis counters of its own.
    stack = await stack_factory(workers=False, login_rate_limit=10, login_rate_window=61.7)
    user = await stack.create_user(password="correct horse battery")
    for n in range(10):
        response = await _login(stack, user["email"], "wrong password", address=f"198.51.100.{n}")
        assert response.status == 401
    response = await _login(stack, user["email"], "correct horse battery", address="198.51.100.99")
    body = await response.json()
    assert response.status == 429 and body["error"] == "rate_limited", body
    assert 1 <= int(response.headers["Retry-After"]) <= 62

    # One address trying many emails, through the gateway, which passes on the client's address.
    for n in range(10):
        response = await _login(stack, f"nobody-{n}-{time.time_ns()}@example.com", "x")
        assert response.status == 401, await response.text()
    response = await _login(stack, f"nobody-{time.time_ns()}@example.com", "x")
    assert response.status == 429 and "Retry-After" in response.headers


async def test_wrong_api_keys_from_one_address_are_refused_past_the_limit_even_at_once(
    stack_factory: Any,
) -> None:
    window = 3.7  # an unusual window: Redis counters of this test's own
    stack = await stack_factory(workers=False, wrong_key_limit=5, wrong_key_window=window)

    async def with_key(key: str) -> tuple[int, dict[str, Any], Any]:
        answer = await stack.gateway.get("/api/v1/notifications/", headers=stack.headers(key))
        return answer.status, dict(answer.headers), await answer.json()

    # The burst's Redis connections opened beforehand: on a loaded machine twenty opened at once
    # can take longer than the connect timeout, and the count fails open.
    assert {s for s, _, _ in await asyncio.gather(*(with_key(API_KEY) for _ in range(24)))} == {200}
    # Counters are per window of the clock: start just after a boundary, so the burst is in one.
    await asyncio.sleep(window - time.time() % window + 0.05)
    # A credential shaped as a user's token (an expired one, say) is not a guessed key.
    tokens = await asyncio.gather(*(with_key(f"a.b.{n}") for n in range(8)))
    assert [status for status, _, _ in tokens] == [401] * 8
    guesses = await asyncio.gather(*(with_key(f"guess-{uuid.uuid4()}") for _ in range(20)))
    statuses = [status for status, _, _ in guesses]
    assert statuses.count(401) == 5 and statuses.count(429) == 15, statuses
    refused = next(body for status, _, body in guesses if status == 429)
    assert refused["error"] == "too_many_wrong_keys", refused

    # The address is refused with the right key too, until the window ends; then served again.
    status, headers, body = await with_key(API_KEY)
    assert status == 429 and body["error"] == "too_many_wrong_keys", body
    assert 1 <= int(headers["Retry-After"]) <= 4
    await asyncio.sleep(window - time.time() % window + 0.1)
    status, _, body = await with_key(API_KEY)
    assert status == 200, body


async def test_password_hashing_is_bounded_under_a_flood(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False, login_rate_limit=0)
    statuses = await asyncio.gather(
        *(
            _login(stack, f"flood-{n}-{time.time_ns()}@example.com", "x", address=f"203.0.113.{n}")
            for n in range(80)
        )
    )
    codes = [r.status for r in statuses]
    assert set(codes) <= {401, 429} and codes.count(429) > 0, codes
    assert all(r.headers.get("Retry-After") == "1" for r in statuses if r.status == 429)
    hashing = [t for t in threading.enumerate() if t.name.startswith("scrypt")]
    assert 1 <= len(hashing) <= 2


async def _get(stack: Stack, path: str) -> tuple[int, dict[str, Any]]:
    response = await stack.gateway.get(path, headers=stack.headers())
    return response.status, await response.json()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/templates/{code}?version=%C2%B2", 400),
        ("/api/v1/templates/{code}?version=%D9%A1", 400),
        ("/api/v1/templates/{code}?version=99999999999", 400),
        ("/api/v1/templates/{code}?version=+1", 400),
        ("/api/v1/templates/{code}?language=%00", 400),
        ("/api/v1/templates/{code}/versions?page=%D9%A1", 400),
        ("/api/v1/templates/{code}/versions?page=1001", 400),
        ("/api/v1/templates/{code}/versions?limit=1_0", 400),
        ("/api/v1/templates/x%00y", 404),
        ("/api/v1/notifications/?page=99999999999999999999", 400),
        ("/api/v1/users/?limit=%C2%B2", 400),
    ],
)
async def test_numbers_and_names_in_urls_are_parsed_strictly(
    stack_factory: Any, path: str, status: int
) -> None:
    stack = await stack_factory(workers=False)
    code = f"ids-{time.time_ns()}"
    await stack.create_template(code, subject="s", body="b")
    got, body = await _get(stack, path.format(code=code))
    assert got == status, body
    assert body["success"] is False and body["message"]


async def test_out_of_range_versions_are_404_or_400_not_500(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    code = f"ver-{time.time_ns()}"
    await stack.create_template(code, subject="s", body="b")
    for version in ("99999999999", "%C2%B2", "0"):
        response = await stack.gateway.post(
            f"/api/v1/templates/{code}/versions/{version}/activate", json={}, headers=stack.headers()
        )
        assert response.status == 404, await response.text()
    response = await stack.gateway.post(
        f"/api/v1/templates/{code}/render",
        json={"version": 99999999999, "variables": {}},
        headers=stack.headers(),
    )
    body = await response.json()
    assert response.status == 400 and "version" in body["data"]["fields"]


async def test_concurrent_creates_of_one_new_code_are_one_201_and_409s(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    code = f"race-{time.time_ns()}"
    request = {"code": code, "notification_type": "email", "subject": "s", "body": "b"}
    responses = await asyncio.gather(
        *(stack.gateway.post("/api/v1/templates/", json=request, headers=stack.headers()) for _ in range(8))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 7, statuses


async def test_the_versions_list_is_paginated(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    code = f"pages-{time.time_ns()}"
    await stack.create_template(code, subject="s", body="v1")
    for n in (2, 3):
        response = await stack.gateway.put(
            f"/api/v1/templates/{code}", json={"body": f"v{n}"}, headers=stack.headers()
        )
        assert response.status == 200
    status, body = await _get(stack, f"/api/v1/templates/{code}/versions?limit=2")
    assert status == 200 and [v["version"] for v in body["data"]] == [1, 2]
    assert body["meta"]["total"] == 3 and body["meta"]["has_next"] is True
    status, body = await _get(stack, f"/api/v1/templates/{code}/versions?limit=2&page=2")
    assert [v["version"] for v in body["data"]] == [3] and body["meta"]["has_next"] is False


async def test_the_notifications_list_pages_by_cursor_without_counting(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    code = f"list-{time.time_ns()}"
    await stack.create_template(code, subject="s", body="b")
    sent = []
    for _ in range(7):
        status, body, _ = await stack.send(
            {
                "notification_type": "email",
                "user_id": user["id"],
                "template_code": code,
                "request_id": str(uuid.uuid4()),
                "variables": {},
            }
        )
        assert status == 202
        sent.append(body["data"]["notification_id"])

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = f"user_id={user['id']}&limit=3" + (f"&after={cursor}" if cursor else "")
        status, body = await _get(stack, f"/api/v1/notifications/?{query}")
        assert status == 200, body
        assert body["meta"]["total"] is None and body["meta"]["limit"] == 3
        seen += [n["notification_id"] for n in body["data"]]
        pages += 1
        cursor = body["meta"]["next"]
        assert body["meta"]["has_next"] is (cursor is not None)
        if cursor is None:
            break
    assert pages == 3 and sorted(seen) == sorted(sent) and len(seen) == 7  # each once
    created = [
        n["created_at"]
        for n in (await _get(stack, f"/api/v1/notifications/?user_id={user['id']}"))[1]["data"]
    ]
    assert created == sorted(created, reverse=True)  # newest first

    status, body = await _get(stack, f"/api/v1/notifications/?user_id={user['id']}&limit=3&page=3")
    assert status == 200 and len(body["data"]) == 1 and body["meta"]["has_next"] is False
    assert body["meta"]["has_previous"] is True
    for bad in ("after=garbage", "after=eyJ4IjoxfQ", f"after={cursor or 'x'}&page=2", "page=1001"):
        status, body = await _get(stack, f"/api/v1/notifications/?{bad}")
        assert status == 400, (bad, body)
