-- Workflows (issue 27): definitions as immutable versions, runs whose timers live here, and the
-- link from a notification back to the run and step that made it. Numbered 020 to leave room for
-- the projects migrations before it.

CREATE TABLE IF NOT EXISTS workflows (
    project_id      text NOT NULL,
    key             text NOT NULL,
    -- The version new runs take; a PUT makes a new one current, activate picks an older one.
    current_version integer NOT NULL,
    latest_version  integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, key)
);

CREATE TABLE IF NOT EXISTS workflow_versions (
    project_id  text NOT NULL,
    key         text NOT NULL,
    version     integer NOT NULL,
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, key, version),
    FOREIGN KEY (project_id, key) REFERENCES workflows (project_id, key) ON DELETE CASCADE
);

-- A run: one trigger for one recipient. `due_at` is when an engine should look at it next; an
-- engine that takes it pushes `due_at` a lease ahead, so a run whose engine died is due again.
-- `revision` is the compare-and-set every write of an engine or a cancel goes through.
CREATE TABLE IF NOT EXISTS workflow_runs (
    id               uuid PRIMARY KEY,
    project_id       text NOT NULL,
    workflow_key     text NOT NULL,
    version          integer NOT NULL,
    user_id          text NOT NULL,
    request_id       text NOT NULL,
    body_hash        text NOT NULL,
    cancellation_key text,
    batch_id         uuid,
    status           text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'waiting', 'completed', 'cancelled', 'failed', 'merged', 'throttled')),
    step_index       integer NOT NULL DEFAULT 0,
    revision         integer NOT NULL DEFAULT 0,
    due_at           timestamptz,
    -- The notification the current channel step waits for (the wake-up trigger below looks here).
    waiting_on       uuid,
    payload          jsonb NOT NULL DEFAULT '{}',
    recipient        jsonb NOT NULL DEFAULT '{}',
    steps            jsonb NOT NULL DEFAULT '[]',
    reason           text,
    correlation_id   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, workflow_key, request_id, user_id)
);
CREATE INDEX IF NOT EXISTS workflow_runs_due_idx ON workflow_runs (due_at)
    WHERE status IN ('running', 'waiting');
CREATE INDEX IF NOT EXISTS workflow_runs_waiting_idx ON workflow_runs (waiting_on)
    WHERE waiting_on IS NOT NULL;
CREATE INDEX IF NOT EXISTS workflow_runs_cancel_idx ON workflow_runs (project_id, workflow_key, cancellation_key)
    WHERE cancellation_key IS NOT NULL AND status IN ('running', 'waiting');
CREATE INDEX IF NOT EXISTS workflow_runs_list_idx ON workflow_runs (project_id, created_at DESC, id DESC);

ALTER TABLE notifications ADD COLUMN IF NOT EXISTS workflow_run_id uuid;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS step text;

-- When a run's notification becomes final, its run is due at once: a channel step waits for its
-- notification without any engine polling it. The trigger fires only for notifications a run
-- made. A wake-up that races the engine's own write (the engine read the status just before it
-- changed) is covered by the engine's re-check a little later (`engine.RECHECK`).
CREATE OR REPLACE FUNCTION notify_wake_workflow_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflow_runs SET due_at = now()
    WHERE id = NEW.workflow_run_id AND waiting_on = NEW.id AND status IN ('running', 'waiting');
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS notifications_wake_workflow_run ON notifications;
CREATE TRIGGER notifications_wake_workflow_run
    AFTER UPDATE OF status ON notifications
    FOR EACH ROW
    WHEN (NEW.workflow_run_id IS NOT NULL
          AND NEW.status IN ('delivered', 'failed', 'skipped', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notify_wake_workflow_run();
