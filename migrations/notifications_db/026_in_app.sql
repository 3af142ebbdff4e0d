-- The third channel, in_app (delivered by storing the message in the user's inbox: 024_inbox.sql).
-- On the partitioned parent the CHECK is replaced on every partition with it.
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_notification_type_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_notification_type_check
    CHECK (notification_type IN ('email', 'push', 'in_app'));
