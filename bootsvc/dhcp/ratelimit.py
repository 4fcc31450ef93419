"""Token buckets for the DHCP packet path: per client MAC and per relay address.

Owns: admission of one packet under a sustained rate with a burst, in bounded memory (stale full
buckets are pruned; a table full of active keys refuses new ones - a flood of spoofed MACs must not
grow it without bound, RFC 2131 §7). Pure arithmetic on the caller's clock, no I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets keyed by MAC or relay address; bounded memory (stale full buckets pruned)."""

    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 200_000) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(5.0, 2 * rate)
        self.max_keys = max_keys
        self.buckets: dict[Any, list[float]] = {}

    def allow(self, key: Any, now: float) -> bool:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_keys:
                self.prune(now)
                if len(self.buckets) >= self.max_keys:
                    return False  # table full of active keys: a flood, refuse new ones
            self.buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = b[0] + (now - b[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True

    def prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self.buckets = {k: b for k, b in self.buckets.items() if now - b[1] < full_after}
