"""Templates per project and `recipient`, against the real stack: the same code in two projects
is two templates, another project's code is 404 everywhere and in no list; an email renders
`{{ recipient.name }}` and `{{ recipient.data.plan }}` as pinned at acceptance."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.conftest import API_KEY, Stack

OTHER = "test-other-templates-key-0123"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_same_code_in_two_projects_is_two_templates(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False, gateway_api_keys=(API_KEY, f"other:{OTHER}"))
    code = f"shared-{time.time_ns()}"
    await stack.create_template(code, subject="Mine")
    for method, path, body in (
        ("GET", f"/api/v1/templates/{code}", None),
        ("PUT", f"/api/v1/templates/{code}", {"subject": "Hijacked"}),
        ("GET", f"/api/v1/templates/{code}/versions", None),
        ("POST", f"/api/v1/templates/{code}/versions/1/activate", None),
        ("POST", f"/api/v1/templates/{code}/render", {"variables": {"name": "x", "link": "y"}}),
    ):
        response = await stack.gateway.request(method, path, json=body, headers=_auth(OTHER))
        assert response.status == 404, (method, path, await response.text())
    listed = await (await stack.gateway.get("/api/v1/templates/", headers=_auth(OTHER))).json()
    assert code not in [t["code"] for t in listed["data"]]
    theirs = await stack.create_template(code, key=OTHER, subject="Theirs")
    assert theirs["version"] == 1
    mine = await (await stack.gateway.get(f"/api/v1/templates/{code}", headers=_auth(API_KEY))).json()
    assert mine["data"]["subject"] == "Mine"
    other = await (await stack.gateway.get(f"/api/v1/templates/{code}", headers=_auth(OTHER))).json()
    assert other["data"]["subject"] == "Theirs"


async def test_an_email_renders_the_recipient_pinned_at_acceptance(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    user = await stack.create_user(name="Ada Pinned")
    template = await stack.create_template(
        subject="For {{ recipient.name }}",
        body="<p>Plan {{ recipient.data.plan }}; {{ name }}</p>",
    )
    preview = await stack.gateway.post(
        f"/api/v1/templates/{template['code']}/render",
        json={"variables": {"name": "n"}, "recipient": {"name": "Preview", "data": {"plan": "gold"}}},
        headers=stack.headers(),
    )
    assert preview.status == 200, await preview.text()
    assert (await preview.json())["data"]["subject"] == "For Preview"
    refused = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": "n", "recipient": {"name": "Mallory"}},
            "request_id": f"r-{uuid.uuid4()}",
        }
    )
    assert refused[0] == 400 and "variables.recipient" in refused[1]["data"]["fields"]
    status, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": "n"},
            "request_id": f"r-{uuid.uuid4()}",
        }
    )
    assert status == 202, body
    await stack.wait_for(body["data"]["notification_id"], "delivered")
    [message] = stack.smtp.to(user["email"])
    assert message["Subject"] == "For Ada Pinned"
