"""Projects in the notifications database: rows made before projects existed moved to theirs.

Before projects, a client's rows carried its key's id (`client_id` = the first 16 hex digits of
the key's SHA-256). Now `client_id` holds the project, shared by all its keys. At start the
gateway hands `adopt` the ids of the keys it knows and their projects; each key's rows move to
its project once (the keys adopted are recorded, so later starts cost one query). A row whose
idempotency key the project already holds (two keys of one project that both used a request_id)
keeps its old owner: it stays readable in the database, never served to another project.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from common.data.db import Database

log = logging.getLogger(__name__)

_TABLE = """
CREATE TABLE IF NOT EXISTS project_adoptions (
    key_id     text PRIMARY KEY,
    project_id text NOT NULL,
    adopted_at timestamptz NOT NULL DEFAULT now()
)"""

# Each statement takes %(old)s (the key's id) and %(new)s (its project). Topics first make their
# new rows (subscribers reference them), then the rest move, then the old topics go.
_MOVES = (
    """INSERT INTO topics (client_id, key, name, created_at, updated_at)
       SELECT %(new)s, key, name, created_at, updated_at FROM topics WHERE client_id = %(old)s
       ON CONFLICT DO NOTHING""",
    """INSERT INTO topic_subscribers (client_id, topic_key, user_id, created_at)
       SELECT %(new)s, topic_key, user_id, created_at FROM topic_subscribers WHERE client_id = %(old)s
       ON CONFLICT DO NOTHING""",
    "DELETE FROM topics WHERE client_id = %(old)s",
    """UPDATE notification_keys AS k SET client_id = %(new)s WHERE k.client_id = %(old)s
       AND NOT EXISTS (SELECT 1 FROM notification_keys o
                       WHERE o.client_id = %(new)s AND o.request_id = k.request_id)""",
    """UPDATE notifications AS n SET client_id = %(new)s WHERE n.client_id = %(old)s
       AND EXISTS (SELECT 1 FROM notification_keys k
                   WHERE k.notification_id = n.id AND k.client_id = %(new)s)""",
    """UPDATE batches AS b SET client_id = %(new)s WHERE b.client_id = %(old)s
       AND NOT EXISTS (SELECT 1 FROM batches o
                       WHERE o.client_id = %(new)s AND o.request_id = b.request_id)""",
    "UPDATE webhook_endpoints SET client_id = %(new)s WHERE client_id = %(old)s",
    "UPDATE webhook_deliveries SET client_id = %(new)s WHERE client_id = %(old)s",
)


async def adopt(database: Database, owners: Mapping[str, str]) -> int:
    """Move every key's earlier rows to its project (`owners`: key id → project), once per key;
    returns how many keys were adopted now."""
    await database.execute(_TABLE)
    done = {r["key_id"] for r in await database.fetch("SELECT key_id FROM project_adoptions")}
    adopted = 0
    for key_id, project in owners.items():
        if key_id in done:
            continue
        async with database.transaction() as tx:
            for statement in _MOVES:
                await tx.execute(statement, {"old": key_id, "new": project})
            await tx.execute(
                "INSERT INTO project_adoptions (key_id, project_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                key_id,
                project,
            )
        adopted += 1
        log.info("rows made with key %s… moved to project %s", key_id[:6], project)
    return adopted
