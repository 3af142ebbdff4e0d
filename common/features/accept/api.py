"""One notification, as the client API speaks of it: accept it (`POST /api/v1/notifications/`
without `topic`), read, list, retry and cancel it, and the status reports of outside senders.

A notification's way in, top to bottom: the client authenticated (`common/web/auth.py`) → the
body parsed (`common/sending/parsing.py`) → the user (preferences) and the template version
looked up through the caches, the client's rate limit counted in the same Redis round trip →
the acceptance decision (`common/sending/decision.py`: skipped, scheduled or pending) → stored
under its idempotency key by the group commit (the unique constraint decides races) → handed to
the outbox (`common/broker/outbox.py`) unless it is scheduled or skipped → 202. The outbox's
relay republishes anything stored but never confirmed by the broker; the dispatcher
(`dispatcher.py`) releases scheduled ones when they are due.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web

from common.keys import (
    ACCEPT_BATCH_KEY,
    LIMITER_KEY,
    LOOKUPS_KEY,
    METRICS_KEY,
    OUTBOX_KEY,
    STORE_KEY,
    VERDICT_KEY,
)
from common.logs import log_context
from common.lookups.clients import ServiceUnavailable
from common.sending import parsing, schedule
from common.sending.decision import Send, accept
from common.vocabulary import CHANNEL_PATTERN, ENDED_OTHERWISE, STATUSES
from common.web import auth, cursors
from common.web.auth import require
from common.web.http import ApiError, cursor_meta, json_response, not_found, paging, read_json
from common.web.ratelimit import rate_limited
from common.web.validation import Fields, parse_uuid

log = logging.getLogger("gateway")


# --- accepting -------------------------------------------------------------------------------


async def _lookups(
    request: web.Request, payload: dict[str, Any], principal: auth.Principal
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user and the template version to use, with the client's rate limit counted in the same
    Redis round trip (429 when over it); 404 / 422 when either does not fit, including a
    variable the template needs and the request lacks."""
    counter = request.config_dict[LIMITER_KEY].count(f"{principal.kind}:{principal.subject}")
    try:
        user, template, count = await request.config_dict[LOOKUPS_KEY].user_and_template(
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
            raise rate_limited(request, verdict)
    parsing.check_lookups(payload, user, template)
    return user.data, template.data


async def _replay(
    request: web.Request, client_id: str, payload: dict[str, Any], body_hash: str
) -> web.Response:
    existing = await request.config_dict[STORE_KEY].by_request(client_id, payload["request_id"])
    if existing is None:
        raise ApiError(503, "service_unavailable", "Please retry.")  # deleted meanwhile
    if existing["body_hash"] != body_hash:
        raise ApiError(
            422,
            "idempotency_conflict",
            f"request_id {payload['request_id']!r} was already used with a different body.",
        )
    return json_response(
        parsing.accepted_view(existing),
        "notification already accepted (idempotent replay)",
        status=202,
        headers={"Idempotent-Replayed": "true"},
    )


_ANSWERS = {
    "skipped": "notification skipped: user opted out",
    "scheduled": "notification scheduled",
    "pending": "notification accepted",
}


async def create_notification(
    request: web.Request, principal: auth.Principal, body: dict[str, Any]
) -> web.Response:
    """One notification to one user (the gateway hands over the parsed body; it counts the
    client's rate limit here, with the lookups)."""
    payload, when = parsing.parse(body)
    body_hash = parsing.body_hash(payload)
    store = request.config_dict[STORE_KEY]
    try:
        user, template = await _lookups(request, payload, principal)
    except ApiError:
        # A replay of an accepted request still gets its original answer.
        if await store.by_request(principal.subject, payload["request_id"]) is not None:
            return await _replay(request, principal.subject, payload, body_hash)
        raise
    send = Send.of(principal.subject, payload, body_hash, when, template)
    new = accept(send, payload["user_id"], user, notification_id=uuid.uuid4())
    channel = new.notification_type
    with log_context(notification_id=str(new.id)):
        row = await request.config_dict[ACCEPT_BATCH_KEY].submit(new)
        if row is None:
            return await _replay(request, principal.subject, payload, body_hash)
        metrics = request.config_dict[METRICS_KEY]
        if new.status == "skipped":
            metrics.skipped.labels(channel).inc()
            log.info("notification skipped: user opted out of %s", channel)
        else:
            metrics.accepted.labels(channel).inc()
            log.info("notification %s", "scheduled: " + (new.detail or "") if new.send_at else "accepted")
        if new.status == "pending":
            # Committed: the outbox publishes it off this request's path, the relay if that fails.
            request.config_dict[OUTBOX_KEY].submit(row)
        return json_response(parsing.accepted_view(row), _ANSWERS[new.status], status=202)


# --- reading, retrying, cancelling -----------------------------------------------------------


def _notification_id(request: web.Request) -> uuid.UUID:
    notification_id = parse_uuid(request.match_info["notification_id"])
    if notification_id is None:
        raise not_found("Notification")
    return notification_id


async def get_notification(request: web.Request) -> web.Response:
    project = require(request, "client", "internal").project
    store = request.config_dict[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.get(notification_id, project)
    if row is None:
        raise not_found("Notification")
    view = parsing.view(row)
    if row["notification_type"] == "in_app":
        engagement = await store.engagement(notification_id)
        view["seen_at"] = engagement["seen_at"] if engagement else None
        view["read_at"] = engagement["read_at"] if engagement else None
    view["history"] = await store.history(notification_id)
    return json_response(view, "notification")


async def list_notifications(request: web.Request) -> web.Response:
    project = require(request, "client", "internal").project
    page, limit = paging(request)
    fields = Fields(dict(request.query))
    user_id = fields.user_id("user_id", required=False)
    batch_id = fields.uuid("batch_id", required=False)
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        fields.error("status", f"must be one of {', '.join(STATUSES)}")
    fields.check()
    after = cursors.decode_cursor(request.query.get("after"), "page" in request.query)
    rows, has_next = await request.config_dict[STORE_KEY].list_page(
        project=project,
        user_id=user_id,
        status=status,
        page=page,
        limit=limit,
        after=after,
        batch_id=batch_id,
    )
    cursor = cursors.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if has_next else None
    meta = cursor_meta(limit, None if after else page, has_next, cursor)
    return json_response([parsing.view(r) for r in rows], "notifications", meta=meta)


async def retry_notification(request: web.Request) -> web.Response:
    project = require(request, "client", "internal").project
    store = request.config_dict[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.requeue_failed(notification_id, project)
    if row is not None:
        request.config_dict[OUTBOX_KEY].submit(row)
        return json_response(parsing.view(row), "notification requeued", status=202)
    current = await store.get(notification_id, project)
    if current is None:
        raise not_found("Notification")
    if current["status"] in ENDED_OTHERWISE:
        raise ApiError(
            409, "not_retryable", f"Notification is {current['status']}; only failed ones can be retried."
        )
    # Already requeued (or still in progress): retrying again changes nothing.
    return json_response(parsing.view(current), f"notification is already {current['status']}", status=202)


async def cancel_notification(request: web.Request) -> web.Response:
    project = require(request, "client", "internal").project
    store = request.config_dict[STORE_KEY]
    notification_id = _notification_id(request)
    row = await store.cancel(notification_id, project)
    if row is not None:
        request.config_dict[METRICS_KEY].cancelled.labels(row["notification_type"]).inc()
        log.info("notification %s cancelled", notification_id)
        return json_response(parsing.view(row), "notification cancelled")
    current = await store.get(notification_id, project)
    if current is None:
        raise not_found("Notification")
    if current["status"] == "cancelled":
        return json_response(parsing.view(current), "notification already cancelled")
    raise ApiError(409, "not_cancellable", schedule.not_cancellable(current["status"]))


async def report_status(request: web.Request) -> web.Response:
    """Status reports from workers or external senders: internal token only."""
    project = require(request, "internal").project
    channel = request.match_info["channel"]
    notification_id, status, error, provider = parsing.parse_status_report(await read_json(request))
    store = request.config_dict[STORE_KEY]
    row = await store.get(notification_id, project)
    if row is None or row["notification_type"] != channel:
        raise not_found("Notification")
    await store.record(notification_id, status, error=error, provider=provider)
    return json_response(parsing.view(await store.get(notification_id) or row), "status recorded")


def add_routes(app: web.Application) -> None:
    """Every route but `POST /api/v1/notifications/`, which the gateway shares with topics."""
    r = app.router
    for path in ("/api/v1/notifications", "/api/v1/notifications/"):
        r.add_get(path, list_notifications)
    r.add_get("/api/v1/notifications/{notification_id}", get_notification)
    r.add_post("/api/v1/notifications/{notification_id}/retry", retry_notification)
    r.add_post("/api/v1/notifications/{notification_id}/cancel", cancel_notification)
    r.add_post(f"/api/v1/{{channel:{CHANNEL_PATTERN}}}/status/", report_status)
    r.add_post(f"/api/v1/{{channel:{CHANNEL_PATTERN}}}/status", report_status)
