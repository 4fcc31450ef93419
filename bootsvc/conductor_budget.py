"""The site power budget every conductor's BMC steps pass through (``power_slots`` rows).

Owns: `PowerBudget`, tokens shared by every conductor on one database. Powering on a whole data
hall at once overloads rack PDUs and the BMC network, so a BMC step first takes a token of the
site-wide concurrency cap (``power.max_concurrent_bmc``, held for the step) and, when it powers a
node on, one of its rack's power-on tokens (``power.rack_power_ons`` per ``power.rack_window_seconds``).
Tokens are taken with a conditional UPDATE (``... WHERE until IS NULL OR until <= now``), on
PostgreSQL after ``SELECT ... FOR UPDATE SKIP LOCKED``, so exactly one conductor wins a token and none
queues behind another's. `BudgetSteps` (a mixin of `bootsvc.conductor.Conductor`) takes the tokens
a step needs before it runs and gives them back after; a step without one is deferred to a later pass
(not failed), counted in ``bootsvc_power_deferred_total``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import metrics
from bootsvc.config import Config
from bootsvc.models import Node, PowerSlot
from bootsvc.orchestrate import Decision, Facts, Op

log = logging.getLogger("bootsvc.conductor")

metrics.describe("bootsvc_power_ons_total", "counter",
                 "Power-ons (network boot, BFB push, erase boot, reboot) sent by this conductor, by rack.")
metrics.describe("bootsvc_power_deferred_total", "counter",
                 "BMC steps put off to a later pass for want of a power-budget token, by reason "
                 "(rack: power.rack_power_ons spent in this window; global: power.max_concurrent_bmc in flight).")
metrics.describe("bootsvc_bmc_in_flight", "gauge", "BMC steps this conductor runs right now.")

# The ops that power a node on (they spend a rack power-on token); every op but these and the pure
# database ones talks to a BMC (and takes a global concurrency token).
POWER_ON_OPS = frozenset({Op.BOOT_NETWORK, Op.PUSH_BFB, Op.WIPE, Op.REBOOT})
DB_ONLY_OPS = frozenset({Op.WAIT, Op.APPLY, Op.PROVISION_DPU, Op.SEND_POLICY})
# After a rack's power-on token was refused, its power-ons are not tried again for this long.
RACK_RECHECK_SECONDS = 1.0


class PowerBudget:
    """Power tokens shared by every conductor on one database (rows of ``power_slots``).

    A scope has ``count`` rows (slot 0..count-1, created on first use); a row is free when its
    ``until`` is NULL or past. ``take`` frees nothing: a rack token stays spent until its window ends,
    a global token until ``give_back`` (or ``until``, if its holder died)."""

    def __init__(self, sessions: sessionmaker[Session], name: str, *, postgres: bool) -> None:
        self.sessions, self.name, self.postgres = sessions, name, postgres
        self._ensured: set[tuple[str, int]] = set()

    def _ensure(self, scope: str, count: int) -> None:
        if (scope, count) in self._ensured:
            return
        with self.sessions() as s:
            have = set(s.scalars(select(PowerSlot.slot).where(PowerSlot.scope == scope, PowerSlot.slot < count)))
            for i in range(count):
                if i in have:
                    continue
                s.add(PowerSlot(scope=scope, slot=i))
                try:
                    s.commit()
                except IntegrityError:  # another conductor created it first: that row is as good
                    s.rollback()
        self._ensured.add((scope, count))

    def take(self, scope: str, count: int, now: dt.datetime, until: dt.datetime) -> int | None:
        """The id of a token of ``scope`` now held until ``until``, or None when all ``count`` are in use."""
        self._ensure(scope, count)
        free = or_(PowerSlot.until.is_(None), PowerSlot.until <= now)
        q = select(PowerSlot.id).where(PowerSlot.scope == scope, PowerSlot.slot < count, free) \
            .order_by(PowerSlot.slot).limit(1)
        if self.postgres:  # skip rows another conductor is taking right now instead of queueing on them
            q = q.with_for_update(skip_locked=True)
        with self.sessions() as s:
            for _ in range(count):
                sid = s.scalar(q)
                if sid is None:
                    s.rollback()
                    return None
                res = s.execute(update(PowerSlot).where(PowerSlot.id == sid, free)
                                .values(holder=self.name, until=until).execution_options(synchronize_session=False))
                s.commit()
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    return int(sid)
            return None

    def restamp(self, slot_id: int, until: dt.datetime) -> None:
        """A spent token stays spent until ``until`` (a rack token: the power-on went out just now)."""
        with self.sessions() as s:
            s.execute(update(PowerSlot).where(PowerSlot.id == slot_id, PowerSlot.holder == self.name)
                      .values(until=until).execution_options(synchronize_session=False))
            s.commit()

    def give_back(self, slot_id: int) -> None:
        with self.sessions() as s:
            s.execute(update(PowerSlot).where(PowerSlot.id == slot_id, PowerSlot.holder == self.name)
                      .values(holder=None, until=None).execution_options(synchronize_session=False))
            s.commit()


class BudgetSteps:
    """The budget half of `bootsvc.conductor.Conductor` (which supplies what is declared here)."""

    config: Config
    sessions: sessionmaker[Session]
    name: str
    clock: Callable[[], dt.datetime]
    lease: dt.timedelta
    _budget: PowerBudget | None
    _in_flight: int
    _in_flight_lock: threading.Lock
    _rack_spent: dict[str, float]

    def _is_pg(self, s: Session) -> bool:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _defer(self, f: Facts, d: Decision, reason: str, why: str) -> None:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def budget(self, s: Session) -> PowerBudget:
        if self._budget is None:
            self._budget = PowerBudget(self.sessions, self.name, postgres=self._is_pg(s))
        return self._budget

    def _take_tokens(self, s: Session, n: Node, f: Facts, d: Decision) -> list[tuple[str, int]] | None:
        """The budget tokens a step needs (global cap, then the rack's power-on token), or None when one
        is missing: the step is deferred to a later pass, logged once per node and reason."""
        if d.op in DB_ONLY_OPS:
            return []
        pc = self.config.power
        now = self.clock()
        held: list[tuple[str, int]] = []
        b = self.budget(s)
        if pc.max_concurrent_bmc > 0:
            g = b.take("global", pc.max_concurrent_bmc, now, now + self.lease)
            if g is None:
                self._defer(f, d, "global", f"{pc.max_concurrent_bmc} BMC actions in flight site-wide "
                                            "(power.max_concurrent_bmc)")
                return None
            held.append(("global", g))
        if d.op in POWER_ON_OPS and pc.rack_power_ons > 0 and n.rack:
            r = b.take(f"rack:{n.rack}", pc.rack_power_ons, now, now + dt.timedelta(seconds=pc.rack_window_seconds))
            if r is None:
                self._give_back(held)
                self._rack_spent[n.rack] = time.monotonic() + RACK_RECHECK_SECONDS
                self._defer(f, d, "rack", f"rack {n.rack} spent its {pc.rack_power_ons} power-ons of the last "
                                          f"{pc.rack_window_seconds:g}s (power.rack_power_ons)")
                return None
            held.append(("rack", r))
        if d.op in POWER_ON_OPS:
            metrics.counters.inc("bootsvc_power_ons_total", {"rack": n.rack or "none"})
        with self._in_flight_lock:
            self._in_flight += 1
            metrics.counters.set("bootsvc_bmc_in_flight", None, self._in_flight)
        held.append(("flight", 0))
        return held

    def _give_back(self, held: list[tuple[str, int]]) -> None:
        for kind, slot in held:
            if kind == "flight":
                with self._in_flight_lock:
                    self._in_flight -= 1
                    metrics.counters.set("bootsvc_bmc_in_flight", None, self._in_flight)
            elif self._budget is not None:
                try:
                    if kind == "rack":
                        # the window counts from when the power-on was sent, not from when the token was
                        # taken: two uses of one token are then a full window apart at the BMCs too
                        self._budget.restamp(slot, self.clock() + dt.timedelta(
                            seconds=self.config.power.rack_window_seconds))
                    else:
                        self._budget.give_back(slot)
                except Exception:  # database down: the token's ``until`` frees it anyway
                    log.exception("power budget: could not give back token %d", slot)
