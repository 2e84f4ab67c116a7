//! `POST /api/createSession`, compatible with the seeds' clients.
//!
//! Answers as the seed does (`200 {"success":true,"sessionName":…}`), plus `warnings`
//! when there is something to say. Differences, on purpose: a name that exists answers
//! `409` and changes nothing (nobody can take a session over by re-creating it), and an
//! `encryptionKey` is accepted but never stored or logged — the key must never reach the
//! server, and the response says so.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Map, Value, json};

use crate::core::{
    MAX_HISTORY_SIZE, MAX_RETRIES_LIMIT, MESSAGE_EXPIRY_RANGE, RETRY_INTERVAL_RANGE, SessionName,
    SessionSettings,
};
use crate::driver::now_ms;
use crate::store::{SessionRecord, StoreError};

use super::HttpState;

/// Longest password accepted.
const MAX_PASSWORD: usize = 1024;
/// Shorter passwords are accepted with a warning.
const WEAK_PASSWORD: usize = 8;

/// How many sessions one IP may create per window (seed: 100 per 15 minutes).
#[derive(Debug, Clone, Copy)]
pub struct CreateSessionLimit {
    pub count: u32,
    pub window: Duration,
}

impl Default for CreateSessionLimit {
    fn default() -> Self {
        Self {
            count: 100,
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// State of the session API.
pub struct SessionApi {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    max_payload_bytes: u64,
    /// How long a request's body may take to arrive (`--http-timeout-ms`).
    body_timeout: Duration,
}

impl SessionApi {
    pub fn new(limit: CreateSessionLimit, max_payload_bytes: u64, body_timeout: Duration) -> Self {
        let count = NonZeroU32::new(limit.count).unwrap_or(NonZeroU32::MIN);
        let period = (limit.window / count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(count))
            .allow_burst(count);
        Self {
            limiter: RateLimiter::keyed(quota),
            max_payload_bytes,
            body_timeout,
        }
    }
}

/// A 400 answer naming what is wrong.
#[derive(Debug)]
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        let body = json!({"success": false, "error": self.0});
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

fn bad_request(error: impl Into<String>) -> BadRequest {
    BadRequest(error.into())
}

/// Reads an optional non-negative integer field within `range`.
fn int_field(
    body: &Map<String, Value>,
    field: &str,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
) -> Result<u64, BadRequest> {
    let Some(value) = body.get(field).filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    match value.as_u64() {
        Some(n) if range.contains(&n) => Ok(n),
        Some(_) | None => Err(bad_request(format!(
            "{field} must be an integer from {} to {}",
            range.start(),
            range.end()
        ))),
    }
}

fn string_field<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, BadRequest> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad_request(format!("{field} must be a string"))),
        None => Err(bad_request(format!("{field} is required"))),
    }
}

/// The handler.
pub async fn create_session(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(super::Peer(peer)): ConnectInfo<super::Peer>,
    request: Request,
) -> Response {
    let api = &state.sessions;
    // Only the body's arrival is timed: once it is in, the session is made whatever
    // the time (a request cut off while its session is stored would leave the client
    // told 408, then 409 on its retry).
    let body = match tokio::time::timeout(api.body_timeout, Bytes::from_request(request, &())).await
    {
        Ok(Ok(body)) => body,
        // Too large (413), or cut off: the same JSON error body as every answer.
        Ok(Err(rejection)) => {
            return super::error_response(rejection.status(), &rejection.body_text());
        }
        Err(_) => {
            let error = "the request body did not arrive in time";
            return super::error_response(StatusCode::REQUEST_TIMEOUT, error);
        }
    };
    if let Err(not_until) = api.limiter.check_key(&crate::auth::budget_key(peer.ip())) {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        // Rounded up: a client that waits the whole seconds it is told succeeds.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        let body = json!({"success": false, "error": "too many sessions created from this address; retry later"});
        let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    if api.limiter.len() > 100_000 {
        api.limiter.retain_recent();
    }

    let body: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return bad_request("the body must be a JSON object").into_response(),
        Err(e) => return bad_request(format!("invalid JSON: {e}")).into_response(),
    };
    let (settings, password, warnings) = match parse(&body, api.max_payload_bytes) {
        Ok(parsed) => parsed,
        Err(bad) => return bad.into_response(),
    };

    let hash = match state.links.auth.hash_new_password(password).await {
        Ok(hash) => hash,
        Err(reject) => {
            let body = json!({"success": false, "error": reject.to_string()});
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
        }
    };
    let record = SessionRecord {
        settings: settings.clone(),
        password_hash: hash,
        created_at: now_ms(),
    };
    match state.store.create_session(&record).await {
        Ok(()) => {}
        Err(StoreError::SessionExists(name)) => {
            let body = json!({"success": false, "error": format!("session {name} already exists")});
            return (StatusCode::CONFLICT, Json(body)).into_response();
        }
        Err(e) => {
            tracing::error!(error = %e, "creating a session failed");
            let body = json!({"success": false, "error": "the store is unavailable"});
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
    }
    tracing::info!(session = %settings.name, peer = %peer.ip(), "session created");
    let name = settings.name.to_string();
    let _ = state.driver.session_updated(settings).await;

    let mut body = json!({"success": true, "sessionName": name});
    if !warnings.is_empty() {
        body["warnings"] = json!(warnings);
    }
    Json(body).into_response()
}

/// Validates the request body: settings, password, and warnings for the caller.
fn parse(
    body: &Map<String, Value>,
    max_payload_cap: u64,
) -> Result<(SessionSettings, String, Vec<String>), BadRequest> {
    let mut warnings = Vec::new();
    let name = string_field(body, "sessionName")?;
    let name = SessionName::parse(name).map_err(|e| bad_request(format!("sessionName: {e}")))?;
    // Valid once (a session so named may exist from before), but a path name
    // everywhere: not for new sessions.
    if name.as_str().bytes().all(|b| b == b'.') {
        return Err(bad_request("sessionName cannot be made of dots only"));
    }
    let password = string_field(body, "password")?;
    if password.is_empty() || password.len() > MAX_PASSWORD {
        return Err(bad_request(format!(
            "password must be 1 to {MAX_PASSWORD} bytes"
        )));
    }
    if password.chars().count() < WEAK_PASSWORD {
        warnings.push(format!(
            "password is shorter than {WEAK_PASSWORD} characters; anyone who guesses it can join the session"
        ));
    }

    let mut settings = SessionSettings::new(name);
    settings.retry_interval_ms = int_field(
        body,
        "retryInterval",
        RETRY_INTERVAL_RANGE,
        settings.retry_interval_ms,
    )?;
    settings.max_retries = int_field(
        body,
        "maxRetryLimit",
        0..=u64::from(MAX_RETRIES_LIMIT),
        u64::from(settings.max_retries),
    )? as u32;
    settings.message_expiry_ms = int_field(
        body,
        "messageExpiryTime",
        MESSAGE_EXPIRY_RANGE,
        settings.message_expiry_ms,
    )?;
    settings.max_payload_bytes = int_field(
        body,
        "maxPayloadBytes",
        1..=max_payload_cap,
        settings.max_payload_bytes.min(max_payload_cap),
    )?;
    settings.history_size =
        int_field(body, "historySize", 0..=u64::from(MAX_HISTORY_SIZE), 0)? as u32;

    if body.contains_key("encryptionKey") {
        warnings.push(
            "encryptionKey was discarded: fastPort never stores or sees session keys; share the key \
             with your clients out of band"
                .to_owned(),
        );
    }
    if body.contains_key("fcmConfig") {
        warnings.push(
            "fcmConfig was ignored: push notifications are not enabled on this broker".to_owned(),
        );
    }
    let known = [
        "sessionName",
        "password",
        "retryInterval",
        "maxRetryLimit",
        "messageExpiryTime",
        "maxPayloadBytes",
        "historySize",
        "encryptionKey",
        "fcmConfig",
    ];
    for key in body.keys().filter(|k| !known.contains(&k.as_str())) {
        warnings.push(format!("unknown field {key:?} was ignored"));
    }
    Ok((settings, password.to_owned(), warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(v: Value) -> Result<(SessionSettings, String, Vec<String>), StatusCode> {
        let Value::Object(map) = v else {
            panic!("object")
        };
        parse(&map, 10 << 20).map_err(|r| r.into_response().status())
    }

    #[test]
    fn seed_body_parses_with_defaults_and_warnings() {
        let (s, pw, warnings) = parse_json(json!({
            "sessionName": "my_chat_room",
            "password": "secure_pass_123",
            "retryInterval": 5000,
            "maxRetryLimit": 100,
            "encryptionKey": "AAAA",
            "messageExpiryTime": 3600000
        }))
        .expect("valid");
        assert_eq!(s.name.as_str(), "my_chat_room");
        assert_eq!(
            (s.retry_interval_ms, s.max_retries, s.message_expiry_ms),
            (5000, 100, 3_600_000)
        );
        assert_eq!(pw, "secure_pass_123");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("encryptionKey"));
        assert!(!warnings[0].contains("AAAA"), "the key is never echoed");
    }

    #[test]
    fn bad_fields_are_named() {
        for body in [
            json!({"password": "x"}),
            json!({"sessionName": "a b", "password": "x"}),
            json!({"sessionName": "ok", "password": 5}),
            json!({"sessionName": "ok", "password": ""}),
            json!({"sessionName": "ok", "password": "p", "retryInterval": "5000"}),
            json!({"sessionName": "ok", "password": "p", "retryInterval": 1}),
            json!({"sessionName": "ok", "password": "p", "maxRetryLimit": -1}),
            json!({"sessionName": "ok", "password": "p", "maxPayloadBytes": 11 << 20}),
        ] {
            assert_eq!(parse_json(body).err(), Some(StatusCode::BAD_REQUEST));
        }
    }
}
