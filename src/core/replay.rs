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
//! once (100 ms at 4M ids), and one-second buckets would drop a whole second's ids in one
//! call. So the set is split into [`SHARDS`] tables by a hash of the id, each of which
//! grows on its own, and buckets are short.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use super::error::Reject;
use super::types::{FastSet, MessageId, Millis};

/// Hash sets the ids are spread over.
const SHARDS: usize = 256;

/// Width of an expiry bucket, in milliseconds.
const BUCKET_MS: u64 = 10;

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
        let i = (self.router.hash_one(id) >> 32) as usize % SHARDS;
        &mut self.shards[i]
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
                skew_ms: timestamp_ms as i64 - now as i64,
                window_ms: self.window_ms,
            });
        }
        self.prune(now);
        let full = self.len >= self.capacity;
        let shard = self.shard(&id);
        if full && !shard.contains(&id) {
            return Err(Reject::RateLimited(
                "replay window is full for this session; slow down",
            ));
        }
        // One probe: the insert is the check.
        if !shard.insert(id) {
            return Err(Reject::Replayed);
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

    /// Drops ids whose protection has ended (never one that is still protected).
    pub fn prune(&mut self, now: Millis) {
        let current = now / BUCKET_MS;
        while let Some(entry) = self.buckets.first_entry() {
            // A bucket is dropped only once its whole slice has passed.
            if *entry.key() >= current {
                break;
            }
            for id in entry.remove() {
                if self.shard(&id).remove(&id) {
                    self.len -= 1;
                }
            }
        }
    }
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
}
