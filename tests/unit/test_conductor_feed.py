"""The conductor's change feed (``bootsvc.conductor_scan``): a pass reads the node rows changed since
its last one (``nodes.change_seq``, bumped by every UPDATE), not every working node; what the feed
cannot see - another conductor's claim running out, a write around SQLAlchemy, a PostgreSQL commit
later than its sequence - is caught by the claim's expiry, the periodic full scan and the lag window.
In-memory BMCs (bootsvc.power.fake)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.conductor import Clock, dpus_booting, make_db, site_config, state, wait_for
from sqlalchemy import update

from bootsvc import conductor_scan
from bootsvc.conductor import Conductor
from bootsvc.models import Node
from bootsvc.power.fake import FakePowerDriver, fake_for, register_fake, reset_fakes
from bootsvc.states import Trigger


def boots(i: int) -> int:
    return fake_for(f"fake://d{i}").calls.get("boot_once", 0)


def settled(cond: Conductor) -> None:
    """Every DPU powered on and waiting for its installer: a pass finds nothing to do."""
    wait_for(lambda: cond.run_once() == 0, 10, interval=0.0, what="every DPU powered on")


def test_a_pass_reads_only_the_rows_changed_since_the_last_one(tmp_path: Path) -> None:
    cfg, sessions, ids = dpus_booting(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, 40)
    cond = Conductor(cfg, sessions, name="c-test", clock=Clock())
    settled(cond)
    assert cond.run_once() == 0 and cond.scan_rows == 0  # 40 working nodes, none changed: no row read
    # a bookkeeping write without a version bump (Core UPDATE, like the conductor's own ``_book``): the
    # DPU's step is to be done again - seen by the next pass, and only that row is read
    with sessions() as s:
        s.execute(update(Node).where(Node.id == ids[7]).values(action_key=None))
        s.commit()
    assert [boots(i) for i in (6, 7, 8)] == [1, 1, 1]
    assert cond.run_once() == 1
    assert [boots(i) for i in (6, 7, 8)] == [1, 2, 1]
    # its step's own writes (claim, outcome, claim given back) are read once more, then nothing
    assert cond.run_once() == 0 and cond.scan_rows == 1
    assert cond.run_once() == 0 and cond.scan_rows == 0


def test_a_dpu_that_changed_brings_its_host_into_the_pass(tmp_path: Path) -> None:
    from helpers.conductor import apply_triggers, enroll_machine

    reset_fakes()
    cfg = site_config(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, fabric={"gate_boot": False})
    sessions = make_db(cfg)
    host, dpu = enroll_machine(sessions, "m0", host_bmc="fake://h0", dpu_bmc="fake://d0")
    register_fake(FakePowerDriver("fake://h0", dpu=False))
    register_fake(FakePowerDriver("fake://d0", dpu=True))
    apply_triggers(sessions, host, Trigger.PROVISION)
    cond = Conductor(cfg, sessions, name="c-test", clock=Clock())
    wait_for(lambda: cond.run_once() == 0, 10, interval=0.0, what="the DPU powered on, the host waits")
    with sessions() as s:
        assert s.get(Node, dpu).state == "dpu_booting"  # type: ignore[union-attr]
    apply_triggers(sessions, dpu, Trigger.INSTALL_STARTED, Trigger.INSTALL_DONE, Trigger.AGENT_CHECKIN)
    wait_for(lambda: cond.run_once() == 0 and state(sessions, dpu) == "policy_pending", 10, interval=0.0,
             what="the DPU handed its policy")
    assert cond.run_once() == 0 and cond.scan_rows == 0
    apply_triggers(sessions, dpu, Trigger.POLICY_APPLIED)
    # the DPU applied its policy: its row, and its host's (whose own row did not change, joined with
    # its DPU: one row) are read; the host is decided again and boots
    assert cond.run_once() == 1 and cond.scan_rows == 2
    wait_for(lambda: cond.run_once() == 0 and fake_for("fake://h0").calls.get("power_on", 0) == 1, 10,
             interval=0.0, what="the host powered on")


def test_another_conductors_claim_that_runs_out_is_taken_over_without_a_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conductor killed mid-step writes nothing more: its claim only runs out. The survivor, which
    saw the claim in the feed, looks at the node again when it expires - not at the next full scan."""
    monkeypatch.setattr(conductor_scan, "FULL_SCAN_SECONDS", 3600.0)
    cfg, sessions, ids = dpus_booting(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, 6,
                                      orchestration={"claim_seconds": 5})
    clock = Clock()
    dead = Conductor(cfg, sessions, name="c-dead", clock=clock)
    live = Conductor(cfg, sessions, name="c-live", clock=clock)
    live.run_once()  # the first pass (a full scan) boots all six
    with sessions() as s:  # a deadline retry is due on d2 (its step must be done again)...
        s.execute(update(Node).where(Node.id == ids[2]).values(action_key=None))
        s.commit()
    assert dead.claim(ids[2])  # ...and the other conductor claims it, then dies
    assert live.run_once() == 0 and ids[2] in live._held and boots(2) == 1
    clock.jump(3)
    assert live.run_once() == 0 and boots(2) == 1  # still held
    clock.jump(3)
    assert live.run_once() == 1 and boots(2) == 2  # expired: taken over


def test_the_full_scan_catches_a_write_the_feed_cannot_see(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, sessions, ids = dpus_booting(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, 6)
    cond = Conductor(cfg, sessions, name="c-test", clock=Clock())
    settled(cond)
    with sessions() as s:  # a write that keeps change_seq (as a tool writing around SQLAlchemy would)
        s.execute(update(Node).where(Node.id == ids[3]).values(action_key=None, change_seq=Node.change_seq))
        s.commit()
    assert cond.run_once() == 0 and boots(3) == 1  # the feed cannot see it
    monkeypatch.setattr(conductor_scan, "FULL_SCAN_SECONDS", 0.0)
    cond._full_at = 0.0
    assert cond.run_once() == 1 and boots(3) == 2 and cond.scan_rows == 6


def test_postgresql_commits_out_of_sequence_order_are_read_in_the_lag_window(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a writer that computed its change_seq first may commit last (and two may compute the
    same value). The feed re-reads PG_LAG_SECONDS back, so a pass after the late commit still sees it."""
    monkeypatch.setattr(conductor_scan, "FULL_SCAN_SECONDS", 3600.0)
    cfg, sessions, ids = dpus_booting(pg_url, tmp_path, 4)
    cond = Conductor(cfg, sessions, name="c-test", clock=Clock())
    settled(cond)
    late, early = sessions(), sessions()
    try:
        late.execute(update(Node).where(Node.id == ids[1]).values(action_key=None))  # seq n+1, not committed
        early.execute(update(Node).where(Node.id == ids[2]).values(action_key=None))  # seq n+1 as well
        early.commit()
        assert cond.run_once() == 1 and boots(2) == 2  # the pass's mark is now at least n+1
        late.commit()
    finally:
        late.close()
        early.close()
    assert cond.run_once() == 1 and boots(1) == 2
