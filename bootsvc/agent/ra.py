"""IPv6 Router Advertisement sender for the host segment (RFC 4861 §4.2, §6.2).

Owns: building the RA (pure :func:`build_ra`) and a small sender thread on a raw ICMPv6 socket.
Why: iPXE waits ~16 s for IPv6 autoconfiguration on a segment with no RA (shared docs lab.md §5);
an RA with neither M nor O flag ends that wait at once. We advertise router lifetime 0 (we are not
an IPv6 default router for the tenant) and no prefix unless one is given, so nothing else changes for
the host. Sent to ff02::1 periodically and in answer to Router Solicitations (rate-limited per
RFC 4861 §6.2.6, MIN_DELAY_BETWEEN_RAS = 3 s).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from ipaddress import IPv6Network

log = logging.getLogger(__name__)

ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
MIN_DELAY_BETWEEN_RAS = 3.0
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def build_ra(mac: bytes, *, router_lifetime: int = 0, prefix: IPv6Network | None = None,
             hop_limit: int = 64) -> bytes:
    """ICMPv6 RA body (checksum 0: the kernel computes it for raw ICMPv6 sockets, RFC 3542 §3.1)."""
    if len(mac) != 6:
        raise ValueError("mac must be 6 bytes")
    # type, code, checksum, cur hop limit, flags (M=0, O=0), router lifetime, reachable, retrans
    ra = struct.pack("!BBHBBHII", ND_ROUTER_ADVERT, 0, 0, hop_limit, 0, router_lifetime, 0, 0)
    ra += struct.pack("!BB", 1, 1) + mac  # source link-layer address option (RFC 4861 §4.6.1)
    if prefix is not None:
        # prefix information (§4.6.2): on-link + autonomous, 1 day valid / 4 h preferred
        ra += struct.pack("!BBBBIII", 3, 4, prefix.prefixlen, 0xC0, 86400, 14400, 0)
        ra += prefix.network_address.packed
    return ra


def parse_mac(s: str) -> bytes:
    b = bytes(int(x, 16) for x in s.split(":"))
    if len(b) != 6:
        raise ValueError(f"bad MAC {s!r}")
    return b


class RaSender:
    def __init__(self, dev: str, mac: bytes, *, interval: float = 10.0,
                 prefix: IPv6Network | None = None) -> None:
        self.dev = dev
        self.interval = interval
        self.packet = build_ra(mac, prefix=prefix)
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.dev.encode())
            # RFC 4861 §6.1.2: receivers discard RAs whose hop limit is not 255
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            self.ifindex = socket.if_nametoindex(self.dev)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
            # all-routers group, so Router Solicitations (sent to ff02::2) reach us
            mreq = socket.inet_pton(socket.AF_INET6, "ff02::2") + struct.pack("@I", self.ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        except OSError:
            s.close()
            raise
        self._sock = s
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"ra-{self.dev}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(self.packet, ("ff02::1", 0, 0, self.ifindex))
            self.sent += 1
        except OSError as e:  # link-local not ready yet (DAD) or port down: try again later
            log.debug("ra: send on %s failed: %s", self.dev, e)

    def _loop(self) -> None:
        s = self._sock
        assert s is not None
        last = 0.0
        next_periodic = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_periodic:
                self._send()
                last = now
                next_periodic = now + self.interval
            try:
                ready, _, _ = select.select([s], [], [], min(0.5, max(0.0, next_periodic - now)))
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                data = s.recv(2048)
            except OSError:
                continue
            if data and data[0] == ND_ROUTER_SOLICIT:
                # answer soon, but not sooner than MIN_DELAY_BETWEEN_RAS after the last one (§6.2.6)
                next_periodic = min(next_periodic, last + MIN_DELAY_BETWEEN_RAS)
