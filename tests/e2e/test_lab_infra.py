"""Self-tests of the lab machinery (bootsvc/lab), independent of bootsvc's own servers.

Pure tests (topology naming, QEMU command lines, capture files) run anywhere. ``netns`` tests build
topologies under the ``blt`` prefix and check nothing is left behind. ``qemu`` tests PXE-boot real
firmware (SeaBIOS iPXE, OVMF iPXE, OVMF native PXE, AAVMF arm64, SeaBIOS behind dhcrelay) against dnsmasq +
an in-process HTTP server inside the lab namespace and wait for the initramfs callbacks; the DPU test
installs the lab DOCA image with bf.cfg and boots it from disk through QemuPowerBackend.
Set BOOTSVC_LAB_TIMINGS=<file> to append the measured timings as JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsvc import config as config_mod
from bootsvc.lab import fabric, leaf, rack
from bootsvc.lab import netns as nsmod
from bootsvc.lab.artifacts import LabArtifacts, build_artifacts, build_doca_image
from bootsvc.lab.capture import Capture, decode_dhcp, option_codes, tftp_requests
from bootsvc.lab.netns import Lab, LabError, Topology, pxe_topology, root_links_with_prefix, sweep
from bootsvc.lab.qemu import (
    BootDevice,
    Nic,
    QemuPowerBackend,
    Vm,
    VmKind,
    VmSpec,
    detect_accel,
    qemu_argv,
)
from bootsvc.lab.refservices import LabHttp, NodeBoot, dnsmasq_conf

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "dhcp" / "captures"
PREFIX = "blt"


def _timing(name: str, **values: float | str) -> None:
    line = json.dumps({"test": name, **values})
    print(line)
    f = os.environ.get("BOOTSVC_LAB_TIMINGS")
    if f:
        with open(f, "a") as fh:
            fh.write(line + "\n")


# ---- pure -------------------------------------------------------------------------------------------
def test_topology_names_prefix_and_limits() -> None:
    t = Topology("bl")
    assert t.netns("prov") == "bl-prov"
    assert t.bridge("prov", "br0", ["10.9.0.1/24"]) == "blbr0"
    with pytest.raises(LabError):
        t.bridge("prov", "br0")  # twice
    with pytest.raises(LabError):
        t.tap("prov", "a-very-long-name")  # > 15 chars
    with pytest.raises(LabError):
        t.tap("nope", "tap0")  # undeclared namespace
    with pytest.raises(LabError):
        t.route("prov", "0.0.0.0/0", via="10.9.0.2")  # no default routes, ever
    with pytest.raises(LabError):
        t.sysctl("prov", "kernel.panic", 1)  # only per-netns net.* keys
    for bad in ("lc", "eth", "b", "BL1", "bl-x"):
        with pytest.raises(LabError):
            Topology(bad)
    cmds = pxe_topology("bl9", relay=True).commands()
    devs = {c[c.index("add") + 1] for c in cmds if "link" in c and "add" in c}
    devs |= {c[c.index("dev") + 1] for c in cmds if "tuntap" in c}
    assert devs == {"bl9br0", "bl9tap0", "bl9br1", "bl9rtap0", "bl9vp"}
    assert all(len(d) <= 15 for d in devs)
    assert not any("default" in c for c in cmds)


def test_qemu_argv_per_kind() -> None:
    nic = (Nic("bltap0", "52:54:00:00:00:01"),)
    vars_ = Path("/tmp/v.fd")
    bios = qemu_argv(VmSpec("a", VmKind.BIOS, "bl-prov", nic), vars_path=None, qmp_path=None, accel="tcg")
    dev = bios[bios.index("-device") + 1]
    assert "disable-legacy=on" in dev and "romfile=/usr/lib/ipxe/qemu/pxe-virtio.rom" in dev
    assert "bootindex=1" in dev and "-no-reboot" in bios and "pflash" not in " ".join(bios)
    assert bios[bios.index("-uuid") + 1] == "7ab00000-0000-4000-8000-525400000001"
    uefi = qemu_argv(VmSpec("a", VmKind.UEFI, "n", nic), vars_path=vars_, qmp_path=None, accel="tcg")
    assert "romfile=/usr/lib/ipxe/qemu/efi-virtio.rom" in " ".join(uefi) and "OVMF_CODE_4M" in " ".join(uefi)
    native = qemu_argv(VmSpec("a", VmKind.UEFI_NATIVE, "n", nic), vars_path=vars_, qmp_path=None, accel="tcg")
    assert re.search(r"romfile=(,|$)", native[native.index("-device") + 1])
    arm = qemu_argv(VmSpec("a", VmKind.ARM64, "n", nic), vars_path=vars_, qmp_path=None, accel="kvm")
    assert arm[0] == "qemu-system-aarch64" and "virt,accel=tcg" in arm and "AAVMF_CODE" in " ".join(arm)
    # the arm64 DPU's firmware boot order, like a BF3's: disk first, PXE second; a one-time PXE override
    # puts the NIC first (and never a -kernel: it boots what it installed)
    for boot, nic_i, disk_i in ((BootDevice.DISK, 2, 1), (BootDevice.NETWORK, 1, 2)):
        a = qemu_argv(VmSpec("a", VmKind.ARM64, "n", nic, disk=Path("/d.raw"), boot=boot), vars_path=vars_,
                      qmp_path=None, accel="tcg")
        devs = [a[i + 1] for i, x in enumerate(a) if x == "-device"]
        assert f"bootindex={nic_i}" in devs[0] and f"bootindex={disk_i}" in devs[1] and "-kernel" not in a
    disk = qemu_argv(VmSpec("a", VmKind.BIOS, "n", nic, disk=Path("/d.raw"), boot=BootDevice.DISK,
                            kernel=Path("/k"), initrd=Path("/i"), append="root=/dev/vda"),
                     vars_path=None, qmp_path=None, accel="tcg")
    assert "bootindex=1" not in " ".join(disk) and disk[disk.index("-append") + 1] == "root=/dev/vda"
    with pytest.raises(Exception, match="NVRAM"):
        qemu_argv(VmSpec("a", VmKind.UEFI, "n", nic), vars_path=None, qmp_path=None, accel="tcg")


def test_power_backend_boot_override_semantics(tmp_path: Path) -> None:
    spec = VmSpec("pb", VmKind.BIOS, "bl-x", (Nic("bltap0", "52:54:00:00:00:02"),))
    pb = QemuPowerBackend(spec, tmp_path, disk_kernel=Path("/k"))
    assert (pb.get_power_state(), pb.get_boot_device(), pb.next_boot()) == ("Off", "Hdd", BootDevice.DISK)
    pb.set_boot_device("Pxe", once=True)
    assert pb.get_boot_device() == "Pxe" and pb.default_boot is BootDevice.DISK
    pb.set_boot_device("Pxe", once=False)  # Continuous: becomes the default
    pb.set_boot_device("Hdd", once=True)
    assert pb.get_boot_device() == "Hdd" and pb.default_boot.value == "network"
    with pytest.raises(Exception, match="boot target"):
        pb.set_boot_device("Floppy")
    with pytest.raises(Exception, match="ResetType"):
        pb.set_power_state("Explode")
    pb.set_power_state("ForceOff")  # off stays off, no QEMU started
    assert pb.get_power_state() == "Off" and pb.boots == []


def test_detect_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTSVC_LAB_ACCEL", "tcg")
    assert detect_accel() == "tcg"
    monkeypatch.delenv("BOOTSVC_LAB_ACCEL")
    if Path("/sys/module/kvm_pvm").exists():
        assert detect_accel() == "tcg"  # PVM can't run firmware (lab.md section 7)


@pytest.mark.parametrize(("kind", "arch", "vci", "user_class"), [
    ("seabios-ipxe", 0, "PXEClient:Arch:00000:UNDI:002001", "iPXE"),
    ("ovmf-ipxe", 7, "PXEClient:Arch:00007:UNDI:003010", "iPXE"),
    ("ovmf-native", 7, "PXEClient:Arch:00007:UNDI:003000", None),
    ("aavmf-arm64", 11, "PXEClient:Arch:00011:UNDI:003000", None),
])
def test_saved_captures_are_consistent(kind: str, arch: int, vci: str, user_class: str | None) -> None:
    """The hex files decode to what their comments claim (opt93 and opt60 read from the raw bytes)."""
    lines = [ln for ln in (CAPTURES / f"{kind}.hex").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) >= 2
    first = bytes.fromhex(lines[0])
    assert first[236:240] == b"\x63\x82\x53\x63" and first[0] == 1  # BOOTREQUEST with the magic cookie
    opts = _options(first)
    assert opts[53] == b"\x01"  # DISCOVER
    assert int.from_bytes(opts[93], "big") == arch
    assert opts[60].decode() == vci
    if user_class:
        assert user_class.encode() in opts[77]
    else:
        assert 77 not in opts
    assert option_codes(first)[-1] == 255


def _options(msg: bytes) -> dict[int, bytes]:
    out, i = {}, 240
    while i < len(msg) and msg[i] != 255:
        if msg[i] == 0:
            i += 1
            continue
        out[msg[i]] = msg[i + 2:i + 2 + msg[i + 1]]
        i += 2 + msg[i + 1]
    return out


# ---- netns ------------------------------------------------------------------------------------------
def _leftovers(prefix: str) -> tuple[list[str], list[str]]:
    return nsmod.list_namespaces(prefix), root_links_with_prefix(prefix)


@pytest.mark.netns
def test_topology_up_down_leaves_nothing() -> None:
    t = pxe_topology(PREFIX + "u", relay=True, taps=2)
    with Lab(t) as lab:
        assert set(nsmod.list_namespaces(PREFIX + "u")) == {"bltu-prov", "bltu-dpu"}
        addrs = lab.exec_in("prov", ["ip", "-br", "addr"]).stdout
        assert "10.77.0.1/24" in addrs and "10.77.1.1/24" in addrs
        assert lab.exec_in("dpu", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        # routed across the veth to the relay side, and no default route anywhere
        lab.exec_in("prov", ["ping", "-c1", "-W2", "10.77.2.1"])
        for ns in ("prov", "dpu"):
            assert "default" not in lab.exec_in(ns, ["ip", "route"]).stdout
            assert "default" not in lab.exec_in(ns, ["ip", "-6", "route"]).stdout
        names = {link["ifname"] for link in lab.links("prov")}
        assert names == {"lo", "bltubr0", "bltutap0", "bltutap1", "bltuvp"}
        extra = lab.add_tap("prov", "tap9", bridge="bltubr0")
        assert '"master":"bltubr0"' in lab.exec_in("prov", ["ip", "-j", "link", "show", extra]).stdout
        p = lab.popen("dpu", ["sleep", "300"])
        assert p.poll() is None
    assert p.poll() is not None  # recorded process killed
    assert _leftovers(PREFIX + "u") == ([], [])
    assert not (nsmod._state_dir() / "bltu.json").exists()


@pytest.mark.netns
def test_cleanup_on_failure_and_sweep_after_crash(tmp_path: Path) -> None:
    t = pxe_topology(PREFIX + "f")
    with pytest.raises(RuntimeError, match="boom"), Lab(t) as lab:
        lab.popen("prov", ["sleep", "300"])
        raise RuntimeError("boom")
    assert _leftovers(PREFIX + "f") == ([], [])
    # a crashed run: the process dies without cleanup, leaving a namespace and a child running in it
    code = ("import os,sys; from bootsvc.lab.netns import Lab, pxe_topology\n"
            "lab = Lab(pxe_topology('bltc')); lab.up(); p = lab.popen('prov', ['sleep', '300'])\n"
            "print(p.pid, flush=True); os._exit(3)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    pid = int(res.stdout.split()[0])
    assert nsmod.list_namespaces("bltc") == ["bltc-prov"]
    assert nsmod._alive(pid)
    assert sweep("bltc") == ["bltc-prov"]
    assert not nsmod._alive(pid)
    assert _leftovers("bltc") == ([], [])


# ---- qemu -------------------------------------------------------------------------------------------
@dataclass
class PxeLab:
    lab: Lab
    topo: Topology
    http: LabHttp
    arts: LabArtifacts
    work: Path
    tftp: Path


def _wait_udp_port(lab: Lab, ns: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.exec_in(ns, ["ss", "-Hlun", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on udp {port} in {ns}")


@pytest.fixture(scope="module")
def pxe_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PxeLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    arts = build_artifacts()
    work = tmp_path_factory.mktemp("pxelab")
    tftp = work / "tftp"
    shutil.copytree(arts.tftp_root, tftp)
    (tftp / "grub").mkdir()
    t = pxe_topology(PREFIX, relay=True, taps=4)
    with Lab(t) as lab:
        conf = work / "dnsmasq.conf"
        conf.write_text(dnsmasq_conf(
            interfaces=[t.dev("br0"), t.dev("vp")],
            ranges=[("direct", "10.77.0.100", "10.77.0.199"), ("relayed", "10.77.2.100", "10.77.2.199")],
            tftp_root=tftp, http_url="http://10.77.0.1:8080", relay_url="http://10.77.1.1:8080",
            relay_router="10.77.2.1", leasefile=work / "leases", logfile=work / "dnsmasq.log",
            ra_prefixes=["fd00:a:4d::"]))
        (work / "leases").touch()
        lab.popen("prov", ["dnsmasq", "-k", "-C", str(conf)])
        # the "DPU": dhcrelay adds option 82 (circuit-id = downstream ifname); RA-only dnsmasq there
        lab.popen("dpu", ["dhcrelay", "-4", "-d", "-a", "-id", t.dev("br1"), "-iu", t.dev("vd"), "10.77.1.1"])
        lab.popen("dpu", ["dnsmasq", "-k", "--port=0", "--bind-interfaces", f"--interface={t.dev('br1')}",
                          "--enable-ra", "--dhcp-range=fd00:a:4d:2::,ra-only,64,10m",
                          f"--ra-param={t.dev('br1')},10,0", "--pid-file=", "--user=root",
                          f"--log-facility={work / 'dpu-ra.log'}"])
        _wait_udp_port(lab, "prov", 67)
        files = {"vmlinuz": arts.kernel, "initrd.gz": arts.initrd, "Image": arts.kernel_arm64,
                 "initrd-arm64.gz": arts.initrd_arm64}
        # the relayed clients reach the server as 10.77.1.1: bind the HTTP server to both addresses
        with LabHttp(lab.ns("prov"), "0.0.0.0", 8080, files) as http:
            yield PxeLab(lab, t, http, arts, work, tftp)
    assert _leftovers(PREFIX) == ([], [])


def _boot(px: PxeLab, kind: VmKind, mac: str, tap: str, *, ns: str = "prov",
          cap_ns: str = "prov", cap_if: str = "br0", timeout: float = 120) -> tuple[Vm, Path, dict[str, float]]:
    pcap = px.work / f"{kind}-{mac.replace(':', '')}.pcap"
    spec = VmSpec(name=f"{kind}-{mac[-2:]}", kind=kind, netns=px.lab.ns(ns), nics=(Nic(px.topo.dev(tap), mac),))
    with Capture(px.lab, cap_ns, px.topo.dev(cap_if), pcap), Vm(spec, px.work, on_pid=px.lab.record_pid) as vm:
        started = px.http.wait_callback(mac, "started", timeout, since=vm.t0)
        done = px.http.wait_callback(mac, "done", timeout, since=vm.t0)
        vm.wait_exit(30)
        time.sleep(0.2)  # the capture's last packets are in flight to dumpcap
    assert vm.exit_reason() == "poweroff"
    for ev in (started, done):
        assert ev.data["token"] == "lab-token" and ev.data["authorization"] == "Bearer lab-token"
    times = {"callback_started_s": round(started.t - vm.t0, 2), "callback_done_s": round(done.t - vm.t0, 2),
             "qemu_exit_s": round(vm.exit_time or 0, 2)}
    return vm, pcap, times


@pytest.mark.qemu
def test_bios_pxe_boot_and_callback(pxe_lab: PxeLab) -> None:
    mac = "52:54:00:4c:01:10"
    vm, pcap, times = _boot(pxe_lab, VmKind.BIOS, mac, "tap0")
    req = [p for p in decode_dhcp(pcap) if p.chaddr == mac and p.type_name == "DISCOVER"]
    assert req[0].opt93 == 0 and req[0].opt77 == "iPXE"
    assert req[0].opt97_uuid.replace("-", "").endswith(mac.replace(":", ""))
    assert any(p.opt60.startswith("udhcp") for p in req)  # the initramfs DORA followed
    vm.wait_for_serial(r"BOOTSVC-LAB: callback done ok", 1)  # already in the buffer
    _timing("bios", **times)


@pytest.mark.qemu
def test_uefi_ipxe_rom_boot_and_callback(pxe_lab: PxeLab) -> None:
    mac = "52:54:00:4c:01:11"
    _, pcap, times = _boot(pxe_lab, VmKind.UEFI, mac, "tap1")
    first = next(p for p in decode_dhcp(pcap) if p.chaddr == mac)
    assert first.opt93 == 7 and first.opt77 == "iPXE"
    _timing("uefi", **times)


@pytest.mark.qemu
def test_uefi_native_pxe_chainloads_ipxe_and_calls_back(pxe_lab: PxeLab) -> None:
    mac = "52:54:00:4c:01:12"
    _, pcap, times = _boot(pxe_lab, VmKind.UEFI_NATIVE, mac, "tap2")
    pk = [p for p in decode_dhcp(pcap) if p.chaddr == mac and p.type_name == "DISCOVER"]
    assert pk[0].opt93 == 7 and pk[0].opt77 == "" and pk[0].opt60.endswith("UNDI:003000")
    assert any(p.opt77 == "iPXE" for p in pk[1:])  # snponly.efi's own DHCP
    assert [f for _, f in tftp_requests(pcap)][:1] == ["snponly.efi"]
    _timing("uefi-native", **times)


@pytest.mark.qemu
def test_arm64_gets_grub_nbp_and_calls_back(pxe_lab: PxeLab) -> None:
    mac = "52:54:00:4c:01:20"
    (pxe_lab.tftp / "grub" / f"grub.cfg-{mac}").write_text(
        "echo per-node grub config\n"
        "linux (http,10.77.0.1:8080)/Image console=ttyAMA0 panic=-1 bootsvc.cb=http://10.77.0.1:8080/cb "
        "bootsvc.token=lab-token\n"
        "initrd (http,10.77.0.1:8080)/initrd-arm64.gz\nboot\n")
    vm, pcap, times = _boot(pxe_lab, VmKind.ARM64, mac, "tap3", timeout=180)
    first = next(p for p in decode_dhcp(pcap) if p.chaddr == mac)
    assert first.opt93 == 11
    # GRUB asks for "/grub/grub.cfg-<mac>" (leading slash: prefix is "(tftp,server)/grub")
    files = [f.lstrip("/") for _, f in tftp_requests(pcap)]
    assert files[0] == "arm64/grubnetaa64.efi" and f"grub/grub.cfg-{mac}" in files
    nbp, _ = vm.wait_for_serial(r"NBP file downloaded successfully", 1)
    vm.wait_for_serial(r"per-node grub config", 1)
    done = pxe_lab.http.wait_callback(mac, "done", 1)
    assert done.data["arch"] == "aarch64"
    _timing("arm64", nbp_s=round(nbp.t, 2), **times)


@pytest.mark.qemu
def test_bios_behind_dhcrelay_gets_giaddr_and_opt82(pxe_lab: PxeLab) -> None:
    mac = "52:54:00:4c:02:10"
    _, pcap, times = _boot(pxe_lab, VmKind.BIOS, mac, "rtap0", ns="dpu", cap_if="vp")
    relayed = [p for p in decode_dhcp(pcap) if p.chaddr == mac and p.from_client]
    assert relayed and all(p.giaddr == "10.77.2.1" for p in relayed)
    assert all(p.opt82_circuit == pxe_lab.topo.dev("br1").encode() for p in relayed)
    done = pxe_lab.http.wait_callback(mac, "done", 1)
    assert done.data["ip"].startswith("10.77.2.")
    _timing("relay-bios", **times)


# ---- DPU install: lab DOCA image + bf.cfg + disk boot via the power backend --------------------------
AGENT_PY = """import json, platform, subprocess, sys, urllib.request
cb, token = sys.argv[1], sys.argv[2]
nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True).returncode
mac = open("/sys/class/net/eth0/address").read().strip()
body = {"event": "os-up", "token": token, "mac": mac, "python": platform.python_version(), "nft_rc": nft,
        "image": json.load(open("/etc/bootsvc-lab-image"))}
req = urllib.request.Request(cb, json.dumps(body).encode(), {"Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=10).read()
"""

BF_CFG = """# lab bf.cfg: sourced by the installer; bfb_modify_os runs with the new root at /mnt
bfb_modify_os() {
  mkdir -p /mnt/opt/lab-agent
  timeout 30 wget -q -O /mnt/opt/lab-agent/agent.py @BASE@/agent.py || return 1
  printf '#!/bin/sh\\nexec python3 /opt/lab-agent/agent.py "%s" "%s"\\n' "$BOOTSVC_CB" "$BOOTSVC_TOKEN" \\
    > /mnt/etc/bootsvc-lab/rc.d/50-agent
  chmod 755 /mnt/etc/bootsvc-lab/rc.d/50-agent
}
"""


@pytest.mark.qemu
def test_dpu_install_writes_image_runs_bfcfg_and_boots_disk(pxe_lab: PxeLab) -> None:
    img = build_doca_image()
    base = "http://10.77.0.1:8080"
    mac = "52:54:00:4c:03:10"
    (pxe_lab.work / "bf.cfg").write_text(BF_CFG.replace("@BASE@", base))
    (pxe_lab.work / "agent.py").write_text(AGENT_PY)
    pxe_lab.http.files |= {"doca.img.gz": img.path, "bf.cfg": pxe_lab.work / "bf.cfg",
                           "agent.py": pxe_lab.work / "agent.py"}
    pxe_lab.http.nodes[mac] = NodeBoot(token="dpu-token", append=(
        f"bootsvc.mode=dpu-install bootsvc.image={base}/doca.img.gz bootsvc.sha256={img.sha256} "
        f"bootsvc.bfcfg={base}/bf.cfg"))
    disk = pxe_lab.work / "dpu.raw"
    with disk.open("wb") as f:
        f.truncate(img.raw_size + (64 << 20))
    # UEFI like a BlueField: OVMF's own PXE for the install, OVMF + direct kernel for the disk boot
    spec = VmSpec(name="dpu", kind=VmKind.UEFI_NATIVE, netns=pxe_lab.lab.ns("prov"),
                  nics=(Nic(pxe_lab.topo.dev("tap0"), mac),), disk=disk, mem_mb=768)
    pb = QemuPowerBackend(spec, pxe_lab.work, on_pid=pxe_lab.lab.record_pid, disk_kernel=pxe_lab.arts.kernel,
                          disk_initrd=pxe_lab.arts.initrd,
                          disk_append="console=ttyS0,115200 panic=-1 bootsvc.mode=disk root=/dev/vda")
    assert pb.get_boot_device() == "Hdd" and pb.get_power_state() == "Off"
    pb.set_boot_device("Pxe", once=True)
    try:
        t0 = time.time()
        pb.set_power_state("On")
        assert pb.get_power_state() == "On"
        http = pxe_lab.http
        done = http.wait_callback(mac, "done", 400, since=t0)
        up = http.wait_event(lambda e: e.kind == "callback" and e.data.get("event") == "os-up"
                             and e.data.get("mac") == mac, 180, since=t0)
        assert up.data["token"] == "dpu-token" and up.data["nft_rc"] == 0
        assert up.data["python"].startswith("3.") and up.data["image"]["key"] == img.key
        # PXE once, then the guest's reboot came back from disk (Once honoured)
        assert [d for _, d in pb.boots] == [BootDevice.NETWORK, BootDevice.DISK]
        assert pb.get_boot_device() == "Hdd"
        phases = [e.data.get("phase") for e in http.callbacks(mac) if e.data.get("event") == "progress"]
        assert {"bfcfg", "download", "verified", "modify_os"} <= set(phases)
        _timing("dpu-install", done_s=round(done.t - t0, 2), os_up_s=round(up.t - t0, 2),
                image_gz_mb=round(img.size / 2**20, 1), image_raw_mb=round(img.raw_size / 2**20, 1))
        pb.set_power_state("ForceOff")
        assert pb.get_power_state() == "Off"
    finally:
        pb.close()


@pytest.mark.qemu
def test_dpu_install_rejects_bad_sha256(pxe_lab: PxeLab) -> None:
    base = "http://10.77.0.1:8080"
    mac = "52:54:00:4c:03:11"
    bad = pxe_lab.work / "bad.img"
    bad.write_bytes(os.urandom(1 << 20))
    pxe_lab.http.files["bad.img"] = bad
    pxe_lab.http.nodes[mac] = NodeBoot(token="t2", append=(
        f"bootsvc.mode=dpu-install bootsvc.image={base}/bad.img bootsvc.sha256={'0' * 64}"))
    disk = pxe_lab.work / "dpu2.raw"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    spec = VmSpec(name="dpu-bad", kind=VmKind.BIOS, netns=pxe_lab.lab.ns("prov"),
                  nics=(Nic(pxe_lab.topo.dev("tap1"), mac),), disk=disk)
    with Vm(spec, pxe_lab.work, on_pid=pxe_lab.lab.record_pid) as vm:
        failed = pxe_lab.http.wait_callback(mac, "failed", 120, since=vm.t0)
        assert failed.data["reason"] == "sha256 mismatch"
        vm.wait_exit(30)
    assert vm.exit_reason() == "poweroff"  # a failed install must not reboot into a broken disk
    assert not [e for e in pxe_lab.http.callbacks(mac) if e.data.get("event") == "done"]


@pytest.mark.qemu
def test_host_install_writes_exact_image_bytes(pxe_lab: PxeLab) -> None:
    """host-install mode: gzip image streamed to /dev/vda, sha256 checked against URL.sha256 (no
    bootsvc.sha256 given), then power off (bootsvc.after); the disk file must hold the image bytes."""
    import gzip
    import hashlib

    base = "http://10.77.0.1:8080"
    mac = "52:54:00:4c:04:10"
    raw = os.urandom(3 << 20) + b"bootsvc-lab-host-image\n"
    gz = pxe_lab.work / "host.img.gz"
    gz.write_bytes(gzip.compress(raw, compresslevel=1))
    (pxe_lab.work / "host.img.gz.sha256").write_text(hashlib.sha256(gz.read_bytes()).hexdigest() + "  host.img.gz\n")
    pxe_lab.http.files |= {"host.img.gz": gz, "host.img.gz.sha256": pxe_lab.work / "host.img.gz.sha256"}
    pxe_lab.http.nodes[mac] = NodeBoot(token="h1", append=(
        f"bootsvc.mode=host-install bootsvc.image={base}/host.img.gz bootsvc.after=poweroff"))
    disk = pxe_lab.work / "host.raw"
    with disk.open("wb") as f:
        f.truncate(16 << 20)
    spec = VmSpec(name="host", kind=VmKind.BIOS, netns=pxe_lab.lab.ns("prov"),
                  nics=(Nic(pxe_lab.topo.dev("tap2"), mac),), disk=disk)
    with Vm(spec, pxe_lab.work, on_pid=pxe_lab.lab.record_pid) as vm:
        done = pxe_lab.http.wait_callback(mac, "done", 120, since=vm.t0)
        vm.wait_exit(30)
    assert vm.exit_reason() == "poweroff"
    assert disk.read_bytes()[:len(raw)] == raw
    assert "sha256" in "".join(e.path for e in pxe_lab.http.events if e.kind == "http")
    _timing("host-install", done_s=round(done.t - vm.t0, 2))


# ---- the lab leaf (bootsvc/lab/leaf.py, fabric.py): real FRR in the rack's namespaces, no VMs ------------
LEAF_PREFIX = "blq"
STANDIN = {1: ("10.255.0.101", 65101), 2: ("10.255.0.102", 65102)}  # VTEP /32, ASN of the stand-in DPUs


def _leaf_site(tmp: Path) -> Any:
    """config/lab.yaml with this test's prefix, ports and rack state (2 pairs)."""
    tree = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "lab.yaml").read_text())
    ns = f"{LEAF_PREFIX}-prov"
    tree["listeners"]["dhcp"] = [{"interface": f"{LEAF_PREFIX}br0", "address": "10.77.0.1", "netns": ns}]
    tree["lab"] = {"prefix": LEAF_PREFIX, "bmc_port_base": 18640, "workdir": str(tmp / "rack"),
                   "machines": tree["lab"]["machines"][:2]}
    return config_mod.from_mapping(tree, "<leaf test>", env={})


def _standin_dpu(prefix: str, i: int) -> list[int]:
    """A stand-in for DPU i's FRR: namespace <prefix>-s<i> plugged into the DPU uplink's bridge in
    <prefix>-m<i> (where the VM's eth2 tap is), BGP unnumbered to the leaf, its VTEP /32 on lo."""
    vtep, asn = STANDIN[i]
    ns, mns = f"{prefix}-s{i}", f"{prefix}-m{i}"
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True, timeout=30)  # noqa: E731
    run("ip", "netns", "add", ns)
    run("ip", "-n", mns, "link", "add", f"{prefix}{i}x", "type", "veth", "peer", "name", "eth2", "netns", ns)
    run("ip", "-n", mns, "link", "set", f"{prefix}{i}x", "master", f"{prefix}{i}ub", "up")
    run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
    for cmd in (["link", "set", "lo", "up"], ["link", "set", "eth2", "up"], ["addr", "add", f"{vtep}/32", "dev", "lo"]):
        run("ip", "-n", ns, *cmd)
    d = leaf.RUN_ROOT / f"{prefix}-s{i}"  # reachable by user frr (pytest's tmp is 0700)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    shutil.chown(d, "frr", "frr")
    pids = []
    for daemon in ("zebra", "bgpd"):
        run("ip", "netns", "exec", ns, f"/usr/lib/frr/{daemon}", "-z", str(d / "zserv.api"), "--vty_socket", str(d),
            "-f", "/dev/null", "-A", "127.0.0.1", "-P", "0", "-d", "-i", str(d / f"{daemon}.pid"),
            *(["-p", "179"] if daemon == "bgpd" else []), "--log", f"file:{d / daemon}.log")
        pids.append(int((d / f"{daemon}.pid").read_text()))
    conf = d / "frr.conf"
    conf.write_text(f"frr defaults datacenter\nrouter bgp {asn}\n bgp router-id {vtep}\n"
                    " neighbor eth2 interface remote-as external\n address-family ipv4 unicast\n"
                    f"  network {vtep}/32\n exit-address-family\n address-family l2vpn evpn\n"
                    "  neighbor eth2 activate\n exit-address-family\nexit\n")
    deadline = time.monotonic() + 30
    while subprocess.run(["vtysh", "--vty_socket", str(d), "-f", str(conf)], capture_output=True,
                         timeout=30).returncode != 0:
        assert time.monotonic() < deadline, f"stand-in {ns}: FRR did not take its config"
        time.sleep(0.2)
    return pids


@pytest.mark.netns
def test_leaf_peers_unnumbered_routes_vteps_and_captures(tmp_path: Path) -> None:
    """rack.up starts the leaf: with two stand-in DPUs on the uplink bridges, both sessions (IPv4
    unicast + l2vpn evpn) come up over IPv6 link-local only, each stand-in learns the other's VTEP
    through the leaf (RFC 8950 next hop), a VXLAN-port datagram between the VTEPs is routed by the leaf
    and LeafCapture records it on both leaf links; down leaves nothing."""
    if os.geteuid() != 0 or not Path("/usr/lib/frr/bgpd").exists():
        pytest.skip("needs root and Debian's frr")
    cfg = _leaf_site(tmp_path)
    t0 = time.monotonic()
    r = rack.up(cfg, machines=2)
    try:
        up_s = time.monotonic() - t0
        for i in (1, 2):
            for pid in _standin_dpu(LEAF_PREFIX, i):
                r.lab.record_pid(pid)

        def states() -> dict[str, str]:
            return fabric.leaf_established(cfg)

        deadline = time.monotonic() + 60
        while set(states().values()) != {"Established"}:
            assert time.monotonic() < deadline, f"leaf sessions: {states()}"
            time.sleep(0.5)
        est_s = time.monotonic() - t0 - up_s
        assert rack.status(cfg)["leaf"]["sessions"] == {"blq1l": "Established", "blq2l": "Established"}
        nb = fabric.leaf_vtysh_json(cfg, "show bgp neighbors json")
        for dev in ("blq1l", "blq2l"):
            afs = nb[dev]["addressFamilyInfo"]
            assert "ipv4Unicast" in afs and "l2VpnEvpn" in afs, afs.keys()
        # the leaf installed the VTEPs with IPv6 link-local next hops and the stand-ins learned each other's
        def has_routes(ns: str, want: tuple[str, ...]) -> bool:
            out = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True, check=True).stdout
            return all(w in out for w in want)

        deadline = time.monotonic() + 30
        while not (has_routes(f"{LEAF_PREFIX}-leaf", ("10.255.0.101", "10.255.0.102"))
                   and has_routes(f"{LEAF_PREFIX}-s1", ("10.255.0.102",))):
            assert time.monotonic() < deadline, "VTEP routes missing: " + fabric.leaf_vtysh(
                cfg, "show bgp ipv4 unicast") + subprocess.run(
                    ["ip", "-n", f"{LEAF_PREFIX}-leaf", "route"], capture_output=True, text=True).stdout
            time.sleep(0.5)
        via = subprocess.run(["ip", "-n", f"{LEAF_PREFIX}-leaf", "route", "get", "10.255.0.102"], capture_output=True,
                             text=True, check=True).stdout
        assert "via inet6 fe80:" in via and "blq2l" in via, via  # RFC 8950: IPv4 over an IPv6 next hop
        pcap = tmp_path / "leaf.pcap"
        with fabric.LeafCapture(cfg, pcap):
            s = nsmod.socket_in_netns(f"{LEAF_PREFIX}-s1", socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("10.255.0.101", 0))
                for _ in range(3):
                    s.sendto(b"\x08\x00\x00\x00\x00\x13\x89\x00" + b"x" * 14, ("10.255.0.102", 4789))
                    time.sleep(0.3)
            finally:
                s.close()
        rows = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.interface_name",
                               "-e", "ip.src", "-e", "ip.dst", "-e", "vxlan.vni", "-d", "udp.port==4789,vxlan"],
                              capture_output=True, text=True, check=True).stdout.split("\n")
        seen = {tuple(r.split("\t")) for r in rows if r}
        assert ("blq1l", "10.255.0.101", "10.255.0.102", "5001") in seen, seen  # in from stand-in 1
        assert ("blq2l", "10.255.0.101", "10.255.0.102", "5001") in seen, seen  # routed out to stand-in 2
        topo = fabric.topology(cfg)
        assert [p["leaf_dev"] for p in topo["pairs"]] == ["blq1l", "blq2l"] and topo["up"]
        _timing("leaf", rack_up_s=round(up_s, 2), leaf_established_s=round(est_s, 2))
    finally:
        rack.down(cfg)
        for i in (1, 2):
            subprocess.run(["ip", "netns", "del", f"{LEAF_PREFIX}-s{i}"], capture_output=True, check=False)
            shutil.rmtree(leaf.RUN_ROOT / f"{LEAF_PREFIX}-s{i}", ignore_errors=True)
    assert rack.leftovers(cfg) == {"namespaces": [], "root_devices": [], "processes": []}
    assert not list(nsmod.list_namespaces(LEAF_PREFIX))
    assert not leaf.rundir(LEAF_PREFIX).exists()
