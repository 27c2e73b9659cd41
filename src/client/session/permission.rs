//! The client's configure permission on a queue, asked of a cluster before warren answers a
//! request about the queue itself.
//!
//! RabbitMQ checks that a user may configure a queue before anything else about a
//! queue.declare or queue.delete: a user without the permission gets 403 ACCESS_REFUSED,
//! whatever the queue is or holds. warren answers some of these requests on its own: a
//! conditional delete after its check over every cluster (405 for another connection's
//! exclusive queue, 406 for a queue not empty or in use), a conditional delete of a quorum
//! queue (540), a stream declare (540). Answered so, a user without the permission would get
//! warren's refusal instead of the broker's 403.
//!
//! So before such an answer, one cluster is asked, on a channel of warren's own, with a
//! queue.declare that RabbitMQ refuses after its permission check and can never carry out: its
//! `x-dead-letter-exchange` argument is a number, not an exchange name. A queue that exists
//! fails the equivalence check (406, or 405 if it is another connection's exclusive queue); a
//! missing one fails the argument's check before anything is created (406). 403 means the
//! permission is missing, and the client gets that refusal; any other answer means it is
//! there, and warren's own answer follows. Permissions are the clusters' own and the same on
//! each (docs/operations.md), so one cluster's answer stands for all.
//!
//! The check is queued as a request of the client's channel ahead of warren's answer, and the
//! client's input waits for it, so nothing the client sent behind the request overtakes it.

use super::*;

use crate::client::channel::{OwnRefusal, PermissionCheck};

/// The `x-dead-letter-exchange` value of the check: a number where RabbitMQ wants a name.
const NOT_AN_EXCHANGE: codec::FieldValue = codec::FieldValue::I64(0);

/// The declare that asks whether the user may configure `queue`, changing nothing.
fn probe(queue: &ShortStr) -> Method {
    let mut arguments = codec::FieldTable::default();
    arguments.insert(
        ShortStr::from_static("x-dead-letter-exchange"),
        NOT_AN_EXCHANGE,
    );
    Method::QueueDeclare(codec::QueueDeclare {
        queue: queue.clone(),
        arguments,
        ..Default::default()
    })
}

impl Session {
    /// Asks a cluster whether the client may configure `queue` before warren answers
    /// `request` (on client channel `ch`) itself: with `then`, warren's refusal, given once the
    /// permission is confirmed; without, the requests queued behind go on. Returns false when
    /// no check was queued (the channel is not open, no cluster is linked, or no channel
    /// number is free): the caller answers at once, as it would without the check.
    pub(super) fn check_configure_permission(
        &mut self,
        ch: u16,
        queue: &ShortStr,
        request: &Method,
        then: Option<OwnRefusal>,
    ) -> bool {
        // A client cannot declare an `amq.` name (RabbitMQ refuses it before the permission),
        // so the check could not ask about one.
        if queue.as_bytes().starts_with(b"amq.") {
            return false;
        }
        let Some(link) = self.live_links().iter().next() else {
            return false;
        };
        let check = probe(queue);
        let Some(channel) = self.channel_mut(ch) else {
            return false;
        };
        if !matches!(channel.state, ChannelState::Open | ChannelState::Opening) {
            return false;
        }
        let id = channel.push_rpc(1, Vec::new(), &check);
        if let Some(rpc) = channel.rpc_mut(id) {
            rpc.permission = Some(PermissionCheck {
                ids: request.ids(),
                then,
            });
            rpc.silent = true;
        }
        // Only on a channel of warren's own: the check's refusal closes the channel it is
        // asked on.
        if !self.own_channel_request(link, ch, &check, Pending::Rpc(id)) {
            if let Some(channel) = self.channel_mut(ch) {
                channel.rpcs.retain(|r| r.id != id);
            }
            return false;
        }
        self.input_waits_for = Some((ch, id));
        true
    }

    /// The link permission check `id` of client channel `ch` was asked on died before it
    /// answered: it is asked again on another live link. With none (or no channel number free
    /// there), the permission is taken as there, and warren answers as it would without the
    /// check.
    pub(super) fn reask_permission(&mut self, ch: u16, id: u64) {
        let Some(check) = self.rpc(ch, id).map(|r| r.request.clone()) else {
            return;
        };
        if let Some(link) = self.live_links().iter().next()
            && self.own_channel_request(link, ch, &check, Pending::Rpc(id))
        {
            return;
        }
        if let Some(rpc) = self.channel_mut(ch).and_then(|c| c.rpc_mut(id)) {
            let ok = Method::QueueDeclareOk(codec::QueueDeclareOk::default());
            rpc.merge(ok, None, LinkRef::DEAD);
        }
    }

    /// A cluster refused the permission check `id` of client channel `owner` with `close`:
    /// 403 is the client's refusal (of its own request), anything else says the permission is
    /// there.
    pub(super) fn permission_answered(
        &mut self,
        link: LinkId,
        owner: u16,
        id: u64,
        check: &PermissionCheck,
        close: codec::ChannelClose,
    ) {
        if close.reply_code == ReplyCode::AccessRefused.code() {
            let (class_id, method_id) = check.ids;
            let refusal = codec::ChannelClose {
                class_id,
                method_id,
                ..close
            };
            self.fail_channel(owner, refusal, id, "sibling channel closed");
            return;
        }
        let ok = Method::QueueDeclareOk(codec::QueueDeclareOk::default());
        self.answer_rpc(link, owner, id, ok, None);
    }

    /// The permission check `id` of client channel `ch` passed, and is first in the channel's
    /// queue: warren's own refusal, if it has one, goes to the client now. Returns false when
    /// the connection or the channel was closed.
    pub(super) fn permission_confirmed(
        &mut self,
        ch: u16,
        id: u64,
        check: PermissionCheck,
    ) -> bool {
        if self.input_waits_for == Some((ch, id)) {
            self.input_waits_for = None;
        }
        let Some(refusal) = check.then else {
            return true;
        };
        let (class_id, method_id) = check.ids;
        if refusal.connection {
            self.protocol_error(ConnError {
                code: refusal.code,
                text: refusal.text,
                class_id,
                method_id,
            });
            return false;
        }
        let close = codec::ChannelClose {
            reply_code: refusal.code,
            reply_text: ShortStr::try_from(truncate(&refusal.text)).unwrap_or_default(),
            class_id,
            method_id,
        };
        self.fail_channel(ch, close, u64::MAX, "client channel closed by the proxy");
        false
    }
}

/// warren's own refusal with `code` and `detail`, as a channel.close.
pub(super) fn refuse_channel(code: ReplyCode, detail: &str) -> OwnRefusal {
    OwnRefusal {
        code: code.code(),
        text: code.text(detail),
        connection: false,
    }
}

/// warren's own refusal with `code` and `detail`, as a connection.close.
pub(super) fn refuse_connection(code: ReplyCode, detail: &str) -> OwnRefusal {
    OwnRefusal {
        code: code.code(),
        text: code.text(detail),
        connection: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_names_the_queue_and_a_dead_letter_exchange_rabbitmq_refuses() {
        let Method::QueueDeclare(d) = probe(&ShortStr::try_from("orders").unwrap()) else {
            panic!("a queue.declare");
        };
        assert_eq!(d.queue.as_bytes(), b"orders");
        assert!(!d.passive, "a passive declare checks no permission");
        assert!(!d.nowait, "the answer is the point");
        assert!(
            matches!(
                d.arguments.get("x-dead-letter-exchange"),
                Some(codec::FieldValue::I64(0))
            ),
            "not a long string: RabbitMQ refuses it before creating anything"
        );
    }
}
