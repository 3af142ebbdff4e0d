"""The RabbitMQ topology, declared from one table.

    notifications.direct (direct) --email--> email.queue --(reject)--> failed.queue
                                  --push---> push.queue  --(reject)--> failed.queue
                                  --failed-> failed.queue
    email.retry.N  (x-message-ttl = RETRY_DELAYS[N-1]) --expires--> notifications.direct / email

A worker moves a message that failed transiently to `<channel>.retry.<attempt>`; when its TTL
runs out RabbitMQ dead-letters it back to the work queue. Permanent failures and exhausted
retries are published to failed.queue with the reason in the headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, ExchangeType

from common.amqp import (
    EXCHANGE,
    FAILED_QUEUE,
    FAILED_ROUTING_KEY,
    MAX_PRIORITY,
    retry_queue,
    work_queue,
)
from common.channels import CHANNELS
from common.config import Config


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    routing_keys: tuple[str, ...] = ()


def table(config: Config) -> list[QueueSpec]:
    """Every queue, its arguments and its bindings to notifications.direct."""
    quorum = config.queue_type == "quorum"
    specs = [
        QueueSpec(
            FAILED_QUEUE,
            {"x-queue-type": "quorum"} if quorum else {},
            (FAILED_ROUTING_KEY,),
        )
    ]
    for channel in CHANNELS:
        work_args: dict[str, Any] = {
            # A message a worker rejects (unparseable, poison) lands in failed.queue, not the void.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": FAILED_QUEUE,
        }
        # Quorum queues (RabbitMQ 3.x) have no priorities; classic ones do.
        work_args.update({"x-queue-type": "quorum"} if quorum else {"x-max-priority": MAX_PRIORITY})
        specs.append(QueueSpec(work_queue(channel), work_args, (channel,)))
        for attempt, delay in enumerate(config.retry_delays, start=1):
            specs.append(
                QueueSpec(
                    retry_queue(channel, attempt),
                    {
                        "x-message-ttl": int(delay * 1000),
                        "x-dead-letter-exchange": EXCHANGE,
                        "x-dead-letter-routing-key": channel,
                    },
                )
            )
    return specs


class TopologyConflict(RuntimeError):
    """A queue exists with other arguments; RabbitMQ will not change them in place."""


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for queue '([^']+)'[^:]*: (.*)")


async def declare(channel: AbstractChannel, config: Config) -> dict[str, dict[str, Any]]:
    """Declare the exchange, queues and bindings; idempotent. Returns each queue's arguments."""
    exchange = await channel.declare_exchange(EXCHANGE, ExchangeType.DIRECT, durable=True)
    declared: dict[str, dict[str, Any]] = {}
    for spec in table(config):
        try:
            queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _conflict(spec, str(exc)) from None
        for key in spec.routing_keys:
            await queue.bind(exchange, routing_key=key)
        declared[spec.name] = spec.arguments
    return declared


def _conflict(spec: QueueSpec, detail: str) -> TopologyConflict:
    match = _INEQUIVALENT.search(detail)
    argument, found = (match.group(1), match.group(3)) if match else ("?", detail)
    return TopologyConflict(
        f"queue {spec.name!r} already exists with a different {argument!r} ({found}); "
        f"this topology wants {spec.arguments.get(argument, 'it unset')!r}. "
        f"Drain the queue, then delete it (rabbitmqctl delete_queue {spec.name}) and run "
        "`python -m topology` again, or set RETRY_DELAYS/QUEUE_TYPE back to the values it was "
        "declared with."
    )
