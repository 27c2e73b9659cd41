//! The evacuator against live clusters, on what the end-to-end test does not reach: a target
//! that returns every message (the queue missing there) gets none acknowledged on the source
//! (each return counted as an error, the messages requeued, none lost), and once the queue
//! exists there again everything moves, the messages the evacuator requeued itself carrying no
//! `x-warren-redelivered` mark (the journal in `state_dir` knows them). Needs
//! `WARREN_TEST_CLUSTERS` with shard-a, shard-b and control (skipped without).

mod support;

use std::path::Path;
use std::sync::Arc;

use amqprs::channel::{BasicGetArguments, QueueDeleteArguments};
use warren::config::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_messages_stay_on_the_source_and_move_once_the_target_has_the_queue() {
    if support::skip_live() {
        return;
    }
    support::init_tracing();
    let state_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(support::unique("evac-live"));
    std::fs::create_dir_all(&state_dir).unwrap();
    let (a, b, c) = (
        support::cluster("shard-a"),
        support::cluster("shard-b"),
        support::cluster("control"),
    );
    let text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n[timeouts]\nshutdown_grace_ms = 100\n\n\
         [limits]\nevacuate_rate = 10000\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"control\"\nrole = \"control\"\nnodes = [{}]\n",
        state_dir.display(),
        support::quoted(&a.nodes),
        support::quoted(&b.nodes),
        support::quoted(&c.nodes)
    );
    let config = Config::parse(&text, "evacuate.toml").expect("test config");
    let proxy = warren::start(Arc::new(config))
        .await
        .expect("start the proxy");
    let shared = proxy.shared().clone();

    // The queue through warren: on every cluster, and known to the evacuator (no management API
    // here, so the declared queues are the ones it moves).
    let queue = support::unique("evac-returned");
    let conn = support::connect(proxy.amqp_addr()).await;
    let (ch, _events) = support::open_channel(&conn).await;
    support::declare_queue(&ch, &queue).await;
    // 40 messages straight on shard-a; the queue gone from shard-b.
    let conn_a = support::connect(a.first_node()).await;
    let (ch_a, _ea) = support::open_channel(&conn_a).await;
    for i in 0..40 {
        support::publish(&ch_a, "", &queue, format!("m-{i}").as_bytes()).await;
    }
    let conn_b = support::connect(b.first_node()).await;
    let (ch_b, _eb) = support::open_channel(&conn_b).await;
    ch_b.queue_delete(QueueDeleteArguments::new(&queue))
        .await
        .expect("delete on shard-b");
    support::eventually("40 on shard-a", || async {
        (support::queue_counts(&ch_a, &queue).await.0 == 40).then_some(())
    })
    .await;

    shared.evacuate("shard-a").expect("evacuate");
    let p = support::eventually("the returns counted as errors", || async {
        let p = shared.evacuation("shard-a");
        (p.errors >= 40
            && p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("returned")))
        .then_some(p)
    })
    .await;
    assert_eq!(p.moved, 0, "nothing acknowledged on the source: {p:?}");
    assert_eq!(p.possible_duplicates, 0, "{p:?}");

    // Stopped: the evacuator's channel closes and the 40 are ready on shard-a again.
    shared.unevacuate("shard-a").expect("unevacuate");
    support::eventually("the 40 back on shard-a", || async {
        (support::queue_counts(&ch_a, &queue).await.0 == 40).then_some(())
    })
    .await;

    // The queue on shard-b again: everything moves, once.
    support::declare_queue(&ch_b, &queue).await;
    shared.evacuate("shard-a").expect("evacuate again");
    support::eventually("the 40 moved to shard-b", || async {
        let on_a = support::queue_counts(&ch_a, &queue).await.0;
        let on_b = support::queue_counts(&ch_b, &queue).await.0;
        (on_a == 0 && on_b == 40).then_some(())
    })
    .await;
    // The clusters show the move before the evacuator counts it (after its acks' round trip).
    let p = support::eventually("the move counted", || async {
        let p = shared.evacuation("shard-a");
        (p.moved >= 40).then_some(p)
    })
    .await;
    assert_eq!(p.possible_duplicates, 0, "{p:?}");
    // Requeued by the evacuator itself, known to its journal: not marked redelivered.
    let mut bodies = Vec::new();
    while let Some((_, props, body)) = ch_b
        .basic_get(BasicGetArguments::new(&queue).no_ack(true).finish())
        .await
        .expect("basic.get on shard-b")
    {
        let marked = props.headers().is_some_and(|h| {
            h.as_ref()
                .keys()
                .any(|k| k.as_ref() == "x-warren-redelivered")
        });
        assert!(
            !marked,
            "{:?} marked redelivered",
            String::from_utf8_lossy(&body)
        );
        bodies.push(String::from_utf8_lossy(&body).into_owned());
    }
    bodies.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("m-{i}")).collect();
    want.sort();
    assert_eq!(bodies, want, "every message once");

    shared.unevacuate("shard-a").expect("unevacuate");
    support::delete_queue(&ch, &queue).await;
    support::within("proxy shutdown", proxy.shutdown()).await;
    let _ = std::fs::remove_dir_all(&state_dir);
}
