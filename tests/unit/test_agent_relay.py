"""Relay packet transforms (RFC 2131 §4.1, RFC 3046, RFC 3527, RFC 5107, RFC 6607) without sockets."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsvc.agent.ra import ND_ROUTER_ADVERT, build_ra, parse_mac
from bootsvc.agent.relay import RelayParams, RelayServer, option82, to_client, to_server
from bootsvc.dhcp.packet import (
    BOOTREPLY,
    BROADCAST_FLAG,
    SUB_CIRCUIT_ID,
    SUB_LINK_SELECTION,
    SUB_REMOTE_ID,
    SUB_SERVER_ID_OVERRIDE,
    SUB_VSS,
    SUB_VSS_CONTROL,
    MessageType,
    Packet,
    RelayInfo,
    parse,
    vss_vrf,
)

P = RelayParams(host_port="pf0hpf", giaddr=IPv4Address("10.98.0.11"), servers=(IPv4Address("10.98.0.1"),),
                circuit_id=b"pf0hpf", remote_id=b"MT2334XZ0001", vss_vrf="vrf-a",
                link_selection=IPv4Address("10.0.0.0"), server_id_override=IPv4Address("10.0.0.1"))
MAC = bytes.fromhex("5254000000aa")


def discover(**kw: object) -> Packet:
    p = Packet(xid=0x1234, chaddr=MAC.ljust(16, b"\x00"), options={53: bytes([MessageType.DISCOVER]),
                                                                   55: bytes([1, 3, 54])})
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def server_reply(req: bytes, *, echo: bool = True, keep_152: bool = False, **kw: object) -> bytes:
    """What a VSS-aware server sends back: reply skeleton + option 82 echo (minus 152)."""
    q = parse(req)
    r = q.reply(MessageType.OFFER)
    r.yiaddr = IPv4Address("10.0.0.100").packed
    r.set(54, IPv4Address("10.0.0.1").packed)
    info = q.relay_info()
    assert info is not None
    if echo:
        r.set(82, info.raw if keep_152 else info.echo())
    for k, v in kw.items():
        setattr(r, k, v)
    return r.encode()


def test_request_gets_giaddr_hops_and_full_option82() -> None:
    out, why = to_server(discover().encode(), P)
    assert why == "ok" and out is not None
    q = parse(out)
    assert q.giaddr == IPv4Address("10.98.0.11").packed
    assert q.hops == 1
    assert list(q.options)[-1] == 82  # RFC 3046 §2.1: last option before End
    info = q.relay_info()
    assert info is not None
    codes = [c for c, _ in info.suboptions]
    assert codes == [SUB_CIRCUIT_ID, SUB_REMOTE_ID, SUB_LINK_SELECTION, SUB_SERVER_ID_OVERRIDE, SUB_VSS,
                     SUB_VSS_CONTROL]
    assert info.circuit_id == b"pf0hpf" and info.remote_id == b"MT2334XZ0001"
    assert info.link_selection == IPv4Address("10.0.0.0").packed
    assert info.server_id_override == IPv4Address("10.0.0.1").packed
    assert info.vss is not None and info.vss[0] == 0 and vss_vrf(info.vss) == "vrf-a"
    assert info.vss_control
    assert q.options[55] == bytes([1, 3, 54])  # client options untouched


def test_option82_without_optional_suboptions() -> None:
    p = RelayParams("pf0hpf", IPv4Address("10.98.0.11"), (IPv4Address("10.98.0.1"),), b"c", b"r", "v")
    info = RelayInfo.decode(option82(p))
    assert [c for c, _ in info.suboptions] == [SUB_CIRCUIT_ID, SUB_REMOTE_ID, SUB_VSS, SUB_VSS_CONTROL]


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (discover(op=BOOTREPLY), "not_request"),
        (discover(hops=16), "hops"),
        (discover(giaddr=IPv4Address("10.0.0.9").packed), "untrusted_option82"),
    ],
)
def test_request_drops(pkt: Packet, reason: str) -> None:
    assert to_server(pkt.encode(), P) == (None, reason)


def test_request_with_option82_from_host_is_dropped() -> None:
    p = discover()
    p.set(82, b"\x01\x03bad")  # a host forging relay info (RFC 3046 §2.1 untrusted circuit)
    assert to_server(p.encode(), P) == (None, "untrusted_option82")


def test_reply_unicast_to_yiaddr_and_option82_stripped() -> None:
    req, _ = to_server(discover().encode(), P)
    assert req is not None
    d, why = to_client(server_reply(req), P)
    assert why == "ok" and d is not None
    assert not d.broadcast and d.dst == IPv4Address("10.0.0.100") and d.chaddr == MAC
    c = parse(d.packet)
    assert 82 not in c.options  # RFC 3046 §2.2
    assert c.options[54] == IPv4Address("10.0.0.1").packed


def test_reply_broadcast_flag_nak_and_ciaddr() -> None:
    req, _ = to_server(discover(flags=BROADCAST_FLAG).encode(), P)
    assert req is not None
    d, _ = to_client(server_reply(req), P)
    assert d is not None and d.broadcast and d.dst == IPv4Address("255.255.255.255")
    req, _ = to_server(discover().encode(), P)
    assert req is not None
    nak = parse(server_reply(req))
    nak.options[53] = bytes([MessageType.NAK])
    nak.yiaddr = bytes(4)
    d, _ = to_client(nak.encode(), P)
    assert d is not None and d.broadcast
    d, _ = to_client(server_reply(req, ciaddr=IPv4Address("10.0.0.100").packed), P)
    assert d is not None and not d.broadcast and d.dst == IPv4Address("10.0.0.100")


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"echo": False}, "no_option82"),
        ({"keep_152": True}, "vss_not_understood"),  # RFC 6607 §3.3
        ({"giaddr": IPv4Address("10.98.0.99").packed}, "giaddr"),
    ],
)
def test_reply_drops(kw: dict[str, object], reason: str) -> None:
    req, _ = to_server(discover().encode(), P)
    assert req is not None
    assert to_client(server_reply(req, **kw), P) == (None, reason)  # type: ignore[arg-type]


def test_reply_for_another_circuit_is_dropped() -> None:
    other = RelayParams(**{**P.__dict__, "circuit_id": b"pf1hpf"})
    req, _ = to_server(discover().encode(), other)
    assert req is not None
    assert to_client(server_reply(req), P) == (None, "circuit_id")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_garbage_never_raises(data: bytes) -> None:
    to_server(data, P)
    to_client(data, P)


def test_router_advertisement_layout() -> None:
    mac = parse_mac("02:00:0a:ff:00:0b")
    ra = build_ra(mac)
    assert ra[0] == ND_ROUTER_ADVERT and ra[1] == 0
    assert ra[4] == 64 and ra[5] == 0  # hop limit; M and O clear: iPXE stops waiting at once
    assert ra[6:8] == b"\x00\x00"  # router lifetime 0: not a default router
    assert ra[16:24] == b"\x01\x01" + mac  # source link-layer address option
    assert len(ra) == 24
    from ipaddress import IPv6Network

    ra = build_ra(mac, prefix=IPv6Network("fd00:1::/64"))
    assert len(ra) == 56 and ra[24] == 3 and ra[26] == 64 and ra[27] == 0xC0
    with pytest.raises(ValueError):
        parse_mac("02:00")


class _Up:
    """The relay's Zone 0 socket, recording what it sends; ``down`` addresses refuse like an unreachable
    server (sendto raises)."""

    def __init__(self, down: frozenset[str] = frozenset()) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.down = down

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        if addr[0] in self.down:
            raise OSError(101, "Network is unreachable")
        self.sent.append((data, addr))
        return len(data)


def test_relay_forwards_each_request_to_every_server() -> None:
    """A relay with several servers (several bootsvc instances) sends the same relayed bytes to each
    (ISC dhcrelay: "forwards it to the list of DHCP servers"); one that cannot be reached does not keep
    the request from the others, and is counted."""
    servers = (IPv4Address("10.98.0.1"), IPv4Address("10.98.0.2"), IPv4Address("10.98.0.3"))
    p = replace(P, servers=servers)
    relay = RelayServer(p)
    up = _Up()
    relay._handle_request(discover().encode(), p, up)  # type: ignore[arg-type]
    assert [a for _, a in up.sent] == [(str(s), 67) for s in servers]
    assert len({d for d, _ in up.sent}) == 1 and parse(up.sent[0][0]).giaddr == p.giaddr.packed
    assert relay.stats.requests == 1 and relay.stats.dropped == 0
    up = _Up(down=frozenset({"10.98.0.2"}))
    relay._handle_request(discover().encode(), p, up)  # type: ignore[arg-type]
    assert [a for _, a in up.sent] == [("10.98.0.1", 67), ("10.98.0.3", 67)]
    assert relay.stats.requests == 2 and relay.stats.reasons == {"send_server": 1}
