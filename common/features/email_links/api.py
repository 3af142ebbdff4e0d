"""Email's own ways back in, each authenticating itself instead of with a key: the providers'
bounce webhooks (SendGrid's signed events, Mailgun's signed and single-use ones), handled in
`bounces.py`, and RFC 8058 one-click unsubscribe links (`unsubscribe.py`)."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from common.delivery.interface import Bounce
from common.features.email_links import bounces, unsubscribe
from common.keys import CONFIG_KEY, METRICS_KEY, REDIS_KEY, STORE_KEY, USERS_KEY
from common.logs import project_var
from common.web.http import ApiError, json_response, not_found, read_json
from providers import mailgun, sendgrid

log = logging.getLogger("gateway")

# No API key on these: they are among the gateway's public routes.
PUBLIC_PREFIXES = ("/api/v1/webhooks/sendgrid", "/api/v1/webhooks/mailgun", "/api/v1/unsubscribe/")


def _webhook_refused(provider: str, configured: bool, settings: str) -> ApiError:
    if not configured:
        return ApiError(
            401, "unauthorized", f"{provider} webhooks are not configured on this gateway: set {settings}."
        )
    return ApiError(401, "unauthorized", f"The {provider} webhook's signature or secret does not verify.")


async def _bounced(request: web.Request, found: list[Bounce], received: int) -> web.Response:
    c = request.config_dict
    applied = await bounces.apply(c[STORE_KEY], c[USERS_KEY], c[METRICS_KEY], found)
    return json_response(
        {"received": received, "bounces": applied, "ignored": received - applied}, "webhook processed"
    )


async def sendgrid_webhook(request: web.Request) -> web.Response:
    config = request.config_dict[CONFIG_KEY]
    raw = await request.read()
    if not sendgrid.webhook_authentic(config, request.headers, request.query, raw, time.time()):
        configured = bool(config.sendgrid_webhook_public_key or config.sendgrid_webhook_secret)
        raise _webhook_refused(
            "SendGrid", configured, "SENDGRID_WEBHOOK_PUBLIC_KEY or SENDGRID_WEBHOOK_SECRET"
        )
    try:
        events = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(events, list):
        raise ApiError(400, "invalid_json", "A SendGrid event webhook body is a JSON array of events.")
    return await _bounced(request, sendgrid.bounces(events), len(events))


async def mailgun_webhook(request: web.Request) -> web.Response:
    key = request.config_dict[CONFIG_KEY].mailgun_webhook_signing_key
    body = await read_json(request)
    if not mailgun.webhook_authentic(key, body):
        raise _webhook_refused("Mailgun", bool(key), "MAILGUN_WEBHOOK_SIGNING_KEY")
    if not mailgun.webhook_fresh(body, time.time()):
        raise ApiError(401, "unauthorized", "The Mailgun webhook's signature is older than 5 minutes.")
    redis = request.config_dict[REDIS_KEY]
    try:
        held = await mailgun.claim(redis, body, time.time())
    except RedisError:
        # Without the record of used tokens a replay cannot be told apart: Mailgun retries.
        raise ApiError(
            503, "service_unavailable", "Try again shortly.", headers={"Retry-After": "5"}
        ) from None
    except mailgun.TokenInProgress:
        raise ApiError(
            503,
            "webhook_in_progress",
            "Another copy of this Mailgun webhook is being handled; try again shortly.",
            headers={"Retry-After": "5"},
        ) from None
    except mailgun.TokensForgotten:
        raise ApiError(
            503,
            "replay_record_lost",
            "This Mailgun webhook was signed before the record of used tokens restarted, so it "
            "cannot be told apart from a replay; a copy signed since is accepted.",
            headers={"Retry-After": "60"},
        ) from None
    except mailgun.TokenUsed:
        raise ApiError(409, "replayed", "This Mailgun webhook's token was used before.") from None
    try:
        # Within the claim's lifetime: it cannot expire while this copy still works on it.
        async with asyncio.timeout(mailgun.HANDLING_DEADLINE):
            response = await _bounced(request, mailgun.bounces(body), 1)
    except BaseException:
        # Not handled (a 503 for our own infrastructure, or anything else): Mailgun's retry of
        # this same webhook must be handled, not refused as a replay.
        try:
            await asyncio.shield(held.release(redis))
        except (RedisError, asyncio.CancelledError):
            log.warning("a Mailgun webhook's token claim was not released; it expires on its own")
        raise
    try:
        await held.used(redis)
    except RedisError:
        # Recorded all the same; until the claim expires a replay is refused, and after it a
        # replay only repeats what was done (applying a bounce is idempotent).
        log.warning("a Mailgun webhook's token was not marked used: Redis did not answer")
    return response


async def unsubscribe_page(request: web.Request) -> web.Response:
    """GET: a page with a button, which changes nothing (see `unsubscribe.confirm_page`)."""
    key = request.config_dict[CONFIG_KEY].unsubscribe_key
    return unsubscribe.confirm_page(unsubscribe.verify(key, request.match_info["token"]))


async def unsubscribe_now(request: web.Request) -> web.Response:
    """POST: RFC 8058 one-click unsubscribe (body `List-Unsubscribe=One-Click`, not required).
    A JSON envelope, or a page when a browser submitted the button."""
    target = unsubscribe.verify(request.config_dict[CONFIG_KEY].unsubscribe_key, request.match_info["token"])
    if target is None:
        raise ApiError(
            400, "invalid_token", "This unsubscribe link is not valid: it was altered or cut short."
        )
    token = project_var.set(target.project)  # the link's project: its user is that project's
    try:
        found = await request.config_dict[USERS_KEY].turn_off(target.user_id, target.channel, target.category)
    finally:
        project_var.reset(token)
    if not found:
        raise not_found("User")
    request.config_dict[METRICS_KEY].unsubscribes.labels(target.channel).inc()
    log.info("user %s unsubscribed from %s by link", target.user_id, target.what)
    if "text/html" in request.headers.get("Accept", ""):
        return unsubscribe.done_page(target)
    return json_response(
        {
            "user_id": target.user_id,
            "channel": target.channel,
            "category": target.category,
            "subscribed": False,
        },
        f"unsubscribed from {target.what}",
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/webhooks/sendgrid", sendgrid_webhook)
    r.add_post("/api/v1/webhooks/mailgun", mailgun_webhook)
    r.add_get("/api/v1/unsubscribe/{token}", unsubscribe_page)
    r.add_post("/api/v1/unsubscribe/{token}", unsubscribe_now)
