//! Replay protection for one session: the timestamp window and the exact set of message
//! ids accepted within it.
//!
//! The set is exact, never probabilistic: a false positive would refuse a good message
//! without anyone noticing (design §10). Memory is bounded by a capacity instead; when the
//! set is full the broker answers `RATE_LIMITED` rather than evicting an id early.
//!
//! Ids are bucketed by the [`BUCKET_MS`] slice in which their protection ends, so pruning
//! is a walk over the oldest buckets only (the same idea as quinn's rotating `TokenLog`,
//! made exact).
//!
//! The guard runs on the router's task, so no single call may take long. A busy session
//! remembers millions of ids: one hash table that doubled would rehash all of them at
//! once (100 ms at 4M ids), and after a quiet spell every id of the busy one before it
//! has expired at once (4.5 ms for 200k ids, on the first publish after it). So the set
//! is split into [`SHARDS`] tables by a hash of the id, each of which grows on its own,
//! and an admit drops at most [`PRUNE_STEP`] expired ids: a backlog is spread over the
//! admits that follow. Exactness does not suffer: an id found in the set is checked
//! against the backlog before it is called a replay.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use super::error::Reject;
use super::types::{FastSet, MessageId, Millis};

/// Hash sets the ids are spread over.
const SHARDS: usize = 256;

/// Width of an expiry bucket, in milliseconds.
const BUCKET_MS: u64 = 10;

/// Most expired ids one admit drops (tens of microseconds). Each admit adds one id, so
/// pruning outpaces any rate of publishing.
const PRUNE_STEP: usize = 1024;

/// The replay guard of one session.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    shards: Box<[FastSet<MessageId>]>,
    /// Chooses an id's shard (keyed per process, like the sets themselves).
    router: foldhash::fast::RandomState,
    len: usize,
    /// Bucket in which the ids expire (expiry / [`BUCKET_MS`], rounded up) → those ids.
    buckets: BTreeMap<u64, Vec<MessageId>>,
}

impl ReplayGuard {
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self {
            window_ms,
            capacity,
            shards: (0..SHARDS).map(|_| FastSet::default()).collect(),
            router: foldhash::fast::RandomState::default(),
            len: 0,
            buckets: BTreeMap::new(),
        }
    }

    fn shard(&mut self, id: &MessageId) -> &mut FastSet<MessageId> {
        shard_of(&self.router, &mut self.shards, id)
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Number of ids currently remembered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Until when an id published with `timestamp_ms` must be remembered.
    pub fn expiry_of(&self, timestamp_ms: Millis) -> Millis {
        timestamp_ms.saturating_add(self.window_ms)
    }

    /// Checks a publish's timestamp and id, and remembers the id if both pass.
    pub fn admit(
        &mut self,
        now: Millis,
        id: MessageId,
        timestamp_ms: Millis,
    ) -> Result<(), Reject> {
        if now.abs_diff(timestamp_ms) > self.window_ms {
            return Err(Reject::StaleTimestamp {
                skew_ms: super::types::skew_ms(timestamp_ms, now),
                window_ms: self.window_ms,
            });
        }
        self.prune_at_most(now, PRUNE_STEP);
        if self.len >= self.capacity {
            // Refuse only for ids still protected.
            self.prune(now);
        }
        let full = self.len >= self.capacity;
        let shard = self.shard(&id);
        if full && !shard.contains(&id) {
            return Err(Reject::RateLimited(
                "replay window is full for this session; slow down",
            ));
        }
        // One probe: the insert is the check.
        if !shard.insert(id) {
            // Perhaps an expired id the pruning has not reached yet (rare: ids are
            // unique): finish pruning and look again.
            if !self.has_expired(now) {
                return Err(Reject::Replayed);
            }
            self.prune(now);
            if !self.shard(&id).insert(id) {
                return Err(Reject::Replayed);
            }
        }
        self.len += 1;
        self.buckets
            .entry(self.expiry_of(timestamp_ms).div_ceil(BUCKET_MS))
            .or_default()
            .push(id);
        Ok(())
    }

    /// Remembers an id until `expires_at` (used when restoring from the store).
    pub fn remember(&mut self, id: MessageId, expires_at: Millis) {
        if self.shard(&id).insert(id) {
            self.len += 1;
            self.buckets
                .entry(expires_at.div_ceil(BUCKET_MS))
                .or_default()
                .push(id);
        }
    }

    /// Forgets an id admitted with `timestamp_ms` that could not be committed, so that
    /// the client's retry is not refused as a replay.
    pub fn forget(&mut self, id: &MessageId, timestamp_ms: Millis) {
        if !self.shard(id).remove(id) {
            return;
        }
        self.len -= 1;
        let bucket = self.expiry_of(timestamp_ms).div_ceil(BUCKET_MS);
        if let Some(ids) = self.buckets.get_mut(&bucket) {
            ids.retain(|i| i != id);
        }
    }

    /// Drops every id whose protection has ended (never one that is still protected).
    pub fn prune(&mut self, now: Millis) {
        self.prune_at_most(now, usize::MAX);
    }

    /// Whether some id's protection has ended without it being dropped yet.
    fn has_expired(&self, now: Millis) -> bool {
        // A bucket is expired once its whole slice has passed.
        self.buckets
            .first_key_value()
            .is_some_and(|(bucket, _)| *bucket < now / BUCKET_MS)
    }

    /// Drops up to `budget` ids whose protection has ended, oldest buckets first.
    fn prune_at_most(&mut self, now: Millis, mut budget: usize) {
        while budget > 0 && self.has_expired(now) {
            let Some(mut entry) = self.buckets.first_entry() else {
                break;
            };
            let ids = entry.get_mut();
            while budget > 0
                && let Some(id) = ids.pop()
            {
                budget -= 1;
                if shard_of(&self.router, &mut self.shards, &id).remove(&id) {
                    self.len -= 1;
                }
            }
            if ids.is_empty() {
                entry.remove();
            }
        }
    }
}

/// The shard an id belongs in.
fn shard_of<'a>(
    router: &foldhash::fast::RandomState,
    shards: &'a mut [FastSet<MessageId>],
    id: &MessageId,
) -> &'a mut FastSet<MessageId> {
    let i = (router.hash_one(id) >> 32) as usize % SHARDS;
    &mut shards[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[test]
    fn stale_timestamps_are_refused_both_ways() {
        let mut g = ReplayGuard::new(30_000, 100);
        assert!(g.admit(NOW, id(1), NOW - 30_000).is_ok());
        assert!(g.admit(NOW, id(2), NOW + 30_000).is_ok());
        assert!(matches!(
            g.admit(NOW, id(3), NOW - 30_001),
            Err(Reject::StaleTimestamp {
                skew_ms: -30_001,
                ..
            })
        ));
        assert!(matches!(
            g.admit(NOW, id(4), NOW + 30_001),
            Err(Reject::StaleTimestamp { .. })
        ));
        // Timestamps past i64's range are a peer's choice too: refused, not overflowed.
        for far in [1 << 63, u64::MAX] {
            assert!(matches!(
                g.admit(NOW, id(5), far),
                Err(Reject::StaleTimestamp { skew_ms, .. }) if skew_ms > 0
            ));
        }
    }

    #[test]
    fn ids_are_refused_until_their_window_ends() {
        let mut g = ReplayGuard::new(30_000, 100);
        g.admit(NOW, id(1), NOW).expect("first");
        assert_eq!(g.admit(NOW + 1, id(1), NOW), Err(Reject::Replayed));
        // Still protected at the last millisecond of its window ...
        assert_eq!(
            g.admit(NOW + 29_999, id(1), NOW + 29_000),
            Err(Reject::Replayed)
        );
        // ... and forgotten only after it, when its timestamp is stale anyway.
        g.prune(NOW + 31_000);
        assert!(g.is_empty());
    }

    #[test]
    fn full_set_rate_limits_instead_of_evicting() {
        let mut g = ReplayGuard::new(30_000, 2);
        g.admit(NOW, id(1), NOW).expect("1");
        g.admit(NOW, id(2), NOW).expect("2");
        assert!(matches!(
            g.admit(NOW, id(3), NOW),
            Err(Reject::RateLimited(_))
        ));
        assert_eq!(g.admit(NOW, id(1), NOW), Err(Reject::Replayed));
        // Room again once old ids expire.
        g.admit(NOW + 31_000, id(3), NOW + 31_000)
            .expect("after expiry");
    }

    #[test]
    fn forget_allows_a_retry() {
        let mut g = ReplayGuard::new(30_000, 10);
        g.admit(NOW, id(1), NOW).expect("1");
        g.forget(&id(1), NOW);
        g.admit(NOW, id(1), NOW).expect("retry after failed commit");
    }

    #[test]
    fn pruning_drops_expired_ids_and_keeps_every_protected_one() {
        let mut g = ReplayGuard::new(30_000, 1_000_000);
        let many = |k: u32| MessageId(u128::from(k).to_be_bytes());
        // One id per millisecond over 10 s, spread over every shard and many buckets.
        for k in 0..10_000u32 {
            let ts = NOW + u64::from(k);
            g.admit(ts, many(k), ts).expect("fresh");
        }
        let now = NOW + 35_000; // ids stamped before NOW + 5 000 have expired
        g.prune(now);
        let protected = 5_000;
        assert!(g.len() >= protected, "a protected id was dropped");
        assert!(
            g.len() <= protected + BUCKET_MS as usize,
            "expired ids linger: {}",
            g.len()
        );
        for k in [5_000u32, 7_500, 9_999] {
            let ts = NOW + u64::from(k);
            assert_eq!(g.admit(now, many(k), ts), Err(Reject::Replayed));
        }
    }

    #[test]
    fn a_backlog_of_expired_ids_is_pruned_a_step_per_admit_and_stays_exact() {
        let many = |k: u32| MessageId(u128::from(k).to_be_bytes());
        let mut g = ReplayGuard::new(30_000, 1_000_000);
        let backlog = 10 * PRUNE_STEP as u32;
        for k in 0..backlog {
            g.admit(NOW, many(k), NOW).expect("fresh");
        }
        // A quiet spell: every id has expired by the next admit, which drops one step.
        let later = NOW + 60_000;
        g.admit(later, many(backlog), later).expect("fresh");
        assert_eq!(g.len(), backlog as usize - PRUNE_STEP + 1);
        // An expired id still in the set (the first admitted: the last its bucket
        // gives up) is no replay once its window is over.
        let lingering = many(0);
        g.admit(later, lingering, later)
            .expect("an expired id is forgotten, pruned yet or not");
        assert_eq!(g.len(), 2, "the full prune ran");
        assert_eq!(g.admit(later, lingering, later), Err(Reject::Replayed));
    }
}
