"""What the gateway and workers read from Redis instead of asking a service on every notification.

The user service keeps each user's profile (address, preferences, devices, language) in Redis and
deletes it on every change; the template service bumps a generation counter on every template
write. Readers use the profile when it is there and a cached template only while the generation
is unchanged, and ask the service otherwise, so a change is seen by the very next notification.
If Redis is down, every lookup goes to the services.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.clients import Reply, ServiceClient

log = logging.getLogger(__name__)

TEMPLATE_GENERATION_KEY = "notify:templates:generation"
# A cached template is also dropped after this long, in case a generation bump was lost.
TEMPLATE_TTL = 5.0


def user_key(user_id: uuid.UUID | str) -> str:
    return f"notify:user:{user_id}"


async def bump_template_generation(client: aioredis.Redis) -> None:
    try:
        await client.incr(TEMPLATE_GENERATION_KEY)
    except (RedisError, OSError) as exc:
        log.warning(
            "could not signal a template change through Redis (caches expire in %ss): %s", TEMPLATE_TTL, exc
        )


class Lookups:
    def __init__(self, client: aioredis.Redis, users: ServiceClient, templates: ServiceClient) -> None:
        self.client = client
        self.users = users
        self.templates = templates
        self._templates: OrderedDict[tuple[str, str | None], tuple[int, float, dict[str, Any]]] = (
            OrderedDict()
        )
        self._failing = False

    async def _read(self, user_id: str) -> tuple[bytes | None, int | None]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(user_key(user_id))
                pipe.get(TEMPLATE_GENERATION_KEY)
                raw_user, generation = await pipe.execute()
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("redis unavailable, asking the services directly: %s", exc)
                self._failing = True
            return None, None
        self._failing = False
        return raw_user, int(generation or 0)

    async def user(self, user_id: str) -> Reply:
        raw, _ = await self._read(user_id)
        return Reply(200, {"data": orjson.loads(raw)}) if raw else await self.users.get_user(user_id)

    async def user_and_template(self, user_id: str, code: str, language: str | None) -> tuple[Reply, Reply]:
        raw_user, generation = await self._read(user_id)
        key = (code, language)
        cached = self._templates.get(key)
        now = time.monotonic()
        fresh = cached is not None and generation is not None and cached[0] == generation and now < cached[1]
        if raw_user and fresh:
            assert cached is not None
            return Reply(200, {"data": orjson.loads(raw_user)}), Reply(200, {"data": cached[2]})

        async def template() -> Reply:
            if fresh:
                assert cached is not None
                return Reply(200, {"data": cached[2]})
            reply = await self.templates.get_template(code, language)
            if reply.status == 200 and generation is not None:
                self._templates[key] = (generation, now + TEMPLATE_TTL, reply.data)
                self._templates.move_to_end(key)
                if len(self._templates) > 1024:
                    self._templates.popitem(last=False)
            return reply

        async def user() -> Reply:
            return (
                Reply(200, {"data": orjson.loads(raw_user)})
                if raw_user
                else await self.users.get_user(user_id)
            )

        found_user, found_template = await asyncio.gather(user(), template())
        return found_user, found_template
