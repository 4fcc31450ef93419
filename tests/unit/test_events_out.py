"""Outgoing events: outbox rows written in the transition's transaction, signed POSTs, retries with
backoff, at-least-once and in order per node; a real loopback HTTP receiver checks signatures."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.conductor import apply_triggers, enroll_machine, make_db, site_config
from helpers.events import SECRET, Receiver
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import lifecycle
from bootsvc.events_out import Deliverer, backoff
from bootsvc.lab.bfbmc import free_port
from bootsvc.models import Node, Outbox, Subscriber
from bootsvc.states import IllegalTransition, Trigger


@pytest.fixture
def recv() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def env(tmp_path: Path) -> tuple[sessionmaker[Session], int, int]:
    (tmp_path / "sub.key").write_bytes(SECRET)
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path)
    sessions = make_db(cfg)
    host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b")
    return sessions, host, dpu


def subscribe(sessions: sessionmaker[Session], url: str, tmp: Path, name: str = "s1") -> None:
    with sessions() as s:
        s.add(Subscriber(name=name, url=url, secret_ref=f"file:{tmp}/sub.key", active=True))
        s.commit()


def test_outbox_row_per_transition_in_same_transaction(env: tuple[sessionmaker[Session], int, int],
                                                      tmp_path: Path) -> None:
    sessions, host, dpu = env
    subscribe(sessions, "http://127.0.0.1:1/none", tmp_path)
    apply_triggers(sessions, dpu, Trigger.PROVISION, Trigger.INSTALL_STARTED)
    with sessions() as s:
        rows = list(s.scalars(select(Outbox).where(Outbox.node_id == dpu).order_by(Outbox.seq)))
        assert [(r.seq, r.payload["to_state"]) for r in rows] == [(1, "dpu_booting"), (2, "dpu_installing")]
        # an illegal transition writes neither event nor outbox row
        n = s.get(Node, dpu)
        assert n is not None
        with pytest.raises(IllegalTransition):
            lifecycle.apply(s, n, Trigger.DPU_READY, actor="test")
        assert s.scalar(select(func.count()).select_from(Outbox)) == 2
        # a transition whose transaction is rolled back leaves no outbox row
        lifecycle.apply(s, n, Trigger.INSTALL_DONE, actor="test", commit=False)
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Outbox)) == 2
    # lifecycle.record (not a state change) is not published
    with sessions() as s:
        n = s.get(Node, host)
        assert n is not None
        lifecycle.record(s, n, "note", actor="test")
        assert s.scalar(select(func.count()).select_from(Outbox)) == 2


def test_delivery_signed_in_order_with_retries(env: tuple[sessionmaker[Session], int, int], tmp_path: Path,
                                               recv: Receiver) -> None:
    sessions, host, dpu = env
    subscribe(sessions, recv.url, tmp_path)
    apply_triggers(sessions, dpu, Trigger.PROVISION, Trigger.INSTALL_STARTED, Trigger.INSTALL_DONE)
    apply_triggers(sessions, host, Trigger.PROVISION)
    now = [dt.datetime.now(dt.UTC)]
    d = Deliverer(sessions, owner="t", backoff_base=10, backoff_max=100, clock=lambda: now[0])
    recv.statuses = [500]  # the first POST fails: that node's later events must wait
    d.run_once()
    got = [(x["node"]["name"], x["seq"], x["to_state"]) for x in recv.got]
    assert ("m1-dpu", 2, "dpu_installing") not in got and ("m1", 1, "host_waiting_dpu") in got
    with sessions() as s:
        failed = s.scalars(select(Outbox).where(Outbox.last_error.is_not(None))).one()
        assert failed.attempts == 1 and "HTTP 500" in (failed.last_error or "")
        assert failed.next_attempt_at.replace(tzinfo=dt.UTC) >= now[0] + dt.timedelta(seconds=10)
    d.run_once()  # backoff not over: nothing more
    assert len(recv.got) == 1
    now[0] += dt.timedelta(seconds=11)
    d.run_once()
    dpu_seq = [x["seq"] for x in recv.got if x["node"]["name"] == "m1-dpu"]
    assert dpu_seq == [1, 2, 3]
    assert recv.bad_sig == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.delivered_at.is_(None))) == 0
    assert all(x["_event"] == str(x["event_id"]) for x in recv.got)


def test_unreachable_subscriber_is_retried(env: tuple[sessionmaker[Session], int, int], tmp_path: Path) -> None:
    sessions, _host, dpu = env
    port = free_port(18100, 18149)  # nothing listens there
    subscribe(sessions, f"http://127.0.0.1:{port}/x", tmp_path)
    apply_triggers(sessions, dpu, Trigger.PROVISION)
    d = Deliverer(sessions, owner="t", timeout=1, backoff_base=0.01)
    assert d.run_once() == 0
    with sessions() as s:
        row = s.scalars(select(Outbox)).one()
        assert row.delivered_at is None and row.attempts == 1 and "POST failed" in (row.last_error or "")


def test_two_subscribers_each_get_everything(env: tuple[sessionmaker[Session], int, int], tmp_path: Path,
                                            recv: Receiver) -> None:
    sessions, host, _dpu = env
    subscribe(sessions, recv.url, tmp_path, "a")
    subscribe(sessions, recv.url + "?b", tmp_path, "b")
    apply_triggers(sessions, host, Trigger.PROVISION)
    Deliverer(sessions, owner="t").run_once()
    assert len(recv.got) == 2 and {x["seq"] for x in recv.got} == {1}


def test_backoff_grows_and_caps() -> None:
    assert [backoff(2, a, 30) for a in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]


def test_seq_is_per_node_across_subscribers_and_found_through_an_index(
        env: tuple[sessionmaker[Session], int, int], tmp_path: Path) -> None:
    """A subscriber added later continues the node's sequence (the receiver's order key), and the
    node's last seq is searched through the unique (subscriber, node, seq) index, never a table scan
    (a scan cost 23.6 ms a transition at 206,000 outbox rows)."""
    from bootsvc import events_out

    sessions, _host, dpu = env
    subscribe(sessions, "http://127.0.0.1:1/a", tmp_path, "a")
    apply_triggers(sessions, dpu, Trigger.PROVISION, Trigger.INSTALL_STARTED)
    subscribe(sessions, "http://127.0.0.1:1/b", tmp_path, "b")
    apply_triggers(sessions, dpu, Trigger.INSTALL_DONE)
    with sessions() as s:
        rows = [(r.subscriber_id, r.seq, r.payload["seq"], r.payload["to_state"])
                for r in s.scalars(select(Outbox).where(Outbox.node_id == dpu).order_by(Outbox.id))]
        a, b = (s.scalar(select(Subscriber.id).where(Subscriber.name == x)) for x in ("a", "b"))
        assert rows[:2] == [(a, 1, 1, "dpu_booting"), (a, 2, 2, "dpu_installing")]
        assert sorted(rows[2:]) == sorted([(a, 3, 3, rows[2][3]), (b, 3, 3, rows[2][3])])
        sql = str(events_out._TARGETS.compile(s.get_bind(), compile_kwargs={"literal_binds": False}))
        plan = " | ".join(str(r[-1]) for r in s.connection().exec_driver_sql(
            "EXPLAIN QUERY PLAN " + sql.replace("?", str(dpu), 1)))
        assert "SCAN outbox" not in plan and "(subscriber_id=? AND node_id=?)" in plan, plan
