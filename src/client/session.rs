//! The client's background task: one connection at a time, and everything that must
//! survive it — subscriptions (re-sent after a reconnect), unanswered publishes
//! (re-sent, re-sealed if they grew stale), and the ids already handed to the
//! application (so redeliveries are acknowledged, not repeated).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::core::{ClientId, FastMap, FastSet, SessionName, TopicFilter, TopicName, skew_ms};
use crate::proto::{
    self, ClientFrame, ErrorCode, PayloadFormat, ServerFrame, client_frame, server_frame,
};
use crate::timer::LoopTimer;

use super::crypto::{MessageContext, SealingKeys};
use super::files::{self, FilePart, FileStart, FileSubs, Opener, ReceivedFiles};
use super::transport::{BrokerUrl, Control, ControlWriter, Dialer, PublishFields};
use super::{
    ClientConfig, ClientError, Message, PubAck, PublishStatus, Request, SessionInfo,
    SubscribeOptions,
};

/// Ids remembered for duplicate suppression.
const SEEN_CAPACITY: usize = 100_000;
/// Deliveries held while no local subscription wants them yet (a durable backlog
/// arrives right after connecting, before the application subscribes again).
const ORPHAN_CAPACITY: usize = 10_000;

/// Whether a publish re-sent at `now` (the broker's clock, as its Welcome says) must
/// be stamped and sealed again: its timestamp is more than half the replay window
/// away, either way. Behind after a long outage; ahead when the broker's clock
/// corrected ours the other way (a clock stepped back, another node).
fn needs_restamp(now: u64, timestamp_ms: u64, window: u64) -> bool {
    now.abs_diff(timestamp_ms) > window / 2
}
/// Requests and frames handled per write at most.
const BURST: usize = 64;
/// How long acks may wait for company before they are written. A subscriber at a
/// steady rate then acknowledges several bursts in one write, and the broker reads
/// one datagram instead of one per burst. Far inside any retry interval.
const ACK_DELAY: Duration = Duration::from_millis(2);
/// Acks written at once however young they are, so that under load they keep pace
/// with the broker's window of unacknowledged copies (512 by default).
const ACK_BATCH: usize = 64;

/// Longest wait between two looks at what the application took, while it takes
/// nothing (see [`State::taken_check`]).
const TAKEN_CHECK_MAX: Duration = Duration::from_millis(100);
/// Time the broker has to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

fn local_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The live connection is a control channel (QUIC or WebSocket).
type Live = Control;

/// What sealing and opening a message takes: the session's name, its keys and the
/// broker's clock. The session task and every [`Client`](super::Client) handle share
/// it, so a publish is sealed by the task that makes it: publishers seal in parallel,
/// and sealing a large payload does not hold up the session task's other traffic.
pub(super) struct Sealer {
    session: SessionName,
    keys: SealingKeys,
    /// The broker's clock minus ours, in milliseconds, from the last `Welcome`.
    clock_offset_ms: AtomicI64,
    /// The session's largest sealed payload, from the last `Welcome`.
    max_payload_bytes: AtomicU64,
}

impl Sealer {
    fn server_now(&self) -> u64 {
        (local_now() as i64)
            .saturating_add(self.clock_offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    /// Refuses, before any sealing, a publish the broker would refuse for its topic or
    /// its size (see [`check_size`](Self::check_size)).
    pub(super) fn check(
        &self,
        topic: &str,
        len: usize,
        format: PayloadFormat,
    ) -> Result<(), ClientError> {
        TopicName::check(topic)?;
        self.check_size(len, format, "")
    }

    /// Refuses a publish of `len` plaintext bytes that would seal to more than the
    /// session's limit. Sealing it would only waste the work, and past the broker's
    /// largest frame the broker drops the connection instead of answering, so the
    /// publish could never be answered at all. `note` ends the error's message.
    fn check_size(&self, len: usize, format: PayloadFormat, note: &str) -> Result<(), ClientError> {
        let sealed = match format {
            PayloadFormat::LegacyJson => super::crypto::legacy_sealed_len(len),
            _ => super::crypto::native_sealed_len(len),
        };
        let limit = self.max_payload_bytes.load(Ordering::Relaxed);
        if sealed as u64 > limit {
            return Err(ClientError::Refused {
                code: ErrorCode::PayloadTooLarge,
                message: format!(
                    "a payload of {len} bytes is {sealed} bytes sealed, over the session's \
                     limit of {limit} bytes{note}"
                ),
            });
        }
        Ok(())
    }

    /// A new publish that passed [`check`](Self::check): given a fresh id, stamped with
    /// the broker's time, sealed.
    pub(super) fn publish(
        &self,
        topic: &str,
        plaintext: Bytes,
        format: PayloadFormat,
    ) -> Result<SealedPublish, ClientError> {
        let id: [u8; 16] = rand::random();
        let timestamp_ms = self.server_now();
        let payload = self.seal(topic, &id, timestamp_ms, &plaintext, format)?;
        Ok(SealedPublish {
            id,
            topic: topic.to_owned(),
            plaintext,
            format,
            timestamp_ms,
            payload,
        })
    }

    fn seal(
        &self,
        topic: &str,
        id: &[u8; 16],
        timestamp_ms: u64,
        plaintext: &[u8],
        format: PayloadFormat,
    ) -> Result<Bytes, ClientError> {
        match format {
            PayloadFormat::LegacyJson => {
                let text = std::str::from_utf8(plaintext)
                    .map_err(|_| ClientError::Crypto(super::crypto::CryptoError::NotUtf8))?;
                Ok(Bytes::from(self.keys.seal_legacy(text)))
            }
            _ => {
                let ctx = MessageContext {
                    session: self.session.as_str(),
                    topic,
                    id,
                    timestamp_ms,
                };
                Ok(Bytes::from(self.keys.seal_message(&ctx, plaintext)?))
            }
        }
    }
}

/// A publish sealed by its caller, on its way to the session task.
pub(super) struct SealedPublish {
    id: [u8; 16],
    topic: String,
    /// Kept to seal it again should it grow stale before the broker has it.
    plaintext: Bytes,
    format: PayloadFormat,
    timestamp_ms: u64,
    payload: Bytes,
}

struct PendingPublish {
    sealed: SealedPublish,
    reply: oneshot::Sender<Result<PubAck, ClientError>>,
    /// Sent again after a reconnect, so `REPLAYED` means it was accepted before.
    resent: bool,
    /// Written to a connection at least once, so the broker may have it.
    written: bool,
}

struct LocalSub {
    filter: TopicFilter,
    options: SubscribeOptions,
    sink: mpsc::Sender<Message>,
    presence: Option<mpsc::Sender<super::Announced>>,
    /// Messages put in `sink` so far: each presence change goes with the count, so
    /// the application reads it after the messages that came before it, not others.
    handed: u64,
}

enum Outcome {
    /// The application closed the client.
    Closed,
    /// The connection broke; reconnect.
    Lost,
    /// The broker refused us for good.
    Fatal(ClientError),
}

/// What a `Subscribe` waiting for its answer was sent for.
enum Subscribing {
    /// The application's call, answered with its new local subscription's id.
    Call {
        id: u64,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    /// The SDK's own: restoring a filter after a reconnect, or changing its options
    /// when a sibling subscription ended. A refusal that may pass is tried again
    /// later ([`State::resubscribe_later`]); any other ends the filter's
    /// subscriptions here.
    Own { filter: TopicFilter },
}

/// The first wait before asking again for subscriptions the broker refused for now;
/// it doubles each round, up to the client's `max_backoff`.
const RESUBSCRIBE_WAIT: Duration = Duration::from_millis(250);
type KeysReply = oneshot::Sender<Result<Vec<super::PublishedKey>, ClientError>>;
type UnsubscribeReply = oneshot::Sender<Result<(), ClientError>>;

struct State {
    config: ClientConfig,
    stopped: Stopped,
    sealer: Arc<Sealer>,
    info: watch::Sender<SessionInfo>,
    next_request_id: u64,
    next_sub_id: u64,
    subs: HashMap<u64, LocalSub>,
    /// request_id → what the `Subscribe` was for.
    subscribing: HashMap<u64, Subscribing>,
    /// Filters the broker refused to restore for now (`worth_retrying`: a store that
    /// could not commit, a full session), asked for again at `resubscribe_at`, so that
    /// the application's subscriptions do not end over a passing refusal.
    resubscribe_later: Vec<TopicFilter>,
    resubscribe_at: Option<Instant>,
    resubscribe_wait: Duration,
    /// request_id → an `Unsubscribe` waiting for its answer: its filter, and the
    /// caller waiting for it, if any. Kept until answered: one whose connection is
    /// lost first is sent again ([`State::answers_lost`]).
    unsubscribing: HashMap<u64, (TopicFilter, Option<UnsubscribeReply>)>,
    /// request_id → the key being published, if any, and the caller waiting for `Keys`.
    keys_waiting: HashMap<u64, (Option<[u8; 32]>, KeysReply)>,
    /// This client's published public key (once the broker took it), published again
    /// after a reconnect.
    public_key: Option<[u8; 32]>,
    /// Filters to unsubscribe from once connected again.
    unsubscribe_later: Vec<TopicFilter>,
    /// Subscriptions found closed while handing a message over (their handle was
    /// dropped), to forget once the hand-over is done.
    dropped: Vec<u64>,
    /// Filters of durable subscriptions whose handle was dropped: kept on the broker
    /// (it queues for the client id while nobody here reads), so a sibling on the same
    /// filter, dropped or re-subscribed after a reconnect, does not end or downgrade
    /// them. An explicit unsubscribe on the filter ends them.
    kept_durable: FastSet<TopicFilter>,
    /// A `Subscribe` or `Unsubscribe` was queued while handling a frame: written at
    /// the end of the turn, not with the next acks.
    control_pending: bool,
    publishes: FastMap<[u8; 16], PendingPublish>,
    publish_order: VecDeque<[u8; 16]>,
    seen: FastSet<[u8; 16]>,
    seen_order: VecDeque<[u8; 16]>,
    orphans: VecDeque<Message>,
    /// Messages in subscriptions' buffers that the application has not taken yet, with
    /// the number of copies handed over: acknowledged when the first is taken (see
    /// [`Handback`]), forgotten when every copy was given back unread.
    untaken: FastMap<[u8; 16], u32>,
    handbacks: Arc<Handbacks>,
    /// The reports taken from `handbacks`, being handled (kept for its allocation).
    reports: Vec<Handback>,
    /// While messages are untaken: when to look at the reports if nothing else wakes
    /// the task first, and how long the last wait was (it doubles, up to
    /// [`TAKEN_CHECK_MAX`], while the application takes nothing).
    taken_check: Option<Instant>,
    taken_wait: Duration,
    /// Acks queued in the writer and not yet written, and since when.
    acks_held: usize,
    acks_since: Option<Instant>,
    /// File subscriptions, shared with the tasks that receive files.
    file_subs: FileSubs,
    /// Files verified lately, shared with the tasks that receive files.
    received_files: ReceivedFiles,
    /// Multiplexed (WebSocket) uploads waiting for `FileAccepted`.
    uploads: HashMap<[u8; 16], oneshot::Sender<Result<(), ClientError>>>,
    /// Multiplexed uploads still being sent (no `FileEnd` yet), each with the slot
    /// for its refusal, shared with its uploader: the broker refuses mid-file (too
    /// large, spool full) and answers every later frame of the file `NOT_FOUND`, so
    /// the first answer is the reason. An entry whose uploader gave up (the slot's
    /// last holder is this map) is swept at the next upload or reconnect.
    sending: HashMap<[u8; 16], files::Refusal>,
    /// Multiplexed (WebSocket) incoming files, by id.
    incoming: HashMap<[u8; 16], mpsc::Sender<FilePart>>,
    /// This task's own request queue, for the pieces it spawns (weak, so the task
    /// still ends when the last `Client` is dropped).
    requests: mpsc::WeakSender<Request>,
}

/// What [`start`] hands the [`Client`](super::Client): its request queue, the
/// session's details and the sealer.
pub(super) type Started = (
    mpsc::Sender<Request>,
    watch::Receiver<SessionInfo>,
    Arc<Sealer>,
    Arc<Handbacks>,
    Stopped,
);

/// Why the client stopped for good, once it has (not set when the application
/// closed it).
pub(super) type Stopped = Arc<std::sync::Mutex<Option<ClientError>>>;

/// What subscriptions report to the session task, collected without waking it: it
/// looks at its next turn anyway (the next burst of deliveries, a request), or when
/// [`State::taken_check`] is due. A wake-up per report would cost the client a task
/// switch, often a thread's, for every batch of messages the application takes.
#[derive(Debug, Default)]
pub(super) struct Handbacks {
    reports: std::sync::Mutex<Vec<Handback>>,
    /// A [`Handback::Dropped`] is among the reports: they are looked at even while
    /// no message is untaken.
    dropped: AtomicBool,
}

impl Handbacks {
    pub(super) fn push(&self, handback: Handback) {
        // Nothing panics while the lock is held, so it is never poisoned.
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(handback, Handback::Dropped(_)) {
            self.dropped.store(true, Ordering::Relaxed);
        }
        reports.push(handback);
    }

    /// Moves every report so far into `into` (empty), keeping both allocations.
    fn take(&self, into: &mut Vec<Handback>) {
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        self.dropped.store(false, Ordering::Relaxed);
        std::mem::swap(&mut *reports, into);
    }

    fn any_dropped(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Takes the [`Handback::Dropped`] reports only, leaving the others.
    fn take_dropped(&self) -> Vec<u64> {
        if !self.any_dropped() {
            return Vec::new();
        }
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        self.dropped.store(false, Ordering::Relaxed);
        let mut dropped = Vec::new();
        reports.retain(|report| match report {
            Handback::Dropped(id) => {
                dropped.push(*id);
                false
            }
            _ => true,
        });
        dropped
    }
}

/// What a [`Subscription`](super::Subscription) tells the session task about a message
/// it was given.
#[derive(Debug)]
pub(super) enum Handback {
    /// The application took it: acknowledge it.
    Taken([u8; 16]),
    /// The subscription was dropped with it unread: it stays unacknowledged, and a
    /// redelivery of it is handed over again.
    Returned([u8; 16]),
    /// Subscription `id` was dropped while the request queue was full (see
    /// [`Request::Dropped`]).
    Dropped(u64),
}

pub(super) async fn start(config: ClientConfig) -> Result<Started, ClientError> {
    let url = BrokerUrl::parse(&config.url)?;
    let session = SessionName::parse(&config.session)?;
    if let Some(id) = &config.client_id {
        ClientId::parse(id)?;
    }
    let mut dialer = Dialer::new(url, config.ca.as_deref(), config.websocket_fallback)?;
    let (info, info_rx) = watch::channel(SessionInfo::default());
    let sealer = Arc::new(Sealer {
        keys: SealingKeys::derive(&config.key),
        session,
        clock_offset_ms: AtomicI64::new(0),
        max_payload_bytes: AtomicU64::new(u64::MAX),
    });
    let mut state = State::new(config, sealer.clone(), info);
    let (tx, rx) = mpsc::channel(256);
    state.requests = tx.downgrade();
    let handbacks = Arc::clone(&state.handbacks);
    let clean = state.config.clean;
    let live = state.connect(&mut dialer, clean).await?;
    let stopped = Arc::clone(&state.stopped);
    tokio::spawn(state.run(dialer, live, rx));
    Ok((tx, info_rx, sealer, handbacks, stopped))
}

impl State {
    /// A client with nothing yet: no subscription, no publish, not connected.
    fn new(config: ClientConfig, sealer: Arc<Sealer>, info: watch::Sender<SessionInfo>) -> Self {
        State {
            sealer,
            info,
            next_request_id: 1,
            next_sub_id: 1,
            subs: HashMap::new(),
            subscribing: HashMap::new(),
            resubscribe_later: Vec::new(),
            resubscribe_at: None,
            resubscribe_wait: RESUBSCRIBE_WAIT,
            unsubscribing: HashMap::new(),
            unsubscribe_later: Vec::new(),
            dropped: Vec::new(),
            kept_durable: Default::default(),
            control_pending: false,
            publishes: FastMap::default(),
            publish_order: VecDeque::new(),
            seen: FastSet::default(),
            seen_order: VecDeque::new(),
            orphans: VecDeque::new(),
            untaken: FastMap::default(),
            handbacks: Arc::default(),
            reports: Vec::new(),
            taken_check: None,
            taken_wait: ACK_DELAY,
            acks_held: 0,
            acks_since: None,
            file_subs: FileSubs::default(),
            received_files: ReceivedFiles::default(),
            uploads: HashMap::new(),
            keys_waiting: HashMap::new(),
            public_key: None,
            sending: HashMap::new(),
            incoming: HashMap::new(),
            requests: mpsc::channel(1).0.downgrade(),
            stopped: Stopped::default(),
            config,
        }
    }
}

fn frame(kind: client_frame::Kind) -> ClientFrame {
    ClientFrame { kind: Some(kind) }
}

fn unsubscribe_frame(request_id: u64, filter: &TopicFilter) -> ClientFrame {
    frame(client_frame::Kind::Unsubscribe(proto::Unsubscribe {
        request_id,
        topic: filter.to_string(),
    }))
}

fn refused(e: &proto::Error) -> ClientError {
    ClientError::Refused {
        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
        message: e.message.clone(),
    }
}

impl State {
    /// Dials, says `Hello` and waits for `Welcome`.
    async fn connect(&mut self, dialer: &mut Dialer, clean: bool) -> Result<Live, ClientError> {
        let Control {
            mut writer,
            mut frames,
        } = dialer.connect().await?;
        writer
            .send(&frame(client_frame::Kind::Hello(proto::Hello {
                protocol_version: crate::carrier::PROTOCOL_VERSION,
                session: self.sealer.session.to_string(),
                password: self.config.password.clone(),
                client_id: self.config.client_id.clone().unwrap_or_default(),
                clean,
            })))
            .await?;
        let first = tokio::time::timeout(WELCOME_TIMEOUT, frames.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
            .ok_or_else(|| {
                ClientError::Connect("the broker closed the connection during Hello".into())
            })?;
        match first.kind {
            Some(server_frame::Kind::Welcome(w)) => {
                let offset = skew_ms(w.server_time_ms, local_now());
                self.sealer.clock_offset_ms.store(offset, Ordering::Relaxed);
                // 0: a broker that does not say; it refuses what is too large itself.
                let limit = Some(w.max_payload_bytes).filter(|&l| l > 0);
                self.sealer
                    .max_payload_bytes
                    .store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
                self.info.send_modify(|info| {
                    info.server_version = w.server_version;
                    info.retry_interval_ms = w.retry_interval_ms;
                    info.max_retries = w.max_retries;
                    info.message_expiry_ms = w.message_expiry_ms;
                    info.max_payload_bytes = w.max_payload_bytes;
                    info.replay_window_ms = w.replay_window_ms;
                    info.connections += 1;
                });
                if let Some(conn) = writer.quic_connection() {
                    tokio::spawn(files::accept_quic_files(conn.clone(), self.opener()));
                }
                Ok(Live { writer, frames })
            }
            Some(server_frame::Kind::Error(e)) => Err(refused(&e)),
            other => Err(ClientError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    }

    async fn run(mut self, mut dialer: Dialer, live: Live, mut requests: mpsc::Receiver<Request>) {
        let mut live = Some(live);
        let mut backoff = Duration::from_millis(100);
        let fatal = loop {
            if let Some(mut l) = live.take() {
                let outcome = self.serve(&mut l, &mut requests).await;
                if let Outcome::Lost = outcome {
                    self.connection_lost();
                }
                match outcome {
                    Outcome::Closed => {
                        l.writer.close().await;
                        break ClientError::Closed;
                    }
                    Outcome::Fatal(e) => break e,
                    Outcome::Lost if !self.config.reconnect => {
                        break ClientError::Connect("connection lost".into());
                    }
                    Outcome::Lost => {
                        // Not when the client stops instead: `fail_all` answers then.
                        self.answers_lost();
                        tracing::info!("connection to the broker lost; reconnecting");
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            // Wait out the backoff while still taking requests.
            let jitter = 0.8 + rand::random::<f64>() * 0.4;
            let until = Instant::now() + backoff.mul_f64(jitter);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    request = requests.recv() => match request {
                        None | Some(Request::Close) => {
                            self.fail_all(ClientError::Closed);
                            return;
                        }
                        Some(request) => self.on_request(request, None),
                    },
                }
            }
            match self.connect(&mut dialer, false).await {
                Ok(mut l) => match self.resume(&mut l).await {
                    Ok(()) => live = Some(l),
                    Err(e) => tracing::debug!(error = %e, "reconnected but lost again"),
                },
                Err(e @ ClientError::Refused { code, .. }) if !worth_retrying(code) => {
                    break e;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reconnect failed");
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        };
        tracing::debug!(error = %fatal, "client stopped");
        if !matches!(fatal, ClientError::Closed) {
            *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(fatal.clone());
        }
        self.fail_all(fatal);
    }

    /// Drops the entries of uploads whose uploader gave up (the map holds the last
    /// reference to their slot).
    fn forget_abandoned_uploads(&mut self) {
        self.sending
            .retain(|_, refusal| Arc::strong_count(refusal) > 1);
    }

    /// Ends what a lost connection carried that the next one cannot take up:
    /// multiplexed files, both ways. (Publishes are sent again and subscriptions
    /// renewed by [`Self::resume`]; QUIC uploads and incoming files fail on their
    /// own streams.)
    fn connection_lost(&mut self) {
        // Uploads being sent stop at their next chunk: the rest would reach a broker
        // that never saw their start.
        self.forget_abandoned_uploads();
        for refusal in self.sending.values() {
            let _ = refusal.set(upload_cut_off());
        }
        for (_, (_, reply)) in self.keys_waiting.drain() {
            let lost = "connection lost before the broker answered; ask again";
            let _ = reply.send(Err(ClientError::Connect(lost.into())));
        }
        // Whether the broker kept a file whose answer was lost cannot be known here.
        for (_, reply) in self.uploads.drain() {
            let _ = reply.send(Err(ClientError::Transfer(
                "connection lost before the broker answered: the file may have been accepted"
                    .into(),
            )));
        }
        // A file arriving is sent again (from the start, to a durable subscriber or
        // one that did not acknowledge it) or not at all; this copy has ended.
        for (_, part) in self.incoming.drain() {
            let _ = part.try_send(FilePart::Aborted("connection to the broker lost".into()));
        }
    }

    /// The broker's answers to subscribes and unsubscribes in flight went with the
    /// connection. A subscription being made exists here, and is restored with the
    /// others on reconnecting (as one made while disconnected is): the call has it.
    /// An ending may not have reached the broker, where a durable subscription would
    /// outlive it: it is sent again on reconnecting.
    fn answers_lost(&mut self) {
        for (_, subscribing) in self.subscribing.drain() {
            if let Subscribing::Call { id, reply } = subscribing {
                let _ = reply.send(Ok(id));
            }
        }
        for (_, (filter, reply)) in std::mem::take(&mut self.unsubscribing) {
            if self.merged_options(&filter).is_none() && !self.unsubscribe_later.contains(&filter) {
                self.unsubscribe_later.push(filter);
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Serves one live connection until it ends.
    async fn serve(&mut self, live: &mut Live, requests: &mut mpsc::Receiver<Request>) -> Outcome {
        // Acks held for a connection that was lost went with it: the broker sends those
        // messages again and they are acknowledged as duplicates.
        self.acks_held = 0;
        self.acks_since = None;
        let mut ack_timer = LoopTimer::new();
        loop {
            // A request's frames are written at the end of this turn; acks alone may
            // wait for later turns (see ACK_DELAY).
            let mut urgent = false;
            let ack_due = self.acks_since.map(|since| since + ACK_DELAY);
            let deadline = [ack_due, self.taken_check, self.resubscribe_at]
                .into_iter()
                .flatten()
                .min();
            ack_timer.set(deadline, |at| at);
            tokio::select! {
                request = requests.recv() => match request {
                    None | Some(Request::Close) => return self.close(live).await,
                    Some(request) => {
                        urgent = true;
                        self.on_request(request, Some(&mut live.writer));
                    }
                },
                frame = live.frames.recv() => match frame {
                    None => return Outcome::Lost,
                    Some(frame) => {
                        if let Err(fatal) = self.on_frame(frame, &mut live.writer).await {
                            return Outcome::Fatal(fatal);
                        }
                    }
                },
                _ = ack_timer.fired(), if ack_timer.is_armed() => urgent = true,
            }
            // Take what is already waiting before writing, so a burst of publishes and
            // acks leaves in one write instead of one each.
            for _ in 0..BURST {
                let mut idle = true;
                match requests.try_recv() {
                    Ok(Request::Close) => return self.close(live).await,
                    Ok(request) => {
                        urgent = true;
                        self.on_request(request, Some(&mut live.writer));
                        idle = false;
                    }
                    Err(_) => {}
                }
                if let Some(frame) = live.frames.try_recv() {
                    if let Err(fatal) = self.on_frame(frame, &mut live.writer).await {
                        return Outcome::Fatal(fatal);
                    }
                    idle = false;
                }
                if idle {
                    break;
                }
            }
            self.take_reports(&mut live.writer);
            self.resubscribe_due(&mut live.writer);
            let control = std::mem::take(&mut self.control_pending);
            if !urgent && !control && !self.acks_due() {
                continue;
            }
            self.acks_held = 0;
            self.acks_since = None;
            if live.writer.flush().await.is_err() {
                return Outcome::Lost;
            }
        }
    }

    /// The application closed the client: what it took is acknowledged before the
    /// last write.
    async fn close(&mut self, live: &mut Live) -> Outcome {
        self.take_reports(&mut live.writer);
        let _ = live.writer.flush().await;
        Outcome::Closed
    }

    /// Handles what subscriptions reported: a message taken is acknowledged, one given
    /// back unread is forgotten, a dropped subscription is removed. Then decides when
    /// to look again.
    fn take_reports(&mut self, writer: &mut ControlWriter) {
        if self.untaken.is_empty() && !self.handbacks.any_dropped() {
            return;
        }
        let mut reports = std::mem::take(&mut self.reports);
        self.handbacks.take(&mut reports);
        let mut taken = false;
        for report in reports.drain(..) {
            match report {
                // Another subscription may have taken a copy first.
                Handback::Taken(id) if self.untaken.remove(&id).is_some() => {
                    taken = true;
                    self.hold_ack(writer, Bytes::copy_from_slice(&id));
                }
                Handback::Taken(_) => {}
                Handback::Returned(id) => {
                    if let Some(copies) = self.untaken.get_mut(&id) {
                        *copies -= 1;
                        if *copies == 0 {
                            self.untaken.remove(&id);
                            // Forgotten, so the broker's next delivery is handed over
                            // again.
                            self.seen.remove(&id);
                        }
                    }
                }
                Handback::Dropped(id) => self.remove_subscription(id, true, Some(writer), None),
            }
        }
        self.reports = reports;
        if self.untaken.is_empty() {
            self.taken_check = None;
            self.taken_wait = ACK_DELAY;
            return;
        }
        let now = Instant::now();
        if self.taken_check.is_none_or(|at| at <= now) {
            self.taken_wait = if taken {
                ACK_DELAY
            } else {
                (self.taken_wait * 2).min(TAKEN_CHECK_MAX)
            };
            self.taken_check = Some(now + self.taken_wait);
        }
    }

    /// A message was handed to a subscription: acknowledged once the application
    /// takes it.
    fn untaken(&mut self, id: [u8; 16], copies: u32) {
        self.untaken.insert(id, copies);
        if self.taken_check.is_none() {
            self.taken_wait = ACK_DELAY;
            self.taken_check = Some(Instant::now() + ACK_DELAY);
        }
    }

    /// Queues an ack in the writer, to be written with the next write or when due.
    fn hold_ack(&mut self, writer: &mut ControlWriter, message_id: Bytes) {
        writer.push(&frame(client_frame::Kind::Ack(proto::Ack { message_id })));
        self.acks_held += 1;
        self.acks_since.get_or_insert_with(Instant::now);
    }

    /// Whether the acks held should be written now.
    fn acks_due(&self) -> bool {
        self.acks_held >= ACK_BATCH || self.acks_since.is_some_and(|t| t.elapsed() >= ACK_DELAY)
    }

    /// After a reconnect: subscriptions and unanswered publishes go out again.
    async fn resume(&mut self, live: &mut Live) -> Result<(), ClientError> {
        // What an earlier resume sent, if its connection was lost at once.
        self.answers_lost();
        // Handles dropped while the queue was full are not subscribed again.
        for id in self.handbacks.take_dropped() {
            self.remove_subscription(id, true, None, None);
        }
        for unsubscribe in self.unsubscribes_owed() {
            live.writer.push(&unsubscribe);
        }
        if let Some(public_key) = self.public_key {
            let request_id = self.request_id();
            live.writer.push(&key_frame(request_id, Some(public_key)));
        }
        // Every filter, file subscriptions too, those refused for now included.
        self.resubscribe_later.clear();
        self.resubscribe_at = None;
        self.resubscribe_wait = RESUBSCRIBE_WAIT;
        for (filter, options) in self.subscriptions() {
            let request_id = self.request_id();
            live.writer
                .push(&subscribe_frame(request_id, &filter, options));
            self.subscribing
                .insert(request_id, Subscribing::Own { filter });
        }
        let window = self.info.borrow().replay_window_ms;
        let now = self.sealer.server_now();
        let order: Vec<[u8; 16]> = self.publish_order.iter().copied().collect();
        for id in order {
            let Some(p) = self.publishes.get(&id) else {
                continue;
            };
            // The broker may have come back with a lower payload limit.
            let note = if p.written {
                " (it may have reached the broker before the connection was lost)"
            } else {
                ""
            };
            let p = &p.sealed;
            if let Err(e) = self.sealer.check_size(p.plaintext.len(), p.format, note) {
                if let Some(p) = self.publishes.remove(&id) {
                    let _ = p.reply.send(Err(e));
                }
                continue;
            }
            if needs_restamp(now, p.timestamp_ms, window) {
                // Re-stamped and re-sealed under the same id (design §4).
                match self.sealer.seal(&p.topic, &id, now, &p.plaintext, p.format) {
                    Ok(payload) => {
                        if let Some(p) = self.publishes.get_mut(&id) {
                            p.sealed.payload = payload;
                            p.sealed.timestamp_ms = now;
                        }
                    }
                    Err(e) => {
                        if let Some(p) = self.publishes.remove(&id) {
                            let _ = p.reply.send(Err(e));
                        }
                        continue;
                    }
                }
            }
            if let Some(p) = self.publishes.get_mut(&id) {
                p.resent = true;
                p.written = true;
                live.writer.push_publish(&publish_frame(&p.sealed));
            }
        }
        live.writer.flush().await?;
        Ok(())
    }

    /// The broker answered `Unsubscribe` `request_id`.
    fn unsubscribed(&mut self, request_id: u64) {
        if let Some((_, Some(reply))) = self.unsubscribing.remove(&request_id) {
            let _ = reply.send(Ok(()));
        }
    }

    /// The `Unsubscribe`s owed since the last connection, now in flight: until the
    /// broker answers them, a lost connection owes them again.
    fn unsubscribes_owed(&mut self) -> Vec<ClientFrame> {
        std::mem::take(&mut self.unsubscribe_later)
            .into_iter()
            .map(|filter| {
                let request_id = self.request_id();
                let unsubscribe = unsubscribe_frame(request_id, &filter);
                self.unsubscribing.insert(request_id, (filter, None));
                unsubscribe
            })
            .collect()
    }

    fn opener(&self) -> Opener {
        Opener {
            session: self.sealer.session.clone(),
            keys: self.sealer.keys.clone(),
            subs: self.file_subs.clone(),
            received: self.received_files.clone(),
            requests: self.requests.clone(),
        }
    }

    /// The broker refused a `Subscribe` the SDK sent of its own accord, which nobody
    /// awaits. One that may pass is asked for again later; after any other, the
    /// filter's subscriptions end here (their streams end), as the broker has none.
    fn own_subscribe_refused(&mut self, filter: TopicFilter, code: ErrorCode, e: &proto::Error) {
        if worth_retrying(code) {
            let wait = self.resubscribe_wait;
            if self.resubscribe_at.is_none() {
                self.resubscribe_at = Some(Instant::now() + wait);
                self.resubscribe_wait = (wait * 2).min(self.config.max_backoff);
            }
            tracing::info!(
                filter = filter.as_str(),
                ?code,
                message = %e.message,
                "the broker refused a subscription for now; asking again shortly"
            );
            if !self.resubscribe_later.contains(&filter) {
                self.resubscribe_later.push(filter);
            }
            return;
        }
        tracing::warn!(
            filter = filter.as_str(),
            ?code,
            message = %e.message,
            "the broker refused a subscription the client restored; it has ended"
        );
        self.subs.retain(|_, s| s.filter != filter);
        self.file_subs.end(&filter);
        self.kept_durable.remove(&filter);
    }

    /// Asks again for the subscriptions refused for now, once their wait is over.
    fn resubscribe_due(&mut self, writer: &mut ControlWriter) {
        if self.resubscribe_at.is_none_or(|at| at > Instant::now()) {
            return;
        }
        self.resubscribe_at = None;
        for filter in std::mem::take(&mut self.resubscribe_later) {
            // Ended here meanwhile: nothing to ask for.
            let Some(options) = self.merged_options(&filter) else {
                continue;
            };
            let request_id = self.request_id();
            writer.push(&subscribe_frame(request_id, &filter, options));
            self.subscribing
                .insert(request_id, Subscribing::Own { filter });
            self.control_pending = true;
        }
    }

    /// Every subscription the broker should have from this client: one per filter,
    /// for its local message and file subscriptions together (see [`merge`]).
    fn subscriptions(&self) -> Vec<(TopicFilter, SubscribeOptions)> {
        let mut all: Vec<(TopicFilter, SubscribeOptions)> = Vec::new();
        let local = self.subs.values().map(|s| (s.filter.clone(), s.options));
        let kept = self.kept_durable.iter().map(|f| {
            let durable = SubscribeOptions {
                durable: true,
                ..SubscribeOptions::default()
            };
            (f.clone(), durable)
        });
        for (filter, options) in local.chain(self.file_subs.filters()).chain(kept) {
            match all.iter_mut().find(|(f, _)| *f == filter) {
                Some((_, merged)) => *merged = merge(*merged, options),
                None => all.push((filter, options)),
            }
        }
        all
    }

    /// The options the broker should have for `filter`, if anything here subscribes
    /// to it.
    fn merged_options(&self, filter: &TopicFilter) -> Option<SubscribeOptions> {
        self.subscriptions()
            .into_iter()
            .find(|(f, _)| f == filter)
            .map(|(_, options)| options)
    }

    /// Removes local subscription `id` (of messages or files) and brings the broker's
    /// subscription on its filter in line with what is left here: the same, other
    /// options (a `Subscribe` with them; the broker deletes a durable queue a
    /// non-durable `Subscribe` replaces), or nothing (`Unsubscribe`). `dropped`: the
    /// application dropped the handle, so a durable subscription is kept on the broker
    /// for the client id's next connection ([`State::kept_durable`]); an explicit
    /// unsubscribe ends the filter's kept one too. `reply` gets the broker's answer.
    fn remove_subscription(
        &mut self,
        id: u64,
        dropped: bool,
        writer: Option<&mut ControlWriter>,
        reply: Option<oneshot::Sender<Result<(), ClientError>>>,
    ) {
        let answered = |reply: Option<oneshot::Sender<_>>| {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        };
        let removed = match self.subs.remove(&id) {
            Some(sub) => Some((sub.filter, sub.options)),
            None => self.file_subs.remove(id),
        };
        let Some((filter, options)) = removed else {
            return answered(reply);
        };
        // What the broker has: this one merged with the rest (a dropped handle is no
        // longer counted among the rest).
        let before = Some(
            self.merged_options(&filter)
                .map_or(options, |rest| merge(rest, options)),
        );
        if dropped && options.durable {
            self.kept_durable.insert(filter.clone());
        } else if !dropped {
            self.kept_durable.remove(&filter);
        }
        let after = self.merged_options(&filter);
        if after == before {
            return answered(reply);
        }
        let Some(w) = writer else {
            // A reconnect subscribes with what is left; only an end must be sent.
            if after.is_none() {
                self.unsubscribe_later.push(filter);
            }
            return answered(reply);
        };
        let request_id = self.request_id();
        self.control_pending = true;
        match after {
            Some(options) => {
                w.push(&subscribe_frame(request_id, &filter, options));
                self.subscribing
                    .insert(request_id, Subscribing::Own { filter });
                answered(reply);
            }
            None => {
                w.push(&unsubscribe_frame(request_id, &filter));
                self.unsubscribing.insert(request_id, (filter, reply));
            }
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }

    /// Handles an application request; frames go to `writer` when connected.
    fn on_request(&mut self, request: Request, writer: Option<&mut ControlWriter>) {
        match request {
            Request::Publish { sealed, reply } => {
                // Checked against the limit its caller knew; a reconnect since may
                // have brought a lower one.
                let checked = self
                    .sealer
                    .check_size(sealed.plaintext.len(), sealed.format, "");
                if let Err(e) = checked {
                    let _ = reply.send(Err(e));
                    return;
                }
                let id = sealed.id;
                let mut pending = PendingPublish {
                    sealed,
                    reply,
                    resent: false,
                    written: false,
                };
                if let Some(w) = writer {
                    w.push_publish(&publish_frame(&pending.sealed));
                    pending.written = true;
                }
                self.publishes.insert(id, pending);
                self.publish_order.push_back(id);
                if self.publish_order.len() > 2 * self.publishes.len() + 64 {
                    let live = &self.publishes;
                    self.publish_order.retain(|id| live.contains_key(id));
                }
            }
            Request::Subscribe {
                filter,
                options,
                sink,
                presence,
                reply,
            } => {
                let filter = match TopicFilter::parse(&filter) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                };
                let id = self.next_sub_id;
                self.next_sub_id += 1;
                let before = self.merged_options(&filter);
                self.subs.insert(
                    id,
                    LocalSub {
                        filter: filter.clone(),
                        options,
                        sink,
                        presence,
                        handed: 0,
                    },
                );
                let after = self.merged_options(&filter).unwrap_or(options);
                match writer {
                    Some(w) if before != Some(after) => {
                        let request_id = self.request_id();
                        self.subscribing
                            .insert(request_id, Subscribing::Call { id, reply });
                        w.push(&subscribe_frame(request_id, &filter, after));
                    }
                    _ => {
                        let _ = reply.send(Ok(id));
                    }
                }
                self.adopt_orphans();
            }
            Request::Keys { publish, reply } => {
                let Some(w) = writer else {
                    let why = "not connected to the broker (reconnecting); ask again";
                    let _ = reply.send(Err(ClientError::Connect(why.into())));
                    return;
                };
                let request_id = self.request_id();
                self.keys_waiting.insert(request_id, (publish, reply));
                self.control_pending = true;
                w.push(&key_frame(request_id, publish));
            }
            Request::Unsubscribe { id, reply } => {
                self.remove_subscription(id, false, writer, Some(reply));
            }
            Request::Dropped { id } => self.remove_subscription(id, true, writer, None),
            Request::SubscribeFiles {
                filter,
                options,
                sink,
                reply,
            } => {
                let filter = match TopicFilter::parse(&filter) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                };
                let id = self.next_sub_id;
                self.next_sub_id += 1;
                let before = self.merged_options(&filter);
                self.file_subs.add(id, filter.clone(), options, sink);
                let after = self.merged_options(&filter).unwrap_or(options);
                match writer {
                    Some(w) if before != Some(after) => {
                        let request_id = self.request_id();
                        self.subscribing
                            .insert(request_id, Subscribing::Call { id, reply });
                        w.push(&subscribe_frame(request_id, &filter, after));
                    }
                    _ => {
                        let _ = reply.send(Ok(id));
                    }
                }
            }
            Request::BeginFile { reply } => {
                let start = |sink| FileStart {
                    file_id: rand::random(),
                    sink,
                    session: self.sealer.session.clone(),
                    keys: self.sealer.keys.clone(),
                    timestamp_ms: self.sealer.server_now(),
                };
                match writer.as_deref().map(ControlWriter::quic_connection) {
                    None => {
                        let _ = reply.send(Err(ClientError::Connect(
                            "not connected; retry the file".into(),
                        )));
                    }
                    Some(Some(conn)) => {
                        // Opening a stream may wait for the broker's stream limit:
                        // not on this task.
                        let conn = conn.clone();
                        let pending = start(files::FileSink::Multiplexed {
                            requests: mpsc::channel(1).0,
                            refusal: files::Refusal::default(),
                        });
                        tokio::spawn(async move {
                            let answer = match conn.open_bi().await {
                                Ok((send, recv)) => Ok(FileStart {
                                    sink: files::FileSink::Quic { send, recv },
                                    ..pending
                                }),
                                Err(e) => Err(ClientError::Connect(e.to_string())),
                            };
                            let _ = reply.send(answer);
                        });
                    }
                    Some(None) => {
                        let answer = match self.requests.upgrade() {
                            Some(requests) => {
                                let refusal = files::Refusal::default();
                                let upload = start(files::FileSink::Multiplexed {
                                    requests,
                                    refusal: refusal.clone(),
                                });
                                self.forget_abandoned_uploads();
                                self.sending.insert(upload.file_id, refusal);
                                Ok(upload)
                            }
                            None => Err(ClientError::Closed),
                        };
                        let _ = reply.send(answer);
                    }
                }
            }
            Request::FileFrame(frame) => {
                // Frames of an upload already refused or cut off, queued before its
                // uploader saw that, would only be answered NOT_FOUND.
                let ended = match &frame.kind {
                    Some(client_frame::Kind::FileChunk(c)) => <[u8; 16]>::try_from(&c.file_id[..])
                        .ok()
                        .and_then(|id| self.sending.get(&id))
                        .is_some_and(|refusal| refusal.get().is_some()),
                    _ => false,
                };
                if let Some(w) = writer
                    && !ended
                {
                    w.push(&frame);
                }
            }
            Request::FileEnd {
                frame,
                file_id,
                reply,
            } => {
                if let Some(refusal) = self.sending.remove(&file_id)
                    && let Some(refusal) = refusal.get()
                {
                    let _ = reply.send(Err(refusal.clone()));
                    return;
                }
                match writer {
                    Some(w) => {
                        w.push(&frame);
                        self.uploads.insert(file_id, reply);
                    }
                    None => {
                        let _ = reply.send(Err(upload_cut_off()));
                    }
                }
            }
            Request::AckFile(id) => {
                if let Some(w) = writer {
                    w.push(&frame(client_frame::Kind::Ack(proto::Ack {
                        message_id: Bytes::copy_from_slice(&id),
                    })));
                }
            }
            Request::UnwantedFile { file_id, topic } => {
                if self.subs.values().any(|s| s.filter.matches_str(&topic))
                    && let Some(w) = writer
                {
                    w.push(&frame(client_frame::Kind::Ack(proto::Ack {
                        message_id: Bytes::copy_from_slice(&file_id),
                    })));
                }
            }
            Request::Close => {}
        }
    }

    /// Handles one frame from the broker. Errs only on a fatal refusal.
    async fn on_frame(
        &mut self,
        frame: ServerFrame,
        writer: &mut ControlWriter,
    ) -> Result<(), ClientError> {
        let Some(kind) = frame.kind else {
            return Ok(());
        };
        match kind {
            server_frame::Kind::Deliver(d) => self.on_deliver(d, writer).await,
            server_frame::Kind::PubAck(a) => {
                if let Ok(id) = <[u8; 16]>::try_from(&a.message_id[..])
                    && let Some(p) = self.publishes.remove(&id)
                {
                    let status = proto::PubAckStatus::try_from(a.status).unwrap_or_default();
                    let _ = p.reply.send(Ok(PubAck {
                        message_id: id,
                        status: status.into(),
                    }));
                }
            }
            server_frame::Kind::Subscribed(s) => {
                match self.subscribing.remove(&s.request_id) {
                    Some(Subscribing::Call { id, reply }) => {
                        let _ = reply.send(Ok(id));
                    }
                    // Taken: the next refusal waits from the start again.
                    Some(Subscribing::Own { .. }) if self.resubscribe_at.is_none() => {
                        self.resubscribe_wait = RESUBSCRIBE_WAIT;
                    }
                    _ => {}
                }
            }
            server_frame::Kind::Unsubscribed(u) => self.unsubscribed(u.request_id),
            server_frame::Kind::Keys(k) => {
                if let Some((published, reply)) = self.keys_waiting.remove(&k.request_id) {
                    if published.is_some() {
                        self.public_key = published;
                    }
                    let keys = k
                        .keys
                        .into_iter()
                        .filter_map(|entry| {
                            Some(super::PublishedKey {
                                public_key: entry.public_key[..].try_into().ok()?,
                                client_id: entry.client_id,
                            })
                        })
                        .collect();
                    let _ = reply.send(Ok(keys));
                }
            }
            server_frame::Kind::Error(e) => return self.on_error(e).await,
            server_frame::Kind::FileAccepted(a) => {
                if let Ok(id) = <[u8; 16]>::try_from(&a.file_id[..])
                    && let Some(reply) = self.uploads.remove(&id)
                {
                    let _ = reply.send(Ok(()));
                }
            }
            server_frame::Kind::FileHeader(h) => {
                let Ok(id) = <[u8; 16]>::try_from(&h.file_id[..]) else {
                    return Ok(());
                };
                let (tx, rx) = mpsc::channel(8);
                tokio::spawn(files::receive(self.opener(), rx));
                if tx.send(FilePart::Header(h)).await.is_ok() {
                    self.incoming.insert(id, tx);
                }
            }
            server_frame::Kind::FileChunk(c) => {
                if let Ok(id) = <[u8; 16]>::try_from(&c.file_id[..])
                    && let Some(tx) = self.incoming.get(&id)
                    && tx.send(FilePart::Chunk(c)).await.is_err()
                {
                    self.incoming.remove(&id);
                }
            }
            server_frame::Kind::FileEnd(e) => {
                if let Ok(id) = <[u8; 16]>::try_from(&e.file_id[..])
                    && let Some(tx) = self.incoming.remove(&id)
                {
                    let _ = tx.send(FilePart::End(e)).await;
                }
            }
            server_frame::Kind::Presence(p) => self.on_presence(p),
            other => tracing::trace!(frame = ?other, "ignored frame"),
        }
        Ok(())
    }

    /// Hands a presence change to every local subscription on its filter that asked.
    fn on_presence(&mut self, p: proto::Presence) {
        let change = match proto::PresenceEvent::try_from(p.event) {
            Ok(proto::PresenceEvent::Joined) => super::PresenceChange::Joined {
                client_id: p.client_id,
            },
            Ok(proto::PresenceEvent::Left) => super::PresenceChange::Left {
                client_id: p.client_id,
            },
            _ => return tracing::debug!(event = p.event, "presence change of an unknown kind"),
        };
        for sub in self.subs.values() {
            if let Some(tx) = &sub.presence
                && sub.filter.as_str() == p.topic
                && let Err(mpsc::error::TrySendError::Full(_)) =
                    tx.try_send((sub.handed, change.clone()))
            {
                tracing::debug!(filter = %sub.filter, "presence change dropped: the application reads none");
            }
        }
    }

    async fn on_error(&mut self, e: proto::Error) -> Result<(), ClientError> {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
        if let Ok(id) = <[u8; 16]>::try_from(&e.message_id[..]) {
            if let Some(reply) = self.uploads.remove(&id) {
                let _ = reply.send(Err(refused(&e)));
                return Ok(());
            }
            if let Some(refusal) = self.sending.get(&id) {
                let _ = refusal.set(refused(&e));
                return Ok(());
            }
            if let Some(tx) = self.incoming.remove(&id) {
                let _ = tx.send(FilePart::Aborted(e.message)).await;
                return Ok(());
            }
        }
        if let Ok(id) = <[u8; 16]>::try_from(&e.message_id[..])
            && let Some(p) = self.publishes.remove(&id)
        {
            let answer = if code == ErrorCode::Replayed && p.resent {
                Ok(PubAck {
                    message_id: id,
                    status: PublishStatus::AlreadyAccepted,
                })
            } else {
                Err(refused(&e))
            };
            let _ = p.reply.send(answer);
            return Ok(());
        }
        if let Some(subscribing) = self.subscribing.remove(&e.request_id) {
            match subscribing {
                Subscribing::Call { id, reply } => {
                    // Of messages or of files.
                    self.subs.remove(&id);
                    self.file_subs.remove(id);
                    let _ = reply.send(Err(refused(&e)));
                }
                Subscribing::Own { filter } => self.own_subscribe_refused(filter, code, &e),
            }
            return Ok(());
        }
        if let Some((filter, reply)) = self.unsubscribing.remove(&e.request_id) {
            match reply {
                Some(reply) => {
                    let _ = reply.send(Err(refused(&e)));
                }
                None => tracing::warn!(
                    filter = filter.as_str(),
                    code = e.code,
                    message = %e.message,
                    "the broker refused an unsubscribe the client owed"
                ),
            }
            return Ok(());
        }
        if let Some((_, reply)) = self.keys_waiting.remove(&e.request_id) {
            let _ = reply.send(Err(refused(&e)));
            return Ok(());
        }
        match code {
            ErrorCode::TakenOver | ErrorCode::SessionSuspended | ErrorCode::Unauthenticated => {
                Err(refused(&e))
            }
            _ => {
                tracing::warn!(?code, message = %e.message, "error from the broker");
                Ok(())
            }
        }
    }

    async fn on_deliver(&mut self, d: proto::Deliver, writer: &mut ControlWriter) {
        let Ok(id) = <[u8; 16]>::try_from(&d.message_id[..]) else {
            tracing::warn!("Deliver without a valid message_id");
            return;
        };
        if self.seen.contains(&id) {
            // A redelivery of something already handed over: acknowledged again if the
            // application took it (the first ack was lost), else when it does.
            if self.untaken.contains_key(&id) {
                // It may have been taken or given back since the task last looked.
                self.take_reports(writer);
                if self.untaken.contains_key(&id) {
                    return; // acknowledged when the application takes it
                }
            }
            if self.seen.contains(&id) {
                // Taken already; the broker did not get that ack.
                self.hold_ack(writer, d.message_id);
                return;
            }
            // Given back unread: handed over again below.
        }
        let format = PayloadFormat::try_from(d.format).unwrap_or_default();
        if format == PayloadFormat::LegacyJson && !self.config.accept_legacy {
            tracing::debug!(topic = %d.topic, "dropping a LEGACY_JSON message: accept_legacy is off");
            self.remember(id);
            self.hold_ack(writer, d.message_id);
            return;
        }
        let opened = match format {
            PayloadFormat::LegacyJson => self.sealer.keys.open_legacy(&d.payload).map(Bytes::from),
            _ => {
                let ctx = MessageContext {
                    session: self.sealer.session.as_str(),
                    topic: &d.topic,
                    id: &id,
                    timestamp_ms: d.timestamp_ms,
                };
                self.sealer
                    .keys
                    .open_message(&ctx, &d.payload)
                    .map(Bytes::from)
            }
        };
        let payload = match opened {
            Ok(p) => p,
            Err(e) => {
                // Forged, corrupted, moved between topics, or sealed with another key:
                // never handed over; acknowledged so it is not sent again.
                tracing::warn!(topic = %d.topic, error = %e, "dropping a message that failed verification");
                self.remember(id);
                self.hold_ack(writer, d.message_id);
                return;
            }
        };
        let message = Message {
            topic: d.topic,
            payload,
            message_id: id,
            timestamp_ms: d.timestamp_ms,
            format,
            attempt: d.attempt,
        };
        let handed = self.hand_over(message).await;
        for gone in std::mem::take(&mut self.dropped) {
            self.remove_subscription(gone, true, Some(&mut *writer), None);
        }
        match handed {
            Ok(copies) => {
                self.remember(id);
                self.untaken(id, copies);
            }
            // Not acknowledged yet: held until a subscription wants it, once (the
            // broker sends it again until then).
            Err(message)
                if self.orphans.len() < ORPHAN_CAPACITY
                    && !self.orphans.iter().any(|o| o.message_id == id) =>
            {
                self.orphans.push_back(message);
            }
            Err(_) => {}
        }
    }

    /// Gives a message to every local subscription that matches (the last one gets the
    /// message itself, the others a copy), and says how many took it. Gives it back if
    /// none does.
    async fn hand_over(&mut self, message: Message) -> Result<u32, Message> {
        let mut left = self
            .subs
            .values()
            .filter(|s| s.filter.matches_str(&message.topic))
            .count();
        if left == 0 {
            return Err(message);
        }
        let mut message = Some(message);
        let mut delivered = 0;
        let mut gone = Vec::new();
        for (id, sub) in &mut self.subs {
            let Some(m) = message.as_ref() else { break };
            if !sub.filter.matches_str(&m.topic) {
                continue;
            }
            left -= 1;
            let copy = if left > 0 {
                m.clone()
            } else {
                match message.take() {
                    Some(m) => m,
                    None => break,
                }
            };
            match sub.sink.send(copy).await {
                Ok(()) => {
                    delivered += 1;
                    sub.handed += 1;
                }
                Err(mpsc::error::SendError(back)) => {
                    // The application dropped the Subscription; stop delivering to it.
                    gone.push(*id);
                    message = message.or(Some(back));
                }
            }
        }
        self.dropped.extend(gone);
        match message {
            Some(message) if delivered == 0 => Err(message),
            _ => Ok(delivered),
        }
    }

    /// Replays held deliveries into subscriptions that now want them.
    fn adopt_orphans(&mut self) {
        if self.orphans.is_empty() {
            return;
        }
        let orphans = std::mem::take(&mut self.orphans);
        for message in orphans {
            if self.seen.contains(&message.message_id) {
                continue; // handed over since it was held: a duplicate now
            }
            let mut copies = 0;
            for sub in self.subs.values_mut() {
                if sub.filter.matches_str(&message.topic)
                    && sub.sink.try_send(message.clone()).is_ok()
                {
                    copies += 1;
                    sub.handed += 1;
                }
            }
            if copies > 0 {
                self.remember(message.message_id);
                self.untaken(message.message_id, copies);
            } else {
                self.orphans.push_back(message);
            }
        }
    }

    fn remember(&mut self, id: [u8; 16]) {
        if self.seen.capacity() == 0 {
            // Sized once, at the first delivery (a client that only publishes never
            // pays): growing by doubling would rehash up to 100k ids in one call,
            // stalling deliveries for a millisecond or more, several times over.
            self.seen.reserve(SEEN_CAPACITY + 1);
            self.seen_order.reserve_exact(SEEN_CAPACITY + 1);
        }
        if self.seen.insert(id) {
            self.seen_order.push_back(id);
            if self.seen_order.len() > SEEN_CAPACITY
                && let Some(old) = self.seen_order.pop_front()
            {
                self.seen.remove(&old);
            }
        }
    }

    fn fail_all(&mut self, error: ClientError) {
        for (_, p) in self.publishes.drain() {
            let _ = p.reply.send(Err(error.clone()));
        }
        for (_, subscribing) in self.subscribing.drain() {
            if let Subscribing::Call { reply, .. } = subscribing {
                let _ = reply.send(Err(error.clone()));
            }
        }
        for (_, (_, reply)) in self.unsubscribing.drain() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(error.clone()));
            }
        }
        for (_, (_, reply)) in self.keys_waiting.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, reply) in self.uploads.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        self.subs.clear();
    }
}

/// Why a multiplexed upload ended early: its connection was lost while it was sent.
fn upload_cut_off() -> ClientError {
    ClientError::Connect("connection lost during the upload".into())
}

/// One broker subscription serves every local one on its filter: durable or with
/// presence if any of them is, with the longest history.
fn merge(a: SubscribeOptions, b: SubscribeOptions) -> SubscribeOptions {
    SubscribeOptions {
        durable: a.durable || b.durable,
        presence: a.presence || b.presence,
        history: a.history.max(b.history),
    }
}

fn subscribe_frame(
    request_id: u64,
    filter: &TopicFilter,
    options: SubscribeOptions,
) -> ClientFrame {
    frame(client_frame::Kind::Subscribe(proto::Subscribe {
        request_id,
        topic: filter.to_string(),
        durable: options.durable,
        history: options.history,
        presence: options.presence,
    }))
}

/// `PublishKey` when there is a key to publish, else `GetKeys`: both are answered
/// with `Keys`.
fn key_frame(request_id: u64, publish: Option<[u8; 32]>) -> ClientFrame {
    frame(match publish {
        Some(key) => client_frame::Kind::PublishKey(proto::PublishKey {
            request_id,
            public_key: Bytes::copy_from_slice(&key),
        }),
        None => client_frame::Kind::GetKeys(proto::GetKeys { request_id }),
    })
}

fn publish_frame(p: &SealedPublish) -> PublishFields<'_> {
    PublishFields {
        message_id: &p.id,
        topic: &p.topic,
        payload: &p.payload,
        timestamp_ms: p.timestamp_ms,
        format: p.format,
    }
}

/// Whether a reconnect refused with `code` is tried again. A busy broker
/// (`RATE_LIMITED`, `INTERNAL`) or a full one or full session (`LIMIT_EXCEEDED`: its
/// connections or clients) may have room soon; a wrong password, a suspended session or
/// a takeover will not change by waiting, and end the client.
fn worth_retrying(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::RateLimited | ErrorCode::Internal | ErrorCode::LimitExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::SessionKey;

    fn state() -> State {
        let config = ClientConfig::new("quic://127.0.0.1:1", "s", "pw", SessionKey::generate());
        let sealer = Arc::new(Sealer {
            keys: SealingKeys::derive(&config.key),
            session: SessionName::parse("s").expect("valid"),
            clock_offset_ms: AtomicI64::new(0),
            max_payload_bytes: AtomicU64::new(u64::MAX),
        });
        State::new(config, sealer, watch::channel(SessionInfo::default()).0)
    }

    fn unsubscribed_filters(frames: &[ClientFrame]) -> Vec<String> {
        frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(client_frame::Kind::Unsubscribe(u)) => Some(u.topic.clone()),
                _ => None,
            })
            .collect()
    }

    /// An unsubscribe made while disconnected is sent on reconnecting, and again on
    /// the next if that connection is lost before the broker answers: the broker may
    /// never have read it, and a durable subscription would outlive it there. Once
    /// answered, it is not owed any more.
    #[test]
    fn an_owed_unsubscribe_is_owed_until_answered() {
        let mut state = state();
        let filter = TopicFilter::parse("d").expect("valid");
        state.unsubscribe_later.push(filter);
        let sent = state.unsubscribes_owed();
        assert_eq!(unsubscribed_filters(&sent), ["d"]);
        state.answers_lost();
        let again = state.unsubscribes_owed();
        assert_eq!(unsubscribed_filters(&again), ["d"], "sent again");
        let Some(client_frame::Kind::Unsubscribe(u)) = &again[0].kind else {
            panic!("an unsubscribe");
        };
        state.unsubscribed(u.request_id);
        state.answers_lost();
        assert!(state.unsubscribes_owed().is_empty(), "answered");
    }

    #[test]
    fn a_resent_publish_is_restamped_when_its_time_is_far_either_way() {
        let (now, window) = (1_000_000, 30_000);
        assert!(!needs_restamp(now, now, window));
        assert!(!needs_restamp(now, now - 15_000, window));
        assert!(
            needs_restamp(now, now - 15_001, window),
            "behind: an outage"
        );
        assert!(!needs_restamp(now, now + 15_000, window));
        assert!(
            needs_restamp(now, now + 15_001, window),
            "ahead: the broker's clock corrected ours back"
        );
    }

    #[test]
    fn only_refusals_that_may_pass_are_retried() {
        for code in [
            ErrorCode::RateLimited,
            ErrorCode::Internal,
            ErrorCode::LimitExceeded,
        ] {
            assert!(worth_retrying(code), "{code:?}");
        }
        for code in [
            ErrorCode::Unauthenticated,
            ErrorCode::SessionSuspended,
            ErrorCode::TakenOver,
            ErrorCode::UnsupportedVersion,
        ] {
            assert!(!worth_retrying(code), "{code:?}");
        }
    }
}
