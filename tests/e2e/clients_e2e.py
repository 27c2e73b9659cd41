"""GET /clients and POST /clients/ID/close with real clients: a pika connection and a Celery
(kombu/py-amqp) connection through warren.

    python tests/e2e/clients_e2e.py PROXY_ADDR ADMIN_ADDR

Checks that /clients lists both with their fields (peer, user, vhost, connection name, client
product and version, channels, links per cluster, bytes in and out, held publishes, connected
since); that closing the pika connection gives pika 320 CONNECTION_FORCED with the reason given;
that the Celery connection keeps working (a publish and a get on it afterwards) and is still
listed while the closed one is gone; and that closing an unknown id is a 404.
Exits 0 when every check holds.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import celery
import pika
import pika.exceptions

FAILED = 0


def check(ok: bool, what: str) -> None:
    global FAILED
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILED += 1


def admin(addr: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"http://{addr}{path}", method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def find(clients: list, **want) -> dict | None:
    for c in clients:
        if all(c.get(k) == v for k, v in want.items()):
            return c
    return None


def main(proxy: str, admin_addr: str) -> int:
    name = f"clients-e2e-pika-{uuid.uuid4().hex[:8]}"
    params = pika.URLParameters(f"amqp://guest:guest@{proxy}/%2F")
    params.client_properties = {"connection_name": name}
    pk = pika.BlockingConnection(params)
    pk_ch = pk.channel()

    app = celery.Celery("clients_e2e", broker=f"amqp://guest:guest@{proxy}//")
    kconn = app.connection_for_write()
    kconn.ensure_connection(max_retries=3)
    kch = kconn.default_channel
    queue = f"clients-e2e-{uuid.uuid4().hex[:8]}"
    kch.queue_declare(queue=queue, durable=False, auto_delete=False)

    time.sleep(1.5)  # sessions publish their usage on a one-second tick
    status, body = admin(admin_addr, "/clients")
    check(status == 200, f"GET /clients answers 200 ({status})")
    clients = body.get("clients", [])
    p = find(clients, connection_name=name)
    k = find(clients, client_product="py-amqp")
    check(p is not None, f"the pika connection is listed by its connection_name {name}")
    check(k is not None, "the Celery (py-amqp) connection is listed")
    if p is None or k is None:
        print(json.dumps(body, indent=1))
        return 1
    check(p["client_product"] == "Pika Python Client Library" and bool(p["client_version"]),
          f"pika's product and version ({p['client_product']} {p['client_version']})")
    check(bool(k["client_version"]), f"py-amqp's version ({k['client_version']})")
    for c, who in ((p, "pika"), (k, "celery")):
        check(c["user"] == "guest" and c["vhost"] == "/", f"{who}: user and vhost")
        check(c["peer"].startswith("127.0.0.1:"), f"{who}: peer {c['peer']}")
        check(c["channels"] >= 1, f"{who}: channels {c['channels']}")
        # pika only opened a channel: with lazy_links (the default) it has its control link
        # alone; the Celery connection declared a queue, which opened every cluster's link.
        least = 1 if who == "pika" else 2
        check(len(c["links"]) >= least and c["upstream_connections"] >= least,
              f"{who}: links per cluster {c['links']}")
        check(c["bytes_in"] > 0 and c["bytes_out"] > 0, f"{who}: bytes in {c['bytes_in']} out {c['bytes_out']}")
        check(c["held_publish_bytes"] >= 0 and c["connected_since"].endswith("Z"),
              f"{who}: held {c['held_publish_bytes']}, since {c['connected_since']}")

    # Close the pika connection with a reason: pika sees 320 with it.
    reason = "moving you to another instance"
    status, body = admin(admin_addr, f"/clients/{p['id']}/close?reason={urllib.parse.quote(reason)}", "POST")
    check(status == 200, f"POST /clients/{p['id']}/close answers 200 ({status} {body})")
    closed = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and closed is None:
        try:
            pk.process_data_events(time_limit=0.2)
        except pika.exceptions.ConnectionClosedByBroker as e:
            closed = e
        except pika.exceptions.AMQPConnectionError as e:
            closed = e
    check(isinstance(closed, pika.exceptions.ConnectionClosedByBroker)
          and closed.reply_code == 320 and reason in closed.reply_text,
          f"pika got 320 with the reason ({closed!r})")

    # The Celery connection carries on.
    with app.producer_or_acquire() as prod:
        prod.publish({"x": 1}, exchange="", routing_key=queue, serializer="json", retry=False)
    got = None
    deadline = time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        got = kch.basic_get(queue, no_ack=True)
        if got is None:
            time.sleep(0.1)
    check(got is not None, "the Celery connection still publishes and gets")
    time.sleep(1.2)
    status, body = admin(admin_addr, "/clients")
    clients = body.get("clients", [])
    check(find(clients, connection_name=name) is None, "the closed connection is no longer listed")
    check(find(clients, id=k["id"]) is not None, "the Celery connection is still listed")
    status, _ = admin(admin_addr, "/clients/999999999/close", "POST")
    check(status == 404, f"closing an unknown id is 404 ({status})")

    kch.queue_delete(queue)
    kconn.release()
    print("clients e2e:", "all checks pass" if FAILED == 0 else f"{FAILED} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
