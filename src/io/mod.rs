//! Socket plumbing shared by both legs of the proxy.
//!
//! Each socket has one reader (owned by the task that understands the protocol) and one
//! [`Outbox`] drained by a dedicated writer task. The outbox is bounded in bytes: producers check
//! [`Outbox::has_room`] before they read more input, which is how back-pressure travels from a slow
//! peer on one leg to the socket of the other leg. A socket is plain TCP or TLS ([`Stream`]).

pub mod command;
pub mod outbox;
pub mod stream;

pub use command::{Assembler, Command, Content};
pub use outbox::{Outbox, run_writer};
pub use stream::Stream;
