-- The console finds a notification by its request_id alone (idempotency keys are unique per
-- client, (client_id, request_id); an operator searching does not know the client).
CREATE INDEX IF NOT EXISTS notifications_request_idx ON notifications (request_id);
-- A notification's page lists the status webhooks sent about it.
CREATE INDEX IF NOT EXISTS webhook_deliveries_notification_idx ON webhook_deliveries (notification_id);
