//! TLS on both legs, with rustls and its `ring` crypto provider.
//!
//! Certificates and keys are read once, when the configuration is parsed: a [`ServerTls`] (the
//! `[tls]` listener) or a [`ClientTls`] (a cluster's `tls = { ... }`) holds a ready rustls
//! configuration behind an `Arc`, so a handshake touches no file and a configuration reload picks
//! up renewed files. Both compare equal only when their settings *and* the bytes of their files
//! are the same, so a reload with a renewed certificate at the same path counts as a change.
//!
//! The crypto provider is always passed explicitly ([`provider`]); nothing depends on a
//! process-wide default provider being installed.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The crypto provider of every TLS configuration warren builds (`ring`).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Which setting a [`LoadError`] is about (the configuration points at that key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `cert_file`: the certificate chain.
    Cert,
    /// `key_file`: the private key.
    Key,
    /// `client_ca_file` (listener) or `ca_file` (cluster): the trusted CA certificates.
    Ca,
    /// `server_name` (cluster).
    ServerName,
}

/// Why a TLS setting cannot be used: unreadable file, no PEM item of the right kind, a key that
/// does not match its certificate...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub setting: Setting,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LoadError {}

fn fail<T>(setting: Setting, message: String) -> Result<T, LoadError> {
    Err(LoadError { setting, message })
}

/// The inbound amqps listener: `[tls]`.
#[derive(Clone)]
pub struct ServerTls {
    /// Address of the amqps listener.
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca_file: Option<PathBuf>,
    acceptor: TlsAcceptor,
    digest: u64,
}

impl ServerTls {
    /// Reads the files and builds the rustls server configuration.
    pub fn load(
        listen: SocketAddr,
        cert_file: PathBuf,
        key_file: PathBuf,
        client_ca_file: Option<PathBuf>,
    ) -> Result<ServerTls, LoadError> {
        let mut digest = DefaultHasher::new();
        let certs = read_certs(&cert_file, Setting::Cert, &mut digest)?;
        let key = read_key(&key_file, &mut digest)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| LoadError {
                setting: Setting::Cert,
                message: format!("TLS provider: {e}"),
            })?;
        let builder = match &client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = read_roots(ca, &mut digest)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .or_else(|e| {
                            fail(
                                Setting::Ca,
                                format!("{}: cannot verify clients with it: {e}", ca.display()),
                            )
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .or_else(|e| key_error(&cert_file, &key_file, e))?;
        Ok(ServerTls {
            listen,
            cert_file,
            key_file,
            client_ca_file,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            digest: digest.finish(),
        })
    }

    /// Runs the server side of TLS handshakes with these settings.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Clients must present a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.client_ca_file.is_some()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.listen == other.listen
            && self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.client_ca_file == other.client_ca_file
            && self.digest == other.digest
    }
}

impl Eq for ServerTls {}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("listen", &self.listen)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_ca_file", &self.client_ca_file)
            .finish()
    }
}

/// amqps toward the nodes of one cluster: `tls = { ca_file = ..., ... }`.
#[derive(Clone)]
pub struct ClientTls {
    /// CA certificates the nodes' certificates must chain to.
    pub ca_file: PathBuf,
    /// Name checked against the nodes' certificates; `None`: each node's own host.
    pub server_name: Option<String>,
    /// Client certificate chain and key (mutual TLS), both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    connector: TlsConnector,
    name: Option<ServerName<'static>>,
    digest: u64,
}

impl ClientTls {
    /// Reads the files and builds the rustls client configuration.
    pub fn load(
        ca_file: PathBuf,
        server_name: Option<String>,
        client_cert: Option<(PathBuf, PathBuf)>,
    ) -> Result<ClientTls, LoadError> {
        let name = match &server_name {
            None => None,
            Some(n) => match ServerName::try_from(n.clone()) {
                Ok(name) => Some(name),
                Err(_) => {
                    return fail(
                        Setting::ServerName,
                        format!(
                            "invalid server_name \"{n}\": expected a DNS name or an IP address"
                        ),
                    );
                }
            },
        };
        let mut digest = DefaultHasher::new();
        let roots = read_roots(&ca_file, &mut digest)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| LoadError {
                setting: Setting::Ca,
                message: format!("TLS provider: {e}"),
            })?
            .with_root_certificates(roots);
        let config = match &client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let certs = read_certs(cert_file, Setting::Cert, &mut digest)?;
                let key = read_key(key_file, &mut digest)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .or_else(|e| key_error(cert_file, key_file, e))?
            }
        };
        let (cert_file, key_file) = client_cert.unzip();
        Ok(ClientTls {
            ca_file,
            server_name,
            cert_file,
            key_file,
            connector: TlsConnector::from(Arc::new(config)),
            name,
            digest: digest.finish(),
        })
    }

    /// Runs the client side of TLS handshakes with these settings.
    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    /// The name a node's certificate must carry: `server_name`, else the node's host.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, String> {
        match &self.name {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host.to_owned()).map_err(|_| {
                format!("\"{host}\" is not a valid TLS server name: set tls.server_name")
            }),
        }
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.server_name == other.server_name
            && self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.digest == other.digest
    }
}

impl Eq for ClientTls {}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Whether `host` can be checked against a certificate as it is (a DNS name or an IP address).
pub fn valid_server_name(host: &str) -> bool {
    ServerName::try_from(host).is_ok()
}

fn read(path: &Path, setting: Setting, digest: &mut DefaultHasher) -> Result<Vec<u8>, LoadError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            path.hash(digest);
            bytes.hash(digest);
            Ok(bytes)
        }
        Err(e) => fail(setting, format!("cannot read {}: {e}", path.display())),
    }
}

fn pem_problem(path: &Path, e: &pem::Error) -> String {
    format!("{}: not a valid PEM file: {e}", path.display())
}

/// A PEM certificate chain (leaf first).
fn read_certs(
    path: &Path,
    setting: Setting,
    digest: &mut DefaultHasher,
) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let bytes = read(path, setting, digest)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .or_else(|e| fail(setting, pem_problem(path, &e)))?;
    if certs.is_empty() {
        return fail(
            setting,
            format!(
                "{}: no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\")",
                path.display()
            ),
        );
    }
    Ok(certs)
}

/// A PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
fn read_key(path: &Path, digest: &mut DefaultHasher) -> Result<PrivateKeyDer<'static>, LoadError> {
    let bytes = read(path, Setting::Key, digest)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => fail(
            Setting::Key,
            format!(
                "{}: no private key found (expected PEM \"BEGIN PRIVATE KEY\" (PKCS#8), \
                 \"BEGIN RSA PRIVATE KEY\" (PKCS#1) or \"BEGIN EC PRIVATE KEY\" (SEC1))",
                path.display()
            ),
        ),
        Err(e) => fail(Setting::Key, pem_problem(path, &e)),
    }
}

/// PEM CA certificates, as trust anchors.
fn read_roots(path: &Path, digest: &mut DefaultHasher) -> Result<RootCertStore, LoadError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, Setting::Ca, digest)? {
        if let Err(e) = roots.add(cert) {
            return fail(
                Setting::Ca,
                format!("{}: not a usable CA certificate: {e}", path.display()),
            );
        }
    }
    Ok(roots)
}

/// Certificate and key were read but rustls refuses them together.
fn key_error<T>(cert_file: &Path, key_file: &Path, e: rustls::Error) -> Result<T, LoadError> {
    let message = match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{}: the private key does not match the certificate in {}",
            key_file.display(),
            cert_file.display()
        ),
        other => format!("{}: unusable private key: {other}", key_file.display()),
    };
    fail(Setting::Key, message)
}
