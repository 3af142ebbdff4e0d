"""Servers of a test's own, for tests that restart a dependency: a PostgreSQL cluster
(`pg_createcluster`), a Redis server and a RabbitMQ node (scripts/rabbit_cluster.py with one
node), each on a free port of 127.0.0.1 with a name and a folder of its own. The machine's
servers are never touched: restarting them would break every other test running beside."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.smtp_sink import free_port

PG_VERSION = "15"


def postgres_installed() -> bool:
    return shutil.which("pg_createcluster") is not None and shutil.which("pg_ctlcluster") is not None


def redis_installed() -> bool:
    return shutil.which("redis-server") is not None


class OwnPostgres:
    """A PostgreSQL 15 cluster created for one test and dropped after it (trust auth on
    127.0.0.1, no fsync: nothing in it has to outlive the test, only a restart)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["pg_ctlcluster", PG_VERSION, self.name, *args], check=True, capture_output=True, timeout=timeout
        )

    def start(self) -> None:
        self.drop()  # one a crashed earlier run left behind
        subprocess.run(
            [
                "pg_createcluster",
                PG_VERSION,
                self.name,
                "--port",
                str(self.port),
                "--start-conf",
                "manual",
                "--",
                "--auth=trust",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        # Debian's postgresql.conf reads conf.d/ last: the settings land there, written as the
        # server parses them (pg_createcluster's -o quotes some values and not others).
        (Path("/etc/postgresql") / PG_VERSION / self.name / "conf.d" / "notify-test.conf").write_text(
            "listen_addresses = '127.0.0.1'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "max_connections = 200\n"
            "shared_buffers = '32MB'\n"
        )
        self._ctl("start")

    def restart(self) -> None:
        """A restart as an upgrade does it: every session closed, prepared statements gone."""
        self._ctl("restart", "-m", "fast")

    def drop(self) -> None:
        subprocess.run(
            ["pg_dropcluster", PG_VERSION, self.name, "--stop"], capture_output=True, check=False, timeout=120
        )


class OwnRedis:
    """A Redis server that keeps nothing on disk: a restart loses everything, as one without
    persistence (the machine's, and many caches') does."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="notify-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            result = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True, check=False
            )
            if result.stdout.strip() == "PONG":
                return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
