"""Console sessions: who signed in, for how long, and the CSRF token their forms carry.

A session is a random id held in Redis (so sign-out ends it everywhere, and every gateway
process sees it) and a cookie that names it, signed with HMAC-SHA256 so a forged or altered
cookie is refused before Redis is asked. The cookie is HttpOnly, SameSite=Strict, Secure when
the console is served over https, and expires with the session.

CSRF: every form carries `csrf_token`, an HMAC of the session id, compared in constant time.
The sign-in form has no session yet; it is protected by a double-submit token (a signed cookie
that the form must repeat).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from aiohttp import web

SESSION_COOKIE = "notify_console"
PRESESSION_COOKIE = "notify_console_signin"
PRESESSION_TTL = 3600
_REDIS_PREFIX = "notify:console:session:"
_FAILURES_PREFIX = "notify:console:signin-failures:"
# Wrong keys one address may try in a window before sign-in refuses it for the rest of it.
SIGNIN_FAILURES_ALLOWED = 10
SIGNIN_FAILURE_WINDOW = 300


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, purpose: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), f"{purpose}\0{payload}".encode(), hashlib.sha256).digest())


def sign(secret: str, purpose: str, value: dict[str, object]) -> str:
    payload = _b64(orjson.dumps(value))
    return f"{payload}.{_mac(secret, purpose, payload)}"


def unsign(secret: str, purpose: str, token: str | None) -> dict[str, object] | None:
    """The signed value if the signature holds and it has not expired (`exp`); else None."""
    if not token or token.count(".") != 1:
        return None
    payload, mac = token.split(".")
    if not hmac.compare_digest(mac, _mac(secret, purpose, payload)):
        return None
    try:
        value = orjson.loads(_unb64(payload))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    expires = value.get("exp")
    if not isinstance(expires, int) or expires < time.time():
        return None
    return value


@dataclass(frozen=True)
class Session:
    sid: str
    subject: str  # which key signed in: the first 16 hex digits of its SHA-256, as the API scopes by
    expires: int
    csrf: str


def csrf_for(secret: str, sid: str) -> str:
    return _mac(secret, "csrf", sid)


def csrf_matches(expected: str, presented: object) -> bool:
    return isinstance(presented, str) and bool(presented) and hmac.compare_digest(expected, presented)


def _secure(request: web.Request, public_base_url: str) -> bool:
    return request.secure or public_base_url.startswith("https://")


def _cookie(
    response: web.StreamResponse, request: web.Request, public_base_url: str, name: str, value: str, ttl: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=ttl,
        path="/console",
        httponly=True,
        samesite="Strict",
        secure=_secure(request, public_base_url),
    )


class Sessions:
    def __init__(self, redis: aioredis.Redis, secret: str, ttl: int, public_base_url: str) -> None:
        self.redis = redis
        self.secret = secret
        self.ttl = ttl
        self.public_base_url = public_base_url

    async def start(self, response: web.StreamResponse, request: web.Request, subject: str) -> Session:
        """A new session (a fresh id, so no id chosen before sign-in survives it)."""
        sid = secrets.token_urlsafe(24)
        expires = int(time.time()) + self.ttl
        await self.redis.set(_REDIS_PREFIX + sid, subject, ex=self.ttl)
        token = sign(self.secret, "session", {"sid": sid, "sub": subject, "exp": expires})
        _cookie(response, request, self.public_base_url, SESSION_COOKIE, token, self.ttl)
        response.del_cookie(PRESESSION_COOKIE, path="/console")
        return Session(sid, subject, expires, csrf_for(self.secret, sid))

    async def current(self, request: web.Request) -> Session | None:
        value = unsign(self.secret, "session", request.cookies.get(SESSION_COOKIE))
        if value is None:
            return None
        sid, subject, expires = value.get("sid"), value.get("sub"), value.get("exp")
        if not isinstance(sid, str) or not isinstance(subject, str) or not isinstance(expires, int):
            return None
        # Signed but signed out (or expired in Redis): the cookie alone is not enough.
        stored = await self.redis.get(_REDIS_PREFIX + sid)
        if stored is None or (stored.decode() if isinstance(stored, bytes) else stored) != subject:
            return None
        return Session(sid, subject, expires, csrf_for(self.secret, sid))

    async def end(self, response: web.StreamResponse, session: Session | None) -> None:
        if session is not None:
            await self.redis.delete(_REDIS_PREFIX + session.sid)
        response.del_cookie(SESSION_COOKIE, path="/console")

    # --- the sign-in form, before there is a session -------------------------------------------

    def presession_token(self, request: web.Request) -> str:
        """The token the sign-in form repeats: the one in its cookie, or a new one."""
        value = unsign(self.secret, "signin", request.cookies.get(PRESESSION_COOKIE))
        nonce = value.get("n") if value else None
        return nonce if isinstance(nonce, str) else secrets.token_urlsafe(24)

    def set_presession(self, response: web.StreamResponse, request: web.Request, nonce: str) -> None:
        token = sign(self.secret, "signin", {"n": nonce, "exp": int(time.time()) + PRESESSION_TTL})
        _cookie(response, request, self.public_base_url, PRESESSION_COOKIE, token, PRESESSION_TTL)

    def presession_matches(self, request: web.Request, presented: object) -> bool:
        value = unsign(self.secret, "signin", request.cookies.get(PRESESSION_COOKIE))
        nonce = value.get("n") if value else None
        return isinstance(nonce, str) and csrf_matches(nonce, presented)

    # --- guessing keys ----------------------------------------------------------------------

    async def signin_attempt(self, address: str) -> bool:
        """Count one sign-in attempt from `address` (one INCR, its expiry set in the same
        transaction) and say whether it may be tried: checked after counting, so attempts made
        at once cannot all pass a check made before any of them counted."""
        key = _FAILURES_PREFIX + address
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, SIGNIN_FAILURE_WINDOW, nx=True)
            count, _ = await pipe.execute()
        return int(count) <= SIGNIN_FAILURES_ALLOWED

    async def signin_succeeded(self, address: str) -> None:
        """A good key does not count against its address."""
        await self.redis.decr(_FAILURES_PREFIX + address)
