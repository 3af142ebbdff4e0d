"""Nothing lost, nothing sent twice: broker and database outages, crashes, poison, abuse."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest

from common.broker.amqp import EXCHANGE
from tests.conftest import API_KEY, Stack, failed_queue_messages
from tests.processes import ServiceProcess
from tests.smtp_sink import free_port
from tests.tcp_proxy import TcpProxy, via


async def send_many(
    stack: Stack, user_id: str, code: str, count: int, concurrency: int = 10, within: float | None = None
) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with gate:
            started = time.monotonic()
            status, body, _ = await stack.send(
                {
                    "notification_type": "email",
                    "user_id": user_id,
                    "template_code": code,
                    "variables": {"name": "N", "link": "l"},
                    "request_id": str(uuid.uuid4()),
                }
            )
            assert status == 202, body
            if within is not None:
                assert time.monotonic() - started < within, "accepting must not wait for the broker"
            return str(body["data"]["notification_id"])

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_delivered(stack: Stack, user_id: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        total, cursor = 0, ""
        while cursor is not None:  # the list is not counted: follow its `after` cursors
            response = await stack.gateway.get(
                f"/api/v1/notifications/?user_id={user_id}&status=delivered&limit=100"
                + (f"&after={cursor}" if cursor else ""),
                headers=stack.headers(),
            )
            page = await response.json()
            total += len(page["data"])
            cursor = page["meta"]["next"]
        if total >= expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{total} of {expected} delivered")
        await asyncio.sleep(0.2)


async def received_at_least(stack: Stack, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(stack.smtp.notification_ids()) < count:
        assert time.monotonic() < deadline, "the flow did not start"
        await asyncio.sleep(0.01)


def metric(text: str, name: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


# Seconds an accept may take while the broker is away: it must not wait for a publish at all.
ACCEPT_BOUND = 3.0


async def test_broker_cut_at_gateway_and_worker_loses_nothing(stack_factory: Any, base_config: Any) -> None:
    amqp_target = urlsplit(base_config.rabbitmq_url)
    gateway_link = TcpProxy(amqp_target.hostname or "127.0.0.1", amqp_target.port or 5672)
    worker_link = TcpProxy(amqp_target.hostname or "127.0.0.1", amqp_target.port or 5672)
    await gateway_link.start()
    await worker_link.start()
    stack = await stack_factory(
        gateway_config={"rabbitmq_url": via(base_config.rabbitmq_url, gateway_link)},
        worker_config={"rabbitmq_url": via(base_config.rabbitmq_url, worker_link)},
    )
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    ids = await send_many(stack, user["id"], code, 100)
    await gateway_link.cut()
    # Accepted while the broker is away, without waiting for a publish to time out.
    ids += await send_many(stack, user["id"], code, 150, within=ACCEPT_BOUND)
    await worker_link.cut()
    ids += await send_many(stack, user["id"], code, 100, within=ACCEPT_BOUND)
    await gateway_link.restore()
    await asyncio.sleep(2)
    await worker_link.restore()
    ids += await send_many(stack, user["id"], code, 150)

    await wait_delivered(stack, user["id"], 500, timeout=90)
    await asyncio.sleep(1)  # time for a duplicate to show up, were there one
    received = stack.smtp.notification_ids(user["email"])
    assert len(set(ids)) == 500
    assert sorted(received) == sorted(ids)  # each exactly once
    await gateway_link.close()
    await worker_link.close()


async def test_gateway_answers_503_without_its_database_and_recovers(
    stack_factory: Any, base_config: Any
) -> None:
    target = urlsplit(base_config.notifications_db_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await link.start()
    stack = await stack_factory(
        workers=False, gateway_config={"notifications_db_url": via(base_config.notifications_db_url, link)}
    )
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    request = {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": code,
        "variables": {"name": "N", "link": "l"},
    }
    status, _, _ = await stack.send({**request, "request_id": str(uuid.uuid4())})
    assert status == 202
    await link.cut()
    for _ in range(3):
        status, body, headers = await stack.send({**request, "request_id": str(uuid.uuid4())})
        assert status == 503, body
        assert body["error"] == "service_unavailable" and "retry" in body["message"].lower()
        assert headers["Retry-After"]
    health = await stack.gateway.get("/health")
    assert health.status == 503 and (await health.json())["data"]["checks"]["postgres"].startswith("down")
    await link.restore()
    deadline = time.monotonic() + 15
    while True:
        status, body, _ = await stack.send({**request, "request_id": str(uuid.uuid4())})
        if status == 202:
            break
        assert status == 503, body  # never a 500 while it recovers
        assert time.monotonic() < deadline, "the gateway did not recover"
        await asyncio.sleep(0.2)
    assert (await stack.gateway.get("/health")).status == 200
    await link.close()


async def test_poison_messages_go_to_failed_queue_and_never_loop(stack: Stack, amqp_channel: Any) -> None:
    exchange = await amqp_channel.get_exchange(EXCHANGE)
    unknown = str(uuid.uuid4())
    await exchange.publish(aio_pika.Message(b"\x00 not json"), routing_key="email")
    await exchange.publish(aio_pika.Message(b'{"no_id": 1}'), routing_key="email")
    await exchange.publish(aio_pika.Message(orjson.dumps({"notification_id": unknown})), routing_key="email")
    found: list[Any] = []
    for _ in range(100):
        found += await failed_queue_messages(amqp_channel)
        if len(found) >= 3:
            break
        await asyncio.sleep(0.05)
    reasons = sorted(str(m.headers["x-failure-reason"]) for m in found)
    assert len(found) == 3
    assert reasons[0].startswith("unknown notification_id")
    assert all(r.startswith("unparseable message") for r in reasons[1:])
    await asyncio.sleep(0.5)
    assert await failed_queue_messages(amqp_channel) == []  # no loop: nothing comes back


async def test_a_failed_notification_can_be_retried_once(stack: Stack) -> None:
    stack.smtp.script = ["550 5.1.1 no such user"]
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    [notification_id] = await send_many(stack, user["id"], code, 1)
    await stack.wait_for(notification_id, "failed")
    path = f"/api/v1/notifications/{notification_id}/retry"
    first = await stack.gateway.post(path, headers=stack.headers())
    second = await stack.gateway.post(path, headers=stack.headers())
    assert first.status == 202 and second.status == 202
    record = await stack.wait_for(notification_id, "delivered")
    assert "manual retry" in [h["detail"] for h in record["history"]]
    again = await stack.gateway.post(path, headers=stack.headers())
    assert again.status == 409 and (await again.json())["error"] == "not_retryable"
    await asyncio.sleep(0.5)
    assert stack.smtp.notification_ids(user["email"]) == [notification_id]
    listing = await stack.gateway.get(f"/api/v1/notifications/{uuid.uuid4()}/retry", headers=stack.headers())
    assert listing.status == 405


async def test_rate_limit_per_project(stack_factory: Any) -> None:
    stack = await stack_factory(
        workers=False,
        rate_limit=5,
        rate_limit_window=60.0,
        gateway_api_keys=(API_KEY, "second:second-key-abcdef"),
    )
    for i in range(5):
        response = await stack.gateway.get("/api/v1/notifications/", headers=stack.headers())
        assert response.status == 200
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert response.headers["X-RateLimit-Remaining"] == str(4 - i)
    limited = await stack.gateway.get("/api/v1/notifications/", headers=stack.headers())
    body = await limited.json()
    assert limited.status == 429 and body["error"] == "rate_limited" and "Rate limit" in body["message"]
    assert int(limited.headers["Retry-After"]) >= 1 and limited.headers["X-RateLimit-Remaining"] == "0"
    other = await stack.gateway.get("/api/v1/notifications/", headers={"X-API-Key": "second-key-abcdef"})
    assert other.status == 200


async def test_an_oversized_body_is_413(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    response = await stack.gateway.post(
        "/api/v1/notifications/",
        data=b'{"variables": "' + b"x" * (2 * 1024 * 1024) + b'"}',
        headers={**stack.headers(), "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert (await response.json())["error"] == "payload_too_large"


async def _worker(stack: Stack, tmp_path: Path, name: str, **settings: Any) -> ServiceProcess:
    from dataclasses import replace

    process = ServiceProcess("email_worker.py", replace(stack.config, **settings), tmp_path / f"{name}.log")
    await process.start()
    return process


async def test_a_killed_worker_loses_nothing_and_duplicates_are_bounded(
    stack_factory: Any, tmp_path: Path
) -> None:
    prefetch = 10
    stack = await stack_factory(workers=False)
    stack.smtp.delay = 0.02
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    first = await _worker(stack, tmp_path, "first", worker_prefetch=prefetch, claim_timeout=2.0)
    try:
        ids = await send_many(stack, user["id"], code, 200)
        await received_at_least(stack, 40)
        first.signal(signal.SIGKILL)
        await first.wait(10)
        second = await _worker(stack, tmp_path, "second", worker_prefetch=prefetch, claim_timeout=2.0)
        try:
            await wait_delivered(stack, user["id"], 200, timeout=60)
            await asyncio.sleep(0.5)
            received = stack.smtp.notification_ids(user["email"])
            assert set(received) == set(ids)
            duplicates = len(received) - len(ids)
            reclaimed = metric(await second.metrics(), "notify_reclaimed_total")
            assert duplicates <= reclaimed <= prefetch
        finally:
            second.stop()
    finally:
        first.stop()


async def test_sigterm_finishes_in_flight_work_and_exits(stack_factory: Any, tmp_path: Path) -> None:
    stack = await stack_factory(workers=False)
    stack.smtp.delay = 0.05
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    first = await _worker(stack, tmp_path, "first", worker_prefetch=10)
    try:
        ids = await send_many(stack, user["id"], code, 100)
        await received_at_least(stack, 20)
        started = time.monotonic()
        first.signal(signal.SIGTERM)
        assert await first.wait(30) == 0
        assert time.monotonic() - started < 25
        log = (tmp_path / "first.log").read_text()
        assert "Traceback" not in log
    finally:
        first.stop()
    second = await _worker(stack, tmp_path, "second", worker_prefetch=10)
    try:
        await wait_delivered(stack, user["id"], 100, timeout=60)
        await asyncio.sleep(0.5)
        assert sorted(stack.smtp.notification_ids(user["email"])) == sorted(
            ids
        )  # nothing lost, nothing twice
        assert metric(await second.metrics(), "notify_reclaimed_total") == 0
    finally:
        second.stop()


@pytest.mark.parametrize("module", ["gateway.py", "user_service.py", "template_service.py", "push_worker.py"])
async def test_sigterm_stops_each_service_promptly(stack_factory: Any, tmp_path: Path, module: str) -> None:
    stack = await stack_factory(workers=False)
    process = ServiceProcess(module, stack.config, tmp_path / "service.log")
    await process.start()
    try:
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        assert await process.wait(30) == 0
        assert time.monotonic() - started < 20
    finally:
        process.stop()


async def test_worker_retries_while_the_user_service_is_away(stack_factory: Any, base_config: Any) -> None:
    link = TcpProxy("127.0.0.1", 1)  # the target is set once the user service's port is known
    await link.start()
    stack = await stack_factory(workers=False)
    users_url = urlsplit(stack.urls["user_service"])
    link.target = (users_url.hostname or "127.0.0.1", users_url.port or 80)
    from dataclasses import replace

    import email_worker
    from tests.conftest import _serve

    # Its Redis is unreachable too, so it cannot read the profile from the cache either.
    worker = await _serve(
        email_worker.create_app(
            replace(
                stack.config,
                user_service_url=f"http://127.0.0.1:{link.port}",
                redis_url=f"redis://127.0.0.1:{free_port()}/0",
            )
        )
    )
    try:
        user = await stack.create_user()
        code = (await stack.create_template())["code"]
        await link.cut()
        [notification_id] = await send_many(stack, user["id"], code, 1)
        record = await stack.wait_for(notification_id, "retrying")
        assert "user service unreachable" in record["error"]
        await link.restore()
        record = await stack.wait_for(notification_id, "delivered", timeout=20)
        # Our own service being away is no provider's verdict: it waited, no attempt used up.
        assert record["attempts"] == 1
        assert sum(h["status"] == "retrying" for h in record["history"]) >= 1
        assert stack.smtp.notification_ids(user["email"]) == [notification_id]
    finally:
        await worker.close()
        await link.close()


async def test_an_opt_out_after_acceptance_wins_over_a_retry(stack: Stack) -> None:
    stack.smtp.script = ["550 5.1.1 bounced"]
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    [notification_id] = await send_many(stack, user["id"], code, 1)
    await stack.wait_for(notification_id, "failed")
    response = await stack.gateway.put(
        f"/api/v1/users/{user['id']}/preferences", json={"email": False}, headers=stack.headers()
    )
    assert response.status == 200
    retry = await stack.gateway.post(
        f"/api/v1/notifications/{notification_id}/retry", headers=stack.headers()
    )
    assert retry.status == 202
    record = await stack.wait_for(notification_id, "skipped")
    assert record["error"] == "user opted out of email notifications"
    assert stack.smtp.notification_ids(user["email"]) == []


async def test_operators_can_show_and_drain_failed_queue(
    stack: Stack, amqp_channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from scripts.dead_letters import run

    exchange = await amqp_channel.get_exchange(EXCHANGE)
    for _ in range(2):
        await exchange.publish(aio_pika.Message(b"garbage"), routing_key="email")
    queue = await amqp_channel.declare_queue("failed.queue", passive=True)
    for _ in range(100):
        if queue.declaration_result.message_count >= 2:
            break
        await asyncio.sleep(0.05)
        queue = await amqp_channel.declare_queue("failed.queue", passive=True)
    url = stack.config.rabbitmq_url
    assert await run(url, drain=False, limit=10) == 2
    assert "reason=unparseable message" in capsys.readouterr().out
    assert await run(url, drain=False, limit=10) == 2  # showing removed nothing
    assert await run(url, drain=True, limit=10) == 2
    assert await run(url, drain=False, limit=10) == 0
