"""The benchmark's own environment and processes.

Everything lives apart from `make run` and the test suite on a shared machine: databases
`notify_bench_*`, the RabbitMQ vhost `notify_bench`, Redis database 14, free ports. `BenchEnv`
creates them fresh, starts services as subprocesses with a Config turned into environment
variables (as tests/processes.py does), and removes everything again at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import redis.asyncio as aioredis

from common.broker import amqp
from common.config import Config
from common.data import db
from common.data.migrate import databases, migrate_all
from scripts.localenv import config_env, free_port, rabbitmq_vhost
from topology import declare

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
PREFIX = os.environ.get("NOTIFY_BENCH_PREFIX", "notify_bench")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "14"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
VACUUM = "VACUUM (ANALYZE) notifications, notification_events, notification_keys"
VACUUM_EVERY = 20.0  # seconds between the harness's vacuums when the server has autovacuum off


@contextlib.contextmanager
def exclusive_run() -> Iterator[None]:
    """One benchmark run per prefix at a time: a second one would drop the first one's databases
    and vhost under it. Another at once needs its own NOTIFY_BENCH_PREFIX and BENCH_REDIS_DB."""
    path = Path(tempfile.gettempdir()) / f"{PREFIX}.lock"
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"bench: another run is using {PREFIX} ({path} is locked); wait for it, or give this"
                " one its own NOTIFY_BENCH_PREFIX and BENCH_REDIS_DB"
            ) from None
        yield


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stat(pid: int | str) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is [0], ppid [1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live descendants have used so far: a worker's
    render processes (`common/rendering/renderer.py`) work for it, so their CPU is part of its cost."""
    children: dict[int, list[int]] = {}
    for path in Path("/proc").glob("[0-9]*"):
        try:
            children.setdefault(int(_stat(path.name)[1]), []).append(int(path.name))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            parts = _stat(current)
        except OSError:
            continue
        total += (int(parts[11]) + int(parts[12])) / CLK_TCK
        todo.extend(children.get(current, ()))
    return total


# Shared servers, by process name. Their CPU includes any other work on the machine.
INFRA = {"postgres": "PostgreSQL (all processes)", "beam.smp": "RabbitMQ", "redis-server": "Redis"}


def infra_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by PostgreSQL, RabbitMQ and Redis, each summed over its processes,
    plus `machine`: busy CPU seconds of the whole machine (all cores, from /proc/stat)."""
    totals = dict.fromkeys(INFRA.values(), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm in INFRA:
            parts = text[text.rindex(")") + 2 :].split()
            totals[INFRA[comm]] += (int(parts[11]) + int(parts[12])) / CLK_TCK
    # First line of /proc/stat: user nice system idle iowait irq softirq steal (jiffies).
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    busy = sum(cpu) - cpu[3] - cpu[4]
    totals["whole machine (all cores)"] = busy / CLK_TCK
    return totals


class CpuMeter:
    """CPU used by the given processes and the shared servers between start() and stop(), as a
    share of one core over the wall time (1.0 = one core busy)."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.before: dict[str, float] = {}
        self.t0 = 0.0
        self.wall = 0.0  # seconds between start() and stop()

    def _now(self) -> dict[str, float]:
        return {**{name: p.cpu_seconds() for name, p in self.procs.items()}, **infra_cpu_seconds()}

    def start(self) -> None:
        self.before = self._now()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = self.wall = time.perf_counter() - self.t0
        after = self._now()
        return {name: (after[name] - self.before[name]) / wall for name in after if name in self.before}


class Proc:
    """A subprocess with a log file, ready when its /health answers 200."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_dir: Path,
        port: int | None = None,
        ready: str = "http",
    ) -> None:
        self.name = name
        self.ready = ready  # "http": GET /health answers 200; "tcp": the port accepts connections
        self.argv = argv
        self.env = env
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 30) -> Proc:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - spawning returns at once
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if self.port is None:
            await asyncio.sleep(0.5)
            return self
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    if self.ready == "tcp":
                        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                        writer.close()
                        return self
                    async with session.get(self.url + "/health") as response:
                        if response.status == 200:
                            return self
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} did not become ready: {self.log_path.read_text()[-2000:]}")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    async def stop(self, timeout: float = 25) -> None:
        """SIGTERM (workers finish what they hold), SIGKILL if it takes too long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)


@dataclass
class BenchEnv:
    log_dir: Path
    prefetch: int = 64
    log_level: str = "INFO"
    # Names of its own (databases, vhost) and a Redis database: the soak (bench/soak.py) runs
    # beside the benchmarks and the tests with prefixes of its own.
    prefix: str = PREFIX
    redis_db: int = REDIS_DB
    api_key: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(18))
    procs: list[Proc] = field(default_factory=list)
    config: Config = field(init=False)
    _notifications_db: db.Database | None = None

    def __post_init__(self) -> None:
        self.config = Config(
            rabbitmq_url=f"amqp://guest:guest@127.0.0.1:5672/{self.prefix}",
            redis_url=f"redis://127.0.0.1:6379/{self.redis_db}",
            users_db_url=f"{PG}/{self.prefix}_users_db",
            templates_db_url=f"{PG}/{self.prefix}_templates_db",
            notifications_db_url=f"{PG}/{self.prefix}_notifications_db",
            gateway_api_keys=(self.api_key,),
            internal_api_token=secrets.token_urlsafe(24),
            jwt_secret=secrets.token_urlsafe(24),
            rate_limit=0,  # the benchmark measures the service, not the limiter's ceiling
            event_loop=os.environ.get("BENCH_SERVICE_LOOP", "uvloop"),
            # GATEWAY_PROCESSES=2 make bench BENCH_ARGS=accept: the gateway as 2 processes on its port.
            gateway_processes=int(os.environ.get("GATEWAY_PROCESSES", "1")),
            worker_prefetch=self.prefetch,
            log_level=self.log_level,
            log_format="json",
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def setup(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for url in databases(self.config).values():
            await db.drop_database(url)  # leftovers of an interrupted run
        await migrate_all(self.config)
        await asyncio.to_thread(rabbitmq_vhost, "delete", self.prefix)
        await asyncio.to_thread(rabbitmq_vhost, "add", self.prefix)
        connection = await amqp.connect(self.config.rabbitmq_url)
        try:
            await declare(await connection.channel(), self.config)
        finally:
            await connection.close()
        await self._flush_redis()

    async def teardown(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()
        self.procs.clear()
        if self._notifications_db is not None:
            await self._notifications_db.close()
            self._notifications_db = None
        for url in databases(self.config).values():
            with contextlib.suppress(db.DatabaseError, OSError):
                await db.drop_database(url)
        await asyncio.to_thread(rabbitmq_vhost, "delete", self.prefix)
        await self._flush_redis()

    async def _flush_redis(self) -> None:
        client = aioredis.Redis.from_url(self.config.redis_url)
        try:
            await client.flushdb()
        finally:
            await client.aclose()

    async def start(self, name: str, module: str, config: Config | None = None, **env: str) -> Proc:
        port = free_port()
        environment = {**config_env(config or self.config), "PORT": str(port), **env}
        proc = Proc(name, [sys.executable, module], environment, self.log_dir, port)
        self.procs.append(proc)
        return await proc.start()

    async def start_argv(
        self, name: str, argv: list[str], port: int | None = None, ready: str = "http"
    ) -> Proc:
        proc = Proc(name, [sys.executable, *argv], dict(os.environ), self.log_dir, port, ready)
        self.procs.append(proc)
        return await proc.start()

    async def stop(self, proc: Proc) -> None:
        await proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    async def start_core(self) -> dict[str, Proc]:
        """User service, template service and gateway (no workers)."""
        users = await self.start("user_service", "user_service.py")
        templates = await self.start("template_service", "template_service.py")
        self.config = replace(self.config, user_service_url=users.url, template_service_url=templates.url)
        gateway = await self.start("gateway", "gateway.py")
        self.config = replace(self.config, public_base_url=gateway.url)
        return {"gateway": gateway, "user_service": users, "template_service": templates}

    async def notifications_db(self) -> db.Database:
        if self._notifications_db is None:
            self._notifications_db = await db.connect(self.config.notifications_db_url, maxsize=2)
        return self._notifications_db

    async def purge(self, *queues: str) -> int:
        """Empty work queues (the accept benchmark runs without workers, so they only fill)."""
        connection = await aio_pika.connect(self.config.rabbitmq_url)
        purged = 0
        try:
            channel = await connection.channel()
            for name in queues:
                queue = await channel.get_queue(name)
                result = await queue.purge()
                purged += int(getattr(result, "message_count", 0) or 0)
        finally:
            await connection.close()
        return purged

    async def truncate_notifications(self) -> None:
        database = await self.notifications_db()
        await database.execute("TRUNCATE notifications, notification_events, notification_keys")

    @contextlib.asynccontextmanager
    async def autovacuum(self, every: float = VACUUM_EVERY) -> AsyncIterator[bool]:
        """What autovacuum would do, while a long run goes on, on a server that has it off (this
        machine's PostgreSQL, configured for CI): without it every claim and record leaves a
        dead row version, and a run of tens of thousands slows as they pile up, which no
        deployment sees. Yields whether it vacuums; its CPU counts in PostgreSQL's, as
        autovacuum's would."""
        database = await self.notifications_db()
        if await database.fetchval("SELECT current_setting('autovacuum') = 'on'"):
            yield False
            return
        stopping = asyncio.Event()

        async def vacuum() -> None:
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), every)
                if not stopping.is_set():
                    await database.execute(
                        "VACUUM (ANALYZE) notifications, notification_events, notification_keys"
                    )

        task = asyncio.create_task(vacuum())
        try:
            yield True
        finally:
            stopping.set()
            await asyncio.gather(task, return_exceptions=True)


async def api(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: Any = None
) -> dict[str, Any]:
    """One setup call through the gateway (not load); fails loudly on anything but 2xx."""
    async with session.request(method, url, json=body, headers=headers) as response:
        payload = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"{method} {url} answered {response.status}: {payload}")
        return dict(payload["data"])
