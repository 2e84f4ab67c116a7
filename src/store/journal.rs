//! The journal: how a group commit reaches an SQL store as a single write.
//!
//! Most queued copies live for a millisecond: the subscriber acknowledges a copy almost
//! as soon as it is delivered. Written as rows, each such copy cost a message row and a
//! copy row to insert and the same two to delete, and a commit took several statements.
//! Instead, a commit appends **one** record to the op log ([`super::oplog`]): the
//! commit's replay ids (packed, kept until their window ends) and its copy ops (encoded
//! here). The store keeps the net effect of those ops in memory (a [`Journal`]) and
//! from time to time *folds* it into the `messages` and `copies` tables in one
//! transaction, with the replay ids into the replay log, and empties the op log; every
//! copy acknowledged in between cancels out ([`super::plan::Net`]), so only the copies
//! still queued at a fold are ever written as rows.
//!
//! Reads (restore, purge) fold first; backlog pages merge the tables with the net.
//! After a crash, the next open decodes the records not yet folded ([`decode_ops`]) and
//! folds them: a committed op is never lost.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};

use crate::core::{ClientId, Message, MessageId, Millis, SessionName, StoreOp, TopicName};

use super::StoreError;
use super::plan::Net;

/// Bytes journalled (ops and replay ids) before a fold is due. A fold writes only the
/// copies still queued, so the larger this is, the fewer short-lived copies ever
/// become rows; it bounds the records a restart has to replay and the op log's size.
/// (Memory holds the net effect, copies not yet acknowledged, which the core holds
/// anyway, and the packed replay ids: at most this many bytes.)
pub const FOLD_BYTES: usize = 64 << 20;

/// Format version of an encoded ops blob.
const VERSION: u8 = 1;

const TAG_PUT_MESSAGE: u8 = 1;
const TAG_PUT_COPY: u8 = 2;
const TAG_SET_ATTEMPTS: u8 = 3;
const TAG_DELETE_COPY: u8 = 4;

/// What the records since the last fold add up to.
#[derive(Debug, Default)]
pub struct Journal {
    /// The net effect of their copy ops.
    net: Net,
    /// Their packed replay ids, each with the latest expiry among them.
    replay: Vec<(Vec<u8>, Millis)>,
    /// Bytes journalled: encoded ops and packed replay ids.
    bytes: usize,
    /// The last record's sequence number.
    last_seq: Option<u64>,
}

impl Journal {
    /// Record `seq`, of `bytes` bytes, was committed with these copy ops and replay ids.
    pub fn record<'a>(
        &mut self,
        seq: u64,
        ops: impl IntoIterator<Item = &'a StoreOp>,
        replay: Option<(Vec<u8>, Millis)>,
        bytes: usize,
    ) {
        for op in ops {
            self.net.apply(op);
        }
        self.replay.extend(replay);
        self.bytes += bytes;
        self.last_seq = Some(seq);
    }

    /// Whether enough is journalled that the next commit should fold.
    pub fn wants_fold(&self) -> bool {
        self.bytes >= FOLD_BYTES
    }

    /// What a fold writes to the copy tables.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// What a fold writes to the replay log: packed ids and their latest expiry.
    pub fn replay(&self) -> &[(Vec<u8>, Millis)] {
        &self.replay
    }

    /// The last record a fold covers, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// A fold committed everything recorded.
    pub fn folded(&mut self) {
        *self = Journal::default();
    }
}

/// What one commit puts in its op-log record.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    /// Packed replay ids and the latest expiry among them.
    pub replay: Option<(Vec<u8>, Millis)>,
    /// The commit's copy ops, in order.
    pub ops: Vec<&'a StoreOp>,
}

impl<'a> Entry<'a> {
    /// The journal entry of a commit's ops, or `None` if one of them changes a
    /// subscription or a whole client, or discards copies by topic: such commits go
    /// to the tables directly.
    pub fn of(ops: impl IntoIterator<Item = &'a StoreOp>) -> Option<Entry<'a>> {
        let mut entry = Entry::default();
        let mut replay = Vec::new();
        for op in ops {
            match op {
                StoreOp::PutReplayId {
                    session,
                    id,
                    expires_at,
                } => replay.push((session, id, *expires_at)),
                StoreOp::PutMessage(_)
                | StoreOp::PutCopy { .. }
                | StoreOp::SetAttempts { .. }
                | StoreOp::DeleteCopy { .. } => entry.ops.push(op),
                StoreOp::PutSubscription { .. }
                | StoreOp::SetLegacyOnly { .. }
                | StoreOp::DeleteSubscription { .. }
                | StoreOp::DeleteClient { .. }
                | StoreOp::DeleteEphemeral { .. }
                | StoreOp::DiscardCopies { .. } => return None,
            }
        }
        if !replay.is_empty() {
            entry.replay = Some(pack_replay_ids(&replay));
        }
        Some(entry)
    }

    pub fn is_empty(&self) -> bool {
        self.replay.is_none() && self.ops.is_empty()
    }
}

/// Encodes copy ops (as [`Entry::ops`] holds them) for an op-log record.
#[cfg(test)]
pub fn encode_ops<'a>(ops: impl Iterator<Item = &'a StoreOp> + Clone) -> Vec<u8> {
    let mut out = Vec::new();
    encode_ops_into(&mut out, ops);
    out
}

/// Appends the encoding of copy ops (as [`Entry::ops`] holds them) to `out`, which
/// grows once, to the exact size: a durable body copied into a buffer that then has
/// to grow would be copied twice, the second time into freshly faulted pages (W5
/// durable: 57% of the encoding's samples in the broker).
pub fn encode_ops_into<'a>(out: &mut Vec<u8>, ops: impl Iterator<Item = &'a StoreOp> + Clone) {
    out.reserve(1 + ops.clone().map(encoded_len).sum::<usize>());
    out.put_u8(VERSION);
    for op in ops {
        match op {
            StoreOp::PutMessage(m) => {
                out.put_u8(TAG_PUT_MESSAGE);
                out.put_u64(m.seq);
                out.put_slice(m.id.as_bytes());
                put_str(out, m.session.as_str());
                put_str(out, m.topic.as_str());
                out.put_u64(m.timestamp_ms);
                out.put_i32(m.stored_format());
                out.put_u64(m.accepted_at);
                out.put_u64(m.expires_at);
                out.put_u32(m.payload.len() as u32);
                out.put_slice(&m.payload);
            }
            StoreOp::PutCopy {
                session,
                client_id,
                seq,
                ephemeral,
                replayed,
            } => {
                put_key(out, TAG_PUT_COPY, session, client_id, *seq);
                out.put_u8(u8::from(*ephemeral) | (u8::from(*replayed) << 1));
            }
            StoreOp::SetAttempts {
                session,
                client_id,
                seq,
                attempts,
            } => {
                put_key(out, TAG_SET_ATTEMPTS, session, client_id, *seq);
                out.put_u32(*attempts);
            }
            StoreOp::DeleteCopy {
                session,
                client_id,
                seq,
            } => put_key(out, TAG_DELETE_COPY, session, client_id, *seq),
            // Entry::of never yields these.
            StoreOp::PutReplayId { .. }
            | StoreOp::PutSubscription { .. }
            | StoreOp::SetLegacyOnly { .. }
            | StoreOp::DeleteSubscription { .. }
            | StoreOp::DeleteClient { .. }
            | StoreOp::DeleteEphemeral { .. }
            | StoreOp::DiscardCopies { .. } => {
                debug_assert!(false, "not a journal op: {op:?}");
            }
        }
    }
}

/// Bytes [`encode_ops_into`] writes for `op`.
fn encoded_len(op: &StoreOp) -> usize {
    const STR: usize = 2; // put_str's length prefix
    let key = |session: &SessionName, client_id: &ClientId| {
        1 + STR + session.as_str().len() + STR + client_id.as_str().len() + 8
    };
    match op {
        StoreOp::PutMessage(m) => {
            let fixed = 1 + 8 + 16 + STR + STR + 8 + 4 + 8 + 8 + 4;
            fixed + m.session.as_str().len() + m.topic.as_str().len() + m.payload.len()
        }
        StoreOp::PutCopy {
            session, client_id, ..
        } => key(session, client_id) + 1,
        StoreOp::SetAttempts {
            session, client_id, ..
        } => key(session, client_id) + 4,
        StoreOp::DeleteCopy {
            session, client_id, ..
        } => key(session, client_id),
        StoreOp::PutReplayId { .. }
        | StoreOp::PutSubscription { .. }
        | StoreOp::SetLegacyOnly { .. }
        | StoreOp::DeleteSubscription { .. }
        | StoreOp::DeleteClient { .. }
        | StoreOp::DeleteEphemeral { .. }
        | StoreOp::DiscardCopies { .. } => 0,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Session names, client ids and topics are all far shorter than 64 KiB.
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_key(out: &mut Vec<u8>, tag: u8, session: &SessionName, client_id: &ClientId, seq: u64) {
    out.put_u8(tag);
    put_str(out, session.as_str());
    put_str(out, client_id.as_str());
    out.put_u64(seq);
}

/// Decodes a record's ops. A record of a commit with no copy ops (replay ids only)
/// has none: an empty blob, not even a version byte.
pub fn decode_ops(bytes: &[u8]) -> Result<Vec<StoreOp>, StoreError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != VERSION {
        return Err(corrupt(format!("journal format {version} is not known")));
    }
    let mut ops = Vec::new();
    while !r.0.is_empty() {
        let op = match r.u8()? {
            TAG_PUT_MESSAGE => {
                let seq = r.u64()?;
                let id = MessageId::from_slice(r.take(16)?).map_err(corrupt)?;
                let session = SessionName::parse(r.str()?).map_err(corrupt)?;
                let topic = TopicName::parse(r.str()?).map_err(corrupt)?;
                let timestamp_ms = r.u64()?;
                let code = r.i32()?;
                let (format, kind) = Message::parse_stored_format(code)
                    .ok_or_else(|| corrupt(format!("unknown payload format {code}")))?;
                let accepted_at = r.u64()?;
                let expires_at = r.u64()?;
                let len = r.u32()? as usize;
                let payload = Bytes::copy_from_slice(r.take(len)?);
                StoreOp::PutMessage(Arc::new(Message {
                    session,
                    id,
                    seq,
                    topic,
                    payload,
                    timestamp_ms,
                    format,
                    kind,
                    accepted_at,
                    expires_at,
                }))
            }
            tag @ (TAG_PUT_COPY | TAG_SET_ATTEMPTS | TAG_DELETE_COPY) => {
                let session = SessionName::parse(r.str()?).map_err(corrupt)?;
                let client_id = ClientId::parse(r.str()?).map_err(corrupt)?;
                let seq = r.u64()?;
                match tag {
                    TAG_PUT_COPY => {
                        // Bit 0: ephemeral; bit 1: replayed (records before it: 0).
                        let flags = r.u8()?;
                        StoreOp::PutCopy {
                            session,
                            client_id,
                            seq,
                            ephemeral: flags & 1 != 0,
                            replayed: flags & 2 != 0,
                        }
                    }
                    TAG_SET_ATTEMPTS => StoreOp::SetAttempts {
                        session,
                        client_id,
                        seq,
                        attempts: r.u32()?,
                    },
                    _ => StoreOp::DeleteCopy {
                        session,
                        client_id,
                        seq,
                    },
                }
            }
            tag => return Err(corrupt(format!("unknown journal op {tag}"))),
        };
        ops.push(op);
    }
    Ok(ops)
}

/// Bounds-checked reads: a corrupt record is an error, never a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt("truncated journal record"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?.get_u8())
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(self.take(4)?.get_u32())
    }
    fn i32(&mut self) -> Result<i32, StoreError> {
        Ok(self.take(4)?.get_i32())
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(self.take(8)?.get_u64())
    }
    fn str(&mut self) -> Result<&'a str, StoreError> {
        let len = self.take(2)?.get_u16() as usize;
        std::str::from_utf8(self.take(len)?).map_err(corrupt)
    }
}

/// Packs replay ids for a record: the entries and their latest expiry.
pub fn pack_replay_ids(rows: &[(&SessionName, &MessageId, Millis)]) -> (Vec<u8>, Millis) {
    let mut out = Vec::with_capacity(rows.len() * 40);
    let mut latest = 0;
    for (session, id, expires_at) in rows {
        put_str(&mut out, session.as_str());
        out.put_slice(id.as_bytes());
        out.put_u64(*expires_at);
        latest = latest.max(*expires_at);
    }
    (out, latest)
}

/// Reads packed replay ids, keeping those still protected at `now`.
pub fn unpack_replay_ids(
    bytes: &[u8],
    now: Millis,
    out: &mut Vec<(SessionName, MessageId, Millis)>,
) -> Result<(), StoreError> {
    let mut r = Reader(bytes);
    while !r.0.is_empty() {
        let name = r.str()?;
        let id = MessageId::from_slice(r.take(16)?).map_err(corrupt)?;
        let expires_at = r.u64()?;
        if expires_at > now {
            out.push((SessionName::parse(name).map_err(corrupt)?, id, expires_at));
        }
    }
    Ok(())
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::MessageKind;
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
            topic: TopicName::parse("a/b").expect("valid"),
            payload: Bytes::from(vec![seq as u8; 5]),
            timestamp_ms: 7,
            format: PayloadFormat::LegacyJson,
            kind: MessageKind::Message,
            accepted_at: 8,
            expires_at: 9,
        })
    }
    fn copy_ops(seq: u64) -> [StoreOp; 4] {
        [
            StoreOp::PutMessage(msg(seq)),
            StoreOp::PutCopy {
                session: s(),
                client_id: c("a"),
                seq,
                ephemeral: true,
                replayed: false,
            },
            StoreOp::SetAttempts {
                session: s(),
                client_id: c("a"),
                seq,
                attempts: 4,
            },
            StoreOp::DeleteCopy {
                session: s(),
                client_id: c("b"),
                seq,
            },
        ]
    }

    #[test]
    fn ops_round_trip() {
        let ops = copy_ops(3);
        let decoded = decode_ops(&encode_ops(ops.iter())).expect("decodes");
        assert_eq!(format!("{decoded:?}"), format!("{ops:?}"));
        for (ephemeral, replayed) in [(false, false), (true, false), (true, true)] {
            let put = [StoreOp::PutCopy {
                session: s(),
                client_id: c("a"),
                seq: 1,
                ephemeral,
                replayed,
            }];
            let decoded = decode_ops(&encode_ops(put.iter())).expect("decodes");
            assert_eq!(format!("{decoded:?}"), format!("{put:?}"));
        }
        assert!(
            decode_ops(&encode_ops([].iter()))
                .expect("empty")
                .is_empty()
        );
    }

    #[test]
    fn encoded_len_is_exact_for_every_journal_op() {
        for op in copy_ops(3) {
            let alone = encode_ops(std::iter::once(&op));
            assert_eq!(alone.len(), 1 + encoded_len(&op), "{op:?}");
        }
        // And the buffer never grows past the size reserved for it.
        let mut out = Vec::new();
        encode_ops_into(&mut out, copy_ops(5).iter());
        assert_eq!(out.len(), out.capacity());
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let bytes = encode_ops(copy_ops(1).iter());
        // Cut anywhere but at the start (a record without ops), right after the version
        // byte (an empty list) or between two ops, it is an error.
        assert!(decode_ops(&[]).expect("no ops").is_empty());
        let whole = [0, 1, 2, 3, 4].map(|n| encode_ops(copy_ops(1)[..n].iter()).len());
        for cut in (1..bytes.len()).filter(|cut| !whole.contains(cut)) {
            assert!(decode_ops(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_ops(&[VERSION, 99]).is_err());
        assert!(decode_ops(&[VERSION + 1]).is_err());
    }

    #[test]
    fn replay_ids_round_trip_and_skip_expired() {
        let (a, b) = (MessageId([1; 16]), MessageId([2; 16]));
        let (bytes, latest) = pack_replay_ids(&[(&s(), &a, 10), (&s(), &b, 20)]);
        assert_eq!(latest, 20);
        let mut out = Vec::new();
        unpack_replay_ids(&bytes, 15, &mut out).expect("unpacks");
        assert_eq!(out, vec![(s(), b, 20)]);
        assert!(unpack_replay_ids(&bytes[..bytes.len() - 1], 0, &mut out).is_err());
    }

    #[test]
    fn an_entry_splits_replay_ids_from_copy_ops_and_refuses_barriers() {
        let mut ops = vec![StoreOp::PutReplayId {
            session: s(),
            id: MessageId([1; 16]),
            expires_at: 5,
        }];
        ops.extend(copy_ops(1));
        let entry = Entry::of(&ops).expect("no barriers");
        assert_eq!(entry.replay.as_ref().map(|(_, at)| *at), Some(5));
        assert_eq!(entry.ops.len(), 4);

        ops.push(StoreOp::DeleteClient {
            session: s(),
            client_id: c("a"),
        });
        assert!(Entry::of(&ops).is_none());
        assert!(Entry::of(&[]).expect("empty").is_empty());
    }

    #[test]
    fn the_journal_nets_records_and_asks_to_fold_when_full() {
        let mut journal = Journal::default();
        assert!(journal.last_seq().is_none());
        let first = copy_ops(1);
        journal.record(1, &first[..2], Some((vec![1], 10)), 100);
        journal.record(2, &first[2..], None, 100);
        assert_eq!(journal.last_seq(), Some(2));
        assert_eq!(journal.replay(), [(vec![1], 10)]);
        let copies: Vec<(u64, u32)> = journal
            .net()
            .copies()
            .map(|(_, seq, c)| (seq, c.attempts))
            .collect();
        assert_eq!(
            copies,
            [(1, 4)],
            "record 2's attempts update record 1's copy"
        );
        assert!(!journal.wants_fold());
        journal.record(3, &[], None, FOLD_BYTES);
        assert!(journal.wants_fold());
        journal.folded();
        assert!(journal.net().is_empty() && journal.last_seq().is_none());
        assert!(journal.replay().is_empty());
    }
}
