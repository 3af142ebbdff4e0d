"""Keys created and revoked per project (scripts/keys.py), stored hashed: a new key works on the
gateway within seconds and sees its project's data; a revoked one stops working."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

from common.data import db
from common.web.auth import key_id
from tests.conftest import Stack


def _keys(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTIFICATIONS_DB_URL": stack.config.notifications_db_url}
    return subprocess.run(
        [sys.executable, "-m", "scripts.keys", *args], capture_output=True, text=True, env=env, timeout=60
    )


async def _status_within(stack: Stack, key: str, wanted: int, seconds: float = 10) -> int:
    deadline = time.monotonic() + seconds
    while True:
        response = await stack.gateway.get(
            "/api/v1/notifications/", headers={"Authorization": f"Bearer {key}"}
        )
        if response.status == wanted or time.monotonic() > deadline:
            return response.status
        await asyncio.sleep(0.2)


async def test_a_created_key_works_for_its_project_and_a_revoked_one_stops(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(workers=False)
    created = _keys(stack, "create", "--project", "acme", "--name", "backend")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("nk_")
    # Stored hashed: the key itself is nowhere in the table.
    database = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        rows = await database.fetch("SELECT key_hash::text AS h, project_id FROM api_keys")
    finally:
        await database.close()
    assert {"h": key_id(key), "project_id": "acme"} in rows and all(key not in r["h"] for r in rows)

    assert await _status_within(stack, key, 200) == 200
    # It acts for project acme: the default project's data is not its.
    user = await stack.create_user()
    template = await stack.create_template()
    status, body, _ = await stack.send_email(user["id"], template["code"], request_id="keys-test")
    assert status == 202, body
    auth = {"Authorization": f"Bearer {key}"}
    theirs = await stack.gateway.get(f"/api/v1/notifications/{body['data']['notification_id']}", headers=auth)
    assert theirs.status == 404
    assert (await (await stack.gateway.get("/api/v1/notifications/", headers=auth)).json())["data"] == []

    listed = _keys(stack, "list", "--project", "acme")
    [line] = [x for x in listed.stdout.splitlines() if "backend" in x]
    kid = line.split()[0]
    assert _keys(stack, "revoke", kid).returncode == 0
    assert await _status_within(stack, key, 401) == 401
    assert _keys(stack, "revoke", kid).returncode == 1  # already revoked
    bad = _keys(stack, "create", "--project", "Not A Project")
    assert bad.returncode == 2 and "project" in bad.stderr
