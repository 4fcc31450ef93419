"""``bootsvc lab demo`` (``make demo``) and the building blocks the lab e2e test shares with it.

Owns: the demo's sequence - build/cache lab artifacts (kernels, iPXE, GRUB, the lab DOCA image) and
the policy agent wheel, write the lab image catalog, bring the rack up, ``db upgrade``, load the sample
inventory (tenants from the config; each DPU + host enrolled with MACs, BMC addresses and credential
reference), start ``bootsvc serve``, provision, and print every state change (with timestamps) and the
VMs' console milestones as they happen; then keep serving the UI until Ctrl-C and tear everything down.

Nothing here decides anything about a node: provisioning is one ``provision`` trigger on each host;
the conductor, the BMC emulators, the firmware, the installer and the agent do the rest, and this
module only watches the database events and the serial logs.

One module (~610 lines) on purpose: the demo's sequence and the watching/printing it does (events,
console milestones, phase times, checklist) are also the building blocks the lab e2e test shares;
they read one database and one rack plan and change together.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from bootsvc import db, images, inventory, lifecycle
from bootsvc.config import Config
from bootsvc.lab import rack as rack_mod
from bootsvc.lab.artifacts import build_agent_wheel
from bootsvc.models import Event, Lease, Node
from bootsvc.states import FAILED_STATES, STABLE_STATES, State, Trigger

STABLE = {x.value for x in STABLE_STATES}

Out = Callable[[str], None]
ROOT = Path(__file__).resolve().parents[2]
# console lines worth showing while the demo runs (firmware, iPXE/GRUB, installer, lab OS, agent)
MILESTONES = re.compile(
    r"(>>Start PXE|Station IP address|NBP file downloaded|iPXE initiali|bootsvc: |bootsvc-lab: |BOOTSVC-LAB|"
    r"Linux version|Run /init|http://\S+\.\.\. ok|Starting bootsvc|agent)", re.I)


# ---------------------------------------------------------------------------------------------- artifacts
@dataclass
class Prepared:
    catalog_path: Path
    catalog: images.Catalog
    arts: Any
    doca: Any
    wheel: Path
    seconds: dict[str, float] = field(default_factory=dict)
    bf3: Any = None  # bootsvc.lab.bf3.LabBfb


def prepare(config: Config, out: Out = print) -> Prepared:
    """Build (or take from the cache) every lab artifact and write the lab image catalog."""
    from bootsvc.lab import artifacts

    secs: dict[str, float] = {}
    t = time.monotonic()
    arts = artifacts.build_artifacts()
    secs["kernels/initrds/iPXE/GRUB"] = time.monotonic() - t
    out(f"  kernels, initrds, iPXE, GRUB: {'cached' if arts.build_seconds == 0 else 'built'} "
        f"({secs['kernels/initrds/iPXE/GRUB']:.1f} s) in {arts.root}")
    t = time.monotonic()
    doca = artifacts.build_doca_image()
    secs["lab DOCA image"] = time.monotonic() - t
    out(f"  lab DOCA image: {'cached' if doca.build_seconds == 0 else 'built'} ({secs['lab DOCA image']:.1f} s), "
        f"{doca.size / 1e6:.0f} MB gz / {doca.raw_size / 1e6:.0f} MB raw")
    t = time.monotonic()
    wheel = build_agent_wheel(config.resolve(config.state_dir) / "agent")
    secs["agent wheel"] = time.monotonic() - t
    out(f"  policy agent wheel: {wheel.name} ({wheel.stat().st_size // 1024} KB)")
    t = time.monotonic()
    bf3 = build_lab_bfb()
    secs["lab BFB"] = time.monotonic() - t
    out(f"  lab BFB: {'cached' if bf3.build_seconds == 0 else 'built'} ({secs['lab BFB']:.1f} s), "
        f"{bf3.size / 1e6:.0f} MB: arm64 kernel + installer initramfs with the arm64 lab DOCA OS ({bf3.path})")
    t = time.monotonic()
    cat, bfb_img = import_lab_bfb(config, images.lab_catalog(arts, doca, wheel), bf3)
    secs["import-bfb"] = time.monotonic() - t
    out(f"  import-bfb: {bfb_img.ref} ({', '.join(f.name for f in bfb_img.files)}) in {secs['import-bfb']:.1f} s")
    path = config.resolve(config.images.catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(images.dump_catalog(cat), sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    out(f"  image catalog: {path} ({len(cat.images)} images: {', '.join(i.name for i in cat.images)})")
    return Prepared(path, cat, arts, doca, wheel, secs, bf3)


def build_lab_bfb() -> Any:
    from bootsvc.lab import bf3

    return bf3.build_lab_bfb()


LAB_BFB_NAME = "lab-bf3"
QEMU_VIRT_PL011 = "0x9000000"


def import_lab_bfb(config: Config, cat: images.Catalog, bf3: Any) -> tuple[images.Catalog, images.Image]:
    """``bootsvc image import-bfb`` of the lab BFB (the same code path as the CLI), made the DPUs'
    default. The lab OS names its ports eth0 (OOB, also the agent's uplink) and eth1 (host port)."""
    import dataclasses
    import shutil

    store = config.resolve(config.images.root) / "bfb"
    shutil.rmtree(store / LAB_BFB_NAME / str(bf3.key), ignore_errors=True)
    # in place: the catalog points at the cached BFB (the Redfish path serves it from there)
    new, img = images.import_bfb(cat, bf3.path, store, name=LAB_BFB_NAME, version=str(bf3.key), copy=False,
                                 replace_existing=True)
    # The one argument that must differ from a BF3: its PL011 is at 0x13010000, QEMU virt's at 0x09000000
    # (hw/arm/virt.c, VIRT_UART). The pl011 early console polls the flag register, and at 0x13010000 in
    # QEMU virt (PCIe MMIO, reads all-ones: "TX FIFO full" forever) the kernel hangs before its first line.
    args = img.args.replace("earlycon=pl011,0x13010000", f"earlycon=pl011,{QEMU_VIRT_PL011}")
    img2 = dataclasses.replace(img, args=args,
                               meta={**img.meta, "agent": {"host_port": "eth1", "uplink": "eth0"}})
    new = images.add_image(new, img2, replace_existing=True)
    return images.Catalog(new.images, {**new.defaults, "dpu": img2.ref}, new.source), img2


# ---------------------------------------------------------------------------------------------- inventory
def reset_database(config: Config) -> None:
    """A fresh lab database (SQLite file only; a PostgreSQL URL is left as it is)."""
    url = config.database.url
    if url.startswith("sqlite:///") and ":memory:" not in url:
        p = Path(url[len("sqlite:///"):])
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(p) + suffix).unlink(missing_ok=True)


def demo_token(config: Config) -> str:
    """A fresh tech token for the UI login, printed once (only its hash is stored, as always)."""
    from bootsvc import auth_secrets
    from bootsvc.models import ApiToken

    tok = auth_secrets.new_token()
    with db.session_factory(db.make_engine(config.database.url))() as s:
        s.add(ApiToken(name=f"lab-demo-{int(time.time())}", role="tech", token_hash=auth_secrets.hash_token(tok)))
        s.commit()
    return tok


def load_inventory(config: Config, plan: rack_mod.RackPlan, *, dpu_provision_method: str = "pxe") -> list[str]:
    """``db upgrade``, tenants from the config, every rack machine enrolled (idempotent). DPUs install
    over PXE, or with ``dpu_provision_method="redfish"`` through their BMC (a BFB push). Each host PF gets
    its pair's reserved address (``MachinePlan.host_ip``): with EVPN the DPU announces it as a Type-5 /32
    and the conductor boots the host only once it is advertised."""
    db.upgrade(config.database.url)
    sessions = db.session_factory(db.make_engine(config.database.url))
    names: list[str] = []
    with sessions() as s:
        inventory.sync_tenants(s, config)
        cred = f"file:{plan.cred_file}"
        for m in plan.machines:
            specs = []
            if m.host is not None:
                specs.append(inventory.NodeSpec(
                    name=m.host.name, kind="host", serial=m.host.serial, arch=m.host.arch,
                    nics=[inventory.NicSpec(mac=m.host.mac, role="host-pf", ipv4=m.host_ip)], rack=plan.prefix,
                    slot=m.index,
                    vendor="QEMU", model=f"lab host ({m.host.kind})", tenant=m.tenant,
                    bmc_address=plan.bmc_url(m.host), bmc_credential_ref=cred, bmc_verify_tls=False))
            specs.append(inventory.NodeSpec(
                name=m.dpu.name, kind="dpu", serial=m.dpu.serial, arch=m.dpu.arch,
                nics=[inventory.NicSpec(mac=m.dpu.mac, role="oob", ipv4=m.dpu_oob_ip)], rack=plan.prefix,
                slot=m.index, vendor="Nvidia", model=f"BlueField-3 (lab, {m.dpu.kind})",
                host=m.host.name if m.host is not None else None,
                tenant=m.tenant if m.host is None else None, provision_method=dpu_provision_method,
                bmc_address=plan.bmc_url(m.dpu), bmc_credential_ref=cred, bmc_verify_tls=False))
            for spec in specs:
                if inventory.get_node(s, spec.name) is None:
                    inventory.enroll(s, [spec], actor="lab")
                names.append(spec.name)
    return names


def provision(config: Config, names: list[str], actor: str = "lab-demo") -> None:
    """Send ``provision`` to the given nodes (hosts pull in their DPUs: DPU first, then host)."""
    sessions = db.session_factory(db.make_engine(config.database.url))
    with sessions() as s:
        for name in names:
            n = inventory.get_node(s, name)
            if n is None:
                raise RuntimeError(f"no node {name}")
            lifecycle.apply(s, n, Trigger.PROVISION, actor=actor, max_attempts=config.conductor.max_attempts,
                            deadlines=config.conductor.deadlines)


# ---------------------------------------------------------------------------------------------- service
def start_service(config: Config, config_path: str, plan: rack_mod.RackPlan, *, timeout: float = 90.0,
                  only: str | None = None) -> subprocess.Popen[bytes]:
    """``bootsvc --config X serve`` as a child (own session); waits until its loopback HTTP answers."""
    log_path = plan.workdir / "serve.log"
    env = {**os.environ, "BOOTSVC_HTTP_WORKERS": os.environ.get("BOOTSVC_HTTP_WORKERS", "1"),
           "BOOTSVC_HTTP_THREADS": os.environ.get("BOOTSVC_HTTP_THREADS", "8"),
           "BOOTSVC_TFTP_WORKERS": os.environ.get("BOOTSVC_TFTP_WORKERS", "1")}
    argv = [sys.executable, "-m", "bootsvc", "--config", config_path, "serve"]
    if only:
        argv += ["--only", only]
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    rack_mod.record_pid(plan, proc.pid)
    ui = next((h for h in config.listeners.http if h.netns is None), None)
    if ui is None:
        return proc
    url = f"http://{ui.address}:{ui.port}/healthz"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"bootsvc serve exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"bootsvc serve: {url} not answering after {timeout:.0f} s; see {log_path}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- watching
class SerialTail:
    """Follows the VMs' timestamped serial logs and yields new milestone lines."""

    def __init__(self, plan: rack_mod.RackPlan) -> None:
        self.files = {vm.name: plan.workdir / vm.name / f"{vm.name}.serial.log" for vm in plan.vms()}
        self.pos: dict[str, int] = {}
        self.partial: dict[str, str] = {}

    def poll(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name, f in self.files.items():
            try:
                with f.open("rb") as fh:
                    fh.seek(self.pos.get(name, 0))
                    data = fh.read()
                    self.pos[name] = fh.tell()
            except OSError:
                continue
            text = self.partial.get(name, "") + data.decode("utf-8", "replace")
            lines = text.split("\n")
            self.partial[name] = lines.pop()
            out += [(name, ln) for ln in lines if MILESTONES.search(ln)]
        return out


@dataclass
class Transition:
    node: str
    at: dt.datetime
    from_state: str | None
    to_state: str | None
    trigger: str
    actor: str
    detail: dict[str, Any]


class Watcher:
    """Polls the event table; remembers when each node entered each state."""

    def __init__(self, config: Config) -> None:
        self.sessions = db.session_factory(db.make_engine(config.database.url))
        self.last_id = 0
        self.entered: dict[str, list[tuple[str, float]]] = {}  # node -> [(state, monotonic)]
        self.events: list[Transition] = []
        self.tail: SerialTail | None = None  # console follower, kept across watch() calls

    def poll(self) -> list[Transition]:
        new: list[Transition] = []
        with self.sessions() as s:
            rows = s.execute(select(Event, Node.name).join(Node, Node.id == Event.node_id)
                             .where(Event.id > self.last_id).order_by(Event.id)).all()
            for ev, name in rows:
                self.last_id = ev.id
                at = ev.at if ev.at.tzinfo else ev.at.replace(tzinfo=dt.UTC)
                t = Transition(name, at, ev.from_state, ev.to_state, ev.trigger, ev.actor, dict(ev.detail or {}))
                new.append(t)
                if ev.to_state and ev.from_state != ev.to_state:
                    self.entered.setdefault(name, []).append((ev.to_state, time.monotonic()))
        self.events += new
        return new

    def state(self, name: str) -> tuple[str | None, str | None]:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == name)).first()
            return (n.state, n.last_error) if n is not None else (None, None)

    def describe_active(self) -> str:
        """Nodes in an active state, how long they have been there and when their deadline passes."""
        now = dt.datetime.now(dt.UTC)
        parts = []
        with self.sessions() as s:
            for n in s.scalars(select(Node).order_by(Node.id)):
                if n.state in STABLE or n.state == State.MAINTENANCE:
                    continue
                since = n.state_since.replace(tzinfo=n.state_since.tzinfo or dt.UTC) if n.state_since else None
                dl = n.deadline.replace(tzinfo=n.deadline.tzinfo or dt.UTC) if n.deadline else None
                txt = f"{n.name} in {n.state}"
                if since:
                    txt += f" for {(now - since).total_seconds():.0f} s"
                if dl:
                    txt += f", deadline in {(dl - now).total_seconds():.0f} s (attempt {n.attempts + 1})"
                if n.kind == "host" and n.state == State.HOST_BOOTING:
                    # the usual suspect: did the host's DHCP make it through its DPU's relay?
                    vrfs = sorted({le.vrf or "zone0" for le in s.scalars(select(Lease).where(Lease.node_id == n.id))})
                    txt += (f" [leases in {', '.join(vrfs)}: DHCP came through the DPU relay; see the host console]"
                            if vrfs else " [no lease yet: the host's DHCP has not come through its DPU's relay]")
                parts.append(txt)
        return "; ".join(parts) or "no node is in an active state"

    def reached(self, name: str, state: str) -> bool:
        return any(s == state for s, _ in self.entered.get(name, []))


def fmt_event(t: Transition, t0: float) -> str:
    when = t.at.astimezone().strftime("%H:%M:%S")
    if t.to_state and t.from_state != t.to_state:
        what = f"{t.from_state} -> {t.to_state}"
    elif t.to_state and t.from_state == t.to_state:
        what = f"{t.to_state} ({t.trigger})"
    else:
        what = t.trigger
    extra = {k: v for k, v in t.detail.items() if k in ("reason", "phase", "percent", "power", "boot_override",
                                                          "error", "policy_version", "agent_version")}
    if isinstance(t.detail.get("bytes"), int):
        extra["written"] = f"{t.detail['bytes'] / 1e6:.0f}MB"
    tail = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"[{time.monotonic() - t0:7.1f}s] {when} {t.node:<8} {what:<36} by {t.actor} {tail}".rstrip()


def watch(config: Config, plan: rack_mod.RackPlan, until: Callable[[Watcher], bool], *, timeout: float,
          out: Out = print, t0: float | None = None, stop: threading.Event | None = None,
          serial: bool = True, watcher: Watcher | None = None) -> Watcher:
    """Print events and console milestones until ``until(watcher)`` is true, a node fails, or timeout."""
    w = watcher if watcher is not None else Watcher(config)
    if w.tail is None:
        w.tail = SerialTail(plan)
    tail = w.tail
    start = t0 if t0 is not None else time.monotonic()
    deadline = time.monotonic() + timeout
    shown: dict[tuple[str, str], float] = {}
    quiet_since = time.monotonic()
    while True:
        new = w.poll()
        if new:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 60:
            # nothing happened for a minute: say what the flow waits for and how long it may take
            out(f"[{time.monotonic() - start:7.1f}s]          still waiting: {w.describe_active()}")
            quiet_since = time.monotonic()
        for t in new:
            if t.trigger == Trigger.INSTALL_PROGRESS and t.detail.get("phase") == "write":
                # the installer reports bytes written every 3 s: show one line per 15 s
                key = (t.node, "write")
                if time.monotonic() - shown.get(key, 0.0) < 15:
                    continue
                shown[key] = time.monotonic()
            out(fmt_event(t, start))
        if serial:
            for name, line in tail.poll():
                out(f"[{time.monotonic() - start:7.1f}s]          {name:<8} console: {line.strip()[:150]}")
        if until(w):
            return w
        failed = [(n, st, err) for n in w.entered for st, err in [w.state(n)] if st in FAILED_STATES]
        if failed:
            n, st, err = failed[0]
            raise RuntimeError(f"node {n} is {st}: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout:.0f} s")
        if stop is not None and stop.wait(0.5):
            raise KeyboardInterrupt
        if stop is None:
            time.sleep(0.5)


def phase_times(w: Watcher, t_provision: float) -> list[tuple[str, str, float]]:
    """(node, state, seconds spent in it) from the entry times the watcher saw."""
    rows: list[tuple[str, str, float]] = []
    for node, seq in w.entered.items():
        for (st, t), nxt in zip(seq, [*seq[1:], None], strict=False):
            end = nxt[1] if nxt is not None else time.monotonic()
            rows.append((node, st, end - max(t, t_provision)))
    return rows


def wait_serial(path: Path, pattern: str, timeout: float) -> str:
    """The first line of a VM's serial log matching ``pattern`` (raises TimeoutError with the tail)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if rx.search(line):
                return line
        if time.monotonic() > deadline:
            tail = "\n".join(text.splitlines()[-20:]) or "(empty)"
            raise TimeoutError(f"no /{pattern}/ in {path} within {timeout:.0f} s; tail:\n{tail}")
        time.sleep(0.5)


_START = re.compile(r"^==== \S+ start (\S+) .*?boot=(\S+).*?firmware_boot=(\S+) epoch=([0-9.]+)")
_LINE = re.compile(r"^\[\s*([0-9.]+)\] (.*)$")


@dataclass(frozen=True)
class ConsoleLine:
    at: float  # epoch seconds
    boot: int  # 1 = the first QEMU start of this VM in this log
    text: str


def console_lines(path: Path) -> list[ConsoleLine]:
    """A VM's serial log on the wall clock (``bootsvc.lab.qemu`` writes a start header with the epoch)."""
    out: list[ConsoleLine] = []
    base, boot = 0.0, 0
    text = path.read_text(errors="replace") if path.exists() else ""
    for raw in text.splitlines():
        m = _START.match(raw)
        if m:
            base, boot = float(m.group(4)), boot + 1
            continue
        lm = _LINE.match(raw)
        if lm and boot:
            out.append(ConsoleLine(base + float(lm.group(1)), boot, lm.group(2)))
    return out


def first(lines: list[ConsoleLine], pattern: str, *, after: float = 0.0) -> ConsoleLine | None:
    rx = re.compile(pattern)
    return next((ln for ln in lines if ln.at >= after and rx.search(ln.text)), None)


# what the arm64 DPU's console says at each phase boundary (firmware, GRUB, the lab BFB's installer,
# GRUB from its own disk, the lab DOCA OS)
DPU_MARKS = (("pxe", r"Station IP address is"), ("nbp", r"bootsvc: \S+ dpu-install"),
             ("installer", r"BF-INSTALL: start"), ("installed", r"BF-INSTALL: done, rebooting"),
             ("disk-grub", r"bootsvc-lab: GRUB from disk"), ("os-up", r"BOOTSVC-LAB-OS: up"),
             ("agent", r"BOOTSVC-LAB-OS: starting bootsvc-agent"))


def dpu_marks(serial: Path, since: float) -> dict[str, float]:
    """Epoch of each :data:`DPU_MARKS` phase boundary (in order; a missing one ends the list)."""
    lines = console_lines(serial)
    got: dict[str, float] = {}
    t = since
    for name, pattern in DPU_MARKS:
        ln = first(lines, pattern, after=t)
        if ln is None:
            break
        got[name] = t = ln.at
    return got


def arm64_phase_times(serial: Path, t_prov_epoch: float, policy_epoch: float | None,
                      deployed_epoch: float | None) -> list[tuple[str, float | None]]:
    """Per-phase wall seconds of the arm64 DPU + host flow (None: the phase did not finish)."""
    m = dpu_marks(serial, t_prov_epoch)

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    return [
        ("arm64 PXE: power-on -> AAVMF PXE (arch 11) -> GRUB -> kernel + installer initramfs over HTTP",
         span(t_prov_epoch, m.get("installer"))),
        ("install: lab BFB installer (bfks, bf.cfg, GPT, ESP + root, hooks)",
         span(m.get("installer"), m.get("installed"))),
        ("reboot: AAVMF boots the disk -> GRUB (ESP) -> kernel -> lab DOCA OS up",
         span(m.get("installed"), m.get("os-up"))),
        ("agent: start, check-in, tenant policy applied", span(m.get("os-up"), policy_epoch)),
        ("host: PXE through the DPU relay -> install -> deployed", span(policy_epoch, deployed_epoch)),
    ]


# ---------------------------------------------------------------------------------------------- the demo
# The states every run goes through. With NVIDIA's installer (and the lab's, which behaves like it) the
# DPU stays in dpu_booting through PXE, install and reboot unless bf.cfg's hooks report progress
# (dpu_installing, dpu_rebooting): the agent's first check-in moves it on (CALLBACK_FLOW adds those).
# The boot override each step asks the BMC for is Redfish BootSourceOverrideEnabled "Once"; what the BMC
# then reports is in the node's events (bmc_boot "boot_override": target/enabled): the lab host's BMC
# (sushy-tools) reports "Continuous" for a Once request and the conductor clears it after the boot.
FLOW = [
    ("dpu", State.DPU_BOOTING, "conductor set a network boot override and powered the DPU on via its BMC: "
                               "PXE, install, reboot"),
    ("dpu", State.DPU_READY, "DPU booted its disk; the policy agent checked in over Zone 0"),
    ("dpu", State.POLICY_APPLIED, "agent applied the tenant policy (VRF, relay, nftables, FRR); with EVPN the fabric "
                                  "checks passed (BGP to the leaf, L3VNI up, host /32 as Type-5)"),
    ("host", State.HOST_BOOTING, "conductor set a PXE boot override (asked Once; see the event for what the BMC "
                                 "kept) and powered the host on via its BMC"),
    ("host", State.HOST_INSTALLING, "host PXE-booted through the DPU's relay into its tenant VRF"),
    ("host", State.DEPLOYED, "host installed and reported deployed"),
]


def run_demo(config: Config, config_path: str, *, machines: int = 1, timeout: float = 1500.0,
             serve_forever: bool = True, out: Out = print, host_vms: int | None = None) -> int:
    """The demo. ``host_vms``: how many pairs (the first ones) provision their host VM; the DPUs of the
    others are provisioned alone (their hosts stay enrolled, never powered: the pair's probe namespace
    on the host segment can stand in for them, ``rack.probe_setup`` with ``MachinePlan.host_ip``).
    Default: every pair's host."""
    t0 = time.monotonic()

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old_int, old_term = signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGTERM, interrupt)
    # the demo prints every transition itself (from the event table); the INFO log would say it twice
    logging.getLogger("bootsvc.lifecycle").setLevel(logging.WARNING)
    plan = rack_mod.plan_rack(config, machines=machines)
    host_pairs = {m.index for m in plan.machines[:host_vms]} if host_vms is not None else \
        {m.index for m in plan.machines}
    ui = next((h for h in config.listeners.http if h.netns is None), None)
    rc = 1
    serving = False
    w: Watcher | None = None
    t_prov = time.monotonic()
    try:
        cache = os.environ.get("BOOTSVC_LAB_CACHE", "/var/cache/bootsvc-lab")
        out(f"== 1/6 artifacts (built from Debian packages, cached in {cache})")
        prep = prepare(config, out)
        out(f"== 2/6 rack: namespaces {plan.prov_netns} + {', '.join(m.netns for m in plan.machines)}, "
            f"BMC emulators on 127.0.0.1")
        t = time.monotonic()
        rack_mod.up(config, machines=machines, arts=prep.arts)
        for vm in plan.vms():
            out(f"  {vm.name:<7} {vm.kind:<11} mac {vm.mac}  BMC {plan.bmc_url(vm)}  "
                f"console {plan.workdir / vm.name / (vm.name + '.serial.log')}")
        out(f"  rack up in {time.monotonic() - t:.1f} s")
        out("== 3/6 database and inventory")
        reset_database(config)
        names = load_inventory(config, plan)
        out(f"  db upgraded ({config.database.url}); tenants {', '.join(x.name for x in config.tenants)}; "
            f"enrolled {', '.join(names)}")
        login = demo_token(config)
        out(f"  UI login token (role tech, this lab only): {login}")
        out("== 4/6 bootsvc serve (DHCP/TFTP/DNS/HTTP inside " + plan.prov_netns + ", conductor, UI)")
        t = time.monotonic()
        start_service(config, config_path, plan)
        serving = True
        where = f"; UI/API at http://{ui.address}:{ui.port}/" if ui else ""
        out(f"  serving in {time.monotonic() - t:.1f} s{where}")
        out("== 5/6 provisioning (state changes as they happen; console milestones in between)")
        hosts = [m.host.name for m in plan.machines if m.host is not None and m.index in host_pairs]
        dpus_alone = [m.dpu.name for m in plan.machines if m.host is None or m.index not in host_pairs]
        t_prov = time.monotonic()
        provision(config, hosts + dpus_alone)
        targets = {h: State.DEPLOYED.value for h in hosts} | {d: State.POLICY_APPLIED.value for d in dpus_alone}
        w = Watcher(config)
        watch(config, plan, lambda w: all(w.state(n)[0] == st for n, st in targets.items()),
              timeout=timeout, out=out, t0=t_prov, watcher=w)
        out(f"== done: provisioned in {time.monotonic() - t_prov:.1f} s (total {time.monotonic() - t0:.1f} s)")
        rc = 0
    except KeyboardInterrupt:
        out("interrupted")
        rc = 130
    except Exception as e:  # report what went wrong and what the flow reached, then tear down
        out(f"!! {type(e).__name__}: {e}")
    finally:
        if w is not None:
            _summary(w, plan, t_prov, out, host_pairs)
    try:
        if serve_forever and serving and rc != 130 and ui is not None:
            what = "" if rc == 0 else " (the flow did not finish: look at the machine pages and their events)"
            out(f"== 6/6 the UI stays up at http://{ui.address}:{ui.port}/{what} - Ctrl-C to stop and tear down")
            while True:
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        # teardown must not be cut short by a second ^C: that would leave namespaces and VMs behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        out("tearing down (bootsvc serve, BMCs, VMs, namespaces) ...")
        removed = rack_mod.down(config)
        left = rack_mod.leftovers(config)
        out(f"  removed {', '.join(removed) or 'nothing'}; leftovers: "
            + ("none" if not any(left.values()) else str(left)))
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return rc


def _entered_epoch(w: Watcher, node: str, state: str) -> float | None:
    return next((t.at.timestamp() for t in w.events if t.node == node and t.to_state == state
                 and t.from_state != state), None)


def _summary(w: Watcher, plan: rack_mod.RackPlan, t_prov: float, out: Out, host_pairs: set[int]) -> None:
    out("-- phase wall times (seconds in each state, from provision):")
    for name, state, secs in phase_times(w, t_prov):
        out(f"  {name:<8} {state:<18} {secs:7.1f}")
    t_prov_epoch = time.time() - (time.monotonic() - t_prov)
    for m in plan.machines:
        if m.dpu.kind != "arm64":
            continue
        serial = plan.workdir / m.dpu.name / f"{m.dpu.name}.serial.log"
        host = m.host.name if m.host is not None and m.index in host_pairs else None
        host_done = _entered_epoch(w, host, State.DEPLOYED.value) if host is not None else None
        out(f"-- {m.dpu.name} (arm64, lab BFB) + {host or 'no host VM'}: wall seconds per phase")
        for what, span_s in arm64_phase_times(serial, t_prov_epoch,
                                              _entered_epoch(w, m.dpu.name, State.POLICY_APPLIED.value), host_done):
            out(f"  {'-' if span_s is None else f'{span_s:7.1f}':>7}  {what}")
    out("-- flow checklist:")
    for m in plan.machines:
        for role, st, what in FLOW:
            node: str | None = m.dpu.name if role == "dpu" else (
                m.host.name if m.host is not None and m.index in host_pairs else None)
            if node is None:
                continue
            mark = "ok " if w.reached(node, st.value) else "NOT"
            out(f"  [{mark}] {node:<8} {st.value:<16} {what}")


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root (network namespaces, taps): run as root")

