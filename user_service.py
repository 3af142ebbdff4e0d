"""User service (:8001): users, per-channel preferences, push devices, login.

PostgreSQL `users_db` is the record; what other services read about a user (address,
preferences, devices, language) is cached in Redis and invalidated on every write. Callers are
the gateway and workers (internal token) or a user acting on their own data (access token).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import orjson
import redis.asyncio as aioredis
from aiohttp import web

from common import auth, db, resources
from common.cache import ProfileCache
from common.channels import CHANNELS
from common.config import Config, load_config
from common.http import (
    CONFIG_KEY,
    METRICS_KEY,
    ApiError,
    base_app,
    json_response,
    not_found,
    page_meta,
    paging,
    read_json,
    validation_error,
)
from common.logs import setup_logging
from common.ratelimit import RateLimiter
from common.runner import run
from common.schedule import quiet_hours_field
from common.validation import (
    Fields,
    b64url_decode,
    parse_uuid,
)

log = logging.getLogger("user_service")

DB_KEY = web.AppKey("users_db", db.Database)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)
PLATFORMS = ("fcm", "onesignal", "webpush")
# Printable ASCII, and short enough that (user, platform, token) fits a unique-index entry
# (PostgreSQL refuses entries above ~2,700 bytes). Real tokens are ASCII: FCM ~160 characters,
# OneSignal a UUID, a Web Push endpoint a URL.
TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
MAX_TOKEN = 2048
_USER_COLUMNS = "id, name, email, preferences, language, timezone, created_at, updated_at"


# --- passwords: scrypt, salted, run off the event loop --------------------------------------

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
# Each hash costs ~16 MB and tens of ms of a core: at most this many at once, whatever the
# number of logins arriving, and a bounded queue behind them (beyond it: 429, try again).
HASH_THREADS = 2
HASH_QUEUE = 32
_HASH_POOL = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="scrypt")
_hash_waiting = 0


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 * 1024**2, **_SCRYPT)


async def _run_scrypt(password: str, salt: bytes) -> bytes:
    global _hash_waiting
    if _hash_waiting >= HASH_QUEUE:
        raise ApiError(
            429,
            "rate_limited",
            "Too many password checks at once; try again in a second.",
            headers={"Retry-After": "1"},
        )
    _hash_waiting += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_HASH_POOL, _scrypt, password, salt)
    finally:
        _hash_waiting -= 1


async def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = await _run_scrypt(password, salt)
    return f"scrypt${salt.hex()}${digest.hex()}"


async def check_password(password: str, stored: str) -> bool:
    _, salt, digest = stored.split("$")
    candidate = await _run_scrypt(password, bytes.fromhex(salt))
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


# A fixed hash to check against when the email is unknown, so both failures cost the same time.
_DUMMY_HASH = "scrypt$" + "00" * 16 + "$" + "00" * 32


# --- the cache ---------------------------------------------------------------------------------


CACHE_KEY = web.AppKey("profile_cache", ProfileCache)
LOGIN_LIMITER_KEY = web.AppKey("login_limiter", RateLimiter)


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    app[CACHE_KEY] = ProfileCache(app[REDIS_KEY], app[METRICS_KEY])
    config = app[CONFIG_KEY]
    app[LOGIN_LIMITER_KEY] = RateLimiter(app[REDIS_KEY], config.login_rate_limit, config.login_rate_window)
    yield


# --- auth ----------------------------------------------------------------------------------------


def _resolve(request: web.Request, presented: str) -> auth.Principal:
    """The internal token may do anything; a user's access token reaches only that user."""
    config = request.app[CONFIG_KEY]
    if auth.matches(config.internal_api_token, presented):
        return auth.Principal("internal", "internal")
    if request.path.startswith("/api/v1/auth/"):
        raise auth.unauthorized()  # login is reached through the gateway only
    user_id = auth.verify_access_token(config.jwt_secret, presented)
    if user_id is None:
        raise auth.unauthorized()
    principal = auth.Principal("user", user_id)
    target = request.match_info.get("user_id")
    if target is None or not principal.may_access_user(target):
        raise auth.forbidden()
    return principal


# --- helpers -------------------------------------------------------------------------------------


def _user_id(request: web.Request) -> uuid.UUID:
    user_id = parse_uuid(request.match_info["user_id"])
    if user_id is None:
        raise not_found("User")
    return user_id


def _preferences(fields: Fields, name: str, *, partial: bool) -> dict[str, Any] | None:
    value = fields.body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        fields.error(name, 'must be an object like {"email": true, "push": false}')
        return None
    prefs: dict[str, Any] = {}
    for channel, enabled in value.items():
        if channel == "quiet_hours":
            # In the user's time zone; null turns them off (stored as null, so a merge clears them).
            inner = Fields(value)
            prefs[channel] = quiet_hours_field(inner)
            for field, message in inner.errors.items():
                fields.error(f"{name}.{field}", message)
        elif channel not in CHANNELS:
            known = ", ".join([*CHANNELS, "quiet_hours"])
            fields.error(f"{name}.{channel}", f"is not a preference; use one of {known}")
        elif not isinstance(enabled, bool):
            fields.error(f"{name}.{channel}", "must be true or false")
        else:
            prefs[channel] = enabled
    if not partial:
        for channel in CHANNELS:
            prefs.setdefault(channel, True)
    return prefs


def _timezone(fields: Fields) -> str | None:
    value = fields.string("timezone", required=False, max_len=64)
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ValueError, KeyError, OSError):
        fields.error("timezone", "must be an IANA time zone like Europe/Lisbon")
        return None
    return value


def _device(body: dict[str, Any], allowed_hosts: tuple[str, ...]) -> tuple[str, str, dict[str, Any] | None]:
    """Validate a device registration; returns (platform, token, subscription)."""
    fields = Fields(body)
    fields.unknown({"platform", "token", "subscription"})
    platform = fields.string("platform", max_len=16)
    if platform is not None and platform not in PLATFORMS:
        fields.error("platform", f"must be one of {', '.join(PLATFORMS)}")
    fields.check()
    if platform == "webpush":
        sub = fields.object("subscription", required=True)
        fields.check()
        endpoint = sub.get("endpoint")
        endpoint = endpoint if isinstance(endpoint, str) else ""
        url = urlsplit(endpoint)
        # Plain http only for hosts the operator allow-listed (a local push service in tests).
        allowed = url.scheme == "https" or (url.scheme == "http" and (url.hostname or "") in allowed_hosts)
        if not allowed or not url.hostname:
            fields.error("subscription.endpoint", "must be an https URL")
        elif len(endpoint) > MAX_TOKEN or not TOKEN_RE.match(endpoint):
            fields.error("subscription.endpoint", f"must be at most {MAX_TOKEN} ASCII characters")
        keys = sub.get("keys")
        keys = {k: v for k, v in keys.items() if isinstance(v, str)} if isinstance(keys, dict) else {}
        p256dh = b64url_decode(keys.get("p256dh", ""))
        if p256dh is None or len(p256dh) != 65 or p256dh[0] != 4:
            fields.error("subscription.keys.p256dh", "must be base64url of a 65-byte P-256 public key")
        secret = b64url_decode(keys.get("auth", ""))
        if secret is None or len(secret) != 16:
            fields.error("subscription.keys.auth", "must be base64url of a 16-byte secret")
        fields.check()
        subscription = {"endpoint": endpoint, "keys": {"p256dh": keys["p256dh"], "auth": keys["auth"]}}
        return "webpush", endpoint, subscription
    token = fields.string("token", max_len=MAX_TOKEN, pattern=TOKEN_RE, hint="must be printable ASCII")
    fields.check()
    assert platform is not None and token is not None
    return platform, token, None


async def _load_profile(database: db.Database, user_id: uuid.UUID) -> dict[str, Any] | None:
    user = await database.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", user_id)
    if user is None:
        return None
    user["devices"] = await database.fetch(
        "SELECT id, platform, token, subscription, created_at FROM devices"
        " WHERE user_id = %s ORDER BY created_at, id",
        user_id,
    )
    return user


async def _profile(request: web.Request, user_id: uuid.UUID) -> dict[str, Any]:
    cache = request.app[CACHE_KEY]
    profile = await cache.get(user_id)
    if profile is None:
        profile = await _load_profile(request.app[DB_KEY], user_id)
        if profile is None:
            raise not_found("User")
        # Round-trip through JSON so the cached and uncached answers are the same shape.
        profile = orjson.loads(orjson.dumps(profile))
        await cache.put(user_id, profile)
    return profile


async def _add_device(
    database: db.Executor, user_id: uuid.UUID, platform: str, token: str, sub: dict[str, Any] | None
) -> dict[str, Any]:
    # The same token registered twice is one device: the second call returns the first row.
    row = await database.fetchrow(
        """
        INSERT INTO devices (user_id, platform, token, subscription) VALUES (%s, %s, %s, %s)
        ON CONFLICT (user_id, platform, token) DO UPDATE SET subscription = EXCLUDED.subscription
        RETURNING id, platform, token, subscription, created_at
        """,
        user_id,
        platform,
        token,
        db.Json(sub) if sub is not None else None,
    )
    assert row is not None
    return row


# --- handlers ------------------------------------------------------------------------------------


async def create_user(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"name", "email", "password", "push_token", "preferences", "language", "timezone"})
    name = fields.string("name", max_len=200)
    email = fields.email("email")
    password = fields.string("password", min_len=8, max_len=256)
    push_token = fields.string(
        "push_token", required=False, max_len=MAX_TOKEN, pattern=TOKEN_RE, hint="must be printable ASCII"
    )
    prefs = _preferences(fields, "preferences", partial=False) or dict.fromkeys(CHANNELS, True)
    language = fields.language() or "en"
    timezone = _timezone(fields) or "UTC"
    fields.check()
    assert name and email and password
    password_hash = await hash_password(password)
    database = request.app[DB_KEY]
    try:
        async with database.transaction() as tx:
            user = await tx.fetchrow(
                f"INSERT INTO users (name, email, password_hash, preferences, language, timezone)"
                f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_USER_COLUMNS}",
                name,
                email,
                password_hash,
                db.Json(prefs),
                language,
                timezone,
            )
            assert user is not None
            user["devices"] = (
                [await _add_device(tx, user["id"], "fcm", push_token, None)] if push_token else []
            )
    except db.UniqueViolation:
        raise ApiError(409, "conflict", f"A user with email {email!r} already exists.") from None
    return json_response(user, "user created", status=201)


async def list_users(request: web.Request) -> web.Response:
    if request[auth.PRINCIPAL_KEY].kind != "internal":
        raise auth.forbidden()
    page, limit = paging(request)
    database = request.app[DB_KEY]
    total = await database.fetchval("SELECT count(*) FROM users")
    rows = await database.fetch(
        f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, id LIMIT %s OFFSET %s",
        limit,
        (page - 1) * limit,
    )
    return json_response(rows, "users", meta=page_meta(int(total), limit, page))


MAX_LOOKUP = 1000


async def lookup_users(request: web.Request) -> web.Response:
    """`POST /api/v1/users/lookup {ids: [...]}`, internal token only: the profiles of many users
    in two queries (bulk sends and topic fan-outs); ids that do not exist are left out."""
    if request[auth.PRINCIPAL_KEY].kind != "internal":
        raise auth.forbidden()
    ids = (await read_json(request)).get("ids")
    if not isinstance(ids, list) or len(ids) > MAX_LOOKUP:
        raise validation_error({"ids": f"must be a list of at most {MAX_LOOKUP} user ids"})
    wanted = [u for raw in ids if isinstance(raw, str) and (u := parse_uuid(raw)) is not None]
    database = request.app[DB_KEY]
    users = await database.fetch(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ANY(%s)", wanted)
    devices = await database.fetch(
        "SELECT user_id, id, platform, token, subscription, created_at FROM devices"
        " WHERE user_id = ANY(%s) ORDER BY created_at, id",
        wanted,
    )
    by_user: dict[Any, list[dict[str, Any]]] = {}
    for device in devices:
        by_user.setdefault(device.pop("user_id"), []).append(device)
    for user in users:
        user["devices"] = by_user.get(user["id"], [])
    # Cached as a single read caches them: the worker delivering to each of these users next
    # (a bulk send or fan-out, one message per user) then finds the profile in Redis instead
    # of calling this service once per message.
    await request.app[CACHE_KEY].put_many(users)
    return json_response(users, "users")


async def get_user(request: web.Request) -> web.Response:
    return json_response(await _profile(request, _user_id(request)), "user")


async def update_user(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"name", "email", "password", "preferences", "language", "timezone"})
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = fields.string("name", max_len=200)
    if "email" in body:
        changes["email"] = fields.email("email")
    if "password" in body:
        password = fields.string("password", min_len=8, max_len=256)
    if "language" in body:
        changes["language"] = fields.language()
    if "timezone" in body:
        changes["timezone"] = _timezone(fields)
    prefs = _preferences(fields, "preferences", partial=True)
    fields.check()
    if "password" in body:
        changes["password_hash"] = await hash_password(password or "")
    sets = [f"{column} = %s" for column in changes]
    args: list[Any] = list(changes.values())
    if prefs:
        sets.append("preferences = preferences || %s")
        args.append(db.Json(prefs))
    database = request.app[DB_KEY]
    try:
        row = await database.fetchrow(
            f"UPDATE users SET {', '.join([*sets, 'updated_at = now()'])} WHERE id = %s RETURNING id",
            *args,
            user_id,
        )
    except db.UniqueViolation:
        raise ApiError(409, "conflict", f"A user with email {changes['email']!r} already exists.") from None
    if row is None:
        raise not_found("User")
    await request.app[CACHE_KEY].invalidate(user_id)
    return json_response(await _profile(request, user_id), "user updated")


async def delete_user(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    # Devices go with the user (ON DELETE CASCADE), and so does the cached profile.
    deleted = await request.app[DB_KEY].execute("DELETE FROM users WHERE id = %s", user_id)
    await request.app[CACHE_KEY].invalidate(user_id)
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
    prefs = _preferences(fields, "preferences", partial=True)
    if fields.errors:
        # Name the field as the caller sent it: "email", not "preferences.email".
        fields.errors = {k.removeprefix("preferences."): v for k, v in fields.errors.items()}
    fields.check()
    if not prefs:
        fields.error("email", 'send at least one channel, e.g. {"email": false}')
        fields.check()
    row = await request.app[DB_KEY].fetchrow(
        "UPDATE users SET preferences = preferences || %s, updated_at = now() WHERE id = %s"
        " RETURNING preferences",
        db.Json(prefs),
        user_id,
    )
    await request.app[CACHE_KEY].invalidate(user_id)
    if row is None:
        raise not_found("User")
    return json_response(row["preferences"], "preferences updated")


async def add_device(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    config = request.app[CONFIG_KEY]
    platform, token, subscription = _device(await read_json(request), config.webpush_allowed_hosts)
    async with request.app[DB_KEY].transaction() as tx:
        # The user's row is locked so two registrations at once cannot both pass the cap.
        if await tx.fetchval("SELECT 1 FROM users WHERE id = %s FOR UPDATE", user_id) is None:
            raise not_found("User")
        count = await tx.fetchval(
            "SELECT count(*) FILTER (WHERE NOT (platform = %s AND token = %s)) FROM devices"
            " WHERE user_id = %s",
            platform,
            token,
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
        device = await _add_device(tx, user_id, platform, token, subscription)
    await request.app[CACHE_KEY].invalidate(user_id)
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
            "DELETE FROM devices WHERE id = %s AND user_id = %s", device_id, user_id
        )
    if not deleted:
        raise not_found("Device")
    await request.app[CACHE_KEY].invalidate(user_id)
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


async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = Fields(body)
    email = fields.string("email", max_len=254)
    password = fields.string("password", max_len=256)
    fields.check()
    assert email is not None and password is not None
    await _throttle_login(request, email)
    row = await request.app[DB_KEY].fetchrow(
        "SELECT id, password_hash FROM users WHERE lower(email) = lower(%s)", email
    )
    valid = await check_password(password, row["password_hash"] if row else _DUMMY_HASH)
    if row is None or not valid:
        raise ApiError(401, "invalid_credentials", "Email or password is wrong.")
    config = request.app[CONFIG_KEY]
    token = auth.issue_access_token(config.jwt_secret, row["id"], config.jwt_ttl_seconds)
    return json_response(
        {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": config.jwt_ttl_seconds,
            "user_id": row["id"],
        },
        "logged in",
    )


def create_app(config: Config) -> web.Application:
    app = base_app("user_service", config)
    app.middlewares.append(auth.middleware(_resolve))
    app.cleanup_ctx.append(resources.database(DB_KEY, lambda c: c.users_db_url, "postgres"))
    app.cleanup_ctx.append(resources.redis_client(REDIS_KEY))
    app.cleanup_ctx.append(cache_ctx)
    r = app.router
    for path in ("/api/v1/users", "/api/v1/users/"):
        r.add_post(path, create_user)
        r.add_get(path, list_users)
    r.add_post("/api/v1/users/lookup", lookup_users)
    r.add_get("/api/v1/users/{user_id}", get_user)
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
