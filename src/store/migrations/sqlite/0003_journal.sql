-- Each group commit becomes one journal row (see src/store/journal.rs): its replay ids
-- and its copy ops, encoded. A fold writes what is left of the ops into `messages`
-- and `copies`, moves the replay ids to `replay_log`, and deletes the rows.
CREATE TABLE journal (
    id         INTEGER PRIMARY KEY,
    expires_at INTEGER NOT NULL, -- the latest expiry among the replay ids (0: none)
    replay     BLOB,             -- packed like replay_log.entries
    ops        BLOB              -- encoded copy ops
);
