"""Waiting on a condition with a deadline (never a bare sleep for luck): `wait_for` polls until the
condition returns something truthy and returns it, or fails the test naming what it waited for and
the last value the condition returned (None, False, an empty list, an object whose truth says "not yet")."""

from __future__ import annotations

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
