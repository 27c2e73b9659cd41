//! The session's links over their lifetime: opened after a reload or a failover (the client's
//! topology, channels and consumers replayed first), read in the session's own loop, declared
//! dead on a socket error or missed heartbeats (everything that depended on them released so the
//! client sees no error), retired once a removed cluster is quiet.

use super::joining::{self, Joining};
use super::vanished::{Asker, Verdict};
use super::*;
use crate::topology::Name;

/// How long after its links were last left unread a link's death counts as caused by it (see
/// [`Session::starved_link_lost`]): the death is seen at the first read once the client reads
/// again, within milliseconds.
const STARVED_GRACE: Duration = Duration::from_secs(2);

impl Session {
    /// Applies a reloaded configuration: weights and drains take effect for the next publish,
    /// removed clusters drain, added shard clusters get a link with this client's state.
    pub(super) fn apply_config(&mut self, config: &Config) {
        if self.rules != config.routing {
            // Rule indices may mean other rules now: channels pick their cluster again.
            for c in self.channels.iter_mut().flatten() {
                c.sticky.clear();
            }
        }
        self.rules = config.routing.clone();
        self.last_route = None;
        let control = self.control;
        for (i, slot) in self.links.iter_mut().enumerate() {
            if slot.done() {
                continue;
            }
            match config.cluster(&slot.link.cluster) {
                Some(c) => {
                    slot.weight = c.weight;
                    slot.drain = c.drain;
                    slot.removed_at = None;
                }
                // This connection's control cluster left the configuration: like a change of
                // which cluster is the control cluster, it applies to new connections, and this
                // one keeps its control link until it reconnects. Draining it would leave the
                // connection's control traffic (replies, events, remote control) nowhere to go:
                // nothing else takes it for a connection already set up. If the link is lost
                // later, the client is closed so that it reconnects to the current one.
                None if control == Some(i) => {
                    debug!(conn = self.id, cluster = %slot.link.cluster, "control cluster removed from the configuration; this connection keeps its control link until it reconnects");
                }
                None => {
                    if slot.removed_at.is_none() {
                        info!(conn = self.id, cluster = %slot.link.cluster, "cluster removed: draining its link");
                        slot.removed_at = Some(Instant::now());
                        slot.last_delivery = Instant::now();
                    }
                    slot.drain = true;
                }
            }
        }
        for cluster in config.shard_clusters() {
            if self.lazy {
                // Opened when this connection first needs the shard clusters.
                break;
            }
            let have = self
                .links
                .iter()
                .any(|s| !s.done() && *s.link.cluster == *cluster.name);
            if have || self.connecting.contains(&cluster.name) {
                continue;
            }
            if self.links.len() >= LinkSet::CAPACITY && !self.links.iter().any(|s| s.done()) {
                warn!(conn = self.id, cluster = %cluster.name, "too many links in this session; not adding");
                continue;
            }
            self.spawn_connect(cluster);
        }
    }

    /// A link to an added cluster is open: replay what this client set up, then let publishes
    /// go there (see [`LinkSlot::ready`]).
    pub(super) fn on_opened(&mut self, opened: Opened) {
        self.connecting.retain(|c| *c != opened.cluster.name);
        let link = match opened.result {
            Ok(link) => link,
            Err(e) => {
                if self
                    .shared
                    .report_once(&opened.cluster.name, "cannot open a link")
                {
                    warn!(conn = self.id, cluster = %opened.cluster.name, error = %e, "cannot open a link to the cluster; will retry (one line per cluster every 10 s; others at debug)");
                } else {
                    debug!(conn = self.id, cluster = %opened.cluster.name, error = %e, "cannot open a link to the cluster; will retry");
                }
                self.metrics
                    .cluster(&opened.cluster.name)
                    .link_failures
                    .inc();
                self.backoff(&opened.cluster.name);
                if let Some(r) = self.retry_at.get_mut(&opened.cluster.name) {
                    r.last_error = Some(e.to_string());
                }
                return;
            }
        };
        let c = opened.cluster;
        if self.closing.is_some() || self.shared.config().cluster(&c.name).is_none() {
            // Closing, or the cluster was removed while connecting: drop the link.
            return;
        }
        self.retry_at.remove(&c.name);
        let woken = take_name(&mut self.woken, &c.name);
        // The whole shared topology for a cluster new to this connection (added by a reload,
        // or away since it connected) or one that may lack any of it; otherwise only what the
        // cluster missed is applied (`replay_topology`).
        let shared = (!woken && !self.links.iter().any(|s| *s.link.cluster == *c.name))
            || self.shared.lacks_shared_topology(&self.vhost, &c.name);
        let after_idle = take_name(&mut self.reopened_idle, &c.name);
        // What this client changed while the cluster was away is applied after the check of
        // what it kept (see `replay_topology`); only past the log's bound is everything
        // declared again.
        let missed_too_much = self
            .stale_topology
            .get(&*c.name)
            .is_some_and(|m| m.overflowed);
        let plan = TopologyPlan {
            shared,
            declare: shared || woken || missed_too_much,
            check: !after_idle,
        };
        self.admit(link, c, plan, shared || missed_too_much);
    }

    /// Lets a link opened to cluster `c` join the connection under `plan`, first asking the
    /// serving clusters about the names its replay would declare (all of the records under
    /// `plan` when `records`, and the changes the cluster missed) that a cluster may have lost
    /// unseen (see `joining.rs`).
    pub(super) fn admit(
        &mut self,
        link: Link,
        c: crate::config::ClusterConfig,
        plan: TopologyPlan,
        records: bool,
    ) {
        if self.links.iter().any(LinkSlot::serving) {
            let names = self.unvouched_names(&c.name, plan, records);
            if !names.is_empty() {
                // The checks serve the client's first open channel, which the replay goes on;
                // any number does before one is open.
                let ch = self.open_channels().first().copied().unwrap_or(0);
                self.hold_back(link, c, plan, names, ch);
                return;
            }
        }
        self.join(link, c, plan, Vec::new());
    }

    /// The names `cluster`'s replay would declare (what it may lack of the records under
    /// `plan`, when `records`, and the changes it missed) that a cluster may have lost unseen
    /// (see `joining.rs`).
    fn unvouched_names(&self, cluster: &str, plan: TopologyPlan, records: bool) -> Vec<Name> {
        let (mut names, mut seen) = (Vec::new(), std::collections::HashSet::new());
        let consumed = |q: &ShortStr| self.consumes(q);
        if plan.declare && records {
            if plan.shared {
                self.shared.with_topology(&self.vhost, |t| {
                    let declares = t.entries().map(|(_, m)| m);
                    joining::add_unvouched(&mut names, &mut seen, declares, consumed);
                });
            }
            let own = self.topology.entries().map(|(_, m)| m);
            joining::add_unvouched(&mut names, &mut seen, own, consumed);
        }
        if let Some(missed) = self.stale_topology.get(cluster) {
            joining::add_unvouched(&mut names, &mut seen, missed.methods.iter(), consumed);
        }
        if !plan.shared {
            self.shared.with_missed(&self.vhost, cluster, |m| {
                joining::add_unvouched(&mut names, &mut seen, m.methods.iter(), consumed);
            });
        }
        names
    }

    /// Holds `link` back from joining until the serving clusters say which of `names` they
    /// still have (see `joining.rs`); its cluster counts as connecting until then.
    fn hold_back(
        &mut self,
        link: Link,
        cluster: crate::config::ClusterConfig,
        plan: TopologyPlan,
        names: Vec<Name>,
        ch: u16,
    ) {
        self.next_join += 1;
        let id = self.next_join;
        debug!(conn = self.id, cluster = %cluster.name, names = names.len(), "link opened; asking the other clusters whether what its replay would declare still exists");
        self.connecting.push(cluster.name.clone());
        self.joining.push(Joining {
            id,
            link,
            cluster,
            plan,
            waiting: names.len(),
            gone: Vec::new(),
        });
        for name in names {
            self.replay_checks.start(Asker::Join(id), ch, name.check());
        }
        self.send_replay_checks();
    }

    /// What the serving clusters said of a name joining link `join`'s replay would declare:
    /// gone from all of them, it is forgotten; once every name is answered, the link joins.
    fn join_verdict(&mut self, join: u64, check: &Method, verdict: Verdict) {
        let Some(at) = self.joining.iter().position(|j| j.id == join) else {
            return;
        };
        let gone = match Name::checked_by(check) {
            Some(name) if verdict == Verdict::GoneEverywhere => Some(name),
            _ => None,
        };
        if let Some(name) = &gone {
            info!(conn = self.id, cluster = %self.joining[at].cluster.name, "{name} is gone from every cluster (deleted, expired or auto-deleted): forgotten, not declared again on a cluster joining the connection");
            // Recording the deletion touches no joining link's place in the list.
            self.forget(name);
        }
        if self.joining[at].answered(gone) {
            let j = self.joining.swap_remove(at);
            self.connecting.retain(|c| *c != j.cluster.name);
            self.join(j.link, j.cluster, j.plan, j.gone);
        }
    }

    /// Forgets `name`, gone from every cluster, from this client's and the vhost's records,
    /// as one broker's client would never know it was there.
    fn forget(&mut self, name: &Name) {
        let deletion = name.deletion();
        let class = self
            .topology
            .entries()
            .find(|(_, m)| Name::checked_by(m).as_ref() == Some(name))
            .map_or(Class::Sharded, |(c, _)| *c);
        self.record_topology(class, deletion);
    }

    /// The client's channels that are open or opening, by number.
    fn open_channels(&self) -> Vec<u16> {
        self.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.as_ref()
                    .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening))
            })
            .map(|(i, _)| i as u16)
            .collect()
    }

    /// A link opened to cluster `c` joins the connection: it replays this client's topology
    /// (under `plan`, leaving out the changes that name something `gone`; on the first channel
    /// the client opens if none is open yet), channels and consumers, then takes its share of
    /// publishes.
    fn join(
        &mut self,
        link: Link,
        c: crate::config::ClusterConfig,
        plan: TopologyPlan,
        gone: Vec<Name>,
    ) {
        if self.closing.is_some() || self.shared.config().cluster(&c.name).is_none() {
            // Closing, or the cluster was removed while its link waited: drop the link.
            return;
        }
        if let Some(queue) = self.single_active_consumer_queue() {
            // Subscribed on this cluster now, the consumer would come after the other
            // connections' there but before them elsewhere: two consumers could be active at
            // once. Subscribing again through every cluster puts it in one order everywhere.
            let text = format!(
                "cluster {} joined this connection's clusters while it consumes \
                 single-active-consumer queue '{}', whose consumers every cluster must \
                 register in one order: reconnect to subscribe again",
                c.name, queue
            );
            warn!(conn = self.id, cluster = %c.name, "{text}; closing the client connection");
            self.begin_proxy_close(ConnError::new(ReplyCode::ConnectionForced, &text), &text);
            return;
        }
        let mut slot = LinkSlot::new(
            link,
            c.role,
            c.weight,
            c.drain,
            self.metrics.cluster(&c.name),
        );
        let needs_topology = !self.topology.is_empty()
            || self.stale_topology.contains_key(&*c.name)
            || self.shared.is_stale(&self.vhost, &c.name)
            || (plan.shared
                && self
                    .shared
                    .with_topology(&self.vhost, |t| t.has(Class::Sharded))
                    .unwrap_or(false));
        slot.start_replay(needs_topology.then_some(plan));
        slot.left_out = gone;
        // Reuse the slot of this cluster's dead link (link ids must stay below
        // LinkSet::CAPACITY), as the next generation: what still remembers the dead link (a
        // delivery's tag) never reaches this one.
        let index = match self
            .links
            .iter()
            .position(|s| s.done() && *s.link.cluster == *c.name)
        {
            Some(i) => {
                slot.generation = self.links[i].generation.wrapping_add(1);
                self.links[i] = slot;
                i
            }
            None => {
                self.links.push(slot);
                self.links.len() - 1
            }
        };
        if c.role == Role::Control {
            self.control = Some(index);
        }
        info!(conn = self.id, cluster = %c.name, node = %self.links[index].link.node, "link opened; replaying this client's topology, channels and consumers");

        let open = self.open_channels();
        for &ch in &open {
            self.links[index].open(ch, Pending::Replay);
            let Some(channel) = self.channels[usize::from(ch)].as_ref() else {
                continue;
            };
            let (tx, confirm, qos) = (
                channel.tx,
                channel.confirms.is_some(),
                channel.qos.settings(),
            );
            if tx {
                self.links[index].replay(ch, &Method::TxSelect(Default::default()));
            }
            if confirm {
                self.links[index].chan(ch).confirm_mode = true;
                self.links[index].replay(
                    ch,
                    &Method::ConfirmSelect(codec::ConfirmSelect { nowait: false }),
                );
            }
            for q in qos {
                // The split changed for every shard link; existing links get their new share too.
                self.send_qos(ch, &q, Pending::Internal, Some(index));
            }
        }
        let (declared, topology_ch) = match open.first() {
            Some(&ch) => (self.replay_topology(index, ch, plan), ch),
            None => (Vec::new(), 0),
        };
        // Topology changes still waiting for the other clusters' replies are recorded only
        // once complete, after this replay was built: they go to the new link too.
        for &ch in &open {
            let Some(channel) = self.channels[usize::from(ch)].as_ref() else {
                continue;
            };
            let in_flight: Vec<Method> = channel
                .rpcs
                .iter()
                .filter_map(|r| r.on_success.as_ref().map(|(_, m)| m.clone()))
                .collect();
            for m in &in_flight {
                self.links[index].replay(ch, m);
            }
        }
        for &ch in &open {
            let Some(channel) = self.channels[usize::from(ch)].as_mut() else {
                continue;
            };
            // Each consumer with the per-consumer prefetch it started under (a broker keeps
            // that limit for it when the setting changes later), then the setting in force
            // again for consumers still to come.
            let mut requests = Vec::new();
            let mut redeclared: Vec<&ShortStr> = Vec::new();
            for consumer in &mut channel.consumers {
                if let Some(req) = &consumer.request {
                    consumer.links.insert(index);
                    // Its queue declared again by the replay on another channel: declared on
                    // this one first, so the consume cannot reach the cluster before it.
                    if ch != topology_ch
                        && !redeclared.contains(&&req.queue)
                        && let Some(q) = declared.iter().find(|q| q.queue == req.queue)
                    {
                        redeclared.push(&q.queue);
                        let declare = Method::QueueDeclare(codec::QueueDeclare {
                            nowait: false,
                            ..q.clone()
                        });
                        requests.push((None, declare));
                    }
                    let consume = Method::BasicConsume(codec::BasicConsume {
                        nowait: false,
                        ..req.clone()
                    });
                    requests.push((Some(consumer.prefetch.clone()), consume));
                }
            }
            let now = channel.qos.per_consumer().cloned();
            let unlimited = || codec::BasicQos::default();
            let mut in_force = now.clone();
            for (prefetch, request) in requests {
                // `None`: a declare ahead of a consume, under no prefetch of its own.
                if let Some(prefetch) = prefetch
                    && prefetch != in_force
                {
                    let q = prefetch.clone().unwrap_or_else(unlimited);
                    let m = self.qos_share(ch, index, &q);
                    self.links[index].replay(ch, &m);
                    in_force = prefetch;
                }
                self.links[index].replay(ch, &request);
            }
            if in_force != now {
                let q = now.unwrap_or_else(unlimited);
                let m = self.qos_share(ch, index, &q);
                self.links[index].replay(ch, &m);
            }
        }
        self.resend_orphans(index);
        if self.links[index].settle_replay() {
            self.unpark();
        }
    }

    /// Starts opening a link to `cluster` in the background; [`on_opened`](Self::on_opened)
    /// gets the result.
    pub(super) fn spawn_connect(&mut self, cluster: &crate::config::ClusterConfig) {
        self.connecting.push(cluster.name.clone());
        let spec = LinkSpec {
            cluster: Arc::from(cluster.name.as_str()),
            nodes: cluster.link_nodes(self.id),
            metrics: Some(self.metrics.cluster(&cluster.name)),
            tls: cluster.tls.clone(),
            ..self.base_spec.clone()
        };
        let (opened, cluster) = (self.opened_tx.clone(), cluster.clone());
        tokio::spawn(async move {
            let result = upstream::link::connect(&spec).await;
            let _ = opened.send(Opened { cluster, result }).await;
        });
    }

    /// Reopens links to configured clusters that have none (a failover, a cluster back from an
    /// outage), each cluster with its own exponential backoff and jitter so a fleet of
    /// sessions does not reconnect in lockstep.
    pub(super) fn ensure_links(&mut self) {
        if self.closing.is_some() {
            return;
        }
        let config = self.shared.config();
        let now = Instant::now();
        for cluster in &config.clusters {
            if self.lazy && cluster.role == Role::Shard {
                continue;
            }
            let live = self.has_live_link(&cluster.name);
            if live || self.connecting.contains(&cluster.name) {
                continue;
            }
            if self.links.len() >= LinkSet::CAPACITY && !self.links.iter().any(|s| s.done()) {
                continue;
            }
            if let Some(retry) = self.retry_at.get_mut(&cluster.name)
                && retry.at > now
            {
                let back = self.shared.nodes_back(&cluster.name);
                if back != retry.nodes_back {
                    // A node of the cluster is back: retry soon, spread by connection over a
                    // window that keeps the whole proxy under RECONNECTS_PER_SEC.
                    retry.nodes_back = back;
                    let conns = self.metrics.connections.get().max(1) as u64;
                    let window_ms = (conns * 1000 / RECONNECTS_PER_SEC).max(1000);
                    retry.at = now + Duration::from_millis(self.id.wrapping_mul(7919) % window_ms);
                }
                continue;
            }
            self.spawn_connect(cluster);
        }
    }

    /// The connection needs the shard clusters for the first time (`cmd` is the first command
    /// that does): open a link to every cluster that has none, and keep `cmd`, and the client's
    /// input behind it, until they are open and replayed
    /// ([`run_deferred_when_linked`](Self::run_deferred_when_linked)). Until then the client
    /// has talked only to the control cluster, so nothing it did is missing elsewhere but its
    /// control-cluster declares, which the replay brings.
    pub(super) fn wake_shard_links(&mut self, cmd: Command) {
        self.lazy = false;
        let config = self.shared.config();
        for cluster in &config.clusters {
            let have = self.has_live_link(&cluster.name);
            if have || self.connecting.contains(&cluster.name) {
                continue;
            }
            // A cluster this connection had a link to (closed when idle) kept what the link
            // declared: its replay declares nothing (see `TopologyPlan::check`). A new one gets
            // the declares.
            if self.links.iter().any(|s| *s.link.cluster == *cluster.name) {
                self.reopened_idle.push(cluster.name.clone());
            } else {
                self.woken.push(cluster.name.clone());
            }
            self.spawn_connect(cluster);
        }
        debug!(
            conn = self.id,
            method = cmd.method.name(),
            "first request for the shard clusters: opening their links"
        );
        self.deferred = Some((cmd, Instant::now()));
    }

    /// Runs the command [`wake_shard_links`](Self::wake_shard_links) kept, once every configured
    /// cluster has a replayed link or its attempt failed (as at connection.open, an unreachable
    /// cluster is left for later), or after two connect timeouts at most.
    pub(super) fn run_deferred_when_linked(&mut self) {
        let Some((_, since)) = &self.deferred else {
            return;
        };
        let config = self.shared.config();
        let overdue = since.elapsed() >= Duration::from_millis(config.timeouts.connect_ms) * 2;
        let settled = config.clusters.iter().all(|c| {
            match self
                .links
                .iter()
                .find(|s| s.live() && *s.link.cluster == *c.name)
            {
                Some(slot) => slot.serving(),
                None => !self.connecting.contains(&c.name),
            }
        });
        if !settled && !overdue {
            return;
        }
        if let Some((cmd, _)) = self.deferred.take()
            && let Err(e) = self.on_client_command(cmd)
        {
            self.protocol_error(e);
        }
        if self.deferred.is_none() {
            // The command ran (or was refused) without waiting again: a later wait starts anew.
            self.tx_wait_since = None;
        }
    }

    pub(super) fn backoff(&mut self, cluster: &str) {
        let failures = self
            .retry_at
            .get(cluster)
            .map_or(0, |r| r.failures)
            .saturating_add(1);
        let now = Instant::now();
        let down_since = self.retry_at.get(cluster).map_or(now, |r| r.down_since);
        let retry = Retry {
            at: now + RECONNECT.after(failures),
            failures,
            nodes_back: self.shared.nodes_back(cluster),
            last_error: None,
            down_since,
        };
        self.retry_at.insert(cluster.to_owned(), retry);
    }

    /// Declares this client's topology again on `link`; on a cluster that may lack it, first the
    /// proxy's shared topology of the vhost (declared by any client, maybe long gone), so no
    /// publish routed there finds its queue missing.
    ///
    /// Returns the queue declares it sent (not the passive checks): a consumer replayed on
    /// another channel must follow its queue's declare, and AMQP orders nothing between
    /// channels, so the consumer's channel gets the declare too.
    pub(super) fn replay_topology(
        &mut self,
        link: LinkId,
        ch: u16,
        plan: TopologyPlan,
    ) -> Vec<codec::QueueDeclare> {
        let mut declared = Vec::new();
        let gone = std::mem::take(&mut self.links[link].left_out);
        let cluster = self.links[link].link.cluster.clone();
        let mut methods: Vec<Method> = Vec::new();
        // What the vhost's clients changed while the cluster was away, applied after this
        // client's own part, unless the whole shared topology is declared anyway.
        let shared_missed = self.shared.take_stale(&self.vhost, &cluster);
        if plan.shared || shared_missed.is_some() {
            self.links[link].shared_replay = true;
        }
        if plan.shared
            && let Some(shared) = self.shared.with_topology(&self.vhost, |t| {
                t.entries().map(|(_, m)| m.clone()).collect::<Vec<_>>()
            })
        {
            methods.extend(shared);
        }
        // Every cluster carries all of this client's topology (see crate::route).
        methods.extend(self.topology.entries().map(|(_, m)| m.clone()));
        let missed = self.stale_topology.remove(&*cluster).unwrap_or_default();
        for m in &methods {
            if plan.declare {
                if let Method::QueueDeclare(q) = m {
                    declared.push(q.clone());
                }
                self.links[link].replay(ch, m);
                continue;
            }
            if !plan.check {
                break;
            }
            // A failover: the cluster kept its topology; check the parts that can vanish. A
            // queue that went with the old link (exclusive, or auto-delete with this client's
            // consumer on it) but never holds messages there is declared (and bound) again:
            // nothing was lost with it. An auto-delete queue the client no longer consumes did
            // not go with the link: it is checked, like the rest (it may have gone by itself).
            let recreate = |q: &ShortStr| -> bool {
                methods.iter().any(|d| {
                    matches!(d, Method::QueueDeclare(x)
                    if &x.queue == q && (x.exclusive || (x.auto_delete && self.consumes(q))))
                }) && !self.may_hold_messages(q, link)
            };
            match m {
                Method::QueueDeclare(q) if recreate(&q.queue) => {
                    declared.push(q.clone());
                    self.links[link].replay(ch, m);
                    continue;
                }
                Method::QueueBind(b) if recreate(&b.queue) => {
                    self.links[link].replay(ch, m);
                    continue;
                }
                _ => {}
            }
            let check = match m {
                // Declared while the cluster was away: declared there below, not checked.
                Method::QueueDeclare(q) if missed.declares(&q.queue) => continue,
                Method::ExchangeDeclare(x) if missed.declares(&x.exchange) => continue,
                Method::QueueDeclare(q) => Method::QueueDeclare(codec::QueueDeclare {
                    passive: true,
                    nowait: false,
                    ..q.clone()
                }),
                Method::ExchangeDeclare(x) => Method::ExchangeDeclare(codec::ExchangeDeclare {
                    passive: true,
                    nowait: false,
                    ..x.clone()
                }),
                _ => continue,
            };
            // On a channel of warren's own, so a missing name closes that channel only and the
            // other clusters can be asked whether it went everywhere (see `vanished.rs`). The
            // link is replaying until it is answered, sent now or in its turn.
            self.links[link].expect_replay_reply();
            self.replay_checks
                .start(Asker::Replay(self.link_ref(link)), ch, check);
        }
        // Then what the cluster missed, in the order it was done: removals included, which
        // declaring the record could never bring there. The vhost's log first: this client's
        // own changes are in it too, and its own log ends where its record does.
        let shared_log = shared_missed
            .filter(|_| !plan.shared)
            .map(|m| m.methods)
            .unwrap_or_default();
        for m in shared_log.iter().chain(&missed.methods) {
            if Joining::leaves_out(&gone, m) {
                continue;
            }
            if let Method::QueueDeclare(q) = m {
                declared.push(q.clone());
            }
            self.links[link].replay(ch, m);
        }
        self.send_replay_checks();
        self.links[link].topology_sent();
        declared
    }

    /// Sends the replay checks whose turn has come (see `vanished.rs`). One whose link died
    /// is dropped (the next link checks again); one that finds no free channel number goes on
    /// the client's channel, where a refusal closes the client as before.
    pub(super) fn send_replay_checks(&mut self) {
        while let Some((id, check)) = self.replay_checks.next_to_send() {
            let (asker, ch, method) = (check.asker, check.ch, check.method.clone());
            let link_ref = match asker {
                Asker::Replay(link) => link,
                Asker::Join(join) => {
                    // The joining cluster lacks the name by definition: ask the others.
                    let mut probes = 0;
                    for other in 0..self.links.len() {
                        if self.links[other].serving()
                            && self.own_channel_request(other, ch, &method, Pending::Probe(id))
                        {
                            probes += 1;
                        }
                    }
                    let code = ReplyCode::NotFound.code();
                    let verdict = self.replay_checks.refused(id, code, String::new(), probes);
                    if verdict != Verdict::Waiting
                        && let Some(check) = self.replay_checks.take(id)
                    {
                        self.join_verdict(join, &check.method, verdict);
                    }
                    continue;
                }
            };
            let Some(link) = self.live_link(link_ref) else {
                self.replay_checks.take(id);
                continue;
            };
            if !self.own_channel_request(link, ch, &method, Pending::ReplayCheck(id)) {
                self.replay_checks.take(id);
                self.links[link].request(ch, &method, Pending::Replay);
            }
        }
    }

    /// The slot of `link` while it still holds that link and the link is live.
    fn live_link(&self, link: LinkRef) -> Option<LinkId> {
        slot_of(&self.links, link).filter(|s| s.live())?;
        link.slot()
    }

    /// Whether the client has a consumer on `queue` (one it has not cancelled).
    fn consumes(&self, queue: &ShortStr) -> bool {
        self.channels.iter().flatten().any(|c| {
            c.consumers
                .iter()
                .any(|k| k.request.as_ref().is_some_and(|r| &r.queue == queue))
        })
    }

    /// A replay check on `link` passed: the cluster kept the name.
    pub(super) fn replay_check_passed(&mut self, link: LinkId, id: u64) {
        if self.replay_checks.passed(id).is_some() {
            self.replayed_one(link);
        }
        self.send_replay_checks();
    }

    /// One replayed request of `link` was answered.
    pub(super) fn replayed_one(&mut self, link: LinkId) {
        let slot = &mut self.links[link];
        if slot.replay_answered() {
            info!(conn = self.id, cluster = %slot.link.cluster, "link ready: this client's topology, channels and consumers replayed");
            self.unpark();
        }
    }

    /// `link`'s cluster refused replay check `id` (a passive declare, on warren's own channel
    /// `owner` serves): a missing name is asked of the other clusters whose links are serving
    /// (they kept the client's topology), to tell a name gone everywhere from one lost here.
    pub(super) fn replay_check_refused(
        &mut self,
        link: LinkId,
        owner: u16,
        id: u64,
        close: &codec::ChannelClose,
    ) {
        let Some(check) = self.replay_checks.get(id) else {
            return;
        };
        let method = check.method.clone();
        let mut probes = 0;
        if close.reply_code == ReplyCode::NotFound.code() {
            for other in 0..self.links.len() {
                if other == link || !self.links[other].serving() {
                    continue;
                }
                if self.own_channel_request(other, owner, &method, Pending::Probe(id)) {
                    probes += 1;
                }
            }
        }
        let text = close.reply_text.as_str().into_owned();
        let verdict = self
            .replay_checks
            .refused(id, close.reply_code, text, probes);
        self.replay_verdict(id, verdict);
    }

    /// Another cluster answered the probe of replay check `id`: it has the name, or not.
    pub(super) fn probe_answered(&mut self, id: u64, exists: bool) {
        let verdict = self.replay_checks.probe_answered(id, exists);
        self.replay_verdict(id, verdict);
    }

    /// Acts on what the clusters said of a name a failed-over link's cluster no longer has:
    /// gone from every cluster, it is forgotten as one broker's client would never know; lost
    /// on that cluster only, the client is closed with 320 saying why.
    fn replay_verdict(&mut self, id: u64, verdict: Verdict) {
        if verdict == Verdict::Waiting {
            return;
        }
        let Some(check) = self.replay_checks.take(id) else {
            return;
        };
        let link_ref = match check.asker {
            Asker::Replay(link) => link,
            Asker::Join(join) => {
                self.join_verdict(join, &check.method, verdict);
                self.send_replay_checks();
                return;
            }
        };
        self.send_replay_checks();
        // The link that asked may have died meanwhile: its replacement checks again.
        let Some(link) = self.live_link(link_ref) else {
            return;
        };
        let cluster = self.links[link].link.cluster.clone();
        let Some(what) = Name::checked_by(&check.method) else {
            return;
        };
        if verdict == Verdict::GoneEverywhere {
            // Deleted by another client, expired, or auto-deleted: as on one broker, the client
            // learns of it when it next uses the name (the clusters' own 404).
            info!(conn = self.id, %cluster, "{what} of this client is gone from every cluster (deleted, expired or auto-deleted) while the link failed over: forgotten, not declared again");
            self.forget(&what);
            self.replayed_one(link);
            return;
        }
        let (code, reason) = check.refusal.unwrap_or_default();
        let text = format!(
            "link to cluster {cluster} failed over and the client's state is gone there: {what} \
             is missing on that cluster only ({code} {reason})"
        );
        warn!(conn = self.id, %cluster, "{text}; closing the client connection");
        self.begin_proxy_close(ConnError::new(ReplyCode::ConnectionForced, &text), &text);
    }

    /// Closes the links of removed clusters once nothing is in flight on them and their
    /// consumers have been quiet for a while (their queues are drained), or at the deadline.
    pub(super) fn retire_quiet_links(&mut self) {
        let deadline = Duration::from_secs(self.shared.config().timeouts.drain_deadline_secs);
        for i in 0..self.links.len() {
            let slot = &self.links[i];
            if slot.removed_at.is_none() || !slot.live() {
                continue;
            }
            // Acked in a transaction not yet committed counts: the broker applies those acks
            // at the commit, and would requeue the messages if the link closed before it.
            let unacked: usize = self
                .channels
                .iter()
                .flatten()
                .map(|c| c.tags.held_from(LinkRef::new(i, slot.generation)))
                .sum();
            let pending: usize = slot
                .chans
                .iter()
                .map(|c| c.confirms.pending() + c.pending.len())
                .sum();
            let quiet = slot.last_delivery.elapsed() >= RETIRE_QUIET;
            let overdue = slot.removed_at.is_some_and(|t| t.elapsed() >= deadline);
            if overdue && unacked > 0 {
                // Its broker would requeue them while the client keeps its copies, to be
                // consumed again from that cluster or wherever it is evacuated to: the client
                // is closed instead, as in a failover (see `state_lost_with`).
                let text = format!(
                    "cluster {} removed from the proxy configuration; the client holds {unacked} \
                     unacknowledged deliveries from it after the drain deadline: reconnect and \
                     drop them",
                    slot.link.cluster
                );
                warn!(conn = self.id, cluster = %slot.link.cluster, "{text}; closing the client connection");
                self.begin_proxy_close(ConnError::new(ReplyCode::ConnectionForced, &text), &text);
                return;
            }
            if (unacked == 0 && pending == 0 && quiet) || overdue {
                info!(conn = self.id, cluster = %slot.link.cluster, unacked, overdue, "closing the link of a removed cluster");
                self.links[i].retire(&connection_close(
                    200,
                    "cluster removed from the proxy configuration",
                ));
                let gone = self.link_ref(i);
                for channel in self.channels.iter_mut().flatten() {
                    channel.tags.forget_link(gone);
                    for consumer in &mut channel.consumers {
                        consumer.links.remove(i);
                    }
                }
            }
        }
    }

    /// Closes the shard-cluster links of a connection that has not used them, nor kept any of
    /// its state on them, for `limits.idle_link_secs`: it goes back to its control-cluster link
    /// alone, as at connection.open with `lazy_links`, and its next request that needs the shard
    /// clusters opens their links again (`wake_shard_links`). Their replay then only checks the
    /// queues and exchanges the connection declared (unless it declared more meanwhile), so
    /// nothing another client deleted is re-created.
    pub(super) fn close_idle_shard_links(&mut self) {
        let config = self.shared.config();
        let secs = config.limits.idle_link_secs;
        if secs == 0 || !config.limits.lazy_links || self.lazy || !self.shard_links_stateless() {
            self.idle = None;
            return;
        }
        let sent: u64 = self
            .links
            .iter()
            .filter(|s| s.role == Role::Shard && !s.done())
            .map(|s| s.sent.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let now = Instant::now();
        match self.idle {
            Some((seen, since)) if seen == sent => {
                if now.duration_since(since) < Duration::from_secs(secs) {
                    return;
                }
            }
            _ => {
                self.idle = Some((sent, now));
                return;
            }
        }
        self.idle = None;
        info!(
            conn = self.id,
            idle_secs = secs,
            "shard-cluster links unused: closing them until the connection needs them again"
        );
        let close = connection_close(200, "idle link closed by warren");
        for slot in &mut self.links {
            if slot.role == Role::Shard && slot.live() {
                // Nothing is pending on them (checked above): forget the channels, so a
                // channel.close from the client does not wait for this link.
                slot.chans.clear();
                slot.retire(&close);
            }
        }
        self.lazy = true;
    }

    /// Whether the shard links carry nothing of this connection that closing them would lose
    /// or make wait: every configured shard cluster has a serving link, no consumer, delivery,
    /// publish, transaction or request depends on them, and no exclusive or auto-delete queue
    /// (which RabbitMQ deletes with the link) was declared.
    fn shard_links_stateless(&self) -> bool {
        let control_live = self.control.is_some_and(|c| self.links[c].live());
        let quiet_session = control_live
            && self.closing.is_none()
            && self.deferred.is_none()
            && self.eof_drain.is_none()
            && self.parked.is_empty()
            && self.orphans.is_empty()
            && self.connecting.is_empty()
            && self.tx_swaps == 0
            && !self.reopen_wait
            && self.input_waits_for.is_none()
            && !self.in_turn_holds()
            && !self.barrier_holds();
        if !quiet_session {
            return false;
        }
        let shard_clusters = self.shared.config().shard_clusters().count();
        let serving = self
            .links
            .iter()
            .filter(|s| s.role == Role::Shard && s.live())
            .map(|s| {
                s.serving()
                    && s.chans.iter().all(|u| {
                        u.pending.is_empty() && u.confirms.pending() == 0 && u.reopen.is_none()
                    })
            })
            .collect::<Vec<bool>>();
        if serving.len() != shard_clusters || serving.contains(&false) {
            return false;
        }
        let channels_quiet = self.channels.iter().flatten().all(|c| {
            c.consumers.is_empty() && c.tags.outstanding() == 0 && !c.tx && c.rpcs.is_empty()
        });
        let bound_to_link = self
            .topology
            .entries()
            .any(|(_, m)| matches!(m, Method::QueueDeclare(q) if q.exclusive || q.auto_delete));
        channels_quiet && !bound_to_link
    }

    /// A link's socket gave bytes (or ended): handle every whole command they complete.
    pub(super) fn on_link_readable(&mut self, link: LinkId, read: Result<(), LinkDown>) {
        if let Err(reason) = read {
            return self.on_link_down(link, reason);
        }
        while self.end.is_none() {
            if self.fast_lane(link) {
                continue;
            }
            let Some(reader) = self.links[link].link.reader.as_mut() else {
                return;
            };
            match reader.next_command() {
                Ok(Some(cmd)) => self.on_link_command(link, cmd),
                Ok(None) => return,
                Err(reason) => return self.on_link_down(link, reason),
            }
        }
    }

    /// Polls the links' sockets, starting after the one read last so none starves the others.
    pub(super) fn poll_links(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<(LinkId, Result<(), LinkDown>)> {
        let n = self.links.len();
        for i in 0..n {
            let link = (self.next_read + i) % n;
            if let Some(reader) = self.links[link].link.reader.as_mut()
                && let Poll::Ready(r) = reader.poll_read(cx)
            {
                self.next_read = link + 1;
                return Poll::Ready((link, r));
            }
        }
        Poll::Pending
    }

    /// Links silent for two heartbeat intervals are dead (checked when the earliest deadline
    /// passes).
    pub(super) fn check_link_heartbeats(&mut self) {
        let now = Instant::now();
        for link in 0..self.links.len() {
            let missed = self.links[link]
                .link
                .reader
                .as_ref()
                .and_then(|r| r.heartbeat_missed(now));
            if let Some(reason) = missed {
                self.on_link_down(link, reason);
            }
        }
    }

    /// The earliest time a link may have been silent for two heartbeat intervals (an hour away
    /// when no link has heartbeats).
    pub(super) fn next_link_silence(&self) -> tokio::time::Instant {
        let earliest = self
            .links
            .iter()
            .filter_map(|s| s.link.reader.as_ref()?.heartbeat_deadline())
            .min();
        match earliest {
            Some(at) => at,
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Sends what this turn of the event loop wrote, one write per socket. Returns whether
    /// the client's outbox has room, and the outbox of a live link that has none (the first).
    pub(super) fn flush_all(&self) -> (bool, Option<Arc<Outbox>>) {
        let client_room = self.client_out.flush();
        let mut full_link = None;
        for slot in &self.links {
            if !slot.link.outbox.flush() && full_link.is_none() && slot.live() {
                full_link = Some(slot.link.outbox.clone());
            }
        }
        (client_room, full_link)
    }

    pub(super) fn on_link_down(&mut self, link: LinkId, reason: LinkDown) {
        let Some(slot) = self.links.get_mut(link) else {
            return;
        };
        // Whatever it still had to say is moot: stop reading it, and close its socket.
        slot.link.abandon();
        let retiring = slot.retiring();
        let was_done = !slot.mark_done() || retiring;
        if !was_done && self.closing.is_none() {
            slot.m.link_failures.inc();
        }
        match &self.closing {
            Some(Closing::ByClient { .. }) => self.maybe_finish_client_close(),
            Some(Closing::ByProxy { .. }) => self.maybe_tell_client_close(),
            None if was_done => {}
            None => {
                let slot = &self.links[link];
                if self.shared.report_once(&slot.link.cluster, "link lost") {
                    warn!(conn = self.id, cluster = %slot.link.cluster, node = %slot.link.node, %reason, "upstream link lost; failing over (one line per cluster every 10 s; others at debug)");
                } else {
                    debug!(conn = self.id, cluster = %slot.link.cluster, node = %slot.link.node, %reason, "upstream link lost; failing over");
                }
                self.fail_link(link);
            }
        }
    }

    /// Releases everything that depended on a dead link, so the client sees no error: its
    /// unacknowledged deliveries become dead tags (the broker requeues the messages; acks for
    /// the old tags are swallowed), its consumers and pending replies are settled by the other
    /// links, publishes it had not confirmed are nacked to confirm-mode clients. The tick then
    /// reconnects the cluster (the other node, if this one is down) and replays this client's
    /// state on the new link.
    pub(super) fn fail_link(&mut self, link: LinkId) {
        let lost = self.state_lost_with(link);
        let gone = self.link_ref(link);
        let slot = &mut self.links[link];
        slot.mark_done();
        let cluster = slot.link.cluster.to_string();
        let chans = std::mem::take(&mut slot.chans);
        let m = slot.m.clone();
        let mut probes: Vec<u64> = Vec::new();
        let barrier_ch = self.barrier_channel(link);
        let mut barrier_to = None;
        for (ch, up) in chans.into_iter().enumerate() {
            let ch = ch as u16;
            m.confirms_pending.dec_by(up.confirms.pending() as i64);
            let mut up = up;
            let lost = up.confirms.drain();
            if let Some(channel) = self.channel_mut(ch)
                && channel.tx_link == Some(link)
            {
                channel.tx_link = None;
                channel.tx_log.lost =
                    !channel.tx_log.publishes.is_empty() || channel.tx_log.overflowed;
            }
            if let Some(id) = up.tx_swap.take() {
                // A link that replaces this one selects tx when it replays the channel
                // (`channel.tx` is set); the client's request is answered by the others.
                self.tx_swaps -= 1;
                self.settle_dead_rpc(ch, id);
            }
            // A check on warren's own channel belongs to the client channel it serves.
            let owner = up.side_for.unwrap_or(ch);
            for waiting in up.pending {
                match waiting.who {
                    // The next link checks again.
                    Pending::ReplayCheck(id) => drop(self.replay_checks.take(id)),
                    // Unanswered, the name may be there: the safe answer.
                    Pending::Probe(id) => probes.push(id),
                    _ => {}
                }
                // A fence's check is sent again on the link that replaces this one.
                if let Pending::Rpc(id) | Pending::Fence(id) = waiting.who
                    && !self.refuse_commit_in_doubt(owner, link, id)
                    && !self.orphan_rpc(owner, id, &cluster)
                {
                    self.settle_dead_rpc(owner, id);
                }
            }
            // The client's channel.open of this number, waiting here for a close in flight
            // (see `LinkSlot::open`): it is in no reply queue, so it is kept for the next link
            // (which opens the channel) as a request in flight would be, or its open-ok would
            // wait for ever.
            if let Some(Pending::Rpc(id)) = up.reopen
                && !self.orphan_rpc(ch, id, &cluster)
            {
                self.settle_dead_rpc(ch, id);
                self.flush_rpcs(ch);
            }
            for inflight in lost {
                let to = self.republish(ch, link, inflight);
                if barrier_ch == Some(ch) {
                    barrier_to = to;
                }
            }
            self.flush_rpcs(owner);
        }
        self.move_barrier(link, barrier_to);
        // Consumers a cluster cancelled that were waiting only for this link's answer have
        // ended: nothing more comes from the dead link (its deliveries are requeued).
        let mut ended: Vec<(u16, ShortStr)> = Vec::new();
        let mut ask_again: Vec<(u16, u64)> = Vec::new();
        for (ch, channel) in self.channels.iter_mut().enumerate() {
            let Some(channel) = channel else {
                continue;
            };
            // Replies of this link still waiting for their turn (a get-ok behind a slower
            // request). A get-ok with acks: RabbitMQ requeues its message with the link, so
            // passing it on would hand the client a message that is also delivered again
            // later: the get is asked again instead, on the cluster's next link, which has the
            // message back. Without acks the message is the client's;
            // the slot may be reused by the next link, so its tag must be a dead one.
            for rpc in channel.rpcs.iter_mut() {
                if let Some(reply) = rpc.reply.as_mut()
                    && reply.link == gone
                {
                    let acked_get = matches!(reply.method, Method::BasicGetOk(_))
                        && matches!(&rpc.get_request, Some(Method::BasicGet(g)) if !g.no_ack);
                    if acked_get {
                        rpc.reply = None;
                        rpc.waiting += 1;
                        ask_again.push((ch as u16, rpc.id));
                    } else {
                        reply.link = LinkRef::DEAD;
                    }
                }
            }
            let n = channel.tags.kill_link(gone);
            m.unacked.dec_by(n as i64);
            // Held deliveries of the dead link have no client tag yet; the broker requeues them
            // (and the slot may be reused by the next link, whose upstream tags they would hit).
            channel.held.retain(|held| held.0 != gone);
            channel.after_recover.retain(|held| held.0 != gone);
            for consumer in &mut channel.consumers {
                consumer.links.remove(link);
                if consumer.cancelled_by_cluster && consumer.links.is_empty() {
                    ended.push((ch as u16, consumer.tag.clone()));
                }
            }
        }
        for (ch, tag) in ended {
            self.end_cancelled_consumer(ch, &tag);
        }
        // Asked again where the message is requeued, once the cluster has its next link.
        let now = Instant::now();
        for (ch, id) in ask_again {
            self.orphans.push(Orphan {
                cluster: cluster.clone(),
                ch,
                id,
                since: now,
            });
        }
        // `control` keeps pointing at the dead control slot: control traffic fails with a clear
        // channel error (not a hang, and never silently on a shard) until the link is back.
        if self.control == Some(link) && self.shared.config().cluster(&cluster).is_none() {
            // A removed control cluster is not reconnected: the client reconnects instead, to
            // the control cluster of the configuration in force.
            let text = format!(
                "link to cluster {cluster} lost; it is no longer in the proxy configuration and \
                 was this connection's control cluster: reconnect to use the current one"
            );
            warn!(conn = self.id, %cluster, "{text}; closing the client connection");
            self.begin_proxy_close(ConnError::new(ReplyCode::ConnectionForced, &text), &text);
            return;
        }
        let retry = Retry {
            at: Instant::now(),
            failures: 0,
            nodes_back: self.shared.nodes_back(&cluster),
            last_error: None,
            down_since: Instant::now(),
        };
        self.retry_at.insert(cluster.clone(), retry);
        if let Some(what) = lost {
            // RabbitMQ dropped this with the link's connection, or requeued what the client
            // still holds; replaying would create an empty stand-in the client waits on for
            // messages that are gone, or deliver again messages the client already has. One
            // broker would have closed the client's connection: so does warren, saying why.
            let text = format!("link to cluster {cluster} lost; {what}");
            warn!(conn = self.id, %cluster, "{text}; closing the client connection");
            self.begin_proxy_close(ConnError::new(ReplyCode::ConnectionForced, &text), &text);
            return;
        }
        for id in probes {
            self.probe_answered(id, true);
        }
        // Its checks in flight are gone: others waiting their turn may go.
        self.send_replay_checks();
        // The client's closes that waited for this link's close-ok: the channel's part here
        // went with the link, which sends no close-ok.
        for ch in 0..self.channels.len() {
            self.finish_client_close(ch as u16);
        }
        // Only the loss of a shard link leaves publishes nowhere to go: a connection that has
        // talked only to the control cluster (`lazy_links`) has no shard link by design.
        if self.links[link].role == Role::Shard
            && self.shard_links().is_empty()
            && self.no_shard_since.is_none()
        {
            self.no_shard_since = Some(Instant::now());
            warn!(
                conn = self.id,
                wait_secs = self.shared.config().timeouts.failover_wait_secs,
                "none of this connection's shard links is up (each is reconnecting); holding its publishes until one is"
            );
        }
    }

    /// A link that died while warren had stopped reading it because the client read nothing
    /// (its outbox full): its broker gave up writing to warren (RabbitMQ closes a connection
    /// whose writes block for 30 s), as it would have given up on this client directly. What
    /// it had written for no_ack consumers was taken off its queues and is lost with the
    /// link, so the client must hear of it as it would have: it is closed, not failed over.
    /// Within [`STARVED_GRACE`] of the links last going unread, since the death is seen only
    /// once they are read again.
    fn starved_link_lost(&self, link: LinkId) -> Option<String> {
        if self
            .links_unread_at
            .is_none_or(|at| at.elapsed() >= STARVED_GRACE)
        {
            return None;
        }
        let no_ack = self.channels.iter().flatten().any(|c| {
            c.consumers
                .iter()
                .any(|k| k.no_ack && k.links.contains(link))
        });
        no_ack.then(|| {
            "it was closed by its broker while warren was not reading it, waiting for this \
             client to read what it had (it read nothing meanwhile): deliveries to no_ack \
             consumers went with it; reconnect, as after a broker closes a client that does \
             not read"
                .to_owned()
        })
    }

    /// What this client had on `link` that a new link cannot give back, said as the end of
    /// "link to cluster X lost; ...":
    /// - deliveries the client holds unacknowledged: the broker requeues them and delivers them
    ///   again, while the client still has its copies and would process each message twice
    ///   (one broker's client loses its connection with the node, and drops its copies: a
    ///   Celery worker discards the tasks it reserved, ETA tasks included);
    /// - an exclusive queue (every queue lives on every cluster);
    /// - a consumer with `no_ack` (what its broker had sent and warren had not read is gone);
    /// - a consumer of a single-active-consumer queue (re-subscribing would queue it behind
    ///   another consumer while it stays active on the other clusters);
    /// - replies owed to direct reply-to requests sent through it (the address RabbitMQ gave
    ///   each request names the link's connection: their replies would be dropped).
    ///
    /// Queue arguments are known from this connection's declares (single active consumer: from
    /// any connection's, see [`crate::single_active`]).
    pub(super) fn state_lost_with(&self, link: LinkId) -> Option<String> {
        if let Some(lost) = self.starved_link_lost(link) {
            return Some(lost);
        }
        let slot = &self.links[link];
        let gone = LinkRef::new(link, slot.generation);
        let held: usize = self
            .channels
            .iter()
            .flatten()
            .map(|c| c.tags.held_from(gone))
            .sum();
        if held > 0 {
            return Some(format!(
                "the client holds {held} unacknowledged deliveries from it, which RabbitMQ \
                 requeues to deliver again: reconnect and drop them, as after a broker's failure"
            ));
        }
        let no_ack_gets = self.no_ack_gets_on(link);
        if no_ack_gets > 0 {
            return Some(format!(
                "{no_ack_gets} basic.get with no_ack in flight on it: RabbitMQ takes the message \
                 it answers with off the queue as it sends it, so it may be lost: reconnect, as \
                 after a broker's failure"
            ));
        }
        if let Some(text) = self.no_ack_consumer_on(link) {
            return Some(text);
        }
        if slot.direct_requests > slot.direct_replies {
            return Some(format!(
                "RabbitMQ deleted the direct reply-to consumer with it, with replies owed to {} \
                 of the {} requests sent through it",
                slot.direct_requests - slot.direct_replies,
                slot.direct_requests
            ));
        }
        for (_, m) in self.topology.entries() {
            if let Method::QueueDeclare(q) = m
                && q.exclusive
                && self.may_hold_messages(&q.queue, link)
            {
                return Some(format!(
                    "RabbitMQ deleted exclusive queue '{}' with it",
                    q.queue.as_str()
                ));
            }
        }
        for channel in self.channels.iter().flatten() {
            for consumer in channel.consumers.iter().filter(|c| c.links.contains(link)) {
                let Some(req) = &consumer.request else {
                    continue;
                };
                if self.is_single_active(&req.queue) {
                    return Some(format!(
                        "RabbitMQ deleted the consumer of single-active-consumer queue '{}' with \
                         it",
                        req.queue.as_str()
                    ));
                }
            }
        }
        None
    }

    /// A consumer with `no_ack` subscribed on `link` to a queue whose copy there can hold
    /// messages, said as what the client lost with the link. RabbitMQ counts a no-ack delivery
    /// as done once it has sent it: what was on its way (in the node, in either socket buffer)
    /// when the link died is gone, and nobody can tell how much. One broker's client learns of
    /// it because its connection dies with the node; re-subscribing on the next link would
    /// hide the gap. Direct reply-to consumers are left to the count of replies owed.
    fn no_ack_consumer_on(&self, link: LinkId) -> Option<String> {
        self.channels.iter().flatten().find_map(|channel| {
            channel.consumers.iter().find_map(|c| {
                if !c.no_ack || c.replies || !c.links.contains(link) {
                    return None;
                }
                let queue = c.request.as_ref().map(|r| &r.queue);
                if queue.is_some_and(|q| !self.may_hold_messages(q, link)) {
                    return None;
                }
                let of = queue.map_or(String::new(), |q| format!(" of queue '{}'", q.as_str()));
                Some(format!(
                    "consumer '{}'{of} has no_ack: what was on its way to it is lost; \
                     reconnect, as after a broker's failure",
                    c.tag.as_str()
                ))
            })
        })
    }

    /// The client's basic.get requests with `no_ack` sent on `link` and not answered yet. If
    /// the link dies, RabbitMQ may have sent one a get-ok that never arrived: with `no_ack`
    /// the message is gone from the queue then, and the client would get the next one (or
    /// get-empty) with no word of it, where one broker's client loses its connection.
    fn no_ack_gets_on(&self, link: LinkId) -> usize {
        let no_ack_get = |ch: u16, id: u64| {
            self.rpc(ch, id)
                .is_some_and(|r| matches!(&r.get_request, Some(Method::BasicGet(g)) if g.no_ack))
        };
        let mut n = 0;
        for (ch, up) in self.links[link].chans.iter().enumerate() {
            let owner = up.side_for.unwrap_or(ch as u16);
            for waiting in &up.pending {
                if let Pending::Rpc(id) = waiting.who
                    && no_ack_get(owner, id)
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Whether `queue`'s copy on `link`'s cluster can hold messages: a publish lands on a shard
    /// cluster only when sharded (a sharded exchange, or the default exchange with a sharded
    /// queue name), on the control cluster only when control. A queue with a control name and
    /// only control bindings (Celery's rpc:// result queues, pidbox and reply queues) never
    /// gets a message on a shard cluster, so losing its copy there loses nothing: the replay
    /// declares it again instead of closing the client. Bindings are known from this
    /// connection's declares; with any exchange-to-exchange binding, every copy counts.
    pub(super) fn may_hold_messages(&self, queue: &ShortStr, link: LinkId) -> bool {
        let Some(slot) = self.links.get(link) else {
            return true;
        };
        let first_shard = self.control.is_none() && self.shard_links().first() == Some(link);
        self.may_hold_messages_on(queue, slot.role, first_shard)
    }

    /// [`may_hold_messages`](Self::may_hold_messages) for a cluster of `role`; `first_shard`:
    /// it is the shard cluster that takes control traffic when there is no control cluster.
    pub(super) fn may_hold_messages_on(
        &self,
        queue: &ShortStr,
        role: Role,
        first_shard: bool,
    ) -> bool {
        // A dead-letter or alternate exchange, or a CC header, may put messages in any copy
        // (crate::server_routes).
        let bound_to = self.topology.entries().filter_map(|(_, m)| match m {
            Method::QueueBind(b) if &b.queue == queue => Some(b.exchange.as_bytes()),
            _ => None,
        });
        if self
            .shared
            .server_routes_reach(&self.vhost, queue.as_bytes(), bound_to)
        {
            return true;
        }
        let takes_control = role == Role::Control || first_shard;
        let takes_sharded = role == Role::Shard;
        let mut sharded = self.rules.queue(queue.as_bytes()) == Class::Sharded;
        let mut control = !sharded;
        for (_, m) in self.topology.entries() {
            match m {
                Method::ExchangeBind(_) => return true,
                Method::QueueBind(b) if &b.queue == queue => {
                    match self.rules.exchange(b.exchange.as_bytes()) {
                        Class::Sharded => sharded = true,
                        Class::Control => control = true,
                    }
                }
                _ => {}
            }
        }
        (takes_sharded && sharded) || (takes_control && control)
    }

    /// A request was in flight on a link that died: it waits for the cluster's next link and is
    /// sent again there (see [`resend_orphans`](Self::resend_orphans)), so its answer covers
    /// every cluster, as from one broker. A basic.get tries the next cluster first (and waits
    /// for this one only if they all say empty); requests whose link is gone for good are not
    /// kept. Returns whether it was kept.
    pub(super) fn orphan_rpc(&mut self, ch: u16, id: u64, cluster: &str) -> bool {
        let Some(rpc) = channel_in(&mut self.channels, ch).and_then(|c| c.rpc_mut(id)) else {
            return false;
        };
        if rpc.permission.is_some() {
            // Any cluster's answer stands for all: asked again elsewhere at once.
            self.reask_permission(ch, id);
            return true;
        }
        if rpc.get_request.is_some() && rpc.get_next.iter().any(|&l| self.links[l].live()) {
            // The next cluster is asked now; this one is waited for if they all say empty.
            return false;
        }
        let removed = self.shared.config().cluster(cluster).is_none();
        if removed {
            return false;
        }
        self.orphans.push(Orphan {
            cluster: cluster.to_owned(),
            ch,
            id,
            since: Instant::now(),
        });
        true
    }

    /// A basic.get every live cluster answered with get-empty: if a cluster that may hold
    /// messages of its queue has no link right now (failing over, reconnecting), the get
    /// waits for that cluster's next link and asks it there (see
    /// [`resend_orphans`](Self::resend_orphans)), for at most `timeouts.failover_wait_secs`
    /// from when the cluster went down; then it is refused with 541. get-empty would tell the
    /// client the queue is empty while a part of it could not be read (a drain loop that
    /// stops at get-empty would stop early). Returns whether the get waits.
    pub(super) fn get_waits_for_missing_cluster(&mut self, ch: u16, id: u64) -> bool {
        let Some(Method::BasicGet(get)) = self.rpc(ch, id).and_then(|r| r.get_request.as_ref())
        else {
            return false;
        };
        let Some((cluster, since)) = self.missing_holders(&get.queue).into_iter().next() else {
            return false;
        };
        debug!(conn = self.id, channel = ch, cluster = %cluster, "basic.get: the other clusters are empty; waiting for this one's link");
        self.orphans.push(Orphan {
            cluster,
            ch,
            id,
            since,
        });
        true
    }

    /// The clusters that may hold messages of `queue` and have no link right now (failing
    /// over, reconnecting, refusing this connection), each with when it went away.
    fn missing_holders(&self, queue: &ShortStr) -> Vec<(String, Instant)> {
        let config = self.shared.config();
        let first_shard = config.shard_clusters().next().map(|c| c.name.clone());
        config
            .clusters
            .iter()
            .filter(|c| {
                let down =
                    self.retry_at.contains_key(&*c.name) || self.connecting.contains(&c.name);
                down && !self.has_live_link(&c.name)
                    && self.may_hold_messages_on(
                        queue,
                        c.role,
                        self.control.is_none() && first_shard.as_ref() == Some(&c.name),
                    )
            })
            .map(|c| {
                let since = self
                    .retry_at
                    .get(&*c.name)
                    .map_or_else(Instant::now, |r| r.down_since);
                (c.name.to_string(), since)
            })
            .collect()
    }

    /// A queue.purge, queue.delete or passive queue.declare of `queue` was just sent to the
    /// live links as request `id` of channel `ch`. One broker purges, deletes or counts the
    /// whole queue; answered by the clusters that are up, it would purge or delete a part and
    /// say nothing of the rest (the messages on a cluster whose link is failing over would be
    /// delivered after the purge-ok, or stay behind a delete-ok for good). So each cluster
    /// that may hold part of the queue and has no link now is waited for: the request goes to
    /// its next link ([`resend_orphans`](Self::resend_orphans)), and if none comes within
    /// `timeouts.failover_wait_secs` of the cluster going away the channel is closed with 541
    /// saying which cluster was left out ([`expire_orphans`](Self::expire_orphans)).
    pub(super) fn wait_for_missing_holders(&mut self, ch: u16, id: u64, queue: &ShortStr) {
        let missing = self.missing_holders(queue);
        if missing.is_empty() {
            return;
        }
        let Some(rpc) = channel_in(&mut self.channels, ch).and_then(|c| c.rpc_mut(id)) else {
            return;
        };
        rpc.waiting += u32::try_from(missing.len()).unwrap_or(u32::MAX);
        rpc.whole_queue = true;
        let method = rpc.request.name();
        for (cluster, since) in missing {
            debug!(conn = self.id, channel = ch, cluster = %cluster, method, queue = %queue.as_str(),
                "the cluster may hold messages of the queue and has no link: waiting for it");
            self.orphans.push(Orphan {
                cluster,
                ch,
                id,
                since,
            });
        }
    }

    /// A link to `cluster` is open again (its channels, modes and consumers replayed): the
    /// requests that were in flight on the old one are answered from it.
    pub(super) fn resend_orphans(&mut self, link: LinkId) {
        let cluster = self.links[link].link.cluster.to_string();
        let link_ref = self.link_ref(link);
        let (mine, rest): (Vec<Orphan>, Vec<Orphan>) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|o| o.cluster == cluster);
        self.orphans = rest;
        let mut settled = Vec::new();
        for o in mine {
            if !matches!(
                self.links[link].chan_state(o.ch),
                UpState::Open | UpState::Opening
            ) {
                // The client channel was not reopened on the new link (the client closed it
                // meanwhile): asked on a channel that is not open, the request would have the
                // broker close the whole link (504), again at every reconnect, and the
                // client's close would wait for its answer for good. The client no longer
                // needs the answer: settled as the dead link's.
                debug!(conn = self.id, channel = o.ch, %cluster, "request owed by a dead link, on a channel the client closed meanwhile: settled");
                self.settle_dead_rpc(o.ch, o.id);
                self.flush_rpcs(o.ch);
                settled.push(o.ch);
                continue;
            }
            let Some(rpc) = channel_in(&mut self.channels, o.ch).and_then(|c| c.rpc_mut(o.id))
            else {
                continue;
            };
            // What the replay already re-established on the new link is answered for it;
            // anything else is asked again.
            let done = match &rpc.request {
                Method::ChannelOpen(_) => Some(Method::ChannelOpenOk(Default::default())),
                Method::BasicQos(_) => Some(Method::BasicQosOk(Default::default())),
                Method::ConfirmSelect(_) => Some(Method::ConfirmSelectOk(Default::default())),
                Method::TxSelect(_) => Some(Method::TxSelectOk(Default::default())),
                Method::BasicConsume(c) => Some(Method::BasicConsumeOk(codec::BasicConsumeOk {
                    consumer_tag: c.consumer_tag.clone(),
                })),
                _ => None,
            };
            match done {
                Some(reply) => {
                    rpc.merge(reply, None, link_ref);
                    self.flush_rpcs(o.ch);
                }
                None if rpc.then_delete.is_some() => {
                    let request = rpc.request.clone();
                    self.side_check(link, o.ch, &request, Pending::Rpc(o.id));
                }
                None => {
                    let request = rpc.request.clone();
                    self.links[link].request(o.ch, &request, Pending::Rpc(o.id));
                }
            }
        }
        // A client's close behind the requests settled above is answered after them.
        for ch in settled {
            self.finish_client_close(ch);
        }
    }

    /// On the tick: requests whose cluster has not come back within
    /// `timeouts.failover_wait_secs` are answered by the other clusters' replies (or fail
    /// with 541 when they went to that cluster alone).
    pub(super) fn expire_orphans(&mut self) {
        let wait = Duration::from_secs(self.shared.config().timeouts.failover_wait_secs);
        if self.orphans.iter().all(|o| o.since.elapsed() < wait) {
            return;
        }
        let (old, young): (Vec<Orphan>, Vec<Orphan>) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|o| o.since.elapsed() >= wait);
        self.orphans = young;
        let mut settled = Vec::new();
        for o in old {
            warn!(conn = self.id, cluster = %o.cluster, channel = o.ch, "cluster not back in time for a request in flight when its link died");
            let refused = channel_in(&mut self.channels, o.ch)
                .and_then(|c| c.rpc_mut(o.id))
                .filter(|r| r.whole_queue || r.get_request.is_some())
                .map(|r| {
                    // A get the other clusters answered empty: get-empty would say the queue
                    // is empty while this cluster's part of it cannot be read. A purge, delete
                    // or count would cover part of the queue as if it were the whole.
                    let request = r.get_request.clone().unwrap_or_else(|| r.request.clone());
                    (request, r.then_delete.is_some())
                });
            if let Some((request, conditional)) = refused {
                let text = left_out_text(&o.cluster, wait, &request, conditional);
                self.close_channel_at(o.ch, ReplyCode::InternalError, &text, &request, o.id);
                continue;
            }
            self.settle_dead_rpc(o.ch, o.id);
            self.flush_rpcs(o.ch);
            settled.push(o.ch);
        }
        // A client's close behind the requests given up is answered after them.
        for ch in settled {
            self.finish_client_close(ch);
        }
    }

    /// A request was waiting for a link that died: count it as answered by that link (the
    /// other links' replies make the answer), or try the next cluster for a basic.get.
    pub(super) fn settle_dead_rpc(&mut self, ch: u16, id: u64) {
        let Some(rpc) = channel_in(&mut self.channels, ch).and_then(|c| c.rpc_mut(id)) else {
            return;
        };
        if let Some(get) = rpc.get_request.clone() {
            while let Some(next) = rpc.get_next.pop() {
                if self.links[next].live() {
                    self.links[next].request(ch, &get, Pending::Rpc(id));
                    return;
                }
            }
            if rpc.reply.is_none() && self.get_waits_for_missing_cluster(ch, id) {
                return;
            }
        }
        let Some(rpc) = channel_in(&mut self.channels, ch).and_then(|c| c.rpc_mut(id)) else {
            return;
        };
        if rpc.get_request.is_some() && rpc.reply.is_none() {
            rpc.reply = Some(crate::client::channel::Reply {
                method: Method::BasicGetEmpty(Default::default()),
                content: None,
                link: LinkRef::DEAD,
            });
        }
        rpc.waiting = rpc.waiting.saturating_sub(1);
    }

    /// Publishes that were in flight on a dead link: a confirm-mode client gets a nack (kombu
    /// and most clients republish on nack), as the broker may or may not have taken them.
    pub(super) fn nack_lost(&mut self, ch: u16, client_seqs: &[u64]) {
        let mut sorted = client_seqs.to_vec();
        sorted.sort_unstable();
        let mut out = Vec::new();
        if let Some(confirms) = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()) {
            confirms.settle(&sorted, &mut out);
        }
        for c in out {
            let nack = Method::BasicNack(codec::BasicNack {
                delivery_tag: c.seq,
                multiple: c.multiple,
                requeue: false,
            });
            self.send_confirm(ch, None, nack);
        }
    }
}

/// Why a get, purge, delete or passive declare that cluster `cluster` missed (no link within
/// `wait`) is refused: what happened on the other clusters, and what did not happen there.
/// `conditional`: the request is the check of a conditional delete, which is not made.
fn left_out_text(cluster: &str, wait: Duration, request: &Method, conditional: bool) -> String {
    let why = |queue: &ShortStr| {
        format!(
            "cluster {cluster} is unreachable (not back within {} s) and may hold messages of \
             queue '{}'",
            wait.as_secs(),
            queue.as_str()
        )
    };
    let (queue, outcome) = match request {
        Method::BasicGet(g) => return why(&g.queue),
        Method::QueuePurge(p) => (
            &p.queue,
            "the queue was purged on the other clusters, not there",
        ),
        Method::QueueDelete(d) => (
            &d.queue,
            "the queue was deleted on the other clusters, and its copy there remains",
        ),
        Method::QueueDeclare(q) if conditional => (
            &q.queue,
            "whether it is empty or unused cannot be known, so it was not deleted",
        ),
        Method::QueueDeclare(q) => (&q.queue, "its message count cannot be known"),
        _ => return format!("cluster {cluster} is unreachable"),
    };
    format!("{}: {outcome}", why(queue))
}

/// Removes `name` from `names` (clusters marked for their next link's replay); whether it was
/// there.
fn take_name(names: &mut Vec<String>, name: &str) -> bool {
    match names.iter().position(|n| n == name) {
        Some(i) => {
            names.swap_remove(i);
            true
        }
        None => false,
    }
}
