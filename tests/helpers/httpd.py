"""A small HTTP server for tests, on a loopback address, serving from a daemon thread.

Owns only the server's life: bind (port 0 = any free port, unless the caller names one), serve in a
thread, and ``close`` (stop serving, then release the port). What the server answers is the caller's
request handler class; ``QuietHandler`` is a base that keeps the request log off the test output.
"""

from __future__ import annotations

import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing (BaseHTTPRequestHandler writes every request to stderr)."""

    def log_message(self, *a: Any) -> None:
        pass


class LoopbackHttpd:
    """``ThreadingHTTPServer(handler)`` on ``host``:``port``, serving until ``close``; ``url`` is its base URL."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0) -> None:
        if not ipaddress.ip_address(host).is_loopback:  # tests never serve on a real interface
            raise ValueError(f"{host} is not a loopback address")
        self.srv = ThreadingHTTPServer((host, port), handler)
        self.port = self.srv.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
