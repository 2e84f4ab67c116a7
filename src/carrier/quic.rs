//! The native QUIC carrier: ALPN `fastport/1`, the client's first bidirectional stream
//! is the control stream, carrying varint-length-prefixed protobuf frames.
//!
//! The broker owns the `quinn::Endpoint` and dispatches each connection on its
//! negotiated ALPN, so browser WebTransport (ALPN `h3`) can share the UDP port later
//! without the core knowing.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;

use crate::core::{ConnId, Event, MessageId, Reject};
use crate::driver::DriverHandle;
use crate::proto::{self, ClientFrame, ServerFrame, client_frame, server_frame};

use super::files::{self, FILE_PORT_CAPACITY, FileItem, FileMeta, Upload};
use super::framing::{self, FrameDecoder, WriteQueue};
use super::{Link, LinkContext, Outbound, Refused, Request, native};

/// ALPN of the native protocol.
pub const ALPN_NATIVE: &[u8] = b"fastport/1";
/// ALPN of HTTP/3 (WebTransport).
pub const ALPN_H3: &[u8] = b"h3";

/// Idle timeout of QUIC connections (the SDK sends keep-alives well inside it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an upload may go without a frame before it is dropped (it holds a spool
/// file and one of the connection's upload slots).
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// File uploads one connection may have open at once.
pub const MAX_UPLOADS: u32 = 7;

/// Writes are coalesced up to this many bytes per stream write.
const WRITE_COALESCE: usize = 64 * 1024;

/// Kernel buffer asked for each direction of the broker's UDP socket. Every client
/// shares the one socket, so a burst from many publishers at once lands in its receive
/// queue together; at Linux's default (208 KiB) the queue overflows, datagrams are
/// dropped, and each connection stalls until QUIC's loss detection resends them.
const UDP_BUFFER: usize = 4 << 20;

/// Flow-control credit the broker gives each stream of a client: what one stream can
/// make the broker hold unread. Twice this was no faster for 1 MiB messages, and cost
/// file fan-out (W7) 16 MiB of peak RSS and 15% more CPU.
pub const STREAM_WINDOW: u32 = 2 << 20;
/// Credit over all of a connection's streams (quinn's default is unbounded).
const CONNECTION_WINDOW: u32 = 16 << 20;

/// QUIC application close codes: 0 for a normal close, otherwise the `ErrorCode`.
const CLOSE_NORMAL: u32 = 0;

/// Loads the QUIC stateless-reset key from `path`, creating it (mode 0600) if missing.
///
/// The key outlives the process on purpose: after a crash, the restarted broker can
/// answer a client of the old process with a valid stateless reset, so the client knows
/// its connection is gone and reconnects at once instead of waiting out the idle timeout.
pub fn load_reset_key(path: &Path) -> std::io::Result<[u8; 64]> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() == 64 => {
            let mut key = [0u8; 64];
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Ok(_) => tracing::warn!(path = %path.display(), "malformed QUIC reset key; replacing it"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key: [u8; 64] = rand::random();
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&tmp)?, &key)?;
    std::fs::rename(&tmp, path)?;
    Ok(key)
}

/// Binds the broker's UDP socket, with [`UDP_BUFFER`] asked for each direction; warns
/// when the host grants less, since that is what drops datagrams under load.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let (socket, buffers) = crate::udp::bind(addr, UDP_BUFFER)?;
    if buffers.short_of(UDP_BUFFER) {
        tracing::warn!(
            asked = UDP_BUFFER,
            recv = buffers.recv,
            send = buffers.send,
            "the kernel capped the QUIC socket's buffers; raise net.core.rmem_max and \
             net.core.wmem_max to at least {UDP_BUFFER} so bursts are not dropped and resent"
        );
    } else {
        tracing::debug!(
            recv = buffers.recv,
            send = buffers.send,
            "QUIC socket buffers"
        );
    }
    Ok(socket)
}

/// Builds the endpoint on a UDP socket from [`bind`].
pub fn endpoint(
    socket: UdpSocket,
    tls: rustls::ServerConfig,
    reset_key: &[u8; 64],
) -> std::io::Result<Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().map_err(std::io::Error::other)?,
        ))
        // The control stream and up to MAX_UPLOADS file uploads at a time (a client
        // with more waits for one to finish). quinn keeps state for each allowed
        // stream from the start, so this is memory on every idle connection.
        .max_concurrent_bidi_streams(VarInt::from_u32(1 + MAX_UPLOADS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // No unreliable datagrams in the protocol: no buffer for them.
        .datagram_receive_buffer_size(None)
        // Room for a 1 MiB message in flight while the last is read: at quinn's
        // default (1.25 MB) a publisher of large messages stalls on credit (W5, same
        // hour: durable 144-157 -> 155-173 MB/s, broker peak RSS 131-231 -> 60-93 MiB).
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .ack_frequency_config(Some(ack_frequency()));
    config.transport_config(Arc::new(transport));
    // Connection ids are validated with a key derived from the same persistent secret,
    // so the restarted broker recognises its predecessor's ids and resets them instead
    // of dropping the packets as noise.
    let digest = <sha2::Sha256 as sha2::Digest>::digest([&reset_key[..], b"fastport cid"].concat());
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Endpoint::new_with_abstract_socket(
        endpoint_config,
        Some(config),
        crate::udp::QuicSocket::new(socket)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// What the broker asks its clients' QUIC stacks (the ACK frequency extension): an
/// ACK for every few packets rather than every other one. Deliveries stream from the
/// broker, and each ACK costs a datagram, a system call and a wake-up at each end.
pub fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(ACK_EVERY - 1));
    ack
}

/// Ack-eliciting packets per ACK asked of the peer (see [`ack_frequency`]).
const ACK_EVERY: u32 = 8;

/// Accepts connections until the endpoint is closed.
///
/// An Initial packet's source address is not proven: anyone can send them from
/// forged addresses, each asking for a TLS handshake (key exchange, signature). Past
/// `--quic-retry-above` handshakes under way, a client must first prove it receives
/// at its address (a QUIC Retry: a stateless token, one round trip more), so such a
/// flood costs the broker a small reply per packet and real clients still get in.
pub async fn serve(endpoint: Endpoint, ctx: Arc<LinkContext>) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        let peer = incoming.remote_address();
        // A full broker sheds newcomers before any handshake work; the client reads
        // "the server refused to accept a new connection".
        if ctx.connections.available_permits() == 0 {
            tracing::debug!(%peer, "at --max-connections: refused");
            incoming.refuse();
            continue;
        }
        let busy = handshaking.load(Ordering::Relaxed) >= ctx.limits.quic_retry_above;
        if busy && !incoming.remote_address_validated() {
            tracing::debug!(%peer, "asked to prove its address first (QUIC Retry)");
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let ctx = ctx.clone();
        let handshake = Handshake::begin(&handshaking);
        tokio::spawn(async move {
            let connected = incoming.await;
            drop(handshake);
            let conn = match connected {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            // Taken only now: a handshake from a forged address never completes, so
            // a flood of them cannot hold the slots real clients need.
            let Some(_slot) = ctx.connection_slot() else {
                let code = VarInt::from_u32(Reject::LimitExceeded("").code() as u32);
                conn.close(code, b"the broker has as many connections open as it may");
                return;
            };
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<HandshakeData>().ok())
                .and_then(|d| d.protocol);
            match alpn.as_deref() {
                Some(ALPN_NATIVE) => serve_native(conn, ctx).await,
                Some(ALPN_H3) => conn.close(
                    VarInt::from_u32(0x0101), // H3_GENERAL_PROTOCOL_ERROR
                    b"WebTransport is not enabled on this broker",
                ),
                _ => conn.close(VarInt::from_u32(0x0178), b"unsupported ALPN"),
            }
        });
    }
}

/// One handshake under way, counted until dropped.
struct Handshake(Arc<AtomicUsize>);

impl Handshake {
    fn begin(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_native(conn: Connection, ctx: Arc<LinkContext>) {
    let peer = conn.remote_address();
    let hello_deadline = Instant::now() + ctx.limits.hello_timeout;
    let (send, recv) = match tokio::time::timeout_at(hello_deadline, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            let code = VarInt::from_u32(Reject::NotAuthenticated.code() as u32);
            conn.close(code, b"no control stream within the Hello deadline");
            return;
        }
    };
    let capacity = ctx.limits.outbound_capacity(ctx.driver.core_config());
    let (tx, rx) = mpsc::channel(capacity);
    let (files_tx, files_rx) = mpsc::channel(FILE_PORT_CAPACITY);
    let max_frame = ctx.limits.max_frame;
    let driver = ctx.driver.clone();
    let mut link = Link::new(ctx, peer.ip(), false, tx, files_tx);
    let writer = tokio::spawn(write_control(
        conn.clone(),
        send,
        rx,
        link.publish_slots(),
        link.kick(),
    ));
    tokio::spawn(write_files(conn.clone(), files_rx));
    tokio::spawn(accept_uploads(
        conn.clone(),
        driver,
        link.conn_cell(),
        max_frame,
    ));

    read_control(&mut link, recv, hello_deadline).await;
    link.close().await;
    let _ = writer.await;
    tracing::debug!(%peer, "QUIC connection ended");
}

/// Reads frames from the control stream into the link until the stream ends, breaks,
/// or the client fails to authenticate in time.
async fn read_control(link: &mut Link, mut recv: RecvStream, hello_deadline: Instant) {
    let mut decoder = FrameDecoder::new(link.limits().max_frame);
    loop {
        loop {
            let bytes = match decoder.next_frame() {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break,
                Err(e) => return link.fail(Reject::InvalidFrame(e.to_string())).await,
            };
            let frame: ClientFrame = match framing::decode(bytes) {
                Ok(frame) => frame,
                Err(e) => return link.fail(Reject::InvalidFrame(e.to_string())).await,
            };
            let outcome = match Request::try_from(frame) {
                Ok(request) => link.handle(request).await,
                Err(refused) => {
                    link.refuse(refused).await;
                    Ok(())
                }
            };
            if outcome.is_err() {
                return link
                    .fail(Reject::Internal("the broker is shutting down"))
                    .await;
            }
        }
        let read = recv.read_chunk(WRITE_COALESCE, true);
        let chunk = if link.is_attached() {
            read.await
        } else {
            match tokio::time::timeout_at(hello_deadline, read).await {
                Ok(chunk) => chunk,
                Err(_) => {
                    let reject = Reject::InvalidFrame("no successful Hello within 5 s".into());
                    return link.fail(reject).await;
                }
            }
        };
        match chunk {
            Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
            Ok(None) | Err(_) => return,
        }
    }
}

/// Drains the connection's outbound queue onto the control stream, then closes the
/// connection: with the refusal if one was queued, or at once if the broker kicked it.
async fn write_control(
    conn: Connection,
    mut send: SendStream,
    mut rx: mpsc::Receiver<Outbound>,
    publish_slots: Arc<Semaphore>,
    kick: Arc<Notify>,
) {
    let closing = tokio::select! {
        closing = pump(&mut send, &mut rx, &publish_slots) => closing,
        _ = kick.notified() => {
            publish_slots.close();
            let reject = Reject::LimitExceeded("outbound queue full: the client is not reading");
            let reason = reject.to_string();
            conn.close(VarInt::from_u32(reject.code() as u32), reason.as_bytes());
            return;
        }
    };
    // Nothing more will be answered: a reader waiting for a publish slot gives up.
    publish_slots.close();
    let _ = send.finish();
    match closing {
        Some(reject) => close_after(&conn, &mut send, &reject).await,
        None => conn.close(VarInt::from_u32(CLOSE_NORMAL), b"bye"),
    }
}

/// Writes queued items, coalescing what is already queued into one stream write.
/// Returns the refusal to close with, if one was queued.
async fn pump(
    send: &mut SendStream,
    rx: &mut mpsc::Receiver<Outbound>,
    publish_slots: &Semaphore,
) -> Option<Reject> {
    // Grows to what a burst needs; an idle connection holds no write buffer.
    let mut queue = WriteQueue::default();
    while let Some(first) = rx.recv().await {
        let mut closing = None;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            if item.answers_publish() {
                publish_slots.add_permits(1);
            }
            if let Outbound::Close(reject) = &item {
                closing = Some(Reject::clone(reject));
            }
            native::queue_server_frame(&item, &mut queue);
            if closing.is_some() || queue.len() >= WRITE_COALESCE {
                break;
            }
            next = rx.try_recv().ok();
        }
        if send.write_all_chunks(queue.chunks()).await.is_err() {
            return None;
        }
        queue.clear();
        if closing.is_some() {
            return closing;
        }
    }
    None
}

/// Frames read from one QUIC stream.
struct StreamFrames {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl StreamFrames {
    fn new(recv: RecvStream, max_frame: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max_frame),
        }
    }

    /// The next frame; `Ok(None)` when the stream ends (or breaks) between frames.
    async fn next(&mut self) -> Result<Option<ClientFrame>, Reject> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(bytes)) => {
                    return framing::decode(bytes)
                        .map(Some)
                        .map_err(|e| Reject::InvalidFrame(e.to_string()));
                }
                Ok(None) => {}
                Err(e) => return Err(Reject::InvalidFrame(e.to_string())),
            }
            match self.recv.read_chunk(WRITE_COALESCE, true).await {
                Ok(Some(chunk)) => self.decoder.extend(&chunk.bytes),
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }
}

/// Every bidirectional stream after the control stream is one file upload.
async fn accept_uploads(
    conn: Connection,
    driver: DriverHandle,
    conn_id: Arc<OnceLock<ConnId>>,
    max_frame: usize,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_upload(
            conn.clone(),
            send,
            StreamFrames::new(recv, max_frame),
            driver.clone(),
            conn_id.clone(),
        ));
    }
}

async fn reply(send: &mut SendStream, kind: server_frame::Kind) {
    let frame = ServerFrame { kind: Some(kind) };
    let _ = send.write_chunk(files::encode(&frame)).await;
    let _ = send.finish();
}

async fn refuse_upload(send: &mut SendStream, refused: Refused) {
    let item = Outbound::Event(Event::error(refused.reject, 0, refused.message_id));
    if let Some(kind) = native::server_frame(&item).kind {
        reply(send, kind).await;
    }
}

/// How an upload stream ended.
enum UploadEnd {
    /// The file is accepted: `FileAccepted` is owed.
    Accepted(MessageId),
    /// The sender went away before the file's end.
    Gone,
    /// A well-formed frame was refused: an `Error` on the stream; the connection
    /// lives on.
    Refused(Refused),
    /// Bytes that do not decode: `INVALID_FRAME`, and the connection is closed
    /// (design §10), as on the control stream.
    Broken(Refused),
}

/// One file upload: `FileHeader`, chunks, `FileEnd` in; `FileAccepted` or `Error` out.
async fn serve_upload(
    conn: Connection,
    mut send: SendStream,
    mut frames: StreamFrames,
    driver: DriverHandle,
    conn_id: Arc<OnceLock<ConnId>>,
) {
    // The upload is over (and, unless accepted, its file id given back) before the
    // client hears how it ended, so a resend under the same id is not `REPLAYED`.
    let end = match conn_id.get().copied() {
        Some(id) => receive_upload(&mut frames, &driver, id).await,
        None => UploadEnd::Refused(Refused::new(Reject::NotAuthenticated)),
    };
    match end {
        UploadEnd::Accepted(file_id) => {
            let accepted = proto::FileAccepted {
                file_id: bytes::Bytes::copy_from_slice(file_id.as_bytes()),
            };
            reply(&mut send, server_frame::Kind::FileAccepted(accepted)).await;
        }
        UploadEnd::Gone => {}
        UploadEnd::Refused(refused) => refuse_upload(&mut send, refused).await,
        UploadEnd::Broken(refused) => {
            let reject = refused.reject.clone();
            refuse_upload(&mut send, refused).await;
            close_after(&conn, &mut send, &reject).await;
        }
    }
}

/// Closes the connection with `reject` once the `Error` frame just written on `send`
/// has had a moment to reach the client.
async fn close_after(conn: &Connection, send: &mut SendStream, reject: &Reject) {
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    let reason = reject.to_string();
    conn.close(VarInt::from_u32(reject.code() as u32), reason.as_bytes());
}

/// Reads one upload into the broker; the [`Upload`] is dropped (aborting the file)
/// on any end but acceptance.
async fn receive_upload(
    frames: &mut StreamFrames,
    driver: &DriverHandle,
    conn: ConnId,
) -> UploadEnd {
    let header = match tokio::time::timeout(Duration::from_secs(10), frames.next()).await {
        Ok(Ok(Some(ClientFrame {
            kind: Some(client_frame::Kind::FileHeader(h)),
        }))) => h,
        Ok(Ok(None)) => return UploadEnd::Gone,
        Ok(Err(reject)) => return UploadEnd::Broken(Refused::new(reject)),
        Ok(Ok(Some(_))) | Err(_) => {
            let reject = Reject::InvalidFrame("a file stream starts with FileHeader".into());
            return UploadEnd::Refused(Refused::new(reject));
        }
    };
    let meta = match FileMeta::from_header(header) {
        Ok(meta) => meta,
        Err(refused) => return UploadEnd::Refused(refused),
    };
    let file_id = meta.file_id;
    let refused = Refused::for_message(file_id);
    let mut upload = match Upload::open(driver, conn, meta).await {
        Ok(upload) => upload,
        Err(reject) => return UploadEnd::Refused(refused(reject)),
    };
    loop {
        let Ok(next) = tokio::time::timeout(UPLOAD_IDLE, frames.next()).await else {
            let reject = Reject::LimitExceeded("the upload sent nothing for 60 s; dropped");
            return UploadEnd::Refused(refused(reject));
        };
        match next {
            Ok(Some(ClientFrame {
                kind: Some(client_frame::Kind::FileChunk(chunk)),
            })) => {
                if let Err(reject) = upload.chunk(chunk.index, chunk.payload).await {
                    return UploadEnd::Refused(refused(reject));
                }
            }
            Ok(Some(ClientFrame {
                kind: Some(client_frame::Kind::FileEnd(end)),
            })) => {
                return match upload.finish(end.sha256, end.mac).await {
                    Ok(()) => UploadEnd::Accepted(file_id),
                    Err(reject) => UploadEnd::Refused(refused(reject)),
                };
            }
            Ok(Some(_)) => {
                let reject =
                    Reject::InvalidFrame("expected FileChunk or FileEnd on a file stream".into());
                return UploadEnd::Refused(refused(reject));
            }
            Ok(None) => return UploadEnd::Gone,
            Err(reject) => return UploadEnd::Broken(refused(reject)),
        }
    }
}

/// Writes this connection's incoming files, one unidirectional stream each.
async fn write_files(conn: Connection, mut port: mpsc::Receiver<FileItem>) {
    let mut streams: HashMap<MessageId, SendStream> = HashMap::new();
    while let Some(item) = port.recv().await {
        let bytes = files::encode(&files::server_frame(&item));
        match item {
            FileItem::Header(meta) => {
                let Ok(mut stream) = conn.open_uni().await else {
                    return; // the connection is gone; senders notice the closed port
                };
                if stream.write_chunk(bytes).await.is_ok() {
                    streams.insert(meta.file_id, stream);
                }
            }
            FileItem::Chunk { file_id, .. } => {
                if let Some(stream) = streams.get_mut(&file_id)
                    && stream.write_chunk(bytes).await.is_err()
                {
                    streams.remove(&file_id);
                }
            }
            FileItem::End {
                file_id, written, ..
            } => {
                if let Some(mut stream) = streams.remove(&file_id) {
                    let _ = stream.write_chunk(bytes).await;
                    let _ = stream.finish();
                }
                let _ = written.send(());
            }
            FileItem::Abort { file_id } => {
                if let Some(mut stream) = streams.remove(&file_id) {
                    let _ = stream.reset(VarInt::from_u32(Reject::Internal("").code() as u32));
                }
            }
        }
    }
}
