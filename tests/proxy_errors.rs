//! Errors a user sees: refused logins, and channel errors raised by the broker or by the proxy,
//! which close one channel and leave the connection (and its other channels) working.

#[macro_use]
mod support;

use std::net::SocketAddr;

use amqprs::channel::{BasicAckArguments, QueueDeclareArguments};
use amqprs::security::SecurityCredentials;
use support::*;
use warren::codec::{self, Method};

against_proxy_and_rabbitmq!(
    ack_with_unknown_delivery_tag_closes_only_that_channel_with_406,
    broker_channel_close_reaches_the_client_with_code_and_text,
);

/// Runs a raw handshake with `login` and returns how the server refused it.
async fn refusal(addr: SocketAddr, login: Login) -> CloseInfo {
    let mut raw = RawClient::connect(addr).await;
    match raw.handshake(&login).await {
        Ok(_) => panic!("{addr} accepted the login {login:?}"),
        Err(Ending::Close(c)) => c,
        Err(Ending::Eof) => panic!("{addr} dropped the socket instead of sending connection.close"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_with_403_access_refused() {
    if support::skip_live() {
        return;
    }
    let proxy = start_proxy("").await;
    let login = || Login {
        password: "not-the-password".into(),
        ..Default::default()
    };
    let direct = refusal(rabbit_addr(), login()).await;
    let proxied = refusal(proxy.amqp_addr(), login()).await;
    assert_eq!(direct.code, 403, "RabbitMQ: {direct:?}");
    assert_eq!(proxied.code, 403, "proxy: {proxied:?}");
    assert!(proxied.text.starts_with("ACCESS_REFUSED"), "{proxied:?}");
    assert_eq!(
        proxied.text, direct.text,
        "the proxy should pass RabbitMQ's reason on"
    );

    // amqprs does not advertise authentication_failure_close: RabbitMQ then just drops the
    // socket. Either way the client must get an error, not a connection.
    for addr in [rabbit_addr(), proxy.amqp_addr()] {
        let r = try_connect(addr, |a| {
            a.credentials(SecurityCredentials::new_plain("guest", "not-the-password"));
        })
        .await;
        assert!(r.is_err(), "{addr} accepted a wrong password");
    }
    // The proxy still serves correct logins.
    close_connection(connect(proxy.amqp_addr()).await).await;
    within("proxy shutdown", proxy.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_refused_with_530_not_allowed() {
    if support::skip_live() {
        return;
    }
    let proxy = start_proxy("").await;
    let vhost = unique("no-such-vhost");
    let login = || Login {
        vhost: vhost.clone(),
        ..Default::default()
    };
    let direct = refusal(rabbit_addr(), login()).await;
    let proxied = refusal(proxy.amqp_addr(), login()).await;
    assert_eq!(direct.code, 530, "RabbitMQ: {direct:?}");
    assert_eq!(
        proxied, direct,
        "the proxy should refuse exactly as RabbitMQ does"
    );
    assert_eq!(
        proxied.text,
        format!("NOT_ALLOWED - vhost {vhost} not found")
    );

    for addr in [rabbit_addr(), proxy.amqp_addr()] {
        let err = try_connect(addr, |a| {
            a.virtual_host(&vhost);
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("{addr} accepted an unknown vhost"));
        assert!(err.to_string().contains("reply_code: 530"), "{addr}: {err}");
    }
    within("proxy shutdown", proxy.shutdown()).await;
}

async fn ack_with_unknown_delivery_tag_closes_only_that_channel_with_406(addr: SocketAddr) {
    let conn = connect(addr).await;
    let (bystander, _ev) = open_channel(&conn).await;
    let q = unique("q");
    declare_queue(&bystander, &q).await;
    let (ch, mut events) = open_channel(&conn).await;

    ch.basic_ack(BasicAckArguments::new(42, false))
        .await
        .unwrap();
    let (code, text) = events.expect_close().await;
    assert_eq!(
        (code, text.as_str()),
        (406, "PRECONDITION_FAILED - unknown delivery tag 42")
    );

    // The connection and its other channels are unaffected; new channels open.
    assert!(conn.is_open());
    publish(&bystander, "", &q, b"still working").await;
    assert_eq!(
        get(&bystander, &q, true).await.expect("message").body,
        b"still working"
    );
    let (fresh, mut fresh_events) = open_channel(&conn).await;
    publish(&fresh, "", &q, b"new channel").await;
    assert_eq!(
        get(&fresh, &q, true).await.expect("message").body,
        b"new channel"
    );
    // A real tag from a fresh delivery is accepted on the new channel.
    publish(&fresh, "", &q, b"acked").await;
    let got = get(&fresh, &q, false).await.expect("message");
    fresh
        .basic_ack(BasicAckArguments::new(got.tag, false))
        .await
        .unwrap();
    assert_eq!(queue_counts(&fresh, &q).await, (0, 0));
    assert!(fresh_events.try_next().is_none());
    delete_queue(&fresh, &q).await;
    close_connection(conn).await;
}

async fn broker_channel_close_reaches_the_client_with_code_and_text(addr: SocketAddr) {
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let missing = unique("missing");
    let r = ch
        .queue_declare(QueueDeclareArguments::new(&missing).passive(true).finish())
        .await;
    assert!(
        r.is_err(),
        "passive declare of a missing queue succeeded: {r:?}"
    );
    let (code, text) = events.expect_close().await;
    assert_eq!(code, 404);
    assert_eq!(
        text,
        format!("NOT_FOUND - no queue '{missing}' in vhost '/'")
    );

    // The connection survives: a new channel works.
    let (ch2, mut events2) = open_channel(&conn).await;
    let q = unique("q");
    declare_queue(&ch2, &q).await;
    publish(&ch2, "", &q, b"after the channel error").await;
    assert_eq!(
        get(&ch2, &q, true).await.expect("message").body,
        b"after the channel error"
    );
    assert!(events2.try_next().is_none());
    let (ch3, _events3) = open_channel(&conn).await;
    assert_eq!(queue_counts(&ch3, &q).await, (0, 0));
    delete_queue(&ch3, &q).await;
    close_connection(conn).await;

    // The closed channel's number can be opened again at once (raw client: amqprs does not reuse
    // numbers), and works.
    let mut raw = RawClient::open(addr, Login::default()).await;
    raw.open_channel(1).await;
    let passive = codec::QueueDeclare {
        queue: missing.as_str().try_into().unwrap(),
        passive: true,
        ..Default::default()
    };
    match raw.call(1, &Method::QueueDeclare(passive)).await {
        Method::ChannelClose(c) => {
            assert_eq!(c.reply_code, 404);
            assert_eq!(
                c.reply_text,
                format!("NOT_FOUND - no queue '{missing}' in vhost '/'").as_str()
            );
            assert_eq!(
                (c.class_id, c.method_id),
                (50, 10),
                "the close names queue.declare"
            );
        }
        m => panic!("expected channel.close, got {m:?}"),
    }
    raw.send_method(1, &Method::ChannelCloseOk(Default::default()))
        .await;
    raw.open_channel(1).await;
    raw.round_trip(1).await;
    raw.close().await;
}

/// A stream (x-queue-type=stream) cannot be spread over clusters: its offsets would differ per
/// cluster. warren refuses the declare with 540 saying so, and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_a_stream_is_refused_with_540_saying_why() {
    if support::skip_live() {
        return;
    }
    let proxy = start_proxy("").await;
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    let mut args = amqprs::FieldTable::new();
    args.insert(
        "x-queue-type".try_into().expect("key"),
        amqprs::FieldValue::S("stream".try_into().expect("value")),
    );
    let name = unique("stream");
    let r = ch
        .queue_declare(
            QueueDeclareArguments::new(&name)
                .durable(true)
                .arguments(args)
                .finish(),
        )
        .await;
    assert!(r.is_err(), "a stream was declared through warren: {r:?}");
    let (code, text) = events.expect_close().await;
    assert_eq!(code, 540, "{text}");
    assert!(text.contains("x-queue-type=stream"), "{text}");
    let (ch2, _e2) = open_channel(&conn).await;
    let q = unique("q");
    declare_queue(&ch2, &q).await;
    delete_queue(&ch2, &q).await;
    within("proxy shutdown", proxy.shutdown()).await;
}
