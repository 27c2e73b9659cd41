//! Socket plumbing shared by both legs of the proxy.
//!
//! Each socket has one reader (owned by the task that understands the protocol) and one
//! [`Outbox`], written by that same task when it flushes and by a writer task for what the
//! socket could not take at once. The outbox is bounded in bytes: producers check
//! [`Outbox::has_room`] before they read more input, which is how back-pressure travels from a slow
//! peer on one leg to the socket of the other leg. A socket is plain TCP or TLS ([`Stream`]).

pub mod busy_poll;
pub mod command;
pub mod gate;
pub mod outbox;
pub mod rcvlowat;
pub mod read_buf;
pub mod stream;
pub mod workers;

pub use command::{Assembler, Command, Content};
pub use gate::Gate;
pub use outbox::Outbox;
pub use stream::Stream;
pub use workers::Workers;
