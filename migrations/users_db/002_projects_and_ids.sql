-- Users belong to a project, under the client's own id (issue 25). Every existing user and
-- device is project `default`'s, its UUID kept as its id.
ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_user_id_fkey;
ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_user_id_platform_token_key;

ALTER TABLE users ALTER COLUMN id DROP DEFAULT;
ALTER TABLE users ALTER COLUMN id TYPE text USING id::text;
-- A row written without an id (by hand, say) still gets one, as before.
ALTER TABLE users ALTER COLUMN id SET DEFAULT gen_random_uuid()::text;
ALTER TABLE devices ALTER COLUMN user_id TYPE text USING user_id::text;

ALTER TABLE users ADD COLUMN IF NOT EXISTS project_id text NOT NULL DEFAULT 'default';
ALTER TABLE devices ADD COLUMN IF NOT EXISTS project_id text NOT NULL DEFAULT 'default';
ALTER TABLE users DROP CONSTRAINT users_pkey, ADD PRIMARY KEY (project_id, id);
ALTER TABLE devices
    ADD FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE,
    ADD UNIQUE (project_id, user_id, platform, token);

-- Identify needs nothing but the id; a password only for those who log in themselves.
ALTER TABLE users ALTER COLUMN name DROP NOT NULL;
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE users ALTER COLUMN password_hash DROP NOT NULL;
ALTER TABLE users ADD COLUMN IF NOT EXISTS phone text;
ALTER TABLE users ADD COLUMN IF NOT EXISTS data jsonb NOT NULL DEFAULT '{}';

-- Email is not the identity: several users may share an address.
DROP INDEX IF EXISTS users_email_key;
CREATE INDEX IF NOT EXISTS users_email_idx ON users (project_id, lower(email));
