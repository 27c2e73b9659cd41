//! A consumer that stops reading must not make the proxy buffer its queue: warren stops reading
//! the cluster for that client once the client's write buffer (`client_buffer_bytes`) is full,
//! so the messages stay in RabbitMQ (where the broker's own flow control and paging apply), the
//! proxy's memory stays flat, other clients carry on, and everything arrives intact once the
//! client reads again.

mod support;

use amqprs::channel::BasicPublishArguments;
use std::time::Duration;
use support::*;
use warren::codec::{self, Method};

const MESSAGES: usize = 1500;
const BODY: usize = 64 * 1024;

/// Resident memory of this process (the proxy under test runs in it), from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Fills `queue` directly on RabbitMQ with [`MESSAGES`] bodies of [`BODY`] bytes, each starting
/// with its index.
async fn fill(queue: &str) {
    let conn = connect(rabbit_addr()).await;
    let (ch, _events) = open_channel(&conn).await;
    declare_queue(&ch, queue).await;
    confirm_select(&ch).await;
    for i in 0..MESSAGES {
        let mut body = vec![0u8; BODY];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        publish_with(&ch, BasicPublishArguments::new("", queue), &body).await;
    }
    eventually("the queue to hold every message", || async {
        (rabbit_queue_counts(queue).await.0 as usize == MESSAGES).then_some(())
    })
    .await;
    close_connection(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_leaves_its_queue_on_the_broker() {
    if support::skip_live() {
        return;
    }
    let queue = unique("slow-consumer");
    fill(&queue).await;
    let total_bytes = (MESSAGES * BODY) as u64;

    let proxy = start_proxy("").await;
    let mut bystander = Bystander::start(proxy.amqp_addr()).await;
    let mut slow = RawClient::open(proxy.amqp_addr(), Login::default()).await;
    slow.open_channel(1).await;
    let rss_before = rss_bytes();
    // No-ack and no prefetch limit: RabbitMQ pushes as fast as the sockets take it.
    slow.send_method(
        1,
        &Method::BasicConsume(codec::BasicConsume {
            queue: queue.as_str().try_into().unwrap(),
            consumer_tag: "slow".try_into().unwrap(),
            no_ack: true,
            ..Default::default()
        }),
    )
    .await;

    // The client reads nothing for three seconds; the other client keeps going meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    bystander.assert_progress(20).await;
    let (left, consumers) = rabbit_queue_counts(&queue).await;
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "not reading for 3 s: {left} of {MESSAGES} messages still in RabbitMQ, proxy process grew by {} KiB",
        grown / 1024
    );
    assert_eq!(consumers, 1, "the slow client's consumer is registered");
    // What left the queue sits in socket buffers (a few MiB each way on loopback), in RabbitMQ's
    // writer (its per-channel credit: 200 deliveries) and in the proxy's bounded buffers; without
    // back-pressure the proxy would have read the whole queue into memory.
    assert!(
        left as usize >= MESSAGES / 3,
        "only {left} of {MESSAGES} messages left in RabbitMQ: the proxy kept reading for a client that does not"
    );
    assert!(
        grown < total_bytes / 2,
        "the proxy process grew by {} MiB while its client read nothing ({} MiB queued)",
        grown >> 20,
        total_bytes >> 20
    );

    // Now it reads: every message arrives, whole and in order.
    match slow.read_method().await {
        (1, Method::BasicConsumeOk(_)) => {}
        (ch, m) => panic!(
            "expected basic.consume-ok on channel 1, got {} on {ch}",
            m.name()
        ),
    }
    let mut body_bytes = 0usize;
    for next in 0..MESSAGES {
        let (method, body, _) = slow.read_delivery().await;
        assert!(matches!(method, Method::BasicDeliver(_)), "{method:?}");
        assert_eq!(body.len(), BODY, "body {next} size");
        let index = u64::from_be_bytes(body[..8].try_into().unwrap()) as usize;
        assert_eq!(index, next, "message order");
        assert!(body[8..].iter().all(|&b| b == 0), "body {index} intact");
        body_bytes += body.len();
    }
    assert_eq!(body_bytes as u64, total_bytes);
    eventually("the queue to be empty", || async {
        (rabbit_queue_counts(&queue).await.0 == 0).then_some(())
    })
    .await;
    slow.close().await;
    bystander.finish().await;
    let conn = connect(rabbit_addr()).await;
    let (ch, _events) = open_channel(&conn).await;
    delete_queue(&ch, &queue).await;
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
}
