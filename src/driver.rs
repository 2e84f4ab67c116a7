//! The task that owns the core: it feeds it commands from a bounded inbox, runs its
//! store work on a second task, hands its outputs to connections, and wakes it on time.
//!
//! Like rumqttd's router, the driver never awaits a connection: each connection has a
//! bounded outbound queue that the driver only `try_send`s to. The core bounds what it
//! queues per subscriber, so a full queue means a peer that stopped reading; it is
//! disconnected. Ingress pushes back on its own: carriers await the bounded inbox.
//!
//! Store work runs in order on its own task. Commits queued back to back are merged into
//! one transaction (group commit), which is what keeps `PubAck`-after-commit cheap; the
//! driver keeps handling commands meanwhile, so the next batch fills while the last one
//! is being written.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use std::collections::VecDeque;

use crate::carrier::files::FilePort;
use crate::carrier::{ConnTx, Outbound};
use crate::core::{
    BacklogRequest, Command, ConnId, Core, CoreConfig, Event, FastMap, FastSet, FileDone,
    FileOffer, Hello, MessageId, MessageKind, Millis, Output, Reject, SessionName, SessionSettings,
    Stats, StoreBatch, StoreOp, StoredCopy,
};
use crate::spool::{Spool, SpoolError};
use crate::store::{Store, StoreError};
use crate::timer::LoopTimer;

/// Commands handled per wake-up before outputs are flushed (rumqttd takes up to 500).
const MAX_DRAIN: usize = 512;
/// Commits merged into one transaction at most.
const MAX_GROUP_COMMIT: usize = 256;
/// A commit with fewer ops than this lets the runtime run once for more to join it.
const SMALL_COMMIT: usize = 64;
/// Rows of each kind a purge deletes per step (1-3 ms of SQLite's time on the bench
/// host), with other jobs between steps: after a busy period the expired rows are
/// many, and one transaction for all of them held every commit, and so every
/// `PubAck`, behind it (19 ms for the 3,700 rows W1 leaves).
const PURGE_STEP: usize = 200;
/// How long ops of a failed commit wait for the next commit before they are tried
/// on their own.
const UNWRITTEN_RETRY: Duration = Duration::from_secs(1);
/// Ops of failed commits kept for the next ([`Unwritten`]) at most. Past it, updates
/// of single copies go first (lost, a copy is at worst delivered again).
const MAX_UNWRITTEN: usize = 100_000;
/// Bytes of spilled messages' bodies owed at most.
const MAX_UNWRITTEN_BYTES: usize = 16 << 20;

/// The wall clock in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Tuning of the driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub core: CoreConfig,
    /// Capacity of the command inbox.
    pub inbox: usize,
    /// How often expired messages and replay ids are purged from the store.
    pub purge_interval: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            inbox: 4096,
            purge_interval: Duration::from_secs(10),
        }
    }
}

/// The driver is gone (the broker is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the broker is shutting down")]
pub struct DriverGone;

enum Inbound {
    Attach {
        hello: Hello,
        tx: ConnTx,
        /// Answered once the core's answer (`Welcome`, or the refusal) is queued.
        queued: oneshot::Sender<()>,
    },
    Command(Command),
    OpenFile {
        conn: ConnId,
        offer: FileOffer,
        reply: oneshot::Sender<Result<OpenedFile, Reject>>,
    },
    CompleteFile {
        conn: ConnId,
        done: FileDone,
        reply: oneshot::Sender<Result<bool, NotAccepted>>,
    },
    Stats(oneshot::Sender<Stats>),
    Shutdown(oneshot::Sender<()>),
}

enum StoreJob {
    Commit(StoreBatch),
    Load(BacklogRequest),
    Purge,
}

enum StoreDone {
    /// Batches up to this id are durable; with the file copies they dropped.
    Committed(u64, Vec<u64>),
    Failed(u64),
    Loaded(BacklogRequest, Vec<StoredCopy>, bool),
    LoadFailed(BacklogRequest),
}

/// Where an admitted file goes while it arrives.
#[derive(Debug)]
pub struct OpenedFile {
    /// The sender's session.
    pub session: SessionName,
    /// The online receivers, to stream it to as it arrives.
    pub receivers: Vec<(ConnId, FilePort)>,
    /// Someone subscribes to it: it is spooled too.
    pub spool: bool,
    /// Some subscriber is durable: the spool file is synced before the file is accepted.
    pub durable: bool,
}

/// A file upload that ended before its file was accepted. At most one per upload, so
/// their channel is bounded by the uploads under way.
struct Abandoned {
    session: SessionName,
    file_id: MessageId,
    timestamp_ms: Millis,
}

/// A cheap, cloneable handle for carriers and the HTTP API.
#[derive(Clone)]
pub struct DriverHandle {
    inbox: mpsc::Sender<Inbound>,
    abandoned: mpsc::UnboundedSender<Abandoned>,
    next_conn: Arc<AtomicU64>,
    config: Arc<CoreConfig>,
    spool: Arc<Spool>,
}

impl DriverHandle {
    /// A fresh connection handle.
    pub fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// The core's settings (limits, replay window).
    pub fn core_config(&self) -> &CoreConfig {
        &self.config
    }

    /// Registers an authenticated connection, and returns once `Welcome` (or the
    /// core's refusal) is queued on `tx`: whatever the carrier answers after this,
    /// the client reads after its `Welcome`.
    pub async fn attach(&self, hello: Hello, tx: ConnTx) -> Result<(), DriverGone> {
        self.ask(|queued| Inbound::Attach { hello, tx, queued })
            .await
    }

    /// Sends the driver a request made with a reply channel, and waits for the reply.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Inbound,
    ) -> Result<T, DriverGone> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(request(reply))
            .await
            .map_err(|_| DriverGone)?;
        answer.await.map_err(|_| DriverGone)
    }

    /// Hands a command to the core, waiting while the inbox is full.
    pub async fn send(&self, command: Command) -> Result<(), DriverGone> {
        self.inbox
            .send(Inbound::Command(command))
            .await
            .map_err(|_| DriverGone)
    }

    /// A session was created or changed.
    pub async fn session_updated(&self, settings: SessionSettings) -> Result<(), DriverGone> {
        self.send(Command::SessionUpdated(settings)).await
    }

    /// The broker's file spool.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// Admits a file offered by `conn`; the answer names the receivers' file ports.
    pub async fn open_file(
        &self,
        conn: ConnId,
        offer: FileOffer,
    ) -> Result<Result<OpenedFile, Reject>, DriverGone> {
        self.ask(|reply| Inbound::OpenFile { conn, offer, reply })
            .await
    }

    /// A file sent by `conn` is whole (and in the spool if `done.spooled`): the core
    /// records its id and queues its copies. Answers once those are committed, with
    /// whether any copy is durable.
    pub async fn complete_file(
        &self,
        conn: ConnId,
        done: FileDone,
    ) -> Result<Result<bool, NotAccepted>, DriverGone> {
        self.ask(|reply| Inbound::CompleteFile { conn, done, reply })
            .await
    }

    /// An upload ended before its file was accepted: the core frees its id. Called
    /// from `Drop`, so it does not wait. The notice goes on a channel of its own, which
    /// the driver reads before any file offer: a client that sends the file again
    /// after hearing of the failure finds its id free even with the inbox full.
    pub fn abandon_file(&self, session: SessionName, file_id: MessageId, timestamp_ms: Millis) {
        let _ = self.abandoned.send(Abandoned {
            session,
            file_id,
            timestamp_ms,
        });
    }

    /// The core's counters, for `/health`.
    pub async fn stats(&self) -> Result<Stats, DriverGone> {
        self.ask(Inbound::Stats).await
    }

    /// Flushes pending writes, stops the store worker and closes the store.
    pub async fn shutdown(&self) {
        let _ = self.ask(Inbound::Shutdown).await;
    }
}

/// Restores the core from the store and starts the driver and store tasks.
pub async fn start(
    store: Arc<dyn Store>,
    spool: Arc<Spool>,
    config: DriverConfig,
) -> Result<(DriverHandle, JoinHandle<()>), StoreError> {
    let mut core = Core::new(config.core.clone());
    let restore = store.restore(now_ms()).await?;
    let queued: Vec<_> = restore
        .files
        .iter()
        .map(|f| (f.session.clone(), f.file_id))
        .collect();
    let left_over = spool.keep_only(&queued);
    if left_over > 0 {
        tracing::info!(
            removed = left_over,
            "removed spool files no queued copy needs any more"
        );
    }
    core.restore(restore);

    let (inbox_tx, inbox_rx) = mpsc::channel(config.inbox);
    // Jobs are bounded; completions are not, but there is at most one per job, so they
    // are bounded by the job queue (and an unbounded send never blocks the worker, which
    // could otherwise deadlock against a driver waiting to queue a job).
    let (jobs_tx, jobs_rx) = mpsc::channel(1024);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (abandoned_tx, abandoned_rx) = mpsc::unbounded_channel();
    let worker = tokio::spawn(store_worker(store.clone(), jobs_rx, done_tx));

    let driver = Driver {
        core,
        inbox: inbox_rx,
        abandoned: abandoned_rx,
        myself: inbox_tx.downgrade(),
        conns: FastMap::default(),
        jobs: jobs_tx,
        done: done_rx,
        overflowed: Vec::new(),
        spool: spool.clone(),
        files_committing: VecDeque::new(),
    };
    let handle = DriverHandle {
        inbox: inbox_tx,
        abandoned: abandoned_tx,
        next_conn: Arc::new(AtomicU64::new(1)),
        config: Arc::new(config.core),
        spool,
    };
    let task = tokio::spawn(driver.run(config.purge_interval, worker, store));
    Ok((handle, task))
}

struct Driver {
    core: Core,
    inbox: mpsc::Receiver<Inbound>,
    abandoned: mpsc::UnboundedReceiver<Abandoned>,
    /// The inbox's sending side, for the driver's own tasks (spool streams).
    myself: mpsc::WeakSender<Inbound>,
    conns: FastMap<ConnId, ConnTx>,
    jobs: mpsc::Sender<StoreJob>,
    done: mpsc::UnboundedReceiver<StoreDone>,
    /// Connections whose outbound queue was full during the last flush.
    overflowed: Vec<ConnId>,
    spool: Arc<Spool>,
    /// Completed files waiting for the batch holding their ids (and any durable
    /// copies), in order.
    files_committing: VecDeque<FileCommitting>,
}

/// A file that is whole, waiting for the batch holding its id to be committed.
struct FileCommitting {
    batch: u64,
    /// Whether durable copies were written (the spool file must be synced).
    durable: bool,
    reply: oneshot::Sender<Result<bool, NotAccepted>>,
}

/// Why a whole file was not accepted.
#[derive(Debug, Clone)]
pub enum NotAccepted {
    /// The core refused it (its sender is gone, say): nothing was queued.
    Refused(Reject),
    /// Its batch could not be committed. Its copies were queued in memory and go out
    /// from the spool; its id stays taken, as for any file whose copies are queued.
    NotCommitted(Reject),
}

impl Driver {
    async fn run(
        mut self,
        purge_interval: Duration,
        worker: JoinHandle<()>,
        store: Arc<dyn Store>,
    ) {
        let mut purge = tokio::time::interval(purge_interval);
        purge.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        // The core's next timer moves only when one fires (retries are scheduled
        // lazily), so the sleep is kept across turns and re-armed on a change.
        let mut timer = LoopTimer::new();
        loop {
            timer.set(self.core.poll_timeout(), |at| {
                Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
            });
            tokio::select! {
                biased;
                Some(done) = self.done.recv() => self.on_store(done),
                inbound = self.inbox.recv() => match inbound {
                    Some(Inbound::Shutdown(tx)) => {
                        shutdown = Some(tx);
                        break;
                    }
                    Some(inbound) => self.on_inbound(inbound),
                    None => break,
                },
                _ = timer.fired(), if timer.is_armed() => {
                    self.core.handle_timeout(now_ms());
                }
                _ = purge.tick() => {
                    self.take_abandoned();
                    if self.jobs.send(StoreJob::Purge).await.is_err() {
                        break;
                    }
                    self.sweep_spool();
                }
            }
            for _ in 0..MAX_DRAIN {
                match self.inbox.try_recv() {
                    Ok(Inbound::Shutdown(tx)) => {
                        shutdown = Some(tx);
                        break;
                    }
                    Ok(inbound) => self.on_inbound(inbound),
                    Err(_) => break,
                }
            }
            while let Ok(done) = self.done.try_recv() {
                self.on_store(done);
            }
            if !self.flush().await {
                break;
            }
            if shutdown.is_some() {
                break;
            }
        }

        // Shutting down: whatever was accepted is committed before the store closes.
        self.flush().await;
        drop(self.jobs);
        let _ = worker.await;
        store.close().await;
        tracing::info!("store flushed and closed");
        if let Some(tx) = shutdown {
            let _ = tx.send(());
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let now = now_ms();
        match inbound {
            Inbound::Attach { hello, tx, queued } => {
                self.conns.insert(hello.conn, tx);
                self.core.handle(now, Command::Hello(hello));
                // Routed now rather than at the end of the turn, so the carrier,
                // waiting on `queued`, answers nothing before the `Welcome`.
                while let Some(output) = self.core.poll_output() {
                    self.route(output);
                }
                let _ = queued.send(());
            }
            Inbound::Command(command) => {
                if let Command::Disconnected { conn } = &command {
                    self.conns.remove(conn);
                }
                self.core.handle(now, command);
            }
            Inbound::OpenFile { conn, offer, reply } => {
                // An upload given up before this offer was made frees its id first.
                self.take_abandoned();
                let opened = self.core.open_file(now, conn, &offer).map(|route| {
                    let receivers = route
                        .live
                        .iter()
                        .filter_map(|c| self.conns.get(c).map(|tx| (*c, tx.files.clone())))
                        .collect();
                    OpenedFile {
                        session: route.session,
                        receivers,
                        spool: route.spool,
                        durable: route.durable,
                    }
                });
                if let Err(Ok(opened)) = reply.send(opened) {
                    // The upload went away while it was admitted: nothing will end it.
                    self.core
                        .abandon_file(&opened.session, &offer.file_id, offer.timestamp_ms);
                }
            }
            Inbound::CompleteFile { conn, done, reply } => {
                match self.core.complete_file(now, conn, done) {
                    // Accepted once its id (and any durable copies) are committed.
                    Ok(durable) => self.files_committing.push_back(FileCommitting {
                        batch: self.core.current_batch(),
                        durable,
                        reply,
                    }),
                    Err(reject) => {
                        let _ = reply.send(Err(NotAccepted::Refused(reject)));
                    }
                }
            }
            Inbound::Stats(tx) => {
                let _ = tx.send(self.core.stats());
            }
            Inbound::Shutdown(_) => {}
        }
    }

    /// Frees the ids of the uploads given up so far. Read before each file offer
    /// (which is when a free id matters) and with the purge, not on every turn of the
    /// hot loop.
    fn take_abandoned(&mut self) {
        while let Ok(upload) = self.abandoned.try_recv() {
            self.core
                .abandon_file(&upload.session, &upload.file_id, upload.timestamp_ms);
        }
    }

    fn on_store(&mut self, done: StoreDone) {
        match done {
            StoreDone::Committed(id, dropped_files) => {
                self.core.handle_committed(id, &dropped_files);
                self.files_committed(id, Ok(()));
            }
            StoreDone::Failed(id) => {
                self.core.handle_commit_failed(now_ms(), id);
                let reject = Reject::Internal("the store could not commit; retry");
                self.files_committed(id, Err(NotAccepted::NotCommitted(reject)));
            }
            StoreDone::Loaded(request, rows, exhausted) => {
                self.core
                    .handle_backlog(now_ms(), &request, rows, exhausted)
            }
            StoreDone::LoadFailed(request) => {
                // Try again shortly; the subscriber waits for it meanwhile.
                let jobs = self.jobs.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = jobs.send(StoreJob::Load(request)).await;
                });
            }
        }
    }

    /// Sends the core's outputs and store work on their way. False if the store worker
    /// is gone.
    async fn flush(&mut self) -> bool {
        loop {
            while let Some(output) = self.core.poll_output() {
                self.route(output);
            }
            // A connection that stopped reading is cut off; that may free work for
            // others (and produce more outputs).
            let overflowed = std::mem::take(&mut self.overflowed);
            if overflowed.is_empty() {
                break;
            }
            for conn in overflowed {
                // Every output that did not fit names the connection again: cut it
                // off once.
                let Some(tx) = self.conns.remove(&conn) else {
                    continue;
                };
                tracing::warn!(
                    conn = conn.0,
                    "outbound queue full; disconnecting slow connection"
                );
                tx.kick.notify_one();
                self.core.handle(now_ms(), Command::Disconnected { conn });
            }
        }
        if let Some(batch) = self.core.take_batch()
            && self.jobs.send(StoreJob::Commit(batch)).await.is_err()
        {
            return false;
        }
        for load in self.core.take_loads() {
            if self.jobs.send(StoreJob::Load(load)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Answers the completed files whose batch (up to `batch_id`) is done.
    fn files_committed(&mut self, batch_id: u64, result: Result<(), NotAccepted>) {
        while self
            .files_committing
            .front()
            .is_some_and(|f| f.batch <= batch_id)
        {
            if let Some(file) = self.files_committing.pop_front() {
                let _ = file.reply.send(result.clone().map(|()| file.durable));
            }
        }
    }

    /// Removes spool files past their session's expiry, off the driver's task.
    fn sweep_spool(&self) {
        let spool = self.spool.clone();
        let expiries = self.core.session_expiries();
        let longest = *crate::core::MESSAGE_EXPIRY_RANGE.end();
        tokio::task::spawn_blocking(move || {
            let removed = spool.sweep(SystemTime::now(), &expiries, longest);
            if removed > 0 {
                tracing::info!(removed, "removed expired files from the spool");
            }
        });
    }

    /// Streams a spooled file to a connection (a copy of a file being sent), on a
    /// task of its own: the file port is awaited, the driver never is. A file gone
    /// from the spool cannot be delivered any more, so its copy is dropped.
    fn stream_spooled(&self, conn: ConnId, message: Arc<crate::core::Message>, port: FilePort) {
        let spool = self.spool.clone();
        let myself = self.myself.clone();
        tokio::spawn(async move {
            let file_id = message.id;
            let report = match spool.stream(conn, &message, &port).await {
                Ok(true) => Command::FileStreamed { conn, file_id },
                Ok(false) => return, // already streaming; that stream reports
                Err(SpoolError::Missing) => {
                    tracing::error!(file = %file_id, "a queued file is gone from the spool; its copy is lost");
                    Command::Ack {
                        conn,
                        message_id: file_id,
                    }
                }
                Err(e) => {
                    tracing::error!(file = %file_id, error = %e, "cannot stream a spooled file");
                    Command::FileStreamed { conn, file_id }
                }
            };
            if let Some(inbox) = myself.upgrade() {
                let _ = inbox.send(Inbound::Command(report)).await;
            }
        });
    }

    fn route(&mut self, output: Output) {
        let (conn, item, close) = match output {
            Output::Send {
                conn,
                event: Event::Deliver { message, .. },
            } if message.kind == MessageKind::File => {
                if let Some(tx) = self.conns.get(&conn) {
                    self.stream_spooled(conn, message, tx.files.clone());
                }
                return;
            }
            Output::Send {
                conn,
                event: Event::Error(e),
            } => {
                // Requests only: a publish's refusal is its publisher's to report.
                if e.message_id.is_none() {
                    let (request_id, reject) = (e.request_id, &e.reject);
                    tracing::debug!(conn = conn.0, request_id, %reject, "request refused");
                }
                (conn, Outbound::Event(Event::Error(e)), false)
            }
            Output::Send { conn, event } => (conn, Outbound::Event(event), false),
            Output::Close { conn, reject } => (conn, Outbound::Close(Box::new(reject)), true),
            Output::DropSpool { session, file_id } => {
                let spool = self.spool.clone();
                // Unlinking a large file frees its pages: not on the driver's task.
                tokio::task::spawn_blocking(move || spool.remove(&session, &file_id));
                return;
            }
        };
        let Some(tx) = self.conns.get(&conn) else {
            return;
        };
        match tx.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) if close => tx.kick.notify_one(),
            Err(mpsc::error::TrySendError::Full(_)) => self.overflowed.push(conn),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The carrier reports the disconnect itself.
            }
        }
        if close {
            self.conns.remove(&conn);
        }
    }
}

/// Ops of failed commits that must still be written: the core holds them as done
/// ([`StoreOp::holds_after_a_failed_commit`]: an acknowledged copy, an unsubscribed
/// filter, a cleaned client, a copy spilled for a slow connection), and a store that
/// never got them would bring back at a restart what the core has dropped, or lose
/// the spilled copy. They go first in the next commit, which keeps them in order
/// with everything the core did since; on their own after [`UNWRITTEN_RETRY`] if no
/// commit comes, and before any backlog page is read.
#[derive(Debug, Default)]
struct Unwritten {
    ops: Vec<StoreOp>,
    /// The last failed batch: reported committed once they are, for the files their
    /// ops dropped (its waiters were answered when it failed).
    batch: u64,
}

impl Unwritten {
    fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Takes what is still owed from a failed commit (which began with whatever was
    /// owed before).
    fn failed(&mut self, batches: Vec<StoreBatch>) {
        self.batch = batches.last().map_or(self.batch, |b| b.id);
        let ops: Vec<StoreOp> = batches.into_iter().flat_map(|b| b.ops).collect();
        // Copies spilled for slow connections are owed with their messages' bodies.
        let spilled: FastSet<u64> = ops
            .iter()
            .filter_map(|op| match op {
                StoreOp::PutCopy {
                    seq,
                    ephemeral: true,
                    ..
                } => Some(*seq),
                _ => None,
            })
            .collect();
        self.ops = ops
            .into_iter()
            .filter(|op| match op {
                StoreOp::PutMessage(message) => spilled.contains(&message.seq),
                op => op.holds_after_a_failed_commit(),
            })
            .collect();
        self.trim();
        if !self.ops.is_empty() {
            tracing::warn!(
                ops = self.ops.len(),
                "a commit failed: what the broker already let go of goes with the next"
            );
        }
    }

    /// Keeps what is owed within [`MAX_UNWRITTEN`] ops and [`MAX_UNWRITTEN_BYTES`] of
    /// spilled messages, giving up the oldest of what costs least to lose: attempt
    /// counts, then acknowledgements (their copies may be delivered again), and
    /// spilled copies with their bodies (what a failed commit lost before these were
    /// owed at all).
    fn trim(&mut self) {
        // A message spilled for several connections is owed (and counted) once.
        let mut counted = FastSet::default();
        let mut bytes: usize = 0;
        for op in &self.ops {
            if let StoreOp::PutMessage(m) = op
                && counted.insert(m.seq)
            {
                bytes += m.payload.len();
            }
        }
        if bytes > MAX_UNWRITTEN_BYTES {
            let mut given_up = FastSet::default();
            for op in &self.ops {
                if bytes <= MAX_UNWRITTEN_BYTES {
                    break;
                }
                if let StoreOp::PutMessage(m) = op
                    && given_up.insert(m.seq)
                {
                    bytes -= m.payload.len();
                }
            }
            self.ops.retain(|op| match op {
                StoreOp::PutMessage(m) => !given_up.contains(&m.seq),
                StoreOp::PutCopy { seq, .. } => !given_up.contains(seq),
                _ => true,
            });
            tracing::error!(
                messages = given_up.len(),
                "the store keeps failing: copies spilled for slow connections are lost"
            );
        }
        for cheapest in [
            |op: &StoreOp| matches!(op, StoreOp::SetAttempts { .. }),
            |op: &StoreOp| matches!(op, StoreOp::DeleteCopy { .. }),
        ] {
            let excess = self.ops.len().saturating_sub(MAX_UNWRITTEN);
            if excess == 0 {
                return;
            }
            let mut dropped = 0;
            self.ops.retain(|op| {
                let drop = dropped < excess && cheapest(op);
                dropped += usize::from(drop);
                !drop
            });
            if dropped == 0 {
                continue;
            }
            tracing::error!(
                dropped,
                "the store keeps failing: updates of copies it could not take are given up; \
                 those copies may be delivered again"
            );
        }
    }

    /// What is owed, as a batch to commit before the others.
    fn take(&mut self) -> Option<StoreBatch> {
        (!self.ops.is_empty()).then(|| StoreBatch {
            id: self.batch,
            ops: std::mem::take(&mut self.ops),
        })
    }
}

async fn store_worker(
    store: Arc<dyn Store>,
    mut jobs: mpsc::Receiver<StoreJob>,
    done: mpsc::UnboundedSender<StoreDone>,
) {
    let mut next: Option<StoreJob> = None;
    let mut unwritten = Unwritten::default();
    // A purge has steps left. Between two of them one waiting job goes first (a
    // commit takes every commit waiting), so neither waits long for the other.
    let mut purging = false;
    let mut step_next = false;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None if purging && step_next => StoreJob::Purge,
            None if purging => match jobs.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Empty) => StoreJob::Purge,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            },
            None if !unwritten.is_empty() => {
                match tokio::time::timeout(UNWRITTEN_RETRY, jobs.recv()).await {
                    Ok(Some(job)) => job,
                    Ok(None) => break,
                    // Nothing else to commit: what is owed goes alone.
                    Err(_) => {
                        write_owed(&*store, &mut unwritten, &done).await;
                        continue;
                    }
                }
            }
            None => match jobs.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        step_next = purging && !matches!(job, StoreJob::Purge);
        let report = match job {
            StoreJob::Commit(first) => {
                let mut batches: Vec<StoreBatch> = unwritten.take().into_iter().collect();
                batches.push(first);
                let mut ops = batches.iter().map(|b| b.ops.len()).sum::<usize>();
                let mut yielded = false;
                while batches.len() < MAX_GROUP_COMMIT {
                    let job = match jobs.try_recv() {
                        Ok(job) => job,
                        // A small commit lets the runtime run once before it is
                        // written, so that the rest of a burst being routed joins it.
                        // It never waits on a timer: a publisher awaiting each PubAck
                        // would wait that long for every message.
                        Err(mpsc::error::TryRecvError::Empty) if ops < SMALL_COMMIT && !yielded => {
                            yielded = true;
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Err(_) => break,
                    };
                    match job {
                        StoreJob::Commit(batch) => {
                            ops += batch.ops.len();
                            batches.push(batch);
                        }
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let last = batches.last().map_or(0, |b| b.id);
                match store.commit(&batches).await {
                    Ok(committed) => StoreDone::Committed(last, committed.dropped_files),
                    Err(e) => {
                        tracing::error!(error = %e, batches = batches.len(), "commit failed");
                        unwritten.failed(batches);
                        StoreDone::Failed(last)
                    }
                }
            }
            StoreJob::Load(request) => {
                // A page must not hold what they delete: it waits for them (the
                // driver asks again shortly).
                write_owed(&*store, &mut unwritten, &done).await;
                if !unwritten.is_empty() {
                    StoreDone::LoadFailed(request)
                } else {
                    match store.backlog(&request, now_ms()).await {
                        Ok((rows, exhausted)) => StoreDone::Loaded(request, rows, exhausted),
                        Err(e) => {
                            tracing::error!(error = %e, "backlog load failed");
                            StoreDone::LoadFailed(request)
                        }
                    }
                }
            }
            StoreJob::Purge => {
                let started = Instant::now();
                purging = match store.purge(now_ms(), PURGE_STEP).await {
                    Ok(purged) => {
                        if purged.rows > 0 {
                            tracing::debug!(
                                rows = purged.rows,
                                more = purged.more,
                                took_us = started.elapsed().as_micros() as u64,
                                "purged expired rows"
                            );
                        }
                        purged.more
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "purge failed");
                        false
                    }
                };
                continue;
            }
        };
        if done.send(report).is_err() {
            break;
        }
    }
    // Shutting down: one last try.
    write_owed(&*store, &mut unwritten, &done).await;
    if !unwritten.is_empty() {
        tracing::error!(
            ops = unwritten.ops.len(),
            "shutting down with deletions the store could not take: what they removed may \
             come back at the next start"
        );
    }
}

/// Writes on their own the ops failed commits still owe ([`Unwritten`]).
async fn write_owed(
    store: &dyn Store,
    unwritten: &mut Unwritten,
    done: &mpsc::UnboundedSender<StoreDone>,
) {
    let Some(owed) = unwritten.take() else {
        return;
    };
    let id = owed.id;
    let batches = vec![owed];
    match store.commit(&batches).await {
        // Their batch was answered when it failed: what is left to report is the file
        // copies they dropped.
        Ok(committed) if !committed.dropped_files.is_empty() => {
            let _ = done.send(StoreDone::Committed(id, committed.dropped_files));
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "writing what failed commits left failed too");
            unwritten.failed(batches);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{
        ClientId, Message, MessageId, MessageKind, Restore, SessionName, StoreOp, TopicFilter,
        TopicName,
    };
    use crate::proto::PayloadFormat;
    use crate::store::memory::MemoryStore;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{BacklogPage, Committed, Purged, PushToken, SessionRecord};
    use std::sync::atomic::AtomicBool;

    /// A real store whose commits fail while `failing` is set, as they would on a full
    /// disk.
    struct Failing<S> {
        inner: S,
        failing: AtomicBool,
    }

    impl<S> Failing<S> {
        fn new(inner: S) -> Arc<Self> {
            Arc::new(Self {
                inner,
                failing: AtomicBool::new(false),
            })
        }

        fn fail(&self, failing: bool) {
            self.failing.store(failing, Ordering::SeqCst);
        }
    }

    #[async_trait::async_trait]
    impl<S: Store> Store for Failing<S> {
        fn kind(&self) -> &'static str {
            self.inner.kind()
        }
        async fn create_session(&self, record: &SessionRecord) -> Result<(), StoreError> {
            self.inner.create_session(record).await
        }
        async fn session(&self, name: &SessionName) -> Result<Option<SessionRecord>, StoreError> {
            self.inner.session(name).await
        }
        async fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
            self.inner.sessions().await
        }
        async fn count_sessions(&self) -> Result<u64, StoreError> {
            self.inner.count_sessions().await
        }
        async fn restore(&self, now: Millis) -> Result<Restore, StoreError> {
            self.inner.restore(now).await
        }
        async fn commit(&self, batches: &[StoreBatch]) -> Result<Committed, StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::other("disk full")));
            }
            self.inner.commit(batches).await
        }
        async fn backlog(
            &self,
            request: &BacklogRequest,
            now: Millis,
        ) -> Result<BacklogPage, StoreError> {
            self.inner.backlog(request, now).await
        }
        async fn purge(&self, now: Millis, limit: usize) -> Result<Purged, StoreError> {
            self.inner.purge(now, limit).await
        }
        async fn put_push_token(&self, token: &PushToken, limit: usize) -> Result<(), StoreError> {
            self.inner.put_push_token(token, limit).await
        }
        async fn push_tokens(&self, session: &SessionName) -> Result<Vec<PushToken>, StoreError> {
            self.inner.push_tokens(session).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    /// An expiry far off (SQLite keeps it as a signed integer).
    const FAR: Millis = 1 << 50;

    fn session() -> SessionName {
        SessionName::parse("s").expect("valid")
    }

    fn kim() -> ClientId {
        ClientId::parse("kim").expect("valid")
    }

    fn kims_subscription(put: bool) -> StoreOp {
        let (session, client_id) = (session(), kim());
        let filter = TopicFilter::parse("t").expect("valid");
        if put {
            StoreOp::PutSubscription {
                session,
                client_id,
                filter,
                legacy_only: false,
            }
        } else {
            StoreOp::DeleteSubscription {
                session,
                client_id,
                filter,
            }
        }
    }

    fn ack(seq: u64) -> StoreOp {
        StoreOp::DeleteCopy {
            session: session(),
            client_id: kim(),
            seq,
        }
    }

    fn kims_backlog() -> BacklogRequest {
        BacklogRequest {
            session: session(),
            client_id: kim(),
            after_seq: 0,
            limit: 100,
            token: 0,
        }
    }

    async fn queued_for_kim(store: &dyn Store) -> Vec<u64> {
        let (rows, _) = store.backlog(&kims_backlog(), 0).await.expect("backlog");
        rows.iter().map(|r| r.message.seq).collect()
    }

    async fn kims_filters(store: &dyn Store) -> usize {
        let restored = store.restore(0).await.expect("restore");
        restored.subscriptions.len()
    }

    /// Kim subscribed to `t`, durably, with message 1 queued; then a worker on `store`.
    async fn kim_with_a_queue<S: Store>(
        store: &Arc<Failing<S>>,
    ) -> (
        mpsc::Sender<StoreJob>,
        mpsc::UnboundedReceiver<StoreDone>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut ops = vec![kims_subscription(true)];
        ops.extend(stored(1, FAR));
        store
            .commit(&[StoreBatch { id: 1, ops }])
            .await
            .expect("commit");
        let (jobs, jobs_rx) = mpsc::channel(8);
        let (done_tx, done) = mpsc::unbounded_channel();
        let worker = tokio::spawn(store_worker(store.clone(), jobs_rx, done_tx));
        (jobs, done, worker)
    }

    /// The core holds an unsubscribe and an acknowledgement as done even if their
    /// commit fails: the next commit writes them first, so a restart does not bring
    /// back the subscription or deliver the copy again.
    #[tokio::test]
    async fn a_failed_commits_deletions_go_with_the_next() {
        let store = Failing::new(SqliteStore::open_in_memory().await.expect("open"));
        let (jobs, mut done, worker) = kim_with_a_queue(&store).await;
        store.fail(true);
        let ops = vec![kims_subscription(false), ack(1)];
        jobs.send(StoreJob::Commit(StoreBatch { id: 2, ops }))
            .await
            .expect("queued");
        assert!(matches!(done.recv().await, Some(StoreDone::Failed(2))));
        store.fail(false);
        let ops = stored(2, FAR);
        jobs.send(StoreJob::Commit(StoreBatch { id: 3, ops }))
            .await
            .expect("queued");
        assert!(matches!(
            done.recv().await,
            Some(StoreDone::Committed(3, _))
        ));
        assert_eq!(kims_filters(&*store).await, 0, "the unsubscribe is written");
        assert_eq!(queued_for_kim(&*store).await, [2], "the ack is written");
        drop(jobs);
        worker.await.expect("worker ends with its queue");
    }

    /// With no commit to go with, they are written on their own a moment later, and
    /// the file copies they dropped are reported (the core counts them off to let the
    /// spool file go).
    #[tokio::test(start_paused = true)]
    async fn a_failed_commits_deletions_are_written_alone_when_nothing_follows() {
        let store = Failing::new(MemoryStore::default());
        let (jobs, mut done, worker) = kim_with_a_queue(&store).await;
        let mut file = stored(2, FAR);
        if let StoreOp::PutMessage(message) = &mut file[0] {
            Arc::make_mut(message).kind = MessageKind::File;
        }
        store
            .commit(&[StoreBatch { id: 2, ops: file }])
            .await
            .expect("commit");
        store.fail(true);
        let ops = vec![StoreOp::DeleteClient {
            session: session(),
            client_id: kim(),
        }];
        jobs.send(StoreJob::Commit(StoreBatch { id: 3, ops }))
            .await
            .expect("queued");
        assert!(matches!(done.recv().await, Some(StoreDone::Failed(3))));
        store.fail(false);
        let written = tokio::time::timeout(Duration::from_secs(10), done.recv());
        match written.await {
            Ok(Some(StoreDone::Committed(3, dropped))) => assert_eq!(dropped, [2]),
            _ => panic!("expected the deletions' report"),
        }
        assert_eq!(kims_filters(&*store).await, 0);
        assert!(queued_for_kim(&*store).await.is_empty());
        drop(jobs);
        worker.await.expect("worker ends with its queue");
    }

    /// Only what the core holds as done is owed: deletions, and a spilled copy with
    /// its message's body, not a durable copy of a refused publish. Past the cap the
    /// oldest acks go, no more than needed: an unsubscribe is kept however long the
    /// store fails.
    #[test]
    fn a_failing_store_is_owed_what_the_core_let_go_and_a_bounded_number() {
        let mut unwritten = Unwritten::default();
        let mut ops = stored(1, FAR);
        ops.push(kims_subscription(false));
        ops.push(ack(1));
        let mut spilled = stored(3, FAR);
        if let StoreOp::PutCopy { ephemeral, .. } = &mut spilled[1] {
            *ephemeral = true;
        }
        ops.extend(spilled);
        unwritten.failed(vec![StoreBatch { id: 7, ops }]);
        assert!(
            matches!(
                &unwritten.ops[..],
                [
                    StoreOp::DeleteSubscription { .. },
                    StoreOp::DeleteCopy { seq: 1, .. },
                    StoreOp::PutMessage(m),
                    StoreOp::PutCopy { seq: 3, ephemeral: true, .. },
                ] if m.seq == 3
            ),
            "{:?}",
            unwritten.ops
        );
        // Four owed, and MAX_UNWRITTEN - 2 more: two over.
        let mut acks: Vec<StoreOp> = (2..=MAX_UNWRITTEN as u64 - 2).map(ack).collect();
        acks.push(kims_subscription(false));
        let owed = unwritten.take().into_iter();
        unwritten.failed(owed.chain([StoreBatch { id: 8, ops: acks }]).collect());
        assert_eq!(unwritten.batch, 8);
        assert_eq!(unwritten.ops.len(), MAX_UNWRITTEN);
        let unsubscribes = unwritten
            .ops
            .iter()
            .filter(|op| matches!(op, StoreOp::DeleteSubscription { .. }))
            .count();
        assert_eq!(unsubscribes, 2);
        let first_ack = unwritten.ops.iter().find_map(|op| match op {
            StoreOp::DeleteCopy { seq, .. } => Some(*seq),
            _ => None,
        });
        assert_eq!(first_ack, Some(3), "the two oldest acks went");
    }

    /// Spilled bodies owed are bounded in bytes: the oldest spilled copies go, with
    /// their bodies.
    #[test]
    fn spilled_bodies_owed_are_bounded() {
        let spilled = |seq: u64| {
            let mut ops = stored(seq, FAR);
            if let StoreOp::PutMessage(m) = &mut ops[0] {
                Arc::make_mut(m).payload = bytes::Bytes::from(vec![0; 10 << 20]);
            }
            if let StoreOp::PutCopy { ephemeral, .. } = &mut ops[1] {
                *ephemeral = true;
            }
            ops
        };
        let mut unwritten = Unwritten::default();
        // Message 1 spilled for two connections is 10 MiB, not 20.
        let mut ops = spilled(1);
        ops.extend(spilled(1));
        unwritten.failed(vec![StoreBatch { id: 2, ops }]);
        assert_eq!(unwritten.ops.len(), 4, "nothing given up");
        let mut ops = spilled(1);
        ops.extend(spilled(2));
        ops.push(ack(1));
        unwritten.failed(vec![StoreBatch { id: 3, ops }]);
        assert!(
            matches!(
                &unwritten.ops[..],
                [
                    StoreOp::PutMessage(m),
                    StoreOp::PutCopy { seq: 2, .. },
                    StoreOp::DeleteCopy { seq: 1, .. },
                ] if m.seq == 2
            ),
            "{:?}",
            unwritten.ops.len()
        );
    }

    /// Kim's queue (see [`kim_with_a_queue`]) on SQLite, with the ack of message 1 in
    /// a commit that failed: owed, and the store still failing.
    async fn kims_ack_owed() -> (
        Arc<Failing<SqliteStore>>,
        mpsc::Sender<StoreJob>,
        mpsc::UnboundedReceiver<StoreDone>,
        tokio::task::JoinHandle<()>,
    ) {
        let store = Failing::new(SqliteStore::open_in_memory().await.expect("open"));
        let (jobs, mut done, worker) = kim_with_a_queue(&store).await;
        store.fail(true);
        jobs.send(StoreJob::Commit(StoreBatch {
            id: 2,
            ops: vec![ack(1)],
        }))
        .await
        .expect("queued");
        assert!(matches!(done.recv().await, Some(StoreDone::Failed(2))));
        (store, jobs, done, worker)
    }

    /// A backlog page is not read while the store cannot take what a failed commit
    /// owes: it is refused for now (the driver asks again).
    #[tokio::test]
    async fn a_backlog_read_is_refused_while_a_failed_commit_is_owed() {
        let (_store, jobs, mut done, worker) = kims_ack_owed().await;
        jobs.send(StoreJob::Load(kims_backlog()))
            .await
            .expect("queued");
        assert!(matches!(done.recv().await, Some(StoreDone::LoadFailed(_))));
        drop(jobs);
        worker.await.expect("worker ends with its queue");
    }

    /// A backlog page read while a failed commit's ack is owed does not hold the
    /// acknowledged copy.
    #[tokio::test]
    async fn a_backlog_read_waits_for_what_a_failed_commit_owes() {
        let (store, jobs, mut done, worker) = kims_ack_owed().await;
        store.fail(false);
        jobs.send(StoreJob::Load(kims_backlog()))
            .await
            .expect("queued");
        match done.recv().await {
            Some(StoreDone::Loaded(_, rows, _)) => assert!(rows.is_empty(), "copy 1 was acked"),
            _ => panic!("expected the page"),
        }
        drop(jobs);
        worker.await.expect("worker ends with its queue");
    }

    /// A durable message for `client`, and its copy; `expires_at` 1 is long past.
    fn stored(seq: u64, expires_at: Millis) -> Vec<StoreOp> {
        let session = SessionName::parse("s").expect("valid");
        let message = Message {
            session: session.clone(),
            id: MessageId([(seq % 251) as u8; 16]),
            seq,
            topic: TopicName::parse("t").expect("valid"),
            payload: bytes::Bytes::from_static(b"x"),
            timestamp_ms: 0,
            format: PayloadFormat::NativeV1,
            kind: MessageKind::Message,
            accepted_at: 0,
            expires_at,
        };
        vec![
            StoreOp::PutMessage(Arc::new(message)),
            StoreOp::PutCopy {
                session,
                client_id: ClientId::parse("kim").expect("valid"),
                seq,
                ephemeral: false,
                replayed: false,
            },
        ]
    }

    /// Copies of expired messages still in the tables (read as of time 0, when
    /// none had expired).
    async fn expired_left(store: &dyn Store) -> usize {
        let request = BacklogRequest {
            session: SessionName::parse("s").expect("valid"),
            client_id: ClientId::parse("kim").expect("valid"),
            after_seq: 0,
            limit: 100_000,
            token: 0,
        };
        let (rows, _) = store.backlog(&request, 0).await.expect("backlog");
        rows.iter().filter(|r| r.message.expires_at == 1).count()
    }

    /// A lone small commit is written as soon as the runtime has run once, without
    /// waiting on a timer for company: a publisher awaiting each `PubAck` would wait
    /// that long for every message (with a 1 ms linger, 2.4 ms per acknowledged
    /// publish on an idle broker). Tokio's paused clock moves only if a timer is
    /// awaited, so a clock that stayed put proves none was.
    #[tokio::test(start_paused = true)]
    async fn a_lone_commit_waits_on_no_timer() {
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::default());
        let (jobs, jobs_rx) = mpsc::channel(8);
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let worker = tokio::spawn(store_worker(store, jobs_rx, done_tx));
        let started = Instant::now();
        let ops = stored(1, FAR);
        jobs.send(StoreJob::Commit(StoreBatch { id: 1, ops }))
            .await
            .expect("queued");
        assert!(matches!(
            done.recv().await,
            Some(StoreDone::Committed(1, _))
        ));
        assert_eq!(Instant::now(), started, "the commit waited on a timer");
        drop(jobs);
        worker.await.expect("worker ends with its queue");
    }

    /// Commits waiting together are written as one, reported once for the last.
    #[tokio::test]
    async fn waiting_commits_are_written_together() {
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::default());
        let (jobs, jobs_rx) = mpsc::channel(8);
        let (done_tx, mut done) = mpsc::unbounded_channel();
        for id in 1..=3 {
            let ops = stored(id, Millis::MAX);
            jobs.send(StoreJob::Commit(StoreBatch { id, ops }))
                .await
                .expect("queued");
        }
        let worker = tokio::spawn(store_worker(store, jobs_rx, done_tx));
        drop(jobs);
        worker.await.expect("worker ends with its queue");
        let mut reports = Vec::new();
        while let Ok(report) = done.try_recv() {
            reports.push(report);
        }
        assert!(
            matches!(reports[..], [StoreDone::Committed(3, _)]),
            "one commit for all three"
        );
    }

    /// A commit that arrives while a long purge runs is written between two of its
    /// steps, not after the last.
    #[tokio::test]
    async fn a_commit_does_not_wait_for_a_whole_purge() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().await.expect("open"));
        let expired = PURGE_STEP * 6;
        let ops = (1..=expired as u64)
            .flat_map(|seq| stored(seq, 1))
            .collect();
        store
            .commit(&[StoreBatch { id: 1, ops }])
            .await
            .expect("commit");
        let (jobs, jobs_rx) = mpsc::channel(8);
        let (done_tx, mut done) = mpsc::unbounded_channel();
        // Both are queued before the worker first runs.
        jobs.send(StoreJob::Purge).await.expect("queued");
        let later = stored(expired as u64 + 1, Millis::MAX);
        jobs.send(StoreJob::Commit(StoreBatch { id: 2, ops: later }))
            .await
            .expect("queued");
        let worker = tokio::spawn(store_worker(store.clone(), jobs_rx, done_tx));
        match done.recv().await {
            Some(StoreDone::Committed(2, _)) => {}
            _ => panic!("expected the commit's report"),
        }
        let left = expired_left(&*store).await;
        assert!(
            left > 0 && left < expired,
            "the commit went between the purge's steps ({left} of {expired} left)"
        );
        // The purge goes on by itself and finishes.
        let finished = tokio::time::timeout(Duration::from_secs(30), async {
            while expired_left(&*store).await > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        finished.await.expect("the purge finishes");
        drop(jobs);
        worker.await.expect("worker ends with its queue");
    }
}
