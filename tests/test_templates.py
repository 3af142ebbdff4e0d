"""Template service through the gateway: versions, rollback, language fallback, safe rendering."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import pytest

from common.lru import LRU
from common.rendering.templating import _COMPILED, compile_source
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
        "{{ name.center(n) }}",
        "{{ name|center(n) }}",
        "{{ name|indent(n) }}",
        "{{ ('ab' * 400000)|replace('', name) }}",
        "{{ name * n }}",
        "{{ 2 ** (n // 1000) }}",
        "{{ '{:>{w}}'.format(name, w=n) }}",
        "{% set a = [name] * 1000 %}{% set b = [a] * 1000 %}{% set c = [b] * 1000 %}{{ c }}",
        "{% set ns = namespace(s=name * 900000) %}{% for i in range(12) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}",
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}x",
    ],
)
async def test_template_injection_neither_executes_nor_hangs(stack_factory: Any, hostile: str) -> None:
    """What only the variables make hostile is refused at render: a 422 naming the budget."""
    stack = await stack_factory(workers=False)
    code = _code("evil")
    await stack.create_template(code, subject="s", body=hostile)
    started = time.monotonic()
    status, body = await call(
        stack, "POST", f"/api/v1/templates/{code}/render", {"variables": {"name": "x", "n": 200_000_000}}
    )
    assert time.monotonic() - started < 6
    assert status == 422, body
    assert body["error"] in {
        "template_refused",
        "render_timeout",
        "render_too_large",
        "render_error",
        "missing_variable",
    }
    assert "<class" not in str(body) and "subclasses" not in body["message"].lower()
    if body["error"] in {"render_timeout", "render_too_large"}:
        assert "budget" in body["message"]


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ lipsum(100000, False, 200, 201) }}",
        "{{ 'x'|center(200000000) }}",
        "{{ '%200000000s' % 'x' }}",
        "{{ 'x' * 100000000 }}",
        "{{ '{:>200000000}'.format('x') }}",
        "{{ range(1000000000)|list }}",
        "{{ 2 ** 100000000 }}",
        "{{ 'x'.ljust(5000000) }}",
    ],
)
async def test_templates_beyond_a_budget_are_refused_at_creation(stack_factory: Any, hostile: str) -> None:
    stack = await stack_factory(workers=False)
    request = {"code": _code("big"), "notification_type": "email", "subject": "s", "body": hostile}
    status, body = await call(stack, "POST", "/api/v1/templates/", request)
    assert status == 400, body
    assert "budget" in body["data"]["fields"]["body"] or "exponent" in body["data"]["fields"]["body"]
    code = _code("bigput")
    await stack.create_template(code, subject="s", body="fine")
    status, body = await call(stack, "PUT", f"/api/v1/templates/{code}", {"body": hostile})
    assert status == 400 and "body" in body["data"]["fields"]


async def test_an_ordinary_template_with_big_numbers_still_renders(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    code = _code("nums")
    await stack.create_template(
        code,
        subject="{{ '%05d' % 42 }}",
        body="<p>{{ '{:,}'.format(amount) }} {{ name|center(9) }} {{ [name, name]|join(', ') }}</p>",
    )
    variables = {"name": "Ada", "amount": 1234567890}
    status, body = await call(stack, "POST", f"/api/v1/templates/{code}/render", {"variables": variables})
    assert status == 200, body
    assert body["data"]["subject"] == "00042"
    assert body["data"]["body"] == "<p>1,234,567,890    Ada    Ada, Ada</p>"


async def test_health_answers_within_a_second_while_a_hostile_render_is_refused(
    stack_factory: Any,
) -> None:
    """Renders run in child processes: the template service's event loop stays free."""
    stack = await stack_factory(workers=False)
    slow, hungry = _code("slow"), _code("hungry")
    loops = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    await stack.create_template(slow, subject="s", body=loops)
    await stack.create_template(
        hungry, subject="s", body="{% set a = [n] * 1000 %}{% set b = [a] * 1000 %}{{ [b] * 1000 }}"
    )
    session = stack.gateway.session
    live = stack.urls["template_service"] + "/health/live"

    async def render(code: str) -> tuple[int, dict[str, Any]]:
        return await call(stack, "POST", f"/api/v1/templates/{code}/render", {"variables": {"n": 1}})

    renders = [asyncio.create_task(render(slow)), asyncio.create_task(render(hungry))]
    await asyncio.sleep(0.3)  # both renders under way
    slowest = 0.0
    while not all(task.done() for task in renders):
        started = time.monotonic()
        async with session.get(live, timeout=aiohttp.ClientTimeout(total=5)) as response:
            assert response.status == 200
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    assert slowest < 1.0
    (status_slow, body_slow), (status_hungry, body_hungry) = [task.result() for task in renders]
    assert status_slow == 422 and body_slow["error"] == "render_timeout", body_slow
    assert "time budget" in body_slow["message"]
    # Past the memory budget, or on a busy machine past the time budget first.
    assert status_hungry == 422 and body_hungry["error"] in {"render_too_large", "render_timeout"}
    assert "budget" in body_hungry["message"], body_hungry
    # The pool replaced what it killed: the next render works.
    ok = _code("ok")
    await stack.create_template(ok, subject="s {{ n }}", body="b")
    status, body = await render(ok)
    assert status == 200 and body["data"]["subject"] == "s 1"


async def test_a_worker_fails_a_hostile_notification_and_carries_on(stack: Stack) -> None:
    code = _code("wevil")
    await stack.create_template(code, subject="s", body="{{ name * 100000 }}{{ name|center(n) }}")
    user = await stack.create_user()
    hostile = await _send(stack, user["id"], code, variables={"name": "Ada", "n": 10**9})
    record = await stack.wait_for(hostile["notification_id"], "failed")
    assert "output budget" in record["error"]
    fine = _code("wfine")
    await stack.create_template(fine, subject="s", body="<p>{{ name }}</p>")
    accepted = await _send(stack, user["id"], fine)
    await stack.wait_for(accepted["notification_id"], "delivered")


def test_the_compiled_template_cache_is_bounded_by_bytes() -> None:
    cache: LRU[str, str] = LRU(1_000_000)
    for n in range(50):
        cache.put(f"k{n}", "v", 100_000)
    assert cache.size <= 1_000_000 and len(cache) == 10
    assert cache.get("k49") == "v" and cache.get("k0") is None
    for n in range(200):
        source = f"{{{{ name }}}} {n} " + "x" * 90_000
        compile_source(source, True)
    assert _COMPILED.size <= _COMPILED.limit


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
