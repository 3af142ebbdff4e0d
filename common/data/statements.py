"""The SQL of the status store (`store.py`), prepared once per connection where it is hot.

Recording a final status also queues the client's webhook deliveries, in the same statement
(`_webhook_deliveries`), so no event is lost whatever happens after the commit.
"""

from __future__ import annotations

from common.data.db import Statement
from common.vocabulary import FINAL_STATUSES, sql_list

# Every final status is heard about by webhook, as `notification.<status>`.
_WEBHOOK_STATUS_LIST = sql_list(FINAL_STATUSES)


def _webhook_deliveries(source: str) -> str:
    """CTEs (`ev`, `wd`) queueing one webhook delivery per endpoint of the notification's client
    subscribed to its event, for each row of the CTE `source` whose `event_type` is not NULL.
    One event id per event, shared by its endpoints: the `webhook-id` a receiver dedupes on."""
    return f"""
    ev AS MATERIALIZED (
        SELECT src.*, gen_random_uuid() AS event_id FROM {source} AS src
        WHERE src.event_type IS NOT NULL
    ), wd AS (
        INSERT INTO webhook_deliveries
            (id, endpoint_id, client_id, event_id, event_type, notification_id, payload)
        SELECT gen_random_uuid(), ep.id, ep.client_id, ev.event_id, ev.event_type, ev.id,
            jsonb_build_object(
                'type', ev.event_type,
                'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'data', jsonb_build_object(
                    'notification_id', ev.id, 'request_id', ev.request_id, 'user_id', ev.user_id,
                    'notification_type', ev.notification_type, 'status', ev.status,
                    'error', ev.error, 'provider', ev.provider, 'attempts', ev.attempts,
                    'workflow_run_id', ev.workflow_run_id, 'step', ev.step))
        FROM ev JOIN webhook_endpoints AS ep
          ON ep.client_id = ev.client_id AND ep.disabled_at IS NULL
             AND ev.event_type = ANY(ep.events)
    )"""


_PUBLIC_COLUMNS = (
    "id, request_id, user_id, notification_type, template_code, template_version, language, "
    "variables, metadata, priority, status, attempts, error, provider, correlation_id, "
    "publish_pending, created_at, updated_at, delivered_at, send_at, batch_id, workflow_run_id, step"
)


_NEW_COLUMNS = (
    "id, client_id, request_id, body_hash, user_id, notification_type, template_code, language, "
    "template_version, variables, metadata, priority, status, error, correlation_id, publish_pending, "
    "send_at, batch_id, recipient, workflow_run_id, step"
)


# Idempotency: the key goes in first, in the same statement; only a new key gets a notification.
# Keys live in notification_keys, not in the (partitioned) notifications table, whose unique
# constraints would have to include the partition key: migrations/notifications_db/006.
_NEW_KEYS = """
        INSERT INTO notification_keys (client_id, request_id, notification_id, created_at)
        SELECT client_id, request_id, id, now() FROM {source}
        ON CONFLICT (client_id, request_id) DO NOTHING
        RETURNING notification_id, created_at"""


_CREATE_MANY = f"""
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
            id uuid, client_id text, request_id text, body_hash text, user_id text,
            notification_type text, template_code text, language text, template_version integer,
            variables jsonb, metadata jsonb, priority smallint, status text, error text,
            correlation_id text, publish_pending boolean, send_at timestamptz, detail text,
            batch_id uuid, recipient jsonb, workflow_run_id uuid, step text)
    ), k AS ({_NEW_KEYS.format(source="r")}
    ), n AS (
        INSERT INTO notifications ({_NEW_COLUMNS}, created_at)
        SELECT {_NEW_COLUMNS}, k.created_at FROM r JOIN k ON k.notification_id = r.id
        RETURNING {_PUBLIC_COLUMNS}, client_id,
            CASE WHEN status IN ({_WEBHOOK_STATUS_LIST}) THEN 'notification.' || status END AS event_type
    ), e AS (
        INSERT INTO notification_events (notification_id, status, detail)
        SELECT n.id, n.status, coalesce(r.detail, n.error) FROM n JOIN r ON r.id = n.id
    ), {_webhook_deliveries("n")}
    SELECT {_PUBLIC_COLUMNS} FROM n
"""


CREATE_MANY = Statement("notify_create_many", _CREATE_MANY, [("rows", "jsonb")])


# Rows are locked in id order: two batches naming the same notifications cannot deadlock. The
# `id = ANY(ids)` beside each join on the input rows is there for the planner: it cannot tell how
# many rows a jsonb_to_recordset or an unnest holds (it guesses 10 or 100), and on a table whose
# statistics are stale (or a fresh one) it would rather hash-join a scan of every partition than
# look each id up; with the ids as an array it looks them up in the primary key, whatever the
# statistics say, which a plan prepared once must do.
_CLAIM_MANY = f"""
    WITH c AS (
        SELECT * FROM unnest(%(ids)s::uuid[], %(attempts)s::integer[], %(tokens)s::uuid[])
            AS c(id, attempt, token)
    ), old AS (
        SELECT t.id, t.status AS previous, t.claim_token AS previous_token, c.attempt, c.token
        FROM notifications AS t JOIN c ON c.id = t.id
        WHERE t.id = ANY(%(ids)s::uuid[])
        ORDER BY t.id FOR UPDATE OF t
    ), n AS (
        UPDATE notifications AS t
        SET status = 'sending', attempts = old.attempt, updated_at = now(),
            claim_token = old.token,
            lease_until = now() + make_interval(secs => %(lease)s)
        FROM old
        WHERE t.id = old.id AND t.id = ANY(%(ids)s::uuid[]) AND (
            old.previous IN ('pending', 'retrying')
            OR (old.previous = 'sending' AND coalesce(t.lease_until, t.updated_at) < now())
            OR (old.previous = 'sending' AND old.previous_token = old.token)
        )
        RETURNING {", ".join("t." + c.strip() for c in _PUBLIC_COLUMNS.split(","))}, t.claim_token,
            t.client_id, t.recipient,
            old.previous = 'sending' AND old.previous_token IS DISTINCT FROM old.token AS reclaimed,
            old.previous = 'sending' AND old.previous_token = old.token AS again
    ), e AS (
        INSERT INTO notification_events (notification_id, status, attempt, detail)
        SELECT id, 'sending', attempts,
               CASE WHEN reclaimed THEN 'taken over from a worker that did not finish' END
        FROM n WHERE NOT again
    )
    SELECT * FROM n
"""


CLAIM_MANY = Statement(
    "notify_claim_many",
    _CLAIM_MANY,
    [("ids", "uuid[]"), ("attempts", "integer[]"), ("tokens", "uuid[]"), ("lease", "float8")],
)


_RECORD_MANY = f"""
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
            i integer, notification_id uuid, status text, attempt integer, error text,
            provider text, device text, template_version integer, language text, claim uuid,
            detail text, webhook_event text)
    ), cur AS (
        SELECT t.id, t.status AS before, t.claim_token AS token
        FROM notifications AS t JOIN r ON r.notification_id = t.id
        WHERE t.id = ANY(%(ids)s::uuid[])
        ORDER BY t.id FOR UPDATE OF t
    ), n AS (
        UPDATE notifications AS t SET
            status = r.status,
            attempts = coalesce(r.attempt, t.attempts),
            error = CASE WHEN r.status = 'delivered' THEN NULL ELSE coalesce(r.error, t.error) END,
            provider = coalesce(r.provider, t.provider),
            template_version = coalesce(r.template_version, t.template_version),
            language = coalesce(r.language, t.language),
            delivered_at = CASE WHEN r.status = 'delivered' THEN now() ELSE t.delivered_at END,
            lease_until = NULL,
            updated_at = now()
        FROM cur JOIN r ON r.notification_id = cur.id
        WHERE t.id = cur.id AND t.id = ANY(%(ids)s::uuid[])
          AND (r.claim IS NULL OR (t.claim_token = r.claim AND t.status = 'sending'))
        RETURNING t.id, t.attempts, t.client_id, t.request_id, t.user_id, t.notification_type,
            t.status, t.error, t.provider, t.workflow_run_id, t.step, r.provider AS event_provider, r.device,
            coalesce(r.detail, r.error) AS event_detail,
            CASE WHEN t.status IN ({_WEBHOOK_STATUS_LIST})
                  AND (cur.before <> t.status OR r.webhook_event IS NOT NULL)
                 THEN coalesce(r.webhook_event, 'notification.' || t.status) END
                AS event_type
    ), e AS (
        INSERT INTO notification_events (notification_id, status, attempt, provider, device, detail)
        SELECT id, status, attempts, event_provider, device, event_detail FROM n
    ), {_webhook_deliveries("n")}
    SELECT r.i, EXISTS (SELECT 1 FROM n WHERE n.id = r.notification_id)
        OR EXISTS (SELECT 1 FROM cur WHERE cur.id = r.notification_id
                   AND cur.token = r.claim AND cur.before = r.status) AS done
    FROM r
"""


RECORD_MANY = Statement("notify_record_many", _RECORD_MANY, [("rows", "jsonb"), ("ids", "uuid[]")])


# Every statement that changes many notifications locks them in id order first, as the claim
# and the record do: a publish mark of 500 and a worker's batch of claims meeting on the same
# rows in two orders would deadlock, and the loser's rows be published again by the relay.
MARK_PUBLISHED = Statement(
    "notify_mark_published",
    """
    WITH locked AS (
        SELECT id FROM notifications WHERE id = ANY(%(ids)s::uuid[]) AND publish_pending
        ORDER BY id FOR UPDATE
    )
    UPDATE notifications AS n SET publish_pending = false FROM locked
    WHERE n.id = locked.id AND n.id = ANY(%(ids)s::uuid[])
    """,
    [("ids", "uuid[]")],
)


EXTEND = Statement(
    "notify_extend",
    """
    WITH locked AS (
        SELECT n.id FROM notifications AS n
        JOIN unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) AS c(id, token) ON n.id = c.id
        WHERE n.id = ANY(%(ids)s::uuid[]) AND n.claim_token = c.token AND n.status = 'sending'
        ORDER BY n.id FOR UPDATE OF n
    )
    UPDATE notifications AS n SET lease_until = now() + make_interval(secs => %(lease)s)
    FROM locked WHERE n.id = locked.id AND n.id = ANY(%(ids)s::uuid[])
    """,
    [("lease", "float8"), ("ids", "uuid[]"), ("tokens", "uuid[]")],
)


EVENTS = Statement(
    "notify_events",
    "INSERT INTO notification_events (notification_id, status, attempt, provider, device, detail)"
    " SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS e(notification_id uuid, status text,"
    " attempt integer, provider text, device text, detail text)",
    [("rows", "jsonb")],
)
