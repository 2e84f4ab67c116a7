//! UDP sockets for QUIC, the broker's and the SDK's alike.
//!
//! Both ends ask the kernel for deeper buffers than Linux's default (208 KiB). The
//! broker's one socket carries every client, so a burst from many publishers at once
//! lands in its receive queue together; a client's carries a run of deliveries while
//! the application is busy. A datagram dropped on a full queue stalls its connection
//! until QUIC's loss detection resends it, which is what a latency tail is made of.
//!
//! The kernel caps each request at `net.core.rmem_max` / `wmem_max`; the caller learns
//! what it got and decides whether that is worth a warning (the broker: yes; an
//! application embedding the SDK on a stock host: no).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Kernel buffer granted to a socket, in bytes, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buffers {
    pub recv: usize,
    pub send: usize,
}

impl Buffers {
    /// Whether either direction got less than `asked`.
    pub fn short_of(&self, asked: usize) -> bool {
        self.recv < asked || self.send < asked
    }
}

/// Binds a UDP socket on `addr` with `buffer` bytes of kernel buffer asked for each
/// direction. An IPv6 wildcard is dual-stack whatever `net.ipv6.bindv6only` says, so
/// `[::]` serves (or reaches) IPv4 peers too, as quinn's own client endpoint does.
pub(crate) fn bind(addr: SocketAddr, buffer: usize) -> io::Result<(UdpSocket, Buffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6()
        && let Err(e) = socket.set_only_v6(false)
    {
        tracing::debug!(error = %e, %addr, "cannot make the QUIC socket dual-stack");
    }
    let buffers = deepen(&socket, buffer);
    socket.bind(&addr.into())?;
    Ok((socket.into(), buffers))
}

/// Asks for `bytes` of kernel buffer in each direction and returns what was granted.
/// Never fatal: the socket works with any buffer, only less smoothly.
fn deepen(socket: &Socket, bytes: usize) -> Buffers {
    if let Err(e) = socket.set_recv_buffer_size(bytes) {
        tracing::debug!(error = %e, bytes, "cannot set the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(bytes) {
        tracing::debug!(error = %e, bytes, "cannot set the UDP send buffer");
    }
    // 0 for a direction the kernel will not report.
    let of = |reported: io::Result<usize>| reported.map(from_reported).unwrap_or(0);
    Buffers {
        recv: of(socket.recv_buffer_size()),
        send: of(socket.send_buffer_size()),
    }
}

/// The buffer granted, from what `SO_RCVBUF` / `SO_SNDBUF` read back: Linux reports
/// twice what it granted (the other half is its bookkeeping); other systems report the
/// grant itself.
fn from_reported(reported: usize) -> usize {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        reported / 2
    } else {
        reported
    }
}

/// A bound socket as quinn's endpoint uses it: quinn's own Tokio socket, except that
/// a read returning fewer datagrams than it had room for ends the wake-up.
///
/// quinn reads until a read finds nothing, so every wake-up of a socket cost one
/// more `recvmmsg` that returned `EAGAIN`: half of the broker's reads at 10,000 msg/s
/// in bursts of ten (BENCHMARKS.md), and as many of each client's.
/// On Linux, `recvmmsg` on a non-blocking socket fills as many slots as there are
/// datagrams queued, so a short read means the queue was empty; the socket is then
/// marked not ready. Tokio clears that mark only if no readiness event came since
/// it was set, so a datagram arriving meanwhile still wakes the reader. Elsewhere
/// (one datagram per read on some systems) the reads go on until one blocks.
#[derive(Debug)]
pub(crate) struct QuicSocket {
    io: AsyncFd<UdpSocket>,
    state: UdpSocketState,
}

impl QuicSocket {
    pub fn new(socket: UdpSocket) -> io::Result<Arc<Self>> {
        // Makes the socket non-blocking, as the reactor needs it.
        let state = UdpSocketState::new((&socket).into())?;
        // SAFETY: the `UdpSocket` owns its descriptor, and the `AsyncFd` owns the
        // socket until it is dropped: the descriptor stays open and the same.
        let io = unsafe { AsyncFd::register(socket) }?;
        Ok(Arc::new(Self { io, state }))
    }
}

/// Whether a short read proves the receive queue empty (see [`QuicSocket`]).
const SHORT_READ_DRAINS: bool = cfg!(any(target_os = "linux", target_os = "android"));

impl quinn::AsyncUdpSocket for QuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, |socket| {
            self.state.send(socket.into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let room = bufs.len().min(quinn::udp::BATCH_SIZE);
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // Any error is tried again, as quinn's own socket does: the reads that
            // fail here are transient (an ICMP error queued on the socket).
            if let Ok(Ok(read)) =
                ready.try_io(|socket| self.state.recv(socket.get_ref().into(), bufs, meta))
            {
                if SHORT_READ_DRAINS && read < room {
                    ready.clear_ready();
                }
                return Poll::Ready(Ok(read));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Wakes one connection's sender, which found the socket's buffer full, once it has
/// room. quinn makes one per connection, and every connection of the broker shares its
/// socket: each waits on a future of its own, as the reactor wakes all of those, but
/// keeps a single waker per socket for `poll_write_ready` (the last caller's).
struct Writable {
    socket: Arc<QuicSocket>,
    waiting: Option<Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl quinn::UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let waiting = this.waiting.get_or_insert_with(|| {
            let socket = Arc::clone(&this.socket);
            Box::pin(async move { socket.io.writable().await.map(|_| ()) })
        });
        let writable = waiting.as_mut().poll(cx);
        if writable.is_ready() {
            this.waiting = None;
        }
        writable
    }
}

impl std::fmt::Debug for Writable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writable")
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    /// A buffer size below every kernel's default cap, so it is granted exactly.
    const SMALL: usize = 64 << 10;

    #[test]
    fn a_small_request_is_granted_exactly_and_reported_as_granted() {
        let (_socket, buffers) = bind(([127, 0, 0, 1], 0).into(), SMALL).unwrap();
        assert_eq!(
            buffers,
            Buffers {
                recv: SMALL,
                send: SMALL
            }
        );
        assert!(!buffers.short_of(SMALL));
        assert!(buffers.short_of(SMALL + 1));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_request_is_capped_at_the_hosts_maximum() {
        // Some containers hide these files; then only the bounds can be checked.
        let max = |name: &str| -> Option<usize> {
            let text = std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).ok()?;
            text.trim().parse().ok()
        };
        let asked = 64 << 20;
        let (_socket, buffers) = bind(([127, 0, 0, 1], 0).into(), asked).unwrap();
        for (granted, cap) in [
            (buffers.recv, max("rmem_max")),
            (buffers.send, max("wmem_max")),
        ] {
            match cap {
                Some(cap) => assert_eq!(granted, asked.min(cap)),
                None => assert!(granted > 0 && granted <= asked, "granted {granted}"),
            }
        }
        if let (Some(rmem), Some(wmem)) = (max("rmem_max"), max("wmem_max")) {
            assert_eq!(buffers.short_of(asked), rmem.min(wmem) < asked);
        }
    }

    #[test]
    fn an_ipv6_wildcard_also_takes_ipv4() {
        let (v6, _) = bind((std::net::Ipv6Addr::UNSPECIFIED, 0).into(), SMALL).unwrap();
        assert!(!SockRef::from(&v6).only_v6().unwrap());
        let port = v6.local_addr().unwrap().port();
        let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        v4.send_to(b"hi", ("127.0.0.1", port)).unwrap();
        v6.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        let (len, from) = v6.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"hi");
        assert_eq!(from.port(), v4.local_addr().unwrap().port());
    }

    /// After a short read marks the socket not ready, the next datagram still wakes
    /// the reader, and a read that fills every slot leaves it ready for the rest.
    #[tokio::test]
    async fn a_short_read_does_not_lose_the_next_datagram() {
        use quinn::AsyncUdpSocket;

        let (socket, _) = bind(([127, 0, 0, 1], 0).into(), SMALL).unwrap();
        let to = socket.local_addr().unwrap();
        let socket = QuicSocket::new(socket).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut storage = vec![[0u8; 64]; quinn::udp::BATCH_SIZE];
        let mut read = async |expected: &[&[u8]]| {
            let mut bufs: Vec<io::IoSliceMut<'_>> =
                storage.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); bufs.len()];
            let wait = std::time::Duration::from_secs(5);
            let poll = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta));
            let n = tokio::time::timeout(wait, poll)
                .await
                .expect("woken")
                .unwrap();
            let got: Vec<&[u8]> = (0..n).map(|i| &bufs[i][..meta[i].len]).collect();
            assert_eq!(got, expected);
        };

        peer.send_to(b"one", to).unwrap();
        read(&[b"one"]).await;
        peer.send_to(b"two", to).unwrap();
        read(&[b"two"]).await;

        let batch = quinn::udp::BATCH_SIZE;
        for _ in 0..batch + 1 {
            peer.send_to(b"x", to).unwrap();
        }
        // Let them all arrive, so the first read fills every slot.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        read(&vec![&b"x"[..]; batch]).await;
        read(&[b"x"]).await;
    }

    #[test]
    fn linux_reports_twice_the_grant() {
        let expected = if cfg!(target_os = "linux") {
            4096
        } else {
            8192
        };
        assert_eq!(from_reported(8192), expected);
    }
}
