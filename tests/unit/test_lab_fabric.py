"""The lab fabric's pure parts: the leaf's FRR config, the rack's uplink wiring, the DPU console protocol."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml

from bootsvc import config as config_mod
from bootsvc.lab import fabric, leaf, rack

ROOT = Path(__file__).resolve().parents[2]


def lab_config(workdir: Path | None = None) -> config_mod.Config:
    """config/lab.yaml; its rack state (workdir) somewhere no running lab writes."""
    tree = yaml.safe_load((ROOT / "config" / "lab.yaml").read_text())
    tree["lab"]["workdir"] = str(workdir or Path("/nonexistent/bootsvc-lab-unit"))
    return config_mod.from_mapping(tree, "<lab.yaml>", env={})


def test_leaf_conf_is_bgp_unnumbered_with_evpn_and_no_vrf() -> None:
    text = leaf.render_conf(["bx1l", "bx2l"])
    lines = [ln.strip() for ln in text.splitlines()]
    assert lines.index("frr defaults datacenter") < lines.index("router bgp 65000")
    assert "neighbor bx1l interface peer-group fabric" in lines
    assert "neighbor bx2l interface peer-group fabric" in lines
    assert "neighbor fabric remote-as external" in lines
    evpn = lines.index("address-family l2vpn evpn")
    assert lines[evpn + 1] == "neighbor fabric activate"
    assert not any(ln.startswith(("vrf ", "vni ")) or "advertise-all-vni" in ln for ln in lines)


def test_lab_site_runs_evpn_with_three_pairs_over_eth2() -> None:
    cfg = lab_config()
    assert cfg.fabric.asn is not None and cfg.fabric.evpn
    assert cfg.fabric.uplinks == (leaf.DPU_UPLINK,)
    assert [m.tenant for m in cfg.lab.machines] == ["red", "red", "blue"]
    assert leaf.LEAF_ASN not in {cfg.fabric.asn + i for i in range(1, 100)}  # eBGP: the leaf's ASN is its own


def test_every_dpu_has_an_uplink_nic_wired_to_the_leaf() -> None:
    cfg = lab_config()
    plan = rack.plan_rack(cfg, machines=3)
    t = rack.topology(plan)
    cmds = [" ".join(c) for c in t.commands()]
    assert "ip netns add bx-leaf" in cmds
    for m in plan.machines:
        i = m.index
        assert len(m.dpu.nics) == 3 and m.dpu.nics[2][0] == f"bx{i}d2"
        assert f"ip -n bx-m{i} link set bx{i}d2 master bx{i}ub" in cmds
        assert f"ip -n bx-m{i} link add bx{i}u type veth peer name bx{i}l netns bx-leaf" in cmds
        assert f"ip -n bx-m{i} link set bx{i}u master bx{i}ub" in cmds
    assert "ip netns exec bx-leaf sysctl -qw net.ipv4.ip_forward=1" in cmds
    assert len({mac for m in plan.machines for _, mac in m.dpu.nics}) == 9
    topo = fabric.topology(cfg)
    assert [p["leaf_dev"] for p in topo["pairs"]] == ["bx1l", "bx2l", "bx3l"]
    assert topo["leaf_netns"] == "bx-leaf"


def test_pairs_limits_the_rack() -> None:
    plan = rack.plan_rack(lab_config(), machines=1)
    assert [m.dpu.name for m in plan.machines] == ["dpu-1"]
    assert "ip netns add bx-leaf" in [" ".join(c) for c in rack.topology(plan).commands()]


def test_dpu_vm_gets_a_console_socket_and_hosts_do_not() -> None:
    cfg = lab_config()
    plan = rack.plan_rack(cfg, machines=1)
    arts = type("A", (), {"kernel": Path("/k"), "initrd": Path("/i")})()
    dpu = rack._vm_spec_json(plan, plan.machines[0].dpu, arts)
    host = rack._vm_spec_json(plan, plan.machines[0].host, arts)  # type: ignore[arg-type]
    assert any(str(rack.console_socket(plan, plan.machines[0].dpu)) in a for a in dpu["extra_args"])
    assert "virtconsole,chardev=con1,bus=vser0.0" in dpu["extra_args"]
    assert host["extra_args"] == []


def run_guest(line: str) -> str:
    """What the DPU's console shell does with the line (dash here as busybox sh there)."""
    return subprocess.run(["sh"], input=line, capture_output=True, text=True, timeout=30, check=True).stdout


def test_console_protocol_round_trip_through_a_real_shell() -> None:
    cmd = "printf 'a\\nb'; echo \"it's\" >&2; printf '\\001\\377'; exit 3"
    line = fabric.guest_script(cmd, "abc123", 10)
    assert "Babc123N" not in line and "Eabc123N" not in line  # the markers come only from printf
    out = run_guest(line)
    res = fabric.parse_answer("stale Bzzz junk\r\n" + out, "abc123")
    assert res is not None and res.rc == 3
    assert res.output.startswith("a\nbit's\n")


def test_console_answer_incomplete_or_garbled() -> None:
    assert fabric.parse_answer("Bn1N\nYQ==\n", "n1") is None  # no end marker yet
    assert fabric.parse_answer("", "n1") is None
    ok = fabric.parse_answer("Bn1N\r\n" + base64.b64encode(b"{}").decode() + "\r\nEn1N 0\r\n", "n1")
    assert ok == fabric.ExecResult(0, "{}")
    with pytest.raises(fabric.FabricError, match="garbled"):
        fabric.parse_answer("Bn1N\n@@@\nEn1N 0\n", "n1")


def test_guest_command_timeout_is_enforced() -> None:
    out = run_guest(fabric.guest_script("sleep 30", "t1", 1))
    res = fabric.parse_answer(out, "t1")
    assert res is not None and res.rc == 137  # killed by timeout -s KILL
