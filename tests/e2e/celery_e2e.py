#!/usr/bin/env python3
"""Celery end to end through an AMQP broker URL (warren, or RabbitMQ directly).

    .venv/bin/python tests/e2e/celery_e2e.py BROKER_URL [N_TASKS=1000] [WORKERS=2]
        [--concurrency 2] [--timeout S] [--management] [--keep]

What it does
  1. Starts WORKERS celery workers (app tests/e2e/e2e_app.py) as subprocesses:
     `celery -A e2e_app worker --pool prefork -c 2 -n wN@%h -Q <run queue>`.
     prefork is used because it is what most deployments run and because each pool child then
     publishes its rpc:// result on its own AMQP connection (results do not go out on the
     connection that declared the reply queue). Heartbeats stay ON: worker heartbeat events
     every 2 s, gossip and mingle on, and the consumer connection negotiates an AMQP heartbeat
     of 10 s (broker_heartbeat=10 instead of celery's 120 so that heartbeat frames actually
     flow during a short run).
  2. Waits until every worker answers a broadcast ping (pidbox through the broker).
  3. Publishes N tasks `e2e.double(i)` (task_acks_late, confirm_publish, rpc:// results) and
     waits for all results.
  4. Checks: every task id appears exactly once in the output file (each execution appends
     "<id> <pid> <x> <redelivered>" with one O_APPEND write), no unknown ids, every result == 2*i.
  5. `celery inspect ping`: every worker answers.
  6. With --management: `celery inspect active_queues` (every worker consumes the run queue),
     `celery control rate_limit` (every worker acks), `celery purge -f -Q` on a side queue holding
     a known number of messages (the purged count must match), `celery events --dump` for a few
     seconds (worker heartbeat events must show up).
  7. Stops the workers with SIGTERM (warm shutdown) and checks that no process of their process
     groups remains (strays are reported, then killed).
Exits 0 when every check passed, 1 otherwise (the failed checks are listed), 2 on bad usage.
Timings are printed for each phase.
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
import uuid
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[celery_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.queue = f"e2e.{self.run_id}"
        self.tmp = Path(tempfile.mkdtemp(prefix="warren-e2e-"))
        self.out = self.tmp / "executions.txt"
        self.env = dict(os.environ)
        self.env.update({
            "WARREN_E2E_BROKER": args.broker,
            "WARREN_E2E_OUT": str(self.out),
            "WARREN_E2E_QUEUE": self.queue,
            "WARREN_E2E_HEARTBEAT": str(args.heartbeat),
            "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH"))
                                          if p),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        self.workers: list[tuple[str, subprocess.Popen, Path]] = []
        self.failures: list[str] = []
        self.timings: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------

    def fail(self, msg: str) -> None:
        log(f"CHECK FAILED: {msg}")
        self.failures.append(msg)

    def celery_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "e2e_app", *args]

    def celery(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = self.celery_cmd(*args)
        try:
            return subprocess.run(cmd, cwd=HERE, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, 124, e.stdout or "", (e.stderr or "")
                                               + f"\n(timed out after {timeout}s)")

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = time.monotonic() - t0
        log(f"{name}: {self.timings[name]:.2f}s")

    # -- workers -------------------------------------------------------------------------------

    def start_workers(self) -> None:
        for i in range(1, self.args.workers + 1):
            name = f"w{i}-{self.run_id}"
            logf = self.tmp / f"{name}.log"
            cmd = self.celery_cmd(
                "worker", "--pool", "prefork", "-c", str(self.args.concurrency),
                "-n", f"{name}@%h", "-Q", self.queue, "--loglevel", "INFO",
                *(["-E"] if self.args.management else []),
            )
            with open(logf, "w") as lf:
                p = subprocess.Popen(cmd, cwd=HERE, env=self.env, stdout=lf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            self.workers.append((name, p, logf))
        log(f"started {len(self.workers)} workers ({self.args.concurrency} prefork children "
            f"each) on queue {self.queue}; logs in {self.tmp}")

    def wait_workers_ready(self, app) -> bool:
        want = {n for n, _, _ in self.workers}
        deadline = time.monotonic() + self.args.startup_timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            for n, p, _ in self.workers:
                if p.poll() is not None:
                    self.fail(f"worker {n} exited with {p.returncode} during startup")
                    return False
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
                return True
        self.fail(f"workers not answering ping after {self.args.startup_timeout}s: "
                  f"missing {sorted(want - seen)}")
        return False

    def stop_workers(self) -> None:
        t0 = time.monotonic()
        for _, p, _ in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_timeout
        for n, p, _ in self.workers:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail(f"worker {n} did not stop within {self.args.stop_timeout}s of SIGTERM")
        # Pool children are in the worker's session/process group: anything left is a stray.
        time.sleep(0.5)
        strays = []
        for n, p, _ in self.workers:
            for pid in pids_in_session(p.pid):
                strays.append((n, pid))
        if strays:
            self.fail(f"stray processes after shutdown: {strays}")
            for _, p, _ in self.workers:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _, p, _ in self.workers:
                if p.poll() is None:
                    p.wait(timeout=10)
        for n, p, _ in self.workers:
            if p.returncode not in (0, None):
                self.fail(f"worker {n} exited with status {p.returncode}")
        self.timed("stop workers", t0)

    def dump_worker_logs(self) -> None:
        for n, _, logf in self.workers:
            try:
                lines = logf.read_text(errors="replace").splitlines()
            except OSError:
                continue
            interesting = [ln for ln in lines if re.search(
                r"ERROR|CRITICAL|Traceback|Unrecoverable|WARNING", ln)]
            print(f"--- {n} ({logf}): last lines ---")
            for ln in (interesting[-15:] + ["..."] + lines[-15:]):
                print(f"    {ln}")

    # -- the run -------------------------------------------------------------------------------

    def main(self) -> int:
        os.environ.update(self.env)  # the driver imports the same app
        sys.path.insert(0, str(HERE))
        import e2e_app  # noqa: PLC0415

        app = e2e_app.app
        t_start = time.monotonic()
        try:
            t0 = time.monotonic()
            self.start_workers()
            if not self.wait_workers_ready(app):
                return self.finish(t_start)
            self.timed("workers up (all answer ping)", t0)

            self.publish_and_check(app, e2e_app.double)
            self.inspect_ping()
            if self.args.management:
                self.management(app)
        except KeyboardInterrupt:
            self.fail("interrupted")
        except Exception as e:  # noqa: BLE001
            import traceback  # noqa: PLC0415
            traceback.print_exc()
            self.fail(f"driver error: {type(e).__name__}: {e}")
        finally:
            self.stop_workers()
        return self.finish(t_start)

    def publish_and_check(self, app, task) -> None:
        n = self.args.tasks
        t0 = time.monotonic()
        results = []
        with app.producer_or_acquire() as producer:
            for i in range(n):
                results.append(task.apply_async((i,), producer=producer))
        self.timed(f"publish {n} tasks (confirm_publish)", t0)

        from celery.result import ResultSet  # noqa: PLC0415
        t1 = time.monotonic()
        values = None
        try:
            values = ResultSet(results).get(timeout=self.args.timeout, propagate=False)
        except Exception as e:  # noqa: BLE001
            done = sum(1 for r in results if r.ready())
            self.fail(f"results: {type(e).__name__}: {e} ({done}/{n} ready)")
        self.timed(f"all {n} results back", t1)
        total = time.monotonic() - t0
        log(f"throughput: {n / total:.0f} tasks/s end to end ({total:.2f}s publish->last result)")

        if values is not None:
            bad = [(i, v) for i, v in enumerate(values) if v != 2 * i]
            if bad:
                self.fail(f"{len(bad)} wrong results, e.g. {bad[:5]}")
        # Give late writers (a duplicate execution racing the result) a moment.
        time.sleep(0.5)
        self.check_executions([r.id for r in results])

    def check_executions(self, ids: list[str]) -> None:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        seen = Counter()
        pids = Counter()
        redelivered = 0
        for ln in lines:
            parts = ln.split()
            if len(parts) != 4:
                self.fail(f"malformed line in {self.out}: {ln!r}")
                continue
            seen[parts[0]] += 1
            pids[parts[1]] += 1
            redelivered += parts[3] == "1"
        want = set(ids)
        missing = [t for t in ids if seen[t] == 0]
        dups = {t: c for t, c in seen.items() if c > 1}
        unknown = [t for t in seen if t not in want]
        log(f"executions: {len(lines)} lines, {len(seen)} distinct ids, {len(pids)} processes "
            f"(per pid: {sorted(pids.values(), reverse=True)}), {redelivered} redelivered")
        if missing:
            self.fail(f"{len(missing)} task ids never executed, e.g. {missing[:3]}")
        if dups:
            self.fail(f"{len(dups)} task ids executed more than once, e.g. "
                      f"{list(dups.items())[:3]}")
        if unknown:
            self.fail(f"{len(unknown)} unknown task ids in {self.out}, e.g. {unknown[:3]}")

    def expect_all_workers(self, what: str, data: dict, check=None) -> None:
        want = {n for n, _, _ in self.workers}
        got = {}
        for node, reply in data.items():
            got[node.split("@", 1)[0]] = reply
        missing = sorted(want - set(got))
        if missing:
            self.fail(f"{what}: no answer from {missing} (got {sorted(got)})")
        if check:
            for n in sorted(want & set(got)):
                err = check(got[n])
                if err:
                    self.fail(f"{what}: {n}: {err}")

    def celery_json(self, what: str, *args: str) -> dict | None:
        r = self.celery(*args, "--json", timeout=60)
        text = r.stdout.strip()
        try:
            # `inspect --json` prints one object {node: reply}; `control --json` a list of
            # one-entry objects: merge those.
            data = json.loads(text.splitlines()[-1]) if text else None
        except (json.JSONDecodeError, IndexError):
            data = None
        if isinstance(data, list) and all(isinstance(d, dict) for d in data):
            merged: dict = {}
            for d in data:
                merged.update(d)
            data = merged
        if r.returncode != 0 or not isinstance(data, dict):
            self.fail(f"{what}: rc={r.returncode} stdout={r.stdout[-500:]!r} "
                      f"stderr={r.stderr[-800:]!r}")
            return None
        return data

    def inspect_ping(self) -> None:
        t0 = time.monotonic()
        data = self.celery_json("celery inspect ping", "inspect", "ping", "--timeout", "5")
        if data is not None:
            self.expect_all_workers("inspect ping", data,
                                    lambda r: None if r == {"ok": "pong"} else f"reply {r!r}")
        self.timed("celery inspect ping", t0)

    def management(self, app) -> None:
        t0 = time.monotonic()
        data = self.celery_json("celery inspect active_queues", "inspect", "active_queues",
                                "--timeout", "5")
        if data is not None:
            self.expect_all_workers(
                "inspect active_queues", data,
                lambda r: None if any(q.get("name") == self.queue for q in r)
                else f"run queue {self.queue} not in {[q.get('name') for q in r]}")
        self.timed("celery inspect active_queues", t0)

        t0 = time.monotonic()
        data = self.celery_json("celery control rate_limit", "control", "rate_limit",
                                "e2e.double", "1000/s", "--timeout", "5")
        if data is not None:
            self.expect_all_workers(
                "control rate_limit", data,
                lambda r: None if "ok" in r else f"reply {r!r}")
        self.timed("celery control rate_limit", t0)

        # purge: a side queue no worker consumes, holding a known number of messages.
        t0 = time.monotonic()
        side = f"{self.queue}.purge"
        k = 7
        with app.producer_or_acquire() as producer:
            for i in range(k):
                app.send_task("e2e.double", (i,), queue=side, producer=producer)
        r = self.celery("purge", "-f", "-Q", side, timeout=60)
        m = re.search(r"Purged (\d+) message", r.stdout)
        if r.returncode != 0 or not m or int(m.group(1)) != k:
            self.fail(f"celery purge -f -Q {side}: expected 'Purged {k} messages', "
                      f"rc={r.returncode} out={r.stdout.strip()!r} err={r.stderr[-500:]!r}")
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(side)
        except Exception as e:  # noqa: BLE001
            log(f"(could not delete side queue {side}: {e})")
        self.timed("celery purge -f", t0)

        # events --dump for a few seconds: worker heartbeats (every 2 s) must show up.
        t0 = time.monotonic()
        secs = self.args.events_seconds
        p = subprocess.Popen(self.celery_cmd("events", "--dump"), cwd=HERE, env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        time.sleep(secs)
        p.send_signal(signal.SIGINT)
        try:
            out, _ = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        beats = {n for n, _, _ in self.workers
                 if re.search(rf"{re.escape(n)}@\S+ .*heartbeat", out)}
        log(f"events --dump for {secs}s: {len(out.splitlines())} lines, "
            f"heartbeats from {sorted(beats)}")
        missing = sorted({n for n, _, _ in self.workers} - beats)
        if missing:
            self.fail(f"celery events --dump: no worker heartbeat from {missing} in {secs}s; "
                      f"output tail: {out[-800:]!r}")
        self.timed("celery events --dump", t0)

    def finish(self, t_start: float) -> int:
        total = time.monotonic() - t_start
        print()
        print("celery e2e timings:")
        for k, v in self.timings.items():
            print(f"  {k:<40} {v:8.2f}s")
        print(f"  {'total':<40} {total:8.2f}s")
        if self.failures:
            self.dump_worker_logs()
            print(f"celery e2e FAILED ({len(self.failures)} failed checks; files in {self.tmp}):")
            for f in self.failures:
                print(f"  - {f}")
            return 1
        print(f"celery e2e OK: {self.args.tasks} tasks, {self.args.workers} workers, "
              f"broker {self.args.broker}")
        if not self.args.keep:
            for f in self.tmp.iterdir():
                f.unlink()
            self.tmp.rmdir()
        return 0


def pids_in_session(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (the workers are started as session leaders)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the ")" of comm: state ppid pgrp session ...
        rest = stat.rsplit(")", 1)[1].split()
        if rest[0] == "Z":
            continue
        if int(rest[3]) == sid:
            out.append(int(d))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("broker", help="amqp://guest:guest@127.0.0.1:PORT//")
    ap.add_argument("tasks", nargs="?", type=int, default=1000)
    ap.add_argument("workers", nargs="?", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2, help="prefork children per worker")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for all results (default 60 + N/10)")
    ap.add_argument("--startup-timeout", type=float, default=90)
    ap.add_argument("--stop-timeout", type=float, default=60)
    ap.add_argument("--heartbeat", type=float, default=10,
                    help="AMQP heartbeat of the workers' consumer connections (s)")
    ap.add_argument("--management", action="store_true",
                    help="also run inspect active_queues, control rate_limit, purge -f and "
                         "events --dump (workers get -E)")
    ap.add_argument("--events-seconds", type=float, default=6)
    ap.add_argument("--keep", action="store_true", help="keep the run dir even on success")
    args = ap.parse_args()
    if args.tasks < 1 or args.workers < 1:
        ap.error("N_TASKS and WORKERS must be >= 1")
    if args.timeout is None:
        args.timeout = 60 + args.tasks / 10
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
