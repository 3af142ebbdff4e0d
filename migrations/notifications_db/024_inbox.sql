-- The in-app inbox (channel `in_app`): one row per message a user sees in the product, and the
-- log of what happened to a user's inbox, whose `seq` is the Server-Sent Events id (replay after
-- a reconnect reads it, in order). common/features/inbox/store.py holds the SQL.

CREATE TABLE IF NOT EXISTS inbox_messages (
    id              uuid PRIMARY KEY,
    -- Keyset paging, newest first.
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    project_id      text NOT NULL,
    user_id         text NOT NULL,  -- the client's own id for the user (as notifications.user_id)
    -- Delivery is idempotent by the notification: a redelivered message finds its row.
    notification_id uuid NOT NULL UNIQUE,
    workflow_key    text,
    title           text NOT NULL,
    body            text NOT NULL,
    link            text,
    image_url       text,
    data            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    seen_at         timestamptz,
    read_at         timestamptz,
    archived_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inbox_messages_user_idx ON inbox_messages (project_id, user_id, seq DESC);
-- Counts, the unread list and read-all / seen-all find only what they change.
CREATE INDEX IF NOT EXISTS inbox_messages_unread_idx ON inbox_messages (project_id, user_id, seq DESC)
    WHERE read_at IS NULL;
CREATE INDEX IF NOT EXISTS inbox_messages_unseen_idx ON inbox_messages (project_id, user_id)
    WHERE seen_at IS NULL;
-- Retention (common/data/retention.py) deletes by age.
CREATE INDEX IF NOT EXISTS inbox_messages_created_idx ON inbox_messages (created_at);

-- Every change of a user's inbox, written in the transaction that makes it. `action` says which
-- (delivered, read, unread, seen, archived, unarchived, read_all, seen_all); `message_id` is
-- NULL for read_all and seen_all.
CREATE TABLE IF NOT EXISTS inbox_events (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id text NOT NULL,
    user_id    text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('message', 'message.updated')),
    action     text NOT NULL,
    message_id uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inbox_events_user_idx ON inbox_events (project_id, user_id, seq);
CREATE INDEX IF NOT EXISTS inbox_events_created_idx ON inbox_events (created_at);
