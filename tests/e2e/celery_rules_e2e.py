#!/usr/bin/env python3
"""Celery through warren with a routing rule: a `fast` queue kept on one shard cluster.

    .venv/bin/python tests/e2e/celery_rules_e2e.py BROKER_URL SHARD_A_NODE SHARD_B_NODE [N=300]

warren's configuration must carry the rule (scripts/test.sh writes it):

    [[routing.rules]]
    match = ["rules-fast.*"]
    clusters = ["shard-a"]

What it does, with the app and worker harness of tests/e2e/celery_e2e.py (task_acks_late,
confirm_publish, rpc:// results):
  1. Publishes N tasks to `rules-fast.RUN` and N to `rules-feed.RUN` with no worker running.
  2. Asks each shard cluster directly (SHARD_A_NODE, SHARD_B_NODE: host:port of a node) how many
     messages each queue holds there: every fast task on shard-a and none on shard-b; the feed
     tasks on both (the default spread), N in all.
  3. Starts one prefork worker consuming both queues and waits for every result: each task ran
     exactly once and returned 2x.
Exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import amqp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from celery_e2e import Run, log  # noqa: E402


def depth(node: str, queue: str) -> int:
    """Ready messages of `queue` on the cluster of `node`, asked directly (passive declare)."""
    c = amqp.Connection(host=node, userid="guest", password="guest", connect_timeout=10)
    c.connect()
    try:
        return c.channel().queue_declare(queue, passive=True).message_count
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("broker")
    ap.add_argument("shard_a")
    ap.add_argument("shard_b")
    ap.add_argument("tasks", nargs="?", type=int, default=300)
    a = ap.parse_args()
    ns = argparse.Namespace(broker=a.broker, tasks=a.tasks, workers=1, concurrency=2,
                            timeout=None, startup_timeout=90, stop_timeout=60, heartbeat=10,
                            management=False, events_seconds=0, keep=False)
    run = Run(ns)
    fast, feed = f"rules-fast.{run.run_id}", f"rules-feed.{run.run_id}"
    import os
    os.environ.update(run.env)
    import e2e_app  # noqa: PLC0415

    n = a.tasks
    t0 = time.monotonic()
    sent = [e2e_app.double.apply_async((i,), queue=fast) for i in range(n)]
    sent += [e2e_app.double.apply_async((n + i,), queue=feed) for i in range(n)]
    log(f"published {n} fast and {n} feed tasks in {time.monotonic() - t0:.1f}s")

    where = {q: (depth(a.shard_a, q), depth(a.shard_b, q)) for q in (fast, feed)}
    log(f"on the clusters (shard-a, shard-b): fast {where[fast]}, feed {where[feed]}")
    if where[fast] != (n, 0):
        run.fail(f"fast tasks should all be on shard-a: {where[fast]}")
    fa, fb = where[feed]
    if fa + fb != n or fa == 0 or fb == 0:
        run.fail(f"feed tasks should be spread over both shard clusters, {n} in all: {where[feed]}")

    run.queue = f"{fast},{feed}"
    t0 = time.monotonic()
    run.start_workers()
    try:
        if run.wait_workers_ready(e2e_app.app):
            results = []
            for r in sent:
                try:
                    results.append(r.get(timeout=120))
                except Exception as e:  # noqa: BLE001
                    run.fail(f"task {r.id}: {type(e).__name__}: {e}")
                    break
            want = [2 * i for i in range(2 * n)]
            if results != want:
                run.fail(f"{len(results)} results, {sum(x != y for x, y in zip(results, want))} wrong")
            ran = Counter(line.split()[0] for line in run.out.read_text().splitlines())
            twice = [t for t, k in ran.items() if k > 1]
            if len(ran) != 2 * n or twice:
                run.fail(f"{len(ran)} of {2 * n} tasks ran, {len(twice)} more than once")
            log(f"{len(results)} results in {time.monotonic() - t0:.1f}s")
    finally:
        run.stop_workers()
    if run.failures:
        run.dump_worker_logs()
        log(f"FAILED: {run.failures}")
        return 1
    log("celery rules: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
