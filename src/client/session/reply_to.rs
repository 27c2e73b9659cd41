//! RabbitMQ's direct reply-to across clusters.
//!
//! A caller consumes from the pseudo-queue `amq.rabbitmq.reply-to` and publishes requests with it
//! as `reply_to`; the broker that takes a request rewrites `reply_to` into
//! `amq.rabbitmq.reply-to.<suffix>`, a name that only that broker can route (it encodes the
//! caller's channel process), and the server publishes its reply to that name on the default
//! exchange. Through warren the caller's consumer runs on every shard cluster and its requests
//! are spread over them, so the reply must go back to the cluster that took the request: sent to
//! any other, it is lost, and RabbitMQ closes the server's connection with 541.
//!
//! So warren writes the cluster into the name on its way to the server:
//! `amq.rabbitmq.reply-to.<cluster>~<node>~<suffix>` in the delivered `reply_to` (deliveries,
//! get-ok, returns), and a publish to such a name goes to that cluster, with the name RabbitMQ
//! gave. Cluster names (ASCII letters, digits, `-`, `_`, `.`) never contain `~`, nor do
//! RabbitMQ's suffixes. Any warren instance with the same cluster names routes the reply, so
//! callers and servers need not share one. Nothing is kept per reply: the name carries the route.
//!
//! `<node>` marks the node that took the request (eight hex digits of a hash of its address).
//! RabbitMQ 3.10 crashes the channel, closing the server's whole connection with 541, when a
//! reply names a node of the cluster that is not running. A server whose link has failed over
//! to the other node would meet that after every node loss, where one broker returns or drops a
//! reply whose caller has gone. So a reply to a node the health probes find down is answered as
//! one broker answers for a gone caller, and never sent.

use super::*;
use crate::codec::properties;

/// The names RabbitMQ gives reply-to addresses.
const PREFIX: &[u8] = b"amq.rabbitmq.reply-to.";
/// Separates the cluster from RabbitMQ's own suffix in the names warren hands out.
const SEPARATOR: u8 = b'~';

/// A reply-to address warren handed out, taken apart.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Marked<'a> {
    pub cluster: &'a [u8],
    /// The mark of the node that took the request (see [`node_mark`]); addresses handed out
    /// before marks were written have none.
    pub node: Option<&'a [u8]>,
    /// RabbitMQ's own name of the address.
    pub original: ShortStr,
}

/// Length of a node's mark: hex digits of a 32-bit hash.
const MARK_LEN: usize = 8;

/// The cluster, node and RabbitMQ's own name of a reply-to address warren handed out, if `name`
/// is one.
pub(super) fn parse(name: &[u8]) -> Option<Marked<'_>> {
    let rest = name.strip_prefix(PREFIX)?;
    let at = rest.iter().position(|&c| c == SEPARATOR)?;
    let (cluster, after) = (&rest[..at], &rest[at + 1..]);
    let (node, suffix) = match after.get(MARK_LEN) {
        Some(&SEPARATOR) if after[..MARK_LEN].iter().all(u8::is_ascii_hexdigit) => {
            (Some(&after[..MARK_LEN]), &after[MARK_LEN + 1..])
        }
        _ => (None, after),
    };
    let original = [PREFIX, suffix].concat();
    let original = ShortStr::try_from(String::from_utf8(original).ok()?).ok()?;
    Some(Marked {
        cluster,
        node,
        original,
    })
}

/// The mark of a node in the addresses warren hands out: FNV-1a of its configured address, the
/// same in every warren instance and build whatever the order of the cluster's nodes. Hashed
/// as it is formatted: no allocation per marked delivery.
pub(super) fn node_mark(node: &impl std::fmt::Display) -> [u8; MARK_LEN] {
    struct Fnv(u32);
    impl std::fmt::Write for Fnv {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for &b in s.as_bytes() {
                self.0 = (self.0 ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
            Ok(())
        }
    }
    let mut h = Fnv(0x811c_9dc5);
    let _ = std::fmt::Write::write_fmt(&mut h, format_args!("{node}"));
    let mut out = [0u8; MARK_LEN];
    for (i, d) in out.iter_mut().enumerate() {
        *d = b"0123456789abcdef"[((h.0 >> (28 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// The name warren hands out for RabbitMQ's address `amq.rabbitmq.reply-to.<suffix>` taken on
/// node `node` (its mark) of `cluster`; `None` when the suffix already names a cluster.
fn marked(cluster: &[u8], node: &[u8], suffix: &[u8]) -> Option<Vec<u8>> {
    (!suffix.contains(&SEPARATOR))
        .then(|| [PREFIX, cluster, &[SEPARATOR], node, &[SEPARATOR], suffix].concat())
}

/// Whether `name` is a direct reply-to address (RabbitMQ's or one warren handed out), which a
/// queue.declare asks about rather than creates.
pub(super) fn is_address(name: &[u8]) -> bool {
    name.starts_with(PREFIX)
}

/// Where a content header's `reply_to` is, and what follows RabbitMQ's prefix in it, when it is
/// a direct reply-to address.
fn direct_reply(header: &[u8]) -> Option<(std::ops::Range<usize>, &[u8])> {
    let span = properties::reply_to_span(header)?;
    let suffix = header[span.clone()].strip_prefix(PREFIX)?;
    Some((span, suffix))
}

/// Whether a content header's `reply_to` is a direct reply-to address, which
/// [`Session::mark_reply_to`] may rewrite: a delivery that has one cannot be passed on as it came.
pub(super) fn names_direct_reply(header: &[u8]) -> bool {
    direct_reply(header).is_some()
}

impl Session {
    /// The address warren hands out for RabbitMQ's reply-to address `name` on `link`'s cluster,
    /// if `name` is one RabbitMQ gave (not yet marked, and short enough to carry the cluster).
    pub(super) fn marked_address(&self, link: LinkId, name: &[u8]) -> Option<ShortStr> {
        let suffix = name.strip_prefix(PREFIX)?;
        let link = &self.links[link].link;
        let node = node_mark(&link.node);
        let marked = marked(link.cluster.as_bytes(), &node, suffix)?;
        ShortStr::try_from(String::from_utf8(marked).ok()?).ok()
    }

    /// The live link to the cluster a marked address names.
    fn live_link_to(&self, cluster: &[u8]) -> Option<LinkId> {
        self.links
            .iter()
            .position(|s| s.link.cluster.as_bytes() == cluster && s.live())
    }

    /// Writes the cluster a message came from into its `reply_to`, when that is a direct reply-to
    /// address (see the module doc). Other messages pass untouched, for the cost of reading one
    /// flag word.
    pub(super) fn mark_reply_to(&self, link: LinkId, mut content: Content) -> Content {
        let Some((span, suffix)) = direct_reply(&content.header) else {
            return content;
        };
        let cluster = &self.links[link].link.cluster;
        let node = node_mark(&self.links[link].link.node);
        let Some(marked) = marked(cluster.as_bytes(), &node, suffix) else {
            return content;
        };
        match properties::replace_short_str(&content.header, span, &marked) {
            Some(header) => content.header = header,
            None => {
                warn!(conn = self.id, cluster = %cluster, "a direct reply-to address is too long to carry its cluster's name: a reply to it may go to another cluster and be lost");
            }
        }
        content
    }

    /// A reply to a direct reply-to address warren handed out: it goes to the cluster named in
    /// it, and nowhere else (republishing it elsewhere could only lose it). With that cluster
    /// unreachable the caller's consumer there is gone too: the reply is nacked to a
    /// confirm-mode client, dropped and counted otherwise, as RabbitMQ drops a reply whose
    /// caller has left. With the node that took the request down (see the module doc), the
    /// caller has gone with it: answered as one broker answers for a gone caller.
    pub(super) fn publish_reply(
        &mut self,
        ch: u16,
        to: Marked<'_>,
        method: &Method,
        content: &Content,
    ) {
        let Method::BasicPublish(publish) = method else {
            return;
        };
        if self.channel_mut(ch).is_some_and(|c| c.tx) {
            self.close_channel(
                ch,
                ReplyCode::NotImplemented,
                "warren does not carry a reply to a direct reply-to address inside a transaction",
                method,
            );
            return;
        }
        let client_seq = self.next_confirm_seq(ch);
        let Some(link) = self.live_link_to(to.cluster) else {
            match client_seq {
                Some(seq) => self.nack_lost(ch, &[seq]),
                None => {
                    self.metrics.dropped.inc();
                    warn!(conn = self.id, channel = ch, cluster = %String::from_utf8_lossy(to.cluster),
                        "reply to a direct reply-to address dropped: its cluster is not connected");
                }
            }
            return;
        };
        if self.caller_node_down(link, to.node) {
            debug!(conn = self.id, channel = ch, cluster = %String::from_utf8_lossy(to.cluster),
                "reply to a direct reply-to address whose node is down: its caller is gone");
            if publish.mandatory {
                let ret = Method::BasicReturn(codec::BasicReturn {
                    reply_code: ReplyCode::NoRoute.code(),
                    reply_text: ShortStr::from_static("NO_ROUTE"),
                    exchange: publish.exchange.clone(),
                    routing_key: publish.routing_key.clone(),
                });
                self.deliver(ch, &ret, Some(content));
            }
            if let Some(seq) = client_seq {
                let mut out = Vec::new();
                if let Some(confirms) = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()) {
                    confirms.settle(&[seq], &mut out);
                }
                for c in out {
                    let ack = Method::BasicAck(codec::BasicAck {
                        delivery_tag: c.seq,
                        multiple: c.multiple,
                    });
                    self.send_confirm(ch, None, ack);
                }
            }
            return;
        }
        let mut publish = publish.clone();
        publish.routing_key = to.original;
        let held = Held {
            publish,
            content: content.clone(),
            pinned: true,
        };
        self.send_publish(ch, link, client_seq, held, false);
    }

    /// Whether the node marked `node` in a reply-to address is down while `link`, the cluster's
    /// link, is on another node: the health probes' last verdict (a session that loses a link
    /// has its node probed at once).
    fn caller_node_down(&self, link: LinkId, node: Option<&[u8]>) -> bool {
        let Some(node) = node else {
            return false;
        };
        let link = &self.links[link].link;
        if node_mark(&link.node) == node {
            return false;
        }
        let config = self.shared.config();
        let Some(cluster) = config.cluster(&link.cluster) else {
            return false;
        };
        cluster
            .nodes
            .iter()
            .find(|n| node_mark(n) == node)
            .is_some_and(|n| self.shared.node_down(&link.cluster, &n.to_string()))
    }

    /// A queue.declare of a direct reply-to address: an RPC server checking that its caller is
    /// still there (declare-ok with one consumer), passive or not, as RabbitMQ answers both.
    /// Only the cluster named in the address knows it, under RabbitMQ's own name; any other
    /// cluster closes the connection (541). So it goes there alone, and the answer carries the
    /// client's name back. An address naming no connected cluster is answered as RabbitMQ
    /// answers for a caller that has gone: 404.
    pub(super) fn declare_reply_address(
        &mut self,
        ch: u16,
        q: &codec::QueueDeclare,
        method: &Method,
    ) -> Result<(), ConnError> {
        let routed = parse(q.queue.as_bytes())
            .and_then(|m| Some((self.live_link_to(m.cluster)?, m)))
            .filter(|(link, m)| !self.caller_node_down(*link, m.node))
            .map(|(link, m)| (link, m.original));
        let Some((link, original)) = routed else {
            let text = format!("no queue '{}' in vhost '{}'", q.queue.as_str(), self.vhost);
            self.close_channel(ch, ReplyCode::NotFound, &text, method);
            return Ok(());
        };
        let mut declare = q.clone();
        declare.queue = original;
        self.fan_out(ch, &Method::QueueDeclare(declare), LinkSet::one(link))?;
        if !q.nowait
            && let Some(rpc) = self.channel_mut(ch).and_then(|c| c.rpcs.back_mut())
        {
            rpc.rename = Some(q.queue.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_names_parse_back_to_cluster_node_and_original() {
        let m = parse(b"amq.rabbitmq.reply-to.shard-b~0badf00d~g1h2AA.xyz==").unwrap();
        assert_eq!(m.cluster, b"shard-b");
        assert_eq!(m.node, Some(b"0badf00d".as_slice()));
        assert_eq!(m.original.as_str(), "amq.rabbitmq.reply-to.g1h2AA.xyz==");
        // Addresses handed out before nodes were marked.
        let m = parse(b"amq.rabbitmq.reply-to.shard-b~g1h2AA.xyz==").unwrap();
        assert_eq!((m.cluster, m.node), (b"shard-b".as_slice(), None));
        assert_eq!(m.original.as_str(), "amq.rabbitmq.reply-to.g1h2AA.xyz==");
        assert!(
            parse(b"amq.rabbitmq.reply-to.g1h2AA.xyz").is_none(),
            "not marked"
        );
        assert!(parse(b"amq.rabbitmq.reply-to").is_none());
        assert!(parse(b"celery").is_none());
    }

    #[test]
    fn a_marked_address_parses_back() {
        let node = node_mark(&"127.0.0.1:5672");
        let name = marked(b"shard-a", &node, b"g1h2AA.xyz==").unwrap();
        let m = parse(&name).unwrap();
        assert_eq!(
            (m.cluster, m.node),
            (b"shard-a".as_slice(), Some(node.as_slice()))
        );
        assert_eq!(m.original.as_str(), "amq.rabbitmq.reply-to.g1h2AA.xyz==");
        assert_eq!(
            &node, b"0b4b6f16",
            "FNV-1a of the address, as tests/session_core.rs computes it"
        );
    }
}
