"""What every console page shares: the constants, the refusal, the helpers that render, redirect
and read, and the Jinja2 environment."""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from common.keys import (
    CONFIG_KEY,
    CONSOLE_SESSION_KEY,
    CONSOLE_TEMPLATES_KEY,
    KEY_HASHES_KEY,
    KEY_RING_KEY,
    REDIS_KEY,
)
from common.web import auth
from common.web.http import strict_int
from common.web.validation import USER_ID_RE
from console.session import Sessions

log = logging.getLogger("console")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 25
FAILURES_SHOWN = 50


# Reachable without a session: the sign-in page itself and the stylesheet it uses.
_PUBLIC = ("/console/sign-in", "/console/static/")

NOTICES = {
    "retried": "{n} notification(s) requeued for delivery.",
    "not_retried": "Nothing was requeued: only failed notifications can be retried.",
    "cancelled": "The notification is cancelled; it will not be sent.",
    "not_cancelled": "Not cancelled: a worker has it already, or it is final.",
    "run_cancelled": "The run is cancelled: no further step runs, and what it made that was not out"
    " is cancelled too.",
    "run_not_cancelled": "Not cancelled: the run has finished already.",
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


def _sessions(request: web.Request) -> Sessions:
    config = request.config_dict[CONFIG_KEY]
    return Sessions(
        request.config_dict[REDIS_KEY],
        config.console_key,
        config.console_session_ttl,
        config.public_base_url,
    )


def _subjects(request: web.Request) -> list[tuple[str, str]]:
    """(key digest, project) of the keys that may sign in: the gateway's API keys and CONSOLE_KEYS."""
    config = request.config_dict[CONFIG_KEY]
    hashes: tuple[tuple[str, str], ...] = request.config_dict[KEY_HASHES_KEY]
    stored = request.config_dict[KEY_RING_KEY].keys.items()
    return [*hashes, *stored, *((auth.key_id(k), p) for p, k in config.console_client_keys)]


def session_subject(digest: str, project: str) -> str:
    """A session's subject: its project and the key's id (never the key)."""
    return f"{project}:{digest[:16]}"


def session_project(subject: str) -> str:
    """The project a console session sees: one project's, that of the key it signed in with."""
    return subject.partition(":")[0]


def _project(request: web.Request) -> str:
    """The project the signed-in session sees."""
    return session_project(request[CONSOLE_SESSION_KEY].subject)


def _key_matches(request: web.Request, presented: str) -> str | None:
    digest = auth.key_id(presented)
    found = None
    # Every key compared, so the time taken does not tell which one nearly matched.
    for known, project in _subjects(request):
        if hmac.compare_digest(known, digest):
            found = session_subject(digest, project)
    return found


def _local(target: str | None) -> str:
    """Where to go after signing in (or back to after an action): only a console address of this
    site, in printable ASCII, so that nothing (a CR or LF above all) reaches the Location
    header but a path."""
    if (
        target
        and target.startswith("/console")
        and "\\" not in target
        and all("!" <= c <= "~" for c in target)
    ):
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
    return text.format(n=n if strict_int(n, 0) is not None else "")


def render(request: web.Request, name: str, *, status: int = 200, **context: Any) -> web.Response:
    env = request.app[CONSOLE_TEMPLATES_KEY]
    session = request.get(CONSOLE_SESSION_KEY)
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


def _user_id(raw: str) -> str:
    """A user id (the client's own); a 404 page for anything that cannot be one."""
    if not USER_ID_RE.match(raw):
        raise Refused(404, "User not found", f"{raw!r} is not a user id.")
    return raw


def _service_failed(reply_status: int, message: str, what: str) -> Refused:
    if reply_status == 404:
        return Refused(404, f"{what} not found", message or f"This {what.lower()} does not exist.")
    return Refused(502, f"{what} unavailable", message or f"The service answered {reply_status}.")


# --- the environment -------------------------------------------------------------------------


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
