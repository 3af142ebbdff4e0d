"""Clients that know a cluster: RABBITMQ_URL as a list; a connection goes to the first node that
answers and, when it loses that node, moves to another, its consumer and publisher-confirm channel
restored there. Two TCP proxies in front of the machine's broker stand in for two nodes here;
tests/test_rabbit_cluster.py does it with three real ones. And the quorum topology, on the
machine's single node (quorum queues work on one node as on three)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlsplit

import aio_pika
import pytest

from common.broker import amqp
from common.broker.amqp import FAILED_QUEUE
from common.config import Config, ConfigError
from scripts.localenv import rabbitmq_vhost
from tests.conftest import PREFIX
from tests.smtp_sink import free_port
from tests.tcp_proxy import TcpProxy, via
from topology import QUORUM_DELIVERY_LIMIT, declare


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


@pytest.fixture
async def quorum_vhost(base_config: Config) -> AsyncIterator[Config]:
    """A vhost of its own (the suite's has classic queues by these names), declared quorum."""
    name = f"{PREFIX}_q{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbitmq_vhost, "add", name)
    url = urlsplit(base_config.rabbitmq_url)._replace(path=f"/{name}").geturl()
    yield replace(base_config, rabbitmq_url=url, queue_type="quorum")
    await asyncio.to_thread(rabbitmq_vhost, "delete", name)


async def _get(queue: aio_pika.abc.AbstractQueue, timeout: float) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = time.monotonic() + timeout
    while (message := await queue.get(no_ack=False, fail=False)) is None:
        assert time.monotonic() < deadline, f"nothing arrived in {queue.name}"
        await asyncio.sleep(0.05)
    return message


async def test_quorum_topology_every_queue_replicated_and_dead_letters_kept(quorum_vhost: Config) -> None:
    config = quorum_vhost
    connection = await amqp.connect(config.rabbitmq_url)
    try:
        channel = await amqp.open_channel(connection)
        declared = await declare(channel, config)
        vhost = urlsplit(config.rabbitmq_url).path.lstrip("/")
        listed = (
            await asyncio.to_thread(
                subprocess.run,
                ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type"],
                capture_output=True,
                text=True,
                check=True,
            )
        ).stdout
        types = dict(line.split("\t")[:2] for line in listed.strip().splitlines()[1:])
        assert set(types) == set(declared) and set(types.values()) == {"quorum"}, listed
        retry = declared["email.retry.1"]
        assert retry["x-dead-letter-strategy"] == "at-least-once"
        assert retry["x-overflow"] == "reject-publish"
        assert declared["email.queue"]["x-delivery-limit"] == QUORUM_DELIVERY_LIMIT

        work = await channel.get_queue("email.queue")
        failed = await channel.get_queue(FAILED_QUEUE)
        # A retry queue's TTL, then its dead-lettering, brings the message back to the work queue.
        await amqp.publish_message(channel.default_exchange, aio_pika.Message(b"retry"), "email.retry.1")
        message = await _get(work, timeout=10)
        assert message.body == b"retry"
        # A rejected message goes to failed.queue.
        await message.reject(requeue=False)
        assert (await _get(failed, timeout=10)).body == b"retry"
        # A message handed out again and again is dead-lettered after the delivery limit.
        await amqp.publish_message(channel.default_exchange, aio_pika.Message(b"crashes"), "email.queue")
        handed_out = 0
        while (again := await work.get(no_ack=False, fail=False)) is not None or handed_out == 0:
            if again is None:
                await asyncio.sleep(0.05)
                continue
            handed_out += 1
            await again.nack(requeue=True)
            assert handed_out <= QUORUM_DELIVERY_LIMIT + 1, "the delivery limit did not apply"
            await asyncio.sleep(0.02)
        assert handed_out == QUORUM_DELIVERY_LIMIT + 1
        assert (await _get(failed, timeout=10)).body == b"crashes"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)
