//! The process-wide budget for publishes held until their clusters confirm them
//! (`limits.max_held_bytes`).
//!
//! Every session holds its clients' publishes until a cluster confirms them (so a nack or a lost
//! link gets them published again elsewhere). Each session bounds its own share, and this budget
//! bounds the sum: at the bound, sessions stop reading their clients until confirms free bytes.
//! A session that stopped on the total waits on [`HeldBudget::room`], which wakes it as soon as
//! any session releases bytes below the bound, instead of polling.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// Bytes of held publishes in the whole process, against a limit.
#[derive(Debug)]
pub struct HeldBudget {
    used: AtomicUsize,
    limit: AtomicUsize,
    /// Woken when `used` drops below `limit` (or the limit is raised).
    freed: Notify,
    /// `warren_held_bytes`, kept equal to `used`.
    gauge: Gauge,
}

impl HeldBudget {
    pub fn new(limit: usize, gauge: Gauge) -> Self {
        HeldBudget {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            freed: Notify::new(),
            gauge,
        }
    }

    /// Counts `n` more bytes held. Never refuses: the caller already read the publish; the
    /// bound stops the next reads instead.
    pub fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.gauge.inc_by(n as i64);
    }

    /// Releases `n` bytes counted by [`add`](Self::add), waking the sessions waiting for room
    /// when this brings the total under the limit.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or_else(|u| u);
        self.gauge.dec_by(n.min(before) as i64);
        let limit = self.limit.load(Ordering::Relaxed);
        if before >= limit && before.saturating_sub(n) < limit {
            self.freed.notify_waiters();
        }
    }

    /// Whether the total is under the limit.
    pub fn has_room(&self) -> bool {
        self.used.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A reload changed `limits.max_held_bytes`.
    pub fn set_limit(&self, limit: usize) {
        let old = self.limit.swap(limit, Ordering::AcqRel);
        if limit > old {
            self.freed.notify_waiters();
        }
    }

    /// Resolves once the total is under the limit. The waiter registers before it checks, so
    /// a release between the check and the wait is not missed.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }
}

/// The publishes one session holds until their clusters confirm them, in bytes, counted in the
/// process budget as well. Bytes are counted by [`HeldTicket`]s: one per held publish, given back
/// when the ticket is dropped, so no path that lets go of a publish (a confirm, a nack, a channel
/// or link lost, a republish, the session's end) has to remember to release it.
#[derive(Debug)]
pub struct HeldLedger {
    used: AtomicUsize,
    budget: Arc<HeldBudget>,
}

impl HeldLedger {
    pub fn new(budget: Arc<HeldBudget>) -> Arc<Self> {
        Arc::new(HeldLedger {
            used: AtomicUsize::new(0),
            budget,
        })
    }

    /// A ledger with a budget of its own and no limit, counted nowhere else (the maps' tests).
    pub fn standalone() -> Arc<Self> {
        Self::new(Arc::new(HeldBudget::new(usize::MAX, Gauge::default())))
    }

    /// Bytes held by this session's tickets.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Counts `size` bytes until the ticket is dropped.
    pub fn hold(self: &Arc<Self>, size: usize) -> HeldTicket {
        self.used.fetch_add(size, Ordering::Relaxed);
        self.budget.add(size);
        HeldTicket {
            size,
            ledger: self.clone(),
        }
    }
}

/// The bytes of one held publish, counted in its session's [`HeldLedger`] (and the process
/// budget) for as long as the ticket lives.
#[derive(Debug)]
pub struct HeldTicket {
    size: usize,
    ledger: Arc<HeldLedger>,
}

impl Drop for HeldTicket {
    fn drop(&mut self) {
        self.ledger.used.fetch_sub(self.size, Ordering::Relaxed);
        self.ledger.budget.release(self.size);
    }
}

/// Body bytes of messages one session is still receiving, counted in the process budget.
///
/// A content is passed on only once whole, so its body is buffered meanwhile: at most
/// `limits.max_message_size` per connection. Counted in the budget too, many connections each
/// sending a large message slowly cannot together grow the proxy without bound: at the bound
/// every session stops reading its client, as for held publishes, until bytes are freed.
#[derive(Debug)]
pub struct Receiving {
    budget: Arc<HeldBudget>,
    counted: usize,
}

impl Receiving {
    pub fn new(budget: Arc<HeldBudget>) -> Self {
        Receiving { budget, counted: 0 }
    }

    /// The session now buffers `n` bytes of partial bodies.
    pub fn set(&mut self, n: usize) {
        if n > self.counted {
            self.budget.add(n - self.counted);
        } else if n < self.counted {
            self.budget.release(self.counted - n);
        }
        self.counted = n;
    }

    /// Whether the session may go on reading its client: the total is under the limit, or
    /// over it only by this session's own partial bodies. A session stopped in the middle of a
    /// message it alone could not finish would wait for ever (a message larger than the
    /// budget); so the total stays under the limit plus one connection's partial bodies.
    pub fn may_read(&self) -> bool {
        let limit = self.budget.limit.load(Ordering::Relaxed);
        self.budget.used().saturating_sub(self.counted) < limit
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.budget.release(self.counted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn counts_and_the_gauge_agree() {
        let g = Gauge::default();
        let b = HeldBudget::new(100, g.clone());
        b.add(60);
        b.add(50);
        assert!(!b.has_room());
        assert_eq!((b.used(), g.get()), (110, 110));
        b.release(20);
        assert!(b.has_room());
        // Over-release cannot wrap.
        b.release(1000);
        assert_eq!((b.used(), g.get()), (0, 0));
    }

    #[test]
    fn tickets_count_until_dropped() {
        let g = Gauge::default();
        let budget = Arc::new(HeldBudget::new(100, g.clone()));
        let (a, b) = (
            HeldLedger::new(budget.clone()),
            HeldLedger::new(budget.clone()),
        );
        let t1 = a.hold(30);
        let t2 = a.hold(40);
        let t3 = b.hold(50);
        assert_eq!(
            (a.used(), b.used(), budget.used(), g.get()),
            (70, 50, 120, 120)
        );
        assert!(!budget.has_room());
        drop(t2);
        assert_eq!((a.used(), budget.used()), (30, 80));
        assert!(budget.has_room());
        drop((t1, t3));
        assert_eq!((a.used(), b.used(), budget.used(), g.get()), (0, 0, 0, 0));
    }

    #[test]
    fn bodies_still_arriving_count_until_passed_on_or_dropped() {
        let budget = Arc::new(HeldBudget::new(100, Gauge::default()));
        let mut r = Receiving::new(budget.clone());
        r.set(70);
        r.set(120);
        assert!(!budget.has_room(), "partial bodies fill the budget");
        assert!(
            r.may_read(),
            "over the limit by its own bodies only: it may finish them"
        );
        let other = HeldLedger::new(budget.clone()).hold(100);
        assert!(!r.may_read(), "others fill the budget");
        drop(other);
        r.set(10);
        assert_eq!(budget.used(), 10);
        drop(r);
        assert_eq!(budget.used(), 0, "a session's end gives them back");
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_another_session_releases() {
        let b = Arc::new(HeldBudget::new(100, Gauge::default()));
        b.add(150);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.room().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        b.release(10); // still at 140: no room
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        b.release(60); // 80 < 100
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken without polling")
            .unwrap();
    }

    #[tokio::test]
    async fn raising_the_limit_wakes_waiters() {
        let b = Arc::new(HeldBudget::new(10, Gauge::default()));
        b.add(50);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.room().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        b.set_limit(100);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken by the new limit")
            .unwrap();
    }
}
