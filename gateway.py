"""Gateway (:8000): the one public entry point.

A notification's way in, top to bottom: authenticate the client → validate the body → look up
the user (preferences) and the template → decide when it goes (`common/schedule.py`: now, or
`scheduled` for `send_at`, `send_at_local` or the user's quiet hours) → store it under its
idempotency key (the unique constraint decides races) → publish it through the outbox
(`common/outbox.py`) unless it is scheduled → 202. The outbox's relay republishes anything stored
but never confirmed by the broker, so a broker outage loses nothing; the dispatcher
(`common/dispatcher.py`) releases scheduled ones when they are due. Provider webhooks and
unsubscribe links are verified here and handled in `common/bounces.py` and
`common/unsubscribe.py`; the user and template APIs are proxied. Client status webhooks (the
endpoints API, their relay and their delivery) are `common/webhooks.py` and
`common/webhook_api.py`; bulk sends, topics and their fan-out `common/bulk_api.py` and
`common/batches.py`; all wired below.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

import console
import topology
from common import (
    amqp,
    auth,
    batches,
    bounces,
    bulk_api,
    db,
    listing,
    notifications,
    openapi,
    resources,
    schedule,
    unsubscribe,
    webhook_api,
    webhooks,
)
from common.auth import PRINCIPAL_KEY, require
from common.batching import Batcher
from common.cache import CachedLookups
from common.clients import ServiceClient, ServiceUnavailable, outgoing_headers, services
from common.config import Config, load_config
from common.dispatcher import dispatcher
from common.http import (
    CONFIG_KEY,
    METRICS_KEY,
    ApiError,
    base_app,
    cursor_meta,
    json_response,
    not_found,
    paging,
    read_json,
)
from common.logs import CORRELATION_HEADER, correlation_id_var, log_context, setup_logging
from common.outbox import Outbox, outbox
from common.ratelimit import RateLimiter, Verdict
from common.runner import run
from common.store import STATUSES, NewNotification, StatusStore
from common.validation import Fields, parse_uuid
from providers import mailgun, sendgrid

log = logging.getLogger("gateway")

DB_KEY = web.AppKey("notifications_db", db.Database)
STORE_KEY = web.AppKey("status_store", StatusStore)
BROKER_KEY = web.AppKey("broker", amqp.Broker)
OUTBOX_KEY = web.AppKey("outbox", Outbox)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
USERS_KEY = web.AppKey("user_service", ServiceClient)
TEMPLATES_KEY = web.AppKey("template_service", ServiceClient)
KEY_HASHES_KEY = web.AppKey("api_key_hashes", tuple)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)
LIMITER_KEY = web.AppKey("rate_limiter", RateLimiter)
LOOKUPS_KEY = web.AppKey("lookups", CachedLookups)
ACCEPT_BATCH_KEY = web.AppKey("accept_batch", Batcher)
VERDICT_KEY = web.RequestKey("rate_limit_verdict", Verdict)

ACCEPT_BATCH_SIZE = 64
ACCEPT_BATCH_DELAY = 0.001


# --- authentication and rate limits ---------------------------------------------------------


def _resolve(request: web.Request, presented: str) -> auth.Principal:
    digest = auth.key_id(presented)
    # Compare against every key so the time taken does not say which one nearly matched.
    found = False
    for known in request.app[KEY_HASHES_KEY]:
        found |= hmac.compare_digest(known, digest)
    if found:
        return auth.Principal("client", digest[:16])
    config = request.app[CONFIG_KEY]
    if auth.matches(config.internal_api_token, presented):
        return auth.Principal("internal", "internal")
    user_id = auth.verify_access_token(config.jwt_secret, presented)
    if user_id is not None:
        return auth.Principal("user", user_id)
    raise auth.unauthorized()


# No API key here: login takes a password; provider webhooks and unsubscribe links cannot
# carry a key, and authenticate themselves (signature, shared secret, signed token). Clients'
# own webhook endpoints (/api/v1/webhooks/endpoints) do take a key.
_PUBLIC_PREFIXES = (
    "/api/v1/auth/login",
    "/api/v1/webhooks/sendgrid",
    "/api/v1/webhooks/mailgun",
    "/api/v1/unsubscribe/",
)


def _rate_limited(request: web.Request, verdict: Verdict) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        f"Rate limit of {verdict.limit} requests per {request.app[CONFIG_KEY].rate_limit_window:g}s "
        "exceeded; retry after the time in Retry-After.",
        headers=verdict.headers(),
    )


@web.middleware
async def rate_limit_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    principal = request.get(PRINCIPAL_KEY)
    if principal is None:
        return await handler(request)
    if request.match_info.handler is not create_notification:
        # The accept path counts in its own Redis round trip, with its lookups.
        verdict = await request.app[LIMITER_KEY].check(f"{principal.kind}:{principal.subject}")
        if verdict is not None:
            request[VERDICT_KEY] = verdict
            if not verdict.allowed:
                raise _rate_limited(request, verdict)
    try:
        response = await handler(request)
    except ApiError as exc:
        if (verdict := request.get(VERDICT_KEY)) is not None:
            exc.headers = {**verdict.headers(), **(exc.headers or {})}
        raise
    if (verdict := request.get(VERDICT_KEY)) is not None:
        response.headers.update(verdict.headers())
    return response


# --- accepting a notification --------------------------------------------------------------


async def _lookups(
    request: web.Request, payload: dict[str, Any], principal: auth.Principal
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user and the template version to use, with the client's rate limit counted in the same
    Redis round trip (429 when over it); 404 / 422 when either does not fit, including a
    variable the template needs and the request lacks."""
    counter = request.app[LIMITER_KEY].count(f"{principal.kind}:{principal.subject}")
    try:
        user, template, count = await request.app[LOOKUPS_KEY].user_and_template(
            str(payload["user_id"]), payload["template_code"], payload["language"], counter
        )
    except ServiceUnavailable as exc:
        raise ApiError(
            503, "service_unavailable", f"Cannot accept now: {exc}.", headers={"Retry-After": "1"}
        ) from None
    if counter is not None and count is not None:
        verdict = counter.verdict(count)
        request[VERDICT_KEY] = verdict
        if not verdict.allowed:
            raise _rate_limited(request, verdict)
    notifications.check_lookups(payload, user, template)
    return user.data, template.data


async def _replay(
    request: web.Request, client_id: str, payload: dict[str, Any], body_hash: str
) -> web.Response:
    existing = await request.app[STORE_KEY].by_request(client_id, payload["request_id"])
    if existing is None:
        raise ApiError(503, "service_unavailable", "Please retry.")  # deleted meanwhile
    if existing["body_hash"] != body_hash:
        raise ApiError(
            422,
            "idempotency_conflict",
            f"request_id {payload['request_id']!r} was already used with a different body.",
        )
    return json_response(
        notifications.accepted_view(existing),
        "notification already accepted (idempotent replay)",
        status=202,
        headers={"Idempotent-Replayed": "true"},
    )


async def create_notification(request: web.Request) -> web.Response:
    principal = require(request, "client")
    body = await read_json(request)
    if "topic" in body:  # to a topic's subscribers: a batch and its fan-out (common/bulk_api.py)
        verdict = await request.app[LIMITER_KEY].check(f"{principal.kind}:{principal.subject}")
        if verdict is not None:
            request[VERDICT_KEY] = verdict
            if not verdict.allowed:
                raise _rate_limited(request, verdict)
        return await bulk_api.notify_topic(request, principal.subject, body)
    payload, when = notifications.parse(body)
    body_hash = notifications.body_hash(payload)
    store = request.app[STORE_KEY]
    try:
        user, template = await _lookups(request, payload, principal)
    except ApiError:
        # A replay of an accepted request still gets its original answer.
        if await store.by_request(principal.subject, payload["request_id"]) is not None:
            return await _replay(request, principal.subject, payload, body_hash)
        raise
    channel = payload["notification_type"]
    opted_in = bool(user.get("preferences", {}).get(channel, True))
    later = schedule.plan(
        datetime.now(UTC),
        when,
        schedule.zone(user.get("timezone")),
        schedule.QuietHours.of(user.get("preferences", {}).get("quiet_hours")),
        urgent=payload["priority"] >= schedule.URGENT_PRIORITY,
    )
    status = "skipped" if not opted_in else "scheduled" if later.send_at else "pending"
    notification_id = uuid.uuid4()
    with log_context(notification_id=str(notification_id)):
        row = await request.app[ACCEPT_BATCH_KEY].submit(
            NewNotification(
                id=notification_id,
                client_id=principal.subject,
                request_id=payload["request_id"],
                body_hash=body_hash,
                user_id=payload["user_id"],
                notification_type=channel,
                template_code=payload["template_code"],
                # Pinned at acceptance: a later update or rollback does not change what this
                # notification renders, and its record says which version and language it used.
                language=template["language"],
                template_version=template["version"],
                priority=payload["priority"],
                correlation_id=correlation_id_var.get() or uuid.uuid4().hex,
                status=status,
                error=None if opted_in else f"user opted out of {channel} notifications",
                variables=payload["variables"],
                metadata=payload["metadata"],
                send_at=later.send_at if opted_in else None,
                detail=later.reason if opted_in else None,
            )
        )
        if row is None:
            return await _replay(request, principal.subject, payload, body_hash)
        metrics = request.app[METRICS_KEY]
        if not opted_in:
            metrics.skipped.labels(channel).inc()
            log.info("notification skipped: user opted out of %s", channel)
            return json_response(
                notifications.accepted_view(row),
                "notification skipped: user opted out",
                status=202,
            )
        if status == "scheduled":
            metrics.accepted.labels(channel).inc()
            log.info("notification scheduled: %s", later.reason)
            return json_response(notifications.accepted_view(row), "notification scheduled", status=202)
        # Committed: the outbox publishes it off this request's path, the relay if that fails.
        request.app[OUTBOX_KEY].submit(row)
        metrics.accepted.labels(channel).inc()
        log.info("notification accepted")
        return json_response(notifications.accepted_view(row), "notification accepted", status=202)


# --- reading and retrying ------------------------------------------------------------------


def _notification_id(request: web.Request) -> uuid.UUID:
    notification_id = parse_uuid(request.match_info["notification_id"])
    if notification_id is None:
        raise not_found("Notification")
    return notification_id


async def get_notification(request: web.Request) -> web.Response:
    require(request, "client", "internal")
    store = request.app[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.get(notification_id)
    if row is None:
        raise not_found("Notification")
    view = notifications.view(row)
    view["history"] = await store.history(notification_id)
    return json_response(view, "notification")


async def list_notifications(request: web.Request) -> web.Response:
    require(request, "client", "internal")
    page, limit = paging(request)
    fields = Fields(dict(request.query))
    user_id = fields.uuid("user_id", required=False)
    batch_id = fields.uuid("batch_id", required=False)
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        fields.error("status", f"must be one of {', '.join(STATUSES)}")
    fields.check()
    after = listing.decode_cursor(request.query.get("after"), "page" in request.query)
    rows, has_next = await request.app[STORE_KEY].list_page(
        user_id=user_id, status=status, page=page, limit=limit, after=after, batch_id=batch_id
    )
    cursor = listing.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if has_next else None
    meta = cursor_meta(limit, None if after else page, has_next, cursor)
    return json_response([notifications.view(r) for r in rows], "notifications", meta=meta)


async def retry_notification(request: web.Request) -> web.Response:
    require(request, "client", "internal")
    store = request.app[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.requeue_failed(notification_id)
    if row is not None:
        request.app[OUTBOX_KEY].submit(row)
        return json_response(notifications.view(row), "notification requeued", status=202)
    current = await store.get(notification_id)
    if current is None:
        raise not_found("Notification")
    if current["status"] in ("delivered", "skipped", "cancelled"):
        raise ApiError(
            409, "not_retryable", f"Notification is {current['status']}; only failed ones can be retried."
        )
    # Already requeued (or still in progress): retrying again changes nothing.
    return json_response(
        notifications.view(current), f"notification is already {current['status']}", status=202
    )


async def cancel_notification(request: web.Request) -> web.Response:
    require(request, "client", "internal")
    store = request.app[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.cancel(notification_id)
    if row is not None:
        request.app[METRICS_KEY].cancelled.labels(row["notification_type"]).inc()
        log.info("notification %s cancelled", notification_id)
        return json_response(notifications.view(row), "notification cancelled")
    current = await store.get(notification_id)
    if current is None:
        raise not_found("Notification")
    if current["status"] == "cancelled":
        return json_response(notifications.view(current), "notification already cancelled")
    raise ApiError(409, "not_cancellable", schedule.not_cancellable(current["status"]))


async def report_status(request: web.Request) -> web.Response:
    """Status reports from workers or external senders: internal token only."""
    require(request, "internal")
    channel = request.match_info["channel"]
    notification_id, status, error, provider = notifications.parse_status_report(await read_json(request))
    store = request.app[STORE_KEY]
    row = await store.get(notification_id)
    if row is None or row["notification_type"] != channel:
        raise not_found("Notification")
    await store.record(notification_id, status, error=error, provider=provider)
    return json_response(notifications.view(await store.get(notification_id) or row), "status recorded")


# --- email: bounce webhooks and one-click unsubscribe ------------------------------------------


def _webhook_refused(provider: str, configured: bool, settings: str) -> ApiError:
    if not configured:
        return ApiError(
            401, "unauthorized", f"{provider} webhooks are not configured on this gateway: set {settings}."
        )
    return ApiError(401, "unauthorized", f"The {provider} webhook's signature or secret does not verify.")


async def _bounced(request: web.Request, found: list[bounces.Bounce], received: int) -> web.Response:
    app = request.app
    applied = await bounces.apply(app[STORE_KEY], app[USERS_KEY], app[METRICS_KEY], found)
    return json_response(
        {"received": received, "bounces": applied, "ignored": received - applied}, "webhook processed"
    )


async def sendgrid_webhook(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
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
    key = request.app[CONFIG_KEY].mailgun_webhook_signing_key
    body = await read_json(request)
    if not mailgun.webhook_authentic(key, body):
        raise _webhook_refused("Mailgun", bool(key), "MAILGUN_WEBHOOK_SIGNING_KEY")
    if not mailgun.webhook_fresh(body, time.time()):
        raise ApiError(401, "unauthorized", "The Mailgun webhook's signature is older than 5 minutes.")
    try:
        first = await mailgun.first_use(request.app[REDIS_KEY], body)
    except RedisError:
        # Without the record of used tokens a replay cannot be told apart: Mailgun retries.
        raise ApiError(
            503, "service_unavailable", "Try again shortly.", headers={"Retry-After": "5"}
        ) from None
    if not first:
        raise ApiError(409, "replayed", "This Mailgun webhook's token was used before.")
    return await _bounced(request, mailgun.bounces(body), 1)


async def unsubscribe_page(request: web.Request) -> web.Response:
    """GET: a page with a button, which changes nothing (see `unsubscribe.confirm_page`)."""
    key = request.app[CONFIG_KEY].unsubscribe_key
    return unsubscribe.confirm_page(unsubscribe.verify(key, request.match_info["token"]))


async def unsubscribe_now(request: web.Request) -> web.Response:
    """POST: RFC 8058 one-click unsubscribe (body `List-Unsubscribe=One-Click`, not required).
    A JSON envelope, or a page when a browser submitted the button."""
    target = unsubscribe.verify(request.app[CONFIG_KEY].unsubscribe_key, request.match_info["token"])
    if target is None:
        raise ApiError(
            400, "invalid_token", "This unsubscribe link is not valid: it was altered or cut short."
        )
    if not await request.app[USERS_KEY].turn_off(target.user_id, target.channel):
        raise not_found("User")
    request.app[METRICS_KEY].unsubscribes.labels(target.channel).inc()
    log.info("user %s unsubscribed from %s by link", target.user_id, target.channel)
    if "text/html" in request.headers.get("Accept", ""):
        return unsubscribe.done_page(target)
    return json_response(
        {"user_id": target.user_id, "channel": target.channel, "subscribed": False},
        f"unsubscribed from {target.channel} notifications",
    )


# --- routing to the user and template services ----------------------------------------------


_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def _proxy(key: web.AppKey[ServiceClient]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        principal: auth.Principal | None = request.get(PRINCIPAL_KEY)
        target = request.app[key]
        if principal is not None and principal.kind == "user":
            if key is TEMPLATES_KEY:
                raise auth.forbidden()
            token = auth.presented_credential(request) or ""  # the service checks ownership
        else:
            token = target.token
        headers = outgoing_headers(token)
        if principal is not None:
            headers["X-Actor"] = f"{principal.kind}:{principal.subject}"  # recorded as created_by
        headers["X-Forwarded-For"] = request.remote or ""  # the user service throttles logins by it
        if request.content_type:
            headers["Content-Type"] = request.content_type
        try:
            async with target.session.request(
                request.method,
                target.base_url + request.rel_url.raw_path_qs,
                data=await request.read(),
                headers=headers,
                allow_redirects=False,
            ) as upstream:
                body = await upstream.read()
                out = {
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() not in _HOP_HEADERS and k != CORRELATION_HEADER
                }
                return web.Response(body=body, status=upstream.status, headers=out)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ApiError(
                503,
                "service_unavailable",
                f"{target.name} is unavailable: {exc}.",
                headers={"Retry-After": "1"},
            ) from None

    return handler


# --- wiring --------------------------------------------------------------------------------


async def clients_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    clients = services(config, app[HTTP_KEY])
    app[USERS_KEY], app[TEMPLATES_KEY] = clients.users, clients.templates
    app[KEY_HASHES_KEY] = tuple(auth.key_id(k) for k in config.gateway_api_keys)
    app[LIMITER_KEY] = RateLimiter(app[REDIS_KEY], config.rate_limit, config.rate_limit_window)
    app[LOOKUPS_KEY] = CachedLookups(app[REDIS_KEY], clients.users, clients.templates)
    yield


async def accept_batch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Group commit: the accepts of concurrent requests go into one INSERT."""
    batcher = Batcher(app[STORE_KEY].create_many, size=ACCEPT_BATCH_SIZE, delay=ACCEPT_BATCH_DELAY)
    app[ACCEPT_BATCH_KEY] = batcher
    try:
        yield
    finally:
        await batcher.close()


def create_app(config: Config) -> web.Application:
    app = base_app("gateway", config)
    app.middlewares.append(auth.middleware(_resolve, _PUBLIC_PREFIXES))
    app.middlewares.append(rate_limit_middleware)
    app.cleanup_ctx.append(
        resources.database(DB_KEY, lambda c: c.notifications_db_url, "postgres", maxsize=20)
    )
    app.cleanup_ctx.append(resources.status_store(DB_KEY, STORE_KEY))
    app.cleanup_ctx.append(amqp.broker(BROKER_KEY, topology.declare))
    app.cleanup_ctx.append(resources.http_client(HTTP_KEY))
    app.cleanup_ctx.append(resources.redis_client(REDIS_KEY))
    app.cleanup_ctx.append(clients_ctx)
    app.cleanup_ctx.append(accept_batch_ctx)
    app.cleanup_ctx.append(outbox(OUTBOX_KEY, STORE_KEY, BROKER_KEY))
    app.cleanup_ctx.append(dispatcher(STORE_KEY, OUTBOX_KEY, LOOKUPS_KEY))
    app.cleanup_ctx.append(webhooks.webhooks(DB_KEY, BROKER_KEY))
    app.cleanup_ctx.append(
        batches.fanout(DB_KEY, STORE_KEY, OUTBOX_KEY, BROKER_KEY, REDIS_KEY, lambda a: a[USERS_KEY])
    )
    webhook_api.add_routes(app)
    bulk_api.add_routes(app, bulk_api.Wiring(STORE_KEY, OUTBOX_KEY, REDIS_KEY, USERS_KEY, LOOKUPS_KEY))
    openapi.add_routes(app)
    r = app.router
    for path in ("/api/v1/notifications", "/api/v1/notifications/"):
        r.add_post(path, create_notification)
        r.add_get(path, list_notifications)
    r.add_get("/api/v1/notifications/{notification_id}", get_notification)
    r.add_post("/api/v1/notifications/{notification_id}/retry", retry_notification)
    r.add_post("/api/v1/notifications/{notification_id}/cancel", cancel_notification)
    r.add_post("/api/v1/{channel:email|push}/status/", report_status)
    r.add_post("/api/v1/{channel:email|push}/status", report_status)
    r.add_post("/api/v1/webhooks/sendgrid", sendgrid_webhook)
    r.add_post("/api/v1/webhooks/mailgun", mailgun_webhook)
    r.add_get("/api/v1/unsubscribe/{token}", unsubscribe_page)
    r.add_post("/api/v1/unsubscribe/{token}", unsubscribe_now)
    users = _proxy(USERS_KEY)
    templates = _proxy(TEMPLATES_KEY)
    r.add_route("*", "/api/v1/users{tail:(/.*)?}", users)
    r.add_post("/api/v1/auth/login", users)
    r.add_route("*", "/api/v1/templates{tail:(/.*)?}", templates)
    app.add_subapp(
        "/console",
        console.create_app(
            console.Wiring(
                store=STORE_KEY,
                outbox=OUTBOX_KEY,
                broker=BROKER_KEY,
                users=USERS_KEY,
                templates=TEMPLATES_KEY,
                redis=REDIS_KEY,
                key_hashes=KEY_HASHES_KEY,
            )
        ),
    )
    return app


def main() -> None:
    config = load_config("gateway_api_keys", "internal_api_token", "jwt_secret")
    setup_logging("gateway", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8000)


if __name__ == "__main__":
    main()
