"""Runs the Flask app under a production WSGI server, in the current process.

Owns: the server settings for bootsvc's HTTP listeners. Started by the supervisor as its own process.
``BOOTSVC_HTTP_SERVER`` picks the server (``gunicorn`` - pre-forked workers with threads, so a slow
image download never blocks script requests - or ``granian``); ``BOOTSVC_HTTP_WORKERS`` and
``BOOTSVC_HTTP_THREADS`` size it. Both install their own SIGTERM handling (graceful stop of the
workers) and build the app in each worker after the fork, where the worker starts its own metrics
flusher (``bootsvc.metrics.ensure_process_flusher``).

Why gunicorn stays the default (bench/http/README.md, same run against nginx): granian answers the
iPXE script URL with ~7x less CPU (30 vs 190-240 us/request; p99 6 ms against gunicorn's 24-29 ms,
both well inside the 50 ms target), but its WSGI interface has no sendfile - every image chunk is
read into Python and copied into the server - so 16 concurrent image downloads cost ~5x gunicorn's
CPU per GiB (0.39 vs 0.08 s) and reach 0.78-0.91x nginx, where gunicorn's sendfile reaches 1.0-1.1x
at about half nginx's CPU. During a boot storm that CPU belongs to DHCP and TFTP.
Known differences under granian: response header names are lower-case (HTTP/1.1 allows it; iPXE
and EDK2 compare case-insensitively); granian has no request-line limit of its own, so the app
wrapper below answers 414 past gunicorn's 4094 bytes; a single header over gunicorn's 8190 bytes is
still accepted (granian only bounds the whole head, at ~400 KiB). Everything else in
tests/integration/test_http_boot_server.py (Range, HEAD, ETag, 304, 413) behaves the same.

Slow clients (slowloris): gunicorn's stock ``gthread`` worker hands a connection to a thread as soon
as its first bytes arrive, and the thread then blocks reading the rest of the request head with no
deadline - 40 connections that send ``GET / HTTP/1.1\r\nHost: x\r\n`` and stop held every thread.
:class:`HeadFirstWorker` keeps gthread (and so ``sendfile`` for images) but hands a connection to a
thread only once its request is complete: the worker's event loop peeks (``MSG_PEEK``) at the socket,
and when the head - and a body of known length up to 1 MiB - is all there, the thread reads it as
gthread's would; otherwise the loop reads what arrives without blocking until the request is whole.
A connection that has not sent a complete head within ``BOOTSVC_HTTP_HEAD_TIMEOUT`` seconds (10) gets
408 and is closed, a head over 64 KiB gets 431. A slow connection then costs one file descriptor and
a buffer, not a thread (tests/integration/test_http_slowloris.py: scripts stay served with 1,000 slow
connections open).
The TLS handshake of an ``api``/``ui`` listener is driven the same way. Numbers and the designs
compared: docs/operations-listeners.md.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import gc
import json
import logging
import multiprocessing
import os
import re
import selectors
import signal
import socket
import ssl
import threading
import time
from typing import Any, TypeVar

from gunicorn import http as ghttp
from gunicorn import sock as gsock
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import TConn, ThreadWorker
from werkzeug.wsgi import FileWrapper

from bootsvc import metrics
from bootsvc.config import Config
from bootsvc.web import create_app

log = logging.getLogger("bootsvc.web.serve")

SERVERS = ("gunicorn", "granian")
_CONFIG: Config | None = None  # handed to granian's forked workers (see _granian_app)
_MAIN_PID = 0  # granian's main process, the workers' parent
_LISTENER = 0  # the index of granian's listener in config.listeners.http
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_T = TypeVar("_T")


def settle_heap(app: _T) -> _T:
    """Move everything built so far (Flask, SQLAlchemy, Jinja, the app) out of the garbage collector's
    reach, in each worker once its app exists. A full collection walks every tracked object while
    holding the GIL: ~100 000 objects, 37 ms in a warm worker on the bench box, during which none of
    the worker's threads answers; under load the default thresholds run one every few hundred ms,
    which made the iPXE-script p99 swing 18-96 ms between identical runs (bench/http/README.md).
    Frozen, that collection costs ~0 ms; per-request garbage is still collected as before. The DHCP
    server does the same for its lease index (``bootsvc.dhcp.server``)."""
    gc.collect()
    gc.freeze()
    return app


def _gunicorn(config: Config, listener_index: int, workers: int, threads: int) -> None:
    lst = config.listeners.http[listener_index]
    roles = config.http_roles(lst)

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", [f"{lst.address}:{lst.port}"])
            self.cfg.set("workers", workers)
            self.cfg.set("threads", max(threads, 1))
            self.cfg.set("worker_class", WORKER_CLASSES[os.environ.get("BOOTSVC_HTTP_WORKER", "headfirst")])
            self.cfg.set("worker_connections", WORKER_CONNECTIONS)
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 5)
            self.cfg.set("keepalive", 30)
            self.cfg.set("accesslog", None)
            self.cfg.set("proc_name", "bootsvc-http")
            if lst.tls is not None:
                self.cfg.set("certfile", str(config.resolve(lst.tls.cert)))
                self.cfg.set("keyfile", str(config.resolve(lst.tls.key)))

        def load(self) -> Any:
            return settle_heap(create_app(config, roles=roles))

    _App().run()


# ---------------------------------------------------------------- gunicorn worker: heads first
HEAD_TIMEOUT = float(os.environ.get("BOOTSVC_HTTP_HEAD_TIMEOUT", "10"))
BODY_TIMEOUT = float(os.environ.get("BOOTSVC_HTTP_BODY_TIMEOUT", "30"))
MAX_HEAD = 64 * 1024  # gunicorn's own limits: 4094-byte request line, 100 fields of <= 8190 bytes
MAX_BUFFERED_BODY = 1 << 20  # the app's MAX_CONTENT_LENGTH: no body we accept is larger
WORKER_CONNECTIONS = 10_000  # per worker; slow heads over this evict the oldest slow head
# BOOTSVC_HTTP_WORKER=gthread: gunicorn's stock worker, only for A/B measurements (bench/http/run.py);
# slow clients can then hold every thread again, and serve() says so in its log
WORKER_CLASSES = {"headfirst": "bootsvc.web.serve.HeadFirstWorker", "gthread": "gthread"}
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*([0-9]{1,10})[ \t]*\r?(?=\n)", re.IGNORECASE)
_NEEDS_THREAD = re.compile(rb"\n(?:transfer-encoding|expect)[ \t]*:", re.IGNORECASE)


def body_to_buffer(head: bytes) -> int | None:
    """How many body bytes to read before a thread takes this request: the Content-Length when it is
    the only framing and at most ``MAX_BUFFERED_BODY``; None when the thread must read the body itself
    (chunked, ``Expect: 100-continue`` - the client waits for the interim response before sending -,
    a length over the limit, which the app refuses with 413, or framing gunicorn answers with 400:
    several or invalid Content-Length fields, RFC 9112 §6.3)."""
    low = head.lower()
    if b"\ncontent-length" not in low and b"\ntransfer-encoding" not in low and b"\nexpect" not in low:
        return 0  # the common case (GET, HEAD): checked without a regular expression
    if _NEEDS_THREAD.search(head):
        return None
    lengths = _CONTENT_LENGTH.findall(head)
    n_fields = len(re.findall(rb"\ncontent-length[ \t]*:", head, re.IGNORECASE))
    if n_fields == 0:
        return 0
    if n_fields != 1 or len(lengths) != 1:
        return None
    n = int(lengths[0])
    return n if n <= MAX_BUFFERED_BODY else None


class ClientStalled(ConnectionResetError):
    """A client that stopped sending its request body; gunicorn closes such connections quietly."""


class _DeadlineSocket:
    """What a thread reads a request body through: waits at most until ``deadline`` (monotonic) for
    data, so a chunked body sent a byte a minute cannot hold a thread past ``BODY_TIMEOUT``."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.deadline = sock, time.monotonic() + BODY_TIMEOUT

    def recv(self, size: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientStalled(errno.ECONNRESET, f"no complete request within {BODY_TIMEOUT:g} s")
        # A timeout for this read only: responses (sendfile of a large image to a slow client) must
        # stay blocking, so the socket goes back to blocking mode at once.
        self.sock.settimeout(left)
        try:
            data: bytes = self.sock.recv(size)
        except TimeoutError:
            raise ClientStalled(errno.ECONNRESET, f"no complete request within {BODY_TIMEOUT:g} s") from None
        finally:
            self.sock.settimeout(None)
        return data


class HeadFirstWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, except that a thread only ever sees a complete request head (see
    the module docstring). Connections still reading their head live in ``self.reading`` (oldest
    first) and in the worker's selector; nothing else of gthread changes."""

    def init_process(self) -> None:
        self.reading: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self.dropped = {"timeout": 0, "too_large": 0, "evicted": 0}
        self.last_report = time.monotonic()
        self.ssl_ctx: Any = None
        if self.cfg.is_ssl:
            self.ssl_ctx = gsock.ssl_context(self.cfg)
        super().init_process()

    # -- where connections come from: new, kept alive, or pipelined behind a finished request
    def accept(self, listener: Any) -> None:
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, addr, listener.getsockname())  # non-blocking
        if self.ssl_ctx is not None:
            conn.sock = self.ssl_ctx.wrap_socket(client, server_side=True, do_handshake_on_connect=False,
                                                 suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
            conn.bs_handshake = True
        self._read_head(conn, b"")

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn, b"")

    def enqueue_req(self, conn: Any) -> None:
        if getattr(conn, "bs_ready", False):
            conn.bs_ready = False
            super().enqueue_req(conn)
            return
        # gthread's only other caller: bytes of a next request read ahead behind the last one
        conn.sock.setblocking(False)
        self._read_head(conn, conn.parser.unreader.take_buffered())

    # -- reading heads in the event loop
    def _read_head(self, conn: Any, already: bytes) -> None:
        # non-blocking already: TConn() for a new connection, gthread's finish_request for a kept-alive one
        conn.bs_buf = bytearray(already)
        conn.bs_need = None  # head + buffered body length, once the head is complete
        conn.bs_deadline = time.monotonic() + HEAD_TIMEOUT
        self.reading[conn] = None
        # Try at once: a kept-alive connection the selector just reported readable has its request
        # waiting; no need for another trip through the selector.
        if already:
            self._progress(conn)
        if conn in self.reading:
            self._on_readable(conn, None)
        if conn in self.reading:
            self.poller.register(conn.sock, selectors.EVENT_READ, functools.partial(self._on_readable, conn))
            conn.bs_registered = True

    def _on_readable(self, conn: Any, _fileobj: Any) -> None:
        if not conn.bs_buf and not self.ssl_ctx:
            complete = self._complete_in_kernel(conn)
            if complete is not None:
                # the common case: nothing copied, the thread reads the request as gthread's would,
                # through a deadline only when it has a body to read that is not here yet
                self._dispatch(conn, deadline=complete)
                return
        try:
            if getattr(conn, "bs_handshake", False):
                conn.sock.do_handshake()
                conn.bs_handshake = False
            data = conn.sock.recv(65536)
            pending = getattr(conn.sock, "pending", None)
            while data and pending is not None and pending():  # TLS: decrypted bytes the kernel no
                data += conn.sock.recv(65536)                   # longer signals as readable
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ssl.SSLError):  # reset, or a client that does not speak TLS
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.bs_buf += data
        self._progress(conn)

    @staticmethod
    def _complete_in_kernel(conn: Any) -> bool | None:
        """None unless the whole request (head, and a body of known length) already sits in the
        socket's receive queue (MSG_PEEK: nothing consumed); else whether the thread will still read
        a body itself (chunked, 100-continue)."""
        for size in (4096, MAX_HEAD):
            try:
                data = conn.sock.recv(size, socket.MSG_PEEK)
            except OSError:  # nothing yet (EAGAIN), or a reset the real read will report
                return None
            end = _HEAD_END.search(data)
            if end is not None:
                body = body_to_buffer(b"\n" + data[: end.start()])
                if body is None:
                    return True
                return False if len(data) >= end.end() + body else None
            if len(data) < size:
                return None
        return None

    def _progress(self, conn: Any) -> None:
        buf = conn.bs_buf
        if conn.bs_need is None:
            end = _HEAD_END.search(buf, 0, MAX_HEAD + 4)
            if end is None:
                if len(buf) > MAX_HEAD:
                    self.dropped["too_large"] += 1
                    self._refuse(conn, "431 Request Header Fields Too Large", "header_too_large",
                                 f"the request head is larger than {MAX_HEAD} bytes")
                return
            body = body_to_buffer(b"\n" + bytes(buf[: end.start()]))
            if body is None:  # the thread reads the body (or gunicorn refuses the framing)
                self._dispatch(conn)
                return
            conn.bs_need = end.end() + body
        if len(buf) >= conn.bs_need:
            self._dispatch(conn)

    def _dispatch(self, conn: Any, deadline: bool = True) -> None:
        self._forget(conn)
        if conn.parser is None:
            conn.parser = ghttp.get_parser(self.cfg, conn.sock, conn.client)
            conn.initialized = True  # TConn.init would wrap TLS again; the handshake is done
        unreader = conn.parser.unreader
        if not deadline:
            unreader.sock = conn.sock  # everything is in the kernel already: plain reads
        elif isinstance(unreader.sock, _DeadlineSocket):
            unreader.sock.deadline = time.monotonic() + BODY_TIMEOUT
        else:
            unreader.sock = _DeadlineSocket(conn.sock)
        if conn.bs_buf:
            unreader.unread(bytes(conn.bs_buf))
            conn.bs_buf = bytearray()
        conn.bs_ready = True
        self.enqueue_req(conn)

    def _forget(self, conn: Any) -> None:
        self.reading.pop(conn, None)
        if getattr(conn, "bs_registered", False):
            conn.bs_registered = False
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)

    def _close(self, conn: Any) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()

    def _refuse(self, conn: Any, status: str, error: str, reason: str) -> None:
        body = json.dumps({"error": error, "reason": reason}).encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        with contextlib.suppress(OSError, ssl.SSLError):  # best effort: never block the event loop
            conn.sock.send(head + body)
        self._close(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.reading:
            conn = next(iter(self.reading))
            if self.alive and conn.bs_deadline > now:
                break
            if self.alive:
                self.dropped["timeout"] += 1
                # RFC 9110 §15.5.9: 408, the server would not wait longer for the request
                self._refuse(conn, "408 Request Timeout", "request_timeout",
                             f"no complete request head within {HEAD_TIMEOUT:g} s")
            else:
                self._close(conn)
        # Full: make room for new clients by closing the slowest heads, which hold no thread.
        while self.reading and self.nr_conns >= self.worker_connections - 1:
            self.dropped["evicted"] += 1
            self._close(next(iter(self.reading)))
        if now - self.last_report >= 10 and any(self.dropped.values()):
            # one line per 10 s, not one per connection: a flood must not flood the log too
            log.warning("http: closed slow connections in the last %.0f s: %s (open while reading: %d)",
                        now - self.last_report, " ".join(f"{k}={v}" for k, v in self.dropped.items()),
                        len(self.reading))
            self.dropped = dict.fromkeys(self.dropped, 0)
            self.last_report = now


MAX_REQUEST_LINE = 4094  # gunicorn's limit_request_line: longer targets get 414 under both servers
_TOO_LONG = b'{"error": "uri_too_long", "reason": "the request target is longer than 4094 bytes"}'
FILE_CHUNK = int(os.environ.get("BOOTSVC_HTTP_FILE_CHUNK", str(1 << 20)))


def _file_wrapper(file: Any, buffer_size: int = 8192) -> Any:
    """``wsgi.file_wrapper`` under granian, whose WSGI side has no sendfile: every chunk of a download
    crosses from Python to the server, so read 1 MiB per chunk instead of Werkzeug's 8 KiB (about 1/100
    of the per-chunk overhead; the bytes are still copied once more than with sendfile)."""
    return FileWrapper(file, max(buffer_size, FILE_CHUNK))


def _die_with_parent() -> None:
    """Make this granian worker get SIGTERM when granian's main process dies, even by SIGKILL (gunicorn's
    workers watch their parent the same way): an orphaned worker would keep the port and go on serving."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("http: prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:  # not Linux/glibc
        log.warning("http: cannot tie granian workers to their parent: %s", e)
    if os.getppid() != _MAIN_PID:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _granian_app() -> Any:
    """Granian's app factory, called in each worker after the fork."""
    _die_with_parent()
    if _CONFIG is None:  # pragma: no cover - only if the worker was spawned instead of forked
        raise RuntimeError("bootsvc.web.serve: granian worker started without a config (not forked?)")
    app = create_app(_CONFIG, roles=_CONFIG.http_roles(_CONFIG.listeners.http[_LISTENER]))
    inner = app.wsgi_app

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
        if len(environ.get("PATH_INFO", "")) + len(environ.get("QUERY_STRING", "")) > MAX_REQUEST_LINE:
            start_response("414 URI Too Long", [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(_TOO_LONG)))])
            return [_TOO_LONG]
        environ["wsgi.file_wrapper"] = _file_wrapper
        return inner(environ, start_response)

    app.wsgi_app = wsgi_app  # type: ignore[method-assign]
    metrics.ensure_process_flusher(_CONFIG, "http")
    return settle_heap(app)


def _granian(config: Config, listener_index: int, workers: int, threads: int) -> None:
    try:  # optional: pip install granian (not a dependency of the default gunicorn server)
        from granian.constants import Interfaces  # type: ignore[import-not-found, unused-ignore]
        from granian.server import Server  # type: ignore[import-not-found, unused-ignore]
    except ImportError as e:
        raise SystemExit(f"BOOTSVC_HTTP_SERVER=granian needs the granian package: {e}") from e

    global _CONFIG, _MAIN_PID, _LISTENER
    _CONFIG, _MAIN_PID, _LISTENER = config, os.getpid(), listener_index
    lst = config.listeners.http[listener_index]
    tls: dict[str, Any] = {}
    if lst.tls is not None:
        tls = {"ssl_cert": config.resolve(lst.tls.cert), "ssl_key": config.resolve(lst.tls.key)}
    # The workers must inherit _CONFIG: fork (Python >= 3.14 defaults to forkserver, granian to spawn).
    multiprocessing.set_start_method("fork", force=True)
    Server("bootsvc.web.serve:_granian_app", address=str(lst.address), port=lst.port, interface=Interfaces.WSGI,
           workers=workers, blocking_threads=threads, factory=True, log_access=False, backlog=1024,
           workers_kill_timeout=5, **tls).serve()


def run(config: Config, listener_index: int, stop: threading.Event) -> None:
    """Serve HTTP on ``config.listeners.http[listener_index]`` until SIGTERM (the server's own)."""
    lst = config.listeners.http[listener_index]
    server = os.environ.get("BOOTSVC_HTTP_SERVER", "gunicorn")
    if server not in SERVERS:
        raise SystemExit(f"BOOTSVC_HTTP_SERVER={server!r}: must be one of {', '.join(SERVERS)}")
    workers = int(os.environ.get("BOOTSVC_HTTP_WORKERS", "2"))
    threads = int(os.environ.get("BOOTSVC_HTTP_THREADS", "8"))
    if os.environ.get("BOOTSVC_HTTP_WORKER", "headfirst") not in WORKER_CLASSES:
        raise SystemExit(f"BOOTSVC_HTTP_WORKER must be one of {', '.join(WORKER_CLASSES)}")
    if os.environ.get("BOOTSVC_HTTP_WORKER") == "gthread":
        log.warning("http: BOOTSVC_HTTP_WORKER=gthread - gunicorn's stock worker, which slow clients can "
                    "starve (docs/operations-listeners.md); for benchmarks only")
    roles = sorted(config.http_roles(lst))
    if lst.tls is None and not lst.address.is_loopback and {"api", "ui", "webhook"} & set(roles):
        log.warning("http: %s:%d serves %s in clear text; set tls (cert, key) on this listener or put a "
                    "TLS reverse proxy in front (docs/operations-listeners.md)", lst.address, lst.port,
                    ",".join(roles))
    if "boot" in roles and {"api", "ui", "webhook", "metrics"} & set(roles) and not lst.address.is_loopback:
        log.warning("http: %s:%d serves the boot plane and %s: whatever reaches this address on Zone 0 can "
                    "reach them too; give them a listener of their own (docs/operations-listeners.md)",
                    lst.address, lst.port, ",".join(r for r in roles if r != "boot"))
    log.info("http: listener %s:%d (%s) serves roles %s%s", lst.address, lst.port, server, ",".join(roles),
             " over TLS" if lst.tls is not None else "")
    if server == "granian":
        _granian(config, listener_index, workers, threads)
    else:
        _gunicorn(config, listener_index, workers, threads)
