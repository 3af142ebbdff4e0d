"""Renders templates in child processes, so a hostile template costs a bounded time and memory
and never blocks the event loop of the service that asked.

Inside one process a template can hold the GIL in C code (a huge `center`, a join, a repr of a
nested list) where neither a thread nor a signal can stop it. A child process has its own GIL,
an address-space limit (`MEMORY_BUDGET`) and is killed when it passes the time budget; a fresh
one is started for the next render. Children are kept and reused, each rendering one template at
a time; the parent talks to them over a pipe with length-prefixed orjson frames.

Run as `python -m common.rendering.renderer` it is the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from common.rendering import templating
from common.rendering.templating import PARTS, RenderError

log = logging.getLogger("renderer")

_FRAME = struct.Struct("!I")
_ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT = 20.0


class _Child:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = process.stdout

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class RenderPool:
    """Up to `size` render processes; a render waits for a free one."""

    def __init__(
        self,
        size: int = 2,
        time_budget: float = templating.TIME_BUDGET,
        memory_budget: int = templating.MEMORY_BUDGET,
    ) -> None:
        self.size = size
        self.time_budget = time_budget
        self.memory_budget = memory_budget
        self._idle: list[_Child] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    async def _spawn(self) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "common.rendering.renderer",
            str(self.memory_budget),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=_ROOT,
        )
        return _Child(process)

    async def render(
        self,
        channel: str,
        version: Mapping[str, Any],
        variables: Mapping[str, Any],
        recipient: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Every part of a template version, or RenderError naming the budget it went beyond."""
        problem = templating.missing_variables(channel, version, variables)
        if problem is not None:
            raise problem  # known without rendering: spares a round trip
        request = orjson.dumps(
            {
                "channel": channel,
                "parts": {p: version.get(p) for p in PARTS[channel]},
                "variables": variables,
                "recipient": recipient,
            }
        )
        async with self._slots:
            if self._closed:
                raise RenderError("render_error", "The service is shutting down.")
            child = self._idle.pop() if self._idle else None
            if child is None:
                child = await asyncio.wait_for(self._spawn(), _START_TIMEOUT)
            try:
                reply = await asyncio.wait_for(self._exchange(child, request), self.time_budget)
            except TimeoutError:
                child.kill()
                await child.process.wait()
                raise templating.time_budget_error() from None
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                # The child died: past its address-space limit, in a way Python could not report.
                child.kill()
                await child.process.wait()
                raise templating.memory_budget_error() from None
            except BaseException:
                child.kill()  # cancelled mid-exchange: the pipe is out of step
                raise
            self._idle.append(child)
        if "error" in reply:
            code, message, fields = reply["error"]
            raise RenderError(code, message, fields)
        result: dict[str, str] = reply["parts"]
        return result

    @staticmethod
    async def _exchange(child: _Child, request: bytes) -> dict[str, Any]:
        child.stdin.write(_FRAME.pack(len(request)) + request)
        await child.stdin.drain()
        (length,) = _FRAME.unpack(await child.stdout.readexactly(_FRAME.size))
        reply: dict[str, Any] = orjson.loads(await child.stdout.readexactly(length))
        return reply

    async def close(self) -> None:
        self._closed = True
        children, self._idle = self._idle, []
        for child in children:
            child.stdin.close()  # the child exits at end of input
        for child in children:
            try:
                await asyncio.wait_for(child.process.wait(), 2)
            except TimeoutError:
                child.kill()
                await child.process.wait()


# --- the child ---------------------------------------------------------------------------------


def _serve(memory_budget: int) -> None:
    # Address space, not resident size: the limit holds before the kernel would have to swap.
    resource.setrlimit(resource.RLIMIT_AS, (memory_budget, memory_budget))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return  # the parent closed the pipe or exited
        (length,) = _FRAME.unpack(header)
        request = orjson.loads(stdin.read(length))
        try:
            try:
                parts = templating.render_sync(
                    request["channel"],
                    request["parts"],
                    request["variables"],
                    time.monotonic() + templating.TIME_BUDGET,
                    request.get("recipient"),
                )
                reply = orjson.dumps({"parts": parts})
            except RenderError as exc:
                reply = orjson.dumps({"error": [exc.code, exc.message, exc.fields]})
        except MemoryError:
            budget = templating.memory_budget_error()
            reply = orjson.dumps({"error": [budget.code, budget.message, budget.fields]})
        stdout.write(_FRAME.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else templating.MEMORY_BUDGET)
