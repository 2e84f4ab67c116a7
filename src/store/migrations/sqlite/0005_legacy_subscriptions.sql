-- A durable subscription made by a legacy (JSON WebSocket) connection: its client
-- reads only LEGACY_JSON, so after a restart nothing else is queued for it either.
ALTER TABLE subscriptions ADD COLUMN legacy_only INTEGER NOT NULL DEFAULT 0;
