"""The drop-in <notify-inbox> web component in a real browser (Debian's Chromium through
Playwright), embedded in a page of another origin, against the real stack: in_app notifications
sent through the API and delivered by the inbox worker, the gateway's event stream, its CORS.
`make screenshots` keeps its pictures in docs/inbox/ (INBOX_SCREENSHOTS)."""

from __future__ import annotations

import asyncio
import html
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Page, expect
from yarl import URL

import gateway
from common.features.inbox import api as inbox_api
from common.keys import INBOX_LIVE_KEY
from tests.browser import DESKTOP, PHONE
from tests.conftest import Stack, _serve
from tests.features.inbox.conftest import bearer, new_user

BADGE = "notify-inbox [part=badge]"  # Playwright's CSS goes through open shadow roots
BELL = "notify-inbox [part=bell]"
PANEL = "notify-inbox [part=panel]"
MESSAGE = "notify-inbox [part=message]"


@pytest.fixture(scope="session")
def inbox_shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/inbox/ under `make screenshots` (INBOX_SCREENSHOTS), a scratch folder otherwise."""
    chosen = os.environ.get("INBOX_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("inbox-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _page(request: web.Request) -> web.Response:
    """The customer's page: the three lines of the README's embed, nothing else of ours."""
    q = request.query
    base, token = html.escape(q["gateway"]), html.escape(q["token"])
    extra = f' page-size="{html.escape(q["page_size"])}"' if "page_size" in q else ""
    align = "flex-start" if q.get("align") == "left" else "flex-end"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Acme</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
  body {{ margin: 0; font-family: system-ui, sans-serif; background: #f8fafc; }}
  header {{ display: flex; justify-content: {align}; align-items: center; gap: 12px;
    padding: 10px 16px; background: #fff; border-bottom: 1px solid #e5e7eb; }}
  header strong {{ margin-right: auto; }}
  main {{ padding: 24px 16px; color: #475569; }}
</style></head>
<body><header><strong>Acme</strong>
<script type="module" src="{base}/inbox/notify-inbox.js"></script>
<notify-inbox api-base="{base}" token="{token}"{extra}></notify-inbox>
</header><main>Your dashboard.</main></body></html>"""
    return web.Response(text=body, content_type="text/html")


async def _landing(request: web.Request) -> web.Response:
    return web.Response(
        text='<!doctype html><title>Post</title><link rel="icon" href="data:,"><p>the post',
        content_type="text/html",
    )


# A 1x1 PNG, the picture of a message.
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360f8cfc0f01f0005000201a5f3d6a50000000049454e44ae426082"
)


async def _pixel(request: web.Request) -> web.Response:
    return web.Response(body=PIXEL, content_type="image/png")


@dataclass
class Embed:
    stack: Stack
    site: str  # the embedding page's origin
    template: str
    browser: Browser
    shots: Path
    contexts: list[BrowserContext] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tickets: list[str] = field(default_factory=list)  # the POST /tickets the pages sent

    async def open(
        self, gateway_url: str, token: str, viewport: dict[str, int] = DESKTOP, **query: str
    ) -> Page:
        context = await self.browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        self.contexts.append(context)
        page = await context.new_page()
        page.on(
            "console",
            lambda m: (
                self.errors.append(f"console {m.type}: {m.text} {m.location}") if m.type == "error" else None
            ),
        )
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.tickets.append(r.url) if r.url.endswith("/tickets") else None)
        url = str(URL(f"{self.site}/").with_query({"gateway": gateway_url, "token": token, **query}))
        await page.goto(url)
        await page.wait_for_function("() => customElements.get('notify-inbox') !== undefined")
        # Live once the stream has opened: its first `counts` has come (the badge's text is set).
        await page.wait_for_function(
            "() => document.querySelector('notify-inbox').shadowRoot"
            ".querySelector('[part=badge]').textContent !== ''"
        )
        return page

    async def send(self, user_id: str, **variables: str) -> float:
        """An in_app notification through the API; the moment its 202 came."""
        status, body, _ = await self.stack.send(
            {
                "notification_type": "in_app",
                "user_id": user_id,
                "template_code": self.template,
                "variables": {"name": "Bob", "comment": "Looks good", "post": "42", **variables},
                "request_id": f"req-{uuid.uuid4()}",
            }
        )
        assert status == 202, body
        return time.monotonic()

    async def close(self) -> None:
        for context in self.contexts:
            await context.close()


@pytest.fixture
async def embed(stack_factory: Any, browser: Browser, inbox_shots: Path) -> AsyncIterator[Embed]:
    site_app = web.Application()
    site_app.router.add_get("/", _page)
    site_app.router.add_get("/posts/{post}", _landing)
    site_app.router.add_get("/pixel.png", _pixel)
    site = await _serve(site_app)
    origin = str(site.make_url("")).rstrip("/")
    stack: Stack = await stack_factory(workers=False, inbox=True, inbox_allowed_origins=(origin,))
    template = await stack.create_template(
        notification_type="in_app",
        subject=None,
        title="{{ name }} commented on your post",
        body="<p>{{ name }} wrote: {{ comment }}</p>",
        link=origin + "/posts/{{ post }}",
    )
    made = Embed(stack, origin, template["code"], browser, inbox_shots)
    try:
        yield made
    finally:
        await made.close()
        await site.close()


def _gateway_url(stack: Stack) -> str:
    return str(stack.gateway.make_url("")).rstrip("/")


async def _badge_is(page: Page, text: str) -> None:
    """Waits (polling every 20 ms, so the waiting adds little to a timing) for the badge's text:
    "" for none (hidden)."""
    await page.wait_for_function(
        """(want) => {
            const badge = document.querySelector('notify-inbox').shadowRoot.querySelector('[part=badge]');
            return want === '' ? badge.hidden : !badge.hidden && badge.textContent === want;
        }""",
        arg=text,
        polling=20,
        timeout=10_000,
    )


async def _serve_gateway(stack: Stack, port: int) -> TestServer:
    server = TestServer(gateway.create_app(stack.config), host="127.0.0.1", port=port)
    await server.start_server()
    await asyncio.wait_for(server.app[INBOX_LIVE_KEY].subscribed.wait(), 5)
    return server


async def test_the_component_is_served_as_public_cacheable_javascript(embed: Embed) -> None:
    async with aiohttp.ClientSession() as http:
        url = _gateway_url(embed.stack) + inbox_api.COMPONENT_PATH
        async with http.get(url, headers={"Origin": embed.site}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert r.headers["Cache-Control"] == inbox_api.COMPONENT_CACHE
            assert 'customElements.define("notify-inbox"' in await r.text()
            etag = r.headers["ETag"]
        async with http.get(url, headers={"If-None-Match": etag}) as again:
            assert again.status == 304


async def test_two_tabs_get_it_within_a_second_a_read_clears_the_other_and_a_restart_is_survived(
    embed: Embed,
) -> None:
    stack = embed.stack
    user_id, token = await new_user(stack)
    port = _free_port()
    other = await _serve_gateway(stack, port)  # the second gateway process, restarted below
    other_url = f"http://127.0.0.1:{port}"
    try:
        first = await embed.open(_gateway_url(stack), token)
        second = await embed.open(other_url, token)
        for page in (first, second):
            await expect(page.locator(BADGE)).to_be_hidden()

        # (a) No reload: the badge goes from nothing to 1 in both tabs, under a second.
        sent = await embed.send(user_id)
        await asyncio.gather(_badge_is(first, "1"), _badge_is(second, "1"))
        took = time.monotonic() - sent
        assert took < 1.0, f"the badge took {took:.3f} s after the 202"
        assert await second.locator(BELL).get_attribute("aria-label") == "Notifications, 1 unread"

        # (b) Read in the first tab (a click: marked read, its link followed): the second's
        # badge clears and its message shows read, with no reload.
        await first.locator(BELL).click()
        message = first.locator(MESSAGE)
        await expect(message).to_have_count(1)
        await expect(message).to_have_attribute("data-read", "false")
        await expect(message.locator(".title")).to_have_text("Bob commented on your post")
        await expect(message.locator(".body")).to_have_text("Bob wrote: Looks good")
        await message.click()
        await first.wait_for_url(f"{embed.site}/posts/42")
        await _badge_is(second, "")
        await second.locator(BELL).click()
        await expect(second.locator(MESSAGE)).to_have_attribute("data-read", "true")
        counts = await stack.gateway.get("/api/v1/inbox/counts", headers=bearer(token))
        assert (await counts.json())["data"]["unread"] == 0

        # (d) The gateway the second tab streams from restarts on the same port: the component
        # reconnects by itself (a new ticket, its last event id) and the next message arrives.
        await other.close()
        other = await _serve_gateway(stack, port)
        await embed.send(user_id, comment="After the restart")
        await _badge_is(second, "1")
        await expect(second.locator(MESSAGE)).to_have_count(2)
        await expect(second.locator(MESSAGE).first.locator(".body")).to_have_text(
            "Bob wrote: After the restart"
        )
        await expect(second.locator(MESSAGE).first).to_have_attribute("data-read", "false")
    finally:
        await other.close()

    # (e) Nothing logged an error but what the restart itself can cause: a reconnect attempt
    # refused while the second gateway was down.
    unexpected = [
        e for e in embed.errors if not ("ERR_CONNECTION_REFUSED" in e and f":{port}/api/v1/inbox/" in e)
    ]
    assert unexpected == []


async def test_mark_all_read_archive_load_more_and_the_empty_state(embed: Embed) -> None:
    stack = embed.stack
    user_id, token = await new_user(stack)
    page = await embed.open(_gateway_url(stack), token, page_size="2")
    sent = (("Grace", "Ship it"), ("Alan", "<b>bold</b> & more"), ("Ada", "Lovely"))
    for count, (name, comment) in enumerate(sent, 1):
        await embed.send(user_id, name=name, comment=comment)
        await _badge_is(page, str(count))  # one at a time: the newest is the last sent
    await page.screenshot(path=str(embed.shots / "inbox-closed.png"))

    await page.locator(BELL).click()
    items = page.locator(MESSAGE)
    await expect(items).to_have_count(3)  # the 3 came live, on top of an empty first page
    # Text, never markup: the escaped variable shows as typed, and makes no element.
    await expect(items.nth(1).locator(".body")).to_have_text("Alan wrote: <b>bold</b> & more")
    assert await items.nth(1).locator("b").count() == 0
    await page.screenshot(path=str(embed.shots / "inbox.png"))

    # A fresh tab pages with meta.next: 2, then the third with "Load more".
    fresh = await embed.open(_gateway_url(stack), token, page_size="2")
    await fresh.locator(BELL).click()
    more = fresh.locator("notify-inbox [part=load-more]")
    await expect(fresh.locator(MESSAGE)).to_have_count(2)
    await expect(more).to_be_visible()
    await more.click()
    await expect(fresh.locator(MESSAGE)).to_have_count(3)
    await expect(more).to_be_hidden()
    titles = await fresh.locator(f"{MESSAGE} .title").all_inner_texts()
    assert titles == [f"{n} commented on your post" for n in ("Ada", "Alan", "Grace")]

    # Archive one: gone from both tabs and from the API's list.
    grace = fresh.locator(MESSAGE).nth(2)
    grace_id = await grace.get_attribute("data-id")
    await grace.locator("[part=archive]").click()
    await expect(fresh.locator(MESSAGE)).to_have_count(2)
    await expect(page.locator(f"{MESSAGE}[data-id='{grace_id}']")).to_have_count(0)
    await _badge_is(page, "2")
    listed = await stack.gateway.get("/api/v1/inbox/messages", headers=bearer(token))
    assert grace_id not in [m["id"] for m in (await listed.json())["data"]]

    # Mark all read: every message read, both badges cleared.
    await fresh.locator("notify-inbox [part=mark-all-read]").click()
    await _badge_is(fresh, "")
    await _badge_is(page, "")
    for tab in (fresh, page):
        assert set(await tab.locator(MESSAGE).evaluate_all("els => els.map(e => e.dataset.read)")) == {"true"}
    counts = await stack.gateway.get("/api/v1/inbox/counts", headers=bearer(token))
    assert (await counts.json())["data"] == {
        "unread": 0,
        "unseen": 0,
        "total": 2,
    }  # read is seen; archived is not counted

    # Archive the rest: the empty state.
    empty = fresh.locator("notify-inbox [part=empty]")
    await expect(empty).to_be_hidden()
    for _ in range(2):
        await fresh.locator(MESSAGE).first.locator("[part=archive]").click()
    await expect(fresh.locator(MESSAGE)).to_have_count(0)
    await expect(empty).to_be_visible()
    assert embed.errors == []


async def test_the_panel_fits_a_phone_wherever_the_bell_is(embed: Embed) -> None:
    stack = embed.stack
    user_id, token = await new_user(stack)
    await embed.send(user_id)
    for align in ("left", "right"):
        page = await embed.open(_gateway_url(stack), token, viewport=PHONE, align=align)
        await _badge_is(page, "1")
        await page.locator(BELL).click()
        panel = page.locator(PANEL)
        await expect(panel).to_be_visible()
        await expect(page.locator(MESSAGE)).to_have_count(1)
        box = await panel.bounding_box()
        assert box is not None
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (align, box)
        assert box["y"] + box["height"] <= PHONE["height"], (align, box)
        assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert embed.errors == []


async def test_keyboard_enter_opens_arrows_move_enter_reads_and_escape_closes(embed: Embed) -> None:
    stack = embed.stack
    user_id, token = await new_user(stack)
    await embed.send(user_id, post="7")
    page = await embed.open(_gateway_url(stack), token)
    await _badge_is(page, "1")
    bell = page.locator(BELL)
    focused = "document.activeElement.shadowRoot.activeElement.getAttribute('part')"
    await bell.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator(PANEL)).to_be_visible()
    await expect(bell).to_have_attribute("aria-expanded", "true")
    for part in ("mark-all-read", "message", "archive"):  # every control is reached by Tab
        await page.keyboard.press("Tab")
        assert await page.evaluate(focused) == part
    await page.keyboard.press("Escape")  # from anywhere in the panel
    await expect(page.locator(PANEL)).to_be_hidden()
    await expect(bell).to_have_attribute("aria-expanded", "false")
    assert await page.evaluate(focused) == "bell"  # focus back on the bell

    await page.keyboard.press("Space")
    await expect(page.locator(PANEL)).to_be_visible()
    await page.keyboard.press("Tab")  # mark all read
    await page.keyboard.press("ArrowDown")  # the first message
    assert await page.evaluate(focused) == "message"
    await page.keyboard.press("Enter")  # read, and its link followed
    await page.wait_for_url(f"{embed.site}/posts/7")
    counts = await stack.gateway.get("/api/v1/inbox/counts", headers=bearer(token))
    assert (await counts.json())["data"]["unread"] == 0
    assert embed.errors == []


async def test_a_new_token_shows_the_other_users_inbox(embed: Embed) -> None:
    stack = embed.stack
    ada, ada_token = await new_user(stack)
    bob, bob_token = await new_user(stack)
    await embed.send(ada)
    page = await embed.open(_gateway_url(stack), ada_token)
    await _badge_is(page, "1")
    assert len(embed.tickets) == 1  # one stream opened, once
    await page.locator("notify-inbox").evaluate("(el, token) => el.setAttribute('token', token)", bob_token)
    await _badge_is(page, "")
    assert len(embed.tickets) == 2
    await page.locator(BELL).click()
    await expect(page.locator("notify-inbox [part=empty]")).to_be_visible()
    await embed.send(bob, name="Carol")  # and live for the new user
    await _badge_is(page, "1")
    await expect(page.locator(f"{MESSAGE} .title")).to_have_text("Carol commented on your post")
    await embed.send(ada, name="Dan")  # the first user's no longer reach this page
    await asyncio.sleep(0.5)
    await expect(page.locator(MESSAGE)).to_have_count(1)
    assert embed.errors == []


async def test_an_image_and_a_link_only_when_http_and_nothing_else_runs(embed: Embed) -> None:
    """The backend stores whatever the template renders: the component shows an image and
    follows a link only for http(s) ones."""
    stack = embed.stack
    template = await stack.create_template(
        notification_type="in_app",
        subject=None,
        title="{{ title }}",
        body="{{ body }}",
        image_url="{{ image }}",
        link="{{ link }}",
    )
    user_id, token = await new_user(stack)
    page = await embed.open(_gateway_url(stack), token)
    hostile = "javascript:window.pwned=1"
    for count, variables in enumerate(
        (
            {"title": "Safe", "body": "b", "image": f"{embed.site}/pixel.png", "link": hostile},
            {
                "title": "<img src=x onerror=window.pwned=2>",
                "body": "<script>window.pwned=3</script>",
                "image": hostile,
                "link": f"{embed.site}/posts/9",
            },
        ),
        1,
    ):
        status, body, _ = await stack.send(
            {
                "notification_type": "in_app",
                "user_id": user_id,
                "template_code": template["code"],
                "variables": variables,
                "request_id": f"req-{uuid.uuid4()}",
            }
        )
        assert status == 202, body
        await _badge_is(page, str(count))
    await page.locator(BELL).click()
    newest, safe = page.locator(MESSAGE).nth(0), page.locator(MESSAGE).nth(1)
    await expect(newest.locator(".title")).to_have_text("<img src=x onerror=window.pwned=2>")
    await expect(newest.locator(".body")).to_have_text("<script>window.pwned=3</script>")
    assert await newest.locator("img, script").count() == 0  # no image for a javascript: URL
    image = safe.locator("img[part=image]")
    await expect(image).to_have_attribute("src", f"{embed.site}/pixel.png")
    await expect(image).to_have_js_property("naturalWidth", 1)  # loaded

    await safe.click()  # read, but a javascript: link is not followed
    await expect(safe).to_have_attribute("data-read", "true")
    await _badge_is(page, "1")
    assert page.url.startswith(embed.site + "/?")
    assert await page.evaluate("window.pwned") is None
    assert embed.errors == []
