//! The Rust SDK: connect to a broker, publish and subscribe, with end-to-end encryption,
//! acknowledgements, duplicate suppression and automatic reconnection done for you.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fastport::client::ClientError> {
//! use fastport::client::{Client, ClientConfig, SessionKey};
//!
//! let key = SessionKey::from_base64("…32 bytes, base64…")?;
//! let config = ClientConfig::new("quic://127.0.0.1:3000", "my_session", "password", key)
//!     .ca_file("certs/ca.pem");
//! let client = Client::connect(config).await?;
//! let mut sub = client.subscribe("chat/#").await?;
//! client.publish("chat/room1", b"hello".to_vec()).await?;
//! while let Some(message) = sub.next().await {
//!     println!("{}: {:?}", message.topic, message.payload);
//! }
//! # Ok(()) }
//! ```
//!
//! This module and [`crypto`] are the only code in fastPort that ever holds a session
//! key: the broker routes ciphertext it cannot read.

pub mod crypto;
mod files;
mod session;
pub mod transport;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::core::NameError;
use crate::proto::{ErrorCode, PayloadFormat, PubAckStatus};

pub use crypto::{CryptoError, SessionKey};
pub use files::{CHUNK_SIZE, FileReceipt, IncomingFile};
pub use transport::BrokerUrl;

/// How a client connects.
#[derive(Clone)]
pub struct ClientConfig {
    pub url: String,
    pub session: String,
    pub password: String,
    pub key: SessionKey,
    /// Stable identity for durable subscriptions; `None` lets the broker pick one.
    pub client_id: Option<String>,
    /// Drop this client's durable state on the first connect.
    pub clean: bool,
    /// CA certificate to trust (the broker's `certs/ca.pem`); `None`: system roots.
    pub ca: Option<PathBuf>,
    /// Reconnect automatically after the connection is lost.
    pub reconnect: bool,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// With a `quic://` URL, try protobuf over WebSocket on the same host and port when
    /// QUIC does not connect (e.g. UDP is blocked): `ws://` on loopback, else `wss://`.
    pub websocket_fallback: bool,
    /// Open `LEGACY_JSON` messages (from the fastPort 2.0 Dart clients). Their format
    /// has no MAC binding a message to its topic, id and time, so a hostile broker
    /// could move or replay them unnoticed; clients that never hear from the Dart
    /// apps turn this off, and such messages are then dropped (and acknowledged).
    /// Files are not covered: a file subscription takes legacy files as it always
    /// has (their chunks are not authenticated either).
    pub accept_legacy: bool,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("session", &self.session)
            .field("client_id", &self.client_id)
            .field("clean", &self.clean)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(
        url: impl Into<String>,
        session: impl Into<String>,
        password: impl Into<String>,
        key: SessionKey,
    ) -> Self {
        Self {
            url: url.into(),
            session: session.into(),
            password: password.into(),
            key,
            client_id: None,
            clean: false,
            ca: None,
            reconnect: true,
            max_backoff: Duration::from_secs(5),
            websocket_fallback: true,
            accept_legacy: true,
        }
    }

    /// Trust this CA file (PEM).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// A stable client id (needed for durable subscriptions).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Drop durable state left from earlier runs.
    pub fn clean(mut self, clean: bool) -> Self {
        self.clean = clean;
        self
    }

    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Whether a `quic://` URL may fall back to WebSocket.
    pub fn websocket_fallback(mut self, fallback: bool) -> Self {
        self.websocket_fallback = fallback;
        self
    }

    /// Whether to open `LEGACY_JSON` deliveries (see [`Self::accept_legacy`]).
    pub fn accept_legacy(mut self, accept: bool) -> Self {
        self.accept_legacy = accept;
        self
    }
}

/// Options of a subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Keep queuing while this client is offline (needs a client id).
    pub durable: bool,
    /// Also receive who subscribes to the same filter and who leaves it (design §10),
    /// as [`SubscriptionEvent::Presence`] from [`Subscription::next_event`]: changes
    /// from the subscribe on, not who was there before, and none while reconnecting.
    pub presence: bool,
    /// First replay up to this many retained messages (the session's `historySize`
    /// bounds it).
    pub history: u32,
}

/// The broker accepted a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAck {
    pub message_id: [u8; 16],
    pub status: PublishStatus,
}

/// A publish on its way; resolves to its `PubAck` (see [`Client::publish_pipelined`]).
pub struct PendingPubAck(oneshot::Receiver<Result<PubAck, ClientError>>);

impl Future for PendingPubAck {
    type Output = Result<PubAck, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// What happened to a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishStatus {
    /// Durable copies are committed.
    Stored,
    /// Only connection-bound subscribers; held in memory.
    Accepted,
    /// Every subscriber already acknowledged it.
    Delivered,
    /// No subscription matched.
    NoSubscribers,
    /// A re-send after a reconnect: the broker had accepted it before the connection
    /// dropped (it answered `REPLAYED`).
    AlreadyAccepted,
}

impl From<PubAckStatus> for PublishStatus {
    fn from(s: PubAckStatus) -> Self {
        match s {
            PubAckStatus::Stored => PublishStatus::Stored,
            PubAckStatus::Delivered => PublishStatus::Delivered,
            PubAckStatus::NoSubscribers => PublishStatus::NoSubscribers,
            PubAckStatus::Accepted | PubAckStatus::Unspecified => PublishStatus::Accepted,
        }
    }
}

/// A received, decrypted and verified message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// The plaintext.
    pub payload: Bytes,
    pub message_id: [u8; 16],
    /// The publisher's timestamp (verified by the MAC for `NATIVE_V1`).
    pub timestamp_ms: u64,
    /// `NATIVE_V1`: authenticated with its topic, id and timestamp. `LEGACY_JSON`: from
    /// a fastPort 2.0 Dart client, whose format authenticates none of them (see
    /// [`ClientConfig::accept_legacy`]).
    pub format: PayloadFormat,
    /// 1 for a first delivery; higher when the broker had to retry.
    pub attempt: u32,
}

/// What the broker told this client at its last `Welcome`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionInfo {
    pub server_version: String,
    pub retry_interval_ms: u64,
    pub max_retries: u32,
    pub message_expiry_ms: u64,
    pub max_payload_bytes: u64,
    pub replay_window_ms: u64,
    /// How many times the client has connected (1 after the first connect).
    pub connections: u64,
}

/// SDK errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `quic://HOST:PORT` or `ws[s]://HOST:PORT/PATH`.
    #[error("invalid URL {0}")]
    Url(String),
    /// The broker could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// TLS set-up failed (bad CA file…).
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker refused the request.
    #[error("refused by the broker ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    /// Sealing or opening a payload failed.
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// A topic, filter, session or client id is invalid.
    #[error("{0}")]
    Invalid(#[from] NameError),
    /// The broker broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A file's stream broke off (the connection was lost mid-transfer, or the
    /// broker aborted it).
    #[error("file transfer failed: {0}")]
    Transfer(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The client was closed (or gave up after a fatal refusal).
    #[error("the client is closed")]
    Closed,
}

enum Request {
    Publish {
        sealed: session::SealedPublish,
        reply: oneshot::Sender<Result<PubAck, ClientError>>,
    },
    Subscribe {
        filter: String,
        options: SubscribeOptions,
        sink: mpsc::Sender<Message>,
        /// Where presence changes go, if `options.presence`.
        presence: Option<mpsc::Sender<Announced>>,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    Unsubscribe {
        id: u64,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// The application dropped subscription `id` (of messages or files): it is
    /// forgotten, and ended on the broker unless it was durable (see
    /// [`Subscription`]'s `Drop`).
    Dropped {
        id: u64,
    },
    SubscribeFiles {
        filter: String,
        options: SubscribeOptions,
        sink: mpsc::Sender<IncomingFile>,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    /// Where to send the next file (its own QUIC stream, or the WebSocket).
    BeginFile {
        reply: oneshot::Sender<Result<files::FileStart, ClientError>>,
    },
    /// A file frame multiplexed on the WebSocket control channel.
    FileFrame(crate::proto::ClientFrame),
    /// The last frame of a multiplexed file; `reply` gets the broker's answer.
    FileEnd {
        frame: crate::proto::ClientFrame,
        file_id: [u8; 16],
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// A received file was verified: acknowledge it.
    AckFile([u8; 16]),
    /// The session's key directory, after publishing this client's key if given.
    Keys {
        publish: Option<[u8; 32]>,
        reply: oneshot::Sender<Result<Vec<PublishedKey>, ClientError>>,
    },
    /// No file subscription wanted a file on `topic`: acknowledged (dropped for good)
    /// if a message subscription matches it, which never takes files; else left for
    /// the broker's retry, by which time the application may have subscribed (a
    /// durable backlog starts before it can).
    UnwantedFile {
        file_id: [u8; 16],
        topic: String,
    },
    Close,
}

/// A client's entry in its session's public-key directory (design §5: X25519 public
/// keys, so that clients can agree on keys of their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    pub client_id: String,
    pub public_key: [u8; 32],
}

/// Longest [`Client::close`] waits for the connection to close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Payloads from this size on are sealed on tokio's blocking pool (~180 µs of
/// sealing; tokio's guidance is to hand off work longer than 10-100 µs).
const SEAL_OFF_TASK: usize = 128 * 1024;

/// A connected client. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Client {
    requests: mpsc::Sender<Request>,
    info: watch::Receiver<SessionInfo>,
    /// Publishes are sealed on the caller's task (large ones on the blocking pool), not
    /// on the session task.
    sealer: Arc<session::Sealer>,
    /// Where subscriptions report the messages the application took.
    handbacks: Arc<session::Handbacks>,
    stopped: session::Stopped,
}

impl Client {
    /// Connects and authenticates. Fails if the first connection cannot be made or the
    /// broker refuses the credentials; later disconnections are repaired in the
    /// background (when `reconnect` is on).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let (requests, info, sealer, handbacks, stopped) = session::start(config).await?;
        Ok(Client {
            requests,
            info,
            sealer,
            handbacks,
            stopped,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ClientError>>) -> Request,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Publishes `payload` to `topic`, sealed as `NATIVE_V1`; resolves with the broker's
    /// `PubAck`. Survives reconnects: an unanswered publish is re-sent.
    ///
    /// The payload is sealed on the calling task (from 128 KiB on, on tokio's blocking
    /// pool while the task waits), so tasks publishing through clones of one client
    /// seal in parallel. A topic that is not a valid topic name (empty,
    /// or with a wildcard) is refused here with [`ClientError::Invalid`], and a payload
    /// that would seal to more than the session's `max_payload_bytes` (see
    /// [`session_info`](Self::session_info)) with [`ClientError::Refused`] and
    /// `PAYLOAD_TOO_LARGE`, before any sealing.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PubAck, ClientError> {
        self.publish_as(topic, payload, PayloadFormat::NativeV1)
            .await
    }

    /// Sends a publish (sealed as `NATIVE_V1`) without waiting for its `PubAck`: the
    /// returned [`PendingPubAck`] resolves when it arrives. One task can keep many
    /// publishes in flight this way; this call waits only while the client's queue is
    /// full. Publishes one task sends this way go out in the order of its calls, which
    /// is the order subscribers get them in (design §4). Sealing and topic checks are as
    /// for [`publish`](Client::publish).
    pub async fn publish_pipelined(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PendingPubAck, ClientError> {
        self.pipelined_as(topic, payload.into(), PayloadFormat::NativeV1)
            .await
    }

    /// [`publish_pipelined`](Client::publish_pipelined), sealed as `LEGACY_JSON`
    /// (`text` readable by the legacy Dart clients).
    pub async fn publish_legacy_pipelined(
        &self,
        topic: &str,
        text: &str,
    ) -> Result<PendingPubAck, ClientError> {
        let payload = Bytes::copy_from_slice(text.as_bytes());
        self.pipelined_as(topic, payload, PayloadFormat::LegacyJson)
            .await
    }

    async fn pipelined_as(
        &self,
        topic: &str,
        payload: Bytes,
        format: PayloadFormat,
    ) -> Result<PendingPubAck, ClientError> {
        let sealed = self.seal(topic, payload, format).await?;
        let (reply, answer) = oneshot::channel();
        let request = Request::Publish { sealed, reply };
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(PendingPubAck(answer))
    }

    /// Publishes sealed as `LEGACY_JSON`, readable by the legacy Dart clients
    /// (`payload` must be UTF-8 text).
    pub async fn publish_legacy(&self, topic: &str, text: &str) -> Result<PubAck, ClientError> {
        self.publish_as(
            topic,
            Bytes::copy_from_slice(text.as_bytes()),
            PayloadFormat::LegacyJson,
        )
        .await
    }

    async fn publish_as(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        format: PayloadFormat,
    ) -> Result<PubAck, ClientError> {
        let sealed = self.seal(topic, payload.into(), format).await?;
        self.call(|reply| Request::Publish { sealed, reply }).await
    }

    /// Seals a publish on the caller's task, or on tokio's blocking pool when the
    /// payload is large. Sealing 1 MiB takes 1.5-2 ms, and a task that seals a run of
    /// them holds its worker thread all that time: the client's session task, woken
    /// by the first publish, waits behind it on the same worker (tokio does not let
    /// another worker steal a task just woken there), so nothing is sent until the
    /// caller stops to wait. The caller still seals one publish after another, so
    /// their order is kept.
    async fn seal(
        &self,
        topic: &str,
        payload: Bytes,
        format: PayloadFormat,
    ) -> Result<session::SealedPublish, ClientError> {
        self.sealer.check(topic, payload.len(), format)?;
        if payload.len() < SEAL_OFF_TASK {
            return self.sealer.publish(topic, payload, format);
        }
        let sealer = Arc::clone(&self.sealer);
        let topic = topic.to_owned();
        match tokio::task::spawn_blocking(move || sealer.publish(&topic, payload, format)).await {
            Ok(sealed) => sealed,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Publishes this client's X25519 public key in the session's key directory and
    /// returns the directory. The broker keeps one key per client id, in memory: it
    /// goes with a broker restart (this client publishes it again when it reconnects)
    /// and, for a client without a client id, when its connection ends. Other clients
    /// read it with [`keys`](Self::keys) and agree on a key with it (X25519, e.g. with
    /// `x25519-dalek`); the broker only stores and hands out public keys. Needs a live
    /// connection, as [`keys`](Self::keys) does.
    pub async fn publish_key(
        &self,
        public_key: [u8; 32],
    ) -> Result<Vec<PublishedKey>, ClientError> {
        self.call(|reply| Request::Keys {
            publish: Some(public_key),
            reply,
        })
        .await
    }

    /// The session's public-key directory: every client's published X25519 key. Needs
    /// a live connection: while reconnecting it fails with [`ClientError::Connect`].
    pub async fn keys(&self) -> Result<Vec<PublishedKey>, ClientError> {
        self.call(|reply| Request::Keys {
            publish: None,
            reply,
        })
        .await
    }

    /// Subscribes to a filter (`+` one level, `#` the rest) for as long as the client
    /// lives.
    pub async fn subscribe(&self, filter: &str) -> Result<Subscription, ClientError> {
        self.subscribe_with(filter, SubscribeOptions::default())
            .await
    }

    /// Subscribes with options (e.g. `durable`).
    pub async fn subscribe_with(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        let (sink, rx) = mpsc::channel(1024);
        let (presence, presence_rx) = match options.presence {
            true => {
                let (tx, rx) = mpsc::channel(PRESENCE_BUFFER);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let filter = filter.to_owned();
        let id = self
            .call(|reply| Request::Subscribe {
                filter,
                options,
                sink,
                presence,
                reply,
            })
            .await?;
        Ok(Subscription {
            id,
            rx,
            received: 0,
            presence: presence_rx,
            held: None,
            requests: self.requests.clone(),
            handbacks: Arc::clone(&self.handbacks),
        })
    }

    /// Sends a file to `topic`, sealed as `NATIVE_V1` chunk by chunk (its name too), and
    /// resolves once every online subscriber has it. `size` is the number of bytes
    /// `data` yields.
    pub async fn send_file(
        &self,
        topic: &str,
        name: &str,
        data: impl tokio::io::AsyncRead + Unpin,
        size: u64,
    ) -> Result<FileReceipt, ClientError> {
        let start = self.call(|reply| Request::BeginFile { reply }).await?;
        files::upload(start, topic, name, data, size, PayloadFormat::NativeV1).await
    }

    /// Sends a file the legacy Dart clients can read (`LEGACY_JSON`: plain name,
    /// chunks sealed with the raw key).
    pub async fn send_file_legacy(
        &self,
        topic: &str,
        name: &str,
        data: impl tokio::io::AsyncRead + Unpin,
        size: u64,
    ) -> Result<FileReceipt, ClientError> {
        let start = self.call(|reply| Request::BeginFile { reply }).await?;
        files::upload(start, topic, name, data, size, PayloadFormat::LegacyJson).await
    }

    /// Receives the files published to topics matching `filter` while this client is
    /// connected.
    pub async fn subscribe_files(&self, filter: &str) -> Result<FileSubscription, ClientError> {
        self.subscribe_files_with(filter, SubscribeOptions::default())
            .await
    }

    /// Receives files with options: a `durable` subscription (which needs a client
    /// id) keeps queuing files while the client is offline, in the broker's spool, and
    /// they arrive when it connects again.
    pub async fn subscribe_files_with(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<FileSubscription, ClientError> {
        let (sink, rx) = mpsc::channel(16);
        let filter = filter.to_owned();
        let id = self
            .call(|reply| Request::SubscribeFiles {
                filter,
                options,
                sink,
                reply,
            })
            .await?;
        Ok(FileSubscription {
            handbacks: Arc::clone(&self.handbacks),
            id,
            rx,
            requests: self.requests.clone(),
        })
    }

    /// Why the client stopped, if it stopped by itself: taken over by another
    /// connection with its client id, its session suspended, refused on reconnecting,
    /// or (without `reconnect`) its connection lost. Subscriptions end then; this says
    /// why. `None` while it runs, and after [`Client::close`].
    pub fn stopped(&self) -> Option<ClientError> {
        self.stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the broker said at the last `Welcome`.
    pub fn session_info(&self) -> SessionInfo {
        self.info.borrow().clone()
    }

    /// Waits until the client has connected `n` times in total (for tools and tests that
    /// want to see a reconnect happen).
    pub async fn wait_for_connections(&self, n: u64) -> Result<(), ClientError> {
        let mut info = self.info.clone();
        info.wait_for(|i| i.connections >= n)
            .await
            .map(|_| ())
            .map_err(|_| ClientError::Closed)
    }

    /// Closes the connection; pending publishes fail with [`ClientError::Closed`].
    /// Returns once the client's last frames (the acknowledgements of what the
    /// application took) are written and the connection is closed, or after 2 s.
    pub async fn close(&self) {
        if self.requests.send(Request::Close).await.is_ok() {
            // The session task drops its queue when it ends.
            let _ = tokio::time::timeout(CLOSE_WAIT, self.requests.closed()).await;
        }
    }
}

/// A stream of messages for one subscription. Dropping it ends the subscription, on
/// the broker too unless it is durable: a durable one keeps queuing for the client id
/// (as across a disconnect) until [`Subscription::unsubscribe`] deletes it. While
/// this client stays connected, the broker goes on sending that subscription's
/// messages to it: the client holds them (up to 10,000, each once) for the next
/// subscription that wants them, unacknowledged, and the broker's retries count
/// each send (design §4), so a message can use up its attempts before then.
/// Subscribe again soon, or close the client, which leaves them queued.
///
/// A message is acknowledged to the broker once the application takes it from here
/// (written with other acknowledgements, or at the latest when the client closes),
/// not when it reaches this buffer: messages still buffered when a durable
/// `Subscription` is dropped or the client closes are not acknowledged, so the broker
/// delivers them again (on the client id's next connection) instead of losing them.
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Message>,
    /// Messages taken from `rx` so far.
    received: u64,
    /// Presence changes, when the subscription asked for them.
    presence: Option<mpsc::Receiver<Announced>>,
    /// A change read early, waiting for the messages that came before it.
    held: Option<Announced>,
    requests: mpsc::Sender<Request>,
    handbacks: Arc<session::Handbacks>,
}

/// Presence changes a subscription holds while the application reads none; past it,
/// the newest are dropped (a log line says so).
const PRESENCE_BUFFER: usize = 256;

/// A client subscribed to a subscription's filter, or left it (it unsubscribed or
/// disconnected), as the broker tells subscriptions that asked with
/// [`SubscribeOptions::presence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    Joined { client_id: String },
    Left { client_id: String },
}

/// A presence change and how many messages its subscription was handed before it.
type Announced = (u64, PresenceChange);

/// What [`Subscription::next_event`] yields.
#[derive(Debug, Clone)]
pub enum SubscriptionEvent {
    Message(Message),
    Presence(PresenceChange),
}

impl Subscription {
    /// The next message; `None` once the client is closed. Presence changes are left
    /// for [`next_event`](Self::next_event).
    pub async fn next(&mut self) -> Option<Message> {
        let message = self.rx.recv().await?;
        self.received += 1;
        self.taken(&message);
        Some(message)
    }

    /// The next message or presence change, in the order the broker sent them;
    /// `None` once the client is closed.
    pub async fn next_event(&mut self) -> Option<SubscriptionEvent> {
        loop {
            // The two come on queues of their own: a change goes once the messages
            // handed over before it have been read.
            if let Some((before, _)) = &self.held
                && *before <= self.received
            {
                return self
                    .held
                    .take()
                    .map(|(_, c)| SubscriptionEvent::Presence(c));
            }
            let listening = self.held.is_none();
            let message = match &mut self.presence {
                Some(presence) if listening => tokio::select! {
                    biased;
                    Some(change) = presence.recv() => {
                        self.held = Some(change);
                        continue;
                    }
                    message = self.rx.recv() => message,
                },
                _ => self.rx.recv().await,
            }?;
            self.received += 1;
            self.taken(&message);
            return Some(SubscriptionEvent::Message(message));
        }
    }

    fn taken(&self, message: &Message) {
        self.handbacks
            .push(session::Handback::Taken(message.message_id));
    }

    /// Ends the subscription on the broker (a durable one and its queue are deleted).
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        unsubscribe(&self.requests, self.id).await
    }
}

impl Drop for Subscription {
    /// Gives back what the application never took, unacknowledged, and ends the
    /// subscription: on the broker too, unless it is durable (a durable subscription
    /// outlives its handle and the client, as it outlives a connection: the broker
    /// keeps queuing for the client id; [`Subscription::unsubscribe`] deletes it).
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(message) = self.rx.try_recv() {
            self.handbacks
                .push(session::Handback::Returned(message.message_id));
        }
        dropped(&self.requests, &self.handbacks, self.id);
    }
}

/// Ends subscription `id` on the broker and waits for its answer.
async fn unsubscribe(requests: &mpsc::Sender<Request>, id: u64) -> Result<(), ClientError> {
    let (reply, rx) = oneshot::channel();
    requests
        .send(Request::Unsubscribe { id, reply })
        .await
        .map_err(|_| ClientError::Closed)?;
    rx.await.map_err(|_| ClientError::Closed)?
}

/// Tells the session task a subscription handle is gone. `Drop` cannot wait for room
/// in its queue: when the queue is full the notice goes with the handbacks, which the
/// task reads on each turn while connected and before it subscribes again after a
/// reconnect.
fn dropped(requests: &mpsc::Sender<Request>, handbacks: &session::Handbacks, id: u64) {
    let notice = || Request::Dropped { id };
    if let Err(mpsc::error::TrySendError::Full(_)) = requests.try_send(notice()) {
        handbacks.push(session::Handback::Dropped(id));
        // The task may have emptied its queue and gone to sleep in between: a second
        // notice (a no-op once the first is handled) or a still full queue means it
        // takes another turn.
        let _ = requests.try_send(notice());
    }
}

/// Incoming files for one filter.
pub struct FileSubscription {
    id: u64,
    rx: mpsc::Receiver<IncomingFile>,
    requests: mpsc::Sender<Request>,
    handbacks: Arc<session::Handbacks>,
}

impl Drop for FileSubscription {
    /// Ends the subscription as a dropped [`Subscription`] does.
    fn drop(&mut self) {
        dropped(&self.requests, &self.handbacks, self.id);
    }
}

impl FileSubscription {
    /// The next file; read its chunks before (or while) waiting for the next one.
    pub async fn next(&mut self) -> Option<IncomingFile> {
        self.rx.recv().await
    }

    /// Ends the subscription on the broker (a durable one and its queue are deleted).
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        unsubscribe(&self.requests, self.id).await
    }
}

impl futures::Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(message)) = &polled {
            self.taken(message);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> Message {
        Message {
            topic: "room/1".into(),
            payload: Bytes::from(vec![n]),
            message_id: [n; 16],
            timestamp_ms: 0,
            format: PayloadFormat::NativeV1,
            attempt: 1,
        }
    }

    fn joined(who: &str) -> PresenceChange {
        PresenceChange::Joined {
            client_id: who.into(),
        }
    }

    /// Messages and presence changes come out in the order they were handed over,
    /// whatever is waiting on which queue when the application reads.
    #[tokio::test]
    async fn events_come_out_in_the_order_they_were_handed_over() {
        let (sink, rx) = mpsc::channel(16);
        let (presence, presence_rx) = mpsc::channel(16);
        let (requests, _requests_rx) = mpsc::channel(1);
        let mut sub = Subscription {
            id: 1,
            rx,
            received: 0,
            presence: Some(presence_rx),
            held: None,
            requests,
            handbacks: Arc::default(),
        };
        // Handed over: message 1, bob joined, messages 2 and 3, carol joined.
        sink.send(message(1)).await.expect("send");
        presence.send((1, joined("bob"))).await.expect("send");
        sink.send(message(2)).await.expect("send");
        sink.send(message(3)).await.expect("send");
        presence.send((3, joined("carol"))).await.expect("send");
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(match sub.next_event().await.expect("an event") {
                SubscriptionEvent::Message(m) => format!("m{}", m.payload[0]),
                SubscriptionEvent::Presence(PresenceChange::Joined { client_id }) => client_id,
                SubscriptionEvent::Presence(PresenceChange::Left { client_id }) => client_id,
            });
        }
        assert_eq!(order, ["m1", "bob", "m2", "m3", "carol"]);
    }
}
