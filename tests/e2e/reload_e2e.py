#!/usr/bin/env python3
"""Hot reload under load: add a third shard cluster, drain it, and reject invalid files, while
clients keep working.

    python tests/e2e/reload_e2e.py WARREN_BIN --shard-a H:P,H:P --shard-b H:P,H:P \\
        --shard-c H:P,H:P --control H:P,H:P [--rate N] [--parts add,invalid]

Starts warren (the real binary) with a config file holding shard-a, shard-b and control and an
admin token. Two producers publish continuously in confirm mode (py-amqp, one publish in flight,
each on its own connection) and one consumer acks continuously, all through the proxy, on one
durable queue. Then:

add (issue 4, item 1)
  1. Adds shard-c to the file, without any signal: the proxy notices the change on disk. Within
     seconds shard-c must take about a third (25-42 %) of the new publishes, the consumer must
     receive from it (warren's /metrics, per cluster) and every client connection must have a
     link to it.
  2. Removes shard-c from the file and POSTs /reload: shard-c gets no new publishes, its backlog
     is consumed to zero (checked on shard-c directly), the proxy closes its links to it, and
     everything published to shard-c was delivered from it (deliveries = publishes, per cluster).
  Throughout: no client reconnects (the clients' connections stay up and the proxy's
  warren_client_connections_opened_total does not move), no nack (client side and per cluster).

invalid (issue 4, item 3)
  3. For each of three invalid files (a TOML syntax error, an unknown key, no shard cluster) and
     each trigger (the file change itself, SIGHUP, POST /reload with the token): the reload is
     rejected, warren_config_reloads_total{result="error"} grows by one and
     warren_config_last_reload_success is 0, the error (file:line:column where it has one) is in
     GET /clusters under "reload" and in the 422 body of POST /reload, the log line names the
     trigger, the old configuration stays in force (same clusters, publishes still reach shard-a
     and shard-b) and a publish/consume round trip through the proxy works.
  4. Restores the good file: the file change, POST /reload and SIGHUP each reload it successfully.

Finally stops the producers and checks the ledger: every confirmed message delivered exactly
once (lost 0, duplicated 0), nothing unexpected, no client error.
Exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import amqp

import warren_admin
from warren_admin import eventually, free_port, strip_ansi

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[reload_e2e {time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


class Checks:
    def __init__(self) -> None:
        self.items: list[tuple[bool, str, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append((bool(ok), name, detail))
        log(f"  [{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
        return bool(ok)

    @property
    def failed(self) -> list[tuple[bool, str, str]]:
        return [c for c in self.items if not c[0]]


TOKEN = "reload-e2e-" + uuid.uuid4().hex[:12]


def config_lines(listen: int, admin: int, clusters: list[tuple[str, str, str]]) -> list[str]:
    out = [f'listen = "127.0.0.1:{listen}"', "", "[admin]", f'listen = "127.0.0.1:{admin}"',
           f'token = "{TOKEN}"', "", "[timeouts]", "shutdown_grace_ms = 500", "drain_deadline_secs = 60"]
    for name, role, nodes in clusters:
        node_list = ", ".join(f'"{n}"' for n in nodes.split(","))
        out += ["", "[[clusters]]", f'name = "{name}"', f'role = "{role}"', f"nodes = [{node_list}]"]
    return out


def text_of(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


class Proxy:
    def __init__(self, binary: str, path: str, admin: int):
        self.path = path
        self.admin = admin
        self.log_path = path + ".log"
        self.logf = open(self.log_path, "w")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen([binary, "--config", path], stdout=self.logf, stderr=subprocess.STDOUT, env=env)

    def write(self, text: str) -> None:
        """Replaces the file at once (write elsewhere, rename), as docs/operations.md advises."""
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def sighup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def post_reload(self, token: str | None = TOKEN) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}/reload", method="POST", data=b"")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read().decode() or "{}")
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            try:
                return e.code, json.loads(body or "{}")
            except ValueError:
                return e.code, {"raw": body}

    def clusters(self) -> dict:
        return json.loads(warren_admin.admin_get(self.admin, "/clusters"))

    def metrics(self) -> dict[str, float]:
        return warren_admin.metrics(self.admin)

    def metric(self, name: str, **labels: str) -> float:
        return warren_admin.metric(self.admin, name, **labels)

    def log_text(self) -> str:
        self.logf.flush()
        with open(self.log_path, errors="replace") as f:
            return strip_ansi(f.read())

    def stop(self) -> int:
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not open")


class Producer(threading.Thread):
    def __init__(self, port: int, queue: str, prefix: str, rate: float):
        super().__init__(daemon=True, name=f"producer-{prefix}")
        self.port, self.queue, self.prefix, self.period = port, queue, prefix, 1.0 / rate
        self.attempted: list[str] = []
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.connects = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            conn = amqp.Connection(f"127.0.0.1:{self.port}", confirm_publish=True)
            conn.connect()
            self.connects += 1
            ch = conn.channel()
            i = 0
            while not self.stop.is_set():
                mid = f"{self.prefix}-{i}"
                self.attempted.append(mid)
                # confirm_publish: basic_publish returns once the broker acked; a nack raises.
                ch.basic_publish(amqp.Message(mid, delivery_mode=2, message_id=mid), routing_key=self.queue)
                self.acked.append(mid)
                i += 1
                time.sleep(self.period)
            conn.close()
        except Exception as e:  # noqa: BLE001 - any failure is a test failure
            self.errors.append(f"{self.name}: {e!r}")


class Consumer(threading.Thread):
    def __init__(self, port: int, queue: str):
        super().__init__(daemon=True, name="consumer")
        self.port, self.queue = port, queue
        self.seen: Counter[str] = Counter()
        self.errors: list[str] = []
        self.connects = 0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.paused = threading.Event()  # stop reading for a while (a backlog builds up)

    def run(self) -> None:
        try:
            conn = amqp.Connection(f"127.0.0.1:{self.port}", heartbeat=10)
            conn.connect()
            self.connects += 1
            ch = conn.channel()
            ch.basic_qos(0, 50, False)

            def on_message(msg: amqp.Message) -> None:
                self.seen[msg.body if isinstance(msg.body, str) else msg.body.decode()] += 1
                ch.basic_ack(msg.delivery_tag)

            ch.basic_consume(self.queue, callback=on_message)
            self.ready.set()
            while not self.stop.is_set():
                if self.paused.is_set():
                    time.sleep(0.1)
                    continue
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    conn.heartbeat_tick()
            conn.close()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{self.name}: {e!r}")
        finally:
            self.ready.set()


def direct_depth(nodes: str, queue: str) -> int | None:
    for node in nodes.split(","):
        host, port = node.rsplit(":", 1)
        try:
            c = amqp.Connection(f"{host}:{port}", connect_timeout=5)
            c.connect()
        except Exception:  # noqa: BLE001
            continue
        try:
            return c.channel().queue_declare(queue, passive=True)[1]
        except amqp.exceptions.NotFound:
            return 0
        finally:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
    return None


class RoundTrips:
    """A fresh client through the proxy: declare a queue, publish with confirms, get it back."""

    def __init__(self, port: int):
        self.port = port
        self.connections = 0

    def __call__(self) -> tuple[bool, str]:
        queue = f"reload-rt-{uuid.uuid4().hex[:8]}"
        body = uuid.uuid4().hex
        self.connections += 1
        try:
            c = amqp.Connection(f"127.0.0.1:{self.port}", confirm_publish=True, connect_timeout=10)
            c.connect()
            try:
                ch = c.channel()
                ch.queue_declare(queue, durable=False, auto_delete=False)
                ch.basic_publish(amqp.Message(body), routing_key=queue)
                end = time.time() + 10
                got = None
                while time.time() < end and got is None:
                    got = ch.basic_get(queue, no_ack=True)
                    if got is None:
                        time.sleep(0.1)
                ch.queue_delete(queue)
                if got is None:
                    return False, "published and confirmed, but not got back within 10 s"
                return got.body == body, "ok" if got.body == body else f"got {got.body!r}"
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001
            return False, repr(e)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--shard-a", required=True)
    ap.add_argument("--shard-b", required=True)
    ap.add_argument("--shard-c", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--rate", type=float, default=150.0, help="messages/s per producer")
    ap.add_argument("--parts", default="add,invalid", help="comma-separated: add, invalid")
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}

    listen, admin = free_port(), free_port()
    while admin == listen:
        admin = free_port()
    tmp = tempfile.mkdtemp(prefix="warren-reload-")
    path = os.path.join(tmp, "proxy.toml")
    base = [("shard-a", "shard", args.shard_a), ("shard-b", "shard", args.shard_b),
            ("control", "control", args.control)]
    good = text_of(config_lines(listen, admin, base))
    with open(path, "w") as f:
        f.write(good)
    proxy = Proxy(args.binary, path, admin)
    checks = Checks()
    check = checks.check
    roundtrip = RoundTrips(listen)
    producers: list[Producer] = []
    consumer: Consumer | None = None
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
        consumer.ready.wait(20)
        for p in producers:
            p.start()
        eventually(lambda: all(len(p.acked) > 0 for p in producers), 20)
        time.sleep(2)
        opened0 = proxy.metric("warren_client_connections_opened_total")
        conns0 = proxy.metric("warren_client_connections")
        log(f"3 clients up through warren ({conns0:.0f} client connections, {opened0:.0f} opened so far); "
            f"queue {queue}")
        clients = len(producers) + 1

        def pubs(cluster: str) -> float:
            return proxy.metric("warren_publishes_total", cluster=cluster)

        if "add" in parts:
            # ---- add shard-c by editing the file -------------------------------------------------
            log("adding shard-c to the file (no signal: the proxy watches the file)")
            with_c = base[:2] + [("shard-c", "shard", args.shard_c)] + base[2:]
            proxy.write(text_of(config_lines(listen, admin, with_c)))
            t0 = time.time()
            took = eventually(lambda: pubs("shard-c") > 0, 20, 0.1)
            took_after = time.time() - t0
            check("shard-c takes publishes within seconds of the file edit", took and took_after <= 10,
                  f"first publish on shard-c {took_after:.1f}s after the edit" if took else "none within 20 s")
            recv = eventually(lambda: proxy.metric("warren_deliveries_total", cluster="shard-c") > 0, 15, 0.1)
            check("the consumer receives from shard-c", recv,
                  f"warren_deliveries_total{{cluster=\"shard-c\"}} "
                  f"{proxy.metric('warren_deliveries_total', cluster='shard-c'):.0f} "
                  f"{time.time() - t0:.1f}s after the edit")
            links_c = proxy.metric("warren_cluster_links", cluster="shard-c")
            check("every client connection has a link to shard-c", links_c == clients,
                  f"warren_cluster_links{{cluster=\"shard-c\"}} = {links_c:.0f}, client connections {clients}")
            m1 = proxy.metrics()
            time.sleep(5)
            m2 = proxy.metrics()
            d = {cl: m2.get(f'warren_publishes_total{{cluster="{cl}"}}', 0) - m1.get(f'warren_publishes_total{{cluster="{cl}"}}', 0)
                 for cl in ("shard-a", "shard-b", "shard-c")}
            total = sum(d.values())
            share = d["shard-c"] / total if total else 0.0
            check("shard-c gets about a third of new publishes (25-42 %)", 0.25 <= share <= 0.42,
                  f"over 5 s: shard-c {share:.1%} ({d['shard-c']:.0f} of {total:.0f}); shard-a {d['shard-a']:.0f}, "
                  f"shard-b {d['shard-b']:.0f}")

            # ---- remove (drain) shard-c --------------------------------------------------------------
            # Let a backlog build up first (the consumer stops reading for a few seconds), so the
            # drain has something to drain.
            consumer.paused.set()
            backlog = eventually(lambda: (direct_depth(args.shard_c, queue) or 0) >= 50, 8, 0.5)
            depth_before = direct_depth(args.shard_c, queue)
            log(f"removing shard-c from the file, POST /reload (shard-c backlog {depth_before} messages)")
            proxy.write(good)
            status, body = proxy.post_reload()
            t_removed = time.time()
            consumer.paused.clear()
            links_closed_at: list[float] = []

            def watch_links() -> None:
                if eventually(lambda: proxy.metric("warren_cluster_links", cluster="shard-c") == 0, 70, 0.1):
                    links_closed_at.append(time.time())

            watcher = threading.Thread(target=watch_links, daemon=True)
            watcher.start()
            check("POST /reload with the token applies the removal", status == 200 and body.get("ok") is True,
                  f"{status} {body}")
            check("shard-c has a backlog when it is removed", backlog, f"{depth_before} messages ready on shard-c")
            time.sleep(1.0)
            c3 = pubs("shard-c")
            time.sleep(3.0)
            c4 = pubs("shard-c")
            check("shard-c gets no new publishes after its removal", c4 == c3,
                  f"warren_publishes_total{{cluster=\"shard-c\"}} {c3:.0f} -> {c4:.0f} over 3 s")
            watcher.join(75)
            closed = bool(links_closed_at)
            depth_c = direct_depth(args.shard_c, queue)
            check("the proxy closes its links to shard-c once drained", closed,
                  f"{links_closed_at[0] - t_removed:.1f}s after the removal" if closed else "links still open after 70 s")
            check("shard-c's backlog is consumed to zero (checked on shard-c directly)", depth_c == 0,
                  f"depth {depth_c}")
            m3 = proxy.metrics()
            pc = m3.get('warren_publishes_total{cluster="shard-c"}', 0)
            dc = m3.get('warren_deliveries_total{cluster="shard-c"}', 0)
            ac = m3.get('warren_acks_total{cluster="shard-c"}', 0)
            check("everything published to shard-c was delivered from it (deliveries = publishes)",
                  pc > 0 and dc == pc, f"shard-c publishes {pc:.0f}, deliveries {dc:.0f}, acks {ac:.0f}")
            names = [cl["name"] for cl in proxy.clusters()["clusters"]]
            check("GET /clusters no longer lists shard-c", "shard-c" not in names, str(names))
            opened = proxy.metric("warren_client_connections_opened_total")
            conns = proxy.metric("warren_client_connections")
            check("no client reconnected during the add and the drain",
                  opened == opened0 and conns == conns0 and all(t.connects == 1 for t in producers + [consumer])
                  and not any(t.errors for t in producers + [consumer]),
                  f"warren_client_connections_opened_total {opened0:.0f} -> {opened:.0f}, "
                  f"warren_client_connections {conns0:.0f} -> {conns:.0f}, client connects "
                  f"{[t.connects for t in producers + [consumer]]}, client errors "
                  f"{[e for t in producers + [consumer] for e in t.errors][:3]}")
            # The file write above is also seen by the watcher (a second, "no change" reload):
            # let it pass before counting reloads.
            time.sleep(2.5)

        if "invalid" in parts:
            invalid_configs(proxy, path, good, listen, admin, base, check, roundtrip)
            opened = proxy.metric("warren_client_connections_opened_total")
            expected = opened0 + roundtrip.connections
            check("no client reconnected during the invalid reloads (only the round trips' connections opened)",
                  opened == expected and all(t.connects == 1 for t in producers + [consumer])
                  and not any(t.errors for t in producers + [consumer]),
                  f"warren_client_connections_opened_total {opened0:.0f} -> {opened:.0f} "
                  f"({roundtrip.connections} round-trip connections)")

        # ---- ledger --------------------------------------------------------------------------------
        for p in producers:
            p.stop.set()
        for p in producers:
            p.join(timeout=30)
        acked = [m for p in producers for m in p.acked]
        attempted = {m for p in producers for m in p.attempted}
        eventually(lambda: all(consumer.seen[m] for m in acked), 60, 0.5)
        time.sleep(1.5)
        consumer.stop.set()
        consumer.join(timeout=10)
        lost = [m for m in acked if consumer.seen[m] == 0]
        dup = {m: n for m, n in consumer.seen.items() if n > 1}
        unexpected = [m for m in consumer.seen if m not in attempted]
        in_doubt = attempted - set(acked)
        m = proxy.metrics()
        nacks = sum(v for k, v in m.items() if k.startswith("warren_confirms_total{") and 'outcome="nack"' in k)
        per_cluster = {cl: m.get(f'warren_publishes_total{{cluster="{cl}"}}', 0) for cl in ("shard-a", "shard-b", "shard-c")}
        log(f"ledger: published+confirmed {len(acked)} (attempted {len(attempted)}, in doubt {len(in_doubt)}), "
            f"received {sum(consumer.seen.values())} deliveries of {len(consumer.seen)} ids; lost {len(lost)}, "
            f"duplicated {len(dup)}, unexpected {len(unexpected)}; publishes per cluster "
            + ", ".join(f"{k} {v:.0f}" for k, v in per_cluster.items()))
        check("ledger: lost = 0", not lost, f"{len(lost)} confirmed messages never received, e.g. {lost[:5]}" if lost else "")
        check("ledger: duplicated = 0", not dup, f"{len(dup)} delivered more than once, e.g. {list(dup.items())[:5]}" if dup else "")
        check("ledger: unexpected = 0", not unexpected, f"e.g. {unexpected[:5]}" if unexpected else "")
        check("ledger: every publish call returned (none in doubt)", len(in_doubt) <= 0, f"{len(in_doubt)} in doubt")
        check("no nack: the clients got none and no cluster sent one", nacks == 0
              and not any("Nack" in e for t in producers for e in t.errors),
              f"warren_confirms_total{{outcome=\"nack\"}} {nacks:.0f}")
        check("nothing republished or dropped by the proxy",
              m.get("warren_republished_total", 0) == 0 and m.get("warren_dropped_total", 0) == 0,
              f"republished {m.get('warren_republished_total', 0):.0f}, dropped {m.get('warren_dropped_total', 0):.0f}")
        errors = [e for t in producers + [consumer] for e in t.errors]
        check("no client saw an error", not errors, "; ".join(errors[:4]))

        c = amqp.Connection(f"127.0.0.1:{listen}")
        c.connect()
        c.channel().queue_delete(queue)
        c.close()
    except Exception as e:  # noqa: BLE001
        import traceback
        check("the test ran to the end", False, f"{e!r}\n{traceback.format_exc(limit=5)}")
    finally:
        for p in producers:
            p.stop.set()
        if consumer is not None:
            consumer.stop.set()
        code = proxy.stop()
        check("warren exits 0 on SIGTERM", code == 0, f"exit code {code}")
        panics = [ln for ln in proxy.log_text().splitlines() if "panicked" in ln]
        check("no panic in the proxy log", not panics, panics[0][:300] if panics else "")
    print()
    print(f"reload_e2e: {len(checks.items) - len(checks.failed)} of {len(checks.items)} checks passed")
    if checks.failed:
        for _, name, detail in checks.failed:
            print(f"  FAIL {name}{': ' + detail if detail else ''}")
        print(f"\nproxy log {proxy.log_path} (kept; last 4000 characters):")
        print(proxy.log_text()[-4000:])
        return 1
    print("reload_e2e: OK")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def invalid_configs(proxy: Proxy, path: str, good: str, listen: int, admin: int,
                    base: list[tuple[str, str, str]], check, roundtrip: RoundTrips) -> None:
    """Three invalid files x three triggers: rejected, the old configuration stays, errors are
    visible in /clusters, the POST /reload answer, the metrics and the log."""
    good_lines = good.rstrip("\n").split("\n")
    # 1. a TOML syntax error on a known line
    syntax = list(good_lines)
    at = syntax.index("[timeouts]") + 2  # 0-based index of the inserted line
    syntax.insert(at, "connect_ms = = 500")
    # 2. an unknown key inside the first [[clusters]] entry
    unknown = list(good_lines)
    at_u = unknown.index("[[clusters]]") + 2
    unknown.insert(at_u, "wieght = 2")
    # 3. no shard cluster: only the control cluster
    no_shard = config_lines(listen, admin, [c for c in base if c[1] == "control"])
    bad_files = [
        ("syntax error", text_of(syntax), [f"{path}:{at + 1}:"], None),
        ("unknown key", text_of(unknown), [f"{path}:{at_u + 1}:", "unknown key", "wieght"], None),
        ("no shard cluster", text_of(no_shard), [f"{path}:", "no shard cluster"], rf"{re.escape(path)}:\d+:\d+: "),
    ]
    names0 = [c["name"] for c in proxy.clusters()["clusters"]]

    def errors_total() -> float:
        return proxy.metric("warren_config_reloads_total", result="error")

    def ok_total() -> float:
        return proxy.metric("warren_config_reloads_total", result="ok")

    status, body = proxy.post_reload(token=None)
    check("POST /reload without the token is refused (401)", status == 401, f"{status} {body}")

    for label, text, must, pattern in bad_files:
        log(f"--- invalid file: {label}")

        def message_ok(msg: str | None) -> bool:
            return bool(msg) and all(s in msg for s in must) and (pattern is None or re.search(pattern, msg) is not None)

        for trigger in ("file change", "SIGHUP", "POST /reload"):
            e0 = errors_total()
            off = len(proxy.log_text())
            a0 = proxy.metric("warren_publishes_total", cluster="shard-a")
            b0 = proxy.metric("warren_publishes_total", cluster="shard-b")
            post = None
            if trigger == "file change":
                proxy.write(text)
            elif trigger == "SIGHUP":
                proxy.sighup()
            else:
                post = proxy.post_reload()
            seen = eventually(lambda: errors_total() >= e0 + 1, 10, 0.1)
            time.sleep(0.3)  # nothing more must come (one trigger, one reload)
            e1 = errors_total()
            st = proxy.clusters()
            rl = st.get("reload") or {}
            last_ok = proxy.metric("warren_config_last_reload_success")
            check(f"{label} / {trigger}: rejected; warren_config_reloads_total{{result=\"error\"}} +1 and "
                  f"warren_config_last_reload_success 0", seen and e1 == e0 + 1 and last_ok == 0,
                  f"errors {e0:.0f} -> {e1:.0f}, last_reload_success {last_ok:.0f}")
            check(f"{label} / {trigger}: GET /clusters shows the error under reload", rl.get("ok") is False
                  and message_ok(rl.get("message")), f"reload = {rl}")
            if post is not None:
                status, body = post
                check(f"{label} / {trigger}: answered 422 with the error", status == 422 and body.get("ok") is False
                      and message_ok(body.get("error")), f"{status} {body}")
            else:
                tail = proxy.log_text()[off:]
                lines = [ln for ln in tail.splitlines() if "reload rejected" in ln]
                named = [ln for ln in lines if f'trigger="{trigger}"' in ln or f"trigger={trigger}" in ln]
                check(f"{label} / {trigger}: the log says so and names the trigger", bool(named),
                      (named or lines or ["no 'reload rejected' line"])[0][:300])
            names = [c["name"] for c in st["clusters"]]
            ok_rt, detail = roundtrip()
            a1 = proxy.metric("warren_publishes_total", cluster="shard-a")
            b1 = proxy.metric("warren_publishes_total", cluster="shard-b")
            check(f"{label} / {trigger}: the old configuration stays and the proxy serves "
                  f"(same clusters, publishes reach shard-a and shard-b, round trip)",
                  names == names0 and ok_rt and a1 > a0 and b1 > b0 and st.get("ready") is True,
                  f"clusters {names}; ready {st.get('ready')}; shard-a +{a1 - a0:.0f}, shard-b +{b1 - b0:.0f}; "
                  f"round trip: {detail}")

    log("--- restoring the good file")
    o0 = ok_total()
    proxy.write(good)
    back = eventually(lambda: ok_total() >= o0 + 1 and proxy.metric("warren_config_last_reload_success") == 1, 10, 0.1)
    rl = proxy.clusters().get("reload") or {}
    check("good file restored: the file change reloads it (ok, last_reload_success 1, /clusters reload ok)",
          back and rl.get("ok") is True, f"reload = {rl}")
    status, body = proxy.post_reload()
    check("good file: POST /reload answers 200 ok", status == 200 and body.get("ok") is True, f"{status} {body}")
    o1 = ok_total()
    proxy.sighup()
    hup = eventually(lambda: ok_total() >= o1 + 1, 10, 0.1)
    check("good file: SIGHUP reloads it", hup and proxy.metric("warren_config_last_reload_success") == 1,
          f"reloads ok {o1:.0f} -> {ok_total():.0f}")
    ok_rt, detail = roundtrip()
    check("round trip after the restore", ok_rt, detail)


if __name__ == "__main__":
    sys.exit(main())
