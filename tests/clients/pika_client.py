"""pika against one AMQP address (warren, or RabbitMQ directly for comparison).

    python tests/clients/pika_client.py amqp://guest:guest@127.0.0.1:5673/%2F

What a pika user relies on, with BlockingConnection (the way most pika code is written):
confirmed publishes, a mandatory unroutable publish raising UnroutableError, a consumer with
basic.qos and manual acks receiving every message exactly once (a basic.reject with requeue
gives one back once), basic.get, a transaction (rollback discards, commit publishes), a 2 MiB
message through 4096-byte frames, RPC over direct reply-to (amq.rabbitmq.reply-to), and
passive declare / purge / delete counts. Order is not
asserted: through warren with two shard clusters a queue's messages live on both, each in
order. Exits 0 when every check holds; prints one line per check.
"""

import os
import sys
import time
import uuid

import pika
import pika.exceptions

N = 500
RPC_CALLS = 20
FAILED = 0


def check(ok, what):
    global FAILED
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILED += 1


def main(url):
    params = pika.URLParameters(url)
    params.frame_max = 4096
    params.heartbeat = 10
    params.blocked_connection_timeout = 30
    conn = pika.BlockingConnection(params)
    props = conn._impl.server_properties
    caps = props.get("capabilities", {})
    check(
        caps.get("publisher_confirms") is True and caps.get("basic.nack") is True,
        f"server advertises publisher_confirms and basic.nack ({props.get('product')} {props.get('version')})",
    )

    ch = conn.channel()
    queue = f"clients-pika-{uuid.uuid4().hex[:12]}"
    ch.queue_declare(queue, durable=False, auto_delete=False)

    # Confirmed publishes: BlockingChannel.basic_publish returns once the broker acked it.
    ch.confirm_delivery()
    for i in range(N):
        ch.basic_publish(
            "",
            queue,
            f"msg-{i}".encode(),
            pika.BasicProperties(delivery_mode=2, message_id=str(i)),
        )
    check(True, f"{N} publishes confirmed one by one")

    # A mandatory publish nobody can route raises UnroutableError (basic.return before the ack).
    try:
        ch.basic_publish("", f"{queue}-nowhere", b"lost", mandatory=True)
        check(False, "mandatory unroutable publish raises UnroutableError")
    except pika.exceptions.UnroutableError as e:
        check(
            len(e.messages) == 1 and e.messages[0].body == b"lost",
            "mandatory unroutable publish raises UnroutableError",
        )

    declared = ch.queue_declare(queue, passive=True)
    check(
        declared.method.message_count == N,
        f"passive declare counts {N} messages (got {declared.method.message_count})",
    )

    # A consumer with a prefetch of 10; message 7 is rejected once with requeue.
    consumer = conn.channel()
    consumer.basic_qos(prefetch_count=10)
    seen = {}
    rejected = False
    redelivered = False
    for method, properties, _body in consumer.consume(queue, inactivity_timeout=20):
        if method is None:
            break
        mid = properties.message_id
        if mid == "7" and not rejected:
            rejected = True
            consumer.basic_reject(method.delivery_tag, requeue=True)
            continue
        if mid == "7":
            redelivered = method.redelivered
        seen[mid] = seen.get(mid, 0) + 1
        consumer.basic_ack(method.delivery_tag)
        if len(seen) == N:
            break
    consumer.cancel()
    twice = sum(1 for c in seen.values() if c > 1)
    check(
        len(seen) == N and twice == 0,
        f"consumer got all {N} exactly once ({len(seen)} distinct, {twice} twice)",
    )
    check(redelivered, "the rejected message came back once, marked redelivered")
    consumer.close()

    # basic.get and a 2 MiB message through 4096-byte frames.
    big = os.urandom(2 * 1024 * 1024)
    ch.basic_publish("", queue, big)
    got = None
    for _ in range(100):
        method, _props, body = ch.basic_get(queue, auto_ack=False)
        if method is not None:
            got = body
            ch.basic_ack(method.delivery_tag)
            break
        conn.sleep(0.05)
    check(got == big, "2 MiB message round trip (basic.get) intact")

    # A transaction on its own channel: rollback discards, commit publishes.
    tx = conn.channel()
    tx.tx_select()
    for i in range(3):
        tx.basic_publish("", queue, f"rolled-back-{i}".encode())
    tx.tx_rollback()
    for i in range(2):
        tx.basic_publish("", queue, f"committed-{i}".encode())
    tx.tx_commit()
    declared = ch.queue_declare(queue, passive=True)
    check(
        declared.method.message_count == 2,
        f"after rollback and commit the queue holds the 2 committed (got {declared.method.message_count})",
    )
    tx.close()

    # RPC over direct reply-to, as in pika's RPC examples: the caller consumes from the
    # pseudo-queue, a server on its own connection answers each request to its reply_to (through
    # warren the requests, and so the replies' routes, spread over the shard clusters).
    rpc_queue = f"clients-pika-rpc-{uuid.uuid4().hex[:12]}"
    ch.queue_declare(rpc_queue, durable=False, auto_delete=False)
    replies = {}
    caller = conn.channel()
    caller.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda _c, _m, p, body: replies.setdefault(p.correlation_id, body),
        auto_ack=True,
    )
    for i in range(RPC_CALLS):
        caller.basic_publish(
            "",
            rpc_queue,
            f"request-{i}".encode(),
            pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=str(i)),
        )
    server_conn = pika.BlockingConnection(params)
    server = server_conn.channel()
    served, deadline = 0, time.monotonic() + 20
    while served < RPC_CALLS and time.monotonic() < deadline:
        method, props, body = server.basic_get(rpc_queue, auto_ack=True)
        if method is None:
            server_conn.sleep(0.05)
            continue
        server.basic_publish(
            "", props.reply_to, b"reply-" + body, pika.BasicProperties(correlation_id=props.correlation_id)
        )
        served += 1
    while len(replies) < RPC_CALLS and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    expected = {str(i): f"reply-request-{i}".encode() for i in range(RPC_CALLS)}
    check(
        served == RPC_CALLS and replies == expected,
        f"direct reply-to: {served} of {RPC_CALLS} requests served, {len(replies)} replies back",
    )
    server_conn.close()
    caller.close()
    ch.queue_delete(rpc_queue)

    purged = ch.queue_purge(queue)
    check(purged.method.message_count == 2, f"purge reports 2 (got {purged.method.message_count})")
    deleted = ch.queue_delete(queue)
    check(deleted.method.message_count == 0, f"delete reports 0 (got {deleted.method.message_count})")
    ch.close()
    conn.close()
    check(True, "no channel or connection error")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        main(sys.argv[1])
    except Exception as e:  # any AMQP error fails the run, with its reason
        print(f"pika: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print("pika: all checks passed" if FAILED == 0 else f"pika: {FAILED} check(s) failed")
    sys.exit(0 if FAILED == 0 else 1)
