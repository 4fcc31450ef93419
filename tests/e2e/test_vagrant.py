"""``vagrant up`` of the lab pair (vagrant/Vagrantfile) against a libvirtd started inside a test-owned namespace.

What it proves, with real parts only: Debian 12's vagrant + vagrant-libvirt define and start, box-less,
the arm64 DPU VM (AAVMF, TCG) and the x86 host VM (SeaBIOS + iPXE) on the namespace's bridges, through a
libvirtd started by hand with no systemd (vagrant/libvirtd-netns.sh); both firmwares PXE-boot (the DHCP
DISCOVERs are read off the bridges: the DPU's with client architecture 11, ARM 64-bit UEFI, RFC 4578
section 2.1 and the IANA registry; the host's with 0, x86 BIOS); ``vagrant destroy`` removes both domains
and the teardown leaves no namespace, libvirtd or QEMU behind. A second test powers the vagrant-defined
pair off and on again through Redfish (sushy-tools' libvirt driver on 127.0.0.1, the BMC bootsvc's
conductor would drive) with a one-time PXE override, and both PXE-boot again. Nothing answers the DHCP: the provisioning
of this pair by bootsvc is the QEMU lab's test (tests/e2e/test_lab_e2e.py); vagrant/README.md says what
is still missing for it on libvirt.

Skips only without root or without the Debian packages (vagrant, vagrant-libvirt, libvirt-daemon,
libvirt-daemon-driver-qemu, libvirt-clients, python3-libvirt, qemu-system-arm, qemu-efi-aarch64); ``make test`` installs
them, and in CI (CI=true) their absence fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
SCRIPT = VAGRANT_DIR / "libvirtd-netns.sh"
DPU_MAC, HOST_MAC = "52:54:00:7a:0a:10", "52:54:00:7a:0a:20"
BR_OOB, BR_HOST = "vgoob0", "vghost0"
NEEDED = ("/usr/bin/vagrant", "/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/qemu-system-aarch64",
          "/usr/bin/qemu-system-x86_64", "/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/lib/ipxe/qemu/pxe-e1000.rom",
          "/usr/share/rubygems-integration/all/specifications/vagrant-libvirt-0.11.2.gemspec",
          "/usr/lib/python3/dist-packages/libvirt.py")
DPU_UUID, HOST_UUID = "7ab0b5c0-0000-4000-8000-5254007a0a10", "7ab0b5c0-0000-4000-8000-5254007a0a20"
UP_TIMEOUT = 180.0
PXE_TIMEOUT = 240.0  # the arm64 DPU is TCG: AAVMF tries the blank disk first, then PXE (about 10 s here)

# Reads DHCP client packets (UDP to port 67) off bridges inside the namespace with an AF_PACKET socket and
# prints one JSON line per first DISCOVER of each expected MAC: chaddr (RFC 2131 section 2), option 93
# (client system architecture, RFC 4578 section 2.1) and option 60. Exits when all were seen or at its
# deadline.
SNIFFER = r"""
import json, select, socket, struct, sys, time
want = dict(a.split("=") for a in sys.argv[2:])  # iface=mac
deadline = time.monotonic() + float(sys.argv[1])
socks = {}
for ifc in set(want):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((ifc, 0))
    socks[s] = ifc
print(json.dumps({"ready": True}), flush=True)
seen = set()
while len(seen) < len(want) and time.monotonic() < deadline:
    r, _, _ = select.select(list(socks), [], [], 0.5)
    for s in r:
        f = s.recv(4096)
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        u = 14 + (f[14] & 15) * 4
        if len(f) < u + 8 + 240 or struct.unpack("!H", f[u + 2:u + 4])[0] != 67:
            continue
        b = f[u + 8:]
        mac = b[28:34].hex(":")
        opts, i, o = {}, 0, b[240:]
        while i + 1 < len(o) and o[i] != 255:
            if o[i] == 0:
                i += 1
                continue
            opts[o[i]] = o[i + 2:i + 2 + o[i + 1]]
            i += 2 + o[i + 1]
        ifc = socks[s]
        if want.get(ifc) != mac or mac in seen or opts.get(53) != b"\x01":
            continue
        seen.add(mac)
        arch = int.from_bytes(opts[93], "big") if len(opts.get(93, b"")) == 2 else None
        print(json.dumps({"iface": ifc, "mac": mac, "arch": arch, "vci": opts.get(60, b"").decode("ascii", "replace"),
                          "t": time.time()}), flush=True)
"""


def _missing() -> list[str]:
    return [p for p in NEEDED if not Path(p).exists()]


@dataclass
class Env:
    ns: str
    work: Path
    socket: str

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def vagrant_env(self) -> dict[str, str]:
        return {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
                "VAGRANT_HOME": str(self.work / "vagrant-home"), "VAGRANT_DOTFILE_PATH": str(self.work / "dot"),
                "VAGRANT_CWD": str(VAGRANT_DIR), "BOOTSVC_VAGRANT_WORK": str(self.work),
                "BOOTSVC_VAGRANT_SOCKET": self.socket}

    def vagrant(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        # inside the namespace, so vagrant itself has no route anywhere
        return subprocess.run(["ip", "netns", "exec", self.ns, "vagrant", *args], env=self.vagrant_env(),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def virsh(self, *args: str) -> str:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout


@pytest.fixture
def vagrant_env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, libvirtd)")
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing in CI (make test installs them through APT_LAB): {missing}")
        pytest.skip(f"vagrant/libvirt not installed ({', '.join(missing)}); "
                    "apt-get install --no-install-recommends vagrant vagrant-libvirt libvirt-daemon "
                    "libvirt-daemon-driver-qemu libvirt-clients")
    ns = f"bsvag-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="bsvag-", dir="/tmp"))  # short: the socket path is limited to 107 bytes
    try:
        t0 = time.monotonic()
        up = subprocess.run([str(SCRIPT), "up", ns, str(work)], capture_output=True, text=True, timeout=120,
                            check=False)
        log = work / "logs" / "libvirtd.out"
        detail = log.read_text() if log.exists() else ""
        assert up.returncode == 0, f"libvirtd-netns.sh up failed: {up.stderr}\n{detail}"
        print(f"\nlibvirtd in {ns}: up in {time.monotonic() - t0:.1f} s")
        yield Env(ns, work, str(work / "run" / "libvirt-sock"))
    finally:
        pid_file = work / "libvirtd.pid"
        libvirtd_pid = int(pid_file.read_text()) if pid_file.exists() else None
        down = subprocess.run([str(SCRIPT), "down", ns, str(work)], capture_output=True, text=True, timeout=120,
                              check=False)
        assert down.returncode == 0, down.stderr
        assert not Path(f"/run/netns/{ns}").exists(), f"namespace {ns} left behind"
        if libvirtd_pid is not None:
            assert not Path(f"/proc/{libvirtd_pid}").exists() or \
                "libvirtd" not in Path(f"/proc/{libvirtd_pid}/cmdline").read_bytes().decode(errors="replace"), \
                f"libvirtd {libvirtd_pid} left running"
        shutil.rmtree(work, ignore_errors=True)


def _sniff(env: Env, timeout: float) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", env.ns, sys.executable, "-c", SNIFFER, str(timeout),
                          f"{BR_OOB}={DPU_MAC}", f"{BR_HOST}={HOST_MAC}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert json.loads(p.stdout.readline()).get("ready"), p.stderr.read() if p.stderr else ""
    return p


def _discovers(env: Env, p: subprocess.Popen[str], timeout: float) -> dict[str, dict[str, object]]:
    """The first DISCOVER of each VM; asserts both came, on the right bridge, with the right architecture."""
    out, err = p.communicate(timeout=timeout)
    seen = {d["mac"]: d for d in (json.loads(line) for line in out.splitlines() if line.strip())}
    dpu_log = env.work / "logs" / "dpu.serial.log"
    serial = dpu_log.read_text(errors="replace")[-2000:] if dpu_log.exists() else "(no serial log)"
    assert DPU_MAC in seen, f"no DHCPDISCOVER from the DPU on {BR_OOB}; sniffer: {err}\nDPU serial:\n{serial}"
    assert HOST_MAC in seen, f"no DHCPDISCOVER from the host on {BR_HOST}; sniffer: {err}"
    dpu, host = seen[DPU_MAC], seen[HOST_MAC]
    assert dpu["iface"] == BR_OOB and dpu["arch"] == 11, dpu  # RFC 4578 2.1: ARM 64-bit UEFI
    assert str(dpu["vci"]).startswith("PXEClient:Arch:00011"), dpu
    assert host["iface"] == BR_HOST and host["arch"] == 0, host
    return seen


def _vagrant_up(env: Env) -> float:
    # the DPU's NVRAM: a private copy of AAVMF's variable store, as libvirt's <nvram template> would make
    (env.work / "nvram").mkdir(exist_ok=True)
    shutil.copyfile("/usr/share/AAVMF/AAVMF_VARS.fd", env.work / "nvram" / "dpu_VARS.fd")
    t0 = time.time()
    up = env.vagrant("up", "--provider=libvirt", "--no-provision", timeout=UP_TIMEOUT)
    assert up.returncode == 0, f"vagrant up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    return time.time() - t0


def _vagrant_destroy(env: Env) -> None:
    t1 = time.time()
    # pull the plug first (what a BMC's ForceOff does): vagrant-libvirt's destroy otherwise asks the guest
    # for an ACPI power-off and waits for it (measured: 45-90 s), and firmware in a PXE loop never answers
    for dom in env.virsh("list", "--name").split():
        env.virsh("destroy", dom)
    destroy = env.vagrant("destroy", "-f", timeout=UP_TIMEOUT)
    assert destroy.returncode == 0, destroy.stdout + destroy.stderr
    assert env.virsh("list", "--all", "--name").split() == [], "vagrant destroy left domains behind"
    print(f"vagrant destroy: {time.time() - t1:.1f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.netns
@pytest.mark.qemu
def test_redfish_powers_vagrant_pair_on_into_pxe(vagrant_env: Env) -> None:
    env = vagrant_env
    _vagrant_up(env)
    for dom in ("vagrant_dpu", "vagrant_host"):
        env.virsh("destroy", dom)  # powered off: from here on only the BMC powers them
    # sushy-tools' libvirt driver needs the libvirt binding; Debian's (python3-libvirt, CPython 3.11 like the
    # venv) is put on the path alone, not the whole dist-packages (which would shadow the venv's packages)
    binding = env.work / "pylibvirt"
    binding.mkdir()
    for f in Path("/usr/lib/python3/dist-packages").glob("libvirt*"):
        (binding / f.name).symlink_to(f)
    port = _free_port()
    conf = env.work / "sushy.conf"
    conf.write_text(f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = {port}\n"
                    f"SUSHY_EMULATOR_LIBVIRT_URI = '{env.uri}'\n"
                    f"SUSHY_EMULATOR_ALLOWED_INSTANCES = ['{DPU_UUID}', '{HOST_UUID}']\n")
    log = (env.work / "logs" / "sushy.log").open("wb")
    bmc = subprocess.Popen([str(Path(sys.executable).parent / "sushy-emulator"), "--config", str(conf)],
                           env={**os.environ, "PYTHONPATH": str(binding)}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/redfish/v1/Systems"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                systems = requests.get(base, timeout=2).json()
                break
            except requests.RequestException:
                assert bmc.poll() is None and time.monotonic() < deadline, \
                    (env.work / "logs" / "sushy.log").read_text()
                time.sleep(0.2)
        ids = sorted(m["@odata.id"].rsplit("/", 1)[1] for m in systems["Members"])
        assert ids == sorted([DPU_UUID, HOST_UUID]), systems
        for uid in (DPU_UUID, HOST_UUID):
            assert requests.get(f"{base}/{uid}", timeout=5).json()["PowerState"] == "Off"
        sniffer = _sniff(env, PXE_TIMEOUT)
        try:
            t0 = time.time()
            for uid in (DPU_UUID, HOST_UUID):
                r = requests.patch(f"{base}/{uid}", json={"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                                   "BootSourceOverrideEnabled": "Once"}}, timeout=10)
                assert r.status_code == 204, r.text
                r = requests.post(f"{base}/{uid}/Actions/ComputerSystem.Reset", json={"ResetType": "On"}, timeout=30)
                assert r.status_code == 204, r.text
            t_bmc = time.time() - t0
            seen = _discovers(env, sniffer, PXE_TIMEOUT + 30)
        finally:
            if sniffer.poll() is None:
                sniffer.kill()
                sniffer.wait(10)
        for uid in (DPU_UUID, HOST_UUID):
            assert requests.get(f"{base}/{uid}", timeout=5).json()["PowerState"] == "On"
        print(f"Redfish PATCH Pxe + Reset On for both: {t_bmc:.1f} s; first DHCPDISCOVER after it: DPU "
              f"{float(str(seen[DPU_MAC]['t'])) - t0:.1f} s, host {float(str(seen[HOST_MAC]['t'])) - t0:.1f} s")
    finally:
        bmc.terminate()
        try:
            bmc.wait(15)
        except subprocess.TimeoutExpired:
            bmc.kill()
            bmc.wait(5)
        log.close()
    _vagrant_destroy(env)


@pytest.mark.netns
@pytest.mark.qemu
def test_vagrant_up_pair_pxe_boots_and_destroys(vagrant_env: Env) -> None:
    env = vagrant_env
    val = env.vagrant("validate", timeout=60)
    assert val.returncode == 0, val.stdout + val.stderr
    sniffer = _sniff(env, UP_TIMEOUT + PXE_TIMEOUT)
    try:
        t0 = time.time()
        t_up = _vagrant_up(env)
        domains = env.virsh("list", "--name").split()
        assert sorted(domains) == ["vagrant_dpu", "vagrant_host"], domains
        xml = env.virsh("dumpxml", "vagrant_dpu")
        assert "arch='aarch64'" in xml and "AAVMF_CODE.fd" in xml, xml
        print(f"vagrant up (both VMs, box-less): {t_up:.1f} s")
        seen = _discovers(env, sniffer, UP_TIMEOUT + PXE_TIMEOUT + 30)
        print(f"first DHCPDISCOVER after vagrant up started: DPU (arm64 AAVMF, arch 11) "
              f"{float(str(seen[DPU_MAC]['t'])) - t0:.1f} s, "
              f"host (x86 SeaBIOS iPXE, arch 0) {float(str(seen[HOST_MAC]['t'])) - t0:.1f} s")
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait(10)
    _vagrant_destroy(env)
