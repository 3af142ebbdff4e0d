"""The one consumer loop against the real RabbitMQ: a consumer lost without the loop hearing of
it (its registration gone from the broker while the iterator waits on) is found by the watch and
consumes again, so the messages ready behind it are handled."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika

from common.broker import amqp
from common.broker.consumer import Consumer, FailedRoute
from common.config import Config
from topology import declare


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_consumer_lost_behind_the_loops_back_is_found_and_consumes_again(
    base_config: Config, amqp_channel: Any
) -> None:
    connection = await amqp.connect(base_config.rabbitmq_url)
    try:
        channel = await amqp.open_channel(connection, prefetch=4)
        queues = await declare(channel, base_config)
        exchange = await channel.get_exchange(amqp.EXCHANGE, ensure=False)
        broker = amqp.Broker(connection, channel, exchange, queues)
        handled: list[bytes] = []

        async def handler(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            handled.append(message.body)

        consumer = Consumer(
            broker,
            "email",
            handler,
            failed=FailedRoute(lambda: exchange, amqp.FAILED_ROUTING_KEY),
            stall_check=0.5,
        )
        consumer.start()
        try:
            await _until(lambda: consumer.consumer_tag, 10, "consuming")
            await amqp.publish(channel.default_exchange, "email.queue", {"n": 0})
            await _until(lambda: len(handled) == 1, 10, "the first message was not handled")

            # The broker forgets the consumer; the iterator is not told and would wait for ever.
            tag = consumer.consumer_tag
            assert tag
            await (await channel.get_underlay_channel()).basic_cancel(tag)
            for n in range(1, 4):
                await amqp.publish(channel.default_exchange, "email.queue", {"n": n})
            # Two looks 0.5 s apart see them ready, then a pause of 1 s, then consuming again.
            await _until(lambda: len(handled) == 4, 10, f"lost consumer not found: {len(handled)} handled")
            assert consumer.restarts == 1
            assert consumer.consumer_tag not in (None, tag)

            # A consumer that is only idle is left alone: nothing is ready at its looks.
            await asyncio.sleep(1.5)
            assert consumer.restarts == 1
        finally:
            await consumer.stop(grace=2)
    finally:
        await asyncio.wait_for(connection.close(), 5)
