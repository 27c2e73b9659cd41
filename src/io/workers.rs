//! The threads that serve client connections: one single-threaded tokio runtime per thread,
//! each connection pinned to one of them for its whole life.
//!
//! Why not tokio's work-stealing runtime: a session already does all of its connection's work
//! in one task (client socket, links, timers), so stealing has nothing to balance within a
//! connection, while its bookkeeping runs on every wake-up: a woken worker wakes a sibling in
//! case there is work to steal, times its polls, and moves tasks between queues. Over chained
//! Celery tasks on two cores, with two threads either way, that came to 4-5% of warren's CPU per
//! task. Pinning a connection to a thread is what NGINX, HAProxy and Envoy do; the price is that
//! connections, not tasks, are balanced: a new connection goes to the thread serving the fewest.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A fixed set of connection threads. Dropping it leaves the threads running until
/// [`Workers::stop`], or until a guard of [`Workers::stop_on_drop`] is dropped.
pub struct Workers {
    threads: Vec<Worker>,
    stop: CancellationToken,
}

struct Worker {
    handle: Handle,
    /// Connections served by this thread now.
    load: Arc<AtomicUsize>,
}

/// Counts a connection against its thread until dropped.
pub struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `threads` connection threads (0: one per CPU, or `TOKIO_WORKER_THREADS` when set,
    /// as tokio's own runtime counts them). With a non-zero `busy_poll` window each thread gets
    /// a busy-polling task (see [`crate::io::busy_poll`]).
    pub fn start(threads: usize, busy_poll: Duration) -> std::io::Result<Self> {
        let n = match threads {
            0 => default_threads(),
            n => n,
        };
        let stop = CancellationToken::new();
        // Threads already started end if a later one cannot be.
        let started = stop.clone().drop_guard();
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("warren-conn-{i}"))
                .spawn(move || {
                    runtime.block_on(stop.cancelled());
                    // Whatever is left (connections the shutdown did not wait for) is dropped.
                    runtime.shutdown_timeout(Duration::from_millis(100));
                })?;
            if !busy_poll.is_zero() {
                let _guard = handle.enter();
                crate::io::busy_poll::start_one(busy_poll);
            }
            workers.push(Worker {
                handle,
                load: Arc::default(),
            });
        }
        started.disarm();
        Ok(Workers {
            threads: workers,
            stop,
        })
    }

    /// How many threads serve connections.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Always false: there is at least one thread.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The thread serving the fewest connections, and the count that keeps it so until the
    /// connection ends.
    pub fn pick(&self) -> (Handle, Load) {
        let w = self
            .threads
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .expect("at least one worker thread");
        w.load.fetch_add(1, Ordering::Relaxed);
        (w.handle.clone(), Load(w.load.clone()))
    }

    /// Runs `task` on the least busy thread.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (handle, load) = self.pick();
        handle.spawn(async move {
            let _load = load;
            task.await
        })
    }

    /// Ends the threads; connections still running on them are dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Ends the threads when the returned guard is dropped.
    pub fn stop_on_drop(&self) -> tokio_util::sync::DropGuard {
        self.stop.clone().drop_guard()
    }
}

fn default_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(workers: &Workers) -> Vec<usize> {
        workers
            .threads
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn new_connections_go_to_the_least_busy_thread() {
        let workers = Workers::start(3, Duration::ZERO).expect("threads");
        let a = workers.pick().1;
        let b = workers.pick().1;
        let c = workers.pick().1;
        assert_eq!(loads(&workers), [1, 1, 1]);
        drop(b);
        assert_eq!(loads(&workers), [1, 0, 1]);
        let _d = workers.pick().1;
        assert_eq!(workers.threads[1].load.load(Ordering::Relaxed), 1);
        drop((a, c));
        workers.stop();
    }

    #[test]
    fn tasks_run_on_the_worker_threads() {
        let workers = Workers::start(2, Duration::ZERO).expect("threads");
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn(async move {
            // A timer and the I/O driver work on the worker's runtime.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let name = std::thread::current().name().map(str::to_owned);
            tx.send(name).expect("send");
        });
        let name = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the task ran");
        assert!(name.is_some_and(|n| n.starts_with("warren-conn-")));
        workers.stop();
    }
}
