"""BlueField-3 BMC flows of the Redfish driver against bootsvc.lab.bfbmc (sushy-tools + BF routes).

Covers: identity/quirks, one-time boot through /Systems/Bluefield/Settings (pending, applied at the
next reset), DPU/NIC mode read-out, BMC RShim toggle, and a BFB push through SimpleUpdate to DPU_OS
with a real HTTP download from a loopback file server, followed by TaskService polling. After every
test the emulator must report no open session.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsvc.lab.bfbmc import BfBmcProcess, http_file_server
from bootsvc.power.base import (
    BootTarget,
    DpuMode,
    FatalBmcError,
    PowerSettings,
    PowerState,
    TaskState,
    TaskStatus,
)
from bootsvc.power.redfish import RedfishDriver

USER, PASSWORD = "root", "bp-bf-pass"
REF = "env:BP_BF_USER:BP_BF_PASS"
SETTINGS = PowerSettings(poll_interval=0.05, connect_timeout=2, read_timeout=5, drop_grace=3)


@pytest.fixture(scope="module")
def bf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BfBmcProcess]:
    with BfBmcProcess(tmp_path_factory.mktemp("bfbmc"), user=USER, password=PASSWORD, power_delay=0.3) as p:
        yield p


@pytest.fixture(autouse=True)
def fresh(bf: BfBmcProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BP_BF_USER", USER)
    monkeypatch.setenv("BP_BF_PASS", PASSWORD)
    bf.reset()
    yield
    s = bf.stats()
    assert s["sessions_open"] == 0, f"session leak: {s['sessions_created']} created, {s['sessions_deleted']} deleted"


def driver(bf: BfBmcProcess) -> RedfishDriver:
    return RedfishDriver(bf.url, REF, settings=SETTINGS)


def test_identity_session_auth_and_bluefield_quirks(bf: BfBmcProcess) -> None:
    info = driver(bf).info()
    assert info.auth == "session"
    assert (info.vendor, info.model, info.firmware) == ("Nvidia", "BlueField-3 DPU", "BF-24.10-5")
    assert info.system_path == "/redfish/v1/Systems/Bluefield"
    assert info.manager_path == "/redfish/v1/Managers/Bluefield_BMC"
    assert info.quirks == ("nvidia-bluefield-bmc",)
    flags = dict(info.quirk_flags)
    assert flags["settings_resource"] and flags["system_id"] == "Bluefield"
    s = bf.stats()
    assert s["sessions_created"] == 1 and s["sessions_deleted"] == 1


def test_pxe_once_goes_to_settings_and_applies_at_reset(bf: BfBmcProcess) -> None:
    d = driver(bf)
    b = d.boot_once(BootTarget.PXE)
    assert (b.target, b.enabled, b.pending, b.sticky) == ("Pxe", "Once", True, True)
    s = bf.stats()
    assert [p[0] for p in s["patches"]] == ["/redfish/v1/Systems/Bluefield/Settings"]
    assert s["settings_boot"]["BootSourceOverrideTarget"] == "Pxe"
    assert s["live_boot"]["BootSourceOverrideTarget"] == "None"  # pending until the DPU boots
    d.reset(wait=5)
    assert bf.stats()["resets"] == ["ForceRestart"]
    assert d.boot_override().target == "Pxe"  # applied, and kept (BF keeps overrides)
    cleared = d.clear_boot_override()
    assert (cleared.target, cleared.enabled) == ("None", "Disabled")
    assert bf.stats()["settings_boot"]["BootSourceOverrideEnabled"] == "Disabled"


def test_boot_object_sent_whole_when_the_quirk_says_so(bf: BfBmcProcess) -> None:
    RedfishDriver(bf.url, REF, settings=SETTINGS).boot_once(BootTarget.PXE)
    whole = RedfishDriver(bf.url, REF, settings=SETTINGS, quirk_overrides={"sends_boot_object_whole": True})
    whole.boot_once(BootTarget.DISK)
    bodies = [p[1]["Boot"] for p in bf.stats()["patches"]]
    assert bodies == [
        {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"},
        {"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Once", "BootSourceOverrideMode": "UEFI"},
    ]


def test_uefi_http_boot_with_uri(bf: BfBmcProcess) -> None:
    uri = "http://127.0.0.1:18090/boot/arm64/snponly.efi"
    b = driver(bf).boot_once(BootTarget.HTTP, uri=uri)
    assert (b.target, b.uri) == ("UefiHttp", uri)
    assert bf.stats()["settings_boot"]["HttpBootUri"] == uri


def test_dpu_and_nic_mode_readout(bf: BfBmcProcess) -> None:
    d = driver(bf)
    assert d.dpu_mode() is DpuMode.DPU
    bf.state(mode="NicMode")
    assert d.dpu_mode() is DpuMode.NIC


def test_bmc_rshim_toggle(bf: BfBmcProcess) -> None:
    d = driver(bf)
    assert d.bmc_rshim() is False
    d.set_bmc_rshim(True)
    assert bf.stats()["rshim"] is True and d.bmc_rshim() is True
    d.set_bmc_rshim(True)  # already on: read, no PATCH
    d.set_bmc_rshim(False)
    s = bf.stats()
    assert s["rshim"] is False
    assert [p[1] for p in s["patches"]] == [{"BmcRShim": {"BmcRShimEnabled": True}},
                                            {"BmcRShim": {"BmcRShimEnabled": False}}]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    img = tmp_path / "bf-bundle-2.9.0-ubuntu-22.04.bfb"
    data = os.urandom(3 * 1024 * 1024 + 17)
    img.write_bytes(data)
    return img, hashlib.sha256(data).hexdigest()


def test_bfb_install_downloads_image_and_task_progresses(bf: BfBmcProcess, image: tuple[Path, str]) -> None:
    img, sha = image
    bf.faults(download_chunk_delay=0.02, expect_size=img.stat().st_size, expect_sha256=sha)
    d = driver(bf)
    seen: list[TaskStatus] = []
    with http_file_server(img.parent) as base:
        handle = d.install_bfb(f"{base}/{img.name}")
        assert handle.uri.startswith("/redfish/v1/TaskService/Tasks/")
        done = d.wait_task(handle, 60, on_progress=seen.append)
    assert done.state is TaskState.COMPLETED and done.percent == 100 and done.ok
    percents = [s.percent for s in seen if s.percent is not None]
    assert percents == sorted(percents)
    assert len({p for p in percents if 0 < p < 100}) >= 3, percents  # progress was visible while running
    s = bf.stats()
    assert s["rshim"] is True  # enabled before the push
    assert s["updates"] == [{"ImageURI": f"{base}/{img.name}", "TransferProtocol": "HTTP",
                             "Targets": ["redfish/v1/UpdateService/FirmwareInventory/DPU_OS"]}]
    assert s["firmware"]["DPU_OS"]["Oem"]["Nvidia"] == {"Sha256": sha, "Size": img.stat().st_size}
    assert d.firmware_version("DPU_OS") == "bf-bundle-2.9.0-ubuntu-22.04"


def test_bfb_checksum_mismatch_fails_the_task(bf: BfBmcProcess, image: tuple[Path, str]) -> None:
    img, _ = image
    bf.faults(expect_sha256="0" * 64)
    d = driver(bf)
    with http_file_server(img.parent) as base:
        handle = d.install_bfb(f"{base}/{img.name}")
        with pytest.raises(FatalBmcError, match=r"ended Exception \(Critical\): .*sha256 .* does not match"):
            d.wait_task(handle, 60)


def test_bfb_missing_image_fails_with_the_bmc_reason(bf: BfBmcProcess, tmp_path: Path) -> None:
    d = driver(bf)
    with http_file_server(tmp_path) as base:
        handle = d.install_bfb(f"{base}/nope.bfb")
        with pytest.raises(FatalBmcError, match="Image download failed: HTTP Error 404"):
            d.wait_task(handle, 30)


def test_update_refused_while_rshim_is_off(bf: BfBmcProcess) -> None:
    with pytest.raises(FatalBmcError, match=r"HTTP 400 .*BMC RShim is disabled"):
        driver(bf).firmware_install("http://127.0.0.1:18099/x.bfb")
    assert bf.stats()["updates"] == []


def test_power_off_on_through_bf(bf: BfBmcProcess) -> None:
    d = driver(bf)
    d.power_off(wait=5)
    assert d.power_state() is PowerState.OFF
    d.power_cycle(wait=5)  # cycling an Off DPU switches it on
    assert d.power_state() is PowerState.ON
    assert bf.stats()["resets"] == ["ForceOff", "On"]
