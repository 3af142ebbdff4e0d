"""Hostile input: every bad request gets a clear 4xx and a bounded cost (never a 500, never 503
for what the client sent)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pytest

from tests.conftest import Stack


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
