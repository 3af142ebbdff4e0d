CREATE TABLE IF NOT EXISTS users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL,
    email         text NOT NULL,
    password_hash text NOT NULL,
    preferences   jsonb NOT NULL DEFAULT '{"email": true, "push": true}',
    language      text NOT NULL DEFAULT 'en',
    timezone      text NOT NULL DEFAULT 'UTC',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- Addresses are unique without regard to case.
CREATE UNIQUE INDEX IF NOT EXISTS users_email_key ON users (lower(email));

CREATE TABLE IF NOT EXISTS devices (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform     text NOT NULL CHECK (platform IN ('fcm', 'onesignal', 'webpush')),
    -- fcm: registration token; onesignal: subscription id; webpush: the endpoint URL
    token        text NOT NULL,
    subscription jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, platform, token)
);
