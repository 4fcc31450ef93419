"""Waiting on a condition with a deadline (never a bare sleep for luck): `wait_for` polls until the
condition returns something truthy and returns it, or fails the test naming what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """``cond()``'s first truthy value within ``timeout`` seconds; AssertionError naming ``what`` after."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
