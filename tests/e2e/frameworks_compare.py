"""Dramatiq and nameko, run the same way directly against RabbitMQ and through warren, compared
observation by observation.

    python tests/e2e/frameworks_compare.py DIRECT_URL PROXY_URL [SCENARIO ...]

DIRECT_URL and PROXY_URL are AMQP URLs as pika and kombu read them:
`amqp://USER:PASSWORD@HOST:PORT/VHOST`, the vhost percent-encoded (`%2F` is "/"), e.g.

    target/frameworks-venv/bin/python tests/e2e/frameworks_compare.py \\
        amqp://guest:guest@127.0.0.1:5701/%2F amqp://guest:guest@127.0.0.1:5674/%2F

With SCENARIO names only those run; `--list` prints the names; `-v` prints every observation
of passing scenarios too. Needs (in the interpreter that runs it) dramatiq[rabbitmq] and
nameko, as tests/python/frameworks-requirements.txt pins them (scripts/test.sh installs them
in target/frameworks-venv). A whole run takes about three minutes.

Dramatiq (RabbitmqBroker with confirm_delivery): send and delay (the .DQ queue), retries with
backoff then the dead-letter .XQ queue, max_age (AgeLimit), time_limit (TimeLimit), pipelines,
callbacks, groups with results (StubBackend, in-process) and a completion callback, a worker
process killed with SIGKILL mid-task (the task runs again, counted in a ledger file), several
worker processes taking each message exactly once, get_queue_message_counts, join, flush and
flush_all, and a send to a queue deleted behind the broker (a mandatory publish returned).
nameko: RPC (sequential, async, service to service, remote errors, several proxies at once),
RPC to a service that does not exist or is stopped, events with BROADCAST, SERVICE_POOL and
SINGLETON handlers over several service instances, timers.

Each scenario runs in a process of its own (tests/e2e/frameworks_app.py), bounded by
SCENARIO_SECONDS; workers are threads of that process or worker processes it starts, as the
frameworks start them. Names carry a run id that differs per run and per side; what a scenario
declares is deleted at its end through the same URL. Observations hold counts, sorted results,
exception types and AMQP codes and texts: never timings or generated names. Lines tagged
`[doc:...]` describe differences that docs/semantics.md documents: shown, not compared.
RabbitMQ's answer is the expected one by construction; exits 1 on any difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "frameworks_app.py")
SCENARIO_SECONDS = 120

SCENARIOS = [
    ("dramatiq", "d_send_delay"),
    ("dramatiq", "d_retries_dead_letter"),
    ("dramatiq", "d_max_age"),
    ("dramatiq", "d_time_limit"),
    ("dramatiq", "d_pipeline"),
    ("dramatiq", "d_group_results"),
    ("dramatiq", "d_kill_redeliver"),
    ("dramatiq", "d_kill_holding_delayed"),
    ("dramatiq", "d_multi_workers"),
    ("dramatiq", "d_threads_send"),
    ("dramatiq", "d_worker_restart"),
    ("dramatiq", "d_queue_deleted_under_worker"),
    ("dramatiq", "d_idle_heartbeat"),
    ("dramatiq", "d_counts_flush"),
    ("dramatiq", "d_unroutable_requeue"),
    ("nameko", "n_rpc"),
    ("nameko", "n_rpc_unknown"),
    ("nameko", "n_rpc_service_killed"),
    ("nameko", "n_events"),
    ("nameko", "n_event_requeue_on_error"),
    ("nameko", "n_timer"),
]


def run(kind: str, name: str, url: str) -> list[str]:
    run_id = uuid.uuid4().hex[:8]
    try:
        p = subprocess.run([sys.executable, APP, kind, name, url, run_id], capture_output=True,
                           text=True, timeout=SCENARIO_SECONDS)
    except subprocess.TimeoutExpired as e:
        os.makedirs("/tmp/warren-frameworks", exist_ok=True)
        with open(f"/tmp/warren-frameworks/{name}-{run_id}.timeout.log", "w") as f:
            f.write(str(e.stdout or "") + "\n" + str(e.stderr or ""))
        return ["scenario timeout"]
    for line in p.stdout.splitlines():
        if line.startswith("OBS-JSON "):
            obs = json.loads(line[len("OBS-JSON "):])
            if obs and obs[0].startswith("scenario raised"):
                sys.stderr.write(p.stderr[-3000:])
            return [o.replace(run_id, "RUN") for o in obs]
    sys.stderr.write(p.stderr[-3000:])
    return [f"scenario died (exit {p.returncode})"]


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print("\n".join(n for _, n in SCENARIOS))
        return 0
    verbose = "-v" in argv
    argv = [a for a in argv if a != "-v"]
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    direct, proxy, *only = argv
    unknown = set(only) - {n for _, n in SCENARIOS}
    if unknown:
        print(f"unknown scenarios: {sorted(unknown)}", file=sys.stderr)
        return 2
    failed = []
    for kind, name in SCENARIOS:
        if only and name not in only:
            continue
        started = time.monotonic()
        want = run(kind, name, direct)
        got = run(kind, name, proxy)
        broken = bool(want) and want[0].startswith("scenario ")
        compared = [[o for o in obs if "[doc:" not in o] for obs in (want, got)]
        same = compared[0] == compared[1] and not broken
        print(f"[{'PASS' if same else 'FAIL'}] {name} ({time.monotonic() - started:.0f} s)", flush=True)
        if same:
            if verbose:
                for line in want:
                    print(f"     {line}")
            continue
        failed.append(name)
        for i in range(max(len(want), len(got))):
            w = want[i] if i < len(want) else "-"
            g = got[i] if i < len(got) else "-"
            mark = " " if w == g else "!"
            print(f"   {mark} rabbitmq: {w}\n   {mark} warren:   {g}", flush=True)
    if failed:
        print(f"frameworks: {len(failed)} differ: {' '.join(failed)}")
        return 1
    print("frameworks: all the same")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
