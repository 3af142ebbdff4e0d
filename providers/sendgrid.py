"""SendGrid provider: the v3 Mail Send API (`POST /v3/mail/send`, bearer key, 202 = accepted),
and its Event Webhook (bounces and drops), which the gateway receives."""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import aiohttp
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from common.config import Config
from common.delivery.interface import Bounce
from providers.email import OutgoingEmail, connection_failure, http_failure

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
TOKEN_HEADER = "X-Webhook-Token"


def payload(email: OutgoingEmail) -> dict[str, Any]:
    sender: dict[str, str] = {"email": email.sender_address}
    if email.sender_name:
        sender["name"] = email.sender_name
    return {
        "personalizations": [{"to": [{"email": email.to}]}],
        "from": sender,
        "subject": email.subject,
        # SendGrid wants text/plain before text/html; mail clients take the last they can show.
        "content": [
            {"type": "text/plain", "value": email.text},
            {"type": "text/html", "value": email.html},
        ],
        "headers": {"Message-ID": email.message_id, **email.headers},
        # Come back as top-level fields of every event for this message (bounce webhooks).
        "custom_args": dict(email.tracking),
    }


def error_text(raw: bytes) -> str:
    """SendGrid explains a refusal as {"errors": [{"message", "field"}]}; keep its words."""
    try:
        body = orjson.loads(raw)
        messages = [
            f"{e.get('field')}: {e.get('message')}" if e.get("field") else str(e.get("message"))
            for e in body["errors"]
        ]
        return "; ".join(messages)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return raw.decode(errors="replace")


class SendGridProvider:
    name = "sendgrid"

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.url = f"{config.sendgrid_base_url}/v3/mail/send"
        self.api_key = config.sendgrid_api_key or ""
        self.session = session

    async def send(self, email: OutgoingEmail) -> str:
        try:
            async with self.session.post(
                self.url,
                data=orjson.dumps(payload(email)),
                headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
            ) as response:
                raw = await response.read()
                if 200 <= response.status < 300:
                    return response.headers.get("X-Message-Id") or email.message_id
                raise http_failure(
                    self.name, response.status, error_text(raw), response.headers.get("Retry-After")
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise connection_failure(self.name, exc) from exc

    async def close(self) -> None:
        """The session belongs to the worker application, which closes it."""


# --- the Event Webhook -----------------------------------------------------------------------


@lru_cache(maxsize=4)
def _public_key(encoded: str) -> ec.EllipticCurvePublicKey:
    key = load_der_public_key(base64.b64decode(encoded))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve key")
    return key


def signature_valid(public_key: str, raw: bytes, signature: str, timestamp: str) -> bool:
    """SendGrid's Signed Event Webhook: ECDSA P-256 / SHA-256 over timestamp + raw body."""
    if not signature or not timestamp:
        return False
    try:
        _public_key(public_key).verify(
            base64.b64decode(signature, validate=True),
            timestamp.encode() + raw,
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, ValueError):
        return False
    return True


MAX_AGE = 300  # seconds a signed event batch stays acceptable, either side of our clock


def timestamp_fresh(timestamp: str, now: float, max_age: float = MAX_AGE) -> bool:
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    return abs(now - int(timestamp)) <= max_age


def webhook_authentic(
    config: Config, headers: Mapping[str, str], query: Mapping[str, str], raw: bytes, now: float
) -> bool:
    """Every configured check must pass, and at least one must be configured: the signature
    over a timestamp no older than MAX_AGE (SENDGRID_WEBHOOK_PUBLIC_KEY) and/or a shared secret
    (SENDGRID_WEBHOOK_SECRET) in the X-Webhook-Token header, or else the URL's `token`
    parameter (a query string ends up in access logs: the header is preferred)."""
    checks: list[bool] = []
    if config.sendgrid_webhook_public_key:
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        checks.append(
            timestamp_fresh(timestamp, now)
            and signature_valid(
                config.sendgrid_webhook_public_key, raw, headers.get(SIGNATURE_HEADER, ""), timestamp
            )
        )
    if config.sendgrid_webhook_secret:
        presented = headers.get(TOKEN_HEADER) or query.get("token") or ""
        checks.append(hmac.compare_digest(presented.encode(), config.sendgrid_webhook_secret.encode()))
    return bool(checks) and all(checks)


def bounces(events: list[Any]) -> list[Bounce]:
    """The `bounce` and `dropped` events of a batch; custom_args arrive as top-level fields."""
    found = []
    for event in events:
        if not isinstance(event, dict) or event.get("event") not in ("bounce", "dropped"):
            continue
        kind = str(event.get("type") or event["event"])
        detail = " ".join(str(event[k]) for k in ("status", "reason") if event.get(k))
        notification_id = event.get("notification_id")
        recipient = event.get("email")
        found.append(
            Bounce(
                provider="sendgrid",
                notification_id=str(notification_id) if notification_id else None,
                reason=f"{kind}: {detail}" if detail else kind,
                suppress=kind != "blocked",
                recipient=recipient if isinstance(recipient, str) else None,
            )
        )
    return found
