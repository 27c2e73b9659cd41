//! Issue 6, item 3: `rabbitmqctl list_connections` on a cluster identifies a proxied client.
//!
//! Behind warren, every connection a broker sees comes from warren's address: RabbitMQ's `name`,
//! `peer_host` and `peer_port` columns describe warren's side of the link, not the client. The
//! client is identified by the link's **client properties**: warren passes on those the client
//! sent (its `connection_name`, `product`, ...) and adds `client_address`, the client's
//! `IP:port` as warren saw it. A client that sends no `connection_name` (py-amqp, hence Celery,
//! does not) gets `warren client IP:port` (`upstream::link::upstream_client_properties`). So
//!
//! ```text
//! rabbitmqctl list_connections name client_properties
//! ```
//!
//! run on any node of a cluster shows, for each proxied client, its name and its address.
//!
//! The client's own address is read from the kernel (`/proc/net/tcp`), not from warren, so the
//! test shows that what RabbitMQ lists is really the client's end of its socket.

mod support;

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::Value;
use support::*;

/// The columns asked of `rabbitmqctl list_connections`.
const COLUMNS: [&str; 4] = ["name", "client_properties", "peer_host", "peer_port"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_connections_shows_a_proxied_clients_connection_name_and_address() {
    if support::skip_live() {
        return;
    }
    let proxy = start_proxy("").await;
    let name = unique("identity");
    let conn = try_connect(proxy.amqp_addr(), |args| {
        args.connection_name(&name);
    })
    .await
    .unwrap_or_else(|e| panic!("cannot connect through the proxy: {e}"));
    let client = client_end_of_connection_to(proxy.amqp_addr());

    let entry = connection_listed_with("connection_name", &name).await;
    assert_eq!(
        property(&entry, "client_address"),
        Some(client.to_string()),
        "RabbitMQ should list the client's own address for connection {name:?}: {entry}"
    );
    // The client's other properties pass through unchanged.
    assert_eq!(property(&entry, "product"), Some("AMQPRS".to_owned()));

    // What an operator sees: one line of the plain listing carries both.
    let line = listing_line_with(&format!("\"connection_name\",\"{name}\"")).await;
    assert!(
        line.contains(&format!("\"client_address\",\"{client}\"")),
        "the list_connections line of {name:?} does not show client_address {client}: {line}"
    );
    eprintln!(
        "rabbitmqctl list_connections {}:\n{line}",
        COLUMNS.join(" ")
    );

    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
}

/// py-amqp (so Celery) sends no `connection_name`: warren names the connection after the client's
/// address, so it can still be told apart from the others in `list_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_connection_name_is_listed_under_its_address() {
    if support::skip_live() {
        return;
    }
    let proxy = start_proxy("").await;
    // RawClient's start-ok carries `product` and `capabilities` only, as py-amqp's does.
    let raw = RawClient::open(proxy.amqp_addr(), Login::default()).await;
    let client = raw.stream.local_addr().expect("client socket address");

    let entry = connection_listed_with("client_address", &client.to_string()).await;
    assert_eq!(
        property(&entry, "connection_name"),
        Some(format!("warren client {client}")),
        "{entry}"
    );
    assert_eq!(
        property(&entry, "product"),
        Some("warren raw test client".to_owned())
    );

    drop(raw);
    within("proxy shutdown", proxy.shutdown()).await;
}

/// `rabbitmqctl list_connections` (JSON) on shard-a, polled until a connection whose client
/// property `key` is `value` shows up; returns that connection's entry.
async fn connection_listed_with(key: &str, value: &str) -> Value {
    eventually(
        &format!("a connection with client property {key} = {value:?} on shard-a"),
        || async {
            let out = tokio::task::block_in_place(|| {
                let mut args = vec!["-q", "list_connections"];
                args.extend(COLUMNS);
                args.extend(["--formatter", "json"]);
                rabbit_ctl("shard-a-1", &args)
            });
            let list: Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("list_connections is not JSON ({e}): {out}"));
            list.as_array()?
                .iter()
                .find(|c| property(c, key).as_deref() == Some(value))
                .cloned()
        },
    )
    .await
}

/// The line of the plain `rabbitmqctl list_connections` output that contains `needle`.
async fn listing_line_with(needle: &str) -> String {
    eventually(
        &format!("a list_connections line containing {needle}"),
        || async {
            let out = tokio::task::block_in_place(|| {
                let mut args = vec!["-q", "list_connections", "--no-table-headers"];
                args.extend(COLUMNS);
                rabbit_ctl("shard-a-1", &args)
            });
            out.lines().find(|l| l.contains(needle)).map(str::to_owned)
        },
    )
    .await
}

/// A client property of a `list_connections --formatter json` entry, where
/// `client_properties` is a list of `[key, type, value]`; strings only.
fn property(entry: &Value, key: &str) -> Option<String> {
    entry["client_properties"]
        .as_array()?
        .iter()
        .find(|p| p[0] == key)
        .and_then(|p| p[2].as_str())
        .map(str::to_owned)
}

/// The local address of this process's one established TCP connection to `server` (an IPv4
/// listener on this machine), from `/proc/net/tcp`.
fn client_end_of_connection_to(server: SocketAddr) -> SocketAddr {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let found: Vec<SocketAddr> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            // 01 = ESTABLISHED
            (*state == "01" && parse_proc_addr(remote)? == server)
                .then(|| parse_proc_addr(local))
                .flatten()
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one established connection to {server} in /proc/net/tcp, found {found:?}"
    );
    found[0]
}

/// `0100007F:1F90` (address as the kernel's native-endian hex of the network-order u32, port in
/// host order) -> 127.0.0.1:8080.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::from((Ipv4Addr::from(u32::from_be(ip)), port)))
}

#[test]
#[cfg(target_endian = "little")]
fn proc_net_tcp_addresses_are_decoded() {
    assert_eq!(
        parse_proc_addr("0100007F:1F90"),
        Some("127.0.0.1:8080".parse().unwrap())
    );
}
