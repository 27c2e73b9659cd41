//! A gate in front of one event source of a task that waits on several: the source is polled
//! again only once it has woken the task.
//!
//! Why: a session waits on its client socket, its links and a few rare events in one task, and
//! is woken by any of them. Polling every source on every turn, as `select!` does, costs each
//! idle one a trip through tokio's readiness check (its coop budget, the registration's lock and
//! waker comparison) to learn nothing new; on the path of one message that was several hundred
//! instructions per turn, paid by every message. Behind a gate, a source that answered
//! `Pending` is asked again only after it called the waker it was given, which is the gate's:
//! the call marks the gate and wakes the task. This is what `FuturesUnordered` does for the
//! futures it holds, for sources that are not futures.
//!
//! Every poll of a gated source must go through its gate: a source polled once with the task's
//! own waker would call that one instead, and the gate would never hear of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The gate of one source (see the module documentation).
#[derive(Debug)]
pub struct Gate {
    shared: Arc<Shared>,
    /// The waker the source is given: marks the gate and wakes the task.
    waker: Waker,
    /// The last poll of the source was `Pending`: it holds the gate's waker and will call it.
    waiting: bool,
}

#[derive(Debug, Default)]
struct Shared {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Self {
        let shared = Arc::new(Shared::default());
        Gate {
            waker: Waker::from(shared.clone()),
            shared,
            waiting: false,
        }
    }

    /// Polls the source with `poll`, unless it is still waiting since its last `Pending` and
    /// has not woken the task since.
    pub fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // The task's waker first, the mark second: a wake between the two is seen in the mark,
        // one after both wakes the task.
        self.shared.task.register(cx.waker());
        let woken = self.shared.woken.swap(false, Ordering::AcqRel);
        if self.waiting && !woken {
            return Poll::Pending;
        }
        let r = poll(&mut Context::from_waker(&self.waker));
        self.waiting = r.is_pending();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A source that answers from a script and counts its polls, keeping the last waker.
    #[derive(Default)]
    struct Source {
        polls: usize,
        ready: bool,
        waker: Option<Waker>,
    }

    impl Source {
        fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            if std::mem::take(&mut self.ready) {
                Poll::Ready(())
            } else {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }

        /// Becomes ready and calls the waker it was last given, as a socket would.
        fn fire(&mut self) {
            self.ready = true;
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    /// The task's waker: counts its wake-ups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_source_is_not_polled_until_it_wakes_the_task() {
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut gate = Gate::new();
        let mut src = Source::default();
        assert!(gate.poll(&mut cx, |cx| src.poll(cx)).is_pending());
        assert_eq!(src.polls, 1);
        for _ in 0..5 {
            assert!(gate.poll(&mut cx, |cx| src.poll(cx)).is_pending());
        }
        assert_eq!(src.polls, 1, "not polled while it waits");
        src.fire();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the source's wake reaches the task"
        );
        assert!(gate.poll(&mut cx, |cx| src.poll(cx)).is_ready());
        assert_eq!(src.polls, 2);
    }

    #[test]
    fn a_source_that_was_ready_is_polled_again_at_once() {
        let waker = Waker::from(Arc::new(Task::default()));
        let mut cx = Context::from_waker(&waker);
        let mut gate = Gate::new();
        let mut src = Source {
            ready: true,
            ..Source::default()
        };
        assert!(gate.poll(&mut cx, |cx| src.poll(cx)).is_ready());
        // It may have more: asked again, it registers the gate's waker.
        assert!(gate.poll(&mut cx, |cx| src.poll(cx)).is_pending());
        assert_eq!(src.polls, 2);
    }

    #[test]
    fn a_wake_during_the_poll_is_not_lost() {
        let waker = Waker::from(Arc::new(Task::default()));
        let mut cx = Context::from_waker(&waker);
        let mut gate = Gate::new();
        // The source wakes the waker it is given while it answers `Pending` (as tokio does
        // when a task's coop budget runs out).
        let r: Poll<()> = gate.poll(&mut cx, |cx| {
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(r.is_pending());
        let mut polled = false;
        let _ = gate.poll(&mut cx, |_| {
            polled = true;
            Poll::<()>::Pending
        });
        assert!(polled, "woken during its poll, the source is polled again");
    }

    #[test]
    fn the_latest_task_waker_is_the_one_woken() {
        let first = Arc::new(Task::default());
        let second = Arc::new(Task::default());
        let mut gate = Gate::new();
        let mut src = Source::default();
        let w1 = Waker::from(first.clone());
        let _ = gate.poll(&mut Context::from_waker(&w1), |cx| src.poll(cx));
        // Polled from another task (a future moved between tasks): that one is woken.
        let w2 = Waker::from(second.clone());
        let _ = gate.poll(&mut Context::from_waker(&w2), |cx| src.poll(cx));
        src.fire();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
