//! TLS certificates for the broker: a local CA plus short-lived, self-renewing leaf certificates.
//!
//! # Why it works this way
//!
//! QUIC requires TLS 1.3, and fastPort has to be reachable by two kinds of clients that
//! establish trust differently:
//!
//! * **Native clients** (the Rust SDK, CLI tools) trust a CA file given with `--ca certs/ca.pem`.
//!   The broker therefore creates a local CA once (valid one year) and issues leaf certificates
//!   from it. Because clients anchor trust in the CA, the leaf can be replaced at any time
//!   without breaking anybody.
//! * **Browsers** (WebTransport) cannot be told about a private CA, but they accept a
//!   certificate pinned through `serverCertificateHashes`, provided it is an ECDSA certificate
//!   whose total validity period is at most 14 days. The leaf is therefore ECDSA P-256 and valid
//!   for 13 days (plus one hour of back-dating for clock skew), and browsers fetch its SHA-256
//!   from `GET /v1/cert-hash` (see [`CertInfo`]).
//!
//! A short-lived leaf must be renewed while the broker runs. [`Certs`] keeps the current leaf
//! behind a lock inside a [`rustls::server::ResolvesServerCert`] implementation, so
//! [`Certs::renew_if_due`] can swap it in place: the QUIC listener keeps running, new handshakes
//! get the new leaf, and connections already established are unaffected.
//!
//! With `--cert FILE --key FILE` an operator supplies a real certificate instead; then nothing is
//! generated or renewed, but the hash and expiry of the first certificate are still reported.
//!
//! # Files
//!
//! The certificate directory (default `certs/`) holds `ca.pem`, `ca.key.pem` (mode 0600),
//! `leaf.pem` (the leaf only; the chain `[leaf, CA]` is assembled in memory) and `leaf.key.pem`
//! (mode 0600). Files are written to a temporary name and renamed into place so a crash never
//! leaves a truncated file, and key files are created with mode 0600 from the start.
//! Anything that is missing, unparsable, inconsistent or too close to expiry is regenerated on
//! start; I/O errors other than "not found" (for example permission denied) are reported instead
//! of being papered over.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::x509::X509Name;

/// Host names and addresses put in the leaf certificate when [`CertSource::hosts`] is empty.
pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// File name of the CA certificate inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the certificate directory.
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// File name of the leaf certificate inside the certificate directory.
pub const LEAF_CERT_FILE: &str = "leaf.pem";
/// File name of the leaf private key inside the certificate directory.
pub const LEAF_KEY_FILE: &str = "leaf.key.pem";

/// Validity of a newly created local CA.
const CA_VALIDITY: Duration = Duration::days(365);
/// A CA with less than this left is replaced (on start, or when the leaf is next renewed).
const CA_MIN_REMAINING: Duration = Duration::days(30);
/// Validity of a newly issued leaf, counted from now. Browsers require at most 14 days in total
/// for `serverCertificateHashes`, and the total includes [`BACKDATE`].
const LEAF_VALIDITY: Duration = Duration::days(13);
/// A leaf with less than this left (or less than a third of its lifetime) is renewed.
const LEAF_MIN_REMAINING: Duration = Duration::days(3);
/// `not_before` is set this far in the past so clients with a slightly slow clock accept it.
const BACKDATE: Duration = Duration::hours(1);
/// A certificate whose `not_before` lies further in the future than this is treated as unusable.
const FUTURE_TOLERANCE: Duration = Duration::minutes(5);
/// How often the background task started by [`Certs::spawn_renewal`] checks the leaf.
const RENEWAL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60 * 60);

const CA_COMMON_NAME: &str = "fastPort local CA";
const LEAF_COMMON_NAME: &str = "fastPort broker";
const ORGANIZATION: &str = "fastPort";

/// Errors from loading, generating or using TLS certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file is not valid PEM.
    #[error("invalid PEM in {}: {source}", path.display())]
    BadPem {
        /// The file that failed to parse.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: pem::Error,
    },
    /// A PEM file contains no `CERTIFICATE` section.
    #[error("no certificate found in {}", path.display())]
    NoCertificate {
        /// The file that was searched.
        path: PathBuf,
    },
    /// A PEM file contains no private key section.
    #[error("no private key found in {}", path.display())]
    NoPrivateKey {
        /// The file that was searched.
        path: PathBuf,
    },
    /// A certificate could be read as PEM but is not a usable X.509 certificate.
    #[error("unusable certificate in {}: {reason}", path.display())]
    BadCertificate {
        /// The file the certificate came from.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Only one of `--cert` and `--key` was given.
    #[error("--cert and --key must be given together")]
    IncompleteCertPair,
    /// No usable root certificate could be loaded from the operating system.
    #[error("no usable system root certificates: {0}")]
    SystemRoots(String),
    /// rustls rejected the key or the configuration (for example a key that does not match the
    /// certificate).
    #[error("TLS error: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the broker's certificate comes from.
#[derive(Debug, Clone, Default)]
pub struct CertSource {
    /// Directory holding the generated CA and leaf (created if missing). Unused with `cert`/`key`.
    pub dir: PathBuf,
    /// Host names and IP addresses the generated leaf must cover. Empty means [`DEFAULT_HOSTS`].
    pub hosts: Vec<String>,
    /// `--cert`: PEM certificate chain (leaf first) to use instead of generating one.
    pub cert: Option<PathBuf>,
    /// `--key`: PEM private key matching `cert`.
    pub key: Option<PathBuf>,
}

/// Public facts about the current leaf certificate, as served by `GET /v1/cert-hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Lower-case hex SHA-256 of the leaf certificate's DER encoding (what browsers pin).
    pub sha256_hex: String,
    /// End of the leaf's validity.
    pub not_after: OffsetDateTime,
    /// The CA file native clients should trust (`--ca`), when the CA is generated locally.
    pub ca_path: Option<PathBuf>,
    /// Whether the certificate was generated by the broker (false for `--cert`/`--key`).
    pub generated: bool,
}

impl CertInfo {
    /// `not_after` formatted as RFC 3339, e.g. `2025-01-31T12:00:00Z`.
    pub fn not_after_rfc3339(&self) -> String {
        // X.509 times are UTC with four-digit years, which RFC 3339 can always represent;
        // fall back to the `Display` form instead of panicking should that ever not hold.
        self.not_after
            .format(&Rfc3339)
            .unwrap_or_else(|_| self.not_after.to_string())
    }
}

/// The broker's certificates: the current leaf (swappable) and, for generated certificates,
/// the local CA used to renew it.
pub struct Certs {
    resolver: Arc<LeafResolver>,
    /// `None` when the certificate was supplied with `--cert`/`--key` (never renewed).
    issuing: Option<Mutex<Issuing>>,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately shows only public information, never key material.
        f.debug_struct("Certs")
            .field("leaf", &self.info())
            .field("renewable", &self.issuing.is_some())
            .finish()
    }
}

impl Certs {
    /// Loads the certificate described by `source`, creating the CA and/or leaf if needed.
    ///
    /// With `cert` and `key` set, those files are used as they are. Otherwise the CA in
    /// `source.dir` is reused if it is valid for at least 30 more days (else a new one is made),
    /// and the leaf is reused if it is signed by that CA, covers all `hosts`, and is not yet due
    /// for renewal (see [`Certs::renew_if_due`]); else a new leaf is issued.
    ///
    /// This does blocking file I/O; call it at start-up or from `spawn_blocking`.
    pub fn load_or_create(source: CertSource) -> Result<Arc<Certs>, TlsError> {
        match (source.cert, source.key) {
            (Some(cert), Some(key)) => Self::load_provided(&cert, &key),
            (None, None) => Self::load_generated(source.dir, source.hosts),
            _ => Err(TlsError::IncompleteCertPair),
        }
    }

    /// Public information about the current leaf.
    pub fn info(&self) -> CertInfo {
        self.resolver.current().info.clone()
    }

    /// A server configuration using the current leaf: TLS 1.3 only, ring provider, no client
    /// authentication, the given ALPN protocols. The certificate is chosen per handshake, so
    /// the configuration picks up renewed leaves without being rebuilt.
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// Renews the leaf if it has less than 3 days (or less than a third of its lifetime) left
    /// at `now`; returns whether it did. Supplied (`--cert`) certificates are never renewed.
    ///
    /// `now` only drives the decision; a new leaf is always issued from the real clock so that
    /// it is valid immediately. If the CA itself has less than 30 days left at `now`, a new CA
    /// is created first (logged as a warning: native clients then need the new `ca.pem`).
    pub fn renew_if_due(&self, now: OffsetDateTime) -> Result<bool, TlsError> {
        let Some(issuing) = &self.issuing else {
            return Ok(false);
        };
        // Serialises renewals; holding it across the checks avoids issuing two leaves at once.
        let mut issuing = issuing.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.resolver.current();
        if !leaf_is_due(current.not_before, current.info.not_after, now) {
            return Ok(false);
        }
        if issuing.ca.not_after - now < CA_MIN_REMAINING {
            tracing::warn!(
                ca = %issuing.ca.path.display(),
                "local CA expires within 30 days; creating a new one (native clients must be given the new ca.pem)"
            );
            issuing.ca = create_ca(&issuing.dir)?;
        }
        let leaf = issue_leaf(&issuing.ca, &issuing.hosts, &issuing.dir)?;
        tracing::info!(
            sha256 = %leaf.info.sha256_hex,
            not_after = %leaf.info.not_after_rfc3339(),
            previous_sha256 = %current.info.sha256_hex,
            "renewed TLS leaf certificate"
        );
        self.resolver.set(leaf);
        Ok(true)
    }

    /// Spawns a tokio task that calls [`Certs::renew_if_due`] every hour (the first check runs
    /// immediately) and logs what it did. The task ends by itself once the `Certs` is dropped;
    /// abort the handle to stop it earlier. Must be called within a tokio runtime.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Certs> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(RENEWAL_CHECK_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(certs) = weak.upgrade() else {
                    tracing::debug!("certificates dropped; stopping renewal task");
                    break;
                };
                // File I/O and key generation: keep them off the async worker threads.
                let result = tokio::task::spawn_blocking(move || {
                    certs.renew_if_due(OffsetDateTime::now_utc())
                })
                .await;
                match result {
                    Ok(Ok(true)) => {} // renew_if_due already logged the new certificate
                    Ok(Ok(false)) => {
                        tracing::debug!("TLS leaf certificate not yet due for renewal")
                    }
                    Ok(Err(err)) => {
                        tracing::error!(error = %err, "TLS leaf certificate renewal failed; will retry")
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "TLS leaf certificate renewal task panicked")
                    }
                }
            }
        })
    }

    fn load_provided(cert_path: &Path, key_path: &Path) -> Result<Arc<Certs>, TlsError> {
        let chain = read_cert_chain(cert_path)?;
        let Some(first) = chain.first() else {
            return Err(TlsError::NoCertificate {
                path: cert_path.to_path_buf(),
            });
        };
        let parsed = parse_leaf_facts(first).map_err(|reason| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason,
        })?;
        let key = read_private_key(key_path)?;
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            // Unknown: the key type cannot report its public key; let the handshake decide.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(err) => return Err(err.into()),
        }
        let now = OffsetDateTime::now_utc();
        if parsed.not_after <= now {
            tracing::warn!(cert = %cert_path.display(), "the supplied TLS certificate has expired");
        } else if parsed.not_after - now < LEAF_MIN_REMAINING {
            tracing::warn!(cert = %cert_path.display(), "the supplied TLS certificate expires within 3 days");
        }
        let leaf = Leaf {
            certified: Arc::new(certified),
            info: CertInfo {
                sha256_hex: parsed.sha256_hex,
                not_after: parsed.not_after,
                ca_path: None,
                generated: false,
            },
            not_before: parsed.not_before,
        };
        tracing::info!(
            cert = %cert_path.display(),
            sha256 = %leaf.info.sha256_hex,
            not_after = %leaf.info.not_after_rfc3339(),
            "using supplied TLS certificate"
        );
        Ok(Arc::new(Certs {
            resolver: Arc::new(LeafResolver::new(leaf)),
            issuing: None,
        }))
    }

    fn load_generated(dir: PathBuf, hosts: Vec<String>) -> Result<Arc<Certs>, TlsError> {
        let hosts = normalize_hosts(hosts);
        fs::create_dir_all(&dir).map_err(|source| TlsError::Io {
            path: dir.clone(),
            source,
        })?;
        let now = OffsetDateTime::now_utc();

        let ca = match load_ca(&dir, now)? {
            Some(ca) => {
                tracing::info!(ca = %ca.path.display(), "reusing local CA");
                ca
            }
            None => create_ca(&dir)?,
        };
        let leaf = match load_leaf(&dir, &ca, &hosts, now)? {
            Some(leaf) => {
                tracing::info!(
                    sha256 = %leaf.info.sha256_hex,
                    not_after = %leaf.info.not_after_rfc3339(),
                    "reusing TLS leaf certificate"
                );
                leaf
            }
            None => {
                let leaf = issue_leaf(&ca, &hosts, &dir)?;
                tracing::info!(
                    sha256 = %leaf.info.sha256_hex,
                    not_after = %leaf.info.not_after_rfc3339(),
                    hosts = ?hosts,
                    "issued TLS leaf certificate"
                );
                leaf
            }
        };
        Ok(Arc::new(Certs {
            resolver: Arc::new(LeafResolver::new(leaf)),
            issuing: Some(Mutex::new(Issuing { dir, hosts, ca })),
        }))
    }
}

/// A TLS client configuration that trusts [`client_roots`]`(ca)`, offering `alpn` if given:
/// what the SDK uses for QUIC and WSS, and the CLI for HTTPS.
pub fn client_config(
    ca: Option<&Path>,
    alpn: Option<&[u8]>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(client_roots(ca)?)
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        tls.alpn_protocols = vec![alpn.to_vec()];
    }
    Ok(tls)
}

/// Trust anchors for clients: the certificates in the given CA PEM file (one or more), or the
/// operating system's root certificates when `None`.
pub fn client_roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = read_cert_chain(path)?;
            let total = certs.len();
            if total == 0 {
                return Err(TlsError::NoCertificate {
                    path: path.to_path_buf(),
                });
            }
            let (added, ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::BadCertificate {
                    path: path.to_path_buf(),
                    reason: format!("none of its {total} certificate(s) is a usable trust anchor"),
                });
            }
            if ignored > 0 {
                tracing::warn!(ca = %path.display(), ignored, "ignored unusable certificates in CA file");
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                tracing::warn!(error = %err, "error while loading system root certificates");
            }
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                let detail = if native.errors.is_empty() {
                    "none found".to_owned()
                } else {
                    native
                        .errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                return Err(TlsError::SystemRoots(detail));
            }
        }
    }
    Ok(roots)
}

// ---------------------------------------------------------------------------------------------
// Current leaf and the certificate resolver
// ---------------------------------------------------------------------------------------------

/// A leaf certificate with its key and public facts; swapped as one unit so the hash reported
/// by [`Certs::info`] always belongs to the certificate handshakes present.
struct Leaf {
    certified: Arc<CertifiedKey>,
    info: CertInfo,
    not_before: OffsetDateTime,
}

/// Hands the current leaf to every handshake; renewal replaces it under the lock.
struct LeafResolver {
    current: RwLock<Arc<Leaf>>,
}

impl LeafResolver {
    fn new(leaf: Leaf) -> Self {
        Self {
            current: RwLock::new(Arc::new(leaf)),
        }
    }

    fn current(&self) -> Arc<Leaf> {
        // A poisoned lock still holds a complete `Arc` (it is only ever replaced whole).
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, leaf: Leaf) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(leaf);
    }
}

impl fmt::Debug for LeafResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafResolver")
            .field("leaf", &self.current().info)
            .finish()
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One certificate for every SNI value: browsers pinning the hash ignore names, and
        // native clients check the name against the SANs themselves.
        Some(self.current().certified.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Local CA
// ---------------------------------------------------------------------------------------------

/// The local CA, loaded from (or just written to) the certificate directory.
struct Ca {
    /// Issuer rebuilt from `ca.pem` with `ca.key.pem`: same subject and key as the file, so
    /// leaves signed with it chain to the CA on disk. Its own DER is never sent to anybody.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The exact DER from `ca.pem`, sent as the second certificate of the chain.
    der: CertificateDer<'static>,
    not_after: OffsetDateTime,
    path: PathBuf,
}

/// Why a file on disk is not reused; logged, then the file is regenerated.
type Unusable = String;

fn load_ca(dir: &Path, now: OffsetDateTime) -> Result<Option<Ca>, TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let (cert_pem, key_pem) = match (read_optional(&cert_path)?, read_optional(&key_path)?) {
        (Some(cert_pem), Some(key_pem)) => (cert_pem, key_pem),
        (None, None) => {
            tracing::info!(dir = %dir.display(), "no local CA found; creating one");
            return Ok(None);
        }
        (Some(_), None) | (None, Some(_)) => {
            tracing::warn!(
                dir = %dir.display(),
                "only one of {CA_CERT_FILE} and {CA_KEY_FILE} exists; creating a new local CA"
            );
            return Ok(None);
        }
    };
    match ca_from_pem(&cert_pem, &key_pem, &cert_path, now) {
        Ok(ca) => Ok(Some(ca)),
        Err(reason) => {
            tracing::warn!(ca = %cert_path.display(), %reason, "replacing local CA");
            Ok(None)
        }
    }
}

fn ca_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    path: &Path,
    now: OffsetDateTime,
) -> Result<Ca, Unusable> {
    let der = CertificateDer::from_pem_slice(cert_pem)
        .map_err(|err| format!("cannot read certificate: {err}"))?;
    let key_pem =
        std::str::from_utf8(key_pem).map_err(|_| "private key file is not UTF-8".to_owned())?;
    let key =
        KeyPair::from_pem(key_pem).map_err(|err| format!("cannot read private key: {err}"))?;

    let not_after = {
        let x509 = parse_x509(&der)?;
        if !x509.is_ca() {
            return Err("certificate is not a CA".to_owned());
        }
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err("private key does not match the certificate".to_owned());
        }
        // rcgen's `from_ca_cert_der` panics on an empty relative distinguished name (in the
        // subject or in a name constraint); refuse such input up front.
        if !single_valued_rdns(x509.subject()) {
            return Err("subject has a multi-valued or empty RDN".to_owned());
        }
        match x509.name_constraints() {
            Err(_) => return Err("invalid name constraints".to_owned()),
            Ok(Some(constraints)) => {
                let subtrees = [
                    &constraints.value.permitted_subtrees,
                    &constraints.value.excluded_subtrees,
                ];
                let bad = subtrees.into_iter().flatten().flatten().any(|subtree| {
                    matches!(&subtree.base, GeneralName::DirectoryName(name) if !single_valued_rdns(name))
                });
                if bad {
                    return Err("name constraint has a multi-valued or empty RDN".to_owned());
                }
            }
            Ok(None) => {}
        }
        let validity = x509.validity();
        let (not_before, not_after) = (
            validity.not_before.to_datetime(),
            validity.not_after.to_datetime(),
        );
        if not_before > now + FUTURE_TOLERANCE {
            return Err(format!("not valid before {not_before}"));
        }
        if not_after - now < CA_MIN_REMAINING {
            return Err(format!(
                "expires at {not_after}, less than 30 days from now"
            ));
        }
        not_after
    };

    let params = CertificateParams::from_ca_cert_der(&der)
        .map_err(|err| format!("cannot use certificate as issuer: {err}"))?;
    let issuer = params
        .self_signed(&key)
        .map_err(|err| format!("cannot rebuild issuer: {err}"))?;
    Ok(Ca {
        issuer,
        key,
        der,
        not_after,
        path: path.to_path_buf(),
    })
}

/// Creates a new CA, writes it to `dir` and loads it back the same way an existing one is
/// loaded, so every leaf is signed through the same (rebuilt) issuer path.
fn create_ca(dir: &Path) -> Result<Ca, TlsError> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(CA_COMMON_NAME);
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    // Path length 0: the CA can sign leaves but no intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;

    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let key_pem = key.serialize_pem();
    // Key first: a crash in between leaves a mismatched pair, which is detected and replaced.
    write_file(&key_path, key_pem.as_bytes(), true)?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;

    let ca = ca_from_pem(cert.pem().as_bytes(), key_pem.as_bytes(), &cert_path, now).map_err(
        |reason| TlsError::BadCertificate {
            path: cert_path.clone(),
            reason,
        },
    )?;
    tracing::info!(
        ca = %cert_path.display(),
        not_after = %ca.not_after,
        "created local CA; native clients should trust it with --ca"
    );
    Ok(ca)
}

// ---------------------------------------------------------------------------------------------
// Leaf
// ---------------------------------------------------------------------------------------------

fn load_leaf(
    dir: &Path,
    ca: &Ca,
    hosts: &[String],
    now: OffsetDateTime,
) -> Result<Option<Leaf>, TlsError> {
    let cert_path = dir.join(LEAF_CERT_FILE);
    let key_path = dir.join(LEAF_KEY_FILE);
    let (Some(cert_pem), Some(key_pem)) = (read_optional(&cert_path)?, read_optional(&key_path)?)
    else {
        return Ok(None);
    };
    match leaf_from_pem(&cert_pem, &key_pem, ca, hosts, now) {
        Ok(leaf) => Ok(Some(leaf)),
        Err(reason) => {
            tracing::info!(leaf = %cert_path.display(), %reason, "issuing a new TLS leaf certificate");
            Ok(None)
        }
    }
}

fn leaf_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    ca: &Ca,
    hosts: &[String],
    now: OffsetDateTime,
) -> Result<Leaf, Unusable> {
    let der = CertificateDer::from_pem_slice(cert_pem)
        .map_err(|err| format!("cannot read certificate: {err}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|err| format!("cannot read private key: {err}"))?;
    {
        let x509 = parse_x509(&der)?;
        let ca_x509 = parse_x509(&ca.der)?;
        if x509.issuer().as_raw() != ca_x509.subject().as_raw()
            || x509.verify_signature(Some(ca_x509.public_key())).is_err()
        {
            return Err("not signed by the current CA".to_owned());
        }
        if let Some(host) = hosts.iter().find(|host| !san_covers(&x509, host)) {
            return Err(format!("does not cover host {host:?}"));
        }
    }
    let facts = parse_leaf_facts(&der)?;
    if facts.not_before > now + FUTURE_TOLERANCE {
        return Err(format!("not valid before {}", facts.not_before));
    }
    if leaf_is_due(facts.not_before, facts.not_after, now) {
        return Err(format!("expires at {}, renewal due", facts.not_after));
    }
    leaf_from_parts(der, key, ca, facts)
}

/// Issues a new leaf for `hosts`, signed by `ca`, and writes it to `dir`.
fn issue_leaf(ca: &Ca, hosts: &[String], dir: &Path) -> Result<Leaf, TlsError> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(LEAF_COMMON_NAME);
    params.subject_alt_names = hosts
        .iter()
        .map(|host| san_for(host))
        .collect::<Result<_, _>>()?;
    params.not_before = now - BACKDATE;
    params.not_after = now + LEAF_VALIDITY;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer, &ca.key)?;

    let cert_path = dir.join(LEAF_CERT_FILE);
    write_file(
        &dir.join(LEAF_KEY_FILE),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;

    let der = cert.der().clone();
    // rcgen serialises private keys as PKCS#8.
    let key_der = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let bad = |reason| TlsError::BadCertificate {
        path: cert_path.clone(),
        reason,
    };
    let facts = parse_leaf_facts(&der).map_err(bad)?;
    leaf_from_parts(der, key_der, ca, facts).map_err(bad)
}

fn leaf_from_parts(
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    ca: &Ca,
    facts: LeafFacts,
) -> Result<Leaf, Unusable> {
    let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&key)
        .map_err(|err| format!("unusable private key: {err}"))?;
    let certified = CertifiedKey::new(vec![der, ca.der.clone()], signing_key);
    certified
        .keys_match()
        .map_err(|err| format!("private key does not match the certificate: {err}"))?;
    Ok(Leaf {
        certified: Arc::new(certified),
        info: CertInfo {
            sha256_hex: facts.sha256_hex,
            not_after: facts.not_after,
            ca_path: Some(ca.path.clone()),
            generated: true,
        },
        not_before: facts.not_before,
    })
}

/// Renewal rule shared by start-up and [`Certs::renew_if_due`]: due when less than 3 days or
/// less than a third of the lifetime remains.
fn leaf_is_due(not_before: OffsetDateTime, not_after: OffsetDateTime, now: OffsetDateTime) -> bool {
    let lifetime = not_after - not_before;
    let threshold = std::cmp::max(LEAF_MIN_REMAINING, lifetime / 3);
    not_after - now < threshold
}

/// State needed to issue new leaves; only present for generated certificates.
struct Issuing {
    dir: PathBuf,
    hosts: Vec<String>,
    ca: Ca,
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Hash and validity of a certificate, as reported in [`CertInfo`].
struct LeafFacts {
    sha256_hex: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn parse_x509<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, Unusable> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_rest, cert)| cert)
        .map_err(|err| format!("not an X.509 certificate: {err}"))
}

fn parse_leaf_facts(der: &CertificateDer<'_>) -> Result<LeafFacts, Unusable> {
    let x509 = parse_x509(der)?;
    let validity = x509.validity();
    Ok(LeafFacts {
        sha256_hex: hex::encode(Sha256::digest(der.as_ref())),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
    })
}

/// Whether every RDN of `name` holds exactly one attribute (all rcgen can rebuild).
fn single_valued_rdns(name: &X509Name<'_>) -> bool {
    name.iter().all(|rdn| rdn.iter().count() == 1)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION);
    name.push(DnType::CommonName, common_name);
    name
}

/// Trims hosts, drops empty and duplicate entries (case-insensitively), and falls back to
/// [`DEFAULT_HOSTS`] when nothing is left.
fn normalize_hosts(hosts: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(hosts.len());
    for host in hosts {
        let host = host.trim();
        if !host.is_empty() && !out.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            out.push(host.to_owned());
        }
    }
    if out.is_empty() {
        out = DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect();
    }
    out
}

/// An IP address (optionally in brackets, as in URLs) when `host` parses as one.
fn host_ip(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// The SAN entry for `host`: an iPAddress for IP literals, a dNSName otherwise.
fn san_for(host: &str) -> Result<SanType, rcgen::Error> {
    Ok(match host_ip(host) {
        Some(ip) => SanType::IpAddress(ip),
        None => SanType::DnsName(host.try_into()?),
    })
}

/// Whether the certificate's SAN extension has an entry of the right type for `host`.
fn san_covers(x509: &X509Certificate<'_>, host: &str) -> bool {
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return false;
    };
    let ip = host_ip(host);
    san.value.general_names.iter().any(|name| match (name, ip) {
        (GeneralName::IPAddress(bytes), Some(IpAddr::V4(ip))) => *bytes == ip.octets().as_slice(),
        (GeneralName::IPAddress(bytes), Some(IpAddr::V6(ip))) => *bytes == ip.octets().as_slice(),
        (GeneralName::DNSName(dns), None) => dns.eq_ignore_ascii_case(host),
        _ => false,
    })
}

/// Reads a file, returning `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn pem_error(path: &Path, err: pem::Error) -> TlsError {
    match err {
        pem::Error::Io(source) => TlsError::Io {
            path: path.to_path_buf(),
            source,
        },
        source => TlsError::BadPem {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// All `CERTIFICATE` sections of a PEM file, in order (possibly none).
fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|err| pem_error(path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(path, err))
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|err| match err {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        err => pem_error(path, err),
    })
}

/// Writes `contents` to `path` via a temporary file and a rename, so readers never see a
/// partial file. Private files are created with mode 0600 (on Unix) before anything is written.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A leftover from a crash may have other permissions; `create_new` below needs it gone.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_err(err)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let result = options.open(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(err) = result.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, ServerConnection};

    const ALPN: &[u8] = b"fastport/1";

    fn generated_source(dir: &Path) -> CertSource {
        CertSource {
            dir: dir.to_path_buf(),
            hosts: Vec::new(),
            cert: None,
            key: None,
        }
    }

    fn client_config(ca: &Path) -> Arc<ClientConfig> {
        let roots = client_roots(Some(ca)).expect("CA file loads");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 supported")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }

    /// Moves every pending TLS record from `from` to `to`.
    fn pump(
        from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
        to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    ) -> Result<(), rustls::Error> {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).expect("write to Vec");
        }
        let mut rest = buf.as_slice();
        while !rest.is_empty() {
            to.read_tls(&mut rest).expect("read from slice");
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// Runs a complete TLS handshake in memory; returns the client connection on success.
    fn handshake(certs: &Arc<Certs>, ca: &Path, name: &str) -> Result<ClientConnection, String> {
        let server_config = Arc::new(certs.server_config(&[ALPN]).map_err(|e| e.to_string())?);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let mut client =
            ClientConnection::new(client_config(ca), server_name).map_err(|e| e.to_string())?;
        let mut server = ServerConnection::new(server_config).map_err(|e| e.to_string())?;
        for _ in 0..10 {
            pump(&mut client, &mut server).map_err(|e| format!("server: {e}"))?;
            pump(&mut server, &mut client).map_err(|e| format!("client: {e}"))?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(client);
            }
        }
        Err("handshake did not complete".to_owned())
    }

    fn assert_handshake_ok(certs: &Arc<Certs>, ca: &Path) {
        let client = handshake(certs, ca, "localhost").expect("handshake succeeds");
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let presented = client
            .peer_certificates()
            .expect("server sent certificates");
        assert_eq!(presented.len(), 2, "chain is [leaf, CA]");
        assert_eq!(
            hex::encode(Sha256::digest(presented[0].as_ref())),
            certs.info().sha256_hex
        );
    }

    fn leaf_validity(dir: &Path) -> (OffsetDateTime, OffsetDateTime) {
        let pem = fs::read(dir.join(LEAF_CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let facts = parse_leaf_facts(&der).unwrap();
        (facts.not_before, facts.not_after)
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_load_generates_files_and_second_load_reuses_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs"); // does not exist yet
        let first = Certs::load_or_create(generated_source(&dir)).unwrap();
        for file in [CA_CERT_FILE, CA_KEY_FILE, LEAF_CERT_FILE, LEAF_KEY_FILE] {
            assert!(dir.join(file).is_file(), "{file} written");
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
            assert_eq!(mode(&dir.join(LEAF_KEY_FILE)), 0o600);
        }
        let info = first.info();
        assert!(info.generated);
        assert_eq!(
            info.ca_path.as_deref(),
            Some(dir.join(CA_CERT_FILE).as_path())
        );
        assert_eq!(info.sha256_hex.len(), 64);

        let (not_before, not_after) = leaf_validity(&dir);
        assert!(not_after - not_before <= Duration::days(14));
        assert!(not_after - OffsetDateTime::now_utc() > Duration::days(12));
        assert_eq!(info.not_after, not_after);

        let parsed = OffsetDateTime::parse(&info.not_after_rfc3339(), &Rfc3339).unwrap();
        assert_eq!(parsed, info.not_after);

        let ca_before = fs::read(dir.join(CA_CERT_FILE)).unwrap();
        let second = Certs::load_or_create(generated_source(&dir)).unwrap();
        assert_eq!(second.info(), info);
        assert_eq!(fs::read(dir.join(CA_CERT_FILE)).unwrap(), ca_before);
    }

    #[test]
    fn generated_leaf_has_expected_extensions() {
        let tmp = tempfile::tempdir().unwrap();
        Certs::load_or_create(generated_source(tmp.path())).unwrap();
        let pem = fs::read(tmp.path().join(LEAF_CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let leaf = parse_x509(&der).unwrap();
        assert!(!leaf.is_ca());
        let key_usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(key_usage.digital_signature() && !key_usage.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        for host in DEFAULT_HOSTS {
            assert!(san_covers(&leaf, host), "{host}");
        }
        let names = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(!names.contains(&GeneralName::DNSName("127.0.0.1")));

        let pem = fs::read(tmp.path().join(CA_CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let ca = parse_x509(&der).unwrap();
        assert!(ca.is_ca());
        let key_usage = ca.key_usage().unwrap().unwrap().value;
        assert!(key_usage.key_cert_sign() && key_usage.crl_sign());
        let validity = ca.validity();
        let lifetime = validity.not_after.to_datetime() - validity.not_before.to_datetime();
        assert!(lifetime >= Duration::days(365) && lifetime <= Duration::days(366));
    }

    #[test]
    fn handshake_verifies_against_ca_file() {
        let tmp = tempfile::tempdir().unwrap();
        let certs = Certs::load_or_create(generated_source(tmp.path())).unwrap();
        let ca = tmp.path().join(CA_CERT_FILE);
        assert_handshake_ok(&certs, &ca);
        for name in ["127.0.0.1", "::1"] {
            handshake(&certs, &ca, name).expect("IP SANs verify");
        }
        let err = handshake(&certs, &ca, "example.com").expect_err("wrong name must fail");
        assert!(
            err.starts_with("client:") && err.contains("not valid for name"),
            "{err}"
        );

        // A different CA must not verify the leaf either.
        let other = tempfile::tempdir().unwrap();
        Certs::load_or_create(generated_source(other.path())).unwrap();
        let err = handshake(&certs, &other.path().join(CA_CERT_FILE), "localhost")
            .expect_err("foreign CA must fail");
        // Same subject name as ours, so webpki finds it as a candidate and rejects the signature.
        assert!(
            err.starts_with("client:") && err.contains("BadSignature"),
            "{err}"
        );
    }

    #[test]
    fn rebuilt_issuer_signs_chains_that_verify_against_original_ca() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let original = params.self_signed(&key).unwrap();

        // Rebuild the issuer exactly as the broker does after a restart.
        let key = KeyPair::from_pem(&key.serialize_pem()).unwrap();
        let rebuilt = CertificateParams::from_ca_cert_pem(&original.pem())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_ne!(rebuilt.der(), original.der(), "a fresh signature");

        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &rebuilt, &key).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(original.der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                leaf.der(),
                &[],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("leaf signed by the rebuilt issuer chains to the original CA");
    }

    #[test]
    fn renewal_swaps_leaf_and_keeps_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let certs = Certs::load_or_create(generated_source(tmp.path())).unwrap();
        let ca = tmp.path().join(CA_CERT_FILE);
        let ca_pem = fs::read(&ca).unwrap();
        let before = certs.info();
        let server_config = Arc::new(certs.server_config(&[ALPN]).unwrap());

        let now = OffsetDateTime::now_utc();
        assert!(!certs.renew_if_due(now).unwrap());
        assert_eq!(certs.info(), before);

        assert!(certs.renew_if_due(now + Duration::days(12)).unwrap());
        let after = certs.info();
        assert_ne!(after.sha256_hex, before.sha256_hex);
        assert_eq!(fs::read(&ca).unwrap(), ca_pem, "CA unchanged");
        assert_handshake_ok(&certs, &ca);

        // A server config built before the renewal serves the new leaf too.
        let mut client = ClientConnection::new(
            client_config(&ca),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut server = ServerConnection::new(server_config).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            pump(&mut client, &mut server).unwrap();
            pump(&mut server, &mut client).unwrap();
        }
        let presented = client.peer_certificates().unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(presented[0].as_ref())),
            after.sha256_hex
        );

        // The renewed leaf was persisted and is reused on the next start.
        let reloaded = Certs::load_or_create(generated_source(tmp.path())).unwrap();
        assert_eq!(reloaded.info(), after);
        assert!(!certs.renew_if_due(OffsetDateTime::now_utc()).unwrap());
    }

    #[test]
    fn supplied_cert_and_key_are_used_as_is() {
        let tmp = tempfile::tempdir().unwrap();
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["broker.example".to_owned()]).unwrap();
        let cert_path = tmp.path().join("cert.pem");
        let key_path = tmp.path().join("key.pem");
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key_pair.serialize_pem()).unwrap();

        let source = CertSource {
            dir: tmp.path().join("unused"),
            hosts: Vec::new(),
            cert: Some(cert_path.clone()),
            key: Some(key_path.clone()),
        };
        let certs = Certs::load_or_create(source.clone()).unwrap();
        let info = certs.info();
        assert!(!info.generated);
        assert_eq!(info.ca_path, None);
        assert_eq!(
            info.sha256_hex,
            hex::encode(Sha256::digest(cert.der().as_ref()))
        );
        let expected = parse_x509(cert.der())
            .unwrap()
            .validity()
            .not_after
            .to_datetime();
        assert_eq!(info.not_after, expected);
        assert!(!certs.renew_if_due(OffsetDateTime::now_utc()).unwrap());
        assert!(!certs.renew_if_due(expected + Duration::days(1)).unwrap());
        assert_eq!(certs.info(), info);
        certs.server_config(&[ALPN]).unwrap();
        assert!(!tmp.path().join("unused").exists(), "nothing generated");

        // A key that does not belong to the certificate is rejected.
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(&key_path, other.serialize_pem()).unwrap();
        let err = Certs::load_or_create(source.clone()).unwrap_err();
        assert!(matches!(err, TlsError::Rustls(_)), "{err}");

        // Files without the expected sections.
        fs::write(&key_path, cert.pem()).unwrap();
        let err = Certs::load_or_create(source.clone()).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        fs::write(&cert_path, key_pair.serialize_pem()).unwrap();
        let err = Certs::load_or_create(source.clone()).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

        let err = Certs::load_or_create(CertSource {
            key: None,
            ..source
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::IncompleteCertPair), "{err}");
    }

    #[test]
    fn missing_supplied_file_reports_path() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope.pem");
        let err = Certs::load_or_create(CertSource {
            dir: tmp.path().to_path_buf(),
            hosts: Vec::new(),
            cert: Some(missing.clone()),
            key: Some(missing.clone()),
        })
        .unwrap_err();
        match err {
            TlsError::Io { path, .. } => assert_eq!(path, missing),
            other => panic!("unexpected error {other}"),
        }
        assert!(matches!(
            client_roots(Some(&missing)),
            Err(TlsError::Io { .. })
        ));
    }

    #[test]
    fn expiring_ca_is_replaced_on_load() {
        let tmp = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - Duration::days(355);
        params.not_after = now + Duration::days(10);
        let old_ca = params.self_signed(&key).unwrap();
        fs::write(tmp.path().join(CA_CERT_FILE), old_ca.pem()).unwrap();
        fs::write(tmp.path().join(CA_KEY_FILE), key.serialize_pem()).unwrap();

        let certs = Certs::load_or_create(generated_source(tmp.path())).unwrap();
        let new_pem = fs::read(tmp.path().join(CA_CERT_FILE)).unwrap();
        let new_der = CertificateDer::from_pem_slice(&new_pem).unwrap();
        assert_ne!(new_der, *old_ca.der(), "CA replaced");
        let not_after = parse_x509(&new_der)
            .unwrap()
            .validity()
            .not_after
            .to_datetime();
        assert!(not_after - now > Duration::days(360));
        #[cfg(unix)]
        assert_eq!(mode(&tmp.path().join(CA_KEY_FILE)), 0o600);
        assert_handshake_ok(&certs, &tmp.path().join(CA_CERT_FILE));
    }

    #[test]
    fn leaf_is_reissued_when_hosts_change_or_files_are_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Certs::load_or_create(generated_source(tmp.path()))
            .unwrap()
            .info();

        let mut source = generated_source(tmp.path());
        source.hosts = vec!["broker.internal".to_owned(), "10.0.0.7".to_owned()];
        let certs = Certs::load_or_create(source.clone()).unwrap();
        let second = certs.info();
        assert_ne!(second.sha256_hex, first.sha256_hex);
        let client = handshake(&certs, &tmp.path().join(CA_CERT_FILE), "broker.internal").unwrap();
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        handshake(&certs, &tmp.path().join(CA_CERT_FILE), "10.0.0.7").unwrap();
        handshake(&certs, &tmp.path().join(CA_CERT_FILE), "localhost").unwrap_err();

        // Same hosts again: reused.
        assert_eq!(
            Certs::load_or_create(source.clone()).unwrap().info(),
            second
        );

        // A leaf key that no longer matches the certificate gets the leaf reissued.
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(tmp.path().join(LEAF_KEY_FILE), other.serialize_pem()).unwrap();
        let third = Certs::load_or_create(source.clone()).unwrap().info();
        assert_ne!(third.sha256_hex, second.sha256_hex);

        // Garbage in the leaf file too.
        fs::write(tmp.path().join(LEAF_CERT_FILE), b"not a certificate").unwrap();
        let fourth = Certs::load_or_create(source).unwrap().info();
        assert_ne!(fourth.sha256_hex, third.sha256_hex);
    }

    #[test]
    fn leaf_from_another_ca_is_reissued() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Certs::load_or_create(generated_source(tmp.path()))
            .unwrap()
            .info();
        fs::remove_file(tmp.path().join(CA_CERT_FILE)).unwrap();
        let certs = Certs::load_or_create(generated_source(tmp.path())).unwrap();
        assert_ne!(certs.info().sha256_hex, first.sha256_hex);
        assert_handshake_ok(&certs, &tmp.path().join(CA_CERT_FILE));
    }

    #[test]
    fn renewal_rule() {
        let start = OffsetDateTime::now_utc();
        let end = start + Duration::days(13);
        assert!(!leaf_is_due(start, end, start));
        assert!(!leaf_is_due(start, end, start + Duration::days(8)));
        assert!(leaf_is_due(start, end, start + Duration::days(9)));
        assert!(leaf_is_due(start, end, end + Duration::days(1)));
        // Long-lived certificates: a third of the lifetime dominates 3 days.
        let year = start + Duration::days(365);
        assert!(leaf_is_due(start, year, start + Duration::days(250)));
        assert!(!leaf_is_due(start, year, start + Duration::days(240)));
    }

    #[test]
    fn client_roots_rejects_files_without_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("empty.pem");
        fs::write(&path, b"").unwrap();
        assert!(matches!(
            client_roots(Some(&path)),
            Err(TlsError::NoCertificate { .. })
        ));
        fs::write(
            &path,
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(
            client_roots(Some(&path)),
            Err(TlsError::BadPem { .. })
        ));
    }

    #[tokio::test]
    async fn renewal_task_runs_and_can_be_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let certs = Certs::load_or_create(generated_source(tmp.path())).unwrap();
        let before = certs.info();
        let handle = certs.spawn_renewal();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!handle.is_finished());
        handle.abort();
        assert!(handle.await.unwrap_err().is_cancelled());
        assert_eq!(certs.info(), before, "a fresh leaf is not renewed");
    }
}
