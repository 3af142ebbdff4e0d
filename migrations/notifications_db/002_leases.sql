-- Claims are leases: a worker's claim carries a token, every status write after it is a
-- compare-and-set on that token, and the lease is extended while the delivery runs.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS claim_token uuid;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS lease_until timestamptz;
-- The reconciler looks for notifications not final that have not moved for a while.
CREATE INDEX IF NOT EXISTS notifications_unfinished_idx ON notifications (updated_at)
    WHERE status IN ('pending', 'retrying', 'sending') AND NOT publish_pending;
