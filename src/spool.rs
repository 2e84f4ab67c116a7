//! The file spool: where a file's chunks wait, sealed as the sender sealed them, for
//! the receivers that cannot take them as they arrive.
//!
//! A file streams to its online receivers while it arrives (design §3), but files
//! follow the same retry, expiry and durable rules as messages (§10): a receiver that
//! does not acknowledge gets it again, a durable subscriber that is offline gets it when
//! it comes back, and one that falls behind is switched to the spool rather than
//! holding the sender and the others back. So every file someone subscribes to is also
//! written here while it streams, one file per upload, and the core queues a copy of
//! it like a message's; sending that copy again streams the spool file
//! ([`Spool::stream`]). The chunks are end-to-end ciphertext (the broker holds no key),
//! so the spool is as encrypted as the wire.
//!
//! A spool file is removed when the core says every copy is done with (it counts them,
//! starting from the store's count at start-up, when files no copy needs any more are
//! removed), or by the sweep once its session's expiry has passed. Its size is bounded
//! by `--max-spool-size`, and each session's share of it by `--max-session-spool-size`
//! (so one tenant's files cannot take the room every other tenant's need); past
//! either, the file being written is refused.
//!
//! Layout: `<dir>/<file id hex>-<session>.spool`, written as `….part` and renamed once
//! whole (a broker that crashes mid-upload leaves only parts, removed at start). The
//! file is the magic [`MAGIC`], then records: a chunk is `0x01, u32 index, u32 length,
//! payload`; the end is `0x02, u16 length, sha256, u16 length, mac` (big-endian).

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncReadExt, BufReader};
use tokio::sync::oneshot;

use crate::carrier::files::{
    FileItem, FileMeta, FilePort, FileTrailer, RECEIVER_STALL, abort_later,
};
use crate::core::{ConnId, FastSet, Message, MessageId, Reject, SessionName};
use crate::proto;

/// The first bytes of every spool file (and its format's version).
pub const MAGIC: &[u8; 8] = b"FPSPOOL1";
/// The default `--max-spool-size`.
pub const DEFAULT_MAX_SPOOL_BYTES: u64 = 16 << 30;
/// The room a file of `size` bytes may take in the spool, its records' framing and
/// the sealing of its chunks included (chunks of 2 KiB or more: the SDK's are 64 KiB).
pub fn spooled_size(size: u64) -> u64 {
    size.saturating_add(size / 16).saturating_add(4096)
}

/// The default `--max-session-spool-size`: a quarter of the spool, so that four
/// sessions at their limit fill it, but room for one file of `--max-file-size` at
/// least (a share smaller than that would refuse such files only once they are
/// sent), and never more than the spool.
pub fn default_session_share(max_spool_bytes: u64, max_file_bytes: u64) -> u64 {
    (max_spool_bytes / 4)
        .max(spooled_size(max_file_bytes))
        .min(max_spool_bytes)
}
/// Largest chunk read back: a record claiming more is corrupt. (Chunks are bounded by
/// the largest frame, `--max-payload` (at most 256 MiB) plus 64 KiB.)
const MAX_CHUNK: usize = (256 << 20) + (64 << 10);
/// Kept past a session's expiry before the sweep removes a file, for the clock
/// difference between the file's last write and the file's acceptance.
const SWEEP_MARGIN: Duration = Duration::from_secs(60);

const TAG_CHUNK: u8 = 1;
const TAG_END: u8 = 2;

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the file spool is full")]
    Full,
    #[error("the session's share of the file spool is full")]
    SessionFull,
    #[error("a file with this id is still in the spool")]
    Exists,
    #[error("the file is no longer in the spool")]
    Missing,
    #[error("spool file {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("spool I/O on {path}")]
    Io { path: PathBuf, source: io::Error },
}

impl From<SpoolError> for Reject {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::Full => Reject::LimitExceeded("the broker's file spool is full"),
            SpoolError::SessionFull => Reject::LimitExceeded(
                "the session's share of the file spool is full; it has room again as its \
                 receivers take their files or they expire",
            ),
            // Not a replay (the replay guard answers those first): copies of an
            // earlier upload of this file that was not accepted still need it.
            SpoolError::Exists => {
                Reject::Internal("a copy of this file is still in the spool; send it again later")
            }
            other => {
                tracing::error!(error = %other, "file spool failed");
                Reject::Internal("the broker could not spool the file")
            }
        }
    }
}

/// Counts `len` more bytes on `used` if they keep it within `max`.
fn take(used: &AtomicU64, len: u64, max: u64) -> bool {
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
        used.checked_add(len).filter(|total| *total <= max)
    })
    .is_ok()
}

/// Uncounts `len` bytes (never below zero, whatever the order of removals).
fn release(used: &AtomicU64, len: u64) {
    let _ = used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
        Some(used.saturating_sub(len))
    });
}

/// The session a spool file belongs to, from its name (`<32 hex digits>-<session>.spool`).
fn session_of(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_suffix(".spool")?;
    (rest.as_bytes().get(32) == Some(&b'-')).then(|| rest.get(33..))?
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The spool directory of one broker.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Made for this process only (the memory store): removed when dropped.
    temporary: bool,
    max_bytes: u64,
    used: AtomicU64,
    max_session_bytes: u64,
    /// Bytes each session's files take. A writer holds its session's counter, so a
    /// chunk counts without the lock; counters stay once made (one per session).
    by_session: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Files being streamed from the spool now, so a retry that comes up while the
    /// last attempt is still streaming does not start a second stream.
    streaming: Mutex<FastSet<(ConnId, MessageId)>>,
}

impl Spool {
    /// Opens (creating it) the spool in `dir`. Parts of uploads a crash cut short are
    /// removed; whole files are kept for their copies in the store.
    pub fn open(dir: PathBuf, max_bytes: u64, max_session_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut used = 0;
        let mut by_session = HashMap::<String, Arc<AtomicU64>>::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("part") => fs::remove_file(&path).map_err(io_err(&path))?,
                Some("spool") => {
                    let len = entry.metadata().map_err(io_err(&path))?.len();
                    used += len;
                    if let Some(session) = session_of(&path) {
                        let used = by_session.entry(session.to_owned()).or_default();
                        used.fetch_add(len, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
        Ok(Spool {
            dir,
            temporary: false,
            max_bytes,
            used: AtomicU64::new(used),
            max_session_bytes,
            by_session: Mutex::new(by_session),
            streaming: Mutex::default(),
        })
    }

    /// A spool for this process only, in the system's temporary directory (for the
    /// memory store, whose queues do not outlive the process either).
    pub fn temporary(max_bytes: u64, max_session_bytes: u64) -> Result<Spool, SpoolError> {
        let dir = std::env::temp_dir().join(format!(
            "fastport-spool-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut spool = Spool::open(dir, max_bytes, max_session_bytes)?;
        spool.temporary = true;
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the spool holds now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes `session`'s files take now.
    pub fn used_by(&self, session: &str) -> u64 {
        self.lock_sessions()
            .get(session)
            .map_or(0, |used| used.load(Ordering::Relaxed))
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicU64>>> {
        self.by_session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `session`'s counter, made on its first file.
    fn session_counter(&self, session: &str) -> Arc<AtomicU64> {
        let mut sessions = self.lock_sessions();
        match sessions.get(session) {
            Some(used) => Arc::clone(used),
            None => Arc::clone(sessions.entry(session.to_owned()).or_default()),
        }
    }

    fn path(&self, session: &SessionName, file_id: &MessageId) -> PathBuf {
        // Session names are `[A-Za-z0-9_.-]`, and never a whole path component here.
        self.dir.join(format!("{file_id}-{session}.spool"))
    }

    /// Starts spooling a file.
    pub fn create(
        self: &Arc<Self>,
        session: &SessionName,
        file_id: &MessageId,
    ) -> Result<SpoolWriter, SpoolError> {
        let path = self.path(session, file_id);
        if path.exists() {
            return Err(SpoolError::Exists);
        }
        let part = path.with_extension("spool.part");
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => SpoolError::Exists,
                _ => SpoolError::Io {
                    path: part.clone(),
                    source: e,
                },
            })?;
        let mut writer = SpoolWriter {
            spool: Arc::clone(self),
            session_used: self.session_counter(session.as_str()),
            file: BufWriter::with_capacity(256 * 1024, file),
            part,
            path,
            written: 0,
            finished: false,
        };
        writer.write(&[MAGIC])?;
        Ok(writer)
    }

    /// Puts a finished file on disk (it was finished without, see
    /// [`SpoolWriter::finish`]).
    pub async fn sync(&self, session: &SessionName, file_id: &MessageId) -> Result<(), SpoolError> {
        self.sync_path(self.path(session, file_id)).await
    }

    async fn sync_path(&self, path: PathBuf) -> Result<(), SpoolError> {
        let dir = self.dir.clone();
        let sync = move || sync_file_and_dir(&path, &dir);
        tokio::task::spawn_blocking(sync).await.unwrap_or_else(|e| {
            Err(SpoolError::Io {
                path: self.dir.clone(),
                source: io::Error::other(e),
            })
        })
    }

    /// Uncounts `len` bytes, `session`'s if known (never below zero, whatever the
    /// order of removals).
    fn release_bytes(&self, session: Option<&str>, len: u64) {
        release(&self.used, len);
        let Some(session) = session else {
            return;
        };
        if let Some(used) = self.lock_sessions().get(session) {
            release(used, len);
        }
    }

    /// Removes a file whose copies are all done with.
    pub fn remove(&self, session: &SessionName, file_id: &MessageId) {
        self.remove_path(&self.path(session, file_id));
    }

    fn remove_path(&self, path: &Path) {
        let len = fs::metadata(path).map_or(0, |m| m.len());
        match fs::remove_file(path) {
            Ok(()) => self.release_bytes(session_of(path), len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file")
            }
        }
    }

    /// Removes every file but those of `queued` (the files the store still holds
    /// copies of, at start-up). Returns how many went.
    pub fn keep_only(&self, queued: &[(SessionName, MessageId)]) -> usize {
        let keep: std::collections::HashSet<PathBuf> = queued
            .iter()
            .map(|(session, id)| self.path(session, id))
            .collect();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for path in entries.flatten().map(|e| e.path()) {
            let spooled = path.extension().is_some_and(|e| e == "spool");
            if spooled && !keep.contains(&path) {
                self.remove_path(&path);
                removed += 1;
            }
        }
        removed
    }

    /// Removes the files older than their session's message expiry (`expiry_ms` by
    /// session name; `default_expiry_ms` for sessions not listed). Returns how many.
    pub fn sweep(
        &self,
        now: SystemTime,
        expiry_ms: &HashMap<String, u64>,
        default_expiry_ms: u64,
    ) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(session) = session_of(&path) else {
                continue;
            };
            let expiry = expiry_ms.get(session).copied().unwrap_or(default_expiry_ms);
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            let age = now.duration_since(modified).unwrap_or_default();
            if age > Duration::from_millis(expiry) + SWEEP_MARGIN {
                self.remove_path(&path);
                removed += 1;
            }
        }
        removed
    }

    /// Streams a spooled file to a receiver's file port: the header (the message's
    /// body), every chunk and the end. A stream of the same file to the same connection
    /// already under way is left to finish (`Ok(false)` at once).
    pub async fn stream(
        &self,
        conn: ConnId,
        message: &Message,
        port: &FilePort,
    ) -> Result<bool, SpoolError> {
        let key = (conn, message.id);
        if !self.lock_streaming().insert(key) {
            return Ok(false);
        }
        let result = self.stream_file(message, port).await;
        self.lock_streaming().remove(&key);
        result.map(|()| true)
    }

    fn lock_streaming(&self) -> std::sync::MutexGuard<'_, FastSet<(ConnId, MessageId)>> {
        self.streaming.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn stream_file(&self, message: &Message, port: &FilePort) -> Result<(), SpoolError> {
        let path = self.path(&message.session, &message.id);
        let corrupt = |why: String| SpoolError::Corrupt {
            path: path.clone(),
            why,
        };
        let header = proto::FileHeader::decode(message.payload.clone())
            .map_err(|e| corrupt(format!("stored header: {e}")))?;
        let meta = FileMeta::from_header(header)
            .map_err(|e| corrupt(format!("stored header: {}", e.reject)))?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SpoolError::Missing),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).await.map_err(io_err(&path))?;
        if &magic != MAGIC {
            return Err(corrupt("not a spool file".into()));
        }
        let file_id = meta.file_id;
        let send = |item| async {
            match tokio::time::timeout(RECEIVER_STALL, port.send(item)).await {
                Ok(Ok(())) => true,
                // The connection is gone, or stopped reading: the copy's retry or the
                // next connection tries again.
                Ok(Err(_)) => false,
                Err(_) => {
                    abort_later(port.clone(), file_id);
                    false
                }
            }
        };
        if !send(FileItem::Header(Arc::new(meta))).await {
            return Ok(());
        }
        loop {
            let read = read_record(&mut reader, &path).await;
            let item = match read {
                Ok(Record::Chunk { index, payload }) => FileItem::Chunk {
                    file_id,
                    index,
                    payload,
                },
                Ok(Record::End(trailer)) => {
                    let (written, _) = oneshot::channel();
                    let end = FileItem::End {
                        file_id,
                        trailer: Arc::new(trailer),
                        written,
                    };
                    send(end).await;
                    return Ok(());
                }
                Err(e) => {
                    abort_later(port.clone(), file_id);
                    return Err(e);
                }
            };
            if !send(item).await {
                return Ok(());
            }
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

enum Record {
    Chunk { index: u32, payload: Bytes },
    End(FileTrailer),
}

async fn read_record(
    reader: &mut BufReader<tokio::fs::File>,
    path: &Path,
) -> Result<Record, SpoolError> {
    let io = io_err(path);
    let corrupt = |why: &str| SpoolError::Corrupt {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let tag = reader.read_u8().await.map_err(io)?;
    let io = io_err(path);
    match tag {
        TAG_CHUNK => {
            let index = reader.read_u32().await.map_err(io_err(path))?;
            let len = reader.read_u32().await.map_err(io_err(path))? as usize;
            if len > MAX_CHUNK {
                return Err(corrupt("a chunk longer than any the broker accepts"));
            }
            let mut payload = BytesMut::zeroed(len);
            reader.read_exact(&mut payload).await.map_err(io)?;
            Ok(Record::Chunk {
                index,
                payload: payload.freeze(),
            })
        }
        TAG_END => {
            let mut field = async || -> Result<Bytes, SpoolError> {
                let len = reader.read_u16().await.map_err(io_err(path))? as usize;
                let mut bytes = BytesMut::zeroed(len);
                reader.read_exact(&mut bytes).await.map_err(io_err(path))?;
                Ok(bytes.freeze())
            };
            let sha256 = field().await?;
            let mac = field().await?;
            Ok(Record::End(FileTrailer { sha256, mac }))
        }
        _ => Err(corrupt("unknown record")),
    }
}

/// Syncs a spool file's data, then its directory (so its name survives a crash too).
fn sync_file_and_dir(path: &Path, dir: &Path) -> Result<(), SpoolError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// One file being written to the spool. Dropped before [`SpoolWriter::finish`], it
/// removes what it wrote.
pub struct SpoolWriter {
    spool: Arc<Spool>,
    /// Its session's count of bytes in the spool.
    session_used: Arc<AtomicU64>,
    file: BufWriter<fs::File>,
    part: PathBuf,
    path: PathBuf,
    written: u64,
    finished: bool,
}

impl SpoolWriter {
    /// Writes parts of one record, counting them against the spool's limit and the
    /// session's share.
    ///
    /// The write is synchronous: it lands in the page cache (the file is synced once,
    /// at the end, and only for durable receivers), and a chunk costs tens of
    /// microseconds, less than handing it to a blocking thread would.
    fn write(&mut self, parts: &[&[u8]]) -> Result<(), SpoolError> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        // Counted only if they fit, so a refusal takes no room from anyone else.
        if !take(&self.session_used, len, self.spool.max_session_bytes) {
            return Err(SpoolError::SessionFull);
        }
        if !take(&self.spool.used, len, self.spool.max_bytes) {
            release(&self.session_used, len);
            return Err(SpoolError::Full);
        }
        self.written += len;
        for part in parts {
            self.file.write_all(part).map_err(io_err(&self.part))?;
        }
        Ok(())
    }

    /// Appends a chunk, as the sender sealed it.
    pub fn chunk(&mut self, index: u32, payload: &[u8]) -> Result<(), SpoolError> {
        let mut head = [0u8; 9];
        head[0] = TAG_CHUNK;
        head[1..5].copy_from_slice(&index.to_be_bytes());
        head[5..9].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        self.write(&[&head, payload])
    }

    /// Appends the end and makes the file available under its final name; with
    /// `durable`, only once it is on disk (a durable receiver's copy, committed next,
    /// must not outlive it in a crash).
    pub async fn finish(mut self, trailer: &FileTrailer, durable: bool) -> Result<(), SpoolError> {
        let field = |b: &Bytes| (b.len().min(u16::MAX as usize) as u16).to_be_bytes();
        let (sha_len, mac_len) = (field(&trailer.sha256), field(&trailer.mac));
        let sha = &trailer.sha256[..trailer.sha256.len().min(u16::MAX as usize)];
        let mac = &trailer.mac[..trailer.mac.len().min(u16::MAX as usize)];
        self.write(&[&[TAG_END], &sha_len, sha, &mac_len, mac])?;
        self.file.flush().map_err(io_err(&self.part))?;
        fs::rename(&self.part, &self.path).map_err(io_err(&self.path))?;
        // From here the file is the spool's, under its name: removed (and uncounted)
        // through the spool only.
        self.finished = true;
        if durable && let Err(e) = self.spool.sync_path(self.path.clone()).await {
            self.spool.remove_path(&self.path);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.part);
            release(&self.spool.used, self.written);
            release(&self.session_used, self.written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(name: &str) -> SessionName {
        SessionName::parse(name).expect("valid")
    }

    #[test]
    fn a_session_s_share_holds_a_largest_file_by_default() {
        const GIB: u64 = 1 << 30;
        let share = default_session_share(16 * GIB, 4 * GIB);
        assert!(share >= spooled_size(4 * GIB) && share < 5 * GIB, "{share}");
        assert_eq!(default_session_share(64 * GIB, 4 * GIB), 16 * GIB);
        assert_eq!(
            default_session_share(GIB, 4 * GIB),
            GIB,
            "never past the spool"
        );
        // A file in 2 KiB chunks, the smallest spooled_size allows for.
        let size = 10 * 1024 * 1024;
        let chunks = size / 2048;
        let framing = MAGIC.len() as u64 + chunks * (9 + 65) + 69;
        assert!(size + framing <= spooled_size(size));
    }

    /// The spool counts each session's bytes apart: one session past its share is
    /// refused while others write on, the spool's own limit holds for all of them,
    /// and what a refused or removed file took is counted back, also after a restart.
    #[test]
    fn each_session_has_its_share_of_the_spool() {
        let header = MAGIC.len() as u64;
        let spool = Arc::new(Spool::temporary(3_000, 1_200).expect("spool"));
        let (a, b, c) = (session("a"), session("b"), session("c"));
        let mut first = spool.create(&a, &MessageId([1; 16])).expect("create");
        first.chunk(0, &[0; 1_000]).expect("within a's share");
        let mut second = spool.create(&a, &MessageId([2; 16])).expect("create");
        assert!(matches!(
            second.chunk(0, &[0; 200]),
            Err(SpoolError::SessionFull)
        ));
        // The refused chunk took nothing: a smaller one still fits.
        assert_eq!(spool.used_by("a"), 2 * header + 1_009);
        second.chunk(0, &[0; 100]).expect("room for 100 bytes more");
        drop(second);
        assert_eq!(spool.used_by("a"), header + 1_009);

        let mut other = spool.create(&b, &MessageId([3; 16])).expect("create");
        other
            .chunk(0, &[0; 1_000])
            .expect("b has a share of its own");
        let mut third = spool.create(&c, &MessageId([4; 16])).expect("create");
        assert!(matches!(third.chunk(0, &[0; 1_000]), Err(SpoolError::Full)));
        drop(third);
        assert_eq!(spool.used_by("c"), 0);
        assert_eq!(spool.used(), 2 * (header + 1_009));

        let trailer = FileTrailer {
            sha256: Bytes::from_static(&[0; 32]),
            mac: Bytes::from_static(&[0; 32]),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime
            .block_on(first.finish(&trailer, false))
            .expect("finish");
        let kept = spool.used_by("a");
        assert!(kept > header + 1_009, "the end record counts too: {kept}");
        let reopened = Spool::open(spool.dir().to_owned(), 3_000, 1_200).expect("reopen");
        assert_eq!(reopened.used_by("a"), kept, "counted again from the files");
        spool.remove(&a, &MessageId([1; 16]));
        assert_eq!(spool.used_by("a"), 0);
        drop(other);
        assert_eq!(spool.used(), 0);
    }
}
