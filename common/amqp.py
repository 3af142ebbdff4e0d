"""RabbitMQ: the names every service uses, a robust connection, and one publish helper."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

EXCHANGE = "notifications.direct"
CHANNELS = ("email", "push")
FAILED_QUEUE = "failed.queue"
FAILED_ROUTING_KEY = "failed"
MAX_PRIORITY = 10


def work_queue(channel: str) -> str:
    return f"{channel}.queue"


def retry_queue(channel: str, attempt: int) -> str:
    """The queue that holds a message before its `attempt`-th retry (1-based)."""
    return f"{channel}.retry.{attempt}"


async def connect(url: str) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, client_properties={"connection_name": "notify"})


async def open_channel(connection: AbstractRobustConnection, prefetch: int | None = None) -> AbstractChannel:
    channel = await connection.channel(publisher_confirms=True)
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
    """Publish persistently and wait for the broker's confirm; raises if it is refused."""
    message = aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=max(0, min(priority, MAX_PRIORITY - 1)),
        correlation_id=correlation_id,
        message_id=message_id,
        headers={**(headers or {}), **({"x-correlation-id": correlation_id} if correlation_id else {})},
    )
    await exchange.publish(message, routing_key=routing_key, timeout=timeout)
