"""Credentials: client API keys (hashed, compared in constant time), the internal service token,
and users' access tokens (JWT, HS256)."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import jwt
from aiohttp import web

from common.http import ApiError


def key_id(api_key: str) -> str:
    """What is stored and scoped by: a SHA-256 of the key, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def presented_credential(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = request.headers.get("X-API-Key", "").strip()
    return api_key or None


def matches(secret: str, presented: str) -> bool:
    return bool(secret) and hmac.compare_digest(secret.encode(), presented.encode())


@dataclass(frozen=True)
class Principal:
    kind: str  # "client" (API key), "internal" (service token) or "user" (access token)
    subject: str  # key id, "internal", or the user's id

    def may_access_user(self, user_id: str) -> bool:
        return self.kind != "user" or self.subject == user_id


def issue_access_token(secret: str, user_id: uuid.UUID, ttl: int) -> str:
    now = int(time.time())
    claims = {"sub": str(user_id), "iat": now, "exp": now + ttl, "typ": "access"}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_access_token(secret: str, token: str) -> str | None:
    """The user id of a valid, unexpired access token; None for anything else."""
    if not secret or token.count(".") != 2:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        return None
    return str(claims["sub"]) if claims.get("typ") == "access" else None


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "Missing or invalid credentials: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
        headers={"WWW-Authenticate": "Bearer"},
    )


def forbidden() -> ApiError:
    return ApiError(403, "forbidden", "These credentials may not access this resource.")


PRINCIPAL_KEY = web.RequestKey("principal", Principal)

# Given the request and the credential it presented: who that is, or raise unauthorized/forbidden.
Resolver = Callable[[web.Request, str], Principal]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(
    resolve: Resolver, public_prefixes: Iterable[str] = ()
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The one authentication middleware: every `/api/` request but the public ones presents a
    credential, the service's resolver says whose it is, and the handler finds the principal
    under PRINCIPAL_KEY."""
    public = tuple(public_prefixes)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/") or (public and request.path.startswith(public)):
            return await handler(request)
        presented = presented_credential(request)
        if presented is None:
            raise unauthorized()
        request[PRINCIPAL_KEY] = resolve(request, presented)
        return await handler(request)

    return authenticate


def require(request: web.Request, *kinds: str) -> Principal:
    """The caller's principal, if it is one of `kinds`; 403 otherwise."""
    principal = request[PRINCIPAL_KEY]
    if principal.kind not in kinds:
        raise forbidden()
    return principal
