"""Policy document (schema 1, ``docs/agent-api.md``) -> validated frozen dataclasses, and back.

Owns: parsing and validating what bootsvc sends, so the planner only ever sees well-formed input.
Pure: no I/O. Raises :class:`PolicyError` with a message naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

SCHEMA = 1
# IFNAMSIZ is 16 including NUL; names are used verbatim in ip(8) and nft(8) arguments, so keep them to
# a conservative charset (no quotes, spaces or slashes can reach a command line).
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local (rt_tables)
MAX_RELAY_SERVERS = 16  # one UDP send per server per host request: bounded whatever the document says


class PolicyError(ValueError):
    """A policy document the agent must refuse."""


@dataclass(frozen=True)
class Flow:
    zone: int  # 0 = Zone 0 boot endpoints, 2 = egress
    proto: str  # udp | tcp | icmp
    dst: IPv4Network
    dport: int | None


@dataclass(frozen=True)
class Relay:
    server: IPv4Address  # the first of ``servers`` (schema 1 as first published had only this field)
    giaddr: IPv4Address | None  # None: the agent's own Zone 0 source address towards the server
    link_selection: IPv4Address | None  # RFC 3527 sub-option 5
    server_id_override: IPv4Address | None  # RFC 5107 sub-option 11
    vss_vrf: str  # RFC 6607 sub-option 151 type 0
    circuit_id: str | None  # None: host port name
    remote_id: str | None  # None: DPU serial
    # every bootsvc DHCP server (several instances); the relay forwards each request to all of them
    servers: tuple[IPv4Address, ...] = ()

    @property
    def targets(self) -> tuple[IPv4Address, ...]:
        return self.servers or (self.server,)


@dataclass(frozen=True)
class Peer:
    vtep: IPv4Address
    prefixes: tuple[IPv4Network, ...]


@dataclass(frozen=True)
class Evpn:
    """The DPU's place in the EVPN fabric (docs/fabric.md): its ASN, BGP unnumbered uplinks, VTEP
    (router id and VXLAN source; None only in older documents, which carry it as the tenant's
    ``vtep``) and route targets (None: FRR's auto-derived ASN:VNI)."""

    asn: int
    uplinks: tuple[str, ...]
    vtep: IPv4Address | None = None
    route_target_asn: int | None = None


@dataclass(frozen=True)
class Tenant:
    name: str
    vrf_name: str
    vrf_table: int
    l3vni: int
    vtep: IPv4Address
    vxlan_port: int
    gateway: IPv4Interface
    flows: tuple[Flow, ...] = ()
    relay: Relay | None = None
    ra: bool = False
    peers: tuple[Peer, ...] = ()
    evpn: Evpn | None = None
    host_prefixes: tuple[IPv4Network, ...] = ()  # this DPU's own host addresses (Type-5 exports)

    @property
    def bridge(self) -> str:
        """The L3VNI SVI bridge (FRR user guide, "EVPN": the L3VNI's SVI carries no IP address)."""
        return f"babr{self.l3vni}"

    @property
    def vxlan(self) -> str:
        return f"bavx{self.l3vni}"


@dataclass(frozen=True)
class Policy:
    version: str
    node: str
    host_port: str | None
    tenant: Tenant | None  # None = removal: host port isolated
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    evpn: Evpn | None = None  # also without a tenant: the underlay stays up


def _req(d: dict[str, Any], key: str, where: str = "") -> Any:
    if key not in d or d[key] is None:
        raise PolicyError(f"{where}{key}: required")
    return d[key]


def _ifname(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _IFNAME.match(v):
        raise PolicyError(f"{where}: not a valid interface name: {v!r}")
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise PolicyError(f"{where}: want an integer in {lo}..{hi}, got {v!r}")
    return v


def _ip(v: Any, where: str) -> IPv4Address:
    try:
        return IPv4Address(v)
    except (ValueError, TypeError) as e:
        raise PolicyError(f"{where}: {e}") from None


def _opt_ip(v: Any, where: str) -> IPv4Address | None:
    return None if v is None else _ip(v, where)


def _ascii(v: Any, where: str, maxlen: int = 250) -> str:
    if not isinstance(v, str) or not v.isascii() or not v.isprintable() or not 0 < len(v) <= maxlen:
        raise PolicyError(f"{where}: want printable ASCII of 1..{maxlen} chars, got {v!r}")
    return v


def _flow(d: Any, i: int) -> Flow:
    w = f"flows[{i}]."
    if not isinstance(d, dict):
        raise PolicyError(f"flows[{i}]: not an object")
    zone = _int(_req(d, "zone", w), w + "zone", 0, 2)
    if zone == 1:
        raise PolicyError(f"{w}zone: zone 1 (inside the VRF) is always allowed; list only 0 or 2")
    proto = _req(d, "proto", w)
    if proto not in ("udp", "tcp", "icmp"):
        raise PolicyError(f"{w}proto: want udp|tcp|icmp, got {proto!r}")
    try:
        dst = IPv4Network(_req(d, "dst", w), strict=True)
    except ValueError as e:
        raise PolicyError(f"{w}dst: {e}") from None
    if dst.prefixlen == 0:
        raise PolicyError(f"{w}dst: a default route would leak the whole Zone; name the endpoints")
    dport = d.get("dport")
    if proto == "icmp":
        if dport is not None:
            raise PolicyError(f"{w}dport: must be null for icmp")
    else:
        dport = _int(dport, w + "dport", 1, 65535)
    return Flow(zone, proto, dst, dport)


def parse(doc: Any) -> Policy:
    """Validate a policy document (already JSON-decoded)."""
    if not isinstance(doc, dict):
        raise PolicyError("policy: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise PolicyError(f"schema: this agent understands schema {SCHEMA}, got {doc.get('schema')!r}")
    version = _req(doc, "version")
    if not isinstance(version, str | int) or isinstance(version, bool):
        raise PolicyError("version: want a string")
    node = _ascii(_req(doc, "node"), "node")
    hp = doc.get("host_port")
    host_port = None if hp is None else _ifname(hp, "host_port")
    evpn = _evpn(doc.get("evpn"))
    if doc.get("tenant") is None:
        if evpn is not None and evpn.vtep is None:
            raise PolicyError("evpn.vtep: required without a tenant")
        return Policy(str(version), node, host_port, None, dict(doc), evpn)
    name = _ascii(doc["tenant"], "tenant", 64)
    vrf_name = _ifname(_req(doc, "vrf_name"), "vrf_name")
    table = _int(_req(doc, "vrf_table"), "vrf_table", 1, 2**32 - 1)
    if table in _RESERVED_TABLES:
        raise PolicyError(f"vrf_table: {table} is reserved")
    l3vni = _int(_req(doc, "l3vni"), "l3vni", 1, 2**24 - 1)
    vtep = _ip(_req(doc, "vtep"), "vtep")
    port = _int(doc.get("vxlan_port", 4789), "vxlan_port", 1, 65535)
    try:
        gw = IPv4Interface(_req(doc, "host_gateway"))
    except ValueError as e:
        raise PolicyError(f"host_gateway: {e}") from None
    if gw.network.prefixlen >= 31 or gw.ip in (gw.network.network_address, gw.network.broadcast_address):
        raise PolicyError("host_gateway: want a host address in a /30 or larger subnet")
    flows_raw = doc.get("flows") or []
    if not isinstance(flows_raw, list):
        raise PolicyError("flows: not a list")
    flows = tuple(_flow(f, i) for i, f in enumerate(flows_raw))
    relay = None
    r = doc.get("relay")
    if r is not None:
        if not isinstance(r, dict):
            raise PolicyError("relay: not an object")
        server = _ip(_req(r, "server", "relay."), "relay.server")
        servers_raw = r.get("servers")
        if servers_raw is None:  # a bootsvc that predates the list: one server
            servers: tuple[IPv4Address, ...] = (server,)
        elif not isinstance(servers_raw, list) or not 1 <= len(servers_raw) <= MAX_RELAY_SERVERS:
            raise PolicyError(f"relay.servers: want a list of 1..{MAX_RELAY_SERVERS} addresses")
        else:
            servers = tuple(dict.fromkeys(_ip(x, f"relay.servers[{i}]") for i, x in enumerate(servers_raw)))
            if server not in servers:
                raise PolicyError(f"relay.servers: does not contain relay.server {server}")
        relay = Relay(
            server=server,
            servers=servers,
            giaddr=_opt_ip(r.get("giaddr"), "relay.giaddr"),
            link_selection=_opt_ip(r.get("link_selection"), "relay.link_selection"),
            server_id_override=_opt_ip(r.get("server_id_override"), "relay.server_id_override"),
            vss_vrf=_ascii(r.get("vss_vrf") or vrf_name, "relay.vss_vrf", 250),
            # empty = not known server-side (e.g. no serial yet): the agent's own defaults apply
            circuit_id=_ascii(r["circuit_id"], "relay.circuit_id") if r.get("circuit_id") else None,
            remote_id=_ascii(r["remote_id"], "relay.remote_id") if r.get("remote_id") else None,
        )
    peers_raw = doc.get("peers") or []
    if not isinstance(peers_raw, list):
        raise PolicyError("peers: not a list")
    peers = []
    for i, p in enumerate(peers_raw):
        if not isinstance(p, dict):
            raise PolicyError(f"peers[{i}]: not an object")
        try:
            prefixes = tuple(IPv4Network(x, strict=True) for x in p.get("prefixes") or [])
        except (ValueError, TypeError) as e:
            raise PolicyError(f"peers[{i}].prefixes: {e}") from None
        peer_vtep = _ip(_req(p, "vtep", f"peers[{i}]."), f"peers[{i}].vtep")
        if peer_vtep == vtep:
            raise PolicyError(f"peers[{i}].vtep: that is this DPU's own VTEP")
        peers.append(Peer(peer_vtep, prefixes))
    if evpn is not None:
        if evpn.vtep is None:
            evpn = Evpn(evpn.asn, evpn.uplinks, vtep, evpn.route_target_asn)
        elif evpn.vtep != vtep:
            raise PolicyError(f"evpn.vtep: {evpn.vtep} is not the tenant's vtep {vtep}")
    hp_raw = doc.get("host_prefixes") or []
    if not isinstance(hp_raw, list):
        raise PolicyError("host_prefixes: not a list")
    try:
        host_prefixes = tuple(IPv4Network(x, strict=True) for x in hp_raw)
    except (ValueError, TypeError) as e:
        raise PolicyError(f"host_prefixes: {e}") from None
    for pfx in host_prefixes:
        if not pfx.subnet_of(gw.network):
            raise PolicyError(f"host_prefixes: {pfx} is outside the host segment {gw.network}")
    ra = doc.get("ra", False)
    if not isinstance(ra, bool):
        raise PolicyError("ra: want true or false")
    tenant = Tenant(name, vrf_name, table, l3vni, vtep, port, gw, flows, relay, ra, tuple(peers), evpn,
                    host_prefixes)
    return Policy(str(version), node, host_port, tenant, dict(doc), evpn)


def _evpn(ev: Any) -> Evpn | None:
    if ev is None:
        return None
    if not isinstance(ev, dict):
        raise PolicyError("evpn: not an object")
    uplinks = ev.get("uplinks") or []
    if not isinstance(uplinks, list) or not uplinks:
        raise PolicyError("evpn.uplinks: want a non-empty list of interface names (BGP unnumbered ports)")
    rt = ev.get("route_target_asn")
    return Evpn(
        asn=_int(_req(ev, "asn", "evpn."), "evpn.asn", 1, 2**32 - 1),
        uplinks=tuple(_ifname(u, "evpn.uplinks") for u in uplinks),
        vtep=_opt_ip(ev.get("vtep"), "evpn.vtep"),
        route_target_asn=None if rt is None else _int(rt, "evpn.route_target_asn", 1, 65535),
    )


def isolated(node: str, version: str = "isolated") -> Policy:
    """The policy applied before any policy is known: host port isolated (fail closed)."""
    return Policy(version, node, None, None, {"schema": SCHEMA, "version": version, "node": node,
                                              "tenant": None})


def rmac(vtep: IPv4Address) -> str:
    """Router MAC of a VTEP's L3VNI bridge: 02:00 + the four VTEP address bytes. Locally administered
    (bit 1 of the first octet, IEEE 802), unique per VTEP, and computable by every peer: this is what
    EVPN's Router's MAC extended community carries (RFC 9135 §8.1) when FRR runs; without FRR the
    static peers list plus this rule give the same forwarding state."""
    b = vtep.packed
    return "02:00:" + ":".join(f"{x:02x}" for x in b)

