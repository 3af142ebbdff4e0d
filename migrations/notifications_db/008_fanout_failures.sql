-- A fan-out that fails for a reason other than the infrastructure's (a bug, a batch it cannot
-- read) is tried a bounded number of times, then the batch is failed with the reason (issue 18).
ALTER TABLE batches ADD COLUMN IF NOT EXISTS fanout_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS fanout_error text;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS failed_at timestamptz;
