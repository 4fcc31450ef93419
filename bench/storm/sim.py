"""The storm's simulated hardware (bench/storm/run.py ``--child``, inside the simulator's namespace).

Owns: one asyncio Redfish service for every BMC (the BMC is the local address a connection came
to), and the firmware + installer + agent of every node, started by a power-on with a PXE boot
override. Everything goes over real sockets to the real bootsvc: relayed DHCP (UDP 67, giaddr and
option 82 like a leaf relay; VSS sub-options 151/152 for hosts, RFC 6607), TFTP (RFC 1350 with the
RFC 2348 blksize option), HTTP/1.1. What a BMC accepts is the subset of DSP0266/DSP0268 that bootsvc's
Redfish driver uses (service root, SessionService sessions, ComputerSystem Boot PATCH and Reset).

Several bootsvc instances (``--servers``): the relay forwards every client packet to each of them, as
a leaf relay with several helper addresses does (RFC 3046 relay agents; ``ip helper-address`` given
more than once); the client takes the first OFFER and names its server in the REQUEST's option 54,
the other servers stay silent (RFC 2131 §4.3.2). A node then fetches from the server that ACKed it
(its next-server, the URLs that server rendered) and, when that server stops answering (connection
refused, timeouts), from the next one in ``--servers``: what an anycast boot address with a
health-checked route, or an L4 load balancer, gives a client whose retry lands on a live instance.
Every ACK a client received is kept (``acks`` in the report) so the harness can check that each is
still bound to that client in the database.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import random
import re
import signal
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from bootsvc.dhcp.packet import Packet, encode_suboptions, ip_bytes, parse

SRV = "198.18.0.1"
DPU_RELAY, HOST_RELAY = "10.98.0.2", "10.0.0.1"
VRF = "acme"
HTTP_PORT, BMC_PORT = 8080, 8000
RETRIES = 6
AGENT_POLL_MIN, AGENT_POLL_MAX = 5.0, 900.0  # bootsvc/agent/main.py AgentConfig poll_min / poll_max defaults

errors: collections.Counter[str] = collections.Counter()
actions: collections.Counter[str] = collections.Counter()  # (bmc, ResetType) -> count
patches: collections.Counter[str] = collections.Counter()
not_found: collections.Counter[str] = collections.Counter()  # "METHOD path" the simulated BMCs answered 404
servers: list[str] = [SRV]  # every bootsvc instance's address (--servers)
acks: list[tuple[str, str, str, str]] = []  # (mac, address, giaddr, server id) of every DHCPACK received
acks_by_server: collections.Counter[str] = collections.Counter()
ack_from: dict[bytes, str] = {}  # MAC -> the instance whose ACK it took last


# What each boot stage takes on real hardware, in seconds (``--delays``). Zero by default: the
# control-plane number. Nothing in this repository or in /work/shared/docs/bluefield-real.md measures
# these stages on a BlueField-3 or its host (§3 there gives only the budget NVIDIA's tools allow an
# install, 40 minutes, and BootProgress refreshed about every 30 s), so the ``assumed`` profile is an
# ASSUMPTION to be replaced by a site's own numbers: UEFI POST of the DPU's Arm to its first PXE DHCP,
# the BFB installer writing the OS (between bf.cfg's pre- and post-install hooks), the reboot into
# DOCA until the agent's first check-in, the host's server POST to its PXE DHCP, the host installer.
DELAY_STAGES = ("dpu_post", "dpu_install", "dpu_reboot", "host_post", "host_install")
DELAY_PROFILES = {
    "zero": "",
    "assumed": "dpu_post=60,dpu_install=300,dpu_reboot=90,host_post=180,host_install=600",
}


def parse_delays(spec: str) -> dict[str, float]:
    """``stage=seconds,...`` or a profile name (``DELAY_PROFILES``) -> {stage: seconds}."""
    spec = DELAY_PROFILES.get(spec, spec)
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        k, sep, v = item.partition("=")
        if not sep or k not in DELAY_STAGES:
            raise SystemExit(f"--delays: {item!r} is not STAGE=SECONDS with STAGE one of {', '.join(DELAY_STAGES)} "
                             f"(or a profile: {', '.join(DELAY_PROFILES)})")
        out[k] = float(v)
    return out


def bmc_index(ip: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"10\.200\.(\d+)\.(\d+)", ip)
    if not m:
        return None
    k = int(m.group(1)) * 250 + int(m.group(2)) - 1
    return k // 2, ("dpu" if k % 2 else "host")


def mac_of(i: int, kind: str) -> bytes:
    return bytes([0x02, 0x5D if kind == "dpu" else 0x5B, 0, (i >> 16) & 255, (i >> 8) & 255, i & 255])


def name_of(i: int, kind: str) -> str:
    return f"h{i:05d}" + ("-dpu" if kind == "dpu" else "")


# ------------------------------------------------------------------------------------------ HTTP client
class _OneRequest(asyncio.Protocol):
    """One HTTP/1.1 request on its own TCP connection (``Connection: close``, as firmware and the agent's
    urllib send): the request goes out in ``connection_made``, the answer is collected in
    ``data_received`` and parsed once when it is complete (Content-Length reached, or the server closed).
    A protocol instead of asyncio streams: no coroutine wake-up per header line or read, the same bytes on
    the wire (the simulator's CPU counts in the storm's total)."""

    def __init__(self, req: bytes, done: asyncio.Future[tuple[int, bytes]]) -> None:
        self.req, self.done = req, done
        self.buf = bytearray()  # until the head is complete
        self.body: list[bytes] = []  # then the body's pieces as they came (joined once: one copy)
        self.got = 0
        self.transport: asyncio.Transport | None = None
        self.head_end = -1
        self.status = 0
        self.length: int | None = None
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.req)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.head_end >= 0:
            self.body.append(data)
            self.got += len(data)
        else:
            self.buf += data
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self.head_end = i + 4
            rest = bytes(self.buf[self.head_end:])
            self.body, self.got = [rest], len(rest)
            lines = bytes(self.buf[:i]).decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) < 2 or not parts[1].isdigit():
                self._fail(ConnectionError("no HTTP status line"))
                return
            self.status = int(parts[1])
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    self.length = int(v.strip())
                elif k == "transfer-encoding" and "chunked" in v:
                    self.chunked = True
        if self.length is not None and self.got >= self.length:
            b = b"".join(self.body)
            self._finish(b if len(b) == self.length else b[:self.length])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.head_end < 0:
            self._fail(ConnectionError("no HTTP status line"))
        elif self.length is not None:  # closed before Content-Length bytes arrived
            self._fail(asyncio.IncompleteReadError(b"".join(self.body), self.length))
        elif self.chunked:
            try:
                self._finish(_dechunk(b"".join(self.body)))
            except ValueError:
                self._fail(asyncio.IncompleteReadError(b"".join(self.body), None))
        else:  # no length: the body runs to the close (RFC 9112 §6.3)
            self._finish(b"".join(self.body))

    def _finish(self, body: bytes) -> None:
        if not self.done.done():
            self.done.set_result((self.status, body))
        assert self.transport is not None
        self.transport.close()

    def _fail(self, e: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(e)
        if self.transport is not None:
            self.transport.close()


def _dechunk(b: bytes) -> bytes:
    """A chunked body (RFC 9112 §7.1) -> its bytes; ValueError when it is cut short."""
    out, i = bytearray(), 0
    while True:
        j = b.index(b"\r\n", i)
        n = int(b[i:j].split(b";")[0].strip() or b"0", 16)
        if n == 0:
            return bytes(out)
        if j + 2 + n > len(b):
            raise ValueError("chunk cut short")
        out += b[j + 2:j + 2 + n]
        i = j + 2 + n + 2


async def http(method: str, url: str, src: str, *, headers: dict[str, str] | None = None,
               body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or SRV, u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    hdr = {"Host": f"{host}:{port}", "User-Agent": "storm-firmware", "Connection": "close", **(headers or {})}
    if body is not None:
        hdr["Content-Length"] = str(len(body))
    req = (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdr.items()) + "\r\n") \
        .encode() + (body or b"")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, bytes]] = loop.create_future()
    # asyncio.timeout, not wait_for: the same deadlines without a task wrapped around every await
    async with asyncio.timeout(timeout):
        tr, _ = await loop.create_connection(lambda: _OneRequest(req, done), host, port, local_addr=(src, 0))
    try:
        async with asyncio.timeout(timeout):
            return await done
    finally:
        tr.close()


# ------------------------------------------------------------------------------------------ DHCP relay
class Relay(asyncio.DatagramProtocol):
    """A leaf relay's UDP 67 socket: forwards the nodes' requests to bootsvc, hands back the replies."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Queue[tuple[Packet, str]]] = {}  # xid -> (reply, its sender)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            p = parse(data)
        except Exception:
            errors["dhcp_unparsable_reply"] += 1
            return
        q = self.waiting.get(p.xid)
        if q is not None:
            q.put_nowait((p, addr[0]))


_xid = [int.from_bytes(os.urandom(3), "big") << 8]


async def dora(relay: Relay, giaddr: str, mac: bytes, extra: dict[int, bytes], subs: list[tuple[int, bytes]]) \
        -> Packet:
    """DISCOVER/OFFER/REQUEST/ACK through ``relay``, retransmitting like a PXE ROM (4 s, then doubling)."""
    _xid[0] += 1
    xid = _xid[0] & 0xFFFFFFFF
    q: asyncio.Queue[tuple[Packet, str]] = asyncio.Queue()
    relay.waiting[xid] = q
    assert relay.transport is not None

    started = time.monotonic()

    def send(mt: int, more: dict[int, bytes]) -> None:
        o = {53: bytes((mt,)), 55: bytes([1, 3, 6, 51, 54, 66, 67]), 61: b"\x01" + mac, **extra, **more,
             82: encode_suboptions(subs)}
        # secs: seconds since the client began this acquisition (RFC 2131 §2, table 1), what several
        # instances' load balancing reads to answer a dead instance's share (bootsvc/dhcp/server.py)
        secs = min(int(time.monotonic() - started), 0xFFFF)
        data = Packet(op=1, xid=xid, hops=1, secs=secs, giaddr=ip_bytes(giaddr), chaddr=mac.ljust(16, b"\0"),
                      options=o).encode()
        for srv in servers:  # a relay with several helper addresses forwards to each (RFC 3046 §2.1)
            relay.transport.sendto(data, (srv, 67))  # type: ignore[union-attr]

    async def want(mt: int, wait: float) -> tuple[Packet, str] | None:
        end = time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    p, frm = await q.get()
            except TimeoutError:
                return None
            if p.options.get(53) == bytes((mt,)):
                return p, frm
            if p.options.get(53) == b"\x06":
                errors["dhcp_nak"] += 1
                return None
        return None

    try:
        wait = 4.0
        for _ in range(RETRIES):
            send(1, {})
            got = await want(2, wait)
            if got is not None:
                offer = got[0]
                send(3, {50: offer.yiaddr, 54: offer.options[54]})
                got = await want(5, wait)
                if got is not None:
                    # who answered: the reply's source address (a host's option 54 is its relay's
                    # server-id-override, the same whichever instance answered)
                    ack, frm = got
                    acks.append((mac.hex(":"), ".".join(str(x) for x in ack.yiaddr), giaddr, frm))
                    acks_by_server[frm] += 1
                    ack_from[mac] = frm
                    return ack
            errors["dhcp_retransmit"] += 1
            wait = min(wait * 2, 16.0)
        raise RuntimeError("dhcp: no ACK")
    finally:
        relay.waiting.pop(xid, None)


def filename(p: Packet) -> str:
    v = p.options.get(67) or p.file.split(b"\0", 1)[0]
    return v.decode()


# ------------------------------------------------------------------------------------------ TFTP
class _TftpGet(asyncio.DatagramProtocol):
    """One lock-step TFTP read (RFC 1350 §6, RFC 2347 OACK, RFC 2348 blksize), driven from
    ``datagram_received``: each DATA is ACKed in the callback that received it, as a firmware's UDP
    receive path does, instead of waking a coroutine per block. Lost packets: the last packet sent is
    sent again after 2 s without progress (one timer re-armed lazily, not one per block), at most 5
    times in a row. The packets on the wire are the same as a coroutine loop would send."""

    TIMEOUT = 2.0

    def __init__(self, rrq: bytes, server: str, done: asyncio.Future[int]) -> None:
        self.rrq, self.dest, self.done = rrq, (server, 69), done
        self.last = rrq
        self.got, self.expect, self.size, self.tries = 0, 1, 512, 0
        self.moved = 0.0
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send(self.rrq)
        loop = asyncio.get_running_loop()
        self.moved = loop.time()
        self.timer = loop.call_at(self.moved + self.TIMEOUT, self._tick)

    def _send(self, pkt: bytes) -> None:
        self.last = pkt
        assert self.transport is not None
        self.transport.sendto(pkt, self.dest)

    def _tick(self) -> None:
        if self.done.done():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self.moved < self.TIMEOUT:  # progress since: wait for the rest of the 2 s
            self.timer = loop.call_at(self.moved + self.TIMEOUT, self._tick)
            return
        self.tries += 1
        errors["tftp_retransmit"] += 1
        if self.tries > 5:
            self.done.set_exception(RuntimeError("tftp: timeout"))
            return
        assert self.transport is not None
        self.transport.sendto(self.last, self.dest)
        self.moved = now
        self.timer = loop.call_at(now + self.TIMEOUT, self._tick)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done() or len(data) < 4:
            return
        op = (data[0] << 8) | data[1]
        if op == 5:
            self.done.set_exception(RuntimeError(f"tftp error {data[4:-1].decode(errors='replace')}"))
            return
        if op == 6:  # OACK (RFC 2347): the server's transfer port; ACK block 0
            opts = data[2:].split(b"\0")
            d = dict(zip(opts[0::2], opts[1::2], strict=False))
            self.size = int(d.get(b"blksize", b"512"))
            self.dest = addr
            self.moved = asyncio.get_running_loop().time()
            self._send(b"\x00\x04\x00\x00")
            return
        if op == 3:
            blk = (data[2] << 8) | data[3]
            self.dest = addr
            if blk == (self.expect & 0xFFFF):
                self.got += len(data) - 4
                self.expect += 1
                self.tries = 0
                self.moved = asyncio.get_running_loop().time()
            self._send(b"\x00\x04" + data[2:4])
            if blk == ((self.expect - 1) & 0xFFFF) and len(data) - 4 < self.size:
                self.done.set_result(self.got)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable while an instance is down: the retransmit timer decides


async def tftp_get(src: str, name: str, server: str = SRV, blksize: int = 1468) -> int:
    """RRQ ``name`` (octet, blksize) from bootsvc; returns the bytes received. Lock-step, retransmits."""
    loop = asyncio.get_running_loop()
    rrq = b"\x00\x01" + name.encode() + b"\0octet\0blksize\0" + str(blksize).encode() + b"\0"
    done: asyncio.Future[int] = loop.create_future()
    tr, pr = await loop.create_datagram_endpoint(lambda: _TftpGet(rrq, server, done), local_addr=(src, 0))
    try:
        return await done
    finally:
        if pr.timer is not None:
            pr.timer.cancel()
        tr.close()


# ------------------------------------------------------------------------------------------ servers
@dataclass
class Via:
    """The bootsvc instance a node talks to: the one that ACKed it, then the next one while it is down."""

    server: str = SRV

    def url(self, u: str) -> str:
        """``u`` (rendered by whichever instance) pointed at this node's current instance."""
        p = urllib.parse.urlsplit(u)
        return urllib.parse.urlunsplit(p._replace(netloc=f"{self.server}:{p.port or 80}"))

    def acked_by(self, ack: Packet) -> None:
        """The instance that sent this ACK (its next-server and URLs are that instance's)."""
        frm = ack_from.get(ack.chaddr[:6])
        if frm in servers:
            self.server = frm

    def failover(self) -> None:
        if len(servers) > 1:
            self.server = servers[(servers.index(self.server) + 1) % len(servers)] \
                if self.server in servers else servers[0]
            errors["failover to another instance"] += 1


def _unreachable(e: BaseException) -> bool:
    """A failure that says the instance is gone (not an HTTP answer from a live one)."""
    return isinstance(e, (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError)) or \
        str(e) in ("tftp: timeout", "no HTTP status line")


# ------------------------------------------------------------------------------------------ BMCs
# The Manager each BMC answers, the fields of a real one that bootsvc's Redfish driver reads at discovery
# (bootsvc/power/redfish.py _discover: the System's Links.ManagedBy, then the Manager's FirmwareVersion):
# - a DPU's BMC: /work/shared/redfish-captures/nvidia-bf3-bmc-24.10/redfish/v1/Managers/Bluefield_BMC/index.json
#   (and Managers/index.json, Systems/Bluefield/index.json Links.ManagedBy)
# - a host's BMC: /work/shared/redfish-captures/dell-idrac9-r750/redfish/v1/Managers/iDRAC.Embedded.1/index.json
#   (and Managers/index.json, Systems/System.Embedded.1/index.json Links.ManagedBy)
# The System stays "Systems/1" and the root "StormSim": a BF3's root Vendor/Product and Systems/Bluefield
# would make the driver treat the DPU's BMC as a BlueField (quirks.py), whose preflight reads the simulator
# does not model (README: "The simulated BMCs").
MANAGERS = {
    "dpu": {"@odata.id": "/redfish/v1/Managers/Bluefield_BMC", "@odata.type": "#Manager.v1_14_0.Manager",
            "Id": "Bluefield_BMC", "Name": "OpenBmc Manager", "Description": "Baseboard Management Controller",
            "ManagerType": "BMC", "Model": "OpenBmc", "FirmwareVersion": "BF-24.10-10",
            "Links": {"ManagerForServers": [{"@odata.id": "/redfish/v1/Systems/1"}],
                      "ManagerForServers@odata.count": 1}},
    "host": {"@odata.id": "/redfish/v1/Managers/iDRAC.Embedded.1", "@odata.type": "#Manager.v1_12_0.Manager",
             "Id": "iDRAC.Embedded.1", "Name": "Manager", "Description": "BMC", "ManagerType": "BMC",
             "Model": "15G Monolithic", "FirmwareVersion": "6.00.30.00",
             "Links": {"ManagerForServers": [{"@odata.id": "/redfish/v1/Systems/1"}],
                       "ManagerForServers@odata.count": 1}},
}


_SESSION_ID = re.compile(r"(?<=/Sessions)/[^/]+$")  # a session's URI -> one resource name in the counts


@dataclass
class Bmc:
    ip: str
    power: str = "Off"
    target: str = "None"
    enabled: str = "Disabled"
    sessions: set[str] = field(default_factory=set)
    etag: int = 1
    manager: dict[str, Any] = field(default_factory=lambda: MANAGERS["host"])


class _BmcConn(asyncio.Protocol):
    """One TCP connection to a simulated BMC (the BMC is the local address it came to). Requests are parsed
    from the bytes as they arrive and answered one at a time, in order (HTTP/1.1 keep-alive, as the
    conductor's Redfish client sends them; RFC 9112 §9.3); each answer takes ``--bmc-latency`` s. A
    protocol instead of asyncio streams: no coroutine per connection and no wake-up per header line."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.buf = b""
        self.queue: collections.deque[tuple[str, str, dict[str, str], bytes]] = collections.deque()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.bmc: Bmc | None = None
        self.ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ip = transport.get_extra_info("sockname")[0]
        self.bmc = self.sim.bmc_at(self.ip)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            lines = self.buf[:i].decode("latin-1").split("\r\n")
            try:
                method, path, _v = lines[0].split(" ", 2)
                h: dict[str, str] = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    h[k.strip().lower()] = v.strip()
                n = int(h.get("content-length", "0") or 0)
            except ValueError:
                self._close()
                return
            if len(self.buf) < i + 4 + n:
                return  # the body is still coming
            body, self.buf = self.buf[i + 4:i + 4 + n], self.buf[i + 4 + n:]
            self.sim.bmc_req[f"{method} {_SESSION_ID.sub('/{id}', path.split('?', 1)[0].rstrip('/'))}"] += 1
            self.queue.append((method, path, h, body))
            self._next()

    def _next(self) -> None:
        if self.busy or not self.queue:
            return
        self.busy = True
        req = self.queue.popleft()
        sim, ip = self.sim, self.ip
        k = sim.in_flight.get(ip, 0)
        sim.in_flight[ip] = k + 1
        if k == 0 and len(sim.in_flight) > sim.peak_busy_bmcs:
            sim.peak_busy_bmcs = len(sim.in_flight)
        if sim.bmc_latency > 0:  # a BMC's answer takes time (--bmc-latency); zero by default
            asyncio.get_running_loop().call_later(sim.bmc_latency, self._answer, req)
        else:
            self._answer(req)

    def _answer(self, req: tuple[str, str, dict[str, str], bytes]) -> None:
        sim, ip = self.sim, self.ip
        if sim.in_flight.get(ip, 0) <= 1:
            sim.in_flight.pop(ip, None)
        else:
            sim.in_flight[ip] -= 1
        self.busy = False
        t = self.transport
        if t is None or t.is_closing():
            return
        method, path, h, body = req
        assert self.bmc is not None
        status, doc, extra = sim.redfish(self.bmc, method, path.split("?", 1)[0], h, body)
        out = json.dumps(doc).encode() if doc is not None else b""
        hdrs = {"Content-Type": "application/json", "Content-Length": str(len(out)), "OData-Version": "4.0", **extra}
        t.write((f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n")
                .encode() + out)
        if h.get("connection", "").lower() == "close":
            self._close()
            return
        self._next()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Sim:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.bmcs: dict[str, Bmc] = {}
        self.next_session = 0
        self.dpu_relay = Relay()
        self.host_relay = Relay()
        # The simulator's own bound on its open requests (file descriptors, ephemeral ports): one pool for
        # firmware, installers and agents before their policy, one for resting agents' check-ins. Real
        # nodes share no such limit, so a burst of resting check-ins must not queue another node's boot
        # step in the simulator: with one pool of 256, a 3000-pair run (loaded box, ~1,700+ agents resting
        # at 30 s) kept all 256 busy and up to 373 steps waiting, p99 2.8 s (sim_queue_wait_ms).
        self.http_sem = asyncio.Semaphore(256)
        self.rest_sem = asyncio.Semaphore(256)
        self.running: set[asyncio.Task[None]] = set()
        self.done: dict[str, float] = {}
        self.peak_sessions = 0
        self.dpu_ip: dict[int, str] = {}
        self.power_ons: dict[int, list[float]] = {}  # rack index -> monotonic times of power-ons
        self.bmc_power_ons: dict[str, list[float]] = {}  # BMC -> monotonic times of its power-ons
        self.open_sessions = 0
        self.peak_open_sessions = 0
        # BMCs with a request in flight (read, not yet answered): what power.max_concurrent_bmc bounds,
        # unlike open sessions (power.session_idle_seconds keeps idle ones open between steps)
        self.in_flight: dict[str, int] = {}  # BMC address -> its requests being answered
        self.peak_busy_bmcs = 0
        self.bmc_latency = float(getattr(a, "bmc_latency", 0.0) or 0.0)
        self.advised_polls: collections.Counter[float] = collections.Counter()  # poll_seconds advised -> times
        self.delays = parse_delays(getattr(a, "delays", "") or "")
        # What the simulated nodes asked, from their side: per step (endpoint) the attempts and the wall
        # time of each answered attempt (connect -> last byte; a DORA or a whole TFTP transfer), the time
        # spent queued on the simulator's own ``http_sem``, and the nodes in each phase right now (sampled
        # every ``SAMPLE_S`` into ``timeline``: where the pipeline waits). Appending a float per request
        # is the whole cost; percentiles are computed once, in ``report``.
        self.ep_n: collections.Counter[str] = collections.Counter()
        self.ep_lat: dict[str, list[float]] = collections.defaultdict(list)
        self.sem_wait: list[float] = []  # firmware, installers, agents before their policy
        self.rest_wait: list[float] = []  # resting agents' check-ins
        self.in_step: collections.Counter[str] = collections.Counter()  # step -> attempts running now
        self.phase: collections.Counter[str] = collections.Counter()  # phase -> nodes in it now
        self.bmc_req: collections.Counter[str] = collections.Counter()  # "METHOD resource" -> requests
        self.timeline: list[dict[str, Any]] = []
        self.t_start = time.monotonic()
        # the garbage collector's share of the simulator's CPU, per generation (gc.callbacks): a cost that
        # could grow with the live heap (every resting agent's task stays alive until the end)
        self.gc_n = [0, 0, 0]
        self.gc_s = [0.0, 0.0, 0.0]
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc_cb)

    def _gc_cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.process_time()
        else:
            g = info.get("generation", 0)
            self.gc_n[g] += 1
            self.gc_s[g] += time.process_time() - self._gc_t0

    def enter(self, old: str | None, new: str | None) -> None:
        """A node moves from phase ``old`` to ``new`` (None: outside every phase)."""
        if old:
            self.phase[old] -= 1
        if new:
            self.phase[new] += 1

    SAMPLE_S = 10.0

    async def sampler(self) -> None:
        """Every SAMPLE_S: nodes per phase, attempts per step in flight, BMCs powered on; one line to the
        log and one entry in ``timeline`` (a few hundred over a 10k run)."""
        while True:
            await asyncio.sleep(self.SAMPLE_S)
            ons = collections.Counter(w[1] for w in map(bmc_index, self.bmc_power_ons) if w)
            snap = {"t": round(time.monotonic() - self.t_start), "dpu_powered": ons["dpu"],
                    "host_powered": ons["host"], "phase": {k: v for k, v in self.phase.items() if v},
                    "in_step": {k: v for k, v in self.in_step.items() if v},
                    # steps queued on the simulator's own pools (256 each): > 0 means the harness limits
                    "sem_waiting": len(getattr(self.http_sem, "_waiters", None) or ()),
                    "rest_sem_waiting": len(getattr(self.rest_sem, "_waiters", None) or ()),
                    "open_bmc_sessions": self.open_sessions, "bmc_in_flight": len(self.in_flight),
                    "firmware_done": len(self.done)}
            self.timeline.append(snap)
            print("sim: sample " + json.dumps(snap), flush=True)

    # -- Redfish ------------------------------------------------------------------------------------
    def system(self, b: Bmc) -> dict[str, Any]:
        return {
            "@odata.id": "/redfish/v1/Systems/1", "Id": "1", "Name": "storm system", "PowerState": b.power,
            "Manufacturer": "StormSim", "Model": "sim",
            "Links": {"ManagedBy": [{"@odata.id": b.manager["@odata.id"]}]},
            "Boot": {"BootSourceOverrideTarget": b.target, "BootSourceOverrideEnabled": b.enabled,
                     "BootSourceOverrideMode": "UEFI",
                     "BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd", "UefiHttp"]},
            "Actions": {"#ComputerSystem.Reset": {
                "target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
                "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "GracefulShutdown", "ForceRestart",
                                                      "PowerCycle"]}},
        }

    def bmc_at(self, ip: str) -> Bmc:
        """The simulated BMC answering at ``ip`` (made on its first connection)."""
        b = self.bmcs.get(ip)
        if b is None:
            who = bmc_index(ip)
            b = self.bmcs[ip] = Bmc(ip, manager=MANAGERS[who[1] if who else "host"])
        return b

    def bmc_protocol(self) -> _BmcConn:
        """``loop.create_server`` factory: the simulated BMCs' HTTP/1.1 service."""
        return _BmcConn(self)

    async def bmc_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """The same service on asyncio streams (kept for comparison: bench/storm/redfish_cost.py --streams)."""
        ip = w.get_extra_info("sockname")[0]
        b = self.bmc_at(ip)
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                method, path, _v = line.decode("latin-1").split(" ", 2)
                h: dict[str, str] = {}
                while True:
                    ln = await r.readline()
                    if ln in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = ln.decode("latin-1").partition(":")
                    h[k.strip().lower()] = v.strip()
                body = await r.readexactly(int(h.get("content-length", "0") or 0))
                self.bmc_req[f"{method} {_SESSION_ID.sub('/{id}', path.split('?', 1)[0].rstrip('/'))}"] += 1
                n = self.in_flight.get(ip, 0)
                self.in_flight[ip] = n + 1
                if n == 0 and len(self.in_flight) > self.peak_busy_bmcs:
                    self.peak_busy_bmcs = len(self.in_flight)
                try:
                    if self.bmc_latency > 0:  # a BMC's answer takes time (--bmc-latency); zero by default
                        await asyncio.sleep(self.bmc_latency)
                    status, doc, extra = self.redfish(b, method, path.split("?", 1)[0], h, body)
                    out = json.dumps(doc).encode() if doc is not None else b""
                    hdrs = {"Content-Type": "application/json", "Content-Length": str(len(out)),
                            "OData-Version": "4.0", **extra}
                    w.write((f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
                             + "\r\n").encode() + out)
                    await w.drain()
                finally:
                    if self.in_flight[ip] <= 1:
                        del self.in_flight[ip]
                    else:
                        self.in_flight[ip] -= 1
                if h.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()

    def redfish(self, b: Bmc, method: str, path: str, h: dict[str, str], body: bytes) \
            -> tuple[int, Any, dict[str, str]]:
        p = path.rstrip("/")
        if p == "/redfish/v1" and method == "GET":
            return 200, {"@odata.id": "/redfish/v1/", "RedfishVersion": "1.15.0", "Vendor": "StormSim",
                         "Product": "StormSim BMC", "Systems": {"@odata.id": "/redfish/v1/Systems"},
                         "Managers": {"@odata.id": "/redfish/v1/Managers"},
                         "SessionService": {"@odata.id": "/redfish/v1/SessionService"},
                         "Links": {"Sessions": {"@odata.id": "/redfish/v1/SessionService/Sessions"}}}, {}
        if p == "/redfish/v1/SessionService/Sessions" and method == "POST":
            if len(b.sessions) >= self.a.bmc_sessions:
                errors["bmc_session_limit"] += 1
                return 503, {"error": {"code": "Base.1.8.ServiceTemporarilyUnavailable",
                                       "message": "session limit"}}, {"Retry-After": "1"}
            self.next_session += 1
            sid = str(self.next_session)
            b.sessions.add(sid)
            self.peak_sessions = max(self.peak_sessions, len(b.sessions))
            self.open_sessions += 1
            self.peak_open_sessions = max(self.peak_open_sessions, self.open_sessions)
            loc = f"/redfish/v1/SessionService/Sessions/{sid}"
            return 201, {"@odata.id": loc, "Id": sid}, {"X-Auth-Token": f"tok-{sid}", "Location": loc}
        tok = h.get("x-auth-token", "")
        if not tok.startswith("tok-") or tok[4:] not in b.sessions:
            if h.get("authorization", "").startswith("Basic "):
                pass  # HTTP Basic is accepted too (DSP0266 §13.3)
            else:
                return 401, {"error": {"code": "Base.1.8.NoValidSession", "message": "no session"}}, {}
        if p.startswith("/redfish/v1/SessionService/Sessions/") and method == "DELETE":
            if p.rsplit("/", 1)[1] in b.sessions:
                self.open_sessions -= 1
            b.sessions.discard(p.rsplit("/", 1)[1])
            return 204, None, {}
        if p == "/redfish/v1/Systems" and method == "GET":
            return 200, {"Members": [{"@odata.id": "/redfish/v1/Systems/1"}], "Members@odata.count": 1}, {}
        if p == "/redfish/v1/Managers" and method == "GET":
            return 200, {"@odata.id": "/redfish/v1/Managers", "Members": [{"@odata.id": b.manager["@odata.id"]}],
                         "Members@odata.count": 1}, {}
        if p == b.manager["@odata.id"] and method == "GET":
            return 200, b.manager, {}
        if p == "/redfish/v1/Systems/1" and method == "GET":
            return 200, self.system(b), {"ETag": f'W/"{b.etag}"'}
        if p == "/redfish/v1/Systems/1" and method == "PATCH":
            boot = (json.loads(body or b"{}") or {}).get("Boot") or {}
            b.target = boot.get("BootSourceOverrideTarget", b.target)
            b.enabled = boot.get("BootSourceOverrideEnabled", b.enabled)
            b.etag += 1
            patches[f"{b.ip} {b.target}/{b.enabled}"] += 1
            return 204, None, {}
        if p == "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset" and method == "POST":
            rt = (json.loads(body or b"{}") or {}).get("ResetType", "")
            actions[f"{b.ip} {rt}"] += 1
            if rt in ("ForceOff", "GracefulShutdown"):
                b.power = "Off"
            elif rt in ("On", "ForceRestart", "PowerCycle", "GracefulRestart"):
                b.power = "On"
                who = bmc_index(b.ip)
                if who is not None:
                    self.power_ons.setdefault(who[0] // self.a.rack_size, []).append(time.monotonic())
                self.bmc_power_ons.setdefault(b.ip, []).append(time.monotonic())
                if b.target == "Pxe" and b.enabled in ("Once", "Continuous"):
                    if b.enabled == "Once":
                        b.target, b.enabled = "None", "Disabled"
                    self.boot(b.ip)
            b.etag += 1
            return 204, None, {}
        not_found[f"{method} {p}"] += 1  # reported: a request the simulator does not model
        return 404, {"error": {"code": "Base.1.8.ResourceMissingAtURI", "message": path}}, {}

    # -- firmware -------------------------------------------------------------------------------------
    def boot(self, bmc: str) -> None:
        who = bmc_index(bmc)
        if who is None:
            return
        t = asyncio.get_running_loop().create_task(self.node(*who))
        self.running.add(t)
        t.add_done_callback(self.running.discard)

    async def step(self, what: str, coro_fn: Any, via: Via | None = None) -> Any:
        """A firmware step retried like firmware does (PXE retries, iPXE 'goto failed' loops); an
        instance that stopped answering is left for the next one (``Via``). Each attempt is counted
        under ``what`` and timed (``ep_n``, ``ep_lat``)."""
        for k in range(RETRIES):
            t_q = time.monotonic()
            try:
                resting = what == "agent checkin resting"
                async with self.rest_sem if resting else self.http_sem:
                    t0 = time.monotonic()
                    (self.rest_wait if resting else self.sem_wait).append(t0 - t_q)
                    self.ep_n[what] += 1
                    self.in_step[what] += 1
                    try:
                        out = await coro_fn()
                    finally:
                        self.in_step[what] -= 1
                    self.ep_lat[what].append(time.monotonic() - t0)
                    return out
            except Exception as e:
                errors[f"{what}: {type(e).__name__}: {str(e)[:60]}"] += 1
                if via is not None and _unreachable(e):
                    via.failover()
                await asyncio.sleep(1.0 + k)
        raise RuntimeError(f"{what} failed {RETRIES} times")

    async def get_ok(self, url: str, src: str, headers: dict[str, str] | None = None) -> bytes:
        st, data = await http("GET", url, src, headers=headers)
        if st != 200:
            raise RuntimeError(f"HTTP {st}")
        return data

    async def post_ok(self, url: str, src: str, doc: dict[str, Any], headers: dict[str, str] | None = None,
                      ok: tuple[int, ...] = (200,)) -> Any:
        st, data = await http("POST", url, src, headers={"Content-Type": "application/json", **(headers or {})},
                              body=json.dumps(doc).encode())
        if st not in ok:
            raise RuntimeError(f"HTTP {st} {data[:80]!r}")
        return json.loads(data or b"{}")

    async def delay(self, i: int, kind: str, stage: str) -> None:
        """Wait what ``stage`` takes on real hardware (``--delays``; zero for the control-plane number),
        +-20 % per node, the same for a node in every run (seeded by its index)."""
        base = self.delays.get(stage, 0.0)
        if base > 0:
            await asyncio.sleep(base * random.Random(f"{i}{kind}{stage}").uniform(0.8, 1.2))

    async def node(self, i: int, kind: str) -> None:
        self.enter(None, f"{kind} firmware")
        try:
            if self.a.boot_delay:
                await asyncio.sleep(self.a.boot_delay)
            await self.delay(i, kind, f"{kind}_post")
            if kind == "dpu":
                await self.dpu(i)
            else:
                await self.host(i)
                self.enter("host firmware", "host installed")
            self.done[name_of(i, kind)] = time.time()
        except Exception as e:
            errors[f"{kind} gave up: {type(e).__name__}: {str(e)[:60]}"] += 1

    async def dpu(self, i: int) -> None:
        mac = mac_of(i, "dpu")
        name = name_of(i, "dpu")
        subs = [(1, f"leaf{i // 40}:swp{i % 40}".encode())]
        ack = await self.step("dpu dhcp", lambda: dora(self.dpu_relay, DPU_RELAY, mac, {
            60: b"NVIDIA/BF/PXE", 93: b"\x00\x0b"}, subs))
        ip = ".".join(str(x) for x in ack.yiaddr)
        self.dpu_ip[i] = ip
        v = Via()
        v.acked_by(ack)
        await self.step("dpu tftp", lambda: tftp_get(ip, filename(ack), v.server), v)
        base = f"http://{SRV}:{HTTP_PORT}"
        macs = ":".join(f"{x:02x}" for x in mac)
        cfg = (await self.step("dpu grub", lambda: self.get_ok(v.url(f"{base}/boot/grub?mac={macs}"), ip),
                               v)).decode()
        kernel, args, initrd = _grub(cfg)
        await self.step("dpu kernel", lambda: self.get_ok(v.url(base + kernel), ip), v)
        await self.step("dpu initrd", lambda: self.get_ok(v.url(base + initrd), ip), v)
        cb, tok, bfcfg = args.get("bootsvc.cb"), args.get("bootsvc.token"), args.get("bootsvc.bfcfg")
        if not (cb and tok and bfcfg):
            raise RuntimeError(f"install args missing in {args}")
        auth = {"Authorization": f"Bearer {tok}"}
        if args.get("bfks"):  # the BFB installer's kickstart (bfscripts bfpxe), which then fetches bf.cfg
            await self.step("dpu bfks", lambda: self.get_ok(v.url(args["bfks"]), ip), v)
        doc = (await self.step("dpu bf.cfg", lambda: self.get_ok(v.url(bfcfg), ip, auth), v)).decode()
        m = re.search(r"^secret = (\S+)", doc, re.M)
        if not m:
            raise RuntimeError("no secret in bf.cfg")
        secret = m.group(1)
        await self.step("dpu callback", lambda: self.post_ok(v.url(cb), ip, {"event": "started"}, auth), v)
        await self.delay(i, "dpu", "dpu_install")
        await self.step("dpu callback", lambda: self.post_ok(v.url(cb), ip, {"event": "done"}, auth), v)
        await self.delay(i, "dpu", "dpu_reboot")
        # the installed DOCA boots; the policy agent starts (bootsvc/agent/client.py speaks the same API)
        api = f"{base}/api/v1/agent"
        applied: str | None = None
        # phases: waiting for its policy (polls every --agent-poll s), then resting (the advised interval)
        self.enter("dpu firmware", "dpu agent waiting for policy")
        deadline = time.monotonic() + self.a.timeout
        while time.monotonic() < deadline:
            hdr = {"Authorization": f"Bearer {secret}", "X-Bootsvc-Node": name}
            body = {"agent_version": "storm", "health": {"applied_version": applied}}
            out = await self.step("agent checkin resting" if applied else "agent checkin pre-apply",
                                  lambda h=hdr, b=body: self.post_ok(v.url(f"{api}/checkin"), ip, b, h), v)
            secret = out.get("secret") or secret  # the first check-in trades bf.cfg's secret for a new one
            hdr = {"Authorization": f"Bearer {secret}", "X-Bootsvc-Node": name}
            if out.get("state") == "policy_pending" and out.get("policy_version"):
                pol = json.loads(await self.step("agent policy",
                                                 lambda h=hdr: self.get_ok(v.url(f"{api}/policy"), ip, h), v))
                rep = {"policy_version": pol["version"], "status": "applied", "error": None,
                       "health": {"applied_version": pol["version"]}}
                await self.step("agent report",
                                lambda h=hdr, b=rep: self.post_ok(v.url(f"{api}/report"), ip, b, h), v)
                if applied is None:
                    self.enter("dpu agent waiting for policy", "dpu agent resting")
                applied = pol["version"]
                self.done.setdefault(name, time.time())
                await asyncio.sleep(self.next_poll(out))
                continue
            if out.get("state") == "policy_applied":
                # The agent keeps running, as the real one does (bootsvc/agent/client.py): a DPU joining
                # the tenant changes every peer's policy, and the host waits until its DPU applied the
                # new one. Resting agents poll at the real agent's interval, not the storm's faster one.
                await asyncio.sleep(self.next_poll(out))
                continue
            await asyncio.sleep(self.a.agent_poll)  # the real agent: poll_interval, 30 s by default
        if applied is None:
            raise RuntimeError("agent: no policy in time")

    def next_poll(self, out: dict[str, Any]) -> float:
        """A DPU agent's wait after a check-in once its wanted policy is applied, as bootsvc/agent/main.py
        ``Agent.next_poll`` decides it: the interval the answer advised (``poll_seconds``; a positive
        finite number, else no advice: bootsvc/agent/client.py) kept within poll_min..poll_max (5..900 s,
        the agent's defaults), or the agent's poll_interval without advice (``--agent-idle-poll``, 30 s
        like the real agent). Before the policy is applied the storm polls at ``--agent-poll`` (faster
        than a real agent's 30 s: the control-plane number, README "What is real")."""
        p = out.get("poll_seconds")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p < float("inf"):
            return float(self.a.agent_idle_poll)
        self.advised_polls[round(float(p), 1)] += 1
        return min(AGENT_POLL_MAX, max(AGENT_POLL_MIN, float(p)))

    async def host(self, i: int) -> None:
        mac = mac_of(i, "host")
        # relayed by its DPU into the tenant VRF with the sub-options the DPU agent's relay sends
        # (bootsvc/agent/relay.py, from the policy's "relay"): circuit-id, remote-id (RFC 3046),
        # link-selection = the tenant subnet (RFC 3527), server-id-override = the tenant gateway
        # (RFC 5107), VSS (RFC 6607 §3.1: type 0 = NVT VPN name) and VSS-Control
        subs = [(1, b"pf0hpf"), (2, f"MT-{name_of(i, 'host')}".encode()), (5, ip_bytes("10.0.0.0")),
                (11, ip_bytes(HOST_RELAY)), (151, b"\x00" + VRF.encode()), (152, b"")]
        pxe = {60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\x00\x07"}
        ack = await self.step("host dhcp", lambda: dora(self.host_relay, HOST_RELAY, mac, pxe, subs))
        # the host's boot traffic reaches Zone 0 masqueraded to its DPU's address (bootsvc/policy.py,
        # inventory.node_addresses): it leaves from the DPU's lease here
        ip = self.dpu_ip.get(i) or ".".join(str(x) for x in ack.yiaddr)
        v = Via()
        v.acked_by(ack)
        await self.step("host tftp", lambda: tftp_get(ip, filename(ack), v.server), v)
        ack2 = await self.step("host ipxe dhcp", lambda: dora(self.host_relay, HOST_RELAY, mac, {
            **pxe, 77: b"iPXE"}, subs))
        url = filename(ack2)
        v.acked_by(ack2)
        script = (await self.step("host script", lambda: self.get_ok(v.url(url), ip), v)).decode()
        km = re.search(r"^kernel (\S+)(.*?)( \|\||$)", script, re.M)
        im = re.search(r"^initrd (?:--name \S+ )?(\S+)", script, re.M)
        if not km or not im:
            raise RuntimeError(f"not an install script: {script[:200]!r}")
        args = dict(w.split("=", 1) for w in km.group(2).split() if "=" in w)
        await self.step("host kernel", lambda: self.get_ok(v.url(km.group(1)), ip), v)
        await self.step("host initrd", lambda: self.get_ok(v.url(im.group(1)), ip), v)
        cb, tok = args.get("bootsvc.cb"), args.get("bootsvc.token")
        if not (cb and tok):
            raise RuntimeError("install args missing")
        auth = {"Authorization": f"Bearer {tok}"}
        await self.step("host callback", lambda: self.post_ok(v.url(cb), ip, {"event": "started"}, auth), v)
        await self.delay(i, "host", "host_install")
        await self.step("host callback", lambda: self.post_ok(v.url(cb), ip, {"event": "done"}, auth), v)

    # -- run ----------------------------------------------------------------------------------------
    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self.dpu_relay, local_addr=(DPU_RELAY, 67))
        await loop.create_datagram_endpoint(lambda: self.host_relay, local_addr=(HOST_RELAY, 67))
        server = await loop.create_server(self.bmc_protocol, "0.0.0.0", BMC_PORT, backlog=4096)
        self.t_start = time.monotonic()
        sampler = loop.create_task(self.sampler())
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        with __import__("contextlib").suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.a.timeout + 120)
        server.close()
        sampler.cancel()
        for t in list(self.running):
            t.cancel()

    def requests_report(self) -> dict[str, Any]:
        """Per step (endpoint): attempts, attempts per pair, answered attempts' wall time p50/p99/max in ms;
        the simulated BMCs' requests by resource; the simulator's own queue wait (its two pools)."""
        n = max(1, int(self.a.pairs))

        def pct(xs: list[float], q: float) -> float:
            return round(1000 * xs[min(len(xs) - 1, int(len(xs) * q))], 1) if xs else 0.0

        eps: dict[str, Any] = {}
        for what in sorted(self.ep_n):
            lat = sorted(self.ep_lat.get(what, ()))
            eps[what] = {"n": self.ep_n[what], "per_pair": round(self.ep_n[what] / n, 2),
                         "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": pct(lat, 1.0)}
        sw, rw = sorted(self.sem_wait), sorted(self.rest_wait)
        checkins = self.ep_n["agent checkin pre-apply"] + self.ep_n["agent checkin resting"]
        return {"endpoints": eps,
                "checkins_per_pair": {"pre_apply": round(self.ep_n["agent checkin pre-apply"] / n, 2),
                                      "resting": round(self.ep_n["agent checkin resting"] / n, 2),
                                      "total": round(checkins / n, 2)},
                "bmc_requests_per_pair": {k: round(v / n, 2) for k, v in self.bmc_req.most_common()},
                "bmc_requests_per_pair_total": round(sum(self.bmc_req.values()) / n, 2),
                "sim_queue_wait_ms": {"p50": pct(sw, 0.5), "p99": pct(sw, 0.99), "max": pct(sw, 1.0)},
                "sim_queue_wait_ms_resting": {"p50": pct(rw, 0.5), "p99": pct(rw, 0.99), "max": pct(rw, 1.0)}}

    def report(self) -> dict[str, Any]:
        per_bmc: collections.Counter[str] = collections.Counter()
        for k, n in actions.items():
            if k.split(" ", 1)[1] in ("On", "ForceRestart", "PowerCycle"):
                per_bmc[k.split(" ", 1)[0]] += n
        # the most power-ons any rack saw inside one power.rack_window_seconds (sliding window)
        w, most = self.a.rack_window, 0
        for ts in self.power_ons.values():
            ts.sort()
            j = 0
            for m, t in enumerate(ts):
                while t - ts[j] >= w:
                    j += 1
                most = max(most, m - j + 1)
        return {"actions": sum(actions.values()), "power_ons": sum(per_bmc.values()),
                "max_power_ons_per_rack_window": most, "peak_open_sessions_all_bmcs": self.peak_open_sessions,
                "peak_bmcs_with_request_in_flight": self.peak_busy_bmcs,
                "duplicates": sum(n - 1 for n in per_bmc.values() if n > 1), "power_ons_per_bmc": dict(per_bmc),
                # seconds between a BMC's successive power-ons (a retry waits a state deadline; a
                # second conductor acting on the same step, or a resend after a crash, comes sooner)
                "power_on_gaps": [round(ts[k] - ts[k - 1], 1) for ts in self.bmc_power_ons.values()
                                  for k in range(1, len(ts))],
                "patches": sum(patches.values()), "errors": dict(errors.most_common(30)),
                "redfish_not_found": dict(not_found.most_common(20)),
                "agent_advised_poll_s": {str(k): v for k, v in sorted(self.advised_polls.items())},
                "acks": acks, "acks_by_server": dict(acks_by_server),
                "requests": self.requests_report(), "timeline": self.timeline,
                "gc": {"collections": self.gc_n, "cpu_s": [round(x, 3) for x in self.gc_s]},
                "peak_sessions_per_bmc": self.peak_sessions, "firmware_done": len(self.done)}


def _grub(cfg: str) -> tuple[str, dict[str, str], str]:
    """(kernel path, kernel args, initrd path) of a GRUB install config; ``(http,host:port)/p`` -> ``/p``."""
    lm = re.search(r"^\s*linux\s+(\S+)(.*)$", cfg, re.M)
    im = re.search(r"^\s*initrd\s+(\S+)", cfg, re.M)
    if not lm or not im:
        raise RuntimeError(f"not an install config: {cfg[:200]!r}")

    def path(p: str) -> str:
        return p.split(")", 1)[1] if p.startswith("(") else p

    args = dict(w.strip("'").split("=", 1) for w in lm.group(2).split() if "=" in w)
    return path(lm.group(1)), args, path(im.group(1))


def _loop_choice(want: str) -> str:
    """The event loop the simulator runs on: uvloop (libuv, its loop and transports in C) when installed,
    else asyncio's. Its CPU is counted in the storm's total, so the loop's own overhead per packet and per
    connection is part of the number; the packets on the wire are the same either way."""
    if want == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if want == "uvloop":
            raise SystemExit("--sim-loop uvloop: uvloop is not installed (.venv/bin/pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def child_main(a: argparse.Namespace) -> int:
    if getattr(a, "servers", None):
        servers[:] = a.servers.split(",")
    sim = Sim(a)
    loop_name = _loop_choice(getattr(a, "sim_loop", "auto") or "auto")
    try:
        if loop_name == "uvloop":
            import uvloop

            uvloop.run(sim.main())
        else:
            asyncio.run(sim.main())
    finally:
        rep = sim.report()
        rep["event_loop"] = loop_name
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rep, f)
        print("sim: " + json.dumps(rep), flush=True)
    return 0
