"""The TFTP root and what a requested name maps to: path safety, the read-only root, file contents.

Owns: the root (``config.boot.tftp_root``, assembled from Debian's ``ipxe`` package and the catalog's
arm64 GRUB NBP, files 0444), name checks (ASCII letters, digits and ``. _ - : + /`` only; no ``..``;
never a symlink: every component is opened with O_NOFOLLOW), and :class:`Resolver`, which maps a name
to content: generated files (GRUB configs, ``bootsvc/tftp/grub.py``) first, then catalog images under
``images/<name>/<version>/<file>``, then the root. Contents of files up to 32 MiB are cached whole and
their DATA packets prebuilt per block size (:class:`PacketCache`): a boot storm fetches the same few
NBPs, so a block is one send of an existing bytes object.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootsvc.tftp.packet import ERR_ACCESS, ERR_NOT_FOUND, ERR_UNDEFINED, MAX_NAME, OP_DATA, Refused, netascii

log = logging.getLogger("bootsvc.tftp")

IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_FILES = ("undionly.kpxe", "snponly.efi", "ipxe.efi")
# Names we serve: ASCII letters, digits and . _ - : + / only. No NUL, '\', '%', spaces or 8-bit bytes
# ("odd encodings" such as overlong UTF-8 never reach the file system).
_NAME_RE = re.compile(r"^[A-Za-z0-9._:+/-]+$")
_IMAGE = re.compile(r"^images/([^/]+)/([^/]+)/([^/]+)$")
_CACHE_MAX_FILE = 32 << 20


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
class Content:
    """A file's bytes (cached) or an fd to pread from, plus its size; ``key`` names cached file bytes
    (path, size, mtime) so their DATA packets can be reused (:class:`PacketCache`)."""

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

    def as_netascii(self) -> Content:
        """This content translated for a ``netascii`` read (:func:`bootsvc.tftp.packet.netascii`); the
        translation needs the whole file, so files too big for the cache are refused."""
        if self.data is None:
            self.close()
            raise Refused(ERR_UNDEFINED, "netascii is offered for files up to 32 MiB only: ask for octet")
        body = netascii(self.data)
        return Content(data=body, size=len(body))


class FileCache:
    """Small LRU of whole file contents keyed by (path, size, mtime): NBPs are read once, not per block."""

    def __init__(self, max_entries: int = 32) -> None:
        self._d: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._max = max_entries

    def content(self, fd: int, key_path: str) -> Content:
        """The content behind ``fd``, which this call owns: kept open for a big file, else closed."""
        try:
            st = os.fstat(fd)
            if st.st_size > _CACHE_MAX_FILE:
                return Content(fd=fd, size=st.st_size)
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
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return Content(data=data, size=len(data), key=key)


_PACKET_OVERHEAD = 40  # CPython bytes object header, per packet (for the cache's byte budget)


class PacketCache:
    """Ready DATA packets of cached files, per (file, blksize), LRU within a byte budget.

    A block is then one ``sendto`` of an existing bytes object: no slice, header pack and concatenation
    per block. Boot storms fetch the same few NBPs with one or two block sizes, so each is built once per
    worker (~1 ms for 1 MiB) and reused by every later transfer. Generated files (GRUB configs) and big
    files read with ``pread`` are not cached."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._d: OrderedDict[tuple[tuple[str, int, int], int], list[bytes]] = OrderedDict()
        self._cost: dict[tuple[tuple[str, int, int], int], int] = {}
        self._bytes, self._max = 0, max_bytes

    def packets(self, content: Content, blksize: int) -> list[bytes] | None:
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


# (relative name, client ip) -> content, or None (not generated here), or raises Refused
Generator = Callable[[str, str], bytes | None]
# Out of descriptors or memory: not the client's fault and not "Access violation" - the service answers
# these with ERROR 0 "server busy" (bootsvc/tftp/service.py).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass
class Resolver:
    """Maps a requested name to content: generated files first, then catalog images, then the root."""

    root: Path
    generate: Generator | None = None
    image_file: Callable[[str, str, str], Path | None] | None = None

    def __post_init__(self) -> None:
        self.cache = FileCache()

    def __call__(self, name: str, client_ip: str) -> Content:
        rel = clean_name(name)
        if self.generate is not None and rel.startswith("grub/"):
            body = self.generate(rel, client_ip)
            if body is not None:
                return Content(data=body, size=len(body))
        m = _IMAGE.match(rel)
        if m and self.image_file is not None:
            p = self.image_file(m.group(1), m.group(2), m.group(3))
            if p is None:
                raise Refused(ERR_NOT_FOUND, "File not found")
            try:
                ifd = os.open(p, os.O_RDONLY)
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    raise
                raise Refused(ERR_NOT_FOUND, "File not found") from None
            return self.cache.content(ifd, str(p))
        try:
            fd = open_under(self.root, rel)
        except FileNotFoundError:
            raise Refused(ERR_NOT_FOUND, "File not found") from None
        except (IsADirectoryError, NotADirectoryError):
            raise Refused(ERR_NOT_FOUND, "File not found") from None
        except OSError as e:  # ELOOP: a symlink; EACCES
            if e.errno in RESOURCE_ERRNOS:
                raise
            raise Refused(ERR_ACCESS, "Access violation") from None
        return self.cache.content(fd, str(self.root / rel))
