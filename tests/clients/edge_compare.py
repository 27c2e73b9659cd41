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
    attempt(obs, "nack(0, multiple)", lambda: nack(ch, 0, multiple=True, requeue=True))
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
    attempt(obs, "nack(12, multiple, requeue)", lambda: nack(ch, 12, multiple=True, requeue=True))
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


def replies_before_returns_and_confirms(t: Target) -> list:
    """A request and four mandatory publishes behind it in one write, half of them unroutable,
    on a confirm-mode channel: one broker handles a channel's methods in order, so the request's
    reply comes before any return or confirm of the publishes behind it."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q, x = uid("order"), uid("orderx")
    declare(ch, q)
    ch.exchange_declare(x, "fanout", auto_delete=False)
    events, settled = [], set()

    def acked(tag, multiple):
        events.append("ack")
        settled.update(range(1, tag + 1) if multiple else [tag])

    ch.events["basic_ack"].add(acked)
    ch.events["basic_return"].add(lambda *a: events.append("return"))
    ch.confirm_select()
    requests = [
        ("declare", amqp.spec.Queue.Declare, "BsbbbbbF", (0, q, False, False, False, False, False, {}),
         amqp.spec.Queue.DeclareOk),
        ("bind", amqp.spec.Queue.Bind, "BsssbF", (0, q, x, "", False, {}), amqp.spec.Queue.BindOk),
        ("purge", amqp.spec.Queue.Purge, "Bsb", (0, q, False), amqp.spec.Queue.PurgeOk),
        ("unbind", amqp.spec.Queue.Unbind, "BsssF", (0, q, x, "", {}), amqp.spec.Queue.UnbindOk),
    ]
    published = 0
    for name, m, fmt, args, ok in requests:
        for round_ in range(3):
            events.clear()
            ch.send_method(m, fmt, args)
            for i in range(4):
                key = uid("nowhere") if i % 2 else q
                ch.send_method(amqp.spec.Basic.Publish, "Bssbb", (0, "", key, True, False),
                               amqp.Message(f"{name}{round_}.{i}"))
            published += 4
            ch.wait(ok)
            events.append(f"{name}-ok")
            deadline = time.monotonic() + 5
            while (len(settled) < published or events.count("return") < 2) and time.monotonic() < deadline:
                drain(c, 0.2)
            obs.append(f"{name} {round_}: first {events[0]}, returns {events.count('return')}, "
                       f"confirmed {len(settled)} of {published}")
    ch.queue_delete(q)
    ch.exchange_delete(x)
    return obs


def cancel_nowait_and_reuse_tag(t: Target) -> list:
    """A consumer cancelled with nowait while its deliveries are in flight, its tag taken at once
    by a consumer of the other ack mode; the client acks all it got, then closes the channel. The
    first consumer's deliveries keep its ack mode: nothing acked comes back, and the ack-all is
    accepted."""
    obs = []
    for first_no_ack in (False, True):
        c = t.connect()
        ch = c.channel()
        q = uid("reusetag")
        declare(ch, q)
        ch.confirm_select()
        for i in range(600):
            ch.basic_publish(amqp.Message(f"m{i}"), "", q)
        cc = c.channel()
        got = []
        cc.basic_consume(q, consumer_tag="t", callback=got.append, no_ack=first_no_ack)
        cc.basic_cancel("t", nowait=True)
        cc.basic_consume(q, consumer_tag="t", callback=got.append, no_ack=not first_no_ack,
                         nowait=True)
        cc.callbacks["t"] = got.append
        drain(c, 1.5)
        obs.append(f"first no_ack={first_no_ack}: received {len(got)} distinct "
                   f"{len({m.body for m in got})}")

        def ack_all():
            cc.basic_ack(0, multiple=True)
            cc.basic_qos(0, 0, False)

        attempt(obs, "ack all", ack_all)
        try:
            cc.close()
        except (amqp.exceptions.AMQPError, OSError) as e:
            obs.append(f"close: {err(e)}")
        time.sleep(0.5)
        c2 = t.connect()
        left = c2.channel().queue_declare(q, passive=True).message_count
        obs.append(f"left in the queue {left}")
        c2.channel().queue_delete(q)
        c2.close()
        c.close()
    return obs


def pipelined_behind_exchange_auto_deleted(t: Target) -> list:
    """An auto-delete exchange published to once, then auto-deleted because this connection
    ended the last consumer of its only (auto-delete) queue: by a basic.cancel, or by closing
    the consumer's channel. A publish to it, then publishes to another queue right behind: one
    broker refuses the first (404) and routes none of the others."""
    obs = []
    for how in ("cancel", "channel.close"):
        c = t.connect()
        setup = c.channel()
        q, x, gone = uid("pipe"), uid("adx"), uid("adq")
        declare(setup, q)
        setup.exchange_declare(x, "fanout", auto_delete=True)
        setup.queue_declare(gone, auto_delete=True)
        setup.queue_bind(gone, x, "")
        ch = c.channel()
        for _ in range(4):
            ch.basic_publish(amqp.Message("first"), x, "")
        consumer = c.channel()
        consumer.basic_consume(gone, consumer_tag="adc", callback=lambda m: None)
        drain(c, 0.3)
        if how == "cancel":
            consumer.basic_cancel("adc")
        else:
            consumer.close()
        raw = lambda msg, exchange, key: ch.send_method(
            amqp.spec.Basic.Publish, "Bssbb", (0, exchange, key, False, False), msg)
        raw(amqp.Message("to-gone"), x, "")
        for i in range(40):
            raw(amqp.Message(f"b{i}"), "", q)
        attempt(obs, f"{how}: sync after", lambda: ch.basic_qos(0, 1, False))
        check = c.channel()
        obs.append(f"{how}: in queue {settle(check, q, 0, timeout=1.0)}")
        check.queue_delete(q)
        c.close()
    return obs


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
    attempt(obs, "read after", lambda: drain(c, 0.5))
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
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 10, False))
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


# ---------------------------------------------------------------------------------------------
# More scenarios: delivery tags across channels, cancels, recover, headers bindings, arguments,
# names, capabilities, closes with deliveries in flight.


def nack(ch, tag: int, multiple: bool = False, requeue: bool = True):
    """basic.nack (this py-amqp has no Channel.basic_nack)."""
    return ch.send_method(amqp.spec.Basic.Nack, "Lbb", (tag, multiple, requeue))


def publish_nc(ch, queue: str, n: int, prefix: str = "m") -> None:
    """publish_n waiting for each publish's confirm (py-amqp's basic_publish does not wait)."""
    for i in range(n):
        ch.basic_publish_confirm(amqp.Message(f"{prefix}{i}"), "", queue)


def text(m) -> str:
    return m.body.decode() if isinstance(m.body, bytes) else m.body


def returned_as_seen(a, names: dict) -> tuple:
    """A basic.return event of py-amqp (exc, exchange, routing_key, message) with generated
    names replaced by labels."""
    exc, exchange, key, msg = a[0], a[1], a[2], a[3]
    return (getattr(exc, "reply_code", None), getattr(exc, "reply_text", None),
            names.get(exchange, exchange), names.get(key, key), text(msg))


def _xdeath(m) -> list:
    """x-death of a dead-lettered message without its time (which differs run to run)."""
    out = []
    for d in (m.headers or {}).get("x-death", []):
        out.append(sorted((k, repr(v)) for k, v in d.items() if k != "time"))
    return out


def ack_tag_of_another_channel(t: Target) -> list:
    """A delivery tag belongs to its channel: ack/nack/reject of another channel's tag is 406."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("xchtag")
    declare(ch, q)
    publish_n(ch, q, 3)
    settle(ch, q, 3)
    got = get_all(ch, q, no_ack=False)
    obs.append(f"got {len(got)} tags {[m.delivery_tag for m in got]}")
    other = c.channel()
    attempt(obs, "ack on other channel", lambda: other.basic_ack(got[0].delivery_tag))
    attempt(obs, "sync after ack", lambda: other.basic_qos(0, 1, False))
    other = c.channel()
    attempt(obs, "nack on other channel", lambda: nack(other, got[1].delivery_tag, requeue=True))
    attempt(obs, "sync after nack", lambda: other.basic_qos(0, 1, False))
    other = c.channel()
    attempt(obs, "reject on other channel", lambda: other.basic_reject(got[2].delivery_tag, requeue=False))
    attempt(obs, "sync after reject", lambda: other.basic_qos(0, 1, False))
    attempt(obs, "owner acks all", lambda: ch.basic_ack(got[-1].delivery_tag, multiple=True))
    attempt(obs, "owner sync", lambda: ch.basic_qos(0, 1, False))
    obs.append(f"left {settle(ch, q, 0)}")
    ch.queue_delete(q)
    return obs


def ack_tag_of_another_channel_that_has_own_deliveries(t: Target) -> list:
    """The other channel holds tags of its own: a tag above them is unknown there (406); one
    within them acks that channel's own delivery."""
    obs = []
    c = t.connect()
    a, b = c.channel(), c.channel()
    qa, qb = uid("owna"), uid("ownb")
    declare(a, qa)
    declare(a, qb)
    publish_n(a, qa, 4, "a")
    publish_n(a, qb, 2, "b")
    settle(a, qa, 4)
    settle(a, qb, 2)
    ga = get_all(a, qa, no_ack=False)
    gb = get_all(b, qb, no_ack=False)
    obs.append(f"a tags {[m.delivery_tag for m in ga]} b tags {[m.delivery_tag for m in gb]}")
    attempt(obs, "b acks tag 1 (its own)", lambda: b.basic_ack(1))
    attempt(obs, "b acks tag 4 (only a has it)", lambda: b.basic_ack(4))
    attempt(obs, "b sync", lambda: b.basic_qos(0, 1, False))
    c2 = c.channel()
    obs.append(f"qb left after b closed {settle(c2, qb, 1)}")
    attempt(obs, "a acks all", lambda: a.basic_ack(0, multiple=True))
    attempt(obs, "a sync", lambda: a.basic_qos(0, 1, False))
    obs.append(f"qa left {settle(c2, qa, 0)}")
    c2.queue_delete(qa)
    c2.queue_delete(qb)
    return obs


def reject_get_then_get_again(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("rejget")
    declare(ch, q)
    ch.basic_publish(amqp.Message("only", message_id="mid-1"), "", q)
    settle(ch, q, 1)
    m = ch.basic_get(q, no_ack=False)
    obs.append(f"first: body {m.body!r} redelivered {m.delivery_info['redelivered']} tag {m.delivery_tag}")
    attempt(obs, "reject requeue", lambda: ch.basic_reject(m.delivery_tag, requeue=True))
    m2 = ch.basic_get(q, no_ack=False)
    obs.append(f"second: body {m2.body!r} redelivered {m2.delivery_info['redelivered']} tag {m2.delivery_tag}"
               f" message_id {m2.properties.get('message_id')}")
    attempt(obs, "reject old tag again", lambda: ch.basic_reject(m.delivery_tag, requeue=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    ch = c.channel()
    obs.append(f"left after channel closed {settle(ch, q, 1)}")
    m3 = ch.basic_get(q, no_ack=True)
    obs.append(f"third redelivered {m3.delivery_info['redelivered'] if m3 else None}")
    ch.queue_delete(q)
    return obs


def ack_after_cancel(t: Target) -> list:
    """Deliveries received before basic.cancel can still be acked after cancel-ok."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("ackcan")
    declare(ch, q)
    publish_n(ch, q, 5)
    settle(ch, q, 5)
    ch.basic_qos(0, 10, False)
    got = []
    ch.basic_consume(q, consumer_tag="before-cancel", callback=lambda m: got.append(m))
    end = time.monotonic() + 3
    while len(got) < 5 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered {len(got)}")
    attempt(obs, "cancel", lambda: ch.basic_cancel("before-cancel"))
    for m in sorted(got, key=lambda m: m.delivery_tag):
        attempt(obs, f"ack {m.delivery_tag} after cancel", lambda m=m: ch.basic_ack(m.delivery_tag))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 10, False))
    ch.close()
    ch = c.channel()
    obs.append(f"left after channel closed {settle(ch, q, 0, timeout=1.0)}")
    ch.queue_delete(q)
    return obs


def nack_multiple_requeue_of_consumer_deliveries(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("nackmc")
    declare(ch, q)
    publish_n(ch, q, 8)
    settle(ch, q, 8)
    ch.basic_qos(0, 100, False)
    got = []
    ch.basic_consume(q, consumer_tag="nm", callback=lambda m: got.append(m))
    end = time.monotonic() + 3
    while len(got) < 8 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"first round {len(got)} redelivered {sum(m.delivery_info['redelivered'] for m in got)}")
    ch.basic_cancel("nm")
    attempt(obs, "nack(max, multiple, requeue)", lambda: nack(ch, max(m.delivery_tag for m in got), multiple=True, requeue=True))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 100, False))
    obs.append(f"in queue after nack {settle(ch, q, 8)}")
    again = []
    ch.basic_consume(q, consumer_tag="nm2", callback=lambda m: again.append(m))
    end = time.monotonic() + 3
    while len(again) < 8 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"second round {len(again)} redelivered {sum(m.delivery_info['redelivered'] for m in again)}"
               f" bodies {bodies(again)}")
    obs.append(f"second round tags {sorted(m.delivery_tag for m in again)}")
    attempt(obs, "ack all", lambda: ch.basic_ack(0, multiple=True))
    attempt(obs, "sync 2", lambda: ch.basic_qos(0, 100, False))
    obs.append(f"left {settle(ch, q, 0)}")
    ch.queue_delete(q)
    return obs


def two_consumers_one_queue_one_channel(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("twoc")
    declare(ch, q)
    ch.basic_qos(0, 100, False)
    got = {"c1": [], "c2": []}
    ch.basic_consume(q, consumer_tag="c1", callback=lambda m: got["c1"].append(m))
    ch.basic_consume(q, consumer_tag="c2", callback=lambda m: got["c2"].append(m))
    p = c.channel()
    p.confirm_select()
    publish_nc(p, q, 20)
    end = time.monotonic() + 3
    while len(got["c1"]) + len(got["c2"]) < 20 and time.monotonic() < end:
        drain(c, 0.1)
    allm = got["c1"] + got["c2"]
    obs.append(f"total {len(allm)} distinct tags {len({m.delivery_tag for m in allm})} bodies {len(set(bodies(allm)))}")
    obs.append(f"each consumer got some: {bool(got['c1']) and bool(got['c2'])}")
    obs.append(f"split c1/c2 {len(got['c1'])}/{len(got['c2'])}")
    obs.append(f"consumer_tag fields right: {all(m.delivery_info['consumer_tag'] == k for k, v in got.items() for m in v)}")
    for m in sorted(allm, key=lambda m: m.delivery_tag):
        ch.basic_ack(m.delivery_tag)
    attempt(obs, "sync", lambda: ch.basic_qos(0, 100, False))
    attempt(obs, "cancel c1", lambda: ch.basic_cancel("c1"))
    publish_nc(p, q, 4, "late")
    drain(c, 0.5)
    obs.append(f"after cancel c1: c1 late {sum(text(m).startswith('late') for m in got['c1'])}"
               f" c2 late {sum(text(m).startswith('late') for m in got['c2'])}")
    ch.basic_ack(0, multiple=True)
    ch.basic_qos(0, 100, False)
    obs.append(f"left {settle(p, q, 0)}")
    ch.close()
    p.queue_delete(q)
    return obs


def two_consumers_two_queues_one_channel(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    qa, qb = uid("tqa"), uid("tqb")
    declare(ch, qa)
    declare(ch, qb)
    ch.basic_qos(0, 50, False)
    got = {"ca": [], "cb": []}
    ch.basic_consume(qa, consumer_tag="ca", callback=lambda m: got["ca"].append(m))
    ch.basic_consume(qb, consumer_tag="cb", callback=lambda m: got["cb"].append(m))
    p = c.channel()
    p.confirm_select()
    publish_nc(p, qa, 6, "a")
    publish_nc(p, qb, 6, "b")
    end = time.monotonic() + 3
    while len(got["ca"]) + len(got["cb"]) < 12 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"ca {bodies(got['ca'])}")
    obs.append(f"cb {bodies(got['cb'])}")
    obs.append(f"tags {sorted(m.delivery_tag for v in got.values() for m in v)}")
    for m in got["ca"]:
        ch.basic_ack(m.delivery_tag)
    for m in got["cb"]:
        ch.basic_reject(m.delivery_tag, requeue=False)
    attempt(obs, "sync", lambda: ch.basic_qos(0, 50, False))
    obs.append(f"left {settle(p, qa, 0)} {settle(p, qb, 0)}")
    ch.close()
    p.queue_delete(qa)
    p.queue_delete(qb)
    return obs


def consumer_tag_255_chars(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("tag255")
    declare(ch, q)
    tag = ("t" * 255)
    attempt(obs, "consume tag of 255", lambda: ch.basic_consume(q, consumer_tag=tag, no_ack=True, callback=lambda m: got.append(m)) == tag)
    got = []
    p = c.channel()
    p.confirm_select()
    publish_nc(p, q, 3)
    end = time.monotonic() + 3
    while len(got) < 3 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered {len(got)} with the tag {all(m.delivery_info['consumer_tag'] == tag for m in got)}")
    utag = "tägé-" + "ü" * 124  # 7 + 248 = 255 bytes of UTF-8
    attempt(obs, "consume unicode tag of 255 bytes", lambda: ch.basic_consume(q, consumer_tag=utag, callback=lambda m: None) == utag)
    attempt(obs, "cancel 255", lambda: ch.basic_cancel(tag))
    attempt(obs, "cancel unicode", lambda: ch.basic_cancel(utag))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 1, False))
    p.queue_delete(q)
    return obs


def consume_with_empty_tag_twice(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("etag")
    declare(ch, q)
    t1 = ch.basic_consume(q, callback=lambda m: None)
    t2 = ch.basic_consume(q, callback=lambda m: None)
    ch2 = c.channel()
    t3 = ch2.basic_consume(q, callback=lambda m: None)
    tags = [t1, t2, t3]
    obs.append(f"distinct {len(set(tags))} amq.ctag- prefixed {[x.startswith('amq.ctag-') for x in tags]}")
    obs.append(f"lengths {[len(x) for x in tags]}")
    r = declare(ch, q)
    obs.append(f"consumer_count {r.consumer_count}")
    for tg in (t1, t2):
        attempt(obs, "cancel generated", lambda tg=tg: ch.basic_cancel(tg))
    attempt(obs, "cancel generated on other channel", lambda: ch2.basic_cancel(t3))
    obs.append(f"consumer_count after {declare(ch, q).consumer_count}")
    ch.queue_delete(q)
    return obs


def get_message_count_bounds(t: Target) -> list:
    """basic.get-ok message_count: warren gives the answering cluster's count (documented), so
    only what holds both ways is compared: never above what is left, 0 at the last message."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("getcnt")
    declare(ch, q)
    ch.confirm_select()
    publish_nc(ch, q, 6)
    counts = []
    for i in range(6):
        m = ch.basic_get(q, no_ack=True)
        counts.append(m.delivery_info["message_count"] if m else None)
    obs.append(f"gets answered {sum(1 for x in counts if x is not None)}")
    obs.append(f"never above the rest: {all(x is not None and x <= 5 - i for i, x in enumerate(counts))}")
    obs.append(f"last {counts[-1]}")
    attempt(obs, "get-empty", lambda: ch.basic_get(q, no_ack=True))
    ch.queue_delete(q)
    return obs


def recover_requeue_after_gets(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("recget")
    declare(ch, q)
    publish_n(ch, q, 4)
    settle(ch, q, 4)
    got = get_all(ch, q, no_ack=False)
    obs.append(f"got {len(got)}")
    attempt(obs, "recover(requeue=True)", lambda: ch.basic_recover(requeue=True))
    obs.append(f"count after recover {settle(ch, q, 4)}")
    again = get_all(ch, q, no_ack=False)
    obs.append(f"again {len(again)} redelivered {sum(m.delivery_info['redelivered'] for m in again)} tags {sorted(m.delivery_tag for m in again)}")
    attempt(obs, "ack an old tag", lambda: ch.basic_ack(got[0].delivery_tag))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 1, False))
    ch = c.channel()
    obs.append(f"left {settle(ch, q, 4)}")
    ch.queue_delete(q)
    return obs


def recover_async(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("recasync")
    declare(ch, q)
    publish_n(ch, q, 3)
    settle(ch, q, 3)
    ch.basic_qos(0, 10, False)
    got = []
    ch.basic_consume(q, callback=lambda m: got.append(m))
    end = time.monotonic() + 3
    while len(got) < 3 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered {len(got)}")
    attempt(obs, "recover_async(requeue=True)", lambda: ch.basic_recover_async(requeue=True))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 10, False))
    end = time.monotonic() + 3
    while len(got) < 6 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered after {len(got)} redelivered {sum(m.delivery_info['redelivered'] for m in got)}")
    ch2 = c.channel()
    attempt(obs, "recover_async(requeue=False)", lambda: ch2.basic_recover_async(requeue=False))
    attempt(obs, "sync after", lambda: ch2.basic_qos(0, 10, False))
    try:
        chk = c.channel()
        obs.append("connection still open")
    except (amqp.exceptions.AMQPError, OSError) as e:
        obs.append(f"connection: {err(e)}")
        chk = t.connect().channel()
    obs.append(f"in queue {settle(chk, q, 3, timeout=2.0)}")
    chk.queue_delete(q)
    return obs


def headers_bind_unbind_with_arguments(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x = uid("hxu")
    qa, qb = uid("hua"), uid("hub")
    ch.exchange_declare(x, "headers", auto_delete=False)
    declare(ch, qa)
    declare(ch, qb)
    all_args = {"x-match": "all", "k1": "v1", "k2": 2}
    any_args = {"x-match": "any", "k1": "v1", "k2": 2}
    ch.queue_bind(qa, x, "", arguments=all_args)
    ch.queue_bind(qb, x, "", arguments=any_args)
    ch.confirm_select()
    hdrs = [{"k1": "v1"}, {"k1": "v1", "k2": 2}, {"k2": 2}, {"k2": "2"}]

    def round_(label):
        for i, h in enumerate(hdrs):
            ch.basic_publish_confirm(amqp.Message(f"{label}{i}", application_headers=h), x, "")
        obs.append(f"{label} all: {bodies(get_all(ch, qa))} any: {bodies(get_all(ch, qb))}")

    round_("r1-")
    attempt(obs, "unbind all with other args", lambda: ch.queue_unbind(qa, x, "", arguments={"x-match": "all", "k1": "v1"}))
    round_("r2-")
    attempt(obs, "unbind all with same args", lambda: ch.queue_unbind(qa, x, "", arguments=dict(all_args)))
    attempt(obs, "unbind any with same args", lambda: ch.queue_unbind(qb, x, "", arguments=dict(any_args)))
    round_("r3-")
    attempt(obs, "unbind again (gone)", lambda: ch.queue_unbind(qb, x, "", arguments=dict(any_args)))
    attempt(obs, "bind twice same args", lambda: (ch.queue_bind(qa, x, "", arguments=all_args), ch.queue_bind(qa, x, "", arguments=all_args)) and None)
    round_("r4-")
    ch.queue_delete(qa)
    ch.queue_delete(qb)
    ch.exchange_delete(x)
    return obs


def passive_exchange_declare_other_type(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x = uid("pxt")
    ch.exchange_declare(x, "direct", auto_delete=False)
    attempt(obs, "passive as fanout", lambda: ch.exchange_declare(x, "fanout", passive=True))
    attempt(obs, "passive as no-such-type", lambda: ch.exchange_declare(x, "no-such-type", passive=True))
    attempt(obs, "passive durable+args", lambda: ch.exchange_declare(x, "topic", passive=True, durable=True, arguments={"alternate-exchange": "zz"}))
    attempt(obs, "passive amq.topic as direct", lambda: ch.exchange_declare("amq.topic", "direct", passive=True))
    attempt(obs, "passive default exchange", lambda: ch.exchange_declare("", "direct", passive=True))
    attempt(obs, "channel after", lambda: ch.basic_qos(0, 1, False))
    ch.exchange_delete(x)
    return obs


def priority_above_max_priority(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("prmax")
    declare(ch, q, arguments={"x-max-priority": 5})
    ch.confirm_select()
    for i, p in enumerate([9, 0, 5, 255, 1]):
        attempt(obs, f"publish priority {p}", lambda i=i, p=p: ch.basic_publish_confirm(amqp.Message(f"p{i}", priority=p), "", q))
    got = get_all(ch, q)
    obs.append(f"got {bodies(got)} priorities {sorted(m.properties.get('priority') for m in got)}")
    attempt(obs, "declare x-max-priority 300", lambda: c.channel().queue_declare(uid("pr300"), arguments={"x-max-priority": 300}))
    attempt(obs, "declare x-max-priority -1", lambda: c.channel().queue_declare(uid("prneg"), arguments={"x-max-priority": -1}))
    c.channel().queue_delete(q)
    return obs


def expiration_zero(t: Target) -> list:
    """expiration "0": dropped unless a consumer can take it at once."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("exp0")
    declare(ch, q)
    ch.confirm_select()
    for i in range(5):
        ch.basic_publish_confirm(amqp.Message(f"z{i}", expiration="0"), "", q)
    time.sleep(0.3)
    obs.append(f"without consumer in queue {count(ch, q)}")
    got = []
    cc = c.channel()
    cc.basic_qos(0, 100, False)
    cc.basic_consume(q, no_ack=True, callback=lambda m: got.append(m))
    drain(c, 0.3)
    for i in range(5):
        ch.basic_publish_confirm(amqp.Message(f"w{i}", expiration="0"), "", q)
    end = time.monotonic() + 3
    while len(got) < 5 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"with consumer delivered {bodies(got)}")
    obs.append(f"expiration property {sorted({m.properties.get('expiration') for m in got})}")
    cc.close()
    ch.queue_delete(q)
    return obs


def message_ttl_zero(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q, dlx, dlq = uid("ttl0"), uid("ttl0dlx"), uid("ttl0dlq")
    ch.exchange_declare(dlx, "fanout", auto_delete=False)
    declare(ch, dlq)
    ch.queue_bind(dlq, dlx, "")
    declare(ch, q, arguments={"x-message-ttl": 0, "x-dead-letter-exchange": dlx})
    ch.confirm_select()
    publish_nc(ch, q, 4, "n")
    obs.append(f"without consumer in queue {settle(ch, q, 0)} dead-lettered {settle(ch, dlq, 4)}")
    dl = get_all(ch, dlq)
    obs.append(f"x-death {[str(_xdeath(m)).replace(q, 'Q').replace(dlx, 'DLX') for m in dl[:1]]}")
    got = []
    cc = c.channel()
    cc.basic_consume(q, no_ack=True, callback=lambda m: got.append(m))
    drain(c, 0.3)
    publish_nc(ch, q, 4, "c")
    end = time.monotonic() + 3
    while len(got) < 4 and time.monotonic() < end:
        drain(c, 0.1)
    drain(c, 0.2)
    obs.append(f"with consumer delivered {bodies(got)} dead-lettered {count(ch, dlq)}")
    cc.close()
    ch.queue_delete(q)
    ch.queue_delete(dlq)
    ch.exchange_delete(dlx)
    return obs


def dead_letter_routing_key(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q, dlx, dlq, other = uid("dlk"), uid("dlkx"), uid("dlkq"), uid("dlko")
    ch.exchange_declare(dlx, "direct", auto_delete=False)
    declare(ch, dlq)
    declare(ch, other)
    ch.queue_bind(dlq, dlx, "dead")
    ch.queue_bind(other, dlx, q)
    declare(ch, q, arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
    ch.confirm_select()
    publish_nc(ch, q, 3, "d")
    got = get_all(ch, q, no_ack=False)
    for m in got:
        ch.basic_reject(m.delivery_tag, requeue=False)
    obs.append(f"dlq {settle(ch, dlq, 3)} other {count(ch, other)} left {settle(ch, q, 0)}")
    dl = get_all(ch, dlq)
    obs.append(f"bodies {bodies(dl)}")
    obs.append(f"routing keys {sorted(m.delivery_info['routing_key'] for m in dl)} exchange {sorted({m.delivery_info['exchange'] for m in dl}) == [dlx]}")
    obs.append(f"x-death {_xdeath(dl[0]) if dl else None}".replace(q, "Q").replace(dlx, "DLX"))
    hdr = (dl[0].headers or {}) if dl else {}
    obs.append(f"first-death {[(k, repr(v).replace(q, 'Q').replace(dlx, 'DLX')) for k, v in sorted(hdr.items()) if k.startswith('x-first-death') or k.startswith('x-last-death')]}")
    for x in (q, dlq, other):
        ch.queue_delete(x)
    ch.exchange_delete(dlx)
    return obs


def overflow_reject_publish_dlx(t: Target) -> list:
    """x-max-length 0 (the same bound per cluster and for the whole queue) with
    x-overflow=reject-publish-dlx: each publish is nacked and dead-lettered."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q, dlx, dlq = uid("rpdlx"), uid("rpdlxx"), uid("rpdlxq")
    ch.exchange_declare(dlx, "fanout", auto_delete=False)
    declare(ch, dlq)
    ch.queue_bind(dlq, dlx, "")
    declare(ch, q, arguments={"x-max-length": 0, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": dlx})
    acks, nacks = [], []
    ch.events["basic_ack"].add(lambda tag, multiple: acks.append((tag, multiple)))
    ch.events["basic_nack"].add(lambda tag, multiple: nacks.append((tag, multiple)))
    ch.confirm_select()
    for i in range(3):
        ch.send_method(amqp.spec.Basic.Publish, "Bssbb", (0, "", q, False, False), amqp.Message(f"o{i}"))
    cover = lambda lst: sorted({x for tag, mult in lst for x in (range(1, tag + 1) if mult else [tag])})
    end = time.monotonic() + 5
    while len(cover(acks)) + len(cover(nacks)) < 3 and time.monotonic() < end:
        drain(c, 0.1)
    drain(c, 0.3)
    obs.append(f"acked {cover(acks)} nacked {cover(nacks)}")
    time.sleep(0.5)
    obs.append(f"queue {count(ch, q)} dlq {settle(ch, dlq, 3)}")
    dl = get_all(ch, dlq)
    obs.append(f"dead-lettered bodies {bodies(dl)}")
    obs.append(f"x-death reasons {sorted(d.get('reason') for m in dl for d in (m.headers or {}).get('x-death', []))}"
               f" counts {sorted(d.get('count') for m in dl for d in (m.headers or {}).get('x-death', []))}")
    for x in (q, dlq):
        ch.queue_delete(x)
    ch.exchange_delete(dlx)
    return obs


def lazy_queue(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("lazy")
    attempt(obs, "declare lazy", lambda: declare(ch, q, arguments={"x-queue-mode": "lazy"}).message_count)
    ch.confirm_select()
    publish_nc(ch, q, 10)
    obs.append(f"count {count(ch, q)}")
    obs.append(f"got {len(get_all(ch, q))}")
    attempt(obs, "redeclare lazy", lambda: declare(ch, q, arguments={"x-queue-mode": "lazy"}).message_count)
    attempt(obs, "redeclare default mode", lambda: declare(ch, q, arguments={"x-queue-mode": "default"}).message_count)
    ch = c.channel()
    attempt(obs, "redeclare without mode", lambda: declare(ch, q).message_count)
    ch = c.channel()
    attempt(obs, "declare bogus mode", lambda: declare(ch, uid("lazyb"), arguments={"x-queue-mode": "bogus"}))
    c.channel().queue_delete(q)
    return obs


def _pad(prefix: str, nbytes: int, ch: str = "n") -> str:
    base = uid(prefix) + "-"
    return base + ch * ((nbytes - len(base.encode())) // len(ch.encode()))


def names_255_bytes_and_unicode(t: Target) -> list:
    import struct
    obs = []
    c = t.connect()
    ch = c.channel()
    q255 = _pad("q255", 255)
    x255 = _pad("x255", 255)
    qu = _pad("qü", 255, "é")
    qu = qu + "n" * (255 - len(qu.encode()))
    xu = "edge-ξ-" + uuid.uuid4().hex[:8] + "-日本語"
    obs.append(f"lengths {[len(n.encode()) for n in (q255, x255, qu, xu)]}")
    attempt(obs, "declare queue 255", lambda: declare(ch, q255).queue == q255)
    attempt(obs, "declare exchange 255", lambda: ch.exchange_declare(x255, "direct", auto_delete=False))
    attempt(obs, "declare unicode queue 255", lambda: declare(ch, qu).queue == qu)
    attempt(obs, "declare unicode exchange", lambda: ch.exchange_declare(xu, "fanout", auto_delete=False))
    attempt(obs, "bind 255 to 255 with 255 key", lambda: ch.queue_bind(q255, x255, "k" * 255))
    attempt(obs, "bind unicode", lambda: ch.queue_bind(qu, xu, ""))
    ch.confirm_select()
    attempt(obs, "publish to 255 exchange", lambda: ch.basic_publish_confirm(amqp.Message("a"), x255, "k" * 255))
    attempt(obs, "publish to unicode exchange", lambda: ch.basic_publish_confirm(amqp.Message("u"), xu, ""))
    attempt(obs, "publish by default exchange to 255 queue", lambda: ch.basic_publish_confirm(amqp.Message("b"), "", q255))
    m = get_all(ch, q255)
    obs.append(f"255 queue got {bodies(m)} routing keys {sorted(len(x.delivery_info['routing_key']) for x in m)} exchanges {sorted(len(x.delivery_info['exchange']) for x in m)}")
    mu = get_all(ch, qu)
    obs.append(f"unicode queue got {bodies(mu)} exchange is the name {[x.delivery_info['exchange'] == xu for x in mu]}")
    got = []
    ch.basic_consume(qu, consumer_tag="ü", no_ack=True, callback=lambda m: got.append(m))
    ch.basic_publish_confirm(amqp.Message("v"), xu, "")
    end = time.monotonic() + 2
    while not got and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"consumed {bodies(got)}")
    attempt(obs, "passive 255", lambda: ch.queue_declare(q255, passive=True).queue == q255)
    try:
        declare(ch, q255 + "n")
        obs.append("declare queue 256: sent")
    except struct.error as e:
        obs.append(f"declare queue 256: client refuses ({type(e).__name__})")
    except (amqp.exceptions.AMQPError, OSError) as e:
        obs.append(f"declare queue 256: {err(e)}")
    attempt(obs, "connection after", lambda: c.channel().basic_qos(0, 1, False))
    attempt(obs, "cancel unicode tag", lambda: ch.basic_cancel("ü"))
    d = c.channel()
    for q in (q255, qu):
        attempt(obs, "delete queue", lambda q=q: d.queue_delete(q))
    for x in (x255, xu):
        attempt(obs, "delete exchange", lambda x=x: d.exchange_delete(x))
    return obs


def _connect_without_capabilities(t: Target) -> amqp.Connection:
    c = amqp.Connection(host=t.addr, userid="guest", password="guest", virtual_host="/",
                        connect_timeout=10)
    c.negotiate_capabilities = {}
    c.connect()
    t.conns.append(c)
    return c


def no_cancel_notify_capability_queue_deleted(t: Target) -> list:
    """A client without consumer_cancel_notify is not sent basic.cancel when its queue goes."""
    obs = []
    c = _connect_without_capabilities(t)
    obs.append(f"client sent capabilities: {'capabilities' in c.client_properties}")
    ch = c.channel()
    q = uid("nocap")
    declare(ch, q)
    got, cancelled = [], []
    ch.basic_consume(q, consumer_tag="nocap-c", no_ack=True, callback=lambda m: got.append(m),
                     on_cancel=lambda tag: cancelled.append(tag))
    other = t.connect()
    oc = other.channel()
    oc.confirm_select()
    publish_nc(oc, q, 3)
    end = time.monotonic() + 3
    while len(got) < 3 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered {len(got)}")
    attempt(obs, "delete from other connection", lambda: oc.queue_delete(q))
    try:
        drain(c, 1.0)
        obs.append(f"cancel notifications {cancelled}")
    except amqp.exceptions.ConsumerCancelled as e:
        obs.append(f"raised ConsumerCancelled {e}")
    attempt(obs, "channel usable", lambda: ch.basic_qos(0, 1, False))
    attempt(obs, "cancel the gone consumer", lambda: ch.basic_cancel("nocap-c"))
    declare(oc, q)
    attempt(obs, "consume again with the same tag", lambda: ch.basic_consume(q, consumer_tag="nocap-c", no_ack=True, callback=lambda m: got.append(m)))
    publish_nc(oc, q, 2, "again")
    end = time.monotonic() + 3
    while len(got) < 5 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered after {len(got)}")
    oc.queue_delete(q)
    return obs


def broker_cancel_then_consume_again(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("bcan")
    declare(ch, q)
    ch.basic_qos(0, 10, False)
    got, cancelled = [], []
    ch.basic_consume(q, consumer_tag="bc", callback=lambda m: got.append(m),
                     on_cancel=lambda tag: cancelled.append(tag))
    other = t.connect()
    oc = other.channel()
    oc.confirm_select()
    publish_nc(oc, q, 4)
    end = time.monotonic() + 3
    while len(got) < 4 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered {len(got)}")
    attempt(obs, "delete from other connection", lambda: oc.queue_delete(q))
    end = time.monotonic() + 3
    while not cancelled and time.monotonic() < end:
        drain(c, 0.1)
    drain(c, 0.3)
    obs.append(f"cancel notifications {cancelled}")
    attempt(obs, "ack a delivery of the cancelled consumer", lambda: ch.basic_ack(got[0].delivery_tag))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 10, False))
    attempt(obs, "cancel after broker cancel", lambda: ch.basic_cancel("bc"))
    attempt(obs, "consume deleted queue", lambda: ch.basic_consume(q, consumer_tag="bc", callback=lambda m: None))
    ch = c.channel()
    ch.basic_qos(0, 10, False)
    attempt(obs, "publish to the deleted queue (default exchange)", lambda: oc.basic_publish_confirm(amqp.Message("lost"), "", q))
    declare(oc, q)
    got2 = []
    attempt(obs, "consume redeclared with same tag", lambda: ch.basic_consume(q, consumer_tag="bc", callback=lambda m: got2.append(m)))
    publish_nc(oc, q, 3, "again")
    end = time.monotonic() + 3
    while len(got2) < 3 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered again {bodies(got2)} redelivered {sum(m.delivery_info['redelivered'] for m in got2)}")
    attempt(obs, "ack again", lambda: ch.basic_ack(0, multiple=True))
    attempt(obs, "sync 2", lambda: ch.basic_qos(0, 10, False))
    obs.append(f"left {settle(oc, q, 0)}")
    oc.queue_delete(q)
    return obs


def channel_close_while_deliveries_flow(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("flowclose")
    declare(ch, q)
    ch.confirm_select()
    publish_nc(ch, q, 200)
    obs.append(f"published {settle(ch, q, 200)}")
    cc = c.channel()
    cc.basic_qos(0, 50, False)
    got, acked = [], set()

    def on_msg(m):
        got.append(m)
        if len(got) % 2 == 0:
            cc.basic_ack(m.delivery_tag)
            acked.add(text(m))

    cc.basic_consume(q, callback=on_msg)
    end = time.monotonic() + 0.5
    while len(got) < 80 and time.monotonic() < end:
        drain(c, 0.02)
    attempt(obs, "close channel mid-flow", lambda: cc.close())
    obs.append(f"delivered some but not all: {0 < len(got) < 200}")
    left = settle(ch, q, 200 - len(acked))
    obs.append(f"left == 200 - acked: {left == 200 - len(acked)}" + ("" if left == 200 - len(acked) else f" ({left} vs {200 - len(acked)})"))
    again = get_all(ch, q)
    back = set(bodies(again))
    obs.append(f"got back all unacked: {back == {f'm{i}' for i in range(200)} - acked} distinct {len(back) == len(again)}")
    obs.append(f"redelivered at least delivered-and-unacked: {sum(m.delivery_info['redelivered'] for m in again) >= len(got) - len(acked)}")
    ch.queue_delete(q)
    return obs


def global_qos_3_two_consumers(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    qa, qb = uid("g3a"), uid("g3b")
    declare(ch, qa)
    declare(ch, qb)
    publish_n(ch, qa, 10, "a")
    publish_n(ch, qb, 10, "b")
    settle(ch, qa, 10)
    settle(ch, qb, 10)
    cc = c.channel()
    cc.basic_qos(0, 3, True)
    got = []
    cc.basic_consume(qa, callback=lambda m: got.append(m))
    cc.basic_consume(qb, callback=lambda m: got.append(m))
    drain(c, 0.7)
    obs.append(f"unacked with global prefetch 3: {within(len(got), 3)}")
    worst = len(got)
    acked = 0
    end = time.monotonic() + 10
    while acked < 20 and time.monotonic() < end:
        pending = [m for m in got[acked:]]
        if not pending:
            drain(c, 0.1)
            continue
        cc.basic_ack(pending[0].delivery_tag)
        acked += 1
        drain(c, 0.05)
        worst = max(worst, len(got) - acked)
    obs.append(f"all 20 delivered {len(got)} max unacked {'<= 3' if worst <= 3 else worst}")
    cc.close()
    obs.append(f"left {count(ch, qa)} {count(ch, qb)}")
    ch.queue_delete(qa)
    ch.queue_delete(qb)
    return obs


def confirm_mandatory_unroutable(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    x, ae = uid("cmx"), uid("cmae")
    ch.exchange_declare(ae, "fanout", auto_delete=False)  # no binding: routes nowhere
    ch.exchange_declare(x, "direct", auto_delete=False, arguments={"alternate-exchange": ae})
    returned = []
    ch.events["basic_return"].add(lambda *a: returned.append(a))
    acks = []
    ch.events["basic_ack"].add(lambda tag, multiple: acks.append(tag))
    ch.confirm_select()
    attempt(obs, "publish via AE with no binding, mandatory", lambda: ch.basic_publish_confirm(amqp.Message("ae"), x, "k", mandatory=True))
    k1, k2, nq = uid("nokey"), uid("nokey"), uid("noq")
    attempt(obs, "publish to amq.direct unbound, mandatory", lambda: ch.basic_publish_confirm(amqp.Message("ad"), "amq.direct", k1, mandatory=True))
    attempt(obs, "publish to amq.direct unbound, not mandatory", lambda: ch.basic_publish_confirm(amqp.Message("nm"), "amq.direct", k2))
    attempt(obs, "publish to missing queue by default exchange, mandatory", lambda: ch.basic_publish_confirm(amqp.Message("dq"), "", nq, mandatory=True))
    drain(c, 0.3)
    obs.append(f"returned {sorted(returned_as_seen(a, {x: 'X', k1: 'K1', k2: 'K2', nq: 'NQ'}) for a in returned)}")
    obs.append(f"acks {sorted(acks)}")
    q = uid("cmq")
    declare(ch, q)
    ch.queue_bind(q, ae, "")
    attempt(obs, "publish via AE now bound, mandatory", lambda: ch.basic_publish_confirm(amqp.Message("ae2"), x, "k", mandatory=True))
    drain(c, 0.3)
    obs.append(f"returned now {len(returned)} in ae queue {bodies(get_all(ch, q))}")
    ch.queue_delete(q)
    ch.exchange_delete(x)
    ch.exchange_delete(ae)
    return obs


def exclusive_auto_delete_queue_across_channels(t: Target) -> list:
    obs = []
    c = t.connect()
    c1, c2 = c.channel(), c.channel()
    q = uid("exad")
    attempt(obs, "declare exclusive auto_delete", lambda: c1.queue_declare(q, exclusive=True, auto_delete=True).queue == q)
    attempt(obs, "publish from second channel", lambda: c2.basic_publish(amqp.Message("x"), "", q))
    obs.append(f"count {settle(c2, q, 1)}")
    attempt(obs, "get from second channel", lambda: c2.basic_get(q, no_ack=True).body)
    c1.close()
    attempt(obs, "queue stays after declaring channel closed", lambda: c2.queue_declare(q, passive=True).message_count)
    c2.basic_consume(q, consumer_tag="ad", callback=lambda m: None)
    attempt(obs, "cancel the only consumer", lambda: c2.basic_cancel("ad"))
    time.sleep(0.3)
    attempt(obs, "auto-deleted after its consumer left", lambda: c.channel().queue_declare(q, passive=True).message_count)
    return obs


def exclusive_queue_outlives_channel_not_connection(t: Target) -> list:
    obs = []
    c = t.connect()
    other = t.connect()
    ch = c.channel()
    q = uid("exlife")
    declare(ch, q, exclusive=True)
    publish_n(ch, q, 2)
    settle(ch, q, 2)
    ch.close()
    attempt(obs, "owner sees it after channel close", lambda: c.channel().queue_declare(q, passive=True).message_count)
    attempt(obs, "other connection (locked)", lambda: other.channel().queue_declare(q, passive=True).message_count)
    c.close()
    time.sleep(0.5)
    attempt(obs, "other connection after owner closed", lambda: other.channel().queue_declare(q, passive=True).message_count)
    attempt(obs, "redeclare by other", lambda: declare(other.channel(), q).message_count)
    other.channel().queue_delete(q)
    return obs


def heartbeat_zero_idle_then_publish(t: Target) -> list:
    obs = []
    c = t.connect(heartbeat=0)
    obs.append(f"negotiated heartbeat {c.heartbeat}")
    ch = c.channel()
    q = uid("hb0")
    declare(ch, q)
    time.sleep(5)
    ch.confirm_select()
    attempt(obs, "publish after 5 s idle", lambda: ch.basic_publish_confirm(amqp.Message("late"), "", q))
    obs.append(f"got {bodies(get_all(ch, q))}")
    ch.queue_delete(q)
    return obs


def connection_close_with_unacked_consumer(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("ccunack")
    declare(ch, q)
    publish_n(ch, q, 10)
    settle(ch, q, 10)
    ch.basic_qos(0, 100, False)
    got = []
    ch.basic_consume(q, callback=lambda m: got.append(m))
    end = time.monotonic() + 3
    while len(got) < 10 and time.monotonic() < end:
        drain(c, 0.1)
    ch.basic_ack(got[0].delivery_tag)
    ch.basic_qos(0, 100, False)
    obs.append(f"delivered {len(got)}")
    attempt(obs, "connection.close", lambda: c.close())
    other = t.connect()
    oc = other.channel()
    time.sleep(1)
    obs.append(f"back in queue after 1 s {count(oc, q)}")
    again = get_all(oc, q)
    obs.append(f"redelivered {sum(m.delivery_info['redelivered'] for m in again)} of {len(again)}")
    oc.queue_delete(q)
    return obs


def exchange_delete_with_e2e_bindings(t: Target) -> list:
    obs = []
    c = t.connect()
    ch = c.channel()
    src, mid, q = uid("e2ds"), uid("e2dm"), uid("e2dq")
    ch.exchange_declare(src, "fanout", auto_delete=False)
    ch.exchange_declare(mid, "fanout", auto_delete=False)
    declare(ch, q)
    ch.exchange_bind(mid, src, "")
    ch.queue_bind(q, mid, "")
    returned = []
    ch.events["basic_return"].add(lambda *a: returned.append(returned_as_seen(a, {src: "SRC"})))
    ch.confirm_select()
    attempt(obs, "publish through the chain", lambda: ch.basic_publish_confirm(amqp.Message("one"), src, "", mandatory=True))
    obs.append(f"in queue {bodies(get_all(ch, q))}")
    attempt(obs, "delete the middle exchange", lambda: ch.exchange_delete(mid))
    attempt(obs, "publish to the source, mandatory", lambda: ch.basic_publish_confirm(amqp.Message("two"), src, "", mandatory=True))
    drain(c, 0.3)
    obs.append(f"returned {returned} in queue {bodies(get_all(ch, q))}")
    attempt(obs, "source if_unused (no bindings left)", lambda: ch.exchange_delete(src, if_unused=True))
    attempt(obs, "publish to the deleted source", lambda: ch.basic_publish_confirm(amqp.Message("three"), src, ""))
    attempt(obs, "sync after", lambda: ch.basic_qos(0, 1, False))
    ch = c.channel()
    attempt(obs, "passive source", lambda: ch.exchange_declare(src, "fanout", passive=True))
    ch = c.channel()
    ch.queue_delete(q)
    return obs


def exchange_delete_source_with_e2e_bindings(t: Target) -> list:
    """Deleting the source of an exchange-to-exchange binding removes the binding; the
    destination keeps its own bindings and still routes."""
    obs = []
    c = t.connect()
    ch = c.channel()
    src, dst, q = uid("e2ss"), uid("e2sd"), uid("e2sq")
    ch.exchange_declare(src, "topic", auto_delete=False)
    ch.exchange_declare(dst, "direct", auto_delete=False)
    declare(ch, q)
    ch.exchange_bind(dst, src, "#")
    ch.queue_bind(q, dst, "k")
    ch.confirm_select()
    attempt(obs, "delete source", lambda: ch.exchange_delete(src))
    attempt(obs, "publish to destination", lambda: ch.basic_publish_confirm(amqp.Message("d"), dst, "k"))
    attempt(obs, "dst if_unused (queue bound)", lambda: ch.exchange_delete(dst, if_unused=True))
    ch = c.channel()
    obs.append(f"in queue {bodies(get_all(ch, q))}")
    attempt(obs, "publish to deleted source", lambda: ch.basic_publish(amqp.Message("s"), src, "k"))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 1, False))
    ch = c.channel()
    ch.exchange_delete(dst)
    ch.queue_delete(q)
    return obs


def multiple_ack_spanning_two_consumers(t: Target) -> list:
    """ack(multiple) and nack(0, multiple) over deliveries of two consumers of two queues on one
    channel: which tags belong to which queue depends on timing, the totals do not."""
    obs = []
    c = t.connect()
    ch = c.channel()
    qa, qb = uid("spa"), uid("spb")
    declare(ch, qa)
    declare(ch, qb)
    publish_n(ch, qa, 6, "a")
    publish_n(ch, qb, 6, "b")
    settle(ch, qa, 6)
    settle(ch, qb, 6)
    cc = c.channel()
    cc.basic_qos(0, 100, False)
    got = []
    cc.basic_consume(qa, consumer_tag="sa", callback=lambda m: got.append(m))
    cc.basic_consume(qb, consumer_tag="sb", callback=lambda m: got.append(m))
    end = time.monotonic() + 3
    while len(got) < 12 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"delivered {len(got)} tags {sorted(m.delivery_tag for m in got)}")
    attempt(obs, "ack(6, multiple)", lambda: cc.basic_ack(6, multiple=True))
    attempt(obs, "nack(0, multiple, requeue=False)", lambda: nack(cc, 0, multiple=True, requeue=False))
    attempt(obs, "sync", lambda: cc.basic_qos(0, 100, False))
    attempt(obs, "ack(3) after all settled", lambda: cc.basic_ack(3))
    attempt(obs, "sync 2", lambda: cc.basic_qos(0, 100, False))
    obs.append(f"left total {settle(ch, qa, 0) + settle(ch, qb, 0)}")
    cc.close()
    ch.queue_delete(qa)
    ch.queue_delete(qb)
    return obs


def consume_no_local(t: Target) -> list:
    """RabbitMQ ignores no_local: a consumer gets its own connection's publishes."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("nolocal")
    declare(ch, q)
    got = []
    attempt(obs, "consume no_local", lambda: ch.basic_consume(q, consumer_tag="nl", no_local=True, no_ack=True, callback=lambda m: got.append(m)))
    p = c.channel()
    publish_nc(p, q, 3)
    end = time.monotonic() + 2
    while len(got) < 3 and time.monotonic() < end:
        drain(c, 0.1)
    obs.append(f"own publishes delivered {len(got)}")
    ch.close()
    p.queue_delete(q)
    return obs


def delete_if_empty_with_only_unacked(t: Target) -> list:
    """queue.delete if_empty looks at ready messages: a queue whose messages are all
    delivered and unacknowledged is empty."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("ifempty")
    declare(ch, q)
    publish_n(ch, q, 2)
    settle(ch, q, 2)
    held = get_all(ch, q, no_ack=False)
    obs.append(f"held {len(held)} ready {count(ch, q)}")
    d = c.channel()
    attempt(obs, "delete if_empty", lambda: d.queue_delete(q, if_empty=True))
    d = c.channel()
    attempt(obs, "passive after", lambda: d.queue_declare(q, passive=True).message_count)
    attempt(obs, "ack after delete", lambda: ch.basic_ack(0, multiple=True))
    attempt(obs, "sync", lambda: ch.basic_qos(0, 1, False))
    c.channel().queue_delete(q)
    return obs


def reject_publish_dlx_each_message_once(t: Target) -> list:
    """x-overflow=reject-publish-dlx with x-max-length 1: whatever the per-cluster bound lets in
    (documented), each message ends up once: in the queue (taken by get) or dead-lettered,
    never both, never twice."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q, dlx, dlq = uid("rpo"), uid("rpox"), uid("rpoq")
    ch.exchange_declare(dlx, "fanout", auto_delete=False)
    declare(ch, dlq)
    ch.queue_bind(dlq, dlx, "")
    declare(ch, q, arguments={"x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": dlx})
    p = c.channel()
    sent = []

    def pub(body):
        sent.append(body)
        try:
            p.basic_publish_confirm(amqp.Message(body), "", q)
            return "ack"
        except amqp.exceptions.MessageNacked:
            return "nack"

    confirms = {pub(f"fill{i}") for i in range(2)}
    taken = []
    for i in range(4):
        m = ch.basic_get(q, no_ack=True)
        if m:
            taken.append(text(m))
        confirms.add(pub(f"m{i}"))
    time.sleep(0.5)
    queued = taken + [text(m) for m in get_all(ch, q)]
    dead = [text(m) for m in get_all(ch, dlq)]
    obs.append(f"dead-lettered twice: {sorted({b for b in dead if dead.count(b) > 1})}")
    obs.append(f"both queued and dead-lettered: {sorted(set(queued) & set(dead))}")
    obs.append(f"every message somewhere: {set(queued) | set(dead) == set(sent)}")
    for x in (q, dlq):
        ch.queue_delete(x)
    ch.exchange_delete(dlx)
    return obs



def consume_pipelined_with_a_publish(t: Target) -> list:
    """basic.consume and then a publish on the same channel sent back to back, as pika's async
    adapters do (no wait for consume-ok). RabbitMQ's queue process sends consume-ok, so replies
    to what follows the consume (warren's own check behind a first publish to an exchange) may
    come first; the consumer must get its consume-ok and every message either way."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q, x = uid("pipecons"), uid("pipex")
    declare(ch, q)
    ch.exchange_declare(x, "fanout", auto_delete=False)
    ch.queue_bind(q, x)
    got = []
    ch.callbacks["ctag-pipe"] = got.append
    ch.no_ack_consumers.add("ctag-pipe")
    ch.send_method(amqp.spec.Basic.Consume, "BssbbbbF", (0, q, "ctag-pipe", False, True, False, False, {}))
    for i in range(10):
        ch.basic_publish(amqp.Message(f"p{i}"), x, "")
    # Not ch.wait(ConsumeOk): py-amqp may read the consume-ok while it reads deliveries, and a
    # wait without a timeout would then never return. What matters is what arrives.
    end = time.monotonic() + 5
    while len(got) < 10 and time.monotonic() < end:
        drain(c, 0.2)
    obs.append(f"received {sorted(m.body for m in got)}")
    attempt(obs, "cancel", lambda: ch.basic_cancel("ctag-pipe"))
    ch.exchange_delete(x)
    ch.queue_delete(q)
    return obs


def reopen_refused_channel_pipelined(t: Target) -> list:
    """A channel one broker closed (a publish to a missing exchange), opened again at once with
    the same number and used without waiting for open-ok, as asynchronous clients do (py-amqp
    and kombu reuse the lowest free number): everything sent behind the open is processed."""
    obs = []
    c = t.connect()
    q = uid("reopenpipe")
    setup = c.channel()
    declare(setup, q)
    for round_ in range(4):
        ch = c.channel(5) if round_ == 0 else ch
        ch._do_revive = lambda: None  # py-amqp reopens synchronously; this test pipelines
        ch.send_method(amqp.spec.Basic.Publish, "Bssbb", (0, uid("nox"), "k", False, False),
                       amqp.Message("lost"))
        attempt(obs, f"round {round_}: sync after refused publish",
                lambda: ch.basic_qos(0, 1, False))
        ch.collect()
        ch = amqp.Channel(c, 5)
        ch.send_method(amqp.spec.Channel.Open, "s", ("",))
        for i in range(6):
            ch.send_method(amqp.spec.Basic.Publish, "Bssbb", (0, "", q, False, False),
                           amqp.Message(f"r{round_}-{i}"))
        attempt(obs, f"round {round_}: qos behind the open",
                lambda: ch.basic_qos(0, 5, False))
    obs.append(f"in queue {settle(setup, q, 24)}")
    obs.append(f"received {bodies(get_all(setup, q))}")
    setup.queue_delete(q)
    return obs


def conditional_deletes_of_missing_and_partial_queues(t: Target) -> list:
    """queue.delete with if_empty / if_unused of a queue that does not exist is delete-ok (0),
    as an unconditional one; the channel stays usable, with its consumer and unacked messages;
    a queue exclusive to another connection is refused (405) whatever the conditions."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("keep")
    declare(ch, q)
    publish_n(ch, q, 6)
    settle(ch, q, 6)
    ch.basic_qos(0, 2, False)
    got, acking = [], []

    def on_message(m):
        got.append(m)
        if acking:
            ch.basic_ack(m.delivery_tag)

    ch.basic_consume(q, consumer_tag="held", callback=on_message)
    end = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < end:
        drain(c, 0.2)
    for flags in ((True, False), (False, True), (True, True)):
        attempt(obs, f"delete missing if_unused={flags[0]} if_empty={flags[1]}",
                lambda: ch.queue_delete(uid("noq"), if_unused=flags[0], if_empty=flags[1]))
    attempt(obs, "same channel still works", lambda: ch.queue_declare(q, passive=True)[1:])
    acking.append(True)
    for m in got:
        ch.basic_ack(m.delivery_tag)
    end = time.monotonic() + 5
    while len(got) < 6 and time.monotonic() < end:
        drain(c, 0.2)
    obs.append(f"consumed {bodies(got)}")
    attempt(obs, "cancel", lambda: ch.basic_cancel("held"))
    other = t.connect().channel()
    xq = uid("excl")
    other.queue_declare(xq, exclusive=True)
    attempt(obs, "delete exclusive of another connection if_empty",
            lambda: ch.queue_delete(xq, if_empty=True))
    ch = c.channel()
    attempt(obs, "delete own queue if_empty", lambda: ch.queue_delete(q, if_empty=True))
    return obs


def expiring_queue_polled_by_get(t: Target) -> list:
    """An x-expires queue kept alive by basic.get (warren renews the lease on the clusters a
    get did not ask, on a channel of its own): the polling channel is never disturbed."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = uid("expget")
    declare(ch, q, arguments={"x-expires": 3000})
    publish_n(ch, q, 4)
    settle(ch, q, 4)
    seen = []
    for _ in range(4):
        m = ch.basic_get(q, no_ack=True)
        if m is not None:
            seen.append(m.body)
        time.sleep(0.3)
    obs.append(f"got {sorted(seen)}")
    attempt(obs, "channel usable", lambda: ch.basic_qos(0, 1, False))
    ch.queue_delete(q)
    return obs


SCENARIOS = [
    consume_pipelined_with_a_publish,
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
    pipelined_behind_exchange_auto_deleted,
    replies_before_returns_and_confirms,
    cancel_nowait_and_reuse_tag,
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
    ack_tag_of_another_channel,
    ack_tag_of_another_channel_that_has_own_deliveries,
    reject_get_then_get_again,
    ack_after_cancel,
    nack_multiple_requeue_of_consumer_deliveries,
    two_consumers_one_queue_one_channel,
    two_consumers_two_queues_one_channel,
    consumer_tag_255_chars,
    consume_with_empty_tag_twice,
    get_message_count_bounds,
    recover_requeue_after_gets,
    recover_async,
    headers_bind_unbind_with_arguments,
    passive_exchange_declare_other_type,
    priority_above_max_priority,
    expiration_zero,
    message_ttl_zero,
    dead_letter_routing_key,
    overflow_reject_publish_dlx,
    lazy_queue,
    names_255_bytes_and_unicode,
    no_cancel_notify_capability_queue_deleted,
    broker_cancel_then_consume_again,
    channel_close_while_deliveries_flow,
    global_qos_3_two_consumers,
    confirm_mandatory_unroutable,
    exclusive_auto_delete_queue_across_channels,
    exclusive_queue_outlives_channel_not_connection,
    heartbeat_zero_idle_then_publish,
    connection_close_with_unacked_consumer,
    exchange_delete_with_e2e_bindings,
    exchange_delete_source_with_e2e_bindings,
    multiple_ack_spanning_two_consumers,
    consume_no_local,
    delete_if_empty_with_only_unacked,
    reject_publish_dlx_each_message_once,
    reopen_refused_channel_pipelined,
    conditional_deletes_of_missing_and_partial_queues,
    expiring_queue_polled_by_get,
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
        # A scenario that breaks against RabbitMQ tests nothing, even if it breaks alike.
        broken = bool(want) and want[0].startswith("scenario raised")
        same = want == got and not broken
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
