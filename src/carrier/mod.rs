//! Carriers: thin adapters that turn a wire format into core [`Command`]s and core
//! [`Event`]s back into the wire format. They own no topic or delivery logic.
//!
//! What every carrier shares lives here: the [`Outbound`] queue item, and [`Link`], the
//! per-connection glue (authentication, the `Hello` deadline, publish flow control,
//! requests the core does not need to see). A carrier's own file only reads and writes.

pub mod files;
pub mod framing;
pub mod legacy;
pub mod native;
pub mod quic;
pub mod request;
pub mod uploads;
pub mod websocket;
pub mod ws;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::auth::Authenticator;
use crate::core::{ClientId, Command, ConnId, CoreConfig, Event, Hello, Reject, SessionName};
use crate::driver::{DriverGone, DriverHandle};
use crate::store::{PushToken, Store};

pub use request::{HelloRequest, PROTOCOL_VERSION, Refused, Request};

/// One item of a connection's outbound queue.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Something the core has to say.
    Event(Event),
    /// Answer to a `Ping`.
    Pong(u64),
    /// Answer to a `RegisterPushToken`.
    PushTokenRegistered(u64),
    /// A file upload multiplexed on this connection (WebSocket) reached every receiver.
    FileAccepted(crate::core::MessageId),
    /// Send the refusal, then close the connection.
    Close(Box<Reject>),
}

impl Outbound {
    /// Whether this item answers a `Publish` (and so frees a publish slot).
    pub fn answers_publish(&self) -> bool {
        matches!(self, Outbound::Event(Event::PubAck { .. }))
            || matches!(self, Outbound::Event(Event::Error(e)) if e.message_id.is_some())
    }
}

/// The driver's way to reach a connection: its bounded outbound queue, and a kick that
/// makes the carrier drop the connection when that queue overflowed (the peer stopped
/// reading, so a `Close` could not be queued).
#[derive(Debug, Clone)]
pub struct ConnTx {
    pub tx: mpsc::Sender<Outbound>,
    pub kick: Arc<Notify>,
    /// Where files for this connection go (see [`files`]).
    pub files: files::FilePort,
}

/// Limits every carrier applies to its connections.
#[derive(Debug, Clone)]
pub struct CarrierLimits {
    /// Largest frame accepted, in bytes.
    pub max_frame: usize,
    /// Time a client has to authenticate.
    pub hello_timeout: Duration,
    /// Publishes in flight (sent, not yet answered) per connection; past this the
    /// carrier stops reading, and transport flow control slows the publisher.
    pub max_pending_publishes: usize,
    /// WebSocket carriers ping this often.
    pub ws_ping_interval: Duration,
    /// WebSocket carriers close a connection silent for this long.
    pub ws_idle_timeout: Duration,
    /// Client connections open at once, on every carrier together.
    pub max_connections: usize,
    /// QUIC handshakes under way past which new clients must prove their address
    /// first (see [`quic::serve`]); 0: every client.
    pub quic_retry_above: usize,
}

impl Default for CarrierLimits {
    fn default() -> Self {
        Self {
            max_frame: crate::core::DEFAULT_MAX_PAYLOAD_BYTES as usize + 64 * 1024,
            hello_timeout: Duration::from_secs(5),
            max_pending_publishes: 1024,
            ws_ping_interval: websocket::PING_INTERVAL,
            ws_idle_timeout: websocket::IDLE_TIMEOUT,
            max_connections: 100_000,
            quic_retry_above: 256,
        }
    }
}

impl CarrierLimits {
    /// Outbound queue size that a connection reading its stream never fills: the
    /// delivery window, every publish answer, and room for control frames.
    pub fn outbound_capacity(&self, core: &CoreConfig) -> usize {
        core.limits.max_inflight + self.max_pending_publishes + 256
    }
}

/// What a [`Link`] needs from the broker.
pub struct LinkContext {
    pub driver: DriverHandle,
    pub auth: Arc<Authenticator>,
    pub store: Arc<dyn Store>,
    pub limits: CarrierLimits,
    /// Set once the broker shuts down. Each WebSocket writer holds a receiver: it says
    /// goodbye with a close frame (1001, going away) and drops it, so the shutdown can
    /// wait until every client has been told. (QUIC clients are told by the endpoint's
    /// own close.)
    pub closing: watch::Sender<bool>,
    /// One permit per open client connection (see [`LinkContext::connection_slot`]).
    pub connections: Arc<Semaphore>,
}

impl LinkContext {
    pub fn new(
        driver: DriverHandle,
        auth: Arc<Authenticator>,
        store: Arc<dyn Store>,
        limits: CarrierLimits,
    ) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            driver,
            auth,
            store,
            limits,
            closing: watch::channel(false).0,
        }
    }

    /// A slot for one more client connection, held for its life; `None` when
    /// `--max-connections` are open. Taken before a QUIC handshake or a WebSocket
    /// upgrade, so that a broker at its limit spends nothing more on a newcomer, and
    /// memory (40 KiB or so per QUIC connection) stays within what was planned for.
    pub fn connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }
}

/// The carrier-independent half of one client connection.
pub struct Link {
    ctx: Arc<LinkContext>,
    peer: IpAddr,
    legacy_only: bool,
    tx: mpsc::Sender<Outbound>,
    kick: Arc<Notify>,
    files: files::FilePort,
    /// Set once `Hello` succeeds; shared with the carrier's file-stream tasks.
    conn_cell: Arc<OnceLock<ConnId>>,
    conn: Option<ConnId>,
    session: Option<SessionName>,
    publish_slots: Arc<Semaphore>,
    /// Answers sent before `Hello` succeeded (see [`MAX_BEFORE_LOGIN`]).
    before_login: std::sync::atomic::AtomicU32,
}

/// Answers a connection may be sent before its `Hello` succeeds (pongs, refusals of
/// frames that are not `Hello`, failed `Hello`s); the next closes it instead. Without
/// a bound a client that never reads would fill its outbound queue, holding the reader
/// (and the `Hello` deadline with it) forever.
pub const MAX_BEFORE_LOGIN: u32 = 64;

/// Devices one session keeps registered for push notifications; past it the device
/// registered longest ago goes (see [`Store::put_push_token`]).
pub const MAX_PUSH_TOKENS: usize = 10_000;

impl Link {
    /// `tx` is the connection's outbound queue and `files` its file port; `legacy_only`
    /// marks connections that can only read `LEGACY_JSON` payloads.
    pub fn new(
        ctx: Arc<LinkContext>,
        peer: IpAddr,
        legacy_only: bool,
        tx: mpsc::Sender<Outbound>,
        files: files::FilePort,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(ctx.limits.max_pending_publishes));
        Self {
            ctx,
            peer,
            legacy_only,
            tx,
            kick: Arc::new(Notify::new()),
            files,
            conn_cell: Arc::new(OnceLock::new()),
            conn: None,
            session: None,
            publish_slots: slots,
            before_login: Default::default(),
        }
    }

    /// Whether `Hello` succeeded.
    pub fn is_attached(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection's id once `Hello` succeeded (for tasks that outlive a borrow).
    pub fn conn_cell(&self) -> Arc<OnceLock<ConnId>> {
        self.conn_cell.clone()
    }

    /// The connection's id, if `Hello` succeeded.
    pub fn conn_id(&self) -> Option<ConnId> {
        self.conn
    }

    /// The driver, for carriers that start file transfers.
    pub fn driver(&self) -> &DriverHandle {
        &self.ctx.driver
    }

    /// Notified when the broker drops this connection for not reading its queue.
    pub fn kick(&self) -> Arc<Notify> {
        self.kick.clone()
    }

    /// Slots the writer gives back as it sends publish answers.
    pub fn publish_slots(&self) -> Arc<Semaphore> {
        self.publish_slots.clone()
    }

    pub fn limits(&self) -> &CarrierLimits {
        &self.ctx.limits
    }

    async fn out(&self, item: Outbound) {
        let mut item = item;
        if self.conn.is_none() && !matches!(item, Outbound::Close(_)) {
            let sent = 1 + self
                .before_login
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if sent > MAX_BEFORE_LOGIN + 1 {
                return; // closing
            }
            if sent == MAX_BEFORE_LOGIN + 1 {
                item = Outbound::Close(Box::new(Reject::NotAuthenticated));
            }
        }
        // The writer ends only after the link is gone, so this cannot be closed early;
        // if it is, the connection is going away and there is nobody to tell.
        let _ = self.tx.send(item).await;
    }

    /// Answers a refused request with an `Error`; the connection lives on.
    pub async fn refuse(&self, refused: Refused) {
        if refused.message_id.is_some() {
            // Every publish answer frees a slot, so a refused publish takes one too.
            let Ok(slot) = self.publish_slots.acquire().await else {
                return;
            };
            slot.forget();
        }
        self.out(Outbound::Event(Event::error(
            refused.reject,
            refused.request_id,
            refused.message_id,
        )))
        .await;
    }

    /// Tells the client its multiplexed file upload was delivered.
    pub async fn file_accepted(&self, file_id: crate::core::MessageId) {
        self.out(Outbound::FileAccepted(file_id)).await;
    }

    /// Sends `reject` and closes the connection (broken framing, Hello timeout).
    pub async fn fail(&self, reject: Reject) {
        self.out(Outbound::Close(Box::new(reject))).await;
    }

    /// Handles one request. Errs only when the broker is shutting down.
    pub async fn handle(&mut self, request: Request) -> Result<(), DriverGone> {
        let conn = match (&request, self.conn) {
            // Boxed: authentication (a store query, argon2) makes a large future, and
            // an unboxed one would be part of every connection's task for its whole life.
            (Request::Hello(hello), None) => return Box::pin(self.hello(hello.clone())).await,
            (Request::Hello(_), Some(_)) => {
                let reject = Reject::InvalidFrame("already authenticated".into());
                self.refuse(Refused::new(reject)).await;
                return Ok(());
            }
            (Request::Ping(nonce), _) => {
                self.out(Outbound::Pong(*nonce)).await;
                return Ok(());
            }
            (_, None) => {
                self.refuse(request.refused(Reject::NotAuthenticated)).await;
                return Ok(());
            }
            (_, Some(conn)) => conn,
        };
        let command = match request {
            Request::Hello(_) | Request::Ping(_) => return Ok(()),
            Request::Subscribe {
                request_id,
                filter,
                durable,
                presence,
                history,
            } => Command::Subscribe {
                conn,
                request_id,
                filter,
                durable,
                presence,
                history,
            },
            Request::Unsubscribe { request_id, filter } => Command::Unsubscribe {
                conn,
                request_id,
                filter,
            },
            Request::Publish(publish) => {
                // Wait for a free slot: this is what makes a publisher slow down. The
                // writer closes the slots when the connection is going away.
                let Ok(slot) = self.publish_slots.acquire().await else {
                    return Ok(());
                };
                slot.forget();
                Command::Publish { conn, publish }
            }
            Request::Ack(message_id) => Command::Ack { conn, message_id },
            Request::PublishKey {
                request_id,
                public_key,
            } => Command::PublishKey {
                conn,
                request_id,
                public_key,
            },
            Request::GetKeys { request_id } => Command::GetKeys { conn, request_id },
            Request::RegisterPushToken(r) => {
                Box::pin(self.register_push_token(r)).await;
                return Ok(());
            }
        };
        self.ctx.driver.send(command).await
    }

    async fn hello(&mut self, hello: HelloRequest) -> Result<(), DriverGone> {
        if hello.protocol_version != PROTOCOL_VERSION {
            let reject = Reject::UnsupportedVersion(hello.protocol_version);
            self.refuse(Refused::new(reject)).await;
            return Ok(());
        }
        let settings = match self
            .ctx
            .auth
            .authenticate(self.peer, &hello.session, &hello.password)
            .await
        {
            Ok(settings) => settings,
            Err(reject) => {
                tracing::info!(peer = %self.peer, session = %hello.session, %reject, "hello refused");
                self.refuse(Refused::new(reject)).await;
                return Ok(());
            }
        };
        let (client_id, anonymous) = match hello.client_id {
            Some(id) => (id, false),
            None => (anonymous_client_id(), true),
        };
        let conn = self.ctx.driver.next_conn_id();
        tracing::debug!(conn = conn.0, peer = %self.peer, session = %hello.session, client = %client_id, "connected");
        self.conn = Some(conn);
        let _ = self.conn_cell.set(conn);
        self.session = Some(hello.session.clone());
        let hello = Hello {
            conn,
            connection_id: rand::random(),
            settings,
            client_id,
            anonymous,
            clean: hello.clean,
            legacy_only: self.legacy_only,
        };
        let conn_tx = ConnTx {
            tx: self.tx.clone(),
            kick: self.kick.clone(),
            files: self.files.clone(),
        };
        self.ctx.driver.attach(hello, conn_tx).await
    }

    async fn register_push_token(&self, r: request::PushTokenRequest) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let token = PushToken {
            session,
            user_id: r.user_id,
            device_id: r.device_id,
            token: r.token,
            platform: r.platform,
        };
        match self.ctx.store.put_push_token(&token, MAX_PUSH_TOKENS).await {
            Ok(()) => self.out(Outbound::PushTokenRegistered(r.request_id)).await,
            Err(e) => {
                tracing::error!(error = %e, "storing a push token failed");
                let reject = Reject::Internal("could not store the push token");
                self.refuse(Refused {
                    reject,
                    request_id: r.request_id,
                    message_id: None,
                })
                .await;
            }
        }
    }

    /// The connection ended: the core forgets it (durable state stays).
    pub async fn close(self) {
        if let Some(conn) = self.conn {
            let _ = self.ctx.driver.send(Command::Disconnected { conn }).await;
        }
    }
}

/// A client id for a client that did not send one; nothing durable is keyed by it.
fn anonymous_client_id() -> ClientId {
    let bytes: [u8; 12] = rand::random();
    let id = format!("anon-{}", hex::encode(bytes));
    // Hex and a fixed prefix always make a valid id.
    ClientId::parse(&id).unwrap_or_else(|_| unreachable!("anon ids are valid"))
}
