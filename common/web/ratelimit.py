"""A fixed-window rate limit per client, counted in Redis so every gateway process shares it."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from common.keys import CONFIG_KEY, LIMITER_KEY, PRINCIPAL_KEY, VERDICT_KEY
from common.lookups.cache import RedisOutage
from common.web.auth import Principal
from common.web.http import ApiError


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.reset)))
        return headers


class RateLimiter:
    def __init__(self, client: aioredis.Redis, limit: int, window: float) -> None:
        self.client = client
        self.limit = limit
        self.window = window
        self.outage = RedisOutage("rate limiting off")

    def count(self, subject: str) -> Count | None:
        """The counter one request of `subject` increments, for a caller that sends it to Redis
        in a round trip of its own (the gateway's accept path: one round trip per request)."""
        if self.limit <= 0:
            return None
        now = time.time()
        window = int(now // self.window)
        return Count(self, f"notify:ratelimit:{subject}:{window}", (window + 1) * self.window - now)

    async def check(self, subject: str) -> Verdict | None:
        """Count one request; None when limiting is off or Redis is down (fail open, logged once:
        an outage of the cache must not stop notifications)."""
        counter = self.count(subject)
        if counter is None or self.outage.skip():
            return None
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                counter.add(pipe)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return None
        self.outage.succeeded()
        return counter.verdict(results[0])


@dataclass(frozen=True)
class Count:
    limiter: RateLimiter
    key: str
    reset: float

    def add(self, pipe: Any) -> None:
        """Two commands; the first one's result is the count."""
        pipe.incr(self.key)
        pipe.expire(self.key, max(1, math.ceil(self.limiter.window * 2)))

    def verdict(self, count: int) -> Verdict:
        limit = self.limiter.limit
        return Verdict(count <= limit, limit, max(0, limit - count), self.reset)


# --- wrong credentials per client address ------------------------------------------------------


class WrongKeys:
    """Guessing API keys: the wrong ones presented from one client address, counted in Redis (so
    every gateway process shares the count), past `limit` per `window` refuse that address, with
    right keys too, until the window ends: checked after counting, so guesses sent at once get
    no more tries than the limit. A process remembers an address it has refused, so a blocked
    guesser costs it no Redis round trip (another process learns of the block at its own next
    wrong key: at most one more guess per process). Fails open when Redis is down, as the
    request limit does. Only keys are counted: a credential shaped as a user's token (an expired
    one, say) cannot be a key, and many users of one office share an address."""

    MEMORY = 10_000  # addresses remembered at most; the expired are forgotten first

    def __init__(self, client: aioredis.Redis, limit: int, window: float) -> None:
        self.counter = RateLimiter(client, limit, window)
        self.blocked: dict[str, float] = {}  # address: time.monotonic() its block ends

    def refusal(self, address: str) -> ApiError | None:
        until = self.blocked.get(address)
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            del self.blocked[address]
            return None
        return self._too_many(left)

    async def wrong(self, address: str) -> ApiError | None:
        """Count one wrong key from `address`; the 429 to answer when that is over the limit."""
        verdict = await self.counter.check("wrong-key:" + address)
        if verdict is None or verdict.allowed:
            return None
        if len(self.blocked) >= self.MEMORY:
            now = time.monotonic()
            self.blocked = {a: t for a, t in self.blocked.items() if t > now}
            if len(self.blocked) >= self.MEMORY:
                self.blocked.pop(next(iter(self.blocked)))
        self.blocked[address] = time.monotonic() + verdict.reset
        return self._too_many(verdict.reset)

    def _too_many(self, left: float) -> ApiError:
        return ApiError(
            429,
            "too_many_wrong_keys",
            f"Too many wrong API keys from this address (more than {self.counter.limit} in "
            f"{self.counter.window:g} s); retry after the time in Retry-After.",
            headers={"Retry-After": str(max(1, math.ceil(left)))},
        )


# --- per request, in a service (the gateway) -------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Handlers that count the request themselves, in a Redis round trip they make anyway (the
# accept path counts with its lookups): the middleware leaves them alone.
_SELF_COUNTING: set[Handler] = set()


def counts_itself(handler: Handler) -> Handler:
    _SELF_COUNTING.add(handler)
    return handler


def rate_limited(request: web.Request, verdict: Verdict) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        f"Rate limit of {verdict.limit} requests per {request.config_dict[CONFIG_KEY].rate_limit_window:g}s "
        "exceeded; retry after the time in Retry-After.",
        headers=verdict.headers(),
    )


async def count(request: web.Request, principal: Principal) -> None:
    """Count one request of `principal`; 429 when over the limit (the verdict's headers go on
    the response either way)."""
    verdict = await request.config_dict[LIMITER_KEY].check(f"{principal.kind}:{principal.subject}")
    if verdict is not None:
        request[VERDICT_KEY] = verdict
        if not verdict.allowed:
            raise rate_limited(request, verdict)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every authenticated request counts against its principal's limit, once."""
    principal = request.get(PRINCIPAL_KEY)
    if principal is None:
        return await handler(request)
    if request.match_info.handler not in _SELF_COUNTING:
        await count(request, principal)
    try:
        response = await handler(request)
    except ApiError as exc:
        if (verdict := request.get(VERDICT_KEY)) is not None:
            exc.headers = {**verdict.headers(), **(exc.headers or {})}
        raise
    if (verdict := request.get(VERDICT_KEY)) is not None:
        response.headers.update(verdict.headers())
    return response
