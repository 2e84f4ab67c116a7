//! Session passwords: argon2id at rest, verified off the async threads, with a cache so a
//! reconnect storm costs a hash lookup instead of an argon2 run per client, and a per-IP
//! budget of failed logins (design §10) so nobody can guess passwords. Logins that
//! succeed spend nothing, so many clients behind one address (a NAT, a test harness,
//! everyone reconnecting after a restart) are not refused. Full checks from one address
//! run one after another, each failure counted before the next starts (side-by-side
//! guesses cannot outrun the budget), and argon2 runs at most one per core at a time,
//! so it cannot starve the broker either way.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use argon2::password_hash::SaltString;
use argon2::password_hash::rand_core::OsRng;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
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

/// A PHC string as [`hash_password`] makes, with the same cost, of no password: a
/// random salt and random output (made without running argon2, so nothing to wait
/// for). Checking a password against it takes as long as against a real hash, and
/// never succeeds.
fn decoy_hash() -> String {
    let salt = SaltString::generate(&mut OsRng);
    let output: [u8; 32] = rand::random();
    let output = argon2::password_hash::Output::new(&output)
        .map_or_else(|_| String::new(), |o| o.to_string());
    format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        argon2::Params::DEFAULT_M_COST,
        argon2::Params::DEFAULT_T_COST,
        argon2::Params::DEFAULT_P_COST,
        salt.as_str(),
        output
    )
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

/// A login's check: the keyed digest of its session and password, and whether the
/// session exists (a check against the decoy answers no login to a real one).
type CheckKey = ([u8; 32], bool);

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
    /// Verifications under way, by digest and whether the session exists: concurrent
    /// logins with the same password (a reconnect storm) wait for one argon2 run
    /// instead of each starting one.
    inflight: Mutex<HashMap<CheckKey, Arc<tokio::sync::OnceCell<bool>>>>,
    /// Failed logins allowed per client IP.
    failures: FailedLogins,
    /// Concurrent argon2 runs: one per core, so logins cannot starve the broker.
    slots: Semaphore,
    /// Checked for logins to sessions that do not exist ([`decoy_hash`]): they take
    /// as long as a wrong password does.
    decoy: String,
    /// argon2 runs so far.
    #[cfg(test)]
    verifications: std::sync::atomic::AtomicUsize,
    /// Store lookups of a session so far.
    #[cfg(test)]
    lookups: std::sync::atomic::AtomicUsize,
}

impl Authenticator {
    /// An authenticator allowing each IP bursts of 30 failed logins, refilled at 2 per
    /// second.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let burst = NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN);
        let per_second = NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN);
        Self::with_budget(store, Quota::per_second(per_second).allow_burst(burst))
    }

    /// An authenticator with a custom per-IP budget of failed logins.
    pub fn with_budget(store: Arc<dyn Store>, budget: Quota) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            store,
            secret: rand::random(),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            failures: FailedLogins::new(budget),
            slots: Semaphore::new(cores),
            decoy: decoy_hash(),
            #[cfg(test)]
            verifications: Default::default(),
            #[cfg(test)]
            lookups: Default::default(),
        }
    }

    /// Hashes a new session's password ([`hash_password`]) in one of the slots logins
    /// take turns in, so creating sessions takes no more cores, nor argon2's 19 MiB
    /// apiece, than logins may.
    pub async fn hash_new_password(&self, password: String) -> Result<String, Reject> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Reject::Internal("shutting down"))?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Reject::Internal("could not hash the password"))
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
        let peer = budget_key(peer);
        let digest = self.digest(session, password);
        // A blocked address's guesses cost the store nothing: only a login the cache
        // may admit (a password verified before) goes on to the lookup, and only as
        // often as an allowance the size of its budget lets it ask (`may_ask_cache`).
        if self.failures.is_blocked(peer)
            && !(self.failures.may_ask_cache(peer) && self.verified_before(session, &digest, None))
        {
            return Err(LIMITED);
        }
        #[cfg(test)]
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let record = self.store.session(session).await.map_err(|e| {
            tracing::error!(error = %e, "session lookup failed");
            Reject::Internal("session lookup failed")
        })?;
        if let Some(record) = &record
            && self.verified_before(session, &digest, Some(&record.password_hash))
        {
            return Self::admit(&record.settings);
        }

        if self.failures.is_blocked(peer) {
            return Err(LIMITED);
        }
        // An unknown session is checked as a wrong password is, against a decoy hash:
        // the same answer, budget and time, so names cannot be enumerated by any.
        let known_hash = record.as_ref().map(|r| r.password_hash.clone());
        let key = (digest, known_hash.is_some());
        let cell = shared(&self.inflight, key);
        // Whether this login ran the check (and so counted its own failure).
        let checked = AtomicBool::new(false);
        let outcome = cell
            .get_or_try_init(|| async {
                checked.store(true, Ordering::Relaxed);
                // One full check per address at a time, each counted before the next
                // starts: guesses sent side by side cannot outrun the budget.
                let _turn = self.failures.turn(peer).await;
                if self.failures.is_blocked(peer) {
                    return Err(LIMITED);
                }
                let _slot = self
                    .slots
                    .acquire()
                    .await
                    .map_err(|_| Reject::Internal("shutting down"))?;
                #[cfg(test)]
                self.verifications
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let phc = known_hash.clone().unwrap_or_else(|| self.decoy.clone());
                let password = password.to_owned();
                let verified =
                    tokio::task::spawn_blocking(move || verify_password(&password, &phc))
                        .await
                        .unwrap_or(false);
                let right = verified && known_hash.is_some();
                if !right {
                    self.failures.record(peer);
                }
                Ok(right)
            })
            .await
            .copied();
        lock(&self.inflight).remove(&key);
        let record = match (outcome?, record) {
            (true, Some(record)) => record,
            _ => {
                if !checked.load(Ordering::Relaxed) {
                    self.failures.record(peer); // it shared another login's check
                }
                return Err(Reject::BadCredentials);
            }
        };
        lock(&self.cache).insert(
            session.clone(),
            Verified {
                password_hash: record.password_hash.clone(),
                digest,
            },
        );
        Self::admit(&record.settings)
    }

    /// Whether `digest` is the one last verified for `session`, and against `hash`
    /// when it is given (a password changed since is verified again).
    fn verified_before(
        &self,
        session: &SessionName,
        digest: &[u8; 32],
        hash: Option<&str>,
    ) -> bool {
        lock(&self.cache).get(session).is_some_and(|v| {
            hash.is_none_or(|h| v.password_hash == h) && bool::from(v.digest.ct_eq(digest))
        })
    }

    fn admit(settings: &SessionSettings) -> Result<SessionSettings, Reject> {
        if settings.suspended {
            return Err(Reject::SessionSuspended);
        }
        Ok(settings.clone())
    }
}

/// The address a per-client budget is kept for: an IPv6 client's /64 (one subscriber
/// line's, which holds 2^64 addresses to rotate through), an IPv4 one's own address
/// (also when it comes IPv4-mapped, through a dual-stack socket, or through a NAT64
/// gateway's well-known prefix `64:ff9b::/96`, which puts a whole IPv4 Internet's
/// clients in one /64). Networks' own NAT64 prefixes (RFC 6052 allows /32 to /96)
/// cannot be told from native addresses, and keep their /64.
pub fn budget_key(ip: IpAddr) -> IpAddr {
    const NAT64: u128 = 0x0064_ff9b_u128 << 96;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if u128::from(v6) >> 32 == NAT64 >> 32 => {
                IpAddr::V4((u128::from(v6) as u32).into())
            }
            None => {
                let prefix = u128::from(v6) & !(u128::MAX >> 64);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// Locks `mutex`, through poisoning: every map here stays valid if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The value shared under `key`, made on first use: what concurrent logins with the
/// same key wait on together.
fn shared<K: Eq + Hash, V: Default>(map: &Mutex<HashMap<K, Arc<V>>>, key: K) -> Arc<V> {
    lock(map).entry(key).or_default().clone()
}

/// The refusal of a login from an address past its budget of failures.
const LIMITED: Reject = Reject::RateLimited("too many failed logins from this address");

/// A budget of failed logins per client IP: each failure spends one; an address whose
/// budget is spent is refused before any check until one failure's worth has come back.
struct FailedLogins {
    budget: RateLimiter<
        IpAddr,
        DefaultKeyedStateStore<IpAddr>,
        DefaultClock,
        StateInformationMiddleware,
    >,
    /// Logins checked against the cache while their address is blocked. The cache
    /// admits a blocked address's right passwords (clients behind its NAT), but were
    /// these checks free, it would answer that address's guesses at any rate. Kept
    /// apart from `budget`, so such clients still get in while a guesser behind the
    /// same address keeps it blocked; a guesser gets at most twice the budget's rate.
    blocked_checks: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses whose budget is spent, and until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// How long one failure's worth of budget takes to come back.
    refill: Duration,
    /// Addresses with a full check under way, and who waits for its turn.
    turns: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
}

/// An address's turn to run a full check; dropping it ends the turn.
struct Turn<'a> {
    logins: &'a FailedLogins,
    peer: IpAddr,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut turns = lock(&self.logins.turns);
        // The map's and this turn's references only: nobody waits, the entry goes.
        if turns
            .get(&self.peer)
            .is_some_and(|turn| Arc::strong_count(turn) <= 2)
        {
            turns.remove(&self.peer);
        }
    }
}

impl FailedLogins {
    /// Entries kept before the expired ones are swept (each is a few dozen bytes).
    const SWEEP_AT: usize = 100_000;

    fn new(quota: Quota) -> Self {
        Self {
            budget: RateLimiter::keyed(quota).with_middleware(),
            blocked_checks: RateLimiter::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
            refill: quota.replenish_interval(),
            turns: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for `peer`'s turn to run a full check.
    async fn turn(&self, peer: IpAddr) -> Turn<'_> {
        let turn = shared(&self.turns, peer);
        Turn {
            logins: self,
            peer,
            _held: turn.lock_owned().await,
        }
    }

    fn is_blocked(&self, peer: IpAddr) -> bool {
        let mut blocked = lock(&self.blocked);
        match blocked.get(&peer) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                blocked.remove(&peer);
                false
            }
            None => false,
        }
    }

    /// Whether blocked `peer` may have one more login checked against the cache, right
    /// password or wrong: as many as its budget allows failures, counted apart.
    fn may_ask_cache(&self, peer: IpAddr) -> bool {
        if self.blocked_checks.len() > Self::SWEEP_AT {
            self.blocked_checks.retain_recent();
        }
        self.blocked_checks.check_key(&peer).is_ok()
    }

    /// A login from `peer` failed.
    fn record(&self, peer: IpAddr) {
        if self.budget.len() > Self::SWEEP_AT {
            self.budget.retain_recent();
        }
        let wait = match self.budget.check_key(&peer) {
            Ok(state) if state.remaining_burst_capacity() > 0 => return,
            Ok(_) => self.refill,
            Err(not_until) => not_until.wait_time_from(self.budget.clock().now()),
        };
        let now = Instant::now();
        let mut blocked = lock(&self.blocked);
        if blocked.len() > Self::SWEEP_AT {
            blocked.retain(|_, until| *until > now);
        }
        blocked.insert(peer, now + wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SessionRecord;
    use crate::store::memory::MemoryStore;

    #[test]
    fn budgets_are_kept_per_ipv4_address_and_per_ipv6_64() {
        let key = |ip: &str| budget_key(ip.parse().expect("ip")).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        // NAT64: each IPv4 client behind the gateway has its own budget.
        assert_eq!(key("64:ff9b::192.0.2.7"), "192.0.2.7");
        assert_ne!(key("64:ff9b::192.0.2.7"), key("64:ff9b::198.51.100.1"));
        assert_eq!(
            key("64:ff9b:1::1"),
            "64:ff9b:1::",
            "other prefixes keep their /64"
        );
    }

    /// Guesses from across one IPv6 /64 spend one budget.
    #[tokio::test]
    async fn an_ipv6_client_cannot_rotate_addresses_past_its_budget() {
        let (auth, name) = setup().await;
        for host in 1..=5 {
            let ip: IpAddr = format!("2001:db8::{host}").parse().expect("ip");
            assert_eq!(
                auth.authenticate(ip, &name, "guess").await,
                Err(Reject::BadCredentials)
            );
        }
        let next: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        assert_eq!(auth.authenticate(next, &name, "guess").await, Err(LIMITED));
        let elsewhere: IpAddr = "2001:db8:0:1::1".parse().expect("ip");
        assert_eq!(
            auth.authenticate(elsewhere, &name, "guess").await,
            Err(Reject::BadCredentials)
        );
    }

    async fn setup() -> (Authenticator, SessionName) {
        let burst = NonZeroU32::new(5).expect("non-zero");
        setup_with(Quota::per_hour(NonZeroU32::MIN).allow_burst(burst)).await
    }

    async fn setup_with(budget: Quota) -> (Authenticator, SessionName) {
        let store = Arc::new(MemoryStore::default());
        let name = create(&store, "s").await;
        (Authenticator::with_budget(store, budget), name)
    }

    /// Creates session `name` with the password "right".
    async fn create(store: &MemoryStore, name: &str) -> SessionName {
        let name = SessionName::parse(name).expect("valid");
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
        name
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

    /// A login to a session that does not exist runs argon2 as a wrong password
    /// does (against a decoy hash), so its answer comes no sooner, and is counted
    /// against the budget the same way.
    #[tokio::test]
    async fn an_unknown_session_is_checked_as_a_wrong_password_is() {
        let (auth, name) = setup().await;
        let unknown = SessionName::parse("nope").expect("valid");
        for (session, password) in [(&unknown, "right"), (&name, "wrong"), (&unknown, "x")] {
            assert_eq!(
                auth.authenticate(IP, session, password).await,
                Err(Reject::BadCredentials)
            );
        }
        let runs = auth
            .verifications
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(runs, 3, "one argon2 run each");
    }

    /// The decoy costs what a real hash does, and matches no password.
    #[test]
    fn the_decoy_hash_is_a_real_hash_s_twin() {
        let real = hash_password("right").expect("hash");
        let decoy = decoy_hash();
        let (real, parsed) = (
            PasswordHash::new(&real).expect("parses"),
            PasswordHash::new(&decoy).expect("parses"),
        );
        assert_eq!(parsed.algorithm, real.algorithm);
        assert_eq!(parsed.version, real.version);
        assert_eq!(parsed.params, real.params);
        assert_eq!(parsed.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
        assert!(!verify_password("", &decoy));
        assert!(!verify_password("right", &decoy));
    }

    #[tokio::test]
    async fn a_reconnect_storm_runs_argon2_once() {
        let (auth, name) = setup().await;
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
        let runs = auth
            .verifications
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(runs, 1);
    }

    /// Guesses sent side by side are checked one at a time per address, each failure
    /// counted before the next check, so they cannot outrun the budget.
    #[tokio::test]
    async fn concurrent_guesses_cannot_outrun_the_budget() {
        let burst = NonZeroU32::new(3).expect("non-zero");
        let (auth, name) = setup_with(Quota::per_hour(burst)).await;
        let auth = Arc::new(auth);
        let guesses: Vec<_> = (0..20)
            .map(|i| {
                let (auth, name) = (auth.clone(), name.clone());
                tokio::spawn(
                    async move { auth.authenticate(IP, &name, &format!("guess {i}")).await },
                )
            })
            .collect();
        let mut refused = 0;
        for guess in guesses {
            match guess.await.expect("join") {
                Err(Reject::BadCredentials) => {}
                Err(LIMITED) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 17);
        let runs = auth
            .verifications
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(runs, 3);
        assert!(
            auth.failures.turns.lock().expect("lock").is_empty(),
            "turns are cleaned up"
        );
    }

    /// Hashing a new session's password waits for an argon2 slot as logins do, and the
    /// hash it makes verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_passwords_are_hashed_in_the_login_slots() {
        let auth = Arc::new(Authenticator::new(Arc::new(MemoryStore::default())));
        let held = auth
            .slots
            .acquire_many(auth.slots.available_permits() as u32)
            .await
            .expect("open");
        let hashing = tokio::spawn({
            let auth = auth.clone();
            async move { auth.hash_new_password("secret".into()).await }
        });
        // An argon2 run takes well under this; the hash waits for a slot instead.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(!hashing.is_finished(), "hashed while every slot was taken");
        drop(held);
        let phc = hashing.await.expect("joined").expect("hashed");
        assert!(verify_password("secret", &phc));
    }

    /// Design §10 limits failed logins: logins that succeed, each needing its own
    /// argon2 run, spend nothing (many clients behind one address, a test harness).
    #[tokio::test]
    async fn successful_logins_spend_no_budget() {
        let store = Arc::new(MemoryStore::default());
        let mut names = Vec::new();
        for name in ["a", "b", "c", "d"] {
            names.push(create(&store, name).await);
        }
        let burst = NonZeroU32::new(2).expect("non-zero");
        let auth = Authenticator::with_budget(store, Quota::per_hour(burst));
        for name in &names {
            assert!(auth.authenticate(IP, name, "right").await.is_ok(), "{name}");
        }
        assert_eq!(
            auth.verifications
                .load(std::sync::atomic::Ordering::Relaxed),
            4
        );
    }

    /// A blocked address may still log in with a cached password, but cannot test
    /// guesses against the cache faster than its budget allows failures.
    #[tokio::test]
    async fn a_blocked_address_cannot_guess_against_the_cache() {
        let (auth, name) = setup().await;
        auth.authenticate(IP, &name, "right")
            .await
            .expect("first login");
        for guess in 0..5 {
            assert_eq!(
                auth.authenticate(IP, &name, &format!("guess {guess}"))
                    .await,
                Err(Reject::BadCredentials)
            );
        }
        // Blocked. Budget: 5 an hour, so five more asks of the cache.
        assert!(auth.authenticate(IP, &name, "right").await.is_ok());
        for guess in 0..4 {
            assert_eq!(
                auth.authenticate(IP, &name, &format!("again {guess}"))
                    .await,
                Err(LIMITED)
            );
        }
        assert_eq!(
            auth.authenticate(IP, &name, "right").await,
            Err(LIMITED),
            "the right password too, once the asks are spent"
        );
        let other: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(auth.authenticate(other, &name, "right").await.is_ok());
    }

    #[tokio::test]
    async fn guessing_is_rate_limited_per_ip_but_cached_logins_are_not() {
        let (auth, name) = setup().await;
        auth.authenticate(IP, &name, "right")
            .await
            .expect("first login");
        // Budget: 5 failures per hour. Unknown sessions count too.
        let unknown = SessionName::parse("nope").expect("valid");
        assert_eq!(
            auth.authenticate(IP, &unknown, "guess").await,
            Err(Reject::BadCredentials)
        );
        for guess in 1..5 {
            assert_eq!(
                auth.authenticate(IP, &name, "guess").await,
                Err(Reject::BadCredentials),
                "guess {guess}"
            );
        }
        let runs = auth
            .verifications
            .load(std::sync::atomic::Ordering::Relaxed);
        let lookups = auth.lookups.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(auth.authenticate(IP, &name, "guess").await, Err(LIMITED));
        assert_eq!(auth.authenticate(IP, &unknown, "x").await, Err(LIMITED));
        assert_eq!(
            auth.verifications
                .load(std::sync::atomic::Ordering::Relaxed),
            runs,
            "refused before any check"
        );
        assert_eq!(
            auth.lookups.load(std::sync::atomic::Ordering::Relaxed),
            lookups,
            "refused before the store is asked"
        );
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
