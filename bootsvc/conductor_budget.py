"""The site power budget every conductor's BMC steps pass through (``power_slots`` rows).

Owns: `PowerBudget`, tokens shared by every conductor on one database. Powering on a whole data
hall at once overloads rack PDUs and the BMC network, so a BMC step first takes a token of the
site-wide concurrency cap (``power.max_concurrent_bmc``, held for the step) and, when it powers a
node on, one of its rack's power-on tokens (``power.rack_power_ons`` per ``power.rack_window_seconds``).
Tokens are taken with a conditional UPDATE (``... WHERE until IS NULL OR until <= now``), on
PostgreSQL after ``SELECT ... FOR UPDATE SKIP LOCKED``, so exactly one conductor wins a token and none
queues behind another's. When to take which token is the conductor's (``Conductor._take_tokens``).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bootsvc.models import PowerSlot


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
