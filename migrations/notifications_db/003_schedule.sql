-- Send later: `scheduled` notifications wait for `send_at` (UTC); `cancelled` is final.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS send_at timestamptz;
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_status_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_status_check CHECK (status IN
    ('scheduled', 'pending', 'sending', 'retrying', 'delivered', 'failed', 'skipped', 'cancelled'));
-- The dispatcher's one query: the due ones, soonest first (and the reconciler's, for overdue).
CREATE INDEX IF NOT EXISTS notifications_scheduled_idx ON notifications (send_at)
    WHERE status = 'scheduled';
