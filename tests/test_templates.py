"""Template service through the gateway: versions, rollback, language fallback, safe rendering."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.conftest import Stack


async def call(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    response = await stack.gateway.request(method, path, json=body, headers=stack.headers())
    return response.status, await response.json()


def _code(tag: str = "tpl") -> str:
    return f"{tag}-{time.time_ns()}"


async def _send(stack: Stack, user_id: str, code: str, **extra: Any) -> dict[str, Any]:
    status, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user_id,
            "template_code": code,
            "variables": {"name": "Ada"},
            "request_id": str(uuid.uuid4()),
            **extra,
        }
    )
    assert status == 202, body
    return body["data"]


async def test_versions_history_and_rollback_drive_the_next_notification(stack: Stack) -> None:
    code = _code()
    await stack.create_template(code, subject="Hi {{ name }}", body="<p>version one {{ name }}</p>")
    for n in (2, 3):
        status, body = await call(
            stack, "PUT", f"/api/v1/templates/{code}", {"body": f"<p>version {n} {{{{ name }}}}</p>"}
        )
        assert status == 200, body
        assert body["data"]["version"] == n and body["data"]["active_version"] == n
        assert body["data"]["subject"] == "Hi {{ name }}"  # unchanged parts carry over

    status, body = await call(stack, "GET", f"/api/v1/templates/{code}/versions")
    assert status == 200
    versions = body["data"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["active"] for v in versions] == [False, False, True]
    assert all(v["created_by"].startswith("client:") and v["created_at"] for v in versions)

    status, body = await call(stack, "GET", f"/api/v1/templates/{code}?version=1")
    assert status == 200 and body["data"]["body"] == "<p>version one {{ name }}</p>"

    status, body = await call(stack, "POST", f"/api/v1/templates/{code}/versions/2/activate", {})
    assert status == 200 and body["data"]["active_version"] == 2 and body["data"]["version"] == 2
    status, body = await call(stack, "GET", f"/api/v1/templates/{code}/versions")
    assert [v["active"] for v in body["data"]] == [False, True, False]  # history kept

    user = await stack.create_user()
    accepted = await _send(stack, user["id"], code)
    record = await stack.wait_for(accepted["notification_id"], "delivered")
    assert record["template_version"] == 2
    [message] = stack.smtp.to(user["email"])
    html = message.get_body(("html",))
    assert html is not None and "version 2 Ada" in html.get_content()

    status, body = await call(stack, "POST", f"/api/v1/templates/{code}/versions/9/activate", {})
    assert status == 404


async def test_language_falls_back_pt_br_to_pt_to_default(stack: Stack) -> None:
    code = _code("lang")
    await stack.create_template(code, language="en", subject="Hello {{ name }}", body="<p>en</p>")

    async def rendered(language: str) -> tuple[str, int, str]:
        status, body = await call(
            stack,
            "POST",
            f"/api/v1/templates/{code}/render",
            {"language": language, "variables": {"name": "Ana"}},
        )
        assert status == 200, body
        return body["data"]["language"], body["data"]["version"], body["data"]["subject"]

    assert await rendered("pt-BR") == ("en", 1, "Hello Ana")  # nothing Portuguese: the default
    status, body = await call(
        stack,
        "PUT",
        f"/api/v1/templates/{code}",
        {"language": "pt", "subject": "Olá {{ name }}", "body": "<p>pt</p>"},
    )
    assert status == 200 and body["data"]["version"] == 1 and body["data"]["language"] == "pt"
    assert await rendered("pt-BR") == ("pt", 1, "Olá Ana")  # pt-BR → pt
    status, _ = await call(
        stack,
        "PUT",
        f"/api/v1/templates/{code}",
        {"language": "pt-br", "subject": "Oi {{ name }}", "body": "<p>br</p>"},
    )
    assert status == 200
    assert await rendered("pt-BR") == ("pt-BR", 1, "Oi Ana")
    assert await rendered("fr") == ("en", 1, "Hello Ana")

    user = await stack.create_user()
    accepted = await _send(stack, user["id"], code, language="pt-BR")
    record = await stack.wait_for(accepted["notification_id"], "delivered")
    assert record["language"] == "pt-BR" and record["template_version"] == 1
    assert stack.smtp.to(user["email"])[0]["Subject"] == "Oi Ada"


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''|attr('__class__')|attr('__mro__') }}",
        "{{ name.__init__.__globals__ }}",
        "{{ range(1000000000)|list }}",
        "{{ 'a' * 100000000 }}",
        "{{ 2 ** 100000000 }}",
        "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}",
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}x",
    ],
)
async def test_template_injection_neither_executes_nor_hangs(stack_factory: Any, hostile: str) -> None:
    stack = await stack_factory(workers=False)
    code = _code("evil")
    await stack.create_template(code, subject="s", body=hostile)
    started = time.monotonic()
    status, body = await call(stack, "POST", f"/api/v1/templates/{code}/render", {"variables": {"name": "x"}})
    assert time.monotonic() - started < 6
    assert status == 422, body
    assert body["error"] in {
        "template_refused",
        "render_timeout",
        "render_too_large",
        "missing_variable",
        "render_error",
    }
    assert ("<class" not in str(body) and "subclasses" not in body["message"].lower()) or body[
        "error"
    ] != "rendered"
    assert body["message"]


async def test_script_is_escaped_in_html_and_intact_in_text(stack: Stack) -> None:
    code = _code("xss")
    await stack.create_template(
        code, subject="For {{ name }}", body="<p>Hi {{ name }}</p>", text_body="Hi {{ name }}"
    )
    status, body = await call(
        stack,
        "POST",
        f"/api/v1/templates/{code}/render",
        {"variables": {"name": "<script>alert(1)</script>"}},
    )
    assert status == 200
    assert body["data"]["body"] == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert body["data"]["text_body"] == "Hi <script>alert(1)</script>"
    assert body["data"]["subject"] == "For <script>alert(1)</script>"

    user = await stack.create_user()
    status, sent, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": code,
            "variables": {"name": "<script>alert(1)</script>"},
            "request_id": str(uuid.uuid4()),
        }
    )
    await stack.wait_for(sent["data"]["notification_id"], "delivered")
    [message] = stack.smtp.to(user["email"])
    html, text = message.get_body(("html",)), message.get_body(("plain",))
    assert html is not None and text is not None
    assert "&lt;script&gt;" in html.get_content() and "<script>" not in html.get_content()
    assert "Hi <script>alert(1)</script>" in text.get_content()


async def test_text_part_is_generated_from_html_when_absent(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    code = _code("gen")
    await stack.create_template(
        code, subject="s", body="<h1>Title</h1><p>Hello <b>{{ name }}</b></p><style>x{}</style>"
    )
    status, body = await call(
        stack, "POST", f"/api/v1/templates/{code}/render", {"variables": {"name": "Ada"}}
    )
    assert status == 200 and body["data"]["text_body"] == "Title\nHello Ada"


async def test_a_newline_in_a_subject_cannot_add_a_mail_header(stack: Stack) -> None:
    status, body = await call(
        stack,
        "POST",
        "/api/v1/templates/",
        {
            "code": _code("nl"),
            "notification_type": "email",
            "subject": "Hi\nBcc: evil@example.com",
            "body": "x",
        },
    )
    assert status == 400 and body["data"]["fields"]["subject"] == "must be a single line"

    code = _code("nlvar")
    await stack.create_template(code, subject="Hi {{ name }}", body="<p>x</p>")
    user = await stack.create_user()
    status, sent, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": code,
            "variables": {"name": "Ada\r\nBcc: evil@example.com\r\n\r\nbody"},
            "request_id": str(uuid.uuid4()),
        }
    )
    await stack.wait_for(sent["data"]["notification_id"], "delivered")
    [message] = stack.smtp.to(user["email"])
    assert message["Bcc"] is None
    assert message["Subject"] == "Hi Ada Bcc: evil@example.com body"
    assert stack.smtp.envelopes[-1][1] == [user["email"]]


async def test_syntax_errors_are_refused_with_the_line(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    status, body = await call(
        stack,
        "POST",
        "/api/v1/templates/",
        {
            "code": _code("syn"),
            "notification_type": "email",
            "subject": "ok",
            "body": "<p>\n{% if x %}\nno end</p>",
        },
    )
    assert status == 400
    assert "line" in body["data"]["fields"]["body"] and "syntax" in body["data"]["fields"]["body"]


async def test_a_missing_variable_is_a_422_naming_it(stack: Stack) -> None:
    code = _code("miss")
    await stack.create_template(code, subject="Hi {{ name }}", body="<p>{{ link }}</p>")
    status, body = await call(stack, "POST", f"/api/v1/templates/{code}/render", {"variables": {"name": "A"}})
    assert status == 422 and body["error"] == "missing_variable" and "link" in body["message"]
    assert "variables.link" in body["data"]["fields"]
    user = await stack.create_user()
    status, answer, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": code,
            "variables": {"name": "A"},
            "request_id": str(uuid.uuid4()),
        }
    )
    assert status == 422 and "variables.link" in answer["data"]["fields"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"notification_type": "sms"}, "notification_type"),
        ({"code": "has space"}, "code"),
        ({"subject": None}, "subject"),
        ({"title": "push only"}, "title"),
        ({"language": "??"}, "language"),
    ],
)
async def test_bad_template_fields_are_400_naming_them(
    stack_factory: Any, body: dict[str, Any], field: str
) -> None:
    stack = await stack_factory(workers=False)
    request = {"code": _code("bad"), "notification_type": "email", "subject": "s", "body": "b", **body}
    request = {k: v for k, v in request.items() if v is not None}
    status, answer = await call(stack, "POST", "/api/v1/templates/", request)
    assert status == 400, answer
    assert field in answer["data"]["fields"]


async def test_duplicates_listing_and_push_templates(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    code = _code("dup")
    await stack.create_template(code)
    status, body = await call(
        stack,
        "POST",
        "/api/v1/templates/",
        {"code": code, "notification_type": "email", "subject": "s", "body": "b"},
    )
    assert status == 409
    status, body = await call(
        stack,
        "POST",
        "/api/v1/templates/",
        {
            "code": _code("push"),
            "notification_type": "push",
            "title": "Hi {{ name }}",
            "body": "New: {{ what }}",
            "image_url": "https://img.example.com/{{ what }}.png",
            "link": "https://example.com/{{ what }}",
        },
    )
    assert status == 201, body
    status, body = await call(
        stack,
        "POST",
        f"/api/v1/templates/{body['data']['code']}/render",
        {"variables": {"name": "<b>", "what": "x"}},
    )
    assert status == 200
    assert body["data"]["title"] == "Hi <b>" and body["data"]["image_url"] == "https://img.example.com/x.png"
    status, body = await call(stack, "GET", "/api/v1/templates/?limit=1&page=1")
    assert status == 200 and len(body["data"]) == 1 and body["meta"]["has_next"] is True
    status, body = await call(stack, "GET", "/api/v1/templates/nope-nothing")
    assert status == 404 and body["error"] == "not_found"
