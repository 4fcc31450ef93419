"""End to end: a released node's disk is really erased.

A SeaBIOS + iPXE VM whose disk holds a known pattern is released: the conductor (in this process,
driving the VM through ``bootsvc.lab.qemu.QemuPowerBackend``) powers it off, rotates its secret, sets a
one-time network boot and powers it on; the VM PXE-boots from bootsvc's own DHCP and HTTP (``bootsvc
serve --only http,tftp`` + ``python -m bootsvc.dhcp.server`` inside namespaces this test creates,
prefix ``bw``), gets the erase-image script for a node in ``wiping`` (the lab initramfs with
``bootsvc.mode=wipe``, the callback URL and a boot token), erases the disk (lab policy
``bootsvc.wipe=full``: a full zero pass plus the first/last MiB, read back), calls back ``done``; the
node goes ``available`` and the conductor's after-wipe step powers it off, clears the override and
rotates the secret again. Afterwards the disk image is all zeros and the node's events tell the story.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc import config as config_mod
from bootsvc import images as im
from bootsvc.conductor import Conductor
from bootsvc.db import make_engine, session_factory
from bootsvc.lab.artifacts import build_artifacts
from bootsvc.lab.netns import Lab, Topology, pxe_topology, root_links_with_prefix
from bootsvc.lab.qemu import BootDevice, Nic, QemuPowerBackend, VmKind, VmSpec
from bootsvc.models import Base, Event, Node
from bootsvc.power.base import BootOverride, BootTarget, PowerState

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

PREFIX = "bw"
BASE = "10.79"
SERVER = f"{BASE}.0.1"
NAME, MAC = "bw-host", "52:54:00:b7:00:10"
DISK_MIB = 64
PATTERN = b"bootsvc wipe e2e: tenant data "
BUDGET = 90.0  # seconds from "release" to "available + after-wipe step done"
PY = sys.executable


class QemuDriver:
    """The PowerDriver calls the conductor makes, carried out on a lab VM (power = the QEMU process,
    one-time boot = the backend's override honoured at the next start). Counts every call."""

    name = "qemu-lab"

    def __init__(self, backend: QemuPowerBackend) -> None:
        self.b = backend
        self.calls: Counter[str] = Counter()
        self.override = BootOverride(target="None", enabled="Disabled", mode="Legacy")

    def power_state(self) -> PowerState:
        self.calls["power_state"] += 1
        return PowerState.ON if self.b.get_power_state() == "On" else PowerState.OFF

    def power_on(self, *, wait: float = 0) -> None:
        self.calls["power_on"] += 1
        self.b.power_on()

    def power_off(self, *, graceful: bool = False, wait: float = 0) -> None:
        self.calls["power_off"] += 1
        self.b.power_off()

    def reset(self, *, wait: float = 0) -> None:
        self.calls["reset"] += 1
        self.b.set_power_state("ForceRestart")

    def power_cycle(self, *, wait: float = 0) -> None:
        self.calls["power_cycle"] += 1
        self.b.set_power_state("PowerCycle")

    def boot_once(self, target: BootTarget, *, uri: str | None = None, mode: str | None = None) -> BootOverride:
        self.calls["boot_once"] += 1
        self.b.set_boot_device(target.value, once=True)
        self.override = BootOverride(target=target.value, enabled="Once", mode="Legacy")
        return self.override

    def clear_boot_override(self) -> BootOverride:
        self.calls["clear_boot_override"] += 1
        self.b.set_boot_device(BootDevice.DISK, once=True)  # next start: the persistent default (disk)
        self.override = BootOverride(target="None", enabled="Disabled", mode="Legacy")
        return self.override


@dataclass
class WipeLab:
    lab: Lab
    topo: Topology
    work: Path
    sessions: sessionmaker[Session]
    key: bytes
    disk: Path
    backend: QemuPowerBackend
    driver: QemuDriver
    conductor: Conductor
    logs: list[Path]
    keep: bool = False  # a failed test keeps the work dir (disk image, serial console, service logs)

    def node(self) -> Node:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == NAME)).one()
            s.expunge(n)
            return n

    def events(self) -> list[Event]:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == NAME)).one()
            return list(s.scalars(select(Event).where(Event.node_id == n.id).order_by(Event.id)))

    def tail(self) -> str:
        vm = self.backend.vm
        serial = "\n".join(f"[{x.t:7.2f}] {x.text}" for x in vm.lines()[-30:]) if vm is not None else "(no VM)"
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in self.logs if p.exists())
        evs = "\n".join(f"{e.trigger} {e.from_state}->{e.to_state} {e.detail}" for e in self.events())
        return f"--- serial\n{serial}\n{logs}\n--- events\n{evs}"


def _config(work: Path, topo: Topology) -> Path:
    ns = topo.ns_name("prov")
    cfg = {
        "database": {"url": f"sqlite:///{work}/bootsvc.db"},
        "state_dir": str(work / "state"),
        "site": {"domain": "wipe.test"},
        "networks": [
            {"name": "direct", "zone": 0, "cidr": f"{BASE}.0.0/24", "gateway": SERVER, "boot_server": SERVER,
             "pools": [{"start": f"{BASE}.0.100", "end": f"{BASE}.0.199"}], "lease_seconds": 600},
        ],
        "listeners": {
            "http": [{"address": SERVER, "port": 80, "netns": ns}],
            "tftp": [{"address": SERVER, "port": 69, "netns": ns}],
            "dhcp": [{"interface": topo.dev("br0"), "netns": ns}],
        },
        "images": {"catalog": str(work / "catalog.yaml"), "root": str(work)},
        "security": {"node_key_ref": f"file:{work}/node.key"},
        "boot": {"http_port": 80, "tftp_root": str(work / "tftp")},
        "conductor": {"interval_seconds": 0.2, "backoff_seconds": 1, "max_attempts": 2},
        "orchestration": {"power_timeout_seconds": 10},
    }
    p = work / "bootsvc.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _patterned_disk(path: Path) -> None:
    block = (PATTERN * (65536 // len(PATTERN) + 1))[:65536]
    with path.open("wb") as f:
        for _ in range(DISK_MIB * 16):
            f.write(block)


def _wait_listen(lab: Lab, ns: str, proto: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.exec_in(ns, ["ss", f"-Hl{proto}n", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {proto} {port} in {ns}")


@pytest.fixture(scope="module")
def wipe_lab() -> Iterator[WipeLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    for tool in ("qemu-system-x86_64", "dnsmasq"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    arts = build_artifacts()
    work = Path(tempfile.mkdtemp(prefix="bootsvc-bw-"))
    os.chmod(work, 0o755)
    topo = pxe_topology(PREFIX, taps=1, v4_base=BASE)
    cat = im.lab_catalog(arts)  # lab-wipe is its defaults.wipe (bootsvc.wipe=full)
    (work / "catalog.yaml").write_text(yaml.safe_dump(im.dump_catalog(cat, work), sort_keys=False))
    shutil.copytree(arts.tftp_root, work / "tftp")
    cfgp = _config(work, topo)
    cfg = config_mod.load(cfgp)
    engine = make_engine(cfg.database.url)
    Base.metadata.create_all(engine)  # the schema straight from the models (the lead owns migrations)
    sessions = session_factory(engine)
    with sessions() as s:
        (n,) = inventory.enroll(s, [inventory.NodeSpec(NAME, "host", "SN-bw-host", bmc_address="qemu://bw-host",
                                                       nics=[inventory.NicSpec(MAC, "host-pf")])], actor="e2e")
        for t in ("provision", "dpu_ready", "install_started", "install_done"):  # a deployed host
            lifecycle.apply(s, n, t, actor="e2e")
    key = auth_secrets.read_ref(f"file:{work}/node.key", create=True)
    disk = work / "disk.raw"
    _patterned_disk(disk)
    env = {**os.environ, "BOOTSVC_HTTP_WORKERS": "1", "BOOTSVC_HTTP_THREADS": "4", "BOOTSVC_TFTP_WORKERS": "1",
           "PYTHONUNBUFFERED": "1"}
    logs = [work / "serve.log", work / "dhcp.log"]
    stop = threading.Event()
    with Lab(topo) as lab:
        serve = lab.popen("prov", [PY, "-m", "bootsvc", "--config", str(cfgp), "serve", "--only", "http,tftp"],
                          stdout=(work / "serve.log").open("wb"), env=env, cwd=str(work))
        dhcp = lab.popen("prov", [PY, "-m", "bootsvc.dhcp.server", str(cfgp)], stdout=(work / "dhcp.log").open("wb"),
                         env=env, cwd=str(work))
        # an IPv6 RA source: without one iPXE waits ~16 s for autoconf (docs/lab.md); RA only
        lab.popen("prov", ["dnsmasq", "-k", "--port=0", "--bind-interfaces", f"--interface={topo.dev('br0')}",
                           "--enable-ra", "--dhcp-range=fd00:a:4f::,ra-only,64,10m",
                           f"--ra-param={topo.dev('br0')},10,0", "--pid-file=", "--user=root",
                           f"--log-facility={work}/ra.log"])
        spec = VmSpec(name=NAME, kind=VmKind.BIOS, netns=lab.ns("prov"), nics=(Nic(topo.dev("tap0"), MAC),),
                      disk=disk, mem_mb=512)
        # persistent boot device: disk (direct kernel boot, never reached here); PXE only when the
        # conductor sets the one-time override
        backend = QemuPowerBackend(spec, work, on_pid=lab.record_pid, default_boot=BootDevice.DISK,
                                   disk_kernel=arts.kernel, disk_initrd=arts.initrd,
                                   disk_append="console=ttyS0 bootsvc.mode=disk", follow_reboots=False)
        driver = QemuDriver(backend)
        cond = Conductor(cfg, sessions, name="bw-e2e", driver_factory=lambda _n, _c: driver)

        def conduct() -> None:
            while not stop.is_set():
                if cond.run_once() == 0:
                    stop.wait(0.2)

        t = threading.Thread(target=conduct, name="bw-conductor", daemon=True)
        wl = WipeLab(lab, topo, work, sessions, key, disk, backend, driver, cond, logs)
        failed = True
        try:
            _wait_listen(lab, "prov", "t", 80, 60)
            _wait_listen(lab, "prov", "u", 67, 30)
            t.start()
            yield wl
            failed = False
        finally:
            stop.set()
            if t.is_alive():
                t.join(timeout=30)
            backend.close()
            lab.stop(serve, grace=10)
            lab.stop(dhcp)
            engine.dispose()
            text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
            with sessions() as s:
                n = s.scalars(select(Node).where(Node.name == NAME)).one()
                for gen in range(n.secret_generation + 1):  # no generation's secret or token was logged
                    sec = auth_secrets.node_secret(key, n.id, gen)
                    assert sec not in text and render.boot_token(sec) not in text, "a secret reached a log"
    assert root_links_with_prefix(PREFIX) == []
    if failed or wl.keep or os.environ.get("BOOTSVC_KEEP_E2E"):
        print(f"e2e work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _wait(what: str, cond: Any, timeout: float, wl: WipeLab) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{wl.tail()}")
        time.sleep(0.2)


def _nonzero_ranges(disk: Path) -> list[tuple[int, int]]:
    """MiB-granular ranges of the disk image that hold anything but zeros."""
    bad: list[tuple[int, int]] = []
    zero = bytes(1 << 20)
    with disk.open("rb") as f:
        for i in range(disk.stat().st_size >> 20):
            if f.read(1 << 20) != zero:
                bad.append((i, i + 1))
    return bad


def test_release_erases_the_disk_over_pxe(wipe_lab: WipeLab) -> None:
    try:
        _release_erases_the_disk(wipe_lab)
    except BaseException:
        wipe_lab.keep = True
        raise


def _release_erases_the_disk(wl: WipeLab) -> None:
    with wl.disk.open("rb") as f:  # the tenant's data is there before the release
        head = f.read(1 << 20)
        f.seek(-(1 << 20), os.SEEK_END)
        tail = f.read(1 << 20)
    assert PATTERN in head and PATTERN in tail
    gen0 = wl.node().secret_generation
    assert wl.node().state == "deployed"

    t0 = time.monotonic()
    with wl.sessions() as s:
        n = s.scalars(select(Node).where(Node.name == NAME)).one()
        lifecycle.apply(s, n, "release", actor="e2e", detail={"reason": "tenant left"})
    _wait("the erase image to report done", lambda: wl.node().state in ("available", "release_failed"), BUDGET, wl)
    assert wl.node().state == "available", wl.tail()
    _wait("the after-wipe step", lambda: not wl.node().boot_override_set, 20, wl)
    _wait("the VM to be off", lambda: wl.backend.get_power_state() == "Off", 20, wl)
    took = time.monotonic() - t0
    print(f"TIMING release-to-available-and-finished {took:.1f}s")

    # the disk: the first and last MiB (partition tables, GPT backup, superblocks) and - lab policy
    # "full" - every byte are zero now
    assert wl.disk.stat().st_size == DISK_MIB << 20
    with wl.disk.open("rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20), "first MiB not erased"
        f.seek(-(1 << 20), os.SEEK_END)
        assert f.read(1 << 20) == bytes(1 << 20), "last MiB not erased"
    assert _nonzero_ranges(wl.disk) == [], "the full zero pass left data"

    evs = wl.events()
    path = [(e.trigger, e.to_state) for e in evs if e.from_state != e.to_state]
    assert path[-3:] == [("release", "releasing"), ("wipe_started", "wiping"), ("wipe_done", "available")], path
    boots = [e for e in evs if e.trigger == "bmc_boot_network"]
    assert len(boots) == 1 and boots[0].detail.get("purpose") == "erase" and boots[0].detail.get("secret_rotated")
    assert boots[0].detail["boot_override"].startswith("Pxe/")
    progress = [e.detail for e in evs if e.trigger == "wipe_progress"]
    assert progress[0]["event"] == "started" and progress[0]["mode"] == "wipe"
    assert any(d.get("phase") == "erase vda" and d.get("bytes") == DISK_MIB << 20 for d in progress), progress
    assert any(d.get("phase") == "zero vda" and d.get("percent") == 100 for d in progress), progress
    done = next(e for e in evs if e.trigger == "wipe_done")
    assert done.actor == "installer" and done.detail.get("phase") == "erased 1 disks policy full"
    finished = [e for e in evs if e.trigger == "wipe_finished"]
    assert len(finished) == 1 and finished[0].id > done.id and finished[0].detail["secret_rotated"]
    # one network boot and one power-on (the conductor never re-booted it), override cleared after
    assert wl.driver.calls["boot_once"] == 1 and wl.driver.calls["power_on"] == 1
    assert wl.driver.calls["clear_boot_override"] == 1 and wl.backend.next_boot() is BootDevice.DISK
    assert [dev for _, dev in wl.backend.boots] == [BootDevice.NETWORK]
    # revoked at the start of the wipe, and the erase image's token after it
    n = wl.node()
    assert n.secret_generation == gen0 + 2 and n.last_error is None
    serial = "\n".join(x.text for x in wl.backend.vm.lines()) if wl.backend.vm is not None else ""
    assert "BOOTSVC-LAB: mode=wipe" in serial
    # the erase image booted with the token of the rotated generation (its own console shows it)
    assert f"bootsvc.token={render.boot_token(auth_secrets.node_secret(wl.key, n.id, gen0 + 1))}" in serial
    assert "wipe: vda erased (first and last MiB read back zero)" in serial, serial[-3000:]
    assert took < BUDGET
