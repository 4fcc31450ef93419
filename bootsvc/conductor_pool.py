"""The conductor's BMC worker pool (``pipelined``: the service).

Owns: `PoolSteps`, a mixin of `bootsvc.conductor.Conductor` that runs claimed steps in long-lived
thread pools while passes go on - BMC steps in ``orchestration.workers`` threads, database-only steps
(transitions, a policy handed out) in DB_STEP_THREADS of their own - handing a step to its pool
(``_submit``), running it and giving its claim back on any failure (``_pooled_step``), the set of node
ids in flight (a pass does not look at them again until their step ended), the ``wake`` event a
finished step sets, and ``close``.

Why database-only steps have their own threads: run in the pass itself, each waited for SQLite's one
write lock (the HTTP plane and DHCP write too; a waiting writer sleeps and retries, sqlite3_busy_timeout)
and the pass, and with it the feeding of the BMC pool, stalled behind them - measured at 10,000 pairs:
43 % of the pass thread's time in their flushes while the BMC pool sat idle and thousands of DPUs
waited for a power-on.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bootsvc.config import Config

log = logging.getLogger("bootsvc.conductor")

# Threads for database-only steps: they wait on the database's writer, not on BMCs; two let one step
# read and decide while the other commits (SQLite has one writer: more would only queue).
DB_STEP_THREADS = 2


class PoolSteps:
    """The pool half of `bootsvc.conductor.Conductor` (which supplies what is declared here)."""

    config: Config
    _pool: ThreadPoolExecutor | None
    _db_pool: ThreadPoolExecutor | None
    _running: set[int]  # node ids with a step in a pool (BMC or database-only)
    _running_db: set[int]  # those of them whose step is database-only
    _running_lock: threading.Lock
    wake: threading.Event  # set when the pool runs low: a pass should refill it
    _low_water: int  # a step ending with at most this many in flight sets ``wake``
    lease: dt.timedelta

    def _claimed_step(self, node_id: int) -> int:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def claim_many(self, node_ids: list[int]) -> set[int]:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _submit(self, node_id: int, *, db_only: bool = False) -> None:
        with self._running_lock:
            if node_id in self._running:  # pragma: no cover - run_once skips nodes in flight
                return
            self._running.add(node_id)
            if db_only:
                self._running_db.add(node_id)
                if self._db_pool is None:
                    self._db_pool = ThreadPoolExecutor(max_workers=DB_STEP_THREADS, thread_name_prefix="conductor-db")
                pool = self._db_pool
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.config.orchestration.workers,
                                                    thread_name_prefix="conductor-step")
                pool = self._pool
        pool.submit(self._pooled_step, node_id, time.monotonic())

    def _pooled_step(self, node_id: int, queued: float = 0.0) -> None:
        try:
            # A step queued behind slow BMCs for half its claim's lease renews the claim before it acts
            # (the conditional UPDATE of ``claim_many``): an expired claim may have been taken by another
            # conductor, which then owns the node's step.
            if queued and time.monotonic() - queued > self.lease.total_seconds() / 2 \
                    and node_id not in self.claim_many([node_id]):
                log.info("step skipped node_id=%d: its claim expired while queued and another conductor "
                         "holds the node", node_id)
                return
            self._claimed_step(node_id)
        except Exception:  # database down: the claim expires, a later pass retries
            log.exception("step failed node_id=%d", node_id)
        finally:
            with self._running_lock:
                self._running.discard(node_id)
                db_only = node_id in self._running_db
                self._running_db.discard(node_id)
                # the BMC pool ran low, or the last database-only step ended (its transitions are
                # what the next pass acts on: a DPU handed its policy, a host whose DPUs are ready)
                low = len(self._running) - len(self._running_db) <= self._low_water if not db_only \
                    else not self._running_db
            if low:
                self.wake.set()

    def close(self) -> None:
        """Wait for the steps in flight (``pipelined``) and stop the worker pool."""
        with self._running_lock:
            pools, self._pool, self._db_pool = (self._pool, self._db_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)
