"""DHCPv4 relay for the DPU's host port: client <-> bootsvc across the tenant/Zone 0 boundary.

Owns: the relay packet transforms (pure, :func:`to_server` / :func:`to_client`) and the socket loop
(:class:`RelayServer`). Uses :mod:`bootsvc.dhcp.packet` as the codec (no second codec here).

Towards the server (RFC 2131 §4.1, RFC 1542 §4.1.1, RFC 3046 §2.1):
* drop anything but BOOTREQUESTs, and requests whose hop count already reached the limit;
* drop requests from the host that already carry option 82 or a non-zero giaddr: the host port is
  an untrusted circuit (RFC 3046 §2.1 "MUST discard");
* hops + 1, giaddr = our Zone 0 address (see ``docs/agent-api.md``: tenant gateways overlap),
  option 82 appended as the last option with circuit-id (1), remote-id (2), link-selection (5,
  RFC 3527), server-id-override (11, RFC 5107), VSS (151, type 0 = VRF name) and VSS-Control (152,
  RFC 6607 §3.1);
* the same bytes to every server of the policy (several bootsvc instances): a relay configured with
  several server addresses forwards each request to all of them (ISC dhcrelay(8): "forwards it to the
  list of DHCP servers specified on the command line"; switch relays with several server addresses do
  the same). The servers share one lease database and decide among themselves who answers (RFC 2131
  §4.2, ``bootsvc.dhcp.leases``); every reply comes back to giaddr.
Towards the client (RFC 3046 §2.2, RFC 6607 §3.3, RFC 2131 §4.1):
* drop replies without option 82, with someone else's circuit-id or giaddr, or still carrying
  VSS-Control (the server did not understand VSS, so the address may come from the wrong VPN);
* strip option 82; deliver to ciaddr if set, broadcast if the broadcast flag is set or the reply is
  a NAK (or has no yiaddr), else unicast to yiaddr at chaddr.

Sockets: one UDP socket on the host port bound with SO_BINDTODEVICE (works whether the port is a VRF
slave or a policy-routed port, without ``udp_l3mdev_accept``, which would expose every unbound
service of the DPU to the tenant), one UDP socket on the Zone 0 address (port 67, where bootsvc sends
its replies to giaddr).
"""

from __future__ import annotations

import fcntl
import logging
import select
import socket
import struct
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from bootsvc.dhcp.packet import (
    BOOTREPLY,
    BOOTREQUEST,
    SUB_CIRCUIT_ID,
    SUB_LINK_SELECTION,
    SUB_REMOTE_ID,
    SUB_SERVER_ID_OVERRIDE,
    SUB_VSS,
    SUB_VSS_CONTROL,
    MessageType,
    ParseError,
    encode_suboptions,
    parse,
)

log = logging.getLogger(__name__)

MAX_HOPS = 16  # RFC 1542 §4.1.1: relays SHOULD discard at a configurable limit (default 4..16)
ZERO = b"\x00\x00\x00\x00"
SERVER_PORT = 67
CLIENT_PORT = 68
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SIOCSARP = 0x8955
ATF_COM = 0x02
ARPHRD_ETHER = 1


@dataclass(frozen=True)
class RelayParams:
    host_port: str
    giaddr: IPv4Address  # Zone 0 address of this DPU; bootsvc replies here
    servers: tuple[IPv4Address, ...]  # every bootsvc DHCP server; each request goes to all
    circuit_id: bytes
    remote_id: bytes
    vss_vrf: str
    link_selection: IPv4Address | None = None
    server_id_override: IPv4Address | None = None
    max_hops: int = MAX_HOPS


@dataclass(frozen=True)
class Delivery:
    """Where a reply goes on the host segment."""

    packet: bytes
    dst: IPv4Address  # 255.255.255.255 for broadcast
    chaddr: bytes  # hardware address, for the unicast-before-ARP case
    broadcast: bool


def option82(p: RelayParams) -> bytes:
    subs: list[tuple[int, bytes]] = [(SUB_CIRCUIT_ID, p.circuit_id), (SUB_REMOTE_ID, p.remote_id)]
    if p.link_selection is not None:
        subs.append((SUB_LINK_SELECTION, p.link_selection.packed))
    if p.server_id_override is not None:
        subs.append((SUB_SERVER_ID_OVERRIDE, p.server_id_override.packed))
    # RFC 6607 §3.1: type 0 = NVT-ASCII VPN identifier; 152 (length 0) asks the server to confirm
    subs.append((SUB_VSS, b"\x00" + p.vss_vrf.encode("ascii")))
    subs.append((SUB_VSS_CONTROL, b""))
    return encode_suboptions(subs)


def to_server(data: bytes, p: RelayParams) -> tuple[bytes | None, str]:
    """Client request -> bytes to send to the server, or (None, reason) to drop."""
    try:
        pkt = parse(data)
    except ParseError as e:
        return None, f"parse:{e.reason}"
    if pkt.op != BOOTREQUEST or not pkt.is_dhcp:
        return None, "not_request"
    if pkt.hops >= p.max_hops:
        return None, "hops"
    if pkt.giaddr != ZERO or 82 in pkt.options:
        return None, "untrusted_option82"
    pkt.hops += 1
    pkt.giaddr = p.giaddr.packed
    pkt.options.pop(82, None)
    pkt.options[82] = option82(p)  # last option before End (RFC 3046 §2.1)
    return pkt.encode(), "ok"


def to_client(data: bytes, p: RelayParams) -> tuple[Delivery | None, str]:
    """Server reply -> delivery on the host segment, or (None, reason) to drop."""
    try:
        pkt = parse(data)
        info = pkt.relay_info()
    except ParseError as e:
        return None, f"parse:{e.reason}"
    if pkt.op != BOOTREPLY or not pkt.is_dhcp:
        return None, "not_reply"
    if pkt.giaddr != p.giaddr.packed:
        return None, "giaddr"
    if info is None:
        return None, "no_option82"  # server ignored 82, hence VSS too: wrong address space
    if info.vss_control:
        return None, "vss_not_understood"  # RFC 6607 §3.3
    if info.circuit_id != p.circuit_id:
        return None, "circuit_id"
    del pkt.options[82]  # RFC 3046 §2.2: never leak relay information to the client
    out = pkt.encode()
    chaddr = pkt.chaddr[: pkt.hlen]
    if pkt.ciaddr != ZERO:
        return Delivery(out, IPv4Address(pkt.ciaddr), chaddr, False), "ok"
    if pkt.broadcast or pkt.msg_type == MessageType.NAK or pkt.yiaddr == ZERO:
        return Delivery(out, IPv4Address("255.255.255.255"), chaddr, True), "ok"
    return Delivery(out, IPv4Address(pkt.yiaddr), chaddr, False), "ok"


@dataclass
class RelayStats:
    requests: int = 0
    replies: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.requests, "replies": self.replies, "dropped": self.dropped,
                "reasons": dict(self.reasons)}


def _set_arp(sock: socket.socket, dev: str, ip: IPv4Address, mac: bytes) -> None:
    """Install a neighbour entry so a unicast reply reaches a client that has no address yet and so
    cannot answer ARP (RFC 2131 §4.1: "... to the client's hardware address and 'yiaddr'").
    struct arpreq: sockaddr arp_pa, sockaddr arp_ha, int flags, sockaddr netmask, char dev[16]."""
    pa = struct.pack("!HH4s8x", socket.AF_INET, 0, ip.packed)
    pa = struct.pack("=H", socket.AF_INET) + pa[2:]  # sa_family is host order
    ha = struct.pack("=H", ARPHRD_ETHER) + mac[:6].ljust(14, b"\x00")
    req = pa + ha + struct.pack("=i", ATF_COM) + bytes(16) + dev.encode()[:15].ljust(16, b"\x00")
    fcntl.ioctl(sock.fileno(), SIOCSARP, req)


class RelayServer:
    """Two sockets and one thread. ``start()`` binds (raises OSError if it cannot), ``stop()`` joins."""

    def __init__(self, params: RelayParams) -> None:
        self.params = params
        self.stats = RelayStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down: socket.socket | None = None
        self._up: socket.socket | None = None

    def start(self) -> None:
        p = self.params
        down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            down.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            down.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            down.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, p.host_port.encode())
            down.bind(("0.0.0.0", SERVER_PORT))
            up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            up.bind((str(p.giaddr), SERVER_PORT))
        except OSError:
            down.close()
            up.close()
            raise
        self._down, self._up = down, up
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"relay-{p.host_port}", daemon=True)
        self._thread.start()
        log.info("relay: %s <-> %s (giaddr %s, vss %s)", p.host_port, ",".join(map(str, p.servers)),
                 p.giaddr, p.vss_vrf)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for s in (self._down, self._up):
            if s is not None:
                s.close()
        self._down = self._up = None

    def _loop(self) -> None:
        down, up = self._down, self._up
        assert down is not None and up is not None
        p = self.params
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([down, up], [], [], 0.5)
            except (OSError, ValueError):
                return
            for s in ready:
                try:
                    data, _src = s.recvfrom(4096)
                except OSError:
                    continue
                if s is down:
                    self._handle_request(data, p, up)
                else:
                    self._handle_reply(data, p, down)

    def _handle_request(self, data: bytes, p: RelayParams, up: socket.socket) -> None:
        out, why = to_server(data, p)
        if out is None:
            self.stats.drop(why)
            return
        sent = 0
        for server in p.servers:
            try:
                up.sendto(out, (str(server), SERVER_PORT))
                sent += 1
            except OSError as e:  # one unreachable server must not keep the request from the others
                self.stats.drop("send_server")
                log.warning("relay: send to %s failed: %s", server, e)
        if sent:
            self.stats.requests += 1

    def _handle_reply(self, data: bytes, p: RelayParams, down: socket.socket) -> None:
        d, why = to_client(data, p)
        if d is None:
            self.stats.drop(why)
            return
        try:
            if not d.broadcast and len(d.chaddr) == 6:
                _set_arp(down, p.host_port, d.dst, d.chaddr)
            down.sendto(d.packet, (str(d.dst), CLIENT_PORT))
            self.stats.replies += 1
        except OSError as e:
            self.stats.drop("send_client")
            log.warning("relay: send to client %s failed: %s", d.dst, e)
