//! Clients that break the protocol: each gets the connection.close RabbitMQ would send (the code
//! is asserted through the proxy and, in `direct_rabbitmq::*`, of RabbitMQ itself), the proxy
//! closes the socket afterwards, and a well-behaved client using the same proxy at the same time
//! carries on undisturbed.

mod support;

use std::net::SocketAddr;

use bytes::BytesMut;
use support::*;
use tokio::io::AsyncReadExt;
use warren::codec::{self, Method};

#[derive(Debug, Clone, Copy)]
enum Abuse {
    /// Bytes that are not a frame (type octet 'G').
    Garbage,
    /// A well-formed method frame whose frame-end octet is not 0xCE.
    BadFrameEnd,
    /// A body frame larger than the frame_max the client negotiated (4096).
    OversizedFrame,
    /// A method on a channel that was never opened.
    UnopenedChannel,
    /// A content header frame with no basic.publish before it.
    HeaderWithoutMethod,
    /// A content body frame with no basic.publish before it.
    BodyWithoutMethod,
    /// A method frame with a method id no AMQP 0-9-1 class has (basic, method 99).
    UnknownMethod,
    /// A publish whose body frames carry more bytes than its content header announced.
    BodyOverflow,
    /// A method frame between a publish's content header and its body.
    MethodInsideContent,
    /// A content header of class queue (50) after a basic.publish.
    HeaderOfWrongClass,
    /// A heartbeat frame on channel 1 (heartbeats belong to channel 0).
    HeartbeatOnChannel,
    /// channel.open on a channel that is already open.
    ChannelOpenTwice,
    /// channel.open above the channel_max the client negotiated (10).
    ChannelAboveMax,
    /// A queue.declare whose arguments end before its fields do.
    TruncatedMethod,
    /// A queue.declare whose arguments table holds a value of an unknown type ('Z').
    UnknownFieldType,
    /// A basic.qos on channel 0, which carries only connection methods.
    ChannelMethodOnChannelZero,
    /// A connection.tune-ok on channel 1.
    ConnectionMethodOnChannel,
    /// A frame of a type AMQP 0-9-1 does not define (type 4).
    UnknownFrameType,
}

/// Opens a connection (frame_max 4096) and channel 1, misbehaves, and returns how the server
/// ended the connection. Also checks that the socket is closed afterwards.
async fn commit(addr: SocketAddr, abuse: Abuse) -> Ending {
    let mut raw = RawClient::open(
        addr,
        Login {
            frame_max: 4096,
            channel_max: 10,
            ..Default::default()
        },
    )
    .await;
    raw.open_channel(1).await;
    match abuse {
        Abuse::Garbage => raw.send(b"GARBAGE, NOT A FRAME AT ALL").await,
        Abuse::BadFrameEnd => {
            let mut f = frame(codec::FRAME_METHOD, 1, &qos_one());
            *f.last_mut().unwrap() = 0xAB;
            raw.send(&f).await;
        }
        Abuse::OversizedFrame => {
            let mut out = publish_start(1, "nowhere", 8000);
            out.extend_from_slice(&frame(codec::FRAME_BODY, 1, &[7u8; 8000]));
            raw.send(&out).await;
        }
        Abuse::UnopenedChannel => {
            let declare = codec::QueueDeclare {
                queue: unique("q").as_str().try_into().unwrap(),
                ..Default::default()
            };
            raw.send_method(5, &Method::QueueDeclare(declare)).await;
        }
        Abuse::HeaderWithoutMethod => {
            // class 60, weight 0, body size 5, no properties
            raw.send(&frame(
                codec::FRAME_HEADER,
                1,
                &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0],
            ))
            .await;
        }
        Abuse::BodyWithoutMethod => raw.send(&frame(codec::FRAME_BODY, 1, b"hello")).await,
        Abuse::UnknownMethod => {
            raw.send(&frame(codec::FRAME_METHOD, 1, &[0, 60, 0, 99]))
                .await
        }
        Abuse::BodyOverflow => {
            let mut out = publish_start(1, "nowhere", 5);
            out.extend_from_slice(&frame(codec::FRAME_BODY, 1, b"hello, world"));
            raw.send(&out).await;
        }
        Abuse::MethodInsideContent => {
            let mut out = publish_start(1, "nowhere", 5);
            out.extend_from_slice(&frame(codec::FRAME_METHOD, 1, &qos_one()));
            raw.send(&out).await;
        }
        Abuse::HeaderOfWrongClass => {
            let mut out = BytesMut::new();
            codec::write_method(&mut out, 1, &publish_to("nowhere"));
            out.extend_from_slice(&frame(
                codec::FRAME_HEADER,
                1,
                &[0, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0],
            ));
            raw.send(&out).await;
        }
        Abuse::HeartbeatOnChannel => raw.send(&frame(codec::FRAME_HEARTBEAT, 1, &[])).await,
        Abuse::ChannelOpenTwice => {
            raw.send_method(1, &Method::ChannelOpen(Default::default()))
                .await
        }
        Abuse::ChannelAboveMax => {
            raw.send_method(11, &Method::ChannelOpen(Default::default()))
                .await
        }
        Abuse::TruncatedMethod => {
            // queue.declare: reserved short, then a queue name of 200 bytes of which 3 arrive.
            raw.send(&frame(
                codec::FRAME_METHOD,
                1,
                &[0, 50, 0, 10, 0, 0, 200, b'a', b'b', b'c'],
            ))
            .await
        }
        Abuse::UnknownFieldType => {
            // queue.declare "q", no flags, arguments {"x": 'Z' ...}
            let mut args = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
            let table = [1, b'x', b'Z', 0, 0, 0, 0];
            args.extend_from_slice(&(table.len() as u32).to_be_bytes());
            args.extend_from_slice(&table);
            raw.send(&frame(codec::FRAME_METHOD, 1, &args)).await
        }
        Abuse::ChannelMethodOnChannelZero => {
            raw.send(&frame(codec::FRAME_METHOD, 0, &qos_one())).await
        }
        Abuse::ConnectionMethodOnChannel => {
            raw.send_method(
                1,
                &Method::ConnectionTuneOk(codec::ConnectionTuneOk {
                    channel_max: 10,
                    frame_max: 4096,
                    heartbeat: 0,
                }),
            )
            .await
        }
        Abuse::UnknownFrameType => raw.send(&frame(4, 1, b"what")).await,
    }
    let ending = within(
        &format!("the reaction to {abuse:?}"),
        raw.read_until_close(),
    )
    .await;
    // After close-ok, the server closes the socket.
    let eof = within(
        &format!("the socket to close after {abuse:?}"),
        raw.read_until_eof(),
    )
    .await;
    assert_eq!(eof, None, "a second connection.close after {abuse:?}");
    ending
}

/// The payload of a basic.qos (prefetch 1): a method valid on an open channel.
fn qos_one() -> BytesMut {
    let mut qos = BytesMut::new();
    Method::BasicQos(codec::BasicQos {
        prefetch_size: 0,
        prefetch_count: 1,
        global: false,
    })
    .encode(&mut qos);
    qos
}

/// basic.publish to the default exchange with `routing_key`.
fn publish_to(routing_key: &str) -> Method {
    Method::BasicPublish(codec::BasicPublish {
        routing_key: routing_key.try_into().unwrap(),
        ..Default::default()
    })
}

/// A basic.publish to `routing_key` and its content header announcing `body_size` bytes, on
/// `channel`: a content started, its body still to come.
fn publish_start(channel: u16, routing_key: &str, body_size: u64) -> BytesMut {
    let mut out = BytesMut::new();
    codec::write_method(&mut out, channel, &publish_to(routing_key));
    let header = codec::ContentHeader {
        class_id: 60,
        body_size,
        properties: Default::default(),
    };
    codec::write_header(&mut out, channel, &header);
    out
}

/// [`commit`] through a fresh proxy while a well-behaved client publishes and consumes through
/// it; that client must keep going, and a new client must still be served afterwards.
async fn through_proxy(abuse: Abuse) -> Ending {
    let proxy = start_proxy("").await;
    let mut bystander = Bystander::start(proxy.amqp_addr()).await;
    let ending = commit(proxy.amqp_addr(), abuse).await;
    bystander.assert_progress(20).await;
    let mut fresh = RawClient::open(proxy.amqp_addr(), Login::default()).await;
    fresh.open_channel(1).await;
    fresh.round_trip(1).await;
    fresh.close().await;
    bystander.finish().await;
    within("proxy shutdown", proxy.shutdown()).await;
    ending
}

macro_rules! abuse_tests {
    ($($name:ident: $abuse:expr => $code:expr;)*) => {
        mod through_proxy {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
    if support::skip_live() {
        return;
    }
                    let ending = through_proxy($abuse).await;
                    assert_eq!(ending.code(), $code, "{ending:?}");
                }
            )*
        }
        mod direct_rabbitmq {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
    if support::skip_live() {
        return;
    }
                    let ending = commit(rabbit_addr(), $abuse).await;
                    assert_eq!(ending.code(), $code, "{ending:?}");
                }
            )*
        }
    };
}

abuse_tests! {
    garbage_instead_of_a_frame_is_501_frame_error: Abuse::Garbage => 501;
    bad_frame_end_octet_is_501_frame_error: Abuse::BadFrameEnd => 501;
    frame_larger_than_frame_max_is_501_frame_error: Abuse::OversizedFrame => 501;
    method_on_unopened_channel_is_504_channel_error: Abuse::UnopenedChannel => 504;
    content_header_without_method_is_505_unexpected_frame: Abuse::HeaderWithoutMethod => 505;
    content_body_without_method_is_505_unexpected_frame: Abuse::BodyWithoutMethod => 505;
    method_inside_content_is_505_unexpected_frame: Abuse::MethodInsideContent => 505;
    content_header_of_wrong_class_is_505_unexpected_frame: Abuse::HeaderOfWrongClass => 505;
    channel_open_twice_is_504_channel_error: Abuse::ChannelOpenTwice => 504;
    channel_method_on_channel_zero_is_504_channel_error: Abuse::ChannelMethodOnChannelZero => 504;
    connection_method_on_a_channel_is_503_command_invalid: Abuse::ConnectionMethodOnChannel => 503;
    unknown_frame_type_is_501_frame_error: Abuse::UnknownFrameType => 501;
}

/// Abuses where RabbitMQ 3.10 does not answer with the spec's code (or at all); the proxy does.
mod spec_codes_where_rabbitmq_differs {
    use super::*;

    macro_rules! proxy_only {
        ($($(#[$doc:meta])* $name:ident: $abuse:expr => $code:expr;)*) => {$(
            $(#[$doc])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
    if support::skip_live() {
        return;
    }
                let ending = through_proxy($abuse).await;
                assert_eq!(ending.code(), $code, "{ending:?}");
            }
        )*};
    }

    proxy_only! {
        /// RabbitMQ takes no notice; a body longer than its header announced is an unexpected frame.
        body_longer_than_its_header_is_505_unexpected_frame: Abuse::BodyOverflow => 505;
        /// The spec (4.2.7): "a peer that receives an invalid heartbeat frame MUST raise a
        /// connection exception with reply code 501"; RabbitMQ answers 505.
        heartbeat_on_a_channel_is_501_frame_error: Abuse::HeartbeatOnChannel => 501;
        /// channel-max is "the highest channel number" allowed; RabbitMQ counts open channels
        /// instead and opens channel 11 of a connection that negotiated 10.
        channel_above_channel_max_is_530_not_allowed: Abuse::ChannelAboveMax => 530;
        /// RabbitMQ answers 501 too ("cannot decode"); see `CodecError::reply_code`.
        truncated_method_arguments_are_501_frame_error: Abuse::TruncatedMethod => 501;
        /// RabbitMQ's connection process exits and drops the socket without a close.
        unknown_field_value_type_is_501_frame_error: Abuse::UnknownFieldType => 501;
    }
}

/// The close for a method on an unopened channel names the offending method, as RabbitMQ's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_on_unopened_channel_close_matches_rabbitmq() {
    if support::skip_live() {
        return;
    }
    let direct = commit(rabbit_addr(), Abuse::UnopenedChannel).await;
    let proxied = through_proxy(Abuse::UnopenedChannel).await;
    assert_eq!(proxied, direct);
}

/// RabbitMQ has no reply code for an unknown method id: its connection process exits and the
/// socket is closed without a connection.close. The proxy must end the connection the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_id_is_answered_with_503_command_invalid() {
    if support::skip_live() {
        return;
    }
    // RabbitMQ's connection process crashes on an unknown method and drops the socket without a
    // reason; the proxy names the problem with the spec's code instead (503 COMMAND_INVALID).
    let direct = commit(rabbit_addr(), Abuse::UnknownMethod).await;
    assert!(
        matches!(direct, Ending::Eof | Ending::Close(_)),
        "RabbitMQ: {direct:?}"
    );
    let proxied = through_proxy(Abuse::UnknownMethod).await;
    match proxied {
        Ending::Close(c) => assert_eq!(c.code, 503, "proxy: {c:?}"),
        other => panic!("expected connection.close 503 from the proxy, got {other:?}"),
    }
}

/// Sends a protocol header other than AMQP 0-9-1's; returns everything the server sent until it
/// closed the socket.
async fn wrong_header(addr: SocketAddr) -> Vec<u8> {
    let mut raw = RawClient::connect(addr).await;
    raw.send(b"AMQP\x01\x01\x00\x0a").await; // AMQP 0-10
    let mut got = Vec::new();
    // RabbitMQ resets the socket after writing its header: keep what arrived before the error.
    let mut buf = [0u8; 64];
    loop {
        match within(
            "the server to close after a wrong protocol header",
            raw.stream.read(&mut buf),
        )
        .await
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_is_answered_with_amqp_0_9_1_header_then_closed() {
    if support::skip_live() {
        return;
    }
    let direct = wrong_header(rabbit_addr()).await;
    assert_eq!(direct, codec::PROTOCOL_HEADER, "RabbitMQ's answer");
    let proxy = start_proxy("").await;
    let mut bystander = Bystander::start(proxy.amqp_addr()).await;
    let proxied = wrong_header(proxy.amqp_addr()).await;
    assert_eq!(
        proxied,
        codec::PROTOCOL_HEADER,
        "the proxy's answer: {:?}",
        String::from_utf8_lossy(&proxied)
    );
    bystander.assert_progress(20).await;
    bystander.finish().await;
    within("proxy shutdown", proxy.shutdown()).await;
}

/// A content is buffered until it is complete, and AMQP lets a client interleave contents of
/// several channels: their sum is bounded by `max_message_size` too, or 2047 channels could each
/// hold a maximal message in the proxy. The content that would cross the bound is refused on its
/// channel (406, as for one message too large), and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_contents_above_max_message_size_refuse_the_later_channel() {
    if support::skip_live() {
        return;
    }
    const MAX: usize = 1 << 20;
    const SIZE: usize = 700 * 1024;
    let proxy = start_proxy(&format!("[limits]\nmax_message_size = {MAX}\n")).await;
    let mut raw = RawClient::open(proxy.amqp_addr(), Login::default()).await;
    let queue = unique("interleaved");
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    let declared = raw
        .call(
            1,
            &Method::QueueDeclare(codec::QueueDeclare {
                queue: queue.as_str().try_into().unwrap(),
                ..Default::default()
            }),
        )
        .await;
    assert!(
        matches!(declared, Method::QueueDeclareOk(_)),
        "{declared:?}"
    );

    let start = |ch: u16, size: usize| publish_start(ch, &queue, size as u64);
    let body = |ch: u16, size: usize| {
        let mut out = BytesMut::new();
        codec::write_body(&mut out, ch, &vec![ch as u8; size], 131_072);
        out
    };
    let get = Method::BasicGet(codec::BasicGet {
        queue: queue.as_str().try_into().unwrap(),
        no_ack: true,
        ..Default::default()
    });
    // Both messages are on the wire in full (as a client writes them) before any answer.
    raw.send(&start(1, SIZE)).await;
    raw.send(&start(2, SIZE)).await;
    raw.send(&body(2, SIZE)).await;
    match raw.read_method().await {
        (2, Method::ChannelClose(c)) => {
            assert_eq!(c.reply_code, 406, "{c:?}");
            assert!(
                c.reply_text.as_str().contains("in progress"),
                "{}",
                c.reply_text.as_str()
            );
        }
        (ch, m) => panic!("expected channel.close 406 on channel 2, got {m:?} on {ch}"),
    }
    raw.send_method(2, &Method::ChannelCloseOk(Default::default()))
        .await;
    // Channel 1's message completes and is published whole.
    raw.send(&body(1, SIZE)).await;
    raw.send_method(1, &get).await;
    let (_, got, _) = raw.read_delivery().await;
    assert_eq!(got, vec![1u8; SIZE], "channel 1's message");
    // Its share is free again: the refused channel, reopened, publishes a maximal message.
    raw.open_channel(2).await;
    raw.send(&start(2, MAX)).await;
    raw.send(&body(2, MAX)).await;
    raw.send_method(2, &get).await;
    let (_, got, _) = raw.read_delivery().await;
    assert_eq!(got.len(), MAX, "channel 2's maximal message");
    let deleted = raw
        .call(
            2,
            &Method::QueueDelete(codec::QueueDelete {
                queue: queue.as_str().try_into().unwrap(),
                ..Default::default()
            }),
        )
        .await;
    assert!(matches!(deleted, Method::QueueDeleteOk(_)), "{deleted:?}");
    raw.close().await;
    within("proxy shutdown", proxy.shutdown()).await;
}
