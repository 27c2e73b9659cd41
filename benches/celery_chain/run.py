"""Chained Celery tasks, directly against RabbitMQ and through warren, in one run.

    python benches/celery_chain/run.py --direct HOST:PORT --proxy HOST:PORT [--relay HOST:PORT] \
        [--other NAME=HOST:PORT[@PID]] [--chains 8] [--steps 250] [--rounds 3] [--concurrency 4]

For each round and each target (direct, warren and, with --relay, a plain TCP relay in front of
the same node: what one more user-space hop costs; the order rotates from round to round so
that no side always runs first): starts one prefork worker
(`celery -A chain_app worker -c CONCURRENCY`) on a fresh queue, waits until a warm-up chain has
run through it, then sends CHAINS chains of STEPS tasks each at once and times until every
chain's last step ran. Tasks/s = chains x (steps + 1) / seconds. Prints each round and the
median per target, and the ratios to direct: of the medians, and the median of the per-round
ratios with their range (the runs of one round saw about the same load) and a 95% bootstrap
confidence interval of that median; with --relay, warren's per-round ratio to the relay too
(what warren costs beyond one more user-space hop). --other (repeatable) adds another proxy in
front of the same node to the rotation (scripts/bench_celery.sh --haproxy puts HAProxy there),
reported as the relay is.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_secs(pid: int) -> float:
    """CPU time of a process, all threads, from the scheduler's per-thread account (ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def tree_cpu_secs(pid: int) -> float:
    """CPU time of a process and of its live descendants (a prefork worker and its pool)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_secs(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            pass  # ended meanwhile
    return total


class Cpu:
    """CPU µs per task of one round: the proxy's (if any), the worker's (its pool included)
    and the broker's. Where a proxy's cost shows on two shared cores: its own CPU, and what
    it makes the others spend."""

    def __init__(self, proxy: float | None, worker: float, broker: float | None):
        self.proxy, self.worker, self.broker = proxy, worker, broker


def run_once(addr: str, chains: int, steps: int, concurrency: int, python: str,
             pid: int | None = None, broker_pid: int | None = None) -> tuple[float, Cpu]:
    """Tasks/s of one round, and the CPU µs per task of the proxy `pid`, of the worker and of
    the broker during it."""
    queue = f"chain-bench-{uuid.uuid4().hex[:8]}"
    out = Path(tempfile.mkdtemp(prefix="chain-")) / "done.txt"
    env = dict(os.environ, CHAIN_BROKER=f"amqp://guest:guest@{addr}//", CHAIN_QUEUE=queue,
               CHAIN_OUT=str(out), PYTHONPATH=str(HERE))
    worker = subprocess.Popen(
        [python, "-m", "celery", "-A", "chain_app", "worker", "--pool", "prefork",
         "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-l", "warning"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0 = cpu_secs(pid) if pid else None
    broker0 = cpu_secs(broker_pid) if broker_pid else None
    try:
        driver = subprocess.run([python, str(HERE / "drive.py"), str(chains), str(steps)],
                                cwd=HERE, env=env, capture_output=True, text=True, timeout=700)
        if driver.returncode != 0 or worker.poll() is not None:
            raise RuntimeError(f"round failed: {driver.stderr[-2000:]}")
        rate = float(driver.stdout.strip().splitlines()[-1])
        # Includes the worker's start and the warm-up chain: the connections' whole life.
        tasks = chains * (steps + 1)
        proxy = (cpu_secs(pid) - cpu0) * 1e6 / tasks if pid else None
        broker = (cpu_secs(broker_pid) - broker0) * 1e6 / tasks if broker_pid else None
        return rate, Cpu(proxy, tree_cpu_secs(worker.pid) * 1e6 / tasks, broker)
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
    ap.add_argument("--relay", help="a plain TCP relay in front of the direct node")
    ap.add_argument("--proxy-pid", type=int, help="warren's pid: report its CPU per task")
    ap.add_argument("--relay-pid", type=int, help="the relay's pid: report its CPU per task")
    ap.add_argument("--broker-pid", type=int, help="the node's beam.smp pid: report its CPU per task")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--other", action="append", default=[], metavar="NAME=HOST:PORT[@PID]",
                    help="another proxy in front of the direct node, reported as the relay is")
    args = ap.parse_args()
    python = sys.executable
    targets = [("direct", args.direct, None), ("proxy", args.proxy, args.proxy_pid)]
    if args.relay:
        targets.append(("relay", args.relay, args.relay_pid))
    for other in args.other:
        name, sep, rest = other.partition("=")
        if not sep or name in ("direct", "proxy", "relay"):
            ap.error(f"--other {other!r}: expected NAME=HOST:PORT[@PID] with a name of its own")
        addr, _, pid = rest.partition("@")
        targets.append((name, addr, int(pid) if pid else None))
    results: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    workers: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    brokers: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    for r in range(args.rounds):
        for name, addr, pid in targets[r % len(targets):] + targets[:r % len(targets)]:
            rate, cpu = run_once(addr, args.chains, args.steps, args.concurrency, python, pid,
                                 args.broker_pid)
            results[name].append(rate)
            workers[name].append(cpu.worker)
            note = f"  worker CPU {cpu.worker:7.1f} µs/task"
            if cpu.broker is not None:
                brokers[name].append(cpu.broker)
                note += f"  broker {cpu.broker:6.1f}"
            if cpu.proxy is not None:
                cpus[name].append(cpu.proxy)
                note += f"  {name} CPU {cpu.proxy:6.1f} µs/task"
            print(f"round {r + 1} {name:7} {rate:8.1f} tasks/s{note}", flush=True)
    d = statistics.median(results["direct"])
    p = statistics.median(results["proxy"])
    print(f"median  direct {d:.1f} tasks/s, through warren {p:.1f} tasks/s, ratio {p / d:.3f}")
    warren_vs_direct = 0.0
    for name, _, _ in targets[1:]:
        ratios = [x / y for x, y in zip(results[name], results["direct"])]
        if name == "proxy":
            warren_vs_direct = statistics.median(ratios)
        label = "warren" if name == "proxy" else name
        cpu = f", CPU {statistics.median(cpus[name]):.1f} µs/task" if cpus[name] else ""
        lo, hi = median_ci(ratios)
        print(f"per round {label:7} vs direct: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; 95% CI of the median "
              f"{lo:.3f}-{hi:.3f}){cpu}")
    # Where the CPU of a task goes, per target: on two shared cores a proxy's cost is its own
    # CPU plus whatever it makes the worker and the broker spend beyond direct.
    for name, _, _ in targets:
        label = "warren" if name == "proxy" else name
        parts = [f"worker {statistics.median(workers[name]):.1f}"]
        if brokers[name]:
            parts.append(f"broker {statistics.median(brokers[name]):.1f}")
        if cpus[name]:
            parts.append(f"{label} {statistics.median(cpus[name]):.1f}")
        print(f"CPU per task, medians, µs ({label}): " + ", ".join(parts))
    verdict = "met" if warren_vs_direct >= 0.98 else "NOT met"
    print(f"target: warren at least 0.98x of direct, median of the per-round ratios: {verdict}")
    for name, _, _ in targets[2:]:
        # What warren costs beyond one more user-space hop (or another proxy), round by round.
        ratios = [x / y for x, y in zip(results["proxy"], results[name])]
        lo, hi = median_ci(ratios)
        print(f"per round warren vs {name}: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; 95% CI of the median "
              f"{lo:.3f}-{hi:.3f})")
    return 0


def median_ci(xs: list[float], level: float = 0.95, resamples: int = 10_000) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of `xs` (fixed seed: the same
    rounds give the same interval)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return meds[int(tail * resamples)], meds[min(resamples - 1, int((1 - tail) * resamples))]


if __name__ == "__main__":
    sys.exit(main())
