"""The one consumer loop against the real RabbitMQ: acknowledgements sent together never cover a
message still in a handler. Seeded random runs of mixed outcomes (acknowledged, rejected, nacked
back once, acknowledged by the handler itself, held until the connection is gone); afterwards
the queue holds exactly the held ones, each once, and nothing else came back."""

from __future__ import annotations

import asyncio
import contextlib
import random

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from common.broker import amqp
from common.broker.consumer import Consumer, FailedRoute
from common.config import Config
from topology import declare

PREFETCH = 16
COUNT = 150
OUTCOMES = ("ack", "ack", "ack", "ack", "reject", "nack_once", "self_ack")


async def _broker(config: Config) -> amqp.Broker:
    connection = await amqp.connect(config.rabbitmq_urls)
    channel = await amqp.open_channel(connection, PREFETCH)
    queues = await declare(channel, config)
    exchange = await channel.get_exchange(amqp.EXCHANGE, ensure=False)
    return amqp.Broker(connection, channel, exchange, queues)


async def _left_in(channel: AbstractChannel, name: str) -> list[int]:
    """The messages a queue holds now, taken off it (their `i`)."""
    queue = await channel.get_queue(name)
    found = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        found.append(orjson.loads(message.body)["i"])
    return found


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_acknowledgements_sent_together_never_cover_a_message_still_in_hand(
    base_config: Config, amqp_channel: AbstractChannel, seed: int
) -> None:
    rng = random.Random(seed)
    outcomes = {i: rng.choice(OUTCOMES) for i in range(COUNT)}
    # Held ones take prefetch slots until the end: a few, or nothing else would arrive.
    for i in rng.sample(range(COUNT), 3):
        outcomes[i] = "hold"
    held = {i for i, outcome in outcomes.items() if outcome == "hold"}
    pauses = {i: rng.choice((0.0, 0.0, 0.001, 0.005, 0.02)) for i in range(COUNT)}
    work = amqp.work_queue("email")
    for i in range(COUNT):
        await amqp_channel.default_exchange.publish(aio_pika.Message(orjson.dumps({"i": i})), work)

    broker = await _broker(base_config)
    finished: set[int] = set()  # handled for good (a nack_once only on its second delivery)
    done = asyncio.Event()
    never = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        i = orjson.loads(message.body)["i"]
        await asyncio.sleep(pauses[i])
        outcome = outcomes[i]
        if outcome == "hold":
            await never.wait()
        if outcome == "nack_once" and not message.redelivered:
            await message.nack(requeue=True)
            return
        assert i not in finished, f"{i} handled again after it was settled"
        finished.add(i)
        if len(finished) == COUNT - len(held):
            done.set()
        if outcome == "reject":
            raise RuntimeError("a handler's bug: rejected to the dead letters")
        if outcome == "self_ack":
            await message.ack()

    consumer = Consumer(
        broker,
        "email",
        handler,
        failed=FailedRoute(lambda: broker.exchange, amqp.FAILED_ROUTING_KEY),
    )
    consumer.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
        # Every message not held is finished and its acknowledgement sent.
        # (Only the held ones stay: the wait runs out its second for them.)
        await asyncio.wait(set(consumer.in_flight), timeout=1)
        assert len(consumer.in_flight) == len(held)
        await consumer.acks.drain()
        acked = sum(1 for i in range(COUNT) if outcomes[i] in ("ack", "nack_once"))
        # Never more frames than messages (fewer when they finish together: the test below).
        assert 0 < consumer.acks.frames <= acked
    finally:
        # The process dies with the held ones in hand: the broker must give them back.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.connection.close(), 5)
        await consumer.stop(0)

    # Exactly the held ones came back, each once: no acknowledgement covered them, and every
    # other message was settled for good.
    assert sorted(await _left_in(amqp_channel, work)) == sorted(held)
    rejected = sorted(i for i, outcome in outcomes.items() if outcome == "reject")
    assert sorted(await _left_in(amqp_channel, amqp.FAILED_QUEUE)) == rejected


async def test_handlers_finishing_together_are_acknowledged_in_one_frame(
    base_config: Config, amqp_channel: AbstractChannel
) -> None:
    # As a group commit wakes its batch: the handlers in hand all return in one turn of the loop.
    count = PREFETCH * 4
    work = amqp.work_queue("email")
    for i in range(count):
        await amqp_channel.default_exchange.publish(aio_pika.Message(orjson.dumps({"i": i})), work)
    broker = await _broker(base_config)
    waiting: list[asyncio.Future[None]] = []
    finished = 0
    done = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        nonlocal finished
        future = asyncio.get_running_loop().create_future()
        waiting.append(future)
        if len(waiting) == PREFETCH:  # the batch is full: "committed"
            for each in waiting:
                each.set_result(None)
            waiting.clear()
        await future
        finished += 1
        if finished == count:
            done.set()

    consumer = Consumer(
        broker, "email", handler, failed=FailedRoute(lambda: broker.exchange, amqp.FAILED_ROUTING_KEY)
    )
    consumer.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.gather(*consumer.in_flight)
        await consumer.acks.drain()
        assert consumer.acks.frames == count // PREFETCH  # one frame a batch, not one a message
    finally:
        await consumer.stop(0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.connection.close(), 5)
    assert await _left_in(amqp_channel, work) == []
