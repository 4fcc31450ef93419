"""TFTP wire format and option negotiation, without I/O: what a request says and what we answer.

Owns: parsing a request (RFC 1350 §5 RRQ/WRQ, RFC 2347 option list), ERROR/OACK/DATA packets, the
option negotiation of a read (RFC 2347 OACK, RFC 2348 ``blksize``, RFC 2349 ``timeout``/``tsize``,
RFC 7440 ``windowsize``) and the ``netascii`` translation (RFC 1350 §5 via RFC 764). The mapping of
every requirement to code and test is docs/conformance.md (TFTP).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
# RFC 1350 appendix "Error Codes"; 8 is RFC 2347's option refusal
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL, ERR_UNKNOWN_TID, ERR_OPTION = 0, 1, 2, 4, 5, 8
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348 §2: "between 8 and 65464 octets, inclusive"
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349 §2: seconds, "between 1 and 255 seconds, inclusive"
MAX_WINDOWSIZE = 65535  # RFC 7440 §3: "between 1 and 65535 blocks, inclusive"
MAX_REQUEST = 512  # RFC 2347 §2: a request with its options must fit 512 octets
MAX_NAME = 255
MODES = ("octet", "netascii")  # RFC 1350 §5; "mail" is refused (RFC 1350 calls it obsolescent)
BUSY = "server busy"  # ERROR 0 text under load (RFC 1350 code 0: "see error message")

_HEAD = struct.Struct("!HH")


class Refused(Exception):
    """A request we answer with an ERROR packet (code, message); ``reason`` labels the refusal in
    ``bootsvc_tftp_refused_total`` (default: from the code)."""

    def __init__(self, code: int, msg: str, reason: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.reason = code, msg, reason


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed RRQ/WRQ: option names lower-cased (RFC 2347 §2: case-insensitive), in request order,
    the first of a duplicated name kept."""

    op: int
    filename: str
    mode: str
    options: tuple[tuple[str, str], ...] = ()


def parse_request(buf: bytes) -> Request:
    """An RRQ or WRQ, or :class:`Refused` (ERROR 4 for framing, ERROR 2 for an unservable name)."""
    if len(buf) < 4 or len(buf) > MAX_REQUEST:
        raise Refused(ERR_ILLEGAL, "Illegal TFTP operation")
    (op,) = struct.unpack_from("!H", buf)
    if op not in (OP_RRQ, OP_WRQ):
        raise Refused(ERR_ILLEGAL, "Illegal TFTP operation")
    fields = buf[2:].split(b"\0")
    # filename NUL mode NUL [name NUL value NUL]*: the split ends with the empty tail after the last NUL
    if len(fields) < 3 or fields[-1] != b"" or len(fields) % 2 == 0:
        raise Refused(ERR_ILLEGAL, "Illegal TFTP operation")
    raw_name, raw_mode, rest = fields[0], fields[1], fields[2:-1]
    if not raw_name or len(raw_name) > MAX_NAME or any(c < 0x21 or c > 0x7E for c in raw_name):
        raise Refused(ERR_ACCESS, "Access violation")  # 8-bit/odd encodings, control bytes, spaces
    mode = raw_mode.decode("latin-1").lower()
    if mode not in MODES:
        raise Refused(ERR_ILLEGAL, f"Unsupported mode {_ascii(mode)!r}: use octet or netascii")
    opts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(0, len(rest), 2):
        name = rest[i].decode("latin-1").lower()
        if not name:
            raise Refused(ERR_ILLEGAL, "Illegal TFTP operation")
        if name not in seen:
            seen.add(name)
            opts.append((name, rest[i + 1].decode("latin-1")))
    return Request(op, raw_name.decode("ascii"), mode, tuple(opts))


def _ascii(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text[:32])


def _number(text: str) -> int | None:
    """A decimal option value (RFC 2347 §2: ASCII digits), or None; at most 20 digits (tsize)."""
    if not text or len(text) > 20 or not text.isascii() or not text.isdigit():
        return None
    return int(text)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What a read transfer runs with, and the OACK to send (None: no option accepted -> DATA 1)."""

    blksize: int = 512
    timeout: float | None = None  # seconds the client asked for (RFC 2349), else the server's
    windowsize: int = 1
    oack: bytes | None = None


def negotiate(options: tuple[tuple[str, str], ...], size: int, *, max_windowsize: int = 64) -> Negotiated:
    """The server's answer to a read request's options.

    RFC 2347 §2: the OACK acknowledges only options the client sent and the server accepts, and an
    option the server does not know is ignored; with nothing accepted the transfer starts with DATA 1
    (RFC 1350). Values out of their RFC's range make that option ignored (not the request refused):
    ``blksize`` below 8 (RFC 2348 only lets the server answer *less or equal*, never more), ``timeout``
    outside 1..255, ``windowsize`` outside 1..65535. A ``blksize`` above 65464 and a ``windowsize``
    above ``max_windowsize`` are answered with the smaller value (RFC 2348 §2, RFC 7440 §3).
    ``tsize`` in a read request is answered with the size to be sent (RFC 2349 §3)."""
    blksize, timeout, window = 512, None, 1
    acked: list[tuple[str, str]] = []
    for name, value in options:
        n = _number(value)
        if name == "blksize":
            if n is not None and n >= MIN_BLKSIZE:
                blksize = min(n, MAX_BLKSIZE)
                acked.append((name, str(blksize)))
        elif name == "tsize":
            if n is not None:
                acked.append((name, str(size)))
        elif name == "timeout":
            if n is not None and MIN_TIMEOUT <= n <= MAX_TIMEOUT:
                timeout = float(n)
                acked.append((name, str(n)))
        elif name == "windowsize" and n is not None and 1 <= n <= MAX_WINDOWSIZE:
            window = min(n, max_windowsize)
            acked.append((name, str(window)))
    oack = oack_packet(acked) if acked else None
    return Negotiated(blksize, timeout, window, oack)


def oack_packet(options: list[tuple[str, str]]) -> bytes:
    return struct.pack("!H", OP_OACK) + b"".join(f"{k}\0{v}\0".encode("ascii") for k, v in options)


def error_packet(code: int, msg: str) -> bytes:
    return _HEAD.pack(OP_ERROR, code) + msg.encode("ascii", "replace") + b"\0"


def data_packet(block: int, payload: bytes) -> bytes:
    return _HEAD.pack(OP_DATA, block & 0xFFFF) + payload


def netascii(data: bytes) -> bytes:
    """RFC 1350 §5 / RFC 764: end of line as CR LF, and a CR not followed by LF sent as CR NUL.
    Every CR becomes CR NUL first, so a file's own CR LF reaches the client as CR NUL CR LF and the
    client's reverse translation gives back the bytes on disk (what tftpd-hpa does)."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
