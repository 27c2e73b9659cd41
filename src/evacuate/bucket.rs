//! The token bucket that bounds how fast an evacuation moves messages (`limits.evacuate_rate`).
//!
//! Why a bucket and not a fixed pause per message: the mover works in batches (one prefetch
//! window at a time), so it needs "how many may I take now" rather than "wait before each one";
//! the bucket refills continuously and holds at most one batch, so a pause (a slow target, a
//! queue switch) never turns into a burst above the rate afterwards.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens per second.
    rate: f64,
    /// Most tokens held at once.
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: the first batch goes at once.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// A new rate (a reload); the tokens held stay.
    pub fn set_rate(&mut self, rate: u32) {
        self.rate = f64::from(rate.max(1));
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes up to `want` whole tokens now; how many were taken (0 when the bucket holds less
    /// than one).
    pub fn take(&mut self, want: u32, now: Instant) -> u32 {
        self.refill(now);
        let n = self.tokens.floor().min(f64::from(want)).max(0.0);
        self.tokens -= n;
        n as u32
    }

    /// Gives back tokens taken but not used (fewer messages arrived than were allowed).
    pub fn give_back(&mut self, n: u32) {
        self.tokens = (self.tokens + f64::from(n)).min(self.burst);
    }

    /// How long until one whole token is there.
    pub fn wait_for_one(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }

    /// Waits until at least one token is there, then takes up to `want`.
    pub async fn acquire(&mut self, want: u32) -> u32 {
        loop {
            let now = Instant::now();
            let wait = self.wait_for_one(now);
            if wait.is_zero() {
                return self.take(want, now);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_then_refills_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 50, t0);
        assert_eq!(b.take(80, t0), 50, "a full bucket: one burst");
        assert_eq!(b.take(10, t0), 0, "empty");
        assert_eq!(
            b.take(10, t0 + Duration::from_millis(100)),
            10,
            "100/s for 0.1 s"
        );
        assert_eq!(
            b.take(1000, t0 + Duration::from_secs(60)),
            50,
            "never above the burst"
        );
        assert_eq!(
            b.wait_for_one(t0 + Duration::from_secs(60)),
            Duration::from_millis(10)
        );
        b.give_back(7);
        assert_eq!(b.take(100, t0 + Duration::from_secs(60)), 7, "given back");
    }

    #[test]
    fn over_a_long_run_the_rate_holds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 256, t0);
        let mut taken = u64::from(b.take(256, t0));
        for ms in 1..=10_000u64 {
            taken += u64::from(b.take(256, t0 + Duration::from_millis(ms)));
        }
        // 10 s at 1000/s plus the first full bucket.
        assert_eq!(taken, 10_000 + 256);
        b.set_rate(10);
        let later = t0 + Duration::from_millis(10_000);
        assert_eq!(b.take(5, later + Duration::from_millis(500)), 5);
    }
}
