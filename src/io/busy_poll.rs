//! Busy polling: for a while after traffic, keep the runtime's workers polling the sockets
//! instead of letting them sleep in the kernel.
//!
//! Why: a message through warren crosses two sockets that an idle worker is asleep on (the
//! client's publish, then the broker's delivery). Waking a sleeping thread costs tens of
//! microseconds on a virtual machine, about as much as everything else on the hop together;
//! RabbitMQ avoids the same cost by letting its schedulers spin before they sleep. With
//! `[runtime] busy_poll_us` set, one spinner task per connection thread keeps yielding for that
//! long after the last traffic; every yield makes tokio poll its I/O driver without blocking, so a frame that
//! arrives is picked up at once. Once traffic stops for the window, the spinners sleep until the
//! next client or broker read touches them: an idle proxy costs nothing.
//!
//! The price is CPU: while traffic flows, each worker runs flat out. It pays where warren has
//! cores of its own and latency matters more than CPU; it is off by default.

use std::pin::pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
// The wall clock, not tokio's like the rest of warren: the spin measures real time spent
// spinning, and under a paused tokio clock (tests) it would never see its window pass.
use std::time::{Duration, Instant};

use tokio::sync::Notify;

static BUSY_POLL: OnceLock<BusyPoll> = OnceLock::new();

/// Process-wide: any connection's traffic is a reason to keep every connection thread awake.
struct BusyPoll {
    window: Duration,
    /// Bumped by every [`touch`]; a spinner that sees it move knows traffic happened.
    traffic: AtomicU64,
    /// Spinners waiting in `wake`; [`touch`] only pays for a notify when this is non-zero.
    sleeping: AtomicUsize,
    wake: Notify,
}

/// Starts one busy-polling task on the current runtime that spins for `window` after traffic
/// (each connection thread has its own runtime, and one spinner). The first call sets the
/// window for the process.
pub fn start_one(window: Duration) {
    if window.is_zero() {
        return;
    }
    let poll = BUSY_POLL.get_or_init(|| BusyPoll {
        window,
        traffic: AtomicU64::new(0),
        sleeping: AtomicUsize::new(0),
        wake: Notify::new(),
    });
    tokio::spawn(poll.spin());
}

/// Records traffic: called by a session for every read from its client or its links. A no-op
/// (one load) when busy polling is off.
#[inline]
pub fn touch() {
    if let Some(poll) = BUSY_POLL.get() {
        // SeqCst on both sides: either this load sees a spinner that went to sleep, or that
        // spinner's check sees this increment (it never sleeps through traffic).
        poll.traffic.fetch_add(1, Ordering::SeqCst);
        if poll.sleeping.load(Ordering::SeqCst) > 0 {
            poll.wake.notify_waiters();
        }
    }
}

impl BusyPoll {
    async fn spin(&'static self) {
        loop {
            let mut seen = self.traffic.load(Ordering::SeqCst);
            let mut last = Instant::now();
            // Each yield returns to tokio's scheduler, which polls the I/O driver (without
            // blocking) before it runs this task again.
            loop {
                tokio::task::yield_now().await;
                // And to the kernel: a broker or client thread waiting for this core runs now
                // instead of at the end of the time slice.
                std::thread::yield_now();
                let now = Instant::now();
                let traffic = self.traffic.load(Ordering::Relaxed);
                if traffic != seen {
                    seen = traffic;
                    last = now;
                } else if now.duration_since(last) >= self.window {
                    break;
                }
            }
            // Quiet for a whole window: sleep until the next touch.
            let mut notified = pin!(self.wake.notified());
            notified.as_mut().enable();
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            if self.traffic.load(Ordering::SeqCst) == seen {
                notified.await;
            }
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The one test of the process-wide state: the spinner sleeps once traffic stops, and the
    /// next touch wakes it.
    #[tokio::test(flavor = "current_thread")]
    async fn spinner_sleeps_when_quiet_and_wakes_on_traffic() {
        start_one(Duration::from_millis(500));
        let poll = BUSY_POLL.get().expect("started");
        let asleep = || poll.sleeping.load(Ordering::SeqCst) == 1;
        until("the spinner sleeps with no traffic", asleep).await;

        touch();
        until("a touch wakes the spinner", || !asleep()).await;
        // Steady traffic keeps it awake well past the window.
        for _ in 0..20 {
            touch();
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(!asleep(), "asleep while traffic flows");
        }
        until("the spinner sleeps again once traffic stops", asleep).await;
    }
}
