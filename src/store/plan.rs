//! Nets out copy ops before they are written, and plans a commit into a few steps.
//!
//! SQL stores pay per row and per statement, and most copies are acknowledged soon
//! after they are queued. So copy ops are first gathered into a [`Net`]: a copy queued
//! and acknowledged within it is never written at all (nor its message body, if no
//! other copy needs it), attempts are folded into the insert, and what is left becomes
//! a few multi-row statements. A `Net` is built per commit (the barrier path) and,
//! incrementally, over every commit since the journal's last fold (`journal.rs`).
//!
//! Ops that change a whole client or subscription (`DeleteClient`, subscriptions,
//! `DeleteEphemeral`, `DiscardCopies`) are barriers: they are not netted, and copy ops
//! on either side of one land in separate nets, applied in order.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, btree_map};
use std::sync::Arc;

use crate::core::{ClientId, FastMap, Message, MessageId, Millis, SessionName, StoreOp};

/// A subscriber: its session and client id.
pub type SubKey = (SessionName, ClientId);

/// A copy queued within a [`Net`] and not acknowledged in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewCopy {
    pub ephemeral: bool,
    pub attempts: u32,
}

/// The net effect of a run of copy ops.
///
/// Grouped by subscriber (one hash of the two names per op, then integer keys), and
/// in seq order within one, so a subscriber's copies are a range.
#[derive(Debug, Default)]
pub struct Net {
    /// Bodies of messages whose copies were queued here, with how many of those copies
    /// are still queued (bodies of acknowledged copies are dropped with the last one).
    bodies: FastMap<u64, (Arc<Message>, usize)>,
    subscribers: FastMap<SubKey, SubscriberNet>,
}

/// One subscriber's part of a [`Net`], by message seq.
#[derive(Debug, Default)]
pub struct SubscriberNet {
    /// Copies queued here and still queued.
    copies: BTreeMap<u64, NewCopy>,
    /// New attempt counts of copies queued before this net (or perhaps shadowed by a
    /// history replay's spill in it).
    attempts: BTreeMap<u64, u32>,
    /// Copies queued before this net (or perhaps shadowed by a history replay's spill
    /// in it) and acknowledged (or dropped) in it.
    deletes: BTreeSet<u64>,
    /// Copies queued here by a history replay's spill, which may shadow a copy stored
    /// before: the client's own durable copy of the same message, which the spill's
    /// insert leaves as it is. An ack or an attempt count must reach that one too.
    shadowing: BTreeSet<u64>,
}

impl SubscriberNet {
    fn is_empty(&self) -> bool {
        self.copies.is_empty() && self.attempts.is_empty() && self.deletes.is_empty()
    }

    /// Copies queued in this net with `seq > after_seq`, in seq order.
    pub fn queued_after(&self, after_seq: u64) -> impl Iterator<Item = (u64, &NewCopy)> {
        self.copies
            .range(after_seq.saturating_add(1)..)
            .map(|(seq, copy)| (*seq, copy))
    }

    /// How many stored copies this net deletes.
    pub fn deletes(&self) -> usize {
        self.deletes.len()
    }

    /// Whether this net deletes the stored copy of message `seq`.
    pub fn deletes_copy(&self, seq: u64) -> bool {
        self.deletes.contains(&seq)
    }

    /// The attempt count this net sets on the stored copy of message `seq`, if any.
    pub fn attempts_of(&self, seq: u64) -> Option<u32> {
        self.attempts.get(&seq).copied()
    }
}

impl Net {
    /// Adds one copy op. Returns `false`, leaving the net unchanged, for ops that are
    /// not copy ops (replay ids and barriers).
    pub fn apply(&mut self, op: &StoreOp) -> bool {
        match op {
            StoreOp::PutMessage(m) => {
                self.bodies.entry(m.seq).or_insert_with(|| (m.clone(), 0));
            }
            StoreOp::PutCopy {
                session,
                client_id,
                seq,
                ephemeral,
                replayed,
            } => {
                let sub = self.subscriber_mut(session, client_id);
                match sub.copies.entry(*seq) {
                    // A second put of one copy (a history replay of a message the
                    // client's durable backlog holds, spilled): it stays durable, as
                    // the tables' INSERT OR IGNORE keeps it.
                    btree_map::Entry::Occupied(mut copy) => {
                        copy.get_mut().ephemeral &= *ephemeral;
                    }
                    // (If it was acknowledged earlier in this net, and is queued again by
                    // a history replay that spilled, the stored row stays in `deletes`:
                    // writes delete before they insert, so the copy is a new one.)
                    btree_map::Entry::Vacant(slot) => {
                        slot.insert(NewCopy {
                            ephemeral: *ephemeral,
                            attempts: 0,
                        });
                        if *replayed {
                            sub.shadowing.insert(*seq);
                        }
                        if let Some((_, refs)) = self.bodies.get_mut(seq) {
                            *refs += 1;
                        }
                    }
                }
            }
            StoreOp::SetAttempts {
                session,
                client_id,
                seq,
                attempts,
            } => {
                let sub = self.subscriber_mut(session, client_id);
                match sub.copies.get_mut(seq) {
                    Some(copy) => {
                        copy.attempts = *attempts;
                        // A replay's spill may shadow a stored copy (`shadowing`): the
                        // count goes to both, and stays the latest there.
                        if sub.shadowing.contains(seq) || sub.attempts.contains_key(seq) {
                            sub.attempts.insert(*seq, *attempts);
                        }
                    }
                    None => {
                        sub.attempts.insert(*seq, *attempts);
                    }
                }
            }
            StoreOp::DeleteCopy {
                session,
                client_id,
                seq,
            } => {
                let sub = self.subscriber_mut(session, client_id);
                if sub.copies.remove(seq).is_some() {
                    // Queued and acknowledged here: the insert does not happen. The
                    // ack also reaches a stored copy a replay's spill may shadow (a
                    // delete that finds nothing if there is none). Every other copy
                    // queued here is a new message's, with nothing stored before.
                    if sub.shadowing.remove(seq) {
                        sub.attempts.remove(seq);
                        sub.deletes.insert(*seq);
                    }
                    if let Entry::Occupied(mut body) = self.bodies.entry(*seq) {
                        body.get_mut().1 -= 1;
                        if body.get().1 == 0 {
                            body.remove();
                        }
                    }
                } else {
                    sub.attempts.remove(seq);
                    sub.deletes.insert(*seq);
                }
            }
            StoreOp::PutReplayId { .. }
            | StoreOp::PutSubscription { .. }
            | StoreOp::SetLegacyOnly { .. }
            | StoreOp::DeleteSubscription { .. }
            | StoreOp::DeleteClient { .. }
            | StoreOp::DeleteEphemeral { .. }
            | StoreOp::DiscardCopies { .. } => return false,
        }
        true
    }

    fn subscriber_mut(
        &mut self,
        session: &SessionName,
        client_id: &ClientId,
    ) -> &mut SubscriberNet {
        self.subscribers
            .entry((session.clone(), client_id.clone()))
            .or_default()
    }

    /// Whether nothing is left to write.
    pub fn is_empty(&self) -> bool {
        self.subscribers.values().all(SubscriberNet::is_empty)
    }

    /// One subscriber's part, if this net has any.
    pub fn subscriber(
        &self,
        session: &SessionName,
        client_id: &ClientId,
    ) -> Option<&SubscriberNet> {
        self.subscribers.get(&(session.clone(), client_id.clone()))
    }

    /// The body of message `seq`, if a copy queued in this net needs it.
    pub fn body(&self, seq: u64) -> Option<&Arc<Message>> {
        self.bodies.get(&seq).map(|(m, _)| m)
    }

    /// Message bodies to insert: those a queued copy of this net needs. (A body whose
    /// copies were all acknowledged is not needed; one queued before is stored already.)
    pub fn messages(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.bodies
            .values()
            .filter(|(_, refs)| *refs > 0)
            .map(|(m, _)| m)
    }

    /// Copies to insert.
    pub fn copies(&self) -> impl Iterator<Item = (&SubKey, u64, &NewCopy)> {
        self.subscribers
            .iter()
            .flat_map(|(k, s)| s.copies.iter().map(move |(seq, c)| (k, *seq, c)))
    }

    /// Attempt counts to update on copies stored before.
    pub fn attempts(&self) -> impl Iterator<Item = (&SubKey, u64, u32)> {
        self.subscribers
            .iter()
            .flat_map(|(k, s)| s.attempts.iter().map(move |(seq, a)| (k, *seq, *a)))
    }

    /// Copies stored before, to delete.
    pub fn deletes(&self) -> impl Iterator<Item = (&SubKey, u64)> {
        self.subscribers
            .iter()
            .flat_map(|(k, s)| s.deletes.iter().map(move |seq| (k, *seq)))
    }

    /// Message bodies that may be orphaned by [`Net::deletes`], sorted, each once.
    pub fn orphans(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.deletes().map(|(_, seq)| seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs
    }
}

/// One step of a planned commit.
#[derive(Debug)]
pub enum Step<'a> {
    ReplayIds(Vec<(&'a SessionName, &'a MessageId, Millis)>),
    /// The net effect of the copy ops between two barriers.
    Copies(Net),
    /// A barrier, applied on its own, in place.
    Single(&'a StoreOp),
}

/// Plans the ops of one commit (all its batches, in order): replay ids first (they
/// depend on nothing), then copy ops netted between barriers, and the barriers.
pub fn plan<'a>(ops: impl IntoIterator<Item = &'a StoreOp>) -> Vec<Step<'a>> {
    let mut replay = Vec::new();
    let mut steps = Vec::new();
    let mut net = Net::default();
    for op in ops {
        if net.apply(op) {
            continue;
        }
        match op {
            StoreOp::PutReplayId {
                session,
                id,
                expires_at,
            } => replay.push((session, id, *expires_at)),
            _ => {
                let done = std::mem::take(&mut net);
                if !done.is_empty() {
                    steps.push(Step::Copies(done));
                }
                steps.push(Step::Single(op));
            }
        }
    }
    if !net.is_empty() {
        steps.push(Step::Copies(net));
    }
    if !replay.is_empty() {
        steps.insert(0, Step::ReplayIds(replay));
    }
    steps
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::core::{MessageKind, TopicFilter, TopicName};
    use crate::proto::PayloadFormat;

    fn s() -> SessionName {
        SessionName::parse("s").expect("valid")
    }
    fn c(name: &str) -> ClientId {
        ClientId::parse(name).expect("valid")
    }
    fn msg(seq: u64) -> Arc<Message> {
        Arc::new(Message {
            session: s(),
            id: MessageId([seq as u8; 16]),
            seq,
            topic: TopicName::parse("t").expect("valid"),
            payload: Bytes::new(),
            timestamp_ms: 0,
            format: PayloadFormat::NativeV1,
            kind: MessageKind::Message,
            accepted_at: 0,
            expires_at: 1,
        })
    }
    fn put(seq: u64, client: &str) -> StoreOp {
        StoreOp::PutCopy {
            session: s(),
            client_id: c(client),
            seq,
            ephemeral: false,
            replayed: false,
        }
    }
    fn del(seq: u64, client: &str) -> StoreOp {
        StoreOp::DeleteCopy {
            session: s(),
            client_id: c(client),
            seq,
        }
    }
    fn attempts(seq: u64, client: &str, attempts: u32) -> StoreOp {
        StoreOp::SetAttempts {
            session: s(),
            client_id: c(client),
            seq,
            attempts,
        }
    }
    fn net_of(ops: &[StoreOp]) -> Net {
        let mut net = Net::default();
        for op in ops {
            assert!(net.apply(op), "{op:?} is a copy op");
        }
        net
    }
    fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
        v.sort();
        v
    }

    #[test]
    fn a_copy_acked_within_the_net_is_never_written() {
        let net = net_of(&[
            StoreOp::PutMessage(msg(1)),
            put(1, "a"),
            put(1, "b"),
            StoreOp::PutMessage(msg(2)),
            put(2, "a"),
            del(1, "a"),
            del(2, "a"),
            attempts(2, "a", 3),
        ]);
        // Message 1 is still needed by b; message 2 by no one.
        let bodies: Vec<u64> = net.messages().map(|m| m.seq).collect();
        assert_eq!(bodies, [1]);
        let copies: Vec<(&str, u64)> = net
            .copies()
            .map(|(k, seq, _)| (k.1.as_str(), seq))
            .collect();
        assert_eq!(copies, [("b", 1)]);
        // The late SetAttempts of an acknowledged copy is an update of a stored copy
        // (the core never sends one; if it did, it would touch no row).
        assert_eq!(net.deletes().count(), 0);
        assert!(net.orphans().is_empty());
    }

    #[test]
    fn a_second_put_of_a_copy_never_makes_a_durable_copy_ephemeral() {
        let ephemeral = StoreOp::PutCopy {
            session: s(),
            client_id: c("a"),
            seq: 1,
            ephemeral: true,
            replayed: false,
        };
        let net = net_of(&[StoreOp::PutMessage(msg(1)), put(1, "a"), ephemeral]);
        let copies: Vec<(u64, bool)> = net.copies().map(|(_, seq, c)| (seq, c.ephemeral)).collect();
        assert_eq!(copies, [(1, false)], "one durable copy");
        // One copy, one reference to the body: its ack leaves nothing to write.
        let mut net = net;
        assert!(net.apply(&del(1, "a")));
        assert!(net.messages().next().is_none());
    }

    /// A stored copy acknowledged, then queued again (a history replay that spilled):
    /// the stored row is deleted and a new copy inserted; acknowledged once more, the
    /// new one cancels out and the stored row is still deleted.
    #[test]
    fn a_copy_queued_again_after_its_ack_replaces_the_stored_one() {
        let spilled = StoreOp::PutCopy {
            session: s(),
            client_id: c("a"),
            seq: 7,
            ephemeral: true,
            replayed: true,
        };
        let mut net = net_of(&[del(7, "a"), StoreOp::PutMessage(msg(7)), spilled]);
        let sub = net.subscriber(&s(), &c("a")).expect("a's ops");
        assert!(sub.deletes_copy(7), "the stored copy goes");
        let queued: Vec<(u64, NewCopy)> = sub.queued_after(0).map(|(seq, c)| (seq, *c)).collect();
        let fresh = NewCopy {
            ephemeral: true,
            attempts: 0,
        };
        assert_eq!(queued, [(7, fresh)], "a new one is written");
        net.apply(&del(7, "a"));
        let sub = net.subscriber(&s(), &c("a")).expect("a's ops");
        assert!(sub.deletes_copy(7), "acknowledged again: nothing stays");
        assert_eq!(sub.queued_after(0).count(), 0);
    }

    /// A spill for a slow connection, acknowledged within the net, writes nothing; a
    /// history replay's may shadow a stored copy, which its ack deletes too.
    #[test]
    fn only_a_replays_spill_reaches_a_stored_copy() {
        let spill = |seq, replayed| StoreOp::PutCopy {
            session: s(),
            client_id: c("a"),
            seq,
            ephemeral: true,
            replayed,
        };
        let net = net_of(&[
            StoreOp::PutMessage(msg(3)),
            spill(3, false),
            attempts(3, "a", 1),
            del(3, "a"),
            StoreOp::PutMessage(msg(4)),
            spill(4, true),
            del(4, "a"),
        ]);
        assert_eq!(net.copies().count(), 0);
        assert!(net.messages().next().is_none());
        let deletes: Vec<u64> = net.deletes().map(|(_, seq)| seq).collect();
        assert_eq!(deletes, [4]);
        assert_eq!(net.attempts().count(), 0);
    }

    /// A replay's attempt counts reach the stored row it may shadow, the latest last,
    /// also once a durable put of the same copy has made the queued copy durable.
    #[test]
    fn a_spills_attempts_reach_the_row_it_may_shadow() {
        let spilled = StoreOp::PutCopy {
            session: s(),
            client_id: c("a"),
            seq: 5,
            ephemeral: true,
            replayed: true,
        };
        let net = net_of(&[
            StoreOp::PutMessage(msg(5)),
            spilled,
            attempts(5, "a", 2),
            put(5, "a"),
            attempts(5, "a", 3),
        ]);
        let updates: Vec<(u64, u32)> = net.attempts().map(|(_, seq, n)| (seq, n)).collect();
        assert_eq!(updates, [(5, 3)]);
        let copies: Vec<(u64, NewCopy)> = net.copies().map(|(_, seq, c)| (seq, *c)).collect();
        let durable = NewCopy {
            ephemeral: false,
            attempts: 3,
        };
        assert_eq!(copies, [(5, durable)]);
    }

    #[test]
    fn attempts_fold_into_the_insert_and_deletes_cancel_updates() {
        let net = net_of(&[
            StoreOp::PutMessage(msg(1)),
            put(1, "a"),
            attempts(1, "a", 2),
            attempts(7, "a", 4),
            attempts(8, "a", 5),
            del(8, "a"),
            del(9, "b"),
        ]);
        let copies: Vec<NewCopy> = net.copies().map(|(_, _, c)| *c).collect();
        assert_eq!(
            copies,
            [NewCopy {
                ephemeral: false,
                attempts: 2
            }]
        );
        let updates: Vec<(u64, u32)> = net.attempts().map(|(_, seq, a)| (seq, a)).collect();
        assert_eq!(updates, [(7, 4)]);
        let deletes: Vec<u64> = net.deletes().map(|(_, seq)| seq).collect();
        assert_eq!(sorted(deletes), [8, 9]);
        assert_eq!(net.orphans(), [8, 9]);
    }

    #[test]
    fn replay_ids_come_first_and_barriers_keep_their_place() {
        let ops = vec![
            StoreOp::PutMessage(msg(1)),
            put(1, "a"),
            StoreOp::DeleteClient {
                session: s(),
                client_id: c("a"),
            },
            StoreOp::PutReplayId {
                session: s(),
                id: MessageId([2; 16]),
                expires_at: 9,
            },
            StoreOp::PutSubscription {
                session: s(),
                client_id: c("a"),
                filter: TopicFilter::parse("t").expect("valid"),
                legacy_only: false,
            },
            StoreOp::PutMessage(msg(2)),
            put(2, "a"),
            del(1, "a"),
        ];
        let steps = plan(&ops);
        assert!(matches!(&steps[0], Step::ReplayIds(v) if v.len() == 1));
        assert!(matches!(&steps[1], Step::Copies(n) if n.copies().count() == 1));
        assert!(matches!(
            steps[2],
            Step::Single(StoreOp::DeleteClient { .. })
        ));
        assert!(matches!(
            steps[3],
            Step::Single(StoreOp::PutSubscription { .. })
        ));
        // Copy 1 was queued before the barrier, so its delete is a real delete.
        let Step::Copies(last) = &steps[4] else {
            panic!("copies after the barriers: {steps:?}");
        };
        assert_eq!(last.copies().count(), 1);
        assert_eq!(last.deletes().count(), 1);
        assert_eq!(last.orphans(), [1]);
        assert_eq!(steps.len(), 5);
    }
}
