//! Replay protection for one session: the timestamp window and the exact set of message
//! ids accepted within it.
//!
//! The set is exact, never probabilistic: a false positive would refuse a good message
//! without anyone noticing (design §10). Memory is bounded by a capacity instead; when the
//! set is full the broker answers `RATE_LIMITED` rather than evicting an id early.
//!
//! Ids are bucketed by the second their protection ends, so pruning is a walk over the
//! oldest buckets only (the same idea as quinn's rotating `TokenLog`, made exact).

use std::collections::BTreeMap;

use super::error::Reject;
use super::types::{FastSet, MessageId, Millis};

/// The replay guard of one session.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    seen: FastSet<MessageId>,
    /// Second at which the ids expire (rounded up) → those ids.
    buckets: BTreeMap<u64, Vec<MessageId>>,
}

impl ReplayGuard {
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self {
            window_ms,
            capacity,
            seen: FastSet::default(),
            buckets: BTreeMap::new(),
        }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Number of ids currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
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
        if self.seen.len() >= self.capacity && !self.seen.contains(&id) {
            return Err(Reject::RateLimited(
                "replay window is full for this session; slow down",
            ));
        }
        // One probe: the insert is the check.
        if !self.seen.insert(id) {
            return Err(Reject::Replayed);
        }
        self.buckets
            .entry(self.expiry_of(timestamp_ms).div_ceil(1000))
            .or_default()
            .push(id);
        Ok(())
    }

    /// Remembers an id until `expires_at` (used when restoring from the store).
    pub fn remember(&mut self, id: MessageId, expires_at: Millis) {
        if self.seen.insert(id) {
            self.buckets
                .entry(expires_at.div_ceil(1000))
                .or_default()
                .push(id);
        }
    }

    /// Forgets an id admitted with `timestamp_ms` that could not be committed, so that
    /// the client's retry is not refused as a replay.
    pub fn forget(&mut self, id: &MessageId, timestamp_ms: Millis) {
        if !self.seen.remove(id) {
            return;
        }
        let bucket = self.expiry_of(timestamp_ms).div_ceil(1000);
        if let Some(ids) = self.buckets.get_mut(&bucket) {
            ids.retain(|i| i != id);
        }
    }

    /// Drops ids whose protection has ended (never one that is still protected).
    pub fn prune(&mut self, now: Millis) {
        let now_s = now / 1000;
        while let Some(entry) = self.buckets.first_entry() {
            // A bucket is dropped only once its whole second has passed.
            if *entry.key() >= now_s {
                break;
            }
            for id in entry.remove() {
                self.seen.remove(&id);
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
}
