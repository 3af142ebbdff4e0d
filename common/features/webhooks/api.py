"""The client webhook API under /api/v1/webhooks/endpoints (registered by the gateway).

Only a client API key may call it, and every endpoint belongs to the key that created it: another
key's endpoint, its deliveries and its events are "not found". The signing secret is shown twice
only: when the endpoint is created and when it is rotated.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from common.delivery.egress import UnsafeEndpoint, allow_list, check_endpoint
from common.features.webhooks.signing import webhook_id
from common.features.webhooks.store import SECRET_OVERLAP_HOURS, endpoint_view
from common.keys import CONFIG_KEY, WEBHOOKS_KEY
from common.vocabulary import EVENT_TYPES
from common.web.auth import require
from common.web.http import (
    ApiError,
    json_response,
    not_found,
    page_meta,
    paging,
    read_json,
    strict_int,
)
from common.web.validation import Fields, parse_uuid

ENDPOINT_FIELDS = frozenset({"url", "events", "description"})
MAX_URL = 2000
MAX_DELIVERIES_PAGE = 100
# Every final status queues one delivery per endpoint in the statement that records it, for all
# tenants together: the cap keeps one key's endpoints from making everyone's writes heavier.
MAX_WEBHOOK_ENDPOINTS = 20


def _endpoint_id(
    request: web.Request, name: str = "endpoint_id", what: str = "Webhook endpoint"
) -> uuid.UUID:
    value = parse_uuid(request.match_info[name])
    if value is None:
        raise not_found(what)
    return value


def _validate(request: web.Request, body: dict[str, Any]) -> tuple[str, list[str], str | None]:
    fields = Fields(body)
    fields.unknown(ENDPOINT_FIELDS)
    url = fields.string("url", max_len=MAX_URL)
    if url is not None:
        try:
            check_endpoint(url, allow_list(request.app[CONFIG_KEY].webhook_allowed_hosts))
        except UnsafeEndpoint as exc:
            fields.error("url", f"must be an https URL of a public host ({exc})")
    events = body.get("events")
    if events is None:
        fields.error("events", "is required")
    elif (
        not isinstance(events, list)
        or not events
        or any(not isinstance(e, str) or e not in EVENT_TYPES for e in events)
    ):
        fields.error("events", f"must be a non-empty list of: {', '.join(EVENT_TYPES)}")
    description = fields.string("description", required=False, max_len=500)
    fields.check()
    assert url is not None and isinstance(events, list)
    return url, sorted(set(events), key=EVENT_TYPES.index), description


def _delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "delivery_id": row["id"],
        "endpoint_id": row["endpoint_id"],
        "webhook_id": webhook_id(row["event_id"]),
        "event_type": row["event_type"],
        "notification_id": row["notification_id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "payload": row["payload"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "delivered_at": row["delivered_at"],
        "history": row["history"],
    }


async def create_endpoint(request: web.Request) -> web.Response:
    principal = require(request, "client")
    url, events, description = _validate(request, await read_json(request))
    row = await request.app[WEBHOOKS_KEY].create_endpoint(
        principal.subject, url, events, description, MAX_WEBHOOK_ENDPOINTS
    )
    if row is None:
        raise ApiError(
            409,
            "too_many_webhook_endpoints",
            f"an API key has at most {MAX_WEBHOOK_ENDPOINTS} webhook endpoints: delete one first",
        )
    return json_response(
        endpoint_view(row), "webhook endpoint created: keep the secret, it is not shown again", status=201
    )


async def list_endpoints(request: web.Request) -> web.Response:
    principal = require(request, "client")
    page, limit = paging(request)
    rows, total = await request.app[WEBHOOKS_KEY].endpoints(principal.subject, page, limit)
    return json_response(
        [endpoint_view(r) for r in rows], "webhook endpoints", meta=page_meta(total, limit, page)
    )


async def get_endpoint(request: web.Request) -> web.Response:
    principal = require(request, "client")
    row = await request.app[WEBHOOKS_KEY].endpoint(principal.subject, _endpoint_id(request))
    if row is None:
        raise not_found("Webhook endpoint")
    return json_response(endpoint_view(row), "webhook endpoint")


async def delete_endpoint(request: web.Request) -> web.Response:
    principal = require(request, "client")
    endpoint_id = _endpoint_id(request)
    if not await request.app[WEBHOOKS_KEY].delete_endpoint(principal.subject, endpoint_id):
        raise not_found("Webhook endpoint")
    return json_response({"id": endpoint_id}, "webhook endpoint deleted")


async def rotate_secret(request: web.Request) -> web.Response:
    principal = require(request, "client")
    row = await request.app[WEBHOOKS_KEY].rotate_secret(principal.subject, _endpoint_id(request))
    if row is None:
        raise not_found("Webhook endpoint")
    return json_response(
        endpoint_view(row),
        f"secret rotated: the previous one keeps signing alongside it for {SECRET_OVERLAP_HOURS} h",
    )


def _cursor(request: web.Request) -> tuple[int | None, int]:
    fields = Fields(dict(request.query))
    raw = request.query.get("after")
    after: int | None = None
    if raw is not None:
        after = strict_int(raw, 0, 10**18 - 1)
        if after is None:
            fields.error("after", "must be a cursor from meta.next")
    limit = 20
    raw_limit = request.query.get("limit")
    if raw_limit is not None:
        chosen = strict_int(raw_limit, 1, MAX_DELIVERIES_PAGE)
        if chosen is None:
            fields.error("limit", f"must be between 1 and {MAX_DELIVERIES_PAGE}")
        else:
            limit = chosen
    fields.check()
    return after, limit


async def list_deliveries(request: web.Request) -> web.Response:
    principal = require(request, "client")
    store = request.app[WEBHOOKS_KEY]
    endpoint_id = _endpoint_id(request)
    after, limit = _cursor(request)
    if await store.endpoint(principal.subject, endpoint_id) is None:
        raise not_found("Webhook endpoint")
    rows = await store.deliveries(principal.subject, endpoint_id, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    meta = {"limit": limit, "next": str(rows[-1]["seq"]) if more else None, "has_next": more}
    return json_response([_delivery_view(r) for r in rows], "webhook deliveries, newest first", meta=meta)


async def replay_delivery(request: web.Request) -> web.Response:
    principal = require(request, "client")
    store = request.app[WEBHOOKS_KEY]
    endpoint_id = _endpoint_id(request)
    delivery_id = _endpoint_id(request, "delivery_id", "Webhook delivery")
    row = await store.replay(principal.subject, endpoint_id, delivery_id)
    if row is not None:
        return json_response(_delivery_view(row), "webhook delivery queued again", status=202)
    current = await store.delivery(principal.subject, endpoint_id, delivery_id)
    if current is None:
        raise not_found("Webhook delivery")
    endpoint = await store.endpoint(principal.subject, endpoint_id)
    if endpoint is not None and endpoint["disabled_at"] is not None:
        raise ApiError(
            409,
            "endpoint_disabled",
            f"The endpoint is disabled ({endpoint['disabled_reason']}); create a new one to receive events.",
        )
    raise ApiError(
        409,
        "delivery_in_progress",
        f"The delivery is {current['status']}; only a delivered or failed one can be replayed.",
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    base = "/api/v1/webhooks/endpoints"
    for path in (base, base + "/"):
        r.add_post(path, create_endpoint)
        r.add_get(path, list_endpoints)
    r.add_get(base + "/{endpoint_id}", get_endpoint)
    r.add_delete(base + "/{endpoint_id}", delete_endpoint)
    r.add_post(base + "/{endpoint_id}/rotate-secret", rotate_secret)
    r.add_get(base + "/{endpoint_id}/deliveries", list_deliveries)
    r.add_post(base + "/{endpoint_id}/deliveries/{delivery_id}/replay", replay_delivery)
