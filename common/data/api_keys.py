"""Keys a project's admin creates and revokes (`python -m scripts.keys`), stored hashed in the
notifications database (`api_keys`), beside the keys of GATEWAY_API_KEYS.

The gateway authenticates every request without a query: `KeyRing` holds the live keys' hashes
in memory, refreshed every `REFRESH` seconds, so a new key works, and a revoked one stops
working, within that time on every gateway.
"""

from __future__ import annotations

import asyncio
import secrets

from common import background
from common.data.db import Database, Row

REFRESH = 2.0
PREFIX = "nk_"  # a created key's prefix, so a leaked one is recognisable in a scan


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


async def create(database: Database, digest: str, project: str, name: str = "") -> Row | None:
    return await database.fetchrow(
        "INSERT INTO api_keys (key_hash, project_id, name) VALUES (%s, %s, %s)"
        " RETURNING project_id, name, left(key_hash, 12) AS key_id, created_at",
        digest,
        project,
        name,
    )


async def revoke(database: Database, key_id: str) -> int:
    """Revoke the key whose id (the first 12 hex digits of its hash, as listed) is `key_id`."""
    if len(key_id) < 12:
        return 0
    return await database.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE left(key_hash, %s) = %s AND revoked_at IS NULL",
        len(key_id),
        key_id,
    )


async def listed(database: Database, project: str | None = None) -> list[Row]:
    return await database.fetch(
        "SELECT left(key_hash, 12) AS key_id, project_id, name, created_at, revoked_at FROM api_keys"
        " WHERE %s::text IS NULL OR project_id = %s ORDER BY created_at",
        project,
        project,
    )


class KeyRing:
    """The live stored keys: hash → project, read by the gateway's resolver."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.keys: dict[str, str] = {}

    async def refresh(self) -> None:
        rows = await self.database.fetch("SELECT key_hash, project_id FROM api_keys WHERE revoked_at IS NULL")
        self.keys = {r["key_hash"]: r["project_id"] for r in rows}

    async def run(self, stopping: asyncio.Event) -> None:
        await background.rounds(stopping, REFRESH, self.refresh, "api key refresh")
