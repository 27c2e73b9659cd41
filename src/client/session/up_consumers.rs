//! The consumers subscribed on one upstream channel, as that channel's broker sees them.
//!
//! A client may cancel a consumer and at once subscribe a new one with the same tag, so a tag
//! alone does not say which consumer a broker's method is about. The broker handles a
//! channel's methods in order and has at most one consumer of a tag at a time, so the entries
//! here are kept in the order warren subscribed them and each method from the broker is about
//! the oldest consumer of its tag still alive there. What makes that exact is remembering, for
//! each entry, whether warren has sent its cancel: a broker's basic.cancel crossing that cancel
//! (its queue went meanwhile) ends the old consumer, and the cancel-ok RabbitMQ still sends for
//! the tag it no longer knows must end that same consumer, not the new one behind it.

use crate::codec::ShortStr;

/// Where one consumer is in its life on the upstream channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Subscribed; no cancel sent.
    Live,
    /// warren sent its basic.cancel; the cancel-ok is on the way, deliveries may come first.
    CancelSent,
    /// The broker cancelled it (its queue was deleted) after warren's cancel went out: nothing
    /// more is delivered for it, and the cancel-ok that still comes ends it here.
    AwaitingCancelOk,
}

#[derive(Debug)]
struct Entry {
    tag: ShortStr,
    no_ack: bool,
    ending: Ending,
}

/// The consumers subscribed on an upstream channel, oldest first.
#[derive(Debug, Default)]
pub(super) struct UpConsumers {
    entries: Vec<Entry>,
}

impl UpConsumers {
    /// The oldest consumer of `tag` whose ending is one `of` accepts.
    fn oldest(&self, tag: &[u8], of: impl Fn(Ending) -> bool) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| of(e.ending) && e.tag.as_bytes() == tag)
    }

    /// warren sent a basic.consume for `tag`.
    pub(super) fn subscribed(&mut self, tag: &ShortStr, no_ack: bool) {
        self.entries.push(Entry {
            tag: tag.clone(),
            no_ack,
            ending: Ending::Live,
        });
    }

    /// warren sent a basic.cancel for `tag`: it ends the oldest consumer of the tag that no
    /// cancel was sent for yet.
    pub(super) fn cancel_sent(&mut self, tag: &[u8]) {
        if let Some(i) = self.oldest(tag, |e| e == Ending::Live) {
            self.entries[i].ending = Ending::CancelSent;
        }
    }

    /// The broker's cancel-ok for `tag`: the oldest consumer of the tag whose cancel was sent
    /// has ended.
    pub(super) fn cancel_ok(&mut self, tag: &[u8]) {
        if let Some(i) = self.oldest(tag, |e| e != Ending::Live) {
            self.entries.remove(i);
        }
    }

    /// The broker sent basic.cancel for `tag` (the consumer's queue went). Returns whether the
    /// client must hear of it: `false` when warren had already sent that consumer's cancel (the
    /// client's own cancel, or warren's), whose cancel-ok is still to come and settles it.
    pub(super) fn cancelled_by_broker(&mut self, tag: &[u8]) -> bool {
        let Some(i) = self.oldest(tag, |e| e != Ending::AwaitingCancelOk) else {
            return true;
        };
        match self.entries[i].ending {
            Ending::CancelSent => {
                self.entries[i].ending = Ending::AwaitingCancelOk;
                false
            }
            _ => {
                self.entries.remove(i);
                true
            }
        }
    }

    /// Whether the consumer a delivery with `tag` is for takes it without acks: the oldest
    /// consumer of the tag the broker may still deliver for. `None` for a tag not subscribed.
    pub(super) fn no_ack_of(&self, tag: &[u8]) -> Option<bool> {
        self.oldest(tag, |e| e != Ending::AwaitingCancelOk)
            .map(|i| self.entries[i].no_ack)
    }

    /// How many consumers the broker may still deliver for, for tests.
    #[cfg(test)]
    fn delivering(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.ending != Ending::AwaitingCancelOk)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[u8] = b"t";

    fn tag() -> ShortStr {
        ShortStr::from_static("t")
    }

    /// The client cancels a no_ack consumer and subscribes a new one, with acks, under the same
    /// tag; the first one's queue is deleted before the broker sees the cancel. The broker's
    /// basic.cancel and the cancel-ok it then sends for an unknown tag both end the old
    /// consumer; the new one goes on, and its deliveries keep their ack mode.
    #[test]
    fn a_cancel_crossing_the_brokers_ends_the_old_consumer_not_the_new_one() {
        let mut c = UpConsumers::default();
        c.subscribed(&tag(), true);
        c.cancel_sent(T);
        c.subscribed(&tag(), false);
        assert_eq!(
            c.no_ack_of(T),
            Some(true),
            "the old one delivers until it ends"
        );
        assert!(!c.cancelled_by_broker(T), "the client already ended it");
        assert_eq!(c.no_ack_of(T), Some(false));
        c.cancel_ok(T);
        assert_eq!(
            c.no_ack_of(T),
            Some(false),
            "the new consumer is still there"
        );
        assert_eq!(c.delivering(), 1);
        assert!(
            c.cancelled_by_broker(T),
            "the new consumer's own cancel is news"
        );
        assert_eq!(c.no_ack_of(T), None);
    }

    /// Without a crossing: the cancel-ok ends the old consumer, and a later basic.cancel is the
    /// new one's.
    #[test]
    fn a_cancel_ok_ends_the_consumer_it_was_sent_for() {
        let mut c = UpConsumers::default();
        c.subscribed(&tag(), true);
        c.cancel_sent(T);
        c.subscribed(&tag(), false);
        c.cancel_ok(T);
        assert_eq!(c.no_ack_of(T), Some(false));
        assert!(c.cancelled_by_broker(T));
        assert_eq!(c.delivering(), 0);
        assert!(c.entries.is_empty());
    }

    /// A broker's basic.cancel of a consumer no cancel was sent for is news, and ends it.
    #[test]
    fn a_brokers_cancel_of_a_live_consumer_is_news() {
        let mut c = UpConsumers::default();
        c.subscribed(&tag(), false);
        c.subscribed(&ShortStr::from_static("u"), true);
        assert!(c.cancelled_by_broker(T));
        assert_eq!(c.no_ack_of(T), None);
        assert_eq!(c.no_ack_of(b"u"), Some(true));
        assert!(
            c.cancelled_by_broker(b"nobody"),
            "unknown tags pass on as before"
        );
    }

    /// Two cancels of one tag in flight, the first crossed by the broker's cancel: each
    /// cancel-ok ends one consumer, oldest first.
    #[test]
    fn cancel_oks_end_consumers_oldest_first() {
        let mut c = UpConsumers::default();
        c.subscribed(&tag(), true);
        c.cancel_sent(T);
        c.subscribed(&tag(), false);
        c.cancel_sent(T);
        c.subscribed(&tag(), true);
        assert!(!c.cancelled_by_broker(T));
        c.cancel_ok(T);
        assert_eq!(c.no_ack_of(T), Some(false));
        c.cancel_ok(T);
        assert_eq!(c.no_ack_of(T), Some(true));
        assert_eq!(c.entries.len(), 1);
    }
}
