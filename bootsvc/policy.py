"""Server side of the DPU policy (``docs/agent-api.md``, schema 1): build a DPU's desired policy.

Owns: turning a DPU, its tenant, the site networks and the orchestration settings into the policy
document the agent applies, and the document's version (a content hash, so it changes exactly when
any field changes and every bootsvc instance computes the same one). Pure: no I/O; the conductor and
the agent API gather the inputs (``bootsvc.conductor.policy_for``).

Where the fields come from:
- ``vrf_name``/``l3vni``/``vrf_table``: the tenant (table: the tenant's, else its L3 VNI, moved out of
  the reserved 253-255 range).
- ``host_gateway``: the tenant network (config ``networks`` with ``vrf`` = tenant VRF and a gateway);
  the same anycast gateway on every DPU of the tenant (EVPN symmetric IRB, RFC 9135 §4).
- ``relay``: bootsvc's Zone 0 addresses as servers: a zone-0 network's ``boot_servers`` (every
  instance's address, the same list in every instance's config), else its ``boot_server``; sorted,
  so the order in the config does not matter; ``server`` = the first, for agents that read only that
  field. Option 82 link-selection = the tenant subnet (RFC 3527), server-id-override = the gateway
  (RFC 5107), VSS = the VRF name (RFC 6607), circuit-id = host port, remote-id = DPU serial (RFC 3046).
- ``flows``: the boot endpoints in Zone 0 (TFTP 69/udp, HTTP boot port) of every one of those
  servers, plus site egress (Zone 2).

Nothing in the document depends on which instance builds it: an instance's own address
(``boot_server``, its DHCP server identifier and next-server) would make several instances send
different versions of one DPU's policy and revert each other at every drift check.
- ``vtep``: ``orchestration.vtep_network`` + DPU node id (stable, unique per DPU).
- ``evpn`` (``fabric`` section, docs/fabric.md): the DPU's ASN (``fabric.asn`` + node id, one private
  ASN per DPU, RFC 7938 §5.2.1), its BGP unnumbered uplinks, VTEP and the route-target scheme. With
  EVPN the tenant's other DPUs are learned over BGP (Type-5, RFC 9136): the document carries only this
  DPU's own host prefixes (``host_prefixes``) and no ``peers``, so its size does not grow with the
  fleet. ``peers`` (every other DPU's VTEP and host addresses) is sent only when EVPN is off
  (``fabric.evpn: false``, or no ASN configured), for fabrics without a BGP control plane.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bootsvc.config import Config, NetworkConfig

SCHEMA = 1
_RESERVED_TABLES = {253, 254, 255}  # default, main, local (iproute2 rt_tables)


class PolicyBuildError(ValueError):
    """The site settings do not allow a policy for this DPU (message says what to configure)."""


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    vrf: str
    l3vni: int
    table: int | None


@dataclass(frozen=True, slots=True)
class Peer:
    vtep: str
    prefixes: tuple[str, ...]


def vtep_for(config: Config, node_id: int) -> IPv4Address:
    net = config.orchestration.vtep_network
    if net is None:
        raise PolicyBuildError("orchestration.vtep_network is not set in the site config (DPU VTEP addresses)")
    if node_id <= 0 or node_id >= net.num_addresses - 1:
        raise PolicyBuildError(f"DPU node id {node_id} does not fit in orchestration.vtep_network {net}")
    return net.network_address + node_id


def vrf_table(t: TenantInfo) -> int:
    if t.table is not None:
        return t.table
    return t.l3vni + (1 << 24) if t.l3vni in _RESERVED_TABLES else t.l3vni


def tenant_network(config: Config, vrf: str) -> NetworkConfig:
    for n in config.networks:
        if n.vrf == vrf and n.gateway is not None:
            return n
    raise PolicyBuildError(f"no network with vrf {vrf!r} and a gateway in the site config (the host segment)")


def boot_server(config: Config) -> IPv4Address:
    """This instance's Zone 0 address (the first zone-0 network's ``boot_server``): where a BMC this
    instance talks to fetches from. Not for the policy, which must not depend on the instance."""
    for n in config.networks:
        if n.zone == 0 and n.boot_server is not None:
            return n.boot_server
    raise PolicyBuildError("no zone-0 network with a boot_server in the site config (relay target)")


def boot_servers(config: Config) -> tuple[IPv4Address, ...]:
    """Every bootsvc instance's Zone 0 address, sorted: the first zone-0 network with ``boot_servers``
    or a ``boot_server`` (one instance). The same in every instance whose config lists the same site."""
    for n in config.networks:
        if n.zone == 0 and n.boot_servers:
            return tuple(sorted(n.boot_servers))
        if n.zone == 0 and n.boot_server is not None:
            return (n.boot_server,)
    raise PolicyBuildError("no zone-0 network with boot_servers or a boot_server in the site config "
                           "(relay target)")


def _flows(config: Config, servers: Sequence[IPv4Address], tenant: str) -> list[dict[str, Any]]:
    flows: list[dict[str, Any]] = []
    for server in servers:  # a host may boot from any instance (the one whose DHCP answered it)
        dst = str(IPv4Network(f"{server}/32"))
        flows += [
            {"zone": 0, "proto": "udp", "dst": dst, "dport": 69},  # TFTP (RFC 1350) for the NBP
            {"zone": 0, "proto": "tcp", "dst": dst, "dport": config.boot.http_port},  # iPXE script, images
        ]
    # Zone 2: the site's egress for every tenant, plus the tenant's own (config tenants[].egress)
    own = next((t.egress for t in config.tenants if t.name == tenant), ())
    for item in (*config.orchestration.egress, *own):
        parts = item.split(":")
        flows.append({"zone": 2, "proto": parts[0], "dst": parts[1],
                      "dport": None if parts[0] == "icmp" else (int(parts[2]) if len(parts) == 3 else None)})
    return [f for f in flows if f["proto"] == "icmp" or f["dport"] is not None]


def evpn_asn(config: Config, node_id: int) -> int | None:
    """The DPU's BGP ASN, or None when the site runs no EVPN (static peer lists)."""
    f = config.fabric
    if not f.evpn:
        return None
    if f.asn is not None:
        asn = f.asn + node_id if f.asn_per_dpu else f.asn
        if asn > 2**32 - 1:
            raise PolicyBuildError(f"fabric.asn {f.asn} + DPU node id {node_id} exceeds the 4-byte ASN range")
        return asn
    return config.orchestration.evpn_asn  # older single-ASN setting


def _evpn(config: Config, node_id: int, vtep: IPv4Address) -> dict[str, Any] | None:
    asn = evpn_asn(config, node_id)
    if asn is None:
        return None
    f = config.fabric
    uplinks = f.uplinks if config.orchestration.evpn_asn is None or f.asn is not None \
        else config.orchestration.evpn_uplinks
    return {"asn": asn, "uplinks": list(uplinks), "vtep": str(vtep), "route_target_asn": f.route_target_asn}


def version_of(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def build(config: Config, *, node_id: int, node_name: str, serial: str, tenant: TenantInfo | None,
          peers: Sequence[Peer] = ()) -> dict[str, Any]:
    """The policy document (with ``version``) for one DPU. ``tenant=None``: isolate the host port."""
    o = config.orchestration
    doc: dict[str, Any] = {"schema": SCHEMA, "version": "", "node": node_name}
    evpn = None
    if evpn_asn(config, node_id) is not None and (tenant is not None or o.vtep_network is not None):
        evpn = _evpn(config, node_id, vtep_for(config, node_id))
    if tenant is None:
        # the underlay (BGP sessions, VTEP) stays up without a tenant: only the tenant VRF goes
        doc.update({"tenant": None, "host_port": o.host_port, **({"evpn": evpn} if evpn else {})})
        doc["version"] = version_of(doc)
        return doc
    net = tenant_network(config, tenant.vrf)
    servers = boot_servers(config)
    vtep = vtep_for(config, node_id)
    own = [p for p in peers if p.vtep == str(vtep)]
    assert net.gateway is not None  # tenant_network guarantees it
    doc.update({
        "tenant": tenant.name,
        "vrf_name": tenant.vrf,
        "vrf_table": vrf_table(tenant),
        "l3vni": tenant.l3vni,
        "vtep": str(vtep),
        "vxlan_port": o.vxlan_port,
        "host_port": o.host_port,
        "host_gateway": f"{net.gateway}/{net.cidr.prefixlen}",
        "flows": _flows(config, servers, tenant.name),
        "relay": {
            "server": str(servers[0]),  # schema 1 as first published: agents that read only this one
            "servers": [str(x) for x in servers],  # the relay forwards to each (docs/agent-api.md)
            "giaddr": None,
            "link_selection": str(net.cidr.network_address),
            "server_id_override": str(net.gateway),
            "vss_vrf": tenant.vrf,
            "circuit_id": o.host_port,
            "remote_id": serial,
        },
        "ra": o.router_advertisements,
        # EVPN: the other DPUs come from BGP; only this DPU's own host addresses (Type-5 exports)
        "peers": [] if evpn else [{"vtep": p.vtep, "prefixes": list(p.prefixes)}
                                  for p in sorted(peers, key=lambda p: IPv4Address(p.vtep))
                                  if p.vtep != str(vtep)],
        "host_prefixes": sorted({x for p in own for x in p.prefixes}, key=lambda x: IPv4Network(x)),
        "evpn": evpn,
    })
    doc["version"] = version_of(doc)
    return doc
