"""The RabbitMQ topology, declared from one table.

    notifications.direct (direct) --email--> email.queue --(reject)--> failed.queue
                                  --push---> push.queue  --(reject)--> failed.queue
                                  --failed-> failed.queue
                                  --webhooks-> webhooks.queue --(reject)--> webhooks.failed
    email.retry.N  (x-message-ttl = RETRY_DELAYS[N-1]) --expires--> notifications.direct / email
    webhooks.retry.N (the same TTLs)                    --expires--> notifications.direct / webhooks

A worker moves a message that failed transiently to `<channel>.retry.<attempt>`; when its TTL
runs out RabbitMQ dead-letters it back to the work queue. Permanent failures and exhausted
retries are published to failed.queue with the reason in the headers. Client webhook deliveries
(`common/webhooks.py`) follow the same pattern on queues of their own, dead-lettered to
webhooks.failed.
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
    WEBHOOKS,
    WEBHOOKS_FAILED_QUEUE,
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


def _work_queues(config: Config, channel: str, dead_letter: str, priority: bool) -> list[QueueSpec]:
    """A work queue bound as `channel`, and its retry queues, one per RETRY_DELAYS entry."""
    work_args: dict[str, Any] = {
        # A message a worker rejects (unparseable, poison) lands in the dead letter, not the void.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter,
    }
    if config.queue_type == "quorum":
        work_args["x-queue-type"] = "quorum"
    elif priority:
        # Quorum queues (RabbitMQ 3.x) have no priorities; classic ones do.
        work_args["x-max-priority"] = MAX_PRIORITY
    specs = [QueueSpec(work_queue(channel), work_args, (channel,))]
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


def table(config: Config) -> list[QueueSpec]:
    """Every queue, its arguments and its bindings to notifications.direct."""
    dead_letter_args = {"x-queue-type": "quorum"} if config.queue_type == "quorum" else {}
    specs = [QueueSpec(FAILED_QUEUE, dead_letter_args, (FAILED_ROUTING_KEY,))]
    for channel in CHANNELS:
        specs.extend(_work_queues(config, channel, FAILED_QUEUE, priority=True))
    specs.append(QueueSpec(WEBHOOKS_FAILED_QUEUE, dead_letter_args, (WEBHOOKS_FAILED_QUEUE,)))
    specs.extend(_work_queues(config, WEBHOOKS, WEBHOOKS_FAILED_QUEUE, priority=False))
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
