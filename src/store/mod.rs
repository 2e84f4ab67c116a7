//! Durable state behind one trait: sessions, queued copies for durable (and spilled)
//! subscribers, durable subscriptions, replay ids and push tokens.
//!
//! The core never calls the store: it emits [`StoreBatch`]es and [`BacklogRequest`]s,
//! and the driver runs them here, in order, and reports back. Every implementation
//! passes the same suite (`tests.rs`): memory, SQLite, and later Postgres.

pub mod journal;
pub mod memory;
pub mod oplog;
pub mod plan;
pub mod sqlite;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;

use crate::core::{
    BacklogRequest, Millis, Restore, SessionName, SessionSettings, StoreBatch, StoredCopy,
};

/// Store failures. None of them is the client's fault; the broker answers `INTERNAL`
/// (or HTTP 503) and the request may be retried.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `create_session` with a name that exists.
    #[error("session {0} already exists")]
    SessionExists(String),
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds something this version cannot read.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The op log (beside the SQLite file) could not be read or written.
    #[error("op log: {0}")]
    Io(#[from] std::io::Error),
    /// The directory for the database could not be created.
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What one call of [`Store::purge`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Rows deleted.
    pub rows: u64,
    /// Expired rows are left that this call did not get to: call again.
    pub more: bool,
}

/// A session as stored: its settings and its password's argon2id hash (PHC string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub settings: SessionSettings,
    pub password_hash: String,
    pub created_at: Millis,
}

/// A device registered for push notifications. The token is a secret: never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct PushToken {
    pub session: SessionName,
    pub user_id: String,
    pub device_id: String,
    pub token: String,
    pub platform: String,
}

impl std::fmt::Debug for PushToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushToken")
            .field("session", &self.session)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("platform", &self.platform)
            .finish()
    }
}

/// A page of a subscriber's backlog and whether it was the last one.
pub type BacklogPage = (Vec<StoredCopy>, bool);

/// What a commit did that its ops do not say one by one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The file copies that ops dropping a client's copies wholesale (`DeleteClient`,
    /// `DeleteEphemeral`, `DiscardCopies`) found in the store, by message `seq`, one
    /// entry per copy: the core counts them off, so the last lets the file's spool go.
    pub dropped_files: Vec<u64>,
}

/// The broker's durable state. Implementations must apply a batch's ops in order and
/// atomically, and apply batches in the order given.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "memory", "sqlite" or "postgres", for logs and `/health`.
    fn kind(&self) -> &'static str;

    /// Creates a session; [`StoreError::SessionExists`] if the name is taken.
    async fn create_session(&self, record: &SessionRecord) -> Result<(), StoreError>;

    async fn session(&self, name: &SessionName) -> Result<Option<SessionRecord>, StoreError>;

    async fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;

    async fn count_sessions(&self) -> Result<u64, StoreError>;

    /// What the core needs at start-up. Drops ephemeral copies (their connections are
    /// gone) and anything expired by `now`.
    async fn restore(&self, now: Millis) -> Result<Restore, StoreError>;

    /// Applies batches in order, atomically (one transaction for all of them).
    async fn commit(&self, batches: &[StoreBatch]) -> Result<Committed, StoreError>;

    /// The next page of a subscriber's backlog: unexpired copies with seq > `after_seq`,
    /// in seq order, at most `limit`; `true` if there are no more.
    async fn backlog(
        &self,
        request: &BacklogRequest,
        now: Millis,
    ) -> Result<BacklogPage, StoreError>;

    /// Deletes expired messages with their copies, and expired replay ids: up to
    /// `limit` rows of each kind per call, so that a purge after a busy period can be
    /// done in steps with commits in between. (A store for which a bound buys nothing,
    /// the memory store, may delete everything at once.)
    async fn purge(&self, now: Millis, limit: usize) -> Result<Purged, StoreError>;

    /// Registers a device's push token, or replaces the one registered for the same
    /// session, user and device. A session keeps at most `limit` devices: past it, the
    /// one registered longest ago goes (a device that is in use registers again), so
    /// that no client can fill the store, nor lock a session's devices out.
    async fn put_push_token(&self, token: &PushToken, limit: usize) -> Result<(), StoreError>;

    /// A session's registered devices, by user and device id.
    async fn push_tokens(&self, session: &SessionName) -> Result<Vec<PushToken>, StoreError>;

    /// Cheap liveness check for `/health`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes (graceful shutdown).
    async fn close(&self);
}

/// Which store to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    /// A SQLite file, created if missing.
    Sqlite(std::path::PathBuf),
}

/// Opens the configured store.
pub async fn open(kind: &StoreKind) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match kind {
        StoreKind::Memory => Arc::new(memory::MemoryStore::default()),
        StoreKind::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path).await?),
    })
}
