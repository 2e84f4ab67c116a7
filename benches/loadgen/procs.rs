//! The brokers under test as processes: fastPort started from the release binary, a
//! tuned Mosquitto started here, the machine's own Mosquitto and NATS; and readings of
//! their CPU time and memory from `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// CPU time (user + system) of a process so far.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// This process's own CPU time.
pub fn own_cpu() -> Duration {
    cpu_time(std::process::id())
}

/// A broker process started for the run (killed on drop).
pub struct Spawned {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fastPort broker on ephemeral ports with its own data directory.
pub struct Fastport {
    pub process: Spawned,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub ca: PathBuf,
}

impl Fastport {
    pub fn start(extra: &[String]) -> Result<Fastport> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastport"))
            .args(["serve", "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--certs-dir")
            .arg(dir.path().join("certs"))
            .args(["--create-session-limit", "100000"])
            .args(extra)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the fastport binary")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut quic, mut http) = (None, None);
        while quic.is_none() || http.is_none() {
            let Some(Ok(line)) = lines.next() else {
                bail!("fastport exited before printing its addresses");
            };
            let addr = |prefix: &str| {
                line.trim()
                    .strip_prefix(prefix)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            quic = quic.or(addr("quic   quic://"));
            http = http.or(addr("http   http://")).or(addr("https  https://"));
        }
        // Keep draining stdout so the broker never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let ca = dir.path().join("certs/ca.pem");
        Ok(Fastport {
            process: Spawned { child, _dir: dir },
            quic: quic.context("quic address")?,
            http: http.context("http address")?,
            ca,
        })
    }

    /// Creates a session with the given settings.
    pub async fn create_session(&self, name: &str, settings: serde_json::Value) -> Result<()> {
        let mut body = serde_json::json!({"sessionName": name, "password": "bench-password"});
        if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), settings) {
            b.extend(extra);
        }
        let response = reqwest::Client::new()
            .post(format!("http://{}/api/createSession", self.http))
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!(
                "createSession: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// A Mosquitto tuned for throughput and latency: Nagle off, no queue limit, no
/// persistence (it is an in-memory broker for QoS 1 here either way).
pub fn start_tuned_mosquitto() -> Result<(Spawned, u16)> {
    let port = free_tcp_port()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             set_tcp_nodelay true\nmax_queued_messages 0\nmax_inflight_messages 0\n\
             log_dest none\n"
        ),
    )?;
    let child = Command::new(mosquitto_binary())
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a tuned mosquitto")?;
    wait_for_port(port)?;
    Ok((Spawned { child, _dir: dir }, port))
}

/// A NATS server of our own (core only), for workloads that need a fresh process.
pub fn start_nats() -> Result<(Spawned, u16)> {
    let port = free_tcp_port()?;
    let dir = tempfile::tempdir()?;
    let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server");
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server")?;
    wait_for_port(port)?;
    Ok((Spawned { child, _dir: dir }, port))
}

/// The bare UDP relay of the latency workload: this binary as a child process.
pub fn start_udp_relay() -> Result<(Spawned, u16)> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--udp-relay-server", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the UDP relay")?;
    let stdout = child.stdout.take().context("relay stdout")?;
    let ready = BufReader::new(stdout).lines().next();
    let spawned = Spawned {
        child,
        _dir: tempfile::tempdir()?,
    };
    match ready {
        Some(Ok(line)) if line == "ready" => Ok((spawned, port)),
        _ => bail!("the UDP relay did not start"),
    }
}

fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16) -> Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port}")
}

/// The pid of a broker that runs outside the load generator (the machine's Mosquitto
/// or NATS).
pub fn pid_of(name: &str, pid_file: Option<&str>) -> Option<u32> {
    if let Some(file) = pid_file
        && let Ok(text) = std::fs::read_to_string(file)
        && let Ok(pid) = text.trim().parse()
    {
        return Some(pid);
    }
    let out = Command::new("pidof").arg(name).output().ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether something listens on a local TCP port.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
        .is_ok()
}
