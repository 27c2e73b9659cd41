//! Exponential backoff with jitter: how long to wait before trying a node or cluster again.
//!
//! Two things retry a cluster: the health probes of a node that is down (`health`) and a
//! session reconnecting a link it lost (`client::session::links`). Both use this one schedule,
//! so that they behave alike and a fix to one is a fix to both. The jitter (±20 %) keeps many
//! sessions, or many warren instances, from retrying in lockstep after a shared outage.
//!
//! No random-number crate: std seeds each `RandomState` randomly, and hashing a counter with one
//! gives well-spread factors, which is all jitter needs.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A retry schedule: `first` after the first failure, doubled after each further one, at most
/// `max`. Stateless: the caller counts its failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max }
    }

    /// The wait after `failures` failures in a row (1 is the first), without jitter.
    pub fn exact(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }

    /// The wait after `failures` failures in a row, with jitter.
    pub fn after(&self, failures: u32) -> Duration {
        jitter(self.exact(failures))
    }
}

/// `d` scaled by a factor in [0.8, 1.2).
pub fn jitter(d: Duration) -> Duration {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = SEED.get_or_init(RandomState::new).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let r = (h.finish() % 4000) as f64 / 10_000.0; // [0, 0.4)
    d.mul_f64(0.8 + r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_first_and_stops_at_max() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let waits: Vec<u64> = (1..=9).map(|n| b.exact(n).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(b.exact(0), b.first, "no failure yet counts as the first");
        assert_eq!(b.exact(u32::MAX), b.max, "no overflow");
    }

    #[test]
    fn jitter_stays_within_a_fifth_and_spreads() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d < Duration::from_secs(12),
                "{d:?}"
            );
            seen.insert(d.as_millis() / 100);
        }
        assert!(seen.len() > 20, "jitter hardly varies: {seen:?}");
    }
}
