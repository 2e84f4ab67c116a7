//! Broker configuration from flags, environment variables and an optional
//! `fastport.toml`, merged with this precedence: flag > environment > file > default.
//!
//! The seeds' environment names work as they did (`PORT`, `DB_TYPE`, `SQLITE_PATH`,
//! `DATABASE_URL`, `HOST`); clap reads flags and environment together, and whatever it
//! leaves unset is taken from the file.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::carrier::CarrierLimits;
use crate::core::{CoreConfig, DEFAULT_MAX_PAYLOAD_BYTES};
use crate::driver::DriverConfig;
use crate::http::CreateSessionLimit;
use crate::server::ServerConfig;
use crate::store::StoreKind;
use crate::tls::CertSource;

/// Most ids `--max-replay-ids` may allow a session: 4-7 GiB of memory for one busy
/// session, beyond which a typo is likelier than a plan.
const MAX_REPLAY_IDS: usize = 100_000_000;

/// The default port, for TCP (HTTP) and UDP (QUIC) alike.
pub const DEFAULT_PORT: u16 = 3000;

/// `--http-timeout-ms`'s default: ample for a request sent by a program, short enough
/// that a client dribbling its request cannot hold a connection long.
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Flags of `fastport serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML, same keys as the flags with underscores).
    /// Default: ./fastport.toml if it exists.
    #[arg(long, env = "FASTPORT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to bind both listeners to (127.0.0.1 keeps the broker local): an IP, or
    /// a host name resolved at start, IPv4 first.
    #[arg(long, env = "HOST", value_name = "HOST", value_parser = parse_listen)]
    pub listen: Option<Listen>,

    /// Port for both TCP (HTTP, WebSocket) and UDP (QUIC).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,

    /// TCP address for HTTP, overriding --listen/--port (and the file's address).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// UDP address for QUIC, overriding --listen/--port (and the file's address).
    #[arg(long, value_name = "ADDR")]
    pub quic: Option<SocketAddr>,

    /// Directory for the SQLite database.
    #[arg(long, env = "FASTPORT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Storage backend: sqlite (default) or memory.
    #[arg(long, env = "DB_TYPE", value_name = "KIND")]
    pub store: Option<String>,

    /// SQLite database file (default: DATA_DIR/fastport.db).
    #[arg(long, env = "SQLITE_PATH", value_name = "FILE")]
    pub sqlite_path: Option<PathBuf>,

    /// Postgres URL (for the postgres store).
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Directory for the generated CA and leaf certificate.
    #[arg(long, env = "FASTPORT_CERTS_DIR", value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,

    /// More host names or IP addresses for the generated certificate, comma-separated
    /// (clients check the name they connect to against it). It always covers
    /// localhost, 127.0.0.1, ::1 and the --listen name or address; on 0.0.0.0 or ::,
    /// also this machine's host name and interface addresses.
    #[arg(
        long,
        env = "FASTPORT_CERT_NAMES",
        value_name = "NAME",
        value_delimiter = ',',
        value_parser = parse_cert_name
    )]
    pub cert_name: Vec<String>,

    /// A real certificate chain (PEM) to use instead of generated ones.
    #[arg(long, requires = "key", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// The private key (PEM) of --cert.
    #[arg(long, requires = "cert", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Accepted clock skew of publish timestamps, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub replay_window_ms: Option<u64>,

    /// Most message ids one session's replay guard remembers (each for the window
    /// after its timestamp, 40-70 bytes apiece); past it the session's publishes are
    /// refused RATE_LIMITED. It caps a session's sustained rate at this / the window:
    /// 133,000 msg/s at the defaults [default: 4,000,000].
    #[arg(long, value_name = "N")]
    pub max_replay_ids: Option<usize>,

    /// Largest payload any session may allow, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_payload: Option<u64>,

    /// Largest file accepted, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_file_size: Option<u64>,

    /// Most bytes the file spool may hold (files waiting for offline, slow or
    /// unacknowledging receivers; beside the SQLite file, as `fastport.db.spool/`);
    /// past it, new files are refused [default: 16 GiB].
    #[arg(long, value_name = "BYTES")]
    pub max_spool_size: Option<u64>,

    /// Most bytes one session's files may take in the spool [default: a quarter of
    /// --max-spool-size, but room for one file of --max-file-size].
    #[arg(long, value_name = "BYTES")]
    pub max_session_spool_size: Option<u64>,

    /// WebSocket ping interval, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub ws_ping_interval_ms: Option<u64>,

    /// WebSocket connections silent this long are closed, and file uploads on them
    /// that get nothing for this long are dropped, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub ws_idle_timeout_ms: Option<u64>,

    /// Client connections open at once, QUIC and WebSocket together; past it QUIC
    /// handshakes are refused and WebSocket upgrades get 503 [default: 100000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// QUIC handshakes under way past which a new client must first prove its address
    /// with a Retry (one round trip more), so that a flood of handshakes from forged
    /// addresses costs a small reply each; 0: always [default: 256].
    #[arg(long, value_name = "N")]
    pub quic_retry_above: Option<usize>,

    /// Most clients a session holds: connected at once, and (counted apart) with
    /// subscriptions, durable ones offline included [default: 50000].
    #[arg(long, value_name = "N")]
    pub max_session_clients: Option<usize>,

    /// Most subscriptions one client holds, its connection's and its durable ones
    /// together; past it a `Subscribe` to another filter gets LIMIT_EXCEEDED
    /// [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// An HTTP client has this long to send each request's head, and createSession as
    /// long again for its body (408 if it is not in by then); kept-alive connections
    /// idle this long are closed, in milliseconds [default: 15000].
    #[arg(long, value_name = "MS")]
    pub http_timeout_ms: Option<u64>,

    /// Sessions one IP may create per window.
    #[arg(long, value_name = "N")]
    pub create_session_limit: Option<u32>,

    /// The window of --create-session-limit, in seconds.
    #[arg(long, value_name = "SECS")]
    pub create_session_window: Option<u64>,

    /// Worker threads of the async runtime [default: one per CPU core but one, at least
    /// one]. The router is one task either way, and SQLite writes on a thread of its
    /// own; fewer workers mean fewer cross-thread wake-ups per message (on 2 cores, one
    /// worker cut the p99.9 latency at 10,000 msg/s from ~3 ms to ~1 ms).
    #[arg(long, env = "FASTPORT_THREADS", value_name = "N")]
    pub threads: Option<usize>,
}

/// The same settings, read from `fastport.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// As `--listen`: an IP address, or a host name resolved at start.
    #[serde(default, deserialize_with = "listen_in_file")]
    pub listen: Option<Listen>,
    pub port: Option<u16>,
    pub http: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<String>,
    pub sqlite_path: Option<PathBuf>,
    pub database_url: Option<String>,
    pub certs_dir: Option<PathBuf>,
    /// As `--cert-name`, a list.
    #[serde(default, deserialize_with = "cert_names_in_file")]
    pub cert_names: Option<Vec<String>>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub replay_window_ms: Option<u64>,
    pub max_replay_ids: Option<usize>,
    pub max_payload: Option<u64>,
    pub max_file_size: Option<u64>,
    pub max_spool_size: Option<u64>,
    pub max_session_spool_size: Option<u64>,
    pub ws_ping_interval_ms: Option<u64>,
    pub ws_idle_timeout_ms: Option<u64>,
    pub http_timeout_ms: Option<u64>,
    pub max_session_clients: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub max_connections: Option<usize>,
    pub quic_retry_above: Option<usize>,
    pub create_session_limit: Option<u32>,
    pub create_session_window: Option<u64>,
    pub threads: Option<usize>,
}

impl FileConfig {
    fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from("fastport.toml"), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path,
            source: Box::new(source),
        })
    }
}

impl ServeArgs {
    /// Merges flags/environment with the file and the defaults.
    /// The async runtime's worker threads, if set (flag, environment or file): read
    /// before the runtime starts, so before [`ServeArgs::resolve`].
    pub fn worker_threads(&self) -> Result<Option<usize>, ConfigError> {
        if self.threads.is_some() {
            return Ok(self.threads);
        }
        Ok(FileConfig::load(self.config.as_deref())?.threads)
    }

    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let file = FileConfig::load(self.config.as_deref())?;
        // Flag > environment > file (design §8): `--listen`/`HOST` and `--port`/`PORT`
        // replace their part of an address the file gives, and `--http`/`--quic`
        // replace the whole of it.
        let listen = self.listen.clone().or(file.listen.clone());
        let from_file = |addr: Option<SocketAddr>| {
            addr.unwrap_or(SocketAddr::new(
                file.listen
                    .as_ref()
                    .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |l| l.ip),
                file.port.unwrap_or(DEFAULT_PORT),
            ))
        };
        let bind = |explicit: Option<SocketAddr>, file_addr: Option<SocketAddr>| {
            explicit.unwrap_or_else(|| {
                let base = from_file(file_addr);
                SocketAddr::new(
                    self.listen.as_ref().map_or(base.ip(), |l| l.ip),
                    self.port.unwrap_or(base.port()),
                )
            })
        };
        let http = bind(self.http, file.http);
        let quic = bind(self.quic, file.quic);
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("data"));

        let store = self.store.or(file.store).unwrap_or_else(|| "sqlite".into());
        let store = match store.to_ascii_lowercase().as_str() {
            "sqlite" => StoreKind::Sqlite(
                self.sqlite_path
                    .or(file.sqlite_path)
                    .unwrap_or_else(|| data_dir.join("fastport.db")),
            ),
            "memory" => StoreKind::Memory,
            "postgres" | "postgresql" => {
                return Err(ConfigError::Invalid(
                    "the postgres store is not available in this version; use sqlite or memory"
                        .into(),
                ));
            }
            other => {
                return Err(ConfigError::Invalid(format!(
                    "unknown store {other:?}: expected sqlite or memory"
                )));
            }
        };

        let cert = self.cert.or(file.cert);
        let key = self.key.or(file.key);
        if cert.is_some() != key.is_some() {
            return Err(ConfigError::Invalid("--cert and --key go together".into()));
        }
        let cert_names = if self.cert_name.is_empty() {
            file.cert_names.unwrap_or_default()
        } else {
            self.cert_name
        };
        let hosts = cert_hosts(listen.as_ref(), [http.ip(), quic.ip()], cert_names);
        let certs = CertSource {
            dir: self
                .certs_dir
                .or(file.certs_dir)
                .unwrap_or_else(|| PathBuf::from("certs")),
            hosts,
            cert,
            key,
        };

        let max_payload = self
            .max_payload
            .or(file.max_payload)
            .unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
        if max_payload == 0 || max_payload > 256 * 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "--max-payload must be 1 byte to 256 MiB".into(),
            ));
        }
        let replay_window_ms = self
            .replay_window_ms
            .or(file.replay_window_ms)
            .unwrap_or(30_000);
        if !(1_000..=600_000).contains(&replay_window_ms) {
            return Err(ConfigError::Invalid(
                "--replay-window-ms must be 1000 to 600000".into(),
            ));
        }
        let replay_capacity = self
            .max_replay_ids
            .or(file.max_replay_ids)
            .unwrap_or(CoreConfig::default().replay_capacity);
        if !(1..=MAX_REPLAY_IDS).contains(&replay_capacity) {
            return Err(ConfigError::Invalid(format!(
                "--max-replay-ids must be 1 to {MAX_REPLAY_IDS}"
            )));
        }
        let max_file_bytes = self
            .max_file_size
            .or(file.max_file_size)
            .unwrap_or(CoreConfig::default().max_file_bytes);
        let max_spool_bytes = self
            .max_spool_size
            .or(file.max_spool_size)
            .unwrap_or(crate::spool::DEFAULT_MAX_SPOOL_BYTES);
        let max_session_spool_bytes = self
            .max_session_spool_size
            .or(file.max_session_spool_size)
            .unwrap_or_else(|| {
                crate::spool::default_session_share(max_spool_bytes, max_file_bytes)
            });
        if max_spool_bytes == 0 || max_session_spool_bytes == 0 {
            return Err(ConfigError::Invalid(
                "--max-spool-size and --max-session-spool-size must be at least 1 byte".into(),
            ));
        }
        let max_session_clients = self
            .max_session_clients
            .or(file.max_session_clients)
            .unwrap_or(CoreConfig::default().max_session_clients);
        if max_session_clients == 0 {
            return Err(ConfigError::Invalid(
                "--max-session-clients must be at least 1".into(),
            ));
        }
        let max_subscriptions = self
            .max_subscriptions
            .or(file.max_subscriptions)
            .unwrap_or(CoreConfig::default().max_subscriptions);
        if max_subscriptions == 0 {
            return Err(ConfigError::Invalid(
                "--max-subscriptions must be at least 1".into(),
            ));
        }
        let driver = DriverConfig {
            core: CoreConfig {
                replay_window_ms,
                replay_capacity,
                max_file_bytes,
                max_payload_bytes: max_payload,
                max_session_clients,
                max_subscriptions,
                ..CoreConfig::default()
            },
            ..DriverConfig::default()
        };
        let defaults = CarrierLimits::default();
        let ms = Duration::from_millis;
        let carrier = CarrierLimits {
            max_frame: max_payload as usize + 64 * 1024,
            ws_ping_interval: self
                .ws_ping_interval_ms
                .or(file.ws_ping_interval_ms)
                .map_or(defaults.ws_ping_interval, ms),
            ws_idle_timeout: self
                .ws_idle_timeout_ms
                .or(file.ws_idle_timeout_ms)
                .map_or(defaults.ws_idle_timeout, ms),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(defaults.max_connections),
            quic_retry_above: self
                .quic_retry_above
                .or(file.quic_retry_above)
                .unwrap_or(defaults.quic_retry_above),
            ..defaults
        };
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&carrier.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "--max-connections must be 1 to {}",
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        if carrier.ws_ping_interval.is_zero() || carrier.ws_idle_timeout <= carrier.ws_ping_interval
        {
            return Err(ConfigError::Invalid(
                "--ws-idle-timeout-ms must be longer than --ws-ping-interval-ms (and both above 0)"
                    .into(),
            ));
        }
        let http_timeout = self
            .http_timeout_ms
            .or(file.http_timeout_ms)
            .map_or(DEFAULT_HTTP_TIMEOUT, ms);
        if !(ms(100)..=ms(600_000)).contains(&http_timeout) {
            return Err(ConfigError::Invalid(
                "--http-timeout-ms must be 100 to 600000".into(),
            ));
        }
        let create_session_limit = CreateSessionLimit {
            count: self
                .create_session_limit
                .or(file.create_session_limit)
                .unwrap_or(CreateSessionLimit::default().count),
            window: self
                .create_session_window
                .or(file.create_session_window)
                .map_or(CreateSessionLimit::default().window, Duration::from_secs),
        };
        if create_session_limit.count == 0 {
            return Err(ConfigError::Invalid(
                "--create-session-limit must be at least 1".into(),
            ));
        }
        let _ = self.database_url.or(file.database_url);
        Ok(ServerConfig {
            http,
            quic,
            store,
            certs,
            driver,
            carrier,
            create_session_limit,
            max_spool_bytes,
            max_session_spool_bytes,
            http_timeout,
        })
    }
}

/// The names and addresses the generated certificate covers (design §10: native clients
/// check the host they dial against it): the loopback ones, the `--listen` name and the
/// bound addresses, every local one for an unspecified bind, and `extra`.
fn cert_hosts(listen: Option<&Listen>, bound: [IpAddr; 2], extra: Vec<String>) -> Vec<String> {
    let mut hosts: Vec<String> = crate::tls::DEFAULT_HOSTS
        .iter()
        .map(|h| h.to_string())
        .collect();
    hosts.extend(listen.and_then(|l| l.name.clone()));
    for ip in bound {
        if ip.is_unspecified() {
            hosts.extend(this_machine(ip.is_ipv6()));
        } else {
            hosts.push(ip.to_string());
        }
    }
    hosts.extend(extra);
    let mut unique = Vec::with_capacity(hosts.len());
    for host in hosts {
        if !unique
            .iter()
            .any(|h: &String| h.eq_ignore_ascii_case(&host))
        {
            unique.push(host);
        }
    }
    unique
}

/// This machine's host name and interface addresses (IPv6 ones too if `v6`: a `::`
/// bind takes IPv4 as well), which other machines may dial when the broker listens on
/// every interface. Link-local IPv6 addresses are left out: a URL needs a zone for them.
fn this_machine(v6: bool) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(name) = gethostname::gethostname()
        .to_str()
        .filter(|n| is_host_name(n))
    {
        names.push(name.to_owned());
    }
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => names.extend(
            interfaces
                .iter()
                .map(|i| i.ip())
                .filter(|ip| match ip {
                    IpAddr::V4(_) => true,
                    IpAddr::V6(ip) => v6 && !ip.is_unicast_link_local(),
                })
                .map(|ip| ip.to_string()),
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "could not list this machine's addresses for the certificate; --cert-name adds them"
        ),
    }
    names
}

/// `listen` in `fastport.toml`, read as `--listen` is.
fn listen_in_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Listen>, D::Error> {
    let host = String::deserialize(d)?;
    parse_listen(&host)
        .map(Some)
        .map_err(|why| serde::de::Error::custom(format!("listen = {host:?}: {why}")))
}

/// `cert_names` in `fastport.toml`, each read as `--cert-name` is.
fn cert_names_in_file<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|name| {
            parse_cert_name(name)
                .map_err(|why| serde::de::Error::custom(format!("cert_names: {name:?}: {why}")))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// `--cert-name`: an IP address, a host name, or a wildcard name (`*.example.com`),
/// without the spaces around it or a final dot (certificates name hosts without one).
fn parse_cert_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let name = name.strip_suffix('.').unwrap_or(name);
    let bare = name.strip_prefix("*.").unwrap_or(name);
    if name.parse::<IpAddr>().is_ok() || is_host_name(bare) {
        Ok(name.to_owned())
    } else {
        Err("neither an IP address nor a host name".into())
    }
}

/// Whether `host` is a syntactically valid DNS host name (letters, digits and hyphens
/// in dot-separated labels of 1 to 63 characters, 253 in all).
fn is_host_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253 && host.trim_end_matches('.').split('.').all(label_ok)
}

/// The `--listen`/`HOST` address, and the host name it was given as, if any (the
/// generated certificate covers that name: clients dial it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub ip: IpAddr,
    pub name: Option<String>,
}

impl From<IpAddr> for Listen {
    fn from(ip: IpAddr) -> Self {
        Self { ip, name: None }
    }
}

/// `--listen`/`HOST`: an IP address, or a host name (`HOST=localhost`, as a Node
/// server would take it) resolved once, preferring IPv4.
fn parse_listen(host: &str) -> Result<Listen, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip.into());
    }
    if !is_host_name(host) {
        return Err("neither an IP address nor a host name".into());
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, 0))
        .map_err(|e| format!("not an IP address, and the name does not resolve: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| Listen {
            ip: a.ip(),
            name: Some(host.trim_end_matches('.').to_owned()),
        })
        .ok_or_else(|| "the name resolves to no address".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags naming a config file holding `toml` (the directory lives as long as the
    /// returned guard).
    fn with_file(toml: &str) -> (tempfile::TempDir, ServeArgs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fastport.toml");
        std::fs::write(&path, toml).expect("write");
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        (dir, args)
    }

    #[test]
    fn defaults_are_local_port_3000_sqlite() {
        let c = ServeArgs::default().resolve().expect("valid");
        assert_eq!(c.http, "127.0.0.1:3000".parse().expect("addr"));
        assert_eq!(c.quic, "127.0.0.1:3000".parse().expect("addr"));
        assert_eq!(
            c.store,
            StoreKind::Sqlite(PathBuf::from("data/fastport.db"))
        );
        assert_eq!(c.create_session_limit.count, 100);
    }

    #[test]
    fn max_payload_sets_the_sessions_cap_and_the_largest_frame() {
        let args = ServeArgs {
            max_payload: Some(65_536),
            ..ServeArgs::default()
        };
        let c = args.resolve().expect("valid");
        assert_eq!(c.driver.core.max_payload_bytes, 65_536);
        assert_eq!(c.carrier.max_frame, 65_536 + 64 * 1024);
    }

    #[test]
    fn threads_come_from_the_flag_or_the_file() {
        let (_dir, mut args) = with_file("threads = 3\n");
        assert_eq!(args.worker_threads().expect("valid"), Some(3));
        args.threads = Some(1);
        assert_eq!(args.worker_threads().expect("valid"), Some(1));
        assert!(args.resolve().is_ok(), "the file's threads key is known");
    }

    #[test]
    fn listen_takes_an_ip_or_a_host_name() {
        assert_eq!(
            parse_listen("0.0.0.0"),
            Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
        );
        let ip6: IpAddr = "::1".parse().expect("ip");
        assert_eq!(parse_listen("::1"), Ok(ip6.into()));
        assert_eq!(
            parse_listen("localhost"),
            Ok(Listen {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                name: Some("localhost".into()),
            })
        );
        for bad in ["bad host!", "", "-x.example", "a..b"] {
            let e = parse_listen(bad).unwrap_err();
            assert!(
                e.contains("neither an IP address nor a host name"),
                "{bad:?}: {e}"
            );
        }
    }

    /// `PORT` or `HOST` (here as the fields clap fills from them) replace their part of
    /// an address the file gives; `--http` replaces all of it.
    #[test]
    fn the_environment_wins_over_the_file_s_addresses() {
        let (_dir, mut args) = with_file("http = \"0.0.0.0:4000\"\nquic = \"0.0.0.0:4001\"\n");
        let c = args.clone().resolve().expect("valid");
        assert_eq!(c.http, "0.0.0.0:4000".parse().expect("addr"));
        args.port = Some(5000);
        let c = args.clone().resolve().expect("valid");
        assert_eq!(c.http, "0.0.0.0:5000".parse().expect("addr"));
        assert_eq!(c.quic, "0.0.0.0:5000".parse().expect("addr"));
        args.listen = Some(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        args.http = Some("127.0.0.1:6000".parse().expect("addr"));
        let c = args.resolve().expect("valid");
        assert_eq!(c.http, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(c.quic, "127.0.0.1:5000".parse().expect("addr"));
    }

    #[test]
    fn the_file_s_listen_takes_a_host_name_too() {
        let (_dir, args) = with_file("listen = \"localhost\"\n");
        let c = args.resolve().expect("valid");
        assert!(c.http.ip().is_loopback(), "{}", c.http);
        let (_dir, args) = with_file("listen = \"no host!\"\n");
        let e = args.resolve().expect_err("refused").to_string();
        assert!(e.contains("neither an IP address nor a host name"), "{e}");
    }

    /// Clients check the host they dial against the generated certificate, so it covers
    /// the `--listen` name and `--cert-name`s beside the loopback names, and a broker
    /// bound to a single address covers no other.
    #[test]
    fn the_certificate_covers_the_names_clients_dial() {
        let (_dir, mut args) = with_file("cert_names = [\"broker.example\", \"10.9.8.7\"]\n");
        args.listen = Some(Listen {
            ip: "192.0.2.77".parse().expect("ip"),
            name: Some("fastport.example".into()),
        });
        let hosts = args.clone().resolve().expect("valid").certs.hosts;
        assert_eq!(
            hosts,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "fastport.example",
                "192.0.2.77",
                "broker.example",
                "10.9.8.7"
            ]
        );
        args.cert_name = vec![parse_cert_name(" *.example.org. ").expect("valid")];
        let hosts = args.resolve().expect("valid").certs.hosts;
        assert!(hosts.contains(&"*.example.org".to_string()), "{hosts:?}");
        assert!(
            !hosts.contains(&"broker.example".to_string()),
            "the flag replaces the file's list"
        );

        let (_dir, args) = with_file("cert_names = [\"no name!\"]\n");
        let e = args.resolve().expect_err("refused").to_string();
        assert!(e.contains("neither an IP address nor a host name"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let (_dir, mut args) = with_file("port = 4000\nstore = \"memory\"\nlisten = \"0.0.0.0\"\n");
        args.port = Some(5000);
        let c = args.resolve().expect("valid");
        assert_eq!(c.http, "0.0.0.0:5000".parse().expect("addr"));
        assert_eq!(c.store, StoreKind::Memory);
    }

    #[test]
    fn the_replay_guard_cap_comes_from_the_flag_or_the_file_within_bounds() {
        assert_eq!(
            ServeArgs::default()
                .resolve()
                .expect("valid")
                .driver
                .core
                .replay_capacity,
            4_000_000
        );
        let (_dir, mut args) = with_file("max_replay_ids = 5000\n");
        let c = args.clone().resolve().expect("valid");
        assert_eq!(c.driver.core.replay_capacity, 5000);
        args.max_replay_ids = Some(7);
        let c = args.clone().resolve().expect("valid");
        assert_eq!(c.driver.core.replay_capacity, 7, "the flag wins");
        args.max_replay_ids = Some(0);
        let e = args.clone().resolve().unwrap_err().to_string();
        assert!(e.contains("--max-replay-ids must be 1 to"), "{e}");
        args.max_replay_ids = Some(MAX_REPLAY_IDS + 1);
        assert!(args.resolve().is_err());
    }

    #[test]
    fn bad_values_are_explained() {
        let args = ServeArgs {
            store: Some("oracle".into()),
            ..ServeArgs::default()
        };
        assert!(
            args.resolve()
                .unwrap_err()
                .to_string()
                .contains("unknown store")
        );
        let (_dir, args) = with_file("prot = 1\n");
        assert!(args.resolve().is_err(), "unknown keys are refused");
    }
}
