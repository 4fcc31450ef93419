"""Lab end to end: an arm64 DPU + x86 host pair from power-on to deployed in its tenant VRF, under QEMU
(TCG in CI).

What runs is the product, not a stand-in: ``bootsvc serve`` (DHCP/TFTP/DNS/HTTP inside the lab's
namespace, conductor in the root namespace), the BlueField BMC emulator and sushy-tools driving QEMU,
and the lab BlueField: an arm64 VM (AAVMF, DHCP arch 11) that PXE-boots GRUB, loads the kernel and the
installer initramfs that ``import-bfb`` extracted from the lab BFB (the ``mlx-mkbfb`` stream format,
built by ``bootsvc.lab.bf3`` from Debian's arm64 kernel, an installer and the arm64 lab DOCA OS), whose
installer behaves like NVIDIA's (``bfnet``/``bfks``, ``/etc/bf.cfg``, the three hooks, no callbacks of
its own), installs GPT + ESP (GRUB at ``\\EFI\\BOOT\\BOOTAA64.EFI``) + root, reboots and boots from its
own disk through AAVMF (no QEMU direct kernel boot), starts the policy agent, which checks in and
applies the tenant policy; then the host PXE-boots through the agent's relay.

The pair is enrolled and provisioned the way a tech does it: in the web UI, in Debian's chromium
(headless) driven by Playwright - log in with a token, scan the labels into the enroll form (serial,
MAC, rack/slot, tenant, BMC addresses and credential, the DPU's fixed OOB address and CPU), press
Provision on the machine page and confirm, then watch that page follow the DPU and the host live (it
polls status.json) until it shows the host deployed with its lease in the tenant VRF. Screenshots of
each phase go to ``artifacts/ui/lab/`` (CI artifact folder). The test also watches the database and the
consoles (printed, for diagnosis), repeats the tenant isolation check from the tenant side of the host
segment, and checks that ``lab down`` leaves nothing behind. It prints per-phase wall times (arm64 PXE,
install, reboot, agent, host). A second test installs the same DPU through its BMC instead (Redfish
SimpleUpdate of the one-time BFB URL, the emulator's RShim push modelled by a one-time boot of the
fetched stream's kernel + initramfs + bf.cfg), up to the tenant policy.

Needs root (skipped otherwise), QEMU, apt ``chromium`` and pip ``playwright``; outside CI a missing
browser stack skips the UI test, in CI (CI=true) it fails.

Prefix ``by`` (the demo uses ``bx``), loopback ports 18410-18499 (both can be moved, see PREFIX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.conductor import add_token
from helpers.labcfg import lab_tree, write_config
from sqlalchemy import select

from bootsvc import config as config_mod
from bootsvc import db, inventory, operations
from bootsvc.config import Config
from bootsvc.lab import artifacts, demo, rack
from bootsvc.models import Lease, Node
from bootsvc.states import State

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[2]
# Another prefix/port block lets a second copy run beside CI's on one machine (e.g. ``bv`` 18700):
# ``lab up`` sweeps everything of its prefix first.
PREFIX = os.environ.get("BOOTSVC_LAB_E2E_PREFIX", "by")
BMC_BASE = int(os.environ.get("BOOTSVC_LAB_E2E_PORT_BASE", "18410"))  # BMC emulators: base .. base+3
HTTP_PORT = BMC_BASE + 70  # bootsvc's loopback HTTP (UI/API) for this test
SHOTS = ROOT / "artifacts" / "ui" / "lab"
UI_MS = 60_000  # a page step, with QEMU (TCG) busy on the same cores
CRED_NAME = "lab-bmc"  # the site config's BMC credential the tech picks in the form


def lab_config(tmp: Path) -> tuple[Config, Path]:
    """config/lab.yaml with this test's prefix, ports and private state (database, catalog, disks), one pair."""
    tree = lab_tree(tmp, prefix=PREFIX, bmc_base=BMC_BASE, http_port=HTTP_PORT, cred_name=CRED_NAME,
                    boot_role_in_netns=False)
    tree["lab"]["machines"] = [{"dpu": "arm64", "host": "bios", "tenant": "red"}]
    return write_config(tree, tmp / "lab-e2e.yaml")


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


def _tech_token(cfg: Config) -> str:
    """A tech's UI token, as ``bootsvc token create NAME --role tech`` makes it (the hash is stored)."""
    return add_token(db.session_factory(db.make_engine(cfg.database.url)), "tech", "lab-tech")


def shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"   screenshot {path.relative_to(ROOT)}", flush=True)
    return path


def scan(page: Any, expected_field: str, text: str) -> None:
    """A barcode scanner: types the code, then Enter. The focus must be on the field we expect."""
    assert page.evaluate("document.activeElement.name") == expected_field
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def ui_enroll(page: Any, base: str, token: str, plan: rack.RackPlan, m: rack.MachinePlan) -> tuple[str, str]:
    """Log in and enroll machine ``m`` (host + DPU) through the enroll form; returns (host, DPU) names."""
    from playwright.sync_api import expect

    assert m.host is not None
    page.goto(f"{base}/")
    expect(page).to_have_url(f"{base}/ui/login?next=/ui/", timeout=UI_MS)
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page.locator(".role")).to_contain_text("tech", timeout=UI_MS)
    page.click("text=Enroll")
    expect(page.locator("h1")).to_have_text("Enroll a machine", timeout=UI_MS)
    page.click("#f-rack")
    # the labels, in the order the form asks for them (MACs as printed on the labels: upper case, dashes)
    scan(page, "rack", plan.prefix)
    scan(page, "slot", str(m.index))
    scan(page, "host_serial", m.host.serial)
    scan(page, "host_mac", m.host.mac.upper().replace(":", "-"))
    scan(page, "dpu_serial", m.dpu.serial)
    scan(page, "dpu_mac", m.dpu.mac.upper().replace(":", "-"))
    assert page.evaluate("document.activeElement.name") == "tenant", "Enter must move on, not submit"
    assert m.tenant is not None
    page.select_option("#f-tenant", m.tenant)
    page.fill("#f-hostname", m.host.name)
    page.click("summary")  # BMCs, fixed address, CPU
    page.fill("#f-host_bmc", plan.bmc_url(m.host))
    page.fill("#f-dpu_bmc", plan.bmc_url(m.dpu))
    page.select_option("#f-bmc_driver", "redfish")
    page.select_option("#f-bmc_credential", CRED_NAME)
    page.fill("#f-dpu_oob_ip", m.dpu_oob_ip)
    page.select_option("#f-host_arch", m.host.arch)
    page.select_option("#f-dpu_arch", m.dpu.arch)  # the lab BlueField is an arm64 VM, as a BF3 is
    expect(page.locator("#f-dpu_mac ~ .mac-preview")).to_have_text(f"\u2192 {m.dpu.mac}", timeout=UI_MS)
    shot(page, "00-enroll-form")
    page.click("#enroll-button")
    host_name, dpu_name = m.host.name, f"{m.host.name}-dpu"
    expect(page.locator(".flash-ok").first).to_contain_text(f"Enrolled host {host_name} and DPU {dpu_name}",
                                                            timeout=UI_MS)
    return host_name, dpu_name


# (screenshot, node role, state the machine page shows): the phases a tech watches
PHASES = (("02-dpu-booting", "dpu", State.DPU_BOOTING), ("03-dpu-policy-applied", "dpu", State.POLICY_APPLIED),
          ("04-host-installing", "host", State.HOST_INSTALLING))
HOOK_PHASES = {"bfb_pre_install", "bfb_modify_os", "bfb_post_install"}


class PageWatch:
    """Reads the machine page's node cards (as the page's own 2 s poll updated them) and takes the
    screenshot of each phase the first time the page shows it."""

    def __init__(self, page: Any, names: dict[str, str]) -> None:
        self.page, self.names = page, names
        self.seen: dict[str, list[str]] = {n: [] for n in names.values()}
        self.shots: dict[str, Path] = {}

    def states(self) -> dict[str, str]:
        got: dict[str, str] = self.page.evaluate(
            "() => Object.fromEntries(Array.from(document.querySelectorAll('.node-card'))"
            ".map(c => [c.dataset.nodeName, c.dataset.state]))")
        return got

    def poll(self) -> dict[str, str]:
        now = self.states()
        for name, st in now.items():
            if name in self.seen and (not self.seen[name] or self.seen[name][-1] != st):
                self.seen[name].append(st)
        for shot_name, role, st in PHASES:
            if shot_name not in self.shots and now.get(self.names[role]) == st.value:
                self.shots[shot_name] = shot(self.page, shot_name)
        return now


def _import_is_byte_identical(prep: demo.Prepared) -> None:
    """What import-bfb extracted from the lab BFB is what the lab put into it, byte for byte."""
    img = prep.catalog.get(demo.LAB_BFB_NAME, str(prep.bf3.key))
    assert img is not None and img.kind == "bfb" and prep.catalog.defaults["dpu"] == img.ref
    k, i, whole = img.file("kernel"), img.file("initrd"), img.file("bfb")
    assert k is not None and i is not None and whole is not None
    assert (k.name, i.name) == ("dump-image-v0", "dump-initramfs-v0")  # the names mlx-mkbfb -x gives
    assert k.sha256 == artifacts._sha256(prep.bf3.kernel) == artifacts._sha256(k.path)
    assert i.sha256 == artifacts._sha256(prep.bf3.initramfs) == artifacts._sha256(i.path)
    assert whole.sha256 == prep.bf3.sha256


@pytest.mark.timeout(1500)
def test_dpu_and_host_power_on_to_deployed(browser: Any, lab: tuple[Config, Path, rack.RackPlan]) -> None:
    from playwright.sync_api import expect

    cfg, cfg_path, _ = lab
    clock = Clock()
    shutil.rmtree(SHOTS, ignore_errors=True)  # only this run's screenshots in the artifact folder
    prep = demo.prepare(cfg, out=lambda s: print(s, flush=True))
    _import_is_byte_identical(prep)
    clock.mark("artifacts (kernels, iPXE, GRUB, lab DOCA images, lab BFB, agent wheel) built or cached; import-bfb")
    r = rack.up(cfg, arts=prep.arts)
    (m1,) = r.plan.machines
    assert m1.host is not None and m1.dpu.kind == "arm64"
    clock.mark("rack up (namespaces, taps, BMC emulators)")
    demo.reset_database(cfg)
    demo.load_inventory(cfg, dataclasses.replace(r.plan, machines=()))  # db upgrade + tenants
    token = _tech_token(cfg)
    demo.start_service(cfg, str(cfg_path), r.plan)
    clock.mark("db upgrade + tenants + bootsvc serve answering")
    sessions = db.session_factory(db.make_engine(cfg.database.url))

    # -- the pair, as a tech does it: enroll in the UI, provision from the machine page, watch it there
    base = f"http://127.0.0.1:{HTTP_PORT}"
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(UI_MS)
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    host_name, dpu_name = ui_enroll(page, base, token, r.plan, m1)
    with sessions() as s:  # what the form stored is what the conductor and DHCP will act on
        host = s.scalars(select(Node).where(Node.name == host_name)).one()
        dpu = s.scalars(select(Node).where(Node.name == dpu_name)).one()
        assert dpu.host_id == host.id and host.tenant is not None and host.tenant.name == m1.tenant
        assert [(x.mac, x.role, x.ipv4) for x in host.nics] == [(m1.host.mac, "host-pf", None)]
        assert [(x.mac, x.role, x.ipv4) for x in dpu.nics] == [(m1.dpu.mac, "oob", m1.dpu_oob_ip)]
        assert (host.bmc_address, dpu.bmc_address) == (r.plan.bmc_url(m1.host), r.plan.bmc_url(m1.dpu))
        assert {host.bmc_credential_ref, dpu.bmc_credential_ref, host.bmc_driver, dpu.bmc_driver} == {
            CRED_NAME, "redfish"}
        assert (host.arch, dpu.arch) == ("x86_64", "aarch64")
        assert host.state == dpu.state == State.REGISTERED
        host_id = host.id
        # the fabric runs EVPN (config/lab.yaml): the DPU announces the host PF's reserved address as a
        # Type-5 /32 and the host boots only once it is advertised; the enroll form has no field for it
        assert m1.host_ip is not None
        operations.edit_node(s, host, {"nics": [inventory.NicSpec(mac=m1.host.mac, role="host-pf",
                                                                  ipv4=m1.host_ip)]}, actor="lab-e2e")
    page.get_by_role("link", name=host_name, exact=True).click()  # "Last enrolled: <host>"
    expect(page.locator("h1")).to_have_text(f"Machine {host_name}")
    host_card = page.locator(f".node-card[data-node-name='{host_name}']")
    dpu_card = page.locator(f".node-card[data-node-name='{dpu_name}']")
    expect(host_card).to_have_attribute("data-state", State.REGISTERED.value)
    expect(dpu_card).to_have_attribute("data-state", State.REGISTERED.value)
    shot(page, "01-enrolled")
    clock.mark("UI: log in, enroll host + DPU as a scanner would")

    # provision the host through the confirmation step; the conductor does the DPU first, then the host
    host_card.locator("a[data-action=provision]").click()
    expect(page.locator("h1")).to_contain_text(f"Provision HOST {host_name}?")
    t_prov, t_prov_epoch = time.monotonic(), time.time()
    page.click("#confirm-button")
    expect(page.locator(".flash-ok")).to_contain_text(f"Provision: {host_name} REGISTERED \u2192 HOST WAITING DPU")
    assert page.url == f"{base}/ui/machines/{host_id}"
    page.evaluate("window.__noReload = 1")  # gone if the page reloads: it must follow the flow in place
    pw = PageWatch(page, {"host": host_name, "dpu": dpu_name})
    w = demo.Watcher(cfg)
    say = lambda s: print(s, flush=True)  # noqa: E731
    try:
        # each half has its own bound, so a broken phase fails in minutes, not at the suite timeout; the
        # condition is what the PAGE shows (the database is printed alongside for diagnosis)
        demo.watch(cfg, r.plan, lambda w: pw.poll().get(dpu_name) == State.POLICY_APPLIED, timeout=900,
                   out=say, t0=t_prov, watcher=w)
        clock.mark("arm64 DPU: power-on -> PXE -> BFB installer -> reboot from disk -> agent -> policy applied")
        demo.watch(cfg, r.plan, lambda w: pw.poll().get(host_name) == State.DEPLOYED, timeout=600,
                   out=say, t0=t_prov, watcher=w)
        clock.mark("host: power-on -> PXE through the DPU relay -> install -> deployed")
    except BaseException:
        with contextlib.suppress(Exception):
            shot(page, "99-when-it-stopped")  # what the tech saw when the flow stopped
        raise
    finally:
        print("-- seconds in each state:")
        for node, st, secs in demo.phase_times(w, t_prov):
            print(f"  {node:<10} {st:<18} {secs:7.1f}")
        print(f"-- states the machine page showed: {pw.seen}", flush=True)
        dpu_serial = r.plan.workdir / m1.dpu.name / f"{m1.dpu.name}.serial.log"
        phases = demo.arm64_phase_times(dpu_serial, t_prov_epoch,
                                        demo._entered_epoch(w, dpu_name, State.POLICY_APPLIED),
                                        demo._entered_epoch(w, host_name, State.DEPLOYED))
        print("\n== arm64 DPU + host: wall seconds per phase ==")
        for what, secs in phases:
            print(f"  {'-' if secs is None else f'{secs:7.1f}':>7} s  {what}", flush=True)
    assert all(secs is not None for _, secs in phases), phases
    _assert_bluefield_like(r.plan, m1, w, dpu_name, t_prov_epoch)
    for role, st, _ in demo.FLOW:
        node = dpu_name if role == "dpu" else host_name
        assert w.reached(node, st.value), f"{node} never went through {st.value}"
    missing = [name for name, _, _ in PHASES if name not in pw.shots]
    assert not missing, f"the machine page never showed {missing}; it showed {pw.seen}"

    # the host's address came from its tenant VRF (relayed with VSS), not from Zone 0 ...
    with sessions() as s:
        leases = s.scalars(select(Lease).where(Lease.node_id == host_id)).all()
        assert leases and all(le.vrf == "red" for le in leases), [(le.vrf, le.address) for le in leases]
        bound = [le.address for le in leases if le.state == "bound"]
    assert bound, [(le.address, le.state) for le in leases]
    # ... and the machine page says so, next to deployed / policy applied, without having reloaded
    expect(host_card).to_have_attribute("data-state", State.DEPLOYED.value)
    expect(dpu_card).to_have_attribute("data-state", State.POLICY_APPLIED.value)
    expect(host_card.locator(".leases")).to_contain_text(bound[0])
    expect(host_card.locator(".leases")).to_contain_text("VRF red")
    expect(host_card.locator(".badge")).to_contain_text("DEPLOYED")
    expect(dpu_card.locator(".badge")).to_contain_text("POLICY APPLIED")
    expect(page.locator("#machine-health")).to_contain_text("OK")
    expect(page.locator("#events")).to_contain_text(host_name)
    # the install's progress is in the machine page's timeline: started (bootsvc served bf.cfg; the
    # "started" of bfb_pre_install repeats it), progress from bfb_modify_os, done from bfb_post_install
    # (the installer itself reports nothing), then the agent's first check-in
    for text in ("install started", "install progress", "phase: bfb_modify_os", "install done",
                 "phase: bfb_post_install", "agent checkin"):
        expect(page.locator("#events")).to_contain_text(text)
    assert page.evaluate("window.__noReload") == 1, "the machine page must follow the flow in place"
    shot(page, "05-deployed")
    page.click("text=Racks")
    expect(page.locator(".slot", has=page.locator(f"text={dpu_name}"))).to_have_class("slot h-ok")
    shot(page, "06-rack-view")
    assert not console_errors, console_errors
    ctx.close()
    clock.mark("UI: page shows deployed + policy applied + lease/VRF; screenshots in artifacts/ui/lab")

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


@pytest.mark.timeout(1200)
def test_arm64_dpu_installs_through_its_bmc(lab: tuple[Config, Path, rack.RackPlan]) -> None:
    """The other way a BF3 gets its OS: bootsvc hands the DPU's BMC a one-time URL (Redfish SimpleUpdate),
    the BMC emulator fetches BFB + bf.cfg and pushes it into the RShim boot FIFO, the Arm boots that
    stream's kernel and installer (modelled by a one-time direct boot of what the BMC fetched), the
    installer lays the disk down, and the DPU boots its own disk. This run has bf.cfg's progress callbacks
    off (boot.bfcfg_callbacks: false): like NVIDIA's installer, nothing on the DPU calls bootsvc back, and
    the install must end through the BMC's task and the agent's first check-in alone."""
    cfg, cfg_path, _ = lab
    tree = yaml.safe_load(cfg_path.read_text())
    tree["boot"]["bfcfg_callbacks"] = False
    cfg_path = cfg_path.with_name("lab-e2e-bmc.yaml")
    cfg_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = config_mod.load(cfg_path)
    clock = Clock()
    prep = demo.prepare(cfg, out=lambda s: print(s, flush=True))
    r = rack.up(cfg, arts=prep.arts)
    (m1,) = r.plan.machines
    demo.reset_database(cfg)
    demo.load_inventory(cfg, r.plan, dpu_provision_method="redfish")
    demo.start_service(cfg, str(cfg_path), r.plan)
    clock.mark("artifacts, rack, inventory (DPU provision_method redfish), bootsvc serve")
    t_prov = time.monotonic()
    demo.provision(cfg, [m1.dpu.name], actor="lab-e2e")
    w = demo.watch(cfg, r.plan, lambda w: w.state(m1.dpu.name)[0] == State.POLICY_APPLIED, timeout=900,
                   out=lambda s: print(s, flush=True), t0=t_prov)
    clock.mark("arm64 DPU: BMC push -> RShim boot -> installer -> own disk -> agent -> policy applied")
    ev = [t for t in w.events if t.node == m1.dpu.name]
    triggers = [t.trigger for t in ev]
    assert "bmc_bfb_push" in triggers and "bfb_push_served" in triggers, triggers
    # nobody called back: no installer event at all, and the DPU left dpu_installing on the agent's
    # first check-in (bootsvc/states.py), as it must with NVIDIA's own installer
    assert [t for t in ev if t.actor == "installer"] == [], [t.trigger for t in ev]
    checkin = [t for t in ev if t.trigger == "agent_checkin"]
    assert checkin and checkin[0].from_state in ("dpu_installing", "dpu_rebooting"), [
        (t.trigger, t.from_state, t.to_state) for t in ev]
    bmc_log = (r.plan.workdir / m1.dpu.name / "bmc.log").read_text()
    assert "RShim boot of" in bmc_log, bmc_log[-2000:]
    serial = r.plan.workdir / m1.dpu.name / f"{m1.dpu.name}.serial.log"
    headers = [ln for ln in serial.read_text().splitlines() if ln.startswith("==== ")]
    rshim = [n for n, h in enumerate(headers) if "firmware_boot=False" in h]
    assert rshim and "firmware_boot=True" in headers[-1] and rshim[-1] < len(headers) - 1, headers
    texts = [ln.text for ln in demo.console_lines(serial)]
    # bf.cfg came with the pushed stream: no kickstart fetched; then GRUB from the disk it wrote
    assert any(t.startswith("BF-INSTALL: sourcing /etc/bf.cfg") for t in texts)
    assert not any(t.startswith("BF-INSTALL: bfks fetched") for t in texts)
    assert any("bootsvc-lab: GRUB from disk" in t for t in texts)
    clock.report()


def test_lab_down_leaves_nothing(lab: tuple[Config, Path, rack.RackPlan]) -> None:
    """``lab up`` + a VM powered on through its BMC, then ``lab down``: no namespace, device or process."""
    cfg, _, _ = lab
    t0 = time.monotonic()
    r = rack.up(cfg, machines=1)
    spaces = [f"{PREFIX}-leaf", f"{PREFIX}-m1", f"{PREFIX}-m1t", f"{PREFIX}-prov"]
    assert rack.leftovers(cfg)["namespaces"] == spaces
    assert rack.boot(cfg, r.plan.machines[0].dpu.name) == "on"
    st = rack.status(cfg)
    assert [v["power"] for v in st["vms"]] == ["On", "Off"], st
    assert len(rack.leftovers(cfg)["processes"]) >= 5  # two BMCs, a QEMU, the leaf's zebra and bgpd
    removed = rack.down(cfg)
    assert removed == spaces
    assert rack.leftovers(cfg) == {"namespaces": [], "root_devices": [], "processes": []}
    print(f"lab up + boot + down: {time.monotonic() - t0:.1f} s")


def _assert_bluefield_like(plan: rack.RackPlan, m: rack.MachinePlan, w: demo.Watcher, dpu_name: str,
                           since: float) -> None:
    """The DPU went the way a BF3 with NVIDIA's installer goes: PXE (arch 11) -> GRUB -> the BFB's
    installer (bfnet/bfks, bf.cfg, hooks in order, no callback of its own) -> reboot -> AAVMF boots the
    installed disk (no -kernel) -> the lab DOCA OS -> the agent."""
    serial = plan.workdir / m.dpu.name / f"{m.dpu.name}.serial.log"
    lines = demo.console_lines(serial)
    texts = [ln.text for ln in lines]
    # the installer: network from bfnet, the kickstart from bfks, bf.cfg sourced, the hooks in bfb-build's order
    steps = ["BF-INSTALL: named eth0 oob_net0", "BF-INSTALL: network oob_net0", "BF-INSTALL: bfks fetched",
             "BF-INSTALL: sourcing /etc/bf.cfg", "BF-INSTALL: partitioned", "BF-INSTALL: bfb_pre_install",
             "BF-INSTALL: OS written", "BF-INSTALL: bfb_modify_os", "BF-INSTALL: bfb_post_install",
             "BF-INSTALL: done, rebooting"]
    at = [next((n for n, t in enumerate(texts) if t.startswith(s)), -1) for s in steps]
    assert -1 not in at and at == sorted(at), list(zip(steps, at, strict=True))
    # the reboot: a second QEMU start that boots through the firmware, from the disk's ESP
    headers = [ln for ln in serial.read_text().splitlines() if ln.startswith("==== ")]
    assert len(headers) >= 2 and all("firmware_boot=True" in h for h in headers), headers
    assert "boot=network" in headers[0] and "boot=disk" in headers[-1], headers
    qemu_log = (plan.workdir / m.dpu.name / f"{m.dpu.name}.qemu.log").read_text()
    assert "-kernel" not in qemu_log, "the arm64 DPU must never be direct-kernel-booted"
    after = [ln for ln in lines if ln.boot == len(headers)]
    # AAVMF's first boot option after the reboot is the disk (the removable-media path on its ESP), not PXE
    disk_boot = [ln.text for ln in after if "BdsDxe: starting" in ln.text]
    assert disk_boot and "PXE" not in disk_boot[0] and "MAC(" not in disk_boot[0], disk_boot
    assert demo.first(after, r"bootsvc-lab: GRUB from disk") is not None
    assert demo.first(after, r"BOOTSVC-LAB-OS: starting bootsvc-agent") is not None
    # bootsvc heard from the install only through bf.cfg's hooks (the installer itself calls nothing)
    cb = [t for t in w.events if t.node == dpu_name and t.actor == "installer"]
    assert all(t.detail.get("phase") in HOOK_PHASES for t in cb), [(t.trigger, t.detail) for t in cb]
    assert not any("mode" in t.detail or "arch" in t.detail for t in cb), "the lab initramfs called back"
