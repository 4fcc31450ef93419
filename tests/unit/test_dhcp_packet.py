"""Codec tests: header/option round trips, RFC 3396 concatenation and splitting, option overload,
option 82 decoding and echo, and hostile input (hypothesis): parse raises only ParseError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsvc.dhcp.packet import (
    MAGIC,
    EncodeError,
    Packet,
    ParseError,
    RelayInfo,
    encode_suboptions,
    ip_bytes,
    parse,
    parse_suboptions,
    vss_vrf,
)

MAC = bytes.fromhex("525400bd0010")


def raw(options: bytes, *, sname: bytes = bytes(64), file: bytes = bytes(128), hlen: int = 6,
        magic: bytes = MAGIC, giaddr: bytes = bytes(4)) -> bytes:
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, hlen, 0, 0x1234, 0, 0x8000, bytes(4),
                      bytes(4), bytes(4), giaddr, MAC.ljust(16, b"\0"), sname, file)
    return hdr + magic + options


def test_header_fields_and_basic_options() -> None:
    p = parse(raw(b"\x35\x01\x01\x32\x04\x0a\x00\x00\x05\x3d\x07\x01" + MAC + b"\xff" + bytes(40)))
    assert p.op == 1 and p.xid == 0x1234 and p.broadcast
    assert p.mac == "52:54:00:bd:00:10"
    assert p.msg_type == 1
    assert p.requested_ip == ip_bytes("10.0.0.5")
    assert p.client_id == b"\x01" + MAC
    assert p.server_id is None


def test_encode_pads_to_bootp_minimum_and_round_trips() -> None:
    p = Packet(op=2, xid=7, chaddr=MAC.ljust(16, b"\0"), yiaddr=ip_bytes("10.0.0.9"),
               options={53: b"\x02", 54: ip_bytes("10.0.0.1"), 51: (3600).to_bytes(4, "big")})
    b = p.encode()
    assert len(b) == 300  # RFC 951 minimum; short frames are dropped by some PXE ROMs
    q = parse(b)
    assert q == p
    assert b[240:243] == b"\x35\x01\x02"  # option 53 first


def test_concatenation_rfc3396() -> None:
    # two instances of option 43 are one value (RFC 3396 §5)
    p = parse(raw(b"\x35\x01\x01\x2b\x02ab\x2b\x03cde\xff"))
    assert p.get(43) == b"abcde"


def test_long_option_split_and_rejoined() -> None:
    long = bytes(range(256)) * 2  # 512 bytes
    p = Packet(options={53: b"\x05", 43: long})
    b = p.encode()
    # 3 instances: 255 + 255 + 2
    assert b.count(b"\x2b\xff") >= 2
    assert parse(b).get(43) == long


def test_overload_file_and_sname_parsed_in_rfc_order() -> None:
    file = (b"\x0c\x03abc" + b"\xff").ljust(128, b"\0")
    sname = (b"\x0c\x02de" + b"\x0f\x03x.y" + b"\xff").ljust(64, b"\0")
    p = parse(raw(b"\x35\x01\x01\x34\x01\x03\x0c\x01Z\xff", sname=sname, file=file))
    # options field, then file, then sname (RFC 3396 §7)
    assert p.get(12) == b"Zabcde"
    assert p.get(15) == b"x.y"
    assert p.file == bytes(128) and p.sname == bytes(64)


def test_encode_overloads_only_when_needed() -> None:
    p = Packet(op=2, options={53: b"\x05"})
    for code in range(100, 107):
        p.options[code] = bytes([code]) * 60
    b = p.encode(max_size=576)
    assert len(b) <= 576
    q = parse(b)
    assert q.get(52) in (b"\x01", b"\x03")
    for code in range(100, 107):
        assert q.get(code) == bytes([code]) * 60
    # without a limit, no overload
    assert parse(p.encode()).get(52) is None


def test_encode_error_when_nothing_fits() -> None:
    p = Packet(op=2, options={53: b"\x05", 100: bytes(255) * 4})
    with pytest.raises(EncodeError):
        p.encode(max_size=576)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01" * 100, "short"),
        (raw(b"\x35\x01\x01\xff", hlen=17), "bad_hlen"),
        (raw(b"\x35\x01\x01\x0c\x09abc"), "truncated_option"),
        (raw(b"\x35\x01\x01\x0c"), "truncated_option"),
        (raw(b"\x35\x01\x01\x34\x01\x07\xff"), "bad_overload"),
        (raw(b"\x35\x01\x01\x34\x02\x01\x01\xff"), "bad_overload"),
        # option 52 inside the file area: a loop attempt
        (raw(b"\x35\x01\x01\x34\x01\x01\xff", file=(b"\x34\x01\x02\xff").ljust(128, b"\0")), "bad_overload"),
        (raw(b"\x35\x01\x01\x34\x01\x01\xff", file=(b"\x0c\xf0abc").ljust(128, b"\0")), "truncated_option"),
        (raw(b"\x35\x01\x01" + b"\x52\xff" + bytes(255) + b"\xff") + bytes(4000), "oversize"),
    ],
)
def test_malformed_inputs_raise_parse_error(data: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as e:
        parse(data)
    assert e.value.reason == reason


def test_plain_bootp_is_not_dhcp() -> None:
    p = parse(raw(b"", magic=b"\0\0\0\0") + bytes(60))
    assert not p.is_dhcp and p.options == {}


def test_typed_accessors_reject_bad_lengths() -> None:
    p = parse(raw(b"\x35\x01\x03\x32\x03\x01\x02\x03\xff"))
    with pytest.raises(ParseError):
        _ = p.requested_ip
    assert parse(raw(b"\x35\x02\x01\x01\xff")).msg_type is None


def test_relay_info_decoding_and_vss_echo() -> None:
    subs = [(1, b"lcbr1"), (2, b"\xaa\xbb"), (5, ip_bytes("10.9.0.0")), (11, ip_bytes("10.9.0.1")),
            (151, b"\x00tenant-a"), (152, b"")]
    raw82 = encode_suboptions(subs)
    ri = RelayInfo.decode(raw82)
    assert ri.circuit_id == b"lcbr1" and ri.remote_id == b"\xaa\xbb"
    assert ri.link_selection == ip_bytes("10.9.0.0")
    assert ri.server_id_override == ip_bytes("10.9.0.1")
    assert ri.vss is not None and vss_vrf(ri.vss) == "tenant-a"
    assert ri.vss_control
    echoed = parse_suboptions(ri.echo())
    assert (152, b"") not in echoed  # RFC 6607: the server removes VSS-Control
    assert echoed == subs[:-1]
    # without 152 the option is echoed byte for byte (RFC 3046 §2.2)
    plain = encode_suboptions(subs[:2])
    assert RelayInfo.decode(plain).echo() == plain


@pytest.mark.parametrize(("vss", "vrf"), [(b"\x00blue", "blue"), (b"\xff", ""),
                                          (b"\x01" + bytes(7), "vpnid:" + "00" * 7), (b"\x07x", None)])
def test_vss_types(vss: bytes, vrf: str | None) -> None:
    assert vss_vrf(vss) == vrf


def test_bad_relay_suboptions() -> None:
    with pytest.raises(ParseError):
        RelayInfo.decode(b"\x01\x05ab")
    with pytest.raises(ParseError):
        RelayInfo.decode(b"\x05\x03abc")  # link selection must be 4 bytes


def test_user_class_forms() -> None:
    p = Packet(options={77: b"iPXE"})
    assert b"iPXE" in p.user_classes
    p = Packet(options={77: b"\x04iPXE\x03foo"})  # RFC 3004 length-prefixed
    assert b"iPXE" in p.user_classes and b"foo" in p.user_classes


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=700))
def test_fuzz_random_bytes_only_parse_error(data: bytes) -> None:
    try:
        p = parse(data)
    except ParseError:
        return
    _exercise(p)


@st.composite
def option_areas(draw: st.DrawFn) -> bytes:
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        code = draw(st.integers(0, 255))
        if code in (0, 255):
            out.append(code)
            continue
        val = draw(st.binary(max_size=40))
        ln = draw(st.one_of(st.just(len(val)), st.integers(0, 255)))  # sometimes lie about lengths
        out += bytes((code, ln)) + val
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(option_areas(), option_areas(), option_areas(), st.integers(0, 255))
def test_fuzz_structured_options_only_parse_error(opts: bytes, file: bytes, sname: bytes, ov: int) -> None:
    data = raw(b"\x34\x01" + bytes((ov,)) + opts, file=file[:128].ljust(128, b"\0"),
               sname=sname[:64].ljust(64, b"\0"))
    try:
        p = parse(data)
    except ParseError:
        return
    _exercise(p)
    # whatever parsed must survive an encode/parse round trip with the same options
    q = parse(p.encode())
    p.options.pop(52, None)
    assert q.options == p.options


def _exercise(p: Packet) -> None:
    """Every accessor either works or raises ParseError."""
    for f in ("requested_ip", "server_id", "client_id", "max_size", "vendor_class", "arch",
              "user_classes", "uuid", "msg_type", "mac", "param_list"):
        with contextlib.suppress(ParseError):
            getattr(p, f)
    try:
        ri = p.relay_info()
        if ri is not None:
            ri.echo()
            if ri.vss:
                vss_vrf(ri.vss)
    except ParseError:
        pass
