//! The publish barrier: what one broker does for free with publishes pipelined behind one it
//! refuses, done across clusters.
//!
//! RabbitMQ handles a channel's methods in order. When it refuses a publish (missing or internal
//! exchange, no write permission, a `user_id` that is not the connection's user, an invalid
//! `expiration`, `immediate`), it closes the channel (or the connection) and discards everything
//! the client pipelined behind that publish: none of it is routed, and in confirm mode none of
//! it is confirmed, so a client that publishes again what was not confirmed duplicates nothing.
//!
//! Through warren the next publishes of the channel go to other clusters, which would route
//! them before the refusal comes back from the first: messages the client believes discarded
//! (and publishes again) would be delivered. So a publish the broker might refuse is followed,
//! on its link and channel, by a passive `exchange.declare` of its exchange, and warren reads
//! nothing more from the client until the answer: declare-ok means the broker accepted the
//! publish before it (a channel's methods are handled in order); a channel.close means it did
//! not, and what the client sent behind it is discarded as one broker discards it.
//!
//! A publish "might be refused" the first time this connection publishes to an exchange (an
//! exchange a publish was accepted to stays accepted, until a refusal on this connection, or
//! this connection deleting or unbinding anything or ending a consumer (a cancel, a channel
//! closed with consumers, a cluster's cancel), forgets them all: an auto-delete exchange goes
//! with its last binding, and an auto-delete queue's binding with its last consumer), and when
//! its properties carry a `user_id` other than the connection's user, an `expiration` that is not a plain number of at most ten years, a `CC` or `BCC` header that
//! is not an array of strings, or the direct reply-to pseudo-queue as `reply_to` on a channel
//! that does not consume it. The default exchange is checked too, the first time: it always
//! exists, but a user without write permission on `amq.default` is refused there (403).
//! Producers publish to a handful of exchanges, so this costs one round trip per exchange per
//! connection, not one per message.
//!
//! The check goes where the publish goes: a publish waiting for a cluster (a failover) is
//! checked when it is sent, and nothing more is read from the client while it waits; a
//! publish sent again because its link died before the check's answer is checked again on
//! the link that takes it.
//!
//! Not covered: RabbitMQ's topic permissions, which refuse a publish to a topic exchange by
//! its routing key. A publish refused so is refused (403) as on one broker, but publishes the
//! client pipelined behind it on the channel may already be routed by other clusters
//! (docs/semantics.md).

use super::*;

/// At most this many exchanges are remembered as accepted; past it the set starts again (a
/// client publishing to ever new exchange names must not grow warren's memory).
const MAX_PROVEN: usize = 4096;

/// A publish's `reply_to` against RabbitMQ's direct reply-to (see [`Session::reply_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyRequest {
    /// Any other `reply_to`, or none.
    No,
    /// The pseudo-queue, on a channel that consumes it: a request whose reply only this
    /// publish's link can take.
    Consumed,
    /// The pseudo-queue, on a channel that does not consume it: RabbitMQ refuses the publish.
    Unconsumed,
}

/// A publish whose acceptance is being checked: the client's input waits until the check on
/// `link`'s channel `ch` is answered or the channel is gone.
#[derive(Debug)]
pub(super) struct Barrier {
    link: LinkId,
    ch: u16,
    exchange: ShortStr,
}

impl Session {
    /// Whether a publish must be followed by a barrier (see the module docs). `reply_request`
    /// is what [`reply_request`](Self::reply_request) said of it.
    pub(super) fn needs_barrier(
        &mut self,
        publish: &codec::BasicPublish,
        content: &Content,
        reply_request: ReplyRequest,
    ) -> bool {
        let cc = routes_by_cc(&content.header);
        if cc && !self.noted_cc {
            // Its message may reach a queue's copy no binding leads to (crate::server_routes).
            self.noted_cc = true;
            self.shared.note_cc_publish(&self.vhost);
        }
        publish.immediate
            || !self.proven_exchanges.contains(&publish.exchange)
            || properties_need_check(&content.header, &self.base_spec.user, cc)
            || reply_request == ReplyRequest::Unconsumed
    }

    /// Whether a publish on channel `ch` names the direct reply-to pseudo-queue as its
    /// `reply_to`, and whether the channel consumes it (RabbitMQ refuses the publish if not).
    /// Asked once per publish: the header is read once.
    pub(super) fn reply_request(&self, ch: u16, content: &Content) -> ReplyRequest {
        if !asks_for_direct_reply(&content.header) {
            return ReplyRequest::No;
        }
        let consumed = self
            .channels
            .get(usize::from(ch))
            .and_then(Option::as_ref)
            .is_some_and(Channel::consumes_any_replies);
        if consumed {
            ReplyRequest::Consumed
        } else {
            ReplyRequest::Unconsumed
        }
    }

    /// Sends the check behind a publish just written to `link`'s channel `ch`.
    pub(super) fn raise_barrier(&mut self, link: LinkId, ch: u16, exchange: &ShortStr) {
        let slot = &mut self.links[link];
        if slot.done() {
            return;
        }
        // The default exchange cannot be declared, even passively; amq.direct always exists. A
        // name that is not UTF-8 names no exchange (the publish is refused with 404), and in a
        // declare RabbitMQ takes it for a framing error that closes the whole link: the check
        // asks for amq.direct instead, which answers just as well whether the publish before
        // it was accepted.
        let name = if exchange.is_empty() || std::str::from_utf8(exchange.as_bytes()).is_err() {
            ShortStr::from_static("amq.direct")
        } else {
            exchange.clone()
        };
        let check = Method::ExchangeDeclare(codec::ExchangeDeclare {
            exchange: name,
            passive: true,
            ..Default::default()
        });
        slot.request(ch, &check, Pending::Barrier);
        self.barrier = Some(Barrier {
            link,
            ch,
            exchange: exchange.clone(),
        });
    }

    /// True while a barrier's check is unanswered on a live link.
    pub(super) fn barrier_holds(&self) -> bool {
        self.barrier.as_ref().is_some_and(|b| {
            let slot = &self.links[b.link];
            !slot.done()
                && slot
                    .chans
                    .get(usize::from(b.ch))
                    .is_some_and(|up| up.pending.iter().any(|w| matches!(w.who, Pending::Barrier)))
        })
    }

    /// The check came back: the publish before it was accepted.
    pub(super) fn barrier_passed(&mut self) {
        let Some(b) = self.barrier.take() else {
            return;
        };
        if self.proven_exchanges.len() >= MAX_PROVEN {
            self.proven_exchanges.clear();
        }
        self.proven_exchanges.insert(b.exchange);
        // Publishes parked behind it (see `Session::unpark`) may go now.
        if !self.parked.is_empty() {
            self.unpark();
        }
    }

    /// `link` died. A check it had not answered goes with it, but the publish before it is
    /// sent again elsewhere (`Session::republish`), and a broker may refuse it there: the
    /// check follows it to `to`, where the last unconfirmed publish of the barrier's channel
    /// went, or the client's next publishes would be routed before the refusal comes back. A
    /// publish parked instead is checked when it is sent (`Session::unpark`).
    pub(super) fn move_barrier(&mut self, link: LinkId, to: Option<LinkId>) {
        let Some(b) = self.barrier.take_if(|b| b.link == link) else {
            return;
        };
        if let Some(to) = to {
            self.raise_barrier(to, b.ch, &b.exchange);
        }
    }

    /// The channel of the publish in question when the check is on `link`.
    pub(super) fn barrier_channel(&self, link: LinkId) -> Option<u16> {
        self.barrier
            .as_ref()
            .filter(|b| b.link == link)
            .map(|b| b.ch)
    }
}

/// Whether a publish's `reply_to` is the direct reply-to pseudo-queue itself, which RabbitMQ
/// refuses (406) on a channel that does not consume it.
fn asks_for_direct_reply(header: &[u8]) -> bool {
    crate::codec::properties::reply_to_span(header)
        .is_some_and(|span| &header[span] == b"amq.rabbitmq.reply-to")
}

/// Whether a content header's properties are ones a broker may refuse: a `user_id` other than
/// `user`, an `expiration` RabbitMQ would refuse (not a plain non-negative integer, or above ten years), or a `CC` / `BCC` header
/// that is not an array of strings. Decodes the properties only when one of these may be
/// present (the flag word says so, and for headers the raw bytes hold a `CC` or `BCC` key), so
/// ordinary publishes, Celery's with their headers too, pay a load and a short byte search. A
/// header that does not decode is left to the broker, behind a barrier.
/// `routing_headers`: what [`routes_by_cc`] says of `header`.
pub(super) fn properties_need_check(header: &[u8], user: &[u8], routing_headers: bool) -> bool {
    const EXPIRATION: u16 = 1 << (15 - 7);
    const USER_ID: u16 = 1 << (15 - 11);
    let Some(flags) = property_flags(header) else {
        return true;
    };
    if flags & (EXPIRATION | USER_ID) == 0 && !routing_headers {
        return false;
    }
    let Ok(decoded) = codec::ContentHeader::decode(bytes::Bytes::copy_from_slice(header)) else {
        return true;
    };
    let p = &decoded.properties;
    let wrong_user = p.user_id.as_ref().is_some_and(|u| u.as_bytes() != user);
    let odd_expiration = p
        .expiration
        .as_ref()
        .is_some_and(|e| !expiration_accepted(e.as_bytes()));
    // RabbitMQ routes to the queues a CC / BCC array names and refuses any other type there.
    let odd_routing = p.headers.as_ref().is_some_and(|h| {
        ["CC", "BCC"].iter().any(|k| match h.get(k) {
            None => false,
            Some(codec::FieldValue::Array(items)) => items
                .iter()
                .any(|v| !matches!(v, codec::FieldValue::LongStr(_))),
            Some(_) => true,
        })
    });
    wrong_user || odd_expiration || odd_routing
}

/// The longest `expiration` RabbitMQ accepts, in milliseconds (ten years); a longer one is
/// refused with 406 "invalid expiration ... value_too_large" (measured on RabbitMQ 3.10).
const MAX_EXPIRATION_MS: u64 = 315_360_000_000;

/// Whether RabbitMQ takes `expiration` as it is: a plain non-negative integer (leading zeros
/// allowed) of at most [`MAX_EXPIRATION_MS`].
fn expiration_accepted(expiration: &[u8]) -> bool {
    !expiration.is_empty()
        && expiration.iter().all(u8::is_ascii_digit)
        && expiration
            .iter()
            .try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .is_some_and(|ms| ms <= MAX_EXPIRATION_MS)
}

/// The first property flag word of a content header payload.
fn property_flags(header: &[u8]) -> Option<u16> {
    const FLAGS_AT: usize = 12; // class id, weight, body size
    header
        .get(FLAGS_AT..FLAGS_AT + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Whether a content header has headers that may hold a `CC` or `BCC` key, which RabbitMQ
/// routes by as by more routing keys.
pub(super) fn routes_by_cc(header: &[u8]) -> bool {
    const HEADERS: u16 = 1 << (15 - 2);
    property_flags(header).is_some_and(|f| f & HEADERS != 0) && names_cc_or_bcc(header)
}

/// Whether `header` holds the bytes of a table key `CC` or `BCC` (a short string: its length
/// byte, then the name). Celery's headers run to hundreds of bytes on every publish, so this is
/// one SIMD search for `CC` (memchr's memmem), not a comparison at every offset, with a searcher
/// built once (building it took as long as the search).
fn names_cc_or_bcc(header: &[u8]) -> bool {
    static CC: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"CC"));
    CC.find_iter(header).any(|at| {
        let before = &header[..at];
        before.ends_with(b"\x02") || before.ends_with(b"\x03B")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(header: &[u8], user: &[u8]) -> bool {
        properties_need_check(header, user, routes_by_cc(header))
    }
    use crate::codec::{BasicProperties, ContentHeader};

    fn header(p: BasicProperties) -> Vec<u8> {
        let mut out = BytesMut::new();
        ContentHeader {
            class_id: 60,
            body_size: 3,
            properties: p,
        }
        .encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn plain_properties_need_no_check() {
        let h = header(BasicProperties {
            content_type: Some(ShortStr::from_static("text/plain")),
            delivery_mode: Some(2),
            headers: Some(Default::default()),
            ..Default::default()
        });
        assert!(!need(&h, b"guest"));
    }

    #[test]
    fn the_connections_own_user_id_needs_no_check() {
        let h = header(BasicProperties {
            user_id: Some(ShortStr::from_static("guest")),
            ..Default::default()
        });
        assert!(!need(&h, b"guest"));
        assert!(need(&h, b"celery"));
    }

    #[test]
    fn an_expiration_rabbitmq_accepts_needs_no_check_anything_else_does() {
        for (value, check) in [
            ("60000", false),
            ("0", false),
            ("315360000000", false),
            ("0000000315360000000", false),
            ("315360000001", true),
            ("18446744073709551615", true),
            ("99999999999999999999999", true),
            ("", true),
            ("-5", true),
            ("1.5", true),
            ("soon", true),
        ] {
            let h = header(BasicProperties {
                expiration: Some(ShortStr::try_from(value.to_owned()).unwrap()),
                ..Default::default()
            });
            assert_eq!(need(&h, b"guest"), check, "{value:?}");
        }
    }

    #[test]
    fn cc_and_bcc_headers_need_a_check_unless_arrays_of_strings() {
        use crate::codec::{FieldTable, FieldValue, LongStr};
        let with = |key: &'static str, v: FieldValue| {
            let mut t = FieldTable::default();
            t.insert(ShortStr::from_static("x-retries"), FieldValue::I32(3));
            t.insert(ShortStr::from_static(key), v);
            header(BasicProperties {
                headers: Some(t),
                ..Default::default()
            })
        };
        let names = FieldValue::Array(vec![FieldValue::LongStr(LongStr::from_static("q1"))]);
        assert!(!need(&with("CC", names.clone()), b"guest"));
        assert!(!need(&with("BCC", names), b"guest"));
        let text = FieldValue::LongStr(LongStr::from_static("q1"));
        assert!(need(&with("CC", text.clone()), b"guest"));
        assert!(need(&with("BCC", text), b"guest"));
        let mixed = FieldValue::Array(vec![FieldValue::I32(1)]);
        assert!(need(&with("CC", mixed), b"guest"));
        assert!(!need(&with("ACCT", FieldValue::I32(1)), b"guest"));
    }

    #[test]
    fn the_key_search_finds_cc_and_bcc_keys_wherever_they_sit() {
        assert!(names_cc_or_bcc(b"\x02CC"));
        assert!(names_cc_or_bcc(b"\x03BCC"));
        assert!(names_cc_or_bcc(b"xCCC\x05hello\x02CCS"));
        // "CC" inside other keys or values, or at the very start with no length byte.
        assert!(!names_cc_or_bcc(b"CC"));
        assert!(!names_cc_or_bcc(b"\x04ACCT"));
        assert!(!names_cc_or_bcc(b"\x03XCC"));
        assert!(!names_cc_or_bcc(b"SUCCESS\x03CCC"));
        assert!(!names_cc_or_bcc(b""));
    }

    #[test]
    fn only_the_bare_pseudo_queue_as_reply_to_may_be_refused() {
        let reply_to = |v: &'static str| {
            header(BasicProperties {
                reply_to: Some(ShortStr::from_static(v)),
                ..Default::default()
            })
        };
        assert!(asks_for_direct_reply(&reply_to("amq.rabbitmq.reply-to")));
        assert!(!asks_for_direct_reply(&reply_to(
            "amq.rabbitmq.reply-to.g1h2AA.xyz"
        )));
        assert!(!asks_for_direct_reply(&reply_to("celery-replies")));
        assert!(!asks_for_direct_reply(&header(BasicProperties::default())));
    }

    #[test]
    fn a_truncated_header_is_left_to_the_broker() {
        assert!(need(&[0, 60, 0], b"guest"));
        let mut h = header(BasicProperties {
            user_id: Some(ShortStr::from_static("guest")),
            ..Default::default()
        });
        h.truncate(h.len() - 2);
        assert!(need(&h, b"guest"));
    }
}
