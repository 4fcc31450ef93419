"""FRR configuration for the DPU's place in the EVPN fabric (docs/fabric.md). Pure text, no I/O.

Owns: the whole ``frr.conf`` the agent hands to FRR when the policy carries an ``evpn`` block, and
the block-wise difference between two rendered configs (what a tenant move withdraws and announces).
:mod:`bootsvc.agent.frrd` loads it into the running daemons and reads their state back.

What is rendered, and why:
* BGP unnumbered on every uplink (``neighbor <if> interface``, peer-group ``remote-as external``):
  IPv6 link-local sessions learned from router advertisements, carrying IPv4 routes with IPv6 next
  hops (RFC 8950, which obsoletes RFC 5549); no per-link IPv4 addressing.
* The VTEP ``/32`` in the underlay (``network`` in the default instance's IPv4 unicast family), so
  every other VTEP can reach this one's VXLAN tunnels (RFC 8365 §5).
* ``advertise-all-vni`` in the default instance: zebra hands BGP every local VNI, including the
  tenant's L3VNI.
* One VRF per tenant with ``vni <L3VNI>`` (what makes zebra treat the VNI as an L3VNI, FRR user guide
  "EVPN" / "Configuration of L3VNI"), and a BGP instance in it whose ``l2vpn evpn`` family has
  ``advertise ipv4 unicast``: the VRF's IPv4 routes are exported as EVPN IP Prefix (Type-5) routes
  (RFC 9136 §3). Exported are exactly the host's own addresses (``host_prefixes``, host /32s): the
  tenant subnet is an anycast gateway present on every DPU of the tenant (RFC 9135 §4), so exporting
  it would draw the whole subnet to every DPU. ``no bgp network import-check``: the /32 has no RIB
  entry of its own (the host sits behind the connected subnet), and the agent reports whether it was
  really advertised (:mod:`bootsvc.agent.fabric_health`).
* Route targets: by default FRR's auto-derived ``ASN:VNI``; with per-DPU ASNs an eBGP fabric still
  imports them, because FRR matches auto-derived import RTs on the VNI alone (FRR user guide "EVPN
  route targets"; NVIDIA Cumulus Linux "EVPN Enhancements", eBGP). A site that sets
  ``fabric.route_target_asn`` gets explicit ``route-target import/export <asn>:<L3VNI>`` (strict match).

``frr defaults datacenter`` (keepalive 3 s / hold 9 s, no ``ebgp-requires-policy``) is the profile
FRR's own docs recommend for data-centre eBGP; it can only take effect before the first ``router
bgp``, so it is the file's first command.
"""

from __future__ import annotations

from dataclasses import dataclass

from bootsvc.agent.policy import Policy

HEADER = "! rendered by bootsvc-agent from its policy; applied with frr-reload.py - do not edit"
PEER_GROUP = "fabric"


def render(policy: Policy) -> str | None:
    """frr.conf text for ``policy``, or None when the policy has no ``evpn`` block (FRR not ours)."""
    e = policy.evpn
    t = policy.tenant
    if e is None:
        return None
    vtep = e.vtep or (t.vtep if t is not None else None)
    if vtep is None:  # parse() refuses this; kept for type narrowing
        return None
    lines = [HEADER, f"! policy {policy.version}" + (f", tenant {t.name}" if t else ", no tenant"),
             "frr defaults datacenter", "!"]
    if t is not None:
        lines += [f"vrf {t.vrf_name}", f" vni {t.l3vni}", "exit-vrf", "!"]
    lines += [
        f"router bgp {e.asn}",
        f" bgp router-id {vtep}",
        f" neighbor {PEER_GROUP} peer-group",
        f" neighbor {PEER_GROUP} remote-as external",
    ]
    lines += [f" neighbor {u} interface peer-group {PEER_GROUP}" for u in e.uplinks]
    lines += [
        " !",
        " address-family ipv4 unicast",
        f"  network {vtep}/32",
        " exit-address-family",
        " !",
        " address-family l2vpn evpn",
        f"  neighbor {PEER_GROUP} activate",
        "  advertise-all-vni",
        " exit-address-family",
        "exit",
        "!",
    ]
    if t is not None:
        lines += [
            f"router bgp {e.asn} vrf {t.vrf_name}",
            f" bgp router-id {vtep}",
            " no bgp network import-check",
            " !",
        ]
        if t.host_prefixes:
            # (FRR's running config omits an empty address-family: rendering one would read back as
            # not taken; a host without an address is announced nowhere, the gate says so)
            lines += [" address-family ipv4 unicast", *(f"  network {p}" for p in t.host_prefixes),
                      " exit-address-family", " !"]
        lines += [
            " address-family l2vpn evpn",
            "  advertise ipv4 unicast",
        ]
        if e.route_target_asn is not None:
            rt = f"{e.route_target_asn}:{t.l3vni}"
            lines += [f"  route-target import {rt}", f"  route-target export {rt}"]
        lines += [" exit-address-family", "exit", "!"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Change:
    """One line added (``+``) or removed (``-``) inside a top-level block (``context``)."""

    op: str
    context: str
    line: str

    def __str__(self) -> str:
        return f"{self.op} [{self.context}] {self.line}".rstrip()


def blocks(text: str) -> dict[str, list[str]]:
    """Top-level blocks of a rendered config: context line -> its (stripped) body lines. Comments and
    ``!`` separators are dropped; single-line commands form their own block with an empty body."""
    out: dict[str, list[str]] = {}
    ctx: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        s = line.strip()
        if not s or s.startswith("!"):
            continue
        if not line.startswith(" "):
            if s in ("exit", "exit-vrf"):
                ctx = None
                continue
            ctx = s
            out.setdefault(ctx, [])
            continue
        if ctx is None:
            continue
        if s in ("exit", "exit-address-family"):
            continue
        out[ctx].append(s)
    return out


def diff(old: str | None, new: str | None) -> list[Change]:
    """What loading ``new`` over ``old`` changes, block by block (deterministic order): a block that
    disappears is one ``-`` (FRR removes it whole: ``no router bgp ... vrf X``, ``no vrf X``)."""
    a, b = blocks(old or ""), blocks(new or "")
    out: list[Change] = []
    for ctx in a:
        if ctx not in b:
            out.append(Change("-", ctx, ""))
    for ctx, body in b.items():
        if ctx not in a:
            out.append(Change("+", ctx, ""))
            out += [Change("+", ctx, ln) for ln in body]
            continue
        old_body = a[ctx]
        out += [Change("-", ctx, ln) for ln in old_body if ln not in body]
        out += [Change("+", ctx, ln) for ln in body if ln not in old_body]
    return out


def missing(rendered: str, running: str) -> list[str]:
    """What of ``rendered`` the running config lacks, as ``[context] line`` strings (empty: FRR runs
    it all). vtysh skips daemons that are not running without failing (a DPU image whose FRR has
    ``bgpd=no`` in /etc/frr/daemons "accepts" every BGP line), so a load is checked against
    ``show running-config`` afterwards."""
    want, have = blocks(rendered), blocks(running)
    out: list[str] = []
    for ctx, body in want.items():
        if ctx.startswith("frr defaults"):
            continue  # shown only when it differs from the build's default profile
        if ctx not in have:
            out.append(f"[{ctx}]")
            continue
        out += [f"[{ctx}] {ln}" for ln in body if ln not in have[ctx]]
    return out
