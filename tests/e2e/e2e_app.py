"""Celery app for tests/e2e/celery_e2e.py (imported by the workers as `-A e2e_app`).

Configured from the environment so that the driver, the workers and the `celery` CLI calls all
see the same settings:
  WARREN_E2E_BROKER     broker URL (amqp://guest:guest@127.0.0.1:PORT//)
  WARREN_E2E_OUT        file that every task execution appends one line to
  WARREN_E2E_QUEUE      task queue (unique per run, so runs never see each other's messages)
  WARREN_E2E_HEARTBEAT  AMQP heartbeat of the worker's consumer connection (s)
"""
import os
import time

from celery import Celery

app = Celery("e2e_app")
app.conf.update(
    broker_url=os.environ.get("WARREN_E2E_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend="rpc://",
    task_acks_late=True,
    broker_transport_options={"confirm_publish": True},
    broker_heartbeat=float(os.environ.get("WARREN_E2E_HEARTBEAT", "10")),
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("WARREN_E2E_QUEUE", "e2e"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=True,
    # worker_prefetch_multiplier stays at its default (4).
)

OUT = os.environ.get("WARREN_E2E_OUT", "/tmp/warren-e2e-out.txt")


@app.task(name="e2e.double", bind=True)
def double(self, x, ms=0):
    """Append "<task id> <pid> <x> <redelivered>" to OUT with one O_APPEND write; return 2x.
    `ms`: milliseconds the task takes first (tests/fault/fault_e2e.py's celery-kill-node)."""
    if ms:
        time.sleep(ms / 1000)
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    line = f"{self.request.id} {os.getpid()} {x} {int(redelivered)}\n".encode()
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return x * 2
