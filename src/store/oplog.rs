//! The op log: an append-only file beside the SQLite database that holds the journal
//! records (see [`super::journal`]) not yet folded into its tables.
//!
//! A group commit used to be one `INSERT` of a journal row. SQLite wrote that row as a
//! WAL frame per page (two `pwrite`s each), then copied every page again into the
//! database file at the next checkpoint, and the commit went through SQLite's own
//! thread: together a third of the broker's CPU in W1 durable. Here a commit is one
//! `write` of one buffer, and the file is cut back to its header after each fold.
//!
//! Durability is SQLite's `synchronous=NORMAL`, the store's setting: a record is in
//! the operating system's page cache when the commit returns, so it survives the
//! broker being killed, not the machine losing power. A record carries its length
//! and a CRC-32, so a tail torn by a crash is recognised and cut off at the next open.
//!
//! Every record has a sequence number; a fold stores the last one it covers in the
//! database, in the same transaction as what it writes. Records up to it are skipped
//! at the next open, so a crash between a fold's commit and the truncation of the file
//! applies nothing twice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BufMut};

use crate::core::Millis;

use super::StoreError;

/// The first bytes of an op-log file (the format's version is the last one).
const MAGIC: &[u8; 8] = b"fpoplog1";

/// Bytes before a record's body: body length (u32), CRC-32 of the body (u32).
const FRAME: usize = 8;

/// Largest body accepted when reading, so a corrupt length cannot ask for gigabytes.
/// (A commit is at most 256 batches of the broker's payload limit and change.)
const MAX_BODY: usize = 1 << 30;

/// One record: what a group commit journalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// The latest expiry among the replay ids (0 if there are none).
    pub expires_at: Millis,
    /// Packed replay ids ([`super::journal::pack_replay_ids`]); empty if none.
    pub replay: Vec<u8>,
    /// Encoded copy ops ([`super::journal::encode_ops_into`]); empty if none.
    pub ops: Vec<u8>,
}

impl Record {
    /// The record as it is written: frame, then body.
    #[cfg(test)]
    pub fn encode(seq: u64, expires_at: Millis, replay: &[u8], ops: &[u8]) -> Vec<u8> {
        Self::encode_with(seq, expires_at, replay, |out| out.put_slice(ops))
    }

    /// The record as it is written, its ops appended by `ops` (so they are encoded
    /// straight into the one buffer written).
    pub fn encode_with(
        seq: u64,
        expires_at: Millis,
        replay: &[u8],
        ops: impl FnOnce(&mut Vec<u8>),
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME + 20 + replay.len() + 256);
        out.put_u32_le(0); // the body's length and CRC, once it is written
        out.put_u32_le(0);
        out.put_u64_le(seq);
        out.put_u64_le(expires_at);
        out.put_u32_le(replay.len() as u32);
        out.put_slice(replay);
        ops(&mut out);
        let body_len = (out.len() - FRAME) as u32;
        let crc = crc32fast::hash(&out[FRAME..]);
        out[..4].copy_from_slice(&body_len.to_le_bytes());
        out[4..FRAME].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(mut body: &[u8]) -> Option<Record> {
        if body.len() < 20 {
            return None;
        }
        let seq = body.get_u64_le();
        let expires_at = body.get_u64_le();
        let replay_len = body.get_u32_le() as usize;
        if body.len() < replay_len {
            return None;
        }
        let (replay, ops) = body.split_at(replay_len);
        Some(Record {
            seq,
            expires_at,
            replay: replay.to_vec(),
            ops: ops.to_vec(),
        })
    }
}

/// The open op log, or none for an in-memory database (whose journal lives only in
/// memory, like the database itself).
#[derive(Debug)]
pub struct OpLog {
    file: Option<Arc<File>>,
    /// Bytes in the file: where the next record starts.
    len: u64,
}

impl OpLog {
    /// An op log that writes nothing, for an in-memory database.
    pub fn detached() -> OpLog {
        OpLog { file: None, len: 0 }
    }

    /// Opens the op log at `path`, creating it if needed, and returns the records it
    /// holds, in order. A torn or corrupt tail (a crash in the middle of a write) is
    /// cut off; a file that is not an op log at all is an error.
    pub fn open(path: &Path) -> Result<(OpLog, Vec<Record>), StoreError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        // Two brokers appending to one log would interleave their records. (SQLite
        // locks its own file; this is the op log's equivalent, released on close.)
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => std::io::Error::other(format!(
                "{} is in use by another process (is another broker running on this data directory?)",
                path.display()
            )),
            std::fs::TryLockError::Error(e) => e,
        })?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if MAGIC.starts_with(&bytes) {
            // New, or a crash while the header was being written.
            file.set_len(0)?;
            file.write_all(MAGIC)?;
            bytes = MAGIC.to_vec();
        } else if !bytes.starts_with(MAGIC) {
            return Err(StoreError::Corrupt(format!(
                "{} is not a fastPort op log",
                path.display()
            )));
        }
        let mut records = Vec::new();
        let mut at = MAGIC.len();
        while let Some((record, next)) = read_record(&bytes, at) {
            records.push(record);
            at = next;
        }
        if at < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                bytes = bytes.len() - at,
                "cutting a torn record off the op log's tail"
            );
            file.set_len(at as u64)?;
        }
        let log = OpLog {
            file: Some(Arc::new(file)),
            len: at as u64,
        };
        Ok((log, records))
    }

    /// Appends one encoded record ([`Record::encode`]): a small one on the calling
    /// task, a large one on a blocking thread (see [`INLINE_RECORD`]). If the write
    /// fails, the file is cut back to where the record began, so no partial record is
    /// ever followed by a whole one.
    pub async fn append(&mut self, record: Vec<u8>) -> Result<(), StoreError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        // A longer one would read back as torn, and be cut off with every record after.
        if record.len().saturating_sub(FRAME) > MAX_BODY {
            return Err(StoreError::Io(std::io::Error::other(
                "a commit of more than 1 GiB cannot be journalled",
            )));
        }
        let start = self.len;
        let len = record.len() as u64;
        if record.len() <= INLINE_RECORD {
            write_or_cut(file, start, &record)?;
        } else {
            let file = file.clone();
            tokio::task::spawn_blocking(move || write_or_cut(&file, start, &record))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        }
        self.len += len;
        Ok(())
    }

    /// Drops every record: they are folded into the database.
    pub async fn clear(&mut self) -> Result<(), StoreError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let file = file.clone();
        tokio::task::spawn_blocking(move || file.set_len(MAGIC.len() as u64))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        self.len = MAGIC.len() as u64;
        Ok(())
    }
}

/// Records up to this size are written on the store's own task. Writing a few KiB to
/// the page cache takes microseconds, less than handing them to a blocking thread
/// and being woken when it is done: two thread wake-ups per commit. Connection-bound
/// traffic commits only replay ids, in records of a few KiB, and writing them here
/// cut the broker's CPU by 9% (W1 and W4 of the load generator, 2 cores). Larger
/// records (bursts of durable bodies) still go to the blocking pool, so the task
/// never waits on a long write.
const INLINE_RECORD: usize = 16 * 1024;

/// Appends `record` to the log at `start`, or cuts the file back to `start`.
fn write_or_cut(file: &File, start: u64, record: &[u8]) -> std::io::Result<()> {
    let written = (&*file).write_all(record);
    if written.is_err() {
        let _ = file.set_len(start);
    }
    written
}

/// The record starting at `at`, and where the next one starts; `None` at the end or
/// at a torn or corrupt record.
fn read_record(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let mut frame = bytes.get(at..at.checked_add(FRAME)?)?;
    let body_len = frame.get_u32_le() as usize;
    let crc = frame.get_u32_le();
    if body_len > MAX_BODY {
        return None;
    }
    let start = at + FRAME;
    let body = bytes.get(start..start + body_len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((Record::decode(body)?, start + body_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Record {
        Record {
            seq,
            expires_at: 1_000 + seq,
            replay: vec![seq as u8; 3],
            ops: vec![0xAB; seq as usize],
        }
    }

    fn encode(r: &Record) -> Vec<u8> {
        Record::encode(r.seq, r.expires_at, &r.replay, &r.ops)
    }

    #[tokio::test]
    async fn records_survive_reopening_and_clear_empties() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (mut log, none) = OpLog::open(&path).expect("create");
        assert!(none.is_empty());
        for seq in 1..=3 {
            log.append(encode(&record(seq))).await.expect("append");
        }
        drop(log);
        let (mut log, got) = OpLog::open(&path).expect("reopen");
        assert_eq!(got, vec![record(1), record(2), record(3)]);
        log.clear().await.expect("clear");
        log.append(encode(&record(4))).await.expect("append");
        drop(log);
        let (_, got) = OpLog::open(&path).expect("reopen");
        assert_eq!(got, vec![record(4)]);
    }

    #[tokio::test]
    async fn records_written_inline_and_on_the_blocking_pool_keep_their_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (mut log, _) = OpLog::open(&path).expect("create");
        let sizes = [10, INLINE_RECORD + 1, 20, 3 * INLINE_RECORD, 0];
        let records: Vec<Record> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Record {
                ops: vec![i as u8; size],
                ..record(i as u64 + 1)
            })
            .collect();
        for r in &records {
            log.append(encode(r)).await.expect("append");
        }
        assert_eq!(
            log.len,
            std::fs::metadata(&path).expect("stat").len(),
            "the log's idea of its length is the file's"
        );
        drop(log);
        let (_, got) = OpLog::open(&path).expect("reopen");
        assert_eq!(got, records);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_later_records_follow_the_good_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (mut log, _) = OpLog::open(&path).expect("create");
        log.append(encode(&record(1))).await.expect("append");
        drop(log);
        // A crash halfway through the second record's write.
        let second = encode(&record(2));
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&second[..second.len() / 2]).expect("write");
        drop(file);

        let (mut log, got) = OpLog::open(&path).expect("reopen");
        assert_eq!(got, vec![record(1)]);
        log.append(encode(&record(3))).await.expect("append");
        drop(log);
        let (_, got) = OpLog::open(&path).expect("reopen");
        assert_eq!(got, vec![record(1), record(3)]);
    }

    #[test]
    fn a_flipped_bit_ends_the_log_there() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend(encode(&record(1)));
        let second = bytes.len();
        bytes.extend(encode(&record(2)));
        let (r, next) = read_record(&bytes, MAGIC.len()).expect("first");
        assert_eq!((r, next), (record(1), second));
        bytes[second + FRAME + 9] ^= 1;
        assert!(read_record(&bytes, second).is_none());
        // A length beyond the data is torn, not a panic.
        let mut short = MAGIC.to_vec();
        short.extend_from_slice(&u32::MAX.to_le_bytes());
        short.extend_from_slice(&[0; 4]);
        assert!(read_record(&short, MAGIC.len()).is_none());
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (first, _) = OpLog::open(&path).expect("open");
        let err = OpLog::open(&path).expect_err("locked");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        OpLog::open(&path).expect("open once released");
    }

    #[test]
    fn a_file_that_is_not_an_op_log_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, b"SQLite format 3\0").expect("write");
        assert!(matches!(OpLog::open(&path), Err(StoreError::Corrupt(_))));
    }
}
