"""Two processes race to transition the same node on a real PostgreSQL: exactly one wins."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Barrier

import pytest
from sqlalchemy import select

from bootsvc import db, inventory, lifecycle
from bootsvc.models import Event, Node


def _racer(url: str, trigger: str, barrier: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    s = db.session_factory(db.make_engine(url))()
    n = s.scalars(select(Node).where(Node.name == "dpu-race")).one()  # both read version 1...
    barrier.wait(timeout=30)  # ...then both try to write
    try:
        lifecycle.apply(s, n, trigger, actor=f"racer-{trigger}")
        out.put(("won", trigger))
    except lifecycle.TransitionConflict:
        out.put(("conflict", trigger))


@pytest.mark.postgres
@pytest.mark.parametrize("round_", range(3))
def test_exactly_one_of_two_processes_wins(pg_url: str, round_: int) -> None:
    db.upgrade(pg_url)
    s = db.session_factory(db.make_engine(pg_url))()
    inventory.enroll(s, [inventory.NodeSpec(name="dpu-race", kind="dpu", serial="BF-R")], actor="test")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(pg_url, t, barrier, out)) for t in ("provision", "maintenance")]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    outcomes = sorted(r[0] for r in results)
    assert outcomes == ["conflict", "won"], results
    winner = next(t for o, t in results if o == "won")
    s.expire_all()
    n = s.scalars(select(Node).where(Node.name == "dpu-race")).one()
    assert n.state == {"provision": "dpu_booting", "maintenance": "maintenance"}[winner]
    assert n.version == 2
    trans = s.scalars(select(Event).where(Event.node_id == n.id, Event.trigger != "enrolled")).all()
    assert [e.trigger for e in trans] == [winner]
    s.close()
