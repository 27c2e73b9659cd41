#!/usr/bin/env python3
"""Hot reload under load: add a shard cluster, then drain it, while clients keep working.

    python tests/e2e/reload_e2e.py WARREN_BIN --shard-a H:P,H:P --shard-b H:P,H:P --control H:P,H:P

1. Starts warren (the real binary) with a config file holding shard-a and control only.
2. Two producers publish continuously in confirm mode (py-amqp, each on its own connection) and
   one consumer acks continuously, all through the proxy, on one durable queue.
3. Edits the config file to add shard-b and sends SIGHUP. Within seconds shard-b must take about
   half of the new publishes (two shard clusters now) and the consumer must receive from it
   (warren's own /metrics, per cluster).
4. Edits the file again to remove shard-b and sends SIGHUP: shard-b gets no new publishes, its
   backlog is consumed to zero (checked on shard-b directly), and the proxy closes its links to it.
5. Stops the producers and checks the ledger: every confirmed message delivered exactly once,
   nothing unexpected, no nack, no client reconnect or channel error.
Exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter

import amqp


def log(msg: str) -> None:
    print(f"[reload_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def config_text(listen: int, admin: int, clusters: list[tuple[str, str, str]]) -> str:
    out = [f'listen = "127.0.0.1:{listen}"', "[admin]", f'listen = "127.0.0.1:{admin}"',
           "[timeouts]", "shutdown_grace_ms = 500", "drain_deadline_secs = 60"]
    for name, role, nodes in clusters:
        node_list = ", ".join(f'"{n}"' for n in nodes.split(","))
        out += ["[[clusters]]", f'name = "{name}"', f'role = "{role}"', f"nodes = [{node_list}]"]
    return "\n".join(out) + "\n"


class Proxy:
    def __init__(self, binary: str, path: str):
        self.path = path
        self.log = open(path + ".log", "w")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen([binary, "--config", path], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def reload(self, text: str) -> None:
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not open")


def metric(admin: int, name: str, cluster: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    m = re.search(rf'^{re.escape(name)}\{{cluster="{re.escape(cluster)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


class Producer(threading.Thread):
    def __init__(self, port: int, queue: str, prefix: str, rate: float):
        super().__init__(daemon=True)
        self.port, self.queue, self.prefix, self.period = port, queue, prefix, 1.0 / rate
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            conn = amqp.Connection(f"127.0.0.1:{self.port}", confirm_publish=True)
            conn.connect()
            ch = conn.channel()
            i = 0
            while not self.stop.is_set():
                mid = f"{self.prefix}-{i}"
                # confirm_publish: basic_publish returns once the broker acked; a nack raises.
                ch.basic_publish(amqp.Message(mid, delivery_mode=2, message_id=mid), routing_key=self.queue)
                self.acked.append(mid)
                i += 1
                time.sleep(self.period)
            conn.close()
        except Exception as e:  # noqa: BLE001 - any failure is a test failure
            self.errors.append(repr(e))


class Consumer(threading.Thread):
    def __init__(self, port: int, queue: str):
        super().__init__(daemon=True)
        self.port, self.queue = port, queue
        self.seen: Counter[str] = Counter()
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            conn = amqp.Connection(f"127.0.0.1:{self.port}", heartbeat=10)
            conn.connect()
            ch = conn.channel()
            ch.basic_qos(0, 50, False)

            def on_message(msg: amqp.Message) -> None:
                self.seen[msg.body if isinstance(msg.body, str) else msg.body.decode()] += 1
                ch.basic_ack(msg.delivery_tag)

            ch.basic_consume(self.queue, callback=on_message)
            while not self.stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    conn.heartbeat_tick()
            conn.close()
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))


def direct_depth(nodes: str, queue: str) -> int:
    host, port = nodes.split(",")[0].rsplit(":", 1)
    c = amqp.Connection(f"{host}:{port}")
    c.connect()
    try:
        return c.channel().queue_declare(queue, passive=True)[1]
    finally:
        c.close()


def eventually(what: str, check, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for: {what}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--shard-a", required=True)
    ap.add_argument("--shard-b", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--rate", type=float, default=150.0, help="messages/s per producer")
    args = ap.parse_args()

    listen, admin = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="warren-reload-")
    path = os.path.join(tmp, "proxy.toml")
    base = [("shard-a", "shard", args.shard_a), ("control", "control", args.control)]
    with open(path, "w") as f:
        f.write(config_text(listen, admin, base))
    proxy = Proxy(args.binary, path)
    failures: list[str] = []
    try:
        wait_port(listen)
        wait_port(admin)
        queue = f"reload-{uuid.uuid4().hex[:8]}"
        c = amqp.Connection(f"127.0.0.1:{listen}")
        c.connect()
        c.channel().queue_declare(queue, durable=True, auto_delete=False)
        c.close()

        producers = [Producer(listen, queue, f"p{k}", args.rate) for k in range(2)]
        consumer = Consumer(listen, queue)
        consumer.start()
        for p in producers:
            p.start()
        time.sleep(3)

        log("adding shard-b to the file, SIGHUP")
        pub_a0 = metric(admin, "warren_publishes_total", "shard-a")
        proxy.reload(config_text(listen, admin, base + [("shard-b", "shard", args.shard_b)]))
        t0 = time.time()
        eventually("publishes reach shard-b", lambda: metric(admin, "warren_publishes_total", "shard-b") > 0, 15)
        log(f"shard-b took its first publish {time.time() - t0:.2f}s after SIGHUP")
        eventually("the consumer receives from shard-b", lambda: metric(admin, "warren_deliveries_total", "shard-b") > 0, 15)
        a1, b1 = metric(admin, "warren_publishes_total", "shard-a"), metric(admin, "warren_publishes_total", "shard-b")
        time.sleep(4)
        a2, b2 = metric(admin, "warren_publishes_total", "shard-a"), metric(admin, "warren_publishes_total", "shard-b")
        share_b = (b2 - b1) / max(1.0, (a2 - a1) + (b2 - b1))
        log(f"share of new publishes on shard-b over 4 s: {share_b:.1%} ({b2 - b1:.0f} of {(a2 - a1) + (b2 - b1):.0f})")
        if not 0.4 <= share_b <= 0.6:
            failures.append(f"shard-b share {share_b:.1%} is not about a half")
        del pub_a0

        log("removing shard-b from the file, SIGHUP")
        proxy.reload(config_text(listen, admin, base))
        time.sleep(1.0)
        b3 = metric(admin, "warren_publishes_total", "shard-b")
        time.sleep(3.0)
        b4 = metric(admin, "warren_publishes_total", "shard-b")
        if b4 != b3:
            failures.append(f"shard-b still took publishes after removal ({b3} -> {b4})")
        eventually("the proxy closes its links to shard-b", lambda: metric(admin, "warren_cluster_links", "shard-b") == 0, 60)
        depth_b = direct_depth(args.shard_b, queue)
        log(f"links to shard-b closed; its queue depth is {depth_b}")
        if depth_b != 0:
            failures.append(f"shard-b backlog not drained: {depth_b} messages left")

        for p in producers:
            p.stop.set()
        for p in producers:
            p.join(timeout=30)
        acked = [m for p in producers for m in p.acked]
        eventually("the consumer receives every confirmed message", lambda: all(consumer.seen[m] for m in acked), 60)
        time.sleep(1)
        consumer.stop.set()
        consumer.join(timeout=10)

        acked_set = set(acked)
        lost = [m for m in acked if consumer.seen[m] == 0]
        dup = {m: n for m, n in consumer.seen.items() if n > 1}
        unexpected = [m for m in consumer.seen if m not in acked_set and not m.startswith("p")]
        log(f"published+confirmed {len(acked)}, received {sum(consumer.seen.values())}, "
            f"lost {len(lost)}, duplicated {len(dup)}, unexpected {len(unexpected)}")
        if lost:
            failures.append(f"lost {len(lost)} confirmed messages, e.g. {lost[:5]}")
        if dup:
            failures.append(f"{len(dup)} messages delivered more than once, e.g. {list(dup.items())[:5]}")
        if unexpected:
            failures.append(f"unexpected messages {unexpected[:5]}")
        for t in producers + [consumer]:
            failures += [f"client error: {e}" for e in t.errors]

        c = amqp.Connection(f"127.0.0.1:{listen}")
        c.connect()
        c.channel().queue_delete(queue)
        c.close()
    except AssertionError as e:
        failures.append(str(e))
    finally:
        code = proxy.stop()
        if code != 0:
            failures.append(f"warren exited with {code}")
        if failures:
            print(open(path + ".log").read()[-4000:])
    if failures:
        for f in failures:
            log(f"FAIL: {f}")
        return 1
    log("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
