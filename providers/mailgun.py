"""Mailgun provider: `POST /v3/{domain}/messages`, basic auth `api:<key>`, a multipart form;
and its JSON webhooks (permanent failures), which the gateway receives."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import redis.asyncio as aioredis

from common.config import Config
from common.delivery.interface import Bounce
from providers.email import OutgoingEmail, connection_failure, http_failure


def form(email: OutgoingEmail) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in (
        ("from", email.sender),
        ("to", email.to),
        ("subject", email.subject),
        ("text", email.text),
        ("html", email.html),
        ("h:Message-Id", email.message_id),
    ):
        data.add_field(name, value)
    for header, value in email.headers.items():
        data.add_field(f"h:{header}", value)
    # v: variables come back as `user-variables` in every event for this message.
    for key, value in email.tracking.items():
        data.add_field(f"v:{key}", value)
    return data


def error_text(raw: bytes) -> str:
    """Mailgun explains a refusal as {"message": "..."}."""
    try:
        body = orjson.loads(raw)
        return str(body["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw.decode(errors="replace")


class MailgunProvider:
    name = "mailgun"

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.url = f"{config.mailgun_base_url}/v3/{quote(config.mailgun_domain or '', safe='')}/messages"
        self.auth = aiohttp.BasicAuth("api", config.mailgun_api_key or "")
        self.session = session

    async def send(self, email: OutgoingEmail) -> str:
        try:
            async with self.session.post(self.url, data=form(email), auth=self.auth) as response:
                raw = await response.read()
                if 200 <= response.status < 300:
                    try:
                        return str(orjson.loads(raw)["id"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        return email.message_id
                raise http_failure(
                    self.name, response.status, error_text(raw), response.headers.get("Retry-After")
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise connection_failure(self.name, exc) from exc

    async def close(self) -> None:
        """The session belongs to the worker application, which closes it."""


# --- webhooks --------------------------------------------------------------------------------


def webhook_authentic(signing_key: str | None, body: dict[str, Any]) -> bool:
    """`signature.signature` must be HMAC-SHA256(signing key, timestamp + token), in hex. It
    vouches for the timestamp and token only, never for `event-data`: the token is single-use
    (`claim`) and the event is checked against its notification (`bounces.apply`)."""
    signature = body.get("signature")
    if not signing_key or not isinstance(signature, dict):
        return False
    timestamp, token, presented = (signature.get(k) for k in ("timestamp", "token", "signature"))
    if not all(isinstance(v, str | int) and str(v) for v in (timestamp, token, presented)):
        return False
    expected = hmac.new(signing_key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), str(presented).encode())


MAX_AGE = 300  # seconds a signature stays acceptable, either side of our clock
_SEEN_PREFIX = "notify:mailgun:token:"


def signed_at(body: dict[str, Any]) -> float | None:
    signature = body.get("signature")
    raw = signature.get("timestamp") if isinstance(signature, dict) else None
    try:
        value = float(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def webhook_fresh(body: dict[str, Any], now: float, max_age: float = MAX_AGE) -> bool:
    """Mailgun signs the timestamp but checking its age is ours to do: without it, a captured
    webhook verifies for ever."""
    when = signed_at(body)
    return when is not None and abs(now - when) <= max_age


# A token's life in Redis: absent (new), "pending:<holder>" while one copy of the webhook is being
# handled, "used" once its bounce is recorded. A copy whose handling fails releases its claim, so
# Mailgun's retry of the same webhook is handled rather than refused as a replay.
PENDING_TTL = 120  # a claim no one released (the gateway died mid-handling) expires on its own
HANDLING_DEADLINE = 60  # handling stops before its claim can expire under it
_USED = "used"

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[3] then return 0 end
return -1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TokenInProgress(Exception):
    """Another copy of this webhook is being handled now: the sender should try again shortly."""


class TokenUsed(Exception):
    """This webhook's token was used before: a replay."""


class TokensForgotten(Exception):
    """This webhook was signed before the Redis server holding the used tokens started: if that
    start lost them (a restart without persistence), a replay cannot be told from a first copy,
    so it is refused (fails closed) until it is past its age, rather than applied twice."""


@dataclass(frozen=True)
class TokenClaim:
    """This request's hold on a token while it handles the webhook (`claim`)."""

    key: str
    holder: str

    async def used(self, client: aioredis.Redis, max_age: float = MAX_AGE) -> None:
        """The bounce is recorded: the token is used, kept a little longer than a signature
        stays fresh, so a replay inside the window is caught and the key then expires."""
        await client.set(self.key, _USED, ex=int(max_age * 2) + 60)

    async def release(self, client: aioredis.Redis) -> None:
        """Handling failed: let the next copy in, unless the claim is no longer ours (it expired
        and another copy holds the token now, or marked it used)."""
        await client.eval(_RELEASE, 1, self.key, self.holder)


def token_key(body: dict[str, Any]) -> str:
    token = str(body["signature"]["token"])
    return _SEEN_PREFIX + hashlib.sha256(token.encode()).hexdigest()


async def claim(client: aioredis.Redis, body: dict[str, Any], now: float) -> TokenClaim:
    """Claim this signature's token as pending while the webhook is handled (SET NX, one
    script): TokenInProgress while another copy holds it, TokenUsed once it was used,
    TokensForgotten when it was signed before the Redis server started (the server's uptime,
    read in the same transaction as the claim, so a restart cannot fall between the two)."""
    held = TokenClaim(token_key(body), f"pending:{secrets.token_hex(16)}")
    async with client.pipeline(transaction=True) as pipe:
        pipe.info("server")
        pipe.eval(_CLAIM, 1, held.key, held.holder, PENDING_TTL, _USED)
        info, raw = await pipe.execute()
    result = int(raw)
    started = now - float(info["uptime_in_seconds"])
    signed = signed_at(body)
    # A second of slack for the uptime's whole seconds; the signature's own age was checked.
    if signed is None or signed < started - 1:
        if result == 1:
            await held.release(client)
        raise TokensForgotten
    if result == 0:
        raise TokenUsed
    if result < 0:
        raise TokenInProgress
    return held


def bounces(body: dict[str, Any]) -> list[Bounce]:
    """A `failed` event of severity `permanent`; temporary failures Mailgun retries itself.
    Mailgun's signature covers only timestamp and token, not `event-data`: what the event says
    is checked against the notification it names (`bounces.apply`)."""
    event = body.get("event-data")
    if not isinstance(event, dict) or event.get("event") != "failed" or event.get("severity") != "permanent":
        return []
    status = event.get("delivery-status")
    status = status if isinstance(status, dict) else {}
    words = [str(status.get("code") or ""), str(status.get("description") or status.get("message") or "")]
    detail = " ".join(w for w in words if w) or str(event.get("reason") or "permanent failure")
    variables = event.get("user-variables")
    variables = variables if isinstance(variables, dict) else {}
    notification_id = variables.get("notification_id")
    recipient = event.get("recipient")
    return [
        Bounce(
            provider="mailgun",
            notification_id=str(notification_id) if notification_id else None,
            reason=f"{event.get('reason') or 'failed'}: {detail}",
            recipient=recipient if isinstance(recipient, str) else None,
        )
    ]
