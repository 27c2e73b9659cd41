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

use std::collections::HashSet;

use crate::codec::{Method, ShortStr};
use crate::config::ClusterConfig;
use crate::topology::Name;
use crate::upstream::link::Link;

use super::link_slot::TopologyPlan;

/// Adds to `names` (each once; `seen` holds those already in it) the names among `declares`
/// (methods a replay would send, in order) that the session cannot vouch for. Left out: what is
/// not a declare, exclusive queues (this connection's own, which nothing else deletes), queues
/// `consumed` by the client (a consumer keeps a queue from expiring, and its replay must find
/// the queue declared), and names no client declares (the default and `amq.` exchanges,
/// server-named queues left unnamed).
pub(super) fn add_unvouched<'a>(
    names: &mut Vec<Name>,
    seen: &mut HashSet<Name>,
    declares: impl Iterator<Item = &'a Method>,
    consumed: impl Fn(&ShortStr) -> bool,
) {
    for method in declares {
        match method {
            Method::QueueDeclare(q) if q.exclusive || q.queue.is_empty() || consumed(&q.queue) => {
                continue;
            }
            Method::ExchangeDeclare(x)
                if x.exchange.is_empty() || x.exchange.as_bytes().starts_with(b"amq.") =>
            {
                continue;
            }
            _ => {}
        }
        if let Some(name) = Name::declared_by(method)
            && seen.insert(name.clone())
        {
            names.push(name);
        }
    }
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
    use crate::codec;

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
        let (mut names, mut seen) = (Vec::new(), HashSet::new());
        add_unvouched(&mut names, &mut seen, declares.iter(), |q| {
            q.as_bytes() == b"consumed"
        });
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
}
