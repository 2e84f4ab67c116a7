//! The broker's state machine: sessions, subscriptions, delivery, retries and replay
//! protection, with no I/O at all.
//!
//! Nothing here reads a clock, touches a socket or awaits: like `quinn-proto`, the core
//! is fed and drained by a driver ([`crate::driver`]), which makes every rule of design
//! §4 a plain function of its inputs that tests can run in microseconds with a fake
//! clock (see `tests.rs` at the bottom of this module).
//!
//! # Driving contract
//!
//! Feed it:
//! - [`Core::restore`] once, before anything else, with what the store holds;
//! - [`Core::handle`] for every [`Command`] from a carrier;
//! - [`Core::handle_timeout`] when the deadline from [`Core::poll_timeout`] passes;
//! - [`Core::handle_committed`] / [`Core::handle_commit_failed`] when a batch from
//!   [`Core::take_batch`] is durable (or failed), in the order the batches were taken;
//! - [`Core::handle_backlog`] with the answer to each [`BacklogRequest`].
//!
//! After each call (or each group of calls), drain it:
//! - [`Core::poll_output`] until `None`, sending each output to its connection;
//! - [`Core::take_batch`], and commit it — batches must be committed in order;
//! - [`Core::take_loads`], and run each load *after* the batches taken before it (the
//!   store must see earlier writes);
//! - [`Core::poll_timeout`] for the next deadline.
//!
//! Every `handle_*` takes `now` in milliseconds since the Unix epoch: the replay window
//! compares it with publishers' timestamps, so it is wall-clock time.

mod command;
mod delivery;
mod error;
mod files;
mod replay;
mod router;
mod session;
mod topic;
mod types;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;

use crate::proto::{PresenceEvent, PubAckStatus};

pub use command::{
    BacklogRequest, Command, ErrorEvent, Event, FileDone, FileOffer, FileRoute, Hello, Message,
    MessageKind, Output, Presence, Publish, Restore, RestoredFile, RestoredSubscription,
    StoreBatch, StoreOp, StoredCopy, Welcome,
};
pub use error::Reject;
pub use replay::ReplayGuard;
pub use session::{
    DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_RETRIES, DEFAULT_MESSAGE_EXPIRY_MS,
    DEFAULT_RETRY_INTERVAL_MS, MAX_HISTORY_SIZE, MAX_RETRIES_LIMIT, MESSAGE_EXPIRY_RANGE,
    RETRY_INTERVAL_RANGE, SessionSettings, SubOpts,
};
pub use topic::{MAX_TOPIC_LEN, TopicFilter, TopicName, TopicTree};
pub use types::{
    ClientId, ConnId, FastMap, FastSet, MessageId, Millis, NameError, SessionName, skew_ms,
};

use delivery::{Ctx, Subscriber};
use session::Session;

/// Memory bounds per subscriber (see [`delivery`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Copies sent and not yet acknowledged.
    pub max_inflight: usize,
    /// Copies waiting in memory behind the window; more spill to the store.
    pub max_queued: usize,
}

/// Broker-wide settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub limits: Limits,
    /// Accepted clock skew of publish timestamps, either way.
    pub replay_window_ms: u64,
    /// Most message ids remembered per session within the window.
    pub replay_capacity: usize,
    /// Most subscriptions per client (its connection's, and its durable ones).
    pub max_subscriptions: usize,
    /// Most entries in a session's key directory.
    pub max_keys: usize,
    /// Most clients a session holds at once, counted twice over: connected ones, and
    /// ones with subscriptions (connected, or offline and kept by durable ones). One
    /// tenant cannot fill the broker's memory and store with client ids of its own.
    pub max_session_clients: usize,
    /// Largest file accepted, in bytes.
    pub max_file_bytes: u64,
    /// The broker's cap on any session's payload limit. A session stored with a
    /// higher limit (before a restart with a lower `--max-payload`) gets the cap: past
    /// it, a carrier's largest frame would no longer hold the publish.
    pub max_payload_bytes: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            limits: Limits {
                max_inflight: 512,
                max_queued: 1024,
            },
            replay_window_ms: 30_000,
            replay_capacity: 4_000_000,
            max_subscriptions: 1_000,
            max_keys: 10_000,
            max_session_clients: 50_000,
            max_file_bytes: 4 << 30,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// Counters for `/health`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions loaded in the router.
    pub sessions: usize,
    /// Authenticated connections, on every carrier.
    pub connections: usize,
    /// Clients with subscriptions, online or (durable) offline.
    pub subscribers: usize,
}

/// Work queued by the core for its driver, filled while handling a call.
#[derive(Debug, Default)]
pub struct Effects {
    outputs: VecDeque<Output>,
    ops: Vec<StoreOp>,
    loads: Vec<BacklogRequest>,
    timers: BTreeSet<(Millis, ConnId)>,
    token: u64,
    /// Copies still held of each spooled file, by `seq` (those in the store when the
    /// broker started, then every one made since), counted down as the core lets go
    /// of them, and as the store reports the ones it dropped wholesale (a clean
    /// start's `DeleteClient`, `DeleteEphemeral`, an unsubscribe's `DiscardCopies`).
    /// Each copy is counted off once: by the core while it holds it in memory (a
    /// persisted one's row deleted first), by the store's report once only the row
    /// is left (see `Subscriber::detach` and `discard_unwanted`).
    files: FastMap<u64, SpooledFile>,
    /// Copies not yet acknowledged of each message whose `PubAck` waits for its batch,
    /// by `seq`. None left when the batch commits means every subscriber acknowledged
    /// it first, and the publisher is told `DELIVERED` (design §10). Copies released
    /// otherwise (expired, given up, unsubscribed) are not acknowledgements.
    unacked: FastMap<u64, usize>,
}

#[derive(Debug)]
struct SpooledFile {
    session: SessionName,
    file_id: MessageId,
    copies: usize,
}

impl Effects {
    /// One more copy of a file is held.
    fn hold_file(&mut self, message: &Message) {
        if message.kind != MessageKind::File {
            return;
        }
        self.files
            .entry(message.seq)
            .or_insert_with(|| SpooledFile {
                session: message.session.clone(),
                file_id: message.id,
                copies: 0,
            })
            .copies += 1;
    }

    /// A subscriber acknowledged its copy of message `seq`.
    fn acked(&mut self, seq: u64) {
        if let Some(left) = self.unacked.get_mut(&seq) {
            *left = left.saturating_sub(1);
        }
    }

    /// A copy of a file is done with; the last one lets its spool file go.
    fn release_file(&mut self, message: &Message) {
        if message.kind == MessageKind::File {
            self.release_file_seq(message.seq);
        }
    }

    /// A copy of file `seq` is done with.
    fn release_file_seq(&mut self, seq: u64) {
        let Some(file) = self.files.get_mut(&seq) else {
            return;
        };
        file.copies = file.copies.saturating_sub(1);
        if file.copies == 0
            && let Some(file) = self.files.remove(&seq)
        {
            self.outputs.push_back(Output::DropSpool {
                session: file.session,
                file_id: file.file_id,
            });
        }
    }

    fn next_token(&mut self) -> u64 {
        self.token += 1;
        self.token
    }

    fn send(&mut self, conn: ConnId, event: Event) {
        self.outputs.push_back(Output::Send { conn, event });
    }
}

/// An answer held back until its batch is committed.
#[derive(Debug)]
enum Waiter {
    PubAck {
        conn: ConnId,
        session: SessionName,
        seq: u64,
        message_id: MessageId,
        timestamp_ms: Millis,
        status: PubAckStatus,
    },
    Subscribed {
        conn: ConnId,
        request_id: u64,
        key: SubscriptionKey,
    },
}

/// A client's subscription to one filter, in one session.
type SubscriptionKey = (SessionName, ClientId, TopicFilter);

/// A durable subscription written to the store and not yet committed.
///
/// If its batch fails, the `Subscribe` is refused and its change undone: else the
/// client's retry would find the filter durable already, and be answered at once with
/// nothing stored. A `Subscribe` of the filter while it is uncommitted (a client
/// resending, or reconnecting) writes it again and waits too, and the last of them
/// to settle decides.
#[derive(Debug, Clone, Copy)]
struct Uncommitted {
    /// `Subscribe`s of it whose batch has not settled.
    waiting: u32,
    /// The batch in which the filter last became durable: a commit of an earlier
    /// one (whose record a later batch may have deleted) says nothing of it.
    since: u64,
    /// A batch from `since` on committed: the subscription is stored.
    stored: bool,
    /// What the filter was before it became durable: absent, or connection-bound
    /// (for `owner`, the connection that made it durable, alone).
    previous: Option<SubOpts>,
    owner: ConnId,
}

#[derive(Debug)]
struct ConnState {
    session: SessionName,
    client_id: ClientId,
    anonymous: bool,
    legacy_only: bool,
}

/// The broker state machine. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    sessions: FastMap<SessionName, Session>,
    conns: FastMap<ConnId, ConnState>,
    fx: Effects,
    /// Id of the batch being filled.
    batch_id: u64,
    /// Answers waiting for the batch they depend on, in batch order.
    waiters: VecDeque<(u64, Waiter)>,
    /// Durable subscriptions whose `Subscribe` waits for its batch.
    uncommitted: FastMap<SubscriptionKey, Uncommitted>,
    next_seq: u64,
    /// The subscribers a publish matched, kept between publishes so that routing one
    /// allocates no list (see `router.rs`).
    matched: Vec<(ClientId, bool)>,
}

impl Core {
    pub fn new(config: CoreConfig) -> Self {
        Self {
            config,
            sessions: FastMap::default(),
            conns: FastMap::default(),
            fx: Effects::default(),
            batch_id: 1,
            waiters: VecDeque::new(),
            uncommitted: FastMap::default(),
            next_seq: 1,
            matched: Vec::new(),
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Loads what survived the last run: sessions, durable subscriptions (whose queues
    /// start filling again at once) and the replay ids still inside their window.
    pub fn restore(&mut self, restore: Restore) {
        for settings in restore.sessions {
            self.upsert_session(settings);
        }
        for RestoredSubscription {
            session,
            client_id,
            filter,
            legacy_only,
        } in restore.subscriptions
        {
            let Some(s) = self.sessions.get_mut(&session) else {
                continue;
            };
            let sub = s.subscribers.entry(client_id.clone()).or_insert_with(|| {
                let mut sub = Subscriber::new(client_id.clone());
                sub.legacy_only = legacy_only;
                sub
            });
            // The rows agree (`SetLegacyOnly` keeps them so). Where they do not (rows
            // from before the mark was kept), the client is legacy only if every row
            // says so: native messages are kept rather than withheld, and a legacy
            // connection drops what it cannot read.
            sub.legacy_only &= legacy_only;
            let opts = SubOpts {
                durable: true,
                presence: false,
            };
            sub.filters.insert(filter.clone(), opts);
            s.tree.insert(&filter, (client_id, true));
        }
        for (session, id, expires_at) in restore.replay_ids {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.replay.remember(id, expires_at);
            }
        }
        self.next_seq = self.next_seq.max(restore.next_seq);
        for file in restore.files {
            self.fx.files.insert(
                file.seq,
                SpooledFile {
                    session: file.session,
                    file_id: file.file_id,
                    copies: file.copies,
                },
            );
        }
    }

    /// Each session's message expiry, which also bounds how long its spooled files
    /// are kept.
    pub fn session_expiries(&self) -> std::collections::HashMap<String, u64> {
        self.sessions
            .iter()
            .map(|(name, s)| (name.as_str().to_owned(), s.settings.message_expiry_ms))
            .collect()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            sessions: self.sessions.len(),
            connections: self.conns.len(),
            subscribers: self.sessions.values().map(|s| s.subscribers.len()).sum(),
        }
    }

    fn upsert_session(&mut self, mut settings: SessionSettings) -> &mut Session {
        settings.max_payload_bytes = settings
            .max_payload_bytes
            .min(self.config.max_payload_bytes);
        let window = self.config.replay_window_ms;
        let capacity = self.config.replay_capacity;
        let session = self
            .sessions
            .entry(settings.name.clone())
            .or_insert_with(|| Session::new(settings.clone(), ReplayGuard::new(window, capacity)));
        session.settings = settings;
        session
    }

    /// Handles one command from a carrier.
    pub fn handle(&mut self, now: Millis, command: Command) {
        match command {
            Command::Hello(hello) => self.hello(now, hello),
            Command::Subscribe {
                conn,
                request_id,
                filter,
                durable,
                presence,
                history,
            } => {
                let opts = SubOpts { durable, presence };
                self.subscribe(now, conn, request_id, filter, opts, history)
            }
            Command::Unsubscribe {
                conn,
                request_id,
                filter,
            } => self.unsubscribe(now, conn, request_id, filter),
            Command::Publish { conn, publish } => self.publish(now, conn, publish),
            Command::Ack { conn, message_id } => self.ack(now, conn, message_id),
            Command::PublishKey {
                conn,
                request_id,
                public_key,
            } => self.publish_key(conn, request_id, public_key),
            Command::GetKeys { conn, request_id } => self.get_keys(conn, request_id),
            Command::Disconnected { conn } => self.disconnect(conn),
            Command::FileStreamed { conn, file_id } => self.file_streamed(now, conn, file_id),
            Command::SessionUpdated(settings) => self.session_updated(settings),
        }
    }

    fn hello(&mut self, now: Millis, h: Hello) {
        if h.settings.suspended {
            self.fx.outputs.push_back(Output::Close {
                conn: h.conn,
                reject: Reject::SessionSuspended,
            });
            return;
        }
        let name = h.settings.name.clone();
        self.upsert_session(h.settings);
        let full = self.sessions.get(&name).is_some_and(|s| {
            !s.clients.contains_key(&h.client_id)
                && s.clients.len() >= self.config.max_session_clients
        });
        if full {
            self.fx.outputs.push_back(Output::Close {
                conn: h.conn,
                reject: Reject::LimitExceeded(
                    "the session has as many clients connected as it may",
                ),
            });
            return;
        }

        // A second connection with the same client id takes over.
        let previous = self
            .sessions
            .get(&name)
            .and_then(|s| s.clients.get(&h.client_id))
            .copied();
        if let Some(old) = previous {
            self.fx.outputs.push_back(Output::Close {
                conn: old,
                reject: Reject::TakenOver,
            });
            self.disconnect(old);
        }

        let Some(session) = self.sessions.get_mut(&name) else {
            return;
        };
        if h.clean && !h.anonymous {
            if let Some(sub) = session.subscribers.remove(&h.client_id) {
                for (filter, opts) in &sub.filters {
                    session
                        .tree
                        .remove(filter, &(h.client_id.clone(), opts.durable));
                }
            }
            self.fx.ops.push(StoreOp::DeleteClient {
                session: name.clone(),
                client_id: h.client_id.clone(),
            });
        }
        self.conns.insert(
            h.conn,
            ConnState {
                session: name.clone(),
                client_id: h.client_id.clone(),
                anonymous: h.anonymous,
                legacy_only: h.legacy_only,
            },
        );
        session.clients.insert(h.client_id.clone(), h.conn);
        self.fx.send(
            h.conn,
            Event::Welcome(Box::new(Welcome {
                connection_id: h.connection_id,
                settings: session.settings.clone(),
                replay_window_ms: self.config.replay_window_ms,
                server_time_ms: now,
            })),
        );
        // Durable subscriptions resume without a new Subscribe; the backlog starts.
        if let Some(sub) = session.subscribers.get_mut(&h.client_id) {
            let mut ctx = Ctx {
                settings: &session.settings,
                limits: &self.config.limits,
                fx: &mut self.fx,
            };
            sub.attach(h.conn, h.legacy_only, now, &mut ctx);
            let filters: Vec<TopicFilter> = sub.filters.keys().cloned().collect();
            for filter in filters {
                Self::announce(
                    session,
                    &mut self.fx,
                    &filter,
                    &h.client_id,
                    PresenceEvent::Joined,
                );
            }
        }
    }

    fn subscribe(
        &mut self,
        now: Millis,
        conn: ConnId,
        request_id: u64,
        filter: TopicFilter,
        opts: SubOpts,
        history: u32,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return self.refuse(conn, request_id, Reject::NotAuthenticated);
        };
        if opts.durable && c.anonymous {
            let why = "durable subscriptions need a client_id in Hello".to_owned();
            return self.refuse(conn, request_id, Reject::InvalidFrame(why));
        }
        let client_id = c.client_id.clone();
        let legacy_only = c.legacy_only;
        let Some(session) = self.sessions.get_mut(&c.session) else {
            return self.refuse(conn, request_id, Reject::Internal("session vanished"));
        };
        if !session.subscribers.contains_key(&client_id)
            && session.subscribers.len() >= self.config.max_session_clients
        {
            let reject = Reject::LimitExceeded(
                "the session has as many subscribed clients as it may (durable ones count \
                 while offline)",
            );
            return self.refuse(conn, request_id, reject);
        }
        let sub = session
            .subscribers
            .entry(client_id.clone())
            .or_insert_with(|| {
                let mut sub = Subscriber::new(client_id.clone());
                sub.conn = Some(conn);
                sub.legacy_only = legacy_only;
                sub
            });
        if !sub.filters.contains_key(&filter) && sub.filters.len() >= self.config.max_subscriptions
        {
            let reject = Reject::LimitExceeded("the client holds as many subscriptions as it may");
            return self.refuse(conn, request_id, reject);
        }
        let previous = sub.filters.insert(filter.clone(), opts);
        let was_durable = previous.is_some_and(|p| p.durable);
        if previous.is_some_and(|p| p.durable != opts.durable) {
            session
                .tree
                .remove(&filter, &(client_id.clone(), was_durable));
        }
        session
            .tree
            .insert(&filter, (client_id.clone(), opts.durable));

        session.watch_presence(&filter, &client_id, opts.presence);
        if previous.is_none() {
            Self::announce(
                session,
                &mut self.fx,
                &filter,
                &client_id,
                PresenceEvent::Joined,
            );
        }

        // Retained messages first, in accept order, then live traffic.
        let limit = history.min(session.settings.history_size) as usize;
        if limit > 0 {
            let retained = session.retained(&filter, limit, now);
            if let Some(sub) = session.subscribers.get_mut(&client_id) {
                let mut ctx = Ctx {
                    settings: &session.settings,
                    limits: &self.config.limits,
                    fx: &mut self.fx,
                };
                for message in retained {
                    if !sub.reads(message.format) {
                        continue;
                    }
                    let copy = delivery::Copy {
                        message,
                        durable: false,
                        persisted: false,
                        attempts: 0,
                        counted: false,
                    };
                    sub.offer(copy, now, &mut ctx);
                }
            }
        }

        let name = session.settings.name.clone();
        if opts.durable {
            let key = (name, client_id, filter);
            if was_durable && !self.uncommitted.contains_key(&key) {
                // Stored already.
                return self.fx.send(conn, Event::Subscribed { request_id });
            }
            let (name, client_id, filter) = key.clone();
            self.fx.ops.push(StoreOp::PutSubscription {
                session: name,
                client_id,
                filter,
                legacy_only,
            });
            let made_durable = Uncommitted {
                waiting: 0,
                since: self.batch_id,
                stored: false,
                previous,
                owner: conn,
            };
            let pending = self.uncommitted.entry(key.clone()).or_insert(made_durable);
            if !was_durable {
                // Made durable again since an earlier one (after a `Subscribe` that
                // made it connection-bound, or an `Unsubscribe`, both answered).
                *pending = Uncommitted {
                    waiting: pending.waiting,
                    ..made_durable
                };
            }
            pending.waiting += 1;
            // Answered once the subscription is durable.
            self.waiters.push_back((
                self.batch_id,
                Waiter::Subscribed {
                    conn,
                    request_id,
                    key,
                },
            ));
            return;
        }
        if was_durable {
            self.fx.ops.push(StoreOp::DeleteSubscription {
                session: name,
                client_id: client_id.clone(),
                filter,
            });
            if let Some(sub) = session.subscribers.get_mut(&client_id) {
                sub.durable_rows_outlive_filters = true;
            }
        }
        self.fx.send(conn, Event::Subscribed { request_id });
    }

    fn unsubscribe(&mut self, now: Millis, conn: ConnId, request_id: u64, filter: TopicFilter) {
        let Some(c) = self.conns.get(&conn) else {
            return self.refuse(conn, request_id, Reject::NotAuthenticated);
        };
        let client_id = c.client_id.clone();
        if let Some(session) = self.sessions.get_mut(&c.session) {
            Self::drop_filter(
                session,
                &mut self.fx,
                &self.config.limits,
                &client_id,
                &filter,
                now,
            );
        }
        self.fx.send(conn, Event::Unsubscribed { request_id });
    }

    /// Removes one subscription of a client, with its durable record, its presence
    /// watch and the copies nothing else wants.
    fn drop_filter(
        session: &mut Session,
        fx: &mut Effects,
        limits: &Limits,
        client_id: &ClientId,
        filter: &TopicFilter,
        now: Millis,
    ) {
        let Some(sub) = session.subscribers.get_mut(client_id) else {
            return;
        };
        let Some(opts) = sub.filters.remove(filter) else {
            return;
        };
        session
            .tree
            .remove(filter, &(client_id.clone(), opts.durable));
        if opts.durable {
            fx.ops.push(StoreOp::DeleteSubscription {
                session: session.settings.name.clone(),
                client_id: client_id.clone(),
                filter: filter.clone(),
            });
            // Its durable copies that a connection-bound filter also matched stay
            // for that filter, as long as it lasts.
            if sub.filters.values().any(|o| !o.durable) {
                sub.durable_rows_outlive_filters = true;
            }
        }
        let mut ctx = Ctx {
            settings: &session.settings,
            limits,
            fx,
        };
        sub.discard_unwanted(now, &mut ctx);
        let connected = sub.conn.is_some();
        if !connected && sub.filters.is_empty() {
            // As a disconnect would have.
            session.subscribers.remove(client_id);
        }
        session.watch_presence(filter, client_id, false);
        // An offline client was announced as gone when it disconnected.
        if connected {
            Self::announce(session, fx, filter, client_id, PresenceEvent::Left);
        }
    }

    /// Tells the presence watchers of `filter` (but not `who` itself) about `who`.
    fn announce(
        session: &Session,
        fx: &mut Effects,
        filter: &TopicFilter,
        who: &ClientId,
        event: PresenceEvent,
    ) {
        let Some(watchers) = session.presence.get(filter) else {
            return;
        };
        for w in watchers.iter().filter(|w| *w != who) {
            if let Some(sub) = session.subscribers.get(w) {
                sub.notify_presence(filter, who, event, fx);
            }
        }
    }

    fn ack(&mut self, now: Millis, conn: ConnId, message_id: MessageId) {
        if !self.conns.contains_key(&conn) {
            return self.refuse(conn, 0, Reject::NotAuthenticated);
        }
        self.with_subscriber(conn, |sub, ctx| sub.ack(&message_id, now, ctx));
    }

    fn file_streamed(&mut self, now: Millis, conn: ConnId, file_id: MessageId) {
        self.with_subscriber(conn, |sub, ctx| sub.file_streamed(&file_id, now, ctx));
    }

    /// Runs `f` on the subscriber that `conn` is the connection of, if any.
    fn with_subscriber(&mut self, conn: ConnId, f: impl FnOnce(&mut Subscriber, &mut Ctx)) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&c.session) else {
            return;
        };
        let Some(sub) = session.subscribers.get_mut(&c.client_id) else {
            return;
        };
        if sub.conn != Some(conn) {
            return;
        }
        let mut ctx = Ctx {
            settings: &session.settings,
            limits: &self.config.limits,
            fx: &mut self.fx,
        };
        f(sub, &mut ctx);
    }

    fn publish_key(&mut self, conn: ConnId, request_id: u64, public_key: Bytes) {
        let Some(c) = self.conns.get(&conn) else {
            return self.refuse(conn, request_id, Reject::NotAuthenticated);
        };
        if public_key.len() != 32 {
            let why = format!(
                "public_key must be 32 bytes (X25519), got {}",
                public_key.len()
            );
            return self.refuse(conn, request_id, Reject::InvalidFrame(why));
        }
        let client_id = c.client_id.clone();
        let Some(session) = self.sessions.get_mut(&c.session) else {
            return;
        };
        if !session.has_key(&client_id) && session.key_count() >= self.config.max_keys {
            let reject = Reject::LimitExceeded("the session's key directory is full");
            return self.refuse(conn, request_id, reject);
        }
        session.set_key(client_id, public_key);
        self.get_keys(conn, request_id);
    }

    fn get_keys(&mut self, conn: ConnId, request_id: u64) {
        let Some(c) = self.conns.get(&conn) else {
            return self.refuse(conn, request_id, Reject::NotAuthenticated);
        };
        let Some(session) = self.sessions.get_mut(&c.session) else {
            return;
        };
        let keys = session.key_directory();
        self.fx.send(conn, Event::Keys { request_id, keys });
    }

    /// The connection is gone (or was taken over). Connection-bound subscriptions end
    /// with it; durable ones keep queuing.
    fn disconnect(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&c.session) else {
            return;
        };
        if session.clients.get(&c.client_id) == Some(&conn) {
            session.clients.remove(&c.client_id);
        }
        if c.anonymous {
            session.remove_key(&c.client_id);
        }
        let Some(sub) = session.subscribers.get_mut(&c.client_id) else {
            return;
        };
        if sub.conn != Some(conn) {
            return;
        }
        let mut ctx = Ctx {
            settings: &session.settings,
            limits: &self.config.limits,
            fx: &mut self.fx,
        };
        sub.detach(&mut ctx);
        let filters: Vec<(TopicFilter, SubOpts)> =
            sub.filters.iter().map(|(f, o)| (f.clone(), *o)).collect();
        for (filter, opts) in filters {
            if !opts.durable {
                if let Some(sub) = session.subscribers.get_mut(&c.client_id) {
                    sub.filters.remove(&filter);
                }
                session.tree.remove(&filter, &(c.client_id.clone(), false));
            }
            session.watch_presence(&filter, &c.client_id, false);
            Self::announce(
                session,
                &mut self.fx,
                &filter,
                &c.client_id,
                PresenceEvent::Left,
            );
        }
        if let Some(sub) = session.subscribers.get_mut(&c.client_id) {
            let mut ctx = Ctx {
                settings: &session.settings,
                limits: &self.config.limits,
                fx: &mut self.fx,
            };
            sub.discard_outlived_rows(&mut ctx);
        }
        if session
            .subscribers
            .get(&c.client_id)
            .is_some_and(|s| s.filters.is_empty())
        {
            session.subscribers.remove(&c.client_id);
        }
    }

    fn session_updated(&mut self, settings: SessionSettings) {
        let name = settings.name.clone();
        let suspended = settings.suspended;
        self.upsert_session(settings);
        if suspended {
            let conns: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.session == name)
                .map(|(id, _)| *id)
                .collect();
            for conn in conns {
                self.fx.outputs.push_back(Output::Close {
                    conn,
                    reject: Reject::SessionSuspended,
                });
                self.disconnect(conn);
            }
        }
    }

    fn refuse(&mut self, conn: ConnId, request_id: u64, reject: Reject) {
        self.fx.send(conn, Event::error(reject, request_id, None));
    }

    fn refuse_publish(&mut self, conn: ConnId, message_id: MessageId, reject: Reject) {
        self.fx
            .send(conn, Event::error(reject, 0, Some(message_id)));
    }

    /// Processes every retry deadline that has passed.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(&(deadline, conn)) = self.fx.timers.first() {
            if deadline > now {
                break;
            }
            self.fx.timers.pop_first();
            self.with_subscriber(conn, |sub, ctx| sub.on_timer(now, ctx));
        }
    }

    /// Every batch up to and including `batch_id` is durable: release their answers,
    /// and count off the file copies the store dropped with them (`dropped_files`,
    /// see [`crate::store::Committed`]).
    pub fn handle_committed(&mut self, batch_id: u64, dropped_files: &[u64]) {
        for seq in dropped_files {
            self.fx.release_file_seq(*seq);
        }
        while let Some((id, _)) = self.waiters.front() {
            if *id > batch_id {
                break;
            }
            let Some((id, waiter)) = self.waiters.pop_front() else {
                break;
            };
            match waiter {
                Waiter::PubAck {
                    conn,
                    seq,
                    message_id,
                    status,
                    ..
                } => {
                    let status = match self.fx.unacked.remove(&seq) {
                        Some(0) => PubAckStatus::Delivered,
                        _ => status,
                    };
                    self.fx.send(conn, Event::PubAck { message_id, status })
                }
                Waiter::Subscribed {
                    conn,
                    request_id,
                    key,
                } => {
                    if let Some(pending) = self.uncommitted.get_mut(&key) {
                        pending.waiting -= 1;
                        pending.stored |= id >= pending.since;
                        if pending.waiting == 0 {
                            self.uncommitted.remove(&key);
                        }
                    }
                    self.fx.send(conn, Event::Subscribed { request_id })
                }
            }
        }
    }

    /// Batch `batch_id` could not be committed: its publishes are refused (and their
    /// ids forgotten, so a retry is not taken for a replay), and so are its durable
    /// subscriptions (and undone, so a retry stores them).
    pub fn handle_commit_failed(&mut self, now: Millis, batch_id: u64) {
        while let Some((id, _)) = self.waiters.front() {
            if *id > batch_id {
                break;
            }
            let Some((_, waiter)) = self.waiters.pop_front() else {
                break;
            };
            let reject = Reject::Internal("the store could not commit; retry");
            match waiter {
                Waiter::PubAck {
                    conn,
                    session,
                    seq,
                    message_id,
                    timestamp_ms,
                    ..
                } => {
                    self.fx.unacked.remove(&seq);
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.replay.forget(&message_id, timestamp_ms);
                    }
                    self.refuse_publish(conn, message_id, reject);
                }
                Waiter::Subscribed {
                    conn,
                    request_id,
                    key,
                } => {
                    self.subscribe_failed(now, &key);
                    self.refuse(conn, request_id, reject);
                }
            }
        }
    }

    /// A durable `Subscribe` was not committed. Unless another of the filter is
    /// still waiting, or one was stored, the filter goes back to what it was: gone,
    /// or connection-bound while the connection that made it durable is the
    /// client's. If that connection is gone, the filter goes altogether, as it
    /// would have gone with the connection.
    fn subscribe_failed(&mut self, now: Millis, key: &SubscriptionKey) {
        let Some(pending) = self.uncommitted.get_mut(key) else {
            return;
        };
        pending.waiting -= 1;
        if pending.waiting > 0 {
            return;
        }
        let Some(pending) = self.uncommitted.remove(key) else {
            return;
        };
        let (session, client_id, filter) = key;
        let Some(session) = self.sessions.get_mut(session) else {
            return;
        };
        let Some(sub) = session.subscribers.get_mut(client_id) else {
            return;
        };
        // Made connection-bound or unsubscribed since: nothing is left to undo.
        if pending.stored || !sub.filters.get(filter).is_some_and(|o| o.durable) {
            return;
        }
        let previous = pending.previous.filter(|_| sub.conn == Some(pending.owner));
        let Some(previous) = previous else {
            return Self::drop_filter(
                session,
                &mut self.fx,
                &self.config.limits,
                client_id,
                filter,
                now,
            );
        };
        sub.filters.insert(filter.clone(), previous);
        sub.durable_rows_outlive_filters = true;
        session.tree.remove(filter, &(client_id.clone(), true));
        session.tree.insert(filter, (client_id.clone(), false));
        session.watch_presence(filter, client_id, previous.presence);
        // The failed batch may have held the removal of an earlier durable record.
        self.fx.ops.push(StoreOp::DeleteSubscription {
            session: session.settings.name.clone(),
            client_id: client_id.clone(),
            filter: filter.clone(),
        });
    }

    /// The answer to a [`BacklogRequest`].
    pub fn handle_backlog(
        &mut self,
        now: Millis,
        request: &BacklogRequest,
        rows: Vec<StoredCopy>,
        exhausted: bool,
    ) {
        let Some(session) = self.sessions.get_mut(&request.session) else {
            return;
        };
        let Some(sub) = session.subscribers.get_mut(&request.client_id) else {
            return;
        };
        let mut ctx = Ctx {
            settings: &session.settings,
            limits: &self.config.limits,
            fx: &mut self.fx,
        };
        sub.backlog_loaded(request.token, rows, exhausted, now, &mut ctx);
    }

    /// The next thing to send to a connection.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.fx.outputs.pop_front()
    }

    /// The writes gathered since the last call, if any (or if answers wait on them).
    pub fn take_batch(&mut self) -> Option<StoreBatch> {
        let waiting = self
            .waiters
            .back()
            .is_some_and(|(id, _)| *id == self.batch_id);
        if self.fx.ops.is_empty() && !waiting {
            return None;
        }
        let batch = StoreBatch {
            id: self.batch_id,
            ops: std::mem::take(&mut self.fx.ops),
        };
        self.batch_id += 1;
        Some(batch)
    }

    /// Backlog pages to read, to be run after the batches already taken.
    pub fn take_loads(&mut self) -> Vec<BacklogRequest> {
        std::mem::take(&mut self.fx.loads)
    }

    /// The batch that the writes made now will be committed in.
    pub fn current_batch(&self) -> u64 {
        self.batch_id
    }

    /// When [`Core::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.fx.timers.first().map(|(t, _)| *t)
    }
}
