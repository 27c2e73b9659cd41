//! Connection lifecycle: a client that vanishes releases what it held upstream, and a proxy
//! shutdown gives clients their grace period and then closes them with 320 CONNECTION_FORCED.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use warren::codec::{self, Method};

against_proxy_and_rabbitmq!(
    vanished_client_unacked_messages_become_ready_again_rst,
    vanished_client_unacked_messages_become_ready_again_fin
);

/// A raw client consumes `N` messages without acking them, then its socket disappears (`reset`:
/// with an RST, else with a plain FIN and no connection.close). RabbitMQ must see the connection
/// go: the messages are ready again and the consumer is gone.
async fn vanish(addr: SocketAddr, reset: bool) {
    const N: u32 = 5;
    let conn = connect(addr).await;
    let (ch, _events) = open_channel(&conn).await;
    let q = unique("vanish");
    declare_queue(&ch, &q).await;
    for i in 0..N {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }

    let mut raw = RawClient::open(addr, Login::default()).await;
    raw.open_channel(1).await;
    let consume = codec::BasicConsume {
        queue: q.as_str().try_into().unwrap(),
        ..Default::default()
    };
    match raw.call(1, &Method::BasicConsume(consume)).await {
        Method::BasicConsumeOk(_) => {}
        m => panic!("expected basic.consume-ok, got {}", m.name()),
    }
    for i in 0..N {
        let (m, body, _) = raw.read_delivery().await;
        assert!(matches!(m, Method::BasicDeliver(_)));
        assert_eq!(body, format!("m{i}").as_bytes());
    }
    // Held by the consumer: nothing ready.
    assert_eq!(
        rabbit_queue_counts(&q).await,
        (0, 1),
        "(ready, consumers) while the client holds the messages"
    );

    if reset {
        raw.vanish();
    } else {
        drop(raw);
    }
    let counts = eventually("the vanished client's messages to be requeued", || {
        let q = q.clone();
        async move {
            let c = rabbit_queue_counts(&q).await;
            (c == (N, 0)).then_some(c)
        }
    })
    .await;
    assert_eq!(counts, (N, 0));
    // And they can be consumed again, flagged redelivered.
    let redelivered = get(&ch, &q, true).await.expect("requeued message");
    assert!(redelivered.redelivered);
    assert_eq!(redelivered.body, b"m0");
    delete_queue(&ch, &q).await;
    close_connection(conn).await;
}

async fn vanished_client_unacked_messages_become_ready_again_rst(addr: SocketAddr) {
    vanish(addr, true).await;
}

async fn vanished_client_unacked_messages_become_ready_again_fin(addr: SocketAddr) {
    vanish(addr, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_remaining_clients_with_320_after_the_grace_period() {
    if support::skip_live() {
        return;
    }
    const GRACE: Duration = Duration::from_millis(1500);
    let proxy = start_proxy(&format!(
        "[timeouts]\nshutdown_grace_ms = {}\n",
        GRACE.as_millis()
    ))
    .await;
    let addr = proxy.amqp_addr();
    let mut raw = RawClient::open(addr, Login::default()).await;
    raw.open_channel(1).await;
    raw.round_trip(1).await;

    let since = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown());
    let ending = within(
        "connection.close from the proxy shutting down",
        raw.read_until_close(),
    )
    .await;
    let after = since.elapsed();
    match &ending {
        Ending::Close(c) => {
            assert_eq!(c.code, 320, "{c:?}");
            assert!(c.text.starts_with("CONNECTION_FORCED"), "{c:?}");
        }
        Ending::Eof => panic!("the proxy dropped the client without connection.close 320"),
    }
    assert!(
        after >= GRACE - Duration::from_millis(100),
        "closed after {after:?}, before the {GRACE:?} grace period"
    );
    assert!(
        after < GRACE + Duration::from_secs(5),
        "closed only after {after:?} (grace {GRACE:?})"
    );
    // close-ok was sent: the proxy closes the socket and finishes shutting down.
    assert_eq!(
        within("the socket to close", raw.read_until_eof()).await,
        None
    );
    within("shutdown to complete", shutdown)
        .await
        .expect("shutdown task");
    // Nobody is listening any more.
    let late = tokio::net::TcpStream::connect(addr).await;
    assert!(
        late.is_err(),
        "the proxy still accepts connections after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_early_when_clients_leave_within_the_grace_period() {
    if support::skip_live() {
        return;
    }
    let proxy = start_proxy("[timeouts]\nshutdown_grace_ms = 30000\n").await;
    let addr = proxy.amqp_addr();
    let conn = connect(addr).await;
    let (ch, _events) = open_channel(&conn).await;
    let q = unique("q");
    declare_queue(&ch, &q).await;

    let since = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown());
    // The connected client keeps working during the grace period, then leaves.
    publish(&ch, "", &q, b"during the grace period").await;
    assert_eq!(
        get(&ch, &q, true).await.expect("message").body,
        b"during the grace period"
    );
    delete_queue(&ch, &q).await;
    close_connection(conn).await;
    within("shutdown to complete once the last client left", shutdown)
        .await
        .expect("shutdown task");
    assert!(
        since.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} for a client that had left",
        since.elapsed()
    );
}
