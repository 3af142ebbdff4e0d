"""The operator console, driven in a real browser: Debian's Chromium through Playwright, against
the real services started by `stack_factory`. Each page visited is checked for what every page
owes (labelled controls, no script or style refused by the CSP, no horizontal scrolling on a
phone) and photographed; `make screenshots` keeps the photographs in docs/console/."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Page, expect

from console.session import SIGNIN_FAILURES_ALLOWED
from tests.browser import DESKTOP, PHONE
from tests.conftest import API_KEY, Stack
from tests.tcp_proxy import TcpProxy, via


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/console/ under `make screenshots` (CONSOLE_SCREENSHOTS), a scratch folder otherwise:
    a plain test run takes the same pictures without changing files of the repository."""
    chosen = os.environ.get("CONSOLE_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Console:
    """One browser tab on the console, with the checks each page gets."""

    def __init__(self, context: BrowserContext, page: Page, base: str, shots: Path) -> None:
        self.context = context
        self.page = page
        self.base = base
        self.shots = shots
        self.problems: list[str] = []
        page.on("console", self._console_message)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("response", self._response)

    def _console_message(self, message: Any) -> None:
        # A CSP refusal (inline script or style) shows up here as an error. A page answered
        # with an error status is logged too; those are asserted where they are meant.
        if message.type in ("error", "warning") and not message.text.startswith("Failed to load resource"):
            self.problems.append(f"{message.type}: {message.text}")

    def _response(self, response: Any) -> None:
        # What a page loads (stylesheet, script) must load.
        if response.request.resource_type != "document" and response.status >= 400:
            self.problems.append(f"{response.status} for {response.url}")

    def url(self, path: str) -> str:
        return self.base + path

    async def goto(self, path: str) -> Any:
        response = await self.page.goto(self.url(path))
        await self.check()
        return response

    async def check(self) -> None:
        """What every page owes: each visible control labelled, one h1, nothing refused by the
        CSP, and no sideways scrolling."""
        unlabelled = await self.page.evaluate(
            """() => Array.from(document.querySelectorAll('input, select, textarea'))
                .filter(e => e.type !== 'hidden' && !e.hidden)
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
                .map(e => e.outerHTML)"""
        )
        assert unlabelled == [], f"controls without a label on {self.page.url}: {unlabelled}"
        assert await self.page.locator("h1").count() == 1, f"not one h1 on {self.page.url}"
        assert await self.page.get_attribute("html", "lang") == "en"
        overflow = await self.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{self.page.url} scrolls sideways by {overflow}px"
        assert self.problems == [], self.problems

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    async def sign_in(self, key: str = API_KEY) -> None:
        await self.goto("/console")
        await self.page.get_by_label("API key").fill(key)
        await self.page.get_by_role("button", name="Sign in").click()
        await expect(self.page.get_by_role("heading", level=1)).to_have_text("Overview")


async def open_console(
    browser: Browser, stack: Stack, shots: Path, viewport: dict[str, int] = DESKTOP
) -> Console:
    context = await browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    return Console(context, await context.new_page(), stack.urls["gateway"], shots)


def email_body(
    stack: Stack, user: dict[str, Any], template: dict[str, Any], request_id: str
) -> dict[str, Any]:
    return {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": template["code"],
        "variables": {"name": "Ada", "link": "https://example.com/start"},
        "request_id": request_id,
    }


async def send(stack: Stack, user: dict[str, Any], template: dict[str, Any], request_id: str) -> str:
    status, body, _ = await stack.send(email_body(stack, user, template, request_id))
    assert status == 202, body
    return str(body["data"]["notification_id"])


# --- signing in and out ----------------------------------------------------------------------------


async def test_signed_out_pages_redirect_to_sign_in_and_a_wrong_key_is_refused(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(workers=False)
    console = await open_console(browser, stack, screenshots)
    for path in ("/console", "/console/notifications?q=x", f"/console/notifications/{uuid.uuid4()}"):
        await console.goto(path)
        assert console.page.url.startswith(console.url("/console/sign-in?next=")), console.page.url
        await expect(console.page.get_by_role("heading", level=1)).to_have_text("Sign in")
    await console.shot("sign-in")

    # Without a browser: the answer itself is a redirect, not a page saying "sign in".
    async with aiohttp.ClientSession() as http:
        for path in ("/console", "/console/failures", "/console/templates"):
            async with http.get(console.url(path), allow_redirects=False) as response:
                assert response.status == 303
                assert response.headers["Location"].startswith("/console/sign-in?next=")

    await console.page.get_by_label("API key").fill("not-a-key-of-this-gateway")
    await console.page.get_by_role("button", name="Sign in").click()
    await expect(console.page.get_by_role("alert")).to_contain_text("This key is not accepted")
    assert "/console/sign-in" in console.page.url
    assert [c for c in await console.context.cookies() if c["name"] == "notify_console"] == []

    # The page asked for first is where a good key lands.
    await console.goto("/console/failures")
    await console.page.get_by_label("API key").fill(API_KEY)
    await console.page.get_by_role("button", name="Sign in").click()
    await expect(console.page.get_by_role("heading", level=1)).to_have_text("Failures")


async def test_session_cookie_is_signed_strict_and_sign_out_ends_it(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(workers=False, console_keys=("console-only-key-0123456789",))
    console = await open_console(browser, stack, screenshots)
    before = time.time()
    await console.sign_in("console-only-key-0123456789")  # a CONSOLE_KEYS key, not an API key
    (cookie,) = [c for c in await console.context.cookies() if c["name"] == "notify_console"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain http here; Secure whenever the console is on https
    assert cookie["path"] == "/console"
    ttl = stack.config.console_session_ttl
    assert before + ttl - 5 <= cookie["expires"] <= time.time() + ttl + 5

    response = await console.goto("/console")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"

    async with aiohttp.ClientSession() as http:
        jar = {"notify_console": cookie["value"]}
        async with http.get(console.url("/console"), cookies=jar, allow_redirects=False) as answer:
            assert answer.status == 200  # the cookie alone is the session, from any client
        altered = cookie["value"][:-2] + ("AA" if not cookie["value"].endswith("AA") else "BB")
        async with http.get(
            console.url("/console"), cookies={"notify_console": altered}, allow_redirects=False
        ) as a:
            assert a.status == 303

        await console.page.get_by_role("button", name="Sign out").click()
        await expect(console.page.get_by_role("status")).to_have_text("You are signed out.")
        assert [c for c in await console.context.cookies() if c["name"] == "notify_console"] == []
        # The old cookie, replayed after sign-out, no longer opens anything.
        async with http.get(console.url("/console"), cookies=jar, allow_redirects=False) as answer:
            assert answer.status == 303
            assert answer.headers["Location"].startswith("/console/sign-in")


async def test_sign_in_stops_answering_an_address_that_keeps_guessing(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(workers=False)
    client = redis.Redis.from_url(stack.config.redis_url)

    def forget_failures() -> None:
        for key in client.scan_iter("notify:console:signin-failures:*"):
            client.delete(key)

    forget_failures()  # an earlier test's wrong key counts too
    console = await open_console(browser, stack, screenshots)
    page = console.page
    try:
        await console.goto("/console/sign-in")
        for _ in range(SIGNIN_FAILURES_ALLOWED):
            await page.get_by_label("API key").fill(f"guess-{uuid.uuid4()}")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("alert")).to_contain_text("This key is not accepted")
        # Now even the right key is turned away, for the rest of the window.
        await page.get_by_label("API key").fill(API_KEY)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_contain_text("Too many wrong keys")
        assert [c for c in await console.context.cookies() if c["name"] == "notify_console"] == []
    finally:
        # The window would outlast this test: the next ones sign in from the same address.
        forget_failures()
        client.close()
    await console.sign_in()


# --- overview --------------------------------------------------------------------------------------


async def test_overview_counts_chart_and_queue_depths(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    # No workers: what is accepted waits in email.queue, where the overview must see it.
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    opted_out = await stack.create_user(preferences={"email": False, "push": True})
    template = await stack.create_template()
    for i in range(3):
        await send(stack, user, template, f"overview-{i}-{time.time_ns()}")
    await send(stack, opted_out, template, f"overview-skip-{time.time_ns()}")

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await expect(page.locator('td[data-status="pending"][data-window="hour"]')).to_have_text("3")
    await expect(page.locator('td[data-status="skipped"][data-window="day"]')).to_have_text("1")
    await expect(page.locator('td[data-status="delivered"][data-window="hour"]')).to_have_text("0")
    # The outbox publishes off the request path: wait for the queue rather than assume.
    for _ in range(50):
        await page.reload()
        if await page.locator('tr[data-queue="email.queue"] td.num').all_text_contents() == ["3", "0"]:
            break
        await page.wait_for_timeout(100)
    await expect(page.locator('tr[data-queue="email.queue"] td').first).to_have_text("3")
    await expect(page.locator('tr[data-queue="failed.queue"] td').first).to_have_text("0")
    await expect(page.locator('tr[data-queue="email.retry.1"]')).to_have_count(1)
    assert await page.locator("svg polyline.accepted").count() == 1
    await expect(page.locator("figcaption")).to_contain_text("accepted: 4")
    await console.check()
    await console.shot("overview")


# --- notifications -----------------------------------------------------------------------------------


async def test_find_a_notification_by_request_id_and_see_its_timeline(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(webhook_allowed_hosts=("127.0.0.1",))
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    server = TestServer(receiver, host="127.0.0.1")
    await server.start_server()
    response = await stack.gateway.post(
        "/api/v1/webhooks/endpoints",
        json={"url": str(server.make_url("/hook")), "events": ["notification.delivered"]},
        headers=stack.headers(),
    )
    assert response.status == 201, await response.text()
    user = await stack.create_user()
    template = await stack.create_template()
    wanted = f"password-reset-{time.time_ns()}"
    for i in range(2):
        await stack.wait_for(await send(stack, user, template, f"other-{i}-{time.time_ns()}"), "delivered")
    notification_id = await send(stack, user, template, wanted)
    await stack.wait_for(notification_id, "delivered")

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await page.get_by_role("link", name="Notifications").click()
    await expect(page.locator("table.list tbody tr")).to_have_count(3)
    await console.shot("notifications")
    await page.get_by_label("Notification id, user id or request id").fill(wanted)
    await page.get_by_role("button", name="Search").click()
    rows = page.locator("table.list tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(wanted)
    await console.check()
    await rows.first.get_by_role("link").click()

    await expect(page.get_by_role("heading", level=1)).to_contain_text(notification_id)
    await expect(page.locator('dd[data-field="request_id"]')).to_have_text(wanted)
    await expect(page.locator('dd[data-field="provider"]')).to_have_text("smtp")
    timeline = page.locator("ol.timeline li")
    await expect(timeline).to_have_count(3)
    await expect(timeline.nth(0)).to_contain_text("pending")
    await expect(timeline.nth(1)).to_contain_text("sending")
    await expect(timeline.nth(1)).to_contain_text("attempt 1")
    await expect(timeline.nth(2)).to_contain_text("delivered")
    await expect(timeline.nth(2)).to_contain_text("via smtp")
    # The status webhook told about it, once delivered to the receiver.
    for _ in range(100):
        if any(notification_id.encode() in body for body in received):
            break
        await page.wait_for_timeout(100)
    webhook = page.locator("li.webhook")
    for _ in range(50):
        await page.reload()
        if any("delivered after" in text for text in await webhook.all_text_contents()):
            break
        await page.wait_for_timeout(100)
    await expect(webhook).to_have_count(1)
    await expect(webhook).to_contain_text("notification.delivered")
    await expect(webhook).to_contain_text("delivered after 1 attempt(s), last answer HTTP 200")
    await console.check()
    await console.shot("notification")
    await server.close()

    # A user id finds that user's notifications; a status narrows them.
    await console.goto(f"/console/notifications?q={user['id']}&status=delivered")
    await expect(page.locator("table.list tbody tr")).to_have_count(3)
    await console.goto(f"/console/notifications?q={user['id']}&status=failed")
    await expect(page.locator("table.list tbody tr")).to_have_count(0)
    await expect(page.locator("p.empty")).to_contain_text("No notification matches")


async def test_notifications_are_keyset_paged(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    template = await stack.create_template()
    sent = [await send(stack, user, template, f"page-{i:02d}-{time.time_ns()}") for i in range(30)]

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await console.goto("/console/notifications")
    seen: list[str] = []
    for expected in (25, 5):
        rows = page.locator("table.list tbody tr td:first-child a")
        await expect(rows).to_have_count(expected)
        seen += [(await a.get_attribute("href") or "").rsplit("/", 1)[-1] for a in await rows.all()]
        if expected == 25:
            await page.get_by_role("link", name="Next page").click()
            assert "after=" in page.url
    await expect(page.get_by_role("link", name="Next page")).to_have_count(0)
    assert sorted(seen) == sorted(sent) and seen == list(reversed(sent))  # newest first, none twice
    await console.goto("/console/notifications?after=not-a-cursor")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Bad page link")


# --- failures and retries ---------------------------------------------------------------------------


async def test_retry_failed_notifications_one_and_a_selection_and_see_them_delivered(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory()
    user = await stack.create_user()
    template = await stack.create_template()
    # The receiving server refuses the first three for good (5xx: permanent, no automatic retry).
    stack.smtp.script.extend(["550 5.1.1 Mailbox unavailable"] * 3)
    failed = []
    for i in range(3):
        notification_id = await send(stack, user, template, f"fails-{i}-{time.time_ns()}")
        record = await stack.wait_for(notification_id, "failed")
        assert "550" in (record["error"] or "")
        failed.append(notification_id)

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await page.get_by_role("link", name="Failures").click()
    rows = page.locator("table.list tbody tr")
    await expect(rows).to_have_count(3)
    await expect(rows.first).to_contain_text("550 5.1.1 Mailbox unavailable")
    await console.shot("failures")

    # One, by its own button.
    first_request = (await stack.notification(failed[0]))["request_id"]
    await page.get_by_role("button", name=f"Retry {first_request}").click()
    await expect(page.get_by_role("status")).to_have_text("1 notification(s) requeued for delivery.")
    await stack.wait_for(failed[0], "delivered")

    # The other two, selected (by the "Select all" the page's script adds) and retried together.
    await page.reload()
    await expect(rows).to_have_count(2)
    await page.get_by_role("button", name="Select all").click()
    await page.get_by_role("button", name="Retry selected").click()
    await expect(page.get_by_role("status")).to_have_text("2 notification(s) requeued for delivery.")
    for notification_id in failed[1:]:
        await stack.wait_for(notification_id, "delivered")
    await page.reload()
    await expect(page.locator("p.empty")).to_have_text("No failed notifications.")

    # The notification's page tells the story: failed, retried by hand, delivered.
    await console.goto(f"/console/notifications/{failed[0]}")
    await expect(page.locator("p.lead .status")).to_have_text("delivered")
    timeline = page.locator("ol.timeline li")
    await expect(timeline.filter(has_text="550 5.1.1")).to_have_count(1)
    await expect(timeline.filter(has_text="manual retry")).to_have_count(1)
    await expect(timeline.last).to_contain_text("delivered")
    await expect(page.get_by_role("button", name="Retry this notification")).to_have_count(0)
    assert len(stack.smtp.to(user["email"])) == 3


async def test_a_form_without_its_csrf_token_is_refused(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory()
    user = await stack.create_user()
    template = await stack.create_template()
    stack.smtp.script.append("550 5.1.1 Mailbox unavailable")
    notification_id = await send(stack, user, template, f"csrf-{time.time_ns()}")
    await stack.wait_for(notification_id, "failed")

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    await console.goto(f"/console/notifications/{notification_id}")
    token = await console.page.locator('form input[name="csrf_token"]').first.input_value()
    assert token
    retry = console.url(f"/console/notifications/{notification_id}/retry")
    request = console.context.request  # the browser's cookies: signed in, only the token differs
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    forms: list[dict[str, str | float | bool]] = [{}, {"csrf_token": ""}, {"csrf_token": wrong}]
    for form in forms:
        answer = await request.post(retry, form=form, max_redirects=0)
        assert answer.status == 403, form
        assert "csrf_token" in await answer.text()
    assert (await stack.notification(notification_id))["status"] == "failed"  # nothing changed

    # Sign-in and sign-out are forms too.
    answer = await request.post(console.url("/console/sign-in"), form={"api_key": API_KEY}, max_redirects=0)
    assert answer.status == 403
    answer = await request.post(console.url("/console/sign-out"), form={}, max_redirects=0)
    assert answer.status == 403

    # The same request with the token is taken: the refusals above were the token's doing.
    answer = await request.post(retry, form={"csrf_token": token}, max_redirects=0)
    assert answer.status == 303
    await stack.wait_for(notification_id, "delivered")


# --- templates -------------------------------------------------------------------------------------


async def test_preview_and_roll_back_a_template(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(workers=False)
    code = f"reset-{time.time_ns()}"
    await stack.create_template(
        code, subject="Reset your password, {{ name }} (v1)", body="<p>v1: <a href='{{ link }}'>reset</a></p>"
    )
    response = await stack.gateway.put(
        f"/api/v1/templates/{code}",
        json={"subject": "Reset it now, {{ name }} (v2)", "body": "<p>v2 for {{ name }}: {{ link }}</p>"},
        headers=stack.headers(),
    )
    assert response.status == 200, await response.text()

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await page.get_by_role("link", name="Templates").click()
    await expect(page.get_by_role("link", name=code)).to_have_count(1)
    await console.shot("templates")
    await page.get_by_role("link", name=code).click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text(code)
    await expect(page.locator('tr[data-version="2"]')).to_contain_text("active")

    # Sample variables come filled in from what the template uses.
    variables = page.get_by_label("Sample variables (JSON)")
    assert '"name"' in await variables.input_value() and '"link"' in await variables.input_value()
    await variables.fill('{"name": "<b>Grace</b>", "link": "https://example.com/r"}')
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator('dd[data-part="subject"]')).to_have_text("Reset it now, <b>Grace</b> (v2)")
    frame = page.frame_locator("iframe.rendered")
    # The HTML body is autoescaped as the API renders it: the variable's tags are text.
    await expect(frame.locator("p")).to_have_text("v2 for <b>Grace</b>: https://example.com/r")
    assert await frame.locator("b").count() == 0
    await console.check()
    await console.shot("template")

    # A variable the template needs and the sample lacks is named.
    await variables.fill('{"name": "Grace"}')
    await page.get_by_role("button", name="Preview").click()
    await expect(page.get_by_role("alert")).to_contain_text("link")

    # An older version previewed, then made active again, after a confirmation.
    await page.get_by_label("Version").fill("1")
    await variables.fill('{"name": "Grace", "link": "https://example.com/r"}')
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator('dd[data-part="subject"]')).to_have_text("Reset your password, Grace (v1)")
    await page.get_by_role("link", name="Activate v1…").click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("Activate version 1")
    await expect(page.locator("main")).to_contain_text("instead of version 2")
    await console.check()
    await console.shot("activate")
    assert (await (await stack.gateway.get(f"/api/v1/templates/{code}", headers=stack.headers())).json())[
        "data"
    ]["version"] == 2  # asking changed nothing
    await page.get_by_role("button", name="Yes, activate v1").click()
    await expect(page.get_by_role("status")).to_have_text("Version 1 is now the active version.")
    await expect(page.locator('tr[data-version="1"]')).to_contain_text("active")
    await expect(page.get_by_role("link", name="Activate v2…")).to_have_count(1)
    active = await (await stack.gateway.get(f"/api/v1/templates/{code}", headers=stack.headers())).json()
    assert active["data"]["version"] == 1


# --- users -----------------------------------------------------------------------------------------


async def test_a_users_page_preferences_and_device_removal(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user(name="Grace Hopper")
    template = await stack.create_template()
    await send(stack, user, template, f"user-page-{time.time_ns()}")
    devices = []
    for token in ("fcm-token-aaaaaaaaaaaaaaaaaaaaaaaa", "fcm-token-bbbbbbbbbbbbbbbbbbbbbbbb"):
        response = await stack.gateway.post(
            f"/api/v1/users/{user['id']}/devices",
            json={"platform": "fcm", "token": token},
            headers=stack.headers(),
        )
        assert response.status in (200, 201), await response.text()
        devices.append((await response.json())["data"]["id"])

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await page.get_by_label("User id").fill(user["id"])
    await page.get_by_role("button", name="Open user").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Grace Hopper")
    await expect(page.locator("li[data-device]")).to_have_count(2)
    await expect(page.locator("table.list tbody tr")).to_have_count(1)
    await expect(page.locator('[data-field="quiet_hours"]')).to_have_count(1)
    await console.check()
    await console.shot("user")

    await page.locator(f'li[data-device="{devices[0]}"]').get_by_role("button", name="Remove").click()
    await expect(page.get_by_role("status")).to_have_text("The device was removed.")
    await expect(page.locator("li[data-device]")).to_have_count(1)
    listed = await (
        await stack.gateway.get(f"/api/v1/users/{user['id']}/devices", headers=stack.headers())
    ).json()
    assert [d["id"] for d in listed["data"]] == [devices[1]]

    await page.get_by_label("email").uncheck()
    await page.get_by_role("button", name="Save preferences").click()
    await expect(page.get_by_role("status")).to_have_text("Preferences saved.")
    prefs = await (
        await stack.gateway.get(f"/api/v1/users/{user['id']}/preferences", headers=stack.headers())
    ).json()
    assert prefs["data"]["email"] is False and prefs["data"]["push"] is True

    await console.goto(f"/console/users/{uuid.uuid4()}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("User not found")


# --- on a phone -------------------------------------------------------------------------------------


async def test_every_page_fits_a_phone(stack_factory: Any, browser: Browser, screenshots: Path) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    template = await stack.create_template()
    notification_id = await send(stack, user, template, f"phone-{time.time_ns()}")
    console = await open_console(browser, stack, screenshots, viewport=PHONE)
    await console.sign_in()
    for path in (
        "/console",
        "/console/notifications",
        f"/console/notifications/{notification_id}",
        "/console/failures",
        "/console/templates",
        f"/console/templates/{template['code']}",
        f"/console/users/{user['id']}",
        "/console/workflows",
    ):
        await console.goto(path)  # checks: labelled, no CSP refusal, no sideways scrolling
    await console.goto("/console")
    await console.shot("overview-phone")
    # Keyboard: the first Tab reaches the skip link, which moves focus to the content.
    await console.page.keyboard.press("Tab")
    await expect(console.page.get_by_role("link", name="Skip to content")).to_be_focused()


# --- send later --------------------------------------------------------------------------------------


async def test_cancel_a_scheduled_notification_and_see_quiet_hours(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory()
    user = await stack.create_user()
    template = await stack.create_template()
    response = await stack.gateway.put(
        f"/api/v1/users/{user['id']}/preferences",
        json={"quiet_hours": {"start": "22:00", "end": "07:00"}},
        headers=stack.headers(),
    )
    assert response.status == 200, await response.text()
    body = email_body(stack, user, template, f"later-{time.time_ns()}")
    # Noon in the user's zone (UTC): outside the quiet hours, so it is kept as asked.
    send_at = (datetime.now(UTC) + timedelta(days=30)).replace(hour=12, minute=0, second=0, microsecond=0)
    body["send_at"] = send_at.isoformat()
    status, answer, _ = await stack.send(body)
    assert status == 202, answer
    notification_id = answer["data"]["notification_id"]
    assert (await stack.notification(notification_id))["status"] == "scheduled"

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await console.goto(f"/console/notifications/{notification_id}")
    await expect(page.locator('dd[data-field="send_at"]')).to_contain_text(
        send_at.strftime("%Y-%m-%d %H:%M:%S")
    )
    await page.get_by_role("button", name="Cancel this notification").click()
    await expect(page.get_by_role("status")).to_have_text(
        "The notification is cancelled; it will not be sent."
    )
    await expect(page.locator("p.lead .status")).to_have_text("cancelled")
    await expect(page.get_by_role("button", name="Cancel this notification")).to_have_count(0)
    assert (await stack.notification(notification_id))["status"] == "cancelled"

    await console.goto(f"/console/users/{user['id']}")
    await expect(page.locator('[data-field="quiet_hours"]')).to_contain_text("22:00 to 07:00")


# --- workflows ---------------------------------------------------------------------------------------


async def _run_state(stack: Stack, run_id: str) -> dict[str, Any]:
    response = await stack.gateway.get(f"/api/v1/workflow-runs/{run_id}", headers=stack.headers())
    assert response.status == 200, await response.text()
    return dict((await response.json())["data"])


async def test_workflows_their_versions_and_a_run_as_a_timeline_with_cancel(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory()
    user = await stack.create_user()
    template = await stack.create_template()
    key = f"onboarding-{uuid.uuid4().hex[:8]}"
    steps = [
        {"name": "vip", "type": "email", "template_code": template["code"], "if": "payload.vip"},
        {"name": "hello", "type": "email", "template_code": template["code"]},
        {"name": "wait", "type": "delay", "duration": "PT1H"},
        {"name": "later", "type": "email", "template_code": template["code"]},
    ]
    for name in ("Onboarding, first draft", "Onboarding"):
        response = await stack.gateway.put(
            f"/api/v1/workflows/{key}",
            json={"name": name, "category": "onboarding", "steps": steps},
            headers=stack.headers(),
        )
        assert response.status in (200, 201), await response.text()
    response = await stack.gateway.post(
        f"/api/v1/workflows/{key}/trigger",
        json={
            "to": user["id"],
            "payload": {"name": "Ada", "link": "https://example.com", "vip": False},
            "request_id": f"console-{uuid.uuid4()}",
        },
        headers=stack.headers(),
    )
    assert response.status == 202, await response.text()
    [made] = (await response.json())["data"]["runs"]
    run_id = made["run_id"]
    # The run reaches its delay: the first email delivered, the second an hour away.
    for _ in range(200):
        state = await _run_state(stack, run_id)
        if state["status"] == "waiting" and state["steps"][2]["status"] == "waiting":
            break
        await asyncio.sleep(0.1)
    assert state["steps"][1]["notification_status"] == "delivered", state
    hello_id = state["steps"][1]["notification_id"]

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await page.get_by_role("link", name="Workflows").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Workflows")
    row = page.locator(f'tr[data-workflow="{key}"]')
    await expect(row.locator("td.num").first).to_have_text("v2")
    await console.check()
    await console.shot("workflows")

    await row.get_by_role("link", name=key).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Workflow {key}")
    await expect(page.locator('li[data-version="2"] .status-active')).to_have_text("active")
    await expect(page.locator('li[data-version="1"] .status-active')).to_have_count(0)
    await expect(page.locator('li[data-version="1"]')).to_contain_text("Onboarding, first draft")
    await expect(page.locator(f'tr[data-run="{run_id}"]')).to_contain_text("waiting")
    await console.check()
    await console.shot("workflow")
    # Only runs of the status asked for.
    await page.get_by_label("Status").select_option("completed")
    await page.get_by_role("button", name="Show runs").click()
    await expect(page.locator(f'tr[data-run="{run_id}"]')).to_have_count(0)
    await page.get_by_label("Status").select_option("waiting")
    await page.get_by_role("button", name="Show runs").click()
    await page.get_by_role("link", name=run_id[:8], exact=True).click()

    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Workflow run {run_id}")
    await console.check()
    vip, hello, wait, later = (
        page.locator(f'li[data-step="{s}"]') for s in ("vip", "hello", "wait", "later")
    )
    await expect(vip.locator(".status")).to_have_text("skipped")
    await expect(vip.locator(".detail")).to_have_text("condition false")
    await expect(hello.locator(".status").first).to_have_text("completed")
    await expect(wait).to_contain_text("the run is here")
    due = datetime.fromisoformat(state["steps"][2]["due_at"])
    await expect(wait.locator("time")).to_have_text(due.strftime("%Y-%m-%d %H:%M:%S UTC"))
    await expect(later.locator(".status")).to_have_text("pending")
    await console.shot("workflow-run")

    # The step's notification is one click away.
    await hello.get_by_role("link").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Notification {hello_id}")
    await page.go_back()

    await page.get_by_role("button", name="Cancel this run").click()
    await expect(page.get_by_role("status")).to_contain_text("The run is cancelled")
    await expect(page.locator("p.lead .status").first).to_have_text("cancelled")
    await expect(later.locator(".status")).to_have_text("cancelled")
    await expect(page.get_by_role("button", name="Cancel this run")).to_have_count(0)
    await console.check()
    state = await _run_state(stack, run_id)
    assert state["status"] == "cancelled" and state["reason"].startswith("cancelled in the console")
    assert [s["status"] for s in state["steps"]] == ["skipped", "completed", "cancelled", "cancelled"]
    assert len(stack.smtp.to(user["email"])) == 1  # the later email never goes

    # A run cancelled again, or one that does not exist, changes nothing and says so.
    async with aiohttp.ClientSession() as http:
        cookies = {c["name"]: c["value"] for c in await console.context.cookies()}
        async with http.get(console.url(f"/console/workflow-runs/{uuid.uuid4()}"), cookies=cookies) as answer:
            assert answer.status == 404
        async with http.get(console.url("/console/workflows/no%20such"), cookies=cookies) as answer:
            assert answer.status == 404
        async with http.get(console.url(f"/console/workflows/{key}?status=lost"), cookies=cookies) as answer:
            assert answer.status == 400
        async with http.post(
            console.url(f"/console/workflow-runs/{run_id}/cancel"), cookies=cookies, data={"csrf_token": "x"}
        ) as answer:
            assert answer.status == 403  # no form of ours: refused before anything changes


async def test_a_digest_runs_window_and_a_merged_run_on_the_console(
    stack_factory: Any, browser: Browser, screenshots: Path
) -> None:
    stack = await stack_factory()
    user = await stack.create_user()
    template = await stack.create_template()
    key = f"digest-{uuid.uuid4().hex[:8]}"
    response = await stack.gateway.put(
        f"/api/v1/workflows/{key}",
        json={
            "name": "Comments",
            "steps": [
                {"name": "gather", "type": "digest", "window": "PT1H"},
                {"name": "mail", "type": "email", "template_code": template["code"]},
            ],
        },
        headers=stack.headers(),
    )
    assert response.status == 201, await response.text()
    run_ids = []
    for n in range(3):
        response = await stack.gateway.post(
            f"/api/v1/workflows/{key}/trigger",
            json={
                "to": user["id"],
                "payload": {"name": "Ada", "link": "https://x.example"},
                "request_id": f"c{n}",
            },
            headers=stack.headers(),
        )
        assert response.status == 202, await response.text()
        run_ids.append((await response.json())["data"]["runs"][0]["run_id"])
    for _ in range(100):
        states = [await _run_state(stack, r) for r in run_ids]
        if sorted(s["status"] for s in states) == ["merged", "merged", "waiting"]:
            break
        await asyncio.sleep(0.1)
    carrier = next(s for s in states if s["status"] == "waiting")
    merged = next(s for s in states if s["status"] == "merged")

    console = await open_console(browser, stack, screenshots)
    await console.sign_in()
    page = console.page
    await console.goto(f"/console/workflow-runs/{carrier['run_id']}")
    gather = page.locator('li[data-step="gather"]')
    await expect(gather).to_contain_text("3 event(s)")
    await expect(gather).to_contain_text("the run is here")
    await console.shot("workflow-run-digest")
    await console.goto(f"/console/workflow-runs/{merged['run_id']}")
    await expect(page.locator("p.lead .status").first).to_have_text("merged")
    await page.locator('li[data-step="gather"]').get_by_role("link").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Workflow run {carrier['run_id']}")


async def test_a_next_with_cr_lf_or_other_bytes_goes_to_the_console_not_into_the_header(
    stack_factory: Any,
) -> None:
    stack = await stack_factory(workers=False)
    base = stack.urls["gateway"]
    hostile = [
        "/console\r\nSet-Cookie: planted=1",
        "/console/x\nLocation: https://evil.example",
        "/console\u2028x",
        "/console\\@evil.example",
        "//evil.example/console",
    ]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/console/sign-in") as page:
            html = await page.text()
        token = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert token, html
        async with http.post(
            base + "/console/sign-in",
            data={"csrf_token": token.group(1), "api_key": API_KEY, "next": hostile[0]},
            allow_redirects=False,
        ) as signed_in:
            assert signed_in.status == 303 and signed_in.headers["Location"] == "/console"
            assert "planted" not in signed_in.headers.get("Set-Cookie", "")
        # Signed in, the sign-in page sends on to `next`: only a console path of this site.
        for target in hostile:
            async with http.get(
                base + "/console/sign-in", params={"next": target}, allow_redirects=False
            ) as answer:
                assert answer.status == 303, target
                assert answer.headers["Location"] == "/console", (target, answer.headers["Location"])
        async with http.get(
            base + "/console/sign-in", params={"next": "/console/failures?page=2"}, allow_redirects=False
        ) as fine:
            assert fine.headers["Location"] == "/console/failures?page=2"


async def _sign_in_form(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/console/sign-in") as page:
        html = await page.text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert token, html
    return token.group(1)


async def test_twenty_wrong_sign_ins_at_once_get_no_more_tries_than_the_limit(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    client = redis.Redis.from_url(stack.config.redis_url)
    for key in client.scan_iter("notify:console:signin-failures:*"):
        client.delete(key)
    base = stack.urls["gateway"]
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            token = await _sign_in_form(http, base)

            async def guess() -> int:
                async with http.post(
                    base + "/console/sign-in",
                    data={"csrf_token": token, "api_key": f"guess-{uuid.uuid4()}"},
                    allow_redirects=False,
                ) as answer:
                    return answer.status

            statuses = await asyncio.gather(*(guess() for _ in range(20)))
        assert statuses.count(401) == SIGNIN_FAILURES_ALLOWED, statuses
        assert statuses.count(429) == 20 - SIGNIN_FAILURES_ALLOWED, statuses
    finally:
        for key in client.scan_iter("notify:console:signin-failures:*"):
            client.delete(key)
        client.close()


async def test_with_redis_frozen_console_pages_are_a_503_page_not_json(
    stack_factory: Any, base_config: Any
) -> None:
    target = urlsplit(base_config.redis_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await link.start()
    stack = await stack_factory(workers=False, redis_url=via(base_config.redis_url, link))
    base = stack.urls["gateway"]
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            token = await _sign_in_form(http, base)
            async with http.post(
                base + "/console/sign-in",
                data={"csrf_token": token, "api_key": API_KEY},
                allow_redirects=False,
            ) as signed_in:
                assert signed_in.status == 303
            link.freeze()
            for path in ("/console", "/console/notifications"):
                started = time.monotonic()
                async with http.get(base + path, allow_redirects=False) as answer:
                    assert answer.status == 503, (path, answer.status)
                    assert answer.content_type == "text/html"
                    assert int(answer.headers["Retry-After"]) > 0
                    assert "Temporarily unavailable" in await answer.text()
                assert time.monotonic() - started < 5
            # A visitor who had the sign-in form before Redis froze: the attempt cannot be counted.
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
                link.thaw()
                form = await _sign_in_form(other, base)
                link.freeze()
                async with other.post(
                    base + "/console/sign-in", data={"csrf_token": form, "api_key": "a-wrong-key"},
                    allow_redirects=False,
                ) as guessed:  # fmt: skip
                    assert guessed.status == 503 and guessed.content_type == "text/html"
            link.thaw()
            async with http.get(base + "/console", allow_redirects=False) as answer:
                assert answer.status == 200
    finally:
        await link.close()
