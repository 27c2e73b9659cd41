//! The publish path: a client's publish goes to one shard link (round-robin, or the channel's
//! transaction link), held until its cluster confirms it; parked while no shard link is ready;
//! published again elsewhere when its link dies first; transactions redone on
//! another link when theirs dies before the commit is answered.

use super::*;
use crate::client::channel::LinkSet;
use crate::route::Spread;

impl Session {
    /// Forwards a publish whole to the cluster it is routed to.
    pub(super) fn publish(
        &mut self,
        ch: u16,
        class: Class,
        rule: Option<usize>,
        method: &Method,
        content: &Content,
    ) {
        let Method::BasicPublish(publish) = method else {
            return;
        };
        if publish.exchange.is_empty()
            && let Some((cluster, name)) = reply_to::parse(publish.routing_key.as_bytes())
        {
            return self.publish_reply(ch, cluster, name, method, content);
        }
        let tx = self.channel_mut(ch).is_some_and(|c| c.tx);
        let held = Held {
            publish: publish.clone(),
            content: content.clone(),
            pinned: false,
        };
        // A transaction's publishes, control ones included, all go to its one cluster: a
        // commit answered by one cluster then covers all of them, and the transaction's log
        // can publish them again if that cluster's link dies before the commit is answered.
        let link = match class {
            _ if tx => match self.tx_link(ch) {
                Ok(link) => {
                    let limit = self.held_limit;
                    if let Some(channel) = self.channel_mut(ch) {
                        channel.tx_log.record(&held, limit);
                    }
                    Some(link)
                }
                Err(text) => {
                    if !self.wait_for_shard_link(ch, method, Some(content)) {
                        self.close_channel(ch, ReplyCode::InternalError, text, method);
                    }
                    return;
                }
            },
            Class::Control => self.control_link(),
            Class::Sharded => self.pick_by_rule(ch, rule, &publish.routing_key),
        };
        if link.is_none() && !tx && self.closing.is_none() {
            // No link of its class is ready (a failover in progress): wait for one.
            let client_seq = self.next_confirm_seq(ch);
            self.park(class, ch, client_seq, held);
            return;
        }
        let Some(link) = link else {
            self.close_channel(
                ch,
                ReplyCode::InternalError,
                "no cluster available for basic.publish",
                method,
            );
            return;
        };
        let client_seq = self.next_confirm_seq(ch);
        self.send_checked(ch, link, client_seq, held, tx);
    }

    /// Sends a client's publish to `link` with what goes with it wherever it is sent: a
    /// request for a direct reply is counted on the link whose connection alone can take the
    /// reply, and a publish the broker might refuse is followed by its check (`barrier.rs`).
    /// Returns whether a check was raised.
    fn send_checked(
        &mut self,
        ch: u16,
        link: LinkId,
        client_seq: Option<u64>,
        held: Held,
        tx: bool,
    ) -> bool {
        let (reply_request, needs_check) = self.check_of(ch, &held);
        let check = needs_check.then(|| held.publish.exchange.clone());
        self.count_reply_request(link, reply_request);
        self.send_publish(ch, link, client_seq, held, tx);
        let Some(exchange) = check else {
            return false;
        };
        self.raise_barrier(link, ch, &exchange);
        true
    }

    /// Whether a publish on `ch` asks for a direct reply, and whether a broker might refuse it,
    /// so that it must be followed by a check (`barrier.rs`).
    fn check_of(&mut self, ch: u16, held: &Held) -> (barrier::ReplyRequest, bool) {
        let reply_request = self.reply_request(ch, &held.content);
        let check = self.needs_barrier(&held.publish, &held.content, reply_request);
        (reply_request, check)
    }

    /// A request for a direct reply sent to `link`: only that link's connection can take the
    /// reply (see `state_lost_with`).
    fn count_reply_request(&mut self, link: LinkId, reply_request: barrier::ReplyRequest) {
        if reply_request == barrier::ReplyRequest::Consumed {
            self.links[link].direct_requests += 1;
        }
    }

    /// The link of the channel's open transaction, chosen at its first publish. When that link
    /// died under the transaction, the transaction's publishes are published again on the new
    /// link first, so the commit covers all of them.
    pub(super) fn tx_link(&mut self, ch: u16) -> Result<LinkId, &'static str> {
        let current = self.channel_mut(ch).and_then(|c| c.tx_link);
        if let Some(link) = current
            && self.links[link].live()
        {
            return Ok(link);
        }
        let Some(picked) = self.pick_shard(None) else {
            return Err("no shard cluster available for this transaction");
        };
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(picked);
        };
        channel.tx_link = Some(picked);
        if channel.tx_log.lost {
            if channel.tx_log.overflowed {
                return Err("the cluster of this transaction failed; \
                            the transaction is too large to publish again");
            }
            channel.tx_log.lost = false;
            let redo = std::mem::take(&mut channel.tx_log.publishes);
            debug!(conn = self.id, channel = ch, publishes = redo.len(), to = %self.links[picked].link.cluster,
                "the transaction's cluster failed; publishing its messages again");
            self.redo_transaction(ch, picked, redo.iter());
            if let Some(channel) = self.channel_mut(ch) {
                channel.tx_log.publishes = redo;
            }
        }
        Ok(picked)
    }

    /// A transaction's publish or commit found no shard link to go to. While one is coming
    /// back (its link failed over and the cluster is reconnecting) it waits for it, with the
    /// client's input behind it, for at most `timeouts.failover_wait_secs` from the first
    /// command that waited, as publishes outside transactions do; returns false when it may not
    /// wait (nothing is coming, or the wait is over) and must be refused.
    fn wait_for_shard_link(&mut self, ch: u16, method: &Method, content: Option<&Content>) -> bool {
        let config = self.shared.config();
        let coming = config.clusters.iter().any(|c| {
            c.role == Role::Shard
                && (self.connecting.contains(&c.name) || self.retry_at.contains_key(&*c.name))
        });
        let now = Instant::now();
        let since = self.tx_wait_since.unwrap_or(now);
        let wait = Duration::from_secs(config.timeouts.failover_wait_secs);
        if !coming || now.duration_since(since) >= wait || self.closing.is_some() {
            return false;
        }
        // Cleared when the command has run without waiting again (`run_deferred_when_linked`).
        self.tx_wait_since = Some(since);
        debug!(
            conn = self.id,
            channel = ch,
            method = method.name(),
            "no shard link for the transaction yet: waiting for one"
        );
        self.deferred = Some((
            Command {
                channel: ch,
                method: method.clone(),
                content: content.cloned(),
            },
            now,
        ));
        true
    }

    /// tx.commit / tx.rollback: answered by every live link (the transaction's publishes are
    /// on one of them). A commit notes the link of its publishes until it is answered: if that
    /// link dies first, the commit's outcome is unknown (see `refuse_commit_in_doubt`).
    pub(super) fn end_transaction(&mut self, ch: u16, method: &Method) -> Result<(), ConnError> {
        let commit = matches!(method, Method::TxCommit(_));
        if commit && self.channel_mut(ch).is_some_and(|c| c.tx_log.lost) {
            // The transaction's link died: publish its messages again before committing.
            if let Err(text) = self.tx_link(ch) {
                if !self.wait_for_shard_link(ch, method, None) {
                    self.close_channel(ch, ReplyCode::InternalError, text, method);
                }
                return Ok(());
            }
        }
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return Ok(());
        };
        let link = channel.tx_link.take();
        // The next transaction starts empty; this one's publishes go with its commit.
        channel.tx_log = crate::client::channel::TxLog::default();
        // Its acks too: final with the commit, undone by a rollback (the brokers keep those
        // deliveries unacknowledged, and the client may ack them again).
        if commit {
            channel.tags.commit();
        } else {
            let links = &self.links;
            channel.tags.rollback(|l| {
                if let Some(slot) = slot_of(links, l) {
                    slot.m.unacked.inc();
                }
            });
        }
        let targets = self.live_links();
        self.fan_out(ch, method, targets)?;
        // With no target, fan_out closed the channel and sent nothing to wait for.
        if targets.is_empty() {
            return Ok(());
        }
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(());
        };
        let Some(id) = channel.rpcs.back().map(|r| r.id) else {
            return Ok(());
        };
        if commit && let Some(link) = link {
            channel.tx_log.committing = Some((id, link));
        }
        self.tx_end = Some((ch, id));
        Ok(())
    }

    /// The link that had a transaction's publishes died while its commit was unanswered: the
    /// broker may or may not have committed it. Committing it again elsewhere would commit it
    /// twice whenever the dead node had committed (a probe found a whole transaction twice in 3
    /// runs of 5), so the client is told, as one broker's client learns it when its connection
    /// fails during a commit: channel.close 541, for the commit itself (not behind it: it will
    /// never be answered). Returns false when `id` is not such a commit.
    pub(super) fn refuse_commit_in_doubt(&mut self, ch: u16, dead: LinkId, id: u64) -> bool {
        let Some(channel) = self.channel_mut(ch) else {
            return false;
        };
        match &channel.tx_log.committing {
            Some((cid, link)) if *cid == id && *link == dead => {}
            _ => return false,
        }
        channel.tx_log.committing = None;
        warn!(conn = self.id, channel = ch, cluster = %self.links[dead].link.cluster,
            "transaction's cluster failed during tx.commit; its outcome is unknown: closing the channel");
        self.close_channel_at(
            ch,
            ReplyCode::InternalError,
            "the cluster of this transaction failed during tx.commit, which may or may not have \
             been committed; it is not committed again elsewhere, which could commit it twice",
            &Method::TxCommit(Default::default()),
            id,
        );
        true
    }

    /// Publishes a transaction's messages again on `link` (its first link died).
    pub(super) fn redo_transaction<'a>(
        &mut self,
        ch: u16,
        link: LinkId,
        publishes: impl Iterator<Item = &'a Held>,
    ) {
        for held in publishes {
            self.metrics.republished.inc();
            self.send_publish(ch, link, None, held.clone(), true);
        }
    }

    /// The client's sequence number for its next publish on `ch`, if the channel is in confirm
    /// mode.
    pub(super) fn next_confirm_seq(&mut self, ch: u16) -> Option<u64> {
        self.channel_mut(ch)
            .and_then(|c| c.confirms.as_mut())
            .map(|c| c.next_seq())
    }

    /// Keeps a publish until a link of its class is ready (see [`Session::parked`]).
    pub(super) fn park(&mut self, class: Class, ch: u16, client: Option<u64>, held: Held) {
        let (_, check) = self.check_of(ch, &held);
        let _ticket = self.held.hold(held.size());
        if self.parked.is_empty() {
            info!(
                conn = self.id,
                ?class,
                "no cluster ready for a publish; holding publishes until one is"
            );
        }
        self.parked.push_back(Parked {
            class,
            ch,
            client,
            held,
            check,
            _ticket,
        });
        self.no_shard_since.get_or_insert_with(Instant::now);
    }

    /// A link became ready: send the parked publishes, in order (one that still has no link
    /// keeps the ones behind it waiting). A publish the broker might refuse is checked where
    /// it goes, as when the client sent it, and the ones behind it wait for the answer (see
    /// `barrier.rs`): they are sent when the check passes, or dropped with their channel.
    pub(super) fn unpark(&mut self) {
        if self.barrier_holds() {
            return;
        }
        while let Some(p) = self.parked.pop_front() {
            let target = match p.class {
                Class::Control => self.control_link(),
                Class::Sharded => self.pick_shard(None),
            };
            let Some(link) = target else {
                self.parked.push_front(p);
                return;
            };
            let open = self
                .channel_mut(p.ch)
                .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening));
            if open {
                if self.send_checked(p.ch, link, p.client, p.held, false) && self.barrier_holds() {
                    return;
                }
            } else {
                self.metrics.dropped.inc();
                warn!(conn = self.id, channel = p.ch, exchange = %p.held.publish.exchange, routing_key = %p.held.publish.routing_key,
                    "publish lost: its channel was closed while it waited for a cluster");
            }
        }
        if !self.shard_links().is_empty() && self.parked.is_empty() {
            self.no_shard_since = None;
        }
    }

    /// On the tick: no shard cluster, or publishes parked, for longer than
    /// `timeouts.failover_wait_secs` gives up the parked publishes (nacks to confirm-mode clients) and closes the client with 320, so it
    /// reconnects (maybe to another warren) instead of waiting forever.
    pub(super) fn check_no_shard(&mut self) {
        if !self.parked.is_empty() {
            // A failed pick changes no round-robin state; unpark keeps what it cannot send.
            self.unpark();
        }
        let Some(since) = self.no_shard_since else {
            return;
        };
        if self.parked.is_empty() && (self.lazy || !self.shard_links().is_empty()) {
            // Nothing waits, and a shard link is up or none was ever needed (a connection
            // that has talked only to the control cluster, whose control link failed over).
            self.no_shard_since = None;
            return;
        }
        let wait = Duration::from_secs(self.shared.config().timeouts.failover_wait_secs);
        if since.elapsed() < wait || self.closing.is_some() {
            return;
        }
        for p in std::mem::take(&mut self.parked) {
            match p.client {
                Some(seq) => self.nack_lost(p.ch, &[seq]),
                None => {
                    self.metrics.dropped.inc();
                    warn!(conn = self.id, channel = p.ch, exchange = %p.held.publish.exchange, routing_key = %p.held.publish.routing_key,
                        "publish lost: its cluster did not come back in time and the client did not ask for confirms");
                }
            }
        }
        // A connection that has talked only to the control cluster (`lazy_links`) has no
        // shard link by design: what it holds is control traffic.
        let shards = self.shard_links();
        let what = if shards.is_empty() && !self.lazy {
            "no shard cluster is reachable"
        } else if !shards.is_empty() && shards.iter().all(|l| self.links[l].drain) {
            "every shard cluster is draining: none takes publishes"
        } else {
            "the cluster for held publishes (control) is not reachable"
        };
        // Say why, when a cluster answered: a refused login is not an outage.
        let mut why: Vec<String> = self
            .retry_at
            .iter()
            .filter_map(|(cluster, r)| Some(format!("{cluster}: {}", r.last_error.as_ref()?)))
            .collect();
        why.sort();
        let text = match why.is_empty() {
            true => what.to_owned(),
            false => format!("{what} ({})", why.join("; ")),
        };
        warn!(
            conn = self.id,
            waited_secs = wait.as_secs(),
            "{text}; closing the client"
        );
        self.begin_proxy_close(ConnError::new(ReplyCode::ConnectionForced, &text), &text);
    }

    /// The next shard link by smooth weighted round-robin over the live, ready, non-draining
    /// ones; `avoid` is skipped unless it is the only one.
    pub(super) fn pick_shard(&mut self, avoid: Option<LinkId>) -> Option<LinkId> {
        self.pick_shard_where(|l| Some(l) == avoid)
            .or_else(|| avoid.filter(|&a| self.links.get(a).is_some_and(|s| s.live())))
    }

    /// The shard link for a publish under routing rule `rule` (see `route::Rule`): among the
    /// rule's clusters, spread per message, per channel or by routing key. When none of the
    /// rule's clusters has a usable link, any shard cluster takes the publish rather than let it
    /// wait (a rule is where publishes go while its clusters are up, not a reason to lose one).
    pub(super) fn pick_by_rule(
        &mut self,
        ch: u16,
        rule: Option<usize>,
        routing_key: &ShortStr,
    ) -> Option<LinkId> {
        let Some((index, r)) = rule.and_then(|i| self.rules.rules.get(i).map(|r| (i, r))) else {
            return self.pick_shard_for(routing_key.as_bytes(), |_| false);
        };
        let spread = r.spread;
        let mut allowed = LinkSet::default();
        for (i, slot) in self.links.iter().enumerate() {
            if slot.takes_shard_publishes() && r.allows(&slot.link.cluster) {
                allowed.insert(i);
            }
        }
        let picked = match spread {
            Spread::Message => {
                self.pick_shard_for(routing_key.as_bytes(), |l| !allowed.contains(l))
            }
            Spread::Channel => {
                let kept = self.channel_mut(ch).and_then(|c| {
                    c.sticky
                        .iter()
                        .find(|(ri, _)| *ri == index)
                        .map(|&(_, l)| l)
                });
                match kept.filter(|&l| allowed.contains(l)) {
                    Some(l) => Some(l),
                    None => {
                        let l = self.pick_shard_where(|l| !allowed.contains(l));
                        if let (Some(l), Some(c)) = (l, self.channel_mut(ch)) {
                            c.sticky.retain(|(ri, _)| *ri != index);
                            c.sticky.push((index, l));
                        }
                        l
                    }
                }
            }
            Spread::Key => crate::route::by_key(
                routing_key.as_bytes(),
                allowed
                    .iter()
                    .map(|i| (i, &*self.links[i].link.cluster, self.links[i].weight)),
            ),
        };
        picked.or_else(|| self.pick_shard(None))
    }

    /// [`Self::pick_shard`] among the links `skip` does not name, with no fallback.
    pub(super) fn pick_shard_where(&mut self, skip: impl Fn(LinkId) -> bool) -> Option<LinkId> {
        self.pick_shard_for(b"", skip)
    }

    /// [`Self::pick_shard_where`] in the rotation of routing key `key` (see
    /// [`KeyedRoundRobin`](crate::route::KeyedRoundRobin)): each queue's messages spread over
    /// the clusters whatever the order in which a producer interleaves its queues.
    pub(super) fn pick_shard_for(
        &mut self,
        key: &[u8],
        skip: impl Fn(LinkId) -> bool,
    ) -> Option<LinkId> {
        let usable = |i: usize, s: &LinkSlot| s.takes_shard_publishes() && !skip(i);
        // A cluster under a resource alarm (connection.blocked) gets publishes only when every
        // other one is blocked too: publishes move rather than pause.
        let any_unblocked = self
            .links
            .iter()
            .enumerate()
            .any(|(i, s)| usable(i, s) && !s.blocked);
        let links = &self.links;
        self.rr.pick(
            key,
            links
                .iter()
                .enumerate()
                .filter(|&(i, s)| usable(i, s) && (!any_unblocked || !s.blocked))
                .map(|(i, s)| (i, s.weight)),
        )
    }

    /// Writes a publish to a link. Outside transactions the upstream channel is in confirm mode
    /// and the publish is held until the cluster confirms it, so a lost link gets it published
    /// again elsewhere instead of lost (a nack is the client's answer).
    pub(super) fn send_publish(
        &mut self,
        ch: u16,
        link: LinkId,
        client_seq: Option<u64>,
        held: Held,
        tx: bool,
    ) {
        let slot = &mut self.links[link];
        slot.m.publishes.inc();
        if matches!(slot.chan_state(ch), UpState::Closed | UpState::Closing) {
            slot.open(ch, Pending::Internal);
        }
        let done = slot.done();
        let up = slot.chan(ch);
        if !tx && !up.confirm_mode && !done && self.hold_publishes {
            up.confirm_mode = true;
            slot.link.send(
                ch,
                &Method::ConfirmSelect(codec::ConfirmSelect { nowait: true }),
            );
        }
        let method = Method::BasicPublish(held.publish.clone());
        slot.send_content(ch, &method, &held.content);
        let up = slot.chan(ch);
        if up.confirm_mode {
            up.confirms.record(client_seq, held, &self.held);
            slot.m.confirms_pending.inc();
        }
    }

    /// Publishes again a message whose link died before its cluster confirmed it: to any other
    /// shard cluster, or it waits for one. A duplicate is possible when the cluster took the
    /// message and died before confirming it: counted in `warren_republished`. (A nacked
    /// publish is never sent again: see `Session::confirm`.) Returns the link it went to.
    pub(super) fn republish(
        &mut self,
        ch: u16,
        failed: LinkId,
        inflight: InFlight,
    ) -> Option<LinkId> {
        // Parked ones included: they go out again once a shard link is back.
        self.metrics.republished.inc();
        let InFlight { client, held, .. } = inflight;
        let class = self.rules.publish(
            held.publish.exchange.as_bytes(),
            held.publish.routing_key.as_bytes(),
        );
        let (open, tx) = self.channel_mut(ch).map_or((false, false), |c| {
            (
                matches!(c.state, ChannelState::Open | ChannelState::Opening),
                c.tx,
            )
        });
        let target = match class {
            _ if held.pinned => None,
            Class::Control => self.control_link().filter(|&l| l != failed),
            Class::Sharded => self
                .pick_shard(Some(failed))
                .filter(|&l| self.links[l].live()),
        };
        // The channel has selected tx since this was published: only an upstream channel still
        // in confirm mode may take it again (elsewhere it would join the client's transaction,
        // or vanish in a channel being reopened for it).
        let target = target.filter(|&l| !tx || self.links[l].confirming(ch));
        match target {
            Some(link) if open => {
                debug!(conn = self.id, channel = ch, from = %self.links[failed].link.cluster, to = %self.links[link].link.cluster, "publishing again");
                // Its reply now comes through this link.
                let reply_request = self.reply_request(ch, &held.content);
                self.count_reply_request(link, reply_request);
                self.send_publish(ch, link, client, held, false);
                return Some(link);
            }
            None if open && !held.pinned && self.closing.is_none() && !tx => {
                // Its cluster (the control cluster, or the only shard cluster) is failing
                // over: wait for its link to come back.
                self.park(class, ch, client, held);
            }
            _ => {
                if let Some(seq) = client {
                    self.nack_lost(ch, &[seq]);
                } else {
                    self.metrics.dropped.inc();
                    warn!(conn = self.id, channel = ch, exchange = %held.publish.exchange, routing_key = %held.publish.routing_key,
                        "publish lost: no cluster can take it and the client did not ask for confirms");
                }
            }
        }
        None
    }
}
