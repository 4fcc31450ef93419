"""Retention: what `prune` removes and, above all, what it must keep (undelivered events, the newest
outbox row per node, live leases), on SQLite built from the models."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bootsvc import db, inventory, retention
from bootsvc.config import RetentionConfig
from bootsvc.models import ApiToken, Base, Event, Lease, Outbox, Subscriber, UiSession, WebhookDelivery

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=400)
CFG = RetentionConfig(event_days=365, outbox_days=7, lease_days=30, lease_grace_seconds=300, webhook_days=30,
                      session_days=7, batch=100)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    Base.metadata.create_all(engine)
    with db.session_factory(engine)() as s:
        yield s
    engine.dispose()


def _node(s: Session, name: str) -> int:
    (n,) = inventory.enroll(s, [inventory.NodeSpec(name=name, kind="dpu", serial=name.upper())], actor="t")
    return n.id


def _event(s: Session, node_id: int, at: dt.datetime) -> Event:
    ev = Event(node_id=node_id, at=at, from_state="registered", to_state="registered", trigger="note", actor="t")
    s.add(ev)
    s.flush()
    return ev


def test_newest_delivered_outbox_row_of_a_node_is_kept(session: Session) -> None:
    a = _node(session, "dpu-a")
    sub = Subscriber(name="crm", url="https://crm.example/hook", secret_ref="env:X")
    session.add(sub)
    session.flush()
    for seq in (1, 2):
        ev = _event(session, a, OLD)
        session.add(Outbox(subscriber_id=sub.id, node_id=a, seq=seq, event_id=ev.id, created_at=OLD,
                           delivered_at=OLD))
    session.commit()
    retention.prune(session, CFG, now=NOW)
    assert [o.seq for o in session.scalars(select(Outbox))] == [2]


def test_cutoffs_zero_means_forever() -> None:
    c = retention.cutoffs(RetentionConfig(event_days=0, outbox_days=1), NOW)
    assert c.events is None and c.outbox == NOW - dt.timedelta(days=1)
    assert c.lease_expiry == NOW - dt.timedelta(seconds=300)


def test_prune_keeps_what_receivers_and_clients_still_need(session: Session) -> None:
    s = session
    a, b = _node(s, "dpu-a"), _node(s, "dpu-b")
    sub = Subscriber(name="crm", url="https://crm.example/hook", secret_ref="env:X")
    s.add(sub)
    s.flush()
    old_delivered = [_event(s, a, OLD) for _ in range(3)]
    old_pending = _event(s, a, OLD)
    old_plain = [_event(s, b, OLD) for _ in range(250)]  # more than one batch
    recent = _event(s, b, NOW - dt.timedelta(days=1))
    for seq, ev in enumerate([*old_delivered, old_pending], start=1):
        s.add(Outbox(subscriber_id=sub.id, node_id=a, seq=seq, event_id=ev.id, created_at=OLD,
                     delivered_at=None if ev is old_pending else OLD))
    leases = {
        "live": Lease(vrf="", network="n", address="10.0.0.1", mac="02:00:00:00:00:01", state="bound",
                      expires_at=NOW + dt.timedelta(hours=1), updated_at=NOW),
        "lapsed": Lease(vrf="", network="n", address="10.0.0.2", mac="02:00:00:00:00:02", state="bound",
                        expires_at=NOW - dt.timedelta(hours=1), updated_at=NOW - dt.timedelta(hours=2)),
        "in_grace": Lease(vrf="", network="n", address="10.0.0.3", mac="02:00:00:00:00:03", state="offered",
                          expires_at=NOW - dt.timedelta(seconds=60), updated_at=NOW),
        "ancient": Lease(vrf="", network="n", address="10.0.0.4", mac="02:00:00:00:00:04", state="released",
                         expires_at=OLD, updated_at=OLD),
    }
    s.add_all(leases.values())
    tok = ApiToken(name="t", role="tech", token_hash="0" * 64)
    s.add(tok)
    s.flush()
    s.add_all([UiSession(session_hash="a" * 64, token_id=tok.id, csrf="x", created_at=OLD, expires_at=OLD),
               UiSession(session_hash="b" * 64, token_id=tok.id, csrf="x", created_at=NOW,
                         expires_at=NOW + dt.timedelta(hours=8)),
               WebhookDelivery(delivery_id="old", hook="enroll", received_at=OLD, body_sha256="0" * 64,
                               status_code=201),
               WebhookDelivery(delivery_id="new", hook="enroll", received_at=NOW, body_sha256="0" * 64,
                               status_code=201)])
    s.commit()

    r = retention.prune(s, CFG, now=NOW)

    assert (r.leases_expired, r.leases, r.webhooks, r.sessions) == (1, 1, 1, 1)
    states = {lz.address: lz.state for lz in s.scalars(select(Lease))}
    assert states == {"10.0.0.1": "bound", "10.0.0.2": "expired", "10.0.0.3": "offered"}
    # outbox: the delivered rows go; the undelivered one stays, and it is also the node's newest (whose seq
    # numbers the next event), so seq never restarts
    kept = sorted(o.seq for o in s.scalars(select(Outbox)))
    assert kept == [4] and r.outbox == 3
    ev_ids = set(s.scalars(select(Event.id)))
    assert old_pending.id in ev_ids  # still pointed at by an undelivered outbox row
    assert recent.id in ev_ids and not ({e.id for e in old_plain} & ev_ids)
    assert r.events == 250 + 3  # b's old events and a's three freed ones (the enrolment notes are recent)
    assert {w.delivery_id for w in s.scalars(select(WebhookDelivery))} == {"new"}

    again = retention.prune(s, CFG, now=NOW)
    assert again.total() == 0  # idempotent: a second instance running it finds nothing more


def test_prune_keeps_everything_when_retention_is_off(session: Session) -> None:
    a = _node(session, "dpu-a")
    for _ in range(5):
        _event(session, a, OLD)
    session.commit()
    off = RetentionConfig(event_days=0, outbox_days=0, lease_days=0, webhook_days=0, session_days=0)
    assert retention.prune(session, off, now=NOW).total() == 0
    assert session.scalar(select(func.count()).select_from(Event)) == 6
