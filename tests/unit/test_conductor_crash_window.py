"""A conductor that stops between sending a power-on and booking it (kill -9, database lost): the
conductor that takes the step over must not send the power-on again (the storm's kill -9 runs count
BMC actions sent twice). In-memory BMCs (bootsvc.power.fake) count every call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import make_db, site_config, state, wait_for
from sqlalchemy import select

from bootsvc.conductor import Conductor
from bootsvc.inventory import NicSpec, NodeSpec, enroll
from bootsvc.models import Event, Node
from bootsvc.power.base import PowerState
from bootsvc.power.fake import FakePowerDriver, register_fake, reset_fakes
from bootsvc.states import Trigger


class Stopped(Exception):
    """The conductor's process died here."""


def dpu_booting(tmp_path: Path) -> tuple[Any, Any, int, FakePowerDriver]:
    reset_fakes()
    cfg = site_config(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path)
    sessions = make_db(cfg)
    drv = register_fake(FakePowerDriver("fake://d1", dpu=False))
    with sessions() as s:
        enroll(s, [NodeSpec(name="d1", kind="dpu", serial="MT-d1", bmc_address="fake://d1", bmc_driver="fake",
                            provision_method="pxe", nics=[NicSpec("02:00:00:00:00:d1", "oob")])], actor="test")
        n = s.scalar(select(Node).where(Node.name == "d1"))
        assert n is not None
        from bootsvc import lifecycle

        lifecycle.apply(s, n, Trigger.PROVISION, actor="test")
        return cfg, sessions, n.id, drv


def power_ons(drv: FakePowerDriver) -> int:
    return drv.calls["power_on"] + drv.calls["reset"] + drv.calls["power_cycle"]


@pytest.mark.parametrize("dies_after", ["power_on", "boot_once"])
def test_the_step_taken_over_sends_the_power_on_once(tmp_path: Path, dies_after: str) -> None:
    cfg, sessions, dpu, drv = dpu_booting(tmp_path)
    assert state(sessions, dpu) == "dpu_booting"
    first = Conductor(cfg, sessions, name="c-dies")
    real = getattr(drv, dies_after)

    def then_die(*a: Any, **kw: Any) -> Any:
        real(*a, **kw)
        raise Stopped  # nothing after this call is booked

    setattr(drv, dies_after, then_die)
    first.run_once()
    setattr(drv, dies_after, real)
    sent_before = power_ons(drv)
    assert sent_before == (1 if dies_after == "power_on" else 0)
    assert drv.power_state() is (PowerState.ON if dies_after == "power_on" else PowerState.OFF)

    second = Conductor(cfg, sessions, name="c-takes-over")

    def booked() -> bool:
        with sessions() as s:
            n = s.get(Node, dpu)
            return n is not None and bool(n.boot_override_set)

    wait_for(booked, 10, second.run_once, interval=0.0, what="the step booked done")
    second.run_once()  # and nothing more to do for the BMC
    assert power_ons(drv) == 1  # sent once, whichever conductor sent it
    with sessions() as s:
        n = s.get(Node, dpu)
        assert n is not None and n.boot_override_set and n.action_key and not n.action_key.endswith("~sent")
        evs = list(s.scalars(select(Event.trigger).where(Event.node_id == dpu, Event.trigger == "bmc_boot_network")))
    assert evs == ["bmc_boot_network"]
    reset_fakes()
