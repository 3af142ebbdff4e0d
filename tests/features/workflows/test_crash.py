"""Timers live in PostgreSQL: runs waiting when a gateway is SIGKILLed complete through another
gateway, and each step's email goes out once."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from common.data import db
from tests.conftest import API_KEY, Stack
from tests.processes import ServiceProcess


async def test_fifty_waiting_runs_survive_a_sigkilled_gateway(stack_factory: Any, tmp_path: Path) -> None:
    stack: Stack = await stack_factory()  # its gateway is the one that survives
    template = await stack.create_template()
    users = [await stack.create_user() for _ in range(50)]
    key = f"crash-{uuid.uuid4().hex[:8]}"
    doomed = ServiceProcess("gateway.py", stack.config, tmp_path / "doomed.log")
    await doomed.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            definition = {
                "name": "Crash",
                "steps": [
                    {"name": "wait", "type": "delay", "duration": 1.5},
                    {"name": "mail", "type": "email", "template_code": template["code"]},
                ],
            }
            async with session.put(f"{doomed.url}/api/v1/workflows/{key}", json=definition) as response:
                assert response.status == 201, await response.text()
            body = {
                "to": [u["id"] for u in users],
                "payload": {"name": "Ada", "link": "https://example.com"},
                "request_id": "crash-1",
            }
            async with session.post(f"{doomed.url}/api/v1/workflows/{key}/trigger", json=body) as response:
                assert response.status == 202, await response.text()
                runs = (await response.json())["data"]["runs"]
        assert len(runs) == 50
        database = await db.connect(stack.config.notifications_db_url, maxsize=1)
        try:
            deadline = time.monotonic() + 10
            while (
                await database.fetchval(
                    "SELECT count(*) FROM workflow_runs WHERE workflow_key = %s AND status = 'waiting'", key
                )
                < 50
            ):
                assert time.monotonic() < deadline, "the runs never reached their delay"
                await asyncio.sleep(0.05)
            # Killed while every run waits on its timer (and, as they fall due, while its engine
            # may hold some of them mid-step).
            await asyncio.sleep(1.4)
            doomed.signal(signal.SIGKILL)
            await doomed.wait(10)
            deadline = time.monotonic() + 60
            while (
                left := await database.fetchval(
                    "SELECT count(*) FROM workflow_runs WHERE workflow_key = %s AND status <> 'completed'",
                    key,
                )
            ) > 0:
                assert time.monotonic() < deadline, f"{left} runs did not complete"
                await asyncio.sleep(0.2)
            made = await database.fetch(
                "SELECT workflow_run_id, id FROM notifications WHERE step = 'mail'"
                " AND workflow_run_id = ANY(%s::uuid[])",
                [r["run_id"] for r in runs],
            )
        finally:
            await database.close()
        assert len(made) == 50  # one notification per run and step
        for run in runs:
            await stack.wait_for(
                str(next(m["id"] for m in made if str(m["workflow_run_id"]) == run["run_id"])),
                "delivered",
                timeout=30,
            )
        await asyncio.sleep(0.5)
        received = Counter(stack.smtp.notification_ids())
        assert all(received[str(m["id"])] == 1 for m in made), received
    finally:
        doomed.stop()
