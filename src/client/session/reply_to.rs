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
//! `amq.rabbitmq.reply-to.<cluster>~<suffix>` in the delivered `reply_to` (deliveries, get-ok,
//! returns), and a publish to such a name goes to that cluster, with the name RabbitMQ gave.
//! Cluster names (ASCII letters, digits, `-`, `_`, `.`) never contain `~`, nor do RabbitMQ's
//! suffixes. Any warren instance with the same cluster names routes the reply, so callers and
//! servers need not share one. Nothing is kept per reply: the name carries the route.

use super::*;
use crate::codec::properties;

/// The names RabbitMQ gives reply-to addresses.
const PREFIX: &[u8] = b"amq.rabbitmq.reply-to.";
/// Separates the cluster from RabbitMQ's own suffix in the names warren hands out.
const SEPARATOR: u8 = b'~';

/// The cluster and RabbitMQ's own name of a reply-to address warren handed out, if `name` is one.
pub(super) fn parse(name: &[u8]) -> Option<(&[u8], ShortStr)> {
    let rest = name.strip_prefix(PREFIX)?;
    let at = rest.iter().position(|&c| c == SEPARATOR)?;
    let original = [PREFIX, &rest[at + 1..]].concat();
    let original = ShortStr::try_from(String::from_utf8(original).ok()?).ok()?;
    Some((&rest[..at], original))
}

/// The name warren hands out for RabbitMQ's address `amq.rabbitmq.reply-to.<suffix>` taken on
/// `cluster`; `None` when the suffix already names a cluster.
fn marked(cluster: &[u8], suffix: &[u8]) -> Option<Vec<u8>> {
    (!suffix.contains(&SEPARATOR)).then(|| [PREFIX, cluster, &[SEPARATOR], suffix].concat())
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
        let marked = marked(self.links[link].link.cluster.as_bytes(), suffix)?;
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
        let Some(marked) = marked(cluster.as_bytes(), suffix) else {
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
    /// caller has left.
    pub(super) fn publish_reply(
        &mut self,
        ch: u16,
        cluster: &[u8],
        routing_key: ShortStr,
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
        let Some(link) = self.live_link_to(cluster) else {
            match client_seq {
                Some(seq) => self.nack_lost(ch, &[seq]),
                None => {
                    self.metrics.dropped.inc();
                    warn!(conn = self.id, channel = ch, cluster = %String::from_utf8_lossy(cluster),
                        "reply to a direct reply-to address dropped: its cluster is not connected");
                }
            }
            return;
        };
        self.links[link].direct_reply_sent = Some(Instant::now());
        let mut publish = publish.clone();
        publish.routing_key = routing_key;
        let held = Held {
            publish,
            content: content.clone(),
            pinned: true,
        };
        self.send_publish(ch, link, client_seq, held, false);
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
            .and_then(|(cluster, original)| Some((self.live_link_to(cluster)?, original)));
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
    fn marked_names_parse_back_to_cluster_and_original() {
        let (cluster, original) = parse(b"amq.rabbitmq.reply-to.shard-b~g1h2AA.xyz==").unwrap();
        assert_eq!(cluster, b"shard-b");
        assert_eq!(original.as_str(), "amq.rabbitmq.reply-to.g1h2AA.xyz==");
        assert!(
            parse(b"amq.rabbitmq.reply-to.g1h2AA.xyz").is_none(),
            "not marked"
        );
        assert!(parse(b"amq.rabbitmq.reply-to").is_none());
        assert!(parse(b"celery").is_none());
    }
}
