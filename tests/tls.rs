//! TLS on both legs: the `[tls]` listener and a cluster's `tls = { ... }`.
//!
//! * An amqprs client over amqps through the proxy's TLS listener to a RabbitMQ node that speaks
//!   only amqps and wants the proxy's client certificate: declare, publish, consume. The plain
//!   listener keeps working beside it; the admin's health probes and queue depths reach the node
//!   over TLS too.
//! * `client_ca_file`: a client with a certificate of that CA gets in; one with a certificate of
//!   another CA, or none, is refused at the TLS handshake.
//! * The TLS handshake counts against the handshake timeout; a reload picks up new certificate
//!   files.
//! * Unreadable or invalid certificate files are rejected by `Config::parse` and `warren check`
//!   with file:line:column, the path and the reason.
//!
//! The certificates are made for each run with rcgen. The RabbitMQ node is started with
//! `scripts/rabbit.sh up-single-tls` in a state dir of its own and stopped at the end.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::tls::TlsAdaptor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use warren::ProxyHandle;
use warren::config::{Config, NodeAddr};

use support::*;

// ---------------------------------------------------------------------------------------------
// Certificates

/// A throw-away PKI in a directory of its own:
/// `ca.pem`; `server.pem` + `server.key` (SANs `localhost` and `127.0.0.1`) and `client.pem` +
/// `client.key`, both signed by that CA; `other-ca.pem` with `other-client.pem` +
/// `other-client.key` signed by it; `other-server.pem` + `other-server.key` (signed by the other
/// CA, for the reload test).
struct Pki {
    dir: PathBuf,
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate signed by `ca`: (certificate PEM, PKCS#8 key PEM).
fn leaf(
    ca: &Issuer<'static, KeyPair>,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        let (ca_pem, ca) = new_ca("warren test CA");
        let (other_pem, other) = new_ca("another CA");
        pki.write("ca.pem", &ca_pem);
        pki.write("other-ca.pem", &other_pem);
        let server = |ca: &Issuer<'static, KeyPair>| {
            leaf(
                ca,
                "localhost",
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        };
        let client = |ca: &Issuer<'static, KeyPair>, name: &str| {
            leaf(ca, name, &[], ExtendedKeyUsagePurpose::ClientAuth)
        };
        for (file, (cert, key)) in [
            ("server", server(&ca)),
            ("client", client(&ca, "warren test client")),
            ("other-server", server(&other)),
            ("other-client", client(&other, "stranger")),
        ] {
            pki.write(&format!("{file}.pem"), &cert);
            pki.write(&format!("{file}.key"), &key);
        }
        pki
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).unwrap();
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path as a TOML string value.
    fn toml(&self, file: &str) -> String {
        format!("{:?}", self.path(file).to_str().unwrap())
    }

    /// A TLS client trusting `ca`, presenting `client` (a `NAME` with NAME.pem and NAME.key).
    fn connector(&self, ca: &str, client: Option<&str>) -> TlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path(ca)).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let certs = CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            }
        };
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Starts a proxy with this configuration text on the test proxies' runtime.
async fn start_proxy_toml(text: &str) -> ProxyHandle {
    init_tracing();
    let config = Config::parse(text, "test-proxy.toml")
        .unwrap_or_else(|e| panic!("test proxy config rejected: {e}\n{text}"));
    let started = proxy_runtime().spawn(async move { warren::start(Arc::new(config)).await });
    within("the proxy to start", started)
        .await
        .expect("proxy start task")
        .expect("start the proxy")
}

/// `[tls]` with the PKI's server certificate, and `extra` lines in it.
fn tls_section(pki: &Pki, extra: &str) -> String {
    format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\n{extra}\n",
        pki.toml("server.pem"),
        pki.toml("server.key")
    )
}

/// An amqprs connection over amqps (guest/guest), checking the proxy's certificate for
/// `localhost`.
async fn amqps(addr: SocketAddr, connector: TlsConnector) -> Result<Connection, String> {
    let mut args =
        OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest");
    args.tls_adaptor(TlsAdaptor::new(connector, "localhost".into()));
    within(
        &format!("amqps connection to {addr}"),
        Connection::open(&args),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Declare, publish (a small and a 3 MiB message), consume on a fresh queue.
async fn round_trip(conn: &Connection, label: &str) {
    let (ch, _events) = open_channel(conn).await;
    let queue = unique(label);
    declare_queue(&ch, &queue).await;
    let body = format!("over tls: {label}");
    publish(&ch, "", &queue, body.as_bytes()).await;
    // Several TLS records and frames each way, through both legs' write buffers.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    publish(&ch, "", &queue, &big).await;
    let (_tag, mut rx) = consume(&ch, &queue, false).await;
    let d = next_delivery(&mut rx).await;
    assert_eq!(d.body, body.as_bytes(), "{label}");
    let d = next_delivery(&mut rx).await;
    assert!(
        d.body == big,
        "{label}: the 3 MiB message came back changed"
    );
    delete_queue(&ch, &queue).await;
}

/// A raw TLS client: the TLS handshake, then the AMQP protocol header. `Ok` when the proxy
/// answers with a frame on channel 0 (connection.start), else the error seen.
async fn amqp_header_over_tls(addr: SocketAddr, connector: &TlsConnector) -> Result<(), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = within("TLS handshake", connector.connect(name, tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 7];
    within("connection.start", tls.read_exact(&mut head))
        .await
        .map_err(|e| format!("read: {e}"))?;
    if head[0] == 1 && head[1..3] == [0, 0] {
        Ok(())
    } else {
        Err(format!("not a method frame on channel 0: {head:?}"))
    }
}

/// GET `path` of the admin endpoint, as JSON.
async fn admin_get(addr: SocketAddr, path: &str) -> Value {
    within(&format!("GET {path}"), async {
        let mut s = TcpStream::connect(addr).await.expect("connect to admin");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (_, body) = text.split_once("\r\n\r\n").expect("HTTP answer");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON from {path}: {e}: {body}"))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Through a TLS-only RabbitMQ node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_on_both_legs() {
    if support::skip_live() {
        return;
    }
    init_tracing();
    let pki = Pki::new("both-legs");
    // The node wants a client certificate: links, health probes and queue depths all show theirs.
    let dir = pki.dir.clone();
    let rabbit = tokio::task::spawn_blocking(move || PrivateCluster::start_tls("tls", &dir, true))
        .await
        .expect("start the TLS node");
    let node = rabbit.cluster.nodes[0].clone();
    let upstream = format!(
        "[[clusters]]\nname = \"secure\"\nrole = \"shard\"\nnodes = [\"{node}\"]\n\
         tls = {{ ca_file = {}, cert_file = {}, key_file = {} }}\n",
        pki.toml("ca.pem"),
        pki.toml("client.pem"),
        pki.toml("client.key")
    );

    // The node speaks only amqps: a plain probe gets nowhere.
    let node_addr: NodeAddr = node.parse().unwrap();
    let plain = warren::health::read_start(&node_addr, None).await;
    assert!(plain.is_err(), "plain AMQP to the TLS-only node: {plain:?}");

    // 1. No client certificates on the proxy's listener.
    let proxy = start_proxy_toml(&format!(
        "listen = \"127.0.0.1:0\"\n{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [timeouts]\nshutdown_grace_ms = 100\n\n{upstream}",
        tls_section(&pki, "")
    ))
    .await;
    let tls_addr = proxy.tls_addr().expect("the amqps listener");
    assert_ne!(tls_addr, proxy.amqp_addr());

    let conn = amqps(tls_addr, pki.connector("ca.pem", None))
        .await
        .expect("amqps through the proxy");
    round_trip(&conn, "amqps-client").await;

    // The plain listener keeps working beside it (its links are amqps all the same).
    let plain_conn = connect(proxy.amqp_addr()).await;
    round_trip(&plain_conn, "plain-client").await;
    close_connection(plain_conn).await;

    // Queue depths: passive declares over a TLS link with the probe credentials.
    let (ch, _events) = open_channel(&conn).await;
    let queue = unique("depth");
    declare_queue(&ch, &queue).await;
    publish(&ch, "", &queue, b"1").await;
    publish(&ch, "", &queue, b"2").await;
    let admin = proxy.admin_addr().unwrap();
    let depth = eventually("/queues to count 2 messages over TLS", || async {
        let v = admin_get(admin, &format!("/queues?queue={queue}")).await;
        let q = v["queues"][0].clone();
        (q["messages"] == 2).then_some(q)
    })
    .await;
    assert_eq!(depth["clusters"][0]["status"], "ok", "{depth}");
    delete_queue(&ch, &queue).await;
    close_connection(conn).await;

    // Health probes: connection.start read over TLS.
    let probed = eventually("the health probe to reach the node over TLS", || async {
        let v = admin_get(admin, "/clusters").await;
        let n = v["clusters"][0]["nodes"][0].clone();
        (n["state"] == "up").then_some(n)
    })
    .await;
    assert_eq!(probed["product"], "RabbitMQ", "{probed}");
    within("proxy shutdown", proxy.shutdown()).await;

    // 2. client_ca_file: only clients with a certificate of that CA get in.
    let proxy = start_proxy_toml(&format!(
        "listen = \"127.0.0.1:0\"\n{}\n[timeouts]\nshutdown_grace_ms = 100\n\n{upstream}",
        tls_section(&pki, &format!("client_ca_file = {}", pki.toml("ca.pem")))
    ))
    .await;
    let tls_addr = proxy.tls_addr().unwrap();
    let conn = amqps(tls_addr, pki.connector("ca.pem", Some("client")))
        .await
        .expect("a client with a certificate of client_ca_file");
    round_trip(&conn, "verified-client").await;
    close_connection(conn).await;

    for (who, client) in [
        ("a certificate of another CA", Some("other-client")),
        ("no certificate", None),
    ] {
        let connector = pki.connector("ca.pem", client);
        let refused = amqps(tls_addr, connector.clone()).await;
        assert!(refused.is_err(), "amqprs with {who} got in");
        // Refused by TLS itself: an alert instead of connection.start.
        let err = amqp_header_over_tls(tls_addr, &connector)
            .await
            .expect_err(&format!("a client with {who} got connection.start"));
        assert!(
            err.contains("alert") || err.contains("handshake"),
            "{who}: want a TLS alert, got: {err}"
        );
    }
    // The plain listener does not ask for certificates (it is not TLS).
    let plain_conn = connect(proxy.amqp_addr()).await;
    close_connection(plain_conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    drop(rabbit);
}

// ---------------------------------------------------------------------------------------------
// Listener behaviour (no broker needed: the TLS and AMQP handshakes end before any link)

/// Upstream that refuses connections: the proxy still answers the handshake up to open.
const NO_BROKER: &str = "[[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:1\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_checked_at_the_tls_handshake() {
    if support::skip_live() {
        return;
    }
    let pki = Pki::new("client-certs");
    let proxy = start_proxy_toml(&format!(
        "listen = \"127.0.0.1:0\"\n{}\n[timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 500\n\n{NO_BROKER}",
        tls_section(&pki, &format!("client_ca_file = {}", pki.toml("ca.pem")))
    ))
    .await;
    let addr = proxy.tls_addr().unwrap();
    amqp_header_over_tls(addr, &pki.connector("ca.pem", Some("client")))
        .await
        .expect("a client certificate of client_ca_file is accepted");
    for client in [Some("other-client"), None] {
        let err = amqp_header_over_tls(addr, &pki.connector("ca.pem", client))
            .await
            .expect_err("refused");
        assert!(err.contains("alert"), "{client:?}: {err}");
    }
    // A client that does not trust the proxy's CA stops by itself.
    let err = amqp_header_over_tls(addr, &pki.connector("other-ca.pem", Some("client")))
        .await
        .expect_err("the proxy's certificate is not from other-ca");
    assert!(err.contains("handshake"), "{err}");
    within("proxy shutdown", proxy.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_counts_against_the_handshake_timeout() {
    if support::skip_live() {
        return;
    }
    let pki = Pki::new("timeout");
    let proxy = start_proxy_toml(&format!(
        "listen = \"127.0.0.1:0\"\n{}\n[timeouts]\nshutdown_grace_ms = 100\nhandshake_ms = 300\n\n{NO_BROKER}",
        tls_section(&pki, "")
    ))
    .await;
    // A client that opens the socket and never starts TLS is dropped at the handshake timeout.
    let mut silent = TcpStream::connect(proxy.tls_addr().unwrap()).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = within("the proxy to drop a silent client", silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the socket to close, got {read:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "dropped after {waited:?}"
    );
    // TLS done, AMQP never started: dropped too.
    let tcp = TcpStream::connect(proxy.tls_addr().unwrap()).await.unwrap();
    let mut tls = pki
        .connector("ca.pem", None)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let read = within("the proxy to drop a silent TLS client", tls.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "got {read:?}");
    within("proxy shutdown", proxy.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_picks_up_new_certificate_files() {
    let pki = Pki::new("reload");
    let live = pki.dir.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |name: &str| {
        for ext in ["pem", "key"] {
            std::fs::copy(
                pki.path(&format!("{name}.{ext}")),
                live.join(format!("server.{ext}")),
            )
            .unwrap();
        }
    };
    install("server");
    // Relative paths: relative to the configuration file's directory.
    let path = pki.dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n[tls]\nlisten = \"127.0.0.1:0\"\n\
             cert_file = \"live/server.pem\"\nkey_file = \"live/server.key\"\n\
             [timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 500\n\n{NO_BROKER}"
        ),
    )
    .unwrap();
    init_tracing();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let proxy = within(
        "the proxy to start",
        proxy_runtime().spawn(async move { warren::start(Arc::new(config)).await }),
    )
    .await
    .unwrap()
    .unwrap();
    proxy.shared().set_config_path(&path);
    let addr = proxy.tls_addr().unwrap();
    let trusts_first = pki.connector("ca.pem", None);
    let trusts_other = pki.connector("other-ca.pem", None);
    amqp_header_over_tls(addr, &trusts_first).await.unwrap();
    assert!(amqp_header_over_tls(addr, &trusts_other).await.is_err());

    // Renewed files at the same paths: a reload serves them to the next clients.
    install("other-server");
    let status = proxy
        .shared()
        .reload()
        .expect("reload with new certificates");
    assert!(
        status.message.contains("certificates reloaded"),
        "{status:?}"
    );
    amqp_header_over_tls(addr, &trusts_other).await.unwrap();
    assert!(amqp_header_over_tls(addr, &trusts_first).await.is_err());

    // A broken file is rejected; the running certificates stay.
    std::fs::write(live.join("server.key"), "not a key\n").unwrap();
    let rejected = proxy
        .shared()
        .reload()
        .expect_err("reload with a broken key");
    assert!(
        rejected.message.contains("tls.key_file") && rejected.message.contains("no private key"),
        "{rejected:?}"
    );
    amqp_header_over_tls(addr, &trusts_other).await.unwrap();
    within("proxy shutdown", proxy.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// Invalid files: Config::parse and `warren check`

/// `Config::parse` fails; returns the error as displayed.
fn parse_fails(text: &str) -> String {
    match Config::parse(text, "t.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_certificate_files_are_rejected_with_path_and_reason() {
    let pki = Pki::new("bad-files");
    pki.write("garbage.pem", "hello\n");
    let missing = pki.path("missing.pem");
    let with_extra = |cert: &str, key: &str, extra: &str| {
        format!(
            "listen = \"127.0.0.1:5673\"\n[tls]\nlisten = \"127.0.0.1:5671\"\n\
             cert_file = {cert}\nkey_file = {key}\n{extra}\n{NO_BROKER}"
        )
    };
    let server = |cert: &str, key: &str| with_extra(cert, key, "");

    let e = parse_fails(&server(&format!("{missing:?}"), &pki.toml("server.key")));
    assert!(
        e.starts_with("t.toml:4:13: tls.cert_file: cannot read ")
            && e.contains(missing.to_str().unwrap())
            && e.contains("No such file"),
        "{e}"
    );
    let e = parse_fails(&server(&pki.toml("garbage.pem"), &pki.toml("server.key")));
    assert!(
        e.starts_with("t.toml:4:13: tls.cert_file: ") && e.contains("no certificate found"),
        "{e}"
    );
    let e = parse_fails(&server(&pki.toml("server.pem"), &pki.toml("server.pem")));
    assert!(
        e.starts_with("t.toml:5:12: tls.key_file: ") && e.contains("no private key found"),
        "{e}"
    );
    let e = parse_fails(&server(&pki.toml("server.pem"), &pki.toml("client.key")));
    assert!(
        e.starts_with("t.toml:5:12: tls.key_file: ")
            && e.contains("does not match the certificate"),
        "{e}"
    );
    let e = parse_fails(&with_extra(
        &pki.toml("server.pem"),
        &pki.toml("server.key"),
        &format!("client_ca_file = {}\n", pki.toml("garbage.pem")),
    ));
    assert!(
        e.starts_with("t.toml:6:18: tls.client_ca_file: ") && e.contains("no certificate found"),
        "{e}"
    );
    let e = parse_fails(&format!(
        "listen = \"127.0.0.1:5673\"\n[tls]\nlisten = \"127.0.0.1:5671\"\n\n{NO_BROKER}"
    ));
    assert!(
        e.starts_with("t.toml:2:1: [tls] is missing required key `cert_file`"),
        "{e}"
    );

    // A cluster's tls.
    let cluster = |tls: &str| {
        format!(
            "listen = \"127.0.0.1:5673\"\n[[clusters]]\nname = \"a\"\nrole = \"shard\"\n\
             nodes = [\"127.0.0.1:5671\"]\ntls = {{ {tls} }}\n"
        )
    };
    let e = parse_fails(&cluster(&format!("ca_file = {missing:?}")));
    assert!(
        e.starts_with("t.toml:6:19: cluster \"a\": tls.ca_file: cannot read ")
            && e.contains(missing.to_str().unwrap()),
        "{e}"
    );
    let e = parse_fails(&cluster(&format!(
        "ca_file = {}, cert_file = {}",
        pki.toml("ca.pem"),
        pki.toml("client.pem")
    )));
    assert!(e.contains("tls.cert_file needs tls.key_file"), "{e}");
    let e = parse_fails(&cluster("server_name = \"rabbit\""));
    assert!(e.contains("missing required key `ca_file`"), "{e}");
    let e = parse_fails(&cluster(&format!(
        "ca_file = {}, server_name = \"not a name\"",
        pki.toml("ca.pem")
    )));
    assert!(e.contains("tls.server_name: invalid server_name"), "{e}");
    let e = parse_fails(&cluster(&format!(
        "ca_file = {}, sever_name = \"x\"",
        pki.toml("ca.pem")
    )));
    assert!(e.contains("unknown key `sever_name`"), "{e}");

    // And valid files are accepted.
    let ok = Config::parse(
        &cluster(&format!(
            "ca_file = {}, cert_file = {}, key_file = {}, server_name = \"localhost\"",
            pki.toml("ca.pem"),
            pki.toml("client.pem"),
            pki.toml("client.key")
        )),
        "t.toml",
    )
    .unwrap();
    let tls = ok.clusters[0].tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("localhost"));
}

#[test]
fn warren_check_reports_an_unreadable_certificate() {
    let pki = Pki::new("check");
    let missing = pki.path("nope.pem");
    let path = pki.path("bad.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:5673\"\n\n[tls]\nlisten = \"127.0.0.1:5671\"\n\
             cert_file = {missing:?}\nkey_file = {}\n\n{NO_BROKER}",
            pki.toml("server.key")
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{}:5:13: tls.cert_file: cannot read {}: No such file",
            path.display(),
            missing.display()
        )),
        "{stderr}"
    );

    // Fixed: accepted.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace(&format!("{missing:?}"), &pki.toml("server.pem")),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
