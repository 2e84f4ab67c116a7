//! Hostile and broken input: a clear `Error` frame, then a closed connection (or just a
//! refused request), and a broker that keeps serving everyone else.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Broker, error_code, now_ms, publish, stream_frames, within};
use fastport::client::SessionKey;
use fastport::proto::{self, ErrorCode, PayloadFormat, client_frame, server_frame};
use serde_json::json;

async fn still_serving(broker: &Broker, session: &str) {
    let key = SessionKey::generate();
    let client = broker.client(session, "secret-pass", &key).await;
    let mut sub = client.subscribe("health/check").await.expect("subscribe");
    client
        .publish("health/check", b"alive".to_vec())
        .await
        .expect("publish");
    let m = within("round trip", sub.next()).await.expect("message");
    assert_eq!(m.payload, &b"alive"[..]);
}

#[tokio::test]
async fn broken_framing_gets_invalid_frame_and_a_closed_connection() {
    let broker = Broker::start_with(&["--max-payload", "65536"]);
    broker.create_session("bad", "secret-pass", json!({})).await;

    // Bytes that are not a ClientFrame.
    let mut raw = broker.raw().await;
    raw.send_bytes(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::InvalidFrame);
    assert!(
        raw.closed_within(Duration::from_secs(3)).await,
        "connection must be closed"
    );

    // A 4 GiB length prefix: refused at once, nothing buffered.
    let mut raw = broker.raw().await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, 0x0f]).await;
    let answer = raw.next().await;
    assert_eq!(error_code(&answer), ErrorCode::InvalidFrame);
    if let server_frame::Kind::Error(e) = &answer {
        assert!(
            e.message.contains("over the limit"),
            "message: {}",
            e.message
        );
    }
    assert!(raw.closed_within(Duration::from_secs(3)).await);

    // A whole frame over the broker's limit, after a successful Hello.
    let mut raw = broker.raw().await;
    raw.login("bad", "secret-pass", "").await;
    raw.send(client_frame::Kind::Publish(proto::Publish {
        message_id: Bytes::copy_from_slice(&[1; 16]),
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 200_000]),
        timestamp_ms: now_ms(),
        format: PayloadFormat::NativeV1 as i32,
    }))
    .await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::InvalidFrame);
    assert!(raw.closed_within(Duration::from_secs(3)).await);

    still_serving(&broker, "bad").await;
}

/// Design §10 holds on file streams too: bytes that do not decode close the
/// connection, a well-formed frame out of place only ends its upload.
#[tokio::test]
async fn a_file_stream_that_does_not_decode_closes_the_connection() {
    let broker = Broker::start();
    broker.create_session("bad", "secret-pass", json!({})).await;
    let mut raw = broker.raw().await;
    raw.login("bad", "secret-pass", "").await;

    let publish = client_frame::Kind::Publish(proto::Publish::default());
    let answer = raw.upload(&stream_frames([publish])).await;
    assert_eq!(error_code(&answer), ErrorCode::InvalidFrame);
    assert!(!raw.closed_within(Duration::from_millis(500)).await);

    let answer = raw.upload(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(error_code(&answer), ErrorCode::InvalidFrame);
    assert!(
        raw.closed_within(Duration::from_secs(3)).await,
        "connection must be closed"
    );
    still_serving(&broker, "bad").await;
}

#[tokio::test]
async fn refused_frames_leave_the_connection_open() {
    let broker = Broker::start();
    broker
        .create_session("strict", "secret-pass", json!({"maxPayloadBytes": 1024}))
        .await;
    let mut raw = broker.raw().await;

    // Before Hello: each refusal names the request it answers.
    raw.send(client_frame::Kind::Subscribe(proto::Subscribe {
        request_id: 3,
        topic: "t".into(),
        ..Default::default()
    }))
    .await;
    raw.send(client_frame::Kind::GetKeys(proto::GetKeys {
        request_id: 4,
    }))
    .await;
    for request_id in [3, 4] {
        match raw.next().await {
            server_frame::Kind::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unauthenticated as i32);
                assert_eq!(e.request_id, request_id, "{e:?}");
            }
            other => panic!("expected Error, got {other:?}"),
        }
    }
    // Wrong password, then the right one on the same connection.
    assert_eq!(
        error_code(&raw.hello("strict", "nope", "").await),
        ErrorCode::Unauthenticated
    );
    raw.login("strict", "secret-pass", "").await;

    // A frame with only an unknown field: well-formed, but no kind.
    raw.send_bytes(&[0x03, 0xf8, 0x06, 0x01]).await; // field 111, varint 1
    assert_eq!(error_code(&raw.next().await), ErrorCode::InvalidFrame);

    // Over the session's payload limit: that publish is refused.
    let id = [9u8; 16];
    raw.send(client_frame::Kind::Publish(proto::Publish {
        message_id: Bytes::copy_from_slice(&id),
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 1025]),
        timestamp_ms: now_ms(),
        format: PayloadFormat::NativeV1 as i32,
    }))
    .await;
    let answer = raw.next().await;
    assert_eq!(error_code(&answer), ErrorCode::PayloadTooLarge);
    if let server_frame::Kind::Error(e) = &answer {
        assert_eq!(e.message_id.as_ref(), &id);
    }

    // Invalid topic, bad id, unknown format.
    raw.send(client_frame::Kind::Subscribe(proto::Subscribe {
        request_id: 44,
        topic: "a/#/b".into(),
        ..Default::default()
    }))
    .await;
    let answer = raw.next().await;
    assert_eq!(error_code(&answer), ErrorCode::InvalidFrame);
    if let server_frame::Kind::Error(e) = &answer {
        assert_eq!(e.request_id, 44, "the error answers its request");
    }
    raw.send(client_frame::Kind::Publish(proto::Publish {
        message_id: Bytes::from_static(b"short"),
        topic: "t".into(),
        timestamp_ms: now_ms(),
        format: PayloadFormat::NativeV1 as i32,
        ..Default::default()
    }))
    .await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::InvalidFrame);
    raw.send(client_frame::Kind::Publish(proto::Publish {
        message_id: Bytes::copy_from_slice(&[7; 16]),
        topic: "t".into(),
        timestamp_ms: now_ms(),
        format: 42,
        ..Default::default()
    }))
    .await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::InvalidFrame);
    // LEGACY_JSON that is not the legacy {"data","hash"} JSON: legacy subscribers
    // could not read it.
    for payload in [
        &b"not json"[..],
        br#"{"data":"ZW5j"}"#,
        br#"{"data":1,"hash":"h"}"#,
        br#"["ZW5j","h"]"#,
    ] {
        raw.send(client_frame::Kind::Publish(proto::Publish {
            message_id: Bytes::copy_from_slice(&[8; 16]),
            topic: "t".into(),
            payload: Bytes::from_static(payload),
            timestamp_ms: now_ms(),
            format: PayloadFormat::LegacyJson as i32,
        }))
        .await;
        assert_eq!(error_code(&raw.next().await), ErrorCode::InvalidFrame);
    }

    // Still alive.
    raw.send(client_frame::Kind::Ping(proto::Ping { nonce: 77 }))
        .await;
    assert!(matches!(
        raw.next().await,
        server_frame::Kind::Pong(proto::Pong { nonce: 77 })
    ));
    still_serving(&broker, "strict").await;
}

#[tokio::test]
async fn silent_clients_are_closed_after_the_hello_deadline() {
    let broker = Broker::start();
    broker
        .create_session("quiet", "secret-pass", json!({}))
        .await;
    let mut raw = broker.raw().await;
    raw.send(client_frame::Kind::Ping(proto::Ping { nonce: 1 }))
        .await;
    assert!(matches!(raw.next().await, server_frame::Kind::Pong(_)));
    // No Hello: closed a little after 5 s.
    assert!(
        !raw.closed_within(Duration::from_secs(3)).await,
        "closed too early"
    );
    let answer = raw.next_within(Duration::from_secs(5)).await;
    let kind = answer
        .and_then(|f| f.kind)
        .expect("an Error before closing");
    assert_eq!(error_code(&kind), ErrorCode::InvalidFrame);
    assert!(raw.closed_within(Duration::from_secs(3)).await);
    still_serving(&broker, "quiet").await;
}

/// Every frame before a successful Hello is answered, so a client may be sent only
/// so many answers (pongs, refusals of frames that do not even parse): one that sends
/// frames without reading would otherwise hold its connection (and the Hello
/// deadline) forever.
#[tokio::test]
async fn a_connection_makes_only_so_many_requests_before_hello() {
    let broker = Broker::start();
    broker
        .create_session("busy", "secret-pass", json!({}))
        .await;
    let mut raw = broker.raw().await;
    let max = fastport::carrier::MAX_BEFORE_LOGIN;
    for nonce in 0..u64::from(max) {
        if nonce % 2 == 0 {
            raw.send(client_frame::Kind::Ping(proto::Ping { nonce }))
                .await;
        } else {
            raw.send(client_frame::Kind::Subscribe(proto::Subscribe {
                request_id: nonce,
                topic: "bad/#/filter".into(),
                ..Default::default()
            }))
            .await;
        }
    }
    for nonce in 0..max {
        let kind = raw.next().await;
        if nonce % 2 == 0 {
            assert!(matches!(kind, server_frame::Kind::Pong(_)), "{kind:?}");
        } else {
            assert_eq!(error_code(&kind), ErrorCode::InvalidFrame, "{kind:?}");
        }
    }
    assert!(
        !raw.closed_within(Duration::from_millis(300)).await,
        "open while within the bound"
    );
    raw.send(client_frame::Kind::Ping(proto::Ping { nonce: 0 }))
        .await;
    let kind = raw.next().await;
    assert_eq!(error_code(&kind), ErrorCode::Unauthenticated, "{kind:?}");
    assert!(raw.closed_within(Duration::from_secs(3)).await);
    still_serving(&broker, "busy").await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let broker = Broker::start();
    broker.create_session("dup", "secret-pass", json!({})).await;
    let mut first = broker.raw().await;
    first.login("dup", "secret-pass", "device-1").await;
    let mut second = broker.raw().await;
    second.login("dup", "secret-pass", "device-1").await;
    assert_eq!(error_code(&first.next().await), ErrorCode::TakenOver);
    assert!(first.closed_within(Duration::from_secs(3)).await);
    second
        .send(client_frame::Kind::Ping(proto::Ping { nonce: 5 }))
        .await;
    assert!(matches!(second.next().await, server_frame::Kind::Pong(_)));
}

/// `--max-replay-ids` caps the ids a session's replay guard holds: a fresh id past
/// it is refused `RATE_LIMITED` (not dropped, and nothing is forgotten early), a
/// repeated one is still `REPLAYED`, and the connection stays open.
#[tokio::test]
async fn a_full_replay_guard_refuses_fresh_ids_with_rate_limited() {
    let broker = Broker::start_with(&["--max-replay-ids", "3"]);
    broker
        .create_session("capped", "secret-pass", json!({}))
        .await;
    let mut raw = broker.raw().await;
    raw.login("capped", "secret-pass", "").await;
    let nth = |id: u8| publish([id; 16], "t", now_ms());
    for id in 1..=3 {
        raw.send(nth(id)).await;
        assert!(
            matches!(raw.next().await, server_frame::Kind::PubAck(_)),
            "publish {id} fits"
        );
    }
    raw.send(nth(4)).await;
    let answer = raw.next().await;
    assert_eq!(error_code(&answer), ErrorCode::RateLimited);
    if let server_frame::Kind::Error(e) = &answer {
        assert_eq!(&e.message_id[..], &[4; 16], "the refusal names the publish");
        assert!(e.message.contains("replay window is full"), "{}", e.message);
    }
    raw.send(nth(2)).await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::Replayed);
    assert!(
        !raw.closed_within(Duration::from_millis(300)).await,
        "refusals leave the connection open"
    );
}
