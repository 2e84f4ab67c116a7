//! The systems under test, behind one publisher and one subscriber type, so every
//! workload runs the same code against each of them.
//!
//! "Acked" publishers keep a window of 256 publishes awaiting the broker's
//! acknowledgement (fastPort `PubAck`, MQTT `PUBACK`, JetStream publish ack);
//! fire-and-forget ones (MQTT QoS 0, NATS core) only flush at the end.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use bytes::Bytes;
use fastport::client::transport::{Control, Dialer};
use fastport::client::{Client, ClientConfig, SessionKey, SubscribeOptions, Subscription};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Publishes awaiting their acknowledgement, per publisher.
pub const WINDOW: usize = 256;

/// How a system is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// fastPort through the SDK; `ws` selects `/v1/ws` instead of QUIC.
    Fastport {
        ws: bool,
        durable: bool,
    },
    /// fastPort's legacy JSON bridge.
    FastportLegacy,
    Mosquitto {
        port: u16,
        qos1: bool,
    },
    NatsCore,
    NatsJetStream,
    /// The bare quinn relay of the file workload.
    Relay,
    /// The bare UDP relay of the latency workload, on this port (see `floor`).
    UdpRelay {
        port: u16,
    },
}

/// A system under test, as a row of the report.
#[derive(Debug, Clone)]
pub struct System {
    pub name: String,
    pub kind: Kind,
    /// The broker process, for CPU and memory readings.
    pub pid: Option<u32>,
}

/// Where the brokers are.
#[derive(Clone)]
pub struct Env {
    pub fastport_quic: String,
    pub fastport_http: String,
    pub fastport_ca: std::path::PathBuf,
    pub session: String,
    pub key: SessionKey,
    pub nats_url: String,
    /// Extra flags for every fastPort broker the generator starts.
    pub broker_args: Vec<String>,
    /// Makes client ids unique across runs.
    pub run: u64,
}

type Pending = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One publishing connection.
pub enum Publisher {
    /// Publishes go out at once (`publish_pipelined`); the window holds their acks.
    Fastport {
        client: Client,
        inflight: FuturesUnordered<Pending>,
    },
    Legacy {
        sink: futures::stream::SplitSink<WsStream, WsMessage>,
        sent: u64,
        acked: Arc<AtomicU64>,
        notify: Arc<Notify>,
    },
    Mqtt {
        client: AsyncClient,
        qos: QoS,
        sent: u64,
        acked: Arc<AtomicU64>,
        notify: Arc<Notify>,
    },
    Nats(async_nats::Client),
    Udp(tokio::net::UdpSocket),
    JetStream {
        js: async_nats::jetstream::Context,
        inflight: FuturesUnordered<Pending>,
    },
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One subscribing connection.
/// (The clients are kept so their connections live as long as the subscription.)
pub enum Subscriber {
    Fastport {
        sub: Subscription,
        _client: Client,
    },
    /// Messages a reader task forwards; the task ends with the subscriber.
    Channel {
        rx: mpsc::Receiver<Bytes>,
        _reader: Reader,
    },
    Nats {
        sub: async_nats::Subscriber,
        _client: async_nats::Client,
    },
}

/// A subscriber's reader task, aborted when the subscriber goes: left running, the
/// readers of finished workloads (each with its connection) would keep answering their
/// broker's keep-alives in the background of every later one.
pub struct Reader(pub tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Subscriber {
    /// Ends the subscription for good, so a durable one does not keep collecting
    /// copies of later runs' messages.
    pub async fn close(self) {
        if let Subscriber::Fastport { sub, _client } = self {
            let _ = sub.unsubscribe().await;
            _client.close().await;
        }
    }

    pub async fn next(&mut self) -> Option<Bytes> {
        match self {
            Subscriber::Fastport { sub, .. } => sub.next().await.map(|m| m.payload),
            Subscriber::Channel { rx, .. } => rx.recv().await,
            Subscriber::Nats { sub, .. } => sub.next().await.map(|m| m.payload),
        }
    }
}

fn nats_subject(topic: &str) -> String {
    topic.replace('/', ".")
}

pub async fn fastport_client(env: &Env, kind: &Kind, client_id: Option<String>) -> Result<Client> {
    let ws = matches!(kind, Kind::Fastport { ws: true, .. });
    let url = if ws {
        format!("ws://{}/v1/ws", env.fastport_http)
    } else {
        env.fastport_quic.clone()
    };
    let mut config = ClientConfig::new(url, &env.session, "bench-password", env.key.clone())
        .ca_file(&env.fastport_ca)
        .websocket_fallback(false);
    config.client_id = client_id;
    Ok(Client::connect(config).await?)
}

async fn mqtt(port: u16, id: String) -> Result<(AsyncClient, rumqttc::EventLoop)> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(WINDOW as u16)
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_clean_session(true);
    let (client, mut events) = AsyncClient::new(options, 4096);
    // Nagle off on the client's socket too, as NATS's client and QUIC have it: the
    // "default" and "tuned" rows differ in Mosquitto's own config only.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    Ok((client, events))
}

async fn legacy_socket(env: &Env) -> Result<WsStream> {
    // Nagle off, as in every other client here (see BENCHMARKS.md).
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{}/", env.fastport_http),
        None,
        true,
    )
    .await?;
    let init = serde_json::json!({"type": "init", "sessionName": env.session, "password": "bench-password"});
    ws.send(WsMessage::text(init.to_string())).await?;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) if t.contains("init_response") => {
                if t.contains("\"success\":true") {
                    return Ok(ws);
                }
                return Err(anyhow!("legacy init refused: {t}"));
            }
            Some(Ok(_)) => continue,
            _ => return Err(anyhow!("legacy socket closed during init")),
        }
    }
}

fn legacy_payload(text: &str) -> Option<Bytes> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["type"] != "message" {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(v["data"].as_str()?)
        .ok()
        .map(Bytes::from)
}

impl System {
    /// A publishing connection.
    pub async fn publisher(&self, env: &Env, id: usize) -> Result<Publisher> {
        Ok(match &self.kind {
            Kind::Fastport { .. } => Publisher::Fastport {
                client: fastport_client(env, &self.kind, None).await?,
                inflight: FuturesUnordered::new(),
            },
            Kind::FastportLegacy => {
                let ws = legacy_socket(env).await?;
                let (sink, mut stream) = ws.split();
                let acked = Arc::new(AtomicU64::new(0));
                let notify = Arc::new(Notify::new());
                let (a, n) = (acked.clone(), notify.clone());
                tokio::spawn(async move {
                    while let Some(Ok(message)) = stream.next().await {
                        if let WsMessage::Text(t) = message
                            && t.contains("ack_received")
                        {
                            a.fetch_add(1, Ordering::Relaxed);
                            n.notify_one();
                        }
                    }
                });
                Publisher::Legacy {
                    sink,
                    sent: 0,
                    acked,
                    notify,
                }
            }
            Kind::Mosquitto { port, qos1 } => {
                let (client, mut events) = mqtt(*port, format!("pub-{}-{id}", env.run)).await?;
                let acked = Arc::new(AtomicU64::new(0));
                let notify = Arc::new(Notify::new());
                let (a, n) = (acked.clone(), notify.clone());
                let (ready, connected) = oneshot::channel();
                tokio::spawn(async move {
                    let mut ready = Some(ready);
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                if let Some(r) = ready.take() {
                                    let _ = r.send(());
                                }
                            }
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                a.fetch_add(1, Ordering::Relaxed);
                                n.notify_one();
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                tokio::time::timeout(Duration::from_secs(5), connected)
                    .await
                    .context("MQTT connect")??;
                Publisher::Mqtt {
                    client,
                    qos: if *qos1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    },
                    sent: 0,
                    acked,
                    notify,
                }
            }
            Kind::NatsCore => Publisher::Nats(async_nats::connect(&env.nats_url).await?),
            Kind::Relay => return Err(anyhow!("the relay only runs the file workload")),
            Kind::UdpRelay { port } => Publisher::Udp(crate::floor::udp_publisher(*port).await?),
            Kind::NatsJetStream => Publisher::JetStream {
                js: async_nats::jetstream::new(async_nats::connect(&env.nats_url).await?),
                inflight: FuturesUnordered::new(),
            },
        })
    }

    /// A subscribing connection on `topic`.
    pub async fn subscriber(&self, env: &Env, id: usize, topic: &str) -> Result<Subscriber> {
        Ok(match &self.kind {
            Kind::Fastport { durable, .. } => {
                let client_id = durable.then(|| format!("bench-sub-{}-{id}", env.run));
                let client = fastport_client(env, &self.kind, client_id).await?;
                let options = SubscribeOptions {
                    durable: *durable,
                    presence: false,
                    ..SubscribeOptions::default()
                };
                let sub = client.subscribe_with(topic, options).await?;
                Subscriber::Fastport {
                    sub,
                    _client: client,
                }
            }
            Kind::FastportLegacy => {
                let mut ws = legacy_socket(env).await?;
                ws.send(WsMessage::text(
                    serde_json::json!({"type": "subscribe", "topic": topic}).to_string(),
                ))
                .await?;
                let (tx, rx) = mpsc::channel(4096);
                let reader = tokio::spawn(async move {
                    while let Some(Ok(message)) = ws.next().await {
                        let WsMessage::Text(t) = message else {
                            continue;
                        };
                        let Some(payload) = legacy_payload(&t) else {
                            continue;
                        };
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                        let ack = serde_json::json!({"type": "ack", "messageId": v["messageId"]});
                        if ws.send(WsMessage::text(ack.to_string())).await.is_err()
                            || tx.send(payload).await.is_err()
                        {
                            break;
                        }
                    }
                });
                Subscriber::Channel {
                    rx,
                    _reader: Reader(reader),
                }
            }
            Kind::Mosquitto { port, qos1 } => {
                let (client, mut events) = mqtt(*port, format!("sub-{}-{id}", env.run)).await?;
                let (tx, rx) = mpsc::channel(4096);
                let (ready, subscribed) = oneshot::channel();
                // The event loop needs a live client; the task holds one.
                let keep = client.clone();
                let reader = tokio::spawn(async move {
                    let _client = keep;
                    let mut ready = Some(ready);
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                if let Some(r) = ready.take() {
                                    let _ = r.send(());
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                if tx.send(p.payload).await.is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                let qos = if *qos1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                client.subscribe(topic, qos).await?;
                tokio::time::timeout(Duration::from_secs(5), subscribed)
                    .await
                    .context("MQTT subscribe")??;
                Subscriber::Channel {
                    rx,
                    _reader: Reader(reader),
                }
            }
            Kind::Relay => return Err(anyhow!("the relay only runs the file workload")),
            Kind::UdpRelay { port } => crate::floor::udp_subscriber(*port).await?,
            Kind::NatsCore => {
                let client = async_nats::connect(&env.nats_url).await?;
                let sub = client.subscribe(nats_subject(topic)).await?;
                client.flush().await?;
                Subscriber::Nats {
                    sub,
                    _client: client,
                }
            }
            Kind::NatsJetStream => {
                use async_nats::jetstream::consumer::{AckPolicy, pull};
                let client = async_nats::connect(&env.nats_url).await?;
                let js = async_nats::jetstream::new(client);
                let stream = js.get_stream("BENCH").await?;
                let consumer = stream
                    .create_consumer(pull::Config {
                        durable_name: Some(format!("sub-{}-{id}", env.run)),
                        filter_subject: nats_subject(topic),
                        ack_policy: AckPolicy::Explicit,
                        max_ack_pending: 10_000,
                        ..Default::default()
                    })
                    .await?;
                let mut messages = consumer.messages().await?;
                let (tx, rx) = mpsc::channel(4096);
                let reader = tokio::spawn(async move {
                    while let Some(Ok(message)) = messages.next().await {
                        let _ = message.ack().await;
                        if tx.send(message.payload.clone()).await.is_err() {
                            break;
                        }
                    }
                });
                Subscriber::Channel {
                    rx,
                    _reader: Reader(reader),
                }
            }
        })
    }

    /// An idle, authenticated connection subscribed to its own topic. fastPort's QUIC
    /// connections share `dialer`'s endpoint: an SDK client per connection would give
    /// each its own UDP socket and receive buffers, and 10,000 of those would measure
    /// the load generator, not the broker.
    pub async fn idle(
        &self,
        env: &Env,
        id: usize,
        dialer: &Dialer,
    ) -> Result<Box<dyn std::any::Any + Send>> {
        if !matches!(self.kind, Kind::Fastport { ws: false, .. }) {
            return Ok(Box::new(
                self.subscriber(env, id, &format!("idle/{id}")).await?,
            ));
        }
        use fastport::proto::{self, ClientFrame, client_frame, server_frame};
        let mut control = Control::over_quic(dialer.dial().await?).await?;
        let frame = |kind| ClientFrame { kind: Some(kind) };
        control
            .writer
            .send(&frame(client_frame::Kind::Hello(proto::Hello {
                protocol_version: 1,
                session: env.session.clone(),
                password: "bench-password".into(),
                client_id: String::new(),
                clean: false,
            })))
            .await?;
        match control.frames.recv().await.and_then(|f| f.kind) {
            Some(server_frame::Kind::Welcome(_)) => {}
            other => return Err(anyhow!("expected Welcome, got {other:?}")),
        }
        control
            .writer
            .send(&frame(client_frame::Kind::Subscribe(proto::Subscribe {
                request_id: 1,
                topic: format!("idle/{id}"),
                ..Default::default()
            })))
            .await?;
        match control.frames.recv().await.and_then(|f| f.kind) {
            Some(server_frame::Kind::Subscribed(_)) => Ok(Box::new(control)),
            other => Err(anyhow!("expected Subscribed, got {other:?}")),
        }
    }

    /// Resets per-run broker state (JetStream: a fresh file-backed stream).
    pub async fn prepare(&self, env: &Env) -> Result<()> {
        if self.kind == Kind::NatsJetStream {
            use async_nats::jetstream::stream::{Config, StorageType};
            let js = async_nats::jetstream::new(async_nats::connect(&env.nats_url).await?);
            let _ = js.delete_stream("BENCH").await;
            js.create_stream(Config {
                name: "BENCH".into(),
                subjects: vec!["bench.>".into()],
                storage: StorageType::File,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }
}

impl Publisher {
    /// Sends one message, waiting while the window is full.
    pub async fn send(&mut self, topic: &str, payload: Bytes) -> Result<()> {
        match self {
            Publisher::Fastport { client, inflight } => {
                while inflight.len() >= WINDOW {
                    inflight.next().await.transpose()?;
                }
                let ack = client.publish_pipelined(topic, payload).await?;
                inflight.push(Box::pin(async move {
                    ack.await?;
                    Ok(())
                }));
            }
            Publisher::Legacy {
                sink,
                sent,
                acked,
                notify,
            } => {
                while *sent - acked.load(Ordering::Relaxed) >= WINDOW as u64 {
                    notify.notified().await;
                }
                let frame = serde_json::json!({
                    "type": "publish", "topic": topic,
                    "data": base64::engine::general_purpose::STANDARD.encode(&payload),
                    "hash": "", "timestamp": fastport::driver::now_ms(),
                    "messageId": uuid::Uuid::new_v4().to_string(),
                });
                sink.send(WsMessage::text(frame.to_string())).await?;
                *sent += 1;
            }
            Publisher::Mqtt {
                client, qos, sent, ..
            } => {
                client.publish(topic, *qos, false, payload).await?;
                *sent += 1;
            }
            Publisher::Nats(client) => client.publish(nats_subject(topic), payload).await?,
            Publisher::Udp(socket) => {
                socket.send(&payload).await?;
            }
            Publisher::JetStream { js, inflight } => {
                while inflight.len() >= WINDOW {
                    inflight.next().await.transpose()?;
                }
                let ack = js.publish(nats_subject(topic), payload).await?;
                inflight.push(Box::pin(async move {
                    ack.await?;
                    Ok(())
                }));
            }
        }
        Ok(())
    }

    /// Waits until everything sent is acknowledged (or flushed).
    pub async fn drain(&mut self) -> Result<()> {
        match self {
            Publisher::Fastport { inflight, .. } | Publisher::JetStream { inflight, .. } => {
                while let Some(done) = inflight.next().await {
                    done?;
                }
            }
            Publisher::Legacy {
                sent,
                acked,
                notify,
                ..
            } => {
                while acked.load(Ordering::Relaxed) < *sent {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), notify.notified()).await;
                }
            }
            Publisher::Mqtt {
                qos,
                sent,
                acked,
                notify,
                ..
            } => {
                if *qos == QoS::AtLeastOnce {
                    while acked.load(Ordering::Relaxed) < *sent {
                        let _ = tokio::time::timeout(Duration::from_millis(100), notify.notified())
                            .await;
                    }
                }
            }
            Publisher::Nats(client) => client.flush().await?,
            Publisher::Udp(_) => {}
        }
        Ok(())
    }

    /// Closes the connection, so that the next workload does not share the machine
    /// with its teardown.
    pub async fn close(self) {
        match self {
            Publisher::Fastport { client, .. } => client.close().await,
            Publisher::Mqtt { client, .. } => {
                let _ = client.disconnect().await;
            }
            Publisher::Legacy { mut sink, .. } => {
                let _ = futures::SinkExt::close(&mut sink).await;
            }
            Publisher::Nats(_) | Publisher::Udp(_) | Publisher::JetStream { .. } => {}
        }
    }
}
