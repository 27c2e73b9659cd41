#!/usr/bin/env python3
"""kombu and Celery usage patterns run directly against RabbitMQ and through warren, compared
observation by observation.

    .venv/bin/python tests/e2e/kombu_edge.py DIRECT_URL PROXY_URL [SCENARIO ...]

    e.g. .venv/bin/python tests/e2e/kombu_edge.py amqp://guest:guest@127.0.0.1:5701// \\
                                                  amqp://guest:guest@127.0.0.1:5673//

tests/clients/edge_compare.py does this for protocol edge cases with py-amqp; this script does
it one level up, with what kombu and Celery users write: SimpleQueue / SimpleBuffer, Producer
with declare=[...], retry, mandatory and on_return, Consumers over several exchange types and
`binding` lists, queue and consumer arguments, maybe_declare's cache across channel errors,
Broadcast, the pidbox Mailbox (what `celery inspect` and `celery control` do), Connection.ensure
and autoretry, drain_events with heartbeats, purge / delete / passive declare counts,
requeue / reject / recover, prefetch changed at runtime with kombu.common.QoS, confirm_publish,
message properties, headers, serializers and compression, request/reply (server-named, UUID
and direct reply-to queues), connection pools; and, with a Celery worker started in a
subprocess for each URL (prefork, 4 processes, rpc:// results, acks_late, prefetch multiplier
1, confirm_publish, -E), many results at once, retry with countdown, priority, remote control,
revoke, task events, purge, and the worker's prefetch as it runs tasks.

Each scenario returns a list of observations (counts, codes, sorted bodies, properties; names
replaced by labels, never timings). RabbitMQ's answer is the expected one by construction, so a
difference fails whatever it is. Order is sorted where warren documents that it differs (a
queue's messages live on several clusters, docs/routing.md). A scenario has a time budget: a
hang is reported as a timeout and counts as a difference.

Names carry a run id (and the side: d for direct, w for warren) and are deleted at the end of
each scenario; the Celery workers are stopped and their queues deleted at the end of the run.
Exits 0 when every scenario observes the same both ways (lines tagged [doc:...], differences
docs/semantics.md lists, are shown but not compared); prints the differences otherwise
(KEDGE_SHOW=1 prints the observations of the passing scenarios too).

The module is also the Celery app of the workers it starts (`-A kombu_edge:celery_app`,
configured by the KEDGE_BROKER and KEDGE_RUN environment variables).
"""
from __future__ import annotations

import datetime
import decimal
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import amqp.exceptions
from kombu import Connection, Consumer, Exchange, Producer, Queue, binding
from kombu.common import QoS, Broadcast, maybe_declare, send_reply
from kombu.pidbox import Mailbox

HERE = Path(__file__).resolve().parent
RUN = uuid.uuid4().hex[:6]
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SERVER_NAMED_RE = re.compile(r"(amq|warren)\.gen-[A-Za-z0-9_\-]+")
BUDGET = 60  # seconds per scenario and side; Celery scenarios set their own


class ScenarioTimeout(BaseException):
    """Raised by SIGALRM when a scenario overruns its budget (BaseException: kombu's
    `except Exception` must not swallow it)."""


def _alarm(signum, frame):
    raise ScenarioTimeout()


# ---------------------------------------------------------------------------------------------
# Harness


class Target:
    """One side (RabbitMQ directly, or warren): its URL, the connections a scenario opened, and
    the names it created (deleted afterwards, replaced by their labels in observations)."""

    def __init__(self, url: str, side: str):
        self.url = url
        self.side = side
        self.conns: list[Connection] = []
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.labels: dict[str, str] = {}
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()

    def name(self, label: str) -> str:
        n = f"kedge-{RUN}{self.side}-{label}-{uuid.uuid4().hex[:6]}"
        self.labels[n] = label
        return n

    def q(self, label: str) -> str:
        n = self.name(label)
        self.queues.append(n)
        return n

    def x(self, label: str) -> str:
        n = self.name(label)
        self.exchanges.append(n)
        return n

    def conn(self, **kw) -> Connection:
        kw.setdefault("connect_timeout", 10)
        c = Connection(self.url, **kw)
        self.conns.append(c)
        c.connect()
        return c

    def norm(self, s: str) -> str:
        for n in sorted(self.labels, key=len, reverse=True):
            s = s.replace(n, f"<{self.labels[n]}>")
        s = SERVER_NAMED_RE.sub("<server-named>", s)
        return UUID_RE.sub("<uuid>", s)

    def spawn(self, fn, *args) -> threading.Thread:
        th = threading.Thread(target=fn, args=args, daemon=True)
        th.start()
        self.threads.append(th)
        return th

    def cleanup(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=5)
        for c in self.conns:
            try:
                c.release()
            except Exception:  # noqa: BLE001
                pass
        self.conns.clear()
        if not (self.queues or self.exchanges):
            return
        with Connection(self.url, connect_timeout=10) as c:
            for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                for n in names:
                    try:
                        ch = c.channel()
                        if kind == "queue":
                            ch.queue_delete(n)
                        else:
                            ch.exchange_delete(n)
                        ch.close()
                    except Exception:  # noqa: BLE001
                        pass


def err(e: BaseException) -> str:
    """An error as a kombu user sees it: its class and reply code (texts name generated
    things)."""
    code = getattr(e, "reply_code", None) or getattr(e, "code", None)
    return f"{type(e).__name__}" + (f" {code}" if code else "")


def attempt(obs: list, label: str, fn):
    """Runs fn, records its result or the error it raised; returns the result (None on error)."""
    try:
        r = fn()
    except ScenarioTimeout:
        raise
    except Exception as e:  # noqa: BLE001
        obs.append(f"{label}: {err(e)}")
        return None
    shown = "ok" if r is None or type(r).__name__ == "promise" else repr(r)
    obs.append(f"{label}: {shown}")
    return r


def drain_until(conn: Connection, pred, timeout: float = 5.0, linger: float = 0.3) -> bool:
    """drain_events until pred() holds or timeout; then `linger` more for late extras
    (duplicates, deliveries beyond a prefetch)."""
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        try:
            conn.drain_events(timeout=min(0.25, max(0.01, end - time.monotonic())))
        except socket.timeout:
            pass
    end = time.monotonic() + linger
    while time.monotonic() < end:
        try:
            conn.drain_events(timeout=max(0.01, end - time.monotonic()))
        except socket.timeout:
            pass
    return pred()


def passive(conn: Connection, name: str):
    """(message_count, consumer_count) of a queue, or the error, on a channel of its own."""
    ch = conn.channel()
    try:
        r = ch.queue_declare(name, passive=True)
        return (r.message_count, r.consumer_count)
    except amqp.exceptions.ChannelError as e:
        return err(e)
    finally:
        if ch.is_open:
            ch.close()


def exchange_exists(conn: Connection, name: str):
    ch = conn.channel()
    try:
        ch.exchange_declare(name, "direct", passive=True)
        return True
    except amqp.exceptions.ChannelError as e:
        return err(e)
    finally:
        if ch.is_open:
            ch.close()


def wait_count(conn: Connection, name: str, want, timeout: float = 5.0):
    """Polls a queue's (ready) message count until it is `want` (publishes without confirms
    are asynchronous): the count seen last."""
    end = time.monotonic() + timeout
    while True:
        r = passive(conn, name)
        n = r[0] if isinstance(r, tuple) else r
        if n == want or time.monotonic() > end:
            return n
        time.sleep(0.05)


def wait_gone(conn: Connection, name: str, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while True:
        r = passive(conn, name)
        if not isinstance(r, tuple) or time.monotonic() > end:
            return r
        time.sleep(0.05)


def typed(v):
    """A value with the types of its parts, to compare header tables exactly."""
    if isinstance(v, dict):
        return {k: typed(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [typed(x) for x in v]
    return f"{type(v).__name__}:{v!r}"


# ---------------------------------------------------------------------------------------------
# kombu scenarios. Each takes a Target and returns a list of observations.


def simple_queue(t: Target) -> list:
    """SimpleQueue: put, qsize right after put, get_nowait with ack / requeue, clear, get with a
    timeout on an empty queue, close."""
    obs = []
    c = t.conn()
    name = t.q("sq")
    t.exchanges.append(name)
    sq = c.SimpleQueue(name)
    for i in range(10):
        sq.put({"i": i}, headers={"n": i})
    obs.append(f"qsize after 10 puts: {wait_count(c, name, 10)}")
    got = []
    m = sq.get_nowait()
    got.append(m.payload["i"])
    obs.append(f"header matches payload: {m.headers['n'] == m.payload['i']}")
    m.ack()
    m = sq.get_nowait()
    m.requeue()
    m = sq.get_nowait()
    got.append(m.payload["i"])
    m.ack()
    obs.append(f"qsize after 2 acks and a requeue: {wait_count(c, name, 8)}")
    obs.append(f"clear: {sq.clear()}")
    obs.append(f"qsize after clear: {sq.qsize()}")
    attempt(obs, "get_nowait on empty", lambda: sq.get_nowait())
    obs.append(f"the two acked are distinct: {len(set(got)) == 2}")
    for i in range(3):
        sq.put(f"b{i}")
    bodies = []
    for _ in range(3):
        try:
            m = sq.get(timeout=3)
        except sq.Empty:
            bodies.append("Empty")
            continue
        bodies.append(m.payload)
        m.ack()
    obs.append(f"get(timeout=3) x3: {sorted(bodies)}")
    t0 = time.monotonic()
    attempt(obs, "get(timeout=0.5) on empty", lambda: sq.get(timeout=0.5))
    obs.append(f"  returned within 3s: {time.monotonic() - t0 < 3}")
    sq.close()
    obs.append(f"passive after close: {passive(c, name)}")
    return obs


def simple_buffer(t: Target) -> list:
    """SimpleBuffer (no_ack, transient, auto_delete queue and exchange): the queue and its
    exchange go when the buffer closes."""
    obs = []
    c = t.conn()
    name = t.q("sb")
    t.exchanges.append(name)
    sb = c.SimpleBuffer(name)
    for i in range(5):
        sb.put({"i": i})
    obs.append(f"qsize: {wait_count(c, name, 5)}")
    got = []
    for _ in range(5):
        try:
            got.append(sb.get(timeout=3).payload["i"])
        except sb.Empty:
            got.append("Empty")
    obs.append(f"got: {sorted(got, key=str)}")
    attempt(obs, "get(timeout=0.5) on empty", lambda: sb.get(timeout=0.5))
    obs.append(f"passive while consuming: {passive(c, name)}")
    sb.close()
    obs.append(f"queue after close: {wait_gone(c, name)}")
    end = time.monotonic() + 5
    while exchange_exists(c, name) is True and time.monotonic() < end:
        time.sleep(0.05)
    obs.append(f"exchange after close: {exchange_exists(c, name)}")
    return obs


def publish_declare_and_cache(t: Target) -> list:
    """Producer.publish(declare=[queue], retry=True): the queue, its exchange and binding are
    declared once per Connection (kombu's cache), so a queue deleted behind kombu's back is not
    re-declared on that connection, and is on a fresh one."""
    obs = []
    c = t.conn()
    ex = Exchange(t.x("ex"), "direct", durable=False)
    q = Queue(t.q("q"), ex, routing_key="k", durable=False)
    p = c.Producer()
    policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.1}
    p.publish({"n": 1}, exchange=ex, routing_key="k", declare=[q], retry=True,
              retry_policy=policy)
    obs.append(f"after first publish: {wait_count(c, q.name, 1)}")
    other = t.conn()
    other.default_channel.queue_delete(q.name)
    obs.append(f"deleted by another connection: {passive(c, q.name)}")
    p.publish({"n": 2}, exchange=ex, routing_key="k", declare=[q], retry=True,
              retry_policy=policy)
    time.sleep(0.3)
    obs.append(f"publish with declare=[q] on the same connection: {passive(c, q.name)}")
    c2 = t.conn()
    c2.Producer().publish({"n": 3}, exchange=ex, routing_key="k", declare=[q], retry=True,
                          retry_policy=policy)
    obs.append(f"same on a fresh connection: {wait_count(c2, q.name, 1)}")
    m = q(c2.default_channel).get(no_ack=True)
    obs.append(f"message: {m and m.payload}")
    # a publish to an exchange declared in the same call
    ex2 = Exchange(t.x("ex2"), "topic", durable=False)
    p.publish("x", exchange=ex2, routing_key="a.b", declare=[ex2])
    obs.append(f"exchange declared by publish: {exchange_exists(c, ex2.name)}")
    return obs


def maybe_declare_across_channel_errors(t: Target) -> list:
    """maybe_declare's cache is per Connection, and survives channel errors; what a channel
    closed by the broker and the default channel do afterwards."""
    obs = []
    c = t.conn()
    q = Queue(t.q("q"), Exchange(t.x("ex"), "direct", durable=False), "k", durable=False)
    ch = c.channel()
    obs.append(f"maybe_declare first: {maybe_declare(q, ch)}")
    obs.append(f"maybe_declare again: {maybe_declare(q, ch)}")
    attempt(obs, "passive declare of a missing queue",
            lambda: ch.queue_declare(t.name("missing"), passive=True))
    obs.append(f"channel open after the error: {ch.is_open}")
    attempt(obs, "maybe_declare on the closed channel (cached)", lambda: maybe_declare(q, ch))
    q2 = Queue(t.q("q2"), durable=False)
    attempt(obs, "maybe_declare of a new queue on the closed channel",
            lambda: maybe_declare(q2, ch))
    ch2 = c.channel()
    attempt(obs, "maybe_declare of the new queue on a new channel",
            lambda: maybe_declare(q2, ch2))
    attempt(obs, "retry=True on the new channel",
            lambda: maybe_declare(Queue(t.q("q3"), durable=False), ch2, retry=True,
                                  max_retries=1))
    dc = c.default_channel
    attempt(obs, "default_channel: passive of a missing queue",
            lambda: dc.queue_declare(t.name("missing2"), passive=True))
    obs.append(f"default_channel is the same object: {c.default_channel is dc}")
    attempt(obs, "default_channel reused after its error",
            lambda: c.default_channel.queue_declare(q.name, passive=True).message_count)
    # Producer.publish(retry=True) on the connection after these errors
    p = c.Producer()
    attempt(obs, "publish(retry=True) after", lambda: p.publish(
        "after", exchange="", routing_key=q2.name, retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0}))
    obs.append(f"q2 count: {wait_count(t.conn(), q2.name, 1)}")
    return obs


def mandatory_on_return(t: Target) -> list:
    """Producer(on_return=...) with mandatory publishes: unroutable ones come back with 312
    NO_ROUTE, routable ones do not; without and with confirm_publish."""
    obs = []
    ex = Exchange(t.x("ex"), "direct", durable=False)
    q = Queue(t.q("q"), ex, "bound", durable=False)
    for confirm in (False, True):
        c = t.conn(transport_options={"confirm_publish": confirm})
        returned = []

        def on_return(exc, exchange, routing_key, message, returned=returned):
            returned.append((err(exc), t.norm(exchange), t.norm(routing_key),
                             message.body.decode() if isinstance(message.body, bytes)
                             else message.body))

        p = Producer(c.channel(), on_return=on_return)
        p.declare()
        q(p.channel).declare()
        p.publish("to-bound", exchange=ex, routing_key="bound", mandatory=True,
                  content_type="text/plain", content_encoding="utf-8")
        p.publish("to-nowhere", exchange=ex, routing_key="nowhere", mandatory=True,
                  content_type="text/plain", content_encoding="utf-8")
        p.publish("default-missing", exchange="", routing_key=t.name("noqueue"), mandatory=True,
                  content_type="text/plain", content_encoding="utf-8")
        p.publish("not-mandatory", exchange=ex, routing_key="nowhere",
                  content_type="text/plain", content_encoding="utf-8")
        drain_until(c, lambda: len(returned) >= 2, timeout=5)
        obs.append(f"confirm={confirm} returned: {sorted(returned)}")
        obs.append(f"confirm={confirm} bound queue: {wait_count(c, q.name, 1 + confirm)}")
    return obs


def consumer_over_exchange_types(t: Target) -> list:
    """One Consumer over queues bound to direct, topic, fanout and headers exchanges (kombu
    consumes all but the last with nowait), one queue with a bindings list."""
    obs = []
    c = t.conn()
    xd = Exchange(t.x("direct"), "direct", durable=False)
    xt = Exchange(t.x("topic"), "topic", durable=False)
    xf = Exchange(t.x("fanout"), "fanout", durable=False)
    xh = Exchange(t.x("headers"), "headers", durable=False)
    queues = [
        Queue(t.q("qd"), xd, "red", durable=False),
        Queue(t.q("qt1"), xt, "*.error", durable=False),
        Queue(t.q("qt2"), xt, "kern.#", durable=False),
        Queue(t.q("qf1"), xf, durable=False),
        Queue(t.q("qf2"), xf, durable=False),
        Queue(t.q("qh_all"), xh, binding_arguments={"x-match": "all", "a": 1, "b": "x"},
              durable=False),
        Queue(t.q("qh_any"), xh, binding_arguments={"x-match": "any", "a": 1, "c": True},
              durable=False),
        Queue(t.q("qmulti"), bindings=[binding(xd, "green"), binding(xt, "app.#"),
                                       binding(xf)], durable=False),
    ]
    got = []
    ch = c.channel()
    cons = Consumer(ch, queues, accept=["json", "text/plain"], no_ack=False)
    tag_to_q = {}

    def on_message(body, message):
        got.append((tag_to_q.get(message.delivery_info["consumer_tag"], "?"), body))
        message.ack()

    cons.register_callback(on_message)
    cons.consume()
    tag_to_q.update({tag: t.norm(qn) for qn, tag in cons._active_tags.items()})
    p = c.Producer()
    sends = [
        (xd, "red", None), (xd, "green", None), (xd, "blue", None),
        (xt, "kern.error", None), (xt, "app.error", None), (xt, "app.info.x", None),
        (xt, "kern", None),
        (xf, "anything", None),
        (xh, "", {"a": 1, "b": "x"}), (xh, "", {"a": 1}), (xh, "", {"c": True}),
        (xh, "", {"a": 2, "b": "x"}),
    ]
    for i, (x, rk, headers) in enumerate(sends):
        p.publish(f"{t.norm(x.name)}:{rk}:{i}", exchange=x, routing_key=rk,
                  headers=headers or {})
    expected = 15
    drain_until(c, lambda: len(got) >= expected, timeout=8, linger=0.5)
    obs.append(f"deliveries: {len(got)}")
    for row in sorted(got):
        obs.append(f"  {row[0]} <- {row[1]}")
    cons.cancel()
    return obs


def bindings_unbind_and_e2e(t: Target) -> list:
    """kombu Queue.bind_to / unbind_from and Exchange.bind_to (exchange-to-exchange), and
    Exchange.delete(if_unused=True) of an exchange with bindings."""
    obs = []
    c = t.conn()
    ch = c.channel()
    src = Exchange(t.x("src"), "topic", durable=False)(ch)
    dst = Exchange(t.x("dst"), "fanout", durable=False)(ch)
    x2 = Exchange(t.x("x2"), "direct", durable=False)(ch)
    src.declare()
    dst.declare()
    x2.declare()
    q = Queue(t.q("q"), durable=False)(ch)
    q.declare()
    q.bind_to(x2, routing_key="a")
    q.bind_to(x2, routing_key="b")
    q.bind_to(dst)
    dst.bind_to(src, routing_key="events.#")
    p = Producer(ch)
    for x, rk in ((x2, "a"), (x2, "b"), (x2, "c"), (src, "events.one"), (src, "other")):
        p.publish(f"{t.norm(x.name)}/{rk}", exchange=x, routing_key=rk)
    obs.append(f"count after bindings: {wait_count(c, q.name, 3)}")
    q.unbind_from(x2, routing_key="a")
    dst.unbind_from(src, routing_key="events.#")
    for x, rk in ((x2, "a"), (x2, "b"), (src, "events.two")):
        p.publish(f"{t.norm(x.name)}/{rk}", exchange=x, routing_key=rk)
    obs.append(f"count after unbinds: {wait_count(c, q.name, 4)}")
    msgs = []
    while True:
        m = q.get(no_ack=True)
        if m is None:
            break
        msgs.append(m.payload)
    obs.append(f"bodies: {sorted(msgs)}")
    attempt(obs, "delete(if_unused) of an exchange with a binding",
            lambda: x2(c.channel()).delete(if_unused=True))
    attempt(obs, "delete(if_unused) of an exchange without",
            lambda: src(c.channel()).delete(if_unused=True))
    obs.append(f"src after delete: {exchange_exists(c, src.name)}")
    return obs


def queue_arguments(t: Target) -> list:
    """Queue(expires, message_ttl, max_length, max_priority, queue_arguments=DLX): declare,
    redeclare with other arguments (406), messages expire into the DLX with x-death."""
    obs = []
    c = t.conn(transport_options={"confirm_publish": True})
    ex = Exchange(t.x("ex"), "direct", durable=False)
    dlx = Exchange(t.x("dlx"), "fanout", durable=False)
    dlq = Queue(t.q("dlq"), dlx, durable=False)
    args = dict(durable=False, expires=30, message_ttl=0.5, max_length=50, max_priority=5,
                queue_arguments={"x-dead-letter-exchange": dlx.name})
    name = t.q("q")
    q = Queue(name, ex, "k", **args)
    ch = c.channel()
    dlq(ch).declare()
    attempt(obs, "declare", lambda: q(ch).declare())
    attempt(obs, "same again", lambda: q(ch).declare())
    attempt(obs, "queue_declare(passive=True)",
            lambda: tuple(q(ch).queue_declare(passive=True))[1:])
    attempt(obs, "redeclare with message_ttl=1.0",
            lambda: Queue(name, ex, "k", **dict(args, message_ttl=1.0))(c.channel()).declare())
    attempt(obs, "redeclare with no arguments",
            lambda: Queue(name, ex, "k", durable=False)(c.channel()).declare())
    p = c.Producer()
    for i in range(3):
        p.publish({"i": i}, exchange=ex, routing_key="k", priority=i)
    obs.append(f"count right after confirmed publishes: {passive(c, name)}")
    obs.append(f"dlq after expiry: {wait_count(c, dlq.name, 3, timeout=8)}")
    obs.append(f"queue after expiry: {passive(c, name)}")
    rows = []
    for _ in range(3):
        m = dlq(c.default_channel).get(no_ack=True)
        if m is None:
            break
        death = [{k: t.norm(str(v)) for k, v in sorted(d.items()) if k != "time"}
                 for d in m.headers.get("x-death", [])]
        rows.append((m.payload["i"], m.properties.get("priority"), str(death),
                     m.headers.get("x-first-death-reason")))
    for r in sorted(rows):
        obs.append(f"  dead-lettered {r}")
    # per-message expiration (Producer.publish(expiration=seconds)) on a queue without a TTL
    plain = t.q("plain")
    Queue(plain, durable=False)(c.default_channel).declare()
    p.publish("short", routing_key=plain, expiration=0.3)
    p.publish("long", routing_key=plain, expiration=60)
    obs.append(f"per-message expiration: {wait_count(c, plain, 1, timeout=5)} left")
    m = Queue(plain)(c.default_channel).get(no_ack=True)
    obs.append(f"  the one left: {m and (m.payload, m.properties.get('expiration'))}")
    return obs


def consumer_arguments_priority(t: Target) -> list:
    """Queue(consumer_arguments={'x-priority': 10}): a higher-priority consumer with room gets
    every message."""
    obs = []
    c = t.conn()
    name = t.q("q")
    got = {"hi": 0, "lo": 0}

    def cb(which):
        def f(body, message):
            got[which] += 1
            message.ack()
        return f

    lo = Consumer(c.channel(), [Queue(name, durable=False)], callbacks=[cb("lo")])
    hi = Consumer(c.channel(), [Queue(name, durable=False, consumer_arguments={"x-priority": 10})],
                  callbacks=[cb("hi")])
    lo.consume()
    hi.consume()
    pc = t.conn(transport_options={"confirm_publish": True})
    p = pc.Producer()
    for i in range(12):
        p.publish(i, routing_key=name)
    drain_until(c, lambda: sum(got.values()) >= 12, timeout=5)
    obs.append(f"deliveries: {got}")
    attempt(obs, "consumer_arguments x-priority not an integer", lambda: Consumer(
        c.channel(), [Queue(name, durable=False, consumer_arguments={"x-priority": "high"})]
    ).consume())
    return obs


def exchange_options(t: Target) -> list:
    """Exchange delivery_mode (transient / persistent) as the default of a publish, an explicit
    override, durable=False vs True conflict (406), an auto_delete exchange going with its last
    binding."""
    obs = []
    c = t.conn()
    xt = Exchange(t.x("xt"), "direct", durable=False, auto_delete=True, delivery_mode="transient")
    xp = Exchange(t.x("xp"), "direct", durable=True, delivery_mode=2)
    q = Queue(t.q("q"), bindings=[binding(xt, "k"), binding(xp, "k")], durable=False)
    ch = c.channel()
    q(ch).declare()
    p = Producer(ch)
    p.publish("t", exchange=xt, routing_key="k")
    p.publish("p", exchange=xp, routing_key="k")
    p.publish("t-override", exchange=xt, routing_key="k", delivery_mode=2)
    p.publish("by-name", exchange=xp.name, routing_key="k")
    wait_count(c, q.name, 4)
    rows = []
    for _ in range(4):
        m = q(ch).get(no_ack=True)
        if m is None:
            break
        rows.append((m.payload, m.properties.get("delivery_mode"),
                     t.norm(m.delivery_info["exchange"])))
    obs.append(f"delivered: {sorted(rows)}")
    attempt(obs, "redeclare durable=False exchange as durable", lambda: Exchange(
        xt.name, "direct", durable=True, auto_delete=True)(c.channel()).declare())
    attempt(obs, "redeclare as topic", lambda: Exchange(
        xp.name, "topic", durable=True)(c.channel()).declare())
    attempt(obs, "passive declare with another type", lambda: Exchange(
        xp.name, "fanout", durable=True)(c.channel()).declare(passive=True))
    ch2 = c.channel()
    q(ch2).unbind_from(xt, routing_key="k")
    end = time.monotonic() + 5
    while exchange_exists(c, xt.name) is True and time.monotonic() < end:
        time.sleep(0.05)
    obs.append(f"auto_delete exchange after its last unbind: {exchange_exists(c, xt.name)}")
    obs.append(f"durable exchange kept: {exchange_exists(c, xp.name)}")
    return obs


def broadcast_queues(t: Target) -> list:
    """kombu.common.Broadcast: three consumers (own connections, own auto_delete queues) each
    receive every message; their queues go with them."""
    obs = []
    xname = t.x("bcast")
    consumers = []
    got = [[] for _ in range(3)]
    qnames = []
    for i in range(3):
        c = t.conn()
        b = Broadcast(xname, queue=f"{xname}.q", unique=True)
        qnames.append(b.name)
        cons = Consumer(c.channel(), [b], callbacks=[lambda body, m, i=i: (got[i].append(body),
                                                                             m.ack())])
        cons.consume()
        consumers.append((c, cons))
    pc = t.conn(transport_options={"confirm_publish": True})
    p = pc.Producer()
    for n in range(6):
        p.publish(f"m{n}", exchange=Exchange(xname, "fanout"), routing_key="")
    end = time.monotonic() + 8
    while any(len(g) < 6 for g in got) and time.monotonic() < end:
        for c, _ in consumers:
            try:
                c.drain_events(timeout=0.05)
            except socket.timeout:
                pass
    time.sleep(0.3)
    for c, _ in consumers:
        try:
            c.drain_events(timeout=0.1)
        except socket.timeout:
            pass
    for i, g in enumerate(got):
        obs.append(f"consumer {i}: {sorted(g)}")
    for c, cons in consumers:
        cons.cancel()
    gone = [wait_gone(pc, n) for n in qnames]
    obs.append(f"queues after cancel: {gone}")
    return obs


def _pidbox_node(t: Target, mailbox: Mailbox, hostname: str, state: dict, ready: threading.Event):
    c = t.conn()
    ch = c.channel()

    def ping(state):
        return "pong"

    def echo(state, **kw):
        return kw

    def note(state, v):
        state.setdefault("notes", []).append(v)

    def boom(state):
        raise ValueError("boom")

    node = mailbox(c).Node(hostname, state=state, channel=ch,
                           handlers={"ping": ping, "echo": echo, "note": note, "boom": boom})
    node.listen()
    ready.set()
    while not t.stop.is_set():
        try:
            c.drain_events(timeout=0.1)
        except socket.timeout:
            pass


def _pidbox(t: Target, namespace: str) -> list:
    obs = []
    hosts = [t.name("n1") + "@edge", t.name("n2") + "@edge"]
    for h in hosts:
        t.labels[h] = t.labels[h[:-5]] + "@edge"
    mb = Mailbox(namespace, type="fanout", accept=["json"], queue_ttl=300, queue_expires=10,
                 reply_queue_ttl=300, reply_queue_expires=10)
    states = [{}, {}]
    for h, s in zip(hosts, states):
        ready = threading.Event()
        t.spawn(_pidbox_node, t, mb, h, s, ready)
        if not ready.wait(10):
            obs.append(f"node {t.norm(h)} not listening after 10s")
    cc = t.conn()
    client = mb(cc)

    def srt(replies):
        return sorted((t.norm(k), v) for r in replies for k, v in r.items())

    # kombu's reply queue is auto_delete: each call's consumer deletes it at cancel, and the
    # next call declares it again only after publishing its request (maybe_declare is cached),
    # so a fast reply can be dropped, directly as through warren. Declare it before each call.
    real_call = client.call

    def call(*a, **kw):
        client.reply_queue(cc.default_channel).declare()
        return real_call(*a, **kw)

    client.call = call

    obs.append(f"call ping n1: {srt(client.call([hosts[0]], 'ping', timeout=5))}")
    obs.append(f"call ping n1,n2: {srt(client.call(hosts, 'ping', timeout=5))}")
    obs.append("call echo n2: " + str(srt(client.call([hosts[1]], "echo",
                                                      {"a": [1, 2], "b": {"c": None}},
                                                      timeout=5))))
    obs.append(f"call boom n1: {srt(client.call([hosts[0]], 'boom', timeout=5))}")
    client.cast([hosts[1]], "note", {"v": 1})
    client.cast(hosts, "note", {"v": 2})
    t0 = time.monotonic()
    r = client.call([t.name("ghost") + "@edge"], "ping", timeout=1)
    obs.append(f"call to a missing node: {r}, within 4s: {time.monotonic() - t0 < 4}")
    if namespace != "celery":  # only our nodes listen on this namespace: no destination
        client.reply_queue(cc.default_channel).declare()
        obs.append(f"multi_call ping: {srt(client.multi_call('ping', timeout=3, limit=2))}")
    time.sleep(0.5)
    # Two casts to one node travel on its queue, on two clusters when the names are sharded:
    # their order is the clusters' (docs/routing.md), so the set is compared.
    obs.append(f"casts seen: n1 {sorted(states[0].get('notes') or [])}, "
               f"n2 {sorted(states[1].get('notes') or [])}")
    # the replies of two calls interleaved on one reply queue (kombu's `unclaimed`)
    obs.append(f"call again n2: {srt(client.call([hosts[1]], 'ping', timeout=5))}")
    return obs


def pidbox_mailbox_control_names(t: Target) -> list:
    """kombu.pidbox Mailbox('celery', fanout) with two nodes: call / cast / a missing node, as
    `celery inspect` and `celery control` do (control names: the control cluster)."""
    return _pidbox(t, "celery")


def pidbox_mailbox_own_namespace(t: Target) -> list:
    """The same with a mailbox namespace of our own (sharded names), plus multi_call without a
    destination."""
    ns = t.name("mbox")
    t.exchanges += [f"{ns}.pidbox", f"reply.{ns}.pidbox"]
    return _pidbox(t, ns)


def ensure_and_autoretry(t: Target) -> list:
    """Connection.ensure around a publish, around a function failing with a recoverable channel
    error (405 RESOURCE_LOCKED: retried), autoretry, and the default channel after an
    error."""
    obs = []
    c = t.conn()
    qn = t.q("q")
    c.default_channel.queue_declare(qn, durable=False, auto_delete=False)
    p = c.Producer()
    publish = c.ensure(p, p.publish, max_retries=2, interval_start=0, interval_step=0.1)
    publish({"x": 1}, routing_key=qn)
    obs.append(f"ensured publish: {wait_count(c, qn, 1)}")

    owner = t.conn()
    excl = t.q("excl")
    owner.default_channel.queue_declare(excl, exclusive=True)
    calls, errbacks = [], []

    class Holder:
        def __init__(self):
            self.channel = c.channel()

        def revive(self, channel):
            self.channel = channel

    h = Holder()

    def locked():
        calls.append(1)
        return h.channel.queue_declare(excl, passive=True)

    attempt(obs, "ensure(passive declare of another connection's exclusive queue)",
            lambda: c.ensure(h, locked, errback=lambda e, i: errbacks.append(err(e)),
                             max_retries=2, interval_start=0, interval_step=0)())
    obs.append(f"  attempts {len(calls)}, errbacks {errbacks}")

    def declare_and_count(channel=None):
        return channel.queue_declare(qn, passive=True).message_count

    r = attempt(obs, "autoretry (result)",
                lambda: c.autoretry(declare_and_count, max_retries=1)()[0])
    attempt(obs, "default_channel passive of a missing queue",
            lambda: c.default_channel.queue_declare(t.name("missing"), passive=True))
    attempt(obs, "default_channel next use",
            lambda: c.default_channel.queue_declare(qn, passive=True).message_count)
    attempt(obs, "ensured publish after that", lambda: publish({"x": 2}, routing_key=qn))
    obs.append(f"count: {wait_count(t.conn(), qn, 2)}")
    attempt(obs, "connection still connected", lambda: c.connected)
    return obs


def drain_events_and_heartbeats(t: Target) -> list:
    """Connection(heartbeat=2): drain_events with timeouts and heartbeat_check for 7 s of
    silence (more than two intervals) keep the connection; a message arriving mid-wait ends a
    drain_events(timeout=5) early."""
    obs = []
    c = t.conn(heartbeat=2)
    obs.append(f"negotiated heartbeat: {c.connection.heartbeat}")
    qn = t.q("q")
    got = []
    cons = Consumer(c.channel(), [Queue(qn, durable=False)], no_ack=True,
                    callbacks=[lambda body, m: got.append(body)])
    cons.consume()
    errors, timeouts = [], 0
    end = time.monotonic() + 7
    while time.monotonic() < end:
        try:
            c.drain_events(timeout=0.5)
        except socket.timeout:
            timeouts += 1
        except Exception as e:  # noqa: BLE001
            errors.append(err(e))
            break
        try:
            c.heartbeat_check(rate=2)
        except Exception as e:  # noqa: BLE001
            errors.append(err(e))
            break
    obs.append(f"7s idle: errors {errors}, some timeouts: {timeouts > 0}")

    def later():
        time.sleep(1)
        with Connection(t.url, connect_timeout=10) as pc:
            pc.Producer().publish("late", routing_key=qn)

    t.spawn(later)
    t0 = time.monotonic()
    try:
        c.drain_events(timeout=5)
        obs.append(f"drain_events(timeout=5) returned early: {time.monotonic() - t0 < 4}")
    except socket.timeout:
        obs.append("drain_events(timeout=5) timed out")
    obs.append(f"got: {got}")
    attempt(obs, "drain_events(timeout=0) with nothing pending",
            lambda: c.drain_events(timeout=0))
    attempt(obs, "still usable", lambda: c.default_channel.queue_declare(
        qn, passive=True).consumer_count)
    return obs


def purge_delete_counts(t: Target) -> list:
    """Queue.purge / queue_declare(passive) / delete(if_empty / if_unused) counts with confirmed
    publishes, as `celery purge` and monitoring code read them."""
    obs = []
    c = t.conn(transport_options={"confirm_publish": True})
    q = Queue(t.q("q"), durable=True)
    ch = c.channel()
    bq = q(ch)
    bq.declare()
    p = c.Producer()
    for i in range(7):
        p.publish(i, routing_key=q.name)
    obs.append(f"passive: {tuple(bq.queue_declare(passive=True))[1:]}")
    obs.append(f"purge: {bq.purge()}")
    obs.append(f"purge again: {bq.purge()}")
    for i in range(3):
        p.publish(i, routing_key=q.name)
    attempt(obs, "delete(if_empty=True)", lambda: q(c.channel()).delete(if_empty=True))
    obs.append(f"after refused delete: {passive(c, q.name)}")
    other = t.conn()
    oc = Consumer(other.channel(), [Queue(q.name, durable=True)], no_ack=False,
                  callbacks=[lambda b, m: None])
    oc.qos(prefetch_count=2)
    oc.consume()
    time.sleep(0.5)
    obs.append(f"with a consumer holding 2: {passive(c, q.name)}")
    attempt(obs, "delete(if_unused=True)", lambda: q(c.channel()).delete(if_unused=True))
    attempt(obs, "purge with unacked", lambda: q(c.channel()).purge())
    other.release()
    obs.append(f"after the consumer left: {wait_count(c, q.name, 2)}")
    attempt(obs, "delete", lambda: q(c.channel()).delete())
    attempt(obs, "delete again", lambda: q(c.channel()).delete())
    obs.append(f"after delete: {passive(c, q.name)}")
    return obs


def requeue_reject_recover(t: Target) -> list:
    """Message.requeue / reject / ack / ack_log_error, a second ack (MessageStateError),
    Consumer.recover(requeue=True), and ack_log_error on a closed channel."""
    obs = []
    c = t.conn()
    qn = t.q("q")
    q = Queue(qn, durable=False)
    pc = t.conn(transport_options={"confirm_publish": True})
    p = pc.Producer()
    q(pc.default_channel).declare()
    for b in "abcd":
        p.publish(b, routing_key=qn)
    seen = []
    held = {}
    ch = c.channel()
    cons = Consumer(ch, [q], no_ack=False,
                    callbacks=[lambda body, m: (seen.append((body, m.delivery_info["redelivered"])),
                                                held.__setitem__(body, m))])
    cons.qos(prefetch_count=10)
    cons.consume()
    drain_until(c, lambda: len(seen) >= 4)
    obs.append(f"first deliveries: {sorted(seen)}")
    held["a"].requeue()
    held["b"].reject()
    held["c"].ack()
    attempt(obs, "second ack of c", lambda: held["c"].ack())
    obs.append(f"c acknowledged: {held['c'].acknowledged}")
    drain_until(c, lambda: len(seen) >= 5)
    obs.append(f"after requeue a: {sorted(seen[4:])}")
    logged = []

    class Capture(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage()[:40])

    lg = logging.getLogger("kombu_edge.acks")
    lg.addHandler(Capture())
    lg.propagate = False
    held["a"].ack_log_error(lg, (Exception,))
    obs.append(f"ack_log_error of a: logged {len(logged)}")
    cons.recover(requeue=True)
    drain_until(c, lambda: len(seen) >= 6)
    obs.append(f"after recover: {sorted(seen[5:])}")
    stale = held["d"]
    ch.close()
    stale.ack_log_error(lg, (Exception,))
    obs.append(f"ack_log_error on a closed channel: logged {len(logged)}")
    obs.append(f"queue after channel close: {wait_count(pc, qn, 1)}")
    return obs


def prefetch_qos_runtime(t: Target) -> list:
    """Consumer.qos and kombu.common.QoS (as a Celery worker uses it: global=True, raised for
    ETA tasks and lowered again): the number of unacknowledged deliveries the consumer holds
    after each change."""
    obs = []
    c = t.conn()
    qn = t.q("q")
    pc = t.conn(transport_options={"confirm_publish": True})
    Queue(qn, durable=False)(pc.default_channel).declare()
    p = pc.Producer()
    for i in range(40):
        p.publish(i, routing_key=qn)
    ch = c.channel()
    held = []
    cons = Consumer(ch, [Queue(qn, durable=False)], no_ack=False,
                    callbacks=[lambda body, m: held.append(m)])
    qos = QoS(lambda prefetch_count: ch.basic_qos(0, prefetch_count, True), 4)
    qos.update()
    cons.consume()

    def settle(label):
        drain_until(c, lambda: False, timeout=1.0, linger=0)
        unacked = sum(1 for m in held if not m.acknowledged)
        obs.append(f"{label}: unacked {unacked}")

    settle("prefetch 4")
    for m in held[:2]:
        m.ack()
    settle("acked 2")
    qos.increment_eventually(6)
    qos.update()
    settle("raised to 10")
    qos.decrement_eventually(8)
    qos.update()
    settle("lowered to 2 while holding 10")
    for m in [m for m in held if not m.acknowledged][:5]:
        m.ack()
    settle("acked 5 of them")
    for m in [m for m in held if not m.acknowledged]:
        m.ack()
    settle("acked all")
    for m in [m for m in held if not m.acknowledged]:
        m.ack()
    settle("acked all again")
    obs.append(f"total delivered so far: {len(held)}")
    return obs


def prefetch_fill_from_short_lived_publishers(t: Target) -> list:
    """Messages published by short-lived connections (one message each, as web processes send
    tasks), then a consumer with prefetch 4: how many of the 4 ready messages it holds."""
    obs = []
    qn = t.q("q")
    c = t.conn()
    Queue(qn, durable=False)(c.default_channel).declare()
    for i in range(4):
        with Connection(t.url, connect_timeout=10,
                        transport_options={"confirm_publish": True}) as pc:
            pc.Producer().publish(f"m{i}", routing_key=qn)
    obs.append(f"ready: {passive(c, qn)}")
    held = []
    ch = c.channel()
    cons = Consumer(ch, [Queue(qn, durable=False)], no_ack=False,
                    callbacks=[lambda body, m: held.append(body)])
    cons.qos(prefetch_count=4)
    cons.consume()
    drain_until(c, lambda: len(held) >= 4, timeout=3, linger=0.5)
    # Each cluster fills only its share of the window (docs/routing.md, "Prefetch"): with the
    # four messages on one cluster, warren's consumer may hold 2 or 3 where RabbitMQ's holds 4.
    obs.append(f"[doc:prefetch] held with prefetch 4: {len(held)}")
    return obs


def confirm_publish_option(t: Target) -> list:
    """transport_options={'confirm_publish': True}: publishes are confirmed before publish()
    returns; a publish to a missing exchange raises at once; the producer is revived."""
    obs = []
    c = t.conn(transport_options={"confirm_publish": True})
    qn = t.q("q")
    Queue(qn, durable=False)(c.default_channel).declare()
    p = c.Producer(channel=c.channel())
    for i in range(5):
        p.publish(i, routing_key=qn)
    obs.append(f"count right after 5 confirmed publishes: {passive(c, qn)}")
    attempt(obs, "publish to a missing exchange",
            lambda: p.publish("x", exchange=t.name("missing"), routing_key="k"))
    attempt(obs, "publish(retry=True) to a missing exchange",
            lambda: p.publish("x", exchange=t.name("missing"), routing_key="k", retry=True,
                              retry_policy={"max_retries": 1, "interval_start": 0}))
    p.revive(c.channel())
    attempt(obs, "publish after revive", lambda: p.publish(5, routing_key=qn))
    obs.append(f"count: {passive(c, qn)}")
    # a publish its queue refuses (x-overflow reject-publish, x-max-length 0; a larger limit
    # applies per cluster through warren, docs/semantics.md): MessageNacked, and the channel
    # stays usable
    full = t.q("full")
    Queue(full, durable=False, max_length=0,
          queue_arguments={"x-overflow": "reject-publish"})(c.default_channel).declare()
    p2 = c.Producer(channel=c.channel())
    attempt(obs, "publish into a reject-publish queue of length 0",
            lambda: p2.publish("first", routing_key=full))
    attempt(obs, "again", lambda: p2.publish("second", routing_key=full))
    attempt(obs, "then to a normal queue", lambda: p2.publish("third", routing_key=qn))
    obs.append(f"counts: {passive(c, full)} {passive(c, qn)}")
    return obs


def message_properties_round_trip(t: Target) -> list:
    """Properties, a headers table of every AMQP type, serializers (json, pickle, raw bytes,
    text) and compressions, a 3 MiB body and an empty one, read back with Queue.get."""
    obs = []
    c = t.conn(transport_options={"confirm_publish": True})
    ex = Exchange(t.x("ex"), "direct", durable=False)
    qn = t.q("q")
    q = Queue(qn, ex, "rk", durable=False, max_priority=9)
    q(c.default_channel).declare()
    p = c.Producer(exchange=ex, routing_key="rk")
    headers = {
        "int": 7, "neg": -3, "big": 2 ** 40, "float": 1.5, "bool": True, "false": False,
        "none": None, "str": "héllo", "bytes": b"\x00\xff", "list": [1, "a", [2.5, None]],
        "dict": {"x": {"y": 1}}, "dec": decimal.Decimal("1.23"),
        "ts": datetime.datetime(2024, 1, 2, 3, 4, 5),
    }
    common = dict(priority=7, correlation_id="corr-1", reply_to="reply-q", message_id="mid-1",
                  type="kind", app_id="app", user_id="guest", expiration=60,
                  timestamp=1700000000)
    payloads = [
        ("json", {"a": [1, 2, {"b": "ü"}], "n": None}, {}),
        ("pickle", (1, {2, 3}, b"x"), {}),
        ("raw-bytes", b"\x00\x01binary", {"content_type": "application/octet-stream",
                                           "content_encoding": "binary"}),
        ("text", "plain text", {"content_type": "text/plain", "content_encoding": "utf-8"}),
        ("empty", b"", {"content_type": "application/octet-stream",
                        "content_encoding": "binary"}),
        ("big", os.urandom(3 * 1024 * 1024), {"content_type": "application/octet-stream",
                                              "content_encoding": "binary"}),
    ]
    for comp in ("gzip", "bzip2", "lzma"):
        payloads.append((f"compressed-{comp}", {"z": "x" * 1000}, {"compression": comp}))
    sent = {}
    for kind, body, extra in payloads:
        ser = {"json": "json", "pickle": "pickle"}.get(kind, "json" if "compressed" in kind
                                                         else None)
        p.publish(body, serializer=ser, headers=dict(headers, kind=kind), **common, **extra)
        sent[kind] = body
    obs.append(f"count: {passive(c, qn)}")
    rows = {}
    for _ in range(len(payloads)):
        m = q(c.default_channel).get(no_ack=True, accept=["json", "pickle", "text/plain",
                                                          "application/octet-stream"])
        if m is None:
            break
        rows[m.headers.get("kind")] = m
    for kind, _, _ in payloads:
        m = rows.get(kind)
        if m is None:
            obs.append(f"{kind}: missing")
            continue
        try:
            payload = m.decode()
        except Exception as e:  # noqa: BLE001
            payload = err(e)
        same = payload == sent[kind] or (isinstance(sent[kind], bytes) and
                                         payload == sent[kind])
        props = {k: v for k, v in sorted(m.properties.items()) if k != "application_headers"}
        raw = m.body if isinstance(m.body, bytes) else m.body.encode()
        stable = kind != "big" and not kind.startswith("compressed")
        digest = hashlib.sha1(raw).hexdigest()[:10] if stable else "-"
        obs.append(f"{kind}: payload equal {same}, body {len(raw)} bytes, sha1 {digest}")
        obs.append(f"  content {m.content_type} {m.content_encoding}, props {props}")
        obs.append(f"  delivery {t.norm(m.delivery_info['exchange'])} "
                   f"{m.delivery_info['routing_key']} {m.delivery_info['redelivered']}")
        if kind == "json":
            obs.append(f"  headers {typed({k: v for k, v in m.headers.items()})}")
            obs.append(f"  compression header: {m.headers.get('compression')}")
    # a Consumer accepting only json meets a pickle message and a broken json body:
    # ContentDisallowed / DecodeError through on_decode_error; the others flow
    for body, kw in (({"ok": 1}, {"serializer": "json"}), ({"bad": 1}, {"serializer": "pickle"}),
                     (b"{not json", {"content_type": "application/json",
                                     "content_encoding": "utf-8"}),
                     ({"ok": 2}, {"serializer": "json"})):
        p.publish(body, **kw)
    good, bad = [], []

    def on_decode_error(message, exc):
        bad.append(type(exc).__name__)
        message.reject()

    cons = Consumer(c.channel(), [q], accept=["json"],
                    callbacks=[lambda body, m: (good.append(body), m.ack())],
                    on_decode_error=on_decode_error)
    cons.consume()
    drain_until(c, lambda: len(good) + len(bad) >= 4)
    obs.append(f"accept=['json'] consumer: good {sorted(str(g) for g in good)}, "
               f"decode errors {sorted(bad)}")
    obs.append(f"left: {wait_count(c, qn, 0)}")
    return obs


def consumer_cancel_by_queue_and_add(t: Target) -> list:
    """What Celery's add_consumer / cancel_consumer do: Consumer.cancel_by_queue, add_queue +
    consume, consuming_from, and a server-side cancel when another client deletes a queue."""
    obs = []
    c = t.conn()
    names = [t.q(f"q{i}") for i in range(4)]
    got = []
    cons = Consumer(c.channel(), [Queue(n, durable=False) for n in names[:3]], no_ack=True,
                    callbacks=[lambda body, m: got.append(body)])
    cons.consume()
    obs.append(f"consuming_from q1: {cons.consuming_from(names[1])}")
    cons.cancel_by_queue(names[1])
    obs.append(f"after cancel_by_queue consuming_from q1: {cons.consuming_from(names[1])}")
    cons.add_queue(Queue(names[3], durable=False))
    cons.consume()
    obs.append(f"consuming_from q3: {cons.consuming_from(names[3])}")
    pc = t.conn(transport_options={"confirm_publish": True})
    p = pc.Producer()
    for n in names:
        p.publish(t.norm(n), routing_key=n)
    drain_until(c, lambda: len(got) >= 3, linger=0.5)
    obs.append(f"got: {sorted(got)}")
    obs.append(f"q1 holds: {passive(pc, names[1])}")
    # the broker cancels the consumer of q0 when another client deletes q0
    cancelled = []
    try:
        c.default_channel  # noqa: B018
        pc.default_channel.queue_delete(names[0])
        drain_until(c, lambda: False, timeout=1.0, linger=0)
    except amqp.exceptions.ConsumerCancelled as e:
        cancelled.append(err(e))
    except Exception as e:  # noqa: BLE001
        cancelled.append(f"other {err(e)}")
    obs.append(f"queue deleted under the consumer: {cancelled}")
    attempt(obs, "publish to q2 then drain", lambda: (p.publish("again", routing_key=names[2]),
                                                      drain_until(c, lambda: "again" in got))[1])
    return obs


def rpc_reply_queues(t: Target) -> list:
    """Request/reply with kombu: a server consuming a request queue replies with send_reply to
    (a) an exclusive server-named queue, (b) a queue named by a bare UUID (Celery rpc://
    style), (c) amq.rabbitmq.reply-to (direct reply-to)."""
    obs = []
    sc = t.conn()
    reqq = Queue(t.q("requests"), durable=False)
    served = []

    def serve():
        ch = sc.channel()
        prod = Producer(ch)

        def on_request(body, message):
            served.append(body["n"])
            send_reply(Exchange("", type="direct"), message, {"n": body["n"], "r": body["n"] * 2},
                       producer=prod)
            message.ack()

        Consumer(ch, [reqq], callbacks=[on_request], accept=["json"]).consume()
        while not t.stop.is_set():
            try:
                sc.drain_events(timeout=0.1)
            except socket.timeout:
                pass

    cc = t.conn()
    reqq(cc.default_channel).declare()
    t.spawn(serve)
    uid_name = str(uuid.uuid4())
    t.queues.append(uid_name)
    kinds = {
        "server-named": Queue("", exclusive=True, auto_delete=True),
        "uuid": Queue(uid_name, durable=False, auto_delete=True, expires=60),
        "direct-reply-to": Queue("amq.rabbitmq.reply-to", no_declare=True),
    }
    for kind, rq in kinds.items():
        ch = cc.channel()
        replies = []
        cons = Consumer(ch, [rq], no_ack=True, accept=["json"],
                        callbacks=[lambda body, m: replies.append(
                            (body["n"], body["r"], m.properties.get("correlation_id")))])
        cons.consume()
        reply_to = rq.name
        prod = Producer(ch)
        for n in range(5):
            prod.publish({"n": n}, routing_key=reqq.name, reply_to=reply_to,
                         correlation_id=f"c{n}", serializer="json")
        drain_until(cc, lambda: len(replies) >= 5, timeout=8)
        obs.append(f"{kind}: {sorted(replies)}")
        cons.cancel()
        ch.close()
    obs.append(f"requests served: {len(served)}")
    return obs


def exclusive_and_auto_delete_queues(t: Target) -> list:
    """kombu Queue(exclusive=True) seen from another connection (405 for declare, passive,
    consume, purge), and an auto_delete queue going with its last consumer."""
    obs = []
    a = t.conn()
    b = t.conn()
    ex = Queue(t.q("excl"), exclusive=True)
    ex(a.default_channel).declare()
    attempt(obs, "other: declare", lambda: ex(b.channel()).declare())
    attempt(obs, "other: passive", lambda: ex(b.channel()).queue_declare(passive=True))
    attempt(obs, "other: consume", lambda: Consumer(b.channel(), [ex]).consume())
    attempt(obs, "other: purge", lambda: ex(b.channel()).purge())
    attempt(obs, "owner: publish+get", lambda: (a.Producer().publish("x", routing_key=ex.name),
                                                ex(a.default_channel).get(no_ack=True)
                                                .payload)[1])
    a.release()
    obs.append(f"after the owner closed: {wait_gone(b, ex.name)}")
    ad = Queue(t.q("ad"), auto_delete=True, durable=False)
    ch = b.channel()
    cons = Consumer(ch, [ad], callbacks=[lambda body, m: m.ack()])
    cons.consume()
    obs.append(f"auto_delete while consumed: {passive(b, ad.name)}")
    cons.cancel()
    obs.append(f"auto_delete after cancel: {wait_gone(b, ad.name)}")
    return obs


def connection_as_kombu_sees_it(t: Target) -> list:
    """What kombu reads from the server at connect (product, version major.minor, capabilities,
    qos_semantics_matches_spec, which decides Celery's global qos; frame_max, channel_max,
    heartbeat), and what it raises for an unknown vhost and for wrong credentials (warren
    refuses those later in the handshake, docs/semantics.md, but py-amqp reports the same 403),
    also through ensure_connection(max_retries=1)."""
    obs = []
    c = t.conn()
    sp = c.connection.server_properties
    obs.append(f"product: {sp.get('product')}")
    obs.append(f"version: {'.'.join(str(sp.get('version', '')).split('.')[:2])}")
    obs.append(f"capabilities: {sorted(k for k, v in sp.get('capabilities', {}).items() if v)}")
    obs.append(f"qos_semantics_matches_spec: {c.qos_semantics_matches_spec}")
    obs.append(f"frame_max: {c.connection.frame_max}, channel_max: {c.connection.channel_max}")
    obs.append(f"heartbeat (asked None): {c.connection.heartbeat}")
    base = t.url.split("@", 1)[1].split("/", 1)[0]
    for label, url in (("unknown vhost", f"amqp://guest:guest@{base}/{t.name('vhost')}"),
                       ("wrong password", f"amqp://guest:wrong@{base}//")):
        bad = Connection(url, connect_timeout=10)
        attempt(obs, f"{label}: connect", lambda: bad.connect() and None)
        attempt(obs, f"{label}: ensure_connection(max_retries=1)",
                lambda: bad.ensure_connection(max_retries=1, interval_start=0) and None)
        obs.append(f"{label}: connected {bad.connected}")
        bad.release()
    return obs


def many_channels_and_connection_pool(t: Target) -> list:
    """kombu.pools: producers acquired from a pool publish from several threads, each on its own
    connection; every message arrives once."""
    obs = []
    from kombu import pools  # noqa: PLC0415
    qn = t.q("q")
    c = t.conn()
    Queue(qn, durable=False)(c.default_channel).declare()
    conn = Connection(t.url, connect_timeout=10, transport_options={"confirm_publish": True})
    t.conns.append(conn)
    errors = []

    def work(k):
        try:
            for i in range(25):
                with pools.producers[conn].acquire(block=True, timeout=10) as prod:
                    prod.publish(f"{k}-{i}", routing_key=qn, retry=True)
        except Exception as e:  # noqa: BLE001
            errors.append(err(e))

    ths = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=30)
    obs.append(f"errors: {errors}, threads done: {not any(th.is_alive() for th in ths)}")
    obs.append(f"count: {wait_count(c, qn, 100)}")
    seen = set()
    dup = 0
    while True:
        m = Queue(qn)(c.default_channel).get(no_ack=True)
        if m is None:
            break
        dup += m.payload in seen
        seen.add(m.payload)
    obs.append(f"distinct: {len(seen)}, duplicates: {dup}")
    pools.reset()
    return obs


# ---------------------------------------------------------------------------------------------
# Celery: the app the workers run, and scenarios using one worker per URL.


def make_celery(broker: str, run: str):
    """The Celery app of the worker (and of the driver, which sends to it) for one side."""
    from celery import Celery  # noqa: PLC0415

    p = f"kedge.{run}"
    app = Celery(f"kedge{run}")
    app.conf.update(
        broker_url=broker,
        result_backend="rpc://",
        result_expires=300,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        broker_heartbeat=10,
        task_default_queue=f"{p}.main",
        task_queues=[Queue(f"{p}.main"), Queue(f"{p}.prio", max_priority=9)],
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )

    @app.task(name="kedge.add")
    def add(x, y):
        return x + y

    @app.task(name="kedge.boom")
    def boom():
        raise ValueError("boom")

    @app.task(name="kedge.retry_n", bind=True, max_retries=5)
    def retry_n(self, n):
        if self.request.retries < n:
            raise self.retry(countdown=1)
        return self.request.retries

    @app.task(name="kedge.retry_max", bind=True, max_retries=1)
    def retry_max(self):
        raise self.retry(countdown=0.5)

    @app.task(name="kedge.props", bind=True)
    def props(self):
        di = self.request.delivery_info or {}
        return {"priority": di.get("priority"), "redelivered": di.get("redelivered"),
                "routing_key": di.get("routing_key"), "exchange": di.get("exchange"),
                "correlation_id_is_task_id": self.request.correlation_id == self.request.id}

    @app.task(name="kedge.stamp")
    def stamp(secs):
        t0 = time.time()
        time.sleep(secs)
        return t0

    return app


if os.environ.get("KEDGE_BROKER"):  # imported by a worker started below
    celery_app = make_celery(os.environ["KEDGE_BROKER"], os.environ["KEDGE_RUN"])


class Worker:
    """One Celery worker (prefork, 4 processes) per side, started at the first Celery scenario
    and stopped at the end of the run."""

    all: dict[str, "Worker"] = {}

    def __init__(self, url: str, side: str):
        self.url = url
        self.run = f"{RUN}{side}"
        self.node = f"kedge-{self.run}@edge"
        self.app = make_celery(url, self.run)
        self.log = Path(tempfile.gettempdir()) / f"kedge-{self.run}.log"
        self.extra_queues: list[str] = []
        env = dict(os.environ, KEDGE_BROKER=url, KEDGE_RUN=self.run, PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join(x for x in (str(HERE),
                                                          os.environ.get("PYTHONPATH")) if x))
        cmd = [sys.executable, "-m", "celery", "-A", "kombu_edge:celery_app", "worker", "-P",
               "prefork", "-c", "4", "-n", self.node, "-Q",
               f"kedge.{self.run}.main,kedge.{self.run}.prio", "--without-gossip",
               "--without-mingle", "-E", "--loglevel", "INFO"]
        self.proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.ready = self.wait_ping(60)

    @classmethod
    def get(cls, t: Target) -> "Worker":
        w = cls.all.get(t.url)
        if w is None:
            w = cls.all[t.url] = Worker(t.url, t.side)
        if not w.ready:
            raise RuntimeError(f"worker not answering ping (log {w.log})")
        return w

    def wait_ping(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                r = self.app.control.ping(destination=[self.node], timeout=1.0)
            except Exception:  # noqa: BLE001
                time.sleep(0.5)
                continue
            if any(self.node in d for d in r):
                return True
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            with Connection(self.url, connect_timeout=10) as c:
                for qn in [f"kedge.{self.run}.main", f"kedge.{self.run}.prio",
                           *self.extra_queues]:
                    try:
                        ch = c.channel()
                        ch.queue_delete(qn)
                        ch.close()
                    except Exception:  # noqa: BLE001
                        pass
                for xn in [f"kedge.{self.run}.tx", f"kedge.{self.run}.main"]:
                    try:
                        ch = c.channel()
                        ch.exchange_delete(xn)
                        ch.close()
                    except Exception:  # noqa: BLE001
                        pass
        except Exception:  # noqa: BLE001
            pass
        try:
            self.app.close()
        except Exception:  # noqa: BLE001
            pass

    @classmethod
    def stop_all(cls) -> None:
        for w in cls.all.values():
            w.stop()
        cls.all.clear()


def celery_many_results(t: Target) -> list:
    """60 tasks over two queues, results fetched with result.get(timeout) in reverse order
    (rpc:// buffers the others), a ResultSet, and a failing task's result."""
    obs = []
    w = Worker.get(t)
    app = w.app
    rs = [app.send_task("kedge.add", (i, i),
                        queue=f"kedge.{w.run}.{'prio' if i % 3 == 0 else 'main'}")
          for i in range(60)]
    vals = [r.get(timeout=30) for r in reversed(rs)]
    obs.append(f"reverse get: {sorted(vals) == [2 * i for i in range(60)]}")
    obs.append(f"states: {sorted({r.state for r in rs})}")
    from celery.result import ResultSet  # noqa: PLC0415
    rset = ResultSet([app.send_task("kedge.add", (i, 1)) for i in range(20)])
    obs.append(f"ResultSet.get: {sorted(rset.get(timeout=30))}")
    obs.append(f"ResultSet.completed_count: {rset.completed_count()}")
    b = app.send_task("kedge.boom")
    try:
        b.get(timeout=30)
        obs.append("boom: no exception")
    except Exception as e:  # noqa: BLE001
        obs.append(f"boom: {type(e).__name__} {e}, state {b.state}")
    obs.append(f"boom propagate=False: {type(b.get(timeout=30, propagate=False)).__name__}")
    return obs


def celery_retry_countdown(t: Target) -> list:
    """task.retry(countdown=1) twice then success; max_retries exceeded."""
    obs = []
    w = Worker.get(t)
    r = w.app.send_task("kedge.retry_n", (2,))
    obs.append(f"retry_n(2): {r.get(timeout=30)}, state {r.state}")
    m = w.app.send_task("kedge.retry_max")
    try:
        m.get(timeout=30)
        obs.append("retry_max: no exception")
    except Exception as e:  # noqa: BLE001
        obs.append(f"retry_max: {type(e).__name__}, state {m.state}")
    return obs


def celery_priority_and_delivery_info(t: Target) -> list:
    """apply_async(priority=...) on an x-max-priority queue and on a plain one: what the task
    sees in its delivery_info."""
    obs = []
    w = Worker.get(t)
    rows = []
    for queue, prio in (("prio", 7), ("prio", 0), ("main", 5)):
        r = w.app.send_task("kedge.props", queue=f"kedge.{w.run}.{queue}", priority=prio)
        d = r.get(timeout=30)
        d["routing_key"] = d["routing_key"].replace(w.run, "RUN")
        rows.append((queue, prio, sorted(d.items())))
    for row in rows:
        obs.append(f"{row}")
    return obs


def celery_remote_control(t: Target) -> list:
    """app.control: ping with a missing node among the destinations, rate_limit, time_limit,
    add_consumer of a queue on a topic exchange then a task routed through it, cancel_consumer,
    active_queues."""
    obs = []
    w = Worker.get(t)
    app, node = w.app, w.node
    ctl = app.control
    ghost = f"kedge-{w.run}-ghost@edge"

    def n(v):
        return str(v).replace(w.run, "RUN")

    pongs = ctl.ping(destination=[node, ghost], timeout=2)
    obs.append(n(f"ping: {sorted(str(d) for d in pongs)}"))
    rep = ctl.rate_limit("kedge.add", "100/s", destination=[node], reply=True, timeout=5)
    obs.append(n(f"rate_limit: {rep}"))
    rep = ctl.time_limit("kedge.add", soft=30, hard=60, destination=[node], reply=True,
                         timeout=5)
    obs.append(n(f"time_limit: {rep}"))
    qn, xn = f"kedge.{w.run}.topicq", f"kedge.{w.run}.tx"
    w.extra_queues.append(qn)
    rep = ctl.add_consumer(qn, exchange=xn, exchange_type="topic", routing_key="t.*",
                           destination=[node], reply=True, timeout=5)
    obs.append(n(f"add_consumer: {rep}"))
    # the worker replies before it has declared, bound and consumed the queue: wait until
    # active_queues lists it (a task sent earlier may find no binding, directly as through
    # warren)
    end = time.monotonic() + 10
    while True:
        aq = (ctl.inspect(destination=[node], timeout=3).active_queues() or {}).get(node) or []
        if any(q["name"] == qn for q in aq) or time.monotonic() > end:
            break
        time.sleep(0.2)
    obs.append(n("active_queues: " + str(sorted(
        (q["name"], q["exchange"]["name"], q["exchange"]["type"], q["routing_key"])
        for q in aq))))
    r = app.send_task("kedge.add", (2, 3), exchange=xn, routing_key="t.x")
    try:
        obs.append(f"task through the topic exchange: {r.get(timeout=20)}")
    except Exception as e:  # noqa: BLE001
        obs.append(f"task through the topic exchange: {type(e).__name__}")
    rep = ctl.cancel_consumer(qn, destination=[node], reply=True, timeout=5)
    obs.append(n(f"cancel_consumer: {rep}"))
    r = app.send_task("kedge.add", (3, 3), exchange=xn, routing_key="t.y")
    time.sleep(2)
    obs.append(f"task after cancel_consumer waits: {r.state}")
    with app.connection_for_write() as c:
        obs.append(f"  topic queue holds: {passive(c, qn)}")
        m = c.default_channel.basic_get(qn, no_ack=True)
        obs.append(f"  it is that task: {m is not None and m.headers.get('id') == r.id}")
        c.default_channel.queue_purge(qn)
    return obs


def celery_revoke_countdown(t: Target) -> list:
    """revoke(terminate=False) of a task the worker holds with a countdown: never runs, state
    REVOKED, listed by inspect revoked; an unrevoked sibling runs."""
    obs = []
    w = Worker.get(t)
    app = w.app
    r = app.send_task("kedge.add", (1, 1), countdown=3)
    ok = app.send_task("kedge.add", (2, 2), countdown=3)
    insp = app.control.inspect(destination=[w.node], timeout=3)
    end = time.monotonic() + 10
    sched = []
    while time.monotonic() < end:
        sched = (insp.scheduled() or {}).get(w.node) or []
        if len(sched) >= 2:
            break
        time.sleep(0.2)
    obs.append(f"scheduled before revoke: {len(sched)}")
    app.control.revoke(r.id)
    try:
        r.get(timeout=15)
        obs.append("revoked task: ran")
    except Exception as e:  # noqa: BLE001
        obs.append(f"revoked task: {type(e).__name__}, state {r.state}")
    obs.append(f"sibling: {ok.get(timeout=15)}")
    rev = (insp.revoked() or {}).get(w.node) or []
    obs.append(f"inspect revoked lists it: {r.id in rev}")
    return obs


def celery_task_events(t: Target) -> list:
    """An EventReceiver (celeryev) sees task-sent (from the client), task-received,
    task-started and task-succeeded for each of our tasks."""
    obs = []
    w = Worker.get(t)
    app = w.app
    events = []
    with app.connection_for_write() as conn:
        recv = app.events.Receiver(conn, handlers={"*": events.append})
        ch = conn.channel()
        cons = Consumer(ch, [recv.queue], callbacks=[recv._receive], no_ack=True,
                        accept=recv.accept)
        cons.consume()
        rs = [app.send_task("kedge.add", (i, 0)) for i in range(3)]
        [r.get(timeout=20) for r in rs]
        ids = {r.id for r in rs}

        def enough():
            return sum(1 for e in events if e.get("uuid") in ids) >= 12

        drain_until(conn, enough, timeout=10, linger=0.5)
        per = {}
        for e in events:
            if e.get("uuid") in ids:
                per.setdefault(e["uuid"], []).append(e["type"])
        obs.append(f"per task: {sorted(str(sorted(v)) for v in per.values())}")
        obs.append("hostnames of the worker's task events: " + str(sorted(
            {e.get("hostname", "").replace(w.run, "RUN") for e in events
             if e.get("uuid") in ids and e["type"] != "task-sent"})))
        cons.cancel()
        ch.close()
    return obs


def celery_purge(t: Target) -> list:
    """app.control.purge() of an app whose queue no worker consumes: the count it reports, and
    nothing left."""
    obs = []
    from celery import Celery  # noqa: PLC0415
    qn = t.q("purgeq")
    t.exchanges.append(qn)  # Celery's default exchange is named after the default queue
    app = Celery(f"kedge-purge-{RUN}{t.side}")
    app.conf.update(broker_url=t.url, task_default_queue=qn, task_queues=[Queue(qn)],
                    broker_transport_options={"confirm_publish": True})
    try:
        for i in range(6):
            app.send_task("kedge.add", (i, i))
        obs.append(f"purge: {app.control.purge()}")
        obs.append(f"purge again: {app.control.purge()}")
        with app.connection_for_write() as c:
            obs.append(f"left: {passive(c, qn)}")
    finally:
        app.close()
    return obs


def celery_concurrency_with_tasks_from_short_connections(t: Target) -> list:
    """A worker with 4 processes and prefetch 4 (multiplier 1, acks_late) gets 4 two-second
    tasks, each sent by a short-lived connection (a web process sending one task): how many
    start together."""
    obs = []
    w = Worker.get(t)
    rs = []
    for i in range(4):
        with Connection(t.url, connect_timeout=10,
                        transport_options={"confirm_publish": True}) as c:
            rs.append(w.app.send_task("kedge.stamp", (2,), connection=c))
    starts = sorted(r.get(timeout=30) for r in rs)
    together = sum(1 for s in starts if s - starts[0] < 1.0)
    # The worker's prefetch of 4 is filled per cluster (docs/routing.md, "Prefetch"): with the
    # tasks unevenly spread, fewer than 4 may start at once through warren.
    obs.append(f"[doc:prefetch] started within 1s of the first: {together} of {len(starts)}")
    obs.append(f"all ran: {len(starts)}")
    return obs


def celery_prefetch_after_eta_tasks(t: Target) -> list:
    """kombu's QoS in a Celery worker: ETA (countdown) tasks raise the prefetch while they
    wait and lower it when they run. Afterwards, 12 three-second tasks: with 4 processes and
    prefetch 4 (multiplier 1, acks_late), 4 run and none is reserved behind them."""
    obs = []
    w = Worker.get(t)
    app = w.app
    eta = [app.send_task("kedge.stamp", (0.5,), countdown=2) for _ in range(6)]
    [r.get(timeout=30) for r in eta]
    time.sleep(1)
    stats = (app.control.inspect(destination=[w.node], timeout=3).stats() or {}).get(w.node)
    obs.append(f"prefetch_count after the ETA tasks: {stats and stats.get('prefetch_count')}")
    long = [app.send_task("kedge.stamp", (3,)) for _ in range(12)]
    time.sleep(1.5)
    insp = app.control.inspect(destination=[w.node], timeout=3)
    active = len((insp.active() or {}).get(w.node) or [])
    reserved = len((insp.reserved() or {}).get(w.node) or [])
    obs.append(f"while busy: active {active}, reserved {reserved}")
    [r.get(timeout=60) for r in long]
    return obs


# ---------------------------------------------------------------------------------------------


SCENARIOS = [
    (simple_queue, BUDGET),
    (simple_buffer, BUDGET),
    (publish_declare_and_cache, BUDGET),
    (maybe_declare_across_channel_errors, BUDGET),
    (mandatory_on_return, BUDGET),
    (consumer_over_exchange_types, BUDGET),
    (bindings_unbind_and_e2e, BUDGET),
    (queue_arguments, BUDGET),
    (consumer_arguments_priority, BUDGET),
    (exchange_options, BUDGET),
    (broadcast_queues, BUDGET),
    (pidbox_mailbox_control_names, BUDGET),
    (pidbox_mailbox_own_namespace, BUDGET),
    (ensure_and_autoretry, BUDGET),
    (drain_events_and_heartbeats, BUDGET),
    (purge_delete_counts, BUDGET),
    (requeue_reject_recover, BUDGET),
    (prefetch_qos_runtime, BUDGET),
    (prefetch_fill_from_short_lived_publishers, BUDGET),
    (confirm_publish_option, BUDGET),
    (message_properties_round_trip, BUDGET),
    (consumer_cancel_by_queue_and_add, BUDGET),
    (rpc_reply_queues, BUDGET),
    (exclusive_and_auto_delete_queues, BUDGET),
    (connection_as_kombu_sees_it, BUDGET),
    (many_channels_and_connection_pool, BUDGET),
    (celery_many_results, 150),
    (celery_retry_countdown, 90),
    (celery_priority_and_delivery_info, 90),
    (celery_remote_control, 120),
    (celery_revoke_countdown, 90),
    (celery_task_events, 90),
    (celery_purge, 90),
    (celery_concurrency_with_tasks_from_short_connections, 90),
    (celery_prefetch_after_eta_tasks, 120),
]


def run(url: str, side: str, fn, budget: float) -> list:
    t = Target(url, side)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        obs = fn(t)
    except ScenarioTimeout:
        obs = [f"scenario timed out after {budget}s"]
    except Exception as e:  # noqa: BLE001 - the scenario broke: record it
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{f.name}:{f.lineno}" for f in reversed(tb)
                      if f.filename == __file__), "?")
        obs = [f"scenario raised {type(e).__name__}: {e} (at {where})"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    obs = [t.norm(str(o)) for o in obs]
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        t.cleanup()
    except ScenarioTimeout:
        obs.append("cleanup timed out after 30s")
    except Exception:  # noqa: BLE001
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return obs


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    direct, proxy, *only = argv
    names = {fn.__name__ for fn, _ in SCENARIOS}
    unknown = [o for o in only if o not in names]
    if unknown:
        print(f"unknown scenarios: {unknown}; known: {sorted(names)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.CRITICAL)
    fails = 0
    try:
        for fn, budget in SCENARIOS:
            if only and fn.__name__ not in only:
                continue
            want = run(direct, "d", fn, budget)
            got = run(proxy, "w", fn, budget)
            broken = bool(want) and want[0].startswith(("scenario raised", "scenario timed"))
            # Lines tagged [doc:...] are differences docs/semantics.md lists: shown, not compared.
            compared = [[o for o in obs if not o.startswith("[doc:")] for obs in (want, got)]
            same = compared[0] == compared[1] and not broken
            print(f"[{'PASS' if same else 'FAIL'}] {fn.__name__}", flush=True)
            if same and os.environ.get("KEDGE_SHOW"):
                for o in want:
                    print(f"     {o}")
            if not same:
                fails += 1
                for i in range(max(len(want), len(got))):
                    w = want[i] if i < len(want) else "-"
                    g = got[i] if i < len(got) else "-"
                    mark = " " if w == g else "!"
                    print(f"   {mark} rabbitmq: {w}\n   {mark} warren:   {g}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 120)
        try:
            Worker.stop_all()
        except ScenarioTimeout:
            print("stopping the Celery workers timed out", file=sys.stderr)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"kombu edge cases: {fails} differ" if fails else "kombu edge cases: all the same")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
