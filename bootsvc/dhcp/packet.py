"""BOOTP/DHCPv4 wire codec: bytes <-> :class:`Packet`, plus option helpers.

Owns: the fixed BOOTP header (RFC 951/2131 §2), the options area with RFC 3396 long-option
concatenation and option overload (option 52, RFC 2132 §9.3), encapsulated sub-options (43, 82, 175),
and the typed accessors the rest of bootsvc (and a relay) need. Pure: no sockets, no logging.

Design notes
* Speed matters (one parse + one encode per received packet): ``struct`` for the header, one Python
  loop over the options, addresses kept as 4 raw bytes. scapy is ~100x slower; tests use it only as an
  independent oracle.
* ``parse`` raises only :class:`ParseError` (whose ``reason`` is a short counter label) for any input.
  Typed accessors (``requested_ip`` ...) raise ``ParseError`` too when an option is malformed, so a
  server can wrap the whole pipeline in one ``except ParseError``.
* Repeated instances of one option code are concatenated (RFC 3396 §5), in the order: options field,
  then ``file``, then ``sname`` (RFC 3396 §7). ``encode`` splits values longer than 255 bytes into
  consecutive instances and, only when the options do not fit into ``max_size``, overloads ``file``
  and then ``sname`` (RFC 2131 §4.1 allows it; many PXE ROMs dislike it, hence only as a last resort).
  ``encode_fit`` then drops options from the end (replies are in parameter-request-list order, so the
  least wanted go first), never the ones a reply must carry, and never returns more than the limit.
* Option 57 (RFC 2132 §9.10) is "the maximum length DHCP message" the client accepts, minimum 576:
  the IP datagram, as ISC dhcpd and dnsmasq read it (they subtract the 28 bytes of IP and UDP
  headers). Without it, RFC 2131 §2 guarantees only 576-byte datagrams (a 312-byte options field).
  ``Packet.max_size`` is the resulting limit on the DHCP message (UDP payload) itself.

One module (~660 lines) on purpose: parse and encode are the two halves of one wire format and are
tested as round trips; the RFC 3396 concatenation, the option-overload areas and the sub-option
encodings are each used by both halves, and the encode fast path (a pre-encoded ``OptionBlock``)
must agree byte for byte with the per-option fallback next to it. Split apart, each half would need
the other's private layout.
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from ipaddress import IPv4Address
from itertools import islice

__all__ = [
    "BOOTREPLY",
    "BOOTREQUEST",
    "MAGIC",
    "EncodeError",
    "MessageType",
    "Opt",
    "OptionBlock",
    "Packet",
    "ParseError",
    "RelayInfo",
    "encode_suboptions",
    "ip_bytes",
    "ip_str",
    "mac_str",
    "parse",
    "parse_suboptions",
]

MAGIC = b"c\x82Sc"  # 99.130.83.99 (RFC 2131 §3)
BOOTREQUEST = 1
BOOTREPLY = 2
ZERO_IP = b"\x00\x00\x00\x00"
BROADCAST_FLAG = 0x8000
MIN_BOOTP_SIZE = 300  # RFC 951 vendor area of 64 bytes; some PXE ROMs drop shorter frames
DEFAULT_MAX_SIZE = 576  # RFC 2131 §2: a client must accept 576-byte IP datagrams
IP_UDP_HEADERS = 28  # IPv4 (20, no options) + UDP (8): option 57 counts them (RFC 2132 §9.10)
MTU = 1500  # Ethernet: a larger option 57 cannot be honoured without fragmenting
MAX_PACKET = 4096  # anything larger is hostile on an Ethernet segment; refuse before parsing
HEADER_SIZE = 240  # fixed header (236) + magic cookie

_HDR = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")  # exactly 240 bytes
_BYTE = [bytes((i,)) for i in range(256)]
_SNAME0 = bytes(64)
_FILE0 = bytes(128)
_TL = struct.Struct("BB").pack


class MessageType(IntEnum):
    """Option 53 values (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(IntEnum):
    """Option codes this codebase handles by name."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS = 6
    HOSTNAME = 12
    DOMAIN = 15
    BROADCAST = 28
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MSG_TYPE = 53
    SERVER_ID = 54
    PARAM_LIST = 55
    MESSAGE = 56
    MAX_SIZE = 57
    T1 = 58
    T2 = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER = 66
    BOOTFILE = 67
    USER_CLASS = 77
    RELAY_AGENT = 82
    CLIENT_ARCH = 93
    CLIENT_NDI = 94
    CLIENT_UUID = 97
    IPXE = 175
    VSS = 221
    END = 255


# Option 82 sub-options (RFC 3046, 3527, 5107, 6607)
SUB_CIRCUIT_ID = 1
SUB_REMOTE_ID = 2
SUB_LINK_SELECTION = 5
SUB_SERVER_ID_OVERRIDE = 11
SUB_VSS = 151
SUB_VSS_CONTROL = 152


class ParseError(ValueError):
    """Input that is not a usable BOOTP/DHCP message. ``reason`` is a stable counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class EncodeError(ValueError):
    """A reply that cannot be encoded within the size limit even with option overload."""


def ip_bytes(addr: IPv4Address | str | int | bytes) -> bytes:
    """Any address form -> 4 network-order bytes."""
    if isinstance(addr, bytes):
        if len(addr) != 4:
            raise ValueError("IPv4 address must be 4 bytes")
        return addr
    if isinstance(addr, int):
        return addr.to_bytes(4, "big")
    return IPv4Address(addr).packed


def ip_str(b: bytes) -> str:
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


def mac_str(b: bytes) -> str:
    return b.hex(":")


def _parse_area(buf: bytes, i: int, opts: dict[int, bytes], where: str) -> None:
    """Walk one options area to the end of ``buf``. Pad (0) is skipped, End (255) stops, anything
    else is TLV; repeated codes are concatenated (RFC 3396)."""
    end = len(buf)
    try:
        while i < end:
            code = buf[i]
            if code == 0:
                i += 1
                continue
            if code == 255:
                return
            j = i + 2 + buf[i + 1]
            if j > end:
                raise ParseError("truncated_option", f"option {code} runs past the {where} area")
            if code in opts:
                opts[code] += buf[i + 2 : j]
            else:
                opts[code] = buf[i + 2 : j]
            i = j
    except IndexError:
        raise ParseError("truncated_option", f"option at the end of the {where} area has no length") from None


def parse_suboptions(data: bytes, *, pad_end: bool = False) -> list[tuple[int, bytes]]:
    """Encapsulated TLVs (82, 43, 175). ``pad_end``: treat 0 as pad and 255 as end (43/175 style;
    option 82 sub-options have no pad/end, RFC 3046 §2.0). Raises ParseError on truncation."""
    out: list[tuple[int, bytes]] = []
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if pad_end:
            if code == 0:
                i += 1
                continue
            if code == 255:
                break
        if i + 1 >= n:
            raise ParseError("bad_suboption", f"sub-option {code} has no length")
        j = i + 2 + data[i + 1]
        if j > n:
            raise ParseError("bad_suboption", f"sub-option {code} truncated")
        out.append((code, data[i + 2 : j]))
        i = j
    return out


def encode_suboptions(items: Iterable[tuple[int, bytes]], *, end: bool = False) -> bytes:
    out = bytearray()
    for code, value in items:
        if len(value) > 255:
            raise EncodeError(f"sub-option {code} longer than 255 bytes")
        out.append(code)
        out.append(len(value))
        out += value
    if end:
        out.append(255)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """Decoded option 82 (RFC 3046) with the sub-options bootsvc acts on."""

    raw: bytes
    suboptions: tuple[tuple[int, bytes], ...]
    circuit_id: bytes | None = None
    remote_id: bytes | None = None
    link_selection: bytes | None = None  # RFC 3527: subnet to allocate from (4 bytes)
    server_id_override: bytes | None = None  # RFC 5107: put into option 54 (4 bytes)
    vss: bytes | None = None  # RFC 6607 sub-option 151: type byte + info
    vss_control: bool = False  # RFC 6607 sub-option 152 present

    @classmethod
    def decode(cls, raw: bytes) -> RelayInfo:
        if len(raw) > 255:
            # RFC 3046 §2.0: a relay adds one option 82 of at most 255 bytes; more is an attack on
            # the reply size (the server echoes it) or on the parser
            raise ParseError("bad_option82", f"{len(raw)} bytes")
        subs = parse_suboptions(raw)
        d: dict[int, bytes] = {}
        for code, value in subs:
            d.setdefault(code, value)  # first instance wins (duplicates are not meaningful here)
        ls = d.get(SUB_LINK_SELECTION)
        so = d.get(SUB_SERVER_ID_OVERRIDE)
        if ls is not None and len(ls) != 4:
            raise ParseError("bad_option82", "link-selection must be 4 bytes")
        if so is not None and len(so) != 4:
            raise ParseError("bad_option82", "server-id-override must be 4 bytes")
        vss = d.get(SUB_VSS)
        if vss is not None and len(vss) < 1:
            raise ParseError("bad_option82", "empty VSS sub-option")
        return cls(
            raw=raw,
            suboptions=tuple(subs),
            circuit_id=d.get(SUB_CIRCUIT_ID),
            remote_id=d.get(SUB_REMOTE_ID),
            link_selection=ls,
            server_id_override=so,
            vss=vss,
            vss_control=SUB_VSS_CONTROL in d,
        )

    def echo(self) -> bytes:
        """What the server returns in its reply: the whole option, minus VSS-Control (152) — a
        server that understood VSS removes it (RFC 6607 §3.3); the relay drops replies that still
        carry it."""
        if not self.vss_control:
            return self.raw
        return encode_suboptions((c, v) for c, v in self.suboptions if c != SUB_VSS_CONTROL)


def vss_vrf(vss: bytes) -> str | None:
    """RFC 6607 VSS payload -> VRF name. Type 0 = NVT-ASCII VPN name, 255 = global/default VPN
    (``""``). Type 1 (RFC 2685 VPN-ID) is returned as ``vpnid:<hex>`` so config can still name it;
    unknown types -> None (the caller must drop: never fall back to the global pool)."""
    t, info = vss[0], vss[1:]
    if t == 0:
        try:
            return info.decode("ascii")
        except UnicodeDecodeError:
            return None
    if t == 255:
        return ""
    if t == 1 and len(info) == 7:
        return "vpnid:" + info.hex()
    return None


class OptionBlock:
    """Options many replies share (server id, lease times, the network's 1/3/6/15/28), encoded once.

    ``Packet.add_block`` puts them into ``options`` like any other options (readers see no
    difference) and remembers the block, so ``encode`` can copy ``wire`` instead of packing each
    option again. ``encode`` uses ``wire`` only after checking, in C, that the packet still starts
    with exactly 53 + these options with these values; any later change to them falls back to the
    ordinary per-option encoding, so a stale block can never be sent.
    """

    __slots__ = ("keys", "n", "options", "wire")

    def __init__(self, options: dict[int, bytes]) -> None:
        if 53 in options or 52 in options or 0 in options or 255 in options:
            raise ValueError("53/52/pad/end cannot be part of an option block")
        self.options = dict(options)
        self.keys = [53, *self.options]  # the packet's leading keys while the block is valid
        self.n = len(self.keys)
        self.wire = b"".join(  # RFC 3396 §5 split, like Packet.encode
            _TL(c, len(v[k : k + 255])) + v[k : k + 255]
            for c, v in self.options.items() for k in range(0, max(len(v), 1), 255))


@dataclass(slots=True, eq=True)
class Packet:
    """A BOOTP/DHCP message. Addresses are 4 raw bytes; ``options`` maps code -> concatenated value
    and keeps insertion order (encode writes option 53 first, then this order)."""

    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: bytes = ZERO_IP
    yiaddr: bytes = ZERO_IP
    siaddr: bytes = ZERO_IP
    giaddr: bytes = ZERO_IP
    chaddr: bytes = bytes(16)
    sname: bytes = bytes(64)
    file: bytes = bytes(128)
    options: dict[int, bytes] = field(default_factory=dict)
    is_dhcp: bool = True  # False: plain BOOTP (no magic cookie)
    _mac: str | None = field(default=None, compare=False, repr=False)  # cache of ``mac``
    _block: OptionBlock | None = field(default=None, compare=False, repr=False)  # see add_block

    def add_block(self, block: OptionBlock) -> None:
        """Add a pre-encoded block of options. Right after ``reply()`` (options = {53}), ``encode``
        copies the block's bytes; otherwise the options are simply added."""
        opts = self.options
        fresh = len(opts) == 1 and 53 in opts
        opts.update(block.options)
        self._block = block if fresh else None

    # ---- option helpers -------------------------------------------------------------------
    def get(self, code: int) -> bytes | None:
        return self.options.get(code)

    def set(self, code: int, value: bytes | str | int) -> None:
        """Set an option. ``str`` is encoded ASCII; ``int`` is one byte (use bytes for others)."""
        if isinstance(value, str):
            value = value.encode("ascii")
        elif isinstance(value, int):
            value = bytes((value,))
        if code in (0, 255):
            raise ValueError("pad/end are not options")
        self.options[code] = value

    def delete(self, code: int) -> None:
        self.options.pop(code, None)

    def get_ip(self, code: int) -> bytes | None:
        v = self.options.get(code)
        if v is None:
            return None
        if len(v) != 4:
            raise ParseError("bad_option", f"option {code} must be 4 bytes, got {len(v)}")
        return v

    def get_u32(self, code: int) -> int | None:
        v = self.options.get(code)
        if v is None:
            return None
        if len(v) != 4:
            raise ParseError("bad_option", f"option {code} must be 4 bytes")
        return int.from_bytes(v, "big")

    # ---- typed views ------------------------------------------------------------------------
    @property
    def msg_type(self) -> int | None:
        v = self.options.get(53)
        if v is None or len(v) != 1:
            return None
        return v[0]

    @property
    def mac(self) -> str:
        m = self._mac
        if m is None:
            m = self._mac = self.chaddr[: self.hlen].hex(":")
        return m

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    @property
    def requested_ip(self) -> bytes | None:
        return self.get_ip(50)

    @property
    def server_id(self) -> bytes | None:
        return self.get_ip(54)

    @property
    def client_id(self) -> bytes | None:
        return self.options.get(61)

    @property
    def max_size(self) -> int:
        """Largest DHCP message (UDP payload) the client accepts: option 57 counts the IP and UDP
        headers and is never below 576 (RFC 2132 §9.10); capped at the Ethernet MTU."""
        v = self.options.get(57)
        if v is None or len(v) != 2:
            return DEFAULT_MAX_SIZE - IP_UDP_HEADERS
        return max(DEFAULT_MAX_SIZE, min(int.from_bytes(v, "big"), MTU)) - IP_UDP_HEADERS

    @property
    def param_list(self) -> bytes:
        return self.options.get(55, b"")

    @property
    def vendor_class(self) -> str:
        v = self.options.get(60)
        return v.decode("latin-1") if v else ""

    @property
    def arch(self) -> int | None:
        """First client architecture of option 93 (RFC 4578 §2.1; IANA: 0 BIOS, 7 x64 UEFI, 11 ARM64
        UEFI, 16/19 HTTP variants). The option may carry a list; firmware sends one."""
        v = self.options.get(93)
        if v is None or len(v) < 2:
            return None
        return (v[0] << 8) | v[1]

    @property
    def user_classes(self) -> tuple[bytes, ...]:
        """Option 77. iPXE sends the bare string ``iPXE``; RFC 3004 clients send length-prefixed
        items. Both readings are returned when the bytes allow the RFC 3004 one."""
        v = self.options.get(77)
        if not v:
            return ()
        items: list[bytes] = [v]
        i, n = 0, len(v)
        parsed: list[bytes] = []
        while i < n:
            ln = v[i]
            if ln == 0 or i + 1 + ln > n:
                parsed = []
                break
            parsed.append(v[i + 1 : i + 1 + ln])
            i += 1 + ln
        items.extend(parsed)
        return tuple(items)

    @property
    def uuid(self) -> bytes | None:
        v = self.options.get(97)
        if v is None or len(v) != 17 or v[0] != 0:
            return None
        return v[1:]

    def relay_info(self) -> RelayInfo | None:
        raw = self.options.get(82)
        return None if raw is None else RelayInfo.decode(raw)

    # ---- encoding ---------------------------------------------------------------------------
    def encode(self, *, min_size: int = MIN_BOOTP_SIZE, max_size: int | None = None) -> bytes:
        """Wire bytes. Padded to ``min_size`` (BOOTP minimum 300). With ``max_size`` the options
        that do not fit spill into ``file`` then ``sname`` (option 52) if those are empty."""
        opts = self.options
        tl = _TL
        hdr = _HDR.pack(
            self.op, self.htype, self.hlen, self.hops, self.xid, self.secs, self.flags,
            self.ciaddr, self.yiaddr, self.siaddr, self.giaddr, self.chaddr, self.sname, self.file, MAGIC,
        )
        blk = self._block
        if (blk is not None and 52 not in opts and list(islice(opts, blk.n)) == blk.keys
                and blk.options.items() <= opts.items()):
            # 53, then the block exactly as it was added (checked above): copy its bytes
            m53 = opts[53]
            try:
                out = b"".join([hdr, tl(53, len(m53)), m53, blk.wire,
                                *[tl(c, len(v)) + v for c, v in islice(opts.items(), blk.n, None)],
                                b"\xff"])
            except struct.error:
                pass
            else:
                n = len(out)
                if max_size is not None and n > max_size:
                    return self._encode_overloaded(max_size, min_size)
                return out if n >= min_size else out + bytes(min_size - n)
        if opts and 52 not in opts and next(iter(opts)) == 53:
            # fast path (every reply decide builds): 53 first, no stale 52, no value over 255 bytes
            # (struct "B" refuses a longer length: then the RFC 3396 path below splits it)
            try:
                out = b"".join([hdr, *[tl(c, len(v)) + v for c, v in opts.items()], b"\xff"])
            except struct.error:
                pass
            else:
                n = len(out)
                if max_size is not None and n > max_size:
                    return self._encode_overloaded(max_size, min_size)
                return out if n >= min_size else out + bytes(min_size - n)
        parts: list[bytes] = [hdr]
        app = parts.append
        mt = opts.get(53)
        if mt is not None:  # option 53 first (some clients expect it there)
            app(tl(53, len(mt)))
            app(mt)
        for code, v in opts.items():
            ln = len(v)
            if ln < 256 and code != 53 and code != 52:  # 52 is an encoding detail: never copied
                app(tl(code, ln))
                app(v)
            elif ln > 255:
                # RFC 3396 §5: split into consecutive instances of at most 255 bytes
                for k in range(0, ln, 255):
                    chunk = v[k : k + 255]
                    app(tl(code, len(chunk)))
                    app(chunk)
        app(b"\xff")
        out = b"".join(parts)
        n = len(out)
        if max_size is not None and n > max_size:
            return self._encode_overloaded(max_size, min_size)
        return out if n >= min_size else out + bytes(min_size - n)

    def encode_fit(self, max_size: int, keep: Container[int], prl: bytes = b"") -> tuple[bytes, list[int]]:
        """Encode within ``max_size`` bytes: plain, else with option overload (``encode``), else
        without options, one at a time: first those the client did not request (from the end),
        then the relay agent information (RFC 3046 §2.2: a server that cannot copy all of it SHALL
        send the reply without it), then requested ones from the end of the parameter request list
        order; never those in ``keep``. Returns the bytes and the dropped option codes; raises
        EncodeError only if even the ``keep`` options do not fit."""
        try:
            return self.encode(max_size=max_size), []
        except EncodeError:
            pass
        opts = dict(self.options)
        codes = [c for c in reversed(list(opts)) if c not in keep and c != 53]
        order = ([c for c in codes if c not in prl and c != 82] + [c for c in codes if c == 82]
                 + [c for c in codes if c in prl and c != 82])
        dropped: list[int] = []
        for code in order:
            del opts[code]
            dropped.append(code)
            try:
                return replace(self, options=dict(opts), _block=None).encode(max_size=max_size), dropped
            except EncodeError:
                continue
        raise EncodeError("the options a reply must carry do not fit")

    def _encode_overloaded(self, max_size: int, min_size: int) -> bytes:
        items: list[tuple[int, bytes]] = []
        for code, v in self.options.items():
            if code in (52, 53):
                continue
            for k in range(0, max(len(v), 1), 255):
                chunk = v[k : k + 255]
                items.append((code, bytes((code, len(chunk))) + chunk))
        mt = self.options.get(53)
        head = _TL(53, len(mt)) + mt if mt is not None else b""
        room = max_size - HEADER_SIZE - len(head) - 3 - 1  # 3 = option 52 itself, 1 = end
        limits = [room, 127, 63]  # file/sname keep one byte for End
        usable = [True, not self.file.strip(b"\x00"), not self.sname.strip(b"\x00")]
        where = _pack_areas(items, limits, usable, _OPTIONS_FIELD_ONLY)
        if where is None:
            raise EncodeError("options do not fit even with option overload")
        areas: list[bytearray] = [bytearray(), bytearray(), bytearray()]  # options, file, sname
        for (_code, it), a in zip(items, where, strict=True):
            areas[a] += it  # each area keeps the reply's order
        overload = (1 if areas[1] else 0) | (2 if areas[2] else 0)
        file = bytes(areas[1] + b"\xff").ljust(128, b"\x00") if areas[1] else self.file
        sname = bytes(areas[2] + b"\xff").ljust(64, b"\x00") if areas[2] else self.sname
        body = head + (bytes((52, 1, overload)) if overload else b"") + bytes(areas[0]) + b"\xff"
        hdr = _HDR.pack(
            self.op, self.htype, self.hlen, self.hops, self.xid, self.secs, self.flags,
            self.ciaddr, self.yiaddr, self.siaddr, self.giaddr, self.chaddr, sname, file, MAGIC,
        )
        out = hdr + body
        if len(out) < min_size:
            out += bytes(min_size - len(out))
        return out

    def reply(self, msg_type: int) -> Packet:
        """A reply skeleton: copies xid, flags, giaddr, chaddr, htype/hlen (RFC 2131 §4.3.1 Table 3);
        hops 0, secs 0, options only 53."""
        return Packet(BOOTREPLY, self.htype, self.hlen, 0, self.xid, 0, self.flags, ZERO_IP, ZERO_IP,
                      ZERO_IP, self.giaddr, self.chaddr, _SNAME0, _FILE0, {53: _BYTE[msg_type]})


# RFC 3046 §2.2: "Servers SHALL NOT place the echoed Relay Agent Information option in the
# overloaded sname or file fields."
_OPTIONS_FIELD_ONLY = frozenset({82})


def _pack_areas(items: list[tuple[int, bytes]], limits: list[int], usable: list[bool],
                pinned: Container[int] = ()) -> list[int] | None:
    """Which area (0 options, 1 file, 2 sname) each encoded option goes to, or None. First fit in
    the reply's order (requested options stay in the options field); if that fails, first fit by
    decreasing size (a 255-byte option no longer needs room that small ones took first). The pieces
    of one split option must stay in RFC 3396 §7 order (options, then file, then sname); ``pinned``
    codes only go into the options field."""
    def fit(order: list[int]) -> list[int] | None:
        used = [0, 0, 0]
        where = [0] * len(items)
        for i in order:
            n = len(items[i][1])
            a = 0
            while a < 3 and (not usable[a] or used[a] + n > limits[a] or (a > 0 and items[i][0] in pinned)):
                a += 1
            if a == 3:
                return None
            used[a] += n
            where[i] = a
        last: dict[int, int] = {}
        for (code, _it), a in zip(items, where, strict=True):
            if a < last.get(code, 0):
                return None
            last[code] = a
        return where

    idx = list(range(len(items)))
    return fit(idx) or fit(sorted(idx, key=lambda i: -len(items[i][1])))


def parse(data: bytes) -> Packet:
    """Bytes -> Packet. Raises :class:`ParseError` (and nothing else) for any malformed input."""
    n = len(data)
    if n < 236:
        raise ParseError("short", f"{n} bytes")
    if n > MAX_PACKET:
        raise ParseError("oversize", f"{n} bytes")
    if n < HEADER_SIZE:
        data = data + bytes(HEADER_SIZE - n)
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file, magic) = (
        _HDR.unpack_from(data)
    )
    if hlen > 16:
        raise ParseError("bad_hlen", f"hlen {hlen}")
    if magic != MAGIC:
        # Plain BOOTP (RFC 951) or garbage: a header without options. The server drops it.
        return Packet(op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file,
                      {}, False)
    opts: dict[int, bytes] = {}
    _parse_area(data, HEADER_SIZE, opts, "options")
    ov = opts.get(52)
    if ov is not None:
        if len(ov) != 1 or ov[0] not in (1, 2, 3):
            raise ParseError("bad_overload", f"option 52 value {ov.hex()}")
        # RFC 3396 §7 order: options field, then file, then sname
        if ov[0] & 1:
            _parse_area(file, 0, opts, "file")
            file = bytes(128)
        if ov[0] & 2:
            _parse_area(sname, 0, opts, "sname")
            sname = bytes(64)
        if opts[52] != ov:
            # RFC 2131 §4.1: option 52 may only appear in the options field; inside file/sname
            # it is an attempt to build a loop or to confuse the parser
            raise ParseError("bad_overload", "option 52 inside file/sname")
    return Packet(op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file, opts,
                  True)
