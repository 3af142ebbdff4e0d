"""Clients that know a cluster: RABBITMQ_URL as a list; a connection goes to the first node that
answers and, when it loses that node, moves to another, its consumer and publisher-confirm channel
restored there. Two TCP proxies in front of the machine's broker stand in for two nodes here;
tests/test_rabbit_cluster.py does it with three real ones."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

import aio_pika
import pytest

from common import amqp
from common.config import Config, ConfigError
from tests.smtp_sink import free_port
from tests.tcp_proxy import TcpProxy
from tests.test_faults import via


def test_rabbitmq_url_takes_a_list_of_nodes() -> None:
    urls = "amqp://u:p@n1:5672/v, amqp://u:p@n2:5672/v,amqps://u:p@n3/v"
    config = Config.from_env({"RABBITMQ_URL": urls})
    assert config.rabbitmq_urls == ("amqp://u:p@n1:5672/v", "amqp://u:p@n2:5672/v", "amqps://u:p@n3/v")
    assert Config().rabbitmq_urls == ("amqp://guest:guest@127.0.0.1:5672/",)
    with pytest.raises(ConfigError, match="RABBITMQ_URL"):
        Config.from_env({"RABBITMQ_URL": "amqp://u:p@n1/,http://n2/"})
    with pytest.raises(ConfigError, match="RABBITMQ_URL"):
        Config.from_env({"RABBITMQ_URL": " , "})


async def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_connection_moves_to_another_node_when_its_node_is_lost(base_config: Config) -> None:
    target = urlsplit(base_config.rabbitmq_url)
    nodes = [TcpProxy(target.hostname or "127.0.0.1", target.port or 5672) for _ in range(2)]
    for node in nodes:
        await node.start()
    nobody = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    # A node that does not answer first: the connection skips it.
    urls = [nobody, *(via(base_config.rabbitmq_url, node) for node in nodes)]
    connection = await amqp.connect(",".join(urls))
    try:
        assert connection.url.port == nodes[0].port
        channel = await amqp.open_channel(connection, prefetch=10)
        # Named: a robust channel declares its queues again after a reconnect, by name.
        queue = await channel.declare_queue(f"cluster-probe-{time.time_ns()}", auto_delete=False)
        received: list[bytes] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                received.append(message.body)

        await queue.consume(on_message)
        broker = amqp.Broker(connection, channel, channel.default_exchange, {})
        await amqp.publish_message(channel.default_exchange, aio_pika.Message(b"before"), queue.name)
        await _until(lambda: received == [b"before"], 10, "the consumer did not get the first message")

        await nodes[0].cut()
        await _until(lambda: not broker.ready, 10, "Broker.ready stayed true with its node gone")
        await _until(lambda: broker.ready, 20, "the connection did not move to the other node")
        assert connection.url.port == nodes[1].port
        # The confirm channel publishes again, and the consumer was restored on the new node.
        await amqp.publish_message(
            channel.default_exchange, aio_pika.Message(b"after"), queue.name, timeout=10
        )
        await _until(lambda: received == [b"before", b"after"], 10, "the consumer was not restored")
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)
        for node in nodes:
            await node.close()


async def test_connect_raises_when_no_node_answers() -> None:
    urls = [f"amqp://guest:guest@127.0.0.1:{free_port()}/" for _ in range(2)]
    with pytest.raises(ConnectionError):
        await amqp.connect(urls)
