"""Benchmark 4, a topic fan-out: one `POST /api/v1/notifications/` with `topic` to a topic of
100,000 subscribers (`--subscribers`), delivered by the email worker(s) to the SMTP sink.

Set-up, not timed: the subscribers are written into users_db in one SQL statement (a user
created through the API pays for a slow password hash, which would make set-up take hours), then
subscribed through the API, 1,000 per call; the services, a warm-up and a clean notifications
table follow as in the email benchmark. Measured, from the status store as bench/e2e.py does:
delivered/s = delivered ÷ (last delivered_at - first created_at), time to first email (from
sending the request to the first delivered_at), each process's resident memory at the start, at
half delivered and at the end, and the CPU of each process. The rate is compared with the
single-notification end-to-end email rate of the same run: in `all` the email benchmark's N run
with as many workers; alone, a short one measured here first (`--compare-count`).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from bench import report
from bench.accept import EMAIL_TEMPLATE, _yes, create_fixture, notification_body
from bench.e2e import (
    POLL,
    STALL,
    E2EOptions,
    Outcome,
    Pipeline,
    cpu_table,
    outcome,
    rss_table,
    status_counts,
    wait_delivered,
)
from bench.load import LoadResult, run_load
from bench.stack import VACUUM, VACUUM_EVERY, BenchEnv, CpuMeter, Proc, api, free_port
from bench.stats import fmt_num
from common.data import db

SUBSCRIBE_CHUNK = 1000  # the API's limit per call
SUBSCRIBE_CALLS_AT_ONCE = 4
TARGET_RATIO = 0.7
# A small fan-out before the measured one, as the N runs have a warm-up: the fan-out's own path
# (pages of profiles, the batch insert) allocates once on first use, which is not growth.
WARMUP_SUBSCRIBERS = 1000


@dataclass
class FanoutOptions:
    subscribers: int = 100_000
    workers: int = 1
    compare_count: int = 5000  # the single-notification run measured here when there is no other
    timeout: float = 1200.0  # at most this long from the request until every subscriber is final
    e2e: E2EOptions = field(default_factory=E2EOptions)


@dataclass
class Reference:
    """The single-notification end-to-end rate the fan-out is compared with."""

    label: str
    rate: float
    outcome: Outcome | None = None  # when measured here: its CPU goes beside the fan-out's


@dataclass
class FanoutRun:
    subscribers: int
    request_ms: float  # the POST's answer time
    first_email_s: float  # request sent → first delivered_at
    from_request_s: float  # request sent → last delivered_at
    fanned_out_s: float | None  # batch created → every recipient stored
    sink_received: int | None  # emails the sink got during the fan-out (warm-up subtracted)
    halves: tuple[float, float]  # delivered/s over the first and the second half delivered
    autovacuum: str  # PostgreSQL's setting: off, dead row versions pile up over a long run
    dead_rows: int  # dead row versions left in the notifications tables at the end
    vacuumed: bool  # the harness stood in for autovacuum (bench/stack.py)
    result: Outcome
    rss: dict[str, tuple[int, int, int]]  # KiB at start, at half delivered, at end
    delivered_at_stop: int = 0  # delivered once the workers had stopped


async def _sink(env: BenchEnv, pipe: Pipeline, name: str) -> Proc:
    """A counting SMTP sink, and the pipeline's workers pointed at it."""
    port = free_port()
    pipe.sink = await env.start_argv(
        name, ["-m", "scripts.smtp_sink", "--quiet", "--port", str(port)], port, ready="tcp"
    )
    pipe.worker_config = replace(env.config, smtp_port=port)
    return pipe.sink


async def _sink_count(env: BenchEnv, sink: Proc) -> int | None:
    """Stops the sink, which then logs how many messages it received."""
    await env.stop(sink)
    found = re.findall(r"smtp sink received (\d+) messages", sink.log_path.read_text())
    return int(found[-1]) if found else None


async def _topic(env: BenchEnv, gateway: Proc, count: int) -> str:
    """A topic with `count` new subscribers; returns its key."""
    tag = time.time_ns()
    users = await db.connect(env.config.users_db_url, maxsize=1)
    try:
        rows = await users.fetch(
            "INSERT INTO users (name, email, password_hash, preferences)"
            " SELECT 'Subscriber ' || i, 'sub-' || %s || '-' || i || '@example.com', 'x',"
            ' \'{"email": true, "push": true}\' FROM generate_series(1, %s) AS i RETURNING id',
            str(tag),
            count,
        )
    finally:
        await users.close()
    ids = [str(r["id"]) for r in rows]
    key = f"bench-{tag}"
    chunks = [ids[i : i + SUBSCRIBE_CHUNK] for i in range(0, len(ids), SUBSCRIBE_CHUNK)]
    limit = asyncio.Semaphore(SUBSCRIBE_CALLS_AT_ONCE)
    async with aiohttp.ClientSession() as session:
        await api(session, "PUT", f"{gateway.url}/api/v1/topics/{key}", env.headers, {"name": "bench"})

        async def subscribe(chunk: list[str]) -> None:
            async with limit:
                await api(
                    session,
                    "POST",
                    f"{gateway.url}/api/v1/topics/{key}/subscribers",
                    env.headers,
                    {"user_ids": chunk},
                )

        await asyncio.gather(*(subscribe(c) for c in chunks))
        topic = await api(session, "GET", f"{gateway.url}/api/v1/topics/{key}", env.headers)
    if topic["subscribers"] != count:
        raise RuntimeError(f"topic {key} has {topic['subscribers']} subscribers, not {count}")
    return key


async def _notify(env: BenchEnv, gateway: Proc, key: str, code: str) -> dict[str, Any]:
    body = {
        "notification_type": "email",
        "topic": key,
        "template_code": code,
        "variables": {"name": "Ada", "link": "https://example.com/start"},
        "request_id": f"fanout-{time.time_ns()}",
    }
    async with aiohttp.ClientSession() as session:
        return await api(session, "POST", f"{gateway.url}/api/v1/notifications/", env.headers, body)


def _rss(procs: dict[str, Proc]) -> dict[str, int]:
    return {name: p.rss_kib() for name, p in procs.items()}


async def _fan_out(env: BenchEnv, pipe: Pipeline, key: str, code: str, opts: FanoutOptions) -> FanoutRun:
    """The one request, then the status store polled until every subscriber is final (or
    `opts.timeout` passes, or nothing moves for STALL seconds)."""
    procs = pipe.services()
    rss_start = _rss(procs)
    rss_mid: dict[str, int] | None = None
    meter = CpuMeter(procs)
    meter.start()
    async with env.autovacuum() as vacuumed:
        sent = time.time()
        answer = await _notify(env, pipe.gateway, key, code)
        request_ms = 1000 * (time.time() - sent)
        total = int(answer["total"])
        deadline = time.monotonic() + opts.timeout
        last_final, last_change = -1, time.monotonic()
        while True:
            counts = await status_counts(env)
            final = counts.get("delivered", 0) + counts.get("failed", 0) + counts.get("skipped", 0)
            if rss_mid is None and final >= total / 2:
                rss_mid = _rss(procs)
            if final >= total:
                break
            if final != last_final:
                last_final, last_change = final, time.monotonic()
            if time.monotonic() > deadline or time.monotonic() - last_change > STALL:
                print(f"bench: stopped waiting for the fan-out: {counts}", flush=True)
                break
            await asyncio.sleep(POLL)
    cpu = meter.stop()
    rss_end = _rss(procs)
    rss_mid = rss_mid or rss_end
    one_request = LoadResult(
        mode="single", offered=0, concurrency=1, duration=request_ms / 1000, generators=0,
        statuses={"202": 1}, ok=total, rate=0.0, latency_ms={}, generator_cpu=0.0,
        window_s=request_ms / 1000,
    )  # fmt: skip
    label = f"topic of {total:,}, {opts.workers} worker{'s' if opts.workers > 1 else ''}"
    result = await outcome(env, label, one_request, counts)
    result.cpu = cpu
    database = await env.notifications_db()
    times = await database.fetchrow(
        "SELECT extract(epoch FROM min(delivered_at)) AS first, extract(epoch FROM max(delivered_at)) AS last"
        " FROM notifications WHERE status = 'delivered'"
    )
    batch = await database.fetchrow(
        "SELECT extract(epoch FROM fanned_out_at - created_at) AS seconds FROM batches WHERE id = %s",
        answer["batch_id"],
    )
    first = float(times["first"]) if times and times["first"] is not None else float("nan")
    last = float(times["last"]) if times and times["last"] is not None else float("nan")
    fanned = batch["seconds"] if batch else None
    delivered = result.delivered
    middle = await database.fetchval(
        "SELECT extract(epoch FROM delivered_at) FROM notifications WHERE status = 'delivered'"
        " ORDER BY delivered_at OFFSET %s LIMIT 1",
        max(0, delivered // 2 - 1),
    )
    start = last - result.seconds  # the first created_at
    mid = float(middle) if middle is not None else float("nan")
    halves = (
        (delivered // 2) / (mid - start) if mid > start else 0.0,
        (delivered - delivered // 2) / (last - mid) if last > mid else 0.0,
    )
    autovacuum = str(await database.fetchval("SHOW autovacuum"))
    dead = await database.fetchval(
        "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables WHERE relname LIKE 'notifications%%'"
    )
    return FanoutRun(
        subscribers=total,
        request_ms=request_ms,
        first_email_s=first - sent,
        from_request_s=last - sent,
        fanned_out_s=float(fanned) if fanned is not None else None,
        halves=halves,
        autovacuum=autovacuum,
        vacuumed=vacuumed,
        dead_rows=int(dead or 0),
        sink_received=None,
        result=result,
        rss={name: (rss_start[name], rss_mid[name], rss_end[name]) for name in procs},
    )


async def run_fanout(
    env: BenchEnv, opts: FanoutOptions, record: bool, reference: Reference | None = None
) -> dict[str, Any]:
    section = report.Section(f"Topic fan-out, email, {opts.subscribers:,} subscribers")
    e2e = replace(opts.e2e, count=opts.compare_count, profile=False)
    pipe = Pipeline(env, "email", e2e)
    pipe.core = await env.start_core()
    try:
        user_id, code = await create_fixture(env, pipe.gateway, EMAIL_TEMPLATE)
        pipe.body = notification_body(user_id, code)
        if reference is None:
            single_sink = await _sink(env, pipe, "smtp_sink")
            label = f"N={opts.compare_count:,}, {opts.workers} worker{'s' if opts.workers > 1 else ''}"
            single = await pipe.run_n(label, opts.workers, sample=False, profile_dir=None)
            await env.stop(single_sink)
            reference = Reference(f"{label} (measured here)", single.rate, single)
        started = time.monotonic()
        key = await _topic(env, pipe.gateway, opts.subscribers)
        warm_key = await _topic(env, pipe.gateway, min(WARMUP_SUBSCRIBERS, opts.subscribers))
        print(
            f"bench: {opts.subscribers:,} subscribers set up in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        sink = await _sink(env, pipe, "smtp_sink")
        await pipe.start_workers(opts.workers)
        # Warm-up, as before the N runs (connections, caches), and a small fan-out; then a
        # clean table.
        warm = await run_load(
            pipe.spec("warmf", mode="closed", concurrency=8, max_requests=e2e.warmup, duration=60), 1
        )
        await wait_delivered(env, warm.ok, 60)
        warm_sent = warm.ok + int((await _notify(env, pipe.gateway, warm_key, code))["total"])
        await wait_delivered(env, warm_sent, 120)
        await env.truncate_notifications()
        run = await _fan_out(env, pipe, key, code, opts)
        await pipe.stop_workers()
        # Counted again once the workers stopped: they finish what they hold, so the sink and the
        # store are compared at the same moment.
        run.delivered_at_stop = (await status_counts(env)).get("delivered", 0)
        received = await _sink_count(env, sink)
        run.sink_received = received - warm_sent if received is not None else None
    finally:
        await pipe.stop_workers()
        for proc in [*pipe.core.values(), *([pipe.sink] if pipe.sink else [])]:
            await env.stop(proc)
        await env.truncate_notifications()

    o = run.result
    ratio = o.rate / reference.rate if reference.rate else 0.0
    section.table(
        ["run", "subscribers", "delivered", "failed/unfinished", "seconds", "delivered/s", "first email s",
         "p50 ms", "p99 ms"],
        [[o.label, fmt_num(run.subscribers), fmt_num(o.delivered), fmt_num(o.failed + o.unfinished),
          fmt_num(o.seconds, 1), fmt_num(o.rate), fmt_num(run.first_email_s, 2),
          fmt_num(o.latency_ms["p50"]), fmt_num(o.latency_ms["p99"])]],
        "Delivered (from the status store; seconds = first created_at → last delivered_at;"
        " latency = delivered_at - created_at of each recipient's notification)",
    )  # fmt: skip
    section.note(
        f"The request was answered in {fmt_num(run.request_ms, 1)} ms; every recipient was stored"
        f" {fmt_num(run.fanned_out_s, 1)} s after it; the last email was delivered"
        f" {fmt_num(run.from_request_s, 1)} s after it was sent"
        f" ({fmt_num(o.delivered / run.from_request_s if run.from_request_s > 0 else 0)}/s from the request)."
        f" The SMTP sink received {fmt_num(run.sink_received)} emails during the fan-out"
        f" (the warm-up's subtracted)."
        f" Delivered/s over the first half delivered {fmt_num(run.halves[0])}, over the second"
        f" {fmt_num(run.halves[1])}; PostgreSQL autovacuum {run.autovacuum}"
        + (
            f" (the harness ran `{VACUUM}` every {VACUUM_EVERY:g} s instead, as autovacuum would)"
            if run.vacuumed
            else ""
        )
        + f", dead row versions in the notifications tables at the end {fmt_num(run.dead_rows)}."
    )
    section.table(
        ["run", "delivered/s", "fan-out ÷ this"],
        [[reference.label, fmt_num(reference.rate), fmt_num(ratio, 2)]],
        "Against the single-notification end-to-end email rate of the same run",
    )
    cpu_table(section, [*([reference.outcome] if reference.outcome else []), o])
    flat = rss_table(
        section,
        run.rss,
        f"Resident memory (VmRSS) over the fan-out to {run.subscribers:,}",
        "half delivered MiB",
    )
    once = run.delivered_at_stop == run.sink_received == run.subscribers
    section.table(
        ["target", "measured", "reached"],
        [
            [
                f"≥ {TARGET_RATIO} x the single-notification rate",
                fmt_num(ratio, 2),
                _yes(ratio >= TARGET_RATIO),
            ],
            [
                "every subscriber delivered, once",
                f"{fmt_num(run.delivered_at_stop)} delivered, the sink got {fmt_num(run.sink_received)},"
                f" of {fmt_num(run.subscribers)}",
                _yes(once),
            ],
            ["RSS flat ± 10 %", "see above", _yes(flat)],
        ],
        "Targets (issue 18)",
    )
    if record:
        report.append(section)
    return {
        "subscribers": run.subscribers,
        "rate": o.rate,
        "reference": {"label": reference.label, "rate": reference.rate},
        "ratio": ratio,
        "first_email_s": run.first_email_s,
        "from_request_s": run.from_request_s,
        "fanned_out_s": run.fanned_out_s,
        "halves": run.halves,
        "autovacuum": run.autovacuum,
        "dead_rows": run.dead_rows,
        "request_ms": run.request_ms,
        "sink_received": run.sink_received,
        "latency_ms": o.latency_ms,
        "cpu": o.cpu,
        "rss_kib": run.rss,
        "delivered": o.delivered,
        "failed": o.failed,
        "unfinished": o.unfinished,
    }
