-- Group commits now append to the op log, a file beside the database
-- (src/store/oplog.rs), instead of inserting `journal` rows; rows a previous version
-- left in `journal` are folded and deleted at the next start. A fold records here,
-- in its own transaction, the last op-log record it covered: records left in the file
-- by a crash between that commit and the file's truncation are then not applied twice.
CREATE TABLE oplog_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    folded_through INTEGER NOT NULL
);
INSERT INTO oplog_state (id, folded_through) VALUES (1, 0);
