"""DHCPv4 server conformance without sockets: RFC 2131/2132 requirements on the reply, checked with an
independent decoder (scapy's BOOTP/DHCP layers), never with bootsvc's own codec.

Covers: the client identifier (option 61) identifies the client (RFC 2131 §2, §4.2), with Kea's
``match-client-id: false`` as the opt-out; reply options in the order of the parameter request list
(RFC 2132 §9.8); option 57 counts the IP and UDP headers (RFC 2132 §9.10), the reply never exceeds it,
and option overload (RFC 2131 §4.1, RFC 2132 §9.3) is used before options are dropped.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP, DHCPRevOptions

from bootsvc import config as cfgmod
from bootsvc import db
from bootsvc.config import DhcpListener
from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.packet import Packet, ip_bytes
from bootsvc.dhcp.server import DhcpService
from bootsvc.models import Base

SID = ip_bytes("198.18.50.1")
MAC = bytes.fromhex("02bd00000a01")


def service(tmp_path: Path, *, match_client_id: bool | None = None, domain: str | None = None,
            unknown: str = "serve") -> tuple[DhcpService, list[bytes]]:
    """The packet path with a real SQLite lease table; replies are captured as the bytes that would go
    on the wire (``Packet.encode`` with the request's size limit, as ``DhcpService._send`` does)."""
    dhcp: dict[str, Any] = {"unknown_clients": unknown, "per_mac_rate": 1000}
    if match_client_id is not None:
        dhcp["match_client_id"] = match_client_id
    net: dict[str, Any] = {"name": "lan", "zone": 0, "cidr": "198.18.50.0/24", "gateway": "198.18.50.1",
                           "pools": [{"start": "198.18.50.10", "end": "198.18.50.200"}],
                           "boot_server": "198.18.50.1", "dns_servers": ["198.18.50.1"]}
    if domain is not None:
        net["domain"] = domain
    cfg = cfgmod.from_mapping({"database": {"url": f"sqlite:///{tmp_path / 's.db'}"}, "networks": [net],
                               "dhcp": dhcp}, env={})
    e = db.make_engine(cfg.database.url)
    Base.metadata.create_all(e)
    svc = DhcpService(cfg, DhcpListener(interface="lo", address=IPv4Address("198.18.50.1")),
                      db.session_factory(e), clock=lambda: 1000.0)
    svc.networks = [dec.NetworkView.from_config(n) for n in cfg.networks]
    svc.local = list(svc.networks)
    svc.policy = dec.Policy(unknown_clients=unknown, my_ids=frozenset({SID}))  # type: ignore[arg-type]
    sent: list[bytes] = []

    class _Sock:
        def sendto(self, data: bytes, addr: Any) -> int:
            sent.append(data)
            return len(data)

    svc.sock = _Sock()  # type: ignore[assignment]
    return svc, sent


def request(mt: int, mac: bytes = MAC, *, xid: int = 0x42, ciaddr: bytes = bytes(4),
            opts: dict[int, bytes] | None = None) -> bytes:
    o = {53: bytes((mt,))}
    o.update(opts or {})
    return Packet(op=1, xid=xid, ciaddr=ciaddr, chaddr=mac.ljust(16, b"\0"), options=o, flags=0x8000).encode()


def codes(reply: bytes) -> list[int]:
    """Option codes of a reply, in wire order, as scapy decodes them (pad/end left out)."""
    out: list[int] = []
    for o in BOOTP(reply)[DHCP].options:
        if isinstance(o, tuple):
            name = o[0]
            out.append(name if isinstance(name, int) else DHCPRevOptions[name][0])
    return out


def opt(reply: bytes, code: int) -> Any:
    for o in BOOTP(reply)[DHCP].options:
        if isinstance(o, tuple):
            name = o[0]
            c = name if isinstance(name, int) else DHCPRevOptions[name][0]
            if c == code:
                return o[1]
    return None


def dora(svc: DhcpService, sent: list[bytes], mac: bytes, cid: bytes | None, xid: int) -> bytes:
    """Full DISCOVER/OFFER/REQUEST/ACK; returns the bound address (raw 4 bytes)."""
    extra = {61: cid} if cid is not None else {}
    assert svc.handle(request(1, mac, xid=xid, opts=extra)) is None
    offer = BOOTP(sent[-1])
    assert opt(sent[-1], 53) == 2
    yi = IPv4Address(offer.yiaddr).packed
    pend = svc.handle(request(3, mac, xid=xid, opts={**extra, 50: yi, 54: SID}))
    assert pend is not None, svc.counters()
    svc._flush([pend])
    assert opt(sent[-1], 53) == 5, svc.counters()
    return yi


# ---- option 61: the client identifier identifies the client (RFC 2131 §2, §4.2) ----------------


def test_second_client_id_on_same_chaddr_gets_its_own_address(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, b"\x00client-A", 1)
    # another client (another identifier) behind the same hardware address, e.g. a second OS instance
    svc.handle(request(1, MAC, xid=2, opts={61: b"\x00client-B"}))
    offer_b = IPv4Address(BOOTP(sent[-1]).yiaddr).packed
    assert opt(sent[-1], 53) == 2
    assert offer_b != a
    # and asking for A's address in INIT-REBOOT is refused: it is bound to A
    pend = svc.handle(request(3, MAC, xid=3, opts={61: b"\x00client-B", 50: a}))
    assert pend is None
    assert opt(sent[-1], 53) == 6  # NAK
    # A still renews its own address
    pend = svc.handle(request(3, MAC, xid=4, ciaddr=a, opts={61: b"\x00client-A"}))
    assert pend is not None
    svc._flush([pend])
    assert opt(sent[-1], 53) == 5 and IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a


def test_both_client_ids_keep_their_bindings_in_the_database(tmp_path: Path) -> None:
    import sqlite3

    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, b"\x00client-A", 1)
    b = dora(svc, sent, MAC, b"\x00client-B", 2)
    assert a != b
    con = sqlite3.connect(tmp_path / "s.db")
    rows = con.execute("SELECT client_id, state FROM leases ORDER BY client_id").fetchall()
    assert rows == [(b"\x00client-A".hex(), "bound"), (b"\x00client-B".hex(), "bound")]
    # a restarted server (fresh store, rows loaded) still tells them apart
    svc2, sent2 = service(tmp_path)
    svc2.store.load()
    svc2.handle(request(1, MAC, xid=5, opts={61: b"\x00client-A"}))
    assert IPv4Address(BOOTP(sent2[-1]).yiaddr).packed == a
    svc2.handle(request(1, MAC, xid=6, opts={61: b"\x00client-B"}))
    assert IPv4Address(BOOTP(sent2[-1]).yiaddr).packed == b


def test_match_client_id_false_identifies_by_chaddr(tmp_path: Path) -> None:
    # Kea's match-client-id: false - a PXE ROM and the installed OS on one NIC share one lease
    svc, sent = service(tmp_path, match_client_id=False)
    a = dora(svc, sent, MAC, b"\x01" + MAC, 1)
    svc.handle(request(1, MAC, xid=2, opts={61: b"\xff\x00\x00\x00\x01duid"}))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a


def test_client_without_identifier_is_keyed_on_chaddr(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, None, 1)
    svc.handle(request(1, MAC, xid=2))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a
    other = bytes.fromhex("02bd00000a02")
    svc.handle(request(1, other, xid=3))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed != a


def test_too_short_client_identifier_is_ignored(tmp_path: Path) -> None:
    # RFC 2132 §9.14: minimum length 2; a 1-byte value cannot identify anyone: chaddr does
    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, b"\x01", 1)
    svc.handle(request(1, MAC, xid=2))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a


# ---- option order: RFC 2132 §9.8 --------------------------------------------------------------


@pytest.mark.parametrize("prl", [bytes([6, 3, 1, 28, 51]), bytes([15, 6, 1, 3, 58, 59, 51, 28]),
                                 bytes([28, 1])])
def test_reply_options_follow_the_parameter_request_list(tmp_path: Path, prl: bytes) -> None:
    svc, sent = service(tmp_path, domain="prov.test")
    svc.handle(request(1, opts={55: prl, 61: b"\x01" + MAC}))
    got = codes(sent[-1])
    assert got[:2] == [53, 54]
    requested = [c for c in got if c in prl]
    assert requested == _expected_order(prl, got)  # in the client's order
    # every requested option comes before every option the client did not ask for
    first_unasked = next((i for i, c in enumerate(got[2:], 2) if c not in prl), len(got))
    assert all(c not in prl for c in got[first_unasked:])
    # the ACK too
    yi = IPv4Address(BOOTP(sent[-1]).yiaddr).packed
    pend = svc.handle(request(3, opts={55: prl, 50: yi, 54: SID, 61: b"\x01" + MAC}))
    assert pend is not None
    svc._flush([pend])
    got = codes(sent[-1])
    assert got[:2] == [53, 54] and [c for c in got if c in prl] == _expected_order(prl, got)


def _expected_order(prl: bytes, got: list[int]) -> list[int]:
    """The PRL order, except that the subnet mask precedes the router (RFC 2132 §3.3 MUST)."""
    want = [c for c in prl if c in got]
    if 1 in want and 3 in want and want.index(1) > want.index(3):
        want.remove(1)
        want.insert(want.index(3), 1)
    return want


def test_subnet_mask_precedes_router_even_if_requested_later(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    svc.handle(request(1, opts={55: bytes([3, 6, 1])}))
    got = codes(sent[-1])
    assert got.index(1) < got.index(3) < got.index(6)


# ---- option 57: the whole IP datagram (RFC 2132 §9.10) ---------------------------------------


@pytest.mark.parametrize("mms", [576, 600, 1000])
def test_max_message_size_counts_ip_and_udp_headers(tmp_path: Path, mms: int) -> None:
    # a long domain name pushes the reply over 548 bytes of DHCP payload
    svc, sent = service(tmp_path, domain="d" * 200 + ".example")
    big = {55: bytes([1, 3, 6, 15, 28, 51, 54]), 57: mms.to_bytes(2, "big"), 61: b"\x00" + b"c" * 120,
           77: b"u" * 100}
    svc.handle(request(1, opts=big))
    reply = sent[-1]
    assert len(reply) + 28 <= mms  # IP (20) + UDP (8) headers count (ISC dhcpd and dnsmasq agree)
    assert opt(reply, 53) == 2
    # nothing requested was dropped: option overload made room when needed
    from bootsvc.dhcp.packet import parse as own_parse  # only to reassemble overload areas

    p = own_parse(reply)
    assert p.options[15] == b"d" * 200 + b".example"
    assert p.options[61] == b"\x00" + b"c" * 120


@pytest.mark.parametrize("o57", [None, 576, 500])  # 500 is below the legal minimum: 576 applies
def test_a_reply_fits_576_byte_datagrams(tmp_path: Path, o57: int | None) -> None:
    # 560 bytes of DHCP message as built: fine for a 576-byte *payload*, 28 bytes too many for a
    # 576-byte IP datagram (RFC 2131 §2, RFC 2132 §9.10): it must be overloaded into file/sname,
    # nothing lost
    svc, sent = service(tmp_path, domain="d" * 235 + ".example")
    cid = b"\x00" + b"c" * 20
    o = {55: bytes([1, 3, 6, 15, 28]), 61: cid}
    if o57 is not None:
        o[57] = o57.to_bytes(2, "big")
    svc.handle(request(1, opts=o))
    assert sent, svc.counters()
    assert len(sent[-1]) + 28 <= 576
    assert opt(sent[-1], 52) in (1, 2, 3)  # scapy sees the overload option
    from bootsvc.dhcp.packet import parse as own_parse  # scapy does not reassemble overload areas

    p = own_parse(sent[-1])
    assert p.options[15] == b"d" * 235 + b".example" and p.options[61] == cid
    assert svc.counters().get("options_dropped", 0) == 0
    # without the overload the same reply is 560 bytes: the limit is what made the difference
    (tmp_path / "big").mkdir()
    svc2, sent2 = service(tmp_path / "big", domain="d" * 235 + ".example")
    svc2.handle(request(1, opts={55: bytes([1, 3, 6, 15, 28]), 57: (1500).to_bytes(2, "big"), 61: cid}))
    assert len(sent2[-1]) == 560 and opt(sent2[-1], 52) is None


def test_options_are_dropped_least_wanted_first_when_even_overload_is_not_enough(tmp_path: Path) -> None:
    # 576-byte limit; the echoed identifier (RFC 6842 MUST) and the requested domain cannot both fit
    # with everything else: unrequested options go first, the reply is still sent and never too large
    svc, sent = service(tmp_path, domain="d" * 250 + ".example")
    svc.handle(request(1, opts={55: bytes([1, 3, 15]), 61: b"\x00" + b"c" * 250}))
    assert sent, svc.counters()
    reply = sent[-1]
    assert len(reply) + 28 <= 576
    from bootsvc.dhcp.packet import parse as own_parse

    p = own_parse(reply)
    assert p.options[53] == b"\x02" and p.options[54] == SID and 51 in p.options
    assert p.options[61] == b"\x00" + b"c" * 250  # RFC 6842: the identifier is always echoed
    assert svc.counters().get("options_dropped", 0) >= 1


def test_overload_makes_room_for_a_long_option_before_dropping_any(tmp_path: Path) -> None:
    # a 253-byte client identifier does not fit file (128) or sname (64); in the reply's order the
    # small options would fill the options field first. Packing by size moves the small ones to
    # file instead: option 52 set, nothing dropped, every option present (reassembled).
    svc, sent = service(tmp_path, domain="bd.test")
    cid = b"\x00" + b"c" * 252
    svc.handle(request(1, opts={55: bytes([1, 3, 6, 15, 28, 51, 54]), 61: cid}))
    assert sent, svc.counters()
    assert len(sent[-1]) + 28 <= 576 and opt(sent[-1], 52) in (1, 2, 3)
    from bootsvc.dhcp.packet import parse as own_parse

    p = own_parse(sent[-1])
    assert {1, 3, 6, 15, 28, 51, 54, 58, 59, 61} <= set(p.options) and p.options[61] == cid
    assert svc.counters().get("options_dropped", 0) == 0


# ---- RFC 3046 §2.2: the relay agent information echo ---------------------------------------------


def test_option_82_is_echoed_last_and_never_in_file_or_sname(tmp_path: Path) -> None:
    svc, sent = service(tmp_path, domain="bd.test")
    o82 = bytes((1, 98)) + b"p" * 98  # circuit id, 100 bytes in all
    cid = b"\x00" + b"c" * 149
    svc.handle(request(1, opts={55: bytes([1, 3, 6, 15, 28, 51, 54]), 61: cid, 82: o82}))
    reply = sent[-1]
    assert len(reply) + 28 <= 576 and opt(reply, 52) in (1, 2, 3)  # overloaded...
    got = codes(reply)  # scapy reads the options field only: 82 is there, and last
    assert got[-1] == 82 and opt(reply, 82) == o82
    from bootsvc.dhcp.packet import parse as own_parse

    assert own_parse(reply).options[61] == cid


def test_option_82_that_cannot_fit_is_left_out_and_counted(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    o82 = bytes((1, 200)) + b"p" * 200
    cid = b"\x00" + b"c" * 200
    svc.handle(request(1, opts={55: bytes([1, 3, 6, 51, 54]), 61: cid, 82: o82}))
    assert sent, svc.counters()  # the reply goes out, without the option (RFC 3046 §2.2 SHALL)
    reply = sent[-1]
    assert len(reply) + 28 <= 576 and opt(reply, 53) == 2 and 82 not in codes(reply)
    from bootsvc.dhcp.packet import parse as own_parse

    assert 82 not in own_parse(reply).options and own_parse(reply).options[61] == cid
    assert svc.counters()["relay_info_dropped"] == 1


# ---- RFC 2131 §4.3.1 Table 3: the fields of every reply ---------------------------------------------


def test_reply_header_fields_table_3(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    req = Packet(op=1, hops=2, xid=0xABCD, secs=9, flags=0x8000, chaddr=MAC.ljust(16, b"\0"),
                 options={53: b"\x01", 61: b"\x01" + MAC}).encode()
    svc.handle(req)
    b = BOOTP(sent[-1])
    assert (b.op, b.htype, b.hlen, b.hops, b.xid, b.secs, b.flags) == (2, 1, 6, 0, 0xABCD, 0, 0x8000)
    assert b.ciaddr == "0.0.0.0" and b.yiaddr.startswith("198.18.50.") and b.giaddr == "0.0.0.0"
    assert b.chaddr[:6] == MAC
    assert opt(sent[-1], 53) == 2 and opt(sent[-1], 54) == "198.18.50.1" and opt(sent[-1], 51)
    for must_not in (50, 55, 57):  # requested address, parameter list, max size: never in a reply
        assert must_not not in codes(sent[-1])
    # a NAK (INIT-REBOOT for an address on another network): only 53, 54, 56, 61 (RFC 6842)
    svc.handle(request(3, opts={50: ip_bytes("10.9.9.9"), 61: b"\x01" + MAC}))
    n = BOOTP(sent[-1])
    assert opt(sent[-1], 53) == 6
    assert (n.ciaddr, n.yiaddr, n.siaddr) == ("0.0.0.0", "0.0.0.0", "0.0.0.0")
    assert n.file.strip(b"\0") == b"" and n.sname.strip(b"\0") == b""
    assert set(codes(sent[-1])) <= {53, 54, 56, 61} and {53, 54, 61} <= set(codes(sent[-1]))


def test_address_selection_order_rfc2131_4_3_1(tmp_path: Path) -> None:
    """Current binding, else the client's previous address, else the requested one (option 50) if
    free, else a new one."""
    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, None, 1)
    svc.handle(request(1, xid=2))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a  # current binding
    rel = svc.handle(request(7, xid=3, ciaddr=a, opts={54: SID}))
    assert rel is not None
    svc._flush([rel])
    svc.handle(request(1, xid=4, opts={50: ip_bytes("198.18.50.150")}))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a  # the previous (released) address first
    other = bytes.fromhex("02bd00000a09")
    svc.handle(request(1, other, xid=5, opts={50: ip_bytes("198.18.50.150")}))
    assert BOOTP(sent[-1]).yiaddr == "198.18.50.150"  # requested and free
    third = bytes.fromhex("02bd00000a0a")
    svc.handle(request(1, third, xid=6, opts={50: ip_bytes("198.18.50.150")}))
    assert BOOTP(sent[-1]).yiaddr not in ("198.18.50.150", IPv4Address(a).exploded)  # offered to another


def test_inform_ack_echoes_client_identifier_without_lease_time(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    svc.handle(request(8, ciaddr=ip_bytes("198.18.50.77"), opts={61: b"\x01" + MAC, 55: bytes([1, 3, 51])}))
    assert opt(sent[-1], 53) == 5
    assert opt(sent[-1], 61) == b"\x01" + MAC  # RFC 6842 §3
    assert not {51, 58, 59} & set(codes(sent[-1]))  # RFC 2131 §4.3.5
    assert BOOTP(sent[-1]).yiaddr == "0.0.0.0" and BOOTP(sent[-1]).ciaddr == "198.18.50.77"


def test_unknown_link_selection_is_dropped_not_served_from_giaddr(tmp_path: Path) -> None:
    # RFC 3527 §3: the link-selection address decides; giaddr's subnet is not a fallback
    from bootsvc.dhcp.packet import encode_suboptions

    svc, sent = service(tmp_path)
    p = Packet(op=1, xid=7, hops=1, giaddr=ip_bytes("198.18.50.2"), chaddr=MAC.ljust(16, b"\0"),
               options={53: b"\x01", 82: encode_suboptions([(5, ip_bytes("10.9.9.0"))])}).encode()
    svc.handle(p)
    assert not sent and svc.counters().get("drop_unknown_link") == 1


def test_identifier_that_is_the_hardware_address_is_the_same_client(tmp_path: Path) -> None:
    """RFC 2132 §9.14: an identifier of hardware type 1 + the chaddr names the same interface as the
    chaddr. EDK2's PXE sends no option 61, the iPXE it loads sends 01:<mac> (tests/data/dhcp/captures
    ovmf-native.hex, ovmf-ipxe.hex): one machine, one address through the chain."""
    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, None, 1)  # the firmware's PXE
    svc.handle(request(1, xid=2, opts={61: b"\x01" + MAC}))  # iPXE
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed == a
    b = dora(svc, sent, MAC, b"\x01" + MAC, 3)
    assert b == a
    # while another identifier on the same NIC (an OS with a DUID, RFC 4361) is another client
    svc.handle(request(1, xid=4, opts={61: b"\xff\x00\x00\x00\x01\x00\x01duid"}))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed != a
    # and an htype-1 identifier carrying *another* MAC is not this chaddr
    svc.handle(request(1, xid=5, opts={61: b"\x01" + bytes.fromhex("02bd0000ffff")}))
    assert IPv4Address(BOOTP(sent[-1]).yiaddr).packed != a


def test_leases_cli_with_two_client_identifiers_on_one_mac(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bootsvc.cli import cli

    svc, sent = service(tmp_path)
    a = dora(svc, sent, MAC, b"\x00client-A", 1)
    b = dora(svc, sent, MAC, b"\x00client-B", 2)
    url = f"sqlite:///{tmp_path / 's.db'}"
    run = CliRunner()
    r = run.invoke(cli, ["--db", url, "leases", "list", "--state", "all"])  # the test clock is 1970
    assert r.exit_code == 0 and "CLIENT_ID" in r.output.upper() and b"\x00client-A".hex() in r.output, r.output
    r = run.invoke(cli, ["--db", url, "leases", "release", MAC.hex(":"), "--yes"])
    assert r.exit_code == 2 and "release by address" in r.output and str(IPv4Address(a)) in r.output, r.output
    r = run.invoke(cli, ["--db", url, "leases", "release", str(IPv4Address(b)), "--yes"])
    assert r.exit_code == 0, r.output
