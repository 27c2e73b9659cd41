//! The upstream side of one client connection: a link to a cluster (`LinkSlot`) and, on it, the
//! upstream channel behind each client channel (`UpChan`): its state, its confirm mode and
//! pending confirms, and who waits for its next synchronous reply.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpState {
    Closed,
    Opening,
    Open,
    Closing,
}

/// Who is waiting for the next synchronous reply on an upstream channel. AMQP answers
/// synchronous requests on a channel in order, so a queue per upstream channel pairs each reply
/// with its request.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pending {
    /// A request the proxy made itself (replaying channel modes): swallow the reply.
    Internal,
    /// Part of a client request.
    Rpc(u64),
    /// Part of replaying the client's state on a link added by a reload.
    Replay,
    /// The check behind a publish that a broker might refuse (see `barrier.rs`).
    Barrier,
    /// A no-op on the client's channel ahead of the whole-queue check of conditional delete
    /// request `u64`: its reply says the channel's earlier methods reached their queues, so the
    /// check, sent on a channel of warren's own, sees them (see `Session::checked_delete`).
    Fence(u64),
    /// A failover replay's passive check `u64` of a queue or exchange of the client (see
    /// `vanished.rs`), on a channel of warren's own: it counts as a replayed request.
    ReplayCheck(u64),
    /// Asking another cluster whether it has the name replay check `u64` did not find.
    Probe(u64),
}

/// A request sent on an upstream channel, waiting for its reply.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiting {
    pub(super) who: Pending,
    /// A basic.consume. RabbitMQ's queue process, not the channel, sends consume-ok, so the
    /// replies to requests sent after a consume may come before its consume-ok: a consume-ok
    /// answers the oldest consume, any other reply the oldest request that is neither a consume
    /// nor a cancel.
    pub(super) consume: bool,
    /// A basic.cancel, by a hash of its consumer tag. The queue process sends cancel-ok too (for
    /// a consumer it still has), so it can come after the replies to later requests: seen with
    /// a queue.delete pipelined behind cancels, whose delete-ok overtook a cancel-ok. A
    /// cancel-ok answers the cancel of its tag.
    pub(super) cancel: Option<u64>,
}

/// The hash a cancel waits under (see [`Waiting::cancel`]).
fn tag_hash(tag: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tag.hash(&mut h);
    h.finish()
}

impl Waiting {
    fn for_request(who: Pending, method: &Method) -> Self {
        Waiting {
            who,
            consume: matches!(method, Method::BasicConsume(c) if !c.nowait),
            cancel: match method {
                Method::BasicCancel(c) if !c.nowait => Some(tag_hash(c.consumer_tag.as_bytes())),
                _ => None,
            },
        }
    }

    fn other(who: Pending) -> Self {
        Waiting {
            who,
            consume: false,
            cancel: None,
        }
    }
}

/// One upstream channel carrying (part of) a client channel of the same number.
#[derive(Debug)]
pub(super) struct UpChan {
    pub(super) state: UpState,
    /// Opened again, for this requester, as soon as the close in flight completes: the client
    /// reopened the channel meanwhile (its input waits until then, see
    /// `Session::input_paused`), or warren closed it to reopen it for a tx.select.
    pub(super) reopen: Option<Pending>,
    /// A channel of warren's own serving the client channel of this number (see
    /// [`LinkSlot::side_request`]); its replies are not the client channel `ch`'s.
    pub(super) side_for: Option<u16>,
    pub(super) confirm_mode: bool,
    pub(super) confirms: UpstreamConfirms,
    pub(super) pending: std::collections::VecDeque<Waiting>,
    /// The client's tx.select (its request id) that this channel answers once it has been
    /// closed and opened again without the confirm mode warren gave it: RabbitMQ refuses
    /// tx.select on a confirm channel. See `Session::select_tx`.
    pub(super) tx_swap: Option<u64>,
    /// The consumers subscribed on this channel here, oldest first, with their ack mode: a
    /// delivery is for the oldest of its tag still alive, since the broker handles the
    /// channel's methods in order (see [`UpConsumers`]).
    pub(super) consumers: UpConsumers,
}

impl UpChan {
    /// Whether the consumer delivering with `tag` here takes its deliveries without acks;
    /// `None` for a tag not subscribed here.
    pub(super) fn no_ack_of(&self, tag: &[u8]) -> Option<bool> {
        self.consumers.no_ack_of(tag)
    }

    /// Keeps the consumer bookkeeping of a method sent on this channel.
    fn sent(&mut self, method: &Method) {
        match method {
            Method::BasicConsume(c) => self.consumers.subscribed(&c.consumer_tag, c.no_ack),
            Method::BasicCancel(c) => self.consumers.cancel_sent(c.consumer_tag.as_bytes()),
            _ => {}
        }
    }

    /// Takes the request `reply` answers. Replies come in the order of the requests, except
    /// the two RabbitMQ's queue process sends: consume-ok answers the oldest consume, cancel-ok
    /// the cancel of its tag (see [`Waiting`]); any other reply the oldest request that is
    /// neither.
    fn take_waiting(&mut self, reply: &Method) -> Option<Pending> {
        let at = match reply {
            Method::BasicConsumeOk(_) => self.pending.iter().position(|w| w.consume),
            Method::BasicCancelOk(c) => {
                self.consumers.cancel_ok(c.consumer_tag.as_bytes());
                let tag = tag_hash(c.consumer_tag.as_bytes());
                self.pending.iter().position(|w| w.cancel == Some(tag))
            }
            _ => self
                .pending
                .iter()
                .position(|w| !w.consume && w.cancel.is_none()),
        }?;
        self.pending.remove(at).map(|w| w.who)
    }
}

impl Default for UpChan {
    fn default() -> Self {
        UpChan {
            state: UpState::Closed,
            reopen: None,
            side_for: None,
            confirm_mode: false,
            confirms: UpstreamConfirms::default(),
            pending: Default::default(),
            tx_swap: None,
            consumers: UpConsumers::default(),
        }
    }
}

/// Where a link is in its life. One value, so no combination of flags can say "closed but
/// taking publishes" or "retiring while replaying".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Opened later than the session (a failover, a cluster added by a reload): this client's
    /// state is being declared on it. It takes no sharded publishes until every replayed
    /// request is answered (`left`) and the topology, which waits for a client channel to
    /// carry it (`topology`), has been sent.
    Replaying {
        left: usize,
        topology: Option<TopologyPlan>,
    },
    /// Carrying the client's traffic.
    Serving,
    /// connection.close sent on purpose (its cluster was removed); its end is not a failure.
    Retiring,
    /// Closed (close-ok seen or the socket gone): nothing more is sent.
    Closed,
}

/// How a link's replay declares this client's topology (see `Session::replay_topology`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TopologyPlan {
    /// The cluster may lack any of the vhost's shared topology (added by a reload, new to this
    /// connection, or a log of what it missed that overflowed or was refused): the replay
    /// starts with all of it. Otherwise only the shared changes it missed are applied.
    pub(super) shared: bool,
    /// The cluster may lack any of this client's topology (new to the session, or more changes
    /// missed than the log keeps): the replay declares it. Otherwise the cluster kept what the
    /// old link declared, and the replay checks that the queues and exchanges are still there
    /// (passive declares), so it never re-creates what went meanwhile, then applies the
    /// changes the cluster missed (`Session::stale_topology`).
    pub(super) declare: bool,
    /// Whether the replay checks what the cluster kept (when it does not declare). Not after
    /// warren closed the link itself for idleness: nothing went with that link (it held no
    /// exclusive or auto-delete queue), and what vanished there meanwhile (a queue that
    /// expired, one another client deleted) vanished as on one broker, where the client learns
    /// of it when it next uses it, with the cluster's own 404. Checked, its absence would close
    /// the connection (320) as after a failover, for what one broker does without a word.
    pub(super) check: bool,
}

pub(super) struct LinkSlot {
    pub(super) link: Link,
    /// Which of the links this slot has held: a slot is reused for the link that replaces its
    /// cluster's dead one, with the next generation (see [`LinkRef`]).
    pub(super) generation: u32,
    pub(super) m: ClusterMetrics,
    pub(super) role: Role,
    pub(super) weight: u32,
    pub(super) drain: bool,
    pub(super) chans: Vec<UpChan>,
    /// Where the link is in its life: replaying, serving, retiring, closed.
    life: Life,
    /// connection.blocked from the cluster (a resource alarm): publishes go elsewhere.
    pub(super) blocked: bool,
    /// When its cluster was removed from the configuration: draining, closed once quiet.
    pub(super) removed_at: Option<Instant>,
    pub(super) last_delivery: Instant,
    /// Methods and publishes sent to it, to tell an idle link (see
    /// `Session::close_idle_shard_links`).
    pub(super) sent: std::sync::atomic::AtomicU64,
    /// Requests published here with the direct reply-to pseudo-queue as `reply_to`, and the
    /// direct replies delivered from here: while fewer replies than requests came, a reply may
    /// still be owed to an address only this link's connection can take (see
    /// `Session::state_lost_with`).
    pub(super) direct_requests: u64,
    pub(super) direct_replies: u64,
    /// When a reply to a direct reply-to address last went out here (see `Session::publish_reply`):
    /// RabbitMQ 3.10 closes a connection with a bare 541 for a reply naming a node that is not
    /// running, and the client is told why.
    pub(super) direct_reply_sent: Option<Instant>,
    /// Whether this link's replay carries the vhost's shared topology (declared through this
    /// warren while the cluster was unreachable, by any client): if the cluster refuses it,
    /// the cluster is marked stale again for the next link to try.
    pub(super) shared_replay: bool,
    /// Names found gone from every cluster before this link joined: the replay leaves out the
    /// changes that name them (see `joining.rs`).
    pub(super) left_out: Vec<crate::topology::Name>,
}

impl LinkSlot {
    pub(super) fn new(link: Link, role: Role, weight: u32, drain: bool, m: ClusterMetrics) -> Self {
        m.links.inc();
        LinkSlot {
            link,
            generation: 0,
            m,
            role,
            weight,
            drain,
            chans: Vec::new(),
            life: Life::Serving,
            blocked: false,
            removed_at: None,
            last_delivery: Instant::now(),
            sent: Default::default(),
            direct_requests: 0,
            direct_reply_sent: None,
            shared_replay: false,
            left_out: Vec::new(),
            direct_replies: 0,
        }
    }

    /// The link, taken out of its slot to join the connection later as a new one (see
    /// `Session::admit`): no longer counted as this slot.
    pub(super) fn into_link(self) -> Link {
        self.m.links.dec();
        self.link
    }

    /// Counts one method sent. Only the session's task writes it (a load and a store, no
    /// locked instruction on the publish path); atomic only because the slot is shared across
    /// an await.
    fn count_sent(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sent
            .store(self.sent.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// Marks the link closed; returns whether it was not closed already.
    pub(super) fn mark_done(&mut self) -> bool {
        let was_open = std::mem::replace(&mut self.life, Life::Closed) != Life::Closed;
        if was_open {
            self.m.links.dec();
        }
        was_open
    }

    /// Closed: close-ok seen or the socket gone; nothing more is sent on it.
    pub(super) fn done(&self) -> bool {
        self.life == Life::Closed
    }

    /// connection.close sent on purpose (its cluster was removed): its end is not a failure.
    pub(super) fn retiring(&self) -> bool {
        self.life == Life::Retiring
    }

    /// Sends connection.close with `close`: the link's end that follows is not a failure.
    pub(super) fn retire(&mut self, close: &Method) {
        if self.live() {
            self.link.send(0, close);
            self.life = Life::Retiring;
        }
    }

    /// Done replaying: every replayed request answered and the topology sent.
    pub(super) fn serving(&self) -> bool {
        self.life == Life::Serving
    }

    /// Starts replaying this client's state on a link just opened: `topology` is the plan for
    /// the topology, kept until a client channel is open to carry it (`None`: nothing waits).
    pub(super) fn start_replay(&mut self, topology: Option<TopologyPlan>) {
        if self.live() {
            self.life = Life::Replaying { left: 0, topology };
        }
    }

    /// The topology plan still waiting for a client channel, taken to be sent now.
    pub(super) fn take_topology(&mut self) -> Option<TopologyPlan> {
        match &mut self.life {
            Life::Replaying { topology, .. } => topology.take(),
            _ => None,
        }
    }

    /// A replayed request will be answered: the link is replaying until it is.
    pub(super) fn expect_replay_reply(&mut self) {
        match &mut self.life {
            Life::Serving => {
                self.life = Life::Replaying {
                    left: 1,
                    topology: None,
                }
            }
            Life::Replaying { left, .. } => *left += 1,
            Life::Retiring | Life::Closed => {}
        }
    }

    /// A replayed request was answered: returns true when that completes the replay and the
    /// link starts serving.
    pub(super) fn replay_answered(&mut self) -> bool {
        if let Life::Replaying { left, .. } = &mut self.life {
            *left = left.saturating_sub(1);
        }
        self.settle_replay()
    }

    /// The topology has been sent (its replies are counted as replayed requests).
    pub(super) fn topology_sent(&mut self) {
        if let Life::Replaying { topology, .. } = &mut self.life {
            *topology = None;
        }
    }

    /// Starts serving if the replay owes nothing more; returns true when it starts now.
    pub(super) fn settle_replay(&mut self) -> bool {
        if self.life
            == (Life::Replaying {
                left: 0,
                topology: None,
            })
        {
            self.life = Life::Serving;
            return true;
        }
        false
    }

    /// Resets an upstream channel that is gone, releasing its pending confirms; returns who
    /// waits for it to be opened again, if anyone.
    pub(super) fn reset_chan(&mut self, ch: u16) -> Option<Pending> {
        let m = self.m.confirms_pending.clone();
        let up = self.chan(ch);
        m.dec_by(up.confirms.pending() as i64);
        // The channel is gone: the broker processed or refused what was published on it.
        // Dropping those publishes gives their bytes back (see `HeldTicket`).
        let out = up.reopen;
        *up = UpChan::default();
        out
    }

    pub(super) fn chan(&mut self, ch: u16) -> &mut UpChan {
        let i = usize::from(ch);
        if self.chans.len() <= i {
            self.chans.resize_with(i + 1, UpChan::default);
        }
        &mut self.chans[i]
    }

    /// Whether `ch` is open here in confirm mode (so held publishes may go on it, and a
    /// tx.select needs it reopened first).
    pub(super) fn confirming(&self, ch: u16) -> bool {
        self.chans
            .get(usize::from(ch))
            .is_some_and(|u| u.state == UpState::Open && u.confirm_mode)
    }

    pub(super) fn chan_state(&self, ch: u16) -> UpState {
        self.chans
            .get(usize::from(ch))
            .map_or(UpState::Closed, |c| c.state)
    }

    pub(super) fn send(&self, ch: u16, method: &Method) {
        if !self.done() {
            self.count_sent();
            self.link.send(ch, method);
        }
    }

    /// [`send`](Self::send), keeping the channel's consumer bookkeeping (a basic.consume
    /// with `nowait`).
    pub(super) fn send_tracked(&mut self, ch: u16, method: &Method) {
        if !self.done() {
            self.chan(ch).sent(method);
            self.send(ch, method);
        }
    }

    /// Sends a synchronous request and remembers who waits for its reply.
    pub(super) fn request(&mut self, ch: u16, method: &Method, pending: Pending) {
        if self.done() {
            return;
        }
        let up = self.chan(ch);
        up.pending.push_back(Waiting::for_request(pending, method));
        up.sent(method);
        self.count_sent();
        self.link.send(ch, method);
    }

    pub(super) fn send_content(&self, ch: u16, method: &Method, content: &Content) {
        if self.done() {
            return;
        }
        self.count_sent();
        let frame_max = self.link.frame_max;
        self.link.outbox.push(|buf| {
            codec::write_method(buf, ch, method);
            content.write(buf, ch, frame_max);
        });
    }

    /// Takes the request `reply` answers (see [`Waiting::consume`]).
    pub(super) fn take_waiting(&mut self, ch: u16, reply: &Method) -> Option<Pending> {
        self.chan(ch).take_waiting(reply)
    }

    /// Opens the upstream channel `ch` (or schedules it behind a close in progress: returns
    /// true then).
    pub(super) fn open(&mut self, ch: u16, pending: Pending) -> bool {
        let done = self.done();
        let up = self.chan(ch);
        match up.state {
            UpState::Closed => {
                *up = UpChan {
                    state: UpState::Opening,
                    ..UpChan::default()
                };
                if !done {
                    up.pending.push_back(Waiting::other(pending));
                    self.link.send(ch, &Method::ChannelOpen(Default::default()));
                    if let Pending::Replay = pending {
                        self.expect_replay_reply();
                    }
                }
            }
            UpState::Closing => {
                up.reopen = Some(pending);
                return true;
            }
            // warren's own channel of this number is still in use: it closes when its check is
            // answered, and this open follows.
            UpState::Opening | UpState::Open if up.side_for.is_some() => {
                up.reopen = Some(pending);
                return true;
            }
            UpState::Opening | UpState::Open => {}
        }
        false
    }

    /// Sends channel.close for the client channel's part on this link, if it is open.
    pub(super) fn close_chan(&mut self, ch: u16, close: &Method) -> bool {
        let done = self.done();
        let up = self.chan(ch);
        if up.side_for.is_some() {
            // warren's own channel of this number, not the client's: the client's part was
            // never opened behind it.
            up.reopen = None;
            return false;
        }
        match up.state {
            UpState::Open | UpState::Opening => {
                up.state = UpState::Closing;
                up.reopen = None;
                up.pending.clear();
                if !done {
                    self.link.send(ch, close);
                }
                !done
            }
            UpState::Closing => {
                // A reopen planned behind the close in flight (the client's, or a tx.select's)
                // is off: the channel is being closed for good.
                up.reopen = None;
                up.pending.clear();
                !done
            }
            UpState::Closed => false,
        }
    }

    /// Like [`close_chan`](Self::close_chan), for the client's own channel.close: the requests
    /// sent on the channel before it are still answered (a broker answers a channel's methods
    /// in order, the close last), so what waits for their replies stays. The client's close is
    /// answered once no link's part of the channel is left closing
    /// (`Session::finish_client_close`).
    pub(super) fn close_chan_after_replies(&mut self, ch: u16, close: &Method) {
        let done = self.done();
        let up = self.chan(ch);
        if !done && up.side_for.is_none() && matches!(up.state, UpState::Open | UpState::Opening) {
            up.state = UpState::Closing;
            up.reopen = None;
            self.link.send(ch, close);
            return;
        }
        self.close_chan(ch, close);
    }

    /// Closes `ch` to open it again without confirm mode, once it owes nothing: every publish
    /// on it confirmed (closing earlier would leave their fate unknown) and every request
    /// answered. Does nothing unless a tx.select waits for this (`tx_swap`). The close-ok
    /// handler reopens it and sends the tx.select.
    pub(super) fn start_tx_swap_if_settled(&mut self, ch: u16) {
        let done = self.done();
        let up = self.chan(ch);
        if up.tx_swap.is_none()
            || up.state != UpState::Open
            || up.confirms.pending() > 0
            || !up.pending.is_empty()
        {
            return;
        }
        up.state = UpState::Closing;
        up.reopen = Some(Pending::Internal);
        if !done {
            self.link.send(
                ch,
                &close_method(200, "reopened without confirm mode for tx.select"),
            );
        }
    }

    /// Sends `method` on a channel of warren's own instead of the client channel `ch`: a check
    /// whose refusal must not close the client's channel (a passive declare of a queue that
    /// may be missing on this cluster, which RabbitMQ answers by closing the channel). The
    /// channel is the lowest number that neither the client (`in_use`) nor warren uses on this
    /// link; it is opened, asked, and closed once answered (`Session::on_side_method`). A
    /// client that opens the same number meanwhile waits for that close. Returns false when
    /// no number is free.
    pub(super) fn side_request(
        &mut self,
        ch: u16,
        method: &Method,
        who: Pending,
        in_use: impl Fn(u16) -> bool,
    ) -> bool {
        if self.done() {
            return false;
        }
        let top = match self.link.channel_max {
            0 => u16::MAX,
            n => n,
        };
        let Some(n) = (1..=top).find(|&n| !in_use(n) && self.chan_state(n) == UpState::Closed)
        else {
            return false;
        };
        let up = self.chan(n);
        *up = UpChan {
            state: UpState::Opening,
            side_for: Some(ch),
            ..UpChan::default()
        };
        up.pending.push_back(Waiting::other(Pending::Internal));
        up.pending.push_back(Waiting::for_request(who, method));
        self.link.send(n, &Method::ChannelOpen(Default::default()));
        self.link.send(n, method);
        true
    }

    /// Whether an upstream channel waits for a close in flight before it opens again for the
    /// client.
    pub(super) fn reopen_pending(&self) -> bool {
        !self.done() && self.chans.iter().any(|u| u.reopen.is_some())
    }

    /// Replaying or serving: neither closed nor being closed on purpose.
    pub(super) fn live(&self) -> bool {
        matches!(self.life, Life::Replaying { .. } | Life::Serving)
    }

    /// Whether this link may take sharded publishes now: live, replayed, a shard, not draining.
    pub(super) fn takes_shard_publishes(&self) -> bool {
        self.serving() && self.role == Role::Shard && !self.drain
    }

    /// Sends a request whose reply only completes this link's replay.
    pub(super) fn replay(&mut self, ch: u16, method: &Method) {
        if self.done() {
            return;
        }
        self.expect_replay_reply();
        self.request(ch, method, Pending::Replay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(tag: &str) -> Method {
        Method::BasicCancel(codec::BasicCancel {
            consumer_tag: ShortStr::try_from(tag.to_owned()).unwrap(),
            nowait: false,
        })
    }

    fn cancel_ok(tag: &str) -> Method {
        Method::BasicCancelOk(codec::BasicCancelOk {
            consumer_tag: ShortStr::try_from(tag.to_owned()).unwrap(),
        })
    }

    /// Cancels, then a queue.delete, then more cancels; RabbitMQ's queue process sends the
    /// cancel-oks, so the delete-ok overtakes some of them. Each reply still answers its own
    /// request: the delete-ok the delete, each cancel-ok the cancel of its tag.
    #[test]
    fn replies_the_queue_process_sends_answer_their_own_requests() {
        let mut up = UpChan::default();
        let consume = Method::BasicConsume(codec::BasicConsume::default());
        let delete = Method::QueueDelete(codec::QueueDelete::default());
        up.pending
            .push_back(Waiting::for_request(Pending::Rpc(1), &consume));
        up.pending
            .push_back(Waiting::for_request(Pending::Internal, &cancel("u1")));
        up.pending
            .push_back(Waiting::for_request(Pending::Rpc(2), &delete));
        up.pending
            .push_back(Waiting::for_request(Pending::Internal, &cancel("u2")));
        let delete_ok = Method::QueueDeleteOk(codec::QueueDeleteOk { message_count: 0 });
        assert!(matches!(up.take_waiting(&delete_ok), Some(Pending::Rpc(2))));
        assert!(matches!(
            up.take_waiting(&cancel_ok("u2")),
            Some(Pending::Internal)
        ));
        let consume_ok = Method::BasicConsumeOk(codec::BasicConsumeOk {
            consumer_tag: ShortStr::from_static("u0"),
        });
        assert!(matches!(
            up.take_waiting(&consume_ok),
            Some(Pending::Rpc(1))
        ));
        assert!(matches!(
            up.take_waiting(&cancel_ok("u1")),
            Some(Pending::Internal)
        ));
        assert!(up.pending.is_empty());
        assert!(
            up.take_waiting(&cancel_ok("u3")).is_none(),
            "nothing waits for it"
        );
    }
}
