//! The core's vocabulary: [`Command`]s in, [`Output`]s out, and the store work
//! ([`StoreBatch`], [`BacklogRequest`]) it asks its driver to do.

use std::sync::Arc;

use bytes::Bytes;

use crate::proto::{PayloadFormat, PresenceEvent, PubAckStatus};

use super::error::Reject;
use super::session::SessionSettings;
use super::topic::{TopicFilter, TopicName};
use super::types::{ClientId, ConnId, MessageId, Millis, SessionName};

/// A message the broker accepted. Shared (`Arc`) between every subscriber's copy, the
/// store batch and the carriers' encoders, so fan-out never copies the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub session: SessionName,
    pub id: MessageId,
    /// Accept order, unique within the broker (and across restarts); the store orders
    /// backlogs by it.
    pub seq: u64,
    pub topic: TopicName,
    pub payload: Bytes,
    /// The publisher's timestamp (bound into the end-to-end MAC).
    pub timestamp_ms: Millis,
    pub format: PayloadFormat,
    /// A message, or a file whose bytes wait in the spool.
    pub kind: MessageKind,
    /// When the broker accepted it; expiry runs from here.
    pub accepted_at: Millis,
    pub expires_at: Millis,
}

/// What a [`Message`] stands for. A file goes through the same copies, retries, expiry
/// and durable queues as a message (design §10): its `payload` is its encoded
/// `FileHeader`, and its chunks wait in the broker's file spool, where the driver
/// streams them from when a copy is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MessageKind {
    #[default]
    Message,
    File,
}

impl Message {
    /// Added to the format's number where the store keeps a message's format, for
    /// files. Rows written before files were queued carry no flag, and read as
    /// messages.
    pub const FILE_FLAG: i32 = 0x100;

    /// The format and kind as the one integer the store keeps.
    pub fn stored_format(&self) -> i32 {
        let flag = match self.kind {
            MessageKind::Message => 0,
            MessageKind::File => Self::FILE_FLAG,
        };
        self.format as i32 | flag
    }

    /// Reads back [`Message::stored_format`]; `None` if it names no format.
    pub fn parse_stored_format(code: i32) -> Option<(PayloadFormat, MessageKind)> {
        let kind = if code & Self::FILE_FLAG != 0 {
            MessageKind::File
        } else {
            MessageKind::Message
        };
        let format = PayloadFormat::try_from(code & !Self::FILE_FLAG).ok()?;
        Some((format, kind))
    }
}

/// An authenticated client joining its session.
#[derive(Debug, Clone)]
pub struct Hello {
    pub conn: ConnId,
    /// 16 random bytes naming this connection in `Welcome` and logs.
    pub connection_id: [u8; 16],
    /// The session's settings as the authenticator read them.
    pub settings: SessionSettings,
    pub client_id: ClientId,
    /// The client sent no `client_id`; the carrier made one up, so nothing durable may
    /// be keyed by it.
    pub anonymous: bool,
    /// Drop this client's durable state before starting.
    pub clean: bool,
    /// The connection can only read `LEGACY_JSON` payloads (the legacy bridge).
    pub legacy_only: bool,
}

/// A validated `Publish`.
#[derive(Debug, Clone)]
pub struct Publish {
    pub message_id: MessageId,
    pub topic: TopicName,
    pub payload: Bytes,
    pub timestamp_ms: Millis,
    pub format: PayloadFormat,
}

/// A file a client wants to send (its `FileHeader`, as far as the core cares).
#[derive(Debug, Clone)]
pub struct FileOffer {
    pub file_id: MessageId,
    pub topic: TopicName,
    pub timestamp_ms: Millis,
    pub format: PayloadFormat,
    /// Declared plaintext size (carriers enforce the limit on the bytes that arrive).
    pub size: u64,
}

/// A file that has arrived whole and waits in the spool.
#[derive(Debug, Clone)]
pub struct FileDone {
    pub file_id: MessageId,
    pub topic: TopicName,
    pub timestamp_ms: Millis,
    pub format: PayloadFormat,
    /// Its `FileHeader`, encoded: what a receiver gets first, kept as the message body.
    pub header: Bytes,
    /// The connections that got every chunk as it arrived, sorted; they get the
    /// file's end next, so their copies count as sent.
    pub live: Vec<ConnId>,
    /// The file is in the spool. If not (nobody subscribed when it was offered),
    /// only its id is recorded: there is nothing to deliver.
    pub spooled: bool,
}

/// What the broker decided about a file when it was offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRoute {
    /// The sender's session.
    pub session: SessionName,
    /// Online connections subscribed to its topic, to stream it to as it arrives.
    pub live: Vec<ConnId>,
    /// Some subscriber wants it: it must be spooled (for retries, slow receivers and
    /// offline durable subscribers).
    pub spool: bool,
    /// Some of them are durable: the spool must reach the disk before the file is
    /// accepted.
    pub durable: bool,
}

/// Everything that can happen to the core, from a carrier or the driver.
#[derive(Debug, Clone)]
pub enum Command {
    Hello(Hello),
    Subscribe {
        conn: ConnId,
        request_id: u64,
        filter: TopicFilter,
        durable: bool,
        presence: bool,
        /// Replay up to this many retained messages first (see `historySize`).
        history: u32,
    },
    Unsubscribe {
        conn: ConnId,
        request_id: u64,
        filter: TopicFilter,
    },
    Publish {
        conn: ConnId,
        publish: Publish,
    },
    Ack {
        conn: ConnId,
        message_id: MessageId,
    },
    PublishKey {
        conn: ConnId,
        request_id: u64,
        public_key: Bytes,
    },
    GetKeys {
        conn: ConnId,
        request_id: u64,
    },
    /// The carrier lost the connection (or closed it).
    Disconnected {
        conn: ConnId,
    },
    /// The driver's stream of a spooled file to `conn` ended, whole or not.
    FileStreamed {
        conn: ConnId,
        file_id: MessageId,
    },
    /// A session was created or changed (HTTP API, admin).
    SessionUpdated(SessionSettings),
}

/// Something to send to one connection. Carriers encode it in their wire format.
///
/// Every connection's outbound queue holds these by value, and a queue allocates room
/// for a block of them up front, so the rare large variants are boxed: that keeps an
/// idle connection small.
#[derive(Debug, Clone)]
pub enum Event {
    Welcome(Box<Welcome>),
    Deliver {
        message: Arc<Message>,
        attempt: u32,
    },
    PubAck {
        message_id: MessageId,
        status: PubAckStatus,
    },
    Subscribed {
        request_id: u64,
    },
    Unsubscribed {
        request_id: u64,
    },
    Presence(Box<Presence>),
    Keys {
        request_id: u64,
        /// Shared by every answer until the directory changes: a client asking again
        /// and again without reading queues pointers, not copies.
        keys: Arc<[(ClientId, Bytes)]>,
    },
    Error(Box<ErrorEvent>),
}

impl Event {
    /// A refusal; `message_id` is set when it answers a `Publish`.
    pub fn error(reject: Reject, request_id: u64, message_id: Option<MessageId>) -> Self {
        Event::Error(Box::new(ErrorEvent {
            reject,
            request_id,
            message_id,
        }))
    }
}

/// The session's terms, first thing on a new connection.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub connection_id: [u8; 16],
    pub settings: SessionSettings,
    pub replay_window_ms: u64,
    pub server_time_ms: Millis,
}

/// A client joined or left a topic that a `presence` subscription watches.
#[derive(Debug, Clone)]
pub struct Presence {
    pub filter: TopicFilter,
    pub client_id: ClientId,
    pub event: PresenceEvent,
}

/// A refusal sent to a client.
#[derive(Debug, Clone)]
pub struct ErrorEvent {
    pub reject: Reject,
    pub request_id: u64,
    /// Set when it answers a `Publish`.
    pub message_id: Option<MessageId>,
}

/// What the core asks of the connections.
#[derive(Debug, Clone)]
pub enum Output {
    Send {
        conn: ConnId,
        event: Event,
    },
    /// Send the refusal, then close the connection.
    Close {
        conn: ConnId,
        reject: Reject,
    },
    /// Every copy of a spooled file is done with (acknowledged, expired or dropped):
    /// its spool file can go.
    DropSpool {
        session: SessionName,
        file_id: MessageId,
    },
}

/// One durable write. A batch's ops are applied in order, in one transaction.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Store a message body (idempotent: its `seq` is the key).
    PutMessage(Arc<Message>),
    /// Remember a message id until `expires_at` (replay protection across restarts).
    PutReplayId {
        session: SessionName,
        id: MessageId,
        expires_at: Millis,
    },
    /// Queue message `seq` for a subscriber. `ephemeral` copies belong to a connection
    /// (spilled because it was slow) and are dropped when it ends or the broker restarts.
    PutCopy {
        session: SessionName,
        client_id: ClientId,
        seq: u64,
        ephemeral: bool,
        /// A history replay's copy (spilled): the client may hold a stored copy of the
        /// same message, which this one then stands for (see `store::plan::Net`).
        replayed: bool,
    },
    /// A copy was acknowledged, expired or given up on.
    DeleteCopy {
        session: SessionName,
        client_id: ClientId,
        seq: u64,
    },
    /// How many times a copy was sent to a live connection, kept when the client leaves.
    SetAttempts {
        session: SessionName,
        client_id: ClientId,
        seq: u64,
        attempts: u32,
    },
    PutSubscription {
        session: SessionName,
        client_id: ClientId,
        filter: TopicFilter,
        /// Made by a legacy connection, which reads only `LEGACY_JSON`.
        legacy_only: bool,
    },
    /// The client logged in over another kind of connection (legacy or native) than
    /// its durable subscriptions were marked with: they follow it.
    SetLegacyOnly {
        session: SessionName,
        client_id: ClientId,
        legacy_only: bool,
    },
    DeleteSubscription {
        session: SessionName,
        client_id: ClientId,
        filter: TopicFilter,
    },
    /// Forget everything durable about a client (`Hello.clean`).
    DeleteClient {
        session: SessionName,
        client_id: ClientId,
    },
    /// Drop a client's ephemeral copies (its connection ended).
    DeleteEphemeral {
        session: SessionName,
        client_id: ClientId,
    },
    /// Drop a client's copies whose topic none of `keep` matches: it unsubscribed,
    /// which discards that subscription's pending copies (design §4), also those
    /// not yet read back from the store.
    DiscardCopies {
        session: SessionName,
        client_id: ClientId,
        keep: Vec<TopicFilter>,
    },
}

impl StoreOp {
    /// Whether the core holds this op as done even when its commit fails, so that the
    /// store must still be brought to it. Such ops let go of something (a copy
    /// acknowledged, a filter unsubscribed, a client cleaned), set what the core
    /// already goes by, or spill a slow connection's copy (the core counts it as
    /// stored, and nobody waits for it; the store worker keeps the message's body
    /// with it). Lost, the store would bring back at a restart what the core has
    /// dropped, or lose a spilled copy. Ops that add for a request are undone by the
    /// core instead (it refuses the publish or subscribe, which the client may
    /// retry), and must not be written again.
    pub fn holds_after_a_failed_commit(&self) -> bool {
        match self {
            StoreOp::PutCopy { ephemeral, .. } => *ephemeral,
            StoreOp::PutMessage(_)
            | StoreOp::PutReplayId { .. }
            | StoreOp::PutSubscription { .. } => false,
            StoreOp::DeleteCopy { .. }
            | StoreOp::SetAttempts { .. }
            | StoreOp::SetLegacyOnly { .. }
            | StoreOp::DeleteSubscription { .. }
            | StoreOp::DeleteClient { .. }
            | StoreOp::DeleteEphemeral { .. }
            | StoreOp::DiscardCopies { .. } => true,
        }
    }
}

/// A group of writes to commit together; answers wait for its commit.
#[derive(Debug, Clone, Default)]
pub struct StoreBatch {
    pub id: u64,
    pub ops: Vec<StoreOp>,
}

/// Read the next page of a subscriber's queued copies (seq > `after_seq`, unexpired, in
/// seq order). The answer goes to [`super::Core::handle_backlog`] with the same `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacklogRequest {
    pub session: SessionName,
    pub client_id: ClientId,
    pub after_seq: u64,
    pub limit: usize,
    pub token: u64,
}

/// A queued copy read back from the store.
#[derive(Debug, Clone)]
pub struct StoredCopy {
    pub message: Arc<Message>,
    /// Sends to a live connection so far.
    pub attempts: u32,
    pub ephemeral: bool,
}

/// What the core needs from the store at start-up.
#[derive(Debug, Clone, Default)]
pub struct Restore {
    pub sessions: Vec<SessionSettings>,
    pub subscriptions: Vec<RestoredSubscription>,
    pub replay_ids: Vec<(SessionName, MessageId, Millis)>,
    /// One past the highest message `seq` in the store.
    pub next_seq: u64,
    /// The files with copies still queued, and how many: their spool files are kept
    /// until those are done with (the rest are left over from before, and go).
    pub files: Vec<RestoredFile>,
}

/// A durable subscription the store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredSubscription {
    pub session: SessionName,
    pub client_id: ClientId,
    pub filter: TopicFilter,
    /// The client's last connection was a legacy one: until it connects again, only
    /// `LEGACY_JSON` messages are queued for it.
    pub legacy_only: bool,
}

/// A file the store still holds copies of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredFile {
    pub session: SessionName,
    pub file_id: MessageId,
    pub seq: u64,
    pub copies: usize,
}
