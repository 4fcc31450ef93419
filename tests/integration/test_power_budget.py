"""The site power budget honoured by several conductors together, asserted from the BMCs' own log.

Two ``Conductor`` instances (distinct names, parallel workers) share one database, SQLite or
PostgreSQL. Every BMC is an in-memory fake (``bootsvc.power.fake``) wrapped in a recorder that logs
each call with its start and end time; the assertions read only that log: never more BMC calls in
flight than ``power.max_concurrent_bmc``, never more than ``power.rack_power_ons`` power-ons of one
rack inside a window, each DPU powered on exactly once. Plus: the conductor prunes history at start
and then only every ``retention.interval_seconds``.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from helpers.conductor import make_db, site_config

from bootsvc import inventory, lifecycle
from bootsvc.conductor import Conductor
from bootsvc.config import Config
from bootsvc.models import Node
from bootsvc.power.fake import FakePowerDriver
from bootsvc.states import Trigger

CALL_SECONDS = 0.03  # every BMC call takes this long, so steps of different workers overlap
RACKS = ("ra", "rb")
PER_RACK = 6


class BmcLog:
    """What the BMCs saw: (start, end, address, op) per call, and the peak of calls in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[float, float, str, str]] = []
        self.in_flight = 0
        self.peak = 0


class Recorded:
    """A ``PowerDriver`` proxy that logs every call into ``BmcLog`` (the fake's own state is per BMC)."""

    def __init__(self, inner: FakePowerDriver, log: BmcLog) -> None:
        self._inner, self._log = inner, log

    def __getattr__(self, op: str) -> Any:
        target = getattr(self._inner, op)
        if not callable(target):
            return target

        def call(*a: Any, **kw: Any) -> Any:
            with self._log.lock:
                self._log.in_flight += 1
                self._log.peak = max(self._log.peak, self._log.in_flight)
            t0 = time.monotonic()
            try:
                time.sleep(CALL_SECONDS)
                return target(*a, **kw)
            finally:
                with self._log.lock:
                    self._log.in_flight -= 1
                    self._log.calls.append((t0, time.monotonic(), self._inner.address, op))

        return call


def _enroll(cfg: Config, sessions: Any) -> list[int]:
    dpus = []
    with sessions() as s:
        for r in RACKS:
            for i in range(PER_RACK):
                name = f"{r}-m{i}"
                specs = [
                    inventory.NodeSpec(name=name, kind="host", serial=f"SN-{name}", tenant="acme",
                                       bmc_address=f"fake://{name}", bmc_driver="fake", rack=r, slot=i,
                                       nics=[inventory.NicSpec(f"52:54:00:{RACKS.index(r):02x}:{i:02x}:01",
                                                               "host-pf", None)]),
                    inventory.NodeSpec(name=f"{name}-dpu", kind="dpu", serial=f"MT-{name}", tenant="acme",
                                       host=name, bmc_address=f"fake://{name}-dpu", bmc_driver="fake", rack=r,
                                       slot=i, nics=[inventory.NicSpec(
                                           f"52:54:00:{RACKS.index(r):02x}:{i:02x}:02", "oob")]),
                ]
                _host, dpu = inventory.enroll(s, specs, actor="test")
                dpus.append(dpu.id)
        for d in dpus:
            n = s.get(Node, d)
            assert n is not None
            lifecycle.apply(s, n, Trigger.PROVISION, actor="test")
    return dpus


def _storm(cfg: Config, sessions: Any, log: BmcLog, seconds: float, *, want: int | None = None,
           deadline: float = 60.0) -> list[Conductor]:
    """Two conductors run passes for ``seconds``, or (``want``) until the BMCs saw that many power-ons
    or ``deadline`` passed: on a loaded machine a pass can take longer than the budget's windows."""
    fakes: dict[str, FakePowerDriver] = {}
    flock = threading.Lock()

    def factory(n: Node, _cfg: Config) -> Any:
        with flock:
            drv = fakes.setdefault(n.bmc_address or "", FakePowerDriver(n.bmc_address or ""))
        return Recorded(drv, log)

    conds = [Conductor(cfg, sessions, name=f"c{i}", driver_factory=factory) for i in range(2)]
    start = time.monotonic()
    reached: list[float] = []

    def more() -> bool:
        now = time.monotonic()
        if want is None:
            return now < start + seconds
        if not reached and len(_power_ons(log)) >= want:
            reached.append(now)
        # then one more second of passes: a power-on sent twice would show up in the log
        return now < start + deadline and (not reached or now < reached[0] + 1.0)

    def loop(c: Conductor) -> None:
        while more():
            c.run_once()
            time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(c,)) for c in conds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return conds


def _power_ons(log: BmcLog) -> list[tuple[float, str]]:
    return sorted((t0, addr.split("://")[1].split("-")[0]) for t0, _t1, addr, op in log.calls if op == "power_on")


@pytest.mark.parametrize("cap,per_rack,window", [(3, 2, 1.0)])
def test_global_cap_and_rack_budget_from_the_bmc_log(any_db_url: str, tmp_path: Path, cap: int, per_rack: int,
                                                     window: float) -> None:
    cfg = site_config(any_db_url, tmp_path, orchestration={"vtep_network": "10.255.0.0/16", "workers": 8},
                      power={"max_concurrent_bmc": cap, "rack_power_ons": per_rack,
                             "rack_window_seconds": window})
    sessions = make_db(cfg)
    dpus = _enroll(cfg, sessions)
    log = BmcLog()
    # 6 power-ons per rack at 2 per window need at least 2 full windows after the first pair
    _storm(cfg, sessions, log, seconds=0, want=len(dpus))

    ons = _power_ons(log)
    # each DPU powered on exactly once (its step ran once, by one of the two conductors)
    assert len(ons) == len(dpus), ons
    assert len({addr for _t0, _t1, addr, op in log.calls if op == "power_on"}) == len(dpus)
    # the global cap: never more BMC calls in flight than max_concurrent_bmc, across both conductors;
    # and the cap was reached (two conductors x 8 workers would exceed it without the budget)
    assert 1 < log.peak <= cap, log.peak
    # the rack budget: in any stretch shorter than the window (minus the time a step spends before its
    # power_on call), a rack sees at most per_rack power-ons
    slack = 6 * CALL_SECONDS + 0.1
    for rack in RACKS:
        times = [t for t, r in ons if r == rack]
        assert len(times) == PER_RACK
        for i in range(len(times) - per_rack):
            assert times[i + per_rack] - times[i] >= window - slack, (rack, times)


def test_without_a_budget_the_log_shows_more(sqlite_url: str, tmp_path: Path) -> None:
    """The control: the same storm with no budget exceeds both limits, so the test above can fail."""
    cfg = site_config(sqlite_url, tmp_path, orchestration={"vtep_network": "10.255.0.0/16", "workers": 8})
    sessions = make_db(cfg)
    _enroll(cfg, sessions)
    log = BmcLog()
    _storm(cfg, sessions, log, seconds=0, want=len(RACKS) * PER_RACK)
    ons = _power_ons(log)
    assert len(ons) == len(RACKS) * PER_RACK
    assert log.peak > 3
    times = [t for t, r in ons if r == RACKS[0]]
    assert times[2] - times[0] < 0.5  # three power-ons of one rack well inside one window


def test_prune_runs_at_start_then_every_interval(sqlite_url: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = site_config(sqlite_url, tmp_path, retention={"interval_seconds": 60})
    sessions = make_db(cfg)
    cond = Conductor(cfg, sessions, name="c-prune")
    ran: list[float] = []
    from bootsvc import retention

    real = retention.prune
    monkeypatch.setattr(retention, "prune", lambda s, c, **kw: ran.append(1) or real(s, c, **kw))
    t = [1000.0]
    assert cond.maybe_prune(lambda: t[0]) is True
    for _ in range(5):
        cond.run_once()
        assert cond.maybe_prune(lambda: t[0]) is False
        t[0] += 10
    t[0] += 10.5  # 60.5 s after the first prune
    assert cond.maybe_prune(lambda: t[0]) is True
    assert len(ran) == 2
