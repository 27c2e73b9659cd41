//! The topology a client declared, kept to be declared again on links opened later.
//!
//! A session keeps its own (including exclusive queues, which belong to its connection); the
//! proxy keeps, per vhost, the shared sharded topology every session declared, so a cluster
//! added by a reload gets every durable queue, exchange and binding before any publish is routed
//! there, even those declared by clients that have since disconnected.

use crate::codec::{self, Method, ShortStr};
use crate::route::Class;

/// Entries kept; beyond this the oldest are forgotten (and not replayed).
const MAX_ENTRIES: usize = 10_000;

/// A queue or an exchange, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Name {
    Queue(ShortStr),
    Exchange(ShortStr),
}

impl Name {
    /// The name a declare creates.
    pub fn declared_by(method: &Method) -> Option<Name> {
        match method {
            Method::QueueDeclare(q) if !q.passive => Some(Name::Queue(q.queue.clone())),
            Method::ExchangeDeclare(x) if !x.passive => Some(Name::Exchange(x.exchange.clone())),
            _ => None,
        }
    }

    /// The name a check (a passive declare) asks about.
    pub fn checked_by(method: &Method) -> Option<Name> {
        match method {
            Method::QueueDeclare(q) => Some(Name::Queue(q.queue.clone())),
            Method::ExchangeDeclare(x) => Some(Name::Exchange(x.exchange.clone())),
            _ => None,
        }
    }

    /// The deletion that forgets the name in a topology record.
    pub fn deletion(&self) -> Method {
        match self {
            Name::Queue(queue) => Method::QueueDelete(codec::QueueDelete {
                queue: queue.clone(),
                ..Default::default()
            }),
            Name::Exchange(exchange) => Method::ExchangeDelete(codec::ExchangeDelete {
                exchange: exchange.clone(),
                ..Default::default()
            }),
        }
    }

    /// Whether `method` names this queue or exchange (a declare, a binding of it or to it,
    /// a deletion): sent to a cluster that lacks the name, it would be refused, or create it.
    pub fn named_by(&self, method: &Method) -> bool {
        match self {
            Name::Queue(n) => match method {
                Method::QueueDeclare(q) => &q.queue == n,
                Method::QueueBind(b) => &b.queue == n,
                Method::QueueUnbind(b) => &b.queue == n,
                Method::QueueDelete(d) => &d.queue == n,
                Method::QueuePurge(p) => &p.queue == n,
                _ => false,
            },
            Name::Exchange(n) => match method {
                Method::ExchangeDeclare(x) => &x.exchange == n,
                Method::ExchangeDelete(x) => &x.exchange == n,
                Method::QueueBind(b) => &b.exchange == n,
                Method::QueueUnbind(b) => &b.exchange == n,
                Method::ExchangeBind(b) => &b.source == n || &b.destination == n,
                Method::ExchangeUnbind(b) => &b.source == n || &b.destination == n,
                _ => false,
            },
        }
    }

    /// The passive declare that asks a cluster whether it has the name.
    pub fn check(&self) -> Method {
        match self {
            Name::Queue(queue) => Method::QueueDeclare(codec::QueueDeclare {
                queue: queue.clone(),
                passive: true,
                ..Default::default()
            }),
            Name::Exchange(exchange) => Method::ExchangeDeclare(codec::ExchangeDeclare {
                exchange: exchange.clone(),
                passive: true,
                ..Default::default()
            }),
        }
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Queue(q) => write!(f, "queue '{q}'"),
            Name::Exchange(x) => write!(f, "exchange '{x}'"),
        }
    }
}

/// Declarations and bindings in the order they were made, with where they live.
#[derive(Debug, Default, Clone)]
pub struct Topology {
    entries: Vec<(Class, Method)>,
}

fn same_binding(a: &Method, b: &Method) -> bool {
    match (a, b) {
        (Method::QueueBind(a), Method::QueueBind(b)) => {
            a.queue == b.queue
                && a.exchange == b.exchange
                && a.routing_key == b.routing_key
                && a.arguments == b.arguments
        }
        (Method::QueueBind(a), Method::QueueUnbind(b)) => {
            a.queue == b.queue
                && a.exchange == b.exchange
                && a.routing_key == b.routing_key
                && a.arguments == b.arguments
        }
        (Method::ExchangeBind(a), Method::ExchangeBind(b)) => {
            a.destination == b.destination
                && a.source == b.source
                && a.routing_key == b.routing_key
                && a.arguments == b.arguments
        }
        (Method::ExchangeBind(a), Method::ExchangeUnbind(b)) => {
            a.destination == b.destination
                && a.source == b.source
                && a.routing_key == b.routing_key
                && a.arguments == b.arguments
        }
        _ => false,
    }
}

impl Topology {
    pub fn entries(&self) -> impl Iterator<Item = &(Class, Method)> {
        self.entries.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn has(&self, class: Class) -> bool {
        self.entries.iter().any(|(c, _)| *c == class)
    }

    /// Whether `queue` was declared here exclusive or auto-delete: a queue RabbitMQ deletes with
    /// its connection or its last consumer.
    fn goes_with_its_users(&self, queue: &crate::codec::ShortStr) -> bool {
        self.entries.iter().any(|(_, m)| {
            matches!(m, Method::QueueDeclare(q)
                if &q.queue == queue && (q.exclusive || q.auto_delete))
        })
    }

    /// Applies a declaration, binding, unbinding or deletion every cluster accepted.
    pub fn record(&mut self, class: Class, method: Method) {
        let t = &mut self.entries;
        match method {
            Method::ExchangeDeclare(mut x) => {
                t.retain(
                    |(_, m)| !matches!(m, Method::ExchangeDeclare(o) if o.exchange == x.exchange),
                );
                x.nowait = false;
                t.push((class, Method::ExchangeDeclare(x)));
            }
            Method::QueueDeclare(mut x) => {
                if x.queue.is_empty() {
                    return;
                }
                t.retain(|(_, m)| !matches!(m, Method::QueueDeclare(o) if o.queue == x.queue));
                x.nowait = false;
                t.push((class, Method::QueueDeclare(x)));
            }
            Method::QueueBind(mut x) => {
                let m = Method::QueueBind(x.clone());
                t.retain(|(_, o)| !same_binding(o, &m));
                x.nowait = false;
                t.push((class, Method::QueueBind(x)));
            }
            Method::ExchangeBind(mut x) => {
                let m = Method::ExchangeBind(x.clone());
                t.retain(|(_, o)| !same_binding(o, &m));
                x.nowait = false;
                t.push((class, Method::ExchangeBind(x)));
            }
            m @ (Method::QueueUnbind(_) | Method::ExchangeUnbind(_)) => {
                t.retain(|(_, o)| !same_binding(o, &m))
            }
            Method::ExchangeDelete(x) => t.retain(|(_, m)| match m {
                Method::ExchangeDeclare(o) => o.exchange != x.exchange,
                Method::QueueBind(o) => o.exchange != x.exchange,
                Method::ExchangeBind(o) => o.source != x.exchange && o.destination != x.exchange,
                _ => true,
            }),
            Method::QueueDelete(x) => t.retain(|(_, m)| match m {
                Method::QueueDeclare(o) => o.queue != x.queue,
                Method::QueueBind(o) => o.queue != x.queue,
                _ => true,
            }),
            _ => {}
        }
        if t.len() > MAX_ENTRIES {
            let excess = t.len() - MAX_ENTRIES;
            t.drain(..excess);
        }
    }

    /// The part other connections may declare again: no exclusive or auto-delete queue, nor
    /// bindings of one. RabbitMQ deletes those with their connection or their last consumer,
    /// which these records do not see; declared again on a cluster that missed them, they
    /// would outlive their users there, taking messages nobody reads. The connection that uses
    /// one declares it again itself when its link to that cluster opens.
    pub fn shareable(&self, method: &Method) -> bool {
        match method {
            Method::QueueDeclare(q) => !q.exclusive && !q.auto_delete,
            Method::QueueBind(b) => !self.goes_with_its_users(&b.queue),
            _ => true,
        }
    }
}

/// The topology changes one connection made while a cluster had no link for it (down,
/// failing over, refusing), in the order made: the cluster's next link applies them, removals
/// included, after checking what it kept. Declaring the connection's whole record there
/// instead re-created queues and bindings deleted since (by another client, or by RabbitMQ
/// when a queue expired) on that one cluster, and removals made meanwhile never reached it.
#[derive(Debug, Default)]
pub struct Missed {
    pub methods: Vec<Method>,
    /// More changes than [`MAX_MISSED`]: the next link declares the whole record instead.
    pub overflowed: bool,
}

/// Changes kept per cluster while it is away.
const MAX_MISSED: usize = 1024;

impl Missed {
    pub fn push(&mut self, method: Method) {
        if self.overflowed {
            return;
        }
        if self.methods.len() >= MAX_MISSED {
            self.overflowed = true;
            self.methods = Vec::new();
            return;
        }
        self.methods.push(method);
    }

    /// Whether one of the changes declares queue or exchange `name`.
    pub fn declares(&self, name: &ShortStr) -> bool {
        self.methods.iter().any(|m| match m {
            Method::QueueDeclare(q) => &q.queue == name,
            Method::ExchangeDeclare(x) => &x.exchange == name,
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, ShortStr};

    fn s(x: &'static str) -> ShortStr {
        ShortStr::from_static(x)
    }

    #[test]
    fn a_missed_log_keeps_its_order_and_gives_up_past_its_bound() {
        let declare = |q: &'static str| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: s(q),
                ..Default::default()
            })
        };
        let unbind = Method::QueueUnbind(codec::QueueUnbind {
            queue: s("q"),
            exchange: s("x"),
            ..Default::default()
        });
        let mut log = Missed::default();
        log.push(declare("q"));
        log.push(unbind.clone());
        assert!(log.declares(&s("q")) && !log.declares(&s("x")));
        assert_eq!(log.methods, [declare("q"), unbind]);
        for _ in 0..MAX_MISSED {
            log.push(declare("more"));
        }
        assert!(log.overflowed && log.methods.is_empty());
        log.push(declare("after"));
        assert!(
            log.methods.is_empty(),
            "past the bound, nothing more is kept"
        );
    }

    #[test]
    fn exclusive_and_auto_delete_queues_and_their_bindings_are_not_shared() {
        let mut t = Topology::default();
        let declare = |name: &'static str, exclusive: bool, auto_delete: bool| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: s(name),
                exclusive,
                auto_delete,
                ..Default::default()
            })
        };
        let bind = |name: &'static str| {
            Method::QueueBind(codec::QueueBind {
                queue: s(name),
                exchange: s("x"),
                ..Default::default()
            })
        };
        for (name, exclusive, auto_delete) in [
            ("mine", true, false),
            ("while-consumed", false, true),
            ("kept", false, false),
        ] {
            let d = declare(name, exclusive, auto_delete);
            assert_eq!(t.shareable(&d), name == "kept", "{name}");
            t.record(Class::Sharded, d);
            assert_eq!(
                t.shareable(&bind(name)),
                name == "kept",
                "binding of {name}"
            );
        }
    }

    #[test]
    fn deletes_and_unbinds_remove_what_they_undo() {
        let mut t = Topology::default();
        t.record(
            Class::Sharded,
            Method::ExchangeDeclare(codec::ExchangeDeclare {
                exchange: s("x"),
                ..Default::default()
            }),
        );
        t.record(
            Class::Sharded,
            Method::QueueDeclare(codec::QueueDeclare {
                queue: s("q"),
                nowait: true,
                ..Default::default()
            }),
        );
        let bind = codec::QueueBind {
            queue: s("q"),
            exchange: s("x"),
            routing_key: s("k"),
            ..Default::default()
        };
        t.record(Class::Sharded, Method::QueueBind(bind.clone()));
        t.record(Class::Sharded, Method::QueueBind(bind));
        assert_eq!(t.entries().count(), 3, "a repeated bind is kept once");
        assert!(
            t.entries()
                .all(|(_, m)| !matches!(m, Method::QueueDeclare(q) if q.nowait)),
            "replays wait for replies"
        );
        t.record(
            Class::Sharded,
            Method::QueueUnbind(codec::QueueUnbind {
                queue: s("q"),
                exchange: s("x"),
                routing_key: s("k"),
                ..Default::default()
            }),
        );
        assert_eq!(t.entries().count(), 2);
        t.record(
            Class::Sharded,
            Method::QueueDelete(codec::QueueDelete {
                queue: s("q"),
                ..Default::default()
            }),
        );
        t.record(
            Class::Sharded,
            Method::ExchangeDelete(codec::ExchangeDelete {
                exchange: s("x"),
                ..Default::default()
            }),
        );
        assert_eq!(t.entries().count(), 0);
    }

    #[test]
    fn checks_are_passive_declares_of_the_name() {
        let Method::QueueDeclare(q) = Name::Queue(s("leased")).check() else {
            panic!("a queue is checked with queue.declare");
        };
        assert!(q.passive && !q.nowait && q.queue == s("leased"));
        let Method::ExchangeDeclare(x) = Name::Exchange(s("jobs")).check() else {
            panic!("an exchange is checked with exchange.declare");
        };
        assert!(x.passive && !x.nowait && x.exchange == s("jobs"));
    }
}
