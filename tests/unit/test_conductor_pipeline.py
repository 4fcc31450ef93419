"""What a conductor pass costs and what it waits for, at storm scale: a pass decides again only the
nodes whose row (or a host's DPUs) changed or whose due time came, and the service's passes hand BMC
steps to a long-lived pool instead of waiting for them. In-memory BMCs (bootsvc.power.fake)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import Clock, apply_triggers, make_db, site_config, state, wait_for
from helpers.conductor import dpus_booting as booting
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import lifecycle, metrics
from bootsvc.conductor import DECISION_TTL_SECONDS, QUEUE_PER_WORKER, Conductor
from bootsvc.config import Config
from bootsvc.models import Node
from bootsvc.power.base import BootTarget
from bootsvc.power.fake import FakePowerDriver, fake_for, register_fake, reset_fakes
from bootsvc.states import Trigger


def dpus_booting(tmp_path: Path, count: int) -> tuple[Config, sessionmaker[Session], list[int]]:
    """``count`` stand-alone DPUs provisioned (helpers.conductor.dpus_booting) on a file SQLite DB;
    their deadline (60 s) comes before a cached decision's time to live."""
    return booting(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, count,
                   conductor={"deadlines": {"dpu_booting": 60}})


def statements() -> float:
    return metrics.counters.get("bootsvc_db_statements_total")


def test_a_pass_rereads_only_what_changed_or_came_due(tmp_path: Path) -> None:
    cfg, sessions, ids = dpus_booting(tmp_path, 40)
    clock = Clock()
    cond = Conductor(cfg, sessions, name="c-test", clock=clock)
    wait_for(lambda: cond.run_once() == 0, 10, interval=0.0, what="every DPU powered on")
    # all 40 wait for their installer: a pass is one column scan, whatever the fleet
    before = statements()
    assert cond.run_once() == 0
    assert statements() - before == 1  # no row loaded, no fact gathered
    # one DPU moves (its installer called back): that one is decided again - its one-time boot is
    # consumed, the override goes
    with sessions() as s:
        n = s.get(Node, ids[7])
        assert n is not None
        lifecycle.apply(s, n, Trigger.INSTALL_STARTED, actor="test")
    assert cond.run_once() == 1
    assert fake_for("fake://d7").calls["clear_boot_override"] == 1
    assert sum(fake_for(f"fake://d{i}").calls["clear_boot_override"] for i in range(40)) == 1
    # the deadline is a due time: every cached "waiting" decision is taken again, the DPUs retried
    assert cfg.conductor.deadlines["dpu_booting"] + 1 < DECISION_TTL_SECONDS
    clock.jump(cfg.conductor.deadlines["dpu_booting"] + 1)
    cond.run_once()
    with sessions() as s:
        attempts = dict(s.execute(select(Node.id, Node.attempts).where(Node.state == "dpu_booting")).all())
    assert len(attempts) == 39 and set(attempts.values()) == {1}


class Gate(FakePowerDriver):
    """A BMC that answers boot_once only when the test opens the gate (a slow BMC)."""

    def __init__(self, address: str) -> None:
        super().__init__(address, dpu=False)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def boot_once(self, *a: Any, **kw: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(30)
        return super().boot_once(*a, **kw)


def test_pipelined_passes_go_on_while_a_slow_bmc_answers(tmp_path: Path) -> None:
    cfg, sessions, ids = dpus_booting(tmp_path, 3)
    slow = register_fake(Gate("fake://d0"))
    cond = Conductor(cfg, sessions, name="c-test")
    cond.pipelined = True
    try:
        cond.run_once()  # hands the three steps to the pool, returns without waiting for them
        assert slow.entered.wait(10)
        fast = [x for x in ids if x != ids[0]]
        wait_for(lambda: all(_powered(sessions, x) for x in fast), 10, cond.run_once, what="fast DPUs booted")
        # passes while d0's BMC hangs: d0 is in flight, never handed out twice
        for _ in range(3):
            cond.run_once()
        assert state(sessions, ids[0]) == "dpu_booting" and not _powered(sessions, ids[0])
        slow.gate.set()
        wait_for(lambda: _powered(sessions, ids[0]), 10, cond.run_once, what="d0 booted")
    finally:
        slow.gate.set()
        cond.close()
    assert slow.calls["boot_once"] == 1 and slow.calls["power_on"] == 1
    with sessions() as s:  # every claim given back in the step's own commit
        assert s.scalars(select(Node.claimed_by).where(Node.claimed_by.is_not(None))).all() == []


def _powered(sessions: sessionmaker[Session], node_id: int) -> bool:
    with sessions() as s:
        n = s.get(Node, node_id)
        return bool(n is not None and n.boot_override_set)


def test_a_pass_fills_the_pool_and_queue_and_a_low_pool_wakes_the_next_pass(tmp_path: Path) -> None:
    """The pass loop must not bound BMC steps per second: one pass claims QUEUE_PER_WORKER steps per
    worker (running plus queued), and only a pool that ran low (not every step's end) wakes the loop."""
    cfg, sessions, ids = dpus_booting(tmp_path, 40)
    gates = [register_fake(Gate(f"fake://d{i}")) for i in range(40)]
    workers = cfg.orchestration.workers
    cond = Conductor(cfg, sessions, name="c-test")
    cond.pipelined = True
    try:
        handed = cond.run_once()
        assert handed == QUEUE_PER_WORKER * workers < 40  # not 2 per worker: the queue stays fed
        wait_for(lambda: sum(g.entered.is_set() for g in gates) == workers, 10, what="every worker busy")
        assert not cond.wake.is_set()
        first = next(g for g in gates if g.entered.is_set())
        first.gate.set()  # one step ends, the pool is far from low: no pass for it
        wait_for(lambda: len(cond._running) == handed - 1, 10, what="one step ended")
        assert not cond.wake.is_set()
        for g in gates:
            g.gate.set()
        assert cond.wake.wait(10)  # the pool ran low
        wait_for(lambda: sum(_powered(sessions, x) for x in ids) == handed, 10, what="the handed steps done")
        assert cond.run_once() == 40 - handed
        wait_for(lambda: all(_powered(sessions, x) for x in ids), 10, what="all booted")
    finally:
        for g in gates:
            g.gate.set()
        cond.close()
    assert all(g.calls["boot_once"] == 1 for g in gates)


def test_work_in_flight_gets_the_pool_before_new_power_ons(tmp_path: Path) -> None:
    """Depth first: a DPU whose consumed boot override must be cleared is not held back behind a
    storm of DPU power-ons that fill the pass's BMC places (it has the highest id and the latest state
    entry: neither id nor age order would pick it)."""
    cfg, sessions, ids = dpus_booting(tmp_path, 40)
    last = ids[-1]
    with sessions() as s:
        n = s.get(Node, last)
        assert n is not None
        lifecycle.apply(s, n, Trigger.INSTALL_STARTED, actor="test")
        n.boot_override_set = True
        s.commit()
    fake_for(f"fake://d{len(ids) - 1}").boot_once(BootTarget.PXE)
    cond = Conductor(cfg, sessions, name="c-test")
    assert cond.run_once() == 2 * cfg.orchestration.workers < len(ids)
    with sessions() as s:
        n = s.get(Node, last)
        assert n is not None and n.state == "dpu_installing" and not n.boot_override_set


def test_a_step_queued_past_half_its_lease_acts_only_if_it_still_holds_the_claim(tmp_path: Path) -> None:
    cfg, sessions, ids = dpus_booting(tmp_path, 2)
    mine, other = Conductor(cfg, sessions, name="c-mine"), Conductor(cfg, sessions, name="c-other")
    assert mine.claim_many(ids) == set(ids)
    with sessions() as s:  # d0's claim ran out while it waited in the queue; another conductor took it
        s.execute(update(Node).where(Node.id == ids[0]).values(claim_expires=datetime.now(UTC) - timedelta(seconds=1)))
        s.commit()
    assert other.claim(ids[0])
    long_ago = time.monotonic() - mine.lease.total_seconds()
    mine._pooled_step(ids[0], long_ago)
    mine._pooled_step(ids[1], long_ago)  # still its own: renewed, then the step runs
    assert not _powered(sessions, ids[0]) and fake_for("fake://d0").calls.get("boot_once", 0) == 0
    assert _powered(sessions, ids[1])
    with sessions() as s:
        assert s.scalar(select(Node.claimed_by).where(Node.id == ids[0])) == "c-other"


def test_a_pass_does_not_wait_for_database_only_steps(tmp_path: Path) -> None:
    """A database-only step (here a deadline's retry-in-place transition) waits on the database's one
    writer, not on a BMC: run in the pass, it held back the feeding of the BMC pool (10k storm: the pass
    thread 43 % in such flushes, the BMC pool idle). The service's pass hands it to its own thread."""
    cfg, sessions, ids = dpus_booting(tmp_path, 6)
    late = ids[0]
    with sessions() as s:
        s.execute(update(Node).where(Node.id == late).values(deadline=datetime.now(UTC) - timedelta(seconds=1)))
        s.commit()
    cond = Conductor(cfg, sessions, name="c-test")
    cond.pipelined = True
    gate, entered = threading.Event(), threading.Event()
    real = cond._claimed_step

    def held(node_id: int) -> int:
        if node_id == late:  # the database-only step: held as if behind the writer lock
            entered.set()
            assert gate.wait(20)
        return real(node_id)

    cond._claimed_step = held  # type: ignore[method-assign]
    passed = threading.Event()
    try:
        threading.Thread(target=lambda: (cond.run_once(), passed.set()), daemon=True).start()
        assert entered.wait(10), "the late DPU's timeout is a database-only step of this pass"
        assert passed.wait(10), "the pass waited for a database-only step"
        wait_for(lambda: all(_powered(sessions, x) for x in ids[1:]), 10, what="the BMC steps ran meanwhile")
        assert state(sessions, late) == "dpu_booting" and not _powered(sessions, late)
        gate.set()
        wait_for(lambda: late not in cond._running, 10, what="the database-only step ended")
        with sessions() as s:
            n = s.get(Node, late)
            assert n is not None and n.attempts == 1 and n.claimed_by is None  # retried in place, claim given back
    finally:
        gate.set()
        cond.close()


def test_database_only_steps_are_bounded_and_work_in_flight_goes_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm's first pass finds every host provisioning its DPUs (database-only steps, new work):
    queued all at once in front of a DPU waiting for its policy, that DPU waited minutes (a 10k storm:
    0 deployed after 227 s). The pass claims at most DB_STEPS_IN_FLIGHT, work in flight first."""
    from helpers.conductor import enroll_machine

    from bootsvc import conductor as conductor_mod

    reset_fakes()
    cfg = site_config(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path)
    sessions = make_db(cfg)
    pairs = [enroll_machine(sessions, f"m{i}", host_bmc=f"fake://h{i}", dpu_bmc=f"fake://d{i}", index=i + 1)
             for i in range(5)]
    ready_dpu = pairs[4][1]  # the last enrolled: neither id nor age order would pick it first
    apply_triggers(sessions, ready_dpu, Trigger.PROVISION, Trigger.INSTALL_STARTED, Trigger.INSTALL_DONE,
                   Trigger.AGENT_CHECKIN)
    for host, _dpu in pairs[:4]:
        apply_triggers(sessions, host, Trigger.PROVISION)  # each now provisions its DPU: new work
    monkeypatch.setattr(conductor_mod, "DB_STEPS_IN_FLIGHT", 2)
    cond = Conductor(cfg, sessions, name="c-test")
    cond.pipelined = True
    gate, order = threading.Event(), []
    real = cond._claimed_step

    def held(node_id: int) -> int:
        order.append(node_id)
        assert gate.wait(20)
        return real(node_id)

    cond._claimed_step = held  # type: ignore[method-assign]
    try:
        assert state(sessions, ready_dpu) == "dpu_ready"
        assert cond.run_once() == 2  # not 5: the rest wait for the next pass
        wait_for(lambda: len(order) == 2, 10, what="both database-step threads started")
        assert ready_dpu in order  # the policy hand-out is not behind the provisions
        gate.set()
        wait_for(lambda: not cond._running, 10, what="the two steps ended")
        assert state(sessions, ready_dpu) == "policy_pending"
    finally:
        gate.set()
        cond.close()
