"""Policy document validation and FRR rendering."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import FakeKernel, doc

from bootsvc.agent.frr import render
from bootsvc.agent.policy import PolicyError, isolated, parse, rmac


def test_full_policy_parses() -> None:
    p = parse(doc())
    t = p.tenant
    assert t is not None and p.version == "1" and t.vrf_table == 1001 and t.bridge == "babr5001"
    assert t.relay is not None and t.relay.giaddr is None and t.relay.vss_vrf == "vrf-a"
    assert [f.zone for f in t.flows] == [0, 0, 2] and t.flows[2].dport is None
    assert t.peers[0].vtep == IPv4Address("10.255.0.13")


def test_removal_policy() -> None:
    p = parse({"schema": 1, "version": 5, "node": "dpu1", "tenant": None})
    assert p.tenant is None and p.version == "5"
    assert isolated("dpu1").tenant is None


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"schema": 2}, "schema"),
        ({"vrf_name": "vrf a; rm"}, "vrf_name"),
        ({"vrf_name": "x" * 16}, "vrf_name"),
        ({"vrf_table": 254}, "vrf_table"),
        ({"l3vni": 2**24}, "l3vni"),
        ({"host_gateway": "10.0.0.0/24"}, "host_gateway"),
        ({"flows": [{"zone": 1, "proto": "tcp", "dst": "10.1.0.0/16", "dport": 1}]}, "zone"),
        ({"flows": [{"zone": 0, "proto": "tcp", "dst": "0.0.0.0/0", "dport": 1}]}, "dst"),
        ({"flows": [{"zone": 0, "proto": "icmp", "dst": "10.1.0.0/16", "dport": 1}]}, "dport"),
        ({"flows": [{"zone": 0, "proto": "sctp", "dst": "10.1.0.0/16", "dport": 1}]}, "proto"),
        ({"peers": [{"vtep": "10.255.0.11", "prefixes": []}]}, "own VTEP"),
        ({"relay": {"server": "nope"}}, "relay.server"),
        ({"ra": "yes"}, "ra"),
        ({"host_port": "a/b"}, "host_port"),
    ],
)
def test_invalid_policies_are_refused(over: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError, match=field):
        parse(doc(**over))


def test_rmac_is_local_and_per_vtep() -> None:
    assert rmac(IPv4Address("10.255.0.11")) == "02:00:0a:ff:00:0b"
    assert int(rmac(IPv4Address("1.2.3.4"))[:2], 16) & 0x02  # locally administered


def test_frr_render_evpn_type5() -> None:
    assert render(parse(doc())) is None  # no evpn block: static peers only
    text = render(parse(doc(evpn={"asn": 65011, "uplinks": ["p0", "p1"]})))
    assert text is not None
    lines = text.splitlines()
    i = lines.index("vrf vrf-a")
    assert lines[i + 1] == " vni 5001"  # makes it an L3VNI
    assert " neighbor p0 interface peer-group fabric" in lines
    assert " neighbor p1 interface peer-group fabric" in lines
    assert "  network 10.255.0.11/32" in lines and "  advertise-all-vni" in lines
    j = lines.index("router bgp 65011 vrf vrf-a")
    tail = lines[j:]
    assert "  advertise ipv4 unicast" in tail  # RFC 9136 Type-5 export of the VRF's routes
    assert "  redistribute connected" not in tail  # the anycast subnet is on every DPU: only host /32s
    assert render(parse({"schema": 1, "version": "1", "node": "d", "tenant": None})) is None


def _site(tmp: Path, **orch: Any) -> Any:
    from bootsvc import config as config_mod

    return config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp}/db.sqlite"},
        "state_dir": str(tmp),
        "networks": [
            {"name": "mgmt", "zone": 0, "cidr": "10.98.0.0/24", "gateway": "10.98.0.1", "boot_server": "10.98.0.1"},
            {"name": "acme-hosts", "zone": 1, "vrf": "vrf-acme", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
        ],
        "tenants": [{"name": "acme", "vrf": "vrf-acme", "l3vni": 5001}],
        "orchestration": {"vtep_network": "10.255.0.0/16", "egress": ["tcp:0.0.0.0/1:443", "icmp:192.0.2.0/24"],
                          **orch},
    }, "<agent-contract-test>", env={})


@pytest.mark.parametrize("evpn", [None, 65011])
def test_contract_server_built_policies_parse_and_plan(tmp_path: Path, evpn: int | None) -> None:
    """What bootsvc's own builder (bootsvc/policy.py) sends is accepted and planned by the agent."""
    from bootsvc.agent.plan import Env, plan
    from bootsvc.policy import Peer, TenantInfo, build

    cfg = _site(tmp_path, **({"evpn_asn": evpn} if evpn else {}))
    tenant = TenantInfo("acme", "vrf-acme", 5001, None)
    d = build(cfg, node_id=7, node_name="dpu7", serial="", tenant=tenant,
              peers=[Peer("10.255.0.9", ("10.0.0.101/32",))])
    p = parse(d)
    t = p.tenant
    assert t is not None and t.vtep == IPv4Address("10.255.0.7") and t.relay is not None
    assert t.relay.remote_id is None  # empty serial: the agent falls back to its configured serial
    assert (render(p) is not None) == bool(evpn)
    k_obs = FakeKernel().observe()
    for mode in ("table", "vrf"):
        assert plan(p, Env("pf0hpf", "p0", mode), k_obs)
    iso = parse(build(cfg, node_id=7, node_name="dpu7", serial="MT1", tenant=None))
    assert iso.tenant is None and iso.host_port == "pf0hpf"
