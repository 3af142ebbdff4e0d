"""Benchmarks 2 and 3, end to end: gateway → RabbitMQ → worker(s) → a local provider process.

Email goes to an aiosmtpd sink (`scripts/smtp_sink.py --quiet`), push to a local FCM server
(`bench/fcm_sink.py`). N notifications are accepted as fast as the gateway takes them while the
workers deliver; delivered/s is N / (last delivered_at - first created_at) and accept→delivered
latency is delivered_at - created_at, both from the status store, so they measure the system and
not the generator. Run with 1 and with 2 worker processes; for email also the raw aiosmtplib rate
to the same sink (the baseline), an open-loop run at a fixed rate for latency, and each service's
resident memory at the start and end of the N run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from bench.accept import (
    EMAIL_TEMPLATE,
    LOAD_HEADERS,
    PUSH_TEMPLATE,
    _commits,
    _yes,
    add_profile,
    create_fixture,
    load_row,
    notification_body,
)
from bench.load import LoadResult, Spec, run_load
from bench.stack import INFRA, ROOT, VACUUM, VACUUM_EVERY, BenchEnv, CpuMeter, Proc, free_port
from bench.stats import fmt_num, latency_summary
from common.config import Config

POLL = 0.5
STALL = 60.0  # give up waiting when nothing was delivered for this long


@dataclass
class E2EOptions:
    count: int = 20000
    workers: tuple[int, ...] = (1, 2)
    concurrency: int = 32
    open_rate: float = 300.0
    open_duration: float = 20.0
    open_workers: int = 1
    raw_count: int = 10000
    raw_duration: float = 10.0
    raw_connections: int = 16
    send_seconds: float = 90.0  # at most this long sending N: keeps `make bench` bounded
    drain_timeout: float = 120.0
    generators: int = 1
    loop: str = "uvloop"
    profile: bool = True
    warmup: int = 200


@dataclass
class Outcome:
    label: str
    accepted: int
    delivered: int
    failed: int
    unfinished: int
    seconds: float  # first created_at → last delivered_at
    latency_ms: dict[str, float]
    load: LoadResult
    rss: dict[str, tuple[int, int, int]] | None = None  # KiB at start, after sending, at end
    cpu: dict[str, float] | None = None
    # CPU seconds each process used over the run, and the status store's transactions.
    cpu_seconds: dict[str, float] | None = None
    commits: int | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


async def status_counts(env: BenchEnv) -> dict[str, int]:
    database = await env.notifications_db()
    rows = await database.fetch("SELECT status, count(*) AS n FROM notifications GROUP BY status")
    return {r["status"]: int(r["n"]) for r in rows}


async def wait_delivered(env: BenchEnv, expected: int, timeout: float) -> dict[str, int]:
    """Poll the status store until every accepted notification is final (or time runs out, or
    nothing moves for STALL seconds)."""
    deadline = time.monotonic() + timeout
    last_final, last_change = -1, time.monotonic()
    while True:
        counts = await status_counts(env)
        final = counts.get("delivered", 0) + counts.get("failed", 0) + counts.get("skipped", 0)
        if final >= expected:
            return counts
        if final != last_final:
            last_final, last_change = final, time.monotonic()
        if time.monotonic() > deadline or time.monotonic() - last_change > STALL:
            print(f"bench: stopped waiting: {counts}", flush=True)
            return counts
        await asyncio.sleep(POLL)


async def outcome(env: BenchEnv, label: str, load: LoadResult, counts: dict[str, int]) -> Outcome:
    database = await env.notifications_db()
    span = await database.fetchrow(
        "SELECT extract(epoch FROM max(delivered_at) - min(created_at)) AS seconds"
        " FROM notifications WHERE status = 'delivered'"
    )
    rows = await database.fetch(
        "SELECT extract(epoch FROM delivered_at - created_at) * 1000 AS ms"
        " FROM notifications WHERE status = 'delivered'"
    )
    delivered = counts.get("delivered", 0)
    return Outcome(
        label=label,
        accepted=load.ok,
        delivered=delivered,
        failed=counts.get("failed", 0),
        unfinished=sum(counts.values()) - delivered - counts.get("failed", 0) - counts.get("skipped", 0),
        seconds=float(span["seconds"] or 0) if span else 0.0,
        latency_ms=latency_summary(float(r["ms"]) for r in rows),
        load=load,
    )


def e2e_row(o: Outcome) -> list[str]:
    lat = o.latency_ms
    return [
        o.label,
        fmt_num(o.accepted),
        fmt_num(o.delivered),
        fmt_num(o.failed + o.unfinished),
        fmt_num(o.seconds, 1),
        fmt_num(o.rate),
        fmt_num(lat["p50"]),
        fmt_num(lat["p95"]),
        fmt_num(lat["p99"]),
        fmt_num(o.load.rate),
    ]


E2E_HEADERS = [
    "run",
    "accepted",
    "delivered",
    "failed/unfinished",
    "seconds",
    "delivered/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "gateway accepted/s",
]


class Pipeline:
    """One channel's end-to-end setup: the services, a fixture, and how to start workers."""

    def __init__(self, env: BenchEnv, channel: str, opts: E2EOptions) -> None:
        self.env = env
        self.channel = channel
        self.opts = opts
        self.core: dict[str, Proc] = {}
        self.worker_config: Config = env.config
        self.body = ""
        self.workers: list[Proc] = []
        self.sink: Proc | None = None  # the SMTP or FCM server: its CPU is part of the picture
        # Process name -> its py-spy profile during the first N run (the per-step table).
        self.profiles: dict[str, Path] = {}

    @property
    def gateway(self) -> Proc:
        return self.core["gateway"]

    async def start_workers(self, n: int) -> None:
        module = "email_worker.py" if self.channel == "email" else "push_worker.py"
        for i in range(n):
            self.workers.append(
                await self.env.start(f"{self.channel}_worker_{i + 1}", module, self.worker_config)
            )

    async def stop_workers(self) -> None:
        for proc in self.workers:
            await self.env.stop(proc)
        self.workers.clear()

    def spec(self, tag: str, **kw: Any) -> Spec:
        return Spec(
            host="127.0.0.1",
            port=self.gateway.port or 0,
            path="/api/v1/notifications/",
            body=self.body,
            headers=self.env.headers,
            seq_prefix=f"{self.channel}-{tag}-{time.time_ns()}",
            loop=self.opts.loop,
            **kw,
        )

    def services(self) -> dict[str, Proc]:
        sink = {self.sink.name: self.sink} if self.sink else {}
        return {**self.core, **{p.name: p for p in self.workers}, **sink}

    async def run_n(self, label: str, workers: int, *, sample: bool, profile_dir: Path | None) -> Outcome:
        """N notifications, closed loop, with `workers` worker processes."""
        env, opts = self.env, self.opts
        await self.start_workers(workers)
        try:
            # Warm-up (connections, caches, the first FCM token), then a clean table.
            warm = await run_load(
                self.spec("warm", mode="closed", concurrency=8, max_requests=opts.warmup, duration=60), 1
            )
            await wait_delivered(env, warm.ok, 60)
            await env.truncate_notifications()
            procs = self.services()
            rss_start = {name: p.rss_kib() for name, p in procs.items()} if sample else {}
            commits_before = await _commits(env)
            meter = CpuMeter(procs)
            meter.start()
            profile_task = gateway_task = None
            if profile_dir is not None and report.py_spy():
                raw = profile_dir / f"{self.channel}_worker.pyspy.raw"
                profile_task = asyncio.create_task(_profile_later(self.workers[0].pid, 15, raw, True))
                # The gateway too, over the same seconds: the per-step table needs both.
                raw = profile_dir / f"{self.channel}_gateway.pyspy.raw"
                gateway_task = asyncio.create_task(_profile_later(self.gateway.pid, 15, raw))
            async with env.autovacuum() as self.vacuumed:
                load = await run_load(
                    self.spec(
                        "n",
                        mode="closed",
                        concurrency=opts.concurrency,
                        max_requests=opts.count,
                        duration=opts.send_seconds,
                    ),
                    opts.generators,
                )
                # Memory halfway through sending too: growth that stops early is warm-up,
                # growth that goes on to the end looks like a leak.
                rss_mid = {name: p.rss_kib() for name, p in procs.items()} if sample else {}
                counts = await wait_delivered(env, load.ok, opts.drain_timeout)
            result = await outcome(env, label, load, counts)
            result.cpu = meter.stop() | {"load generator": load.generator_cpu}
            result.cpu_seconds = {name: share * meter.wall for name, share in result.cpu.items()}
            result.commits = await _commits(env) - commits_before
            if sample:
                result.rss = {
                    name: (rss_start[name], rss_mid[name], p.rss_kib()) for name, p in procs.items()
                }
            if profile_task is not None:
                raw_path = await profile_task
                if raw_path is not None:
                    self.profile_raw = raw_path
                    self.profiles[self.workers[0].name] = raw_path
            if gateway_task is not None:
                raw_path = await gateway_task
                if raw_path is not None:
                    self.profiles["gateway"] = raw_path
            return result
        finally:
            await self.stop_workers()
            await env.truncate_notifications()

    async def run_open(self, label: str, workers: int, rate: float, duration: float) -> Outcome:
        env = self.env
        await self.start_workers(workers)
        try:
            warm = await run_load(
                self.spec("warmo", mode="closed", concurrency=8, max_requests=self.opts.warmup, duration=60),
                1,
            )
            await wait_delivered(env, warm.ok, 60)
            await env.truncate_notifications()
            async with env.autovacuum():
                load = await run_load(
                    self.spec("open", mode="open", rate=rate, duration=duration, concurrency=16),
                    self.opts.generators,
                )
                counts = await wait_delivered(env, load.ok, self.opts.drain_timeout)
            return await outcome(env, label, load, counts)
        finally:
            await self.stop_workers()
            await env.truncate_notifications()

    profile_raw: Path | None = None
    vacuumed = False  # the harness stood in for autovacuum (off on this server)


async def _profile_later(pid: int, seconds: float, out: Path, subprocesses: bool = False) -> Path | None:
    await asyncio.sleep(3.0)  # into the steady state, past start-up and the first accepts
    return await report.profile(pid, seconds, out, subprocesses)


async def _baseline(module: str, args: list[str], opts: E2EOptions) -> dict[str, float]:
    """A baseline process (`bench.smtp_raw`, `bench.fcm_raw`) with the run's connections, count
    and duration; its JSON result."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        "--connections",
        str(opts.raw_connections),
        "--count",
        str(opts.raw_count),
        "--duration",
        str(opts.raw_duration),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), opts.raw_duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed")
    return dict(json.loads(out))


async def raw_fcm(url: str, credentials: Path, opts: E2EOptions) -> dict[str, float]:
    return await _baseline("bench.fcm_raw", ["--url", url, "--credentials", str(credentials)], opts)


async def raw_smtp(port: int, opts: E2EOptions) -> dict[str, float]:
    return await _baseline("bench.smtp_raw", ["--port", str(port)], opts)


def rss_table(
    section: report.Section,
    rss: dict[str, tuple[int, int, int]],
    title: str,
    middle: str = "all sent MiB",
) -> bool:
    """RSS (KiB) at the start, at a middle point, at the end; True when every process's end is
    within ± 10 % of its start."""
    rows, flat = [], True
    for name, (start, mid, end) in rss.items():
        change = 100 * (end - start) / start if start else 0.0
        flat = flat and abs(change) <= 10
        rows.append([name, *(fmt_num(v / 1024, 1) for v in (start, mid, end)), f"{change:+.1f} %"])
    section.table(["process", "start MiB", middle, "end MiB", "change"], rows, title)
    return flat


def _first_rss(section: report.Section, outcomes: list[Outcome]) -> bool | None:
    first = outcomes[0] if outcomes else None
    if first is None or not first.rss:
        return None
    return rss_table(section, first.rss, f"Resident memory (VmRSS) over “{first.label}”")


def cpu_table(section: report.Section, outcomes: list[Outcome]) -> None:
    names = sorted({n for o in outcomes if o.cpu for n in o.cpu}, key=_service_order)
    rows = [
        [n, *[fmt_num(100 * o.cpu[n]) + " %" if o.cpu and n in o.cpu else "-" for o in outcomes]]
        for n in names
    ]
    section.table(
        ["process", *[o.label for o in outcomes]],
        rows,
        "CPU over each run (100 % = one core; the shared servers' figures include any other work"
        " on the machine)",
    )


def per_delivered_table(section: report.Section, outcomes: list[Outcome]) -> None:
    """What one delivered notification cost: CPU µs of each process (a worker with its render
    processes) and the status store's transactions, over each N run."""
    runs = [o for o in outcomes if o.cpu_seconds and o.delivered]
    if not runs:
        return
    names = sorted({n for o in runs for n in o.cpu_seconds or {}}, key=_service_order)
    rows = [
        [n, *[fmt_num(1e6 * (o.cpu_seconds or {}).get(n, 0.0) / o.delivered) for o in runs]]
        for n in names
        if n != "load generator"
    ]
    rows.append(
        [
            "PostgreSQL transactions (pg_stat_database.xact_commit of its database)",
            *[fmt_num((o.commits or 0) / o.delivered, 2) for o in runs],
        ]
    )
    section.table(
        ["per delivered notification", *[o.label for o in runs]],
        rows,
        "Cost per delivered notification: CPU µs of each process over the run (a worker counted"
        " with its render processes; the shared servers' figures include any other work on the"
        " machine), and status-store transactions",
    )


def step_table(section: report.Section, run: Outcome, profiles: dict[str, Path]) -> None:
    """CPU µs per delivered notification by step: each profiled process's CPU per delivered
    notification over the run, shared out as its py-spy samples fall on the steps
    (`report.STEPS`)."""
    if not run.cpu_seconds or not run.delivered or not profiles:
        return
    shares: dict[str, dict[str, float]] = {}
    samples = {}
    for name, path in sorted(profiles.items(), key=lambda item: _service_order(item[0])):
        total, by_step = report.step_shares(path.read_text())
        if total:
            shares[name], samples[name] = by_step, total
    if not shares:
        return
    per = {name: 1e6 * run.cpu_seconds.get(name, 0.0) / run.delivered for name in shares}
    steps = [label for label, _, _, _ in report.STEPS if label] + [report.OTHER_STEP]
    rows = [
        [step, *[fmt_num(per[name] * shares[name].get(step, 0.0)) for name in shares]]
        for step in steps
        if any(shares[name].get(step, 0.0) for name in shares)
    ]
    rows.append(["**all steps**", *[f"**{fmt_num(per[name])}**" for name in shares]])
    section.table(
        ["CPU µs per delivered notification", *shares],
        rows,
        f"CPU by step over “{run.label}”: each process's CPU per delivered notification, shared"
        " out by where its py-spy samples fell ("
        + ", ".join(f"{name} {samples[name]:,} samples" for name in shares)
        + "; a sample goes to the most specific step on its stack, so the driver and logging"
        " under a claim count as the claim)",
    )


def vacuum_note(section: report.Section, pipe: Pipeline) -> None:
    if pipe.vacuumed:
        section.note(
            "This PostgreSQL has autovacuum off (configured for CI): the harness ran"
            f" `{VACUUM}` every {VACUUM_EVERY:g} s during each run, as autovacuum would; its CPU"
            " is in PostgreSQL's."
        )


def _service_order(name: str) -> tuple[int, str]:
    """Services, workers and sink, then the generator, the shared servers, the whole machine."""
    order = ["gateway", "user_service", "template_service"]
    if name in order:
        return order.index(name), name
    if name == "load generator":
        return 10, name
    if name in INFRA.values():
        return 11, name
    if name.startswith("whole machine"):
        return 12, name
    return 5, name


async def email_pipeline(env: BenchEnv, opts: E2EOptions) -> tuple[Pipeline, int]:
    """The email setup every email run shares: the SMTP sink, the core services, one user and one
    template; the pipeline and the sink's port."""
    port = free_port()
    sink = await env.start_argv(
        "smtp_sink", ["-m", "scripts.smtp_sink", "--quiet", "--port", str(port)], port, ready="tcp"
    )
    pipe = Pipeline(env, "email", opts)
    pipe.sink = sink
    pipe.core = await env.start_core()
    pipe.worker_config = replace(env.config, smtp_port=port)
    user_id, code = await create_fixture(env, pipe.gateway, EMAIL_TEMPLATE)
    pipe.body = notification_body(user_id, code)
    return pipe, port


def baseline_tables(
    section: report.Section, raw: dict[str, float], outcomes: list[Outcome], what: str, title: str
) -> None:
    """A baseline's figures and each run's ratio to it."""
    section.table(
        ["baseline", "sent", "seconds", "per second", "its CPU"],
        [
            [
                what,
                fmt_num(raw["sent"]),
                fmt_num(raw["seconds"], 1),
                fmt_num(raw["rate"]),
                fmt_num(100 * raw.get("cpu", 0)) + " %",
            ]
        ],
        title,
    )
    ratio_rows = [[o.label, fmt_num(o.rate), fmt_num(o.rate / raw["rate"], 2)] for o in outcomes]
    section.table(["run", "delivered/s", "x the baseline"], ratio_rows, "Ratios")


async def run_email(env: BenchEnv, opts: E2EOptions, record: bool) -> dict[str, Any]:
    section = report.Section("End to end, email")
    pipe, port = await email_pipeline(env, opts)
    raw = await raw_smtp(port, opts)
    outcomes = []
    for i, n in enumerate(opts.workers):
        label = f"N={opts.count:,}, {n} worker{'s' if n > 1 else ''}"
        outcomes.append(
            await pipe.run_n(
                label, n, sample=(i == 0), profile_dir=env.log_dir if opts.profile and i == 0 else None
            )
        )
    open_run = None
    if opts.open_rate > 0:
        rate, seconds = fmt_num(opts.open_rate), fmt_num(opts.open_duration)
        label = f"open loop {rate}/s for {seconds} s, {opts.open_workers} worker(s)"
        open_run = await pipe.run_open(label, opts.open_workers, opts.open_rate, opts.open_duration)
    for proc in pipe.core.values():
        await env.stop(proc)

    section.table(
        E2E_HEADERS,
        [e2e_row(o) for o in [*outcomes, *([open_run] if open_run else [])]],
        "Delivered (from the status store; latency = delivered_at - created_at)",
    )
    baseline_tables(
        section,
        raw,
        outcomes,
        f"raw aiosmtplib, {opts.raw_connections} connections",
        "Baseline (same sink, same run; one process; an EmailMessage built per send)",
    )
    if open_run is not None:
        section.table(
            LOAD_HEADERS,
            [load_row("gateway, open loop", open_run.load)],
            "Gateway answers during the open-loop run",
        )
    cpu_table(section, outcomes)
    per_delivered_table(section, outcomes)
    if outcomes:
        step_table(section, outcomes[0], pipe.profiles)
    vacuum_note(section, pipe)
    flat = _first_rss(section, outcomes)

    best = max(outcomes, key=lambda o: o.rate) if outcomes else None
    targets = []
    if best is not None:
        targets.append(["≥ 600 delivered/s", f"{fmt_num(best.rate)} ({best.label})", _yes(best.rate >= 600)])
        ratio = best.rate / raw["rate"] if raw["rate"] else 0
        targets.append(["≥ 0.7 x raw aiosmtplib (issue 15)", fmt_num(ratio, 2), _yes(ratio >= 0.7)])
    if open_run is not None:
        p99 = open_run.latency_ms["p99"]
        targets.append(
            [
                f"accept→delivered p99 ≤ 1 s at {fmt_num(opts.open_rate)}/s (issue 15)",
                f"{fmt_num(p99)} ms",
                _yes(p99 <= 1000),
            ]
        )
    if flat is not None:
        targets.append(["RSS flat ± 10 %", "see above", _yes(flat)])
    section.table(["target", "measured", "reached"], targets, "Targets (issues 8 and 15)")
    if pipe.profile_raw is not None:
        add_profile(section, "email worker 1, during the first N run", pipe.profile_raw)
    if record:
        report.append(section)
    return {"raw": raw, "runs": [o.__dict__ | {"rate": o.rate, "load": o.load.to_dict()} for o in outcomes]}


async def run_push(env: BenchEnv, opts: E2EOptions, record: bool) -> dict[str, Any]:
    section = report.Section("End to end, push")
    port = free_port()
    credentials = env.log_dir / "fcm-service-account.json"
    fcm = await env.start_argv(
        "fcm_sink", ["-m", "bench.fcm_sink", "--port", str(port), "--credentials", str(credentials)], port
    )
    pipe = Pipeline(env, "push", opts)
    pipe.sink = fcm
    pipe.core = await env.start_core()
    pipe.worker_config = replace(
        env.config,
        fcm_credentials_file=str(credentials),
        fcm_base_url=fcm.url,
        fcm_token_url=f"{fcm.url}/token",
    )
    user_id, code = await create_fixture(
        env, pipe.gateway, PUSH_TEMPLATE, {"platform": "fcm", "token": "bench-fcm-device-token-0001"}
    )
    pipe.body = notification_body(user_id, code, "push")
    raw = await raw_fcm(fcm.url, credentials, opts)
    outcomes = []
    for i, n in enumerate(opts.workers):
        label = f"N={opts.count:,}, {n} worker{'s' if n > 1 else ''}"
        outcomes.append(
            await pipe.run_n(
                label, n, sample=(i == 0), profile_dir=env.log_dir if opts.profile and i == 0 else None
            )
        )
    async with aiohttp.ClientSession() as session, session.get(f"{fcm.url}/count") as response:
        fcm_count = (await response.json())["count"]
    for proc in pipe.core.values():
        await env.stop(proc)
    await env.stop(fcm)

    section.table(
        E2E_HEADERS,
        [e2e_row(o) for o in outcomes],
        "Delivered (one user, one FCM device; from the status store)",
    )
    section.note(f"The FCM server accepted {fcm_count:,} messages in all (warm-ups and baseline included).")
    baseline_tables(
        section,
        raw,
        outcomes,
        f"raw aiohttp FCM client, {opts.raw_connections} connections",
        "Baseline (same FCM server, same run; one process; the same messages:send request per"
        " notification, one OAuth2 token)",
    )
    cpu_table(section, outcomes)
    per_delivered_table(section, outcomes)
    if outcomes:
        step_table(section, outcomes[0], pipe.profiles)
    vacuum_note(section, pipe)
    flat = _first_rss(section, outcomes)
    best = max(outcomes, key=lambda o: o.rate) if outcomes else None
    if best is not None:
        ratio = best.rate / raw["rate"] if raw["rate"] else 0
        targets = [
            ["≥ 1,000 delivered/s", f"{fmt_num(best.rate)} ({best.label})", _yes(best.rate >= 1000)],
            ["≥ 0.7 x raw FCM client (issue 15)", fmt_num(ratio, 2), _yes(ratio >= 0.7)],
        ]
        if flat is not None:
            targets.append(["RSS flat ± 10 %", "see above", _yes(flat)])
        section.table(["target", "measured", "reached"], targets, "Targets (issues 8 and 15)")
    if record:
        report.append(section)
    return {
        "raw": raw,
        "runs": [o.__dict__ | {"rate": o.rate, "load": o.load.to_dict()} for o in outcomes],
        "fcm_count": fcm_count,
    }
