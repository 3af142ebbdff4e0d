"""Benchmark 1, gateway accept: user service, template service and gateway as processes, no
workers (email.queue just fills and is purged after each run), rate limiting off.

One user (email on) and one email template, created through the API; every request is a real
`POST /api/v1/notifications/` with the API key, a unique request_id, and so the gateway's real
user and template lookups, insert and publish. Closed loop for the maximum, open loop at fixed
rates for latency, then the two baselines (bare aiohttp handler, handler + one INSERT) with the
same closed loop, and the ratios.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import report
from bench.load import SEQ, LoadResult, Spec, run_load
from bench.stack import BenchEnv, CpuMeter, Proc, api, free_port
from bench.stats import fmt_num
from common.broker.amqp import work_queue
from common.data import db


@dataclass
class AcceptOptions:
    duration: float = 15.0
    open_duration: float = 10.0
    rates: tuple[float, ...] = (500.0, 1000.0, 2000.0)
    concurrency: int = 64
    baseline_duration: float = 10.0
    generators: int = 1
    loop: str = "uvloop"
    profile: bool = True
    warmup: float = 3.0


def notification_body(user_id: str, code: str, channel: str = "email") -> str:
    body = {
        "notification_type": channel,
        "user_id": user_id,
        "template_code": code,
        "variables": {"name": "Ada", "link": "https://example.com/start"},
        "request_id": SEQ,
    }
    return orjson.dumps(body).decode()


EMAIL_TEMPLATE = {
    "notification_type": "email",
    "language": "en",
    "subject": "Welcome, {{ name }}!",
    "body": "<p>Hello {{ name }}, start here: <a href='{{ link }}'>{{ link }}</a></p>",
}
PUSH_TEMPLATE = {
    "notification_type": "push",
    "language": "en",
    "title": "Hi {{ name }}",
    "body": "Start here: {{ link }}",
    "link": "{{ link }}",
}


async def create_fixture(
    env: BenchEnv, gateway: Proc, template: dict[str, Any], device: dict[str, Any] | None = None
) -> tuple[str, str]:
    """One user (with `device`, if given) and one template, through the gateway like a client.
    Unique names: `all` runs several benchmarks against the same databases."""
    suffix = time.time_ns()
    code = f"bench-{template['notification_type']}-{suffix}"
    async with aiohttp.ClientSession() as session:
        user = await api(
            session,
            "POST",
            f"{gateway.url}/api/v1/users/",
            env.headers,
            {
                "name": "Ada Lovelace",
                "email": f"ada-{suffix}@example.com",
                "password": "correct horse battery",
                "preferences": {"email": True, "push": True},
            },
        )
        if device is not None:
            await api(
                session, "POST", f"{gateway.url}/api/v1/users/{user['id']}/devices", env.headers, device
            )
        await api(
            session, "POST", f"{gateway.url}/api/v1/templates/", env.headers, {"code": code, **template}
        )
    return str(user["id"]), code


def spec_for(port: int, body: str, headers: dict[str, str], tag: str, **kw: Any) -> Spec:
    return Spec(
        host="127.0.0.1",
        port=port,
        path="/api/v1/notifications/",
        body=body,
        headers=headers,
        seq_prefix=f"{tag}-{time.time_ns()}",
        **kw,
    )


def load_row(label: str, r: LoadResult) -> list[str]:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
    lat = r.latency_ms
    return [
        label,
        fmt_num(r.offered) if r.offered else f"closed C={r.concurrency}",
        fmt_num(r.ok + sum(r.errors.values())),
        fmt_num(r.rate),
        fmt_num(lat["p50"], 1),
        fmt_num(lat["p95"], 1),
        fmt_num(lat["p99"], 1),
        fmt_num(lat["max"], 1),
        errors,
        fmt_num(100 * r.generator_cpu) + " %",
    ]


LOAD_HEADERS = [
    "run",
    "offered/s",
    "requests",
    "2xx/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "errors",
    "generator CPU",
]


async def _commits(env: BenchEnv) -> int:
    """Transactions committed so far in the bench's notifications database."""
    database = await db.connect(env.config.notifications_db_url, maxsize=1)
    try:
        return int(
            await database.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
            or 0
        )
    finally:
        await database.close()


async def measured(procs: dict[str, Proc], run: Any) -> tuple[LoadResult, dict[str, float]]:
    """Run a load and the CPU each service (and each shared server) used meanwhile."""
    meter = CpuMeter(procs)
    meter.start()
    result = await run
    return result, meter.stop()


async def run_accept(env: BenchEnv, opts: AcceptOptions, record: bool) -> dict[str, Any]:
    section = report.Section("Gateway accept")
    core = await env.start_core()
    gateway = core["gateway"]
    user_id, code = await create_fixture(env, gateway, EMAIL_TEMPLATE)
    body = notification_body(user_id, code)
    queue = work_queue("email")

    def gw_spec(tag: str, **kw: Any) -> Spec:
        return spec_for(gateway.port or 0, body, env.headers, tag, loop=opts.loop, **kw)

    # Warm-up: connection pools, caches, code paths; not recorded.
    await run_load(gw_spec("warm", mode="closed", concurrency=16, duration=opts.warmup), 1)
    await env.purge(queue)

    rows: list[list[str]] = []
    results: dict[str, Any] = {}
    profile_task = None
    if opts.profile and report.py_spy():
        raw = env.log_dir / "gateway.pyspy.raw"
        seconds = min(15.0, max(1.0, opts.duration - 2))
        profile_task = asyncio.create_task(_delayed_profile(gateway.pid, seconds, raw))
    commits_before = await _commits(env)
    closed, cpu = await measured(
        core,
        run_load(
            gw_spec("closed", mode="closed", concurrency=opts.concurrency, duration=opts.duration),
            opts.generators,
        ),
    )
    commits = await _commits(env) - commits_before
    rows.append(load_row("gateway closed loop", closed))
    results["closed"] = closed.to_dict() | {"service_cpu": cpu}
    profile_raw = await profile_task if profile_task else None
    await env.purge(queue)

    for rate in opts.rates:
        result = await run_load(
            gw_spec(f"open{int(rate)}", mode="open", rate=rate, duration=opts.open_duration, concurrency=32),
            opts.generators,
        )
        rows.append(load_row("gateway open loop", result))
        results[f"open_{int(rate)}"] = result.to_dict()
        await env.purge(queue)

    for proc in core.values():
        await env.stop(proc)

    baselines: dict[str, LoadResult] = {}
    for kind in ("bare", "insert"):
        port = free_port()
        argv = ["-m", "bench.baselines", kind, "--port", str(port)]
        if kind == "insert":
            argv += ["--dsn", env.config.notifications_db_url]
        proc = await env.start_argv(f"baseline_{kind}", argv, port)
        spec = spec_for(port, body, env.headers, kind, loop=opts.loop)
        await run_load(replace(spec, mode="closed", concurrency=16, duration=2.0), 1)
        base, _ = await measured(
            {kind: proc},
            run_load(
                replace(spec, mode="closed", concurrency=opts.concurrency, duration=opts.baseline_duration),
                opts.generators,
            ),
        )
        baselines[kind] = base
        rows.append(load_row(f"baseline: {'bare handler' if kind == 'bare' else 'handler + INSERT'}", base))
        results[f"baseline_{kind}"] = base.to_dict()
        await env.stop(proc)

    section.table(
        LOAD_HEADERS,
        rows,
        "Load (latency of 2xx answers; open loop measured from each request's planned time)",
    )
    ratio_rows = [
        [
            f"gateway / {name}",
            fmt_num(closed.rate),
            fmt_num(baselines[kind].rate),
            fmt_num(closed.rate / baselines[kind].rate, 2) if baselines[kind].rate else "-",
        ]
        for kind, name in (("bare", "bare handler"), ("insert", "handler + INSERT"))
    ]
    section.table(
        ["ratio", "gateway 2xx/s", "baseline 2xx/s", "ratio"], ratio_rows, "Ratios (closed loop, same run)"
    )
    per = (lambda v: fmt_num(v * 1e6 / closed.rate)) if closed.rate else (lambda v: "-")
    section.table(
        ["process", "CPU during the closed loop", "CPU µs per accepted"],
        [[name, fmt_num(100 * v) + " %", per(v)] for name, v in cpu.items()],
        "CPU during the closed loop (100 % = one core; the shared servers' figures include any"
        " other work on the machine)",
    )
    accepted = closed.rate * opts.duration
    results["db_transactions_per_accepted"] = commits / accepted if accepted else None
    section.table(
        ["round trips to the status store", "per accepted notification"],
        [
            [
                "PostgreSQL transactions (pg_stat_database.xact_commit of its database)",
                fmt_num(commits / accepted if accepted else 0, 2),
            ]
        ],
        "Status-store round trips during the closed loop (statements run in autocommit: one each)",
    )
    results["ratios"] = {kind: closed.rate / b.rate if b.rate else None for kind, b in baselines.items()}

    open_1000 = results.get("open_1000")
    targets = [
        ["gateway ≥ 2,500 accepted/s", fmt_num(closed.rate), _yes(closed.rate >= 2500)],
        [
            "≥ 0.5 x handler + INSERT",
            fmt_num(results["ratios"]["insert"], 2),
            _yes((results["ratios"]["insert"] or 0) >= 0.5),
        ],
    ]
    if open_1000:
        p99 = open_1000["latency_ms"]["p99"]
        errors = sum(open_1000["errors"].values())
        targets.append(["p99 ≤ 50 ms at 1,000/s", f"{fmt_num(p99, 1)} ms", _yes(p99 <= 50)])
        targets.append(["zero errors at 1,000/s", fmt_num(errors), _yes(errors == 0)])
    section.table(["target", "measured", "reached"], targets, "Targets (issue 8)")

    if profile_raw is not None:
        add_profile(section, "gateway, during the closed loop", profile_raw)
    if record:
        report.append(section)
    return results


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


async def _delayed_profile(pid: int, seconds: float, out: Path) -> Path | None:
    await asyncio.sleep(2.0)  # past the generator's start-up, into the steady state
    return await report.profile(pid, seconds, out)


def add_profile(section: report.Section, what: str, raw_path: Path) -> None:
    total, rows = report.profile_rows(raw_path.read_text())
    if total == 0:
        section.note(f"Profile of {what}: no samples.")
        return
    section.table(
        ["function (file)", "own", "incl."],
        rows,
        f"Profile: {what} — top {len(rows)} functions by own CPU samples "
        f"(py-spy, {total} samples; incl. = with callees)",
    )
