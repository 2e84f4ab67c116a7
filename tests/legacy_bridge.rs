//! The legacy JSON bridge, driven by an independent client that speaks only the seed's
//! JSON the way the Dart client does: plain tokio-tungstenite, and its own AES code —
//! nothing from fastPort's SDK.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::dart::{Dart, dart_open};
use common::{Broker, durable, within};
use fastport::client::{Client, PublishStatus, SessionKey};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn setup(settings: Value) -> (Broker, [u8; 32]) {
    let broker = Broker::start();
    broker.create_session("dart", "secret-pass", settings).await;
    (broker, rand::random())
}

#[tokio::test]
async fn init_with_right_and_wrong_password() {
    let (broker, _) = setup(json!({})).await;
    let mut ok = Dart::connect(&broker, "/").await;
    let answer = ok.init("dart", "secret-pass", None).await;
    assert_eq!(
        answer,
        json!({"type": "init_response", "success": true, "sessionName": "dart"})
    );
    // A second init is refused whatever it names, and the first stays in force.
    ok.send(json!({"type": "init", "sessionName": "no such session", "password": "x"}))
        .await;
    assert_eq!(ok.recv().await["code"], "INVALID_FRAME");

    let mut bad = Dart::connect(&broker, "/ws").await;
    let answer = bad.init("dart", "wrong", None).await;
    assert_eq!(answer["type"], "init_response");
    assert_eq!(answer["success"], false);
    assert!(answer["error"].as_str().is_some());
    assert_eq!(bad.close_code().await, Some(CloseCode::Policy));

    // A session that does not exist, or cannot (no name has a space, or none), fails
    // the same way: nothing tells the names apart.
    for name in ["no-such-session", "no such session", ""] {
        let mut unknown = Dart::connect(&broker, "/").await;
        let answer = unknown.init(name, "secret-pass", None).await;
        assert_eq!(answer["success"], false, "{name:?}: {answer}");
        assert_eq!(
            answer["error"], "unknown session or wrong password",
            "{name:?}"
        );
        assert_eq!(
            unknown.close_code().await,
            Some(CloseCode::Policy),
            "{name:?}"
        );
    }
}

#[tokio::test]
async fn publish_subscribe_ack_and_redelivery() {
    let (broker, key) = setup(json!({"retryInterval": 300, "maxRetryLimit": 2})).await;
    let mut sub = Dart::connect(&broker, "/").await;
    sub.init("dart", "secret-pass", None).await;
    sub.send(json!({"type": "subscribe", "topic": "chat/+"}))
        .await;
    let mut lazy = Dart::connect(&broker, "/ws").await;
    lazy.init("dart", "secret-pass", None).await;
    lazy.send(json!({"type": "subscribe", "topic": "chat/#"}))
        .await;
    let mut publisher = Dart::connect(&broker, "/").await;
    publisher.init("dart", "secret-pass", None).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // subscribe has no reply

    let id = publisher
        .publish(&key, "chat/general", "Hello, World!")
        .await;
    assert_eq!(publisher.recv().await["type"], "ack_received");

    let message = sub.recv().await;
    assert_eq!(message["type"], "message");
    assert_eq!(message["topic"], "chat/general");
    assert_eq!(message["messageId"], id.as_str());
    assert!(message["timestamp"].is_u64());
    let text = dart_open(&key, &message);
    assert_eq!(text, "Hello, World!");
    sub.send(json!({"type": "ack", "messageId": id})).await;
    assert!(
        sub.recv_within(Duration::from_millis(800)).await.is_none(),
        "acked: no redelivery"
    );

    // The subscriber that never acks gets the same message again, up to the limit.
    let mut copies = 0;
    while let Some(frame) = lazy.recv_within(Duration::from_millis(800)).await {
        assert_eq!(frame["messageId"], id.as_str());
        copies += 1;
    }
    assert_eq!(copies, 3, "first delivery plus maxRetryLimit = 2 retries");
}

#[tokio::test]
async fn legacy_and_native_clients_share_a_session() {
    let (broker, key) = setup(json!({})).await;
    let session_key = SessionKey::from_base64(&B64.encode(key)).expect("key");
    let native = broker.client("dart", "secret-pass", &session_key).await;
    let mut native_sub = native.subscribe("room/#").await.expect("subscribe");

    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("dart", "secret-pass", Some("dart-phone")).await;
    dart.send(json!({"type": "subscribe", "topic": "room/+"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Legacy → native: the SDK opens the LEGACY_JSON payload.
    dart.publish(&key, "room/1", "from dart").await;
    let m = within("native receives", native_sub.next())
        .await
        .expect("message");
    assert_eq!(m.payload, &b"from dart"[..]);
    // The Dart client is subscribed too: it gets its own message (delivered at once)
    // and the ack_received (after the commit).
    let (first, second) = (dart.recv().await, dart.recv().await);
    assert_eq!(
        (first["type"].as_str(), second["type"].as_str()),
        (Some("message"), Some("ack_received"))
    );
    assert_eq!(dart_open(&key, &first), "from dart");

    // Native → legacy, sealed as LEGACY_JSON by the SDK.
    let ack = native
        .publish_legacy("room/2", "from rust")
        .await
        .expect("publish");
    assert_eq!(
        ack.status,
        PublishStatus::Stored,
        "the Dart client's subscription is durable (userId)"
    );
    let m = dart.recv().await;
    assert_eq!(m["topic"], "room/2");
    assert_eq!(dart_open(&key, &m), "from rust");
    within("native gets its own", native_sub.next())
        .await
        .expect("message");

    // NATIVE_V1 messages are not queued for legacy clients (they could not read them).
    let ack = native
        .publish("room/3", b"native only".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        ack.status,
        PublishStatus::Accepted,
        "only the native subscriber matched"
    );
    assert!(dart.recv_within(Duration::from_millis(500)).await.is_none());
}

/// Design §10: legacy subscribers receive only `LEGACY_JSON`, also from a backlog
/// queued while they were away: after a restart, and when a native connection made
/// the client's durable subscription.
#[tokio::test]
async fn an_offline_legacy_subscriber_is_queued_only_what_it_can_read() {
    let (mut broker, key) = setup(json!({})).await;
    let session_key = SessionKey::from_base64(&B64.encode(key)).expect("key");
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("dart", "secret-pass", Some("phone")).await;
    dart.send(json!({"type": "subscribe", "topic": "inbox"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(dart);
    broker.restart();
    let native = broker.client("dart", "secret-pass", &session_key).await;
    let ack = native
        .publish("inbox", b"unreadable".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        ack.status,
        PublishStatus::NoSubscribers,
        "the restarted broker knows the subscription is a legacy one"
    );

    // The same id, subscribed by the native SDK; the Dart app logs in with it later.
    let config = broker
        .client_config("dart", "secret-pass", &session_key)
        .client_id("tablet");
    let native_reader = within("connect", Client::connect(config))
        .await
        .expect("connect");
    let options = durable();
    native_reader
        .subscribe_with("inbox", options)
        .await
        .expect("subscribe");
    native_reader.close().await;

    let ack = native
        .publish("inbox", b"native".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        ack.status,
        PublishStatus::Stored,
        "for the native subscription"
    );
    let ack = native
        .publish_legacy("inbox", "for everyone")
        .await
        .expect("publish");
    assert_eq!(ack.status, PublishStatus::Stored);

    for user in ["phone", "tablet"] {
        let mut dart = Dart::connect(&broker, "/").await;
        dart.init("dart", "secret-pass", Some(user)).await;
        let m = dart.recv().await;
        assert_eq!(m["type"], "message", "{user}: {m}");
        let text = dart_open(&key, &m);
        assert_eq!(text, "for everyone", "{user}");
        dart.send(json!({"type": "ack", "messageId": m["messageId"]}))
            .await;
        assert!(
            dart.recv_within(Duration::from_millis(500)).await.is_none(),
            "{user} was sent a message it cannot read"
        );
    }
}

#[tokio::test]
async fn durable_legacy_subscriber_gets_its_backlog() {
    let (broker, key) = setup(json!({})).await;
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("dart", "secret-pass", Some("tablet")).await;
    dart.send(json!({"type": "subscribe", "topic": "inbox"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(dart);

    let mut publisher = Dart::connect(&broker, "/").await;
    publisher.init("dart", "secret-pass", None).await;
    for i in 0..5 {
        publisher.publish(&key, "inbox", &format!("note {i}")).await;
        assert_eq!(publisher.recv().await["status"], "STORED");
    }
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("dart", "secret-pass", Some("tablet")).await;
    for i in 0..5 {
        let m = dart.recv().await;
        let text = dart_open(&key, &m);
        assert_eq!(text, format!("note {i}"));
        dart.send(json!({"type": "ack", "messageId": m["messageId"]}))
            .await;
    }
}

#[tokio::test]
async fn bad_legacy_input_gets_error_frames() {
    let (broker, key) = setup(json!({})).await;
    let mut dart = Dart::connect(&broker, "/").await;
    // Before init.
    dart.send(json!({"type": "subscribe", "topic": "t"})).await;
    assert_eq!(dart.recv().await["code"], "UNAUTHENTICATED");
    dart.init("dart", "secret-pass", None).await;

    let cases: Vec<(String, &str)> = vec![
        (json!({"type": "teleport"}).to_string(), "INVALID_FRAME"),
        (json!({"type": "subscribe"}).to_string(), "INVALID_FRAME"),
        (json!({"type": "subscribe", "topic": 7}).to_string(), "INVALID_FRAME"),
        (json!({"type": "publish", "topic": "t", "data": "x", "hash": "y", "timestamp": 1, "messageId": "not-a-uuid"}).to_string(), "INVALID_FRAME"),
        // UUID text is the hyphenated form only, as binary chunks carry it.
        (json!({"type": "publish", "topic": "t", "data": "x", "hash": "y", "timestamp": 1, "messageId": uuid::Uuid::new_v4().simple().to_string()}).to_string(), "INVALID_FRAME"),
        (json!({"type": "ack", "messageId": uuid::Uuid::new_v4().braced().to_string()}).to_string(), "INVALID_FRAME"),
        (json!({"type": "publish", "topic": "t", "data": "x", "hash": "y", "timestamp": 1, "messageId": uuid::Uuid::new_v4().to_string()}).to_string(), "STALE_TIMESTAMP"),
        (json!({"type": "ack", "messageId": 12}).to_string(), "INVALID_FRAME"),
        // The limits native clients have: no field of a push token over 4096 bytes, a
        // user id and a token required, no file name over 4096 bytes.
        (json!({"type": "register_fcm_token", "userId": "amy", "fcmToken": "t".repeat(4097)}).to_string(), "INVALID_FRAME"),
        (json!({"type": "register_fcm_token", "userId": "amy", "fcmToken": "t", "deviceId": "d".repeat(4097)}).to_string(), "INVALID_FRAME"),
        (json!({"type": "register_fcm_token", "userId": "", "fcmToken": "t"}).to_string(), "INVALID_FRAME"),
        (json!({"type": "init_file", "fileId": uuid::Uuid::new_v4().to_string(), "fileName": "n".repeat(4097), "fileSize": 1, "topic": "t"}).to_string(), "INVALID_FRAME"),
    ];
    for (frame, code) in cases {
        dart.ws
            .send(Message::text(frame.clone()))
            .await
            .expect("send");
        let answer = dart.recv().await;
        assert_eq!(answer["type"], "error", "{frame}");
        assert_eq!(answer["code"], code, "{frame}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A frame over the 10 MB limit closes that connection only.
    let big = "x".repeat(11 * 1024 * 1024);
    let _ = dart.ws.send(Message::text(big)).await;
    let answer = dart.recv().await;
    assert_eq!(answer["code"], "INVALID_FRAME", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("too large")),
        "{answer}"
    );
    assert_eq!(dart.close_code().await, Some(CloseCode::Protocol));

    let mut again = Dart::connect(&broker, "/").await;
    again.init("dart", "secret-pass", None).await;
    again.send(json!({"type": "subscribe", "topic": "t"})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    again.publish(&key, "t", "still fine").await;
    let mut types = vec![
        again.recv().await["type"].clone(),
        again.recv().await["type"].clone(),
    ];
    types.sort_by_key(|t| t.to_string());
    assert_eq!(types, vec![json!("ack_received"), json!("message")]);

    // Bytes that are not a frame at all get INVALID_FRAME and close the connection, as
    // on the native carriers (design §10); the frames above, wrong only in their
    // fields, left it open.
    let mut not_a_chunk = vec![0x01];
    not_a_chunk.extend_from_slice(&[0; 48]);
    for garbage in [
        Message::text("{not json"),
        Message::text("[]"),
        Message::binary(not_a_chunk),
    ] {
        let mut dart = Dart::connect(&broker, "/").await;
        dart.init("dart", "secret-pass", None).await;
        dart.ws.send(garbage.clone()).await.expect("send");
        let answer = dart.recv().await;
        assert_eq!(answer["code"], "INVALID_FRAME", "{garbage:?}: {answer}");
        assert_eq!(
            dart.close_code().await,
            Some(CloseCode::Protocol),
            "{garbage:?}"
        );
    }
    // Before init too: the error, then the failed login the seed's client waits for.
    let mut early = Dart::connect(&broker, "/").await;
    early
        .ws
        .send(Message::text("{not json"))
        .await
        .expect("send");
    assert_eq!(early.recv().await["code"], "INVALID_FRAME");
    assert_eq!(early.recv().await["type"], "init_response");
    assert_eq!(early.close_code().await, Some(CloseCode::Protocol));
}

/// A broker that pings every 300 ms and closes connections silent for 1.5 s, with
/// the session `dart`.
async fn fast_keep_alive() -> Broker {
    let broker = Broker::start_with(&[
        "--ws-ping-interval-ms",
        "300",
        "--ws-idle-timeout-ms",
        "1500",
    ]);
    broker
        .create_session("dart", "secret-pass", json!({}))
        .await;
    broker
}

#[tokio::test]
async fn keep_alive_pings_and_silent_connections_close() {
    let broker = fast_keep_alive().await;
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("dart", "secret-pass", None).await;

    // While the client reads, it answers pings and the connection stays open.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(next) = tokio::time::timeout_at(until, dart.ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 5, "{pings} pings in 2.5 s at a 300 ms interval");

    // A client that goes silent (not even pongs) is closed.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut closed = false;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(2), dart.ws.next()).await
    {
        if let Message::Close(frame) = message {
            closed = frame.is_some_and(|f| f.reason.contains("idle"));
            break;
        }
    }
    assert!(closed, "the broker closes an idle connection with a reason");
}

#[tokio::test]
async fn fcm_tokens_are_registered_and_never_logged() {
    let broker = Broker::start();
    broker
        .create_session("dart", "secret-pass", json!({}))
        .await;
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("dart", "secret-pass", Some("alice")).await;
    dart.send(json!({
        "type": "register_fcm_token", "userId": "alice", "fcmToken": "FCM-SECRET-TOKEN-123",
        "deviceId": "pixel-7", "platform": "android",
    }))
    .await;
    assert_eq!(
        dart.recv().await,
        json!({"type": "register_fcm_token_response", "success": true})
    );
    dart.send(json!({"type": "register_fcm_token", "userId": "alice"}))
        .await;
    assert_eq!(
        dart.recv().await["code"],
        "INVALID_FRAME",
        "fcmToken is required"
    );
    // Errors name the fields as the legacy client sent them.
    dart.send(
        json!({"type": "register_fcm_token", "userId": "alice", "fcmToken": "t".repeat(4097)}),
    )
    .await;
    let too_long = dart.recv().await;
    assert!(
        too_long["message"]
            .as_str()
            .is_some_and(|m| m.contains("fcmToken is longer than 4096 bytes")),
        "{too_long}"
    );
    assert!(!broker.logs().contains("FCM-SECRET-TOKEN-123"));
    assert!(
        common::contains(&common::db_bytes(&broker.db_path()), b"pixel-7"),
        "the token is stored for pushes"
    );
}

/// State of the broker's end of a TCP connection, from the kernel's table
/// (`/proc/net/tcp`): `Some(1)` while established, `None` once the kernel let go of it.
fn broker_side_tcp_state(broker: SocketAddr, client: SocketAddr) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |field: &str| {
        let hex = field.rsplit(':').next()?;
        u16::from_str_radix(hex, 16).ok()
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        (port(local)? == broker.port() && port(remote)? == client.port())
            .then(|| u8::from_str_radix(state, 16).ok())
            .flatten()
    })
}

const TCP_ESTABLISHED: u8 = 1;

#[tokio::test]
async fn a_client_that_stops_reading_is_let_go_of() {
    let broker = fast_keep_alive().await;
    let key: [u8; 32] = rand::random();

    // A subscriber with a small receive buffer, which stops reading after its init.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = within("connect", socket.connect(broker.http))
        .await
        .expect("connect");
    let client_addr = stream.local_addr().expect("local address");
    let url = format!("ws://{}/", broker.http);
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = within("handshake", tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake");
    let mut stalled = Dart { ws };
    stalled.init("dart", "secret-pass", None).await;
    stalled
        .send(json!({"type": "subscribe", "topic": "feed/#"}))
        .await;

    // ~10 MB for it: more than the socket buffers on both ends hold, so the broker's
    // writer waits on a full socket.
    let mut publisher = Dart::connect(&broker, "/").await;
    publisher.init("dart", "secret-pass", None).await;
    let text = "x".repeat(72 * 1024);
    for _ in 0..100 {
        publisher.publish(&key, "feed/a", &text).await;
    }
    for _ in 0..100 {
        assert_eq!(publisher.recv().await["type"], "ack_received");
    }
    assert_eq!(
        broker_side_tcp_state(broker.http, client_addr),
        Some(TCP_ESTABLISHED)
    );

    // Silent and not reading: after the idle timeout, the writer's 1.5 s without
    // progress and the 2 s the reader lingers for a close, the broker lets the socket go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while broker_side_tcp_state(broker.http, client_addr) == Some(TCP_ESTABLISHED) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker still holds the connection of a client that stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The router forgot it too.
    let mut later = Dart::connect(&broker, "/").await;
    later.init("dart", "secret-pass", None).await;
    later.publish(&key, "feed/a", "anyone?").await;
    assert_eq!(later.recv().await["status"], "NO_SUBSCRIBERS");
    drop((stalled, publisher));
}

/// A second `init` is refused and changes nothing: the first one's `userId` still
/// makes the connection's subscriptions durable.
#[tokio::test]
async fn a_refused_second_init_leaves_the_first_in_force() {
    let (broker, key) = setup(json!({})).await;
    for (first, second) in [(Some("alice"), None), (None, Some("bob"))] {
        let mut dart = Dart::connect(&broker, "/").await;
        dart.init("dart", "secret-pass", first).await;
        let mut frame = json!({"type": "init", "sessionName": "dart", "password": "secret-pass"});
        if let Some(user) = second {
            frame["userId"] = json!(user);
        }
        dart.send(frame).await;
        let refused = dart.recv().await;
        assert_eq!(refused["code"], "INVALID_FRAME", "{refused}");
        let topic = format!("inbox/{}", first.unwrap_or("anon"));
        dart.send(json!({"type": "subscribe", "topic": topic}))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut publisher = Dart::connect(&broker, "/").await;
        publisher.init("dart", "secret-pass", None).await;
        publisher.publish(&key, &topic, "hello").await;
        let ack = publisher.recv().await;
        let expected = if first.is_some() {
            "STORED"
        } else {
            "ACCEPTED"
        };
        assert_eq!(ack["status"], expected, "first init {first:?}: {ack}");
    }
}

/// An `init_file` repeating the id of an upload in progress is refused, and the
/// upload goes on to its end.
#[tokio::test]
async fn a_repeated_init_file_leaves_the_upload_in_progress_alone() {
    let (broker, key) = setup(json!({})).await;
    let mut receiver = Dart::connect(&broker, "/").await;
    receiver.init("dart", "secret-pass", None).await;
    receiver
        .send(json!({"type": "subscribe", "topic": "files/#"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut sender = Dart::connect(&broker, "/").await;
    sender.init("dart", "secret-pass", None).await;
    let id = uuid::Uuid::new_v4().to_string();
    let data = b"first half|second half";
    let init_file = json!({
        "type": "init_file", "fileId": id, "fileName": "doc.txt", "fileSize": data.len(),
        "totalChunks": 2, "topic": "files/doc",
    });
    let chunk = |index: u32, part: &[u8]| {
        let mut frame = vec![0x02];
        frame.extend_from_slice(id.as_bytes());
        frame.extend_from_slice(&index.to_be_bytes());
        frame.extend_from_slice(&common::dart::dart_encrypt_chunk(&key, part));
        Message::binary(frame)
    };
    sender.send(init_file.clone()).await;
    sender.ws.send(chunk(0, &data[..11])).await.expect("chunk");
    sender.send(init_file).await;
    let refused = sender.recv().await;
    // Not REPLAYED ("already accepted"): the upload under way may yet fail.
    assert_eq!(refused["code"], "RATE_LIMITED", "{refused}");
    assert_eq!(refused["messageId"], id.as_str());
    sender.ws.send(chunk(1, &data[11..])).await.expect("chunk");
    sender
        .send(json!({
            "type": "end_file", "fileId": id, "topic": "files/doc",
            "hash": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data)),
        }))
        .await;
    assert_eq!(sender.recv().await["type"], "ack_received");
    let (_, received) = receiver.receive_file(&key).await;
    assert_eq!(received, data);
}

/// An upload that stops half-way is dropped after the idle timeout although its
/// connection lives on (it answers the broker's pings), and the sender is told.
#[tokio::test]
async fn an_upload_that_stops_is_dropped_while_its_connection_lives() {
    let broker = fast_keep_alive().await;
    let mut sender = Dart::connect(&broker, "/").await;
    sender.init("dart", "secret-pass", None).await;
    let id = uuid::Uuid::new_v4().to_string();
    sender
        .send(json!({
            "type": "init_file", "fileId": id, "fileName": "doc.txt", "fileSize": 10,
            "totalChunks": 1, "topic": "files/doc",
        }))
        .await;
    // (The broker's pings every 300 ms keep a per-frame wait from ever running out.)
    let dropped = within("the idle upload to be dropped", sender.recv()).await;
    assert_eq!(dropped["code"], "LIMIT_EXCEEDED", "{dropped}");
    assert_eq!(dropped["messageId"], id.as_str(), "{dropped}");
    // The connection is still there, and the upload is gone.
    let mut chunk = vec![0x02];
    chunk.extend_from_slice(id.as_bytes());
    chunk.extend_from_slice(&0u32.to_be_bytes());
    chunk.extend_from_slice(b"late");
    sender.ws.send(Message::binary(chunk)).await.expect("chunk");
    let refused = sender.recv().await;
    assert_eq!(refused["code"], "NOT_FOUND", "{refused}");
}

/// Frames sent right behind `init` are answered after its `init_response`: the
/// answer to an upload chunk the broker does not know is an error, not a failed login.
#[tokio::test]
async fn init_is_answered_before_the_frames_behind_it() {
    let (broker, _) = setup(json!({})).await;
    for _ in 0..5 {
        let mut dart = Dart::connect(&broker, "/").await;
        let unknown = uuid::Uuid::new_v4().to_string();
        let mut chunk = vec![0x02];
        chunk.extend_from_slice(unknown.as_bytes());
        chunk.extend_from_slice(&0u32.to_be_bytes());
        chunk.extend_from_slice(b"payload");
        let init = json!({"type": "init", "sessionName": "dart", "password": "secret-pass", "userId": "amy"});
        dart.ws
            .feed(Message::text(init.to_string()))
            .await
            .expect("feed");
        dart.ws.feed(Message::binary(chunk)).await.expect("feed");
        let fcm = json!({"type": "register_fcm_token", "userId": "amy", "fcmToken": "t"});
        dart.ws
            .feed(Message::text(fcm.to_string()))
            .await
            .expect("feed");
        dart.ws.flush().await.expect("flush");
        let first = dart.recv().await;
        assert_eq!(
            first,
            json!({"type": "init_response", "success": true, "sessionName": "dart"})
        );
        let second = dart.recv().await;
        assert_eq!(second["code"], "NOT_FOUND", "{second}");
        let third = dart.recv().await;
        assert_eq!(third["type"], "register_fcm_token_response", "{third}");
    }
}

/// An `init` that cannot be read is answered as a failed login, at once; a file
/// chunk before any `init` is refused as unauthenticated.
#[tokio::test]
async fn a_malformed_init_fails_the_login() {
    let (broker, _) = setup(json!({})).await;
    let mut early = Dart::connect(&broker, "/").await;
    let mut chunk = vec![0x02];
    chunk.extend_from_slice(uuid::Uuid::new_v4().to_string().as_bytes());
    chunk.extend_from_slice(&0u32.to_be_bytes());
    early.ws.send(Message::binary(chunk)).await.expect("send");
    assert_eq!(early.recv().await["code"], "UNAUTHENTICATED");

    for init in [
        json!({"type": "init", "sessionName": 7, "password": "secret-pass"}),
        json!({"type": "init", "sessionName": "dart"}),
        json!({"type": "init", "sessionName": "dart", "password": 7}),
    ] {
        let mut dart = Dart::connect(&broker, "/").await;
        dart.send(init.clone()).await;
        let answer = within("the answer", dart.recv_within(Duration::from_secs(2)))
            .await
            .expect("an answer before the 5 s init deadline");
        assert_eq!(answer["type"], "init_response", "{init}: {answer}");
        assert_eq!(answer["success"], false);
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("init")));
        assert_eq!(dart.close_code().await, Some(CloseCode::Protocol));
    }
}
