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

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

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
