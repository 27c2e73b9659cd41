//! State shared by the proxy's parts: the running configuration (and its reloads), metrics,
//! what the clusters told about themselves, and what sessions leave for each other (the shared
//! topology log, clusters that missed a change, nodes seen back).
//!
//! It sits below the listeners ([`crate::proxy`]), the sessions ([`crate::client`]) and the
//! admin endpoint ([`crate::admin`]), and imports none of them: each of those reads and updates
//! this state, never another's internals.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::clients::Clients;
use crate::codec::{FieldTable, Method};
use crate::config::Config;
use crate::held::HeldBudget;
use crate::metrics::Metrics;
use crate::server_routes::ServerRoutes;
use crate::topology::Topology;
use crate::upstream::probe;

/// How often one (cluster, event) is logged as a warning (see [`Shared::report_once`]).
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The outcome of the last configuration reload, for the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    pub at: SystemTime,
    pub ok: bool,
    /// What changed, or why the new file was rejected (file:line:col: reason).
    pub message: String,
    /// Number of configurations applied so far (1 = the one the proxy started with).
    pub generation: u64,
}

/// A shard cluster's weight set at run time ([`Shared::set_weight`]), and the weight the
/// configuration file gives it (what a reload would apply without the override).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightOverride {
    pub weight: u32,
    pub file_weight: u32,
}

/// State shared by every connection of one proxy.
#[derive(Debug)]
pub struct Shared {
    config: ArcSwap<Config>,
    /// Sessions watch this to apply a reloaded configuration to their links.
    config_tx: watch::Sender<Arc<Config>>,
    config_path: Mutex<Option<PathBuf>>,
    last_reload: Mutex<Option<ReloadStatus>>,
    generation: AtomicU64,
    /// Clusters drained at run time (`POST /clusters/NAME/drain`), kept across reloads.
    drained: Mutex<HashSet<String>>,
    /// Clusters evacuated at run time (`POST /clusters/NAME/evacuate`), kept across reloads and,
    /// through a marker file in the state directory, across restarts.
    evacuating: Mutex<HashSet<String>>,
    /// What each evacuation has done so far (`GET /clusters`, the status page).
    evacuations: Mutex<std::collections::HashMap<String, EvacuationProgress>>,
    /// Weights set at run time (`POST /clusters/NAME/weight`), kept across reloads while the
    /// cluster stays in the file.
    weights: Mutex<std::collections::HashMap<String, WeightOverride>>,
    /// When this proxy started (`GET /clusters`: `started_at`, `uptime_secs`).
    started_at: SystemTime,
    /// (vhost, queue) of the sharded queues clients declared, for the admin's queue depths.
    queues: Mutex<BTreeSet<(String, String)>>,
    /// (vhost, queue) of the queues, of any class, whose last declare that a cluster accepted
    /// through this process made them quorum queues; forgotten when one is deleted. RabbitMQ
    /// refuses a conditional delete of a quorum queue, which warren checks over the clusters
    /// itself (see `Session::checked_delete`), so it must know the type from the latest word
    /// of any client, not from what one connection declared.
    quorum_queues: Mutex<HashSet<(String, String)>>,
    /// The single-active-consumer queues declared through this process, and whose turn it is
    /// to subscribe to each.
    single_active: crate::single_active::SingleActive,
    /// Per vhost, the sharded topology clients declared, replayed on clusters added later.
    topology: Mutex<std::collections::HashMap<String, Topology>>,
    /// Per vhost, where dead-letter and alternate exchanges and `CC` headers lead (see
    /// [`crate::server_routes`]).
    server_routes: Mutex<std::collections::HashMap<String, ServerRoutes>>,
    /// Per (vhost, cluster), the shared topology changes the cluster missed: some client
    /// changed them while that cluster was unreachable. The next link any session opens there
    /// applies them, in order, so a queue declared by a client gone since exists there before a
    /// publish is routed to it, and a binding removed meanwhile is removed there too. Past the
    /// log's bound (or after a refused replay) the whole shared topology is declared instead.
    stale: Mutex<std::collections::HashMap<(String, String), crate::topology::Missed>>,
    /// What the clusters said about themselves in connection.start (product, version...).
    server_properties: ArcSwapOption<FieldTable>,
    /// Per cluster, how many times the health probes saw one of its nodes come back.
    /// Sessions waiting to reconnect to the cluster retry at once when it changes, instead of
    /// waiting out their backoff.
    nodes_back: Mutex<std::collections::HashMap<String, u64>>,
    next_id: AtomicU64,
    /// When each (cluster, event) was last logged as a warning (see `report_once`).
    reported: Mutex<std::collections::HashMap<(String, &'static str), tokio::time::Instant>>,
    pub metrics: Arc<Metrics>,
    /// The open client connections (`GET /clients`).
    pub clients: Arc<Clients>,
    /// Bytes of publishes held until confirmed, in the whole process (`limits.max_held_bytes`).
    pub held: Arc<HeldBudget>,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Self {
        let (config_tx, _) = watch::channel(config.clone());
        let metrics = Arc::new(Metrics::default());
        let held_limit = config.limits.max_held_bytes;
        // Every configured cluster has its series in /metrics, at 0, before any traffic.
        for c in &config.clusters {
            metrics.cluster(&c.name);
        }
        for c in config.shard_clusters() {
            metrics.evacuation(&c.name);
        }
        Shared {
            config_tx,
            config_path: Mutex::new(None),
            last_reload: Mutex::new(None),
            generation: AtomicU64::new(1),
            drained: Mutex::new(HashSet::new()),
            evacuating: Mutex::default(),
            evacuations: Mutex::default(),
            weights: Mutex::default(),
            started_at: SystemTime::now(),
            queues: Mutex::new(BTreeSet::new()),
            quorum_queues: Mutex::default(),
            single_active: Default::default(),
            server_routes: Mutex::default(),
            topology: Mutex::default(),
            stale: Mutex::default(),
            config: ArcSwap::new(config),
            server_properties: ArcSwapOption::empty(),
            nodes_back: Mutex::default(),
            next_id: AtomicU64::new(1),
            reported: Mutex::default(),
            held: Arc::new(HeldBudget::new(held_limit, metrics.held_bytes.clone())),
            metrics,
            clients: Arc::default(),
        }
    }

    /// Whether the caller is the first in [`REPORT_EVERY`] to report `event` for `cluster`:
    /// that one logs a warning, the others (every client connection sees the same outage) log
    /// at debug, so a cluster down is a few lines a minute, not a few per client connection.
    pub fn report_once(&self, cluster: &str, event: &'static str) -> bool {
        let now = tokio::time::Instant::now();
        let mut reported = self.reported.lock();
        let key = (cluster.to_owned(), event);
        match reported.get(&key) {
            Some(at) if now.duration_since(*at) < REPORT_EVERY => false,
            _ => {
                if reported.len() > 10_000 {
                    reported.clear();
                }
                reported.insert(key, now);
                true
            }
        }
    }

    /// A health probe saw a node of `cluster` come back.
    pub fn node_came_up(&self, cluster: &str) {
        let mut back = self.nodes_back.lock();
        *back.entry(cluster.to_owned()).or_default() += 1;
    }

    /// How many times a node of `cluster` was seen coming back (see [`Shared::node_came_up`]).
    pub fn nodes_back(&self, cluster: &str) -> u64 {
        let back = self.nodes_back.lock();
        back.get(cluster).copied().unwrap_or(0)
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Sessions subscribe to configuration changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.config_tx.subscribe()
    }

    /// The file `reload` reads (set by the binary; tests may leave it unset).
    pub fn set_config_path(&self, path: &Path) {
        *self.config_path.lock() = Some(path.to_path_buf());
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_path.lock().clone()
    }

    /// When this proxy started.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// Whether `cluster` was drained at run time (`POST /clusters/NAME/drain`): only such a
    /// drain can be undone with [`Shared::undrain`].
    pub fn drained_at_run_time(&self, cluster: &str) -> bool {
        self.drained.lock().contains(cluster)
    }

    /// The weight set at run time for `cluster`, if any, with the file's weight.
    pub fn weight_override(&self, cluster: &str) -> Option<WeightOverride> {
        self.weights.lock().get(cluster).copied()
    }

    pub fn last_reload(&self) -> Option<ReloadStatus> {
        self.last_reload.lock().clone()
    }

    /// Re-reads the configuration file. An invalid file changes nothing; either way the outcome
    /// is logged, counted in the metrics and kept for the admin endpoint.
    pub fn reload(&self) -> Result<ReloadStatus, ReloadStatus> {
        let Some(path) = self.config_path() else {
            return Err(self.record(false, "no configuration file to reload from".into()));
        };
        match Config::load(&path) {
            Ok(config) => match self.drains_every_shard(&config, None) {
                Some(why) => Err(self.record(false, why)),
                None => Ok(self.apply(config)),
            },
            // The caller logs the outcome, once.
            Err(e) => Err(self.record(false, e.to_string())),
        }
    }

    /// Why `config`, with the drains and evacuations made at run time added (but those of
    /// `undoing`, which an undrain or unevacuate is taking back), would leave no shard cluster
    /// to take publishes (the file alone cannot: validation refuses it). Such a reload is
    /// refused, as `POST /clusters/NAME/drain` refuses to drain the last one.
    fn drains_every_shard(&self, config: &Config, undoing: Option<&str>) -> Option<String> {
        let drained = self.drained.lock().clone();
        let evacuating = self.evacuating.lock().clone();
        let run_time = |name: &str| {
            undoing != Some(name) && (drained.contains(name) || evacuating.contains(name))
        };
        let mut shards = config.shard_clusters().peekable();
        shards.peek()?;
        if !shards.all(|c| c.drain || c.evacuate || run_time(&c.name)) {
            return None;
        }
        let mut at_run_time: Vec<&str> = config
            .shard_clusters()
            .filter(|c| run_time(&c.name))
            .map(|c| c.name.as_str())
            .collect();
        at_run_time.sort_unstable();
        Some(format!(
            "refusing the reload: every shard cluster would be drained and publishes would have \
             nowhere to go ({} drained or evacuated at run time: POST /clusters/NAME/undrain or \
             /unevacuate first, or leave a shard cluster undrained in the file)",
            at_run_time.join(", ")
        ))
    }

    /// Applies a validated configuration, as read from the file (run-time drains and weights
    /// stay in force).
    pub fn apply(&self, config: Config) -> ReloadStatus {
        self.apply_with(config, true)
    }

    /// [`Shared::apply`]; `from_file`: the weights in `config` are the file's (a reload), not
    /// the running ones with the run-time weights already in (a run-time change).
    fn apply_with(&self, mut config: Config, from_file: bool) -> ReloadStatus {
        let old = self.config();
        if config.listen != old.listen {
            warn!(old = %old.listen, new = %config.listen, "listen address changes need a restart; keeping the old one");
            config.listen = old.listen;
        }
        if config.admin.listen != old.admin.listen {
            warn!("admin listen address changes need a restart; keeping the old one");
            config.admin.listen = old.admin.listen;
        }
        if config.runtime != old.runtime {
            warn!("[runtime] changes need a restart; keeping the running values");
            config.runtime = old.runtime.clone();
        }
        // New certificates apply to the next TLS handshake; the listener itself stays as started.
        match (&old.tls, &mut config.tls) {
            (Some(old_tls), Some(new_tls)) if new_tls.listen != old_tls.listen => {
                warn!(old = %old_tls.listen, new = %new_tls.listen,
                    "tls.listen changes need a restart; keeping the old address");
                new_tls.listen = old_tls.listen;
            }
            (None, Some(new_tls)) => {
                warn!(listen = %new_tls.listen, "a new [tls] section needs a restart; not listening for amqps");
                config.tls = None;
            }
            (Some(old_tls), None) => {
                warn!(listen = %old_tls.listen,
                    "removing [tls] needs a restart; the amqps listener keeps its certificates");
                config.tls = old.tls.clone();
            }
            _ => {}
        }
        // A cluster the file no longer has loses its run-time drain and evacuation (and the
        // evacuation's marker), as it loses its run-time weight: added back later, under the
        // same name, it starts from what the file says.
        let (drained, evacuating, forgotten) = {
            let mut drained = self.drained.lock();
            let mut evacuating = self.evacuating.lock();
            drained.retain(|name| config.cluster(name).is_some());
            let (kept, gone): (HashSet<String>, HashSet<String>) = evacuating
                .drain()
                .partition(|name| config.cluster(name).is_some());
            *evacuating = kept;
            (drained.clone(), evacuating.clone(), gone)
        };
        for name in &forgotten {
            if let Err(e) = self.write_evacuation_marker(name, false) {
                warn!(cluster = %name, error = %e, "cannot remove the evacuation marker of a removed cluster");
            }
        }
        for c in &mut config.clusters {
            c.drain |= drained.contains(&c.name);
            if c.role == crate::config::Role::Shard && evacuating.contains(&c.name) {
                c.evacuate = true;
            }
            // Evacuating implies draining, whichever way it was asked for.
            c.drain |= c.evacuate;
        }
        {
            let mut weights = self.weights.lock();
            // A cluster the file no longer has loses its run-time weight: added back later, it
            // starts from the file's weight. So does one the file now gives that weight: the
            // file rules again.
            weights.retain(|name, w| {
                config.cluster(name).is_some_and(|c| {
                    c.role == crate::config::Role::Shard && !(from_file && c.weight == w.weight)
                })
            });
            for c in &mut config.clusters {
                if let Some(w) = weights.get_mut(&c.name) {
                    if from_file {
                        w.file_weight = c.weight;
                    }
                    c.weight = w.weight;
                }
            }
        }
        let old_control = old.control_cluster().map(|c| c.name.clone());
        let new_control = config.control_cluster().map(|c| c.name.clone());
        if old_control != new_control {
            warn!(old = ?old_control, new = ?new_control,
                "the control cluster changed: connected clients keep their control link until they reconnect; \
                 new connections use the new control cluster");
        }
        for gone in old
            .shard_clusters()
            .filter(|c| config.cluster(&c.name).is_none())
        {
            // Clients stop seeing that cluster's part of every queue: consumers drain it only
            // until the drain deadline, and a queue read only by basic.get (or not read at all)
            // keeps its messages there. Said loudly, as the passive declares and gets that
            // follow count without them.
            warn!(cluster = %gone.name, drain_deadline_secs = config.timeouts.drain_deadline_secs,
                "shard cluster removed: its links drain and close; messages still in its queues stay \
                 there, out of reach through warren (evacuate it first: POST /clusters/NAME/evacuate)");
        }
        let message = describe_change(&old, &config);
        if config == *old {
            return self.record_no_change();
        }
        for c in &config.clusters {
            self.metrics.cluster(&c.name);
        }
        for c in config.shard_clusters() {
            self.metrics.evacuation(&c.name);
        }
        let config = Arc::new(config);
        self.held.set_limit(config.limits.max_held_bytes);
        // The status's lock is taken before the new configuration is in force and held until
        // the status says so: whoever reads the configuration and then the status (GET
        // /clusters) never sees the new one beside the previous reload's status, or none.
        let mut last = self.last_reload.lock();
        self.config.store(config.clone());
        self.config_tx.send_replace(config);
        self.generation.fetch_add(1, Ordering::Relaxed);
        let status = self.status(true, message);
        *last = Some(status.clone());
        status
    }

    /// Drains a shard cluster at run time: no new publishes go there.
    pub fn drain(&self, cluster: &str) -> Result<ReloadStatus, String> {
        let mut config = (*self.config()).clone();
        let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) else {
            return Err(format!("no cluster named {cluster:?}"));
        };
        if c.role != crate::config::Role::Shard {
            return Err(format!("{cluster:?} is not a shard cluster"));
        }
        c.drain = true;
        if config.shard_clusters().all(|c| c.drain) {
            return Err("refusing to drain the last shard cluster that takes publishes".into());
        }
        self.drained.lock().insert(cluster.to_owned());
        Ok(self.apply_with(config, false))
    }

    /// Starts evacuating a shard cluster at run time (`POST /clusters/NAME/evacuate`): it is
    /// drained, and the evacuator moves its messages to the other shard clusters. The marker
    /// file written in the state directory makes a restarted warren go on with it; without a
    /// state directory the evacuation still runs, and the answer says it will not outlast a
    /// restart.
    pub fn evacuate(&self, cluster: &str) -> Result<ReloadStatus, String> {
        let mut config = (*self.config()).clone();
        let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) else {
            return Err(format!("no cluster named {cluster:?}"));
        };
        if c.role != crate::config::Role::Shard {
            return Err(format!(
                "{cluster:?} is not a shard cluster: the control cluster's messages have nowhere \
                 else to go"
            ));
        }
        c.evacuate = true;
        c.drain = true;
        if config.shard_clusters().all(|c| c.evacuate) {
            return Err(
                "refusing to evacuate every shard cluster: their messages would have nowhere to go"
                    .into(),
            );
        }
        if config.shard_clusters().all(|c| c.drain) {
            return Err("refusing to drain the last shard cluster that takes publishes".into());
        }
        self.evacuating.lock().insert(cluster.to_owned());
        let mut status = self.apply_with(config, false);
        if let Err(e) = self.write_evacuation_marker(cluster, true) {
            warn!(cluster, error = %e, "the evacuation will not outlast a restart");
            status.message = format!("{}; {e}: it will not outlast a restart", status.message);
        }
        Ok(status)
    }

    /// Stops a run-time evacuation ([`Shared::evacuate`]) and the drain it implied: the cluster
    /// takes publishes again unless the file drains or evacuates it.
    pub fn unevacuate(&self, cluster: &str) -> Result<ReloadStatus, String> {
        if !self.evacuating.lock().contains(cluster) {
            return Err(format!(
                "{cluster:?} is not evacuated at run time (POST /clusters/NAME/evacuate); \
                 evacuate = true in the file is undone by editing the file"
            ));
        }
        // The file is read first: one that cannot be read leaves the evacuation as it is.
        let file = self.read_file_keeping(cluster, "evacuated")?;
        self.evacuating.lock().remove(cluster);
        if let Err(e) = self.write_evacuation_marker(cluster, false) {
            warn!(cluster, error = %e, "cannot remove the evacuation marker");
        }
        if let Some(config) = file {
            return Ok(self.apply(config));
        }
        let mut config = (*self.config()).clone();
        let drained = self.drained.lock().contains(cluster);
        if let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) {
            c.evacuate = false;
            c.drain = drained;
        }
        Ok(self.apply_with(config, false))
    }

    /// Whether `cluster` is evacuated at run time (not by the file).
    pub fn evacuated_at_run_time(&self, cluster: &str) -> bool {
        self.evacuating.lock().contains(cluster)
    }

    /// Where state that outlasts a restart is kept: `state_dir`, else the configuration file's
    /// directory; `None` for a proxy without either (tests).
    pub fn state_dir(&self) -> Option<PathBuf> {
        if let Some(d) = &self.config().state_dir {
            return Some(d.clone());
        }
        let path = self.config_path()?;
        Some(match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
    }

    /// Resumes the run-time evacuations whose markers a previous process left in the state
    /// directory; the names of the clusters resumed. A marker of a cluster the file no longer
    /// has as a shard cluster is deleted, as a reload that removes the cluster deletes it: added
    /// back later under the same name, the cluster starts from what the file says.
    pub fn resume_evacuations(&self) -> Vec<String> {
        let Some(dir) = self.state_dir() else {
            return Vec::new();
        };
        let config = self.config();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let file = entry.file_name();
                let Some(name) = file.to_str().and_then(|f| f.strip_prefix("evacuate-")) else {
                    continue;
                };
                // Only a marker (`write_evacuation_marker`), never a journal beside it (read
                // no further than a marker's length: a journal can be large).
                let marker = std::fs::File::open(entry.path()).is_ok_and(|f| {
                    use std::io::Read;
                    let mut head = Vec::with_capacity(EVACUATION_MARKER.len());
                    f.take(EVACUATION_MARKER.len() as u64)
                        .read_to_end(&mut head)
                        .is_ok_and(|_| head == EVACUATION_MARKER)
                });
                if !marker || config.shard_clusters().any(|c| c.name == name) {
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => info!(
                        cluster = name,
                        "the evacuation marker of a cluster the file no longer has was deleted"
                    ),
                    Err(e) => {
                        warn!(cluster = name, error = %e, "cannot delete the evacuation marker of a cluster the file no longer has")
                    }
                }
            }
        }
        let mut resumed = Vec::new();
        for c in config.shard_clusters() {
            let marked = dir.join(evacuation_marker_name(&c.name)).exists();
            if marked && !c.evacuate && !self.evacuated_at_run_time(&c.name) {
                match self.evacuate(&c.name) {
                    Ok(_) => resumed.push(c.name.clone()),
                    Err(e) => warn!(cluster = %c.name, error = %e, "cannot resume the evacuation"),
                }
            }
        }
        resumed
    }

    fn write_evacuation_marker(&self, cluster: &str, present: bool) -> Result<(), String> {
        let Some(dir) = self.state_dir() else {
            return Err("no state directory (state_dir, or a configuration file)".into());
        };
        let path = dir.join(evacuation_marker_name(cluster));
        let result = if present {
            std::fs::write(&path, EVACUATION_MARKER)
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        };
        result.map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// What the evacuation of `cluster` has done (default: nothing yet).
    pub fn evacuation(&self, cluster: &str) -> EvacuationProgress {
        self.evacuations
            .lock()
            .get(cluster)
            .cloned()
            .unwrap_or_default()
    }

    /// Updates the evacuation progress of `cluster` (the evacuator's only way to report).
    pub fn update_evacuation(&self, cluster: &str, f: impl FnOnce(&mut EvacuationProgress)) {
        let mut all = self.evacuations.lock();
        if all.len() > crate::config::MAX_CLUSTERS * 4 {
            all.retain(|name, _| self.config().cluster(name).is_some());
        }
        f(all.entry(cluster.to_owned()).or_default());
    }

    /// Sets a shard cluster's weight at run time. Like a run-time drain, it stays in force
    /// across reloads (the file's weight is remembered and shown next to it) until it is set
    /// back to the file's weight, or the cluster leaves the file. `weight` must be one the file
    /// could give ([`check_weight`]).
    pub fn set_weight(&self, cluster: &str, weight: u32) -> Result<ReloadStatus, String> {
        check_weight(weight)?;
        let mut config = (*self.config()).clone();
        let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) else {
            return Err(format!("no cluster named {cluster:?}"));
        };
        if c.role != crate::config::Role::Shard {
            return Err(format!(
                "{cluster:?} is not a shard cluster: weight only applies to shard clusters"
            ));
        }
        {
            let mut weights = self.weights.lock();
            let file_weight = weights.get(cluster).map_or(c.weight, |w| w.file_weight);
            if weight == file_weight {
                weights.remove(cluster);
            } else {
                weights.insert(
                    cluster.to_owned(),
                    WeightOverride {
                        weight,
                        file_weight,
                    },
                );
            }
        }
        c.weight = weight;
        Ok(self.apply_with(config, false))
    }

    /// Undoes a run-time drain ([`Shared::drain`]): the cluster takes publishes again, unless
    /// the file itself marks it `drain = true` (the file is read again when there is one).
    pub fn undrain(&self, cluster: &str) -> Result<ReloadStatus, String> {
        if !self.drained.lock().contains(cluster) {
            return Err(format!(
                "{cluster:?} was not drained at run time (POST /clusters/NAME/drain); \
                 a drain set in the file is undone by editing the file"
            ));
        }
        // The file is read first: one that cannot be read leaves the drain as it is.
        let file = self.read_file_keeping(cluster, "drained")?;
        self.drained.lock().remove(cluster);
        if let Some(config) = file {
            return Ok(self.apply(config));
        }
        let mut config = (*self.config()).clone();
        if let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) {
            c.drain = false;
        }
        Ok(self.apply_with(config, false))
    }

    /// The configuration file, read and validated for an undo of a run-time change to
    /// `cluster` (`None` without a file); an error that says the cluster stays `how` when the
    /// file cannot be read, or would leave no shard cluster taking publishes as a reload
    /// would (the failed reload is recorded as any other).
    fn read_file_keeping(&self, cluster: &str, how: &str) -> Result<Option<Config>, String> {
        let Some(path) = self.config_path() else {
            return Ok(None);
        };
        let refused = |why: String| {
            let status = self.record(false, why);
            format!(
                "{}; {cluster:?} stays {how}: fix the file, then ask again",
                status.message
            )
        };
        let config = Config::load(&path).map_err(|e| refused(e.to_string()))?;
        match self.drains_every_shard(&config, Some(cluster)) {
            Some(why) => Err(refused(why)),
            None => Ok(Some(config)),
        }
    }

    /// A reload that changes nothing (a file watcher's second look at a file already applied,
    /// a SIGHUP with nothing new): it counts as a successful reload, but the status keeps saying
    /// what the last real reload did, unless that one failed (the failure is over then).
    fn record_no_change(&self) -> ReloadStatus {
        let mut last = self.last_reload.lock();
        self.metrics.reloaded(true);
        let status = ReloadStatus {
            at: SystemTime::now(),
            ok: true,
            message: "no change".into(),
            generation: self.generation.load(Ordering::Relaxed),
        };
        match &*last {
            Some(previous) if previous.ok => {}
            _ => *last = Some(status.clone()),
        }
        status
    }

    fn record(&self, ok: bool, message: String) -> ReloadStatus {
        let status = self.status(ok, message);
        *self.last_reload.lock() = Some(status.clone());
        status
    }

    /// Counts a reload and describes it (the caller records it).
    fn status(&self, ok: bool, message: String) -> ReloadStatus {
        self.metrics.reloaded(ok);
        ReloadStatus {
            at: SystemTime::now(),
            ok,
            message,
            generation: self.generation.load(Ordering::Relaxed),
        }
    }

    /// Remembers a sharded queue a client declared (for the admin's queue depths).
    pub fn note_queue(&self, vhost: &str, queue: &str) {
        let mut q = self.queues.lock();
        if q.len() < 100_000 {
            q.insert((vhost.to_owned(), queue.to_owned()));
        }
    }

    /// Notes the type a declare accepted by the clusters gave `queue` (see `quorum_queues`).
    pub fn note_queue_type(&self, vhost: &str, queue: &str, quorum: bool) {
        let mut q = self.quorum_queues.lock();
        let key = (vhost.to_owned(), queue.to_owned());
        if !quorum {
            q.remove(&key);
        } else if q.len() < 100_000 {
            q.insert(key);
        }
    }

    /// Whether the last declare of `queue` accepted through this process made it a quorum
    /// queue (and no delete came after it).
    pub fn is_quorum_queue(&self, vhost: &str, queue: &str) -> bool {
        self.quorum_queues
            .lock()
            .contains(&(vhost.to_owned(), queue.to_owned()))
    }

    /// The single-active-consumer queues and their turns to subscribe (see
    /// [`crate::single_active`]).
    pub fn single_active(&self) -> &crate::single_active::SingleActive {
        &self.single_active
    }

    /// Records a sharded topology change (see [`crate::topology`]).
    pub fn record_topology(&self, vhost: &str, method: crate::codec::Method) {
        self.topology
            .lock()
            .entry(vhost.to_owned())
            .or_default()
            .record(crate::route::Class::Sharded, method);
    }

    /// Notes the routes a declare any cluster accepted sets up in `vhost` (dead-letter and
    /// alternate exchanges).
    pub fn note_server_routes(&self, vhost: &str, method: &crate::codec::Method) {
        let mut routes = self.server_routes.lock();
        match routes.get_mut(vhost) {
            Some(r) => r.note_declare(method),
            None => routes
                .entry(vhost.to_owned())
                .or_default()
                .note_declare(method),
        }
    }

    /// Notes a publish in `vhost` with a `CC` or `BCC` header.
    pub fn note_cc_publish(&self, vhost: &str) {
        self.server_routes
            .lock()
            .entry(vhost.to_owned())
            .or_default()
            .note_cc();
    }

    /// Whether a route no binding shows may put messages in `queue` of `vhost`, bound to the
    /// `bound_to` exchanges (see [`crate::server_routes`]).
    pub fn server_routes_reach<'a>(
        &self,
        vhost: &str,
        queue: &[u8],
        bound_to: impl Iterator<Item = &'a [u8]>,
    ) -> bool {
        self.server_routes
            .lock()
            .get(vhost)
            .is_some_and(|r| r.may_reach(queue, bound_to))
    }

    /// What `f` says of the shared sharded topology of `vhost`, or `None` when no client of
    /// this process declared anything there. Read in place, under the lock: a basic.get or a
    /// conditional delete asks this, and a copy of the whole topology would cost each of them.
    pub fn with_topology<T>(&self, vhost: &str, f: impl FnOnce(&Topology) -> T) -> Option<T> {
        self.topology.lock().get(vhost).map(f)
    }

    /// Notes that `cluster` missed shared topology change `method` of `vhost` (see `stale`).
    pub fn note_missed(&self, vhost: &str, cluster: &str, method: Method) {
        self.with_stale(vhost, cluster, |m| m.push(method));
    }

    /// Notes that `cluster` may lack any of `vhost`'s shared topology: its next link declares
    /// all of it.
    pub fn mark_stale(&self, vhost: &str, cluster: &str) {
        self.with_stale(vhost, cluster, |m| m.overflowed = true);
    }

    /// Applies `f` to the log of what `cluster` missed in `vhost`, made if need be (at most
    /// 10,000 logs: vhost names come from clients).
    fn with_stale(&self, vhost: &str, cluster: &str, f: impl FnOnce(&mut crate::topology::Missed)) {
        let mut stale = self.stale.lock();
        let key = (vhost.to_owned(), cluster.to_owned());
        if stale.len() < 10_000 || stale.contains_key(&key) {
            f(stale.entry(key).or_default());
        }
    }

    /// Whether `cluster` missed a shared topology change of `vhost`.
    pub fn is_stale(&self, vhost: &str, cluster: &str) -> bool {
        self.stale
            .lock()
            .contains_key(&(vhost.to_owned(), cluster.to_owned()))
    }

    /// Whether `cluster` may lack any of `vhost`'s shared topology (see [`Self::mark_stale`]).
    pub fn lacks_shared_topology(&self, vhost: &str, cluster: &str) -> bool {
        self.stale
            .lock()
            .get(&(vhost.to_owned(), cluster.to_owned()))
            .is_some_and(|m| m.overflowed)
    }

    /// What `f` says of the changes `cluster` missed in `vhost`, if it missed any.
    pub fn with_missed<T>(
        &self,
        vhost: &str,
        cluster: &str,
        f: impl FnOnce(&crate::topology::Missed) -> T,
    ) -> Option<T> {
        self.stale
            .lock()
            .get(&(vhost.to_owned(), cluster.to_owned()))
            .map(f)
    }

    /// The changes `cluster` missed, taken by the caller to apply them there.
    pub fn take_stale(&self, vhost: &str, cluster: &str) -> Option<crate::topology::Missed> {
        self.stale
            .lock()
            .remove(&(vhost.to_owned(), cluster.to_owned()))
    }

    pub fn forget_queue(&self, vhost: &str, queue: &str) {
        self.queues
            .lock()
            .remove(&(vhost.to_owned(), queue.to_owned()));
    }

    /// The sharded queues clients declared, as (vhost, name).
    pub fn known_queues(&self) -> Vec<(String, String)> {
        self.queues.lock().iter().cloned().collect()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The clusters' server properties, probing a node the first time they are needed.
    pub async fn server_properties(&self, config: &Config) -> Option<FieldTable> {
        if let Some(p) = self.server_properties.load_full() {
            return Some((*p).clone());
        }
        let timeout = Duration::from_millis(config.timeouts.connect_ms);
        for cluster in config.shard_clusters().chain(config.control_cluster()) {
            if let Some(props) =
                probe::server_properties(&cluster.nodes, cluster.tls.as_ref(), timeout).await
            {
                self.server_properties.store(Some(Arc::new(props.clone())));
                return Some(props);
            }
        }
        None
    }

    /// Refreshes the cached server properties from a link's handshake.
    pub fn learn_server_properties(&self, props: &FieldTable) {
        let current = self.server_properties.load();
        if current.as_deref() != Some(props) {
            self.server_properties.store(Some(Arc::new(props.clone())));
        }
    }
}

/// The file in the state directory whose presence says `cluster` is evacuated at run time.
/// What an evacuation marker holds (how a marker is told from anything else in the directory).
const EVACUATION_MARKER: &[u8] =
    b"warren: this shard cluster is being evacuated (POST /clusters/NAME/evacuate)\n";

pub fn evacuation_marker_name(cluster: &str) -> String {
    format!("evacuate-{cluster}")
}

/// What one shard cluster's evacuation has done, as the evacuator reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvacuationProgress {
    /// The evacuator is working on the cluster now.
    pub running: bool,
    /// Sharded queues with messages found in the current pass, and those finished.
    pub queues_total: u64,
    pub queues_done: u64,
    /// The queue being moved now.
    pub current_queue: Option<String>,
    /// Messages published to another cluster, confirmed there and acknowledged here.
    pub moved: u64,
    /// Messages still on the cluster in the queues of the current pass (from their depths).
    pub left: u64,
    /// Messages moved per second over the last few seconds.
    pub rate: f64,
    /// Nacks and returns from a target, links lost, queues that could not be read.
    pub errors: u64,
    /// Messages published again that the target may already have had (journal: intended, not
    /// known confirmed, when the process stopped or the target's link failed).
    pub possible_duplicates: u64,
    /// Messages acknowledged without publishing again, because the journal says the target
    /// confirmed them already (a duplicate avoided).
    pub duplicates_avoided: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// A whole pass found no message in any sharded queue of the cluster: it can be removed.
    pub empty: bool,
    /// When the last pass over the queues ended.
    pub last_pass_at: Option<SystemTime>,
    /// Where the queues come from: `management` (every queue of the cluster's vhosts) or
    /// `declared` (only the queues declared through this process since it started).
    pub listing: &'static str,
}

/// The weights a shard cluster may have: those the configuration file accepts
/// (`weight` is 1 to 4294967295; 0 is refused, `drain` stops publishing).
pub fn check_weight(weight: u32) -> Result<u32, String> {
    if weight == 0 {
        return Err(
            "weight must be at least 1 (drain the cluster to stop publishing to it)".to_owned(),
        );
    }
    Ok(weight)
}

/// One line saying what a reload changes, item by item: "shard-b: weight 1 -> 3, drained;
/// added shard-c (shard); certificates reloaded".
fn describe_change(old: &Config, new: &Config) -> String {
    let mut parts = Vec::new();
    for c in &new.clusters {
        let Some(o) = old.cluster(&c.name) else {
            parts.push(format!("added {} ({})", c.name, c.role.as_str()));
            continue;
        };
        if o == c {
            continue;
        }
        let mut what = Vec::new();
        if o.role != c.role {
            what.push(format!("role {} -> {}", o.role.as_str(), c.role.as_str()));
        }
        if o.weight != c.weight {
            what.push(format!("weight {} -> {}", o.weight, c.weight));
        }
        if o.drain != c.drain {
            what.push(if c.drain { "drained" } else { "undrained" }.to_owned());
        }
        if o.evacuate != c.evacuate {
            what.push(
                if c.evacuate {
                    "evacuating"
                } else {
                    "evacuation stopped"
                }
                .to_owned(),
            );
        }
        if o.nodes != c.nodes {
            let nodes: Vec<String> = c.nodes.iter().map(ToString::to_string).collect();
            what.push(format!("nodes {}", nodes.join(" ")));
        }
        if o.spread_links != c.spread_links {
            what.push(format!("spread_links {}", c.spread_links));
        }
        if o.tls != c.tls {
            what.push("tls changed (certificates reloaded)".into());
        }
        if o.probe != c.probe {
            what.push("probe credentials changed".into());
        }
        if o.management != c.management {
            what.push("management API changed".into());
        }
        if what.is_empty() {
            // A setting this summary has no words for yet: say so rather than print nothing.
            what.push("settings changed".into());
        }
        parts.push(format!("{}: {}", c.name, what.join(", ")));
    }
    for c in &old.clusters {
        if new.cluster(&c.name).is_none() {
            parts.push(format!("removed {}", c.name));
        }
    }
    for (changed, section) in [
        (old.timeouts != new.timeouts, "[timeouts]"),
        (old.limits != new.limits, "[limits]"),
        (old.state_dir != new.state_dir, "state_dir"),
        (old.routing != new.routing, "[routing]"),
    ] {
        if changed {
            parts.push(format!("changed {section}"));
        }
    }
    if old.tls != new.tls {
        parts.push("changed tls: certificates reloaded".into());
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:5673\"\n\
        [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5701\"]\n\
        [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5711\"]\n";

    fn config(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("valid test config")
    }

    #[test]
    fn an_outage_is_reported_once_per_cluster_and_window() {
        let shared = Shared::new(Arc::new(config(BASE)));
        assert!(shared.report_once("shard-a", "link lost"));
        assert!(
            !shared.report_once("shard-a", "link lost"),
            "the second connection"
        );
        assert!(
            shared.report_once("shard-b", "link lost"),
            "another cluster"
        );
        assert!(
            shared.report_once("shard-a", "cannot open a link"),
            "another event"
        );
    }

    #[test]
    fn a_reload_says_what_changed() {
        let old = config(BASE);
        let new = config(&format!(
            "{}\nweight = 3\ndrain = true\n[[clusters]]\nname = \"shard-c\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5731\"]\n",
            BASE.trim_end()
        ));
        assert_eq!(
            describe_change(&old, &new),
            "shard-b: weight 1 -> 3, drained; added shard-c (shard)"
        );
        assert_eq!(describe_change(&old, &old), "no change");
        let spread = config(&format!("{}\nspread_links = true\n", BASE.trim_end()));
        assert_eq!(describe_change(&old, &spread), "shard-b: spread_links true");
        let with_api = config(&format!(
            "{}\nmanagement = {{ url = \"http://127.0.0.1:15711\", user = \"u\", password = \"p\" }}\n",
            BASE.trim_end()
        ));
        assert_eq!(
            describe_change(&old, &with_api),
            "shard-b: management API changed"
        );
    }

    #[test]
    fn a_reload_that_changes_nothing_keeps_the_last_status() {
        let shared = Shared::new(Arc::new(config(BASE)));
        let changed = config(&format!("{}\nweight = 2\n", BASE.trim_end()));
        let applied = shared.apply(changed.clone());
        assert_eq!(applied.message, "shard-b: weight 1 -> 2");
        let again = shared.apply(changed.clone());
        assert_eq!(again.message, "no change");
        let last = shared.last_reload().expect("a status");
        assert_eq!(last.message, "shard-b: weight 1 -> 2", "the no-op keeps it");
        // After a failed reload, a no-op means the failure is over: it is the status then.
        shared.record(false, "t.toml:1:1: bad".into());
        shared.apply(changed);
        let last = shared.last_reload().expect("a status");
        assert!(last.ok && last.message == "no change", "{last:?}");
    }

    #[test]
    fn a_run_time_weight_stays_across_reloads_until_set_back() {
        let shared = Shared::new(Arc::new(config(BASE)));
        let weight = |name: &str| shared.config().cluster(name).map(|c| c.weight);
        assert_eq!(shared.weight_override("shard-b"), None);
        let s = shared.set_weight("shard-b", 3).expect("set");
        assert_eq!(s.message, "shard-b: weight 1 -> 3");
        assert_eq!(weight("shard-b"), Some(3));
        let o = WeightOverride {
            weight: 3,
            file_weight: 1,
        };
        assert_eq!(shared.weight_override("shard-b"), Some(o));
        // A reload of the same file keeps it; a file with another weight for the cluster keeps
        // it too, and the file's weight is remembered.
        shared.apply(config(BASE));
        assert_eq!(weight("shard-b"), Some(3));
        shared.apply(config(&format!(
            "{}
weight = 2
",
            BASE.trim_end()
        )));
        assert_eq!(weight("shard-b"), Some(3));
        assert_eq!(
            shared.weight_override("shard-b").map(|o| o.file_weight),
            Some(2)
        );
        // A drain keeps it and does not take the running weight for the file's.
        shared.drain("shard-b").expect("drain");
        assert_eq!(weight("shard-b"), Some(3));
        assert_eq!(
            shared.weight_override("shard-b").map(|o| o.file_weight),
            Some(2)
        );
        assert!(shared.drained_at_run_time("shard-b"));
        shared.undrain("shard-b").expect("undrain");
        assert_eq!(weight("shard-b"), Some(3));
        // Set back to the file's weight: no override any more.
        shared.set_weight("shard-b", 2).expect("set back");
        assert_eq!(shared.weight_override("shard-b"), None);
        assert_eq!(weight("shard-b"), Some(2));
        // A file that comes to say the run-time weight ends the override too.
        shared.set_weight("shard-b", 4).expect("set");
        shared.apply(config(&format!("{}\nweight = 4\n", BASE.trim_end())));
        assert_eq!(shared.weight_override("shard-b"), None);
        assert_eq!(weight("shard-b"), Some(4));
        shared.apply(config(&format!("{}\nweight = 2\n", BASE.trim_end())));
        assert_eq!(weight("shard-b"), Some(2));
        // Refused: 0, the control cluster, unknown clusters.
        assert!(
            shared
                .set_weight("shard-a", 0)
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(
            shared
                .set_weight("nope", 2)
                .unwrap_err()
                .contains("no cluster")
        );
        let with_control = format!(
            "{BASE}[[clusters]]\nname = \"ctl\"\nrole = \"control\"\nnodes = [\"127.0.0.1:5721\"]\n"
        );
        shared.apply(config(&with_control));
        assert!(
            shared
                .set_weight("ctl", 2)
                .unwrap_err()
                .contains("not a shard")
        );
        // A cluster that leaves the file loses its run-time weight.
        shared.set_weight("shard-a", 5).expect("set");
        let only_b = "listen = \"127.0.0.1:5673\"\n\
            [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5711\"]\n";
        shared.apply(config(only_b));
        assert_eq!(shared.weight_override("shard-a"), None);
        shared.apply(config(BASE));
        assert_eq!(weight("shard-a"), Some(1));
    }

    #[test]
    fn a_run_time_evacuation_drains_and_is_refused_where_it_cannot_go() {
        let shared = Shared::new(Arc::new(config(BASE)));
        let s = shared.evacuate("shard-a").expect("evacuate");
        assert!(
            s.message.starts_with("shard-a: drained, evacuating"),
            "{}",
            s.message
        );
        assert!(
            s.message.contains("will not outlast a restart"),
            "no state dir: {}",
            s.message
        );
        let a = shared
            .config()
            .cluster("shard-a")
            .cloned()
            .expect("shard-a");
        assert!(a.evacuate && a.drain);
        assert!(shared.evacuated_at_run_time("shard-a"));
        // A reload of a file without `evacuate` keeps the run-time evacuation.
        shared.apply(config(BASE));
        assert!(
            shared
                .config()
                .cluster("shard-a")
                .is_some_and(|c| c.evacuate && c.drain)
        );
        // Every shard cluster evacuating: refused, nothing changes.
        let e = shared.evacuate("shard-b").unwrap_err();
        assert!(e.contains("every shard cluster"), "{e}");
        assert!(
            shared
                .config()
                .cluster("shard-b")
                .is_some_and(|c| !c.evacuate && !c.drain)
        );
        let with_control = format!(
            "{BASE}[[clusters]]\nname = \"ctl\"\nrole = \"control\"\nnodes = [\"127.0.0.1:5721\"]\n"
        );
        shared.apply(config(&with_control));
        assert!(
            shared
                .evacuate("ctl")
                .unwrap_err()
                .contains("not a shard cluster")
        );
        assert!(shared.evacuate("nope").unwrap_err().contains("no cluster"));
        // Undone: publishes go there again.
        let s = shared.unevacuate("shard-a").expect("unevacuate");
        assert!(s.message.contains("undrained"), "{}", s.message);
        assert!(
            shared
                .config()
                .cluster("shard-a")
                .is_some_and(|c| !c.evacuate && !c.drain)
        );
        assert!(
            shared
                .unevacuate("shard-a")
                .unwrap_err()
                .contains("not evacuated")
        );
    }

    #[test]
    fn an_evacuation_outlasts_a_restart_through_its_marker() {
        let dir = std::env::temp_dir().join(format!("warren-evac-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("proxy.toml");
        std::fs::write(&file, BASE).expect("write config");
        let first = Shared::new(Arc::new(config(BASE)));
        first.set_config_path(&file);
        first.evacuate("shard-b").expect("evacuate");
        assert!(dir.join("evacuate-shard-b").exists());
        // A new process with the same file resumes it.
        let second = Shared::new(Arc::new(config(BASE)));
        second.set_config_path(&file);
        assert_eq!(second.resume_evacuations(), vec!["shard-b".to_owned()]);
        assert!(
            second
                .config()
                .cluster("shard-b")
                .is_some_and(|c| c.evacuate && c.drain)
        );
        assert!(second.resume_evacuations().is_empty(), "once");
        second.unevacuate("shard-b").expect("unevacuate");
        assert!(!dir.join("evacuate-shard-b").exists());
        let third = Shared::new(Arc::new(config(BASE)));
        third.set_config_path(&file);
        assert!(third.resume_evacuations().is_empty());
        // A marker of a cluster the file no longer has goes at the next start; a journal
        // beside it stays.
        third.evacuate("shard-b").expect("evacuate");
        std::fs::write(dir.join("evacuate-shard-b.journal"), b"journal").expect("journal");
        let only_a = BASE.replace("shard-b", "shard-x");
        let fourth = Shared::new(Arc::new(config(&only_a)));
        fourth.set_config_path(&file);
        assert!(fourth.resume_evacuations().is_empty());
        assert!(!dir.join("evacuate-shard-b").exists(), "deleted");
        assert!(
            dir.join("evacuate-shard-b.journal").exists(),
            "not a marker"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A temporary directory with BASE (plus a third shard cluster) as its configuration file.
    /// A state directory holding a proxy.toml with three shard clusters, and a `Shared`
    /// started from it that reloads from it.
    fn shared_on_file(name: &str) -> (PathBuf, PathBuf, String, Shared) {
        let dir = std::env::temp_dir().join(format!("warren-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let text = format!(
            "{BASE}[[clusters]]\nname = \"shard-c\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5731\"]\n"
        );
        let file = dir.join("proxy.toml");
        std::fs::write(&file, &text).expect("write config");
        let shared = Shared::new(Arc::new(config(&text)));
        shared.set_config_path(&file);
        (dir, file, text, shared)
    }

    #[test]
    fn an_undo_with_an_unreadable_file_changes_nothing() {
        let (dir, file, text, shared) = shared_on_file("undo-invalid");
        shared.drain("shard-b").expect("drain");
        shared.evacuate("shard-c").expect("evacuate");
        std::fs::write(&file, text.replace("role = \"shard\"", "rol = \"shard\"")).expect("write");
        let e = shared.undrain("shard-b").expect_err("the file is invalid");
        assert!(e.contains("stays drained"), "{e}");
        let e = shared
            .unevacuate("shard-c")
            .expect_err("the file is invalid");
        assert!(e.contains("stays evacuated"), "{e}");
        assert!(shared.drained_at_run_time("shard-b"));
        assert!(shared.evacuated_at_run_time("shard-c"));
        assert!(dir.join("evacuate-shard-c").exists(), "the marker stays");
        // Once the file is fixed, the undo goes through.
        std::fs::write(&file, &text).expect("write");
        shared.undrain("shard-b").expect("undrain");
        shared.unevacuate("shard-c").expect("unevacuate");
        let c = shared.config();
        assert!(!c.cluster("shard-b").unwrap().drain && !c.cluster("shard-c").unwrap().drain);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_removed_cluster_comes_back_without_its_run_time_drain_or_evacuation() {
        let (dir, file, text, shared) = shared_on_file("readd");
        shared.drain("shard-b").expect("drain");
        shared.evacuate("shard-c").expect("evacuate");
        assert!(dir.join("evacuate-shard-c").exists());
        std::fs::write(&file, BASE.replace("shard-b", "shard-x")).expect("write");
        shared.reload().expect("both removed");
        assert!(!shared.drained_at_run_time("shard-b"));
        assert!(!shared.evacuated_at_run_time("shard-c"));
        assert!(
            !dir.join("evacuate-shard-c").exists(),
            "its marker went with it"
        );
        std::fs::write(&file, &text).expect("write");
        shared.reload().expect("both added back");
        let c = shared.config();
        assert!(
            !c.cluster("shard-b").unwrap().drain,
            "shard-b takes publishes"
        );
        assert!(
            !c.cluster("shard-c").unwrap().evacuate,
            "shard-c is not evacuated"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reload_that_would_drain_every_shard_with_the_run_time_drains_is_refused() {
        let (dir, file, text, shared) = shared_on_file("all-drained");
        shared.drain("shard-a").expect("drain");
        shared.drain("shard-b").expect("drain");
        let before = shared.config();
        std::fs::write(&file, format!("{}drain = true\n", text)).expect("write");
        let refused = shared
            .reload()
            .expect_err("no shard cluster would take publishes");
        assert!(!refused.ok);
        assert!(
            refused
                .message
                .contains("every shard cluster would be drained")
                && refused.message.contains("shard-a, shard-b"),
            "{}",
            refused.message
        );
        assert!(Arc::ptr_eq(&before, &shared.config()), "nothing applied");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An undrain reads the file as a reload does, and is refused as that reload would be.
    #[test]
    fn an_undrain_whose_file_would_drain_every_shard_is_refused() {
        let (dir, file, text, shared) = shared_on_file("undrain-all-drained");
        shared.drain("shard-a").expect("drain");
        shared.drain("shard-c").expect("drain");
        // The file now drains shard-a and shard-b; shard-c stays drained at run time.
        let edited = text.replacen(
            "nodes = [\"127.0.0.1:5711\"]\n",
            "nodes = [\"127.0.0.1:5711\"]\ndrain = true\n",
            1,
        );
        let edited = edited.replacen(
            "nodes = [\"127.0.0.1:5701\"]\n",
            "nodes = [\"127.0.0.1:5701\"]\ndrain = true\n",
            1,
        );
        std::fs::write(&file, edited).expect("write");
        let e = shared
            .undrain("shard-a")
            .expect_err("no shard cluster would take publishes");
        assert!(
            e.contains("every shard cluster would be drained") && e.contains("stays drained"),
            "{e}"
        );
        assert!(shared.drained_at_run_time("shard-a"), "the drain stays");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
