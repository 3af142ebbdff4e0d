"""Cleanup contexts for the resources services hold, one generator per resource.

Each factory returns a `cleanup_ctx` generator that opens the resource, stores it under a typed
AppKey, registers its health check, and closes it after the app stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiohttp import web

import topology
from common import amqp, db
from common.config import Config
from common.http import CONFIG_KEY, HEALTH_KEY, Check

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


@dataclass(frozen=True)
class Broker:
    connection: AbstractRobustConnection
    channel: AbstractChannel
    exchange: AbstractExchange

    @property
    def ready(self) -> bool:
        """Connected now (a robust connection clears `connected` while it reconnects)."""
        return (
            self.connection.connected.is_set()
            and not self.connection.is_closed
            and not self.channel.is_closed
        )

    async def ping(self) -> None:
        if not self.ready:
            raise ConnectionError("RabbitMQ is not connected")


def database(
    key: web.AppKey[db.Database], url_of: Callable[[Config], str], name: str, maxsize: int = 10
) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = await db.connect(url_of(app[CONFIG_KEY]), maxsize=maxsize)
        app[key] = database
        app[HEALTH_KEY][name] = Check(database.ping)
        try:
            yield
        finally:
            await database.close()

    return ctx


def broker(key: web.AppKey[Broker], prefetch: int | None = None) -> CleanupCtx:
    """A robust connection and a confirming channel; the topology declared from its one table."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        connection = await amqp.connect(config.rabbitmq_url)
        try:
            channel = await amqp.open_channel(connection, prefetch)
            await topology.declare(channel, config)
            exchange = await channel.get_exchange(amqp.EXCHANGE, ensure=False)
            app[key] = Broker(connection, channel, exchange)
            app[HEALTH_KEY]["rabbitmq"] = Check(app[key].ping)
            yield
        finally:
            # Bounded: a broker that does not answer the close handshake must not hold up exit.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

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
