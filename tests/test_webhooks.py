"""Client status webhooks: signed per Standard Webhooks, verified here with the `standardwebhooks`
package as a client would; retried until received; scoped to the API key; never lost to a broker
outage. The receiver is a local HTTP server on 127.0.0.1, allowed by WEBHOOK_ALLOWED_HOSTS."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook, WebhookVerificationError

from common.data import db, retention
from common.features.webhooks.api import MAX_WEBHOOK_ENDPOINTS
from tests.conftest import API_KEY, INTERNAL_TOKEN, Stack
from tests.tcp_proxy import TcpProxy, via

OTHER_KEY = "test-other-client-key-9876543210"
SENDGRID_TOKEN = "hook-secret-0123456789"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.body)
        return event


@dataclass
class Receiver:
    """Records every request; answers each path from its script (then 200)."""

    server: TestServer | None = None
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)  # a slow receiver's path: seconds
    in_flight: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=dict)  # the most requests in flight at once

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(request.path, dict(request.headers), await request.read()))
        if delay := self.delays.get(request.path):
            self.in_flight[request.path] = self.in_flight.get(request.path, 0) + 1
            self.most[request.path] = max(self.most.get(request.path, 0), self.in_flight[request.path])
            try:
                await asyncio.sleep(delay)
            finally:
                self.in_flight[request.path] -= 1
        script = self.scripts.get(request.path) or []
        status = script.pop(0) if script else 200
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return web.Response(status=status, text="ok" if status < 300 else "not now")

    async def wait(self, path: str, count: int, timeout: float = 20) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.at(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.at(path))} of {count} requests arrived"
            await asyncio.sleep(0.05)
        return self.at(path)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    # Endpoints of earlier tests are gone: stack_factory empties the store when it starts.
    receiver = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    receiver.server = TestServer(app, host="127.0.0.1")
    await receiver.server.start_server()
    yield receiver
    await receiver.server.close()


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _stack(stack_factory: Any, **overrides: Any) -> Stack:
    overrides.setdefault("webhook_allowed_hosts", ("127.0.0.1",))
    stack: Stack = await stack_factory(**overrides)
    return stack


async def _endpoint(stack: Stack, url: str, events: list[str], key: str = API_KEY) -> dict[str, Any]:
    response = await stack.gateway.post(
        "/api/v1/webhooks/endpoints", json={"url": url, "events": events}, headers=_auth(key)
    )
    body = await response.json()
    assert response.status == 201, body
    assert body["data"]["secret"].startswith("whsec_")
    return dict(body["data"])


async def _deliver(stack: Stack, key: str = API_KEY) -> dict[str, Any]:
    user = await stack.create_user(key)
    template = await stack.create_template(key=key)
    status, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": "Ada", "link": "https://example.com"},
            "request_id": f"req-{uuid.uuid4()}",
        },
        Authorization=f"Bearer {key}",
    )
    assert status == 202, body
    # Read with the key that sent it: a notification is its project's.
    return await stack.wait_for(body["data"]["notification_id"], "delivered", key=key)


async def _deliveries(stack: Stack, endpoint_id: str, key: str = API_KEY, **query: str) -> Any:
    response = await stack.gateway.get(
        f"/api/v1/webhooks/endpoints/{endpoint_id}/deliveries", params=query, headers=_auth(key)
    )
    return response.status, await response.json()


async def _settled(stack: Stack, endpoint_id: str, statuses: tuple[str, ...] = ("delivered",)) -> Any:
    """The endpoint's deliveries once none is still on its way."""
    deadline = time.monotonic() + 20
    while True:
        _, body = await _deliveries(stack, endpoint_id)
        if body["data"] and all(d["status"] in statuses for d in body["data"]):
            return body["data"]
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def _endpoint_view(stack: Stack, endpoint_id: str, key: str = API_KEY) -> Any:
    response = await stack.gateway.get(f"/api/v1/webhooks/endpoints/{endpoint_id}", headers=_auth(key))
    return response.status, await response.json()


# --- Must show --------------------------------------------------------------------------------


async def test_a_delivered_email_produces_one_signed_event(stack_factory: Any, receiver: Receiver) -> None:
    stack = await _stack(stack_factory)
    endpoint = await _endpoint(stack, receiver.url("/hooks"), ["notification.delivered"])
    record = await _deliver(stack)

    [got] = await receiver.wait("/hooks", 1)
    event = Webhook(endpoint["secret"]).verify(got.body, got.headers)
    assert event["type"] == "notification.delivered"
    assert event["data"] == {
        "notification_id": record["notification_id"],
        "request_id": record["request_id"],
        "user_id": record["user_id"],
        "notification_type": "email",
        "status": "delivered",
        "error": None,
        "provider": "smtp",
        "attempts": 1,
        "workflow_run_id": None,  # the run and step that made it, for a workflow's notification
        "step": None,
    }
    assert datetime.fromisoformat(event["timestamp"]) > datetime.now(UTC) - timedelta(minutes=1)
    assert got.headers["webhook-id"].startswith("msg_")
    assert got.headers["Content-Type"] == "application/json"

    hook = Webhook(endpoint["secret"])
    tampered = got.body.replace(b'"delivered"', b'"failed"')
    assert tampered != got.body
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        hook.verify(tampered, got.headers)
    # Ten minutes old: refused even when the signature over that timestamp is right.
    stale = datetime.now(UTC) - timedelta(minutes=10)
    old_headers = {
        **got.headers,
        "webhook-timestamp": str(int(stale.timestamp())),
        "webhook-signature": hook.sign(got.headers["webhook-id"], stale, got.body.decode()),
    }
    with pytest.raises(WebhookVerificationError, match="too old"):
        hook.verify(got.body, old_headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(_other_secret()).verify(got.body, got.headers)

    [delivery] = await _settled(stack, endpoint["id"])
    assert delivery["attempts"] == 1 and delivery["webhook_id"] == got.headers["webhook-id"]
    assert [h["status_code"] for h in delivery["history"]] == [200]
    assert delivery["history"][0]["latency_ms"] >= 0
    await asyncio.sleep(1)
    assert len(receiver.requests) == 1  # one event, sent once


async def test_retried_until_received_with_the_same_webhook_id(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory)  # RETRY_DELAYS 0.5, 1: three attempts in all
    receiver.scripts["/flaky"] = [500, 500, 200]
    endpoint = await _endpoint(stack, receiver.url("/flaky"), ["notification.delivered"])
    await _deliver(stack)

    attempts = await receiver.wait("/flaky", 3)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    hook = Webhook(endpoint["secret"])
    assert all(hook.verify(a.body, a.headers)["type"] == "notification.delivered" for a in attempts)

    [delivery] = await _settled(stack, endpoint["id"])
    assert delivery["attempts"] == 3
    assert [h["status_code"] for h in delivery["history"]] == [500, 500, 200]
    assert "HTTP 500" in delivery["history"][0]["error"] and delivery["history"][2]["error"] is None
    _, view = await _endpoint_view(stack, endpoint["id"])
    assert view["data"]["failing_since"] is None and view["data"]["disabled"] is False
    await asyncio.sleep(1.5)
    assert len(receiver.at("/flaky")) == 3


async def test_each_api_key_sees_only_its_own_endpoints_and_events(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory, gateway_api_keys=(API_KEY, f"other:{OTHER_KEY}"))
    mine = await _endpoint(stack, receiver.url("/mine"), ["notification.delivered"])
    theirs = await _endpoint(stack, receiver.url("/theirs"), ["notification.delivered"], key=OTHER_KEY)
    my_record = await _deliver(stack)
    their_record = await _deliver(stack, key=OTHER_KEY)

    [to_me] = await receiver.wait("/mine", 1)
    [to_them] = await receiver.wait("/theirs", 1)
    assert (
        Webhook(mine["secret"]).verify(to_me.body, to_me.headers)["data"]["notification_id"]
        == (my_record["notification_id"])
    )
    assert (
        Webhook(theirs["secret"]).verify(to_them.body, to_them.headers)["data"]["notification_id"]
        == (their_record["notification_id"])
    )

    for key, own, other in ((API_KEY, mine, theirs), (OTHER_KEY, theirs, mine)):
        listed = await stack.gateway.get("/api/v1/webhooks/endpoints", headers=_auth(key))
        body = await listed.json()
        assert [e["id"] for e in body["data"]] == [own["id"]] and body["meta"]["total"] == 1
        assert all("secret" not in e for e in body["data"])
        status, _ = await _endpoint_view(stack, other["id"], key)
        assert status == 404
        status, _ = await _deliveries(stack, other["id"], key)
        assert status == 404
        status, deliveries = await _deliveries(stack, own["id"], key)
        assert status == 200 and len(deliveries["data"]) == 1
        delivery_id = deliveries["data"][0]["delivery_id"]
        replay = await stack.gateway.post(
            f"/api/v1/webhooks/endpoints/{own['id']}/deliveries/{delivery_id}/replay",
            headers=_auth(OTHER_KEY if key == API_KEY else API_KEY),
        )
        assert replay.status == 404
        rotate = await stack.gateway.post(
            f"/api/v1/webhooks/endpoints/{other['id']}/rotate-secret", headers=_auth(key)
        )
        assert rotate.status == 404
        deleted = await stack.gateway.delete(f"/api/v1/webhooks/endpoints/{other['id']}", headers=_auth(key))
        assert deleted.status == 404
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 2


async def test_a_provider_bounce_reaches_the_client_as_bounced(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory, sendgrid_webhook_secret=SENDGRID_TOKEN)
    endpoint = await _endpoint(stack, receiver.url("/bounces"), ["notification.bounced"])
    record = await _deliver(stack)
    # As if SendGrid had sent it (a bounce applies only to a notification its provider sent to
    # that address; tests/test_email_providers.py takes the whole path through SendGrid's fake).
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        await database.execute(
            "UPDATE notifications SET provider = 'sendgrid' WHERE id = %s",
            uuid.UUID(record["notification_id"]),
        )
    finally:
        await database.close()
    user = await stack.gateway.get(f"/api/v1/users/{record['user_id']}", headers=_auth())
    address = (await user.json())["data"]["email"]
    events = [
        {
            "email": address,
            "event": "bounce",
            "type": "bounce",
            "reason": "550 5.1.1 No such user",
            "timestamp": int(time.time()),
            "notification_id": record["notification_id"],
        }
    ]
    response = await stack.gateway.post(f"/api/v1/webhooks/sendgrid?token={SENDGRID_TOKEN}", json=events)
    assert response.status == 200, await response.text()

    [got] = await receiver.wait("/bounces", 1)
    event = Webhook(endpoint["secret"]).verify(got.body, got.headers)
    assert event["type"] == "notification.bounced"
    assert event["data"]["notification_id"] == record["notification_id"]
    assert event["data"]["status"] == "failed" and event["data"]["provider"] == "sendgrid"
    assert "550 5.1.1 No such user" in event["data"]["error"]
    await asyncio.sleep(1)
    assert len(receiver.requests) == 1  # not subscribed to notification.delivered


async def test_secret_rotation_overlap_then_only_the_new_secret(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory)
    endpoint = await _endpoint(stack, receiver.url("/rotating"), ["notification.delivered"])
    rotated = await stack.gateway.post(
        f"/api/v1/webhooks/endpoints/{endpoint['id']}/rotate-secret", headers=_auth()
    )
    body = await rotated.json()
    assert rotated.status == 200, body
    old, new = endpoint["secret"], body["data"]["secret"]
    assert new.startswith("whsec_") and new != old
    expires = datetime.fromisoformat(body["data"]["previous_secret_expires_at"])
    assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(hours=24)
    _, view = await _endpoint_view(stack, endpoint["id"])
    assert "secret" not in view["data"]

    await _deliver(stack)
    [during] = await receiver.wait("/rotating", 1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(during.body, during.headers)
    Webhook(old).verify(during.body, during.headers)

    # The 24 hours pass.
    database = await db.connect(stack.config.notifications_db_url)
    try:
        await database.execute(
            "UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second'"
            " WHERE id = %s",
            uuid.UUID(endpoint["id"]),
        )
        # The store's upkeep deletes the expired secret itself, not only stops using it.
        assert await retention.purge_finished(database, stack.config.retention_days) >= 1
        kept = await database.fetchrow(
            "SELECT previous_secret, previous_secret_expires_at FROM webhook_endpoints WHERE id = %s",
            uuid.UUID(endpoint["id"]),
        )
        assert kept == {"previous_secret": None, "previous_secret_expires_at": None}, kept
    finally:
        await database.close()
    _, view = await _endpoint_view(stack, endpoint["id"])
    assert view["data"]["previous_secret_expires_at"] is None

    await _deliver(stack)
    after = (await receiver.wait("/rotating", 2))[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)


async def test_skipped_at_acceptance_is_told_once_and_deliveries_page_by_keyset(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory, workers=False)
    endpoint = await _endpoint(stack, receiver.url("/skips"), ["notification.skipped"])
    user = await stack.create_user(preferences={"email": False, "push": True})
    template = await stack.create_template()
    ids = []
    for _ in range(3):
        status, body, _ = await stack.send(
            {
                "notification_type": "email",
                "user_id": user["id"],
                "template_code": template["code"],
                "variables": {"name": "Ada", "link": "https://example.com"},
                "request_id": f"req-{uuid.uuid4()}",
            }
        )
        assert status == 202 and body["data"]["status"] == "skipped", body
        ids.append(body["data"]["notification_id"])
    received = await receiver.wait("/skips", 3)
    hook = Webhook(endpoint["secret"])
    events = [hook.verify(r.body, r.headers) for r in received]
    assert sorted(e["data"]["notification_id"] for e in events) == sorted(ids)
    assert {(e["type"], e["data"]["status"]) for e in events} == {("notification.skipped", "skipped")}
    assert "opted out" in events[0]["data"]["error"]

    # The same final status reported again is no new event.
    report = await stack.gateway.post(
        "/api/v1/email/status/",
        json={"notification_id": ids[0], "status": "skipped"},
        headers=_auth(INTERNAL_TOKEN),
    )
    assert report.status == 200
    await _settled(stack, endpoint["id"])
    status, first = await _deliveries(stack, endpoint["id"], limit="2")
    assert status == 200 and len(first["data"]) == 2 and first["meta"]["has_next"] is True
    status, rest = await _deliveries(stack, endpoint["id"], limit="2", after=first["meta"]["next"])
    assert len(rest["data"]) == 1 and rest["meta"] == {"limit": 2, "next": None, "has_next": False}
    listed = [d["notification_id"] for d in first["data"] + rest["data"]]
    assert listed == list(reversed(ids))  # newest first, each once
    status, bad = await _deliveries(stack, endpoint["id"], after="not-a-cursor")
    assert status == 400 and "after" in bad["data"]["fields"]
    # Digits of other kinds, which isdigit() takes and int() refuses (or reads as another number).
    for name in ("after", "limit"):
        for value in ("\u00b2", "\u0661", "\uff11", "+1", " 1", "1_0"):
            status, bad = await _deliveries(stack, endpoint["id"], **{name: value})
            assert status == 400 and name in bad["data"]["fields"], (name, value, bad)
    await asyncio.sleep(1)
    assert len(receiver.requests) == 3


# --- delivery rules ----------------------------------------------------------------------------


async def test_a_redirect_is_not_followed_and_410_disables_the_endpoint(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory)
    receiver.scripts["/gone"] = [302, 410]
    endpoint = await _endpoint(stack, receiver.url("/gone"), ["notification.delivered"])
    await _deliver(stack)

    await receiver.wait("/gone", 2)
    [delivery] = await _settled(stack, endpoint["id"], ("failed",))
    assert [h["status_code"] for h in delivery["history"]] == [302, 410]
    assert "redirect not followed" in delivery["history"][0]["error"]
    assert receiver.at("/elsewhere") == []
    status, view = await _endpoint_view(stack, endpoint["id"])
    assert status == 200 and view["data"]["disabled"] is True
    assert "410" in view["data"]["disabled_reason"]

    # A disabled endpoint receives nothing more, and its deliveries cannot be replayed.
    await _deliver(stack)
    replay = await stack.gateway.post(
        f"/api/v1/webhooks/endpoints/{endpoint['id']}/deliveries/{delivery['delivery_id']}/replay",
        headers=_auth(),
    )
    assert replay.status == 409 and (await replay.json())["error"] == "endpoint_disabled"
    await asyncio.sleep(1)
    assert len(receiver.requests) == 2


async def test_an_endpoint_failing_for_webhook_disable_after_is_disabled(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory, webhook_disable_after=1.0)
    receiver.scripts["/down"] = [503] * 10
    endpoint = await _endpoint(stack, receiver.url("/down"), ["notification.delivered"])
    await _deliver(stack)

    await receiver.wait("/down", 3)  # 0 s, 0.5 s, 1.5 s: the third comes after the limit
    [delivery] = await _settled(stack, endpoint["id"], ("failed",))
    assert delivery["attempts"] == 3 and delivery["last_error"].startswith("retries exhausted")
    _, view = await _endpoint_view(stack, endpoint["id"])
    assert view["data"]["disabled"] is True and view["data"]["failing_since"] is not None
    assert "WEBHOOK_DISABLE_AFTER" in view["data"]["disabled_reason"]


async def test_replay_sends_the_same_event_again(stack_factory: Any, receiver: Receiver) -> None:
    stack = await _stack(stack_factory)
    endpoint = await _endpoint(stack, receiver.url("/replay"), ["notification.delivered"])
    await _deliver(stack)
    [first] = await receiver.wait("/replay", 1)
    [delivery] = await _settled(stack, endpoint["id"])

    response = await stack.gateway.post(
        f"/api/v1/webhooks/endpoints/{endpoint['id']}/deliveries/{delivery['delivery_id']}/replay",
        headers=_auth(),
    )
    assert response.status == 202, await response.text()
    second = (await receiver.wait("/replay", 2))[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert Webhook(endpoint["secret"]).verify(second.body, second.headers) == first.event
    [again] = await _settled(stack, endpoint["id"])
    assert [h["status_code"] for h in again["history"]] == [200, 200]


async def test_endpoint_urls_pass_the_ssrf_guard(stack_factory: Any, receiver: Receiver) -> None:
    port = urlsplit(receiver.url("/")).port
    stack = await _stack(stack_factory, webhook_allowed_hosts=(f"127.0.0.1:{port}",))
    await _endpoint(stack, receiver.url("/ok"), ["notification.delivered"])  # host:port allowed
    for url in (
        f"http://127.0.0.1:{port + 1 if port and port < 65535 else 1}/other-port",
        "http://example.com/hook",  # http to a host not allowed
        "https://10.0.0.8/hook",
        "https://[::1]/hook",
        "https://169.254.169.254/latest/meta-data",
        "ftp://example.com/hook",
    ):
        response = await stack.gateway.post(
            "/api/v1/webhooks/endpoints",
            json={"url": url, "events": ["notification.failed"]},
            headers=_auth(),
        )
        body = await response.json()
        assert response.status == 400 and "url" in body["data"]["fields"], (url, body)
    response = await stack.gateway.post(
        "/api/v1/webhooks/endpoints",
        json={"url": receiver.url("/ok"), "events": ["notification.sent"]},
        headers=_auth(),
    )
    assert response.status == 400 and "events" in (await response.json())["data"]["fields"]
    unauthenticated = await stack.gateway.get("/api/v1/webhooks/endpoints")
    assert unauthenticated.status == 401


async def test_events_are_not_lost_while_the_broker_is_away(
    stack_factory: Any, receiver: Receiver, base_config: Any
) -> None:
    """A notification becomes final while the gateway, which relays webhook events, cannot reach
    RabbitMQ: the event waits in webhook_deliveries and goes out once the broker is back."""
    target = urlsplit(base_config.rabbitmq_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await link.start()
    stack = await _stack(stack_factory, gateway_config={"rabbitmq_url": via(base_config.rabbitmq_url, link)})
    endpoint = await _endpoint(
        stack, receiver.url("/outage"), ["notification.delivered", "notification.failed"]
    )
    record = await _deliver(stack)
    await receiver.wait("/outage", 1)
    await link.cut()
    try:
        report = await stack.gateway.post(
            "/api/v1/email/status/",
            json={"notification_id": record["notification_id"], "status": "failed", "error": "recalled"},
            headers=_auth(INTERNAL_TOKEN),
        )
        assert report.status == 200, await report.text()
        await asyncio.sleep(1.5)  # relay rounds go by without a broker
        _, queued = await _deliveries(stack, endpoint["id"])
        assert [(d["event_type"], d["status"]) for d in queued["data"]] == [
            ("notification.failed", "pending"),
            ("notification.delivered", "delivered"),
        ]
        assert len(receiver.at("/outage")) == 1
    finally:
        await link.restore()

    second = (await receiver.wait("/outage", 2, timeout=30))[1]
    event = Webhook(endpoint["secret"]).verify(second.body, second.headers)
    assert event["type"] == "notification.failed" and event["data"]["error"] == "recalled"
    await _settled(stack, endpoint["id"])
    await link.close()


def _other_secret() -> str:
    return "whsec_" + "A" * 43 + "="


async def test_an_api_key_has_at_most_its_cap_of_endpoints_even_created_at_once(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory, gateway_api_keys=(API_KEY, f"other:{OTHER_KEY}"), workers=False)
    answers = await asyncio.gather(
        *(
            stack.gateway.post(
                "/api/v1/webhooks/endpoints",
                json={"url": receiver.url(f"/e{i}"), "events": ["notification.delivered"]},
                headers=_auth(),
            )
            for i in range(MAX_WEBHOOK_ENDPOINTS + 5)
        )
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [201] * MAX_WEBHOOK_ENDPOINTS + [409] * 5
    refused = [await a.json() for a in answers if a.status == 409]
    assert refused[0]["error"] == "too_many_webhook_endpoints", refused[0]
    assert str(MAX_WEBHOOK_ENDPOINTS) in refused[0]["message"]
    # Another key's cap is its own.
    await _endpoint(stack, receiver.url("/other"), ["notification.delivered"], key=OTHER_KEY)


async def test_a_slow_receiver_holds_two_slots_and_another_key_is_not_kept_waiting(
    stack_factory: Any, receiver: Receiver
) -> None:
    stack = await _stack(stack_factory, gateway_api_keys=(API_KEY, f"other:{OTHER_KEY}"))
    receiver.delays["/slow"] = 3.0
    await _endpoint(stack, receiver.url("/slow"), ["notification.delivered"])
    await _endpoint(stack, receiver.url("/fast"), ["notification.delivered"], key=OTHER_KEY)
    # More deliveries to the slow receiver than the consumer's prefetch (16 in tests).
    await asyncio.gather(*(_deliver(stack) for _ in range(20)))
    await receiver.wait("/slow", 2)
    started = time.monotonic()
    await _deliver(stack, key=OTHER_KEY)
    await receiver.wait("/fast", 1)
    # Behind 16 held slots it would wait for the slow answers (3 s each) to come back.
    assert time.monotonic() - started < 2.5
    assert receiver.most["/slow"] == 2  # PER_ENDPOINT in the one consuming process
    await receiver.wait("/slow", 20, timeout=60)
    assert receiver.most["/slow"] == 2
