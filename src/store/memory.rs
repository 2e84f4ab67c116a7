//! An in-memory store: fast, nothing survives a restart. For tests, benchmarks and
//! brokers that only need connection-bound delivery.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::core::{
    BacklogRequest, ClientId, Message, MessageId, MessageKind, Millis, Restore, RestoredFile,
    RestoredSubscription, SessionName, StoreBatch, StoreOp, StoredCopy, TopicFilter,
};

use super::{BacklogPage, Committed, Purged, PushToken, SessionRecord, Store, StoreError};

type ClientKey = (SessionName, ClientId);

#[derive(Debug, Clone, Copy)]
struct CopyRow {
    attempts: u32,
    ephemeral: bool,
}

/// The store's tables as plain collections (also handy for driving the core in tests).
#[derive(Debug, Default)]
pub struct MemoryState {
    sessions: BTreeMap<SessionName, SessionRecord>,
    messages: HashMap<u64, Arc<Message>>,
    /// How many copies reference each message.
    refs: HashMap<u64, usize>,
    copies: HashMap<ClientKey, BTreeMap<u64, CopyRow>>,
    /// Durable subscriptions, and whether a legacy connection made each.
    subscriptions: BTreeMap<(SessionName, ClientId, TopicFilter), bool>,
    replay: HashMap<(SessionName, MessageId), Millis>,
    /// Each device's token with the order of its last registration.
    push_tokens: BTreeMap<(SessionName, String, String), (u64, PushToken)>,
    registrations: u64,
}

impl MemoryState {
    /// Adds a session; false if the name is taken (nothing changes then).
    pub fn insert_session(&mut self, record: &SessionRecord) -> bool {
        let name = record.settings.name.clone();
        if self.sessions.contains_key(&name) {
            return false;
        }
        self.sessions.insert(name, record.clone());
        true
    }

    /// Applies one batch's ops in order.
    /// Applies a batch; returns the file copies dropped wholesale (see [`Committed`]).
    pub fn apply(&mut self, batch: &StoreBatch) -> Vec<u64> {
        let mut dropped_files = Vec::new();
        for op in &batch.ops {
            self.apply_op(op, &mut dropped_files);
        }
        dropped_files
    }

    fn apply_op(&mut self, op: &StoreOp, dropped_files: &mut Vec<u64>) {
        match op {
            StoreOp::PutMessage(m) => {
                self.messages.entry(m.seq).or_insert_with(|| m.clone());
            }
            StoreOp::PutReplayId {
                session,
                id,
                expires_at,
            } => {
                self.replay.insert((session.clone(), *id), *expires_at);
            }
            StoreOp::PutCopy {
                session,
                client_id,
                seq,
                ephemeral,
                .. // one row per copy here: a replay's spill over a stored copy is that row
            } => {
                let rows = self
                    .copies
                    .entry((session.clone(), client_id.clone()))
                    .or_default();
                match rows.get_mut(seq) {
                    // As the SQL stores' INSERT OR IGNORE: a durable copy stays one.
                    Some(row) => row.ephemeral &= *ephemeral,
                    None => {
                        let row = CopyRow {
                            attempts: 0,
                            ephemeral: *ephemeral,
                        };
                        rows.insert(*seq, row);
                        *self.refs.entry(*seq).or_default() += 1;
                    }
                }
            }
            StoreOp::DeleteCopy {
                session,
                client_id,
                seq,
            } => {
                let key = (session.clone(), client_id.clone());
                if let Some(rows) = self.copies.get_mut(&key)
                    && rows.remove(seq).is_some()
                {
                    self.unref(*seq);
                }
            }
            StoreOp::SetAttempts {
                session,
                client_id,
                seq,
                attempts,
            } => {
                let key = (session.clone(), client_id.clone());
                if let Some(row) = self.copies.get_mut(&key).and_then(|r| r.get_mut(seq)) {
                    row.attempts = *attempts;
                }
            }
            StoreOp::PutSubscription {
                session,
                client_id,
                filter,
                legacy_only,
            } => {
                self.subscriptions.insert(
                    (session.clone(), client_id.clone(), filter.clone()),
                    *legacy_only,
                );
            }
            StoreOp::SetLegacyOnly {
                session,
                client_id,
                legacy_only,
            } => {
                for ((s, c, _), mark) in &mut self.subscriptions {
                    if s == session && c == client_id {
                        *mark = *legacy_only;
                    }
                }
            }
            StoreOp::DeleteSubscription {
                session,
                client_id,
                filter,
            } => {
                self.subscriptions
                    .remove(&(session.clone(), client_id.clone(), filter.clone()));
            }
            StoreOp::DeleteClient { session, client_id } => {
                self.subscriptions
                    .retain(|(s, c, _), _| !(s == session && c == client_id));
                dropped_files.extend(self.drop_copies(session, client_id, |_, _| true));
            }
            StoreOp::DeleteEphemeral { session, client_id } => {
                dropped_files.extend(self.drop_copies(session, client_id, |_, row| row.ephemeral));
            }
            StoreOp::DiscardCopies {
                session,
                client_id,
                keep,
            } => {
                // A copy without its message is wanted by no one.
                dropped_files.extend(self.drop_copies(session, client_id, |message, _| {
                    !message.is_some_and(|m| keep.iter().any(|f| f.matches(&m.topic)))
                }));
            }
        }
    }

    fn drop_copies(
        &mut self,
        session: &SessionName,
        client_id: &ClientId,
        pick: impl Fn(Option<&Message>, &CopyRow) -> bool,
    ) -> Vec<u64> {
        let key = (session.clone(), client_id.clone());
        let Some(rows) = self.copies.get_mut(&key) else {
            return Vec::new();
        };
        let messages = &self.messages;
        let gone: Vec<u64> = rows
            .iter()
            .filter(|(seq, r)| pick(messages.get(seq).map(|m| &**m), r))
            .map(|(s, _)| *s)
            .collect();
        for seq in &gone {
            rows.remove(seq);
        }
        if rows.is_empty() {
            self.copies.remove(&key);
        }
        let files = gone
            .iter()
            .copied()
            .filter(|seq| {
                messages
                    .get(seq)
                    .is_some_and(|m| m.kind == MessageKind::File)
            })
            .collect();
        for seq in gone {
            self.unref(seq);
        }
        files
    }

    fn unref(&mut self, seq: u64) {
        if let Some(n) = self.refs.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&seq);
                self.messages.remove(&seq);
            }
        }
    }

    /// A page of a subscriber's backlog.
    pub fn backlog(&self, request: &BacklogRequest, now: Millis) -> BacklogPage {
        let key = (request.session.clone(), request.client_id.clone());
        let Some(rows) = self.copies.get(&key) else {
            return (Vec::new(), true);
        };
        let mut page = Vec::new();
        let mut range = rows.range(request.after_seq.saturating_add(1)..);
        for (seq, row) in range.by_ref() {
            let Some(message) = self.messages.get(seq) else {
                continue;
            };
            if message.expires_at <= now {
                continue;
            }
            page.push(StoredCopy {
                message: message.clone(),
                attempts: row.attempts,
                ephemeral: row.ephemeral,
            });
            if page.len() >= request.limit {
                break;
            }
        }
        let exhausted = range.next().is_none();
        (page, exhausted)
    }

    /// What survived, as the core needs it; ephemeral copies are dropped.
    pub fn restore(&mut self, now: Millis) -> Restore {
        self.purge(now);
        let keys: Vec<ClientKey> = self.copies.keys().cloned().collect();
        for (session, client_id) in keys {
            // Restoring: the core counts only the copies left.
            self.drop_copies(&session, &client_id, |_, row| row.ephemeral);
        }
        Restore {
            sessions: self.sessions.values().map(|r| r.settings.clone()).collect(),
            subscriptions: self
                .subscriptions
                .iter()
                .map(
                    |((session, client_id, filter), legacy_only)| RestoredSubscription {
                        session: session.clone(),
                        client_id: client_id.clone(),
                        filter: filter.clone(),
                        legacy_only: *legacy_only,
                    },
                )
                .collect(),
            replay_ids: self
                .replay
                .iter()
                .map(|((s, id), exp)| (s.clone(), *id, *exp))
                .collect(),
            next_seq: self.messages.keys().max().map_or(1, |m| m + 1),
            files: self
                .messages
                .values()
                .filter(|m| m.kind == MessageKind::File)
                .filter_map(|m| {
                    let copies = self.refs.get(&m.seq).copied().filter(|n| *n > 0)?;
                    Some(RestoredFile {
                        session: m.session.clone(),
                        file_id: m.id,
                        seq: m.seq,
                        copies,
                    })
                })
                .collect(),
        }
    }

    /// Drops everything expired by `now`.
    pub fn purge(&mut self, now: Millis) -> u64 {
        let before = self.replay.len() + self.messages.len();
        self.replay.retain(|_, exp| *exp > now);
        let expired: BTreeSet<u64> = self
            .messages
            .values()
            .filter(|m| m.expires_at <= now)
            .map(|m| m.seq)
            .collect();
        if !expired.is_empty() {
            for rows in self.copies.values_mut() {
                rows.retain(|seq, _| !expired.contains(seq));
            }
            self.copies.retain(|_, rows| !rows.is_empty());
            for seq in &expired {
                self.messages.remove(seq);
                self.refs.remove(seq);
            }
        }
        (before - self.replay.len() - self.messages.len()) as u64
    }

    /// Number of queued copies (for tests).
    pub fn copy_count(&self) -> usize {
        self.copies.values().map(|r| r.len()).sum()
    }

    /// Number of stored message bodies (for tests).
    pub fn message_count(&self) -> usize {
        self.messages.len()
    }

    /// Number of durable subscriptions (for tests).
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }
}

/// [`MemoryState`] behind a mutex (never held across an await).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

impl MemoryStore {
    fn state(&self) -> MutexGuard<'_, MemoryState> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than losing the broker, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn create_session(&self, record: &SessionRecord) -> Result<(), StoreError> {
        if !self.state().insert_session(record) {
            return Err(StoreError::SessionExists(record.settings.name.to_string()));
        }
        Ok(())
    }

    async fn session(&self, name: &SessionName) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.state().sessions.get(name).cloned())
    }

    async fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.state().sessions.values().cloned().collect())
    }

    async fn count_sessions(&self) -> Result<u64, StoreError> {
        Ok(self.state().sessions.len() as u64)
    }

    async fn restore(&self, now: Millis) -> Result<Restore, StoreError> {
        Ok(self.state().restore(now))
    }

    async fn commit(&self, batches: &[StoreBatch]) -> Result<Committed, StoreError> {
        let mut state = self.state();
        let mut committed = Committed::default();
        for batch in batches {
            committed.dropped_files.extend(state.apply(batch));
        }
        Ok(committed)
    }

    async fn backlog(
        &self,
        request: &BacklogRequest,
        now: Millis,
    ) -> Result<BacklogPage, StoreError> {
        Ok(self.state().backlog(request, now))
    }

    async fn purge(&self, now: Millis, _limit: usize) -> Result<Purged, StoreError> {
        // In memory a purge is one pass over the maps; steps would only repeat it.
        Ok(Purged {
            rows: self.state().purge(now),
            more: false,
        })
    }

    async fn put_push_token(&self, token: &PushToken, limit: usize) -> Result<(), StoreError> {
        let key = (
            token.session.clone(),
            token.user_id.clone(),
            token.device_id.clone(),
        );
        let mut state = self.state();
        state.registrations += 1;
        let order = state.registrations;
        state.push_tokens.insert(key, (order, token.clone()));
        let from = (token.session.clone(), String::new(), String::new());
        let session = || {
            state
                .push_tokens
                .range(from.clone()..)
                .take_while(|((session, _, _), _)| *session == token.session)
        };
        if session().nth(limit).is_some() {
            let oldest = session()
                .min_by_key(|(_, (order, _))| *order)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                state.push_tokens.remove(&oldest);
            }
        }
        Ok(())
    }

    async fn push_tokens(&self, session: &SessionName) -> Result<Vec<PushToken>, StoreError> {
        let from = (session.clone(), String::new(), String::new());
        Ok(self
            .state()
            .push_tokens
            .range(from..)
            .take_while(|((s, _, _), _)| s == session)
            .map(|(_, (_, token))| token.clone())
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close(&self) {}
}
