"""Health, metrics, topology and configuration: what an operator relies on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from common.config import Config, ConfigError
from common.keys import DB_KEY
from tests.conftest import Stack
from topology import TopologyConflict, declare, table

ROOT = Path(__file__).resolve().parent.parent


async def test_health_names_each_dependency(stack: Stack) -> None:
    expected = {
        "gateway": {"postgres": "ok", "rabbitmq": "ok", "redis": "ok"},
        "user_service": {"postgres": "ok", "redis": "ok"},
        "template_service": {"postgres": "ok", "redis": "ok"},
        "email_worker": {"postgres": "ok", "rabbitmq": "ok", "redis": "ok"},
    }
    async with aiohttp.ClientSession() as session:
        for service, checks in expected.items():
            async with session.get(stack.urls[service] + "/health") as response:
                body = await response.json()
                assert response.status == 200, body
                assert body["data"]["service"] == service
                assert body["data"]["checks"] == checks
                assert response.headers["X-Correlation-ID"]
            async with session.get(stack.urls[service] + "/metrics") as response:
                assert response.status == 200
                assert "notify_http_requests_total" in await response.text()


async def test_health_is_503_naming_rabbitmq_when_it_cannot_be_reached(stack_factory: Any) -> None:
    from common.keys import BROKER_KEY

    stack = await stack_factory(workers=False)
    await stack.gateway.app[BROKER_KEY].connection.close()
    response = await stack.gateway.get("/health")
    body = await response.json()
    assert response.status == 503
    assert body["error"] == "service_unavailable"
    assert body["data"]["checks"]["rabbitmq"].startswith("down")
    assert body["data"]["checks"]["postgres"] == "ok" and body["data"]["checks"]["redis"] == "ok"
    assert "rabbitmq" in body["message"]
    live = await stack.gateway.get("/health/live")
    assert live.status == 200


async def test_metrics_count_accepted_delivered_failed_retried(stack: Stack) -> None:
    from prometheus_client import generate_latest

    from common.web.http import METRICS_KEY

    stack.smtp.script = ["451 later"]
    user = await stack.create_user()
    template = await stack.create_template()
    _, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": "Ada", "link": "x"},
            "request_id": str(uuid.uuid4()),
        }
    )
    await stack.wait_for(body["data"]["notification_id"], "delivered")
    stack.smtp.script = ["554 no"]
    _, body, _ = await stack.send(
        {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": template["code"],
            "variables": {"name": "Ada", "link": "x"},
            "request_id": str(uuid.uuid4()),
        }
    )
    await stack.wait_for(body["data"]["notification_id"], "failed")

    gateway_metrics = await (await stack.gateway.get("/metrics")).text()
    assert 'notify_notifications_accepted_total{channel="email"} 2.0' in gateway_metrics
    assert "notify_http_request_duration_seconds_bucket" in gateway_metrics
    worker = generate_latest(stack.apps["email_worker"][METRICS_KEY].registry).decode()
    assert 'notify_notifications_delivered_total{channel="email",provider="smtp"} 1.0' in worker
    assert 'notify_notifications_retried_total{channel="email"} 1.0' in worker
    assert 'notify_notifications_failed_total{channel="email",reason="permanent"} 1.0' in worker
    assert 'notify_end_to_end_latency_seconds_count{channel="email"} 1.0' in worker


async def test_declaring_the_topology_twice_changes_nothing(base_config: Config, amqp_channel: Any) -> None:
    first = await declare(amqp_channel, base_config)
    second = await declare(amqp_channel, base_config)
    assert first == second
    assert {
        "failed.queue",
        "email.queue",
        "push.queue",
        "email.retry.1",
        "email.retry.2",
        "push.retry.2",
    } <= set(first)
    email_queue = next(s for s in table(base_config) if s.name == "email.queue")
    assert email_queue.arguments["x-max-priority"] == 10
    retry = next(s for s in table(base_config) if s.name == "email.retry.2")
    assert retry.arguments["x-message-ttl"] == 1000
    assert retry.arguments["x-dead-letter-exchange"] == "notifications.direct"
    assert retry.arguments["x-dead-letter-routing-key"] == "email"


async def test_a_conflicting_queue_gives_a_clear_error(base_config: Config) -> None:
    vhost_url = base_config.rabbitmq_url
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        await declare(channel, base_config)
        changed = replace(base_config, retry_delays=(7.0, 1.0))
        with pytest.raises(TopologyConflict) as info:
            await declare(await connection.channel(), changed)
        message = str(info.value)
        assert "email.retry.1" in message and "x-message-ttl" in message
        assert "delete" in message
    finally:
        await connection.close()

    env = {**os.environ, "RABBITMQ_URL": vhost_url, "RETRY_DELAYS": "7,1"}
    result = await _run_topology(env)
    assert result.returncode == 1
    assert "email.retry.1" in result.stderr and "x-message-ttl" in result.stderr
    env["RETRY_DELAYS"] = "0.5,1"
    ok = await _run_topology(env)
    assert ok.returncode == 0, ok.stderr


async def _run_topology(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "topology"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RETRY_DELAYS", "1,soon", "RETRY_DELAYS"),
        ("RETRY_DELAYS", "-1", "RETRY_DELAYS"),
        ("SMTP_PORT", "70000", "SMTP_PORT"),
        ("SMTP_TLS", "maybe", "SMTP_TLS"),
        ("RABBITMQ_URL", "http://x", "RABBITMQ_URL"),
        ("EMAIL_PROVIDERS", "smtp,pigeon", "EMAIL_PROVIDERS"),
        ("WORKER_PREFETCH", "0", "WORKER_PREFETCH"),
        ("GATEWAY_PROCESSES", "0", "GATEWAY_PROCESSES"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL"),
    ],
)
def test_a_malformed_setting_is_refused_naming_it(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        Config.from_env({variable: value})


def test_defaults_are_the_documented_ones() -> None:
    config = Config.from_env({})
    assert config.rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert config.retry_delays == (1, 5, 25, 125, 625) and config.max_attempts == 6
    assert config.email_providers == ("smtp",) and config.smtp_port == 1025
    assert config.gateway_processes == 1
    parsed = Config.from_env({"RETRY_DELAYS": "1, 2", "GATEWAY_API_KEYS": "a, b"})
    assert parsed.retry_delays == (1.0, 2.0) and parsed.gateway_api_keys == ("a", "b")


@pytest.mark.parametrize(
    "module", ["gateway.py", "user_service.py", "template_service.py", "email_worker.py"]
)
def test_a_service_refuses_to_start_with_a_clear_message(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"GATEWAY_API_KEYS", "INTERNAL_API_TOKEN"}}
    env["RETRY_DELAYS"] = "fast"
    result = subprocess.run(
        [sys.executable, module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "configuration error: RETRY_DELAYS='fast' is not valid" in result.stderr
    env.pop("RETRY_DELAYS")
    result = subprocess.run(
        [sys.executable, module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "must be set" in result.stderr


async def test_db_pool_size_bounds_every_pool_of_every_service(stack_factory: Any) -> None:
    stack = await stack_factory(db_pool_size=3)
    for name, app in stack.apps.items():
        assert app[DB_KEY].pool.maxsize == 3, name
    default = await stack_factory()
    assert default.apps["gateway"][DB_KEY].pool.maxsize == 20
    assert default.apps["email_worker"][DB_KEY].pool.maxsize == 10
