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
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(addr: str, chains: int, steps: int, concurrency: int, python: str) -> float:
    queue = f"chain-bench-{uuid.uuid4().hex[:8]}"
    out = Path(tempfile.mkdtemp(prefix="chain-")) / "done.txt"
    env = dict(os.environ, CHAIN_BROKER=f"amqp://guest:guest@{addr}//", CHAIN_QUEUE=queue,
               CHAIN_OUT=str(out), PYTHONPATH=str(HERE))
    worker = subprocess.Popen(
        [python, "-m", "celery", "-A", "chain_app", "worker", "--pool", "prefork",
         "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-l", "warning"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        driver = subprocess.run([python, str(HERE / "drive.py"), str(chains), str(steps)],
                                cwd=HERE, env=env, capture_output=True, text=True, timeout=700)
        if driver.returncode != 0 or worker.poll() is not None:
            raise RuntimeError(f"round failed: {driver.stderr[-2000:]}")
        return float(driver.stdout.strip().splitlines()[-1])
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


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
