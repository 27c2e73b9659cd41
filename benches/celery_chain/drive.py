"""One round's producer side (run by run.py in a fresh process, so each round gets a fresh
Celery app and connections): sends a warm-up chain, waits for it, then CHAINS chains of STEPS
tasks at once, and prints the tasks/s until every chain's last step ran."""
import sys
import time
from pathlib import Path

import chain_app

chains, steps, out = int(sys.argv[1]), int(sys.argv[2]), Path(chain_app.OUT)


def lines() -> int:
    try:
        return out.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


chain_app.step.delay("warmup", 3)
deadline = time.monotonic() + 60
while lines() < 1:
    if time.monotonic() > deadline:
        sys.exit("the worker did not run the warm-up chain within 60 s")
    time.sleep(0.05)
t0 = time.monotonic()
for c in range(chains):
    chain_app.step.delay(f"c{c}", steps)
deadline = t0 + 600
while lines() < chains + 1:
    if time.monotonic() > deadline:
        sys.exit(f"only {lines() - 1} of {chains} chains finished")
    time.sleep(0.01)
print(chains * (steps + 1) / (time.monotonic() - t0))
