CREATE TABLE IF NOT EXISTS notifications (
    id                uuid PRIMARY KEY,
    -- Idempotency keys are scoped per client (API key id): the unique constraint is the lock.
    client_id         text NOT NULL,
    request_id        text NOT NULL,
    body_hash         text NOT NULL,
    user_id           uuid NOT NULL,
    notification_type text NOT NULL CHECK (notification_type IN ('email', 'push')),
    template_code     text NOT NULL,
    template_version  integer,
    language          text,
    variables         jsonb NOT NULL DEFAULT '{}',
    metadata          jsonb NOT NULL DEFAULT '{}',
    priority          smallint NOT NULL DEFAULT 0,
    status            text NOT NULL CHECK (status IN
                        ('pending', 'sending', 'retrying', 'delivered', 'failed', 'skipped')),
    attempts          integer NOT NULL DEFAULT 0,
    error             text,
    provider          text,
    correlation_id    text NOT NULL,
    -- Outbox: true until the broker confirmed the message; the relay publishes what is left.
    publish_pending   boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    UNIQUE (client_id, request_id)
);
CREATE INDEX IF NOT EXISTS notifications_user_idx ON notifications (user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS notifications_status_idx ON notifications (status, created_at DESC);
CREATE INDEX IF NOT EXISTS notifications_created_idx ON notifications (created_at DESC);
CREATE INDEX IF NOT EXISTS notifications_outbox_idx ON notifications (created_at)
    WHERE publish_pending;

-- One row per state change, attempt or device result: the notification's history.
CREATE TABLE IF NOT EXISTS notification_events (
    id              bigserial PRIMARY KEY,
    notification_id uuid NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    status          text NOT NULL,
    attempt         integer NOT NULL DEFAULT 0,
    provider        text,
    device          text,
    detail          text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notification_events_idx ON notification_events (notification_id, id);
