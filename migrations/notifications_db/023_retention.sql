-- Row-wise retention (common/data/retention.py) of the tables that are not partitioned: each
-- batch finds its old finished rows through an index, not a scan of the whole table.
CREATE INDEX IF NOT EXISTS webhook_deliveries_final_idx ON webhook_deliveries (updated_at)
    WHERE status IN ('delivered', 'failed');
CREATE INDEX IF NOT EXISTS batches_updated_idx ON batches (updated_at);
CREATE INDEX IF NOT EXISTS workflow_fanouts_done_idx ON workflow_fanouts (done_at)
    WHERE done_at IS NOT NULL;
