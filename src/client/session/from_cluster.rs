//! What the clusters send back: deliveries (tags rewritten), publisher confirms mapped to the
//! client's sequence numbers, replies merged into one per client request, and connection-level
//! methods (close, blocked/unblocked) of each link.

use super::*;

/// How often a connection's gets renew a queue's lease on the clusters they did not ask, at
/// most (see [`Session::renew_lease`]).
const LEASE_RENEWAL: Duration = Duration::from_secs(1);

/// How soon after a reply to a direct reply-to address a link's 541 is taken for RabbitMQ's
/// crash on a reply naming a node that is not running.
const DIRECT_REPLY_CRASH_WINDOW: Duration = Duration::from_secs(2);

impl Session {
    pub(super) fn on_link_command(&mut self, link: LinkId, cmd: Command) {
        let Command {
            channel: ch,
            mut method,
            content,
        } = cmd;
        let content = match (&method, content) {
            (Method::BasicDeliver(_) | Method::BasicGetOk(_) | Method::BasicReturn(_), Some(c)) => {
                Some(self.mark_reply_to(link, c))
            }
            (_, c) => c,
        };
        // A reply returned by the cluster that took it: it names the address as RabbitMQ knows
        // it; the client published to the one warren handed out. (Rewritten in place: moving
        // every command's method out of and back into its enum costs on the delivery path.)
        if let Method::BasicReturn(r) = &mut method
            && r.exchange.is_empty()
            && let Some(marked) = self.marked_address(link, r.routing_key.as_bytes())
        {
            r.routing_key = marked;
        }
        if ch == 0 {
            return self.on_link_connection_method(link, method);
        }
        // While a close waits for the client's confirms they pass, and so does a mandatory
        // publish's basic.return, which comes before its confirm: without it the client would
        // take the publish for routed.
        if self.closing.is_some()
            && !(self.close_waits_for_confirms()
                && matches!(
                    method,
                    Method::BasicAck(_) | Method::BasicNack(_) | Method::BasicReturn(_)
                ))
        {
            return;
        }
        if let Some(owner) = self.links[link]
            .chans
            .get(usize::from(ch))
            .and_then(|u| u.side_for)
        {
            return self.on_side_method(link, ch, owner, method);
        }
        // After sending channel.close a peer discards everything on that channel but close and
        // close-ok (a late reply must not be taken for the reply to a reopened channel).
        let closing = self.links[link].chan_state(ch) == UpState::Closing;
        if closing
            && !matches!(method, Method::ChannelClose(_) | Method::ChannelCloseOk(_))
            && !self.owed_before_client_close(link, ch, &method)
        {
            return;
        }
        // The first request this cluster had not answered when it closed the channel: the
        // refused one (requests before it were answered, in order).
        let refused_before = match &method {
            Method::ChannelClose(_) => self.links[link]
                .chans
                .get(usize::from(ch))
                .and_then(|up| {
                    up.pending.iter().find_map(|w| match w.who {
                        Pending::Rpc(id) | Pending::Fence(id) => Some(id),
                        _ => None,
                    })
                })
                .unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        // Upstream channel bookkeeping first: it is independent of the client channel's fate.
        match &method {
            Method::ChannelClose(_) | Method::ChannelCloseOk(_) => {
                let by_broker = matches!(method, Method::ChannelClose(_));
                if !by_broker && !closing {
                    return;
                }
                if let Method::ChannelClose(c) = &method
                    && matches!(
                        self.links[link].chan(ch).pending.front().map(|w| w.who),
                        Some(Pending::Replay)
                    )
                {
                    // The cluster refused part of the replay after a failover: a queue or
                    // exchange of this client is gone there (deleted meanwhile, or dropped by
                    // RabbitMQ with the old link). It cannot be brought back without creating
                    // an empty stand-in on one cluster: the client is told, as one broker
                    // would tell it by closing its connection.
                    let cluster = self.links[link].link.cluster.clone();
                    let text = if self.links[link].shared_replay {
                        // The declares it replays may be other clients' (made while the cluster
                        // was unreachable), which this client's user may not be allowed to
                        // make: the next link to the cluster, maybe another user's, tries
                        // again, so the cluster does not stay without them.
                        self.shared.mark_stale(&self.vhost, &cluster);
                        format!(
                            "link to cluster {cluster}: the topology declared through this proxy \
                             while the cluster was unreachable, replayed there with this \
                             client's credentials, was refused ({} {})",
                            c.reply_code, c.reply_text
                        )
                    } else {
                        format!(
                            "link to cluster {cluster} failed over and the client's state is gone there ({} {})",
                            c.reply_code, c.reply_text
                        )
                    };
                    warn!(conn = self.id, %cluster, "{text}; closing the client connection");
                    self.begin_proxy_close(
                        ConnError::new(ReplyCode::ConnectionForced, &text),
                        &text,
                    );
                    return;
                }
                let slot = &mut self.links[link];
                if by_broker {
                    slot.send(ch, &Method::ChannelCloseOk(Default::default()));
                }
                let tx_swap = slot.chan(ch).tx_swap.take();
                if tx_swap.is_some() {
                    self.tx_swaps -= 1;
                }
                if self.reset_and_reopen(link, ch) {
                    // The client closed and reopened while this close was in flight, or warren
                    // closed it to reopen it for a tx.select.
                    if let Some(id) = tx_swap {
                        self.finish_tx_swap(link, ch, id);
                    }
                    return;
                }
            }
            Method::ChannelOpenOk(_) => {
                let up = self.links[link].chan(ch);
                if up.state == UpState::Opening {
                    up.state = UpState::Open;
                }
            }
            // The broker ended the consumer: nothing more comes for it on this link. If warren
            // had sent its cancel already (the client's, or warren's own), the cancel-ok still
            // to come settles it, and the tag may by now be a new consumer's that this notice
            // must not end (see `UpConsumers`).
            Method::BasicCancel(c)
                if !self.links[link]
                    .chan(ch)
                    .consumers
                    .cancelled_by_broker(c.consumer_tag.as_bytes()) =>
            {
                return;
            }
            _ => {}
        }
        let link_ref = self.link_ref(link);
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        match channel.state {
            ChannelState::AwaitingCloseOk => return,
            ChannelState::ClientClosing => {
                if is_reply(&method) && !matches!(method, Method::ChannelCloseOk(_)) {
                    // A reply to a request the client sent before its close.
                    return self.on_reply(link, ch, method, content);
                }
                if let Method::BasicDeliver(d) = &method {
                    // Sent before the cluster read the close: one broker's client gets it
                    // before close-ok too (with no_ack, the broker has already let it go).
                    let up = self.links[link].chans.get(usize::from(ch));
                    let no_ack = delivery_no_ack(up, channel, d.consumer_tag.as_bytes());
                    if must_hold(channel) {
                        channel.held.push((link_ref, method, content, no_ack));
                    } else {
                        self.deliver_tagged(ch, link_ref, method, content.as_ref(), no_ack);
                    }
                    return;
                }
                // Confirms and returns of publishes the cluster took before it read the close:
                // one broker sends those it has before its close-ok too. Dropped, they would
                // leave routed messages unconfirmed, and a publisher resending what a
                // channel's close left unconfirmed would send them twice.
                match method {
                    Method::BasicAck(a) => {
                        return self.confirm(link, ch, a.delivery_tag, a.multiple, true);
                    }
                    Method::BasicNack(n) => {
                        return self.confirm(link, ch, n.delivery_tag, n.multiple, false);
                    }
                    Method::BasicReturn(_) => return self.pass_return(link, ch, method, content),
                    _ => {}
                }
                if let Method::ChannelClose(c) = &method
                    && channel.refused_while_closing.is_none()
                    && channel.rpcs.iter().any(|r| r.id == refused_before)
                {
                    // The cluster refused a request the client sent before its close: one
                    // broker closes the channel with that refusal, then answers the client's
                    // close; what came after the refused request is discarded.
                    channel.rpcs.retain(|r| r.id < refused_before);
                    channel.refused_while_closing = Some(c.clone());
                }
                if matches!(method, Method::ChannelCloseOk(_) | Method::ChannelClose(_)) {
                    self.finish_client_close(ch);
                }
                return;
            }
            ChannelState::Opening | ChannelState::Open | ChannelState::Failing => {}
        }
        if is_reply(&method) {
            return self.on_reply(link, ch, method, content);
        }
        match method {
            Method::ChannelClose(c) => self.refused_by_cluster(ch, c, refused_before),
            Method::ChannelCloseOk(_) => {}
            deliver @ Method::BasicDeliver(_) => {
                if self.links[link].removed_at.is_some() {
                    self.links[link].last_delivery = Instant::now();
                }
                let no_ack = match &deliver {
                    Method::BasicDeliver(d) => {
                        let up = self.links[link].chans.get(usize::from(ch));
                        delivery_no_ack(up, channel, d.consumer_tag.as_bytes())
                    }
                    _ => false,
                };
                if channel.recovered_on(link) {
                    // A redelivery after this cluster's recover-ok or commit-ok: the client
                    // gets it after its own, as from one broker.
                    channel
                        .after_recover
                        .push((link_ref, deliver, content, no_ack));
                    return;
                }
                if must_hold(channel) {
                    // Until the client has its consume-ok, and while a get-ok waits for its
                    // turn, deliveries of the channel wait, in order, without a client tag yet.
                    channel.held.push((link_ref, deliver, content, no_ack));
                    return;
                }
                self.deliver_tagged(ch, link_ref, deliver, content.as_ref(), no_ack);
            }
            Method::BasicAck(a) => self.confirm(link, ch, a.delivery_tag, a.multiple, true),
            Method::BasicNack(n) => self.confirm(link, ch, n.delivery_tag, n.multiple, false),
            Method::BasicCancel(ref c) => {
                // A cluster cancelled the consumer: its queue was deleted there, or its mirrored
                // queue failed over under `x-cancel-on-ha-failover`. Keeping the consumer on the
                // other clusters would leave the client a consumer that silently no longer reads
                // this cluster's part of the queue; one broker ends the consumer and says so.
                // So it ends on every cluster, and the client is told once, when the last has
                // answered: what they deliver meanwhile still reaches the client, before the
                // basic.cancel, as one broker's deliveries come before its basic.cancel.
                self.proven_exchanges.clear();
                let deleting = self.deleting_queue_of(ch, &c.consumer_tag);
                let Some(channel) = channel_in(&mut self.channels, ch) else {
                    return;
                };
                let Some(consumer) = channel.consumer_mut(&c.consumer_tag) else {
                    return;
                };
                consumer.links.remove(link);
                let others = consumer.links;
                if others.is_empty() {
                    return self.end_cancelled_consumer(ch, &c.consumer_tag);
                }
                if consumer.request.take().is_none() {
                    // The client is cancelling it already (its cancel-ok is on the way), or
                    // another cluster cancelled it first (the others' answers are awaited).
                    return;
                }
                consumer.cancelled_by_cluster = true;
                if deleting {
                    // This connection is deleting the consumer's queue, one cluster after the
                    // other: each ends the consumer as the delete reaches it (and a refused
                    // delete fails the channel, which ends it everywhere). A cancel of
                    // warren's sent beside the delete would cross it, and RabbitMQ 3.10 fails
                    // the whole link for a quorum queue's consumer cancelled just after the
                    // queue went (541, `{case_clause,{error,noproc}}` in its channel).
                    return;
                }
                let cluster = &self.links[link].link.cluster;
                info!(conn = self.id, %cluster, channel = ch, consumer = %c.consumer_tag.as_str(), "consumer cancelled by the cluster; cancelling it on the others");
                let cancel = Method::BasicCancel(codec::BasicCancel {
                    consumer_tag: c.consumer_tag.clone(),
                    nowait: false,
                });
                for other in others.iter() {
                    self.links[other].request(ch, &cancel, Pending::Internal);
                }
            }
            ret @ Method::BasicReturn(_) => self.pass_return(link, ch, ret, content),
            _ => self.deliver(ch, &method, content.as_ref()),
        }
    }

    /// A basic.return of `link` for client channel `ch`.
    fn pass_return(&mut self, link: LinkId, ch: u16, ret: Method, content: Option<Content>) {
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        // Returned behind this link's reply to a request the client has not had yet (a
        // mandatory publish pipelined behind a declare): after that reply.
        if let Some(until) = channel.answered_by(link) {
            channel.after_replies.push_back(AfterReply {
                until,
                method: ret,
                content,
            });
            return;
        }
        self.deliver(ch, &ret, content.as_ref());
    }

    /// A reply to a synchronous request: pair it with its request and answer the client once
    /// the request is complete.
    pub(super) fn on_reply(
        &mut self,
        link: LinkId,
        ch: u16,
        method: Method,
        content: Option<Content>,
    ) {
        let pending = self.links[link].take_waiting(ch, &method);
        if let (Some(Pending::Internal), Method::BasicCancelOk(c)) = (&pending, &method)
            && let Some(channel) = channel_in(&mut self.channels, ch)
            && let Some(consumer) = channel.consumer_mut(&c.consumer_tag)
            && consumer.cancelled_by_cluster
        {
            // One of the clusters warren cancelled the consumer on has answered: nothing more
            // comes from it for this tag.
            consumer.links.remove(link);
            if consumer.links.is_empty() {
                self.end_cancelled_consumer(ch, &c.consumer_tag);
            }
        }
        // A tx.select may be waiting for this channel to have no request outstanding.
        if self.tx_swaps > 0 {
            self.links[link].start_tx_swap_if_settled(ch);
        }
        if let Some(Pending::Replay) = pending {
            self.replayed_one(link);
            return;
        }
        if let Some(Pending::Barrier) = pending {
            return self.barrier_passed();
        }
        if let Some(Pending::Fence(id)) = pending {
            return self.fence_passed(link, ch, id);
        }
        let Some(Pending::Rpc(id)) = pending else {
            return;
        };
        self.answer_rpc(link, ch, id, method, content);
    }

    /// Folds `link`'s reply into request `id` of client channel `ch`.
    pub(super) fn answer_rpc(
        &mut self,
        link: LinkId,
        ch: u16,
        id: u64,
        method: Method,
        content: Option<Content>,
    ) {
        let link_ref = self.link_ref(link);
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        let Some(rpc) = channel.rpc_mut(id) else {
            return;
        };
        rpc.answered.insert(link);
        if let Method::BasicGetEmpty(_) = method
            && let Some(get) = rpc.get_request.clone()
        {
            while let Some(next) = rpc.get_next.pop() {
                if self.links[next].live() {
                    self.links[next].request(ch, &get, Pending::Rpc(id));
                    return;
                }
            }
            if self.get_waits_for_missing_cluster(ch, id) {
                return;
            }
        }
        let Some(rpc) = channel_in(&mut self.channels, ch).and_then(|c| c.rpc_mut(id)) else {
            return;
        };
        if !rpc.in_turn.is_empty() {
            // The first cluster decided who wins a race; the others can only agree with it, so
            // a declare, delete or exclusive consume goes to all of them at once (10,000
            // pipelined exclusive declares took a third less time than one cluster after the
            // other). A bind still goes one cluster at a time: one refused (an exchange
            // missing there) must not stay made on a cluster asked later.
            let bind = matches!(rpc.request, Method::QueueBind(_) | Method::ExchangeBind(_));
            let mut next = Vec::new();
            while let Some(link) = rpc.in_turn.pop() {
                if self.links[link].live() {
                    next.push(link);
                    if bind {
                        break;
                    }
                }
            }
            if !next.is_empty() {
                rpc.merge(method, content, link_ref);
                rpc.waiting += u32::try_from(next.len()).unwrap_or(u32::MAX);
                for link in next {
                    self.links[link].request(ch, &rpc.request, Pending::Rpc(id));
                }
                return;
            }
        }
        rpc.merge(method, content, link_ref);
        self.flush_rpcs(ch);
    }

    /// Answers the client's channel.close of `ch` once nothing before it is owed: every link
    /// that carried the channel has closed its part (a close-ok, a broker's close, or the link
    /// died with it) and no request of the channel waits for a cluster's next link
    /// ([`Session::orphan_rpc`]). Called wherever one of these ends (a close-ok, a link's
    /// death, an orphan answered or given up, the client's close itself), since a link that
    /// dies sends no close-ok: a close owed by it waited for ever.
    pub(super) fn finish_client_close(&mut self, ch: u16) {
        let closing = self
            .channels
            .get(usize::from(ch))
            .and_then(Option::as_ref)
            .is_some_and(|c| c.state == ChannelState::ClientClosing);
        if !closing
            || self
                .links
                .iter()
                .any(|s| !s.done() && s.chan_state(ch) == UpState::Closing)
            || self.orphans.iter().any(|o| o.ch == ch)
        {
            return;
        }
        // Every cluster answered what came before its close (a dead link's part settled as its
        // orphans were): the replies go out, then the close-ok.
        self.flush_rpcs(ch);
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        if channel.state != ChannelState::ClientClosing {
            // A request before the close failed as the replies went out: warren's close,
            // with the close-ok for the client's, is out already (see `fail_channel`).
            return;
        }
        channel.rpcs.clear();
        let refusal = channel.refused_while_closing.take();
        if let Some(refusal) = &refusal {
            // The client answers this close with a close-ok of its own, which the channel
            // waits for, as RabbitMQ's does.
            channel.state = ChannelState::AwaitingCloseOk;
            self.to_client(ch, &Method::ChannelClose(refusal.clone()));
        }
        self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
        if refusal.is_none() {
            self.free_channel(ch);
        }
    }

    /// Whether `method`, arriving on `link`'s channel `ch` after warren sent its close there,
    /// answers a request the client sent before its own channel.close, or is a delivery, a
    /// publisher confirm or a return the cluster sent before it read that close: they still go
    /// to the client, before its close-ok.
    fn owed_before_client_close(&self, link: LinkId, ch: u16, method: &Method) -> bool {
        let owed = match method {
            Method::BasicDeliver(_)
            | Method::BasicAck(_)
            | Method::BasicNack(_)
            | Method::BasicReturn(_) => true,
            m => {
                is_reply(m)
                    && self.links[link]
                        .chans
                        .get(usize::from(ch))
                        .is_some_and(|up| !up.pending.is_empty())
            }
        };
        owed && self
            .channels
            .get(usize::from(ch))
            .and_then(Option::as_ref)
            .is_some_and(|c| c.state == ChannelState::ClientClosing)
    }

    /// `before` is the first request the cluster had not answered (the refused one, or one
    /// behind it): the client's requests before it are still answered.
    fn refused_by_cluster(&mut self, ch: u16, c: codec::ChannelClose, before: u64) {
        if c.class_id == 60 && c.method_id == 40 {
            // A refused publish: exchanges accepted before are checked again.
            self.proven_exchanges.clear();
        }
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        let mut c = c;
        // A direct reply-to address is asked of its cluster under RabbitMQ's own name: the
        // refusal names the address the client asked about, as one broker's does.
        if let Some(rpc) = channel.rpcs.iter().find(|r| r.id == before)
            && let (Some(asked), Method::QueueDeclare(sent)) = (&rpc.rename, &rpc.request)
            && let Ok(text) = ShortStr::try_from(
                c.reply_text
                    .as_str()
                    .replace(&*sent.queue.as_str(), &asked.as_str()),
            )
        {
            c.reply_text = text;
        }
        self.fail_channel(ch, c, before, "sibling channel closed");
    }

    /// Fails client channel `ch` with `close`, as one broker fails a channel at a refused
    /// request: the client's requests before it (ids below `before`) are answered first, in
    /// order, as their replies complete (other clusters still owe them: a declare-ok, the
    /// name of a server-named queue), then the channel.close goes to the client and the
    /// channel's parts on the clusters are closed with `siblings` as their text. Requests from
    /// `before` on are discarded, as one broker discards what follows a refused method. Of two
    /// refusals, the one of the earlier request is the one the client gets.
    pub(super) fn fail_channel(
        &mut self,
        ch: u16,
        close: codec::ChannelClose,
        before: u64,
        siblings: &'static str,
    ) {
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            self.to_client(ch, &Method::ChannelClose(close));
            let m = close_method(200, siblings);
            for slot in &mut self.links {
                slot.close_chan(ch, &m);
            }
            return;
        };
        match channel.state {
            ChannelState::Opening | ChannelState::Open => {
                channel.rpcs.retain(|r| r.id < before);
                channel.state = ChannelState::Failing;
                channel.failing = Some(PendingClose {
                    close,
                    before,
                    siblings,
                    client_closed: false,
                });
            }
            ChannelState::Failing => {
                if let Some(f) = channel.failing.as_mut()
                    && before < f.before
                {
                    channel.rpcs.retain(|r| r.id < before);
                    f.close = close;
                    f.before = before;
                }
            }
            ChannelState::ClientClosing | ChannelState::AwaitingCloseOk => {
                // Already closing: the close goes out at once, as it always did, and the
                // client's own close crossed it: answered with close-ok, as RabbitMQ does.
                let client_closed = channel.state == ChannelState::ClientClosing;
                channel.failing = Some(PendingClose {
                    close,
                    before,
                    siblings,
                    client_closed,
                });
                self.finish_failing(ch);
                return;
            }
        }
        self.flush_rpcs(ch);
    }

    /// The requests before a channel's refusal are answered: its channel.close goes out now.
    fn finish_failing(&mut self, ch: u16) {
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        let Some(f) = channel.failing.take() else {
            return;
        };
        channel.state = ChannelState::AwaitingCloseOk;
        channel.rpcs.clear();
        channel.tags.forget_all(|l| unacked_dec(&self.links, l));
        self.to_client(ch, &Method::ChannelClose(f.close));
        if f.client_closed {
            // The client's own close crossed this one: answered, as RabbitMQ does.
            self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
        }
        let m = close_method(200, f.siblings);
        for slot in &mut self.links {
            slot.close_chan(ch, &m);
        }
    }

    /// A method on one of warren's own channels (see [`LinkSlot::side_request`]) that serves
    /// client channel `owner`: the reply is the client's request's, and the channel closes
    /// once it is in. A refusal closes only this channel: a missing queue counts as empty and
    /// unused (what deleting it would find), anything else fails the client channel.
    fn on_side_method(&mut self, link: LinkId, n: u16, owner: u16, method: Method) {
        let slot = &mut self.links[link];
        match method {
            Method::ChannelOpenOk(_) => {
                let up = slot.chan(n);
                up.pending.pop_front();
                if up.state == UpState::Opening {
                    up.state = UpState::Open;
                }
            }
            Method::ChannelClose(c) => {
                slot.send(n, &Method::ChannelCloseOk(Default::default()));
                let who = slot
                    .chan(n)
                    .pending
                    .iter()
                    .rev()
                    .map(|w| w.who)
                    .find(|w| !matches!(w, Pending::Internal));
                self.reset_and_reopen(link, n);
                let id = match who {
                    Some(Pending::Rpc(id)) => id,
                    Some(Pending::ReplayCheck(id)) => {
                        return self.replay_check_refused(link, owner, id, &c);
                    }
                    Some(Pending::Probe(id)) => {
                        let missing = c.reply_code == ReplyCode::NotFound.code();
                        return self.probe_answered(id, !missing);
                    }
                    _ => return,
                };
                let Some((request, permission)) = channel_in(&mut self.channels, owner)
                    .and_then(|c| c.rpc_mut(id))
                    .map(|r| (r.request.clone(), r.permission.clone()))
                else {
                    return;
                };
                if let Some(permission) = permission {
                    return self.permission_answered(link, owner, id, &permission, c);
                }
                let Method::QueueDeclare(check) = request else {
                    return;
                };
                if c.reply_code == ReplyCode::NotFound.code() {
                    let ok = Method::QueueDeclareOk(codec::QueueDeclareOk {
                        queue: check.queue,
                        message_count: 0,
                        consumer_count: 0,
                    });
                    self.answer_rpc(link, owner, id, ok, None);
                } else {
                    // Refused for another reason (an exclusive queue of another connection,
                    // no permission): the delete the check stood for is refused alike.
                    let (class_id, method_id) =
                        Method::QueueDelete(codec::QueueDelete::default()).ids();
                    self.refused_by_cluster(
                        owner,
                        codec::ChannelClose {
                            class_id,
                            method_id,
                            ..c
                        },
                        id,
                    );
                }
            }
            Method::ChannelCloseOk(_) => {
                self.reset_and_reopen(link, n);
            }
            reply if is_reply(&reply) => {
                let who = slot.take_waiting(n, &reply);
                let up = slot.chan(n);
                if up.state == UpState::Open {
                    up.state = UpState::Closing;
                    slot.send(n, &close_method(200, "check answered"));
                }
                match who {
                    Some(Pending::Rpc(id)) => self.answer_rpc(link, owner, id, reply, None),
                    Some(Pending::ReplayCheck(id)) => self.replay_check_passed(link, id),
                    Some(Pending::Probe(id)) => self.probe_answered(id, true),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Upstream channel `ch` of `link` is closed (a client's, or warren's own): frees it, and
    /// opens it again for whoever asked meanwhile (the client reopening the number, or a
    /// tx.select). Returns whether it was reopened.
    fn reset_and_reopen(&mut self, link: LinkId, ch: u16) -> bool {
        let slot = &mut self.links[link];
        let Some(p) = slot.reset_chan(ch) else {
            return false;
        };
        slot.open(ch, p);
        self.reopen_wait = self.links.iter().any(LinkSlot::reopen_pending);
        true
    }

    /// Answers completed requests at the head of the channel's queue, in request order.
    pub(super) fn flush_rpcs(&mut self, ch: u16) {
        loop {
            self.release_after_replies(ch);
            let Some(channel) = channel_in(&mut self.channels, ch) else {
                return;
            };
            if channel.rpcs.front().is_none_or(|r| r.waiting != 0) {
                if channel.rpcs.is_empty() {
                    let failing = channel.failing.is_some();
                    for notice in std::mem::take(&mut channel.notices) {
                        self.to_client(ch, &notice);
                    }
                    if failing {
                        self.finish_failing(ch);
                    }
                }
                return;
            }
            let Some(rpc) = channel.rpcs.pop_front() else {
                return;
            };
            let Some(reply) = rpc.reply else {
                // Every cluster this request went to died before answering.
                let m = Method::ChannelOpen(Default::default());
                self.close_channel(
                    ch,
                    ReplyCode::InternalError,
                    "the cluster(s) for this request became unavailable",
                    &m,
                );
                return;
            };
            if let Some(permission) = rpc.permission {
                if self.permission_confirmed(ch, rpc.id, permission) {
                    continue;
                }
                return;
            }
            if let Some(delete) = rpc.then_delete {
                self.finish_checked_delete(ch, delete, reply.method);
                continue;
            }
            if let Some((class, m)) = rpc.on_success {
                self.record_topology(class, m);
            }
            if rpc.silent {
                continue;
            }
            let mut reply = reply;
            if let (Some(name), Method::QueueDeclareOk(ok)) = (rpc.rename, &mut reply.method) {
                ok.queue = name;
            }
            let Some(channel) = channel_in(&mut self.channels, ch) else {
                return;
            };
            match reply.method {
                Method::ChannelOpenOk(ok) => {
                    if channel.state == ChannelState::Opening {
                        channel.state = ChannelState::Open;
                        self.to_client(ch, &Method::ChannelOpenOk(ok));
                    } else if channel.state == ChannelState::Failing {
                        // Opened, then refused at a request behind the open.
                        self.to_client(ch, &Method::ChannelOpenOk(ok));
                    }
                }
                Method::BasicGetOk(mut g) => {
                    // Each get carries its own no_ack (two pipelined gets may differ).
                    let needs_ack =
                        !matches!(&rpc.get_request, Some(Method::BasicGet(r)) if r.no_ack);
                    // Deliveries of the same link that arrived before this get-ok (lower
                    // upstream tags) and wait in `held` are numbered first, so that on every
                    // link the client's tags keep growing with the upstream ones.
                    let earlier = take_held_before(channel, reply.link, g.delivery_tag);
                    for (link, d, content, no_ack) in earlier {
                        self.deliver_tagged(ch, link, d, content.as_ref(), no_ack);
                    }
                    let Some(channel) = channel_in(&mut self.channels, ch) else {
                        return;
                    };
                    // A get-ok whose link died meanwhile: the broker requeued the message, so
                    // the client's ack of it is swallowed (never sent to another link).
                    let live = slot_of(&self.links, reply.link).filter(|s| !s.done());
                    let link = live.map_or(LinkRef::DEAD, |_| reply.link);
                    g.delivery_tag = channel.tags.issue(link, g.delivery_tag, needs_ack);
                    if let Some(slot) = live {
                        slot.m.deliveries.inc();
                        if needs_ack {
                            slot.m.unacked.inc();
                        }
                    }
                    self.deliver(ch, &Method::BasicGetOk(g), reply.content.as_ref());
                    if let Some(Method::BasicGet(get)) = &rpc.get_request {
                        self.renew_lease(ch, &get.queue, &rpc.get_next);
                    }
                    self.release_held_deliveries(ch);
                }
                Method::BasicGetEmpty(e) => {
                    self.to_client(ch, &Method::BasicGetEmpty(e));
                }
                Method::BasicCancelOk(c) => {
                    channel.remove_consumer(&c.consumer_tag);
                    channel.drop_cancel_notice(&c.consumer_tag);
                    self.to_client(ch, &Method::BasicCancelOk(c));
                }
                Method::BasicConsumeOk(ok) => {
                    if let Some(c) = channel.consumer_mut(&ok.consumer_tag) {
                        c.ready = true;
                    }
                    self.to_client(ch, &Method::BasicConsumeOk(ok));
                    self.release_held_deliveries(ch);
                }
                Method::TxCommitOk(ok) => {
                    channel.tx_log.committing = None;
                    self.to_client(ch, &Method::TxCommitOk(ok));
                    self.release_after_recover(ch);
                }
                Method::BasicRecoverOk(ok) => {
                    self.to_client(ch, &Method::BasicRecoverOk(ok));
                    self.release_after_recover(ch);
                }
                other => self.to_client(ch, &other),
            }
        }
    }

    /// Sends the returns and confirms that waited for replies the client now has (see
    /// [`AfterReply`]), in order.
    fn release_after_replies(&mut self, ch: u16) {
        while let Some(channel) = channel_in(&mut self.channels, ch)
            && channel.after_reply_ready()
            && let Some(w) = channel.after_replies.pop_front()
        {
            self.deliver(ch, &w.method, w.content.as_ref());
        }
    }

    /// Sends a publisher confirm to the client, or queues it (see [`AfterReply`]) behind the
    /// replies it must follow: `link`'s answers to requests the client has not had the merged
    /// reply to, and any return or confirm already waiting, since the client's confirms must
    /// keep their order (a `multiple` one settles every number before it).
    pub(super) fn send_confirm(&mut self, ch: u16, link: Option<LinkId>, confirm: Method) {
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        let until = link
            .and_then(|l| channel.answered_by(l))
            .or_else(|| channel.after_replies.back().map(|w| w.until));
        match until {
            Some(until) => channel.after_replies.push_back(AfterReply {
                until,
                method: confirm,
                content: None,
            }),
            None => self.to_client(ch, &confirm),
        }
    }

    /// Whether a queue.delete of the queue consumer `tag` of channel `ch` reads is on its way
    /// to the clusters, on any channel of this connection.
    fn deleting_queue_of(&self, ch: u16, tag: &ShortStr) -> bool {
        let Some(queue) = self
            .channels
            .get(usize::from(ch))
            .and_then(Option::as_ref)
            .and_then(|c| c.consumers.iter().find(|k| k.tag == *tag))
            .and_then(|k| k.request.as_ref())
            .map(|r| r.queue.clone())
        else {
            return false;
        };
        self.channels.iter().flatten().any(|c| {
            c.rpcs
                .iter()
                .any(|r| matches!(&r.request, Method::QueueDelete(d) if d.queue == queue))
        })
    }

    /// The consumer `tag` of channel `ch`, cancelled by a cluster, has ended on every cluster:
    /// the client is told, once (after the replies it is owed, see `Channel::notices`).
    pub(super) fn end_cancelled_consumer(&mut self, ch: u16, tag: &ShortStr) {
        let notify = self.caps.consumer_cancel_notify;
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        channel.remove_consumer(tag);
        if !notify {
            return;
        }
        let cancel = Method::BasicCancel(codec::BasicCancel {
            consumer_tag: tag.clone(),
            nowait: true,
        });
        if channel.rpcs.is_empty() {
            self.to_client(ch, &cancel);
        } else {
            channel.notices.push(cancel);
        }
    }

    /// Gives a delivery (`deliver`, a basic.deliver) of `link` its client tag and sends it.
    /// The method is rewritten in place: it is the largest there is, and moving it in and out
    /// of its enum showed up in profiles.
    /// `no_ack` is the ack mode of the consumer the delivery was for (see [`delivery_no_ack`]).
    pub(super) fn deliver_tagged(
        &mut self,
        ch: u16,
        link: LinkRef,
        mut deliver: Method,
        content: Option<&Content>,
        no_ack: bool,
    ) {
        let Method::BasicDeliver(d) = &mut deliver else {
            return;
        };
        let Some(slot) = slot_of_mut(&mut self.links, link) else {
            // A delivery held back from a link that is gone (a later link took its slot): its
            // broker requeued the message, which comes again. Passing this copy on would
            // deliver it twice, with a tag no ack could settle.
            warn!(
                conn = self.id,
                channel = ch,
                "dropped a held delivery of a link that is gone (its broker requeued it)"
            );
            return;
        };
        let m = &slot.m;
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        let tag = d.consumer_tag.as_bytes();
        let needs_ack = !no_ack;
        if !needs_ack && channel.consumes_replies(tag) {
            // As RabbitMQ numbers direct replies: the next tag, not used up.
            d.delivery_tag = channel.tags.peek();
            m.deliveries.inc();
            slot.direct_replies += 1;
            return self.deliver(ch, &deliver, content);
        }
        d.delivery_tag = channel.tags.issue(link, d.delivery_tag, needs_ack);
        m.deliveries.inc();
        if needs_ack {
            m.unacked.inc();
        }
        self.deliver(ch, &deliver, content);
    }

    /// Sends the channel's held deliveries, in arrival order, once nothing they wait for is
    /// left (see [`must_hold`]).
    pub(super) fn release_held_deliveries(&mut self, ch: u16) {
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        if channel.held.is_empty() || waiting_for_client_order(channel) {
            return;
        }
        for (link, m, content, no_ack) in std::mem::take(&mut channel.held) {
            self.deliver_tagged(ch, link, m, content.as_ref(), no_ack);
        }
    }

    /// Sends the deliveries that waited for the client's recover-ok (see
    /// [`Channel::recovered_on`]), in arrival order, behind anything else they must follow.
    fn release_after_recover(&mut self, ch: u16) {
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return;
        };
        for (link, m, content, no_ack) in std::mem::take(&mut channel.after_recover) {
            let Some(channel) = channel_in(&mut self.channels, ch) else {
                return;
            };
            if must_hold(channel) {
                channel.held.push((link, m, content, no_ack));
            } else {
                self.deliver_tagged(ch, link, m, content.as_ref(), no_ack);
            }
        }
    }

    pub(super) fn deliver(&self, ch: u16, method: &Method, content: Option<&Content>) {
        let frame_max = self.frame_max;
        self.client_out.push(|buf| {
            codec::write_method(buf, ch, method);
            if let Some(content) = content {
                content.write(buf, ch, frame_max);
            }
        });
    }

    /// Maps a broker's publisher confirm back to the client's sequence numbers. A nack gets
    /// the publish sent again to another cluster; the client hears only the final outcome.
    pub(super) fn confirm(
        &mut self,
        link: LinkId,
        ch: u16,
        upstream_seq: u64,
        multiple: bool,
        ack: bool,
    ) {
        let mut settled = std::mem::take(&mut self.scratch_inflight);
        let mut seqs = std::mem::take(&mut self.scratch_seqs);
        let mut out = std::mem::take(&mut self.scratch_confirms);
        self.links[link]
            .chan(ch)
            .confirms
            .resolve(upstream_seq, multiple, &mut settled);
        let n = settled.len() as u64;
        {
            // Borrowed, not cloned: a clone is a dozen atomic increments per confirm.
            let slot = &self.links[link];
            let m = &slot.m;
            // Timed only when read as it came: a confirm that waited in the kernel for warren
            // (a lazy link's batch, or a slow client's) says nothing of the cluster.
            if let Some(first) = settled.first()
                && let Some(r) = slot.link.reader.as_ref()
                && r.confirm_on_time(first.at)
            {
                m.confirm_latency.observe(first.at.elapsed().as_secs_f64());
            }
            m.confirms_pending.dec_by(n as i64);
            if ack {
                m.confirm_acks.inc_by(n);
            } else {
                m.confirm_nacks.inc_by(n);
            }
        }
        // Their bytes are released as `settled` is cleared (see `HeldTicket`).
        if ack {
            seqs.clear();
            seqs.extend(settled.iter().filter_map(|p| p.client));
            seqs.sort_unstable();
            // Nothing to tell a client that did not ask for confirms (the scratch may still
            // hold another channel's last confirms).
            out.clear();
            if let Some(confirms) = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()) {
                confirms.settle(&seqs, &mut out);
            }
            for c in &out {
                let ack = Method::BasicAck(codec::BasicAck {
                    delivery_tag: c.seq,
                    multiple: c.multiple,
                });
                self.send_confirm(ch, Some(link), ack);
            }
            settled.clear();
        } else {
            // A nack is the cluster's final answer, passed on as one broker's: RabbitMQ nacks a
            // publish when any one queue it was routed to refuses it, after the others took it,
            // and `reject-publish-dlx` dead-letters what it refuses. Sending it to another
            // cluster would duplicate it there.
            if let Some(held_back) = self.nacks_log.allow() {
                warn!(conn = self.id, cluster = %self.links[link].link.cluster, count = n, not_logged_since_last = held_back,
                    "cluster nacked publishes (a queue full with x-overflow = reject-publish, or a failed queue); the client gets the nack");
            }
            seqs.clear();
            seqs.extend(settled.iter().filter_map(|p| p.client));
            let unconfirmed = settled.len() - seqs.len();
            settled.clear();
            if unconfirmed > 0 {
                self.metrics.dropped.inc_by(unconfirmed as u64);
                if let Some(held_back) = self.refused_drops_log.allow() {
                    warn!(conn = self.id, channel = ch, cluster = %self.links[link].link.cluster, count = unconfirmed, not_logged_since_last = held_back,
                        "publish refused (basic.nack) and the client did not ask for confirms: dropped, as RabbitMQ drops it (counted in warren_dropped_total)");
                }
            }
            if !seqs.is_empty() {
                self.nack_lost(ch, &seqs);
            }
        }
        self.scratch_inflight = settled;
        self.scratch_seqs = seqs;
        self.scratch_confirms = out;
        // A tx.select may be waiting for this channel's confirms (checked after the nacked
        // publishes went out again: they may have gone back to this channel).
        if self.tx_swaps > 0 {
            self.links[link].start_tx_swap_if_settled(ch);
        }
    }

    /// The whole-queue check of a queue.delete with `if_empty` / `if_unused` is in (see
    /// [`checked_delete`](Self::checked_delete)): refuse as RabbitMQ would, or delete
    /// everywhere.
    fn finish_checked_delete(&mut self, ch: u16, delete: codec::QueueDelete, check: Method) {
        self.input_waits_for = None;
        let request = Method::QueueDelete(delete.clone());
        let Method::QueueDeclareOk(ok) = check else {
            let text = format!("unexpected {} to a passive declare", check.name());
            self.close_channel(ch, ReplyCode::InternalError, &text, &request);
            return;
        };
        let queue = delete.queue.as_str();
        let refusal = if delete.if_empty && ok.message_count > 0 {
            Some(format!(
                "queue '{queue}' in vhost '{}' not empty",
                self.vhost
            ))
        } else if delete.if_unused && ok.consumer_count > 0 {
            Some(format!("queue '{queue}' in vhost '{}' in use", self.vhost))
        } else {
            None
        };
        if let Some(text) = refusal {
            self.close_channel(ch, ReplyCode::PreconditionFailed, &text, &request);
            return;
        }
        let unconditional = Method::QueueDelete(codec::QueueDelete {
            if_empty: false,
            if_unused: false,
            ..delete
        });
        let _ = self.fan_out_topology(ch, &unconditional, self.live_links(), true);
    }

    /// A basic.get renews an `x-expires` queue's lease on RabbitMQ; a get answered before the
    /// other clusters were asked would let the queue's copies there expire with their messages.
    /// A passive declare renews it too (RabbitMQ's `stat` resets the expiry timer), so the
    /// clusters not asked get one, for every queue: whether a queue has a lease is not something
    /// warren can know (a policy gives one, another client may have redeclared the queue with
    /// one since this connection declared it without), and a lease wrongly thought absent loses
    /// messages. One passive declare per cluster not asked, beside the get, not in its way, and
    /// at most one round of them per queue every `LEASE_RENEWAL`: a client polling with gets
    /// does not multiply the clusters' work, and a lease of a few seconds is renewed in time.
    pub(super) fn renew_lease(&mut self, ch: u16, queue: &ShortStr, untried: &[LinkId]) {
        if untried.is_empty() {
            return;
        }
        let now = Instant::now();
        if self
            .leases_renewed
            .get(queue)
            .is_some_and(|&at| now.duration_since(at) < LEASE_RENEWAL)
        {
            return;
        }
        if self.leases_renewed.len() >= 1024 {
            self.leases_renewed
                .retain(|_, at| now.duration_since(*at) < LEASE_RENEWAL);
        }
        self.leases_renewed.insert(queue.clone(), now);
        let check = Method::QueueDeclare(codec::QueueDeclare {
            queue: queue.clone(),
            passive: true,
            ..Default::default()
        });
        for &link in untried {
            if self.links[link].live() {
                self.side_check(link, ch, &check, Pending::Internal);
            }
        }
    }

    pub(super) fn on_link_connection_method(&mut self, link: LinkId, method: Method) {
        match method {
            Method::ConnectionClose(c) => {
                let slot = &mut self.links[link];
                slot.send(0, &Method::ConnectionCloseOk(Default::default()));
                if self.closing.is_none()
                    && crate::upstream::link::node_leaving(c.reply_code, &c.reply_text.as_str())
                {
                    // A node stopping or drained for maintenance: the other node serves on, so
                    // this is a failover, as when a node dies, not the client's to hear.
                    let text = c.reply_text.as_str().into_owned();
                    return self.on_link_down(link, LinkDown::NodeLeaving(text));
                }
                let slot = &mut self.links[link];
                slot.mark_done();
                match &self.closing {
                    Some(Closing::ByClient { .. }) => self.maybe_finish_client_close(),
                    Some(Closing::ByProxy { .. }) => self.maybe_tell_client_close(),
                    None => {
                        let slot = &self.links[link];
                        warn!(conn = self.id, cluster = %slot.link.cluster, code = c.reply_code, text = %c.reply_text, "broker closed the connection");
                        let reason = format!(
                            "broker closed the connection: {} {}",
                            c.reply_code, c.reply_text
                        );
                        let mut text = c.reply_text.as_str().into_owned();
                        if c.reply_code == ReplyCode::InternalError.code()
                            && slot
                                .direct_reply_sent
                                .is_some_and(|at| at.elapsed() < DIRECT_REPLY_CRASH_WINDOW)
                        {
                            // RabbitMQ says nothing more; what it is likely to be, it does say.
                            text.push_str(
                                " (just after a reply to a direct reply-to address: RabbitMQ \
                                 3.10 closes a connection whose reply names a node of the \
                                 cluster that is not running; that caller has gone)",
                            );
                        }
                        let e = ConnError {
                            code: c.reply_code,
                            text,
                            class_id: c.class_id,
                            method_id: c.method_id,
                        };
                        self.begin_proxy_close(e, &reason);
                    }
                }
            }
            Method::ConnectionCloseOk(_) => {
                self.links[link].mark_done();
                self.maybe_finish_client_close();
                self.maybe_tell_client_close();
            }
            Method::ConnectionBlocked(b) => {
                let slot = &mut self.links[link];
                if !std::mem::replace(&mut slot.blocked, true) {
                    self.blocked_links += 1;
                    if self.blocked_links == 1 && self.caps.connection_blocked {
                        self.to_client(0, &Method::ConnectionBlocked(b));
                    }
                }
            }
            Method::ConnectionUnblocked(u) => {
                let slot = &mut self.links[link];
                if std::mem::replace(&mut slot.blocked, false) {
                    self.blocked_links -= 1;
                    if self.blocked_links == 0 && self.caps.connection_blocked {
                        self.to_client(0, &Method::ConnectionUnblocked(u));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Removes from `channel.held` the deliveries of `link` with an upstream tag below `upstream`
/// (those its broker sent before the get-ok carrying `upstream`), in arrival order.
fn take_held_before(channel: &mut Channel, link: LinkRef, upstream: u64) -> Vec<HeldDelivery> {
    let mut earlier = Vec::new();
    let mut kept = Vec::with_capacity(channel.held.len());
    for held in std::mem::take(&mut channel.held) {
        match &held.1 {
            Method::BasicDeliver(d) if held.0 == link && d.delivery_tag < upstream => {
                earlier.push(held);
            }
            _ => kept.push(held),
        }
    }
    channel.held = kept;
    earlier
}

/// Whether the consumer a delivery with consumer tag `tag` is for takes it without an ack: the
/// oldest consumer of that tag subscribed on the link's channel `up` (see `UpChan::consumers`),
/// not whichever consumer of the client channel has the tag now. Shared with the fast lane,
/// which asks with a tag it has not decoded.
pub(super) fn delivery_no_ack(up: Option<&UpChan>, channel: &Channel, tag: &[u8]) -> bool {
    up.and_then(|up| up.no_ack_of(tag))
        .unwrap_or_else(|| channel.consumer_no_ack(tag))
}

/// Whether a delivery arriving on the channel now must wait (see [`Session::release_held_deliveries`]).
pub(super) fn must_hold(channel: &Channel) -> bool {
    !channel.held.is_empty() || waiting_for_client_order(channel)
}

/// What deliveries wait for: a consumer's consume-ok (a broker sends it before any delivery),
/// or a get-ok already here but waiting for its turn among the channel's replies. A delivery
/// numbered before such a get-ok would break the order of the client's tags against the
/// upstream ones on that link, and a `multiple` ack could then settle the get-ok's message
/// upstream before the client has it.
fn waiting_for_client_order(channel: &Channel) -> bool {
    channel.consumers.iter().any(|c| !c.ready)
        || channel.rpcs.iter().any(|r| {
            matches!(
                r.reply,
                Some(crate::client::channel::Reply {
                    method: Method::BasicGetOk(_),
                    ..
                })
            )
        })
}
