"""The boot plane's hottest URL without Flask: a repeated ``GET /boot/ipxe?mac=..`` answered from the
worker's script cache (`ScriptFastPath`, WSGI middleware), counted in batches (`FastPathCounts`).

Owns only the cache lookup and the batched counting; what is cached, and for whom, is decided by
``bootsvc.web.boot.ipxe`` (only scripts rendered for an address that holds the MAC's lease) in
``bootsvc.web.boot_guard.BootState.scripts``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from bootsvc import metrics as metrics_mod
from bootsvc.web.boot_guard import EXTENSION, NODE_CACHE_TTL, BootState

log = logging.getLogger("bootsvc.boot")

_FAST_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_FAST_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


class FastPathCounts:
    """Fast-path responses, added to the process's metrics registry in batches.

    ``counters.inc`` costs ~6 us per call (label sorting and validation, a lock): two calls were about a
    quarter of a fast-path request under granian. Here a hit is an integer add under an uncontended lock;
    the sums go into the same series as Flask's own counting (``bootsvc_http_requests_total`` /
    ``bootsvc_http_response_bytes_total``, blueprint=boot, GET, 200) every ``FOLD_EVERY`` hits or
    ``FOLD_SECONDS``, and whenever the registry is snapshotted (a registered source that folds and adds
    no samples of its own), so an idle worker's last hits are published by the next flush at the latest."""

    FOLD_EVERY = 64
    FOLD_SECONDS = 1.0
    _REQ = {"blueprint": "boot", "method": "GET", "code": 200}
    _BYTES = {"blueprint": "boot"}

    def __init__(self, counters: Any) -> None:
        self.counters = counters
        self._lock = threading.Lock()
        self._hits = 0
        self._bytes = 0
        self._since = time.monotonic()
        counters.add_source(self._on_snapshot)

    def add(self, nbytes: int, now: float) -> None:
        with self._lock:
            self._hits += 1
            self._bytes += nbytes
            if self._hits < self.FOLD_EVERY and now - self._since < self.FOLD_SECONDS:
                return
        self.fold()

    def fold(self) -> None:
        with self._lock:
            hits, nbytes = self._hits, self._bytes
            self._hits = self._bytes = 0
            self._since = time.monotonic()
        if hits:
            try:
                self.counters.inc("bootsvc_http_requests_total", self._REQ, hits)
                self.counters.inc("bootsvc_http_response_bytes_total", self._BYTES, nbytes)
            except Exception:  # counting must never break a response
                log.exception("metrics: counting fast-path responses failed")

    def _on_snapshot(self) -> list[Any]:
        self.fold()
        return []


class ScriptFastPath:
    """WSGI middleware: a repeated ``GET /boot/ipxe?mac=<aa:bb:..>`` whose script is in this worker's
    cache (same MAC, same Host, same source address, younger than the TTL) is answered without Flask's
    dispatch. Only scripts rendered for an address that holds the MAC's lease are cached. Flask costs
    ~2x the rest of the request on this path; iPXE retry loops and boot storms make it the hottest URL.
    Everything else - and every miss - goes through Flask unchanged. The response is byte-identical to
    the Flask one, and it is counted in the same metric the metrics blueprint keeps (in batches, see
    :class:`FastPathCounts`)."""

    def __init__(self, app: Flask, inner: Callable[..., Any]) -> None:
        self.app, self.inner = app, inner
        self.counts = FastPathCounts(metrics_mod.counters)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/boot/ipxe" and environ.get("REQUEST_METHOD") == "GET":
            qs = environ.get("QUERY_STRING", "")
            host = environ.get("HTTP_HOST")
            if host and qs.startswith("mac=") and _FAST_MAC.match(qs[4:]):
                st = self.app.extensions.get(EXTENSION)
                key = (qs[4:], host, str(environ.get("REMOTE_ADDR") or ""))
                hit = st.scripts.get(key) if isinstance(st, BootState) else None
                ttl = float(self.app.config.get("BOOT_NODE_CACHE_TTL", NODE_CACHE_TTL))
                now = time.monotonic()
                if hit is not None and now - hit[0] < ttl:
                    body = hit[2]
                    start_response("200 OK", [*_FAST_HEADERS, ("Content-Length", str(len(body)))])
                    self.counts.add(len(body), now)
                    return [body]
        return self.inner(environ, start_response)
