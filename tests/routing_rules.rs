//! `[[routing.rules]]` against real clusters: a rule's group keeps its publishes on its
//! clusters, `spread = "channel"` keeps each publisher's order as one broker does, and
//! `spread = "key"` sends each routing key to one cluster. Where messages landed is checked on
//! each cluster directly.
//!
//! Needs shard-a, shard-b and control from `WARREN_TEST_CLUSTERS` (scripts/test.sh); skips
//! without them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use amqprs::channel::{ExchangeDeclareArguments, QueueBindArguments};
use support::sharded::{Cleanup, ShardedProxy, sharded_cluster};
use support::{
    Cluster, confirm_select, connect, consume, declare_queue, eventually_for, get, next_delivery,
    open_channel, publish, queue_counts, within, within_for,
};

/// The rules under test (`support::unique` names start with `warren-test.`), added after the
/// test proxy's `[timeouts]` lines (TOML allows the tables in any order).
const RULES: &str = r#"
[[routing.rules]]
match = ["warren-test.rr-fast*"]
clusters = ["shard-a"]
spread = "channel"

[[routing.rules]]
match = ["warren-test.rr-chan*"]
spread = "channel"

[[routing.rules]]
match = ["warren-test.rr-key*"]
spread = "key"
"#;

async fn proxy() -> ShardedProxy {
    let clusters: Vec<Cluster> = ["shard-a", "shard-b", "control"]
        .map(|n| sharded_cluster(n).clone())
        .to_vec();
    ShardedProxy::start_on(&clusters, RULES).await
}

/// Ready messages of `queue` on each shard cluster, asked directly.
async fn per_cluster(queue: &str) -> [u32; 2] {
    let mut out = [0; 2];
    for (i, name) in ["shard-a", "shard-b"].iter().enumerate() {
        let conn = connect(sharded_cluster(name).first_node()).await;
        let (ch, _ev) = open_channel(&conn).await;
        out[i] = queue_counts(&ch, queue).await.0;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
    }
    out
}

/// Waits until the shard clusters hold `total` messages of `queue` between them; the split.
async fn settled_split(queue: &str, total: u32) -> [u32; 2] {
    eventually_for(
        Duration::from_secs(30),
        &format!("{total} messages of {queue} on the clusters"),
        || async move {
            let s = per_cluster(queue).await;
            if s[0] + s[1] == total {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await
}

/// Bodies of every message of `queue` on one cluster, taken directly (no-ack gets).
async fn drain_on(cluster: &str, queue: &str) -> Vec<String> {
    let conn = connect(sharded_cluster(cluster).first_node()).await;
    let (ch, _ev) = open_channel(&conn).await;
    let mut out = Vec::new();
    while let Some(m) = get(&ch, queue, true).await {
        out.push(String::from_utf8(m.body).unwrap());
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_group_keeps_its_publishes_on_its_clusters() {
    if support::skip_live() {
        return;
    }
    let proxy = proxy().await;
    let (_cleanup, queue) = Cleanup::with_queue("rr-fast");
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, _ev) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    confirm_select(&ch).await;
    // Several channels: each would go to its own cluster without the group.
    for c in 0..4 {
        let (pc, _pev) = open_channel(&conn).await;
        for i in 0..25 {
            publish(&pc, "", &queue, format!("{c}-{i}").as_bytes()).await;
        }
    }
    let split = settled_split(&queue, 100).await;
    assert_eq!(split, [100, 0], "every fast publish on shard-a only");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_spread_keeps_each_publishers_order() {
    if support::skip_live() {
        return;
    }
    let proxy = proxy().await;
    let (_cleanup, queue) = Cleanup::with_queue("rr-chan");
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, _ev) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    const PUBLISHERS: usize = 4;
    const EACH: usize = 150;
    for p in 0..PUBLISHERS {
        let (pc, _pev) = open_channel(&conn).await;
        if p % 2 == 0 {
            confirm_select(&pc).await; // with and without confirms
        }
        for i in 0..EACH {
            publish(&pc, "", &queue, format!("{p}:{i}").as_bytes()).await;
        }
    }
    // Each publisher's messages all on one cluster...
    let total = PUBLISHERS * EACH;
    settled_split(&queue, total as u32).await;
    // ...and consumed through warren in publish order per publisher.
    let (cc, _cev) = open_channel(&conn).await;
    let (_tag, mut rx) = consume(&cc, &queue, false).await;
    let mut next = [0usize; PUBLISHERS];
    for _ in 0..total {
        let d = within("a delivery", next_delivery(&mut rx)).await;
        let text = String::from_utf8(d.body).unwrap();
        let (p, i) = text.split_once(':').unwrap();
        let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
        assert_eq!(
            i, next[p],
            "publisher {p}: message {i} arrived where {} was due",
            next[p]
        );
        next[p] += 1;
    }
    assert!(next.iter().all(|&n| n == EACH));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_spread_sends_each_key_to_one_cluster() {
    if support::skip_live() {
        return;
    }
    let proxy = proxy().await;
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&support::unique("rr-key-x"));
    let queue = cleanup.queue(&support::unique("rr-keyq"));
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, _ev) = open_channel(&conn).await;
    within(
        "exchange.declare",
        ch.exchange_declare(ExchangeDeclareArguments::new(&exchange, "topic")),
    )
    .await
    .unwrap();
    declare_queue(&ch, &queue).await;
    within(
        "queue.bind",
        ch.queue_bind(QueueBindArguments::new(&queue, &exchange, "#")),
    )
    .await
    .unwrap();
    confirm_select(&ch).await;
    const KEYS: usize = 25; // odd: round-robin alone would put keys on both clusters
    const EACH: usize = 5;
    for round in 0..EACH {
        for k in 0..KEYS {
            publish(
                &ch,
                &exchange,
                &format!("key.{k}"),
                format!("{k}:{round}").as_bytes(),
            )
            .await;
        }
    }
    let total = (KEYS * EACH) as u32;
    settled_split(&queue, total).await;
    let mut where_: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    for cluster in ["shard-a", "shard-b"] {
        for body in drain_on(cluster, &queue).await {
            let k: usize = body.split_once(':').unwrap().0.parse().unwrap();
            where_.entry(k).or_default().insert(cluster);
        }
    }
    assert_eq!(where_.len(), KEYS);
    for (k, clusters) in &where_ {
        assert_eq!(clusters.len(), 1, "key {k} on {clusters:?}");
    }
    let on_a = where_.values().filter(|c| c.contains("shard-a")).count();
    assert!(
        on_a > 0 && on_a < KEYS,
        "keys spread over both clusters ({on_a} of {KEYS} on shard-a)"
    );
    proxy.shutdown().await;
}

/// The rules with one more for `warren-test.rr-move*` (none when `rule` is `None`).
fn rules_with(rule: Option<&str>) -> String {
    match rule {
        None => RULES.to_owned(),
        Some(body) => {
            format!("{RULES}\n[[routing.rules]]\nmatch = [\"warren-test.rr-move*\"]\n{body}\n")
        }
    }
}

/// The queue's rule changes three times while a confirm-mode publisher keeps publishing and a
/// consumer takes everything: shard-a only by channel, then shard-b only by message, then every
/// shard cluster by key, then no rule. Each reload lands while publishes are in flight. Every
/// publish is acked, and the consumer gets each message exactly once: nothing is lost with a
/// rule change, and what sits on a cluster the rule no longer names is still consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_reload_under_confirm_load_loses_nothing() {
    if support::skip_live() {
        return;
    }
    let stages = [
        Some("clusters = [\"shard-a\"]\nspread = \"channel\""),
        Some("clusters = [\"shard-b\"]\nspread = \"message\""),
        Some("spread = \"key\""),
        None,
    ];
    const EACH: usize = 500;
    let clusters: Vec<Cluster> = ["shard-a", "shard-b", "control"]
        .map(|n| sharded_cluster(n).clone())
        .to_vec();
    let proxy = ShardedProxy::start_on(&clusters, &rules_with(stages[0])).await;
    let (_cleanup, queue) = Cleanup::with_queue("rr-move");

    let consumer = connect(proxy.amqp_addr()).await;
    let (cc, _cev) = open_channel(&consumer).await;
    declare_queue(&cc, &queue).await;
    let (_tag, mut rx) = consume(&cc, &queue, true).await;
    let received = tokio::spawn({
        let cc = cc.clone();
        async move {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            while seen.len() < stages.len() * EACH {
                let d = within_for(
                    Duration::from_secs(60),
                    "a delivery",
                    next_delivery(&mut rx),
                )
                .await;
                *seen.entry(String::from_utf8(d.body).unwrap()).or_default() += 1;
                within(
                    "basic.ack",
                    cc.basic_ack(amqprs::channel::BasicAckArguments::new(d.tag, false)),
                )
                .await
                .expect("basic.ack");
            }
            // Anything more would be a duplicate.
            tokio::time::sleep(Duration::from_millis(500)).await;
            while let Ok(m) = rx.try_recv() {
                let body = String::from_utf8(m.content.unwrap_or_default()).unwrap();
                *seen.entry(body).or_default() += 1;
            }
            seen
        }
    });

    let publisher = connect(proxy.amqp_addr()).await;
    let (pc, mut pev) = open_channel(&publisher).await;
    confirm_select(&pc).await;
    for (s, _) in stages.iter().enumerate() {
        for i in 0..EACH {
            publish(&pc, "", &queue, format!("{s}-{i}").as_bytes()).await;
        }
        // The next rule while this stage's publishes are still being confirmed.
        if let Some(next) = stages.get(s + 1) {
            proxy.reload_with(&rules_with(*next));
        }
    }
    let confirms = pev.confirms((stages.len() * EACH) as u64).await;
    assert!(
        confirms.iter().all(|&ok| ok),
        "{} publishes nacked",
        confirms.iter().filter(|&&ok| !ok).count()
    );
    let seen = within_for(Duration::from_secs(120), "the consumer", received)
        .await
        .expect("consumer task");
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "delivered twice: {duplicated:?}");
    assert_eq!(seen.len(), stages.len() * EACH, "every message delivered");
    assert_eq!(per_cluster(&queue).await, [0, 0], "nothing left behind");
    proxy.shutdown().await;
}
