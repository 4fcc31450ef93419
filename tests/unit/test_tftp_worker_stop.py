"""A forked TFTP worker stops when its parent says so, when it is sent SIGTERM itself, and when its
parent dies without saying anything (SIGKILL): bootsvc/tftp/run.py ``WorkerStop``. Before it, a worker
kept the SIGTERM handler it inherited from ``daemon.run_one`` (which sets the parent's Event, a copy
the worker never reads) and a killed parent left its workers serving: two such orphans were found
after a storm run."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

from bootsvc.tftp.run import own_stop

CTX = multiprocessing.get_context("fork")


def _serve_like_a_worker(shared: Any, pid_q: Any) -> None:
    stop = own_stop(shared)
    pid_q.put(os.getpid())
    while not stop.is_set():  # the service's 0.25 s tick (bootsvc/tftp/service.py serve)
        time.sleep(0.05)
    os._exit(0)


def _parent(shared: Any, pid_q: Any) -> None:
    # what daemon.run_one installs before the tftp runner forks: a handler setting the parent's own Event
    # (the worker inherits it, and the copy of that Event is nothing the worker reads)
    import threading
    mine = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: mine.set())
    p = CTX.Process(target=_serve_like_a_worker, args=(shared, pid_q), daemon=False)
    p.start()
    p.join()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _start() -> tuple[Any, Any, int]:
    shared, q = CTX.Event(), CTX.Queue()
    parent = CTX.Process(target=_parent, args=(shared, q))
    parent.start()
    worker = int(q.get(timeout=10))
    return shared, parent, worker


def _reap(parent: Any, worker: int) -> None:
    """Whatever a test left running of its two processes, killed."""
    for pid in (worker, parent.pid or 0):
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_worker_stops_when_its_parent_is_killed() -> None:
    _shared, parent, worker = _start()
    try:
        assert _alive(worker)
        os.kill(parent.pid or 0, signal.SIGKILL)
        parent.join(timeout=10)
        assert _wait_gone(worker), "the orphaned worker kept running after its parent was killed"
    finally:
        _reap(parent, worker)


def test_worker_stops_on_its_own_sigterm() -> None:
    _shared, parent, worker = _start()
    try:
        os.kill(worker, signal.SIGTERM)
        parent.join(timeout=10)
        assert not parent.is_alive() and _wait_gone(worker)
    finally:
        _reap(parent, worker)


def test_worker_stops_when_the_shared_event_is_set() -> None:
    shared, parent, worker = _start()
    try:
        shared.set()
        parent.join(timeout=10)
        assert not parent.is_alive() and _wait_gone(worker)
    finally:
        _reap(parent, worker)
