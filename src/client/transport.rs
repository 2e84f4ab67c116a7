//! Dialing the broker over QUIC and speaking frames on the control stream.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::carrier::framing::{self, FrameDecoder};
use crate::proto::{ClientFrame, ServerFrame};

use super::ClientError;

/// ALPN of the native protocol.
pub const ALPN: &[u8] = b"fastport/1";
/// Keep-alive interval, well inside the broker's 30 s idle timeout. It also bounds how
/// long an idle client takes to learn (by a stateless reset) that the broker restarted.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Largest frame the SDK accepts from the broker.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// A parsed broker URL: `quic://HOST:PORT` (the port defaults to 3000).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Url(format!("{url:?}: {why}"));
        let rest = url
            .strip_prefix("quic://")
            .ok_or_else(|| bad("expected quic://HOST:PORT"))?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("no path expected"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal without a port ends in ']'.
            Some((h, p)) if !p.ends_with(']') => {
                (h, p.parse::<u16>().map_err(|_| bad("invalid port"))?)
            }
            _ => (rest, 3000),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// TLS trust for the broker: a CA file (the broker's `certs/ca.pem`) or the system roots.
fn client_tls(ca: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    let roots = crate::tls::client_roots(ca).map_err(|e| ClientError::Tls(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A client endpoint that can dial the broker repeatedly (reconnects reuse it).
pub struct Dialer {
    /// Bound on first use, for the address family of the broker's address.
    endpoint: Option<Endpoint>,
    config: quinn::ClientConfig,
    url: BrokerUrl,
}

impl Dialer {
    pub fn new(url: BrokerUrl, ca: Option<&Path>) -> Result<Self, ClientError> {
        let tls = QuicClientConfig::try_from(client_tls(ca)?)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(tls));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        if let Ok(idle) = Duration::from_secs(30).try_into() {
            transport.max_idle_timeout(Some(idle));
        }
        config.transport_config(Arc::new(transport));
        Ok(Self {
            endpoint: None,
            config,
            url,
        })
    }

    /// The broker this dialer connects to.
    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }

    /// Opens a new QUIC connection to the broker.
    pub async fn dial(&mut self) -> Result<Connection, ClientError> {
        let target = (self.url.host.as_str(), self.url.port);
        let addr = tokio::net::lookup_host(target)
            .await
            .map_err(|e| ClientError::Connect(format!("cannot resolve {}: {e}", self.url.host)))?
            .next()
            .ok_or_else(|| ClientError::Connect(format!("no address for {}", self.url.host)))?;
        let endpoint = match &self.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                let endpoint =
                    Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
                self.endpoint = Some(endpoint.clone());
                endpoint
            }
        };
        let connecting = endpoint
            .connect_with(self.config.clone(), addr, &self.url.host)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|e| ClientError::Connect(e.to_string()))
    }
}

/// The write half of a control stream.
pub struct ControlWriter {
    send: SendStream,
    buf: BytesMut,
}

impl ControlWriter {
    /// Queues a frame; nothing is sent until [`ControlWriter::flush`].
    pub fn push(&mut self, frame: &ClientFrame) {
        framing::encode_frame(frame, &mut self.buf);
    }

    /// Writes everything queued in one go.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = self.buf.split().freeze();
        self.send
            .write_chunk(bytes)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))
    }

    /// Queues and flushes one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.push(frame);
        self.flush().await
    }
}

/// Opens the control stream: frames written go to the broker, frames read arrive on the
/// returned channel (which closes when the stream or connection ends).
pub async fn open_control(
    conn: &Connection,
) -> Result<(ControlWriter, mpsc::Receiver<ServerFrame>), ClientError> {
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(read_frames(recv, tx));
    Ok((
        ControlWriter {
            send,
            buf: BytesMut::new(),
        },
        rx,
    ))
}

async fn read_frames(mut recv: RecvStream, tx: mpsc::Sender<ServerFrame>) {
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(bytes)) => match framing::decode::<ServerFrame>(bytes) {
                    Ok(frame) => {
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable frame from the broker");
                        return;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "broken framing from the broker");
                    return;
                }
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
            Ok(None) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BrokerUrl::parse("quic://127.0.0.1:4433").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 4433));
        let u = BrokerUrl::parse("quic://example.com").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("example.com", 3000));
        let u = BrokerUrl::parse("quic://[::1]:5000/").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 5000));
        assert!(BrokerUrl::parse("http://x:1").is_err());
        assert!(BrokerUrl::parse("quic://x:notaport").is_err());
        assert!(BrokerUrl::parse("quic://:1").is_err());
    }
}
