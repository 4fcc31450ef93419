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
- ``relay``: bootsvc's Zone 0 address (a zone-0 network's ``boot_server``) as server; option 82
  link-selection = the tenant subnet (RFC 3527), server-id-override = the gateway (RFC 5107),
  VSS = the VRF name (RFC 6607), circuit-id = host port, remote-id = DPU serial (RFC 3046).
- ``flows``: the boot endpoints in Zone 0 (TFTP 69/udp, HTTP boot port) plus site egress (Zone 2).
- ``vtep``: ``orchestration.vtep_network`` + DPU node id (stable, unique per DPU).
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
    for n in config.networks:
        if n.zone == 0 and n.boot_server is not None:
            return n.boot_server
    raise PolicyBuildError("no zone-0 network with a boot_server in the site config (relay target)")


def _flows(config: Config, server: IPv4Address) -> list[dict[str, Any]]:
    dst = str(IPv4Network(f"{server}/32"))
    flows: list[dict[str, Any]] = [
        {"zone": 0, "proto": "udp", "dst": dst, "dport": 69},  # TFTP (RFC 1350) for the NBP
        {"zone": 0, "proto": "tcp", "dst": dst, "dport": config.boot.http_port},  # iPXE script, images
    ]
    for item in config.orchestration.egress:
        parts = item.split(":")
        flows.append({"zone": 2, "proto": parts[0], "dst": parts[1],
                      "dport": None if parts[0] == "icmp" else (int(parts[2]) if len(parts) == 3 else None)})
    return [f for f in flows if f["proto"] == "icmp" or f["dport"] is not None]


def version_of(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def build(config: Config, *, node_id: int, node_name: str, serial: str, tenant: TenantInfo | None,
          peers: Sequence[Peer] = ()) -> dict[str, Any]:
    """The policy document (with ``version``) for one DPU. ``tenant=None``: isolate the host port."""
    o = config.orchestration
    doc: dict[str, Any] = {"schema": SCHEMA, "version": "", "node": node_name}
    if tenant is None:
        doc.update({"tenant": None, "host_port": o.host_port})
        doc["version"] = version_of(doc)
        return doc
    net = tenant_network(config, tenant.vrf)
    server = boot_server(config)
    vtep = vtep_for(config, node_id)
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
        "flows": _flows(config, server),
        "relay": {
            "server": str(server),
            "giaddr": None,
            "link_selection": str(net.cidr.network_address),
            "server_id_override": str(net.gateway),
            "vss_vrf": tenant.vrf,
            "circuit_id": o.host_port,
            "remote_id": serial,
        },
        "ra": o.router_advertisements,
        "peers": [{"vtep": p.vtep, "prefixes": list(p.prefixes)}
                  for p in sorted(peers, key=lambda p: IPv4Address(p.vtep)) if p.vtep != str(vtep)],
        "evpn": {"asn": o.evpn_asn, "uplinks": list(o.evpn_uplinks)} if o.evpn_asn else None,
    })
    doc["version"] = version_of(doc)
    return doc
