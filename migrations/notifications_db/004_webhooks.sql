-- Client status webhooks (issue 19). An endpoint belongs to the API key (client_id) that made it.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id                          uuid PRIMARY KEY,
    client_id                   text NOT NULL,
    url                         text NOT NULL,
    events                      text[] NOT NULL,
    description                 text,
    -- Kept as is: an HMAC is computed with the secret itself, so it cannot be stored hashed.
    secret                      text NOT NULL,
    -- After a rotation the old secret keeps signing alongside the new one until this time.
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    -- Since when every attempt failed (NULL after any success); disabled past WEBHOOK_DISABLE_AFTER.
    failing_since               timestamptz,
    disabled_at                 timestamptz,
    disabled_reason             text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_client_idx ON webhook_endpoints (client_id, created_at);

-- One row per event and endpoint: the outbox of webhooks.queue and the state of its delivery.
-- Written in the same statement as the notification's status change (common/store.py).
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id               uuid PRIMARY KEY,
    seq              bigserial NOT NULL UNIQUE,  -- the keyset cursor of the deliveries list
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    client_id        text NOT NULL,
    event_id         uuid NOT NULL,              -- the webhook-id, the same on every attempt
    event_type       text NOT NULL,
    -- By value, as elsewhere: notifications may be dropped by retention before their events.
    notification_id  uuid,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'sending', 'retrying', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    publish_pending  boolean NOT NULL DEFAULT true,
    claim_token      uuid,
    lease_until      timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, seq DESC);
CREATE INDEX IF NOT EXISTS webhook_deliveries_outbox_idx ON webhook_deliveries (created_at)
    WHERE publish_pending;
CREATE INDEX IF NOT EXISTS webhook_deliveries_unfinished_idx ON webhook_deliveries (updated_at)
    WHERE status IN ('pending', 'sending', 'retrying') AND NOT publish_pending;

-- Every attempt at a delivery: what the receiver answered and how long it took.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    status_code  integer,
    latency_ms   integer,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, id);
