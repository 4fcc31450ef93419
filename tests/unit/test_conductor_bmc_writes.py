"""The write transactions of the conductor's BMC steps (bootsvc/conductor_bmc.py) on a file SQLite
database, where every write transaction queues for the one write lock: a step writes its event and
its bookkeeping in one transaction (the bookkeeping in the event's row-lock UPDATE,
``lifecycle.record(values=...)``), and commits earlier only what must be durable before a BMC call -
the ``~sent`` marker of a power-on from Off, which carries a DPU's preflight note with it. Notes taken
before a BMC error are kept. In-memory BMCs (bootsvc.power.fake)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import apply_triggers, enroll_machine, make_db, site_config
from helpers.sql import statements
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc.conductor import Conductor
from bootsvc.models import Event, Node
from bootsvc.power.base import PowerState, RetryableBmcError
from bootsvc.power.fake import FakePowerDriver, register_fake, reset_fakes


@dataclass
class Site:
    sessions: sessionmaker[Session]
    cond: Conductor
    host: int
    dpu: int
    host_bmc: FakePowerDriver
    dpu_bmc: FakePowerDriver
    sql: list[str] = field(default_factory=list)  # every statement sent (helpers.sql.statements)
    commits: int = 0

    def step(self, node_id: int) -> tuple[int, list[str]]:
        """One claimed step, as the service runs it; (commits, write statements) of the step alone,
        without the claim's own UPDATE at its end when the conductor leaves it to the step's outcome
        (conductor_bmc.RELEASE_CLAIM): the claim is given back either way."""
        assert self.cond.claim(node_id)
        self.sql.clear()
        self.commits = 0
        assert self.cond.step(node_id, release=True) == 1
        assert self.node(node_id).claimed_by is None
        writes = [w for w in (x.split()[0].upper() for x in self.sql) if w in ("INSERT", "UPDATE", "DELETE")]
        return self.commits, writes[:-1] if writes[-2:] == ["INSERT", "UPDATE"] else writes

    def events(self, node_id: int) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Event.trigger).where(Event.node_id == node_id).order_by(Event.id)))

    def node(self, node_id: int) -> Node:
        with self.sessions() as s:
            n = s.get(Node, node_id)
            assert n is not None
            return n


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    reset_fakes()
    cfg = site_config(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path)
    sessions = make_db(cfg)
    host_bmc = register_fake(FakePowerDriver("fake://h1", dpu=False))
    dpu_bmc = register_fake(FakePowerDriver("fake://d1", dpu=True))
    host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://h1", dpu_bmc="fake://d1")
    engine = sessions.kw["bind"]
    with statements(engine) as sql:
        st = Site(sessions, Conductor(cfg, sessions, name="c1"), host, dpu, host_bmc, dpu_bmc, sql)

        def commit(_c: Any) -> None:
            st.commits += 1

        event.listen(engine, "commit", commit)
        try:
            yield st
        finally:
            event.remove(engine, "commit", commit)
    reset_fakes()


def test_a_pairs_bmc_steps_take_six_write_transactions(site: Site) -> None:
    """DPU network boot + power on from Off: the marker (with the preflight note) and the outcome, 2
    commits; clearing the override: 1; the same for the host (no preflight): 2 and 1. Each outcome is
    the row lock carrying the bookkeeping and the event: 2 writes, not 3 (+ the claim's release)."""
    seen_before_power_on: list[tuple[str | None, list[str]]] = []
    real = site.dpu_bmc.power_on

    def power_on(**kw: Any) -> None:  # what another process can read when the power-on goes out
        seen_before_power_on.append((site.node(site.dpu).action_key, site.events(site.dpu)))
        real(**kw)

    site.dpu_bmc.power_on = power_on  # type: ignore[method-assign]
    apply_triggers(site.sessions, site.dpu, "provision")
    commits, writes = site.step(site.dpu)
    assert (commits, writes) == (2, ["UPDATE", "INSERT", "UPDATE", "INSERT"])
    [(key, evs)] = seen_before_power_on
    assert key is not None and key.endswith("~sent") and evs[-1] == "dpu_checked"
    n = site.node(site.dpu)
    assert n.boot_override_set and n.action_key and not n.action_key.endswith("~sent") and n.claimed_by is None
    assert site.events(site.dpu)[-2:] == ["dpu_checked", "bmc_boot_network"]

    apply_triggers(site.sessions, site.dpu, "install_started")
    assert site.step(site.dpu) == (1, ["UPDATE", "INSERT"])
    assert not site.node(site.dpu).boot_override_set and site.events(site.dpu)[-1] == "bmc_clear_boot"

    apply_triggers(site.sessions, site.host, "provision", "dpu_ready")
    assert site.step(site.host) == (2, ["UPDATE", "UPDATE", "INSERT"])
    apply_triggers(site.sessions, site.host, "install_started")
    assert site.step(site.host) == (1, ["UPDATE", "INSERT"])
    n = site.node(site.host)
    assert not n.boot_override_set and n.claimed_by is None and n.action_failures == 0
    assert [e for e in site.events(site.host) if e.startswith("bmc_")] == ["bmc_boot_network", "bmc_clear_boot"]
    assert (site.dpu_bmc.calls["power_on"], site.host_bmc.calls["power_on"]) == (1, 1)


def test_what_the_bmc_said_before_an_error_is_kept(site: Site) -> None:
    """A DPU already on (no marker to commit): its preflight note waits for the outcome; the boot
    override then fails - the note is written anyway, before the error and its backoff."""
    site.dpu_bmc._state = PowerState.ON
    site.dpu_bmc.fail("boot_once", RetryableBmcError("BMC busy (HTTP 503)", bmc="fake://d1"))
    apply_triggers(site.sessions, site.dpu, "provision")
    site.step(site.dpu)
    assert site.events(site.dpu)[-2:] == ["dpu_checked", "bmc_error"]
    n = site.node(site.dpu)
    assert n.action_failures == 1 and n.next_check_at is not None and n.claimed_by is None
    assert site.dpu_bmc.calls["reset"] == 0
