//! The command-line client (`fastport pub`) against the real broker binary.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Broker, durable, within};
use fastport::client::SessionKey;
use serde_json::json;

/// `fastport <client command>` with the flags that reach `broker`'s session `cli`.
fn client_command(command: &str, broker: &Broker, key: &SessionKey) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastport"));
    cmd.arg(command)
        .args(["--url", &broker.quic_url(), "--session", "cli"])
        .args(["--password", "secret-pass", "--key", &key.to_base64()])
        .arg("--ca")
        .arg(broker.ca());
    cmd
}

/// Waits until `child`'s first line on stderr says `started`.
async fn started(child: &mut std::process::Child, started: &'static str) {
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let said = tokio::task::spawn_blocking(move || lines.next())
        .await
        .expect("join");
    assert!(
        said.is_some_and(|l| l.is_ok_and(|l| l.contains(started))),
        "no {started:?}: the command did not start"
    );
}

/// Waits until `child`'s first line on stderr says `started`, then sends it SIGINT
/// (Ctrl-C).
async fn started_then_interrupted(child: &mut std::process::Child, says: &'static str) {
    started(child, says).await;
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(interrupted.success());
}

/// `child`'s output once it exits; panics if it is still running after 15 s.
async fn exit_within_15s(mut child: std::process::Child, when: &str) -> std::process::Output {
    let when = when.to_owned();
    tokio::task::spawn_blocking(move || {
        for _ in 0..150 {
            if child.try_wait().expect("wait").is_some() {
                return child.wait_with_output().expect("output");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        child.kill().ok();
        panic!("still running 15 s {when}");
    })
    .await
    .expect("join")
}

/// `fastport pub` for `broker`'s session `cli`.
fn pub_command(broker: &Broker, key: &SessionKey) -> Command {
    client_command("pub", broker, key)
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

/// A broker that goes away mid-run does not leave `pub` waiting for ever: it gives
/// up after `--timeout` with the reason, and exits non-zero.
#[tokio::test]
async fn pub_gives_up_when_the_broker_is_gone() {
    let mut broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("cli", "secret-pass", &key).await;
    let mut sub = reader.subscribe("jobs").await.expect("subscribe");
    let child = pub_command(&broker, &key)
        .args(["--timeout", "2", "--in-flight", "1"])
        .args(["--repeat", "1000000000", "jobs", "work"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fastport pub");
    within("pub publishing", sub.next())
        .await
        .expect("a message");
    broker.kill9();
    let out = exit_within_15s(child, "after the broker went away").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not acknowledge a publish within 2 s (--timeout)"),
        "{stderr}"
    );
}

/// `pub` reading a quiet stdin (`tail -f`) gives up too: a publish whose `PubAck`
/// never comes ends it without waiting for another line.
#[tokio::test]
async fn pub_on_a_quiet_stdin_gives_up_when_the_broker_is_gone() {
    let mut broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("cli", "secret-pass", &key).await;
    let mut sub = reader.subscribe("jobs").await.expect("subscribe");
    let mut child = pub_command(&broker, &key)
        .args(["--timeout", "2", "jobs"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fastport pub");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "first").expect("write");
    within("the first line", sub.next())
        .await
        .expect("a message");
    broker.kill9();
    writeln!(stdin, "second").expect("write");
    // stdin stays open: no more lines, no end of input.
    let out = exit_within_15s(child, "after the broker went away").await;
    drop(stdin);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("(--timeout)"), "{stderr}");
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

/// `fastport recv` never replaces a file that is already there: a file of the same
/// name is saved beside it, and nothing half-written is left.
#[tokio::test]
async fn recv_keeps_existing_files() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("doc.txt"), b"precious").expect("write");

    let mut recv = client_command("recv", &broker, &key);
    recv.arg("--dir")
        .arg(dir.path())
        .args(["--count", "2", "files/#"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = recv.spawn().expect("run fastport recv");
    // It says so once it has subscribed.
    let stderr = child.stderr.take().expect("stderr");
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = said.send(line);
        }
    });
    let waiting = heard
        .recv_timeout(std::time::Duration::from_secs(15))
        .expect("recv starts");
    assert!(waiting.contains("waiting for files"), "{waiting}");

    let sender = broker.client("cli", "secret-pass", &key).await;
    for n in 0..2 {
        let data = format!("new copy {n}");
        sender
            .send_file("files/doc", "doc.txt", data.as_bytes(), data.len() as u64)
            .await
            .expect("send file");
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(out.status.success());
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect(name);
    assert_eq!(read("doc.txt"), "precious");
    assert_eq!(read("doc (1).txt"), "new copy 0");
    assert_eq!(read("doc (2).txt"), "new copy 1");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

/// `fastport sub` interrupted (Ctrl-C, SIGTERM) closes its connection, so a durable
/// subscription queues what is published next, instead of the broker delivering it
/// to a connection nobody reads until QUIC's idle timeout.
#[tokio::test]
async fn an_interrupted_sub_closes_its_connection() {
    let broker = Broker::start();
    broker
        .create_session("cli", "secret-pass", json!({"maxRetryLimit": 0}))
        .await;
    let key = SessionKey::generate();
    let mut sub = client_command("sub", &broker, &key);
    sub.args(["--client-id", "zed", "--durable", "zed/#"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sub.spawn().expect("run fastport sub");
    started_then_interrupted(&mut child, "subscribed").await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(out.status.success(), "exit {}", out.status);

    let publisher = broker.client("cli", "secret-pass", &key).await;
    let ack = publisher
        .publish("zed/x", b"while away".to_vec())
        .await
        .expect("publish");
    assert_eq!(ack.status, fastport::client::PublishStatus::Stored);
    let config = broker
        .client_config("cli", "secret-pass", &key)
        .client_id("zed");
    let reader = within("connect", fastport::client::Client::connect(config))
        .await
        .expect("connect");
    let options = durable();
    let mut back = reader
        .subscribe_with("zed/#", options)
        .await
        .expect("subscribe");
    let m = within("the message published while away", back.next())
        .await
        .expect("message");
    assert_eq!(&m.payload[..], b"while away");
}

/// `fastport sub --presence` reports who joins its filter, as a JSON line with
/// `--json`, beside the messages (which alone count towards `--count`).
#[tokio::test]
async fn sub_reports_presence_when_asked() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let mut child = client_command("sub", &broker, &key)
        .args(["--presence", "--json", "--count", "1", "room/#"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fastport sub");
    started(&mut child, "subscribed").await;

    let bob = broker.client_as("bob", "cli", "secret-pass", &key).await;
    let _in_the_room = bob.subscribe("room/#").await.expect("subscribe");
    bob.publish("room/1", b"hello".to_vec())
        .await
        .expect("publish");
    let out = exit_within_15s(child, "after one message").await;
    assert!(out.status.success(), "exit {}", out.status);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], json!({"presence": "joined", "client_id": "bob"}));
    assert_eq!(lines[1]["payload"], "hello");
}

/// `send-file` needs a file's size before its first chunk: a pipe is refused with
/// a reason, not sent as an empty file.
#[tokio::test]
async fn send_file_refuses_a_pipe() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let mut child = client_command("send-file", &broker, &key)
        .args(["files/x", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fastport send-file");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"hello\n").expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

/// A broker that cannot start says why, each cause once.
#[test]
fn serve_says_once_why_it_cannot_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_fastport"))
        .args(["serve", "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(file.join("data"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .env("RUST_BACKTRACE", "0")
        .env_remove("DB_TYPE")
        .env_remove("SQLITE_PATH")
        .output()
        .expect("run fastport serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert_eq!(
        stderr.matches("cannot create the data directory").count(),
        1,
        "{stderr}"
    );
}

/// `HOST` may name the host (`HOST=localhost`, as a Node server takes it): the broker
/// binds to what it resolves to, IPv4 first, and says so. Something that is no host
/// name is refused with the reason.
#[test]
fn serve_binds_to_the_host_named_in_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = |host: &str| {
        let mut serve = Command::new(env!("CARGO_BIN_EXE_fastport"));
        serve
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--certs-dir")
            .arg(dir.path().join("certs"))
            .env("HOST", host)
            .env("PORT", "0")
            .env_remove("DB_TYPE")
            .env_remove("SQLITE_PATH")
            .stdout(Stdio::piped());
        serve
    };

    let mut child = serve("localhost")
        .stderr(Stdio::null())
        .spawn()
        .expect("run fastport serve");
    let banner = common::read_banner(&mut child)
        .unwrap_or_else(|so_far| panic!("no banner in time; so far {so_far:#?}"));
    child.kill().expect("kill");
    child.wait().expect("wait");
    for label in ["quic   quic://127.0.0.1:", "http   http://127.0.0.1:"] {
        assert!(
            banner.iter().any(|l| l.trim().starts_with(label)),
            "{label} in {banner:#?}"
        );
    }

    let out = serve("no host!")
        .stderr(Stdio::piped())
        .output()
        .expect("run fastport serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("neither an IP address nor a host name"),
        "{stderr}"
    );
}

/// `recv --durable --client-id` keeps receiving across runs: a file sent while no
/// `recv` runs waits in the broker's spool and is saved by the next run.
#[tokio::test]
async fn recv_durable_gets_the_files_sent_while_it_was_away() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let recv = |count: Option<&str>| {
        let mut recv = client_command("recv", &broker, &key);
        recv.args(["--client-id", "laptop", "--durable", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(count) = count {
            recv.args(["--count", count]);
        }
        recv.arg("files/#");
        recv
    };

    // The first run subscribes durably, then is interrupted.
    let mut first = recv(None).spawn().expect("run fastport recv");
    started_then_interrupted(&mut first, "waiting for files").await;
    tokio::task::spawn_blocking(move || first.wait())
        .await
        .expect("join")
        .expect("wait");

    let sender = broker.client("cli", "secret-pass", &key).await;
    let data = b"sent while the laptop was off";
    within(
        "send",
        sender.send_file("files/notes", "notes.txt", &data[..], data.len() as u64),
    )
    .await
    .expect("accepted");

    let second = recv(Some("1")).spawn().expect("run fastport recv again");
    let out = within(
        "the second run saves the file",
        tokio::task::spawn_blocking(move || second.wait_with_output()),
    )
    .await
    .expect("join")
    .expect("wait");
    assert!(out.status.success(), "exit {}", out.status);
    let saved = std::fs::read(dir.path().join("notes.txt")).expect("notes.txt saved");
    assert_eq!(saved, data);
}

/// `fastport sub` taken over by another connection with its client id says so and
/// exits with a failure; it used to exit 0 without a word.
#[tokio::test]
async fn a_sub_taken_over_says_so_and_fails() {
    let broker = Broker::start();
    broker.create_session("cli", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let mut sub = client_command("sub", &broker, &key);
    sub.args(["--client-id", "kai", "kai/#"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sub.spawn().expect("run fastport sub");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let said = tokio::task::spawn_blocking(move || {
        let first = lines.next();
        (first, lines)
    })
    .await
    .expect("join");
    let (first, lines) = said;
    assert!(
        first.is_some_and(|l| l.is_ok_and(|l| l.contains("subscribed"))),
        "sub did not start"
    );
    let config = broker
        .client_config("cli", "secret-pass", &key)
        .client_id("kai");
    let _usurper = within("connect", fastport::client::Client::connect(config))
        .await
        .expect("connect");
    let status = within(
        "sub exits",
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("join")
    .expect("wait");
    assert!(!status.success(), "exit {status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("TakenOver")),
        "the reason is given: {rest:?}"
    );
}

/// `fastport session create --session NAME --password PASS --url URL`.
fn session_create(url: &str, name: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastport"));
    cmd.args(["session", "create", "--url", url, "--session", name])
        .args(["--password", "secret-pass"])
        .env_remove("FASTPORT_URL")
        .env_remove("FASTPORT_CA");
    cmd
}

/// `session create` takes the URL every client command takes (`quic://` or
/// `ws://…/v1/ws`: HTTP is served on the same port number) as well as `http://`, and
/// says why when the broker refuses. A `ws://` URL used to be refused outright.
#[tokio::test]
async fn session_create_takes_any_client_url() {
    let broker = Broker::start();
    let key = SessionKey::generate();
    let urls = [
        ("by-http", broker.http_url("")),
        ("by-quic", format!("quic://{}", broker.http)),
        ("by-ws", format!("ws://{}/v1/ws", broker.http)),
    ];
    for (name, url) in urls {
        let out = session_create(&url, name).output().expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("session {name} created")),
            "{stdout}"
        );
        // It exists, with that password.
        broker.client(name, "secret-pass", &key).await;
    }

    let again = session_create(&broker.http_url(""), "by-ws")
        .output()
        .expect("run");
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("409") && stderr.contains("already exists"),
        "{stderr}"
    );

    let wrong = session_create("mqtt://127.0.0.1:1883", "x")
        .output()
        .expect("run");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("expected quic://, ws:// or wss://; session create also takes http"),
        "{stderr}"
    );
}
