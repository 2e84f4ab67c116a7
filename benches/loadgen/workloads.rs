//! The workloads, each run the same way against every system.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::procs;
use crate::systems::{Env, Publisher, System};

/// One measurement of one system.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// The headline figure (msgs/s, deliveries/s, µs, MB/s, KiB …).
    pub value: f64,
    /// Messages sent but never received.
    pub lost: u64,
    pub elapsed_s: f64,
    /// CPU seconds the broker used during the run.
    pub broker_cpu_s: f64,
    /// CPU seconds the load generator used during the run.
    pub loadgen_cpu_s: f64,
    /// Secondary figures (percentiles, memory).
    pub extra: BTreeMap<String, f64>,
    /// The round it ran in, from 1: each round runs every system once. (Files saved
    /// before rounds were recorded lack it; [`crate::report::Report::load`] numbers them.)
    #[serde(default)]
    pub round: usize,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Payload: publisher id (u32), sequence (u64), send time (u64 ns), then padding.
fn payload(publisher: u32, seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(20));
    b.put_u32(publisher);
    b.put_u64(seq);
    b.put_u64(now_ns());
    b.resize(size.max(20), 0);
    b.freeze()
}

fn parse(p: &[u8]) -> Option<(u32, u64, u64)> {
    if p.len() < 20 {
        return None;
    }
    let pid = u32::from_be_bytes(p[0..4].try_into().ok()?);
    let seq = u64::from_be_bytes(p[4..12].try_into().ok()?);
    let sent = u64::from_be_bytes(p[12..20].try_into().ok()?);
    Some((pid, seq, sent))
}

struct Meter {
    pid: Option<u32>,
    broker0: Duration,
    gen0: Duration,
}

impl Meter {
    fn start(system: &System) -> Meter {
        Meter {
            pid: system.pid,
            broker0: system.pid.map_or(Duration::ZERO, procs::cpu_time),
            gen0: procs::own_cpu(),
        }
    }

    fn finish(self, sample: &mut Sample) {
        if let Some(pid) = self.pid {
            sample.broker_cpu_s = procs::cpu_time(pid)
                .saturating_sub(self.broker0)
                .as_secs_f64();
        }
        sample.loadgen_cpu_s = (procs::own_cpu().saturating_sub(self.gen0)).as_secs_f64();
    }
}

/// Throughput: `topics` publishers (one per topic), `fanout` subscribers per topic,
/// `per_publisher` messages of `size` bytes each. The value is deliveries per second.
pub async fn throughput(
    system: &System,
    env: &Env,
    topics: usize,
    fanout: usize,
    per_publisher: u64,
    size: usize,
    quiet: Duration,
) -> Result<Sample> {
    system.prepare(env).await?;
    let topic = |t: usize| format!("bench/t{t}");
    let mut receivers = Vec::new();
    for t in 0..topics {
        for k in 0..fanout {
            let mut sub = system.subscriber(env, t * fanout + k, &topic(t)).await?;
            receivers.push(tokio::spawn(async move {
                let mut seen = vec![false; per_publisher as usize];
                let (mut unique, mut bytes, mut last) = (0u64, 0u64, None);
                while unique < per_publisher {
                    match tokio::time::timeout(quiet, sub.next()).await {
                        Ok(Some(p)) => {
                            if let Some((_, seq, _)) = parse(&p)
                                && let Some(slot) = seen.get_mut(seq as usize)
                                && !*slot
                            {
                                *slot = true;
                                unique += 1;
                                bytes += p.len() as u64;
                                last = Some(Instant::now());
                            }
                        }
                        _ => break,
                    }
                }
                sub.close().await;
                (unique, bytes, last)
            }));
        }
    }
    let mut publishers = Vec::new();
    for t in 0..topics {
        publishers.push(system.publisher(env, t).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let meter = Meter::start(system);
    let rss = RssSampler::start(system.pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (t, mut publisher) in publishers.into_iter().enumerate() {
        let topic = topic(t);
        tasks.push(tokio::spawn(async move {
            for seq in 0..per_publisher {
                publisher.send(&topic, payload(t as u32, seq, size)).await?;
            }
            publisher.drain().await?;
            anyhow::Ok(publisher)
        }));
    }
    let mut keep = Vec::new();
    for task in tasks {
        keep.push(task.await??);
    }
    let (mut received, mut bytes, mut last) = (0u64, 0u64, start);
    for r in receivers {
        let (unique, b, at) = r.await?;
        received += unique;
        bytes += b;
        if let Some(at) = at {
            last = last.max(at);
        }
    }
    let elapsed = (last - start).as_secs_f64().max(1e-6);
    let expected = topics as u64 * fanout as u64 * per_publisher;
    let mut sample = Sample {
        value: received as f64 / elapsed,
        lost: expected.saturating_sub(received),
        elapsed_s: elapsed,
        ..Sample::default()
    };
    sample
        .extra
        .insert("MB/s".into(), bytes as f64 / elapsed / 1e6);
    if let Some(peak) = rss.finish().await {
        sample
            .extra
            .insert("broker peak RSS MiB".into(), peak as f64 / (1 << 20) as f64);
    }
    meter.finish(&mut sample);
    futures::future::join_all(keep.into_iter().map(Publisher::close)).await;
    Ok(sample)
}

/// Messages of the warm-up (publisher id 1): paced like the rest, not measured.
const WARM_UP: u32 = 1;

/// Latency at a paced rate: one publisher, one subscriber, `rate` messages per second
/// for `duration`, after a second at the same rate that is not measured (every system
/// starts warm: the first seconds after a pause fault in memory, fill caches and grow
/// tables, which is not what a steady load costs). The value is the p99 in
/// microseconds; p50, p99.9 and the machine's stalls in the run are extras.
pub async fn latency(
    system: &System,
    env: &Env,
    rate: u64,
    duration: Duration,
    size: usize,
) -> Result<Sample> {
    system.prepare(env).await?;
    let topic = "bench/lat";
    let total = rate * duration.as_millis() as u64 / 1000;
    let mut sub = system.subscriber(env, 0, topic).await?;
    let burst = Pace::burst(rate);
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        let mut shape = BurstShape::default();
        while (latencies.len() as u64) < total {
            match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                Ok(Some(p)) => {
                    if let Some((publisher, seq, sent)) = parse(&p)
                        && publisher != WARM_UP
                    {
                        let latency = now_ns().saturating_sub(sent);
                        latencies.push(latency);
                        shape.record(seq % burst, burst, latency);
                    }
                }
                _ => break,
            }
        }
        sub.close().await;
        (latencies, shape)
    });
    let mut publisher = system.publisher(env, 0).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut pace = Pace::new(rate);
    pace.send(&mut publisher, topic, WARM_UP, rate, size)
        .await?;

    let meter = Meter::start(system);
    let probe = crate::floor::StallProbe::start();
    let start = Instant::now();
    pace.send(&mut publisher, topic, 0, total, size).await?;
    publisher.drain().await?;
    let (mut latencies, mut shape) = receiver.await?;
    let stalls = probe.finish();
    publisher.close().await;
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| percentile_us(&latencies, p);
    let mut sample = Sample {
        value: pct(0.99),
        lost: total.saturating_sub(latencies.len() as u64),
        elapsed_s: elapsed,
        ..Sample::default()
    };
    sample.extra.insert("p50 µs".into(), pct(0.50));
    sample.extra.insert("p99 µs".into(), pct(0.99));
    sample.extra.insert("p99.9 µs".into(), pct(0.999));
    sample
        .extra
        .insert("host stalls".into(), stalls.map_or(f64::NAN, f64::from));
    sample
        .extra
        .insert("p50 first of burst µs".into(), median_us(&mut shape.first));
    sample
        .extra
        .insert("p50 last of burst µs".into(), median_us(&mut shape.last));
    meter.finish(&mut sample);
    Ok(sample)
}

/// Latencies of the first and the last message of each burst the publisher sends. A
/// broker that handles a burst as one batch delivers its first message as late as its
/// last; one that pipelines delivers the first sooner.
#[derive(Default)]
struct BurstShape {
    first: Vec<u64>,
    last: Vec<u64>,
}

impl BurstShape {
    fn record(&mut self, position: u64, burst: u64, latency: u64) {
        if position == 0 {
            self.first.push(latency);
        }
        if position + 1 == burst {
            self.last.push(latency);
        }
    }
}

/// The `p` percentile of sorted latencies in nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn median_us(ns: &mut [u64]) -> f64 {
    ns.sort_unstable();
    percentile_us(ns, 0.5)
}

/// A steady rate in bursts of `rate / 1000` messages every millisecond; a late tick
/// sends its burst at once rather than skipping it.
struct Pace {
    tick: tokio::time::Interval,
    per_tick: u64,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Pace {
            tick,
            per_tick: Pace::burst(rate),
        }
    }

    /// Messages sent on each tick.
    fn burst(rate: u64) -> u64 {
        (rate / 1000).max(1)
    }

    /// Sends `count` messages as publisher `id` at the pace, continuing its ticks.
    async fn send(
        &mut self,
        publisher: &mut Publisher,
        topic: &str,
        id: u32,
        count: u64,
        size: usize,
    ) -> Result<()> {
        let mut seq = 0u64;
        while seq < count {
            self.tick.tick().await;
            for _ in 0..self.per_tick.min(count - seq) {
                publisher.send(topic, payload(id, seq, size)).await?;
                seq += 1;
            }
        }
        Ok(())
    }
}

/// Idle connections: opens `count` authenticated, subscribed connections and reads the
/// broker's memory per connection (KiB, the value) and the connect rate.
pub async fn idle_connections(system: &System, env: &Env, count: usize) -> Result<Sample> {
    system.prepare(env).await?;
    let pid = system.pid;
    let rss0 = pid.map_or(0, procs::rss);
    let meter = Meter::start(system);
    let start = Instant::now();
    let url = fastport::client::BrokerUrl::parse(&env.fastport_quic)?;
    let dialer = fastport::client::transport::Dialer::new(url, Some(&env.fastport_ca), false)?;
    let dialer = &dialer;
    let mut held = Vec::with_capacity(count);
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    use futures::StreamExt;
    while held.len() < count {
        while next < count && pending.len() < 64 {
            let id = 100_000 + next;
            pending.push(async move { system.idle(env, id, dialer).await });
            next += 1;
        }
        match pending.next().await {
            Some(conn) => held.push(conn?),
            None => break,
        }
    }
    let connect_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = pid.map_or(0, procs::rss);
    let mut sample = Sample {
        value: rss1.saturating_sub(rss0) as f64 / count as f64 / 1024.0,
        elapsed_s: connect_s,
        ..Sample::default()
    };
    sample
        .extra
        .insert("connects/s".into(), count as f64 / connect_s);
    sample
        .extra
        .insert("broker RSS MiB".into(), rss1 as f64 / (1 << 20) as f64);
    meter.finish(&mut sample);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(sample)
}

/// One file of `size` bytes through fastPort to two subscribers. The value is MB/s
/// (of file content, per receiver); the broker's peak RSS is an extra.
pub async fn file_fanout(system: &System, env: &Env, size: u64) -> Result<Sample> {
    let topic = "bench/file";
    let mut readers = Vec::new();
    for _ in 0..2 {
        let client = crate::systems::fastport_client(env, &system.kind, None).await?;
        let mut files = client.subscribe_files(topic).await?;
        readers.push(tokio::spawn(async move {
            let _client = client;
            let mut file = files
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("no file"))?;
            let mut bytes = 0u64;
            while let Some(chunk) = file.next_chunk().await {
                bytes += chunk?.len() as u64;
            }
            anyhow::Ok(bytes)
        }));
    }
    let sender = crate::systems::fastport_client(env, &system.kind, None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let meter = Meter::start(system);
    let rss = RssSampler::start(system.pid);
    let start = Instant::now();
    use tokio::io::AsyncReadExt;
    sender
        .send_file(topic, "big.bin", tokio::io::repeat(7).take(size), size)
        .await?;
    let mut lost = 0;
    for reader in readers {
        let got = reader.await??;
        lost += size.saturating_sub(got);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut sample = Sample {
        value: size as f64 / elapsed / 1e6,
        lost,
        elapsed_s: elapsed,
        ..Sample::default()
    };
    if let Some(peak) = rss.finish().await {
        sample
            .extra
            .insert("broker peak RSS MiB".into(), peak as f64 / (1 << 20) as f64);
    }
    meter.finish(&mut sample);
    Ok(sample)
}

/// The same file through the bare quinn relay (a child process).
pub async fn file_relay(size: u64) -> Result<Sample> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = crate::relay::make_cert(dir.path())?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--relay-server", &port.to_string()])
        .arg("--relay-cert")
        .arg(&cert)
        .arg("--relay-key")
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("relay stdout"))?;
    std::io::BufRead::lines(std::io::BufReader::new(stdout)).next();
    let system = System {
        name: "relay".into(),
        kind: crate::systems::Kind::Relay,
        pid: Some(child.id()),
    };
    let meter = Meter::start(&system);
    let rss = RssSampler::start(system.pid);
    let result = crate::relay::transfer(port, &cert, size).await;
    let peak = rss.finish().await;
    let mut sample = Sample::default();
    meter.finish(&mut sample); // before the process is gone
    let _ = child.kill();
    let _ = child.wait();
    let elapsed = result?;
    sample.value = size as f64 / elapsed / 1e6;
    sample.elapsed_s = elapsed;
    if let Some(peak) = peak {
        sample
            .extra
            .insert("broker peak RSS MiB".into(), peak as f64 / (1 << 20) as f64);
    }
    Ok(sample)
}

/// Samples a process's RSS every 20 ms and keeps the peak.
struct RssSampler {
    task: Option<(
        tokio::task::JoinHandle<u64>,
        tokio::sync::oneshot::Sender<()>,
    )>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> RssSampler {
        let Some(pid) = pid else {
            return RssSampler { task: None };
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            loop {
                peak = peak.max(procs::rss(pid));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = &mut stopped => return peak,
                }
            }
        });
        RssSampler {
            task: Some((task, stop)),
        }
    }

    async fn finish(self) -> Option<u64> {
        let (task, stop) = self.task?;
        let _ = stop.send(());
        task.await.ok()
    }
}
