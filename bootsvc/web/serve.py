"""Runs the Flask app under gunicorn (a production WSGI server), in the current process.

Owns: the gunicorn settings for bootsvc's HTTP listeners (pre-forked workers with threads, so a slow
image download never blocks script requests). Started by the supervisor as its own process.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from gunicorn.app.base import BaseApplication

from bootsvc.config import Config


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: Config, bind: str, workers: int, threads: int) -> None:
        self._config, self._bind, self._workers, self._threads = config, bind, workers, threads
        super().__init__()

    def load_config(self) -> None:
        self.cfg.set("bind", [self._bind])
        self.cfg.set("workers", self._workers)
        self.cfg.set("threads", self._threads)
        self.cfg.set("worker_class", "gthread" if self._threads > 1 else "sync")
        self.cfg.set("timeout", 120)
        self.cfg.set("graceful_timeout", 5)
        self.cfg.set("keepalive", 30)
        self.cfg.set("accesslog", None)
        self.cfg.set("proc_name", "bootsvc-http")

    def load(self) -> Any:
        from bootsvc.web import create_app

        return create_app(self._config)


def run(config: Config, listener_index: int, stop: threading.Event) -> None:
    """Serve HTTP on ``config.listeners.http[listener_index]`` until SIGTERM (gunicorn's own)."""
    lst = config.listeners.http[listener_index]
    workers = int(os.environ.get("BOOTSVC_HTTP_WORKERS", "2"))
    threads = int(os.environ.get("BOOTSVC_HTTP_THREADS", "8"))
    _App(config, f"{lst.address}:{lst.port}", workers, threads).run()
