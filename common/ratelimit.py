"""A fixed-window rate limit per client, counted in Redis so every gateway process shares it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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

    async def check(self, subject: str) -> Verdict | None:
        """Count one request; None when limiting is off or Redis is down (fail open, logged once:
        an outage of the cache must not stop notifications)."""
        if self.limit <= 0 or self.outage.skip():
            return None
        now = time.time()
        window = int(now // self.window)
        key = f"notify:ratelimit:{subject}:{window}"
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, max(1, math.ceil(self.window * 2)))
                count, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return None
        self.outage.succeeded()
        reset = (window + 1) * self.window - now
        return Verdict(count <= self.limit, self.limit, max(0, self.limit - count), reset)
