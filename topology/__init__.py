"""The RabbitMQ topology, declared from one table.

    notifications.direct (direct) --email--> email.queue --(reject)--> failed.queue
                                  --push---> push.queue  --(reject)--> failed.queue
                                  --failed-> failed.queue
                                  --webhooks-> webhooks.queue --(reject)--> webhooks.failed
                                  --fanout--> fanout.queue --(reject)--> failed.queue
    email.retry.N  (x-message-ttl = RETRY_DELAYS[N-1]) --expires--> notifications.direct / email
    webhooks.retry.N (the same TTLs)                    --expires--> notifications.direct / webhooks

A worker moves a message that failed transiently to `<channel>.retry.<attempt>`; when its TTL
runs out RabbitMQ dead-letters it back to the work queue. Permanent failures and exhausted
retries are published to failed.queue with the reason in the headers. Client webhook deliveries
(`common/features/webhooks/delivery.py`) follow the same pattern on queues of their own, dead-lettered to
webhooks.failed.

QUEUE_TYPE=quorum (a cluster) makes every queue, work, retry and failed (the webhooks' too), a
quorum queue: replicated to the cluster's nodes, so a lost node loses none of them. What changes
with it is written down in docs/scaling.md ("Quorum queues").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, ExchangeType

from common.broker.amqp import (
    EXCHANGE,
    FAILED_QUEUE,
    FAILED_ROUTING_KEY,
    FANOUT,
    MAX_PRIORITY,
    WEBHOOKS,
    WEBHOOKS_FAILED_QUEUE,
    retry_queue,
    work_queue,
)
from common.config import Config
from common.vocabulary import CHANNELS

# How many times a quorum queue hands out one message before it dead-letters it (to failed.queue;
# the reconciler republishes its notification later, from the store). A message goes back to
# the queue only when a worker stops or loses its connection with it in hand (workers hold a
# message through a store outage rather than requeue it): ten such returns for one message is a
# message that keeps killing workers, not bad luck. RabbitMQ 3.x has no limit unless one is set.
QUORUM_DELIVERY_LIMIT = 10

# Quorum dead-lettering is at-most-once by default: a message expiring from a retry queue while
# a node fails could vanish between the queues. At-least-once keeps it until the target queue
# confirms it; RabbitMQ requires reject-publish overflow for it (drop-head would discard).
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


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
    quorum = config.queue_type == "quorum"
    if quorum:
        work_args.update(
            {"x-queue-type": "quorum", "x-delivery-limit": QUORUM_DELIVERY_LIMIT, **AT_LEAST_ONCE}
        )
    elif priority:
        # Quorum queues (RabbitMQ 3.x) have no priorities; classic ones do.
        work_args["x-max-priority"] = MAX_PRIORITY
    specs = [QueueSpec(work_queue(channel), work_args, (channel,))]
    for attempt, delay in enumerate(config.retry_delays, start=1):
        retry_args: dict[str, Any] = {
            "x-message-ttl": int(delay * 1000),
            "x-dead-letter-exchange": EXCHANGE,
            "x-dead-letter-routing-key": channel,
        }
        if quorum:
            # The way back to the work queue is this queue's dead-lettering: it must not drop.
            retry_args.update({"x-queue-type": "quorum", **AT_LEAST_ONCE})
        specs.append(QueueSpec(retry_queue(channel, attempt), retry_args))
    return specs


def table(config: Config) -> list[QueueSpec]:
    """Every queue, its arguments and its bindings to notifications.direct."""
    dead_letter_args = {"x-queue-type": "quorum"} if config.queue_type == "quorum" else {}
    specs = [QueueSpec(FAILED_QUEUE, dead_letter_args, (FAILED_ROUTING_KEY,))]
    for channel in CHANNELS:
        specs.extend(_work_queues(config, channel, FAILED_QUEUE, priority=True))
    specs.append(QueueSpec(WEBHOOKS_FAILED_QUEUE, dead_letter_args, (WEBHOOKS_FAILED_QUEUE,)))
    specs.extend(_work_queues(config, WEBHOOKS, WEBHOOKS_FAILED_QUEUE, priority=False))
    # Topic fan-outs: no retry queues (a fan-out that stops is redelivered and resumes from its
    # cursor; the batch row is the record), a malformed message to failed.queue.
    fanout_args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": FAILED_QUEUE}
    if config.queue_type == "quorum":
        fanout_args["x-queue-type"] = "quorum"
    specs.append(QueueSpec(work_queue(FANOUT), fanout_args, (FANOUT,)))
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
