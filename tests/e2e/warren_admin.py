"""Helpers shared by the scripts that drive a real warren binary (tests/e2e/reload_e2e.py and
tests/fault/fault_e2e.py), so that both read its admin endpoint and its /metrics the same way."""
from __future__ import annotations

import re
import socket
import time
import urllib.request


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def eventually(check, timeout: float, interval: float = 0.2) -> bool:
    """Polls `check` until it is true or `timeout` seconds have passed; a probe that raises counts
    as "not yet" (the proxy or a node may be down on purpose)."""
    end = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - a failing probe is "not yet"
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def admin_get(admin: int, path: str, timeout: float = 5) -> str:
    """GET `path` on the admin listener at 127.0.0.1:`admin`; the body as text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=timeout) as r:
        return r.read().decode()


def metrics(admin: int) -> dict[str, float]:
    """GET /metrics as {'name{label="v",...}': value}, keyed by the sample exactly as printed."""
    out: dict[str, float] = {}
    for line in admin_get(admin, "/metrics").splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
        except ValueError:
            continue
    return out


def metric(admin: int, name: str, **labels: str) -> float:
    """One sample of GET /metrics, 0 when absent; give the labels in the order warren prints them."""
    key = name
    if labels:
        key += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return metrics(admin).get(key, 0.0)


def strip_ansi(s: str) -> str:
    """Text without ANSI colour codes, so that log matching works however the log was written."""
    return re.sub(r"\x1b\[[0-9;]*m", "", s)
