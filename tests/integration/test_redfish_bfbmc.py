"""The Redfish driver against bootsvc.lab.bfbmc: the BF-24.10 BMC capture replayed, plus its behaviour
over time (bluefield-real.md): one-time boot through /Settings applied at the next Arm reset, BMC RShim,
the BFB push (real HTTP download, task steps, "update in progress", OemLastState to OsIsRunning, the
DPU_OS version only after the new OS runs), PowerCycle deferred while the host runs, Mode.Set after two
Arm reboots and a power cycle. After every test the emulator must report no open session.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.bfbmc import PASSWORD, REF, USER, bfbmc_fixtures
from helpers.waits import wait_for

from bootsvc.lab.bfbmc import BfBmcProcess, default_capture, http_file_server
from bootsvc.power.base import (
    BootTarget,
    DpuMode,
    FatalBmcError,
    PowerSettings,
    PowerState,
    RetryableBmcError,
    TaskStatus,
)
from bootsvc.power.redfish import RedfishDriver

pytestmark = pytest.mark.skipif(not default_capture().is_dir(),
                                reason="../shared/redfish-captures/nvidia-bf3-bmc-24.10 not present")
SETTINGS = PowerSettings(poll_interval=0.05, connect_timeout=2, read_timeout=5, drop_grace=3, update_wait=1.0,
                         rshim_wait=1.0)
# each test: the Arm boots and the BFB installs in 0.6 s (the emulator's defaults are 2 s); after it no session open
bf, fresh = bfbmc_fixtures("bfbmc", power_delay=0.2, faults={"arm_boot_seconds": 0.6, "install_seconds": 0.6})


def driver(bf: BfBmcProcess) -> RedfishDriver:
    return RedfishDriver(bf.url, REF, settings=SETTINGS)


def test_every_resource_is_the_capture(bf: BfBmcProcess) -> None:
    cap = default_capture() / "redfish" / "v1"
    req = urllib.request.Request(bf.url + "/redfish/v1/Chassis/Card1", headers={
        "Authorization": "Basic " + __import__("base64").b64encode(f"{USER}:{PASSWORD}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read()) == json.loads((cap / "Chassis" / "Card1" / "index.json").read_text())


def test_identity_is_the_real_firmware(bf: BfBmcProcess) -> None:
    info = driver(bf).info()
    assert info.auth == "session" and info.kind == "nvidia-bluefield-bmc"
    assert (info.vendor, info.model, info.firmware) == ("https://www.mellanox.com", "BlueField-3 SmartNIC Main Card",
                                                        "BF-24.10-10")
    assert info.system_path == "/redfish/v1/Systems/Bluefield"
    assert info.manager_path == "/redfish/v1/Managers/Bluefield_BMC"
    assert info.dpu is not None and info.dpu.mode is DpuMode.DPU and info.dpu.os_state == "OsIsRunning"


def test_pxe_once_goes_to_settings_and_applies_at_the_next_arm_reset(bf: BfBmcProcess) -> None:
    d = driver(bf)
    ov = d.boot_once(BootTarget.PXE)
    assert ov.pending and ov.sticky and ov.mode == "UEFI"
    s = bf.stats()
    assert s["patches"] == [["/redfish/v1/Systems/Bluefield/Settings", {"Boot": {
        "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once", "BootSourceOverrideMode": "UEFI"}}]]
    assert s["live_boot"]["BootSourceOverrideTarget"] == "UefiHttp"  # the capture's, until the Arm resets
    d.reset()
    s = bf.stats()
    assert s["resets"] == ["ForceRestart"] and s["live_boot"]["BootSourceOverrideTarget"] == "Pxe"
    cleared = d.clear_boot_override()
    assert not cleared.active


def test_uefi_http_refused_before_any_patch(bf: BfBmcProcess) -> None:
    with pytest.raises(FatalBmcError, match="does not allow BootSourceOverrideTarget 'UefiHttp'"):
        driver(bf).boot_once(BootTarget.HTTP, uri="http://127.0.0.1/x.efi")
    assert bf.stats()["patches"] == []


def test_bmc_rshim_toggle(bf: BfBmcProcess) -> None:
    d = driver(bf)
    assert d.bmc_rshim() is True  # as captured
    d.set_bmc_rshim(False)
    assert bf.stats()["rshim"] is False
    d.set_bmc_rshim(True)
    assert bf.stats()["rshim"] is True and len(bf.stats()["patches"]) == 2


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "doca-2.9.2.bfb").write_bytes(data)
    return tmp_path, hashlib.sha256(data).hexdigest()


def test_bfb_push_transfer_then_install_then_os(bf: BfBmcProcess, image: tuple[Path, str]) -> None:
    d = driver(bf)
    bf.faults(download_chunk_delay=0.02)
    with http_file_server(image[0]) as url:
        task = d.install_bfb(f"{url}/doca-2.9.2.bfb")
        seen: list[TaskStatus] = []
        st = d.wait_task(task, 30, on_progress=seen.append)
    s = bf.stats()
    assert s["actions"] == [["HostRshim.Set", "Disabled"]]
    assert s["updates"] == [{"ImageURI": url.split("://", 1)[1] + "/doca-2.9.2.bfb", "TransferProtocol": "HTTP",
                             "Targets": ["redfish/v1/UpdateService/FirmwareInventory/DPU_OS"]}]
    assert st.ok and st.percent == 100
    assert {x.percent for x in seen} <= {0, 20, 50, 80, 100} and len(seen) >= 3
    assert all(m.startswith("Transfer is") or m == "Task created" for x in seen for m in x.messages)
    assert s["bfb"]["sha256"] == image[1]
    # the transfer is not the install: the OS version changes only once the new OS runs
    assert d.firmware_version() == "bf-bundle-2.9.0-90_24.10_ubuntu-22.04_prod"
    states: set[str | None] = set()

    def running() -> bool:
        states.add(d.dpu_os_state())
        return "OsIsRunning" in states

    wait_for(running, 10, "OsIsRunning")
    assert "OsStarting" in states or "UEFI" in states
    assert d.firmware_version() == "doca-2.9.2"


def test_second_update_while_one_runs_is_retryable(bf: BfBmcProcess, image: tuple[Path, str]) -> None:
    d = driver(bf)
    bf.faults(download_chunk_delay=0.2)
    with http_file_server(image[0]) as url:
        d.firmware_install(f"{url}/doca-2.9.2.bfb")
        with pytest.raises(RetryableBmcError, match=r"another update still runs.*An update is in progress"):
            d.firmware_install(f"{url}/doca-2.9.2.bfb")
        bf.faults(download_chunk_delay=0.0)
        wait_for(lambda: bf.stats()["bfb"], 10, "transfer end")
    assert len(bf.stats()["updates"]) == 1


def test_update_refused_while_rshim_is_off(bf: BfBmcProcess) -> None:
    bf.state(rshim=False)
    with pytest.raises(FatalBmcError, match="BMC RShim is disabled"):
        driver(bf).firmware_install("http://127.0.0.1:9/x.bfb")


@pytest.fixture
def instant_power(bf: BfBmcProcess) -> Iterator[None]:
    """Power transitions without sushy's delay (a restart must not read Off to the next call)."""
    bf.faults(power_delay=0.0)
    yield
    bf.faults(power_delay=0.2)


@pytest.mark.usefixtures("instant_power")
def test_power_cycle_waits_for_the_host(bf: BfBmcProcess) -> None:
    d = driver(bf)
    d.power_cycle()  # the host may run: a DPU gets ForceRestart
    assert bf.stats()["resets"] == ["ForceRestart"]
    d.power_cycle(host_off=True)  # PowerCycle, but the emulated host still runs: deferred
    assert bf.stats()["resets"] == ["ForceRestart", "PowerCycle:deferred"]
    assert bf.stats()["pending_power_cycle"] is True
    bf.state(host_reset=True)
    assert bf.stats()["resets"][-1] == "PowerCycle" and bf.stats()["pending_power_cycle"] is False


@pytest.mark.usefixtures("instant_power")
def test_mode_set_after_two_arm_reboots_and_a_power_cycle(bf: BfBmcProcess) -> None:
    d = driver(bf)
    d.set_dpu_mode(DpuMode.NIC)
    assert d.dpu_mode() is DpuMode.DPU
    d.reset()
    bf.state(host_power="Off")
    d.power_cycle(host_off=True)
    assert d.dpu_mode() is DpuMode.DPU  # one Arm reboot is not enough
    d.reset()
    d.reset()
    d.power_cycle(host_off=True)
    assert d.dpu_mode() is DpuMode.NIC
    wait_for(lambda: d.dpu_os_state() == "UEFI", 10, "UEFI as the last state in NIC mode")


def test_power_off_on_through_bf(bf: BfBmcProcess) -> None:
    d = driver(bf)
    d.power_off()  # not waited for: the Arm stays in standby
    wait_for(lambda: d.power_state() is PowerState.OFF, 10, "Off")
    assert d.dpu_os_state() == "LowPowerStandby"
    d.power_on(wait=5)
    assert bf.stats()["resets"] == ["ForceOff", "On"]
