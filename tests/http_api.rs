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

/// A client that sends nothing, or sends a request's head a byte at a time, is
/// closed once `--http-timeout-ms` has passed; one whose body does not arrive in that
/// time gets 408. (Only the body's arrival is timed: creating the session, argon2 and
/// all, may take longer, as it may in a debug build.)
/// Neither holds a socket and a task for ever (slowloris), and the broker serves on.
#[tokio::test]
async fn slow_or_silent_http_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = Broker::start_with(&["--http-timeout-ms", "1000"]);
    let connect = || async {
        tokio::net::TcpStream::connect(broker.http)
            .await
            .expect("connect")
    };

    let mut silent = connect().await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte))
        .await
        .expect("a silent connection closed within 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // A byte every 100 ms: never silent, but the head is not whole in time.
    let mut dribbler = connect().await;
    dribbler
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                read = dribbler.read_buf(&mut answer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = tick.tick() => {
                    if dribbler.write_all(b"X").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a dribbled head still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        !String::from_utf8_lossy(&answer).contains(" 200 "),
        "the unfinished request was answered"
    );

    // The head whole, the body short of its Content-Length.
    let mut slow_body = connect().await;
    slow_body
        .write_all(
            b"POST /api/createSession HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"sess",
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow_body.read_to_end(&mut answer))
        .await
        .expect("the broker answered and closed within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");

    // A prompt client is served as ever.
    let (status, _) = broker
        .post_session("after-slow", "secret-pass", json!({}))
        .await;
    assert_eq!(status, 200);
}
