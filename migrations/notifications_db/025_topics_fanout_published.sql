-- When a topic fan-out's message was last published (finding 5): a replay of the request
-- publishes it again only when none was (the broker refused), or when nothing has touched the
-- batch for longer than the redrive's stall threshold; otherwise the message in the queue, or
-- the fan-out in progress, is the one.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS fanout_published_at timestamptz;
