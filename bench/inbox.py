"""The inbox's live events: many open streams on one gateway, and the time from a send to its event.

`python -m bench.inbox [--streams 2000] [--sends 200] [--rate 20] [--idle 30]` starts the user
service, the template service, one gateway and the inbox worker as processes of their own
(`bench/stack.py`). `--probes` users (existing, each with an in-app template to be sent) hold one
event stream each; the other streams are idle users' (tokens minted for ids of their own), as a
product's open tabs would be.

1. Baseline: only the probes' streams open. `--sends` in-app notifications to the probes, at
   `--rate` per second, each timed from just before its `POST /api/v1/notifications/` until its
   `message` event arrives on the probe's stream (send → accept → in_app.queue → the inbox worker
   stores and announces → Redis → the gateway's subscription → the stream reads its events).
2. With `--streams` open: the gateway's memory before and after opening them (KiB per stream),
   its CPU over `--idle` seconds with all of them open and nothing sent (heartbeats every 15 s,
   each stream's fallback look every 10 s), and the same sends timed again.

Reported: p50/p99 send → event for both, as a ratio; KiB per stream; idle CPU (% of a core and
µs per stream per second); CPU µs per in-app notification of the gateway and the inbox worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import orjson

from bench import report
from bench.stack import BenchEnv, api, exclusive_run
from bench.stats import percentile
from common.web.auth import issue_access_token

IN_APP_TEMPLATE = {
    "notification_type": "in_app",
    "language": "en",
    "title": "New comment from {{ name }}",
    "body": "<p>{{ name }} replied to your post.</p>",
}


class Stream:
    """One user's open event stream; `arrived` maps a notification id to when its event came."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session, self.url, self.token = session, url, token
        self.arrived: dict[str, float] = {}
        self.opened = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        async with self.session.get(
            self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"a stream answered {r.status}: {await r.text()}")
            event, data = "", b""
            async for raw in r.content:
                line = raw.rstrip(b"\r\n")
                if not line:
                    if event == "counts":
                        self.opened.set()
                    elif event == "message":
                        self.arrived[str(orjson.loads(data)["notification_id"])] = time.perf_counter()
                    event, data = "", b""
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data += line[5:].strip()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def open_streams(
    session: aiohttp.ClientSession, url: str, tokens: list[str], at_once: int = 100
) -> list[Stream]:
    streams = [Stream(session, url, token) for token in tokens]
    for i in range(0, len(streams), at_once):
        group = streams[i : i + at_once]
        for stream in group:
            stream.start()
        await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in group)), 60)
    return streams


async def timed_sends(
    session: aiohttp.ClientSession,
    gateway: str,
    headers: dict[str, str],
    probes: list[tuple[str, Stream]],
    code: str,
    sends: int,
    rate: float,
) -> list[float]:
    """Seconds from send to event, one per send (paced at `rate`, round-robin over the probes)."""
    sent: list[tuple[str, Stream, float]] = []
    for i in range(sends):
        user_id, stream = probes[i % len(probes)]
        body = {
            "notification_type": "in_app",
            "user_id": user_id,
            "template_code": code,
            "variables": {"name": "Ada"},
            "request_id": f"bench-inbox-{uuid.uuid4().hex}",
        }
        started = time.perf_counter()
        made = await api(session, "POST", f"{gateway}/api/v1/notifications/", headers, body)
        sent.append((str(made["notification_id"]), stream, started))
        await asyncio.sleep(max(0.0, started + 1 / rate - time.perf_counter()))
    deadline = time.perf_counter() + 60
    while any(n not in s.arrived for n, s, _ in sent):
        if time.perf_counter() > deadline:
            missing = sum(n not in s.arrived for n, s, _ in sent)
            raise RuntimeError(f"{missing} of {sends} events never arrived")
        await asyncio.sleep(0.01)
    return [s.arrived[n] - t for n, s, t in sent]


async def main(streams: int, probes: int, sends: int, rate: float, idle: float, record: bool) -> None:
    env = BenchEnv(Path(tempfile.mkdtemp(prefix="bench-inbox-")))
    await env.setup()
    opened: list[Stream] = []
    try:
        procs = await env.start_core()
        gateway = procs["gateway"]
        worker = await env.start("inbox_worker", "inbox_worker.py")
        headers = env.headers
        events_url = f"{gateway.url}/api/v1/inbox/events"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            code = f"bench-in-app-{time.time_ns()}"
            await api(
                session,
                "POST",
                f"{gateway.url}/api/v1/templates/",
                headers,
                {"code": code, **IN_APP_TEMPLATE},
            )
            probe_users = []
            for n in range(probes):
                user_id = f"probe-{n}-{uuid.uuid4().hex[:8]}"
                await api(
                    session, "PUT", f"{gateway.url}/api/v1/users/{user_id}", headers, {"name": f"Probe {n}"}
                )
                probe_users.append(user_id)
            secret = env.config.jwt_secret
            probe_streams = await open_streams(
                session, events_url, [issue_access_token(secret, u, 3600) for u in probe_users]
            )
            opened.extend(probe_streams)
            pairs = list(zip(probe_users, probe_streams, strict=True))
            await timed_sends(session, gateway.url, headers, pairs, code, min(20, sends), rate)  # warm-up
            cpu_gw, cpu_worker = gateway.cpu_seconds(), worker.cpu_seconds()
            baseline = await timed_sends(session, gateway.url, headers, pairs, code, sends, rate)
            cpu_per_send = (
                (gateway.cpu_seconds() - cpu_gw) / sends * 1e6,
                (worker.cpu_seconds() - cpu_worker) / sends * 1e6,
            )

            rss_before = gateway.rss_kib()
            idle_tokens = [issue_access_token(secret, f"idle-{n}", 3600) for n in range(streams - probes)]
            opened.extend(await open_streams(session, events_url, idle_tokens))
            await asyncio.sleep(2)
            rss_after = gateway.rss_kib()
            cpu = gateway.cpu_seconds()
            await asyncio.sleep(idle)
            idle_cpu = (gateway.cpu_seconds() - cpu) / idle
            loaded = await timed_sends(session, gateway.url, headers, pairs, code, sends, rate)
            for stream in opened:
                await stream.close()
            opened.clear()
    finally:
        for stream in opened:
            await stream.close()
        await env.teardown()

    def ms(values: list[float], q: float) -> float:
        return percentile(sorted(values), q) * 1000

    def row(label: str, values: list[float]) -> list[str]:
        return [label, *(f"{v:.1f} ms" for v in (ms(values, 50), ms(values, 99), max(values) * 1000))]

    section = report.Section("Inbox: open event streams and send to event")
    section.table(
        ["streams open", "send → event p50", "p99", "max"],
        [row(f"{probes:,} (the probes)", baseline), row(f"{streams:,}", loaded)],
        caption=f"{sends} in-app notifications each, {rate:g}/s, to {probes} users with a stream open;"
        " timed from before the POST until the `message` event is read from the stream",
    )
    per_stream = (rss_after - rss_before) / (streams - probes)
    memory = f"{per_stream:.1f} KiB ({rss_before / 1024:.0f} → {rss_after / 1024:.0f} MiB)"
    idle_figure = (
        f"{idle_cpu * 100:.1f} % of a core ({idle_cpu / streams * 1e6:.1f} µs per stream per second)"
    )
    per_send = f"gateway {cpu_per_send[0]:,.0f}, inbox worker {cpu_per_send[1]:,.0f}"
    section.table(
        ["figure", "value"],
        [
            ["gateway memory per open stream", memory],
            [f"gateway CPU with {streams:,} open, nothing sent", idle_figure],
            ["CPU µs per in-app notification (baseline)", per_send],
        ],
    )
    p50, p99 = ms(loaded, 50) / ms(baseline, 50), ms(loaded, 99) / ms(baseline, 99)
    section.note(
        f"With {streams:,} streams open the p50 send → event was {p50:.2f} x and the p99 {p99:.2f} x"
        " the same run's figures with only the probes' streams open."
    )
    print(section.markdown(), flush=True)
    if record:
        report.append(section)


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inbox")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--sends", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.streams <= args.probes:
        parser.error("--streams must be more than --probes")
    with exclusive_run():
        asyncio.run(main(args.streams, args.probes, args.sends, args.rate, args.idle, not args.no_record))


if __name__ == "__main__":
    run()
