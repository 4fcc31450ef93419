"""The DPU policy agent (``bootsvc-agent``): runs on a DPU's own Linux, pulls its tenant policy from
bootsvc over Zone 0, programs VRF/VXLAN/nftables, relays its host's DHCP and sends IPv6 RAs.

Stdlib only at runtime (plus ``bootsvc.dhcp.packet``, itself pure stdlib) so it installs as a wheel
on a small Debian with python3, iproute2 and nftables. Contract: ``docs/agent-api.md``.
"""

AGENT_VERSION = "0.1.0"
