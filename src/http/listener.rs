//! The accepting side of the TCP port shared by every listener: the peer's address
//! for handlers, Nagle's algorithm turned off on each connection, and connections
//! that send nothing for too long closed ([`Idle`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::TlsListener;

/// The peer's address, whichever listener accepted it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, PlainListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Turns Nagle's algorithm off on an accepted connection. A broker writes small frames
/// as they come (deliveries, acks, pongs); with Nagle on, the kernel holds each one
/// back while the one before is unacknowledged, and a peer that delays its ACKs turns
/// that into tens of milliseconds. (Mosquitto's packaged config leaves it on; a
/// load-generator client that did added ~1.3 ms to every legacy message's p50.)
pub fn no_delay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
}

/// Plain HTTP and WS: axum's TCP listener (which backs off on accept errors), with
/// Nagle's algorithm turned off on every connection, each closed once idle for `idle`.
pub struct PlainListener {
    tcp: TcpListener,
    idle: Duration,
}

impl PlainListener {
    pub fn new(tcp: TcpListener, idle: Duration) -> Self {
        Self { tcp, idle }
    }
}

impl Listener for PlainListener {
    type Io = Idle<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (mut tcp, peer) = Listener::accept(&mut self.tcp).await;
        no_delay(&mut tcp);
        (Idle::new(tcp, self.idle), peer)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A connection that fails its read once the peer has sent nothing for `limit`, so
/// hyper drops it: neither a client that never sends a request (or never finishes
/// one) nor an idle keep-alive connection holds a socket and a task forever. (hyper's
/// own header timeout needs a timer that `axum::serve` does not give it.) WebSocket
/// clients answer the broker's pings well within it, and the WebSocket carrier closes
/// silent ones itself, politely, before this does.
pub struct Idle<T> {
    inner: T,
    limit: Duration,
    last_read: Instant,
    /// Fires at `last_read + limit` or later; moved on only when it fires, not on
    /// every read (each move re-registers it in the timer wheel).
    deadline: Pin<Box<Sleep>>,
}

impl<T> Idle<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            limit,
            last_read: now,
            deadline: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Whether the peer has been silent for the whole limit (re-arming the deadline
    /// when it has not).
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        while self.deadline.as_mut().poll(cx).is_ready() {
            let due = self.last_read + self.limit;
            if due <= Instant::now() {
                return true;
            }
            self.deadline.as_mut().reset(due);
        }
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.last_read = Instant::now();
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer sent nothing for too long",
            ))),
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_connections_have_nagle_off() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("address");
        let mut listener = PlainListener::new(tcp, Duration::from_secs(60));
        let client = TcpStream::connect(addr);
        let ((accepted, peer), client) = tokio::join!(listener.accept(), client);
        let client = client.expect("connect");
        assert_eq!(peer, client.local_addr().expect("client address"));
        assert!(accepted.get_ref().nodelay().expect("TCP_NODELAY"));
    }

    /// A connection's reads fail once the peer has been silent for the limit, and
    /// not before: each byte that arrives starts the wait again.
    #[tokio::test(start_paused = true)]
    async fn silent_connections_time_out_and_talking_ones_do_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut idle = Idle::new(ours, Duration::from_secs(10));
        let mut byte = [0u8; 1];
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(8)).await;
            peer.write_all(b"x").await.expect("write");
            idle.read_exact(&mut byte)
                .await
                .expect("a byte within the limit");
        }
        let started = Instant::now();
        let e = idle.read(&mut byte).await.expect_err("timed out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
