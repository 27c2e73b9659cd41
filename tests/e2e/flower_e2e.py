"""Flower's broker tab through warren, with Flower's own code.

    python tests/e2e/flower_e2e.py WARREN_BIN [WARREN_LOG]

Flower reads queue depths from RabbitMQ's management API (`--broker_api`). Pointed at one shard
cluster it shows that cluster's share of each queue. This starts its own warren in front of
shard-a, shard-b and control of WARREN_TEST_CLUSTERS, with `management` set for the shard
clusters from WARREN_TEST_MANAGEMENT (scripts/test.sh exports both), publishes to a fresh queue
through it (warren spreads the messages over both shard clusters), holds one delivery
unacknowledged, and asks Flower's `flower.utils.broker.Broker` for the queue:

- pointed at each shard cluster's management API (one share each),
- pointed at warren's admin endpoint (`http://ADMIN/api/`).

Checks that warren's answer is what one broker holding the whole queue would give: messages,
messages_ready and messages_unacknowledged are the sums of the clusters' shares, consumers the
client's one consumer. Exits 0 when every check holds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pika
from flower.utils.broker import Broker
from tornado.ioloop import IOLoop
from warren_admin import free_port

FAILED = 0
MESSAGES = 20


def check(ok: bool, what: str) -> None:
    global FAILED
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILED += 1


def env_map(var: str) -> dict[str, list[str]]:
    """'name=a,b;name2=c,d' as {name: [a, b], ...}."""
    out = {}
    for part in os.environ.get(var, "").split(";"):
        if "=" in part:
            name, values = part.split("=", 1)
            out[name] = values.split(",")
    return out


def flower_queue(http_api: str, broker_host: str, queue: str) -> dict | None:
    """What Flower's broker tab shows for `queue`, with Flower's own code."""
    broker = Broker(f"amqp://guest:guest@{broker_host}//", http_api=http_api)
    found = IOLoop.current().run_sync(lambda: broker.queues([queue]), timeout=10)
    return found[0] if found else None


def start_warren(binary: str, clusters: dict, management: dict, log_path: str) -> tuple[subprocess.Popen, str, str]:
    port, admin = free_port(), free_port()
    text = f'listen = "127.0.0.1:{port}"\n\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
    for name, role in (("shard-a", "shard"), ("shard-b", "shard"), ("control", "control")):
        nodes = ", ".join(f'"{n}"' for n in clusters[name])
        text += f'\n[[clusters]]\nname = "{name}"\nrole = "{role}"\nnodes = [{nodes}]\n'
        if role == "shard":
            text += f'management = {{ url = "{management[name][0]}", user = "guest", password = "guest" }}\n'
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(text)
    cfg.close()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "--config", cfg.name], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}", f"127.0.0.1:{admin}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("warren did not start")


def main(binary: str, log_path: str) -> int:
    clusters, management = env_map("WARREN_TEST_CLUSTERS"), env_map("WARREN_TEST_MANAGEMENT")
    if not all(c in management for c in ("shard-a", "shard-b")):
        print("flower_e2e: WARREN_TEST_MANAGEMENT names no management API for shard-a and shard-b")
        return 1
    proc, proxy, admin = start_warren(binary, clusters, management, log_path)
    queue = f"flower-e2e-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@{proxy}/%2F"))
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.confirm_delivery()
        for i in range(MESSAGES):
            ch.basic_publish("", queue, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
        # One delivery held unacknowledged by a consumer with prefetch 1 (per cluster).
        ch.basic_qos(prefetch_count=1)
        held = []
        ch.basic_consume(queue, lambda c, m, p, b: held.append(m.delivery_tag))
        # Each shard cluster holds one delivery (prefetch 1 applies per cluster): wait for both,
        # so that no delivery moves a message from ready to unacknowledged while the clusters'
        # APIs and warren's are asked one after the other.
        deadline = time.time() + 10
        while len(held) < 2 and time.time() < deadline:
            conn.process_data_events(time_limit=0.1)

        direct = {}
        through = None
        # The management API refreshes its statistics every second on the test clusters, but a
        # cluster under load may go on answering for a queue without its message counts (seen
        # for 30 s on a busy CI machine), and each cluster's statistics refresh on their own
        # clock, so the clusters and warren are asked again until every count agrees (they agree
        # within a few seconds on an idle machine), for up to 60 s.
        deadline = time.time() + 60
        while time.time() < deadline:
            conn.process_data_events(time_limit=0.5)
            direct = {
                name: flower_queue(f"http://guest:guest@{management[name][0].split('//', 1)[1]}/api/", clusters[name][0], queue)
                for name in ("shard-a", "shard-b")
            }
            through = flower_queue(f"http://{admin}/api/", proxy, queue)
            shares = [d for d in direct.values() if d]
            total = sum(d.get("messages") or 0 for d in shares)
            agree = through is not None and all(
                through.get(k) == sum(d.get(k) or 0 for d in shares)
                for k in ("messages", "messages_ready", "messages_unacknowledged"))
            if len(shares) == 2 and total == MESSAGES and agree:
                break
            time.sleep(1)
        keys = ("messages", "messages_ready", "messages_unacknowledged", "consumers")
        shown = {n: {k: d.get(k) for k in keys} if d else None for n, d in direct.items()}
        print(f"  direct, per shard cluster: {shown}")
        print(f"  through warren: {through}")
        shares = [d for d in direct.values() if d]
        check(len(shares) == 2, "each shard cluster's own API has the queue")
        counted = [d for d in shares if d.get("messages") is not None]
        check(all(0 < d["messages"] < MESSAGES for d in counted),
              "each shard cluster's own API shows a share of the queue, not all of it")
        check(through is not None, "Flower finds the queue through warren's admin endpoint")
        if through is not None and len(counted) == 2:
            for key in ("messages", "messages_ready", "messages_unacknowledged"):
                want = sum(d.get(key, 0) for d in shares)
                check(through.get(key) == want, f"{key} through warren is the clusters' sum ({through.get(key)} = {want})")
            check(through.get("messages") == MESSAGES, f"messages is every message published ({MESSAGES})")
            check(through.get("messages_unacknowledged", 0) >= 1, "the held delivery counts as unacknowledged")
        elif through is not None:
            # A cluster's API never gave its counts, so there is no sum to compare with. warren
            # asks the same APIs: a count it could not learn must be left out (Flower then shows
            # N/A), never given too low.
            print(f"  note: {2 - len(counted)} shard cluster(s) gave no message counts within 60 s")
            check(through.get("messages") in (None, MESSAGES),
                  f"messages through warren is every message published or left out ({through.get('messages')})")
            unacked = through.get("messages_unacknowledged")
            check(unacked is None or unacked >= 1,
                  f"messages_unacknowledged through warren counts the held delivery or is left out ({unacked})")
        if through is not None:
            check(through.get("consumers") == 1, "consumers is the client's one consumer, as on one broker")
        ch.queue_delete(queue)
    finally:
        try:
            conn.close()
        except Exception:
            pass
        proc.terminate()
        proc.wait(timeout=15)
        if FAILED or sys.exc_info()[0] is not None:
            with open(log_path, errors="replace") as log:
                lines = log.read().splitlines()
            print(f"  warren's log ({log_path}), its last lines:")
            for line in lines[-15:]:
                print(f"    {line}")
    print(f"flower_e2e: {'PASS' if FAILED == 0 else f'{FAILED} FAILED'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    log_file = sys.argv[2] if len(sys.argv) > 2 else os.path.join(tempfile.mkdtemp(prefix="flower-e2e-"), "warren.log")
    sys.exit(main(sys.argv[1], log_file))
