//! The accepting side of the TCP port shared by every listener: the peer's address
//! for handlers, and Nagle's algorithm turned off on each connection. How long a
//! connection may stay silent is hyper's header timeout (see [`super::serve`]).

use std::net::SocketAddr;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};

/// The peer's address, whichever listener accepted it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

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
/// Nagle's algorithm turned off on every connection.
pub struct PlainListener {
    tcp: TcpListener,
}

impl PlainListener {
    pub fn new(tcp: TcpListener) -> Self {
        Self { tcp }
    }
}

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (mut tcp, peer) = Listener::accept(&mut self.tcp).await;
        no_delay(&mut tcp);
        (tcp, peer)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_connections_have_nagle_off() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("address");
        let mut listener = PlainListener::new(tcp);
        let client = TcpStream::connect(addr);
        let ((accepted, peer), client) = tokio::join!(listener.accept(), client);
        let client = client.expect("connect");
        assert_eq!(peer, client.local_addr().expect("client address"));
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }
}
