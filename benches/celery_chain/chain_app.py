"""Celery app of the chained-task benchmark (benches/celery_chain/run.py).

The workload Celery sites run: each task publishes the next one of its chain (confirm_publish,
acks_late, one prefork worker), several chains at once. A chain's last step appends one line to
CHAIN_OUT, which the driver counts.

Configured from the environment (the driver sets it for the worker and for itself):
  CHAIN_BROKER  broker URL    CHAIN_QUEUE  task queue    CHAIN_OUT  file of finished chains
"""
import os

from celery import Celery

app = Celery("chain_app")
app.conf.update(
    broker_url=os.environ.get("CHAIN_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    task_acks_late=True,
    broker_transport_options={"confirm_publish": True},
    task_default_queue=os.environ.get("CHAIN_QUEUE", "chain"),
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

OUT = os.environ.get("CHAIN_OUT", "/tmp/warren-chain-out.txt")


@app.task(name="chain.step")
def step(chain, left):
    """One link of a chain: publish the next one, or record the chain as finished."""
    if left > 0:
        step.delay(chain, left - 1)
        return
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{chain}\n".encode())
    finally:
        os.close(fd)
