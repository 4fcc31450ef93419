"""BlueField boot streams (``.bfb``): read, list, extract and write the format ``mlx-mkbfb`` produces.

Owns: the stream format and nothing else (the catalog entry is ``bootsvc.images``' business; the CLI
is ``bootsvc image import-bfb`` in ``bootsvc.images_cli``). The lab builds its BFB with
:func:`write_bfb`; ``import-bfb`` reads any BFB with :func:`scan_stream` / :func:`import_stream`.

The format, as Mellanox/bfscripts ``mlx-mkbfb`` (class ``ImageHdr``, ``make_stream``,
``dump_stream``) and its man page ``man/mlx-mkbfb.1`` define it:

* a BFB is images back to back; each is a 24-byte header, the payload, then zero padding up to the
  next multiple of 8 bytes. No file header, no trailer, no index: the only way to find image *n* is
  to walk the headers of images 0..n-1 (which is why a reader never needs to hold a payload);
* the header is three little-endian 64-bit words. Word 0: bits 0-31 magic ``0x13026642``
  ("Bf^B^S"), 32-35 major version (1), 36-39 minor version (2 today; readers accept <= 2), 44-47 the
  version of the *next* image of the same id, 48-51 this image's version (both only for minor <= 2,
  else 0), 52-55 header length / 8 (3), 56-63 the image id. Word 1: bits 0-31 the payload length
  (without padding), 32-63 the CRC-32 (zlib polynomial) of payload *and* padding. Word 2: a bitmap of
  the ids still to come after this image (``following_images``);
* image ids name what a payload is (ATF ids from ``tbbr_img_def.h``, UEFI ids from Mellanox's BfbFs):
  62 ``image`` (the arm64 kernel), 63 ``initramfs`` (the installer, which carries the whole OS),
  59 ``boot-args``, ... ``mlx-mkbfb -x`` writes each to ``dump-<name>-v<version>`` (the ``-v<n>``
  suffix only for minor >= 2; unknown ids as ``image_id_<n>``). Versions are platform generations
  per the man page; a BF3 bundle carries its kernel as ``dump-image-v0``;
* ``mlx-mkbfb`` emits images in its table's order, versions ascending within an id; the bitmap of an
  image keeps its own id's bit while a later version of the same id follows.

Streaming: every function here reads headers and moves payloads in bounded chunks (default 1 MiB),
hashing (CRC-32, sha256) while copying, so a 1.5 GB BFB never sits in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAGIC = 0x13026642
MAJOR = 1
MINOR = 2  # what write_bfb emits; readers accept 0..MINOR
HEADER_LEN = 24
ALIGN = 8
CHUNK = 1 << 20

ID_BOOT_ARGS = 59
ID_IMAGE = 62  # the arm64 kernel (mlx-mkbfb option --image)
ID_INITRAMFS = 63  # the installer initramfs (--initramfs)

# id -> the mlx-mkbfb option name (the extracted file's stem). The ids are facts of the format.
IMAGE_NAMES: Mapping[int, str] = {
    36: "psc-bl", 37: "psc-fw", 31: "bl2r-cert", 30: "bl2r", 6: "bl2-cert", 1: "bl2", 29: "sys",
    38: "ddr-cert", 32: "ddr_ini", 33: "snps_images", 34: "ddr_ate_imem", 35: "ddr_ate_dmem",
    8: "bl30-key-cert", 12: "bl30-cert", 2: "bl30", 7: "trusted-key-cert", 9: "bl31-key-cert",
    13: "bl31-cert", 3: "bl31", 39: "psc-app", 10: "bl32-key-cert", 14: "bl32-cert", 4: "bl32",
    11: "bl33-key-cert", 15: "bl33-cert", 5: "bl33", 52: "capsule", 55: "boot-acpi", 56: "boot-dtb",
    57: "boot-desc", 58: "boot-path", 59: "boot-args", 60: "boot-timeout", 61: "uefi-tests",
    54: "ramdisk", 62: "image", 63: "initramfs",
}
IDS_BY_NAME: Mapping[str, int] = {v: k for k, v in IMAGE_NAMES.items()}
# mlx-mkbfb's emission order (its image table): write_bfb sorts by it so its output equals mlx-mkbfb's
_ORDER = (36, 37, 31, 30, 6, 1, 29, 38, 32, 33, 34, 35, 8, 12, 2, 7, 9, 13, 3, 39, 10, 14, 4, 11, 15, 5,
          52, 55, 56, 57, 58, 59, 60, 61, 54, 62, 63)
_RANK = {i: n for n, i in enumerate(_ORDER)}


class BfbError(ValueError):
    """Not a BFB, or a damaged one. The message is one line that says where and what."""


def padding(length: int) -> int:
    return -length % ALIGN


@dataclass(frozen=True, slots=True)
class Header:
    image_id: int
    length: int
    crc: int
    following: int = 0
    version: int = 0
    next_version: int = 0
    major: int = MAJOR
    minor: int = MINOR

    def pack(self) -> bytes:
        w0 = (MAGIC | (self.major & 0xF) << 32 | (self.minor & 0xF) << 36 | (self.next_version & 0xF) << 44
              | (self.version & 0xF) << 48 | (HEADER_LEN // 8) << 52 | (self.image_id & 0xFF) << 56)
        w1 = (self.length & 0xFFFFFFFF) | (self.crc & 0xFFFFFFFF) << 32
        return struct.pack("<QQQ", w0, w1, self.following & 0xFFFFFFFFFFFFFFFF)


def parse_header(raw: bytes, offset: int = 0) -> Header:
    """One 24-byte header; ``offset`` only names the place in error messages."""
    if len(raw) < HEADER_LEN:
        raise BfbError(f"truncated: {len(raw)} bytes at offset {offset}, an image header needs {HEADER_LEN}")
    w0, w1, w2 = struct.unpack("<QQQ", raw[:HEADER_LEN])
    magic, major, minor = w0 & 0xFFFFFFFF, (w0 >> 32) & 0xF, (w0 >> 36) & 0xF
    if magic != MAGIC:
        raise BfbError(f"no BFB image header at offset {offset} (magic 0x{magic:08x}, expected 0x{MAGIC:08x})")
    if major != MAJOR:
        raise BfbError(f"image header at offset {offset} has major version {major}; only {MAJOR} is known")
    if minor > MINOR:
        raise BfbError(f"image header at offset {offset} has minor version {minor}; at most {MINOR} is known")
    if (w0 >> 52) & 0xF != HEADER_LEN // 8:
        raise BfbError(f"image header at offset {offset} declares a header length of {((w0 >> 52) & 0xF) * 8}")
    versioned = minor <= 2  # mlx-mkbfb reads the version nibbles only for minor <= 2
    return Header(image_id=(w0 >> 56) & 0xFF, length=w1 & 0xFFFFFFFF, crc=(w1 >> 32) & 0xFFFFFFFF,
                  following=w2, version=(w0 >> 48) & 0xF if versioned else 0,
                  next_version=(w0 >> 44) & 0xF if versioned else 0, major=major, minor=minor)


@dataclass(frozen=True, slots=True)
class Entry:
    """One image of a stream: its header, where its payload starts, and the payload's sha256."""

    header: Header
    offset: int  # of the header
    sha256: str

    @property
    def payload_offset(self) -> int:
        return self.offset + HEADER_LEN

    @property
    def name(self) -> str:
        """``mlx-mkbfb -x``'s file name without the ``dump-`` prefix, e.g. ``image-v0``."""
        h = self.header
        base = IMAGE_NAMES.get(h.image_id, f"image_id_{h.image_id}")
        return f"{base}-v{h.version}" if h.minor >= 2 else base

    @property
    def description(self) -> str:
        return IMAGE_NAMES.get(self.header.image_id, f"unknown image id {self.header.image_id}")


@dataclass(frozen=True)
class Stream:
    entries: tuple[Entry, ...]
    size: int  # bytes read
    sha256: str  # of the whole stream

    def find(self, image_id: int, version: int | None = None) -> list[Entry]:
        return [e for e in self.entries
                if e.header.image_id == image_id and (version is None or e.header.version == version)]


def _read_exact(src: BinaryIO, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = src.read(n - len(out))
        if not b:
            break
        out += b
    return bytes(out)


def scan_stream(src: BinaryIO, *, sink: Callable[[Header], BinaryIO | None] | None = None,
                copy_to: BinaryIO | None = None, chunk: int = CHUNK) -> Stream:
    """Walk a whole stream: check every header and CRC, hash every payload and the stream.

    ``sink(header)`` may return a file to receive that image's payload (without padding); ``copy_to``
    receives every byte read (the BFB as delivered). Raises :class:`BfbError` on the first problem:
    an empty or foreign file, a bad header, a payload or padding cut short, a CRC mismatch, non-zero
    padding, or bytes after the last image that are not an image (``cat x.bfb bf.cfg`` makes those).
    """
    whole = hashlib.sha256()
    pos = 0
    entries: list[Entry] = []

    def take(n: int) -> bytes:
        nonlocal pos
        b = _read_exact(src, n)
        whole.update(b)
        if copy_to is not None:
            copy_to.write(b)
        pos += len(b)
        return b

    while True:
        at = pos
        raw = take(HEADER_LEN)
        if not raw:
            break
        if len(raw) < HEADER_LEN:
            if entries and raw[:4] != struct.pack("<I", MAGIC):
                raise BfbError(f"{len(raw)} bytes of non-BFB data after the last image (offset {at}); "
                               "a bf.cfg appended with cat? import the BFB as delivered")
            raise BfbError(f"truncated: {len(raw)} bytes at offset {at}, an image header needs {HEADER_LEN}")
        try:
            hdr = parse_header(raw, at)
        except BfbError as e:
            if entries and struct.unpack("<I", raw[:4])[0] != MAGIC:
                raise BfbError(f"non-BFB data after the last image (offset {at}); a bf.cfg appended with cat? "
                               "import the BFB as delivered") from None
            if not entries:
                raise BfbError(f"not a BFB: {e}") from None
            raise
        out = sink(hdr) if sink is not None else None
        crc = 0
        h = hashlib.sha256()
        left = hdr.length
        while left:
            b = take(min(chunk, left))
            if not b:
                raise BfbError(f"truncated: image {IMAGE_NAMES.get(hdr.image_id, hdr.image_id)} at offset {at} "
                               f"declares {hdr.length} bytes, the file ends {left} bytes short")
            left -= len(b)
            crc = zlib.crc32(b, crc)
            h.update(b)
            if out is not None:
                out.write(b)
        pad = take(padding(hdr.length))
        if len(pad) != padding(hdr.length):
            raise BfbError(f"truncated: padding of the image at offset {at} is cut short")
        if pad.strip(b"\0"):
            raise BfbError(f"image at offset {at}: padding bytes are not zero")
        crc = zlib.crc32(pad, crc)
        if crc != hdr.crc:
            raise BfbError(f"image {IMAGE_NAMES.get(hdr.image_id, hdr.image_id)} at offset {at}: CRC-32 "
                           f"0x{crc:08x} does not match its header's 0x{hdr.crc:08x} (corrupted)")
        entries.append(Entry(hdr, at, h.hexdigest()))
    if not entries:
        raise BfbError("not a BFB: the file is empty")
    return Stream(tuple(entries), pos, whole.hexdigest())


def list_images(path: str | Path) -> Stream:
    with Path(path).open("rb") as f:
        return scan_stream(f)


# ---------------------------------------------------------------- writing
@dataclass(frozen=True)
class Part:
    """One image to write: its id (or option name) and version, and the payload (bytes or a file)."""

    image: int | str
    data: bytes | Path
    version: int = 0

    @property
    def image_id(self) -> int:
        if isinstance(self.image, int):
            return self.image
        try:
            return IDS_BY_NAME[self.image]
        except KeyError:
            raise BfbError(f"unknown image name {self.image!r}") from None


def _chunks(data: bytes | Path, chunk: int) -> Iterable[bytes]:
    if isinstance(data, bytes):
        yield data
        return
    with data.open("rb") as f:
        while b := f.read(chunk):
            yield b


def _size(data: bytes | Path) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


def write_bfb(out: BinaryIO, parts: Iterable[Part], *, chunk: int = CHUNK, keep_order: bool = False) -> int:
    """Write a boot stream the way ``mlx-mkbfb`` does (its table's order unless ``keep_order``, like
    ``-e``; versions ascending within an id; the ``following_images`` bitmap and next-version nibble
    as it computes them). File payloads are read twice in chunks (CRC, then copy), never held whole.
    Returns the bytes written."""
    ps = list(parts)
    for p in ps:
        if not 0 <= p.image_id <= 63 or not 0 <= p.version <= 15:
            raise BfbError(f"image id {p.image_id} / version {p.version} out of range")
        if _size(p.data) > 0xFFFFFFFF:
            raise BfbError(f"image {p.image} is larger than the format's 4 GiB limit")
    seen = {(p.image_id, p.version) for p in ps}
    if len(seen) != len(ps):
        raise BfbError("two parts with the same image id and version")
    if keep_order:
        first: dict[int, int] = {}
        for n, p in enumerate(ps):
            first.setdefault(p.image_id, n)
        ps.sort(key=lambda p: (first[p.image_id], p.version))
    else:
        ps.sort(key=lambda p: (_RANK.get(p.image_id, 100 + p.image_id), p.version))
    remaining = 0
    for p in ps:
        remaining |= 1 << p.image_id
    written = 0
    for n, p in enumerate(ps):
        nxt = ps[n + 1] if n + 1 < len(ps) else None
        same_next = nxt is not None and nxt.image_id == p.image_id
        if not same_next:
            remaining &= ~(1 << p.image_id)
        length = _size(p.data)
        crc = 0
        for b in _chunks(p.data, chunk):
            crc = zlib.crc32(b, crc)
        crc = zlib.crc32(b"\0" * padding(length), crc)
        hdr = Header(p.image_id, length, crc, remaining, p.version, nxt.version if same_next and nxt else 0)
        out.write(hdr.pack())
        got = 0
        for b in _chunks(p.data, chunk):
            out.write(b)
            got += len(b)
        if got != length:
            raise BfbError(f"image {p.image} changed size while being written")
        out.write(b"\0" * padding(length))
        written += HEADER_LEN + length + padding(length)
    return written


# ---------------------------------------------------------------- import (files on disk)
@dataclass(frozen=True)
class Extracted:
    directory: Path
    bfb: Path | None  # the whole stream as delivered (None: left in place, see ``copy``)
    kernel: Path
    initrd: Path
    stream: Stream
    kernel_entry: Entry
    initrd_entry: Entry
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256


def _pick(entries: list[Entry], what: str, version: int | None) -> Entry:
    if not entries:
        raise BfbError(f"the BFB has no {what} image")
    if version is not None:
        got = [e for e in entries if e.header.version == version]
        if not got:
            have = ", ".join(str(e.header.version) for e in entries)
            raise BfbError(f"the BFB has no {what} image of version {version} (it has {have})")
        return got[0]
    if len(entries) == 1:
        return entries[0]
    v0 = [e for e in entries if e.header.version == 0]
    if v0:
        return v0[0]
    have = ", ".join(str(e.header.version) for e in entries)
    raise BfbError(f"the BFB has {what} images of versions {have}; choose one with --image-version")


def import_stream(src_path: str | Path, dest: str | Path, *, bfb_name: str = "image.bfb", copy: bool = True,
                  version: int | None = None, chunk: int = CHUNK) -> Extracted:
    """Read ``src_path`` once: copy it (``copy``) to ``dest/bfb_name``, extract the kernel and the
    installer initramfs to ``dest/dump-image-v<n>`` and ``dest/dump-initramfs-v<n>`` (the names
    ``mlx-mkbfb -x`` gives them), hashing everything on the way.

    ``dest`` must not exist; the work happens in a sibling temporary directory renamed into place at
    the end, so on any error (:class:`BfbError`, ``OSError``) nothing is left behind."""
    src, final = Path(src_path), Path(dest)
    if final.exists():
        raise BfbError(f"{final} already exists")
    tmp = final.with_name(f".{final.name}.import-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        open_files: dict[tuple[int, int], tuple[BinaryIO, Path]] = {}

        def sink(h: Header) -> BinaryIO | None:
            if h.image_id not in (ID_IMAGE, ID_INITRAMFS) or (h.image_id, h.version) in open_files:
                return None
            p = tmp / ("dump-" + Entry(h, 0, "").name)
            f = p.open("wb")
            open_files[(h.image_id, h.version)] = (f, p)
            return f

        try:
            with src.open("rb") as f, contextlib.ExitStack() as stack:
                cp = stack.enter_context((tmp / bfb_name).open("wb")) if copy else None
                stream = scan_stream(f, sink=sink, copy_to=cp, chunk=chunk)
        finally:
            for fo, _p in open_files.values():
                fo.close()
        k = _pick(stream.find(ID_IMAGE), "kernel (image, id 62)", version)
        i = _pick(stream.find(ID_INITRAMFS), "installer initramfs (initramfs, id 63)", version)
        chosen = {(e.header.image_id, e.header.version) for e in (k, i)}
        for key, (_fo, p) in open_files.items():  # versions of the kernel/initramfs not chosen
            if key not in chosen:
                p.unlink()
        os.rename(tmp, final)  # fails (nothing replaced) if someone created ``final`` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kn, inn = "dump-" + k.name, "dump-" + i.name
    sums = {kn: k.sha256, inn: i.sha256}
    if copy:
        sums[bfb_name] = stream.sha256
    return Extracted(final, final / bfb_name if copy else None, final / kn, final / inn, stream, k, i, sums)
