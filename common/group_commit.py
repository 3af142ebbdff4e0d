"""Group commit: many concurrent calls, one round trip.

Calls submitted while a batch is open (up to `size` of them, or for `delay` seconds after the
first, whichever comes first) are handed together to one `flush`, which returns one result or
exception per item, in order. Each caller gets its own: a batch that fails as a whole fails only
the calls in it, and the next batch starts fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Batcher(Generic[T, R]):
    def __init__(self, flush: Flush[T, R], *, size: int = 64, delay: float = 0.001) -> None:
        self._flush = flush
        self.size = size
        self.delay = delay
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[R]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._waiters.append(future)
        if len(self._items) >= self.size:
            self._start()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._start)
        return await future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        task = asyncio.create_task(self._run(items, waiters), name="batch-flush")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, items: list[T], waiters: list[asyncio.Future[R]]) -> None:
        try:
            results: Sequence[R | BaseException] = await self._flush(items)
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
            results = [exc] * len(items)
        for waiter, result in zip(waiters, results, strict=True):
            if waiter.done():  # the caller went away (a client that disconnected)
                continue
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    async def close(self) -> None:
        """Flush what is waiting and wait for the batches in flight."""
        self._start()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._running, return_exceptions=True)
