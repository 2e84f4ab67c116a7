//! Files in the SDK: sealing and streaming a file out chunk by chunk, and receiving,
//! opening and verifying incoming files, without ever holding a whole file in memory.
//!
//! `NATIVE_V1` files (design §5): the name is a sealed message envelope bound to the
//! file id; each chunk is sealed and bound to the file id and its index; `FileEnd`
//! carries the plaintext's SHA-256 and a MAC over id, chunk count and hash. Legacy
//! files (`LEGACY_JSON`, for the Dart clients) have a plain name, chunks sealed with the
//! raw key, and the hash only.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use crate::core::{FastSet, SessionName, TopicFilter, TopicName};
use crate::proto::{
    self, ClientFrame, ErrorCode, PayloadFormat, ServerFrame, client_frame, server_frame,
};

use super::crypto::{CryptoError, MessageContext, SealingKeys};
use super::transport;
use super::{ClientError, Request, SubscribeOptions};

/// Plaintext bytes per chunk (the seed used 64 KiB).
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Decrypted chunks buffered per incoming file before the sender is slowed down.
const INCOMING_BUFFER: usize = 8;
/// How long a file that no subscription wants yet waits for one (in steps): 1 s.
const SUBSCRIBE_GRACE_STEPS: usize = 20;
const SUBSCRIBE_GRACE_STEP: std::time::Duration = std::time::Duration::from_millis(50);

/// The broker accepted a file: every online subscriber has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileReceipt {
    pub file_id: [u8; 16],
    pub bytes: u64,
    pub chunks: u32,
}

/// Where an outgoing file's frames go.
pub(super) enum FileSink {
    /// Its own QUIC stream.
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    /// Multiplexed on the WebSocket control channel, through the session task.
    Multiplexed {
        requests: mpsc::Sender<Request>,
        refusal: Refusal,
    },
}

/// Where the session task puts the broker's refusal of a multiplexed upload (or the
/// loss of its connection) as soon as it comes, so the uploader stops sending a file
/// that can no longer arrive instead of streaming the rest of it for nothing.
pub(super) type Refusal = Arc<OnceLock<ClientError>>;

/// What the session task hands out for one upload.
pub(super) struct FileStart {
    pub file_id: [u8; 16],
    pub sink: FileSink,
    pub session: SessionName,
    pub keys: SealingKeys,
    pub timestamp_ms: u64,
}

impl FileSink {
    async fn send(&mut self, frame: ClientFrame) -> Result<(), ClientError> {
        match self {
            FileSink::Quic { send, recv } => {
                let mut buf = BytesMut::new();
                crate::carrier::framing::encode_frame(&frame, &mut buf);
                match send.write_chunk(buf.freeze()).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(refusal_or(recv, e).await),
                }
            }
            FileSink::Multiplexed { requests, .. } => requests
                .send(Request::FileFrame(frame))
                .await
                .map_err(|_| ClientError::Closed),
        }
    }

    /// The reason the upload can no longer succeed, if one is known before its end.
    /// (A QUIC upload learns it from its stream: the broker stops reading it.)
    fn refused(&self) -> Option<ClientError> {
        match self {
            FileSink::Quic { .. } => None,
            FileSink::Multiplexed { refusal, .. } => refusal.get().cloned(),
        }
    }

    /// Sends `FileEnd` and waits for the broker's answer.
    async fn finish(self, end: ClientFrame, file_id: [u8; 16]) -> Result<(), ClientError> {
        match self {
            FileSink::Quic { mut send, mut recv } => {
                let mut buf = BytesMut::new();
                crate::carrier::framing::encode_frame(&end, &mut buf);
                if let Err(e) = send.write_chunk(buf.freeze()).await {
                    return Err(refusal_or(&mut recv, e).await);
                }
                let _ = send.finish();
                let answer = read_answer(&mut recv).await?;
                upload_answer(answer)
            }
            FileSink::Multiplexed { requests, .. } => {
                let (reply, answer) = oneshot::channel();
                requests
                    .send(Request::FileEnd {
                        frame: end,
                        file_id,
                        reply,
                    })
                    .await
                    .map_err(|_| ClientError::Closed)?;
                answer.await.map_err(|_| ClientError::Closed)?
            }
        }
    }
}

/// Why writing an upload failed: a broker that refuses a file (too large, spool
/// full…) says why on the stream, then stops reading it, so the write fails first;
/// its answer is the error to report, not the write's "stopped by peer".
async fn refusal_or(recv: &mut quinn::RecvStream, write: quinn::WriteError) -> ClientError {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    match tokio::time::timeout(WAIT, read_answer(recv)).await {
        Ok(Ok(answer)) => upload_answer(answer)
            .err()
            .unwrap_or_else(|| ClientError::Transfer(format!("the upload stream failed: {write}"))),
        _ => ClientError::Transfer(format!("the upload stream failed: {write}")),
    }
}

/// The broker's one answer on an upload stream.
async fn read_answer(recv: &mut quinn::RecvStream) -> Result<ServerFrame, ClientError> {
    let mut decoder = crate::carrier::framing::FrameDecoder::new(transport::MAX_FRAME);
    loop {
        if let Some(bytes) = decoder
            .next_frame()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return crate::carrier::framing::decode(bytes)
                .map_err(|e| ClientError::Protocol(e.to_string()));
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
            _ => {
                return Err(ClientError::Transfer(
                    "the upload stream ended without an answer".into(),
                ));
            }
        }
    }
}

/// `FileAccepted` → Ok, `Error` → the refusal.
pub(super) fn upload_answer(frame: ServerFrame) -> Result<(), ClientError> {
    match frame.kind {
        Some(server_frame::Kind::FileAccepted(_)) => Ok(()),
        Some(server_frame::Kind::Error(e)) => Err(ClientError::Refused {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
        }),
        other => Err(ClientError::Protocol(format!(
            "unexpected answer to a file: {other:?}"
        ))),
    }
}

fn frame(kind: client_frame::Kind) -> ClientFrame {
    ClientFrame { kind: Some(kind) }
}

/// Seals and streams one file; returns once the broker accepted it.
pub(super) async fn upload(
    start: FileStart,
    topic: &str,
    name: &str,
    mut data: impl AsyncRead + Unpin,
    size: u64,
    format: PayloadFormat,
) -> Result<FileReceipt, ClientError> {
    TopicName::check(topic)?;
    let FileStart {
        file_id,
        mut sink,
        session,
        keys,
        timestamp_ms,
    } = start;
    let ctx = MessageContext {
        session: session.as_str(),
        topic,
        id: &file_id,
        timestamp_ms,
    };
    let legacy = format == PayloadFormat::LegacyJson;
    let sealed_name = if legacy {
        Bytes::copy_from_slice(name.as_bytes())
    } else {
        Bytes::from(keys.seal_file_name(&ctx, name)?)
    };
    let chunk_count = u32::try_from(size.div_ceil(CHUNK_SIZE as u64))
        .map_err(|_| ClientError::Protocol("file too large for 32-bit chunk indexes".into()))?;
    let id_bytes = Bytes::copy_from_slice(&file_id);
    sink.send(frame(client_frame::Kind::FileHeader(proto::FileHeader {
        file_id: id_bytes.clone(),
        topic: topic.to_owned(),
        name: sealed_name,
        size,
        chunk_size: CHUNK_SIZE as u32,
        timestamp_ms,
        format: format as i32,
        chunk_count,
    })))
    .await?;

    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut sent = 0u64;
    for index in 0..chunk_count {
        if let Some(refusal) = sink.refused() {
            return Err(refusal);
        }
        let want = (size - sent).min(CHUNK_SIZE as u64) as usize;
        data.read_exact(&mut buf[..want])
            .await
            .map_err(|e| ClientError::Protocol(format!("reading the file: {e}")))?;
        let plain = &buf[..want];
        hasher.update(plain);
        let payload = if legacy {
            keys.seal_legacy_chunk(plain)
        } else {
            keys.seal_chunk(&ctx, index, plain)?
        };
        sink.send(frame(client_frame::Kind::FileChunk(proto::FileChunk {
            file_id: id_bytes.clone(),
            index,
            payload: Bytes::from(payload),
        })))
        .await?;
        sent += want as u64;
    }
    let sha256: [u8; 32] = hasher.finalize().into();
    let mac = if legacy {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&keys.file_end_mac(&file_id, chunk_count, &sha256))
    };
    let end = frame(client_frame::Kind::FileEnd(proto::FileEnd {
        file_id: id_bytes,
        sha256: Bytes::copy_from_slice(&sha256),
        mac,
    }));
    sink.finish(end, file_id).await?;
    Ok(FileReceipt {
        file_id,
        bytes: size,
        chunks: chunk_count,
    })
}

/// A file arriving for one of this client's file subscriptions. Chunks are opened and
/// checked as they come; after the last one the whole file's SHA-256 (and, for
/// `NATIVE_V1`, its MAC) is verified: a mismatch ends the file with an error.
pub struct IncomingFile {
    pub file_id: [u8; 16],
    pub topic: String,
    /// The decrypted file name.
    pub name: String,
    /// Declared plaintext size.
    pub size: u64,
    pub format: PayloadFormat,
    chunks: mpsc::Receiver<Result<Bytes, ClientError>>,
}

impl std::fmt::Debug for IncomingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingFile")
            .field("topic", &self.topic)
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl IncomingFile {
    /// The next decrypted chunk; `None` once the whole file arrived and verified.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        self.chunks.recv().await
    }

    /// Reads the whole file into memory (for small files; stream large ones).
    pub async fn read_to_end(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(self.size.min(64 << 20) as usize);
        while let Some(chunk) = self.next_chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}

/// Raw file frames from the broker, in order, for one file.
#[derive(Debug)]
pub(super) enum FilePart {
    Header(proto::FileHeader),
    Chunk(proto::FileChunk),
    End(proto::FileEnd),
    Aborted(String),
}

/// One file subscription: its id, filter, options and where its files go.
type FileSub = (
    u64,
    TopicFilter,
    SubscribeOptions,
    mpsc::Sender<IncomingFile>,
);

/// The client's file subscriptions, shared with the tasks that receive files.
#[derive(Clone, Default)]
pub(super) struct FileSubs {
    subs: Arc<Mutex<Vec<FileSub>>>,
}

impl FileSubs {
    pub fn add(
        &self,
        id: u64,
        filter: TopicFilter,
        options: SubscribeOptions,
        sink: mpsc::Sender<IncomingFile>,
    ) {
        self.lock().push((id, filter, options, sink));
    }

    /// Forgets subscription `id`, returning its filter and options.
    pub fn remove(&self, id: u64) -> Option<(TopicFilter, SubscribeOptions)> {
        let mut subs = self.lock();
        let at = subs.iter().position(|(sub, ..)| *sub == id)?;
        let (_, filter, options, _) = subs.swap_remove(at);
        Some((filter, options))
    }

    /// Ends every subscription to `filter` (their streams end).
    pub fn end(&self, filter: &TopicFilter) {
        self.lock().retain(|(_, f, ..)| f != filter);
    }

    /// The filters and options of the subscriptions still open. (One whose handle was
    /// dropped stays listed here until [`FileSubs::remove`], so that it can be ended on
    /// the broker then, but is skipped.)
    pub fn filters(&self) -> Vec<(TopicFilter, SubscribeOptions)> {
        self.lock()
            .iter()
            .filter(|(_, _, _, sink)| !sink.is_closed())
            .map(|(_, f, o, _)| (f.clone(), *o))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<FileSub>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sinks_for(&self, topic: &TopicName) -> Vec<mpsc::Sender<IncomingFile>> {
        self.lock()
            .iter()
            .filter(|(_, f, _, sink)| !sink.is_closed() && f.matches(topic))
            .map(|(_, _, _, s)| s.clone())
            .collect()
    }
}

/// The files this client is receiving or verified lately, by id: a copy the broker
/// sends again (its `Ack` was lost, or crossed a retry) is acknowledged again, or left
/// to the stream already bringing it, not handed over twice.
#[derive(Clone, Default)]
pub(super) struct ReceivedFiles {
    inner: Arc<Mutex<Recent>>,
}

#[derive(Default)]
struct Recent {
    receiving: FastSet<[u8; 16]>,
    verified: FastSet<[u8; 16]>,
    /// `verified` in the order they came (to forget the oldest).
    order: VecDeque<[u8; 16]>,
}

/// What to do with a file that starts arriving.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    New,
    /// Verified before: acknowledge it again.
    Had,
    /// Arriving on another stream already.
    Busy,
}

impl ReceivedFiles {
    /// Files remembered; the oldest is forgotten past this.
    const CAPACITY: usize = 4096;

    fn begin(&self, id: [u8; 16]) -> Arrival {
        let mut recent = self.lock();
        if recent.verified.contains(&id) {
            Arrival::Had
        } else if !recent.receiving.insert(id) {
            Arrival::Busy
        } else {
            Arrival::New
        }
    }

    fn end(&self, id: [u8; 16], verified: bool) {
        let mut recent = self.lock();
        recent.receiving.remove(&id);
        if verified && recent.verified.insert(id) {
            recent.order.push_back(id);
            if recent.order.len() > Self::CAPACITY
                && let Some(old) = recent.order.pop_front()
            {
                recent.verified.remove(&old);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything a receiving task needs to open files.
#[derive(Clone)]
pub(super) struct Opener {
    pub session: SessionName,
    pub keys: SealingKeys,
    pub subs: FileSubs,
    pub received: ReceivedFiles,
    /// To acknowledge verified files on the control channel.
    pub requests: mpsc::WeakSender<Request>,
}

fn bad(e: CryptoError) -> ClientError {
    ClientError::Crypto(e)
}

/// Receives one file's parts, opens and verifies them, and hands the file to the
/// matching file subscriptions.
pub(super) async fn receive(opener: Opener, mut parts: mpsc::Receiver<FilePart>) {
    let Some(FilePart::Header(h)) = parts.recv().await else {
        return;
    };
    let (Ok(file_id), Ok(topic)) = (
        <[u8; 16]>::try_from(&h.file_id[..]),
        TopicName::parse(&h.topic),
    ) else {
        tracing::warn!("file header with a bad id or topic");
        return;
    };
    let format = match PayloadFormat::try_from(h.format) {
        Ok(PayloadFormat::LegacyJson) => PayloadFormat::LegacyJson,
        _ => PayloadFormat::NativeV1,
    };
    let legacy = format == PayloadFormat::LegacyJson;
    let session = opener.session.clone();
    let ctx = MessageContext {
        session: session.as_str(),
        topic: topic.as_str(),
        id: &file_id,
        timestamp_ms: h.timestamp_ms,
    };
    let name = if legacy {
        Ok(String::from_utf8_lossy(&h.name).into_owned())
    } else {
        opener.keys.open_file_name(&ctx, &h.name)
    };
    let name = match name {
        Ok(name) => name,
        Err(e) => {
            tracing::warn!(topic = %topic, error = %e, "dropping a file whose name failed verification");
            return;
        }
    };
    let ack = |request| async {
        if let Some(requests) = opener.requests.upgrade() {
            let _ = requests.send(request).await;
        }
    };
    match opener.received.begin(file_id) {
        Arrival::New => {}
        Arrival::Had => return ack(Request::AckFile(file_id)).await,
        Arrival::Busy => return, // the stream already bringing it acknowledges it
    }
    // A durable backlog starts when the client connects, often just before the
    // application subscribes again: a file that comes first waits a moment for it
    // (its stream paused by flow control) rather than a whole retry interval.
    let mut sinks = opener.subs.sinks_for(&topic);
    for _ in 0..SUBSCRIBE_GRACE_STEPS {
        if !sinks.is_empty() {
            break;
        }
        tokio::time::sleep(SUBSCRIBE_GRACE_STEP).await;
        sinks = opener.subs.sinks_for(&topic);
    }
    if sinks.is_empty() {
        opener.received.end(file_id, false);
        let topic = topic.as_str().to_owned();
        return ack(Request::UnwantedFile { file_id, topic }).await;
    }
    // One reader per subscription that matches.
    let mut outs = Vec::new();
    for sink in sinks {
        let (tx, rx) = mpsc::channel(INCOMING_BUFFER);
        let file = IncomingFile {
            file_id,
            topic: topic.as_str().to_owned(),
            name: name.clone(),
            size: h.size,
            format,
            chunks: rx,
        };
        if sink.send(file).await.is_ok() {
            outs.push(tx);
        }
    }

    let mut hasher = Sha256::new();
    let mut next_index = 0u32;
    let verdict = loop {
        match parts.recv().await {
            Some(FilePart::Chunk(c)) => {
                if c.index != next_index {
                    break Err(ClientError::Protocol(format!(
                        "chunk {} out of order",
                        c.index
                    )));
                }
                let opened = if legacy {
                    opener.keys.open_legacy_chunk(&c.payload)
                } else {
                    opener.keys.open_chunk(&ctx, c.index, &c.payload)
                };
                let plain = match opened {
                    Ok(plain) => Bytes::from(plain),
                    Err(e) => break Err(bad(e)),
                };
                hasher.update(&plain);
                next_index += 1;
                for out in &outs {
                    let _ = out.send(Ok(plain.clone())).await;
                }
            }
            Some(FilePart::End(e)) => {
                let sha256: [u8; 32] = hasher.clone().finalize().into();
                if e.sha256.as_ref() != sha256 {
                    break Err(ClientError::Crypto(CryptoError::HashMismatch));
                }
                if !legacy
                    && let Err(err) = opener
                        .keys
                        .verify_file_end(&file_id, next_index, &sha256, &e.mac)
                {
                    break Err(bad(err));
                }
                break Ok(());
            }
            Some(FilePart::Aborted(why)) => {
                break Err(ClientError::Transfer(format!(
                    "file transfer aborted: {why}"
                )));
            }
            Some(FilePart::Header(_)) | None => {
                break Err(ClientError::Transfer("the file stream ended early".into()));
            }
        }
    };
    match verdict {
        Ok(()) => {
            opener.received.end(file_id, true);
            ack(Request::AckFile(file_id)).await;
        }
        Err(e) => {
            opener.received.end(file_id, false);
            tracing::warn!(topic = %topic, error = %e, "incoming file failed");
            for out in &outs {
                let _ = out.send(Err(e.clone())).await;
            }
        }
    }
}

/// Reads the broker's unidirectional file streams of one QUIC connection.
pub(super) async fn accept_quic_files(conn: quinn::Connection, opener: Opener) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let opener = opener.clone();
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(INCOMING_BUFFER);
            tokio::spawn(receive(opener, rx));
            let mut decoder = crate::carrier::framing::FrameDecoder::new(transport::MAX_FRAME);
            loop {
                loop {
                    let part = match decoder.next_frame() {
                        Ok(Some(bytes)) => {
                            match crate::carrier::framing::decode::<ServerFrame>(bytes) {
                                Ok(ServerFrame { kind: Some(kind) }) => part_of(kind),
                                _ => return,
                            }
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    };
                    let Some(part) = part else { continue };
                    if tx.send(part).await.is_err() {
                        return;
                    }
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(FilePart::Aborted(e.to_string())).await;
                        return;
                    }
                }
            }
        });
    }
}

/// The file part a server frame carries, if any.
pub(super) fn part_of(kind: server_frame::Kind) -> Option<FilePart> {
    match kind {
        server_frame::Kind::FileHeader(h) => Some(FilePart::Header(h)),
        server_frame::Kind::FileChunk(c) => Some(FilePart::Chunk(c)),
        server_frame::Kind::FileEnd(e) => Some(FilePart::End(e)),
        server_frame::Kind::Error(e) => Some(FilePart::Aborted(e.message)),
        _ => None,
    }
}
