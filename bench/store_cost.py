"""What the status store's steps cost PostgreSQL per notification: the CPU time of the server
process (from /proc, so other work on the machine does not count) for each step of a
notification's life — accept (`create_many`), publish mark, claim, record `delivered` — at
several batch sizes, with the statements prepared (the default) and planned each time
(`DB_PREPARED_STATEMENTS=false`).

`python -m bench.store_cost [--count 4000] [--batches 1,4,32]` creates its own database
(notify_bench_store_cost, migrated like notifications_db), prints a markdown table, and drops
the database. PostgreSQL must be local (its server process is read from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections.abc import Awaitable
from pathlib import Path

from common.data import db
from common.data.store import Claim, NewNotification, Outcome, StatusStore

URL = os.environ.get("STORE_COST_DB_URL", "postgresql://postgres@127.0.0.1:5432/notify_bench_store_cost")
CLK_TCK = os.sysconf("SC_CLK_TCK")
STEPS = ("accept", "publish mark", "claim", "record delivered")


def server_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    parts = stat[stat.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def notification() -> NewNotification:
    return NewNotification(
        id=uuid.uuid4(),
        client_id="bench",
        request_id=uuid.uuid4().hex,
        body_hash="h",
        user_id=str(uuid.uuid4()),
        notification_type="email",
        template_code="welcome",
        language="en",
        template_version=1,
        priority=0,
        correlation_id="c",
        variables={"name": "Ada", "link": "https://example.com/start"},
    )


async def measure(prepared: bool, batch: int, count: int) -> dict[str, float]:
    """Server CPU µs per notification for each step."""
    database = await db.connect(URL, maxsize=1, prepared=prepared)  # one connection: one server process
    store = StatusStore(database)
    pid = int(await database.fetchval("SELECT pg_backend_pid()"))
    spent = dict.fromkeys(STEPS, 0.0)
    try:
        for _ in range(0, count, batch):
            rows = [notification() for _ in range(batch)]
            claims = [Claim(r.id, 1, uuid.uuid4()) for r in rows]
            outcomes = [
                Outcome(c.notification_id, "delivered", claim=c.token, provider="smtp") for c in claims
            ]
            steps: tuple[Awaitable[object], ...] = (
                store.create_many(rows),
                store.mark_published([r.id for r in rows]),
                store.claim_many(claims, 30),
                store.record_many(outcomes),
            )
            for name, step in zip(STEPS, steps, strict=True):
                before = server_cpu(pid)
                await step
                spent[name] += server_cpu(pid) - before
    finally:
        await database.close()
    done = count // batch * batch
    return {name: 1e6 * seconds / done for name, seconds in spent.items()}


async def main(count: int, batches: tuple[int, ...]) -> None:
    await db.drop_database(URL)
    await db.migrate(URL, "notifications_db")
    try:
        await measure(True, 32, 640)  # warm-up: caches, the first partition pages
        print(f"| statements | batch | {' | '.join(STEPS)} | total µs per notification |")
        print(f"|---|---|{'---|' * len(STEPS)}---|")
        for prepared in (False, True):
            for batch in batches:
                cost = await measure(prepared, batch, count)
                cells = " | ".join(f"{cost[s]:,.0f}" for s in STEPS)
                kind = "prepared" if prepared else "planned each time"
                print(f"| {kind} | {batch} | {cells} | {sum(cost.values()):,.0f} |", flush=True)
    finally:
        await db.drop_database(URL)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.store_cost")
    parser.add_argument("--count", type=int, default=4000, help="notifications per row (default 4000)")
    parser.add_argument("--batches", default="1,4,32", help="batch sizes (default 1,4,32)")
    args = parser.parse_args()
    asyncio.run(main(args.count, tuple(int(b) for b in args.batches.split(","))))
