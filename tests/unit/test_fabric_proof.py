"""The e2e test's evidence parsers (tests/e2e/fabric_proof.py) on real data: a VXLAN capture taken by
tests/integration/test_frr_netns.py (kernel VXLAN devices, VNIs 5001 and 5002, pings across) and the
Type-5 tables FRR 8.4.4 printed there; malformed packets built by hand are named, never guessed."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from fabric_proof import describe, flows, learned, parse_vxlan_header, routes_table, type5_paths, vxlan_packets

DATA = Path(__file__).resolve().parents[1] / "data" / "frr"


def cap(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


def test_vni_and_inner_packets_from_a_real_capture() -> None:
    pkts, bad = vxlan_packets(DATA / "vxlan_icmp_5001_5002.pcap")
    assert bad == []
    f = flows(pkts)
    assert f[(5001, "192.0.2.1", "192.0.2.2", "10.0.0.1", "10.0.0.2", "icmp echo-request")] == 2
    assert f[(5001, "192.0.2.2", "192.0.2.1", "10.0.0.2", "10.0.0.1", "icmp echo-reply")] == 2
    assert f[(5002, "192.0.2.1", "192.0.2.2", "10.9.0.1", "10.9.0.2", "icmp echo-request")] == 2
    assert {p.vni for p in pkts} == {5001, 5002}
    assert not [p for p in pkts if p.vni == 5002 and p.inner_src and p.inner_src.startswith("10.0.0.")]
    assert "VNI 5001: VTEP 192.0.2.1 -> 192.0.2.2: 10.0.0.1 -> 10.0.0.2 icmp echo-request x2" in describe(pkts)


def test_pcapng_as_the_lab_leaf_writes_it() -> None:
    """The lab's LeafCapture writes pcapng (dumpcap); the same capture in that format (editcap -F pcapng)
    reads the same."""
    assert vxlan_packets(DATA / "vxlan_icmp_5001_5002.pcapng") == vxlan_packets(DATA / "vxlan_icmp_5001_5002.pcap")


def test_malformed_vxlan_is_named(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    inner = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="10.0.0.2"))
    no_i = struct.pack("!B3xI", 0x00, 5001 << 8) + inner
    short = struct.pack("!B3xI", 0x08, 5001 << 8)
    good = struct.pack("!B3xI", 0x08, 0xABCDEF << 8) + inner
    outer = Ether() / IP(src="192.0.2.1", dst="192.0.2.2")
    wrpcap(str(tmp_path / "x.pcap"), [outer / UDP(sport=1, dport=4789) / Raw(p) for p in (no_i, short, good)]
           + [outer / UDP(sport=1, dport=53) / Raw(good)])  # another port: not VXLAN, not counted
    pkts, bad = vxlan_packets(tmp_path / "x.pcap")
    assert [p.vni for p in pkts] == [0xABCDEF]  # all 24 bits of the VNI
    assert [b.why for b in bad] == ["flags 0x00: the I bit (VNI valid) is not set",
                                    "8 bytes: shorter than a VXLAN header and an Ethernet header"]
    with pytest.raises(ValueError):
        parse_vxlan_header(b"")


def test_type5_paths_with_route_targets_from_real_frr() -> None:
    routes = cap("show_bgp_l2vpn_evpn_route_type_prefix")
    got = learned(routes, "10.77.0.2/32")
    assert got and all(p.nexthop == "10.255.0.12" and p.as_path == "65100 65012" for p in got)
    assert learned(routes, "10.77.0.2/32", vni=4001) == got and learned(routes, "10.77.0.2/32", vni=4002) == []
    assert learned(routes, "10.77.0.1/32") == []  # d1's own prefix: originated, not learned
    moved = cap("show_bgp_l2vpn_evpn_route_type_prefix_moved")  # after d2 moved it to L3VNI 4002
    assert learned(moved, "10.77.0.2/32", vni=4001) == [] and learned(moved, "10.77.0.2/32", vni=4002)
    assert any(line.startswith("10.77.0.2/32 RD 10.255.0.12:") and "learned" in line for line in routes_table(routes))
    for junk in (None, [], {"rd": "x"}, {"rd": {"[5]:x": {"paths": [[{"ip": "nope"}], "z"]}}}):
        assert type5_paths(junk) == []


def test_proc_stat_parsing() -> None:
    from fabric_proof import cpu_seconds, start_epoch

    line = ("1234 (bgpd x) S 1 1234 1234 0 -1 4194560 1500 0 0 0 250 130 0 0 20 0 5 0 4200 1200000 3000 "
            "18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0")
    assert cpu_seconds(line, 100) == 3.8  # utime 250 + stime 130 ticks
    assert start_epoch(line, 1_800_000_000, 100) == 1_800_000_042.0  # starttime 4200 ticks after boot
    with pytest.raises(ValueError):
        cpu_seconds("garbage", 100)
