-- One request, many recipients: bulk sends and topic fan-outs (issue 18).

-- A batch: one bulk request or one notification to a topic. Its (client_id, request_id) is the
-- idempotency key of the request; its notifications carry its id.
CREATE TABLE IF NOT EXISTS batches (
    id                uuid PRIMARY KEY,
    client_id         text NOT NULL,
    request_id        text NOT NULL,
    body_hash         text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('bulk', 'topic')),
    topic_key         text,
    -- What every recipient gets (topic fan-out): type, template and pinned version, variables...
    payload           jsonb NOT NULL DEFAULT '{}',
    total             integer NOT NULL DEFAULT 0,
    rejected          integer NOT NULL DEFAULT 0,
    -- The bulk answer, once it is known: a replay answers it again.
    result            jsonb,
    -- Fan-out progress: the last subscriber (user_id) done; a redelivered fan-out resumes here.
    fanout_cursor     uuid,
    fanned_out_at     timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (client_id, request_id)
);
CREATE INDEX IF NOT EXISTS batches_fanout_idx ON batches (updated_at)
    WHERE kind = 'topic' AND fanned_out_at IS NULL;

ALTER TABLE notifications ADD COLUMN IF NOT EXISTS batch_id uuid;
CREATE INDEX IF NOT EXISTS notifications_batch_idx ON notifications (batch_id, status)
    WHERE batch_id IS NOT NULL;

-- Topics, owned by the client (API key id) that created them.
CREATE TABLE IF NOT EXISTS topics (
    client_id   text NOT NULL,
    key         text NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, key)
);

-- Walked by user_id (keyset) in pages by the fan-out.
CREATE TABLE IF NOT EXISTS topic_subscribers (
    client_id   text NOT NULL,
    topic_key   text NOT NULL,
    user_id     uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, topic_key, user_id),
    FOREIGN KEY (client_id, topic_key) REFERENCES topics (client_id, key) ON DELETE CASCADE
);
