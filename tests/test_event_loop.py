"""uvloop's stale poll handle (`common/event_loop.py`) is the infrastructure's: a worker holds
or retries, a service answers 503 with Retry-After, never a failed notification or a 500."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from common.event_loop import stale_handle
from common.faults import hold, is_infrastructure
from common.web.http import error_middleware

STALE = RuntimeError("unable to perform operation on <UVPoll closed=True 0x7f00>; the handler is closed")


def test_the_stale_handle_is_infrastructure_and_other_runtime_errors_are_not() -> None:
    assert stale_handle(STALE) and is_infrastructure(STALE)
    other = RuntimeError("dictionary changed size during iteration")
    assert not stale_handle(other) and not is_infrastructure(other)
    assert not stale_handle(ValueError("the handler is closed"))


async def test_a_store_step_is_held_through_it() -> None:
    tries = 0

    async def step() -> str:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise STALE
        return "through"

    assert await hold("claim", step) == "through" and tries == 3


async def test_a_request_that_meets_it_is_answered_503_with_retry_after() -> None:
    async def handler(request: web.Request) -> web.Response:
        raise STALE

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/stale", handler)
    app.router.add_get("/bug", broken)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/stale")
        body: Any = await response.json()
        assert response.status == 503 and body["error"] == "service_unavailable", body
        assert response.headers["Retry-After"]
        assert (await client.get("/bug")).status == 500
