"""RabbitMQ: the names every service uses, the broker a service holds, and one publish helper.

The topology itself (which queues, with which arguments) is `topology/`'s business: a service
passes its `declare` function to `broker()`, and the broker keeps the arguments it declared so a
consumer can declare its queue again, identically, after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import PublishError
from aiohttp import web

from common.config import Config
from common.http import CONFIG_KEY, HEALTH_KEY, Check

EXCHANGE = "notifications.direct"
FAILED_QUEUE = "failed.queue"
FAILED_ROUTING_KEY = "failed"
MAX_PRIORITY = 10
# Client status webhooks: a work queue of their own with its retry queues, and a dead letter.
WEBHOOKS = "webhooks"
WEBHOOKS_FAILED_QUEUE = "webhooks.failed"

# Queue name -> the arguments it is declared with.
QueueArguments = Mapping[str, Mapping[str, Any]]
Declare = Callable[[AbstractChannel, Config], Awaitable[QueueArguments]]


class Unroutable(Exception):
    """The broker returned a mandatory publish: no queue took it (one deleted, say)."""


def work_queue(channel: str) -> str:
    return f"{channel}.queue"


def retry_queue(channel: str, attempt: int) -> str:
    """The queue that holds a message before its `attempt`-th retry (1-based)."""
    return f"{channel}.retry.{attempt}"


async def connect(url: str) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, client_properties={"connection_name": "notify"})


async def open_channel(connection: AbstractRobustConnection, prefetch: int | None = None) -> AbstractChannel:
    # Returned messages raise: a publish that reached no queue is a failure, not a success.
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch is not None:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


async def publish(
    exchange: AbstractExchange,
    routing_key: str,
    body: Mapping[str, Any],
    *,
    correlation_id: str | None = None,
    priority: int = 0,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Publish persistently and wait for the broker's confirm; raises if it is refused, or
    returned because no queue took it."""
    message = aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=max(0, min(priority, MAX_PRIORITY - 1)),
        correlation_id=correlation_id,
        message_id=message_id,
        headers={**(headers or {}), **({"x-correlation-id": correlation_id} if correlation_id else {})},
    )
    await publish_message(exchange, message, routing_key, timeout)


async def publish_message(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, timeout: float = 10.0
) -> None:
    """Every publish of the project: mandatory, confirmed, bounded in time."""
    try:
        await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=timeout)
    except PublishError:
        where = exchange.name or "the default exchange"
        raise Unroutable(f"no queue took a message for {routing_key!r} on {where}") from None


@dataclass(frozen=True)
class Broker:
    connection: AbstractRobustConnection
    channel: AbstractChannel
    exchange: AbstractExchange
    queues: QueueArguments

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


def broker(
    key: web.AppKey[Broker], declare: Declare, prefetch: int | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: a robust connection and a confirming channel, the topology declared."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        connection = await connect(config.rabbitmq_url)
        try:
            channel = await open_channel(connection, prefetch)
            queues = await declare(channel, config)
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            app[key] = Broker(connection, channel, exchange, queues)
            app[HEALTH_KEY]["rabbitmq"] = Check(app[key].ping)
            yield
        finally:
            # Bounded: a broker that does not answer the close handshake must not hold up exit.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    return ctx
