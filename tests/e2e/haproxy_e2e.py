#!/usr/bin/env python3
"""Two warren instances behind HAProxy, as deploy/haproxy/haproxy.cfg sets it up.

    python tests/e2e/haproxy_e2e.py WARREN_BIN --shard-a H:P,H:P --shard-b H:P,H:P \\
        --control H:P,H:P [--tasks 1000] [--workers 2] [--messages 300] [--haproxy PATH]

(the same binary and cluster arguments as tests/e2e/reload_e2e.py; the test installs nothing:
Debian's `haproxy` must be on PATH, scripts/test.sh installs it.)

  1. Starts two warren instances (the real binary) on free ports with the same cluster list
     (shard-a, shard-b shards, control) and an admin token, and HAProxy (`haproxy -db`) with a
     copy of deploy/haproxy/haproxy.cfg in which only the addresses, the stats socket and the
     process settings (log, chroot, user, daemon) are replaced: TCP mode, balance leastconn,
     `option httpchk GET /ready` with `check port <admin port>`, the timeouts, as in the
     example. `haproxy -c` must accept the example itself and the copy; both servers must be UP
     by their /ready check (L7OK, 200).
  2. Celery through HAProxy: WORKERS prefork workers (tests/e2e/e2e_app.py: acks_late,
     confirm_publish, rpc:// results, AMQP heartbeats) and the producer all use HAProxy's
     address. TASKS tasks are published; while they run, both instances reload their
     configuration twice: shard-a's weight set to 2 in the files and POST /reload on each admin
     port, later the original files back and SIGHUP to each. Ledger: sent (confirmed publishes),
     executed (distinct task ids in the executions file), results received, duplicates
     (executions and results); any task that did not run or whose result did not arrive fails the
     test, and so does a duplicate (nothing here disturbs a connection). Both instances must have
     carried client connections through HAProxy, no worker may lose its broker connection.
  3. Depths from either instance: MESSAGES persistent messages are published with confirms to a
     durable sharded queue through instance 1 (directly); a consumer declares it through
     instance 2. GET /queues?queue=NAME on both admin endpoints and `warren check-queues -q NAME
     -w 10 -c 100` with --admin of each instance and with --config of each must report the same
     depth (MESSAGES, split over shard-a and shard-b), exit 2 (CRITICAL) since MESSAGES >= 100.
     Then everything is consumed through instance 2 (each message once), and all of them report
     0 (exit 0, OK).
  4. A rolling stop: with a client still connected to instance 1, SIGTERM it. /ready answers 503
     during the shutdown grace, HAProxy marks warren-1 DOWN within its inter x fall (+ slack),
     and a new connection through HAProxy lands on instance 2 and works. When the client leaves,
     instance 1 exits 0.
Then stops everything; no panic in either warren log, both exit 0 on SIGTERM.
Prints a summary; exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import io
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
from pathlib import Path

import amqp

import warren_admin
from warren_admin import eventually, free_port, strip_ansi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXAMPLE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
T0 = time.monotonic()
TOKEN = "haproxy-e2e-" + uuid.uuid4().hex[:12]
# Warren's shutdown grace in this test: above HAProxy's inter x fall (2 s x 2), as the example's
# comment asks, so that HAProxy sees /ready answer 503 before the instance stops.
GRACE_MS = 8000


def log(msg: str) -> None:
    print(f"[haproxy_e2e {time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


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


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def wait_port(port: int, timeout: float = 30) -> bool:
    return eventually(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
                      timeout, 0.1)


# ------------------------------------------------------------------------------------------------
# warren


def warren_config(listen: int, admin: int, clusters: list[tuple[str, str, str]], weight_a: int = 1) -> str:
    out = [f'listen = "127.0.0.1:{listen}"', "", "[admin]", f'listen = "127.0.0.1:{admin}"',
           f'token = "{TOKEN}"', "", "[timeouts]", f"shutdown_grace_ms = {GRACE_MS}"]
    for name, role, nodes in clusters:
        node_list = ", ".join(f'"{n}"' for n in nodes.split(","))
        out += ["", "[[clusters]]", f'name = "{name}"', f'role = "{role}"', f"nodes = [{node_list}]"]
        if name == "shard-a" and weight_a != 1:
            out.append(f"weight = {weight_a}")
    return "\n".join(out) + "\n"


class Warren:
    def __init__(self, name: str, binary: str, tmp: str, listen: int, admin: int,
                 clusters: list[tuple[str, str, str]]):
        self.name, self.listen, self.admin, self.clusters_arg = name, listen, admin, clusters
        self.path = os.path.join(tmp, f"{name}.toml")
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.write(warren_config(listen, admin, clusters))
        self.logf = open(self.log_path, "w")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen([binary, "--config", self.path], stdout=self.logf,
                                     stderr=subprocess.STDOUT, env=env)

    def write(self, text: str) -> None:
        """Replaces the file at once (write elsewhere, rename), as docs/operations.md advises."""
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def set_weight_a(self, weight: int) -> None:
        self.write(warren_config(self.listen, self.admin, self.clusters_arg, weight))

    def post_reload(self) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}/reload", method="POST", data=b"")
        req.add_header("Authorization", f"Bearer {TOKEN}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read().decode() or "{}")
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            try:
                return e.code, json.loads(body or "{}")
            except ValueError:
                return e.code, {"raw": body}

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def clusters(self) -> dict:
        return json.loads(warren_admin.admin_get(self.admin, "/clusters"))

    def weight_a(self) -> int | None:
        for c in self.clusters()["clusters"]:
            if c["name"] == "shard-a":
                return c["weight"]
        return None

    def metric(self, name: str, **labels: str) -> float:
        return warren_admin.metric(self.admin, name, **labels)

    def metrics(self) -> dict[str, float]:
        return warren_admin.metrics(self.admin)

    def log_text(self) -> str:
        self.logf.flush()
        with open(self.log_path, errors="replace") as f:
            return strip_ansi(f.read())

    def stop(self, timeout: float = 40) -> int:
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


# ------------------------------------------------------------------------------------------------
# HAProxy


def haproxy_config(example: str, front: int, stats: int, sock: str, servers: list[tuple[int, int]]) -> str:
    """deploy/haproxy/haproxy.cfg with local addresses: each line marked [test rewrites] in the
    example must be found exactly once (so that the example and this test cannot drift apart
    silently); everything else (timeouts, balance, checks) is kept as it is."""
    rewrites: list[tuple[str, str]] = [
        (r"^(\s*)log /dev/log local0\b.*$", "{i}log stdout format raw local0 info"),
        (r"^\s*chroot \S+.*\n", ""),
        (r"^(\s*)stats socket \S+ .*$", "{i}stats socket " + sock + " mode 600 level admin"),
        (r"^\s*user haproxy\b.*\n", ""),
        (r"^\s*group haproxy\b.*\n", ""),
        (r"^\s*daemon\b.*\n", ""),
        # A few dozen connections here; 20000 needs ~40000 file descriptors, more than a
        # container may grant.
        (r"^(\s*)maxconn 20000\b.*$", "{i}maxconn 1000"),
        (r"^(\s*)bind :5672\b.*$", f"{{i}}bind 127.0.0.1:{front}"),
        (r"^(\s*)bind 127\.0\.0\.1:8404\b.*$", f"{{i}}bind 127.0.0.1:{stats}"),
    ]
    for k, (listen, admin) in enumerate(servers, 1):
        rewrites.append((rf"^(\s*)server warren-{k} \S+ check port \d+\b.*$",
                         f"{{i}}server warren-{k} 127.0.0.1:{listen} check port {admin}"))
    text = example
    for pattern, repl in rewrites:
        text, n = re.subn(pattern, lambda m, r=repl: r.format(i=m.group(1) if m.groups() else ""),
                          text, flags=re.MULTILINE)
        if n != 1:
            raise RuntimeError(f"{EXAMPLE}: expected one line matching {pattern!r}, found {n}; "
                               "the example changed: update haproxy_config() in this test")
    return text


class HAProxy:
    def __init__(self, binary: str, tmp: str, cfg_text: str, sock: str):
        self.cfg = os.path.join(tmp, "haproxy.cfg")
        with open(self.cfg, "w") as f:
            f.write(cfg_text)
        self.sock = sock
        self.log_path = os.path.join(tmp, "haproxy.log")
        self.binary = binary
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", self.cfg], stdout=self.logf,
                                     stderr=subprocess.STDOUT)

    def command(self, cmd: str) -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(self.sock)
        try:
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks).decode()
        finally:
            s.close()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of backend `warren`: {server name: row}."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r.get("pxname") == "warren" and r["svname"].startswith("warren-")}

    def log_text(self) -> str:
        self.logf.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def check_config(haproxy: str, path: str) -> tuple[bool, str]:
    r = subprocess.run([haproxy, "-c", "-f", path], capture_output=True, text=True, timeout=30)
    out = (r.stdout + r.stderr).strip()
    return r.returncode == 0, out.splitlines()[-1] if out else f"exit {r.returncode}"


# ------------------------------------------------------------------------------------------------
# Celery


class Celery:
    """Workers of tests/e2e/e2e_app.py, started as tests/e2e/celery_e2e.py starts them."""

    def __init__(self, broker: str, tmp: str, workers: int, concurrency: int):
        self.run_id = uuid.uuid4().hex[:8]
        self.queue = f"haproxy-e2e.{self.run_id}"
        self.tmp = Path(tmp)
        self.out = self.tmp / "executions.txt"
        self.env = dict(os.environ)
        self.env.update({
            "WARREN_E2E_BROKER": broker,
            "WARREN_E2E_OUT": str(self.out),
            "WARREN_E2E_QUEUE": self.queue,
            "WARREN_E2E_HEARTBEAT": "10",
            "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        self.n_workers, self.concurrency = workers, concurrency
        self.workers: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self) -> None:
        for i in range(1, self.n_workers + 1):
            name = f"w{i}-{self.run_id}"
            logf = self.tmp / f"{name}.log"
            cmd = [sys.executable, "-m", "celery", "-A", "e2e_app", "worker", "--pool", "prefork",
                   "-c", str(self.concurrency), "-n", f"{name}@%h", "-Q", self.queue, "--loglevel", "INFO"]
            with open(logf, "w") as lf:
                p = subprocess.Popen(cmd, cwd=HERE, env=self.env, stdout=lf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            self.workers.append((name, p, logf))

    def wait_ready(self, app, timeout: float) -> tuple[bool, str]:
        want = {n for n, _, _ in self.workers}
        seen: set[str] = set()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for n, p, _ in self.workers:
                if p.poll() is not None:
                    return False, f"worker {n} exited with {p.returncode} during startup"
            try:
                replies = app.control.ping(timeout=1.0)
            except Exception as e:  # noqa: BLE001
                log(f"ping: {type(e).__name__}: {e}")
                replies = []
                time.sleep(1)
            for r in replies:
                for node in r:
                    seen.add(node.split("@", 1)[0])
            if want <= seen:
                return True, f"{sorted(seen)}"
        return False, f"missing {sorted(want - seen)} after {timeout:.0f}s"

    def executions(self) -> list[str]:
        try:
            return self.out.read_text().splitlines()
        except FileNotFoundError:
            return []

    def executed_count(self) -> int:
        try:
            with open(self.out, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def worker_logs(self) -> str:
        return "\n".join(lf.read_text(errors="replace") for _, _, lf in self.workers if lf.exists())

    def stop(self) -> list[str]:
        """SIGTERM (warm shutdown); anything of the workers' sessions left after 30 s is killed.
        Returns problems."""
        from celery_e2e import pids_in_session  # noqa: PLC0415

        problems = []
        for _, p, _ in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        for n, p, _ in self.workers:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"worker {n} did not stop within 30 s of SIGTERM")
        time.sleep(0.3)
        for n, p, _ in self.workers:
            strays = pids_in_session(p.pid)
            if strays:
                problems.append(f"worker {n}: stray processes {strays}")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            if p.returncode not in (0, None):
                problems.append(f"worker {n} exited with status {p.returncode}")
        return problems


class Reloader(threading.Thread):
    """While the tasks run: at 20 % executed, shard-a weight 2 in both files + POST /reload on
    each; at 50 %, the original files back + SIGHUP to each."""

    def __init__(self, instances: list[Warren], celery: Celery, n_tasks: int):
        super().__init__(daemon=True, name="reloader")
        self.instances, self.celery, self.n = instances, celery, n_tasks
        self.events: list[tuple[str, bool, str]] = []  # (what, ok, detail)
        self.executed_at: list[tuple[str, int]] = []
        self.stop = threading.Event()

    def wait_executed(self, count: int) -> bool:
        while not self.stop.is_set():
            if self.celery.executed_count() >= count:
                return True
            time.sleep(0.02)
        return False

    def run(self) -> None:
        try:
            if not self.wait_executed(max(1, self.n // 5)):
                return
            self.executed_at.append(("POST /reload start", self.celery.executed_count()))
            for w in self.instances:
                w.set_weight_a(2)
                status, body = w.post_reload()
                ok = status == 200 and body.get("ok") is True and "weight" in str(body)
                self.events.append((f"{w.name}: shard-a weight 2, POST /reload", ok, f"{status} {body}"))
                log(f"{w.name}: POST /reload -> {status} {json.dumps(body)[:200]}")
            self.executed_at.append(("POST /reload end", self.celery.executed_count()))

            if not self.wait_executed(max(1, self.n // 2)):
                return
            self.executed_at.append(("SIGHUP start", self.celery.executed_count()))
            for w in self.instances:
                ok0 = w.metric("warren_config_reloads_total", result="ok")
                w.set_weight_a(1)
                w.proc.send_signal(signal.SIGHUP)
                ok = eventually(lambda w=w: w.weight_a() == 1
                                and w.metric("warren_config_reloads_total", result="ok") > ok0
                                and (w.clusters().get("reload") or {}).get("ok") is True, 10, 0.05)
                rl = w.clusters().get("reload")
                self.events.append((f"{w.name}: original file, SIGHUP", ok,
                                    f"shard-a weight {w.weight_a()}, reload {rl}"))
                log(f"{w.name}: SIGHUP -> shard-a weight {w.weight_a()}, reload {rl}")
            self.executed_at.append(("SIGHUP end", self.celery.executed_count()))
        except Exception as e:  # noqa: BLE001
            self.events.append(("reloader", False, repr(e)))


# ------------------------------------------------------------------------------------------------
# Queue depths


def check_queues(binary: str, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    r = subprocess.run([binary, "check-queues", *args], capture_output=True, text=True, timeout=60, env=env)
    return r.returncode, (r.stdout.strip() or r.stderr.strip())


def queues_depth(w: Warren, queue: str) -> tuple[int | None, dict[str, int | None], str]:
    """(total, {cluster: messages}, raw) of `queue` in GET /queues?queue=NAME."""
    status, body = w.get(f"/queues?queue={queue}")
    if status != 200:
        return None, {}, f"{status} {body[:200]}"
    data = json.loads(body)
    for q in data.get("queues", []):
        if q["name"] == queue:
            split = {c["cluster"]: c.get("messages") for c in q.get("clusters", [])}
            total = q.get("messages") if q.get("complete") else None
            return total, split, json.dumps(q)
    return None, {}, f"{queue} not listed: {body[:300]}"


def perfdata(line: str, queue: str) -> dict[str, int]:
    """The performance data of a check-queues line: {'NAME': n, 'NAME@shard-a': n, ...}."""
    out = {}
    if "|" not in line:
        return out
    for m in re.finditer(r"'([^']+)'=(\d+)", line.split("|", 1)[1]):
        if m.group(1) == queue or m.group(1).startswith(queue + "@"):
            out[m.group(1)] = int(m.group(2))
    return out


def depth_part(args, w1: Warren, w2: Warren, check) -> dict:
    n = args.messages
    queue = f"haproxy-e2e.depth.{uuid.uuid4().hex[:8]}"
    summary: dict = {"queue": queue, "published": 0}
    # Publish through instance 1, with confirms, persistent.
    c1 = amqp.Connection(f"127.0.0.1:{w1.listen}", confirm_publish=True, connect_timeout=10)
    c1.connect()
    ch1 = c1.channel()
    ch1.queue_declare(queue, durable=True, auto_delete=False)
    sent = []
    for i in range(n):
        mid = f"d-{i}"
        ch1.basic_publish(amqp.Message(mid, delivery_mode=2, message_id=mid), routing_key=queue)
        sent.append(mid)
    c1.close()
    summary["published"] = len(sent)
    log(f"published {len(sent)} messages (confirmed) to durable queue {queue} through {w1.name}")

    # The consumer's side: declared through instance 2 (as a Celery worker declares its queue),
    # nothing consumed yet.
    c2 = amqp.Connection(f"127.0.0.1:{w2.listen}", heartbeat=10, connect_timeout=10)
    c2.connect()
    ch2 = c2.channel()
    ch2.queue_declare(queue, durable=True, auto_delete=False)

    # GET /queues on both instances: the same depth, n (answers are cached for 1 s).
    got: dict[str, tuple] = {}

    def both_report(want: int) -> bool:
        for w in (w1, w2):
            got[w.name] = queues_depth(w, queue)
        return all(got[w.name][0] == want for w in (w1, w2))

    same = eventually(lambda: both_report(n), 15, 0.3)
    d1, s1, _ = got[w1.name]
    d2, s2, _ = got[w2.name]
    summary["queues_before"] = {w1.name: d1, w2.name: d2}
    check(f"GET /queues?queue=NAME reports the depth before consuming, the same on both instances ({n})",
          same and s1 == s2, f"{w1.name}: {d1} {s1}; {w2.name}: {d2} {s2}")
    check("the queue is sharded: both shard clusters hold part of it",
          same and all((s1.get(c) or 0) > 0 for c in ("shard-a", "shard-b")), f"{s1}")

    # warren check-queues -q NAME -w 10 -c 100, with --admin of each instance, and with --config.
    def run_checks(want: int, want_code: int, label: str) -> None:
        results = {}
        for w in (w1, w2):
            for how, extra in (("--admin", ["--admin", f"http://127.0.0.1:{w.admin}"]),
                               ("--config", ["--config", w.path])):
                code, line = check_queues(args.binary, "-q", queue, "-w", "10", "-c", "100", *extra)
                results[f"{w.name} {how}"] = (code, line)
        summary[f"check_queues_{label}"] = {k: v[0] for k, v in results.items()}
        for k, (code, line) in results.items():
            pd = perfdata(line, queue)
            split = sum(v for key, v in pd.items() if "@" in key)
            check(f"check-queues -q NAME -w 10 -c 100 {k} ({label}): depth {want}, exit {want_code}",
                  code == want_code and pd.get(queue) == want and split == want,
                  f"exit {code}: {line}")

    run_checks(n, 2 if n >= 100 else (1 if n >= 10 else 0), "before consuming")

    # Consume everything through instance 2.
    seen: Counter[str] = Counter()
    ch2.basic_qos(0, 50, False)

    def on_message(msg: amqp.Message) -> None:
        body = msg.body if isinstance(msg.body, str) else msg.body.decode()
        seen[body] += 1
        ch2.basic_ack(msg.delivery_tag)

    tag = ch2.basic_consume(queue, callback=on_message)
    end = time.monotonic() + 30
    while time.monotonic() < end and len(seen) < n:
        try:
            c2.drain_events(timeout=0.5)
        except socket.timeout:
            c2.heartbeat_tick()
    # A moment more: a duplicate would come now.
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        try:
            c2.drain_events(timeout=0.2)
        except socket.timeout:
            pass
    lost = [m for m in sent if seen[m] == 0]
    dups = {m: k for m, k in seen.items() if k > 1}
    unexpected = [m for m in seen if m not in set(sent)]
    summary.update(consumed=len(seen), deliveries=sum(seen.values()), lost=len(lost), duplicates=len(dups))
    check(f"all {n} messages consumed through {w2.name}, each once",
          not lost and not dups and not unexpected,
          f"received {len(seen)} distinct in {sum(seen.values())} deliveries; lost {len(lost)}, "
          f"duplicated {len(dups)}, unexpected {len(unexpected)}")

    zero = eventually(lambda: both_report(0), 15, 0.3)
    summary["queues_after"] = {w1.name: got[w1.name][0], w2.name: got[w2.name][0]}
    check("GET /queues?queue=NAME reports 0 on both instances after consuming", zero,
          f"{w1.name}: {got[w1.name][0]}; {w2.name}: {got[w2.name][0]}")
    run_checks(0, 0, "after consuming")
    ch2.basic_cancel(tag)
    ch2.queue_delete(queue)
    c2.close()
    return summary


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--shard-a", required=True)
    ap.add_argument("--shard-b", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2, help="prefork children per worker")
    ap.add_argument("--messages", type=int, default=300, help="messages for the depth part (>= 100: CRITICAL)")
    ap.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    ap.add_argument("--keep", action="store_true", help="keep the run directory even on success")
    args = ap.parse_args()
    args.binary = os.path.abspath(args.binary)

    if not os.access(args.haproxy, os.X_OK):
        print(f"haproxy_e2e: no haproxy binary at {args.haproxy} (apt-get install haproxy; "
              "scripts/test.sh haproxy installs it)", file=sys.stderr)
        return 1
    if not os.access(args.binary, os.X_OK):
        print(f"haproxy_e2e: {args.binary} is not executable", file=sys.stderr)
        return 1

    checks = Checks()
    check = checks.check
    timings: dict[str, float] = {}
    ledger: dict = {}
    depth: dict = {}
    tmp = tempfile.mkdtemp(prefix="warren-haproxy-")
    clusters = [("shard-a", "shard", args.shard_a), ("shard-b", "shard", args.shard_b),
                ("control", "control", args.control)]
    l1, a1, l2, a2, front, stats = distinct_ports(6)
    sock = os.path.join(tmp, "haproxy.sock")
    ha: HAProxy | None = None
    instances: list[Warren] = []
    celery: Celery | None = None
    holder: amqp.Connection | None = None
    exit_codes: dict[str, int] = {}
    try:
        version = subprocess.run([args.haproxy, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
        log(f"{version}; run dir {tmp}")
        ok, detail = check_config(args.haproxy, str(EXAMPLE))
        check("haproxy -c accepts deploy/haproxy/haproxy.cfg", ok, detail)
        example = EXAMPLE.read_text()
        for must in ("mode tcp", "balance leastconn", "option httpchk GET /ready", "timeout client 3h",
                     "timeout server 3h"):
            check(f"the example has `{must}`", re.search(rf"^\s*{re.escape(must)}\b", example, re.M) is not None)

        # ---- 1. two warren instances and HAProxy ------------------------------------------------
        t = time.monotonic()
        instances = [Warren("warren-1", args.binary, tmp, l1, a1, clusters),
                     Warren("warren-2", args.binary, tmp, l2, a2, clusters)]
        w1, w2 = instances
        for w in instances:
            if not (wait_port(w.listen) and wait_port(w.admin)):
                raise RuntimeError(f"{w.name} did not open its ports; log tail:\n{w.log_text()[-2000:]}")
        ready = eventually(lambda: all(w.get("/ready")[0] == 200 for w in instances), 20, 0.2)
        check("both warren instances are ready (GET /ready 200)", ready,
              "; ".join(f"{w.name} amqp :{w.listen} admin :{w.admin} /ready {w.get('/ready')}" for w in instances))

        # Baselines: the waits above connected to each AMQP port directly once (a bare TCP probe,
        # counted when warren sees it close: wait for that, or it lands after the baseline).
        eventually(lambda: all(w.metric("warren_client_probes_total") >= 1 for w in instances), 5, 0.05)
        base = {w.name: (w.metric("warren_client_connections_opened_total"),
                         w.metric("warren_client_probes_total"),
                         w.metric("warren_client_connections_refused_total")) for w in instances}
        ha = HAProxy(args.haproxy, tmp, haproxy_config(example, front, stats, sock, [(l1, a1), (l2, a2)]), sock)
        ok, detail = check_config(args.haproxy, ha.cfg)
        check("haproxy -c accepts the generated copy", ok, detail)
        ha.start()
        if not eventually(lambda: ha.proc.poll() is not None or wait_port(front, 0.2), 15, 0.1) \
                or ha.proc.poll() is not None:
            raise RuntimeError(f"haproxy did not open :{front}; log:\n{ha.log_text()[-2000:]}")

        def all_up() -> bool:
            s = ha.servers()
            return len(s) == 2 and all(r["status"] == "UP" and r["check_status"] == "L7OK"
                                       and r["check_code"] == "200" for r in s.values())

        up = eventually(all_up, 20, 0.2)
        srv = ha.servers() if ha.proc.poll() is None else {}
        check("HAProxy marks both warren instances UP by their /ready check (L7OK, 200)", up,
              "; ".join(f"{k}: {r.get('status')} {r.get('check_status')} {r.get('check_code')}" for k, r in srv.items()))
        timings["start warren x2 + haproxy"] = time.monotonic() - t
        log(f"HAProxy on 127.0.0.1:{front} (stats page 127.0.0.1:{stats}) -> warren-1 :{l1} (admin :{a1}), "
            f"warren-2 :{l2} (admin :{a2})")

        # ---- 2. Celery through HAProxy, reloads while the tasks run -------------------------------
        broker = f"amqp://guest:guest@127.0.0.1:{front}//"
        celery = Celery(broker, tmp, args.workers, args.concurrency)
        os.environ.update(celery.env)  # the driver imports the same app
        sys.path.insert(0, str(HERE))
        import e2e_app  # noqa: PLC0415
        from celery.exceptions import TimeoutError as CeleryTimeout  # noqa: PLC0415
        from celery.result import ResultSet  # noqa: PLC0415

        app = e2e_app.app
        t = time.monotonic()
        celery.start()
        ok, detail = celery.wait_ready(app, 90)
        check(f"{args.workers} Celery workers answer ping through HAProxy", ok, detail)
        timings["workers up (ping through HAProxy)"] = time.monotonic() - t
        if not ok:
            raise RuntimeError("workers not up")

        n = args.tasks
        reloader = Reloader(instances, celery, n)
        errors_before = {w.name: w.metric("warren_config_reloads_total", result="error") for w in instances}
        reloader.start()
        t = time.monotonic()
        results = []
        publish_errors = []
        with app.producer_or_acquire() as producer:
            for i in range(n):
                try:
                    results.append(e2e_app.double.apply_async((i,), producer=producer))
                except Exception as e:  # noqa: BLE001 - a failed publish is a test failure
                    publish_errors.append(f"task {i}: {e!r}")
        timings[f"publish {n} tasks (confirm_publish)"] = time.monotonic() - t
        sent_ids = [r.id for r in results]
        index = {tid: i for i, tid in enumerate(sent_ids)}
        received: dict[str, object] = {}
        result_calls: Counter[str] = Counter()

        def on_result(task_id, value) -> None:
            result_calls[task_id] += 1
            received[task_id] = value

        t1 = time.monotonic()
        timeout = 60 + n / 10
        try:
            ResultSet(results).get(timeout=timeout, propagate=False, callback=on_result)
        except CeleryTimeout as e:
            log(f"results: timed out after {timeout:.0f}s ({len(received)}/{n}): {e}")
        except Exception as e:  # noqa: BLE001
            log(f"results: {type(e).__name__}: {e} ({len(received)}/{n})")
        timings[f"all {n} results back"] = time.monotonic() - t1
        timings[f"{n} tasks publish -> last result"] = time.monotonic() - t
        reloader.stop.set()
        reloader.join(15)
        time.sleep(0.5)  # late writers (a duplicate execution racing its result)

        executions = celery.executions()
        executed: Counter[str] = Counter(ln.split()[0] for ln in executions if ln.split())
        wrong = [(tid, v) for tid, v in received.items() if tid in index and v != 2 * index[tid]]
        not_run = [tid for tid in sent_ids if executed[tid] == 0]
        no_result = [tid for tid in sent_ids if tid not in received]
        dup_exec = {tid: k for tid, k in executed.items() if k > 1}
        dup_res = {tid: k for tid, k in result_calls.items() if k > 1}
        unknown = [tid for tid in executed if tid not in index]
        redelivered = sum(1 for ln in executions if ln.split()[-1:] == ["1"])
        ledger = {"sent": len(sent_ids), "publish errors": len(publish_errors), "executed": len(executed),
                  "executions": len(executions), "results received": len(received),
                  "not run": len(not_run), "no result": len(no_result), "wrong results": len(wrong),
                  "duplicate executions": len(dup_exec), "duplicate results": len(dup_res),
                  "unknown": len(unknown), "redelivered": redelivered}
        log("ledger: " + ", ".join(f"{k} {v}" for k, v in ledger.items()))
        check(f"every task published and confirmed ({n})", len(sent_ids) == n and not publish_errors,
              "; ".join(publish_errors[:3]))
        check(f"ledger: every task ran (lost 0): {len(executed)} of {len(sent_ids)}", not not_run,
              f"{len(not_run)} never ran, e.g. {not_run[:3]}" if not_run else "")
        check(f"ledger: every result arrived and is right: {len(received)} of {len(sent_ids)}",
              not no_result and not wrong,
              f"{len(no_result)} missing, e.g. {no_result[:3]}; {len(wrong)} wrong, e.g. {wrong[:3]}"
              if no_result or wrong else "")
        check("ledger: no duplicates (executions, results), nothing unknown", not dup_exec and not dup_res
              and not unknown, f"duplicate executions {list(dup_exec.items())[:3]}, duplicate results "
              f"{list(dup_res.items())[:3]}, unknown {unknown[:3]}" if dup_exec or dup_res or unknown else "")

        for what, ok, detail in reloader.events:
            check(f"reload: {what}", ok, detail)
        check("four reloads happened (2 instances x POST /reload, SIGHUP)", len(reloader.events) == 4
              and all(e[0] != "reloader" for e in reloader.events), f"{[e[0] for e in reloader.events]}")
        at = dict(reloader.executed_at)
        ledger["tasks executed at the reloads"] = ", ".join(f"{k} {v}" for k, v in reloader.executed_at)
        flowing = (len(at) == 4 and 0 < at["POST /reload start"] and at["SIGHUP end"] < n)
        check("the reloads happened while tasks ran (executions at each step strictly between 0 and N)",
              flowing, ", ".join(f"{k}: {v}" for k, v in reloader.executed_at))
        errors_after = {w.name: w.metric("warren_config_reloads_total", result="error") for w in instances}
        check("no reload rejected", errors_after == errors_before, f"{errors_before} -> {errors_after}")
        lost_conn = [ln for ln in celery.worker_logs().splitlines()
                     if re.search(r"Connection to broker lost|consumer: Cannot connect|ConnectionResetError", ln)]
        check("no worker lost its broker connection", not lost_conn, lost_conn[0][:300] if lost_conn else "")

        # Both instances carried Celery's connections (HAProxy's leastconn spread them).
        srv = ha.servers()
        opened = {w.name: w.metric("warren_client_connections_opened_total") - base[w.name][0]
                  for w in instances}
        traffic = {w.name: sum(v for k, v in w.metrics().items()
                               if k.startswith(("warren_publishes_total{", "warren_deliveries_total{")))
                   for w in instances}
        stot = {k: int(r["stot"]) for k, r in srv.items()}
        ledger["connections via HAProxy"] = stot
        ledger["connections opened per instance"] = {k: int(v) for k, v in opened.items()}
        check("HAProxy spread the connections over both instances, and both carried messages",
              all(v > 0 for v in stot.values()) and all(v > 0 for v in opened.values())
              and all(v > 0 for v in traffic.values()),
              f"HAProxy sessions per server {stot}; warren connections opened {opened}; "
              f"publishes+deliveries {traffic}")
        # The test's own wait for HAProxy's port (connect, close) is relayed too: warren counts it
        # as a probe, not as a client connection.
        probes = {w.name: w.metric("warren_client_probes_total") - base[w.name][1] for w in instances}
        refused = {w.name: w.metric("warren_client_connections_refused_total") - base[w.name][2]
                   for w in instances}
        ledger["bare TCP probes per instance"] = {k: int(v) for k, v in probes.items()}
        check("HAProxy's sessions per server = the connections each instance got (opened + probes + refused)",
              all(stot.get(w.name) == opened[w.name] + probes[w.name] + refused[w.name] for w in instances),
              f"HAProxy {stot}; warren opened {opened}, probes {probes}, refused {refused}")
        t = time.monotonic()
        problems = celery.stop()
        timings["stop workers"] = time.monotonic() - t
        check("workers stop cleanly (SIGTERM, no stray process)", not problems, "; ".join(problems))
        # The driver's own connections (producer pool, rpc:// result consumer) go too, so that no
        # client of the Celery part is left on either instance.
        for close in (lambda: app.backend.result_consumer.stop(), lambda: app.pool.force_close_all()):
            try:
                close()
            except Exception as e:  # noqa: BLE001
                log(f"(closing the driver's Celery connections: {e!r})")
        left: dict[str, float] = {}

        def no_clients() -> bool:
            for w in instances:
                left[w.name] = w.metric("warren_client_connections")
            return not any(left.values())

        gone = eventually(no_clients, 10, 0.2)
        check("no Celery connection left on either instance", gone, f"warren_client_connections {left}")
        try:  # the run's task queue (durable, on every cluster), now empty
            c = amqp.Connection(f"127.0.0.1:{w2.listen}", connect_timeout=10)
            c.connect()
            c.channel().queue_delete(celery.queue)
            c.close()
        except Exception as e:  # noqa: BLE001
            log(f"(could not delete {celery.queue}: {e!r})")

        # ---- 3. the same depth from either instance -------------------------------------------------
        t = time.monotonic()
        depth = depth_part(args, w1, w2, check)
        timings["depth part"] = time.monotonic() - t

        # ---- 4. rolling stop of instance 1 -------------------------------------------------------
        t = time.monotonic()
        holder = amqp.Connection(f"127.0.0.1:{w1.listen}", heartbeat=10, connect_timeout=10)
        holder.connect()
        opened2 = w2.metric("warren_client_connections_opened_total")
        log(f"SIGTERM {w1.name} with a client connected to it (shutdown grace {GRACE_MS} ms)")
        t_term = time.monotonic()
        w1.proc.send_signal(signal.SIGTERM)
        st = {}

        def not_ready() -> bool:
            st["ready"] = w1.get("/ready")
            return st["ready"][0] == 503

        check("warren-1 /ready answers 503 (shutting down) during the grace", eventually(not_ready, 3, 0.05)
              and "shutting down" in st["ready"][1], f"{st.get('ready')}")

        def down() -> bool:
            st["srv"] = ha.servers().get("warren-1", {})
            return st["srv"].get("status") == "DOWN"

        is_down = eventually(down, 10, 0.1)
        took = time.monotonic() - t_term
        r = st.get("srv", {})
        check("HAProxy marks warren-1 DOWN within inter x fall + 2 s (6 s), before the grace ends",
              is_down and took <= 6.0 and w1.proc.poll() is None,
              f"{r.get('status')} {r.get('check_status')} {r.get('check_code')} after {took:.1f}s")
        ok_new = False
        detail = ""
        try:
            c = amqp.Connection(f"127.0.0.1:{front}", confirm_publish=True, connect_timeout=10)
            c.connect()
            ch = c.channel()
            q = f"haproxy-e2e.rt.{uuid.uuid4().hex[:8]}"
            ch.queue_declare(q, durable=False, auto_delete=False)
            ch.basic_publish(amqp.Message("x"), routing_key=q)
            got = None
            end = time.monotonic() + 10
            while got is None and time.monotonic() < end:
                got = ch.basic_get(q, no_ack=True)
                if got is None:
                    time.sleep(0.1)
            ch.queue_delete(q)
            c.close()
            ok_new = got is not None
            detail = "round trip ok" if ok_new else "published, not got back"
        except Exception as e:  # noqa: BLE001
            detail = repr(e)
        opened2b = w2.metric("warren_client_connections_opened_total")
        check("a new connection through HAProxy lands on warren-2 and works", ok_new and opened2b == opened2 + 1,
              f"{detail}; warren-2 connections opened {opened2:.0f} -> {opened2b:.0f}")
        holder.close()
        holder = None
        try:
            code = w1.proc.wait(timeout=GRACE_MS / 1000 + 20)
        except subprocess.TimeoutExpired:
            code = None
        exit_codes[w1.name] = code
        check("warren-1 exits 0 once its client has left", code == 0,
              f"exit {code} {time.monotonic() - t_term:.1f}s after SIGTERM")
        timings["rolling stop of warren-1"] = time.monotonic() - t
    except Exception as e:  # noqa: BLE001
        import traceback
        check("the test ran to the end", False, f"{e!r}\n{traceback.format_exc(limit=6)}")
    finally:
        if holder is not None:
            try:
                holder.close()
            except Exception:  # noqa: BLE001
                pass
        if celery is not None and any(p.poll() is None for _, p, _ in celery.workers):
            celery.stop()
        if ha is not None:
            ha.stop()
        for w in instances:
            if w.name not in exit_codes:
                exit_codes[w.name] = w.stop()
                check(f"{w.name} exits 0 on SIGTERM", exit_codes[w.name] == 0, f"exit code {exit_codes[w.name]}")
            panics = [ln for ln in w.log_text().splitlines() if "panicked" in ln]
            check(f"no panic in the {w.name} log", not panics, panics[0][:300] if panics else "")

    total = time.monotonic() - T0
    print()
    print("==================== haproxy_e2e summary ====================")
    print(f"  HAProxy 127.0.0.1:{front} -> warren-1 :{l1} (admin :{a1}), warren-2 :{l2} (admin :{a2})")
    if ledger:
        print("  Celery ledger (through HAProxy, reloads while running):")
        for k, v in ledger.items():
            print(f"    {k:<32} {v}")
    if depth:
        print(f"  depth part (queue {depth.get('queue')}):")
        for k, v in depth.items():
            if k != "queue":
                print(f"    {k:<32} {v}")
    print("  timings:")
    for k, v in timings.items():
        print(f"    {k:<40} {v:6.1f}s")
    print(f"    {'total':<40} {total:6.1f}s")
    print(f"haproxy_e2e: {len(checks.items) - len(checks.failed)} of {len(checks.items)} checks passed")
    if checks.failed:
        for _, name, detail in checks.failed:
            print(f"  FAIL {name}{': ' + detail if detail else ''}")
        for w in instances:
            print(f"\n{w.name} log {w.log_path} (kept; last 2000 characters):")
            print(w.log_text()[-2000:])
        if ha is not None and os.path.exists(ha.log_path):
            print(f"\nhaproxy log {ha.log_path} (kept; last 2000 characters):")
            print(ha.log_text()[-2000:])
        if celery is not None:
            for n_, _, lf in celery.workers:
                lines = lf.read_text(errors="replace").splitlines() if lf.exists() else []
                bad = [ln for ln in lines if re.search(r"ERROR|CRITICAL|Traceback|WARNING", ln)]
                print(f"\n{n_} log {lf}: {len(bad)} warning/error lines; last ones:")
                for ln in bad[-10:]:
                    print(f"    {ln}")
        print(f"\nhaproxy_e2e: FAILED (files in {tmp})")
        return 1
    print("haproxy_e2e: OK")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
