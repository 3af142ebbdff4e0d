"""Workflows: triggers accepted per second against single notifications in the same run, and
runs falling due at one moment released by the engine.

`python -m bench.workflows [--requests 3000] [--concurrency 32] [--due 10000]` starts the user
service, the template service and the gateway (which runs the workflow engine) as processes of
their own (`bench/stack.py`: databases `notify_bench_*`, vhost, Redis db), no workers, so what is
measured is acceptance and the engine, not delivery (the work queue fills and is purged).

1. **Triggers against notifications.** The same closed loop (`--concurrency` requests at a time,
   `--requests` in all) sends `POST /api/v1/notifications/` (the baseline: one email) and then
   `POST /api/v1/workflows/{key}/trigger` for a workflow of one email step. Reported: accepted
   per second, p50/p99 latency, the gateway's CPU µs per request (its process and children, from
   /proc), and the trigger's rate as a ratio to the notifications'. A trigger's 202 means the run
   is stored; its email is made by the engine afterwards: the section also says how long until
   every run's notification existed.
2. **Due at once.** `--due` runs of `delay until payload.at` then one email, all with the same
   `at` a little after the last trigger is in: from that moment, how long until the engine has
   made every run's notification (runs released per second), two engines' worth of gateway
   being one process here.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from bench.accept import EMAIL_TEMPLATE, create_fixture
from bench.stack import BenchEnv, Proc, api, exclusive_run
from common.broker.amqp import work_queue


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    bodies: list[dict[str, Any]],
    concurrency: int,
) -> tuple[float, list[float]]:
    """Send every body, `concurrency` at a time; the seconds it took and each request's latency.
    Anything but a 202 stops the run: a benchmark of refusals measures nothing."""
    latencies: list[float] = []
    pending = iter(bodies)

    async def one_client() -> None:
        for body in pending:
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as response:
                if response.status != 202:
                    raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
                await response.read()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def made_by_runs(env: BenchEnv, key: str) -> int:
    database = await env.notifications_db()
    return int(
        await database.fetchval(
            "SELECT count(*) FROM notifications n JOIN workflow_runs r ON r.id = n.workflow_run_id"
            " WHERE r.workflow_key = %s",
            key,
        )
    )


async def wait_made(env: BenchEnv, key: str, expected: int, timeout: float) -> float:
    """Seconds until `expected` notifications of the workflow's runs exist (polled every 50 ms)."""
    started = time.perf_counter()
    while (made := await made_by_runs(env, key)) < expected:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(
                f"only {made:,} of {expected:,} runs made their notification in {timeout:.0f} s"
            )
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def put_workflow(
    session: aiohttp.ClientSession, gateway: Proc, headers: dict[str, str], steps: list[Any]
) -> str:
    key = f"bench-{uuid.uuid4().hex[:10]}"
    await api(session, "PUT", f"{gateway.url}/api/v1/workflows/{key}", headers, {"name": key, "steps": steps})
    return key


async def main(requests: int, concurrency: int, due: int, record: bool) -> None:
    env = BenchEnv(Path(tempfile.mkdtemp(prefix="bench-workflows-")))
    await env.setup()
    try:
        procs = await env.start_core()
        gateway = procs["gateway"]
        user_id, code = await create_fixture(env, gateway, EMAIL_TEMPLATE)
        headers = env.headers
        variables = {"name": "Ada", "link": "https://example.com/start"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as session:
            one_email = [{"name": "hello", "type": "email", "template_code": code}]
            key = await put_workflow(session, gateway, headers, one_email)
            singles = [
                {
                    "notification_type": "email",
                    "user_id": user_id,
                    "template_code": code,
                    "variables": variables,
                    "request_id": f"n-{i}-{uuid.uuid4().hex}",
                }
                for i in range(requests)
            ]
            triggers = [
                {"to": user_id, "payload": variables, "request_id": f"t-{i}-{uuid.uuid4().hex}"}
                for i in range(requests)
            ]
            rows = []
            figures: dict[str, tuple[float, float]] = {}
            for name, url, bodies in (
                ("single notifications (`POST /api/v1/notifications/`)", "/api/v1/notifications/", singles),
                ("workflow triggers, one email step", f"/api/v1/workflows/{key}/trigger", triggers),
            ):
                cpu = gateway.cpu_seconds()
                seconds, latencies = await closed_loop(
                    session, gateway.url + url, headers, bodies, concurrency
                )
                cpu = gateway.cpu_seconds() - cpu
                figures[name] = (requests / seconds, cpu / requests * 1e6)
                rows.append(
                    [
                        name,
                        f"{requests / seconds:,.0f}",
                        f"{quantile(latencies, 0.5) * 1000:.1f}",
                        f"{quantile(latencies, 0.99) * 1000:.1f}",
                        f"{cpu / requests * 1e6:,.0f}",
                    ]
                )
            made_after = await wait_made(env, key, requests, timeout=300)
            (base_rate, base_cpu), (rate, trigger_cpu) = figures.values()
            await env.purge(work_queue("email"))

            # Due at once: every run waits for the same moment, a little after the last trigger.
            waiting = [
                {"name": "wait", "type": "delay", "until": "payload.at"},
                {"name": "hello", "type": "email", "template_code": code},
            ]
            due_key = await put_workflow(session, gateway, headers, waiting)
            lead = due / max(rate / 2, 50) + 10  # seconds the triggers take, with room to spare
            at = datetime.now(UTC) + timedelta(seconds=lead)
            bodies = [
                {
                    "to": user_id,
                    "payload": {**variables, "at": at.isoformat()},
                    "request_id": f"d-{i}-{uuid.uuid4()}",
                }
                for i in range(due)
            ]
            await closed_loop(
                session, f"{gateway.url}/api/v1/workflows/{due_key}/trigger", headers, bodies, concurrency
            )
            early = await made_by_runs(env, due_key)
            if early:
                raise RuntimeError(f"{early} runs made their notification before their moment")
            await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
            cpu = gateway.cpu_seconds()
            released = await wait_made(env, due_key, due, timeout=600)
            release_cpu = gateway.cpu_seconds() - cpu
            await env.purge(work_queue("email"))
    finally:
        await env.teardown()

    section = report.Section("Workflows: triggers and runs due at once")
    section.table(
        ["run", "accepted/s", "p50 ms", "p99 ms", "gateway CPU µs/request"],
        rows,
        caption=f"{requests:,} requests each, {concurrency} at a time, one user, one email template,"
        " no workers",
    )
    section.note(
        f"Triggers ran at {rate / base_rate:.2f} x the single notifications' rate, at"
        f" {trigger_cpu / base_cpu:.2f} x their gateway CPU per request. A trigger's 202 stores the run;"
        f" the engine made all {requests:,} runs' notifications {made_after:.1f} s after the last 202."
    )
    section.table(
        ["runs due at one moment", "all released after (s)", "runs released/s", "gateway CPU µs/run"],
        [[f"{due:,}", f"{released:.1f}", f"{due / released:,.0f}", f"{release_cpu / due * 1e6:,.0f}"]],
        caption="`delay until payload.at` then one email; released = the run's email notification exists",
    )
    section.note(
        "One gateway process runs the engine (due runs claimed with FOR UPDATE SKIP LOCKED); figures"
        " from a 2-core machine that also runs PostgreSQL and RabbitMQ: the ratios are what compare."
    )
    if record:
        report.append(section)


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workflows")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with exclusive_run():
        asyncio.run(main(args.requests, args.concurrency, args.due, not args.no_record))


if __name__ == "__main__":
    run()
