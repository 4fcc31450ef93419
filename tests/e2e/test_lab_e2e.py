"""Lab end to end: a DPU + host pair from power-on to deployed in its tenant VRF, under QEMU (TCG in CI).

What runs is the product, not a stand-in: ``bootsvc serve`` (DHCP/TFTP/DNS/HTTP inside the lab's
namespace, conductor in the root namespace), the BlueField BMC emulator and sushy-tools driving QEMU,
OVMF's own UEFI PXE, iPXE, the lab installer writing the lab DOCA image, bf.cfg's hook installing the
policy agent, the agent checking in and applying the tenant policy, and the host PXE-booting through
the agent's relay. The test only provisions the host and watches the database; then it repeats the
tenant isolation check from the tenant side of the host segment, and checks that ``lab down`` leaves
nothing behind. An arm64 DPU (AAVMF, DHCP arch 11) is taken through its PXE/NBP (GRUB) stage first.

Prefix ``by`` (the demo uses ``bx``), loopback ports 18410-18499. Prints wall times per phase.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from bootsvc import config as config_mod
from bootsvc import db
from bootsvc.config import Config
from bootsvc.lab import demo, rack
from bootsvc.models import Lease, Node
from bootsvc.states import State

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[2]
PREFIX = "by"
HTTP_PORT = 18480  # bootsvc's loopback HTTP (UI/API) for this test
BMC_BASE = 18410


def lab_config(tmp: Path) -> tuple[Config, Path]:
    """config/lab.yaml with this test's prefix, ports and private state (database, catalog, disks)."""
    tree: dict[str, Any] = yaml.safe_load((ROOT / "config" / "lab.yaml").read_text())
    ns = f"{PREFIX}-prov"
    tree["database"] = {"url": f"sqlite:///{tmp / 'lab.db'}"}
    tree["state_dir"] = str(tmp / "state")
    tree["images"] = {"catalog": str(tmp / "state" / "catalog.yaml"), "root": str(tmp / "state")}
    tree["boot"]["tftp_root"] = str(tmp / "state" / "tftp")
    tree["security"]["node_key_ref"] = f"file:{tmp / 'state' / 'node.key'}"
    tree["bmc_credentials"] = {"lab-bmc": {"ref": f"file:{tmp / 'rack' / 'bmc.cred'}"}}
    tree["listeners"] = {
        "http": [{"address": "127.0.0.1", "port": HTTP_PORT},
                 {"address": "10.77.0.1", "port": 8080, "netns": ns},
                 {"address": "10.77.0.1", "port": 80, "netns": ns}],
        "dhcp": [{"interface": f"{PREFIX}br0", "address": "10.77.0.1", "netns": ns}],
        "tftp": [{"address": "10.77.0.1", "port": 69, "netns": ns}],
        "dns": [{"address": "10.77.0.1", "port": 53, "netns": ns}],
    }
    tree["lab"] = {"prefix": PREFIX, "bmc_port_base": BMC_BASE, "workdir": str(tmp / "rack"),
                   "machines": [{"dpu": "uefi-native", "host": "bios", "tenant": "red"},
                                {"dpu": "arm64", "host": None, "tenant": "blue"}]}
    path = tmp / "lab-e2e.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return config_mod.load(path), path


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, float]] = []
        self._last = self.t0

    def mark(self, what: str) -> None:
        now = time.monotonic()
        self.marks.append((what, now - self._last))
        print(f"[{now - self.t0:7.1f}s] {what} ({now - self._last:.1f} s)", flush=True)
        self._last = now

    def report(self) -> None:
        print("\n== lab e2e wall times ==")
        for what, secs in self.marks:
            print(f"  {secs:7.1f} s  {what}")
        print(f"  {time.monotonic() - self.t0:7.1f} s  TOTAL", flush=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Config, Path, rack.RackPlan]]:
    cfg, path = lab_config(tmp_path)
    plan = rack.plan_rack(cfg)
    try:
        yield cfg, path, plan
    finally:
        rack.down(cfg)
        for f in ("serve.log",):
            p = plan.workdir / f
            if p.exists():  # the service log is the first thing to read when this test fails
                print(f"\n== tail of {p} ==\n" + "\n".join(p.read_text(errors="replace").splitlines()[-60:]))


def _node_state(cfg: Config, name: str) -> str:
    sessions = db.session_factory(db.make_engine(cfg.database.url))
    with sessions() as s:
        n = s.scalars(select(Node).where(Node.name == name)).one()
        return n.state


@pytest.mark.timeout(1500)
def test_dpu_and_host_power_on_to_deployed(lab: tuple[Config, Path, rack.RackPlan]) -> None:
    cfg, cfg_path, _ = lab
    clock = Clock()
    prep = demo.prepare(cfg, out=lambda s: print(s, flush=True))
    clock.mark("artifacts (kernels, iPXE, GRUB, lab DOCA image, agent wheel) built or cached")
    r = rack.up(cfg, arts=prep.arts)
    m1, m2 = r.plan.machines
    assert m1.host is not None and m2.host is None and m2.dpu.kind == "arm64"
    clock.mark("rack up (namespaces, taps, BMC emulators)")
    demo.reset_database(cfg)
    demo.load_inventory(cfg, r.plan)
    demo.start_service(cfg, str(cfg_path), r.plan)
    clock.mark("db upgrade + inventory + bootsvc serve answering")

    # -- arm64 DPU leg: AAVMF PXE (DHCP arch 11) -> TFTP GRUB NBP -> per-MAC GRUB config from bootsvc
    demo.arm64_pxe_leg(cfg, r.plan, m2, out=lambda s: print(s, flush=True))
    serve_log = r.plan.workdir / "serve.log"
    arch11 = [ln for ln in serve_log.read_text().splitlines()
              if f"mac={m2.dpu.mac}" in ln and "kind=pxe-efi-arm64" in ln and "outcome=ack" in ln]
    assert arch11, "bootsvc's DHCP never classified the arm64 DPU as a UEFI arm64 PXE client (arch 11)"
    assert _node_state(cfg, m2.dpu.name) == State.MAINTENANCE
    clock.mark("arm64 DPU: AAVMF PXE arch 11 -> GRUB NBP -> bootsvc GRUB config (dpu-install)")
    sessions = db.session_factory(db.make_engine(cfg.database.url))

    # -- x86 pair: provision the host; the conductor does the DPU first, then the host
    t_prov = time.monotonic()
    demo.provision(cfg, [m1.host.name], actor="e2e")
    w = demo.Watcher(cfg)
    say = lambda s: print(s, flush=True)  # noqa: E731
    try:
        # each half has its own bound, so a broken phase fails in minutes, not at the suite timeout
        demo.watch(cfg, r.plan, lambda w: _node_state(cfg, m1.dpu.name) == State.POLICY_APPLIED, timeout=600,
                   out=say, t0=t_prov, watcher=w)
        clock.mark("DPU: power-on -> PXE -> install -> reboot -> agent check-in -> tenant policy applied")
        demo.watch(cfg, r.plan, lambda w: _node_state(cfg, m1.host.name) == State.DEPLOYED, timeout=600,
                   out=say, t0=t_prov, watcher=w)
        clock.mark("host: power-on -> PXE through the DPU relay -> install -> deployed")
    finally:
        print("-- seconds in each state:")
        for node, st, secs in demo.phase_times(w, t_prov):
            print(f"  {node:<8} {st:<18} {secs:7.1f}")
    for role, st, _ in demo.FLOW:
        node = m1.dpu.name if role == "dpu" else m1.host.name
        assert w.reached(node, st.value), f"{node} never went through {st.value}"

    # the host's address came from its tenant VRF (relayed with VSS), not from Zone 0
    with sessions() as s:
        host = s.scalars(select(Node).where(Node.name == m1.host.name)).one()
        leases = s.scalars(select(Lease).where(Lease.node_id == host.id)).all()
        assert leases and all(le.vrf == "red" for le in leases), [(le.vrf, le.address) for le in leases]

    # -- tenant isolation from the tenant side of the host segment (a host of tenant red)
    rack.probe_setup(r.plan, m1, "10.0.0.250", "10.0.0.1")
    tenant_ns, prov_ns = m1.probe_netns, r.plan.prov_netns
    # the boot endpoints are reachable ...
    ok = rack.probe(tenant_ns, "http", "10.77.0.1", 8080)
    assert ok.allowed, ok
    # ... nothing else in Zone 0 is, though it answers from inside Zone 0 (so the checks can fail)
    for kind, port in (("tcp", 80), ("dns", 53)):
        inside = rack.probe(prov_ns, kind, "10.77.0.1", port)
        assert inside.allowed, f"{inside}: the negative check below would prove nothing"
        outside = rack.probe(tenant_ns, kind, "10.77.0.1", port, timeout=2.0)
        assert not outside.allowed, f"tenant host reached {outside.what}: {outside.detail}"
    dpu_oob = rack.probe(tenant_ns, "tcp", m1.dpu_oob_ip, 8080, timeout=2.0)
    assert not dpu_oob.allowed, dpu_oob
    clock.mark("tenant isolation checks")

    rack.down(cfg)
    left = rack.leftovers(cfg)
    assert not any(left.values()), left
    clock.mark("lab down, nothing left")
    clock.report()


def test_lab_down_leaves_nothing(lab: tuple[Config, Path, rack.RackPlan]) -> None:
    """``lab up`` + a VM powered on through its BMC, then ``lab down``: no namespace, device or process."""
    cfg, _, _ = lab
    t0 = time.monotonic()
    r = rack.up(cfg, machines=1)
    assert rack.leftovers(cfg)["namespaces"] == [f"{PREFIX}-m1", f"{PREFIX}-m1t", f"{PREFIX}-prov"]
    assert rack.boot(cfg, r.plan.machines[0].dpu.name) == "on"
    st = rack.status(cfg)
    assert [v["power"] for v in st["vms"]] == ["On", "Off"], st
    assert len(rack.leftovers(cfg)["processes"]) >= 3  # two BMCs and a QEMU
    removed = rack.down(cfg)
    assert removed == [f"{PREFIX}-m1", f"{PREFIX}-m1t", f"{PREFIX}-prov"]
    assert rack.leftovers(cfg) == {"namespaces": [], "root_devices": [], "processes": []}
    print(f"lab up + boot + down: {time.monotonic() - t0:.1f} s")
