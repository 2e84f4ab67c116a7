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
    pub listen: Option<IpAddr>,

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

    /// WebSocket ping interval, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub ws_ping_interval_ms: Option<u64>,

    /// WebSocket connections silent this long are closed, and file uploads on them
    /// that get nothing for this long are dropped, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub ws_idle_timeout_ms: Option<u64>,

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
    pub listen: Option<IpAddr>,
    pub port: Option<u16>,
    pub http: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<String>,
    pub sqlite_path: Option<PathBuf>,
    pub database_url: Option<String>,
    pub certs_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub replay_window_ms: Option<u64>,
    pub max_replay_ids: Option<usize>,
    pub max_payload: Option<u64>,
    pub max_file_size: Option<u64>,
    pub max_spool_size: Option<u64>,
    pub ws_ping_interval_ms: Option<u64>,
    pub ws_idle_timeout_ms: Option<u64>,
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
        let from_file = |addr: Option<SocketAddr>| {
            addr.unwrap_or(SocketAddr::new(
                file.listen.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                file.port.unwrap_or(DEFAULT_PORT),
            ))
        };
        let bind = |explicit: Option<SocketAddr>, file_addr: Option<SocketAddr>| {
            explicit.unwrap_or_else(|| {
                let base = from_file(file_addr);
                SocketAddr::new(
                    self.listen.unwrap_or(base.ip()),
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
        let mut hosts: Vec<String> = crate::tls::DEFAULT_HOSTS
            .iter()
            .map(|h| h.to_string())
            .collect();
        for ip in [http.ip(), quic.ip()] {
            if !ip.is_unspecified() && !hosts.contains(&ip.to_string()) {
                hosts.push(ip.to_string());
            }
        }
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
        let driver = DriverConfig {
            core: CoreConfig {
                replay_window_ms,
                replay_capacity,
                max_file_bytes,
                max_payload_bytes: max_payload,
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
            ..defaults
        };
        if carrier.ws_ping_interval.is_zero() || carrier.ws_idle_timeout <= carrier.ws_ping_interval
        {
            return Err(ConfigError::Invalid(
                "--ws-idle-timeout-ms must be longer than --ws-ping-interval-ms (and both above 0)"
                    .into(),
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
        })
    }
}

/// `listen` in `fastport.toml`, read as `--listen` is.
fn listen_in_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    let host = String::deserialize(d)?;
    parse_listen(&host)
        .map(Some)
        .map_err(|why| serde::de::Error::custom(format!("listen = {host:?}: {why}")))
}

/// `--listen`/`HOST`: an IP address, or a host name (`HOST=localhost`, as a Node
/// server would take it) resolved once, preferring IPv4.
fn parse_listen(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
        return Err("neither an IP address nor a host name".into());
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, 0))
        .map_err(|e| format!("not an IP address, and the name does not resolve: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| a.ip())
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
            Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        );
        assert_eq!(parse_listen("::1"), Ok("::1".parse().expect("ip")));
        assert_eq!(
            parse_listen("localhost"),
            Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
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
        args.listen = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
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
