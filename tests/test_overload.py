"""Load shedding: offered several times its capacity, the gateway answers every request within
the documented bound (2 s), sheds the excess with `503 overloaded` and `Retry-After`, keeps its
memory, delivers every accepted notification exactly once, and is back to normal at once."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import statistics
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from common.data import db
from common.web.admission import MIN_LIMIT, QUEUE_FULL, WAITED_TOO_LONG, Admission
from tests.conftest import API_KEY, Stack
from tests.processes import ServiceProcess
from tests.test_faults import metric

ROOT = Path(__file__).resolve().parent

# What the test offers: wrk's connections, each sending its next request as soon as the last
# is answered (a closed loop of 400: several times what one gateway process accepts at once).
CONNECTIONS = 400
DURATION = 20
ANSWER_BOUND = 2.0  # seconds: the documented bound on every answer under overload
IN_HAND = 32  # the gateway's ACCEPT_CONCURRENCY here: the test's connections are 12 times it


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wrk_script(tmp_path: Path, user_id: str, code: str, prefix: str) -> Path:
    body = orjson.dumps(
        {
            "notification_type": "email",
            "user_id": user_id,
            "template_code": code,
            "variables": {"name": "N", "link": "https://example.com"},
            "request_id": "@RID@",
        }
    ).decode()
    script = (ROOT / "overload.lua").read_text()
    for placeholder, value in {
        "@PATH@": "/api/v1/notifications/",
        "@KEY@": API_KEY,
        "@BODY@": body.replace("@RID@", "%s"),
        "@PREFIX@": prefix,
        "@ACCEPTED@": str(tmp_path / "accepted.txt"),
        "@SUMMARY@": str(tmp_path / "summary.json"),
    }.items():
        script = script.replace(placeholder, value)
    path = tmp_path / "overload.lua"
    path.write_text(script)
    return path


async def run_wrk(url: str, script: Path, tmp_path: Path) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "wrk",
        f"-c{CONNECTIONS}",
        "-t2",
        f"-d{DURATION}s",
        f"--timeout={ANSWER_BOUND:g}s",
        "-s",
        str(script),
        url + "/api/v1/notifications/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), DURATION + 60)
    assert process.returncode == 0, output.decode()
    summary: dict[str, Any] = orjson.loads((tmp_path / "summary.json").read_bytes())
    summary["output"] = output.decode()
    return summary


def accepted_by_wrk(tmp_path: Path) -> dict[str, float]:
    """request_id → seconds to its 202, as wrk saw them."""
    found: dict[str, float] = {}
    for line in (tmp_path / "accepted.txt").read_text().splitlines():
        request_id, micros = line.split()
        assert request_id not in found, f"{request_id} answered 202 twice"
        found[request_id] = int(micros) / 1e6
    return found


def said(folder: Path) -> dict[str, int]:
    """How often each message above `info` was logged by the workers (why, when one failed)."""
    counts: Counter[str] = Counter()
    for path in folder.glob("w*.log"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = orjson.loads(line)
                if entry.get("level") != "info":
                    counts[f"{entry.get('level')}: {str(entry.get('message'))[:160]}"] += 1
    return dict(counts.most_common(12))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


async def stored(stack: Stack, prefix: str) -> dict[str, str]:
    """request_id → notification id of what the store holds from this run."""
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        rows = await database.fetch(
            "SELECT request_id, id FROM notifications WHERE request_id LIKE %s", prefix + "-%"
        )
    finally:
        await database.close()
    found: dict[str, str] = {}
    for row in rows:
        assert row["request_id"] not in found, f"{row['request_id']} stored twice"
        found[row["request_id"]] = str(row["id"])
    return found


async def sequential_latencies(
    url: str, user_id: str, code: str, count: int, *, shed_ok: bool = False
) -> list[float]:
    """Seconds each of `count` sends in a row took to its 202; with `shed_ok`, a send still shed
    right after the load (the gateway finishing what it had in hand) counts as infinitely slow."""
    took = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        for _ in range(count):
            started = time.monotonic()
            async with session.post(
                url + "/api/v1/notifications/",
                json={
                    "notification_type": "email",
                    "user_id": user_id,
                    "template_code": code,
                    "variables": {"name": "N", "link": "l"},
                    "request_id": f"after-{uuid.uuid4()}",
                },
            ) as response:
                body = await response.text()
                if shed_ok and response.status == 503 and "overloaded" in body:
                    took.append(math.inf)
                    continue
                assert response.status == 202, body
            took.append(time.monotonic() - started)
    return took


@pytest.mark.timeout(480)  # 20 s of load, then the delivery of all it accepted
async def test_several_times_its_capacity_answered_in_time_and_delivered_once(
    stack_factory: Any, tmp_path: Path
) -> None:
    assert shutil.which("wrk"), "wrk is missing: `make test` installs it (the tools target)"
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    # The offered load is about capacity, not about a client's quota. At most ACCEPT_CONCURRENCY
    # in hand: 400 connections are several times that, whatever the machine.
    # Pools kept small (DB_POOL_SIZE): the suite's other workers share the machine's PostgreSQL.
    settings = {"rate_limit": 0, "accept_concurrency": IN_HAND, "db_pool_size": 8}
    gateway = ServiceProcess("gateway.py", replace(stack.config, **settings), tmp_path / "gateway.log")
    # Two workers, so that what was accepted is delivered within the test's time.
    workers = [
        ServiceProcess(
            "email_worker.py",
            replace(stack.config, worker_prefetch=64, db_pool_size=4),
            tmp_path / f"w{n}.log",
        )
        for n in range(2)
    ]
    await gateway.start()
    for worker in workers:
        await worker.start()
    try:
        assert gateway.process is not None
        await sequential_latencies(gateway.url, user["id"], code, 20)  # warm: caches, pools
        rss_before = vm_rss_mb(gateway.process.pid)
        prefix = f"ovl{uuid.uuid4().hex[:12]}"
        summary = await run_wrk(gateway.url, wrk_script(tmp_path, user["id"], code, prefix), tmp_path)
        ended = time.monotonic()
        rss_after = vm_rss_mb(gateway.process.pid)
        # Back to normal within seconds: 20 sends in a row, each answered within 200 ms.
        after = await sequential_latencies(gateway.url, user["id"], code, 20, shed_ok=True)
        while max(after[-20:]) >= 0.2 and time.monotonic() - ended < 10:
            after += await sequential_latencies(gateway.url, user["id"], code, 1, shed_ok=True)
        back_within = time.monotonic() - ended

        accepted = accepted_by_wrk(tmp_path)
        statuses = summary["statuses"]
        answered = summary["requests"]
        report = (
            f"{answered} answered, statuses {statuses}, errors {summary['errors']}, "
            f"{summary['timeouts']} timeouts, "
            f"{summary['shed_with_retry_after']} shed with Retry-After; all: p50 "
            f"{summary['p50_us'] / 1e3:.0f} ms p99 {summary['p99_us'] / 1e3:.0f} ms; accepted: p50 "
            f"{percentile(list(accepted.values()), 0.5) * 1e3:.0f} ms p90 "
            f"{percentile(list(accepted.values()), 0.9) * 1e3:.0f} ms p99 "
            f"{percentile(list(accepted.values()), 0.99) * 1e3:.0f} ms max "
            f"{max(accepted.values()) * 1e3:.0f} ms; RSS {rss_before:.0f} → {rss_after:.0f} MiB; "
            f"after: {[round(t * 1e3) if t < math.inf else 'shed' for t in after]} ms, "
            f"20 in a row < 200 ms within "
            f"{back_within:.1f} s"
        )
        print(report)
        # Every request answered in time: at most 1 % without an answer within the bound.
        assert summary["timeouts"] <= 0.01 * answered, report
        assert summary["connect_errors"] == 0 and summary["read_errors"] == 0, report
        # Only 202s and sheds: nothing failed for being too much.
        assert set(statuses) <= {"202", "503"}, report
        assert summary["shed_with_retry_after"] == summary["errors"].get("503 overloaded", 0) > 0, report
        # Besides: when wrk stops, the requests it leaves half sent end in "Connection lost",
        # answered 503 service_unavailable (seen read by wrk's other thread, still running).
        assert set(summary["errors"]) <= {"503 overloaded", "503 service_unavailable"}, report
        assert summary["errors"].get("503 service_unavailable", 0) <= CONNECTIONS, report
        assert len(accepted) == statuses["202"] > 0, report
        # The accepted keep their latency: without the bound 1.4-4.2 s at the 99th percentile;
        # with it 0.7-0.8 s alone, 1.2 s beside a soak on two cores. The bound is about that.
        assert percentile(list(accepted.values()), 0.99) < 1.5, report
        assert rss_after - rss_before < 150, report
        # Back to normal at once.
        assert back_within < 5 and max(after[-20:]) < 0.2, report
        metrics = await gateway.metrics()
        shed = metric(metrics, "notify_shed_total")
        assert shed >= statuses["503"], metrics  # wrk may miss answers in flight at its end
        assert metric(metrics, 'notify_gateway_in_hand{kind="accepting"}') == 0, metrics
        assert metric(metrics, 'notify_gateway_in_hand{kind="waiting"}') == 0, metrics

        # Every 202 stored once and delivered exactly once; what the store holds beyond them
        # was accepted while wrk stopped (its answer never read), and is delivered once too.
        rows = await stored(stack, prefix)
        assert set(accepted) <= set(rows)
        assert len(rows) - len(accepted) <= CONNECTIONS, report
        expected = set(rows.values())
        deadline = time.monotonic() + 300
        while len(set(stack.smtp.notification_ids(user["email"])) & expected) < len(expected):
            assert time.monotonic() < deadline, f"{len(expected)} to deliver; {report}"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # time for a duplicate to show up, were there one
        received = [i for i in stack.smtp.notification_ids(user["email"]) if i in expected]
        twice = len(received) - len(set(received))
        assert twice == 0, f"{twice} delivered twice; the workers said: {said(tmp_path)}; {report}"
    finally:
        gateway.stop()
        for worker in workers:
            worker.stop()


# --- the gate alone (no servers) ---------------------------------------------------------------


async def test_the_gate_admits_its_limit_queues_the_next_and_sheds_the_rest() -> None:
    gate = Admission(max_limit=2, queue=2, budget=0.2)
    assert await gate.enter() is None and await gate.enter() is None
    assert gate.in_flight == 2
    third = asyncio.ensure_future(gate.enter())
    fourth = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    assert gate.waiting == 2
    assert await gate.enter() == QUEUE_FULL  # the waiting room is full: at once
    gate.release(0.01)  # its slot goes to the oldest waiter
    assert await third is None and gate.in_flight == 2 and gate.waiting == 1
    started = time.monotonic()
    assert await fourth == WAITED_TOO_LONG
    assert 0.15 < time.monotonic() - started < 0.5
    assert gate.waiting == 0 and gate.in_flight == 2
    gate.release(0.01)
    gate.release(0.01)
    assert gate.in_flight == 0
    assert await gate.enter() is None  # free again: straight in


async def test_once_a_waiter_ran_out_of_time_the_newest_goes_first_until_none_waits() -> None:
    gate = Admission(max_limit=1, queue=10, budget=0.1)
    assert await gate.enter() is None
    old = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0.15)
    assert await old == WAITED_TOO_LONG and gate.lifo  # over capacity: newest first
    older, newer = asyncio.ensure_future(gate.enter()), asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    gate.release(0.01)
    assert await newer is None and not older.done()
    gate.release(0.01)
    assert await older is None and not gate.lifo  # nobody waits: first come first served again
    gate.release(0.01)
    assert gate.in_flight == 0


async def test_a_slot_given_to_a_waiter_that_went_away_is_passed_on() -> None:
    gate = Admission(max_limit=1, queue=5, budget=5.0)
    assert await gate.enter() is None
    gone = asyncio.ensure_future(gate.enter())
    later = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    gate.release(0.01)  # to `gone`...
    gone.cancel()  # ...which is cancelled before it runs: the slot goes to `later`
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await later is None
    assert gate.in_flight == 1 and gate.waiting == 0
    cancelled = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    cancelled.cancel()  # cancelled while waiting: it leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gate.waiting == 0
    gate.release(0.01)
    assert gate.in_flight == 0


async def test_the_limit_falls_when_accepts_are_slow_and_recovers_when_they_are_quick() -> None:
    gate = Admission(max_limit=100, queue=0, budget=0.5)
    for _ in range(100):
        assert await gate.enter() is None
    assert await gate.enter() == QUEUE_FULL  # no waiting room: shed at once
    gate.release(0.8)  # over the budget: a quarter off
    assert gate.limit == 75
    gate.release(0.8)  # again within the same budget: not again (one slow moment, one cut)
    assert gate.limit == 75
    for _ in range(98):
        gate.release(0.01)
    assert 75 < gate.limit < 77  # quick ones add 1/limit each
    in_hand = 0
    while await gate.enter() is None:
        in_hand += 1
    assert in_hand == int(gate.limit)
    for _ in range(in_hand):
        gate.release(0.01)
    for _ in range(5_000):
        assert await gate.enter() is None
        gate.release(0.01)
    assert gate.limit == 100  # back, and never above ACCEPT_CONCURRENCY
    for _ in range(50):
        assert await gate.enter() is None
    for _ in range(50):
        gate._lowered_at = -math.inf  # as if each came a budget after the last
        gate.release(0.8)
    assert gate.limit == MIN_LIMIT  # never below: a few always progress


async def test_the_retry_after_is_the_budget_at_least_one_second() -> None:
    assert Admission(1, 1, 0.5).retry_after() == 1
    assert Admission(1, 1, 2.5).retry_after() == 3
