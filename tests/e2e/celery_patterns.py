#!/usr/bin/env python3
"""Celery feature patterns through one broker URL, for diffing warren against RabbitMQ.

    .venv/bin/python tests/e2e/celery_patterns.py BROKER_URL [--only S1,S2,...] [--keep]

Starts prefork workers (app tests/e2e/patterns_app.py) and celery beat as subprocesses, runs the
scenarios below and prints one deterministic observation line per check on stdout:

    OBS <scenario>.<check>: <value>

(counts, states, sorted values; run ids and UUIDs normalised; never timings), so that

    diff <(celery_patterns.py amqp://guest:guest@127.0.0.1:5701// | grep ^OBS) \\
         <(celery_patterns.py amqp://guest:guest@127.0.0.1:5673// | grep ^OBS)

shows exactly where the broker makes Celery behave differently. Progress goes to stderr.
Scenarios: canvas, results (rpc://), eta (countdown, ETA reservations vs prefetch, warm restart
with reserved ETA tasks), retry, beat, timelimit, ratelimit, priority, routing (worker_direct,
topic exchange route, missing queue), join (waiting on subtasks inside a task), revoke, control
(inspect shapes, add/cancel_consumer), worker2 (revoke before start via mingle, broadcast,
chord on the file result backend, control.shutdown). Queues and exchanges carry the run id and
are deleted at the end (through the broker URL; listed with the clusters' management APIs).
"""
from __future__ import annotations

import argparse
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
# Management APIs of the local clusters (proxy.toml), to list this run's queues for cleanup.
# The clusters' management APIs, for the cleanup: WARREN_TEST_MANAGEMENT as scripts/test.sh
# exports it ("shard-a=http://H:P,http://H:P;shard-b=...;..."), else the quick-start clusters.
MGMT = [urls.split("=", 1)[1].split(",")[0]
        for urls in os.environ.get("WARREN_TEST_MANAGEMENT", "").split(";") if "=" in urls] or [
    "http://127.0.0.1:15701", "http://127.0.0.1:15711", "http://127.0.0.1:15721"]


def log(msg: str) -> None:
    print(f"[patterns {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Driver:
    def __init__(self, args):
        self.args = args
        self.run = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="warren-patterns-"))
        self.out = self.tmp / "executions.txt"
        self.filedir = self.tmp / "results"
        self.filedir.mkdir()
        self.env = dict(os.environ)
        self.env.update({
            "PAT_BROKER": args.broker,
            "PAT_RUN": self.run,
            "PAT_OUT": str(self.out),
            "PAT_FILE_DIR": str(self.filedir),
            "PAT_BACKEND": "rpc",
            "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH"))
                                          if p),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        self.procs: dict[str, subprocess.Popen] = {}
        self.n_obs = 0
        self.timings: list[tuple[str, float]] = []

    # -- output ---------------------------------------------------------------------------------

    def norm(self, v) -> str:
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        s = s.replace(self.run, "RUN")
        s = UUID_RE.sub("UUID", s)
        s = re.sub(r"bcastq\.[0-9a-f]{32}", "bcastq.UUID", s)
        return s

    def obs(self, key: str, value) -> None:
        self.n_obs += 1
        print(f"OBS {key}: {self.norm(value)}", flush=True)

    # -- processes ------------------------------------------------------------------------------

    def node(self, short: str) -> str:
        return f"{short}-{self.run}@pat"

    def start_worker(self, short: str, queues: list[str], backend="rpc", concurrency=2):
        env = dict(self.env, PAT_BACKEND=backend)
        logf = open(self.tmp / f"{short}.log", "a")
        cmd = [sys.executable, "-m", "celery", "-A", "patterns_app", "worker", "--pool",
               "prefork", "-c", str(concurrency), "-n", self.node(short), "-Q", ",".join(queues),
               "--loglevel", "INFO"]
        self.procs[short] = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=logf,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        log(f"started worker {short} (pid {self.procs[short].pid}) on {queues}")

    def wait_ping(self, short: str, timeout=60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.procs[short]
            if p.poll() is not None:
                log(f"worker {short} exited with {p.returncode} during startup")
                return False
            try:
                r = self.app.control.ping(destination=[self.node(short)], timeout=1.0)
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
        p = self.procs.get(short)
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
        try:  # pool children left behind
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return p.returncode

    # -- executions file ------------------------------------------------------------------------

    def lines(self, tag: str | None = None) -> list[dict]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        rows = []
        for ln in text.splitlines():
            f = ln.split(" ", 8)
            if len(f) < 8:
                continue
            row = {"tag": f[0], "id": f[1], "host": f[2], "pid": f[3], "redelivered": f[4] == "1",
                   "retries": int(f[5]), "eta": f[6], "now": float(f[7]),
                   "extra": f[8] if len(f) > 8 else ""}
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

    def early(self, rows) -> int:
        n = 0
        for r in rows:
            if r["eta"] != "-":
                eta = datetime.fromisoformat(r["eta"]).timestamp()
                n += r["now"] < eta - 0.05
        return n

    def short(self, host: str) -> str:
        return host.split("-", 1)[0]

    # -- scenarios ------------------------------------------------------------------------------

    def s_canvas(self):
        from celery import chain, chord, group  # noqa: PLC0415
        pa = self.pa
        c = chain(pa.add.s(1, 1), pa.add.s(1), pa.add.s(1), pa.add.s(1), pa.add.s(1))
        self.obs("canvas.chain5", c.apply_async().get(timeout=30))
        g = group(pa.add.s(i, i) for i in range(20)).apply_async()
        self.obs("canvas.group20", g.get(timeout=30) == [2 * i for i in range(20)])
        self.obs("canvas.group20.completed", g.completed_count())
        try:
            r = chord((pa.add.s(i, i) for i in range(10)), pa.tsum.s())()
            self.obs("canvas.chord_rpc", r.get(timeout=30))
        except Exception as e:  # noqa: BLE001
            self.obs("canvas.chord_rpc", f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
        # a group chained into a task is upgraded to a chord too
        try:
            r = (group(pa.add.s(i, i) for i in range(3)) | pa.tsum.s()).apply_async()
            self.obs("canvas.group_then_task_rpc", r.get(timeout=30))
        except Exception as e:  # noqa: BLE001
            self.obs("canvas.group_then_task_rpc",
                     f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
        # a chain whose middle is a group of one-arg tasks fed by the previous result
        r = chain(pa.add.s(1, 2), group(pa.add.s(10), pa.add.s(20))).apply_async()
        self.obs("canvas.chain_into_group", r.get(timeout=30))

    def s_results(self):
        from celery.result import AsyncResult  # noqa: PLC0415
        pa = self.pa
        r = pa.add.delay(2, 3)
        self.obs("results.get_twice", [r.get(timeout=20), r.get(timeout=20)])
        r2 = AsyncResult(r.id, app=self.app)
        try:
            self.obs("results.fresh_asyncresult_get", r2.get(timeout=5))
        except Exception as e:  # noqa: BLE001
            self.obs("results.fresh_asyncresult_get", type(e).__name__)
        r.forget()
        self.obs("results.state_after_forget", AsyncResult(r.id, app=self.app).state)
        # state by polling (basic.get on the reply queue), the result arriving unwatched
        r4 = pa.add.delay(3, 4)
        self.wait_lines(lambda ls: any(x["id"] == r4.id for x in ls), 20)
        deadline = time.monotonic() + 5
        st = r4.state
        while st != "SUCCESS" and time.monotonic() < deadline:
            time.sleep(0.3)
            st = r4.state
        self.obs("results.polled_state", [st, r4.result])
        r5 = pa.add.delay("a", 1)
        try:
            r5.get(timeout=20)
            self.obs("results.failure", "no exception")
        except Exception as e:  # noqa: BLE001
            self.obs("results.failure", [type(e).__name__, r5.state])
        # many results in flight at once, collected in reverse order
        rs = [pa.add.delay(i, 0) for i in range(30)]
        self.obs("results.reverse_collect",
                 [x.get(timeout=30) for x in reversed(rs)] == list(reversed(range(30))))

    def s_eta(self):
        pa = self.pa
        # a: countdown tasks run once each, not before their ETA
        rs = [pa.mark.apply_async(("eta1",), countdown=3) for _ in range(6)]
        time.sleep(1.0)
        sched = (self.app.control.inspect(destination=[self.node("w1")], timeout=1.5)
                 .scheduled() or {}).get(self.node("w1"))
        log(f"eta1: {None if sched is None else len(sched)} of 6 reserved after 1 s")
        # Celery raises the prefetch window by one for each ETA task it holds, so a worker
        # reserves every ETA task at once (the count itself varies through warren: printed as
        # a boolean to keep the output deterministic).
        self.obs("eta.countdown.all_6_reserved_after_1s", sched is not None and len(sched) == 6)
        vals = [r.get(timeout=30) for r in rs]
        rows = [x for x in self.lines("eta1")]
        self.obs("eta.countdown.results", Counter(vals))
        self.obs("eta.countdown.runs_per_id", self.runs_per_id([r.id for r in rs], "eta1"))
        self.obs("eta.countdown.ran_before_eta", self.early(rows))

        # b: 8 ETA tasks reserved by the worker, then one plain task behind them
        n = 8
        rs = [pa.mark.apply_async(("eta2",), countdown=16) for _ in range(n)]
        time.sleep(1.0)
        imm = pa.mark.apply_async(("imm",))
        done = self.wait_lines(lambda ls: any(x["id"] == imm.id for x in ls), 8)
        self.obs("eta.plain_task_behind_8_eta_ran_within_8s", done)
        insp = self.app.control.inspect(destination=[self.node("w1")], timeout=3)
        sched = (insp.scheduled() or {}).get(self.node("w1"))
        log(f"eta2: {None if sched is None else len(sched)} of {n} reserved")
        self.obs("eta.inspect_scheduled.all_8", sched is not None and len(sched) == n)
        if sched:
            self.obs("eta.inspect_scheduled.keys", sorted(sched[0]))
            self.obs("eta.inspect_scheduled.request_keys", sorted(sched[0].get("request", {})))
        reserved = (insp.reserved() or {}).get(self.node("w1"))
        self.obs("eta.inspect_reserved.count", None if reserved is None else len(reserved))

        # c: warm shutdown (SIGTERM) with the ETA tasks reserved, restart: each runs once,
        # after its ETA
        rc = self.stop("w1")
        self.obs("eta.warm_shutdown_rc", rc)
        self.start_worker("w1", self.w1_queues)
        self.obs("eta.restart_ping", self.wait_ping("w1"))
        vals = []
        for r in rs:
            try:
                vals.append(r.get(timeout=40))
            except Exception as e:  # noqa: BLE001
                vals.append(type(e).__name__)
        if not imm.ready():
            imm.get(timeout=30)
        time.sleep(1.0)
        rows = self.lines("eta2")
        self.obs("eta.restart.results", Counter(vals))
        self.obs("eta.restart.runs_per_id", self.runs_per_id([r.id for r in rs], "eta2"))
        self.obs("eta.restart.ran_before_eta", self.early(rows))
        red = sum(r["redelivered"] for r in rows)
        log(f"eta2: {red} of {n} redelivered after the restart")
        self.obs("eta.restart.all_8_redelivered", red == n)

    def s_retry_beat_timelimit(self):
        pa = self.pa
        # beat, 1 s interval, running meanwhile
        logf = open(self.tmp / "beat.log", "a")
        self.procs["beat"] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "patterns_app", "beat", "-s",
             str(self.tmp / "beat-schedule"), "--loglevel", "INFO"],
            cwd=HERE, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        t_beat = time.monotonic()

        ra = pa.retry_always.delay()
        rt = pa.retry_then_ok.delay()
        rr = pa.autoretry.delay()
        for name, r in (("retry_always", ra), ("retry_then_ok", rt), ("autoretry", rr)):
            try:
                v = r.get(timeout=40)
                res = ["SUCCESS", v]
            except Exception as e:  # noqa: BLE001
                res = [r.state, type(e).__name__]
            rows = [x for x in self.lines(name) if x["id"] == r.id]
            self.obs(f"retry.{name}", res + [len(rows), sorted(x["retries"] for x in rows)])

        # time limits
        rs = {"soft": pa.soft.delay(), "hard": pa.hard.delay(), "hard_late": pa.hard_late.delay(),
              "selfkill": pa.selfkill.delay()}
        for name, r in rs.items():
            try:
                v = r.get(timeout=40)
                res = ["SUCCESS", v]
            except Exception as e:  # noqa: BLE001
                res = [r.state, type(e).__name__]
            self.obs(f"timelimit.{name}", res)
        time.sleep(3)  # a requeued run would show up by now
        for name, r in rs.items():
            rows = [x for x in self.lines(name) if x["id"] == r.id]
            starts = [x for x in rows if x["extra"] in ("start", "")]
            self.obs(f"timelimit.{name}.runs",
                     [min(len(starts), 3), sorted({int(x["redelivered"]) for x in starts}),
                      sorted(x["extra"] for x in rows if x["extra"] not in ("start", ""))])

        # stop beat after at least 6 s
        time.sleep(max(0.0, 6 - (time.monotonic() - t_beat)))
        self.stop("beat")
        time.sleep(1.0)
        n = len(self.lines("beat"))
        self.obs("beat.runs_at_least_3", n >= 3)
        log(f"beat runs: {n}")

    def s_ratelimit_priority_routing(self):
        from celery.utils import worker_direct  # noqa: PLC0415
        pa = self.pa
        rs = [pa.rl.delay(i) for i in range(20)]
        self.obs("ratelimit.task_10s", sorted(r.get(timeout=40) for r in rs) == list(range(20)))
        rep = self.app.control.rate_limit("pat.rl", "100/s", reply=True,
                                          destination=[self.node("w1")], timeout=5)
        self.obs("ratelimit.control_reply", rep)
        rs = [pa.rl.delay(i) for i in range(20)]
        self.obs("ratelimit.after_control", sorted(r.get(timeout=40) for r in rs)
                 == list(range(20)))

        rs = [pa.prio.apply_async((i,), priority=i % 10) for i in range(20)]
        self.obs("priority.completed", sorted(r.get(timeout=40) for r in rs) == list(range(20)))

        r = pa.mark.apply_async(("direct",), queue=worker_direct(self.node("w1")))
        self.obs("routing.worker_direct", r.get(timeout=20))
        rows = [x for x in self.lines("direct") if x["id"] == r.id]
        self.obs("routing.worker_direct.hosts", sorted(self.short(x["host"]) for x in rows))
        self.obs("routing.topic_exchange", pa.topic.delay().get(timeout=20))
        self.obs("routing.missing_queue", pa.auto.delay().get(timeout=20))

    def s_join(self):
        pa = self.pa
        r = pa.join.delay(5, True)
        try:
            self.obs("join.allow_join_result", r.get(timeout=30))
        except Exception as e:  # noqa: BLE001
            self.obs("join.allow_join_result", [r.state, type(e).__name__, str(e)[:80]])
        r = pa.join.delay(3, False)
        try:
            self.obs("join.without_allow", r.get(timeout=40))
        except Exception as e:  # noqa: BLE001
            self.obs("join.without_allow", [r.state, type(e).__name__])

    def s_revoke_terminate(self):
        pa = self.pa
        r = pa.sleep.apply_async(("long", 30))
        started = self.wait_lines(
            lambda ls: any(x["id"] == r.id and x["extra"] == "start" for x in ls), 20)
        self.obs("revoke.long_started", started)
        deadline = time.monotonic() + 5
        while r.state != "STARTED" and time.monotonic() < deadline:
            time.sleep(0.2)
        self.obs("revoke.state_while_running", r.state)
        act = (self.app.control.inspect(destination=[self.node("w1")], timeout=3).active()
               or {}).get(self.node("w1"))
        self.obs("control.inspect_active", None if act is None else
                 [len(act), sorted(act[0]) if act else None])
        self.app.control.revoke(r.id, terminate=True, signal="SIGTERM")
        try:
            r.get(timeout=20)
            self.obs("revoke.terminate", "no exception")
        except Exception as e:  # noqa: BLE001
            self.obs("revoke.terminate", [r.state, type(e).__name__])
        rows = [x["extra"] for x in self.lines("long") if x["id"] == r.id]
        self.obs("revoke.terminate.lines", sorted(rows))

    def s_control(self):
        w1 = self.node("w1")
        insp = self.app.control.inspect(destination=[w1], timeout=3)
        reg = (insp.registered() or {}).get(w1)
        self.obs("control.registered", None if reg is None else
                 sorted(t for t in reg if t.startswith("pat.")))
        st = (insp.stats() or {}).get(w1)
        self.obs("control.stats.keys", None if st is None else sorted(st))
        if st:
            self.obs("control.stats.broker.keys", sorted(st.get("broker", {})))
            self.obs("control.stats.pool.keys", sorted(st.get("pool", {})))
            self.obs("control.stats.prefetch_count", st.get("prefetch_count"))
        aq = (insp.active_queues() or {}).get(w1)
        if aq is None:
            self.obs("control.active_queues", None)
        else:
            desc = sorted(
                [q["name"], q["exchange"]["type"], q["exchange"]["name"], q["routing_key"],
                 q.get("durable"), q.get("auto_delete"), q.get("exclusive"),
                 q.get("queue_arguments")] for q in aq)
            self.obs("control.active_queues", desc)
        for what in ("scheduled", "reserved", "active", "revoked"):
            v = (getattr(insp, what)() or {}).get(w1)
            self.obs(f"control.{what}.idle", None if v is None else len(v))
        q = self.pa.Q_NEW
        rep = self.app.control.add_consumer(q, reply=True, destination=[w1], timeout=5)
        self.obs("control.add_consumer", rep)
        r = self.pa.mark.apply_async(("newq",), queue=q)
        self.obs("control.add_consumer.task", r.get(timeout=20))
        rep = self.app.control.cancel_consumer(q, reply=True, destination=[w1], timeout=5)
        self.obs("control.cancel_consumer", rep)
        time.sleep(1)
        r = self.pa.mark.apply_async(("newq2",), queue=q)
        ran = self.wait_lines(lambda ls: any(x["id"] == r.id for x in ls), 4)
        self.obs("control.cancel_consumer.task_waits", not ran)
        rep = self.app.control.add_consumer(q, reply=True, destination=[w1], timeout=5)
        self.obs("control.add_consumer_again.task", r.get(timeout=20))
        aq = (insp.active_queues() or {}).get(w1) or []
        self.obs("control.active_queues.has_newq", any(x["name"] == q for x in aq))

    def s_worker2(self):
        """Second worker: revoke before it starts (mingle), broadcast, chord (file backend),
        control.shutdown."""
        from celery.backends.filesystem import FilesystemBackend  # noqa: PLC0415
        from celery.result import AsyncResult  # noqa: PLC0415
        pa = self.pa
        r = pa.mark.apply_async(("revoked_early",), queue=pa.Q_LATE)
        self.app.control.revoke(r.id)
        time.sleep(1)
        ok = pa.mark.apply_async(("late_ok",), queue=pa.Q_LATE)
        self.start_worker("w2", [pa.Q_LATE, pa.Q_FILE, pa.X_BCAST], backend="file")
        self.obs("worker2.ping", self.wait_ping("w2"))
        self.obs("revoke.before_start.other_task_ran",
                 self.wait_lines(lambda ls: any(x["id"] == ok.id for x in ls), 20))
        time.sleep(1)
        self.obs("revoke.before_start.revoked_ran",
                 any(x["id"] == r.id for x in self.lines()))
        fb = FilesystemBackend(app=self.app, url=f"file://{self.filedir}")
        self.obs("revoke.before_start.state_in_file_backend",
                 AsyncResult(r.id, backend=fb, app=self.app).state)
        rev = (self.app.control.inspect(destination=[self.node("w2")], timeout=3).revoked()
               or {}).get(self.node("w2"))
        self.obs("revoke.before_start.w2_knows_revoked", None if rev is None else r.id in rev)

        # broadcast: each worker runs each broadcast task once
        for i in range(3):
            pa.bcast.delay(f"b{i}")
        self.wait_lines(lambda ls: len([x for x in ls if x["tag"] == "bcast"]) >= 6, 15)
        time.sleep(1.5)
        rows = self.lines("bcast")
        self.obs("broadcast.runs", sorted(Counter((self.short(x["host"]), x["extra"])
                                                  for x in rows).items()))

        # chord, on the file result backend (rpc:// has no chords), in a fresh client process
        code = ("import json, patterns_app as p\n"
                "from celery import chord\n"
                "r = chord((p.add.s(i, i) for i in range(10)), p.tsum.s())()\n"
                "print(json.dumps(r.get(timeout=60)))\n")
        env = dict(self.env, PAT_BACKEND="file")
        try:
            cp = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env,
                                capture_output=True, text=True, timeout=90)
            v = cp.stdout.strip().splitlines()[-1] if cp.returncode == 0 and cp.stdout.strip() \
                else f"rc={cp.returncode} {cp.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            v = "timeout"
        self.obs("canvas.chord_file_backend", v)
        self.obs("canvas.chord_file_backend.header_runs", len(
            [x for x in self.lines("add") if self.short(x["host"]) == "w2"]))

        # control.shutdown of one worker
        rep = self.app.control.shutdown(destination=[self.node("w2")], reply=True, timeout=3)
        self.obs("control.shutdown.reply", rep)
        try:
            self.procs["w2"].wait(timeout=30)
            self.obs("control.shutdown.exited", [True, self.procs["w2"].returncode])
        except subprocess.TimeoutExpired:
            self.obs("control.shutdown.exited", [False, None])
        pong = self.app.control.ping(timeout=1.5)
        self.obs("control.ping_after_shutdown", sorted(
            self.short(n) for d in pong for n in d if self.run in n))

    # -- cleanup --------------------------------------------------------------------------------

    def cluster_names(self, kind: str) -> set[str]:
        names = set()
        for base in MGMT:
            req = urllib.request.Request(f"{base}/api/{kind}/%2F?columns=name")
            req.add_header("Authorization", "Basic " + b64encode(b"guest:guest").decode())
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    for q in json.load(resp):
                        if self.run in q["name"]:
                            names.add(q["name"])
            except Exception as e:  # noqa: BLE001
                log(f"management API {base}: {e}")
        return names

    def cleanup(self):
        qs, xs = self.cluster_names("queues"), self.cluster_names("exchanges")
        try:
            with self.app.connection_for_write() as conn:
                for q in sorted(qs):
                    conn.default_channel.queue_delete(q)
                for x in sorted(xs):
                    conn.default_channel.exchange_delete(x)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: {type(e).__name__}: {e}")
        left = self.cluster_names("queues") | self.cluster_names("exchanges")
        log(f"cleanup: deleted {len(qs)} queues, {len(xs)} exchanges; left: {sorted(left)}")

    # -- main -----------------------------------------------------------------------------------

    def main(self) -> int:
        os.environ.update(self.env)
        sys.path.insert(0, str(HERE))
        import patterns_app  # noqa: PLC0415
        self.pa = patterns_app
        self.app = patterns_app.app
        pa = patterns_app
        self.w1_queues = [pa.Q_MAIN, pa.Q_PRIO, pa.Q_TOPIC, pa.Q_AUTO, pa.X_BCAST]
        log(f"run {self.run}, broker {self.args.broker}, files in {self.tmp}")
        scenarios = [
            ("canvas", self.s_canvas),
            ("results", self.s_results),
            ("eta", self.s_eta),
            ("retry", self.s_retry_beat_timelimit),
            ("ratelimit", self.s_ratelimit_priority_routing),
            ("join", self.s_join),
            ("revoke", self.s_revoke_terminate),
            ("control", self.s_control),
            ("worker2", self.s_worker2),
        ]
        only = set(self.args.only.split(",")) if self.args.only else None
        try:
            self.start_worker("w1", self.w1_queues)
            self.obs("setup.w1_ping", self.wait_ping("w1"))
            for name, fn in scenarios:
                if only and name not in only:
                    continue
                t = time.monotonic()
                log(f"--- {name}")
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    self.obs(f"{name}.ERROR", f"{type(e).__name__}: {str(e)[:200]}")
                self.timings.append((name, time.monotonic() - t))
        finally:
            for short in list(self.procs):
                self.stop(short)
            self.cleanup()
        for name, t in self.timings:
            log(f"timing {name}: {t:.1f}s")
        log(f"total {time.monotonic() - T0:.1f}s, {self.n_obs} observations, files in {self.tmp}")
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("broker", help="amqp://guest:guest@127.0.0.1:PORT//")
    ap.add_argument("--only", help="comma-separated scenario names")
    args = ap.parse_args()
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
