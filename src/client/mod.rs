//! The client side: one task per client connection.
//!
//! [`handshake`] terminates the client's AMQP handshake (the proxy is the server here);
//! [`session`] runs the connection once it is open; [`channel`] holds the per-channel state that
//! makes several upstream channels look like one (delivery tags, publisher confirms, consumers).

pub mod channel;
pub mod handshake;
pub mod session;

pub use session::serve;
