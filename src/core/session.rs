//! Sessions (tenants): their settings and the isolated state each one owns.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::command::Message;
use super::delivery::Subscriber;
use super::replay::ReplayGuard;
use super::topic::{TopicFilter, TopicName, TopicTree};
use super::types::{ClientId, ConnId, FastMap, FastSet, MessageId, Millis, SessionName};

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
/// Payload bytes and messages one session retains in all; past either, its oldest
/// retained messages go first (`historySize` counts per topic, so without these a
/// session could hold 10,000 topics × 1,000 messages × 10 MiB).
pub const MAX_HISTORY_BYTES: usize = 64 * 1024 * 1024;
pub const MAX_HISTORY_MESSAGES: usize = 100_000;

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
    keys: BTreeMap<ClientId, Bytes>,
    /// `keys` as last answered, until it changes.
    keys_answer: Option<Arc<[(ClientId, Bytes)]>>,
    /// The last `history_size` messages of each topic (in memory only).
    pub history: FastMap<TopicName, VecDeque<Arc<Message>>>,
    /// Every retained message's topic, by accept order: the oldest to drop.
    history_order: BTreeMap<u64, TopicName>,
    /// Payload bytes retained.
    history_bytes: usize,
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
            keys_answer: None,
            history: FastMap::default(),
            history_order: BTreeMap::new(),
            history_bytes: 0,
        }
    }

    /// Adds `client` to the presence watchers of `filter`, or takes it off.
    pub fn watch_presence(&mut self, filter: &TopicFilter, client: &ClientId, watch: bool) {
        if watch {
            let watchers = self.presence.entry(filter.clone()).or_default();
            if !watchers.contains(client) {
                watchers.push(client.clone());
            }
        } else if let Some(watchers) = self.presence.get_mut(filter) {
            watchers.retain(|w| w != client);
            if watchers.is_empty() {
                self.presence.remove(filter);
            }
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

    /// How many clients have a key in the directory.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn has_key(&self, client: &ClientId) -> bool {
        self.keys.contains_key(client)
    }

    pub fn set_key(&mut self, client: ClientId, key: Bytes) {
        self.keys.insert(client, key);
        self.keys_answer = None;
    }

    pub fn remove_key(&mut self, client: &ClientId) {
        if self.keys.remove(client).is_some() {
            self.keys_answer = None;
        }
    }

    /// The key directory, as one shared answer.
    pub fn key_directory(&mut self) -> Arc<[(ClientId, Bytes)]> {
        let keys = &self.keys;
        self.keys_answer
            .get_or_insert_with(|| keys.iter().map(|(c, k)| (c.clone(), k.clone())).collect())
            .clone()
    }

    /// Keeps `message` as the newest retained message of its topic, dropping what has
    /// expired by `now` and, past the session's bounds, the oldest.
    pub fn retain(&mut self, message: &Arc<Message>, now: Millis) {
        // Expiry follows accept order within a session: the expired are the oldest.
        while let Some(oldest) = self.oldest_retained() {
            if oldest.expires_at > now {
                break;
            }
            self.drop_oldest_retained();
        }
        let size = self.settings.history_size as usize;
        if size == 0 {
            return;
        }
        if !self.history.contains_key(&message.topic) && self.history.len() >= MAX_HISTORY_TOPICS {
            return;
        }
        let kept = self.history.entry(message.topic.clone()).or_default();
        kept.push_back(message.clone());
        self.history_order
            .insert(message.seq, message.topic.clone());
        self.history_bytes += message.payload.len();
        // More than one when the session's historySize was lowered.
        while kept.len() > size {
            let Some(dropped) = kept.pop_front() else {
                break;
            };
            self.history_order.remove(&dropped.seq);
            self.history_bytes -= dropped.payload.len();
        }
        while self.history_bytes > MAX_HISTORY_BYTES
            || self.history_order.len() > MAX_HISTORY_MESSAGES
        {
            if !self.drop_oldest_retained() {
                break;
            }
        }
    }

    /// The session's oldest retained message.
    fn oldest_retained(&self) -> Option<&Arc<Message>> {
        let (_, topic) = self.history_order.first_key_value()?;
        self.history.get(topic)?.front()
    }

    /// Drops the session's oldest retained message (the first of its topic's); false
    /// if there is none.
    fn drop_oldest_retained(&mut self) -> bool {
        let Some((_, topic)) = self.history_order.pop_first() else {
            return false;
        };
        if let Some(kept) = self.history.get_mut(&topic) {
            if let Some(dropped) = kept.pop_front() {
                self.history_bytes -= dropped.payload.len();
            }
            if kept.is_empty() {
                self.history.remove(&topic);
            }
        }
        true
    }

    /// Up to `limit` retained messages matching `filter`, unexpired at `now`, oldest
    /// first (the newest `limit` of them). It reads at most `limit` of each topic.
    pub fn retained(&self, filter: &TopicFilter, limit: usize, now: u64) -> Vec<Arc<Message>> {
        let mut found: Vec<Arc<Message>> = self
            .history
            .iter()
            .filter(|(topic, _)| filter.matches(topic))
            .flat_map(|(_, kept)| kept.iter().rev().take(limit))
            .filter(|m| m.expires_at > now)
            .cloned()
            .collect();
        found.sort_unstable_by_key(|m| m.seq);
        let skip = found.len().saturating_sub(limit);
        found.split_off(skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::command::MessageKind;
    use crate::proto::PayloadFormat;

    const EXPIRY: Millis = 60_000;

    fn session(history_size: u32) -> Session {
        let mut settings = SessionSettings::new(SessionName::parse("s").expect("name"));
        settings.history_size = history_size;
        settings.message_expiry_ms = EXPIRY;
        Session::new(settings, ReplayGuard::new(30_000, 100))
    }

    fn message(seq: u64, topic: &str, len: usize, now: Millis) -> Arc<Message> {
        Arc::new(Message {
            session: SessionName::parse("s").expect("name"),
            id: MessageId([0; 16]),
            seq,
            topic: TopicName::parse(topic).expect("topic"),
            payload: Bytes::from(vec![0; len]),
            timestamp_ms: now,
            format: PayloadFormat::NativeV1,
            kind: MessageKind::Message,
            accepted_at: now,
            expires_at: now + EXPIRY,
        })
    }

    fn all(s: &Session) -> Vec<u64> {
        let everything = TopicFilter::parse("#").expect("filter");
        s.retained(&everything, usize::MAX, 0)
            .iter()
            .map(|m| m.seq)
            .collect()
    }

    /// The session's bounds hold across topics, the oldest retained going first, and
    /// the byte count follows every way a message leaves.
    #[test]
    fn a_session_retains_at_most_its_bytes_oldest_first() {
        let mut s = session(MAX_HISTORY_SIZE);
        let big = MAX_HISTORY_BYTES / 4;
        for seq in 1..=4 {
            s.retain(&message(seq, &format!("t/{seq}"), big, 0), 0);
        }
        assert_eq!(all(&s), [1, 2, 3, 4]);
        s.retain(&message(5, "t/1", 1, 0), 0);
        assert_eq!(all(&s), [2, 3, 4, 5], "the oldest, of another topic, went");
        assert_eq!(s.history_bytes, 3 * big + 1);

        // historySize drops the topic's oldest, and the count follows.
        let mut s = session(1);
        s.retain(&message(1, "t", 10, 0), 0);
        s.retain(&message(2, "t", 20, 0), 0);
        assert_eq!((all(&s), s.history_bytes), (vec![2], 20));
    }

    #[test]
    fn a_session_retains_at_most_its_message_count() {
        let mut s = session(MAX_HISTORY_SIZE);
        let topics = MAX_HISTORY_MESSAGES as u64 / u64::from(MAX_HISTORY_SIZE) + 1;
        let mut seq = 0;
        for t in 0..topics {
            for _ in 0..MAX_HISTORY_SIZE {
                seq += 1;
                s.retain(&message(seq, &format!("t/{t}"), 1, 0), 0);
            }
        }
        let kept = all(&s);
        assert_eq!(kept.len(), MAX_HISTORY_MESSAGES);
        assert_eq!(kept.first(), Some(&(seq - MAX_HISTORY_MESSAGES as u64 + 1)));
        assert_eq!(
            s.history.len(),
            MAX_HISTORY_MESSAGES / MAX_HISTORY_SIZE as usize
        );
    }

    /// A lowered historySize trims a topic to it at its next message.
    #[test]
    fn a_lowered_history_size_trims_at_the_next_message() {
        let mut s = session(3);
        for seq in 1..=3 {
            s.retain(&message(seq, "t", 10, 0), 0);
        }
        s.settings.history_size = 1;
        s.retain(&message(4, "t", 5, 0), 0);
        assert_eq!((all(&s), s.history_bytes), (vec![4], 5));
        // Turned off: what is left goes as it expires.
        s.settings.history_size = 0;
        s.retain(&message(5, "t", 5, EXPIRY), EXPIRY);
        assert_eq!((all(&s), s.history_bytes), (vec![], 0));
    }

    /// Answers share one copy of the key directory until it changes.
    #[test]
    fn key_directory_answers_are_shared_until_it_changes() {
        let mut s = session(0);
        let alice = ClientId::parse("alice").expect("id");
        s.set_key(alice.clone(), Bytes::from_static(&[1; 32]));
        let first = s.key_directory();
        assert!(Arc::ptr_eq(&first, &s.key_directory()));
        s.set_key(
            ClientId::parse("bob").expect("id"),
            Bytes::from_static(&[2; 32]),
        );
        let second = s.key_directory();
        assert_eq!((first.len(), second.len()), (1, 2));
        s.remove_key(&alice);
        assert_eq!(s.key_directory().len(), 1);
        assert!(Arc::ptr_eq(&s.key_directory(), &s.key_directory()));
    }

    /// Expired messages are dropped as new ones come, not kept until pushed out.
    #[test]
    fn expired_messages_leave_when_the_next_is_retained() {
        let mut s = session(10);
        s.retain(&message(1, "a", 100, 0), 0);
        s.retain(&message(2, "b", 100, 10), 10);
        s.retain(&message(3, "c", 100, EXPIRY), EXPIRY);
        assert_eq!(all(&s), [2, 3]);
        assert_eq!(s.history_bytes, 200);
        assert!(
            !s.history
                .contains_key(&TopicName::parse("a").expect("topic"))
        );
    }
}
