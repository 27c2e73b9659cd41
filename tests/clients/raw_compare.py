"""Malformed and unusual AMQP 0-9-1 input, written byte for byte on raw sockets to RabbitMQ and
to warren, and compared answer by answer.

    python tests/clients/raw_compare.py DIRECT_ADDR PROXY_ADDR [-v] [--warren-log FILE] [NAME...]

e.g. `python tests/clients/raw_compare.py 127.0.0.1:5701 127.0.0.1:5674`. DIRECT_ADDR is one
RabbitMQ node, PROXY_ADDR a warren in front of clusters of the same RabbitMQ version (guest/guest,
vhost "/" on both). With scenario NAMEs, only those run; -v prints every scenario's
observations, not only those of the ones that differ.

Each scenario opens sockets of its own, writes exactly the bytes it is about (a wrong protocol
header, a frame with a bad end octet, a publish whose body overruns its header, ...), and records
what the server sends back until the socket closes or a deadline passes: one observation per
frame, `ch<N> <class.method>` with the reply code of channel.close and connection.close, then
`closed` or `timeout` (every read is bounded; "timeout" is an observation like any other).
The client answers the way a client library would: close-ok to a connection.close or
channel.close from the server, and nothing else unless the scenario says so. Reply texts, the
failing class/method of a close and timings are shown in the diff but not compared.

RabbitMQ's answer is the expected one by construction. A scenario passes when warren's
observations equal RabbitMQ's, or equal the exact outcome docs/semantics.md documents for a known
difference (printed as "documented"). After every scenario a fresh connection must still open a
channel, so a wedged or crashed endpoint fails the scenario that broke it. Two scenarios also
check resources of the proxy only: `never_reading_consumer` watches the RSS of the process
listening on PROXY_ADDR's port (found with `ss`), `half_frame_stall` that other clients are
served while one client stalls mid-frame.

A scenario is a function taking a Target and listed in SCENARIOS; its docstring says what it
sends. A known difference is declared with `fn.documented = (row of docs/semantics.md, warren's
exact observations)`.

With --warren-log FILE (warren's log), the lines warren logged for a failing scenario's own
connections are printed under it.
Exits 0 when every scenario observes the same (or the documented) both ways, 1 otherwise.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
import traceback
import uuid

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE

METHOD_NAMES = {
    (10, 10): "connection.start", (10, 11): "connection.start-ok",
    (10, 20): "connection.secure", (10, 21): "connection.secure-ok",
    (10, 30): "connection.tune", (10, 31): "connection.tune-ok",
    (10, 40): "connection.open", (10, 41): "connection.open-ok",
    (10, 50): "connection.close", (10, 51): "connection.close-ok",
    (10, 60): "connection.blocked", (10, 61): "connection.unblocked",
    (10, 70): "connection.update-secret", (10, 71): "connection.update-secret-ok",
    (20, 10): "channel.open", (20, 11): "channel.open-ok",
    (20, 20): "channel.flow", (20, 21): "channel.flow-ok",
    (20, 40): "channel.close", (20, 41): "channel.close-ok",
    (40, 10): "exchange.declare", (40, 11): "exchange.declare-ok",
    (40, 20): "exchange.delete", (40, 21): "exchange.delete-ok",
    (40, 30): "exchange.bind", (40, 31): "exchange.bind-ok",
    (40, 40): "exchange.unbind", (40, 51): "exchange.unbind-ok",
    (50, 10): "queue.declare", (50, 11): "queue.declare-ok",
    (50, 20): "queue.bind", (50, 21): "queue.bind-ok",
    (50, 30): "queue.purge", (50, 31): "queue.purge-ok",
    (50, 40): "queue.delete", (50, 41): "queue.delete-ok",
    (50, 50): "queue.unbind", (50, 51): "queue.unbind-ok",
    (60, 10): "basic.qos", (60, 11): "basic.qos-ok",
    (60, 20): "basic.consume", (60, 21): "basic.consume-ok",
    (60, 30): "basic.cancel", (60, 31): "basic.cancel-ok",
    (60, 40): "basic.publish", (60, 50): "basic.return", (60, 60): "basic.deliver",
    (60, 70): "basic.get", (60, 71): "basic.get-ok", (60, 72): "basic.get-empty",
    (60, 80): "basic.ack", (60, 90): "basic.reject", (60, 100): "basic.recover-async",
    (60, 110): "basic.recover", (60, 111): "basic.recover-ok", (60, 120): "basic.nack",
    (85, 10): "confirm.select", (85, 11): "confirm.select-ok",
    (90, 10): "tx.select", (90, 11): "tx.select-ok", (90, 20): "tx.commit",
    (90, 21): "tx.commit-ok", (90, 30): "tx.rollback", (90, 31): "tx.rollback-ok",
}
M = {name: cm for cm, name in METHOD_NAMES.items()}

# Observation windows (seconds). RabbitMQ waits 3 s before it drops a client that erred during
# the handshake, hence the longer window there.
WINDOW = 4.0
HANDSHAKE_WINDOW = 6.0


# -- encoding ------------------------------------------------------------------------------------

def shortstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("B", len(b)) + b


def longstr(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def table(entries: dict[str, bytes] | None = None) -> bytes:
    """A field table from already-encoded values (type tag included)."""
    body = b"".join(shortstr(k) + v for k, v in (entries or {}).items())
    return struct.pack(">I", len(body)) + body


def tstr(s: str) -> bytes:
    return b"S" + longstr(s)


def tbool(v: bool) -> bytes:
    return b"t" + (b"\x01" if v else b"\x00")


def frame(kind: int, channel: int, payload: bytes, end: int = FRAME_END) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes([end])


def method(channel: int, name: str, args: bytes = b"", end: int = FRAME_END) -> bytes:
    return frame(FRAME_METHOD, channel, struct.pack(">HH", *M[name]) + args, end)


def raw_method(channel: int, class_id: int, method_id: int, args: bytes = b"") -> bytes:
    return frame(FRAME_METHOD, channel, struct.pack(">HH", class_id, method_id) + args)


def header(channel: int, body_size: int, class_id: int = 60, flags: int = 0,
           props: bytes = b"") -> bytes:
    return frame(FRAME_HEADER, channel, struct.pack(">HHQH", class_id, 0, body_size, flags) + props)


def body(channel: int, data: bytes) -> bytes:
    return frame(FRAME_BODY, channel, data)


def publish(channel: int, routing_key: str = "rawcmp-nowhere", exchange: bytes | str = b"",
            flags: int = 0) -> bytes:
    return method(channel, "basic.publish", struct.pack(">H", 0) + shortstr(exchange)
                  + shortstr(routing_key) + bytes([flags]))


def start_ok(mechanism: str = "PLAIN", response: bytes = b"\0guest\0guest",
             properties: bytes | None = None) -> bytes:
    if properties is None:
        properties = table({
            "product": tstr("warren-raw-compare"),
            "capabilities": b"F" + table({"authentication_failure_close": tbool(True)}),
        })
    return method(0, "connection.start-ok",
                  properties + shortstr(mechanism) + longstr(response) + shortstr("en_US"))


def tune_ok(channel_max: int, frame_max: int, heartbeat: int = 0) -> bytes:
    return method(0, "connection.tune-ok", struct.pack(">HIH", channel_max, frame_max, heartbeat))


def conn_open(vhost: str = "/") -> bytes:
    return method(0, "connection.open", shortstr(vhost) + shortstr("") + b"\x00")


def conn_close(code: int = 200, text: str = "bye", class_id: int = 0, method_id: int = 0) -> bytes:
    return method(0, "connection.close",
                  struct.pack(">H", code) + shortstr(text)
                  + struct.pack(">HH", class_id, method_id))


def chan_open(channel: int) -> bytes:
    return method(channel, "channel.open", shortstr(""))


def chan_close(channel: int) -> bytes:
    return method(channel, "channel.close", struct.pack(">H", 200) + shortstr("bye")
                  + struct.pack(">HH", 0, 0))


def qos(channel: int, prefetch: int = 1) -> bytes:
    """basic.qos: valid on any open channel and answered with qos-ok; the scenarios' probe."""
    return method(channel, "basic.qos", struct.pack(">IHB", 0, prefetch, 0))


def queue_declare(channel: int, name: str | bytes, *, passive=False, durable=False, exclusive=False,
                  auto_delete=False, nowait=False, arguments: bytes | None = None) -> bytes:
    bits = passive | durable << 1 | exclusive << 2 | auto_delete << 3 | nowait << 4
    return method(channel, "queue.declare", struct.pack(">H", 0) + shortstr(name) + bytes([bits])
                  + (table() if arguments is None else arguments))


def queue_delete(channel: int, name: str) -> bytes:
    return method(channel, "queue.delete", struct.pack(">H", 0) + shortstr(name) + b"\x00")


def uid(prefix: str) -> str:
    return f"rawcmp-{prefix}-{uuid.uuid4().hex[:10]}"


# -- one raw connection --------------------------------------------------------------------------

class Peer:
    """A socket and what its server sent back. Observations go to the target's list as
    (key, detail): the key is compared, the detail only shown."""

    def __init__(self, target: "Target", label: str = "", rcvbuf: int | None = None):
        self.t = target
        self.label = f"{label}: " if label else ""
        self.buf = b""
        self.server_tune = (0, 0, 0)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(target.hostport)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target.local_ports.add(self.sock.getsockname()[1])
        self.last_event = time.monotonic()
        target.peers.append(self)

    def note(self, key: str, detail: str = "") -> None:
        self.t.obs.append((self.label + key, detail))
        self.last_event = time.monotonic()

    def send(self, data: bytes) -> bool:
        """Writes everything; a refused write (the server already hung up) is only a detail,
        since whether it happens depends on timing."""
        try:
            self.sock.settimeout(10)
            self.sock.sendall(data)
            return True
        except OSError as e:
            self.t.details.append(f"{self.label}write failed: {type(e).__name__}")
            return False

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _fill(self, deadline: float) -> str | None:
        """Reads once. None on data; 'closed', 'reset' or 'timeout' otherwise."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return "timeout"
        except ConnectionResetError:
            return "reset"
        except OSError as e:
            return f"error {type(e).__name__}"
        if not chunk:
            return "closed"
        self.buf += chunk
        return None

    def next_frame(self, deadline: float):
        """('frame', kind, channel, payload), ('header', bytes) for a protocol header, ('junk',
        bytes), or ('end', why)."""
        while True:
            if self.buf.startswith(b"AMQP") and len(self.buf) >= 8:
                h, self.buf = self.buf[:8], self.buf[8:]
                return ("header", h)
            if len(self.buf) >= 7 and not self.buf.startswith(b"AMQP"):
                kind, channel, size = struct.unpack(">BHI", self.buf[:7])
                if kind not in (1, 2, 3, 8) or size > 16 * 1024 * 1024:
                    junk, self.buf = self.buf, b""
                    return ("junk", junk)
                if len(self.buf) >= 8 + size:
                    payload, end = self.buf[7:7 + size], self.buf[7 + size]
                    self.buf = self.buf[8 + size:]
                    if end != FRAME_END:
                        return ("junk", b"bad frame end")
                    return ("frame", kind, channel, payload)
            why = self._fill(deadline)
            if why is not None:
                if self.buf:
                    self.note("partial frame from server", repr(self.buf[:40]))
                    self.buf = b""
                return ("end", why)

    def observe(self, timeout: float = WINDOW, until: tuple[str, ...] = (), *,
                heartbeats: bool = False, by_name: bool = False, answer_tune: bool = False,
                quiet: tuple[str, ...] = (), count: int = 1) -> str:
        """Records what arrives until the socket closes, `timeout` passes, or a method named in
        `until` arrives. Answers close with close-ok; with answer_tune, answers connection.tune
        with tune-ok and connection.open as a client would. by_name drops the channel numbers
        (floods); with count, the `until` methods must arrive that many times. Methods named in
        `quiet` are not recorded. Returns the name that stopped it, or 'closed' / 'timeout'."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            f = self.next_frame(deadline)
            if f[0] == "end":
                why = f[1]
                if why == "timeout":
                    self.note("timeout")
                    return "timeout"
                self.note("closed", f"{why}, {time.monotonic() - self.last_event:.1f}s after the "
                                    "previous observation")
                return "closed"
            if f[0] == "header":
                self.note(f"protocol header {f[1][4:].hex(' ')}")
                continue
            if f[0] == "junk":
                self.note("unparsable bytes from server", repr(f[1][:40]))
                continue
            _, kind, channel, payload = f
            if kind == FRAME_HEARTBEAT:
                if heartbeats:
                    self.note(f"ch{channel} heartbeat")
                continue
            where = "" if by_name else f"ch{channel} "
            if kind == FRAME_HEADER:
                self.note(f"{where}content header")
                continue
            if kind == FRAME_BODY:
                self.note(f"{where}content body")
                continue
            cm = struct.unpack(">HH", payload[:4])
            name = METHOD_NAMES.get(cm, f"method {cm[0]}.{cm[1]}")
            args = payload[4:]
            if name in ("connection.close", "channel.close"):
                code = struct.unpack(">H", args[:2])[0]
                n = args[2]
                text = args[3:3 + n].decode(errors="replace")
                failing = struct.unpack(">HH", args[3 + n:7 + n])
                self.note(f"{where}{name} {code}",
                          f"{text!r} (failing {METHOD_NAMES.get(failing, failing)})")
                if name == "connection.close":
                    self.send(method(0, "connection.close-ok"))
                else:
                    self.send(method(channel, "channel.close-ok"))
            elif name not in quiet:
                self.note(f"{where}{name}")
            if name == "connection.tune":
                self.server_tune = struct.unpack(">HIH", args[:8])
                if answer_tune:
                    ch_max, f_max, _ = self.server_tune
                    self.send(tune_ok(ch_max, f_max) + conn_open())
            if name in until:
                seen += 1
                if seen >= count:
                    return name
            if name == "connection.close-ok":
                # The client asked to close and has its answer: closing the socket is up to it.
                return name

    def expect(self, name: str, timeout: float = WINDOW) -> bool:
        """Waits for `name`, recording anything else (and it) only when it is not `name`."""
        mark = len(self.t.obs)
        got = self.observe(timeout, until=(name,))
        if got == name:
            del self.t.obs[mark:]
            return True
        return False

    def handshake(self, frame_max: int | None = 4096, channel_max: int | None = None,
                  heartbeat: int = 0, open_: bool = True) -> bool:
        """Header, start-ok, tune-ok (frame_max None: the server's) and, with open_,
        connection.open. Silent when every step gets its expected answer."""
        self.send(PROTOCOL_HEADER)
        if not self.expect("connection.start"):
            return False
        self.send(start_ok())
        mark = len(self.t.obs)
        if self.observe(WINDOW, until=("connection.tune",)) != "connection.tune":
            return False
        del self.t.obs[mark:]
        ch_max, f_max, _ = self.server_tune
        self.send(tune_ok(channel_max if channel_max is not None else ch_max,
                          frame_max if frame_max is not None else f_max, heartbeat))
        if not open_:
            return True
        self.send(conn_open())
        return self.expect("connection.open-ok")

    def open_channel(self, channel: int) -> bool:
        self.send(chan_open(channel))
        return self.expect("channel.open-ok")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def reset(self) -> None:
        """Closes with a TCP RST."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()


class Target:
    def __init__(self, addr: str, is_proxy: bool):
        host, port = addr.rsplit(":", 1)
        self.hostport = (host, int(port))
        self.is_proxy = is_proxy
        self.obs: list[tuple[str, str]] = []
        self.details: list[str] = []   # shown on failure, never compared
        self.problems: list[str] = []  # resource checks that failed: fail the scenario
        self.peers: list[Peer] = []
        self.local_ports: set[int] = set()  # to find this scenario's lines in warren's log

    def peer(self, label: str = "", **kw) -> Peer:
        return Peer(self, label, **kw)

    def opened(self, frame_max: int | None = 4096, channel: int | None = 1, label: str = "",
               **kw) -> Peer:
        """A connection past connection.open-ok with `channel` open; a failure on the way is
        recorded (and then compared like any observation)."""
        p = self.peer(label, **kw)
        if not p.handshake(frame_max=frame_max):
            p.note("handshake failed")
        elif channel is not None and not p.open_channel(channel):
            p.note(f"channel.open {channel} failed")
        return p

    def close_all(self) -> None:
        for p in self.peers:
            p.close()
        self.peers.clear()


# -- scenario helpers ----------------------------------------------------------------------------

def abuse(t: Target, data: bytes, *, probe: bool = True, frame_max: int | None = 4096,
          timeout: float = WINDOW, channels: tuple[int, ...] = (1,)) -> Peer:
    """Opens a connection and `channels`, writes `data`, then (with probe) a basic.qos on channel
    1, and records the answers up to the qos-ok or the end of the connection. When the connection
    survived, it is closed politely and that is recorded too."""
    p = t.opened(frame_max=frame_max, channel=None)
    for ch in channels:
        p.open_channel(ch)
    p.send(data)
    if probe:
        p.send(qos(1))
    got = p.observe(timeout, until=("basic.qos-ok",))
    if got == "basic.qos-ok":
        p.send(conn_close())
        p.observe(timeout)
    return p


def handshake_abuse(t: Target, steps: list[bytes], timeout: float = HANDSHAKE_WINDOW) -> Peer:
    """Writes the protocol header, `steps` once connection.start is in, then records everything
    until the end (answering a tune with tune-ok + open as a client would)."""
    p = t.peer()
    p.send(PROTOCOL_HEADER)
    p.expect("connection.start")
    for data in steps:
        p.send(data)
    got = p.observe(timeout, until=("connection.open-ok",), answer_tune=True)
    if got == "connection.open-ok":
        p.send(conn_close())
        p.observe(timeout)
    return p


def header_only(t: Target, data: bytes, *, then_close_write: bool = False,
                timeout: float = HANDSHAKE_WINDOW) -> None:
    p = t.peer()
    p.send(data)
    if then_close_write:
        p.shutdown_write()
    p.observe(timeout)


def nested_tables(levels: int) -> bytes:
    """{"a": {"a": ... {} ...}} `levels` deep, as a field value."""
    value = b"F" + table()
    for _ in range(levels):
        inner = shortstr("a") + value
        value = b"F" + struct.pack(">I", len(inner)) + inner
    return value


# -- scenarios: protocol header ------------------------------------------------------------------

def header_amqp_0_9_0(t):
    """AMQP 0-9 (0-9-0 as a 0-9-1 style header). Servers answer with the header they speak."""
    header_only(t, b"AMQP\x00\x00\x09\x00")


def header_amqp_0_8(t):
    """The AMQP 0-8 header ('AMQP' 1 1 8 0)."""
    header_only(t, b"AMQP\x01\x01\x08\x00")


header_amqp_0_8.documented = (
    'AMQP 0-8 protocol header',
    ['protocol header 00 00 09 01', 'closed'])


def header_amqp_0_9_spec(t):
    """The AMQP 0-9 spec's header ('AMQP' 1 1 0 9), which RabbitMQ serves as 0-9-1."""
    header_only(t, b"AMQP\x01\x01\x00\x09")


def header_garbage(t):
    """An HTTP request on the AMQP port."""
    header_only(t, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def header_short_then_close(t):
    """Four bytes of the header, then the client half-closes its side."""
    header_only(t, b"AMQP", then_close_write=True)


# -- scenarios: handshake ------------------------------------------------------------------------

def start_ok_unknown_mechanism(t):
    """A mechanism the server did not offer. AMQP 0-9-1 (connection.start-ok, rule "validity"):
    the server MUST close the connection without sending any further data."""
    handshake_abuse(t, [start_ok(mechanism="FOO-BAR")])


start_ok_unknown_mechanism.documented = (
    'An error before connection.open',
    ['ch0 connection.close 503', 'closed'])


def start_ok_empty_response(t):
    """PLAIN with an empty response."""
    handshake_abuse(t, [start_ok(response=b"")])


start_ok_empty_response.documented = (
    'An error before connection.open',
    ['ch0 connection.close 403', 'closed'])


def start_ok_response_without_nul(t):
    """PLAIN with a response that has no NUL separators."""
    handshake_abuse(t, [start_ok(response=b"guestguest")])


start_ok_response_without_nul.documented = (
    'An error before connection.open',
    ['ch0 connection.close 403', 'closed'])


def start_ok_unknown_field_type(t):
    """client-properties holding a value of type 'Z', which AMQP 0-9-1 does not define."""
    handshake_abuse(t, [start_ok(properties=table({"product": b"Z\x00\x00\x00\x00"}))])


start_ok_unknown_field_type.documented = (
    'An error before connection.open',
    ['ch0 connection.close 501', 'closed'])


def start_ok_twice(t):
    """A second connection.start-ok in place of tune-ok."""
    p = t.peer()
    p.send(PROTOCOL_HEADER)
    p.expect("connection.start")
    p.send(start_ok())
    p.observe(HANDSHAKE_WINDOW, until=("connection.tune",))
    p.send(start_ok())
    p.observe(HANDSHAKE_WINDOW)


start_ok_twice.documented = (
    'An error before connection.open',
    ['ch0 connection.tune', 'ch0 connection.close 503', 'closed'])


def open_before_tune_ok(t):
    """connection.open answering connection.tune, tune-ok never sent."""
    p = t.peer()
    p.send(PROTOCOL_HEADER)
    p.expect("connection.start")
    p.send(start_ok())
    p.observe(HANDSHAKE_WINDOW, until=("connection.tune",))
    p.send(conn_open())
    p.observe(HANDSHAKE_WINDOW)


open_before_tune_ok.documented = (
    'An error before connection.open',
    ['ch0 connection.tune', 'ch0 connection.close 503', 'closed'])


def start_ok_plain_authzid(t):
    """PLAIN with an authorization identity ('act as bob'): RabbitMQ reads only
    NUL user NUL password, and refuses the login."""
    handshake_abuse(t, [start_ok(response=b"bob\0guest\0guest")])


start_ok_plain_authzid.documented = (
    'An error before connection.open',
    ['ch0 connection.close 403', 'closed'])


def amqplain_entries(*entries: tuple[str, bytes]) -> bytes:
    """An AMQPLAIN response: table entries without the table's length (duplicates kept)."""
    return b"".join(shortstr(k) + v for k, v in entries)


def start_ok_amqplain_first_login_counts(t):
    """AMQPLAIN with LOGIN twice (an unknown user, then guest): the first counts, so the login
    is refused."""
    handshake_abuse(t, [start_ok(mechanism="AMQPLAIN", response=amqplain_entries(
        ("LOGIN", tstr("nobody-such")), ("LOGIN", tstr("guest")), ("PASSWORD", tstr("guest"))))])


start_ok_amqplain_first_login_counts.documented = (
    'Wrong password',
    ['ch0 connection.tune', 'ch0 connection.close 403', 'closed'])


def start_ok_amqplain_odd_entries(t):
    """AMQPLAIN with an integer entry besides LOGIN and PASSWORD, and LOGIN as a byte array:
    the login goes through."""
    handshake_abuse(t, [start_ok(mechanism="AMQPLAIN", response=amqplain_entries(
        ("EXTRA", b"I" + struct.pack(">i", 7)), ("LOGIN", b"x" + longstr("guest")),
        ("PASSWORD", tstr("guest"))))])


def connection_close_after_tune_ok(t):
    """A client that gives up after tune-ok and sends connection.close instead of open: once
    tuned, RabbitMQ answers 504 (unexpected method in connection state opening)."""
    p = t.peer()
    p.handshake(frame_max=None, open_=False)
    p.send(conn_close())
    p.observe(HANDSHAKE_WINDOW)


def channel_open_before_connection_open(t):
    """tune-ok, then channel.open 1 before connection.open."""
    p = t.peer()
    p.handshake(frame_max=None, open_=False)
    p.send(chan_open(1))
    p.observe(HANDSHAKE_WINDOW)


def tune_ok_frame_max_below_4096(t):
    """tune-ok with frame_max 1024, below the protocol minimum of 4096."""
    p = t.peer()
    p.handshake(frame_max=1024, open_=False)
    p.send(conn_open())
    p.observe(HANDSHAKE_WINDOW)


tune_ok_frame_max_below_4096.documented = (
    'An error before connection.open',
    ['ch0 connection.close 530', 'closed'])


def tune_ok_frame_max_above_server(t):
    """tune-ok with frame_max one above what the server proposed."""
    p = t.peer()
    p.handshake(frame_max=None, open_=False)  # learns the server's frame_max
    q = t.peer()
    q.handshake(frame_max=p.server_tune[1] + 1, open_=False)
    q.send(conn_open())
    q.observe(HANDSHAKE_WINDOW)


tune_ok_frame_max_above_server.documented = (
    "tune-ok with frame_max or channel_max 0 (\"no limit\", above the server's)",
    ["ch0 connection.close 530", "closed"])


def tune_ok_heartbeat_1_silent_client(t):
    """heartbeat 1 s negotiated, then the client never writes again: both sides send heartbeats
    and drop the client after missing its own."""
    p = t.peer()
    p.handshake(frame_max=None, heartbeat=1)
    p.observe(8.0, heartbeats=True)


def tune_ok_heartbeat_65535(t):
    """A heartbeat above the one proposed: the client's value is taken, the connection works."""
    p = t.peer()
    p.handshake(frame_max=None, heartbeat=65535)
    p.open_channel(1)
    p.send(qos(1))
    p.observe(until=("basic.qos-ok",))
    p.send(conn_close())
    p.observe()


def bad_frame_end_in_handshake(t):
    """connection.start-ok whose frame-end octet is 0x00."""
    p = t.peer()
    p.send(PROTOCOL_HEADER)
    p.expect("connection.start")
    s = bytearray(start_ok())
    s[-1] = 0
    p.send(bytes(s))
    p.observe(HANDSHAKE_WINDOW, answer_tune=True)


bad_frame_end_in_handshake.documented = (
    'An error before connection.open',
    ['ch0 connection.close 501', 'closed'])


def start_ok_after_open(t):
    """connection.start-ok again on an open connection."""
    abuse(t, start_ok(), probe=False)


def connection_close_odd_code_then_send(t):
    """connection.close with reply code 0 and a 255-byte text, then more methods and a publish."""
    p = t.opened()
    p.send(conn_close(code=0, text="x" * 255, class_id=999, method_id=999))
    p.send(chan_open(2) + qos(1) + publish(1) + header(1, 3) + body(1, b"abc"))
    p.observe()


def connection_close_ok_unsolicited(t):
    """connection.close-ok although nobody asked to close."""
    abuse(t, method(0, "connection.close-ok"))


# -- scenarios: frames ---------------------------------------------------------------------------

def frame_above_frame_max(t):
    """A method frame of 5000 bytes after negotiating frame_max 4096."""
    args = table({"x-pad": tstr("p" * 4900)})
    abuse(t, queue_declare(1, uid("big"), exclusive=True, arguments=args), probe=False)


def frame_size_4gb_declared(t):
    """A frame header announcing 4 GiB - 1 of payload, then 100 bytes and silence: no server may
    wait for (or reserve) the rest."""
    abuse(t, struct.pack(">BHI", FRAME_BODY, 1, 0xFFFFFFFF) + b"x" * 100, probe=False)


def frame_type_9(t):
    """A frame of type 9, which AMQP 0-9-1 does not define."""
    abuse(t, frame(9, 1, b""))


def heartbeat_on_channel_2(t):
    """A heartbeat on channel 2 (open). AMQP 0-9-1 4.2.7: heartbeats are on channel 0, and an
    invalid heartbeat frame MUST be answered with 501."""
    abuse(t, frame(FRAME_HEARTBEAT, 2, b""), channels=(1, 2))


heartbeat_on_channel_2.documented = (
    'Heartbeat frame on a channel other than 0',
    ['ch0 connection.close 501', 'closed'])


def heartbeat_with_payload(t):
    """A heartbeat frame on channel 0 that carries 4 bytes."""
    abuse(t, frame(FRAME_HEARTBEAT, 0, b"\x00\x00\x00\x00"))


def protocol_header_after_open(t):
    """The 8 protocol header bytes again on an open connection."""
    abuse(t, PROTOCOL_HEADER, probe=False)


# -- scenarios: methods --------------------------------------------------------------------------

def unknown_class(t):
    """A method of class 99, which does not exist."""
    abuse(t, raw_method(1, 99, 10))


def unknown_connection_method(t):
    """Method 99 of class connection, on channel 0."""
    abuse(t, raw_method(0, 10, 99))


unknown_connection_method.documented = (
    "Unknown method id", ["ch0 connection.close 503", "closed"])
unknown_class.documented = unknown_connection_method.documented


def empty_method_frame(t):
    """A method frame of 0 bytes: not even a class id."""
    abuse(t, frame(FRAME_METHOD, 1, b""))


def publish_shortstr_overruns_frame(t):
    """basic.publish whose exchange shortstr announces 200 bytes in a frame of 6."""
    abuse(t, frame(FRAME_METHOD, 1, struct.pack(">HHH", 60, 40, 0) + b"\xc8ab"))


def table_unknown_type_tag(t):
    """exchange.declare whose arguments hold a value tagged '?'."""
    args = struct.pack(">H", 0) + shortstr(uid("x")) + shortstr("direct") + b"\x08" \
        + table({"x": b"?\x00"})
    abuse(t, method(1, "exchange.declare", args))


table_unknown_type_tag.documented = (
    'Field value of unknown type',
    ['ch0 connection.close 501', 'closed'])


def headers_unknown_type_tag(t):
    """basic.publish whose message `headers` hold a value tagged 'U' (passed on by a proxy that
    does not read them, a broker fails the whole connection)."""
    props = table({"x": b"U\x00\x00"})
    abuse(t, publish(1) + header(1, 1, flags=1 << 13, props=props) + body(1, b"x"))


headers_unknown_type_tag.documented = (
    'Field value of unknown type',
    ['ch0 connection.close 501', 'closed'])


def table_nested_10k(t):
    """queue.declare whose arguments nest 10,000 tables (70 KB, below frame_max 131072)."""
    args = table({"x-nest": nested_tables(10_000)})
    q = uid("nest")
    abuse(t, queue_declare(1, q, exclusive=True, arguments=args), frame_max=None)


table_nested_10k.documented = (
    'Field tables nested more than 64 deep',
    ['ch0 connection.close 501', 'closed'])


def table_longstr_4gb(t):
    """A long string announcing 4 GiB - 1 bytes inside a 60-byte frame."""
    bad = struct.pack(">I", 12) + shortstr("x") + b"S" + struct.pack(">I", 0xFFFFFFFF) + b"abc"
    abuse(t, queue_declare(1, uid("ls"), exclusive=True, arguments=bad))


def publish_exchange_256_wrapped(t):
    """A 256-byte exchange name cannot be a shortstr: its length octet wraps to 0 and the name's
    bytes are read as the routing key and flags that follow."""
    payload = struct.pack(">HHH", 60, 40, 0) + b"\x00" + b"e" * 256 + shortstr("rk") + b"\x00"
    abuse(t, frame(FRAME_METHOD, 1, payload) + header(1, 1) + body(1, b"x"))


def publish_exchange_invalid_utf8(t):
    """An exchange name that is not UTF-8 (0xff 0xfe)."""
    abuse(t, publish(1, exchange=b"\xff\xfe-x") + header(1, 1) + body(1, b"x"))


def queue_declare_invalid_utf8(t):
    """queue.declare (exclusive) of a name that is not UTF-8."""
    name = b"rawcmp-\xff\xfe-" + uuid.uuid4().hex[:6].encode()
    abuse(t, queue_declare(1, name, exclusive=True))


# -- scenarios: content --------------------------------------------------------------------------

def body_without_header(t):
    """basic.publish followed directly by a body frame."""
    abuse(t, publish(1) + body(1, b"hello"))


def header_on_other_channel(t):
    """basic.publish on channel 1, its content header on channel 2 (open)."""
    abuse(t, publish(1) + header(2, 5) + body(2, b"hello"), channels=(1, 2))


def method_between_publish_and_header(t):
    """A new method where the publish's content header should be."""
    abuse(t, publish(1) + qos(1, 5))


def body_size_0_then_body_frame(t):
    """A content header announcing 0 bytes (the message is complete), then a body frame."""
    abuse(t, publish(1) + header(1, 0) + body(1, b"hello"))


def body_frame_longer_than_declared(t):
    """A content header announcing 5 bytes, then a 10-byte body frame (the message overruns
    its declared size)."""
    abuse(t, publish(1) + header(1, 5) + body(1, b"0123456789"))


def oversized_body_abandoned(t):
    """A content header announcing 200 MiB (above the 128 MiB max_message_size of both), 1000
    bytes of body, then nothing more: the client stops sending the body. RabbitMQ waits for the
    rest before it checks the size; a server that refuses at the header sends channel.close, and
    the client's close-ok (a method frame in the middle of the content) follows."""
    abuse(t, publish(1) + header(1, 200 * 1024 * 1024) + body(1, b"x" * 1000), probe=False)


oversized_body_abandoned.documented = (
    'A message above max_message_size',
    ['ch1 channel.close 406', 'timeout'])


# -- scenarios: channels -------------------------------------------------------------------------

def channel_reopen_before_close_ok(t):
    """channel.open 2, channel.close 2 and channel.open 2 again, pipelined: the second open comes
    before the close-ok (a channel error), and the first one's open-ok is due before it."""
    p = t.opened(frame_max=None, channel=None)
    p.send(chan_open(2) + chan_close(2) + chan_open(2))
    p.observe()


channel_reopen_before_close_ok.documented = (
    "A connection error behind requests still unanswered",
    ["ch0 connection.close 504", "closed"])


def refused_request_then_channel_close(t):
    """A passive queue.declare of a missing queue, then channel.close, in one write: the server
    closes the channel with 404 (the client answers close-ok), then answers the client's close
    with close-ok; channel 1 opens again after."""
    p = t.opened(frame_max=None)
    p.send(queue_declare(1, uid("missing"), passive=True) + chan_close(1))
    p.observe(1.0)
    p.send(chan_open(1))
    p.observe(until=("channel.open-ok",))


def channel_close_ok_not_closing(t):
    """channel.close-ok for open channel 1, which nobody is closing."""
    abuse(t, method(1, "channel.close-ok"))


def channel_open_on_channel_0(t):
    """channel.open on channel 0, which carries only connection methods."""
    abuse(t, chan_open(0))


def channel_65535(t):
    """channel.open on 65535, above the channel_max both propose (2047)."""
    p = t.opened(frame_max=None, channel=None)
    p.send(chan_open(65535) + qos(65535))
    if p.observe(until=("basic.qos-ok",)) == "basic.qos-ok":
        p.send(conn_close())
        p.observe()


channel_65535.documented = ("Channel number above channel_max",
                            ["ch0 connection.close 530", "closed"])


# -- scenarios: load -----------------------------------------------------------------------------

def bystander_round_trip(t: Target, label: str) -> None:
    """A well-behaved client declares a queue, publishes, gets the message back, deletes it."""
    p = t.opened(label=label, frame_max=None)
    q = uid("bystander")
    p.send(queue_declare(1, q, auto_delete=False))
    ok = p.expect("queue.declare-ok")
    p.send(publish(1, q) + header(1, 5) + body(1, b"hello")
           + method(1, "basic.get", struct.pack(">H", 0) + shortstr(q) + b"\x01"))
    ok = ok and p.expect("basic.get-ok")
    p.send(queue_delete(1, q))
    ok = p.expect("queue.delete-ok") and ok
    p.note(f"round trip {'ok' if ok else 'failed'}")
    p.send(conn_close())
    p.observe()


def half_frame_stall(t):
    """A client writes half a method frame and stalls; meanwhile another client is served; then
    the stalled client completes its frame and gets the answer."""
    p = t.opened(label="staller")
    q = qos(1)
    p.send(q[:9])
    time.sleep(0.5)
    bystander_round_trip(t, "bystander")
    p.observe(2.0)
    p.send(q[9:])
    if p.observe(until=("basic.qos-ok",)) == "basic.qos-ok":
        p.send(conn_close())
        p.observe()


def listener_pid(port: int) -> int | None:
    """The pid listening on `port` (None without iproute2's `ss`: the RSS check is skipped)."""
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"],
                             capture_output=True, text=True).stdout
    except FileNotFoundError:
        return None
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)],
                         capture_output=True, text=True).stdout
    return int(out.strip() or 0) / 1024


NEVER_READ_TOTAL = 160 * 1024 * 1024
NEVER_READ_MSG = 64 * 1024
NEVER_READ_GROWTH_LIMIT_MB = 120


def never_reading_consumer(t):
    """A no-ack consumer that never reads while 160 MB of messages are published to its queue.
    On the proxy, the RSS of the listening process must not grow with them (the limit is
    NEVER_READ_GROWTH_LIMIT_MB); both sides must keep serving other clients. The queue is
    deleted afterwards."""
    pid = listener_pid(t.hostport[1]) if t.is_proxy else None
    base = rss_mb(pid)
    q = uid("neverread")
    pub = t.opened(label="publisher", frame_max=None)
    pub.send(queue_declare(1, q))
    pub.expect("queue.declare-ok")
    sleeper = t.opened(label="consumer", frame_max=None, rcvbuf=32 * 1024)
    sleeper.send(method(1, "basic.consume", struct.pack(">H", 0) + shortstr(q) + shortstr("sleepy")
                        + b"\x02" + table()))  # no-ack
    sleeper.expect("basic.consume-ok")
    pub.send(method(1, "confirm.select", b"\x00"))
    pub.expect("confirm.select-ok")
    n = NEVER_READ_TOTAL // NEVER_READ_MSG
    frame_max = pub.server_tune[1]
    payload = b"m" * NEVER_READ_MSG
    one = publish(1, q) + header(1, len(payload)) + b"".join(
        body(1, payload[i:i + frame_max - 8]) for i in range(0, len(payload), frame_max - 8))
    peak = base
    acked = 0
    batch = 100
    for start in range(0, n, batch):
        pub.send(one * min(batch, n - start))
        # Confirms may come one by one or as multiple acks: wait for the batch's last tag.
        want = min(start + batch, n)
        end = time.monotonic() + 30
        while acked < want and time.monotonic() < end:
            f = pub.next_frame(end)
            if f[0] == "end":
                pub.note(f"publisher ended: {f[1]}")
                break
            if f[0] == "frame" and f[1] == FRAME_METHOD:
                cm = struct.unpack(">HH", f[3][:4])
                if cm == M["basic.ack"]:
                    acked = max(acked, struct.unpack(">Q", f[3][4:12])[0])
                else:
                    pub.note(f"publisher got {METHOD_NAMES.get(cm, cm)}")
        peak = max(peak, rss_mb(pid))
        if acked < want:
            break
    pub.note(f"confirmed {acked} of {n}")
    time.sleep(1.0)
    peak = max(peak, rss_mb(pid))
    bystander_round_trip(t, "bystander")
    sleeper.reset()
    pub.send(queue_delete(1, q))
    if pub.expect("queue.delete-ok", timeout=30):
        pub.note("queue deleted")
    pub.send(conn_close())
    pub.observe()
    time.sleep(2.0)
    after = rss_mb(pid)
    if t.is_proxy:
        t.details.append(f"proxy RSS MB: before {base:.0f}, peak {peak:.0f}, "
                         f"after cleanup {after:.0f}")
        if peak - base > NEVER_READ_GROWTH_LIMIT_MB:
            t.problems.append(f"proxy RSS grew by {peak - base:.0f} MB (limit "
                              f"{NEVER_READ_GROWTH_LIMIT_MB}) for a consumer that never reads")


def channel_open_close_flood(t):
    """Five rounds of 1000 channel.open pipelined, then their 1000 channel.close pipelined."""
    p = t.opened(frame_max=None, channel=None)
    for _ in range(5):
        p.send(b"".join(chan_open(c) for c in range(1, 1001)))
        got = p.observe(30, until=("channel.open-ok",), by_name=True, count=1000)
        if got != "channel.open-ok":
            return
        p.send(b"".join(chan_close(c) for c in range(1, 1001)))
        got = p.observe(30, until=("channel.close-ok",), by_name=True, count=1000)
        if got != "channel.close-ok":
            return
    p.send(chan_open(1) + qos(1))
    if p.observe(until=("basic.qos-ok",)) == "basic.qos-ok":
        p.send(conn_close())
        p.observe()


def channel_open_close_same_number(t):
    """channel.open 1 + channel.close 1 in one write, 1000 times, each after the last close-ok."""
    p = t.opened(frame_max=None, channel=None)
    for _ in range(1000):
        p.send(chan_open(1) + chan_close(1))
        got = p.observe(10, until=("channel.close-ok",),
                        quiet=("channel.open-ok", "channel.close-ok"))
        if got != "channel.close-ok":
            return
    p.note("1000 open/close cycles")
    p.send(chan_open(1) + qos(1))
    if p.observe(until=("basic.qos-ok",)) == "basic.qos-ok":
        p.send(conn_close())
        p.observe()


def queue_declare_nowait_10k(t):
    """10,000 queue.declare nowait (exclusive) on one channel, then a probe and a passive declare
    of the last one. The exclusive queues go with the connection.

    Through warren every shard cluster creates the 10,000 queues, and all the test's RabbitMQ
    nodes share the machine's cores: with three shards the answer comes about three times later
    than from one node (a minute or two on a 2-core machine), so the deadline is generous. What
    is compared is the answer, not the time."""
    p = t.opened(frame_max=None)
    prefix = uid("nw")
    names = [f"{prefix}-{i}" for i in range(10_000)]
    p.send(b"".join(queue_declare(1, n, exclusive=True, nowait=True) for n in names))
    p.send(qos(1) + queue_declare(1, names[-1], passive=True))
    started = time.monotonic()
    if p.observe(360, until=("queue.declare-ok",)) == "queue.declare-ok":
        t.details.append(f"declares answered after {time.monotonic() - started:.1f}s")
        p.send(conn_close())
        p.observe(30)


# -- scenarios: the order of what the server says ------------------------------------------------

def server_close_ends_the_socket(t):
    """A connection error (basic.qos on channel 0: 504), answered with close-ok: the server closes
    the socket right after it. Clients wait for that end (the Java client's shutdown listeners
    and automatic recovery), so it must come within the window, not seconds later."""
    p = t.opened(channel=None)
    p.send(qos(0))
    p.observe(1.5)


def recover_ok_before_redeliveries(t):
    """Four messages consumed with manual acks and left unacked (through warren they are on two
    clusters), then basic.recover with requeue: recover-ok, then the four redeliveries (lapin
    drops deliveries that come before recover-ok)."""
    p = t.opened(frame_max=None)
    q = uid("recover")
    # A mirrored queue's declare waits for its mirror to start on the other node: seconds on a
    # busy machine (and behind a mass deletion of queues, the reason queue_declare_nowait_10k
    # runs last).
    p.send(queue_declare(1, q, auto_delete=True))
    p.expect("queue.declare-ok", timeout=3 * WINDOW)
    for i in range(4):
        payload = f"m{i}".encode()
        p.send(publish(1, q) + header(1, len(payload)) + body(1, payload))
    p.send(method(1, "basic.consume", struct.pack(">H", 0) + shortstr(q) + shortstr("rec")
                  + b"\x00" + table()))
    p.observe(3 * WINDOW, until=("basic.deliver",), count=4, quiet=("basic.consume-ok",))
    p.send(method(1, "basic.recover", b"\x01"))
    p.observe(3 * WINDOW, until=("basic.deliver",), count=4)
    p.send(conn_close())
    p.observe(WINDOW)


SCENARIOS = [
    header_amqp_0_9_0,
    header_amqp_0_8,
    header_amqp_0_9_spec,
    header_garbage,
    header_short_then_close,
    start_ok_unknown_mechanism,
    start_ok_empty_response,
    start_ok_response_without_nul,
    start_ok_unknown_field_type,
    start_ok_twice,
    open_before_tune_ok,
    start_ok_plain_authzid,
    start_ok_amqplain_first_login_counts,
    start_ok_amqplain_odd_entries,
    connection_close_after_tune_ok,
    channel_open_before_connection_open,
    tune_ok_frame_max_below_4096,
    tune_ok_frame_max_above_server,
    tune_ok_heartbeat_1_silent_client,
    tune_ok_heartbeat_65535,
    bad_frame_end_in_handshake,
    start_ok_after_open,
    connection_close_odd_code_then_send,
    connection_close_ok_unsolicited,
    frame_above_frame_max,
    frame_size_4gb_declared,
    frame_type_9,
    heartbeat_on_channel_2,
    heartbeat_with_payload,
    protocol_header_after_open,
    unknown_class,
    unknown_connection_method,
    empty_method_frame,
    publish_shortstr_overruns_frame,
    table_unknown_type_tag,
    headers_unknown_type_tag,
    table_nested_10k,
    table_longstr_4gb,
    publish_exchange_256_wrapped,
    publish_exchange_invalid_utf8,
    queue_declare_invalid_utf8,
    body_without_header,
    header_on_other_channel,
    method_between_publish_and_header,
    body_size_0_then_body_frame,
    body_frame_longer_than_declared,
    oversized_body_abandoned,
    refused_request_then_channel_close,
    channel_close_ok_not_closing,
    channel_open_on_channel_0,
    channel_65535,
    channel_reopen_before_close_ok,
    half_frame_stall,
    never_reading_consumer,
    channel_open_close_flood,
    channel_open_close_same_number,
    server_close_ends_the_socket,
    recover_ok_before_redeliveries,
    # Last: RabbitMQ deletes its 10,000 queues for many seconds after, holding up declares.
    queue_declare_nowait_10k,
]


# -- running -------------------------------------------------------------------------------------

def collapse(obs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Runs of one key become `key xN` (heartbeats: `heartbeats`, their count is timing)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(obs):
        j = i
        while j + 1 < len(obs) and obs[j + 1][0] == obs[i][0]:
            j += 1
        key, detail = obs[i]
        if j > i:
            key = f"{key.removesuffix(' heartbeat')} heartbeats" if key.endswith("heartbeat") \
                else f"{key} x{j - i + 1}"
        out.append((key, detail))
        i = j + 1
    return out


def healthy(t: Target) -> bool:
    """A fresh connection opens a channel and gets a qos-ok."""
    probe = Target(f"{t.hostport[0]}:{t.hostport[1]}", t.is_proxy)
    try:
        p = probe.opened(frame_max=None)
        p.send(qos(1))
        return p.observe(10, until=("basic.qos-ok",)) == "basic.qos-ok" and not any(
            k.startswith("handshake") or k.startswith("channel.open") for k, _ in probe.obs)
    except OSError:
        return False
    finally:
        probe.close_all()


def run(addr: str, fn, is_proxy: bool) -> Target:
    t = Target(addr, is_proxy)
    try:
        fn(t)
    except Exception as e:  # the scenario itself broke: record it, the other side may not
        t.obs.append((f"scenario raised {type(e).__name__}: {e}",
                      traceback.format_exc().splitlines()[-3].strip()))
    finally:
        t.close_all()
    t.obs = collapse(t.obs)
    if not healthy(t):
        t.obs.append(("endpoint unhealthy after the scenario", ""))
    return t


ROUTINE_LOG = ("link opened", "link ready", "connection opened",
               "reason=client closed the TCP connection", "reason=client closed the connection")


def scenario_lines(lines: list[str], ports: set[int]) -> list[str]:
    """The log lines of the connections a scenario made (warren names a connection `conn=N` and
    its client's address `peer=IP:PORT`), without the routine ones every connection writes."""
    conns = set()
    for line in lines:
        m = re.search(r"conn=(\d+) peer=[^ ]*:(\d+)", line)
        if m and int(m.group(2)) in ports:
            conns.add(m.group(1))
    mine = [line for line in lines
            if (m := re.search(r"conn=(\d+)\b", line)) and m.group(1) in conns]
    return [line for line in mine if not any(r in line for r in ROUTINE_LOG)]


class LogTail:
    """The lines a log file gained since the last call."""

    def __init__(self, path: str | None):
        self.path = path
        self.pos = os.path.getsize(path) if path else 0

    def new_lines(self) -> list[str]:
        if not self.path:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        return data.decode(errors="replace").splitlines()


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    argv = [a for a in argv if a != "-v"]
    log_path = None
    if "--warren-log" in argv:
        i = argv.index("--warren-log")
        log_path = argv[i + 1]
        del argv[i:i + 2]
    if len(argv) < 2:
        print(__doc__)
        return 2
    direct, proxy, *only = argv
    unknown = set(only) - {fn.__name__ for fn in SCENARIOS}
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}")
        return 2
    log = LogTail(log_path)
    fails = 0
    for fn in SCENARIOS:
        if only and fn.__name__ not in only:
            continue
        want = run(direct, fn, is_proxy=False)
        log.new_lines()
        got = run(proxy, fn, is_proxy=True)
        logged = log.new_lines()
        wk = [k for k, _ in want.obs]
        gk = [k for k, _ in got.obs]
        # A scenario that breaks against RabbitMQ tests nothing, even if it breaks alike.
        broken = any(k.startswith("scenario raised") for k in wk)
        documented = getattr(fn, "documented", None)
        if wk == gk and not broken and not got.problems:
            verdict, note = "PASS", ""
        elif documented and gk == documented[1] and not broken and not got.problems:
            verdict, note = "PASS", f" (documented difference: {documented[0]})"
        else:
            verdict, note = "FAIL", ""
        print(f"[{verdict}] {fn.__name__}{note}", flush=True)
        if verdict == "FAIL" or verbose or note:
            for i in range(max(len(want.obs), len(got.obs))):
                w = want.obs[i] if i < len(want.obs) else ("-", "")
                g = got.obs[i] if i < len(got.obs) else ("-", "")
                mark = " " if w[0] == g[0] else "!"
                print(f"   {mark} rabbitmq: {w[0]}{'  [' + w[1] + ']' if w[1] else ''}")
                print(f"   {mark} warren:   {g[0]}{'  [' + g[1] + ']' if g[1] else ''}")
            for d in want.details:
                print(f"     rabbitmq detail: {d}")
            for d in got.details:
                print(f"     warren detail: {d}")
            for pr in got.problems:
                print(f"   ! warren problem: {pr}")
            if verdict == "FAIL":
                for line in scenario_lines(logged, got.local_ports)[-10:]:
                    print(f"     warren log: {line}")
        if verdict == "FAIL":
            fails += 1
    print(f"raw comparison: {fails} differ" if fails else "raw comparison: all the same")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
