"""RabbitMQ: the names every service uses, the broker a service holds, and one publish helper.

The topology itself (which queues, with which arguments) is `topology/`'s business: a service
passes its `declare` function to `broker()`, and the broker keeps the arguments it declared so a
consumer can declare its queue again, identically, after a reconnect.

RABBITMQ_URL may name several nodes of a cluster: the connection goes to the first that answers
and, when it is lost, moves on to the next (`ClusterConnection`), its channels, consumers and
publisher confirms restored there as after any reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, PublishError
from aio_pika.robust_connection import RobustConnection
from aiohttp import web
from yarl import URL

from common.config import Config
from common.keys import BROKER_KEY, CONFIG_KEY, HEALTH_KEY
from common.web.http import Check

log = logging.getLogger(__name__)

EXCHANGE = "notifications.direct"
FAILED_QUEUE = "failed.queue"
FAILED_ROUTING_KEY = "failed"
MAX_PRIORITY = 10
# Client status webhooks: a work queue of their own with its retry queues, and a dead letter.
WEBHOOKS = "webhooks"
WEBHOOKS_FAILED_QUEUE = "webhooks.failed"
# Topic fan-outs: one message per notification to a topic, walked by `common/features/bulk/fanout.py`.
FANOUT = "fanout"

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


# RobustConnection's reconnect loop makes every attempt through this (name-mangled) method;
# ClusterConnection overrides it to pick the next node first. aio-pika is pinned; if an upgrade
# renames it, importing this module fails here rather than reconnecting to a lost node forever.
_CONNECT_ATTEMPT = "_RobustConnection__connect_transport"
assert hasattr(RobustConnection, _CONNECT_ATTEMPT), "aio-pika changed its reconnect loop"
# Seconds between reconnect attempts when there are several nodes to try: each failed attempt
# moves to the next node, so a short pause finds a surviving one quickly.
CLUSTER_RECONNECT_INTERVAL = 1.0


class ClusterConnection(RobustConnection):
    """A robust connection to one node of a cluster at a time. The first attempt goes to the URL
    it was made with; every later one (a reconnect after a loss, a retry after a failed attempt)
    to the next URL in the list, round and round, so a lost node is left for a surviving one.
    Everything else, restoring channels, consumers and confirms, is RobustConnection's."""

    def __init__(self, url: URL, *, urls: Sequence[str], **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        # The first URL's options (its query: heartbeat, reconnect_interval, …) apply to all.
        self.urls = [URL(u).with_query(self.url.query) for u in urls]
        self._index = 0  # `url` is urls[0]
        self._attempts = 0

    @property
    def node(self) -> str:
        """host:port of the node this connection uses (or is trying)."""
        return f"{self.url.host}:{self.url.port}"

    async def _RobustConnection__connect_transport(self) -> None:
        if self._attempts and len(self.urls) > 1:
            self._index = (self._index + 1) % len(self.urls)
            self.url = self.urls[self._index]
        self._attempts += 1
        await getattr(super(), _CONNECT_ATTEMPT)()
        if self._attempts > 1:
            log.warning("RabbitMQ: connected to %s", self.node)


async def connect(url: str | Sequence[str]) -> ClusterConnection:
    """A robust connection to the first node that answers; `url` is RABBITMQ_URL (one URL, or
    several separated by commas) or a list of URLs. Raises the last error when none answers."""
    urls = [u.strip() for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)
    extra: dict[str, Any] = {"reconnect_interval": CLUSTER_RECONNECT_INTERVAL} if len(urls) > 1 else {}
    last: BaseException | None = None
    for i, first in enumerate(urls):
        # Each node in turn; the connection keeps the whole list for its reconnects, starting
        # after the node that answered.
        order = urls[i:] + urls[:i]
        try:
            connection = await aio_pika.connect_robust(
                first,
                client_properties={"connection_name": "notify"},
                connection_class=_cluster_class(order),
                **extra,
            )
            assert isinstance(connection, ClusterConnection)
            return connection
        except CONNECTION_EXCEPTIONS as exc:
            last = exc
            if len(urls) > 1:
                log.warning("RabbitMQ at %s did not answer: %s", URL(first).with_password(None), exc)
    assert last is not None, "RABBITMQ_URL names no broker"
    raise last


def _cluster_class(urls: Sequence[str]) -> type[ClusterConnection]:
    # connect_robust builds the connection itself, from a class: this one carries the list.
    class Bound(ClusterConnection):
        def __init__(self, url: URL, **kwargs: Any) -> None:
            super().__init__(url, urls=urls, **kwargs)

    return Bound


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


def broker(declare: Declare, prefetch: int | None = None) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: a robust connection and a confirming channel, the topology declared
    (BROKER_KEY)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        connection = await connect(config.rabbitmq_urls)
        try:
            channel = await open_channel(connection, prefetch)
            queues = await declare(channel, config)
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            app[BROKER_KEY] = Broker(connection, channel, exchange, queues)
            app[HEALTH_KEY]["rabbitmq"] = Check(app[BROKER_KEY].ping)
            yield
        finally:
            # Bounded: a broker that does not answer the close handshake must not hold up exit.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    return ctx
