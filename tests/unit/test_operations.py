"""bootsvc.operations: one rule per machine operation, refusals as codes each front door maps (HTTP status,
CLI exit code) without reading the message; the machine page's power read is bounded and cached."""

from __future__ import annotations

import threading
import time
import typing
from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import make_db, site_config

from bootsvc import cli as cli_mod
from bootsvc import inventory, operations
from bootsvc.models import Node
from bootsvc.power.base import PowerState, RetryableBmcError
from bootsvc.power.fake import FakePowerDriver
from bootsvc.states import Trigger
from bootsvc.web.auth import HTTP_STATUS, op_error


def test_every_code_has_one_http_status_and_one_exit_code() -> None:
    codes = set(typing.get_args(operations.Code))
    assert set(HTTP_STATUS) == codes
    assert {c: op_error(operations.OpError(c, "x")).status for c in codes} == {
        "invalid": 400, "forbidden": 403, "not_found": 404, "conflict": 409, "failed": 502}
    exits = {}
    for c in codes:
        with pytest.raises(SystemExit) as e:
            cli_mod.op_fail(operations.OpError(c, "x"))
        exits[c] = e.value.code
    assert exits == {"invalid": 2, "forbidden": 2, "not_found": 2, "conflict": 2, "failed": 1}
    with pytest.raises(SystemExit) as e:  # a lost race: trying again may work
        cli_mod.op_fail(operations.OpError("conflict", "x", retryable=True))
    assert e.value.code == 1


@pytest.fixture
def db(tmp_path: Path) -> Any:
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path)
    sessions = make_db(cfg)
    with sessions() as s:
        inventory.enroll(s, [
            inventory.NodeSpec(name="h1", kind="host", serial="H1",
                               nics=[inventory.NicSpec("02:00:00:00:00:01", "host-pf")],
                               bmc_address="fake://h1", bmc_driver="fake", tenant="acme"),
            inventory.NodeSpec(name="d1", kind="dpu", serial="D1", nics=[inventory.NicSpec("02:00:00:00:00:02", "oob")],
                               host="h1", bmc_address="fake://d1", bmc_driver="fake")], actor="t")
    return cfg, sessions


def test_refusals_carry_codes(db: Any) -> None:
    cfg, sessions = db
    with sessions() as s:
        with pytest.raises(operations.OpError) as e:
            operations.find_node(s, "nope")
        assert e.value.code == "not_found"
        h1 = operations.find_node(s, "h1")
        with pytest.raises(operations.OpError) as e:
            operations.transition(s, h1, Trigger.RETRY, actor="t", config=cfg)
        assert (e.value.code, e.value.kind, e.value.extra["state"]) == ("conflict", "illegal_transition", "registered")
        with pytest.raises(operations.OpError) as e:
            operations.transition(s, h1, Trigger.TIMEOUT, actor="t", config=cfg)
        assert e.value.code == "invalid"  # the service's own trigger is not a command
        with pytest.raises(operations.OpError) as e:
            operations.enroll(s, [inventory.NodeSpec(name="h2", kind="host", serial="H1")], actor="t")
        assert e.value.code == "conflict" and e.value.extra["fields"][0]["field"] == "serial"
        with pytest.raises(operations.OpError) as e:
            operations.enroll(s, [inventory.NodeSpec(name="BAD NAME", kind="host", serial="H9")], actor="t")
        assert e.value.code == "invalid"
        with pytest.raises(operations.OpError) as e:
            operations.add_tenant(s, "acme", "vrf-x", 77)
        assert e.value.code == "conflict"
        evs = operations.machine_action(s, h1, "provision", actor="t", config=cfg)
        assert [(ev.from_state, ev.to_state) for ev in evs] == [("registered", "host_waiting_dpu"),
                                                                  ("registered", "dpu_booting")]
        with pytest.raises(operations.OpError) as e:
            operations.assign_tenant(s, [h1], None, actor="t")
        assert e.value.code == "conflict" and "release it" in str(e.value)


def test_power_status_is_bounded_and_cached(db: Any) -> None:
    cfg, sessions = db
    operations.forget_power()
    fake = FakePowerDriver("fake://h1")
    fake.power_on()
    release = threading.Event()
    calls = []

    class Slow(FakePowerDriver):
        def power_state(self) -> PowerState:
            calls.append(1)
            release.wait(5)
            return fake.power_state()

    with sessions() as s:
        h1 = operations.find_node(s, "h1")
        t0 = time.monotonic()
        r = operations.power_status(h1, config=cfg, driver=lambda n: Slow("fake://h1"), timeout=0.2)
        assert r.state == "unknown" and "did not answer within 0.2 s" in (r.reason or "")
        assert time.monotonic() - t0 < 1.0
        release.set()
        deadline = time.monotonic() + 5
        while operations.power_status(h1, config=cfg, driver=lambda n: Slow("fake://h1")).state != "On":
            assert time.monotonic() < deadline, "the background read never filled the cache"
            time.sleep(0.02)
        n = len(calls)
        assert operations.power_status(h1, config=cfg, driver=lambda n: Slow("fake://h1")).state == "On"
        assert len(calls) == n  # served from the cache: the BMC is not asked on every poll
        d1 = operations.find_node(s, "d1")
        broken = FakePowerDriver("fake://d1")
        broken.fail("power_state", RetryableBmcError("connection refused", bmc="fake://d1"))
        r = operations.power_status(d1, config=cfg, driver=lambda n: broken)
        assert r.state == "unknown" and "connection refused" in (r.reason or "")
        d1.bmc_address = None
        operations.forget_power()
        assert operations.power_status(d1, config=cfg).reason == "no BMC enrolled for this node"
        assert isinstance(h1, Node)
