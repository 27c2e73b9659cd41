//! Heartbeats on the client leg: a client that heartbeats is kept however idle it is, a client
//! that goes silent is dropped after two missed intervals, as RabbitMQ does.
//!
//! The raw client is used because amqprs cannot run a 1 s heartbeat (it computes its send interval
//! as `heartbeat / 2` in whole seconds, i.e. 0, and then sends heartbeats in a busy loop).

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;

against_proxy_and_rabbitmq!(
    idle_client_with_1s_heartbeat_stays_connected,
    silent_client_is_dropped_after_missed_heartbeats,
);

async fn idle_client_with_1s_heartbeat_stays_connected(addr: SocketAddr) {
    let mut raw = RawClient::open(
        addr,
        Login {
            heartbeat: 1,
            ..Default::default()
        },
    )
    .await;
    raw.open_channel(1).await;
    // Idle for 5 s, answering with a heartbeat every 500 ms, as a client library would.
    let received = raw
        .idle(Duration::from_secs(5), Some(Duration::from_millis(500)))
        .await;
    assert!(
        received >= 3,
        "only {received} heartbeats from the server in 5 s with heartbeat = 1 s"
    );
    raw.round_trip(1).await;
    raw.close().await;
}

async fn silent_client_is_dropped_after_missed_heartbeats(addr: SocketAddr) {
    let mut raw = RawClient::open(
        addr,
        Login {
            heartbeat: 1,
            ..Default::default()
        },
    )
    .await;
    let since = Instant::now();
    // Sends nothing at all from here on; reads until the server gives up.
    let ending = within("the silent client to be dropped", raw.read_until_close()).await;
    let after = since.elapsed();
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(4),
        "a client silent with heartbeat = 1 s was dropped after {after:?} (expected 1.5 s to 4 s); ending: {ending:?}"
    );
    assert!(
        raw.heartbeats >= 1,
        "the server sent no heartbeat before dropping the client"
    );
    if let Ending::Close(c) = &ending {
        // Dropping the socket is what RabbitMQ does; a close would at least have to say why.
        panic!("expected the socket to be dropped, got connection.close {c:?}");
    }
}
