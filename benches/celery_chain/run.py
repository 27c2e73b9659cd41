"""Chained Celery tasks, directly against RabbitMQ and through warren, in one run.

    python benches/celery_chain/run.py --direct HOST:PORT --proxy HOST:PORT \
        [--chains 8] [--steps 250] [--rounds 3] [--concurrency 4]

For each round and each target (alternating, direct first): starts one prefork worker
(`celery -A chain_app worker -c CONCURRENCY`) on a fresh queue, waits until a warm-up chain has
run through it, then sends CHAINS chains of STEPS tasks each at once and times until every
chain's last step ran. Tasks/s = chains x (steps + 1) / seconds. Prints each round and the
median per target, and the ratio proxy/direct of the medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_once(addr: str, chains: int, steps: int, concurrency: int, python: str) -> float:
    queue = f"chain-bench-{uuid.uuid4().hex[:8]}"
    out = Path(tempfile.mkdtemp(prefix="chain-")) / "done.txt"
    env = dict(os.environ, CHAIN_BROKER=f"amqp://guest:guest@{addr}//", CHAIN_QUEUE=queue,
               CHAIN_OUT=str(out), PYTHONPATH=str(HERE))
    worker = subprocess.Popen(
        [python, "-m", "celery", "-A", "chain_app", "worker", "--pool", "prefork",
         "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-l", "warning"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sys.path.insert(0, str(HERE))
    os.environ.update(env)
    import importlib

    import chain_app
    importlib.reload(chain_app)
    try:
        # Warm-up: one short chain proves the worker consumes and its producer is connected.
        chain_app.step.delay("warmup", 3)
        deadline = time.monotonic() + 60
        while lines(out) < 1:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"worker did not start: {worker.stderr.read().decode()[-2000:] if worker.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        t0 = time.monotonic()
        for c in range(chains):
            chain_app.step.delay(f"c{c}", steps)
        deadline = t0 + 600
        while lines(out) < chains + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {lines(out) - 1} of {chains} chains finished")
            time.sleep(0.01)
        return chains * (steps + 1) / (time.monotonic() - t0)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        chain_app.app.pool.force_close_all()
        try:
            with chain_app.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
        except Exception:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--direct", required=True)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    python = sys.executable
    results: dict[str, list[float]] = {"direct": [], "proxy": []}
    for r in range(args.rounds):
        for name, addr in (("direct", args.direct), ("proxy", args.proxy)):
            rate = run_once(addr, args.chains, args.steps, args.concurrency, python)
            results[name].append(rate)
            print(f"round {r + 1} {name:6} {rate:8.1f} tasks/s", flush=True)
    d = statistics.median(results["direct"])
    p = statistics.median(results["proxy"])
    print(f"median  direct {d:.1f} tasks/s, through warren {p:.1f} tasks/s, ratio {p / d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
