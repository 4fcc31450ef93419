"""Counts the SQL statements every bootsvc process of a storm sends (bench/storm only).

Put on ``PYTHONPATH`` by ``bench/storm/run.py`` (Python imports ``sitecustomize`` at start): it wraps
``sqlalchemy.create_engine`` so each engine counts ``before_cursor_execute`` events (one per statement
sent to the database: a round trip), and writes ``{"pid", "argv", "statements"}`` to
``$BOOTSVC_STORM_SQLCOUNT/<pid>.json`` every second and at exit. bootsvc itself is not modified.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading

_DIR = os.environ.get("BOOTSVC_STORM_SQLCOUNT")
_count = [0]


def _write() -> None:
    if not _DIR:
        return
    tmp = os.path.join(_DIR, f".{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "argv": sys.argv, "statements": _count[0]}, f)
        os.replace(tmp, os.path.join(_DIR, f"{os.getpid()}.json"))
    except OSError:
        pass


def _install() -> None:
    try:
        import sqlalchemy
        from sqlalchemy import event
    except ImportError:
        return
    real = sqlalchemy.create_engine

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        eng = real(*a, **kw)

        @event.listens_for(eng, "before_cursor_execute")
        def _one(*_a, **_kw):  # type: ignore[no-untyped-def]
            _count[0] += 1

        return eng

    sqlalchemy.create_engine = counting
    import sqlalchemy.engine

    sqlalchemy.engine.create_engine = counting

    def loop() -> None:
        import time

        while True:
            time.sleep(1.0)
            _write()

    def start() -> None:
        threading.Thread(target=loop, daemon=True, name="storm-sqlcount").start()

    def forked() -> None:  # a forked worker counts its own statements from zero, in its own file
        _count[0] = 0
        start()

    start()
    os.register_at_fork(after_in_child=forked)
    atexit.register(_write)


if _DIR:
    _install()
