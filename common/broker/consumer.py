"""The one consumer loop: every queue of the project is consumed, drained and settled here.

A `Consumer` takes messages from one work queue and hands each to its handler (the email or push
delivery, a webhook delivery, a topic fan-out). What matters most when things fail lives here,
once:

- **settled once**: a handler that returns has its message acknowledged (unless it settled it
  itself: a nack to come back later, a reject); one that raises has it rejected to the queue's
  dead-letter route, and the error logged once; one cancelled by shutdown has it requeued;
- **acknowledged together**: the handlers that finish in one turn of the event loop (a group
  commit wakes a batch of them at once) are acknowledged in one `basic.ack` with `multiple`, for
  as long a run of delivery tags as is safely settled (`Acks`): one frame and one write where
  there were dozens, each write a system call that wakes the broker;
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
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from common.broker import amqp
from common.faults import is_infrastructure

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Acks:
    """Acknowledgements sent together, never one that covers a message not yet done.

    A `basic.ack` with `multiple` acknowledges every unsettled delivery tag up to its own on that
    channel. So for each channel this knows the tags taken from the queue and not yet finished
    (`taken` ... `finished`), and the highest tag taken: every tag up to it has been handed to a
    handler (the broker numbers deliveries in order, and the iterator keeps it), any above it is
    still in the iterator's buffer. The acks that wait in a flush are sent as one multiple ack
    for those below the lowest tag still being handled, and one by one for the rest. Keyed by
    the channel a message came on: after a reconnect, tags start again on the new channel, and
    the old one's messages come back from the broker whatever is acknowledged here."""

    def __init__(self) -> None:
        # Weak: a channel closed by a reconnect takes its entries with it.
        self._open: weakref.WeakKeyDictionary[object, set[int]] = weakref.WeakKeyDictionary()
        self._highest: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._waiting: list[AbstractIncomingMessage] = []
        self._sending: asyncio.Task[None] | None = None
        self.frames = 0  # basic.ack frames sent (the test shows it is fewer than messages)

    @staticmethod
    def _where(message: AbstractIncomingMessage) -> tuple[object, int] | None:
        with contextlib.suppress(Exception):  # a closed channel: nothing to acknowledge on it
            if message.delivery_tag is not None:
                return message.channel, message.delivery_tag
        return None

    def taken(self, message: AbstractIncomingMessage) -> None:
        where = self._where(message)
        if where is not None:
            channel, tag = where
            self._open.setdefault(channel, set()).add(tag)
            self._highest[channel] = max(tag, self._highest.get(channel, 0))

    def finished(self, message: AbstractIncomingMessage) -> None:
        """The handler is done with it, whoever settled it."""
        where = self._where(message)
        if where is not None:
            self._open.get(where[0], set()).discard(where[1])

    def ack(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge a finished message with the others finishing in this turn of the loop."""
        self._waiting.append(message)
        if self._sending is None:
            self._sending = asyncio.create_task(self._send())

    async def drain(self) -> None:
        """Every acknowledgement asked for so far sent (before the channel closes)."""
        if self._sending is not None:
            await asyncio.gather(self._sending, return_exceptions=True)

    async def _send(self) -> None:
        try:
            await asyncio.sleep(0)  # the handlers woken in this same turn join in
            while self._waiting:
                batch, self._waiting = self._waiting, []
                for single, multiple in self._plan(batch):
                    with contextlib.suppress(Exception):  # gone with its channel: it comes back
                        await single.ack(multiple=multiple)
                        self.frames += 1
        finally:
            self._sending = None

    def _plan(self, batch: list[AbstractIncomingMessage]) -> list[tuple[AbstractIncomingMessage, bool]]:
        by_channel: dict[object, list[tuple[int, AbstractIncomingMessage]]] = {}
        for message in batch:
            where = self._where(message)
            if where is not None:
                by_channel.setdefault(where[0], []).append((where[1], message))
        plan: list[tuple[AbstractIncomingMessage, bool]] = []
        for channel, tagged in by_channel.items():
            tagged.sort(key=lambda pair: pair[0])
            # Below the lowest tag still in a handler (or not yet taken), every tag is settled
            # or in this batch: one multiple ack, named by the highest of them, covers them.
            low = min(self._open.get(channel, ()), default=self._highest.get(channel, 0) + 1)
            below = [message for tag, message in tagged if tag < low]
            if len(below) > 1:
                plan.append((below[-1], True))
            elif below:
                plan.append((below[0], False))
            plan += [(message, False) for tag, message in tagged if tag >= low]
        return plan


@dataclass(frozen=True)
class FailedRoute:
    """Where a queue's dead letters go: an exchange of the consumer's channel and a routing key."""

    exchange: Callable[[], AbstractExchange]
    routing_key: str


# One `Acks` for each channel, whoever consumes on it: a multiple ack sent for one consumer covers
# the tags of every consumer of that channel, so they must all be known to the same one.
_ACKS: weakref.WeakKeyDictionary[AbstractChannel, Acks] = weakref.WeakKeyDictionary()


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
        self.acks = _ACKS.setdefault(self.channel, Acks())
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
        await self.acks.drain()

    async def _consume(self) -> None:
        name = amqp.work_queue(self.stream)
        queue = await self.channel.declare_queue(name, durable=True, arguments=dict(self.broker.queues[name]))
        async with queue.iterator() as messages:
            async for message in messages:
                self.acks.taken(message)
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
            await self.handler(message)
        except asyncio.CancelledError:
            # Stopped before it finished: back to the queue, not to the dead letters.
            self.acks.finished(message)
            await self._settle(message, lambda: message.nack(requeue=True))
            raise
        except Exception:
            log.exception("%s: unexpected error handling a message; rejected", self.stream)
            self.acks.finished(message)
            await self._settle(message, lambda: message.reject(requeue=False))
            return
        self.acks.finished(message)
        if not message.processed:
            self.acks.ack(message)

    @staticmethod
    async def _settle(message: AbstractIncomingMessage, how: Callable[[], Awaitable[None]]) -> None:
        if not message.processed:
            with contextlib.suppress(Exception):  # gone with its channel: it comes back
                await how()

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
