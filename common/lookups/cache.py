"""The caches, together: what the gateway and workers read instead of asking a service on every
notification.

The user service keeps each user's profile (address, preferences, devices, language) in Redis and
deletes it on every change; the template service bumps a generation counter on every template
write. Readers use the profile when it is there and a cached template only while the generation
is unchanged, and ask the service otherwise, so a change is seen by the very next notification.
If Redis is down, every lookup goes to the services.

- `ProfileCache`: the user service's side (writes and invalidates the profiles);
- `CachedLookups`: the readers' side (gateway at acceptance, workers at sending);
- `TemplateVersionCache`: pinned template versions in process memory (they never change);
- `profiles`: many users' profiles at once (bulk sends, fan-outs): one MGET of the cache, the
  misses from the user service's batch lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.group_commit import Batcher
from common.logs import project_var
from common.lookups.clients import LOOKUP_LIMIT, Reply, ServiceClient
from common.lru import LRU
from common.metrics import Metrics

log = logging.getLogger(__name__)

TEMPLATE_GENERATION_KEY = "notify:templates:generation"
# A cached template is also dropped after this long, in case a generation bump was lost.
TEMPLATE_TTL = 5.0
PROFILE_TTL = 300


class RedisOutage:
    """Redis, as its users see it: after a failure it is left alone for a few seconds, so a
    Redis that does not answer (a black hole: each call waits out its timeout) costs one timeout
    every few seconds, not one per request. The outage is logged once, and its end."""

    def __init__(self, consequence: str, pause: float = 5.0) -> None:
        self.consequence = consequence
        self.pause = pause
        self.down = False
        self._until = 0.0

    def skip(self) -> bool:
        return time.monotonic() < self._until

    def failed(self, exc: BaseException) -> None:
        self._until = time.monotonic() + self.pause
        if not self.down:
            log.warning("redis unavailable, %s: %s", self.consequence, exc)
            self.down = True

    def succeeded(self) -> None:
        if self.down:
            log.info("redis is back")
            self.down = False


def user_key(user_id: uuid.UUID | str, project: str | None = None) -> str:
    """A profile's cache key: per project (the same id in two projects is two users), the
    project of the moment (`project_var`) unless named."""
    return f"notify:user:{project or project_var.get()}:{user_id}"


async def bump_template_generation(client: aioredis.Redis) -> None:
    try:
        await client.incr(TEMPLATE_GENERATION_KEY)
    except (RedisError, OSError) as exc:
        log.warning(
            "could not signal a template change through Redis (caches expire in %ss): %s", TEMPLATE_TTL, exc
        )


class ProfileCache:
    """Profiles in Redis, kept by the user service. Redis being down degrades to PostgreSQL,
    logged once per outage."""

    def __init__(self, client: aioredis.Redis, metrics: Metrics) -> None:
        self.client = client
        self.outage = RedisOutage("serving from PostgreSQL")
        self.lookups = metrics.cache_lookups

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        if self.outage.skip():
            return None
        try:
            result = await op()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return None
        self.outage.succeeded()
        return result

    async def get(self, user_id: uuid.UUID | str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.client.get(user_key(user_id)))
        result = "hit" if raw else "error" if self.outage.down else "miss"
        self.lookups.labels("user", result).inc()
        return orjson.loads(raw) if raw else None

    async def put(self, user_id: uuid.UUID | str, profile: dict[str, Any]) -> None:
        await self._call(lambda: self.client.set(user_key(user_id), orjson.dumps(profile), ex=PROFILE_TTL))

    async def put_many(self, profiles: list[dict[str, Any]]) -> None:
        """Several profiles in one round trip."""

        async def write() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for profile in profiles:
                    pipe.set(user_key(profile["id"]), orjson.dumps(profile), ex=PROFILE_TTL)
                await pipe.execute()

        if profiles:
            await self._call(write)

    async def invalidate(self, user_id: uuid.UUID | str) -> None:
        await self._call(lambda: self.client.delete(user_key(user_id)))

    async def invalidate_many(self, user_ids: list[str]) -> None:
        """Several profiles dropped in one round trip (a bulk identify)."""
        if user_ids:
            await self._call(lambda: self.client.delete(*(user_key(u) for u in user_ids)))


class TemplateVersionCache:
    """Template versions fetched from the template service, kept in memory.

    Keyed by code, language and version: a version never changes once written, so an entry can
    never be stale, and an update (a new version) is a new key."""

    def __init__(self, client: ServiceClient, size: int = 1024) -> None:
        self.client = client
        self.size = size
        self._entries: LRU[tuple[str, str, str, int], dict[str, Any]] = LRU(size)

    async def get(self, code: str, language: str, version: int) -> Reply:
        key = (project_var.get(), code, language, version)  # a code is per project
        if (entry := self._entries.get(key)) is not None:
            return Reply(200, {"data": entry})
        reply = await self.client.get_template(code, language, version)
        if reply.status == 200 and reply.data.get("language") == language:
            self._entries.put(key, reply.data)
        return reply


class Extra(Protocol):
    """Commands another party adds to a lookup's round trip (the rate limit's counter)."""

    def add(self, pipe: Any) -> None: ...


# A profile (raw), the template generation, and the first result of an `Extra`'s commands.
Read = tuple[bytes | None, int | None, Any]


class CachedLookups:
    def __init__(self, client: aioredis.Redis, users: ServiceClient, templates: ServiceClient) -> None:
        self.client = client
        self.users = users
        self.templates = templates
        self._templates: LRU[tuple[str, str, str | None], tuple[int, float, dict[str, Any]]] = LRU(1024)
        self.outage = RedisOutage("asking the services directly")
        self._reads: Batcher[tuple[str, Extra | None], Read] = Batcher(self._read_many)

    async def _read(self, user_id: str, also: Extra | None = None) -> tuple[bytes | None, int | None, Any]:
        """One round trip, shared with the reads of the moment: the profile, the template
        generation, and `also`'s commands (whose first result is returned; None when Redis is
        not answering)."""
        if self.outage.skip():
            return None, None, None
        return await self._reads.submit((user_id, also))

    async def _read_many(self, reads: list[tuple[str, Extra | None]]) -> list[Read]:
        """The reads of concurrent requests (or a worker's messages in flight) in one pipeline:
        one round trip, one system call each way, for all of them."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(TEMPLATE_GENERATION_KEY)
                spans: list[tuple[int, int]] = []
                for user_id, also in reads:
                    start = len(pipe.command_stack)
                    pipe.get(user_key(user_id))
                    if also is not None:
                        also.add(pipe)
                    spans.append((start, len(pipe.command_stack)))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return [(None, None, None)] * len(reads)
        self.outage.succeeded()
        generation = int(results[0] or 0)
        found: list[Read] = []
        for start, end in spans:
            raw_user, *more = results[start:end]
            found.append((raw_user, generation, more[0] if more else None))
        return found

    async def user(self, user_id: str) -> Reply:
        raw, _, _ = await self._read(user_id)
        return Reply(200, {"data": orjson.loads(raw)}) if raw else await self.users.get_user(user_id)

    async def user_and_template(
        self, user_id: str, code: str, language: str | None, also: Extra | None = None
    ) -> tuple[Reply, Reply, Any]:
        """The user and the template, and the first result of `also` (see `_read`)."""
        raw_user, generation, extra = await self._read(user_id, also)
        key = (project_var.get(), code, language)  # a code is per project
        cached = self._templates.get(key)
        now = time.monotonic()
        fresh = cached is not None and generation is not None and cached[0] == generation and now < cached[1]
        if raw_user and fresh:
            assert cached is not None
            return Reply(200, {"data": orjson.loads(raw_user)}), Reply(200, {"data": cached[2]}), extra

        async def template() -> Reply:
            if fresh:
                assert cached is not None
                return Reply(200, {"data": cached[2]})
            reply = await self.templates.get_template(code, language)
            if reply.status == 200 and generation is not None:
                self._templates.put(key, (generation, now + TEMPLATE_TTL, reply.data))
            return reply

        async def user() -> Reply:
            return (
                Reply(200, {"data": orjson.loads(raw_user)})
                if raw_user
                else await self.users.get_user(user_id)
            )

        found_user, found_template = await asyncio.gather(user(), template())
        return found_user, found_template, extra


async def profiles(
    redis: aioredis.Redis, users: ServiceClient, user_ids: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Many users' profiles: one MGET of the cache, the misses from the user service in batch
    lookups. Users that do not exist are absent from the answer. Redis down: all from the service."""
    ids = list(dict.fromkeys(user_ids))
    found: dict[str, dict[str, Any]] = {}
    if ids:
        try:
            cached = await redis.mget([user_key(u) for u in ids])
        except (RedisError, OSError) as exc:
            log.debug("profile cache unavailable for a batch lookup: %s", exc)
            cached = [None] * len(ids)
        for user_id, raw in zip(ids, cached, strict=True):
            if raw:
                found[user_id] = orjson.loads(raw)
    missing = [u for u in ids if u not in found]
    for start in range(0, len(missing), LOOKUP_LIMIT):
        for profile in await users.lookup_users(missing[start : start + LOOKUP_LIMIT]):
            found[str(profile["id"])] = profile
    return found
