-- Projects and the client's own user ids (issue 25).
--
-- `client_id` now holds the project a resource belongs to (every key of a project shares it);
-- rows made before, under a key's id, are moved to that key's project by the gateway at start
-- (`common/data/projects.py`), which knows the keys; here only the shapes change.
--
-- A user's id is the client's: a string, not a UUID (existing UUIDs stay valid ids, as text).
ALTER TABLE notifications ALTER COLUMN user_id TYPE text USING user_id::text;
ALTER TABLE topic_subscribers ALTER COLUMN user_id TYPE text USING user_id::text;
ALTER TABLE batches ALTER COLUMN fanout_cursor TYPE text USING fanout_cursor::text;

-- Who a notification is for, as the template sees it (`recipient`: id, name, email, phone,
-- language, timezone, data), pinned at acceptance like the template version; NULL for rows
-- accepted before (the worker then reads the profile), and after an erasure.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS recipient jsonb;

-- Keys a project's admin creates and revokes (`python -m scripts.keys`), stored hashed; the keys
-- of GATEWAY_API_KEYS work beside them.
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    text PRIMARY KEY,          -- SHA-256 of the key, never the key
    project_id  text NOT NULL,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS api_keys_project_idx ON api_keys (project_id, created_at);
