"""The operator console: a sub-application the gateway mounts at /console.

Server-rendered (Jinja2, autoescaped), no script but one small file of its own, a CSP that
allows nothing inline. It reads the status store, asks the user and template services through
the gateway's clients, reads queue depths from RabbitMQ, and retries through the gateway's
outbox, all read through `request.config_dict` under the keys of `common/keys.py` (the console
imports no service module). The pages: `notifications.py` (overview, notifications, failures),
`directory.py` (templates, users); what they share, `pages.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from common.data.db import OperationalError
from common.keys import CONSOLE_SESSION_KEY, CONSOLE_TEMPLATES_KEY
from common.logs import project_var
from common.lookups.clients import ServiceUnavailable
from common.web.http import ApiError
from console import workflows
from console.directory import (
    activate,
    activate_confirm,
    preview,
    remove_device,
    save_preferences,
    template,
    templates,
    user,
    user_lookup,
)
from console.notifications import (
    cancel_one,
    failures,
    notification,
    notifications,
    overview,
    retry_one,
    retry_selected,
)
from console.pages import (
    _PUBLIC,
    CSP,
    HERE,
    Refused,
    _environment,
    _key_matches,
    _local,
    _redirect,
    _sessions,
    _subjects,
    _with_notice,
    render,
    session_project,
    session_subject,
)
from console.session import csrf_matches

log = logging.getLogger("console")
RETRY_AFTER = 5  # seconds, on a page answered 503 because a dependency did not answer


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
    except (
        ServiceUnavailable,
        OperationalError,
        RedisError,  # sessions and the sign-in count live in Redis
        aiohttp.ClientError,
        ConnectionError,
        TimeoutError,
    ) as exc:
        log.warning("console: a dependency is unavailable: %s: %s", type(exc).__name__, exc)
        response = _error_page(
            request, 503, "Temporarily unavailable", "A service the console needs did not answer; try again."
        )
        response.headers["Retry-After"] = str(RETRY_AFTER)
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
    if session is not None and session.subject not in {session_subject(d, p) for d, p in _subjects(request)}:
        session = None  # its key was withdrawn
    if session is None:
        target = request.path_qs if request.method == "GET" else "/console"
        return _redirect("/console/sign-in?" + urlencode({"next": target}))
    request[CONSOLE_SESSION_KEY] = session
    if request.method == "POST":
        form = await request.post()  # kept by aiohttp: the handler reads the same form again
        if not csrf_matches(session.csrf, form.get("csrf_token")):
            raise Refused(
                403,
                "Form refused",
                "This form did not carry the console's security token (csrf_token), so nothing was"
                " changed. Reload the page and try again.",
            )
    # What the pages ask the user and template services, they ask for this session's project.
    token = project_var.set(session_project(session.subject))
    try:
        return await handler(request)
    finally:
        project_var.reset(token)


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

    if not await sessions.signin_attempt(address):
        return again(429, "Too many wrong keys from this address; wait a few minutes before trying again.")
    presented = str(form.get("api_key") or "").strip()
    subject = _key_matches(request, presented) if presented else None
    if subject is None:
        log.info("console sign-in refused from %s", address)
        return again(401, "This key is not accepted. Use a client API key or one of CONSOLE_KEYS.")
    await sessions.signin_succeeded(address)
    response = _redirect(target)
    await sessions.start(response, request, subject)
    log.info("console sign-in by key %s", subject)
    return response


async def sign_out(request: web.Request) -> web.Response:
    response = _redirect(_with_notice("/console/sign-in", "signed_out"))
    await _sessions(request).end(response, request.get(CONSOLE_SESSION_KEY))
    return response


def create_app() -> web.Application:
    """The console, to be mounted with `app.add_subapp("/console", ...)`."""
    app = web.Application(middlewares=[pages, signed_in])
    app[CONSOLE_TEMPLATES_KEY] = _environment()
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
    workflows.add_routes(app)
    r.add_static("/static", HERE / "static", append_version=False)
    return app
