"""The Celery app of docker-compose.yml's worker and producer services.

Pointing Celery at warren changes one setting: broker_url names warren's listen address instead
of a RabbitMQ node (here the compose service `warren`, from WARREN_BROKER_URL). The other
settings are the ones docs/celery.md recommends with or without warren.
"""
import os
import random
import time

from celery import Celery

app = Celery("warren_demo")
app.conf.update(
    broker_url=os.environ.get("WARREN_BROKER_URL", "amqp://guest:guest@warren:5672//"),
    # A publish counts once the cluster that took it has confirmed it.
    broker_transport_options={"confirm_publish": True},
    # Ack after the task ran: a worker lost mid-task gets its task redelivered.
    task_acks_late=True,
    # Prefetch = concurrency x 4; warren splits it over the shard clusters (docs/routing.md).
    worker_prefetch_multiplier=4,
    # rpc:// result queues are named by a UUID: warren keeps them on the control cluster.
    result_backend="rpc://",
    result_expires=600,
    broker_connection_retry_on_startup=True,
    task_default_queue="demo",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="demo.add")
def add(x, y):
    """Adds two numbers after a short pause, so the worker has something in flight."""
    time.sleep(random.uniform(0.01, 0.1))
    return x + y
