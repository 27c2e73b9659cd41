"""Scenario bodies for frameworks_compare.py (Dramatiq and nameko), one scenario per process.

    python frameworks_app.py dramatiq SCENARIO URL RUN      # prints one JSON list of observations
    python frameworks_app.py nameko   SCENARIO URL RUN      # (eventlet monkey-patched process)
    python frameworks_app.py dworker  KIND URL RUN LEDGER THREADS   # a Dramatiq worker process

Each scenario runs in a process of its own because Dramatiq keeps a global broker and nameko
needs eventlet's monkey patching before anything else is imported. RUN is a short unique
string: every queue, exchange, actor and service name of the scenario carries it, and the
scenario deletes what it declared (through the same URL) before it prints. Observations are
strings with no timings and no generated names; those that describe a difference that
docs/semantics.md documents start with `[doc:...]` and are not compared.
"""

from __future__ import annotations

import sys

if len(sys.argv) > 1 and sys.argv[1] in ("nameko", "nservice"):
    import eventlet

    eventlet.monkey_patch()

import json
import os
import subprocess
import time
import traceback

LEDGER_DIR = "/tmp/warren-frameworks"
STEP = 20.0  # seconds: one bounded wait


def wait_for(pred, seconds=STEP, every=0.05):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def ledger_lines(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def ledger_add(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def err(e) -> str:
    """An exception as a client sees it: type, and AMQP code and text when it has them."""
    name = type(e).__name__
    args = getattr(e, "args", ())
    code = getattr(e, "reply_code", None)
    text = getattr(e, "reply_text", None)
    if code is None and len(args) >= 2 and isinstance(args[0], int):
        code, text = args[0], args[1]
    if code is not None:
        return f"{name} {code} {text}"
    return name


# ---------------------------------------------------------------------------------------------
# plain pika helpers (inspection and cleanup through the same URL)


def pika_conn(url):
    import pika

    p = pika.URLParameters(url)
    p.connection_attempts = 1
    p.socket_timeout = 5
    p.blocked_connection_timeout = 30
    return pika.BlockingConnection(p)


def drain(url, queue):
    """basic.get until get-empty (acking each): [(body, properties), ...]"""
    out = []
    c = pika_conn(url)
    try:
        ch = c.channel()
        for _ in range(10000):
            m, props, body = ch.basic_get(queue)
            if m is None:
                break
            out.append((body, props))
            ch.basic_ack(m.delivery_tag)
    finally:
        c.close()
    return out


def cleanup(url, queues=(), exchanges=()):
    import pika.exceptions

    c = pika_conn(url)
    try:
        ch = c.channel()
        for q in queues:
            try:
                ch.queue_delete(q)
            except pika.exceptions.AMQPChannelError:
                ch = c.channel()
        for x in exchanges:
            try:
                ch.exchange_delete(x)
            except pika.exceptions.AMQPChannelError:
                ch = c.channel()
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# Dramatiq


def d_broker(url, results=False, group_callbacks=False, confirm=True):
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.middleware import CurrentMessage

    broker = RabbitmqBroker(url=url, confirm_delivery=confirm)
    broker.add_middleware(CurrentMessage())
    backend = None
    if results:
        from dramatiq.results import Results
        from dramatiq.results.backends import StubBackend

        backend = StubBackend()
        broker.add_middleware(Results(backend=backend))
    if group_callbacks:
        from dramatiq.middleware import GroupCallbacks
        from dramatiq.rate_limits.backends import StubBackend as RLStub

        broker.add_middleware(GroupCallbacks(RLStub()))
    dramatiq.set_broker(broker)
    return broker


def d_actors(broker, run, ledger):
    """The actors of every Dramatiq scenario, on queues named after RUN."""
    import dramatiq
    from dramatiq.middleware import CurrentMessage

    q = f"fw-{run}"

    def act(fn, name, **kw):
        return dramatiq.actor(fn, actor_name=f"{name}_{run}", queue_name=kw.pop("queue", q), broker=broker, **kw)

    def record(tag):
        m = CurrentMessage.get_current_message()
        red = getattr(m, "redelivered", None)
        ledger_add(ledger, f"run {tag} redelivered={red}")
        ledger_add(ledger + ".t", f"{tag} {time.time()}")

    def fail(tag):
        ledger_add(ledger, f"attempt {tag}")
        raise ValueError(f"failing {tag}")

    def slow(tag, seconds):
        m = CurrentMessage.get_current_message()
        ledger_add(ledger, f"start {tag} redelivered={getattr(m, 'redelivered', None)}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.05)
        ledger_add(ledger, f"end {tag}")

    def add(a, b=0):
        return a + b

    def square(x):
        return x * x

    def on_ok(message_data, result):
        ledger_add(ledger, f"success {message_data['args']} -> {result}")

    def on_fail(message_data, exc_data):
        ledger_add(ledger, f"failure {message_data['args']} {exc_data['type']}")

    def maybe(x):
        if x < 0:
            raise KeyError(x)
        return x + 100

    return {
        "record": act(record, "record"),
        "fail": act(fail, "fail", max_retries=2, min_backoff=100, max_backoff=300),
        "fail0": act(fail, "fail0", max_retries=0),
        "slow": act(slow, "slow", max_retries=0, time_limit=600000),
        "limited": act(slow, "limited", max_retries=0, time_limit=700),
        "aged": act(record, "aged", max_age=400, queue=f"fw-{run}-aged"),
        "add": act(add, "add", store_results=True),
        "square": act(square, "square", store_results=True),
        "on_ok": act(on_ok, "on_ok"),
        "on_fail": act(on_fail, "on_fail"),
        "maybe": act(maybe, "maybe", max_retries=0),
        "queue": q,
    }


def d_worker(broker, threads=2):
    import dramatiq

    if not getattr(broker, "_fw_booted", False):
        broker.emit_after("process_boot")  # as the `dramatiq` CLI does: starts TimeLimit's timer
        broker._fw_booted = True
    w = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    w.start()
    return w


def d_queues(q):
    return [q, f"{q}.DQ", f"{q}.XQ"]


def d_xq_view(url, q):
    """What the dead-letter queue holds: sorted (actor, args, retries, x-death reason and count)."""
    from dramatiq import Message

    out = []
    for body, props in drain(url, f"{q}.XQ"):
        m = Message.decode(body)
        deaths = (props.headers or {}).get("x-death") or []
        d = [(x.get("reason"), int(x.get("count") or 0), "queue=self" if x.get("queue") == q else "queue=other")
             for x in deaths]
        out.append(f"{m.actor_name.rsplit('_', 1)[0]} args={list(m.args)} retries={m.options.get('retries')} x-death={d}")
    return sorted(out)


def dramatiq_scenario(name, url, run):
    os.makedirs(LEDGER_DIR, exist_ok=True)
    ledger = f"{LEDGER_DIR}/{run}.ledger"
    obs: list[str] = []
    results = True  # store_results is an actor option only with the Results middleware
    broker = d_broker(url, results=results, group_callbacks=name == "d_group_results")
    A = d_actors(broker, run, ledger)
    q = A["queue"]
    queues = d_queues(q) + d_queues(f"{q}-aged")
    worker = None
    try:
        if name == "d_send_delay":
            for i in range(5):
                A["record"].send(f"now{i}")
            sent = time.time()  # every eta is at least this + 1.5 s
            for i in range(3):
                A["record"].send_with_options(args=(f"later{i}",), delay=1500)
            obs.append(f"counts before worker (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            worker = d_worker(broker)
            wait_for(lambda: len(ledger_lines(ledger)) >= 8)
            time.sleep(0.5)
            ran = dict(line.split() for line in ledger_lines(ledger + ".t"))
            early = sorted(t for t, at in ran.items() if t.startswith("later") and float(at) < sent + 1.49)
            obs.append(f"delayed messages run before their eta: {early}")
            obs.append(f"runs: {sorted(ledger_lines(ledger))}")
            wait_for(lambda: broker.get_queue_message_counts(q) == (0, 0, 0), 5)
            obs.append(f"counts after (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")

        elif name == "d_retries_dead_letter":
            worker = d_worker(broker)
            for i in range(3):
                A["fail"].send(f"m{i}")
            A["fail0"].send("z")
            wait_for(lambda: broker.get_queue_message_counts(q)[2] >= 4, 30)
            time.sleep(1.0)
            obs.append(f"attempts: {sorted(ledger_lines(ledger))}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            worker.stop(timeout=5000)
            worker = None
            for line in d_xq_view(url, q):
                obs.append(f"XQ: {line}")

        elif name == "d_max_age":
            A["aged"].send("old1")
            A["aged"].send("old2")
            time.sleep(1.2)
            A["aged"].send_with_options(args=("young",), max_age=60000)
            worker = d_worker(broker)
            aq = f"{q}-aged"
            wait_for(lambda: len(ledger_lines(ledger)) >= 1 and broker.get_queue_message_counts(aq)[2] >= 2, 15)
            time.sleep(0.5)
            obs.append(f"runs: {sorted(ledger_lines(ledger))}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(aq)}")
            worker.stop(timeout=5000)
            worker = None
            for line in d_xq_view(url, aq):
                obs.append(f"XQ: {line}")

        elif name == "d_time_limit":
            worker = d_worker(broker)
            A["limited"].send("t1", 5)
            A["slow"].send("t2", 0.2)
            wait_for(lambda: broker.get_queue_message_counts(q)[2] >= 1 and "end t2" in ledger_lines(ledger), 15)
            time.sleep(0.5)
            obs.append(f"ledger: {sorted(line.split(' redelivered')[0] for line in ledger_lines(ledger))}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            worker.stop(timeout=5000)
            worker = None
            for line in d_xq_view(url, q):
                obs.append(f"XQ: {line}")

        elif name == "d_pipeline":
            from dramatiq import pipeline

            worker = d_worker(broker)
            p = pipeline([A["add"].message(1, 2), A["add"].message(10), A["square"].message()])
            p.run()
            try:
                obs.append(f"pipeline result: {p.get_result(block=True, timeout=15000)}")
            except Exception as e:
                obs.append(f"pipeline result: {err(e)}")
            p2 = A["add"].message(5, 5) | A["square"].message() | A["add"].message(1)
            p2.run()
            try:
                obs.append(f"pipeline (|) results: {list(p2.get_results(block=True, timeout=15000))}")
            except Exception as e:
                obs.append(f"pipeline (|) results: {err(e)}")
            # callbacks middleware: on_success / on_failure
            A["maybe"].send_with_options(args=(1,), on_success=A["on_ok"], on_failure=A["on_fail"])
            A["maybe"].send_with_options(args=(-1,), on_success=A["on_ok"], on_failure=A["on_fail"])
            wait_for(lambda: len(ledger_lines(ledger)) >= 2, 15)
            time.sleep(0.3)
            obs.append(f"callbacks: {sorted(ledger_lines(ledger))}")

        elif name == "d_group_results":
            from dramatiq import group

            worker = d_worker(broker, threads=3)
            g = group([A["square"].message(i) for i in range(8)])
            g.add_completion_callback(A["record"].message("group-done"))
            g.run()
            try:
                obs.append(f"group results (sorted): {sorted(g.get_results(block=True, timeout=15000))}")
            except Exception as e:
                obs.append(f"group results: {err(e)}")
            wait_for(lambda: len(ledger_lines(ledger)) >= 1, 10)
            time.sleep(0.3)
            obs.append(f"completion callback runs: {sorted(line.split(' redelivered')[0] for line in ledger_lines(ledger))}")
            obs.append(f"group completed: {g.completed}, count {g.completed_count}")

        elif name == "d_kill_redeliver":
            app = os.path.abspath(__file__)
            args = [sys.executable, app, "dworker", "slow", url, run, ledger, "1"]
            # declare the queues first, as `dramatiq` does when a worker boots
            A["slow"].send("k1", 4)
            p1 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = wait_for(lambda: any(line.startswith("start k1") for line in ledger_lines(ledger)), 20)
            obs.append(f"first worker started the task: {started}")
            p1.kill()
            p1.wait(10)
            p2 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: "end k1" in ledger_lines(ledger), 30)
            finally:
                p2.terminate()
                try:
                    p2.wait(15)
                except subprocess.TimeoutExpired:
                    p2.kill()
            obs.append(f"ledger: {sorted(ledger_lines(ledger))}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")

        elif name == "d_multi_workers":
            app = os.path.abspath(__file__)
            n = 300
            broker.declare_queue(q, ensure=True)
            procs = [subprocess.Popen([sys.executable, app, "dworker", "record", url, run, ledger, "2"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(3)]
            try:
                for i in range(n):
                    A["record"].send(f"r{i:03d}")
                for i in range(20):
                    A["record"].send_with_options(args=(f"d{i:02d}",), delay=500)
                wait_for(lambda: len(ledger_lines(ledger)) >= n + 20, 60, every=0.2)
                time.sleep(1.5)  # any duplicate would arrive now
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    try:
                        p.wait(15)
                    except subprocess.TimeoutExpired:
                        p.kill()
            tags = [line.split()[1] for line in ledger_lines(ledger)]
            obs.append(f"runs {len(tags)}, distinct {len(set(tags))}, missing {n + 20 - len(set(tags))}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")

        elif name == "d_counts_flush":
            for i in range(4):
                A["record"].send(f"c{i}")
            for i in range(2):
                A["record"].send_with_options(args=(f"cd{i}",), delay=600000)
            # put one in the XQ: a consumer that nacks it, as the worker does on failure
            c = pika_conn(url)
            ch = c.channel()
            ch.basic_publish("", q, b'{"queue_name":"x","actor_name":"x","args":[],"kwargs":{},"options":{},"message_id":"1","message_timestamp":0}')
            held = []
            for _ in range(20):
                m, _p, body = ch.basic_get(q)
                if m is None:
                    continue
                if b'"actor_name":"x"' in body:
                    ch.basic_nack(m.delivery_tag, requeue=False)
                    break
                held.append(m.delivery_tag)
            for tag in held:
                ch.basic_nack(tag, requeue=True)
            c.close()
            wait_for(lambda: broker.get_queue_message_counts(q) == (4, 2, 1), 5)
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            obs.append(f"declared queues: {sorted(x.replace(run, 'RUN') for x in broker.get_declared_queues())}")
            try:
                broker.join(q, timeout=1500)
                obs.append("join on a non-empty queue: returned")
            except Exception as e:
                obs.append(f"join on a non-empty queue: {err(e)}")
            broker.flush(q)
            obs.append(f"after flush (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            A["record"].send("c9")
            broker.flush_all()
            obs.append(f"after flush_all (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            try:
                broker.join(q, min_successes=3, timeout=5000)
                obs.append("join on an empty queue: returned")
            except Exception as e:
                obs.append(f"join on an empty queue: {err(e)}")
            # flush of a queue that does not exist: the purge fails and the channel is reopened
            broker.flush(f"{q}-missing")
            obs.append(f"flush of a missing queue then counts = {broker.get_queue_message_counts(q)}")
            queues += d_queues(f"{q}-missing")

        elif name == "d_unroutable_requeue":
            # the queue deleted behind the broker's back: the mandatory publish comes back
            # (UnroutableError), Dramatiq declares the queue again and publishes once more
            A["record"].send("u0")
            cleanup(url, queues=[q])
            A["record"].send("u1")
            obs.append(f"counts after send to a deleted queue (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            bodies = sorted(json.loads(b)["args"][0] for b, _ in drain(url, q))
            obs.append(f"queue holds: {bodies}")
            # a publish with confirm_delivery to an exchange that does not exist (plain pika)
            c = pika_conn(url)
            ch = c.channel()
            ch.confirm_delivery()
            try:
                ch.basic_publish(f"fw-{run}-nox", "k", b"x", mandatory=True)
                obs.append("publish to a missing exchange: ok")
            except Exception as e:
                obs.append(f"publish to a missing exchange: {err(e)}")
            try:
                c.close()
            except Exception:
                pass

        elif name == "d_kill_holding_delayed":
            # a worker process holds delayed messages (unacked, from the .DQ) when it is killed:
            # the next worker gets them again and runs each once, after its eta
            app = os.path.abspath(__file__)
            args = [sys.executable, app, "dworker", "record", url, run, ledger, "1"]
            broker.declare_queue(q, ensure=True)
            sent = time.time()
            for i in range(5):
                A["record"].send_with_options(args=(f"h{i}",), delay=4000)
            p1 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: broker.get_queue_message_counts(q)[1] == 0, 10)
            obs.append(f"delayed messages held by the first worker (ready left in DQ) = {broker.get_queue_message_counts(q)}")
            p1.kill()
            p1.wait(10)
            p2 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: len(ledger_lines(ledger)) >= 5, 30)
                time.sleep(1.0)
            finally:
                p2.terminate()
                try:
                    p2.wait(15)
                except subprocess.TimeoutExpired:
                    p2.kill()
            obs.append(f"runs: {sorted(ledger_lines(ledger))}")
            ran = dict(line.split() for line in ledger_lines(ledger + ".t"))
            obs.append(f"run before eta: {sorted(t for t, at in ran.items() if float(at) < sent + 3.99)}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")

        elif name == "d_threads_send":
            # several threads share one broker (a connection and channel per thread), with and
            # without confirm_delivery, a large message among them
            import threading

            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            plain = RabbitmqBroker(url=url, confirm_delivery=False)
            broker.declare_queue(q, ensure=True)
            errors = []

            def sender(b, k):
                try:
                    for i in range(40):
                        b.enqueue(A["record"].message(f"{k}-{i}"))
                    b.enqueue(A["record"].message(f"{k}-delayed"), delay=1)
                    b.enqueue(A["record"].message(f"{k}-" + "x" * 600000))
                except Exception as e:
                    errors.append(err(e))

            ts = [threading.Thread(target=sender, args=(broker if k % 2 else plain, k)) for k in range(6)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            obs.append(f"send errors: {sorted(errors)}")
            wait_for(lambda: broker.get_queue_message_counts(q)[:2] == (246, 6), 10)
            obs.append(f"counts after 6 threads (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            bodies = drain(url, q)
            from dramatiq import Message

            args = [Message.decode(b).args[0] for b, _ in bodies]
            obs.append(f"drained {len(args)}, distinct {len(set(args))}, large intact {sum(a.endswith('x' * 600000) for a in args)}")
            try:
                plain.close()
            except Exception:
                pass

        elif name == "d_worker_restart":
            # a worker stopped gracefully with messages prefetched: the running ones finish and are
            # acked, the prefetched ones go back (channel close); a new worker runs each once
            for i in range(40):
                A["slow"].send(f"w{i:02d}", 0.1)
            worker = d_worker(broker, threads=2)
            wait_for(lambda: len(ledger_lines(ledger)) >= 10, 20)
            worker.stop(timeout=10000)
            worker = None
            worker = d_worker(broker, threads=2)
            wait_for(lambda: sum(x.startswith("end") for x in ledger_lines(ledger)) >= 40, 40)
            time.sleep(1.0)
            ends = [x.split()[1] for x in ledger_lines(ledger) if x.startswith("end")]
            starts = [x.split()[1] for x in ledger_lines(ledger) if x.startswith("start")]
            obs.append(f"ended {len(ends)}, distinct {len(set(ends))}; started {len(starts)}, distinct {len(set(starts))}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")

        elif name == "d_queue_deleted_under_worker":
            # another client deletes the queue a worker consumes: the consumer is cancelled; the
            # next send declares it again (mandatory publish returned) and the worker recovers
            worker = d_worker(broker, threads=1)
            A["record"].send("q1")
            wait_for(lambda: len(ledger_lines(ledger)) >= 1, 15)
            cleanup(url, queues=[q])
            time.sleep(1.0)
            A["record"].send("q2")
            got = wait_for(lambda: len(ledger_lines(ledger)) >= 2, 30)
            obs.append(f"runs: {sorted(ledger_lines(ledger))}, second within 30 s: {got}")
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")

        elif name == "d_idle_heartbeat":
            # a short heartbeat (`?heartbeat=2` in the URL) and a sender that stays idle past two
            # intervals without letting pika run: the broker drops the connection; Dramatiq's
            # enqueue notices, reconnects and sends
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            hb = RabbitmqBroker(url=url + ("&" if "?" in url else "?") + "heartbeat=2", confirm_delivery=True)
            A["record"].broker = hb
            A["record"].send("before")
            time.sleep(7)
            try:
                A["record"].send("after")
                obs.append("send after an idle period: ok")
            except Exception as e:
                obs.append(f"send after an idle period: {err(e)}")
            A["record"].broker = broker
            obs.append(f"counts (queue, DQ, XQ) = {broker.get_queue_message_counts(q)}")
            try:
                hb.close()
            except Exception:
                pass

        else:
            obs.append(f"unknown scenario {name}")
    finally:
        if worker is not None:
            worker.stop(timeout=5000)
        try:
            broker.close()
        except Exception:
            pass
        cleanup(url, queues=queues)
        for f in (ledger, ledger + ".t"):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
    return obs


def dworker(kind, url, run, ledger, threads):
    """A worker process (what `dramatiq module` starts), run until SIGTERM or SIGKILL."""
    import signal

    broker = d_broker(url, results=True)
    d_actors(broker, run, ledger)
    w = d_worker(broker, int(threads))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.1)
    w.stop(timeout=5000)
    broker.close()


# ---------------------------------------------------------------------------------------------
# nameko


def nameko_scenario(name, url, run):
    import eventlet
    from nameko.containers import ServiceContainer
    from nameko.events import BROADCAST, SERVICE_POOL, SINGLETON, event_handler
    from nameko.exceptions import MethodNotFound, RemoteError, UnknownService  # noqa: F401
    from nameko.rpc import RpcProxy, rpc
    from nameko.standalone.events import event_dispatcher
    from nameko.standalone.rpc import ClusterRpcProxy
    from nameko.timer import timer

    config = {"AMQP_URI": url}
    obs: list[str] = []
    queues: set[str] = set()
    exchanges: list[str] = []
    containers = []
    svc = f"calc_{run}"
    front = f"front_{run}"
    src = f"src_{run}"
    hits: dict[str, list] = {}

    def start(cls):
        c = ServiceContainer(cls, config)
        c.start()
        containers.append(c)
        for ext in c.extensions:
            qq = getattr(ext, "queue", None)
            if qq is not None and getattr(qq, "name", None):
                queues.add(qq.name)
        return c

    def note_proxy_queue(proxy_ctx):
        try:
            queues.add(proxy_ctx._reply_listener.queue.name)
        except Exception:
            pass

    class Calc:
        name = svc

        @rpc
        def add(self, a, b):
            return a + b

        @rpc
        def boom(self):
            raise ValueError("boom")

        @rpc
        def slow(self, x):
            eventlet.sleep(0.05)
            return x

    class Front:
        name = front
        calc = RpcProxy(svc)

        @rpc
        def twice(self, x):
            return self.calc.add(x, x)

    def listener(label, kind):
        counter = hits.setdefault(label, [])

        class L:
            name = f"{label.split('#')[0]}_{run}"

            @event_handler(src, "ping", handler_type=kind, reliable_delivery=kind != BROADCAST)
            def handle(self, payload):
                counter.append(payload)

        return L

    try:
        if name == "n_rpc":
            start(Calc)
            start(Front)
            with ClusterRpcProxy(config, timeout=20) as p:
                note_proxy_queue(p)
                s = getattr(p, svc)
                obs.append(f"sequential adds: {[s.add(i, 1) for i in range(10)]}")
                obs.append(f"service to service: {getattr(p, front).twice(21)}")
                try:
                    s.boom()
                    obs.append("remote error: none")
                except Exception as e:
                    obs.append(f"remote error: {type(e).__name__} {getattr(e, 'exc_type', '')}")
                try:
                    s.nosuchmethod()
                    obs.append("missing method: none")
                except Exception as e:
                    obs.append(f"missing method: {type(e).__name__}")
                replies = [s.slow.call_async(i) for i in range(20)]
                obs.append(f"20 async calls, sorted: {sorted(r.result() for r in replies)}")

            def caller(k):
                with ClusterRpcProxy(config, timeout=20) as p:
                    note_proxy_queue(p)
                    s = getattr(p, svc)
                    pending = [(i, s.add.call_async(k * 100, i)) for i in range(15)]
                    return [(i, r.result()) for i, r in pending]

            pool = eventlet.GreenPool()
            got = list(pool.imap(caller, range(4)))
            ok = all(all(v == k * 100 + i for i, v in res) for k, res in enumerate(got))
            obs.append(f"4 concurrent proxies x 15 calls: {sum(len(r) for r in got)} replies, each to its caller: {ok}")

        elif name == "n_rpc_unknown":
            with ClusterRpcProxy(config, timeout=10) as p:
                note_proxy_queue(p)
                for label, target in (("never declared", f"ghost_{run}"),):
                    t0 = time.monotonic()
                    try:
                        with eventlet.Timeout(15):
                            getattr(p, target).anything()
                        obs.append(f"rpc to a service {label}: returned")
                    except eventlet.Timeout:
                        obs.append(f"rpc to a service {label}: no answer in 15 s")
                    except Exception as e:
                        obs.append(f"rpc to a service {label}: {type(e).__name__}, within 5 s: {time.monotonic() - t0 < 5}")
            # a service that ran and stopped: its queue stays bound, so the call waits for the timeout
            c = start(Calc)
            c.stop()
            containers.remove(c)
            with ClusterRpcProxy(config, timeout=3) as p:
                note_proxy_queue(p)
                try:
                    with eventlet.Timeout(15):
                        getattr(p, svc).add(1, 2)
                    obs.append("rpc to a stopped service: returned")
                except eventlet.Timeout:
                    obs.append("rpc to a stopped service: no answer in 15 s")
                except Exception as e:
                    obs.append(f"rpc to a stopped service: {type(e).__name__}")
            # start it again: the request left in its queue is served, the reply finds no waiter
            start(Calc)
            with ClusterRpcProxy(config, timeout=20) as p:
                note_proxy_queue(p)
                obs.append(f"after restart: {getattr(p, svc).add(2, 3)}")

        elif name == "n_events":
            start(listener("bcast#1", BROADCAST))
            start(listener("bcast#2", BROADCAST))
            start(listener("pool#1", SERVICE_POOL))
            start(listener("pool#2", SERVICE_POOL))
            start(listener("other#1", SERVICE_POOL))
            start(listener("single#1", SINGLETON))
            start(listener("singleb#1", SINGLETON))
            exchanges.append(f"{src}.events")
            dispatch = event_dispatcher(config)
            n = 10
            for i in range(n):
                dispatch(src, "ping", i)

            def total(prefix):
                return sum(len(v) for k, v in hits.items() if k.startswith(prefix))

            wait_for(lambda: total("bcast") >= 2 * n and total("pool") >= n and total("other") >= n
                     and total("single") >= n, 20)
            eventlet.sleep(1.0)
            obs.append(f"BROADCAST per instance: {[sorted(hits[k]) == list(range(n)) for k in ('bcast#1', 'bcast#2')]} "
                       f"({total('bcast')} in all)")
            pool = sorted(hits["pool#1"] + hits["pool#2"])
            obs.append(f"SERVICE_POOL, one service in two instances: {len(pool)} handled, each event once: {pool == list(range(n))}")
            obs.append(f"SERVICE_POOL, another service: {sorted(hits['other#1']) == list(range(n))}")
            single = sorted(hits["single#1"] + hits["singleb#1"])
            obs.append(f"SINGLETON over two services: {len(single)} handled, each event once: {single == list(range(n))}")
            # a broadcast instance that stops: its exclusive queue goes, the other keeps receiving
            bc = next(c for c in containers if c.service_name == f"bcast_{run}")
            bc.stop()
            containers.remove(bc)
            before = {k: len(v) for k, v in hits.items()}
            for i in range(n, n + 5):
                dispatch(src, "ping", i)
            wait_for(lambda: total("bcast") >= before["bcast#1"] + before["bcast#2"] + 5, 15)
            eventlet.sleep(0.8)
            obs.append(f"after one broadcast instance stopped: {sorted(len(hits[k]) - before[k] for k in ('bcast#1', 'bcast#2'))}")

        elif name == "n_event_requeue_on_error":
            # a handler with requeue_on_error fails twice: the event comes back (basic.reject
            # requeue) until it succeeds; a handler without it fails once and the event is gone
            seen = []

            class R:
                name = f"requeuer_{run}"

                @event_handler(src, "job", requeue_on_error=True)
                def handle(self, payload):
                    seen.append(("requeue", payload))
                    if sum(1 for k, p in seen if k == "requeue" and p == payload) <= 2:
                        raise ValueError("again")

                @event_handler(src, "job2")
                def handle2(self, payload):
                    seen.append(("drop", payload))
                    raise ValueError("once")

            start(R)
            exchanges.append(f"{src}.events")
            dispatch = event_dispatcher(config)
            for i in range(3):
                dispatch(src, "job", i)
                dispatch(src, "job2", i)
            wait_for(lambda: len(seen) >= 12, 20)
            eventlet.sleep(1.0)
            obs.append(f"handled: {sorted(seen)}")

        elif name == "n_timer":
            ticks = []

            class T:
                name = f"ticker_{run}"

                @timer(interval=0.2)
                def tick(self):
                    ticks.append(1)

                @rpc
                def count(self):
                    return len(ticks)

            start(T)
            with ClusterRpcProxy(config, timeout=20) as p:
                note_proxy_queue(p)
                eventlet.sleep(1.5)
                c = getattr(p, f"ticker_{run}").count()
                obs.append(f"timer ticked at least 3 times, seen over rpc: {c >= 3}")
        elif name == "n_rpc_service_killed":
            # the only service process is killed (SIGKILL) while it works on a call: the request
            # goes back to the queue, a new process takes it, the caller gets the one reply
            os.makedirs(LEDGER_DIR, exist_ok=True)
            ledger = f"{LEDGER_DIR}/{run}.nledger"
            app = os.path.abspath(__file__)
            args = [sys.executable, app, "nservice", url, run, ledger]
            queues.add(f"rpc-slowsvc_{run}")
            p1 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            p2 = None
            try:
                with ClusterRpcProxy(config, timeout=40) as p:
                    note_proxy_queue(p)
                    s = getattr(p, f"slowsvc_{run}")
                    ok = False
                    for _ in range(100):  # until the service's queue is bound
                        try:
                            reply = s.work.call_async("k", 3)
                            ok = True
                            break
                        except Exception:
                            eventlet.sleep(0.2)
                    obs.append(f"call sent: {ok}")
                    started = wait_for(lambda: any(x.startswith("start k") for x in ledger_lines(ledger)), 20)
                    obs.append(f"first process started the call: {started}")
                    p1.kill()
                    p1.wait(10)
                    p2 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        with eventlet.Timeout(40):
                            obs.append(f"reply: {reply.result()}")
                    except eventlet.Timeout:
                        obs.append("reply: none in 40 s")
                    except Exception as e:
                        obs.append(f"reply: {type(e).__name__}")
                    obs.append(f"ledger: {sorted(ledger_lines(ledger))}")
            finally:
                for pp in (p1, p2):
                    if pp is not None and pp.poll() is None:
                        pp.terminate()
                        try:
                            pp.wait(15)
                        except subprocess.TimeoutExpired:
                            pp.kill()
                try:
                    os.unlink(ledger)
                except FileNotFoundError:
                    pass

        else:
            obs.append(f"unknown scenario {name}")
    finally:
        for c in containers:
            try:
                with eventlet.Timeout(15):
                    c.stop()
            except BaseException:
                c.kill()
        queues.add(f"rpc-{svc}")
        queues.add(f"rpc-{front}")
        queues.add(f"rpc-ticker_{run}")
        cleanup(url, queues=sorted(queues), exchanges=exchanges)
    return obs


# ---------------------------------------------------------------------------------------------


def nservice(url, run, ledger):
    """A nameko service process (what `nameko run` starts), run until SIGTERM or SIGKILL."""
    import signal

    from nameko.containers import ServiceContainer
    from nameko.rpc import rpc

    class Slow:
        name = f"slowsvc_{run}"

        @rpc
        def work(self, tag, seconds):
            ledger_add(ledger, f"start {tag}")
            eventlet.sleep(seconds)
            ledger_add(ledger, f"end {tag}")
            return f"{tag} done"

    c = ServiceContainer(Slow, {"AMQP_URI": url})
    c.start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        eventlet.sleep(0.1)
    c.stop()


def main(argv):
    mode = argv[0]
    if mode == "nservice":
        nservice(*argv[1:4])
        return 0
    if mode == "dworker":
        dworker(*argv[1:6])
        return 0
    name, url, run = argv[1:4]
    try:
        if mode == "dramatiq":
            obs = dramatiq_scenario(name, url, run)
        else:
            obs = nameko_scenario(name, url, run)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"line {f.lineno}" for f in reversed(tb) if f.filename == __file__), "")
        obs = [f"scenario raised {err(e)} at {where}"]
        traceback.print_exc()
    sys.stdout.write("\nOBS-JSON " + json.dumps(obs) + "\n")
    sys.stdout.flush()
    os._exit(0)  # worker threads, eventlet hubs: leave at once


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
