"""lifecycle.apply: events, deadlines, hints, attempts, and optimistic-lock conflicts (SQLite)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from helpers.sql import statements
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

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


def _db_with_dpu(url: str, name: str) -> tuple[Engine, sessionmaker[Session]]:
    """A fresh database at ``url`` holding one enrolled DPU ``name``: (engine, session factory)."""
    eng = db.make_engine(url)
    Base.metadata.create_all(eng)
    sessions = db.session_factory(eng)
    with sessions() as s:
        inventory.enroll(s, [inventory.NodeSpec(name=name, kind="dpu", serial=f"BF-{name}")], actor="test")
    return eng, sessions


def _verbs(sent: list[str], words: int = 1) -> list[str]:
    """Each statement's first ``words`` words, upper-cased: what kind of statement went out."""
    return [" ".join(x.split()[:words]).upper() for x in sent]


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


def test_a_transition_costs_two_statements_and_a_subscriber_two_more(session: Session) -> None:
    """The node's versioned UPDATE and the event's INSERT (which reads the active subscribers in its
    RETURNING); with a subscriber, its targets with the node's last seq and the outbox INSERT."""
    from bootsvc.models import Outbox, Subscriber

    with statements(session.get_bind()) as sent:
        n = node(session)
        sent.clear()
        ev = lifecycle.apply(session, n, Trigger.PROVISION, actor="t", now=NOW)
        assert _verbs(sent) == ["UPDATE", "INSERT"] and ev.id is not None
        stored = session.get(Event, ev.id)
        assert stored is not None and (stored.trigger, stored.to_state) == ("provision", "dpu_booting")
        session.add(Subscriber(name="s", url="http://127.0.0.1:1/x", secret_ref="env:X"))
        session.commit()
        sent.clear()
        lifecycle.apply(session, n, Trigger.INSTALL_STARTED, actor="t", now=NOW)
        assert _verbs(sent) == ["UPDATE", "INSERT", "SELECT", "INSERT"]
        sent.clear()
        lifecycle.record(session, n, "bmc_power_on", actor="t", now=NOW)
        assert _verbs(sent) == ["UPDATE", "INSERT"]
    assert [o.seq for o in session.scalars(select(Outbox))] == [1]


def test_outbox_rows_and_their_sequence_on_every_database(any_db_url: str) -> None:
    """The event's INSERT ... RETURNING (id, active subscribers) and the outbox's seq search run on
    SQLite and PostgreSQL alike."""
    from bootsvc.models import Outbox, Subscriber

    eng = db.make_engine(any_db_url)
    Base.metadata.create_all(eng)
    sessions = db.session_factory(eng)
    with sessions() as s:
        inventory.enroll(s, [inventory.NodeSpec(name="dpu8", kind="dpu", serial="BF-8")], actor="test")
        n = s.scalars(select(Node).where(Node.name == "dpu8")).one()
        lifecycle.apply(s, n, Trigger.PROVISION, actor="c")
        s.add(Subscriber(name="s8", url="http://127.0.0.1:1/x", secret_ref="env:X"))
        s.commit()
        ev = lifecycle.apply(s, n, Trigger.INSTALL_STARTED, actor="c")
        lifecycle.apply(s, n, Trigger.INSTALL_DONE, actor="c")
        rows = s.scalars(select(Outbox).where(Outbox.node_id == n.id).order_by(Outbox.seq)).all()
        assert [(r.seq, r.payload["seq"], r.payload["to_state"]) for r in rows] == [
            (1, 1, "dpu_installing"), (2, 2, rows[1].payload["to_state"])]
        assert rows[0].event_id == ev.id and s.get(Event, ev.id) is not None
    eng.dispose()


def test_note_books_values_in_its_row_lock_on_every_database(any_db_url: str) -> None:
    """record(values=...): the event and the node's bookkeeping columns in one UPDATE (the row lock),
    no version bump; a timezone-aware datetime and NULL round-trip; state and version are refused."""
    eng, sessions = _db_with_dpu(any_db_url, "dpu8")
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "dpu8")).one()
        version = n.version
        with statements(eng) as sent:
            ev = lifecycle.record(s, n, "bmc_clear_boot", actor="conductor", detail={"boot_override": "None"},
                                  values={"action_key": "k1", "next_check_at": NOW, "boot_override_set": False,
                                          "bmc_task": None})
        assert ev.trigger == "bmc_clear_boot" and (ev.from_state, ev.to_state) == ("registered", "registered")
    assert _verbs(sent) == ["UPDATE", "INSERT"]  # + the commit: nothing else
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "dpu8")).one()
        assert (n.action_key, n.boot_override_set, n.bmc_task, n.version) == ("k1", False, None, version)
        assert n.next_check_at is not None and n.next_check_at.replace(tzinfo=dt.UTC) == NOW
        assert [e.trigger for e in s.scalars(select(Event).where(Event.node_id == n.id).order_by(Event.id))] == [
            "enrolled", "bmc_clear_boot"]
        for bad in ({"state": "deployed"}, {"version": 9}, {"no_such_column": 1}):
            with pytest.raises(ValueError, match="not a bookkeeping column"):
                lifecycle.record(s, n, "x", actor="t", values=bad)
    eng.dispose()


def test_note_gives_a_claim_back_only_to_its_holder_on_every_database(any_db_url: str) -> None:
    """record(release_claim=name): the named conductor's claim goes back in the note's UPDATE; a claim
    another conductor took (the first one's expired) stays theirs."""
    eng = db.make_engine(any_db_url)
    Base.metadata.create_all(eng)
    sessions = db.session_factory(eng)
    with sessions() as s:
        inventory.enroll(s, [inventory.NodeSpec(name="a", kind="dpu", serial="BF-a"),
                             inventory.NodeSpec(name="b", kind="dpu", serial="BF-b")], actor="test")
        for name, holder in (("a", "c1"), ("b", "c2")):
            n = s.scalars(select(Node).where(Node.name == name)).one()
            n.claimed_by, n.claim_expires = holder, NOW
        s.commit()
    with sessions() as s:
        for name in ("a", "b"):
            n = s.scalars(select(Node).where(Node.name == name)).one()
            lifecycle.record(s, n, "bmc_clear_boot", actor="conductor", values={"action_failures": 0},
                             release_claim="c1", commit=False)
        s.commit()
    with sessions() as s:
        got = {n.name: (n.claimed_by, n.claim_expires is None) for n in s.scalars(select(Node))}
    assert got == {"a": (None, True), "b": ("c2", False)}
    eng.dispose()


def test_apply_is_one_versioned_update_and_leaves_the_node_clean_on_every_database(any_db_url: str) -> None:
    """apply's Core UPDATE does what the ORM flush did: version + 1 under ``WHERE version = :seen``,
    only the changed columns, nothing at all when nothing changes; the loaded node holds the written
    values as committed (a later ORM change of it flushes against the new version), and a node moved
    by another session meanwhile is a TransitionConflict that writes nothing."""
    eng, sessions = _db_with_dpu(any_db_url, "dpu7")
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "dpu7")).one()
        v0 = n.version
        with statements(eng) as sql:
            lifecycle.apply(s, n, Trigger.PROVISION, actor="c", now=NOW, deadlines={"dpu_booting": 60})
            assert _verbs(sql, 3) == ["UPDATE NODES SET", "INSERT INTO EVENTS"]
            assert (n.state, n.version, n.attempts) == ("dpu_booting", v0 + 1, 0) and n not in s.dirty
            sql.clear()
            lifecycle.apply(s, n, Trigger.INSTALL_STARTED, actor="c", now=NOW)
            lifecycle.apply(s, n, Trigger.INSTALL_PROGRESS, actor="c", now=NOW)  # nothing changes: no UPDATE
            assert _verbs(sql, 3) == ["UPDATE NODES SET", "INSERT INTO EVENTS", "INSERT INTO EVENTS"]
        n.image = "bf-os-2"  # an ORM change after apply flushes against the version apply wrote
        s.commit()
        other = sessions()
        theirs = other.scalars(select(Node).where(Node.name == "dpu7")).one()
        lifecycle.apply(other, theirs, Trigger.INSTALL_FAILED, actor="other", error="boom")
        other.close()
        with pytest.raises(lifecycle.TransitionConflict, match="changed while applying"):
            lifecycle.apply(s, n, Trigger.INSTALL_DONE, actor="c")
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "dpu7")).one()
        assert (n.state, n.image, n.last_error, n.version) == ("dpu_install_failed", "bf-os-2", "boom", v0 + 4)
        assert n.deadline is None and n.hint
        assert [e.trigger for e in s.scalars(select(Event).where(Event.node_id == n.id).order_by(Event.id))] == [
            "enrolled", "provision", "install_started", "install_progress", "install_failed"]
    eng.dispose()


def test_apply_books_values_in_the_transitions_update_on_every_database(any_db_url: str) -> None:
    """apply(values=...): bookkeeping columns ride in the transition's versioned UPDATE (one version
    step, one statement); a transition that changes no column writes them without a version bump;
    the transition's own columns are refused."""
    eng, sessions = _db_with_dpu(any_db_url, "dpu6")
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "dpu6")).one()
        v0 = n.version
        with statements(eng) as sql:
            lifecycle.apply(s, n, Trigger.PROVISION, actor="c", commit=False,
                            values={"action_failures": 0, "next_check_at": None, "bmc_task": "t1"})
            lifecycle.apply(s, n, Trigger.INSTALL_STARTED, actor="c", commit=False)
            lifecycle.apply(s, n, Trigger.INSTALL_PROGRESS, actor="c", commit=False,  # no column changes
                            values={"next_check_at": NOW, "action_failures": 2})
            s.commit()
        assert _verbs(sql) == ["UPDATE", "INSERT", "UPDATE", "INSERT", "UPDATE", "INSERT"]
        for bad in ({"state": "deployed"}, {"deadline": NOW}, {"version": 3}, {"claimed_by": "x"}):
            with pytest.raises(ValueError, match="not a bookkeeping column"):
                lifecycle.apply(s, n, Trigger.INSTALL_PROGRESS, actor="c", values=bad)
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "dpu6")).one()
        assert (n.state, n.version, n.bmc_task, n.action_failures) == ("dpu_installing", v0 + 2, "t1", 2)
        assert n.next_check_at is not None and n.next_check_at.replace(tzinfo=dt.UTC) == NOW
    eng.dispose()
