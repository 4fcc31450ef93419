"""The lab rack plan, topology and agent wheel (pure parts of bootsvc.lab.rack / bootsvc.lab.demo)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from bootsvc import config as config_mod
from bootsvc.lab import demo, rack, rackprocs

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**lab: object) -> config_mod.Config:
    tree = config_mod.load(ROOT / "config" / "lab.yaml").model_dump(mode="json", exclude={"source"})
    tree["lab"] = {**tree["lab"], **lab}
    prefix = tree["lab"]["prefix"]
    tree["listeners"]["dhcp"] = [{**tree["listeners"]["dhcp"][0], "interface": f"{prefix}br0",
                                  "netns": f"{prefix}-prov"}]
    return config_mod.from_mapping(tree, env={})


def test_lab_yaml_plan_matches_its_listeners() -> None:
    plan = rack.plan_rack(config_mod.load(ROOT / "config" / "lab.yaml", env={}))
    assert plan.prov_netns == "bx-prov" and plan.zone0_bridge == "bxbr0" and plan.server == "10.77.0.1"
    m1 = plan.machines[0]
    # pairs: two red, one blue; each lab BlueField is arm64 (AAVMF), the host behind it an x86 BIOS VM
    assert (m1.dpu.kind, m1.host and m1.host.kind) == ("arm64", "bios")
    assert m1.dpu.arch == "aarch64" and m1.host is not None and m1.host.arch == "x86_64"
    # the host's only NIC and the DPU's host port share the machine's namespace (one L2 segment)
    assert m1.host.netns == m1.dpu.netns == "bx-m1"
    assert [m.tenant for m in plan.machines] == ["red", "red", "blue"]
    assert [v.bmc_port for v in plan.vms()] == list(range(18400, 18406))


def test_arm64_dpu_boots_its_disk_through_the_firmware(tmp_path: Path) -> None:
    """The rack gives the arm64 DPU no direct-boot kernel: AAVMF boots the installed disk (its ESP)."""
    plan = rack.plan_rack(config_mod.load(ROOT / "config" / "lab.yaml", env={}))
    arts = type("Arts", (), {"kernel": Path("/k"), "initrd": Path("/i"), "kernel_arm64": Path("/ka"),
                             "initrd_arm64": Path("/ia")})()
    dpu, host = plan.machines[0].dpu, plan.machines[0].host
    assert host is not None
    d, h = rack._vm_spec_json(plan, dpu, arts), rack._vm_spec_json(plan, host, arts)
    assert d["disk_kernel"] is None and d["disk_initrd"] is None
    assert h["disk_kernel"] == "/k" and "root=/dev/vda" in h["disk_append"]


def test_names_fit_and_macs_are_unique_across_racks() -> None:
    a = rack.plan_rack(_cfg(machines=[{"dpu": "uefi-native", "host": "bios"}] * 9))
    b = rack.plan_rack(_cfg(prefix="by", machines=[{"dpu": "uefi-native", "host": "bios"}] * 9))
    macs = [m for p in (a, b) for v in p.vms() for _, m in v.nics]
    assert len(macs) == len(set(macs)) == 9 * 4 * 2  # DPU: OOB, host port, uplink; host: one NIC
    for p in (a, b):
        topo = rack.topology(p)
        devs = [d for cmd in topo.commands() for d in cmd if d.startswith(p.prefix) and "-" not in d]
        assert devs and all(len(d) <= 15 for d in devs)
        # nothing in a rack topology routes out: no default route anywhere
        assert not [c for c in topo.commands() if c[3:5] == ["route", "add"] and c[5] == "default"]
    assert {v.name for v in a.vms()} == {v.name for v in b.vms()}  # same inventory names, separate racks


def test_plan_rejects_a_dhcp_listener_outside_the_lab_namespace() -> None:
    tree = config_mod.load(ROOT / "config" / "lab.yaml").model_dump(mode="json", exclude={"source"})
    tree["lab"]["prefix"] = "bz"  # listeners still say bx-prov/bxbr0
    with pytest.raises(rack.RackError, match="bzbr0 in netns bz-prov"):
        rack.plan_rack(config_mod.from_mapping(tree, env={}))


def test_reserved_oob_addresses_skip_the_server() -> None:
    plan = rack.plan_rack(_cfg(machines=[{"dpu": "uefi-native", "host": None}] * 3))
    ips = [m.dpu_oob_ip for m in plan.machines]
    assert plan.server not in ips and len(set(ips)) == 3


def test_agent_wheel_is_deterministic_and_complete(tmp_path: Path) -> None:
    w1 = demo.build_agent_wheel(tmp_path / "a")
    w2 = demo.build_agent_wheel(tmp_path / "b")
    assert hashlib.sha256(w1.read_bytes()).digest() == hashlib.sha256(w2.read_bytes()).digest()
    with zipfile.ZipFile(w1) as z:
        names = set(z.namelist())
        record = z.read(next(n for n in names if n.endswith("/RECORD"))).decode()
    assert {"bootsvc/__init__.py", "bootsvc/agent/main.py", "bootsvc/dhcp/packet.py"} <= names
    assert not any(n.startswith(("bootsvc/web/", "bootsvc/db")) for n in names)  # stdlib-only agent
    assert all(n in record for n in names)


def test_demo_says_what_a_stalled_host_waits_for(tmp_path: Path) -> None:
    from bootsvc import db, inventory, lifecycle
    from bootsvc.models import Base
    from bootsvc.states import Trigger

    cfg = config_mod.from_mapping({"database": {"url": f"sqlite:///{tmp_path / 'x.db'}"}}, env={})
    Base.metadata.create_all(db.make_engine(cfg.database.url))
    with db.session_factory(db.make_engine(cfg.database.url))() as s:
        (h,) = inventory.enroll(s, [inventory.NodeSpec(name="host-1", kind="host", serial="H1")], actor="t")
        inventory.enroll(s, [inventory.NodeSpec(name="host-2", kind="host", serial="H2")], actor="t")
        lifecycle.apply(s, h, Trigger.PROVISION, actor="t")
        lifecycle.apply(s, h, Trigger.DPU_READY, actor="t")
    text = demo.Watcher(cfg).describe_active()
    assert text.startswith("host-1 in host_booting for ") and "deadline in" in text
    assert "no lease yet" in text and "host-2" not in text  # resting nodes are not "waiting"


def test_console_lines_and_dpu_phase_marks(tmp_path: Path) -> None:
    log = tmp_path / "dpu-1.serial.log"
    log.write_text(
        "==== 05:00:00 start dpu-1 kind=arm64 boot=network accel=tcg firmware_boot=True epoch=1000.000\n"
        "[   10.00] Station IP address is 10.77.0.2\n[   11.00] bootsvc: dpu-1 dpu-install lab-bf3:1\n"
        "[   50.00] BF-INSTALL: start uptime=2.0 arch=aarch64\n[   80.00] BF-INSTALL: done, rebooting\n"
        "==== 05:01:21 start dpu-1 kind=arm64 boot=disk accel=tcg firmware_boot=True epoch=1081.000\n"
        "[    6.00] bootsvc-lab: GRUB from disk, booting the lab DOCA OS\n"
        "[   15.00] BOOTSVC-LAB-OS: up nic=eth0 ip=\n[   15.50] BOOTSVC-LAB-OS: starting bootsvc-agent\n")
    lines = demo.console_lines(log)
    assert [ln.boot for ln in lines] == [1, 1, 1, 1, 2, 2, 2] and lines[-1].at == pytest.approx(1096.5)
    marks = demo.dpu_marks(log, 999.0)
    assert list(marks) == ["pxe", "nbp", "installer", "installed", "disk-grub", "os-up", "agent"]
    phases = dict(demo.arm64_phase_times(log, 1000.0, 1120.0, 1200.0))
    assert list(phases.values()) == [pytest.approx(50.0), pytest.approx(30.0), pytest.approx(16.0),
                                     pytest.approx(24.0), pytest.approx(80.0)]
    # a flow that stopped in the installer has no later phases (not a wrong number)
    assert [v for _, v in demo.arm64_phase_times(log, 1070.0, None, None)][:3] == [None, None, None]


def test_rshim_boot_of_a_pushed_bfb_with_bfcfg(tmp_path: Path) -> None:
    """BFB + appended bf.cfg (what a DPU BMC pushes): the Arm boots the stream's kernel with its boot-args,
    and an initrd that is the stream's initramfs followed by a cpio holding /etc/bf.cfg."""
    import subprocess

    from bootsvc import bfb
    from bootsvc.lab import bf3

    kernel, initramfs, cfg = b"K" * 1001, b"I" * 2003, b"ubuntu_PASSWORD='!'\nbfb_pre_install() { :; }\n"
    pushed = tmp_path / "push.bfb"
    with pushed.open("wb") as f:
        bfb.write_bfb(f, [bfb.Part("boot-args", b"console=ttyAMA0 bfnet=oob_net0:dhcp"), bfb.Part("image", kernel),
                          bfb.Part("initramfs", initramfs)])
        f.write(cfg)
    boot = bf3.rshim_boot_files(pushed, tmp_path / "rshim")
    assert boot.kernel.read_bytes() == kernel and boot.args == "console=ttyAMA0 bfnet=oob_net0:dhcp"
    data = boot.initrd.read_bytes()
    assert data.startswith(initramfs) and boot.bfcfg_bytes == len(cfg)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data[len(initramfs):], capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["etc", "etc/bf.cfg"] and cfg in data
    # a stream without an initramfs, or a file that is no BFB at all, is refused (nothing boots)
    bad = tmp_path / "bad.bfb"
    with bad.open("wb") as f:
        bfb.write_bfb(f, [bfb.Part("image", kernel)])
    with pytest.raises(bfb.BfbError, match="no kernel"):
        bf3.rshim_boot_files(bad, tmp_path / "r2")
    (tmp_path / "junk").write_bytes(b"not a bfb at all" * 10)
    with pytest.raises(bfb.BfbError):
        bf3.rshim_boot_files(tmp_path / "junk", tmp_path / "r3")


def test_lab_bmc_reaches_the_boot_plane_through_loopback() -> None:
    """The lab's DPU BMC (root namespace) gets the one-time BFB URL on bootsvc's Zone 0 address and
    fetches it from bootsvc's loopback listener; any other URI goes to the emulator untouched."""
    import io
    import json as _json

    cfg = config_mod.load(ROOT / "config" / "lab.yaml", env={})
    route = rack.boot_route(cfg, rack.plan_rack(cfg))
    assert route == {"10.77.0.1:8080": "127.0.0.1:8080"}
    seen: list[bytes] = []

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        body = environ["wsgi.input"].read()  # type: ignore[attr-defined]
        assert int(str(environ["CONTENT_LENGTH"])) == len(body)
        seen.append(body)
        return []

    mw = rackprocs._route_simple_update(app, route)
    path = "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate"
    for uri in ("http://10.77.0.1:8080/bfb-push/T/lab.bfb", "10.77.0.1:8080/bfb-push/T/lab.bfb",
                "http://203.0.113.9/x.bfb"):
        b = _json.dumps({"ImageURI": uri, "Targets": ["redfish/v1/UpdateService/FirmwareInventory/DPU_OS"]}).encode()
        mw({"REQUEST_METHOD": "POST", "PATH_INFO": path, "CONTENT_LENGTH": str(len(b)), "wsgi.input": io.BytesIO(b)},
           None)
    got = [_json.loads(x)["ImageURI"] for x in seen]
    assert got == ["http://127.0.0.1:8080/bfb-push/T/lab.bfb", "http://127.0.0.1:8080/bfb-push/T/lab.bfb",
                   "http://203.0.113.9/x.bfb"]
