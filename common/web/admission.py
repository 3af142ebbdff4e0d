"""Load shedding: the gateway bounds the accept requests it has in hand, and answers the rest
with `503 overloaded` and `Retry-After`, so that under any offered load every request gets an
answer within a bound and the accepted ones keep their latency.

Why a bound at all: a request the gateway takes on waits for everything taken before it (the
event loop, the Redis pipeline, the group commit, the database pool), so past its capacity the
work in hand only grows, and with it every request's latency and the memory held for it; the
clients time out and retry, and the gateway spends itself on answers nobody waits for. Bounding
the work in hand keeps latency near (in hand) / (capacity), whatever is offered.

`Admission` is a counting gate with a waiting room, bounded in count and in time:
- at most `limit` requests are worked on at once. The limit adapts (additive increase,
  multiplicative decrease): an accept that took longer than the time budget lowers it by a
  quarter (once per budget), a quick one raises it by 1/limit, up to `max_limit`. So a fast
  machine keeps enough in hand to fill its group commits, and a slow or busy one (or one whose
  database slows down) works on fewer at once and still answers within the budget;
- up to `queue` more wait for a slot, each for at most `budget` seconds, then are shed. Waiting
  costs no CPU, so clients that do not honour Retry-After are held rather than answered in a
  tight loop that would starve the accepted ones;
- waiters are let in first come first served (a burst is smoothed, not shed) until one has
  waited out its budget: the gateway is then over its capacity, and serving the oldest first
  would only let in requests that have already waited nearly the whole budget, every accepted
  answer late. From then on the newest waiter is let in first (the old ones run out their
  budget and are shed), until the waiting room is empty again ("adaptive LIFO");
- anything beyond is shed at once, before its body is read, authenticated or parsed: a shed
  answer costs what a `/health/live` costs.

Handlers marked with `bounded` pass through the gate (`middleware`); nothing else does, so
`/health`, `/metrics`, reads and the console are never shed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import web

from common.keys import ADMISSION_KEY, METRICS_KEY
from common.web.http import json_response

# Reasons a request was shed (the `reason` label of notify_shed_total).
QUEUE_FULL = "queue_full"
WAITED_TOO_LONG = "waited_too_long"
REASONS = (QUEUE_FULL, WAITED_TOO_LONG)

MIN_LIMIT = 4  # the adaptive limit never goes below this: a few accepts always progress
DECREASE = 0.75  # the limit's factor after an accept over the budget


class Admission:
    def __init__(self, max_limit: int, queue: int, budget: float) -> None:
        self.max_limit = max_limit
        self.queue = queue
        self.budget = budget
        self.limit = float(max_limit)
        self.in_flight = 0  # admitted and not yet released
        self.waiting = 0  # waiting for a slot now
        # Oldest first; each future is resolved True (let in by `release`) or False (its wait
        # ran out). Removed from here when resolved, so it holds `waiting` entries.
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self.lifo = False  # newest first: since a waiter ran out its budget, until none waits
        self._lowered_at = -math.inf

    def _room(self) -> bool:
        return self.in_flight < min(self.max_limit, max(MIN_LIMIT, int(self.limit)))

    async def enter(self) -> str | None:
        """Take a slot, waiting for one at most `budget` seconds; None once admitted (then
        `release` must follow), else the reason the request is shed."""
        if not self._waiters and self._room():
            self.in_flight += 1
            return None
        if self.waiting >= self.queue:
            return QUEUE_FULL
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(future)
        self.waiting += 1
        timer = loop.call_later(self.budget, self._expire, future)
        try:
            admitted = await future
        except asyncio.CancelledError:
            # The request went away while waiting (its handler was cancelled). A slot given to
            # it in the same moment is passed on, or it would be lost for good.
            if future.done() and not future.cancelled() and future.result():
                self.release(None)
            else:
                self._forget(future)
            raise
        finally:
            timer.cancel()
        return None if admitted else WAITED_TOO_LONG

    def release(self, took: float | None) -> None:
        """An admitted request is done after `took` seconds (None: not measured): the limit
        adapts, and the free slots go to waiters."""
        if took is not None:
            if took > self.budget:
                now = time.monotonic()
                if now - self._lowered_at >= self.budget:  # once per budget: not once per request
                    self._lowered_at = now
                    self.limit = max(MIN_LIMIT, self.limit * DECREASE)
            elif took < self.budget / 2:
                self.limit = min(self.max_limit, self.limit + 1 / self.limit)
        self.in_flight -= 1
        while self._waiters and self._room():
            future = self._waiters.pop() if self.lifo else self._waiters.popleft()
            self.waiting -= 1
            self.in_flight += 1
            future.set_result(True)
        if not self._waiters:
            self.lifo = False

    def _expire(self, future: asyncio.Future[bool]) -> None:
        if not future.done():
            self._forget(future)
            future.set_result(False)
            self.lifo = True

    def _forget(self, future: asyncio.Future[bool]) -> None:
        # At most `queue` entries: a linear removal is cheaper than the bookkeeping to avoid it.
        try:
            self._waiters.remove(future)
        except ValueError:
            return
        self.waiting -= 1

    def retry_after(self) -> int:
        """Seconds a shed client is asked to wait (Retry-After): the budget, at least 1."""
        return max(1, math.ceil(self.budget))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BOUNDED: set[Handler] = set()


def bounded(handler: Handler) -> Handler:
    """Mark a handler whose requests pass through the gate (the accept endpoints)."""
    _BOUNDED.add(handler)
    return handler


def overloaded(retry_after: int) -> web.Response:
    return json_response(
        None,
        "The service is overloaded; retry after the time in Retry-After.",
        status=503,
        error="overloaded",
        headers={"Retry-After": str(retry_after)},
    )


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before authentication and before the body is read: a shed request costs nearly nothing."""
    if request.match_info.handler not in _BOUNDED:
        return await handler(request)
    gate = request.config_dict[ADMISSION_KEY]
    refused = await gate.enter()
    if refused is not None:
        request.config_dict[METRICS_KEY].shed.labels(refused).inc()
        return overloaded(gate.retry_after())
    started = time.monotonic()
    try:
        return await handler(request)
    finally:
        gate.release(time.monotonic() - started)
