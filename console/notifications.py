"""The console's overview, notifications and failures pages (retry, cancel)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

import orjson
from aiohttp import web

from common.broker import amqp
from common.data.store import StatusStore
from common.keys import (
    BROKER_KEY,
    CONSOLE_SESSION_KEY,
    METRICS_KEY,
    OUTBOX_KEY,
    STORE_KEY,
)
from common.vocabulary import STATUSES
from common.web import cursors
from console import charts
from console.pages import (
    FAILURES_SHOWN,
    PAGE_SIZE,
    Refused,
    _local,
    _project,
    _redirect,
    _uuid,
    _with_notice,
    render,
)
from console.queries import Queries

log = logging.getLogger("console")


# --- overview ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    name: str
    messages: int | None
    consumers: int | None
    problem: str | None = None


def _queue_order(name: str) -> tuple[int, str]:
    if name == amqp.FAILED_QUEUE or name.endswith(".failed"):
        return 2, name
    if ".retry." in name:
        return 1, name
    return 0, name


async def queue_depths(broker: amqp.Broker) -> list[QueueDepth]:
    """Messages and consumers of every queue the gateway declared, by a passive declare on a
    channel of the console's own (a missing queue closes the channel it was asked on, and that
    must not be the one the outbox publishes on)."""
    names = sorted(broker.queues, key=_queue_order)
    if not broker.ready:
        return [QueueDepth(n, None, None, "RabbitMQ is not connected") for n in names]
    found: list[QueueDepth] = []
    channel = None
    try:
        for name in names:
            try:
                if channel is None or channel.is_closed:
                    channel = await broker.connection.channel()
                queue = await channel.declare_queue(name, passive=True, timeout=2)
                result = queue.declaration_result
                found.append(QueueDepth(name, result.message_count, result.consumer_count))
            except Exception as exc:  # noqa: BLE001 - shown beside the queue, the page still answers
                found.append(QueueDepth(name, None, None, f"{type(exc).__name__}: {exc}"[:200]))
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return found


async def overview(request: web.Request) -> web.Response:
    store: StatusStore = request.config_dict[STORE_KEY]
    queries = Queries(store.db, _project(request))
    counts = await queries.counts()
    minutes = await queries.per_minute(60)
    statuses = list(STATUSES) + sorted(set(counts) - set(STATUSES))
    return render(
        request,
        "overview.html",
        statuses=statuses,
        counts=counts,
        totals={
            "hour": sum(c["hour"] for c in counts.values()),
            "day": sum(c["day"] for c in counts.values()),
        },
        chart=charts.per_minute(minutes),
        queues=await queue_depths(request.config_dict[BROKER_KEY]),
    )


# --- notifications -------------------------------------------------------------------------------


async def notifications(request: web.Request) -> web.Response:
    # No NUL: PostgreSQL text cannot hold one, and no id or request_id contains one.
    q = request.query.get("q", "").replace("\x00", "").strip()[:255]
    status = request.query.get("status", "")
    if status and status not in STATUSES:
        raise Refused(400, "Unknown status", f"{status!r} is not a status; use one of {', '.join(STATUSES)}.")
    after = None
    if raw := request.query.get("after"):
        after = cursors.decode_uuid(raw)
        if after is None:
            raise Refused(400, "Bad page link", "This page link is damaged; start again from the first page.")
    store: StatusStore = request.config_dict[STORE_KEY]
    page = await Queries(store.db, _project(request)).search(
        q=q, status=status or None, after=after, limit=PAGE_SIZE
    )
    next_link = None
    if page.next_cursor:
        next_link = "/console/notifications?" + urlencode(
            {k: v for k, v in {"q": q, "status": status, "after": page.next_cursor}.items() if v}
        )
    return render(
        request,
        "notifications.html",
        q=q,
        chosen_status=status,
        statuses=STATUSES,
        rows=page.rows,
        next_link=next_link,
        paged=after is not None,
    )


_SHOWN_FIELDS = (
    "notification_type", "status", "request_id", "user_id", "template_code", "template_version", "language",
    "priority", "attempts", "provider", "error", "correlation_id", "send_at", "created_at", "updated_at",
    "delivered_at",
)  # fmt: skip


async def notification(request: web.Request) -> web.Response:
    notification_id = _uuid(request.match_info["notification_id"], "Notification")
    store: StatusStore = request.config_dict[STORE_KEY]
    row = await store.get(notification_id, _project(request))
    if row is None:
        raise Refused(404, "Notification not found", f"There is no notification {notification_id}.")
    history = await store.history(notification_id)
    return render(
        request,
        "notification.html",
        n=row,
        fields=[(f, row[f]) for f in _SHOWN_FIELDS if f in row],
        history=history,
        webhooks=await Queries(store.db, _project(request)).webhook_deliveries(notification_id),
        variables=orjson.dumps(row.get("variables") or {}, option=orjson.OPT_INDENT_2).decode(),
        metadata=orjson.dumps(row.get("metadata") or {}, option=orjson.OPT_INDENT_2).decode(),
    )


async def _retry(request: web.Request, notification_id: uuid.UUID) -> bool:
    row = await request.config_dict[STORE_KEY].requeue_failed(notification_id, _project(request))
    if row is None:
        return False
    # Committed as pending with publish_pending: the outbox publishes it, the relay if that fails.
    request.config_dict[OUTBOX_KEY].submit(row)
    log.info(
        "console: notification %s requeued by key %s", notification_id, request[CONSOLE_SESSION_KEY].subject
    )
    return True


async def retry_one(request: web.Request) -> web.Response:
    notification_id = _uuid(request.match_info["notification_id"], "Notification")
    done = await _retry(request, notification_id)
    # From the failures list the operator goes back to the list; otherwise to the notification.
    back = str((await request.post()).get("back") or "")
    path = _local(back) if back else f"/console/notifications/{notification_id}"
    return _redirect(_with_notice(path, "retried", 1) if done else _with_notice(path, "not_retried"))


async def cancel_one(request: web.Request) -> web.Response:
    """Cancel a scheduled notification, or a pending one no worker has claimed, as the API does."""
    notification_id = _uuid(request.match_info["notification_id"], "Notification")
    store: StatusStore = request.config_dict[STORE_KEY]
    row = await store.cancel(notification_id, _project(request))
    path = f"/console/notifications/{notification_id}"
    if row is None:
        return _redirect(_with_notice(path, "not_cancelled"))
    request.config_dict[METRICS_KEY].cancelled.labels(row["notification_type"]).inc()
    log.info(
        "console: notification %s cancelled by key %s", notification_id, request[CONSOLE_SESSION_KEY].subject
    )
    return _redirect(_with_notice(path, "cancelled"))


async def failures(request: web.Request) -> web.Response:
    store: StatusStore = request.config_dict[STORE_KEY]
    queries = Queries(store.db, _project(request))
    return render(
        request,
        "failures.html",
        rows=await queries.failures(FAILURES_SHOWN),
        total=await queries.failed_total(),
    )


async def retry_selected(request: web.Request) -> web.Response:
    form = await request.post()
    chosen = {uuid.UUID(v) for v in form.getall("ids", []) if isinstance(v, str) and _is_uuid(v)}
    retried = 0
    for notification_id in sorted(chosen):
        retried += await _retry(request, notification_id)
    return _redirect(
        _with_notice("/console/failures", "retried", retried)
        if retried
        else _with_notice("/console/failures", "not_retried")
    )


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
