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

- **watched**: a consumer can be lost without the loop hearing of it (a restore after a reconnect
  that failed half-way, a quorum queue's leader moving while it is registered): the iterator then
  waits for ever while messages pile up. Every `stall_check` seconds a consumer that received
  nothing and holds nothing asks the broker how many messages are ready; ready messages at two
  looks in a row mean it is lost, and it consumes again. A loop that ends or fails starts again
  too, after a pause (1 s doubling to 30 s).
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

STALL_CHECK = 15.0  # seconds between looks at a consumer that has received nothing
RESTART_FIRST, RESTART_MAX = 1.0, 30.0  # the pause before consuming again, doubling
RESTART_RESET = 60.0  # a loop that ran this long starts the pauses over


class Stalled(Exception):
    """Messages are ready on the queue and none reach this consumer."""


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
        stall_check: float = STALL_CHECK,
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
        self.stall_check = stall_check
        self.iterator: aio_pika.abc.AbstractQueueIterator | None = None  # the one consuming now
        self.restarts = 0  # times the loop consumed again (lost, ended or failed)
        self._received = False  # a message arrived since the last look
        self._busy = 0  # messages being handled (one at a time when not concurrent)
        self._task: asyncio.Task[None] | None = None

    # the loop

    @property
    def consumer_tag(self) -> str | None:
        """The broker's name for the consumer now (aio-pika's iterator has it, untyped)."""
        tag = getattr(self.iterator, "consumer_tag", None)
        return str(tag) if tag else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.stream}-consumer")

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

    async def _run(self) -> None:
        pause = RESTART_FIRST
        while True:
            started = time.monotonic()
            try:
                async with asyncio.TaskGroup() as group:
                    queue = await self._declare()
                    group.create_task(self._watch(queue))
                    await self._consume(queue)
                    raise Stalled("the broker ended the consumer")
            except* Stalled as lost:
                log.warning("%s: consumer lost (%s); consuming again", self.stream, lost.exceptions[0])
            except* Exception as failed:
                exc = failed.exceptions[0]
                if is_infrastructure(exc):
                    log.warning(
                        "%s: consumer failed (%s: %s); consuming again", self.stream, type(exc).__name__, exc
                    )
                else:
                    log.error("%s: consumer failed; consuming again", self.stream, exc_info=exc)
            self.restarts += 1
            if time.monotonic() - started > RESTART_RESET:
                pause = RESTART_FIRST
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESTART_MAX)

    async def _declare(self) -> aio_pika.abc.AbstractQueue:
        name = amqp.work_queue(self.stream)
        return await self.channel.declare_queue(name, durable=True, arguments=dict(self.broker.queues[name]))

    async def _consume(self, queue: aio_pika.abc.AbstractQueue) -> None:
        async with queue.iterator() as messages:
            self.iterator = messages
            async for message in messages:
                self._received = True
                if not self.concurrent:
                    await self.settle(message)
                    continue
                # Prefetch bounds how many run at once: the broker sends no more than that.
                task = asyncio.create_task(self.settle(message))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)

    async def _watch(self, queue: aio_pika.abc.AbstractQueue) -> None:
        """Raises Stalled when messages are ready at two looks in a row and none came."""
        quiet = 0
        while True:
            await asyncio.sleep(self.stall_check)
            if self._received or self._busy or not self.broker.ready:
                # Working, or reconnecting (restoring the consumer is the connection's part).
                self._received, quiet = False, 0
                continue
            try:
                # The same declaration again: its answer counts the ready messages.
                declared = await queue.declare(timeout=self.publish_timeout)
            except Exception as exc:
                if not is_infrastructure(exc):
                    raise
                continue
            ready = declared.message_count or 0
            quiet = quiet + 1 if ready else 0
            if quiet >= 2:
                raise Stalled(f"{ready} message(s) ready, none received in {2 * self.stall_check:.0f} s")

    async def settle(self, message: AbstractIncomingMessage) -> None:
        """Run the handler on one message and settle it exactly once."""
        self._busy += 1
        try:
            await self._settle(message)
        finally:
            self._busy -= 1

    async def _settle(self, message: AbstractIncomingMessage) -> None:
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
