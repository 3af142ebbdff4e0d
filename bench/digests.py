"""Digests: events folded per second into open windows, against runs that only wait, in the same run.

`python -m bench.digests [--events 3000] [--keys 10] [--concurrency 32]` starts the user service,
the template service and the gateway (which runs the workflow engine) as processes of their own
(`bench/stack.py`), no workers. Two workflows, the same triggers (`--events`, one user,
`--concurrency` at a time):

1. the baseline: a `delay` of an hour then an email: each run is stored, taken by the engine and
   written `waiting`;
2. a `digest` of an hour keyed by `payload.post_id` (`--keys` distinct posts) then an email: each
   run is stored, taken by the engine, and joins its key's window (advisory lock, window row
   `FOR UPDATE`, the event's row) or opens it.

Reported per workflow: from the first trigger until every run has settled (`waiting`, or `merged`
into a window), events per second, and the gateway's CPU µs per event (its process, from /proc,
trigger and engine together); and the digest's figures as ratios to the baseline's. At the end the
windows are checked: `--keys` of them, holding every event once.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench import report
from bench.accept import EMAIL_TEMPLATE, create_fixture
from bench.stack import BenchEnv, exclusive_run
from bench.workflows import closed_loop, put_workflow


async def settled(env: BenchEnv, key: str) -> int:
    database = await env.notifications_db()
    return int(
        await database.fetchval(
            "SELECT count(*) FROM workflow_runs WHERE workflow_key = %s AND status IN ('waiting', 'merged')",
            key,
        )
    )


async def wait_settled(env: BenchEnv, key: str, expected: int, timeout: float) -> None:
    started = time.perf_counter()
    while (done := await settled(env, key)) < expected:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"only {done:,} of {expected:,} runs settled in {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def main(events: int, keys: int, concurrency: int, record: bool) -> None:
    env = BenchEnv(Path(tempfile.mkdtemp(prefix="bench-digests-")))
    await env.setup()
    try:
        procs = await env.start_core()
        gateway = procs["gateway"]
        user_id, code = await create_fixture(env, gateway, EMAIL_TEMPLATE)
        headers = env.headers
        variables = {"name": "Ada", "link": "https://example.com/start"}
        figures: dict[str, tuple[float, float]] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as session:
            mail = {"name": "mail", "type": "email", "template_code": code}
            kinds = {
                "baseline: a delay of an hour": {"name": "wait", "type": "delay", "duration": "PT1H"},
                f"a digest of an hour, {keys} keys": {
                    "name": "gather",
                    "type": "digest",
                    "window": "PT1H",
                    "key": "{{ payload.post_id }}",
                },
            }
            for name, step in kinds.items():
                key = await put_workflow(session, gateway, headers, [step, mail])
                bodies = [
                    {
                        "to": user_id,
                        "payload": {**variables, "post_id": f"post-{i % keys}", "n": i},
                        "request_id": f"e-{i}-{uuid.uuid4().hex}",
                    }
                    for i in range(events)
                ]
                cpu = gateway.cpu_seconds()
                started = time.perf_counter()
                await closed_loop(
                    session, f"{gateway.url}/api/v1/workflows/{key}/trigger", headers, bodies, concurrency
                )
                await wait_settled(env, key, events, timeout=600)
                seconds = time.perf_counter() - started
                cpu = gateway.cpu_seconds() - cpu
                figures[name] = (events / seconds, cpu / events * 1e6)
            database = await env.notifications_db()
            windows = await database.fetch(
                "SELECT d.id, count(e.run_id) AS n FROM workflow_digests d"
                " JOIN workflow_digest_events e ON e.digest_id = d.id"
                " WHERE d.workflow_key = %s GROUP BY d.id",
                key,
            )
            if len(windows) != keys or sum(int(w["n"]) for w in windows) != events:
                counts = [int(w["n"]) for w in windows]
                raise RuntimeError(f"windows {counts} for {events} events, {keys} keys")
    finally:
        await env.teardown()

    (base_rate, base_cpu), (rate, cpu_each) = figures.values()
    section = report.Section("Digests: events folded into open windows")
    section.table(
        ["workflow", "events settled/s", "gateway CPU µs/event"],
        [[name, f"{r:,.0f}", f"{c:,.0f}"] for name, (r, c) in figures.items()],
        caption=f"{events:,} triggers each, {concurrency} at a time, one user; settled = the run"
        " waits (its delay, or the window it carries) or is merged into a window; no workers",
    )
    section.note(
        f"The digest folded events at {rate / base_rate:.2f} x the rate of runs that only wait, at"
        f" {cpu_each / base_cpu:.2f} x their gateway CPU per event; its {keys} windows held all"
        f" {events:,} events, each once."
    )
    if record:
        report.append(section)


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.digests")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with exclusive_run():
        asyncio.run(main(args.events, args.keys, args.concurrency, not args.no_record))


if __name__ == "__main__":
    run()
