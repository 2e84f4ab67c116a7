//! The HTTP side of the TCP port: health, the seed-compatible session API, the
//! certificate hash for browsers, and the WebSocket upgrades (`/` and `/ws` for the
//! legacy JSON bridge, `/v1/ws` for protobuf frames).

mod listener;
mod sessions;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::watch;
use tower_service::Service;

use crate::carrier::{LinkContext, legacy, ws};
use crate::driver::DriverHandle;
use crate::store::Store;
use crate::tls::Certs;

pub use listener::{Peer, PlainListener};
pub use sessions::CreateSessionLimit;
pub use tls::TlsListener;

/// What the HTTP handlers share.
pub struct HttpState {
    pub store: Arc<dyn Store>,
    pub driver: DriverHandle,
    pub certs: Arc<Certs>,
    pub started: Instant,
    pub sessions: sessions::SessionApi,
    /// What WebSocket connections need from the broker.
    pub links: Arc<LinkContext>,
}

impl HttpState {
    pub fn new(
        store: Arc<dyn Store>,
        driver: DriverHandle,
        certs: Arc<Certs>,
        links: Arc<LinkContext>,
        limit: CreateSessionLimit,
        max_payload_bytes: u64,
        http_timeout: Duration,
    ) -> Self {
        Self {
            store,
            driver,
            certs,
            started: Instant::now(),
            sessions: sessions::SessionApi::new(limit, max_payload_bytes, http_timeout),
            links,
        }
    }
}

/// All HTTP routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/", get(legacy_or_index))
        .route("/ws", get(legacy_ws))
        .route("/v1/ws", get(native_ws))
        .route("/health", get(health))
        .route("/v1/cert-hash", get(cert_hash))
        .route("/api/createSession", post(sessions::create_session))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves `router` on `listener` (plain TCP, or [`TlsListener`]) until `shutdown`
/// completes.
///
/// Our own accept loop rather than `axum::serve`, which gives hyper no timer: without
/// one, hyper's header timeout never runs, and a client that sends a request's head
/// one byte a minute (or nothing at all) holds a socket and a task for ever. Here
/// every request's head must arrive whole within `timeout` of the connection being
/// ready for it, which also closes kept-alive connections idle that long. The one
/// route that reads a body, createSession, gives it as long again. A WebSocket leaves
/// hyper once upgraded; its carrier watches it from then on.
pub async fn serve<L>(
    mut listener: L,
    state: Arc<HttpState>,
    timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let app = router(state);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout);
    // Dropped when the loop ends: every connection then finishes the request it is
    // serving and closes.
    let (stop, stopping) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(Peer(peer)));
            app.clone().call(request)
        });
        let connection = http1
            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
            .with_upgrades();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopping.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
    drop(stop);
}

/// `{"status":"ok","uptime":seconds,"activeSessions":n,"connections":n,"subscribers":n}`,
/// or 503 with the reason when the store is down or the router does not answer.
async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let uptime = state.started.elapsed().as_secs();
    let unhealthy = |error: &str| {
        let body = json!({"status": "error", "uptime": uptime, "error": error});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    let store = async {
        state.store.ping().await?;
        state.store.count_sessions().await
    };
    let sessions = match store.await {
        Ok(sessions) => sessions,
        Err(e) => {
            tracing::error!(error = %e, "health check: store unavailable");
            return unhealthy("store unavailable");
        }
    };
    // The router answers between two batches of messages, after the commands already
    // in its inbox (4,096 at most, milliseconds of work) and once the store took its
    // last batch: 2 s without an answer means it or the store is stuck.
    let stats = match tokio::time::timeout(ROUTER_ANSWER, state.driver.stats()).await {
        Ok(Ok(stats)) => stats,
        Ok(Err(_)) => return unhealthy("router stopped"),
        Err(_) => {
            tracing::error!(wait = ?ROUTER_ANSWER, "health check: the router did not answer");
            return unhealthy("router not answering");
        }
    };
    Json(json!({
        "status": "ok",
        "uptime": uptime,
        "activeSessions": sessions,
        "connections": stats.connections,
        "subscribers": stats.subscribers,
    }))
    .into_response()
}

/// How long `/health` waits for the router's counters.
const ROUTER_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

/// The leaf certificate's SHA-256, for WebTransport's `serverCertificateHashes`.
async fn cert_hash(State(state): State<Arc<HttpState>>) -> Json<serde_json::Value> {
    let info = state.certs.info();
    Json(json!({
        "algorithm": "sha-256",
        "hash": info.sha256_hex,
        "not_after": info.not_after_rfc3339(),
    }))
}

type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

/// Applies the frame size limit to an upgrade, and small I/O buffers: tungstenite's
/// default 128 KiB read buffer per connection would dominate the memory of idle
/// connections, and the writer flushes on its own (coalescing what is queued).
fn limited(upgrade: WebSocketUpgrade, state: &HttpState) -> WebSocketUpgrade {
    let max = state.links.limits.max_frame;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
}

/// Upgrades to a WebSocket that `serve` carries, if the broker has a connection slot
/// for it (`--max-connections`), held until `serve` ends; `503` if not.
fn upgrade_to<F, Fut>(
    upgrade: WebSocketUpgrade,
    state: &HttpState,
    peer: SocketAddr,
    serve: F,
) -> Response
where
    F: FnOnce(WebSocket, SocketAddr, Arc<LinkContext>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(slot) = state.links.connection_slot() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker has as many connections open as it may; try again later",
        );
    };
    let links = state.links.clone();
    limited(upgrade, state).on_upgrade(move |socket| async move {
        serve(socket, peer, links).await;
        drop(slot);
    })
}

/// `GET /`: the legacy bridge for WebSocket upgrades (where fastPort 2.0 listened),
/// otherwise a short description of the broker.
async fn legacy_or_index(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    upgrade: Upgrade,
) -> Response {
    match upgrade {
        Ok(upgrade) => upgrade_to(upgrade, &state, peer, legacy::serve),
        Err(_) => Json(json!({
            "name": "fastPort",
            "version": env!("CARGO_PKG_VERSION"),
            "endpoints": {
                "health": "/health",
                "createSession": "POST /api/createSession",
                "certHash": "/v1/cert-hash",
                "legacyWebSocket": ["/", "/ws"],
                "protobufWebSocket": "/v1/ws",
            },
        }))
        .into_response(),
    }
}

/// `GET /ws`: the legacy JSON bridge.
async fn legacy_ws(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    upgrade: Upgrade,
) -> Response {
    match upgrade {
        Ok(upgrade) => upgrade_to(upgrade, &state, peer, legacy::serve),
        Err(rejection) => rejection.into_response(),
    }
}

/// `GET /v1/ws`: native protobuf frames over WebSocket.
async fn native_ws(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    upgrade: Upgrade,
) -> Response {
    match upgrade {
        Ok(upgrade) => upgrade_to(upgrade, &state, peer, ws::serve),
        Err(rejection) => rejection.into_response(),
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not found")
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this path",
    )
}

/// The API's error body, `{"success":false,"error":…}`, with `status`.
pub(crate) fn error_response(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({"success": false, "error": error}))).into_response()
}
