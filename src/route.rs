//! Routing: which cluster(s) each client method goes to.
//!
//! Topology (exchanges, queues, bindings) is declared on **every** cluster, and consumers and
//! basic.get read every cluster, so wherever a message is published it is routed as one broker
//! would route it and reaches its queues' consumers. What this module decides is where each
//! *publish* goes: **control** traffic (Celery's remote control, events and rpc replies) to the
//! control cluster, keeping it away from task load; everything else (**sharded**) to one shard
//! cluster chosen by smooth weighted round-robin. The decision depends only on names, never on
//! state shared between connections, so any number of proxies can run side by side.

use std::fmt;

/// The Celery preset: exchanges whose traffic is control traffic.
pub const CELERY_CONTROL_EXCHANGES: [&str; 3] =
    ["celery.pidbox", "reply.celery.pidbox", "celeryev"];
/// The Celery preset: queues that live on the control cluster. `amq.gen-*` are server-named
/// queues, which the proxy always declares on the control cluster.
pub const CELERY_CONTROL_QUEUES: [&str; 4] = [
    "*.celery.pidbox",
    "*.reply.celery.pidbox",
    "celeryev.*",
    "amq.gen-*",
];

/// The prefix of the names warren gives server-named queues (queue.declare with an empty name):
/// one broker's `amq.gen-` names are reserved and cannot be declared on the other clusters.
/// Publishes to them are control traffic (they are reply queues, as in RPC).
pub const SERVER_NAMED_PREFIX: &str = "warren.gen-";

/// Where a name's traffic belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Control,
    Sharded,
}

/// A name pattern: `*` matches any run of characters (including none); everything else is
/// literal.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: impl Into<String>) -> Self {
        Pattern(p.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &[u8]) -> bool {
        glob(self.0.as_bytes(), name)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Iterative glob with backtracking to the last `*`: linear in practice, no recursion on
/// client-controlled input.
fn glob(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pat.len() && pat[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// True for the canonical textual form of a UUID (8-4-4-4-12 hex digits), the names Celery's
/// rpc:// result backend gives its reply queues.
pub fn is_uuid(name: &[u8]) -> bool {
    name.len() == 36
        && name.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The routing rules, from the `[routing]` section of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub control_exchanges: Vec<Pattern>,
    pub control_queues: Vec<Pattern>,
    /// Queues named by a UUID (rpc:// result queues) are control traffic.
    pub uuid_queues_are_control: bool,
    /// `[[routing.rules]]`, in order: where a sharded publish goes and how publishes spread.
    pub rules: Vec<Rule>,
}

/// How the publishes a rule matches are spread over its clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spread {
    /// Each publish to the next cluster by smooth weighted round-robin: the most even load;
    /// order is kept per cluster only.
    #[default]
    Message,
    /// Every publish of one client channel to one cluster while it is up, so each publisher's
    /// order is kept as on one broker; the channel moves on only when that cluster fails or is
    /// drained.
    Channel,
    /// By a hash of the routing key: the same key always to the same cluster (while the group
    /// stays the same), so order is kept per key.
    Key,
}

impl Spread {
    pub fn parse(s: &str) -> Option<Spread> {
        Some(match s {
            "message" => Spread::Message,
            "channel" => Spread::Channel,
            "key" => Spread::Key,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Spread::Message => "message",
            Spread::Channel => "channel",
            Spread::Key => "key",
        }
    }
}

/// One `[[routing.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Matched against the publish's exchange, or its routing key (the queue) for the default
    /// exchange.
    pub patterns: Vec<Pattern>,
    /// The shard clusters the matched publishes go to; `None`: every shard cluster.
    pub clusters: Option<Vec<String>>,
    pub spread: Spread,
}

impl Rule {
    /// Whether the rule lets a publish go to `cluster`.
    pub fn allows(&self, cluster: &str) -> bool {
        self.clusters
            .as_ref()
            .is_none_or(|c| c.iter().any(|n| n == cluster))
    }
}

/// The cluster a routing key goes to under [`Spread::Key`]: weighted rendezvous hashing over
/// the candidates `(index, cluster name, weight)`, so a key keeps its cluster when other
/// clusters join or leave the group, and every warren instance picks the same one.
pub fn by_key<'a>(
    key: &[u8],
    candidates: impl Iterator<Item = (usize, &'a str, u32)>,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, name, weight) in candidates {
        let h = fnv1a(name.as_bytes(), fnv1a(key, FNV_OFFSET));
        // Uniform in (0, 1); the score -w/ln(u) makes each cluster win in proportion to w.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(weight.max(1)) / -u.ln();
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, continued from `state`: stable across processes and releases (unlike std's hasher),
/// so instances side by side agree.
fn fnv1a(bytes: &[u8], mut state: u64) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(0x0100_0000_01b3);
    }
    // Mix the end, so names differing only in a last byte spread well.
    state ^= state >> 29;
    state = state.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    state ^ (state >> 32)
}

impl Default for Rules {
    /// The Celery preset.
    fn default() -> Self {
        Rules {
            control_exchanges: CELERY_CONTROL_EXCHANGES
                .iter()
                .map(|p| Pattern::new(*p))
                .collect(),
            control_queues: CELERY_CONTROL_QUEUES
                .iter()
                .map(|p| Pattern::new(*p))
                .collect(),
            uuid_queues_are_control: true,
            rules: Vec::new(),
        }
    }
}

impl Rules {
    pub fn exchange(&self, name: &[u8]) -> Class {
        if self.control_exchanges.iter().any(|p| p.matches(name)) {
            Class::Control
        } else {
            Class::Sharded
        }
    }

    /// An empty name is a server-named queue: it is created on the control cluster.
    pub fn queue(&self, name: &[u8]) -> Class {
        if name.is_empty()
            || name.starts_with(SERVER_NAMED_PREFIX.as_bytes())
            || (self.uuid_queues_are_control && is_uuid(name))
            || self.control_queues.iter().any(|p| p.matches(name))
        {
            Class::Control
        } else {
            Class::Sharded
        }
    }

    /// Where a topology method (declare, delete, bind, unbind of an exchange or a queue) goes: by
    /// the exchange it names (the destination, for exchange bindings) or by the queue. `None`
    /// for any other method.
    pub fn topology(&self, method: &crate::codec::Method) -> Option<Class> {
        use crate::codec::Method;
        Some(match method {
            Method::ExchangeDeclare(x) => self.exchange(x.exchange.as_bytes()),
            Method::ExchangeDelete(x) => self.exchange(x.exchange.as_bytes()),
            Method::ExchangeBind(x) => self.exchange(x.destination.as_bytes()),
            Method::ExchangeUnbind(x) => self.exchange(x.destination.as_bytes()),
            Method::QueueDeclare(x) => self.queue(x.queue.as_bytes()),
            Method::QueueBind(x) => self.queue(x.queue.as_bytes()),
            Method::QueueUnbind(x) => self.queue(x.queue.as_bytes()),
            Method::QueuePurge(x) => self.queue(x.queue.as_bytes()),
            Method::QueueDelete(x) => self.queue(x.queue.as_bytes()),
            _ => return None,
        })
    }

    /// The first `[[routing.rules]]` entry matching a publish (by its exchange, or its routing
    /// key for the default exchange), as an index into `rules`.
    pub fn rule_for(&self, exchange: &[u8], routing_key: &[u8]) -> Option<usize> {
        let name = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        self.rules
            .iter()
            .position(|r| r.patterns.iter().any(|p| p.matches(name)))
    }

    /// A publish to the default exchange is addressed to the queue its routing key names.
    pub fn publish(&self, exchange: &[u8], routing_key: &[u8]) -> Class {
        if exchange.is_empty() {
            self.queue(routing_key)
        } else {
            self.exchange(exchange)
        }
    }
}

/// Smooth weighted round-robin (the nginx algorithm): over any window the picks are proportional
/// to the weights and spread out rather than bunched, so two equal clusters alternate exactly.
#[derive(Debug, Default, Clone)]
pub struct RoundRobin {
    current: Vec<i64>,
}

impl RoundRobin {
    /// Picks one of the candidates `(index, weight)`; weights must be positive.
    pub fn pick(&mut self, candidates: impl Iterator<Item = (usize, u32)>) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, w) in candidates {
            if self.current.len() <= i {
                self.current.resize(i + 1, 0);
            }
            let w = i64::from(w.max(1));
            self.current[i] += w;
            total += w;
            if best.is_none_or(|(_, c)| self.current[i] > c) {
                best = Some((i, self.current[i]));
            }
        }
        let (i, _) = best?;
        self.current[i] -= total;
        Some(i)
    }
}

/// Round-robin kept per routing key, in a few buckets (a key's bucket is a hash of it).
///
/// One rotation for every publish of a connection puts each message on the next cluster
/// whatever its queue, so a producer that alternates between two queues (a web request that
/// sends task A, then task B) sends every A to one cluster and every B to the other: each queue
/// then lives on one cluster, its consumers get only that cluster's share of their prefetch,
/// and the cluster's loss takes the whole queue. A rotation per key spreads each queue over the
/// clusters whatever the interleaving; keys that share a bucket share a rotation, as all keys
/// did before.
#[derive(Debug, Clone)]
pub struct KeyedRoundRobin {
    /// Boxed: the session that owns it touches one rotation per publish, not all of them.
    rotations: Box<[RoundRobin; KEY_BUCKETS]>,
}

impl Default for KeyedRoundRobin {
    fn default() -> Self {
        KeyedRoundRobin {
            rotations: Box::new(std::array::from_fn(|_| RoundRobin::default())),
        }
    }
}

/// Rotations per connection: enough that the few queues a producer interleaves rarely share
/// one (two keys: 1 chance in 64), few enough to stay small (a rotation is an empty `Vec` until
/// its first pick).
const KEY_BUCKETS: usize = 64;

impl KeyedRoundRobin {
    /// Picks one of the candidates `(index, weight)` in the rotation of `key`.
    pub fn pick(
        &mut self,
        key: &[u8],
        candidates: impl Iterator<Item = (usize, u32)>,
    ) -> Option<usize> {
        self.rotations[key_bucket(key)].pick(candidates)
    }
}

/// The rotation of routing key `key`: FNV-1a, a few instructions per byte, the same in every run
/// and build.
pub fn key_bucket(key: &[u8]) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for &b in key {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize % KEY_BUCKETS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_keys_each_spread_over_every_cluster() {
        let mut rr = KeyedRoundRobin::default();
        let (a, b) = (b"task-a".as_slice(), b"task-b".as_slice());
        assert_ne!(
            key_bucket(a),
            key_bucket(b),
            "the two keys of this test must not share a bucket"
        );
        let mut counts = [[0u32; 2]; 2];
        for _ in 0..100 {
            for (k, key) in [a, b].into_iter().enumerate() {
                let picked = rr.pick(key, [(0, 1), (1, 1)].into_iter()).expect("a pick");
                counts[k][picked] += 1;
            }
        }
        assert_eq!(
            counts,
            [[50, 50], [50, 50]],
            "each key half on each cluster"
        );
    }

    #[test]
    fn a_keys_rotation_follows_the_weights() {
        let mut rr = KeyedRoundRobin::default();
        let mut counts = [0u32; 2];
        for _ in 0..90 {
            let picked = rr
                .pick(b"celery", [(0, 2), (1, 1)].into_iter())
                .expect("a pick");
            counts[picked] += 1;
        }
        assert_eq!(counts, [60, 30]);
    }

    #[test]
    fn celery_preset() {
        let r = Rules::default();
        assert_eq!(r.exchange(b"celery.pidbox"), Class::Control);
        assert_eq!(r.exchange(b"reply.celery.pidbox"), Class::Control);
        assert_eq!(r.exchange(b"celeryev"), Class::Control);
        assert_eq!(r.exchange(b"celery"), Class::Sharded);
        assert_eq!(r.queue(b"w1@host.celery.pidbox"), Class::Control);
        assert_eq!(
            r.queue(b"5f0c3b1e-aaaa-bbbb-cccc-0123456789ab.reply.celery.pidbox"),
            Class::Control
        );
        assert_eq!(
            r.queue(b"celeryev.5f0c3b1e-aaaa-bbbb-cccc-0123456789ab"),
            Class::Control
        );
        assert_eq!(
            r.queue(b"5f0c3b1e-aaaa-bbbb-cccc-0123456789ab"),
            Class::Control
        );
        assert_eq!(r.queue(b""), Class::Control);
        assert_eq!(r.queue(b"amq.gen-JzTY20BRgKO-HjmUJj0wLg"), Class::Control);
        assert_eq!(r.queue(b"celery"), Class::Sharded);
        assert_eq!(r.publish(b"", b"celery"), Class::Sharded);
        assert_eq!(
            r.publish(b"", b"5f0c3b1e-aaaa-bbbb-cccc-0123456789ab"),
            Class::Control
        );
        assert_eq!(r.publish(b"celeryev", b"worker.heartbeat"), Class::Control);
    }

    #[test]
    fn topology_methods_follow_their_exchange_or_queue() {
        use crate::codec::{self, Method, ShortStr};
        let r = Rules::default();
        let q = |name: &'static str| {
            Method::QueueBind(codec::QueueBind {
                queue: ShortStr::from_static(name),
                ..Default::default()
            })
        };
        assert_eq!(r.topology(&q("celery")), Some(Class::Sharded));
        assert_eq!(r.topology(&q("w1@h.celery.pidbox")), Some(Class::Control));
        let e = Method::ExchangeBind(codec::ExchangeBind {
            destination: ShortStr::from_static("celeryev"),
            ..Default::default()
        });
        assert_eq!(r.topology(&e), Some(Class::Control));
        assert_eq!(r.topology(&Method::TxSelect(Default::default())), None);
    }

    #[test]
    fn the_first_matching_rule_applies_by_exchange_or_queue() {
        let rule = |p: &[&str], clusters: Option<&[&str]>, spread| Rule {
            patterns: p.iter().map(|p| Pattern::new(*p)).collect(),
            clusters: clusters.map(|c| c.iter().map(|s| s.to_string()).collect()),
            spread,
        };
        let r = Rules {
            rules: vec![
                rule(&["fast*"], Some(&["shard-a"]), Spread::Channel),
                rule(&["*"], None, Spread::Key),
            ],
            ..Rules::default()
        };
        assert_eq!(r.rule_for(b"fast", b"fast"), Some(0));
        assert_eq!(r.rule_for(b"", b"fast.high"), Some(0));
        assert_eq!(r.rule_for(b"feed", b"fast"), Some(1));
        assert!(r.rules[0].allows("shard-a") && !r.rules[0].allows("shard-b"));
        assert!(r.rules[1].allows("anything"));
        assert_eq!(Rules::default().rule_for(b"x", b"y"), None);
        assert_eq!(Spread::parse("key"), Some(Spread::Key));
        assert_eq!(Spread::parse("keys"), None);
    }

    #[test]
    fn key_spread_is_stable_weighted_and_keeps_keys_when_a_cluster_joins() {
        let two = [(0, "shard-a", 1), (1, "shard-b", 1)];
        let three = [(0, "shard-a", 1), (1, "shard-b", 1), (2, "shard-c", 1)];
        let mut counts = [0; 3];
        let mut moved_elsewhere = 0;
        for k in 0..3000 {
            let key = format!("key-{k}");
            let a = by_key(key.as_bytes(), two.iter().copied()).unwrap();
            assert_eq!(
                Some(a),
                by_key(key.as_bytes(), two.iter().copied()),
                "stable"
            );
            let b = by_key(key.as_bytes(), three.iter().copied()).unwrap();
            counts[b] += 1;
            // A key either stays or moves to the new cluster, never between the old ones.
            if b != a && b != 2 {
                moved_elsewhere += 1;
            }
        }
        assert_eq!(moved_elsewhere, 0);
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        let mut weighted = [0; 2];
        for k in 0..3000 {
            let key = format!("w-{k}");
            weighted[by_key(key.as_bytes(), [(0, "a", 3), (1, "b", 1)].into_iter()).unwrap()] += 1;
        }
        assert!((2000..2500).contains(&weighted[0]), "{weighted:?}");
        assert_eq!(by_key(b"k", std::iter::empty()), None);
    }

    #[test]
    fn glob_patterns() {
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"aXXbYYc"));
        assert!(!glob(b"a*b*c", b"aXXbYY"));
        assert!(glob(b"*.celery.pidbox", b".celery.pidbox"));
        assert!(!glob(b"celeryev.*", b"celeryev"));
        assert!(glob(b"exact", b"exact"));
        assert!(!glob(b"exact", b"exactly"));
    }

    #[test]
    fn round_robin_is_proportional_and_smooth() {
        let mut rr = RoundRobin::default();
        let picks: Vec<_> = (0..6)
            .map(|_| rr.pick([(0, 1), (1, 1)].into_iter()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 1, 0, 1]);
        let mut rr = RoundRobin::default();
        let mut counts = [0; 2];
        for _ in 0..300 {
            counts[rr.pick([(0, 2), (1, 1)].into_iter()).unwrap()] += 1;
        }
        assert_eq!(counts, [200, 100]);
        assert_eq!(rr.pick(std::iter::empty()), None);
    }
}
