//! A 10 MiB message crosses the proxy intact in both directions when the client negotiated the
//! smallest frame_max AMQP allows (4096), while the proxy's broker leg uses its own (128 KiB):
//! the proxy must re-split bodies in both directions.

#[macro_use]
mod support;

use std::net::SocketAddr;

use support::*;
use warren::codec::{self, Method, ShortStr};

against_proxy_and_rabbitmq!(ten_mib_message_with_frame_max_4096_arrives_intact_both_ways);

const SIZE: usize = 10 * 1024 * 1024;
const SMALL_FRAMES: u32 = 4096;

/// A body in which a lost, duplicated or reordered chunk shows.
fn body(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: body differs: got {} bytes, want {}; first difference at {first:?}",
            got.len(),
            want.len()
        );
    }
}

fn s(x: &str) -> ShortStr {
    ShortStr::try_from(x).unwrap()
}

async fn ten_mib_message_with_frame_max_4096_arrives_intact_both_ways(addr: SocketAddr) {
    let conn = connect(addr).await;
    let (ch, _events) = open_channel(&conn).await;
    let q_up = unique("large-up");
    let q_down = unique("large-down");
    declare_queue(&ch, &q_up).await;
    declare_queue(&ch, &q_down).await;

    let mut raw = RawClient::open(
        addr,
        Login {
            frame_max: SMALL_FRAMES,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(raw.frame_max, SMALL_FRAMES as usize);
    raw.open_channel(1).await;

    // Small frames in: a confirmed publish split into 4096-byte frames, read back by amqprs
    // (which takes the server's frame_max).
    let up = body(1);
    match raw
        .call(
            1,
            &Method::ConfirmSelect(codec::ConfirmSelect { nowait: false }),
        )
        .await
    {
        Method::ConfirmSelectOk(_) => {}
        m => panic!("expected confirm.select-ok, got {}", m.name()),
    }
    within_for(
        STEP * 3,
        "publishing 10 MiB in 4096-byte frames",
        raw.publish(1, "", &q_up, &up, SMALL_FRAMES as usize),
    )
    .await;
    match within_for(
        STEP * 3,
        "the confirm of the 10 MiB publish",
        raw.read_method(),
    )
    .await
    {
        (1, Method::BasicAck(a)) => assert_eq!(a.delivery_tag, 1),
        (ch, m) => panic!("expected basic.ack on channel 1, got {} on {ch}", m.name()),
    }
    let got = within_for(
        STEP * 3,
        "basic.get of the 10 MiB message",
        get(&ch, &q_up, true),
    )
    .await
    .expect("the 10 MiB message is in the queue");
    assert_same(
        "published in small frames, read with large ones",
        &got.body,
        &up,
    );

    // Small frames out: published by amqprs in large frames, consumed by the raw client; no
    // frame it receives may exceed the 4096 bytes it negotiated.
    let down = body(2);
    within_for(
        STEP * 3,
        "amqprs publish of 10 MiB",
        publish(&ch, "", &q_down, &down),
    )
    .await;
    let consume = codec::BasicConsume {
        queue: s(&q_down),
        consumer_tag: s("large"),
        no_ack: true,
        ..Default::default()
    };
    match raw.call(1, &Method::BasicConsume(consume)).await {
        Method::BasicConsumeOk(ok) => assert_eq!(ok.consumer_tag, "large"),
        m => panic!("expected basic.consume-ok, got {}", m.name()),
    }
    let (method, got, largest) =
        within_for(STEP * 3, "the 10 MiB delivery", raw.read_delivery()).await;
    assert!(
        matches!(method, Method::BasicDeliver(_)),
        "expected basic.deliver, got {}",
        method.name()
    );
    assert!(
        largest <= SMALL_FRAMES as usize,
        "a frame of {largest} bytes exceeds the negotiated 4096"
    );
    assert_same(
        "published in large frames, consumed in small ones",
        &got,
        &down,
    );

    // And small frames both ways.
    raw.publish(1, "", &q_down, &up, SMALL_FRAMES as usize)
        .await;
    let (_, got, largest) =
        within_for(STEP * 3, "the second 10 MiB delivery", raw.read_delivery()).await;
    assert!(largest <= SMALL_FRAMES as usize);
    assert_same("small frames both ways", &got, &up);
    raw.close().await;

    delete_queue(&ch, &q_up).await;
    delete_queue(&ch, &q_down).await;
    close_connection(conn).await;
}
