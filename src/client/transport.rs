//! Reaching the broker: QUIC first (`quic://`), protobuf over WebSocket (`ws://`,
//! `wss://`) when asked for — or when QUIC cannot connect, e.g. on a network that
//! blocks UDP. Either way the session task sees one [`Control`]: frames out, frames in.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, StreamExt};
use prost::Message as _;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::carrier::framing::{
    self, FrameDecoder, FrameHead, WriteQueue, bytes_field_len, put_bytes_field,
};
use crate::proto::{self, ClientFrame, PayloadFormat, ServerFrame, client_frame, field};

use super::ClientError;

/// ALPN of the native protocol.
pub const ALPN: &[u8] = b"fastport/1";
/// Keep-alive interval, well inside the broker's 30 s idle timeout. It also bounds how
/// long an idle client takes to learn (by a stateless reset) that the broker restarted.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Largest frame the SDK accepts from the broker.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// How long a QUIC attempt may take before falling back to WebSocket.
const QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// How long any connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a WebSocket per system call. tungstenite zero-fills the free part
/// of its read buffer before every read, including one that finds nothing: at its
/// default of 128 KiB that filling was 6-8% of a subscriber's CPU at 10k msg/s.
const WEBSOCKET_READ_BUFFER: usize = 16 * 1024;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a broker is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Quic,
    Ws,
    Wss,
}

/// A parsed broker URL: `quic://HOST:PORT` (port 3000 by default), or
/// `ws[s]://HOST:PORT/PATH` (path `/v1/ws` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Url(format!("{url:?}: {why}"));
        let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("quic://") {
            (Scheme::Quic, rest, 3000)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            (Scheme::Ws, rest, 80)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (Scheme::Wss, rest, 443)
        } else {
            return Err(bad("expected quic://, ws:// or wss://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = match (scheme, path.trim_end_matches('/')) {
            (Scheme::Quic, "") => String::new(),
            (Scheme::Quic, _) => return Err(bad("a quic:// URL has no path")),
            (_, "") => "/v1/ws".to_owned(),
            (_, p) => p.to_owned(),
        };
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal without a port ends in ']'.
            Some((h, p)) if !p.ends_with(']') => {
                (h, p.parse::<u16>().map_err(|_| bad("invalid port"))?)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The WebSocket URL to try when QUIC does not connect: the same host and port
    /// (fastPort serves both on one port number), `ws://` for loopback, else `wss://`.
    pub fn websocket_fallback(&self) -> BrokerUrl {
        let loopback = self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        BrokerUrl {
            scheme: if loopback { Scheme::Ws } else { Scheme::Wss },
            host: self.host.clone(),
            port: self.port,
            path: "/v1/ws".to_owned(),
        }
    }

    /// The broker's HTTP API base, `http[s]://HOST:PORT`: the same host and port (one
    /// port number for everything), with TLS where the WebSocket URL has it (for
    /// `quic://`, the one [`Self::websocket_fallback`] would try).
    pub fn http_base(&self) -> String {
        let tls = match self.scheme {
            Scheme::Quic => self.websocket_fallback().scheme == Scheme::Wss,
            scheme => scheme == Scheme::Wss,
        };
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host_in_url(), self.port)
    }

    fn websocket_url(&self) -> String {
        let scheme = if self.scheme == Scheme::Wss {
            "wss"
        } else {
            "ws"
        };
        format!(
            "{scheme}://{}:{}{}",
            self.host_in_url(),
            self.port,
            self.path
        )
    }

    /// The host as a URL writes it (an IPv6 literal in brackets).
    fn host_in_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scheme {
            Scheme::Quic => write!(f, "quic://{}:{}", self.host, self.port),
            _ => f.write_str(&self.websocket_url()),
        }
    }
}

/// TLS trust for the broker: a CA file (the broker's `certs/ca.pem`) or the system roots.
fn client_tls(ca: Option<&Path>, alpn: Option<&[u8]>) -> Result<rustls::ClientConfig, ClientError> {
    crate::tls::client_config(ca, alpn).map_err(|e| ClientError::Tls(e.to_string()))
}

/// Kernel buffer asked for each direction of a client's UDP socket: room for a burst of
/// deliveries while the application is busy, instead of drops that QUIC must resend.
const CLIENT_UDP_BUFFER: usize = 2 << 20;

/// A client endpoint on a socket of its own with [`CLIENT_UDP_BUFFER`].
fn client_endpoint(bind: SocketAddr) -> std::io::Result<Endpoint> {
    let (socket, buffers) = crate::udp::bind(bind, CLIENT_UDP_BUFFER)?;
    // Not a warning: on a stock host the cap is below the ask, and the SDK still works.
    tracing::debug!(
        recv = buffers.recv,
        send = buffers.send,
        "QUIC client socket buffers"
    );
    Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        crate::udp::QuicSocket::new(socket)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Opens control channels to the broker, again and again (reconnects reuse it).
pub struct Dialer {
    url: BrokerUrl,
    fallback: Option<BrokerUrl>,
    quic: quinn::ClientConfig,
    /// Bound on first use, for the address family of the broker's address; shared by
    /// every connection this dialer opens.
    endpoint: std::sync::Mutex<Option<Endpoint>>,
    websocket_tls: Arc<rustls::ClientConfig>,
}

impl Dialer {
    /// A dialer for `url`; with `fallback`, a `quic://` URL falls back to WebSocket.
    pub fn new(url: BrokerUrl, ca: Option<&Path>, fallback: bool) -> Result<Self, ClientError> {
        let tls = client_tls(ca, Some(ALPN))?;
        let tls = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(tls));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        // Deliveries of large messages stream in on the control stream: the same
        // window the broker gives, for the same reason.
        transport.stream_receive_window(crate::carrier::quic::STREAM_WINDOW.into());
        // The same request the broker makes of us: publishes stream to it.
        transport.ack_frequency_config(Some(crate::carrier::quic::ack_frequency()));
        if let Ok(idle) = Duration::from_secs(30).try_into() {
            transport.max_idle_timeout(Some(idle));
        }
        quic.transport_config(Arc::new(transport));
        let fallback = (fallback && url.scheme == Scheme::Quic).then(|| url.websocket_fallback());
        Ok(Self {
            url,
            fallback,
            quic,
            endpoint: std::sync::Mutex::new(None),
            websocket_tls: Arc::new(client_tls(ca, None)?),
        })
    }

    /// The broker this dialer connects to.
    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }

    /// Opens a control channel: QUIC, or WebSocket per the URL or as a fallback.
    pub async fn connect(&mut self) -> Result<Control, ClientError> {
        if self.url.scheme != Scheme::Quic {
            let url = self.url.clone();
            return self.websocket(&url).await;
        }
        let wait = if self.fallback.is_some() {
            QUIC_FALLBACK_AFTER
        } else {
            CONNECT_TIMEOUT
        };
        let quic_error = match tokio::time::timeout(wait, self.dial()).await {
            Ok(Ok(conn)) => return Control::over_quic(conn).await,
            Ok(Err(e)) => e,
            Err(_) => ClientError::Timeout,
        };
        let Some(fallback) = self.fallback.clone() else {
            return Err(quic_error);
        };
        tracing::info!(error = %quic_error, %fallback, "QUIC did not connect; trying WebSocket");
        self.websocket(&fallback).await.map_err(|ws_error| {
            ClientError::Connect(format!(
                "QUIC: {quic_error}; WebSocket ({fallback}): {ws_error}"
            ))
        })
    }

    /// Opens a QUIC connection to the broker (without a control stream). Connections
    /// opened by one dialer share its UDP socket.
    pub async fn dial(&self) -> Result<Connection, ClientError> {
        let target = (self.url.host.as_str(), self.url.port);
        let addr = tokio::net::lookup_host(target)
            .await
            .map_err(|e| ClientError::Connect(format!("cannot resolve {}: {e}", self.url.host)))?
            .next()
            .ok_or_else(|| ClientError::Connect(format!("no address for {}", self.url.host)))?;
        let endpoint = {
            let mut slot = self.endpoint.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(endpoint) => endpoint.clone(),
                None => {
                    let bind: SocketAddr = if addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    let endpoint =
                        client_endpoint(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
                    *slot = Some(endpoint.clone());
                    endpoint
                }
            }
        };
        let connecting = endpoint
            .connect_with(self.quic.clone(), addr, &self.url.host)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|e| ClientError::Connect(e.to_string()))
    }

    async fn websocket(&self, url: &BrokerUrl) -> Result<Control, ClientError> {
        let request = url
            .websocket_url()
            .into_client_request()
            .map_err(|e| ClientError::Url(e.to_string()))?;
        let config = WebSocketConfig::default()
            .read_buffer_size(WEBSOCKET_READ_BUFFER)
            .max_message_size(Some(MAX_FRAME))
            .max_frame_size(Some(MAX_FRAME));
        let connector = match url.scheme {
            Scheme::Wss => Some(Connector::Rustls(self.websocket_tls.clone())),
            _ => Some(Connector::Plain),
        };
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            connector,
        );
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Control::over_websocket(ws))
    }
}

/// A `Publish`, its fields borrowed from the SDK's sealed message; written as prost
/// writes a `proto::Publish` without its payload, which [`WriteQueue`] adds.
pub struct PublishFields<'a> {
    pub message_id: &'a [u8; 16],
    pub topic: &'a str,
    pub payload: &'a Bytes,
    pub timestamp_ms: u64,
    pub format: PayloadFormat,
}

impl FrameHead for PublishFields<'_> {
    fn head_len(&self) -> usize {
        use prost::encoding::{int32, uint64};
        let format = self.format as i32;
        let mut len =
            bytes_field_len(1, self.message_id) + bytes_field_len(2, self.topic.as_bytes());
        if self.timestamp_ms != 0 {
            len += uint64::encoded_len(4, &self.timestamp_ms);
        }
        if format != 0 {
            len += int32::encoded_len(5, &format);
        }
        len
    }

    fn put_head(&self, buf: &mut BytesMut) {
        use prost::encoding::{int32, uint64};
        put_bytes_field(1, self.message_id, buf);
        put_bytes_field(2, self.topic.as_bytes(), buf);
        if self.timestamp_ms != 0 {
            uint64::encode(4, &self.timestamp_ms, buf);
        }
        let format = self.format as i32;
        if format != 0 {
            int32::encode(5, &format, buf);
        }
    }
}

/// The write half of a control channel.
pub enum ControlWriter {
    Quic {
        conn: Connection,
        send: SendStream,
        queue: WriteQueue,
    },
    WebSocket {
        sink: SplitSink<Ws, WsMessage>,
        queued: Vec<Bytes>,
    },
}

impl ControlWriter {
    /// Queues a frame; nothing is sent until [`ControlWriter::flush`].
    pub fn push(&mut self, frame: &ClientFrame) {
        match self {
            ControlWriter::Quic { queue, .. } => queue.push(frame),
            ControlWriter::WebSocket { queued, .. } => {
                queued.push(Bytes::from(frame.encode_to_vec()))
            }
        }
    }

    /// Queues a `Publish`. Over QUIC it is written from `publish`'s borrowed fields
    /// (no owned `proto::Publish`: its id, topic and payload would each be another
    /// allocation per message), and a large payload from its own bytes after the
    /// frame's head, not copied into the write buffer.
    pub fn push_publish(&mut self, publish: &PublishFields<'_>) {
        match self {
            ControlWriter::Quic { queue, .. } => queue.push_with_payload(
                field::CLIENT_PUBLISH,
                publish,
                field::PAYLOAD,
                publish.payload,
            ),
            ControlWriter::WebSocket { .. } => self.push(&ClientFrame {
                kind: Some(client_frame::Kind::Publish(proto::Publish {
                    message_id: Bytes::copy_from_slice(publish.message_id),
                    topic: publish.topic.to_owned(),
                    payload: publish.payload.clone(),
                    timestamp_ms: publish.timestamp_ms,
                    format: publish.format as i32,
                })),
            }),
        }
    }

    /// Writes everything queued in one go.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        let broken = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
        match self {
            ControlWriter::Quic { send, queue, .. } => {
                if !queue.is_empty() {
                    send.write_all_chunks(queue.chunks())
                        .await
                        .map_err(|e| broken(&e))?;
                    queue.clear();
                }
            }
            ControlWriter::WebSocket { sink, queued } => {
                if queued.is_empty() {
                    return Ok(());
                }
                for bytes in queued.drain(..) {
                    sink.feed(WsMessage::Binary(bytes))
                        .await
                        .map_err(|e| broken(&e))?;
                }
                sink.flush().await.map_err(|e| broken(&e))?;
            }
        }
        Ok(())
    }

    /// Queues and flushes one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.push(frame);
        self.flush().await
    }

    /// The QUIC connection under this channel, if it is one.
    pub fn quic_connection(&self) -> Option<&Connection> {
        match self {
            ControlWriter::Quic { conn, .. } => Some(conn),
            ControlWriter::WebSocket { .. } => None,
        }
    }

    /// Closes the channel (and its QUIC connection).
    pub async fn close(&mut self) {
        match self {
            ControlWriter::Quic { conn, .. } => conn.close(0u32.into(), b"client closed"),
            ControlWriter::WebSocket { sink, .. } => {
                let _ = sink.send(WsMessage::Close(None)).await;
            }
        }
    }
}

/// A control channel: write frames with `writer`, read them from `frames`.
pub struct Control {
    pub writer: ControlWriter,
    pub frames: ControlReader,
}

impl Control {
    /// Opens the control stream on a QUIC connection.
    pub async fn over_quic(conn: Connection) -> Result<Control, ClientError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Control {
            writer: ControlWriter::Quic {
                conn,
                send,
                queue: WriteQueue::default(),
            },
            frames: ControlReader::Quic {
                recv,
                decoder: FrameDecoder::new(MAX_FRAME),
            },
        })
    }

    fn over_websocket(ws: Ws) -> Control {
        let (sink, stream) = ws.split();
        Control {
            writer: ControlWriter::WebSocket {
                sink,
                queued: Vec::new(),
            },
            frames: ControlReader::WebSocket(stream),
        }
    }
}

/// The read half of a control channel. The session task reads it itself, with no
/// task in between: a frame costs no extra hand-over between tasks on its way in.
pub enum ControlReader {
    Quic {
        recv: RecvStream,
        /// Bytes read but not yet decoded: they survive a cancelled [`recv`].
        ///
        /// [`recv`]: ControlReader::recv
        decoder: FrameDecoder,
    },
    WebSocket(SplitStream<Ws>),
}

impl ControlReader {
    /// The next frame; `None` once the channel has ended or broken. Cancel-safe.
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        match self {
            ControlReader::Quic { recv, decoder } => loop {
                if let Some(frame) = Self::buffered(decoder)? {
                    return Some(frame);
                }
                // Cancel-safe (quinn's documentation): nothing is lost if this is
                // dropped before it completes.
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
                    Ok(None) | Err(_) => return None,
                }
            },
            ControlReader::WebSocket(stream) => loop {
                let message = stream.next().await?.ok()?;
                if let Some(frame) = Self::websocket_frame(message)? {
                    return Some(frame);
                }
            },
        }
    }

    /// A frame that has already arrived, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<ServerFrame> {
        self.recv().now_or_never().flatten()
    }

    /// The next frame already in `decoder`: `Some(None)` if it needs more bytes, `None`
    /// if the broker's framing is broken.
    fn buffered(decoder: &mut FrameDecoder) -> Option<Option<ServerFrame>> {
        match decoder.next_frame() {
            Ok(Some(bytes)) => match framing::decode::<ServerFrame>(bytes) {
                Ok(frame) => Some(Some(frame)),
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable frame from the broker");
                    None
                }
            },
            Ok(None) => Some(None),
            Err(e) => {
                tracing::warn!(error = %e, "broken framing from the broker");
                None
            }
        }
    }

    /// The frame in a WebSocket message: `Some(None)` for messages that carry none,
    /// `None` when the channel is closing or broken.
    fn websocket_frame(message: WsMessage) -> Option<Option<ServerFrame>> {
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Close(_) => return None,
            _ => return Some(None),
        };
        match ServerFrame::decode(bytes) {
            Ok(frame) => Some(Some(frame)),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from the broker");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Publish` written from borrowed fields decodes to the owned frame, for
    /// payloads copied, chunked or empty and fields left at their defaults.
    #[test]
    fn a_publish_from_borrowed_fields_decodes_to_the_owned_frame() {
        let cases = [
            (0usize, 0u64, PayloadFormat::Unspecified),
            (128, 1_700_000_000_000, PayloadFormat::NativeV1),
            (20 * 1024, u64::MAX, PayloadFormat::LegacyJson),
        ];
        for (size, timestamp_ms, format) in cases {
            let payload = Bytes::from(vec![5u8; size]);
            let fields = PublishFields {
                message_id: &[0x5A; 16],
                topic: "a/b/c",
                payload: &payload,
                timestamp_ms,
                format,
            };
            let mut queue = WriteQueue::default();
            queue.push_with_payload(field::CLIENT_PUBLISH, &fields, field::PAYLOAD, &payload);
            let mut decoder = FrameDecoder::new(1 << 20);
            for chunk in queue.chunks() {
                decoder.extend(chunk);
            }
            let bytes = decoder.next_frame().expect("ok").expect("complete");
            let frame: ClientFrame = framing::decode(bytes).expect("decodes");
            let owned = proto::Publish {
                message_id: Bytes::from_static(&[0x5A; 16]),
                topic: "a/b/c".into(),
                payload: payload.clone(),
                timestamp_ms,
                format: format as i32,
            };
            assert_eq!(
                frame.kind,
                Some(client_frame::Kind::Publish(owned)),
                "{size} {timestamp_ms} {format:?}"
            );
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn urls() {
        let u = BrokerUrl::parse("quic://127.0.0.1:4433").expect("valid");
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Quic, "127.0.0.1", 4433)
        );
        let u = BrokerUrl::parse("quic://example.com").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("example.com", 3000));
        let u = BrokerUrl::parse("quic://[::1]:5000/").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 5000));
        let u = BrokerUrl::parse("ws://localhost:3000").expect("valid");
        assert_eq!((u.scheme, u.path.as_str()), (Scheme::Ws, "/v1/ws"));
        assert_eq!(u.to_string(), "ws://localhost:3000/v1/ws");
        let u = BrokerUrl::parse("wss://broker.example/custom/path").expect("valid");
        assert_eq!(
            (u.scheme, u.port, u.path.as_str()),
            (Scheme::Wss, 443, "/custom/path")
        );
        for bad in [
            "http://x:1",
            "quic://x:notaport",
            "quic://:1",
            "quic://x/path",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_http_api_is_on_the_same_host_and_port() {
        for (url, base) in [
            ("quic://127.0.0.1:3000", "http://127.0.0.1:3000"),
            ("quic://localhost", "http://localhost:3000"),
            ("quic://broker.example:4000", "https://broker.example:4000"),
            ("quic://[::1]:5000", "http://[::1]:5000"),
            (
                "ws://broker.example:3000/v1/ws",
                "http://broker.example:3000",
            ),
            ("wss://broker.example/v1/ws", "https://broker.example:443"),
        ] {
            let parsed = BrokerUrl::parse(url).expect("valid");
            assert_eq!(parsed.http_base(), base, "{url}");
        }
    }

    #[test]
    fn fallback_stays_encrypted_off_loopback() {
        let local = BrokerUrl::parse("quic://127.0.0.1:3000").expect("valid");
        assert_eq!(
            local.websocket_fallback().to_string(),
            "ws://127.0.0.1:3000/v1/ws"
        );
        let remote = BrokerUrl::parse("quic://broker.example:3000").expect("valid");
        assert_eq!(
            remote.websocket_fallback().to_string(),
            "wss://broker.example:3000/v1/ws"
        );
    }
}
