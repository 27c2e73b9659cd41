"""Celery app for tests/e2e/celery_more.py (workers run it as `-A more_app`).

Configured from the environment, so the driver, the workers and the `celery` commands share the
settings:
  MORE_BROKER    broker URL
  MORE_RUN       run id: every queue and exchange name carries it (runs never meet)
  MORE_OUT       file every task execution appends one line to (one O_APPEND write)
  MORE_KIND      "classic" (default): classic queues on topic, headers and multi-binding
                 exchanges; "quorum": a quorum task queue on a topic exchange, so Celery detects
                 quorum queues, uses per-consumer QoS and native delayed delivery (the
                 celery_delayed_* exchanges and queues) for countdown / ETA tasks
  MORE_PREFETCH  worker_prefetch_multiplier (default 1)
  MORE_CONTROL   "run" (default): control_exchange "more<run>" (sharded names through warren);
                 "default": Celery's celery.pidbox (control names through warren)
"""
import os
import signal
import time

from celery import Celery
from kombu import Exchange, Queue, binding

RUN = os.environ.get("MORE_RUN", "dev")
OUT = os.environ.get("MORE_OUT", "/tmp/warren-more-out.txt")
KIND = os.environ.get("MORE_KIND", "classic")

P = f"more.{RUN}"
X_DEF = f"{P}.deftopic"      # task_default_exchange, type topic
Q_MAIN = f"{P}.main"
Q_AUTO = f"{P}.autoq"        # not in task_queues: task_create_missing_queues (topic exchange)
X_HDR = f"{P}.hdrx"
Q_HDR = f"{P}.hdrq"          # bound to a headers exchange on the task-name header
X_M1 = f"{P}.m1x"
X_M2 = f"{P}.m2x"
Q_MULTI = f"{P}.multiq"      # bindings=[direct m1x 'm1', fanout m2x]
Q_FAIL = f"{P}.failq"        # dead-letters to Q_DLQ
Q_DLQ = f"{P}.dlq"
Q_SLOW = f"{P}.slow"
Q_SAC = f"{P}.sac"           # x-single-active-consumer, consumed by two workers started at once
Q_NOCONS = f"{P}.nocons"     # nobody consumes it (expires, purge)
X_QQ = f"{P}.qqx"
Q_QQ = f"{P}.qq"             # quorum queue on a topic exchange (native delayed delivery)
Q_QD = f"{P}.qqdirect"       # quorum queue on a direct exchange (no native delay)
Q_QNEW = f"{P}.qqnew"        # add_consumer of a quorum queue

QQ_ARGS = {"x-queue-type": "quorum"}

if KIND == "quorum":
    queues = [
        Queue(Q_QQ, Exchange(X_QQ, type="topic"), routing_key="qq.#", queue_arguments=QQ_ARGS),
        Queue(Q_QD, Exchange(Q_QD, type="direct"), routing_key=Q_QD, queue_arguments=QQ_ARGS),
        # known to the app, consumed only after add_consumer
        Queue(Q_QNEW, Exchange(Q_QNEW, type="direct"), routing_key=Q_QNEW,
              queue_arguments=QQ_ARGS),
    ]
    default_queue = Q_QQ
    routes = {"more.to_direct": {"queue": Q_QD}}
else:
    queues = [
        Queue(Q_MAIN, Exchange(X_DEF, type="topic"), routing_key="main.#"),
        Queue(Q_HDR, Exchange(X_HDR, type="headers"),
              binding_arguments={"x-match": "any", "task": "more.hdr"}),
        Queue(Q_MULTI, bindings=[binding(Exchange(X_M1, type="direct"), routing_key="m1"),
                                 binding(Exchange(X_M2, type="fanout"), routing_key="")]),
        # explicit exchanges: a Queue without one gets the default topic exchange and
        # task_default_routing_key, and would get every task published with that key
        Queue(Q_FAIL, Exchange(Q_FAIL, type="direct"), routing_key=Q_FAIL, queue_arguments={"x-dead-letter-exchange": "",
                                       "x-dead-letter-routing-key": Q_DLQ}),
        Queue(Q_SLOW, Exchange(Q_SLOW, type="direct"), routing_key=Q_SLOW),
        Queue(Q_SAC, Exchange(Q_SAC, type="direct"), routing_key=Q_SAC,
              queue_arguments={"x-single-active-consumer": True}),
    ]
    default_queue = Q_MAIN
    routes = {"more.hdr": {"queue": Q_HDR}, "more.auto": {"queue": Q_AUTO},
              "more.fail": {"queue": Q_FAIL}, "more.fail_noack": {"queue": Q_FAIL},
              "more.slow": {"queue": Q_SLOW},
              "more.serial": {"queue": Q_SAC}}

app = Celery("more_app")
app.conf.update(
    broker_url=os.environ.get("MORE_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend="rpc://",
    result_expires=120,
    task_acks_late=True,
    task_track_started=True,
    worker_prefetch_multiplier=int(os.environ.get("MORE_PREFETCH", "1")),
    broker_transport_options={"confirm_publish": True},
    broker_heartbeat=10,
    broker_connection_retry_on_startup=True,
    task_default_queue=default_queue,
    task_default_exchange=X_DEF,
    task_default_exchange_type="topic",
    task_default_routing_key="main.default",
    task_create_missing_queues=True,
    task_queues=queues,
    task_routes=routes,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_cancel_long_running_tasks_on_connection_loss=True,
)
if os.environ.get("MORE_CONTROL", "run") == "run":
    # remote control on names of this run: a run never meets another's (or another test's
    # cleanup of celery.pidbox). Through warren these names are sharded, not control traffic.
    app.conf.control_exchange = f"more{RUN}"


def rec(task, tag, extra=""):
    """One line per execution: tag id host pid redelivered retries eta now exchange rk extra."""
    r = task.request
    di = r.delivery_info or {}
    redelivered = int(bool(di.get("redelivered")))
    eta = r.eta or "-"
    line = (f"{tag} {r.id} {r.hostname} {os.getpid()} {redelivered} {r.retries} {eta} "
            f"{time.time():.3f} {di.get('exchange') or '-'} {di.get('routing_key') or '-'} "
            f"{extra}\n").encode()
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="more.add", bind=True)
def add(self, x, y):
    rec(self, "add")
    return x + y


@app.task(name="more.mark", bind=True)
def mark(self, tag):
    rec(self, tag)
    return tag


@app.task(name="more.to_direct", bind=True)
def to_direct(self, tag):
    rec(self, tag)
    return tag


@app.task(name="more.hdr", bind=True)
def hdr(self):
    rec(self, "hdr")
    return "hdr"


@app.task(name="more.auto", bind=True)
def auto(self):
    rec(self, "auto")
    return "auto"


@app.task(name="more.slow", bind=True)
def slow(self, tag, secs):
    rec(self, tag, "start")
    time.sleep(secs)
    rec(self, tag, "end")
    return secs


@app.task(name="more.serial", bind=True)
def serial(self, i):
    rec(self, "serial", "start")
    time.sleep(0.2)
    rec(self, "serial", "end")
    return i


@app.task(name="more.fail", bind=True)
def fail(self, tag):
    rec(self, tag)
    raise ValueError(tag)


@app.task(name="more.fail_noack", bind=True, acks_on_failure_or_timeout=False)
def fail_noack(self, tag):
    rec(self, tag)
    raise ValueError(tag)


@app.task(name="more.lost", bind=True, reject_on_worker_lost=True)
def lost(self, tag, secs):
    """Sleeps; the driver SIGKILLs the pool child at the first run (it reads the pid)."""
    rec(self, tag, "start")
    time.sleep(secs)
    rec(self, tag, "end")
    return "ok"


@app.task(name="more.retry_cd", bind=True)
def retry_cd(self, tag):
    rec(self, tag)
    if self.request.retries < 1:
        raise self.retry(countdown=2, max_retries=3)
    return "retried"


@app.task(name="more.selfkill", bind=True)
def selfkill(self):
    os.kill(os.getpid(), signal.SIGKILL)
