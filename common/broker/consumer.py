"""The one consumer loop: every queue of the project is consumed, drained and settled here.

A `Consumer` takes messages from one work queue and hands each to its handler (the email or push
delivery, a webhook delivery, a topic fan-out). What matters most when things fail lives here,
once:

- **settled once**: a handler that returns has its message acknowledged (unless it settled it
  itself: a nack to come back later, a reject); one that raises has it rejected to the queue's
  dead-letter route, and the error logged once; one cancelled by shutdown has it requeued;
- **drained**: on stop the loop takes no more, lets the messages in flight finish within a grace
  period, and requeues the rest;
- **the retry queue**: `retry()` publishes the next attempt to `<queue>.retry.N`, confirmed, and
  says whether the broker took it (when it did not, the owner's reconciler publishes it again);
- **the dead letter**: `dead_letter()` publishes a copy with the reason in its headers to the
  queue's failed route and, when the broker will not take it, rejects the message so the work
  queue's own dead-letter route holds it all the same.

The queue is declared again, identically, on the consumer's channel: a robust channel restores
after a reconnect the consumers only of queues it declared itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from common.broker import amqp
from common.faults import is_infrastructure

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


@dataclass(frozen=True)
class FailedRoute:
    """Where a queue's dead letters go: an exchange of the consumer's channel and a routing key."""

    exchange: Callable[[], AbstractExchange]
    routing_key: str


class Consumer:
    def __init__(
        self,
        broker: amqp.Broker,
        stream: str,
        handler: Handler,
        *,
        failed: FailedRoute,
        channel: AbstractChannel | None = None,
        concurrent: bool = True,
        publish_timeout: float = 5.0,
    ) -> None:
        """`stream` names the work queue (`<stream>.queue`) and its retry queues; `channel`, when
        given, is one of the consumer's own (its prefetch bounds the messages in flight), else
        the broker's. `concurrent=False` handles one message at a time."""
        self.broker = broker
        self.stream = stream
        self.handler = handler
        self.failed = failed
        self.channel = channel or broker.channel
        self.concurrent = concurrent
        self.publish_timeout = publish_timeout
        self.in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    # the loop

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume(), name=f"{self.stream}-consumer")

    async def stop(self, grace: float) -> None:
        """Take no more messages, let those in flight finish within `grace` seconds; the rest
        go back to the queue."""
        if self._task is not None:
            # The iterator holds no query: cancelling it is safe, and stops the deliveries.
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.in_flight:
            log.info("%s: waiting for %d message(s) in flight", self.stream, len(self.in_flight))
            await asyncio.wait(self.in_flight, timeout=grace)
        for task in list(self.in_flight):
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def _consume(self) -> None:
        name = amqp.work_queue(self.stream)
        queue = await self.channel.declare_queue(name, durable=True, arguments=dict(self.broker.queues[name]))
        async with queue.iterator() as messages:
            async for message in messages:
                if not self.concurrent:
                    await self.settle(message)
                    continue
                # Prefetch bounds how many run at once: the broker sends no more than that.
                task = asyncio.create_task(self.settle(message))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)

    async def settle(self, message: AbstractIncomingMessage) -> None:
        """Run the handler on one message and settle it exactly once."""
        try:
            async with message.process(requeue=False, ignore_processed=True):
                try:
                    await self.handler(message)
                except asyncio.CancelledError:
                    # Stopped before it finished: back to the queue, not to the dead letters.
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
                    raise
                except Exception:
                    log.exception("%s: unexpected error handling a message; rejected", self.stream)
                    raise
        except Exception:  # noqa: BLE001 - logged above; process() rejected the message
            pass

    # what handlers call

    async def retry(
        self,
        body: Mapping[str, Any],
        queue: int,
        *,
        message_id: str,
        correlation_id: str | None = None,
        priority: int = 0,
        headers: Mapping[str, Any] | None = None,
    ) -> bool:
        """Publish the next attempt to retry queue `queue`; False when the broker did not take
        it (down, or the queue gone): the owner's reconciler publishes it again later."""
        try:
            await amqp.publish(
                self.channel.default_exchange,
                amqp.retry_queue(self.stream, queue),
                body,
                correlation_id=correlation_id,
                priority=priority,
                message_id=message_id,
                headers=headers,
                timeout=self.publish_timeout,
            )
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            log.warning("%s: could not queue the retry: %s: %s", self.stream, type(exc).__name__, exc)
            return False
        return True

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str, **headers: Any) -> None:
        """A copy to the failed route with the reason (and `headers`, as `x-<name>`); when the
        broker will not take it, the message is rejected to the work queue's dead-letter route."""
        stamped: dict[str, Any] = {"x-failure-reason": reason[:1000], "x-failed-at": int(time.time())}
        stamped.update({f"x-{k.replace('_', '-')}": v for k, v in headers.items() if v is not None})
        copy = aio_pika.Message(
            message.body,
            content_type="application/json",
            headers=stamped,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=message.priority or 0,
        )
        try:
            await amqp.publish_message(self.failed.exchange(), copy, self.failed.routing_key)
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            log.warning("%s: could not publish the dead letter (%s); rejected instead", self.stream, exc)
            await message.reject(requeue=False)
