"""GATEWAY_PROCESSES: one gateway command, N processes on one port (SO_REUSEPORT) under one
parent. Each process answers; notifications sent through the one port concurrently, now and
scheduled, are each published exactly once (outbox relay, dispatcher and reconciler of every
process share the rows through SKIP LOCKED); SIGTERM to the parent stops every child."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from common.broker import amqp
from common.data import db
from tests.conftest import API_KEY
from tests.processes import ServiceProcess

PROCESSES = 2
NOW = 150
LATER = 100
CONCURRENCY = 8


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _sockets_on(port: int, state: str) -> set[str]:
    """Inodes of the sockets bound to `port` on 127.0.0.1 in a TCP state (0A listening, 01
    established: the server side of a connection)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(fields[9])
    return inodes


async def _all_listening(children: list[int], port: int) -> None:
    """The parent answered /health through the first child ready; wait for the others' bind."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not all(_sockets_of(pid) & _sockets_on(port, "0A") for pid in children):
        assert loop.time() < deadline, "not every child listens on the port"
        await asyncio.sleep(0.1)


def _sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(link[8:-1])
    return found


async def _messages(queue: Any, wanted: int, settle: float) -> Counter[str]:
    """Message ids taken off `queue` until `wanted` distinct ones arrived, then for `settle`
    seconds more: a second publish of any of them would be counted."""
    seen: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    quiet_until: float | None = None
    while quiet_until is None or loop.time() < quiet_until:
        assert loop.time() < deadline, f"{len(seen)} of {wanted} published within 90 s"
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        seen[str(message.message_id)] += 1
        if quiet_until is None and len(seen) >= wanted:
            quiet_until = loop.time() + settle
    return seen


async def test_n_processes_share_one_port_publish_each_once_and_stop_together(
    stack_factory: Any, amqp_channel: Any, tmp_path: Path
) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    gateway = ServiceProcess(
        "gateway.py", replace(stack.config, gateway_processes=PROCESSES, db_pool_size=6), tmp_path / "g.log"
    )
    await gateway.start()
    try:
        assert gateway.process is not None
        children = _children(gateway.process.pid)
        assert len(children) == PROCESSES, children
        await _all_listening(children, gateway.port)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as session:
            # 32 connections at once: each child holds some of them (all on one: 2^-31).
            async def live() -> int:
                async with session.get(gateway.url + "/health/live") as response:
                    return response.status

            assert await asyncio.gather(*(live() for _ in range(32))) == [200] * 32
            open_here = _sockets_on(gateway.port, "01")
            served = {pid: len(_sockets_of(pid) & open_here) for pid in children}
            assert all(count > 0 for count in served.values()), served

            # Concurrent, but not so many at once that the pools of three gateways (each up to
            # 20 connections) run this machine's shared PostgreSQL out of connections.
            slots = asyncio.Semaphore(CONCURRENCY)

            async def send(n: int, **extra: Any) -> str:
                body = {
                    "notification_type": "email",
                    "user_id": user["id"],
                    "template_code": code,
                    "variables": {"name": "Ada", "link": "https://example.com"},
                    "request_id": f"proc-{n}-{uuid.uuid4()}",
                    **extra,
                }
                async with slots, session.post(gateway.url + "/api/v1/notifications/", json=body) as response:
                    answer = await response.json()
                    assert response.status == 202, answer
                    return str(answer["data"]["notification_id"])

            queue = await amqp_channel.get_queue(amqp.work_queue("email"))
            ids = await asyncio.gather(*(send(n) for n in range(NOW)))
            # Past RELAY_AGE: a relay of another process that took a row in hand elsewhere
            # would have published it again by then.
            now_seen = await _messages(queue, NOW, settle=8)
            assert set(now_seen) == set(ids) and set(now_seen.values()) == {1}, now_seen.most_common(3)

            send_at = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
            later = await asyncio.gather(*(send(NOW + n, send_at=send_at) for n in range(LATER)))
            later_seen = await _messages(queue, LATER, settle=8)
            assert set(later_seen) == set(later) and set(later_seen.values()) == {1}, later_seen.most_common(
                3
            )
        notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
        try:
            left = await notes.fetchval("SELECT count(*) FROM notifications WHERE publish_pending")
        finally:
            await notes.close()
        assert left == 0

        gateway.signal(signal.SIGTERM)
        assert await gateway.wait(40) == 0
        gone = await asyncio.to_thread(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children))
        assert gone, "a child outlived its parent"
    finally:
        gateway.stop()
    log = (tmp_path / "g.log").read_text()
    assert "gateway: SIGTERM: stopping everything" in log, log[-2000:]
