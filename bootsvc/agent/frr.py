"""FRR configuration for a tenant's EVPN type-5 routing (domain brief §6.1-§6.3). Pure text rendering.

Owns: the ``frr.conf`` fragment a DPU needs when the fabric runs BGP EVPN instead of the policy's
static ``peers`` list: BGP unnumbered on the uplinks (RFC 5549/8950 next hops), the VTEP /32 in the
underlay, ``advertise-all-vni``, and a per-VRF BGP instance that exports the host segment as type-5
routes (RFC 9136). ``vni N`` under ``vrf`` is what makes the VNI an L3VNI for zebra; type-5 export
needs ``advertise ipv4 unicast`` in the VRF instance and the route in the VRF RIB (``redistribute
connected``). Route targets stay FRR's defaults (export ASN:VNI, import ``*:VNI``), which work in
eBGP fabrics with one ASN per leaf/DPU.

Not done here: running FRR (``frr-reload.py`` / vtysh) — the agent renders, a site's FRR integration
loads it. FRR needs kernel VRF devices (``mode vrf``); it cannot drive the ``table`` fallback.
"""

from __future__ import annotations

from bootsvc.agent.policy import Policy


def render(policy: Policy) -> str | None:
    """frr.conf text for ``policy``, or None when the policy has no tenant or no ``evpn`` block."""
    t = policy.tenant
    if t is None or t.evpn is None:
        return None
    e = t.evpn
    lines = [
        "! rendered by bootsvc-agent; do not edit",
        f"! policy {policy.version}, tenant {t.name}",
        "frr defaults datacenter",
        "!",
        f"vrf {t.vrf_name}",
        f" vni {t.l3vni}",
        "exit-vrf",
        "!",
        f"router bgp {e.asn}",
        f" bgp router-id {t.vtep}",
        " neighbor fabric peer-group",
        " neighbor fabric remote-as external",
    ]
    lines += [f" neighbor {u} interface peer-group fabric" for u in e.uplinks]
    lines += [
        " address-family ipv4 unicast",
        f"  network {t.vtep}/32",
        " exit-address-family",
        " address-family l2vpn evpn",
        "  neighbor fabric activate",
        "  advertise-all-vni",
        " exit-address-family",
        "exit",
        "!",
        f"router bgp {e.asn} vrf {t.vrf_name}",
        f" bgp router-id {t.vtep}",
        " address-family ipv4 unicast",
        "  redistribute connected",
        " exit-address-family",
        " address-family l2vpn evpn",
        "  advertise ipv4 unicast",
        " exit-address-family",
        "exit",
        "!",
    ]
    return "\n".join(lines) + "\n"
