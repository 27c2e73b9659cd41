"""Celery app for tests/e2e/celery_patterns.py (workers run it as `-A patterns_app`).

Configured from the environment, so the driver, the workers and beat share the settings:
  PAT_BROKER   broker URL
  PAT_RUN      run id: every queue and exchange name carries it (runs never meet)
  PAT_OUT      file every task execution appends one line to (one O_APPEND write)
  PAT_BACKEND  "rpc" (default) or "file": the file backend (file://PAT_FILE_DIR) is used by the
               chord scenario, which rpc:// does not support; that app's default queue is
               `pat.<run>.fq`, so celery.chord_unlock runs on the worker that uses the same backend.
  PAT_FILE_DIR directory of the file result backend
"""
import os
import signal
import time

from celery import Celery, group
from celery.exceptions import SoftTimeLimitExceeded
from celery.result import allow_join_result
from kombu import Exchange, Queue
from kombu.common import Broadcast

RUN = os.environ.get("PAT_RUN", "dev")
OUT = os.environ.get("PAT_OUT", "/tmp/warren-patterns-out.txt")
BACKEND = os.environ.get("PAT_BACKEND", "rpc")
FILE_DIR = os.environ.get("PAT_FILE_DIR", "/tmp/warren-patterns-results")

P = f"pat.{RUN}"
Q_MAIN = f"{P}.main"
Q_PRIO = f"{P}.prio"
Q_TOPIC = f"{P}.topicq"
X_TOPIC = f"{P}.topicx"
Q_AUTO = f"{P}.autoq"        # not in task_queues: created by task_create_missing_queues
X_BCAST = f"{P}.bcast"
Q_LATE = f"{P}.late"         # consumed only by the second worker (revoke before it starts)
Q_FILE = f"{P}.fq"           # default queue of the file-backend app
Q_NEW = f"{P}.newq"          # add_consumer / cancel_consumer

app = Celery("patterns_app")
app.conf.update(
    broker_url=os.environ.get("PAT_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=(f"file://{FILE_DIR}" if BACKEND == "file" else "rpc://"),
    task_acks_late=True,
    task_track_started=True,
    worker_prefetch_multiplier=1,
    worker_direct=True,
    broker_transport_options={"confirm_publish": True},
    broker_heartbeat=10,
    broker_connection_retry_on_startup=True,
    task_default_queue=(Q_FILE if BACKEND == "file" else Q_MAIN),
    task_create_missing_queues=True,
    task_queues=[
        Queue(Q_MAIN),
        Queue(Q_FILE),
        Queue(Q_LATE),
        Queue(Q_PRIO, max_priority=10),
        Queue(Q_TOPIC, Exchange(X_TOPIC, type="topic"), routing_key="a.*"),
        # unique=True: the queue name is "<run>.bcastq.<uuid>" (per process), so cleanup finds it
        Broadcast(X_BCAST, queue=f"{P}.bcastq", unique=True),
    ],
    task_routes={
        "pat.prio": {"queue": Q_PRIO},
        "pat.topic": {"exchange": X_TOPIC, "exchange_type": "topic", "routing_key": "a.b"},
        "pat.auto": {"queue": Q_AUTO},
        "pat.bcast": {"queue": X_BCAST, "exchange": X_BCAST},
    },
    beat_schedule={
        "every-second": {"task": "pat.beat", "schedule": 1.0, "options": {"queue": Q_MAIN}},
    },
    result_expires=120,  # x-expires of the rpc:// reply queues: abandoned ones go away
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


def rec(task, tag, extra=""):
    """One line per execution: tag id host pid redelivered retries eta now extra."""
    r = task.request
    redelivered = int(bool((r.delivery_info or {}).get("redelivered")))
    eta = r.eta or "-"
    line = (f"{tag} {r.id} {r.hostname} {os.getpid()} {redelivered} {r.retries} {eta} "
            f"{time.time():.3f} {extra}\n").encode()
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="pat.add", bind=True)
def add(self, x, y):
    rec(self, "add")
    return x + y


@app.task(name="pat.tsum", bind=True)
def tsum(self, xs):
    rec(self, "tsum")
    return sum(xs)


@app.task(name="pat.mark", bind=True)
def mark(self, tag):
    rec(self, tag)
    return tag


@app.task(name="pat.sleep", bind=True)
def sleep(self, tag, secs):
    rec(self, tag, "start")
    time.sleep(secs)
    rec(self, tag, "end")
    return secs


@app.task(name="pat.retry_always", bind=True)
def retry_always(self):
    rec(self, "retry_always")
    raise self.retry(countdown=1, max_retries=3)


@app.task(name="pat.retry_then_ok", bind=True)
def retry_then_ok(self):
    rec(self, "retry_then_ok")
    if self.request.retries < 2:
        raise self.retry(countdown=1, max_retries=5)
    return "ok"


@app.task(name="pat.autoretry", bind=True, autoretry_for=(ValueError,),
          retry_kwargs={"max_retries": 2, "countdown": 1}, retry_backoff=False)
def autoretry(self):
    rec(self, "autoretry")
    raise ValueError("always")


@app.task(name="pat.soft", bind=True, soft_time_limit=1)
def soft(self):
    rec(self, "soft", "start")
    try:
        time.sleep(4)
    except SoftTimeLimitExceeded:
        rec(self, "soft", "caught")
        return "soft-caught"
    return "not-interrupted"


@app.task(name="pat.hard", bind=True, time_limit=1, acks_late=False)
def hard(self):
    rec(self, "hard", "start")
    time.sleep(4)
    return "not-killed"


@app.task(name="pat.hard_late", bind=True, time_limit=1, acks_late=True,
          reject_on_worker_lost=True)
def hard_late(self):
    rec(self, "hard_late", "start")
    time.sleep(4)
    return "not-killed"


@app.task(name="pat.selfkill", bind=True, acks_late=True, reject_on_worker_lost=True)
def selfkill(self):
    """Killed (SIGKILL of the pool child) at its first delivery; succeeds when redelivered."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    rec(self, "selfkill")
    if not redelivered:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok-after-requeue"


@app.task(name="pat.rl", bind=True, rate_limit="10/s")
def rl(self, i):
    rec(self, "rl")
    return i


@app.task(name="pat.prio", bind=True)
def prio(self, i):
    rec(self, "prio")
    return i


@app.task(name="pat.topic", bind=True)
def topic(self):
    rec(self, "topic")
    return "topic"


@app.task(name="pat.auto", bind=True)
def auto(self):
    rec(self, "auto")
    return "auto"


@app.task(name="pat.bcast", bind=True)
def bcast(self, tag):
    rec(self, "bcast", tag)


@app.task(name="pat.beat", bind=True, ignore_result=True)
def beat(self):
    rec(self, "beat")


@app.task(name="pat.join", bind=True)
def join(self, n, allow):
    """Publishes a group of `n` adds and waits for it inside the task (the anti-pattern)."""
    rec(self, "join")
    res = group(add.s(i, i) for i in range(n)).apply_async()
    if allow:
        with allow_join_result():
            return res.get(timeout=10)
    return res.get(timeout=10)
