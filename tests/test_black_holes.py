"""Nothing lost, nothing stuck, when faults are not clean: a dependency that stops answering
without closing anything (a black hole), a broker that loses messages (purged or deleted
queues), a provider that greylists, a slow delivery, a status store that fails after a send.

The black holes are TCP proxies frozen for longer than every client timeout; the broker's own
tool (rabbitmqctl) purges and deletes queues. Every test counts what reached the SMTP server."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest

from common.broker.amqp import EXCHANGE, work_queue
from common.config import Config
from common.data import db
from common.keys import METRICS_KEY
from scripts.localenv import rabbitmq_vhost
from tests.conftest import PREFIX, Stack
from tests.processes import ServiceProcess
from tests.tcp_proxy import TcpProxy, via
from topology import declare


async def accept(
    stack: Stack, user: dict[str, Any], code: str, count: int, concurrency: int = 10
) -> list[str]:
    """Send `count` notifications; each must be answered 202 (retried on a 503, which only a
    store outage may give) within a few seconds."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        body = {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": code,
            "variables": {"name": "N", "link": "l"},
            "request_id": str(uuid.uuid4()),
        }
        async with gate:
            started = time.monotonic()
            status, answer, _ = await stack.send(body)
            assert status == 202, answer
            assert time.monotonic() - started < 8, "answered within a few seconds"
            return str(answer["data"]["notification_id"])

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def statuses(config: Config, ids: list[str]) -> dict[str, int]:
    """Read from the status store itself: how many of `ids` are in each status."""
    database = await db.connect(config.notifications_db_url, maxsize=1)
    try:
        rows = await database.fetch(
            "SELECT status, count(*) AS n FROM notifications WHERE id = ANY(%s::uuid[]) GROUP BY status",
            [uuid.UUID(i) for i in ids],
        )
    finally:
        await database.close()
    return {r["status"]: int(r["n"]) for r in rows}


async def all_delivered(stack: Stack, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (found := await statuses(stack.config, ids)).get("delivered", 0) < len(ids):
        assert time.monotonic() < deadline, f"not all delivered: {found}"
        await asyncio.sleep(0.25)


def exactly_once(stack: Stack, user: dict[str, Any], ids: list[str]) -> None:
    received = stack.smtp.notification_ids(user["email"])
    assert sorted(received) == sorted(ids), (
        f"{len(received)} received for {len(ids)} sent, {len(set(received))} distinct"
    )


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def received(stack: Stack, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(stack.smtp.notification_ids()) < count:
        assert time.monotonic() < deadline, "the flow did not start"
        await asyncio.sleep(0.02)


@pytest.fixture
async def own_vhost(base_config: Config) -> AsyncIterator[str]:
    """A vhost for tests that delete queues or need retry delays of their own."""
    name = f"{PREFIX}_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbitmq_vhost, "add", name)
    yield name
    await asyncio.to_thread(rabbitmq_vhost, "delete", name)


def on_vhost(config: Config, vhost: str) -> str:
    parts = urlsplit(config.rabbitmq_url)
    return parts._replace(path=f"/{vhost}").geturl()


async def test_postgres_black_hole_mid_flow_loses_nothing_and_sends_once(
    stack_factory: Any, base_config: Config
) -> None:
    target = urlsplit(base_config.notifications_db_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await link.start()
    url = via(base_config.notifications_db_url, link)
    stack = await stack_factory(
        db_timeout=2.0,
        gateway_config={"notifications_db_url": url},
        worker_config={"notifications_db_url": url},
    )
    stack.smtp.delay = 0.05
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    try:
        ids = await accept(stack, user, code, 300)
        await received(stack, 60)
        link.freeze()  # longer than every client timeout: connections stay open, nothing answers
        await asyncio.sleep(25)
        link.thaw()
        await all_delivered(stack, ids, timeout=120)
        await asyncio.sleep(1)  # time for a duplicate to show up, were there one
        exactly_once(stack, user, ids)
        worker = stack.apps["email_worker"][METRICS_KEY]
        assert worker.failed.labels("email", "internal")._value.get() == 0
    finally:
        await link.close()


async def test_messages_the_broker_lost_are_delivered_once_by_the_reconciler(
    stack_factory: Any, tmp_path: Path
) -> None:
    stack = await stack_factory(workers=False, reconcile_after=1.0)
    stack.smtp.delay = 0.2
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    worker = ServiceProcess("email_worker.py", replace(stack.config, worker_prefetch=2), tmp_path / "w.log")
    await worker.start()
    try:
        ids = await accept(stack, user, code, 40)
        await received(stack, 2)
        worker.signal(signal.SIGSTOP)
        # What the paused worker had not taken yet is lost, as with a broker node gone.
        rabbitmqctl("purge_queue", "-p", PREFIX, work_queue("email"))
        assert (await statuses(stack.config, ids)).get("pending", 0) >= 20
        worker.signal(signal.SIGCONT)
        await all_delivered(stack, ids, timeout=60)
        await asyncio.sleep(0.5)
        exactly_once(stack, user, ids)
        reconciled = stack.apps["gateway"][METRICS_KEY].reconciled.labels("email", "pending")._value.get()
        assert reconciled >= 20
        redriven = 0
        for notification_id in ids:
            record = await stack.notification(notification_id)
            redriven += any("reconciler" in (h["detail"] or "") for h in record["history"])
        # RECONCILE_AFTER is shorter here than the queue's wait, so some went twice: harmless.
        assert 20 <= redriven <= reconciled
    finally:
        worker.signal(signal.SIGCONT)
        worker.stop()


async def test_rabbitmq_black_hole_while_accepting(stack_factory: Any, base_config: Config) -> None:
    target = urlsplit(base_config.rabbitmq_url)
    gateway_link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    worker_link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await gateway_link.start()
    await worker_link.start()
    stack = await stack_factory(
        gateway_config={"rabbitmq_url": via(base_config.rabbitmq_url, gateway_link)},
        worker_config={"rabbitmq_url": via(base_config.rabbitmq_url, worker_link)},
    )
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    try:
        gateway_link.freeze()
        worker_link.freeze()
        started = time.monotonic()
        ids = await accept(stack, user, code, 100)
        assert time.monotonic() - started < 20, "100 accepted within seconds, not a timeout each"
        await asyncio.sleep(max(0.0, 25 - (time.monotonic() - started)))
        gateway_link.thaw()
        worker_link.thaw()
        await all_delivered(stack, ids, timeout=90)
        await asyncio.sleep(1)
        exactly_once(stack, user, ids)
    finally:
        await gateway_link.close()
        await worker_link.close()


async def test_redis_black_hole_costs_each_request_little(stack_factory: Any, base_config: Config) -> None:
    target = urlsplit(base_config.redis_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await link.start()
    stack = await stack_factory(redis_url=via(base_config.redis_url, link))
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    try:
        link.freeze()
        frozen_at = started = time.monotonic()
        ids = []
        for _ in range(30):  # one after another: each one's own cost adds up
            ids += await accept(stack, user, code, 1)
        assert time.monotonic() - started < 15, "30 requests answered within 15 s in total"
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - frozen_at)))
        link.thaw()
        await all_delivered(stack, ids, timeout=60)
        exactly_once(stack, user, ids)
    finally:
        await link.close()


async def test_a_purged_retry_queue_is_redriven_by_the_reconciler(
    stack_factory: Any, base_config: Config, own_vhost: str
) -> None:
    # Retries that wait long enough to be purged: a vhost of its own, for retry queues of its own.
    stack = await stack_factory(
        rabbitmq_url=on_vhost(base_config, own_vhost), retry_delays=(4.0, 4.0), reconcile_after=1.0
    )
    stack.smtp.script = ["451 4.3.0 try again later"] * 10
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    ids = await accept(stack, user, code, 10)
    deadline = time.monotonic() + 20
    while (await statuses(stack.config, ids)).get("retrying", 0) < 10:
        assert time.monotonic() < deadline, "the first attempts did not fail"
        await asyncio.sleep(0.1)
    rabbitmqctl("purge_queue", "-p", own_vhost, "email.retry.1")  # the retries are lost
    await all_delivered(stack, ids, timeout=40)
    await asyncio.sleep(0.5)
    exactly_once(stack, user, ids)
    assert stack.apps["gateway"][METRICS_KEY].reconciled.labels("email", "retrying")._value.get() >= 10


async def test_greylisting_retries_the_recipient_and_leaves_the_breaker_closed(stack_factory: Any) -> None:
    stack = await stack_factory(circuit_failure_threshold=3)
    code = (await stack.create_template())["code"]
    greylisted = [await stack.create_user() for _ in range(50)]
    others = [await stack.create_user() for _ in range(10)]
    stack.smtp.greylist = {u["email"] for u in greylisted}
    grey_ids = [i for u in greylisted for i in await accept(stack, u, code, 1)]
    other_ids = [i for u in others for i in await accept(stack, u, code, 1)]
    await all_delivered(stack, grey_ids + other_ids, timeout=60)
    for notification_id in grey_ids[:10]:
        assert (await stack.notification(notification_id))["attempts"] == 2
    for notification_id in other_ids:
        # Sent at the first attempt, never deferred by an open circuit.
        assert (await stack.notification(notification_id))["attempts"] == 1
    metrics = stack.apps["email_worker"][METRICS_KEY]
    assert metrics.circuit_state.labels("smtp")._value.get() == 0
    assert len(stack.smtp.greylisted) == 50


async def test_a_deleted_retry_queue_retries_nothing_into_the_void(
    stack_factory: Any, base_config: Config, own_vhost: str
) -> None:
    stack = await stack_factory(rabbitmq_url=on_vhost(base_config, own_vhost), reconcile_after=2.0)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    rabbitmqctl("delete_queue", "-p", own_vhost, "email.retry.1")
    stack.smtp.script = ["451 4.3.0 try again later"] * 5
    ids = await accept(stack, user, code, 5)
    deadline = time.monotonic() + 15
    while (await statuses(stack.config, ids)).get("retrying", 0) < 5:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    for notification_id in ids:
        record = await stack.notification(notification_id)
        # The broker returned the retry: the history says so, nothing pretends it was queued.
        assert any("not queued for retry" in (h["detail"] or "") for h in record["history"]), record
    connection = await aio_pika.connect(on_vhost(base_config, own_vhost))
    try:
        await declare(await connection.channel(), stack.config)  # the operator puts it back
    finally:
        await connection.close()
    await all_delivered(stack, ids, timeout=30)
    await asyncio.sleep(0.5)
    exactly_once(stack, user, ids)


async def test_recording_delivered_that_fails_after_the_send_does_not_send_again(
    stack_factory: Any, base_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    target = urlsplit(base_config.notifications_db_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await link.start()
    stack = await stack_factory(
        db_timeout=1.0, worker_config={"notifications_db_url": via(base_config.notifications_db_url, link)}
    )
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    stack.smtp.delay = 1.0  # the worker waits for the 250 while its store goes dark
    stack.smtp.received_data.clear()
    try:
        with caplog.at_level(logging.INFO):
            [notification_id] = await accept(stack, user, code, 1)
            await asyncio.to_thread(stack.smtp.received_data.wait, 15)
            link.freeze()
            await asyncio.sleep(4.5)  # several timeouts of 1 s each
            link.thaw()
            record = await stack.wait_for(notification_id, "delivered", timeout=30)
            await asyncio.sleep(1)  # time for a second send to show up, were there one
        retries = stack.apps["email_worker"][METRICS_KEY].store_retries.labels("email", "recording delivered")
        assert retries._value.get() >= 2
        assert record["attempts"] == 1
        assert stack.smtp.notification_ids(user["email"]) == [notification_id]
        assert any("went through after" in r.getMessage() for r in caplog.records)
    finally:
        await link.close()


async def test_a_delivery_outliving_its_claim_timeout_is_not_sent_twice(
    stack_factory: Any, amqp_channel: Any
) -> None:
    stack = await stack_factory(claim_timeout=1.0)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    stack.smtp.delay = 3.5  # three leases long
    stack.smtp.received_data.clear()
    [notification_id] = await accept(stack, user, code, 1)
    await asyncio.to_thread(stack.smtp.received_data.wait, 15)
    await asyncio.sleep(1.5)  # the first lease would have run out by now
    row = await stack.notification(notification_id)
    # A second copy of its message, as a redelivery or a republish would make.
    copy = {
        "notification_id": notification_id,
        "request_id": row["request_id"],
        "user_id": row["user_id"],
        "notification_type": "email",
        "template_code": code,
        "language": row["language"],
        "template_version": row["template_version"],
        "variables": row["variables"],
        "priority": 0,
        "metadata": {},
        "correlation_id": "copy",
        "attempt": 1,
    }
    exchange = await amqp_channel.get_exchange(EXCHANGE)
    await exchange.publish(aio_pika.Message(orjson.dumps(copy)), routing_key="email")
    await stack.wait_for(notification_id, "delivered", timeout=20)
    await asyncio.sleep(2)
    assert stack.smtp.notification_ids(user["email"]) == [notification_id]
    metrics = stack.apps["email_worker"][METRICS_KEY]
    assert metrics.reclaimed.labels("email")._value.get() == 0
    assert metrics.deferred_in_progress.labels("email")._value.get() >= 1


async def test_gateway_answers_503_within_seconds_when_its_store_is_a_black_hole(
    stack_factory: Any, base_config: Config
) -> None:
    target = urlsplit(base_config.notifications_db_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await link.start()
    stack = await stack_factory(
        workers=False,
        db_timeout=2.0,
        gateway_config={"notifications_db_url": via(base_config.notifications_db_url, link)},
    )
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    body = {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": code,
        "variables": {"name": "N", "link": "l"},
    }
    try:
        link.freeze()
        for _ in range(3):
            started = time.monotonic()
            status, answer, headers = await stack.send({**body, "request_id": str(uuid.uuid4())})
            assert status == 503 and answer["error"] == "service_unavailable", answer
            assert headers["Retry-After"]
            assert time.monotonic() - started < 6
        link.thaw()
        deadline = time.monotonic() + 15
        while (answer := await stack.send({**body, "request_id": str(uuid.uuid4())}))[0] != 202:
            assert time.monotonic() < deadline, f"the gateway did not recover: {answer[1]}"
            await asyncio.sleep(0.2)
    finally:
        await link.close()
