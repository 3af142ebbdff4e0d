"""The operator console: a sub-application the gateway mounts at /console.

Server-rendered (Jinja2, autoescaped), no script but one small file of its own, a CSP that
allows nothing inline. It reads the status store, asks the user and template services through
the gateway's clients, reads queue depths from RabbitMQ, and retries through the gateway's
outbox, all handed over by the gateway as a `Wiring` (the console imports no service module).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jinja2
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from common import amqp, auth
from common.clients import ServiceClient, ServiceUnavailable
from common.db import OperationalError
from common.http import CONFIG_KEY, METRICS_KEY, ApiError
from common.outbox import Outbox
from common.store import STATUSES, StatusStore
from common.templating import required_variables
from console import charts
from console.queries import Queries, decode_cursor
from console.session import Session, Sessions, csrf_matches

log = logging.getLogger("console")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 25
FAILURES_SHOWN = 50


@dataclass(frozen=True)
class Wiring:
    """Where the gateway keeps what the console uses (its AppKeys), so the console can find
    them without importing the gateway."""

    store: web.AppKey[StatusStore]
    outbox: web.AppKey[Outbox]
    broker: web.AppKey[amqp.Broker]
    users: web.AppKey[ServiceClient]
    templates: web.AppKey[ServiceClient]
    redis: web.AppKey[aioredis.Redis]
    key_hashes: web.AppKey[tuple[Any, ...]]


WIRING_KEY = web.AppKey("console_wiring", Wiring)
ENV_KEY = web.AppKey("console_templates", jinja2.Environment)
SESSION_KEY = web.RequestKey("console_session", Session)

# Reachable without a session: the sign-in page itself and the stylesheet it uses.
_PUBLIC = ("/console/sign-in", "/console/static/")

NOTICES = {
    "retried": "{n} notification(s) requeued for delivery.",
    "not_retried": "Nothing was requeued: only failed notifications can be retried.",
    "cancelled": "The notification is cancelled; it will not be sent.",
    "not_cancelled": "Not cancelled: a worker has it already, or it is final.",
    "activated": "Version {n} is now the active version.",
    "device_removed": "The device was removed.",
    "preferences_saved": "Preferences saved.",
    "signed_out": "You are signed out.",
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Refused(Exception):
    """A page that cannot be shown, with the status and a sentence for the operator."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


# --- helpers ---------------------------------------------------------------------------------


def _dep(request: web.Request, pick: Callable[[Wiring], web.AppKey[Any]]) -> Any:
    return request.config_dict[pick(request.app[WIRING_KEY])]


def _sessions(request: web.Request) -> Sessions:
    config = request.config_dict[CONFIG_KEY]
    return Sessions(
        _dep(request, lambda w: w.redis),
        config.console_key,
        config.console_session_ttl,
        config.public_base_url,
    )


def _subjects(request: web.Request) -> list[str]:
    """The key digests that may sign in: the gateway's API keys and CONSOLE_KEYS."""
    config = request.config_dict[CONFIG_KEY]
    hashes = list(_dep(request, lambda w: w.key_hashes))
    return hashes + [auth.key_id(k) for k in config.console_keys]


def _key_matches(request: web.Request, presented: str) -> str | None:
    digest = auth.key_id(presented)
    found = None
    # Every key compared, so the time taken does not tell which one nearly matched.
    for known in _subjects(request):
        if hmac.compare_digest(known, digest):
            found = digest[:16]
    return found


def _local(target: str | None) -> str:
    """Where to go after signing in: only a console address of this site."""
    if target and target.startswith("/console") and not target.startswith("//") and "\\" not in target:
        return target
    return "/console"


def _redirect(location: str) -> web.Response:
    # Returned, not raised: the headers and cookies set on it must reach the browser as set.
    return web.Response(status=303, headers={"Location": location})


def _with_notice(path: str, notice: str, n: object = "") -> str:
    return f"{path}?{urlencode({'notice': notice, 'n': str(n)})}"


def _notice(request: web.Request) -> str | None:
    text = NOTICES.get(request.query.get("notice", ""))
    if text is None:
        return None
    n = request.query.get("n", "")
    return text.format(n=n if n.isdigit() else "")


def render(request: web.Request, name: str, *, status: int = 200, **context: Any) -> web.Response:
    env = request.app[ENV_KEY]
    session = request.get(SESSION_KEY)
    html = env.get_template(name).render(
        session=session,
        csrf_token=session.csrf if session else "",
        notice=_notice(request),
        path=request.path,
        **context,
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise Refused(404, f"{what} not found", f"{raw!r} is not a {what.lower()} id.") from None


def _service_failed(reply_status: int, message: str, what: str) -> Refused:
    if reply_status == 404:
        return Refused(404, f"{what} not found", message or f"This {what.lower()} does not exist.")
    return Refused(502, f"{what} unavailable", message or f"The service answered {reply_status}.")


# --- middlewares -------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer of the console gets its security headers, and errors become pages (the
    gateway's own error middleware would answer JSON)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error_page(request, exc.status, exc.reason, _HTTP_MESSAGES.get(exc.status, exc.reason))
    except Refused as exc:
        response = _error_page(request, exc.status, exc.title, exc.message)
    except ApiError as exc:
        response = _error_page(request, exc.status, exc.code.replace("_", " ").capitalize(), exc.message)
    except (ServiceUnavailable, OperationalError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        log.warning("console: a dependency is unavailable: %s: %s", type(exc).__name__, exc)
        response = _error_page(
            request, 503, "Temporarily unavailable", "A service the console needs did not answer; try again."
        )
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if not request.path.startswith("/console/static/"):
        # Pages show customer data: never kept by a browser or a proxy.
        response.headers["Cache-Control"] = "no-store"
    return response


_HTTP_MESSAGES = {
    404: "There is no console page at this address.",
    405: "This page does not take that kind of request.",
}


def _error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return render(request, "error.html", status=status, title=title, message=message)


@web.middleware
async def signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pages need a live session whose key is still accepted; forms need its CSRF token."""
    if request.path.startswith(_PUBLIC):
        return await handler(request)
    sessions = _sessions(request)
    session = await sessions.current(request)
    if session is not None and session.subject not in {s[:16] for s in _subjects(request)}:
        session = None  # its key was withdrawn
    if session is None:
        target = request.path_qs if request.method == "GET" else "/console"
        return _redirect("/console/sign-in?" + urlencode({"next": target}))
    request[SESSION_KEY] = session
    if request.method == "POST":
        form = await request.post()  # kept by aiohttp: the handler reads the same form again
        if not csrf_matches(session.csrf, form.get("csrf_token")):
            raise Refused(
                403,
                "Form refused",
                "This form did not carry the console's security token (csrf_token), so nothing was"
                " changed. Reload the page and try again.",
            )
    return await handler(request)


# --- signing in and out ------------------------------------------------------------------------


async def sign_in_page(request: web.Request) -> web.Response:
    sessions = _sessions(request)
    if await sessions.current(request) is not None:
        return _redirect(_local(request.query.get("next")))
    token = sessions.presession_token(request)
    response = render(
        request, "sign_in.html", signin_token=token, next=_local(request.query.get("next")), error=None
    )
    sessions.set_presession(response, request, token)
    return response


async def sign_in(request: web.Request) -> web.Response:
    sessions = _sessions(request)
    form = await request.post()
    target = _local(str(form.get("next") or ""))
    if not sessions.presession_matches(request, form.get("csrf_token")):
        raise Refused(
            403,
            "Form refused",
            "The sign-in form did not carry its security token (csrf_token); reload the page and try again.",
        )
    address = request.remote or "unknown"

    def again(status: int, error: str) -> web.Response:
        token = sessions.presession_token(request)
        response = render(
            request, "sign_in.html", status=status, signin_token=token, next=target, error=error
        )
        sessions.set_presession(response, request, token)
        return response

    if await sessions.signin_blocked(address):
        return again(429, "Too many wrong keys from this address; wait a few minutes before trying again.")
    presented = str(form.get("api_key") or "").strip()
    subject = _key_matches(request, presented) if presented else None
    if subject is None:
        await sessions.signin_failed(address)
        log.info("console sign-in refused from %s", address)
        return again(401, "This key is not accepted. Use a client API key or one of CONSOLE_KEYS.")
    response = _redirect(target)
    await sessions.start(response, request, subject)
    log.info("console sign-in by key %s", subject)
    return response


async def sign_out(request: web.Request) -> web.Response:
    response = _redirect(_with_notice("/console/sign-in", "signed_out"))
    await _sessions(request).end(response, request.get(SESSION_KEY))
    return response


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
    store: StatusStore = _dep(request, lambda w: w.store)
    queries = Queries(store.db)
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
        queues=await queue_depths(_dep(request, lambda w: w.broker)),
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
        after = decode_cursor(raw)
        if after is None:
            raise Refused(400, "Bad page link", "This page link is damaged; start again from the first page.")
    store: StatusStore = _dep(request, lambda w: w.store)
    page = await Queries(store.db).search(q=q, status=status or None, after=after, limit=PAGE_SIZE)
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
    store: StatusStore = _dep(request, lambda w: w.store)
    row = await store.get(notification_id)
    if row is None:
        raise Refused(404, "Notification not found", f"There is no notification {notification_id}.")
    history = await store.history(notification_id)
    return render(
        request,
        "notification.html",
        n=row,
        fields=[(f, row[f]) for f in _SHOWN_FIELDS if f in row],
        history=history,
        webhooks=await Queries(store.db).webhook_deliveries(notification_id),
        variables=orjson.dumps(row.get("variables") or {}, option=orjson.OPT_INDENT_2).decode(),
        metadata=orjson.dumps(row.get("metadata") or {}, option=orjson.OPT_INDENT_2).decode(),
    )


async def _retry(request: web.Request, notification_id: uuid.UUID) -> bool:
    row = await _dep(request, lambda w: w.store).requeue_failed(notification_id)
    if row is None:
        return False
    # Committed as pending with publish_pending: the outbox publishes it, the relay if that fails.
    _dep(request, lambda w: w.outbox).submit(row)
    log.info("console: notification %s requeued by key %s", notification_id, request[SESSION_KEY].subject)
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
    store: StatusStore = _dep(request, lambda w: w.store)
    row = await store.cancel(notification_id)
    path = f"/console/notifications/{notification_id}"
    if row is None:
        return _redirect(_with_notice(path, "not_cancelled"))
    request.config_dict[METRICS_KEY].cancelled.labels(row["notification_type"]).inc()
    log.info("console: notification %s cancelled by key %s", notification_id, request[SESSION_KEY].subject)
    return _redirect(_with_notice(path, "cancelled"))


async def failures(request: web.Request) -> web.Response:
    store: StatusStore = _dep(request, lambda w: w.store)
    queries = Queries(store.db)
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


# --- templates --------------------------------------------------------------------------------


async def templates(request: web.Request) -> web.Response:
    client: ServiceClient = _dep(request, lambda w: w.templates)
    reply = await client.call("GET", "/api/v1/templates/?limit=100")
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "Templates")
    return render(request, "templates.html", rows=reply.data or [], meta=reply.body.get("meta") or {})


async def _template_context(request: web.Request, code: str) -> dict[str, Any]:
    client: ServiceClient = _dep(request, lambda w: w.templates)
    reply = await client.call("GET", f"/api/v1/templates/{quote(code, safe='')}/versions?limit=100")
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "Template")
    versions: list[dict[str, Any]] = reply.data or []
    languages: dict[str, list[dict[str, Any]]] = {}
    for version in versions:
        languages.setdefault(version["language"], []).append(version)
    channel = versions[0].get("notification_type") if versions else None
    active = next((v for v in versions if v.get("active")), versions[0] if versions else None)
    if channel is None:
        # The versions list does not repeat the channel; the template itself does.
        head = await client.call("GET", f"/api/v1/templates/{quote(code, safe='')}")
        channel = (head.data or {}).get("notification_type", "email") if head.status == 200 else "email"
    sample = {}
    if active is not None:
        sample = {name: f"sample {name}" for name in sorted(required_variables(channel, active))}
    return {"code": code, "languages": languages, "channel": channel, "sample": sample}


async def template(request: web.Request) -> web.Response:
    context = await _template_context(request, request.match_info["code"])
    return render(
        request,
        "template.html",
        **context,
        variables=orjson.dumps(context["sample"], option=orjson.OPT_INDENT_2).decode(),
        preview=None,
        preview_error=None,
        chosen_language="",
        chosen_version="",
    )


async def preview(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    form = await request.post()
    context = await _template_context(request, code)
    raw_variables = str(form.get("variables") or "{}")
    language = str(form.get("language") or "")
    version = str(form.get("version") or "")
    body: dict[str, Any] = {}
    problem = None
    try:
        variables = orjson.loads(raw_variables)
    except orjson.JSONDecodeError:
        variables, problem = None, 'Sample variables must be a JSON object, e.g. {"name": "Ada"}.'
    if variables is not None and not isinstance(variables, dict):
        problem = 'Sample variables must be a JSON object, e.g. {"name": "Ada"}.'
    if version and not version.isdigit():
        problem = "The version must be a whole number."
    rendered = None
    if problem is None:
        body = {"variables": variables}
        if language:
            body["language"] = language
        if version:
            body["version"] = int(version)
        client: ServiceClient = _dep(request, lambda w: w.templates)
        # The template service renders it, sandboxed, exactly as a delivery would.
        reply = await client.call("POST", f"/api/v1/templates/{quote(code, safe='')}/render", body)
        if reply.status == 200:
            rendered = reply.data
        else:
            problem = reply.message or f"The template service answered {reply.status}."
    return render(
        request,
        "template.html",
        status=200 if problem is None else 422,
        **context,
        variables=raw_variables,
        preview=rendered,
        preview_error=problem,
        chosen_language=language,
        chosen_version=version,
    )


def _version_of(request: web.Request) -> tuple[str, int, str]:
    code = request.match_info["code"]
    raw = request.match_info["version"]
    if not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise Refused(404, "Version not found", f"{raw!r} is not a version number.")
    language = request.query.get("language", "")
    return code, int(raw), language


async def activate_confirm(request: web.Request) -> web.Response:
    code, version, language = _version_of(request)
    context = await _template_context(request, code)
    versions = context["languages"].get(language) or []
    target = next((v for v in versions if v["version"] == version), None)
    if target is None:
        raise Refused(
            404, "Version not found", f"Template {code!r} has no version {version} in {language!r}."
        )
    current = next((v for v in versions if v.get("active")), None)
    return render(request, "activate.html", code=code, target=target, current=current, language=language)


async def activate(request: web.Request) -> web.Response:
    code, version, _ = _version_of(request)
    language = str((await request.post()).get("language") or "")
    client: ServiceClient = _dep(request, lambda w: w.templates)
    reply = await client.call(
        "POST",
        f"/api/v1/templates/{quote(code, safe='')}/versions/{version}/activate",
        {"language": language} if language else {},
    )
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "Version")
    log.info(
        "console: template %s (%s) version %s activated by key %s",
        code,
        language,
        version,
        request[SESSION_KEY].subject,
    )
    return _redirect(_with_notice(f"/console/templates/{quote(code, safe='')}", "activated", version))


# --- users ----------------------------------------------------------------------------------------


async def user_lookup(request: web.Request) -> web.Response:
    """The form in the navigation: a user id goes to that user's page."""
    raw = request.query.get("user_id", "").strip()
    user_id = _uuid(raw, "User")
    return _redirect(f"/console/users/{user_id}")


async def user(request: web.Request) -> web.Response:
    user_id = _uuid(request.match_info["user_id"], "User")
    client: ServiceClient = _dep(request, lambda w: w.users)
    reply = await client.get_user(str(user_id))
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "User")
    profile: dict[str, Any] = reply.data or {}
    preferences = dict(profile.get("preferences") or {})
    quiet_hours = preferences.pop("quiet_hours", None)
    store: StatusStore = _dep(request, lambda w: w.store)
    recent = await Queries(store.db).search(q=str(user_id), status=None, after=None, limit=10)
    return render(
        request,
        "user.html",
        u=profile,
        channels=[(k, v) for k, v in preferences.items() if isinstance(v, bool)],
        quiet_hours=quiet_hours if isinstance(quiet_hours, dict) else None,
        devices=profile.get("devices") or [],
        recent=[r for r in recent.rows if r["user_id"] == user_id],
    )


async def save_preferences(request: web.Request) -> web.Response:
    user_id = _uuid(request.match_info["user_id"], "User")
    form = await request.post()
    client: ServiceClient = _dep(request, lambda w: w.users)
    current = await client.call("GET", f"/api/v1/users/{user_id}/preferences")
    if current.status != 200:
        raise _service_failed(current.status, current.message, "User")
    # Only the channel switches this form shows; anything else in the preferences stays as is.
    channels = [k for k, v in (current.data or {}).items() if isinstance(v, bool)]
    body = {channel: form.get(f"pref_{channel}") == "on" for channel in channels}
    reply = await client.call("PUT", f"/api/v1/users/{user_id}/preferences", body)
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "User")
    log.info(
        "console: preferences of user %s set to %s by key %s", user_id, body, request[SESSION_KEY].subject
    )
    return _redirect(_with_notice(f"/console/users/{user_id}", "preferences_saved"))


async def remove_device(request: web.Request) -> web.Response:
    user_id = _uuid(request.match_info["user_id"], "User")
    device_id = _uuid(request.match_info["device_id"], "Device")
    client: ServiceClient = _dep(request, lambda w: w.users)
    reply = await client.call("DELETE", f"/api/v1/users/{user_id}/devices/{device_id}")
    if reply.status not in (200, 204):
        raise _service_failed(reply.status, reply.message, "Device")
    log.info(
        "console: device %s of user %s removed by key %s", device_id, user_id, request[SESSION_KEY].subject
    )
    return _redirect(_with_notice(f"/console/users/{user_id}", "device_removed"))


# --- the application -----------------------------------------------------------------------------


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    if isinstance(value, str):
        try:
            return _when(datetime.fromisoformat(value))
        except ValueError:
            return value
    return "" if value is None else str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["short"] = lambda value: str(value)[:8]
    env.globals["quote"] = lambda value: quote(str(value), safe="")
    env.globals["static"] = _static_url
    return env


def _static_url(name: str) -> str:
    # The file's hash in the address: browsers may keep it for long, and a change is a new URL.
    digest = hashlib.sha256((HERE / "static" / name).read_bytes()).hexdigest()[:12]
    return f"/console/static/{name}?v={digest}"


def create_app(wiring: Wiring) -> web.Application:
    """The console, to be mounted with `app.add_subapp("/console", ...)`."""
    app = web.Application(middlewares=[pages, signed_in])
    app[WIRING_KEY] = wiring
    app[ENV_KEY] = _environment()
    r = app.router
    r.add_get("", overview)
    r.add_get("/", overview)
    r.add_get("/sign-in", sign_in_page)
    r.add_post("/sign-in", sign_in)
    r.add_post("/sign-out", sign_out)
    r.add_get("/notifications", notifications)
    r.add_get("/notifications/{notification_id}", notification)
    r.add_post("/notifications/{notification_id}/retry", retry_one)
    r.add_post("/notifications/{notification_id}/cancel", cancel_one)
    r.add_get("/failures", failures)
    r.add_post("/failures/retry", retry_selected)
    r.add_get("/templates", templates)
    r.add_get("/templates/{code}", template)
    r.add_post("/templates/{code}/preview", preview)
    r.add_get("/templates/{code}/versions/{version}/activate", activate_confirm)
    r.add_post("/templates/{code}/versions/{version}/activate", activate)
    r.add_get("/users", user_lookup)
    r.add_get("/users/{user_id}", user)
    r.add_post("/users/{user_id}/preferences", save_preferences)
    r.add_post("/users/{user_id}/devices/{device_id}/remove", remove_device)
    r.add_static("/static", HERE / "static", append_version=False)
    return app
