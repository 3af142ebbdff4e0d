"""User service (:8001): users, per-channel preferences, push devices, login.

PostgreSQL `users_db` is the record; what other services read about a user (address,
preferences, devices, language) is cached in Redis and invalidated on every write. Callers are
the gateway and workers (internal token) or a user acting on their own data (access token).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from common import resources
from common.config import Config, load_config
from common.data import db, preferences, users
from common.keys import CONFIG_KEY, DB_KEY, LOGIN_LIMITER_KEY, METRICS_KEY, PROFILE_CACHE_KEY, REDIS_KEY
from common.logs import project_var, setup_logging
from common.lookups.cache import ProfileCache
from common.lookups.clients import LOOKUP_LIMIT
from common.runner import run
from common.sending.schedule import known_zone
from common.web import auth
from common.web.devices import MAX_TOKEN, TOKEN_RE, parse_device
from common.web.http import (
    ApiError,
    base_app,
    json_response,
    not_found,
    page_meta,
    paging,
    read_json,
    validation_error,
)
from common.web.passwords import DUMMY_HASH, check_password, hash_password
from common.web.ratelimit import RateLimiter
from common.web.validation import PHONE_RE, USER_ID_HINT, USER_ID_RE, Fields, parse_uuid

log = logging.getLogger("user_service")

MAX_DATA = 16 * 1024  # bytes of a user's custom attributes (`data`), serialized
MAX_BULK = 1000  # users per bulk identify
IDENTITY = frozenset({"name", "email", "phone", "language", "timezone", "preferences", "data"})


# --- the cache ---------------------------------------------------------------------------------


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    app[PROFILE_CACHE_KEY] = ProfileCache(app[REDIS_KEY], app[METRICS_KEY])
    config = app[CONFIG_KEY]
    app[LOGIN_LIMITER_KEY] = RateLimiter(app[REDIS_KEY], config.login_rate_limit, config.login_rate_window)
    yield


# --- auth ----------------------------------------------------------------------------------------


def _resolve(request: web.Request, presented: str) -> auth.Principal:
    """The internal token may do anything; a user's access token reaches only that user."""
    config = request.app[CONFIG_KEY]
    if auth.matches(config.internal_api_token, presented):
        return auth.Principal("internal", "internal", auth.project_header(request))
    if request.path.startswith("/api/v1/auth/"):
        raise auth.unauthorized()  # login is reached through the gateway only
    principal = auth.verify_access_token(config.jwt_secret, presented)
    if principal is None:
        raise auth.unauthorized()
    target = request.match_info.get("user_id")
    if target is None or not principal.may_access_user(target):
        raise auth.forbidden()
    return principal


# --- helpers -------------------------------------------------------------------------------------


def _user_id(request: web.Request) -> str:
    """The client's own id for the user (USER_ID_RE); a 400 naming `id` for anything else."""
    user_id = request.match_info["user_id"]
    if not USER_ID_RE.match(user_id):
        raise validation_error({"id": USER_ID_HINT})
    return user_id


def _identity(fields: Fields) -> dict[str, Any]:
    """An identify's attributes, those given (a null or absent one is left as it is)."""
    body = fields.body
    given: dict[str, Any] = {}
    if body.get("name") is not None:
        given["name"] = fields.string("name", max_len=200)
    if body.get("email") is not None:
        given["email"] = fields.email("email")
    if body.get("phone") is not None:
        given["phone"] = fields.string(
            "phone", max_len=32, pattern=PHONE_RE, hint="must be a phone number like +351912345678"
        )
    if body.get("language") is not None:
        given["language"] = fields.language()
    if body.get("timezone") is not None:
        given["timezone"] = _timezone(fields)
    prefs = preferences.parse(fields, "preferences", partial=True)
    if prefs:
        given["preferences"] = prefs
    if body.get("data") is not None:
        data = fields.object("data")
        if len(orjson.dumps(data)) > MAX_DATA:
            raise ApiError(
                413,
                "payload_too_large",
                f"data is over {MAX_DATA} bytes.",
                data={"fields": {"data": f"at most {MAX_DATA} bytes of JSON"}},
            )
        given["data"] = data
    return given


def _timezone(fields: Fields) -> str | None:
    value = fields.string("timezone", required=False, max_len=64)
    if value is None:
        return None
    if known_zone(value) is None:
        fields.error("timezone", "must be an IANA time zone like Europe/Lisbon")
        return None
    return value


async def _profile(request: web.Request, user_id: str) -> dict[str, Any]:
    cache = request.app[PROFILE_CACHE_KEY]
    profile = await cache.get(user_id)
    if profile is None:
        profile = await users.load_profile(request.app[DB_KEY], user_id)
        if profile is None:
            raise not_found("User")
        # Round-trip through JSON so the cached and uncached answers are the same shape.
        profile = orjson.loads(orjson.dumps(profile))
        await cache.put(user_id, profile)
    return profile


# --- handlers ------------------------------------------------------------------------------------


async def create_user(request: web.Request) -> web.Response:
    """`POST /api/v1/users/`: with the client's own `id` (409 if it exists), or without one (a
    UUID is assigned, as before ids were the client's); a password only for users who log in."""
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"id", "password", "push_token", *IDENTITY})
    user_id = fields.user_id("id", required=False) or str(uuid.uuid4())
    given = _identity(fields)
    password = fields.string("password", required=False, min_len=8, max_len=256)
    push_token = fields.string(
        "push_token", required=False, max_len=MAX_TOKEN, pattern=TOKEN_RE, hint="must be printable ASCII"
    )
    fields.check()
    password_hash = await hash_password(password) if password else None
    async with request.app[DB_KEY].transaction() as tx:
        user = await tx.fetchrow(
            f"INSERT INTO users (project_id, id, name, email, phone, password_hash, preferences, language,"
            f" timezone, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (project_id, id) DO NOTHING RETURNING {users.USER_COLUMNS}",
            project_var.get(),
            user_id,
            given.get("name"),
            given.get("email"),
            given.get("phone"),
            password_hash,
            db.Json({**users.DEFAULT_PREFERENCES, **given.get("preferences", {})}),
            given.get("language") or "en",
            given.get("timezone") or "UTC",
            db.Json(given.get("data") or {}),
        )
        if user is None:
            raise ApiError(
                409, "conflict", f"User {user_id!r} already exists; PUT /api/v1/users/{{id}} updates."
            )
        user["devices"] = [await users.add_device(tx, user_id, "fcm", push_token, None)] if push_token else []
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    return json_response(user, "user created", status=201)


async def identify_user(request: web.Request) -> web.Response:
    """`PUT /api/v1/users/{id}`: create (201) or update (200) the user, in one call."""
    user_id = _user_id(request)
    fields = Fields(await read_json(request))
    fields.unknown(IDENTITY)
    given = _identity(fields)
    fields.check()
    created, _ = await users.upsert(request.app[DB_KEY], project_var.get(), [{"id": user_id, **given}])
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    profile = await _profile(request, user_id)
    if user_id in created:
        return json_response(profile, "user created", status=201)
    return json_response(profile, "user updated")


async def bulk_identify(request: web.Request) -> web.Response:
    """`POST /api/v1/users/bulk {"users": [...]}`: up to MAX_BULK identifies in a few statements;
    each bad item rejected by its index; an id listed twice counts the first time."""
    if request[auth.PRINCIPAL_KEY].kind != "internal":
        raise auth.forbidden()
    body = await read_json(request)
    items = body.get("users")
    if isinstance(items, list) and len(items) > MAX_BULK:
        raise ApiError(
            413, "too_many_users", f"At most {MAX_BULK} users per request; this one has {len(items)}."
        )
    if not isinstance(items, list) or not items:
        raise validation_error({"users": f"must be a list of 1 to {MAX_BULK} users, each with an id"})
    good: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        raw_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item, dict):
            rejected.append({"index": index, "id": None, "error": "must be an object with an id"})
            continue
        fields = Fields(item)
        fields.unknown({"id", *IDENTITY})
        user_id = fields.user_id("id")
        try:
            given = _identity(fields)
        except ApiError as exc:
            fields.error("data", exc.message)
            given = {}
        if fields.errors:
            problem = "; ".join(f"{k}: {v}" for k, v in fields.errors.items())
            rejected.append({"index": index, "id": raw_id, "error": problem})
        elif user_id in seen:
            rejected.append(
                {"index": index, "id": user_id, "error": f"listed before, at index {seen[user_id]}"}
            )
        else:
            assert user_id is not None
            seen[user_id] = index
            good.append({"id": user_id, **given})
    created, updated = (
        await users.upsert(request.app[DB_KEY], project_var.get(), good) if good else (set(), set())
    )
    await request.app[PROFILE_CACHE_KEY].invalidate_many([u["id"] for u in good])
    return json_response(
        {"created": len(created), "updated": len(updated), "rejected": rejected}, "users identified"
    )


async def user_token(request: web.Request) -> web.Response:
    """`POST /api/v1/users/{id}/token`, for a client's backend (not a user's own token): an
    access token for that user, with the scope of a login (their profile, preferences, devices)."""
    if request[auth.PRINCIPAL_KEY].kind != "internal":
        raise auth.forbidden()
    user_id = _user_id(request)
    await _profile(request, user_id)  # 404 for a user that does not exist
    config = request.app[CONFIG_KEY]
    token = auth.issue_access_token(config.jwt_secret, user_id, config.jwt_ttl_seconds, project_var.get())
    return json_response(
        {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": config.jwt_ttl_seconds,
            "user_id": user_id,
        },
        "token issued",
    )


async def list_users(request: web.Request) -> web.Response:
    if request[auth.PRINCIPAL_KEY].kind != "internal":
        raise auth.forbidden()
    page, limit = paging(request)
    database = request.app[DB_KEY]
    project = project_var.get()
    total = await database.fetchval("SELECT count(*) FROM users WHERE project_id = %s", project)
    rows = await database.fetch(
        f"SELECT {users.USER_COLUMNS} FROM users WHERE project_id = %s"
        " ORDER BY created_at, id LIMIT %s OFFSET %s",
        project,
        limit,
        (page - 1) * limit,
    )
    return json_response(rows, "users", meta=page_meta(int(total), limit, page))


async def lookup_users(request: web.Request) -> web.Response:
    """`POST /api/v1/users/lookup {ids: [...]}`, internal token only: the profiles of many users
    in two queries (bulk sends and topic fan-outs); ids that do not exist are left out."""
    if request[auth.PRINCIPAL_KEY].kind != "internal":
        raise auth.forbidden()
    ids = (await read_json(request)).get("ids")
    if not isinstance(ids, list) or len(ids) > LOOKUP_LIMIT:
        raise validation_error({"ids": f"must be a list of at most {LOOKUP_LIMIT} user ids"})
    wanted = [u for u in ids if isinstance(u, str) and USER_ID_RE.match(u)]
    database = request.app[DB_KEY]
    project = project_var.get()
    found = await database.fetch(
        f"SELECT {users.USER_COLUMNS} FROM users WHERE project_id = %s AND id = ANY(%s)", project, wanted
    )
    devices = await database.fetch(
        "SELECT user_id, id, platform, token, subscription, created_at FROM devices"
        " WHERE project_id = %s AND user_id = ANY(%s) ORDER BY created_at, id",
        project,
        wanted,
    )
    by_user: dict[Any, list[dict[str, Any]]] = {}
    for device in devices:
        by_user.setdefault(device.pop("user_id"), []).append(device)
    for user in found:
        user["devices"] = by_user.get(user["id"], [])
    # Cached as a single read caches them: the worker delivering to each of these users next
    # (a bulk send or fan-out, one message per user) then finds the profile in Redis instead
    # of calling this service once per message.
    await request.app[PROFILE_CACHE_KEY].put_many(orjson.loads(orjson.dumps(found)))
    return json_response(found, "users")


async def get_user(request: web.Request) -> web.Response:
    return json_response(await _profile(request, _user_id(request)), "user")


async def update_user(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"password", *IDENTITY})
    given = _identity(fields)
    if "password" in body:
        password = fields.string("password", min_len=8, max_len=256)
    fields.check()
    prefs = given.pop("preferences", None)
    data = given.pop("data", None)
    changes: dict[str, Any] = dict(given)
    if "password" in body:
        changes["password_hash"] = await hash_password(password or "")
    sets = [f"{column} = %s" for column in changes]
    args: list[Any] = list(changes.values())
    if prefs:
        sets.append(preferences.MERGE_PREFERENCES)
        args.append(db.Json(prefs))
    if data is not None:
        sets.append("data = data || %s")
        args.append(db.Json(data))
    row = await request.app[DB_KEY].fetchrow(
        f"UPDATE users SET {', '.join([*sets, 'updated_at = now()'])} WHERE project_id = %s AND id = %s"
        " RETURNING id",
        *args,
        project_var.get(),
        user_id,
    )
    if row is None:
        raise not_found("User")
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    return json_response(await _profile(request, user_id), "user updated")


async def delete_user(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    # Devices go with the user (ON DELETE CASCADE), and so does the cached profile.
    deleted = await request.app[DB_KEY].execute(
        "DELETE FROM users WHERE project_id = %s AND id = %s", project_var.get(), user_id
    )
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    if not deleted:
        raise not_found("User")
    return json_response({"id": user_id}, "user deleted")


async def get_preferences(request: web.Request) -> web.Response:
    profile = await _profile(request, _user_id(request))
    return json_response(profile["preferences"], "preferences")


async def put_preferences(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    body = await read_json(request)
    fields = Fields({"preferences": body})
    prefs = preferences.parse(fields, "preferences", partial=True)
    if fields.errors:
        # Name the field as the caller sent it: "email", not "preferences.email".
        fields.errors = {k.removeprefix("preferences."): v for k, v in fields.errors.items()}
    fields.check()
    if not prefs:
        fields.error("email", 'send at least one channel, e.g. {"email": false}')
        fields.check()
    row = await request.app[DB_KEY].fetchrow(
        f"UPDATE users SET {preferences.MERGE_PREFERENCES}, updated_at = now()"
        " WHERE project_id = %s AND id = %s RETURNING preferences",
        db.Json(prefs),
        project_var.get(),
        user_id,
    )
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    if row is None:
        raise not_found("User")
    return json_response(row["preferences"], "preferences updated")


async def add_device(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    config = request.app[CONFIG_KEY]
    platform, token, subscription = parse_device(await read_json(request), config.webpush_allowed_hosts)
    async with request.app[DB_KEY].transaction() as tx:
        # The user's row is locked so two registrations at once cannot both pass the cap.
        project = project_var.get()
        found = await tx.fetchval(
            "SELECT 1 FROM users WHERE project_id = %s AND id = %s FOR UPDATE", project, user_id
        )
        if found is None:
            raise not_found("User")
        count = await tx.fetchval(
            "SELECT count(*) FILTER (WHERE NOT (platform = %s AND token = %s)) FROM devices"
            " WHERE project_id = %s AND user_id = %s",
            platform,
            token,
            project,
            user_id,
        )
        if count >= config.max_devices_per_user:
            raise ApiError(
                409,
                "too_many_devices",
                f"A user may register at most {config.max_devices_per_user} push devices"
                " (MAX_DEVICES_PER_USER); remove one first.",
                data={"limit": config.max_devices_per_user},
            )
        device = await users.add_device(tx, user_id, platform, token, subscription)
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    return json_response(device, "device registered", status=201)


async def list_devices(request: web.Request) -> web.Response:
    profile = await _profile(request, _user_id(request))
    return json_response(profile["devices"], "devices")


async def delete_device(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    device_id = parse_uuid(request.match_info["device_id"])
    deleted = 0
    if device_id is not None:
        deleted = await request.app[DB_KEY].execute(
            "DELETE FROM devices WHERE id = %s AND project_id = %s AND user_id = %s",
            device_id,
            project_var.get(),
            user_id,
        )
    if not deleted:
        raise not_found("Device")
    await request.app[PROFILE_CACHE_KEY].invalidate(user_id)
    return json_response({"id": device_id}, "device removed")


def client_address(request: web.Request) -> str:
    """Who is logging in: the address the gateway saw (login is reachable only with the internal
    token, so the header comes from the gateway), else the peer."""
    forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
    return forwarded[:64] or request.remote or "unknown"


async def _throttle_login(request: web.Request, email: str) -> None:
    """LOGIN_RATE_LIMIT tries per LOGIN_RATE_WINDOW per email and per client address, checked
    before the password hash is computed, so guessing costs the guesser, not us."""
    limiter = request.app[LOGIN_LIMITER_KEY]
    subjects = (
        "login:email:" + hashlib.sha256(email.lower().encode()).hexdigest()[:32],
        "login:addr:" + client_address(request),
    )
    for subject in subjects:
        verdict = await limiter.check(subject)
        if verdict is not None and not verdict.allowed:
            raise ApiError(
                429,
                "rate_limited",
                f"Too many login attempts; try again in {verdict.headers()['Retry-After']} s.",
                headers=verdict.headers(),
            )


LOGIN_CANDIDATES = 5  # users of one address with a password whose hash a login checks, at most


async def login(request: web.Request) -> web.Response:
    """Email and password, among the project's users that have a password (`project`, default
    "default"). Several users may share an address: each candidate's password is checked (a
    bounded few); exactly one matching logs in, more than one is `409 ambiguous_login` (the
    client logs them in by id with `POST /api/v1/users/{id}/token` instead)."""
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"email", "password", "project"})
    email = fields.string("email", max_len=254)
    password = fields.string("password", max_len=256)
    project = (
        fields.string(
            "project", required=False, max_len=63, pattern=auth.PROJECT_RE, hint="must be a project name"
        )
        or "default"
    )
    fields.check()
    assert email is not None and password is not None
    await _throttle_login(request, email)
    rows = await request.app[DB_KEY].fetch(
        "SELECT id, password_hash FROM users WHERE project_id = %s AND lower(email) = lower(%s)"
        " AND password_hash IS NOT NULL ORDER BY created_at LIMIT %s",
        project,
        email,
        LOGIN_CANDIDATES,
    )
    matching = []
    for row in rows or [{"id": None, "password_hash": DUMMY_HASH}]:  # the same cost when none
        if await check_password(password, row["password_hash"]) and row["id"] is not None:
            matching.append(row["id"])
    if not matching:
        raise ApiError(401, "invalid_credentials", "Email or password is wrong.")
    if len(matching) > 1:
        raise ApiError(409, "ambiguous_login", "Several users share this email and password; log in by id.")
    config = request.app[CONFIG_KEY]
    token = auth.issue_access_token(config.jwt_secret, matching[0], config.jwt_ttl_seconds, project)
    return json_response(
        {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": config.jwt_ttl_seconds,
            "user_id": matching[0],
        },
        "logged in",
    )


def create_app(config: Config) -> web.Application:
    app = base_app("user_service", config)
    app.middlewares.append(auth.middleware(_resolve))
    app.cleanup_ctx.append(resources.database(lambda c: c.users_db_url, "postgres"))
    app.cleanup_ctx.append(resources.redis_client())
    app.cleanup_ctx.append(cache_ctx)
    r = app.router
    for path in ("/api/v1/users", "/api/v1/users/"):
        r.add_post(path, create_user)
        r.add_get(path, list_users)
    r.add_post("/api/v1/users/lookup", lookup_users)
    r.add_post("/api/v1/users/bulk", bulk_identify)
    r.add_get("/api/v1/users/{user_id}", get_user)
    r.add_put("/api/v1/users/{user_id}", identify_user)
    r.add_post("/api/v1/users/{user_id}/token", user_token)
    r.add_patch("/api/v1/users/{user_id}", update_user)
    r.add_delete("/api/v1/users/{user_id}", delete_user)
    r.add_get("/api/v1/users/{user_id}/preferences", get_preferences)
    r.add_put("/api/v1/users/{user_id}/preferences", put_preferences)
    r.add_post("/api/v1/users/{user_id}/devices", add_device)
    r.add_get("/api/v1/users/{user_id}/devices", list_devices)
    r.add_delete("/api/v1/users/{user_id}/devices/{device_id}", delete_device)
    r.add_post("/api/v1/auth/login", login)
    return app


def main() -> None:
    config = load_config("internal_api_token", "jwt_secret")
    setup_logging("user_service", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8001)


if __name__ == "__main__":
    main()
