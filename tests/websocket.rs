//! Protobuf over WebSocket (`/v1/ws`): the SDK over `ws://`, the fallback from QUIC,
//! and broken input on the endpoint.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Broker, within};
use fastport::client::{Client, ClientConfig, SessionKey};
use fastport::proto::{self, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn sdk_over_websocket_talks_with_sdk_over_quic() {
    let broker = Broker::start();
    broker.create_session("web", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    // The URL the broker prints for this carrier.
    let url = broker.banner_url("ws");
    assert_eq!(url, format!("ws://{}/v1/ws", broker.http));
    let over_ws = within(
        "ws connect",
        Client::connect(ClientConfig::new(url, "web", "secret-pass", key.clone())),
    )
    .await
    .expect("connect over WebSocket");
    let over_quic = broker.client("web", "secret-pass", &key).await;

    let mut ws_sub = over_ws.subscribe("a/#").await.expect("subscribe");
    let mut quic_sub = over_quic.subscribe("b/#").await.expect("subscribe");
    over_quic
        .publish("a/1", b"quic to ws".to_vec())
        .await
        .expect("publish");
    over_ws
        .publish("b/1", b"ws to quic".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        within("ws gets", ws_sub.next()).await.expect("msg").payload,
        &b"quic to ws"[..]
    );
    assert_eq!(
        within("quic gets", quic_sub.next())
            .await
            .expect("msg")
            .payload,
        &b"ws to quic"[..]
    );

    let info = over_ws.session_info();
    assert_eq!(
        info.retry_interval_ms, 5000,
        "Welcome arrived over WebSocket"
    );
}

#[tokio::test]
async fn sdk_falls_back_to_websocket_when_quic_cannot_connect() {
    // QUIC listens elsewhere, so quic://<http address> finds no QUIC there.
    let broker = Broker::start();
    broker.create_session("fb", "secret-pass", json!({})).await;
    let key = SessionKey::generate();
    let url = format!("quic://{}", broker.http);
    let config =
        ClientConfig::new(url.clone(), "fb", "secret-pass", key.clone()).ca_file(broker.ca());
    let client = within("fallback connect", Client::connect(config))
        .await
        .expect("fell back");
    let mut sub = client.subscribe("t").await.expect("subscribe");
    client
        .publish("t", b"via fallback".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        within("delivery", sub.next()).await.expect("msg").payload,
        &b"via fallback"[..]
    );

    // Without the fallback the same URL fails.
    let config = ClientConfig::new(url, "fb", "secret-pass", key)
        .ca_file(broker.ca())
        .websocket_fallback(false);
    assert!(
        within("no fallback", Client::connect(config))
            .await
            .is_err()
    );
}

/// A broker shutting down tells its WebSocket clients, native and legacy alike, with
/// a close frame (1001, going away), instead of dropping their connections unsaid.
#[tokio::test]
async fn a_shutdown_tells_websocket_clients_it_is_going_away() {
    let mut broker = Broker::start();
    broker.create_session("bye", "secret-pass", json!({})).await;
    let mut native = raw(&broker).await;
    hello(&mut native, "bye").await;
    let mut legacy = within(
        "connect",
        tokio_tungstenite::connect_async(format!("ws://{}/", broker.http)),
    )
    .await
    .expect("connect")
    .0;

    broker.signal_terminate();
    for (name, ws) in [("native", &mut native), ("legacy", &mut legacy)] {
        let close = loop {
            match within("the close frame", ws.next()).await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{name}: expected a close frame, got {other:?}"),
            }
        };
        let close = close.unwrap_or_else(|| panic!("{name}: a close frame without a code"));
        assert_eq!(u16::from(close.code), 1001, "{name}: {close:?}");
        assert!(close.reason.contains("shutting down"), "{name}: {close:?}");
    }
    let status = tokio::task::spawn_blocking(move || broker.wait_exit())
        .await
        .expect("waited");
    assert!(status.success(), "exit status {status}");
}

/// A file upload nothing arrives for in the idle timeout is dropped (and the client
/// told), even while the connection itself stays busy: it would hold a spool file and
/// its receivers for as long as the connection lasts.
#[tokio::test]
async fn an_idle_file_upload_is_dropped_on_a_busy_connection() {
    let broker = Broker::start_with(&[
        "--ws-idle-timeout-ms",
        "1500",
        "--ws-ping-interval-ms",
        "1000",
    ]);
    broker
        .create_session("idle", "secret-pass", json!({}))
        .await;
    let mut ws = raw(&broker).await;
    hello(&mut ws, "idle").await;
    let file_id = Bytes::from_static(&[7; 16]);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let header = client_frame::Kind::FileHeader(proto::FileHeader {
        file_id: file_id.clone(),
        topic: "docs/a".into(),
        name: "a.bin".into(),
        size: 10,
        chunk_size: 10,
        chunk_count: 1,
        timestamp_ms: now_ms,
        ..Default::default()
    });
    send(&mut ws, header.clone()).await;

    // Pings keep the connection alive; the upload gets nothing.
    let mut dropped = None;
    for nonce in 0..20 {
        send(&mut ws, client_frame::Kind::Ping(proto::Ping { nonce })).await;
        match next(&mut ws).await {
            Some(server_frame::Kind::Pong(_)) => {}
            Some(server_frame::Kind::Error(e)) => {
                dropped = Some(e);
                break;
            }
            other => panic!("expected Pong or Error, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let error = dropped.expect("the idle upload was never dropped");
    assert_eq!(error.code, ErrorCode::LimitExceeded as i32, "{error:?}");
    assert_eq!(error.message_id, file_id, "{error:?}");
    assert!(error.message.contains("idle"), "{error:?}");

    // It is gone: its chunk finds no upload.
    let chunk = client_frame::Kind::FileChunk(proto::FileChunk {
        file_id: file_id.clone(),
        index: 0,
        payload: Bytes::from_static(b"0123456789"),
    });
    send(&mut ws, chunk.clone()).await;
    loop {
        match next(&mut ws).await {
            Some(server_frame::Kind::Pong(_)) => continue,
            other => {
                assert_eq!(code(other), ErrorCode::NotFound);
                break;
            }
        }
    }

    // And its id was given back: the file can be sent again under it, and while that
    // upload is under way, a second offer is refused as such (not as a replay).
    send(&mut ws, header.clone()).await;
    send(&mut ws, header).await;
    assert_eq!(code(next(&mut ws).await), ErrorCode::RateLimited);
    send(&mut ws, chunk).await;
    let end = client_frame::Kind::FileEnd(proto::FileEnd {
        file_id: file_id.clone(),
        sha256: Bytes::from_static(&[0; 32]),
        mac: Bytes::from_static(&[0; 32]),
    });
    send(&mut ws, end).await;
    match next(&mut ws).await {
        Some(server_frame::Kind::FileAccepted(a)) => assert_eq!(a.file_id, file_id),
        other => panic!("expected FileAccepted, got {other:?}"),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(broker: &Broker) -> Ws {
    let url = format!("ws://{}/v1/ws", broker.http);
    within("connect", tokio_tungstenite::connect_async(url))
        .await
        .expect("connect")
        .0
}

async fn send(ws: &mut Ws, kind: client_frame::Kind) {
    let bytes = ClientFrame { kind: Some(kind) }.encode_to_vec();
    ws.send(Message::Binary(bytes.into())).await.expect("send");
}

/// The next frame, or `None` once the broker closes.
async fn next(ws: &mut Ws) -> Option<server_frame::Kind> {
    loop {
        match within("frame", ws.next()).await {
            Some(Ok(Message::Binary(b))) => return ServerFrame::decode(b).expect("decodes").kind,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return None,
        }
    }
}

/// Logs in to `session` (password `secret-pass`) and reads the `Welcome`.
async fn hello(ws: &mut Ws, session: &str) {
    send(
        ws,
        client_frame::Kind::Hello(proto::Hello {
            protocol_version: 1,
            session: session.into(),
            password: "secret-pass".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(matches!(
        next(ws).await,
        Some(server_frame::Kind::Welcome(_))
    ));
}

fn code(kind: Option<server_frame::Kind>) -> ErrorCode {
    match kind {
        Some(server_frame::Kind::Error(e)) => ErrorCode::try_from(e.code).expect("known"),
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_input_on_v1_ws() {
    let broker = Broker::start();
    broker.create_session("bad", "secret-pass", json!({})).await;

    // Refused but alive: before Hello, an empty frame.
    let mut ws = raw(&broker).await;
    send(&mut ws, client_frame::Kind::Ping(proto::Ping { nonce: 3 })).await;
    assert!(matches!(
        next(&mut ws).await,
        Some(server_frame::Kind::Pong(proto::Pong { nonce: 3 }))
    ));
    send(
        &mut ws,
        client_frame::Kind::Subscribe(proto::Subscribe {
            request_id: 1,
            topic: "t".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(code(next(&mut ws).await), ErrorCode::Unauthenticated);
    send(
        &mut ws,
        client_frame::Kind::Hello(proto::Hello {
            protocol_version: 1,
            session: "bad".into(),
            password: "secret-pass".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(matches!(
        next(&mut ws).await,
        Some(server_frame::Kind::Welcome(_))
    ));
    ws.send(Message::Binary(Bytes::new())).await.expect("send"); // no kind
    assert_eq!(code(next(&mut ws).await), ErrorCode::InvalidFrame);
    send(&mut ws, client_frame::Kind::Ping(proto::Ping { nonce: 4 })).await;
    assert!(matches!(
        next(&mut ws).await,
        Some(server_frame::Kind::Pong(_))
    ));

    // Undecodable bytes: INVALID_FRAME, then closed.
    ws.send(Message::Binary(Bytes::from_static(&[0xff, 0xff, 0xff])))
        .await
        .expect("send");
    assert_eq!(code(next(&mut ws).await), ErrorCode::InvalidFrame);
    assert!(
        next(&mut ws).await.is_none(),
        "closed after undecodable bytes"
    );

    // Text on the binary endpoint: INVALID_FRAME, then closed.
    let mut ws = raw(&broker).await;
    ws.send(Message::text("{\"type\":\"init\"}"))
        .await
        .expect("send");
    assert_eq!(code(next(&mut ws).await), ErrorCode::InvalidFrame);
    assert!(next(&mut ws).await.is_none());

    // Over the frame limit: INVALID_FRAME, then closed.
    let mut ws = raw(&broker).await;
    let _ = ws
        .send(Message::Binary(vec![0u8; 11 * 1024 * 1024].into()))
        .await;
    assert_eq!(code(next(&mut ws).await), ErrorCode::InvalidFrame);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), next(&mut ws))
            .await
            .ok()
            .flatten()
            .is_none()
    );

    // Everyone else is fine.
    let key = SessionKey::generate();
    let client = broker.client("bad", "secret-pass", &key).await;
    let mut sub = client.subscribe("t").await.expect("subscribe");
    client.publish("t", b"ok".to_vec()).await.expect("publish");
    assert_eq!(
        within("round trip", sub.next()).await.expect("msg").payload,
        &b"ok"[..]
    );
}

/// `--max-connections` counts QUIC and WebSocket connections together: at the limit a
/// QUIC handshake is refused and a WebSocket upgrade gets 503, and a connection that
/// ends frees its slot.
#[tokio::test]
async fn the_broker_takes_only_so_many_connections() {
    let broker = Broker::start_with(&["--max-connections", "2"]);
    broker
        .create_session("full", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let over_quic = broker.client("full", "secret-pass", &key).await;
    let ws_url = broker.banner_url("ws");
    let ws_config = || ClientConfig::new(ws_url.clone(), "full", "secret-pass", key.clone());
    let _over_ws = within("ws connect", Client::connect(ws_config()))
        .await
        .expect("connect over WebSocket");

    let refused = within(
        "QUIC at the limit",
        Client::connect(broker.client_config("full", "secret-pass", &key)),
    )
    .await;
    let error = refused
        .err()
        .expect("a third connection is refused")
        .to_string();
    assert!(error.contains("refused"), "{error}");
    let upgrade = within(
        "upgrade at the limit",
        tokio_tungstenite::connect_async(ws_url.as_str()),
    )
    .await;
    match upgrade {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
        }
        other => panic!("a WebSocket upgrade at the limit must get 503, got {other:?}"),
    }
    // Plain HTTP is not a client connection.
    let (status, _) = broker.post_session("other", "secret-pass", json!({})).await;
    assert_eq!(status, 200);

    over_quic.close().await;
    broker.client_when_room("full", "secret-pass", &key).await;
}
