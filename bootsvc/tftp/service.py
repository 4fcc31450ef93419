"""One TFTP worker: the request socket, admission under load, and the sockets of its transfers.

Owns: receiving requests (one socket per listener, shared by the workers with SO_REUSEPORT), deciding
whether to start a transfer, starting it (OACK or DATA 1 from a new TID, RFC 1350 §4) and driving
every transfer's socket from one epoll loop; the ``bootsvc_tftp_*`` counters.

Each transfer's socket is connected to its client (one send/recv per block, no addresses to parse or
build) and bound to the address the client asked (multi-homed hosts: firmware drops replies from
another source IP); an unconnected twin on the same port catches other TIDs' packets and answers them
ERROR 5 without disturbing the transfer (RFC 1350 §4).

Admission, so that a flood cannot stop the service (a spoofed RRQ never ACKs, and each held two
sockets for the whole retransmission time):
- at most ``tftp.max_transfers`` transfers per listener (all workers: a shared per-worker count) and
  ``tftp.max_per_client`` per source address and worker, and never more than this process's
  descriptors allow (3 per transfer: two sockets and at most one file);
- when full, the oldest transfer whose client never ACKed (``Transfer.established``) is dropped to
  admit the new request - the SYN-flood answer: a real client ACKs within a round trip, a spoofed
  source never does - and only when every slot holds a live client does a request get
  ERROR 0 "server busy" (RFC 1350 error code 0, "see error message");
- ERROR replies leave from one socket per local address, opened once: refusing costs no descriptor;
- out of descriptors or buffers (EMFILE, ENFILE, ENOBUFS, ENOMEM) is answered "server busy", counted
  and logged at most once a second; no exception leaves the loop (bootsvc/tftp/run.py restarts a
  worker that dies anyway).
Transfers' ACKs of a wake-up are handled before its new requests, so a flood arriving in the same
instant cannot evict a client whose ACK is already queued.

One module of about 520 lines, on purpose: it is one epoll loop and the admission rules that loop
applies between two wake-ups (slots, eviction, refusals, descriptor exhaustion); split, a reader would
follow one packet across files. What a transfer sends is already elsewhere and pure
(``bootsvc/tftp/transfer.py``), as are the wire format (``packet.py``) and the root (``paths.py``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import MutableSequence, Sequence
from typing import Any

from bootsvc import metrics
from bootsvc.tftp.packet import (
    BUSY,
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    OP_WRQ,
    Refused,
    error_packet,
    negotiate,
    parse_request,
)
from bootsvc.tftp.paths import RESOURCE_ERRNOS, Content, PacketCache, Resolver
from bootsvc.tftp.transfer import Transfer

log = logging.getLogger("bootsvc.tftp")

SO_INCOMING_CPU = getattr(socket, "SO_INCOMING_CPU", 49)  # Linux
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
FDS_PER_TRANSFER = 3  # session socket, its ERROR-5 twin, and a file for contents read with pread
FD_RESERVE = 64  # listener, epoll, error sockets, database, logs, metrics
_REASONS = {ERR_NOT_FOUND: "not_found", ERR_ACCESS: "access", ERR_ILLEGAL: "illegal", ERR_UNDEFINED: "other"}


class Slots:
    """Transfers running per worker of one listener, for the listener-wide cap. Each worker writes
    only its own entry (a ``multiprocessing.Array`` shared by forked workers, or a list in-process);
    the sum read without a lock may be off by a request admitted meanwhile elsewhere - a cap, not an
    invariant. A restarted worker starts from 0: a crashed worker's transfers do not leak slots."""

    def __init__(self, counts: MutableSequence[int] | None = None, index: int = 0) -> None:
        self.counts: MutableSequence[int] = counts if counts is not None else [0]
        self.index = index
        self.counts[index] = 0

    def total(self) -> int:
        return sum(self.counts)

    def take(self) -> None:
        self.counts[self.index] += 1

    def give(self) -> None:
        self.counts[self.index] -= 1


class RateLog:
    """At most one line per key and interval; the next line says how many were left out."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, key: str, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, skipped, self.interval)
        log.log(level, msg, *args)


class _Session(Transfer):
    """A transfer and its two sockets."""

    __slots__ = ("client", "sock", "stray")

    def __init__(self, sock: socket.socket, stray: socket.socket, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sock, self.stray = sock, stray
        self.client = self.peer[0]


class TftpService:
    """One worker: the request socket and the transfers it started (single thread, epoll)."""

    def __init__(self, address: str, port: int, resolver: Resolver, *, timeout: float = 2.0,
                 retries: int = 5, reuse_port: bool = True, cpu: int | None = None, max_transfers: int = 1000,
                 max_per_client: int = 8, max_windowsize: int = 64, slots: Slots | None = None) -> None:
        self.address, self.port = address, port
        self.resolver = resolver
        self.timeout, self.retries = timeout, retries
        self.max_transfers, self.max_per_client, self.max_windowsize = max_transfers, max_per_client, max_windowsize
        self.slots = slots if slots is not None else Slots()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
        # what this process's descriptors allow, whatever the config says (bootsvc/tftp/run.py raises
        # the soft limit to the hard one first)
        self.local_cap = max(1, (nofile - FD_RESERVE) // FDS_PER_TRANSFER)
        if self.local_cap < max_transfers:
            log.warning("tftp: %d descriptors allow %d concurrent transfers per worker (config: %d)", nofile,
                        self.local_cap, max_transfers)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A wildcard listener learns each request's destination address (IP_PKTINFO) and answers from it.
        self._pktinfo = address == "0.0.0.0"
        if self._pktinfo:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        if reuse_port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if cpu is not None:
            # with SO_REUSEPORT the kernel (>= 6.1) gives a request to the socket whose incoming CPU is
            # the one the request arrived on: see bootsvc/tftp/run.py pin()
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU, cpu)
        self.sock.bind((address, port))
        self.port = self.sock.getsockname()[1]
        self.sock.setblocking(False)
        # epoll directly (not ``selectors``): no key objects and result list per wake-up on the per-block path
        self._ep = select.epoll()
        self._ep.register(self.sock.fileno(), select.EPOLLIN)
        self.transfers: dict[int, _Session] = {}
        self.strays: dict[int, _Session] = {}  # the catch-all socket of each transfer
        self.fresh: OrderedDict[int, _Session] = OrderedDict()  # by age; established ones leave lazily
        self.per_client: dict[str, int] = {}
        self._err_socks: dict[str, socket.socket] = {}
        # Reading a socket again right after answering it pays off only when the client can ACK
        # meanwhile, from another CPU. A pinned worker shares its CPU with its clients: the ACK cannot
        # come before the worker yields, and every try is a failed recv whose BlockingIOError costs
        # more than the syscall (bench/tftp/README.md).
        self._reread = cpu is None
        self.packet_cache = PacketCache()
        self.ratelog = RateLog()
        self.completed = 0
        self.resent = 0  # DATA/OACK packets retransmitted after a timeout (all transfers)
        self.refused: dict[str, int] = {}  # by reason, also in /metrics
        self.evicted = 0
        self.internal_errors = 0

    # ------------------------------------------------------------ loop
    def serve(self, stop: threading.Event | Any) -> None:
        # The per-block path is: epoll wake-up -> one recv -> one send. ``stop`` (a
        # multiprocessing.Event in workers: a semaphore round trip) and the retransmit timers are looked
        # at on a 0.25 s tick, not per packet.
        last_check = time.monotonic()
        reqfd = self.sock.fileno()
        transfers = self.transfers
        poll = self._ep.poll
        try:
            while True:
                events = poll(0.25)
                now = time.monotonic()
                few = self._reread and len(events) <= 2
                requests = False
                for fd, _ev in events:
                    t = transfers.get(fd)
                    if t is not None:
                        try:
                            if few:
                                self._drain_transfer(t)
                                continue
                            # One datagram per wake-up: a lock-step client has one ACK in flight, so a
                            # second recv would almost always fail with EAGAIN; anything else queued is
                            # reported by the level-triggered epoll on the next poll.
                            try:
                                buf = t.sock.recv(2048)
                            except (BlockingIOError, InterruptedError):
                                continue
                            except OSError:  # ICMP port unreachable as ECONNREFUSED: the client is gone
                                t.done = True
                            else:
                                out = t.on_packet(buf, now)
                                if out is not None:
                                    if isinstance(out, bytes):  # lock-step: one DATA, sent inline
                                        try:
                                            t.sock.send(out)
                                        except OSError as e:  # ENOBUFS/ECONNREFUSED: the timer resends
                                            self._send_failed(e)
                                    else:
                                        self._send(t, out)
                            if t.done:
                                self._finish(t)
                        except Exception as e:  # a bug must cost one transfer, never the worker
                            self._internal(e, "transfer")
                            self._finish(t, "aborted")
                    elif fd == reqfd:
                        requests = True  # after the ACKs of this wake-up (see the module docstring)
                    else:
                        try:
                            self._on_stray(fd)
                        except Exception as e:
                            self._internal(e, "stray")
                if requests:
                    self._drain_requests()
                if now - last_check >= 0.25 or not events:
                    last_check = now
                    if stop.is_set():
                        break
                    self._tick(now)
        finally:
            for t in list(self.transfers.values()):
                self._finish(t, "aborted")
            self._ep.close()
            self.sock.close()
            for s in self._err_socks.values():
                s.close()
            log.info("tftp: worker %d stopped: %d transfers, %d packets resent after a timeout, refused %s, "
                     "%d evicted", os.getpid(), self.completed, self.resent, self.refused or "none", self.evicted)

    def _tick(self, now: float) -> None:
        for t in list(self.transfers.values()):
            try:
                out = t.on_timeout(now, self.retries)
                if out:
                    self._send(t, out)
                if t.done:
                    self._finish(t)
            except Exception as e:
                self._internal(e, "timer")
                self._finish(t, "aborted")

    def _send(self, t: _Session, out: Sequence[bytes] | bytes) -> None:
        if isinstance(out, bytes):
            out = (out,)
        send = t.sock.send
        try:
            for p in out:
                send(p)
        except OSError as e:  # ENOBUFS/ECONNREFUSED: the timeout resends (or gives up)
            self._send_failed(e)

    def _send_failed(self, e: OSError) -> None:
        if e.errno != errno.ECONNREFUSED:  # the client went away: its transfer ends on the next recv
            self._os_error(e, "send")

    def _drain_requests(self) -> None:
        for _ in range(64):
            local = self.address
            try:
                if self._pktinfo:
                    buf, anc, _flags, addr = self.sock.recvmsg(2048, socket.CMSG_SPACE(12))
                    local = _pktinfo_dst(anc) or local
                else:
                    buf, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._os_error(e, "recv")
                return
            try:
                self._request(buf, addr, local)
            except Exception as e:
                self._internal(e, "request")

    def _drain_transfer(self, t: _Session) -> None:
        """Few ready sockets and an unpinned worker (``_reread``): keep reading the socket just answered
        - a client on the other core often ACKs before we would have gone back to epoll_wait (strace, 1
        client at blksize 512: 2.5 instead of 3 syscalls per block)."""
        for _ in range(64):
            try:
                buf = t.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP port unreachable surfaced as ECONNREFUSED: the client is gone
                t.done = True
                break
            out = t.on_packet(buf, time.monotonic())
            if out is not None:
                self._send(t, out)
            if t.done:
                break
        if t.done:
            self._finish(t)

    def _on_stray(self, fd: int) -> None:
        """RFC 1350 §4: a packet from a wrong TID gets ERROR 5 and does not disturb the transfer. The
        session socket is connected to the client, so the kernel hands such packets to the twin."""
        t = self.strays.get(fd)
        if t is None:
            return
        for _ in range(8):
            try:
                _buf, addr = t.stray.recvfrom(2048)
            except OSError:
                return
            if addr != t.peer:
                with contextlib.suppress(OSError):
                    t.stray.sendto(error_packet(ERR_UNKNOWN_TID, "Unknown transfer ID"), addr)
                self._count_refused("unknown_tid")

    # ------------------------------------------------------------ requests
    def _request(self, buf: bytes, addr: tuple[str, int], local: str) -> None:
        if len(buf) >= 2 and buf[0] == 0 and 3 <= buf[1] <= 6:
            self._count_refused("stray")  # DATA/ACK/ERROR/OACK on the request port: ignored (RFC 1350 §4)
            return
        try:
            req = parse_request(buf)
            if req.op == OP_WRQ:
                raise Refused(ERR_ACCESS, "Access violation", "upload")  # nothing is ever written
        except Refused as e:
            self._refuse(addr, local, e, buf)
            return
        client = addr[0]
        if self.per_client.get(client, 0) >= self.max_per_client:
            self._refuse(addr, local, Refused(ERR_UNDEFINED, BUSY, "busy_client"), buf)
            return
        if (len(self.transfers) >= self.local_cap or self.slots.total() >= self.max_transfers) and not self._evict():
            self._refuse(addr, local, Refused(ERR_UNDEFINED, BUSY, "busy"), buf)
            return
        try:
            content = self.resolver(req.filename, client)
            if req.mode == "netascii":
                content = content.as_netascii()
        except Refused as e:
            self._refuse(addr, local, e, buf)
            return
        except OSError as e:
            if e.errno not in RESOURCE_ERRNOS:
                raise
            self._os_error(e, "open")
            self._refuse(addr, local, Refused(ERR_UNDEFINED, BUSY, "busy_resources"), buf)
            return
        except Exception as e:  # e.g. the database behind a generated file is unreachable
            self._internal(e, "resolve")
            self._refuse(addr, local, Refused(ERR_UNDEFINED, "server error, try again", "error"), buf)
            return
        try:
            self._start(req.filename, req.options, content, addr, local)
        except OSError as e:
            content.close()
            self._os_error(e, "session socket")
            self._refuse(addr, local, Refused(ERR_UNDEFINED, BUSY, "busy_resources"), buf)

    def _evict(self) -> bool:
        """Drop the oldest transfer whose client never ACKed; False when every slot holds a live one."""
        while self.fresh:
            _fd, old = self.fresh.popitem(last=False)
            if old.established or old.done or old.sock.fileno() not in self.transfers:
                continue
            self.evicted += 1
            metrics.counters.inc("bootsvc_tftp_evicted_total")
            self.ratelog("evict", logging.WARNING, "tftp: full: dropped %s to %s:%d (never acknowledged) for a "
                         "new request", old.name, *old.peer)
            self._finish(old, "evicted")
            return True
        return False

    def _start(self, name: str, options: tuple[tuple[str, str], ...], content: Content, addr: tuple[str, int],
               local: str) -> None:
        neg = negotiate(options, content.size, max_windowsize=self.max_windowsize)
        # Connected to the client: per block one send()/recv() without addresses (CPython parses and
        # builds none; the kernel keeps the route). A second, unconnected socket on the same port gets
        # what the kernel does not match to the connection: packets from other TIDs (ERROR 5).
        sock = self._session_socket(local)
        try:
            sock.connect(addr)
            stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            sock.close()
            raise
        try:
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            stray.bind(sock.getsockname())
        except OSError:
            sock.close()
            stray.close()
            raise
        stray.setblocking(False)
        sock.setblocking(False)
        now = time.monotonic()
        try:  # DATA 1 of a big file is read here (pread): an I/O error must not leak the two sockets
            t = _Session(sock, stray, addr, content, neg.blksize, name, oack=neg.oack, now=now,
                         timeout=neg.timeout or self.timeout, window=neg.windowsize,
                         packets=self.packet_cache.packets(content, neg.blksize))
        except BaseException:
            sock.close()
            stray.close()
            raise
        fd = sock.fileno()
        self.transfers[fd] = t
        self.strays[stray.fileno()] = t
        self.fresh[fd] = t
        self.per_client[t.client] = self.per_client.get(t.client, 0) + 1
        self.slots.take()
        self._ep.register(fd, select.EPOLLIN)
        self._ep.register(stray.fileno(), select.EPOLLIN)
        self._send(t, (t.first(),))
        log.info("tftp: rrq %s from %s:%d size=%d blksize=%d windowsize=%d options=%s", name, addr[0], addr[1],
                 content.size, neg.blksize, neg.windowsize, ",".join(k for k, _ in options) or "-")

    def _finish(self, t: _Session, result: str | None = None) -> None:
        fd = t.sock.fileno()
        if fd < 0:
            return  # already finished
        if self.strays.pop(t.stray.fileno(), None) is not None:
            self._ep.unregister(t.stray.fileno())
        if self.transfers.pop(fd, None) is not None:
            self._ep.unregister(fd)
            self.fresh.pop(fd, None)
            n = self.per_client.get(t.client, 1) - 1
            if n > 0:
                self.per_client[t.client] = n
            else:
                self.per_client.pop(t.client, None)
            self.slots.give()
            self.completed += 1
            self.resent += t.resent
            # Bytes the client acknowledged (not bytes sent: retransmits are counted apart).
            metrics.counters.inc("bootsvc_tftp_bytes_total", None, t.acked_bytes())
            metrics.counters.inc("bootsvc_tftp_transfers_total",
                                 {"result": result or ("ok" if t.complete else "aborted")})
            log.debug("tftp: done %s to %s:%d in %.3f s (%d resent)", t.name, *t.peer,
                      time.monotonic() - t.started, t.resent)
        t.close()
        t.sock.close()
        t.stray.close()

    # ------------------------------------------------------------ errors
    def _refuse(self, addr: tuple[str, int], local: str, e: Refused, buf: bytes) -> None:
        reason = e.reason or _REASONS.get(e.code, "other")
        self._count_refused(reason)
        self.ratelog(f"refused:{reason}", logging.INFO, "tftp: refused %r from %s:%d: %s (%s)", _printable(buf),
                     addr[0], addr[1], e.msg, reason)
        self._reply_error(addr, e.code, e.msg, local)

    def _count_refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        metrics.counters.inc("bootsvc_tftp_refused_total", {"reason": reason})

    def _reply_error(self, addr: tuple[str, int], code: int, msg: str, local: str) -> None:
        # From a socket opened once per local address (a new TID, RFC 1350 §4, and bound to the address
        # the client asked): a refusal must not cost a descriptor, or a flood turns refusals into EMFILE.
        s = self._err_socks.get(local)
        if s is None:
            try:
                s = self._session_socket(local)
                s.setblocking(False)
            except OSError as e:
                self._os_error(e, "error socket")
                return
            if len(self._err_socks) < 256:  # local addresses only, but bounded all the same
                self._err_socks[local] = s
        try:
            s.sendto(error_packet(code, msg), addr)
        except OSError as e:
            self._os_error(e, "send error")
        finally:
            if local not in self._err_socks or self._err_socks[local] is not s:
                s.close()

    def _os_error(self, e: OSError, where: str) -> None:
        name = errno.errorcode.get(e.errno or 0, "other")
        metrics.counters.inc("bootsvc_tftp_os_errors_total", {"errno": name})
        self.ratelog(f"os:{where}:{name}", logging.WARNING, "tftp: %s failed: %s (%s)", where, e.strerror, name)

    def _internal(self, e: Exception, where: str) -> None:
        self.internal_errors += 1
        metrics.counters.inc("bootsvc_tftp_internal_errors_total", {"where": where})
        self.ratelog(f"internal:{where}", logging.ERROR, "tftp: internal error in %s: %s: %s", where,
                     type(e).__name__, e)

    def _session_socket(self, local: str) -> socket.socket:
        # Bound to the address the client sent its request to, so every reply comes from it.
        # SO_REUSEADDR: the transfer's catch-all socket shares the port (see _start).
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((local, 0))
        except OSError:
            s.close()
            raise
        return s


def _pktinfo_dst(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The address to answer a request from, from IP_PKTINFO (struct in_pktinfo: ifindex, spec_dst,
    addr): Linux sets ``ipi_spec_dst`` to the destination itself for a unicast request to a local
    address, and to the receiving interface's address for a broadcast one."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntoa(data[4:8])
    return None


def _printable(buf: bytes) -> str:
    return "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in buf[2:66].split(b"\0", 1)[0])
