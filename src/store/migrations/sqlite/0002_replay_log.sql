-- Replay ids move from one row per id (random 16-byte keys: every insert dirtied a
-- random B-tree page) to one row per commit: an append-only log of packed entries,
-- read back only at start-up.
DROP TABLE replay_ids;

-- entries: repeated [u16be session length][session][16-byte id][u64be expires_at].
CREATE TABLE replay_log (
    id         INTEGER PRIMARY KEY,
    expires_at INTEGER NOT NULL, -- the latest expiry in the row
    entries    BLOB    NOT NULL
);
CREATE INDEX replay_log_by_expiry ON replay_log (expires_at);
