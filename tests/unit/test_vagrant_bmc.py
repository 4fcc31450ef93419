"""vagrant/libvirt_bmc.py without libvirt: the per-start domain definition, the reboot rule, the Once
override over Redfish (a fake libvirt records what the BMC asks of it), and its power actions."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PATH = Path(__file__).resolve().parents[2] / "vagrant" / "libvirt_bmc.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vagrant_libvirt_bmc", PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


bmc_mod = _load()
DPU_MAC, OTHER_MAC = "52:54:00:7a:0a:10", "52:54:00:7a:0a:11"
# what vagrant-libvirt defines (boot order per device, an empty <kernel/>, file consoles), trimmed
DOMAIN = f"""<domain type='qemu'><name>vagrant_dpu</name><uuid>u1</uuid>
<os><type arch='aarch64' machine='virt'>hvm</type><kernel></kernel><boot dev='hd'/></os>
<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>
<devices><disk type='file' device='disk'><boot order='1'/></disk>
<interface type='bridge'><mac address='{OTHER_MAC}'/></interface>
<interface type='bridge'><mac address='{DPU_MAC}'/><boot order='2'/></interface>
<serial type='file'><source path='/tmp/does-not-matter.log'/></serial>
<console type='file'><source path='/tmp/does-not-matter.log'/></console></devices></domain>"""


def _order(tree: ET.Element) -> list[str]:
    got = []
    for el in tree.iter():
        b = el.find("boot")
        if b is not None and el.tag in ("disk", "interface"):
            mac = el.find("mac")
            got.append((int(b.get("order", "0")), "disk" if el.tag == "disk" else str(mac.get("address"))
                        if mac is not None else "?"))
    return [name for _, name in sorted(got)]


def test_pxe_start_boots_the_boot_nic_then_the_disk() -> None:
    m = bmc_mod.Machine("u1", boot_mac=DPU_MAC)
    tree = bmc_mod.boot_xml(ET.fromstring(DOMAIN), m, "Pxe")
    assert _order(tree) == [DPU_MAC, "disk"]  # only the OOB port, not every NIC (sushy's Pxe)
    assert tree.find("os/boot") is None and tree.find("os/kernel") is None
    assert tree.findtext("on_reboot") == "destroy"
    assert [s.get("append") for s in tree.iter("source")] == ["on", "on"]


def test_disk_start_is_firmware_boot_for_the_dpu_and_direct_kernel_for_the_host() -> None:
    dpu = bmc_mod.boot_xml(ET.fromstring(DOMAIN), bmc_mod.Machine("u1", boot_mac=DPU_MAC), "Hdd")
    assert _order(dpu) == ["disk", DPU_MAC] and dpu.find("os/kernel") is None
    host = bmc_mod.Machine("u1", boot_mac=DPU_MAC, disk_kernel=("/k", "/i", "root=/dev/vda"))
    tree = bmc_mod.boot_xml(ET.fromstring(DOMAIN), host, "Hdd")
    assert [tree.findtext(f"os/{t}") for t in ("kernel", "initrd", "cmdline")] == ["/k", "/i", "root=/dev/vda"]
    # ... and a PXE start of the same host takes the kernel out again
    again = bmc_mod.boot_xml(tree, host, "Pxe")
    assert again.find("os/kernel") is None and _order(again) == [DPU_MAC, "disk"]


@pytest.mark.parametrize(("tail", "rebooted"), [
    ("BF-INSTALL: done, rebooting\n[   61.2] reboot: Restarting system\n", True),
    ("[ 3.1] reboot: Power down\n", False),
    ("[ 3.1] reboot: System halted\n", False),
    ("reboot: Power down\n...\nreboot: Restarting system\n", True),  # the last word counts
    ("BdsDxe: failed to load Boot0001\n", True),  # firmware resets without a word
])
def test_guest_rebooted_reads_the_kernels_last_words(tail: str, rebooted: bool) -> None:
    assert bmc_mod.guest_rebooted(tail) is rebooted


class FakeDom:
    def __init__(self, lv: FakeLibvirt) -> None:
        self.lv, self.active, self.xml = lv, False, DOMAIN

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def isActive(self) -> bool:
        return self.active

    def create(self) -> None:
        self.active = True
        self.lv.calls.append(("create", _order(ET.fromstring(self.xml))))

    def destroy(self) -> None:
        self.active = False
        self.lv.calls.append(("destroy", []))

    def name(self) -> str:
        return "vagrant_dpu"

    def state(self) -> list[int]:
        return [1 if self.active else 5, 1]


class FakeLibvirt:
    VIR_DOMAIN_XML_INACTIVE = 2
    libvirtError = RuntimeError

    def __init__(self) -> None:
        self.dom = FakeDom(self)
        self.calls: list[tuple[str, list[str]]] = []

    def open(self, uri: str) -> Any:
        lv = self

        class Conn:
            def lookupByUUIDString(self, u: str) -> FakeDom:
                return lv.dom

            def defineXML(self, xml: str) -> None:
                lv.dom.xml = xml

            def close(self) -> None:
                pass

        return Conn()


def _bmc(tmp_path: Path) -> tuple[Any, Any, FakeLibvirt]:
    lv = FakeLibvirt()
    lv.dom.xml = DOMAIN.replace("/tmp/does-not-matter.log", str(tmp_path / "console.log"))
    m = bmc_mod.Machine("u1", boot_mac=DPU_MAC)
    return bmc_mod.Bmc("qemu:///x", [m], lv), m, lv


def _call(app: Any, method: str, path: str, body: Any = None) -> tuple[str, Any]:
    raw = json.dumps(body).encode() if body is not None else b""
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(raw)),
           "wsgi.input": io.BytesIO(raw)}
    got: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"] = status
        return lambda _b: None

    out = b"".join(app(env, start_response))
    return got["status"], (json.loads(out) if out else None)


def _sushy(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """What sushy-tools answers for a System: its template's Continuous, whatever was asked."""
    body = json.dumps({"Id": "u1", "Boot": {"BootSourceOverrideTarget": "Pxe",
                                            "BootSourceOverrideEnabled": "Continuous"}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def test_once_override_is_used_by_one_start_only(tmp_path: Path) -> None:
    bmc, m, lv = _bmc(tmp_path)
    app = bmc_mod.boot_middleware(_sushy, bmc)
    sys_path = "/redfish/v1/Systems/u1"
    status, _ = _call(app, "PATCH", sys_path, {"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                        "BootSourceOverrideEnabled": "Once"}})
    assert status.startswith("204")
    _, doc = _call(app, "GET", sys_path)
    assert doc["Boot"] == {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}
    bmc.set_power(m, "On")
    assert lv.calls[-1] == ("create", [DPU_MAC, "disk"])
    _, doc = _call(app, "GET", sys_path)
    assert doc["Boot"] == {"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Disabled"}
    bmc.set_power(m, "ForceRestart")  # the override was used up: the normal order, disk first
    assert lv.calls[-2:] == [("destroy", []), ("create", ["disk", DPU_MAC])]
    assert (tmp_path / "console.log").read_text().count("==== vagrant-bmc start vagrant_dpu") == 2


def test_clear_and_bad_overrides(tmp_path: Path) -> None:
    bmc, m, _ = _bmc(tmp_path)
    app = bmc_mod.boot_middleware(_sushy, bmc)
    sys_path = "/redfish/v1/Systems/u1"
    _call(app, "PATCH", sys_path, {"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}})
    # bootsvc's clear for sushy-tools (bootsvc/power/quirks.py clear_target Hdd), and the bare Disabled
    for clear in ({"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Disabled"},
                  {"BootSourceOverrideEnabled": "Disabled"}):
        m.pending = "Pxe"
        assert _call(app, "PATCH", sys_path, {"Boot": clear})[0].startswith("204")
        assert m.pending is None
    status, doc = _call(app, "PATCH", sys_path, {"Boot": {"BootSourceOverrideTarget": "Cd"}})
    assert status.startswith("400") and "unsupported boot override" in doc["error"]["message"]
    status, doc = _call(app, "PATCH", sys_path, ["Boot"])
    assert status.startswith("400") and "not a JSON object" in doc["error"]["message"]
    # another system's path, or a sub-resource, is sushy's
    assert _call(app, "GET", "/redfish/v1/Systems/u2")[1]["Boot"]["BootSourceOverrideEnabled"] == "Continuous"


def _follow_once(bmc: Any) -> None:
    """One pass of the follower's loop (its stop event says: go on once, then stop)."""
    answers = iter([False, True])
    bmc.stop.wait = lambda _t: next(answers)
    bmc.follow()


def test_follower_restarts_a_rebooted_guest_and_leaves_a_powered_off_one(tmp_path: Path) -> None:
    bmc, m, lv = _bmc(tmp_path)
    console = tmp_path / "console.log"
    m.pending = "Pxe"
    bmc.set_power(m, "On")
    lv.dom.active = False  # on_reboot=destroy: the guest's reboot ended QEMU
    with console.open("a") as f:
        f.write("BF-INSTALL: done, rebooting\nreboot: Restarting system\n")
    _follow_once(bmc)
    assert lv.dom.active and lv.calls[-1] == ("create", ["disk", DPU_MAC]) and m.expect_running
    lv.dom.active = False
    with console.open("a") as f:
        f.write("reboot: Power down\n")
    _follow_once(bmc)
    assert not lv.dom.active and not m.expect_running
    # powered off by the BMC: never started again by the follower, whatever the console said last
    bmc.set_power(m, "On")
    with console.open("a") as f:
        f.write("reboot: Restarting system\n")
    bmc.set_power(m, "ForceOff")
    n = len(lv.calls)
    _follow_once(bmc)
    assert len(lv.calls) == n and not lv.dom.active


def test_unknown_reset_type_is_refused(tmp_path: Path) -> None:
    bmc, m, _ = _bmc(tmp_path)
    with pytest.raises(ValueError, match="unsupported ResetType"):
        bmc.set_power(m, "Explode")
