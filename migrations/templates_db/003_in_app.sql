-- Templates of the in_app channel: title, body, link, image_url (the push columns) and data.
ALTER TABLE templates DROP CONSTRAINT IF EXISTS templates_notification_type_check;
ALTER TABLE templates ADD CONSTRAINT templates_notification_type_check
    CHECK (notification_type IN ('email', 'push', 'in_app'));
