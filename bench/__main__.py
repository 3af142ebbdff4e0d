"""`python -m bench [accept|email|fanout|push|all] [options]` — see BENCHMARKS.md.

Creates its own databases (notify_bench_*), RabbitMQ vhost (notify_bench) and Redis db (14),
runs the chosen benchmarks against services started as processes on free 127.0.0.1 ports,
prints the tables, records them (bench/history/ and the latest in BENCHMARKS.md), and removes
what it created. Service logs and raw profiles stay in bench/results/<time>/ (not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.accept import AcceptOptions, run_accept
from bench.e2e import E2EOptions, run_email, run_push
from bench.fanout import FanoutOptions, Reference, run_fanout
from bench.report import ROOT
from bench.scale import ScaleOptions, run_scale
from bench.stack import BenchEnv, exclusive_run


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument(
        "which", nargs="?", default="all", choices=("accept", "email", "fanout", "push", "all", "scale")
    )
    p.add_argument("--quick", action="store_true", help="a small run for development: N=500, short durations")
    g = p.add_argument_group("gateway accept")
    g.add_argument("--duration", type=float, default=15.0, help="closed-loop seconds (default 15)")
    g.add_argument(
        "--open-duration", type=float, default=10.0, help="seconds per open-loop rate (default 10)"
    )
    g.add_argument(
        "--rates", type=_floats, default=(500.0, 1000.0, 2000.0), help="open-loop rates, e.g. 500,1000,2000"
    )
    g.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (default 64)")
    g.add_argument("--baseline-duration", type=float, default=10.0, help="seconds per baseline (default 10)")
    e = p.add_argument_group("end to end")
    e.add_argument(
        "-n", "--count", type=int, default=20000, help="notifications per email run (default 20000)"
    )
    e.add_argument(
        "--push-count",
        type=int,
        default=10000,
        help="notifications per push run, at most --count (default 10000)",
    )
    e.add_argument("--workers", type=_ints, default=(1, 2), help="worker processes per run, e.g. 1,2")
    e.add_argument(
        "--e2e-concurrency", type=int, default=32, help="closed-loop clients sending N (default 32)"
    )
    e.add_argument(
        "--open-rate", type=float, default=300.0, help="open-loop rate for latency, 0 to skip (default 300)"
    )
    e.add_argument("--open-e2e-duration", type=float, default=20.0, help="open-loop seconds (default 20)")
    e.add_argument(
        "--open-workers", type=int, default=1, help="email workers in the open-loop run (default 1)"
    )
    e.add_argument(
        "--raw-count", type=int, default=10000, help="raw aiosmtplib messages, at most (default 10000)"
    )
    e.add_argument("--prefetch", type=int, default=64, help="WORKER_PREFETCH (default 64)")
    e.add_argument(
        "--send-seconds", type=float, default=90.0, help="stop sending N after this long (default 90)"
    )
    e.add_argument(
        "--drain-timeout", type=float, default=120.0, help="max seconds to wait for deliveries (default 120)"
    )
    e.add_argument(
        "--warmup", type=int, default=200, help="notifications sent before each e2e run, not counted"
    )
    f = p.add_argument_group("topic fan-out")
    f.add_argument(
        "--subscribers",
        type=int,
        default=None,
        help="subscribers of the topic (default 100000; 2000 with --quick)",
    )
    f.add_argument(
        "--fanout-workers", type=int, default=1, help="email worker processes for the fan-out (default 1)"
    )
    f.add_argument(
        "--compare-count",
        type=int,
        default=5000,
        help="N of the single-notification run measured for the comparison when the email benchmark"
        " did not run first (default 5000)",
    )
    f.add_argument(
        "--fanout-timeout", type=float, default=1200.0, help="max seconds for the fan-out (default 1200)"
    )
    s = p.add_argument_group("scale (not part of all): --workers sets the email workers, e.g. 1,2,4")
    s.add_argument("--gateways", type=_ints, default=(1, 2), help="gateway processes per run (default 1,2)")
    c = p.add_argument_group("common")
    c.add_argument("--generators", type=int, default=1, help="load generator processes (default 1)")
    c.add_argument("--loop", choices=("uvloop", "asyncio"), default=None, help="generator event loop")
    c.add_argument("--no-profile", action="store_true", help="skip py-spy profiles")
    c.add_argument("--log-level", default="INFO", help="services' LOG_LEVEL (default INFO, as deployed)")
    c.add_argument(
        "--no-record", action="store_true", help="print only; record nothing (BENCHMARKS.md, bench/history/)"
    )
    args = p.parse_args(argv)
    if args.loop is None:
        args.loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    if args.quick:
        args.duration, args.open_duration, args.baseline_duration = 4.0, 3.0, 3.0
        args.count, args.raw_count, args.open_e2e_duration = 500, 1000, 5.0
        args.compare_count = 500
    if args.subscribers is None:
        args.subscribers = 2000 if args.quick else 100_000
    return args


def _email_reference(email: dict[str, Any] | None, e2e: E2EOptions, workers: int) -> Reference | None:
    """The email benchmark's N run with `workers` workers, when it ran in this invocation."""
    if not email:
        return None
    for n, run in zip(e2e.workers, email["runs"], strict=False):
        if n == workers and run["delivered"]:
            return Reference(f"{run['label']} (the email benchmark of this run)", float(run["rate"]))
    return None


def prune(results: Path, keep: int) -> None:
    """Service logs at LOG_LEVEL=INFO run to ~10 MB a run: keep only the newest runs' folders."""
    if not results.is_dir():
        return
    runs = sorted(p for p in results.iterdir() if p.is_dir() and p.name[:8].isdigit())
    for old in runs[: max(0, len(runs) - keep + 1)]:
        shutil.rmtree(old, ignore_errors=True)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    log_dir = ROOT / "bench" / "results" / stamp
    prune(log_dir.parent, keep=10)
    env = BenchEnv(log_dir, prefetch=args.prefetch, log_level=args.log_level)
    record = not args.no_record
    profile = not args.no_profile
    results: dict[str, Any] = {}
    started = time.monotonic()
    e2e = E2EOptions(
        count=args.count,
        workers=args.workers,
        concurrency=args.e2e_concurrency,
        open_rate=args.open_rate,
        open_duration=args.open_e2e_duration,
        open_workers=args.open_workers,
        raw_count=args.raw_count,
        send_seconds=args.send_seconds,
        warmup=args.warmup,
        drain_timeout=args.drain_timeout,
        generators=args.generators,
        loop=args.loop,
        profile=profile,
    )
    await env.setup()
    try:
        if args.which in ("accept", "all"):
            opts = AcceptOptions(
                duration=args.duration,
                open_duration=args.open_duration,
                rates=args.rates,
                concurrency=args.concurrency,
                baseline_duration=args.baseline_duration,
                generators=args.generators,
                loop=args.loop,
                profile=profile,
            )
            results["accept"] = await run_accept(env, opts, record)
        if args.which in ("email", "all"):
            results["email"] = await run_email(env, e2e, record)
        if args.which in ("fanout", "all"):
            results["fanout"] = await run_fanout(
                env,
                FanoutOptions(
                    subscribers=args.subscribers,
                    workers=args.fanout_workers,
                    compare_count=args.compare_count,
                    timeout=args.fanout_timeout,
                    e2e=e2e,
                ),
                record,
                _email_reference(results.get("email"), e2e, args.fanout_workers),
            )
        if args.which == "scale":
            results["scale"] = await run_scale(
                env,
                ScaleOptions(
                    gateways=args.gateways,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    e2e=e2e,
                ),
                record,
            )
        if args.which in ("push", "all"):
            push = E2EOptions(**{**e2e.__dict__, "count": min(args.push_count, args.count), "profile": False})
            results["push"] = await run_push(env, push, record)
    finally:
        await env.teardown()
    print(
        f"\nbench: done in {time.monotonic() - started:.0f} s; logs in {log_dir.relative_to(ROOT)}",
        flush=True,
    )
    return results


def run() -> None:
    args = parse()
    with exclusive_run():
        results = asyncio.run(main(args))
    out = ROOT / "bench" / "results" / "last.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    run()
