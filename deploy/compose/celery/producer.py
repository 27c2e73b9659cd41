"""A steady trickle of tasks through warren, for docker-compose.yml's `producer` service.

Every second it sends WARREN_DEMO_RATE `demo.add` tasks (default 5) and then waits for their
results (rpc:// backend, so the replies come back through warren's control cluster). After each
round whose results all came back it touches HEALTH_FILE, which the service's healthcheck reads.
Errors (warren or a cluster being restarted) are logged and the round is tried again; SIGTERM
(docker compose stop) ends it after the current round.
"""
import os
import signal
import time
from pathlib import Path

from app import add

RATE = max(1, int(os.environ.get("WARREN_DEMO_RATE", "5")))
HEALTH_FILE = Path(os.environ.get("WARREN_DEMO_HEALTH_FILE", "/tmp/producer.alive"))
RESULT_TIMEOUT = 60.0

stopping = False


def stop(signum, _frame):
    global stopping
    stopping = True
    print(f"producer: signal {signum}, stopping after this round", flush=True)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)


def main() -> None:
    sent = done = 0
    started = time.monotonic()
    while not stopping:
        round_start = time.monotonic()
        try:
            results = [(sent + i, add.delay(sent + i, 1)) for i in range(RATE)]
            sent += RATE
            for n, r in results:
                value = r.get(timeout=RESULT_TIMEOUT)
                if value != n + 1:
                    raise RuntimeError(f"demo.add({n}, 1) returned {value!r}")
                done += 1
            HEALTH_FILE.touch()
        except Exception as e:  # noqa: BLE001 - keep trickling through restarts
            print(f"producer: {type(e).__name__}: {e}; retrying in 2 s", flush=True)
            time.sleep(2)
            continue
        if sent % (RATE * 30) == 0:
            rate = done / (time.monotonic() - started)
            print(f"producer: {sent} sent, {done} results back ({rate:.1f}/s)", flush=True)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - round_start)))
    print(f"producer: stopped; {sent} sent, {done} results back", flush=True)


if __name__ == "__main__":
    main()
