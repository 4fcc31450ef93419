"""bootsvc's Redfish driver against the real sushy-tools emulator (fake driver, HTTP Basic, loopback).

sushy's fake driver applies power changes after a random 1-11 s (not configurable), so the power tests
run one flow per emulated system in parallel threads and poll with deadlines; nothing sleeps for luck.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from bootsvc.lab.bfbmc import SushyProcess, free_port
from bootsvc.power.base import (
    BootTarget,
    FatalBmcError,
    PowerSettings,
    PowerState,
    RetryableBmcError,
)
from bootsvc.power.redfish import RedfishDriver

USER, PASSWORD = "bp-admin", "bp-s3cret"
IDS = {name: f"7ab00000-0000-4000-8000-5254007700{i:02d}" for i, name in enumerate(
    ["info", "pxe", "on", "off", "cycle", "graceful", "pxeboot"], start=10)}
INITIAL = {"info": "Off", "pxe": "Off", "on": "Off", "off": "On", "cycle": "On", "graceful": "On", "pxeboot": "Off"}
# Worst case for sushy's fake: 11 s after the POST (int(now) + randint(1, 11)); give margin for a busy CI.
POWER_DEADLINE = 20.0


@pytest.fixture(scope="module")
def sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyProcess]:
    systems = [{"uuid": uuid, "name": f"bp-{name}", "power_state": INITIAL[name], "external_notifier": False,
                "nics": [{"mac": f"52:54:00:77:00:{i:02x}", "ip": "127.0.0.1"}]}
               for i, (name, uuid) in enumerate(IDS.items(), start=0x10)]
    with SushyProcess(tmp_path_factory.mktemp("sushy"), systems, user=USER, password=PASSWORD) as s:
        yield s


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_SUSHY_USER", USER)
    monkeypatch.setenv("BP_SUSHY_PASS", PASSWORD)


SETTINGS = PowerSettings(poll_interval=0.2, connect_timeout=2, read_timeout=10, max_sessions_per_bmc=8)


def drv(sushy: SushyProcess, name: str, ref: str = "env:BP_SUSHY_USER:BP_SUSHY_PASS") -> RedfishDriver:
    return RedfishDriver(f"{sushy.url}/redfish/v1/Systems/{IDS[name]}", ref, settings=SETTINGS)


def raw(sushy: SushyProcess, name: str) -> dict[str, Any]:
    """Independent read of the emulator, not through bootsvc's driver."""
    r = requests.get(f"{sushy.url}/redfish/v1/Systems/{IDS[name]}", auth=(USER, PASSWORD), timeout=5)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def test_info_reads_identity_state_and_quirks(sushy: SushyProcess) -> None:
    info = drv(sushy, "info").info()
    assert info.vendor == "Sushy Emulator" and info.redfish_version == "1.5.0"
    assert info.auth == "basic"  # sushy has no SessionService: fell back to HTTP Basic
    assert info.quirks == ("sushy-tools",)
    assert info.power_state is PowerState.OFF
    assert info.system_path.endswith(IDS["info"])


def test_pxe_once_reads_back_and_sticky_override_is_cleared(sushy: SushyProcess) -> None:
    d = drv(sushy, "pxe")
    b = d.boot_once(BootTarget.PXE, mode="UEFI")
    assert (b.target, b.mode) == ("Pxe", "UEFI")
    assert b.enabled == "Continuous" and b.sticky  # sushy ignores Once; driver flags it
    assert raw(sushy, "pxe")["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    cleared = d.clear_boot_override()
    assert cleared.target == "Hdd"  # sushy quirk: clear to disk (libvirt cannot boot "None")
    assert raw(sushy, "pxe")["Boot"]["BootSourceOverrideTarget"] == "Hdd"
    assert d.clear_boot_override() == cleared  # nothing left to clear: no write


def test_on_off_cycle_graceful_in_parallel(sushy: SushyProcess) -> None:
    results: dict[str, Any] = {}
    dips: dict[str, list[str]] = {"cycle": []}
    stop = threading.Event()

    def watch_cycle() -> None:  # independent observer: the cycle must show a dip through Off
        while not stop.is_set():
            dips["cycle"].append(raw(sushy, "cycle")["PowerState"])
            stop.wait(0.1)

    def run(name: str, fn: Any) -> None:
        t0 = time.monotonic()
        try:
            fn()
            results[name] = ("ok", time.monotonic() - t0)
        except Exception as e:  # reported below
            results[name] = (repr(e), time.monotonic() - t0)

    def pxe_boot() -> None:  # the provisioning sequence: override, boot, then clear what the BMC kept
        d = drv(sushy, "pxeboot")
        assert d.boot_once(BootTarget.PXE).sticky
        d.power_on(wait=POWER_DEADLINE)
        kept = d.boot_override()
        assert (kept.target, kept.enabled) == ("Pxe", "Continuous"), kept  # sushy kept it after use
        assert d.clear_boot_override().target == "Hdd"

    flows = {
        "pxeboot": pxe_boot,
        "on": lambda: drv(sushy, "on").power_on(wait=POWER_DEADLINE),
        "off": lambda: drv(sushy, "off").power_off(wait=POWER_DEADLINE),
        "cycle": lambda: drv(sushy, "cycle").power_cycle(wait=POWER_DEADLINE),
        "graceful": lambda: drv(sushy, "graceful").power_off(graceful=True, wait=POWER_DEADLINE),
    }
    watcher = threading.Thread(target=watch_cycle)
    watcher.start()
    threads = [threading.Thread(target=run, args=(n, f)) for n, f in flows.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(POWER_DEADLINE + 15)
    stop.set()
    watcher.join(5)
    assert {n: r[0] for n, r in results.items()} == dict.fromkeys(flows, "ok"), results
    assert raw(sushy, "on")["PowerState"] == "On"
    assert raw(sushy, "off")["PowerState"] == "Off"
    assert raw(sushy, "graceful")["PowerState"] == "Off"
    assert raw(sushy, "cycle")["PowerState"] == "On"
    assert raw(sushy, "pxeboot")["PowerState"] == "On"
    assert raw(sushy, "pxeboot")["Boot"]["BootSourceOverrideTarget"] == "Hdd"
    assert "Off" in dips["cycle"], dips  # the restart really happened
    # Already in the wanted state: no reset is sent, and it returns at once.
    t0 = time.monotonic()
    drv(sushy, "on").power_on(wait=POWER_DEADLINE)
    assert time.monotonic() - t0 < 2


def test_wait_deadline_is_enforced(sushy: SushyProcess) -> None:
    d = drv(sushy, "info")
    t0 = time.monotonic()
    with pytest.raises(RetryableBmcError, match=r"PowerState is Off, not On, after 1s"):
        d.wait_power(PowerState.ON, 1.0)
    assert time.monotonic() - t0 < 3


def test_wrong_password_is_fatal_401(sushy: SushyProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_SUSHY_PASS", "wrong")
    with pytest.raises(FatalBmcError, match=r"HTTP 401.*credential ref env:BP_SUSHY_USER:BP_SUSHY_PASS") as ei:
        drv(sushy, "info").power_state()
    assert "wrong" not in str(ei.value)


def test_many_systems_need_the_system_in_the_address(sushy: SushyProcess) -> None:
    d = RedfishDriver(sushy.url, "env:BP_SUSHY_USER:BP_SUSHY_PASS", settings=SETTINGS)
    with pytest.raises(FatalBmcError, match=r"BMC has 7 Systems"):
        d.power_state()


def test_unreachable_bmc_is_retryable_and_fast() -> None:
    port = free_port(18000, 18049)  # nothing listens there
    d = RedfishDriver(f"http://127.0.0.1:{port}", "env:BP_SUSHY_USER:BP_SUSHY_PASS", settings=SETTINGS)
    t0 = time.monotonic()
    with pytest.raises(RetryableBmcError, match="unreachable") as ei:
        d.power_on()
    assert not ei.value.maybe_applied
    assert time.monotonic() - t0 < 2  # no hidden library retries (it would sleep 1 s x 10)
