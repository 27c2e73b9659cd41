//! warren: an AMQP 0-9-1 proxy that makes several RabbitMQ clusters look like one broker.
//!
//! The `src/` tree follows the path a message takes:
//! `proxy` accepts a socket, `client` terminates the client's AMQP session,
//! `upstream` owns the links to the RabbitMQ clusters, `codec` turns bytes into frames and back,
//! and `io` holds the bounded write buffers that give back-pressure in both directions.

pub mod addr;
pub mod admin;
pub mod backoff;
pub mod client;
pub mod clients;
pub mod config;
pub mod evacuate;
pub mod health;
pub mod held;
pub mod io;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod server_routes;
pub mod single_active;
pub mod state;
pub mod tls;
pub mod topology;
pub mod upstream;

pub use proxy::{ProxyHandle, start};
/// AMQP 0-9-1 framing and methods: the `warren-codec` crate (`crates/codec`), under the name
/// the rest of warren uses.
pub use warren_codec as codec;
