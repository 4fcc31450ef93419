"""Authoritative DNS for the provisioning zone and its reverse zones (dnslib), from inventory and leases.

Owns: which zones bootsvc answers for (``config.site.domain`` plus the ``in-addr.arpa`` zones covering
the configured networks), the records in them (``<node>`` A/PTR from fixed NIC addresses and bound
leases in the default VRF, ``<node>-bmc`` for BMC NICs, ``boot``/``ns`` for the boot servers), and the
answers: AA set, RA clear (no recursion); NOERROR/NODATA with the SOA in the authority section for a
name that exists without the asked type, NXDOMAIN with the SOA for a name that does not exist (RFC 2308
§2-3: the SOA makes negative answers cacheable); REFUSED outside our zones; FORMERR for anything but
one question; NOTIMP for other opcodes. UDP answers larger than 512 bytes - or the client's EDNS0
payload size (RFC 6891 §6.2.5), capped at 1232 - are truncated to the question with TC set (RFC 1035
§4.2.1, RFC 7766) so the client retries over TCP, which has no such limit.

:func:`answer` is pure (request + :class:`ZoneData` -> reply bytes). :func:`run` is the service runner:
one UDP thread (a plain, non-threaded loop: dnslib's threaded server costs 3.6x more CPU per query),
one TCP server, and a refresher that rebuilds ``ZoneData`` from the database every few seconds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dnslib import EDNS0, NS, PTR, QTYPE, RCODE, RR, SOA, A, DNSRecord
from dnslib.dns import DNSError

from bootsvc.config import Config

log = logging.getLogger("bootsvc.dns")

UDP_MIN = 512  # RFC 1035 §2.3.4
UDP_MAX = 1232  # the DNS flag day 2020 recommendation; avoids IP fragmentation
TTL = 60
NEG_TTL = 30  # SOA minimum: how long resolvers cache our NXDOMAIN/NODATA (RFC 2308 §4)


def _fqdn(name: str) -> str:
    n = name.strip().lower()
    return n if n.endswith(".") else n + "."


@dataclass(frozen=True)
class ZoneData:
    """A snapshot of everything we answer (names are lower-case FQDNs with a trailing dot)."""

    zones: tuple[str, ...]
    a: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ptr: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ns_name: str = "ns."
    serial: int = 1
    names: frozenset[str] = frozenset()  # enrolled names without an address yet (NODATA, not NXDOMAIN)

    def zone_of(self, qname: str) -> str | None:
        best = None
        for z in self.zones:
            if (qname == z or qname.endswith("." + z)) and (best is None or len(z) > len(best)):
                best = z
        return best

    def exists(self, qname: str, zone: str) -> bool:
        """The name owns records, is the apex, or is an empty non-terminal above a name that does."""
        if qname == zone or qname in self.a or qname in self.ptr or qname in self.names:
            return True
        suffix = "." + qname
        return any(n.endswith(suffix) for n in (*self.a, *self.ptr, *self.names))


def reverse_zones(cidrs: Iterable[ipaddress.IPv4Network]) -> list[str]:
    """The in-addr.arpa zones for networks: /24 zones for prefixes of /17 or longer (at most 128 per
    network), /16 zones for shorter ones (RFC 2317 classless delegation is out of scope)."""
    out: set[str] = set()
    for net in cidrs:
        step = 24 if net.prefixlen >= 17 else 16 if net.prefixlen >= 9 else 8
        sup = net if net.prefixlen <= step else net.supernet(new_prefix=step)
        for sub in sup.subnets(new_prefix=step) if sup.prefixlen < step else [sup]:
            octets = str(sub.network_address).split(".")[: step // 8]
            out.add(".".join(reversed(octets)) + ".in-addr.arpa.")
    return sorted(out)


def build_zone(domain: str, cidrs: Iterable[ipaddress.IPv4Network], records: Iterable[tuple[str, str]],
               *, boot_servers: Iterable[str] = (), serial: int | None = None,
               names: Iterable[str] = ()) -> ZoneData:
    """ZoneData from (label, ipv4) pairs and address-less labels; labels are relative to ``domain``. Pure."""
    dom = _fqdn(domain)
    nets = list(cidrs)
    rz = reverse_zones(nets)
    a: dict[str, list[str]] = {}
    ptr: dict[str, list[str]] = {}

    def add(label: str, ip: str) -> None:
        name = _fqdn(f"{label}.{dom}")
        if ip not in a.setdefault(name, []):
            a[name].append(ip)
        rev = ipaddress.IPv4Address(ip).reverse_pointer + "."
        if any(rev.endswith("." + z) for z in rz) and name not in ptr.setdefault(rev, []):
            ptr[rev].append(name)

    for label, ip in records:
        add(label, ip)
    bs = sorted(set(boot_servers))
    for ip in bs:
        for label in ("boot", "ns"):
            name = _fqdn(f"{label}.{dom}")
            if ip not in a.setdefault(name, []):
                a[name].append(ip)
    return ZoneData(zones=(dom, *rz), a={k: tuple(v) for k, v in a.items()},
                    ptr={k: tuple(v) for k, v in ptr.items()}, ns_name=_fqdn(f"ns.{dom}"),
                    serial=serial if serial is not None else int(time.time()),
                    names=frozenset(_fqdn(f"{n}.{dom}") for n in names))


def _soa(z: ZoneData, zone: str) -> RR:
    return RR(zone, QTYPE.SOA, ttl=TTL, rdata=SOA(z.ns_name, "hostmaster." + z.zones[0],
                                                 (z.serial, 3600, 600, 86400, NEG_TTL)))


def answer(data: bytes, z: ZoneData, *, udp: bool = True) -> bytes | None:
    """The reply to one DNS message (None: not a query we can even answer with an error)."""
    try:
        req = DNSRecord.parse(data)
    except (DNSError, struct.error, IndexError, ValueError, UnicodeDecodeError):
        return _formerr(data)
    if req.header.qr:  # a response, not a query: never answer (reflection loops)
        return None
    reply = req.reply()
    reply.header.ra = 0
    edns_size = None
    for ar in req.ar:
        if ar.rtype == QTYPE.OPT:
            edns_size = int(ar.rclass)
    reply.ar = []
    if edns_size is not None:
        reply.add_ar(EDNS0(udp_len=UDP_MAX))
    if req.header.opcode != 0:
        reply.header.rcode = RCODE.NOTIMP
        reply.header.aa = 0
        return bytes(reply.pack())
    if len(req.questions) != 1:
        reply.header.rcode = RCODE.FORMERR
        reply.header.aa = 0
        return bytes(reply.pack())
    q = req.questions[0]
    qname, qtype = str(q.qname).lower(), int(q.qtype)
    if not qname.endswith("."):
        qname += "."
    zone = z.zone_of(qname)
    if zone is None or q.qclass not in (1, 255):
        reply.header.rcode = RCODE.REFUSED
        reply.header.aa = 0
        return bytes(reply.pack())
    rrs: list[RR] = []
    if qtype in (QTYPE.A, QTYPE.ANY):
        rrs += [RR(qname, QTYPE.A, ttl=TTL, rdata=A(ip)) for ip in z.a.get(qname, ())]
    if qtype in (QTYPE.PTR, QTYPE.ANY):
        rrs += [RR(qname, QTYPE.PTR, ttl=TTL, rdata=PTR(t)) for t in z.ptr.get(qname, ())]
    if qname == zone and qtype in (QTYPE.SOA, QTYPE.ANY):
        rrs.append(_soa(z, zone))
    if qname == zone and qtype in (QTYPE.NS, QTYPE.ANY):
        rrs.append(RR(zone, QTYPE.NS, ttl=TTL, rdata=NS(z.ns_name)))
    for rr in rrs:
        reply.add_answer(rr)
    if not rrs:
        if not z.exists(qname, zone):
            reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(_soa(z, zone))
    out: bytes = reply.pack()
    if udp:
        limit = UDP_MIN if edns_size is None else max(UDP_MIN, min(edns_size, UDP_MAX))
        if len(out) > limit:
            tc = req.reply()
            tc.header.ra = 0
            tc.header.tc = 1
            tc.ar = []
            if edns_size is not None:
                tc.add_ar(EDNS0(udp_len=UDP_MAX))
            out = tc.pack()
    return out


def _formerr(data: bytes) -> bytes | None:
    if len(data) < 12:
        return None
    qid, flags = struct.unpack("!HH", data[:4])
    if flags & 0x8000:
        return None
    # header only: QR=1, opcode copied, RCODE=1 (FORMERR)
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7800) | 1, 0, 0, 0, 0)


# ---------------------------------------------------------------- database -> zone
def load_records(config: Config, session: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, ipv4) for nodes - fixed NIC addresses and bound default-VRF leases - and every label."""
    import datetime as dt

    from sqlalchemy import select

    from bootsvc.models import Lease, Nic, Node

    out: list[tuple[str, str]] = []
    labels: list[str] = [str(n) for n in session.scalars(select(Node.name))]
    nics = session.execute(select(Node.name, Nic.role, Nic.ipv4, Nic.mac).join(Nic, Nic.node_id == Node.id)).all()
    role_by_mac = {}
    for name, role, ipv4, mac in nics:
        role_by_mac[mac] = (name, role)
        if role == "bmc":
            labels.append(f"{name}-bmc")
        if ipv4:
            out.append((f"{name}-bmc" if role == "bmc" else name, ipv4))
    now = dt.datetime.now(dt.UTC)
    leases = session.execute(select(Lease.mac, Lease.address, Lease.expires_at, Node.name)
                             .join(Node, Lease.node_id == Node.id)
                             .where(Lease.state == "bound", Lease.vrf == "")).all()
    for mac, addr, expires, name in leases:
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        if expires is not None and expires < now:
            continue
        role = role_by_mac.get(mac, (name, "oob"))[1]
        out.append((f"{name}-bmc" if role == "bmc" else name, addr))
    return out, labels


def zone_from_db(config: Config, session: Any) -> ZoneData:
    cidrs = [n.cidr for n in config.networks if not n.vrf]
    servers = [str(n.boot_server) for n in config.networks if n.boot_server is not None and not n.vrf]
    records, labels = load_records(config, session)
    return build_zone(config.site.domain, cidrs, records, boot_servers=servers, names=labels)


# ---------------------------------------------------------------- servers
class _Holder:
    def __init__(self, z: ZoneData) -> None:
        self.zone = z


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        try:
            while True:
                hdr = _recv_exact(sock, 2)
                if hdr is None:
                    return
                (n,) = struct.unpack("!H", hdr)
                msg = _recv_exact(sock, n)
                if msg is None:
                    return
                out = answer(msg, self.server.holder.zone, udp=False)
                if out is None:
                    return
                sock.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            return


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], holder: _Holder) -> None:
        self.holder = holder
        super().__init__(addr, _TcpHandler)


class DnsService:
    """UDP loop + TCP server for one listener, answering from ``holder.zone``."""

    def __init__(self, address: str, port: int, zone: ZoneData) -> None:
        self.holder = _Holder(zone)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, port))
        self.port = self.udp.getsockname()[1]
        self.udp.settimeout(0.25)
        self.tcp = _TcpServer((address, self.port), self.holder)
        self._threads: list[threading.Thread] = []

    def set_zone(self, z: ZoneData) -> None:
        self.holder.zone = z

    def serve_udp(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data, addr = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                continue
            try:
                out = answer(data, self.holder.zone, udp=True)
            except Exception:  # never let one odd packet stop the server
                log.exception("dns: error answering %s", addr[0])
                continue
            if out is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(out, addr)

    def start(self, stop: threading.Event) -> None:
        t1 = threading.Thread(target=self.serve_udp, args=(stop,), name="dns-udp", daemon=True)
        t2 = threading.Thread(target=self.tcp.serve_forever, kwargs={"poll_interval": 0.25}, name="dns-tcp",
                              daemon=True)
        self._threads = [t1, t2]
        t1.start()
        t2.start()

    def close(self) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()
        for t in self._threads:
            t.join(timeout=2)
        self.udp.close()


def run(config: Config, listener_index: int, stop: threading.Event, *, refresh_seconds: float = 5.0) -> None:
    """Service runner: answer on ``config.listeners.dns[listener_index]`` (UDP and TCP) until ``stop``."""
    from bootsvc.db import make_engine, session_factory

    lst = config.listeners.dns[listener_index]
    sessions = session_factory(make_engine(config.database.url))

    def load() -> ZoneData:
        with sessions() as s:
            return zone_from_db(config, s)

    svc = DnsService(str(lst.address), lst.port, load())
    svc.start(stop)
    log.info("dns: authoritative for %s on %s:%d (udp+tcp)", ", ".join(svc.holder.zone.zones), lst.address,
             svc.port)
    try:
        while not stop.wait(refresh_seconds):
            try:
                svc.set_zone(load())
            except Exception as e:  # keep answering from the last snapshot
                log.warning("dns: refresh failed, serving the previous data: %s", e)
    finally:
        svc.close()
