//! What a client sends on its channels: each method's destination (`route.rs` decides control
//! or sharded), fan-out of synchronous methods to their links, acks mapped to upstream tags, and
//! the channel closes the proxy itself answers with.

use super::*;

impl Session {
    pub(super) fn on_client_command(&mut self, cmd: Command) -> Result<(), ConnError> {
        let Command {
            channel: ch,
            method,
            content,
        } = cmd;
        if self.close_requested.is_some() {
            // Read and discarded, as RabbitMQ does after connection.close.
            return Ok(());
        }
        // Until a close warren keeps back goes out, the client does not know of it: an ack it
        // sends meanwhile reaches the cluster, or its message would be delivered again.
        // Anything else is discarded, and so is everything after it, as one broker handles a
        // prefix of what a client sent before its connection ends: an ack behind a discarded
        // publish must not count (the publish, its result, would be lost).
        let held = self.closing.is_some() && self.close_waits_for_confirms();
        let passes = held
            && !self.held_close_cut
            && matches!(
                method,
                Method::BasicAck(_) | Method::BasicNack(_) | Method::BasicReject(_)
            );
        if held && !passes {
            self.held_close_cut = true;
        }
        if let Some(closing) = &self.closing
            && !passes
        {
            match (closing, &method) {
                (Closing::ByProxy { reason, .. }, Method::ConnectionCloseOk(_)) => {
                    let reason = reason.clone();
                    self.end_proxy_close(reason);
                }
                (Closing::ByProxy { .. }, Method::ConnectionClose(_)) => {
                    self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
                    self.end_proxy_close("connection closed by both sides".into());
                }
                _ => {}
            }
            return Ok(());
        }
        if ch == 0 {
            return self.on_client_connection_method(method);
        }
        // Only a request on an open channel wakes the links: what follows a channel's close (a
        // publish an asynchronous client sent before it read close-ok) is discarded or refused
        // below, as RabbitMQ does, and must not run later against a channel freed meanwhile.
        let open = channel_in(&mut self.channels, ch)
            .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening));
        if self.lazy && open && self.needs_shard_links(&method) {
            self.wake_shard_links(Command {
                channel: ch,
                method,
                content,
            });
            return Ok(());
        }
        if ch > self.channel_max {
            // RabbitMQ's code for too many channels (530), for a channel number the spec forbids:
            // the proxy's per-channel tables are sized by channel_max.
            return Err(ConnError::new(
                ReplyCode::NotAllowed,
                format!(
                    "channel {ch} is above the negotiated channel_max ({})",
                    self.channel_max
                ),
            )
            .on(&method));
        }
        if let Method::ChannelOpen(_) = method {
            return self.open_channel(ch, &method);
        }
        // An empty queue name means the queue last declared on this channel (AMQP 0-9-1), and
        // a server-named queue gets its name here, so every cluster declares the same one.
        let mut method = method;
        if !self.expand_queue_name(ch, &mut method) {
            return Ok(());
        }
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return Err(
                ConnError::new(ReplyCode::ChannelError, "expected 'channel.open'").on(&method),
            );
        };
        match channel.state {
            ChannelState::AwaitingCloseOk => {
                match method {
                    Method::ChannelCloseOk(_) => self.free_channel(ch),
                    // The client's close crossed warren's: answered, as RabbitMQ does, and the
                    // channel still waits for the close-ok that answers warren's close (the
                    // client sends it: freeing the channel now would make it a frame on an
                    // unopened channel, 504 for the whole connection).
                    Method::ChannelClose(_) => {
                        self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
                    }
                    _ => {}
                }
                return Ok(());
            }
            ChannelState::ClientClosing => return Ok(()),
            ChannelState::Failing => {
                // Discarded, as one broker discards what follows a refused method; a close
                // crossed the one warren is about to send and is answered after it.
                if let Method::ChannelClose(_) = method
                    && let Some(f) = channel.failing.as_mut()
                {
                    f.client_closed = true;
                }
                return Ok(());
            }
            ChannelState::Opening | ChannelState::Open => {}
        }
        match method {
            Method::BasicPublish(ref p) => {
                // Producers publish to the same destination over and over: remember the last
                // classification instead of matching the patterns for every message.
                let (class, rule) = match &self.last_route {
                    Some((x, k, c, r)) if *x == p.exchange && *k == p.routing_key => (*c, *r),
                    _ => {
                        let (x, k) = (p.exchange.as_bytes(), p.routing_key.as_bytes());
                        let c = self.rules.publish(x, k);
                        let r = self.rules.rule_for(x, k);
                        self.last_route = Some((p.exchange.clone(), p.routing_key.clone(), c, r));
                        (c, r)
                    }
                };
                // The assembler only completes a publish together with its content.
                if let Some(content) = content {
                    check_headers(&content.header).map_err(|e| e.on(&method))?;
                    self.publish(ch, class, rule, &method, &content);
                }
            }
            Method::BasicAck(ref a) => {
                self.ack(ch, a.delivery_tag, a.multiple, &method, |t, m| {
                    Method::BasicAck(codec::BasicAck {
                        delivery_tag: t,
                        multiple: m,
                    })
                });
            }
            Method::BasicNack(ref n) => {
                let requeue = n.requeue;
                self.ack(ch, n.delivery_tag, n.multiple, &method, |t, m| {
                    Method::BasicNack(codec::BasicNack {
                        delivery_tag: t,
                        multiple: m,
                        requeue,
                    })
                });
            }
            Method::BasicReject(ref r) => {
                let requeue = r.requeue;
                self.ack(ch, r.delivery_tag, false, &method, |t, _| {
                    Method::BasicReject(codec::BasicReject {
                        delivery_tag: t,
                        requeue,
                    })
                });
            }
            Method::ChannelClose(_) => {
                // Requests before the close are still answered, then close-ok, as one broker
                // answers a channel's methods in order (see `ChannelState::ClientClosing`).
                if let Some(channel) = self.channel_mut(ch) {
                    channel.state = ChannelState::ClientClosing;
                    if !channel.consumers.is_empty() {
                        // Its consumers end with it, and an auto-delete queue with its last
                        // consumer, and an auto-delete exchange with that queue's binding:
                        // publishes are checked again (see barrier.rs).
                        self.proven_exchanges.clear();
                    }
                }
                for slot in &mut self.links {
                    slot.close_chan_after_replies(ch, &method);
                }
                // At once when no link has the channel open and nothing waits for a cluster's
                // next link; otherwise once they are done.
                self.finish_client_close(ch);
            }
            // Nothing was closing it: RabbitMQ's answer to an unexpected close-ok.
            Method::ChannelCloseOk(_) => {
                return Err(ConnError::new(
                    ReplyCode::CommandInvalid,
                    format!("channel.close-ok on channel {ch}, which is not closing"),
                )
                .on(&method));
            }
            Method::BasicConsume(mut c) => {
                // A single-active-consumer queue is subscribed to by one connection at a time
                // (see `crate::single_active`).
                let turn = if self.is_single_active(&c.queue) {
                    let waited = self.turn_waited.take();
                    match self
                        .shared
                        .single_active()
                        .try_take(&self.vhost, &c.queue.as_str())
                    {
                        Some(turn) => Some(turn),
                        None => {
                            let since = waited.unwrap_or_else(Instant::now);
                            if since.elapsed() < TURN_WAIT {
                                self.awaiting_turn = Some((
                                    Command {
                                        channel: ch,
                                        method: Method::BasicConsume(c),
                                        content: None,
                                    },
                                    since,
                                ));
                                return Ok(());
                            }
                            warn!(conn = self.id, queue = %c.queue.as_str(), waited_secs = TURN_WAIT.as_secs(),
                                "another connection's subscribe to this single-active-consumer queue is still unanswered; subscribing without waiting for it");
                            None
                        }
                    }
                } else {
                    None
                };
                if c.consumer_tag.is_empty() {
                    // Generated here, not by a broker, so the tag is the same on every cluster;
                    // random in RabbitMQ's shape, so no tag a client picks can meet it.
                    c.consumer_tag = generated_name(CONSUMER_TAG_PREFIX, self.id);
                }
                // A queue exists on every cluster; its messages may be on any of them.
                let targets = self.live_links();
                let prefetch = self
                    .channels
                    .get(usize::from(ch))
                    .and_then(Option::as_ref)
                    .and_then(|c| c.qos.per_consumer().cloned());
                let consumer = Consumer {
                    tag: c.consumer_tag.clone(),
                    no_ack: c.no_ack,
                    links: targets,
                    request: Some(c.clone()),
                    cancelled_by_cluster: false,
                    // A broker sends consume-ok before any delivery; with several clusters the
                    // first one may deliver before the last one answers, so deliveries wait.
                    ready: c.nowait,
                    replies: c.queue.as_bytes() == b"amq.rabbitmq.reply-to",
                    prefetch,
                };
                if let Some(channel) = self.channel_mut(ch) {
                    channel.consumers.push(consumer);
                }
                if (c.exclusive || turn.is_some()) && c.nowait {
                    // Exclusive consumers racing for a queue must find one winner, as on one
                    // broker: asked with a reply, the consume goes to one cluster after the
                    // other (`Rpc::in_turn`); the client, which asked for none, gets none. A
                    // turn is held until every cluster has answered.
                    let asked = codec::BasicConsume { nowait: false, ..c };
                    self.fan_out(ch, &Method::BasicConsume(asked), targets)?;
                    if !targets.is_empty()
                        && let Some(rpc) = self.channel_mut(ch).and_then(|c| c.rpcs.back_mut())
                    {
                        rpc.silent = true;
                    }
                } else {
                    self.fan_out(ch, &Method::BasicConsume(c), targets)?;
                }
                if let Some(turn) = turn
                    && !targets.is_empty()
                    && let Some(id) = self
                        .channel_mut(ch)
                        .and_then(|c| c.rpcs.back())
                        .map(|rpc| rpc.id)
                {
                    self.turns.push((turn, (ch, id)));
                }
            }
            Method::BasicCancel(ref c) => {
                // An auto-delete queue may go with its last consumer, and an auto-delete
                // exchange with that queue's binding: publishes are checked again.
                self.proven_exchanges.clear();
                let channel = self.channel_mut(ch).expect("checked above");
                let mut targets = channel
                    .consumer_mut(&c.consumer_tag)
                    .map(|k| {
                        // Being cancelled: a link opened before the cancel-oks are back must
                        // not subscribe it again (the cancel never reaches that link).
                        k.request = None;
                        k.links
                    })
                    .unwrap_or_default();
                if c.nowait {
                    channel.remove_consumer(&c.consumer_tag);
                    channel.drop_cancel_notice(&c.consumer_tag);
                    // Sent with a reply asked for all the same, swallowed: until a cluster's
                    // cancel-ok, what it delivers is still this consumer's, whose ack mode
                    // it keeps (see `UpChan::consumers`), whatever the tag means by then.
                    let cancel = Method::BasicCancel(codec::BasicCancel {
                        consumer_tag: c.consumer_tag.clone(),
                        nowait: false,
                    });
                    for link in targets.iter() {
                        self.links[link].request(ch, &cancel, Pending::Internal);
                    }
                    return Ok(());
                }
                if targets.is_empty() {
                    // Unknown tag: a broker answers cancel-ok anyway; let one do so.
                    targets = self
                        .live_links()
                        .first()
                        .map(LinkSet::one)
                        .unwrap_or_default();
                }
                self.fan_out(ch, &method, targets)?;
            }
            Method::BasicGet(_) => self.get(ch, &method)?,
            Method::BasicQos(ref q) => {
                channel.qos.set(q);
                self.note_prefetch_below_shards(q);
                let targets = self.live_links();
                let id = self.channel_mut(ch).expect("checked above").push_rpc(
                    targets.len(),
                    Vec::new(),
                    &method,
                );
                self.send_qos(ch, q, Pending::Rpc(id), None);
            }
            Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                // The brokers redeliver everything unacknowledged with new tags.
                channel.tags.forget_all(|l| unacked_dec(&self.links, l));
                self.fan_out(ch, &method, self.live_links())?;
            }
            Method::ConfirmSelect(_) => {
                if !channel.tx && channel.confirms.is_none() {
                    channel.confirms = Some(Default::default());
                }
                let targets = self.live_links();
                for link in targets.iter() {
                    self.links[link].chan(ch).confirm_mode = true;
                }
                self.fan_out(ch, &method, targets)?;
            }
            Method::TxSelect(_) => self.select_tx(ch, &method)?,
            Method::TxCommit(_) | Method::TxRollback(_) => self.end_transaction(ch, &method)?,
            Method::ChannelFlow(_) | Method::ChannelFlowOk(_) => {
                self.fan_out(ch, &method, self.live_links())?
            }
            // A name that is not UTF-8 cannot name a queue (RabbitMQ refuses it at declare):
            // nothing to check over the clusters, and warren's own check would carry the name.
            Method::QueueDelete(ref d)
                if (d.if_empty || d.if_unused)
                    && std::str::from_utf8(d.queue.as_bytes()).is_ok() =>
            {
                self.checked_delete(ch, d.clone())?
            }
            Method::QueueDeclare(ref q)
                if !q.passive
                    && matches!(q.arguments.get("x-queue-type"),
                        Some(codec::FieldValue::LongStr(t)) if t.as_bytes() == b"stream") =>
            {
                // A stream's offsets would be per cluster: a consumer resuming at an offset
                // would silently read another cluster's messages. Refused, saying why, once
                // the user is known to be allowed to declare it (see `permission.rs`).
                const STREAMS: &str = "warren does not spread streams (x-queue-type=stream) \
                     over clusters: their offsets would differ per cluster; declare the stream \
                     on one cluster directly";
                let refusal = permission::refuse_channel(ReplyCode::NotImplemented, STREAMS);
                if !self.check_configure_permission(ch, &q.queue, &method, Some(refusal)) {
                    self.close_channel(ch, ReplyCode::NotImplemented, STREAMS, &method);
                }
            }
            Method::QueueDeclare(ref q) if reply_to::is_address(q.queue.as_bytes()) => {
                self.declare_reply_address(ch, q, &method)?
            }
            Method::ExchangeDeclare(_)
            | Method::ExchangeDelete(_)
            | Method::ExchangeBind(_)
            | Method::ExchangeUnbind(_)
            | Method::QueueDeclare(_)
            | Method::QueueBind(_)
            | Method::QueueUnbind(_)
            | Method::QueueDelete(_) => {
                // Topology lives on every cluster, so whichever cluster a publish goes to
                // routes it as one broker would (see docs/routing.md).
                let class = self.rules.topology(&method).unwrap_or(Class::Sharded);
                if matches!(
                    method,
                    Method::ExchangeDelete(_)
                        | Method::ExchangeUnbind(_)
                        | Method::QueueUnbind(_)
                        | Method::QueueDelete(_)
                ) {
                    // An exchange may be gone after this (deleted, or auto-deleted with its
                    // last binding): publishes to it are checked again (see barrier.rs).
                    self.proven_exchanges.clear();
                }
                let mut t = self.live_links();
                if let Method::ExchangeDeclare(x) = &method
                    && x.passive
                    && class == Class::Control
                    && let Some(control) = self.control_link()
                {
                    // A control exchange lives on the control cluster; the shard clusters get
                    // a copy for bindings only once a connection that uses them declares it
                    // (`lazy_links`), so only the control cluster can say whether it exists.
                    t = LinkSet::one(control);
                }
                let id = self.channel_mut(ch).map(|c| c.next_rpc_id());
                self.fan_out_topology(ch, &method, t, class == Class::Sharded)?;
                // A delete or a count covers the whole queue, on clusters away too.
                let whole = match &method {
                    Method::QueueDelete(d) => Some(&d.queue),
                    Method::QueueDeclare(q) if q.passive => Some(&q.queue),
                    _ => None,
                };
                if let (Some(id), Some(queue)) = (id, whole) {
                    self.wait_for_missing_holders(ch, id, queue);
                }
            }
            Method::QueuePurge(ref p) => {
                // Asked with a reply even under `nowait`: a cluster left out must be known.
                let id = self.channel_mut(ch).map(|c| c.next_rpc_id());
                self.fan_out(ch, &with_reply(&method), self.live_links())?;
                if let Some(id) = id {
                    if p.nowait
                        && let Some(rpc) = self.channel_mut(ch).and_then(|c| c.rpc_mut(id))
                    {
                        rpc.silent = true;
                    }
                    self.wait_for_missing_holders(ch, id, &p.queue);
                }
            }
            // Anything else a client may send on a channel is for the broker to judge.
            other => {
                let t = self
                    .shard_links()
                    .first()
                    .map(LinkSet::one)
                    .unwrap_or_default();
                match content {
                    Some(content) => {
                        if let Some(link) = t.first() {
                            self.links[link].send_content(ch, &other, &content);
                        }
                    }
                    None => self.fan_out(ch, &other, t)?,
                }
            }
        }
        Ok(())
    }

    pub(super) fn open_channel(&mut self, ch: u16, method: &Method) -> Result<(), ConnError> {
        let i = usize::from(ch);
        if self.channels.len() <= i {
            self.channels.resize_with(i + 1, || None);
        }
        if self.channels[i].is_some() {
            return Err(
                ConnError::new(ReplyCode::ChannelError, "second 'channel.open' seen").on(method),
            );
        }
        let targets = self.live_links();
        let mut channel = Channel::new();
        let id = channel.push_rpc(targets.len(), Vec::new(), method);
        self.channels[i] = Some(channel);
        self.metrics.channels.inc();
        for link in targets.iter() {
            self.reopen_wait |= self.links[link].open(ch, Pending::Rpc(id));
        }
        for link in 0..self.links.len() {
            if let Some(plan) = self.links[link].take_topology() {
                self.replay_topology(link, ch, plan);
                if self.links[link].settle_replay() {
                    self.unpark();
                }
            }
        }
        Ok(())
    }

    /// Sends a method to every target link; a synchronous one becomes an [`Rpc`] whose merged
    /// reply goes to the client once every target has answered.
    pub(super) fn fan_out(
        &mut self,
        ch: u16,
        method: &Method,
        targets: LinkSet,
    ) -> Result<(), ConnError> {
        if targets.is_empty() {
            let text = format!("no cluster available for {}", method.name());
            self.close_channel(ch, ReplyCode::InternalError, &text, method);
            return Ok(());
        }
        // Requests that change or claim what every cluster holds go to one cluster after the
        // other, in the same order everywhere (see `Rpc::in_turn`): of two connections racing
        // (two exclusive declares, declares with conflicting arguments, a delete and a declare),
        // the first cluster sees one first, refuses the other, and the clusters stay alike.
        let in_turn = match method {
            Method::QueueDeclare(q) => !q.passive && !q.nowait,
            Method::ExchangeDeclare(x) => !x.passive && !x.nowait,
            Method::QueueDelete(q) => !q.nowait,
            Method::ExchangeDelete(x) => !x.nowait,
            Method::BasicConsume(c) => c.exclusive && !c.nowait,
            // A bind refused by one cluster (an exchange or queue missing there) must not stay
            // made on the others: one broker's refused bind changes nothing. The shard
            // clusters go first, the control cluster last: a control exchange a lazily linked
            // connection declared is on the control cluster alone until the shard clusters get
            // their copy, so a shard refuses such a bind before the control cluster makes it.
            Method::QueueBind(b) => !b.nowait,
            Method::ExchangeBind(b) => !b.nowait,
            _ => false,
        };
        if in_turn && targets.len() > 1 {
            // One cluster after the other, in the same order everywhere (see `Rpc::in_turn`).
            let mut order: Vec<LinkId> = targets.iter().collect();
            let bind = matches!(method, Method::QueueBind(_) | Method::ExchangeBind(_));
            let key = |l: LinkId| {
                let slot = &self.links[l];
                (bind && slot.role == Role::Control, &slot.link.cluster)
            };
            order.sort_by(|&a, &b| key(b).cmp(&key(a)));
            let first = order.pop().expect("more than one target");
            let Some(channel) = self.channel_mut(ch) else {
                return Ok(());
            };
            let id = channel.push_rpc(1, Vec::new(), method);
            if let Some(rpc) = channel.rpcs.back_mut() {
                rpc.in_turn = order;
            }
            self.in_turn_hold = Some((ch, id));
            self.links[first].request(ch, method, Pending::Rpc(id));
        } else if expects_reply(method) {
            let Some(channel) = self.channel_mut(ch) else {
                return Ok(());
            };
            let id = channel.push_rpc(targets.len(), Vec::new(), method);
            for link in targets.iter() {
                self.links[link].request(ch, method, Pending::Rpc(id));
            }
        } else {
            for link in targets.iter() {
                self.links[link].send_tracked(ch, method);
            }
        }
        Ok(())
    }

    /// Like [`fan_out`](Self::fan_out), and a sharded topology change is remembered once every
    /// cluster accepted it, to be replayed on clusters added later.
    pub(super) fn fan_out_topology(
        &mut self,
        ch: u16,
        method: &Method,
        targets: LinkSet,
        sharded: bool,
    ) -> Result<(), ConnError> {
        let passive = match method {
            Method::ExchangeDeclare(x) => x.passive,
            Method::QueueDeclare(x) => x.passive,
            _ => false,
        };
        let class = if sharded {
            Class::Sharded
        } else {
            Class::Control
        };
        let record = !passive && !targets.is_empty();
        if record && !expects_reply(method) {
            // `nowait`: the clusters are asked for a reply all the same, which the client does
            // not get, so the change is remembered only once every cluster accepted it. A
            // refused one (a redeclare with other arguments) closes the channel as RabbitMQ
            // does, and must not stand in warren's records for what the clusters hold. Asked
            // as any request with a reply, a declare or delete goes to one cluster after the
            // other (`Rpc::in_turn`): two clients racing conflicting nowait declares (a fanout
            // and a direct exchange of one name, an exclusive queue) must find one winner, the
            // same on every cluster, not one type or owner here and the other there.
            let request = with_reply(method);
            self.fan_out(ch, &request, targets)?;
            if let Some(channel) = self.channel_mut(ch)
                && let Some(rpc) = channel.rpcs.back_mut()
            {
                rpc.on_success = Some((class, method.clone()));
                rpc.silent = true;
            }
            return Ok(());
        }
        self.fan_out(ch, method, targets)?;
        if record
            && expects_reply(method)
            && let Some(channel) = self.channel_mut(ch)
            && let Some(rpc) = channel.rpcs.back_mut()
        {
            rpc.on_success = Some((class, method.clone()));
        }
        Ok(())
    }

    /// Updates the replay logs with a topology change every cluster accepted: this session's
    /// own, and the proxy's shared one for sharded, non-exclusive entries.
    pub(super) fn record_topology(&mut self, class: Class, method: Method) {
        // A name declared again while a link waits to join is no longer gone.
        for j in &mut self.joining {
            j.declared(&method);
        }
        if matches!(method, Method::QueueDeclare(_) | Method::ExchangeDeclare(_)) {
            self.shared.note_server_routes(&self.vhost, &method);
        }
        match &method {
            Method::QueueDeclare(x) if !x.queue.is_empty() => {
                let quorum = replicated_queue_type(&x.arguments) == Some("rabbit_quorum_queue");
                self.shared
                    .note_queue_type(&self.vhost, &x.queue.as_str(), quorum);
                self.shared.single_active().note(
                    &self.vhost,
                    &x.queue.as_str(),
                    single_active_consumer(&x.arguments),
                );
                if class == Class::Sharded {
                    self.shared.note_queue(&self.vhost, &x.queue.as_str());
                }
            }
            Method::QueueDelete(x) => {
                self.shared
                    .note_queue_type(&self.vhost, &x.queue.as_str(), false);
                self.shared
                    .single_active()
                    .note(&self.vhost, &x.queue.as_str(), false);
                if class == Class::Sharded {
                    self.shared.forget_queue(&self.vhost, &x.queue.as_str());
                }
            }
            _ => {}
        }
        let shared = class == Class::Sharded && self.topology.shareable(&method);
        if shared {
            self.shared.record_topology(&self.vhost, method.clone());
        }
        // The clusters that missed it (no live link now) apply it when their link opens, in
        // the order this connection made its changes; a shareable change is logged for the
        // vhost too, so the cluster gets it even if this connection is gone by then. A control
        // name's change concerns the control cluster alone: idle shard links must not apply,
        // on reopening, changes other clients may have undone since. Not a queue.delete: it
        // waits for every cluster that may hold the queue, and one recorded otherwise (a
        // queue found gone everywhere, a control queue's shard copy) must not delete, later,
        // a queue of that name declared again meanwhile.
        if !matches!(method, Method::QueueDelete(_)) {
            let missed = with_reply(&method);
            for cluster in &self.shared.config().clusters {
                if (class == Class::Sharded || cluster.role == Role::Control)
                    && !self.has_live_link(&cluster.name)
                {
                    if shared {
                        self.shared
                            .note_missed(&self.vhost, &cluster.name, missed.clone());
                    }
                    self.stale_topology
                        .entry(cluster.name.to_string())
                        .or_default()
                        .push(missed.clone());
                }
            }
        }
        self.topology.record(class, method);
    }

    /// Sends the client's qos to every link of the channel, the window split over the shard
    /// clusters so the client never holds more than it asked for (see docs/routing.md); a control
    /// consumer gets the whole window.
    pub(super) fn send_qos(
        &mut self,
        ch: u16,
        q: &codec::BasicQos,
        pending: Pending,
        replay_on: Option<LinkId>,
    ) {
        for link in self.live_links().iter() {
            let m = self.qos_share(ch, link, q);
            if Some(link) == replay_on {
                self.links[link].replay(ch, &m);
            } else {
                self.links[link].request(ch, &m, pending);
            }
        }
    }

    /// Whether `method` needs the shard clusters. A connection that has talked only to the
    /// control cluster (opened and closed channels, selected confirms, set a prefetch, declared
    /// control exchanges, published to control names: a Celery event connection) has no link to
    /// them yet; anything else, even a consume or a get of a control queue (its messages may
    /// come from any cluster), opens them first.
    fn needs_shard_links(&self, method: &Method) -> bool {
        match method {
            Method::ChannelOpen(_)
            | Method::ChannelClose(_)
            | Method::ChannelCloseOk(_)
            | Method::ChannelFlow(_)
            | Method::ChannelFlowOk(_)
            | Method::ConfirmSelect(_)
            | Method::BasicQos(_)
            | Method::BasicAck(_)
            | Method::BasicNack(_)
            | Method::BasicReject(_) => false,
            Method::ExchangeDeclare(d) => {
                self.rules.exchange(d.exchange.as_bytes()) != Class::Control
            }
            Method::BasicPublish(p) => {
                self.rules
                    .publish(p.exchange.as_bytes(), p.routing_key.as_bytes())
                    != Class::Control
            }
            _ => true,
        }
    }

    /// A prefetch count below the number of shard clusters cannot hold: each cluster needs a
    /// share of at least one (RabbitMQ reads 0 as no limit), so the consumer may hold one
    /// message per shard cluster (docs/semantics.md, "Prefetch"). Counted, and logged for the
    /// operator, who can have the clients raise it (Celery: `worker_prefetch_multiplier`).
    fn note_prefetch_below_shards(&self, q: &codec::BasicQos) {
        let config = self.shared.config();
        let shards = config.shard_clusters().filter(|c| !c.drain).count();
        let n = usize::from(q.prefetch_count);
        if n == 0 || n >= shards {
            return;
        }
        self.metrics.prefetch_below_shards.inc();
        if self.shared.report_once("", "prefetch below shards") {
            let id = &self.info.identity;
            warn!(conn = self.id, prefetch = n, shard_clusters = shards, peer = ?id.peer,
                product = id.product.as_deref().unwrap_or(""), name = id.name.as_deref().unwrap_or(""),
                "a client set a prefetch count below the number of shard clusters: its consumers may hold up to one message per shard cluster (one line every 10 s; counted in warren_prefetch_below_shards_total)");
        }
    }

    /// The basic.qos `link` gets for the client's `q` on channel `ch` (docs/routing.md,
    /// "Prefetch"). The shard links share the window: each keeps room for what it holds
    /// unacknowledged on the channel, and the rest is split evenly, so a client that raises
    /// its prefetch for messages it holds on purpose (Celery's ETA tasks) gets the room on the
    /// cluster that holds them. The control link gets the whole window: a sharded queue's
    /// messages are on the shard clusters, a control queue's on the control cluster.
    pub(super) fn qos_share(&self, ch: u16, link: LinkId, q: &codec::BasicQos) -> Method {
        let shards: Vec<LinkId> = self.shard_links().iter().collect();
        let share = match shards.iter().position(|&s| s == link) {
            Some(k) => {
                let channel = self.channels.get(usize::from(ch)).and_then(Option::as_ref);
                let held: Vec<u32> = shards
                    .iter()
                    .map(|&l| channel.map_or(0, |c| c.tags.count_link(self.link_ref(l)) as u32))
                    .collect();
                split_window(q.prefetch_count, &held, k)
            }
            None => q.prefetch_count,
        };
        Method::BasicQos(codec::BasicQos {
            prefetch_count: share,
            ..q.clone()
        })
    }

    /// tx.select. warren puts an upstream channel in confirm mode at its first publish (to hold
    /// publishes until confirmed), and RabbitMQ refuses tx.select on a confirm channel, while
    /// the client, which never asked for confirms, may select a transaction at any time. So
    /// the upstream channels already in confirm mode are closed and opened again without it,
    /// each once its publishes are confirmed, and get the tx.select then; the client's input
    /// waits meanwhile (see [`LinkSlot::start_tx_swap_if_settled`] and the close-ok handler).
    ///
    /// Closing an upstream channel would requeue what its consumers have not acknowledged, and
    /// the client would see those messages again: a channel with consumers or unacknowledged
    /// deliveries on such a link is refused with 406 instead. A client that asked for confirms
    /// itself gets the broker's own 406, as from RabbitMQ.
    pub(super) fn select_tx(&mut self, ch: u16, method: &Method) -> Result<(), ConnError> {
        let targets = self.live_links();
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return Ok(());
        };
        channel.tx = true;
        channel.tags.select_tx();
        let swaps = if channel.confirms.is_some() {
            LinkSet::default()
        } else {
            let mut swaps = LinkSet::default();
            for link in targets.iter().filter(|&l| self.links[l].confirming(ch)) {
                swaps.insert(link);
            }
            swaps
        };
        if swaps.is_empty() || targets.is_empty() {
            return self.fan_out(ch, method, targets);
        }
        if let Some(link) = swaps.iter().find(|&l| {
            channel
                .tags
                .count_link(LinkRef::new(l, self.links[l].generation))
                > 0
                || channel.consumers.iter().any(|c| c.links.contains(l))
        }) {
            warn!(conn = self.id, channel = ch, cluster = %self.links[link].link.cluster,
                "tx.select refused: the channel has published and consumes, and switching its upstream channel to tx mode would requeue its unacknowledged deliveries");
            self.close_channel(
                ch,
                ReplyCode::PreconditionFailed,
                "warren cannot switch a channel that has published and \
                 consumes to tx mode; call tx.select before the first publish, or use another channel",
                method,
            );
            return Ok(());
        }
        let id = channel.push_rpc(targets.len(), Vec::new(), method);
        for link in targets.iter() {
            if swaps.contains(link) {
                debug!(conn = self.id, channel = ch, cluster = %self.links[link].link.cluster,
                    "tx.select: reopening the upstream channel without confirm mode");
                self.tx_swaps += 1;
                let slot = &mut self.links[link];
                slot.chan(ch).tx_swap = Some(id);
                slot.start_tx_swap_if_settled(ch);
            } else {
                self.links[link].request(ch, method, Pending::Rpc(id));
            }
        }
        Ok(())
    }

    /// An upstream channel reopened for a tx.select ([`select_tx`](Self::select_tx)) is open
    /// again (its channel.open is on the wire): select tx on it, answering the client's request
    /// `id`, and give it the channel's prefetch again.
    pub(super) fn finish_tx_swap(&mut self, link: LinkId, ch: u16, id: u64) {
        self.links[link].request(ch, &Method::TxSelect(Default::default()), Pending::Rpc(id));
        let qos = channel_in(&mut self.channels, ch).map(|c| c.qos.settings());
        for q in qos.unwrap_or_default() {
            let m = self.qos_share(ch, link, &q);
            self.links[link].request(ch, &m, Pending::Internal);
        }
    }

    /// basic.get: the queue's messages may be on any cluster, so they are tried one by one
    /// (starting from a rotating one, so no cluster is always drained first) until one has a
    /// message.
    pub(super) fn get(&mut self, ch: u16, method: &Method) -> Result<(), ConnError> {
        let mut order: Vec<LinkId> = self.live_links().iter().collect();
        if order.is_empty() {
            return self.fan_out(ch, method, LinkSet::default());
        }
        self.get_rotation = self.get_rotation.wrapping_add(1);
        let r = self.get_rotation % order.len();
        order.rotate_left(r);
        let first = order.remove(0);
        order.reverse(); // popped from the back
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(());
        };
        let more = !order.is_empty();
        let id = channel.push_rpc(1, order, method);
        if let Some(rpc) = channel.rpc_mut(id) {
            rpc.get_request = Some(method.clone());
        }
        if more {
            self.in_turn_hold = Some((ch, id));
        }
        self.links[first].request(ch, method, Pending::Rpc(id));
        Ok(())
    }

    pub(super) fn on_client_connection_method(&mut self, method: Method) -> Result<(), ConnError> {
        match method {
            Method::ConnectionClose(_) => {
                self.client_close();
                Ok(())
            }
            Method::ConnectionUpdateSecret(ref u) => {
                for slot in &self.links {
                    slot.send(0, &method);
                }
                // Links opened from now on (a failover, a cluster added, lazy shard links) log in
                // with the new secret, the old one may have expired; and with the login password
                // if the cluster refuses the secret (see `LinkSpec::fallback_password`).
                let login = self
                    .base_spec
                    .fallback_password
                    .take()
                    .unwrap_or_else(|| self.base_spec.password.clone());
                self.base_spec.password = bytes::Bytes::copy_from_slice(u.new_secret.as_bytes());
                self.base_spec.fallback_password =
                    (login != self.base_spec.password).then_some(login);
                self.to_client(0, &Method::ConnectionUpdateSecretOk(Default::default()));
                Ok(())
            }
            // RabbitMQ answers 504 for any other method on channel 0 of an open connection
            // ("unexpected method in connection state running").
            other => Err(ConnError::new(
                ReplyCode::ChannelError,
                format!("unexpected {} on channel 0", other.name()),
            )
            .on(&other)),
        }
    }

    /// Maps a client ack / nack / reject to the links that delivered the messages.
    pub(super) fn ack(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        method: &Method,
        make: impl Fn(u64, bool) -> Method,
    ) {
        let mut acks = std::mem::take(&mut self.scratch_acks);
        let resolved = match self.channel_mut(ch) {
            Some(channel) => channel.tags.resolve(tag, multiple, &mut acks),
            None => Ok(()),
        };
        match resolved {
            Ok(()) => {
                for a in &acks {
                    // Only to the link that delivered: a later link in its slot numbers its
                    // own deliveries from 1 again.
                    match slot_of(&self.links, a.link) {
                        Some(slot) => {
                            slot.m.acks.inc();
                            slot.m.unacked.dec_by(i64::from(a.count));
                            slot.send(ch, &make(a.upstream_tag, a.multiple));
                        }
                        None => warn!(
                            conn = self.id,
                            channel = ch,
                            "swallowed an ack for deliveries of a link that is gone (its broker requeued them)"
                        ),
                    }
                }
            }
            Err(unknown) => {
                let text = format!("unknown delivery tag {}", unknown.0);
                self.close_channel(ch, ReplyCode::PreconditionFailed, &text, method);
            }
        }
        self.scratch_acks = acks;
    }

    /// queue.delete with `if_empty` / `if_unused`: each cluster would judge only its own part of
    /// the queue, and the clusters where it is empty would delete their copies while another
    /// refuses: the queue would live on only there, and publishes routed to the others would be
    /// dropped. So the condition is checked first over the whole queue (a passive declare on
    /// every cluster, counts summed) and the delete follows only if it holds; the client's
    /// input waits meanwhile, so nothing it sends later overtakes the delete.
    pub(super) fn checked_delete(
        &mut self,
        ch: u16,
        delete: codec::QueueDelete,
    ) -> Result<(), ConnError> {
        if self.declared_as_quorum(&delete.queue) {
            // RabbitMQ refuses the condition on a quorum queue, closing the connection; warren's
            // own check over the clusters would delete it instead.
            let flag = if delete.if_unused {
                "if-unused"
            } else {
                "if-empty"
            };
            let text = format!(
                "cannot delete queue '{}' in vhost '{}'. queue.delete operations with {flag} flag \
                 set are not supported by quorum queues",
                delete.queue, self.vhost
            );
            let request = Method::QueueDelete(delete.clone());
            let refusal = permission::refuse_connection(ReplyCode::NotImplemented, &text);
            if self.check_configure_permission(ch, &delete.queue, &request, Some(refusal)) {
                return Ok(());
            }
            return Err(ConnError::new(ReplyCode::NotImplemented, text).on(&request));
        }
        // The check over the clusters refuses with 405 or 406 itself: the user's permission
        // comes first, as RabbitMQ checks it first.
        self.check_configure_permission(
            ch,
            &delete.queue,
            &Method::QueueDelete(delete.clone()),
            None,
        );
        let check = Method::QueueDeclare(codec::QueueDeclare {
            queue: delete.queue.clone(),
            passive: true,
            ..Default::default()
        });
        let targets = self.live_links();
        if targets.is_empty() {
            return self.fan_out(ch, &check, targets);
        }
        // The delete may take an auto-delete exchange's last binding (see barrier.rs).
        self.proven_exchanges.clear();
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(());
        };
        let id = channel.push_rpc(targets.len(), Vec::new(), &check);
        if let Some(rpc) = channel.rpc_mut(id) {
            rpc.then_delete = Some(delete);
        }
        self.input_waits_for = Some((ch, id));
        // The checks go on warren's own channels: a cluster without the queue answers 404 by
        // closing the channel it was asked on, and RabbitMQ deletes a missing queue with
        // delete-ok (0). A channel of warren's own runs beside the client's, not behind it: a
        // publish, purge or consume the client pipelined just ahead of the delete may not
        // have reached the queue yet. Where the client's channel is open, a fence goes first
        // on it; RabbitMQ handles a channel's methods in order, so its reply means they did.
        for link in targets.iter() {
            if matches!(
                self.links[link].chan_state(ch),
                UpState::Open | UpState::Opening
            ) {
                self.links[link].request(ch, &fence(), Pending::Fence(id));
            } else {
                self.side_check(link, ch, &check, Pending::Rpc(id));
            }
        }
        // The condition holds for the whole queue, on clusters away too.
        if let Method::QueueDeclare(q) = &check {
            self.wait_for_missing_holders(ch, id, &q.queue);
        }
        Ok(())
    }

    /// The fence's reply came on `link`: the whole-queue check of request `id` can go.
    pub(super) fn fence_passed(&mut self, link: LinkId, ch: u16, id: u64) {
        let check = channel_in(&mut self.channels, ch)
            .and_then(|c| c.rpc_mut(id))
            .filter(|rpc| rpc.then_delete.is_some())
            .map(|rpc| rpc.request.clone());
        if let Some(check) = check {
            self.side_check(link, ch, &check, Pending::Rpc(id));
        }
    }

    /// The sharded single-active-consumer queue one of this connection's consumers subscribed
    /// to, if any (a control queue lives on one cluster, which orders its consumers alone).
    pub(super) fn single_active_consumer_queue(&self) -> Option<String> {
        self.channels
            .iter()
            .flatten()
            .flat_map(|c| c.consumers.iter())
            .filter_map(|k| k.request.as_ref())
            .find(|req| {
                self.rules.queue(req.queue.as_bytes()) == Class::Sharded
                    && self.is_single_active(&req.queue)
            })
            .map(|req| req.queue.as_str().into_owned())
    }

    /// Whether `queue` is a single-active-consumer queue: the last declare of it accepted
    /// through this warren, by any client, says so, or this connection's own does.
    pub(super) fn is_single_active(&self, queue: &ShortStr) -> bool {
        self.shared.single_active().is(&self.vhost, &queue.as_str())
            || self.topology.entries().any(|(_, m)| {
                matches!(m, Method::QueueDeclare(q)
                    if &q.queue == queue && single_active_consumer(&q.arguments))
            })
    }

    /// Whether `queue`'s last declare accepted through this warren, by any client, made it a
    /// quorum queue. Not this connection's own record: another client may have deleted the
    /// queue and declared it again as another type since.
    fn declared_as_quorum(&self, queue: &ShortStr) -> bool {
        self.shared.is_quorum_queue(&self.vhost, &queue.as_str())
    }

    /// Sends the check `method` for client channel `ch` on a channel of warren's own on
    /// `link` (see [`LinkSlot::side_request`]), or on `ch` itself when no number is free.
    pub(super) fn side_check(&mut self, link: LinkId, ch: u16, method: &Method, who: Pending) {
        if !self.own_channel_request(link, ch, method, who) {
            self.links[link].request(ch, method, who);
        }
    }

    /// [`LinkSlot::side_request`] on `link`, avoiding the channel numbers the client uses;
    /// false when no number is free.
    pub(super) fn own_channel_request(
        &mut self,
        link: LinkId,
        ch: u16,
        method: &Method,
        who: Pending,
    ) -> bool {
        let channels = &self.channels;
        let in_use = |n: u16| channels.get(usize::from(n)).is_some_and(Option::is_some);
        self.links[link].side_request(ch, method, who, in_use)
    }

    /// Applies AMQP's queue-name shortcut as RabbitMQ does: an empty queue name in bind,
    /// unbind, purge, delete, consume and get means the queue last declared on the channel (and
    /// an empty routing key in a bind with it, that queue's name); none declared yet is 404, as
    /// from RabbitMQ; a passive declare of '' is left alone (404 from the clusters, as from
    /// RabbitMQ). A non-passive declare with an empty name gets a warren-generated name
    /// (one broker's `amq.gen-` names cannot be declared on the other clusters). Returns false
    /// when the channel was closed.
    fn expand_queue_name(&mut self, ch: u16, method: &mut Method) -> bool {
        if !matches!(
            method,
            Method::QueueDeclare(_)
                | Method::QueueBind(_)
                | Method::QueueUnbind(_)
                | Method::QueuePurge(_)
                | Method::QueueDelete(_)
                | Method::BasicConsume(_)
                | Method::BasicGet(_)
        ) {
            // Publishes and acks, nearly every method a client sends, name no queue.
            return true;
        }
        if let Method::QueueDeclare(x) = &*method
            && x.queue.is_empty()
            && !x.passive
            && let Some(kind) = replicated_queue_type(&x.arguments)
            && channel_in(&mut self.channels, ch)
                .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening))
        {
            // RabbitMQ names server-named queues only for classic queues; naming one here
            // would create a durable quorum queue nothing ever deletes.
            let text = format!("Cannot declare a server-named queue for type {kind}");
            self.close_channel(ch, ReplyCode::PreconditionFailed, &text, method);
            return false;
        }
        if let Method::QueueDeclare(x) = &*method
            && !x.passive
            && x.queue
                .as_bytes()
                .starts_with(SERVER_NAMED_PREFIX.as_bytes())
            && channel_in(&mut self.channels, ch)
                .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening))
        {
            // warren's server-named queues stand for RabbitMQ's `amq.gen-` ones, whose names a
            // client may not declare (a reply queue declared again by name, by its owner or by
            // another connection, gets 403 from one broker).
            let text = format!(
                "queue name '{}' contains reserved prefix '{SERVER_NAMED_PREFIX}' (warren's \
                 server-named queues, as RabbitMQ's 'amq.*')",
                x.queue
            );
            self.close_channel(ch, ReplyCode::AccessRefused, &text, method);
            return false;
        }
        let Some(channel) = channel_in(&mut self.channels, ch) else {
            return true;
        };
        if !matches!(channel.state, ChannelState::Open | ChannelState::Opening) {
            return true;
        }
        let last = channel.last_queue.clone();
        let fill = |q: &mut ShortStr| -> bool {
            if !q.is_empty() {
                return true;
            }
            match &last {
                Some(l) => {
                    *q = l.clone();
                    true
                }
                None => false,
            }
        };
        let ok = match method {
            Method::QueueDeclare(x) => {
                if x.queue.is_empty() {
                    if x.passive {
                        // RabbitMQ does not apply the shortcut to a passive declare: it looks
                        // for a queue named '' and answers 404, and so do the clusters.
                        return true;
                    }
                    x.queue = server_named_queue(self.id);
                }
                channel.last_queue = Some(x.queue.clone());
                true
            }
            Method::QueueBind(x) => {
                let shortcut = x.queue.is_empty() && x.routing_key.is_empty();
                let ok = fill(&mut x.queue);
                if ok && shortcut {
                    x.routing_key = x.queue.clone();
                }
                ok
            }
            Method::QueueUnbind(x) => {
                let shortcut = x.queue.is_empty() && x.routing_key.is_empty();
                let ok = fill(&mut x.queue);
                if ok && shortcut {
                    x.routing_key = x.queue.clone();
                }
                ok
            }
            Method::QueuePurge(x) => fill(&mut x.queue),
            Method::QueueDelete(x) => fill(&mut x.queue),
            Method::BasicConsume(x) => fill(&mut x.queue),
            Method::BasicGet(x) => fill(&mut x.queue),
            _ => true,
        };
        if ok {
            return true;
        }
        self.close_channel(
            ch,
            ReplyCode::NotFound,
            "no previously declared queue",
            method,
        );
        false
    }

    /// Closes a client channel on the proxy's own initiative (as the broker would), and the
    /// upstream channels behind it.
    /// `detail` follows the code's name in the reply text, as in RabbitMQ's
    /// ("NOT_FOUND - no queue 'x'").
    pub(super) fn close_channel(
        &mut self,
        ch: u16,
        code: ReplyCode,
        detail: &str,
        method: &Method,
    ) {
        // The refused method is the one at hand: every request still waiting came before it.
        self.close_channel_at(ch, code, detail, method, u64::MAX);
    }

    /// Closes client channel `ch` for its request `before`, one the client sent earlier and
    /// that is still waiting (a commit whose cluster failed): the requests before it are
    /// answered first, and it and those after it are dropped, so the close does not wait for
    /// an answer that cannot come.
    pub(super) fn close_channel_at(
        &mut self,
        ch: u16,
        code: ReplyCode,
        detail: &str,
        method: &Method,
        before: u64,
    ) {
        let text = code.text(detail);
        let code = code.code();
        debug!(conn = self.id, channel = ch, code, text, "closing channel");
        let (class_id, method_id) = method.ids();
        let reply_text = ShortStr::try_from(truncate(&text)).unwrap_or_default();
        let close = codec::ChannelClose {
            reply_code: code,
            reply_text,
            class_id,
            method_id,
        };
        self.fail_channel(ch, close, before, "client channel closed by the proxy");
    }
}

/// The name warren gives a server-named queue: unique over warren instances and connections, in
/// the shape of RabbitMQ's (`amq.gen-` is reserved to brokers: a client may not declare it, and
/// the queue is declared on every cluster).
pub(super) fn server_named_queue(conn: u64) -> ShortStr {
    generated_name(SERVER_NAMED_PREFIX, conn)
}

/// What RabbitMQ's generated consumer tags start with.
const CONSUMER_TAG_PREFIX: &str = "amq.ctag-";

/// `prefix` and 22 random characters (128 bits, URL-safe base64), as RabbitMQ makes its
/// generated names.
/// RabbitMQ's internal name of a queue type that is not classic (`x-queue-type`), if it is one.
/// `method` (a topology change sent with `nowait`) asking for its reply.
fn with_reply(method: &Method) -> Method {
    let mut request = method.clone();
    match &mut request {
        Method::QueueDeclare(x) => x.nowait = false,
        Method::ExchangeDeclare(x) => x.nowait = false,
        Method::QueueBind(x) => x.nowait = false,
        Method::ExchangeBind(x) => x.nowait = false,
        Method::ExchangeUnbind(x) => x.nowait = false,
        Method::QueueDelete(x) => x.nowait = false,
        Method::QueuePurge(x) => x.nowait = false,
        Method::ExchangeDelete(x) => x.nowait = false,
        _ => {}
    }
    request
}

pub(super) fn replicated_queue_type(arguments: &codec::FieldTable) -> Option<&'static str> {
    match arguments.get("x-queue-type") {
        Some(codec::FieldValue::LongStr(t)) if t.as_bytes() == b"quorum" => {
            Some("rabbit_quorum_queue")
        }
        Some(codec::FieldValue::LongStr(t)) if t.as_bytes() == b"stream" => {
            Some("rabbit_stream_queue")
        }
        _ => None,
    }
}

fn generated_name(prefix: &str, conn: u64) -> ShortStr {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS once per process; with the connection id, a counter and
    // the clock, two instances or two connections never meet.
    let state = std::collections::hash_map::RandomState::new();
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_u64(conn);
        h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut name = String::with_capacity(prefix.len() + 22);
    name.push_str(prefix);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            name.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        name.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    ShortStr::try_from(name).unwrap_or_default()
}

pub(super) use crate::route::SERVER_NAMED_PREFIX;

/// The fence of a checked delete: a passive declare of `amq.direct`, which every vhost has
/// and which needs no permission, so it is answered declare-ok and changes nothing.
fn fence() -> Method {
    Method::ExchangeDeclare(codec::ExchangeDeclare {
        exchange: ShortStr::from_static("amq.direct"),
        passive: true,
        ..Default::default()
    })
}

/// Refuses a message whose `headers` table warren could not decode, as it refuses a method's
/// malformed table (501 FRAME_ERROR): warren passes a message's properties on as bytes, and a
/// broker meeting a value type it does not know there fails the whole link (RabbitMQ 3.10
/// closes it with 541 INTERNAL_ERROR), which the client would get with no word of the cause.
/// A walk over the table's bytes, no allocation; nothing to do for a message without headers.
fn check_headers(header: &[u8]) -> Result<(), ConnError> {
    let refused = |e: codec::CodecError| {
        ConnError::new(
            ReplyCode::FrameError,
            format!("{e} in the headers of a published message"),
        )
    };
    let Some(span) = codec::properties::headers_span(header).map_err(refused)? else {
        return Ok(());
    };
    codec::table::check_table(&header[span]).map_err(refused)
}

/// Whether queue arguments make a single-active-consumer queue.
fn single_active_consumer(arguments: &codec::FieldTable) -> bool {
    matches!(
        arguments.get("x-single-active-consumer"),
        Some(codec::FieldValue::Bool(true))
    )
}
