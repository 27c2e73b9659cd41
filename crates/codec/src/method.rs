//! Method frame payloads: one struct per AMQP 0-9-1 method (with RabbitMQ's extensions) and
//! the [`Method`] enum over them.
//!
//! Every method is one line of the `methods!` table below; the macro generates the struct,
//! the enum variant, and the argument codec from the field types (see [`Field`]). Reserved
//! fields (`ticket`, `capabilities`, `insist`, `known_hosts`, `out_of_band`, `channel_id`,
//! `cluster_id`) keep their spec names and are carried through as received.

use bytes::{BufMut, Bytes, BytesMut};

use super::table::FieldTable;
use super::wire::{Field, LongStr, Reader, ShortStr, Writer};
use super::{CodecError, syntax};

/// The `sync` column of the [`methods!`] table: `request` (the sender waits for the reply),
/// `request_nowait` (the same unless its `nowait` bit is set), `reply`, or `none`
/// (asynchronous).
macro_rules! sync_kind {
    (is_reply reply) => {
        true
    };
    (is_reply $other:ident) => {
        false
    };
    (expects request $m:ident) => {
        true
    };
    (expects request_nowait $m:ident) => {
        !$m.nowait
    };
    (expects $other:ident $m:ident) => {
        false
    };
}

macro_rules! methods {
    ($(
        $variant:ident($class:literal, $method:literal, $name:literal, content: $content:literal, sync: $sync:ident)
            { $($field:ident: $ty:ty),* $(,)? }
    )*) => {
        $(
            #[doc = concat!("`", $name, "` (", stringify!($class), ".", stringify!($method), ").")]
            #[derive(Debug, Clone, PartialEq, Default)]
            pub struct $variant {
                $(pub $field: $ty,)*
            }

            impl $variant {
                pub const CLASS_ID: u16 = $class;
                pub const METHOD_ID: u16 = $method;
                pub const NAME: &'static str = $name;

                #[allow(unused_variables)]
                fn read_args(r: &mut Reader) -> Result<Self, CodecError> {
                    // Struct expression fields are evaluated in the order written, which is
                    // the wire order.
                    Ok($variant { $($field: <$ty as Field>::read(r)?,)* })
                }

                #[allow(unused_variables)]
                fn write_args(&self, w: &mut Writer<'_>) {
                    $(Field::write(&self.$field, w);)*
                }
            }

            impl From<$variant> for Method {
                fn from(m: $variant) -> Method {
                    Method::$variant(m)
                }
            }
        )*

        /// A decoded method frame payload.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method {
            $($variant($variant),)*
        }

        impl Method {
            /// Decodes a method frame payload (class id, method id, arguments). Strings and
            /// tables are slices of `payload`. Trailing bytes after the arguments are refused,
            /// as RabbitMQ does (its generated decoders match the exact binary); unused bits in
            /// a bit octet are ignored, as RabbitMQ does.
            pub fn decode(payload: Bytes) -> Result<Method, CodecError> {
                let mut r = Reader::new(payload);
                if r.remaining() < 4 {
                    return Err(syntax("method frame"));
                }
                let class_id = r.u16()?;
                let method_id = r.u16()?;
                let m = match (class_id, method_id) {
                    $(($class, $method) => Method::$variant($variant::read_args(&mut r)?),)*
                    _ => return Err(CodecError::UnknownMethod { class_id, method_id }),
                };
                r.finish("method arguments (trailing bytes)")?;
                Ok(m)
            }

            /// Appends the payload (class id, method id, arguments) to `out`.
            pub fn encode(&self, out: &mut BytesMut) {
                let (class_id, method_id) = self.ids();
                out.put_u16(class_id);
                out.put_u16(method_id);
                let mut w = Writer::new(out);
                match self {
                    $(Method::$variant(m) => m.write_args(&mut w),)*
                }
                w.finish();
            }

            /// (class id, method id).
            pub fn ids(&self) -> (u16, u16) {
                match self {
                    $(Method::$variant(_) => ($class, $method),)*
                }
            }

            /// The method's name, e.g. `"basic.publish"`.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Method::$variant(_) => $name,)*
                }
            }

            /// Whether the method is followed by a content header and body frames
            /// (basic.publish, basic.return, basic.deliver, basic.get-ok).
            pub fn has_content(&self) -> bool {
                match self {
                    $(Method::$variant(_) => $content,)*
                }
            }

            /// Whether the method is the spec's reply to a synchronous request (`-ok`,
            /// basic.get-empty), from the table's `sync` column.
            pub fn is_reply(&self) -> bool {
                match self {
                    $(Method::$variant(_) => sync_kind!(is_reply $sync),)*
                }
            }

            /// Whether the sender waits for a reply: a synchronous request, unless it set
            /// `nowait` (from the table's `sync` column).
            pub fn expects_reply(&self) -> bool {
                match self {
                    $(Method::$variant(_m) => sync_kind!(expects $sync _m),)*
                }
            }
        }

        /// The name of a method by its ids, if this codec knows it.
        pub fn method_name(class_id: u16, method_id: u16) -> Option<&'static str> {
            match (class_id, method_id) {
                $(($class, $method) => Some($name),)*
                _ => None,
            }
        }

        /// Every method with all fields at their defaults, in table order (for tests and
        /// tools that want to enumerate the methods).
        pub fn all_methods_default() -> Vec<Method> {
            vec![$(Method::$variant($variant::default()),)*]
        }
    };
}

methods! {
    ConnectionStart(10, 10, "connection.start", content: false, sync: request) { version_major: u8, version_minor: u8, server_properties: FieldTable, mechanisms: LongStr, locales: LongStr }
    ConnectionStartOk(10, 11, "connection.start-ok", content: false, sync: reply) { client_properties: FieldTable, mechanism: ShortStr, response: LongStr, locale: ShortStr }
    ConnectionSecure(10, 20, "connection.secure", content: false, sync: request) { challenge: LongStr }
    ConnectionSecureOk(10, 21, "connection.secure-ok", content: false, sync: reply) { response: LongStr }
    ConnectionTune(10, 30, "connection.tune", content: false, sync: request) { channel_max: u16, frame_max: u32, heartbeat: u16 }
    ConnectionTuneOk(10, 31, "connection.tune-ok", content: false, sync: reply) { channel_max: u16, frame_max: u32, heartbeat: u16 }
    ConnectionOpen(10, 40, "connection.open", content: false, sync: request) { virtual_host: ShortStr, capabilities: ShortStr, insist: bool }
    ConnectionOpenOk(10, 41, "connection.open-ok", content: false, sync: reply) { known_hosts: ShortStr }
    ConnectionClose(10, 50, "connection.close", content: false, sync: request) { reply_code: u16, reply_text: ShortStr, class_id: u16, method_id: u16 }
    ConnectionCloseOk(10, 51, "connection.close-ok", content: false, sync: reply) {}
    ConnectionBlocked(10, 60, "connection.blocked", content: false, sync: none) { reason: ShortStr }
    ConnectionUnblocked(10, 61, "connection.unblocked", content: false, sync: none) {}
    ConnectionUpdateSecret(10, 70, "connection.update-secret", content: false, sync: request) { new_secret: LongStr, reason: ShortStr }
    ConnectionUpdateSecretOk(10, 71, "connection.update-secret-ok", content: false, sync: reply) {}

    ChannelOpen(20, 10, "channel.open", content: false, sync: request) { out_of_band: ShortStr }
    ChannelOpenOk(20, 11, "channel.open-ok", content: false, sync: reply) { channel_id: LongStr }
    ChannelFlow(20, 20, "channel.flow", content: false, sync: request) { active: bool }
    ChannelFlowOk(20, 21, "channel.flow-ok", content: false, sync: reply) { active: bool }
    ChannelClose(20, 40, "channel.close", content: false, sync: request) { reply_code: u16, reply_text: ShortStr, class_id: u16, method_id: u16 }
    ChannelCloseOk(20, 41, "channel.close-ok", content: false, sync: reply) {}

    // Deprecated in 0-9-1 but still understood by RabbitMQ, and sent by some old clients.
    AccessRequest(30, 10, "access.request", content: false, sync: request) { realm: ShortStr, exclusive: bool, passive: bool, active: bool, write: bool, read: bool }
    AccessRequestOk(30, 11, "access.request-ok", content: false, sync: reply) { ticket: u16 }

    ExchangeDeclare(40, 10, "exchange.declare", content: false, sync: request_nowait) { ticket: u16, exchange: ShortStr, kind: ShortStr, passive: bool, durable: bool, auto_delete: bool, internal: bool, nowait: bool, arguments: FieldTable }
    ExchangeDeclareOk(40, 11, "exchange.declare-ok", content: false, sync: reply) {}
    ExchangeDelete(40, 20, "exchange.delete", content: false, sync: request_nowait) { ticket: u16, exchange: ShortStr, if_unused: bool, nowait: bool }
    ExchangeDeleteOk(40, 21, "exchange.delete-ok", content: false, sync: reply) {}
    ExchangeBind(40, 30, "exchange.bind", content: false, sync: request_nowait) { ticket: u16, destination: ShortStr, source: ShortStr, routing_key: ShortStr, nowait: bool, arguments: FieldTable }
    ExchangeBindOk(40, 31, "exchange.bind-ok", content: false, sync: reply) {}
    ExchangeUnbind(40, 40, "exchange.unbind", content: false, sync: request_nowait) { ticket: u16, destination: ShortStr, source: ShortStr, routing_key: ShortStr, nowait: bool, arguments: FieldTable }
    ExchangeUnbindOk(40, 51, "exchange.unbind-ok", content: false, sync: reply) {}

    QueueDeclare(50, 10, "queue.declare", content: false, sync: request_nowait) { ticket: u16, queue: ShortStr, passive: bool, durable: bool, exclusive: bool, auto_delete: bool, nowait: bool, arguments: FieldTable }
    QueueDeclareOk(50, 11, "queue.declare-ok", content: false, sync: reply) { queue: ShortStr, message_count: u32, consumer_count: u32 }
    QueueBind(50, 20, "queue.bind", content: false, sync: request_nowait) { ticket: u16, queue: ShortStr, exchange: ShortStr, routing_key: ShortStr, nowait: bool, arguments: FieldTable }
    QueueBindOk(50, 21, "queue.bind-ok", content: false, sync: reply) {}
    QueuePurge(50, 30, "queue.purge", content: false, sync: request_nowait) { ticket: u16, queue: ShortStr, nowait: bool }
    QueuePurgeOk(50, 31, "queue.purge-ok", content: false, sync: reply) { message_count: u32 }
    QueueDelete(50, 40, "queue.delete", content: false, sync: request_nowait) { ticket: u16, queue: ShortStr, if_unused: bool, if_empty: bool, nowait: bool }
    QueueDeleteOk(50, 41, "queue.delete-ok", content: false, sync: reply) { message_count: u32 }
    QueueUnbind(50, 50, "queue.unbind", content: false, sync: request) { ticket: u16, queue: ShortStr, exchange: ShortStr, routing_key: ShortStr, arguments: FieldTable }
    QueueUnbindOk(50, 51, "queue.unbind-ok", content: false, sync: reply) {}

    BasicQos(60, 10, "basic.qos", content: false, sync: request) { prefetch_size: u32, prefetch_count: u16, global: bool }
    BasicQosOk(60, 11, "basic.qos-ok", content: false, sync: reply) {}
    BasicConsume(60, 20, "basic.consume", content: false, sync: request_nowait) { ticket: u16, queue: ShortStr, consumer_tag: ShortStr, no_local: bool, no_ack: bool, exclusive: bool, nowait: bool, arguments: FieldTable }
    BasicConsumeOk(60, 21, "basic.consume-ok", content: false, sync: reply) { consumer_tag: ShortStr }
    BasicCancel(60, 30, "basic.cancel", content: false, sync: request_nowait) { consumer_tag: ShortStr, nowait: bool }
    BasicCancelOk(60, 31, "basic.cancel-ok", content: false, sync: reply) { consumer_tag: ShortStr }
    BasicPublish(60, 40, "basic.publish", content: true, sync: none) { ticket: u16, exchange: ShortStr, routing_key: ShortStr, mandatory: bool, immediate: bool }
    BasicReturn(60, 50, "basic.return", content: true, sync: none) { reply_code: u16, reply_text: ShortStr, exchange: ShortStr, routing_key: ShortStr }
    BasicDeliver(60, 60, "basic.deliver", content: true, sync: none) { consumer_tag: ShortStr, delivery_tag: u64, redelivered: bool, exchange: ShortStr, routing_key: ShortStr }
    BasicGet(60, 70, "basic.get", content: false, sync: request) { ticket: u16, queue: ShortStr, no_ack: bool }
    BasicGetOk(60, 71, "basic.get-ok", content: true, sync: reply) { delivery_tag: u64, redelivered: bool, exchange: ShortStr, routing_key: ShortStr, message_count: u32 }
    BasicGetEmpty(60, 72, "basic.get-empty", content: false, sync: reply) { cluster_id: ShortStr }
    BasicAck(60, 80, "basic.ack", content: false, sync: none) { delivery_tag: u64, multiple: bool }
    BasicReject(60, 90, "basic.reject", content: false, sync: none) { delivery_tag: u64, requeue: bool }
    BasicRecoverAsync(60, 100, "basic.recover-async", content: false, sync: none) { requeue: bool }
    BasicRecover(60, 110, "basic.recover", content: false, sync: request) { requeue: bool }
    BasicRecoverOk(60, 111, "basic.recover-ok", content: false, sync: reply) {}
    BasicNack(60, 120, "basic.nack", content: false, sync: none) { delivery_tag: u64, multiple: bool, requeue: bool }

    ConfirmSelect(85, 10, "confirm.select", content: false, sync: request_nowait) { nowait: bool }
    ConfirmSelectOk(85, 11, "confirm.select-ok", content: false, sync: reply) {}

    TxSelect(90, 10, "tx.select", content: false, sync: request) {}
    TxSelectOk(90, 11, "tx.select-ok", content: false, sync: reply) {}
    TxCommit(90, 20, "tx.commit", content: false, sync: request) {}
    TxCommitOk(90, 21, "tx.commit-ok", content: false, sync: reply) {}
    TxRollback(90, 30, "tx.rollback", content: false, sync: request) {}
    TxRollbackOk(90, 31, "tx.rollback-ok", content: false, sync: reply) {}
}

#[cfg(test)]
mod tests {

    #[test]
    fn sync_column_matches_the_spec_names() {
        for m in all_methods_default() {
            let name = m.name();
            let reply_name = name.ends_with("-ok") || name == "basic.get-empty";
            assert_eq!(m.is_reply(), reply_name, "{name}");
            if m.is_reply() {
                assert!(!m.expects_reply(), "{name}");
            }
        }
        // nowait decides for the methods that have it.
        let nowait = Method::QueueDeclare(QueueDeclare {
            nowait: true,
            ..Default::default()
        });
        assert!(!nowait.expects_reply());
        assert!(Method::QueueDeclare(QueueDeclare::default()).expects_reply());
        assert!(Method::QueueUnbind(QueueUnbind::default()).expects_reply());
        assert!(Method::BasicGet(BasicGet::default()).expects_reply());
        assert!(!Method::BasicPublish(BasicPublish::default()).expects_reply());
        assert!(!Method::BasicRecoverAsync(BasicRecoverAsync::default()).expects_reply());
    }

    use super::*;
    use crate::table::FieldValue;

    fn encode(m: &Method) -> Bytes {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        out.freeze()
    }

    fn s(x: &'static str) -> ShortStr {
        ShortStr::from_static(x)
    }

    #[test]
    fn table_is_complete_and_unique() {
        let all = all_methods_default();
        assert_eq!(all.len(), 66);
        let mut ids: Vec<_> = all.iter().map(Method::ids).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        for m in &all {
            let (c, i) = m.ids();
            assert_eq!(method_name(c, i), Some(m.name()));
            let b = encode(m);
            assert_eq!(&b[..4], &[(c >> 8) as u8, c as u8, (i >> 8) as u8, i as u8]);
            assert_eq!(&Method::decode(b).unwrap(), m, "{}", m.name());
        }
        let content: Vec<_> = all
            .iter()
            .filter(|m| m.has_content())
            .map(Method::name)
            .collect();
        assert_eq!(
            content,
            [
                "basic.publish",
                "basic.return",
                "basic.deliver",
                "basic.get-ok"
            ]
        );
    }

    #[test]
    fn publish_wire_format() {
        let m = Method::BasicPublish(BasicPublish {
            ticket: 0,
            exchange: s("ex"),
            routing_key: s("rk"),
            mandatory: true,
            immediate: false,
        });
        let b = encode(&m);
        assert_eq!(
            &b[..],
            &[0, 60, 0, 40, 0, 0, 2, b'e', b'x', 2, b'r', b'k', 0b01]
        );
        assert_eq!(Method::decode(b).unwrap(), m);
        assert_eq!(m.name(), "basic.publish");
        assert_eq!(m.ids(), (BasicPublish::CLASS_ID, BasicPublish::METHOD_ID));
    }

    #[test]
    fn bool_packing_across_fields() {
        // exchange.declare: five bits in one octet, then the table.
        let m = Method::ExchangeDeclare(ExchangeDeclare {
            ticket: 0,
            exchange: s("x"),
            kind: s("topic"),
            passive: true,
            durable: false,
            auto_delete: true,
            internal: true,
            nowait: false,
            arguments: FieldTable::default(),
        });
        let b = encode(&m);
        assert_eq!(&b[b.len() - 5..], &[0b0_1101, 0, 0, 0, 0]);
        assert_eq!(Method::decode(b).unwrap(), m);
        // basic.deliver: a bit between a longlong and a shortstr gets its own octet.
        let m = Method::BasicDeliver(BasicDeliver {
            consumer_tag: s("c"),
            delivery_tag: 7,
            redelivered: true,
            exchange: s(""),
            routing_key: s("q"),
        });
        let b = encode(&m);
        assert_eq!(&b[4..], &[1, b'c', 0, 0, 0, 0, 0, 0, 0, 7, 1, 0, 1, b'q']);
        assert_eq!(Method::decode(b).unwrap(), m);
        // basic.nack: two bits in one octet.
        for (multiple, requeue, octet) in [
            (false, false, 0),
            (true, false, 1),
            (false, true, 2),
            (true, true, 3),
        ] {
            let m = Method::BasicNack(BasicNack {
                delivery_tag: 1,
                multiple,
                requeue,
            });
            let b = encode(&m);
            assert_eq!(b.len(), 4 + 8 + 1);
            assert_eq!(b[12], octet);
            assert_eq!(Method::decode(b).unwrap(), m);
        }
    }

    #[test]
    fn unused_bits_are_ignored() {
        let b = Bytes::from_static(&[0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 9, 0b1111_1110]);
        assert_eq!(
            Method::decode(b).unwrap(),
            Method::BasicAck(BasicAck {
                delivery_tag: 9,
                multiple: false
            })
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            Method::decode(Bytes::from_static(&[0, 30, 0, 99, 0])),
            Err(CodecError::UnknownMethod {
                class_id: 30,
                method_id: 99
            })
        );
        assert!(matches!(
            Method::decode(Bytes::from_static(&[0, 60, 0])),
            Err(CodecError::Syntax { .. })
        ));
        assert!(matches!(
            Method::decode(Bytes::new()),
            Err(CodecError::Syntax { .. })
        ));
        // basic.ack with trailing garbage, and truncated.
        let ack = encode(&Method::BasicAck(BasicAck {
            delivery_tag: 1,
            multiple: true,
        }));
        let mut long = BytesMut::from(&ack[..]);
        long.put_u8(0);
        assert!(matches!(
            Method::decode(long.freeze()),
            Err(CodecError::Syntax { .. })
        ));
        for n in 4..ack.len() {
            assert!(matches!(
                Method::decode(ack.slice(..n)),
                Err(CodecError::Syntax { .. })
            ));
        }
        // An empty-argument method followed by a byte.
        assert!(Method::decode(Bytes::from_static(&[0, 90, 0, 10, 0])).is_err());
    }

    #[test]
    fn strings_and_tables_slice_the_payload() {
        let m = Method::QueueDeclare(QueueDeclare {
            ticket: 0,
            queue: s("orders"),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable(vec![(
                s("x-queue-type"),
                FieldValue::LongStr("quorum".into()),
            )]),
        });
        let payload = encode(&m);
        let range = payload.as_ptr_range();
        let Method::QueueDeclare(d) = Method::decode(payload.clone()).unwrap() else {
            panic!("wrong method")
        };
        assert!(range.contains(&d.queue.as_bytes().as_ptr()));
        let (k, v) = &d.arguments.0[0];
        assert!(range.contains(&k.as_bytes().as_ptr()));
        let FieldValue::LongStr(v) = v else { panic!() };
        assert!(range.contains(&v.as_bytes().as_ptr()));
    }

    #[test]
    fn from_struct() {
        let m: Method = TxSelect {}.into();
        assert_eq!(m, Method::TxSelect(TxSelect {}));
        assert_eq!(m.name(), "tx.select");
        assert_eq!(method_name(30, 10), Some("access.request"));
        assert_eq!(method_name(30, 99), None);
    }
}
