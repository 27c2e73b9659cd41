"""Edge cases as pika users write them, run directly against RabbitMQ and through warren with the
same code, and compared observation by observation.

    python tests/clients/pika_edge.py DIRECT_ADDR PROXY_ADDR [SCENARIO ...]

e.g. `.venv/bin/python tests/clients/pika_edge.py 127.0.0.1:5701 127.0.0.1:5674`. With SCENARIO
names only those run; `--list` prints the names; `-v` prints the observations of passing
scenarios too; `--texts` compares the reply texts of errors as well as their codes. The whole
run takes about two minutes (heartbeat scenarios idle on purpose).

The companion of edge_compare.py (py-amqp, protocol corners) for pika (1.x): the patterns of
pika's own documentation and examples, mostly with BlockingConnection (the consume() generator
and its cancel(), basic_get loops with nack, UnroutableError and NackError of confirmed
publishes, transactions, on_cancel callbacks, heartbeats and frame_max negotiation, properties
and header tables round trips, queue arguments of every family, refusals of reserved names,
vhosts and passwords) and SelectConnection / AsyncioConnection for pipelined asynchronous
patterns (a whole topology set up from callbacks or with nowait methods without waiting,
publishes pipelined behind one the broker refuses, confirms in flight together and their order,
several channels failing and working side by side).

Each scenario takes a Target and returns the list of what a client observes: replies, reply
codes of errors, counts, which bodies arrive. Reply texts are compared only with `--texts`
(generated names replaced; warren words a few errors of its own differently). RabbitMQ's answer is the expected one by construction, so a scenario needs no
hand-written expectation and any difference fails. Where docs/semantics.md and docs/routing.md
document a difference (order across clusters, get-ok message_count, prefetch split over the
shard clusters, per-cluster x-max-length, server-named queue names, when a wrong password is
refused) the observation avoids it: bodies are sorted, counts are whole-queue counts, limits
are 0 or unlimited.

Every wait is bounded: a step that does not answer in time is observed as "timeout" (a hang
through warren is itself a finding), and a whole scenario is stopped after SCENARIO_SECONDS.
Names are unique per run and what a scenario declares by name is deleted afterwards on a
fresh connection.

Exits 0 when every scenario observes the same both ways; prints a diff otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import re
import signal
import sys
import time
import traceback
import uuid

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.spec import BasicProperties

SCENARIO_SECONDS = 90  # a whole scenario, one side
STEP_SECONDS = 15  # one bounded step
TEXTS = False  # --texts: compare reply texts too


# ---------------------------------------------------------------------------------------------
# Bounded waits


class Timeout(Exception):
    """Raised by the interval timer when a bounded step takes too long."""


def _on_alarm(_signum, _frame):
    raise Timeout()


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises Timeout in the block after `seconds` (never later than an enclosing deadline)."""
    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    limit = seconds if outer == 0 else min(seconds, outer)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            left = outer - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


# ---------------------------------------------------------------------------------------------
# Targets, observations


def uid(prefix: str) -> str:
    return f"pika-edge-{prefix}-{uuid.uuid4().hex[:10]}"


class Target:
    def __init__(self, addr: str):
        self.addr = addr
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.conns: list = []
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def params(self, **kw) -> pika.ConnectionParameters:
        kw.setdefault("credentials", pika.PlainCredentials("guest", "guest"))
        kw.setdefault("virtual_host", "/")
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("stack_timeout", 10)
        kw.setdefault("blocked_connection_timeout", 30)
        return pika.ConnectionParameters(host=self.host, port=self.port, **kw)

    def connect(self, **kw) -> pika.BlockingConnection:
        with deadline(STEP_SECONDS):
            c = pika.BlockingConnection(self.params(**kw))
        self.conns.append(c)
        return c

    def q(self, prefix: str) -> str:
        """A queue name of this run, deleted at the end."""
        name = uid(prefix)
        self.queues.append(name)
        return name

    def x(self, prefix: str) -> str:
        """An exchange name of this run, deleted at the end."""
        name = uid(prefix)
        self.exchanges.append(name)
        return name

    def close_all(self) -> None:
        for c in self.conns:
            try:
                with deadline(5):
                    if c.is_open:
                        c.close()
            except BaseException:
                pass
        self.conns.clear()
        if not (self.queues or self.exchanges):
            return
        try:
            with deadline(20):
                c = pika.BlockingConnection(self.params())
                for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                    for name in names:
                        try:
                            ch = c.channel()
                            (ch.queue_delete if kind == "queue" else ch.exchange_delete)(name)
                            ch.close()
                        except pika.exceptions.AMQPError:
                            pass
                c.close()
        except BaseException as e:
            print(f"   (cleanup on {self.addr} failed: {type(e).__name__})", flush=True)


def code_of(e: BaseException):
    """The AMQP reply code a pika exception carries, looking inside the wrappers pika uses
    while a connection is being opened."""
    seen = 0
    while e is not None and seen < 4:
        seen += 1
        code = getattr(e, "reply_code", None)
        if isinstance(code, int):
            return code
        args = getattr(e, "args", ())
        if len(args) >= 1 and isinstance(args[0], int):
            return args[0]
        if len(args) >= 1 and isinstance(args[0], BaseException):
            e = args[0]
            continue
        m = re.search(r"\((\d{3})\)", repr(e))
        return int(m.group(1)) if m else None
    return None


GENERATED = re.compile(r"pika-edge-[\w.-]*?[0-9a-f]{6,10}\b|amq\.pika-edge-[0-9a-f]+|ctag[\w.-]+|"
                       r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def text_of(e: BaseException):
    """The reply text a pika exception carries, with generated names replaced by NAME."""
    seen = 0
    while e is not None and seen < 4:
        seen += 1
        text = getattr(e, "reply_text", None)
        if isinstance(text, str):
            return GENERATED.sub("NAME", text)
        args = getattr(e, "args", ())
        if len(args) >= 2 and isinstance(args[0], int) and isinstance(args[1], str):
            return GENERATED.sub("NAME", args[1])
        if len(args) >= 1 and isinstance(args[0], BaseException):
            e = args[0]
            continue
        return None
    return None


def err(e: BaseException) -> str:
    """An error as a client sees it: its reply code, else its class; with TEXTS, the reply text
    too (generated names replaced)."""
    if isinstance(e, Timeout):
        return "timeout"
    code = code_of(e)
    if code is not None:
        text = text_of(e) if TEXTS else None
        return f"error {code} {text!r}" if text is not None else f"error {code}"
    return f"error {type(e).__name__}"


def attempt(obs: list, label: str, fn, seconds: float = STEP_SECONDS):
    """Runs fn, recording `label: result` (or the error). Returns (ok, result)."""
    try:
        with deadline(seconds):
            r = fn()
    except (pika.exceptions.AMQPError, OSError, Timeout) as e:
        obs.append(f"{label}: {err(e)}")
        return False, e
    shown = "ok" if r is None else r
    if isinstance(r, pika.frame.Method):
        shown = describe_method(r.method)
    obs.append(f"{label}: {shown}")
    return True, r


def describe_method(m) -> str:
    """A reply method with the fields worth comparing (names the server generates left out)."""
    name = type(m).__name__
    if isinstance(m, pika.spec.Queue.DeclareOk):
        return f"{name}(message_count={m.message_count}, consumer_count={m.consumer_count})"
    if isinstance(m, (pika.spec.Queue.PurgeOk, pika.spec.Queue.DeleteOk)):
        return f"{name}(message_count={m.message_count})"
    return name


def count(ch, queue: str) -> int:
    return ch.queue_declare(queue, passive=True).method.message_count


def settle(ch, queue: str, want: int, timeout: float = 5.0) -> int:
    """Waits until the queue holds `want` ready messages (or timeout); returns the count."""
    end = time.monotonic() + timeout
    n = count(ch, queue)
    while n != want and time.monotonic() < end:
        ch.connection.sleep(0.05)
        n = count(ch, queue)
    return n


def get_all(ch, queue: str, auto_ack: bool = True, limit: int = 1000) -> list:
    """basic.get until get-empty: [(method, properties, body)]."""
    out = []
    for _ in range(limit):
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is None:
            break
        out.append((method, props, body))
    return out


def bodies(msgs) -> list:
    return sorted(b.decode(errors="replace") for _m, _p, b in msgs)


def publish_confirmed(conn, queue: str, n: int, prefix: str = "m", exchange: str = "") -> None:
    """n confirmed publishes on a channel of their own (so they are in the queue afterwards)."""
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish(exchange, queue, f"{prefix}{i}".encode())
    ch.close()


def pump(conn, until, seconds: float = 5.0) -> bool:
    """Processes I/O on a BlockingConnection until until() holds or `seconds` pass."""
    end = time.monotonic() + seconds
    while not until() and time.monotonic() < end:
        conn.process_data_events(time_limit=0.05)
    return until()


def returned(msgs, names: dict) -> list:
    """Returned messages (UnroutableError.messages) as seen, generated names replaced."""
    out = []
    for m in msgs:
        meth = m.method
        out.append((meth.reply_code, meth.reply_text, names.get(meth.exchange, meth.exchange),
                    names.get(meth.routing_key, meth.routing_key), m.body.decode()))
    return sorted(out)


def xdeath(props) -> list:
    """x-death entries without their time."""
    out = []
    for d in (props.headers or {}).get("x-death", []):
        out.append(sorted((k, v) for k, v in d.items() if k != "time"))
    return out


def rename(value, names: dict):
    """Replaces generated names in nested observations."""
    if isinstance(value, str):
        for k, v in names.items():
            value = value.replace(k, v)
        return value
    if isinstance(value, bytes):
        return rename(value.decode(errors="replace"), names).encode()
    if isinstance(value, (list, tuple)):
        return type(value)(rename(v, names) for v in value)
    if isinstance(value, dict):
        return {rename(k, names): rename(v, names) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Scenarios: BlockingConnection consumers


def consume_generator_inactivity_and_cancel(t: Target) -> list:
    """consume() with inactivity_timeout yields (None, None, None) while idle, the messages when
    they come; cancel() ends it. Then cancel() of a generator holding messages it has not
    yielded rejects (requeues) them; the yielded, unacknowledged ones stay with the channel."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("gen")
    ch.queue_declare(q)
    gen = ch.consume(q, inactivity_timeout=0.3)
    with deadline(STEP_SECONDS):
        first = next(gen)
    obs.append(f"idle yields {first}")
    publish_confirmed(c, q, 4)
    got = []
    with deadline(STEP_SECONDS):
        for method, _props, body in gen:
            if method is None:
                break
            got.append(body.decode())
            ch.basic_ack(method.delivery_tag)
    obs.append(f"got {sorted(got)} then idle")
    obs.append(f"consumer tags before cancel {len(ch.consumer_tags)}")
    attempt(obs, "cancel()", ch.cancel)
    obs.append(f"consumer tags after cancel {len(ch.consumer_tags)}")
    attempt(obs, "passive declare", lambda: ch.queue_declare(q, passive=True))

    publish_confirmed(c, q, 6, prefix="p")
    gen = ch.consume(q, inactivity_timeout=1)
    taken = []
    with deadline(STEP_SECONDS):
        for method, _props, body in gen:
            if method is None:
                break
            taken.append(method)
            if len(taken) == 2:
                break
    obs.append(f"taken {len(taken)}")
    pump(c, lambda: ch.get_waiting_message_count() == 4, 3)
    obs.append(f"waiting {ch.get_waiting_message_count()}")
    attempt(obs, "cancel() with 4 waiting", ch.cancel)
    other = c.channel()
    obs.append(f"ready after cancel {settle(other, q, 4)}")
    attempt(obs, "ack the 2 taken", lambda: [ch.basic_ack(m.delivery_tag) for m in taken] and None)
    attempt(obs, "channel usable", lambda: ch.basic_qos(prefetch_count=5))
    again = get_all(other, q)
    obs.append(f"again {len(again)} redelivered {sum(1 for m, _, _ in again if m.redelivered)}")
    obs.append(f"left {count(other, q)}")
    return obs


def consume_generator_ends_on_broker_cancel(t: Target) -> list:
    """The consume() generator stops when the broker cancels the consumer (its queue deleted by
    another connection); the channel stays open."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("genbc")
    ch.queue_declare(q)
    publish_confirmed(c, q, 2)
    gen = ch.consume(q, inactivity_timeout=0.5)
    got = []
    deleted = False
    ended = "no"
    try:
        with deadline(STEP_SECONDS):
            for method, _p, body in gen:
                if method is None:
                    if deleted:
                        continue
                    t.connect().channel().queue_delete(q)
                    deleted = True
                    continue
                got.append(body.decode())
                ch.basic_ack(method.delivery_tag)
            ended = "yes"
    except Timeout:
        ended = "timeout"
    obs.append(f"got {sorted(got)}, generator ended {ended}")
    obs.append(f"consumer tags {len(ch.consumer_tags)}")
    attempt(obs, "channel open", lambda: ch.is_open)
    attempt(obs, "basic_qos after", lambda: ch.basic_qos(prefetch_count=1))
    attempt(obs, "consume() again (queue gone)", lambda: next(ch.consume(q, inactivity_timeout=0.2)))
    return obs


def on_cancel_callback_queue_deleted(t: Target) -> list:
    """add_on_cancel_callback: told of a queue deleted by another connection and by the
    consuming channel itself."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q1, q2 = t.q("cancel1"), t.q("cancel2")
    ch.queue_declare(q1)
    ch.queue_declare(q2)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    got = []
    ch.basic_consume(q1, lambda _c, m, p, b: got.append(b), auto_ack=True, consumer_tag="tag-one")
    ch.basic_consume(q2, lambda _c, m, p, b: got.append(b), auto_ack=True, consumer_tag="tag-two")
    publish_confirmed(c, q1, 1)
    pump(c, lambda: len(got) == 1, 3)
    obs.append(f"got {got}")
    attempt(obs, "delete q1 from another connection", lambda: t.connect().channel().queue_delete(q1))
    pump(c, lambda: len(cancelled) >= 1, 3)
    obs.append(f"cancelled {cancelled}")
    attempt(obs, "delete q2 from the consuming channel", lambda: ch.queue_delete(q2))
    pump(c, lambda: len(cancelled) >= 2, 3)
    obs.append(f"cancelled {cancelled}, consumer tags left {ch.consumer_tags}")
    attempt(obs, "channel usable", lambda: ch.basic_qos(prefetch_count=3))
    attempt(obs, "basic_cancel of the cancelled tag", lambda: ch.basic_cancel("tag-one"))
    return obs


def stop_consuming_and_close_from_callbacks(t: Target) -> list:
    """start_consuming() with a callback that acks 3 then calls stop_consuming(): the delivered
    but unacknowledged messages return to the queue when the channel closes. Then a callback
    that closes its channel after 5 acks while deliveries flow: the rest is requeued."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("stopc")
    ch.queue_declare(q)
    publish_confirmed(c, q, 10)
    acked = []

    def stop_after_3(chan, method, _props, body):
        if len(acked) < 3:
            chan.basic_ack(method.delivery_tag)
            acked.append(body.decode())
            if len(acked) == 3:
                chan.stop_consuming()

    ch.basic_consume(q, stop_after_3)
    attempt(obs, "start_consuming", ch.start_consuming)
    obs.append(f"acked {len(acked)}, consumer tags {ch.consumer_tags}")
    attempt(obs, "close channel", ch.close)
    other = c.channel()
    obs.append(f"ready after close {settle(other, q, 7)}")
    rest = get_all(other, q)
    names = {b.decode() for _, _, b in rest}
    obs.append(f"rest and acked are all 10 once: {sorted(names | set(acked)) == sorted(f'm{i}' for i in range(10)) and not names & set(acked)}")

    q2 = t.q("closecb")
    other.queue_declare(q2)
    publish_confirmed(c, q2, 20)
    seen = []

    def close_after_5(chan, method, _props, body):
        seen.append(body.decode())
        chan.basic_ack(method.delivery_tag)
        if len(seen) == 5:
            chan.close()

    ch = c.channel()
    ch.basic_consume(q2, close_after_5)
    attempt(obs, "start_consuming (closing callback)", ch.start_consuming)
    obs.append(f"seen {len(seen)}, channel closed {ch.is_closed}")
    obs.append(f"ready {settle(other, q2, 15)}")
    rest = get_all(other, q2, auto_ack=True)
    obs.append(f"redelivered {sum(1 for m, _, _ in rest if m.redelivered) > 0}, total {len(rest) + len(seen)}")
    return obs


def basic_get_nack_requeue_loop(t: Target) -> list:
    """A basic_get loop that nacks some messages back once and acks the rest, then a nack with
    multiple over the held deliveries."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("getnack")
    ch.queue_declare(q)
    publish_confirmed(c, q, 6)
    seen: dict[str, list] = {}
    with deadline(STEP_SECONDS):
        for _ in range(50):
            method, _p, body = ch.basic_get(q, auto_ack=False)
            if method is None:
                break
            b = body.decode()
            seen.setdefault(b, []).append(method.redelivered)
            if b in ("m0", "m1", "m2") and len(seen[b]) == 1:
                ch.basic_nack(method.delivery_tag, requeue=True)
            else:
                ch.basic_ack(method.delivery_tag)
    obs.append(f"seen {sorted(seen.items())}")
    publish_confirmed(c, q, 4, prefix="n")
    held = get_all(ch, q, auto_ack=False)
    obs.append(f"held {len(held)}")
    tags = [m.delivery_tag for m, _, _ in held]
    attempt(obs, "nack(third tag, multiple, requeue)", lambda: ch.basic_nack(tags[2], multiple=True, requeue=True))
    attempt(obs, "ack(fourth tag)", lambda: ch.basic_ack(tags[3]))
    attempt(obs, "sync", lambda: ch.basic_qos(prefetch_count=0))
    again = get_all(ch, q)
    obs.append(f"again {len(again)} redelivered {sum(1 for m, _, _ in again if m.redelivered)}")
    attempt(obs, "nack(0, multiple) with nothing held", lambda: ch.basic_nack(0, multiple=True))
    attempt(obs, "sync after", lambda: ch.basic_qos(prefetch_count=0))
    return obs


def basic_recover_requeue_consumer(t: Target) -> list:
    """basic_recover(requeue=True) with a callback consumer: every unacknowledged delivery comes
    again, marked redelivered."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("recover")
    ch.queue_declare(q)
    publish_confirmed(c, q, 4)
    got = []
    ch.basic_consume(q, lambda _c, m, p, b: got.append((b.decode(), m.redelivered, m.delivery_tag)))
    pump(c, lambda: len(got) == 4, 5)
    obs.append(f"first {sorted(x[:2] for x in got)}")
    attempt(obs, "basic_recover(requeue=True)", lambda: ch.basic_recover(requeue=True))
    pump(c, lambda: len(got) == 8, 5)
    obs.append(f"second {sorted(x[:2] for x in got[4:])}")
    attempt(obs, "ack the second round", lambda: [ch.basic_ack(x[2]) for x in got[4:]] and None)
    attempt(obs, "ack an old tag", lambda: ch.basic_ack(got[0][2]) or ch.basic_qos(prefetch_count=0))
    other = c.channel()
    obs.append(f"left {count(other, q)}")
    return obs


def worker_qos_before_first_consume(t: Target) -> list:
    """A worker as pika's work-queue examples write it, on a fresh connection that declares
    nothing: basic_qos(prefetch_count=N) first, then basic_consume of a queue a producer filled;
    it holds N unacknowledged deliveries, per consumer and with global_qos. (N >= the number
    of shard clusters: below it warren allows one per cluster, documented.)"""
    obs = []
    producer = t.connect()
    q = t.q("worker")
    producer.channel().queue_declare(q)
    publish_confirmed(producer, q, 12)
    for n, global_qos in ((4, False), (4, True), (2, False)):
        w = t.connect()
        ch = w.channel()
        ch.basic_qos(prefetch_count=n, global_qos=global_qos)
        held = []
        ch.basic_consume(q, lambda _c, m, p, b: held.append(m.delivery_tag))
        pump(w, lambda: len(held) > n, 1.5)
        obs.append(f"prefetch {n} global {global_qos}: holds {len(held)}")
        ch.basic_ack(held[-1]) if held else None
        pump(w, lambda: len(held) > n + 1, 1.0)
        obs.append(f"  after one ack: holds {len(held) - 1} unacknowledged")
        with deadline(STEP_SECONDS):
            w.close()
    obs.append(f"ready at the end {settle(producer.channel(), q, 9)}")
    return obs


def consumer_priorities(t: Target) -> list:
    """x-priority consumers: the higher one gets every message while it can take them; with it
    cancelled the lower one does."""
    obs = []
    c = t.connect()
    q = t.q("cprio")
    c.channel().queue_declare(q)
    low_ch, high_ch = c.channel(), c.channel()
    low, high = [], []
    low_ch.basic_consume(q, lambda _c, m, p, b: low.append(b), auto_ack=True, arguments={"x-priority": 1})
    tag = high_ch.basic_consume(q, lambda _c, m, p, b: high.append(b), auto_ack=True, arguments={"x-priority": 10})
    publish_confirmed(c, q, 8)
    pump(c, lambda: len(low) + len(high) == 8, 5)
    c.sleep(0.3)
    obs.append(f"high {len(high)} low {len(low)}")
    high_ch.basic_cancel(tag)
    publish_confirmed(c, q, 5, prefix="n")
    pump(c, lambda: len(low) + len(high) == 13, 5)
    c.sleep(0.3)
    obs.append(f"after cancel high {len(high)} low {len(low)}")
    attempt(obs, "consume with x-priority -5", lambda: low_ch.basic_consume(q, lambda *a: None, arguments={"x-priority": -5}) and None)
    attempt(obs, "consume with x-priority as string", lambda: c.channel().basic_consume(q, lambda *a: None, arguments={"x-priority": "high"}) and None)
    return obs


def exclusive_consumer_refusals(t: Target) -> list:
    """basic_consume(exclusive=True): a second consumer is refused with 403, as is an exclusive
    one on a consumed queue; basic_get still reads; after cancel others may consume."""
    obs = []
    c = t.connect()
    q, q2 = t.q("xcons"), t.q("xcons2")
    ch = c.channel()
    ch.queue_declare(q)
    ch.queue_declare(q2)
    tag = ch.basic_consume(q, lambda *a: None, exclusive=True)
    attempt(obs, "second consumer other channel", lambda: c.channel().basic_consume(q, lambda *a: None) and None)
    attempt(obs, "second consumer other connection", lambda: t.connect().channel().basic_consume(q, lambda *a: None) and None)
    attempt(obs, "second exclusive consumer same channel", lambda: ch.basic_consume(q, lambda *a: None, exclusive=True) and None)
    ch = c.channel()
    tag = ch.basic_consume(q, lambda *a: None, exclusive=True)
    publish_confirmed(c, q2, 1)
    attempt(obs, "basic_get beside the exclusive consumer", lambda: c.channel().basic_get(q, auto_ack=True)[0])
    ch.basic_cancel(tag)
    attempt(obs, "consume after cancel", lambda: c.channel().basic_consume(q, lambda *a: None) and None)
    plain = c.channel()
    plain.basic_consume(q2, lambda *a: None)
    attempt(obs, "exclusive consume on a consumed queue", lambda: c.channel().basic_consume(q2, lambda *a: None, exclusive=True) and None)
    attempt(obs, "connection usable", lambda: c.channel().queue_declare(q2, passive=True))
    return obs


def mandatory_returns_per_exchange_type(t: Target) -> list:
    """Confirmed mandatory publishes that route nowhere raise UnroutableError (312 NO_ROUTE), for
    every exchange type; routable and non-mandatory ones do not. CC and BCC headers route copies
    to more queues."""
    obs = []
    c = t.connect()
    ch = c.channel()
    names = {}
    q = t.q("mrq")
    names[q] = "Q"
    ch.queue_declare(q)
    for kind in ("direct", "fanout", "topic", "headers"):
        x = t.x(f"mr{kind}")
        names[x] = f"X-{kind}"
        ch.exchange_declare(x, kind)
    ch.queue_bind(q, names_of(names, "X-topic"), "a.*")
    ch.queue_bind(q, names_of(names, "X-headers"), "", arguments={"x-match": "all", "h": 1})
    ch.queue_bind(q, names_of(names, "X-direct"), "k")
    ch.confirm_delivery()
    cases = [
        ("direct, other key", names_of(names, "X-direct"), "other", None),
        ("direct, bound key", names_of(names, "X-direct"), "k", None),
        ("fanout without bindings", names_of(names, "X-fanout"), "", None),
        ("topic, no match", names_of(names, "X-topic"), "b.c", None),
        ("topic, match", names_of(names, "X-topic"), "a.b", None),
        ("headers, no match", names_of(names, "X-headers"), "", {"h": 2}),
        ("headers, match", names_of(names, "X-headers"), "", {"h": 1}),
        ("default exchange, missing queue", "", "pika-edge-no-such-queue", None),
        ("default exchange, queue", "", q, None),
        ("amq.direct, unbound key", "amq.direct", "pika-edge-unbound", None),
    ]
    for label, x, key, headers in cases:
        props = BasicProperties(headers=headers) if headers else None
        try:
            with deadline(STEP_SECONDS):
                ch.basic_publish(x, key, label.encode(), props, mandatory=True)
            obs.append(f"{label}: ok")
        except pika.exceptions.UnroutableError as e:
            obs.append(f"{label}: UnroutableError {returned(e.messages, names)}")
        except (pika.exceptions.AMQPError, Timeout) as e:
            obs.append(f"{label}: {err(e)}")
    attempt(obs, "fanout, not mandatory", lambda: ch.basic_publish(names_of(names, "X-fanout"), "", b"nm"))
    obs.append(f"queue got {bodies(get_all(ch, q))}")
    # Sender-selected distribution: CC and BCC headers add routing keys; BCC is removed.
    q2, q3 = t.q("mrcc"), t.q("mrbcc")
    ch.queue_declare(q2)
    ch.queue_declare(q3)
    attempt(obs, "CC and BCC", lambda: ch.basic_publish("", q, b"cc", BasicProperties(headers={"CC": [q2], "BCC": [q3]}), mandatory=True))
    for label, name in (("queue", q), ("CC queue", q2), ("BCC queue", q3)):
        got = get_all(ch, name)
        obs.append(f"{label} got {[(b.decode(), sorted((p.headers or {}).keys())) for _, p, b in got]}")
    return obs


def names_of(names: dict, label: str) -> str:
    return next(k for k, v in names.items() if v == label)


def on_return_callback_plain_and_tx(t: Target) -> list:
    """add_on_return_callback: returns of mandatory publishes on a plain channel reach the
    callback with the message's properties; in a transaction they come at tx_commit, not at all
    after tx_rollback; a publish to a missing exchange inside a transaction closes the channel."""
    obs = []
    c = t.connect()
    ch = c.channel()
    got = []
    ch.add_on_return_callback(lambda _c, m, p, b: got.append((m.reply_code, m.reply_text, m.exchange, p.message_id, p.headers, b)))
    x = t.x("ret")
    ch.exchange_declare(x, "direct")
    for i in range(3):
        ch.basic_publish(x, "nobody", f"r{i}".encode(), BasicProperties(message_id=str(i), headers={"i": i}), mandatory=True)
    ch.basic_publish(x, "nobody", b"quiet")
    pump(c, lambda: len(got) == 3, 5)
    c.process_data_events(time_limit=0.3)
    obs.append(f"plain returns {sorted(rename(got, {x: 'X'}))}")
    attempt(obs, "channel usable", lambda: ch.basic_qos(prefetch_count=1))
    q = t.q("rettx")
    ch.queue_declare(q)
    ch.queue_bind(q, x, "somebody")
    tx = c.channel()
    txgot = []
    tx.add_on_return_callback(lambda _c, m, p, b: txgot.append((m.reply_code, b)))
    tx.tx_select()
    tx.basic_publish(x, "nobody", b"t-rolled", mandatory=True)
    tx.basic_publish(x, "somebody", b"t-rolled-routed", mandatory=True)
    attempt(obs, "tx_rollback", tx.tx_rollback)
    c.process_data_events(time_limit=0.3)
    obs.append(f"returns after rollback {sorted(txgot)}")
    tx.basic_publish(x, "nobody", b"t-returned", mandatory=True)
    tx.basic_publish(x, "somebody", b"t-routed", mandatory=True)
    c.process_data_events(time_limit=0.3)
    obs.append(f"returns before commit {sorted(txgot)}")
    attempt(obs, "tx_commit", tx.tx_commit)
    c.process_data_events(time_limit=0.3)
    obs.append(f"returns after commit {sorted(txgot)}")
    obs.append(f"queue holds {bodies(get_all(ch, q))}")
    attempt(obs, "tx publish to a missing exchange, then commit", lambda: tx.basic_publish(uid("nox"), "k", b"lost") or tx.tx_commit())
    attempt(obs, "connection usable", lambda: c.channel().queue_declare(q, passive=True))
    return obs

def nack_from_reject_publish(t: Target) -> list:
    """Publishes refused by a full reject-publish queue (x-max-length 0) raise NackError; a
    fanout copy to another queue is kept; max-length-bytes 0 refuses non-empty bodies."""
    obs = []
    c = t.connect()
    ch = c.channel()
    full, free, fb = t.q("rpfull"), t.q("rpfree"), t.q("rpbytes")
    ch.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    ch.queue_declare(free)
    ch.queue_declare(fb, arguments={"x-max-length-bytes": 0, "x-overflow": "reject-publish"})
    x = t.x("rpfan")
    ch.exchange_declare(x, "fanout")
    ch.queue_bind(full, x)
    ch.queue_bind(free, x)
    ch.confirm_delivery()

    def pub(label, exchange, key, body):
        try:
            with deadline(STEP_SECONDS):
                ch.basic_publish(exchange, key, body)
            obs.append(f"{label}: ok")
        except pika.exceptions.NackError as e:
            obs.append(f"{label}: NackError {[m.body for m in e.messages]}")
        except (pika.exceptions.AMQPError, Timeout) as e:
            obs.append(f"{label}: {err(e)}")

    for i in range(3):
        pub(f"to full queue #{i}", "", full, f"f{i}".encode())
    pub("to fanout of full and free", x, "", b"fan")
    pub("to bytes-limited, empty body", "", fb, b"")
    pub("to bytes-limited, 1 byte", "", fb, b"z")
    pub("to free queue", "", free, b"free")
    obs.append(f"counts full {count(ch, full)} free {count(ch, free)} bytes {count(ch, fb)}")
    obs.append(f"free got {bodies(get_all(ch, free))}")
    return obs


def tx_publish_ack_rollback_commit(t: Target) -> list:
    """A transacted channel mixing gets, acks and publishes: rollback undoes both, commit applies
    both."""
    obs = []
    c = t.connect()
    q = t.q("tx")
    look = c.channel()
    look.queue_declare(q)
    publish_confirmed(c, q, 4)
    tx = c.channel()
    attempt(obs, "tx_select", tx.tx_select)
    attempt(obs, "tx_commit with nothing", tx.tx_commit)
    attempt(obs, "tx_rollback with nothing", tx.tx_rollback)
    held = get_all(tx, q, auto_ack=False, limit=2)
    obs.append(f"held {len(held)}, ready {count(look, q)}")
    for m, _, _ in held:
        tx.basic_ack(m.delivery_tag)
    tx.basic_publish("", q, b"rolled-0")
    tx.basic_publish("", q, b"rolled-1")
    obs.append(f"before rollback ready {count(look, q)}")
    attempt(obs, "tx_rollback", tx.tx_rollback)
    obs.append(f"after rollback ready {count(look, q)}")
    for m, _, _ in held:
        tx.basic_ack(m.delivery_tag)
    tx.basic_publish("", q, b"committed-0")
    tx.basic_publish("", q, b"committed-1")
    attempt(obs, "tx_commit", tx.tx_commit)
    obs.append(f"after commit ready {settle(look, q, 4)}")
    more = get_all(tx, q, auto_ack=False, limit=1)
    tx.basic_nack(more[0][0].delivery_tag, requeue=False)
    obs.append(f"after nack (uncommitted) ready {count(look, q)}")
    attempt(obs, "tx_commit of the nack", tx.tx_commit)
    obs.append(f"after commit ready {count(look, q)}")
    attempt(obs, "confirm_delivery on the tx channel", tx.confirm_delivery)
    rest = get_all(look, q)
    obs.append(f"rest {len(rest)}, committed ones there {sum(1 for _, _, b in rest if b.startswith(b'committed')) + (1 if more[0][2].startswith(b'committed') else 0)}")
    obs.append(f"rolled back ones there {sum(1 for _, _, b in rest if b.startswith(b'rolled'))}")
    return obs


def publish_missing_exchange_then_new_channel(t: Target) -> list:
    """A confirmed publish to a missing exchange closes the channel (404); a new channel on the
    same connection publishes and consumes."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("pmx")
    ch.queue_declare(q)
    ch.confirm_delivery()
    attempt(obs, "publish to missing exchange", lambda: ch.basic_publish(uid("nox"), "k", b"lost"))
    obs.append(f"channel closed {ch.is_closed}")
    attempt(obs, "publish on the closed channel", lambda: ch.basic_publish("", q, b"x"))
    ch2 = c.channel()
    ch2.confirm_delivery()
    attempt(obs, "publish on a new channel", lambda: ch2.basic_publish("", q, b"fine"))
    obs.append(f"got {bodies(get_all(ch2, q))}")
    ch3 = c.channel()
    attempt(obs, "unconfirmed publish to missing exchange, then sync", lambda: ch3.basic_publish(uid("nox"), "k", b"lost") or ch3.basic_qos(prefetch_count=1))
    attempt(obs, "connection usable", lambda: c.channel().queue_declare(q, passive=True))
    return obs


def default_exchange_empty_routing_key(t: Target) -> list:
    """The default exchange with an empty routing key routes nowhere (no queue is named ""), even
    right after a declare; binding to the default exchange is refused."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("defempty")
    ch.queue_declare(q)
    ch.confirm_delivery()
    try:
        with deadline(STEP_SECONDS):
            ch.basic_publish("", "", b"empty", mandatory=True)
        obs.append("mandatory to '' with '': ok")
    except pika.exceptions.UnroutableError as e:
        obs.append(f"mandatory to '' with '': UnroutableError {returned(e.messages, {})}")
    attempt(obs, "not mandatory to '' with ''", lambda: ch.basic_publish("", "", b"empty2"))
    obs.append(f"last declared queue holds {count(ch, q)}")
    attempt(obs, "bind to the default exchange", lambda: ch.queue_bind(q, "", q))
    ch = c.channel()
    ch.confirm_delivery()
    attempt(obs, "publish to amq.default by name", lambda: ch.basic_publish("amq.default", q, b"byname"))
    ch = c.channel()
    attempt(obs, "passive declare of amq.default", lambda: ch.exchange_declare("amq.default", passive=True))
    obs.append(f"queue holds {count(c.channel(), q)}")
    return obs


def routing_keys_255_bytes(t: Target) -> list:
    """Routing and binding keys of the full 255 bytes (ASCII and multi-byte UTF-8) through
    direct and topic exchanges; a key of 256 bytes is refused by pika before it is sent."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("rk255")
    ch.queue_declare(q)
    xd, xt = t.x("rk255d"), t.x("rk255t")
    ch.exchange_declare(xd, "direct")
    ch.exchange_declare(xt, "topic")
    k_ascii = "k" * 255
    k_utf8 = ("ä" * 127) + "k"
    k_topic = "a." + ".".join(["word"] * 50) + "." + "z" * (255 - 2 - 249 - 1)
    obs.append(f"key lengths {[len(k.encode()) for k in (k_ascii, k_utf8, k_topic)]}")
    attempt(obs, "bind 255-byte direct key", lambda: ch.queue_bind(q, xd, k_ascii))
    attempt(obs, "bind 255-byte utf-8 key", lambda: ch.queue_bind(q, xd, k_utf8))
    attempt(obs, "bind topic a.#", lambda: ch.queue_bind(q, xt, "a.#"))
    ch.confirm_delivery()
    for label, x, k in (("ascii", xd, k_ascii), ("utf8", xd, k_utf8), ("topic", xt, k_topic)):
        attempt(obs, f"publish {label}", lambda x=x, k=k, label=label: ch.basic_publish(x, k, label.encode(), mandatory=True))
    got = get_all(ch, q)
    obs.append(f"got {sorted((b.decode(), len(m.routing_key.encode()), m.routing_key in (k_ascii, k_utf8, k_topic)) for m, _, b in got)}")
    try:
        ch.basic_publish(xd, "k" * 256, b"too long")
        obs.append("256-byte key: sent")
    except Exception as e:  # pika refuses locally; the connection must stay usable
        obs.append(f"256-byte key: refused by pika ({type(e).__name__})")
    attempt(obs, "connection usable", lambda: c.channel().queue_declare(q, passive=True))
    return obs


def properties_round_trip(t: Target) -> list:
    """Every BasicProperties field, and header tables of every type pika encodes (nested tables,
    arrays, decimals, timestamps, bytes, bools, None, 32 and 64-bit ints, unicode; pika encodes
    no floats), read back by basic_get and by a consumer and compared exactly."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("props")
    ch.queue_declare(q, arguments={"x-max-priority": 10})
    headers = {
        "str": "plain",
        "unicode": "日本語 ünïcödé ✓",
        "empty": "",
        "int": 42,
        "neg": -7,
        "int32max": 2**31 - 1,
        "int64": 2**40,
        "int64min": -(2**63),
        "zero": 0,
        "bool_t": True,
        "bool_f": False,
        "none": None,
        "bytes": b"\x00\x01\xffbin",
        "decimal": decimal.Decimal("123.4567"),
        "decimal_neg": decimal.Decimal("-0.5"),
        "ts": datetime.datetime(2024, 2, 29, 12, 34, 56),
        "list": [1, "two", None, True, [4, [5]], {"in": "list"}, b"x", decimal.Decimal("1.5")],
        "empty_list": [],
        "nested": {"a": {"b": {"c": [1, 2, {"d": "deep"}]}}, "e": {}},
        "x-custom-header": "dash",
    }
    props = BasicProperties(
        content_type="application/json", content_encoding="gzip", headers=headers,
        delivery_mode=2, priority=7, correlation_id="corr-1", reply_to="reply-queue",
        expiration="600000", message_id="msg-1", timestamp=1700000000, type="kind",
        user_id="guest", app_id="pika-edge", cluster_id="cluster-x")
    body = bytes(range(256)) * 4
    ch.confirm_delivery()
    ch.basic_publish("", q, body, props)
    ch.basic_publish("", q, body, props)
    q_empty = t.q("propsempty")
    ch.queue_declare(q_empty)
    ch.basic_publish("", q_empty, b"", BasicProperties())
    _m, p_empty, b_empty = ch.basic_get(q_empty, auto_ack=True)
    obs.append(f"empty message: body {b_empty!r}, {show_props(p_empty)}")
    for empties in (BasicProperties(headers={}), BasicProperties(content_type="", message_id="", app_id=""),
                    BasicProperties(priority=0, delivery_mode=1, timestamp=0),
                    BasicProperties(headers={"": "", "t": {}, "a": []})):
        ch.basic_publish("", q_empty, b"e", empties)
        _m, p_e, _b = ch.basic_get(q_empty, auto_ack=True)
        obs.append(f"present but empty: {[x for x in show_props(p_e) if not x.endswith('=None')]}")
    _m, p, b = ch.basic_get(q, auto_ack=True)
    obs.append(f"get: body intact {b == body}")
    obs.extend(f"get: {line}" for line in show_props(p))
    got = []
    ch.basic_consume(q, lambda _c, m, pp, bb: got.append((pp, bb)), auto_ack=True)
    pump(c, lambda: len(got) == 1, 5)
    obs.append(f"consumed {len(got)}")
    if got:
        obs.append(f"consume: body intact {got[0][1] == body}")
        obs.extend(f"consume: {line}" for line in show_props(got[0][0]))
    return obs


def typed(v):
    """A header value with its Python type, recursively (so a changed wire type shows)."""
    if isinstance(v, dict):
        return {k: typed(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [typed(x) for x in v]
    return f"{type(v).__name__}:{v!r}"


def show_props(p) -> list:
    out = []
    for field in ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
                  "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
                  "cluster_id"):
        out.append(f"{field}={getattr(p, field)!r}")
    if not p.headers:
        out.append(f"headers={p.headers!r}")
    else:
        for k, v in sorted(p.headers.items()):
            out.append(f"headers[{k}]={typed(v)}")
    return out


def per_message_ttl_and_expiry(t: Target) -> list:
    """expiration per message (expired ones never reach basic_get), an invalid expiration (406),
    and an x-expires queue that goes when unused."""
    obs = []
    c = t.connect()
    ch = c.channel()
    q = t.q("ttl")
    ch.queue_declare(q)
    ch.confirm_delivery()
    for label, exp in (("short", "50"), ("long", "600000"), ("zero", "0"), ("none", None)):
        ch.basic_publish("", q, label.encode(), BasicProperties(expiration=exp))
    c.sleep(0.5)
    obs.append(f"left {bodies(get_all(ch, q))}")
    attempt(obs, "expiration 'soon'", lambda: ch.basic_publish("", q, b"bad", BasicProperties(expiration="soon")))
    ch = c.channel()
    ch.confirm_delivery()
    attempt(obs, "expiration '-1'", lambda: ch.basic_publish("", q, b"bad", BasicProperties(expiration="-1")))
    ch = c.channel()
    eq = t.q("expires")
    attempt(obs, "declare x-expires 700", lambda: ch.queue_declare(eq, arguments={"x-expires": 700}))
    attempt(obs, "passive at once", lambda: ch.queue_declare(eq, passive=True))
    c.sleep(2.0)
    attempt(obs, "passive after 2 s unused", lambda: ch.queue_declare(eq, passive=True))
    return obs


# ---------------------------------------------------------------------------------------------
# Scenarios: declarations and their refusals


ARG_FAMILIES = [
    ("message-ttl", {"x-message-ttl": 60000}, {"x-message-ttl": 30000}),
    ("expires", {"x-expires": 600000}, {"x-expires": 300000}),
    ("max-length", {"x-max-length": 100}, {"x-max-length": 200}),
    ("max-length-bytes", {"x-max-length-bytes": 100000}, {"x-max-length-bytes": 1}),
    ("overflow drop-head", {"x-max-length": 10, "x-overflow": "drop-head"}, {"x-max-length": 10, "x-overflow": "reject-publish"}),
    ("overflow reject-publish-dlx", {"x-max-length": 10, "x-overflow": "reject-publish-dlx"}, {"x-max-length": 10, "x-overflow": "drop-head"}),
    ("dead-letter", {"x-dead-letter-exchange": "dlx-a", "x-dead-letter-routing-key": "rk"}, {"x-dead-letter-exchange": "dlx-b", "x-dead-letter-routing-key": "rk"}),
    ("dead-letter routing key", {"x-dead-letter-exchange": "dlx-a", "x-dead-letter-routing-key": "rk"}, {"x-dead-letter-exchange": "dlx-a", "x-dead-letter-routing-key": "other"}),
    ("max-priority", {"x-max-priority": 5}, {"x-max-priority": 6}),
    ("lazy", {"x-queue-mode": "lazy"}, {"x-queue-mode": "default"}),
    ("single-active-consumer", {"x-single-active-consumer": True}, {"x-single-active-consumer": False}),
    ("classic type", {"x-queue-type": "classic"}, {"x-queue-type": "quorum"}),
    ("master locator", {"x-queue-master-locator": "min-masters"}, {"x-queue-master-locator": "client-local"}),
    ("unknown x-arg", {"x-pika-edge-unknown": "a"}, {"x-pika-edge-unknown": "b"}),
]


def queue_argument_families(t: Target) -> list:
    """Every queue argument family: declare, re-declare the same, re-declare with another value,
    re-declare with no arguments (each refusal continued on a new channel)."""
    obs = []
    c = t.connect()
    for label, args, other in ARG_FAMILIES:
        q = t.q("args")
        ch = c.channel()
        ok, _ = attempt(obs, f"{label}: declare", lambda: ch.queue_declare(q, arguments=args))
        if not ok:
            continue
        attempt(obs, f"{label}: same again", lambda: ch.queue_declare(q, arguments=args))
        if not attempt(obs, f"{label}: other value", lambda: ch.queue_declare(q, arguments=other))[0]:
            ch = c.channel()
        if not attempt(obs, f"{label}: no arguments", lambda: ch.queue_declare(q))[0]:
            ch = c.channel()
        attempt(obs, f"{label}: passive", lambda: ch.queue_declare(q, passive=True))
        attempt(obs, f"{label}: passive with other arguments", lambda: ch.queue_declare(q, passive=True, arguments=other))
    return obs


def queue_argument_invalid_values(t: Target) -> list:
    """Invalid values of argument families pika users get wrong (strings for numbers, negative
    lengths, unknown modes)."""
    obs = []
    c = t.connect()
    cases = [
        ("x-message-ttl negative", {"x-message-ttl": -1}),
        ("x-message-ttl as string", {"x-message-ttl": "1000"}),
        ("x-expires negative", {"x-expires": -5}),
        ("x-max-length negative", {"x-max-length": -1}),
        ("x-max-length float", {"x-max-length": 1.5}),
        ("x-overflow bogus", {"x-overflow": "bogus"}),
        ("x-max-priority 256", {"x-max-priority": 256}),
        ("x-max-priority negative", {"x-max-priority": -1}),
        ("x-dead-letter-routing-key without exchange", {"x-dead-letter-routing-key": "rk"}),
        ("x-single-active-consumer as string", {"x-single-active-consumer": "yes"}),
        ("x-queue-mode bogus", {"x-queue-mode": "bogus"}),
    ]
    for label, args in cases:
        q = t.q("badargs")
        ch = c.channel()
        attempt(obs, label, lambda: ch.queue_declare(q, arguments=args))
    attempt(obs, "connection usable", lambda: c.channel().queue_declare(t.q("afterbad")))
    return obs


def redeclare_with_other_flags(t: Target) -> list:
    """Re-declares of queues and exchanges with other durable / auto_delete / exclusive /
    internal / arguments, each refusal continued on a new channel."""
    obs = []
    c = t.connect()
    q = t.q("flags")
    ch = c.channel()
    ch.queue_declare(q, durable=True)
    for label, kw in (("durable=False", {}), ("auto_delete", {"durable": True, "auto_delete": True}),
                      ("exclusive", {"durable": True, "exclusive": True}), ("same", {"durable": True})):
        if not attempt(obs, f"queue {label}", lambda: ch.queue_declare(q, **kw))[0]:
            ch = c.channel()
    x = t.x("flags")
    ch.exchange_declare(x, "topic", durable=True)
    for label, kw in (("durable=False", {"exchange_type": "topic"}),
                      ("auto_delete", {"exchange_type": "topic", "durable": True, "auto_delete": True}),
                      ("internal", {"exchange_type": "topic", "durable": True, "internal": True}),
                      ("alternate-exchange", {"exchange_type": "topic", "durable": True, "arguments": {"alternate-exchange": "ae"}}),
                      ("passive other type", {"exchange_type": "fanout", "passive": True}),
                      ("same", {"exchange_type": "topic", "durable": True})):
        if not attempt(obs, f"exchange {label}", lambda: ch.exchange_declare(x, **kw))[0]:
            ch = c.channel()
    ch.confirm_delivery()
    attempt(obs, "publish after the refusals", lambda: ch.basic_publish("", q, b"after"))
    obs.append(f"count {count(ch, q)}")
    return obs


def exclusive_and_auto_delete_queue_lifecycles(t: Target) -> list:
    """An exclusive queue: every channel of its connection may use it; another connection gets
    405 for everything but a publish, until the owner closes. auto_delete queues: kept until a
    first consumer goes; deleted when the last one cancels, and when its channel closes."""
    obs = []
    owner = t.connect()
    other = t.connect()
    q = t.q("excl")
    x = t.x("exclx")
    a = owner.channel()
    a.queue_declare(q, exclusive=True)
    a.exchange_declare(x, "fanout")
    b = owner.channel()
    attempt(obs, "owner ch2 bind", lambda: b.queue_bind(q, x))
    b.confirm_delivery()
    attempt(obs, "owner ch2 publish", lambda: b.basic_publish(x, "", b"own"))
    attempt(obs, "owner ch3 get", lambda: owner.channel().basic_get(q, auto_ack=True)[2])
    cons = owner.channel()
    attempt(obs, "owner ch4 consume and cancel", lambda: cons.basic_cancel(cons.basic_consume(q, lambda *a: None)))
    attempt(obs, "owner ch5 purge", lambda: owner.channel().queue_purge(q))
    attempt(obs, "owner redeclare without exclusive", lambda: owner.channel().queue_declare(q))
    attempt(obs, "owner redeclare exclusive, auto_delete", lambda: owner.channel().queue_declare(q, exclusive=True, auto_delete=True))
    attempt(obs, "owner redeclare exclusive, durable", lambda: owner.channel().queue_declare(q, exclusive=True, durable=True))
    for label, fn in (
        ("declare", lambda ch: ch.queue_declare(q)),
        ("declare exclusive", lambda ch: ch.queue_declare(q, exclusive=True)),
        ("passive", lambda ch: ch.queue_declare(q, passive=True)),
        ("get", lambda ch: ch.basic_get(q)),
        ("consume", lambda ch: ch.basic_consume(q, lambda *a: None) and None),
        ("bind", lambda ch: ch.queue_bind(q, x, "k")),
        ("unbind", lambda ch: ch.queue_unbind(q, x, "")),
        ("purge", lambda ch: ch.queue_purge(q)),
        ("delete", lambda ch: ch.queue_delete(q)),
    ):
        ch = other.channel()
        attempt(obs, f"other connection {label}", lambda: fn(ch))
    oc = other.channel()
    oc.confirm_delivery()
    attempt(obs, "other connection publish by name", lambda: oc.basic_publish("", q, b"from-other"))
    attempt(obs, "other connection publish via exchange", lambda: oc.basic_publish(x, "", b"via-x"))
    look = owner.channel()
    obs.append(f"owner sees {settle(look, q, 2)}")
    with deadline(STEP_SECONDS):
        owner.close()
    attempt(obs, "after owner closed: passive", lambda: settle_gone(other, q))
    attempt(obs, "after owner closed: declare", lambda: other.channel().queue_declare(q))

    c = other
    ch = c.channel()
    q1, q2, q3 = t.q("ad1"), t.q("ad2"), t.q("ad3")
    for name in (q1, q2, q3):
        ch.queue_declare(name, auto_delete=True)
    c.sleep(0.3)
    attempt(obs, "auto_delete never consumed: passive", lambda: c.channel().queue_declare(q1, passive=True))
    t1 = ch.basic_consume(q2, lambda *a: None)
    t2 = ch.basic_consume(q2, lambda *a: None)
    ch.basic_cancel(t1)
    attempt(obs, "auto_delete, one of two consumers cancelled: passive", lambda: c.channel().queue_declare(q2, passive=True))
    ch.basic_cancel(t2)
    attempt(obs, "auto_delete, last consumer cancelled: passive", lambda: c.channel().queue_declare(q2, passive=True))
    cc = c.channel()
    cc.basic_consume(q3, lambda *a: None)
    cc.close()
    attempt(obs, "auto_delete, consumer's channel closed: passive", lambda: c.channel().queue_declare(q3, passive=True))
    return obs


def settle_gone(conn, q: str, timeout: float = 3.0):
    """Passive declare until the queue is gone (404) or timeout; returns the last reply."""
    end = time.monotonic() + timeout
    while True:
        r = conn.channel().queue_declare(q, passive=True)
        if time.monotonic() > end:
            return r
        conn.sleep(0.1)


def dead_letter_chain(t: Target) -> list:
    """A dead-letter chain: TTL expiry into a second queue, rejection from there into a third;
    x-death records both steps."""
    obs = []
    c = t.connect()
    ch = c.channel()
    names = {}
    dlx1, dlx2 = t.x("dlx1"), t.x("dlx2")
    q1, q2, q3 = t.q("dl1"), t.q("dl2"), t.q("dl3")
    names.update({dlx1: "DLX1", dlx2: "DLX2", q1: "Q1", q2: "Q2", q3: "Q3"})
    ch.exchange_declare(dlx1, "direct")
    ch.exchange_declare(dlx2, "fanout")
    ch.queue_declare(q1, arguments={"x-message-ttl": 50, "x-dead-letter-exchange": dlx1, "x-dead-letter-routing-key": "to-q2"})
    ch.queue_declare(q2, arguments={"x-dead-letter-exchange": dlx2})
    ch.queue_declare(q3)
    ch.queue_bind(q2, dlx1, "to-q2")
    ch.queue_bind(q3, dlx2)
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", q1, f"d{i}".encode(), BasicProperties(headers={"n": i}))
    obs.append(f"q2 holds {settle(ch, q2, 3)}")
    got = []
    ch.basic_consume(q2, lambda _c, m, p, b: (got.append(b), _c.basic_reject(m.delivery_tag, requeue=False)))
    pump(c, lambda: len(got) == 3, 5)
    obs.append(f"rejected {sorted(got)}")
    obs.append(f"q3 holds {settle(ch, q3, 3)}")
    for m, p, b in sorted(get_all(ch, q3), key=lambda x: x[2]):
        obs.append(f"{b.decode()} rk={m.routing_key} exchange={rename(m.exchange, names)} "
                   f"x-death={rename(xdeath(p), names)} "
                   f"first-death={rename([p.headers.get(k) for k in ('x-first-death-queue', 'x-first-death-reason', 'x-first-death-exchange')], names)} "
                   f"n={p.headers.get('n')}")
    return obs


def overflow_drop_head_dead_letters(t: Target) -> list:
    """drop-head with x-max-length 0 and a dead-letter exchange: every publish is dead-lettered
    at once with reason maxlen."""
    obs = []
    c = t.connect()
    ch = c.channel()
    dlx, q, dlq = t.x("dhx"), t.q("dh"), t.q("dhdlq")
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(q, arguments={"x-max-length": 0, "x-overflow": "drop-head", "x-dead-letter-exchange": dlx})
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.confirm_delivery()
    for i in range(3):
        attempt(obs, f"publish {i}", lambda i=i: ch.basic_publish("", q, f"h{i}".encode()))
    obs.append(f"queue {count(ch, q)} dlq {settle(ch, dlq, 3)}")
    names = {q: "Q", dlx: "DLX"}
    for m, p, b in sorted(get_all(ch, dlq), key=lambda x: x[2]):
        obs.append(f"{b.decode()} x-death={rename(xdeath(p), names)}")
    return obs


def quorum_delivery_limit_dead_letters(t: Target) -> list:
    """The poison-message pattern: a quorum queue with x-delivery-limit and a dead-letter
    exchange, a basic_get loop that always nacks with requeue; x-delivery-count grows, and
    after the limit each message is dead-lettered once with reason delivery_limit."""
    obs = []
    c = t.connect()
    ch = c.channel()
    dlx, q, dlq = t.x("qdlx"), t.q("qdl"), t.q("qdldlq")
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    attempt(obs, "declare quorum with delivery limit", lambda: ch.queue_declare(
        q, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 2, "x-dead-letter-exchange": dlx}))
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", q, f"p{i}".encode())
    seen = []
    with deadline(STEP_SECONDS):
        for _ in range(40):
            m, p, b = ch.basic_get(q, auto_ack=False)
            if m is None:
                if count(ch, q) == 0:
                    break
                c.sleep(0.1)
                continue
            seen.append((b.decode(), m.redelivered, (p.headers or {}).get("x-delivery-count")))
            ch.basic_nack(m.delivery_tag, requeue=True)
    obs.append(f"seen {sorted(seen)}")
    obs.append(f"dlq holds {settle(ch, dlq, 3)}")
    names = {q: "Q", dlx: "DLX"}
    for m, p, b in sorted(get_all(ch, dlq), key=lambda x: x[2]):
        obs.append(f"{b.decode()} x-death={rename(xdeath(p), names)}")
    return obs


def amq_prefixed_exchanges(t: Target) -> list:
    """exchange.declare of amq.* names: 403 unless passive; passive on every built-in."""
    obs = []
    c = t.connect()
    for name, kind in (("amq.direct", "direct"), ("amq.fanout", "fanout"), ("amq.topic", "topic"),
                       ("amq.headers", "headers"), ("amq.match", "headers"), ("amq.rabbitmq.trace", "topic")):
        attempt(obs, f"passive {name}", lambda: c.channel().exchange_declare(name, passive=True))
        attempt(obs, f"declare {name} as {kind}, durable", lambda: c.channel().exchange_declare(name, kind, durable=True))
    attempt(obs, "declare amq.pika-edge-new", lambda: c.channel().exchange_declare("amq.pika-edge-" + uuid.uuid4().hex[:6], "direct"))
    attempt(obs, "passive amq.pika-edge-missing", lambda: c.channel().exchange_declare("amq.pika-edge-missing", passive=True))
    attempt(obs, "delete amq.direct", lambda: c.channel().exchange_delete("amq.direct"))
    attempt(obs, "delete amq.pika-edge-missing", lambda: c.channel().exchange_delete("amq.pika-edge-missing"))
    src = t.x("e2amq")
    c.channel().exchange_declare(src, "fanout")
    attempt(obs, "bind amq.fanout to an exchange (destination amq.)", lambda: c.channel().exchange_bind("amq.fanout", src))
    attempt(obs, "unbind it", lambda: c.channel().exchange_unbind("amq.fanout", src))
    attempt(obs, "connection usable", lambda: c.channel().exchange_declare("amq.topic", passive=True))
    return obs


def amq_prefixed_queues_and_reply_to(t: Target) -> list:
    """Queue names starting with amq.: declare 403, passive 404. The direct reply-to pseudo
    queue as pika's RPC examples misuse it: a reply_to without a consumer (406), a manual-ack
    consumer (406), two consumers (406), publishes to reply-to names nobody holds (returned)."""
    obs = []
    c = t.connect()
    name = "amq.pika-edge-" + uuid.uuid4().hex[:8]
    attempt(obs, "declare amq.*", lambda: c.channel().queue_declare(name))
    attempt(obs, "declare amq.* exclusive", lambda: c.channel().queue_declare(name, exclusive=True))
    attempt(obs, "passive amq.*", lambda: c.channel().queue_declare(name, passive=True))
    attempt(obs, "delete amq.*", lambda: c.channel().queue_delete(name))
    attempt(obs, "purge amq.*", lambda: c.channel().queue_purge(name))
    attempt(obs, "get amq.*", lambda: c.channel().basic_get(name)[0])
    attempt(obs, "consume amq.*", lambda: c.channel().basic_consume(name, lambda *a: None) and None)
    attempt(obs, "bind amq.* to amq.direct", lambda: c.channel().queue_bind(name, "amq.direct", "k"))
    attempt(obs, "declare 'amq.' alone", lambda: c.channel().queue_declare("amq."))
    attempt(obs, "declare 'AMQ.upper'", lambda: c.channel().queue_declare("AMQ.pika-edge-" + uuid.uuid4().hex[:6], exclusive=True))
    attempt(obs, "get amq.rabbitmq.reply-to", lambda: c.channel().basic_get("amq.rabbitmq.reply-to")[0])
    q = t.q("rpcq")
    c.channel().queue_declare(q)

    def confirmed():
        ch = c.channel()
        ch.confirm_delivery()
        return ch

    def returned_or(label, fn):
        try:
            with deadline(STEP_SECONDS):
                fn()
            obs.append(f"{label}: ok")
        except pika.exceptions.UnroutableError as e:
            obs.append(f"{label}: UnroutableError {[(m.method.reply_code, m.body) for m in e.messages]}")
        except (pika.exceptions.AMQPError, Timeout) as e:
            obs.append(f"{label}: {err(e)}")

    reply_to = BasicProperties(reply_to="amq.rabbitmq.reply-to")
    returned_or("request with reply_to, no reply-to consumer, confirmed", lambda: confirmed().basic_publish("", q, b"r1", reply_to))
    ch = c.channel()
    returned_or("the same unconfirmed, then sync", lambda: ch.basic_publish("", q, b"r2", reply_to) or ch.basic_qos(prefetch_count=1))
    returned_or("reply-to consumer with manual acks", lambda: c.channel().basic_consume("amq.rabbitmq.reply-to", lambda *a: None))
    ch = c.channel()
    returned_or("two reply-to consumers on one channel", lambda: [ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True) for _ in range(2)] and None)
    returned_or("mandatory to amq.rabbitmq.reply-to.garbage", lambda: confirmed().basic_publish("", "amq.rabbitmq.reply-to.garbage", b"g", mandatory=True))
    returned_or("mandatory to amq.rabbitmq.reply-to", lambda: confirmed().basic_publish("", "amq.rabbitmq.reply-to", b"b", mandatory=True))
    obs.append(f"requests queued {count(c.channel(), q)}")
    attempt(obs, "connection usable", lambda: c.channel().queue_declare(t.q("afteramq")))
    return obs


def unbind_and_bind_edge_cases(t: Target) -> list:
    """Bindings that do not exist, bindings to missing things, and bindings with arguments
    unbound with other arguments."""
    obs = []
    c = t.connect()
    q, x = t.q("ub"), t.x("ub")
    ch = c.channel()
    ch.queue_declare(q)
    ch.exchange_declare(x, "direct")
    steps = [
        ("unbind a binding that does not exist", lambda ch: ch.queue_unbind(q, x, "never")),
        ("unbind from a missing exchange", lambda ch: ch.queue_unbind(q, uid("nox"), "k")),
        ("unbind a missing queue", lambda ch: ch.queue_unbind(uid("noq"), x, "k")),
        ("bind to a missing exchange", lambda ch: ch.queue_bind(q, uid("nox"), "k")),
        ("bind a missing queue", lambda ch: ch.queue_bind(uid("noq"), x, "k")),
        ("bind with arguments", lambda ch: ch.queue_bind(q, x, "k", arguments={"a": 1})),
        ("bind again with the same arguments", lambda ch: ch.queue_bind(q, x, "k", arguments={"a": 1})),
        ("unbind with other arguments", lambda ch: ch.queue_unbind(q, x, "k", arguments={"a": 2})),
        ("exchange_unbind that does not exist", lambda ch: ch.exchange_unbind(x, "amq.direct", "k")),
        ("exchange_bind from a missing exchange", lambda ch: ch.exchange_bind(x, uid("nox"), "k")),
    ]
    for label, fn in steps:
        if not attempt(obs, label, lambda: fn(ch))[0]:
            ch = c.channel()
    ch.confirm_delivery()
    try:
        with deadline(STEP_SECONDS):
            ch.basic_publish(x, "k", b"still", mandatory=True)
        obs.append("publish on the binding with arguments: routed")
    except pika.exceptions.UnroutableError:
        obs.append("publish on the binding with arguments: returned")
    except (pika.exceptions.AMQPError, Timeout) as e:
        obs.append(f"publish on the binding with arguments: {err(e)}")
    attempt(obs, "unbind with the same arguments", lambda: ch.queue_unbind(q, x, "k", arguments={"a": 1}))
    try:
        with deadline(STEP_SECONDS):
            ch.basic_publish(x, "k", b"gone", mandatory=True)
        obs.append("publish after unbind: routed")
    except pika.exceptions.UnroutableError:
        obs.append("publish after unbind: returned")
    obs.append(f"count {count(ch, q)}")
    return obs


# ---------------------------------------------------------------------------------------------
# Scenarios: connections


def connection_refusals(t: Target) -> list:
    """A vhost that does not exist and a wrong password: the reply code pika reports (warren
    refuses a wrong password later in the handshake, documented; the class pika raises may
    differ, the code may not); then a good connection works. basic_qos(prefetch_size=...)
    closes the connection with 540 NOT_IMPLEMENTED; prefetch counts and global are accepted."""
    obs = []
    for label, kw in (("unknown vhost", {"virtual_host": "pika-edge-no-such-vhost"}),
                      ("wrong password", {"credentials": pika.PlainCredentials("guest", "wrong")}),
                      ("unknown user", {"credentials": pika.PlainCredentials("pika-edge-nobody", "x")})):
        try:
            with deadline(STEP_SECONDS):
                c = pika.BlockingConnection(t.params(**kw))
            obs.append(f"{label}: connected")
            c.close()
        except (pika.exceptions.AMQPError, OSError, Timeout) as e:
            obs.append(f"{label}: {err(e)}")
    attempt(obs, "good connection", lambda: t.connect().channel().queue_declare(t.q("afterrefusal")))
    c = t.connect()
    ch = c.channel()
    attempt(obs, "prefetch_count 65535", lambda: ch.basic_qos(prefetch_count=65535))
    attempt(obs, "prefetch_count 0, global", lambda: ch.basic_qos(prefetch_count=0, global_qos=True))
    attempt(obs, "prefetch_count 3, global", lambda: ch.basic_qos(prefetch_count=3, global_qos=True))
    attempt(obs, "prefetch_size 1024", lambda: ch.basic_qos(prefetch_size=1024, prefetch_count=1))
    obs.append(f"connection open {c.is_open}")
    attempt(obs, "new connection", lambda: t.connect().channel().basic_qos(prefetch_count=1))
    return obs


def heartbeats_and_blocked_callbacks(t: Target) -> list:
    """heartbeat=0 idle 10 s without I/O, and heartbeat=2 idle 10 s in connection.sleep (which
    sends heartbeats): both stay usable; the server's proposal and the negotiated values. The
    server's product and capabilities; connection.blocked / unblocked callbacks registered (with
    blocked_connection_timeout) are never called and the connection works."""
    obs = []
    proposed = []

    def choose(value):
        return lambda _conn, server: (proposed.append(server), value)[1]

    c0 = t.connect(heartbeat=choose(0))
    c2 = t.connect(heartbeat=choose(2), blocked_connection_timeout=5)
    obs.append(f"server proposed {proposed}, negotiated {c0._impl.params.heartbeat} and {c2._impl.params.heartbeat}")
    server = c2._impl.server_properties
    obs.append(f"product {server.get('product')} {server.get('version')}")
    obs.append(f"capabilities {sorted((k, v) for k, v in server.get('capabilities', {}).items())}")
    events = []
    c2.add_on_connection_blocked_callback(lambda _c, f: events.append("blocked"))
    c2.add_on_connection_unblocked_callback(lambda _c, f: events.append("unblocked"))
    q = t.q("hb")
    c0.channel().queue_declare(q)
    # c2 serves its heartbeats for 10 s; c0 meanwhile does no I/O at all.
    with deadline(STEP_SECONDS + 12):
        c2.sleep(10)
    for label, c in (("heartbeat 0", c0), ("heartbeat 2", c2)):
        def use(c=c):
            ch = c.channel()
            ch.confirm_delivery()
            ch.basic_publish("", q, label.encode())
            return ch.basic_get(q, auto_ack=True)[2]
        attempt(obs, f"{label} after 10 s idle", use)
    obs.append(f"blocked callbacks called {events}")
    return obs


def silent_client_with_heartbeat_dropped(t: Target) -> list:
    """A client that asked for 2 s heartbeats and then sends nothing for 12 s (time.sleep, no
    I/O) is dropped; what pika reports at its next call."""
    obs = []
    c = t.connect(heartbeat=2)
    ch = c.channel()
    q = t.q("silent")
    ch.queue_declare(q)
    time.sleep(12)
    attempt(obs, "declare after 12 s of silence", lambda: ch.queue_declare(q, passive=True))
    obs.append(f"connection open {c.is_open}")
    attempt(obs, "new connection", lambda: t.connect().channel().queue_declare(q, passive=True))
    return obs


def frame_max_negotiation_and_large_messages(t: Target) -> list:
    """frame_max 4096, 65536 and the server's: the negotiated value; 100 KB messages through
    4096-byte frames by get and by consumer; headers just under one frame, and over it (the
    peer must refuse the header frame)."""
    obs = []
    tuned = []
    for fm in (4096, 65536, 131072):
        c = t.connect(frame_max=fm)
        tuned.append(c._impl.params.frame_max)
    obs.append(f"negotiated {tuned}")
    c = t.connect(frame_max=4096)
    ch = c.channel()
    q = t.q("frames")
    ch.queue_declare(q)
    ch.confirm_delivery()
    big = bytes((i * 7) % 251 for i in range(100 * 1024))
    hdr = {"pad": "h" * 3900}
    attempt(obs, "publish 100 KB", lambda: ch.basic_publish("", q, big))
    attempt(obs, "publish 100 KB with 3.9 KB of headers", lambda: ch.basic_publish("", q, big, BasicProperties(headers=hdr)))
    got = get_all(ch, q)
    obs.append(f"get: {sorted((b == big, len((p.headers or {}).get('pad', ''))) for _, p, b in got)}")
    sizes = []
    for n in (0, 1, 4087, 4088, 4089, 8176, 8177, 131064, 131065, 300000):
        body = bytes(i % 251 for i in range(n))
        ch.basic_publish("", q, body)
        _m, _p, b = ch.basic_get(q, auto_ack=True)
        sizes.append((n, b == body))
    obs.append(f"bodies around frame boundaries intact {sizes}")
    attempt(obs, "publish 100 KB with 3.9 KB of headers again", lambda: ch.basic_publish("", q, big, BasicProperties(headers=hdr)))
    got = []
    tag = ch.basic_consume(q, lambda _c, m, p, b: got.append((p, b)), auto_ack=True)
    pump(c, lambda: len(got) == 1, 5)
    ch.basic_cancel(tag)
    obs.append(f"consume: {len(got)} intact {bool(got) and got[0][1] == big}, header pad {len((got[0][0].headers or {}).get('pad', '')) if got else None}")
    # Large messages with headers from both queues' clusters to three consumers on two channels
    # at once: frames of different deliveries must not mix.
    q2 = t.q("frames2")
    ch.queue_declare(q2)
    expect = {}
    for i in range(20):
        for name in (q, q2):
            body = (f"{name}-{i}-".encode() * 4000)[:40000 + i * 37]
            expect[(name, str(i))] = body
            ch.basic_publish("", name, body, BasicProperties(message_id=str(i), headers={"pad": "x" * (i * 150)}))
    intact = []
    c1, c2 = c.channel(), c.channel()

    def checker(name):
        return lambda _c, m, p, b: intact.append(
            expect[(name, p.message_id)] == b and len(p.headers["pad"]) == int(p.message_id) * 150)

    c1.basic_consume(q, checker(q), auto_ack=True)
    c1.basic_consume(q2, checker(q2), auto_ack=True)
    c2.basic_consume(q, checker(q), auto_ack=True)
    pump(c, lambda: len(intact) == 40, 10)
    obs.append(f"interleaved consumers: {len(intact)} of 40, all intact {all(intact)}")
    # A content header frame cannot be split: 8 KB of headers in 4096-byte frames is a frame
    # error for the connection.
    attempt(obs, "publish with 8 KB of headers", lambda: ch.basic_publish("", q, b"x", BasicProperties(headers={"pad": "h" * 8192})))
    obs.append(f"channel open {ch.is_open}, connection open {c.is_open}")
    attempt(obs, "new connection", lambda: count(t.connect().channel(), q))
    return obs


def run_select(t: Target, on_open, seconds: float = 15.0, **kw) -> list:
    """Runs a SelectConnection until done() is called by the scenario (or `seconds`): returns the
    events list on_open(conn, events, done) filled, or with "timeout" appended."""
    events: list = []
    state = {"done": False}

    def done():
        if not state["done"]:
            state["done"] = True
            conn.ioloop.add_callback_threadsafe(lambda: conn.close() if conn.is_open else conn.ioloop.stop())

    def opened(conn_):
        try:
            on_open(conn_, events, done)
        except Exception as e:
            events.append(f"setup raised {type(e).__name__}: {e}")
            done()

    def open_error(_conn, e):
        events.append(f"open error {err(e)}")
        conn.ioloop.stop()

    def closed(_conn, reason):
        if not state["done"]:
            events.append(f"connection closed {err(reason)}")
        conn.ioloop.stop()

    def too_long():
        if not state["done"]:
            events.append("timeout")
            done()
            conn.ioloop.call_later(3, conn.ioloop.stop)

    conn = pika.SelectConnection(t.params(**kw), on_open_callback=opened,
                                 on_open_error_callback=open_error, on_close_callback=closed)
    conn.ioloop.call_later(seconds, too_long)
    with deadline(seconds + 10):
        conn.ioloop.start()
    return events


def select_pipelined_topology(t: Target) -> list:
    """SelectConnection: in on_channel_open, exchange and queue declared, bound, qos, consume and
    publishes issued back to back without waiting for any reply (pika queues the synchronous
    methods, publishes go at once)."""
    q, x = t.q("selpipe"), t.x("selpipe")

    def on_open(conn, events, done):
        got, finished = [], []

        def on_message(ch, m, p, b):
            got.append(b.decode())
            ch.basic_ack(m.delivery_tag)
            if len(got) == 6:
                conn.ioloop.call_later(0.5, finish)

        def finish():
            if not finished:
                finished.append(True)
                events.append(f"got {sorted(got)}")
                done()

        def on_channel(ch):
            ch.add_on_close_callback(lambda _ch, reason: events.append(f"channel closed {err(reason)}"))
            ch.queue_declare(q, callback=lambda f: events.append(f"queue {describe_method(f.method)}"))
            # pika sends the queue.declare and holds the other synchronous methods until its
            # declare-ok; publishes go at once: right behind the declare, before its reply.
            for i in range(3):
                ch.basic_publish("", q, f"direct{i}".encode())
            ch.exchange_declare(x, "direct", callback=lambda f: events.append("exchange declare-ok"))
            ch.queue_bind(q, x, "k", callback=lambda f: (events.append("bind-ok"), [ch.basic_publish(x, "k", f"bound{i}".encode()) for i in range(3)]))
            ch.basic_qos(prefetch_count=50, callback=lambda f: events.append("qos-ok"))
            ch.basic_consume(q, on_message, callback=lambda f: events.append("consume-ok"))
            conn.ioloop.call_later(8, finish)

        conn.channel(on_open_callback=on_channel)

    return run_select(t, on_open)


def select_nowait_topology(t: Target) -> list:
    """SelectConnection, as pika's asynchronous examples are often written: declares, binds,
    purges and deletes called without a callback, which pika sends with nowait, all back to back
    with the publishes that depend on them; then what each queue holds. (A queue deleted and
    declared again with nowait and published to at once is left out: RabbitMQ itself keeps or
    loses that publish at random.)"""
    x, fx = t.x("nwtopic"), t.x("nwfan")
    q1, q2, q3 = t.q("nw1"), t.q("nw2"), t.q("nw3")

    def on_open(conn, events, done):
        def on_channel(ch):
            ch.add_on_close_callback(lambda _ch, reason: events.append(f"channel closed {err(reason)}"))
            ch.exchange_declare(x, "topic")
            ch.exchange_declare(fx, "fanout")
            ch.queue_declare(q1)
            ch.queue_declare(q2)
            ch.queue_bind(q1, x, "a.*")
            ch.exchange_bind(fx, x, "#")
            ch.queue_bind(q2, fx)
            for key in ("a.b", "c.d", "a.b.c"):
                ch.basic_publish(x, key, key.encode())
            ch.queue_declare(q3)
            for i in range(2):
                ch.basic_publish("", q3, f"purged{i}".encode())
            ch.queue_purge(q3)
            ch.basic_publish("", q3, b"kept")
            ch.queue_unbind(q1, x, "a.*")
            ch.basic_publish(x, "a.z", b"a.z")
            ch.exchange_unbind(fx, x, "#")
            ch.basic_publish(x, "a.y", b"a.y")
            ch.basic_publish("", q2, b"to-q2")
            ch.queue_delete(q2)
            ch.basic_publish("", q2, b"to-deleted")
            ch.basic_qos(prefetch_count=0, callback=lambda f: events.append("qos-ok (all before it answered)"))
            conn.ioloop.call_later(1.0, lambda: conn.channel(on_open_callback=check))

        def check(ch):
            queues = [(q1, "Q1"), (q3, "Q3")]

            def next_queue(_bodies=None):
                if _bodies is not None:
                    events.append(f"{queues.pop(0)[1]} got {sorted(_bodies)}")
                if queues:
                    get_until_empty(ch, queues[0][0], next_queue)
                else:
                    ch.add_on_close_callback(lambda _ch, reason: (events.append(f"Q2 (deleted) passive: {err(reason)}"), done()))
                    ch.queue_declare(q2, passive=True, callback=lambda f: (events.append(f"Q2 (deleted) passive: {describe_method(f.method)}"), done()))

            next_queue()

        conn.channel(on_open_callback=on_channel)

    return run_select(t, on_open)


def select_nowait_cancel_then_recover(t: Target) -> list:
    """SelectConnection: a consumer cancelled without a callback (pika sends nowait) after ten
    unacknowledged deliveries, publishes and a new consumer on the same channel right behind the
    cancel, then basic_recover(requeue=True): the new consumer gets the new messages, then the
    ten again, marked redelivered."""
    q = t.q("nwcancel")

    def on_open(conn, events, done):
        def on_channel(ch):
            ch.add_on_close_callback(lambda _ch, reason: events.append(f"channel closed {err(reason)}"))
            a, b = [], []

            def on_a(_c, m, p, body):
                a.append(body.decode())
                if len(a) == 10:
                    ch.basic_cancel("consumer-a")
                    for i in range(5):
                        ch.basic_publish("", q, f"n{i}".encode())
                    ch.basic_consume(q, on_b, consumer_tag="consumer-b")
                    conn.ioloop.call_later(0.7, recover)

            def on_b(c_, m, p, body):
                b.append((body.decode(), m.redelivered))
                c_.basic_ack(m.delivery_tag)

            def recover():
                events.append(f"a got {len(a)}; b got {sorted(b)}")
                ch.basic_recover(requeue=True, callback=lambda f: conn.ioloop.call_later(0.7, finish))

            def finish():
                events.append(f"after recover b got {len(b)}, redelivered {sum(1 for x in b if x[1])}, distinct {len(set(x[0] for x in b))}")
                ch.queue_declare(q, passive=True, callback=lambda f: (events.append(f"left {f.method.message_count}"), done()))

            ch.queue_declare(q)
            ch.confirm_delivery(lambda f: None)
            for i in range(10):
                ch.basic_publish("", q, f"m{i}".encode())
            ch.basic_consume(q, on_a, consumer_tag="consumer-a")

        conn.channel(on_open_callback=on_channel)

    return run_select(t, on_open)


def select_publishes_behind_a_refused_one(t: Target) -> list:
    """SelectConnection: a publish the broker refuses, followed at once (no reply read in
    between) by 20 publishes to a queue through the default exchange. One broker closes the
    channel at the refused publish, so none of the 20 is routed, and with confirms none is
    confirmed. Refusals: an exchange this channel published to and then deleted (delete-ok
    received); an auto-delete exchange gone with this channel's unbind; a reply_to of
    amq.rabbitmq.reply-to without a reply consumer (406); a CC header that is not an array
    (406)."""
    out = []
    cases = [
        ("exchange deleted by this channel", False),
        ("exchange deleted by this channel", True),
        ("auto-delete exchange gone after unbind", False),
        ("reply_to without a reply-to consumer", False),
        ("CC header not an array", False),
    ]
    for label, confirms in cases:
        q, x = t.q("behind"), t.x("behind")

        def on_open(conn, events, done, q=q, x=x, label=label, confirms=confirms):
            # The publishes confirmed, not the Basic.Ack frames: a broker may confirm several
            # with one `multiple` ack, and RabbitMQ and warren each do when acks come together.
            acks = set()

            def on_confirm(f):
                tag = f.method.delivery_tag
                acks.update(range(1, tag + 1) if f.method.multiple else [tag])

            def on_channel(ch):
                ch.add_on_close_callback(lambda _ch, reason: events.append(f"channel closed {err(reason)} after {len(acks)} acks"))
                if confirms:
                    ch.confirm_delivery(on_confirm)

                def prepared(_f=None):
                    ch.basic_publish("", q, b"warm")
                    if label.startswith("exchange deleted"):
                        ch.basic_publish(x, "", b"first")
                        conn.ioloop.call_later(0.3, lambda: ch.exchange_delete(x, callback=refuse))
                    elif label.startswith("auto-delete"):
                        ch.basic_publish(x, "", b"first")
                        conn.ioloop.call_later(0.3, lambda: ch.queue_unbind(q, x, callback=refuse))
                    else:
                        conn.ioloop.call_later(0.3, refuse)

                def refuse(_f=None):
                    if label.startswith("reply_to"):
                        ch.basic_publish("", q, b"refused", BasicProperties(reply_to="amq.rabbitmq.reply-to"))
                    elif label.startswith("CC"):
                        ch.basic_publish("", q, b"refused", BasicProperties(headers={"CC": "not-an-array"}))
                    else:
                        ch.basic_publish(x, "", b"refused")
                    for i in range(20):
                        ch.basic_publish("", q, f"behind{i}".encode())
                    conn.ioloop.call_later(1.0, check)

                def declared(_f):
                    if label.startswith("auto-delete"):
                        ch.exchange_declare(x, "fanout", auto_delete=True, callback=lambda f: ch.queue_bind(q, x, callback=prepared))
                    else:
                        ch.exchange_declare(x, "fanout", callback=prepared)

                ch.queue_declare(q, callback=declared)

            def check():
                conn.channel(on_open_callback=lambda c: c.queue_declare(
                    q, passive=True, callback=lambda f: (events.append(
                        "publishes behind the refused one routed: " + ("none" if f.method.message_count == before else "some")), done())))

            # What the queue holds before the refused publish: "warm", and "first" when it went
            # through the binding.
            before = 2 if label.startswith("auto-delete") else 1

            conn.channel(on_open_callback=on_channel)

        out.extend(f"{label}{', confirms' if confirms else ''}: {e}" for e in run_select(t, on_open))
    return out


def select_confirm_order_one_queue(t: Target) -> list:
    """SelectConnection in confirm mode, 50 publishes to one classic queue sent back to back:
    the Basic.Ack frames as the client reads them (their tags in arrival order, and whether
    each is `multiple`), and whether every sequence number is confirmed once. One RabbitMQ
    confirms a queue's publishes in publish order, so a client may see each frame's tag above
    the previous one."""
    q = t.q("conforder")

    def on_open(conn, events, done):
        def on_channel(ch):
            frames, outstanding = [], set(range(1, 51))

            def on_confirm(frame):
                frames.append(frame.method.delivery_tag)
                confirm(outstanding, frame.method)
                if not outstanding:
                    events.append("every publish confirmed once")
                    # Through warren each cluster's confirms come as that cluster sends them
                    # (docs/semantics.md, "Order of confirms"): shown, not compared.
                    events.append(f"[doc:confirm order] tags in increasing order {frames == sorted(frames)}")
                    done()

            ch.confirm_delivery(on_confirm)
            ch.queue_declare(q)
            for i in range(50):
                ch.basic_publish("", q, f"o{i}".encode())

        conn.channel(on_open_callback=on_channel)

    return run_select(t, on_open)


def select_many_channels_side_by_side(t: Target) -> list:
    """SelectConnection with several channels opened at once: one fails (404), one is refused
    (403), the others declare, publish and get as if alone."""

    def on_open(conn, events, done):
        pending = {"n": 5}

        def finished():
            pending["n"] -= 1
            if pending["n"] == 0:
                events.sort()
                done()

        def worker(i):
            q = t.q(f"selmany{i}")

            def on_channel(ch):
                ch.add_on_close_callback(lambda _ch, reason: (events.append(f"ch{i} closed {err(reason)}"), finished()))

                outstanding = {1, 2, 3}

                def on_confirm(frame):
                    if outstanding and confirm(outstanding, frame.method) and not outstanding:
                        get_until_empty(ch, q, lambda got: (events.append(f"ch{i} got {sorted(got)}"), ch.close()))

                def declared(_f):
                    ch.confirm_delivery(ack_nack_callback=on_confirm)
                    for j in range(3):
                        ch.basic_publish("", q, f"c{i}-{j}".encode())

                ch.queue_declare(q, callback=declared)
            return on_channel

        def missing(ch):
            ch.add_on_close_callback(lambda _ch, reason: (events.append(f"missing closed {err(reason)}"), finished()))
            ch.queue_declare(uid("noq"), passive=True, callback=lambda f: (events.append("missing declare-ok"), finished()))

        def reserved(ch):
            ch.add_on_close_callback(lambda _ch, reason: (events.append(f"reserved closed {err(reason)}"), finished()))
            ch.exchange_declare("amq.pika-edge", "direct", callback=lambda f: (events.append("reserved declare-ok"), finished()))

        conn.channel(on_open_callback=missing)
        conn.channel(on_open_callback=worker(1))
        conn.channel(on_open_callback=reserved)
        conn.channel(on_open_callback=worker(2))
        conn.channel(on_open_callback=worker(3))

    return run_select(t, on_open)


def confirm(outstanding: set, method) -> list:
    """Applies a Basic.Ack or Basic.Nack to the set of unconfirmed sequence numbers, as pika's
    asynchronous publisher example does (confirms may come out of order, `multiple` covers every
    outstanding number up to the tag): returns the numbers it confirmed, [] if the named tag was
    not outstanding."""
    tag = method.delivery_tag
    if tag not in outstanding:
        return []
    done = sorted(n for n in outstanding if n <= tag) if method.multiple else [tag]
    outstanding.difference_update(done)
    return done


def get_until_empty(ch, q, on_done, got=None):
    """Asynchronous basic_get (auto_ack) until get-empty, then on_done(bodies)."""
    if got is None:
        got = []
        ch.add_callback(lambda _f: on_done(got), [pika.spec.Basic.GetEmpty], one_shot=True)

    def on_get(_ch, _m, _p, body):
        got.append(body.decode())
        get_until_empty(ch, q, on_done, got)

    ch.basic_get(q, on_get, auto_ack=True)

def select_close_channel_while_flowing(t: Target) -> list:
    """SelectConnection: a consumer channel closed while a publisher on another channel keeps
    publishing; nothing is lost (unacknowledged deliveries return to the queue)."""
    q = t.q("selflow")

    def on_open(conn, events, done):
        state = {"acked": 0, "published": 0, "pub": None}

        def on_message(ch, m, p, b):
            if state["acked"] < 10:
                ch.basic_ack(m.delivery_tag)
                state["acked"] += 1
                if state["acked"] == 10:
                    ch.close()

        def publish_more():
            ch = state["pub"]
            if state["published"] < 200 and ch.is_open:
                for _ in range(20):
                    ch.basic_publish("", q, f"p{state['published']}".encode())
                    state["published"] += 1
                conn.ioloop.call_later(0.02, publish_more)
            else:
                conn.ioloop.call_later(1.0, count_left)

        def count_left():
            conn.channel(on_open_callback=lambda ch: ch.queue_declare(q, passive=True, callback=lambda f: (events.append(f"acked {state['acked']} published {state['published']} left {f.method.message_count}"), done())))

        def on_consumer(ch):
            ch.add_on_close_callback(lambda _ch, reason: events.append(f"consumer channel closed {reason.reply_code}"))
            ch.basic_consume(q, on_message)

        def on_publisher(ch):
            state["pub"] = ch
            ch.confirm_delivery(ack_nack_callback=lambda f: None)
            ch.queue_declare(q, callback=lambda f: (conn.channel(on_open_callback=on_consumer), publish_more()))

        conn.channel(on_open_callback=on_publisher)

    return run_select(t, on_open, seconds=20)


def asyncio_confirms_pipelined(t: Target) -> list:
    """AsyncioConnection: 200 publishes in confirm mode sent without waiting; every sequence
    number confirmed exactly once (tracked as pika's asynchronous publisher example does, in
    whatever order the confirms come), none nacked, then all consumed."""
    q = t.q("aioconf")
    events: list = []
    loop = asyncio.new_event_loop()
    finished = loop.create_future()

    def on_open(conn):
        acked, nacked, stray = [], [], []
        outstanding = set(range(1, 201))
        reported = []

        def on_confirm(frame):
            m = frame.method
            tags = confirm(outstanding, m)
            if not tags:
                stray.append(m.delivery_tag)
            (acked if isinstance(m, pika.spec.Basic.Ack) else nacked).extend(tags)
            if not outstanding and not reported:
                reported.append(True)
                events.append(f"acked {len(acked)}, nacked {len(nacked)}, confirms of no outstanding tag {len(stray)}")
                consume(ch)

        def consume(ch):
            got = []

            def on_message(c_, m, p, b):
                got.append(b)
                if len(got) == 200:
                    loop.call_later(0.3, lambda: (events.append(f"consumed {len(got)} distinct {len(set(got))}"), finished.done() or finished.set_result(None)))

            ch.basic_consume(q, on_message, auto_ack=True)

        def on_channel(ch_):
            nonlocal ch
            ch = ch_
            ch.add_on_close_callback(lambda _ch, reason: events.append(f"channel closed {err(reason)}"))
            ch.confirm_delivery(ack_nack_callback=on_confirm)
            ch.queue_declare(q)
            for i in range(200):
                ch.basic_publish("", q, f"a{i}".encode(), BasicProperties(message_id=str(i)))

        ch = None
        conn.channel(on_open_callback=on_channel)

    def open_error(_c, e):
        events.append(f"open error {err(e)}")
        finished.done() or finished.set_result(None)

    def closed(_c, reason):
        if not finished.done():
            events.append(f"connection closed {err(reason)}")
            finished.set_result(None)

    conn = AsyncioConnection(t.params(), on_open_callback=on_open, on_open_error_callback=open_error,
                             on_close_callback=closed, custom_ioloop=loop)
    try:
        loop.run_until_complete(asyncio.wait_for(asyncio.shield(finished), 20))
    except asyncio.TimeoutError:
        events.append("timeout")
    if conn.is_open:
        conn.close()
        try:
            loop.run_until_complete(asyncio.sleep(0.3))
        except Exception:
            pass
    loop.close()
    return events


# ---------------------------------------------------------------------------------------------


SCENARIOS = [
    consume_generator_inactivity_and_cancel,
    consume_generator_ends_on_broker_cancel,
    on_cancel_callback_queue_deleted,
    stop_consuming_and_close_from_callbacks,
    basic_get_nack_requeue_loop,
    basic_recover_requeue_consumer,
    worker_qos_before_first_consume,
    consumer_priorities,
    exclusive_consumer_refusals,
    mandatory_returns_per_exchange_type,
    on_return_callback_plain_and_tx,
    nack_from_reject_publish,
    tx_publish_ack_rollback_commit,
    publish_missing_exchange_then_new_channel,
    default_exchange_empty_routing_key,
    routing_keys_255_bytes,
    properties_round_trip,
    per_message_ttl_and_expiry,
    queue_argument_families,
    queue_argument_invalid_values,
    redeclare_with_other_flags,
    exclusive_and_auto_delete_queue_lifecycles,
    dead_letter_chain,
    overflow_drop_head_dead_letters,
    quorum_delivery_limit_dead_letters,
    amq_prefixed_exchanges,
    amq_prefixed_queues_and_reply_to,
    unbind_and_bind_edge_cases,
    connection_refusals,
    heartbeats_and_blocked_callbacks,
    silent_client_with_heartbeat_dropped,
    frame_max_negotiation_and_large_messages,
    select_pipelined_topology,
    select_nowait_topology,
    select_nowait_cancel_then_recover,
    select_publishes_behind_a_refused_one,
    select_confirm_order_one_queue,
    select_many_channels_side_by_side,
    select_close_channel_while_flowing,
    asyncio_confirms_pipelined,
]


def run(addr: str, fn) -> list:
    t = Target(addr)
    try:
        with deadline(SCENARIO_SECONDS):
            return fn(t)
    except Timeout:
        return ["scenario timeout"]
    except Exception as e:  # the scenario itself broke: record it, the other side may not
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"line {f.lineno}" for f in reversed(tb) if f.filename == __file__), "")
        return [f"scenario raised {type(e).__name__} ({err(e)}) at {where}"]
    finally:
        t.close_all()


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print("\n".join(fn.__name__ for fn in SCENARIOS))
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    global TEXTS
    verbose = "-v" in argv
    TEXTS = "--texts" in argv
    argv = [a for a in argv if a not in ("-v", "--texts")]
    direct, proxy, *only = argv
    unknown = set(only) - {fn.__name__ for fn in SCENARIOS}
    if unknown:
        print(f"unknown scenarios: {sorted(unknown)}", file=sys.stderr)
        return 2
    fails = 0
    for fn in SCENARIOS:
        if only and fn.__name__ not in only:
            continue
        started = time.monotonic()
        want = run(direct, fn)
        got = run(proxy, fn)
        # A scenario that breaks against RabbitMQ tests nothing, even if it breaks alike.
        broken = bool(want) and want[0].startswith("scenario ")
        # Lines tagged [doc:...] are differences docs/semantics.md lists: shown, not compared.
        compared = [[o for o in obs if "[doc:" not in o] for obs in (want, got)]
        same = compared[0] == compared[1] and not broken
        print(f"[{'PASS' if same else 'FAIL'}] {fn.__name__} ({time.monotonic() - started:.1f} s)", flush=True)
        if same and verbose:
            for line in want:
                print(f"     {line}")
        if not same:
            fails += 1
            for i in range(max(len(want), len(got))):
                w = want[i] if i < len(want) else "-"
                g = got[i] if i < len(got) else "-"
                mark = " " if w == g else "!"
                print(f"   {mark} rabbitmq: {w}\n   {mark} warren:   {g}", flush=True)
    print(f"pika edge cases: {fails} differ" if fails else "pika edge cases: all the same")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
