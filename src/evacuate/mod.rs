//! Cluster evacuation: moving every message off a shard cluster so that it can be retired.
//!
//! Draining a shard cluster stops new publishes, but a queue without consumers keeps its
//! backlog there forever. A cluster with `evacuate = true` (in the file, or set with
//! `POST /clusters/NAME/evacuate`) is drained, and the evacuator moves its messages: for each
//! of its sharded queues, it consumes from the cluster and publishes to the other shard
//! clusters the queue's routing rule names, acknowledging each message on the old cluster only
//! once the new one confirmed it. The evacuator is a client of the clusters like any other
//! (its own connections, the clusters' `probe` credentials); it never touches a client session.
//!
//! | File | |
//! |---|---|
//! | `mod.rs` | the supervisor: one mover per evacuating cluster, started and stopped with the configuration |
//! | `mover.rs` | the move of one cluster's queues, batch by batch |
//! | `amqp.rs` | the small AMQP client the mover uses, on the proxy's own links |
//! | `journal.rs` | what was published and not yet acknowledged, so a restart neither loses nor silently duplicates |
//! | `bucket.rs` | the token bucket of `limits.evacuate_rate` |
//! | `target.rs` | which clusters a queue's messages may move to |
//!
//! Progress is reported through [`crate::state::Shared::update_evacuation`] (`GET /clusters`,
//! the status page) and the `warren_evacuate_*` metrics.

mod amqp;
mod bucket;
mod journal;
mod mover;
mod target;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::state::Shared;

pub use journal::{Decision, Entry, Journal, State, decide, message_hash};

/// Deliveries the evacuator has unacknowledged at once per cluster (its `basic.qos`), and so
/// the most messages one batch holds in memory and in the journal.
pub const PREFETCH: u16 = 256;

/// The header a moved message gets when the old cluster had delivered it before (it was
/// `redelivered` there): a publish cannot set the flag itself.
pub const REDELIVERED_HEADER: &str = "x-warren-redelivered";

/// How long the evacuator's movers get to stop at shutdown before they are aborted (an abort
/// is safe: what was in flight is in the journal, and stays on the old cluster).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The running evacuator: one task watching the configuration.
pub struct Evacuator {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Evacuator {
    /// Starts watching `shared`'s configuration: a mover runs for each shard cluster with
    /// `evacuate` set. The first look, a second after start (once the binary has told where
    /// its configuration file is), also resumes the evacuations a previous process left
    /// markers for.
    pub fn start(shared: Arc<Shared>) -> Evacuator {
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(shared, stop.clone()));
        Evacuator {
            stop,
            task: Some(task),
        }
    }

    /// Stops the movers (bounded by [`STOP_GRACE`]).
    pub async fn stop(mut self) {
        self.stop.cancel();
        let Some(mut task) = self.task.take() else {
            return;
        };
        if tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Evacuator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let mut config_rx = shared.subscribe();
    let mut movers: HashMap<String, (CancellationToken, JoinHandle<()>)> = HashMap::new();
    let mut resumed = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            r = config_rx.changed() => if r.is_err() { break },
        }
        if !resumed {
            resumed = true;
            let names = tokio::task::spawn_blocking({
                let shared = shared.clone();
                move || shared.resume_evacuations()
            })
            .await
            .unwrap_or_default();
            for name in names {
                info!(cluster = %name, "resuming the evacuation a previous run started");
            }
        }
        movers.retain(|_, (_, task)| !task.is_finished());
        let config = shared.config();
        for c in config.shard_clusters().filter(|c| c.evacuate) {
            if movers.contains_key(&c.name) {
                continue;
            }
            let token = stop.child_token();
            let mover = mover::Mover::new(shared.clone(), c.name.clone());
            let task = tokio::spawn(mover.run(token.clone()));
            movers.insert(c.name.clone(), (token, task));
        }
        for (name, (token, _)) in &movers {
            if !config.cluster(name).is_some_and(|c| c.evacuate) {
                token.cancel();
            }
        }
    }
    for (_, (token, _)) in movers.iter() {
        token.cancel();
    }
    for (_, (_, mut task)) in movers {
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
        }
    }
}
