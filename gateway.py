"""Gateway (:8000): the one public entry point.

A notification's way in, top to bottom: authenticate the client → validate the body → look up
the user (preferences) and the template → store it under its idempotency key (the unique
constraint decides races) → publish to RabbitMQ with confirms → 202. A relay republishes
anything stored but never confirmed by the broker, so a broker outage loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from common import amqp, auth, db, openapi, resources, templating, unsubscribe
from common.cache import Lookups
from common.clients import ServiceClient, ServiceUnavailable
from common.config import Config, load_config
from common.http import (
    CONFIG_KEY,
    CORRELATION_HEADER,
    METRICS_KEY,
    ApiError,
    base_app,
    json_response,
    not_found,
    outgoing_headers,
    page_meta,
    paging,
    read_json,
    run,
)
from common.logs import correlation_id_var, log_context, setup_logging
from common.ratelimit import RateLimiter
from common.store import STATUSES, NewNotification, StatusStore
from common.validation import CODE_RE, Fields, parse_uuid
from providers import mailgun, sendgrid
from providers.email import Bounce

log = logging.getLogger("gateway")

DB_KEY = web.AppKey("notifications_db", db.Database)
STORE_KEY = web.AppKey("status_store", StatusStore)
BROKER_KEY = web.AppKey("broker", resources.Broker)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
USERS_KEY = web.AppKey("user_service", ServiceClient)
TEMPLATES_KEY = web.AppKey("template_service", ServiceClient)
KEY_HASHES_KEY = web.AppKey("api_key_hashes", tuple)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)
LIMITER_KEY = web.AppKey("rate_limiter", RateLimiter)
OPENAPI_KEY = web.AppKey("openapi", tuple)
LOOKUPS_KEY = web.AppKey("lookups", Lookups)
ACCEPTING_KEY = web.AppKey("accepting", set)
PRINCIPAL_KEY = web.RequestKey("principal", auth.Principal)

RELAY_INTERVAL = 1.0
RELAY_AGE = 5.0
RELAY_BATCH = 500
CONFIRM_BATCH_DELAY = 0.02
PUBLISH_TIMEOUT = 3.0
NOTIFICATION_FIELDS = {
    "notification_type",
    "user_id",
    "template_code",
    "variables",
    "request_id",
    "priority",
    "metadata",
    "language",
}


# --- authentication ------------------------------------------------------------------------


def _authenticate(request: web.Request) -> auth.Principal:
    presented = auth.presented_credential(request)
    if presented is None:
        raise auth.unauthorized()
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
# carry a key, and authenticate themselves (signature, shared secret, signed token).
_PUBLIC_PREFIXES = ("/api/v1/auth/login", "/api/v1/webhooks/", "/api/v1/unsubscribe/")


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith("/api/") or request.path.startswith(_PUBLIC_PREFIXES):
        return await handler(request)
    principal = _authenticate(request)
    request[PRINCIPAL_KEY] = principal
    verdict = await request.app[LIMITER_KEY].check(f"{principal.kind}:{principal.subject}")
    if verdict is None:
        return await handler(request)
    if not verdict.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"Rate limit of {verdict.limit} requests per {request.app[CONFIG_KEY].rate_limit_window:g}s "
            "exceeded; retry after the time in Retry-After.",
            headers=verdict.headers(),
        )
    try:
        response = await handler(request)
    except ApiError as exc:
        exc.headers = {**(exc.headers or {}), **verdict.headers()}
        raise
    response.headers.update(verdict.headers())
    return response


def _require(request: web.Request, *kinds: str) -> auth.Principal:
    principal: auth.Principal = request[PRINCIPAL_KEY]
    if principal.kind not in kinds:
        raise auth.forbidden()
    return principal


# --- accepting a notification --------------------------------------------------------------


def _validate(body: dict[str, Any]) -> dict[str, Any]:
    fields = Fields(body)
    fields.unknown(NOTIFICATION_FIELDS)
    channel = fields.string("notification_type", max_len=10)
    if channel is not None and channel not in amqp.CHANNELS:
        fields.error("notification_type", "must be email or push")
    user_id = fields.uuid("user_id")
    code = fields.string(
        "template_code", max_len=100, pattern=CODE_RE, hint="must be a template code (letters, digits, _ . -)"
    )
    request_id = fields.string("request_id", max_len=255)
    variables = fields.object("variables")
    metadata = fields.object("metadata")
    priority = fields.integer("priority", default=0, low=0, high=9)
    language = fields.language()
    fields.check()
    return {
        "notification_type": channel,
        "user_id": user_id,
        "template_code": code,
        "request_id": request_id,
        "variables": variables,
        "metadata": metadata,
        "priority": priority,
        "language": language,
    }


def _body_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _accepted_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "notification_id": row["id"],
        "request_id": row["request_id"],
        "user_id": row["user_id"],
        "notification_type": row["notification_type"],
        "template_code": row["template_code"],
        "status": "skipped" if row["status"] == "skipped" else "pending",
        "error": row["error"] if row["status"] == "skipped" else None,
        "created_at": row["created_at"],
    }


async def _lookups(request: web.Request, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user and the template version to use, asked in parallel; 404 / 422 when either does
    not fit, including a variable the template needs and the request lacks."""
    try:
        user, template = await request.app[LOOKUPS_KEY].user_and_template(
            str(payload["user_id"]), payload["template_code"], payload["language"]
        )
    except ServiceUnavailable as exc:
        raise ApiError(
            503, "service_unavailable", f"Cannot accept now: {exc}.", headers={"Retry-After": "1"}
        ) from None
    if user.status == 404:
        raise ApiError(404, "user_not_found", f"User {payload['user_id']} does not exist.")
    if template.status == 404:
        raise ApiError(404, "template_not_found", f"Template {payload['template_code']!r} does not exist.")
    if user.status != 200 or template.status != 200:
        raise ApiError(503, "service_unavailable", "User or template service refused the lookup.")
    if template.data["notification_type"] != payload["notification_type"]:
        raise ApiError(
            422,
            "template_type_mismatch",
            f"Template {payload['template_code']!r} is a {template.data['notification_type']} "
            f"template; it cannot send {payload['notification_type']}.",
            data={"fields": {"template_code": "is for another notification_type"}},
        )
    problem = templating.missing_variables(payload["notification_type"], template.data, payload["variables"])
    if problem is not None:
        raise ApiError(422, problem.code, problem.message, data={"fields": problem.fields})
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
    if (client_id, payload["request_id"]) in request.app[ACCEPTING_KEY]:
        raise ApiError(
            409,
            "request_in_progress",
            f"request_id {payload['request_id']!r} is still being accepted; retry in a moment.",
            headers={"Retry-After": "1"},
        )
    return json_response(
        _accepted_view(existing),
        "notification already accepted (idempotent replay)",
        status=202,
        headers={"Idempotent-Replayed": "true"},
    )


def _message(row: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    return {
        "notification_id": row["id"],
        "request_id": row["request_id"],
        "user_id": row["user_id"],
        "notification_type": row["notification_type"],
        "template_code": row["template_code"],
        "language": row["language"],
        "template_version": row["template_version"],
        "variables": row["variables"],
        "priority": row["priority"],
        "metadata": row["metadata"],
        "correlation_id": row["correlation_id"],
        "attempt": attempt,
        "created_at": row["created_at"],
    }


async def _publish(app: web.Application, row: dict[str, Any]) -> None:
    await amqp.publish(
        app[BROKER_KEY].exchange,
        row["notification_type"],
        _message(row),
        correlation_id=row["correlation_id"],
        priority=row["priority"],
        message_id=str(row["id"]),
        timeout=PUBLISH_TIMEOUT,
    )


async def publish_notification(app: web.Application, row: dict[str, Any]) -> bool:
    """Publish and mark confirmed. When the broker is down the row stays pending for the relay
    and the caller still gets its 202 at once: the status store is the record."""
    if not app[BROKER_KEY].ready:
        return False
    try:
        await _publish(app, row)
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the row to the relay
        log.warning("publish failed, the relay will retry: %s: %s", type(exc).__name__, exc)
        return False
    app[CONFIRMED_KEY].add(row["id"])
    return True


async def create_notification(request: web.Request) -> web.Response:
    principal = _require(request, "client")
    payload = _validate(await read_json(request))
    body_hash = _body_hash(payload)
    store = request.app[STORE_KEY]
    try:
        user, template = await _lookups(request, payload)
    except ApiError:
        # A replay of an accepted request still gets its original answer.
        if await store.by_request(principal.subject, payload["request_id"]) is not None:
            return await _replay(request, principal.subject, payload, body_hash)
        raise
    channel = payload["notification_type"]
    opted_in = bool(user.get("preferences", {}).get(channel, True))
    notification_id = uuid.uuid4()
    with log_context(notification_id=str(notification_id)):
        row = await store.create(
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
                status="pending" if opted_in else "skipped",
                error=None if opted_in else f"user opted out of {channel} notifications",
                variables=payload["variables"],
                metadata=payload["metadata"],
            )
        )
        if row is None:
            return await _replay(request, principal.subject, payload, body_hash)
        metrics = request.app[METRICS_KEY]
        if not opted_in:
            metrics.skipped.labels(channel).inc()
            log.info("notification skipped: user opted out of %s", channel)
            return json_response(_accepted_view(row), "notification skipped: user opted out", status=202)
        # A duplicate arriving while this request is between insert and publish gets 409 from
        # this process; the row is committed, so anywhere else it is already a replay.
        accepting = request.app[ACCEPTING_KEY]
        key = (principal.subject, payload["request_id"])
        accepting.add(key)
        try:
            await publish_notification(request.app, row)
        finally:
            accepting.discard(key)
        metrics.accepted.labels(channel).inc()
        log.info("notification accepted")
        return json_response(_accepted_view(row), "notification accepted", status=202)


# --- reading and retrying ------------------------------------------------------------------


def _notification_id(request: web.Request) -> uuid.UUID:
    notification_id = parse_uuid(request.match_info["notification_id"])
    if notification_id is None:
        raise not_found("Notification")
    return notification_id


def _view(row: dict[str, Any]) -> dict[str, Any]:
    view = dict(row)
    view["notification_id"] = view.pop("id")
    view.pop("publish_pending", None)
    view.pop("body_hash", None)
    return view


async def get_notification(request: web.Request) -> web.Response:
    _require(request, "client", "internal")
    store = request.app[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.get(notification_id)
    if row is None:
        raise not_found("Notification")
    view = _view(row)
    view["history"] = await store.history(notification_id)
    return json_response(view, "notification")


async def list_notifications(request: web.Request) -> web.Response:
    _require(request, "client", "internal")
    page, limit = paging(request)
    fields = Fields(dict(request.query))
    user_id = fields.uuid("user_id", required=False)
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        fields.error("status", f"must be one of {', '.join(STATUSES)}")
    fields.check()
    rows, total = await request.app[STORE_KEY].list_page(
        user_id=user_id, status=status, page=page, limit=limit
    )
    return json_response([_view(r) for r in rows], "notifications", meta=page_meta(total, limit, page))


async def retry_notification(request: web.Request) -> web.Response:
    _require(request, "client", "internal")
    store = request.app[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.requeue_failed(notification_id)
    if row is not None:
        await publish_notification(request.app, row)
        return json_response(_view(row), "notification requeued", status=202)
    current = await store.get(notification_id)
    if current is None:
        raise not_found("Notification")
    if current["status"] in ("delivered", "skipped"):
        raise ApiError(
            409, "not_retryable", f"Notification is {current['status']}; only failed ones can be retried."
        )
    # Already requeued (or still in progress): retrying again changes nothing.
    return json_response(_view(current), f"notification is already {current['status']}", status=202)


async def report_status(request: web.Request) -> web.Response:
    """Status reports from workers or external senders: internal token only."""
    _require(request, "internal")
    channel = request.match_info["channel"]
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"notification_id", "status", "timestamp", "error", "provider"})
    notification_id = fields.uuid("notification_id")
    status = fields.string("status", max_len=20)
    if status is not None and status not in STATUSES:
        fields.error("status", f"must be one of {', '.join(STATUSES)}")
    error = fields.string("error", required=False, max_len=2000)
    provider = fields.string("provider", required=False, max_len=50)
    fields.check()
    assert notification_id is not None and status is not None
    store = request.app[STORE_KEY]
    row = await store.get(notification_id)
    if row is None or row["notification_type"] != channel:
        raise not_found("Notification")
    await store.record(notification_id, status, error=error, provider=provider)
    return json_response(_view(await store.get(notification_id) or row), "status recorded")


# --- email: bounce webhooks and one-click unsubscribe ------------------------------------------


async def _turn_off(request: web.Request, user_id: uuid.UUID, channel: str) -> bool:
    """Turn a user's channel off in the user service; False when the user no longer exists.
    Idempotent, so a provider retrying its webhook or a second click changes nothing."""
    try:
        reply = await request.app[USERS_KEY].call(
            "PUT", f"/api/v1/users/{user_id}/preferences", {channel: False}
        )
    except ServiceUnavailable as exc:
        raise ApiError(
            503,
            "service_unavailable",
            f"Cannot change the preference now: {exc}.",
            headers={"Retry-After": "5"},
        ) from None
    if reply.status == 404:
        return False
    if reply.status != 200:
        raise ApiError(
            503,
            "service_unavailable",
            f"The user service did not take the change (HTTP {reply.status}); please retry.",
            headers={"Retry-After": "5"},
        )
    return True


async def _apply_bounces(request: web.Request, bounces: list[Bounce], received: int) -> web.Response:
    """Each bounce marks its notification failed with the provider's reason and, for a hard
    bounce, turns the user's email off. An event naming no notification of ours is answered
    200 all the same: a non-2xx answer only makes the provider send it again and again."""
    store = request.app[STORE_KEY]
    applied = 0
    for bounce in bounces:
        notification_id = parse_uuid(bounce.notification_id or "")
        row = await store.get(notification_id) if notification_id is not None else None
        if row is None or row["notification_type"] != "email":
            log.info("%s bounce event for no known email notification ignored", bounce.provider)
            continue
        with log_context(row["correlation_id"], str(row["id"])):
            if bounce.suppress:
                await _turn_off(request, row["user_id"], "email")
            if row["status"] != "failed":
                reason = f"bounced ({bounce.provider}): {bounce.reason}"[:2000]
                await store.record(row["id"], "failed", error=reason, provider=bounce.provider)
            request.app[METRICS_KEY].bounces.labels(bounce.provider).inc()
            log.warning(
                "%s reported a bounce: %s%s",
                bounce.provider,
                bounce.reason,
                "; email turned off for this user" if bounce.suppress else "",
            )
        applied += 1
    return json_response(
        {"received": received, "bounces": applied, "ignored": received - applied}, "webhook processed"
    )


def _webhook_refused(provider: str, configured: bool, settings: str) -> ApiError:
    if not configured:
        return ApiError(
            401, "unauthorized", f"{provider} webhooks are not configured on this gateway: set {settings}."
        )
    return ApiError(401, "unauthorized", f"The {provider} webhook's signature or secret does not verify.")


async def sendgrid_webhook(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    raw = await request.read()
    if not sendgrid.webhook_authentic(config, request.headers, request.query, raw):
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
    return await _apply_bounces(request, sendgrid.bounces(events), len(events))


async def mailgun_webhook(request: web.Request) -> web.Response:
    key = request.app[CONFIG_KEY].mailgun_webhook_signing_key
    body = await read_json(request)
    if not mailgun.webhook_authentic(key, body):
        raise _webhook_refused("Mailgun", bool(key), "MAILGUN_WEBHOOK_SIGNING_KEY")
    return await _apply_bounces(request, mailgun.bounces(body), 1)


_PAGE_HEADERS = {
    # The token in the URL is a credential for one preference: keep it out of referrers,
    # caches and search engines; the page runs no script and posts only to itself.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}


def _page(status: int, title: str, text: str, *, button: bool = False) -> web.Response:
    form = (
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
        if button
        else ""
    )
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:32rem;"
        "margin:4rem auto;padding:0 1rem;line-height:1.5}button{font-size:1rem;padding:.5rem 1.25rem}"
        f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{form}</body></html>"
    )
    return web.Response(text=body, status=status, content_type="text/html", headers=_PAGE_HEADERS)


async def unsubscribe_page(request: web.Request) -> web.Response:
    """GET only shows a page with a button: link scanners and mail previews fetch links, and
    must not unsubscribe anyone by doing so (RFC 8058). The button POSTs, like a mail client's
    one-click unsubscribe does."""
    target = unsubscribe.verify(request.app[CONFIG_KEY].unsubscribe_key, request.match_info["token"])
    if target is None:
        return _page(
            400,
            "This unsubscribe link is not valid",
            "It was altered or cut short. Use the link from the email itself.",
        )
    return _page(
        200,
        f"Unsubscribe from {target.channel} notifications?",
        f"You will no longer receive {target.channel} notifications. "
        "Nothing changes until you press the button.",
        button=True,
    )


async def unsubscribe_now(request: web.Request) -> web.Response:
    """POST: RFC 8058 one-click unsubscribe (body `List-Unsubscribe=One-Click`, not required).
    A JSON envelope, or a page when a browser submitted the button."""
    target = unsubscribe.verify(request.app[CONFIG_KEY].unsubscribe_key, request.match_info["token"])
    if target is None:
        raise ApiError(
            400, "invalid_token", "This unsubscribe link is not valid: it was altered or cut short."
        )
    if not await _turn_off(request, target.user_id, target.channel):
        raise not_found("User")
    request.app[METRICS_KEY].unsubscribes.labels(target.channel).inc()
    log.info("user %s unsubscribed from %s by link", target.user_id, target.channel)
    if "text/html" in request.headers.get("Accept", ""):
        return _page(
            200,
            "You are unsubscribed",
            f"You will no longer receive {target.channel} notifications from us.",
        )
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


# --- resources -----------------------------------------------------------------------------


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    session = app[HTTP_KEY]
    app[USERS_KEY] = ServiceClient(
        session, config.user_service_url, config.internal_api_token, "user service"
    )
    app[TEMPLATES_KEY] = ServiceClient(
        session, config.template_service_url, config.internal_api_token, "template service"
    )
    app[KEY_HASHES_KEY] = tuple(auth.key_id(k) for k in config.gateway_api_keys)
    app[LIMITER_KEY] = RateLimiter(app[REDIS_KEY], config.rate_limit, config.rate_limit_window)
    app[LOOKUPS_KEY] = Lookups(app[REDIS_KEY], app[USERS_KEY], app[TEMPLATES_KEY])
    yield


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORE_KEY] = StatusStore(app[DB_KEY])
    yield


class Confirmed:
    """Notifications the broker confirmed, marked in the store in batches: one UPDATE every few
    milliseconds instead of one per request. Marks lost in a crash only make the relay publish
    those again, which the workers' claim step makes harmless."""

    def __init__(self, store: StatusStore) -> None:
        self.store = store
        self.pending: list[uuid.UUID] = []
        self.wakeup = asyncio.Event()
        self.stopping = False

    def add(self, notification_id: uuid.UUID) -> None:
        self.pending.append(notification_id)
        self.wakeup.set()

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.wakeup.clear()
        try:
            await self.store.mark_published(batch)
        except Exception as exc:  # noqa: BLE001 - retried with the next batch
            log.warning("could not mark %d notification(s) published: %s", len(batch), exc)
            self.pending[:0] = batch

    async def run(self) -> None:
        while not self.stopping:
            await self.wakeup.wait()
            if not self.stopping:
                await asyncio.sleep(CONFIRM_BATCH_DELAY)
            await self.flush()


async def _finish(task: asyncio.Task[None], wake: Callable[[], None], timeout: float = 10.0) -> None:
    """Stop a background loop by asking it (`wake`) and waiting, not by cancelling it: a
    cancellation landing inside an aiopg query can leave the connection, and shutdown, stuck.
    Cancelled only if it does not finish in time."""
    wake()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        log.warning("%s did not stop within %gs; cancelled", task.get_name(), timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


CONFIRMED_KEY = web.AppKey("confirmed", Confirmed)


async def confirmed_ctx(app: web.Application) -> AsyncIterator[None]:
    confirmed = Confirmed(app[STORE_KEY])
    app[CONFIRMED_KEY] = confirmed
    app[ACCEPTING_KEY] = set()
    task = asyncio.create_task(confirmed.run(), name="confirmed-marks")
    try:
        yield
    finally:

        def wake() -> None:
            confirmed.stopping = True
            confirmed.wakeup.set()

        await _finish(task, wake)
        await confirmed.flush()


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """Republish notifications stored but never confirmed by the broker (outage, crash)."""
    stop = asyncio.Event()
    task = asyncio.create_task(_relay_loop(app, stop), name="outbox-relay")
    try:
        yield
    finally:
        await _finish(task, stop.set)


async def _relay_loop(app: web.Application, stop: asyncio.Event) -> None:
    store = app[STORE_KEY]
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RELAY_INTERVAL)
        if stop.is_set() or not app[BROKER_KEY].ready:
            continue
        try:
            # Rows are locked (SKIP LOCKED) so several gateways relay without publishing one
            # row twice; oldest first, so the backlog goes out in order of acceptance.
            async with store.db.transaction() as tx:
                rows = await store.unpublished(tx, RELAY_AGE, limit=RELAY_BATCH)
                # Sent in order on one channel; the confirms are awaited together.
                results = await asyncio.gather(*(_publish(app, row) for row in rows), return_exceptions=True)
                confirmed = [row["id"] for row, result in zip(rows, results, strict=True) if result is None]
                await store.mark_published(confirmed, tx)
                if rows:
                    log.info(
                        "relay published %d of %d notification(s) left unpublished", len(confirmed), len(rows)
                    )
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("relay round failed: %s: %s", type(exc).__name__, exc)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY][0], content_type="application/json")


async def openapi_page(request: web.Request) -> web.Response:
    return web.Response(text=request.app[OPENAPI_KEY][1], content_type="text/html")


def create_app(config: Config) -> web.Application:
    app = base_app("gateway", config)
    spec = openapi.load_spec()
    app[OPENAPI_KEY] = (orjson.dumps(spec), openapi.render_html(spec))
    app.middlewares.append(auth_middleware)
    app.cleanup_ctx.append(
        resources.database(DB_KEY, lambda c: c.notifications_db_url, "postgres", maxsize=20)
    )
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(resources.broker(BROKER_KEY))
    app.cleanup_ctx.append(resources.http_client(HTTP_KEY))
    app.cleanup_ctx.append(resources.redis_client(REDIS_KEY))
    app.cleanup_ctx.append(services_ctx)
    app.cleanup_ctx.append(confirmed_ctx)
    app.cleanup_ctx.append(relay_ctx)
    r = app.router
    for path in ("/api/v1/notifications", "/api/v1/notifications/"):
        r.add_post(path, create_notification)
        r.add_get(path, list_notifications)
    r.add_get("/openapi.json", openapi_json)
    r.add_get("/docs", openapi_page)
    r.add_get("/api/v1/notifications/{notification_id}", get_notification)
    r.add_post("/api/v1/notifications/{notification_id}/retry", retry_notification)
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
    return app


def main() -> None:
    config = load_config("gateway_api_keys", "internal_api_token", "jwt_secret")
    setup_logging("gateway", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8000)


if __name__ == "__main__":
    main()
