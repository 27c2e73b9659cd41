"""RabbitMQ's tutorials 1 to 6 in pika against one AMQP address (warren, or RabbitMQ directly).

    python tests/clients/tutorials.py amqp://guest:guest@127.0.0.1:5673/%2F [1 2 ...]

The tutorials' Python code (https://www.rabbitmq.com/tutorials, pika BlockingConnection) as
their scripts write it, each producer and consumer on a connection of its own, the consumers in
threads (as separate processes would run them):

  1 hello world     send.py / receive.py: queue 'hello', auto ack
  2 work queues     new_task.py / two worker.py: durable 'task_queue', delivery_mode=2,
                    basic_qos(prefetch_count=1), manual acks; each task done once, by either worker
  3 publish/sub.    emit_log.py / two receive_logs.py: fanout 'logs', server-named exclusive queues
                    (queue_declare(queue='', exclusive=True)); every subscriber gets every message
  4 routing         emit_log_direct.py / receive_logs_direct.py 'warning error' and
                    'info warning error': direct 'direct_logs'; 'debug' reaches nobody
  5 topics          emit_log_topic.py / receive_logs_topic.py with the tutorial's binding keys
                    ('*.orange.*', '*.*.rabbit lazy.#', '#', 'kern.* *.critical'); a message
                    matching two bindings of one queue arrives once
  6 RPC             rpc_server.py x2 / rpc_client.py x2: 'rpc_queue', server-named exclusive
                    callback queue, correlation_id; each call answered once, to its own caller

Every consumer must receive each message meant for it exactly once and nothing else. Names get a
per-run suffix so runs do not meet, and what a tutorial declared is deleted after it (exclusive
queues go with their connections). Every wait has a deadline, and each tutorial a time limit.
Order is not asserted (through warren a queue's messages live on several clusters). Prints one
PASS/FAIL line per tutorial; exits 0 when all pass.
"""

import signal
import sys
import threading
import time
import uuid
from collections import Counter

import pika
import pika.exceptions

RUN = uuid.uuid4().hex[:12]  # a suffix, not a bare UUID (warren's Celery preset: control queues)
HELLO, TASK_QUEUE, RPC_QUEUE = f"hello-{RUN}", f"task_queue-{RUN}", f"rpc_queue-{RUN}"
LOGS, DIRECT_LOGS, TOPIC_LOGS = f"logs-{RUN}", f"direct_logs-{RUN}", f"topic_logs-{RUN}"
WAIT = 20  # seconds for a consumer to be set up, and for the messages to arrive
GRACE = 1.0  # seconds to keep consuming once all expected messages are in (duplicates, strays)
LIMIT = 90  # seconds for one whole tutorial (SIGALRM interrupts a blocked pika call)
DOT_SECONDS = 0.02  # worker.py sleeps a second per '.' in the task; scaled down
FAILED = 0


class TutorialTimeout(Exception):
    pass


def check(ok, what):
    global FAILED
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILED += 1


def describe(e):
    """An exception as one line; pika's AMQPConnectionError has an empty str()."""
    return f"{type(e).__name__}: {e}" if str(e) else repr(e)


def connect(url):
    params = pika.URLParameters(url)
    params.blocked_connection_timeout = 30
    params.socket_timeout = 10
    return pika.BlockingConnection(params)


class Consumer(threading.Thread):
    """One consumer script (receive.py, worker.py, receive_logs*.py, rpc_server.py): its own
    connection and channel, set up by `setup(channel, me)` the way the script does it, then
    channel.start_consuming() until stop(). `setup`'s callbacks call me.record()."""

    def __init__(self, url, name, setup):
        super().__init__(name=name, daemon=True)
        self.url, self.setup = url, setup
        self.got = []  # (routing_key, body), in arrival order
        self.ready = threading.Event()
        self.error = None
        self.conn = self.channel = None

    def record(self, method, body):
        self.got.append((method.routing_key, body))

    def run(self):
        try:
            self.conn = connect(self.url)
            self.channel = self.conn.channel()
            self.setup(self.channel, self)
            self.ready.set()
            self.channel.start_consuming()
        except Exception as e:
            self.error = describe(e)
        finally:
            self.ready.set()
            try:
                if self.conn is not None and self.conn.is_open:
                    self.conn.close()
            except Exception:
                pass

    def stop(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.add_callback_threadsafe(self.channel.stop_consuming)
        except Exception:
            pass
        self.join(10)
        if self.is_alive() and self.error is None:
            self.error = "did not stop within 10 s"


def start(consumers):
    """Starts the consumers and waits until each has declared, bound and called basic_consume.
    Returns the errors of those that failed or are not consuming in time (then nothing is
    published: the tutorial fails with these errors alone)."""
    for c in consumers:
        c.start()
    deadline = time.monotonic() + WAIT
    for c in consumers:
        c.ready.wait(max(0.0, deadline - time.monotonic()))
    errors = []
    for c in consumers:
        if c.error or not c.ready.is_set():
            errors.append(f"{c.name}: {c.error or f'not consuming after {WAIT} s'}")
    return errors


def wait_for(done):
    """Waits until done() holds (or WAIT seconds), then GRACE seconds more so that duplicates
    and messages that should not come have a chance to arrive. Returns whether done() held."""
    deadline = time.monotonic() + WAIT
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    ok = done()
    time.sleep(GRACE)
    return ok


def compare(name, received, expected):
    """`received` (routing_key, body) pairs against `expected` ones, each wanted exactly once."""
    got = Counter(received)
    missing = [m for m in expected if got[m] == 0]
    twice = [m for m, n in got.items() if n > 1 and m in expected]
    stray = [m for m in got if m not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} missing (e.g. {missing[0]})")
    if twice:
        problems.append(f"{len(twice)} received more than once (e.g. {twice[0]})")
    if stray:
        problems.append(f"{len(stray)} not meant for it (e.g. {stray[0]})")
    return [f"{name}: {p}" for p in problems]


def stopped(consumers):
    """Errors of consumers that failed while consuming, or did not stop."""
    return [f"{c.name}: {c.error}" for c in consumers if c.error]


def stop_all(consumers):
    for c in consumers:
        if c.is_alive():
            c.stop()


# --- 1: "Hello World!" -------------------------------------------------------------------------


def tutorial_1(url):
    queue = HELLO

    def send(first, last):  # send.py
        connection = connect(url)
        channel = connection.channel()
        channel.queue_declare(queue=queue)
        for i in range(first, last):
            channel.basic_publish(exchange="", routing_key=queue, body=f"Hello World! #{i}".encode())
        connection.close()

    def receive(channel, me):  # receive.py
        channel.queue_declare(queue=queue)

        def callback(ch, method, properties, body):
            me.record(method, body)

        channel.basic_consume(queue=queue, on_message_callback=callback, auto_ack=True)

    # Half is sent before the receiver starts (it waits in the queue), half while it consumes.
    send(0, 10)
    receiver = Consumer(url, "receive.py", receive)
    try:
        errors = start([receiver])
        if not errors:
            send(10, 20)
            wait_for(lambda: len(receiver.got) >= 20)
    finally:
        stop_all([receiver])
    if errors:
        return errors, ""
    expected = [(queue, f"Hello World! #{i}".encode()) for i in range(20)]
    errors = compare(receiver.name, receiver.got, expected) + stopped([receiver])
    return errors, "20 messages, each received once"


# --- 2: Work queues ----------------------------------------------------------------------------


def tutorial_2(url):
    queue = TASK_QUEUE
    tasks = [f"Task {i}" + "." * (i % 4) for i in range(30)]
    persistent = []

    def worker(channel, me):  # worker.py
        channel.queue_declare(queue=queue, durable=True)
        channel.basic_qos(prefetch_count=1)

        def callback(ch, method, properties, body):
            time.sleep(body.count(b".") * DOT_SECONDS)
            me.record(method, body)
            persistent.append(properties.delivery_mode == 2)
            ch.basic_ack(delivery_tag=method.delivery_tag)

        channel.basic_consume(queue=queue, on_message_callback=callback)

    workers = [Consumer(url, f"worker.py #{i}", worker) for i in (1, 2)]
    try:
        errors = start(workers)
        if not errors:
            connection = connect(url)  # new_task.py (one connection for all the tasks)
            channel = connection.channel()
            channel.queue_declare(queue=queue, durable=True)
            for message in tasks:
                channel.basic_publish(
                    exchange="",
                    routing_key=queue,
                    body=message.encode(),
                    properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                )
            connection.close()
            wait_for(lambda: sum(len(w.got) for w in workers) >= len(tasks))
    finally:
        stop_all(workers)
    if errors:
        return errors, ""
    connection = connect(url)
    left = connection.channel().queue_declare(queue=queue, durable=True, passive=True).method.message_count
    connection.close()

    # Each task once over both workers together; both took part (round-robin dispatch).
    done = [m for w in workers for m in w.got]
    errors = compare("workers", done, [(queue, t.encode()) for t in tasks]) + stopped(workers)
    idle = [w.name for w in workers if not w.got]
    if idle and not errors:
        errors.append(f"{', '.join(idle)} got no task (both workers should share them)")
    if not all(persistent):
        errors.append(f"{persistent.count(False)} task(s) delivered without delivery_mode=2")
    if left != 0:
        errors.append(f"{left} message(s) left in {queue} after every task was acked")
    split = "/".join(str(len(w.got)) for w in workers)
    return errors, f"{len(tasks)} tasks done once each, split {split}, all acked"


# --- 3-5: Publish/Subscribe, Routing, Topics ---------------------------------------------------


def receive_logs(exchange, exchange_type, binding_keys):
    """receive_logs.py (fanout, binding_keys [None]), receive_logs_direct.py and
    receive_logs_topic.py: a server-named exclusive queue bound once per key."""

    def setup(channel, me):
        channel.exchange_declare(exchange=exchange, exchange_type=exchange_type)
        result = channel.queue_declare(queue="", exclusive=True)
        queue_name = result.method.queue
        for binding_key in binding_keys:
            if binding_key is None:
                channel.queue_bind(exchange=exchange, queue=queue_name)
            else:
                channel.queue_bind(exchange=exchange, queue=queue_name, routing_key=binding_key)

        def callback(ch, method, properties, body):
            me.record(method, body)

        channel.basic_consume(queue=queue_name, on_message_callback=callback, auto_ack=True)

    return setup


def pub_sub(url, exchange, exchange_type, receivers, messages):
    """Runs `receivers` ({name: binding keys}), then emit_log*.py publishing `messages`
    ([(routing_key, body, names of the receivers that should get it)]), and compares."""
    consumers = [
        Consumer(url, name, receive_logs(exchange, exchange_type, keys)) for name, keys in receivers.items()
    ]
    expected = {c.name: [(rk, body) for rk, body, to in messages if c.name in to] for c in consumers}
    try:
        errors = start(consumers)
        if not errors:
            connection = connect(url)  # emit_log*.py
            channel = connection.channel()
            channel.exchange_declare(exchange=exchange, exchange_type=exchange_type)
            for routing_key, body, _to in messages:
                channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body)
            connection.close()
            wait_for(lambda: all(len(c.got) >= len(expected[c.name]) for c in consumers))
    finally:
        stop_all(consumers)
    if errors:
        return errors
    for c in consumers:
        errors += compare(c.name, c.got, expected[c.name])
    return errors + stopped(consumers)


def tutorial_3(url):
    exchange = LOGS
    receivers = {"receive_logs.py #1": [None], "receive_logs.py #2": [None]}
    messages = [("", f"info: Hello World! #{i}".encode(), set(receivers)) for i in range(20)]
    errors = pub_sub(url, exchange, "fanout", receivers, messages)
    return errors, f"{len(messages)} messages to fanout, each received once by both subscribers"


def tutorial_4(url):
    exchange = DIRECT_LOGS
    some, every = "receive_logs_direct.py warning error", "receive_logs_direct.py info warning error"
    receivers = {some: ["warning", "error"], every: ["info", "warning", "error"]}
    wanted = {"debug": set(), "info": {every}, "warning": {some, every}, "error": {some, every}}
    messages = [(sev, f"{sev}: message {i}".encode(), to) for i in range(5) for sev, to in wanted.items()]
    errors = pub_sub(url, exchange, "direct", receivers, messages)
    return errors, "info/warning/error/debug x5: each where bound, once; debug nowhere"


def tutorial_5(url):
    exchange = TOPIC_LOGS
    keys = [["*.orange.*"], ["*.*.rabbit", "lazy.#"], ["#"], ["kern.*", "*.critical"]]
    receivers = {"receive_logs_topic.py " + " ".join(f"'{k}'" for k in ks): ks for ks in keys}
    q1, q2, every, kern = receivers
    # The tutorial's examples; a key matching both bindings of one queue is delivered there once.
    wanted = {
        "quick.orange.rabbit": {q1, q2},
        "lazy.orange.elephant": {q1, q2},
        "quick.orange.fox": {q1},
        "lazy.brown.fox": {q2},
        "lazy.pink.rabbit": {q2},
        "quick.brown.fox": set(),
        "orange": set(),
        "quick.orange.new.rabbit": set(),
        "lazy.orange.new.rabbit": {q2},
        "kern.critical": {kern},
        "kern.info": {kern},
        "cron.critical": {kern},
        "kern.disk.critical": set(),
    }
    messages = [(key, f"{key} #{i}".encode(), to | {every}) for i in range(3) for key, to in wanted.items()]
    errors = pub_sub(url, exchange, "topic", receivers, messages)
    return errors, f"{len(messages)} messages, 13 keys x 4 subscribers: each where it matches, once"


# --- 6: RPC ------------------------------------------------------------------------------------


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class FibonacciRpcClient:
    """rpc_client.py, with a deadline on the wait for the response."""

    def __init__(self, url, queue):
        self.queue = queue
        self.connection = connect(url)
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.response = None
        self.corr_id = None
        self.received = []  # (correlation_id, body) of every response

    def on_response(self, ch, method, props, body):
        self.received.append((props.correlation_id, body))
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, n):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            properties=pika.BasicProperties(reply_to=self.callback_queue, correlation_id=self.corr_id),
            body=str(n),
        )
        deadline = time.monotonic() + WAIT
        while self.response is None and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)
        return self.corr_id, self.response


def tutorial_6(url):
    queue = RPC_QUEUE

    def rpc_server(channel, me):  # rpc_server.py
        channel.queue_declare(queue=queue)

        def on_request(ch, method, props, body):
            n = int(body)
            response = fib(n)
            ch.basic_publish(
                exchange="",
                routing_key=props.reply_to,
                properties=pika.BasicProperties(correlation_id=props.correlation_id),
                body=str(response),
            )
            ch.basic_ack(delivery_tag=method.delivery_tag)
            me.record(method, body)

        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(queue=queue, on_message_callback=on_request)

    servers = [Consumer(url, f"rpc_server.py #{i}", rpc_server) for i in (1, 2)]
    clients, calls = [], {}  # calls: client index -> {correlation_id: (n, response)}
    try:
        errors = start(servers)
        if not errors:
            clients = [FibonacciRpcClient(url, queue) for _ in range(2)]
            for n in range(20):
                i = n % 2
                corr_id, response = clients[i].call(n)
                calls.setdefault(i, {})[corr_id] = (n, response)
                if response is None:
                    errors.append(f"rpc_client.py #{i + 1}: no response to fib({n}) within {WAIT} s")
                    break
            end = time.monotonic() + GRACE  # duplicates or misrouted responses
            while time.monotonic() < end:
                for c in clients:
                    c.connection.process_data_events(time_limit=0.05)
    finally:
        stop_all(servers)
        for c in clients:
            try:
                c.connection.close()
            except Exception:
                pass
    if not clients:  # a server could not start
        return errors, ""
    for i, c in enumerate(clients):
        mine = calls.get(i, {})
        wrong = [(n, r) for n, r in mine.values() if r is not None and r != str(fib(n)).encode()]
        if wrong:
            errors.append(f"rpc_client.py #{i + 1}: wrong answers (n, got): {wrong[:3]}")
        got = Counter(corr for corr, _ in c.received)
        twice = [k for k, v in got.items() if v > 1]
        stray = [k for k in got if k not in mine]
        if twice:
            errors.append(f"rpc_client.py #{i + 1}: {len(twice)} response(s) received more than once")
        if stray:
            errors.append(f"rpc_client.py #{i + 1}: {len(stray)} response(s) to calls it did not make")
    served = [Counter(body for _rk, body in s.got) for s in servers]
    twice = sum(1 for s in served for v in s.values() if v > 1) + len(set(served[0]) & set(served[1]))
    if twice:
        errors.append(f"{twice} request(s) served more than once")
    errors += stopped(servers)
    split = "/".join(str(len(s.got)) for s in servers)
    return errors, f"fib(0..19) from 2 clients, each answered once to its caller (servers {split})"


# --- runner ------------------------------------------------------------------------------------

# number: (title, function, what it declares by name, deleted after it)
TUTORIALS = {
    1: ("hello world", tutorial_1, [("queue", HELLO)]),
    2: ("work queues", tutorial_2, [("queue", TASK_QUEUE)]),
    3: ("publish/subscribe", tutorial_3, [("exchange", LOGS)]),
    4: ("routing", tutorial_4, [("exchange", DIRECT_LOGS)]),
    5: ("topics", tutorial_5, [("exchange", TOPIC_LOGS)]),
    6: ("RPC", tutorial_6, [("queue", RPC_QUEUE)]),
}


def cleanup(url, declared):
    """Deletes what a tutorial declared by name, on a fresh connection (each on its own channel,
    so one refusal does not stop the rest). Returns what could not be deleted."""
    left = []
    try:
        connection = connect(url)
    except Exception as e:
        return [f"cleanup: cannot connect: {describe(e)}"]
    for kind, name in declared:
        try:
            channel = connection.channel()
            if kind == "queue":
                channel.queue_delete(queue=name)
            else:
                channel.exchange_delete(exchange=name)
            channel.close()
        except Exception as e:
            left.append(f"cleanup: {kind} {name}: {describe(e)}")
            if not connection.is_open:
                connection = connect(url)
    if connection.is_open:
        connection.close()
    return left


def on_alarm(_signum, _frame):
    raise TutorialTimeout(f"did not finish within {LIMIT} s")


def run(url, number):
    title, tutorial, names = TUTORIALS[number]
    t0 = time.monotonic()
    signal.alarm(LIMIT)
    try:
        errors, what = tutorial(url)
    except Exception as e:  # an AMQP error in the producer or an RPC client, or the time limit
        errors, what = [describe(e)], ""
    finally:
        signal.alarm(0)
    signal.alarm(30)
    try:
        cleanup_errors = cleanup(url, names)
    except Exception as e:
        cleanup_errors = [f"cleanup: {describe(e)}"]
    finally:
        signal.alarm(0)
    errors += cleanup_errors
    took = f"({time.monotonic() - t0:.1f} s)"
    if errors:
        check(False, f"tutorial {number}, {title} {took}")
        for e in errors:
            print(f"         {e}", flush=True)
    else:
        check(True, f"tutorial {number}, {title}: {what} {took}")


def main(url, numbers):
    signal.signal(signal.SIGALRM, on_alarm)
    print(f"  run {RUN} against {url}", flush=True)
    for number in numbers:
        run(url, number)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or not all(a.isdigit() and int(a) in TUTORIALS for a in args[1:]):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(args[0], [int(a) for a in args[1:]] or list(TUTORIALS))
    print("tutorials: all passed" if FAILED == 0 else f"tutorials: {FAILED} tutorial(s) failed")
    sys.exit(0 if FAILED == 0 else 1)
