"""Evidence for the fabric e2e test: VXLAN packets out of a pcap, Type-5 routes out of vtysh JSON, and
the printed summary. Pure (files in, data out); the lab's commands and captures are run by the test.

VXLAN (RFC 7348 §5): UDP to port 4789 carrying an 8-byte header - flags (the I bit, 0x08, says the
VNI is valid), 24 reserved bits, the 24-bit VNI, 8 reserved bits - then the tenant's Ethernet frame.
Parsed here by hand from the UDP payload (scapy only reads the pcap and decodes the inner frame), so a
packet scapy would not bind to its VXLAN layer (another port, bad flags) is reported, not guessed.

Type-5 routes (RFC 9136 §3): ``show bgp l2vpn evpn route type prefix json`` (FRR 8.4, shapes in
tests/data/frr/) keys routes by RD and ``[5]:[<ethtag>]:[<len>]:[<ip>]``; each path carries its route
targets in ``extendedCommunity.string`` (``RT:<asn>:<vni>``), its next hop (the originating VTEP) and
``peerId`` (``(unspec)`` when originated or re-exported locally).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

VXLAN_PORT = 4789  # IANA, RFC 7348 §5
VXLAN_FLAG_I = 0x08


@dataclass(frozen=True)
class VxlanPacket:
    outer_src: str
    outer_dst: str
    vni: int
    inner_src: str | None  # inner IPv4 source (None: not IPv4, e.g. ARP)
    inner_dst: str | None
    inner_proto: str  # "icmp echo-request", "icmp echo-reply", "icmp", "tcp", "udp", "arp", "ipv6", "other"


@dataclass(frozen=True)
class Malformed:
    outer_src: str
    outer_dst: str
    why: str


def parse_vxlan_header(payload: bytes) -> tuple[int, bytes]:
    """(VNI, inner frame) from a VXLAN UDP payload; ValueError if it is not one (RFC 7348 §5)."""
    if len(payload) < 8 + 14:
        raise ValueError(f"{len(payload)} bytes: shorter than a VXLAN header and an Ethernet header")
    flags, vni_word = struct.unpack("!B3xI", payload[:8])
    if not flags & VXLAN_FLAG_I:
        raise ValueError(f"flags 0x{flags:02x}: the I bit (VNI valid) is not set")
    return vni_word >> 8, payload[8:]


def _inner(frame: bytes) -> tuple[str | None, str | None, str]:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether

    eth = Ether(frame)
    if ARP in eth:
        return eth[ARP].psrc, eth[ARP].pdst, "arp"
    if IPv6 in eth:
        return str(eth[IPv6].src), str(eth[IPv6].dst), "ipv6"
    if IP not in eth:
        return None, None, "other"
    ip = eth[IP]
    if ICMP in ip:
        kind = {8: "icmp echo-request", 0: "icmp echo-reply"}.get(int(ip[ICMP].type), "icmp")
    elif TCP in ip:
        kind = "tcp"
    elif UDP in ip:
        kind = "udp"
    else:
        kind = "other"
    return str(ip.src), str(ip.dst), kind


def vxlan_packets(pcap: Path, port: int = VXLAN_PORT) -> tuple[list[VxlanPacket], list[Malformed]]:
    """Every IPv4/UDP packet to ``port`` in ``pcap``, decoded; the undecodable ones named, not dropped."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import PcapReader

    good: list[VxlanPacket] = []
    bad: list[Malformed] = []
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            if IP not in pkt or UDP not in pkt or int(pkt[UDP].dport) != port:
                continue
            src, dst = str(pkt[IP].src), str(pkt[IP].dst)
            try:
                vni, frame = parse_vxlan_header(bytes(pkt[UDP].payload))
            except ValueError as e:
                bad.append(Malformed(src, dst, str(e)))
                continue
            isrc, idst, kind = _inner(frame)
            good.append(VxlanPacket(src, dst, vni, isrc, idst, kind))
    return good, bad


def flows(packets: Iterable[VxlanPacket]) -> Counter[tuple[int, str, str, str | None, str | None, str]]:
    """Packets per (VNI, outer src, outer dst, inner src, inner dst, inner protocol)."""
    return Counter((p.vni, p.outer_src, p.outer_dst, p.inner_src, p.inner_dst, p.inner_proto) for p in packets)


def describe(packets: Iterable[VxlanPacket]) -> list[str]:
    """One line per flow, for the test's printed evidence."""
    return [f"VNI {vni}: VTEP {osrc} -> {odst}: {isrc} -> {idst} {kind} x{n}"
            for (vni, osrc, odst, isrc, idst, kind), n in sorted(flows(packets).items(), key=str)]


# ------------------------------------------------------------------------------------------ Type-5 routes
@dataclass(frozen=True)
class Type5Path:
    prefix: str
    rd: str
    nexthop: str
    route_targets: tuple[str, ...]  # "65012:4001"
    learned: bool  # from a BGP peer (else originated or re-exported here)
    as_path: str


def type5_paths(routes: Any) -> list[Type5Path]:
    """Every IPv4 Type-5 path in ``show bgp l2vpn evpn route type prefix json``."""
    out: list[Type5Path] = []
    if not isinstance(routes, Mapping):
        return out
    for rd, body in routes.items():
        if not isinstance(body, Mapping):
            continue
        for key, route in body.items():
            if not (isinstance(route, Mapping) and str(key).startswith("[5]:")):
                continue
            for group in route.get("paths") or []:
                for path in group if isinstance(group, list) else [group]:
                    if not isinstance(path, Mapping):
                        continue
                    try:
                        pfx = str(IPv4Network(f"{path.get('ip')}/{path.get('ipLen')}", strict=False))
                    except ValueError:
                        continue
                    hops = [h.get("ip") for h in path.get("nexthops") or [] if isinstance(h, Mapping)]
                    ext = str((path.get("extendedCommunity") or {}).get("string") or "")
                    rts = tuple(w[3:] for w in ext.split() if w.startswith("RT:"))
                    out.append(Type5Path(pfx, str(rd), str(hops[0]) if hops else "?", rts,
                                         path.get("peerId") not in (None, "(unspec)"), str(path.get("path") or "")))
    return out


def learned(routes: Any, prefix: str, *, vni: int | None = None) -> list[Type5Path]:
    """The paths for ``prefix`` learned from a peer (with ``vni``: only those whose route target names that
    VNI, FRR's auto RT ``ASN:VNI``)."""
    return [p for p in type5_paths(routes) if p.prefix == prefix and p.learned
            and (vni is None or any(rt.split(":")[-1] == str(vni) for rt in p.route_targets))]


def routes_table(routes: Any) -> list[str]:
    """The Type-5 table as printed evidence: one line per path."""
    return [f"{p.prefix} RD {p.rd} via {p.nexthop} RT {','.join(p.route_targets) or '-'} "
            f"{'learned, AS path ' + p.as_path if p.learned else 'local'}"
            for p in sorted(type5_paths(routes), key=lambda p: (IPv4Network(p.prefix), p.rd))]


# ------------------------------------------------------------------------------------------ /proc on the DPU
def proc_stat_fields(line: str) -> list[str]:
    """Fields 3.. of a ``/proc/<pid>/stat`` line (after ``(comm)``, which may hold spaces; proc(5))."""
    rest = line.rsplit(")", 1)
    if len(rest) != 2:
        raise ValueError(f"not a /proc/<pid>/stat line: {line[:80]!r}")
    return rest[1].split()


def cpu_seconds(stat_line: str, clk_tck: int) -> float:
    """utime + stime of a process (proc(5) fields 14 and 15) in seconds."""
    f = proc_stat_fields(stat_line)
    return (int(f[11]) + int(f[12])) / clk_tck


def start_epoch(stat_line: str, btime: int, clk_tck: int) -> float:
    """When a process started, in seconds since the epoch: boot time (``btime`` in /proc/stat) plus its
    ``starttime`` (proc(5) field 22, clock ticks after boot)."""
    return btime + int(proc_stat_fields(stat_line)[19]) / clk_tck
