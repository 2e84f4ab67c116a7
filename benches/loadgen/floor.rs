//! What this machine allows a latency workload at best, measured beside the brokers.
//!
//! A 2-vCPU virtual machine is not a quiet place: the host deschedules a vCPU now and
//! then, and a thread woken in that moment runs milliseconds late whatever it does.
//! Two readings put the latency tables in that light:
//!
//! - the **bare UDP relay**: a child process that forwards every datagram of the
//!   publisher to the subscriber with one blocking `recv_from`/`send_to` loop. It is
//!   the same path as a broker's (publisher, a process hop, subscriber, each woken
//!   per message), with no protocol, crypto or routing at all, so its percentiles are
//!   the floor of any broker on the machine at that time;
//! - the **stall probe**: a thread of the load generator that sleeps 1 ms again and
//!   again during each latency run and counts the wake-ups that came more than 2 ms
//!   late. A run whose tail is long and whose probe saw stalls was held up by the
//!   machine; a long tail with no stalls is the system's own.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::systems::{Reader, Subscriber};

/// The relay process: an empty datagram registers its sender as the subscriber; every
/// other datagram goes to the subscriber registered last.
pub fn serve_udp_relay(port: u16) -> Result<()> {
    let socket = UdpSocket::bind(("127.0.0.1", port)).context("binding the UDP relay")?;
    deep_buffers(&socket)?;
    println!("ready");
    let mut subscriber: Option<SocketAddr> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (len, from) = socket.recv_from(&mut buf)?;
        if len == 0 {
            subscriber = Some(from);
        } else if let Some(to) = subscriber {
            // A full socket buffer drops the datagram; the workload counts it as lost.
            let _ = socket.send_to(&buf[..len], to);
        }
    }
}

/// Socket buffers for a second of the workload: a stall of the reading process must
/// delay datagrams, not drop them (the brokers' TCP and QUIC connections lose nothing
/// either; they slow the sender down).
fn deep_buffers(socket: &impl std::os::fd::AsFd) -> Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_send_buffer_size(4 << 20)?;
    Ok(())
}

/// A publisher's socket, connected to the relay.
pub async fn udp_publisher(relay: u16) -> Result<tokio::net::UdpSocket> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(("127.0.0.1", relay)).await?;
    Ok(socket)
}

/// A subscriber registered with the relay; datagrams arrive as messages.
pub async fn udp_subscriber(relay: u16) -> Result<Subscriber> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    deep_buffers(&socket)?;
    socket.connect(("127.0.0.1", relay)).await?;
    socket.send(&[]).await?;
    let (tx, rx) = mpsc::channel(4096);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(len) = socket.recv(&mut buf).await {
            if tx.send(Bytes::copy_from_slice(&buf[..len])).await.is_err() {
                break;
            }
        }
    });
    Ok(Subscriber::Channel {
        rx,
        _reader: Reader(reader),
    })
}

/// How often the probe asks to be woken.
const PROBE_PERIOD: Duration = Duration::from_millis(1);
/// A wake-up this much later than asked counts as a stall.
pub const STALL: Duration = Duration::from_millis(2);

/// Counts the machine's stalls while a latency run goes on (see the module docs).
pub struct StallProbe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u32>,
}

impl StallProbe {
    pub fn start() -> StallProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut stalls = 0;
            while !flag.load(Ordering::Relaxed) {
                let asked = Instant::now();
                std::thread::sleep(PROBE_PERIOD);
                if asked.elapsed() > PROBE_PERIOD + STALL {
                    stalls += 1;
                }
            }
            stalls
        });
        StallProbe { stop, thread }
    }

    /// Stops the probe: the wake-ups that came more than [`STALL`] late, or `None` if
    /// the probe's thread died (a count of 0 would claim a quiet machine).
    pub fn finish(self) -> Option<u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok()
    }
}
