"""Table-driven tests over DHCP packets captured from real clients (tests/data/dhcp/*.pcap, made by
capture.sh in netns bdcap with QEMU TCG firmware and Linux clients; captures.json holds their
payloads): SeaBIOS+iPXE, OVMF+iPXE ROM, OVMF native PXE (chain-loading iPXE), AAVMF arm64 PXE and
UEFI HTTP boot, ISC dhclient and busybox udhcpc. Each request is classified, round-tripped through
the codec byte for byte, and answered by the decision code with the boot fields a real server must
send."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bootsvc import bootplan
from bootsvc.config import AddressRange, NetworkConfig
from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.packet import Packet, ip_bytes, parse
from bootsvc.views import NicView, NodeView

DATA = Path(__file__).resolve().parents[1] / "data" / "dhcp"
CAPS: dict[str, list[dict[str, object]]] = json.loads((DATA / "captures.json").read_text())


def frame(cap: str, n: int) -> bytes:
    for f in CAPS[cap]:
        if f["frame"] == n:
            return bytes.fromhex(str(f["hex"]))
    raise KeyError((cap, n))


NET = dec.NetworkView.from_config(NetworkConfig(
    name="lab", zone=0, cidr=IPv4Network("198.18.10.0/24"), gateway=IPv4Address("198.18.10.1"),
    pools=(AddressRange(start=IPv4Address("198.18.10.100"), end=IPv4Address("198.18.10.199")),),
    boot_server=IPv4Address("198.18.10.1"), lease_seconds=600,
))
POLICY = dec.Policy(unknown_clients="ignore", http_port=8080, my_ids=frozenset({ip_bytes("198.18.10.1")}))
BASE = "http://198.18.10.1:8080"

# (capture, frame, message type, client kind, request state or "", expected file, option 60 echo,
#  option 175 sent)
TABLE = [
    ("seabios-ipxe", 1, 1, "ipxe", "", BASE + "/boot/ipxe?mac={mac}", None, True),
    ("seabios-ipxe", 3, 3, "ipxe", "selecting", BASE + "/boot/ipxe?mac={mac}", None, True),
    ("ovmf-ipxe", 1, 1, "ipxe", "", BASE + "/boot/ipxe?mac={mac}", None, True),
    ("ovmf-ipxe", 5, 1, "pxe-efi-x64", "", "snponly.efi", None, False),
    ("ovmf-ipxe", 7, 3, "pxe-efi-x64", "selecting", "snponly.efi", None, False),
    ("ovmf-native", 1, 1, "pxe-efi-x64", "", "snponly.efi", None, False),
    ("ovmf-native", 3, 3, "pxe-efi-x64", "selecting", "snponly.efi", None, False),
    ("ovmf-native", 5, 1, "ipxe", "", BASE + "/boot/ipxe?mac={mac}", None, True),  # chain-loaded iPXE
    ("aavmf-arm64", 1, 1, "pxe-efi-arm64", "", "arm64/grubnetaa64.efi", None, False),
    ("aavmf-arm64", 3, 3, "pxe-efi-arm64", "selecting", "arm64/grubnetaa64.efi", None, False),
    ("aavmf-arm64", 5, 1, "http-arm64", "", BASE + "/boot/nbp/arm64/grubnetaa64.efi", b"HTTPClient", False),
    ("dhclient", 1, 3, "os", "init-reboot", None, None, False),
    ("dhclient", 3, 7, "os", "", None, None, False),
    ("dhclient", 4, 1, "os", "", None, None, False),
    ("dhclient", 6, 3, "os", "selecting", None, None, False),
    ("udhcpc", 1, 1, "os", "", None, None, False),
    ("udhcpc", 3, 3, "os", "selecting", None, None, False),
    ("udhcpc", 5, 3, "os", "rebinding", None, None, False),  # unicast renew; unicast flag is the socket's
    ("udhcpc", 7, 7, "os", "", None, None, False),
]


def node_for(mac: str) -> NodeView:
    return NodeView(
        id=1, name="dpu-a", kind="dpu", serial="MT1", state="registered", arch="aarch64", vendor=None,
        model=None, rack=None, slot=None, tenant=None, host_id=None, dpu_ids=(),
        nics=(NicView(mac, "oob", None),), bmc_address=None, bmc_driver="fake", bmc_credential_ref=None,
        bmc_verify_tls=True, provision_method="pxe", image=None, secret_generation=1, deadline=None,
        attempts=0, last_error=None, hint=None, version=1,
    )


def test_every_capture_is_present() -> None:
    assert {"seabios-ipxe", "ovmf-ipxe", "ovmf-native", "aavmf-arm64", "dhclient", "udhcpc"} <= set(CAPS)


@pytest.mark.parametrize("cap", sorted(CAPS))
def test_codec_round_trip_is_byte_exact(cap: str) -> None:
    for f in CAPS[cap]:
        raw = bytes.fromhex(str(f["hex"]))
        p = parse(raw)
        again = p.encode(min_size=len(raw))
        if raw[240] == 53:  # our encoder writes 53 first; every client here does too
            assert again == raw, (cap, f["frame"])
        assert parse(again) == p


@pytest.mark.parametrize(("cap", "n", "mt", "kind", "state", "file", "vc", "ipxe"), TABLE)
def test_capture_table(cap: str, n: int, mt: int, kind: str, state: str, file: str | None,
                       vc: bytes | None, ipxe: bool) -> None:
    p = parse(frame(cap, n))
    assert p.msg_type == mt
    assert bootplan.client_kind(p).value == kind
    if mt == 3:
        assert dec.request_state(p) == state
    if mt not in (1, 3):
        return
    mac = p.mac
    # give the client what it asks for: the offered/previous address is held for it
    want = p.get_ip(50) or (p.ciaddr if p.ciaddr != bytes(4) else ip_bytes("198.18.10.132"))
    if not NET.contains(want):
        want = ip_bytes("198.18.10.132")
    p2 = Packet(**{f: getattr(p, f) for f in ("op", "htype", "hlen", "hops", "xid", "secs", "flags",
                                              "ciaddr", "yiaddr", "siaddr", "giaddr", "chaddr", "sname",
                                              "file", "is_dhcp")}, options=dict(p.options))
    if 54 in p2.options:
        p2.options[54] = ip_bytes("198.18.10.1")  # captured against dnsmasq at the same address
    if 50 in p2.options:
        p2.options[50] = want
    sel = dec.select(p2, [NET], [NET])
    lease = dec.LeaseView(want, "offered", 1e9, mac)
    d = dec.decide(dec.Inputs(p2, sel, node_for(mac), lease, want, None, False, 1000.0), POLICY)
    assert d.outcome == ("offer" if mt == 1 else "ack"), d
    r = d.reply
    assert r is not None
    encoded = r.encode(max_size=p.max_size)
    assert 300 <= len(encoded) <= p.max_size
    back = parse(encoded)
    if file is None:
        assert back.file == bytes(128) and 67 not in back.options
    else:
        expect = file.format(mac=mac)
        assert back.file.rstrip(b"\0").decode() == expect or back.options.get(67) == expect.encode()
        if not expect.startswith("http"):
            assert back.siaddr == ip_bytes("198.18.10.1")  # TFTP next-server for legacy PXE ROMs
    assert back.options.get(60) == vc
    assert (back.options.get(175) == bootplan.IPXE_NO_PXEDHCP) == ipxe
    assert back.options.get(12) == b"dpu-a"
    if 61 in p.options:
        assert back.options[61] == p.options[61]  # RFC 6842 echo


def test_scapy_reads_our_offer_as_the_oracle() -> None:
    scapy = pytest.importorskip("scapy.layers.dhcp")
    p = parse(frame("aavmf-arm64", 1))
    sel = dec.select(p, [NET], [NET])
    d = dec.decide(dec.Inputs(p, sel, node_for(p.mac), None, ip_bytes("198.18.10.150"), None, False, 0.0),
                   POLICY)
    assert d.reply is not None
    s = scapy.BOOTP(d.reply.encode())
    opts = dict(o for o in s[scapy.DHCP].options if isinstance(o, tuple))
    assert opts["message-type"] == 2
    assert opts["server_id"] == "198.18.10.1"
    assert opts["lease_time"] == 600
    assert s.yiaddr == "198.18.10.150" and s.siaddr == "198.18.10.1"
    assert s.file.rstrip(b"\0") == b"arm64/grubnetaa64.efi"


# ---- the lab helper's independent captures (tests/data/dhcp/captures/*.hex, bootsvc.lab.capture) --
LAB = DATA / "captures"
LAB_KINDS = {  # file -> client kinds its DISCOVER/REQUESTs must classify as (in order of appearance)
    "seabios-ipxe": {"ipxe"},
    "ovmf-ipxe": {"ipxe", "pxe-efi-x64"},
    "ovmf-native": {"pxe-efi-x64", "ipxe"},
    "aavmf-arm64": {"pxe-efi-arm64", "http-arm64"},
    "udhcpc": {"os"},
    "dhclient": {"os"},
}


def lab_packets(kind: str) -> list[bytes]:
    f = LAB / f"{kind}.hex"
    if not f.exists():
        pytest.skip(f"{f} not captured")
    return [bytes.fromhex(x) for x in f.read_text().splitlines() if x and not x.startswith("#")]


@pytest.mark.parametrize("kind", sorted(LAB_KINDS))
def test_lab_captures_classify_round_trip_and_get_answered(kind: str) -> None:
    pkts = lab_packets(kind)
    assert pkts
    kinds = set()
    for raw in pkts:
        p = parse(raw)
        assert p.op == 1 and p.msg_type in (1, 3)
        k = bootplan.client_kind(p)
        kinds.add(k.value)
        assert parse(p.encode(min_size=len(raw))) == p
        if p.msg_type != 1:
            continue
        sel = dec.select(p, [NET], [NET])
        d = dec.decide(dec.Inputs(p, sel, node_for(p.mac), None, ip_bytes("198.18.10.150"), None, False, 0.0),
                       POLICY)
        assert d.outcome == "offer" and d.reply is not None
        back = parse(d.reply.encode(max_size=p.max_size))
        fn = back.options.get(67) or back.file.rstrip(b"\0")
        if k is bootplan.ClientKind.OS:
            assert not fn
        elif k is bootplan.ClientKind.IPXE:
            assert fn == f"{BASE}/boot/ipxe?mac={p.mac}".encode()
        else:
            assert fn.endswith((b"snponly.efi", b"undionly.kpxe", b"grubnetaa64.efi"))
    assert kinds <= LAB_KINDS[kind] and kinds
