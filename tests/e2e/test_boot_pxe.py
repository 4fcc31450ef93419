"""End to end: real firmware network-boots against bootsvc's own DHCP, TFTP and HTTP inside namespaces
this test creates (prefix ``bbe``), installs through bootsvc's iPXE scripts / GRUB configs and bf.cfg,
and the installer's callbacks move each node's state in the database.

Legs (all under TCG unless KVM can run firmware; see docs/lab.md):
  (a) SeaBIOS + iPXE ROM, DPU install: bf.cfg fetched with the node token, sourced, bfb_modify_os writes
      the agent config (with the node secret) + unpacks the agent wheel into the installed root;
  (b) OVMF native PXE -> TFTP snponly.efi -> iPXE -> host install;
  (c) SeaBIOS behind ISC dhcrelay -a in a "DPU" namespace (giaddr + option 82) -> host install;
  (d) AAVMF arm64: arch-11 PXE -> TFTP grubnetaa64.efi -> per-MAC GRUB config generated from the
      database over TFTP -> kernel/initrd over HTTP -> DPU install.

bootsvc's HTTP and TFTP run under ``bootsvc serve --only http,tftp`` (the supervisor starts each inside
the listener's namespace); DHCP runs as ``python -m bootsvc.dhcp.server`` in the same namespace.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc import images as im
from bootsvc.db import make_engine, session_factory
from bootsvc.lab.artifacts import LabArtifacts, build_artifacts
from bootsvc.lab.netns import Lab, Topology, pxe_topology, root_links_with_prefix
from bootsvc.lab.qemu import Nic, Vm, VmKind, VmSpec
from bootsvc.models import Base, Event, Lease, Node

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

PREFIX = "bbe"
SERVER = "10.77.0.1"
PW_HASH = "$6$bootsvc$Zz0qIcQb5eD0bC5aQ2JvB0nUUpYtS0N2hQnQm0lQyK6w3m2q3yHq0bU1Q2Ck2qf7o4mC5zJ3v5YxR8p5u1.a1"
PY = sys.executable


@dataclass
class BootLab:
    lab: Lab
    topo: Topology
    arts: LabArtifacts
    work: Path
    sessions: sessionmaker[Session]
    key: bytes
    logs: list[Path]

    def node(self, name: str) -> Node:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == name)).one()
            s.expunge(n)
            return n

    def events(self, name: str) -> list[Event]:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == name)).one()
            return list(s.scalars(select(Event).where(Event.node_id == n.id).order_by(Event.id)))

    def secret(self, name: str) -> str:
        n = self.node(name)
        return auth_secrets.node_secret(self.key, n.id, n.secret_generation)

    def wait_state(self, name: str, state: str, timeout: float, vm: Vm | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.sessions() as s:
                st = s.scalars(select(Node.state).where(Node.name == name)).one()
            if st == state:
                return
            if time.monotonic() > deadline:
                tail = "\n".join(f"[{x.t:7.2f}] {x.text}" for x in vm.lines()[-25:]) if vm else ""
                raise AssertionError(f"{name} is {st}, not {state}, after {timeout} s\n{tail}\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in self.logs if p.exists())


def _tiny_root(work: Path) -> Path:
    """A 24 MiB ext4 root (what the installer writes to /dev/vda and mounts for bfb_modify_os)."""
    src = work / "rootsrc"
    for d in ("etc/bootsvc-lab/rc.d", "usr/local", "opt", "var/lib"):
        (src / d).mkdir(parents=True, exist_ok=True)
    (src / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (src / "etc" / "hostname").write_text("unset\n")
    raw = work / "root.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), "-E", "root_owner=0:0", str(raw), "24M"],
                   check=True, capture_output=True)
    gz = work / "root.img.gz"
    with raw.open("rb") as f, gzip.open(gz, "wb", compresslevel=1) as g:
        shutil.copyfileobj(f, g)
    raw.unlink()
    return gz


def _wheel(work: Path) -> Path:
    whl = work / "bootsvc_agent-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("bootsvc/__init__.py", "")
        z.writestr("bootsvc/agent/__init__.py", "AGENT_VERSION = 'e2e'\n")
        z.writestr("bootsvc_agent-0.0.1.dist-info/METADATA", "Name: bootsvc-agent\nVersion: 0.0.1\n")
    return whl


def _catalog(arts: LabArtifacts, work: Path) -> Path:
    root_gz, whl = _tiny_root(work), _wheel(work)
    args = "console=ttyS0,115200 panic=-1 bootsvc.after=poweroff"
    x86 = {"kernel": arts.kernel, "initrd": arts.initrd, "image": root_gz}
    imgs = [
        im.make_image("e2e-doca", "1", "bfb", {**x86, "kernel-arm64": arts.kernel_arm64}, args=args,
                      meta={"agent": {"host_port": "eth1", "uplink": "eth0"},
                            "args_arm64": "console=ttyAMA0 panic=-1 bootsvc.after=poweroff"}),
        im.make_image("e2e-host", "1", "host-os", x86, args=args),
        im.make_image("e2e-nbp", "1", "nbp", {"grub-arm64": arts.grub_arm64}),
        im.make_image("bootsvc-agent", "0.0.1", "agent", {"wheel": whl}),
    ]
    # the arm64 initrd is also called initrd.gz: give it its own URL name
    arm_initrd = im.ImageFile("initrd-arm64", "initrd-arm64.gz", arts.initrd_arm64, im.sha256_file(arts.initrd_arm64))
    imgs[0] = im.Image(imgs[0].name, imgs[0].version, imgs[0].kind, (*imgs[0].files, arm_initrd), imgs[0].args,
                       imgs[0].meta)
    cat = im.Catalog(tuple(imgs), {"dpu": "e2e-doca", "host": "e2e-host", "agent": "bootsvc-agent"})
    p = work / "catalog.yaml"
    p.write_text(yaml.safe_dump(im.dump_catalog(cat, work), sort_keys=False))
    return p


def _config(work: Path, topo: Topology) -> Path:
    ns = topo.ns_name("prov")
    cfg = {
        "database": {"url": f"sqlite:///{work}/bootsvc.db"},
        "state_dir": str(work / "state"),
        "site": {"domain": "e2e.test"},
        "networks": [
            {"name": "direct", "zone": 0, "cidr": "10.77.0.0/24", "gateway": SERVER, "boot_server": SERVER,
             "pools": [{"start": "10.77.0.100", "end": "10.77.0.199"}], "lease_seconds": 600},
            {"name": "relayed", "zone": 0, "cidr": "10.77.2.0/24", "gateway": "10.77.2.1", "boot_server": SERVER,
             "relays": ["10.77.2.1"], "pools": [{"start": "10.77.2.100", "end": "10.77.2.199"}],
             "lease_seconds": 600},
        ],
        "listeners": {
            "http": [{"address": SERVER, "port": 80, "netns": ns}],
            "tftp": [{"address": SERVER, "port": 69, "netns": ns}],
            "dhcp": [{"interface": topo.dev("br0"), "netns": ns}, {"interface": topo.dev("vp"), "netns": ns}],
        },
        "images": {"catalog": str(work / "catalog.yaml"), "root": str(work)},
        "security": {"node_key_ref": f"file:{work}/node.key", "dpu_password_hash": PW_HASH},
        "boot": {"http_port": 80, "tftp_root": str(work / "tftp"), "arm64_nbp": "arm64/grubnetaa64.efi"},
    }
    p = work / "bootsvc.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


NODES = [
    # name, kind, mac, role, triggers that bring it to its install state
    ("e2e-dpu-bios", "dpu", "52:54:00:bb:01:10", "oob", ("provision",)),
    ("e2e-host-uefi", "host", "52:54:00:bb:01:12", "host-pf", ("provision", "dpu_ready")),
    ("e2e-host-relay", "host", "52:54:00:bb:02:10", "host-pf", ("provision", "dpu_ready")),
    ("e2e-dpu-arm", "dpu", "52:54:00:bb:01:20", "oob", ("provision",)),
]


def _wait_listen(lab: Lab, ns: str, proto: str, port: int, timeout: float, what: BootLab | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.exec_in(ns, ["ss", f"-Hl{proto}n", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {proto} {port} in {ns}" + ("\n" + what.log_tail() if what else ""))


@pytest.fixture(scope="module")
def boot_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    for tool in ("qemu-system-x86_64", "qemu-system-aarch64", "dhcrelay", "dnsmasq", "debugfs", "mke2fs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    arts = build_artifacts()
    # not under pytest's basetemp: parallel pytest runs rotate it away; kept on failure for the logs
    work = Path(tempfile.mkdtemp(prefix="bootsvc-bbe-"))
    os.chmod(work, 0o755)
    topo = pxe_topology(PREFIX, relay=True, taps=4)
    _catalog(arts, work)
    cfgp = _config(work, topo)
    env = {**os.environ, "BOOTSVC_HTTP_WORKERS": "1", "BOOTSVC_HTTP_THREADS": "8", "BOOTSVC_TFTP_WORKERS": "1",
           "PYTHONUNBUFFERED": "1"}
    engine = make_engine(f"sqlite:///{work}/bootsvc.db")
    # the schema straight from the models: migrations are regenerated by the lead as models grow
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    with sessions() as s:
        made = inventory.enroll(s, [inventory.NodeSpec(name, kind, f"SN-{name}", nics=[inventory.NicSpec(mac, role)],
                                                       arch="aarch64" if name.endswith("arm") else "x86_64")
                                    for name, kind, mac, role, _ in NODES], actor="e2e")
        for n, (_, _, _, _, triggers) in zip(made, NODES, strict=True):
            for t in triggers:
                lifecycle.apply(s, n, t, actor="e2e")
    key = auth_secrets.read_ref(f"file:{work}/node.key", create=True)
    logs = [work / "serve.log", work / "dhcp.log"]
    with Lab(topo) as lab:
        serve = lab.popen("prov", [PY, "-m", "bootsvc", "--config", str(cfgp), "serve", "--only", "http,tftp"],
                          stdout=(work / "serve.log").open("wb"), env=env, cwd=str(work))
        dhcp = lab.popen("prov", [PY, "-m", "bootsvc.dhcp.server", str(cfgp)], stdout=(work / "dhcp.log").open("wb"),
                         env=env, cwd=str(work))
        # IPv6 RA sources: without one iPXE waits ~16 s for autoconf (docs/lab.md); RA only, no DHCP/DNS
        for ns, br, pfx in (("prov", "br0", "fd00:a:4d::"), ("dpu", "br1", "fd00:a:4d:2::")):
            lab.popen(ns, ["dnsmasq", "-k", "--port=0", "--bind-interfaces", f"--interface={topo.dev(br)}",
                           "--enable-ra", f"--dhcp-range={pfx},ra-only,64,10m", f"--ra-param={topo.dev(br)},10,0",
                           "--pid-file=", "--user=root", f"--log-facility={work}/ra-{ns}.log"])
        # the "DPU" routes the relayed segment to the provisioning network (pxe_topology only knows its
        # own two segments): clients behind it reach bootsvc at the same 10.77.0.1
        lab.exec_in("dpu", ["ip", "route", "add", "10.77.0.0/24", "via", "10.77.1.1"])
        lab.popen("dpu", ["dhcrelay", "-4", "-d", "-a", "-id", topo.dev("br1"), "-iu", topo.dev("vd"), "10.77.1.1"],
                  stdout=(work / "dhcrelay.log").open("wb"))
        bl = BootLab(lab, topo, arts, work, sessions, key, logs)
        _wait_listen(lab, "prov", "t", 80, 60, bl)
        _wait_listen(lab, "prov", "u", 69, 30, bl)
        _wait_listen(lab, "prov", "u", 67, 30, bl)
        try:
            yield bl
        finally:
            lab.stop(serve, grace=10)
            lab.stop(dhcp)
            engine.dispose()
            text = "\n".join(p.read_text(errors="replace") for p in (work / "serve.log", work / "dhcp.log")
                             if p.exists())
            with sessions() as s:
                for n in s.scalars(select(Node)):
                    sec = auth_secrets.node_secret(key, n.id, n.secret_generation)
                    assert sec not in text and render.boot_token(sec) not in text, "a secret reached a log"
    assert root_links_with_prefix(PREFIX) == []
    if os.environ.get("BOOTSVC_KEEP_E2E") is None and not getattr(boot_lab_failed, "failed", False):
        shutil.rmtree(work, ignore_errors=True)


class boot_lab_failed:  # a flag the failing leg sets so the work dir (logs, disks) is kept
    failed = False


def _disk(bl: BootLab, name: str) -> Path:
    d = bl.work / f"{name}.raw"
    with d.open("wb") as f:
        f.truncate(64 << 20)
    return d


def _debugfs_cat(disk: Path, path: str) -> str:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, text=True)
    return r.stdout


def _boot(bl: BootLab, name: str, kind: VmKind, tap: str, ns: str = "prov",
          timeout: float = 90) -> tuple[Vm, Path, float]:
    mac = next(m for n, _, m, _, _ in NODES if n == name)
    disk = _disk(bl, name)
    spec = VmSpec(name=name, kind=kind, netns=bl.lab.ns(ns), nics=(Nic(bl.topo.dev(tap), mac),), disk=disk,
                  mem_mb=1024 if kind is VmKind.ARM64 else 512)
    t0 = time.monotonic()
    vm = Vm(spec, bl.work, on_pid=bl.lab.record_pid).start()
    try:
        want = "dpu_rebooting" if bl.node(name).kind == "dpu" else "deployed"
        try:
            bl.wait_state(name, want, timeout, vm)
        except AssertionError:
            boot_lab_failed.failed = True
            print(f"e2e work dir kept: {bl.work}")
            raise
        took = time.monotonic() - t0
        vm.wait_exit(60)
    finally:
        vm.kill()
    return vm, disk, took


def _assert_install_events(bl: BootLab, name: str, start: str, end: str) -> None:
    evs = [(e.trigger, e.from_state, e.to_state) for e in bl.events(name) if e.actor == "installer"]
    triggers = [t for t, _, _ in evs]
    assert triggers[0] == "install_started" and triggers[-1] == "install_done", evs
    assert "install_progress" in triggers
    assert evs[0][1] == start and evs[-1][2] == end


def test_a_bios_ipxe_dpu_install_with_bfcfg(boot_lab: BootLab) -> None:
    bl = boot_lab
    _, disk, took = _boot(bl, "e2e-dpu-bios", VmKind.BIOS, "tap0")
    _assert_install_events(bl, "e2e-dpu-bios", "dpu_booting", "dpu_rebooting")
    assert any(e.trigger == "bfcfg_served" for e in bl.events("e2e-dpu-bios"))
    phases = {e.detail.get("phase") for e in bl.events("e2e-dpu-bios") if e.trigger == "install_progress"}
    assert {"bfcfg", "modify_os"} <= phases
    conf = _debugfs_cat(disk, "/etc/bootsvc-agent/agent.conf")
    assert f"secret = {bl.secret('e2e-dpu-bios')}" in conf and "node = e2e-dpu-bios" in conf
    assert f"url = http://{SERVER}" in conf and "host_port = eth1" in conf
    assert _debugfs_cat(disk, "/etc/hostname").strip() == "e2e-dpu-bios"
    assert "AGENT_VERSION = 'e2e'" in _debugfs_cat(disk, "/opt/bootsvc-agent/lib/bootsvc/agent/__init__.py")
    # the site's password hash goes to ubuntu_PASSWORD (cloud-init creates that user at first boot);
    # root's entry is never touched: it stays locked (bluefield-real.md §6, ipxe/bf.cfg.j2)
    shadow = _debugfs_cat(disk, "/etc/shadow")
    assert shadow.startswith("root:*:") and PW_HASH not in shadow, shadow
    print(f"TIMING bios-dpu-install {took:.1f}s")


def test_b_uefi_native_pxe_tftp_snponly_host_install(boot_lab: BootLab) -> None:
    bl = boot_lab
    vm, _, took = _boot(bl, "e2e-host-uefi", VmKind.UEFI_NATIVE, "tap1")
    _assert_install_events(bl, "e2e-host-uefi", "host_booting", "deployed")
    text = "\n".join(x.text for x in vm.lines())
    assert "iPXE" in text  # snponly.efi from our TFTP ran
    log = (bl.work / "serve.log").read_text(errors="replace")
    assert "tftp: rrq snponly.efi" in log
    print(f"TIMING uefi-native-host-install {took:.1f}s")


def test_c_bios_behind_dhcrelay_host_install(boot_lab: BootLab) -> None:
    bl = boot_lab
    _, _, took = _boot(bl, "e2e-host-relay", VmKind.BIOS, "rtap0", ns="dpu")
    _assert_install_events(bl, "e2e-host-relay", "host_booting", "deployed")
    with bl.sessions() as s:
        lease = s.scalars(select(Lease).where(Lease.mac == "52:54:00:bb:02:10")).first()
        assert lease is not None and lease.address.startswith("10.77.2.") and lease.relay == "10.77.2.1"
    started = next(e for e in bl.events("e2e-host-relay") if e.trigger == "install_started")
    assert str(started.detail["ip"]).startswith("10.77.2.")
    print(f"TIMING relay-host-install {took:.1f}s")


def test_d_arm64_grub_from_tftp_dpu_install(boot_lab: BootLab) -> None:
    bl = boot_lab
    _, disk, took = _boot(bl, "e2e-dpu-arm", VmKind.ARM64, "tap3", timeout=180)
    log = (bl.work / "serve.log").read_text(errors="replace")
    assert "tftp: rrq arm64/grubnetaa64.efi" in log
    assert "tftp: grub config for 52:54:00:bb:01:20 node=e2e-dpu-arm action=dpu-install" in log
    _assert_install_events(bl, "e2e-dpu-arm", "dpu_booting", "dpu_rebooting")
    started = next(e for e in bl.events("e2e-dpu-arm") if e.trigger == "install_started")
    assert started.detail.get("arch") == "aarch64"
    assert f"secret = {bl.secret('e2e-dpu-arm')}" in _debugfs_cat(disk, "/etc/bootsvc-agent/agent.conf")
    print(f"TIMING arm64-dpu-install {took:.1f}s")


def test_e_next_boot_is_local(boot_lab: BootLab) -> None:
    """After an install the same MAC gets the local-disk script (and no token)."""
    bl = boot_lab
    done = [(n, m) for n, _, m, _, _ in NODES if bl.node(n).state in ("dpu_rebooting", "deployed")]
    if not done:
        pytest.skip("no install leg ran in this session")
    for _, mac in done:
        # asked from the address DHCP leased to that MAC (boot-plane identity, docs/security.md): the
        # address is borrowed on the provisioning namespace's loopback, the VM being off by now
        with bl.sessions() as s:
            addr = s.scalars(select(Lease.address).where(Lease.mac == mac, Lease.vrf == "",
                                                         Lease.state == "bound")).first()
        if addr is None:
            continue  # a host behind a relay: its requests come from its DPU's address
        bl.lab.exec_in("prov", ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
        try:
            r = bl.lab.exec_in("prov", ["curl", "-s", "--interface", addr, f"http://{SERVER}/boot/ipxe?mac={mac}"])
        finally:
            bl.lab.exec_in("prov", ["ip", "addr", "del", f"{addr}/32", "dev", "lo"], check=False)
        assert "boots from local disk" in r.stdout and "token" not in r.stdout, r.stdout
        # and from an address that holds no lease of it: a hold script, never a token
        other = bl.lab.exec_in("prov", ["curl", "-s", f"http://{SERVER}/boot/ipxe?mac={mac}"])
        assert "token" not in other.stdout
