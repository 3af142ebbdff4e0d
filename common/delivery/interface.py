"""The delivery interface: what a provider or a worker's delivery step raises or returns, and the
retry decision the worker loop takes from it. Providers import this module, not the worker loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.config import max_attempts


class DeliveryError(Exception):
    """A delivery attempt failed; `transient` decides retry queue or failed.

    `retry_after` (seconds, from a provider's Retry-After) picks a retry queue at least that
    long. `defer` waits in the retry queue without using up an attempt (every provider's
    circuit is open, or our own infrastructure failed: nothing was tried). `carry` is merged
    into the message for the next attempt, e.g. which devices already have it, so a retry
    resends only what failed. `provider_fault` says whether the failure speaks of the
    provider's health (connection, TLS, auth, 421, timeouts: its circuit breaker counts it) or
    only of this message or recipient (a greylisting 451, a refused address: it does not).
    """

    def __init__(
        self,
        reason: str,
        *,
        transient: bool,
        provider: str | None = None,
        retry_after: float | None = None,
        defer: bool = False,
        carry: dict[str, Any] | None = None,
        provider_fault: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.provider = provider
        self.retry_after = retry_after
        self.defer = defer
        self.carry = carry or {}
        self.provider_fault = provider_fault


class Skip(Exception):
    """Not to be sent after all (the user opted out since it was accepted): recorded `skipped`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One attempt at one notification: the message body, and the stored row it claimed."""

    notification_id: uuid.UUID
    attempt: int
    body: dict[str, Any]
    priority: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    claim: uuid.UUID | None = None  # the claim token every write of this attempt presents


@dataclass
class Delivered:
    provider: str
    template_version: int | None = None
    language: str | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Delivery(Protocol):
    """A worker's delivery step: send one job, or raise DeliveryError / Skip."""

    async def deliver(self, job: Job) -> Delivered: ...


@dataclass(frozen=True)
class Retry:
    """Go to retry queue `queue` (1-based); the message carries `next_attempt`."""

    queue: int
    next_attempt: int
    delay: float


@dataclass(frozen=True)
class Fail:
    reason: str


def redrive_attempt(status: str, attempts: int, limit: int) -> int:
    """The attempt a lost message carried, for the reconcilers that send it again: the first
    for `pending`, the same one for a `sending` whose worker is gone, the next for `retrying`."""
    if status == "pending":
        return 1
    if status == "sending":
        return max(1, attempts)
    return min(attempts + 1, limit)


def decide(exc: DeliveryError, attempt: int, delays: Sequence[float]) -> Retry | Fail:
    """What follows a failed attempt. A transient failure goes to the retry queue for its
    attempt, or a later one when the provider asked for a longer wait; a deferral waits in the
    first one and keeps its attempt number; a permanent failure, or the last attempt, fails."""
    if not exc.transient:
        return Fail(exc.reason)
    if not exc.defer and attempt >= max_attempts(delays):
        return Fail(f"retries exhausted: {exc.reason}")
    index = 1 if exc.defer else attempt
    if exc.retry_after is not None:
        longer = [i for i, d in enumerate(delays, start=1) if i >= index and d >= exc.retry_after]
        index = longer[0] if longer else len(delays)
    return Retry(index, attempt if exc.defer else index + 1, delays[index - 1])


# A provider's report, after accepting a message, that it could not be delivered: parsed by the
# provider (`providers/`), applied by the gateway (`common/features/email_links/bounces.py`).
@dataclass(frozen=True)
class Bounce:
    provider: str
    notification_id: str | None
    reason: str
    # A hard bounce or a drop says the address does not take mail: stop sending to it.
    # A block (the receiving server refused for reputation or content) does not.
    suppress: bool = True
    # The address the provider reports it could not deliver to: a bounce applies only to a
    # notification that provider sent to that address (none given: it applies to none).
    recipient: str | None = None
