"""Which failures are the infrastructure's, and so never a reason to fail a notification.

The classification, as docs/architecture.md ("Failure semantics") has it:
- infrastructure (`INFRASTRUCTURE_ERRORS`): PostgreSQL driver errors, timeouts, connection and
  socket errors, aio-pika/aiormq channel and connection errors, a publish the broker returned or
  refused, Redis errors, the user or template service unreachable or answering 5xx. The worker
  holds the message and retries the step, or defers the attempt without using it up;
- a provider's transient verdict (SMTP 4xx, HTTP 429/5xx, a provider timeout): the retry queue
  for its attempt, `failed` once attempts are exhausted;
- a provider's permanent verdict (SMTP 5xx, HTTP 4xx, an invalid token): `failed` at once;
- a malformed message (not JSON, no id, an unknown notification): `failed.queue`.
"""

from __future__ import annotations

from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from redis.exceptions import RedisError

from common.amqp import Unroutable
from common.clients import ServiceUnavailable
from common.db import DatabaseError

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


def is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, INFRASTRUCTURE_ERRORS)
