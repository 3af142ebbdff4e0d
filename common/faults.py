"""Which failures are the infrastructure's, and so never a reason to fail a notification.

The classification, as docs/architecture.md ("Failure semantics") has it:
- infrastructure (`INFRASTRUCTURE_ERRORS`): PostgreSQL driver errors, timeouts, connection and
  socket errors, aio-pika/aiormq channel and connection errors, a publish the broker returned or
  refused, Redis errors, the user or template service unreachable or answering 5xx, uvloop's
  stale poll handle for a new socket (`common/event_loop.py`). The worker
  holds the message and retries the step, or defers the attempt without using it up;
- a provider's transient verdict (SMTP 4xx, HTTP 429/5xx, a provider timeout): the retry queue
  for its attempt, `failed` once attempts are exhausted;
- a provider's permanent verdict (SMTP 5xx, HTTP 4xx, an invalid token): `failed` at once;
- a malformed message (not JSON, no id, an unknown notification): `failed.queue`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from redis.exceptions import RedisError

from common.broker.amqp import Unroutable
from common.data.db import DatabaseError
from common.event_loop import stale_handle
from common.lookups.clients import ServiceUnavailable

INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseError,
    TimeoutError,
    ConnectionError,
    OSError,
    AMQPError,
    ChannelInvalidStateError,
    RedisError,
    ServiceUnavailable,
    Unroutable,
)


log = logging.getLogger(__name__)

HOLD_FIRST_DELAY = 0.2
HOLD_MAX_DELAY = 5.0

T = TypeVar("T")


def is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, INFRASTRUCTURE_ERRORS) or stale_handle(exc)


async def hold(
    what: str, step: Callable[[], Awaitable[T]], on_retry: Callable[[], object] | None = None
) -> T:
    """Run a status-store step until it goes through. The store is the record: without it
    nothing can be decided, so the message is held (not requeued in a loop) meanwhile.
    `on_retry` is called on each failed try (a metric)."""
    delay, failing_since = HOLD_FIRST_DELAY, 0.0
    while True:
        try:
            result = await step()
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            if on_retry is not None:
                on_retry()
            if not failing_since:
                failing_since = time.monotonic()
                log.warning(
                    "%s failed, retrying until it goes through: %s: %s", what, type(exc).__name__, exc
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, HOLD_MAX_DELAY)
            continue
        if failing_since:
            log.info("%s went through after %.1fs of retries", what, time.monotonic() - failing_since)
        return result
