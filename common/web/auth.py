"""Credentials: client API keys (hashed, compared in constant time), the internal service token,
and users' access tokens (JWT, HS256)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import jwt
from aiohttp import web

from common.keys import PRINCIPAL_KEY, WRONG_KEYS_KEY
from common.logs import DEFAULT_PROJECT, PROJECT_HEADER, project_var
from common.web.http import ApiError


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


# A project's name: what `GATEWAY_API_KEYS` entries (`project:key`), tokens and `X-Project` carry.
PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Principal:
    kind: str  # "client" (API key), "internal" (service token) or "user" (access token)
    subject: str  # the client's project, "internal", or the user's id
    project: str = DEFAULT_PROJECT  # whose data this principal sees and changes

    def may_access_user(self, user_id: str) -> bool:
        return self.kind != "user" or self.subject == user_id


def issue_access_token(
    secret: str, user_id: uuid.UUID | str, ttl: int, project: str = DEFAULT_PROJECT
) -> str:
    """A user's access token: that user of that project, nothing else (login and the tokens a
    client's backend mints for its signed-in user are the same kind)."""
    now = int(time.time())
    claims = {"sub": str(user_id), "prj": project, "iat": now, "exp": now + ttl, "typ": "access"}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_access_token(secret: str, token: str) -> Principal | None:
    """The user (and project) of a valid, unexpired access token; None for anything else."""
    if not secret or token.count(".") != 2:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        return None
    project = claims.get("prj", DEFAULT_PROJECT)
    if claims.get("typ") != "access" or not isinstance(project, str) or not PROJECT_RE.match(project):
        return None
    return Principal("user", str(claims["sub"]), project)


def project_header(request: web.Request) -> str:
    """The project a service-to-service call acts for (`X-Project`, "default" without one);
    a 400 for a malformed one."""
    raw = request.headers.get(PROJECT_HEADER)
    if raw is None:
        return DEFAULT_PROJECT
    if not PROJECT_RE.match(raw):
        raise ApiError(
            400,
            "validation_error",
            "Invalid X-Project header.",
            data={"fields": {PROJECT_HEADER: "must be a project name"}},
        )
    return raw


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "Missing or invalid credentials: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
        headers={"WWW-Authenticate": "Bearer"},
    )


def forbidden() -> ApiError:
    return ApiError(403, "forbidden", "These credentials may not access this resource.")


# Given the request and the credential it presented: who that is, or raise unauthorized/forbidden.
Resolver = Callable[[web.Request, str], Principal]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(
    resolve: Resolver, public_prefixes: Iterable[str] = (), ticket_paths: Iterable[str] = ()
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The one authentication middleware: every `/api/` request but the public ones presents a
    credential, the service's resolver says whose it is, and the handler finds the principal
    under PRINCIPAL_KEY.

    A GET of one of `ticket_paths` (exact paths) with a `ticket` query parameter and no
    credential goes on without a principal: its handler authenticates it by the ticket (a
    browser's EventSource cannot send a header), and by nothing else."""
    public = tuple(public_prefixes)
    tickets = frozenset(ticket_paths)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/") or (public and request.path.startswith(public)):
            return await handler(request)
        presented = presented_credential(request)
        if (
            presented is None
            and request.method == "GET"
            and request.path in tickets
            and request.query.get("ticket")
        ):
            return await handler(request)
        if presented is None:
            raise unauthorized()
        guard = request.config_dict.get(WRONG_KEYS_KEY)  # where the service counts wrong keys
        address = request.remote or "unknown"
        if guard is not None and (refused := guard.refusal(address)) is not None:
            raise refused
        try:
            principal = resolve(request, presented)
        except ApiError as exc:
            if guard is not None and exc.status == 401 and presented.count(".") != 2:
                raise (await guard.wrong(address)) or exc from None
            raise
        request[PRINCIPAL_KEY] = principal
        # Every call this request makes to another service acts for the principal's project.
        token = project_var.set(principal.project)
        try:
            return await handler(request)
        finally:
            project_var.reset(token)

    return authenticate


def require(request: web.Request, *kinds: str) -> Principal:
    """The caller's principal, if it is one of `kinds`; 403 otherwise."""
    principal = request[PRINCIPAL_KEY]
    if principal.kind not in kinds:
        raise forbidden()
    return principal
