"""Email delivery, complete: SMTP, SendGrid and Mailgun behind one interface, failover, the
circuit breaker, bounce webhooks with suppression, one-click unsubscribe, header safety.

SendGrid and Mailgun are local servers that speak their APIs (tests/provider_fakes.py); SMTP
is the aiosmtpd sink. Everything talks to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.config import Config, ConfigError
from common.data import db
from common.delivery.worker import DeliveryError
from common.features.email_links import unsubscribe
from common.keys import METRICS_KEY, REDIS_KEY
from email_worker import check_settings
from providers import mailgun as mailgun_provider
from providers.breaker import CircuitBreaker, State
from providers.email import FAILURE_CLASSES, HeaderInjection, OutgoingEmail, is_transient
from providers.smtp import SmtpProvider
from tests.conftest import Stack
from tests.provider_fakes import Answer, FakeMailgun, FakeProvider, FakeSendGrid, Received
from tests.smtp_sink import SmtpSink, free_port
from tests.tcp_proxy import TcpProxy

MAILGUN_SIGNING_KEY = "mailgun-signing-key-0123456789"


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeSendGrid]:
    fake = FakeSendGrid()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def mailgun() -> AsyncIterator[FakeMailgun]:
    fake = FakeMailgun()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def webhook_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_key(private: ec.EllipticCurvePrivateKey) -> str:
    """As SendGrid's dashboard shows the verification key: base64 of the DER public key."""
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _providers(sendgrid: FakeSendGrid, mailgun: FakeMailgun, *names: str, **extra: Any) -> dict[str, Any]:
    """Config overrides pointing the worker at the fake providers."""
    return {
        "email_providers": names,
        "sendgrid_api_key": sendgrid.api_key,
        "sendgrid_base_url": sendgrid.url,
        "mailgun_api_key": mailgun.api_key,
        "mailgun_domain": mailgun.domain,
        "mailgun_base_url": mailgun.url,
        **extra,
    }


def _notification(user_id: str, code: str, **variables: str) -> dict[str, Any]:
    return {
        "notification_type": "email",
        "user_id": user_id,
        "template_code": code,
        "variables": {"name": "Ada", "link": "https://example.com/start", **variables},
        "request_id": f"req-{uuid.uuid4()}",
    }


async def _template(stack: Stack) -> dict[str, Any]:
    return await stack.create_template(
        subject="Welcome, {{ name }}!",
        body="<p>Hello <b>{{ name }}</b>, start at <a href='{{ link }}'>{{ link }}</a></p>",
        text_body="Hello {{ name }}, start at {{ link }}",
    )


async def _send(stack: Stack, user: dict[str, Any], template: dict[str, Any], **variables: str) -> str:
    status, body, _ = await stack.send(_notification(user["id"], template["code"], **variables))
    assert status == 202, body
    return str(body["data"]["notification_id"])


async def _deliver_one(stack: Stack, user: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    return await stack.wait_for(await _send(stack, user, template), "delivered", "failed")


def _received(provider: str, stack: Stack, fakes: dict[str, FakeProvider], address: str) -> Received:
    if provider == "smtp":
        [message] = stack.smtp.to(address)
        return Received.from_mime(message)
    [received] = fakes[provider].to(address)
    return received


async def _preferences(stack: Stack, user_id: str) -> dict[str, bool]:
    response = await stack.gateway.get(f"/api/v1/users/{user_id}/preferences", headers=stack.headers())
    assert response.status == 200
    return dict((await response.json())["data"])


def _circuit(stack: Stack, provider: str) -> float | None:
    registry = stack.apps["email_worker"][METRICS_KEY].registry
    return registry.get_sample_value("notify_circuit_state", {"provider": provider})


# --- the same notification through each provider -------------------------------------------


@pytest.mark.parametrize("provider", ["smtp", "sendgrid", "mailgun"])
async def test_each_provider_delivers_the_same_multipart_message_with_its_headers(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, provider: str
) -> None:
    stack = await stack_factory(**_providers(sendgrid, mailgun, provider))
    user = await stack.create_user()
    template = await _template(stack)
    status, body, headers = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202, body
    notification_id = body["data"]["notification_id"]
    record = await stack.wait_for(notification_id, "delivered")
    assert record["provider"] == provider and record["attempts"] == 1

    got = _received(provider, stack, {"sendgrid": sendgrid, "mailgun": mailgun}, user["email"])
    assert got.to == user["email"]
    assert got.sender == stack.config.email_from
    assert got.subject == "Welcome, Ada!"
    assert "Hello <b>Ada</b>" in got.html and "href='https://example.com/start'" in got.html
    assert got.text.strip() == "Hello Ada, start at https://example.com/start"
    lower = {k.lower(): v for k, v in got.headers.items()}
    assert lower["x-notification-id"] == notification_id
    assert lower["x-correlation-id"] == headers["X-Correlation-ID"]
    assert notification_id.replace("-", "") in lower["message-id"]
    assert re.fullmatch(r"<[^<>@\s]+@localhost>", lower["message-id"])
    link = re.fullmatch(
        r"<(http://127\.0\.0\.1:8000/api/v1/unsubscribe/[A-Za-z0-9_.-]+)>", lower["list-unsubscribe"]
    )
    assert link is not None, lower["list-unsubscribe"]
    assert lower["list-unsubscribe-post"] == "List-Unsubscribe=One-Click"
    target = unsubscribe.verify(stack.config.unsubscribe_key, link.group(1).rsplit("/", 1)[1])
    assert target == unsubscribe.Target(str(user["id"]), "email")
    if provider != "smtp":
        # What the provider hands back in its events, so a bounce can name the notification.
        assert got.tracking == {"notification_id": notification_id}


async def test_sendgrid_and_mailgun_payloads_are_the_documented_shapes(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    stack = await stack_factory(**_providers(sendgrid, mailgun, "sendgrid"))
    user = await stack.create_user()
    template = await _template(stack)
    await _deliver_one(stack, user, template)
    [payload] = sendgrid.raw
    assert payload["personalizations"] == [{"to": [{"email": user["email"]}]}]
    assert payload["from"] == {"email": "notify@localhost"}
    assert [c["type"] for c in payload["content"]] == ["text/plain", "text/html"]
    assert set(payload["headers"]) == {
        "Message-ID",
        "X-Notification-ID",
        "X-Correlation-ID",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    }
    assert set(payload["custom_args"]) == {"notification_id"}


# --- failure classes and failover ----------------------------------------------------------


def test_failure_classes_are_one_table() -> None:
    assert is_transient("smtp", 421) and is_transient("smtp", 451)
    assert not is_transient("smtp", 550) and not is_transient("smtp", 554)
    for status in (429, 500, 502, 503, 504):
        assert is_transient("http", status), status
    for status in (400, 401, 403, 413, 404, 422):
        assert not is_transient("http", status), status
    assert is_transient("timeout") and is_transient("network")
    assert {kind for kind, _, _ in FAILURE_CLASSES} == {"smtp", "http", "timeout", "network"}


async def test_a_transient_sendgrid_failure_fails_over_to_smtp_in_the_same_attempt(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    sendgrid.failing = Answer(503, {"errors": [{"message": "Service Unavailable"}]})
    stack = await stack_factory(**_providers(sendgrid, mailgun, "sendgrid", "smtp"))
    user = await stack.create_user()
    template = await _template(stack)
    record = await _deliver_one(stack, user, template)
    assert record["status"] == "delivered"
    assert record["attempts"] == 1 and record["provider"] == "smtp"
    assert sendgrid.requests == 1 and sendgrid.received == []
    assert len(stack.smtp.to(user["email"])) == 1
    [delivered] = [h for h in record["history"] if h["status"] == "delivered"]
    assert delivered["provider"] == "smtp"
    assert "sendgrid: HTTP 503 Service Unavailable" in delivered["detail"]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "personalizations.0.to.0.email: Does not contain a valid address."),
        (401, "The provided authorization grant is invalid, expired, or revoked"),
        (413, "Payload too large"),
    ],
)
async def test_a_permanent_provider_answer_fails_at_once_with_its_text(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, status: int, reason: str
) -> None:
    sendgrid.failing = Answer(status, {"errors": [{"message": reason}]})
    stack = await stack_factory(**_providers(sendgrid, mailgun, "sendgrid", "smtp"))
    user = await stack.create_user()
    record = await _deliver_one(stack, user, await _template(stack))
    assert record["status"] == "failed" and record["attempts"] == 1
    assert record["error"] == f"sendgrid: HTTP {status} {reason}"
    assert record["provider"] == "sendgrid"
    assert stack.smtp.to(user["email"]) == []  # another provider would be refused the same


async def test_mailgun_429_is_retried_after_its_retry_after_with_its_text_in_the_record(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    mailgun.script = [Answer(429, {"message": "Too many requests"}, {"Retry-After": "1"})]
    stack = await stack_factory(**_providers(sendgrid, mailgun, "mailgun"))
    user = await stack.create_user()
    notification_id = await _send(stack, user, await _template(stack))
    record = await stack.wait_for(notification_id, "delivered", timeout=20)
    # Retry-After: 1 is longer than the first retry queue (0.5 s): the 1 s one, the second.
    assert record["attempts"] == 3 and record["provider"] == "mailgun"
    [retrying] = [h for h in record["history"] if h["status"] == "retrying"]
    assert retrying["detail"] == "mailgun: HTTP 429 Too many requests"
    first, second = mailgun.request_times
    assert second - first >= 1.0


# --- the circuit breaker -------------------------------------------------------------------


def test_breaker_states_with_a_clock() -> None:
    now = [0.0]
    breaker = CircuitBreaker("x", threshold=2, cooldown=10, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    breaker.success()  # not consecutive any more
    breaker.failure()
    assert breaker.state is State.CLOSED
    breaker.failure()
    assert breaker.state is State.OPEN and not breaker.allow()
    assert breaker.retry_in() == 10
    now[0] = 10
    assert breaker.allow() and breaker.state is State.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state is State.OPEN and not breaker.allow()
    now[0] = 20
    assert breaker.allow()
    breaker.release()  # the probe was cancelled: another may go
    assert breaker.allow()
    breaker.success()
    assert breaker.state is State.CLOSED and breaker.allow() and breaker.allow()


async def test_breaker_opens_stops_calling_probes_after_the_cooldown_and_closes(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="providers.breaker")
    sendgrid.failing = Answer(503, {"errors": [{"message": "Service Unavailable"}]})
    stack = await stack_factory(
        **_providers(sendgrid, mailgun, "sendgrid", "smtp", circuit_failure_threshold=2, circuit_cooldown=1.0)
    )
    user = await stack.create_user()
    template = await _template(stack)
    assert _circuit(stack, "sendgrid") == 0

    for _ in range(2):
        assert (await _deliver_one(stack, user, template))["provider"] == "smtp"
    assert sendgrid.requests == 2
    assert _circuit(stack, "sendgrid") == 1  # open

    for _ in range(2):  # open: straight to SMTP, nothing reaches SendGrid
        record = await _deliver_one(stack, user, template)
        assert record["provider"] == "smtp" and record["attempts"] == 1
        assert "sendgrid: circuit open" in record["history"][-1]["detail"]
    assert sendgrid.requests == 2

    await asyncio.sleep(1.1)  # cooldown over: one probe, which fails, and it opens again
    assert (await _deliver_one(stack, user, template))["provider"] == "smtp"
    assert sendgrid.requests == 3 and _circuit(stack, "sendgrid") == 1
    assert (await _deliver_one(stack, user, template))["provider"] == "smtp"
    assert sendgrid.requests == 3

    sendgrid.failing = None  # recovered
    await asyncio.sleep(1.1)
    assert (await _deliver_one(stack, user, template))["provider"] == "sendgrid"
    assert sendgrid.requests == 4 and _circuit(stack, "sendgrid") == 0  # closed
    assert (await _deliver_one(stack, user, template))["provider"] == "sendgrid"
    assert sendgrid.requests == 5

    changes = [r.getMessage() for r in caplog.records if r.name == "providers.breaker"]
    assert [m.split(":")[0] for m in changes] == [
        "circuit for sendgrid closed -> open",
        "circuit for sendgrid open -> half-open",
        "circuit for sendgrid half-open -> open",
        "circuit for sendgrid open -> half-open",
        "circuit for sendgrid half-open -> closed",
    ]


async def test_with_every_circuit_open_messages_wait_without_using_attempts(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    sendgrid.failing = Answer(503, {"errors": [{"message": "Service Unavailable"}]})
    stack = await stack_factory(
        **_providers(sendgrid, mailgun, "sendgrid", circuit_failure_threshold=1, circuit_cooldown=3.0)
    )
    assert stack.config.max_attempts == 3
    user = await stack.create_user()
    template = await _template(stack)
    first = await _send(stack, user, template)
    await stack.wait_for(first, "retrying")
    assert sendgrid.requests == 1 and _circuit(stack, "sendgrid") == 1

    waiting = await _send(stack, user, template)
    # Deferrals wait in the longest retry queue that covers the breaker's "next probe in 3s"
    # (1 s here): two rounds in 2 s, and still attempt 1.
    await asyncio.sleep(2.0)
    # Read between rounds: each round passes through `sending` (claim, render) for a moment.
    record = await stack.wait_for(waiting, "retrying", timeout=0.9)
    assert record["attempts"] == 1
    assert "every email provider's circuit is open" in record["error"]
    assert sum(h["status"] == "retrying" for h in record["history"]) >= 2
    assert sendgrid.requests == 1  # nothing reached the provider meanwhile

    sendgrid.failing = None
    record = await stack.wait_for(waiting, "delivered", timeout=15)
    assert record["attempts"] == 1 and record["provider"] == "sendgrid"
    first_record = await stack.wait_for(first, "delivered", timeout=15)
    assert first_record["attempts"] == 2
    assert len(sendgrid.to(user["email"])) == 2
    assert _circuit(stack, "sendgrid") == 0


# --- bounces and suppression ---------------------------------------------------------------


def _sendgrid_signed(
    key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]], age: float = 0
) -> tuple[bytes, dict[str, str]]:
    raw = orjson.dumps(events)
    timestamp = str(int(time.time() - age))
    signature = key.sign(timestamp.encode() + raw, ec.ECDSA(hashes.SHA256()))
    return raw, {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def _mailgun_signed(
    event_data: dict[str, Any], key: str = MAILGUN_SIGNING_KEY, age: float = 0
) -> dict[str, Any]:
    timestamp, token = str(int(time.time() - age)), uuid.uuid4().hex
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": event_data,
    }


def _sendgrid_bounce(email: str, notification_id: str) -> list[dict[str, Any]]:
    return [
        {
            "email": email,
            "event": "processed",
            "timestamp": int(time.time()),
            "notification_id": notification_id,
        },
        {
            "email": email,
            "event": "bounce",
            "type": "bounce",
            "status": "5.1.1",
            "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
            "timestamp": int(time.time()),
            "sg_event_id": uuid.uuid4().hex,
            "notification_id": notification_id,
        },
    ]


def _mailgun_failure(email: str, notification_id: str, severity: str = "permanent") -> dict[str, Any]:
    return {
        "event": "failed",
        "severity": severity,
        "reason": "bounce",
        "recipient": email,
        "timestamp": time.time(),
        "delivery-status": {"code": 550, "message": "5.1.1 No such user", "description": "No such user here"},
        "user-variables": {"notification_id": notification_id},
    }


async def _assert_suppressed(stack: Stack, user: dict[str, Any], template: dict[str, Any]) -> None:
    assert (await _preferences(stack, user["id"]))["email"] is False
    status, body, _ = await stack.send(_notification(user["id"], template["code"]))
    assert status == 202 and body["data"]["status"] == "skipped", body


async def test_sendgrid_bounce_marks_failed_and_suppresses_the_address(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, webhook_key: ec.EllipticCurvePrivateKey
) -> None:
    stack = await stack_factory(
        **_providers(sendgrid, mailgun, "sendgrid", sendgrid_webhook_public_key=_public_key(webhook_key))
    )
    user = await stack.create_user()
    template = await _template(stack)
    record = await _deliver_one(stack, user, template)
    [sent] = sendgrid.to(user["email"])
    events = _sendgrid_bounce(user["email"], sent.tracking["notification_id"])
    raw, headers = _sendgrid_signed(webhook_key, events)

    response = await stack.gateway.post("/api/v1/webhooks/sendgrid", data=raw, headers=headers)  # no API key
    body = await response.json()
    assert response.status == 200, body
    assert body["success"] is True and body["data"] == {"received": 2, "bounces": 1, "ignored": 1}
    record = await stack.notification(record["notification_id"])
    assert record["status"] == "failed" and record["provider"] == "sendgrid"
    assert "550 5.1.1 The email account that you tried to reach does not exist." in record["error"]
    assert [h["status"] for h in record["history"]][-2:] == ["delivered", "failed"]
    await _assert_suppressed(stack, user, template)

    again = await stack.gateway.post("/api/v1/webhooks/sendgrid", data=raw, headers=headers)
    assert again.status == 200  # SendGrid retries deliveries: the same batch changes nothing more
    assert len((await stack.notification(record["notification_id"]))["history"]) == len(record["history"])


async def test_sendgrid_webhook_with_a_shared_secret(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    stack = await stack_factory(
        **_providers(sendgrid, mailgun, "sendgrid", sendgrid_webhook_secret="hook-secret-0123456789")
    )
    user = await stack.create_user()
    template = await _template(stack)
    record = await _deliver_one(stack, user, template)
    events = _sendgrid_bounce(user["email"], record["notification_id"])
    wrong = await stack.gateway.post("/api/v1/webhooks/sendgrid?token=guess", json=events)
    assert wrong.status == 401 and (await wrong.json())["error"] == "unauthorized"
    assert (await _preferences(stack, user["id"]))["email"] is True
    right = await stack.gateway.post("/api/v1/webhooks/sendgrid?token=hook-secret-0123456789", json=events)
    assert right.status == 200, await right.text()
    assert (await stack.notification(record["notification_id"]))["status"] == "failed"
    await _assert_suppressed(stack, user, template)


async def test_mailgun_permanent_failure_marks_failed_and_suppresses(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    stack = await stack_factory(
        **_providers(sendgrid, mailgun, "mailgun", mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY)
    )
    user = await stack.create_user()
    template = await _template(stack)
    record = await _deliver_one(stack, user, template)
    [sent] = mailgun.to(user["email"])
    notification_id = sent.tracking["notification_id"]

    temporary = _mailgun_signed(_mailgun_failure(user["email"], notification_id, severity="temporary"))
    response = await stack.gateway.post("/api/v1/webhooks/mailgun", json=temporary)
    assert response.status == 200 and (await response.json())["data"]["bounces"] == 0
    assert (await stack.notification(notification_id))["status"] == "delivered"

    response = await stack.gateway.post(
        "/api/v1/webhooks/mailgun", json=_mailgun_signed(_mailgun_failure(user["email"], notification_id))
    )
    assert response.status == 200, await response.text()
    record = await stack.notification(record["notification_id"])
    assert record["status"] == "failed" and record["provider"] == "mailgun"
    assert "550 No such user here" in record["error"]
    await _assert_suppressed(stack, user, template)


async def test_forged_webhooks_are_401_and_change_nothing(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, webhook_key: ec.EllipticCurvePrivateKey
) -> None:
    stack = await stack_factory(
        **_providers(
            sendgrid,
            mailgun,
            "sendgrid",
            sendgrid_webhook_public_key=_public_key(webhook_key),
            mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY,
        )
    )
    user = await stack.create_user()
    record = await _deliver_one(stack, user, await _template(stack))
    events = _sendgrid_bounce(user["email"], record["notification_id"])
    raw, headers = _sendgrid_signed(webhook_key, events)
    other_raw, other_headers = _sendgrid_signed(ec.generate_private_key(ec.SECP256R1()), events)
    tampered = raw.replace(b"5.1.1", b"5.1.2")
    forged = [
        ("sendgrid", raw, {"Content-Type": "application/json"}),  # unsigned
        ("sendgrid", other_raw, other_headers),  # signed by someone else's key
        ("sendgrid", tampered, headers),  # body changed after signing
        ("sendgrid", raw, {**headers, "X-Twilio-Email-Event-Webhook-Timestamp": "1"}),
        ("sendgrid", raw, {**headers, "X-Twilio-Email-Event-Webhook-Signature": "bm90IGEgc2lnbmF0dXJl"}),
        (
            "mailgun",
            orjson.dumps(
                _mailgun_signed(_mailgun_failure(user["email"], record["notification_id"]), "wrong-key")
            ),
            {"Content-Type": "application/json"},
        ),
        (
            "mailgun",
            orjson.dumps({"event-data": _mailgun_failure(user["email"], record["notification_id"])}),
            {"Content-Type": "application/json"},
        ),
    ]
    for provider, data, hook_headers in forged:
        response = await stack.gateway.post(f"/api/v1/webhooks/{provider}", data=data, headers=hook_headers)
        body = await response.json()
        assert response.status == 401, (provider, body)
        assert body["error"] == "unauthorized" and "does not verify" in body["message"]
    assert (await stack.notification(record["notification_id"]))["status"] == "delivered"
    assert (await _preferences(stack, user["id"]))["email"] is True


async def test_old_and_replayed_webhooks_are_refused(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, webhook_key: ec.EllipticCurvePrivateKey
) -> None:
    stack = await stack_factory(
        **_providers(
            sendgrid,
            mailgun,
            "sendgrid",
            sendgrid_webhook_public_key=_public_key(webhook_key),
            mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY,
        )
    )
    user = await stack.create_user()
    record = await _deliver_one(stack, user, await _template(stack))
    failure = _mailgun_failure(user["email"], record["notification_id"], severity="temporary")
    for age in (3600, -3600, 301):  # signed an hour ago, an hour ahead, just past 5 minutes
        response = await stack.gateway.post(
            "/api/v1/webhooks/mailgun", json=_mailgun_signed(failure, age=age)
        )
        body = await response.json()
        assert response.status == 401 and "older than 5 minutes" in body["message"], body
        raw, headers = _sendgrid_signed(
            webhook_key, _sendgrid_bounce(user["email"], record["notification_id"]), age
        )
        response = await stack.gateway.post("/api/v1/webhooks/sendgrid", data=raw, headers=headers)
        assert response.status == 401, await response.text()

    signed = _mailgun_signed(failure, age=60)
    first = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)
    assert first.status == 200, await first.text()
    replay = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)
    body = await replay.json()
    assert replay.status == 409 and body["error"] == "replayed", body
    assert (await stack.notification(record["notification_id"]))["status"] == "delivered"


@pytest.fixture
async def user_link() -> AsyncIterator[TcpProxy]:
    """A proxy between the gateway and the user service, to cut or freeze; its target is set
    once the user service's port is known (`_behind_link`)."""
    link = TcpProxy("127.0.0.1", 1)
    await link.start()
    yield link
    await link.close()


async def _behind_link(stack_factory: Any, link: TcpProxy, **config: Any) -> Stack:
    """A stack whose gateway reaches the user service through `link` (the worker directly)."""
    stack = await stack_factory(
        **config, gateway_config={"user_service_url": f"http://127.0.0.1:{link.port}"}
    )
    users = urlsplit(stack.urls["user_service"])
    link.target = (users.hostname or "127.0.0.1", users.port or 80)
    return stack


def _bounces_counted(stack: Stack, provider: str) -> float:
    registry = stack.apps["gateway"][METRICS_KEY].registry
    return registry.get_sample_value("notify_email_bounces_total", {"provider": provider}) or 0.0


async def test_a_mailgun_bounce_that_failed_with_a_503_is_handled_on_mailguns_retry(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, user_link: TcpProxy
) -> None:
    stack = await _behind_link(
        stack_factory,
        user_link,
        **_providers(sendgrid, mailgun, "mailgun", mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY),
    )
    user = await stack.create_user()
    template = await _template(stack)
    record = await _deliver_one(stack, user, template)
    assert record["status"] == "delivered" and record["provider"] == "mailgun"
    signed = _mailgun_signed(_mailgun_failure(user["email"], record["notification_id"]))

    await user_link.cut()  # the user service briefly unreachable from the gateway
    response = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)
    body = await response.json()
    assert response.status == 503 and body["error"] == "service_unavailable", body
    assert "Retry-After" in response.headers
    assert (await stack.notification(record["notification_id"]))["status"] == "delivered"

    await user_link.restore()
    retry = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)  # Mailgun's retry
    body = await retry.json()
    assert retry.status == 200, body
    assert body["data"] == {"received": 1, "bounces": 1, "ignored": 0}
    record = await stack.notification(record["notification_id"])
    assert record["status"] == "failed" and "550 No such user here" in record["error"]
    assert [h["status"] for h in record["history"]][-2:] == ["delivered", "failed"]
    await _assert_suppressed(stack, user, template)

    replay = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)
    assert replay.status == 409 and (await replay.json())["error"] == "replayed"


async def test_two_copies_of_a_mailgun_bounce_at_once_apply_it_once(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun, user_link: TcpProxy
) -> None:
    stack = await _behind_link(
        stack_factory,
        user_link,
        **_providers(sendgrid, mailgun, "mailgun", mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY),
    )
    user = await stack.create_user()
    template = await _template(stack)
    first_record = await _deliver_one(stack, user, template)
    second_record = await _deliver_one(stack, user, template)
    redis = stack.apps["gateway"][REDIS_KEY]
    signed = _mailgun_signed(_mailgun_failure(user["email"], first_record["notification_id"]))
    key = mailgun_provider.token_key(signed)

    # The first copy is held mid-handling (its user service call goes nowhere) ...
    user_link.freeze()
    first = asyncio.create_task(stack.gateway.post("/api/v1/webhooks/mailgun", json=signed))
    deadline = time.monotonic() + 5
    while (held := cast(bytes | None, await redis.get(key))) is None:
        assert time.monotonic() < deadline and not first.done(), "the first copy never claimed the token"
        await asyncio.sleep(0.01)
    assert held.startswith(b"pending:")
    # ... while the second arrives: Mailgun is told to come back, not that it replayed.
    second = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)
    body = await second.json()
    assert second.status == 503 and body["error"] == "webhook_in_progress", body
    assert "Retry-After" in second.headers
    user_link.thaw()
    response = await first
    body = await response.json()
    assert response.status == 200 and body["data"]["bounces"] == 1, body
    assert await redis.get(key) == b"used"
    later = await stack.gateway.post("/api/v1/webhooks/mailgun", json=signed)
    assert later.status == 409 and (await later.json())["error"] == "replayed"

    # Five copies of another bounce at once: one handles it, each other is told why not.
    other = _mailgun_signed(_mailgun_failure(user["email"], second_record["notification_id"]))
    answers = await asyncio.gather(
        *(stack.gateway.post("/api/v1/webhooks/mailgun", json=other) for _ in range(5))
    )
    outcomes = sorted([(a.status, (await a.json())["error"]) for a in answers], key=str)
    assert outcomes.count((200, None)) == 1, outcomes
    assert set(outcomes) - {(200, None)} <= {(503, "webhook_in_progress"), (409, "replayed")}, outcomes

    for record in (first_record, second_record):
        history = (await stack.notification(record["notification_id"]))["history"]
        assert [h["status"] for h in history].count("failed") == 1, history
    assert _bounces_counted(stack, "mailgun") == 2


async def test_a_bounce_applies_only_to_what_its_provider_sent_to_its_recipient(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    secret = "hook-secret-0123456789"
    stack = await stack_factory(
        **_providers(
            sendgrid,
            mailgun,
            "sendgrid",
            "mailgun",
            sendgrid_webhook_secret=secret,
            mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY,
        )
    )
    user = await stack.create_user()
    template = await _template(stack)
    by_sendgrid = await _deliver_one(stack, user, template)
    sendgrid.script = [Answer(503, {"errors": [{"message": "Service Unavailable"}]})]
    by_mailgun = await _deliver_one(stack, user, template)  # failed over
    assert (by_sendgrid["provider"], by_mailgun["provider"]) == ("sendgrid", "mailgun")
    stranger = "someone-else@example.com"

    ignored: list[tuple[str, Any, int]] = [
        # Mailgun does not sign event-data: a token can carry any event. Another address ...
        ("mailgun", _mailgun_signed(_mailgun_failure(stranger, by_mailgun["notification_id"])), 1),
        # ... no address, or a notification another provider sent.
        (
            "mailgun",
            _mailgun_signed({**_mailgun_failure("", by_mailgun["notification_id"]), "recipient": None}),
            1,
        ),
        ("mailgun", _mailgun_signed(_mailgun_failure(user["email"], by_sendgrid["notification_id"])), 1),
        ("sendgrid", _sendgrid_bounce(user["email"], by_mailgun["notification_id"]), 2),
        ("sendgrid", _sendgrid_bounce(stranger, by_sendgrid["notification_id"]), 2),
    ]
    for provider, payload, received in ignored:
        response = await stack.gateway.post(
            f"/api/v1/webhooks/{provider}", json=payload, headers={"X-Webhook-Token": secret}
        )
        body = await response.json()
        assert response.status == 200, body
        assert body["data"] == {"received": received, "bounces": 0, "ignored": received}, (provider, body)
    for record in (by_sendgrid, by_mailgun):
        now = await stack.notification(record["notification_id"])
        assert now["status"] == "delivered" and len(now["history"]) == len(record["history"]), now
    assert (await _preferences(stack, user["id"]))["email"] is True
    assert _bounces_counted(stack, "mailgun") == _bounces_counted(stack, "sendgrid") == 0

    # The right address (its case aside) from the provider that sent it: applied.
    right = _mailgun_signed(_mailgun_failure(user["email"].upper(), by_mailgun["notification_id"]))
    response = await stack.gateway.post("/api/v1/webhooks/mailgun", json=right)
    assert response.status == 200 and (await response.json())["data"]["bounces"] == 1
    assert (await stack.notification(by_mailgun["notification_id"]))["status"] == "failed"
    assert (await stack.notification(by_sendgrid["notification_id"]))["status"] == "delivered"
    await _assert_suppressed(stack, user, template)


async def test_the_sendgrid_secret_is_taken_from_a_header(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    stack = await stack_factory(
        **_providers(sendgrid, mailgun, "sendgrid", sendgrid_webhook_secret="hook-secret-0123456789")
    )
    response = await stack.gateway.post(
        "/api/v1/webhooks/sendgrid?token=guess",
        json=[],
        headers={"X-Webhook-Token": "hook-secret-0123456789"},
    )
    assert response.status == 200, await response.text()  # the header wins over the query string
    response = await stack.gateway.post(
        "/api/v1/webhooks/sendgrid?token=hook-secret-0123456789",
        json=[],
        headers={"X-Webhook-Token": "guess"},
    )
    assert response.status == 401


async def test_webhooks_not_configured_are_refused(stack: Stack) -> None:
    for provider in ("sendgrid", "mailgun"):
        response = await stack.gateway.post(
            f"/api/v1/webhooks/{provider}", json=[] if provider == "sendgrid" else {}
        )
        body = await response.json()
        assert response.status == 401 and "not configured" in body["message"], body


# --- unsubscribe ---------------------------------------------------------------------------


async def test_the_unsubscribe_link_turns_email_off_and_get_alone_changes_nothing(stack: Stack) -> None:
    user = await stack.create_user()
    template = await _template(stack)
    await _deliver_one(stack, user, template)
    [message] = stack.smtp.to(user["email"])
    path = urlsplit(str(message["List-Unsubscribe"]).strip("<>")).path

    page = await stack.gateway.get(path)  # a link scanner, or a person following the link
    text = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    assert '<form method="post">' in text and "Unsubscribe" in text
    assert "no-referrer" in page.headers["Referrer-Policy"]
    assert (await _preferences(stack, user["id"]))["email"] is True

    one_click = await stack.gateway.post(path, data={"List-Unsubscribe": "One-Click"})  # RFC 8058
    body = await one_click.json()
    assert one_click.status == 200, body
    assert body["success"] is True and body["message"] == "unsubscribed from email notifications"
    assert body["data"] == {"user_id": user["id"], "channel": "email", "category": None, "subscribed": False}
    await _assert_suppressed(stack, user, template)

    browser = await stack.gateway.post(
        path, data={"List-Unsubscribe": "One-Click"}, headers={"Accept": "text/html,*/*;q=0.8"}
    )
    assert browser.status == 200 and "You are unsubscribed" in await browser.text()


async def test_a_tampered_unsubscribe_token_is_refused(stack: Stack) -> None:
    user = await stack.create_user()
    victim = await stack.create_user()
    token = unsubscribe.sign(stack.config.unsubscribe_key, user["id"], "email")
    payload, mac = token.split(".")
    victim_payload = base64.urlsafe_b64encode(uuid.UUID(victim["id"]).bytes + b"email").rstrip(b"=").decode()
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for bad in (
        f"{victim_payload}.{mac}",  # someone else's id under this signature
        f"{payload}.{flipped}",
        payload,
        "not-a-token",
        unsubscribe.sign("another-secret-entirely", victim["id"], "email"),
    ):
        response = await stack.gateway.post(f"/api/v1/unsubscribe/{bad}")
        body = await response.json()
        assert response.status == 400, (bad, body)
        assert body["error"] == "invalid_token" and "not valid" in body["message"]
        page = await stack.gateway.get(f"/api/v1/unsubscribe/{bad}")
        assert page.status == 400 and "not valid" in await page.text()
    assert (await _preferences(stack, victim["id"]))["email"] is True
    assert (await _preferences(stack, user["id"]))["email"] is True


def test_unsubscribe_tokens_verify_only_with_their_key() -> None:
    user_id = uuid.uuid4()
    token = unsubscribe.sign("k" * 32, user_id, "email")
    assert unsubscribe.verify("k" * 32, token) == unsubscribe.Target(str(user_id), "email")
    assert unsubscribe.verify("j" * 32, token) is None
    assert unsubscribe.verify("", token) is None
    with pytest.raises(ValueError, match="secret"):
        unsubscribe.sign("", user_id, "email")


# --- header and command injection ------------------------------------------------------------


def _email(**changes: Any) -> dict[str, Any]:
    return {
        "to": "ada@example.com",
        "sender": "notify@localhost",
        "subject": "Hello",
        "html": "<p>Hi</p>",
        "text": "Hi",
        "message_id": "<1@localhost>",
        **changes,
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"to": "ada@example.com\r\nBcc: evil@example.com"},
        {"to": "ada@example.com\nRCPT TO:<evil@example.com>"},
        {"to": "ada@example.com, evil@example.com"},
        {"to": "Ada <ada@example.com>"},
        {"to": "ada@example.com>\r\nRCPT TO:<evil@example.com"},
        {"subject": "Hi\r\nBcc: evil@example.com"},
        {"subject": "Hi\rX-Evil: 1"},
        {"sender": "notify@localhost\nBcc: evil@example.com"},
        {"headers": {"X-Correlation-ID": "a\r\nBcc: evil@example.com"}},
        {"headers": {"X-Evil\r\nBcc": "evil@example.com"}},
        {"tracking": {"notification_id": "1\r\nBcc: evil@example.com"}},
    ],
)
def test_outgoing_email_refuses_line_breaks_and_extra_recipients(changes: dict[str, Any]) -> None:
    with pytest.raises(HeaderInjection):
        OutgoingEmail(**_email(**changes))


def _crafted(**changes: Any) -> OutgoingEmail:
    """An OutgoingEmail whose guard was bypassed, to show the SMTP layer holds on its own."""
    email = object.__new__(OutgoingEmail)
    for name, value in {**_email(), "headers": {}, "tracking": {}, **changes}.items():
        object.__setattr__(email, name, value)
    return email


@pytest.mark.parametrize(
    "changes",
    [
        {"to": "ada@example.com>\r\nRCPT TO:<evil@example.com"},
        {"to": "ada@example.com\nDATA"},
        {"sender": "notify@localhost>\r\nRCPT TO:<evil@example.com"},
        {"subject": "Hi\r\nBcc: evil@example.com"},
    ],
)
async def test_the_smtp_path_sends_no_injected_command(smtp_sink: SmtpSink, changes: dict[str, Any]) -> None:
    provider = SmtpProvider(Config(smtp_port=smtp_sink.port, smtp_timeout=5))
    try:
        with pytest.raises(DeliveryError) as caught:
            await provider.send(_crafted(**changes))
    finally:
        await provider.close()
    assert caught.value.transient is False and caught.value.reason.startswith("refused")
    assert smtp_sink.envelopes == [] and smtp_sink.attempts == []


async def test_a_crafted_address_in_the_user_record_is_refused_by_the_worker(stack: Stack) -> None:
    bad = "ada@example.com\r\nRCPT TO:<evil@example.com>"
    response = await stack.gateway.post(
        "/api/v1/users/",
        json={"name": "Ada", "email": bad, "password": "correct horse battery"},
        headers=stack.headers(),
    )
    assert response.status == 400 and "email" in (await response.json())["data"]["fields"]

    # Data that got past validation some other way (an old import, a manual fix) is still
    # refused at the worker, and nothing reaches the SMTP server.
    users_db = await db.connect(stack.config.users_db_url)
    try:
        user_id = await users_db.fetchval(
            "INSERT INTO users (name, email, password_hash) VALUES ('Mallory', %s, 'x') RETURNING id",
            f"{uuid.uuid4().hex}@example.com\r\nRCPT TO:<evil@example.com>",
        )
    finally:
        await users_db.close()
    record = await stack.wait_for(
        await _send(stack, {"id": str(user_id)}, await _template(stack)), "failed", "delivered"
    )
    assert record["status"] == "failed" and record["attempts"] == 1
    assert record["error"].startswith("refused: header 'To' contains a line break")
    assert stack.smtp.envelopes == []


async def test_a_subject_variable_with_line_breaks_cannot_add_a_header(stack: Stack) -> None:
    user = await stack.create_user()
    template = await _template(stack)
    notification_id = await _send(stack, user, template, name="Ada\r\nBcc: evil@example.com")
    await stack.wait_for(notification_id, "delivered")
    [message] = stack.smtp.to(user["email"])
    assert message["Subject"] == "Welcome, Ada Bcc: evil@example.com!"  # folded onto one line
    assert message["Bcc"] is None
    assert stack.smtp.envelopes == [(stack.config.email_from, [user["email"]])]


# --- settings --------------------------------------------------------------------------------


def test_provider_settings_are_checked_together() -> None:
    good = Config(jwt_secret="s" * 32)
    check_settings(good)
    for config, named in (
        (Config(), "UNSUBSCRIBE_SECRET"),
        (Config(jwt_secret="s", email_providers=("sendgrid",)), "SENDGRID_API_KEY"),
        (Config(jwt_secret="s", email_providers=("smtp", "mailgun"), mailgun_api_key="k"), "MAILGUN_DOMAIN"),
        (Config(jwt_secret="s", smtp_username="me@gmail.com"), "SMTP_PASSWORD"),
    ):
        with pytest.raises(ConfigError, match=named):
            check_settings(config)
    assert Config(unsubscribe_secret="u", jwt_secret="j").unsubscribe_key == "u"
    parsed = Config.from_env(
        {
            "PUBLIC_BASE_URL": "https://notify.example.com/",
            "CIRCUIT_FAILURE_THRESHOLD": "3",
            "CIRCUIT_COOLDOWN": "2.5",
        }
    )
    assert parsed.public_base_url == "https://notify.example.com"
    assert parsed.circuit_failure_threshold == 3 and parsed.circuit_cooldown == 2.5
    for variable, value in (
        ("CIRCUIT_FAILURE_THRESHOLD", "0"),
        ("CIRCUIT_COOLDOWN", "soon"),
        ("PUBLIC_BASE_URL", "notify.example.com"),
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "not a key"),
    ):
        with pytest.raises(ConfigError, match=variable):
            Config.from_env({variable: value})


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_login_with_username_and_password() -> None:
    seen: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        seen.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=data.password == b"app-password-16ch", handled=False)

    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope)
            return "250 Message accepted for delivery"

    port = free_port()
    controller = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=False,  # a loopback test server; real relays use STARTTLS or TLS
    )
    controller.start()
    try:
        for password, ok in (("wrong", False), ("app-password-16ch", True)):
            provider = SmtpProvider(
                Config(smtp_port=port, smtp_username="me@example.com", smtp_password=password, smtp_timeout=5)
            )
            try:
                if ok:
                    await provider.send(OutgoingEmail(**_email()))
                else:
                    with pytest.raises(DeliveryError) as caught:
                        await provider.send(OutgoingEmail(**_email()))
                    # A wrong password is the deployment's trouble, not the message's: retried
                    # (and counted by the breaker, so the next provider takes over).
                    assert "535" in caught.value.reason and caught.value.transient is True
                    assert caught.value.provider_fault is True
            finally:
                await provider.close()
    finally:
        controller.stop()
    # aiosmtplib tries each mechanism the server offers before giving up on a password.
    assert {login for login, _ in seen} == {"me@example.com"}
    assert seen[-1] == ("me@example.com", "app-password-16ch")
    assert len(received) == 1


# --- addresses ------------------------------------------------------------------------------


async def test_a_non_ascii_address_without_smtputf8_fails_with_the_reason(stack_factory: Any) -> None:
    stack = await stack_factory()  # the test SMTP server does not offer SMTPUTF8
    template = await _template(stack)
    user = await stack.create_user(email=f"zoë-{time.time_ns()}@example.com")
    record = await _deliver_one(stack, user, template)
    assert record["status"] == "failed" and record["attempts"] == 1, record
    assert "SMTPUTF8" in record["error"] and "internal error" not in record["error"]


async def test_a_non_ascii_address_goes_to_the_next_provider_without_smtputf8(
    stack_factory: Any, sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    stack = await stack_factory(**_providers(sendgrid, mailgun, "smtp", "sendgrid"))
    user = await stack.create_user(email=f"zoë-{time.time_ns()}@example.com")
    record = await _deliver_one(stack, user, await _template(stack))
    assert record["status"] == "delivered" and record["provider"] == "sendgrid", record
    assert len(sendgrid.to(user["email"])) == 1


async def test_a_non_ascii_address_goes_by_smtputf8_when_offered(stack_factory: Any) -> None:
    sink = SmtpSink(smtputf8=True)
    sink.start()
    try:
        stack = await stack_factory(worker_config={"smtp_port": sink.port})
        user = await stack.create_user(email=f"zoë-{time.time_ns()}@example.com")
        record = await _deliver_one(stack, user, await _template(stack))
        assert record["status"] == "delivered" and record["provider"] == "smtp", record
        [(_, recipients)] = sink.envelopes
        assert recipients == [user["email"]]
        [message] = sink.messages
        assert message["To"] == user["email"]
    finally:
        sink.stop()
