"""The conductor's Redfish sessions kept between calls (bootsvc.power.redfish_session.SessionPool),
against the BF-24.10 capture replayed by bootsvc.lab.bfbmc (sessions are counted on the BMC side).

A power-on step is three driver calls (power state, one-time PXE boot, power on); without a pool each
logs in and out, with one the step logs in once. What must hold with a pool: never more sessions
open at a BMC than the per-BMC cap, a session the BMC dropped is replaced by one login (the action
is still sent once), a session that met a transport error is not reused, and closing the pool
leaves nothing open.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import requests
from helpers.bfbmc import REF, bfbmc_fixtures, network_boot_step
from helpers.waits import run_concurrently

from bootsvc.lab.bfbmc import BfBmcProcess
from bootsvc.power.base import BmcNoAnswer, PowerSettings, PowerState
from bootsvc.power.redfish import RedfishDriver
from bootsvc.power.redfish_session import SessionPool

SETTINGS = PowerSettings(poll_interval=0.05, connect_timeout=1, read_timeout=1.5, drop_grace=2)
RESET = "POST /redfish/v1/Systems/Bluefield/Actions/ComputerSystem.Reset"

bf, fresh = bfbmc_fixtures("bfbmc-pool")  # after each test: no session left open on the BMC


def step(drv: RedfishDriver) -> None:
    network_boot_step(drv, dpu=False)  # a host's: three calls, no DPU preflight


def test_without_a_pool_every_call_is_its_own_session(bf: BfBmcProcess) -> None:
    step(RedfishDriver(bf.url, REF, settings=SETTINGS))
    s = bf.stats()
    assert s["sessions_created"] == 3 and s["sessions_open"] == 0


def test_a_step_logs_in_once_and_the_next_step_reuses_the_session(bf: BfBmcProcess) -> None:
    pool = SessionPool(idle_seconds=30)
    step(RedfishDriver(bf.url, REF, settings=SETTINGS, pool=pool))
    s = bf.stats()
    assert s["sessions_created"] == 1 and s["sessions_open"] == 1  # kept for the next call
    # a later step makes a new driver (the conductor does, per step): same session, no discovery again
    RedfishDriver(bf.url, REF, settings=SETTINGS, pool=pool).power_state()
    s = bf.stats()
    assert s["sessions_created"] == 1
    assert s["requests"].get("GET /redfish/v1/Systems", 0) == 1  # discovery once, kept with the session
    assert pool.logins == 1 and pool.reused == 3
    pool.close()
    s = bf.stats()
    assert s["sessions_open"] == 0 and s["sessions_deleted"] == 1


def test_a_session_the_bmc_dropped_is_replaced_by_one_login(bf: BfBmcProcess) -> None:
    pool = SessionPool(idle_seconds=30)
    drv = RedfishDriver(bf.url, REF, settings=SETTINGS, pool=pool)
    drv.power_state()
    (conn,) = [c for _, c in pool._order.values()]
    # the BMC forgets the session (its SessionTimeout, a BMC reboot): DELETE it behind the pool's back
    r = requests.delete(bf.url + conn.client.get_session_location(),
                        headers={"X-Auth-Token": conn.client.get_session_key()}, timeout=5)
    assert r.status_code in (200, 204)
    bf.clear_stats()  # requests only; sessions_created keeps counting
    step(RedfishDriver(bf.url, REF, settings=SETTINGS, pool=pool))
    s = bf.stats()
    assert s["sessions_created"] == 2  # the first one, and one fresh login after the 401
    assert s["requests"].get(RESET, 0) == 1  # the power-on went out exactly once
    pool.close()
    assert bf.stats()["sessions_open"] == 0


def test_a_session_that_met_a_transport_error_is_logged_out_not_kept(bf: BfBmcProcess) -> None:
    pool = SessionPool(idle_seconds=30)
    # doc_reuse_seconds=0: the second read must go to the BMC, not be served by the first one
    drv = RedfishDriver(bf.url, REF, settings=replace(SETTINGS, doc_reuse_seconds=0), pool=pool)
    drv.power_state()
    bf.faults(slow_seconds=2.5, slow_paths=["/redfish/v1/Systems/Bluefield"])
    with pytest.raises(BmcNoAnswer):
        drv.power_state()
    bf.clear_faults()
    assert len(pool) == 0
    assert bf.stats()["sessions_open"] == 0


def test_concurrent_calls_never_open_more_sessions_than_the_cap(bf: BfBmcProcess) -> None:
    # its own spelling of the address: a fresh per-BMC slot with cap 2 (the first driver fixes it)
    capped = PowerSettings(poll_interval=0.05, read_timeout=5, max_sessions_per_bmc=2)
    url = bf.url.replace("127.0.0.1", "localhost")
    pool = SessionPool(idle_seconds=30)
    bf.faults(slow_seconds=0.2, slow_paths=["/redfish/v1/Systems/Bluefield"])
    states: list[PowerState] = []

    def work() -> None:
        for _ in range(3):
            states.append(RedfishDriver(url, REF, settings=capped, pool=pool).power_state())

    run_concurrently(work, 6, 60)
    s = bf.stats()
    assert states == [PowerState.ON] * 18
    assert s["sessions_created"] == 2  # two sessions served all 18 calls
    assert s["sessions_open"] <= 2
    pool.close()
    assert bf.stats()["sessions_open"] == 0
