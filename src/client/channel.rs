//! Per-channel state that lets one client channel span several upstream channels.
//!
//! Delivery tags and publish sequence numbers are per channel in AMQP. Once deliveries from several
//! clusters merge into one client channel, or publishes of one client channel spread over several
//! clusters, the numbers the client sees must be the proxy's own. These maps translate them, hold
//! only what is in flight, and free entries as acks and confirms arrive.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::codec::{Method, ShortStr};
use crate::held::{HeldLedger, HeldTicket};
use crate::io::Content;
use crate::upstream::LinkId;

/// A set of links of one session, as a bit set: the targets of a fanned-out method, the links a
/// consumer is registered on. A session has at most [`LinkSet::CAPACITY`] links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkSet(u64);

impl LinkSet {
    pub const CAPACITY: usize = crate::config::MAX_CLUSTERS;

    pub fn one(link: LinkId) -> Self {
        let mut s = LinkSet::default();
        s.insert(link);
        s
    }

    /// Adds `link`. Ids are below [`Self::CAPACITY`] (the configuration refuses more clusters
    /// and the session reuses dead links' slots); one above is never aliased onto another.
    pub fn insert(&mut self, link: LinkId) {
        debug_assert!(link < Self::CAPACITY);
        if link < Self::CAPACITY {
            self.0 |= 1u64 << link;
        }
    }

    pub fn remove(&mut self, link: LinkId) {
        if link < Self::CAPACITY {
            self.0 &= !(1u64 << link);
        }
    }

    pub fn contains(&self, link: LinkId) -> bool {
        link < Self::CAPACITY && self.0 & (1u64 << link) != 0
    }

    pub fn len(&self) -> u32 {
        self.0.count_ones()
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    pub fn first(&self) -> Option<LinkId> {
        (self.0 != 0).then(|| self.0.trailing_zeros() as LinkId)
    }

    pub fn iter(&self) -> impl Iterator<Item = LinkId> + use<> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as LinkId;
            bits &= bits - 1;
            Some(i)
        })
    }
}

/// A synchronous client request fanned out to one or more links, waiting for their replies.
///
/// Replies are merged into the one answer the client expects (message counts summed, consumer
/// counts maximised) and answered in request order.
#[derive(Debug)]
pub struct Rpc {
    pub id: u64,
    /// Replies still expected.
    pub waiting: u32,
    pub reply: Option<Reply>,
    /// basic.get on a sharded queue: the links still to try after a get-empty (popped from the
    /// back), and the request to send them.
    pub get_next: Vec<LinkId>,
    pub get_request: Option<Method>,
    /// Links asked one after the other (popped from the back), each once the one before has
    /// accepted the request: a declare or delete, or an exclusive consume, which several
    /// connections may race for. Asked in the same order (by cluster name) by every session and
    /// every warren, the first cluster decides who wins, as one broker would, instead of each
    /// cluster picking its own winner and every racer being refused somewhere (or the clusters
    /// ending up with different queues).
    pub in_turn: Vec<LinkId>,
    /// The client's request, sent again on a cluster's new link when the link it was sent on
    /// died before answering (see `Session::orphan_rpc`).
    pub request: Method,
    /// A topology change to remember once every cluster accepted it.
    pub on_success: Option<(crate::route::Class, Method)>,
    /// A queue.delete with `if_empty` or `if_unused`: this request is the passive declare on
    /// every cluster that checks the condition over the whole queue; the delete follows.
    pub then_delete: Option<crate::codec::QueueDelete>,
    /// This request asks one cluster whether the client may configure a queue, before warren
    /// answers a request about it itself (see `Session::check_configure_permission`).
    pub permission: Option<PermissionCheck>,
    /// The queue name the client asked for, to answer with in place of the cluster's: a
    /// direct reply-to address is declared on its cluster under RabbitMQ's own name.
    pub rename: Option<ShortStr>,
    /// The links that have answered (a basic.recover's deliveries wait on them, see
    /// [`Channel::recovered_on`]).
    pub answered: LinkSet,
    /// The client asked for no reply (`nowait`): warren asked the clusters for one, to learn
    /// whether they all accepted the change before remembering it, and keeps it to itself.
    pub silent: bool,
    /// A purge, delete or passive declare that must reach every cluster that may hold the
    /// queue's messages, one of which had no link when it was sent: it waits for that
    /// cluster's next link, and fails with 541 if none comes in time (see
    /// `Session::wait_for_missing_holders`).
    pub whole_queue: bool,
}

/// A check that the client may configure the queue a request of its names. RabbitMQ checks
/// that permission before anything else about a queue.declare or queue.delete; where warren
/// answers such a request itself, the check goes first, so a user without the permission gets
/// the same 403 as from one broker.
#[derive(Debug, Clone)]
pub struct PermissionCheck {
    /// The class and method ids of the client's request, for a refusal of it.
    pub ids: (u16, u16),
    /// warren's own refusal of the request, given once the permission is confirmed; `None`:
    /// the requests queued behind this one go on (a conditional delete's check).
    pub then: Option<OwnRefusal>,
}

/// A refusal warren gives itself, as a channel.close or, where RabbitMQ gives a connection
/// error, a connection.close.
#[derive(Debug, Clone)]
pub struct OwnRefusal {
    pub code: u16,
    /// The whole reply text, its code's name included.
    pub text: String,
    pub connection: bool,
}

/// The merged reply of an [`Rpc`], with the link it came from (a get-ok needs it for its tag).
#[derive(Debug)]
pub struct Reply {
    pub method: Method,
    pub content: Option<Content>,
    pub link: LinkRef,
}

impl Rpc {
    /// Folds one link's reply into the answer.
    pub fn merge(&mut self, method: Method, content: Option<Content>, link: LinkRef) {
        self.waiting = self.waiting.saturating_sub(1);
        let Some(acc) = &mut self.reply else {
            self.reply = Some(Reply {
                method,
                content,
                link,
            });
            return;
        };
        match (&mut acc.method, method) {
            (Method::QueueDeclareOk(a), Method::QueueDeclareOk(b)) => {
                a.message_count = a.message_count.saturating_add(b.message_count);
                a.consumer_count = a.consumer_count.max(b.consumer_count);
            }
            (Method::QueuePurgeOk(a), Method::QueuePurgeOk(b)) => {
                a.message_count = a.message_count.saturating_add(b.message_count);
            }
            (Method::QueueDeleteOk(a), Method::QueueDeleteOk(b)) => {
                a.message_count = a.message_count.saturating_add(b.message_count);
            }
            _ => {}
        }
    }
}

/// Where a client channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// channel.open sent upstream, open-ok not yet seen.
    Opening,
    Open,
    /// The client sent channel.close; the replies to its requests before the close and the
    /// deliveries the clusters sent before they read it are passed on, then close-ok once every
    /// upstream part answered its close.
    ClientClosing,
    /// A cluster (or warren itself) refused a request, and requests the client sent before it
    /// still wait for other clusters' replies: one broker answers those first, then closes the
    /// channel. The replies are sent as they complete and then the channel.close kept in
    /// [`Channel::failing`]; the client's frames are discarded meanwhile, as one broker
    /// discards what follows a refused method.
    Failing,
    /// The proxy sent channel.close to the client (upstream error or a protocol violation); every
    /// frame but close / close-ok is discarded until the client's close-ok.
    AwaitingCloseOk,
}

/// The channel.close of a [`ChannelState::Failing`] channel, sent once the requests before the
/// refused one are answered.
#[derive(Debug)]
pub struct PendingClose {
    pub close: crate::codec::ChannelClose,
    /// Requests with an id below this one came before the refused request and are answered;
    /// the others are discarded (`u64::MAX`: every request still waiting came before it).
    pub before: u64,
    /// The text of the channel.close sent to the channel's parts on the other clusters.
    pub siblings: &'static str,
    /// The client sent channel.close meanwhile: it crossed warren's and is answered with
    /// close-ok right after it.
    pub client_closed: bool,
}

/// A link as what outlives a turn of the session remembers it: its slot and the generation of
/// the link in that slot.
///
/// A session reuses the slot of a cluster's dead link for the link that replaces it (failover,
/// a node back), and the new link numbers its delivery tags from 1 again: an ack meant for a
/// delivery of the old link, sent on the new one, would settle another message. So a delivery
/// remembers its link's generation, and the session sends an ack only to the link of the same
/// generation ([`Session`](crate::client::session) compares them); an ack for an older one is
/// swallowed, as for any dead link (its broker requeued the message). The session also marks a
/// dead link's deliveries as [`DEAD`](Self::DEAD) when the link dies; the generation makes a
/// missed mark harmless instead of a wrong ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRef {
    slot: u32,
    generation: u32,
}

impl LinkRef {
    /// Deliveries whose link died: acks for them are dropped.
    pub const DEAD: LinkRef = LinkRef {
        slot: u32::MAX,
        generation: u32::MAX,
    };

    /// Slot ids stay below [`LinkSet::CAPACITY`], so they fit.
    pub fn new(slot: LinkId, generation: u32) -> Self {
        LinkRef {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            generation,
        }
    }

    /// The slot, or `None` for [`DEAD`](Self::DEAD).
    pub fn slot(self) -> Option<LinkId> {
        (self != Self::DEAD).then_some(self.slot as LinkId)
    }

    pub fn generation(self) -> u32 {
        self.generation
    }
}

/// One delivery the client has not acknowledged yet.
#[derive(Debug, Clone, Copy)]
struct Unacked {
    tag: u64,
    link: LinkRef,
    upstream_tag: u64,
}

/// An ack, nack or reject to send upstream: `multiple` covers every outstanding tag up to
/// `upstream_tag` on that link's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamAck {
    pub link: LinkRef,
    pub upstream_tag: u64,
    pub multiple: bool,
    /// How many deliveries this ack settles.
    pub count: u32,
}

/// The tag the client named is not outstanding: RabbitMQ closes the channel with 406.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownTag(pub u64);

/// The proxy's delivery tags for one client channel.
///
/// Tags are issued in arrival order, so the queue is sorted by tag, and per link the upstream tags
/// grow with ours. That makes a client's `multiple` ack exact upstream: for each link, one
/// `multiple` ack up to the highest upstream tag it covers acks precisely the same deliveries.
#[derive(Debug, Default)]
pub struct DeliveryTags {
    last: u64,
    unacked: VecDeque<Unacked>,
    /// In a transaction (tx.select): the deliveries its acks, nacks and rejects settled. The
    /// brokers apply them only at tx.commit; a tx.rollback undoes them, and the client may
    /// settle those deliveries again, so they come back (see [`rollback`](Self::rollback)).
    tx: Option<Vec<Unacked>>,
}

impl DeliveryTags {
    /// Issues the client tag for a delivery or get-ok. Deliveries the client will not ack
    /// (no_ack consumers) still take a number, but nothing is kept for them.
    /// The tag the next delivery gets, without using it up (a direct reply's, see
    /// [`Channel::consumes_replies`]).
    pub fn peek(&self) -> u64 {
        self.last + 1
    }

    pub fn issue(&mut self, link: LinkRef, upstream_tag: u64, needs_ack: bool) -> u64 {
        self.last += 1;
        if needs_ack {
            self.unacked.push_back(Unacked {
                tag: self.last,
                link,
                upstream_tag,
            });
        }
        self.last
    }

    pub fn outstanding(&self) -> usize {
        self.unacked.len()
    }

    /// Resolves a client ack / nack (`multiple` allowed) or reject into upstream acks, removing the
    /// covered entries. Tag 0 with `multiple` means every outstanding delivery.
    ///
    /// As on RabbitMQ, a tag that is not outstanding (never issued, already settled, or given to
    /// a no-ack delivery or get) is an error: the channel is closed with 406, and `multiple`
    /// must name an outstanding tag too (or 0). A delivery whose link died stays outstanding as
    /// a *dead* entry ([`kill_link`](Self::kill_link)): its broker requeued the message, and the
    /// client's ack for it is swallowed, never answered with 406, since the client could not
    /// have known.
    pub fn resolve(
        &mut self,
        tag: u64,
        multiple: bool,
        out: &mut Vec<UpstreamAck>,
    ) -> Result<(), UnknownTag> {
        out.clear();
        if multiple {
            let end = if tag == 0 {
                self.unacked.len()
            } else {
                match self.position(tag) {
                    Some(i) => i + 1,
                    None => return Err(UnknownTag(tag)),
                }
            };
            for entry in self.unacked.drain(..end) {
                if let Some(log) = self.tx.as_mut() {
                    log.push(entry);
                }
                if entry.link == LinkRef::DEAD {
                    continue;
                }
                match out.iter_mut().find(|a| a.link == entry.link) {
                    Some(a) => {
                        a.upstream_tag = entry.upstream_tag;
                        a.multiple = true;
                        a.count += 1;
                    }
                    None => out.push(UpstreamAck {
                        link: entry.link,
                        upstream_tag: entry.upstream_tag,
                        multiple: false,
                        count: 1,
                    }),
                }
            }
            return Ok(());
        }
        if tag == 0 || tag > self.last {
            return Err(UnknownTag(tag));
        }
        let Some(entry) = self.position(tag).and_then(|i| self.unacked.remove(i)) else {
            return Err(UnknownTag(tag));
        };
        if let Some(log) = self.tx.as_mut() {
            log.push(entry);
        }
        if entry.link == LinkRef::DEAD {
            return Ok(());
        }
        out.push(UpstreamAck {
            link: entry.link,
            upstream_tag: entry.upstream_tag,
            multiple: false,
            count: 1,
        });
        Ok(())
    }

    fn position(&self, tag: u64) -> Option<usize> {
        // Acks nearly always name the oldest delivery: check the front before searching.
        match self.unacked.front() {
            Some(front) if front.tag == tag => Some(0),
            _ => self.unacked.binary_search_by_key(&tag, |e| e.tag).ok(),
        }
    }

    /// Forgets every outstanding delivery of `link` (recover, or the link's channel is gone: the
    /// broker requeues them, so their tags can never be acked).
    /// The link of a delivery is gone: the broker has requeued the message (it will be delivered
    /// again, with `redelivered` set), so the client's ack for this tag must be swallowed, never
    /// answered with 406. Returns how many entries were marked.
    pub fn kill_link(&mut self, link: LinkRef) -> usize {
        let mut n = 0;
        for e in self.unacked.iter_mut().filter(|e| e.link == link) {
            e.link = LinkRef::DEAD;
            n += 1;
        }
        // Settled in the open transaction but not committed: the broker requeued them too.
        for e in self.tx.iter_mut().flatten().filter(|e| e.link == link) {
            e.link = LinkRef::DEAD;
        }
        n
    }

    /// The channel is transactional from now on: settlements wait for the commit.
    pub fn select_tx(&mut self) {
        self.tx.get_or_insert_with(Vec::new);
    }

    /// tx.commit: the transaction's settlements are final; the next transaction starts empty.
    pub fn commit(&mut self) {
        if let Some(log) = self.tx.as_mut() {
            log.clear();
        }
    }

    /// tx.rollback: the transaction's settlements are undone (the brokers keep those deliveries
    /// unacknowledged), so their tags are outstanding again. Calls `each` with the link of each
    /// delivery that comes back.
    pub fn rollback(&mut self, mut each: impl FnMut(LinkRef)) {
        let Some(log) = self.tx.as_mut() else {
            return;
        };
        for e in log.drain(..) {
            if e.link != LinkRef::DEAD {
                each(e.link);
            }
            let at = self.unacked.partition_point(|u| u.tag < e.tag);
            self.unacked.insert(at, e);
        }
    }

    /// Deliveries of `link` the client has not acknowledged yet.
    pub fn count_link(&self, link: LinkRef) -> usize {
        self.unacked.iter().filter(|e| e.link == link).count()
    }

    /// Deliveries of `link` the client holds and its broker would requeue if the link died:
    /// those not acknowledged yet, and those settled in the open transaction (the broker applies
    /// a transaction's acks only at its commit).
    pub fn held_from(&self, link: LinkRef) -> usize {
        self.count_link(link) + self.tx.iter().flatten().filter(|e| e.link == link).count()
    }

    /// The link of these deliveries is being closed on purpose (a removed cluster): the same as
    /// [`kill_link`](Self::kill_link) for the client.
    pub fn forget_link(&mut self, link: LinkRef) -> usize {
        self.kill_link(link)
    }

    /// Forgets every outstanding delivery, calling `each` with the link of each one.
    pub fn forget_all(&mut self, mut each: impl FnMut(LinkRef)) {
        for e in self.unacked.drain(..) {
            each(e.link);
        }
        if let Some(log) = self.tx.as_mut() {
            log.clear();
        }
    }
}

/// Publisher confirms of one client channel: client sequence numbers outstanding, in order.
#[derive(Debug, Default)]
pub struct ClientConfirms {
    next: u64,
    outstanding: VecDeque<u64>,
}

/// A confirm to send to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfirm {
    pub seq: u64,
    pub multiple: bool,
}

impl ClientConfirms {
    /// Numbers the next client publish.
    pub fn next_seq(&mut self) -> u64 {
        self.next += 1;
        self.outstanding.push_back(self.next);
        self.next
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Removes the confirmed `seqs` (ascending) and returns the confirms for the client, coalesced
    /// into one `multiple` when they are exactly the oldest outstanding ones.
    pub fn settle(&mut self, seqs: &[u64], out: &mut Vec<ClientConfirm>) {
        out.clear();
        if seqs.is_empty() {
            return;
        }
        let k = seqs.len();
        if self.outstanding.len() >= k && self.outstanding.iter().take(k).eq(seqs.iter()) {
            self.outstanding.drain(..k);
            out.push(ClientConfirm {
                seq: seqs[k - 1],
                multiple: k > 1,
            });
            return;
        }
        for &s in seqs {
            if let Ok(i) = self.outstanding.binary_search(&s) {
                self.outstanding.remove(i);
                out.push(ClientConfirm {
                    seq: s,
                    multiple: false,
                });
            }
        }
    }
}

/// A publish the proxy keeps until its cluster confirms it, so it can be published again on
/// another cluster if that one dies first. The header and body are the `Bytes` read
/// from the client: shared, not copied.
#[derive(Debug, Clone)]
pub struct Held {
    pub publish: crate::codec::BasicPublish,
    pub content: Content,
    /// Only the cluster it was sent to can take it (a reply to a direct reply-to address): it is
    /// never published again elsewhere.
    pub pinned: bool,
}

/// What holding one publish costs beyond its message and names: its entry in the link's
/// ledger of unconfirmed publishes and in the client's confirm map, their queues' slots, and
/// the allocations behind its method and header. Measured: a publisher of 1-byte messages that
/// never reads its confirms grew warren's memory by about 330 bytes per held publish, when 64
/// were counted here, so the bounds (`max_held_bytes_per_connection`, `max_held_bytes`) let
/// memory grow to nearly four times what they say.
const HELD_OVERHEAD: usize = 320;

impl Held {
    /// Memory this publish holds.
    pub fn size(&self) -> usize {
        self.content.len()
            + self.publish.exchange.len()
            + self.publish.routing_key.len()
            + HELD_OVERHEAD
    }
}

/// A publish waiting for its cluster's confirm.
#[derive(Debug)]
pub struct InFlight {
    pub seq: u64,
    /// The client's sequence number, when the client asked for confirms.
    pub client: Option<u64>,
    pub at: tokio::time::Instant,
    pub held: Held,
    /// Its bytes, counted against the session's bound until this is dropped.
    pub ticket: HeldTicket,
}

/// Publisher confirms of one upstream channel: which publish each upstream sequence number is.
#[derive(Debug, Default)]
pub struct UpstreamConfirms {
    next: u64,
    pending: VecDeque<InFlight>,
}

impl UpstreamConfirms {
    /// Records a publish sent upstream; every publish on a channel in confirm mode is numbered.
    /// Its bytes count in `ledger` until its fate is settled and it is dropped.
    pub fn record(&mut self, client: Option<u64>, held: Held, ledger: &Arc<HeldLedger>) {
        self.next += 1;
        let ticket = ledger.hold(held.size());
        self.pending.push_back(InFlight {
            seq: self.next,
            client,
            at: tokio::time::Instant::now(),
            held,
            ticket,
        });
    }

    /// Resolves an upstream ack or nack into the publishes it settles, oldest first.
    pub fn resolve(&mut self, upstream_seq: u64, multiple: bool, out: &mut Vec<InFlight>) {
        out.clear();
        if multiple {
            while self.pending.front().is_some_and(|p| p.seq <= upstream_seq) {
                out.extend(self.pending.pop_front());
            }
        } else if self.pending.front().is_some_and(|p| p.seq == upstream_seq) {
            // Brokers confirm nearly in order: the oldest is the usual one.
            out.extend(self.pending.pop_front());
        } else if let Ok(i) = self.pending.binary_search_by_key(&upstream_seq, |p| p.seq) {
            out.extend(self.pending.remove(i));
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Every publish still waiting (when the channel or its link is lost).
    pub fn drain(&mut self) -> Vec<InFlight> {
        self.pending.drain(..).collect()
    }
}

/// A consumer of a client channel, registered on one or more links.
#[derive(Debug, Clone)]
pub struct Consumer {
    pub tag: ShortStr,
    pub no_ack: bool,
    /// The links where this consumer is active; when the last one cancels it, the client is told.
    pub links: LinkSet,
    /// The consume request, replayed on links opened later (an added cluster, a failover);
    /// `None` once the consumer is being cancelled, by the client or by a cluster.
    pub request: Option<crate::codec::BasicConsume>,
    /// A cluster cancelled it on its own (its queue was deleted there, or its mirrored queue
    /// failed over under `x-cancel-on-ha-failover`), and warren is cancelling it on the other
    /// clusters (`links`). Until the last of them has answered, what they deliver still goes
    /// to the client; then the client is told basic.cancel, once. One broker, too, sends the
    /// deliveries it has made before basic.cancel, and nothing after.
    pub cancelled_by_cluster: bool,
    /// The client has its consume-ok (or asked for none).
    pub ready: bool,
    /// Consumes direct replies (the pseudo-queue `amq.rabbitmq.reply-to`).
    pub replies: bool,
    /// The channel's per-consumer prefetch (`basic.qos`, `global = false`) when it subscribed:
    /// a broker applies the setting to consumers started after it, so one started before a
    /// change keeps its limit, also when a new link subscribes it again.
    pub prefetch: Option<crate::codec::BasicQos>,
}

/// The publishes of a channel's open transaction (shared `Bytes`, not copies).
///
/// A transaction lives on one cluster's channel; if that link dies before the commit is
/// answered, the broker forgets the uncommitted publishes. The log lets the proxy publish them
/// again on another link and commit there, so a commit-ok always means every publish of the
/// transaction was committed somewhere. A transaction larger than the log's bound is not kept:
/// losing its link fails the commit with a channel error instead (as RabbitMQ would fail it).
#[derive(Debug, Default)]
pub struct TxLog {
    pub publishes: Vec<Held>,
    pub bytes: usize,
    /// The log overflowed its bound and was dropped: this transaction cannot be redone.
    pub overflowed: bool,
    /// The transaction's link died with publishes of this transaction on it.
    pub lost: bool,
    /// The commit sent and not yet answered: its rpc id, and the link that had the
    /// transaction's publishes.
    pub committing: Option<(u64, LinkId)>,
}

impl TxLog {
    /// Remembers a publish of the transaction, up to `limit` bytes in all.
    pub fn record(&mut self, held: &Held, limit: usize) {
        if self.overflowed {
            return;
        }
        self.bytes += held.size();
        if self.bytes > limit {
            self.publishes = Vec::new();
            self.overflowed = true;
        } else {
            self.publishes.push(held.clone());
        }
    }
}

/// Everything the proxy keeps for one client channel.
#[derive(Debug)]
pub struct Channel {
    pub state: ChannelState,
    pub tags: DeliveryTags,
    pub consumers: Vec<Consumer>,
    /// The queue last declared on this channel: what an empty queue name means in bind,
    /// unbind, purge, delete, consume and get (AMQP 0-9-1, 1.7.2.1; RabbitMQ does not apply it to a
    /// passive declare).
    pub last_queue: Option<ShortStr>,
    pub confirms: Option<ClientConfirms>,
    pub tx: bool,
    /// In a transaction every publish goes to one cluster, chosen at the first publish.
    pub tx_link: Option<LinkId>,
    /// The sharded publishes of the open transaction, kept until its commit is answered.
    pub tx_log: TxLog,
    /// Synchronous requests waiting for replies, oldest first.
    pub rpcs: VecDeque<Rpc>,
    /// Deliveries waiting for a consume-ok to reach the client first.
    /// Deliveries waiting, with the link they came from and their upstream tag still in place:
    /// their client tags are issued when they are released, after what they wait for, so that
    /// on every link the client's tags keep growing with the upstream ones.
    pub held: Vec<HeldDelivery>,
    /// Deliveries of links that have answered a basic.recover the client is still waiting
    /// for (see [`Channel::recovered_on`]), in arrival order, sent after its recover-ok.
    pub after_recover: Vec<HeldDelivery>,
    /// The client's basic.qos settings, re-split when the set of shard clusters changes.
    pub qos: Prefetch,
    /// Under a `spread = "channel"` routing rule (its index), the link this channel publishes
    /// to while it stays usable.
    pub sticky: Vec<(usize, LinkId)>,
    /// basic.cancel notifications waiting for the channel's outstanding replies: a cluster's
    /// cancel may overtake the merged reply to the request that caused it (a queue.delete of
    /// the consumed queue), which one broker answers first.
    pub notices: Vec<Method>,
    /// The close waiting for earlier replies while the channel is [`ChannelState::Failing`].
    pub failing: Option<PendingClose>,
    /// Returns and publisher confirms that a link sent after answering a request whose merged
    /// reply the client has not had yet (see [`Channel::answered_by`]), in the order they are
    /// to reach the client.
    pub after_replies: VecDeque<AfterReply>,
    /// A cluster refused a request the client sent before its channel.close: the client gets
    /// that channel.close before its close-ok, as one broker sends both.
    pub refused_while_closing: Option<crate::codec::ChannelClose>,
    next_rpc: u64,
}

/// A delivery waiting for its turn: the link it came from, the basic.deliver with its
/// upstream tag still in place, its message, and whether its consumer takes it without an ack.
/// The ack mode is fixed when the delivery arrives: by the time it goes out, the consumer it
/// was for may have been cancelled and its tag taken by a consumer of the other mode.
pub type HeldDelivery = (LinkRef, Method, Option<Content>, bool);

/// A basic.return (with its message) or a publisher confirm for the client, waiting for the
/// merged reply to request `until` and those before it.
///
/// One broker handles a channel's commands in order, so the reply to a request (a declare, a
/// bind, a purge) reaches the client before the return or the confirm of a publish sent behind
/// it. warren answers a request once every cluster has, and a cluster that answered early may
/// return or confirm such a publish while another cluster is still working on the request.
#[derive(Debug)]
pub struct AfterReply {
    pub until: u64,
    pub method: Method,
    pub content: Option<Content>,
}

/// A channel's prefetch as RabbitMQ keeps it: two settings, the limit of each consumer started
/// after it (`global = false`) and the limit shared by the channel's consumers
/// (`global = true`). A per-consumer basic.qos also lifts the channel's limit (RabbitMQ 3.x
/// `unlimit_prefetch`s it: "ensures that if default was set, it's overridden"); a channel
/// basic.qos changes only its own. Whatever rebuilds the channel upstream (a link opened or
/// failed over, the channel swapped for a tx.select) sends the settings in force again:
/// sending only the last one lifted the other limit there.
#[derive(Debug, Default, Clone)]
pub struct Prefetch {
    per_consumer: Option<crate::codec::BasicQos>,
    per_channel: Option<crate::codec::BasicQos>,
}

impl Prefetch {
    /// Records a basic.qos the client sent.
    pub fn set(&mut self, q: &crate::codec::BasicQos) {
        if q.global {
            self.per_channel = Some(q.clone());
        } else {
            self.per_consumer = Some(q.clone());
            self.per_channel = None;
        }
    }

    /// The per-consumer setting in force: what a consumer started now gets.
    pub fn per_consumer(&self) -> Option<&crate::codec::BasicQos> {
        self.per_consumer.as_ref()
    }

    /// The settings in force, to send again in this order.
    pub fn settings(&self) -> Vec<crate::codec::BasicQos> {
        self.per_consumer
            .iter()
            .chain(self.per_channel.iter())
            .cloned()
            .collect()
    }
}

impl Channel {
    /// The client ended consumer `tag` itself (its cancel-ok went out, or it cancelled with
    /// `nowait`): a cluster's basic.cancel of it waiting in [`Channel::notices`] is moot. Sent
    /// after that, it would name a tag the client no longer has (py-amqp raises
    /// ConsumerCancelled), or one it has given to a new consumer since; one broker sends its
    /// cancel, if at all, before the cancel-ok.
    pub fn drop_cancel_notice(&mut self, tag: &ShortStr) {
        self.notices
            .retain(|n| !matches!(n, Method::BasicCancel(x) if x.consumer_tag == *tag));
    }

    pub fn new() -> Self {
        Channel {
            state: ChannelState::Opening,
            tags: DeliveryTags::default(),
            consumers: Vec::new(),
            last_queue: None,
            confirms: None,
            tx: false,
            tx_link: None,
            tx_log: TxLog::default(),
            rpcs: VecDeque::new(),
            qos: Prefetch::default(),
            held: Vec::new(),
            after_recover: Vec::new(),
            sticky: Vec::new(),
            notices: Vec::new(),
            after_replies: VecDeque::new(),
            refused_while_closing: None,
            failing: None,
            next_rpc: 0,
        }
    }

    /// Registers a request that waits for `waiting` replies; returns its id.
    pub fn push_rpc(&mut self, waiting: u32, get_next: Vec<LinkId>, request: &Method) -> u64 {
        self.next_rpc += 1;
        self.rpcs.push_back(Rpc {
            id: self.next_rpc,
            waiting,
            reply: None,
            get_next,
            get_request: None,
            in_turn: Vec::new(),
            request: request.clone(),
            on_success: None,
            then_delete: None,
            permission: None,
            rename: None,
            answered: LinkSet::default(),
            silent: false,
            whole_queue: false,
        });
        self.next_rpc
    }

    /// The id the next request will have.
    pub fn next_rpc_id(&self) -> u64 {
        self.next_rpc + 1
    }

    /// Whether a basic.recover or a tx.commit on this channel has been answered by `link` but
    /// not yet by every cluster. A broker sends recover-ok (commit-ok) before the redeliveries
    /// of what it requeued (a transaction's nacks and rejects with `requeue`); warren answers
    /// the client once every cluster has, so what `link` delivers meanwhile waits in
    /// [`Channel::after_recover`] until the client has the reply.
    pub fn recovered_on(&self, link: LinkId) -> bool {
        self.rpcs.iter().any(|r| {
            matches!(r.request, Method::BasicRecover(_) | Method::TxCommit(_))
                && r.answered.contains(link)
        })
    }

    /// The newest request `link` has answered whose merged reply the client has not had yet:
    /// a return or a confirm `link` sends now must reach the client after that reply. `None`
    /// (nothing to wait for) is the common case, an empty queue of requests.
    pub fn answered_by(&self, link: LinkId) -> Option<u64> {
        self.rpcs
            .iter()
            .rev()
            .find(|r| r.answered.contains(link))
            .map(|r| r.id)
    }

    /// Whether the return or confirm at the head of [`Channel::after_replies`] may go: the
    /// replies it waits for have been sent (requests are answered in order, so every request
    /// still queued is newer than them).
    pub fn after_reply_ready(&self) -> bool {
        self.after_replies
            .front()
            .is_some_and(|w| self.rpcs.front().is_none_or(|r| r.id > w.until))
    }

    pub fn rpc(&self, id: u64) -> Option<&Rpc> {
        self.rpcs.iter().find(|r| r.id == id)
    }

    pub fn rpc_mut(&mut self, id: u64) -> Option<&mut Rpc> {
        self.rpcs.iter_mut().find(|r| r.id == id)
    }

    pub fn consumer_mut(&mut self, tag: &ShortStr) -> Option<&mut Consumer> {
        self.consumers.iter_mut().find(|c| &c.tag == tag)
    }

    /// Whether consumer `tag` takes its deliveries without acks. By the tag's bytes, so the
    /// fast lane asks with a tag it has not decoded, and gets the general path's answer.
    pub fn consumer_no_ack(&self, tag: &[u8]) -> bool {
        self.consumers
            .iter()
            .any(|c| c.no_ack && c.tag.as_bytes() == tag)
    }

    /// Whether the channel consumes direct replies (`amq.rabbitmq.reply-to`): RabbitMQ refuses a
    /// publish naming the pseudo-queue as `reply_to` on a channel that does not, and gives each
    /// reply the channel's next delivery tag without using it up.
    pub fn consumes_any_replies(&self) -> bool {
        self.consumers.iter().any(|c| c.replies)
    }

    /// Whether consumer `tag` consumes direct replies (see [`Channel::consumes_any_replies`]).
    pub fn consumes_replies(&self, tag: &[u8]) -> bool {
        self.consumers
            .iter()
            .any(|c| c.replies && c.tag.as_bytes() == tag)
    }

    /// Removes consumer `tag`, the oldest of that tag: a client may subscribe a new consumer
    /// with the tag of one whose cancel is still being answered, and that one stays.
    pub fn remove_consumer(&mut self, tag: &ShortStr) -> bool {
        match self.consumers.iter().position(|c| &c.tag == tag) {
            Some(i) => {
                self.consumers.remove(i);
                true
            }
            None => false,
        }
    }
}

impl Default for Channel {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first link in slot `slot`.
    fn l(slot: LinkId) -> LinkRef {
        LinkRef::new(slot, 0)
    }

    fn qos(prefetch_count: u16, global: bool) -> crate::codec::BasicQos {
        crate::codec::BasicQos {
            prefetch_count,
            global,
            ..Default::default()
        }
    }

    fn in_force(p: &Prefetch) -> Vec<(u16, bool)> {
        p.settings()
            .iter()
            .map(|q| (q.prefetch_count, q.global))
            .collect()
    }

    #[test]
    fn a_per_consumer_prefetch_lifts_the_channels_as_rabbitmq_does() {
        // Per consumer, then per channel: both hold.
        let mut p = Prefetch::default();
        p.set(&qos(3, false));
        p.set(&qos(2, true));
        assert_eq!(in_force(&p), vec![(3, false), (2, true)]);
        // Per channel, then per consumer: RabbitMQ unlimits the channel.
        let mut p = Prefetch::default();
        p.set(&qos(2, true));
        p.set(&qos(5, false));
        assert_eq!(in_force(&p), vec![(5, false)]);
        assert_eq!(p.per_consumer().map(|q| q.prefetch_count), Some(5));
        // A channel limit set again afterwards holds beside it.
        p.set(&qos(4, true));
        assert_eq!(in_force(&p), vec![(5, false), (4, true)]);
    }

    #[test]
    fn multiple_ack_maps_to_one_upstream_ack_per_link() {
        let mut t = DeliveryTags::default();
        // Two links interleaved: ours 1..=5, link 0 tags 1,2,3 and link 1 tags 1,2.
        assert_eq!(t.issue(l(0), 1, true), 1);
        assert_eq!(t.issue(l(1), 1, true), 2);
        assert_eq!(t.issue(l(0), 2, true), 3);
        assert_eq!(t.issue(l(1), 2, true), 4);
        assert_eq!(t.issue(l(0), 3, true), 5);
        let mut out = Vec::new();
        t.resolve(2, false, &mut out).unwrap();
        assert_eq!(
            out,
            vec![UpstreamAck {
                link: l(1),
                upstream_tag: 1,
                multiple: false,
                count: 1
            }]
        );
        t.resolve(4, true, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                UpstreamAck {
                    link: l(0),
                    upstream_tag: 2,
                    multiple: true,
                    count: 2
                },
                UpstreamAck {
                    link: l(1),
                    upstream_tag: 2,
                    multiple: false,
                    count: 1
                },
            ]
        );
        assert_eq!(
            t.resolve(4, false, &mut out),
            Err(UnknownTag(4)),
            "an issued, settled tag is 406, as on RabbitMQ"
        );
        assert_eq!(
            t.resolve(4, true, &mut out),
            Err(UnknownTag(4)),
            "so is a multiple ack naming a settled tag"
        );
        assert_eq!(t.resolve(9, true, &mut out), Err(UnknownTag(9)));
        t.resolve(0, true, &mut out).unwrap();
        assert_eq!(
            out,
            vec![UpstreamAck {
                link: l(0),
                upstream_tag: 3,
                multiple: false,
                count: 1
            }]
        );
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_rollback_makes_the_transactions_settlements_outstanding_again() {
        let mut t = DeliveryTags::default();
        t.select_tx();
        for up in 1..=4 {
            t.issue(l(up as usize % 2), up, true);
        }
        let mut out = Vec::new();
        t.resolve(2, false, &mut out).unwrap();
        t.resolve(4, true, &mut out).unwrap();
        assert_eq!(t.outstanding(), 0);
        let mut back = Vec::new();
        t.rollback(|r| back.push(r.slot()));
        back.sort_unstable();
        assert_eq!(back, [Some(0), Some(0), Some(1), Some(1)]);
        assert_eq!(t.outstanding(), 4, "every settlement undone");
        // The same tags settle again, in tag order upstream.
        t.resolve(1, false, &mut out).unwrap();
        assert_eq!(out[0].upstream_tag, 1);
        t.resolve(4, true, &mut out).unwrap();
        assert_eq!(out.iter().map(|a| a.count).sum::<u32>(), 3);
        // A commit makes them final: a rollback after it brings nothing back.
        t.commit();
        t.rollback(|_| panic!("nothing to undo after the commit"));
        assert_eq!(t.resolve(4, false, &mut out), Err(UnknownTag(4)));
    }

    #[test]
    fn acks_for_deliveries_of_a_dead_link_are_swallowed() {
        let mut t = DeliveryTags::default();
        t.issue(l(0), 1, true);
        t.issue(l(1), 1, true);
        t.issue(l(0), 2, true);
        assert_eq!(t.kill_link(l(0)), 2);
        let mut out = Vec::new();
        t.resolve(1, false, &mut out).unwrap();
        assert!(out.is_empty(), "nothing goes to a dead link");
        t.resolve(3, true, &mut out).unwrap();
        assert_eq!(out.len(), 1, "only link 1's delivery is acked upstream");
        assert_eq!(out[0].link, l(1));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_slots_next_link_is_another_link_to_the_tag_map() {
        // Slot 0's link delivers tags 1 and 2, dies, and the link that takes the slot over
        // numbers from 1 again. Even had the death not been recorded (no kill_link), the old
        // deliveries resolve to the old generation, never to the new link's tags.
        let mut t = DeliveryTags::default();
        let (old, new) = (LinkRef::new(0, 0), LinkRef::new(0, 1));
        t.issue(old, 1, true);
        t.issue(old, 2, true);
        t.issue(new, 1, true);
        assert_eq!(t.count_link(old), 2);
        assert_eq!(t.count_link(new), 1);
        let mut out = Vec::new();
        t.resolve(3, true, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                UpstreamAck {
                    link: old,
                    upstream_tag: 2,
                    multiple: true,
                    count: 2
                },
                UpstreamAck {
                    link: new,
                    upstream_tag: 1,
                    multiple: false,
                    count: 1
                },
            ],
            "one ack per generation: the session sends the old one nowhere"
        );
        assert_eq!(LinkRef::DEAD.slot(), None);
        assert_eq!(new.slot(), Some(0));
    }

    #[test]
    fn no_ack_deliveries_take_a_tag_but_no_memory() {
        let mut t = DeliveryTags::default();
        assert_eq!(t.issue(l(0), 1, false), 1);
        assert_eq!(t.issue(l(0), 2, true), 2);
        assert_eq!(t.outstanding(), 1);
        let mut out = Vec::new();
        assert_eq!(
            t.resolve(1, false, &mut out),
            Err(UnknownTag(1)),
            "a no-ack tag is 406, as on RabbitMQ"
        );
        assert_eq!(
            t.resolve(3, false, &mut out),
            Err(UnknownTag(3)),
            "never issued"
        );
    }

    #[test]
    fn confirms_coalesce_only_when_contiguous() {
        let held = || Held {
            publish: Default::default(),
            content: Content {
                header: bytes::Bytes::new(),
                body_size: 0,
                body: Default::default(),
            },
            pinned: false,
        };
        let mut c = ClientConfirms::default();
        let mut up0 = UpstreamConfirms::default();
        let mut up1 = UpstreamConfirms::default();
        let ledger = HeldLedger::standalone();
        for i in 0..6 {
            let s = c.next_seq();
            if i % 2 == 0 {
                up0.record(Some(s), held(), &ledger)
            } else {
                up1.record(Some(s), held(), &ledger)
            }
        }
        let (mut settled, mut out) = (Vec::new(), Vec::new());
        let seqs = |v: &Vec<InFlight>| v.iter().filter_map(|p| p.client).collect::<Vec<_>>();
        up1.resolve(2, true, &mut settled); // client 2, 4
        assert_eq!(seqs(&settled), vec![2, 4]);
        c.settle(&seqs(&settled), &mut out);
        assert_eq!(
            out,
            vec![
                ClientConfirm {
                    seq: 2,
                    multiple: false
                },
                ClientConfirm {
                    seq: 4,
                    multiple: false
                }
            ]
        );
        up0.resolve(2, true, &mut settled); // client 1, 3
        c.settle(&seqs(&settled), &mut out);
        assert_eq!(
            out,
            vec![ClientConfirm {
                seq: 3,
                multiple: true
            }]
        );
        c.settle(&[5], &mut out);
        assert_eq!(
            out,
            vec![ClientConfirm {
                seq: 5,
                multiple: false
            }]
        );
        assert_eq!(c.outstanding(), 1);
        assert_eq!(up0.pending() + up1.pending(), 2);
    }
}
