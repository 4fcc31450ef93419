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
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import threading
from typing import Any, TypeVar

from bootsvc.config import Config

log = logging.getLogger("bootsvc.web.serve")

SERVERS = ("gunicorn", "granian")
_CONFIG: Config | None = None  # handed to granian's forked workers (see _granian_app)
_MAIN_PID = 0  # granian's main process, the workers' parent
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


def _gunicorn(config: Config, bind: str, workers: int, threads: int) -> None:
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", [bind])
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "gthread" if threads > 1 else "sync")
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 5)
            self.cfg.set("keepalive", 30)
            self.cfg.set("accesslog", None)
            self.cfg.set("proc_name", "bootsvc-http")

        def load(self) -> Any:
            from bootsvc.web import create_app

            return settle_heap(create_app(config))

    _App().run()


MAX_REQUEST_LINE = 4094  # gunicorn's limit_request_line: longer targets get 414 under both servers
_TOO_LONG = b'{"error": "uri_too_long", "reason": "the request target is longer than 4094 bytes"}'
FILE_CHUNK = int(os.environ.get("BOOTSVC_HTTP_FILE_CHUNK", str(1 << 20)))


def _file_wrapper(file: Any, buffer_size: int = 8192) -> Any:
    """``wsgi.file_wrapper`` under granian, whose WSGI side has no sendfile: every chunk of a download
    crosses from Python to the server, so read 1 MiB per chunk instead of Werkzeug's 8 KiB (about 1/100
    of the per-chunk overhead; the bytes are still copied once more than with sendfile)."""
    from werkzeug.wsgi import FileWrapper

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
    from bootsvc import metrics
    from bootsvc.web import create_app

    _die_with_parent()
    if _CONFIG is None:  # pragma: no cover - only if the worker was spawned instead of forked
        raise RuntimeError("bootsvc.web.serve: granian worker started without a config (not forked?)")
    app = create_app(_CONFIG)
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


def _granian(config: Config, address: str, port: int, workers: int, threads: int) -> None:
    try:  # optional: pip install granian (not a dependency of the default gunicorn server)
        from granian.constants import Interfaces  # type: ignore[import-not-found, unused-ignore]
        from granian.server import Server  # type: ignore[import-not-found, unused-ignore]
    except ImportError as e:
        raise SystemExit(f"BOOTSVC_HTTP_SERVER=granian needs the granian package: {e}") from e

    global _CONFIG, _MAIN_PID
    _CONFIG, _MAIN_PID = config, os.getpid()
    # The workers must inherit _CONFIG: fork (Python >= 3.14 defaults to forkserver, granian to spawn).
    multiprocessing.set_start_method("fork", force=True)
    Server("bootsvc.web.serve:_granian_app", address=address, port=port, interface=Interfaces.WSGI,
           workers=workers, blocking_threads=threads, factory=True, log_access=False, backlog=1024,
           workers_kill_timeout=5).serve()


def run(config: Config, listener_index: int, stop: threading.Event) -> None:
    """Serve HTTP on ``config.listeners.http[listener_index]`` until SIGTERM (the server's own)."""
    lst = config.listeners.http[listener_index]
    server = os.environ.get("BOOTSVC_HTTP_SERVER", "gunicorn")
    if server not in SERVERS:
        raise SystemExit(f"BOOTSVC_HTTP_SERVER={server!r}: must be one of {', '.join(SERVERS)}")
    workers = int(os.environ.get("BOOTSVC_HTTP_WORKERS", "2"))
    threads = int(os.environ.get("BOOTSVC_HTTP_THREADS", "8"))
    if server == "granian":
        _granian(config, str(lst.address), lst.port, workers, threads)
    else:
        _gunicorn(config, f"{lst.address}:{lst.port}", workers, threads)
