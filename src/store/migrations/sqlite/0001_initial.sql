-- fastPort schema, SQLite. Times are milliseconds since the Unix epoch.

-- Tenants. The password is an argon2id PHC string; nothing else secret is stored.
CREATE TABLE sessions (
    name              TEXT PRIMARY KEY NOT NULL,
    password_hash     TEXT    NOT NULL,
    retry_interval_ms INTEGER NOT NULL,
    max_retries       INTEGER NOT NULL,
    message_expiry_ms INTEGER NOT NULL,
    max_payload_bytes INTEGER NOT NULL,
    history_size      INTEGER NOT NULL DEFAULT 0,
    suspended         INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL
);

-- Message bodies that some queued copy still needs. `seq` is the broker's accept order.
CREATE TABLE messages (
    seq          INTEGER PRIMARY KEY NOT NULL,
    session      TEXT    NOT NULL,
    message_id   BLOB    NOT NULL,
    topic        TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    format       INTEGER NOT NULL,
    accepted_at  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX messages_by_expiry ON messages (expires_at);

-- One row per (subscriber, message) not yet acknowledged. Ephemeral rows belong to a
-- connection that was too slow to hold them in memory; they die with it.
CREATE TABLE copies (
    session   TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session, client_id, seq)
) WITHOUT ROWID;
CREATE INDEX copies_by_seq ON copies (seq);

-- Durable subscriptions, keyed by client id.
CREATE TABLE subscriptions (
    session   TEXT NOT NULL,
    client_id TEXT NOT NULL,
    filter    TEXT NOT NULL,
    PRIMARY KEY (session, client_id, filter)
) WITHOUT ROWID;

-- Accepted message ids, kept until their replay window ends.
CREATE TABLE replay_ids (
    session    TEXT    NOT NULL,
    message_id BLOB    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (session, message_id)
) WITHOUT ROWID;
CREATE INDEX replay_ids_by_expiry ON replay_ids (expires_at);

-- Devices registered for push notifications.
CREATE TABLE push_tokens (
    session    TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    device_id  TEXT    NOT NULL,
    token      TEXT    NOT NULL,
    platform   TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (session, user_id, device_id)
) WITHOUT ROWID;
