"""Planner tests without root: a small kernel model executes the planned commands, so idempotence and
convergence from partial/drifted state are checked on what the commands *do*, not on their text."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from ipaddress import IPv4Network
from typing import Any

import pytest
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
    Observed,
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


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema": 1, "version": "1", "node": "dpu1", "tenant": "a", "vrf_name": "vrf-a",
        "vrf_table": 1001, "l3vni": 5001, "vtep": "10.255.0.11", "vxlan_port": 4789,
        "host_gateway": "10.0.0.1/24",
        "flows": [{"zone": 0, "proto": "udp", "dst": "10.98.0.1/32", "dport": 69},
                  {"zone": 0, "proto": "tcp", "dst": "10.98.0.1/32", "dport": 8080},
                  {"zone": 2, "proto": "icmp", "dst": "192.0.2.0/24", "dport": None}],
        "relay": {"server": "10.98.0.1", "vss_vrf": "vrf-a"}, "ra": True,
        "peers": [{"vtep": "10.255.0.13", "prefixes": ["10.0.1.0/24"]}],
    }
    d.update(over)
    return d


POL_A = parse(doc())
POL_B = parse(doc(version="2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002,
                  host_gateway="10.0.0.1/24", peers=[]))
POL_A2 = parse(doc(version="3", host_gateway="10.0.2.1/24",
                   peers=[{"vtep": "10.255.0.13", "prefixes": ["10.0.1.0/24"]},
                          {"vtep": "10.255.0.12", "prefixes": ["10.0.0.0/24"]}]))
ISO = isolated("dpu1")


class FakeKernel:
    """Executes the planner's argv lists against an in-memory model of the objects it manages."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {
            "lo": Link("lo", None, up=True), "pf0hpf": Link("pf0hpf", "veth", up=False, mac="aa:bb:cc:00:00:01"),
            "p0": Link("p0", "veth", up=True), "eth9": Link("eth9", "dummy", up=True),
        }
        self.addrs: set[Addr] = set()
        self.rules: set[Rule] = set()
        self.routes: set[Route] = set()
        self.neighs: set[Neigh] = set()
        self.fdbs: set[Fdb] = set()
        self.sysctls = {"net/ipv4/ip_forward": "0", "net/ipv4/conf/pf0hpf/proxy_arp": "0",
                        "net/ipv4/neigh/pf0hpf/proxy_delay": "80"}
        self.nft_tag: str | None = None
        self.nft_rules = -1
        self.ran: list[Cmd] = []

    def observe(self) -> Observed:
        return Observed(dict(self.links), tuple(self.addrs), tuple(self.rules), tuple(self.routes),
                        tuple(self.neighs), tuple(self.fdbs), dict(self.sysctls), self.nft_tag, self.nft_rules)

    def run(self, cmds: list[Cmd]) -> None:
        for c in cmds:
            self.ran.append(c)
            self._one(list(c.argv), c.stdin)

    @staticmethod
    def _kv(a: list[str], key: str) -> str | None:
        return a[a.index(key) + 1] if key in a else None

    def _rule(self, a: list[str]) -> Rule:
        mark = self._kv(a, "fwmark")
        sup = self._kv(a, "suppress_prefixlength")
        return Rule(int(a[a.index("pref") + 1]), a[a.index("lookup") + 1], iif=self._kv(a, "iif"),
                    oif=self._kv(a, "oif"), dst=self._kv(a, "to"), fwmark=None if mark is None else int(mark),
                    src=self._kv(a, "from"), suppress=None if sup is None else int(sup))

    def _route(self, a: list[str]) -> Route:
        typ = "unreachable" if a[0] == "unreachable" else "unicast"
        dst = a[1] if typ != "unicast" else a[0]
        return Route(self._kv(a, "table") or "main", dst, typ, dev=self._kv(a, "dev"), via=self._kv(a, "via"),
                     src=self._kv(a, "src"), onlink="onlink" in a, metric=self._kv(a, "metric"))

    def _one(self, a: list[str], stdin: str | None) -> None:
        if a[0] == "sysctl":
            k, _, v = a[-1].partition("=")
            self.sysctls[k] = v
        elif a[0] == "nft":
            assert stdin is not None and a == ["nft", "-f", "-"]
            m = re.search(r'comment "bootsvc-agent sha256:([0-9a-f]+)"', stdin)
            assert m
            self.nft_tag = m.group(1)
            self.nft_rules = sum(1 for ln in stdin.splitlines()
                                 if ln.startswith("\t\t") and not ln.strip().startswith("type "))
        elif a[:2] == ["ip", "link"]:
            self._link(a[2:])
        elif a[:2] == ["ip", "addr"]:
            cidr, dev = a[3], a[5]
            if a[2] == "add":
                new = Addr(dev, cidr, "noprefixroute" in a)
                assert not any(x.dev == dev and x.cidr == cidr for x in self.addrs), f"exists: {a}"
                self.addrs.add(new)
            else:
                self.addrs = {x for x in self.addrs if not (x.dev == dev and x.cidr == cidr)}
        elif a[:2] == ["ip", "route"]:
            r = self._route(a[3:])
            assert r.dev is None or r.dev in self.links, f"no device for {a}"
            if a[2] == "replace":
                self.routes = {x for x in self.routes if (x.table, x.dst, x.type) != (r.table, r.dst, r.type)}
                self.routes.add(r)
            else:
                assert r in self.routes, f"deleting missing route {a}"
                self.routes.discard(r)
        elif a[:2] == ["ip", "rule"]:
            ru = self._rule(a[3:])
            if a[2] == "add":
                self.rules.add(ru)
            else:
                assert ru in self.rules, f"deleting missing rule {a}"
                self.rules.discard(ru)
        elif a[:2] == ["ip", "neigh"]:
            ndev = self._kv(a, "dev")
            assert ndev is not None and ndev in self.links
            dev = ndev
            if a[2] == "replace":
                self.neighs = {n for n in self.neighs if (n.dev, n.dst) != (dev, a[3])}
                self.neighs.add(Neigh(dev, a[3], a[5]))
            else:
                self.neighs = {n for n in self.neighs if (n.dev, n.dst) != (dev, a[3])}
        elif a[:2] == ["bridge", "fdb"]:
            fdev, dst = self._kv(a, "dev"), self._kv(a, "dst")
            assert fdev is not None and fdev in self.links and dst
            f = Fdb(fdev, a[3], dst)
            if a[2] == "append":
                self.fdbs.add(f)
            else:
                self.fdbs.discard(f)
        elif a[:3] == ["bridge", "link", "set"]:
            pass
        else:
            raise AssertionError(f"unexpected command {a}")

    def _link(self, a: list[str]) -> None:
        op, name = a[0], a[1]
        if op == "add":
            assert name not in self.links, f"{name} exists"
            kind = a[a.index("type") + 1]
            tbl = self._kv(a, "table")
            vid = self._kv(a, "id")
            port = self._kv(a, "dstport")
            self.links[name] = Link(
                name, kind, vrf_table=int(tbl) if kind == "vrf" and tbl else None,
                vxlan_id=int(vid) if vid else None, vxlan_local=self._kv(a, "local"),
                vxlan_port=int(port) if port else None,
                vxlan_learning=False if "nolearning" in a else (True if kind == "vxlan" else None),
                mac="7a:00:00:00:00:99")
        elif op == "del":
            assert name in self.links
            del self.links[name]
            for n, li in list(self.links.items()):
                if li.master == name:
                    self.links[n] = replace(li, master=None)
            self.routes = {r for r in self.routes if r.dev != name}
            self.neighs = {x for x in self.neighs if x.dev != name}
            self.fdbs = {x for x in self.fdbs if x.dev != name}
            self.addrs = {x for x in self.addrs if x.dev != name}
        elif op == "set":
            li = self.links[name]
            rest = a[2:]
            if rest[0] == "alias":
                li = replace(li, alias=rest[1])
            elif rest[0] == "address":
                li = replace(li, mac=rest[1])
            elif rest[0] == "master":
                assert rest[1] in self.links, f"master {rest[1]} missing"
                li = replace(li, master=rest[1])
            elif rest[0] == "nomaster":
                li = replace(li, master=None)
            elif rest[0] == "up":
                li = replace(li, up=True)
            elif rest[0] == "addrgenmode":
                pass
            else:
                raise AssertionError(f"unexpected link set {a}")
            self.links[name] = li
        else:
            raise AssertionError(f"unexpected link op {a}")


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
