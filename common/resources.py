"""Cleanup contexts for the resources every service may hold, one generator per resource.

Each factory returns a `cleanup_ctx` generator that opens the resource, stores it under a typed
AppKey, registers its health check, and closes it after the app stops. The broker has its own
in `common/broker/amqp.py`, so a service without one imports no broker code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from common.config import Config
from common.data import db
from common.data.store import StatusStore
from common.keys import CONFIG_KEY, DB_KEY, HEALTH_KEY, HTTP_KEY, REDIS_KEY, RENDER_KEY, STORE_KEY
from common.rendering.renderer import RenderPool
from common.web.http import Check

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def database(url_of: Callable[[Config], str], name: str, maxsize: int = 10) -> CleanupCtx:
    """The service's database (DB_KEY), its health check named `name`."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        database = await db.connect(
            url_of(config),
            maxsize=config.db_pool_size or maxsize,
            timeout=config.db_timeout,
            prepared=config.db_prepared_statements,
        )
        app[DB_KEY] = database
        app[HEALTH_KEY][name] = Check(database.ping)
        try:
            yield
        finally:
            await database.close()

    return ctx


def connect_redis(url: str, **options: Any) -> aioredis.Redis:
    """A Redis client whose command, on a pooled connection the server has closed (it was
    restarted), is tried once more on a new connection: without this the first command on each
    pooled connection after a restart fails. Only a closed connection is retried, at once; a
    timeout (a server not answering) is not, so a black hole still costs one timeout, not two."""
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    return aioredis.from_url(url, retry=retry, **options)


def redis_client(critical: bool = False) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = connect_redis(app[CONFIG_KEY].redis_url, socket_timeout=1, socket_connect_timeout=1)
        app[REDIS_KEY] = client
        app[HEALTH_KEY]["redis"] = Check(client.ping, critical=critical)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5)

    return ctx


async def http_client(app: web.Application) -> AsyncIterator[None]:
    """An outgoing HTTP session (HTTP_KEY)."""
    config = app[CONFIG_KEY]
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.http_timeout),
        connector=aiohttp.TCPConnector(limit=100),
    )
    app[HTTP_KEY] = session
    try:
        yield
    finally:
        await session.close()


async def status_store(app: web.Application) -> AsyncIterator[None]:
    """The status store over the notifications database (STORE_KEY): the gateway's and every
    worker's. Its upkeep is `retention.upkeep`, a cleanup context of its own."""
    app[STORE_KEY] = StatusStore(app[DB_KEY])
    yield


def render_pool(size: int = 2) -> CleanupCtx:
    """Child processes that render templates under the time and memory budgets."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = RenderPool(size)
        app[RENDER_KEY] = pool
        try:
            yield
        finally:
            await pool.close()

    return ctx
