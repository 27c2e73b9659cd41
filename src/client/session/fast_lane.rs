//! The fast lane: a delivery or publisher confirm from a link, handled without decoding it.
//!
//! Why: nearly everything a busy link sends is one of the two, and nearly always on a channel
//! in its plainest state: open on both sides, nothing held back, no consumer waiting for its
//! consume-ok. Then a delivery goes to the client exactly as it came but for its delivery tag,
//! which [`codec::peek`] locates: its bytes are copied to the client's outbox in one piece and
//! the tag patched in place, instead of being split into frames, decoded, assembled and encoded
//! again (more than half of what warren spent per delivered message). A confirm needs only its
//! tag and flags.
//!
//! The lane takes a command only where the general path ([`Session::on_link_command`]) would do
//! exactly the same with it: every condition the general path checks before a delivery or a
//! confirm is checked here too, and anything else (a channel opening or closing, a held
//! delivery, a direct reply-to address to mark, a reply consumer, a link being removed, a
//! closing connection) leaves the command to the general path.

use super::reply_to::names_direct_reply;
use super::*;
use crate::codec::peek::{Delivery, Peeked};

impl Session {
    /// Handles the delivery or confirm at the front of `link`'s read buffer, if the fast lane
    /// may. Returns false when it did nothing: the general path takes the next command.
    pub(super) fn fast_lane(&mut self, link: LinkId) -> bool {
        if self.closing.is_some() {
            return false;
        }
        let Some(reader) = self.links[link].link.reader.as_ref() else {
            return false;
        };
        match reader.peek(self.frame_max) {
            Some(Peeked::Confirm(c)) => {
                if !self.plain_channel(link, c.channel) {
                    return false;
                }
                if let Some(reader) = self.links[link].link.reader.as_mut() {
                    reader.consume(c.len);
                }
                self.confirm(link, c.channel, c.delivery_tag, c.multiple, c.ack);
                true
            }
            Some(Peeked::Delivery(d)) => self.fast_deliver(link, &d),
            None => false,
        }
    }

    /// Both sides of channel `ch` are open, and not a side channel of another.
    fn plain_channel(&self, link: LinkId, ch: u16) -> bool {
        let up = self.links[link].chans.get(usize::from(ch));
        up.is_some_and(|up| up.state == UpState::Open && up.side_for.is_none())
            && self
                .channels
                .get(usize::from(ch))
                .and_then(Option::as_ref)
                .is_some_and(|c| c.state == ChannelState::Open)
    }

    /// [`Session::deliver_tagged`] for a delivery still in `link`'s read buffer.
    fn fast_deliver(&mut self, link: LinkId, d: &Delivery) -> bool {
        if !self.plain_channel(link, d.channel) || self.links[link].removed_at.is_some() {
            return false;
        }
        let link_ref = self.link_ref(link);
        let slot = &mut self.links[link];
        let Some(reader) = slot.link.reader.as_mut() else {
            return false;
        };
        let bytes = reader.buffered();
        if names_direct_reply(&bytes[d.header.clone()]) {
            return false;
        }
        let Some(channel) = channel_in(&mut self.channels, d.channel) else {
            return false;
        };
        if from_cluster::must_hold(channel) || channel.recovered_on(link) {
            return false;
        }
        // The general path's questions, asked the same way (an unknown tag included).
        let consumer_tag = &bytes[d.consumer_tag.clone()];
        let up = slot.chans.get(usize::from(d.channel));
        let needs_ack = !from_cluster::delivery_no_ack(up, channel, consumer_tag);
        if !needs_ack && channel.consumes_replies(consumer_tag) {
            return false;
        }
        let tag = channel.tags.issue(link_ref, d.delivery_tag, needs_ack);
        slot.m.deliveries.inc();
        if needs_ack {
            slot.m.unacked.inc();
        }
        let command = &bytes[..d.len];
        let tag_at = d.delivery_tag_at;
        self.client_out.push(|buf| {
            let at = buf.len();
            buf.extend_from_slice(command);
            buf[at + tag_at..at + tag_at + 8].copy_from_slice(&tag.to_be_bytes());
        });
        reader.consume(d.len);
        true
    }
}
