"""Authoritative DNS for the provisioning zone and its reverse zones (dnslib), from inventory and leases.

Owns: which zones bootsvc answers for (``config.site.domain`` plus the ``in-addr.arpa`` zones covering
the configured networks), the records in them (``<node>`` A/PTR from fixed NIC addresses and bound
leases in the default VRF, ``<node>-bmc`` for BMC NICs, ``boot``/``ns`` for the boot servers), and the
answers: AA set, RA clear (no recursion), RD and CD copied, AD and Z never set (RFC 1035 §4.1.1,
RFC 4035 §3.1.6: no DNSSEC here); NOERROR/NODATA with the SOA in the authority section for a name that
exists without the asked type, NXDOMAIN with the SOA for a name that does not exist, its TTL min(SOA
TTL, MINIMUM) (RFC 2308 §2-3: the SOA makes negative answers cacheable); REFUSED outside our zones
and for zone transfers; FORMERR for anything malformed (QDCOUNT other than 1, a label over 63 or a
name over 255 octets, two OPT RRs); NOTIMP for other opcodes; EDNS (RFC 6891): an OPT in the reply
to an OPT query, BADVERS for a version above 0. UDP answers larger than 512 bytes - or the client's
EDNS0 payload size (RFC 6891 §6.2.5), capped at 1232 - are truncated to the question with TC set (RFC
1035 §4.2.1, RFC 7766) so the client retries over TCP, which has no such limit. The conformance map
with the test for each requirement is docs/conformance.md (DNS).

:func:`answer` is pure (request + :class:`ZoneData` -> reply bytes). :func:`run` is the service runner:
one UDP thread (a plain, non-threaded loop: dnslib's threaded server costs 3.6x more CPU per query),
one TCP server, and a refresher that rebuilds ``ZoneData`` from the database only when
:func:`db_signature` moved, a lease in the zone expired, or a minute passed: rebuilding reads every
node, NIC and lease (~0.1 s CPU at 10 000 pairs) and a resting fleet changes nothing.
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

from dnslib import EDNS0, NS, PTR, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

from bootsvc import metrics
from bootsvc.config import Config

log = logging.getLogger("bootsvc.dns")

UDP_MIN = 512  # RFC 1035 §2.3.4
UDP_MAX = 1232  # the DNS flag day 2020 recommendation; avoids IP fragmentation
TTL = 60
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux <netinet/in.h>
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


def _soa(z: ZoneData, zone: str, ttl: int = TTL) -> RR:
    return RR(zone, QTYPE.SOA, ttl=ttl, rdata=SOA(z.ns_name, "hostmaster." + z.zones[0],
                                                 (z.serial, 3600, 600, 86400, NEG_TTL)))


_QTYPE_AXFR, _QTYPE_IXFR, _QTYPE_OPT = 252, 251, 41
_BADVERS = 16  # RFC 6891 §9: extended RCODE; upper 8 bits (1) in the OPT TTL, lower 4 (0) in the header


class _Malformed(Exception):
    """The query is well-framed but violates the protocol: FORMERR. ``opt``: the reply's OPT when
    the query's EDNS was valid (RFC 6891 §7: a reply to an OPT query carries one)."""

    def __init__(self, why: str, opt: RR | None = None) -> None:
        super().__init__(why)
        self.opt = opt


def _check_name(labels: tuple[bytes, ...]) -> None:
    """RFC 1035 §2.3.4: labels of at most 63 octets, names of at most 255 octets on the wire."""
    if any(len(x) > 63 for x in labels) or sum(len(x) + 1 for x in labels) + 1 > 255:
        raise _Malformed("name too long")


def answer(data: bytes, z: ZoneData, *, udp: bool = True) -> bytes | None:
    """The reply to one DNS message (None: not a query we can even answer with an error). Never
    raises for any input: every malformed query is a FORMERR (RFC 1035 §4.1.1), or no reply when
    not even the header is there or it is a response (QR set; answering those makes loops)."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    opcode = (data[2] >> 3) & 0x0F
    if opcode != 0:
        # RFC 1035 §4.1.1: NOTIMP; only QUERY is implemented (no NOTIFY, UPDATE, IQUERY, STATUS)
        return _header_only(data, 4)
    try:
        req = DNSRecord.parse(data)
    except Exception:  # dnslib signals bad wire data with DNSError, DNSLabelError, struct.error ...
        return _formerr(data)
    try:
        return _answer(req, z, udp)
    except _Malformed as e:
        if e.opt is None:
            return _formerr(data)
        # header, FORMERR and the OPT only: no names (a bad one may be the reason)
        h = req.header
        r = DNSRecord(DNSHeader(id=h.id, qr=1, rd=h.rd, rcode=RCODE.FORMERR))
        r.add_ar(e.opt)
        return bytes(r.pack())


def _answer(req: DNSRecord, z: ZoneData, udp: bool) -> bytes:
    h = req.header
    reply = DNSRecord(DNSHeader(id=h.id, qr=1, aa=1, rd=h.rd, ra=0, opcode=0), q=req.q)
    # RFC 1035 §4.1.1: RD copied, RA clear (no recursion), Z zero. RFC 4035 §3.1.6: AD is never set
    # by a server without validated DNSSEC data (we have none), CD SHOULD be copied.
    reply.header.cd = h.cd
    reply.questions = list(req.questions)  # as asked, case preserved (RFC 4343 §4.1)
    opts = [rr for rr in req.ar if rr.rtype == _QTYPE_OPT]
    edns_size: int | None = None
    if opts:
        if len(opts) > 1:
            raise _Malformed("more than one OPT")  # RFC 6891 §6.1.1
        opt = opts[0]
        if len(opt.rname.label) != 0:
            raise _Malformed("OPT owner is not the root")  # RFC 6891 §6.1.2
        edns_size = int(opt.rclass)
        version = (int(opt.ttl) >> 16) & 0xFF
        if version > 0:
            # RFC 6891 §6.1.3: BADVERS with the highest version we implement (0), nothing else
            reply.header.aa = 0
            reply.add_ar(EDNS0(udp_len=UDP_MAX, ext_rcode=_BADVERS >> 4, version=0))
            return bytes(reply.pack())
        # RFC 6891 §7: an OPT in the reply to an OPT query; RFC 3225 §3: the DO bit copied
        reply.add_ar(EDNS0(udp_len=UDP_MAX, flags="do" if int(opt.ttl) & 0x8000 else ""))
    opt_rr = reply.ar[0] if reply.ar else None
    if len(req.questions) != 1 or h.q != 1:
        raise _Malformed("QDCOUNT must be 1", opt_rr)
    q = req.questions[0]
    try:
        _check_name(tuple(q.qname.label))
    except _Malformed as e:
        raise _Malformed(str(e), opt_rr) from None
    qname, qtype = str(q.qname).lower(), int(q.qtype)
    if not qname.endswith("."):
        qname += "."
    zone = z.zone_of(qname)
    if zone is None or q.qclass not in (1, 255) or qtype in (_QTYPE_AXFR, _QTYPE_IXFR):
        # outside our zones, another class, or a zone transfer (not offered: RFC 5936 §2.2 lets a
        # server refuse): REFUSED, not authoritative
        reply.header.rcode = RCODE.REFUSED
        reply.header.aa = 0
        return bytes(reply.pack())
    owner = q.qname  # answers carry the name as asked (RFC 4343 §4.1: case preserved)
    rrs: list[RR] = []
    if qtype in (QTYPE.A, QTYPE.ANY):
        rrs += [RR(owner, QTYPE.A, ttl=TTL, rdata=A(ip)) for ip in z.a.get(qname, ())]
    if qtype in (QTYPE.PTR, QTYPE.ANY):
        rrs += [RR(owner, QTYPE.PTR, ttl=TTL, rdata=PTR(t)) for t in z.ptr.get(qname, ())]
    if qname == zone and qtype in (QTYPE.SOA, QTYPE.ANY):
        rrs.append(_soa(z, zone))
    if qname == zone and qtype in (QTYPE.NS, QTYPE.ANY):
        rrs.append(RR(zone, QTYPE.NS, ttl=TTL, rdata=NS(z.ns_name)))
    for rr in rrs:
        reply.add_answer(rr)
    if not rrs:
        if not z.exists(qname, zone):
            reply.header.rcode = RCODE.NXDOMAIN
        # RFC 2308 §3: the SOA of a negative answer has TTL min(SOA TTL, SOA MINIMUM)
        reply.add_auth(_soa(z, zone, min(TTL, NEG_TTL)))
    out = bytes(reply.pack())
    if udp:
        # RFC 1035 §4.2.1: 512 without EDNS; RFC 6891 §6.2.5: the advertised size, never below 512;
        # at most UDP_MAX (no IP fragmentation)
        limit = UDP_MIN if edns_size is None else max(UDP_MIN, min(edns_size, UDP_MAX))
        if len(out) > limit:
            # TC with the question (and OPT) only: the client retries over TCP (RFC 7766 §5)
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
            out = bytes(reply.pack())
    return out


def _header_only(data: bytes, rcode: int) -> bytes:
    """A reply of just the header: ID, opcode and RD copied, QR set, the RCODE, no sections."""
    qid, flags = struct.unpack("!HH", data[:4])
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


def _formerr(data: bytes) -> bytes:
    return _header_only(data, 1)


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


def db_signature(session: Any) -> tuple[Any, ...]:
    """Aggregates the database computes over what the zone is built from (no rows to Python): node
    and NIC counts, maximum ids, id-weighted sums of name length, NIC node, role and address length,
    and the leases' count, id sum and latest ``updated_at`` (every lease write sets it). Equal
    signatures: nothing the zone shows changed, except writes that keep every aggregate (a rename
    to a name of the same length, an address swapped for one of the same length) - the runner
    rebuilds every minute anyway - and leases expiring with time (the runner tracks the next one)."""
    from sqlalchemy import func, select

    from bootsvc.models import Lease, Nic, Node

    z = 0
    nodes = session.execute(select(func.count(), func.coalesce(func.max(Node.id), z),
                                   func.coalesce(func.sum(func.length(Node.name) * Node.id), z))).one()
    nics = session.execute(select(func.count(), func.coalesce(func.max(Nic.id), z),
                                  func.coalesce(func.sum(Nic.node_id * Nic.id), z),
                                  func.coalesce(func.sum(func.length(Nic.role) * Nic.id), z),
                                  func.coalesce(func.sum(func.coalesce(func.length(Nic.ipv4), z) * Nic.id), z))).one()
    leases = session.execute(select(func.count(), func.coalesce(func.sum(Lease.id), z),
                                    func.max(Lease.updated_at))).one()
    return tuple(nodes), tuple(nics), tuple(leases)


def next_expiry(session: Any) -> float | None:
    """When the earliest bound default-VRF lease still in the zone expires (epoch seconds)."""
    import datetime as dt

    from sqlalchemy import func, select

    from bootsvc.models import Lease

    now = dt.datetime.now(dt.UTC)
    v = session.execute(select(func.min(Lease.expires_at)).where(
        Lease.state == "bound", Lease.vrf == "", Lease.expires_at > now)).scalar()
    if v is None:
        return None
    if v.tzinfo is None:
        v = v.replace(tzinfo=dt.UTC)
    return float(v.timestamp())


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
    """RFC 7766 DNS over TCP: 2-byte length prefix, any number of queries per connection (answered
    in order, pipelined queries included), closed by us after ``idle_timeout`` without a query or
    when one message takes longer than ``idle_timeout`` to arrive (§6.2.3: a server may close idle
    connections and should protect itself), and at most ``max_connections`` at once (§6.2.2)."""

    server: _TcpServer

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        if not srv.slots.acquire(blocking=False):
            srv.count("tcp_refused")
            return  # over the limit: closing at once is the cheapest clear answer
        srv.count("tcp_connections")
        try:
            while True:
                hdr = _recv_exact(sock, 2, time.monotonic() + srv.idle_timeout)
                if hdr is None:
                    return
                (n,) = struct.unpack("!H", hdr)
                msg = _recv_exact(sock, n, time.monotonic() + srv.idle_timeout)
                if msg is None:
                    return
                srv.count("tcp_queries")
                out = answer(msg, srv.holder.zone, udp=False)
                if out is None:
                    srv.count("dropped")
                    return
                sock.sendall(struct.pack("!H", len(out)) + out)
        except OSError:  # reset by the peer, or our own timeout
            return
        finally:
            srv.slots.release()


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """Exactly ``n`` bytes before ``deadline``, or None (closed by the peer, or too slow)."""
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], holder: _Holder, counters: dict[str, int], *,
                 idle_timeout: float, max_connections: int) -> None:
        self.holder = holder
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        super().__init__(addr, _TcpHandler)

    def count(self, key: str) -> None:
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + 1


class DnsService:
    """UDP loop + TCP server for one listener, answering from ``holder.zone``.

    Bound to a wildcard address, the UDP loop answers from the address each query was sent to
    (IP_PKTINFO): RFC 2181 §4.1, a resolver drops replies from another source address."""

    def __init__(self, address: str, port: int, zone: ZoneData, *, tcp_idle_timeout: float = 10.0,
                 tcp_max_connections: int = 64) -> None:
        self.holder = _Holder(zone)
        self.counters: dict[str, int] = {}
        self.wildcard = ipaddress.IPv4Address(address).is_unspecified
        # port 0: any port free for UDP *and* TCP (the kernel picks the UDP one; its TCP twin may be
        # taken, then try another)
        for attempt in range(20 if port == 0 else 1):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((address, port))
            self.port = self.udp.getsockname()[1]
            try:
                self.tcp = _TcpServer((address, self.port), self.holder, self.counters,
                                      idle_timeout=tcp_idle_timeout, max_connections=tcp_max_connections)
                break
            except OSError:
                self.udp.close()
                if attempt == 19 or port != 0:
                    raise
        if self.wildcard:
            self.udp.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        self.udp.settimeout(0.25)
        self._threads: list[threading.Thread] = []

    def set_zone(self, z: ZoneData) -> None:
        self.holder.zone = z

    def serve_udp(self, stop: threading.Event) -> None:
        c = self.counters
        while not stop.is_set():
            try:
                data, anc, _flags, addr = self.udp.recvmsg(4096, 64)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                continue
            c["udp_queries"] = c.get("udp_queries", 0) + 1
            try:
                out = answer(data, self.holder.zone, udp=True)
            except Exception:  # answer() handles every input; this is a bug, not hostile input
                log.exception("dns: error answering %s", addr[0])
                c["errors"] = c.get("errors", 0) + 1
                continue
            if out is None:
                c["dropped"] = c.get("dropped", 0) + 1
                continue
            reply_anc = []
            for level, typ, cdata in anc:
                if level == socket.IPPROTO_IP and typ == _IP_PKTINFO and len(cdata) >= 12:
                    # struct in_pktinfo {ifindex, spec_dst, addr}: send from the query's destination
                    reply_anc = [(socket.IPPROTO_IP, _IP_PKTINFO, bytes(4) + cdata[8:12] + bytes(4))]
            with contextlib.suppress(OSError):
                self.udp.sendmsg([out], reply_anc, 0, addr)

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

    # what the zone was built from: rebuild only when it moved (module docstring)
    last: dict[str, Any] = {"sig": None, "at": 0.0, "expiry": None}

    def load() -> ZoneData:
        with sessions() as s:
            sig = db_signature(s)  # before the rows: a write in between shows at the next look
            z = zone_from_db(config, s)
            last.update(sig=sig, at=time.monotonic(), expiry=next_expiry(s))
        return z

    def stale() -> bool:
        exp = last["expiry"]
        if time.monotonic() - last["at"] >= 60.0 or (exp is not None and time.time() >= exp):
            return True
        with sessions() as s:
            return bool(db_signature(s) != last["sig"])

    svc = DnsService(str(lst.address), lst.port, load())
    # the process's metrics flusher copies these into /metrics (bootsvc_dns_events_total{event})
    metrics.counters.add_source(lambda: [
        metrics.Sample("bootsvc_dns_events_total", (("event", k),), float(v), "counter")
        for k, v in dict(svc.counters).items()])
    svc.start(stop)
    log.info("dns: authoritative for %s on %s:%d (udp+tcp)", ", ".join(svc.holder.zone.zones), lst.address,
             svc.port)
    try:
        while not stop.wait(refresh_seconds):
            try:
                if stale():
                    svc.set_zone(load())
            except Exception as e:  # keep answering from the last snapshot
                log.warning("dns: refresh failed, serving the previous data: %s", e)
    finally:
        svc.close()
