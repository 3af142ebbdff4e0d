"""`make soak` (`python -m bench.soak [--minutes 30] [--seed 7] [--rate 20]`): the whole stack as
real processes under steady email traffic and a seeded random schedule of faults, then a drain,
then the count: accepted, delivered, lost, stuck, duplicates, and each process's RSS, open file
descriptors and PostgreSQL connections over time (a Markdown report and a PNG plot).

Faults, one at a time with quiet gaps between them (the order is a seeded shuffle of every kind,
repeated, so a short run still sees many kinds and a given seed always the same schedule):
black holes (TCP proxies in front of PostgreSQL, RabbitMQ, Redis and the SMTP server forward
nothing, for longer than every client timeout), cuts (the proxy drops every connection and
refuses new ones for a few seconds), SIGKILL and SIGTERM of an extra gateway and an extra email
worker (restarted afterwards), purged queues (`rabbitmqctl purge_queue` on the soak's own
vhost; the email workers paused first, so the work queue holds a backlog to lose), and SMTP
greylisting of some recipients. The client retries whatever got no 202 with the same
`request_id`.

Everything is its own: databases and vhost `notify_soak_*` (`--prefix`), Redis database 5
(`--redis-db`), free ports; nothing of the machine's servers is restarted. Exit status 1 when
anything accepted is lost or stuck, when duplicates exceed what the documented window allows,
or when RSS or open files are not flat after warm-up (bench/soak_report.py says what flat is).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.report import ROOT
from bench.soak_report import Result, Sample, write_report
from bench.stack import BenchEnv, Proc, api, rss_kib
from common.config import Config
from tests.smtp_sink import SmtpSink
from tests.tcp_proxy import TcpProxy, via

FINAL = ("delivered", "failed", "skipped", "cancelled")
DEPENDENCIES = ("postgres", "rabbitmq", "redis", "smtp")
KINDS = (
    *(f"black hole {d}" for d in DEPENDENCIES),
    *(f"cut {d}" for d in DEPENDENCIES),
    "SIGKILL gateway-2",
    "SIGKILL email_worker-2",
    "SIGTERM gateway-2",
    "SIGTERM email_worker-2",
    "purge email.queue",
    "purge email.retry.1",
    "greylist",
)
# Longer than every client timeout below (PostgreSQL 3 s, SMTP 5 s, HTTP 5 s), so the black hole
# is met by a timeout, never by a connection that simply comes back.
BLACK_HOLE = (12.0, 20.0)
CUT = (2.0, 6.0)  # seconds a cut proxy refuses connections before it listens again
DOWN = (3.0, 8.0)  # seconds a killed or stopped extra process stays down
GREYLIST = (10.0, 25.0)
GAP = (3.0, 10.0)  # quiet seconds between two faults
PREFETCH = 16
PAUSE = 4.0  # seconds the email workers are stopped (SIGSTOP) before a purge of their queue


@dataclass
class Options:
    minutes: float = 30.0
    seed: int = 7
    rate: float = 20.0  # notifications per second
    users: int = 50
    drain: float = 120.0  # at most this long after the traffic for everything to be final
    sample_every: float = 5.0
    prefix: str = "notify_soak"
    redis_db: int = 5
    out: Path | None = None
    warmup: float = 0.0  # seconds whose samples flatness ignores; 0: a tenth of the run, 30 s at least
    # The reconciler's RECONCILE_AFTER: short, so that a drain of two minutes covers a pass. Made
    # long, it shows what the soak sees when nothing redrives what the broker lost.
    reconcile_after: float = 10.0
    # DB_POOL_SIZE of every process (0: the services' own). The short soak in `make test` keeps
    # it small: it shares the machine's PostgreSQL (max_connections) with the suite's workers.
    db_pool_size: int = 0


@dataclass
class Fault:
    kind: str
    start: float  # seconds since the traffic began
    end: float = 0.0


@dataclass
class Soak:
    options: Options
    env: BenchEnv
    log_dir: Path
    rng: random.Random  # the fault schedule's alone, so a seed always gives the same schedule
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    sink: SmtpSink = field(default_factory=SmtpSink)
    procs: dict[str, Proc] = field(default_factory=dict)
    incarnation: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    first_received: dict[str, float] = field(default_factory=dict)
    accepted: dict[str, str] = field(default_factory=dict)  # request_id -> notification_id
    answers: Counter[str] = field(default_factory=Counter)  # non-202 answers, by status
    conflicts: int = 0
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    reclaimed: dict[tuple[str, int], float] = field(default_factory=dict)
    exits: list[str] = field(default_factory=list)
    restart_failures: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # the client's, and the faults'
    users: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    pick: random.Random = field(default_factory=random.Random)  # which gateway a request goes to

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _on_message(self, message: EmailMessage, at: float) -> None:
        # Called on the sink's thread: Counter updates of one key are safe enough under the GIL
        # for a count that is read once everything has stopped.
        notification_id = str(message["X-Notification-ID"])
        self.received[notification_id] += 1
        self.first_received.setdefault(notification_id, at - self.t0)

    # --- the stack ------------------------------------------------------------------------------

    def service_config(self, name: str) -> Config:
        """The config of one process: its dependencies through the proxies, and an
        application_name of its own on each PostgreSQL connection, so pg_stat_activity counts
        connections per process (behind a proxy the client address says nothing)."""
        c = self.env.config
        app = f"?application_name={self.options.prefix}:{name}"
        return replace(
            c,
            users_db_url=via(c.users_db_url, self.proxies["postgres"]) + app,
            templates_db_url=via(c.templates_db_url, self.proxies["postgres"]) + app,
            notifications_db_url=via(c.notifications_db_url, self.proxies["postgres"]) + app,
            rabbitmq_url=via(c.rabbitmq_url, self.proxies["rabbitmq"]),
            redis_url=via(c.redis_url, self.proxies["redis"]),
            smtp_port=self.proxies["smtp"].port,
        )

    async def start_proc(self, name: str, module: str) -> Proc:
        self.incarnation[name] += 1
        proc = await self.env.start(name, module, self.service_config(name))
        self.procs[name] = proc
        return proc

    async def start_stack(self) -> None:
        targets = {
            "postgres": urlsplit(self.env.config.notifications_db_url),
            "rabbitmq": urlsplit(self.env.config.rabbitmq_url),
            "redis": urlsplit(self.env.config.redis_url),
        }
        for name, parts in targets.items():
            self.proxies[name] = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
        self.proxies["smtp"] = TcpProxy("127.0.0.1", self.sink.port)
        for proxy in self.proxies.values():
            await proxy.start()
        self.sink.on_message = self._on_message
        self.sink.start()
        users = await self.start_proc("user_service", "user_service.py")
        templates = await self.start_proc("template_service", "template_service.py")
        self.env.config = replace(
            self.env.config, user_service_url=users.url, template_service_url=templates.url
        )
        await self.start_proc("gateway", "gateway.py")
        await self.start_proc("gateway-2", "gateway.py")
        await self.start_proc("email_worker", "email_worker.py")
        await self.start_proc("email_worker-2", "email_worker.py")
        await self.start_proc("push_worker", "push_worker.py")
        await self.start_proc("inbox_worker", "inbox_worker.py")

    async def stop_stack(self) -> None:
        await self.env.teardown()
        for proxy in self.proxies.values():
            await proxy.close()
        self.sink.stop()

    # --- traffic --------------------------------------------------------------------------------

    async def prepare(self, session: aiohttp.ClientSession) -> str:
        gateway = self.procs["gateway"].url
        template = await api(
            session,
            "POST",
            gateway + "/api/v1/templates/",
            self.env.headers,
            {
                "code": "soak",
                "notification_type": "email",
                "language": "en",
                "subject": "Soak {{ name }}",
                "body": "<p>Hello {{ name }}</p>",
            },
        )
        for i in range(self.options.users):
            self.users.append(
                await api(
                    session,
                    "POST",
                    gateway + "/api/v1/users/",
                    self.env.headers,
                    {"name": f"Soak {i}", "email": f"soak-{i}@example.com", "preferences": {"email": True}},
                )
            )
        return str(template["code"])

    def gateways(self) -> list[str]:
        return [
            p.url
            for n, p in self.procs.items()
            if n.startswith("gateway") and p.process is not None and p.process.poll() is None
        ]

    async def submit(
        self, session: aiohttp.ClientSession, gate: asyncio.Semaphore, body: dict[str, Any], until: float
    ) -> None:
        """One notification, retried with the same request_id until a 202 (or `until`)."""
        delay = 0.25
        while self.now() < until:
            urls = self.gateways() or [self.procs["gateway"].url]
            url = self.pick.choice(urls) + "/api/v1/notifications/"
            status: str
            try:
                async with (
                    gate,
                    session.post(
                        url, json=body, headers=self.env.headers, timeout=aiohttp.ClientTimeout(total=10)
                    ) as response,
                ):
                    payload = await response.json(content_type=None)
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                status = type(exc).__name__
                payload = {}
            if status == "202":
                self.accepted[body["request_id"]] = str(payload["data"]["notification_id"])
                return
            if status == "422" and payload.get("error") == "idempotency_conflict":
                self.conflicts += 1  # the replay differs from the original: a bug, counted
                return
            self.answers[status] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def traffic(
        self, session: aiohttp.ClientSession, code: str, seconds: float, until: float
    ) -> list[asyncio.Task[None]]:
        """Open loop: `rate` new notifications a second whatever the answers, as real clients send."""
        gate = asyncio.Semaphore(200)
        tasks: list[asyncio.Task[None]] = []
        started = self.now()
        n = 0
        while (elapsed := self.now() - started) < seconds:
            while n < elapsed * self.options.rate:
                user = self.users[n % len(self.users)]
                body = {
                    "notification_type": "email",
                    "user_id": user["id"],
                    "template_code": code,
                    "variables": {"name": user["name"]},
                    "request_id": f"soak-{n}-{uuid.uuid4().hex[:8]}",
                }
                tasks.append(asyncio.create_task(self.submit(session, gate, body, until)))
                self.tasks.append(tasks[-1])
                n += 1
            await asyncio.sleep(0.02)
        return tasks

    # --- faults ---------------------------------------------------------------------------------

    def schedule(self) -> list[str]:
        kinds: list[str] = []
        while len(kinds) < 1000:
            batch = list(KINDS)
            self.rng.shuffle(batch)
            kinds += batch
        return kinds

    async def faults_until(self, until: float) -> None:
        kinds = iter(self.schedule())
        await asyncio.sleep(self.rng.uniform(*GAP))
        while self.now() < until:
            kind = next(kinds)
            fault = Fault(kind, self.now())
            self.faults.append(fault)
            print(f"soak: {fault.start:7.1f} s  {kind}", flush=True)
            await self.inflict(kind, until)
            fault.end = self.now()
            await asyncio.sleep(self.rng.uniform(*GAP))

    async def inflict(self, kind: str, until: float) -> None:
        what, _, target = kind.partition(" ")
        if what == "black":
            proxy = self.proxies[target.split()[-1]]
            proxy.freeze()
            await asyncio.sleep(self.rng.uniform(*BLACK_HOLE))
            proxy.thaw()
        elif what == "cut":
            proxy = self.proxies[target]
            await proxy.cut()
            await asyncio.sleep(self.rng.uniform(*CUT))
            await proxy.restore()
        elif what in ("SIGKILL", "SIGTERM"):
            proc = self.procs[target]
            assert proc.process is not None
            await self.scrape(target)  # its last counts, before they die with it
            proc.process.send_signal(signal.SIGKILL if what == "SIGKILL" else signal.SIGTERM)
            try:
                code = await asyncio.to_thread(proc.process.wait, 40)
            except subprocess.TimeoutExpired:
                self.exits.append(f"{target} did not stop within 40 s of {what}")
                proc.process.kill()
                code = await asyncio.to_thread(proc.process.wait, 10)
            if what == "SIGTERM" and code != 0:
                self.exits.append(f"{target} exited {code} after SIGTERM")
            await asyncio.sleep(self.rng.uniform(*DOWN))
            self.incarnation[target] += 1
            await self.restart(proc)
        elif what == "purge":
            vhost = self.options.prefix
            # The workers keep the work queue close to empty; paused for a moment (as a broker
            # node gone would leave its queue), they let a backlog build for the purge to lose.
            workers = [
                p.process
                for n, p in self.procs.items()
                if n.startswith("email_worker") and p.process is not None and p.process.poll() is None
            ]
            if target == "email.queue":
                for process in workers:
                    process.send_signal(signal.SIGSTOP)
                await asyncio.sleep(PAUSE)
            try:
                await asyncio.to_thread(
                    subprocess.run,
                    ["rabbitmqctl", "-q", "purge_queue", "-p", vhost, target],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
            finally:
                if target == "email.queue":
                    for process in workers:
                        process.send_signal(signal.SIGCONT)
        elif what == "greylist":
            chosen = self.rng.sample(self.users, max(1, len(self.users) // 5))
            # Each window greylists afresh: the sink answers 451 to a listed recipient's first RCPT.
            self.sink.greylisted = []
            self.sink.greylist = {str(u["email"]) for u in chosen}
            await asyncio.sleep(self.rng.uniform(*GREYLIST))
            self.sink.greylist = set()

    async def restart(self, proc: Proc) -> None:
        """Start a stopped process again, as a supervisor would: until it comes up. On a shared
        machine it can fail to for a while (the machine's PostgreSQL out of connections: "too
        many clients already"); each refusal is noted in the report."""
        while True:
            try:
                await proc.start()
                return
            except (RuntimeError, TimeoutError) as exc:
                reason = str(exc).strip().splitlines()[-1][:160]
                self.restart_failures.append(f"{self.now():.0f} s {proc.name}: {reason}")
                print(f"soak: {self.now():7.1f} s  {proc.name} did not start again: {reason}", flush=True)
                if proc.process is not None and proc.process.poll() is None:
                    proc.process.kill()
                    await asyncio.to_thread(proc.process.wait, 10)
                await asyncio.sleep(5)

    # --- measuring ------------------------------------------------------------------------------

    async def scrape(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(proc.url + "/metrics") as response,
            ):
                value = metric_sum(await response.text(), "notify_reclaimed_total")
                key = (name, self.incarnation[name])
                self.reclaimed[key] = max(self.reclaimed.get(key, 0.0), value)

    async def sample(self) -> None:
        database = await self.env.notifications_db()
        rows = await database.fetch(
            "SELECT application_name, count(*) AS n FROM pg_stat_activity"
            " WHERE application_name LIKE %s GROUP BY application_name",
            f"{self.options.prefix}:%",
        )
        connections = {str(r["application_name"]).split(":", 1)[1]: int(r["n"]) for r in rows}
        at = self.now()
        for name, proc in self.procs.items():
            if proc.process is None or proc.process.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                fds = len(os.listdir(f"/proc/{proc.pid}/fd"))  # /proc: no disk behind it
                self.samples.append(
                    Sample(at, name, self.incarnation[name], rss_kib(proc.pid), fds, connections.get(name, 0))
                )
            if name.startswith("email_worker"):
                await self.scrape(name)

    async def sampling(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a sample missed in a black hole is no failure
                await asyncio.wait_for(self.sample(), self.options.sample_every)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.sample_every)

    async def statuses(self) -> dict[str, str]:
        database = await self.env.notifications_db()
        ids = list(self.accepted.values())
        rows = await database.fetch(
            "SELECT id::text AS id, status FROM notifications WHERE id = ANY(%s::uuid[])",
            [uuid.UUID(i) for i in ids],
        )
        return {str(r["id"]): str(r["status"]) for r in rows}


def metric_sum(text: str, name: str) -> float:
    """A Prometheus counter's value summed over its labels."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def run(options: Options) -> Result:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = options.out or ROOT / "bench" / "results" / f"soak-{stamp}"
    env = BenchEnv(
        out / "logs", prefetch=PREFETCH, log_level="WARNING", prefix=options.prefix, redis_db=options.redis_db
    )
    env.config = replace(
        env.config,
        event_loop="uvloop",
        db_timeout=3.0,
        smtp_timeout=5.0,
        http_timeout=5.0,
        # Short enough that a drain of two minutes covers every retry and a reconciler pass.
        retry_delays=(1.0, 2.0, 4.0, 8.0, 16.0),
        reconcile_after=options.reconcile_after,
        claim_timeout=10.0,
        db_pool_size=options.db_pool_size,
    )
    soak = Soak(options, env, out / "logs", random.Random(options.seed))
    traffic_seconds = options.minutes * 60
    # Faults stop a little before the traffic does, so the last one's recovery is under load too.
    faults_end = traffic_seconds * 0.9
    await env.setup()
    try:
        await soak.start_stack()
        async with aiohttp.ClientSession() as session:
            code = await soak.prepare(session)
            soak.t0 = time.monotonic()
            stop = asyncio.Event()
            sampler = asyncio.create_task(soak.sampling(stop))
            faults = asyncio.create_task(soak.faults_until(faults_end))
            soak.tasks += [sampler, faults]
            give_up = traffic_seconds + options.drain
            tasks = await soak.traffic(session, code, traffic_seconds, give_up)
            await faults
            traffic_end = soak.now()
            sent = len(tasks)
            # The drain: every request answered 202 and every notification final, or time is up.
            while soak.now() < give_up:
                if all(t.done() for t in tasks):
                    found = await soak.statuses()
                    if len(found) == len(soak.accepted) and all(s in FINAL for s in found.values()):
                        break
                await asyncio.sleep(1.0)
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(3)  # time for a late duplicate to show up, were there one
            drained = soak.now() - traffic_end
            await soak.sample()
            stop.set()
            await sampler
            found = await soak.statuses()
    finally:
        # Stopped early (SIGTERM, an error): nothing of the client may outlive its session.
        for task in soak.tasks:
            task.cancel()
        await asyncio.gather(*soak.tasks, return_exceptions=True)
        await soak.stop_stack()
    warmup = options.warmup or max(30.0, traffic_seconds / 10)
    result = Result.count(
        options=vars(options),
        sent=sent,
        accepted=soak.accepted,
        statuses=found,
        received=dict(soak.received),
        first_received=soak.first_received,
        answers=dict(soak.answers),
        conflicts=soak.conflicts,
        faults=[(f.kind, f.start, f.end) for f in soak.faults],
        reclaimed=sum(soak.reclaimed.values()),
        kills=sum(f.kind == "SIGKILL email_worker-2" for f in soak.faults),
        prefetch=PREFETCH,
        samples=soak.samples,
        warmup=warmup,
        traffic_seconds=traffic_seconds,
        drained=drained,
        exits=soak.exits,
        restart_failures=soak.restart_failures,
    )
    write_report(result, out)
    return result


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of traffic and faults (default 30)")
    p.add_argument("--seed", type=int, default=7, help="seed of the fault schedule (default 7)")
    p.add_argument("--rate", type=float, default=20.0, help="notifications a second (default 20)")
    p.add_argument(
        "--drain", type=float, default=120.0, help="seconds allowed after the traffic (default 120)"
    )
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--prefix", default="notify_soak", help="databases and vhost (default notify_soak)")
    p.add_argument("--redis-db", type=int, default=5, help="Redis database (default 5)")
    p.add_argument(
        "--reconcile-after", type=float, default=10.0, help="RECONCILE_AFTER of the services (default 10)"
    )
    p.add_argument(
        "--db-pool-size",
        type=int,
        default=0,
        help="DB_POOL_SIZE of every process (default 0: the services' own)",
    )
    p.add_argument("--out", type=Path, help="directory for the report, plot and logs")
    a = p.parse_args(argv)
    return Options(
        a.minutes,
        a.seed,
        a.rate,
        drain=a.drain,
        sample_every=a.sample_every,
        prefix=a.prefix,
        redis_db=a.redis_db,
        out=a.out,
        reconcile_after=a.reconcile_after,
        db_pool_size=a.db_pool_size,
    )


async def _until_stopped(options: Options) -> Result:
    # SIGTERM (and SIGINT, which a shell's background job ignores) stop it the way Ctrl-C does:
    # the run is cancelled and its processes, databases and vhost are removed on the way out.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await run(options)


def main() -> None:
    result = asyncio.run(_until_stopped(parse()))
    print(result.markdown(), flush=True)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
