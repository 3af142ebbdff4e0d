"""`python -m bench scale`: the rates with more processes, side by side (docs/scaling.md reads them).

- gateways: 1 and 2 gateway processes (`--gateways`), each its own port, the closed-loop load
  split over them (one generator process per gateway); accepted/s and the CPU each part used;
- email workers: 1, 2 and 4 worker processes (`--workers`), N notifications end to end as in the
  email benchmark; delivered/s and the CPU each part used.

Everything runs on this machine, so past the cores it has the figures flatten: the CPU columns
say where the time went (services, PostgreSQL, RabbitMQ, the generator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from bench import report
from bench.accept import measured
from bench.e2e import E2EOptions, Outcome, email_pipeline
from bench.load import LoadResult, Spec, run_load
from bench.stack import BenchEnv, Proc
from bench.stats import fmt_num
from common.broker.amqp import work_queue


@dataclass
class ScaleOptions:
    gateways: tuple[int, ...] = (1, 2)
    duration: float = 15.0
    concurrency: int = 64
    e2e: E2EOptions | None = None


def _cpu(cpu: dict[str, float], *prefixes: str) -> str:
    return fmt_num(100 * sum(v for k, v in cpu.items() if k.startswith(prefixes))) + " %"


async def run_scale(env: BenchEnv, opts: ScaleOptions, record: bool) -> dict[str, Any]:
    e2e = opts.e2e or E2EOptions()
    section = report.Section("Scaling out: 1, 2 gateways; 1, 2, 4 email workers")
    pipe, _ = await email_pipeline(env, e2e)

    gateways: list[Proc] = [pipe.gateway]
    accept: list[tuple[int, LoadResult, dict[str, float]]] = []
    for n in opts.gateways:
        while len(gateways) < n:
            gateways.append(await env.start(f"gateway_{len(gateways) + 1}", "gateway.py"))
        spec = Spec(
            host="127.0.0.1",
            port=gateways[0].port or 0,
            ports=tuple(g.port or 0 for g in gateways[:n]),
            path="/api/v1/notifications/",
            body=pipe.body,
            headers=env.headers,
            seq_prefix=f"scale-gw{n}-{time.time_ns()}",
            loop=e2e.loop,
            mode="closed",
            concurrency=opts.concurrency,
            duration=opts.duration,
        )
        await run_load(replace(spec, duration=3.0, seq_prefix=f"{spec.seq_prefix}-warm"), n)
        await env.purge(work_queue("email"))
        procs = {**pipe.core, **{g.name: g for g in gateways[:n]}}
        load, cpu = await measured(procs, run_load(spec, n))
        accept.append((n, load, cpu | {"load generator": load.generator_cpu}))
        await env.purge(work_queue("email"))
        await env.truncate_notifications()
    for proc in gateways[1:]:
        await env.stop(proc)

    delivered: list[tuple[int, Outcome]] = []
    for n in e2e.workers:
        label = f"N={e2e.count:,}, {n} worker{'s' if n > 1 else ''}"
        delivered.append((n, await pipe.run_n(label, n, sample=False, profile_dir=None)))
    for proc in pipe.core.values():
        await env.stop(proc)
    if pipe.sink is not None:
        await env.stop(pipe.sink)

    one = accept[0][1].rate if accept else 0.0
    section.table(
        [
            "gateways",
            "accepted/s",
            "x 1 gateway",
            "p50 ms",
            "p99 ms",
            "gateways' CPU",
            "PostgreSQL",
            "RabbitMQ",
            "generator",
            "whole machine",
        ],
        [
            [
                str(n),
                fmt_num(load.rate),
                fmt_num(load.rate / one, 2) if one else "-",
                fmt_num(load.latency_ms["p50"]),
                fmt_num(load.latency_ms["p99"]),
                _cpu(cpu, "gateway"),
                _cpu(cpu, "PostgreSQL"),
                _cpu(cpu, "RabbitMQ"),
                _cpu(cpu, "load generator"),
                _cpu(cpu, "whole machine"),
            ]
            for n, load, cpu in accept
        ],
        f"Gateway accept, closed loop, {opts.concurrency} clients, {fmt_num(opts.duration)} s, no "
        "workers (CPU: 100 % = one core busy)",
    )
    first = delivered[0][1].rate if delivered else 0.0
    section.table(
        [
            "email workers",
            "delivered/s",
            "x 1 worker",
            "p50 ms",
            "p99 ms",
            "workers' CPU",
            "gateway",
            "PostgreSQL",
            "RabbitMQ",
            "SMTP sink",
            "whole machine",
        ],
        [
            [
                str(n),
                fmt_num(o.rate),
                fmt_num(o.rate / first, 2) if first else "-",
                fmt_num(o.latency_ms["p50"]),
                fmt_num(o.latency_ms["p99"]),
                _cpu(o.cpu or {}, "email_worker"),
                _cpu(o.cpu or {}, "gateway"),
                _cpu(o.cpu or {}, "PostgreSQL"),
                _cpu(o.cpu or {}, "RabbitMQ"),
                _cpu(o.cpu or {}, "smtp_sink"),
                _cpu(o.cpu or {}, "whole machine"),
            ]
            for n, o in delivered
        ],
        f"End to end, email, N={e2e.count:,} sent by {e2e.concurrency} clients to one gateway "
        "(latency = delivered_at - created_at)",
    )
    if record:
        report.append(section)
    return {
        "gateways": [{"n": n, **load.to_dict(), "cpu": cpu} for n, load, cpu in accept],
        "workers": [{"n": n, "rate": o.rate, "latency_ms": o.latency_ms, "cpu": o.cpu} for n, o in delivered],
    }
