"""Test fixtures: the real PostgreSQL, Redis and RabbitMQ, in databases, a Redis db and a vhost
of the suite's own, so a running `make run` is not disturbed and the suite can run again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import aio_pika
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import email_worker
import gateway
import inbox_worker
import push_worker
import template_service
import user_service
from common.broker.amqp import FAILED_QUEUE
from common.config import Config
from common.data import db
from common.data.migrate import databases, migrate_all
from scripts.localenv import rabbitmq_vhost
from tests.browser import browser  # noqa: F401 - the browser tests' fixture (Chromium)
from tests.smtp_sink import SmtpSink
from topology import declare, table

# Under pytest-xdist (`make test`) every worker has resources of its own: its databases and vhost
# carry the worker's id (notify_test_gw0_users_db, vhost notify_test_gw0), and its Redis database
# is TEST_REDIS_DB minus the worker's index (15, 14, 13, 12 for four workers). Servers a test
# starts itself (SMTP sinks, proxies, a RabbitMQ cluster) take free ports and names of their own.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; empty without xdist
WORKER_INDEX = int(WORKER[2:]) if WORKER.startswith("gw") else 0
BASE_PREFIX = os.environ.get("NOTIFY_TEST_PREFIX", "notify_test")
PREFIX = f"{BASE_PREFIX}_{WORKER}" if WORKER else BASE_PREFIX
PG = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP_HOST = os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1")
BASE_REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "15"))
REDIS_DB = BASE_REDIS_DB - WORKER_INDEX
API_KEY = "test-client-key-0123456789"
INTERNAL_TOKEN = "test-internal-token-0123456789"

# Fixtures that need the real PostgreSQL, Redis or RabbitMQ, or start servers of their own: a test
# that uses any of them (directly or through another fixture) is marked `stack`, and
# `pytest -m "not stack"` (`make test-fast`) runs the others, the pure tests.
STACK_FIXTURES = frozenset(
    {
        "base_config",
        "amqp_channel",
        "smtp_sink",
        "stack_factory",
        "stack",
        "own_vhost",
        "quorum_vhost",
        "rabbit_cluster",
        "browser",
        "own_servers",
        "own_redis",
    }
)


def redis_dbs(workers: int, base: int = BASE_REDIS_DB) -> list[int]:
    """The Redis databases `workers` workers use: base, base - 1, ...; never db 0 (the machine's
    default, `make run`'s), nor below it."""
    lowest = base - max(workers, 1) + 1
    if lowest < 1:
        raise pytest.UsageError(
            f"TEST_REDIS_DB={base} with {workers} workers would use Redis databases {base} down to "
            f"{lowest}; each worker takes one below TEST_REDIS_DB and none may be below 1: "
            "raise TEST_REDIS_DB or run fewer workers (-n)"
        )
    return list(range(base, lowest - 1, -1))


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:  # the controller (or a run without xdist): -n as given, when a number
        numprocesses = getattr(config.option, "numprocesses", None)
        workers = str(numprocesses) if isinstance(numprocesses, int) else "1"
    redis_dbs(int(workers))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if STACK_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)
    # The longest tests first, longest of all first: xdist hands tests out in this order, and a
    # minute-long one handed out last would leave the other workers idle while it runs alone.
    items.sort(key=_rank)


def _rank(item: pytest.Item) -> int:
    return next((rank for rank, slow in enumerate(LONGEST) if slow in item.nodeid), len(LONGEST))


# The tests that take longest (tens of seconds each: `pytest --durations=30`), longest first;
# most wait on a clock or a fault rather than use a core.
LONGEST = (
    "test_soak.py::test_a_short_soak",  # about three minutes, mostly waiting on its faults
    "templates-negative",
    "test_restarts.py",
    "test_a_gateway_killed_while_dispatching_loses_nothing",
    "test_send_at_local_and_quiet_hours",
    "test_a_daily_digest_at_a_local_time_in_a_half_hour_zone",
    "test_230_concurrent_triggers_through_two_gateways",
    "bulk-negative",
    "users-negative",
    "notifications-negative",
    "test_rabbit_cluster.py",
    "test_several_times_its_capacity",
    "test_a_fanout_killed_half_way",
    "test_black_holes.py::test_postgres_black_hole",
    "test_black_holes.py::test_rabbitmq_black_hole",
    "test_a_large_topic_fans_out_under_back_pressure",
    "test_black_holes.py::test_redis_black_hole",
    "test_schemathesis_finds_no_server_error",
    "test_ten_thousand_due_at_once",
    "test_a_fan_out_whose_gateway_is_sigkilled",
    "test_broker_cut_at_gateway_and_worker",
)


@pytest.fixture(scope="session")
def base_config() -> Iterator[Config]:
    config = Config(
        rabbitmq_url=f"amqp://guest:guest@{AMQP_HOST}:5672/{PREFIX}",
        redis_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
        users_db_url=f"{PG}/{PREFIX}_users_db",
        templates_db_url=f"{PG}/{PREFIX}_templates_db",
        notifications_db_url=f"{PG}/{PREFIX}_notifications_db",
        gateway_api_keys=(API_KEY,),
        internal_api_token=INTERNAL_TOKEN,
        jwt_secret="test-jwt-secret-0123456789abcdef",
        retry_delays=(0.5, 1.0),
        smtp_timeout=5.0,
        http_timeout=5.0,
        worker_prefetch=16,
        log_format="text",
        # Many tests log in from 127.0.0.1; the login throttle has a test of its own.
        login_rate_limit=1000,
        wrong_key_limit=1000,  # and wrong keys from 127.0.0.1 (tests/test_hostile.py has its own)
    )
    rabbitmq_vhost("add", PREFIX, AMQP_HOST)

    async def fresh() -> None:
        for url in databases(config).values():
            await db.drop_database(url)
        await migrate_all(config)

    asyncio.run(fresh())
    redis.Redis.from_url(config.redis_url).flushdb()
    yield config

    async def drop() -> None:
        for url in databases(config).values():
            await db.drop_database(url)

    asyncio.run(drop())
    redis.Redis.from_url(config.redis_url).flushdb()
    rabbitmq_vhost("delete", PREFIX, AMQP_HOST)


@pytest.fixture
async def amqp_channel(base_config: Config) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel on the test vhost; every queue of the topology starts empty."""
    connection = await aio_pika.connect(base_config.rabbitmq_url)
    channel = await connection.channel()
    await declare(channel, base_config)
    for spec in table(base_config):
        queue = await channel.get_queue(spec.name)
        await queue.purge()
    yield channel
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), 5)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@dataclass
class Stack:
    config: Config
    gateway: TestClient
    apps: dict[str, web.Application]
    urls: dict[str, str]
    smtp: SmtpSink

    def headers(self, key: str = API_KEY, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", **extra}

    async def create_user(self, key: str = API_KEY, **fields: Any) -> dict[str, Any]:
        body = {
            "name": "Ada Lovelace",
            "email": f"ada-{time.time_ns()}@example.com",
            "password": "correct horse battery",
            **fields,
        }
        response = await self.gateway.post("/api/v1/users/", json=body, headers=self.headers(key))
        assert response.status == 201, await response.text()
        return (await response.json())["data"]

    async def create_template(
        self, code: str | None = None, key: str = API_KEY, **fields: Any
    ) -> dict[str, Any]:
        body = {
            "code": code or f"welcome-{time.time_ns()}",
            "notification_type": "email",
            "language": "en",
            "subject": "Welcome, {{ name }}!",
            "body": "<p>Hello {{ name }}, start here: <a href='{{ link }}'>{{ link }}</a></p>",
            **fields,
        }
        response = await self.gateway.post("/api/v1/templates/", json=body, headers=self.headers(key))
        assert response.status == 201, await response.text()
        return (await response.json())["data"]

    async def send(self, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any], Any]:
        response = await self.gateway.post(
            "/api/v1/notifications/", json=body, headers=self.headers(**headers)
        )
        return response.status, await response.json(), response.headers

    async def send_email(
        self, user_id: str, template_code: str, key: str = API_KEY, **fields: Any
    ) -> tuple[int, dict[str, Any], Any]:
        """An email notification to one user, with the variables the default template needs
        (`fields` adds or replaces any part of the body)."""
        body = {
            "notification_type": "email",
            "user_id": user_id,
            "template_code": template_code,
            "variables": {"name": "Ada", "link": "https://example.com"},
            "request_id": f"req-{uuid.uuid4()}",
            **fields,
        }
        return await self.send(body, Authorization=f"Bearer {key}")

    async def notification(self, notification_id: str, key: str = API_KEY) -> dict[str, Any]:
        response = await self.gateway.get(
            f"/api/v1/notifications/{notification_id}", headers=self.headers(key)
        )
        assert response.status == 200, await response.text()
        return (await response.json())["data"]

    async def wait_for(
        self, notification_id: str, *statuses: str, timeout: float = 15, key: str = API_KEY
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            record = await self.notification(notification_id, key)
            if record["status"] in statuses:
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"status stayed {record['status']!r}, wanted {statuses}: {record}")
            await asyncio.sleep(0.05)


async def _serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def stack_factory(base_config: Config, amqp_channel: Any, smtp_sink: SmtpSink) -> AsyncIterator[Any]:
    """Start the five services (the workers optional) through their real create_app factories."""
    started: list[Any] = []

    # The gateway's reconciler republishes whatever is not final in the store: work an earlier
    # test left unfinished on purpose must not reach this test's SMTP server. Nor may an earlier
    # test's client webhook endpoint be sent this test's events.
    database = await db.connect(base_config.notifications_db_url, maxsize=1)
    try:
        await database.execute(
            "TRUNCATE notifications, notification_events, notification_keys, webhook_endpoints CASCADE"
        )
    finally:
        await database.close()

    async def start(
        *,
        workers: bool = True,
        push: bool = False,
        inbox: bool = False,
        gateway_config: dict[str, Any] | None = None,
        worker_config: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Stack:
        config = replace(base_config, smtp_port=smtp_sink.port, **overrides)
        users = await _serve(user_service.create_app(config))
        templates = await _serve(template_service.create_app(config))
        started.extend([users, templates])
        config = replace(
            config,
            user_service_url=str(users.make_url("")).rstrip("/"),
            template_service_url=str(templates.make_url("")).rstrip("/"),
        )
        apps = {"user_service": users.app, "template_service": templates.app}
        urls = {"user_service": config.user_service_url, "template_service": config.template_service_url}
        client = TestClient(
            TestServer(gateway.create_app(replace(config, **(gateway_config or {}))), host="127.0.0.1")
        )
        await client.start_server()
        started.append(client)
        apps["gateway"] = client.app
        urls["gateway"] = str(client.make_url("")).rstrip("/")
        if workers:
            worker = await _serve(email_worker.create_app(replace(config, **(worker_config or {}))))
            started.append(worker)
            apps["email_worker"] = worker.app
            urls["email_worker"] = str(worker.make_url("")).rstrip("/")
        if push:
            push_server = await _serve(push_worker.create_app(config))
            started.append(push_server)
            apps["push_worker"] = push_server.app
            urls["push_worker"] = str(push_server.make_url("")).rstrip("/")
        if inbox:
            inbox_server = await _serve(inbox_worker.create_app(config))
            started.append(inbox_server)
            apps["inbox_worker"] = inbox_server.app
            urls["inbox_worker"] = str(inbox_server.make_url("")).rstrip("/")
        return Stack(config, client, apps, urls, smtp_sink)

    yield start
    # Workers first, so nothing is consumed by a half-stopped stack.
    for item in reversed(started):
        await item.close()


@pytest.fixture
async def stack(stack_factory: Any) -> Stack:
    return await stack_factory()


async def failed_queue_messages(
    channel: aio_pika.abc.AbstractChannel,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    queue = await channel.get_queue(FAILED_QUEUE)
    found = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        found.append(message)
    return found
