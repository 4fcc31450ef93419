"""Pure planner: desired policy + observed DPU state -> ordered list of commands.

Owns: what the DPU's kernel state must be for a policy (VRF or table, L3VNI bridge + VXLAN, host port,
routes, policy rules, nftables zone ruleset) and the minimal ordered ``ip``/``bridge``/``nft``/``sysctl``
argv lists that get there from whatever is observed. No I/O: :mod:`bootsvc.agent.dataplane` observes
and executes. Idempotence falls out of the design: a second plan against the state the first produced
is empty (tested).

What the agent owns on the DPU, and how it recognises it (so it converges from any partial state and
never touches anything else):
* links with ``ifalias`` ``bootsvc-agent`` (VRF device, ``babr<vni>`` bridge, ``bavx<vni>`` VXLAN),
  plus the configured host port (dedicated to the host, so all its IPv4 addresses are ours);
* the VTEP ``/32`` on ``lo`` carrying the label ``lo:ba``;
* routes with protocol number ``245`` (any table), permanent neighbours on its bridges, FDB entries
  with a ``dst`` on its VXLAN devices;
* policy-routing rules with priorities 900..999;
* ``net.ipv4.ip_forward`` (set, never cleared: the DPU may route other things) and ``proxy_arp`` on
  the host port;
* the nftables table ``inet bootsvc_agent`` (replaced atomically with ``nft -f``; its comment carries
  a hash of the rendered text, so an unchanged ruleset is not reloaded).

Two modes. ``vrf``: a kernel VRF device per tenant (Linux Documentation/networking/vrf.rst), the host port and the L3VNI
bridge enslaved to it. ``table``: for kernels built without ``CONFIG_NET_VRF`` (this project's CI VMs),
the same isolation with policy routing ("VRF-lite"): the host port's address is added ``noprefixroute``
so the main table never learns tenant prefixes, and rules at priority 960 send everything that enters
or leaves through the tenant's ports to the tenant table, which ends in ``unreachable default`` (the
kernel VRF doc's recommendation, too, so a missing route never falls through to the main table).
Both modes leak only the policy's Zone 0/2 flows: rule 920 ``iif <tenant> to <dst> lookup main``
(after rules 910 for tenant prefixes that a flow overlaps, so the tenant's own routes win), and their
replies come back through ``fwmark`` (priority 900) set from the conntrack mark that nftables puts on
the allowed flows, which are masqueraded to the DPU's Zone 0 address because tenant prefixes
overlap and cannot be routed in Zone 0.

One module (~530 lines) on purpose: the observed/desired value types, the desired state, the nftables
ruleset and the planner are one pure function's parts and change together (a new kernel object is a
type, a desired entry and a diff step); the I/O already lives in ``dataplane``, FRR in ``frr``/``frrd``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from bootsvc.agent.policy import Policy, Tenant, rmac

OWNER_ALIAS = "bootsvc-agent"
# Our routes' protocol number (rtnetlink rtm_protocol); marks ownership. Not 186: that is RTPROT_BGP,
# what FRR's zebra installs BGP routes with (the underlay's VTEP routes, the tenant VRF's Type-5
# routes) - the agent would delete those as stale, and zebra sweeps its own protocols at start
# (FRR zebra/rt_netlink.h: 186-198 and 42 are FRR's). 245 is named nowhere: not in Linux's
# include/uapi/linux/rtnetlink.h, iproute2's rt_protos, or FRR.
RT_PROTO = "245"
LO_LABEL = "lo:ba"
RULE_PREFS = range(900, 1000)
PREF_MARK = 900  # replies to leaked flows (fwmark from the conntrack mark) -> tenant table
PREF_TENANT_FIRST = 910  # tenant routes more specific than its default win over any leak
PREF_LEAK = 920  # the policy's Zone 0/2 destinations -> main table
PREF_TENANT = 960  # table mode: everything else of the tenant's ports -> tenant table
IP_FORWARD = "net/ipv4/ip_forward"
UNREACHABLE_METRIC = "4278198272"  # kernel VRF doc: lowest priority default in the VRF table
NFT_TABLE = "bootsvc_agent"
NFT_TAG = "bootsvc-agent sha256:"
MODES = ("vrf", "table")


class PlanError(ValueError):
    """The policy cannot be planned on this DPU (e.g. its host port does not exist)."""


@dataclass(frozen=True)
class Cmd:
    """One command. ``argv[0]`` is a tool name (``ip``, ``bridge``, ``nft``, ``sysctl``) that the
    executor maps to a binary; ``stdin`` is fed to it (nft rulesets)."""

    argv: tuple[str, ...]
    stdin: str | None = None
    why: str = ""

    def __str__(self) -> str:
        return " ".join(self.argv) + (" < ruleset" if self.stdin else "")


@dataclass(frozen=True)
class Env:
    """Local facts of this DPU (agent config + kernel capability), not from the policy."""

    host_port: str
    uplink: str
    mode: str  # vrf | table


@dataclass(frozen=True)
class Link:
    name: str
    kind: str | None  # linkinfo.info_kind (None for plain devices without linkinfo)
    master: str | None = None
    up: bool = False
    mac: str = ""
    alias: str | None = None
    vxlan_id: int | None = None
    vxlan_local: str | None = None
    vxlan_port: int | None = None
    vxlan_learning: bool | None = None
    vrf_table: int | None = None


@dataclass(frozen=True)
class Addr:
    dev: str
    cidr: str  # "10.0.0.1/24"
    noprefixroute: bool = False


@dataclass(frozen=True)
class Rule:
    pref: int
    table: str
    iif: str | None = None
    oif: str | None = None
    dst: str | None = None  # "10.98.0.1/32"
    fwmark: int | None = None
    src: str | None = None  # "10.0.0.1/32"
    suppress: int | None = None  # suppress_prefixlength


@dataclass(frozen=True)
class Route:
    table: str
    dst: str  # "default" or cidr
    type: str = "unicast"  # unicast | unreachable
    dev: str | None = None
    via: str | None = None
    src: str | None = None
    onlink: bool = False
    metric: str | None = None


@dataclass(frozen=True)
class Neigh:
    dev: str
    dst: str
    lladdr: str


@dataclass(frozen=True)
class Fdb:
    dev: str
    mac: str
    dst: str


@dataclass(frozen=True)
class Observed:
    links: dict[str, Link] = field(default_factory=dict)
    addrs: tuple[Addr, ...] = ()  # IPv4 on the host port and our labelled ones on lo
    rules: tuple[Rule, ...] = ()  # priorities 900..999 only
    routes: tuple[Route, ...] = ()  # protocol RT_PROTO only
    neighs: tuple[Neigh, ...] = ()  # permanent, on our bridges
    fdbs: tuple[Fdb, ...] = ()  # with dst, on our VXLAN devices
    sysctls: dict[str, str] = field(default_factory=dict)
    nft_tag: str | None = None  # hash from the table comment; None = table absent
    nft_rules: int = -1


# ---------------------------------------------------------------- desired state ----------------


@dataclass(frozen=True)
class LinkSpec:
    name: str
    kind: str
    create: tuple[str, ...]  # argv tail after "ip link add NAME"
    master: str | None
    mac: str | None = None
    vxlan: tuple[int, str, int] | None = None  # id, local, port
    vrf_table: int | None = None


@dataclass(frozen=True)
class Desired:
    links: tuple[LinkSpec, ...]
    host_master: str | None
    addrs: tuple[Addr, ...]
    rules: tuple[Rule, ...]
    routes: tuple[Route, ...]
    neighs: tuple[Neigh, ...]
    fdbs: tuple[Fdb, ...]
    sysctls: tuple[tuple[str, str], ...]
    nft_text: str
    nft_tag: str
    nft_rules: int


def proxy_arp_key(env: Env) -> str:
    """The tenant gateway is an anycast gateway (same subnet on every DPU of the tenant, RFC 9135
    §4) and peers' hosts are /32 routes via the L3VNI: the host ARPs for them on its segment, so the
    DPU answers for addresses it routes elsewhere (proxy ARP, RFC 1027). Slash form: interface names
    may contain dots."""
    return f"net/ipv4/conf/{env.host_port}/proxy_arp"


def proxy_delay_key(env: Env) -> str:
    """Proxy ARP answers after a random delay of up to ``proxy_delay`` (default 0.8 s); a booting
    host (and every first packet between two hosts) would pay it twice. There is no reason to wait."""
    return f"net/ipv4/neigh/{env.host_port}/proxy_delay"


def sysctl_keys(env: Env) -> tuple[str, ...]:
    """Every sysctl the planner may set (what the data plane has to observe)."""
    return (IP_FORWARD, proxy_arp_key(env), proxy_delay_key(env))


def mark_of(t: Tenant) -> int:
    """Conntrack/packet mark for the tenant's leaked flows: its table id (unique per tenant)."""
    return t.vrf_table


def tenant_ports(t: Tenant | None, env: Env) -> list[str]:
    """Interfaces whose traffic belongs to the tenant (or, with no tenant, the isolated host port)."""
    if t is None:
        return [env.host_port]
    ports = [env.host_port, t.bridge]
    if env.mode == "vrf":
        # with l3mdev, some hooks report the VRF device as iif (Linux Documentation/networking/vrf.rst);
        # listing both is harmless
        ports.append(t.vrf_name)
    return ports


def desired(policy: Policy, env: Env) -> Desired:
    if env.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    t = policy.tenant
    nft_text, n_rules = render_nft(policy, env)
    tag = hashlib.sha256(nft_text.encode()).hexdigest()[:16]
    nft_text = nft_text.replace("@TAG@", tag)
    if t is None:
        return Desired((), None, (), (), (), (), (), ((proxy_arp_key(env), "0"),), nft_text, tag, n_rules)
    table = str(t.vrf_table)
    vrf = env.mode == "vrf"
    links: list[LinkSpec] = []
    if vrf:
        links.append(LinkSpec(t.vrf_name, "vrf", ("type", "vrf", "table", table), None,
                              vrf_table=t.vrf_table))
    links.append(LinkSpec(t.bridge, "bridge", ("type", "bridge", "forward_delay", "0", "stp_state", "0"),
                          t.vrf_name if vrf else None, mac=rmac(t.vtep)))
    links.append(LinkSpec(
        t.vxlan, "vxlan",
        # no static remote and learning off (FRR user guide, "EVPN"): remote VTEPs come from
        # EVPN (FRR) or the policy's peers as explicit FDB entries
        ("type", "vxlan", "id", str(t.l3vni), "local", str(t.vtep), "dstport", str(t.vxlan_port),
         "nolearning"),
        t.bridge, vxlan=(t.l3vni, str(t.vtep), t.vxlan_port)))
    gw = t.gateway
    addrs = [Addr(env.host_port, str(gw), noprefixroute=not vrf), Addr("lo", f"{t.vtep}/32")]
    routes: list[Route] = [Route(table, "default", "unreachable", metric=UNREACHABLE_METRIC)]
    if not vrf:
        # in VRF mode the kernel puts the connected route into the VRF table itself
        routes.append(Route(table, str(gw.network), dev=env.host_port, src=str(gw.ip)))
    neighs: list[Neigh] = []
    fdbs: list[Fdb] = []
    for p in t.peers:
        mac = rmac(p.vtep)
        neighs.append(Neigh(t.bridge, str(p.vtep), mac))
        fdbs.append(Fdb(t.vxlan, mac, str(p.vtep)))
        for pfx in p.prefixes:
            # symmetric IRB: next hop = remote VTEP on the L3VNI SVI, resolved to its router MAC
            routes.append(Route(table, str(pfx), dev=t.bridge, via=str(p.vtep), onlink=True))
    rules: list[Rule] = []
    # With l3mdev, whether fib rules see the VRF device or the enslaved port as iif changed across
    # kernel versions (flowi_l3mdev, Linux 5.18): in VRF mode match both.
    ingress = [t.vrf_name, env.host_port] if vrf else [env.host_port]
    if t.flows:
        rules.append(Rule(PREF_MARK, table, fwmark=mark_of(t)))
    # a broad egress flow (e.g. 0.0.0.0/1) must not pull the tenant's own prefixes into the main
    # table: those keep an explicit rule to the tenant table ahead of the leaks. (Not
    # "suppress_prefixlength 0": an unreachable route is a lookup error, which ends rule processing.)
    own = [gw.network, *(pfx for p in t.peers for pfx in p.prefixes)]
    for own_dst in sorted({str(x) for x in own if any(x.overlaps(f.dst) for f in t.flows)}):
        rules += [Rule(PREF_TENANT_FIRST, table, iif=dev, dst=own_dst) for dev in ingress]
    for dst in sorted({str(f.dst) for f in t.flows}):
        rules += [Rule(PREF_LEAK, "main", iif=dev, dst=dst) for dev in ingress]
    if not vrf:
        for dev in (env.host_port, t.bridge):
            rules.append(Rule(PREF_TENANT, table, iif=dev))
            rules.append(Rule(PREF_TENANT, table, oif=dev))
        # the DPU's own answers from its tenant gateway address (ICMP echo replies, RFC 1122
        # §3.2.2.6: source = the address the request was sent to) have no oif: route them by source
        rules.append(Rule(PREF_TENANT, table, src=f"{gw.ip}/32"))
    sysctls = ((IP_FORWARD, "1"), (proxy_arp_key(env), "1"), (proxy_delay_key(env), "0"))
    return Desired(tuple(links), t.vrf_name if vrf else None, tuple(addrs), tuple(rules), tuple(routes),
                   tuple(neighs), tuple(fdbs), sysctls, nft_text, tag, n_rules)


# ---------------------------------------------------------------- nftables ---------------------


def _set(names: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def render_nft(policy: Policy, env: Env) -> tuple[str, int]:
    """The agent's whole nftables table as one ``nft -f`` transaction (create-if-missing, delete,
    re-create: atomic replace) and its rule count. ``@TAG@`` is replaced by the text's hash.

    Zones (docs/agent-api.md, ``flows``): traffic entering from the host port (or the tenant's L3VNI) may
    stay in the tenant (Zone 1), reach only the policy's Zone 0 boot endpoints and Zone 2 egress
    flows, and reach the DPU itself only for DHCP (the relay), ping of its gateway and IPv6 ND/RS.
    Nothing from outside the tenant may open a connection into it."""
    t = policy.tenant
    ports = _set(tenant_ports(t, env))
    chains: list[tuple[str, str | None, list[str]]] = []
    pre: list[str] = []
    fw_from: list[str] = ["ct state established,related accept", "ct state invalid drop"]
    to_in: list[str] = ["ct state established,related accept", "ct state invalid drop"]
    post: list[str] = []
    if t is not None:
        mark = mark_of(t)
        hp = f'"{env.host_port}"'
        if any(f.proto == "udp" and f.dport == 69 for f in t.flows):
            # TFTP data comes back from a new server port: the conntrack helper makes it RELATED and
            # lets NAT follow it (nf_conntrack_tftp / nf_nat_tftp)
            pre.append(f'iifname {hp} udp dport 69 ct helper set "tftp69"')
        if t.flows:
            # replies to the tenant's leaked flows: route them back through the tenant table
            pre.append(f"iifname != {ports} ct mark {mark} meta mark set {mark}")
        if t.relay is not None:
            # (in VRF mode the input hook sees the VRF device as iif, not the host port: match all
            # tenant ports, or the relay never gets the host's DHCP)
            # RFC 2131 §4.1: clients send to port 67 (broadcast, or unicast renewals to the
            # server-id override = our gateway)
            to_in.append(f"iifname {ports} udp dport 67 accept")
        to_in.append(f"iifname {ports} ip daddr {t.gateway.ip} icmp type echo-request accept")
        to_in.append("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept")
        if t.ra:
            to_in.append(f"iifname {ports} icmpv6 type nd-router-solicit accept")
        fw_from.append(f"oifname {ports} accept")  # Zone 1: stays inside the tenant
        for f in t.flows:
            match = f"ip daddr {f.dst}"
            match += " meta l4proto icmp" if f.proto == "icmp" else f" {f.proto} dport {f.dport}"
            fw_from.append(f"{match} ct mark set {mark} accept")
        post.append(f"ct mark {mark} oifname != {ports} masquerade")
    to_in.append("counter drop")
    fw_from.append("counter drop")
    chains.append(("pre_mangle", "type filter hook prerouting priority mangle; policy accept;", pre))
    # an (empty) nat prerouting chain keeps NAT reply translation registered on every kernel
    chains.append(("pre_nat", "type nat hook prerouting priority dstnat; policy accept;", []))
    chains.append(("in_filter", "type filter hook input priority filter; policy accept;",
                   [f"iifname {ports} jump from_tenant_in"]))
    chains.append(("from_tenant_in", None, to_in))
    chains.append(("fw_filter", "type filter hook forward priority filter; policy accept;",
                   [f"iifname {ports} jump from_tenant_fw", f"oifname {ports} jump to_tenant_fw"]))
    chains.append(("from_tenant_fw", None, fw_from))
    chains.append(("to_tenant_fw", None,
                   ["ct state established,related accept", "counter drop"]))
    chains.append(("post_nat", "type nat hook postrouting priority srcnat; policy accept;", post))
    lines = [
        f"table inet {NFT_TABLE} {{}}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        f'\tcomment "{NFT_TAG}@TAG@"',
        '\tct helper tftp69 { type "tftp" protocol udp; }',
    ]
    n = 0
    for name, hook, rules in chains:
        lines.append(f"\tchain {name} {{")
        if hook:
            lines.append(f"\t\t{hook}")
        for r in rules:
            lines.append(f"\t\t{r}")
            n += 1
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n", n


# ---------------------------------------------------------------- planning ---------------------


def _sorted(items: Iterable[object]) -> list[Any]:
    """Deterministic order for set differences (plans are compared in tests and logs)."""
    return sorted(items, key=repr)


def _ip(*a: str) -> Cmd:
    return Cmd(("ip", *a))


def _rule_args(r: Rule) -> list[str]:
    a = ["pref", str(r.pref)]
    if r.src:
        a += ["from", r.src]
    if r.iif:
        a += ["iif", r.iif]
    if r.oif:
        a += ["oif", r.oif]
    if r.dst:
        a += ["to", r.dst]
    if r.fwmark is not None:
        a += ["fwmark", str(r.fwmark)]
    a += ["lookup", r.table]
    if r.suppress is not None:
        a += ["suppress_prefixlength", str(r.suppress)]
    return a


def _route_args(r: Route) -> list[str]:
    a = [] if r.type == "unicast" else [r.type]
    a.append(r.dst)
    if r.via:
        a += ["via", r.via]
    if r.dev:
        a += ["dev", r.dev]
    if r.onlink:
        a.append("onlink")
    if r.src:
        a += ["src", r.src]
    if r.metric:
        a += ["metric", r.metric]
    return [*a, "table", r.table, "proto", RT_PROTO]


def _link_matches(have: Link, want: LinkSpec) -> bool:
    if have.kind != want.kind:
        return False
    if want.vxlan is not None:
        vid, local, port = want.vxlan
        return (have.vxlan_id, have.vxlan_local, have.vxlan_port, have.vxlan_learning) == (
            vid, local, port, False)
    if want.vrf_table is not None:
        return have.vrf_table == want.vrf_table
    return True


def plan(policy: Policy, env: Env, obs: Observed) -> list[Cmd]:
    """Commands that take ``obs`` to the state ``policy`` wants, in a safe order:
    sysctls; stale rules/routes/neighbours/FDB out; links (re)created and wired; host port; addresses;
    routes, neighbours, FDB; rules; stale links deleted; nftables last (one atomic transaction)."""
    d = desired(policy, env)
    cmds: list[Cmd] = []
    for key, val in d.sysctls:
        if obs.sysctls.get(key) != val:
            cmds.append(Cmd(("sysctl", "-qw", f"{key}={val}")))

    want_rules = set(d.rules)
    for r in _sorted(set(obs.rules) - want_rules):
        cmds.append(_ip("rule", "del", *_rule_args(r)))
    want_routes = set(d.routes)
    for rt in _sorted(set(obs.routes) - want_routes):
        cmds.append(_ip("route", "del", *_route_args(rt)))
    for nb in _sorted(set(obs.neighs) - set(d.neighs)):
        cmds.append(_ip("neigh", "del", nb.dst, "dev", nb.dev))
    for fd in _sorted(set(obs.fdbs) - set(d.fdbs)):
        cmds.append(Cmd(("bridge", "fdb", "del", fd.mac, "dev", fd.dev, "dst", fd.dst, "self")))

    # links: delete-and-recreate on a parameter mismatch (kind, VNI, VTEP, port, table cannot be
    # changed in place); create missing; fix master/mac/up
    present = dict(obs.links)
    want_names = {s.name for s in d.links}
    hp = env.host_port
    hp_link = present.get(hp)
    if hp_link is None:
        raise PlanError(f"host port {hp} does not exist on this DPU")
    hp_master = hp_link.master if hp_link else None
    if hp_link is not None and hp_master != d.host_master and hp_master not in (None, *want_names):
        # leave an old VRF before it is deleted below (deleting the master would take the port down)
        cmds.append(_ip("link", "set", hp, "nomaster"))
        hp_master = None
    recreated: set[str] = set()
    for spec in d.links:
        have = present.get(spec.name)
        if have is not None and have.master in recreated:
            have = replace(have, master=None)  # its master was deleted above, which released it
        if have is not None and not _link_matches(have, spec):
            cmds.append(_ip("link", "del", spec.name))
            have = None
            recreated.add(spec.name)
            if hp_master == spec.name:
                hp_master = None  # deleting a VRF releases its ports
        if have is None:
            cmds.append(_ip("link", "add", spec.name, *spec.create))
            cmds.append(_ip("link", "set", spec.name, "alias", OWNER_ALIAS))
            if spec.kind in ("bridge", "vxlan"):
                # the L3VNI SVI and VXLAN port carry no addresses, not even IPv6 link-local (§6.2)
                cmds.append(_ip("link", "set", spec.name, "addrgenmode", "none"))
            have = Link(spec.name, spec.kind)
        elif have.alias != OWNER_ALIAS:
            cmds.append(_ip("link", "set", spec.name, "alias", OWNER_ALIAS))
        if spec.mac and have.mac.lower() != spec.mac:
            cmds.append(_ip("link", "set", spec.name, "address", spec.mac))
        if have.master != spec.master:
            if spec.master is None:
                cmds.append(_ip("link", "set", spec.name, "nomaster"))
            else:
                cmds.append(_ip("link", "set", spec.name, "master", spec.master))
            if spec.kind == "vxlan":
                # FRR user guide, "EVPN": no learning on the VXLAN bridge port (FDB is programmed)
                cmds.append(Cmd(("bridge", "link", "set", "dev", spec.name, "learning", "off")))
        if not have.up:
            cmds.append(_ip("link", "set", spec.name, "up"))

    if hp_link is not None:
        if hp_master != d.host_master:
            if d.host_master is None:
                cmds.append(_ip("link", "set", hp, "nomaster"))
            else:
                cmds.append(_ip("link", "set", hp, "master", d.host_master))
        if not hp_link.up:
            cmds.append(_ip("link", "set", hp, "up"))

    want_addrs = set(d.addrs)
    for a in _sorted(set(obs.addrs) - want_addrs):
        cmds.append(_ip("addr", "del", a.cidr, "dev", a.dev))
    for a in _sorted(want_addrs - set(obs.addrs)):
        extra = ["noprefixroute"] if a.noprefixroute else []
        if a.dev == "lo":
            extra += ["label", LO_LABEL]
        cmds.append(_ip("addr", "add", a.cidr, "dev", a.dev, *extra))

    for rt in _sorted(want_routes - set(obs.routes)):
        cmds.append(_ip("route", "replace", *_route_args(rt)))
    for nb in _sorted(set(d.neighs) - set(obs.neighs)):
        cmds.append(_ip("neigh", "replace", nb.dst, "lladdr", nb.lladdr, "dev", nb.dev, "nud", "permanent"))
    for fd in _sorted(set(d.fdbs) - set(obs.fdbs)):
        cmds.append(Cmd(("bridge", "fdb", "append", fd.mac, "dev", fd.dev, "dst", fd.dst, "self",
                         "permanent")))
    for r in _sorted(want_rules - set(obs.rules)):
        cmds.append(_ip("rule", "add", *_rule_args(r)))

    for name, link in sorted(present.items()):
        if link.alias == OWNER_ALIAS and name not in want_names:
            cmds.append(_ip("link", "del", name))

    if obs.nft_tag != d.nft_tag or obs.nft_rules != d.nft_rules:
        cmds.append(Cmd(("nft", "-f", "-"), stdin=d.nft_text, why="zone firewall (atomic replace)"))
    return cmds

