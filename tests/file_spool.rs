//! The file spool through the real broker binary: files follow the same durable,
//! retry and crash rules as messages (design §10 "Files"), a stalled receiver is moved
//! to the spool instead of holding the transfer back (design §3), and the spool
//! (`<sqlite db>.spool`) is emptied once every receiver has acknowledged, and never
//! holds a file in the clear.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::dart::{Dart, key_b64};
use common::{Broker, contains, durable, within};
use fastport::client::{
    Client, ClientConfig, ClientError, FileSubscription, IncomingFile, SessionKey,
};
use fastport::proto::{ErrorCode, PayloadFormat};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The password of every session these tests create.
const PASSWORD: &str = "secret-pass";

/// Settings of every session here: retries come after 1 s, not the default 5 s.
fn settings() -> Value {
    json!({"retryInterval": 1000})
}

/// A broker with `session` created on it, the raw key (as the Dart client holds it)
/// and the same key for the SDK.
async fn setup(session: &str) -> (Broker, [u8; 32], SessionKey) {
    let broker = Broker::start();
    broker.create_session(session, PASSWORD, settings()).await;
    let raw: [u8; 32] = rand::random();
    let key = SessionKey::from_base64(&key_b64(&raw)).expect("key");
    (broker, raw, key)
}

/// A client configuration for `session` that resumes as `client_id`.
fn config_as(broker: &Broker, session: &str, key: &SessionKey, client_id: &str) -> ClientConfig {
    broker
        .client_config(session, PASSWORD, key)
        .client_id(client_id)
}

/// Bob's first visit: a durable file subscription to `filter`, then he leaves.
async fn subscribe_then_leave(config: &ClientConfig, filter: &str) {
    let bob = within("bob connects", Client::connect(config.clone()))
        .await
        .expect("connect");
    let files = within(
        "durable file subscription",
        bob.subscribe_files_with(filter, durable()),
    )
    .await
    .expect("subscribe");
    drop(files);
    bob.close().await;
    drop(bob);
    // Let the broker see him go, so the files below meet an offline subscriber.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Bob comes back with the same client id and subscribes again (harmless if the
/// broker restored the subscription already).
async fn bob_returns(config: &ClientConfig, filter: &str) -> (Client, FileSubscription) {
    let bob = within("bob reconnects", Client::connect(config.clone()))
        .await
        .expect("reconnect");
    let files = within(
        "durable file subscription again",
        bob.subscribe_files_with(filter, durable()),
    )
    .await
    .expect("subscribe again");
    (bob, files)
}

/// Checks an incoming file's metadata (`file_id` is the sender's receipt's), reads it
/// whole and checks every byte.
async fn assert_file(
    file: IncomingFile,
    file_id: [u8; 16],
    topic: &str,
    name: &str,
    format: PayloadFormat,
    content: &[u8],
) {
    assert_eq!(file.file_id, file_id, "the file sent");
    assert_eq!(file.name, name, "its name, opened end to end");
    assert_eq!(file.topic, topic);
    assert_eq!(file.format, format);
    assert_eq!(file.size, content.len() as u64, "declared size");
    let got = within("file content", file.read_to_end())
        .await
        .expect("the file verifies (SHA-256, MAC)");
    assert!(
        got == content,
        "content differs ({} bytes received, {} sent)",
        got.len(),
        content.len()
    );
}

/// `len` bytes of recognisable text, so a leak of it onto the disk can be searched.
fn distinctive(len: usize, tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{tag} plaintext line {i:08}\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// The broker's file spool: a directory beside the SQLite database.
fn spool_dir(broker: &Broker) -> PathBuf {
    PathBuf::from(format!("{}.spool", broker.db_path().display()))
}

/// Every regular file under `dir`, recursively; none if `dir` does not exist.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.map_while(Result::ok) {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t) if t.is_file() => found.push(path),
                _ => {}
            }
        }
    }
    found.sort();
    found
}

/// The `*.spool` files under the spool directory.
fn spool_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect()
}

/// Polls every 100 ms, for up to 5 s, until no `*.spool` file is left.
async fn wait_for_empty_spool(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = spool_files(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("the spool still holds {left:?} 5 s after every receiver acknowledged");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Panics if any file under the spool directory contains `needle`.
fn assert_spool_lacks(dir: &Path, needle: &[u8], what: &str) {
    for path in files_under(dir) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !contains(&bytes, needle),
            "{what} found in the clear in spool file {}",
            path.display()
        );
    }
}

/// The next WebSocket message other than pings, or `None` after `wait` of silence.
async fn next_ws_message_within(dart: &mut Dart, wait: Duration) -> Option<Message> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, dart.ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(m))) => return Some(m),
            Ok(other) => panic!("the legacy connection broke: {other:?}"),
        }
    }
}

/// A durable file subscriber gets, when it comes back with the same client id, a
/// file sent while it was offline: same id as the sender's receipt, same name, every
/// byte. Before the spool, files reached only the receivers online at the time.
#[tokio::test]
async fn durable_file_subscriber_gets_a_file_sent_while_offline() {
    let (broker, _, key) = setup("durable").await;
    let bob_config = config_as(&broker, "durable", &key, "bob");
    assert!(
        !bob_config.clean,
        "a client keeps its durable state across connections by default"
    );
    subscribe_then_leave(&bob_config, "docs/#").await;

    let sender = broker.client("durable", PASSWORD, &key).await;
    let content = distinctive(1 << 20, "DURABLE-FILE");
    let receipt = within(
        "upload while bob is away",
        sender.send_file(
            "docs/report",
            "report.pdf",
            &content[..],
            content.len() as u64,
        ),
    )
    .await
    .expect("accepted");
    assert_eq!(receipt.bytes, content.len() as u64);

    let (_bob, mut files) = bob_returns(&bob_config, "docs/#").await;
    let file = within("the file sent while bob was away", files.next())
        .await
        .expect("a file");
    assert_file(
        file,
        receipt.file_id,
        "docs/report",
        "report.pdf",
        PayloadFormat::NativeV1,
        &content,
    )
    .await;
}

/// A file kept only for an offline durable subscriber leaves the spool when that
/// client starts clean: its copy is dropped, and with the last copy goes the file.
#[tokio::test]
async fn a_clean_start_empties_the_spool_of_the_files_kept_for_it() {
    let (broker, _, key) = setup("clean").await;
    let bob_config = config_as(&broker, "clean", &key, "bob");
    subscribe_then_leave(&bob_config, "docs/#").await;
    let sender = broker.client("clean", PASSWORD, &key).await;
    let content = data(256 * 1024);
    within(
        "upload while bob is away",
        sender.send_file("docs/a", "a.bin", &content[..], content.len() as u64),
    )
    .await
    .expect("accepted");
    let spool = spool_dir(&broker);
    assert_eq!(spool_files(&spool).len(), 1, "kept for bob");

    let bob = within("bob starts clean", Client::connect(bob_config.clean(true)))
        .await
        .expect("connect");
    wait_for_empty_spool(&spool).await;
    drop(bob);
}

/// A file accepted for an offline durable subscriber survives `kill -9` of the
/// broker right after the sender's receipt: the spool was on disk before the broker
/// said "accepted", and the copy in the store points at it after the restart.
#[tokio::test]
async fn a_spooled_file_survives_kill_9() {
    let (mut broker, _, key) = setup("crash").await;
    let bob_config = config_as(&broker, "crash", &key, "bob");
    subscribe_then_leave(&bob_config, "docs/#").await;

    let sender = broker.client("crash", PASSWORD, &key).await;
    let content = distinctive(1 << 20, "CRASH-SAFE-FILE");
    let receipt = within(
        "upload while bob is away",
        sender.send_file(
            "docs/crash",
            "survivor.bin",
            &content[..],
            content.len() as u64,
        ),
    )
    .await
    .expect("accepted");
    broker.kill9();
    drop(sender);
    broker.restart();

    let (_bob, mut files) = bob_returns(&bob_config, "docs/#").await;
    let file = within("the file after kill -9 and restart", files.next())
        .await
        .expect("a file");
    assert_file(
        file,
        receipt.file_id,
        "docs/crash",
        "survivor.bin",
        PayloadFormat::NativeV1,
        &content,
    )
    .await;
    // The restarted broker counted the copies left in the store: the spool file goes
    // with the last acknowledgement, not only at the session's expiry.
    wait_for_empty_spool(&spool_dir(&broker)).await;
}

/// A legacy receiver that got a whole file but never sent
/// `{"type":"ack","messageId":<fileId>}` gets the whole file again after the
/// session's retry interval; once it acks, no further delivery comes, and the spool
/// is emptied.
async fn unacknowledged_legacy_file_is_delivered_again(session: &str, user_id: Option<&str>) {
    let (broker, raw, key) = setup(session).await;
    let mut dart = Dart::connect(&broker, "/").await;
    let welcome = dart.init(session, PASSWORD, user_id).await;
    assert_eq!(welcome["success"], true, "{welcome}");
    dart.send(json!({"type": "subscribe", "topic": "inbox"}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sender = broker.client(session, PASSWORD, &key).await;
    let content = distinctive(150_000, "RETRIED-FILE");
    let first = tokio::spawn(async move {
        let got = dart.receive_file(&raw).await;
        (dart, got)
    });
    let receipt = within(
        "upload",
        sender.send_file_legacy("inbox", "again.txt", &content[..], content.len() as u64),
    )
    .await
    .expect("accepted");
    let file_id = uuid::Uuid::from_bytes(receipt.file_id)
        .hyphenated()
        .to_string();
    let (mut dart, (init, got)) = within("first delivery", first).await.expect("join");
    let first_done = Instant::now();
    assert_eq!(init["fileId"], file_id.as_str(), "{init}");
    assert_eq!(init["fileName"], "again.txt");
    assert!(got == content, "first delivery's content differs");

    // No ack: the whole file comes again, a retry interval later.
    let (init, got) = within("the unacknowledged file again", dart.receive_file(&raw)).await;
    let gap = first_done.elapsed();
    assert_eq!(init["fileId"], file_id.as_str(), "the same file: {init}");
    assert_eq!(init["fileName"], "again.txt");
    assert!(got == content, "second delivery's content differs");
    // Half the interval: on a loaded machine one delivery may arrive late and the next
    // on time.
    assert!(
        gap >= Duration::from_millis(300),
        "sent again {gap:?} after the first; the retry interval is 1 s"
    );

    dart.send(json!({"type": "ack", "messageId": file_id}))
        .await;
    let third = next_ws_message_within(&mut dart, Duration::from_millis(2_500)).await;
    assert!(third.is_none(), "delivered again after its ack: {third:?}");
    wait_for_empty_spool(&spool_dir(&broker)).await;
}

/// Retries of an unacknowledged file, for a durable legacy subscription (`userId`).
#[tokio::test]
async fn unacknowledged_file_is_delivered_again_to_a_durable_legacy_subscriber() {
    unacknowledged_legacy_file_is_delivered_again("retry-durable", Some("tablet")).await;
}

/// Retries of an unacknowledged file, for a connection-bound legacy subscription (no
/// `userId`): retried while the connection lasts, like a message.
#[tokio::test]
async fn unacknowledged_file_is_delivered_again_to_a_connection_bound_legacy_subscriber() {
    unacknowledged_legacy_file_is_delivered_again("retry-live", None).await;
}

/// Of two receivers, one takes the file but stops reading its chunks. The sender's
/// 8 MiB upload and the other receiver finish anyway, far sooner than the old 30 s
/// stall timeout: the stalled receiver is moved to the spool instead of holding the
/// transfer back. When it reads at last, it gets the whole, verified file (from the
/// stream it holds, or again from the spool if that stream was cut), and the spool is
/// emptied afterwards.
#[tokio::test]
async fn a_stalled_receiver_holds_back_neither_sender_nor_others_and_gets_the_file_later() {
    let (broker, _, key) = setup("stall").await;
    let slow = broker.client("stall", PASSWORD, &key).await;
    let fast = broker.client("stall", PASSWORD, &key).await;
    let slow_files = slow.subscribe_files("big/#").await.expect("subscribe");
    let mut fast_files = fast.subscribe_files("big/#").await.expect("subscribe");
    let sender = broker.client("stall", PASSWORD, &key).await;
    let content = data(8 << 20);

    // "slow" takes the file as soon as its header comes, and does not read it.
    let slow_task = tokio::spawn(async move {
        let mut slow_files = slow_files;
        let held = slow_files.next().await;
        (slow_files, held)
    });
    let fast_task = tokio::spawn(async move {
        let file = within("fast receiver's file", fast_files.next())
            .await
            .expect("a file");
        let id = file.file_id;
        let got = within("fast receiver's content", file.read_to_end()).await;
        (id, got, Instant::now())
    });

    let started = Instant::now();
    let receipt = tokio::time::timeout(
        Duration::from_secs(15),
        sender.send_file("big/video", "movie.mp4", &content[..], content.len() as u64),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("send_file did not complete within 15 s: the stalled receiver held the sender back")
    })
    .expect("accepted");
    assert_eq!(receipt.bytes, content.len() as u64);

    let (fast_id, fast_got, fast_done) = within("fast receiver", fast_task).await.expect("join");
    assert_eq!(fast_id, receipt.file_id);
    let fast_got = fast_got.expect("fast receiver's file verifies");
    assert!(
        fast_got == content,
        "fast receiver's content differs ({} vs {} bytes)",
        fast_got.len(),
        content.len()
    );
    let fast_took = fast_done.saturating_duration_since(started);
    assert!(
        fast_took < Duration::from_secs(15),
        "the fast receiver needed {fast_took:?}: the stalled one held it back"
    );

    // Now "slow" reads: the stream it holds, or, if the broker cut that one, the file
    // again from the spool.
    let (mut slow_files, held) = within("slow receiver's file", slow_task)
        .await
        .expect("join");
    let held = held.expect("the slow receiver got the file");
    let slow_got = within("the slow receiver's whole file", async {
        let mut file = held;
        let mut failures = Vec::new();
        loop {
            assert_eq!(file.file_id, receipt.file_id, "the file sent");
            assert_eq!(file.name, "movie.mp4");
            match file.read_to_end().await {
                Ok(got) => break got,
                Err(e) => failures.push(e.to_string()),
            }
            file = slow_files
                .next()
                .await
                .unwrap_or_else(|| panic!("no second delivery after {failures:?}"));
        }
    })
    .await;
    assert!(
        slow_got == content,
        "slow receiver's content differs ({} vs {} bytes)",
        slow_got.len(),
        content.len()
    );
    // Any further copy still queued here is let go (the SDK drains its stream).
    drop(slow_files);
    wait_for_empty_spool(&spool_dir(&broker)).await;
    drop((slow, fast, sender));
}

/// The spool holds exactly one `*.spool` file while the only receiver of one file is
/// offline, and none once he has come back, read it and acknowledged it. A file that
/// no subscriber (online or durable) wants is not spooled at all.
#[tokio::test]
async fn the_spool_holds_a_file_until_every_receiver_has_acknowledged_it() {
    let (broker, _, key) = setup("cleanup").await;
    let spool = spool_dir(&broker);
    let sender = broker.client("cleanup", PASSWORD, &key).await;

    // Nobody wants it: nothing to keep.
    let unwanted = b"no one reads this";
    within(
        "upload with no subscriber",
        sender.send_file(
            "nobody/here",
            "unwanted.bin",
            &unwanted[..],
            unwanted.len() as u64,
        ),
    )
    .await
    .expect("accepted");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = spool_files(&spool);
    assert!(left.is_empty(), "a file nobody wants was spooled: {left:?}");

    let bob_config = config_as(&broker, "cleanup", &key, "bob");
    subscribe_then_leave(&bob_config, "docs/#").await;
    let content = distinctive(1 << 20, "CLEANUP-FILE");
    let receipt = within(
        "upload while bob is away",
        sender.send_file("docs/a", "a.pdf", &content[..], content.len() as u64),
    )
    .await
    .expect("accepted");
    // Accepted for an offline durable subscriber means: on disk, in the spool.
    let held = spool_files(&spool);
    assert_eq!(
        held.len(),
        1,
        "one spooled file while bob is away, in {}: {held:?}",
        spool.display()
    );

    let (_bob, mut files) = bob_returns(&bob_config, "docs/#").await;
    let file = within("the file", files.next()).await.expect("a file");
    assert_file(
        file,
        receipt.file_id,
        "docs/a",
        "a.pdf",
        PayloadFormat::NativeV1,
        &content,
    )
    .await;
    wait_for_empty_spool(&spool).await;
}

/// Nothing the sender meant to keep secret reaches the spool in the clear: neither the
/// content nor the name of a native file, nor those of a legacy (`LEGACY_JSON`) file,
/// whose name the broker receives in plain text. Both files are in the spool while
/// bob is away, and bob still gets both intact afterwards.
#[tokio::test]
async fn the_spool_never_holds_a_plaintext_name_or_content() {
    let (broker, _, key) = setup("secrets").await;
    let spool = spool_dir(&broker);
    let bob_config = config_as(&broker, "secrets", &key, "bob");
    subscribe_then_leave(&bob_config, "vault/#").await;

    let sender = broker.client("secrets", PASSWORD, &key).await;
    let native = distinctive(1 << 20, "NATIVE-MERGER-PLAN");
    let native_name = "q3-merger-plan-CONFIDENTIAL.pdf";
    let native_receipt = within(
        "native upload",
        sender.send_file(
            "vault/native",
            native_name,
            &native[..],
            native.len() as u64,
        ),
    )
    .await
    .expect("accepted");
    let legacy = distinctive(300_000, "LEGACY-SALARY-TABLE");
    let legacy_name = "salaries-2026-LEGACY-CONFIDENTIAL.xlsx";
    let legacy_receipt = within(
        "legacy upload",
        sender.send_file_legacy(
            "vault/legacy",
            legacy_name,
            &legacy[..],
            legacy.len() as u64,
        ),
    )
    .await
    .expect("accepted");

    let held = spool_files(&spool);
    assert_eq!(held.len(), 2, "both files are spooled: {held:?}");
    for (needle, what) in [
        (native_name.as_bytes(), "the native file's name"),
        (&native[..64], "the native file's first bytes"),
        (&native[500_000..500_064], "the native file's middle bytes"),
        (legacy_name.as_bytes(), "the legacy file's name"),
        (&legacy[..64], "the legacy file's first bytes"),
        (&legacy[200_000..200_064], "the legacy file's middle bytes"),
    ] {
        assert_spool_lacks(&spool, needle, what);
    }

    // Spooled files come one at a time, in the order they were sent: each is read
    // before the next is taken.
    let (_bob, mut files) = bob_returns(&bob_config, "vault/#").await;
    let native_file = within("the native file", files.next())
        .await
        .expect("a file");
    assert_file(
        native_file,
        native_receipt.file_id,
        "vault/native",
        native_name,
        PayloadFormat::NativeV1,
        &native,
    )
    .await;
    let legacy_file = within("the legacy file", files.next())
        .await
        .expect("a file");
    assert_file(
        legacy_file,
        legacy_receipt.file_id,
        "vault/legacy",
        legacy_name,
        PayloadFormat::LegacyJson,
        &legacy,
    )
    .await;
    wait_for_empty_spool(&spool).await;
}

/// A client's message and file subscriptions on one filter share one subscription at
/// the broker, with their options together: a connection-bound message subscription
/// taken after a durable file subscription does not make the broker forget the files
/// it should keep for this client (the second Subscribe used to replace the first).
#[tokio::test]
async fn a_message_subscription_on_the_same_filter_keeps_files_durable() {
    let (broker, _, key) = setup("shared").await;
    let bob_config = config_as(&broker, "shared", &key, "bob");
    let bob = within("bob connects", Client::connect(bob_config.clone()))
        .await
        .expect("connect");
    let files = within("files", bob.subscribe_files_with("news/#", durable()))
        .await
        .expect("subscribe");
    let messages = within("messages", bob.subscribe("news/#"))
        .await
        .expect("subscribe");
    drop((files, messages));
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sender = broker.client("shared", PASSWORD, &key).await;
    let content = data(300_000);
    let receipt = within(
        "upload",
        sender.send_file(
            "news/today",
            "today.bin",
            &content[..],
            content.len() as u64,
        ),
    )
    .await
    .expect("accepted");

    let (_bob, mut files) = bob_returns(&bob_config, "news/#").await;
    let file = within("the file kept for bob", files.next())
        .await
        .expect("a file");
    assert_file(
        file,
        receipt.file_id,
        "news/today",
        "today.bin",
        PayloadFormat::NativeV1,
        &content,
    )
    .await;
}

/// One session's files take at most `--max-session-spool-size` of the spool: past it
/// its next file is refused with LIMIT_EXCEEDED, while another session's file of the
/// same size is taken, and the session has room again once its receiver has its files.
#[tokio::test]
async fn a_session_s_files_take_only_its_share_of_the_spool() {
    let broker = Broker::start_with(&[
        "--max-spool-size",
        "8000000",
        "--max-session-spool-size",
        "1500000",
    ]);
    let key = SessionKey::generate();
    for session in ["greedy", "modest"] {
        broker.create_session(session, PASSWORD, settings()).await;
    }
    let bob_greedy = config_as(&broker, "greedy", &key, "bob");
    let bob_modest = config_as(&broker, "modest", &key, "bob");
    subscribe_then_leave(&bob_greedy, "docs/#").await;
    subscribe_then_leave(&bob_modest, "docs/#").await;
    let greedy = broker.client("greedy", PASSWORD, &key).await;
    let modest = broker.client("modest", PASSWORD, &key).await;

    // Held for bob, away: 1 MB of the greedy session's 1.5 MB.
    let first = data(1_000_000);
    let kept = within(
        "a file within the share",
        greedy.send_file("docs/1", "1.bin", &first[..], first.len() as u64),
    )
    .await
    .expect("accepted");
    let second = data(1_000_000);
    match within(
        "a file past the share",
        greedy.send_file("docs/2", "2.bin", &second[..], second.len() as u64),
    )
    .await
    {
        Err(ClientError::Refused {
            code: ErrorCode::LimitExceeded,
            message,
        }) => assert!(message.contains("session's share"), "{message}"),
        other => panic!("the second file must be refused, got {other:?}"),
    }
    // Another tenant is not held back by the greedy one.
    within(
        "the other session's file",
        modest.send_file("docs/1", "1.bin", &second[..], second.len() as u64),
    )
    .await
    .expect("another session has room");
    assert_eq!(
        spool_files(&spool_dir(&broker)).len(),
        2,
        "the refused file went"
    );

    // Bob takes the greedy session's file: its share is free again.
    let (_bob, mut files) = bob_returns(&bob_greedy, "docs/#").await;
    let file = within("bob's file", files.next()).await.expect("a file");
    assert_file(
        file,
        kept.file_id,
        "docs/1",
        "1.bin",
        PayloadFormat::NativeV1,
        &first,
    )
    .await;
    within("room again", async {
        loop {
            let again = greedy
                .send_file("docs/3", "3.bin", &second[..], second.len() as u64)
                .await;
            match again {
                Ok(_) => return,
                Err(ClientError::Refused {
                    code: ErrorCode::LimitExceeded,
                    ..
                }) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
}
