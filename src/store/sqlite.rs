//! The embedded default store: one SQLite file in WAL mode with `synchronous=NORMAL`,
//! so a committed batch survives the broker being killed (not the machine losing
//! power: the same class as JetStream's default), and commits cost no fsync each.
//!
//! A group commit is one record appended to the op log, a file beside the database
//! ([`super::oplog`], [`super::journal`]); the copies it carries reach the `messages`
//! and `copies` tables at the next fold, and only if they are still queued then.
//! Backlog reads merge the tables with the journal; restore and purge fold first.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, Transaction};

use crate::core::{
    BacklogRequest, ClientId, Message, MessageId, Millis, Restore, RestoredFile,
    RestoredSubscription, SessionName, SessionSettings, StoreBatch, StoreOp, StoredCopy,
    TopicFilter, TopicName,
};

use super::journal::{self, Entry, Journal};
use super::oplog::{OpLog, Record};
use super::plan::{Net, Step, SubscriberNet, plan};
use super::{BacklogPage, Committed, Purged, PushToken, SessionRecord, Store, StoreError};

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("src/store/migrations/sqlite");

/// Rows per multi-row statement (9 columns × 100 stays far below SQLite's 32766
/// variables).
const ROWS_PER_STATEMENT: usize = 300;
/// Unwanted topics an unsubscribe's discard deletes by (two statements); with more,
/// it picks the rows one by one.
const TOPICS_PER_DISCARD: usize = 64;

/// How often the WAL is checkpointed into the database file. Group commits go to the
/// op log, so the WAL only carries folds, purges and barrier commits (sessions, keys,
/// subscriptions, discards) and most checkpoints find nothing to copy; a second keeps
/// the WAL to what one fold wrote, and the sync of the file off the fold itself.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Rows of each kind per purge step at start-up, where no commit waits for it.
const RESTORE_PURGE_STEP: usize = 100_000;

/// A SQLite-backed [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    /// For reads from the HTTP API and authentication.
    pool: SqlitePool,
    /// For everything the driver's store worker asks: commits, backlogs, purges. The
    /// worker makes one call at a time, so the lock is never contended; it is held
    /// across the statements so that a fold and a commit never interleave.
    writer: tokio::sync::Mutex<Writer>,
    /// The last push token's `updated_at`: each registration gets a later one, even in
    /// the same millisecond, so "registered longest ago" has one answer.
    last_push_update: std::sync::atomic::AtomicI64,
}

/// One connection for all writes, so its page cache stays warm (SQLite empties a
/// connection's cache whenever another connection has written), the op log, and what
/// its records since the last fold add up to.
#[derive(Debug)]
struct Writer {
    conn: SqliteConnection,
    oplog: OpLog,
    journal: Journal,
    /// Sequence number of the next op-log record.
    next_seq: u64,
    /// Rows are left in the `journal` table by a version that journalled there; the
    /// next fold deletes them.
    legacy_rows: bool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            // Keep the working set (recent messages, copies, indexes) in memory: 64 MiB
            // of page cache and memory-mapped reads instead of a read() per page.
            .pragma("cache_size", "-65536")
            .pragma("mmap_size", "268435456")
            // Commits never copy the WAL back into the file themselves: that costs an
            // fsync or two, and it would stall whichever commit crossed the threshold.
            // `checkpoints` does it on a connection of its own.
            .pragma("wal_autocheckpoint", "0");
        let oplog = OpLog::open(&oplog_path(path))?;
        let store = Self::connect(options, oplog).await?;
        tokio::spawn(checkpoints(store.pool.clone()));
        Ok(store)
    }

    /// An in-memory SQLite database, for tests. (sqlx shares one in-memory database
    /// between the pool's connections: one writes, the other reads.)
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Self::start(pool, (OpLog::detached(), Vec::new())).await
    }

    async fn connect(
        options: SqliteConnectOptions,
        oplog: (OpLog, Vec<Record>),
    ) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A ping per acquire would be one more round trip to SQLite's thread per
            // statement; a broken file shows up as a failed statement anyway.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Self::start(pool, oplog).await
    }

    /// Brings the schema up to date and folds what a predecessor left in the op log
    /// (it stopped, or was killed, between two folds).
    async fn start(
        pool: SqlitePool,
        (oplog, records): (OpLog, Vec<Record>),
    ) -> Result<Self, StoreError> {
        MIGRATOR.run(&pool).await?;
        // Detached: the writer outlives no pool, and dropping it needs no runtime.
        let mut conn = pool.acquire().await?.detach();
        let folded_through: i64 =
            sqlx::query_scalar("SELECT folded_through FROM oplog_state WHERE id = 1")
                .fetch_one(&mut conn)
                .await?;
        let folded_through = folded_through as u64;
        let mut journal = Journal::default();
        // Rows of the journal table, from before the op log: older than any record.
        let rows = sqlx::query("SELECT expires_at, replay, ops FROM journal ORDER BY id")
            .fetch_all(&mut conn)
            .await?;
        let legacy_rows = !rows.is_empty();
        for row in rows {
            let ops = match row.try_get::<Option<Vec<u8>>, _>("ops")? {
                Some(bytes) => journal::decode_ops(&bytes)?,
                None => Vec::new(),
            };
            let expires_at = row.try_get::<i64, _>("expires_at")? as Millis;
            let replay = row
                .try_get::<Option<Vec<u8>>, _>("replay")?
                .map(|ids| (ids, expires_at));
            journal.record(folded_through, &ops, replay, 0);
        }
        let mut next_seq = folded_through + 1;
        // Records up to `folded_through` were folded by a fold whose truncation of the
        // file did not happen (a crash in between): applying them again could bring
        // back copies acknowledged since.
        for record in records.into_iter().filter(|r| r.seq > folded_through) {
            let ops = journal::decode_ops(&record.ops)?;
            let replay = (!record.replay.is_empty()).then_some((record.replay, record.expires_at));
            journal.record(record.seq, &ops, replay, 0);
            next_seq = next_seq.max(record.seq + 1);
        }
        let mut writer = Writer {
            conn,
            oplog,
            journal,
            next_seq,
            legacy_rows,
        };
        writer.fold().await?;
        // Registrations go on from the last one, even if the clock went back since.
        let last_push_update: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(updated_at), 0) FROM push_tokens")
                .fetch_one(&pool)
                .await?;
        Ok(Self {
            pool,
            writer: tokio::sync::Mutex::new(writer),
            last_push_update: std::sync::atomic::AtomicI64::new(last_push_update),
        })
    }

    /// Applies a barrier op (see [`plan`]), noting the file copies it drops.
    async fn apply(
        tx: &mut Transaction<'_, Sqlite>,
        op: &StoreOp,
        dropped_files: &mut Vec<u64>,
    ) -> Result<(), sqlx::Error> {
        match op {
            StoreOp::PutSubscription {
                session,
                client_id,
                filter,
                legacy_only,
            } => {
                sqlx::query(
                    "INSERT INTO subscriptions (session, client_id, filter, legacy_only) \
                     VALUES (?, ?, ?, ?) \
                     ON CONFLICT DO UPDATE SET legacy_only = excluded.legacy_only",
                )
                .bind(session.as_str())
                .bind(client_id.as_str())
                .bind(filter.as_str())
                .bind(legacy_only)
                .execute(&mut **tx)
                .await?;
            }
            StoreOp::SetLegacyOnly {
                session,
                client_id,
                legacy_only,
            } => {
                sqlx::query(
                    "UPDATE subscriptions SET legacy_only = ? WHERE session = ? AND client_id = ?",
                )
                .bind(legacy_only)
                .bind(session.as_str())
                .bind(client_id.as_str())
                .execute(&mut **tx)
                .await?;
            }
            StoreOp::DeleteSubscription {
                session,
                client_id,
                filter,
            } => {
                sqlx::query(
                    "DELETE FROM subscriptions WHERE session = ? AND client_id = ? AND filter = ?",
                )
                .bind(session.as_str())
                .bind(client_id.as_str())
                .bind(filter.as_str())
                .execute(&mut **tx)
                .await?;
            }
            StoreOp::DeleteClient { session, client_id } => {
                sqlx::query("DELETE FROM subscriptions WHERE session = ? AND client_id = ?")
                    .bind(session.as_str())
                    .bind(client_id.as_str())
                    .execute(&mut **tx)
                    .await?;
                Self::drop_copies(tx, session, client_id, false, dropped_files).await?;
            }
            StoreOp::DeleteEphemeral { session, client_id } => {
                Self::drop_copies(tx, session, client_id, true, dropped_files).await?;
            }
            StoreOp::DiscardCopies {
                session,
                client_id,
                keep,
            } => Self::discard_copies(tx, session, client_id, keep, dropped_files).await?,
            // plan() puts these in ReplayIds and Copies steps.
            StoreOp::PutMessage(_)
            | StoreOp::PutReplayId { .. }
            | StoreOp::PutCopy { .. }
            | StoreOp::SetAttempts { .. }
            | StoreOp::DeleteCopy { .. } => {}
        }
        Ok(())
    }

    /// Runs one planned step.
    async fn run_step(
        tx: &mut Transaction<'_, Sqlite>,
        step: Step<'_>,
        dropped_files: &mut Vec<u64>,
    ) -> Result<(), sqlx::Error> {
        match step {
            Step::Single(op) => Self::apply(tx, op, dropped_files).await,
            Step::Copies(net) => Self::write_copies(tx, &net).await,
            Step::ReplayIds(rows) => {
                let (entries, expires_at) = journal::pack_replay_ids(&rows);
                sqlx::query("INSERT INTO replay_log (expires_at, entries) VALUES (?, ?)")
                    .bind(expires_at as i64)
                    .bind(entries)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }
    }

    /// Writes the net effect of copy ops, as few multi-row statements as SQLite's
    /// variable limit allows.
    async fn write_copies(tx: &mut Transaction<'_, Sqlite>, net: &Net) -> Result<(), sqlx::Error> {
        let messages: Vec<&Arc<Message>> = net.messages().collect();
        for chunk in statement_chunks(&messages, ROWS_PER_STATEMENT / 3) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT OR IGNORE INTO messages (seq, session, message_id, topic, payload, \
                 timestamp_ms, format, accepted_at, expires_at) ",
            );
            q.push_values(chunk, |mut b, m| {
                b.push_bind(m.seq as i64)
                    .push_bind(m.session.as_str())
                    .push_bind(&m.id.as_bytes()[..])
                    .push_bind(m.topic.as_str())
                    .push_bind(&m.payload[..])
                    .push_bind(m.timestamp_ms as i64)
                    .push_bind(m.stored_format())
                    .push_bind(m.accepted_at as i64)
                    .push_bind(m.expires_at as i64);
            });
            q.build().execute(&mut **tx).await?;
        }
        // Deletes first: a copy acknowledged and queued again within the net (a history
        // replay that spilled) is deleted, then inserted anew.
        let deletes: Vec<_> = net.deletes().collect();
        for chunk in statement_chunks(&deletes, ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "DELETE FROM copies WHERE (session, client_id, seq) IN (",
            );
            q.push_values(chunk, |mut b, ((session, client_id), seq)| {
                b.push_bind(session.as_str())
                    .push_bind(client_id.as_str())
                    .push_bind(*seq as i64);
            });
            q.push(")");
            q.build().execute(&mut **tx).await?;
        }
        let copies: Vec<_> = net.copies().collect();
        for chunk in statement_chunks(&copies, ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT OR IGNORE INTO copies (session, client_id, seq, attempts, ephemeral) ",
            );
            q.push_values(chunk, |mut b, ((session, client_id), seq, copy)| {
                b.push_bind(session.as_str())
                    .push_bind(client_id.as_str())
                    .push_bind(*seq as i64)
                    .push_bind(copy.attempts as i64)
                    .push_bind(copy.ephemeral);
            });
            q.build().execute(&mut **tx).await?;
        }
        for ((session, client_id), seq, attempts) in net.attempts() {
            sqlx::query(
                "UPDATE copies SET attempts = ? WHERE session = ? AND client_id = ? AND seq = ?",
            )
            .bind(attempts as i64)
            .bind(session.as_str())
            .bind(client_id.as_str())
            .bind(seq as i64)
            .execute(&mut **tx)
            .await?;
        }
        Self::drop_orphans(tx, &net.orphans()).await
    }

    /// Deletes the messages among `seqs` that no copy references any more, a few
    /// hundred per statement.
    async fn drop_orphans(
        tx: &mut Transaction<'_, Sqlite>,
        seqs: &[u64],
    ) -> Result<(), sqlx::Error> {
        for chunk in statement_chunks(seqs, ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM messages WHERE seq IN (");
            push_list(&mut q, chunk.iter().map(|seq| *seq as i64));
            q.push(") AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.seq = messages.seq)");
            q.build().execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Deletes a client's copies (only the ephemeral ones, or all) and the message
    /// bodies nothing references any more.
    async fn drop_copies(
        tx: &mut Transaction<'_, Sqlite>,
        session: &SessionName,
        client_id: &ClientId,
        ephemeral_only: bool,
        dropped_files: &mut Vec<u64>,
    ) -> Result<(), sqlx::Error> {
        let files: Vec<i64> = sqlx::query_scalar(
            "SELECT c.seq FROM copies c JOIN messages m ON m.seq = c.seq \
             WHERE c.session = ? AND c.client_id = ? AND (c.ephemeral OR NOT ?) \
             AND m.format & ? != 0",
        )
        .bind(session.as_str())
        .bind(client_id.as_str())
        .bind(ephemeral_only)
        .bind(Message::FILE_FLAG)
        .fetch_all(&mut **tx)
        .await?;
        dropped_files.extend(files.into_iter().map(|seq| seq as u64));
        let seqs: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM copies WHERE session = ? AND client_id = ? AND (ephemeral OR NOT ?) \
             RETURNING seq",
        )
        .bind(session.as_str())
        .bind(client_id.as_str())
        .bind(ephemeral_only)
        .fetch_all(&mut **tx)
        .await?;
        Self::drop_orphans(tx, &as_seqs(seqs)).await
    }

    /// Drops the client's copies whose topic no filter of `keep` matches. Topic
    /// matching is the core's, so the client's topics are read (once each: a queue
    /// holds few, however long it is) and matched here. When all or none are
    /// unwanted, or a few, SQL deletes the copies by topic; with many topics, the
    /// rows are picked one by one and deleted a few hundred per statement. (Every
    /// session's commits wait behind this: one statement per copy, through sqlx's
    /// worker thread, took 1 s for 5,000 copies.)
    async fn discard_copies(
        tx: &mut Transaction<'_, Sqlite>,
        session: &SessionName,
        client_id: &ClientId,
        keep: &[TopicFilter],
        dropped_files: &mut Vec<u64>,
    ) -> Result<(), sqlx::Error> {
        if keep.is_empty() {
            return Self::drop_copies(tx, session, client_id, false, dropped_files).await;
        }
        let topics: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT m.topic FROM copies c JOIN messages m ON m.seq = c.seq \
             WHERE c.session = ? AND c.client_id = ?",
        )
        .bind(session.as_str())
        .bind(client_id.as_str())
        .fetch_all(&mut **tx)
        .await?;
        let total = topics.len();
        // A topic that no longer parses is wanted by no one.
        let wanted = |topic: &str| {
            TopicName::parse(topic).is_ok_and(|topic| keep.iter().any(|f| f.matches(&topic)))
        };
        let unwanted: Vec<String> = topics.into_iter().filter(|t| !wanted(t)).collect();
        if unwanted.is_empty() {
            Ok(())
        } else if unwanted.len() == total {
            Self::drop_copies(tx, session, client_id, false, dropped_files).await
        } else if unwanted.len() <= TOPICS_PER_DISCARD {
            Self::discard_topics(tx, session, client_id, &unwanted, dropped_files).await
        } else {
            Self::discard_rows(tx, session, client_id, &wanted, dropped_files).await
        }
    }

    /// Drops the client's copies of messages on `topics` (at most
    /// [`TOPICS_PER_DISCARD`]).
    async fn discard_topics(
        tx: &mut Transaction<'_, Sqlite>,
        session: &SessionName,
        client_id: &ClientId,
        topics: &[String],
        dropped_files: &mut Vec<u64>,
    ) -> Result<(), sqlx::Error> {
        /// The client's copies on `topics`, as a `SELECT` of their seqs.
        fn on_topics<'a>(
            q: &mut QueryBuilder<'a, Sqlite>,
            session: &'a SessionName,
            client_id: &'a ClientId,
            topics: &'a [String],
        ) {
            q.push(
                "SELECT c.seq FROM copies c JOIN messages m ON m.seq = c.seq WHERE c.session = ",
            )
            .push_bind(session.as_str())
            .push(" AND c.client_id = ")
            .push_bind(client_id.as_str())
            .push(" AND m.topic IN (");
            push_list(q, topics.iter().map(String::as_str));
            q.push(")");
        }
        let mut files = QueryBuilder::<Sqlite>::new("");
        on_topics(&mut files, session, client_id, topics);
        files
            .push(" AND m.format & ")
            .push_bind(Message::FILE_FLAG)
            .push(" != 0");
        let files: Vec<i64> = files.build_query_scalar().fetch_all(&mut **tx).await?;
        dropped_files.extend(as_seqs(files));
        // The bodies only these copies hold go first, while the copies still say
        // which they are; then the copies, found by topic or by their body gone. No
        // row comes back through sqlx.
        let mut bodies = QueryBuilder::<Sqlite>::new("DELETE FROM messages WHERE seq IN (");
        on_topics(&mut bodies, session, client_id, topics);
        bodies
            .push(") AND NOT EXISTS (SELECT 1 FROM copies o WHERE o.seq = messages.seq AND NOT (o.session = ")
            .push_bind(session.as_str())
            .push(" AND o.client_id = ")
            .push_bind(client_id.as_str())
            .push("))");
        bodies.build().execute(&mut **tx).await?;
        let mut copies = QueryBuilder::<Sqlite>::new("DELETE FROM copies WHERE session = ");
        copies
            .push_bind(session.as_str())
            .push(" AND client_id = ")
            .push_bind(client_id.as_str())
            .push(
                " AND seq IN (SELECT c.seq FROM copies c LEFT JOIN messages m ON m.seq = c.seq \
                 WHERE c.session = ",
            )
            .push_bind(session.as_str())
            .push(" AND c.client_id = ")
            .push_bind(client_id.as_str())
            .push(" AND (m.seq IS NULL OR m.topic IN (");
        push_list(&mut copies, topics.iter().map(String::as_str));
        copies.push(")))");
        copies.build().execute(&mut **tx).await?;
        Ok(())
    }

    /// Drops the client's copies whose topic is not `wanted`, picked row by row.
    async fn discard_rows(
        tx: &mut Transaction<'_, Sqlite>,
        session: &SessionName,
        client_id: &ClientId,
        wanted: &impl Fn(&str) -> bool,
        dropped_files: &mut Vec<u64>,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<(i64, String, i32)> = sqlx::query_as(
            "SELECT c.seq, m.topic, m.format FROM copies c JOIN messages m ON m.seq = c.seq \
             WHERE c.session = ? AND c.client_id = ?",
        )
        .bind(session.as_str())
        .bind(client_id.as_str())
        .fetch_all(&mut **tx)
        .await?;
        let mut unwanted = Vec::new();
        for (seq, topic, format) in rows {
            if wanted(&topic) {
                continue;
            }
            unwanted.push(seq as u64);
            if format & Message::FILE_FLAG != 0 {
                dropped_files.push(seq as u64);
            }
        }
        for chunk in statement_chunks(&unwanted, ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM copies WHERE session = ");
            q.push_bind(session.as_str())
                .push(" AND client_id = ")
                .push_bind(client_id.as_str())
                .push(" AND seq IN (");
            push_list(&mut q, chunk.iter().map(|seq| *seq as i64));
            q.push(")");
            q.build().execute(&mut **tx).await?;
        }
        Self::drop_orphans(tx, &unwanted).await
    }
}

/// Binds `values` into `q` as a comma-separated list (the inside of an `IN (…)`).
fn push_list<'a, T>(q: &mut QueryBuilder<'a, Sqlite>, values: impl IntoIterator<Item = T>)
where
    T: 'a + sqlx::Encode<'a, Sqlite> + sqlx::Type<Sqlite>,
{
    let mut list = q.separated(", ");
    for value in values {
        list.push_bind(value);
    }
}

/// Sequence numbers as SQLite returns them (never negative: they are written from
/// `u64`s below 2^63).
fn as_seqs(rows: Vec<i64>) -> Vec<u64> {
    rows.into_iter().map(|seq| seq as u64).collect()
}

impl Writer {
    /// Appends a commit's record to the op log, in one write, and records it.
    async fn append(&mut self, entry: Entry<'_>) -> Result<(), StoreError> {
        let (replay, expires_at) = match &entry.replay {
            Some((bytes, expires_at)) => (&bytes[..], *expires_at),
            None => (&[][..], 0),
        };
        let seq = self.next_seq;
        let record = Record::encode_with(seq, expires_at, replay, |out| {
            if !entry.ops.is_empty() {
                journal::encode_ops_into(out, entry.ops.iter().copied());
            }
        });
        let bytes = record.len();
        self.oplog.append(record).await?;
        self.next_seq += 1;
        self.journal
            .record(seq, entry.ops.iter().copied(), entry.replay, bytes);
        Ok(())
    }

    /// Folds the journal into the tables, in one transaction, then empties the op log.
    async fn fold(&mut self) -> Result<(), StoreError> {
        self.fold_with(Vec::new()).await.map(drop)
    }

    /// Folds the journal into the tables and runs `steps` (barrier ops, after it), in
    /// one transaction, then empties the op log.
    async fn fold_with(&mut self, steps: Vec<Step<'_>>) -> Result<Committed, StoreError> {
        let pending = self.journal.last_seq().is_some() || self.legacy_rows;
        if !pending && steps.is_empty() {
            return Ok(Committed::default());
        }
        let Writer {
            conn,
            journal,
            legacy_rows,
            ..
        } = self;
        // The op log is emptied once this commits, so the commit must survive a power
        // loss too: SQLite syncs the WAL at commit only with `synchronous=FULL`.
        if pending {
            sqlx::query("PRAGMA synchronous = FULL")
                .execute(&mut *conn)
                .await?;
        }
        let mut committed = Committed::default();
        let folded = async {
            let mut tx = conn.begin().await?;
            fold_into(&mut tx, journal, *legacy_rows).await?;
            for step in steps {
                SqliteStore::run_step(&mut tx, step, &mut committed.dropped_files).await?;
            }
            tx.commit().await
        }
        .await;
        if pending
            && let Err(e) = sqlx::query("PRAGMA synchronous = NORMAL")
                .execute(&mut *conn)
                .await
        {
            // Costs table writes an fsync each until the next fold resets it; the
            // fold's own outcome is what the caller needs.
            tracing::warn!(error = %e, "restoring synchronous=NORMAL after a fold failed");
        }
        folded?;
        self.journal.folded();
        self.legacy_rows = false;
        // Should this fail, the records stay in the file; the next open skips them, as
        // `oplog_state` says they are folded. The fold itself committed: its answers,
        // and the file copies it dropped, stand.
        if let Err(e) = self.oplog.clear().await {
            tracing::warn!(error = %e, "clearing the folded op log failed");
        }
        Ok(committed)
    }

    /// Folds, then deletes up to `limit` expired messages with their copies and up to
    /// `limit` expired replay-log rows, in one transaction. Both are taken in index
    /// order, (expires_at, rowid), so the copies' statement and the messages' pick the
    /// same messages, and no step scans what an earlier one deleted.
    async fn purge(&mut self, now: Millis, limit: usize) -> Result<Purged, StoreError> {
        self.fold().await?;
        let (now, limit) = (now as i64, limit as i64);
        let mut tx = self.conn.begin().await?;
        let mut deleted = [0u64; 3];
        for (rows, sql) in deleted.iter_mut().zip([
            "DELETE FROM copies WHERE seq IN (SELECT seq FROM messages \
             WHERE expires_at <= ?1 ORDER BY expires_at, seq LIMIT ?2)",
            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages \
             WHERE expires_at <= ?1 ORDER BY expires_at, seq LIMIT ?2)",
            "DELETE FROM replay_log WHERE id IN (SELECT id FROM replay_log \
             WHERE expires_at <= ?1 ORDER BY expires_at, id LIMIT ?2)",
        ]) {
            *rows = sqlx::query(sql)
                .bind(now)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        let [copies, messages, replay] = deleted;
        tx.commit().await?;
        let limit = limit as u64;
        Ok(Purged {
            rows: copies + messages + replay,
            more: messages >= limit || replay >= limit,
        })
    }

    /// Purges everything expired, step after step (at start-up, where nothing waits).
    async fn purge_all(&mut self, now: Millis) -> Result<(), StoreError> {
        while self.purge(now, RESTORE_PURGE_STEP).await?.more {}
        Ok(())
    }
}

/// A subscriber's copies in the tables after `request.after_seq`, unexpired, in seq
/// order, at most `limit`; and whether that was all of them. With `net`, copies it
/// deletes are skipped and the attempts it sets are applied.
async fn backlog_rows(
    conn: &mut SqliteConnection,
    request: &BacklogRequest,
    now: Millis,
    limit: usize,
    net: Option<&SubscriberNet>,
) -> Result<BacklogPage, StoreError> {
    let (session, client_id) = (&request.session, &request.client_id);
    // Enough rows that `limit` remain after the net's deletes, and one more to tell
    // whether there are more.
    let fetch = limit + 1 + net.map_or(0, SubscriberNet::deletes);
    let rows = sqlx::query(
        "SELECT m.seq, m.message_id, m.topic, m.payload, m.timestamp_ms, m.format, \
                m.accepted_at, m.expires_at, c.attempts, c.ephemeral \
         FROM copies c JOIN messages m ON m.seq = c.seq \
         WHERE c.session = ? AND c.client_id = ? AND c.seq > ? AND m.expires_at > ? \
         ORDER BY c.seq LIMIT ?",
    )
    .bind(session.as_str())
    .bind(client_id.as_str())
    .bind(request.after_seq as i64)
    .bind(now as i64)
    .bind(fetch as i64)
    .fetch_all(&mut *conn)
    .await?;
    let exhausted = rows.len() < fetch;
    let mut page = Vec::with_capacity(rows.len().min(limit + 1));
    for row in &rows {
        let mut copy = copy_from_row(session, row)?;
        if let Some(net) = net {
            let seq = copy.message.seq;
            if net.deletes_copy(seq) {
                continue;
            }
            if let Some(attempts) = net.attempts_of(seq) {
                copy.attempts = attempts;
            }
        }
        page.push(copy);
    }
    if page.len() > limit {
        page.truncate(limit);
        return Ok((page, false));
    }
    Ok((page, exhausted))
}

/// Writes what the journal adds up to into the tables, and the last record it covers
/// into `oplog_state`, in `tx`.
async fn fold_into(
    tx: &mut Transaction<'_, Sqlite>,
    journal: &Journal,
    legacy_rows: bool,
) -> Result<(), sqlx::Error> {
    let Some(last) = journal.last_seq() else {
        return Ok(());
    };
    SqliteStore::write_copies(tx, journal.net()).await?;
    for chunk in statement_chunks(journal.replay(), ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO replay_log (expires_at, entries) ");
        q.push_values(chunk, |mut b, (entries, expires_at)| {
            b.push_bind(*expires_at as i64).push_bind(&entries[..]);
        });
        q.build().execute(&mut **tx).await?;
    }
    sqlx::query("UPDATE oplog_state SET folded_through = ? WHERE id = 1")
        .bind(last as i64)
        .execute(&mut **tx)
        .await?;
    if legacy_rows {
        sqlx::query("DELETE FROM journal")
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Where the op log of the database at `path` lives: beside it, `<file>.oplog`.
fn oplog_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".oplog");
    PathBuf::from(name)
}

/// Copies the WAL back into the database file every [`CHECKPOINT_INTERVAL`], beside
/// the commits rather than inside one (a passive checkpoint waits for no reader or
/// writer), until the store closes.
async fn checkpoints(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                break;
            }
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// Splits rows into chunks whose sizes come from a small fixed set (`max`, 64, 16, 4,
/// 1), so the multi-row statements built from them have few distinct texts and stay
/// in the prepared-statement cache instead of being parsed again each commit.
fn statement_chunks<T>(rows: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = [max, 64, 16, 4, 1]
            .into_iter()
            .find(|&n| n <= rest.len())
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn session_from_row(row: &SqliteRow) -> Result<SessionRecord, StoreError> {
    let name: String = row.try_get("name")?;
    let mut settings = SessionSettings::new(SessionName::parse(&name).map_err(corrupt)?);
    settings.retry_interval_ms = row.try_get::<i64, _>("retry_interval_ms")? as u64;
    settings.max_retries = row.try_get::<i64, _>("max_retries")? as u32;
    settings.message_expiry_ms = row.try_get::<i64, _>("message_expiry_ms")? as u64;
    settings.max_payload_bytes = row.try_get::<i64, _>("max_payload_bytes")? as u64;
    settings.history_size = row.try_get::<i64, _>("history_size")? as u32;
    settings.suspended = row.try_get("suspended")?;
    Ok(SessionRecord {
        settings,
        password_hash: row.try_get("password_hash")?,
        created_at: row.try_get::<i64, _>("created_at")? as u64,
    })
}

fn copy_from_row(session: &SessionName, row: &SqliteRow) -> Result<StoredCopy, StoreError> {
    let id: Vec<u8> = row.try_get("message_id")?;
    let topic: String = row.try_get("topic")?;
    let format: i32 = row.try_get("format")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let (format, kind) = Message::parse_stored_format(format)
        .ok_or_else(|| corrupt(format!("unknown payload format {format}")))?;
    let message = Message {
        session: session.clone(),
        id: MessageId::from_slice(&id).map_err(corrupt)?,
        seq: row.try_get::<i64, _>("seq")? as u64,
        topic: TopicName::parse(&topic).map_err(corrupt)?,
        payload: Bytes::from(payload),
        timestamp_ms: row.try_get::<i64, _>("timestamp_ms")? as u64,
        format,
        kind,
        accepted_at: row.try_get::<i64, _>("accepted_at")? as u64,
        expires_at: row.try_get::<i64, _>("expires_at")? as u64,
    };
    Ok(StoredCopy {
        message: Arc::new(message),
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        ephemeral: row.try_get("ephemeral")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn create_session(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let s = &record.settings;
        let result = sqlx::query(
            "INSERT INTO sessions (name, password_hash, retry_interval_ms, max_retries, \
             message_expiry_ms, max_payload_bytes, history_size, suspended, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(s.name.as_str())
        .bind(&record.password_hash)
        .bind(s.retry_interval_ms as i64)
        .bind(s.max_retries as i64)
        .bind(s.message_expiry_ms as i64)
        .bind(s.max_payload_bytes as i64)
        .bind(s.history_size as i64)
        .bind(s.suspended)
        .bind(record.created_at as i64)
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::SessionExists(s.name.to_string()));
        }
        Ok(())
    }

    async fn session(&self, name: &SessionName) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM sessions WHERE name = ?")
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM sessions ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn count_sessions(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn restore(&self, now: Millis) -> Result<Restore, StoreError> {
        {
            let mut writer = self.writer.lock().await;
            writer.purge_all(now).await?;
            // Counting the files' copies below needs every commit in the tables.
            writer.fold().await?;
            let mut tx = writer.conn.begin().await?;
            let seqs: Vec<i64> =
                sqlx::query_scalar("DELETE FROM copies WHERE ephemeral RETURNING seq")
                    .fetch_all(&mut *tx)
                    .await?;
            // Several clients' copies of a message: each seq once.
            let mut seqs = as_seqs(seqs);
            seqs.sort_unstable();
            seqs.dedup();
            Self::drop_orphans(&mut tx, &seqs).await?;
            tx.commit().await?;
        }

        let sessions = self
            .sessions()
            .await?
            .into_iter()
            .map(|r| r.settings)
            .collect();
        let subscriptions =
            sqlx::query("SELECT session, client_id, filter, legacy_only FROM subscriptions")
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| {
                    let s: String = row.try_get("session")?;
                    let c: String = row.try_get("client_id")?;
                    let f: String = row.try_get("filter")?;
                    Ok(RestoredSubscription {
                        session: SessionName::parse(&s).map_err(corrupt)?,
                        client_id: ClientId::parse(&c).map_err(corrupt)?,
                        filter: TopicFilter::parse(&f).map_err(corrupt)?,
                        legacy_only: row.try_get("legacy_only")?,
                    })
                })
                .collect::<Result<_, StoreError>>()?;
        let mut replay_ids = Vec::new();
        let logs: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT entries FROM replay_log WHERE expires_at > ?")
                .bind(now as i64)
                .fetch_all(&self.pool)
                .await?;
        for entries in logs {
            journal::unpack_replay_ids(&entries, now, &mut replay_ids)?;
        }
        let max_seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM messages")
            .fetch_one(&self.pool)
            .await?;
        // The tables are whole: the journal was folded above.
        let files = sqlx::query(
            "SELECT m.seq, m.session, m.message_id, COUNT(*) AS copies \
             FROM messages m JOIN copies c ON c.seq = m.seq \
             WHERE (m.format & ?) != 0 GROUP BY m.seq",
        )
        .bind(Message::FILE_FLAG)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let session: String = row.try_get("session")?;
            let id: Vec<u8> = row.try_get("message_id")?;
            Ok(RestoredFile {
                session: SessionName::parse(&session).map_err(corrupt)?,
                file_id: MessageId::from_slice(&id).map_err(corrupt)?,
                seq: row.try_get::<i64, _>("seq")? as u64,
                copies: row.try_get::<i64, _>("copies")? as usize,
            })
        })
        .collect::<Result<_, StoreError>>()?;
        Ok(Restore {
            sessions,
            subscriptions,
            replay_ids,
            next_seq: max_seq.map_or(1, |m| m as u64 + 1),
            files,
        })
    }

    async fn commit(&self, batches: &[StoreBatch]) -> Result<Committed, StoreError> {
        let ops = || batches.iter().flat_map(|b| &b.ops);
        let mut writer = self.writer.lock().await;
        let writer = &mut *writer;
        let Some(entry) = Entry::of(ops()) else {
            // Subscription and client changes are rare: they go to the tables at
            // once, after everything journalled before them.
            return writer.fold_with(plan(ops())).await;
        };
        if entry.is_empty() {
            return Ok(Committed::default());
        }
        writer.append(entry).await?;
        if writer.journal.wants_fold()
            && let Err(e) = writer.fold().await
        {
            // The commit itself is durable; the ops stay journalled and the next
            // fold tries again.
            tracing::warn!(error = %e, "folding the journal failed");
        }
        // Journalled commits hold no op that drops copies wholesale.
        Ok(Committed::default())
    }

    async fn backlog(
        &self,
        request: &BacklogRequest,
        now: Millis,
    ) -> Result<BacklogPage, StoreError> {
        let mut writer = self.writer.lock().await;
        let writer = &mut *writer;
        let (session, client_id) = (&request.session, &request.client_id);
        let limit = request.limit.max(1);

        // The page merges the tables, as the journal leaves them, with the copies
        // queued in the journal since: a subscriber reading back what it spilled a
        // moment ago costs no fold and no row.
        let net = writer.journal.net();
        let sub = net.subscriber(session, client_id);
        let mut page: Vec<StoredCopy> = Vec::new();
        let mut complete = true;
        for (seq, copy) in sub
            .into_iter()
            .flat_map(|s| s.queued_after(request.after_seq))
        {
            match net.body(seq) {
                Some(message) if message.expires_at <= now => {}
                Some(message) => page.push(StoredCopy {
                    message: message.clone(),
                    attempts: copy.attempts,
                    ephemeral: copy.ephemeral,
                }),
                // A body stored before its copy was queued (rare): the tables have
                // both once folded.
                None => complete = false,
            }
        }
        if !complete {
            writer.fold().await?;
            return backlog_rows(&mut writer.conn, request, now, limit, None).await;
        }
        let (mut rows, exhausted) =
            backlog_rows(&mut writer.conn, request, now, limit, sub).await?;
        // A stored copy comes first and stays where a spill in the journal shadows it
        // (a history replay): the spill's insert will leave the stored row as it is.
        rows.append(&mut page);
        let mut page = rows;
        page.sort_by_key(|c| c.message.seq);
        page.dedup_by_key(|c| c.message.seq);
        if page.len() > limit {
            page.truncate(limit);
            return Ok((page, false));
        }
        Ok((page, exhausted))
    }

    async fn purge(&self, now: Millis, limit: usize) -> Result<Purged, StoreError> {
        self.writer.lock().await.purge(now, limit).await
    }

    async fn put_push_token(&self, token: &PushToken, limit: usize) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let previous = self
            .last_push_update
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(clock.max(last + 1))
            })
            .unwrap_or(clock);
        let now = clock.max(previous + 1);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO push_tokens (session, user_id, device_id, token, platform, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (session, user_id, device_id) \
             DO UPDATE SET token = excluded.token, platform = excluded.platform, \
                           updated_at = excluded.updated_at",
        )
        .bind(token.session.as_str())
        .bind(&token.user_id)
        .bind(&token.device_id)
        .bind(&token.token)
        .bind(&token.platform)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM push_tokens WHERE session = ?")
            .bind(token.session.as_str())
            .fetch_one(&mut *tx)
            .await?;
        if usize::try_from(held).unwrap_or(usize::MAX) > limit {
            // The one registered longest ago, never the device registering now (its
            // time may equal another's to the millisecond).
            sqlx::query(
                "DELETE FROM push_tokens WHERE session = ?1 AND (user_id, device_id) = \
                 (SELECT user_id, device_id FROM push_tokens \
                  WHERE session = ?1 AND NOT (user_id = ?2 AND device_id = ?3) \
                  ORDER BY updated_at LIMIT 1)",
            )
            .bind(token.session.as_str())
            .bind(&token.user_id)
            .bind(&token.device_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn push_tokens(&self, session: &SessionName) -> Result<Vec<PushToken>, StoreError> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT user_id, device_id, token, platform FROM push_tokens WHERE session = ? \
             ORDER BY user_id, device_id",
        )
        .bind(session.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, device_id, token, platform)| PushToken {
                session: session.clone(),
                user_id,
                device_id,
                token,
                platform,
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // A clean stop leaves nothing for the next start to fold.
        let mut writer = self.writer.lock().await;
        if let Err(e) = writer.fold().await {
            tracing::warn!(error = %e, "folding the journal at shutdown failed");
        }
        drop(writer);
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::statement_chunks;

    #[test]
    fn chunks_use_few_sizes_and_cover_everything() {
        let rows: Vec<u32> = (0..397).collect();
        let sizes: Vec<usize> = statement_chunks(&rows, 300).map(<[u32]>::len).collect();
        assert_eq!(sizes, vec![300, 64, 16, 16, 1]);
        let flat: Vec<u32> = statement_chunks(&rows, 300).flatten().copied().collect();
        assert_eq!(flat, rows);
        assert_eq!(statement_chunks::<u32>(&[], 300).count(), 0);
    }
}
