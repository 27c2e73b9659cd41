//! Moves the messages of one evacuating shard cluster, queue by queue, batch by batch.
//!
//! A batch is at most one prefetch window ([`super::PREFETCH`]) and at most what the token
//! bucket allows. For each batch: decide with the journal (publish, or acknowledge a message
//! the target already confirmed), write the journal, publish every message to one target
//! cluster (default exchange, routing key = the queue, mandatory, in confirm mode), wait for
//! the target's confirms, write the outcomes, then acknowledge the confirmed messages on the
//! source and requeue the others (`basic.nack requeue=true`), and make one round trip on the
//! source channel so the acknowledgements are known to be processed before the journal
//! forgets them. A message is therefore acknowledged on its old cluster only after its new
//! cluster confirmed it: a crash or a lost link at any point leaves it on one cluster at
//! least (on two at most, and the journal says when that may have happened).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::amqp::{Conn, Failure};
use super::bucket::TokenBucket;
use super::journal::{Decision, Journal, message_hash};
use super::{PREFETCH, REDELIVERED_HEADER, target};
use crate::codec::{self, ContentHeader, FieldTable, FieldValue, Method, ShortStr};
use crate::config::{ClusterConfig, Config};
use crate::io::Content;
use crate::metrics::EvacuationMetrics;
use crate::route::{Class, RoundRobin};
use crate::state::Shared;

/// How long the target gets to confirm a batch.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first delivery of a batch is waited for before the queue's depth is checked.
const FIRST_DELIVERY: Duration = Duration::from_millis(500);
/// After the first delivery, how long more arrive into the same batch.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Depth checks in a row that find ready messages none of which is delivered to the
/// evacuator (other consumers take them) before the queue is left for the next pass.
const MAX_QUIET: u32 = 20;
/// The consumer tag of the evacuator on the source queues.
const CONSUMER_TAG: &str = "warren-evacuator";

/// One delivery from the source.
struct Delivery {
    tag: u64,
    redelivered: bool,
    content: Content,
}

/// One publish of a batch.
struct Publish {
    tag: u64,
    hash: u128,
    mark_redelivered: bool,
    possible_duplicate: bool,
    content: Content,
}

/// A target connection, its channel in confirm mode and the next publish sequence number.
struct Target {
    conn: Conn,
    ch: u16,
    next_seq: u64,
}

/// Why a queue's move stopped early.
enum Stop {
    /// The source connection is unusable.
    Source(String),
    /// This queue cannot be moved now (it comes back in the next pass).
    Queue(String),
}

pub(super) struct Mover {
    shared: Arc<Shared>,
    cluster: String,
    journal: Journal,
    bucket: TokenBucket,
    sources: HashMap<String, Conn>,
    targets: HashMap<(String, String), Target>,
    rr: RoundRobin,
    metrics: EvacuationMetrics,
    /// (when, messages moved so far) over the last seconds, for the rate shown.
    samples: VecDeque<(Instant, u64)>,
    moved: u64,
    left: u64,
    /// Consecutive failed batches (for the pause before the next one).
    failures: u32,
}

impl Mover {
    pub(super) fn new(shared: Arc<Shared>, cluster: String) -> Mover {
        let path = shared
            .state_dir()
            .map(|d| d.join(format!("evacuate-{cluster}.journal")));
        let journal = match Journal::open(path.clone()) {
            Ok(j) => j,
            Err(e) => {
                warn!(cluster = %cluster, error = %e, "evacuation journal unreadable; starting a new one");
                Journal::in_memory()
            }
        };
        if journal.pending() > 0 {
            info!(cluster = %cluster, entries = journal.pending(),
                "evacuation resumes with the journal a previous run left");
        }
        let config = shared.config();
        let metrics = shared.metrics.evacuation(&cluster);
        let moved = shared.evacuation(&cluster).moved;
        Mover {
            bucket: TokenBucket::new(config.limits.evacuate_rate, PREFETCH.into(), Instant::now()),
            shared,
            cluster,
            journal,
            sources: HashMap::new(),
            targets: HashMap::new(),
            rr: RoundRobin::default(),
            metrics,
            samples: VecDeque::new(),
            moved,
            left: 0,
            failures: 0,
        }
    }

    /// Passes over the cluster's queues until the evacuation stops (cancelled, or the cluster
    /// no longer evacuating); after a pass that found nothing, checks again every few seconds.
    pub(super) async fn run(mut self, stop: CancellationToken) {
        info!(cluster = %self.cluster, path = ?self.journal.path(), "evacuation started");
        self.report(|p| {
            p.running = true;
            p.last_error = None;
        });
        loop {
            let config = self.shared.config();
            let Some(me) = config
                .cluster(&self.cluster)
                .filter(|c| c.evacuate)
                .cloned()
            else {
                break;
            };
            if stop.is_cancelled() {
                break;
            }
            self.bucket.set_rate(config.limits.evacuate_rate);
            let found = self.pass(&config, &me, &stop).await;
            let pause = if found == 0 {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if let Err(e) = self.journal.flush() {
            warn!(cluster = %self.cluster, error = %e, "evacuation journal");
        }
        for (_, c) in self.sources.drain() {
            c.close().await;
        }
        for (_, t) in self.targets.drain() {
            t.conn.close().await;
        }
        self.metrics.left.set(0);
        self.report(|p| {
            p.running = false;
            p.current_queue = None;
            p.rate = 0.0;
        });
        info!(cluster = %self.cluster, moved = self.moved, "evacuation stopped");
    }

    /// One pass over the cluster's sharded queues; the number of queues that had messages.
    async fn pass(&mut self, config: &Config, me: &ClusterConfig, stop: &CancellationToken) -> u64 {
        let (names, unacked) = match self.list_queues(config, me).await {
            Ok(n) => n,
            Err(e) => {
                self.error(format!("cannot list the queues: {e}"), 1);
                return 1;
            }
        };
        let mut work = Vec::new();
        for (vhost, queue) in names {
            if stop.is_cancelled() {
                return 1;
            }
            match self.depth(me, &vhost, &queue).await {
                Ok(n) if n > 0 => work.push((vhost, queue, u64::from(n))),
                Ok(_) => {}
                Err(e) => self.error(format!("queue {queue:?}: {e}"), 1),
            }
        }
        self.left = work.iter().map(|(_, _, n)| n).sum();
        self.metrics.left.set(self.left as i64);
        let total = work.len() as u64;
        self.report(|p| {
            p.queues_total = total;
            p.queues_done = 0;
            p.empty = false;
        });
        for (vhost, queue, n) in work {
            if stop.is_cancelled() || !self.still_evacuating() {
                return total.max(1);
            }
            self.report(|p| p.current_queue = Some(queue.clone()));
            debug!(cluster = %self.cluster, %queue, messages = n, "evacuating queue");
            match self.move_queue(me, &vhost, &queue, stop).await {
                Ok(()) => {}
                Err(Stop::Queue(e)) => self.error(format!("queue {queue:?}: {e}"), 1),
                Err(Stop::Source(e)) => {
                    self.error(format!("queue {queue:?}: {e}"), 1);
                    self.journal.abandoned();
                    if let Some(c) = self.sources.remove(&vhost) {
                        c.close().await;
                    }
                }
            }
            self.report(|p| {
                p.queues_done += 1;
                p.current_queue = None;
            });
        }
        // Messages a consumer holds unacknowledged on the cluster may come back (a nack, a
        // consumer gone): the cluster is empty only when the API says none is left either.
        if total == 0 && unacked > 0 {
            self.report(|p| p.last_pass_at = Some(SystemTime::now()));
            return 1;
        }
        if total == 0 {
            self.left = 0;
            self.metrics.left.set(0);
            if let Err(e) = self.journal.clear() {
                self.error(e, 1);
            }
            if !self.shared.evacuation(&self.cluster).empty {
                info!(cluster = %self.cluster, moved = self.moved,
                    "evacuation: no message left in the cluster's sharded queues; it can be removed");
            }
            self.report(|p| {
                p.empty = true;
                p.rate = 0.0;
            });
        }
        self.report(|p| p.last_pass_at = Some(SystemTime::now()));
        total
    }

    fn still_evacuating(&self) -> bool {
        self.shared
            .config()
            .cluster(&self.cluster)
            .is_some_and(|c| c.evacuate)
    }

    /// The sharded queues of the cluster that may hold messages, as (vhost, name): from its
    /// management API when it has one (every queue of its vhosts), else the queues declared
    /// through this process; and the messages the API lists as unacknowledged in them.
    async fn list_queues(
        &mut self,
        config: &Config,
        me: &ClusterConfig,
    ) -> Result<(Vec<(String, String)>, u64), String> {
        let known = self.shared.known_queues();
        let sharded = |name: &str| config.routing.queue(name.as_bytes()) == Class::Sharded;
        let Some(m) = &me.management else {
            self.report(|p| p.listing = "declared");
            let names = known.into_iter().filter(|(_, q)| sharded(q)).collect();
            return Ok((names, 0));
        };
        self.report(|p| p.listing = "management");
        let mut unacked = 0u64;
        let mut vhosts: BTreeSet<String> = m.vhosts.iter().cloned().collect();
        vhosts.extend(known.iter().map(|(v, _)| v.clone()));
        let mut out = BTreeSet::new();
        let mut errors = Vec::new();
        for vhost in vhosts {
            let deadline = Instant::now() + config.timeouts.connect() + Duration::from_secs(10);
            match crate::admin::queues::list_queues(m, &vhost, config.timeouts.connect(), deadline)
                .await
            {
                Ok(list) => {
                    for (name, q) in list {
                        // A queue the API says is empty is skipped; one without statistics yet
                        // is asked.
                        if q.messages == Some(0) || !sharded(&name) {
                            continue;
                        }
                        unacked += q.messages_unacknowledged.unwrap_or(0);
                        out.insert((vhost.clone(), name));
                    }
                }
                Err(e) => errors.push(format!("vhost {vhost:?}: {e}")),
            }
        }
        if out.is_empty() && !errors.is_empty() {
            return Err(errors.join("; "));
        }
        for e in errors {
            self.error(e, 1);
        }
        Ok((out.into_iter().collect(), unacked))
    }

    /// The source connection for `vhost`, opened when needed.
    async fn source(&mut self, me: &ClusterConfig, vhost: &str) -> Result<Conn, String> {
        if let Some(c) = self.sources.remove(vhost) {
            return Ok(c);
        }
        let timeout = self.shared.config().timeouts.connect();
        Conn::open(me, vhost, timeout, &format!("from {}", self.cluster)).await
    }

    /// Ready messages of a queue on the source (passive declare); 0 when it does not exist.
    async fn depth(&mut self, me: &ClusterConfig, vhost: &str, queue: &str) -> Result<u32, String> {
        let mut conn = self.source(me, vhost).await?;
        let r = ready_messages(&mut conn, queue).await;
        match r {
            Ok(n) => {
                self.sources.insert(vhost.to_owned(), conn);
                Ok(n)
            }
            Err(Failure::Channel { code: 404, .. }) => {
                self.sources.insert(vhost.to_owned(), conn);
                Ok(0)
            }
            Err(Failure::Channel { code, text }) => {
                self.sources.insert(vhost.to_owned(), conn);
                Err(format!("{code} {text}"))
            }
            Err(Failure::Connection(e)) => Err(e),
        }
    }

    /// Moves one queue until it is empty, the evacuation stops, or it cannot go on.
    async fn move_queue(
        &mut self,
        me: &ClusterConfig,
        vhost: &str,
        queue: &str,
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        let qname = ShortStr::try_from(queue)
            .map_err(|_| Stop::Queue("queue name longer than 255 bytes".into()))?;
        let mut src = self.source(me, vhost).await.map_err(Stop::Source)?;
        let result = self.consume_queue(&mut src, vhost, &qname, stop).await;
        match &result {
            Err(Stop::Source(_)) => src.close().await,
            _ => {
                self.sources.insert(vhost.to_owned(), src);
            }
        }
        result
    }

    async fn consume_queue(
        &mut self,
        src: &mut Conn,
        vhost: &str,
        queue: &ShortStr,
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        let name = queue.as_str().into_owned();
        let ch = src.open_channel().await.map_err(source_or_queue)?;
        let qos = Method::BasicQos(codec::BasicQos {
            prefetch_size: 0,
            prefetch_count: PREFETCH,
            global: false,
        });
        src.call(ch, &qos, |m| matches!(m, Method::BasicQosOk(_)))
            .await
            .map_err(source_or_queue)?;
        let consume = Method::BasicConsume(codec::BasicConsume {
            queue: queue.clone(),
            consumer_tag: ShortStr::from_static(CONSUMER_TAG),
            ..Default::default()
        });
        src.call(ch, &consume, |m| matches!(m, Method::BasicConsumeOk(_)))
            .await
            .map_err(source_or_queue)?;
        let mut quiet = 0;
        // A failure streak is per queue: a queue whose target refuses it does not slow the next.
        self.failures = 0;
        let mut config_rx = self.shared.subscribe();
        config_rx.mark_unchanged();
        let outcome = loop {
            if stop.is_cancelled() || !self.still_evacuating() {
                break Ok(());
            }
            let allowed = self.bucket.acquire(u32::from(PREFETCH)).await;
            let (batch, ended) = match collect(src, ch, allowed as usize, FIRST_DELIVERY).await {
                Ok(b) => b,
                Err(e) => break Err(source_or_queue(e)),
            };
            let got = batch.len() as u32;
            self.bucket.give_back(allowed.saturating_sub(got));
            if !batch.is_empty() {
                quiet = 0;
                if let Err(e) = self.move_batch(src, ch, vhost, queue, batch).await {
                    break Err(e);
                }
            }
            if ended {
                break Ok(());
            }
            if self.failures > 0 {
                // A target refused or failed: pause before the requeued messages come again
                // (a configuration change, such as the end of the evacuation, ends the pause).
                let pause = Duration::from_millis(250 << self.failures.min(5));
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = config_rx.changed() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                if self.failures >= 5 {
                    break Err(Stop::Queue(
                        "the target clusters keep refusing its messages; left for the next pass"
                            .into(),
                    ));
                }
                continue;
            }
            // Fewer than allowed came: the queue may be empty (a depth check costs a round trip;
            // waiting for deliveries that will not come would cost more).
            if got < allowed {
                match ready_messages(src, &name).await {
                    Ok(0) | Err(Failure::Channel { code: 404, .. }) => {
                        break self.finish(src, ch, vhost, queue).await;
                    }
                    Ok(n) if got == 0 => {
                        quiet += 1;
                        if quiet >= MAX_QUIET {
                            break Err(Stop::Queue(format!(
                                "{n} messages are ready but none is delivered to the evacuator; \
                                 left for the next pass"
                            )));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break Err(source_or_queue(e)),
                }
            }
        };
        if !matches!(outcome, Err(Stop::Source(_)))
            && let Err(e) = src.close_channel(ch).await
        {
            return Err(Stop::Source(e.to_string()));
        }
        outcome
    }

    /// The queue has no ready message left: cancels the consumer and moves what was delivered
    /// before the cancel-ok (after it nothing more comes), so that closing the channel requeues
    /// nothing the evacuator had (a requeue would mark those messages redelivered).
    async fn finish(
        &mut self,
        src: &mut Conn,
        ch: u16,
        vhost: &str,
        queue: &ShortStr,
    ) -> Result<(), Stop> {
        let cancel = Method::BasicCancel(codec::BasicCancel {
            consumer_tag: ShortStr::from_static(CONSUMER_TAG),
            nowait: false,
        });
        src.call(ch, &cancel, |m| matches!(m, Method::BasicCancelOk(_)))
            .await
            .map_err(source_or_queue)?;
        let (rest, _) = collect(src, ch, usize::from(PREFETCH), Duration::from_millis(1))
            .await
            .map_err(source_or_queue)?;
        if rest.is_empty() {
            return Ok(());
        }
        self.move_batch(src, ch, vhost, queue, rest).await
    }

    /// Moves one batch: journal, publish, confirms, journal, acks, round trip.
    async fn move_batch(
        &mut self,
        src: &mut Conn,
        ch: u16,
        vhost: &str,
        queue: &ShortStr,
        batch: Vec<Delivery>,
    ) -> Result<(), Stop> {
        let name = queue.as_str().into_owned();
        let mut ack_only = Vec::new();
        let mut publishes = Vec::new();
        for d in batch {
            let hash = message_hash(vhost, &name, &d.content.header, d.content.body.chunks());
            match self.journal.decide(hash, d.redelivered) {
                Decision::AckOnly => ack_only.push(d.tag),
                Decision::Publish {
                    mark_redelivered,
                    possible_duplicate,
                } => publishes.push(Publish {
                    tag: d.tag,
                    hash,
                    mark_redelivered,
                    possible_duplicate,
                    content: d.content,
                }),
            }
        }
        let intents: Vec<(u128, bool)> = publishes
            .iter()
            .map(|p| (p.hash, p.mark_redelivered))
            .collect();
        if let Err(e) = self.journal.intend(&intents) {
            // Without the journal a crash could duplicate silently: nothing moves until it
            // can be written again.
            for p in &publishes {
                src.send(ch, &nack(p.tag));
            }
            for &tag in &ack_only {
                src.send(ch, &nack(tag));
            }
            src.flush();
            self.failures += 1;
            return Err(Stop::Queue(e));
        }
        let (outcomes, target_error) = self.publish(vhost, queue, &publishes).await;
        // A message that may already be on a target stays "intended" whatever this attempt
        // did, so that a later republish is still counted.
        let recorded: Vec<Option<bool>> = publishes
            .iter()
            .zip(&outcomes)
            .map(|(p, o)| match o {
                Some(false) if p.possible_duplicate => None,
                o => *o,
            })
            .collect();
        if let Err(e) = self.journal.outcome(&recorded) {
            self.error(e, 1);
        }
        let mut confirmed = 0u64;
        let mut duplicates = 0u64;
        let mut failed = 0u64;
        for (p, o) in publishes.iter().zip(&outcomes) {
            if *o == Some(true) {
                src.send(ch, &ack(p.tag));
                confirmed += 1;
                duplicates += u64::from(p.possible_duplicate);
            } else {
                src.send(ch, &nack(p.tag));
                failed += 1;
            }
        }
        for &tag in &ack_only {
            src.send(ch, &ack(tag));
        }
        // The round trip: once basic.qos-ok is back, the channel has processed the acks
        // before it, and the journal may forget the confirmed entries.
        let qos = Method::BasicQos(codec::BasicQos {
            prefetch_size: 0,
            prefetch_count: PREFETCH,
            global: false,
        });
        let settled = src
            .call(ch, &qos, |m| matches!(m, Method::BasicQosOk(_)))
            .await;
        let moved = confirmed + ack_only.len() as u64;
        self.count_moved(moved, duplicates, ack_only.len() as u64);
        if failed > 0 {
            self.failures += 1;
            let why = target_error.unwrap_or_else(|| "not confirmed".into());
            self.error(
                format!("queue {name:?}: {failed} messages requeued: {why}"),
                failed,
            );
        } else {
            self.failures = 0;
        }
        match settled {
            Ok(_) => {
                self.journal.settled();
                Ok(())
            }
            Err(e) => {
                self.journal.abandoned();
                Err(source_or_queue(e))
            }
        }
    }

    /// Publishes a batch to one target: per publish, `Some(true)` confirmed, `Some(false)`
    /// not taken (nacked, returned, never sent), `None` no answer (the target may have it);
    /// and the error to report when not all were confirmed.
    async fn publish(
        &mut self,
        vhost: &str,
        queue: &ShortStr,
        publishes: &[Publish],
    ) -> (Vec<Option<bool>>, Option<String>) {
        let mut outcomes = vec![Some(false); publishes.len()];
        if publishes.is_empty() {
            return (outcomes, None);
        }
        let name = queue.as_str().into_owned();
        let config = self.shared.config();
        let (candidates, spread) = target::candidates(&config, &name);
        let mut avoid = Vec::new();
        let mut last_error = None;
        let (key, mut t) = loop {
            let Some(c) = target::pick(&candidates, spread, &name, &avoid, &mut self.rr) else {
                let why = last_error.unwrap_or_else(|| "no shard cluster to move to".to_owned());
                return (outcomes, Some(why));
            };
            let key = (c.name.clone(), vhost.to_owned());
            if let Some(t) = self.targets.remove(&key) {
                break (key, t);
            }
            match open_target(c, vhost, config.timeouts.connect(), &self.cluster).await {
                Ok(t) => break (key, t),
                Err(e) => {
                    last_error = Some(format!("{}: {e}", c.name));
                    avoid.push(c.name.clone());
                }
            }
        };
        let first_seq = t.next_seq;
        let mut sent: Vec<(Bytes, Bytes)> = Vec::with_capacity(publishes.len());
        for p in publishes {
            let content = if p.mark_redelivered {
                mark_redelivered(&p.content)
            } else {
                p.content.clone()
            };
            t.conn.publish(t.ch, queue, &content);
            sent.push((content.header.clone(), content.body_bytes()));
            t.next_seq += 1;
            t.conn.room().await;
        }
        t.conn.flush();
        let mut answered = vec![false; publishes.len()];
        let mut returned = vec![false; publishes.len()];
        let mut error = None;
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        let index = |seq: u64| seq.checked_sub(first_seq).map(|i| i as usize);
        let mut broken = false;
        while answered.iter().any(|a| !a) {
            let cmd = match t.conn.recv(deadline).await {
                Ok(Some(cmd)) => cmd,
                Ok(None) => {
                    error = Some(format!("{}: no confirm within {CONFIRM_TIMEOUT:?}", key.0));
                    broken = true;
                    break;
                }
                Err(e) => {
                    error = Some(e.to_string());
                    broken = true;
                    break;
                }
            };
            if cmd.channel != t.ch {
                continue;
            }
            let mut settle = |tag: u64, multiple: bool, ok: bool| {
                let Some(last) = index(tag) else { return };
                let from = if multiple { 0 } else { last };
                for i in from..=last.min(publishes.len().saturating_sub(1)) {
                    if !answered[i] {
                        answered[i] = true;
                        outcomes[i] = Some(ok && !returned[i]);
                    }
                }
            };
            match &cmd.method {
                Method::BasicAck(a) => settle(a.delivery_tag, a.multiple, true),
                Method::BasicNack(n) => {
                    error = Some(format!("{} nacked the publish", key.0));
                    settle(n.delivery_tag, n.multiple, false);
                }
                Method::BasicReturn(r) => {
                    error = Some(format!(
                        "{} returned it: {} {} (does the queue exist there?)",
                        key.0,
                        r.reply_code,
                        r.reply_text.as_str()
                    ));
                    if let Some(c) = &cmd.content {
                        let body = c.body_bytes();
                        if let Some(i) = (0..sent.len()).find(|&i| {
                            !answered[i]
                                && !returned[i]
                                && sent[i].0 == c.header
                                && sent[i].1 == body
                        }) {
                            returned[i] = true;
                        }
                    }
                }
                Method::ChannelClose(c) => {
                    t.conn
                        .send(t.ch, &Method::ChannelCloseOk(Default::default()));
                    error = Some(format!(
                        "{} closed the channel: {} {}",
                        key.0,
                        c.reply_code,
                        c.reply_text.as_str()
                    ));
                    broken = true;
                    break;
                }
                _ => {}
            }
        }
        for (i, a) in answered.iter().enumerate() {
            if !a {
                // Sent, never answered: the target may have it.
                outcomes[i] = None;
            }
        }
        if broken {
            t.conn.close().await;
        } else {
            self.targets.insert(key, t);
        }
        (outcomes, error)
    }

    fn count_moved(&mut self, moved: u64, duplicates: u64, avoided: u64) {
        self.moved += moved;
        self.left = self.left.saturating_sub(moved);
        self.metrics.moved.inc_by(moved);
        self.metrics.duplicates.inc_by(duplicates);
        self.metrics.left.set(self.left as i64);
        let now = Instant::now();
        self.samples.push_back((now, self.moved));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.samples.pop_front();
        }
        let rate = match (self.samples.front(), self.samples.back()) {
            (Some((t0, m0)), Some((t1, m1))) if t1 > t0 => {
                (m1 - m0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let (total, left) = (self.moved, self.left);
        self.report(|p| {
            p.moved = total;
            p.left = left;
            p.rate = rate;
            p.possible_duplicates += duplicates;
            p.duplicates_avoided += avoided;
        });
    }

    /// Counts `n` errors and remembers the last one (logged at most every few seconds).
    fn error(&mut self, message: String, n: u64) {
        self.metrics.errors.inc_by(n);
        if self.shared.report_once(&self.cluster, "evacuation error") {
            warn!(cluster = %self.cluster, error = %message, "evacuation");
        } else {
            debug!(cluster = %self.cluster, error = %message, "evacuation");
        }
        self.report(|p| {
            p.errors += n;
            p.last_error = Some(message);
            p.last_error_at = Some(SystemTime::now());
        });
    }

    fn report(&self, f: impl FnOnce(&mut crate::state::EvacuationProgress)) {
        self.shared.update_evacuation(&self.cluster, f);
    }
}

fn source_or_queue(f: Failure) -> Stop {
    match f {
        Failure::Channel { code, text } => Stop::Queue(format!("{code} {text}")),
        Failure::Connection(e) => Stop::Source(e),
    }
}

fn ack(tag: u64) -> Method {
    Method::BasicAck(codec::BasicAck {
        delivery_tag: tag,
        multiple: false,
    })
}

fn nack(tag: u64) -> Method {
    Method::BasicNack(codec::BasicNack {
        delivery_tag: tag,
        multiple: false,
        requeue: true,
    })
}

/// Ready messages of `queue` (passive declare on a channel of its own, closed after).
async fn ready_messages(conn: &mut Conn, queue: &str) -> Result<u32, Failure> {
    let name = ShortStr::try_from(queue).map_err(|_| Failure::Channel {
        code: 0,
        text: "queue name longer than 255 bytes".into(),
    })?;
    let ch = conn.open_channel().await?;
    let declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: name,
        passive: true,
        ..Default::default()
    });
    let reply = conn
        .call(ch, &declare, |m| matches!(m, Method::QueueDeclareOk(_)))
        .await?;
    conn.close_channel(ch).await?;
    match reply {
        Method::QueueDeclareOk(ok) => Ok(ok.message_count),
        _ => Ok(0),
    }
}

/// Up to `want` deliveries from the consumer on `ch`: waits `first` for the first, then
/// [`BATCH_WINDOW`] for more. `true` when the broker cancelled the consumer (the queue was
/// deleted).
async fn collect(
    conn: &mut Conn,
    ch: u16,
    want: usize,
    first: Duration,
) -> Result<(Vec<Delivery>, bool), Failure> {
    let mut batch = Vec::new();
    let mut deadline = Instant::now() + first;
    while batch.len() < want {
        let Some(cmd) = conn.recv(deadline).await? else {
            break;
        };
        if cmd.channel != ch {
            continue;
        }
        match cmd.method {
            Method::BasicDeliver(d) => {
                let Some(content) = cmd.content else {
                    continue;
                };
                if batch.is_empty() {
                    deadline = Instant::now() + BATCH_WINDOW;
                }
                batch.push(Delivery {
                    tag: d.delivery_tag,
                    redelivered: d.redelivered,
                    content,
                });
            }
            Method::BasicCancel(_) => return Ok((batch, true)),
            Method::ChannelClose(c) => {
                conn.send(ch, &Method::ChannelCloseOk(Default::default()));
                return Err(Failure::Channel {
                    code: c.reply_code,
                    text: c.reply_text.as_str().into_owned(),
                });
            }
            _ => {}
        }
    }
    Ok((batch, false))
}

async fn open_target(
    c: &ClusterConfig,
    vhost: &str,
    timeout: Duration,
    from: &str,
) -> Result<Target, String> {
    let mut conn = Conn::open(c, vhost, timeout, &format!("to {} from {from}", c.name)).await?;
    let ch = conn.open_channel().await.map_err(|e| e.to_string())?;
    conn.call(
        ch,
        &Method::ConfirmSelect(codec::ConfirmSelect { nowait: false }),
        |m| matches!(m, Method::ConfirmSelectOk(_)),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Target {
        conn,
        ch,
        next_seq: 1,
    })
}

/// The content with the [`REDELIVERED_HEADER`] added: the AMQP publish cannot set the
/// redelivered flag, so a consumer that cares reads the header instead. Only such messages
/// are decoded and encoded again; every other one keeps its header bytes as received.
pub fn mark_redelivered(content: &Content) -> Content {
    let Ok(mut header) = ContentHeader::decode(content.header.clone()) else {
        return content.clone();
    };
    let Ok(key) = ShortStr::try_from(REDELIVERED_HEADER) else {
        return content.clone();
    };
    header
        .properties
        .headers
        .get_or_insert_with(FieldTable::default)
        .insert(key, FieldValue::Bool(true));
    let mut out = BytesMut::new();
    header.encode(&mut out);
    Content {
        header: out.freeze(),
        body_size: content.body_size,
        body: content.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::BasicProperties;
    use crate::io::command::Body;

    #[test]
    fn the_redelivered_mark_keeps_every_other_property() {
        let mut headers = FieldTable::default();
        headers.insert(ShortStr::from_static("id"), FieldValue::Bool(false));
        let props = BasicProperties {
            headers: Some(headers),
            priority: Some(7),
            delivery_mode: Some(2),
            message_id: ShortStr::try_from("m-1").ok(),
            ..Default::default()
        };
        let h = ContentHeader {
            class_id: 60,
            body_size: 2,
            properties: props.clone(),
        };
        let mut raw = BytesMut::new();
        h.encode(&mut raw);
        let content = Content {
            header: raw.freeze(),
            body_size: 2,
            body: Body::One(Bytes::from_static(b"hi")),
        };
        let marked = mark_redelivered(&content);
        let back = ContentHeader::decode(marked.header.clone()).expect("decodes");
        let mut want = props;
        if let Some(t) = want.headers.as_mut() {
            t.insert(
                ShortStr::from_static(REDELIVERED_HEADER),
                FieldValue::Bool(true),
            );
        }
        assert_eq!(back.properties, want);
        assert_eq!(back.body_size, 2);
        assert_eq!(marked.body_bytes(), Bytes::from_static(b"hi"));
    }
}
