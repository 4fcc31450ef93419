"""Keeping the database from growing without bound: what history is pruned, and when a lease is expired.

Owns: `cutoffs` (pure: the instants before which each kind of row goes, from `RetentionConfig` and the
clock) and `prune` (the deletes and the expired-lease sweep, in batches of short transactions so a
prune never holds a lock that DHCP or the conductor waits on). Safe to run on several instances at once:
every statement is idempotent, and a row another instance deleted first is simply not counted.

What is never deleted, whatever its age:
- an event that an undelivered outgoing event (`Outbox`) still points at (the receiver has not had it);
- the newest outbox row of each node: `events_out.enqueue` numbers the next event after it, and the
  per-(subscriber, node) order a receiver relies on must not restart at 1;
- a bound or offered lease that has not expired (plus a grace for clock skew between instances).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, and_, delete, func, select, update
from sqlalchemy.orm import Session

from bootsvc.config import RetentionConfig
from bootsvc.models import Event, Lease, Outbox, UiSession, WebhookDelivery

log = logging.getLogger("bootsvc.retention")


@dataclass(frozen=True)
class Cutoffs:
    events: dt.datetime | None
    outbox: dt.datetime | None
    leases: dt.datetime | None
    lease_expiry: dt.datetime
    webhooks: dt.datetime | None
    sessions: dt.datetime | None


def cutoffs(cfg: RetentionConfig, now: dt.datetime) -> Cutoffs:
    """Rows older than these go (None: keep forever). Pure."""

    def days(n: int) -> dt.datetime | None:
        return now - dt.timedelta(days=n) if n > 0 else None

    return Cutoffs(events=days(cfg.event_days), outbox=days(cfg.outbox_days), leases=days(cfg.lease_days),
                   lease_expiry=now - dt.timedelta(seconds=cfg.lease_grace_seconds),
                   webhooks=days(cfg.webhook_days), sessions=days(cfg.session_days))


@dataclass
class PruneResult:
    leases_expired: int = 0
    leases: int = 0
    outbox: int = 0
    events: int = 0
    webhooks: int = 0
    sessions: int = 0

    def total(self) -> int:
        return self.leases_expired + self.leases + self.outbox + self.events + self.webhooks + self.sessions


def _batched_delete(session: Session, model: type, id_query: object, batch: int) -> int:
    """Delete the rows whose ids ``id_query`` selects, ``batch`` at a time, one commit per batch."""
    total = 0
    while True:
        ids = list(session.scalars(id_query.limit(batch)))  # type: ignore[attr-defined]
        if not ids:
            return total
        total += session.execute(delete(model).where(model.id.in_(ids))).rowcount or 0  # type: ignore[attr-defined]
        session.commit()
        if len(ids) < batch:
            return total


def prune(session: Session, cfg: RetentionConfig, *, now: dt.datetime | None = None) -> PruneResult:
    now = now or dt.datetime.now(dt.UTC)
    c = cutoffs(cfg, now)
    r = PruneResult()
    # 1. leases whose time ran out are expired: `leases list` and the allocator then see them as free
    #    without a DHCP packet having to touch them first (RFC 2131 §4.4.5: the lease ends at expiry).
    res: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Lease).where(Lease.state.in_(("bound", "offered")), Lease.expires_at < c.lease_expiry)
        .values(state="expired", updated_at=now))
    r.leases_expired = res.rowcount or 0
    session.commit()
    if c.leases is not None:
        r.leases = _batched_delete(session, Lease, select(Lease.id).where(
            Lease.state.in_(("released", "expired", "declined")), Lease.updated_at < c.leases), cfg.batch)
    if c.outbox is not None:
        newest = select(func.max(Outbox.id)).group_by(Outbox.node_id)
        r.outbox = _batched_delete(session, Outbox, select(Outbox.id).where(
            Outbox.delivered_at.is_not(None), Outbox.created_at < c.outbox, Outbox.id.not_in(newest)), cfg.batch)
    if c.events is not None:
        held = select(Outbox.event_id)  # any outbox row still pointing at it (delete would cascade)
        r.events = _batched_delete(session, Event, select(Event.id).where(
            Event.at < c.events, Event.id.not_in(held)), cfg.batch)
    if c.webhooks is not None:
        r.webhooks = _batched_delete(session, WebhookDelivery, select(WebhookDelivery.id).where(
            WebhookDelivery.received_at < c.webhooks), cfg.batch)
    if c.sessions is not None:
        r.sessions = _batched_delete(session, UiSession, select(UiSession.id).where(and_(
            UiSession.expires_at < c.sessions) | and_(UiSession.ended_at.is_not(None),
                                                       UiSession.ended_at < c.sessions)), cfg.batch)
    log.info("prune leases_expired=%d leases=%d outbox=%d events=%d webhooks=%d sessions=%d",
             r.leases_expired, r.leases, r.outbox, r.events, r.webhooks, r.sessions)
    return r
