//! Randomised model test of the per-channel maps of `warren::client::channel`, against a small
//! reference model that is correct by inspection. No broker needed.
//!
//! **Delivery tags** (`DeliveryTags`). The model keeps every delivery the client was given, in
//! client-tag order, with its link, its upstream tag and its state (no-ack, outstanding, on a dead
//! link, settled, forgotten), and the broker side of each link: its own delivery-tag counter and
//! a RabbitMQ-like unacked set, where an ack for a tag that is not unacked is a 406 and a
//! `multiple` ack up to U acks every unacked tag <= U. Deliveries come from 1-4 links, with or
//! without ack; the client acks, nacks and rejects tags that are outstanding, on a dead link,
//! already settled, no-ack, forgotten, never issued, or 0, with and without `multiple`; a link
//! dies (its channel is gone, the broker requeued its unacked deliveries, and the link that
//! replaces it takes its slot as the next generation and numbers from 1 again), with or without
//! the session marking its deliveries dead (`kill_link`): the test plays the session's part and
//! sends an upstream ack only to the link of the same generation, so without the mark the
//! generation alone must keep every ack for the dead link's deliveries off the new link;
//! `forget_all` is a basic.recover (the brokers
//! requeue, their numbering goes on). Checked after each step: `resolve` fails exactly when
//! RabbitMQ would (the named tag is not outstanding), and then sends nothing; otherwise it sends
//! at most one ack per live link, and the upstream deliveries those acks settle on the modelled
//! brokers are exactly the live deliveries the client's ack covers (none twice, none the client
//! did not ack, no 406 upstream); `count` is right; `outstanding()` and `count_link()` match.
//! Like the maps, the model takes deliveries in arrival order: on each link, upstream tags grow
//! with client tags (the precondition of `DeliveryTags`; the session must keep it).
//!
//! **Confirms** (`ClientConfirms`, `UpstreamConfirms`). One client channel publishes over 1-4
//! links (before or after its confirm.select); each link's broker confirms its unconfirmed
//! publishes in any order, with acks and nacks, `multiple` or not; a link dies (`drain`, and its
//! publishes are published again on a live link with the same client sequence number) and comes
//! back with a new upstream channel. The test plays the session's part the way
//! `session/from_cluster.rs` (`confirm`) and `session/publish.rs` (`republish`) do: a broker ack
//! settles the client sequence numbers (sorted) through `ClientConfirms::settle` as client acks;
//! a broker nack is final: the client hears a nack (`nack_lost`), nothing is published again; the publishes of a dead link go to any live link,
//! and when none is left the client hears a nack. The session's other ways (parking a publish
//! until its only shard cluster is back, pinned replies, transactions, the control cluster) are
//! policy above the maps and left out. Checked after each step: each `resolve` and `drain` hands
//! back exactly the model's publishes (same upstream and client numbers, same `Held`, oldest
//! first); the confirms the client hears, read as a client reads them (`multiple` = every
//! unconfirmed number up to this one), settle exactly the numbers the model settled at that step,
//! with the right ack or nack, each once; `outstanding()` and `pending()` match. At the end every
//! live broker confirms the rest, and every client sequence number must have been heard once.
//!
//! A failure shows proptest's shrunk input and, in the message, the steps before it that changed
//! something, with the tags and sequence numbers they resolved to.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use warren::client::channel::{
    ClientConfirm, ClientConfirms, DeliveryTags, Held, InFlight, LinkRef, UnknownTag, UpstreamAck,
    UpstreamConfirms,
};
use warren::held::HeldLedger;
use warren::io::Content;

/// Cases per property (two properties: 20,000 cases, each up to `MAX_OPS` operations).
const CASES: u32 = 10_000;
const MAX_OPS: usize = 64;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Shrinking a 64-step sequence to a readable one needs more than the default 1,024
        // steps on a bad day.
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// Delivery tags
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ack,
    Nack,
    Reject,
}

/// The tag a client names, taken from the model when the step runs: the `i`-th (modulo their
/// number) delivery in that state. When there is none in that state, the next tag not yet
/// issued is named instead.
#[derive(Debug, Clone, Copy)]
enum Tag {
    Outstanding(usize),
    /// A delivery whose link died: still outstanding for the client.
    Dead(usize),
    Settled(usize),
    NoAck(usize),
    /// Outstanding before a `forget_all`.
    Forgotten(usize),
    /// The last issued tag + 1 + k.
    NeverIssued(u64),
    Max,
    Zero,
}

#[derive(Debug, Clone, Copy)]
enum TagOp {
    /// A basic.deliver or get-ok from `link`; `needs_ack` false for a no-ack consumer or get.
    Deliver { link: usize, needs_ack: bool },
    /// basic.ack / basic.nack / basic.reject from the client (a reject is never `multiple`).
    Client {
        kind: Kind,
        tag: Tag,
        multiple: bool,
    },
    /// The link dies (failover) and a new link takes its slot, as the next generation. With
    /// `marked`, the session marks the dead link's deliveries (`kill_link`); without, only the
    /// generation keeps the client's acks for them from the new link.
    KillLink { link: usize, marked: bool },
    /// basic.recover, or the channel reset.
    ForgetAll,
}

fn tag_pick() -> impl Strategy<Value = Tag> {
    prop_oneof![
        16 => (0..8usize).prop_map(Tag::Outstanding),
        3 => (0..8usize).prop_map(Tag::Dead),
        2 => (0..8usize).prop_map(Tag::Settled),
        1 => (0..8usize).prop_map(Tag::NoAck),
        1 => (0..8usize).prop_map(Tag::Forgotten),
        1 => (0..3u64).prop_map(Tag::NeverIssued),
        1 => Just(Tag::Max),
        1 => Just(Tag::Zero),
    ]
}

fn tag_op(links: usize) -> impl Strategy<Value = TagOp> {
    let kind = prop_oneof![Just(Kind::Ack), Just(Kind::Nack), Just(Kind::Reject)];
    prop_oneof![
        16 => (0..links, prop::bool::weighted(0.8))
            .prop_map(|(link, needs_ack)| TagOp::Deliver { link, needs_ack }),
        8 => (kind, tag_pick(), any::<bool>()).prop_map(|(kind, tag, multiple)| TagOp::Client {
            kind,
            tag,
            multiple: multiple && kind != Kind::Reject,
        }),
        1 => (0..links, prop::bool::weighted(0.7))
            .prop_map(|(link, marked)| TagOp::KillLink { link, marked }),
        1 => Just(TagOp::ForgetAll),
    ]
}

fn tag_case() -> impl Strategy<Value = (usize, Vec<TagOp>)> {
    (1..=4usize).prop_flat_map(|links| {
        (
            Just(links),
            prop::collection::vec(tag_op(links), 0..MAX_OPS),
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum D {
    NoAck,
    Outstanding,
    Dead,
    Settled,
    Forgotten,
}

/// One delivery given to the client; its client tag is its index + 1.
#[derive(Debug)]
struct Delivery {
    link: usize,
    upstream: u64,
    state: D,
}

/// One link's upstream channel as RabbitMQ keeps it.
#[derive(Debug, Default)]
struct Broker {
    last_tag: u64,
    unacked: BTreeSet<u64>,
}

impl Broker {
    /// basic.ack / nack / reject from the proxy: the upstream tags it settles.
    fn ack(&mut self, tag: u64, multiple: bool) -> Result<Vec<u64>, String> {
        if !self.unacked.contains(&tag) {
            return Err(format!(
                "406 PRECONDITION_FAILED - unknown delivery tag {tag}"
            ));
        }
        let acked: Vec<u64> = if multiple {
            self.unacked.range(..=tag).copied().collect()
        } else {
            vec![tag]
        };
        for t in &acked {
            self.unacked.remove(t);
        }
        Ok(acked)
    }
}

struct TagModel {
    deliveries: Vec<Delivery>,
    brokers: Vec<Broker>,
}

impl TagModel {
    fn tag(&self, pick: Tag) -> u64 {
        let next = self.deliveries.len() as u64 + 1;
        let nth = |want: D, i: usize| {
            let tags: Vec<u64> = (1..)
                .zip(&self.deliveries)
                .filter(|(_, d)| d.state == want)
                .map(|(t, _)| t)
                .collect();
            if tags.is_empty() {
                next
            } else {
                tags[i % tags.len()]
            }
        };
        match pick {
            Tag::Outstanding(i) => nth(D::Outstanding, i),
            Tag::Dead(i) => nth(D::Dead, i),
            Tag::Settled(i) => nth(D::Settled, i),
            Tag::NoAck(i) => nth(D::NoAck, i),
            Tag::Forgotten(i) => nth(D::Forgotten, i),
            Tag::NeverIssued(k) => next + k,
            Tag::Max => u64::MAX,
            Tag::Zero => 0,
        }
    }

    /// The deliveries (indexes) a client ack covers, or None where RabbitMQ answers 406: the
    /// named tag is not outstanding (tag 0 with `multiple` names every outstanding one).
    fn covers(&self, tag: u64, multiple: bool) -> Option<Vec<usize>> {
        let open = |d: &Delivery| matches!(d.state, D::Outstanding | D::Dead);
        let upto = if multiple && tag == 0 {
            self.deliveries.len()
        } else {
            let i = usize::try_from(tag.checked_sub(1)?).ok()?;
            if !open(self.deliveries.get(i)?) {
                return None;
            }
            if !multiple {
                return Some(vec![i]);
            }
            i + 1
        };
        Some((0..upto).filter(|&i| open(&self.deliveries[i])).collect())
    }

    fn count(&self, f: impl Fn(&Delivery) -> bool) -> usize {
        self.deliveries.iter().filter(|d| f(d)).count()
    }
}

/// The proxy's map and the model, stepped together.
struct TagRun {
    links: usize,
    /// The generation of the link in each slot (one more each time a link dies).
    gens: Vec<u32>,
    tags: DeliveryTags,
    m: TagModel,
    out: Vec<UpstreamAck>,
}

impl TagRun {
    fn new(links: usize) -> Self {
        TagRun {
            links,
            gens: vec![0; links],
            tags: DeliveryTags::default(),
            m: TagModel {
                deliveries: Vec::new(),
                brokers: (0..links).map(|_| Broker::default()).collect(),
            },
            out: Vec::new(),
        }
    }

    /// Runs one step; returns what it did, or None when it changed nothing.
    fn step(&mut self, step: usize, op: TagOp) -> Result<Option<String>, TestCaseError> {
        let TagRun {
            links,
            gens,
            tags,
            m,
            out,
        } = self;
        let links = *links;
        // The session's view of a link a map hands back: the slot of a live link, or None for
        // a dead one (marked, or of an older generation than the slot's link).
        let live = |gens: &[u32], l: LinkRef| l.slot().filter(|&i| gens[i] == l.generation());
        match op {
            TagOp::Deliver { link, needs_ack } => {
                let b = &mut m.brokers[link];
                b.last_tag += 1;
                let upstream = b.last_tag;
                if needs_ack {
                    b.unacked.insert(upstream);
                }
                m.deliveries.push(Delivery {
                    link,
                    upstream,
                    state: if needs_ack { D::Outstanding } else { D::NoAck },
                });
                let tag = tags.issue(LinkRef::new(link, gens[link]), upstream, needs_ack);
                prop_assert_eq!(
                    tag,
                    m.deliveries.len() as u64,
                    "step {}: client tags are 1, 2, 3, ... in arrival order",
                    step
                );
                let no_ack = if needs_ack { "" } else { " (no-ack)" };
                Ok(Some(format!(
                    "link {link} delivers upstream tag {upstream}{no_ack} -> client tag {tag}"
                )))
            }
            TagOp::Client {
                kind,
                tag: pick,
                multiple,
            } => {
                let tag = m.tag(pick);
                let got = tags.resolve(tag, multiple, out);
                let what = format!(
                    "client {kind:?} tag {tag}{}",
                    if multiple { " multiple" } else { "" }
                );
                let Some(covered) = m.covers(tag, multiple) else {
                    prop_assert_eq!(
                        got,
                        Err(UnknownTag(tag)),
                        "step {}: {}: not outstanding, so 406",
                        step,
                        what
                    );
                    prop_assert!(
                        out.is_empty(),
                        "step {step}: {what}: nothing goes upstream: {out:?}"
                    );
                    return Ok(Some(format!("{what} -> 406")));
                };
                prop_assert_eq!(got, Ok(()), "step {}: {}: outstanding", step, what);
                // What the client's ack means upstream: the live deliveries it covers.
                let want: BTreeSet<(usize, u64)> = covered
                    .iter()
                    .map(|&i| &m.deliveries[i])
                    .filter(|d| d.state == D::Outstanding)
                    .map(|d| (d.link, d.upstream))
                    .collect();
                let mut acked = BTreeSet::new();
                let mut seen = BTreeSet::new();
                for a in out.iter() {
                    prop_assert!(
                        a.link != LinkRef::DEAD && a.link.slot().is_some_and(|i| i < links),
                        "step {step}: {what}: {a:?} names no link"
                    );
                    prop_assert!(
                        seen.insert((a.link.slot(), a.link.generation())),
                        "step {step}: {what}: two upstream acks for {:?}: {out:?}",
                        a.link
                    );
                    // The session sends an ack only to the link of the same generation.
                    let Some(link) = live(gens, a.link) else {
                        continue;
                    };
                    let settled = m.brokers[link]
                        .ack(a.upstream_tag, a.multiple)
                        .map_err(|e| {
                            TestCaseError::fail(format!(
                                "step {step}: {what}: {a:?} (of {out:?}): the broker answers {e}"
                            ))
                        })?;
                    prop_assert_eq!(
                        a.count as usize,
                        settled.len(),
                        "step {}: {}: {:?} settles upstream tags {:?}",
                        step,
                        what,
                        a,
                        settled
                    );
                    acked.extend(settled.into_iter().map(|u| (link, u)));
                }
                prop_assert_eq!(
                    &acked,
                    &want,
                    "step {}: {}: (link, upstream tag) settled upstream by {:?} vs the live ones \
                     the client's ack covers",
                    step,
                    what,
                    out
                );
                for i in covered {
                    m.deliveries[i].state = D::Settled;
                }
                Ok(Some(format!("{what} -> upstream {out:?}")))
            }
            TagOp::KillLink { link, marked } => {
                let mut n = 0;
                for d in &mut m.deliveries {
                    if d.link == link && d.state == D::Outstanding {
                        d.state = D::Dead;
                        n += 1;
                    }
                }
                let used = m.brokers[link].last_tag > 0;
                // The channel is gone, the broker requeued its unacked deliveries; the link that
                // replaces it opens a new channel, numbered from 1.
                m.brokers[link] = Broker::default();
                let gone = LinkRef::new(link, gens[link]);
                gens[link] += 1;
                if marked {
                    prop_assert_eq!(
                        tags.kill_link(gone),
                        n,
                        "step {}: link {} dies: kill_link",
                        step,
                        link
                    );
                }
                Ok(used.then(|| {
                    format!(
                        "link {link} dies ({n} deliveries dead), its new channel numbers from 1"
                    )
                }))
            }
            TagOp::ForgetAll => {
                let mut want = Vec::new();
                for d in &mut m.deliveries {
                    match d.state {
                        D::Outstanding => want.push(Some(d.link)),
                        D::Dead => want.push(None),
                        _ => continue,
                    }
                    d.state = D::Forgotten;
                }
                // basic.recover: the brokers requeue; each channel's numbering goes on.
                for b in &mut m.brokers {
                    b.unacked.clear();
                }
                let mut got = Vec::new();
                tags.forget_all(|l| got.push(live(gens, l)));
                want.sort_unstable();
                got.sort_unstable();
                let n = want.len();
                prop_assert_eq!(got, want, "step {}: forget_all's links", step);
                Ok((n > 0).then(|| format!("forget_all ({n} forgotten)")))
            }
        }
    }

    /// What must hold after every step.
    fn check(&self, step: usize) -> Result<(), TestCaseError> {
        let (tags, m) = (&self.tags, &self.m);
        prop_assert_eq!(
            tags.outstanding(),
            m.count(|d| matches!(d.state, D::Outstanding | D::Dead)),
            "step {}: outstanding()",
            step
        );
        for link in 0..self.links {
            prop_assert_eq!(
                tags.count_link(LinkRef::new(link, self.gens[link])),
                m.count(|d| d.link == link && d.state == D::Outstanding),
                "step {}: count_link({})",
                step,
                link
            );
            // Nothing is left unacked upstream that the client can no longer ack.
            let live: BTreeSet<u64> = m
                .deliveries
                .iter()
                .filter(|d| d.link == link && d.state == D::Outstanding)
                .map(|d| d.upstream)
                .collect();
            prop_assert_eq!(
                &m.brokers[link].unacked,
                &live,
                "step {}: link {}: unacked on the broker vs outstanding for the client",
                step,
                link
            );
        }
        Ok(())
    }
}

/// Adds the steps that did something before a failure to its message: the shrunk input keeps
/// some steps that change nothing (a kill of an unused link, an ack on an idle one).
fn traced(e: TestCaseError, trace: &[String]) -> TestCaseError {
    match e {
        TestCaseError::Fail(why) => TestCaseError::fail(format!(
            "{}\nafter these steps (the ones that changed nothing left out):\n{}",
            why.message(),
            trace.join("\n")
        )),
        e => e,
    }
}

fn run_tags(links: usize, ops: &[TagOp]) -> Result<(), TestCaseError> {
    let mut run = TagRun::new(links);
    let mut trace = Vec::new();
    for (step, &op) in ops.iter().enumerate() {
        match run.step(step, op) {
            Ok(done) => trace.extend(done.map(|what| format!("  {step}: {what}"))),
            Err(e) => return Err(traced(e, &trace)),
        }
        run.check(step).map_err(|e| traced(e, &trace))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn delivery_tags_match_the_model((links, ops) in tag_case()) {
        run_tags(links, &ops)?;
    }
}

// ------------------------------------------------------------------------------------------------
// Confirms
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum ConfOp {
    /// confirm.select on the client channel: publishes from now on have client numbers.
    Select,
    /// A client publish, sent on the `link`-th (modulo their number) live link.
    Publish { link: usize },
    /// `link`'s broker acks the `nth` (modulo their number) of its unconfirmed publishes (with
    /// `multiple`, every older one too).
    Ack {
        link: usize,
        nth: usize,
        multiple: bool,
    },
    /// The same as a nack: final, the client hears it.
    Nack {
        link: usize,
        nth: usize,
        multiple: bool,
    },
    /// The link dies; its unconfirmed publishes go to the `to`-th live link (and following).
    KillLink { link: usize, to: usize },
    /// A dead link is back, with a new upstream channel.
    Revive(usize),
}

fn conf_op(links: usize) -> impl Strategy<Value = ConfOp> {
    prop_oneof![
        12 => (0..links).prop_map(|link| ConfOp::Publish { link }),
        6 => (0..links, 0..4usize, any::<bool>())
            .prop_map(|(link, nth, multiple)| ConfOp::Ack { link, nth, multiple }),
        3 => (0..links, 0..4usize, any::<bool>())
            .prop_map(|(link, nth, multiple)| ConfOp::Nack { link, nth, multiple }),
        1 => (0..links, 0..4usize).prop_map(|(link, to)| ConfOp::KillLink { link, to }),
        1 => (0..links).prop_map(ConfOp::Revive),
        1 => Just(ConfOp::Select),
    ]
}

fn conf_case() -> impl Strategy<Value = (usize, Vec<ConfOp>)> {
    (1..=4usize).prop_flat_map(|links| {
        // Most channels select confirms before they publish.
        let ops = (
            prop::bool::weighted(0.8),
            prop::collection::vec(conf_op(links), 0..MAX_OPS),
        )
            .prop_map(|(select, ops)| {
                let first = select.then_some(ConfOp::Select);
                first.into_iter().chain(ops).collect::<Vec<_>>()
            });
        (Just(links), ops)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    InFlight,
    Acked,
    Nacked,
    /// Refused or lost everywhere without a client number: nobody to tell.
    Dropped,
}

#[derive(Debug)]
struct Pub {
    client: Option<u64>,
    fate: Fate,
}

/// One link's upstream channel in confirm mode, as the broker numbers it.
#[derive(Debug, Default)]
struct UpChannel {
    alive: bool,
    last_seq: u64,
    /// upstream seq -> publish id
    unconfirmed: BTreeMap<u64, usize>,
}

struct ConfModel {
    pubs: Vec<Pub>,
    links: Vec<UpChannel>,
    selected: bool,
    last_client: u64,
}

impl ConfModel {
    fn live(&self) -> Vec<usize> {
        (0..self.links.len())
            .filter(|&l| self.links[l].alive)
            .collect()
    }

    fn send(&mut self, pid: usize, link: usize) {
        let up = &mut self.links[link];
        up.last_seq += 1;
        up.unconfirmed.insert(up.last_seq, pid);
        self.pubs[pid].fate = Fate::InFlight;
    }

    /// No link takes the publish again: the client hears a nack.
    fn give_up(&mut self, pid: usize, expect: &mut Vec<(u64, bool)>) {
        let p = &mut self.pubs[pid];
        match p.client {
            Some(seq) => {
                p.fate = Fate::Nacked;
                expect.push((seq, false));
            }
            None => p.fate = Fate::Dropped,
        }
    }
}

/// The proxy side: the maps under test, driven as the session drives them.
struct Proxy {
    client: ClientConfirms,
    up: Vec<UpstreamConfirms>,
    out: Vec<ClientConfirm>,
    /// Counts the bytes of the publishes the maps hold, as the session's does.
    held: std::sync::Arc<HeldLedger>,
}

impl Proxy {
    /// Sends these confirms (`ack` or nack) to the client, and has the client read them.
    fn settle(
        &mut self,
        seqs: &[u64],
        ack: bool,
        client: &mut ClientView,
        heard: &mut Vec<(u64, bool)>,
    ) -> Result<(), TestCaseError> {
        self.client.settle(seqs, &mut self.out);
        for &c in &self.out {
            client.hear(c, ack, heard).map_err(|e| {
                TestCaseError::fail(format!(
                    "settle({seqs:?}) gives {:?}: {e} (the client's unconfirmed: {:?})",
                    self.out, client.unconfirmed
                ))
            })?;
        }
        Ok(())
    }
}

/// What the client knows: the sequence numbers it has not heard about yet.
#[derive(Default)]
struct ClientView {
    unconfirmed: BTreeSet<u64>,
}

impl ClientView {
    fn hear(
        &mut self,
        c: ClientConfirm,
        ack: bool,
        heard: &mut Vec<(u64, bool)>,
    ) -> Result<(), String> {
        if !self.unconfirmed.contains(&c.seq) {
            return Err(format!("{c:?}: {} is not unconfirmed", c.seq));
        }
        let covered: Vec<u64> = if c.multiple {
            self.unconfirmed.range(..=c.seq).copied().collect()
        } else {
            vec![c.seq]
        };
        for s in covered {
            self.unconfirmed.remove(&s);
            heard.push((s, ack));
        }
        Ok(())
    }
}

/// A held publish, numbered `pid` (in `body_size`, which the maps never read).
fn held(pid: usize) -> Held {
    Held {
        publish: Default::default(),
        content: Content {
            header: bytes::Bytes::new(),
            body_size: pid as u64,
            body: Default::default(),
        },
        pinned: false,
    }
}

/// Checks what a map handed back against the model's (upstream seq, publish id) list.
fn same_publishes(
    step: usize,
    what: &str,
    got: &[InFlight],
    want: &[(u64, usize)],
    m: &ConfModel,
) -> Result<(), TestCaseError> {
    let got: Vec<(u64, usize, Option<u64>)> = got
        .iter()
        .map(|p| (p.seq, p.held.content.body_size as usize, p.client))
        .collect();
    let want: Vec<(u64, usize, Option<u64>)> = want
        .iter()
        .map(|&(seq, pid)| (seq, pid, m.pubs[pid].client))
        .collect();
    prop_assert_eq!(
        got,
        want,
        "step {}: {} hands back (upstream seq, publish, client seq)",
        step,
        what
    );
    Ok(())
}

struct ConfRun {
    m: ConfModel,
    p: Proxy,
    client: ClientView,
}

impl ConfRun {
    fn new(links: usize) -> Self {
        ConfRun {
            m: ConfModel {
                pubs: Vec::new(),
                links: (0..links)
                    .map(|_| UpChannel {
                        alive: true,
                        ..UpChannel::default()
                    })
                    .collect(),
                selected: false,
                last_client: 0,
            },
            p: Proxy {
                client: ClientConfirms::default(),
                up: (0..links).map(|_| UpstreamConfirms::default()).collect(),
                out: Vec::new(),
                held: HeldLedger::standalone(),
            },
            client: ClientView::default(),
        }
    }

    /// Runs one step; returns what it did, or None when it changed nothing.
    fn step(&mut self, step: usize, op: ConfOp) -> Result<Option<String>, TestCaseError> {
        let (m, p) = (&mut self.m, &mut self.p);
        let mut expect = Vec::new();
        let mut heard = Vec::new();
        let what = match op {
            ConfOp::Select => {
                if m.selected {
                    return Ok(None);
                }
                m.selected = true;
                "confirm.select".to_string()
            }
            ConfOp::Publish { link } => {
                let live = m.live();
                if live.is_empty() {
                    return Ok(None);
                }
                let link = live[link % live.len()];
                let client = m.selected.then(|| {
                    m.last_client += 1;
                    m.last_client
                });
                let seq = client.map(|_| p.client.next_seq());
                prop_assert_eq!(seq, client, "step {}: next_seq", step);
                if let Some(seq) = client {
                    self.client.unconfirmed.insert(seq);
                }
                let pid = m.pubs.len();
                m.pubs.push(Pub {
                    client,
                    fate: Fate::InFlight,
                });
                m.send(pid, link);
                p.up[link].record(client, held(pid), &p.held);
                format!(
                    "publish #{pid} (client seq {client:?}) on link {link} (upstream seq {})",
                    m.links[link].last_seq
                )
            }
            ConfOp::Ack {
                link,
                nth,
                multiple,
            }
            | ConfOp::Nack {
                link,
                nth,
                multiple,
            } => {
                let ack = matches!(op, ConfOp::Ack { .. });
                let up = &mut m.links[link];
                if !up.alive || up.unconfirmed.is_empty() {
                    return Ok(None);
                }
                let seq = *up
                    .unconfirmed
                    .keys()
                    .nth(nth % up.unconfirmed.len())
                    .unwrap();
                let settled: Vec<(u64, usize)> = if multiple {
                    up.unconfirmed
                        .range(..=seq)
                        .map(|(&s, &i)| (s, i))
                        .collect()
                } else {
                    vec![(seq, up.unconfirmed[&seq])]
                };
                for (s, _) in &settled {
                    up.unconfirmed.remove(s);
                }
                let mut inflight = Vec::new();
                p.up[link].resolve(seq, multiple, &mut inflight);
                let mut what = format!(
                    "link {link}'s broker {} {seq}{}: publishes",
                    if ack { "acks" } else { "nacks" },
                    if multiple { " multiple" } else { "" },
                );
                for (_, pid) in &settled {
                    what += &format!(" #{pid}");
                }
                same_publishes(step, &format!("{what}: resolve"), &inflight, &settled, m)?;
                if ack {
                    for &(_, pid) in &settled {
                        m.pubs[pid].fate = Fate::Acked;
                        expect.extend(m.pubs[pid].client.map(|s| (s, true)));
                    }
                    // As the session does: the client numbers, sorted.
                    let mut seqs: Vec<u64> = inflight.iter().filter_map(|f| f.client).collect();
                    seqs.sort_unstable();
                    p.settle(&seqs, true, &mut self.client, &mut heard)?;
                } else {
                    // The model: refused, the client hears it.
                    for &(_, pid) in &settled {
                        m.give_up(pid, &mut expect);
                    }
                    // The proxy: as the session does, the client numbers sorted, nacked.
                    let mut seqs: Vec<u64> = inflight.iter().filter_map(|f| f.client).collect();
                    seqs.sort_unstable();
                    if !seqs.is_empty() {
                        p.settle(&seqs, false, &mut self.client, &mut heard)?;
                    }
                }
                what
            }
            ConfOp::KillLink { link, to } => {
                if !m.links[link].alive {
                    return Ok(None);
                }
                m.links[link].alive = false;
                let lost: Vec<(u64, usize)> = std::mem::take(&mut m.links[link].unconfirmed)
                    .into_iter()
                    .collect();
                let drained = p.up[link].drain();
                let mut what = format!("link {link} dies");
                same_publishes(step, &format!("{what}: drain"), &drained, &lost, m)?;
                prop_assert_eq!(p.up[link].pending(), 0, "step {}: drained", step);
                let live = m.live();
                for (i, &(_, pid)) in lost.iter().enumerate() {
                    if live.is_empty() {
                        m.give_up(pid, &mut expect);
                        what += &format!(", #{pid} has no link left");
                    } else {
                        let to = live[(to + i) % live.len()];
                        m.send(pid, to);
                        what += &format!(", #{pid} to link {to}");
                    }
                }
                for (i, f) in drained.into_iter().enumerate() {
                    if live.is_empty() {
                        if let Some(s) = f.client {
                            p.settle(&[s], false, &mut self.client, &mut heard)?;
                        }
                    } else {
                        p.up[live[(to + i) % live.len()]].record(f.client, f.held, &p.held);
                    }
                }
                what
            }
            ConfOp::Revive(link) => {
                if m.links[link].alive {
                    return Ok(None);
                }
                m.links[link] = UpChannel {
                    alive: true,
                    ..UpChannel::default()
                };
                // As the session does: a new upstream channel, numbered from 1.
                p.up[link] = UpstreamConfirms::default();
                format!("link {link} is back, with a new channel")
            }
        };
        expect.sort_unstable();
        heard.sort_unstable();
        prop_assert_eq!(
            &heard,
            &expect,
            "step {}: {}: (client seq, ack) the client heard vs settled in the model",
            step,
            what
        );
        let outstanding = m
            .pubs
            .iter()
            .filter(|p| p.client.is_some() && p.fate == Fate::InFlight)
            .count();
        prop_assert_eq!(
            p.client.outstanding(),
            outstanding,
            "step {}: ClientConfirms::outstanding()",
            step
        );
        // Held bytes are exactly those of the publishes still waiting for a confirm: every
        // publish the maps let go of (settled, drained, sent again) gave its bytes back.
        let in_flight: usize = m
            .pubs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.fate == Fate::InFlight)
            .map(|(pid, _)| held(pid).size())
            .sum();
        prop_assert_eq!(p.held.used(), in_flight, "step {}: held bytes", step);
        for (l, up) in m.links.iter().enumerate() {
            prop_assert_eq!(
                p.up[l].pending(),
                up.unconfirmed.len(),
                "step {}: link {} pending()",
                step,
                l
            );
        }
        if heard.is_empty() {
            Ok(Some(what))
        } else {
            Ok(Some(format!(
                "{what} -> the client hears (seq, ack) {heard:?}"
            )))
        }
    }
}

fn run_confirms(links: usize, ops: &[ConfOp]) -> Result<(), TestCaseError> {
    let mut run = ConfRun::new(links);
    let mut trace = Vec::new();
    let mut step = |run: &mut ConfRun, i: usize, op: ConfOp| match run.step(i, op) {
        Ok(done) => {
            trace.extend(done.map(|what| format!("  {i}: {what}")));
            Ok(())
        }
        Err(e) => Err(traced(e, &trace)),
    };
    for (i, &op) in ops.iter().enumerate() {
        step(&mut run, i, op)?;
    }
    // Every live broker confirms the rest (steps numbered on from the input's).
    for link in 0..links {
        let n = run.m.links[link].unconfirmed.len();
        if run.m.links[link].alive && n > 0 {
            let op = ConfOp::Ack {
                link,
                nth: n - 1,
                multiple: true,
            };
            step(&mut run, ops.len() + link, op)?;
        }
    }
    let end = (|| {
        for (pid, p) in run.m.pubs.iter().enumerate() {
            prop_assert!(p.fate != Fate::InFlight, "publish #{pid} never settled");
        }
        prop_assert_eq!(
            run.p.client.outstanding(),
            0,
            "nothing outstanding at the end"
        );
        prop_assert!(
            run.client.unconfirmed.is_empty(),
            "the client never heard of {:?}",
            run.client.unconfirmed
        );
        Ok(())
    })();
    end.map_err(|e| traced(e, &trace))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn confirms_match_the_model((links, ops) in conf_case()) {
        run_confirms(links, &ops)?;
    }
}
