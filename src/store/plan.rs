//! Turns the ops of the batches committed together into a few large statements.
//!
//! SQL stores pay per statement, not per row, so a group commit is planned first: ops
//! of one kind are gathered into one multi-row step, and a copy that was inserted and
//! acknowledged within the same commit is never written at all (nor its message body,
//! if no other copy needs it). Order is kept where it matters: ops that change a whole
//! client or subscription (`DeleteClient`, subscriptions, `DeleteEphemeral`) are
//! barriers, and within the stretch between two barriers inserts come before updates,
//! which come before deletes — the order the core emits them for any one copy.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::core::{ClientId, Message, MessageId, Millis, SessionName, StoreOp};

/// A copy's key.
pub type CopyKey<'a> = (&'a SessionName, &'a ClientId, u64);

/// One step of a planned commit.
#[derive(Debug)]
pub enum Step<'a> {
    ReplayIds(Vec<(&'a SessionName, &'a MessageId, Millis)>),
    Messages(Vec<&'a Arc<Message>>),
    /// (key, ephemeral)
    Copies(Vec<(CopyKey<'a>, bool)>),
    /// (key, attempts)
    Attempts(Vec<(CopyKey<'a>, u32)>),
    DeleteCopies(Vec<CopyKey<'a>>),
    /// Message bodies to delete if no copy references them any more.
    DropOrphans(Vec<u64>),
    /// An op applied on its own, in place.
    Single(&'a StoreOp),
}

#[derive(Default)]
struct Segment<'a> {
    replay: Vec<(&'a SessionName, &'a MessageId, Millis)>,
    messages: Vec<&'a Arc<Message>>,
    copies: Vec<Option<(CopyKey<'a>, bool)>>,
    copy_index: HashMap<CopyKey<'a>, usize>,
    /// Copies inserted and deleted within this segment.
    cancelled: HashSet<CopyKey<'a>>,
    attempts: Vec<(CopyKey<'a>, u32)>,
    deletes: Vec<CopyKey<'a>>,
    orphans: Vec<u64>,
}

impl<'a> Segment<'a> {
    fn add(&mut self, op: &'a StoreOp) {
        match op {
            StoreOp::PutReplayId {
                session,
                id,
                expires_at,
            } => self.replay.push((session, id, *expires_at)),
            StoreOp::PutMessage(m) => self.messages.push(m),
            StoreOp::PutCopy {
                session,
                client_id,
                seq,
                ephemeral,
            } => {
                let key = (session, client_id, *seq);
                self.copy_index.insert(key, self.copies.len());
                self.copies.push(Some((key, *ephemeral)));
            }
            StoreOp::SetAttempts {
                session,
                client_id,
                seq,
                attempts,
            } => {
                let key = (session, client_id, *seq);
                if !self.cancelled.contains(&key) {
                    self.attempts.push((key, *attempts));
                }
            }
            StoreOp::DeleteCopy {
                session,
                client_id,
                seq,
            } => {
                let key = (session, client_id, *seq);
                match self.copy_index.remove(&key) {
                    // Inserted in this very commit: neither write happens.
                    Some(i) => {
                        self.copies[i] = None;
                        self.cancelled.insert(key);
                    }
                    None => {
                        self.deletes.push(key);
                        self.orphans.push(*seq);
                    }
                }
            }
            StoreOp::PutSubscription { .. }
            | StoreOp::DeleteSubscription { .. }
            | StoreOp::DeleteClient { .. }
            | StoreOp::DeleteEphemeral { .. } => {
                debug_assert!(false, "barriers are not added to a segment");
            }
        }
    }

    fn finish(self, steps: &mut Vec<Step<'a>>) {
        let copies: Vec<(CopyKey<'a>, bool)> = self.copies.into_iter().flatten().collect();
        // A body is written only if a copy written in this commit needs it; otherwise it
        // is either already stored (an earlier commit wrote it) or needed by no one.
        let needed: HashSet<u64> = copies.iter().map(|((_, _, seq), _)| *seq).collect();
        let messages: Vec<&Arc<Message>> = self
            .messages
            .into_iter()
            .filter(|m| needed.contains(&m.seq))
            .collect();
        let mut orphans = self.orphans;
        orphans.sort_unstable();
        orphans.dedup();
        if !self.replay.is_empty() {
            steps.push(Step::ReplayIds(self.replay));
        }
        if !messages.is_empty() {
            steps.push(Step::Messages(messages));
        }
        if !copies.is_empty() {
            steps.push(Step::Copies(copies));
        }
        if !self.attempts.is_empty() {
            steps.push(Step::Attempts(self.attempts));
        }
        if !self.deletes.is_empty() {
            steps.push(Step::DeleteCopies(self.deletes));
        }
        if !orphans.is_empty() {
            steps.push(Step::DropOrphans(orphans));
        }
    }
}

/// Plans the ops of one commit (all its batches, in order).
pub fn plan<'a>(ops: impl IntoIterator<Item = &'a StoreOp>) -> Vec<Step<'a>> {
    let mut steps = Vec::new();
    let mut segment = Segment::default();
    for op in ops {
        match op {
            StoreOp::PutSubscription { .. }
            | StoreOp::DeleteSubscription { .. }
            | StoreOp::DeleteClient { .. }
            | StoreOp::DeleteEphemeral { .. } => {
                std::mem::take(&mut segment).finish(&mut steps);
                steps.push(Step::Single(op));
            }
            _ => segment.add(op),
        }
    }
    segment.finish(&mut steps);
    steps
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::core::{TopicFilter, TopicName};
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
        }
    }
    fn del(seq: u64, client: &str) -> StoreOp {
        StoreOp::DeleteCopy {
            session: s(),
            client_id: c(client),
            seq,
        }
    }

    #[test]
    fn same_kind_ops_are_grouped_in_phase_order() {
        let ops = vec![
            StoreOp::PutReplayId {
                session: s(),
                id: MessageId([1; 16]),
                expires_at: 9,
            },
            StoreOp::PutMessage(msg(1)),
            put(1, "a"),
            del(0, "a"),
            StoreOp::PutReplayId {
                session: s(),
                id: MessageId([2; 16]),
                expires_at: 9,
            },
            StoreOp::PutMessage(msg(2)),
            put(2, "a"),
        ];
        let steps = plan(&ops);
        let kinds: Vec<&str> = steps
            .iter()
            .map(|st| match st {
                Step::ReplayIds(v) if v.len() == 2 => "replay×2",
                Step::Messages(v) if v.len() == 2 => "messages×2",
                Step::Copies(v) if v.len() == 2 => "copies×2",
                Step::DeleteCopies(v) if v.len() == 1 => "delete×1",
                Step::DropOrphans(v) if v == &vec![0] => "orphans[0]",
                _ => "unexpected",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "replay×2",
                "messages×2",
                "copies×2",
                "delete×1",
                "orphans[0]"
            ]
        );
    }

    #[test]
    fn a_copy_acked_within_the_commit_is_never_written() {
        let ops = vec![
            StoreOp::PutMessage(msg(1)),
            put(1, "a"),
            put(1, "b"),
            StoreOp::PutMessage(msg(2)),
            put(2, "a"),
            del(1, "a"),
            del(2, "a"),
            StoreOp::SetAttempts {
                session: s(),
                client_id: c("a"),
                seq: 2,
                attempts: 3,
            },
        ];
        let steps = plan(&ops);
        // Message 1 is still needed by b; message 2 by no one.
        assert!(matches!(&steps[0], Step::Messages(m) if m.len() == 1 && m[0].seq == 1));
        assert!(matches!(&steps[1], Step::Copies(v) if v.len() == 1 && v[0].0.1.as_str() == "b"));
        assert_eq!(steps.len(), 2, "no deletes, orphans or attempts: {steps:?}");
    }

    #[test]
    fn barriers_keep_their_place() {
        let ops = vec![
            put(1, "a"),
            StoreOp::DeleteClient {
                session: s(),
                client_id: c("a"),
            },
            StoreOp::PutSubscription {
                session: s(),
                client_id: c("a"),
                filter: TopicFilter::parse("t").expect("valid"),
            },
            put(2, "a"),
            del(1, "a"),
        ];
        let steps = plan(&ops);
        assert!(matches!(steps[0], Step::Copies(_)));
        assert!(matches!(
            steps[1],
            Step::Single(StoreOp::DeleteClient { .. })
        ));
        assert!(matches!(
            steps[2],
            Step::Single(StoreOp::PutSubscription { .. })
        ));
        assert!(matches!(&steps[3], Step::Copies(v) if v.len() == 1));
        // Copy 1 was inserted before the barrier, so its delete is a real delete.
        assert!(matches!(&steps[4], Step::DeleteCopies(v) if v.len() == 1));
        assert!(matches!(&steps[5], Step::DropOrphans(v) if v == &vec![1]));
    }
}
