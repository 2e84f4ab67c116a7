//! The command-line client (`fastport pub`) against the real broker binary.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Broker, within};
use fastport::client::SessionKey;
use serde_json::json;

/// `fastport pub` with the flags that reach `broker`'s session `cli`.
fn pub_command(broker: &Broker, key: &SessionKey) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fastport"));
    command
        .arg("pub")
        .args(["--url", &broker.quic_url(), "--session", "cli"])
        .args(["--password", "secret-pass", "--key", &key.to_base64()])
        .arg("--ca")
        .arg(broker.ca());
    command
}

/// `--repeat` with `--in-flight 1` publishes one message at a time, every one of them
/// is delivered, and the report gives the rate and the PubAck latencies.
#[tokio::test]
async fn pub_repeats_one_at_a_time_and_reports_ack_latency() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("cli", "secret-pass", &key).await;
    let mut sub = reader.subscribe("jobs").await.expect("subscribe");

    let mut command = pub_command(&broker, &key);
    command.args(["--repeat", "20", "--in-flight", "1", "jobs", "work"]);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run fastport pub");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("published 20 messages"), "{stdout}");
    assert!(
        stdout.contains("acknowledged after p50 ") && stdout.contains("(1 in flight at most)"),
        "{stdout}"
    );
    for _ in 0..20 {
        let m = within("each published message", sub.next())
            .await
            .expect("message");
        assert_eq!(&m.payload[..], b"work");
    }
}

/// A window of no publishes is refused before connecting.
#[tokio::test]
async fn pub_refuses_an_empty_window() {
    let broker = Broker::start();
    let key = SessionKey::generate();
    let out = pub_command(&broker, &key)
        .args(["--in-flight", "0", "jobs", "x"])
        .output()
        .expect("run fastport pub");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--in-flight"), "{stderr}");
}

/// Lines from stdin go out in input order with the default window of 256 in flight
/// (design §4: per publisher and topic, in order).
#[tokio::test]
async fn pub_keeps_the_order_of_its_input() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("cli", "secret-pass", &key).await;
    let mut sub = reader.subscribe("seq").await.expect("subscribe");

    let mut child = pub_command(&broker, &key)
        .arg("seq")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run fastport pub");
    let lines: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(lines.as_bytes()).expect("write stdin");
    drop(stdin);
    for expected in 1..=2000 {
        let m = within("each line", sub.next()).await.expect("message");
        assert_eq!(
            std::str::from_utf8(&m.payload).expect("utf-8"),
            expected.to_string(),
            "message {expected} out of order"
        );
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("published 2000 messages"), "{stdout}");
}

/// Each line of stdin is published when it arrives, not when stdin ends, so
/// `tail -f log | fastport pub logs` works.
#[tokio::test]
async fn pub_publishes_each_line_as_it_arrives() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("cli", "secret-pass", &key).await;
    let mut sub = reader.subscribe("logs").await.expect("subscribe");

    let mut child = pub_command(&broker, &key)
        .arg("logs")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run fastport pub");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"first\n").expect("write stdin");
    stdin.flush().expect("flush stdin");
    let first = within("the first line, stdin still open", sub.next())
        .await
        .expect("message");
    assert_eq!(&first.payload[..], b"first");
    stdin.write_all(b"second\n").expect("write stdin");
    drop(stdin);
    let second = within("the second line", sub.next())
        .await
        .expect("message");
    assert_eq!(&second.payload[..], b"second");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(out.status.success());
}
