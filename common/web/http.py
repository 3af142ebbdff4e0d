"""What every service shares as an HTTP server: the envelope, errors, middlewares, /health,
/metrics, and the base application they are wired on."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.config import Config
from common.data.db import DataError, IntegrityError, OperationalError, ProgramLimitExceeded
from common.event_loop import stale_handle
from common.keys import CONFIG_KEY, HEALTH_KEY, METRICS_KEY, SERVICE_KEY
from common.logs import CORRELATION_HEADER, correlation_id_var, install_record_factory
from common.lookups.clients import ServiceUnavailable
from common.metrics import Metrics

log = logging.getLogger(__name__)


_INPUT_ERRORS = (DataError, ProgramLimitExceeded)
MAX_PAGE = 1000  # OFFSET paging stops here; beyond it, the `after` cursor
_CORRELATION_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ApiError(Exception):
    """A domain error with its HTTP status and stable machine code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.data = data
        self.headers = headers


def validation_error(fields: Mapping[str, str]) -> ApiError:
    names = ", ".join(fields)
    return ApiError(400, "validation_error", f"Invalid fields: {names}.", data={"fields": fields})


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} was not found.")


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def json_response(
    data: Any = None,
    message: str = "",
    *,
    status: int = 200,
    meta: Mapping[str, Any] | None = None,
    error: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {
        "success": error is None,
        "data": data,
        "error": error,
        "message": message,
        "meta": meta,
    }
    return web.Response(body=dumps(body), status=status, content_type="application/json", headers=headers)


def page_meta(total: int, limit: int, page: int) -> dict[str, Any]:
    total_pages = (total + limit - 1) // limit
    return {
        "total": total,
        "limit": limit,
        "page": page,
        "total_pages": total_pages,
        "has_next": page < total_pages,
        "has_previous": page > 1,
    }


_ASCII_INT = re.compile(r"^[0-9]{1,18}$")
PG_INT_MAX = 2**31 - 1  # the largest value of an `integer` column


def strict_int(raw: str | None, low: int = 1, high: int = PG_INT_MAX) -> int | None:
    """ASCII digits within [low, high], else None. `int()` alone takes other scripts' digits,
    spaces, signs and underscores (and `isdigit()` passes "²", which `int()` then refuses); a
    value past the column's range would be a database error rather than a 404."""
    if raw is None or not _ASCII_INT.match(raw):
        return None
    value = int(raw)
    return value if low <= value <= high else None


def cursor_meta(limit: int, page: int | None, has_next: bool, next_cursor: str | None) -> dict[str, Any]:
    """`meta` of a list that is not counted (a large table): `total` and `total_pages` are null,
    `next` is the `after` cursor of the following page."""
    return {
        "total": None,
        "limit": limit,
        "page": page,
        "total_pages": None,
        "has_next": has_next,
        "has_previous": bool(page and page > 1),
        "next": next_cursor,
    }


def paging(request: web.Request, max_limit: int = 100) -> tuple[int, int]:
    errors: dict[str, str] = {}
    values: dict[str, int] = {}
    for name, default, upper in (("page", 1, MAX_PAGE), ("limit", 20, max_limit)):
        value = strict_int(request.query.get(name, str(default)), 1, upper)
        if value is None:
            errors[name] = f"must be a whole number from 1 to {upper}"
            continue
        values[name] = value
    if errors:
        raise validation_error(errors)
    return values["page"], values["limit"]


MAX_JSON_DEPTH = 32  # levels of nesting inside one field of a request body
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value nests more than `limit` levels (iteratively: a deep value
    must not exhaust the interpreter's stack while we measure it)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _deep_field(raw: bytes) -> str:
    """The top-level field of a body too deep for the parser to decode. Only on that refusal:
    one pass over at most the body size (client_max_size)."""
    depth, last_string, field = 0, b"", "body"
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token.startswith(b'"'):
            if depth == 1:
                last_string = token
        elif token in (b"{", b"["):
            if depth == 1:
                field = last_string.strip(b'"').decode(errors="replace")[:100] or "body"
            depth += 1
            if depth > MAX_JSON_DEPTH + 1:
                return field
        else:
            depth -= 1
    return field


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc).lower() or "recursion" in str(exc).lower():
            raise validation_error(
                {_deep_field(raw): f"is nested deeper than {MAX_JSON_DEPTH} levels"}
            ) from None
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    deep = {
        name: f"is nested deeper than {MAX_JSON_DEPTH} levels"
        for name, value in body.items()
        if isinstance(value, dict | list) and _deeper_than(value, MAX_JSON_DEPTH)
    }
    if deep:
        raise validation_error(deep)
    return body


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "rate_limited",
    503: "service_unavailable",
}


@web.middleware
async def correlation_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    incoming = request.headers.get(CORRELATION_HEADER, "")
    correlation_id = incoming if _CORRELATION_RE.match(incoming) else uuid.uuid4().hex
    token = correlation_id_var.set(correlation_id)
    try:
        response = await handler(request)
    finally:
        correlation_id_var.reset(token)
    response.headers[CORRELATION_HEADER] = correlation_id
    return response


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.data, exc.message, status=exc.status, error=exc.code, headers=exc.headers)
    except ServiceUnavailable as exc:
        log.warning("%s", exc)
        return json_response(
            None,
            f"{exc}; please retry shortly.",
            status=503,
            error="service_unavailable",
            headers={"Retry-After": "1"},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "error")
        message = {
            404: f"No route for {request.method} {request.path}.",
            405: f"{request.method} is not allowed on {request.path}.",
            413: "The request body is too large.",
        }.get(exc.status, exc.reason)
        return json_response(None, message, status=exc.status, error=code)
    except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError) as exc:
        return _dependency_unavailable(exc)
    except Exception as exc:
        refused = _input_error(exc)
        if refused is not None:
            log.warning("input refused by the database: %s", type(exc).__name__)
            return json_response(None, refused.message, status=refused.status, error=refused.code)
        if stale_handle(exc):
            # A connection that could not be made (common/event_loop.py): retried, not a 500.
            return _dependency_unavailable(exc)
        if _is_db_unavailable(exc):
            log.warning("database unavailable: %s", exc)
            return json_response(
                None,
                "The database is unavailable; please retry shortly.",
                status=503,
                error="service_unavailable",
                headers={"Retry-After": "1"},
            )
        log.exception("unexpected error on %s %s", request.method, request.path)
        return json_response(None, "Internal error.", status=500, error="internal_error")


def _dependency_unavailable(exc: BaseException) -> web.Response:
    """A dependency (database, broker, another service) did not answer: not our bug, and the
    caller can try again. Logged once with the correlation id."""
    log.warning("dependency unavailable: %s: %s", type(exc).__name__, exc)
    return json_response(
        None,
        "A dependency is unavailable; please retry shortly.",
        status=503,
        error="service_unavailable",
        headers={"Retry-After": "1"},
    )


def _is_db_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and not isinstance(exc, _INPUT_ERRORS)


def _input_error(exc: BaseException) -> ApiError | None:
    """A database refusal caused by what the client sent: a 4xx it can act on, not a 503 it
    would retry forever. Validation should have caught it first; this is the safety net."""
    if isinstance(exc, IntegrityError):
        return ApiError(409, "conflict", "That conflicts with data that already exists.")
    if isinstance(exc, _INPUT_ERRORS):
        return ApiError(400, "invalid_input", "A value is out of range or too large to store.")
    return None


def metrics_middleware(metrics: Metrics) -> Any:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            metrics.http_requests.labels(request.method, route, str(status)).inc()
            metrics.http_latency.labels(request.method, route).observe(time.perf_counter() - started)

    return middleware


# A check raises when its dependency is down. `critical` decides 503 (critical) or "degraded".
HealthCheck = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Check:
    probe: HealthCheck
    critical: bool = True


async def health(request: web.Request) -> web.Response:
    """Readiness: each dependency probed with a short timeout; 503 names the one that is down."""
    checks: dict[str, Check] = request.app[HEALTH_KEY]

    async def run(check: Check) -> str:
        try:
            await asyncio.wait_for(check.probe(), timeout=2)
        except Exception as exc:  # noqa: BLE001 - any failure means "down", reported by name
            return f"down: {type(exc).__name__}: {exc}"[:300]
        return "ok"

    results = dict(zip(checks, await asyncio.gather(*(run(c) for c in checks.values())), strict=True))
    down = [name for name, result in results.items() if result != "ok"]
    critical_down = [name for name in down if checks[name].critical]
    status = "unavailable" if critical_down else "degraded" if down else "ok"
    message = (
        f"Unavailable: {', '.join(critical_down)} down."
        if critical_down
        else f"Degraded: {', '.join(down)} down."
        if down
        else "All dependencies are up."
    )
    data = {"service": request.app[SERVICE_KEY], "status": status, "checks": results}
    return json_response(
        data,
        message,
        status=503 if critical_down else 200,
        error="service_unavailable" if critical_down else None,
    )


async def liveness(request: web.Request) -> web.Response:
    return json_response({"service": request.app[SERVICE_KEY], "status": "alive"}, "alive")


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def base_app(service: str, config: Config, *, client_max_size: int = 1024**2) -> web.Application:
    """An application with the shared middlewares and the /health, /metrics routes."""
    install_record_factory()
    metrics = Metrics()
    app = web.Application(
        middlewares=[correlation_middleware, metrics_middleware(metrics), error_middleware],
        client_max_size=client_max_size,
    )
    app[SERVICE_KEY] = service
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics
    app[HEALTH_KEY] = {}
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", liveness)
    app.router.add_get("/metrics", metrics_view)
    return app
