"""DHCPv4 decisions: what to answer, to whom, and which lease write it implies.

Owns: the RFC 2131 message table (DISCOVER -> OFFER; REQUEST in SELECTING / INIT-REBOOT / RENEWING /
REBINDING -> ACK, NAK or silence per §4.3.2; DECLINE -> quarantine; RELEASE -> free; INFORM -> ACK
without lease time, §4.3.5), the reply's options (server identifier, lease time, T1/T2, network
parameters, boot plan fields, option 61/82 echo) and their order (53, 54, then the client's parameter
request list order, RFC 2132 §9.8, then the rest; 82 last, RFC 3046 §2.2), reply routing (§4.1), and
network/VRF selection from giaddr, RFC 3527 link selection, RFC 5107 server-identifier override and
RFC 6607 VSS.

Pure: inputs are immutable (NamedTuples and frozen dataclasses; the parsed packet is only read),
outputs plain dataclasses. No sockets, no database, no clock (``now`` is an input). ``bootsvc.dhcp.server``
gathers the inputs (inventory view, lease state, a candidate address from ``bootsvc.dhcp.leases``) and
carries out the output (persist, then send).

Cost: this runs twice per DORA, so the common path avoids per-packet work that does not depend on
the packet: the options every reply of a network carries are one pre-encoded
:class:`~bootsvc.dhcp.packet.OptionBlock` per (network, server id, lease time, parameter request
list), already in the list's order (a client's firmware sends the same list every time), and the relay
destination is one shared frozen :class:`Destination` per giaddr (both memoised, bounded).

One module (~600 lines) on purpose: it is the RFC 2131 §4.3 table, and every row of it needs the
same network selection, server-identifier and lease-time rules; read top to bottom it is the whole
protocol decision in one place, which is what a reviewer checks against the RFC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from itertools import islice
from typing import TYPE_CHECKING, Literal, NamedTuple

from bootsvc import bootplan
from bootsvc.dhcp.packet import (
    BROADCAST_FLAG,
    ZERO_IP,
    MessageType,
    OptionBlock,
    Packet,
    ParseError,
    RelayInfo,
    ip_str,
    vss_vrf,
)

if TYPE_CHECKING:
    from bootsvc.config import NetworkConfig
    from bootsvc.views import NodeView

__all__ = [
    "Decision",
    "Destination",
    "Inputs",
    "LeaseIntent",
    "LeaseView",
    "NetworkView",
    "Policy",
    "Selection",
    "decide",
    "nak",
    "request_state",
    "select",
]

UnknownPolicy = Literal["ignore", "discover", "serve"]
LeaseState = Literal["offered", "bound", "released", "expired", "declined"]


@dataclass(frozen=True, slots=True)
class NetworkView:
    """One address network as decisions need it (precomputed from ``NetworkConfig``)."""

    name: str
    vrf: str
    net: int  # network address as int
    mask: int  # netmask as int
    server_id: bytes  # option 54 for clients of this network: an address they can unicast to
    lease_seconds: int
    options: tuple[tuple[int, bytes], ...] = ()  # 1, 3, 6, 15, 28 ... in reply order
    relays: frozenset[bytes] = frozenset()  # giaddrs that select this network (config `relays`)
    boot_server: str | None = None  # address clients reach bootsvc's TFTP/HTTP at

    def contains(self, addr: bytes) -> bool:
        return (int.from_bytes(addr, "big") & self.mask) == self.net

    @classmethod
    def from_config(cls, nc: NetworkConfig, default_server_id: IPv4Address | None = None) -> NetworkView:
        cidr: IPv4Network = nc.cidr
        sid = nc.boot_server or default_server_id or nc.gateway
        if sid is None:
            raise ValueError(f"network {nc.name}: no boot_server/server address for option 54")
        opts: list[tuple[int, bytes]] = [(1, cidr.netmask.packed)]
        if nc.gateway is not None:
            opts.append((3, nc.gateway.packed))
        if nc.dns_servers:
            opts.append((6, b"".join(a.packed for a in nc.dns_servers)))
        if nc.domain:
            opts.append((15, nc.domain.encode("ascii")))
        opts.append((28, cidr.broadcast_address.packed))
        return cls(
            name=nc.name, vrf=nc.vrf, net=int(cidr.network_address), mask=int(cidr.netmask),
            server_id=sid.packed, lease_seconds=nc.lease_seconds, options=tuple(opts),
            relays=frozenset(r.packed for r in nc.relays),
            boot_server=str(nc.boot_server) if nc.boot_server is not None else None,
        )


# Per-packet inputs are NamedTuples, not frozen dataclasses: equally immutable, but a frozen
# dataclass sets each field through object.__setattr__, which made building LeaseView/Selection/
# Inputs ~4 % of a DORA (bench/dhcp/README.md, "what changed").
class LeaseView(NamedTuple):
    """This client's current lease (or offer) in the selected VRF, as the lease store knows it."""

    address: bytes
    state: LeaseState
    expires_at: float
    mac: str
    client_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    unknown_clients: UnknownPolicy = "ignore"
    discovery_lease_seconds: int = 300
    http_port: int = 8080
    arm64_nbp: str = "arm64/grubnetaa64.efi"
    my_ids: frozenset[bytes] = frozenset()  # every address that is "this server" in option 54


class Selection(NamedTuple):
    """Result of :func:`select`: the network and what the relay told us."""

    network: NetworkView | None
    relay: RelayInfo | None
    vrf: str
    reason: str = ""  # drop reason when network is None


class Inputs(NamedTuple):
    packet: Packet
    selection: Selection
    node: NodeView | None
    lease: LeaseView | None  # current lease/offer of this client in the selected VRF
    candidate: bytes | None  # a free address for DISCOVER (reservation first), from the allocator
    reserved: bytes | None  # the node's fixed address (Nic.ipv4) in this network, if any
    requested_taken: bool  # the address in 50/ciaddr is held by another client
    now: float
    unicast: bool = False  # the request arrived unicast (tells RENEWING from REBINDING)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a reply goes. Frozen: one instance per relay address is shared between replies."""

    ip: str
    port: int
    mode: Literal["relay", "unicast", "broadcast", "l2"]
    mac: bytes | None = None  # for mode "l2": deliver to yiaddr at this hardware address


@dataclass(slots=True)
class LeaseIntent:
    action: Literal["offer", "bind", "release", "decline", "unoffer"]
    vrf: str
    network: str
    address: bytes
    mac: str
    expires_at: float
    client_id: bytes | None = None
    node_id: int | None = None
    hostname: str | None = None
    relay: bytes | None = None
    circuit_id: bytes | None = None
    remote_id: bytes | None = None


@dataclass(slots=True)
class Decision:
    outcome: str  # "offer", "ack", "nak", "ignored_unknown", "not_for_us", "no_record", ...
    state: str = ""  # client state: selecting, init-reboot, renewing, rebinding, or the message name
    reply: Packet | None = None
    dest: Destination | None = None
    lease: LeaseIntent | None = None
    discovered: bool = False  # unknown client served a discovery lease: record it
    log: dict[str, object] | None = None


# ------------------------------------------------------------------------------------------------
# network selection


def select(
    packet: Packet,
    networks: Sequence[NetworkView],
    local: Sequence[NetworkView],
) -> Selection:
    """Pick the network for a request (RFC 2131 §4.3.1 + RFC 3527/6607).

    ``local``: networks on the receiving interface (for clients without a relay). Relayed requests
    (giaddr != 0) select by link-selection (82.5) if present, else by giaddr, inside the VRF named
    by VSS (82.151, or client option 221); a giaddr that no network lists or contains is an unknown
    relay and dropped. Option 82 from a non-relayed client is echoed but never trusted for
    selection (it can be forged by any host on the segment).
    """
    gi = packet.giaddr
    raw82 = packet.options.get(82)
    relay = RelayInfo.decode(raw82) if raw82 is not None else None
    if gi == ZERO_IP:
        ci = packet.ciaddr
        if ci != ZERO_IP:
            for n in local:
                if n.contains(ci):
                    return Selection(n, relay, n.vrf)
            # a relayed client renewing/releasing by unicast (RFC 2131 §4.4.5): no giaddr, and its
            # address is on a routed network of the default VRF, not on the receiving interface
            for n in networks:
                if n.vrf == "" and n.contains(ci):
                    return Selection(n, relay, "")
        if local:
            return Selection(local[0], relay, local[0].vrf)
        return Selection(None, relay, "", "no_local_network")
    vss = relay.vss if relay is not None else None
    if vss is None:
        v221 = packet.options.get(221)
        if v221:
            vss = v221
    vrf = ""
    if vss is not None:
        name = vss_vrf(vss)
        if name is None:
            return Selection(None, relay, "", "bad_vss")
        vrf = name
    key = relay.link_selection if relay is not None and relay.link_selection is not None else None
    if key is None:
        for n in networks:
            if n.vrf == vrf and gi in n.relays:
                return Selection(n, relay, vrf)
        key = gi
    for n in networks:
        if n.vrf == vrf and n.contains(key):
            return Selection(n, relay, vrf)
    if vrf and not any(n.vrf == vrf for n in networks):
        return Selection(None, relay, vrf, "unknown_vrf")
    return Selection(None, relay, vrf, "unknown_relay" if key is gi else "unknown_link")


def request_state(packet: Packet, unicast: bool = False) -> str:
    """RFC 2131 §4.3.2 client state of a REQUEST from (option 54, option 50, ciaddr)."""
    if packet.options.get(54) is not None:
        return "selecting"
    if packet.options.get(50) is not None:
        return "init-reboot"
    if packet.ciaddr != ZERO_IP:
        return "renewing" if unicast else "rebinding"
    return "invalid"


# ------------------------------------------------------------------------------------------------
# helpers


# Memos (no I/O, no observable state: pure in the sense that matters). Bounded: cleared when full.
_RELAY_DEST: dict[bytes, Destination] = {}
_BLOCKS: dict[tuple[int, bytes, int | None, bytes], tuple[NetworkView, OptionBlock]] = {}
_MEMO_MAX = 4096
_DISCOVER, _REQUEST, _DECLINE, _RELEASE, _INFORM = 1, 3, 4, 7, 8  # ints: no enum lookups per packet
_OFFER_TYPE, _ACK_TYPE = 2, 5


def _route(req: Packet, reply: Packet, nak: bool) -> Destination:
    """RFC 2131 §4.1 reply destination."""
    gi = req.giaddr
    if gi != ZERO_IP:
        d = _RELAY_DEST.get(gi)
        if d is None:
            if len(_RELAY_DEST) >= _MEMO_MAX:
                _RELAY_DEST.clear()
            d = _RELAY_DEST[gi] = Destination(ip_str(gi), 67, "relay")
        return d
    if nak:
        return Destination("255.255.255.255", 68, "broadcast")
    if req.ciaddr != ZERO_IP:
        return Destination(ip_str(req.ciaddr), 68, "unicast")
    if req.flags & BROADCAST_FLAG:
        return Destination("255.255.255.255", 68, "broadcast")
    return Destination(ip_str(reply.yiaddr), 68, "l2", req.chaddr[: req.hlen])


def _server_id(net: NetworkView, relay: RelayInfo | None, giaddr: bytes) -> bytes:
    # RFC 5107: with a server-identifier override the client must talk to the relay address
    if relay is not None and relay.server_id_override is not None and giaddr != ZERO_IP:
        return relay.server_id_override
    return net.server_id


def _is_mine(sid: bytes, net: NetworkView, relay: RelayInfo | None, policy: Policy) -> bool:
    if sid == net.server_id or sid in policy.my_ids:
        return True
    return relay is not None and relay.server_id_override == sid


def _only_by_override(sid: bytes, net: NetworkView, policy: Policy) -> bool:
    """Option 54 names no address of this server, only the relay's override (RFC 5107 §4): every
    server behind that relay sees the same value, so it does not say which of them was selected."""
    return sid != net.server_id and sid not in policy.my_ids


def _lease_time(inp: Inputs, policy: Policy) -> int:
    if inp.node is None and policy.unknown_clients == "discover":
        return policy.discovery_lease_seconds
    assert inp.selection.network is not None
    return inp.selection.network.lease_seconds


def _boot(inp: Inputs, policy: Policy, net: NetworkView) -> bootplan.BootPlan | None:
    if inp.node is None and policy.unknown_clients == "serve":
        return None  # plain DHCP service for unknown clients: address only, never a boot file
    kind = bootplan.client_kind(inp.packet)
    return bootplan.plan(kind, mac=inp.packet.mac, boot_server=net.boot_server,
                         http_port=policy.http_port, node=inp.node, arm64_nbp=policy.arm64_nbp)


def _ordered(opts: dict[int, bytes], prl: bytes) -> dict[int, bytes]:
    """RFC 2132 §9.8: the server "MUST try to insert the requested options in the order requested
    by the client". 53 and 54 first (as ISC dhcpd, Kea and dnsmasq send them; RFC 2131 §4.1 PXE ROMs
    look for 53 early), then the requested ones in the client's order (but 1 before 3: RFC 2132
    §3.3), then the rest in their order, and 82 last (RFC 3046 §2.2: SHOULD be the last option)."""
    out: dict[int, bytes] = {}
    for c in (53, 54):
        if c in opts:
            out[c] = opts[c]
    for c in prl:
        if c in opts and c not in out and c != 82:
            if c == 3 and 1 in opts:
                out[1] = opts[1]  # RFC 2132 §3.3: the subnet mask MUST come before the router
            out[c] = opts[c]
    for c, v in opts.items():
        if c not in out and c != 82:
            out[c] = v
    if 82 in opts:
        out[82] = opts[82]
    return out


def _block(net: NetworkView, sid: bytes, lease_s: int | None, prl: bytes = b"") -> OptionBlock:
    """The options every reply of this (network, server id, lease time) carries, built once: 54,
    51/58/59, then the network's 1, 3, 6, 15, 28, reordered by the parameter request list
    (``_ordered``). Keyed by ``id(net)``; the entry keeps ``net`` alive, so the id cannot be reused
    while it is cached."""
    key = (id(net), sid, lease_s, prl)
    hit = _BLOCKS.get(key)
    if hit is not None and hit[0] is net:
        return hit[1]
    o: dict[int, bytes] = {54: sid}
    if lease_s is not None:
        o[51] = lease_s.to_bytes(4, "big")
        o[58] = (lease_s // 2).to_bytes(4, "big")  # T1 = 0.5 lease (RFC 2131 §4.4.5)
        o[59] = (lease_s * 7 // 8).to_bytes(4, "big")  # T2 = 0.875 lease
    o.update(net.options)
    if prl:
        o = _ordered(o, prl)
    if len(_BLOCKS) >= _MEMO_MAX:
        _BLOCKS.clear()
    blk = OptionBlock(o)
    _BLOCKS[key] = (net, blk)
    return blk


def _fill(reply: Packet, req: Packet, net: NetworkView, sid: bytes, lease_s: int | None,
          plan: bootplan.BootPlan | None, relay: RelayInfo | None) -> None:
    prl = req.options.get(55, b"")
    blk = _block(net, sid, lease_s, prl)
    reply.add_block(blk)
    o = reply.options
    if plan is not None:
        if plan.hostname:
            o[12] = plan.hostname.encode("ascii", "replace")
        if plan.vendor_class:
            o[60] = plan.vendor_class.encode("ascii")
        if plan.next_server is not None:
            reply.siaddr = IPv4Address(plan.next_server).packed
            if 66 in prl:
                o[66] = plan.next_server.encode("ascii")
        if plan.filename is not None:
            fn = plan.filename.encode("ascii", "replace")
            if len(fn) < 128:
                reply.file = fn.ljust(128, b"\x00")
            if 67 in prl or len(fn) >= 128 or plan.vendor_class:
                o[67] = fn
        if plan.ipxe_options is not None:
            o[175] = plan.ipxe_options
    cid = req.options.get(61)
    if cid is not None:
        o[61] = cid  # RFC 6842: echo the client identifier
    if relay is not None:
        o[82] = relay.echo()  # RFC 3046 §2.2 echo (last); minus VSS-Control per RFC 6607
    if prl:
        # the block is already in the list's order; the options added after it are usually not
        # requested (61, 82) and then the order stands. Otherwise put the whole reply in order.
        for c in islice(o, blk.n, None):
            if c in prl and c != 82:
                reply.options = _ordered(o, prl)
                break


def nak(inp: Inputs, net: NetworkView, state: str, why: str) -> Decision:
    req = inp.packet
    reply = req.reply(MessageType.NAK)
    relay = inp.selection.relay
    reply.options[54] = _server_id(net, relay, req.giaddr)
    reply.options[56] = why.encode("ascii")
    if req.options.get(61) is not None:
        reply.options[61] = req.options[61]
    if relay is not None:
        reply.options[82] = relay.echo()
    if req.giaddr != ZERO_IP:
        # §4.3.2: through a relay, set BROADCAST so the relay broadcasts the NAK to the client
        reply.flags |= BROADCAST_FLAG
    return Decision("nak", state, reply, _route(req, reply, True), log={"why": why})


def _intent(action: Literal["offer", "bind", "release", "decline", "unoffer"], inp: Inputs,
            net: NetworkView, addr: bytes, expires: float, hostname: str | None = None) -> LeaseIntent:
    req = inp.packet
    relay = inp.selection.relay
    node = inp.node
    gi = req.giaddr
    # positional: this runs for every OFFER and ACK
    if relay is None:
        return LeaseIntent(action, net.vrf, net.name, addr, req.mac, expires, req.options.get(61),
                           node.id if node is not None else None, hostname,
                           gi if gi != ZERO_IP else None)
    return LeaseIntent(action, net.vrf, net.name, addr, req.mac, expires, req.options.get(61),
                       node.id if node is not None else None, hostname, gi if gi != ZERO_IP else None,
                       relay.circuit_id, relay.remote_id)


def _lease_is(lease: LeaseView | None, addr: bytes, now: float) -> bool:
    """The client holds ``addr``: a live offer or binding, or its own expired/released lease."""
    if lease is None or lease.address != addr:
        return False
    return lease.state != "declined"


# ------------------------------------------------------------------------------------------------
# the message table


def decide(inp: Inputs, policy: Policy) -> Decision:
    """One request in, one decision out. Never raises for hostile input except ParseError (from a
    malformed option accessor), which the server counts as a drop."""
    req = inp.packet
    mt = req.msg_type
    net = inp.selection.network
    if net is None:
        return Decision(inp.selection.reason or "no_network", str(mt))
    if inp.node is None and policy.unknown_clients == "ignore" and mt != _INFORM:
        return Decision("ignored_unknown", str(mt))
    if mt == _DISCOVER:
        return _discover(inp, policy, net)
    if mt == _REQUEST:
        return _request(inp, policy, net)
    if mt == _DECLINE:
        return _decline(inp, policy, net)
    if mt == _RELEASE:
        return _release(inp, policy, net)
    if mt == _INFORM:
        return _inform(inp, policy, net)
    return Decision("unexpected_type", str(mt))


def _discover(inp: Inputs, policy: Policy, net: NetworkView) -> Decision:
    req = inp.packet
    addr = inp.candidate
    if addr is None:
        return Decision("pool_exhausted", "discover")
    lease_s = _lease_time(inp, policy)
    plan = _boot(inp, policy, net)
    reply = req.reply(_OFFER_TYPE)
    reply.yiaddr = addr
    relay = inp.selection.relay
    _fill(reply, req, net, _server_id(net, relay, req.giaddr), lease_s, plan, relay)
    return Decision(
        "offer", "discover", reply, _route(req, reply, False),
        _intent("offer", inp, net, addr, inp.now + lease_s, plan.hostname if plan else None),
        inp.node is None and policy.unknown_clients == "discover",
        {"kind": plan.kind.value, "file": plan.filename} if plan is not None else None,
    )


def _ack(inp: Inputs, policy: Policy, net: NetworkView, addr: bytes, state: str) -> Decision:
    req = inp.packet
    lease_s = _lease_time(inp, policy)
    plan = _boot(inp, policy, net)
    reply = req.reply(_ACK_TYPE)
    reply.yiaddr = addr
    reply.ciaddr = req.ciaddr
    relay = inp.selection.relay
    _fill(reply, req, net, _server_id(net, relay, req.giaddr), lease_s, plan, relay)
    return Decision(
        "ack", state, reply, _route(req, reply, False),
        _intent("bind", inp, net, addr, inp.now + lease_s, plan.hostname if plan else None),
        inp.node is None and policy.unknown_clients == "discover",
        {"kind": plan.kind.value, "file": plan.filename} if plan is not None else None,
    )


def _request(inp: Inputs, policy: Policy, net: NetworkView) -> Decision:
    req = inp.packet
    state = request_state(req, inp.unicast)
    lease = inp.lease
    relay = inp.selection.relay
    if state == "selecting":
        sid = req.server_id
        assert sid is not None
        if not _is_mine(sid, net, relay, policy):
            # the client chose another server: drop our tentative offer, say nothing (§4.3.2)
            if lease is not None and lease.state == "offered":
                return Decision("not_for_us", state,
                                lease=_intent("unoffer", inp, net, lease.address, inp.now))
            return Decision("not_for_us", state)
        want = req.requested_ip
        if want is None:
            want = req.ciaddr  # tolerated: some clients put the address in ciaddr
            if want == ZERO_IP:
                return Decision("bad_request", state)
        if _only_by_override(sid, net, policy) and not _lease_is(lease, want, inp.now):
            # RFC 5107 §4: the relay rewrote option 54 of every server's OFFER to its own address, so
            # all instances behind it (dhcp.instance_*, each offering from its own stripe once secs
            # passes lb_max_seconds) read this REQUEST as theirs. Only the instance holding this
            # client's offer (or lease) of the requested address was selected; the others are "not
            # selected" and, per RFC 2131 §4.3.2, say nothing - a NAK would make the client restart
            # (§4.4.1) although the selected server is about to ACK.
            if lease is not None and lease.state == "offered":
                return Decision("not_for_us", state,
                                lease=_intent("unoffer", inp, net, lease.address, inp.now))
            return Decision("not_for_us", state)
        if inp.reserved is not None and want != inp.reserved:
            return nak(inp, net, state, "address reserved elsewhere")
        if _lease_is(lease, want, inp.now) and not inp.requested_taken and net.contains(want):
            return _ack(inp, policy, net, want, state)
        return nak(inp, net, state, "offer no longer valid")
    if state == "init-reboot":
        want = req.requested_ip
        assert want is not None
        if not net.contains(want):
            return nak(inp, net, state, "wrong network")
        if inp.reserved is not None:
            if want == inp.reserved and not inp.requested_taken:
                return _ack(inp, policy, net, want, state)
            return nak(inp, net, state, "address reserved elsewhere")
        if lease is None:
            return Decision("no_record", state)  # §4.3.2: silence, other servers may know it
        if _lease_is(lease, want, inp.now) and not inp.requested_taken:
            return _ack(inp, policy, net, want, state)
        return nak(inp, net, state, "not your address")
    if state in ("renewing", "rebinding"):
        want = req.ciaddr
        if not net.contains(want):
            # Silence, not NAK: §4.3.2 asks for a NAK on a wrong network only in INIT-REBOOT. A
            # unicast RENEW routed through a relay host is also picked up and re-relayed by relay
            # agents (ISC dhcrelay does) with the agent's upstream giaddr; NAKing that copy would
            # tear down a good lease. The copy that reaches us on the right network is answered.
            return Decision("wrong_network", state)
        if inp.reserved is not None:
            if want == inp.reserved and not inp.requested_taken:
                return _ack(inp, policy, net, want, state)
            return nak(inp, net, state, "address reserved elsewhere")
        if lease is None:
            return Decision("no_record", state)
        if _lease_is(lease, want, inp.now) and not inp.requested_taken:
            return _ack(inp, policy, net, want, state)
        return nak(inp, net, state, "not your address")
    return Decision("bad_request", state)


def _decline(inp: Inputs, policy: Policy, net: NetworkView) -> Decision:
    req = inp.packet
    sid = req.server_id
    if sid is not None and not _is_mine(sid, net, inp.selection.relay, policy):
        return Decision("not_for_us", "decline")
    addr = req.requested_ip
    if addr is None:
        raise ParseError("bad_option", "DECLINE without option 50")
    # Only the holder may quarantine an address: otherwise any host could empty the pool.
    if inp.lease is None or inp.lease.address != addr:
        return Decision("decline_not_holder", "decline")
    return Decision("declined", "decline", lease=_intent("decline", inp, net, addr, inp.now))


def _release(inp: Inputs, policy: Policy, net: NetworkView) -> Decision:
    req = inp.packet
    sid = req.server_id
    if sid is not None and not _is_mine(sid, net, inp.selection.relay, policy):
        return Decision("not_for_us", "release")
    addr = req.ciaddr
    if inp.lease is None or inp.lease.address != addr or inp.lease.state != "bound":
        return Decision("release_not_holder", "release")
    return Decision("released", "release", lease=_intent("release", inp, net, addr, inp.now))


def _inform(inp: Inputs, policy: Policy, net: NetworkView) -> Decision:
    req = inp.packet
    if req.ciaddr == ZERO_IP:
        return Decision("bad_inform", "inform")
    plan = _boot(inp, policy, net) if (inp.node is not None or policy.unknown_clients != "ignore") \
        else None
    reply = req.reply(MessageType.ACK)
    reply.ciaddr = req.ciaddr  # §4.3.5: yiaddr 0, no lease time, reply to ciaddr
    relay = inp.selection.relay
    _fill(reply, req, net, _server_id(net, relay, req.giaddr), None, plan, relay)
    dest = _route(req, reply, False)
    return Decision("inform_ack", "inform", reply, dest)
