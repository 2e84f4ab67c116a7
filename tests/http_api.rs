//! The HTTP API of the real broker: health, createSession (seed-compatible), the
//! certificate hash.

mod common;

use std::time::Duration;

use common::{Broker, within};
use fastport::client::{ClientError, SessionKey};
use fastport::proto::ErrorCode;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

async fn get(broker: &Broker, path: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = within("GET", reqwest::get(broker.http_url(path)))
        .await
        .expect("GET");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        headers,
    )
}

#[tokio::test]
async fn health_reports_status_uptime_sessions_and_connections() {
    let broker = Broker::start();
    let (status, body, _) = get(&broker, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert!(body["uptime"].is_u64());
    assert_eq!(body["activeSessions"], 0);
    assert_eq!(body["connections"], 0);
    broker.create_session("one", "secret-pass", json!({})).await;
    let (_, body, _) = get(&broker, "/health").await;
    assert_eq!(body["activeSessions"], 1);

    // The router's counters: connections and clients with subscriptions.
    let key = SessionKey::generate();
    let client = broker.client("one", "secret-pass", &key).await;
    let _other = broker.client("one", "secret-pass", &key).await;
    let _sub = client.subscribe("t/#").await.expect("subscribe");
    let (status, body, _) = get(&broker, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["connections"], 2, "{body}");
    assert_eq!(body["subscribers"], 1, "{body}");
}

#[tokio::test]
async fn create_session_is_seed_compatible_and_safe() {
    let broker = Broker::start();
    let key = SessionKey::generate();
    // The seed's Dart body, encryptionKey included.
    let (status, body) = broker
        .post_session(
            "my_chat_room",
            "secure_pass_123",
            json!({
                "retryInterval": 5000,
                "maxRetryLimit": 100,
                "encryptionKey": key.to_base64(),
                "messageExpiryTime": 3600000
            }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert_eq!(body["sessionName"], "my_chat_room");
    let warnings = body["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap_or("").contains("encryptionKey"))
    );
    assert!(
        !broker.logs().contains(&key.to_base64()),
        "the key must never be logged"
    );
    assert!(
        !common::contains(
            &common::db_bytes(&broker.db_path()),
            key.to_base64().as_bytes()
        ),
        "the key must never be stored"
    );

    // Re-creating does not take the session over.
    let (status, body) = broker
        .post_session("my_chat_room", "attacker-pass", json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["success"], false);
    let taken = fastport::client::Client::connect(broker.client_config(
        "my_chat_room",
        "attacker-pass",
        &key,
    ))
    .await;
    assert!(matches!(
        taken,
        Err(ClientError::Refused {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    let owner = broker.client("my_chat_room", "secure_pass_123", &key).await;
    let info = owner.session_info();
    assert_eq!(
        (
            info.retry_interval_ms,
            info.max_retries,
            info.message_expiry_ms
        ),
        (5000, 100, 3_600_000)
    );

    // Invalid fields are named.
    for (body, field) in [
        (json!({"password": "x"}), "sessionName"),
        (json!({"sessionName": "ok"}), "password"),
        (
            json!({"sessionName": "bad name", "password": "p"}),
            "sessionName",
        ),
        (json!({"sessionName": "..", "password": "p"}), "sessionName"),
        (
            json!({"sessionName": "ok2", "password": "p", "retryInterval": "soon"}),
            "retryInterval",
        ),
        (
            json!({"sessionName": "ok3", "password": "p", "maxRetryLimit": 1_000_000}),
            "maxRetryLimit",
        ),
    ] {
        let (status, answer) = broker.post_json("/api/createSession", &body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(answer["success"], false);
        assert!(
            answer["error"].as_str().unwrap_or("").contains(field),
            "{answer}"
        );
    }
    let response = reqwest::Client::new()
        .post(broker.http_url("/api/createSession"))
        .body("{not json")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 400);

    // Refusals before the handler's own checks answer in the same JSON shape.
    let too_large = reqwest::Client::new()
        .post(broker.http_url("/api/createSession"))
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .expect("POST");
    assert_eq!(too_large.status().as_u16(), 413);
    let body: serde_json::Value = too_large.json().await.expect("a JSON body");
    assert_eq!(body["success"], false, "{body}");
    let wrong_method = reqwest::get(broker.http_url("/api/createSession"))
        .await
        .expect("GET");
    assert_eq!(wrong_method.status().as_u16(), 405);
    let body: serde_json::Value = wrong_method.json().await.expect("a JSON body");
    assert_eq!(body["success"], false, "{body}");
}

#[tokio::test]
async fn session_creation_is_rate_limited_per_ip() {
    let broker = Broker::start_with(&[
        "--create-session-limit",
        "3",
        "--create-session-window",
        "60",
    ]);
    let started = std::time::Instant::now();
    for i in 0..3 {
        let (status, _) = broker
            .post_session(&format!("s{i}"), "secret-pass", json!({}))
            .await;
        assert_eq!(status, 200);
    }
    let response = reqwest::Client::new()
        .post(broker.http_url("/api/createSession"))
        .json(&json!({"sessionName": "s4", "password": "secret-pass"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    // 3 per 60 s frees one every 20 s, counted from the first request: 20 s minus
    // what has passed since, rounded up (so a client that waits what it is told is
    // not refused again), never down.
    let passed = started.elapsed().as_secs();
    assert!(
        (20 - passed..=20).contains(&retry_after),
        "Retry-After {retry_after} s, {passed} s after the first request"
    );
}

#[tokio::test]
async fn cert_hash_matches_the_served_leaf() {
    let broker = Broker::start();
    let (status, body, _) = get(&broker, "/v1/cert-hash").await;
    assert_eq!(status, 200);
    assert_eq!(body["algorithm"], "sha-256");
    let leaf =
        CertificateDer::from_pem_file(broker.dir.path().join("certs/leaf.pem")).expect("leaf.pem");
    assert_eq!(body["hash"], hex::encode(Sha256::digest(leaf.as_ref())));
    let not_after = body["not_after"].as_str().expect("not_after");
    assert!(
        not_after.ends_with('Z') && not_after.contains('T'),
        "RFC 3339: {not_after}"
    );
    let (status, body, _) = get(&broker, "/no/such/path").await;
    assert_eq!(status, 404);
    assert_eq!(body["success"], false);
}

/// A TCP connection that sends nothing is closed once idle for twice the WebSocket
/// idle timeout and 5 s, instead of holding a socket and a task forever.
#[tokio::test]
async fn a_silent_http_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    let broker = Broker::start_with(&[
        "--ws-ping-interval-ms",
        "300",
        "--ws-idle-timeout-ms",
        "700",
    ]);
    let mut silent = tokio::net::TcpStream::connect(broker.http)
        .await
        .expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The broker still serves.
    let (status, _) = broker
        .post_session("after-idle", "secret-pass", json!({}))
        .await;
    assert_eq!(status, 200);
}
