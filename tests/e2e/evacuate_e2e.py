#!/usr/bin/env python3
"""Cluster evacuation end to end, with a SIGKILL of warren halfway and a ledger of every message.

    python tests/e2e/evacuate_e2e.py WARREN_BIN --shard-a H:P,H:P --shard-b H:P,H:P \\
        --control H:P,H:P [--messages 20000] [--queues 20] [--rate 5000]

The clusters' management APIs are taken at each first node's AMQP port + 10000 (as
scripts/rabbit.sh runs them). Starts warren (the real binary) with a config file of its own in a
temporary directory (which is also its state_dir), then:

  1. declares --queues durable queues through warren (so they exist on every cluster), and
     publishes --messages persistent messages straight to shard-a's first node, spread over the
     queues, with no consumer anywhere: the backlog a drain alone would never move. Each message
     carries its id in the body, as message_id and in a header, and a priority, so that the
     consumer can check that its properties arrived unchanged;
  2. starts two publishers that keep publishing through warren in confirm mode (ids p0-N, p1-N;
     they reconnect when warren goes away and only confirmed ids are owed);
  3. POST /clusters/shard-a/evacuate; when GET /clusters says about half the messages moved,
     SIGKILLs warren, starts it again on the same file, and waits until every queue on shard-a is
     empty (passive declares on shard-a's node, and its management API) and the evacuation says
     there is nothing left;
  4. stops the publishers and consumes everything through warren.

Checks: every seeded id and every confirmed publisher id received (none lost), no id that was
never published, duplicates at most the possible duplicates warren counted (GET /clusters and
warren_evacuate_duplicates_total, before and after the kill), properties unchanged, shard-a
empty at the end, the evacuation resumed after the restart without a new POST. Prints a ledger
table; exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter

import amqp

import warren_admin
from warren_admin import eventually, free_port

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[evacuate_e2e {time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Checks:
    def __init__(self) -> None:
        self.items: list[tuple[bool, str, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append((bool(ok), name, detail))
        log(f"  [{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
        return bool(ok)


def nodes(arg: str) -> list[tuple[str, int]]:
    out = []
    for part in arg.split(","):
        host, port = part.rsplit(":", 1)
        out.append((host, int(port)))
    return out


def config_text(args, amqp_port: int, admin_port: int, vhost: str) -> str:
    def cluster(name: str, role: str, arg: str, api: bool) -> str:
        ns = nodes(arg)
        text = f'[[clusters]]\nname = "{name}"\nrole = "{role}"\n'
        text += "nodes = [" + ", ".join(f'"{h}:{p}"' for h, p in ns) + "]\n"
        if api:
            h, p = ns[0]
            text += (f'management = {{ url = "http://{h}:{p + 10000}", user = "guest", password = "guest", '
                     f'vhosts = ["{vhost}"] }}\n')
        return text + "\n"

    return (
        f'listen = "127.0.0.1:{amqp_port}"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n\n'
        f"[limits]\nevacuate_rate = {args.rate}\n\n"
        + cluster("shard-a", "shard", args.shard_a, True)
        + cluster("shard-b", "shard", args.shard_b, True)
        + cluster("control", "control", args.control, False)
    )


class Warren:
    def __init__(self, binary: str, path: str, logpath: str) -> None:
        self.binary, self.path, self.logpath = binary, path, logpath
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        logf = open(self.logpath, "a")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        self.proc = subprocess.Popen([self.binary, "--config", self.path], stdout=logf, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def clusters(admin: int) -> dict:
    return json.loads(warren_admin.admin_get(admin, "/clusters"))


def evacuation(admin: int) -> dict:
    for c in clusters(admin)["clusters"]:
        if c["name"] == "shard-a":
            return c.get("evacuation") or {}
    return {}


def post(admin: int, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# The test's own vhost, on every cluster: the evacuator lists the vhosts of `management.vhosts`,
# so queues other parts of the suite left on shard-a (some only there, some held by nothing)
# are not part of this evacuation.
VHOST = "evac-" + uuid.uuid4().hex[:8]


def api(node: tuple[str, int], method: str, path: str, body: dict | None = None):
    """A call to the management API of the cluster whose first node is `node` (AMQP port + 10000)."""
    host, port = node
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{host}:{port + 10000}{path}", data=data, method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read()
    return json.loads(text) if text else None


def vhost_path() -> str:
    return urllib.parse.quote(VHOST, safe="")


def connect(host: str, port: int, confirm: bool = False) -> amqp.Connection:
    c = amqp.Connection(f"{host}:{port}", userid="guest", password="guest", confirm_publish=confirm,
                        connect_timeout=5, heartbeat=0, virtual_host=VHOST)
    c.connect()
    return c


def depths(node: tuple[str, int], queues: list[str]) -> dict[str, int]:
    """Ready messages per queue on one cluster's node (passive declares)."""
    c = connect(*node)
    try:
        ch = c.channel()
        out = {}
        for q in queues:
            out[q] = ch.queue_declare(q, passive=True).message_count
        return out
    finally:
        c.close()


def api_messages(node: tuple[str, int], queues: list[str]) -> int:
    """Ready + unacknowledged messages of the queues on the cluster, from its management API."""
    listed = api(node, "GET", f"/api/queues/{vhost_path()}?columns=name,messages") or []
    wanted = set(queues)
    return sum(int(q.get("messages") or 0) for q in listed if q["name"] in wanted)


class Publisher(threading.Thread):
    """Publishes through warren in confirm mode, one publish at a time, reconnecting when warren
    goes away; `confirmed` are the ids warren confirmed, `sent` every id tried."""

    def __init__(self, n: int, port: int, queues: list[str], rate: float) -> None:
        super().__init__(daemon=True)
        self.n, self.port, self.queues, self.rate = n, port, queues, rate
        self.confirmed: set[str] = set()
        self.sent: set[str] = set()
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = connect("127.0.0.1", self.port, confirm=True)
                    ch = conn.channel()
                mid = f"p{self.n}-{i}"
                q = self.queues[i % len(self.queues)]
                self.sent.add(mid)
                ch.basic_publish(amqp.Message(mid, message_id=mid, delivery_mode=2, priority=i % 10,
                                              application_headers={"id": mid}), exchange="", routing_key=q)
                self.confirmed.add(mid)
                i += 1
                time.sleep(1 / self.rate)
            except Exception:  # noqa: BLE001 - warren killed on purpose: reconnect
                self.errors += 1
                conn = None
                time.sleep(0.3)
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("warren_bin")
    ap.add_argument("--shard-a", required=True)
    ap.add_argument("--shard-b", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--queues", type=int, default=20)
    ap.add_argument("--rate", type=int, default=5000, help="limits.evacuate_rate of the warren started")
    ap.add_argument("--publish-rate", type=float, default=50, help="per publisher through warren, messages/s")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (config, journal, log)")
    args = ap.parse_args()

    checks = Checks()
    tmp = tempfile.mkdtemp(prefix="warren-evacuate-e2e-")
    amqp_port, admin_port = free_port(), free_port()
    path = os.path.join(tmp, "proxy.toml")
    with open(path, "w") as f:
        f.write(config_text(args, amqp_port, admin_port, VHOST))
    warren = Warren(args.warren_bin, path, os.path.join(tmp, "warren.log"))
    shard_a, shard_b = nodes(args.shard_a)[0], nodes(args.shard_b)[0]
    run = uuid.uuid4().hex[:8]
    queues = [f"evac-{run}-{i:02d}" for i in range(args.queues)]
    publishers: list[Publisher] = []
    figures: dict[str, object] = {}
    everywhere = [nodes(spec)[0] for spec in (args.shard_a, args.shard_b, args.control)]
    try:
        for node in everywhere:
            api(node, "PUT", f"/api/vhosts/{vhost_path()}", {})
            api(node, "PUT", f"/api/permissions/{vhost_path()}/guest",
                {"configure": ".*", "write": ".*", "read": ".*"})
        log(f"vhost {VHOST} on every cluster")
        warren.start()
        if not eventually(lambda: clusters(admin_port)["ready"], 60):
            log("warren did not become ready")
            return 1
        # 1. Queues everywhere, the backlog on shard-a only.
        c = connect("127.0.0.1", amqp_port)
        ch = c.channel()
        for q in queues:
            ch.queue_declare(q, durable=True, auto_delete=False, arguments={"x-max-priority": 10})
        c.close()
        t = time.monotonic()
        c = connect(*shard_a)
        ch = c.channel()
        for i in range(args.messages):
            mid = f"s-{i}"
            ch.basic_publish(amqp.Message(mid, message_id=mid, delivery_mode=2, priority=i % 10,
                                          content_type="text/plain", application_headers={"id": mid, "n": i}),
                             exchange="", routing_key=queues[i % len(queues)])
        c.close()
        seeded_ok = eventually(lambda: sum(depths(shard_a, queues).values()) == args.messages, 60, 0.5)
        checks.check("the backlog is on shard-a", seeded_ok,
                     f"{args.messages} messages in {len(queues)} queues in {time.monotonic() - t:.1f} s")
        if not seeded_ok:
            return 1

        # 2. Publishers through warren.
        publishers = [Publisher(n, amqp_port, queues, args.publish_rate) for n in range(2)]
        for p in publishers:
            p.start()

        # 3. Evacuate, kill halfway, restart.
        status, body = post(admin_port, "/clusters/shard-a/evacuate")
        checks.check("POST /clusters/shard-a/evacuate", status == 200 and body.get("state") == "evacuating",
                     f"{status} {body}")
        t_evac = time.monotonic()
        half = args.messages // 2
        before: dict = {}

        def moved_half() -> bool:
            nonlocal before
            before = evacuation(admin_port)
            return before.get("moved", 0) >= half

        reached = eventually(moved_half, args.timeout, 0.05)
        checks.check("about half moved before the kill", reached, f"moved {before.get('moved')} of {args.messages}")
        dup_before = before.get("possible_duplicates", 0)
        warren.kill()
        t_kill = time.monotonic()
        log(f"SIGKILLed warren at moved={before.get('moved')} ({t_kill - t_evac:.1f} s after the POST)")
        journal = os.path.join(tmp, "evacuate-shard-a.journal")
        if os.path.exists(journal):
            with open(journal) as f:
                entries = [l for l in f if not l.startswith("#")]
            figures["journal entries at the kill"] = len(entries)
        warren.start()
        resumed = eventually(lambda: evacuation(admin_port).get("running") is True, 30, 0.2)
        checks.check("the restarted warren resumes the evacuation by itself", resumed)

        def shard_a_empty() -> bool:
            e = evacuation(admin_port)
            return (e.get("empty") is True and sum(depths(shard_a, queues).values()) == 0
                    and api_messages(shard_a, queues) == 0)

        empty = eventually(shard_a_empty, args.timeout, 1)
        t_done = time.monotonic()
        after = evacuation(admin_port)
        checks.check("shard-a's queues are empty", empty, f"{t_done - t_evac:.1f} s after the POST")
        dup_after = after.get("possible_duplicates", 0)
        dup_metric = warren_admin.metric(admin_port, "warren_evacuate_duplicates_total", cluster="shard-a")
        figures.update({
            "moved before the kill": before.get("moved"),
            "moved after the restart": after.get("moved"),
            "duplicates avoided after the restart": after.get("duplicates_avoided"),
            "possible duplicates (before + after)": dup_before + dup_after,
            "evacuation errors (before + after)": before.get("errors", 0) + after.get("errors", 0),
            "last error": after.get("last_error") or before.get("last_error"),
            "evacuation time (POST to empty, with the restart)": f"{t_done - t_evac:.1f} s",
            "rate over the whole evacuation": f"{args.messages / max(t_done - t_evac, 0.001):.0f} msg/s",
        })
        checks.check("warren_evacuate_duplicates_total matches GET /clusters", dup_metric == dup_after,
                     f"{dup_metric} vs {dup_after}")

        # 4. Stop the publishers; consume everything through warren.
        for p in publishers:
            p.stop.set()
        for p in publishers:
            p.join(15)
        received: Counter = Counter()
        bad_props: list[str] = []
        marked = 0
        c = connect("127.0.0.1", amqp_port)
        ch = c.channel()
        ch.basic_qos(0, 1000, False)

        def on_message(m: amqp.Message) -> None:
            nonlocal marked
            mid = m.body.decode() if isinstance(m.body, bytes) else m.body
            received[mid] += 1
            headers = m.properties.get("application_headers") or {}
            if headers.get("x-warren-redelivered"):
                marked += 1
            if m.properties.get("message_id") != mid or headers.get("id") != mid or m.properties.get("delivery_mode") != 2:
                bad_props.append(mid)
            elif mid.startswith("s-"):
                n = int(mid[2:])
                if m.properties.get("priority") != n % 10 or headers.get("n") != n or m.properties.get("content_type") != "text/plain":
                    bad_props.append(mid)
            ch.basic_ack(m.delivery_tag)

        for q in queues:
            ch.basic_consume(q, callback=on_message)
        last = time.monotonic()
        t_consume = time.monotonic()
        while time.monotonic() - last < 3:
            try:
                c.drain_events(timeout=0.5)
                last = time.monotonic()
            except Exception:  # noqa: BLE001 - socket.timeout: nothing for now
                pass
        c.close()
        consume_s = time.monotonic() - t_consume
        left = {"shard-a": sum(depths(shard_a, queues).values()), "shard-b": sum(depths(shard_b, queues).values())}

        seeded = {f"s-{i}" for i in range(args.messages)}
        confirmed = set().union(*(p.confirmed for p in publishers))
        sent = set().union(*(p.sent for p in publishers))
        lost_seeded = seeded - set(received)
        lost_confirmed = confirmed - set(received)
        unknown = set(received) - seeded - sent
        dups = {k: v for k, v in received.items() if v > 1}
        dup_count = sum(v - 1 for v in dups.values())
        dup_seeded = sum(v - 1 for k, v in dups.items() if k.startswith("s-"))
        counted = dup_before + dup_after

        rows = [
            ("seeded on shard-a", len(seeded)),
            ("published through warren, confirmed", len(confirmed)),
            ("published through warren, not confirmed (warren killed)", len(sent - confirmed)),
            ("received (distinct ids)", len(received)),
            ("received (deliveries)", sum(received.values())),
            ("lost: seeded", len(lost_seeded)),
            ("lost: confirmed", len(lost_confirmed)),
            ("unknown ids", len(unknown)),
            ("duplicates received (all)", dup_count),
            ("duplicates received (seeded)", dup_seeded),
            ("possible duplicates counted by warren", counted),
            ("messages with x-warren-redelivered", marked),
            ("properties changed", len(bad_props)),
            ("publisher reconnects", sum(p.errors for p in publishers)),
            ("left on shard-a / shard-b after consuming", f"{left['shard-a']} / {left['shard-b']}"),
            ("consuming everything through warren", f"{consume_s:.1f} s"),
        ] + [(k, v) for k, v in figures.items()]
        width = max(len(k) for k, _ in rows)
        print("\nledger\n" + "-" * (width + 14))
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print("-" * (width + 14), flush=True)

        checks.check("every seeded message received", not lost_seeded, f"{sorted(lost_seeded)[:5]}")
        checks.check("every confirmed publish received", not lost_confirmed, f"{sorted(lost_confirmed)[:5]}")
        checks.check("no unknown id", not unknown, f"{sorted(unknown)[:5]}")
        # A publisher's own republish after the kill can duplicate one of its ids; the
        # evacuation's duplicates are the seeded ones and the counted ones bound them.
        checks.check("duplicates of moved messages at most the counted possible duplicates",
                     dup_seeded <= counted, f"{dup_seeded} <= {counted}")
        checks.check("properties, headers and priority unchanged", not bad_props, f"{bad_props[:5]}")
        checks.check("nothing left on the clusters", left == {"shard-a": 0, "shard-b": 0}, f"{left}")
    finally:
        for p in publishers:
            p.stop.set()
        warren.stop()
        if args.keep or any(not ok for ok, _, _ in checks.items):
            log(f"kept {tmp} (config, journal, warren.log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        # The vhost (and its queues) removed on every cluster directly (warren is stopped by now).
        for node in everywhere:
            try:
                api(node, "DELETE", f"/api/vhosts/{vhost_path()}")
            except Exception:  # noqa: BLE001
                pass
    failed = [c for c in checks.items if not c[0]]
    log(f"{len(checks.items) - len(failed)} of {len(checks.items)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
