"""Runs the Flask app under a production WSGI server, in the current process.

Owns: the server settings for bootsvc's HTTP listeners. Started by the supervisor as its own process.
``BOOTSVC_HTTP_SERVER`` picks the server (``gunicorn`` - pre-forked workers with threads, so a slow
image download never blocks script requests - or ``granian``); ``BOOTSVC_HTTP_WORKERS`` and
``BOOTSVC_HTTP_THREADS`` size it. Both install their own SIGTERM handling (graceful stop of the
workers) and build the app in each worker after the fork, where the worker starts its own metrics
flusher (``bootsvc.metrics.ensure_process_flusher``).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Any

from bootsvc.config import Config

SERVERS = ("gunicorn", "granian")
_CONFIG: Config | None = None  # handed to granian's forked workers (see _granian_app)


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

            return create_app(config)

    _App().run()


FILE_CHUNK = int(os.environ.get("BOOTSVC_HTTP_FILE_CHUNK", str(1 << 20)))


def _file_wrapper(file: Any, buffer_size: int = 8192) -> Any:
    """``wsgi.file_wrapper`` under granian, whose WSGI side has no sendfile: every chunk of a download
    crosses from Python to the server, so read 1 MiB per chunk instead of Werkzeug's 8 KiB (about 1/100
    of the per-chunk overhead; the bytes are still copied once more than with sendfile)."""
    from werkzeug.wsgi import FileWrapper

    return FileWrapper(file, max(buffer_size, FILE_CHUNK))


def _granian_app() -> Any:
    """Granian's app factory, called in each worker after the fork."""
    from bootsvc import metrics
    from bootsvc.web import create_app

    if _CONFIG is None:  # pragma: no cover - only if the worker was spawned instead of forked
        raise RuntimeError("bootsvc.web.serve: granian worker started without a config (not forked?)")
    app = create_app(_CONFIG)
    inner = app.wsgi_app

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["wsgi.file_wrapper"] = _file_wrapper
        return inner(environ, start_response)

    app.wsgi_app = wsgi_app  # type: ignore[method-assign]
    metrics.ensure_process_flusher(_CONFIG, "http")
    return app


def _granian(config: Config, address: str, port: int, workers: int, threads: int) -> None:
    from granian.constants import Interfaces
    from granian.server import Server

    global _CONFIG
    _CONFIG = config
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
