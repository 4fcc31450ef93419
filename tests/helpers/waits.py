"""Waiting on a condition with a deadline (never a bare sleep for luck): `wait_for` polls until the
condition returns something truthy and returns it, or fails the test naming what it waited for and
the last value the condition returned (None, False, an empty list, an object whose truth says "not yet");
`run_concurrently` runs the same work in n threads and fails the test if any is still running at the deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """``cond()``'s first truthy value within ``timeout`` seconds, polled every ``interval`` seconds
    (raise it where one poll is costly: a command inside a VM, a vtysh query); after the deadline an
    AssertionError naming ``what`` and the last value seen."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {v!r})")
        time.sleep(interval)


def run_concurrently(work: Callable[[], object], n: int, timeout: float) -> None:
    """``work()`` in ``n`` threads at once; returns when all have finished, fails the test naming how
    many were still running after ``timeout`` seconds (a join with a timeout alone would let the test
    go on with work still in flight)."""
    threads = [threading.Thread(target=work, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    assert not alive, f"{alive} of {n} threads still running after {timeout:g}s"
