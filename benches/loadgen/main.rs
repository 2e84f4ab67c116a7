//! Load generator: the same workloads against fastPort (native QUIC, protobuf over
//! WebSocket, the legacy JSON bridge), Mosquitto (MQTT QoS 0/1, default and tuned
//! config) and NATS (core and JetStream), side by side on this machine.
//!
//! ```text
//! cargo bench --bench loadgen -- [--quick] [--runs N] [--json PATH]
//!                                [--workloads w1,w2,...] [--systems SUBSTRING,...]
//!                                [--broker-arg=--flag=value ...]
//! ```
//!
//! It starts fastPort from the release binary and a tuned Mosquitto itself; the
//! machine's Mosquitto (127.0.0.1:1883) and NATS with JetStream (127.0.0.1:4222) must
//! be running. Every figure is the median of `--runs` runs with its min–max; the runs
//! of a workload go round by round (each system once per round), and ratios are
//! computed within the same invocation, so they hold on a noisy machine where the
//! absolute numbers do not.

mod floor;
mod procs;
mod relay;
mod report;
mod systems;
mod workloads;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fastport::client::SessionKey;

use report::{Report, Results, fmt, print_table, print_targets};
use systems::{Env, Kind, System};
use workloads::Sample;

/// The generator allocates per message for every system it drives (payloads, frames,
/// channels); a fast allocator keeps its own share of the two cores small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "fastPort vs Mosquitto vs NATS, same workloads, same machine")]
struct Args {
    /// A few seconds per workload (smaller counts), for a cheap rerun.
    #[arg(long)]
    quick: bool,
    /// Runs per system and workload (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also write every run's raw figures here, as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run nothing: print the tables of runs saved with `--json` (repeatable, or
    /// comma-separated), then their targets side by side, one row per file.
    #[arg(long, value_delimiter = ',')]
    from_json: Vec<std::path::PathBuf>,
    /// Workloads to run (w1..w7).
    #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4,w6,w5,w7")]
    workloads: Vec<String>,
    /// Only systems whose name contains one of these (`=NAME` for exactly NAME).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// One more flag for the fastPort broker, e.g. `--broker-arg=--threads=1`
    /// (repeatable): to measure a setting against the default in the same way.
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    broker_args: Vec<String>,
    /// cargo bench passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run as the bare quinn relay on this UDP port.
    #[arg(long, hide = true)]
    relay_server: Option<u16>,
    #[arg(long, hide = true)]
    relay_cert: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    relay_key: Option<std::path::PathBuf>,
    /// Internal: run as the bare UDP relay of the latency workload on this port.
    #[arg(long, hide = true)]
    udp_relay_server: Option<u16>,
}

/// One workload's definition.
struct Workload {
    id: &'static str,
    title: String,
    unit: &'static str,
    /// Higher is better (throughput) or lower (latency, memory).
    higher_is_better: bool,
    systems: Vec<&'static str>,
    /// (fastPort row, peer row) pairs whose ratio is reported.
    ratios: Vec<(&'static str, &'static str)>,
}

const FP_QUIC: &str = "fastPort QUIC";
const FP_DURABLE: &str = "fastPort QUIC durable";
const FP_WS: &str = "fastPort WS (/v1/ws)";
const FP_LEGACY: &str = "fastPort legacy JSON";
const MQ1: &str = "Mosquitto QoS1 default";
const MQ1T: &str = "Mosquitto QoS1 tuned";
const MQ0: &str = "Mosquitto QoS0 default";
const MQ0T: &str = "Mosquitto QoS0 tuned";
const NATS: &str = "NATS core";
const JS: &str = "NATS JetStream";
const RELAY: &str = "bare quinn relay";
const FLOOR: &str = "bare UDP relay (floor)";

/// A count as the tables print it: 100,000.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn plan(quick: bool) -> Vec<Workload> {
    let n = |q: u64, f: u64| thousands(if quick { q } else { f });
    vec![
        Workload {
            id: "w1",
            title: format!("1 → 1, 128 B, {} messages (msgs/s)", n(20_000, 100_000)),
            unit: "msgs/s",
            higher_is_better: true,
            systems: vec![
                FP_DURABLE, FP_QUIC, FP_WS, FP_LEGACY, JS, MQ1, MQ1T, NATS, MQ0, MQ0T,
            ],
            ratios: vec![
                (FP_DURABLE, JS),
                (FP_QUIC, MQ1),
                (FP_QUIC, MQ1T),
                (FP_QUIC, NATS),
            ],
        },
        Workload {
            id: "w2",
            title: format!(
                "1 → 16, 128 B, {} messages (deliveries/s)",
                n(5_000, 20_000)
            ),
            unit: "deliveries/s",
            higher_is_better: true,
            systems: vec![
                FP_QUIC, FP_DURABLE, FP_WS, FP_LEGACY, JS, MQ1, MQ1T, NATS, MQ0T,
            ],
            ratios: vec![(FP_QUIC, MQ1), (FP_QUIC, MQ1T), (FP_DURABLE, JS)],
        },
        Workload {
            id: "w3",
            title: format!(
                "100 publishers × 100 topics → 100 subscribers, 128 B, {} per publisher (msgs/s)",
                n(300, 1_000)
            ),
            unit: "msgs/s",
            higher_is_better: true,
            systems: vec![FP_QUIC, FP_WS, FP_LEGACY, MQ1, MQ1T, NATS, MQ0T],
            ratios: vec![(FP_QUIC, MQ1), (FP_QUIC, MQ1T)],
        },
        Workload {
            id: "w4",
            title: format!(
                "latency at a paced 10,000 msg/s for {} s after 1 s of warm-up, 128 B (p99; p50, p99.9 in extras)",
                n(3, 10)
            ),
            unit: "p99 µs",
            higher_is_better: false,
            systems: vec![
                FP_QUIC, FP_DURABLE, FP_WS, FP_LEGACY, MQ1, MQ1T, JS, NATS, MQ0T, FLOOR,
            ],
            ratios: vec![
                (FP_QUIC, MQ1),
                (FP_QUIC, MQ1T),
                (FP_DURABLE, JS),
                (FP_QUIC, FLOOR),
            ],
        },
        Workload {
            id: "w6",
            title: format!(
                "{} idle subscribed connections: broker RSS per connection",
                n(1_000, 10_000)
            ),
            unit: "KiB/conn",
            higher_is_better: false,
            systems: vec![FP_QUIC, FP_WS, MQ1T, NATS],
            ratios: vec![(FP_QUIC, MQ1T), (FP_WS, MQ1T), (FP_QUIC, NATS)],
        },
        Workload {
            id: "w5",
            title: format!(
                "1 → 1, 1 MiB messages (1,047,552 B: NATS's max_payload), {} messages",
                n(30, 100)
            ),
            unit: "MB/s",
            higher_is_better: true,
            systems: vec![FP_QUIC, FP_DURABLE, MQ1T, JS, NATS],
            ratios: vec![(FP_QUIC, MQ1T), (FP_DURABLE, JS), (FP_QUIC, NATS)],
        },
        Workload {
            id: "w7",
            title: format!(
                "one {} file → 2 subscribers (64 KiB sealed chunks, fresh broker per run)",
                if quick { "128 MiB" } else { "1 GiB" }
            ),
            unit: "MB/s",
            higher_is_better: true,
            systems: vec![FP_QUIC, RELAY],
            ratios: vec![(FP_QUIC, RELAY)],
        },
    ]
}

async fn run_one(workload: &str, system: &System, env: &Env, quick: bool) -> Result<Sample> {
    let n = |q: u64, f: u64| if quick { q } else { f };
    let quiet = Duration::from_secs(if quick { 3 } else { 10 });
    match workload {
        "w1" => workloads::throughput(system, env, 1, 1, n(20_000, 100_000), 128, quiet).await,
        "w2" => workloads::throughput(system, env, 1, 16, n(5_000, 20_000), 128, quiet).await,
        "w3" => workloads::throughput(system, env, 100, 1, n(300, 1_000), 128, quiet).await,
        "w4" => workloads::latency(system, env, 10_000, Duration::from_secs(n(3, 10)), 128).await,
        "w5" => {
            let mut s =
                workloads::throughput(system, env, 1, 1, n(30, 100), 1_047_552, quiet).await?;
            s.value = s.extra.get("MB/s").copied().unwrap_or(0.0);
            Ok(s)
        }
        "w6" => {
            // Memory per connection needs a broker that has done nothing else yet:
            // allocators keep freed memory, which earlier workloads would lend to
            // these connections. So each run gets a fresh broker process.
            let count = n(1_000, 10_000) as usize;
            let (system, env, _fresh) = fresh_broker(system, env).await?;
            workloads::idle_connections(&system, &env, count).await
        }
        "w7" => {
            let size = n(128 << 20, 1 << 30);
            if system.kind == Kind::Relay {
                workloads::file_relay(size).await
            } else {
                // The broker's peak memory is a figure here: a fresh process, like the
                // relay's, not one that kept what earlier workloads allocated.
                let (system, env, _fresh) = fresh_broker(system, env).await?;
                workloads::file_fanout(&system, &env, size).await
            }
        }
        other => bail!("unknown workload {other}"),
    }
}

/// A broker process of its own for one run of `system`, and the system and
/// environment pointing at it; the process ends when the box is dropped.
async fn fresh_broker(system: &System, env: &Env) -> Result<(System, Env, Box<dyn std::any::Any>)> {
    let mut env = env.clone();
    let mut system = system.clone();
    let fresh: Box<dyn std::any::Any> = match &system.kind {
        Kind::Fastport { .. } | Kind::FastportLegacy => {
            let fp = procs::Fastport::start(&env.broker_args)?;
            fp.create_session(&env.session, serde_json::json!({}))
                .await?;
            env.fastport_quic = format!("quic://{}", fp.quic);
            env.fastport_http = fp.http.to_string();
            env.fastport_ca = fp.ca.clone();
            system.pid = Some(fp.process.pid());
            Box::new(fp)
        }
        Kind::Mosquitto { qos1, .. } => {
            let (proc_, port) = procs::start_tuned_mosquitto()?;
            system.kind = Kind::Mosquitto { port, qos1: *qos1 };
            system.pid = Some(proc_.pid());
            Box::new(proc_)
        }
        Kind::Relay | Kind::UdpRelay { .. } => bail!("the relays are not brokers"),
        Kind::NatsCore | Kind::NatsJetStream => {
            let (proc_, port) = procs::start_nats()?;
            env.nats_url = format!("nats://127.0.0.1:{port}");
            system.kind = Kind::NatsCore;
            system.pid = Some(proc_.pid());
            Box::new(proc_)
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((system, env, fresh))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(port) = args.udp_relay_server {
        return floor::serve_udp_relay(port);
    }
    if let (Some(port), Some(cert), Some(key)) =
        (args.relay_server, &args.relay_cert, &args.relay_key)
    {
        return relay::serve(port, cert, key).await;
    }
    if !args.from_json.is_empty() {
        return reprint(&args.from_json);
    }
    if !procs::port_open(1883) {
        bail!("Mosquitto is not running on 127.0.0.1:1883 (see DEVELOPERS.md to start it)");
    }
    if !procs::port_open(4222) {
        bail!("NATS is not running on 127.0.0.1:4222 (start it with JetStream: -js)");
    }
    let fastport = procs::Fastport::start(&args.broker_args).context("starting fastPort")?;
    fastport
        .create_session("bench", serde_json::json!({}))
        .await?;
    let (tuned, tuned_port) = procs::start_tuned_mosquitto()?;
    let mosquitto_pid = procs::pid_of("mosquitto", Some("/run/mosquitto/mosquitto.pid"));
    let nats_pid = procs::pid_of("nats-server", None);
    let fp_pid = Some(fastport.process.pid());
    let (udp_relay, udp_relay_port) = procs::start_udp_relay()?;

    let system = |name: &str, kind: Kind, pid| System {
        name: name.to_owned(),
        kind,
        pid,
    };
    let all = vec![
        system(
            FP_QUIC,
            Kind::Fastport {
                ws: false,
                durable: false,
            },
            fp_pid,
        ),
        system(
            FP_DURABLE,
            Kind::Fastport {
                ws: false,
                durable: true,
            },
            fp_pid,
        ),
        system(
            FP_WS,
            Kind::Fastport {
                ws: true,
                durable: false,
            },
            fp_pid,
        ),
        system(FP_LEGACY, Kind::FastportLegacy, fp_pid),
        system(
            MQ1,
            Kind::Mosquitto {
                port: 1883,
                qos1: true,
            },
            mosquitto_pid,
        ),
        system(
            MQ1T,
            Kind::Mosquitto {
                port: tuned_port,
                qos1: true,
            },
            Some(tuned.pid()),
        ),
        system(
            MQ0,
            Kind::Mosquitto {
                port: 1883,
                qos1: false,
            },
            mosquitto_pid,
        ),
        system(
            MQ0T,
            Kind::Mosquitto {
                port: tuned_port,
                qos1: false,
            },
            Some(tuned.pid()),
        ),
        system(NATS, Kind::NatsCore, nats_pid),
        system(JS, Kind::NatsJetStream, nats_pid),
        system(RELAY, Kind::Relay, None),
        system(
            FLOOR,
            Kind::UdpRelay {
                port: udp_relay_port,
            },
            Some(udp_relay.pid()),
        ),
    ];
    let mut env = Env {
        fastport_quic: format!("quic://{}", fastport.quic),
        fastport_http: fastport.http.to_string(),
        fastport_ca: fastport.ca.clone(),
        session: "bench".into(),
        key: SessionKey::generate(),
        nats_url: "nats://127.0.0.1:4222".into(),
        broker_args: args.broker_args.clone(),
        run: 0,
    };

    println!(
        "# fastPort load generator ({})",
        if args.quick { "quick" } else { "full" }
    );
    println!(
        "\nMachine: {}. Runs per figure: {}. Brokers: fastPort {} (release, SQLite), Mosquitto 1883 (machine config) and {tuned_port} (tuned), NATS 127.0.0.1:4222 (JetStream file storage).",
        machine(),
        args.runs,
        env!("CARGO_PKG_VERSION")
    );
    let mut results = Results::new();
    for w in plan(args.quick) {
        if !args.workloads.iter().any(|x| x == w.id) {
            continue;
        }
        let wanted = |name: &str| {
            args.systems.is_empty()
                || args.systems.iter().any(|f| match f.strip_prefix('=') {
                    Some(exact) => name == exact,
                    None => name.contains(f.as_str()),
                })
        };
        let systems: Vec<&System> = w
            .systems
            .iter()
            .filter(|name| wanted(name))
            .filter_map(|name| all.iter().find(|s| s.name == *name))
            .collect();
        // Round by round, every system once per round: the VM's speed drifts over
        // minutes, and interleaving makes the drift hit every system alike. Each
        // round starts one system further on, and every other round goes backwards,
        // so that no system is always the one run first, or always right after the
        // same heavy one (JetStream's disk writes, a 1 GiB file) whose aftermath it
        // would pay for.
        for run in 0..args.runs {
            let n = systems.len();
            for turn in 0..n {
                let i = if run % 2 == 0 {
                    (run + turn) % n
                } else {
                    (run % n + n - turn) % n
                };
                let system = systems[i];
                let name = &system.name;
                env.run += 1;
                eprint!("{} {} run {}/{} … ", w.id, name, run + 1, args.runs);
                match run_one(w.id, system, &env, args.quick).await {
                    Ok(mut sample) => {
                        sample.round = run + 1;
                        eprintln!("{} {} (lost {})", fmt(sample.value), w.unit, sample.lost);
                        results
                            .entry(w.id.to_owned())
                            .or_default()
                            .entry(name.to_string())
                            .or_default()
                            .push(sample);
                    }
                    Err(e) => eprintln!("failed: {e:#}"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if let Some(r) = results.get(w.id) {
            print_table(&w, r);
        }
    }
    let report = Report {
        machine: machine(),
        quick: args.quick,
        runs: args.runs,
        results,
    };
    print_targets(&[("this run".to_owned(), &report)]);
    if let Some(path) = &args.json {
        report.save(path)?;
        eprintln!("raw figures written to {}", path.display());
    }
    drop(udp_relay);
    drop(tuned);
    drop(fastport);
    Ok(())
}

/// `--from-json`: each saved run's tables, as the run printed them, then the targets
/// of all of them side by side.
fn reprint(paths: &[std::path::PathBuf]) -> Result<()> {
    let mut reports = Vec::new();
    for path in paths {
        let report = Report::load(path)?;
        println!(
            "\n## {} — {}, {} run(s) per figure{}",
            path.display(),
            report.machine,
            report.runs,
            if report.quick { ", quick" } else { "" }
        );
        for w in plan(report.quick) {
            if let Some(r) = report.results.get(w.id) {
                print_table(&w, r);
            }
        }
        let label = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        reports.push((label, report));
    }
    let runs: Vec<(String, &Report)> = reports.iter().map(|(l, r)| (l.clone(), r)).collect();
    print_targets(&runs);
    Ok(())
}
