mod support;
use support::*;
use std::time::Instant;
use warren::codec::{self, Method};

async fn run(addr: std::net::SocketAddr, what: &str) -> String {
    let mut c = RawClient::open(addr, Login::default()).await;
    let t = Instant::now();
    match what {
        "garbage" => c.send(b"GARBAGE GARBAGE GARBAGE!").await,
        "badend" => { let mut f = frame(1, 0, &[0,10,0,51]); *f.last_mut().unwrap() = 0xAB; c.send(&f).await }
        "oversized" => { c.open_channel(1).await; c.send(&frame(3, 1, &vec![0u8; 200_000])).await }
        "nochannel" => c.send_method(5, &Method::QueueDeclare(Default::default())).await,
        "header_no_method" => { c.open_channel(1).await; c.send(&frame(2, 1, &[0,60,0,0,0,0,0,0,0,0,0,5,0,0])).await }
        "body_no_method" => { c.open_channel(1).await; c.send(&frame(3, 1, b"hello")).await }
        "unknown_method" => { c.open_channel(1).await; c.send(&frame(1, 1, &[0,60,0,99])).await }
        "unknown_class" => { c.open_channel(1).await; c.send(&frame(1, 1, &[0,30,0,10])).await }
        "unknown_method_ch0" => { c.send(&frame(1, 0, &[0,10,0,99])).await }
        "heartbeat_ch1" => { c.send(&frame(8, 1, &[])).await }
        "silent" => {}
        _ => unreachable!(),
    }
    let e = c.read_until_close().await;
    format!("{what}: {e:?} after {:?}", t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe() {
    let proxy = start_proxy("").await;
    for what in ["garbage","badend","oversized","nochannel","header_no_method","body_no_method","unknown_method","unknown_class","unknown_method_ch0","heartbeat_ch1"] {
        println!("RABBIT {}", run(rabbit_addr(), what).await);
        println!("PROXY  {}", run(proxy.amqp_addr(), what).await);
    }
    // wrong header
    for addr in [rabbit_addr(), proxy.amqp_addr()] {
        let mut c = RawClient::connect(addr).await;
        c.send(b"AMQP\x01\x01\x00\x0a").await;
        let mut buf = vec![];
        use tokio::io::AsyncReadExt;
        c.stream.read_to_end(&mut buf).await.unwrap();
        println!("HEADER {addr}: {:?}", bytes::Bytes::from(buf));
    }
    for (u,p,v) in [("guest","wrong","/"),("guest","guest","nope")] {
        for addr in [rabbit_addr(), proxy.amqp_addr()] {
            let mut c = RawClient::connect(addr).await;
            let r = c.handshake(&Login{user:u.into(),password:p.into(),vhost:v.into(),..Default::default()}).await;
            println!("LOGIN {addr} {u}/{p}/{v}: {r:?}");
        }
    }
    let _ = codec::FRAME_END;
}
