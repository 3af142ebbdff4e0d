-- A status store that can run for years: `notifications` and `notification_events` partitioned
-- by month of `created_at` (UTC), so retention drops whole partitions (common/retention.py)
-- instead of deleting rows one by one. docs/scaling.md ("The status store") explains the choices.
--
-- PostgreSQL wants the partition key in every unique constraint. The id stays unique (a uuid4 the
-- gateway chose; the primary key is (id, created_at)). Idempotency must stay exact across months,
-- so (client_id, request_id) moves to `notification_keys`, a narrow table of its own, not
-- partitioned: the gateway inserts the key and the notification in one statement.
--
-- Written for whatever migrations came before it: the columns, defaults, CHECKs and indexes of
-- the existing tables are carried over as they are, and the rows copied (in one transaction: on
-- a large store, run it in a quiet hour).

CREATE TABLE IF NOT EXISTS notification_keys (
    client_id       text NOT NULL,
    request_id      text NOT NULL,
    notification_id uuid NOT NULL,
    -- The notification's created_at: finds it in its partition, and goes with it at retention.
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (client_id, request_id)
);
CREATE INDEX IF NOT EXISTS notification_keys_created_idx ON notification_keys (created_at);

-- Monthly partitions [month, month + 1) of `parent`, UTC, named <parent>_pYYYY_MM, from the
-- month of `first` to the month of `last`; those that exist are left alone.
CREATE OR REPLACE FUNCTION notify_ensure_partitions(parent text, first timestamptz, last timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month timestamp := date_trunc('month', first AT TIME ZONE 'UTC');
    created integer := 0;
    name text;
BEGIN
    WHILE month <= date_trunc('month', last AT TIME ZONE 'UTC') LOOP
        name := format('%s_p%s', parent, to_char(month, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                name, parent, month AT TIME ZONE 'UTC', (month + interval '1 month') AT TIME ZONE 'UTC'
            );
            created := created + 1;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END $$;

-- Turns a plain table into a monthly-partitioned one with the same columns, defaults, CHECKs and
-- (non-unique) indexes, primary key (id, created_at), rows copied.
CREATE OR REPLACE FUNCTION notify_partition_table(parent text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    old text := parent || '_unpartitioned';
    indexes text[];
    statement text;
    oldest timestamptz;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(parent)) = 'p' THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(indexdef), '{}') INTO indexes FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename = parent AND indexdef NOT LIKE 'CREATE UNIQUE%';
    EXECUTE format('ALTER TABLE %I RENAME TO %I', parent, old);
    EXECUTE format(
        'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE'
        ' INCLUDING COMMENTS) PARTITION BY RANGE (created_at)', parent, old
    );
    EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (id, created_at)', parent);
    EXECUTE format('SELECT min(created_at) FROM %I', old) INTO oldest;
    PERFORM notify_ensure_partitions(parent, coalesce(oldest, now()), now() + interval '3 months');
    EXECUTE format('INSERT INTO %I SELECT * FROM %I', parent, old);
    -- A sequence (bigserial) belongs to its column: given to the new table before the old goes.
    FOR statement IN
        SELECT format('ALTER SEQUENCE %s OWNED BY %I.%I', s.seq, parent, s.col)
        FROM (SELECT pg_get_serial_sequence(old, attname) AS seq, attname AS col
              FROM pg_attribute WHERE attrelid = to_regclass(old) AND attnum > 0 AND NOT attisdropped) s
        WHERE s.seq IS NOT NULL
    LOOP
        EXECUTE statement;
    END LOOP;
    EXECUTE format('DROP TABLE %I CASCADE', old);
    -- The primary key was made while the old one still had its name.
    EXECUTE format('ALTER INDEX IF EXISTS %I RENAME TO %I', parent || '_pkey1', parent || '_pkey');
    FOREACH statement IN ARRAY indexes LOOP
        EXECUTE statement;
    END LOOP;
END $$;

INSERT INTO notification_keys (client_id, request_id, notification_id, created_at)
    SELECT client_id, request_id, id, created_at FROM notifications
    ON CONFLICT DO NOTHING;

-- Events refer to their notification by value (a foreign key would need the partition key too,
-- and would stop a partition from being dropped); the history is read by notification_id.
ALTER TABLE notification_events DROP CONSTRAINT IF EXISTS notification_events_notification_id_fkey;
SELECT notify_partition_table('notifications');
SELECT notify_partition_table('notification_events');
