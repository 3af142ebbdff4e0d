"""A circuit breaker per provider: stop calling a provider that keeps failing, probe it now
and then, and use it again once it answers.

closed ──N consecutive failures──▶ open ──cooldown──▶ half-open (one probe) ──success──▶ closed
                                    ▲                          │
                                    └────────failure───────────┘

The state lives in the worker process: each worker finds out for itself that a provider is
down (after N failures of its own) and that it is back (after one probe of its own). That costs
a few extra calls per worker, and needs no shared store on the delivery path.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger("providers.breaker")


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        provider: str,
        threshold: int,
        cooldown: float,
        gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.threshold = threshold
        self.cooldown = cooldown
        self._gauge = gauge.labels(provider) if gauge is not None else None
        self._clock = clock
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        if self._gauge is not None:
            self._gauge.set(State.CLOSED)

    @property
    def state(self) -> State:
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when calls may go now)."""
        if self._state is not State.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def allow(self) -> bool:
        """May a call go to this provider now? In half-open, True for the one probe only:
        the caller must then report success(), failure() or release()."""
        if self._state is State.OPEN and self.retry_in() == 0.0:
            self._change(State.HALF_OPEN, "cooldown over, letting one probe through")
        if self._state is State.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
            return True
        return self._state is State.CLOSED

    def success(self) -> None:
        """The provider answered (a delivery, or a refusal of this one message)."""
        self._failures = 0
        self._probing = False
        if self._state is not State.CLOSED:
            self._change(State.CLOSED, "the provider answered again")

    def failure(self) -> None:
        """The provider failed in a way that says it is unwell (timeout, 5xx, 429, SMTP 4xx)."""
        self._probing = False
        self._failures += 1
        if self._state is State.HALF_OPEN:
            self._open("the probe failed")
        elif self._state is State.CLOSED and self._failures >= self.threshold:
            self._open(f"{self._failures} consecutive failures")

    def release(self) -> None:
        """A call ended without an answer either way (cancelled at shutdown): if it was the
        probe, the next call may probe instead."""
        self._probing = False

    def _open(self, why: str) -> None:
        self._opened_at = self._clock()
        self._change(State.OPEN, f"{why}; next probe in {self.cooldown:g}s")

    def _change(self, state: State, why: str) -> None:
        if state is self._state:
            return
        previous, self._state = self._state, state
        if self._gauge is not None:
            self._gauge.set(state)
        level = logging.WARNING if state is State.OPEN else logging.INFO
        log.log(
            level,
            "circuit for %s %s -> %s: %s",
            self.provider,
            previous.name.lower().replace("_", "-"),
            state.name.lower().replace("_", "-"),
            why,
            extra={"provider": self.provider, "circuit_state": state.name.lower()},
        )
