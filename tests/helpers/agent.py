"""Shared helpers for the DPU agent tests without root: a policy document builder, an in-memory kernel
that executes the planner's commands (FakeKernel), a dataplane and an API over it, and an Agent wired to them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bootsvc.agent.client import ApiError, Fetched, Unreachable
from bootsvc.agent.dataplane import ApplyError
from bootsvc.agent.main import Agent, AgentConfig
from bootsvc.agent.plan import Addr, Cmd, Env, Fdb, Link, Neigh, Observed, Route, Rule


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


def pdoc(version: str, **over: Any) -> dict[str, Any]:
    # relay/RA off: those open real sockets (covered by the netns integration tests)
    return doc(version=version, node="dpu1", host_port="pf0hpf", relay=None, ra=False, **over)


class FakeDataplane:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k
        self.fail_on: str | None = None
        self.fail_skip = 0  # let this many matching commands pass before failing

    def vrf_supported(self) -> bool:
        return False

    def observe(self, env: Env) -> Observed:
        return self.k.observe()

    def execute(self, cmds: Sequence[Cmd]) -> None:
        for c in cmds:
            if self.fail_on and c.argv[0] == self.fail_on:
                if self.fail_skip <= 0:
                    raise ApplyError(c, "injected")
                self.fail_skip -= 1
            self.k.run([c])

    def route_src(self, dst: IPv4Address) -> IPv4Address | None:
        return IPv4Address("10.98.0.11")

    def link_mac(self, dev: str) -> str | None:
        return "aa:bb:cc:00:00:01"


class FakeApi:
    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.want: str | None = None
        self.down = False
        self.refuse = False
        self.reports: list[tuple[str, str, str | None, dict[str, Any]]] = []
        self.checkins: list[dict[str, Any]] = []
        self.gets: list[str | None] = []

    def set(self, d: dict[str, Any]) -> None:
        self.docs[d["version"]] = d
        self.want = d["version"]

    def checkin(self, health: dict[str, Any]) -> str | None:
        if self.down:
            raise Unreachable("connection refused")
        if self.refuse:
            raise ApiError(401, "bad secret")
        self.checkins.append(health)
        return self.want

    def policy(self, etag: str | None = None) -> Fetched:
        if self.down:
            raise Unreachable("connection refused")
        self.gets.append(etag)
        if etag == self.want:
            return Fetched(304, etag, None)
        return Fetched(200, self.want, self.docs[self.want or ""])

    def report(self, version: str, status: str, error: str | None, health: dict[str, Any]) -> None:
        if self.down:
            raise Unreachable("connection refused")
        self.reports.append((version, status, error, health))


def make(tmp_path: Path, k: FakeKernel | None = None, api: FakeApi | None = None,
         **cfg: Any) -> tuple[Agent, FakeDataplane, FakeApi]:
    c = AgentConfig(url="http://x", node="dpu1", secret="s", host_port="pf0hpf", uplink="p0",
                    state_dir=tmp_path / "state", mode="auto", **cfg)
    dp = FakeDataplane(k or FakeKernel())
    api = api or FakeApi()
    return Agent(c, dp, api), dp, api  # type: ignore[arg-type]
