//! Sessions (tenants): their settings and the isolated state each one owns.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::command::Message;
use super::delivery::Subscriber;
use super::replay::ReplayGuard;
use super::topic::{TopicFilter, TopicName, TopicTree};
use super::types::{ClientId, ConnId, FastMap, FastSet, MessageId, SessionName};

/// Defaults of the seeds' `createSession`.
pub const DEFAULT_RETRY_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_MAX_RETRIES: u32 = 100;
pub const DEFAULT_MESSAGE_EXPIRY_MS: u64 = 3_600_000;
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 10 * 1024 * 1024;

/// Bounds that keep a tenant from hurting the broker.
pub const RETRY_INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 100..=86_400_000;
pub const MAX_RETRIES_LIMIT: u32 = 10_000;
pub const MESSAGE_EXPIRY_RANGE: std::ops::RangeInclusive<u64> = 1_000..=30 * 86_400_000;
pub const MAX_HISTORY_SIZE: u32 = 1_000;
/// Topics with retained messages per session; past this, new topics retain nothing.
pub const MAX_HISTORY_TOPICS: usize = 10_000;

/// A session's settings: what `createSession` sets and `Welcome` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    pub name: SessionName,
    /// Wait this long for an `Ack` before redelivering.
    pub retry_interval_ms: u64,
    /// Redeliveries after the first delivery.
    pub max_retries: u32,
    /// Drop unacknowledged copies this long after acceptance.
    pub message_expiry_ms: u64,
    /// Largest payload accepted.
    pub max_payload_bytes: u64,
    /// Messages kept per topic for `Subscribe.history`.
    pub history_size: u32,
    /// An administrator suspended it: every connection is refused.
    pub suspended: bool,
}

impl SessionSettings {
    /// Settings with the seeds' defaults.
    pub fn new(name: SessionName) -> Self {
        Self {
            name,
            retry_interval_ms: DEFAULT_RETRY_INTERVAL_MS,
            max_retries: DEFAULT_MAX_RETRIES,
            message_expiry_ms: DEFAULT_MESSAGE_EXPIRY_MS,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            history_size: 0,
            suspended: false,
        }
    }

    /// The last attempt a copy may reach: the first delivery plus every retry.
    pub fn max_attempts(&self) -> u32 {
        self.max_retries.saturating_add(1)
    }
}

/// Presence options and durability of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOpts {
    pub durable: bool,
    pub presence: bool,
}

/// The runtime state of one session. Nothing in it is reachable from another session.
#[derive(Debug)]
pub struct Session {
    pub settings: SessionSettings,
    /// filter → (client, durable). One entry per (filter, client).
    pub tree: TopicTree<(ClientId, bool)>,
    pub subscribers: FastMap<ClientId, Subscriber>,
    /// Who is connected, by client id (a second connection takes over).
    pub clients: FastMap<ClientId, ConnId>,
    pub replay: ReplayGuard,
    /// Files being uploaded: their ids are held in `replay` until the file is accepted
    /// or its upload given up (see `core::files`).
    pub uploading: FastSet<MessageId>,
    /// Filters that somebody watches for presence → who watches.
    pub presence: BTreeMap<TopicFilter, Vec<ClientId>>,
    /// The X25519 key directory.
    pub keys: BTreeMap<ClientId, Bytes>,
    /// The last `history_size` messages of each topic (in memory only).
    pub history: FastMap<TopicName, VecDeque<Arc<Message>>>,
}

impl Session {
    pub fn new(settings: SessionSettings, replay: ReplayGuard) -> Self {
        Self {
            settings,
            tree: TopicTree::default(),
            subscribers: FastMap::default(),
            clients: FastMap::default(),
            replay,
            uploading: FastSet::default(),
            presence: BTreeMap::new(),
            keys: BTreeMap::new(),
            history: FastMap::default(),
        }
    }

    /// Fills `matched` with the subscribers whose filters match `topic`: one entry each
    /// however many of its filters match, durable if any matching subscription is.
    pub fn match_subscribers(&self, topic: &TopicName, matched: &mut Vec<(ClientId, bool)>) {
        self.tree.for_each_match(topic, |(client, durable)| {
            matched.push((client.clone(), *durable))
        });
        matched.sort_unstable();
        matched.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            kept.1 |= same && later.1;
            same
        });
    }

    /// Keeps `message` as the newest retained message of its topic.
    pub fn retain(&mut self, message: &Arc<Message>) {
        let size = self.settings.history_size as usize;
        if size == 0 {
            return;
        }
        if !self.history.contains_key(&message.topic) && self.history.len() >= MAX_HISTORY_TOPICS {
            return;
        }
        let kept = self.history.entry(message.topic.clone()).or_default();
        kept.push_back(message.clone());
        while kept.len() > size {
            kept.pop_front();
        }
    }

    /// Up to `limit` retained messages matching `filter`, unexpired at `now`, oldest
    /// first (the newest `limit` of them).
    pub fn retained(&self, filter: &TopicFilter, limit: usize, now: u64) -> Vec<Arc<Message>> {
        let mut found: Vec<Arc<Message>> = self
            .history
            .iter()
            .filter(|(topic, _)| filter.matches(topic))
            .flat_map(|(_, kept)| kept.iter())
            .filter(|m| m.expires_at > now)
            .cloned()
            .collect();
        found.sort_unstable_by_key(|m| m.seq);
        let skip = found.len().saturating_sub(limit);
        found.split_off(skip)
    }
}
