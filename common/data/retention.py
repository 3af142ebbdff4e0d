"""The status store's upkeep: monthly partitions made ahead, and retention by dropping them.

`notifications` and `notification_events` are partitioned by month of `created_at` (UTC;
migrations/notifications_db/006_partitions.sql). Every service holding the status store runs
`upkeep` at start and then hourly; an advisory lock lets one do it at a time:

- partitions exist for this month and the next MONTHS_AHEAD, so an insert never finds none;
- a partition whose whole month is older than RETENTION_DAYS is dropped, with the idempotency
  keys of its notifications: a DROP, not millions of DELETEs, so neither the table nor its
  indexes bloat. A notifications partition that still holds a notification not final (one
  scheduled far ahead, say) is kept, and so are the events of that month, until it is; but its
  final notifications are deleted row-wise (with their keys and history), so that one scheduled
  notification cannot keep its month's neighbours past RETENTION_DAYS;
- the other tables with a time dimension are purged row-wise under the same RETENTION_DAYS:
  final webhook deliveries (their attempts with them), finished bulk and topic batches, finished
  workflow fan-outs, runs and digest windows, dead throttle places, and in-app inbox messages
  (their change log after INBOX_EVENTS_DAYS already); and webhook endpoints' previous secrets
  once their overlap after a rotation has expired.

After RETENTION_DAYS a notification is gone, and its request_id may be used again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiohttp import web

from common import background
from common.data.db import Database
from common.keys import CONFIG_KEY, DB_KEY
from common.vocabulary import FINAL_STATUSES

log = logging.getLogger(__name__)

PARENTS = ("notifications", "notification_events")
MONTHS_AHEAD = 3
INTERVAL = 3600.0
# One upkeep at a time across every process of the deployment.
LOCK = 72616005
# DDL on a partitioned table locks the parent: wait for it briefly, else try again next round,
# rather than queue behind a long query and hold up every insert meanwhile.
LOCK_TIMEOUT = "3s"
KEY_BATCH = 10_000
INBOX_EVENTS_DAYS = 7  # the inbox's change log (what a reconnecting stream replays) is kept this long

_BOUND = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


@dataclass
class Upkeep:
    created: int = 0
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # expired, but with notifications not final
    purged: int = 0  # rows deleted row-wise: finals of kept months, finished state past retention


async def partitions(database: Database, parent: str) -> list[tuple[str, datetime, datetime]]:
    """(name, from, to) of each partition of `parent`, oldest first."""
    rows = await database.fetch(
        "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        parent,
    )
    found = []
    for row in rows:
        match = _BOUND.search(row["bound"] or "")
        if match:
            found.append((row["name"], _timestamp(match.group(1)), _timestamp(match.group(2))))
    return sorted(found, key=lambda p: p[1])


def _timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def ensure_partitions(database: Database, now: datetime | None = None) -> int:
    """Partitions for this month and the next MONTHS_AHEAD; returns how many were created."""
    now = now or datetime.now(UTC)
    created = 0
    async with database.transaction() as tx:
        await tx.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        if not await tx.fetchval("SELECT pg_try_advisory_xact_lock(%s)", LOCK):
            return 0
        for parent in PARENTS:
            created += int(
                await tx.fetchval(
                    "SELECT notify_ensure_partitions(%s, %s, %s::timestamptz + make_interval(months => %s))",
                    parent,
                    now,
                    now,
                    MONTHS_AHEAD,
                )
            )
    return created


async def drop_expired(database: Database, retention_days: int, now: datetime | None = None) -> Upkeep:
    """Drop every partition whose month ended more than `retention_days` ago (see above)."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    result = Upkeep()
    kept_months: set[datetime] = set()
    for name, start, end in await partitions(database, "notifications"):
        if end > cutoff:
            continue
        unfinished = await database.fetchval(
            f'SELECT EXISTS (SELECT 1 FROM "{name}" WHERE status <> ALL(%s))', list(FINAL_STATUSES)
        )
        if unfinished:
            kept_months.add(start)
            result.kept.append(name)
            result.purged += await _thin(database, name)
            continue
        # Keys first, in batches (each short): a key must never outlive its notification's
        # partition by much, and a failure here leaves the partition for the next round.
        while await database.execute(
            "DELETE FROM notification_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM notification_keys"
            " WHERE created_at >= %s AND created_at < %s LIMIT %s))",
            start,
            end,
            KEY_BATCH,
        ):
            pass
        if await _drop(database, name):
            result.dropped.append(name)
    for name, start, end in await partitions(database, "notification_events"):
        if end <= cutoff and start not in kept_months and await _drop(database, name):
            result.dropped.append(name)
    return result


async def _thin(database: Database, name: str) -> int:
    """The final notifications of kept partition `name` deleted in short batches, each with its
    key and its history; how many."""
    thinned = 0
    statement = f"""
        WITH gone AS (
            DELETE FROM "{name}" WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM "{name}" WHERE status = ANY(%(final)s) LIMIT %(batch)s))
            RETURNING id, created_at
        ), keys AS (
            DELETE FROM notification_keys AS k USING gone
            WHERE k.created_at = gone.created_at AND k.notification_id = gone.id
        ), history AS (
            DELETE FROM notification_events AS e USING gone WHERE e.notification_id = gone.id
        )
        SELECT count(*) FROM gone
    """
    while count := int(
        await database.fetchval(statement, {"final": list(FINAL_STATUSES), "batch": KEY_BATCH})
    ):
        thinned += count
    return thinned


# State that is over: kept as long as the notifications it made, then deleted in short batches
# (row-wise: these tables are not partitioned). A throttle place counts for at most its window,
# 30 days at most, so an older one is dead whatever the retention. Subscriptions and endpoints
# are live configuration, not history: they go when deleted (or erased), not by age.
_FINISHED = (
    "DELETE FROM webhook_deliveries WHERE ctid = ANY(ARRAY(SELECT ctid FROM webhook_deliveries"
    " WHERE status IN ('delivered', 'failed') AND updated_at < %(cutoff)s LIMIT %(batch)s))",
    "DELETE FROM batches WHERE ctid = ANY(ARRAY(SELECT ctid FROM batches"
    " WHERE (kind = 'bulk' OR fanned_out_at IS NOT NULL) AND updated_at < %(cutoff)s LIMIT %(batch)s))",
    "DELETE FROM workflow_fanouts WHERE ctid = ANY(ARRAY(SELECT ctid FROM workflow_fanouts"
    " WHERE done_at < %(cutoff)s LIMIT %(batch)s))",
    "DELETE FROM workflow_digests WHERE ctid = ANY(ARRAY(SELECT ctid FROM workflow_digests"
    " WHERE status <> 'open' AND closed_at < %(cutoff)s LIMIT %(batch)s))",
    "DELETE FROM workflow_runs WHERE ctid = ANY(ARRAY(SELECT ctid FROM workflow_runs"
    " WHERE status NOT IN ('running', 'waiting') AND updated_at < %(cutoff)s LIMIT %(batch)s))",
    "DELETE FROM workflow_throttle_passes WHERE ctid = ANY(ARRAY(SELECT ctid FROM workflow_throttle_passes"
    " WHERE passed_at < %(now)s - interval '31 days' LIMIT %(batch)s))",
    # The in-app inbox: a message is kept as long as the notification that made it; the log of
    # changes its live streams replay from only INBOX_EVENTS_DAYS (a client away longer reloads).
    "DELETE FROM inbox_messages WHERE ctid = ANY(ARRAY(SELECT ctid FROM inbox_messages"
    " WHERE created_at < %(cutoff)s LIMIT %(batch)s))",
    "DELETE FROM inbox_events WHERE ctid = ANY(ARRAY(SELECT ctid FROM inbox_events"
    " WHERE created_at < %(events_cutoff)s LIMIT %(batch)s))",
    # Not history but a secret: an endpoint's previous one, once its overlap after a rotation
    # is over, is no longer used to sign and is not kept (its expiry is a timestamp, not a
    # retention).
    "UPDATE webhook_endpoints SET previous_secret = NULL, previous_secret_expires_at = NULL"
    " WHERE previous_secret IS NOT NULL AND previous_secret_expires_at <= %(now)s",
)


async def purge_finished(database: Database, retention_days: int, now: datetime | None = None) -> int:
    """The rows of `_FINISHED` older than the retention deleted; how many."""
    moment = now or datetime.now(UTC)
    values = {
        "cutoff": moment - timedelta(days=retention_days),
        "events_cutoff": moment - timedelta(days=min(retention_days, INBOX_EVENTS_DAYS)),
        "now": moment,
        "batch": KEY_BATCH,
    }
    purged = 0
    for statement in _FINISHED:
        while count := await database.execute(statement, values):
            purged += count
    return purged


async def _drop(database: Database, name: str) -> bool:
    async with database.transaction() as tx:
        await tx.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        if not await tx.fetchval("SELECT pg_try_advisory_xact_lock(%s)", LOCK):
            return False
        await tx.execute(f'DROP TABLE IF EXISTS "{name}"')
    return True


async def upkeep(database: Database, retention_days: int, now: datetime | None = None) -> Upkeep:
    created = await ensure_partitions(database, now)
    result = await drop_expired(database, retention_days, now)
    result.created = created
    result.purged += await purge_finished(database, retention_days, now)
    if result.created or result.dropped or result.kept or result.purged:
        log.info(
            "status store upkeep: %d partition(s) created, dropped %s, kept (not final yet) %s,"
            " %d row(s) past retention purged row-wise",
            result.created,
            result.dropped or "none",
            result.kept or "none",
            result.purged,
        )
    return result


async def run(database: Database, retention_days: int, stopping: asyncio.Event) -> None:
    """`upkeep` now and every INTERVAL until `stopping`; a failure is logged and tried again."""
    try:
        await upkeep(database, retention_days)
    except Exception as exc:  # noqa: BLE001 - the next round tries again
        log.warning("status store upkeep failed, trying again later: %s: %s", type(exc).__name__, exc)
    await background.rounds(
        stopping, INTERVAL, lambda: upkeep(database, retention_days), "status store upkeep"
    )


async def _keep_up(app: web.Application, stopping: asyncio.Event) -> None:
    await run(app[DB_KEY], app[CONFIG_KEY].retention_days, stopping)


# A cleanup context: the status store's upkeep (partitions ahead, retention) in the background,
# in every holder of the notifications database (the gateway and each worker); whichever gets
# to a round first does it, the others find nothing left to do.
keep_up = background.loop("store-upkeep", _keep_up)
