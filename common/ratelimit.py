"""A fixed-window rate limit per client, counted in Redis so every gateway process shares it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.cache import RedisOutage


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
