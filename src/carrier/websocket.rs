//! What the two WebSocket carriers share: the writer task (outbound queue → messages,
//! keep-alive pings, kicks) and the reader's timing rules (Hello deadline, idle
//! timeout).
//!
//! Keep-alive follows design §10: the broker pings every 20 s and closes a connection
//! that has sent nothing for 60 s.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::SinkExt;
use futures::stream::{SplitSink, SplitStream, StreamExt};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::core::Reject;

use super::files::{FILE_PORT_CAPACITY, FileItem};
use super::{Link, LinkContext, Outbound};

/// Default interval of the broker's pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Default silence after which a connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// WebSocket close codes (RFC 6455).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// The close code for a refusal that ends a connection.
pub fn close_code(reject: &Reject) -> u16 {
    match reject {
        Reject::Internal(_) => close::INTERNAL,
        Reject::InvalidFrame(_) => close::PROTOCOL_ERROR,
        _ => close::POLICY,
    }
}

pub fn close_message(code: u16, reason: &str) -> Message {
    // Close reasons are limited to 123 bytes.
    let mut reason = reason.to_owned();
    while reason.len() > 123 {
        reason.pop();
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Turns outbound items into WebSocket messages for one carrier.
pub trait Encoder: Send + 'static {
    /// The messages for one item (none if the carrier has no way to say it).
    fn encode(&mut self, item: &Outbound) -> Vec<Message>;

    /// The messages for one item of the connection's file port.
    fn encode_file(&mut self, item: &FileItem) -> Vec<Message>;
}

/// What ends a writer from outside: the broker kicking its connection, or shutting
/// down.
pub struct WriterStops {
    pub kick: Arc<Notify>,
    pub closing: watch::Receiver<bool>,
}

/// How the writer paces itself.
#[derive(Debug, Clone, Copy)]
pub struct WriterTiming {
    /// The broker pings this often.
    pub ping_interval: Duration,
    /// A write that does not complete within this ends the connection: the client
    /// stopped reading and its socket buffer is full. (A write is one message, or
    /// the flush of a burst; the bound is generous, the idle timeout, so a client
    /// that reads slowly is not cut off.)
    pub stall_timeout: Duration,
}

/// Writes the outbound queue and the file port to the socket until the queue ends, a
/// `Close` is written, the broker kicks the connection or shuts down, or a write
/// stalls (see [`WriterTiming::stall_timeout`]). Pings every `ping_interval`.
///
/// The kick is watched during writes too: a client that stopped reading leaves the
/// writer waiting on a full socket, which is exactly when the broker kicks it. When
/// this returns the connection is over; the reader watches for that (see `serve`).
pub async fn write_loop<E: Encoder>(
    mut sink: SplitSink<WebSocket, Message>,
    rx: mpsc::Receiver<Outbound>,
    files: mpsc::Receiver<FileItem>,
    encoder: E,
    publish_slots: Arc<Semaphore>,
    stops: WriterStops,
    timing: WriterTiming,
) {
    let WriterStops { kick, mut closing } = stops;
    let pumped = pump(&mut sink, rx, files, encoder, &publish_slots, timing);
    tokio::select! {
        () = pumped => {}
        // A client told "going away" reconnects (to this broker once it is back, or
        // to another node) instead of seeing its connection drop without a word.
        true = shutting_down(&mut closing) => {
            let close = close_message(close::GOING_AWAY, "the broker is shutting down");
            let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(close)).await;
        }
        _ = kick.notified() => {
            let reject = Reject::LimitExceeded("outbound queue full: the client is not reading");
            tracing::debug!(%reject, "dropping a WebSocket connection");
            // The socket is likely full: one short try to say why.
            let close = close_message(close::POLICY, &reject.to_string());
            let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(close)).await;
        }
    }
    publish_slots.close();
}

/// Completes with `true` once the broker shuts down (`false`: it can no longer).
async fn shutting_down(closing: &mut watch::Receiver<bool>) -> bool {
    closing.wait_for(|closing| *closing).await.is_ok()
}

/// How long a closing writer waits for its close frame to be taken.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One write to the socket, given up if it does not complete within `stall`.
async fn within<T>(
    stall: Duration,
    write: impl std::future::Future<Output = Result<T, axum::Error>>,
) -> Result<T, ()> {
    match tokio::time::timeout(stall, write).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            tracing::debug!(?stall, "a write to a WebSocket client stalled; closing");
            Err(())
        }
    }
}

async fn pump<E: Encoder>(
    sink: &mut SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    mut files: mpsc::Receiver<FileItem>,
    mut encoder: E,
    publish_slots: &Semaphore,
    timing: WriterTiming,
) {
    let stall = timing.stall_timeout;
    let mut ping =
        tokio::time::interval_at(Instant::now() + timing.ping_interval, timing.ping_interval);
    loop {
        tokio::select! {
            Some(item) = files.recv() => {
                for message in encoder.encode_file(&item) {
                    if within(stall, sink.send(message)).await.is_err() {
                        return;
                    }
                }
                if let FileItem::End { written, .. } = item {
                    let _ = written.send(());
                }
            }
            item = rx.recv() => {
                let Some(item) = item else {
                    let _ = within(stall, sink.send(close_message(close::NORMAL, "bye"))).await;
                    return;
                };
                if item.answers_publish() {
                    publish_slots.add_permits(1);
                }
                let closing = match &item {
                    Outbound::Close(reject) => Some(Reject::clone(reject)),
                    _ => None,
                };
                let mut closed = false;
                for message in encoder.encode(&item) {
                    closed |= matches!(message, Message::Close(_));
                    if within(stall, sink.feed(message)).await.is_err() {
                        return;
                    }
                }
                if closed {
                    let _ = within(stall, sink.flush()).await;
                    return;
                }
                if let Some(reject) = closing {
                    let close = close_message(close_code(&reject), &reject.to_string());
                    let _ = within(stall, sink.send(close)).await;
                    return;
                }
                // Flush once the queue is drained, so bursts go out together.
                if rx.is_empty() && within(stall, sink.flush()).await.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if within(stall, sink.send(Message::Ping(Default::default()))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One WebSocket connection as both carriers serve it: the [`Link`], the writer task
/// (see [`write_loop`]) and the reading half, with the reader's timing rules.
pub struct Connection {
    stream: SplitStream<WebSocket>,
    writer: JoinHandle<()>,
    writer_done: bool,
    hello_deadline: Instant,
    idle_timeout: Duration,
    /// What the client must send first (`init`, `Hello`), for the refusal when it
    /// does not in time.
    login: &'static str,
}

impl Connection {
    /// Splits `socket`, starts its writer with `encoder`, and makes the connection's
    /// [`Link`] (`legacy_only` for clients that read only `LEGACY_JSON`).
    pub fn open<E: Encoder>(
        socket: WebSocket,
        peer: IpAddr,
        ctx: Arc<LinkContext>,
        legacy_only: bool,
        encoder: E,
        login: &'static str,
    ) -> (Connection, Link) {
        let (sink, stream) = socket.split();
        let limits = ctx.limits.clone();
        let (tx, rx) = mpsc::channel(limits.outbound_capacity(ctx.driver.core_config()));
        let closing = ctx.closing.subscribe();
        let (files_tx, files_rx) = mpsc::channel(FILE_PORT_CAPACITY);
        let link = Link::new(ctx, peer, legacy_only, tx, files_tx);
        let timing = WriterTiming {
            ping_interval: limits.ws_ping_interval,
            stall_timeout: limits.ws_idle_timeout,
        };
        let writer = tokio::spawn(write_loop(
            sink,
            rx,
            files_rx,
            encoder,
            link.publish_slots(),
            WriterStops {
                kick: link.kick(),
                closing,
            },
            timing,
        ));
        let connection = Connection {
            stream,
            writer,
            writer_done: false,
            hello_deadline: Instant::now() + limits.hello_timeout,
            idle_timeout: limits.ws_idle_timeout,
            login,
        };
        (connection, link)
    }

    /// The client's next message; `None` once the connection is over: the client
    /// left, broke the protocol or missed a deadline (told why, where there is
    /// something to say), or the writer ended it (a close, a kick, a stalled client).
    pub async fn next(&mut self, link: &Link) -> Option<Message> {
        let deadline = if link.is_attached() {
            Instant::now() + self.idle_timeout
        } else {
            self.hello_deadline
        };
        let incoming = tokio::select! {
            incoming = next_message(&mut self.stream, deadline) => incoming,
            _ = &mut self.writer => {
                self.writer_done = true;
                return None;
            }
        };
        let reject = match incoming {
            Incoming::Message(message) => return Some(message),
            Incoming::Gone => return None,
            Incoming::Broken(reject) => reject,
            Incoming::TimedOut if link.is_attached() => {
                Reject::LimitExceeded("idle timeout: nothing received")
            }
            Incoming::TimedOut => Reject::InvalidFrame(format!(
                "no successful {} within {} s",
                self.login,
                link.limits().hello_timeout.as_secs()
            )),
        };
        link.fail(reject).await;
        None
    }

    /// Ends the connection: the core forgets it, the writer finishes, and the
    /// reader lingers for the client's answer to the close.
    pub async fn close(mut self, link: Link) {
        link.close().await;
        if !self.writer_done {
            let _ = self.writer.await;
        }
        linger(&mut self.stream).await;
    }
}

/// What the reader got from the socket.
pub enum Incoming {
    Message(Message),
    /// The peer closed, the socket broke, or the stream ended.
    Gone,
    /// The client broke the WebSocket protocol (a message over the size limit, bad
    /// framing, text that is not UTF-8): answered with `INVALID_FRAME` and a close.
    Broken(Reject),
    /// Nothing arrived before the deadline.
    TimedOut,
}

/// After the broker closed a connection: keeps reading (and dropping) until the client
/// answers the close, for at most 2 s. Dropping the socket at once would make the
/// kernel reset the connection when the client's next frame arrives, and a reset can
/// destroy the error and close frames the client has not read yet.
pub async fn linger(stream: &mut SplitStream<WebSocket>) {
    let until = Instant::now() + std::time::Duration::from_secs(2);
    while let Incoming::Message(_) = next_message(stream, until).await {}
}

/// The next message, waiting at most until `deadline`.
pub async fn next_message(stream: &mut SplitStream<WebSocket>, deadline: Instant) -> Incoming {
    match tokio::time::timeout_at(deadline, stream.next()).await {
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) => Incoming::Gone,
        Ok(Some(Ok(message))) => Incoming::Message(message),
        Ok(Some(Err(e))) => match broken(e) {
            Some(reject) => Incoming::Broken(reject),
            None => Incoming::Gone,
        },
        Err(_) => Incoming::TimedOut,
    }
}

/// The refusal for a read error the client caused; `None` for a socket that broke.
fn broken(error: axum::Error) -> Option<Reject> {
    use tokio_tungstenite::tungstenite::Error;
    let error = error.into_inner().downcast::<Error>().ok()?;
    match *error {
        Error::Capacity(e) => Some(Reject::InvalidFrame(format!("message too large: {e}"))),
        Error::Protocol(e) => Some(Reject::InvalidFrame(format!("WebSocket protocol: {e}"))),
        Error::Utf8(e) => Some(Reject::InvalidFrame(format!("text message: {e}"))),
        _ => None,
    }
}
