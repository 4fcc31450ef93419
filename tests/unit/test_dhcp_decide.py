"""RFC 2131 decision table, reply routing (§4.1), relay handling (RFC 3046/3527/5107/6607) and
network selection — pure, table-driven, no sockets."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from bootsvc.config import AddressRange, NetworkConfig
from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.packet import (
    BROADCAST_FLAG,
    MessageType,
    Packet,
    ParseError,
    encode_suboptions,
    ip_bytes,
    parse_suboptions,
)
from bootsvc.views import NicView, NodeView, TenantView

MAC = bytes.fromhex("525400bd0010")
MACS = "52:54:00:bd:00:10"
NOW = 1_000_000.0


def netcfg(name: str, cidr: str, *, vrf: str = "", relays: tuple[str, ...] = (), sid: str | None = None,
           lease: int = 3600) -> NetworkConfig:
    n = IPv4Network(cidr)
    hosts = list(n.hosts())
    return NetworkConfig(
        name=name, zone=0 if not vrf else 1, vrf=vrf, cidr=n, gateway=hosts[0],
        pools=(AddressRange(start=hosts[99], end=hosts[199]),),
        relays=tuple(IPv4Address(r) for r in relays), dns_servers=(hosts[0],), domain="prov.test",
        lease_seconds=lease, boot_server=IPv4Address(sid) if sid else hosts[0],
    )


ZONE0 = dec.NetworkView.from_config(netcfg("zone0", "10.77.0.0/24"))
RELAYED = dec.NetworkView.from_config(netcfg("rack1", "10.77.2.0/24", relays=("10.77.2.1",),
                                             sid="10.77.1.1"))
BLUE = dec.NetworkView.from_config(netcfg("blue", "172.20.0.0/24", vrf="blue", sid="10.77.1.1"))
RED = dec.NetworkView.from_config(netcfg("red", "172.20.0.0/24", vrf="red", sid="10.77.1.1"))
NETS = [ZONE0, RELAYED, BLUE, RED]
POLICY = dec.Policy(unknown_clients="ignore", my_ids=frozenset({ip_bytes("10.77.0.1"), ip_bytes("10.77.1.1")}))


def node(kind: str = "dpu", ipv4: str | None = None, name: str = "dpu1") -> NodeView:
    return NodeView(
        id=7, name=name, kind=kind, serial="S1", state="registered", arch="aarch64", vendor=None,
        model=None, rack=None, slot=None, tenant=TenantView(1, "t", "blue", 100, None, ()) if kind == "host"
        else None, host_id=None, dpu_ids=(), nics=(NicView(MACS, "oob", ipv4),), bmc_address=None,
        bmc_driver="fake", bmc_credential_ref=None, bmc_verify_tls=True, provision_method="pxe",
        image=None, secret_generation=1, deadline=None, attempts=0, last_error=None, hint=None, version=1,
    )


def pkt(mt: int, *, flags: int = 0, ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0",
        opts: dict[int, bytes] | None = None) -> Packet:
    o = {53: bytes((mt,))}
    o.update(opts or {})
    return Packet(op=1, xid=0xABCD, flags=flags, ciaddr=ip_bytes(ciaddr), giaddr=ip_bytes(giaddr),
                  chaddr=MAC.ljust(16, b"\0"), options=o)


def run(p: Packet, *, nd: NodeView | None = None, lease: dec.LeaseView | None = None,
        candidate: str | None = "10.77.0.100", reserved: str | None = None, taken: bool = False,
        policy: dec.Policy = POLICY, unicast: bool = False) -> dec.Decision:
    sel = dec.select(p, NETS, [ZONE0])
    inp = dec.Inputs(p, sel, nd if nd is not None else node(), lease,
                     ip_bytes(candidate) if candidate else None, ip_bytes(reserved) if reserved else None,
                     taken, NOW, unicast)
    return dec.decide(inp, policy)


def bound(addr: str = "10.77.0.100", state: dec.LeaseState = "bound") -> dec.LeaseView:
    return dec.LeaseView(ip_bytes(addr), state, NOW + 100, MACS)


SID = {54: ip_bytes("10.77.0.1")}


def test_discover_offer_has_lease_time_server_id_and_t1_t2() -> None:
    d = run(pkt(MessageType.DISCOVER, flags=BROADCAST_FLAG, opts={55: bytes([1, 3, 6, 66, 67])}))
    assert d.outcome == "offer" and d.reply is not None
    o = d.reply.options
    assert o[53] == b"\x02" and d.reply.yiaddr == ip_bytes("10.77.0.100")
    assert o[54] == ip_bytes("10.77.0.1")
    lease, t1, t2 = (int.from_bytes(o[c], "big") for c in (51, 58, 59))
    assert (lease, t1, t2) == (3600, 1800, 3150) and t1 < t2 < lease  # RFC 2131 §4.4.5
    assert o[1] == ip_bytes("255.255.255.0") and o[3] == ip_bytes("10.77.0.1")
    assert d.lease is not None and d.lease.action == "offer"
    assert d.dest == dec.Destination("255.255.255.255", 68, "broadcast")


def test_unknown_client_ignored_by_default_and_served_on_discovery() -> None:
    p = pkt(MessageType.DISCOVER)
    sel = dec.select(p, NETS, [ZONE0])
    inp = dec.Inputs(p, sel, None, None, ip_bytes("10.77.0.100"), None, False, NOW)
    assert dec.decide(inp, POLICY).outcome == "ignored_unknown"
    disc = dec.Policy(unknown_clients="discover", discovery_lease_seconds=120, my_ids=POLICY.my_ids)
    d = dec.decide(inp, disc)
    assert d.outcome == "offer" and d.discovered
    assert d.reply is not None and int.from_bytes(d.reply.options[51], "big") == 120
    plain = dec.decide(inp, dec.Policy(unknown_clients="serve", my_ids=POLICY.my_ids))
    assert plain.outcome == "offer" and not plain.discovered


def test_pool_exhausted_is_silent() -> None:
    d = run(pkt(MessageType.DISCOVER), candidate=None)
    assert d.outcome == "pool_exhausted" and d.reply is None


# ---- REQUEST state table (RFC 2131 §4.3.2) ---------------------------------------------------
REQ = MessageType.REQUEST
OFFERED = bound(state="offered")


@pytest.mark.parametrize(
    ("name", "p", "lease", "kw", "outcome", "state"),
    [
        ("selecting ours, offer held", pkt(REQ, opts={**SID, 50: ip_bytes("10.77.0.100")}), OFFERED, {},
         "ack", "selecting"),
        ("selecting ours, offer gone", pkt(REQ, opts={**SID, 50: ip_bytes("10.77.0.100")}), None, {},
         "nak", "selecting"),
        ("selecting ours, other address", pkt(REQ, opts={**SID, 50: ip_bytes("10.77.0.101")}), OFFERED, {},
         "nak", "selecting"),
        ("selecting other server", pkt(REQ, opts={54: ip_bytes("10.77.0.250"), 50: ip_bytes("10.77.0.100")}),
         OFFERED, {}, "not_for_us", "selecting"),
        ("selecting ours, taken meanwhile", pkt(REQ, opts={**SID, 50: ip_bytes("10.77.0.100")}), OFFERED,
         {"taken": True}, "nak", "selecting"),
        ("init-reboot known", pkt(REQ, opts={50: ip_bytes("10.77.0.100")}), bound(), {}, "ack", "init-reboot"),
        ("init-reboot expired but free", pkt(REQ, opts={50: ip_bytes("10.77.0.100")}),
         bound(state="expired"), {}, "ack", "init-reboot"),
        ("init-reboot no record -> silent", pkt(REQ, opts={50: ip_bytes("10.77.0.100")}), None, {},
         "no_record", "init-reboot"),
        ("init-reboot wrong network", pkt(REQ, opts={50: ip_bytes("192.168.1.5")}), bound(), {}, "nak",
         "init-reboot"),
        ("init-reboot other address", pkt(REQ, opts={50: ip_bytes("10.77.0.120")}), bound(), {}, "nak",
         "init-reboot"),
        ("renewing", pkt(REQ, ciaddr="10.77.0.100"), bound(), {"unicast": True}, "ack", "renewing"),
        ("rebinding", pkt(REQ, ciaddr="10.77.0.100", flags=BROADCAST_FLAG), bound(), {}, "ack", "rebinding"),
        ("renewing no record -> silent", pkt(REQ, ciaddr="10.77.0.100"), None, {"unicast": True},
         "no_record", "renewing"),
        ("renewing wrong address", pkt(REQ, ciaddr="10.77.0.130"), bound(), {"unicast": True}, "nak",
         "renewing"),
        ("renewing wrong network -> silent", pkt(REQ, ciaddr="10.99.0.5"), bound(), {"unicast": True},
         "wrong_network", "renewing"),
        ("request without anything", pkt(REQ), bound(), {}, "bad_request", "invalid"),
        ("reservation wins", pkt(REQ, opts={50: ip_bytes("10.77.0.100")}), bound(),
         {"reserved": "10.77.0.50"}, "nak", "init-reboot"),
        ("reserved address ack without lease", pkt(REQ, opts={50: ip_bytes("10.77.0.50")}), None,
         {"reserved": "10.77.0.50"}, "ack", "init-reboot"),
    ],
)
def test_request_table(name: str, p: Packet, lease: dec.LeaseView | None, kw: dict[str, object],
                       outcome: str, state: str) -> None:
    d = run(p, lease=lease, **kw)  # type: ignore[arg-type]
    assert (d.outcome, d.state) == (outcome, state), name
    if outcome == "ack":
        assert d.reply is not None and d.lease is not None and d.lease.action == "bind"
        assert 51 in d.reply.options and 54 in d.reply.options
    if outcome == "nak":
        assert d.reply is not None and d.lease is None
        r = d.reply
        assert r.yiaddr == bytes(4) and 51 not in r.options and 54 in r.options
        assert d.dest is not None and d.dest.mode == "broadcast"  # giaddr 0: NAK is broadcast
    if outcome in ("no_record", "not_for_us", "bad_request", "wrong_network"):
        assert d.reply is None


def test_selecting_other_server_releases_tentative_offer() -> None:
    d = run(pkt(REQ, opts={54: ip_bytes("10.77.0.250"), 50: ip_bytes("10.77.0.100")}), lease=OFFERED)
    assert d.lease is not None and d.lease.action == "unoffer"


def test_decline_quarantines_only_for_holder() -> None:
    p = pkt(MessageType.DECLINE, opts={**SID, 50: ip_bytes("10.77.0.100")})
    d = run(p, lease=bound())
    assert d.outcome == "declined" and d.reply is None
    assert d.lease is not None and d.lease.action == "decline"
    assert run(p, lease=bound("10.77.0.101")).lease is None
    with pytest.raises(ParseError):
        run(pkt(MessageType.DECLINE, opts=SID), lease=bound())


def test_release_frees_only_own_bound_lease() -> None:
    d = run(pkt(MessageType.RELEASE, ciaddr="10.77.0.100", opts=SID), lease=bound())
    assert d.outcome == "released" and d.reply is None and d.lease is not None
    assert d.lease.action == "release"
    assert run(pkt(MessageType.RELEASE, ciaddr="10.77.0.100", opts=SID), lease=None).lease is None
    assert run(pkt(MessageType.RELEASE, ciaddr="10.77.0.100", opts={54: ip_bytes("1.2.3.4")}),
               lease=bound()).outcome == "not_for_us"


def test_inform_ack_without_lease_time_to_ciaddr() -> None:
    d = run(pkt(MessageType.INFORM, ciaddr="10.77.0.77"), lease=None)
    assert d.outcome == "inform_ack" and d.reply is not None
    assert d.reply.options[53] == b"\x05"
    for code in (51, 58, 59):
        assert code not in d.reply.options
    assert d.reply.yiaddr == bytes(4)
    assert d.dest == dec.Destination("10.77.0.77", 68, "unicast")
    assert d.lease is None


# ---- reply routing (§4.1) ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("p", "lease", "dest"),
    [
        (pkt(MessageType.DISCOVER, giaddr="10.77.2.1"), None, dec.Destination("10.77.2.1", 67, "relay")),
        (pkt(REQ, ciaddr="10.77.0.100"), bound(), dec.Destination("10.77.0.100", 68, "unicast")),
        (pkt(MessageType.DISCOVER, flags=BROADCAST_FLAG), None,
         dec.Destination("255.255.255.255", 68, "broadcast")),
        (pkt(MessageType.DISCOVER), None, dec.Destination("10.77.0.100", 68, "l2", MAC)),
    ],
)
def test_routing(p: Packet, lease: dec.LeaseView | None, dest: dec.Destination) -> None:
    cand = "10.77.2.100" if p.giaddr != bytes(4) else "10.77.0.100"
    d = run(p, lease=lease, candidate=cand)
    assert d.dest == dest


def test_nak_through_relay_sets_broadcast_flag() -> None:
    p = pkt(REQ, giaddr="10.77.2.1", opts={50: ip_bytes("10.77.2.150")})
    d = run(p, lease=bound("10.77.2.100"))
    assert d.outcome == "nak" and d.reply is not None
    assert d.reply.flags & BROADCAST_FLAG
    assert d.dest == dec.Destination("10.77.2.1", 67, "relay")


# ---- relays -------------------------------------------------------------------------------
def relayed(mt: int, subs: list[tuple[int, bytes]], giaddr: str = "10.77.2.1",
            extra: dict[int, bytes] | None = None) -> Packet:
    return pkt(mt, giaddr=giaddr, opts={82: encode_suboptions(subs), **(extra or {})})


def test_giaddr_selects_network_and_82_is_echoed() -> None:
    p = relayed(MessageType.DISCOVER, [(1, b"lcbr1"), (2, b"rid")])
    sel = dec.select(p, NETS, [ZONE0])
    assert sel.network is RELAYED
    d = run(p, candidate="10.77.2.100")
    assert d.reply is not None and d.reply.options[82] == p.options[82]
    assert d.reply.options[54] == ip_bytes("10.77.1.1")
    assert d.lease is not None and d.lease.circuit_id == b"lcbr1" and d.lease.relay == ip_bytes("10.77.2.1")


def test_unknown_relay_dropped() -> None:
    sel = dec.select(relayed(MessageType.DISCOVER, [], giaddr="10.200.0.1"), NETS, [ZONE0])
    assert sel.network is None and sel.reason == "unknown_relay"


def test_link_selection_and_server_id_override() -> None:
    subs = [(1, b"c"), (5, ip_bytes("10.77.0.0")), (11, ip_bytes("10.77.0.1"))]
    p = relayed(MessageType.DISCOVER, subs, giaddr="10.50.0.9")  # giaddr not on the client subnet
    sel = dec.select(p, NETS, [])
    assert sel.network is ZONE0  # RFC 3527: pool chosen by link selection
    d = run(p, candidate="10.77.0.100")
    assert d.reply is not None and d.reply.options[54] == ip_bytes("10.77.0.1")  # RFC 5107
    assert d.dest == dec.Destination("10.50.0.9", 67, "relay")  # still replies to giaddr
    # a REQUEST naming the override address is addressed to us
    req = relayed(REQ, subs, giaddr="10.50.0.9", extra={54: ip_bytes("10.77.0.1"), 50: ip_bytes("10.77.0.100")})
    assert run(req, lease=OFFERED).outcome == "ack"


def test_override_address_is_accepted_as_ours_even_if_foreign() -> None:
    subs = [(5, ip_bytes("10.77.0.0")), (11, ip_bytes("10.77.0.254"))]
    req = relayed(REQ, subs, giaddr="10.50.0.9", extra={54: ip_bytes("10.77.0.254"), 50: ip_bytes("10.77.0.100")})
    d = run(req, lease=OFFERED)
    assert d.outcome == "ack" and d.reply is not None and d.reply.options[54] == ip_bytes("10.77.0.254")


def test_instances_behind_one_override_only_the_offering_one_answers() -> None:
    # Three instances (dhcp.instance_*, boot_servers 10.77.1.1-3) behind a relay whose
    # server-id-override (RFC 5107) is the tenant gateway: once secs passed lb_max_seconds each
    # offered from its own stripe, and the client's REQUEST names only the override in option 54.
    gw = ip_bytes("172.20.0.1")
    subs = [(5, ip_bytes("172.20.0.0")), (11, gw), (151, b"\x00blue")]
    req = relayed(REQ, subs, extra={54: gw, 50: ip_bytes("172.20.0.100")})
    offers = {1: "172.20.0.100", 2: "172.20.0.101", 3: None}  # instance 3 made no offer
    outcomes: dict[int, dec.Decision] = {}
    for i, addr in offers.items():
        sid = f"10.77.1.{i}"
        net = dec.NetworkView.from_config(netcfg("blue", "172.20.0.0/24", vrf="blue", sid=sid))
        sel = dec.select(req, [net], [])
        assert sel.network is net
        lease = bound(addr, "offered") if addr else None
        inp = dec.Inputs(req, sel, node("host"), lease, None, None, False, NOW, False)
        outcomes[i] = dec.decide(inp, dec.Policy(my_ids=frozenset({ip_bytes(sid)})))
    assert [d.outcome for d in outcomes.values()] == ["ack", "not_for_us", "not_for_us"]
    assert all(d.reply is None for d in (outcomes[2], outcomes[3]))  # silence, never a NAK
    ack = outcomes[1]
    assert ack.reply is not None and ack.reply.yiaddr == ip_bytes("172.20.0.100") and ack.reply.options[54] == gw
    # the instance not selected drops its tentative offer (RFC 2131 §4.3.2), the one without keeps none
    it = outcomes[2].lease
    assert it is not None and it.action == "unoffer" and it.address == ip_bytes("172.20.0.101")
    assert outcomes[3].lease is None
    # the selected instance whose offer was lost to another client still NAKs (it was selected)
    sel = dec.select(req, [dec.NetworkView.from_config(netcfg("blue", "172.20.0.0/24", vrf="blue",
                                                               sid="10.77.1.1"))], [])
    inp = dec.Inputs(req, sel, node("host"), bound("172.20.0.100", "offered"), None, None, True, NOW, False)
    assert dec.decide(inp, dec.Policy(my_ids=frozenset({ip_bytes("10.77.1.1")}))).outcome == "nak"


def test_vss_selects_vrf_and_strips_152() -> None:
    for vrf, net in (("blue", BLUE), ("red", RED)):
        subs = [(1, b"c"), (5, ip_bytes("172.20.0.0")), (151, b"\x00" + vrf.encode()), (152, b"")]
        p = relayed(MessageType.DISCOVER, subs, giaddr="10.77.2.1")
        sel = dec.select(p, NETS, [])
        assert sel.network is net and sel.vrf == vrf
        d = run(p, candidate="172.20.0.100", nd=node("host"))
        assert d.reply is not None
        assert (152, b"") not in parse_suboptions(d.reply.options[82])
        assert d.lease is not None and d.lease.vrf == vrf and d.lease.network == net.name


def test_vss_unknown_vrf_or_type_dropped() -> None:
    p = relayed(MessageType.DISCOVER, [(5, ip_bytes("172.20.0.0")), (151, b"\x00green"), (152, b"")])
    assert dec.select(p, NETS, []).reason == "unknown_vrf"
    p = relayed(MessageType.DISCOVER, [(151, b"\x09zz"), (152, b"")])
    assert dec.select(p, NETS, []).reason == "bad_vss"


def test_vss_via_option_221() -> None:
    p = pkt(MessageType.DISCOVER, giaddr="10.77.2.1", opts={221: b"\x00red",
                                                           82: encode_suboptions([(5, ip_bytes("172.20.0.0"))])})
    assert dec.select(p, NETS, []).network is RED


def test_direct_client_option82_not_trusted_for_selection() -> None:
    p = pkt(MessageType.DISCOVER, opts={82: encode_suboptions([(5, ip_bytes("10.77.2.0")), (151, b"\x00red")])})
    sel = dec.select(p, NETS, [ZONE0])
    assert sel.network is ZONE0 and sel.vrf == ""


def test_request_state_helper() -> None:
    assert dec.request_state(pkt(REQ, opts={**SID, 50: b"\x0a\x4d\x00\x64"})) == "selecting"
    assert dec.request_state(pkt(REQ, ciaddr="10.0.0.1"), unicast=True) == "renewing"
    assert dec.request_state(pkt(REQ, ciaddr="10.0.0.1")) == "rebinding"


def test_relayed_client_renewing_by_unicast_selects_its_network() -> None:
    # RENEW from a client behind a relay comes straight to us (giaddr 0) on another interface
    p = pkt(REQ, ciaddr="10.77.2.100")
    sel = dec.select(p, NETS, [ZONE0])
    assert sel.network is RELAYED
    sel2 = dec.select(p, NETS, [])
    assert sel2.network is RELAYED
    d = dec.decide(dec.Inputs(p, sel, node(), bound("10.77.2.100"), None, None, False, NOW, True), POLICY)
    assert d.outcome == "ack" and d.dest == dec.Destination("10.77.2.100", 68, "unicast")
