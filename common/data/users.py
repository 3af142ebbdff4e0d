"""The SQL of users_db: a project's users under the client's own ids, and their devices. The
user service's handlers (`user_service.py`) validate; these statements read and write, in the
project of the moment (`project_var`, set from the caller's principal)."""

from __future__ import annotations

from typing import Any

import orjson

from common.data import db
from common.logs import project_var
from common.vocabulary import CHANNELS

USER_COLUMNS = "id, name, email, phone, preferences, language, timezone, data, created_at, updated_at"
DEFAULT_PREFERENCES = dict.fromkeys(CHANNELS, True)


_UPDATE_MANY = """
    WITH r AS (SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r(
        id text, name text, email text, phone text, language text, timezone text,
        preferences jsonb, data jsonb))
    UPDATE users AS u SET name = coalesce(r.name, u.name), email = coalesce(r.email, u.email),
        phone = coalesce(r.phone, u.phone), language = coalesce(r.language, u.language),
        timezone = coalesce(r.timezone, u.timezone),
        preferences = u.preferences || coalesce(r.preferences, '{}'),
        data = u.data || coalesce(r.data, '{}'), updated_at = now()
    FROM r WHERE u.project_id = %s AND u.id = r.id RETURNING u.id"""
_INSERT_MANY = """
    INSERT INTO users (project_id, id, name, email, phone, language, timezone, preferences, data)
    SELECT %s, r.id, r.name, r.email, r.phone, coalesce(r.language, 'en'), coalesce(r.timezone, 'UTC'),
        %s::jsonb || coalesce(r.preferences, '{}'), coalesce(r.data, '{}')
    FROM jsonb_to_recordset(%s::jsonb) AS r(
        id text, name text, email text, phone text, language text, timezone text,
        preferences jsonb, data jsonb)
    ON CONFLICT (project_id, id) DO NOTHING RETURNING id"""


async def upsert(
    database: db.Database, project: str, users: list[dict[str, Any]]
) -> tuple[set[str], set[str]]:
    """Identify many users: (created, updated) ids, in two statements (a few more when another
    request creates one of them between the two: its insert gave way, so it is updated)."""
    created: set[str] = set()
    updated: set[str] = set()
    todo = users
    for _ in range(3):
        payload = orjson.dumps(todo).decode()
        updated |= {r["id"] for r in await database.fetch(_UPDATE_MANY, payload, project)}
        new = [u for u in todo if u["id"] not in updated]
        if not new:
            break
        inserted = await database.fetch(
            _INSERT_MANY, project, orjson.dumps(DEFAULT_PREFERENCES).decode(), orjson.dumps(new).decode()
        )
        created |= {r["id"] for r in inserted}
        todo = [u for u in new if u["id"] not in created]
        if not todo:
            break
    return created, updated


async def load_profile(database: db.Database, user_id: str) -> dict[str, Any] | None:
    project = project_var.get()
    user = await database.fetchrow(
        f"SELECT {USER_COLUMNS} FROM users WHERE project_id = %s AND id = %s", project, user_id
    )
    if user is None:
        return None
    user["devices"] = await database.fetch(
        "SELECT id, platform, token, subscription, created_at FROM devices"
        " WHERE project_id = %s AND user_id = %s ORDER BY created_at, id",
        project,
        user_id,
    )
    return user


async def add_device(
    database: db.Executor, user_id: str, platform: str, token: str, sub: dict[str, Any] | None
) -> dict[str, Any]:
    # The same token registered twice is one device: the second call returns the first row.
    row = await database.fetchrow(
        """
        INSERT INTO devices (project_id, user_id, platform, token, subscription) VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (project_id, user_id, platform, token) DO UPDATE SET subscription = EXCLUDED.subscription
        RETURNING id, platform, token, subscription, created_at
        """,
        project_var.get(),
        user_id,
        platform,
        token,
        db.Json(sub) if sub is not None else None,
    )
    assert row is not None
    return row
