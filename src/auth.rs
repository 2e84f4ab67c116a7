//! Session passwords: argon2id at rest, verified off the async threads, with a cache so a
//! reconnect storm costs a hash lookup instead of an argon2 run per client, and a per-IP
//! budget of full verifications so nobody can guess passwords or burn the CPU.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use argon2::password_hash::SaltString;
use argon2::password_hash::rand_core::OsRng;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::core::{Reject, SessionName, SessionSettings};
use crate::store::Store;

/// Hashes a new session password (argon2id, random salt) as a PHC string. CPU-heavy:
/// call it from a blocking thread.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A password that passed argon2 once for the session's current hash.
struct Verified {
    password_hash: String,
    digest: [u8; 32],
}

/// Checks `Hello`s (and legacy `init`s) against the sessions in the store.
pub struct Authenticator {
    store: Arc<dyn Store>,
    /// Random per process, so cached digests are useless outside it.
    secret: [u8; 32],
    cache: Mutex<HashMap<SessionName, Verified>>,
    /// Verifications under way, by digest: concurrent logins with the same password
    /// (a reconnect storm) wait for one argon2 run instead of each starting one.
    inflight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<bool>>>>,
    /// Full (argon2) verifications allowed per client IP.
    budget: DefaultKeyedRateLimiter<IpAddr>,
    /// Concurrent argon2 runs: one per core, so logins cannot starve the broker.
    slots: Semaphore,
}

impl Authenticator {
    /// An authenticator allowing each IP bursts of 30 full verifications, refilled at
    /// 2 per second.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let burst = NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN);
        let per_second = NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN);
        Self::with_budget(store, Quota::per_second(per_second).allow_burst(burst))
    }

    /// An authenticator with a custom per-IP budget of full verifications.
    pub fn with_budget(store: Arc<dyn Store>, budget: Quota) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            store,
            secret: rand::random(),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            budget: RateLimiter::keyed(budget),
            slots: Semaphore::new(cores),
        }
    }

    fn digest(&self, session: &SessionName, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.secret);
        h.update((session.as_str().len() as u16).to_be_bytes());
        h.update(session.as_str());
        h.update(password);
        h.finalize().into()
    }

    /// The session's settings if `password` is right. Unknown sessions and wrong
    /// passwords get the same answer.
    pub async fn authenticate(
        &self,
        peer: IpAddr,
        session: &SessionName,
        password: &str,
    ) -> Result<SessionSettings, Reject> {
        let record = self.store.session(session).await.map_err(|e| {
            tracing::error!(error = %e, "session lookup failed");
            Reject::Internal("session lookup failed")
        })?;
        let digest = self.digest(session, password);
        if let Some(record) = &record {
            let cached = self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(session)
                .is_some_and(|v| {
                    v.password_hash == record.password_hash && bool::from(v.digest.ct_eq(&digest))
                });
            if cached {
                return Self::admit(&record.settings);
            }
        }

        let Some(record) = record else {
            // Unknown sessions cost a budget slot too, so they cannot be enumerated.
            if self.budget.check_key(&peer).is_err() {
                return Err(Reject::RateLimited(
                    "too many login attempts from this address",
                ));
            }
            return Err(Reject::BadCredentials);
        };
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest)
            .or_default()
            .clone();
        let outcome = cell
            .get_or_try_init(|| async {
                // Only the login that actually runs argon2 spends the budget.
                if self.budget.check_key(&peer).is_err() {
                    return Err(Reject::RateLimited(
                        "too many login attempts from this address",
                    ));
                }
                if self.budget.len() > 100_000 {
                    self.budget.retain_recent();
                }
                let _slot = self
                    .slots
                    .acquire()
                    .await
                    .map_err(|_| Reject::Internal("shutting down"))?;
                let (password, phc) = (password.to_owned(), record.password_hash.clone());
                Ok(
                    tokio::task::spawn_blocking(move || verify_password(&password, &phc))
                        .await
                        .unwrap_or(false),
                )
            })
            .await
            .copied();
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&digest);
        let ok = outcome?;
        if !ok {
            return Err(Reject::BadCredentials);
        }
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            session.clone(),
            Verified {
                password_hash: record.password_hash.clone(),
                digest,
            },
        );
        Self::admit(&record.settings)
    }

    fn admit(settings: &SessionSettings) -> Result<SessionSettings, Reject> {
        if settings.suspended {
            return Err(Reject::SessionSuspended);
        }
        Ok(settings.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SessionRecord;
    use crate::store::memory::MemoryStore;

    async fn setup() -> (Authenticator, SessionName) {
        let burst = NonZeroU32::new(5).expect("non-zero");
        setup_with(Quota::per_hour(NonZeroU32::MIN).allow_burst(burst)).await
    }

    async fn setup_with(budget: Quota) -> (Authenticator, SessionName) {
        let store = Arc::new(MemoryStore::default());
        let name = SessionName::parse("s").expect("valid");
        let hash = tokio::task::spawn_blocking(|| hash_password("right"))
            .await
            .expect("join")
            .expect("hash");
        store
            .create_session(&SessionRecord {
                settings: SessionSettings::new(name.clone()),
                password_hash: hash,
                created_at: 0,
            })
            .await
            .expect("create");
        (Authenticator::with_budget(store, budget), name)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn right_wrong_and_unknown() {
        let (auth, name) = setup().await;
        assert!(auth.authenticate(IP, &name, "right").await.is_ok());
        // Cached now; still right.
        assert!(auth.authenticate(IP, &name, "right").await.is_ok());
        assert_eq!(
            auth.authenticate(IP, &name, "wrong").await,
            Err(Reject::BadCredentials)
        );
        let unknown = SessionName::parse("nope").expect("valid");
        assert_eq!(
            auth.authenticate(IP, &unknown, "right").await,
            Err(Reject::BadCredentials)
        );
    }

    #[tokio::test]
    async fn a_reconnect_storm_runs_argon2_once() {
        let (auth, name) = setup().await; // budget: 5 verifications per IP
        let auth = Arc::new(auth);
        let logins: Vec<_> = (0..50)
            .map(|_| {
                let (auth, name) = (auth.clone(), name.clone());
                tokio::spawn(async move { auth.authenticate(IP, &name, "right").await })
            })
            .collect();
        for login in logins {
            assert!(
                login.await.expect("join").is_ok(),
                "concurrent logins share one verification"
            );
        }
    }

    #[tokio::test]
    async fn guessing_is_rate_limited_per_ip_but_cached_logins_are_not() {
        let (auth, name) = setup().await;
        auth.authenticate(IP, &name, "right")
            .await
            .expect("first login");
        let mut limited = false;
        for _ in 0..40 {
            if auth.authenticate(IP, &name, "guess").await
                == Err(Reject::RateLimited(
                    "too many login attempts from this address",
                ))
            {
                limited = true;
                break;
            }
        }
        assert!(limited, "40 wrong guesses in a row must hit the budget");
        assert!(
            auth.authenticate(IP, &name, "right").await.is_ok(),
            "cache still admits"
        );
        let other: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(
            auth.authenticate(other, &name, "guess").await,
            Err(Reject::BadCredentials)
        );
    }
}
