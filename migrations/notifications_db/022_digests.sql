-- Digest and throttle steps (issue 28): their state is rows here, so that one statement under
-- one lock decides who opens a window and who joins it, and a crash loses nothing.

ALTER TABLE workflow_runs ADD COLUMN IF NOT EXISTS merged_into uuid;

-- A digest window: opened by the first run that reaches the step for (workflow, user, step,
-- key), carried on by that run (`carrier`) when it closes. At most one open window per key (the
-- partial unique index backs the advisory lock the store takes).
CREATE TABLE IF NOT EXISTS workflow_digests (
    id           uuid PRIMARY KEY,
    project_id   text NOT NULL,
    workflow_key text NOT NULL,
    user_id      text NOT NULL,
    step         text NOT NULL,
    digest_key   text NOT NULL,
    carrier      uuid NOT NULL,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed', 'cancelled')),
    opened_at    timestamptz NOT NULL DEFAULT now(),
    closes_at    timestamptz NOT NULL,
    closed_at    timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS workflow_digests_open_idx
    ON workflow_digests (project_id, workflow_key, user_id, step, digest_key) WHERE status = 'open';
-- Lookback asks when the last window of a key closed.
CREATE INDEX IF NOT EXISTS workflow_digests_closed_idx
    ON workflow_digests (project_id, workflow_key, user_id, step, digest_key, closed_at)
    WHERE status = 'closed';
CREATE INDEX IF NOT EXISTS workflow_digests_carrier_idx ON workflow_digests (carrier);

-- Each event a window holds, the carrier's own among them: one row per run and step, so a run
-- that repeats its step (its engine died) finds where it went instead of counting twice. A
-- window's count is the number of its rows, its events their payloads, oldest first.
CREATE TABLE IF NOT EXISTS workflow_digest_events (
    run_id     uuid NOT NULL,
    step       text NOT NULL,
    digest_id  uuid NOT NULL REFERENCES workflow_digests (id) ON DELETE CASCADE,
    seq        bigserial,
    payload    jsonb NOT NULL,
    -- When the event happened (its run was triggered): events are listed oldest first by it,
    -- whatever order the engines took the runs in.
    occurred_at timestamptz NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step)
);
CREATE INDEX IF NOT EXISTS workflow_digest_events_digest_idx ON workflow_digest_events (digest_id, occurred_at, seq);

-- The runs a throttle step let through, per key: at most `limit` within any `window`. One row per
-- run and step, so a repeated step passes again instead of taking a second place.
CREATE TABLE IF NOT EXISTS workflow_throttle_passes (
    run_id       uuid NOT NULL,
    step         text NOT NULL,
    project_id   text NOT NULL,
    workflow_key text NOT NULL,
    user_id      text NOT NULL,
    throttle_key text NOT NULL,
    passed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step)
);
CREATE INDEX IF NOT EXISTS workflow_throttle_passes_key_idx
    ON workflow_throttle_passes (project_id, workflow_key, user_id, step, throttle_key, passed_at);
