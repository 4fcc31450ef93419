"""Fault handling of the Redfish driver, injected in bootsvc.lab.bfbmc (the BF-24.10 capture replayed).

Each fault must end in the right error class (retryable vs fatal) with a message a tech can act on,
must never make the driver fire an action twice (request counts are taken on the emulator side), and
must leave no session open on the BMC (checked after every test).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers.bfbmc import PASSWORD, REF, bfbmc_fixtures
from helpers.waits import run_concurrently, wait_for

from bootsvc.lab.bfbmc import BfBmcProcess, free_port
from bootsvc.power.base import (
    BmcNoAnswer,
    BootTarget,
    FatalBmcError,
    PowerSettings,
    PowerState,
    RetryableBmcError,
)
from bootsvc.power.redfish import RedfishDriver

SETTINGS = PowerSettings(poll_interval=0.05, connect_timeout=1, read_timeout=1.5, drop_grace=2)
RESET = "POST /redfish/v1/Systems/Bluefield/Actions/ComputerSystem.Reset"
SETTINGS_PATCH = "PATCH /redfish/v1/Systems/Bluefield/Settings"

bf, fresh = bfbmc_fixtures("bfbmc-faults", power_delay=0.3)  # after each test: faults off, no session open


def driver(bf: BfBmcProcess, **quirks: Any) -> RedfishDriver:
    return RedfishDriver(bf.url, REF, settings=SETTINGS, quirk_overrides=quirks or None)


def count(bf: BfBmcProcess, key: str) -> int:
    n: int = bf.stats()["requests"].get(key, 0)
    return n


def test_unreachable() -> None:
    port = free_port(18050, 18089)
    with pytest.raises(RetryableBmcError, match=r"unreachable \(connection refused\); nothing was sent") as ei:
        RedfishDriver(f"http://127.0.0.1:{port}", REF, settings=SETTINGS).power_state()
    assert not ei.value.maybe_applied and "check the BMC is powered" in str(ei.value)


def test_slow_read_times_out_and_session_is_still_closed(bf: BfBmcProcess) -> None:
    bf.faults(slow_seconds=3, slow_paths=["/redfish/v1/Systems/Bluefield"])
    t0 = time.monotonic()
    with pytest.raises(BmcNoAnswer, match=r"no answer within 1.5s") as ei:
        driver(bf).power_state()
    assert time.monotonic() - t0 < 2.5  # one try, no library retries
    assert ei.value.retryable and not ei.value.maybe_applied  # a GET changes nothing
    assert bf.stats()["sessions_created"] == 1


def test_slow_reset_is_sent_once_and_its_effect_is_looked_for(bf: BfBmcProcess) -> None:
    # The BMC takes 2.5 s before carrying the reset out; our read timeout is 1.5 s. The driver must
    # not re-send; it polls PowerState and sees the Off arrive (emulator power delay 0.3 s).
    bf.faults(slow_seconds=2.5, slow_paths=["*/ComputerSystem.Reset"])
    driver(bf).power_off()
    assert count(bf, RESET) == 1
    assert bf.stats()["power_state"] == "Off"


def test_401_is_fatal_and_names_the_credential_ref(bf: BfBmcProcess) -> None:
    bf.faults(auth_401=True)
    with pytest.raises(FatalBmcError, match=r"session login failed: HTTP 401 .*credential ref " + REF) as ei:
        driver(bf).power_on()
    assert PASSWORD not in str(ei.value)
    assert count(bf, RESET) == 0


def test_session_refused_falls_back_to_basic_auth(bf: BfBmcProcess) -> None:
    bf.faults(no_sessions=True)
    info = driver(bf).info()
    assert info.auth == "basic" and info.power_state is PowerState.ON
    assert count(bf, "POST /redfish/v1/SessionService/Sessions") == 1
    assert bf.stats()["sessions_created"] == 0


def test_412_on_first_patch_rereads_and_retries_once(bf: BfBmcProcess) -> None:
    bf.faults(patch_412=1)
    b = driver(bf).boot_once(BootTarget.PXE)
    assert b.target == "Pxe"
    assert count(bf, SETTINGS_PATCH) == 2
    assert bf.stats()["settings_boot"]["BootSourceOverrideTarget"] == "Pxe"


def test_412_twice_is_retryable_and_patches_exactly_twice(bf: BfBmcProcess) -> None:
    bf.faults(patch_412=5)
    with pytest.raises(RetryableBmcError, match=r"refused the PATCH twice \(HTTP 412, then 412\)"):
        driver(bf).boot_once(BootTarget.PXE)
    assert count(bf, SETTINGS_PATCH) == 2
    assert bf.stats()["settings_boot"]["BootSourceOverrideTarget"] == "UefiHttp"  # the capture's, untouched


def test_if_match_is_sent_from_the_etag(bf: BfBmcProcess) -> None:
    bf.state(rshim=False)  # the capture has it on
    bf.faults(require_if_match=True)  # 428 without If-Match
    driver(bf).set_bmc_rshim(True)
    assert bf.stats()["rshim"] is True
    assert count(bf, "PATCH /redfish/v1/Managers/Bluefield_BMC/Oem/Nvidia") == 1


def test_500_on_read_is_retryable(bf: BfBmcProcess) -> None:
    bf.faults(error_500=["/redfish/v1/Systems/Bluefield"])
    with pytest.raises(RetryableBmcError, match=r"HTTP 500 \(Internal error \(injected\)\).*reset the BMC"):
        driver(bf).power_state()


def test_500_on_reset_is_retryable_and_not_retried(bf: BfBmcProcess) -> None:
    bf.faults(error_500=["*/ComputerSystem.Reset"])
    with pytest.raises(RetryableBmcError, match=r"ComputerSystem\.Reset ForceOff failed: HTTP 500"):
        driver(bf).power_off()
    assert count(bf, RESET) == 1


def test_reset_dropping_the_connection_is_accepted_on_bluefield(bf: BfBmcProcess) -> None:
    bf.faults(drop_on_reset=True, drop_applies=True)
    driver(bf).power_off(wait=5)
    assert count(bf, RESET) == 1
    # the driver does not wait for a DPU's power-off (the Arm stays in standby; bluefieldbmcv2401)
    wait_for(lambda: bf.stats()["power_state"] == "Off", 5, "the emulator to reach Off")


def test_dropped_reset_with_visible_effect_is_accepted_without_the_quirk(bf: BfBmcProcess) -> None:
    bf.faults(drop_on_reset=True, drop_applies=True)
    driver(bf, reset_drops_connection=False).power_off()
    assert count(bf, RESET) == 1
    assert bf.stats()["power_state"] == "Off"


def test_dropped_reset_without_effect_is_retryable_maybe_applied(bf: BfBmcProcess) -> None:
    bf.faults(drop_on_reset=True, drop_applies=False)
    with pytest.raises(BmcNoAnswer, match=r"connection dropped and no effect was visible within 2s") as ei:
        driver(bf, reset_drops_connection=False).power_off()
    assert ei.value.maybe_applied and "before sending it again" in str(ei.value)
    assert count(bf, RESET) == 1
    assert bf.stats()["power_state"] == "On"


def test_ignored_boot_override_is_fatal(bf: BfBmcProcess) -> None:
    bf.faults(ignore_boot_override=True)
    with pytest.raises(FatalBmcError, match=r"ignored it: BootSourceOverrideTarget reads 'UefiHttp', asked 'Pxe'"):
        driver(bf).boot_once(BootTarget.PXE)
    assert count(bf, SETTINGS_PATCH) == 1


def test_power_state_timeout_is_retryable(bf: BfBmcProcess) -> None:
    bf.state(power_state="Off")
    bf.faults(power_delay=30)
    with pytest.raises(RetryableBmcError, match=r"PowerState is Off, not On, after 1s"):
        driver(bf).power_on(wait=1)
    assert count(bf, RESET) == 1


def test_per_bmc_session_cap(bf: BfBmcProcess) -> None:
    # The cap is per scheme://host:port and fixed by the first driver that touches it, so this test
    # uses its own spelling of the address ("localhost") to get a fresh slot with cap 2.
    bf.faults(slow_seconds=0.3, slow_paths=["/redfish/v1/Systems/Bluefield"])
    capped = PowerSettings(poll_interval=0.05, read_timeout=5, max_sessions_per_bmc=2)
    d = RedfishDriver(bf.url.replace("127.0.0.1", "localhost"), REF, settings=capped)
    states: list[PowerState] = []
    run_concurrently(lambda: states.append(d.power_state()), 6, 30)
    s = bf.stats()
    assert states == [PowerState.ON] * 6
    assert s["sessions_created"] == 6
    assert s["max_inflight"] == 2  # never more than the cap at once, and the cap was reached
