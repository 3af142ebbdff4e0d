-- A workflow triggered for a topic (issue 27): one row per trigger, walked by the engine's
-- fan-out page by page (subscribers as of `created_at`, by user_id after `cursor`), each page's
-- runs made idempotently (the runs' unique key), so a fan-out whose gateway died resumes from its
-- cursor with nothing twice. `due_at` is its lease, as for runs.
CREATE TABLE IF NOT EXISTS workflow_fanouts (
    id               uuid PRIMARY KEY,
    project_id       text NOT NULL,
    workflow_key     text NOT NULL,
    version          integer NOT NULL,
    topic_key        text NOT NULL,
    request_id       text NOT NULL,
    body_hash        text NOT NULL,
    cancellation_key text,
    payload          jsonb NOT NULL DEFAULT '{}',
    correlation_id   text,
    cursor           text,
    runs             integer NOT NULL DEFAULT 0,
    rejected         integer NOT NULL DEFAULT 0,
    due_at           timestamptz DEFAULT now(),
    done_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, workflow_key, request_id)
);
CREATE INDEX IF NOT EXISTS workflow_fanouts_due_idx ON workflow_fanouts (due_at) WHERE done_at IS NULL;
