//! What the load generator prints and keeps: one markdown table per workload, the
//! benchmark's targets as one row per run, and the JSON of every run. `--from-json`
//! reads saved runs back and prints the same tables without running anything, so
//! anyone can recompute a ratio, or line several runs up, from the raw figures.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::workloads::Sample;
use crate::{FP_DURABLE, FP_QUIC, FP_WS, JS, MQ1, MQ1T, RELAY, Workload};

/// Every run of every system: workload id → system → its runs.
pub type Results = BTreeMap<String, BTreeMap<String, Vec<Sample>>>;

/// What `--json` writes and `--from-json` reads.
#[derive(Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub quick: bool,
    pub runs: usize,
    pub results: Results,
}

impl Report {
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a load generator report", path.display()))?;
        // Files from before rounds were recorded list each system's runs in round order.
        for runs in report.results.values_mut().flat_map(|w| w.values_mut()) {
            for (i, sample) in runs.iter_mut().enumerate() {
                if sample.round == 0 {
                    sample.round = i + 1;
                }
            }
        }
        Ok(report)
    }
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{:.0}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// One workload's table: each system's median, min–max, losses, CPU and extras, then
/// fastPort's ratio to each peer (of the medians, and round by round).
pub fn print_table(w: &Workload, results: &BTreeMap<String, Vec<Sample>>) {
    println!("\n### {} — {}\n", w.id.to_uppercase(), w.title);
    println!(
        "| system | {} (median) | min–max | lost | broker CPU s | loadgen CPU s | extras (median) |",
        w.unit
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let mut medians = BTreeMap::new();
    for name in &w.systems {
        let Some(samples) = results.get(*name) else {
            continue;
        };
        let mut values: Vec<f64> = samples.iter().map(|s| s.value).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(*v), hi.max(*v))
            });
        let m = median(&mut values);
        medians.insert(name.to_string(), m);
        let lost: u64 = samples.iter().map(|s| s.lost).max().unwrap_or(0);
        let mut broker: Vec<f64> = samples.iter().map(|s| s.broker_cpu_s).collect();
        let mut gen_cpu: Vec<f64> = samples.iter().map(|s| s.loadgen_cpu_s).collect();
        let mut extras = Vec::new();
        if let Some(first) = samples.first() {
            for key in first.extra.keys() {
                let mut vs: Vec<f64> = samples
                    .iter()
                    .filter_map(|s| s.extra.get(key).copied())
                    .collect();
                extras.push(format!("{key} {}", fmt(median(&mut vs))));
            }
        }
        println!(
            "| {name} | {} | {}–{} | {lost} | {} | {} | {} |",
            fmt(m),
            fmt(lo),
            fmt(hi),
            fmt(median(&mut broker)),
            fmt(median(&mut gen_cpu)),
            extras.join(", ")
        );
    }
    if !w.ratios.is_empty() {
        println!();
        let better = if w.higher_is_better {
            "higher"
        } else {
            "lower"
        };
        for (fp, peer) in &w.ratios {
            if let (Some(a), Some(b)) = (medians.get(*fp), medians.get(*peer)) {
                let rounds = results
                    .get(*fp)
                    .zip(results.get(*peer))
                    .and_then(|(a, b)| per_round(a, b, w.higher_is_better))
                    .unwrap_or_default();
                println!(
                    "- {fp} / {peer} = **{:.2}×** ({better} is better{rounds})",
                    a / b
                );
            }
        }
    }
    if w.id == "w4" {
        print_latency_runs(w, results);
    }
}

/// W4's runs one by one: the host's stalls next to each run's p99 and p99.9, since a
/// run's tail is the host's as much as the broker's.
fn print_latency_runs(w: &Workload, results: &BTreeMap<String, Vec<Sample>>) {
    let rounds = results
        .values()
        .flat_map(|runs| runs.iter().map(|s| s.round))
        .max()
        .unwrap_or(0);
    if rounds == 0 {
        return;
    }
    println!("- Per run (the host's stalls, p99 and p99.9 in ms):\n");
    let heads: Vec<String> = (1..=rounds).map(|r| format!("run {r}")).collect();
    println!("| host stalls, p99 ms / p99.9 ms | {} |", heads.join(" | "));
    println!("|---|{}", "---|".repeat(rounds));
    for name in &w.systems {
        let Some(runs) = results.get(*name) else {
            continue;
        };
        let cells: Vec<String> = (1..=rounds)
            .map(|round| match runs.iter().find(|s| s.round == round) {
                Some(s) => {
                    let stalls = s.extra.get("host stalls").copied().unwrap_or(f64::NAN);
                    let p999 = s.extra.get("p99.9 µs").copied().unwrap_or(f64::NAN);
                    format!(
                        "{stalls:.0}, {:.2} / {:.2}",
                        s.value / 1000.0,
                        p999 / 1000.0
                    )
                }
                None => "–".into(),
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}

/// The spread of the ratio round by round, and in how many rounds fastPort won: the
/// two systems of a round ran minutes apart at most, so each round's ratio holds on
/// a machine whose speed drifts. `None` with fewer than two rounds both completed.
fn per_round(fastport: &[Sample], peer: &[Sample], higher_is_better: bool) -> Option<String> {
    let ratios: Vec<f64> = fastport
        .iter()
        .filter_map(|a| {
            let b = peer.iter().find(|b| b.round == a.round)?;
            // A peer run that delivered nothing has no ratio, only a failure to report.
            (b.value > 0.0).then(|| a.value / b.value)
        })
        .collect();
    if ratios.len() < 2 {
        return None;
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
    let won = ratios
        .iter()
        .filter(|r| {
            if higher_is_better {
                **r > 1.0
            } else {
                **r < 1.0
            }
        })
        .count();
    Some(format!(
        "; per round {lo:.2}–{hi:.2}×, fastPort ahead in {won} of {}",
        ratios.len()
    ))
}

/// One column of the targets table: its heading, its target, and how a run fares.
struct Target {
    heading: &'static str,
    target: &'static str,
    /// The run's figure(s) as shown, and whether they meet the target; `None` when
    /// the run lacks the workload or a system.
    cell: fn(&Results) -> Option<(String, bool)>,
}

/// The median headline figure of `system` in `workload`.
fn figure(r: &Results, workload: &str, system: &str) -> Option<f64> {
    let mut values: Vec<f64> = r
        .get(workload)?
        .get(system)?
        .iter()
        .map(|s| s.value)
        .collect();
    (!values.is_empty()).then(|| median(&mut values))
}

/// The median of one of the extras of `system` in `workload`.
fn extra(r: &Results, workload: &str, system: &str, key: &str) -> Option<f64> {
    let mut values: Vec<f64> = r
        .get(workload)?
        .get(system)?
        .iter()
        .filter_map(|s| s.extra.get(key).copied())
        .collect();
    (!values.is_empty()).then(|| median(&mut values))
}

fn ratio(r: &Results, workload: &str, fastport: &str, peer: &str) -> Option<f64> {
    Some(figure(r, workload, fastport)? / figure(r, workload, peer)?)
}

/// fastPort over QUIC against Mosquitto QoS 1's default and tuned configs.
fn against_mosquitto(r: &Results, workload: &str, met: fn(f64) -> bool) -> Option<(String, bool)> {
    let default = ratio(r, workload, FP_QUIC, MQ1)?;
    let tuned = ratio(r, workload, FP_QUIC, MQ1T)?;
    Some((
        format!("{default:.2}× / {tuned:.2}×"),
        met(default) && met(tuned),
    ))
}

/// The targets of the benchmark issue, in the order of its table.
const TARGETS: &[Target] = &[
    Target {
        heading: "W1 durable ÷ JetStream",
        target: "≥ 2×",
        cell: |r| ratio(r, "w1", FP_DURABLE, JS).map(|x| (format!("{x:.2}×"), x >= 2.0)),
    },
    Target {
        heading: "W1 ÷ Mosquitto QoS 1 (default / tuned)",
        target: "≥ 1.5×",
        cell: |r| against_mosquitto(r, "w1", |x| x >= 1.5),
    },
    Target {
        heading: "W2 ÷ Mosquitto QoS 1",
        target: "≥ 1.5×",
        cell: |r| against_mosquitto(r, "w2", |x| x >= 1.5),
    },
    Target {
        heading: "W3 ÷ Mosquitto QoS 1",
        target: "≥ 1×",
        cell: |r| against_mosquitto(r, "w3", |x| x >= 1.0),
    },
    Target {
        heading: "W4 p99 ÷ Mosquitto QoS 1",
        target: "≤ 1×",
        cell: |r| against_mosquitto(r, "w4", |x| x <= 1.0),
    },
    Target {
        heading: "W4 p99 / p99.9",
        target: "≤ 1 / 2 ms",
        cell: |r| {
            let p99 = figure(r, "w4", FP_QUIC)? / 1000.0;
            let p999 = extra(r, "w4", FP_QUIC, "p99.9 µs")? / 1000.0;
            Some((
                format!("{p99:.2} / {p999:.2} ms"),
                p99 <= 1.0 && p999 <= 2.0,
            ))
        },
    },
    Target {
        heading: "W7 ÷ quinn relay; peak RSS",
        target: "≥ 0.9×; ≤ 64 MiB",
        cell: |r| {
            let x = ratio(r, "w7", FP_QUIC, RELAY)?;
            let rss = extra(r, "w7", FP_QUIC, "broker peak RSS MiB")?;
            Some((format!("{x:.2}×; {rss:.1} MiB"), x >= 0.9 && rss <= 64.0))
        },
    },
    Target {
        heading: "W6 per connection, QUIC / WS",
        target: "≤ 48 / 16 KiB",
        cell: |r| {
            let quic = figure(r, "w6", FP_QUIC)?;
            let ws = figure(r, "w6", FP_WS)?;
            Some((
                format!("{quic:.1} / {ws:.1} KiB"),
                quic <= 48.0 && ws <= 16.0,
            ))
        },
    },
];

/// The targets, one row per run (`label`, report), each figure a ratio of medians in
/// that run; a figure that misses its target is marked ✗.
pub fn print_targets(runs: &[(String, &Report)]) {
    println!("\n### Targets, run by run\n");
    let headings: Vec<&str> = TARGETS.iter().map(|t| t.heading).collect();
    println!("| run | machine | {} |", headings.join(" | "));
    println!("|---|---|{}", "---|".repeat(TARGETS.len()));
    let targets: Vec<&str> = TARGETS.iter().map(|t| t.target).collect();
    println!("| *target* | | {} |", targets.join(" | "));
    for (label, report) in runs {
        let cells: Vec<String> = TARGETS
            .iter()
            .map(|t| match (t.cell)(&report.results) {
                Some((shown, true)) => shown,
                Some((shown, false)) => format!("{shown} ✗"),
                None => "–".into(),
            })
            .collect();
        let machine = report
            .machine
            .replace("(R)", "")
            .replace(" Processor", "")
            .replace("  ", " ");
        println!("| {label} | {machine} | {} |", cells.join(" | "));
    }
    println!(
        "\nEach figure is fastPort's (over QUIC, durable against JetStream) median against \
         the peer's in the same run; the W4 p99 ratio and latencies are lower-is-better. \
         ✗: the target was missed in that run. `–`: the run lacks that workload."
    );
}
