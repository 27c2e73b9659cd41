//! A broker node's address, `host:port`: parsed from the configuration, used by the sockets
//! (io) and the links (upstream). Its own module so that those import neither the other nor the
//! configuration.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// A broker node address, `host:port`. `host` is a host name, an IPv4 address, or an IPv6
/// address stored *without* brackets (so `(host.as_str(), port)` can be passed to
/// `TcpStream::connect`); [`fmt::Display`] puts the brackets back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a string is not a valid [`NodeAddr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddrError(String);

impl fmt::Display for NodeAddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NodeAddrError {}

impl FromStr for NodeAddr {
    type Err = NodeAddrError;

    /// Accepts `host:port`, `1.2.3.4:port` and `[ipv6]:port`; the port must be 1..=65535.
    fn from_str(s: &str) -> Result<NodeAddr, NodeAddrError> {
        let fail = |why: String| {
            Err(NodeAddrError(format!(
                "invalid node address \"{s}\": {why}"
            )))
        };
        if s.is_empty() {
            return fail("expected \"host:port\"".into());
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((host, port)) = rest.split_once("]:") else {
                return fail("expected \"[ipv6-address]:port\"".into());
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return fail(format!("\"{host}\" is not an IPv6 address"));
            }
            (host, port)
        } else {
            let Some((host, port)) = s.rsplit_once(':') else {
                return fail("missing port, expected \"host:port\"".into());
            };
            if host.contains(':') {
                return fail("IPv6 addresses must be in brackets, e.g. \"[::1]:5672\"".into());
            }
            if host.is_empty() {
                return fail("empty host, expected \"host:port\"".into());
            }
            if let Some(c) = host
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
            {
                return fail(format!("character {c:?} is not allowed in a host name"));
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(0) => return fail("port 0 is not allowed, expected 1 to 65535".into()),
            Ok(p) => p,
            Err(_) => return fail(format!("bad port \"{port}\", expected 1 to 65535")),
        };
        Ok(NodeAddr {
            host: host.to_owned(),
            port,
        })
    }
}
