"""Edge cases of AMQP 0-9-1 as clients meet them, run directly against RabbitMQ and through
warren with the same code, and compared observation by observation.

    python tests/clients/edge_compare.py DIRECT_ADDR PROXY_ADDR [SCENARIO ...]

Each scenario drives py-amqp (the client Celery uses, low-level enough for nowait, immediate,
channel.flow, ...) and returns what a client can observe: replies, counts, reply codes of errors,
which messages arrive. RabbitMQ's answer is the expected one by construction, so a scenario
needs no hand-written expectation and a difference fails whatever it is. Order is not compared
where warren documents that it differs (a queue's messages on two clusters arrive each cluster
in order); counts are compared where they are a queue's whole count.

Exits 0 when every scenario observes the same both ways; prints a diff otherwise.
"""

from __future__ import annotations

import sys
import time
import traceback
import uuid

import amqp
import amqp.exceptions


def uid(prefix: str) -> str:
    return f"edge-{prefix}-{uuid.uuid4().hex[:10]}"


class Target:
    def __init__(self, addr: str):
        self.addr = addr
        self.conns: list[amqp.Connection] = []

    def connect(self, **kw) -> amqp.Connection:
        c = amqp.Connection(host=self.addr, userid="guest", password="guest", virtual_host="/",
                            connect_timeout=10, **kw)
        c.connect()
        self.conns.append(c)
        return c

    def close_all(self) -> None:
        for c in self.conns:
            try:
                c.close()
            except Exception:
                try:
                    c.collect()
                except Exception:
                    pass
        self.conns.clear()


def err(e: BaseException) -> str:
    """An error as a client sees it: its reply code (the text may name generated things)."""
    code = getattr(e, "reply_code", None)
    if code is not None:
        return f"error {code}"
    return f"error {type(e).__name__}"


def attempt(obs: list, label: str, fn):
    try:
        r = fn()
        if r is None or type(r).__name__ == "promise":
            r = "ok"
        elif isinstance(r, str) and r.startswith("amq.ctag-"):
            r = "amq.ctag-(generated)"
        obs.append(f"{label}: {r}")
        return True
    except (amqp.exceptions.AMQPError, OSError) as e:
        obs.append(f"{label}: {err(e)}")
        return False


def drain(conn: amqp.Connection, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn.drain_events(timeout=max(0.05, end - time.monotonic()))
        except TimeoutError:
            return
        except OSError:
            return


def get_all(ch, queue: str, no_ack: bool = True, limit: int = 1000) -> list:
    out = []
    for _ in range(limit):
        m = ch.basic_get(queue, no_ack=no_ack)
        if m is None:
            break
        out.append(m)
    return out


def bodies(msgs) -> list:
    return sorted(m.body.decode() if isinstance(m.body, bytes) else m.body for m in msgs)


def declare(ch, queue: str, **kw):
    """queue.declare as most clients default it (py-amqp's own default is auto_delete=True)."""
    kw.setdefault("auto_delete", False)
    return ch.queue_declare(queue, **kw)


def count(ch, queue: str) -> int:
    return ch.queue_declare(queue, passive=True).message_count


def publish_n(ch, queue: str, n: int, prefix: str = "m") -> None:
    for i in range(n):
        ch.basic_publish(amqp.Message(f"{prefix}{i}"), "", queue)


def settle(ch, queue: str, want: int, timeout: float = 5.0) -> int:
    """Waits until the queue holds `want` (publishes without confirms are asynchronous)."""
    end = time.monotonic() + timeout
    n = count(ch, queue)
    while n != want and time.monotonic() < end:
        time.sleep(0.05)
        n = count(ch, queue)
    return n


# ---------------------------------------------------------------------------------------------
# Scenarios. Each takes a Target and returns a list of observations.


def ack_all_with_tag_0(t: Target) -> list:
    """basic.ack(0, multiple=True) acknowledges every outstanding delivery."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("ack0")
    declare(ch, q)
    publish_n(ch, q, 10)
    settle(ch, q, 10)
    got = get_all(ch, q, no_ack=False)
    obs.append(f"got {len(got)}")
    attempt(obs, "ack(0, multiple)", lambda: ch.basic_ack(0, multiple=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 10, False))
    ch.close()
    ch2 = c.channel()
    obs.append(f"left after channel close {count(ch2, q)}")
    ch2.queue_delete(q)
    return obs


def nack_all_with_tag_0(t: Target) -> list:
    """basic.nack(0, multiple=True, requeue=True) requeues every outstanding delivery."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("nack0")
    declare(ch, q)
    publish_n(ch, q, 6)
    settle(ch, q, 6)
    got = get_all(ch, q, no_ack=False)
    obs.append(f"got {len(got)}")
    attempt(obs, "nack(0, multiple)", lambda: ch.basic_nack(0, multiple=True, requeue=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 10, False))
    again = get_all(ch, q, no_ack=True)
    obs.append(f"again {len(again)} redelivered {sum(1 for m in again if m.delivery_info['redelivered'])}")
    ch.queue_delete(q)
    return obs


def ack_0_without_multiple(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("ack0s")
    declare(ch, q)
    publish_n(ch, q, 2)
    settle(ch, q, 2)
    get_all(ch, q, no_ack=False)
    attempt(obs, "ack(0)", lambda: ch.basic_ack(0, multiple=False))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 10, False))
    ch2 = c.channel()
    obs.append(f"left {settle(ch2, q, 2)}")
    ch2.queue_delete(q)
    return obs


def multiple_ack_over_interleaved_gets(t: Target) -> list:
    """ack(multiple) of a middle tag settles exactly the tags up to it."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("mack")
    declare(ch, q)
    publish_n(ch, q, 12)
    settle(ch, q, 12)
    got = get_all(ch, q, no_ack=False)
    tags = [m.delivery_tag for m in got]
    obs.append(f"tags {tags}")
    attempt(obs, "ack(6, multiple)", lambda: ch.basic_ack(6, multiple=True))
    attempt(obs, "reject(8)", lambda: ch.basic_reject(8, requeue=False))
    attempt(obs, "ack(7)", lambda: ch.basic_ack(7))
    attempt(obs, "nack(12, multiple, requeue)", lambda: ch.basic_nack(12, multiple=True, requeue=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 10, False))
    obs.append(f"left {settle(ch, q, 4)}")
    attempt(obs, "ack(3) again", lambda: ch.basic_ack(3))
    attempt(obs, "sync after double ack", lambda: ch.basic_qos(0, 10, False))
    c.channel().queue_delete(q)
    return obs


def immediate_publish(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("imm")
    declare(ch, q)
    attempt(obs, "publish immediate", lambda: ch.basic_publish(amqp.Message("x"), "", q, immediate=True))
    attempt(obs, "sync after", lambda: ch.queue_declare(q, passive=True).message_count)
    attempt(obs, "connection still usable", lambda: c.channel().queue_delete(q))
    return obs


def channel_flow(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    attempt(obs, "flow(active=True)", lambda: ch.flow(True))
    ch2 = c.channel()
    attempt(obs, "flow(active=False)", lambda: ch2.flow(False))
    attempt(obs, "connection after", lambda: c.channel().basic_qos(0, 1, False))
    return obs


def duplicate_consumer_tag(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("dup")
    declare(ch, q)
    attempt(obs, "consume tag=t1", lambda: ch.basic_consume(q, consumer_tag="t1", callback=lambda m: None))
    attempt(obs, "consume tag=t1 again", lambda: ch.basic_consume(q, consumer_tag="t1", callback=lambda m: None))
    attempt(obs, "connection after", lambda: c.channel().queue_delete(q))
    return obs


def cancel_unknown_consumer(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    attempt(obs, "cancel unknown", lambda: ch.basic_cancel("no-such-tag"))
    attempt(obs, "channel after", lambda: ch.basic_qos(0, 1, False))
    return obs


def nowait_declare_conflict(t: Target) -> list:
    """A nowait declare that the broker refuses closes the channel, seen at the next sync."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("nwc")
    declare(ch, q, durable=False)
    attempt(obs, "declare nowait durable", lambda: declare(ch, q, durable=True, nowait=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    ch2 = c.channel()
    attempt(obs, "queue still there", lambda: ch2.queue_declare(q, passive=True).message_count)
    ch2.queue_delete(q)
    return obs


def nowait_bind_missing_exchange(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("nwb")
    declare(ch, q)
    attempt(obs, "bind nowait missing exchange", lambda: ch.queue_bind(q, uid("nox"), "k", nowait=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    c.channel().queue_delete(q)
    return obs


def nowait_consume_then_messages(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("nwcons")
    declare(ch, q)
    got = []
    ch.basic_consume(q, consumer_tag="ctag-nw", nowait=True, no_ack=True, callback=lambda m: got.append(m))
    p = c.channel()
    p.confirm_select()
    publish_n(p, q, 20)
    end = time.monotonic() + 5
    while len(got) < 20 and time.monotonic() < end:
        drain(c, 0.2)
    obs.append(f"received {len(got)} tags {sorted({m.delivery_info['consumer_tag'] for m in got})}")
    attempt(obs, "cancel nowait", lambda: ch.basic_cancel("ctag-nw", nowait=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    publish_n(p, q, 5, "late")
    drain(c, 0.5)
    obs.append(f"after cancel {len(got)}")
    p.queue_delete(q)
    return obs


def exchange_delete_if_unused(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x = uid("xdel")
    q = uid("xdelq")
    ch.exchange_declare(x, "direct", auto_delete=False)
    declare(ch, q)
    ch.queue_bind(q, x, "k")
    attempt(obs, "exchange.delete if_unused (bound)", lambda: ch.exchange_delete(x, if_unused=True))
    ch = c.channel()
    attempt(obs, "exchange still there", lambda: ch.exchange_declare(x, "direct", passive=True))
    ch.queue_unbind(q, x, "k")
    attempt(obs, "exchange.delete if_unused (unbound)", lambda: ch.exchange_delete(x, if_unused=True))
    attempt(obs, "exchange gone", lambda: ch.exchange_declare(x, "direct", passive=True))
    c.channel().queue_delete(q)
    return obs


def exchange_type_mismatch_and_unknown_type(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x = uid("xtype")
    ch.exchange_declare(x, "direct", auto_delete=True)
    attempt(obs, "redeclare as fanout", lambda: ch.exchange_declare(x, "fanout", auto_delete=True))
    ch = c.channel()
    attempt(obs, "declare unknown type", lambda: ch.exchange_declare(uid("xbad"), "no-such-type"))
    attempt(obs, "connection after", lambda: c.channel().exchange_delete(x))
    return obs


def internal_exchange_publish(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x = uid("xint")
    ch.exchange_declare(x, "fanout", auto_delete=False, arguments=None)
    # py-amqp's exchange_declare has no `internal` flag argument before 5.x; use amq.* instead:
    attempt(obs, "publish to amq.rabbitmq.trace-like reserved", lambda: ch.basic_publish(amqp.Message("x"), "amq.default", "k"))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    c.channel().exchange_delete(x)
    return obs


def _pipelined_behind(t: Target, first, confirm: bool) -> list:
    """Publishes pipelined on one channel behind a publish the broker refuses: one broker closes
    the channel at the refused one and discards the rest; none of them may be routed."""
    obs = []
    c = t.connect()
    setup = c.channel()
    q = uid("pipe")
    declare(setup, q)
    ch = c.channel()
    acks = []
    if confirm:
        ch.events["basic_ack"].add(lambda tag, multiple: acks.append((tag, multiple)))
        ch.confirm_select()
    raw = lambda msg, exchange, key, immediate=False: ch.send_method(
        amqp.spec.Basic.Publish, "Bssbb", (0, exchange, key, False, immediate), msg)
    first(raw, q)
    for i in range(40):
        raw(amqp.Message(f"b{i}"), "", q)
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    obs.append(f"acks {acks}")
    try:
        check = c.channel()
        obs.append(f"in queue {settle(check, q, 0, timeout=1.0)}")
        check.queue_delete(q)
    except (amqp.exceptions.AMQPError, OSError) as e:
        obs.append(f"connection: {err(e)}")
        c2 = t.connect()
        obs.append(f"in queue {settle(c2.channel(), q, 0, timeout=1.0)}")
        c2.channel().queue_delete(q)
    return obs


def pipelined_behind_missing_exchange(t: Target) -> list:
    return _pipelined_behind(t, lambda raw, q: raw(amqp.Message("a"), uid("nox"), "k"), confirm=False)


def pipelined_behind_missing_exchange_confirmed(t: Target) -> list:
    return _pipelined_behind(t, lambda raw, q: raw(amqp.Message("a"), uid("nox"), "k"), confirm=True)


def pipelined_behind_immediate(t: Target) -> list:
    return _pipelined_behind(t, lambda raw, q: raw(amqp.Message("a"), "", q, immediate=True), confirm=True)


def pipelined_behind_wrong_user_id(t: Target) -> list:
    return _pipelined_behind(t, lambda raw, q: raw(amqp.Message("a", user_id="mallory"), "", q), confirm=True)


def reopen_channel_number(t: Target) -> list:
    """Closing a channel and opening the same number at once: the new channel is fresh."""
    obs = []
    c = t.connect()
    q = uid("reopen")
    ch = c.channel(7)
    declare(ch, q)
    ch.basic_qos(0, 10, False)
    publish_n(ch, q, 4)
    settle(ch, q, 4)
    got = []
    ch.basic_consume(q, consumer_tag="c7", callback=lambda m: got.append(m))
    drain(c, 0.5)
    obs.append(f"before close: delivered {len(got)}")
    ch.close()
    for round_ in range(5):
        ch = c.channel(7)
        got2 = []
        ch.basic_consume(q, consumer_tag="c7", no_ack=False, callback=lambda m: got2.append(m))
        drain(c, 0.5)
        obs.append(f"round {round_}: delivered {len(got2)} tags {[m.delivery_tag for m in got2]}")
        ch.close()
    obs.append(f"left {count(c.channel(), q)}")
    c.channel().queue_delete(q)
    return obs


def recover_without_requeue(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("recover")
    declare(ch, q)
    publish_n(ch, q, 3)
    settle(ch, q, 3)
    got = []
    ch.basic_consume(q, callback=lambda m: got.append(m))
    drain(c, 0.5)
    obs.append(f"delivered {len(got)}")
    attempt(obs, "recover(requeue=False)", lambda: ch.basic_recover(requeue=False))
    drain(c, 0.5)
    obs.append(f"delivered after {len(got)} redelivered {sum(1 for m in got if m.delivery_info['redelivered'])}")
    attempt(obs, "connection after", lambda: c.channel().queue_delete(q))
    return obs


def zero_length_body_and_headers(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("zero")
    declare(ch, q)
    ch.confirm_select()
    props = dict(content_type="application/x", headers={"a": 1, "b": "two", "c": [1, "x"], "d": {"e": True}},
                 priority=3, correlation_id="cid", reply_to="r", expiration="60000", message_id="mid",
                 timestamp=1700000000, type="t", app_id="app", delivery_mode=2)
    ch.basic_publish(amqp.Message(b"", **props), "", q)
    m = ch.basic_get(q, no_ack=True)
    obs.append(f"body {m.body!r}")
    obs.append(f"props {sorted((k, repr(v)) for k, v in m.properties.items())}")
    ch.queue_delete(q)
    return obs


def user_id_mismatch(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("uid")
    declare(ch, q)
    ch.confirm_select()
    attempt(obs, "publish user_id=guest", lambda: ch.basic_publish(amqp.Message("x", user_id="guest"), "", q))
    attempt(obs, "publish user_id=mallory", lambda: ch.basic_publish(amqp.Message("x", user_id="mallory"), "", q))
    ch2 = c.channel()
    obs.append(f"in queue {settle(ch2, q, 1)}")
    ch2.queue_delete(q)
    return obs


def headers_exchange(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x = uid("hx")
    qa, qb = uid("ha"), uid("hb")
    ch.exchange_declare(x, "headers", auto_delete=False)
    declare(ch, qa)
    declare(ch, qb)
    ch.queue_bind(qa, x, "", arguments={"x-match": "all", "k1": "v1", "k2": "v2"})
    ch.queue_bind(qb, x, "", arguments={"x-match": "any", "k1": "v1", "k2": "v2"})
    ch.confirm_select()
    for i, h in enumerate([{"k1": "v1"}, {"k1": "v1", "k2": "v2"}, {"k2": "v2"}, {"k3": "v3"}]):
        ch.basic_publish(amqp.Message(f"h{i}", application_headers=h), x, "")
    obs.append(f"all: {bodies(get_all(ch, qa))}")
    obs.append(f"any: {bodies(get_all(ch, qb))}")
    ch.queue_delete(qa)
    ch.queue_delete(qb)
    ch.exchange_delete(x)
    return obs


def alternate_exchange(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x, ae, q = uid("aex"), uid("ae"), uid("aeq")
    ch.exchange_declare(ae, "fanout", auto_delete=False)
    ch.exchange_declare(x, "direct", auto_delete=False, arguments={"alternate-exchange": ae})
    declare(ch, q)
    ch.queue_bind(q, ae, "")
    ch.confirm_select()
    returned = []
    ch.events["basic_return"].add(lambda *a: returned.append(a))
    for i in range(10):
        ch.basic_publish(amqp.Message(f"a{i}"), x, "nokey", mandatory=True)
    drain(c, 0.3)
    obs.append(f"returned {len(returned)}")
    obs.append(f"in ae queue {bodies(get_all(ch, q))}")
    ch.queue_delete(q)
    ch.exchange_delete(x)
    ch.exchange_delete(ae)
    return obs


def within(n: int, prefetch: int) -> str:
    """Unacknowledged deliveries against a prefetch window: warren splits the window over its
    links (docs/semantics.md), so the bound is compared, not the exact count."""
    return "within window" if 0 < n <= prefetch else f"{n} outside 1..{prefetch}"


def qos_change_while_consuming(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("qosch")
    declare(ch, q)
    publish_n(ch, q, 30)
    settle(ch, q, 30)
    ch.basic_qos(0, 4, False)
    got = []
    ch.basic_consume(q, callback=lambda m: got.append(m))
    drain(c, 0.5)
    obs.append(f"unacked with prefetch 4: {within(len(got), 4)}")
    ch.basic_qos(0, 10, False)
    drain(c, 0.5)
    obs.append(f"after qos 10 (new consumers only): {within(len(got), 4)}")
    before = len(got)
    ch.basic_ack(0, multiple=True)
    drain(c, 0.5)
    obs.append(f"after ack all: {within(len(got) - before, 4)}")
    ch.close()
    c.channel().queue_delete(q)
    return obs


def global_qos_then_consumer(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("gqos")
    declare(ch, q)
    publish_n(ch, q, 30)
    settle(ch, q, 30)
    ch.basic_qos(0, 6, True)
    got = []
    ch.basic_consume(q, callback=lambda m: got.append(m))
    ch.basic_consume(q, callback=lambda m: got.append(m))
    drain(c, 0.7)
    obs.append(f"unacked with global prefetch 6, two consumers: {within(len(got), 6)}")
    ch.close()
    c.channel().queue_delete(q)
    return obs


def exclusive_queue_other_connection(t: Target) -> list:
    obs = []
    c1 = t.connect()
    c2 = t.connect()
    q = uid("excl")
    declare(c1.channel(), q, exclusive=True)
    attempt(obs, "passive from other", lambda: c2.channel().queue_declare(q, passive=True).message_count)
    attempt(obs, "publish from other", lambda: c2.channel().basic_publish(amqp.Message("x"), "", q))
    attempt(obs, "get from other", lambda: c2.channel().basic_get(q))
    attempt(obs, "delete from other", lambda: c2.channel().queue_delete(q))
    c1.close()
    time.sleep(0.3)
    attempt(obs, "after owner closed", lambda: c2.channel().queue_declare(q, passive=True).message_count)
    return obs


def delete_queue_with_consumer_and_unacked(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("delq")
    declare(ch, q)
    publish_n(ch, q, 5)
    settle(ch, q, 5)
    got, cancelled = [], []
    ch.basic_consume(q, consumer_tag="cdel", callback=lambda m: got.append(m), on_cancel=lambda tag: cancelled.append(tag))
    drain(c, 0.5)
    obs.append(f"delivered {len(got)}")
    d = c.channel()
    attempt(obs, "delete", lambda: d.queue_delete(q))
    drain(c, 0.7)
    obs.append(f"cancel notifications {cancelled}")
    attempt(obs, "ack after delete", lambda: ch.basic_ack(got[-1].delivery_tag) if got else None)
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    return obs


def purge_with_unacked(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("purge")
    declare(ch, q)
    publish_n(ch, q, 10)
    settle(ch, q, 10)
    held = [ch.basic_get(q, no_ack=False) for _ in range(3)]
    obs.append(f"held {sum(1 for m in held if m)}")
    attempt(obs, "purge count", lambda: ch.queue_purge(q))
    ch.close()
    ch = c.channel()
    obs.append(f"left after close (unacked requeued) {settle(ch, q, 3)}")
    ch.queue_delete(q)
    return obs


def queue_declare_counts(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("counts")
    declare(ch, q)
    publish_n(ch, q, 8)
    settle(ch, q, 8)
    c2 = t.connect()
    c2.channel().basic_consume(q, callback=lambda m: None, arguments=None)
    c2.drain_events(timeout=0.3) if False else None
    time.sleep(0.3)
    r = declare(ch, q)
    obs.append(f"redeclare counts: messages {r.message_count} consumers {r.consumer_count}")
    d = ch.queue_delete(q, if_unused=False)
    obs.append(f"delete count {d}")
    return obs


def mixed_confirm_order(t: Target) -> list:
    """Confirms of a confirm channel: every sequence number acked once, multiple or not."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("conf")
    declare(ch, q)
    acks = {}
    nacks = {}

    def on_ack(tag, multiple):
        acks[tag] = multiple

    ch.events["basic_ack"].add(on_ack)
    ch.events["basic_nack"].add(lambda tag, multiple: nacks.__setitem__(tag, multiple))
    ch.confirm_select()
    # py-amqp's basic_publish waits for each confirm in confirm mode; use the raw method to pipeline.
    for i in range(200):
        ch._basic_publish(amqp.Message(f"c{i}"), "", q, confirm_timeout=None) if False else \
            ch.send_method(amqp.spec.Basic.Publish, "Bssbb", (0, "", q, False, False),
                           amqp.Message(f"c{i}"))
    end = time.monotonic() + 5
    covered = set()
    while time.monotonic() < end:
        covered = set()
        for tag, multiple in acks.items():
            covered.update(range(1, tag + 1) if multiple else [tag])
        if len(covered) >= 200:
            break
        drain(c, 0.1)
    obs.append(f"confirmed {len(covered)} of 200, max {max(covered) if covered else 0}, nacks {len(nacks)}")
    obs.append(f"in queue {settle(ch, q, 200)}")
    ch.queue_delete(q)
    return obs


def consumer_priority_and_args(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("prio")
    declare(ch, q)
    attempt(obs, "consume x-priority", lambda: ch.basic_consume(q, callback=lambda m: None, arguments={"x-priority": 10}))
    attempt(obs, "consume x-priority bad type", lambda: ch.basic_consume(q, callback=lambda m: None, arguments={"x-priority": "high"}))
    attempt(obs, "connection after", lambda: c.channel().queue_delete(q))
    return obs


def invalid_queue_args(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    attempt(obs, "x-max-length string", lambda: ch.queue_declare(uid("badarg"), arguments={"x-max-length": "lots"}))
    ch = c.channel()
    attempt(obs, "x-queue-type bogus", lambda: ch.queue_declare(uid("badtype"), arguments={"x-queue-type": "bogus"}))
    ch = c.channel()
    attempt(obs, "x-expires 0", lambda: ch.queue_declare(uid("exp0"), arguments={"x-expires": 0}))
    attempt(obs, "connection after", lambda: c.channel().basic_qos(0, 1, False))
    return obs


def quorum_queue_basics(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("quorum")
    attempt(obs, "declare quorum", lambda: declare(ch, q, durable=True, arguments={"x-queue-type": "quorum"}).queue == q)
    ch.confirm_select()
    publish_n(ch, q, 6)
    settle(ch, q, 6)
    got = get_all(ch, q, no_ack=False)
    obs.append(f"got {len(got)}")
    for m in got:
        ch.basic_reject(m.delivery_tag, requeue=True)
    again = get_all(ch, q, no_ack=True)
    obs.append(f"again {len(again)} delivery-count {sorted((m.headers or {}).get('x-delivery-count') for m in again)}")
    ch.queue_delete(q)
    return obs


def channel_close_requeues_unacked(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("chclose")
    declare(ch, q)
    publish_n(ch, q, 10)
    settle(ch, q, 10)
    got = get_all(ch, q, no_ack=False)
    ch.basic_ack(got[0].delivery_tag)
    ch.close()
    ch = c.channel()
    again = get_all(ch, q, no_ack=True)
    obs.append(f"again {len(again)} redelivered {sum(1 for m in again if m.delivery_info['redelivered'])}")
    ch.queue_delete(q)
    return obs


def many_channels(t: Target) -> list:
    obs = []
    c = t.connect()
    chans = [c.channel() for _ in range(200)]
    obs.append(f"opened {len(chans)} max id {max(ch.channel_id for ch in chans)}")
    q = uid("many")
    chans[0].queue_declare(q)
    for ch in chans:
        ch.basic_publish(amqp.Message("x"), "", q)
    obs.append(f"in queue {settle(chans[0], q, 200)}")
    for ch in chans[1:]:
        ch.close()
    chans[0].queue_delete(q)
    return obs


def server_capabilities_and_tune(t: Target) -> list:
    obs = []
    c = t.connect()
    caps = c.server_properties.get("capabilities", {})
    obs.append(f"capabilities {sorted((k, v) for k, v in caps.items())}")
    obs.append(f"channel_max {c.channel_max} frame_max {c.frame_max}")
    return obs


def default_exchange_is_untouchable(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("defx")
    declare(ch, q)
    attempt(obs, "bind to default exchange", lambda: ch.queue_bind(q, "", "k"))
    ch = c.channel()
    attempt(obs, "declare default exchange", lambda: ch.exchange_declare("", "direct"))
    ch = c.channel()
    attempt(obs, "delete amq.direct", lambda: ch.exchange_delete("amq.direct"))
    ch = c.channel()
    attempt(obs, "unbind from default exchange", lambda: ch.queue_unbind(q, "", q))
    c.channel().queue_delete(q)
    return obs


def deletes_of_missing_things(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    attempt(obs, "queue.delete missing", lambda: ch.queue_delete(uid("noq")))
    ch = c.channel()
    attempt(obs, "exchange.delete missing", lambda: ch.exchange_delete(uid("nox")))
    ch = c.channel()
    attempt(obs, "queue.purge missing", lambda: ch.queue_purge(uid("noq")))
    ch = c.channel()
    q = uid("unb")
    declare(ch, q)
    attempt(obs, "unbind missing binding", lambda: ch.queue_unbind(q, "amq.direct", "never-bound"))
    attempt(obs, "unbind from missing exchange", lambda: ch.queue_unbind(q, uid("nox"), "k"))
    ch = c.channel()
    attempt(obs, "unbind missing queue", lambda: ch.queue_unbind(uid("noq"), "amq.direct", "k"))
    c.channel().queue_delete(q)
    return obs


def single_active_consumer_two_connections(t: Target) -> list:
    obs = []
    c1 = t.connect()
    c2 = t.connect()
    q = uid("sac")
    declare(c1.channel(), q, arguments={"x-single-active-consumer": True})
    got1, got2 = [], []
    ch1 = c1.channel()
    ch1.basic_consume(q, no_ack=True, callback=lambda m: got1.append(m))
    ch2 = c2.channel()
    ch2.basic_consume(q, no_ack=True, callback=lambda m: got2.append(m))
    p = t.connect().channel()
    p.confirm_select()
    publish_n(p, q, 20)
    end = time.monotonic() + 3
    while len(got1) + len(got2) < 20 and time.monotonic() < end:
        drain(c1, 0.1)
        drain(c2, 0.1)
    obs.append(f"first consumer {len(got1)}, second {len(got2)}")
    c1.close()
    end = time.monotonic() + 3
    publish_n(p, q, 10, "after")
    while len(got2) < 10 and time.monotonic() < end:
        drain(c2, 0.1)
    obs.append(f"second after the first left {len(got2)}")
    p.queue_delete(q)
    return obs


def consume_exclusive_queue_of_other_connection(t: Target) -> list:
    obs = []
    c1 = t.connect()
    c2 = t.connect()
    q = uid("exclc")
    declare(c1.channel(), q, exclusive=True)
    attempt(obs, "consume from other", lambda: c2.channel().basic_consume(q, callback=lambda m: None))
    attempt(obs, "bind from other", lambda: c2.channel().queue_bind(q, "amq.fanout", ""))
    attempt(obs, "purge from other", lambda: c2.channel().queue_purge(q))
    attempt(obs, "owner consumes", lambda: c1.channel().basic_consume(q, callback=lambda m: None) and "ok")
    return obs


def auto_delete_exchange(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x, q = uid("adx"), uid("adxq")
    ch.exchange_declare(x, "direct", auto_delete=True)
    declare(ch, q)
    ch.queue_bind(q, x, "k")
    attempt(obs, "exists while bound", lambda: ch.exchange_declare(x, "direct", passive=True))
    ch.queue_unbind(q, x, "k")
    time.sleep(0.2)
    attempt(obs, "gone after last unbind", lambda: c.channel().exchange_declare(x, "direct", passive=True))
    c.channel().queue_delete(q)
    return obs


def get_and_consume_on_one_channel(t: Target) -> list:
    """basic.get and a consumer on the same channel share one tag sequence."""
    obs = []
    c = t.connect()
    ch = c.channel()
    qa, qb = uid("mixa"), uid("mixb")
    declare(ch, qa)
    declare(ch, qb)
    publish_n(ch, qa, 5)
    publish_n(ch, qb, 5)
    settle(ch, qa, 5)
    settle(ch, qb, 5)
    ch.basic_qos(0, 100, False)
    got = []
    ch.basic_consume(qa, callback=lambda m: got.append(m))
    drain(c, 0.5)
    gets = get_all(ch, qb, no_ack=False)
    drain(c, 0.3)
    tags = sorted([m.delivery_tag for m in got] + [m.delivery_tag for m in gets])
    obs.append(f"consumed {len(got)} got {len(gets)} tags {tags}")
    attempt(obs, "ack all", lambda: ch.basic_ack(max(tags), multiple=True))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 100, False))
    ch.close()
    ch = c.channel()
    obs.append(f"left {count(ch, qa)} {count(ch, qb)}")
    ch.queue_delete(qa)
    ch.queue_delete(qb)
    return obs


def exchange_to_exchange_chain(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x1, x2, x3, q = uid("e2e1"), uid("e2e2"), uid("e2e3"), uid("e2eq")
    ch.exchange_declare(x1, "topic", auto_delete=False)
    ch.exchange_declare(x2, "fanout", auto_delete=False)
    ch.exchange_declare(x3, "direct", auto_delete=False)
    declare(ch, q)
    ch.exchange_bind(x2, x1, "a.#")
    ch.exchange_bind(x3, x2, "")
    ch.queue_bind(q, x3, "a.b")
    ch.confirm_select()
    for key in ["a.b", "a.c", "b.b", "a.b"]:
        ch.basic_publish(amqp.Message(key), x1, key)
    obs.append(f"received {bodies(get_all(ch, q))}")
    ch.exchange_unbind(x2, x1, "a.#")
    ch.basic_publish(amqp.Message("late"), x1, "a.b")
    obs.append(f"after unbind {bodies(get_all(ch, q))}")
    for x in (x1, x2, x3):
        ch.exchange_delete(x)
    ch.queue_delete(q)
    return obs


SCENARIOS = [
    ack_all_with_tag_0,
    nack_all_with_tag_0,
    ack_0_without_multiple,
    multiple_ack_over_interleaved_gets,
    immediate_publish,
    channel_flow,
    duplicate_consumer_tag,
    cancel_unknown_consumer,
    nowait_declare_conflict,
    nowait_bind_missing_exchange,
    nowait_consume_then_messages,
    exchange_delete_if_unused,
    exchange_type_mismatch_and_unknown_type,
    internal_exchange_publish,
    pipelined_behind_missing_exchange,
    pipelined_behind_missing_exchange_confirmed,
    pipelined_behind_immediate,
    pipelined_behind_wrong_user_id,
    reopen_channel_number,
    recover_without_requeue,
    zero_length_body_and_headers,
    user_id_mismatch,
    headers_exchange,
    alternate_exchange,
    qos_change_while_consuming,
    global_qos_then_consumer,
    exclusive_queue_other_connection,
    delete_queue_with_consumer_and_unacked,
    purge_with_unacked,
    queue_declare_counts,
    mixed_confirm_order,
    consumer_priority_and_args,
    invalid_queue_args,
    quorum_queue_basics,
    channel_close_requeues_unacked,
    many_channels,
    server_capabilities_and_tune,
    default_exchange_is_untouchable,
    deletes_of_missing_things,
    single_active_consumer_two_connections,
    consume_exclusive_queue_of_other_connection,
    auto_delete_exchange,
    get_and_consume_on_one_channel,
    exchange_to_exchange_chain,
]


def run(addr: str, fn) -> list:
    t = Target(addr)
    try:
        return fn(t)
    except Exception as e:  # the scenario itself broke: record it, the other side may not
        return [f"scenario raised {type(e).__name__}: {e}", traceback.format_exc().splitlines()[-3]]
    finally:
        t.close_all()


def main(argv: list[str]) -> int:
    direct, proxy, *only = argv
    fails = 0
    for fn in SCENARIOS:
        if only and fn.__name__ not in only:
            continue
        want = run(direct, fn)
        got = run(proxy, fn)
        same = want == got
        print(f"[{'PASS' if same else 'FAIL'}] {fn.__name__}", flush=True)
        if not same:
            fails += 1
            for i in range(max(len(want), len(got))):
                w = want[i] if i < len(want) else "-"
                g = got[i] if i < len(got) else "-"
                mark = " " if w == g else "!"
                print(f"   {mark} rabbitmq: {w}\n   {mark} warren:   {g}")
    print(f"edge cases: {fails} differ" if fails else "edge cases: all the same")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
