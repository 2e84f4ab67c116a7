//! Starts a whole broker from a [`ServerConfig`]: store, driver, certificates, the QUIC
//! endpoint and the HTTP listener, and stops it in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::carrier::{CarrierLimits, LinkContext, quic};
use crate::driver::{self, DriverConfig, DriverHandle};
use crate::http::{self, CreateSessionLimit, HttpState, TlsListener};
use crate::spool::{Spool, SpoolError};
use crate::store::{self, StoreError, StoreKind};
use crate::tls::{CertInfo, CertSource, Certs, TlsError};

/// Everything needed to run a broker.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TCP address for HTTP (port 0 picks one).
    pub http: SocketAddr,
    /// UDP address for QUIC (port 0 picks one).
    pub quic: SocketAddr,
    pub store: StoreKind,
    pub certs: CertSource,
    pub driver: DriverConfig,
    pub carrier: CarrierLimits,
    pub create_session_limit: CreateSessionLimit,
    /// Most bytes the file spool may hold.
    pub max_spool_bytes: u64,
    /// Most bytes one session's files may take in the spool.
    pub max_session_spool_bytes: u64,
    /// How long an HTTP client has to send a request's head, and the broker to take in
    /// and answer the whole request (see [`http::serve`]).
    pub http_timeout: Duration,
}

/// Why the broker could not start. Each message leaves its cause to the error's
/// source, so a printed chain (`Caused by:`) says each thing once.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error("cannot open the file spool")]
    Spool(#[from] SpoolError),
    #[error("cannot set up the certificates")]
    Tls(#[from] TlsError),
}

/// A running broker.
pub struct Server {
    pub http_addr: SocketAddr,
    /// The TCP port speaks TLS (HTTPS/WSS): a real certificate was given.
    pub https: bool,
    pub quic_addr: SocketAddr,
    pub cert: CertInfo,
    pub store_kind: &'static str,
    driver: DriverHandle,
    endpoint: quinn::Endpoint,
    stop_http: watch::Sender<bool>,
    links: Arc<LinkContext>,
    tasks: Vec<JoinHandle<()>>,
}

/// How long shutting down waits for WebSocket clients to be told (each writer gives
/// its close frame 1 s to be taken).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Server {
    /// Binds the listeners, opens the store and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        let udp = quic::bind(config.quic).map_err(|source| StartError::Bind {
            what: "QUIC (UDP)",
            addr: config.quic,
            source,
        })?;
        let tcp = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| StartError::Bind {
                what: "HTTP (TCP)",
                addr: config.http,
                source,
            })?;
        let bind_err = |what, addr| move |source| StartError::Bind { what, addr, source };
        let quic_addr = udp
            .local_addr()
            .map_err(bind_err("QUIC (UDP)", config.quic))?;
        let http_addr = tcp
            .local_addr()
            .map_err(bind_err("HTTP (TCP)", config.http))?;

        let store = store::open(&config.store).await?;
        let max_file = config.driver.core.max_file_bytes;
        let room = config.max_session_spool_bytes.min(config.max_spool_bytes);
        if room < crate::spool::spooled_size(max_file) {
            tracing::warn!(
                max_file,
                room,
                "a file near --max-file-size may not fit in the spool \
                 (--max-spool-size, --max-session-spool-size): it would be refused once sent"
            );
        }
        let spool = Arc::new(match &config.store {
            StoreKind::Sqlite(path) => {
                let mut dir = path.clone().into_os_string();
                dir.push(".spool");
                Spool::open(
                    dir.into(),
                    config.max_spool_bytes,
                    config.max_session_spool_bytes,
                )?
            }
            StoreKind::Memory => {
                Spool::temporary(config.max_spool_bytes, config.max_session_spool_bytes)?
            }
        });
        let (driver, driver_task) =
            driver::start(store.clone(), spool, config.driver.clone()).await?;

        let certs = Certs::load_or_create(config.certs.clone())?;
        let tls = certs.server_config(&[quic::ALPN_NATIVE, quic::ALPN_H3])?;
        let reset_path = config.certs.dir.join("quic-reset.key");
        let reset_key = quic::load_reset_key(&reset_path).map_err(|source| TlsError::Io {
            path: reset_path,
            source,
        })?;
        let endpoint =
            quic::endpoint(udp, tls, &reset_key).map_err(bind_err("QUIC (UDP)", quic_addr))?;

        let ctx = Arc::new(LinkContext::new(
            driver.clone(),
            Arc::new(Authenticator::new(store.clone())),
            store.clone(),
            config.carrier.clone(),
        ));
        let quic_task = tokio::spawn(quic::serve(endpoint.clone(), ctx.clone()));
        let links = ctx.clone();

        let state = Arc::new(HttpState::new(
            store.clone(),
            driver.clone(),
            certs.clone(),
            ctx,
            config.create_session_limit,
            config.driver.core.max_payload_bytes,
            config.http_timeout,
        ));
        let (stop_http, mut stopped) = watch::channel(false);
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        // A real certificate (--cert) also serves HTTPS/WSS on the TCP port; the
        // generated one is for QUIC and browsers' pinned hashes only.
        let https = config.certs.cert.is_some();
        let timeout = config.http_timeout;
        let http_task = if https {
            let tls = certs.server_config(&[b"http/1.1"])?;
            let listener =
                TlsListener::new(tcp, tls).map_err(bind_err("HTTPS (TCP)", http_addr))?;
            tokio::spawn(http::serve(listener, state, timeout, shutdown))
        } else {
            let listener = http::PlainListener::new(tcp);
            tokio::spawn(http::serve(listener, state, timeout, shutdown))
        };
        let renewal = certs.spawn_renewal();

        Ok(Self {
            http_addr,
            https,
            quic_addr,
            cert: certs.info(),
            store_kind: store.kind(),
            driver,
            endpoint,
            stop_http,
            links,
            tasks: vec![quic_task, http_task, renewal, driver_task],
        })
    }

    /// The driver, for in-process use (stats, tests).
    pub fn driver(&self) -> &DriverHandle {
        &self.driver
    }

    /// Stops accepting, closes connections with a reason, commits what was accepted and
    /// closes the store.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"the broker is shutting down");
        let _ = self.stop_http.send(true);
        // WebSocket clients get their close frame while the driver still runs, so
        // their connections end as cleanly as a client's own goodbye.
        self.links.closing.send_replace(true);
        let _ = tokio::time::timeout(CLOSE_WAIT, self.links.closing.closed()).await;
        self.driver.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        for task in self.tasks {
            task.abort();
        }
    }
}
