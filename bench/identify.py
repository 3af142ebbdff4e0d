"""Bulk identify: users imported per second through the user service, and the CPU it costs per
user (the service's process), against a same-run
baseline of one plain multi-row INSERT of the same rows straight into the table.

`python -m bench.identify [--users 100000] [--batch 1000]` starts a user service of its own
through `create_app`, on a database of its own (notify_bench_identify, migrated like users_db),
sends the users in batches of `--batch` over HTTP with the internal token, records the figures
in BENCHMARKS.md (and bench/history/), and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
import uuid
from dataclasses import replace

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

import user_service
from bench.report import Section, append
from common.config import Config
from common.data import db

URL = os.environ.get("IDENTIFY_DB_URL", "postgresql://postgres@127.0.0.1:5432/notify_bench_identify")
TOKEN = "bench-internal-token-0123456789"


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _users(prefix: str, count: int) -> list[dict[str, object]]:
    return [
        {"id": f"{prefix}-{i}", "name": f"User {i}", "email": f"{prefix}-{i}@example.com", "data": {"n": i}}
        for i in range(count)
    ]


async def _via_service(config: Config, users: list[dict[str, object]], batch: int) -> tuple[float, float]:
    """Seconds and the service's CPU seconds (this process runs it) for all batches."""
    server = TestServer(user_service.create_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/api/v1/users/bulk"))
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            cpu, started = _self_cpu(), time.perf_counter()
            for start in range(0, len(users), batch):
                body = orjson.dumps({"users": users[start : start + batch]})
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
            return time.perf_counter() - started, _self_cpu() - cpu
    finally:
        await server.close()


async def _baseline(database: db.Database, users: list[dict[str, object]], batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(users), batch):
        rows = users[start : start + batch]
        await database.execute(
            "INSERT INTO users (project_id, id, name, email, data)"
            " SELECT 'baseline', r.id, r.name, r.email, r.data"
            " FROM jsonb_to_recordset(%s::jsonb) AS r(id text, name text, email text, data jsonb)",
            orjson.dumps(rows).decode(),
        )
    return time.perf_counter() - started


async def main(count: int, batch: int) -> None:
    await db.migrate(URL, "users_db")
    config = replace(Config.from_env({"INTERNAL_API_TOKEN": TOKEN, "JWT_SECRET": "x" * 32}), users_db_url=URL)
    section = Section("Bulk identify")
    database = await db.connect(URL, maxsize=1)
    try:
        await database.execute("TRUNCATE users CASCADE")
        prefix = uuid.uuid4().hex[:6]
        fresh = _users(prefix, count)
        base_seconds = await _baseline(database, _users("b" + prefix, count), batch)
        created_s, created_cpu = await _via_service(config, fresh, batch)
        updated_s, updated_cpu = await _via_service(config, fresh, batch)  # the same users again
        total = int(await database.fetchval("SELECT count(*) FROM users WHERE project_id = 'default'"))
        assert total == count, total
    finally:
        await database.close()
        await db.drop_database(URL)

    def row(name: str, seconds: float, cpu: float | None) -> list[str]:
        per_user = f"{cpu / count * 1e6:,.0f}" if cpu is not None else "-"
        return [name, f"{count / seconds:,.0f}", f"{base_seconds / seconds:.2f}", per_user]

    rows = [
        row("baseline: one INSERT per batch, no service", base_seconds, None),
        row("identify, new users", created_s, created_cpu),
        row("identify, the same users again (updates)", updated_s, updated_cpu),
    ]
    section.table(
        ["run", "users/s", "ratio to baseline", "service CPU µs/user"],
        rows,
        caption=f"{count:,} users in batches of {batch:,} (`POST /api/v1/users/bulk`, PostgreSQL local)",
    )
    section.note(
        "The service CPU is this process's (it runs the user service and the HTTP client); the"
        " baseline is the same rows in the same batches inserted by one statement, no HTTP."
    )
    append(section)


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.identify")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.users, args.batch))


if __name__ == "__main__":
    run()
