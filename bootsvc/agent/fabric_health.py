"""The DPU's fabric report: FRR's ``vtysh ... json`` answers -> what bootsvc gates a host's boot on.

Owns: parsing the JSON FRR prints (shapes as printed by FRR 8.4, captured in ``tests/data/frr/``;
producers in the FRRouting/frr tree: ``bgpd/bgp_vty.c`` ``bgp_show_summary`` for ``show bgp [vrf
all] summary json``, ``bgpd/bgp_evpn_vty.c`` for ``show bgp l2vpn evpn route type prefix json``,
``zebra/zebra_vxlan.c`` for ``show evpn vni json`` and ``show vrf vni json``) into one small,
schema-stable dict the agent sends in its health (``fabric``). Pure: no I/O; unknown or malformed
input becomes a named error in the report, never an exception.

The report (``docs/fabric.md``)::

    {"uplinks": {"p0": {"state": "Established", "up_ms": 9000, "pfx_rcvd": 3, "evpn_pfx_rcvd": 2}},
     "l3vni": {"vni": 5001, "vrf": "vrf-a", "state": "Up", "svi": "babr5001", "vxlan": "bavx5001"},
     "host_prefixes": {"10.0.0.101/32": true},
     "type5": {"local": ["10.0.0.101/32"], "remote": [["10.0.0.102/32", "10.255.0.12"]]},
     "vrf_routes": {"vrf-a": [["10.0.0.101/32", "0.0.0.0", "local"], ["10.0.0.102/32", "10.255.0.12", "evpn"]]},
     "vrf_instances": ["default", "vrf-a"], "errors": []}

Why these commands: ``show bgp summary json`` keys peers of BGP unnumbered sessions by interface
name (``idType: interface``), so each uplink's state is read directly; ``show vrf vni json`` is the
one that says whether zebra considers the L3VNI *Up* (it needs the VXLAN device and its SVI bridge in
the VRF; ``show evpn vni json`` lists the VNI with its type but not that state); the Type-5 table
shows whether the host's prefix was really originated (locally originated paths have no peer:
``peerId`` ``(unspec)``) and which remote prefixes this DPU learned; ``show bgp vrf <vrf> ipv4
unicast json`` shows which of them the tenant VRF imported (route targets matched), i.e. where its
traffic really goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network
from typing import Any

ESTABLISHED = "Established"
# FRR's JSON keys per address family in "show bgp summary json" (bgp_vty.c: get_afi_safi_json_str)
AF_IPV4 = "ipv4Unicast"
AF_EVPN = "l2VpnEvpn"
MAX_REMOTE = 256  # remote Type-5 prefixes kept in the report (the UI shows them; health stays small)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def uplinks(summary: Any, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per uplink: BGP state (``Idle``/``Connect``/``Active``/``OpenSent``/``Established`` ...),
    uptime and prefixes received, from ``show bgp summary json``. An uplink FRR does not list is
    ``"missing"`` (not configured, or the interface is unknown to FRR)."""
    afs = _dict(summary)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        v4 = _dict(_dict(_dict(afs.get(AF_IPV4)).get("peers")).get(name))
        ev = _dict(_dict(_dict(afs.get(AF_EVPN)).get("peers")).get(name))
        peer = ev or v4
        if not peer:
            out[name] = {"state": "missing"}
            continue
        state = str(peer.get("state") or "unknown")[:32]
        entry: dict[str, Any] = {"state": state}
        if state == ESTABLISHED:
            up = peer.get("peerUptimeMsec")
            entry["up_ms"] = up if isinstance(up, int) and not isinstance(up, bool) else None
        for key, src in (("pfx_rcvd", v4), ("evpn_pfx_rcvd", ev)):
            n = src.get("pfxRcd")
            if isinstance(n, int) and not isinstance(n, bool):
                entry[key] = n
        if not ev:
            entry["evpn"] = False  # the session carries no l2vpn evpn family: no Type-5 over it
        out[name] = entry
    return out


def l3vni(vrf_vni: Any, vrf: str | None, vni: int | None) -> dict[str, Any] | None:
    """The tenant VRF's L3VNI from ``show vrf vni json`` (``{"vrfs": [{"vrf", "vni", "state",
    "vxlanIntf", "sviIntf", "routerMac"}]}``); None without a tenant."""
    if vrf is None or vni is None:
        return None
    for v in _dict(vrf_vni).get("vrfs") or []:
        if isinstance(v, dict) and v.get("vrf") == vrf:
            return {"vni": v.get("vni"), "vrf": vrf, "state": str(v.get("state") or "unknown")[:16],
                    "svi": _iface(v.get("sviIntf")), "vxlan": _iface(v.get("vxlanIntf"))}
    return {"vni": vni, "vrf": vrf, "state": "missing", "svi": None, "vxlan": None}


def _iface(v: Any) -> str | None:
    return None if v in (None, "None", "") else str(v)[:16]


def type5(routes: Any) -> tuple[list[str], list[list[str]]]:
    """Local and remote Type-5 prefixes from ``show bgp l2vpn evpn route type prefix json``:
    ``{"<RD>": {"rd": ..., "[5]:[0]:[24]:[10.0.1.0]": {"paths": [[{...}]]}}, "numPrefix": N}``.
    A path is local when FRR has no peer for it (``peerId`` ``(unspec)``) and its AS path is empty;
    remote ones (learned from a peer) are listed
    with their next hop (the originating VTEP)."""
    local: set[str] = set()
    remote: set[tuple[str, str]] = set()
    for rd, body in _dict(routes).items():
        if not isinstance(body, dict) or rd in ("numPrefix", "numPaths"):
            continue
        for key, route in body.items():
            if not isinstance(route, dict) or not key.startswith("[5]:"):
                continue
            for group in route.get("paths") or []:
                for path in group if isinstance(group, list) else [group]:
                    if not isinstance(path, dict) or path.get("routeType") not in (5, None):
                        continue
                    try:
                        pfx = str(IPv4Network(f"{path.get('ip')}/{path.get('ipLen')}", strict=False))
                    except ValueError:
                        continue  # IPv6 Type-5 or garbage: not ours to judge
                    if path.get("peerId") in (None, "(unspec)"):
                        # originated here: no peer and an empty AS path (a VRF's routes learned
                        # over BGP and re-exported also have no peer, but carry their AS path)
                        if not path.get("path"):
                            local.add(pfx)
                    else:
                        hops = [h.get("ip") for h in path.get("nexthops") or [] if isinstance(h, dict)]
                        remote.add((pfx, str(hops[0]) if hops and hops[0] else "?"))
    rem = sorted(remote, key=lambda r: (IPv4Network(r[0]), r[1]))[:MAX_REMOTE]
    return sorted(local, key=IPv4Network), [list(r) for r in rem]


def vrf_routes(table: Any) -> list[list[str]]:
    """The tenant VRF's BGP IPv4 table (``show bgp vrf <vrf> ipv4 unicast json``: ``{"vrfName", "routes":
    {"<prefix>": [path, ...]}}``) as ``[prefix, next hop, source]``, best path first per prefix: what the
    DPU really forwards the tenant's traffic on. ``source``: ``local`` (originated here: empty AS path),
    ``evpn`` (imported from a Type-5 route: an IPv4 next hop, the originating VTEP - FRR prints
    ``announceNexthopSelf`` on those), ``bgp`` (learned over a session of this VRF: IPv6 link-local
    next hop, RFC 8950)."""
    out: list[list[str]] = []
    routes = _dict(_dict(table).get("routes"))
    for pfx, paths in routes.items():
        if not isinstance(paths, list):
            continue
        try:
            net = str(IPv4Network(pfx, strict=False))
        except ValueError:
            continue
        ranked = sorted((p for p in paths if isinstance(p, dict)), key=lambda p: not p.get("bestpath"))
        for path in ranked[:1]:
            hops = [h for h in path.get("nexthops") or [] if isinstance(h, dict)]
            hop = hops[0] if hops else {}
            if not path.get("path"):
                src = "local"
            elif hop.get("afi") == "ipv4":
                src = "evpn"
            else:
                src = "bgp"
            out.append([net, str(hop.get("ip") or "?")[:45], src])
    return sorted(out, key=lambda r: IPv4Network(r[0]))[:MAX_REMOTE]


def vrf_instances(vrf_summary: Any) -> list[str]:
    """BGP instances present (``show bgp vrf all summary json``: one key per VRF)."""
    return sorted(k for k, v in _dict(vrf_summary).items() if isinstance(v, dict))[:64]


def report(outputs: Mapping[str, Any], *, uplink_names: tuple[str, ...], vrf: str | None,
           vni: int | None, host_prefixes: tuple[str, ...], errors: list[str] | None = None) -> dict[str, Any]:
    """The fabric report from the raw JSON answers (keys: ``summary``, ``vrf_summary``, ``vrf_vni``,
    ``type5``, ``vrf_routes`` - the tenant VRF's table; a missing key = that command failed, named in
    ``errors``)."""
    errs = list(errors or [])
    local, remote = type5(outputs.get("type5"))
    # a type-5 path originated in the tenant VRF is listed under its RD; one from another VRF of the
    # same DPU would be too - the tenant VRF holds only the host prefixes we put there
    return {
        "uplinks": uplinks(outputs.get("summary"), uplink_names),
        "l3vni": l3vni(outputs.get("vrf_vni"), vrf, vni),
        "host_prefixes": {p: p in local for p in host_prefixes},
        "type5": {"local": local, "remote": remote},
        "vrf_routes": {vrf: vrf_routes(outputs.get("vrf_routes"))} if vrf is not None else {},
        "vrf_instances": vrf_instances(outputs.get("vrf_summary")),
        "errors": [e[:300] for e in errs][:8],
    }
