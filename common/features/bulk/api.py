"""One request, many recipients, as the client API speaks of it: `POST /api/v1/notifications/bulk`,
a notification to a topic (`POST /api/v1/notifications/` with `topic`, handed here by the
gateway), `/api/v1/topics/…` and `GET /api/v1/batches/{batch_id}`. Client API key only; topics
and batches are owned by the key that made them. Registered by the gateway; resources are read
through `request.config_dict`; the fan-out itself is `fanout.py`."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web

from common.features.bulk.fanout import recipient
from common.keys import (
    BATCHES_KEY,
    FANOUT_KEY,
    LOOKUPS_KEY,
    METRICS_KEY,
    OUTBOX_KEY,
    REDIS_KEY,
    STORE_KEY,
    USERS_KEY,
)
from common.lookups.cache import profiles
from common.lookups.clients import ServiceUnavailable
from common.rendering import templating
from common.sending import parsing
from common.sending.decision import Send
from common.sending.parsing import MAX_RECIPIENTS
from common.web import admission
from common.web.auth import require
from common.web.http import ApiError, cursor_meta, json_response, not_found, paging, read_json
from common.web.validation import CODE_RE, USER_ID_HINT, USER_ID_RE, Fields, parse_uuid

log = logging.getLogger(__name__)

# Topics per project, and subscribers per topic: one more is a 409 naming the limit. Counted under
# an advisory lock (`BatchStore.put_topic`, `subscribe`), so concurrent requests cannot pass them.
MAX_TOPICS_PER_PROJECT = 1000
MAX_TOPIC_SUBSCRIBERS = 100_000
# The unknown user ids a 422 names (it says how many there were in all).
UNKNOWN_LISTED = 20


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, "service_unavailable", f"Cannot accept now: {exc}.", headers={"Retry-After": "1"})


async def _template(request: web.Request, payload: dict[str, Any]) -> dict[str, Any]:
    lookups = request.config_dict[LOOKUPS_KEY]
    try:
        reply = await lookups.templates.get_template(payload["template_code"], payload["language"])
    except ServiceUnavailable as exc:
        raise _unavailable(exc) from None
    parsing.check_template(payload, reply)
    return dict(reply.data)


def _conflict(request_id: str) -> ApiError:
    return ApiError(
        422, "idempotency_conflict", f"request_id {request_id!r} was already used with a different body."
    )


# --- bulk ------------------------------------------------------------------------------------


@admission.bounded
async def bulk(request: web.Request) -> web.Response:
    principal = require(request, "client")
    body = await read_json(request)
    if isinstance(body.get("recipients"), list) and len(body["recipients"]) > MAX_RECIPIENTS:
        raise parsing.too_many(len(body["recipients"]), "recipients")
    payload, when = parsing.parse(body, "recipients")
    body_hash = parsing.body_hash(payload)
    batches = request.config_dict[BATCHES_KEY]
    earlier_batch = await batches.by_request(principal.subject, payload["request_id"])
    if earlier_batch is not None:
        if earlier_batch["body_hash"] != body_hash or earlier_batch["kind"] != "bulk":
            raise _conflict(payload["request_id"])
        if earlier_batch["result"] is not None:
            return json_response(
                earlier_batch["result"], "bulk already accepted (idempotent replay)", status=202,
                headers={"Idempotent-Replayed": "true"},
            )  # fmt: skip
    # Looked up before the batch is stored: a request refused as a whole (no such template)
    # leaves nothing behind, and may be sent again corrected with the same request_id.
    template = await _template(request, payload)
    wanted: dict[str, dict[str, Any]] = {}
    for r in payload["recipients"]:
        wanted.setdefault(str(r["user_id"]), r["variables"])  # listed twice: the first counts
    try:
        found = await profiles(request.config_dict[REDIS_KEY], request.config_dict[USERS_KEY], wanted)
    except ServiceUnavailable as exc:
        raise _unavailable(exc) from None
    # New, or a replay of one that did not finish: done (again). Ids are per (batch, user), so
    # what the first attempt stored is not stored twice, and is counted as it was stored.
    batch, created = await batches.create(
        client_id=principal.subject, request_id=payload["request_id"], body_hash=body_hash, kind="bulk"
    )
    if batch["body_hash"] != body_hash or batch["kind"] != "bulk":
        raise _conflict(payload["request_id"])
    send = Send.of(principal.subject, payload, body_hash, when, template, batch_id=batch["id"])
    rejected: list[dict[str, Any]] = []
    new = []
    for user_id, own in wanted.items():
        if user_id not in found:
            rejected.append({"user_id": user_id, "error": f"user_not_found: User {user_id} does not exist."})
            continue
        variables = {**payload["variables"], **own}
        problem = templating.missing_variables(payload["notification_type"], template, variables)
        if problem is not None:
            rejected.append({"user_id": user_id, "error": f"{problem.code}: {problem.message}"})
            continue
        new.append(recipient(send, found[user_id], variables))
    rows = await request.config_dict[STORE_KEY].create_many(new) if new else []
    statuses: dict[uuid.UUID, str] = {}
    outbox = request.config_dict[OUTBOX_KEY]
    for n, row in zip(new, rows, strict=True):
        if isinstance(row, BaseException):
            raise row
        if row is not None:
            statuses[n.id] = row["status"]
            if row["status"] == "pending":
                outbox.submit(row)
    earlier = [n.id for n in new if n.id not in statuses]
    if earlier:  # stored by an earlier attempt of this request
        statuses.update(await batches.existing(earlier))
    skipped = sum(1 for s in statuses.values() if s == "skipped")
    result = {
        "batch_id": batch["id"],
        "total": len(wanted),
        "accepted": len(statuses) - skipped,
        "skipped": skipped,
        "rejected": rejected,
    }
    await batches.finish_bulk(batch["id"], result)
    metrics = request.config_dict[METRICS_KEY]
    metrics.accepted.labels(payload["notification_type"]).inc(result["accepted"])
    metrics.skipped.labels(payload["notification_type"]).inc(skipped)
    log.info("bulk %s accepted: %s", batch["id"], {k: v for k, v in result.items() if k != "rejected"})
    return json_response(result, "bulk accepted" if created else "bulk accepted (resumed)", status=202)


# --- a notification to a topic ---------------------------------------------------------------


def _topic_view(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_id": batch["id"],
        "request_id": batch["request_id"],
        "topic": batch["topic_key"],
        "total": batch["total"],
        "status": "accepted",
        "created_at": batch["created_at"],
    }


async def notify_topic(request: web.Request, client_id: str, body: dict[str, Any]) -> web.Response:
    """`POST /api/v1/notifications/` with `topic`: the batch stored and its fan-out queued; 202."""
    payload, when = parsing.parse(body, "topic")
    body_hash = parsing.body_hash(payload)
    batches = request.config_dict[BATCHES_KEY]
    existing = await batches.by_request(client_id, payload["request_id"])
    if existing is None:
        if not await batches.topic_exists(client_id, payload["topic"]):
            raise not_found("Topic")
        template = await _template(request, payload)
        problem = templating.missing_variables(payload["notification_type"], template, payload["variables"])
        if problem is not None:
            raise ApiError(422, problem.code, problem.message, data={"fields": problem.fields})
        shared = Send.of(client_id, payload, body_hash, when, template).stored()
        existing, created = await batches.create(
            client_id=client_id, request_id=payload["request_id"], body_hash=body_hash,
            kind="topic", topic_key=payload["topic"], payload=shared,
        )  # fmt: skip
    else:
        created = False
    if existing["body_hash"] != body_hash or existing["kind"] != "topic":
        raise _conflict(payload["request_id"])
    if existing["fanned_out_at"] is None and existing["failed_at"] is None:
        # New, or a replay of one not finished: its fan-out message is published unless one was
        # recently, or the fan-out is moving (a replay adds no second message behind the first);
        # if the broker refuses, a replay or the redrive loop publishes it.
        await request.config_dict[FANOUT_KEY].start(existing["id"])
    message = "topic notification accepted" if created else "topic notification already accepted"
    headers = None if created else {"Idempotent-Replayed": "true"}
    return json_response(_topic_view(existing), message, status=202, headers=headers)


# --- batches ---------------------------------------------------------------------------------


async def get_batch(request: web.Request) -> web.Response:
    principal = require(request, "client")
    batch_id = parse_uuid(request.match_info["batch_id"])
    batches = request.config_dict[BATCHES_KEY]
    batch = await batches.get(batch_id) if batch_id is not None else None
    if batch is None or batch["client_id"] != principal.subject:
        raise not_found("Batch")
    by_status, last = await batches.counts(batch["id"])
    done = batch["kind"] == "bulk" or batch["fanned_out_at"] is not None
    return json_response(
        {
            "batch_id": batch["id"],
            "request_id": batch["request_id"],
            "kind": batch["kind"],
            "topic": batch["topic_key"],
            "total": batch["total"],
            "rejected": batch["rejected"],
            "by_status": by_status,
            "fanned_out": done,
            "created_at": batch["created_at"],
            "completed_at": last if done and last is not None else None,
            # A fan-out given up after its last try: when, and why (the last reason meanwhile).
            "failed_at": batch["failed_at"],
            "error": batch["fanout_error"],
        },
        "batch",
    )


# --- topics ----------------------------------------------------------------------------------


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key) > 100 or not CODE_RE.match(key):
        raise ApiError(
            400,
            "validation_error",
            "Invalid fields: key.",
            data={"fields": {"key": parsing.TOPIC_HINT}},
        )
    return key


async def put_topic(request: web.Request) -> web.Response:
    principal = require(request, "client")
    key = _key(request)
    fields = Fields(await read_json(request))
    fields.unknown({"name"})
    name = fields.string("name", max_len=200)
    fields.check()
    assert name is not None
    batches = request.config_dict[BATCHES_KEY]
    put = await batches.put_topic(principal.subject, key, name, MAX_TOPICS_PER_PROJECT)
    if put is None:
        raise ApiError(
            409,
            "too_many_topics",
            f"A project has at most {MAX_TOPICS_PER_PROJECT:,} topics: reuse one, or rename one with PUT.",
            data={"limit": MAX_TOPICS_PER_PROJECT},
        )
    row, created = put
    return json_response(row, "topic created" if created else "topic updated", status=201 if created else 200)


async def get_topic(request: web.Request) -> web.Response:
    principal = require(request, "client")
    row = await request.config_dict[BATCHES_KEY].topic(principal.subject, _key(request))
    if row is None:
        raise not_found("Topic")
    return json_response(row, "topic")


async def _owned_topic(request: web.Request) -> tuple[str, str]:
    principal = require(request, "client")
    key = _key(request)
    if not await request.config_dict[BATCHES_KEY].topic_exists(principal.subject, key):
        raise not_found("Topic")
    return principal.subject, key


async def add_subscribers(request: web.Request) -> web.Response:
    client_id, key = await _owned_topic(request)
    body = await read_json(request)
    raw = body.get("user_ids")
    if isinstance(raw, list) and len(raw) > MAX_RECIPIENTS:
        raise parsing.too_many(len(raw), "user_ids")
    fields = Fields(body)
    fields.unknown({"user_ids"})
    ids: list[str] = []
    if not isinstance(raw, list) or not raw:
        fields.error("user_ids", "must be a non-empty list of user ids")
    else:
        for i, value in enumerate(raw):
            if isinstance(value, str) and USER_ID_RE.match(value):
                ids.append(value)
            else:
                fields.error(f"user_ids[{i}]", USER_ID_HINT)
    fields.check()
    unique = list(dict.fromkeys(ids))
    # Only the project's users: looked up as a bulk send looks its recipients up (the cache, then
    # the user service's batch lookup); one unknown id and nothing is subscribed.
    try:
        found = await profiles(request.config_dict[REDIS_KEY], request.config_dict[USERS_KEY], unique)
    except ServiceUnavailable as exc:
        raise _unavailable(exc) from None
    unknown = [u for u in unique if u not in found]
    if unknown:
        raise ApiError(
            422,
            "unknown_users",
            f"{len(unknown)} of these user ids are no user of this project; nothing was subscribed.",
            data={"user_ids": unknown[:UNKNOWN_LISTED], "count": len(unknown)},
        )
    added = await request.config_dict[BATCHES_KEY].subscribe(client_id, key, unique, MAX_TOPIC_SUBSCRIBERS)
    if added is None:
        raise ApiError(
            409,
            "too_many_subscribers",
            f"A topic has at most {MAX_TOPIC_SUBSCRIBERS:,} subscribers: these would pass it; nothing was"
            " subscribed.",
            data={"limit": MAX_TOPIC_SUBSCRIBERS},
        )
    return json_response(
        {"topic": key, "added": added, "already_subscribed": len(unique) - added}, "subscribers added"
    )


async def remove_subscriber(request: web.Request) -> web.Response:
    client_id, key = await _owned_topic(request)
    user_id = request.match_info["user_id"]
    removed = bool(USER_ID_RE.match(user_id)) and await request.config_dict[BATCHES_KEY].unsubscribe(
        client_id, key, user_id
    )
    return json_response(
        {"topic": key, "user_id": request.match_info["user_id"], "removed": removed},
        "subscriber removed" if removed else "not subscribed",
    )


async def list_subscribers(request: web.Request) -> web.Response:
    client_id, key = await _owned_topic(request)
    _, limit = paging(request, max_limit=1000)
    raw_after = request.query.get("after")
    after = raw_after or None
    if raw_after and not USER_ID_RE.match(raw_after):
        raise ApiError(
            400, "validation_error", "Invalid fields: after.", data={"fields": {"after": "must be a user id"}}
        )
    rows = await request.config_dict[BATCHES_KEY].subscribers(client_id, key, after=after, limit=limit + 1)
    has_next = len(rows) > limit
    rows = rows[:limit]
    cursor = str(rows[-1]["user_id"]) if has_next else None
    return json_response(rows, "subscribers", meta=cursor_meta(limit, None, has_next, cursor))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/notifications/bulk", bulk)
    r.add_get("/api/v1/batches/{batch_id}", get_batch)
    r.add_put("/api/v1/topics/{key}", put_topic)
    r.add_get("/api/v1/topics/{key}", get_topic)
    for path in ("/api/v1/topics/{key}/subscribers", "/api/v1/topics/{key}/subscribers/"):
        r.add_post(path, add_subscribers)
        r.add_get(path, list_subscribers)
    r.add_delete("/api/v1/topics/{key}/subscribers/{user_id}", remove_subscriber)
