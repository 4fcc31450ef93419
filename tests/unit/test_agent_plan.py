"""Planner tests without root: a small kernel model executes the planned commands, so idempotence and
convergence from partial/drifted state are checked on what the commands *do*, not on their text."""

from __future__ import annotations

import copy
from dataclasses import replace
from ipaddress import IPv4Network
from typing import Any

import pytest
from helpers.agent import FakeKernel, doc
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsvc.agent.plan import (
    NFT_TABLE,
    OWNER_ALIAS,
    Addr,
    Cmd,
    Env,
    Fdb,
    Link,
    Neigh,
    PlanError,
    Route,
    Rule,
    desired,
    plan,
    render_nft,
)
from bootsvc.agent.policy import Policy, isolated, parse

ENV_T = Env("pf0hpf", "p0", "table")
ENV_V = Env("pf0hpf", "p0", "vrf")


POL_A = parse(doc())
POL_B = parse(doc(version="2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002,
                  host_gateway="10.0.0.1/24", peers=[]))
POL_A2 = parse(doc(version="3", host_gateway="10.0.2.1/24",
                   peers=[{"vtep": "10.255.0.13", "prefixes": ["10.0.1.0/24"]},
                          {"vtep": "10.255.0.12", "prefixes": ["10.0.0.0/24"]}]))
ISO = isolated("dpu1")


def converge(k: FakeKernel, p: Policy, env: Env = ENV_T) -> list[Cmd]:
    cmds = plan(p, env, k.observe())
    k.run(cmds)
    return cmds


@pytest.mark.parametrize("env", [ENV_T, ENV_V])
@pytest.mark.parametrize("pol", [POL_A, POL_B, ISO])
def test_apply_then_replan_is_empty(env: Env, pol: Policy) -> None:
    k = FakeKernel()
    assert converge(k, pol, env)
    assert plan(pol, env, k.observe()) == []


@pytest.mark.parametrize("env", [ENV_T, ENV_V])
def test_transitions_converge_and_leave_no_trace(env: Env) -> None:
    k = FakeKernel()
    for pol in (POL_A, POL_B, POL_A2, ISO, POL_A, ISO):
        converge(k, pol, env)
        assert plan(pol, env, k.observe()) == [], pol.version
    # isolated: nothing of ours is left except the firewall table and ip_forward
    assert not [li for li in k.links.values() if li.alias == OWNER_ALIAS]
    assert not k.rules and not k.routes and not k.neighs and not k.fdbs and not k.addrs
    assert k.links["pf0hpf"].master is None
    assert k.sysctls["net/ipv4/conf/pf0hpf/proxy_arp"] == "0"
    assert k.links["eth9"] == Link("eth9", "dummy", up=True)  # foreign device untouched


def test_table_mode_state() -> None:
    k = FakeKernel()
    converge(k, POL_A)
    assert Addr("pf0hpf", "10.0.0.1/24", noprefixroute=True) in k.addrs  # main table stays tenant-free
    assert Addr("lo", "10.255.0.11/32") in k.addrs
    assert Route("1001", "default", "unreachable", metric="4278198272") in k.routes
    assert Route("1001", "10.0.0.0/24", dev="pf0hpf", src="10.0.0.1") in k.routes
    assert Route("1001", "10.0.1.0/24", dev="babr5001", via="10.255.0.13", onlink=True) in k.routes
    assert Neigh("babr5001", "10.255.0.13", "02:00:0a:ff:00:0d") in k.neighs
    assert Fdb("bavx5001", "02:00:0a:ff:00:0d", "10.255.0.13") in k.fdbs
    assert k.links["babr5001"].mac == "02:00:0a:ff:00:0b"
    assert k.links["bavx5001"].master == "babr5001"
    assert k.links["bavx5001"].vxlan_learning is False
    assert Rule(920, "main", iif="pf0hpf", dst="10.98.0.1/32") in k.rules
    assert Rule(920, "main", iif="pf0hpf", dst="192.0.2.0/24") in k.rules
    assert Rule(900, "1001", fwmark=1001) in k.rules
    assert not [r for r in k.rules if r.pref == 910]  # no flow overlaps the tenant's prefixes
    assert Rule(960, "1001", iif="pf0hpf") in k.rules and Rule(960, "1001", oif="babr5001") in k.rules
    assert k.sysctls["net/ipv4/ip_forward"] == "1"
    assert k.sysctls["net/ipv4/conf/pf0hpf/proxy_arp"] == "1"  # anycast gateway + /32 peers
    assert k.sysctls["net/ipv4/neigh/pf0hpf/proxy_delay"] == "0"
    assert "vrf-a" not in k.links


def test_vrf_mode_state() -> None:
    k = FakeKernel()
    converge(k, POL_A, ENV_V)
    assert k.links["vrf-a"].kind == "vrf" and k.links["vrf-a"].vrf_table == 1001
    assert k.links["pf0hpf"].master == "vrf-a" and k.links["babr5001"].master == "vrf-a"
    assert Addr("pf0hpf", "10.0.0.1/24") in k.addrs
    assert not [r for r in k.rules if r.pref == 960]  # the l3mdev rule does that job
    assert Rule(920, "main", iif="vrf-a", dst="10.98.0.1/32") in k.rules
    assert Rule(920, "main", iif="pf0hpf", dst="10.98.0.1/32") in k.rules
    broad = parse(doc(version="8", flows=[{"zone": 2, "proto": "tcp", "dst": "0.0.0.0/1", "dport": 443}]))
    converge(k, broad, ENV_V)
    # the broad egress flow covers the tenant's own prefixes: those keep going to the tenant table
    assert {(r.iif, r.dst) for r in k.rules if r.pref == 910} == {
        (dev, p) for dev in ("vrf-a", "pf0hpf") for p in ("10.0.0.0/24", "10.0.1.0/24")}
    assert all(r.table == "1001" for r in k.rules if r.pref == 910)
    # connected route is the kernel's job in a VRF
    assert not [r for r in k.routes if r.dev == "pf0hpf"]


def test_vrf_table_change_recreates_and_reenslaves() -> None:
    k = FakeKernel()
    converge(k, POL_A, ENV_V)
    moved = parse(doc(version="9", vrf_table=1005))
    cmds = converge(k, moved, ENV_V)
    assert ("ip", "link", "del", "vrf-a") in [c.argv for c in cmds]
    assert k.links["vrf-a"].vrf_table == 1005 and k.links["pf0hpf"].master == "vrf-a"
    assert plan(moved, ENV_V, k.observe()) == []


def test_order_nft_last_and_deletes_before_adds() -> None:
    k = FakeKernel()
    converge(k, POL_A)
    cmds = plan(POL_B, ENV_T, k.observe())
    argvs = [c.argv for c in cmds]
    assert argvs[-1] == ("nft", "-f", "-")
    first_add = next(i for i, a in enumerate(argvs) if a[:3] == ("ip", "rule", "add"))
    assert all(i < first_add for i, a in enumerate(argvs) if a[:3] == ("ip", "rule", "del"))
    # the old host address goes before the new one is added
    dels = [i for i, a in enumerate(argvs) if a[:3] == ("ip", "addr", "del")]
    adds = [i for i, a in enumerate(argvs) if a[:3] == ("ip", "addr", "add")]
    assert not adds or max(dels, default=-1) < min(adds)


def test_same_ruleset_not_reloaded_but_tampering_is() -> None:
    k = FakeKernel()
    converge(k, POL_A)
    assert plan(POL_A, ENV_T, replace(k.observe(), nft_rules=k.nft_rules - 1))[-1].argv[0] == "nft"
    assert plan(POL_A, ENV_T, replace(k.observe(), nft_tag=None))[-1].argv[0] == "nft"


def test_missing_host_port_is_an_error() -> None:
    with pytest.raises(PlanError):
        plan(POL_A, Env("nope0", "p0", "table"), FakeKernel().observe())


def test_nft_ruleset_zones() -> None:
    text, n = render_nft(POL_A, ENV_T)
    assert text.startswith(f"table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")  # atomic replace
    # relay: matched on every tenant port, since in VRF mode the input hook sees the VRF device as iif
    assert 'iifname { "pf0hpf", "babr5001" } udp dport 67 accept' in text
    assert 'udp dport 69 ct helper set "tftp69"' in text
    assert "ip daddr 10.98.0.1/32 tcp dport 8080 ct mark set 1001 accept" in text
    assert "ip daddr 192.0.2.0/24 meta l4proto icmp ct mark set 1001 accept" in text
    assert 'oifname { "pf0hpf", "babr5001" } accept' in text  # zone 1 inside the tenant
    assert 'ct mark 1001 oifname != { "pf0hpf", "babr5001" } masquerade' in text
    assert text.count("counter drop") == 3
    assert n == sum(1 for ln in text.splitlines() if ln.startswith("\t\t") and not ln.strip().startswith("type "))
    iso, _ = render_nft(ISO, ENV_T)
    assert "accept\n" not in iso.replace("ct state established,related accept\n", "").replace(
        "policy accept;", "")  # isolated: no tenant allowances at all
    assert "udp dport 67" not in iso and "masquerade" not in iso


def test_desired_hash_changes_with_ruleset() -> None:
    assert desired(POL_A, ENV_T).nft_tag != desired(POL_A2, ENV_T).nft_tag
    assert desired(POL_A, ENV_T).nft_tag == desired(parse(doc(version="77")), ENV_T).nft_tag


@settings(max_examples=60, deadline=None)
@given(
    start=st.sampled_from([POL_A, POL_B, POL_A2, ISO]),
    target=st.sampled_from([POL_A, POL_B, POL_A2, ISO]),
    env=st.sampled_from([ENV_T, ENV_V]),
    cut=st.integers(min_value=0, max_value=60),
    drift=st.lists(st.integers(min_value=0, max_value=60), max_size=6),
)
def test_converges_from_any_partial_or_drifted_state(start: Policy, target: Policy, env: Env, cut: int,
                                                     drift: list[int]) -> None:
    k = FakeKernel()
    converge(k, start, env)
    # an interrupted apply (crash mid-way): only a prefix of the plan ran
    k.run(plan(target, env, k.observe())[:cut])
    # drift: someone removed some of our objects by hand
    objs: list[tuple[str, Any]] = [("rule", r) for r in sorted(k.rules, key=repr)]
    objs += [("route", r) for r in sorted(k.routes, key=repr)]
    objs += [("addr", a) for a in sorted(k.addrs, key=repr)]
    objs += [("link", n) for n in sorted(k.links) if k.links[n].alias == OWNER_ALIAS]
    for i in drift:
        if not objs:
            break
        kind, o = objs[i % len(objs)]
        if kind == "rule":
            k.rules.discard(o)
        elif kind == "route":
            k.routes.discard(o)
        elif kind == "addr":
            k.addrs.discard(o)
        elif o in k.links:
            k._link(["del", o])
    snapshot = copy.deepcopy(k.links["eth9"])
    converge(k, target, env)
    assert plan(target, env, k.observe()) == []
    assert k.links["eth9"] == snapshot


def test_peers_routes_use_router_mac_of_remote_vtep() -> None:
    d = desired(POL_A2, ENV_T)
    assert Neigh("babr5001", "10.255.0.12", "02:00:0a:ff:00:0c") in d.neighs
    assert {r.dst for r in d.routes if r.via} == {"10.0.1.0/24", "10.0.0.0/24"}
    assert all(IPv4Network(r.dst) for r in d.routes if r.dst != "default")


def test_every_boot_server_of_the_policy_gets_its_flows_and_leak_rules() -> None:
    """Several bootsvc instances: the policy lists each one's TFTP and HTTP endpoints (bootsvc.policy);
    a host may boot from any of them (the one whose DHCP answered), so each is opened, and only those."""
    servers = ["10.98.0.1", "10.98.0.2", "10.98.0.3"]
    flows = [{"zone": 0, "proto": p, "dst": f"{s}/32", "dport": port}
             for s in servers for p, port in (("udp", 69), ("tcp", 8080))]
    pol = parse(doc(flows=flows, relay={"server": servers[0], "servers": servers, "vss_vrf": "vrf-a"}))
    for env in (ENV_T, ENV_V):
        text, _ = render_nft(pol, env)
        for s in servers:
            assert f"ip daddr {s}/32 udp dport 69 ct mark set 1001 accept" in text
            assert f"ip daddr {s}/32 tcp dport 8080 ct mark set 1001 accept" in text
        assert "10.98.0.4" not in text
        k = FakeKernel()
        converge(k, pol, env)
        leaked = {r.dst for r in k.rules if r.pref == 920}
        assert leaked == {f"{s}/32" for s in servers}
        assert plan(pol, env, k.observe()) == []
