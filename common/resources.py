"""Cleanup contexts for the resources every service may hold, one generator per resource.

Each factory returns a `cleanup_ctx` generator that opens the resource, stores it under a typed
AppKey, registers its health check, and closes it after the app stops. The broker has its own
in `common/amqp.py`, so a service without one imports no broker code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from common import background, db, retention
from common.config import Config
from common.http import CONFIG_KEY, HEALTH_KEY, Check
from common.renderer import RenderPool
from common.store import StatusStore

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def database(
    key: web.AppKey[db.Database], url_of: Callable[[Config], str], name: str, maxsize: int = 10
) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        database = await db.connect(
            url_of(config), maxsize=maxsize, timeout=config.db_timeout, prepared=config.db_prepared_statements
        )
        app[key] = database
        app[HEALTH_KEY][name] = Check(database.ping)
        try:
            yield
        finally:
            await database.close()

    return ctx


def redis_client(key: web.AppKey[aioredis.Redis], critical: bool = False) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.from_url(app[CONFIG_KEY].redis_url, socket_timeout=1, socket_connect_timeout=1)
        app[key] = client
        app[HEALTH_KEY]["redis"] = Check(client.ping, critical=critical)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5)

    return ctx


def http_client(key: web.AppKey[aiohttp.ClientSession]) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.http_timeout),
            connector=aiohttp.TCPConnector(limit=100),
        )
        app[key] = session
        try:
            yield
        finally:
            await session.close()

    return ctx


def status_store(db_key: web.AppKey[db.Database], key: web.AppKey[StatusStore]) -> CleanupCtx:
    """The status store over the notifications database (the gateway's and every worker's)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[key] = StatusStore(app[db_key])
        # Its upkeep (partitions ahead, retention), by whichever holder gets to it first.
        stopping = asyncio.Event()
        task = asyncio.create_task(
            retention.run(app[db_key], app[CONFIG_KEY].retention_days, stopping), name="store-upkeep"
        )
        try:
            yield
        finally:
            await background.stop(task, stopping.set)

    return ctx


def render_pool(key: web.AppKey[RenderPool], size: int = 2) -> CleanupCtx:
    """Child processes that render templates under the time and memory budgets."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = RenderPool(size)
        app[key] = pool
        try:
            yield
        finally:
            await pool.close()

    return ctx
