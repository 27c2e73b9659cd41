#!/usr/bin/env python3
"""More Celery and kombu patterns through one broker URL, for diffing warren against RabbitMQ.

    .venv/bin/python tests/e2e/celery_more.py BROKER_URL [--only S1,S2,...] [--drop-delayed]

Complements celery_patterns.py and kombu_edge.py. Starts prefork workers (app
tests/e2e/more_app.py) as subprocesses, runs the scenarios below and prints one deterministic
observation line per check on stdout:

    OBS <scenario>.<check>: <value>

(counts, states, sorted values; run ids and UUIDs normalised; never timings), so that

    diff <(celery_more.py amqp://guest:guest@127.0.0.1:5701// | grep ^OBS) \\
         <(celery_more.py amqp://guest:guest@127.0.0.1:5676// | grep ^OBS)

shows where the broker makes Celery behave differently. Progress goes to stderr.

Scenarios (classic app, two workers w1 and w2 on the same queues, -c 2, prefetch multiplier 1):
  two       two workers, one queue: every task once (ledger), both work, ping / stats see both,
            a 30-task group collected with rpc://
  routing   task_default_exchange_type=topic, task_create_missing_queues, a headers exchange
            bound on the task-name header, a queue with two bindings (direct + fanout),
            inspect active_queues
  failure   task_acks_on_failure_or_timeout True / False (rejected -> dead-letter queue, x-death),
            task_reject_on_worker_lost with the pool child SIGKILLed from outside mid-task
  results   result.get(timeout) that times out, then the late result; task expires (message
            TTL on a queue nobody consumes; expired on arrival at the worker)
  fairness  8 slow tasks over two workers with prefetch 1 x 2: no worker holds more than 2
  cli       `celery purge -Q`, `celery amqp` queue.declare / basic.publish / basic.get /
            queue.purge / queue.delete, `celery inspect active_queues` (CLI)
  sac       two workers (-c 1) started at once on an x-single-active-consumer queue: one runs
  kombu     no_ack consumer, quorum queue x-delivery-limit with requeue (x-delivery-count),
            basic.qos global=True consuming a quorum queue, queue.delete if_unused / if_empty
            of a quorum queue, a server-named quorum queue, two kombu consumers starting at
            once on an x-single-active-consumer queue (16 trials), two connections declaring one
            exclusive queue / taking one exclusive consumer at once (10 trials each)
Scenarios (quorum app: worker wq, quorum task queue on a topic exchange):
  quorum    worker_detect_quorum_queues (per-consumer QoS), native delayed delivery topology
            (celery_delayed_*), countdown tasks through it (once each, not early, on time),
            retry(countdown) through it, countdown to a quorum queue on a direct exchange,
            add_consumer / cancel_consumer of a quorum queue

Queues and exchanges carry the run id and are deleted at the end (through the broker URL; listed
with the clusters' management APIs). Remote control uses the exchange `more<run>` unless --default-control. The celery_delayed_* topology is shared by every Celery
app on the vhost, so it is deleted only with --drop-delayed (and only when empty).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from base64 import b64encode
from collections import Counter
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
T0 = time.monotonic()
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
GEN_RE = re.compile(r"(amq|warren)\.gen-[A-Za-z0-9_-]{22}")
MGMT = [urls.split("=", 1)[1].split(",")[0]
        for urls in os.environ.get("WARREN_TEST_MANAGEMENT", "").split(";") if "=" in urls] or [
    "http://127.0.0.1:15701", "http://127.0.0.1:15711", "http://127.0.0.1:15721"]


def log(msg: str) -> None:
    print(f"[more {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def err(e: BaseException) -> str:
    code = getattr(e, "code", None) or getattr(e, "reply_code", None)
    return f"{type(e).__name__}" + (f" {code}" if code else "")


class Driver:
    def __init__(self, args):
        self.args = args
        self.run = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="warren-more-"))
        self.out = self.tmp / "executions.txt"
        self.env = dict(os.environ)
        self.env.update({
            "MORE_BROKER": args.broker,
            "MORE_RUN": self.run,
            "MORE_OUT": str(self.out),
            "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH"))
                                          if p),
            "PYTHONDONTWRITEBYTECODE": "1",
            "MORE_CONTROL": "default" if args.default_control else "run",
        })
        self.procs: dict[str, subprocess.Popen] = {}
        self.n_obs = 0
        self.timings: list[tuple[str, float]] = []
        self.apps = {}
        self.delayed_before: set[str] = set()

    # -- output ---------------------------------------------------------------------------------

    def norm(self, v) -> str:
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        s = s.replace(self.run, "RUN")
        s = UUID_RE.sub("UUID", s)
        s = GEN_RE.sub("GEN", s)
        return s

    def obs(self, key: str, value) -> None:
        self.n_obs += 1
        print(f"OBS {key}: {self.norm(value)}", flush=True)

    # -- apps and processes ---------------------------------------------------------------------

    def app(self, kind: str):
        """The driver's own instance of more_app for one kind (module loaded once per kind)."""
        if kind not in self.apps:
            os.environ.update(self.env)
            os.environ["MORE_KIND"] = kind
            spec = importlib.util.spec_from_file_location(f"more_app_{kind}", HERE / "more_app.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self.apps[kind] = mod
        return self.apps[kind]

    def node(self, short: str) -> str:
        return f"{short}-{self.run}@more"

    def short(self, host: str) -> str:
        return host.split("-", 1)[0]

    def start_worker(self, short, kind, queues, concurrency=2, prefetch=1):
        env = dict(self.env, MORE_KIND=kind, MORE_PREFETCH=str(prefetch))
        logf = open(self.tmp / f"{short}.log", "a")
        cmd = [sys.executable, "-m", "celery", "-A", "more_app", "worker", "--pool", "prefork",
               "-c", str(concurrency), "-n", self.node(short), "-Q", ",".join(queues),
               "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.procs[short] = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=logf,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        log(f"started worker {short} (pid {self.procs[short].pid}, {kind}) on {queues}")

    def wait_ping(self, app, short: str, timeout=60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.procs[short]
            if p.poll() is not None:
                log(f"worker {short} exited with {p.returncode} during startup")
                return False
            try:
                r = app.control.ping(destination=[self.node(short)], timeout=1.0)
            except Exception as e:  # noqa: BLE001
                log(f"ping: {type(e).__name__}: {e}")
                time.sleep(1)
                continue
            if any(self.node(short) in d for d in r):
                log(f"worker {short} answers ping")
                return True
        log(f"worker {short} not answering ping after {timeout}s")
        return False

    def stop(self, short: str, timeout=30) -> int | None:
        p = self.procs.pop(short, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{short} did not stop within {timeout}s of SIGTERM: killing its group")
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return p.returncode

    def celery_cli(self, kind: str, args: list[str], timeout=60) -> tuple[int, str]:
        env = dict(self.env, MORE_KIND=kind)
        try:
            cp = subprocess.run([sys.executable, "-m", "celery", "-A", "more_app"] + args,
                                cwd=HERE, env=env, capture_output=True, text=True,
                                timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, "timeout"
        return cp.returncode, (cp.stdout + cp.stderr).strip()

    # -- executions file ------------------------------------------------------------------------

    def lines(self, tag: str | None = None) -> list[dict]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        rows = []
        for ln in text.splitlines():
            f = ln.split(" ", 10)
            if len(f) < 10:
                continue
            row = {"tag": f[0], "id": f[1], "host": f[2], "pid": int(f[3]),
                   "redelivered": f[4] == "1", "retries": int(f[5]), "eta": f[6],
                   "now": float(f[7]), "exchange": f[8], "rk": f[9],
                   "extra": f[10] if len(f) > 10 else ""}
            if tag is None or row["tag"] == tag:
                rows.append(row)
        return rows

    def wait_lines(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.lines()):
                return True
            time.sleep(0.2)
        return pred(self.lines())

    def runs_per_id(self, ids, tag=None) -> list:
        c = Counter(r["id"] for r in self.lines(tag))
        return sorted(Counter(c[i] for i in ids).items())  # [(runs, how many ids)]

    def early_late(self, rows, late_after: float) -> list[int]:
        """[runs before their ETA, runs more than late_after seconds after it]."""
        early = late = 0
        for r in rows:
            if r["eta"] != "-":
                eta = datetime.fromisoformat(r["eta"]).timestamp()
                early += r["now"] < eta - 0.05
                late += r["now"] > eta + late_after
        return [early, late]

    def get(self, r, timeout):
        try:
            return r.get(timeout=timeout)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}"

    # -- kombu helpers --------------------------------------------------------------------------

    def conn(self):
        from kombu import Connection  # noqa: PLC0415
        c = Connection(self.args.broker, transport_options={"confirm_publish": True})
        c.connect()
        return c

    def passive(self, c, name: str):
        ch = c.channel()
        try:
            _, n, cons = ch.queue_declare(name, passive=True)
            return [n, cons]
        except Exception as e:  # noqa: BLE001
            return err(e)
        finally:
            try:
                ch.close()
            except Exception:  # noqa: BLE001
                pass

    def exchange_exists(self, c, name: str):
        ch = c.channel()
        try:
            ch.exchange_declare(name, "topic", passive=True)
            return True
        except Exception as e:  # noqa: BLE001
            return err(e)
        finally:
            try:
                ch.close()
            except Exception:  # noqa: BLE001
                pass

    # -- classic scenarios ----------------------------------------------------------------------

    def s_two(self):
        a = self.app("classic")
        app = a.app
        ids = []
        rs = [a.mark.delay("two") for _ in range(40)]
        vals = [self.get(r, 30) for r in rs]
        ids = [r.id for r in rs]
        time.sleep(1)
        self.obs("two.results", Counter(vals))
        self.obs("two.runs_per_id", self.runs_per_id(ids, "two"))
        hosts = Counter(self.short(x["host"]) for x in self.lines("two"))
        log(f"two: per worker {dict(hosts)}")
        self.obs("two.both_workers_ran", sorted(hosts))
        pong = app.control.ping(timeout=2)
        self.obs("two.ping", sorted(self.short(n) for d in pong for n in d if self.run in n))
        st = app.control.inspect(timeout=3).stats() or {}
        st = {self.short(k): v for k, v in st.items() if self.run in k}
        self.obs("two.stats_nodes", sorted(st))
        self.obs("two.stats_prefetch", sorted((k, v.get("prefetch_count")) for k, v in st.items()))
        self.obs("two.stats_broker", sorted(
            (k, v.get("broker", {}).get("transport"), v.get("broker", {}).get("virtual_host"))
            for k, v in st.items()))
        from celery import group  # noqa: PLC0415
        g = group(a.add.s(i, i) for i in range(30)).apply_async()
        self.obs("two.group30_rpc", self.get(g, 30) == [2 * i for i in range(30)])
        gids = [r.id for r in g.results]
        self.obs("two.group30_runs_per_id", self.runs_per_id(gids, "add"))

    def s_routing(self):
        a = self.app("classic")
        app = a.app
        r = a.mark.delay("deftopic")
        self.obs("routing.default_topic", self.get(r, 20))
        rows = [x for x in self.lines("deftopic") if x["id"] == r.id]
        self.obs("routing.default_topic.delivery", [[x["exchange"], x["rk"]] for x in rows])
        r = a.auto.delay()
        self.obs("routing.create_missing_queue", self.get(r, 20))
        r = a.hdr.delay()
        self.obs("routing.headers_exchange", self.get(r, 20))
        rows = [x for x in self.lines("hdr") if x["id"] == r.id]
        self.obs("routing.headers_exchange.runs", len(rows))
        r1 = a.mark.apply_async(("m1",), exchange=a.X_M1, routing_key="m1")
        r2 = a.mark.apply_async(("m2",), exchange=a.X_M2, routing_key="whatever")
        self.obs("routing.multi_binding", [self.get(r1, 20), self.get(r2, 20)])
        time.sleep(0.5)
        self.obs("routing.multi_binding.runs", [len(self.lines("m1")), len(self.lines("m2"))])
        with self.conn() as c:
            self.obs("routing.exchanges", [self.exchange_exists(c, x)
                                           for x in (a.X_DEF, a.Q_AUTO, a.X_M1, a.X_M2)])
            self.obs("routing.queue_counts", [self.passive(c, q) for q in
                                              (a.Q_MAIN, a.Q_AUTO, a.Q_HDR, a.Q_MULTI)])
        aq = (app.control.inspect(destination=[self.node("w1")], timeout=3).active_queues()
              or {}).get(self.node("w1"))
        self.obs("routing.active_queues", None if aq is None else sorted(
            [q["name"], (q.get("exchange") or {}).get("name"),
             (q.get("exchange") or {}).get("type"), q["routing_key"],
             q.get("binding_arguments"), len(q.get("bindings") or []),
             q.get("queue_arguments")] for q in aq))

    def s_failure(self):
        a = self.app("classic")
        r = a.fail.delay("fail_ack")
        self.obs("failure.acked.state", [self.get(r, 20), r.state])
        r = a.fail_noack.delay("fail_noack")
        self.obs("failure.not_acked.state", [self.get(r, 20), r.state])
        time.sleep(1.5)
        self.obs("failure.runs", [len(self.lines("fail_ack")), len(self.lines("fail_noack"))])
        from kombu import Queue  # noqa: PLC0415
        with self.conn() as c:
            self.obs("failure.dlq_count", self.passive(c, a.Q_DLQ))
            self.obs("failure.failq_count", self.passive(c, a.Q_FAIL))
            m = Queue(a.Q_DLQ)(c.default_channel).get(no_ack=True)
            if m is None:
                self.obs("failure.dlq_message", None)
            else:
                self.obs("failure.dlq_message", [
                    m.headers.get("task"), m.headers.get("id") == r.id,
                    [(d.get("reason"), d.get("queue"), d.get("count"))
                     for d in m.headers.get("x-death", [])]])
        # reject_on_worker_lost: the pool child running the task is SIGKILLed from outside
        r = a.lost.delay("lost", 3)
        ok = self.wait_lines(lambda ls: any(x["id"] == r.id and x["extra"] == "start"
                                            for x in ls), 20)
        self.obs("failure.lost.started", ok)
        if ok:
            pid = [x for x in self.lines("lost") if x["id"] == r.id][0]["pid"]
            os.kill(pid, signal.SIGKILL)
        self.obs("failure.lost.result", self.get(r, 40))
        time.sleep(1)
        rows = [x for x in self.lines("lost") if x["id"] == r.id]
        self.obs("failure.lost.runs", sorted((x["extra"], x["redelivered"]) for x in rows))

    def s_results(self):
        a = self.app("classic")
        r = a.slow.apply_async(("late", 2))
        self.obs("results.short_timeout", self.get(r, 0.5))
        other = a.add.delay(5, 5)
        self.obs("results.other_meanwhile", self.get(other, 20))
        self.obs("results.late_result", self.get(r, 20))
        self.obs("results.late_state", r.state)
        # expires: per-message TTL on a queue nobody consumes
        rs = [a.mark.apply_async(("exp",), queue=a.Q_NOCONS, expires=1) for _ in range(3)]
        keep = [a.mark.apply_async(("noexp",), queue=a.Q_NOCONS) for _ in range(2)]
        time.sleep(2.5)
        with self.conn() as c:
            self.obs("results.expires_queue_count", self.passive(c, a.Q_NOCONS))
            ch = c.channel()
            got = []
            while True:
                m = ch.basic_get(a.Q_NOCONS, no_ack=True)
                if m is None:
                    break
                got.append(json.loads(m.body)[0][0] if m.body else None)
            self.obs("results.expires_left", sorted(got))
            ch.close()
        self.obs("results.expired_states", sorted(r.state for r in rs + keep))
        # expires in the past when the worker reads it: the worker revokes it (no run)
        r = a.slow.apply_async(("exp2", 0), expires=30)
        self.obs("results.not_expired_runs", self.get(r, 20))

    def s_fairness(self):
        a = self.app("classic")
        app = a.app
        rs = [a.slow.apply_async((f"fair{i}", 2)) for i in range(8)]
        time.sleep(1.2)
        insp = app.control.inspect(timeout=2)
        act, res = insp.active() or {}, insp.reserved() or {}
        held = {self.short(k): len(act.get(k, [])) + len(res.get(k, []))
                for k in set(act) | set(res) if self.run in k}
        log(f"fairness: held {held}")
        self.obs("fairness.max_held_le_2", bool(held) and max(held.values()) <= 2)
        self.obs("fairness.results", [self.get(r, 40) for r in rs] == [2] * 8)
        hosts = Counter(self.short(x["host"]) for x in self.lines()
                        if x["tag"].startswith("fair") and x["extra"] == "start")
        log(f"fairness: runs per worker {dict(hosts)}")
        self.obs("fairness.both_ran", sorted(hosts))

    def s_cli(self):
        a = self.app("classic")
        for i in range(5):
            a.mark.apply_async((f"purge{i}",), queue=a.Q_NOCONS)
        rc, out = self.celery_cli("classic", ["purge", "-f", "-Q", a.Q_NOCONS])
        self.obs("cli.purge", [rc, out.splitlines()[-1:] if out else out])
        q = f"{a.P}.amqpq"
        for label, args in (
                ("queue.declare", ["queue.declare", q]),
                ("basic.publish", ["basic.publish", "hello", "", q]),
                ("basic.publish2", ["basic.publish", "world", "", q]),
                ("queue.declare.passive", ["queue.declare", q, "true"]),
                ("basic.get", ["basic.get", q, "true"]),
                ("queue.purge", ["queue.purge", q]),
                ("queue.delete", ["queue.delete", q]),
                ("queue.declare.passive_missing", ["queue.declare", q, "true"])):
            rc, out = self.celery_cli("classic", ["amqp"] + args)
            # keep the last line (the answer); drop the connection banner
            lines = [ln for ln in out.splitlines() if ln.strip() and "Connected" not in ln
                     and "connect" not in ln.lower()]
            self.obs(f"cli.amqp.{label}", [rc, lines[-1:]])
        rc, out = self.celery_cli("classic", ["inspect", "active_queues", "-d",
                                              self.node("w1"), "-j", "--timeout", "3"])
        try:
            d = json.loads(out.splitlines()[-1] if out else "{}")
            self.obs("cli.inspect_active_queues", sorted(q["name"] for q in d.get(
                self.node("w1"), [])))
        except Exception:  # noqa: BLE001
            self.obs("cli.inspect_active_queues", [rc, out[-200:]])

    def s_kombu(self):
        from kombu import Consumer, Producer, Queue  # noqa: PLC0415
        a = self.app("classic")
        qn = f"{a.P}.noack"
        with self.conn() as c:
            q = Queue(qn, durable=False, auto_delete=False)
            p = Producer(c.channel())
            for i in range(20):
                p.publish({"i": i}, routing_key=qn, declare=[q])
            got = []
            cons = Consumer(c.channel(), [q], no_ack=True,
                            callbacks=[lambda body, m: got.append(body["i"])])
            with cons:
                deadline = time.monotonic() + 5
                while len(got) < 20 and time.monotonic() < deadline:
                    try:
                        c.drain_events(timeout=0.5)
                    except Exception:  # noqa: BLE001
                        pass
            self.obs("kombu.no_ack.received", sorted(got) == list(range(20)))
            self.obs("kombu.no_ack.left", self.passive(c, qn))
            q(c.default_channel).delete()

            # quorum queue with x-delivery-limit: requeued until dead-lettered
            qq = f"{a.P}.qlimit"
            dlq = f"{a.P}.qlimit.dlq"
            Queue(dlq)(c.default_channel).declare()
            q = Queue(qq, queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 2,
                                           "x-dead-letter-exchange": "",
                                           "x-dead-letter-routing-key": dlq})
            p.publish({"poison": 1}, routing_key=qq, declare=[q])
            counts = []
            for _ in range(5):
                m = q(c.default_channel).get(no_ack=False)
                if m is None:
                    time.sleep(0.3)
                    m = q(c.default_channel).get(no_ack=False)
                if m is None:
                    counts.append(None)
                    break
                counts.append([m.headers.get("x-delivery-count"),
                               m.delivery_info.get("redelivered")])
                m.requeue()
            self.obs("kombu.quorum_delivery_limit.gets", counts)
            time.sleep(0.5)
            self.obs("kombu.quorum_delivery_limit.dlq", self.passive(c, dlq))
            self.obs("kombu.quorum_delivery_limit.q", self.passive(c, qq))
            m = Queue(dlq)(c.default_channel).get(no_ack=True)
            self.obs("kombu.quorum_delivery_limit.x_death",
                     None if m is None else [(d.get("reason"), d.get("count"))
                                             for d in m.headers.get("x-death", [])])

            # a global (per-channel) prefetch consuming a quorum queue
            qg = f"{a.P}.qglobal"
            q = Queue(qg, queue_arguments={"x-queue-type": "quorum"})
            for i in range(6):
                p.publish({"i": i}, routing_key=qg, declare=[q])
            ch = c.channel()
            got = []
            try:
                ch.basic_qos(0, 2, True)
                cons = Consumer(ch, [q], no_ack=False, callbacks=[lambda b, m: got.append(m)])
                cons.consume()
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    try:
                        c.drain_events(timeout=0.3)
                    except Exception as e:  # noqa: BLE001
                        if "timed out" not in str(e) and not isinstance(e, TimeoutError):
                            raise
                self.obs("kombu.quorum_global_qos.held", len(got))
                for m in got:
                    m.ack()
            except Exception as e:  # noqa: BLE001
                self.obs("kombu.quorum_global_qos.held", err(e))
            try:
                ch.close()
            except Exception:  # noqa: BLE001
                pass

        # queue.delete with if_unused / if_empty of a quorum queue, each on a connection of its
        # own (RabbitMQ 3.10 answers with a connection error); does the queue survive?
        for label, consume, if_unused, if_empty in (
                ("if_unused_idle", False, True, False), ("if_empty_empty", False, False, True),
                ("if_unused_consumed", True, True, False)):
            qn = f"{a.P}.qdel.{label}"
            with self.conn() as c, self.conn() as other:
                q = Queue(qn, queue_arguments={"x-queue-type": "quorum"})
                q(c.default_channel).declare()
                if consume:
                    other.default_channel.basic_consume(qn, callback=lambda m: None)
                try:
                    res = ["delete-ok", q(c.channel()).delete(if_unused=if_unused,
                                                              if_empty=if_empty)]
                except Exception as e:  # noqa: BLE001
                    res = [err(e)]
                with self.conn() as c2:
                    res.append(self.passive(c2, qn))
                    try:
                        c2.default_channel.queue_delete(qn)
                    except Exception:  # noqa: BLE001
                        pass
                self.obs(f"kombu.quorum_delete.{label}", res)

        # a server-named (anonymous) quorum queue
        with self.conn() as c:
            try:
                name, n, k = c.default_channel.queue_declare(
                    "", durable=True, exclusive=False, auto_delete=False,
                    arguments={"x-queue-type": "quorum"})
                self.obs("kombu.quorum_server_named", ["declare-ok", n, k])
                c.channel().queue_delete(name)
            except Exception as e:  # noqa: BLE001
                self.obs("kombu.quorum_server_named", [err(e)])

        # x-single-active-consumer with two consumers starting at once: one broker makes one
        # of them active; through several shard clusters each cluster picks its own, and the
        # two must be the same one (warren sends the second subscribe once the first is
        # answered everywhere).
        self.obs("kombu.sac_race.trials_with_two_active", self.kombu_sac_race(16))
        self.obs("kombu.exclusive_race", self.kombu_exclusive_race(10))

    def kombu_exclusive_race(self, trials: int) -> dict:
        """Two connections declare the same exclusive queue at the same moment (kombu
        Queue(exclusive=True) as a lock), and two take an exclusive basic.consume of one queue at
        the same moment. One broker: exactly one wins (the other gets 405 / 403). Returns
        {outcome: trials}."""
        import threading  # noqa: PLC0415

        from kombu import Connection, Queue  # noqa: PLC0415
        a = self.app("classic")
        hist: Counter = Counter()
        for kind in ("queue", "consumer"):
            for t in range(trials):
                qn = f"{a.P}.exrace.{kind}{t}"
                conns = [Connection(self.args.broker) for _ in range(2)]
                for c in conns:
                    c.connect()
                chans = [c.channel() for c in conns]
                with self.conn() as dc:
                    if kind == "consumer":
                        dc.default_channel.queue_declare(qn, durable=False, auto_delete=False)
                    warm = f"{a.P}.exrace.warm"
                    dc.default_channel.queue_declare(warm, durable=False, auto_delete=False)
                for ch in chans:  # links open before the race
                    ch.queue_declare(warm, passive=True)
                res = [None, None]
                bar = threading.Barrier(2)

                def go(i):
                    bar.wait()
                    try:
                        if kind == "queue":
                            Queue(qn, exclusive=True, durable=False)(chans[i]).declare()
                        else:
                            chans[i].basic_consume(qn, exclusive=True, callback=lambda m: None)
                        res[i] = "ok"
                    except Exception as e:  # noqa: BLE001
                        res[i] = str(getattr(e, "reply_code", None) or type(e).__name__)
                ths = [threading.Thread(target=go, args=(i,)) for i in range(2)]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                hist[f"{kind}:" + "+".join(sorted(res))] += 1
                for c in conns:
                    c.release()
                with self.conn() as dc:
                    for n in (qn, warm):
                        try:
                            dc.channel().queue_delete(n)
                        except Exception:  # noqa: BLE001
                            pass
        log(f"exclusive race: {dict(hist)}")
        return dict(sorted(hist.items()))

    def s_sac(self):
        """Two workers (-c 1) started at the same moment on one x-single-active-consumer queue:
        one broker lets one of them consume; the other waits."""
        a = self.app("classic")
        for short in ("s1", "s2"):
            self.start_worker(short, "classic", [a.Q_SAC], concurrency=1)
        self.obs("sac.ping", [self.wait_ping(a.app, "s1"), self.wait_ping(a.app, "s2")])
        rs = [a.serial.delay(i) for i in range(16)]
        self.obs("sac.results", sorted(self.get(r, 40) for r in rs) == list(range(16)))
        rows = self.lines("serial")
        hosts = Counter(self.short(x["host"]) for x in rows if x["extra"] == "start")
        log(f"sac: runs per worker {dict(hosts)}")
        self.obs("sac.workers_that_ran", len(hosts))
        # overlapping executions (start of one before the end of another)
        ev = sorted((x["now"], 1 if x["extra"] == "start" else -1) for x in rows)
        cur = peak = 0
        for _, d in ev:
            cur += d
            peak = max(peak, cur)
        self.obs("sac.max_concurrent", peak)
        for short in ("s1", "s2"):
            self.stop(short)

    def kombu_sac_race(self, trials: int) -> int:
        """Two connections consume one x-single-active-consumer queue, their basic.consume sent
        at the same moment; 40 messages. Returns in how many trials both consumers got some."""
        import threading  # noqa: PLC0415

        import amqp  # noqa: PLC0415
        from kombu import Connection  # noqa: PLC0415
        a = self.app("classic")
        both = 0
        for t in range(trials):
            qn = f"{a.P}.sacrace{t}"
            conns = [Connection(self.args.broker) for _ in range(2)]
            for c in conns:
                c.connect()
            with self.conn() as dc:
                dc.default_channel.queue_declare(qn, durable=True, auto_delete=False,
                                                 arguments={"x-single-active-consumer": True})
            chans = [c.channel() for c in conns]
            for ch in chans:  # both connections ready (their links open), then consume at once
                ch.basic_qos(0, 100, False)
                ch.queue_declare(qn, passive=True)
            got = [0, 0]
            bar = threading.Barrier(2)

            def start(i):
                bar.wait()
                chans[i].basic_consume(qn, no_ack=True,
                                       callback=lambda m, i=i: got.__setitem__(i, got[i] + 1))
            ths = [threading.Thread(target=start, args=(i,)) for i in range(2)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            with self.conn() as pc:
                ch = pc.channel()
                for k in range(40):
                    ch.basic_publish(amqp.Message(str(k)), "", qn)
            deadline = time.monotonic() + 3
            while sum(got) < 40 and time.monotonic() < deadline:
                for c in conns:
                    try:
                        c.drain_events(timeout=0.05)
                    except Exception:  # noqa: BLE001
                        pass
            log(f"sac race trial {t}: per consumer {got}")
            both += all(got)
            for c in conns:
                c.release()
            with self.conn() as pc:
                pc.default_channel.queue_delete(qn)
        return both

    # -- quorum scenario ------------------------------------------------------------------------

    def s_quorum(self):
        a = self.app("quorum")
        app = a.app
        self.start_worker("wq", "quorum", [a.Q_QQ, a.Q_QD], concurrency=2, prefetch=2)
        self.obs("quorum.ping", self.wait_ping(app, "wq"))
        time.sleep(2)  # the delayed-delivery bootstep declares its topology after start
        w = self.node("wq")
        insp = app.control.inspect(destination=[w], timeout=3)
        st = (insp.stats() or {}).get(w)
        self.obs("quorum.stats_prefetch", None if st is None else st.get("prefetch_count"))
        aq = (insp.active_queues() or {}).get(w)
        self.obs("quorum.active_queues", None if aq is None else sorted(
            [q["name"], q["exchange"]["type"], q["routing_key"], q.get("queue_arguments")]
            for q in aq))
        with self.conn() as c:
            self.obs("quorum.delayed_topology", [
                self.passive(c, "celery_delayed_27"), self.passive(c, "celery_delayed_0"),
                self.exchange_exists(c, "celery_delayed_27"),
                self.exchange_exists(c, "celery_delayed_delivery")])
            self.obs("quorum.task_queue", self.passive(c, a.Q_QQ))
        r = a.add.delay(1, 2)
        self.obs("quorum.plain_task", self.get(r, 20))
        # countdown tasks through the native delayed delivery chain
        rs = [a.mark.apply_async(("qcd",), countdown=3) for _ in range(6)]
        time.sleep(1)
        with self.conn() as c:
            n27 = [self.passive(c, f"celery_delayed_{lv}")[0] for lv in (0, 1)]
            log(f"quorum: delayed levels 0,1 hold {n27}")
        vals = [self.get(r, 30) for r in rs]
        time.sleep(1)
        rows = self.lines("qcd")
        self.obs("quorum.countdown.results", Counter(vals))
        self.obs("quorum.countdown.runs_per_id", self.runs_per_id([r.id for r in rs], "qcd"))
        self.obs("quorum.countdown.early_late5", self.early_late(rows, 5))
        self.obs("quorum.countdown.delivery", sorted({(x["exchange"], x["rk"]) for x in rows}))
        # retry(countdown=2) goes through the delayed chain again
        r = a.retry_cd.delay("qretry")
        self.obs("quorum.retry_countdown", self.get(r, 30))
        rows = [x for x in self.lines("qretry") if x["id"] == r.id]
        self.obs("quorum.retry_countdown.runs", sorted(x["retries"] for x in rows))
        self.obs("quorum.retry_countdown.delivery", sorted((x["exchange"], x["rk"])
                                                           for x in rows))
        # countdown to a quorum queue on a direct exchange: Celery warns and the worker holds it
        rs = [a.to_direct.apply_async(("qdirect",), countdown=2) for _ in range(3)]
        vals = [self.get(r, 30) for r in rs]
        time.sleep(0.5)
        self.obs("quorum.direct_countdown", Counter(vals))
        self.obs("quorum.direct_countdown.runs_per_id",
                 self.runs_per_id([r.id for r in rs], "qdirect"))
        self.obs("quorum.direct_countdown.early_late5", self.early_late(self.lines("qdirect"), 5))
        # an ETA in the past (countdown already over): runs at once
        rs = [a.mark.apply_async(("qpast",), countdown=-5) for _ in range(2)]
        self.obs("quorum.past_countdown", Counter(self.get(r, 20) for r in rs))
        # add_consumer / cancel_consumer of a quorum queue
        rep = app.control.add_consumer(a.Q_QNEW, exchange=a.Q_QNEW, exchange_type="direct",
                                       routing_key=a.Q_QNEW, reply=True, destination=[w],
                                       timeout=5,
                                       options={"queue_arguments": {"x-queue-type": "quorum"}})
        self.obs("quorum.add_consumer", rep)
        r = a.mark.apply_async(("qnew",), queue=a.Q_QNEW)
        self.obs("quorum.add_consumer.task", self.get(r, 20))
        rep = app.control.cancel_consumer(a.Q_QNEW, reply=True, destination=[w], timeout=5)
        self.obs("quorum.cancel_consumer", rep)
        time.sleep(1)
        r = a.mark.apply_async(("qnew2",), queue=a.Q_QNEW)
        ran = self.wait_lines(lambda ls: any(x["id"] == r.id for x in ls), 3)
        self.obs("quorum.cancel_consumer.task_waits", not ran)
        with self.conn() as c:
            self.obs("quorum.qnew_count", self.passive(c, a.Q_QNEW))
        aq = (insp.active_queues() or {}).get(w) or []
        self.obs("quorum.active_queues_after_cancel", sorted(q["name"] for q in aq))
        self.stop("wq")

    # -- cleanup --------------------------------------------------------------------------------

    def cluster_names(self, kind: str, pred) -> dict[str, int]:
        names: dict[str, int] = {}
        for base in MGMT:
            req = urllib.request.Request(f"{base}/api/{kind}/%2F?columns=name,messages")
            req.add_header("Authorization", "Basic " + b64encode(b"guest:guest").decode())
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    for q in json.load(resp):
                        if pred(q["name"]):
                            names[q["name"]] = names.get(q["name"], 0) + (q.get("messages") or 0)
            except Exception as e:  # noqa: BLE001
                log(f"management API {base}: {e}")
        return names

    def cleanup(self):
        mine = lambda n: self.run in n  # noqa: E731
        qs, xs = self.cluster_names("queues", mine), self.cluster_names("exchanges", mine)
        dq, dx = {}, {}
        if self.args.drop_delayed:
            delayed = lambda n: n.startswith("celery_delayed_")  # noqa: E731
            dq = {k: v for k, v in self.cluster_names("queues", delayed).items()}
            dx = self.cluster_names("exchanges", delayed)
            if any(dq.values()):
                log(f"cleanup: celery_delayed_* queues hold messages, kept: {dq}")
                dq, dx = {}, {}
        try:
            from kombu import Connection  # noqa: PLC0415
            with Connection(self.args.broker) as conn:
                for q in sorted(set(qs) | set(dq)):
                    conn.default_channel.queue_delete(q)
                for x in sorted(set(xs) | set(dx)):
                    conn.default_channel.exchange_delete(x)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: {type(e).__name__}: {e}")
        left = set(self.cluster_names("queues", mine)) | set(self.cluster_names("exchanges", mine))
        log(f"cleanup: deleted {len(qs)} queues, {len(xs)} exchanges "
            f"(+{len(dq)}/{len(dx)} celery_delayed_*); left: {sorted(left)}")

    # -- main -----------------------------------------------------------------------------------

    def main(self) -> int:
        sys.path.insert(0, str(HERE))
        a = self.app("classic")
        classic_q = [a.Q_MAIN, a.Q_AUTO, a.Q_HDR, a.Q_MULTI, a.Q_FAIL, a.Q_SLOW]
        log(f"run {self.run}, broker {self.args.broker}, files in {self.tmp}")
        classic = [
            ("two", self.s_two),
            ("routing", self.s_routing),
            ("failure", self.s_failure),
            ("results", self.s_results),
            ("fairness", self.s_fairness),
            ("cli", self.s_cli),
            ("kombu", self.s_kombu),
            ("sac", self.s_sac),
        ]
        only = set(self.args.only.split(",")) if self.args.only else None
        want = [(n, f) for n, f in classic if not only or n in only]
        try:
            if want:
                # the DLQ exists before a task fails into it
                from kombu import Queue  # noqa: PLC0415
                with self.conn() as c:
                    Queue(a.Q_DLQ)(c.default_channel).declare()
                self.start_worker("w1", "classic", classic_q)
                self.start_worker("w2", "classic", classic_q)
                self.obs("setup.w1_ping", self.wait_ping(a.app, "w1"))
                self.obs("setup.w2_ping", self.wait_ping(a.app, "w2"))
            for name, fn in want:
                self.scenario(name, fn)
            for short in ("w1", "w2"):
                self.stop(short)
            if not only or "quorum" in only:
                self.scenario("quorum", self.s_quorum)
        finally:
            for short in list(self.procs):
                self.stop(short)
            self.cleanup()
        for name, t in self.timings:
            log(f"timing {name}: {t:.1f}s")
        log(f"total {time.monotonic() - T0:.1f}s, {self.n_obs} observations, files in {self.tmp}")
        return 0

    def scenario(self, name, fn):
        t = time.monotonic()
        log(f"--- {name}")
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            self.obs(f"{name}.ERROR", f"{type(e).__name__}: {str(e)[:200]}")
        self.timings.append((name, time.monotonic() - t))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("broker", help="amqp://guest:guest@127.0.0.1:PORT//")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--default-control", action="store_true",
                    help="remote control on Celery's celery.pidbox names (default: names of "
                         "the run, which no other test deletes)")
    ap.add_argument("--drop-delayed", action="store_true",
                    help="also delete the shared celery_delayed_* topology when it is empty")
    args = ap.parse_args()
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
