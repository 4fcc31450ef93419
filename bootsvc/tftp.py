"""TFTP for network boot programs: a read-only root plus per-node GRUB configs from the database.

Owns: the TFTP listener(s) of ``config.listeners.tftp``, the root (``config.boot.tftp_root``, assembled
from Debian's ``ipxe`` package and the catalog's arm64 GRUB NBP, files 0444), path safety, and the
generated files: ``grub/grub.cfg-<mac>`` (what the lab GRUB image asks for, ``images/lab/grub-early.cfg``;
also ``grub/grub.cfg-01-aa-bb-...``), ``grub/grub.cfg`` (fallback) and catalog files under
``images/<name>/<version>/<file>`` (GRUB fetches kernel/initrd that way).

Protocol: tftpy parses the request and negotiates options (RFC 2347 OACK; RFC 2348 ``blksize`` clamped
to 8..65464; RFC 2349 ``tsize``; everything else, e.g. RFC 7440 ``windowsize``, is dropped) and sends
the OACK or first DATA, through ``dyn_file_func`` for every name: the tftpy root is an empty directory,
so tftpy never opens a path itself and all file access goes through :func:`resolve`. The DATA/ACK
loop after that is ours (``_Transfer``): lock-step RFC 1350, retransmit on timeout only (never on a
duplicate ACK: the Sorcerer's Apprentice bug), block numbers wrap 65535 -> 0, packets from any other
address/port get ERROR 5 (unknown TID) and are otherwise ignored (tftpy logs but still processes them).
Each transfer's socket is connected to its client (one send/recv per block, no addresses to parse or
build); an unconnected twin on the same port catches the other TIDs' packets for that ERROR 5.

Limits of tftpy we work around: its session sockets are not bound to the address the client asked
(multi-homed hosts then answer from another source IP, which firmware drops) - ours are bound to the
listener's address; its ``select()`` loop is O(sessions) per packet - ours uses epoll; it is single
threaded - ``workers`` processes share the port with SO_REUSEPORT (the kernel spreads clients by
4-tuple hash, so a client's retransmitted RRQ reaches the same worker). With one worker per CPU each
is pinned to its CPU and takes the requests arriving there (SO_INCOMING_CPU, :func:`_pin`), so a
lock-step client and its worker wake each other on one CPU instead of across CPUs.
Writes: WRQ is always refused with ERROR 2 "Access violation"; nothing is ever written under the root.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import re
import select
import shutil
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tftpy.TftpContexts import TftpContextServer
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketRRQ, TftpPacketWRQ
from tftpy.TftpStates import TftpStateExpectACK

from bootsvc import metrics
from bootsvc.config import Config, Listener

log = logging.getLogger("bootsvc.tftp")
logging.getLogger("tftpy").setLevel(logging.CRITICAL)  # tftpy logs per packet; its errors are ours to log

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL, ERR_UNKNOWN_TID, ERR_OPTION = 1, 2, 4, 5, 8
MAX_BLKSIZE = 65464  # RFC 2348 §3 (tftpy allows 65536)
MAX_REQUEST = 512  # RFC 2347 §2: a request with options must fit 512 bytes
MAX_NAME = 255
IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_FILES = ("undionly.kpxe", "snponly.efi", "ipxe.efi")
# Names we serve: ASCII letters, digits and . _ - : + / only. No NUL, '\', '%', spaces or 8-bit bytes
# ("odd encodings" such as overlong UTF-8 never reach the file system).
_NAME_RE = re.compile(r"^[A-Za-z0-9._:+/-]+$")
_GRUB_MAC = re.compile(r"^grub/grub\.cfg-(?:01-)?([0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2}){5})$")
_IMAGE = re.compile(r"^images/([^/]+)/([^/]+)/([^/]+)$")
_CACHE_MAX_FILE = 32 << 20
SO_INCOMING_CPU = getattr(socket, "SO_INCOMING_CPU", 49)  # Linux
_OP_NUM = struct.Struct("!HH")  # opcode and block number: the head of every DATA/ACK


class Refused(Exception):
    """A request we answer with an ERROR packet (code, message)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg


# ---------------------------------------------------------------- paths
def clean_name(name: str) -> str:
    """The root-relative form of a requested name, or Refused(ACCESS).

    One leading '/' is taken relative to the root (GRUB asks for ``/grub/grub.cfg-...``; tftpd-hpa -s
    does the same), so ``/etc/passwd`` means ``<root>/etc/passwd``: it can never name a file outside."""
    if not name or len(name) > MAX_NAME or not _NAME_RE.match(name):
        raise Refused(ERR_ACCESS, "Access violation")
    rel = name[1:] if name.startswith("/") else name
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise Refused(ERR_ACCESS, "Access violation")
    return rel


def safe_resolve(root: Path, name: str) -> Path | None:
    """A regular file under ``root`` reached without following any symlink, or None."""
    try:
        rel = clean_name(name)
    except Refused:
        return None
    cur = Path(root)
    for part in rel.split("/"):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None
    return cur if stat.S_ISREG(os.lstat(cur).st_mode) else None


def open_under(root: Path, rel: str) -> int:
    """Open ``rel`` under ``root`` component by component with O_NOFOLLOW (no symlink, no race)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = rel.split("/")
        for part in parts[:-1]:
            if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                raise PermissionError(f"{part} is a symlink")
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise IsADirectoryError(rel)
    return ffd


def ensure_root(root: Path, *, arm64_nbp: str, arm64_src: Path | None = None, ipxe_dir: Path = IPXE_DIR) -> list[str]:
    """Create/refresh the read-only TFTP root: iPXE binaries from Debian's ``ipxe`` package and the arm64
    GRUB NBP. Files are copied (never linked: the server refuses symlinks) and made 0444. Returns the
    relative names present."""
    root.mkdir(parents=True, exist_ok=True)
    wanted: list[tuple[Path, str]] = [(ipxe_dir / f, f) for f in IPXE_FILES]
    if arm64_src is not None:
        wanted.append((arm64_src, arm64_nbp))
    for src, rel in wanted:
        clean_name(rel)
        dst = root / rel
        if not src.exists():
            log.warning("tftp root: %s missing (install Debian's ipxe package / build the arm64 NBP)", src)
            continue
        real = src.resolve()
        rs = real.stat()
        if dst.exists() and dst.stat().st_size == rs.st_size and dst.stat().st_mtime_ns >= rs.st_mtime_ns:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(real, tmp)
        os.chmod(tmp, 0o444)
        tmp.replace(dst)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        os.chmod(d, 0o555)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- content
class _Content:
    """A file's bytes (cached) or an fd to pread from, plus its size; ``key`` names cached file bytes
    (path, size, mtime) so their DATA packets can be reused (:class:`_PacketCache`)."""

    __slots__ = ("data", "fd", "key", "size")

    def __init__(self, data: bytes | None = None, fd: int | None = None, size: int = 0,
                 key: tuple[str, int, int] | None = None) -> None:
        self.data, self.fd, self.size, self.key = data, fd, size, key

    def block(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset: offset + n]
        assert self.fd is not None
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _FileCache:
    """Small LRU of whole file contents keyed by (path, size, mtime): NBPs are read once, not per block."""

    def __init__(self, max_entries: int = 32) -> None:
        self._d: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._max = max_entries

    def content(self, fd: int, key_path: str) -> _Content:
        st = os.fstat(fd)
        if st.st_size > _CACHE_MAX_FILE:
            return _Content(fd=fd, size=st.st_size)
        key = (key_path, st.st_size, st.st_mtime_ns)
        data = self._d.get(key)
        if data is None:
            chunks = []
            off = 0
            while off < st.st_size:
                b = os.pread(fd, min(1 << 20, st.st_size - off), off)
                if not b:
                    break
                chunks.append(b)
                off += len(b)
            data = b"".join(chunks)
            self._d[key] = data
            while len(self._d) > self._max:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(key)
        os.close(fd)
        return _Content(data=data, size=len(data), key=key)


_PACKET_OVERHEAD = 40  # CPython bytes object header, per packet (for the cache's byte budget)


class _PacketCache:
    """Ready DATA packets of cached files, per (file, blksize), LRU within a byte budget.

    A block is then one ``sendto`` of an existing bytes object: no slice, header pack and concatenation
    per block. Boot storms fetch the same few NBPs with one or two block sizes, so each is built once per
    worker (~1 ms for 1 MiB) and reused by every later transfer. Generated files (GRUB configs) and big
    files read with ``pread`` are not cached."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._d: OrderedDict[tuple[tuple[str, int, int], int], list[bytes]] = OrderedDict()
        self._cost: dict[tuple[tuple[str, int, int], int], int] = {}
        self._bytes, self._max = 0, max_bytes

    def packets(self, content: _Content, blksize: int) -> list[bytes] | None:
        data = content.data
        if data is None or content.key is None:
            return None
        n = len(data) // blksize + 1  # the last block is short, maybe empty (RFC 1350 §6)
        cost = len(data) + n * (4 + _PACKET_OVERHEAD)
        if cost > self._max // 2:
            return None
        k = (content.key, blksize)
        p = self._d.get(k)
        if p is not None:
            self._d.move_to_end(k)
            return p
        pack = struct.Struct("!HH").pack
        p = [pack(OP_DATA, i & 0xFFFF) + data[(i - 1) * blksize: i * blksize] for i in range(1, n + 1)]
        self._d[k], self._cost[k] = p, cost
        self._bytes += cost
        while self._bytes > self._max:
            old, _ = self._d.popitem(last=False)
            self._bytes -= self._cost.pop(old)
        return p


Generator = Callable[[str, str], bytes | None]  # (relative name, client ip) -> content or None


@dataclass
class Resolver:
    """Maps a requested name to content: generated files first, then catalog images, then the root."""

    root: Path
    generate: Generator | None = None
    image_file: Callable[[str, str, str], Path | None] | None = None

    def __post_init__(self) -> None:
        self.cache = _FileCache()

    def __call__(self, name: str, client_ip: str) -> _Content:
        rel = clean_name(name)
        if self.generate is not None and rel.startswith("grub/"):
            body = self.generate(rel, client_ip)
            if body is not None:
                return _Content(data=body, size=len(body))
        m = _IMAGE.match(rel)
        if m and self.image_file is not None:
            p = self.image_file(m.group(1), m.group(2), m.group(3))
            if p is None:
                raise Refused(ERR_NOT_FOUND, "File not found")
            return self.cache.content(os.open(p, os.O_RDONLY), str(p))
        try:
            fd = open_under(self.root, rel)
        except FileNotFoundError:
            raise Refused(ERR_NOT_FOUND, "File not found") from None
        except (IsADirectoryError, NotADirectoryError):
            raise Refused(ERR_NOT_FOUND, "File not found") from None
        except OSError:  # ELOOP: a symlink; EACCES
            raise Refused(ERR_ACCESS, "Access violation") from None
        return self.cache.content(fd, str(self.root / rel))


# ---------------------------------------------------------------- transfers
def error_packet(code: int, msg: str) -> bytes:
    return struct.pack("!HH", OP_ERROR, code) + msg.encode("ascii", "replace") + b"\0"


class _Transfer:
    """One read transfer after tftpy sent the OACK or DATA 1: the lock-step DATA/ACK loop."""

    __slots__ = (
        "acked_wait",
        "blksize",
        "complete",
        "content",
        "done",
        "last",
        "last_sent",
        "name",
        "nblocks",
        "packets",
        "peer",
        "resent",
        "retries",
        "sock",
        "started",
        "stray",
    )

    def __init__(self, sock: socket.socket, peer: tuple[str, int], content: _Content, blksize: int,
                 expect: int, last_packet: bytes, name: str, packets: list[bytes] | None = None) -> None:
        self.sock, self.peer, self.content, self.blksize = sock, peer, content, blksize
        self.stray: socket.socket | None = None  # same port, unconnected: packets from other TIDs
        self.packets = packets  # prebuilt DATA packets (block n is packets[n - 1]), or None
        self.acked_wait = expect  # absolute number of the block whose ACK we wait for (0 = OACK)
        self.last = last_packet
        self.last_sent = time.monotonic()
        self.retries = 0
        self.resent = 0
        self.done = False
        self.complete = False  # the client ACKed the final block
        self.name = name
        self.started = self.last_sent
        self.nblocks = content.size // blksize + 1  # a final short (maybe empty) block ends the transfer

    def on_stray(self, buf: bytes, addr: tuple[str, int]) -> None:
        """RFC 1350 §4: a packet from a wrong TID gets ERROR 5 and does not disturb the transfer. The
        session socket is connected to the client, so the kernel hands such packets to ``stray``."""
        if self.stray is not None and addr != self.peer:
            with contextlib.suppress(OSError):
                self.stray.sendto(error_packet(ERR_UNKNOWN_TID, "Unknown transfer ID"), addr)

    def on_packet(self, buf: bytes, now: float | None = None) -> None:
        """A datagram from the client (the session socket is connected: nobody else reaches it)."""
        if len(buf) < 4:
            return
        op, num = _OP_NUM.unpack_from(buf)
        if op == OP_ACK:
            if num != self.acked_wait & 0xFFFF:
                return  # duplicate/old ACK: never resend on it (Sorcerer's Apprentice)
            if self.acked_wait >= self.nblocks:
                self.done = self.complete = True
                return
            self.acked_wait += 1
            self._send_block(self.acked_wait, time.monotonic() if now is None else now)
        elif op == OP_ERROR:
            # EDK2 aborts its first (tsize-probing) RRQ this way; not an error of ours
            self.done = True

    def _send_block(self, n: int, now: float) -> None:
        if self.packets is not None:
            self.last = self.packets[n - 1]
        else:
            self.last = struct.pack("!HH", OP_DATA, n & 0xFFFF) + self.content.block((n - 1) * self.blksize,
                                                                                      self.blksize)
        self.last_sent = now
        self.retries = 0
        try:  # noqa: SIM105 - contextlib.suppress would add a context manager per block
            self.sock.send(self.last)
        except OSError:  # ENOBUFS/ECONNREFUSED: the timeout resends (or gives up)
            pass

    def on_timeout(self, now: float, timeout: float, max_retries: int) -> None:
        if now - self.last_sent < timeout:
            return
        if self.retries >= max_retries:
            log.info("tftp: %s to %s:%d timed out at block %d", self.name, *self.peer, self.acked_wait)
            self.done = True
            return
        self.retries += 1
        self.resent += 1
        self.last_sent = now
        with contextlib.suppress(OSError):
            self.sock.send(self.last)

    def close(self) -> None:
        self.content.close()
        self.sock.close()
        if self.stray is not None:
            self.stray.close()


class TftpService:
    """One worker: the request socket and the transfers it started (single thread, epoll)."""

    def __init__(self, address: str, port: int, resolver: Resolver, *, timeout: float = 2.0,
                 retries: int = 5, reuse_port: bool = True, cpu: int | None = None) -> None:
        self.address, self.port = address, port
        self.resolver = resolver
        self.timeout, self.retries = timeout, retries
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A wildcard listener learns each request's destination address (IP_PKTINFO) and answers from
        # it: the fix for tftpy's unbound session sockets on multi-homed hosts (brief §2.4).
        self._pktinfo = address == "0.0.0.0"
        if self._pktinfo:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        if reuse_port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if cpu is not None:
            # with SO_REUSEPORT the kernel (>= 6.1) gives a request to the socket whose incoming CPU is
            # the one the request arrived on: see _pin()
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU, cpu)
        self.sock.bind((address, port))
        self.port = self.sock.getsockname()[1]
        self.sock.setblocking(False)
        # epoll directly (not ``selectors``): no key objects and result list per wake-up on the per-block path
        self._ep = select.epoll()
        self._ep.register(self.sock.fileno(), select.EPOLLIN)
        self.transfers: dict[int, _Transfer] = {}
        self.strays: dict[int, _Transfer] = {}  # the catch-all socket of each transfer (on_stray)
        # Reading a socket again right after answering it pays off only when the client can ACK
        # meanwhile, from another CPU. A pinned worker shares its CPU with its clients (see _pin): the
        # ACK cannot come before the worker yields, and every try is a failed recv whose
        # BlockingIOError costs more than the syscall (CPython formats strerror() for it: perf showed
        # gettext and locale decoding in the workers).
        self._reread = cpu is None
        self.packet_cache = _PacketCache()
        self._tftpy_root = _empty_dir()
        self.completed = 0
        self.resent = 0  # DATA/OACK packets retransmitted after a timeout (all transfers)

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
                for fd, _ev in events:
                    t = transfers.get(fd)
                    if t is not None:
                        if few:
                            self._drain_transfer(t)
                            continue
                        # One datagram per wake-up, read here without a call per layer (per block). A
                        # lock-step client has one ACK in flight, so a second recv would almost always
                        # fail with EAGAIN; anything else queued is reported by the level-triggered epoll
                        # on the next poll.
                        try:
                            buf = t.sock.recv(2048)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:  # ICMP port unreachable as ECONNREFUSED: the client is gone
                            t.done = True
                        else:
                            t.on_packet(buf, now)
                        if t.done:
                            self._finish(t)
                    elif fd == reqfd:
                        self._drain_requests()
                    else:
                        self._on_stray(fd)
                if now - last_check >= 0.25 or not events:
                    last_check = now
                    if stop.is_set():
                        break
                    for t in list(transfers.values()):
                        t.on_timeout(now, self.timeout, self.retries)
                        if t.done:
                            self._finish(t)
        finally:
            for t in list(self.transfers.values()):
                self._finish(t)
            self._ep.close()
            self.sock.close()
            log.info("tftp: worker %d stopped: %d transfers, %d packets resent after a timeout", os.getpid(),
                     self.completed, self.resent)

    def _drain_requests(self) -> None:
        for _ in range(64):
            local = self.address
            try:
                if self._pktinfo:
                    buf, anc, _flags, addr = self.sock.recvmsg(2048, socket.CMSG_SPACE(12))
                    local = _pktinfo_dst(anc) or local
                else:
                    buf, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            self._request(buf, addr, local)

    def _drain_transfer(self, t: _Transfer) -> None:
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
            t.on_packet(buf, time.monotonic())
            if t.done:
                break
        if t.done:
            self._finish(t)

    def _on_stray(self, fd: int) -> None:
        t = self.strays.get(fd)
        if t is None or t.stray is None:
            return
        for _ in range(8):
            try:
                buf, addr = t.stray.recvfrom(2048)
            except OSError:
                return
            t.on_stray(buf, addr)

    def _finish(self, t: _Transfer) -> None:
        fd = t.sock.fileno()
        if t.stray is not None and self.strays.pop(t.stray.fileno(), None) is not None:
            self._ep.unregister(t.stray.fileno())
        if fd in self.transfers:
            del self.transfers[fd]
            self._ep.unregister(fd)
            self.completed += 1
            self.resent += t.resent
            # Bytes the client acknowledged (not bytes sent: retransmits are counted apart).
            acked = t.content.size if t.complete else min(t.content.size, max(0, t.acked_wait - 1) * t.blksize)
            metrics.counters.inc("bootsvc_tftp_bytes_total", None, acked)
            metrics.counters.inc("bootsvc_tftp_transfers_total", {"result": "ok" if t.complete else "aborted"})
            log.debug("tftp: done %s to %s:%d in %.3f s (%d resent)", t.name, *t.peer, time.monotonic() - t.started,
                      t.resent)
        t.close()

    def _session_socket(self, local: str) -> socket.socket:
        # Bound to the address the client sent its request to, so every reply comes from it (tftpy
        # leaves its session sockets unbound; firmware drops replies from another source IP).
        # SO_REUSEADDR: the transfer's catch-all socket shares the port (see _start).
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((local, 0))
        return s

    def _request(self, buf: bytes, addr: tuple[str, int], local: str) -> None:
        if len(buf) < 4 or len(buf) > MAX_REQUEST:
            self._reply_error(addr, ERR_ILLEGAL, "Illegal TFTP operation", local)
            return
        (op,) = struct.unpack_from("!H", buf)
        if op == OP_WRQ:
            log.warning("tftp: upload refused from %s:%d", *addr)
            self._reply_error(addr, ERR_ACCESS, "Access violation", local)
            return
        if op != OP_RRQ:
            return  # stray DATA/ACK/ERROR on the request port: ignore (RFC 1350 §4)
        try:
            raw_name = buf[2:].split(b"\0", 1)[0]
            if any(c < 0x21 or c > 0x7E for c in raw_name):
                raise Refused(ERR_ACCESS, "Access violation")  # 8-bit/odd encodings, control bytes
            pkt = TftpPacketFactory().parse(buf)
            assert isinstance(pkt, TftpPacketRRQ) and not isinstance(pkt, TftpPacketWRQ)
            name = pkt.filename
            content = self.resolver(name, addr[0])
        except Refused as e:
            log.info("tftp: refused %r from %s:%d: %s", _printable(buf), addr[0], addr[1], e.msg)
            self._reply_error(addr, e.code, e.msg, local)
            return
        except Exception:  # malformed request (tftpy raises TftpException, UnicodeDecodeError, struct.error)
            log.info("tftp: malformed request from %s:%d", *addr)
            self._reply_error(addr, ERR_ILLEGAL, "Illegal TFTP operation", local)
            return
        self._start(pkt, content, addr, name, local)

    def _start(self, pkt: TftpPacketRRQ, content: _Content, addr: tuple[str, int], name: str, local: str) -> None:
        # RFC 2347: option names are case-insensitive; clamp blksize to RFC 2348's maximum
        opts = {k.lower(): v for k, v in (pkt.options or {}).items()}
        if "blksize" in opts:
            try:
                opts["blksize"] = str(min(max(int(opts["blksize"]), 8), MAX_BLKSIZE))
            except ValueError:
                del opts["blksize"]
        if "tsize" in opts:
            opts["tsize"] = "0"
        req = TftpPacketRRQ()
        req.filename, req.mode, req.options = name, "octet", opts
        req.encode()
        ctx = TftpContextServer(addr[0], addr[1], self.timeout, self._tftpy_root,
                                dyn_file_func=lambda *_a, **_k: _SizedReader(content), flock=False)
        ctx.sock.close()
        ctx.sock = self._session_socket(local)
        try:
            ctx.start(req.buffer)  # tftpy: options -> OACK, or DATA 1
        except Exception as e:
            log.info("tftp: %s from %s:%d failed to start: %s", name, addr[0], addr[1], e)
            ctx.sock.close()
            content.close()
            return
        if not isinstance(ctx.state, TftpStateExpectACK):
            ctx.sock.close()
            content.close()
            return
        blksize = int(ctx.options.get("blksize", 512))
        expect = int(ctx.next_block)  # 0 after an OACK, 1 after DATA 1
        last = ctx.last_pkt.buffer if ctx.last_pkt is not None else b""
        # Connected to the client: per block one send()/recv() without addresses (CPython parses and
        # builds none; the kernel keeps the route) - the gap to tftpd-hpa, which connects too. A second,
        # unconnected socket on the same port gets what the kernel does not match to the connection:
        # packets from other TIDs, answered with ERROR 5 (tftpd-hpa lets the kernel send ICMP instead).
        try:
            ctx.sock.connect(addr)
            stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            stray.bind(ctx.sock.getsockname())
        except OSError as e:
            log.info("tftp: %s to %s:%d: no session socket: %s", name, addr[0], addr[1], e)
            ctx.sock.close()
            content.close()
            return
        stray.setblocking(False)
        ctx.sock.setblocking(False)
        t = _Transfer(ctx.sock, addr, content, blksize, expect, last, name,
                      self.packet_cache.packets(content, blksize))
        t.stray = stray
        self.transfers[ctx.sock.fileno()] = t
        self.strays[stray.fileno()] = t
        self._ep.register(ctx.sock.fileno(), select.EPOLLIN)
        self._ep.register(stray.fileno(), select.EPOLLIN)
        log.info("tftp: rrq %s from %s:%d size=%d blksize=%d tsize=%s", name, addr[0], addr[1], content.size,
                 blksize, "tsize" in opts)

    def _reply_error(self, addr: tuple[str, int], code: int, msg: str, local: str) -> None:
        with self._session_socket(local) as s, contextlib.suppress(OSError):
            s.sendto(error_packet(code, msg), addr)


class _SizedReader(io.RawIOBase):
    """What tftpy reads DATA 1 from and seeks for tsize, backed by our content."""

    def __init__(self, content: _Content) -> None:
        self.c, self.pos = content, 0
        self.name = "<bootsvc>"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.c.size - self.pos if n is None or n < 0 else n
        b = self.c.block(self.pos, n)
        self.pos += len(b)
        return b

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.c.size + off
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:  # the transfer owns the content, not tftpy
        super().close()


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def _pktinfo_dst(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The address to answer a request from, from IP_PKTINFO (struct in_pktinfo: ifindex, spec_dst,
    addr): Linux sets ``ipi_spec_dst`` to the destination itself for a unicast request to a local
    address, and to the receiving interface's address for a broadcast one."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntoa(data[4:8])
    return None


def _printable(buf: bytes) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", buf[2:66].split(b"\0", 1)[0].decode("latin-1"))


_EMPTY: str | None = None


def _empty_dir() -> str:
    """An empty directory for tftpy's root: it must never find a real file to open by itself."""
    global _EMPTY
    if _EMPTY is None or not os.path.isdir(_EMPTY):
        import tempfile

        _EMPTY = tempfile.mkdtemp(prefix="bootsvc-tftpy-")
        os.chmod(_EMPTY, 0o555)
    return _EMPTY


# ---------------------------------------------------------------- bootsvc wiring
def http_base_for(config: Config, client_ip: str) -> str:
    """http://<boot_server>:<port> for a client: the boot_server of the network holding its address."""
    import ipaddress

    try:
        ip = ipaddress.IPv4Address(client_ip)
    except ValueError:
        ip = None
    port = config.boot.http_port
    for n in config.networks:
        if ip is not None and ip in n.cidr and n.boot_server is not None:
            return f"http://{n.boot_server}:{port}"
    for n in config.networks:
        if n.boot_server is not None:
            return f"http://{n.boot_server}:{port}"
    lst = config.listeners.http[0] if config.listeners.http else None
    return f"http://{lst.address if lst else '127.0.0.1'}:{lst.port if lst else port}"


def make_generator(config: Config) -> tuple[Generator, Callable[[str, str, str], Path | None]]:
    """GRUB configs from the database, and catalog lookups, for the TFTP resolver."""
    from bootsvc import inventory, render, secrets
    from bootsvc.db import make_engine, session_factory
    from bootsvc.web.boot import load_verified_catalog

    sessions = session_factory(make_engine(config.database.url))
    catalog = load_verified_catalog(config)
    key_box: list[bytes] = []
    discovery = config.dhcp.unknown_clients == "discover"

    def key() -> bytes:
        if not key_box:
            key_box.append(secrets.read_ref(config.security.node_key_ref, create=True))
        return key_box[0]

    def generate(rel: str, client_ip: str) -> bytes | None:
        base = http_base_for(config, client_ip)
        if rel == "grub/grub.cfg":
            # reached only when no per-MAC file exists (grub-early.cfg tests -f first)
            ctx = render.BootContext(base, "00:00:00:00:00:00")
            d = render.Decision(render.Action.LOCAL, "no configuration for this machine")
            return render.grub_config(d, ctx, None, http_port=config.boot.http_port).encode()
        m = _GRUB_MAC.match(rel)
        if not m:
            return None
        mac = inventory.normalize_mac(m.group(1))
        with sessions() as s:
            node = inventory.node_by_mac(s, mac)
        decision = render.decide(node, catalog, discovery=discovery)
        if node is None and decision.action is not render.Action.DISCOVERY:
            return None  # unknown: let GRUB fall back to grub/grub.cfg
        token = None
        if node is not None and decision.action in render.TOKEN_ACTIONS:
            token = render.boot_token(secrets.node_secret(key(), node.id, node.secret_generation))
        try:
            body = render.grub_config(decision, render.BootContext(base, mac, token), node,
                                      http_port=config.boot.http_port)
        except render.RenderError as e:
            log.error("tftp: cannot render GRUB config for %s: %s", mac, e)
            body = render.grub_config(render.Decision(render.Action.HOLD, "configuration error"),
                                      render.BootContext(base, mac), node, http_port=config.boot.http_port)
        log.info("tftp: grub config for %s node=%s action=%s", mac, node.name if node else "-",
                 decision.action.value)
        return body.encode()

    def image_file(name: str, version: str, fname: str) -> Path | None:
        f = catalog.lookup_file(name, version, fname)
        return f.path if f is not None else None

    return generate, image_file


def prepare_root(config: Config) -> Path:
    """Assemble the root from Debian's ipxe package and the catalog's arm64 NBP (kind nbp, role grub-arm64)."""
    from bootsvc.web.boot import load_verified_catalog

    root = config.resolve(config.boot.tftp_root)
    arm = None
    try:
        cat = load_verified_catalog(config)
        for img in cat.images:
            f = img.file("grub-arm64")
            if img.kind == "nbp" and f is not None and cat.usable(img):
                arm = f.path
    except Exception as e:  # the root is still useful without the arm64 NBP
        log.warning("tftp: no arm64 NBP from the catalog: %s", e)
    try:
        names = ensure_root(root, arm64_nbp=config.boot.arm64_nbp, arm64_src=arm)
    except PermissionError:
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    log.info("tftp root %s: %s", root, ", ".join(names) or "(empty)")
    return root


def _priority() -> None:
    """``BOOTSVC_TFTP_NICE=N`` lowers the workers' nice value by N (needs CAP_SYS_NICE). One worker
    serves many lock-step transfers, so on a CPU-saturated host it competes, as one task, with every
    other process; a fork-per-transfer server (tftpd-hpa) gets one scheduler share per transfer."""
    n = int(os.environ.get("BOOTSVC_TFTP_NICE", "0") or 0)
    if n > 0:
        try:
            os.nice(-n)
        except OSError as e:
            log.warning("tftp: cannot raise priority by %d: %s", n, e.strerror)


def _pin(index: int, workers: int) -> int | None:
    """Pin worker ``index`` to one CPU when there is one worker per CPU (``BOOTSVC_TFTP_PIN``, default
    on), and return that CPU for SO_INCOMING_CPU. TFTP is lock-step: every block wakes the client and
    every ACK wakes the worker. A worker serving clients on the other CPU pays a cross-CPU wake-up (an
    IPI, a VM exit on virtual machines) per block - a third of the worker's time under perf in
    bench/tftp - where tftpd-hpa's one child per client ends up beside its client. Steering each request
    to the worker on the CPU it arrived on keeps client and worker on one CPU."""
    if os.environ.get("BOOTSVC_TFTP_PIN", "1") != "1" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if workers != len(cpus):
        return None
    cpu = cpus[index]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:
        log.warning("tftp: cannot pin worker %d to CPU %d: %s", index, cpu, e.strerror)
        return None
    return cpu


def _worker(config: Config, lst: Listener, root: Path, stop: Any, ready: Any, index: int = 0,
            workers: int = 1) -> None:
    _priority()
    cpu = _pin(index, workers)
    flusher = metrics.ensure_process_flusher(config, "tftp")  # a forked worker publishes its own counts
    generate, image_file = make_generator(config)
    svc = TftpService(str(lst.address), lst.port, Resolver(root, generate, image_file), cpu=cpu)
    ready.set()
    try:
        svc.serve(stop)
    finally:
        flusher.stop()


def run(config: Config, listener_index: int, stop: threading.Event) -> None:
    """Service runner: ``workers`` processes (``BOOTSVC_TFTP_WORKERS``, default = CPU count, max 4)
    serving ``config.listeners.tftp[listener_index]`` until ``stop`` is set."""
    lst = config.listeners.tftp[listener_index]
    root = prepare_root(config)
    n = int(os.environ.get("BOOTSVC_TFTP_WORKERS", str(min(4, os.cpu_count() or 1))))
    log.info("tftp: listening on %s:%d with %d worker(s), root %s", lst.address, lst.port, n, root)
    if n <= 1:
        _priority()
        generate, image_file = make_generator(config)
        TftpService(str(lst.address), lst.port, Resolver(root, generate, image_file)).serve(stop)
        return
    mp = multiprocessing.get_context("fork")
    mstop = mp.Event()
    procs: list[Any] = []

    def spawn(index: int) -> Any:
        ready = mp.Event()
        p = mp.Process(target=_worker, args=(config, lst, root, mstop, ready, index, n), daemon=True,
                       name="bootsvc-tftp-worker")
        p.start()
        return p

    procs = [spawn(i) for i in range(n)]
    try:
        while not stop.wait(0.5):
            for i, p in enumerate(procs):
                if not p.is_alive():
                    log.error("tftp: worker pid %s exited with %s; restarting", p.pid, p.exitcode)
                    procs[i] = spawn(i)
    finally:
        mstop.set()
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
