"""lifecycle.apply: events, deadlines, hints, attempts, and optimistic-lock conflicts (SQLite)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from bootsvc import db, inventory, lifecycle
from bootsvc.models import Base, Event, Node
from bootsvc.states import IllegalTransition, State, Trigger

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def session(tmp_path: Path) -> Session:
    eng = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(eng)
    s = db.session_factory(eng)()
    inventory.enroll(s, [inventory.NodeSpec(name="dpu1", kind="dpu", serial="BF-1",
                                            nics=[inventory.NicSpec("52:54:00:00:00:01", "oob")])], actor="test")
    return s


def node(s: Session) -> Node:
    n = s.scalars(select(Node).where(Node.name == "dpu1")).one()
    return n


def test_apply_writes_event_and_deadline(session: Session) -> None:
    n = node(session)
    ev = lifecycle.apply(session, n, Trigger.PROVISION, actor="tech:ana", detail={"why": "new rack"}, now=NOW,
                         deadlines={"dpu_booting": 60})
    assert (ev.from_state, ev.to_state, ev.trigger, ev.actor) == ("registered", "dpu_booting", "provision", "tech:ana")
    session.expire_all()
    n = node(session)
    assert n.state == "dpu_booting" and n.deadline is not None
    assert n.deadline.replace(tzinfo=dt.UTC) == NOW + dt.timedelta(seconds=60)
    evs = session.scalars(select(Event).where(Event.node_id == n.id).order_by(Event.id)).all()
    assert [e.trigger for e in evs] == ["enrolled", "provision"]


def test_timeouts_retry_then_fail_with_reason_and_hint(session: Session) -> None:
    n = node(session)
    lifecycle.apply(session, n, Trigger.PROVISION, actor="t", now=NOW)
    for i in range(2):
        lifecycle.apply(session, n, Trigger.TIMEOUT, actor="conductor", now=NOW + dt.timedelta(minutes=i + 1),
                        max_attempts=3)
        assert n.state == "dpu_booting" and n.attempts == i + 1
    lifecycle.apply(session, n, Trigger.TIMEOUT, actor="conductor", max_attempts=3,
                    error="no installer callback within 900 s")
    assert n.state == State.DPU_INSTALL_FAILED and n.deadline is None
    assert n.last_error == "no installer callback within 900 s" and n.hint and "retry" in n.hint.lower()
    lifecycle.apply(session, n, Trigger.RETRY, actor="tech")
    assert n.state == "dpu_booting" and n.attempts == 0 and n.last_error is None


def test_illegal_transition_writes_nothing(session: Session) -> None:
    n = node(session)
    before = session.scalars(select(Event)).all()
    with pytest.raises(IllegalTransition, match=r"commands allowed now: maintenance, provision, retire\)"):
        lifecycle.apply(session, n, Trigger.INSTALL_DONE, actor="t")
    assert len(session.scalars(select(Event)).all()) == len(before) and n.state == "registered"


def test_concurrent_change_is_a_conflict(tmp_path: Path, session: Session) -> None:
    other = db.session_factory(session.get_bind())()  # type: ignore[arg-type]
    mine, theirs = node(session), other.scalars(select(Node).where(Node.name == "dpu1")).one()
    lifecycle.apply(other, theirs, Trigger.PROVISION, actor="b")
    with pytest.raises(lifecycle.TransitionConflict, match="changed while applying"):
        lifecycle.apply(session, mine, Trigger.MAINTENANCE, actor="a")
    session.expire_all()
    assert node(session).state == "dpu_booting"
    assert session.scalars(select(Event).where(Event.trigger == "maintenance")).all() == []


def test_note_records_the_state_it_is_written_against_not_a_stale_read(session: Session) -> None:
    other = db.session_factory(session.get_bind())()  # type: ignore[arg-type]
    mine = node(session)
    assert mine.state == "registered"  # this process read the node...
    theirs = other.scalars(select(Node).where(Node.name == "dpu1")).one()
    lifecycle.apply(other, theirs, Trigger.PROVISION, actor="conductor")  # ...another moved it on
    ev = lifecycle.record(session, mine, "bmc_power_cycle", actor="api")
    assert (ev.from_state, ev.to_state) == ("dpu_booting", "dpu_booting")
    session.expire_all()
    stored = session.scalars(select(Event).where(Event.trigger == "bmc_power_cycle")).one()
    assert stored.from_state == "dpu_booting"
    assert node(session).version == theirs.version  # a note is not a state change: no version bump
    other.close()


def test_note_state_is_current_on_every_database(any_db_url: str) -> None:
    eng = db.make_engine(any_db_url)
    Base.metadata.create_all(eng)
    sessions = db.session_factory(eng)
    with sessions() as s:
        inventory.enroll(s, [inventory.NodeSpec(name="dpu9", kind="dpu", serial="BF-9")], actor="test")
    a, b = sessions(), sessions()
    mine = a.scalars(select(Node).where(Node.name == "dpu9")).one()
    lifecycle.apply(b, b.scalars(select(Node).where(Node.name == "dpu9")).one(), Trigger.PROVISION, actor="c")
    assert lifecycle.record(a, mine, "bmc_power_on", actor="api").from_state == "dpu_booting"
    a.close()
    b.close()
    eng.dispose()
