//! A link that joins a connection, held back until the other clusters say which of the names
//! its replay would declare still exist.
//!
//! A cluster new to a connection (added by a reload, or one that missed the vhost's topology)
//! gets the topology by declares, and a cluster back from an outage gets the declares it missed.
//! Those declares come from what clients declared through warren, not from what the clusters
//! hold now: a queue may have expired (`x-expires`) or been deleted where warren did not see it
//! (the management UI, a client talking to RabbitMQ directly), an auto-delete exchange may have
//! lost its last binding. Declared again on the joining cluster alone, such a queue would take
//! that cluster's share of messages one broker would have dropped or returned as unroutable,
//! and keep them until its lease ran out there.
//!
//! So before the link joins, each such name is asked of the serving clusters (a passive
//! declare each, on a channel of warren's own; see `vanished.rs`). A name no cluster has any
//! more is forgotten, as on one broker, whose client learns of it when it next uses it; one any
//! cluster still has, or that could not be asked, is declared as before. Until every answer is
//! in, nothing is sent on the link: nothing the client does meanwhile can overtake the replay.
//!
//! This file keeps the bookkeeping and the choice of names; the session sends the checks and
//! replays the link once they are answered.

use crate::codec::{self, Method, ShortStr};
use crate::config::ClusterConfig;
use crate::upstream::link::Link;

use super::link_slot::TopologyPlan;

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Queue(q) => write!(f, "queue '{q}'"),
            Name::Exchange(x) => write!(f, "exchange '{x}'"),
        }
    }
}

/// A queue or an exchange, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Name {
    Queue(ShortStr),
    Exchange(ShortStr),
}

impl Name {
    /// The name a declare creates.
    pub(super) fn declared_by(method: &Method) -> Option<Name> {
        match method {
            Method::QueueDeclare(q) if !q.passive => Some(Name::Queue(q.queue.clone())),
            Method::ExchangeDeclare(x) if !x.passive => Some(Name::Exchange(x.exchange.clone())),
            _ => None,
        }
    }

    /// The name a check (a passive declare) asks about.
    pub(super) fn checked_by(method: &Method) -> Option<Name> {
        match method {
            Method::QueueDeclare(q) => Some(Name::Queue(q.queue.clone())),
            Method::ExchangeDeclare(x) => Some(Name::Exchange(x.exchange.clone())),
            _ => None,
        }
    }

    /// The deletion that forgets the name in a topology record.
    pub(super) fn deletion(&self) -> Method {
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
    pub(super) fn named_by(&self, method: &Method) -> bool {
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
    pub(super) fn check(&self) -> Method {
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

/// The names among `declares` (the declares a replay would send, in order) that the session
/// cannot vouch for, each once. Left out: exclusive queues (this connection's own, which
/// nothing else deletes), queues `consumed` by the client (a consumer keeps a queue from
/// expiring, and its replay must find the queue declared), and names no client declares (the
/// default and `amq.` exchanges, server-named queues left unnamed).
pub(super) fn unvouched<'a>(
    declares: impl Iterator<Item = &'a Method>,
    consumed: impl Fn(&ShortStr) -> bool,
) -> Vec<Name> {
    let mut names: Vec<Name> = Vec::new();
    for method in declares {
        let name = match method {
            Method::QueueDeclare(q) if q.exclusive || q.queue.is_empty() || consumed(&q.queue) => {
                continue;
            }
            Method::ExchangeDeclare(x)
                if x.exchange.is_empty() || x.exchange.as_bytes().starts_with(b"amq.") =>
            {
                continue;
            }
            m => match Name::declared_by(m) {
                Some(name) => name,
                None => continue,
            },
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// A link opened to a cluster, waiting for the other clusters' answers before it joins.
pub(super) struct Joining {
    pub(super) id: u64,
    pub(super) link: Link,
    pub(super) cluster: ClusterConfig,
    pub(super) plan: TopologyPlan,
    /// Checks not yet answered.
    pub(super) waiting: usize,
    /// Names gone from every cluster: their changes are left out of the replay.
    pub(super) gone: Vec<Name>,
}

impl Joining {
    /// A check was answered; `gone` when no cluster has the name. Returns true when that was
    /// the last answer and the link can join.
    pub(super) fn answered(&mut self, name: Option<Name>) -> bool {
        if let Some(name) = name
            && !self.gone.contains(&name)
        {
            self.gone.push(name);
        }
        self.waiting = self.waiting.saturating_sub(1);
        self.waiting == 0
    }

    /// The client declared `method` while the link waited: a name declared again is no longer
    /// gone, and its changes reach the cluster.
    pub(super) fn declared(&mut self, method: &Method) {
        if let Some(name) = Name::declared_by(method) {
            self.gone.retain(|g| *g != name);
        }
    }

    /// Whether the replay leaves `method` out: it names something gone from every cluster.
    pub(super) fn leaves_out(gone: &[Name], method: &Method) -> bool {
        gone.iter().any(|g| g.named_by(method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &'static str) -> ShortStr {
        ShortStr::from_static(x)
    }

    fn queue(name: &'static str, exclusive: bool) -> Method {
        Method::QueueDeclare(codec::QueueDeclare {
            queue: s(name),
            exclusive,
            ..Default::default()
        })
    }

    fn exchange(name: &'static str) -> Method {
        Method::ExchangeDeclare(codec::ExchangeDeclare {
            exchange: s(name),
            ..Default::default()
        })
    }

    fn bind(queue: &'static str, exchange: &'static str) -> Method {
        Method::QueueBind(codec::QueueBind {
            queue: s(queue),
            exchange: s(exchange),
            ..Default::default()
        })
    }

    #[test]
    fn names_that_can_vanish_unseen_are_asked_about_once_each() {
        let declares = [
            queue("leased", false),
            queue("mine", true),
            queue("consumed", false),
            queue("", false),
            exchange("jobs"),
            exchange("amq.topic"),
            bind("leased", "jobs"),
            queue("leased", false),
        ];
        let names = unvouched(declares.iter(), |q| q.as_bytes() == b"consumed");
        assert_eq!(
            names,
            [Name::Queue(s("leased")), Name::Exchange(s("jobs"))],
            "not exclusive, consumed or unnamed queues, nor amq. exchanges, each once"
        );
    }

    #[test]
    fn a_gone_name_leaves_out_every_change_that_names_it() {
        let gone = [Name::Queue(s("leased")), Name::Exchange(s("jobs"))];
        let left_out = |m: &Method| Joining::leaves_out(&gone, m);
        assert!(left_out(&queue("leased", false)));
        assert!(left_out(&bind("leased", "other")));
        assert!(
            left_out(&bind("kept", "jobs")),
            "a binding to a gone exchange"
        );
        assert!(left_out(&Method::ExchangeBind(codec::ExchangeBind {
            destination: s("x"),
            source: s("jobs"),
            ..Default::default()
        })));
        assert!(left_out(&Method::QueueDelete(codec::QueueDelete {
            queue: s("leased"),
            ..Default::default()
        })));
        assert!(!left_out(&queue("kept", false)));
        assert!(!left_out(&bind("kept", "other")));
        assert!(
            !left_out(&exchange("leased")),
            "a queue's name is not an exchange's"
        );
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
