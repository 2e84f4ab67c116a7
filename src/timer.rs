//! A timer that lives across the turns of a `select!` loop.
//!
//! A `sleep_until` made afresh on every turn of a loop registers a new entry in tokio's
//! timer wheel and drops the last one, and whenever the new entry is the earliest, tokio
//! wakes its I/O driver (an `eventfd` write) so that a thread parked on it recomputes
//! its timeout, even when no thread is parked and the caller is the thread that would
//! be. The broker's driver task did that on every turn: at W4's 10,000 msg/s (1,000
//! bursts a second) half its turns ended in such a write and one more `epoll_wait`
//! round. A [`LoopTimer`] is re-armed only when its deadline changes.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Where a disarmed timer waits: far enough never to fire, and later than any wake-up
/// the runtime has planned, so moving it there wakes nothing.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// A timer for a `select!` loop, armed for a deadline of type `K` (an [`Instant`], or a
/// clock of the caller's own that [`LoopTimer::set`] converts).
pub(crate) struct LoopTimer<K> {
    sleep: Pin<Box<Sleep>>,
    armed: Option<K>,
}

impl<K: PartialEq + Copy> LoopTimer<K> {
    pub(crate) fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now() + NEVER)),
            armed: None,
        }
    }

    /// Arms the timer for `deadline`, or disarms it for `None`. Nothing happens if that
    /// is already the deadline; `at` turns a new one into an instant.
    pub(crate) fn set(&mut self, deadline: Option<K>, at: impl FnOnce(K) -> Instant) {
        if deadline == self.armed {
            return;
        }
        let instant = match deadline {
            Some(d) => at(d),
            // Left where it was, it would still fire, and wake the task for nothing.
            None => Instant::now() + NEVER,
        };
        self.sleep.as_mut().reset(instant);
        self.armed = deadline;
    }

    /// Whether a deadline is armed; for a `select!` branch's condition.
    pub(crate) fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Completes when the armed deadline passes, and disarms the timer (the next
    /// [`set`](Self::set) arms it again, even for the same deadline). Never completes
    /// while disarmed. Cancel-safe.
    pub(crate) async fn fired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        std::future::poll_fn(|cx| self.sleep.as_mut().poll(cx)).await;
        self.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instant(at: Instant) -> Instant {
        at
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_deadline_and_then_waits_to_be_armed_again() {
        let start = Instant::now();
        let mut timer = LoopTimer::new();
        assert!(!timer.is_armed());
        timer.set(Some(start + Duration::from_millis(5)), instant);
        timer.fired().await;
        assert_eq!(start.elapsed(), Duration::from_millis(5));
        assert!(!timer.is_armed());
        let waited = tokio::time::timeout(Duration::from_secs(60), timer.fired()).await;
        assert!(waited.is_err(), "a disarmed timer never fires");
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_deadline_set_again_keeps_it_and_a_new_one_replaces_it() {
        let start = Instant::now();
        let mut timer = LoopTimer::new();
        let mut conversions = 0;
        for _ in 0..3 {
            timer.set(Some(7u64), |ms| {
                conversions += 1;
                start + Duration::from_millis(ms)
            });
        }
        assert_eq!(
            conversions, 1,
            "an unchanged deadline is not converted or reset"
        );
        timer.set(Some(3u64), |ms| start + Duration::from_millis(ms));
        timer.fired().await;
        assert_eq!(start.elapsed(), Duration::from_millis(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disarmed_timer_does_not_fire_at_its_old_deadline() {
        let start = Instant::now();
        let mut timer = LoopTimer::new();
        timer.set(Some(start + Duration::from_millis(5)), instant);
        timer.set(None, instant);
        let waited = tokio::time::timeout(Duration::from_secs(60), timer.fired()).await;
        assert!(waited.is_err());
        // Armed again for a deadline already past, it fires at once.
        timer.set(Some(start), instant);
        timer.fired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }
}
