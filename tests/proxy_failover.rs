//! Node failover: with the first node of a cluster down, new clients are connected through the
//! second node and can publish and consume.
//!
//! The test starts its own two-node cluster (auto ports, its own state dir under `target/`) so it
//! can stop a node without disturbing other tests; the cluster is torn down when the test ends,
//! pass or fail. It takes ~20-30 s, mostly RabbitMQ booting.

mod support;

use std::time::Duration;

use amqprs::channel::{BasicAckArguments, BasicCancelArguments};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_clients_connect_through_the_second_node_when_the_first_is_stopped() {
    if support::skip_live() {
        return;
    }
    let cluster = tokio::task::block_in_place(|| PrivateCluster::start("failover"));
    let nodes = cluster.cluster.nodes.clone();
    let proxy = start_proxy_on(&nodes, "[timeouts]\nconnect_ms = 3000\n").await;

    // Both nodes up: the proxy works.
    round_trip(&proxy, "before the stop").await;

    tokio::task::block_in_place(|| cluster.rabbit(&["stop-node", &cluster.node_name(1)]));
    let first = cluster.cluster.first_node();
    let refused = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(first),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "node 1 ({first}) still accepts connections after stop-node"
    );

    // Several new clients in a row, each through the surviving node.
    for i in 0..3 {
        round_trip(&proxy, &format!("after the stop, client {i}")).await;
    }
    within("proxy shutdown", proxy.shutdown()).await;
    tokio::task::block_in_place(|| drop(cluster));
}

/// A new connection through the proxy declares a queue, publishes, consumes and acks.
async fn round_trip(proxy: &warren::ProxyHandle, what: &str) {
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    let q = unique("failover");
    declare_queue(&ch, &q).await;
    let (ctag, mut rx) = consume(&ch, &q, true).await;
    for i in 0..5 {
        publish(&ch, "", &q, format!("{what}: {i}").as_bytes()).await;
    }
    for i in 0..5 {
        let d = next_delivery(&mut rx).await;
        assert_eq!(d.body, format!("{what}: {i}").as_bytes(), "{what}");
        ch.basic_ack(BasicAckArguments::new(d.tag, false))
            .await
            .unwrap();
    }
    assert_eq!(queue_counts(&ch, &q).await, (0, 1), "{what}");
    assert!(
        events.try_next().is_none(),
        "{what}: unexpected channel event"
    );
    within(
        "basic.cancel",
        ch.basic_cancel(BasicCancelArguments::new(&ctag)),
    )
    .await
    .unwrap();
    delete_queue(&ch, &q).await;
    close_connection(conn).await;
}
