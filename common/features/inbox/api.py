"""The in-app inbox API under /api/v1/inbox/ (registered by the gateway).

For the end user: their own access token (`POST /api/v1/users/{id}/token`), or a client key
acting for one user with `?user_id=` (required then). Every message is the user's: another
user's is not found. Each change is committed with its event (store.py), then announced to the
user's open streams in every gateway process (live.py).

`GET /api/v1/inbox/events` is a Server-Sent Events stream. Every event carries `id:` (an
`inbox_events.seq`); a `counts` event follows each batch of changes with the id of the last
change it reflects (the same as that change's), and opens the stream with the id the stream
starts from, so a reconnect's `Last-Event-ID` (or `?last_event_id=`) is always where to resume.
A browser's EventSource cannot send a header: it authenticates with `?ticket=`, single use, from
`POST /api/v1/inbox/tickets` (the auth middleware lets a request to this one path through with a
ticket and no credential; only the ticket authenticates it then).

CORS, for /api/v1/inbox/ only: the origins of INBOX_ALLOWED_ORIGINS, by exact match.

`GET /inbox/notify-inbox.js` is the drop-in web component (static/notify-inbox.js): public code,
outside /api/ (no credential), with `Access-Control-Allow-Origin: *` since a
`<script type="module">` of another origin is fetched with CORS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any, cast

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from common.data.db import DatabaseError
from common.features.inbox import live
from common.features.inbox.store import ACTIONS, Action, Status
from common.keys import CONFIG_KEY, INBOX_KEY, INBOX_LIVE_KEY, PRINCIPAL_KEY, REDIS_KEY
from common.web.auth import Principal, forbidden, require, unauthorized
from common.web.http import ApiError, dumps, json_response, not_found, strict_int
from common.web.validation import USER_ID_HINT, USER_ID_RE, Fields, parse_uuid

log = logging.getLogger("gateway")

PREFIX = "/api/v1/inbox/"
EVENTS_PATH = "/api/v1/inbox/events"
# The paths the auth middleware lets through with `?ticket=` and no credential.
TICKET_PATHS = (EVENTS_PATH,)

MAX_PAGE = 100
TICKET_TTL = 60  # seconds a ticket may wait to be used (once)
TICKET_KEY = "notify:inbox:ticket:"  # + the SHA-256 of the ticket: Redis never holds a usable one
HEARTBEAT = 15.0  # seconds between `: ping` comments on an idle stream
RETRY_MS = 3000  # the `retry:` hint: how long an EventSource waits before reconnecting
MAX_REPLAY = 500  # events a reconnect may replay; more missed than that: a `reset` event
CATCH_UP_BATCH = 100  # events read from the database at a time
STREAM_RETRY_AFTER = 5  # the Retry-After of a 429 too_many_streams
CORS_MAX_AGE = 600
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"
_MAX_SEQ = 10**18 - 1
COMPONENT_PATH = "/inbox/notify-inbox.js"
COMPONENT_FILE = Path(__file__).with_name("static") / "notify-inbox.js"
COMPONENT_CACHE = "public, max-age=300"  # short: a deploy reaches the pages within minutes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- who: the user, or a client key acting for one ---------------------------------------------


def _actor(request: web.Request) -> tuple[str, str]:
    """(project, user id) of the inbox this request reads or changes."""
    principal = require(request, "client", "user")
    asked = request.query.get("user_id")
    if principal.kind == "user":
        if asked is not None and asked != principal.subject:
            raise forbidden()
        return principal.project, principal.subject
    if asked is None or not USER_ID_RE.match(asked):
        hint = "is required with a client key" if asked is None else USER_ID_HINT
        raise ApiError(
            400, "validation_error", "Invalid fields: user_id.", data={"fields": {"user_id": hint}}
        )
    return principal.project, asked


def _redis_down(exc: Exception) -> ApiError:
    log.warning("inbox: Redis unavailable: %s", exc)
    return ApiError(
        503,
        "service_unavailable",
        "Redis is unavailable; please retry shortly.",
        headers={"Retry-After": "1"},
    )


def _ticket_key(ticket: str) -> str:
    return TICKET_KEY + hashlib.sha256(ticket.encode()).hexdigest()


async def create_ticket(request: web.Request) -> web.Response:
    project, user_id = _actor(request)
    ticket = secrets.token_urlsafe(32)
    try:
        await request.app[REDIS_KEY].set(_ticket_key(ticket), orjson.dumps([project, user_id]), ex=TICKET_TTL)
    except (RedisError, OSError) as exc:
        raise _redis_down(exc) from None
    return json_response(
        {"ticket": ticket, "expires_in": TICKET_TTL},
        f"a ticket for GET {EVENTS_PATH}?ticket=…: usable once, within {TICKET_TTL} s",
        status=201,
    )


async def _redeem(request: web.Request, ticket: str) -> tuple[str, str]:
    try:
        raw = await request.app[REDIS_KEY].getdel(_ticket_key(ticket))
    except (RedisError, OSError) as exc:
        raise _redis_down(exc) from None
    if raw is None:
        raise ApiError(
            401,
            "invalid_ticket",
            f"The ticket is unknown, used or expired: get a new one from POST {PREFIX}tickets.",
        )
    project, user_id = orjson.loads(raw)
    return str(project), str(user_id)


# --- messages ----------------------------------------------------------------------------------


def message_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "notification_id": row["notification_id"],
        "title": row["title"],
        "body": row["body"],
        "link": row["link"],
        "image_url": row["image_url"],
        "data": row["data"],
        "workflow_key": row["workflow_key"],
        "created_at": row["created_at"],
        "seen_at": row["seen_at"],
        "read_at": row["read_at"],
        "archived_at": row["archived_at"],
    }


def _list_query(request: web.Request) -> tuple[Status, bool, int | None, int]:
    query = request.query
    fields = Fields(dict(query))
    status = query.get("status", "all")
    if status not in ("unread", "read", "all"):
        fields.error("status", "must be unread, read or all")
    archived = query.get("archived", "false")
    if archived not in ("true", "false"):
        fields.error("archived", "must be true or false")
    after: int | None = None
    if "after" in query:
        after = strict_int(query["after"], 0, _MAX_SEQ)
        if after is None:
            fields.error("after", "must be a cursor from meta.next")
    limit = 20
    if "limit" in query:
        chosen = strict_int(query["limit"], 1, MAX_PAGE)
        if chosen is None:
            fields.error("limit", f"must be a whole number from 1 to {MAX_PAGE}")
        else:
            limit = chosen
    fields.check()
    return cast(Status, status), archived == "true", after, limit


async def list_messages(request: web.Request) -> web.Response:
    project, user_id = _actor(request)
    status, archived, after, limit = _list_query(request)
    rows = await request.app[INBOX_KEY].messages(
        project, user_id, status=status, archived=archived, after=after, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    meta = {"limit": limit, "next": str(rows[-1]["seq"]) if more else None, "has_next": more}
    return json_response([message_view(r) for r in rows], "inbox messages, newest first", meta=meta)


async def get_counts(request: web.Request) -> web.Response:
    project, user_id = _actor(request)
    return json_response(await request.app[INBOX_KEY].counts(project, user_id), "inbox counts")


_DONE = {
    "read": "message read",
    "unread": "message unread",
    "seen": "message seen",
    "archive": "message archived",
    "unarchive": "message unarchived",
}


def _mark(action: Action) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        project, user_id = _actor(request)
        message_id = parse_uuid(request.match_info["message_id"])
        found = None
        if message_id is not None:
            found = await request.app[INBOX_KEY].mark(project, user_id, message_id, action)
        if found is None:
            raise not_found("Inbox message")
        row, seq = found
        if seq is not None:
            await live.announce(request.app[REDIS_KEY], project, user_id, seq)
        return json_response(message_view(row), _DONE[action])

    return handler


def _all(which: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        project, user_id = _actor(request)
        store = request.app[INBOX_KEY]
        counts, seq = await (store.read_all if which == "read" else store.seen_all)(project, user_id)
        if seq is not None:
            await live.announce(request.app[REDIS_KEY], project, user_id, seq)
        return json_response(counts, f"every message {which}")

    return handler


# --- the event stream --------------------------------------------------------------------------


def _frame(event: str, data: Any, event_id: int | None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + dumps(data) + b"\n\n"


def _event_frame(event: dict[str, Any]) -> bytes | None:
    """The frame of one inbox event; None for one whose message is gone (retention, erasure)."""
    if event["message_id"] is None:
        change = "read" if event["action"] == "read_all" else "seen"
        return _frame(event["kind"], {"all": True, "change": change}, event["seq"])
    if event["message"] is None:
        return None
    return _frame(event["kind"], message_view(event["message"]), event["seq"])


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id"))
    if raw is None or raw == "":
        return None
    value = strict_int(raw, 0, _MAX_SEQ)
    if value is None:
        raise ApiError(
            400,
            "validation_error",
            "Invalid fields: Last-Event-ID.",
            data={"fields": {"Last-Event-ID": "must be the id of an event of this stream"}},
        )
    return value


async def _stream_actor(request: web.Request) -> tuple[str, str]:
    ticket = request.query.get("ticket")
    principal: Principal | None = request.get(PRINCIPAL_KEY)
    if principal is None:  # let through by the auth middleware for its ticket: only that counts
        if not ticket:
            raise unauthorized()
        return await _redeem(request, ticket)
    if ticket is not None:
        raise ApiError(
            400,
            "validation_error",
            "Send either a ticket or credentials, not both.",
            data={"fields": {"ticket": "must not come with an Authorization header"}},
        )
    return _actor(request)


async def events(request: web.Request) -> web.StreamResponse:
    project, user_id = await _stream_actor(request)
    last_id = _last_event_id(request)
    table = request.app[INBOX_LIVE_KEY]
    try:
        stream = table.open(project, user_id)
    except live.TooManyStreams as exc:
        raise ApiError(
            429,
            "too_many_streams",
            f"Too many open event streams ({exc}); close one or retry later.",
            headers={"Retry-After": str(STREAM_RETRY_AFTER)},
        ) from None
    try:
        store = request.app[INBOX_KEY]
        latest = await store.latest_seq(project, user_id)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **cors_headers(request),
            }
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await _pump(request, response, stream, latest, last_id)
        return response
    finally:
        table.close(stream)


async def _pump(
    request: web.Request, response: web.StreamResponse, stream: Any, latest: int, last_id: int | None
) -> None:
    store = request.app[INBOX_KEY]
    table = request.app[INBOX_LIVE_KEY]
    project, user_id = stream.project, stream.user_id
    # A Last-Event-ID beyond the user's last event (another deployment's, say) would hide the
    # events to come: the stream starts from the last one.
    cursor = latest if last_id is None else min(last_id, latest)
    await response.write(f"retry: {RETRY_MS}\n\n".encode())
    if cursor < latest:
        missed = await store.events_after(project, user_id, cursor, MAX_REPLAY + 1)
        if len(missed) > MAX_REPLAY:
            await response.write(
                _frame("reset", {"reason": f"more than {MAX_REPLAY} events missed: reload the list"}, latest)
            )
            cursor = latest
        else:
            cursor = await _send(response, missed, cursor)
    await response.write(_frame("counts", await store.counts(project, user_id), cursor))
    loop = asyncio.get_running_loop()
    next_ping = loop.time() + HEARTBEAT
    next_poll = loop.time() + _poll_interval()
    while not table.stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stream.wake.wait(), max(0.0, min(next_ping, next_poll) - loop.time()))
        if table.stopping.is_set() or request.transport is None or request.transport.is_closing():
            return
        now = loop.time()
        if stream.wake.is_set() or now >= next_poll:
            stream.wake.clear()  # before reading: a wake-up meanwhile reads again
            next_poll = now + _poll_interval()
            cursor = await _catch_up(request, response, stream, cursor)
        if now >= next_ping:
            await response.write(b": ping\n\n")
            next_ping = now + HEARTBEAT


def _poll_interval() -> float:
    return live.POLL_INTERVAL


async def _send(response: web.StreamResponse, found: list[dict[str, Any]], cursor: int) -> int:
    for event in found:
        frame = _event_frame(event)
        if frame is not None:
            await response.write(frame)
        cursor = int(event["seq"])
    return cursor


async def _catch_up(request: web.Request, response: web.StreamResponse, stream: Any, cursor: int) -> int:
    """Everything after `cursor` sent, then the counts; the new cursor. A database in trouble
    ends nothing: the next look tries again."""
    store = request.app[INBOX_KEY]
    start = cursor
    while True:
        try:
            found = await store.events_after(stream.project, stream.user_id, cursor, CATCH_UP_BATCH)
        except (DatabaseError, TimeoutError) as exc:
            log.warning("inbox: reading events failed, trying again later: %s", exc)
            break
        cursor = await _send(response, found, cursor)
        if len(found) < CATCH_UP_BATCH:
            break
    if cursor != start:
        try:
            counts = await store.counts(stream.project, stream.user_id)
        except (DatabaseError, TimeoutError) as exc:
            log.warning("inbox: reading counts failed: %s", exc)
        else:
            await response.write(_frame("counts", counts, cursor))
    return cursor


# --- CORS --------------------------------------------------------------------------------------


def cors_headers(request: web.Request) -> dict[str, str]:
    """The CORS headers of an /api/v1/inbox/ response: Allow-Origin for an allowed origin only."""
    origin = request.headers.get("Origin")
    if origin is not None and origin in request.config_dict[CONFIG_KEY].inbox_allowed_origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {"Vary": "Origin"}


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS for /api/v1/inbox/ and nothing else; preflights answered here, before the auth
    middleware (a preflight carries no credentials)."""
    if not request.path.startswith(PREFIX):
        return await handler(request)
    headers = cors_headers(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if "Access-Control-Allow-Origin" not in headers:
            raise ApiError(
                403, "origin_not_allowed", "This origin may not call the inbox API.", headers=headers
            )
        return web.Response(
            status=204,
            headers={
                **headers,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE),
            },
        )
    try:
        response = await handler(request)
    except ApiError as exc:
        exc.headers = {**(exc.headers or {}), **headers}
        raise
    except web.HTTPException as exc:
        exc.headers.update(headers)
        raise
    if not response.prepared:
        response.headers.update(headers)
    return response


# --- the web component ------------------------------------------------------------------------


@cache
def _component() -> tuple[bytes, str]:
    """The component's bytes and ETag, read once per process."""
    body = COMPONENT_FILE.read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


async def component(request: web.Request) -> web.Response:
    body, etag = _component()
    headers = {
        "Access-Control-Allow-Origin": "*",
        "Cache-Control": COMPONENT_CACHE,
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
    }
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="text/javascript", charset="utf-8", headers=headers)


# --- routes ------------------------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/inbox/messages", list_messages)
    r.add_get("/api/v1/inbox/counts", get_counts)
    for action in ACTIONS:
        r.add_post(f"/api/v1/inbox/messages/{{message_id}}/{action}", _mark(action))
    r.add_post("/api/v1/inbox/read-all", _all("read"))
    r.add_post("/api/v1/inbox/seen-all", _all("seen"))
    r.add_post("/api/v1/inbox/tickets", create_ticket)
    r.add_get(EVENTS_PATH, events)
    r.add_get(COMPONENT_PATH, component)


async def end_streams(app: web.Application) -> None:
    """on_shutdown: open streams end, so the server need not wait for them to stop."""
    if INBOX_LIVE_KEY in app:
        app[INBOX_LIVE_KEY].stop()
