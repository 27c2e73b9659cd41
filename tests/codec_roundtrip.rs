//! Round trips between warren's codec and the independent amq-protocol crate, for every method,
//! content headers, bodies and heartbeats; plus a check that the hot-path decoders do not
//! allocate.
//!
//! Direction 1: warren encodes (reserved fields set to non-default values), amq-protocol
//! parses, and the parsed frame must equal the amq-protocol value built by hand, field by field
//! (amq-protocol ignores reserved fields when parsing).
//! Direction 2: amq-protocol generates (it writes reserved fields as 0 / empty), warren decodes
//! to the expected value and re-encodes to the very same bytes.
//!
//! Limits of the oracle: amq-protocol's short strings are `String`, so non-UTF-8 short strings
//! are only tested in warren's unit tests; its tables are `BTreeMap`s, so tables here are built
//! with keys in sorted order and no duplicates (wire order and duplicates are unit-tested).
//! It uses RabbitMQ's tags ('s' = i16, 'l' = i64) like warren, so every field value type is
//! covered here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{
    AMQPClass, BasicProperties as TheirProps, basic, channel, confirm, connection, exchange, queue,
    tx,
};
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable as TheirTable, LongString,
    ShortString,
};
use bytes::{Bytes, BytesMut};
use warren::codec::*;

// ---------------------------------------------------------------------------------------------
// Allocation counting (per thread, so parallel tests do not disturb each other).

struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (out, ALLOCATIONS.with(Cell::get) - before)
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn ss(s: &str) -> ShortStr {
    ShortStr::try_from(s).unwrap()
}

fn ls(s: &str) -> LongStr {
    LongStr::from(s)
}

fn ts(s: &str) -> ShortString {
    ShortString::from(s)
}

fn tl(s: &str) -> LongString {
    LongString::from(s)
}

fn their_bytes(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = WriteContext::from(Vec::new());
    let (buf, _) = gen_frame(frame)(ctx)
        .expect("amq-protocol gen")
        .into_inner();
    buf
}

fn their_parse(bytes: &[u8]) -> AMQPFrame {
    let (rest, frame) = parse_frame(bytes).expect("amq-protocol parse");
    assert!(rest.is_empty(), "amq-protocol left {} bytes", rest.len());
    frame
}

fn our_frame(bytes: &[u8]) -> RawFrame {
    let mut buf = BytesMut::from(bytes);
    let f = decode_frame(&mut buf, 0)
        .expect("warren frame")
        .expect("complete frame");
    assert!(buf.is_empty());
    f
}

/// A table holding every field value type, keys in sorted order. `salt` varies the values.
fn our_table(salt: u32) -> FieldTable {
    let inner = FieldTable(vec![
        (ss("depth"), FieldValue::U8(2)),
        (ss("name"), FieldValue::LongStr(ls("inner"))),
    ]);
    FieldTable(vec![
        (ss("a_bool"), FieldValue::Bool(salt.is_multiple_of(2))),
        (ss("b_i8"), FieldValue::I8(-7)),
        (ss("c_u8"), FieldValue::U8(200)),
        (ss("d_i16"), FieldValue::I16(-12_345)),
        (ss("e_u16"), FieldValue::U16(54_321)),
        (ss("f_i32"), FieldValue::I32(-1_234_567_890)),
        (ss("g_u32"), FieldValue::U32(3_000_000_000 + salt)),
        (ss("h_i64"), FieldValue::I64(-1_234_567_890_123)),
        (ss("i_f32"), FieldValue::F32(3.25)),
        (ss("j_f64"), FieldValue::F64(-6.02e23)),
        (
            ss("k_decimal"),
            FieldValue::Decimal {
                scale: 3,
                value: 98_765,
            },
        ),
        (
            ss("l_longstr"),
            FieldValue::LongStr(ls("caf\u{e9} \u{2615}")),
        ),
        (
            ss("m_bytes"),
            FieldValue::ByteArray(Bytes::from_static(&[0, 0xff, 0x80, 1])),
        ),
        (
            ss("n_array"),
            FieldValue::Array(vec![
                FieldValue::I32(1),
                FieldValue::LongStr(ls("two")),
                FieldValue::Array(vec![FieldValue::Bool(true), FieldValue::Void]),
                FieldValue::Table(inner.clone()),
            ]),
        ),
        (
            ss("o_timestamp"),
            FieldValue::Timestamp(1_700_000_000 + u64::from(salt)),
        ),
        (ss("p_table"), FieldValue::Table(inner)),
        (ss("q_void"), FieldValue::Void),
        (ss("r_empty_array"), FieldValue::Array(vec![])),
        (
            ss("s_empty_table"),
            FieldValue::Table(FieldTable::default()),
        ),
    ])
}

fn their_value(v: &FieldValue) -> AMQPValue {
    match v {
        FieldValue::Bool(b) => AMQPValue::Boolean(*b),
        FieldValue::I8(x) => AMQPValue::ShortShortInt(*x),
        FieldValue::U8(x) => AMQPValue::ShortShortUInt(*x),
        FieldValue::I16(x) => AMQPValue::ShortInt(*x),
        FieldValue::U16(x) => AMQPValue::ShortUInt(*x),
        FieldValue::I32(x) => AMQPValue::LongInt(*x),
        FieldValue::U32(x) => AMQPValue::LongUInt(*x),
        FieldValue::I64(x) => AMQPValue::LongLongInt(*x),
        FieldValue::F32(x) => AMQPValue::Float(*x),
        FieldValue::F64(x) => AMQPValue::Double(*x),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::LongStr(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        FieldValue::ByteArray(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
        FieldValue::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(their_value).collect::<Vec<_>>(),
        )),
        FieldValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        FieldValue::Table(t) => AMQPValue::FieldTable(their_table(t)),
        FieldValue::Void => AMQPValue::Void,
    }
}

fn their_table(t: &FieldTable) -> TheirTable {
    let mut out = TheirTable::default();
    for (k, v) in &t.0 {
        out.insert(ShortString::from(k.as_str().into_owned()), their_value(v));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Every method, as (warren value, amq-protocol value).

/// Builds each method once. `reserved` sets the reserved fields to non-default values (which
/// amq-protocol ignores on parse and cannot generate); `p` is a bit pattern for the bools, and
/// varies a few other fields.
fn all_cases(reserved: bool, p: u32) -> Vec<(Method, AMQPClass)> {
    let b = |i: u32| (p >> i) & 1 == 1;
    let ticket = if reserved { 0xBEEF } else { 0 };
    let res_s = |s: &str| if reserved { ss(s) } else { ss("") };
    let res_l = |s: &str| if reserved { ls(s) } else { ls("") };
    let res_b = |v: bool| reserved && v;
    let table = our_table(p);
    let their_tab = their_table(&table);
    let n = u64::from(p);
    use AMQPClass as C;

    vec![
        // connection
        (
            Method::ConnectionStart(ConnectionStart {
                version_major: 0,
                version_minor: 9,
                server_properties: table.clone(),
                mechanisms: ls("PLAIN AMQPLAIN"),
                locales: ls("en_US"),
            }),
            C::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: their_tab.clone(),
                mechanisms: tl("PLAIN AMQPLAIN"),
                locales: tl("en_US"),
            })),
        ),
        (
            Method::ConnectionStartOk(ConnectionStartOk {
                client_properties: table.clone(),
                mechanism: ss("PLAIN"),
                response: LongStr::from(b"\0guest\0guest".to_vec()),
                locale: ss("en_US"),
            }),
            C::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: their_tab.clone(),
                mechanism: ts("PLAIN"),
                response: LongString::from(b"\0guest\0guest".to_vec()),
                locale: ts("en_US"),
            })),
        ),
        (
            Method::ConnectionSecure(ConnectionSecure {
                challenge: ls("challenge"),
            }),
            C::Connection(connection::AMQPMethod::Secure(connection::Secure {
                challenge: tl("challenge"),
            })),
        ),
        (
            Method::ConnectionSecureOk(ConnectionSecureOk {
                response: ls("answer"),
            }),
            C::Connection(connection::AMQPMethod::SecureOk(connection::SecureOk {
                response: tl("answer"),
            })),
        ),
        (
            Method::ConnectionTune(ConnectionTune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60,
            }),
            C::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60,
            })),
        ),
        (
            Method::ConnectionTuneOk(ConnectionTuneOk {
                channel_max: 100,
                frame_max: 4096,
                heartbeat: 30 + p as u16,
            }),
            C::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 100,
                frame_max: 4096,
                heartbeat: 30 + p as u16,
            })),
        ),
        (
            Method::ConnectionOpen(ConnectionOpen {
                virtual_host: ss("/prod"),
                capabilities: res_s("caps"),
                insist: res_b(b(0)),
            }),
            C::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: ts("/prod"),
            })),
        ),
        (
            Method::ConnectionOpenOk(ConnectionOpenOk {
                known_hosts: res_s("host:5672"),
            }),
            C::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        ),
        (
            Method::ConnectionClose(ConnectionClose {
                reply_code: 320,
                reply_text: ss("CONNECTION_FORCED - shutdown"),
                class_id: 60,
                method_id: 40,
            }),
            C::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 320,
                reply_text: ts("CONNECTION_FORCED - shutdown"),
                class_id: 60,
                method_id: 40,
            })),
        ),
        (
            Method::ConnectionCloseOk(ConnectionCloseOk {}),
            C::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ),
        (
            Method::ConnectionBlocked(ConnectionBlocked {
                reason: ss("low on memory"),
            }),
            C::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                reason: ts("low on memory"),
            })),
        ),
        (
            Method::ConnectionUnblocked(ConnectionUnblocked {}),
            C::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
        ),
        (
            Method::ConnectionUpdateSecret(ConnectionUpdateSecret {
                new_secret: ls("new-token"),
                reason: ss("refresh"),
            }),
            C::Connection(connection::AMQPMethod::UpdateSecret(
                connection::UpdateSecret {
                    new_secret: tl("new-token"),
                    reason: ts("refresh"),
                },
            )),
        ),
        (
            Method::ConnectionUpdateSecretOk(ConnectionUpdateSecretOk {}),
            C::Connection(connection::AMQPMethod::UpdateSecretOk(
                connection::UpdateSecretOk {},
            )),
        ),
        // channel
        (
            Method::ChannelOpen(ChannelOpen {
                out_of_band: res_s("oob"),
            }),
            C::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ),
        (
            Method::ChannelOpenOk(ChannelOpenOk {
                channel_id: res_l("chan-id"),
            }),
            C::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        ),
        (
            Method::ChannelFlow(ChannelFlow { active: b(0) }),
            C::Channel(channel::AMQPMethod::Flow(channel::Flow { active: b(0) })),
        ),
        (
            Method::ChannelFlowOk(ChannelFlowOk { active: b(1) }),
            C::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                active: b(1),
            })),
        ),
        (
            Method::ChannelClose(ChannelClose {
                reply_code: 404,
                reply_text: ss("NOT_FOUND - no queue 'q'"),
                class_id: 50,
                method_id: 10,
            }),
            C::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 404,
                reply_text: ts("NOT_FOUND - no queue 'q'"),
                class_id: 50,
                method_id: 10,
            })),
        ),
        (
            Method::ChannelCloseOk(ChannelCloseOk {}),
            C::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        ),
        // exchange
        (
            Method::ExchangeDeclare(ExchangeDeclare {
                ticket,
                exchange: ss("events"),
                kind: ss("topic"),
                passive: b(0),
                durable: b(1),
                auto_delete: b(2),
                internal: b(3),
                nowait: b(4),
                arguments: table.clone(),
            }),
            C::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: ts("events"),
                kind: ts("topic"),
                passive: b(0),
                durable: b(1),
                auto_delete: b(2),
                internal: b(3),
                nowait: b(4),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::ExchangeDeclareOk(ExchangeDeclareOk {}),
            C::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
        ),
        (
            Method::ExchangeDelete(ExchangeDelete {
                ticket,
                exchange: ss("old"),
                if_unused: b(1),
                nowait: b(0),
            }),
            C::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                exchange: ts("old"),
                if_unused: b(1),
                nowait: b(0),
            })),
        ),
        (
            Method::ExchangeDeleteOk(ExchangeDeleteOk {}),
            C::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
        ),
        (
            Method::ExchangeBind(ExchangeBind {
                ticket,
                destination: ss("dst"),
                source: ss("src"),
                routing_key: ss("a.*.c"),
                nowait: b(2),
                arguments: table.clone(),
            }),
            C::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: ts("dst"),
                source: ts("src"),
                routing_key: ts("a.*.c"),
                nowait: b(2),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::ExchangeBindOk(ExchangeBindOk {}),
            C::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
        ),
        (
            Method::ExchangeUnbind(ExchangeUnbind {
                ticket,
                destination: ss("dst2"),
                source: ss("src2"),
                routing_key: ss("#"),
                nowait: b(3),
                arguments: table.clone(),
            }),
            C::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: ts("dst2"),
                source: ts("src2"),
                routing_key: ts("#"),
                nowait: b(3),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::ExchangeUnbindOk(ExchangeUnbindOk {}),
            C::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
        ),
        // queue
        (
            Method::QueueDeclare(QueueDeclare {
                ticket,
                queue: ss("orders"),
                passive: b(4),
                durable: b(3),
                exclusive: b(2),
                auto_delete: b(1),
                nowait: b(0),
                arguments: table.clone(),
            }),
            C::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: ts("orders"),
                passive: b(4),
                durable: b(3),
                exclusive: b(2),
                auto_delete: b(1),
                nowait: b(0),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::QueueDeclareOk(QueueDeclareOk {
                queue: ss("amq.gen-abc"),
                message_count: 17 + p,
                consumer_count: 3,
            }),
            C::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: ts("amq.gen-abc"),
                message_count: 17 + p,
                consumer_count: 3,
            })),
        ),
        (
            Method::QueueBind(QueueBind {
                ticket,
                queue: ss("q"),
                exchange: ss("x"),
                routing_key: ss("rk"),
                nowait: b(1),
                arguments: table.clone(),
            }),
            C::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: ts("q"),
                exchange: ts("x"),
                routing_key: ts("rk"),
                nowait: b(1),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::QueueBindOk(QueueBindOk {}),
            C::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
        ),
        (
            Method::QueuePurge(QueuePurge {
                ticket,
                queue: ss("q"),
                nowait: b(2),
            }),
            C::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: ts("q"),
                nowait: b(2),
            })),
        ),
        (
            Method::QueuePurgeOk(QueuePurgeOk { message_count: 99 }),
            C::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                message_count: 99,
            })),
        ),
        (
            Method::QueueDelete(QueueDelete {
                ticket,
                queue: ss("q"),
                if_unused: b(0),
                if_empty: b(1),
                nowait: b(2),
            }),
            C::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: ts("q"),
                if_unused: b(0),
                if_empty: b(1),
                nowait: b(2),
            })),
        ),
        (
            Method::QueueDeleteOk(QueueDeleteOk { message_count: 5 }),
            C::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                message_count: 5,
            })),
        ),
        (
            Method::QueueUnbind(QueueUnbind {
                ticket,
                queue: ss("q"),
                exchange: ss("x"),
                routing_key: ss("rk"),
                arguments: table.clone(),
            }),
            C::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: ts("q"),
                exchange: ts("x"),
                routing_key: ts("rk"),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::QueueUnbindOk(QueueUnbindOk {}),
            C::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
        ),
        // basic
        (
            Method::BasicQos(BasicQos {
                prefetch_size: 0,
                prefetch_count: 250,
                global: b(0),
            }),
            C::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 250,
                global: b(0),
            })),
        ),
        (
            Method::BasicQosOk(BasicQosOk {}),
            C::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        ),
        (
            Method::BasicConsume(BasicConsume {
                ticket,
                queue: ss("q"),
                consumer_tag: ss("ctag-1"),
                no_local: b(0),
                no_ack: b(1),
                exclusive: b(2),
                nowait: b(3),
                arguments: table.clone(),
            }),
            C::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: ts("q"),
                consumer_tag: ts("ctag-1"),
                no_local: b(0),
                no_ack: b(1),
                exclusive: b(2),
                nowait: b(3),
                arguments: their_tab.clone(),
            })),
        ),
        (
            Method::BasicConsumeOk(BasicConsumeOk {
                consumer_tag: ss("ctag-1"),
            }),
            C::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: ts("ctag-1"),
            })),
        ),
        (
            Method::BasicCancel(BasicCancel {
                consumer_tag: ss("ctag-2"),
                nowait: b(4),
            }),
            C::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: ts("ctag-2"),
                nowait: b(4),
            })),
        ),
        (
            Method::BasicCancelOk(BasicCancelOk {
                consumer_tag: ss("ctag-2"),
            }),
            C::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                consumer_tag: ts("ctag-2"),
            })),
        ),
        (
            Method::BasicPublish(BasicPublish {
                ticket,
                exchange: ss("amq.topic"),
                routing_key: ss("stock.nyse.ibm"),
                mandatory: b(0),
                immediate: b(1),
            }),
            C::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ts("amq.topic"),
                routing_key: ts("stock.nyse.ibm"),
                mandatory: b(0),
                immediate: b(1),
            })),
        ),
        (
            Method::BasicReturn(BasicReturn {
                reply_code: 312,
                reply_text: ss("NO_ROUTE"),
                exchange: ss("amq.topic"),
                routing_key: ss("nowhere"),
            }),
            C::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: ts("NO_ROUTE"),
                exchange: ts("amq.topic"),
                routing_key: ts("nowhere"),
            })),
        ),
        (
            Method::BasicDeliver(BasicDeliver {
                consumer_tag: ss("ctag-3"),
                delivery_tag: u64::MAX - n,
                redelivered: b(2),
                exchange: ss(""),
                routing_key: ss("q"),
            }),
            C::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: ts("ctag-3"),
                delivery_tag: u64::MAX - n,
                redelivered: b(2),
                exchange: ts(""),
                routing_key: ts("q"),
            })),
        ),
        (
            Method::BasicGet(BasicGet {
                ticket,
                queue: ss("q"),
                no_ack: b(3),
            }),
            C::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: ts("q"),
                no_ack: b(3),
            })),
        ),
        (
            Method::BasicGetOk(BasicGetOk {
                delivery_tag: 1 + n,
                redelivered: b(4),
                exchange: ss("x"),
                routing_key: ss("rk"),
                message_count: 12,
            }),
            C::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: 1 + n,
                redelivered: b(4),
                exchange: ts("x"),
                routing_key: ts("rk"),
                message_count: 12,
            })),
        ),
        (
            Method::BasicGetEmpty(BasicGetEmpty {
                cluster_id: res_s("cluster"),
            }),
            C::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
        ),
        (
            Method::BasicAck(BasicAck {
                delivery_tag: 1000 + n,
                multiple: b(0),
            }),
            C::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1000 + n,
                multiple: b(0),
            })),
        ),
        (
            Method::BasicReject(BasicReject {
                delivery_tag: 77,
                requeue: b(1),
            }),
            C::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: 77,
                requeue: b(1),
            })),
        ),
        (
            Method::BasicRecoverAsync(BasicRecoverAsync { requeue: b(2) }),
            C::Basic(basic::AMQPMethod::RecoverAsync(basic::RecoverAsync {
                requeue: b(2),
            })),
        ),
        (
            Method::BasicRecover(BasicRecover { requeue: b(3) }),
            C::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: b(3) })),
        ),
        (
            Method::BasicRecoverOk(BasicRecoverOk {}),
            C::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
        ),
        (
            Method::BasicNack(BasicNack {
                delivery_tag: 5 + n,
                multiple: b(0),
                requeue: b(1),
            }),
            C::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 5 + n,
                multiple: b(0),
                requeue: b(1),
            })),
        ),
        // confirm
        (
            Method::ConfirmSelect(ConfirmSelect { nowait: b(0) }),
            C::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: b(0),
            })),
        ),
        (
            Method::ConfirmSelectOk(ConfirmSelectOk {}),
            C::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
        ),
        // tx
        (
            Method::TxSelect(TxSelect {}),
            C::Tx(tx::AMQPMethod::Select(tx::Select {})),
        ),
        (
            Method::TxSelectOk(TxSelectOk {}),
            C::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
        ),
        (
            Method::TxCommit(TxCommit {}),
            C::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
        ),
        (
            Method::TxCommitOk(TxCommitOk {}),
            C::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
        ),
        (
            Method::TxRollback(TxRollback {}),
            C::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})),
        ),
        (
            Method::TxRollbackOk(TxRollbackOk {}),
            C::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
        ),
    ]
}

/// Bool patterns: all 32 combinations of the (at most five) bools of a method.
const PATTERNS: std::ops::Range<u32> = 0..32;

#[test]
fn cases_cover_every_method() {
    let cases = all_cases(true, 0);
    let mut ours: Vec<(u16, u16)> = cases.iter().map(|(m, _)| m.ids()).collect();
    // The deprecated access class (30) is checked by the unit tests and against RabbitMQ in
    // tests/proxy_basic.rs, not here.
    let mut every: Vec<(u16, u16)> = all_methods_default()
        .iter()
        .map(Method::ids)
        .filter(|&(c, _)| c != 30)
        .collect();
    ours.sort_unstable();
    every.sort_unstable();
    assert_eq!(ours, every);
    for (m, t) in &cases {
        assert_eq!(
            m.ids(),
            (t.get_amqp_class_id(), t.get_amqp_method_id()),
            "{}",
            m.name()
        );
    }
}

#[test]
fn warren_encodes_what_amq_protocol_parses() {
    for p in PATTERNS {
        for (ours, theirs) in all_cases(true, p) {
            let channel = 1 + p as u16;
            let mut out = BytesMut::new();
            write_method(&mut out, channel, &ours);
            assert_eq!(
                their_parse(&out),
                AMQPFrame::Method(channel, theirs),
                "{} pattern {p:#07b}",
                ours.name()
            );
        }
    }
}

#[test]
fn amq_protocol_encodes_what_warren_decodes_back_to_the_same_bytes() {
    for p in PATTERNS {
        for (ours, theirs) in all_cases(false, p) {
            let channel = 3;
            let bytes = their_bytes(&AMQPFrame::Method(channel, theirs));
            let f = our_frame(&bytes);
            assert_eq!((f.kind, f.channel), (FrameKind::Method, channel));
            let decoded = Method::decode(f.payload).unwrap_or_else(|e| {
                panic!("{} pattern {p:#07b}: {e}", ours.name());
            });
            assert_eq!(decoded, ours, "pattern {p:#07b}");
            let mut again = BytesMut::new();
            write_method(&mut again, channel, &decoded);
            assert_eq!(&again[..], &bytes[..], "{} pattern {p:#07b}", ours.name());
        }
    }
}

#[test]
fn reserved_fields_survive_our_own_round_trip() {
    for (ours, _) in all_cases(true, 0b10101) {
        let mut out = BytesMut::new();
        write_method(&mut out, 1, &ours);
        let f = our_frame(&out);
        assert_eq!(Method::decode(f.payload).unwrap(), ours);
    }
}

// ---------------------------------------------------------------------------------------------
// Content headers, bodies, heartbeats.

fn header_cases() -> Vec<(ContentHeader, AMQPContentHeader)> {
    let headers = our_table(1);
    let all = ContentHeader {
        class_id: 60,
        body_size: 123_456_789_012,
        properties: BasicProperties {
            content_type: Some(ss("application/json")),
            content_encoding: Some(ss("gzip")),
            headers: Some(headers.clone()),
            delivery_mode: Some(2),
            priority: Some(7),
            correlation_id: Some(ss("corr-42")),
            reply_to: Some(ss("amq.rabbitmq.reply-to")),
            expiration: Some(ss("60000")),
            message_id: Some(ss("msg-1")),
            timestamp: Some(1_700_000_123),
            kind: Some(ss("order.created")),
            user_id: Some(ss("guest")),
            app_id: Some(ss("warren-test")),
            cluster_id: Some(ss("c-1")),
        },
    };
    let their_all = AMQPContentHeader {
        class_id: 60,
        body_size: 123_456_789_012,
        properties: TheirProps::default()
            .with_content_type(ts("application/json"))
            .with_content_encoding(ts("gzip"))
            .with_headers(their_table(&headers))
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id(ts("corr-42"))
            .with_reply_to(ts("amq.rabbitmq.reply-to"))
            .with_expiration(ts("60000"))
            .with_message_id(ts("msg-1"))
            .with_timestamp(1_700_000_123)
            .with_type(ts("order.created"))
            .with_user_id(ts("guest"))
            .with_app_id(ts("warren-test"))
            .with_cluster_id(ts("c-1")),
    };
    let none = ContentHeader {
        class_id: 60,
        body_size: 0,
        properties: BasicProperties::default(),
    };
    let their_none = AMQPContentHeader {
        class_id: 60,
        body_size: 0,
        properties: TheirProps::default(),
    };
    // A sparse mix: alternate properties.
    let sparse = ContentHeader {
        class_id: 60,
        body_size: 5,
        properties: BasicProperties {
            content_type: Some(ss("text/plain")),
            headers: Some(FieldTable::default()),
            priority: Some(0),
            reply_to: Some(ss("")),
            message_id: Some(ss("id")),
            kind: Some(ss("t")),
            app_id: Some(ss("a")),
            ..Default::default()
        },
    };
    let their_sparse = AMQPContentHeader {
        class_id: 60,
        body_size: 5,
        properties: TheirProps::default()
            .with_content_type(ts("text/plain"))
            .with_headers(TheirTable::default())
            .with_priority(0)
            .with_reply_to(ts(""))
            .with_message_id(ts("id"))
            .with_type(ts("t"))
            .with_app_id(ts("a")),
    };
    vec![(all, their_all), (none, their_none), (sparse, their_sparse)]
}

#[test]
fn content_headers_both_ways() {
    for (ours, theirs) in header_cases() {
        // warren -> amq-protocol
        let mut out = BytesMut::new();
        write_header(&mut out, 5, &ours);
        assert_eq!(their_parse(&out), AMQPFrame::Header(5, theirs.clone()));
        // amq-protocol -> warren -> same bytes
        let bytes = their_bytes(&AMQPFrame::Header(5, theirs));
        let f = our_frame(&bytes);
        assert_eq!((f.kind, f.channel), (FrameKind::Header, 5));
        assert_eq!(peek_content_header(&f.payload), Ok((60, ours.body_size)));
        let decoded = ContentHeader::decode(f.payload.clone()).unwrap();
        assert_eq!(decoded, ours);
        let mut again = BytesMut::new();
        write_header(&mut again, 5, &decoded);
        assert_eq!(&again[..], &bytes[..]);
        let mut raw = BytesMut::new();
        write_header_raw(&mut raw, 5, &f.payload);
        assert_eq!(&raw[..], &bytes[..]);
    }
}

#[test]
fn bodies_and_heartbeats() {
    let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let mut out = BytesMut::new();
    write_body(&mut out, 9, &body, 4096);
    let mut bytes = &out[..];
    let mut joined = Vec::new();
    while !bytes.is_empty() {
        let (rest, frame) = parse_frame(bytes).unwrap();
        let AMQPFrame::Body(9, chunk) = frame else {
            panic!("not a body frame: {frame}")
        };
        assert!(chunk.len() + FRAME_OVERHEAD <= 4096);
        joined.extend_from_slice(&chunk);
        bytes = rest;
    }
    assert_eq!(joined, body);

    let theirs = their_bytes(&AMQPFrame::Body(9, body.clone()));
    let mut ours = BytesMut::new();
    write_body(&mut ours, 9, &body, 0);
    assert_eq!(&ours[..], &theirs[..]);

    let mut hb = BytesMut::new();
    write_heartbeat(&mut hb);
    assert_eq!(&hb[..], &their_bytes(&AMQPFrame::Heartbeat)[..]);
    assert_eq!(their_parse(&hb), AMQPFrame::Heartbeat);
    let f = our_frame(&hb);
    assert_eq!(
        (f.kind, f.channel, f.payload.len()),
        (FrameKind::Heartbeat, 0, 0)
    );
}

// ---------------------------------------------------------------------------------------------
// The hot path does not allocate.

#[test]
fn hot_path_decoding_does_not_allocate() {
    let hot = [
        Method::BasicPublish(BasicPublish {
            ticket: 0,
            exchange: ss("amq.topic"),
            routing_key: ss("a.b.c"),
            mandatory: true,
            immediate: false,
        }),
        Method::BasicDeliver(BasicDeliver {
            consumer_tag: ss("ctag"),
            delivery_tag: 99,
            redelivered: true,
            exchange: ss("x"),
            routing_key: ss("rk"),
        }),
        Method::BasicAck(BasicAck {
            delivery_tag: 1,
            multiple: true,
        }),
        Method::BasicNack(BasicNack {
            delivery_tag: 2,
            multiple: false,
            requeue: true,
        }),
        Method::BasicReject(BasicReject {
            delivery_tag: 3,
            requeue: false,
        }),
    ];
    let header = ContentHeader {
        class_id: 60,
        body_size: 3,
        properties: BasicProperties {
            delivery_mode: Some(2),
            ..Default::default()
        },
    };
    let mut buf = BytesMut::with_capacity(4096);
    // A leading heartbeat: the first split of a fresh BytesMut allocates its shared header once.
    write_heartbeat(&mut buf);
    for m in &hot {
        write_method(&mut buf, 1, m);
        write_header(&mut buf, 1, &header);
        write_body(&mut buf, 1, b"abc", 4096);
    }
    assert!(decode_frame(&mut buf, 4096).unwrap().is_some());

    for m in &hot {
        let (frame, n) = allocations_during(|| decode_frame(&mut buf, 4096).unwrap().unwrap());
        assert_eq!(n, 0, "decode_frame for {}", m.name());
        let (decoded, n) = allocations_during(|| Method::decode(frame.payload).unwrap());
        assert_eq!(n, 0, "Method::decode for {}", m.name());
        assert_eq!(&decoded, m);
        let ((), n) = allocations_during(|| drop(decoded));
        assert_eq!(n, 0, "dropping the decoded {}", m.name());

        let (hdr, n) = allocations_during(|| decode_frame(&mut buf, 4096).unwrap().unwrap());
        assert_eq!(n, 0);
        let (peeked, n) = allocations_during(|| peek_content_header(&hdr.payload).unwrap());
        assert_eq!((peeked, n), ((60, 3), 0));
        let (props, n) = allocations_during(|| ContentHeader::decode(hdr.payload).unwrap());
        assert_eq!(n, 0, "content header without headers table");
        assert_eq!(props, header);
        let (body, n) = allocations_during(|| decode_frame(&mut buf, 4096).unwrap().unwrap());
        assert_eq!((&body.payload[..], n), (&b"abc"[..], 0));
    }
    assert!(buf.is_empty());

    // Encoding into a buffer with room does not allocate either.
    let mut out = BytesMut::with_capacity(4096);
    for m in &hot {
        let ((), n) = allocations_during(|| write_method(&mut out, 1, m));
        assert_eq!(n, 0, "write_method for {}", m.name());
    }
    let ((), n) = allocations_during(|| write_header(&mut out, 1, &header));
    assert_eq!(n, 0);
}
