//! Routes RabbitMQ follows that no binding shows: dead-letter exchanges, alternate exchanges
//! and `CC`/`BCC` headers.
//!
//! Why warren keeps them: every queue has a copy on every cluster, and a queue with a control
//! name and only control bindings is taken never to get a message on a shard cluster. When its
//! copy there goes with a link (an exclusive queue, an auto-delete queue whose consumer was on
//! the link), the failover declares it again and the client stays connected: nothing was lost
//! with it. But a sharded queue that dead-letters into it (`x-dead-letter-exchange` "" and
//! `x-dead-letter-routing-key` naming it), a sharded exchange whose `alternate-exchange` is
//! one it is bound to, or a publish whose `CC` header names it, puts messages in that copy,
//! and they would go with the link unannounced. So the queue and exchange declares and the
//! publishes of every connection of a vhost note here where such routes lead, and a copy any
//! of them may reach counts as one that may hold messages: losing it closes the client (320),
//! as losing a broker would.
//!
//! What is noted is never forgotten while the process runs (a route may have been followed
//! before the queue or exchange that set it was deleted), and is bounded: past [`MAX_NAMES`]
//! names, every queue counts as reachable. Routes set by a policy (`dead-letter-exchange`,
//! `alternate-exchange` in a policy's definition) never pass through warren and are not seen;
//! docs/semantics.md says so.

use std::collections::HashSet;

use crate::codec::{FieldTable, FieldValue, Method};

/// Names kept per vhost before every queue counts as reachable.
pub const MAX_NAMES: usize = 10_000;

/// Where the unseen routes of one vhost lead.
#[derive(Debug, Default, Clone)]
pub struct ServerRoutes {
    /// A route may lead to any queue: a dead-letter exchange "" without a routing key (the
    /// messages keep theirs), a `CC`/`BCC` header, or too many names to keep.
    any_queue: bool,
    /// Exchanges messages reach without a binding: dead-letter and alternate exchanges.
    exchanges: HashSet<Vec<u8>>,
    /// Queues named as the dead-letter routing key of the default exchange.
    queues: HashSet<Vec<u8>>,
}

impl ServerRoutes {
    /// Notes the routes a queue or exchange declare sets up.
    pub fn note_declare(&mut self, method: &Method) {
        match method {
            Method::QueueDeclare(q) if !q.passive => self.note_dead_letter(&q.arguments),
            Method::ExchangeDeclare(x) if !x.passive => {
                if let Some(alternate) = string_arg(&x.arguments, "alternate-exchange") {
                    self.note_exchange(alternate);
                }
            }
            _ => {}
        }
    }

    /// Notes a publish with a `CC` or `BCC` header: its message may reach any queue.
    pub fn note_cc(&mut self) {
        self.any_queue = true;
    }

    /// Whether an unseen route may put messages in `queue`, bound to `bound_to` exchanges.
    pub fn may_reach<'a>(
        &self,
        queue: &[u8],
        mut bound_to: impl Iterator<Item = &'a [u8]>,
    ) -> bool {
        self.any_queue
            || self.queues.contains(queue)
            || bound_to.any(|e| self.exchanges.contains(e))
    }

    fn note_dead_letter(&mut self, args: &FieldTable) {
        let Some(exchange) = string_arg(args, "x-dead-letter-exchange") else {
            return;
        };
        if !exchange.is_empty() {
            self.note_exchange(exchange);
            return;
        }
        match string_arg(args, "x-dead-letter-routing-key") {
            Some(queue) => {
                if self.room() {
                    self.queues.insert(queue.to_vec());
                }
            }
            None => self.any_queue = true,
        }
    }

    fn note_exchange(&mut self, exchange: &[u8]) {
        if self.room() {
            self.exchanges.insert(exchange.to_vec());
        }
    }

    /// Whether another name may be kept; when not, every queue counts as reachable.
    fn room(&mut self) -> bool {
        if self.exchanges.len() + self.queues.len() >= MAX_NAMES {
            self.any_queue = true;
            return false;
        }
        true
    }
}

/// A string argument, as RabbitMQ reads it (a long string; a short one does not exist in
/// tables).
fn string_arg<'a>(args: &'a FieldTable, key: &str) -> Option<&'a [u8]> {
    match args.get(key)? {
        FieldValue::LongStr(s) => Some(s.as_bytes()),
        FieldValue::ByteArray(b) => Some(b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{ExchangeDeclare, LongStr, QueueDeclare, ShortStr};

    fn table(pairs: &[(&str, &str)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(
                ShortStr::try_from(*k).unwrap(),
                FieldValue::LongStr(LongStr::from(v.as_bytes().to_vec())),
            );
        }
        t
    }

    fn queue(args: &[(&str, &str)]) -> Method {
        Method::QueueDeclare(QueueDeclare {
            queue: ShortStr::from_static("work"),
            arguments: table(args),
            ..Default::default()
        })
    }

    const NONE: [&[u8]; 0] = [];

    #[test]
    fn a_dead_letter_routing_key_on_the_default_exchange_reaches_that_queue_only() {
        let mut r = ServerRoutes::default();
        r.note_declare(&queue(&[
            ("x-dead-letter-exchange", ""),
            ("x-dead-letter-routing-key", "celeryev.x"),
        ]));
        assert!(r.may_reach(b"celeryev.x", NONE.into_iter()));
        assert!(!r.may_reach(b"celeryev.y", NONE.into_iter()));
    }

    #[test]
    fn the_default_exchange_without_a_routing_key_reaches_any_queue() {
        let mut r = ServerRoutes::default();
        r.note_declare(&queue(&[("x-dead-letter-exchange", "")]));
        assert!(r.may_reach(b"anything", NONE.into_iter()));
    }

    #[test]
    fn a_named_dead_letter_or_alternate_exchange_reaches_the_queues_bound_to_it() {
        let mut r = ServerRoutes::default();
        r.note_declare(&queue(&[("x-dead-letter-exchange", "dlx")]));
        r.note_declare(&Method::ExchangeDeclare(ExchangeDeclare {
            exchange: ShortStr::from_static("tasks"),
            arguments: table(&[("alternate-exchange", "celeryev")]),
            ..Default::default()
        }));
        assert!(r.may_reach(b"q", [&b"dlx"[..]].into_iter()));
        assert!(r.may_reach(b"q", [&b"other"[..], &b"celeryev"[..]].into_iter()));
        assert!(!r.may_reach(b"q", [&b"other"[..]].into_iter()));
    }

    #[test]
    fn passive_declares_and_plain_queues_set_up_nothing() {
        let mut r = ServerRoutes::default();
        let Method::QueueDeclare(mut q) = queue(&[("x-dead-letter-exchange", "")]) else {
            unreachable!()
        };
        q.passive = true;
        r.note_declare(&Method::QueueDeclare(q));
        r.note_declare(&queue(&[("x-message-ttl", "5")]));
        assert!(!r.may_reach(b"work", NONE.into_iter()));
    }

    #[test]
    fn a_cc_header_or_too_many_names_make_every_queue_reachable() {
        let mut r = ServerRoutes::default();
        r.note_cc();
        assert!(r.may_reach(b"q", NONE.into_iter()));
        let mut r = ServerRoutes::default();
        for i in 0..=MAX_NAMES {
            r.note_exchange(format!("x{i}").as_bytes());
        }
        assert!(r.may_reach(b"q", NONE.into_iter()));
    }
}
