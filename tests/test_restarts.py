"""Planned restarts, as production brings them, with nothing lost: while 20 notifications a second
flow through two gateways to two email workers (all real processes, on uvloop as deployed), a
PostgreSQL cluster, a RabbitMQ node and a Redis server of the test's own are restarted one after
another, then an extra gateway and an extra worker are sent SIGTERM and started again.

The client does what the API asks of one: whatever got no 202 (a 503, a refused or cut
connection) is sent again with the same `request_id`. Every request is eventually accepted,
never answered 500, and every accepted notification is delivered exactly once (a SIGTERM or a
restart is not the SIGKILL that the documented duplicate window is about)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.config import Config
from common.data import db
from common.data.migrate import migrate_all
from scripts.rabbit_cluster import Cluster
from scripts.rabbit_cluster import installed as rabbitmq_installed
from tests.conftest import API_KEY, PREFIX
from tests.own_servers import OwnPostgres, OwnRedis, postgres_installed, redis_installed
from tests.processes import ServiceProcess
from tests.smtp_sink import SmtpSink
from tests.test_email_providers import MAILGUN_SIGNING_KEY, _mailgun_failure, _mailgun_signed

RATE = 20  # notifications offered per second
FINAL = ("delivered", "failed", "skipped", "cancelled")


def _free_node_port() -> int:
    """An AMQP port whose distribution port (+20000) is free too."""
    for port in range(5911, 6100):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 20000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for the test's RabbitMQ node")


@dataclass
class Servers:
    postgres: OwnPostgres
    redis: OwnRedis
    rabbitmq: Cluster


@pytest.fixture
def own_servers() -> Iterator[Servers]:
    if not (postgres_installed() and redis_installed() and rabbitmq_installed()):
        pytest.skip("needs pg_createcluster, redis-server and rabbitmq-server on this machine")
    name = f"{PREFIX}_restarts".replace("-", "_")
    servers = Servers(
        OwnPostgres(name),
        OwnRedis(),
        Cluster(
            Path(tempfile.mkdtemp(prefix=f"{name}-rabbit-")), _free_node_port(), size=1, prefix=f"{name}_node"
        ),
    )
    try:
        # In parallel: the RabbitMQ node alone takes several seconds to boot.
        with ThreadPoolExecutor(3) as pool:
            starts: list[Future[object]] = [
                pool.submit(servers.postgres.start),
                pool.submit(servers.redis.start),
                pool.submit(servers.rabbitmq.up),
            ]
            for started in starts:
                started.result()
        yield servers
    finally:
        servers.rabbitmq.down(remove=True)
        servers.redis.remove()
        servers.postgres.drop()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    if not redis_installed():
        pytest.skip("needs redis-server on this machine")
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        server.remove()


async def test_after_a_redis_restart_what_lived_there_is_rebuilt_or_safely_absent(
    stack_factory: Any, own_redis: OwnRedis
) -> None:
    """Redis keeps caches, rate-limit counters, Mailgun's used tokens and console sessions, and
    (here, as by default) nothing on disk: a restart loses them all. Lookups go on from
    PostgreSQL, a console user signs in again, and a Mailgun webhook signed before the restart
    is refused, since it cannot be told from a replay (fails closed); one signed since is taken."""
    stack = await stack_factory(redis_url=own_redis.url, mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    status, body, _ = await stack.send_email(user["id"], code)
    assert status == 202, body
    await stack.wait_for(body["data"]["notification_id"], "delivered")

    client = stack.gateway
    page = await (await client.get("/console/sign-in")).text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf, page
    answer = await client.post(
        "/console/sign-in", data={"api_key": API_KEY, "csrf_token": csrf.group(1)}, allow_redirects=False
    )
    assert answer.status == 303, await answer.text()
    assert (await client.get("/console/", allow_redirects=False)).status == 200
    # Signed after this Redis started (whole seconds either side: hence the pauses), handled.
    await asyncio.sleep(2)
    signed = _mailgun_signed(_mailgun_failure(user["email"], body["data"]["notification_id"]))
    first = await client.post("/api/v1/webhooks/mailgun", json=signed)
    assert first.status == 200, await first.text()
    await asyncio.sleep(2)

    await asyncio.to_thread(own_redis.restart)

    # Signed in no more: asked to sign in again, not an error page.
    answer = await client.get("/console/", allow_redirects=False)
    assert answer.status in (302, 303) and answer.headers["Location"].startswith("/console/sign-in"), answer
    # The replay, whose token Redis no longer knows: refused, not applied again.
    replay = await client.post("/api/v1/webhooks/mailgun", json=signed)
    refused = await replay.json()
    assert replay.status == 503 and refused["error"] == "replay_record_lost", refused
    assert replay.headers["Retry-After"]
    await asyncio.sleep(2)
    fresh = _mailgun_signed(_mailgun_failure(user["email"], body["data"]["notification_id"]))
    assert (await client.post("/api/v1/webhooks/mailgun", json=fresh)).status == 200
    # Caches cold, counters reset: sending goes on as before.
    status, body, _ = await stack.send_email(user["id"], code)
    assert status == 202, body
    await stack.wait_for(body["data"]["notification_id"], "delivered")


@dataclass
class Flow:
    """The client: each request retried with its request_id until it is answered 202."""

    gateways: list[str]
    user_id: str
    code: str
    statuses: Counter[str]
    accepted: dict[str, str]  # request_id -> notification_id
    errors: list[str]

    async def one(self, session: aiohttp.ClientSession, index: int) -> None:
        request_id = f"restart-{index}-{uuid.uuid4()}"
        body = {
            "notification_type": "email",
            "user_id": self.user_id,
            "template_code": self.code,
            "variables": {"name": "N", "link": "https://example.com"},
            "request_id": request_id,
        }
        deadline = time.monotonic() + 90
        attempt = 0
        while time.monotonic() < deadline:
            # Round robin, and the next try on the other gateway: one being restarted is skipped.
            url = self.gateways[(index + attempt) % len(self.gateways)]
            attempt += 1
            try:
                async with session.post(
                    url + "/api/v1/notifications/",
                    json=body,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as response:
                    self.statuses[str(response.status)] += 1
                    if response.status in (200, 202):
                        self.accepted[request_id] = (await response.json())["data"]["notification_id"]
                        return
                    text = await response.text()
                    if response.status != 503:
                        self.errors.append(f"{response.status} {text[:300]}")
                        if response.status >= 500:
                            return
                    retry_after = float(response.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.statuses[type(exc).__name__] += 1
                retry_after = 0.3
            await asyncio.sleep(min(retry_after, 1.0))
        self.errors.append(f"{request_id}: not accepted within 90 s")


async def _status_counts(config: Config, ids: list[str]) -> Counter[str]:
    database = await db.connect(config.notifications_db_url, maxsize=1)
    try:
        rows = await database.fetch("SELECT status FROM notifications WHERE id = ANY(%s::uuid[])", ids)
    finally:
        await database.close()
    return Counter(row["status"] for row in rows)


async def _wait_final(config: Config, ids: list[str], timeout: float) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        counts = await _status_counts(config, ids)
        if sum(counts[s] for s in FINAL) == len(ids) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def _processes(items: list[ServiceProcess]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for item in items:
            item.stop()


async def test_restarts_one_after_another_lose_nothing_and_send_nothing_twice(
    own_servers: Servers, base_config: Config, tmp_path: Path
) -> None:
    pg = own_servers.postgres.url
    config = replace(
        base_config,
        rabbitmq_url=own_servers.rabbitmq.urls()[0],
        redis_url=own_servers.redis.url,
        users_db_url=f"{pg}/users_db",
        templates_db_url=f"{pg}/templates_db",
        notifications_db_url=f"{pg}/notifications_db",
        event_loop="uvloop",
    )
    await migrate_all(config)
    sink = SmtpSink()
    sink.start()
    sink.delay = 0.1  # messages in the workers' hands when the broker or a worker goes
    config = replace(config, smtp_port=sink.port)
    users = ServiceProcess("user_service.py", config, tmp_path / "users.log")
    templates = ServiceProcess("template_service.py", config, tmp_path / "templates.log")
    config = replace(config, user_service_url=users.url, template_service_url=templates.url)
    gateway = ServiceProcess("gateway.py", config, tmp_path / "gateway.log")
    extra_gateway = ServiceProcess("gateway.py", config, tmp_path / "extra-gateway.log")
    worker = ServiceProcess("email_worker.py", config, tmp_path / "worker.log")
    extra_worker = ServiceProcess("email_worker.py", config, tmp_path / "extra-worker.log")
    everything = [users, templates, gateway, extra_gateway, worker, extra_worker]
    async with _processes(everything), aiohttp.ClientSession() as session:
        await asyncio.gather(*(p.start() for p in everything))
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with session.post(
            gateway.url + "/api/v1/users/",
            json={"name": "R", "email": "restarts@example.com", "password": "correct horse battery"},
            headers=headers,
        ) as response:
            assert response.status == 201, await response.text()
            user_id = (await response.json())["data"]["id"]
        code = f"restarts-{time.time_ns()}"
        async with session.post(
            gateway.url + "/api/v1/templates/",
            json={
                "code": code,
                "notification_type": "email",
                "language": "en",
                "subject": "Hi {{ name }}",
                "body": "<p>{{ link }}</p>",
            },
            headers=headers,
        ) as response:
            assert response.status == 201, await response.text()

        flow = Flow([gateway.url, extra_gateway.url], user_id, code, Counter(), {}, [])
        stop = asyncio.Event()
        requests: list[asyncio.Task[None]] = []

        async def offer() -> None:
            index = 0
            started = time.monotonic()
            while not stop.is_set():
                requests.append(asyncio.create_task(flow.one(session, index)))
                index += 1
                # Paced by the clock, not by the answers: a slow answer does not slow the offer.
                await asyncio.sleep(max(0.0, started + index / RATE - time.monotonic()))

        offering = asyncio.create_task(offer())
        timeline: list[str] = []

        def mark(what: str) -> None:
            timeline.append(f"{time.monotonic() - began:6.1f} s {what} ({len(flow.accepted)} accepted)")

        began = time.monotonic()
        try:
            await asyncio.sleep(3)
            mark("PostgreSQL restart")
            await asyncio.to_thread(own_servers.postgres.restart)
            await asyncio.sleep(4)
            mark("RabbitMQ restart")
            node = own_servers.rabbitmq.nodes[0]
            await asyncio.to_thread(own_servers.rabbitmq.stop_node, node)
            await asyncio.to_thread(own_servers.rabbitmq.start_node, node)
            await asyncio.sleep(4)
            mark("Redis restart")
            await asyncio.to_thread(own_servers.redis.restart)
            await asyncio.sleep(4)
            for process in (extra_gateway, extra_worker):
                mark(f"SIGTERM {process.module}")
                process.signal(signal.SIGTERM)
                assert await process.wait(30) == 0, f"{process.module} did not exit 0 on SIGTERM"
                await process.start()
                await asyncio.sleep(3)
            mark("the offer ends")
        finally:
            stop.set()
            await offering
        await asyncio.gather(*requests)
        mark("every request answered 202")

        ids = list(flow.accepted.values())
        counts = await _wait_final(config, ids, timeout=120)
        mark("every notification final")
        await asyncio.sleep(1)  # time for a duplicate to show up, were there one
        received = Counter(sink.notification_ids())
        sink.stop()
        print("\n".join(timeline))
        print(f"offered {len(requests)}, answers {dict(flow.statuses)}, statuses {dict(counts)}")

        assert not flow.errors, flow.errors[:10]
        assert len(flow.accepted) == len(requests) > 20 * RATE
        assert len(set(ids)) == len(ids)
        # One round of 503s while a dependency is away, not a stream of them.
        assert flow.statuses["503"] <= len(requests) // 20, dict(flow.statuses)
        assert counts["delivered"] == len(ids), f"not all delivered: {dict(counts)}"
        twice = {i: n for i, n in received.items() if n > 1}
        assert not twice, f"sent more than once: {twice}"
        assert set(received) == set(ids), "a notification was lost"
        for process in everything:
            log = process.log_path.read_text()
            assert "internal_error" not in log and "unexpected error" not in log, (
                f"{process.module}: {log[-3000:]}"
            )
