//! When a link's bytes may wait: the broker's confirms of publishes the client did not ask to
//! have confirmed are read late, in batches.
//!
//! Why: warren holds every publish until its cluster confirms it (so a link that dies loses
//! nothing), which puts every upstream channel in confirm mode, even when the client's own
//! channel is not. The broker answers each publish with a basic.ack of 21 bytes a moment later.
//! Read at once, each ack costs the connection's thread a wake-up, an `epoll_wait` and a
//! `recvfrom`: on a connection that only publishes, as much again as the publish itself. Nobody
//! waits for those acks; they only free held memory. So while nothing on a connection waits for
//! its links (no consumer, no request in flight, no confirm or transaction channel, no close,
//! held memory under half its bound), a link with publishes outstanding raises its socket's
//! low-water mark ([`crate::io::rcvlowat`]): the acks wait in the kernel, and the session reads
//! them in one go on its first turn [`CONFIRM_READ_DELAY`] after it last read the link (its
//! timer makes sure of a read [`BACKSTOP`] after the last), or as soon as
//! [`LAZY_LOWAT`](crate::upstream::link::LAZY_LOWAT) bytes have come. End of stream and errors
//! wake the session whatever the mark, so a link's death is seen at once.
//!
//! A link stays lazy from one batch to the next, and turns prompt again only when a read finds
//! nothing and nothing is left unconfirmed (the burst is over) or the connection starts to
//! watch its links: each switch is a system call, and switching on every batch cost more than
//! the batching saved.
//!
//! Why the backstop is not the read delay itself: a tokio timer that fires is out of the timer
//! wheel, and setting it again (sooner than anything else on the thread) wakes the driver
//! through its eventfd, on top of the timer's own wake-up. An active client's turns read
//! the link every [`CONFIRM_READ_DELAY`]; the timer is there for a client gone quiet, and
//! the longer it is, the fewer of those wake-ups an active one pays for.
//!
//! What a client could notice: what the broker says unasked on such a link (a channel closed
//! for a publish to a missing exchange, a basic.return, connection.blocked) reaches it up to
//! [`BACKSTOP`] later than it would have. Replies, deliveries and confirms the client asked
//! for are never delayed: their channels make the connection read at once.

use std::time::Duration;

use tokio::time::Instant;

use super::Session;
use super::link_slot::{LinkSlot, UpState};
use crate::client::channel::{Channel, ChannelState};
use crate::upstream::LinkId;

/// How long confirms nobody waits for may stay unread.
pub(super) const CONFIRM_READ_DELAY: Duration = Duration::from_millis(5);

/// How long a lazy link may go unread when the client is quiet.
pub(super) const BACKSTOP: Duration = Duration::from_millis(20);

/// Fewer unconfirmed publishes than this on a prompt link: keep reading its acks at once. A
/// publisher that sends a message now and then gains nothing from waiting, and would pay two
/// socket options per message.
const MIN_UNCONFIRMED: usize = 2;

impl Session {
    /// Raises or lowers each link's low-water mark for this turn of the event loop, and reads
    /// the lazy links whose delay is over: an active client's turns do it, so the timer is
    /// only the backstop of a quiet one. Returns when the timer must fire, if a link is lazy.
    /// Reads the clock only while a link is lazy or becomes so.
    pub(super) fn pace_link_reads(&mut self) -> Option<Instant> {
        let unwatched = self.links_unwatched();
        let mut now: Option<Instant> = None;
        let mut next: Option<Instant> = None;
        for link in 0..self.links.len() {
            let slot = &mut self.links[link];
            let unconfirmed = if unwatched { slot.unconfirmed() } else { None };
            let Some(reader) = slot.link.reader.as_mut() else {
                continue;
            };
            let Some(unconfirmed) = unconfirmed else {
                reader.make_prompt();
                continue;
            };
            let read_at = match reader.lazy_read_at() {
                Some(at) => {
                    let now = *now.get_or_insert_with(Instant::now);
                    if now < at + CONFIRM_READ_DELAY {
                        at
                    } else if self.read_lazy_link(link, now) {
                        now
                    } else {
                        continue;
                    }
                }
                None if unconfirmed >= MIN_UNCONFIRMED => {
                    let now = *now.get_or_insert_with(Instant::now);
                    if !reader.make_lazy(now) {
                        continue;
                    }
                    now
                }
                None => continue,
            };
            let due = read_at + BACKSTOP;
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        next
    }

    /// The session's timer came for its lazy links (the client was quiet): reads each whose
    /// delay is over.
    pub(super) fn read_lazy_links(&mut self, now: Instant) {
        for link in 0..self.links.len() {
            let due = self.links[link]
                .link
                .reader
                .as_ref()
                .and_then(|r| r.lazy_read_at())
                .is_some_and(|at| now >= at + CONFIRM_READ_DELAY);
            if due {
                self.read_lazy_link(link, now);
            }
        }
    }

    /// Reads what waits on lazy link `link` and handles it; makes the link prompt again when
    /// the read found nothing and nothing is left unconfirmed. Returns whether it is still
    /// lazy.
    fn read_lazy_link(&mut self, link: LinkId, now: Instant) -> bool {
        let Some(reader) = self.links[link].link.reader.as_mut() else {
            return false;
        };
        let idle = match reader.read_now(now) {
            Ok(0) => true,
            Ok(_) => {
                self.on_link_readable(link, Ok(()));
                false
            }
            Err(reason) => {
                self.on_link_down(link, reason);
                return false;
            }
        };
        let Some(slot) = self.links.get_mut(link) else {
            return false;
        };
        let over = idle && slot.unconfirmed().unwrap_or(0) == 0;
        let Some(reader) = slot.link.reader.as_mut() else {
            return false;
        };
        if over {
            reader.make_prompt();
        }
        reader.lazy_read_at().is_some()
    }

    /// Nothing on this connection waits for what its links say, but the confirms of the
    /// publishes warren holds.
    fn links_unwatched(&self) -> bool {
        self.hold_publishes
            && self.end.is_none()
            && self.closing.is_none()
            && self.eof_drain.is_none()
            && self.parked.is_empty()
            && !self.input_stalled
            && self.held.used() < self.held_limit / 2
            && self.shared.held.has_room()
            && self.channels.iter().flatten().all(Channel::publishes_only)
            && !self.input_paused()
    }
}

impl Channel {
    /// An open channel that only publishes, without confirms or a transaction: nothing it
    /// expects comes from a link.
    fn publishes_only(&self) -> bool {
        self.state == ChannelState::Open
            && self.consumers.is_empty()
            && self.confirms.is_none()
            && !self.tx
            && self.rpcs.is_empty()
            && self.held.is_empty()
            && self.notices.is_empty()
            && self.failing.is_none()
            && self.tags.outstanding() == 0
    }
}

impl LinkSlot {
    /// How many of this link's publishes wait for confirms; `None` when the link must be read
    /// at once: it is not serving, or an upstream channel is opening, closing or waiting for a
    /// reply.
    fn unconfirmed(&self) -> Option<usize> {
        if !self.serving() {
            return None;
        }
        let mut unconfirmed = 0;
        for chan in &self.chans {
            let settled = matches!(chan.state, UpState::Open | UpState::Closed)
                && chan.pending.is_empty()
                && chan.reopen.is_none()
                && chan.tx_swap.is_none();
            if !settled {
                return None;
            }
            unconfirmed += chan.confirms.pending();
        }
        Some(unconfirmed)
    }
}
