//! Shared helpers of the integration tests: a real broker process on ephemeral ports in
//! a temporary directory, a raw frame-level client, and timeouts on everything.
#![allow(dead_code)] // each test binary uses its own subset

pub mod dart;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastport::carrier::framing::{self, FrameDecoder};
use fastport::client::transport::{BrokerUrl, Dialer};
use fastport::client::{Client, ClientConfig, SessionKey, SubscribeOptions};
use fastport::proto::{ClientFrame, ServerFrame, client_frame, server_frame};
use serde_json::{Value, json};

/// Upper bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// Awaits `f` or panics after [`WAIT`].
/// The options of a durable subscription.
pub fn durable() -> SubscribeOptions {
    SubscribeOptions {
        durable: true,
        ..SubscribeOptions::default()
    }
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// What a broker process prints at start, up to its certificate's line (which follows
/// every address), read within [`WAIT`]; on a timeout, what came so far. Its stdout is
/// drained on a thread of its own from then on, so the pipe never fills.
pub fn read_banner(child: &mut Child) -> Result<Vec<String>, Vec<String>> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner: Vec<String> = Vec::new();
    while !banner.last().is_some_and(|l| l.trim().starts_with("cert ")) {
        match rx.recv_timeout(WAIT) {
            Ok(line) => banner.push(line),
            Err(_) => return Err(banner),
        }
    }
    Ok(banner)
}

/// A broker process started from the built binary.
pub struct Broker {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    /// What the broker printed at its last start, up to its certificate's line.
    pub banner: Vec<String>,
    extra: Vec<String>,
}

impl Broker {
    /// Starts a broker with the default (SQLite) store on ephemeral ports.
    pub fn start() -> Broker {
        Self::start_with(&[])
    }

    /// Starts a broker with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Broker {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), extra)
    }

    /// Starts a broker bound to `ip` (ephemeral ports) with extra arguments.
    pub fn start_on(ip: std::net::IpAddr, extra: &[&str]) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let zero = SocketAddr::new(ip, 0);
        let mut broker = Broker {
            child: None,
            dir,
            http: zero,
            quic: zero,
            banner: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastport"))
            .arg("serve")
            .arg("--http")
            .arg(self.http.to_string())
            .arg("--quic")
            .arg(self.quic.to_string())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--certs-dir")
            .arg(self.dir.path().join("certs"))
            .args(&self.extra)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "debug")
            .env_remove("PORT")
            .env_remove("HOST")
            .env_remove("DB_TYPE")
            .env_remove("SQLITE_PATH")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the fastport binary");
        self.banner = read_banner(&mut child)
            .unwrap_or_else(|_| panic!("broker did not start; log:\n{}", self.logs()));
        let addr = |url: String| -> SocketAddr {
            url.split_once("://")
                .and_then(|(_, addr)| addr.parse().ok())
                .unwrap_or_else(|| panic!("not an address: {url}"))
        };
        let https = self.banner.iter().any(|l| l.trim().starts_with("https "));
        self.http = addr(self.banner_url(if https { "https" } else { "http" }));
        self.quic = addr(self.banner_url("quic"));
        self.child = Some(child);
    }

    /// The URL the banner prints on its `label` line (`quic`, `http`, `ws`, `legacy`…).
    pub fn banner_url(&self, label: &str) -> String {
        self.banner
            .iter()
            .find_map(|line| {
                let rest = line.trim().strip_prefix(label)?;
                rest.starts_with(' ')
                    .then(|| rest.split_whitespace().next())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no {label} line in the banner: {:#?}", self.banner))
            .to_string()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Everything the broker has logged so far (all runs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("certs/ca.pem")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data/fastport.db")
    }

    pub fn quic_url(&self) -> String {
        format!("quic://{}", self.quic)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_terminate();
        self.wait_exit()
    }

    /// Sends SIGTERM and returns at once (see [`Broker::wait_exit`]).
    pub fn signal_terminate(&self) {
        self.signal("TERM");
    }

    /// Stops the broker (`SIGSTOP`) and waits until every thread of it has stopped: the
    /// signal is sent at once, but on a busy machine a thread can run on for a while.
    pub fn stop(&self) {
        self.signal("STOP");
        let pid = self.child.as_ref().expect("running").id();
        let stopped = || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
            tasks.flatten().all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the command name, which is in parentheses.
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('T') || state.is_empty()
            })
        };
        for _ in 0..500 {
            if stopped() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the broker did not stop within 5 s");
    }

    /// Sends the broker signal `name` (`TERM`, `STOP`…) and returns at once.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// Waits up to 10 s for the broker to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        for _ in 0..100 {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.kill().ok();
        panic!("broker did not exit within 10 s of SIGTERM");
    }

    /// Starts the broker again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the broker again on the same ports and data, with other extra arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Creates a session over HTTP; panics unless it succeeds.
    pub async fn create_session(&self, name: &str, password: &str, extra: Value) -> Value {
        let (status, body) = self.post_session(name, password, extra).await;
        assert_eq!(status, 200, "createSession failed: {body}");
        body
    }

    pub async fn post_session(&self, name: &str, password: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({"sessionName": name, "password": password});
        if let (Some(map), Value::Object(more)) = (body.as_object_mut(), extra) {
            map.extend(more);
        }
        self.post_json("/api/createSession", &body).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = within(
            "HTTP POST",
            reqwest::Client::new()
                .post(self.http_url(path))
                .json(body)
                .send(),
        )
        .await
        .expect("HTTP request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn client_config(&self, session: &str, password: &str, key: &SessionKey) -> ClientConfig {
        ClientConfig::new(self.quic_url(), session, password, key.clone()).ca_file(self.ca())
    }

    pub async fn client(&self, session: &str, password: &str, key: &SessionKey) -> Client {
        within(
            "connect",
            Client::connect(self.client_config(session, password, key)),
        )
        .await
        .expect("connect")
    }

    /// A client connected once the broker has room for it again (a limit was full,
    /// and a connection is on its way out): refused attempts are tried again.
    pub async fn client_when_room(
        &self,
        session: &str,
        password: &str,
        key: &SessionKey,
    ) -> Client {
        within("a freed slot", async {
            loop {
                match Client::connect(self.client_config(session, password, key)).await {
                    Ok(client) => return client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
    }

    /// A connected client with the client id `id`.
    pub async fn client_as(
        &self,
        id: &str,
        session: &str,
        password: &str,
        key: &SessionKey,
    ) -> Client {
        let config = self.client_config(session, password, key).client_id(id);
        within("connect", Client::connect(config))
            .await
            .expect("connect")
    }

    /// A raw frame-level connection with no Hello sent yet.
    pub async fn raw(&self) -> Raw {
        Raw::connect(&self.quic_url(), &self.ca()).await
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("--- last broker log lines ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Bytes of the database file, its WAL and its op log, for "is this on disk" checks.
pub fn db_bytes(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap_or_default();
    // The WAL, and the op log (commits not yet folded into the tables).
    for suffix in ["-wal", ".oplog"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        bytes.extend(std::fs::read(PathBuf::from(file)).unwrap_or_default());
    }
    bytes
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A connection that speaks frames directly, to do what the SDK never would.
pub struct Raw {
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Raw {
    pub async fn connect(url: &str, ca: &Path) -> Raw {
        let dialer =
            Dialer::new(BrokerUrl::parse(url).expect("url"), Some(ca), false).expect("dialer");
        let conn = within("dial", dialer.dial()).await.expect("dial");
        let (send, recv) = within("open stream", conn.open_bi())
            .await
            .expect("open_bi");
        Raw {
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(64 << 20),
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        within("write", self.send.write_all(bytes))
            .await
            .expect("write");
    }

    pub async fn send(&mut self, kind: client_frame::Kind) {
        let mut buf = BytesMut::new();
        framing::encode_frame(&ClientFrame { kind: Some(kind) }, &mut buf);
        self.send_bytes(&buf).await;
    }

    /// The next frame, or `None` if the stream ends or nothing arrives in `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<ServerFrame> {
        loop {
            if let Some(bytes) = self.decoder.next_frame().expect("broker framing") {
                return Some(framing::decode(bytes).expect("broker frame decodes"));
            }
            match tokio::time::timeout(wait, self.recv.read_chunk(65536, true)).await {
                Ok(Ok(Some(chunk))) => self.decoder.extend(&chunk.bytes),
                _ => return None,
            }
        }
    }

    pub async fn next(&mut self) -> server_frame::Kind {
        self.next_within(WAIT)
            .await
            .and_then(|f| f.kind)
            .expect("a frame from the broker")
    }

    pub async fn hello(
        &mut self,
        session: &str,
        password: &str,
        client_id: &str,
    ) -> server_frame::Kind {
        self.send(client_frame::Kind::Hello(fastport::proto::Hello {
            protocol_version: 1,
            session: session.into(),
            password: password.into(),
            client_id: client_id.into(),
            clean: false,
        }))
        .await;
        self.next().await
    }

    /// Opens a file stream, writes `bytes` on it (leaving it open) and returns the
    /// broker's answer on that stream.
    pub async fn upload(&self, bytes: &[u8]) -> server_frame::Kind {
        let (mut send, mut recv) = within("open a file stream", self.conn.open_bi())
            .await
            .expect("open_bi");
        within("write", send.write_all(bytes)).await.expect("write");
        let mut decoder = FrameDecoder::new(1 << 20);
        loop {
            if let Some(bytes) = decoder.next_frame().expect("broker framing") {
                let frame: ServerFrame = framing::decode(bytes).expect("broker frame decodes");
                return frame.kind.expect("a kind");
            }
            let chunk = within("the answer", recv.read_chunk(65536, true))
                .await
                .expect("read")
                .expect("an answer before the stream ends");
            decoder.extend(&chunk.bytes);
        }
    }

    /// Sends `Hello` and checks that the answer is `Welcome`.
    pub async fn login(&mut self, session: &str, password: &str, client_id: &str) {
        let answer = self.hello(session, password, client_id).await;
        assert!(
            matches!(answer, server_frame::Kind::Welcome(_)),
            "expected Welcome, got {answer:?}"
        );
    }

    /// Whether the broker closed the connection within `wait`.
    pub async fn closed_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.conn.closed()).await.is_ok()
    }
}

/// Frames as they go on a QUIC stream, each after its length.
pub fn stream_frames(kinds: impl IntoIterator<Item = client_frame::Kind>) -> BytesMut {
    let mut buf = BytesMut::new();
    for kind in kinds {
        framing::encode_frame(&ClientFrame { kind: Some(kind) }, &mut buf);
    }
    buf
}

/// Unwraps an `Error` frame's code.
/// A `Publish` of `id` on `topic` stamped `timestamp_ms`, with a stand-in payload: the
/// broker routes ciphertext it never opens.
pub fn publish(id: [u8; 16], topic: &str, timestamp_ms: u64) -> client_frame::Kind {
    client_frame::Kind::Publish(fastport::proto::Publish {
        message_id: Bytes::copy_from_slice(&id),
        topic: topic.into(),
        payload: Bytes::from_static(b"opaque ciphertext"),
        timestamp_ms,
        format: fastport::proto::PayloadFormat::NativeV1 as i32,
    })
}

pub fn error_code(kind: &server_frame::Kind) -> fastport::proto::ErrorCode {
    match kind {
        server_frame::Kind::Error(e) => {
            fastport::proto::ErrorCode::try_from(e.code).expect("known code")
        }
        other => panic!("expected Error, got {other:?}"),
    }
}

pub fn now_ms() -> u64 {
    fastport::driver::now_ms()
}

pub fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
