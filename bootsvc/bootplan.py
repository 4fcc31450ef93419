"""Boot plan: which client is asking (firmware PXE, UEFI HTTP boot, iPXE, an OS) and what the DHCP
reply must tell it to boot next.

Owns: client classification from DHCP options (RFC 4578 §2.1-2.3,
ipxe.org/cfg/platform, UEFI 2.x §24.7 HTTP Boot) and the boot-related reply
fields (file/option 67, siaddr/option 66, option 60 echo, iPXE option 175, hostname). Pure: no I/O,
no database; the node view comes from ``bootsvc.inventory``. What the iPXE *script* says (install,
local boot, discovery) is decided by the HTTP boot endpoint, so the DHCP side only has to get each
client to the next stage:

    firmware PXE  --TFTP NBP (undionly.kpxe / snponly.efi / arm64 GRUB)-->  iPXE or GRUB
    UEFI HTTP     --absolute http:// URL of the same NBP-->                  iPXE or GRUB
    iPXE          --http://<boot_server>:<port>/boot/ipxe?mac=<mac>-->       the node's script

iPXE detection keys on option 77 == ``iPXE`` or the presence of option 175, never on option 60
(iPXE itself sends ``PXEClient:Arch:...``), which breaks the chainload loop
(ipxe.org/howto/chainloading, ipxe.org/howto/dhcpd).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bootsvc.dhcp.packet import Packet
    from bootsvc.views import NodeView

__all__ = ["IPXE_NO_PXEDHCP", "BootPlan", "ClientKind", "client_kind", "plan"]

# IANA processor architecture types (RFC 4578 §2.1 as corrected by erratum 4624)
ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_X64 = 7
ARCH_EFI_BC = 9  # EBC; firmware that predates the erratum sends 9 for x64
ARCH_EFI_ARM64 = 11
ARCH_HTTP_X64 = 16
ARCH_HTTP_ARM64 = 19

# option 175 payload: sub-option 176 (no-pxedhcp) = 1, so iPXE does not wait ~2 s for ProxyDHCP
IPXE_NO_PXEDHCP = b"\xb0\x01\x01"


class ClientKind(StrEnum):
    IPXE = "ipxe"
    PXE_BIOS = "pxe-bios"
    PXE_EFI_X64 = "pxe-efi-x64"
    PXE_EFI_ARM64 = "pxe-efi-arm64"
    HTTP_X64 = "http-x64"
    HTTP_ARM64 = "http-arm64"
    PXE_OTHER = "pxe-other"  # a PXE client whose architecture we have no NBP for
    OS = "os"  # anything else: installed OS, installer, BMC, udhcpc, dhclient


@dataclass(frozen=True, slots=True)
class BootPlan:
    """Boot-related fields of a DHCP reply. ``None`` = leave the field out."""

    kind: ClientKind
    filename: str | None = None  # BOOTP file field and option 67
    next_server: str | None = None  # siaddr and option 66 (TFTP server)
    vendor_class: str | None = None  # option 60 echo ("HTTPClient" for UEFI HTTP boot)
    ipxe_options: bytes | None = None  # option 175 payload
    hostname: str | None = None  # option 12


def client_kind(packet: Packet) -> ClientKind:
    """Classify a DHCP request by its options (DISCOVER, REQUEST or INFORM alike)."""
    opts = packet.options
    if 175 in opts or b"iPXE" in packet.user_classes:
        return ClientKind.IPXE
    vc = opts.get(60, b"")
    arch = packet.arch
    if vc.startswith(b"HTTPClient"):
        if arch in (ARCH_HTTP_ARM64, ARCH_EFI_ARM64):
            return ClientKind.HTTP_ARM64
        return ClientKind.HTTP_X64
    # BlueField UEFI PXE identifies as NVIDIA/BF/PXE (NVIDIA BlueField BMC docs, Installation for DPU
    # Mode), without "PXEClient"
    is_bf_pxe = vc.startswith(b"NVIDIA/BF/PXE")
    if vc.startswith(b"PXEClient") or is_bf_pxe:
        if arch is None and is_bf_pxe:
            arch = ARCH_EFI_ARM64
        if arch == ARCH_BIOS:
            return ClientKind.PXE_BIOS
        if arch in (ARCH_EFI_X64, ARCH_EFI_BC):
            return ClientKind.PXE_EFI_X64
        if arch == ARCH_EFI_ARM64:
            return ClientKind.PXE_EFI_ARM64
        return ClientKind.PXE_OTHER
    return ClientKind.OS


def _nbp(kind: ClientKind, arm64_nbp: str) -> str | None:
    if kind is ClientKind.PXE_BIOS:
        return "undionly.kpxe"
    if kind in (ClientKind.PXE_EFI_X64, ClientKind.HTTP_X64):
        return "snponly.efi"
    if kind in (ClientKind.PXE_EFI_ARM64, ClientKind.HTTP_ARM64):
        return arm64_nbp
    return None


def plan(
    kind: ClientKind,
    *,
    mac: str,
    boot_server: str | None,
    http_port: int,
    node: NodeView | None,
    arm64_nbp: str = "arm64/grubnetaa64.efi",
    http_nbp_prefix: str = "/boot/nbp/",
) -> BootPlan:
    """What to boot next. ``boot_server`` is the address clients of this network reach bootsvc at
    (None: no boot service on this network -> address only). ``node`` None = unknown client (only
    reached when the site enabled discovery; the boot endpoint then serves the discovery script)."""
    hostname = node.name if node is not None else None
    if boot_server is None or kind is ClientKind.OS or kind is ClientKind.PXE_OTHER:
        return BootPlan(kind=kind, hostname=hostname)
    base = f"http://{boot_server}:{http_port}"
    if kind is ClientKind.IPXE:
        return BootPlan(kind=kind, filename=f"{base}/boot/ipxe?mac={mac}", ipxe_options=IPXE_NO_PXEDHCP,
                        hostname=hostname)
    nbp = _nbp(kind, arm64_nbp)
    if kind in (ClientKind.HTTP_X64, ClientKind.HTTP_ARM64):
        # UEFI HTTP boot: absolute URL + echo "HTTPClient" or EDK2 ignores the offer (UEFI 2.x §24.7;
        # EDK2 NetworkPkg/HttpBootDxe)
        return BootPlan(kind=kind, filename=f"{base}{http_nbp_prefix}{nbp}", vendor_class="HTTPClient",
                        hostname=hostname)
    return BootPlan(kind=kind, filename=nbp, next_server=boot_server, hostname=hostname)
