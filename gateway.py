"""Gateway (:8000): the one public entry point.

A notification's way in, top to bottom: authenticate the client → validate the body → look up
the user (preferences) and the template → store it under its idempotency key (the unique
constraint decides races) → publish to RabbitMQ with confirms → 202. A relay republishes
anything stored but never confirmed by the broker, so a broker outage loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from common import amqp, auth, db, resources, templating
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
from common.store import STATUSES, NewNotification, StatusStore
from common.validation import CODE_RE, LANGUAGE_RE, Fields, normalize_language, parse_uuid

log = logging.getLogger("gateway")

DB_KEY = web.AppKey("notifications_db", db.Database)
STORE_KEY = web.AppKey("status_store", StatusStore)
BROKER_KEY = web.AppKey("broker", resources.Broker)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
USERS_KEY = web.AppKey("user_service", ServiceClient)
TEMPLATES_KEY = web.AppKey("template_service", ServiceClient)
KEY_HASHES_KEY = web.AppKey("api_key_hashes", tuple)
PRINCIPAL_KEY = web.RequestKey("principal", auth.Principal)

# A duplicate arriving while the first request is still between insert and publish gets 409;
# after this long the first is taken as accepted (the relay owns publishing it by then).
ACCEPTING_WINDOW = 10.0
RELAY_INTERVAL = 1.0
RELAY_AGE = 5.0
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


_PUBLIC_PREFIXES = ("/api/v1/auth/login",)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/api/") and not request.path.startswith(_PUBLIC_PREFIXES):
        request[PRINCIPAL_KEY] = _authenticate(request)
    return await handler(request)


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
    language = fields.string(
        "language",
        required=False,
        max_len=35,
        pattern=LANGUAGE_RE,
        hint="must be a language tag like en or pt-BR",
    )
    fields.check()
    return {
        "notification_type": channel,
        "user_id": user_id,
        "template_code": code,
        "request_id": request_id,
        "variables": variables,
        "metadata": metadata,
        "priority": priority,
        "language": normalize_language(language) if language else None,
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
        user, template = await asyncio.gather(
            request.app[USERS_KEY].get_user(str(payload["user_id"])),
            request.app[TEMPLATES_KEY].get_template(payload["template_code"], payload["language"]),
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
    age = (await _db_now(request) - existing["created_at"]).total_seconds()
    if existing["publish_pending"] and existing["status"] == "pending" and age < ACCEPTING_WINDOW:
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


async def _db_now(request: web.Request) -> Any:
    return await request.app[STORE_KEY].db.fetchval("SELECT now()")


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


async def publish_notification(app: web.Application, row: dict[str, Any]) -> bool:
    """Publish and mark confirmed; False (logged) when the broker is unreachable."""
    try:
        await amqp.publish(
            app[BROKER_KEY].exchange,
            row["notification_type"],
            _message(row),
            correlation_id=row["correlation_id"],
            priority=row["priority"],
            message_id=str(row["id"]),
            timeout=5,
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the row to the relay
        log.warning(
            "publish failed, the relay will retry: %s: %s",
            type(exc).__name__,
            exc,
            extra={"notification_id": str(row["id"])},
        )
        return False
    await app[STORE_KEY].mark_published(row["id"])
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
        await publish_notification(request.app, row)
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
                target.base_url + request.rel_url.path_qs,
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
    yield


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORE_KEY] = StatusStore(app[DB_KEY])
    yield


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """Republish notifications stored but never confirmed by the broker (outage, crash)."""
    task = asyncio.create_task(_relay_loop(app), name="outbox-relay")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _relay_loop(app: web.Application) -> None:
    store = app[STORE_KEY]
    while True:
        await asyncio.sleep(RELAY_INTERVAL)
        try:
            async with store.db.transaction() as tx:
                rows = await store.unpublished(tx, RELAY_AGE, limit=200)
                for row in rows:
                    with log_context(row["correlation_id"], str(row["id"])):
                        await amqp.publish(
                            app[BROKER_KEY].exchange,
                            row["notification_type"],
                            _message(row),
                            correlation_id=row["correlation_id"],
                            priority=row["priority"],
                            message_id=str(row["id"]),
                            timeout=5,
                        )
                        await store.mark_published(row["id"], tx)
                        log.info("relay published a notification left unpublished")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("relay round failed: %s: %s", type(exc).__name__, exc)


def create_app(config: Config) -> web.Application:
    app = base_app("gateway", config)
    app.middlewares.append(auth_middleware)
    app.cleanup_ctx.append(
        resources.database(DB_KEY, lambda c: c.notifications_db_url, "postgres", maxsize=20)
    )
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(resources.broker(BROKER_KEY))
    app.cleanup_ctx.append(resources.http_client(HTTP_KEY))
    app.cleanup_ctx.append(services_ctx)
    app.cleanup_ctx.append(relay_ctx)
    r = app.router
    for path in ("/api/v1/notifications", "/api/v1/notifications/"):
        r.add_post(path, create_notification)
        r.add_get(path, list_notifications)
    r.add_get("/api/v1/notifications/{notification_id}", get_notification)
    r.add_post("/api/v1/notifications/{notification_id}/retry", retry_notification)
    r.add_post("/api/v1/{channel:email|push}/status/", report_status)
    r.add_post("/api/v1/{channel:email|push}/status", report_status)
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
