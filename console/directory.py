"""The console's templates (preview, activate a version) and users (preferences, devices) pages."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from common.data.store import StatusStore
from common.keys import (
    CONSOLE_SESSION_KEY,
    STORE_KEY,
    TEMPLATES_KEY,
    USERS_KEY,
)
from common.lookups.clients import ServiceClient
from common.rendering.templating import required_variables
from common.web.http import strict_int
from console.pages import Refused, _project, _redirect, _service_failed, _user_id, _uuid, _with_notice, render
from console.queries import Queries

log = logging.getLogger("console")


# --- templates --------------------------------------------------------------------------------


async def templates(request: web.Request) -> web.Response:
    client: ServiceClient = request.config_dict[TEMPLATES_KEY]
    reply = await client.call("GET", "/api/v1/templates/?limit=100")
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "Templates")
    return render(request, "templates.html", rows=reply.data or [], meta=reply.body.get("meta") or {})


async def _template_context(request: web.Request, code: str) -> dict[str, Any]:
    client: ServiceClient = request.config_dict[TEMPLATES_KEY]
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
    if version and strict_int(version) is None:
        problem = "The version must be a whole number."
    rendered = None
    if problem is None:
        body = {"variables": variables}
        if language:
            body["language"] = language
        if version:
            body["version"] = int(version)
        client: ServiceClient = request.config_dict[TEMPLATES_KEY]
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
    version = strict_int(raw)
    if version is None:
        raise Refused(404, "Version not found", f"{raw!r} is not a version number.")
    language = request.query.get("language", "")
    return code, version, language


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
    client: ServiceClient = request.config_dict[TEMPLATES_KEY]
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
        request[CONSOLE_SESSION_KEY].subject,
    )
    return _redirect(_with_notice(f"/console/templates/{quote(code, safe='')}", "activated", version))


# --- users ----------------------------------------------------------------------------------------


async def user_lookup(request: web.Request) -> web.Response:
    """The form in the navigation: a user id goes to that user's page."""
    raw = request.query.get("user_id", "").strip()
    user_id = _user_id(raw)
    return _redirect(f"/console/users/{quote(user_id, safe='')}")


async def user(request: web.Request) -> web.Response:
    user_id = _user_id(request.match_info["user_id"])
    client: ServiceClient = request.config_dict[USERS_KEY]
    reply = await client.get_user(str(user_id))
    if reply.status != 200:
        raise _service_failed(reply.status, reply.message, "User")
    profile: dict[str, Any] = reply.data or {}
    preferences = dict(profile.get("preferences") or {})
    quiet_hours = preferences.pop("quiet_hours", None)
    store: StatusStore = request.config_dict[STORE_KEY]
    recent = await Queries(store.db, _project(request)).search(
        q=str(user_id), status=None, after=None, limit=10
    )
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
    user_id = _user_id(request.match_info["user_id"])
    form = await request.post()
    client: ServiceClient = request.config_dict[USERS_KEY]
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
        "console: preferences of user %s set to %s by key %s",
        user_id,
        body,
        request[CONSOLE_SESSION_KEY].subject,
    )
    return _redirect(_with_notice(f"/console/users/{user_id}", "preferences_saved"))


async def remove_device(request: web.Request) -> web.Response:
    user_id = _user_id(request.match_info["user_id"])
    device_id = _uuid(request.match_info["device_id"], "Device")
    client: ServiceClient = request.config_dict[USERS_KEY]
    reply = await client.call("DELETE", f"/api/v1/users/{user_id}/devices/{device_id}")
    if reply.status not in (200, 204):
        raise _service_failed(reply.status, reply.message, "Device")
    log.info(
        "console: device %s of user %s removed by key %s",
        device_id,
        user_id,
        request[CONSOLE_SESSION_KEY].subject,
    )
    return _redirect(_with_notice(f"/console/users/{user_id}", "device_removed"))
