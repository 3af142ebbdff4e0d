"""Background loops of a service: started with the app, asked to stop with it, then awaited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0


async def stop(task: asyncio.Task[None], wake: Callable[[], None], timeout: float = STOP_TIMEOUT) -> None:
    """Stop a background loop by asking it (`wake`) and waiting, not by cancelling it: a
    cancellation landing inside an aiopg query can leave the connection, and shutdown, stuck.
    Cancelled only if it does not finish in time."""
    wake()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        log.warning("%s did not stop within %gs; cancelled", task.get_name(), timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def loop(
    name: str, body: Callable[[web.Application, asyncio.Event], Coroutine[Any, Any, None]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running `body(app, stop)` until the app stops; `body` returns soon
    after `stop` is set."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        stopping = asyncio.Event()
        task = asyncio.create_task(body(app, stopping), name=name)
        try:
            yield
        finally:
            await stop(task, stopping.set)

    return ctx


async def rounds(
    stopping: asyncio.Event,
    interval: float,
    step: Callable[[], Awaitable[Any]],
    what: str,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Run `step` every `interval` seconds until asked to stop, skipping rounds while not
    `ready`; a round that fails is logged and the next one tries again."""
    while not stopping.is_set():
        await sleep(stopping, interval)
        if stopping.is_set() or not ready():
            continue
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("%s round failed: %s: %s", what, type(exc).__name__, exc)


async def sleep(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when asked to stop."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass
