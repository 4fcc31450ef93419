"""The QEMU rack behind ``bootsvc lab up|down|status|boot`` (owned by the capstone).

Owns: the rack plan derived from the site config (``config.lab`` + the Zone 0 network and DHCP
listener), the namespace topology, one Redfish BMC process per VM, a Zone 0 IPv6 RA source, the rack
state file, teardown that leaves nothing behind, and the tenant-isolation probe.

Topology (prefix ``bx``; every name derives from the prefix, devices <= 15 chars)::

    bx-prov    bxbr0  10.77.0.1/24 (Zone 0: bootsvc's DHCP/TFTP/DNS/HTTP listen here) + RA source
      |-- bx1p <veth> bx1o --.
    bx-m1      bx1ob (OOB segment): bx1d0 = DPU VM eth0 (UEFI PXE, Zone 0)
               bx1hb (host segment, L2 only): bx1d1 = DPU VM eth1 (host port), bx1h0 = host VM eth0,
                                               bx1q <veth> bx1r in bx-m1t (the tenant-side probe)
               bx1ub (uplink segment): bx1d2 = DPU VM eth2 (uplink), bx1u <veth> bx1l in bx-leaf
    bx-leaf    the leaf's FRR (bootsvc.lab.leaf): BGP unnumbered + EVPN on bx1l, bx2l, ...

The host VM's only NIC is on ``bx1hb``, whose other ports are the DPU's host port and the probe: the
host reaches anything only through the DPU VM (its policy agent relays DHCP and routes the tenant VRF).
No namespace has a default route or a link to the machine's real interfaces.

BMCs: a process per VM on 127.0.0.1 (root namespace, where the conductor runs): the DPU gets the power
helper's BlueField BMC emulator (``bootsvc.lab.bfbmc.BfBmc``), the host plain sushy-tools; both with
sushy's systems driver delegating to the lab helper's ``QemuPowerBackend`` (which starts QEMU inside
``bx-mN`` with network boot once when the override asks for it, else from the disk: through AAVMF for
the arm64 DPU, by direct kernel boot for x86 VMs). Those processes' code is :mod:`bootsvc.lab.rackprocs`;
the leaf and its links :mod:`bootsvc.lab.leaf`.

One module of ~560 lines on purpose: plan, topology, up/down/status, boot and the probe all work on the
same plan types and rack state file, and a reader follows ``up`` from the plan to the state it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bootsvc.config import Config, LabMachineConfig
from bootsvc.lab import leaf, netns

log = logging.getLogger("bootsvc.lab.rack")

CRED_USER = "root"
STATE_NAME = "rack.json"
BMC_START_TIMEOUT = 60.0


class RackError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class VmPlan:
    name: str  # node name in the inventory (DNS label)
    role: str  # dpu | host
    kind: str  # bios | uefi | uefi-native | arm64
    netns: str  # full namespace name holding the taps
    nics: tuple[tuple[str, str], ...]  # (tap, mac); nic 0 boots
    serial: str
    bmc_port: int
    mem_mb: int

    @property
    def mac(self) -> str:
        return self.nics[0][1]

    @property
    def arch(self) -> str:
        return "aarch64" if self.kind == "arm64" else "x86_64"


@dataclass(frozen=True)
class MachinePlan:
    index: int
    short: str  # "m1"
    netns: str  # "bx-m1"
    probe_netns: str  # "bx-m1t"
    probe_dev: str  # device in the probe namespace on the host segment
    dpu: VmPlan
    host: VmPlan | None
    dpu_oob_ip: str  # reserved Zone 0 address of the DPU's OOB port
    tenant: str | None
    # the host PF's reserved address in its tenant network (network + 10 + pair): what the DPU announces
    # as the host's EVPN Type-5 /32 (docs/fabric.md); tenants overlap, so pairs of two tenants may share it
    host_ip: str | None = None


@dataclass(frozen=True)
class RackPlan:
    prefix: str
    prov_netns: str
    zone0_bridge: str
    zone0_addr: str  # bootsvc's Zone 0 address with prefix length ("10.77.0.1/24")
    server: str  # bootsvc's Zone 0 address ("10.77.0.1")
    machines: tuple[MachinePlan, ...]
    workdir: Path
    cred_file: Path

    def vms(self) -> list[VmPlan]:
        out: list[VmPlan] = []
        for m in self.machines:
            out.append(m.dpu)
            if m.host is not None:
                out.append(m.host)
        return out

    def vm(self, name: str) -> VmPlan:
        for v in self.vms():
            if v.name == name:
                return v
        raise RackError(f"no VM named {name!r} in the rack (have: {', '.join(v.name for v in self.vms())})")

    def bmc_url(self, vm: VmPlan) -> str:
        return f"http://127.0.0.1:{vm.bmc_port}"


def _mac(prefix: str, index: int, role: int) -> str:
    # locally administered QEMU OUI 52:54:00; the 4th byte tells racks (prefixes) apart
    tag = int(hashlib.sha1(prefix.encode()).hexdigest()[:2], 16)
    return f"52:54:00:{tag:02x}:{index:02x}:{role:02x}"


def plan_rack(config: Config, *, machines: int | None = None) -> RackPlan:
    """The rack for ``config`` (pure). ``machines`` limits how many of ``config.lab.machines`` to use."""
    lab = config.lab
    prefix = netns.check_prefix(lab.prefix)
    if not config.listeners.dhcp:
        raise RackError("config has no DHCP listener: the lab needs one inside its prov namespace")
    dl = config.listeners.dhcp[0]
    prov = f"{prefix}-prov"
    if dl.netns != prov or dl.interface != f"{prefix}br0":
        raise RackError(f"the DHCP listener must be interface {prefix}br0 in netns {prov} (lab.prefix {prefix}); "
                        f"config has {dl.interface} in {dl.netns}")
    zone0 = next((n for n in config.networks if n.zone == 0 and n.boot_server is not None), None)
    if zone0 is None:
        raise RackError("config has no zone-0 network with a boot_server")
    server = str(zone0.boot_server)
    specs: tuple[LabMachineConfig, ...] = lab.machines[:machines] if machines else lab.machines
    if not specs:
        raise RackError("config.lab.machines is empty")
    reserved = [ipaddress.IPv4Address(int(r.start) + k) for r in zone0.reserved for k in range(r.size())]
    reserved = [a for a in reserved if str(a) != server and a != zone0.gateway]
    workdir = config.resolve(lab.workdir)
    out: list[MachinePlan] = []
    tenants = [t.name for t in config.tenants]
    for i, ms in enumerate(specs, start=1):
        if i > 9:
            raise RackError("at most 9 machines per rack (device names must fit 15 characters)")
        short = f"m{i}"
        ns = f"{prefix}-{short}"
        # eth0 OOB (Zone 0), eth1 host port, eth2 uplink to the leaf (bootsvc.lab.leaf)
        dpu_nics = ((f"{prefix}{i}d0", _mac(prefix, i, 0x10)), (f"{prefix}{i}d1", _mac(prefix, i, 0x11)),
                    (leaf.uplink_tap(prefix, i), _mac(prefix, i, 0x12)))
        dpu = VmPlan(name=f"dpu-{i}", role="dpu", kind=ms.dpu, netns=ns, nics=dpu_nics,
                     serial=f"MT2334LAB{i:03d}", bmc_port=lab.bmc_port_base + 2 * (i - 1),
                     mem_mb=1024 if ms.dpu == "arm64" else 640)
        host = None
        if ms.host is not None:
            host = VmPlan(name=f"host-{i}", role="host", kind=ms.host, netns=ns,
                          nics=((f"{prefix}{i}h0", _mac(prefix, i, 0x20)),), serial=f"HOSTLAB{i:03d}",
                          bmc_port=lab.bmc_port_base + 2 * (i - 1) + 1, mem_mb=512)
        if len(reserved) < i:
            raise RackError(f"zone-0 network {zone0.name}: not enough reserved addresses for {i} DPUs")
        tenant = ms.tenant or (tenants[0] if tenants else None)
        out.append(MachinePlan(index=i, short=short, netns=ns, probe_netns=f"{ns}t", probe_dev=f"{prefix}{i}r",
                               dpu=dpu, host=host, dpu_oob_ip=str(reserved[i - 1]), tenant=tenant,
                               host_ip=_host_ip(config, tenant, i) if host is not None else None))
    return RackPlan(prefix=prefix, prov_netns=prov, zone0_bridge=f"{prefix}br0",
                    zone0_addr=f"{server}/{zone0.cidr.prefixlen}", server=server, machines=tuple(out),
                    workdir=workdir, cred_file=workdir / "bmc.cred")


def _host_ip(config: Config, tenant: str | None, index: int) -> str | None:
    t = next((x for x in config.tenants if x.name == tenant), None)
    net = next((n for n in config.networks if t is not None and n.zone == 1 and n.vrf == t.vrf), None)
    if net is None or net.cidr.num_addresses < 16 + index:
        return None
    return str(net.cidr.network_address + 10 + index)


def topology(plan: RackPlan) -> netns.Topology:
    t = netns.Topology(plan.prefix)
    t.netns("prov")
    tag = int(hashlib.sha1(plan.prefix.encode()).hexdigest()[:4], 16)
    br0 = t.bridge("prov", "br0", [plan.zone0_addr, f"fd00:{tag:x}::1/64"])
    for m in plan.machines:
        i, s = m.index, m.short
        t.netns(s)
        ob = t.bridge(s, f"{i}ob")
        t.tap(s, f"{i}d0", bridge=ob)
        t.veth((s, f"{i}o"), ("prov", f"{i}p"), a_bridge=ob, b_bridge=br0)
        hb = t.bridge(s, f"{i}hb")
        t.tap(s, f"{i}d1", bridge=hb)
        if m.host is not None:
            t.tap(s, f"{i}h0", bridge=hb)
        t.netns(f"{s}t")
        t.veth((s, f"{i}q"), (f"{s}t", f"{i}r"), a_bridge=hb)
        # the segment bridges only switch frames: no addresses, no IPv6 of their own in bx-mN
        t.sysctl(s, "net.ipv6.conf.all.disable_ipv6", 1)
        t.sysctl(s, "net.ipv6.conf.default.disable_ipv6", 1)
    leaf.add_to_topology(t, [m.index for m in plan.machines])
    return t


# ---------------------------------------------------------------------------------------------- state
def _state_path(plan: RackPlan) -> Path:
    return plan.workdir / STATE_NAME


def read_state(plan: RackPlan) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(_state_path(plan).read_text())
        return data
    except (OSError, ValueError):
        return None


def _write_state(plan: RackPlan, state: dict[str, Any]) -> None:
    p = _state_path(plan)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(p)


def credentials(plan: RackPlan) -> tuple[str, str]:
    user, _, pw = plan.cred_file.read_text().strip().partition(":")
    return user, pw


def _new_credentials(plan: RackPlan) -> tuple[str, str]:
    plan.cred_file.parent.mkdir(parents=True, exist_ok=True)
    pw = secrets.token_hex(12)
    fd = os.open(plan.cred_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{CRED_USER}:{pw}\n")
    os.chmod(plan.cred_file, 0o600)
    return CRED_USER, pw


# ---------------------------------------------------------------------------------------------- up/down
@dataclass
class Rack:
    """A running rack (what ``up`` returns)."""

    plan: RackPlan
    lab: netns.Lab
    bmc_pids: dict[str, int]
    up_seconds: float


def console_socket(plan: RackPlan, vm: VmPlan) -> Path:
    """The host side of a DPU VM's command console (virtio console hvc0; bootsvc.lab.fabric.dpu_exec)."""
    return plan.workdir / vm.name / "console.sock"


def _vm_spec_json(plan: RackPlan, vm: VmPlan, arts: Any) -> dict[str, Any]:
    arm = vm.kind == "arm64"
    vmdir = plan.workdir / vm.name
    console = "ttyAMA0" if arm else "ttyS0,115200"
    extra: list[str] = []
    if vm.role == "dpu":
        # a root shell on hvc0 (the lab DOCA image's /etc/bootsvc-lab/console-shell), reachable through a
        # unix socket: how the lab runs vtysh on a DPU (a real DPU: its BMC's console or SSH on the OOB port)
        extra = ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=con1,path={console_socket(plan, vm)},server=on,wait=off",
                 "-device", "virtconsole,chardev=con1,bus=vser0.0"]
    return {
        "extra_args": extra,
        "name": vm.name, "kind": vm.kind, "netns": vm.netns, "nics": [list(n) for n in vm.nics],
        "mem_mb": vm.mem_mb, "disk": str(vmdir / "disk.raw"), "workdir": str(vmdir),
        # the arm64 DPU boots its disk through AAVMF (what the lab BFB installed); x86 VMs direct-boot
        "disk_kernel": None if arm else str(arts.kernel),
        "disk_initrd": None if arm else str(arts.initrd),
        "disk_append": f"console={console} bootsvc.mode=disk root=/dev/vda panic=-1",
    }


def boot_route(config: Config, plan: RackPlan) -> dict[str, str]:
    """How the lab's BMCs reach bootsvc's boot plane: ``{"10.77.0.1:8080": "127.0.0.1:<port>"}``.

    A real DPU BMC fetches the one-time BFB URL over its management network; the lab's BMC emulators
    run in the root namespace, which has no route into the lab's Zone 0 (by design), so the one-time
    URL's Zone 0 host is rewritten to bootsvc's loopback listener (same service, same one-time token,
    same source check: the BMC's address is 127.0.0.1 in the inventory), and the fetch keeps the Zone 0
    ``Host`` header, so the bf.cfg bootsvc appends points the DPU at Zone 0."""
    loop = next((h for h in config.listeners.http if h.netns is None and str(h.address).startswith("127.")), None)
    if loop is None:
        return {}
    return {f"{plan.server}:{config.boot.http_port}": f"{loop.address}:{loop.port}"}


def _spawn_bmc(plan: RackPlan, vm: VmPlan, spec: dict[str, Any], user: str, password: str) -> subprocess.Popen[bytes]:
    vmdir = Path(spec["workdir"])
    spec_file = vmdir / "bmc.json"
    spec_file.write_text(json.dumps({**spec, "bmc": "bluefield" if vm.role == "dpu" else "sushy",
                                     "port": vm.bmc_port}, indent=1))
    env = {**os.environ, "BOOTSVC_LAB_BMC_USER": user, "BOOTSVC_LAB_BMC_PASSWORD": password}
    logf = (vmdir / "bmc.log").open("ab")
    try:
        # own session: the BMC outlives `bootsvc lab up` and is not hit by the terminal's ^C
        proc = subprocess.Popen([sys.executable, "-m", "bootsvc.lab.rackprocs", "bmc", str(spec_file)], env=env,
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        logf.close()
    return proc


def _wait_bmc(url: str, user: str, password: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _bmc_get(url, "/redfish/v1/Systems", user, password)
            return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise RackError(f"BMC {url} exited with {proc.returncode} (see its bmc.log)")
        if time.monotonic() > deadline:
            raise RackError(f"BMC {url} not answering after {timeout:.0f} s")
        time.sleep(0.1)


def _bmc_get(url: str, path: str, user: str, password: str, timeout: float = 3.0) -> dict[str, Any]:
    req = urllib.request.Request(url + path, headers={
        "Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


def up(config: Config, *, machines: int | None = None, arts: Any = None) -> Rack:
    """Build the rack: namespaces, bridges, taps, RA source, BMC processes. Sweeps leftovers first."""
    from bootsvc.lab import artifacts

    t0 = time.monotonic()
    plan = plan_rack(config, machines=machines)
    down(config, quiet=True)
    arts = arts or artifacts.build_artifacts()
    lab = netns.Lab(topology(plan), sweep_first=True)
    lab.up()
    try:
        t_leaf = time.monotonic()
        for pid in leaf.start(plan.prefix, [leaf.leaf_dev(plan.prefix, m.index) for m in plan.machines]):
            lab.record_pid(pid)
        log.info("lab %s: leaf FRR up in %s-%s (%d links) in %.1f s", plan.prefix, plan.prefix, leaf.LEAF,
                 len(plan.machines), time.monotonic() - t_leaf)
        user, pw = _new_credentials(plan)
        # RA source on Zone 0: iPXE otherwise waits ~16 s for IPv6 autoconfiguration (lab.md section 4)
        with (plan.workdir / "ra.log").open("ab") as ralog:
            ra = subprocess.Popen(["ip", "netns", "exec", plan.prov_netns, sys.executable, "-m",
                                   "bootsvc.lab.rackprocs", "ra", plan.zone0_bridge], stdout=subprocess.DEVNULL,
                                  stderr=ralog, start_new_session=True)
        lab.record_pid(ra.pid)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for vm in plan.vms():
            vmdir = plan.workdir / vm.name
            if vmdir.exists():  # a fresh machine every `lab up`: empty disk, factory NVRAM
                import shutil

                shutil.rmtree(vmdir)
            vmdir.mkdir(parents=True)
            with (vmdir / "disk.raw").open("wb") as f:
                f.truncate(1024 * 1024 * 1024)  # sparse 1 GiB: holds the lab DOCA image (~370 MB raw)
            p = _spawn_bmc(plan, vm, {**_vm_spec_json(plan, vm, arts), "boot_route": boot_route(config, plan)},
                           user, pw)
            lab.record_pid(p.pid)
            procs[vm.name] = p
        for vm in plan.vms():
            _wait_bmc(plan.bmc_url(vm), user, pw, procs[vm.name], BMC_START_TIMEOUT)
    except BaseException:
        lab.down()
        raise
    rack = Rack(plan, lab, {k: p.pid for k, p in procs.items()}, time.monotonic() - t0)
    _write_state(plan, {
        "prefix": plan.prefix, "up_at": time.time(), "namespaces": netns.list_namespaces(plan.prefix),
        "bmcs": {vm.name: {"url": plan.bmc_url(vm), "pid": procs[vm.name].pid, "kind": vm.kind,
                           "role": vm.role, "macs": [m for _, m in vm.nics]} for vm in plan.vms()},
        "ra_pid": ra.pid, "machines": len(plan.machines), "plan": asdict(plan),
    })
    return rack


def record_pid(plan: RackPlan, pid: int) -> None:
    """Record a process (e.g. the demo's ``bootsvc serve``) so ``down`` stops it."""
    st = read_state(plan) or {}
    st.setdefault("services", []).append(pid)
    _write_state(plan, st)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(x) for x in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def stop_tree(pid: int, *, grace: float = 15.0) -> None:
    """SIGTERM a process and give it ``grace`` s to stop its children; then kill whatever is left."""
    kids = _descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and netns._alive(pid):
        time.sleep(0.1)
    netns.kill_pids([pid, *kids], grace=3.0)


def down(config: Config, *, quiet: bool = False) -> list[str]:
    """Stop services the lab recorded, the BMCs (which power their VMs off), then sweep the prefix:
    processes in its namespaces, the namespaces and every device in them. Returns removed namespaces."""
    plan = plan_rack(config)
    st = read_state(plan) or {}
    for pid in st.get("services", []):
        if netns._alive(int(pid)):
            stop_tree(int(pid))
    bmc_pids = [int(b["pid"]) for b in (st.get("bmcs") or {}).values()]
    netns.kill_pids([p for p in bmc_pids if netns._alive(p)], grace=5.0)  # BMCs kill their QEMU on SIGTERM
    removed = netns.sweep(plan.prefix)
    leaf.stop(plan.prefix)
    _state_path(plan).unlink(missing_ok=True)
    if not quiet:
        log.info("lab %s down: removed %s", plan.prefix, ", ".join(removed) or "nothing")
    return removed


def leftovers(config: Config) -> dict[str, list[Any]]:
    """What of the lab still exists (all lists empty after ``down``): namespaces, devices in the root
    namespace, live BMC/service processes, QEMU processes of the rack's VMs, the leaf's FRR daemons."""
    plan = plan_rack(config)
    procs: list[int] = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmd).decode(errors="replace")
        # QEMU's disk and the BMC's spec file both live in the rack's workdir; the leaf's FRR daemons
        # name their run directory (bootsvc.lab.leaf.rundir) in their vty socket argument
        if (str(plan.workdir) + "/" in text or str(leaf.rundir(plan.prefix)) in text) and p.name != str(os.getpid()):
            procs.append(int(p.name))
    return {"namespaces": netns.list_namespaces(plan.prefix),
            "root_devices": netns.root_links_with_prefix(plan.prefix),
            "processes": procs}


# ---------------------------------------------------------------------------------------------- status
def _current_plan(config: Config) -> tuple[RackPlan, dict[str, Any] | None]:
    """The plan of the rack that is up (as many machines as ``up`` was given), and its state."""
    plan = plan_rack(config)
    st = read_state(plan)
    if st is not None and st.get("machines"):
        plan = plan_rack(config, machines=int(st["machines"]))
    return plan, st


def status(config: Config) -> dict[str, Any]:
    plan, st = _current_plan(config)
    out: dict[str, Any] = {"prefix": plan.prefix, "up": st is not None,
                           "namespaces": netns.list_namespaces(plan.prefix), "vms": []}
    if st is None:
        return out
    out["leaf"] = {"netns": f"{plan.prefix}-{leaf.LEAF}", "asn": leaf.LEAF_ASN, "sessions": leaf.sessions(plan.prefix)}
    try:
        user, pw = credentials(plan)
    except OSError:
        user = pw = ""
    for vm in plan.vms():
        b = (st.get("bmcs") or {}).get(vm.name, {})
        row: dict[str, Any] = {"name": vm.name, "role": vm.role, "kind": vm.kind, "mac": vm.mac,
                               "bmc": plan.bmc_url(vm), "bmc_alive": netns._alive(int(b.get("pid", 0) or 0))}
        try:
            members = _bmc_get(plan.bmc_url(vm), "/redfish/v1/Systems", user, pw)["Members"]
            doc = _bmc_get(plan.bmc_url(vm), members[0]["@odata.id"], user, pw)
            row["power"] = doc.get("PowerState")
            row["boot"] = (doc.get("Boot") or {}).get("BootSourceOverrideTarget")
        except (OSError, ValueError, KeyError, IndexError) as e:
            row["power"] = f"unknown ({e})"
        row["serial_log"] = str(plan.workdir / vm.name / f"{vm.name}.serial.log")
        out["vms"].append(row)
    return out


@dataclass(frozen=True)
class _NodeBmc:
    name: str
    bmc_address: str | None
    bmc_driver: str
    bmc_credential_ref: str | None
    bmc_verify_tls: bool


def driver(config: Config, plan: RackPlan, vm: VmPlan) -> Any:
    """The power helper's Redfish driver for a VM's BMC (what the conductor uses for enrolled nodes)."""
    from bootsvc.power import driver_for

    return driver_for(_NodeBmc(vm.name, plan.bmc_url(vm), "redfish", f"file:{plan.cred_file}", False), config)


def boot(config: Config, name: str, *, target: str = "pxe") -> str:
    """Power a VM on through its BMC with a one-time boot override (``pxe``) or from its disk."""
    from bootsvc.power.base import BootTarget, PowerState

    plan, _ = _current_plan(config)
    vm = plan.vm(name)
    drv = driver(config, plan, vm)
    if target == "pxe":
        drv.boot_once(BootTarget.PXE)
    else:
        drv.clear_boot_override()
    if drv.power_state() is PowerState.ON:
        drv.reset()
        return "reset"
    drv.power_on()
    return "on"


# ---------------------------------------------------------------------------------------------- probe
@dataclass(frozen=True)
class ProbeResult:
    what: str
    allowed: bool  # the connection/answer succeeded
    detail: str


_PROBE = r"""
import json, socket, sys
kind, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=timeout); s.close(); print(json.dumps([True, "connected"]))
    elif kind == "dns":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x03lab\x00" + b"\x00\x01\x00\x01"
        s.sendto(q, (host, port)); d = s.recv(512); print(json.dumps([True, f"answer {len(d)} bytes"]))
    elif kind == "http":
        import urllib.request
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=timeout) as r:
            print(json.dumps([True, f"HTTP {r.status}"]))
except Exception as e:
    print(json.dumps([False, f"{type(e).__name__}: {e}"]))
"""


def probe_setup(plan: RackPlan, m: MachinePlan, address: str, gateway: str, prefixlen: int = 24) -> None:
    """Give the tenant-side probe namespace an address on the host segment and a route to Zone 0 via the
    tenant gateway (the DPU's host port) - what a deployed host of that tenant has."""
    ns = m.probe_netns
    subprocess.run(["ip", "-n", ns, "addr", "replace", f"{address}/{prefixlen}", "dev", m.probe_dev], check=True)
    net = ipaddress.ip_interface(plan.zone0_addr).network
    subprocess.run(["ip", "-n", ns, "route", "replace", str(net), "via", gateway], check=True)


def probe(ns: str, kind: str, host: str, port: int, *, timeout: float = 3.0) -> ProbeResult:
    """From inside ``ns``: does ``kind`` (tcp|dns|http) reach host:port?"""
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, kind, host, str(port),
                          str(timeout)], capture_output=True, text=True, timeout=timeout + 30, check=False)
    try:
        ok, detail = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return ProbeResult(f"{kind} {host}:{port}", False, f"probe failed: {res.stderr.strip()[-300:]}")
    return ProbeResult(f"{kind} {host}:{port}", bool(ok), str(detail))
