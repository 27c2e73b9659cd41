mod support;
use support::*;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe() {
    let proxy = start_proxy("").await;
    for addr in [rabbit_addr(), proxy.amqp_addr()] {
        let mut c = RawClient::open(addr, Login { heartbeat: 1, ..Default::default() }).await;
        let t = Instant::now();
        let e = c.read_until_close().await;
        println!("SILENT {addr}: {e:?} after {:?}, heartbeats {}", t.elapsed(), c.heartbeats);
        let r = try_connect(addr, |a| { a.credentials(amqprs::security::SecurityCredentials::new_plain("guest", "bad")); }).await;
        println!("AMQPRS {addr}: {:?}", r.err());
        let r = try_connect(addr, |a| { a.virtual_host("nope"); }).await;
        println!("AMQPRS {addr}: {:?}", r.err());
    }
}
