"""A hand-built AMQP 0-9-1 client on a raw socket, for the fault tests that need byte-level
control (a publish cut off mid-body, an oversized frame, a channel beyond channel_max...).

Only what those tests need: the client side of the handshake, a few methods, content frames,
and reading whatever the server sends back as (channel, class_id, method_id, arguments).
"""
from __future__ import annotations

import socket
import struct
import time

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = b"\xce"

# (class_id, method_id)
CONNECTION_START = (10, 10)
CONNECTION_START_OK = (10, 11)
CONNECTION_TUNE = (10, 30)
CONNECTION_TUNE_OK = (10, 31)
CONNECTION_OPEN = (10, 40)
CONNECTION_OPEN_OK = (10, 41)
CONNECTION_CLOSE = (10, 50)
CONNECTION_CLOSE_OK = (10, 51)
CHANNEL_OPEN = (20, 10)
CHANNEL_OPEN_OK = (20, 11)
CHANNEL_CLOSE = (20, 40)
CHANNEL_CLOSE_OK = (20, 41)
QUEUE_DECLARE = (50, 10)
QUEUE_DECLARE_OK = (50, 11)
BASIC_PUBLISH = (60, 40)
CONFIRM_SELECT = (85, 10)
CONFIRM_SELECT_OK = (85, 11)
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)

NAMES = {
    CONNECTION_START: "connection.start", CONNECTION_TUNE: "connection.tune",
    CONNECTION_OPEN_OK: "connection.open-ok", CONNECTION_CLOSE: "connection.close",
    CONNECTION_CLOSE_OK: "connection.close-ok", CHANNEL_OPEN_OK: "channel.open-ok",
    CHANNEL_CLOSE: "channel.close", CHANNEL_CLOSE_OK: "channel.close-ok",
    QUEUE_DECLARE_OK: "queue.declare-ok", CONFIRM_SELECT_OK: "confirm.select-ok",
    BASIC_ACK: "basic.ack", BASIC_NACK: "basic.nack",
}


class ProtocolError(Exception):
    pass


def shortstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("B", len(b)) + b


def longstr(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def table(d: dict[str, str]) -> bytes:
    body = b"".join(shortstr(k) + b"S" + longstr(v.encode()) for k, v in d.items())
    return struct.pack(">I", len(body)) + body


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


def method_frame(channel: int, cm: tuple[int, int], args: bytes = b"") -> bytes:
    return frame(FRAME_METHOD, channel, struct.pack(">HH", *cm) + args)


def content_header(channel: int, body_size: int, delivery_mode: int = 2, message_id: str | None = None) -> bytes:
    flags = 1 << 12  # delivery-mode
    props = struct.pack("B", delivery_mode)
    if message_id is not None:
        flags |= 1 << 7  # message-id
        props += shortstr(message_id)
    payload = struct.pack(">HHQH", 60, 0, body_size, flags) + props
    return frame(FRAME_HEADER, channel, payload)


def publish_frames(channel: int, exchange: str, routing_key: str, body: bytes, frame_max: int,
                   message_id: str | None = None) -> bytes:
    """A whole basic.publish: method, content header and body frames split to frame_max."""
    out = method_frame(channel, BASIC_PUBLISH,
                       struct.pack(">H", 0) + shortstr(exchange) + shortstr(routing_key) + b"\x00")
    out += content_header(channel, len(body), message_id=message_id)
    step = frame_max - 8
    for i in range(0, len(body), step):
        out += frame(FRAME_BODY, channel, body[i:i + step])
    return out


def parse_close(args: bytes) -> tuple[int, str, int, int]:
    code = struct.unpack(">H", args[:2])[0]
    n = args[2]
    text = args[3:3 + n].decode(errors="replace")
    cls, mth = struct.unpack(">HH", args[3 + n:7 + n])
    return code, text, cls, mth


class RawClient:
    """One socket speaking AMQP by hand. `source` binds the client side to another loopback
    address (127.0.0.2, ...) to appear as another client IP."""

    def __init__(self, host: str, port: int, source: str | None = None, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.frame_max = 0
        self.channel_max = 0
        self.server_tune: tuple[int, int, int] | None = None

    # -- io ---------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no frame before the deadline")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_frame(self, timeout: float = 10.0) -> tuple[int, int, bytes] | None:
        """(kind, channel, payload), or None when the server closed the socket."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 7:
                kind, channel, size = struct.unpack(">BHI", self.buf[:7])
                if len(self.buf) >= 8 + size:
                    payload = self.buf[7:7 + size]
                    if self.buf[7 + size:8 + size] != FRAME_END:
                        raise ProtocolError("bad frame end from server")
                    self.buf = self.buf[8 + size:]
                    return kind, channel, payload
            try:
                if not self._fill(deadline):
                    return None
            except ConnectionResetError:
                return None

    def read_method(self, timeout: float = 10.0) -> tuple[int, tuple[int, int], bytes] | None:
        """The next method (heartbeats and content frames skipped), or None on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.read_frame(max(0.01, deadline - time.monotonic()))
            if f is None:
                return None
            kind, channel, payload = f
            if kind != FRAME_METHOD:
                continue
            cls, mth = struct.unpack(">HH", payload[:4])
            return channel, (cls, mth), payload[4:]

    def expect(self, want: tuple[int, int], timeout: float = 10.0) -> tuple[int, bytes]:
        m = self.read_method(timeout)
        if m is None:
            raise ProtocolError(f"socket closed while waiting for {NAMES.get(want, want)}")
        ch, cm, args = m
        if cm != want:
            extra = ""
            if cm in (CONNECTION_CLOSE, CHANNEL_CLOSE):
                extra = f" {parse_close(args)}"
            raise ProtocolError(f"expected {NAMES.get(want, want)}, got {NAMES.get(cm, cm)}{extra}")
        return ch, args

    # -- handshake --------------------------------------------------------------------------
    def handshake(self, user: str = "guest", password: str = "guest", vhost: str = "/",
                  channel_max: int | None = None, frame_max: int | None = None, open_: bool = True):
        """Runs the handshake up to connection.open. Returns the method answering open (so a
        refusal at open, connection.close 530, can be inspected) or None when open_ is False."""
        self.send(PROTOCOL_HEADER)
        self.expect(CONNECTION_START)
        response = b"\0" + user.encode() + b"\0" + password.encode()
        self.send(method_frame(0, CONNECTION_START_OK,
                               table({"product": "warren-fault-raw"}) + shortstr("PLAIN")
                               + longstr(response) + shortstr("en_US")))
        _, args = self.expect(CONNECTION_TUNE)
        s_chmax, s_fmax, s_hb = struct.unpack(">HIH", args[:8])
        self.server_tune = (s_chmax, s_fmax, s_hb)
        self.channel_max = s_chmax if channel_max is None else channel_max
        self.frame_max = s_fmax if frame_max is None else frame_max
        self.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", self.channel_max, self.frame_max, 0)))
        if not open_:
            return None
        self.send(method_frame(0, CONNECTION_OPEN, shortstr(vhost) + shortstr("") + b"\x00"))
        return self.read_method()

    def open(self, **kw) -> "RawClient":
        m = self.handshake(**kw)
        if m is None or m[1] != CONNECTION_OPEN_OK:
            raise ProtocolError(f"connection.open refused: {describe(m)}")
        return self

    def open_channel(self, ch: int) -> None:
        self.send(method_frame(ch, CHANNEL_OPEN, shortstr("")))
        self.expect(CHANNEL_OPEN_OK)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Closes with a TCP RST (SO_LINGER 0): the most abrupt end a client can have."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()


def describe(m) -> str:
    if m is None:
        return "socket closed"
    ch, cm, args = m
    name = NAMES.get(cm, str(cm))
    if cm in (CONNECTION_CLOSE, CHANNEL_CLOSE):
        code, text, c, mm = parse_close(args)
        return f"{name} on channel {ch}: {code} {text} (class {c} method {mm})"
    return f"{name} on channel {ch}"
