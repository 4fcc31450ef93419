"""What a conductor network-boot step costs a BMC, in requests, against the BlueField-3 BMC emulator
(bootsvc.lab.bfbmc, the BF-24.10 capture replayed): each request is a round trip and, on the
conductor, CPU in python-redfish and requests. Counts are taken on the emulator side.

The step is the conductor's (bootsvc/conductor_bmc.py ``_bmc_step``): power state, DPU facts, one-time
PXE override, then reset or power on, each call in the BMC session the pool keeps. A System read in the
same session and not older than ``doc_reuse_seconds``, with nothing sent to the BMC since, serves the
next read; read-backs and polls always go to the BMC. What the BMC said of itself (its service root,
System and Manager: the driver's discovery) is kept by the pool across sessions for
``known_seconds`` (`bootsvc.power.redfish_session.Known`): in a storm a BMC's next step comes after an
install, on a new session.
"""

from __future__ import annotations

import time

from helpers.bfbmc import REF, bfbmc_fixtures, network_boot_step

from bootsvc.lab.bfbmc import BfBmcProcess
from bootsvc.power.base import BootTarget, PowerSettings, PowerState
from bootsvc.power.redfish import RedfishDriver
from bootsvc.power.redfish_session import SessionPool

SYSTEM = "GET /redfish/v1/Systems/Bluefield"
SETTINGS = "GET /redfish/v1/Systems/Bluefield/Settings"
PATCH = "PATCH /redfish/v1/Systems/Bluefield/Settings"
RESET = "POST /redfish/v1/Systems/Bluefield/Actions/ComputerSystem.Reset"
LOGIN = "POST /redfish/v1/SessionService/Sessions"
# what discovery reads (bootsvc/power/redfish.py ``_discover``) besides the System
DISCOVERY = ("GET /redfish/v1/", "GET /redfish/v1/Systems", "GET /redfish/v1/Managers",
             "GET /redfish/v1/Managers/Bluefield_BMC")

bf, fresh = bfbmc_fixtures("bfbmc-cost")  # after each test: no session left open on the BMC


def step(drv: RedfishDriver) -> None:
    network_boot_step(drv, dpu=True)


def test_a_pooled_step_reads_the_system_once_before_and_once_after_the_patch(bf: BfBmcProcess) -> None:
    pool = SessionPool()
    try:
        step(RedfishDriver(bf.url, REF, pool=pool))  # logs in and discovers
        bf.clear_stats()
        step(RedfishDriver(bf.url, REF, pool=pool))  # the next step, same session (within idle_seconds)
        req = bf.stats()["requests"]
    finally:
        pool.close()
    # before the PATCH: one System and one Settings read serve power state, DPU facts, the boot plan;
    # after it: the read-back of both (never reused), whose System also serves the pre-reset check
    assert (req.get(SYSTEM), req.get(SETTINGS), req.get(PATCH), req.get(RESET)) == (2, 2, 1, 1), req
    assert bf.stats()["resets"] and pool.logins == 1


def test_a_first_step_reuses_the_discovery_read(bf: BfBmcProcess) -> None:
    pool = SessionPool()
    try:
        step(RedfishDriver(bf.url, REF, pool=pool))
        req = bf.stats()["requests"]
    finally:
        pool.close()
    assert (req.get(SYSTEM), req.get(SETTINGS), req.get(RESET)) == (2, 2, 1), req


def test_no_reuse_when_disabled(bf: BfBmcProcess) -> None:
    pool = SessionPool()
    try:
        step(RedfishDriver(bf.url, REF, pool=pool, settings=PowerSettings(doc_reuse_seconds=0)))
        req = bf.stats()["requests"]
    finally:
        pool.close()
    assert req.get(SYSTEM) == 6 and req.get(SETTINGS) == 2, req  # discovery, state, facts, plan, read-back, reset


def test_a_write_by_another_session_of_this_process_is_never_hidden(bf: BfBmcProcess) -> None:
    pool = SessionPool()
    try:
        a = RedfishDriver(bf.url, REF, pool=pool)
        assert a.power_state() is PowerState.ON  # the session (and its System read) goes back to the pool
        bf.state(power_state="Off")
        RedfishDriver(bf.url, REF).power_on()  # another session reads Off and sends On
        bf.state(power_state="Off")  # (the emulator's node is quick: make the change visible)
        bf.clear_stats()
        assert a.power_state() is PowerState.OFF  # re-read: the pooled session's copy predates the write
        assert bf.stats()["requests"].get(SYSTEM) == 1
    finally:
        pool.close()


def test_a_document_older_than_the_window_is_read_again(bf: BfBmcProcess) -> None:
    pool = SessionPool()
    try:
        drv = RedfishDriver(bf.url, REF, pool=pool, settings=PowerSettings(doc_reuse_seconds=0.2))
        drv.power_state()
        bf.state(power_state="Off")  # someone pressed the button: nothing this process sent
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline:  # the window, not luck: the copy must age past 0.2 s
            time.sleep(0.05)
        bf.clear_stats()
        assert drv.power_state() is PowerState.OFF
        assert bf.stats()["requests"].get(SYSTEM) == 1
    finally:
        pool.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def discovery_reads(req: dict[str, int]) -> dict[str, int]:
    return {k: req.get(k, 0) for k in DISCOVERY}


def power_state_requests(bf: BfBmcProcess, pool: SessionPool) -> dict[str, int]:
    """The requests one power-state read on a new driver over ``pool`` sends the BMC."""
    bf.clear_stats()
    RedfishDriver(bf.url, REF, pool=pool).power_state()
    return dict(bf.stats()["requests"])


def test_a_step_on_a_new_session_of_a_known_bmc_reads_no_root_and_no_discovery(bf: BfBmcProcess) -> None:
    clock = Clock()
    pool = SessionPool(idle_seconds=20, known_seconds=600, clock=clock)
    try:
        step(RedfishDriver(bf.url, REF, pool=pool))
        assert all(discovery_reads(bf.stats()["requests"]).values()), bf.stats()["requests"]  # learnt here
        clock.t += 21  # the DPU installs: its session is logged out idle, what the BMC said is kept
        assert pool.sweep() == 1 and pool.known() == 1
        bf.clear_stats()
        step(RedfishDriver(bf.url, REF, pool=pool))
        req = bf.stats()["requests"]
    finally:
        pool.close()
    assert discovery_reads(req) == dict.fromkeys(DISCOVERY, 0), req
    # a login, then what the step itself needs: the System + Settings before and after the PATCH, the reset
    assert (req.get(LOGIN), req.get(SYSTEM), req.get(SETTINGS), req.get(PATCH), req.get(RESET)) == (1, 2, 2, 1, 1), req
    assert pool.recalled == 1 and pool.logins == 2


def test_known_bmc_is_learnt_again_after_known_seconds(bf: BfBmcProcess) -> None:
    clock = Clock()
    pool = SessionPool(idle_seconds=20, known_seconds=600, clock=clock)
    try:
        RedfishDriver(bf.url, REF, pool=pool).power_state()
        clock.t += 600
        pool.sweep()
        assert pool.known() == 0
        req = power_state_requests(bf, pool)
    finally:
        pool.close()
    assert all(discovery_reads(req).values()), req


def test_a_dropped_connection_makes_the_next_session_learn_the_bmc_again(bf: BfBmcProcess) -> None:
    clock = Clock()
    pool = SessionPool(idle_seconds=20, known_seconds=600, clock=clock)
    try:
        RedfishDriver(bf.url, REF, pool=pool).power_state()
        assert pool.known() == 1
        bf.faults(drop_on_reset=True)  # the BMC closes the connection on the reset (and carries it out)
        drv = RedfishDriver(bf.url, REF, pool=pool, settings=PowerSettings(drop_grace=5, poll_interval=0.05))
        drv.boot_once(BootTarget.PXE)
        drv.reset()  # accepted: a BlueField BMC is known to drop the connection on a reset (quirks)
        assert pool.known() == 0  # a BMC that drops connections may be restarting (a firmware update)
        clock.t += 21
        pool.sweep()
        bf.clear_faults()
        req = power_state_requests(bf, pool)
    finally:
        pool.close()
    assert all(discovery_reads(req).values()), req
