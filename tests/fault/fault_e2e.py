#!/usr/bin/env python3
"""Fault tests of warren against real RabbitMQ clusters, with a Jepsen-style ledger.

    python tests/fault/fault_e2e.py --warren target/debug/warren [--quick] [--messages N]
                                    [--scenarios a,b,...] [--keep]

Starts its own RabbitMQ nodes (scripts/rabbit.sh, state dir /tmp/warren-fault-<random> unless
--rabbit-dir is given): shard-a and shard-b are two-node ha-all clusters, control is a single
node (it carries no traffic in the other scenarios; one node saves ~150 MB and ~10 s), and
control-ha, a two-node control cluster, when celery-kill-node is selected. Then starts
the proxy (a copy of --warren) with upstream_heartbeat_secs = 2 and runs the scenarios:

  kill-node        kill -9 shard-a-1, restart it, wait for the mirrors to resync, kill -9
                   shard-a-2, restart it - while N persistent messages are published (half the
                   producers in confirm mode) and consumed with manual acks through the proxy
  kill-cluster     both nodes of shard-b killed for 30 s, then restarted, under the same workload
  partial-publish  raw-socket clients die in the middle of a message body: nothing reaches a
                   cluster
  memory-alarm     memory alarm on shard-a: clients are told connection.blocked, publishes move
                   to shard-b, the proxy's RSS stays bounded, everything is delivered afterwards
  sigstop          SIGSTOP shard-a-1: heartbeat detection, failover to shard-a-2, no loss
  limits           a second proxy with small [limits]: connection / per-IP / channel / frame /
                   message-size refusals with the right AMQP codes, and held-publish
                   back-pressure against a node that stops confirming

  kill-node-one-shard  kill-node against a proxy whose only shard cluster is shard-a: the cluster
                   stays up on shard-a-2, so clients must see nothing
  kill-node-tx     shard-a-1 killed between a transaction's publish and its tx.commit: the commit
                   must not succeed without that publish
  celery-kill-node Celery through a proxy whose control cluster is control-ha (a two-node cluster
                   started for this scenario only): prefork workers, acks_late, confirm_publish,
                   rpc:// results; shard-a-1 and control-ha-1 (the nodes under the links) killed
                   while tasks flow, then restarted. Every task must run, every result must reach
                   the producer, and delay()/get() must raise nothing. The same workload then runs
                   directly against shard-b (a kombu failover URL of its two nodes, shard-b-1
                   killed) as the reference; both ledgers are printed side by side
(All nine run by default, in this order; kill-node-one-shard and kill-node-tx reproduced
weaknesses 1 and 2 of docs/reliability.md and failed until the proxy fixed them.)

Workloads: P producers with py-amqp confirm_publish=True (one publish in flight), P without
confirms, and one pipelined confirm producer (up to --window publishes in flight, acks handled as
they come, `multiple` included), all persistent (delivery_mode 2) to one durable sharded queue;
C consumers with manual acks (basic.qos prefetch --prefetch).

Every message has a unique id. Producers record what they attempted, what their publish call
returned for (non-confirm producers) and what was confirmed (confirm producers); consumers record
every delivery. At the end of a workload:
  lost       = (confirmed + returned by a non-confirm producer) - received
  duplicates = deliveries beyond the first of an id, classified as "redelivery" (a copy came
               with redelivered=true: the broker requeued an unacked delivery after a node or link
               died) or "republish" (two fresh copies: the proxy published a message again after
               its link died before the confirm)
  unexpected = received but never attempted
Scenarios that kill or stop a shard-a node first check that shard-a is one cluster (both nodes
running, no partition; healed by restarting shard-a-1's app if not), so that a split left by an
earlier scenario does not read as a proxy failure.
Exits 0 only when every check of every selected scenario passed. --summary-file writes the result
table and a failure report (ledger, failed checks, client errors). See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field

import amqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# warren_admin (admin endpoint, /metrics) is shared with tests/e2e/reload_e2e.py.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e"))
import rawamqp as raw  # noqa: E402
import warren_admin  # noqa: E402
from warren_admin import eventually, free_port, strip_ansi  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RABBIT_SH = os.path.join(REPO, "scripts", "rabbit.sh")
ALL_SCENARIOS = ["kill-node", "kill-cluster", "partial-publish", "memory-alarm", "sigstop", "limits",
                 "kill-node-one-shard", "kill-node-tx", "celery-kill-node"]
# The two-node control cluster of celery-kill-node (started only when that scenario is selected;
# the other scenarios send no control traffic and use the single-node `control`).
HA_CONTROL = "control-ha"
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[fault {time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def rand_id(n: int = 6) -> str:
    return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def wait_for(what: str, check, timeout: float, interval: float = 0.25) -> bool:
    """`eventually`, saying in the log what it gave up waiting for."""
    if eventually(check, timeout, interval):
        return True
    log(f"timed out after {timeout:.0f}s waiting for: {what}")
    return False


# =============================================================================================
# RabbitMQ nodes (scripts/rabbit.sh)


class Rabbit:
    def __init__(self, state_dir: str, net_ticktime: int):
        self.env = dict(os.environ, WARREN_RABBIT_DIR=state_dir)
        if net_ticktime:
            self.env["WARREN_RABBIT_ERL_ARGS"] = f"-kernel net_ticktime {net_ticktime}"
        self.state_dir = state_dir
        self.clusters: dict[str, list[str]] = {}

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        p = subprocess.run([RABBIT_SH, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"rabbit.sh {' '.join(args)} failed ({p.returncode}): {p.stderr[-2000:]}")
        return p.stdout

    def up_all(self, ha_control: bool = False) -> None:
        """shard-a, shard-b (two nodes each) and control (one node); with `ha_control` also
        control-ha, a two-node control cluster for celery-kill-node (started in parallel)."""
        specs = [("shard-a", ["up", "shard-a", "auto", "auto"]), ("shard-b", ["up", "shard-b", "auto", "auto"]),
                 ("control", ["up-single", "control", "auto"])]
        if ha_control:
            specs.append((HA_CONTROL, ["up", HA_CONTROL, "auto", "auto"]))
        results: dict[str, str] = {}
        errors: list[str] = []

        def one(name: str, args: list[str]) -> None:
            try:
                results[name] = self.run(*args, timeout=400)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name}: {e}")

        threads = [threading.Thread(target=one, args=s) for s in specs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError("; ".join(errors))
        for name, out in results.items():
            parts = out.strip().split()
            self.clusters[name] = parts[1:]

    def nodes(self, cluster: str) -> list[str]:
        return self.clusters[cluster]

    def node_addr(self, node: str) -> str:
        cluster, idx = node.rsplit("-", 1)
        return self.clusters[cluster][int(idx) - 1]

    def ports_free(self, node: str) -> bool:
        """What rabbit.sh checks before starting a node: nothing listens on its AMQP and
        distribution ports (a bind with SO_REUSEADDR, as RabbitMQ's own listeners do; sockets in
        TIME_WAIT left by the killed node do not count)."""
        port = int(self.node_addr(node).rsplit(":", 1)[1])
        for p in (port, port + 20000):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
            finally:
                s.close()
        return True

    def kill(self, node: str) -> None:
        self.run("kill-node", node, timeout=60)

    def start(self, node: str) -> None:
        # rabbit.sh refuses to start a node while something listens on its ports (TIME_WAIT
        # sockets of the killed node do not count any more): retry for a while in case the old VM
        # is still letting go of its listeners.
        end = time.monotonic() + 90
        while True:
            try:
                self.run("start-node", node, timeout=400)
                return
            except RuntimeError as e:
                if "in use" not in str(e) or time.monotonic() > end:
                    raise
                log(f"start-node {node}: a port is still in use; retrying in 5s")
                time.sleep(5)

    def pause(self, node: str) -> None:
        self.run("pause-node", node, timeout=30)

    def resume(self, node: str) -> None:
        self.run("resume-node", node, timeout=30)

    def ctl(self, node: str, *args: str, timeout: float = 120, check: bool = True) -> str:
        return self.run("ctl", node, *args, timeout=timeout, check=check)

    def cluster_status(self, node: str) -> dict:
        return json.loads(self.ctl(node, "cluster_status", "--formatter", "json", timeout=60))

    def mirrors_synced(self, node: str, queue: str) -> bool:
        out = self.ctl(node, "list_queues", "-q", "name", "slave_pids", "synchronised_slave_pids",
                       "--formatter", "json", timeout=60)
        for q in json.loads(out):
            if q["name"] == queue:
                slaves = q.get("slave_pids") or []
                synced = q.get("synchronised_slave_pids") or []
                return len(slaves) >= 1 and len(synced) >= len(slaves)
        return False

    def down_all(self) -> None:
        try:
            self.run("down-all", timeout=180, check=False)
        except Exception as e:  # noqa: BLE001
            log(f"down-all failed: {e}")


def direct_depth(nodes: list[str], queue: str) -> int | None:
    """Ready messages of `queue` asked straight to the cluster (first node that answers)."""
    for n in nodes:
        host, port = n.rsplit(":", 1)
        try:
            c = amqp.Connection(f"{host}:{port}", connect_timeout=3)
            c.connect()
            try:
                return c.channel().queue_declare(queue, passive=True)[1]
            finally:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
        except Exception:  # noqa: BLE001
            continue
    return None


# =============================================================================================
# The proxy


class Proxy:
    def __init__(self, binary: str, workdir: str, name: str, clusters: list[tuple[str, str, list[str]]],
                 heartbeat: int = 2, limits: dict | None = None, timeouts: dict | None = None):
        self.port, self.admin = free_port(), free_port()
        self.path = os.path.join(workdir, f"{name}.toml")
        self.log_path = os.path.join(workdir, f"{name}.log")
        lines = [f'listen = "127.0.0.1:{self.port}"', "[admin]", f'listen = "127.0.0.1:{self.admin}"',
                 "[timeouts]", f"upstream_heartbeat_secs = {heartbeat}", "shutdown_grace_ms = 500"]
        for k, v in (timeouts or {}).items():
            lines.append(f"{k} = {v}")
        if limits:
            lines.append("[limits]")
            lines += [f"{k} = {v}" for k, v in limits.items()]
        for cname, role, nodes in clusters:
            node_list = ", ".join(f'"{n}"' for n in nodes)
            lines += ["[[clusters]]", f'name = "{cname}"', f'role = "{role}"', f"nodes = [{node_list}]"]
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.logf = open(self.log_path, "w")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen([binary, "--config", self.path], stdout=self.logf,
                                     stderr=subprocess.STDOUT, env=env)
        ok = wait_for(f"proxy {name} listening", lambda: socket.create_connection(
            ("127.0.0.1", self.port), timeout=1).close() is None, timeout=30)
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"proxy {name} did not start; see {self.log_path}")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        return warren_admin.metrics(self.admin)

    def metric(self, name: str, **labels: str) -> float:
        return warren_admin.metric(self.admin, name, **labels)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log_text(self) -> str:
        self.logf.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


# =============================================================================================
# Workload: producers, consumers, ledger


class Producer(threading.Thread):
    def __init__(self, addr: str, queue: str, prefix: str, count: int, rate: float, confirm: bool, size: int,
                 gate: threading.Event | None = None, socket_settings: dict | None = None):
        super().__init__(daemon=True, name=f"producer-{prefix}")
        self.gate = gate
        self.socket_settings = socket_settings
        self.connected = threading.Event()
        self.addr, self.queue, self.prefix, self.count = addr, queue, prefix, count
        self.rate, self.confirm, self.size = rate, confirm, size
        self.attempted: list[str] = []
        self.sent_at: list[float] = []  # wall clock of each attempt, same order as `attempted`
        self.ok: list[str] = []  # confirmed (confirm mode) or publish call returned (no confirms)
        self.errors: list[str] = []
        self.blocked_events: list[tuple[float, str]] = []
        self.inflight_since: float | None = None
        self.last_return = time.monotonic()
        self.done = threading.Event()
        self.conn: amqp.Connection | None = None

    def run(self) -> None:
        try:
            self.conn = amqp.Connection(
                self.addr, confirm_publish=self.confirm, connect_timeout=20, socket_settings=self.socket_settings,
                on_blocked=lambda reason: self.blocked_events.append((time.monotonic(), "blocked")),
                on_unblocked=lambda: self.blocked_events.append((time.monotonic(), "unblocked")))
            self.conn.connect()
            ch = self.conn.channel()
            self.connected.set()
            if self.gate is not None:
                self.gate.wait()
            pad = self.padding()
            for i in self.paced():
                mid = f"{self.prefix}-{i}"
                self.attempted.append(mid)
                self.sent_at.append(time.time())
                self.inflight_since = time.monotonic()
                ch.basic_publish(amqp.Message(f"{mid}|{pad}", delivery_mode=2, message_id=mid),
                                 routing_key=self.queue)
                self.inflight_since = None
                self.last_return = time.monotonic()
                self.ok.append(mid)
            self.conn.close()
        except Exception as e:  # noqa: BLE001 - any exception is a client-visible failure
            self.errors.append(f"{self.name}: {e!r}\n{traceback.format_exc(limit=3)}")
        finally:
            self.connected.set()
            self.done.set()

    def padding(self) -> str:
        """Filler after "<id>|" so that a body is about `size` bytes."""
        return "x" * max(0, self.size - len(self.prefix) - 12)

    def paced(self):
        """0 .. count-1, each no earlier than its slot at `rate` a second from the first (0: no
        pacing); a late publish does not push the later ones back."""
        start = time.monotonic()
        for i in range(self.count):
            if self.rate > 0:
                ahead = start + i / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            yield i

    def blocked_for(self) -> float:
        s = self.inflight_since
        return 0.0 if s is None else time.monotonic() - s


class PipelinedProducer(Producer):
    """Confirm mode with up to `window` publishes in flight, as the Java and Go clients do (py-amqp's
    confirm_publish waits for each confirm): exercises the proxy's mapping of out-of-order and
    `multiple` confirms after a republish. A confirm for a sequence number that is not in flight,
    or a nack, is recorded as an error."""

    def __init__(self, *a, window: int = 200, **kw):
        super().__init__(*a, **kw)
        self.window = window
        self.nacked: list[str] = []

    def run(self) -> None:
        outstanding: dict[int, str] = {}
        published = [0]

        def settle(tag: int, multiple: bool, ok: bool) -> None:
            if tag > published[0] or (not multiple and tag not in outstanding):
                self.errors.append(f"{self.name}: {'ack' if ok else 'nack'} for sequence number {tag} "
                                   f"(multiple={multiple}) which is not in flight (published {published[0]})")
                return
            tags = [t for t in outstanding if t <= tag] if multiple else [tag]
            for t in sorted(tags):
                mid = outstanding.pop(t)
                (self.ok if ok else self.nacked).append(mid)
            if not ok:
                self.errors.append(f"{self.name}: nack for {len(tags)} publish(es) up to {tag}")

        try:
            self.conn = amqp.Connection(
                self.addr, connect_timeout=20,
                on_blocked=lambda reason: self.blocked_events.append((time.monotonic(), "blocked")),
                on_unblocked=lambda: self.blocked_events.append((time.monotonic(), "unblocked")))
            self.conn.connect()
            ch = self.conn.channel()
            ch.events["basic_ack"].add(lambda tag, multiple: settle(tag, multiple, True))
            ch.events["basic_nack"].add(lambda tag, multiple: settle(tag, multiple, False))
            ch.confirm_select()
            self.connected.set()
            pad = self.padding()
            for i in self.paced():
                self.inflight_since = time.monotonic() if len(outstanding) >= self.window else None
                while len(outstanding) >= self.window:
                    try:
                        self.conn.drain_events(timeout=1)
                    except socket.timeout:
                        pass
                self.inflight_since = None
                mid = f"{self.prefix}-{i}"
                self.attempted.append(mid)
                self.sent_at.append(time.time())
                ch.basic_publish(amqp.Message(f"{mid}|{pad}", delivery_mode=2, message_id=mid),
                                 routing_key=self.queue)
                published[0] += 1
                outstanding[published[0]] = mid
                self.last_return = time.monotonic()
                try:
                    self.conn.drain_events(timeout=0)
                except socket.timeout:
                    pass
            end = time.monotonic() + 300
            while outstanding and time.monotonic() < end:
                try:
                    self.conn.drain_events(timeout=1)
                except socket.timeout:
                    pass
            if outstanding:
                self.errors.append(f"{self.name}: {len(outstanding)} publishes never confirmed")
            self.conn.close()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{self.name}: {e!r}\n{traceback.format_exc(limit=3)}")
        finally:
            self.connected.set()
            self.done.set()


class Consumer(threading.Thread):
    def __init__(self, addr: str, queue: str, prefetch: int, name: str):
        super().__init__(daemon=True, name=name)
        self.addr, self.queue, self.prefetch = addr, queue, prefetch
        self.received: Counter[str] = Counter()
        self.redelivered: Counter[str] = Counter()
        self.count = 0
        self.errors: list[str] = []
        # connection.close 320 from the proxy because a link died while this consumer held
        # deliveries of it (the broker requeues them): what losing one broker's node does to
        # a consumer. It connects again, as Celery, kombu and every production consumer do.
        self.failover_closes: list[str] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    self.consume_once()
                    return
                except amqp.exceptions.ConnectionForced as e:
                    if "unacknowledged deliveries" not in str(e) or len(self.failover_closes) >= 20:
                        raise
                    self.failover_closes.append(str(e))
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{self.name}: {e!r}\n{traceback.format_exc(limit=3)}")
        finally:
            self.ready.set()

    def consume_once(self) -> None:
        conn = None
        try:
            conn = amqp.Connection(self.addr, connect_timeout=20)
            conn.connect()
            ch = conn.channel()
            ch.basic_qos(0, self.prefetch, False)

            def on_message(msg: amqp.Message) -> None:
                mid = msg.properties.get("message_id")
                if not mid:
                    body = msg.body if isinstance(msg.body, str) else msg.body.decode()
                    mid = body.split("|", 1)[0]
                self.received[mid] += 1
                if msg.delivery_info.get("redelivered"):
                    self.redelivered[mid] += 1
                self.count += 1
                ch.basic_ack(msg.delivery_tag)

            ch.basic_consume(self.queue, callback=on_message)
            self.ready.set()
            while not self.stop.is_set():
                try:
                    conn.drain_events(timeout=0.5)
                except socket.timeout:
                    pass
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Result:
    scenario: str
    published: int | None = None
    confirmed: int | None = None
    received: int | None = None
    lost: int | None = None
    duplicates: int | None = None
    unexpected: int | None = None
    in_doubt: int | None = None
    duration: float = 0.0
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        log(f"  [{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and bool(self.checks)


class Workload:
    """N messages over P confirm + P non-confirm producers, paced to last about `duration` s,
    consumed by C manual-ack consumers; all through one proxy, on one durable sharded queue."""

    def __init__(self, ctx: "Ctx", name: str, messages: int, duration: float, proxy: "Proxy | None" = None,
                 shards: tuple[str, ...] = ("shard-a", "shard-b")):
        self.ctx, self.name = ctx, name
        self.proxy = proxy or ctx.proxy
        self.shards = shards
        self.queue = f"fault-{name}-{rand_id()}"
        self.messages = messages
        p = ctx.args.producers
        k = 2 * p + (1 if ctx.args.pipelined else 0)
        per = [messages // k + (1 if i < messages % k else 0) for i in range(k)]
        rate = [c / duration if duration > 0 else 0 for c in per]
        self.producers: list[Producer] = [
            Producer(self.proxy.addr, self.queue, f"{name}-{'c' if i < p else 'n'}{i}", per[i], rate[i],
                     confirm=i < p, size=ctx.args.size)
            for i in range(2 * p)
        ]
        if ctx.args.pipelined:
            self.producers.append(PipelinedProducer(self.proxy.addr, self.queue, f"{name}-w{k - 1}", per[-1],
                                                    rate[-1], confirm=True, size=ctx.args.size,
                                                    window=ctx.args.window))
        self.consumers = [Consumer(self.proxy.addr, self.queue, ctx.args.prefetch, f"consumer-{name}-{k}")
                          for k in range(ctx.args.consumers)]
        self.started = 0.0
        self.final_depths: dict[str, int | None] = {}
        self.metrics0: dict[str, float] = {}

    def start(self) -> None:
        c = amqp.Connection(self.proxy.addr, connect_timeout=20)
        c.connect()
        c.channel().queue_declare(self.queue, durable=True, auto_delete=False)
        c.close()
        self.metrics0 = self.proxy.metrics()
        self.started = time.monotonic()
        for c in self.consumers:
            c.start()
        for c in self.consumers:
            c.ready.wait(30)
        for p in self.producers:
            p.start()
        log(f"workload {self.name}: {self.messages} messages, {len(self.producers)} producers "
            f"({sum(p.confirm for p in self.producers)} in confirm mode, "
            f"{sum(isinstance(p, PipelinedProducer) for p in self.producers)} of them pipelined), "
            f"{len(self.consumers)} consumers, queue {self.queue}")

    # -- progress --------------------------------------------------------------------------
    def published(self) -> int:
        return sum(len(p.attempted) for p in self.producers)

    def received_count(self) -> int:
        return sum(c.count for c in self.consumers)

    def producers_done(self) -> bool:
        return all(p.done.is_set() for p in self.producers)

    def wait_published(self, fraction: float, timeout: float = 300) -> bool:
        target = int(self.messages * fraction)
        return wait_for(f"{fraction:.0%} of {self.name} published",
                        lambda: self.published() >= target or self.producers_done(), timeout)

    def must_have(self) -> set[str]:
        return {m for p in self.producers for m in p.ok}

    def received(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.consumers:
            total.update(c.received)
        return total

    def depths(self) -> dict[str, int | None]:
        r = self.ctx.rabbit
        return {c: direct_depth(r.nodes(c), self.queue) for c in self.shards}

    # -- end ---------------------------------------------------------------------------------
    def finish(self, res: Result, drain_timeout: float = 150) -> None:
        end = time.monotonic() + 600
        for p in self.producers:
            p.join(max(0.0, end - time.monotonic()))
        stuck = [p.name for p in self.producers if p.is_alive()]
        res.check("producers finished", not stuck, f"still publishing: {stuck}" if stuck else
                  f"after {time.monotonic() - self.started:.1f}s")
        must = self.must_have()
        # A consumer that died (its connection was closed) receives nothing more: do not wait
        # for it (a failing run must not take minutes longer than a passing one).
        consumers_dead = lambda: not any(c.is_alive() for c in self.consumers)  # noqa: E731
        wait_for(f"{self.name}: every confirmed/returned message received",
                 lambda: not (must - set(self.received())) or consumers_dead(), drain_timeout, interval=0.5)
        if consumers_dead():
            log(f"{self.name}: every consumer stopped ({'; '.join(e.splitlines()[0] for c in self.consumers for e in c.errors)[:300]})")
        depth_zero = wait_for(f"{self.name}: queue empty on every shard cluster",
                              lambda: all(v == 0 for v in self.depths().values()),
                              5 if consumers_dead() else 60, interval=1)
        # A short settle, so late duplicates are counted too.
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 2.0 and time.monotonic() < end:
            n = self.received_count()
            if n != last:
                last, stable_since = n, time.monotonic()
            time.sleep(0.25)
        for c in self.consumers:
            c.stop.set()
        for c in self.consumers:
            c.join(10)
        res.duration = time.monotonic() - self.started
        self.ledger(res)
        self.final_depths = self.depths()
        res.check("queue drained on every shard cluster (checked directly)", depth_zero, str(self.final_depths))
        try:
            c = amqp.Connection(self.proxy.addr, connect_timeout=20)
            c.connect()
            c.channel().queue_delete(self.queue)
            c.close()
        except Exception as e:  # noqa: BLE001
            log(f"could not delete {self.queue}: {e!r}")

    def ledger(self, res: Result) -> None:
        attempted = {m for p in self.producers for m in p.attempted}
        confirmed = {m for p in self.producers if p.confirm for m in p.ok}
        returned = {m for p in self.producers if not p.confirm for m in p.ok}
        must = confirmed | returned
        received = self.received()
        redelivered: Counter[str] = Counter()
        for c in self.consumers:
            redelivered.update(c.redelivered)
        lost = must - set(received)
        dups = {m: n for m, n in received.items() if n > 1}
        unexpected = set(received) - attempted
        in_doubt = attempted - must  # publish call raised or never returned
        res.published, res.confirmed, res.received = len(attempted), len(confirmed), len(received)
        res.lost, res.duplicates, res.unexpected = len(lost), sum(n - 1 for n in dups.values()), len(unexpected)
        res.in_doubt = len(in_doubt)
        redeliv = sum(n - 1 for m, n in dups.items() if redelivered[m] > 0)
        republ = res.duplicates - redeliv
        m1 = self.proxy.metrics()

        def delta(k: str) -> float:
            return m1.get(k, 0) - self.metrics0.get(k, 0)

        res.notes.append(
            f"ledger: attempted {len(attempted)}, confirmed {len(confirmed)}, returned (no confirm) "
            f"{len(returned)}, in doubt {len(in_doubt)}, received {len(received)} unique / "
            f"{sum(received.values())} deliveries")
        res.notes.append(
            f"duplicates {res.duplicates}: {redeliv} redelivery (broker requeued an unacked delivery "
            f"after a node/link died), {republ} republish (proxy sent the message again after a lost "
            f"confirm)")
        res.notes.append(
            "proxy: republished {:.0f}, dropped {:.0f}, link failures shard-a {:.0f} shard-b {:.0f}, "
            "nacks from clusters {:.0f}, publishes shard-a {:.0f} shard-b {:.0f}".format(
                delta("warren_republished_total"), delta("warren_dropped_total"),
                delta('warren_cluster_link_failures_total{cluster="shard-a"}'),
                delta('warren_cluster_link_failures_total{cluster="shard-b"}'),
                delta('warren_confirms_total{cluster="shard-a",outcome="nack"}')
                + delta('warren_confirms_total{cluster="shard-b",outcome="nack"}'),
                delta('warren_publishes_total{cluster="shard-a"}'),
                delta('warren_publishes_total{cluster="shard-b"}')))
        errors = [e for p in self.producers for e in p.errors] + [e for c in self.consumers for e in c.errors]
        failover_closes = [e for c in self.consumers for e in c.failover_closes]
        res.notes.append(
            f"consumers closed with 320 for holding deliveries of a failed link, then connected again: "
            f"{len(failover_closes)}" + (f" ({failover_closes[0][:200]})" if failover_closes else ""))
        res.check("lost = 0", not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:5]}" if lost else "")
        res.check("unexpected = 0", not unexpected, f"e.g. {sorted(unexpected)[:5]}" if unexpected else "")
        failed = {e.split(":", 1)[0] for e in errors}
        res.check("no client saw a channel or connection error", not errors,
                  (f"{len(failed)} of {len(self.producers) + len(self.consumers)} clients failed: "
                   + "; ".join(e.splitlines()[0] for e in errors[:6])) if errors else "")
        for e in errors[:6]:
            res.notes.append("client error: " + e.strip().replace("\n", " | "))
        res.check("every publish call returned (none in doubt)", not in_doubt,
                  f"{len(in_doubt)} in doubt" if in_doubt else "")


# =============================================================================================
# Scenarios


class Ctx:
    def __init__(self, args, rabbit: Rabbit, proxy: Proxy, workdir: str, binary: str):
        self.args, self.rabbit, self.proxy, self.workdir, self.binary = args, rabbit, proxy, workdir, binary


def links_on(proxy: Proxy, cluster: str, since: int = 0) -> list[str]:
    """Nodes of `cluster` the proxy opened links to (from its log), after byte offset `since`."""
    text = strip_ansi(proxy.log_text())[since:]
    out = []
    for line in text.splitlines():
        if "link opened" in line and f"cluster={cluster}" in line:
            m = re.search(r"node=(\S+)", line)
            if m:
                out.append(m.group(1))
        elif "connection opened" in line:
            # links of a new client connection: links=["shard-a@127.0.0.1:7877", ...]
            out += re.findall(rf'"{re.escape(cluster)}@([^"]+)"', line)
    return out


def wait_synced(ctx: Ctx, cluster: str, queue: str, via: str, timeout: float = 120) -> bool:
    return wait_for(f"{queue} mirrors synchronised on {cluster}",
                    lambda: ctx.rabbit.mirrors_synced(via, queue), timeout, interval=2)


def scenario_kill_node(ctx: Ctx) -> Result:
    res = Result("kill-node")
    ensure_whole(ctx, "shard-a", res)
    # Paced to at least 90 s: a restart can take over a minute when the killed node's port is
    # left in TIME_WAIT (scripts/rabbit.sh refuses to start it until then), and the second kill
    # must still fall inside the workload.
    w = Workload(ctx, "kill-node", ctx.args.messages, max(ctx.args.duration, 90.0))
    w.start()
    overlap = []
    for i, node in enumerate(["shard-a-1", "shard-a-2"], 1):
        w.wait_published(0.15 if i == 1 else 0.5)
        other = "shard-a-2" if node == "shard-a-1" else "shard-a-1"
        p0 = w.published()
        log(f"kill {i}: kill -9 {node} (published so far {p0})")
        ctx.rabbit.kill(node)
        time.sleep(3)
        log(f"kill {i}: restarting {node}")
        t = time.monotonic()
        ctx.rabbit.start(node)
        log(f"kill {i}: {node} back after {time.monotonic() - t:.1f}s; waiting for mirror sync")
        synced = wait_synced(ctx, "shard-a", w.queue, other)
        p1 = w.published()
        overlap.append((node, p0, p1))
        res.notes.append(f"kill {i}: {node} killed at {p0} published, restarted and resynced "
                         f"({'synced' if synced else 'NOT synced'}) at {p1}")
    w.finish(res)
    for node, p0, p1 in overlap:
        res.check(f"kill of {node} happened while producers were publishing", p0 < w.messages and p1 > p0,
                  f"published {p0} -> {p1} of {w.messages}")
    return res


def scenario_kill_cluster(ctx: Ctx) -> Result:
    res = Result("kill-cluster")
    w = Workload(ctx, "kill-cluster", ctx.args.messages, ctx.args.duration + ctx.args.outage)
    w.start()
    w.wait_published(0.2)
    p0 = w.published()
    log_offset = len(strip_ansi(ctx.proxy.log_text()))
    log(f"killing both nodes of shard-b (published so far {p0})")
    threads = [threading.Thread(target=ctx.rabbit.kill, args=(n,)) for n in ("shard-b-1", "shard-b-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    down_at = time.monotonic()
    time.sleep(min(5, ctx.args.outage / 3))
    a1 = ctx.proxy.metric("warren_publishes_total", cluster="shard-a")
    b1 = ctx.proxy.metric("warren_publishes_total", cluster="shard-b")
    pub1 = w.published()
    time.sleep(max(0.0, ctx.args.outage - (time.monotonic() - down_at)))
    a2 = ctx.proxy.metric("warren_publishes_total", cluster="shard-a")
    b2 = ctx.proxy.metric("warren_publishes_total", cluster="shard-b")
    pub2 = w.published()
    res.check("publishes continue on shard-a while shard-b is down (proxy /metrics)", a2 > a1,
              f"shard-a publishes {a1:.0f} -> {a2:.0f}, shard-b {b1:.0f} -> {b2:.0f}, "
              f"client publishes {pub1} -> {pub2} during the outage")
    res.check("producers were publishing during the outage", pub2 > pub1 and pub1 < w.messages,
              f"{pub1} -> {pub2} of {w.messages}")
    # Both nodes must come back together: a node whose port is still in TIME_WAIT would start up
    # to 60 s after the other one (rabbit.sh refuses to start it), and a shard-b-2 serving while
    # shard-b-1, the queue's master, is still down confirms publishes it then loses (RabbitMQ
    # classic mirrored queues; see docs/reliability.md). So wait until both can start.
    t = time.monotonic()
    wait_for("shard-b ports out of TIME_WAIT", lambda: all(ctx.rabbit.ports_free(n) for n in ("shard-b-1", "shard-b-2")),
             75, interval=1)
    if time.monotonic() - t > 1:
        res.notes.append(f"waited {time.monotonic() - t:.0f}s for the killed nodes' ports to leave TIME_WAIT "
                         f"before restarting both")
    log(f"restarting shard-b after {time.monotonic() - down_at:.1f}s")
    t = time.monotonic()
    node_up: dict[str, float] = {}

    def start_b(n: str) -> None:
        ctx.rabbit.start(n)
        node_up[n] = time.time()

    threads = [threading.Thread(target=start_b, args=(n,)) for n in ("shard-b-1", "shard-b-2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    back_at = time.monotonic()
    res.notes.append(f"shard-b down {back_at - down_at:.1f}s in all (killed {ctx.args.outage:.0f}s, "
                     f"restart {back_at - t:.1f}s)")
    deliveries_b0 = ctx.proxy.metric("warren_deliveries_total", cluster="shard-b")
    resumed = wait_for("proxy consumes from shard-b again",
                       lambda: ctx.proxy.metric("warren_deliveries_total", cluster="shard-b") > deliveries_b0
                       or (w.producers_done() and direct_depth(ctx.rabbit.nodes("shard-b"), w.queue) == 0),
                       120, interval=1)
    resumed_after = time.monotonic() - back_at
    queue_b = w.queue
    w.finish(res)
    if res.lost:
        explain_cluster_restart_loss(ctx, w, res, node_up, log_offset)
    res.check("consumption from shard-b resumed after it returned", resumed,
              f"first shard-b delivery {resumed_after:.1f}s after both nodes were up")
    res.check("shard-b's queue drained to 0 (checked on shard-b directly)", w.final_depths.get("shard-b") == 0,
              f"depth {w.final_depths.get('shard-b')} (queue {queue_b})")
    return res


def log_time(line: str) -> float | None:
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if not m:
        return None
    import datetime
    ts = m.group(1)
    if "." in ts:
        head, frac = ts.split(".")
        ts = f"{head}.{frac[:6]}"
        fmt = "%Y-%m-%dT%H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%dT%H:%M:%S"
    return datetime.datetime.strptime(ts, fmt).replace(tzinfo=datetime.timezone.utc).timestamp()


def explain_cluster_restart_loss(ctx: Ctx, w: Workload, res: Result, node_up: dict[str, float], since: int) -> None:
    """Lost messages after a whole-cluster restart: were they published while shard-b served
    from one node before the other (the queue master's) had started?"""
    lost = w.must_have() - set(w.received())
    sent = {m: t for p in w.producers for m, t in zip(p.attempted, p.sent_at)}
    reopened = []
    for line in strip_ansi(w.proxy.log_text())[since:].splitlines():
        if "link opened" in line and "cluster=shard-b" in line:
            t = log_time(line)
            node = re.search(r"node=(\S+)", line)
            if t:
                reopened.append((t, node.group(1) if node else "?"))
    if not reopened or not node_up:
        return
    first_t, first_node = min(reopened)
    last_up = max(node_up.values())
    window = [m for m in lost if first_t - 1 <= sent.get(m, 0) <= last_up + 5]
    res.notes.append(
        f"lost messages: {len(window)} of {len(lost)} were published between the first shard-b link reopening "
        f"(on {first_node}) and both shard-b nodes being up (+5 s); nodes up at "
        + ", ".join(f"{n} {time.strftime('%H:%M:%S', time.localtime(t))}" for n, t in sorted(node_up.items()))
        + f", first link {time.strftime('%H:%M:%S', time.localtime(first_t))}. A node that serves while the "
        "queue's master node is still down confirms publishes to the queue and drops them (RabbitMQ classic "
        "mirrored queues; reproduced without the proxy, see docs/reliability.md)")


def scenario_sigstop(ctx: Ctx) -> Result:
    res = Result("sigstop")
    ensure_whole(ctx, "shard-a", res)
    n = max(1000, int(ctx.args.messages * ctx.args.small_fraction))
    w = Workload(ctx, "sigstop", n, ctx.args.duration)
    log_offset = len(strip_ansi(ctx.proxy.log_text()))
    w.start()
    wait_for("workload links open", lambda: len(links_on(ctx.proxy, "shard-a", log_offset)) >= len(w.producers) + len(w.consumers), 30)
    before = links_on(ctx.proxy, "shard-a", log_offset)
    a1_addr, a2_addr = ctx.rabbit.node_addr("shard-a-1"), ctx.rabbit.node_addr("shard-a-2")
    res.check("before the pause, the workload's shard-a links are on shard-a-1",
              before and all(n == a1_addr for n in before), f"links on {Counter(before)}")
    w.wait_published(0.2)
    nconn = len(w.producers) + len(w.consumers)
    f0 = ctx.proxy.metric("warren_cluster_link_failures_total", cluster="shard-a")
    log_offset = len(strip_ansi(ctx.proxy.log_text()))
    p0 = w.published()
    log(f"SIGSTOP shard-a-1 (published so far {p0})")
    ctx.rabbit.pause("shard-a-1")
    t0 = time.monotonic()
    first = last = None
    while time.monotonic() - t0 < 30:
        f = ctx.proxy.metric("warren_cluster_link_failures_total", cluster="shard-a") - f0
        if f >= 1 and first is None:
            first = time.monotonic() - t0
        if f >= nconn:
            last = time.monotonic() - t0
            break
        time.sleep(0.2)
    res.check("proxy detects the stopped node by heartbeat within 7 s (2 s heartbeat: 4 s expected)",
              first is not None and last is not None and last <= 7,
              f"first link declared dead after {first if first is None else round(first, 1)}s, "
              f"all {nconn} after {last if last is None else round(last, 1)}s")
    text = strip_ansi(ctx.proxy.log_text())[log_offset:]
    hb = len(re.findall(r"upstream link lost.*no heartbeat|no heartbeat.*upstream link lost", text))
    res.notes.append(f"{hb} 'upstream link lost' log lines with a heartbeat reason")
    failed_over = wait_for("links reopened on shard-a-2",
                           lambda: len([x for x in links_on(ctx.proxy, "shard-a", log_offset) if x == a2_addr]) >= nconn,
                           40, interval=0.5)
    after = links_on(ctx.proxy, "shard-a", log_offset)
    res.check("links fail over to shard-a-2", failed_over and a1_addr not in after, f"new links on {Counter(after)}")
    w.finish(res)
    res.check("the pause happened while producers were publishing", p0 < w.messages, f"{p0} of {w.messages}")
    log("SIGCONT shard-a-1")
    ctx.rabbit.resume("shard-a-1")
    heal_partition(ctx, res)
    return res


def cluster_whole(ctx: Ctx, cluster: str) -> tuple[bool, str]:
    """Both nodes of a two-node cluster run, each sees the other running, and neither reports a
    partition."""
    ok, details = True, []
    for node in (f"{cluster}-1", f"{cluster}-2"):
        try:
            st = ctx.rabbit.cluster_status(node)
        except Exception as e:  # noqa: BLE001
            return False, f"{node}: cluster_status failed: {e!r}"[:300]
        running = st.get("running_nodes") or []
        parts = st.get("partitions") or {}
        if len(running) < 2 or parts:
            ok = False
        details.append(f"{node}: {len(running)} running, partitions {parts or 'none'}")
    return ok, "; ".join(details)


def restart_app(ctx: Ctx, node: str) -> None:
    ctx.rabbit.run("stop-app", node, timeout=120)
    ctx.rabbit.run("start-app", node, timeout=300)


def ensure_whole(ctx: Ctx, cluster: str, res: Result) -> None:
    """Precondition of a scenario that kills or stops a node of `cluster`: it is one cluster. A
    cluster split by an earlier scenario (a partition RabbitMQ reported late) has a queue
    declared on one side only, and killing that side loses the queue: a harness problem that must
    not read as a proxy failure. Heals it (restarts the app of node 1) if needed."""
    whole, detail = cluster_whole(ctx, cluster)
    if not whole:
        log(f"{cluster} is not whole before {res.scenario} ({detail}): restarting the app of {cluster}-1")
        restart_app(ctx, f"{cluster}-1")
        ok = wait_for(f"{cluster} whole", lambda: cluster_whole(ctx, cluster)[0], 60, interval=2)
        res.notes.append(f"{cluster} was not whole before the scenario ({detail}); the harness restarted the app "
                         f"of {cluster}-1: {'whole again' if ok else 'STILL NOT WHOLE'}")
        whole, detail = cluster_whole(ctx, cluster)
    res.check(f"precondition: {cluster} is one cluster (both nodes running, no partition)", whole, detail)


def heal_partition(ctx: Ctx, res: Result) -> None:
    """After a SIGSTOP longer than net_ticktime, shard-a-2 took shard-a-1 for dead; with the
    default partition handling (ignore) the nodes stay partitioned until one restarts. RabbitMQ
    reports that partition only some seconds after SIGCONT, sometimes after the harness looked:
    the app of shard-a-1 is restarted in any case, so the next scenarios find one cluster."""
    seen: dict = {}

    def partition_reported() -> bool:
        for node in ("shard-a-1", "shard-a-2"):
            parts = ctx.rabbit.cluster_status(node).get("partitions") or {}
            if parts:
                seen.update(parts)
                return True
        return False

    t = time.monotonic()
    reported = wait_for("a partition reported after SIGCONT", partition_reported, 15, interval=1)
    res.notes.append((f"after SIGCONT RabbitMQ reported a partition {seen} (after {time.monotonic() - t:.0f}s)"
                      if reported else "no partition reported within 15 s of SIGCONT")
                     + "; the harness restarted the RabbitMQ app of shard-a-1 (stop_app/start_app)")
    log("after SIGCONT: restarting the app of shard-a-1" + (" (partition reported)" if reported else ""))
    restart_app(ctx, "shard-a-1")
    ok = wait_for("shard-a whole", lambda: cluster_whole(ctx, "shard-a")[0], 60, interval=2)
    res.check("shard-a whole again after SIGCONT (harness step)", ok, cluster_whole(ctx, "shard-a")[1])


def scenario_memory_alarm(ctx: Ctx) -> Result:
    res = Result("memory-alarm")
    n = max(1000, int(ctx.args.messages * ctx.args.small_fraction))
    w = Workload(ctx, "memory-alarm", n, ctx.args.duration)
    w.start()
    w.wait_published(0.2)
    rss_base = ctx.proxy.rss_bytes()
    rss_peak = [rss_base]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            try:
                rss_peak[0] = max(rss_peak[0], ctx.proxy.rss_bytes())
            except OSError:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    p0 = w.published()
    log(f"memory alarm on shard-a (published so far {p0})")
    set_watermark(ctx, "0.0000001")
    t_alarm = time.monotonic()
    told = wait_for("a client was told connection.blocked",
                    lambda: any(e[1] == "blocked" for p in w.producers for e in p.blocked_events), 20)
    res.check("clients that advertise connection.blocked are told (py-amqp on_blocked)", told,
              f"{sum(1 for p in w.producers if any(e[1] == 'blocked' for e in p.blocked_events))}"
              f"/{len(w.producers)} producers told, after {time.monotonic() - t_alarm:.1f}s")
    time.sleep(2)
    a1 = ctx.proxy.metric("warren_publishes_total", cluster="shard-a")
    b1 = ctx.proxy.metric("warren_publishes_total", cluster="shard-b")
    pub1, ok1 = w.published(), sum(len(p.ok) for p in w.producers)
    time.sleep(ctx.args.alarm_secs)
    a2 = ctx.proxy.metric("warren_publishes_total", cluster="shard-a")
    b2 = ctx.proxy.metric("warren_publishes_total", cluster="shard-b")
    pub2, ok2 = w.published(), sum(len(p.ok) for p in w.producers)
    paused = [p.name for p in w.producers if p.blocked_for() > ctx.args.alarm_secs / 2]
    res.check("during the alarm, publishes move to shard-b (or pause)",
              a2 - a1 <= len(w.producers) and (b2 > b1 or pub2 == pub1),
              f"over {ctx.args.alarm_secs:.0f}s: shard-a +{a2 - a1:.0f}, shard-b +{b2 - b1:.0f}; client publish calls "
              f"returned +{ok2 - ok1}; paused producers (publish call blocked): {paused}")
    log("restoring vm_memory_high_watermark 0.4")
    set_watermark(ctx, "0.4")
    told_unblocked = wait_for("clients told connection.unblocked",
                              lambda: all(any(e[1] == "unblocked" for e in p.blocked_events)
                                          for p in w.producers if any(e[1] == "blocked" for e in p.blocked_events)
                                          and not p.done.is_set()), 30)
    res.check("blocked clients are told connection.unblocked after the alarm clears", told_unblocked)
    w.finish(res)
    stop_sampling.set()
    sampler.join(2)
    bound = rss_base + ctx.args.rss_slack_mb * 1024 * 1024
    res.check(f"proxy RSS stays under RSS before the alarm + {ctx.args.rss_slack_mb} MiB",
              rss_peak[0] <= bound, f"before {rss_base / 2**20:.1f} MiB, peak {rss_peak[0] / 2**20:.1f} MiB")
    return res


def set_watermark(ctx: Ctx, value: str) -> None:
    threads = [threading.Thread(target=ctx.rabbit.ctl, args=(n, "set_vm_memory_high_watermark", value))
               for n in ("shard-a-1", "shard-a-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------------------
# partial-publish

PARTIAL_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import rawamqp as raw
port, queue, mode = int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = raw.RawClient("127.0.0.1", port).open()
c.open_channel(1)
c.send(raw.method_frame(1, raw.BASIC_PUBLISH, b"\x00\x00" + raw.shortstr("") + raw.shortstr(queue) + b"\x00"))
c.send(raw.content_header(1, 1000, message_id="partial-child-" + mode))
body = b"p" * 400
if mode == "short-frame":
    c.send(raw.frame(raw.FRAME_BODY, 1, body))
else:  # the body frame announces 1000 bytes, 400 are sent
    import struct
    c.send(struct.pack(">BHI", raw.FRAME_BODY, 1, 1000) + body)
print("sent", flush=True)
time.sleep(60)
"""


def scenario_partial_publish(ctx: Ctx) -> Result:
    res = Result("partial-publish")
    t0 = time.monotonic()
    queue = f"fault-partial-{rand_id()}"
    port = ctx.proxy.port
    c = amqp.Connection(ctx.proxy.addr, connect_timeout=20)
    c.connect()
    c.channel().queue_declare(queue, durable=True, auto_delete=False)
    c.close()
    nodes = {k: ctx.rabbit.nodes(k) for k in ("shard-a", "shard-b")}

    def depths() -> dict[str, int | None]:
        return {k: direct_depth(v, queue) for k, v in nodes.items()}

    # Positive control: the same hand-built client publishing a whole message does reach a cluster.
    rc = raw.RawClient("127.0.0.1", port).open()
    rc.open_channel(1)
    rc.send(raw.publish_frames(1, "", queue, b"w" * 1000, rc.frame_max, message_id="whole"))
    time.sleep(0.3)
    rc.close()
    whole = wait_for("the whole raw publish reaches a cluster", lambda: sum(v or 0 for v in depths().values()) == 1, 10)
    base = depths()
    res.check("control: a whole raw publish reaches one cluster", whole, str(base))
    pub0 = sum(ctx.proxy.metric("warren_publishes_total", cluster=k) for k in ("shard-a", "shard-b"))

    cases = []
    for body_mode in ("short-frame", "cut-frame"):
        for end in ("close", "rst", "kill"):
            cases.append((body_mode, end))
    results = []
    for body_mode, end in cases:
        label = f"{body_mode}/{end}"
        try:
            if end == "kill":
                proc = subprocess.Popen([sys.executable, "-c", PARTIAL_CHILD, os.path.dirname(os.path.abspath(__file__)),
                                         str(port), queue, body_mode], stdout=subprocess.PIPE, text=True)
                line = proc.stdout.readline().strip()
                if line != "sent":
                    raise RuntimeError(f"child did not send ({line!r})")
                time.sleep(1.0)  # the proxy holds the partial publish while the client lives
                mid = depths()
                proc.kill()
                proc.wait()
            else:
                rc = raw.RawClient("127.0.0.1", port).open()
                rc.open_channel(1)
                rc.send(raw.method_frame(1, raw.BASIC_PUBLISH, b"\x00\x00" + raw.shortstr("") + raw.shortstr(queue) + b"\x00"))
                rc.send(raw.content_header(1, 1000, message_id=f"partial-{body_mode}-{end}"))
                if body_mode == "short-frame":
                    rc.send(raw.frame(raw.FRAME_BODY, 1, b"p" * 400))
                else:
                    import struct
                    rc.send(struct.pack(">BHI", raw.FRAME_BODY, 1, 1000) + b"p" * 400)
                time.sleep(1.0)
                mid = depths()
                if end == "rst":
                    rc.abort()
                else:
                    rc.close()
            results.append((label, mid))
        except Exception as e:  # noqa: BLE001
            res.check(f"case {label} ran", False, repr(e))
    # Watch the queues for a few seconds after the last client died.
    deadline = time.monotonic() + ctx.args.partial_watch
    changed = []
    while time.monotonic() < deadline:
        d = depths()
        if d != base:
            changed.append(d)
        time.sleep(0.5)
    pub1 = sum(ctx.proxy.metric("warren_publishes_total", cluster=k) for k in ("shard-a", "shard-b"))
    during_ok = all(m == base for _, m in results)
    res.check(f"{len(results)} clients cut mid-body (2 body shapes x close/RST/SIGKILL): queue depth unchanged "
              f"on both shard clusters while they lived and for {ctx.args.partial_watch:.0f}s after",
              during_ok and not changed and len(results) == len(cases),
              f"baseline {base}; while alive {[m for _, m in results]}; changes after: {changed[:3]}")
    res.check("proxy forwarded no publish for them (warren_publishes_total unchanged)", pub1 == pub0,
              f"{pub0:.0f} -> {pub1:.0f}")
    ok = ctx.proxy.alive()
    try:
        c = amqp.Connection(ctx.proxy.addr, connect_timeout=20, confirm_publish=True)
        c.connect()
        ch = c.channel()
        ch.basic_publish(amqp.Message("after", delivery_mode=2), routing_key=queue)
        ch.queue_delete(queue)
        c.close()
    except Exception as e:  # noqa: BLE001
        ok = False
        res.notes.append(f"proxy check after: {e!r}")
    res.check("proxy still serves clients afterwards", ok)
    res.published = 1 + len(cases)
    res.received = None
    res.duration = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------------
# limits

LIMITS = {"max_connections": 5, "max_connections_per_ip": 3, "max_channels": 4, "frame_max": 8192,
          "max_message_size": 65536}


class Canary:
    """A py-amqp client that must keep working while other clients are refused."""

    def __init__(self, addr: str, queue: str):
        self.queue = queue
        self.conn = amqp.Connection(addr, connect_timeout=20, confirm_publish=True)
        self.conn.connect()
        self.ch = self.conn.channel()
        self.ch.queue_declare(queue, durable=True, auto_delete=False)
        self.n = 0

    def roundtrip(self) -> bool:
        self.n += 1
        body = f"canary-{self.n}"
        self.ch.basic_publish(amqp.Message(body, delivery_mode=2), routing_key=self.queue)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            m = self.ch.basic_get(self.queue, no_ack=True)
            if m is not None:
                return m.body == body
            time.sleep(0.1)
        return False

    def close(self) -> None:
        try:
            self.ch.queue_delete(self.queue)
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


def expect_close(m, code: int, where: str = "connection") -> tuple[bool, str]:
    want = raw.CONNECTION_CLOSE if where == "connection" else raw.CHANNEL_CLOSE
    if m is None or m[1] != want:
        return False, raw.describe(m)
    return raw.parse_close(m[2])[0] == code, raw.describe(m)


def scenario_limits(ctx: Ctx) -> Result:
    res = Result("limits")
    t0 = time.monotonic()
    # One shard cluster: the control node (single node, so SIGSTOP leaves no partition behind).
    solo = ctx.rabbit.nodes("control")
    lim = dict(LIMITS, max_held_bytes_per_connection=ctx.args.held_limit)
    proxy = Proxy(ctx.binary, ctx.workdir, "limits-proxy", [("solo", "shard", solo)],
                  heartbeat=60, limits=lim)
    res.notes.append(f"limits proxy: {lim}, upstream_heartbeat_secs 60 (the paused node must not be "
                     f"declared dead during the back-pressure test), single shard cluster = control node")
    opened: list[raw.RawClient] = []
    canary = None
    try:
        canary = Canary(proxy.addr, f"fault-canary-{rand_id()}")
        res.check("canary client works", canary.roundtrip())

        # -- connections ----------------------------------------------------------------------
        for _ in range(2):
            opened.append(raw.RawClient("127.0.0.1", proxy.port).open())
        c4 = raw.RawClient("127.0.0.1", proxy.port)
        ok, d = expect_close(c4.handshake(), 530)
        c4.close()
        res.check("4th connection from 127.0.0.1 gets connection.close 530 at connection.open "
                  "(max_connections_per_ip = 3)", ok, d)
        res.check("  ... canary still served", canary.roundtrip())
        for _ in range(2):
            opened.append(raw.RawClient("127.0.0.1", proxy.port, source="127.0.0.2").open())
        c6 = raw.RawClient("127.0.0.1", proxy.port, source="127.0.0.3")
        ok, d = expect_close(c6.handshake(), 530)
        c6.close()
        res.check("6th connection (from 127.0.0.3) gets connection.close 530 at connection.open "
                  "(max_connections = 5)", ok, d)
        res.check("  ... canary still served", canary.roundtrip())
        for c in opened:
            c.close()
        opened.clear()
        again = wait_for("slots released", lambda: bool(raw.RawClient("127.0.0.1", proxy.port).open().close() is None), 10)
        res.check("closed connections free their slots (a new connection is accepted)", again)
        time.sleep(0.5)

        # -- channels -------------------------------------------------------------------------
        # tune-ok channel_max 0 ("no limit") is above the server's limit: refused with 530, as
        # RabbitMQ refuses it.
        c0 = raw.RawClient("127.0.0.1", proxy.port)
        ok, d = expect_close(c0.handshake(channel_max=0), 530)
        c0.close()
        res.check("tune-ok channel_max 0 (no limit) is refused with 530, as by RabbitMQ", ok, d)
        for chmax, label in ((4, "channel_max 4"),):
            c = raw.RawClient("127.0.0.1", proxy.port).open(channel_max=chmax)
            opens = []
            for ch in range(1, 5):
                try:
                    c.open_channel(ch)
                    opens.append(ch)
                except Exception as e:  # noqa: BLE001
                    opens.append(f"{ch}: {e}")
            c.send(raw.method_frame(5, raw.CHANNEL_OPEN, raw.shortstr("")))
            ok, d = expect_close(c.read_method(), 530)
            c.close()
            res.check(f"channels 1-4 open, channel 5 gets connection.close 530 (max_channels = 4, tune-ok {label})",
                      ok and opens == [1, 2, 3, 4], f"opened {opens}; then {d}; server tune {c.server_tune}")
        res.check("  ... canary still served", canary.roundtrip())

        # -- frames ---------------------------------------------------------------------------
        c = raw.RawClient("127.0.0.1", proxy.port).open()
        c.open_channel(1)
        c.send(raw.method_frame(1, raw.CONFIRM_SELECT, b"\x00"))
        c.expect(raw.CONFIRM_SELECT_OK)
        # exactly frame_max (8192 bytes including the 8 bytes of framing) is fine
        body = b"f" * (8192 - 8)
        c.send(raw.method_frame(1, raw.BASIC_PUBLISH, b"\x00\x00" + raw.shortstr("") + raw.shortstr(canary.queue) + b"\x00"))
        c.send(raw.content_header(1, len(body)))
        c.send(raw.frame(raw.FRAME_BODY, 1, body))
        m = c.read_method()
        res.check("a frame of exactly frame_max (8192) is accepted", m is not None and m[1] == raw.BASIC_ACK, raw.describe(m))
        big = b"F" * 9000
        c.send(raw.method_frame(1, raw.BASIC_PUBLISH, b"\x00\x00" + raw.shortstr("") + raw.shortstr(canary.queue) + b"\x00"))
        c.send(raw.content_header(1, len(big)))
        c.send(raw.frame(raw.FRAME_BODY, 1, big))
        ok, d = expect_close(c.read_method(), 501)
        c.close()
        res.check("a frame bigger than frame_max gets connection.close 501 (FRAME_ERROR)", ok, d)
        c = raw.RawClient("127.0.0.1", proxy.port)
        m = c.handshake(frame_max=131072)
        c.close()
        ok, d = expect_close(m, 530)
        res.check("tune-ok with frame_max above the proxy's (131072 > 8192) is refused", m is None or ok, d)
        # drain the accepted 8184-byte message from the canary queue
        canary.ch.queue_purge(canary.queue)
        res.check("  ... canary still served", canary.roundtrip())

        # -- message size ----------------------------------------------------------------------
        c = raw.RawClient("127.0.0.1", proxy.port).open()
        c.open_channel(1)
        c.send(raw.method_frame(1, raw.CONFIRM_SELECT, b"\x00"))
        c.expect(raw.CONFIRM_SELECT_OK)
        c.send(raw.publish_frames(1, "", canary.queue, b"m" * 65537, c.frame_max))
        ok, d = expect_close(c.read_method(), 406, "channel")
        res.check("a message bigger than max_message_size gets channel.close 406", ok, d)
        c.send(raw.method_frame(1, raw.CHANNEL_CLOSE_OK))
        try:
            c.open_channel(1)
            c.send(raw.method_frame(1, raw.CONFIRM_SELECT, b"\x00"))
            c.expect(raw.CONFIRM_SELECT_OK)
            c.send(raw.publish_frames(1, "", canary.queue, b"m" * 65536, c.frame_max))
            m = c.read_method()
            after = m is not None and m[1] == raw.BASIC_ACK
            d = raw.describe(m)
        except Exception as e:  # noqa: BLE001
            after, d = False, repr(e)
        c.close()
        res.check("  ... the same connection goes on: a message of exactly max_message_size is confirmed", after, d)
        depth = direct_depth(solo, canary.queue)
        res.check("  ... and only that one reached the cluster", depth == 1, f"queue depth {depth}")
        canary.ch.queue_purge(canary.queue)
        res.check("  ... canary still served", canary.roundtrip())
        canary.close()
        canary = None

        # -- held publishes -----------------------------------------------------------------------
        held_backpressure(ctx, proxy, solo, res)
        res.check("limits proxy still running", proxy.alive())
    except Exception as e:  # noqa: BLE001
        res.check("limits scenario ran to the end", False, f"{e!r}\n{traceback.format_exc(limit=4)}")
    finally:
        for c in opened:
            c.close()
        if canary:
            canary.close()
        try:
            ctx.rabbit.resume("control-1")
        except Exception:  # noqa: BLE001
            pass
        proxy.stop()
    res.duration = time.monotonic() - t0
    return res


def held_backpressure(ctx: Ctx, proxy: Proxy, solo: list[str], res: Result) -> None:
    limit = ctx.args.held_limit
    size = 60 * 1024
    total = ctx.args.held_messages
    queue = f"fault-held-{rand_id()}"
    c = amqp.Connection(proxy.addr, connect_timeout=20)
    c.connect()
    c.channel().queue_declare(queue, durable=True, auto_delete=False)
    c.close()
    gate = threading.Event()
    # py-amqp sets TCP_USER_TIMEOUT = 1 s by default: the kernel then aborts a connection whose
    # peer keeps a zero window for more than about a second, i.e. any TCP back-pressure (from the
    # proxy, or from RabbitMQ itself) longer than that becomes a connection error. Disabled here
    # so the test observes the proxy's back-pressure; see docs/reliability.md.
    settings = None if ctx.args.held_pyamqp_defaults else {getattr(socket, "TCP_USER_TIMEOUT", 18): 0}
    prod = Producer(proxy.addr, queue, "held", total, 0, confirm=False, size=size, gate=gate,
                    socket_settings=settings)
    prod.start()  # connected (links open) before the node stops; publishes once the gate opens
    prod.connected.wait(30)

    # Warm up with a few messages so the allocator's pools are in the baseline, then pause.
    warm = Producer(proxy.addr, queue, "warm", 40, 0, confirm=True, size=size)
    warm.start()
    warm.join(60)
    rss0 = proxy.rss_bytes()
    log(f"held: SIGSTOP control-1, then a non-confirm producer pushes {total} x {size // 1024} KiB "
        f"({total * size / 2**20:.0f} MiB); held limit {limit / 2**20:.1f} MiB")
    ctx.rabbit.pause("control-1")
    gate.set()
    peak = [rss0]
    held_peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], proxy.rss_bytes())
                held_peak[0] = max(held_peak[0], proxy.metric("warren_held_bytes"))
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Wait until the producer is stuck in a publish call.
    stuck = wait_for("producer blocked in basic_publish", lambda: prod.blocked_for() >= 3, 30, interval=0.2)
    n_blocked = len(prod.ok)
    time.sleep(ctx.args.held_watch)
    n_after = len(prod.ok)
    blocked_for = prod.blocked_for()
    res.check("a producer against a node that stops confirming is back-pressured (publish call blocks)",
              stuck and n_after == n_blocked and not prod.done.is_set(),
              f"blocked after {n_blocked} publishes ({n_blocked * size / 2**20:.1f} MiB, the rest sits in "
              f"socket buffers), still blocked {blocked_for:.1f}s later")
    bound = limit + ctx.args.held_rss_slack_mb * 2**20
    res.check(f"proxy RSS growth stays under max_held_bytes_per_connection + {ctx.args.held_rss_slack_mb} MiB",
              peak[0] - rss0 <= bound,
              f"RSS {rss0 / 2**20:.1f} -> peak {peak[0] / 2**20:.1f} MiB (+{(peak[0] - rss0) / 2**20:.1f}); "
              f"warren_held_bytes peak {held_peak[0] / 2**20:.2f} MiB")
    res.check("warren_held_bytes stays within the limit (+ one message)", held_peak[0] <= limit + 65536,
              f"{held_peak[0]:.0f} <= {limit + 65536}")
    log("held: SIGCONT control-1")
    ctx.rabbit.resume("control-1")
    prod.join(180)
    stop.set()
    res.check("after SIGCONT the producer completes", prod.done.is_set() and not prod.errors,
              "; ".join(e.splitlines()[0] for e in prod.errors))
    cons = Consumer(proxy.addr, queue, 50, "held-consumer")
    cons.start()
    must = set(prod.ok) | set(warm.ok)
    wait_for("held messages consumed", lambda: not (must - set(cons.received)), 120, interval=0.5)
    time.sleep(1)
    cons.stop.set()
    cons.join(10)
    lost = must - set(cons.received)
    res.published = len(prod.attempted) + len(warm.attempted)
    res.confirmed = len(warm.ok)
    res.received = len(cons.received)
    res.lost = len(lost)
    res.duplicates = sum(n - 1 for n in cons.received.values() if n > 1)
    res.unexpected = len(set(cons.received) - set(prod.attempted) - set(warm.attempted))
    res.check("every held publish is delivered after the node resumes (lost = 0)", not lost and not cons.errors,
              f"lost {len(lost)}; consumer errors {cons.errors[:1]}")
    try:
        c = amqp.Connection(proxy.addr, connect_timeout=20)
        c.connect()
        c.channel().queue_delete(queue)
        c.close()
    except Exception:  # noqa: BLE001
        pass


def scenario_kill_node_one_shard(ctx: Ctx) -> Result:
    """kill-node against a proxy whose only shard cluster is shard-a. The cluster never
    goes away (shard-a-2 serves throughout), so nothing should be lost; but a publish held on the
    dead link can only be "published again elsewhere", and there is no elsewhere."""
    res = Result("kill-node-one-shard")
    ensure_whole(ctx, "shard-a", res)
    proxy = Proxy(ctx.binary, ctx.workdir, "one-shard-proxy", [("shard-a", "shard", ctx.rabbit.nodes("shard-a")),
                                                                ("control", "control", ctx.rabbit.nodes("control"))])
    try:
        n = max(1000, int(ctx.args.messages * ctx.args.small_fraction))
        w = Workload(ctx, "kill-node-one-shard", n, ctx.args.duration / 2, proxy=proxy, shards=("shard-a",))
        w.start()
        w.wait_published(0.3)
        p0 = w.published()
        log(f"kill -9 shard-a-1 (published so far {p0})")
        ctx.rabbit.kill("shard-a-1")
        time.sleep(3)
        ctx.rabbit.start("shard-a-1")
        # When the proxy closed every client (weakness 1), nothing is left to wait for.
        clients_gone = not any(c.is_alive() for c in w.consumers)
        wait_synced(ctx, "shard-a", w.queue, "shard-a-2", timeout=10 if clients_gone else 120)
        w.finish(res)
        res.check("the kill happened while producers were publishing", p0 < w.messages, f"{p0} of {w.messages}")
    finally:
        proxy.stop()
    return res


def scenario_kill_node_tx(ctx: Ctx) -> Result:
    """A transaction whose first publishes went to shard-a, shard-a-1 (its link) killed
    before tx.commit. A commit-ok promises every publish of the transaction; RabbitMQ alone would
    fail the commit (the connection is gone) instead."""
    res = Result("kill-node-tx")
    ensure_whole(ctx, "shard-a", res)
    t0 = time.monotonic()
    queue = f"fault-tx-{rand_id()}"
    proxy = ctx.proxy
    c = amqp.Connection(proxy.addr, connect_timeout=20)
    c.connect()
    ch = c.channel()
    ch.queue_declare(queue, durable=True, auto_delete=False)
    ch.tx_select()
    first = None
    for attempt in range(6):
        before = proxy.metric("warren_publishes_total", cluster="shard-a")
        mid = f"tx-{attempt}-1"
        ch.basic_publish(amqp.Message(mid, delivery_mode=2, message_id=mid), routing_key=queue)
        if wait_for("publish counted", lambda: proxy.metric("warren_publishes_total", cluster="shard-a") > before, 2):
            first = mid
            break
        ch.tx_rollback()
    if first is None:
        res.check("a transaction started on shard-a", False)
        return res
    log(f"transaction on shard-a ({first} published, not committed): kill -9 shard-a-1")
    ctx.rabbit.kill("shard-a-1")
    time.sleep(2)
    second = first[:-1] + "2"
    committed, err = False, ""
    try:
        ch.basic_publish(amqp.Message(second, delivery_mode=2, message_id=second), routing_key=queue)
        ch.tx_commit()
        committed = True
    except Exception as e:  # noqa: BLE001
        err = repr(e)
    time.sleep(1)
    c2 = amqp.Connection(proxy.addr, connect_timeout=20)
    c2.connect()
    ch2 = c2.channel()
    got = []
    while True:
        m = ch2.basic_get(queue, no_ack=True)
        if m is None:
            break
        got.append(m.properties.get("message_id"))
    ch2.queue_delete(queue)
    c2.close()
    try:
        c.close()
    except Exception:  # noqa: BLE001
        pass
    res.published, res.confirmed, res.received = 2, (2 if committed else 0), len(got)
    res.lost = len({first, second} - set(got)) if committed else 0
    res.duplicates, res.unexpected = len(got) - len(set(got)), len(set(got) - {first, second})
    res.check("tx.commit-ok only when every publish of the transaction reached a cluster",
              not committed or {first, second} <= set(got),
              f"commit {'ok' if committed else 'failed: ' + err}; in the queue afterwards: {got}")
    log("restarting shard-a-1")
    ctx.rabbit.start("shard-a-1")
    res.duration = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------------
# celery-kill-node

E2E_DIR = os.path.join(REPO, "tests", "e2e")


def celery_app(broker_url: str, queue: str):
    """The producer side of tests/e2e/e2e_app.py (the workers' app): the same settings and task
    name, for one broker URL (warren's address, or a kombu failover list of RabbitMQ nodes)."""
    from celery import Celery  # noqa: PLC0415 - only this scenario needs Celery

    app = Celery(f"fault-{queue}", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        result_backend="rpc://",
        task_acks_late=True,
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )

    @app.task(name="e2e.double")
    def double(x, ms=0):  # executed by the workers (tests/e2e/e2e_app.py); here only for delay()
        return x * 2

    return app, double


class CeleryProducer(threading.Thread):
    """An application thread: delay() for its share of the tasks (paced), and get() of each result,
    oldest first, with at most `window` results outstanding. Whatever either call raises is
    recorded (it would have reached the application) and the thread goes on with the next task."""

    def __init__(self, task, xs: list[int], rate: float, window: int, deadline: float, t_ref: list[float],
                 name: str, task_ms: int = 0):
        super().__init__(daemon=True, name=name)
        self.task_ms = task_ms  # each task sleeps a random 0..task_ms ms in the worker
        self.task, self.xs, self.rate, self.window, self.deadline = task, xs, rate, window, deadline
        self.t_ref = t_ref  # [time of the kill] once it happened, for the error timestamps
        self.attempts = 0
        self.sent: dict[str, int] = {}  # task id -> argument, for every delay() that returned
        self.results: dict[str, object] = {}
        self.errors: list[str] = []
        self.longest_delay = 0.0  # seconds, the slowest delay() call (a failover holds its publish)
        self.done = threading.Event()

    def stamp(self) -> str:
        return f"kill{time.monotonic() - self.t_ref[0]:+.1f}s" if self.t_ref else "before the kill"

    def run(self) -> None:
        pending: deque = deque()
        start = time.monotonic()
        try:
            for k, x in enumerate(self.xs):
                ahead = start + k / self.rate - time.monotonic() if self.rate > 0 else 0
                if ahead > 0:
                    time.sleep(ahead)
                self.attempts += 1
                t = time.monotonic()
                try:
                    r = self.task.delay(x, random.randint(0, self.task_ms)) if self.task_ms else self.task.delay(x)
                except Exception as e:  # noqa: BLE001 - reached the application
                    self.errors.append(f"{self.name} delay({x}) at {self.stamp()}: {e!r}")
                else:
                    self.longest_delay = max(self.longest_delay, time.monotonic() - t)
                    self.sent[r.id] = x
                    pending.append((r, x))
                while len(pending) > self.window:
                    self.collect(*pending.popleft())
            while pending:
                self.collect(*pending.popleft())
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{self.name}: {e!r}\n{traceback.format_exc(limit=3)}")
        finally:
            try:  # the rpc:// result consumer of this thread (the backend is per thread)
                self.task.app.backend.result_consumer.stop()
            except Exception:  # noqa: BLE001
                pass
            self.done.set()

    def collect(self, r, x: int) -> None:
        try:
            self.results[r.id] = r.get(timeout=max(1.0, self.deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - reached the application
            self.errors.append(f"{self.name} get() of task {x} ({r.id}) at {self.stamp()}: {e!r}")


class _LogRecords(logging.Handler):
    """Warnings and errors the producer's Celery and kombu log (reconnects, retries)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}"[:300])


@dataclass
class CeleryLedger:
    label: str
    ok_setup: bool = True
    setup_error: str = ""
    calls: int = 0
    sent: int = 0
    delay_errors: int = 0
    ran: int = 0
    never_ran: int = 0
    executions: int = 0
    reruns: int = 0
    reruns_redelivered: int = 0
    first_runs_redelivered: int = 0
    results: int = 0
    results_missing: int = 0
    wrong_results: int = 0
    get_errors: int = 0
    unknown: int = 0
    worker_conn_lost: int = 0
    worker_lost_why: Counter = field(default_factory=Counter)
    worker_task_errors: int = 0  # "raised unexpected" (e.g. the result publish failed)
    worker_fatal: list[str] = field(default_factory=list)  # "Unrecoverable error" (the worker exited)
    worker_exit: list = field(default_factory=list)
    producer_warnings: int = 0
    longest_delay: float = 0.0
    sent_at_kill: int = 0
    sent_when_back: int = 0
    restart_secs: float = 0.0
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def celery_run(ctx: Ctx, label: str, broker_url: str, kill: list[str], before_kill=None) -> CeleryLedger:
    """Celery workers (prefork) and producer threads on `broker_url`; the `kill` nodes are killed
    with SIGKILL once 30% of the tasks are sent, and restarted 3 s later, while tasks flow."""
    a = ctx.args
    led = CeleryLedger(label)
    queue = f"fault-celery-{label}-{rand_id()}"
    out = os.path.join(ctx.workdir, f"celery-{label}-executions.txt")
    env = dict(os.environ, WARREN_E2E_BROKER=broker_url, WARREN_E2E_OUT=out, WARREN_E2E_QUEUE=queue,
               WARREN_E2E_HEARTBEAT="10", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(p for p in (E2E_DIR, os.environ.get("PYTHONPATH")) if p))
    workers: list[tuple[str, subprocess.Popen, str]] = []
    handler = _LogRecords()
    loggers = [logging.getLogger(n) for n in ("celery", "kombu", "amqp")]
    for lg in loggers:
        lg.addHandler(handler)
    app = None
    t0 = time.monotonic()
    try:
        for i in range(1, a.celery_workers + 1):
            name = f"w{i}-{label}"
            logp = os.path.join(ctx.workdir, f"celery-{name}.log")
            with open(logp, "w") as lf:
                p = subprocess.Popen([sys.executable, "-m", "celery", "-A", "e2e_app", "worker", "--pool", "prefork",
                                      "-c", str(a.celery_concurrency), "-n", f"{name}@%h", "-Q", queue,
                                      "--loglevel", "INFO"],
                                     cwd=E2E_DIR, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            workers.append((name, p, logp))
        app, task = celery_app(broker_url, queue)
        want = {n for n, _, _ in workers}
        seen: set[str] = set()

        def all_answer() -> bool:
            for r in app.control.ping(timeout=1.0):
                seen.update(node.split("@", 1)[0] for node in r)
            return want <= seen or any(p.poll() is not None for _, p, _ in workers)

        if not wait_for(f"{label}: every Celery worker answers ping", all_answer, 120, interval=0.5) \
                or not want <= seen:
            led.ok_setup = False
            led.setup_error = f"workers not ready: answered {sorted(seen)} of {sorted(want)}; " \
                              f"exited {[n for n, p, _ in workers if p.poll() is not None]}"
            return led
        log(f"{label}: {len(workers)} workers x {a.celery_concurrency} prefork children ready after "
            f"{time.monotonic() - t0:.1f}s; {a.celery_tasks} tasks over {a.celery_duration:.0f}s, "
            f"{a.celery_producers} producer threads, queue {queue}")

        n, k = a.celery_tasks, a.celery_producers
        t_ref: list[float] = []
        start = time.monotonic()
        deadline = start + a.celery_duration + a.celery_result_grace
        producers = [CeleryProducer(task, list(range(i, n, k)), len(range(i, n, k)) / a.celery_duration,
                                    a.celery_window, deadline, t_ref, f"producer-{label}-{i}", a.celery_task_ms)
                     for i in range(k)]
        for p in producers:
            p.start()
        sent = lambda: sum(p.attempts for p in producers)  # noqa: E731
        wait_for(f"{label}: 30% of the tasks sent", lambda: sent() >= n * 0.3 or all(p.done.is_set() for p in producers),
                 a.celery_duration * 3)
        led.sent_at_kill = sent()
        log(f"{label}: kill -9 {', '.join(kill)} ({led.sent_at_kill} of {n} tasks sent)")
        if before_kill:
            before_kill()
        threads = [threading.Thread(target=ctx.rabbit.kill, args=(node,)) for node in kill]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_ref.append(time.monotonic())
        time.sleep(3)
        log(f"{label}: restarting {', '.join(kill)}")
        t = time.monotonic()
        threads = [threading.Thread(target=ctx.rabbit.start, args=(node,)) for node in kill]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        led.restart_secs = time.monotonic() - t
        led.sent_when_back = sent()
        log(f"{label}: {', '.join(kill)} back after {led.restart_secs:.1f}s ({led.sent_when_back} tasks sent)")
        for p in producers:
            p.join(max(1.0, deadline + 30 - time.monotonic()))
        stuck = [p.name for p in producers if p.is_alive()]
        if stuck:
            led.errors.append(f"producer threads still running at the deadline: {stuck}")

        def lines() -> list[str]:
            try:
                with open(out) as f:
                    return f.read().splitlines()
            except FileNotFoundError:
                return []

        # Late executions (a redelivery racing the producer's last get()) are counted too.
        last, since = -1, time.monotonic()
        end = time.monotonic() + 20
        while time.monotonic() - since < 3 and time.monotonic() < end:
            cur = len(lines())
            if cur != last:
                last, since = cur, time.monotonic()
            time.sleep(0.5)
        led.duration = time.monotonic() - start

        sent_ids = {tid: x for p in producers for tid, x in p.sent.items()}
        results = {tid: v for p in producers for tid, v in p.results.items()}
        led.calls = sum(p.attempts for p in producers)
        led.sent = len(sent_ids)
        led.delay_errors = led.calls - led.sent
        led.longest_delay = max(p.longest_delay for p in producers)
        runs: dict[str, list[int]] = {}
        for ln in lines():
            parts = ln.split()
            if len(parts) == 4:
                runs.setdefault(parts[0], []).append(int(parts[3]))
        led.executions = sum(len(v) for v in runs.values())
        led.ran = len(set(runs) & set(sent_ids))
        led.never_ran = len(set(sent_ids) - set(runs))
        led.unknown = len(set(runs) - set(sent_ids))
        for flags in runs.values():
            extra = len(flags) - 1
            led.reruns += extra
            led.reruns_redelivered += min(extra, sum(flags))
            led.first_runs_redelivered += extra == 0 and flags[0] == 1
        led.results = sum(1 for tid in sent_ids if tid in results)
        led.results_missing = led.sent - led.results
        led.wrong_results = sum(1 for tid, v in results.items() if v != 2 * sent_ids.get(tid, -1))
        errors = [e for p in producers for e in p.errors]
        led.get_errors = sum(" get() " in e for e in errors)
        led.errors += errors
        if led.never_ran:
            missing = sorted(set(sent_ids) - set(runs))
            led.errors.append(f"never ran: {len(missing)} tasks, e.g. args {[sent_ids[m] for m in missing[:8]]}")
    except Exception as e:  # noqa: BLE001
        led.ok_setup = False
        led.setup_error = f"{e!r}"
        led.errors.append(traceback.format_exc(limit=4))
    finally:
        for _, p, _ in workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        for name, p, _ in workers:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                led.errors.append(f"worker {name} did not stop within 30 s of SIGTERM")
        for name, p, logp in workers:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # strays of the pool (the worker is the session leader)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(timeout=10)
            led.worker_exit.append(p.returncode)
            try:
                with open(logp, errors="replace") as f:
                    text = f.read()
                for m in re.finditer(r"[Cc]onnection to broker lost\.[^(\n]*\(?([^\n]*)", text):
                    led.worker_conn_lost += 1
                    why = re.match(r"(\w+)\((\d+), ['\"]([^'\"]*)", m.group(1))
                    led.worker_lost_why[f"{why.group(1)}({why.group(2)}, {why.group(3)[:60]!r})" if why
                                        else m.group(1)[:80]] += 1
                led.worker_task_errors += len(re.findall(r"\] Task \S+ raised unexpected", text))
                led.worker_fatal += [f"{name}: {ln.split('] ', 1)[-1][:200]}" for ln in text.splitlines()
                                     if "Unrecoverable error" in ln]
            except OSError:
                pass
        for lg in loggers:
            lg.removeHandler(handler)
        led.warnings = handler.lines
        led.producer_warnings = len(handler.lines)
        if app is not None:
            try:
                with app.connection_for_write() as conn:
                    conn.default_channel.queue_delete(queue)
            except Exception as e:  # noqa: BLE001
                log(f"{label}: could not delete {queue}: {e!r}")
            try:
                app.close()
            except Exception:  # noqa: BLE001
                pass
    return led


def celery_side_by_side(ledgers: list[CeleryLedger]) -> str:
    rows = [
        ("tasks: delay() calls", lambda l: l.calls),
        ("  delay() raised", lambda l: l.delay_errors),
        ("  longest delay() call", lambda l: f"{l.longest_delay:.2f}s"),
        ("ran at least once", lambda l: l.ran),
        ("  never ran", lambda l: l.never_ran),
        ("executions", lambda l: l.executions),
        ("  re-runs (redelivered / not)", lambda l: f"{l.reruns} ({l.reruns_redelivered} / {l.reruns - l.reruns_redelivered})"),
        ("  first runs marked redelivered", lambda l: l.first_runs_redelivered),
        ("  unknown task ids", lambda l: l.unknown),
        ("results received by get()", lambda l: l.results),
        ("  results missing", lambda l: l.results_missing),
        ("  get() raised", lambda l: l.get_errors),
        ("  wrong results", lambda l: l.wrong_results),
        ("worker 'connection to broker lost'", lambda l: l.worker_conn_lost),
        ("worker 'Task ... raised unexpected'", lambda l: l.worker_task_errors),
        ("worker 'Unrecoverable error' (exited)", lambda l: len(l.worker_fatal)),
        ("producer warnings (celery/kombu log)", lambda l: l.producer_warnings),
        ("kill at / back at (tasks sent)", lambda l: f"{l.sent_at_kill} / {l.sent_when_back}"),
        ("node restart", lambda l: f"{l.restart_secs:.1f}s"),
        ("duration (first delay() to settled)", lambda l: f"{l.duration:.0f}s"),
    ]
    cells = [[name] + [("setup failed" if not l.ok_setup and i == 0 else str(f(l))) for l in ledgers]
             for i, (name, f) in enumerate(rows)]
    head = ["ledger"] + [l.label for l in ledgers]
    widths = [max(len(r[i]) for r in cells + [head]) for i in range(len(head))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in cells])


def scenario_celery_kill_node(ctx: Ctx) -> Result:
    """Celery (prefork workers, acks_late, confirm_publish, rpc:// results) through warren with
    shard-a, shard-b and the two-node control-ha as its control cluster; shard-a-1 and
    control-ha-1, the nodes under the links, killed with SIGKILL while tasks flow, then
    restarted. Every task must run, every result must reach the producer, and no exception may
    reach the application. Then the same workload directly against shard-b through a kombu
    failover URL of its two nodes, shard-b-1 killed: the reference, reported only."""
    res = Result("celery-kill-node")
    a = ctx.args
    t0 = time.monotonic()
    ensure_whole(ctx, "shard-a", res)
    ensure_whole(ctx, HA_CONTROL, res)
    nodes = ctx.rabbit.nodes
    proxy = Proxy(ctx.binary, ctx.workdir, "celery-proxy", [("shard-a", "shard", nodes("shard-a")),
                                                              ("shard-b", "shard", nodes("shard-b")),
                                                              ("control", "control", nodes(HA_CONTROL))])
    killed_at: list[int] = []  # proxy log offset just before the kill
    try:
        m0 = proxy.metrics()
        led = celery_run(ctx, "warren", f"amqp://guest:guest@{proxy.addr}//", ["shard-a-1", f"{HA_CONTROL}-1"],
                         before_kill=lambda: killed_at.append(len(strip_ansi(proxy.log_text()))))
        m1 = proxy.metrics()
        text = strip_ansi(proxy.log_text())
    finally:
        proxy.stop()
    before, after = (text[:killed_at[0]], text[killed_at[0]:]) if killed_at else (text, "")

    def links(part: str, cluster: str) -> Counter:
        out: Counter = Counter()
        for line in part.splitlines():
            if "link opened" in line and f"cluster={cluster}" in line:
                m = re.search(r"node=(\S+)", line)
                if m:
                    out[m.group(1)] += 1
            elif "connection opened" in line:
                out.update(re.findall(rf'"{re.escape(cluster)}@([^"]+)"', line))
        return out

    a1, c1 = ctx.rabbit.node_addr("shard-a-1"), ctx.rabbit.node_addr(f"{HA_CONTROL}-1")
    a2, c2 = ctx.rabbit.node_addr("shard-a-2"), ctx.rabbit.node_addr(f"{HA_CONTROL}-2")
    la, lc = links(before, "shard-a"), links(before, "control")
    closes = [ln for ln in after.splitlines() if "closing the client connection" in ln]
    lost_lines = [ln for ln in after.splitlines() if "upstream link lost" in ln]
    unavailable = [ln for ln in text.splitlines() if "became unavailable" in ln]
    la2, lc2 = links(after, "shard-a"), links(after, "control")

    def delta(k: str) -> float:
        return m1.get(k, 0) - m0.get(k, 0)

    if not led.ok_setup:
        res.check("the Celery run through warren ran", False, led.setup_error)
    res.check("before the kill, the links were on the nodes killed (shard-a-1, control-ha-1)",
              bool(la) and bool(lc) and set(la) == {a1} and set(lc) == {c1},
              f"shard-a links {dict(la)}, control links {dict(lc)}")
    res.check("after the kill, links reopened on the other nodes", la2[a2] > 0 and lc2[c2] > 0,
              f"shard-a {dict(la2)}, control {dict(lc2)}")
    res.check("the kill happened while tasks were flowing",
              0 < led.sent_at_kill < led.calls and led.sent_when_back > led.sent_at_kill,
              f"{led.sent_at_kill} sent at the kill, {led.sent_when_back} when the nodes were back, of {led.calls}")
    res.check("every task ran at least once", led.ok_setup and led.never_ran == 0 and led.ran == a.celery_tasks,
              f"{led.ran} of {a.celery_tasks} ran; {led.reruns} re-runs ({led.reruns_redelivered} marked redelivered)")
    res.check("every result reached the producer (get() returned 2x)",
              led.ok_setup and led.results == a.celery_tasks and led.wrong_results == 0,
              f"{led.results} of {a.celery_tasks}; wrong {led.wrong_results}")
    app_errors = [e for e in led.errors if " delay(" in e or " get() " in e]
    res.check("no exception reached the application (delay() and get())",
              led.ok_setup and led.delay_errors == 0 and led.get_errors == 0 and not app_errors,
              f"delay() raised {led.delay_errors}, get() raised {led.get_errors}" +
              (": " + "; ".join(app_errors[:3]) if app_errors else ""))
    res.check("no execution of an unknown task id", led.unknown == 0, str(led.unknown))
    res.check("workers stopped cleanly (warm shutdown, exit 0)", all(rc == 0 for rc in led.worker_exit),
              str(led.worker_exit))
    res.check("no 541 'cluster(s) for this request became unavailable' in the proxy log", not unavailable,
              unavailable[0][:300] if unavailable else "")
    res.published, res.confirmed = led.calls, led.sent
    res.received = led.ran
    res.lost = led.never_ran + led.results_missing
    res.duplicates, res.unexpected, res.in_doubt = led.reruns, led.unknown, led.delay_errors
    res.notes.append(
        f"ledger: {led.calls} delay() calls, {led.sent} returned, {led.ran} ran, {led.never_ran} never ran, "
        f"{led.results} results, {led.results_missing} missing, get() raised {led.get_errors}")
    res.notes.append(f"duplicates {led.reruns}: {led.reruns_redelivered} re-runs marked redelivered (acks_late "
                     f"tasks requeued when a connection died), {led.reruns - led.reruns_redelivered} not marked")
    res.notes.append(
        "proxy: {} 'upstream link lost', {} client connections closed with 320 (state RabbitMQ deleted), link "
        "failures shard-a {:.0f} control {:.0f}, republished {:.0f}, dropped {:.0f}".format(
            len(lost_lines), len(closes), delta('warren_cluster_link_failures_total{cluster="shard-a"}'),
            delta('warren_cluster_link_failures_total{cluster="control"}'), delta("warren_republished_total"),
            delta("warren_dropped_total")))
    for ln in closes[:3]:
        res.notes.append("proxy log: " + ln.strip()[:300])
    for e in led.errors[:6]:
        res.notes.append("client error: " + e.strip().replace("\n", " | ")[:400])

    ledgers = [led]
    if a.celery_direct:
        ok, detail = cluster_whole(ctx, "shard-b")
        if not ok:
            res.notes.append(f"reference: shard-b not whole before the direct run ({detail})")
        url = ";".join(f"amqp://guest:guest@{n}//" for n in nodes("shard-b"))
        ref = celery_run(ctx, "direct", url, ["shard-b-1"])
        ref.label = "direct (failover URL)"
        ledgers.append(ref)
        if not ref.ok_setup:
            res.notes.append(f"reference run did not complete: {ref.setup_error}")
        for e in ref.errors[:4]:
            res.notes.append("reference (direct) client error: " + e.strip().replace("\n", " | ")[:400])
        for w in ref.warnings[:3]:
            res.notes.append("reference (direct) producer log: " + w)
    led.label = "through warren"
    table_text = celery_side_by_side(ledgers)
    log("celery-kill-node ledgers (through warren: the test; direct: the reference, informational):\n" + table_text)
    res.notes.append("ledgers side by side (through warren: the test; direct: reference, informational):\n"
                     + "\n".join("      " + ln for ln in table_text.splitlines()))
    for w in led.warnings[:3]:
        res.notes.append("through warren, producer log: " + w)
    for lg in ledgers:
        if lg.worker_lost_why:
            res.notes.append(f"{lg.label}: the workers' connections lost: "
                             + "; ".join(f"{n} x {why}" for why, n in lg.worker_lost_why.most_common()))
        for ln in lg.worker_fatal[:2]:
            res.notes.append(f"{lg.label}: worker died: {ln}")
    res.duration = time.monotonic() - t0
    return res


SCENARIOS = {
    "kill-node-tx": scenario_kill_node_tx,
    "kill-node-one-shard": scenario_kill_node_one_shard,
    "kill-node": scenario_kill_node,
    "kill-cluster": scenario_kill_cluster,
    "partial-publish": scenario_partial_publish,
    "memory-alarm": scenario_memory_alarm,
    "sigstop": scenario_sigstop,
    "limits": scenario_limits,
    "celery-kill-node": scenario_celery_kill_node,
}


# =============================================================================================


def fmt(v) -> str:
    return "-" if v is None else str(v)


def summary(results: list[Result]) -> str:
    out = [table(results)]
    for r in results:
        out.append("")
        out.append(f"{r.scenario}:")
        for c in r.checks:
            out.append(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}{': ' + c.detail if c.detail else ''}")
        for n in r.notes:
            out.append(f"  - {n}")
    return "\n".join(out)


def table(results: list[Result]) -> str:
    hdr = ["scenario", "published", "confirmed", "received", "lost", "dups", "unexpected", "in doubt",
           "duration", "checks"]
    rows = []
    for r in results:
        passed = sum(c.ok for c in r.checks)
        rows.append([r.scenario, fmt(r.published), fmt(r.confirmed), fmt(r.received), fmt(r.lost),
                     fmt(r.duplicates), fmt(r.unexpected), fmt(r.in_doubt), f"{r.duration:.0f}s",
                     f"{'PASS' if r.ok else 'FAIL'} {passed}/{len(r.checks)}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(hdr), line(["-" * w for w in widths])] + [line(r) for r in rows])


def failure_report(results: list[Result], missing: list[str]) -> str:
    """For every failed scenario: its ledger, the checks that failed and the first client errors."""
    out = []
    for r in results:
        if r.ok:
            continue
        out.append(f"FAIL {r.scenario}: ledger published {fmt(r.published)}, confirmed {fmt(r.confirmed)}, "
                   f"received {fmt(r.received)}, LOST {fmt(r.lost)}, DUPLICATES {fmt(r.duplicates)}, "
                   f"UNEXPECTED {fmt(r.unexpected)}, in doubt {fmt(r.in_doubt)}")
        for c in r.checks:
            if not c.ok:
                out.append(f"    failed: {c.name}{': ' + c.detail.splitlines()[0][:400] if c.detail else ''}")
        for n in r.notes:
            if n.startswith(("ledger:", "duplicates", "proxy:", "client error:", "lost messages:")):
                out.append(f"    {n.split(' | Traceback', 1)[0][:400]}")
    for name in missing:
        out.append(f"FAIL {name}: did not run (an earlier scenario stopped the run)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warren", required=True, help="the proxy binary (copied for the run)")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: 20,000 messages per workload")
    ap.add_argument("--messages", type=int, help="messages of the kill-node / kill-cluster workloads "
                    "(sigstop and memory-alarm use --small-fraction of it); default 100,000, 20,000 with --quick")
    ap.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help=f"comma-separated, of {ALL_SCENARIOS} "
                    "(default: all)")
    ap.add_argument("--summary-file", help="also write the result table and the failure report to this file "
                    "(scripts/test.sh prints it under its summary)")
    ap.add_argument("--keep", action="store_true", help="leave the clusters running and keep the work dir")
    ap.add_argument("--rabbit-dir", help="RabbitMQ state dir (default /tmp/warren-fault-<random>); an existing "
                    "one with running clusters is reused")
    ap.add_argument("--producers", type=int, help="producers per mode (confirm / no confirm)")
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--pipelined", type=int, default=1, choices=(0, 1),
                    help="add one pipelined confirm producer to each workload (default 1)")
    ap.add_argument("--window", type=int, default=200, help="publishes in flight of the pipelined producer")
    ap.add_argument("--prefetch", type=int, default=100)
    ap.add_argument("--size", type=int, default=200, help="message body bytes")
    ap.add_argument("--duration", type=float, help="seconds a workload is paced to last (at least)")
    ap.add_argument("--outage", type=float, default=30.0, help="kill-cluster: seconds shard-b stays down")
    ap.add_argument("--alarm-secs", type=float, default=8.0, help="memory-alarm: seconds observed under the alarm")
    ap.add_argument("--small-fraction", type=float, default=0.5, help="sigstop / memory-alarm workload = this x --messages")
    ap.add_argument("--rss-slack-mb", type=int, default=64, help="memory-alarm RSS bound over the RSS before the alarm")
    ap.add_argument("--held-limit", type=int, default=1024 * 1024, help="limits: max_held_bytes_per_connection")
    ap.add_argument("--held-messages", type=int, default=400, help="limits: 60 KiB messages pushed at the paused node")
    ap.add_argument("--held-watch", type=float, default=5.0)
    ap.add_argument("--held-rss-slack-mb", type=int, default=24)
    ap.add_argument("--held-pyamqp-defaults", action="store_true",
                    help="limits: keep py-amqp's TCP_USER_TIMEOUT (1 s) on the back-pressured producer "
                    "(reproduces the connection loss and the lost held publishes described in docs/reliability.md)")
    ap.add_argument("--partial-watch", type=float, default=4.0)
    ap.add_argument("--celery-tasks", type=int, help="celery-kill-node: tasks per run (default 4,000; 1,000 with --quick)")
    ap.add_argument("--celery-duration", type=float,
                    help="celery-kill-node: seconds the tasks are paced over (default 60; 25 with --quick)")
    ap.add_argument("--celery-workers", type=int, default=2, help="celery-kill-node: prefork workers")
    ap.add_argument("--celery-concurrency", type=int, default=2, help="celery-kill-node: pool processes per worker")
    ap.add_argument("--celery-producers", type=int, default=2,
                    help="celery-kill-node: application threads calling delay() and get()")
    ap.add_argument("--celery-window", type=int, default=50,
                    help="celery-kill-node: results a producer thread leaves outstanding before it get()s the oldest")
    ap.add_argument("--celery-result-grace", type=float, default=30.0,
                    help="celery-kill-node: seconds after the paced duration that get() waits for the last results")
    ap.add_argument("--celery-task-ms", type=int, default=50,
                    help="celery-kill-node: each task takes a random 0..N ms in the worker, so that tasks are "
                    "running, and their results being published, when the nodes die (default 50; 0: instant)")
    ap.add_argument("--celery-direct", type=int, default=1, choices=(0, 1),
                    help="celery-kill-node: also run the workload directly against shard-b (failover URL of its two "
                    "nodes, shard-b-1 killed) as the reference (default 1)")
    ap.add_argument("--net-ticktime", type=int, default=10,
                    help="Erlang net_ticktime of the nodes (RabbitMQ default 60): how fast shard-a-2 notices a "
                    "SIGSTOPped shard-a-1")
    args = ap.parse_args()
    if args.messages is None:
        args.messages = 20_000 if args.quick else 100_000
    if args.producers is None:
        args.producers = 3 if args.quick else 4
    if args.duration is None:
        args.duration = 45.0 if args.quick else 120.0
    if args.celery_tasks is None:
        args.celery_tasks = 1_000 if args.quick else 4_000
    if args.celery_duration is None:
        args.celery_duration = 25.0 if args.quick else 60.0
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {ALL_SCENARIOS}")

    workdir = tempfile.mkdtemp(prefix="warren-fault-run-")
    binary = os.path.join(workdir, "warren")
    shutil.copy2(args.warren, binary)
    rabbit_dir = args.rabbit_dir or f"/tmp/warren-fault-{rand_id(8)}"
    rabbit = Rabbit(rabbit_dir, args.net_ticktime)
    proxy: Proxy | None = None
    results: list[Result] = []

    def on_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    log(f"work dir {workdir}; RabbitMQ state dir {rabbit_dir}; scenarios {scenarios}; "
        f"{args.messages} messages; {args.producers}+{args.producers} producers; paced >= {args.duration:.0f}s")
    try:
        t = time.monotonic()
        rabbit.up_all(ha_control="celery-kill-node" in scenarios)
        log(f"clusters up in {time.monotonic() - t:.0f}s: {rabbit.clusters}")
        proxy = Proxy(binary, workdir, "proxy", [("shard-a", "shard", rabbit.nodes("shard-a")),
                                                  ("shard-b", "shard", rabbit.nodes("shard-b")),
                                                  ("control", "control", rabbit.nodes("control"))])
        ctx = Ctx(args, rabbit, proxy, workdir, binary)
        for name in scenarios:
            log(f"=== {name}")
            try:
                r = SCENARIOS[name](ctx)
            except Exception as e:  # noqa: BLE001
                r = Result(name)
                r.check("scenario ran to the end", False, f"{e!r}")
                r.notes.append(traceback.format_exc())
            if not proxy.alive():
                r.check("proxy process alive", False, f"exit code {proxy.proc.returncode}; see {proxy.log_path}")
            results.append(r)
            log(f"=== {name}: {'PASS' if r.ok else 'FAIL'} in {r.duration:.0f}s")
            if not proxy.alive():
                break
    except KeyboardInterrupt as e:
        log(f"interrupted: {e}")
    except Exception as e:  # noqa: BLE001 - setup failed (clusters, proxy): report, tear down
        log(f"setup failed: {e!r}")
        r = Result("setup")
        r.check("clusters and proxy started", False, repr(e)[:500])
        results.append(r)
    finally:
        if proxy:
            proxy.stop()
            text = strip_ansi(proxy.log_text()) if not proxy.logf.closed else open(proxy.log_path, errors="replace").read()
            panics = [ln for ln in text.splitlines() if "panicked" in ln]
            if panics and results:
                results[-1].check("no panic in the proxy log", False, panics[0][:300])
        if args.keep:
            log(f"--keep: clusters still running (WARREN_RABBIT_DIR={rabbit_dir} scripts/rabbit.sh down-all); "
                f"work dir {workdir}")
        else:
            log("tearing down the clusters")
            rabbit.down_all()
            shutil.rmtree(rabbit_dir, ignore_errors=True)
    print()
    print(summary(results))
    print(f"\nproxy logs: {workdir}" + ("" if args.keep else " (kept only on failure)"))
    all_ok = bool(results) and all(r.ok for r in results) and len(results) == len(scenarios)
    ran = {r.scenario for r in results}
    report = failure_report(results, [s for s in scenarios if s not in ran])
    total = time.monotonic() - T0
    if report:
        print("\n" + report)
    if args.summary_file:
        try:
            with open(args.summary_file, "w") as f:
                f.write(table(results) + "\n")
                f.write(f"total {total:.0f}s; {sum(r.ok for r in results)} of {len(scenarios)} scenarios passed; "
                        f"{args.messages} messages per node-failure workload; proxy logs {workdir}"
                        + ("\n" if all_ok else " (kept)\n"))
                if report:
                    f.write(report + "\n")
        except OSError as e:
            log(f"could not write {args.summary_file}: {e}")
    if all_ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print("RESULT:", "PASS" if all_ok else "FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
