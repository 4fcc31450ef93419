"""bootsvc.tftp.packet and bootsvc.tftp.transfer without sockets: parsing, RFC 2347/2348/2349/7440
negotiation, netascii (RFC 1350 §5 / RFC 764), windowed and lock-step transfers, rollover."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.tftp import TFTP

from bootsvc.tftp import packet
from bootsvc.tftp.paths import Content
from bootsvc.tftp.transfer import Transfer


def rrq(name: bytes, mode: bytes = b"octet", **opts: object) -> bytes:
    tail = b"".join(f"{k}\0{v}\0".encode() for k, v in opts.items())
    return struct.pack("!H", 1) + name + b"\0" + mode + b"\0" + tail


def oack_of(neg: packet.Negotiated) -> dict[str, str]:
    """The OACK decoded by scapy's TFTP layer, not by bootsvc."""
    assert neg.oack is not None
    p = TFTP(neg.oack)
    assert p.op == 6
    return {o.oname.decode(): o.value.decode() for o in p.options}


def test_parse_request_lowercases_options_keeps_first_duplicate() -> None:
    r = packet.parse_request(rrq(b"a.efi", b"OcTeT", BLKSIZE=1024, TSize=0) + b"blksize\x0016\x00")
    assert (r.op, r.filename, r.mode) == (1, "a.efi", "octet")
    assert r.options == (("blksize", "1024"), ("tsize", "0"))


@pytest.mark.parametrize("buf,code", [
    (b"\x00\x01x", 4),  # too short
    (b"\x00\x01a.efi\x00octet", 4),  # mode not NUL-terminated
    (rrq(b"a.efi") + b"blksize\x00", 4),  # option without value
    (rrq(b"a.efi", b"mail"), 4),  # RFC 1350 mail mode: refused
    (rrq(b"a.efi", b"binary"), 4),
    (rrq(b"x" * 600), 4),  # RFC 2347: over 512 octets
    (rrq(b"caf\xc3\xa9"), 2),  # 8-bit name
    (rrq(b"a b"), 2),
    (b"\x00\x09a\x00octet\x00", 4),  # unknown opcode
])
def test_parse_request_refusals(buf: bytes, code: int) -> None:
    with pytest.raises(packet.Refused) as e:
        packet.parse_request(buf)
    assert e.value.code == code


def test_oack_only_carries_what_was_asked() -> None:
    # RFC 2347 §2: no blksize unless requested
    assert oack_of(packet.negotiate((("tsize", "0"),), 1234)) == {"tsize": "1234"}
    assert oack_of(packet.negotiate((("timeout", "3"),), 10)) == {"timeout": "3"}
    assert oack_of(packet.negotiate((("windowsize", "4"),), 10)) == {"windowsize": "4"}
    # nothing requested or nothing acceptable: no OACK at all (DATA 1 starts the transfer)
    assert packet.negotiate((), 10).oack is None
    assert packet.negotiate((("multicast", ""), ("foo", "bar")), 10).oack is None


@pytest.mark.parametrize("asked,answer,blksize", [
    ("8", "8", 8), ("512", "512", 512), ("1468", "1468", 1468), ("65464", "65464", 65464),
    ("65465", "65464", 65464), ("99999999", "65464", 65464),  # RFC 2348: the server may answer less
    ("7", None, 512), ("0", None, 512), ("-1", None, 512), ("abc", None, 512), ("", None, 512),
])
def test_blksize_bounds(asked: str, answer: str | None, blksize: int) -> None:
    neg = packet.negotiate((("blksize", asked),), 10)
    assert neg.blksize == blksize
    assert (oack_of(neg).get("blksize") if neg.oack else None) == answer


@pytest.mark.parametrize("asked,ok", [("1", True), ("255", True), ("0", False), ("256", False), ("x", False)])
def test_timeout_bounds(asked: str, ok: bool) -> None:
    neg = packet.negotiate((("timeout", asked),), 10)
    assert (neg.timeout == float(asked)) if ok else (neg.timeout is None and neg.oack is None)


@pytest.mark.parametrize("asked,answer", [("1", "1"), ("16", "16"), ("65535", "64"), ("0", None), ("65536", None)])
def test_windowsize_bounds(asked: str, answer: str | None) -> None:
    neg = packet.negotiate((("windowsize", asked),), 10, max_windowsize=64)
    assert (oack_of(neg).get("windowsize") if neg.oack else None) == answer


def test_tsize_answered_with_size_and_order_kept() -> None:
    neg = packet.negotiate((("tsize", "0"), ("blksize", "1024"), ("foo", "1")), 99_999)
    assert neg.oack == b"\x00\x06tsize\x0099999\x00blksize\x001024\x00"


def test_netascii_translation() -> None:
    # RFC 764: newline = CR LF; a CR that is not end of line = CR NUL
    assert packet.netascii(b"a\nb\rc\r\nd") == b"a\r\nb\r\0c\r\0\r\nd"


def _out(x: bytes | list[bytes] | tuple[bytes, ...] | None) -> list[bytes]:
    """What a Transfer method said to send, as a list (one DATA in lock-step comes as bytes)."""
    return [] if x is None else [x] if isinstance(x, bytes) else list(x)


def _run(size: int, blksize: int, window: int, *, drop: set[int] = frozenset()) -> tuple[bytes, int]:  # type: ignore[assignment]
    """Drive a transfer as a client would; returns the bytes received and the number of DATA packets."""
    data = bytes(i % 251 for i in range(size))
    oack = packet.oack_packet([("blksize", str(blksize))] + ([("windowsize", str(window))] if window > 1 else []))
    t = Transfer(("c", 1), Content(data=data, size=size), blksize, "f", oack=oack, now=0.0, timeout=1.0,
                 window=window)
    got = bytearray()
    expect, sent, now = 1, 0, 0.0
    out = _out(t.on_packet(struct.pack("!HH", 4, 0), now))
    while not t.done:
        last_ok = expect - 1
        for p in out:
            sent += 1
            op, num = struct.unpack("!HH", p[:4])
            assert op == 3
            if sent in drop or num != expect & 0xFFFF:
                continue
            got += p[4:]
            expect += 1
            last_ok = expect - 1
        final = bool(out) and expect > t.nblocks
        now += 0.01
        if final or (out and len(out) == window and (expect - 1) == t.acked_wait):
            out = _out(t.on_packet(struct.pack("!HH", 4, (expect - 1) & 0xFFFF), now))
        else:  # a gap: RFC 7440 §4, the client ACKs the last block it got in order
            out = _out(t.on_packet(struct.pack("!HH", 4, last_ok & 0xFFFF), now))
            if not out:
                now += 2
                out = list(t.on_timeout(now, 5))
    assert t.complete
    return bytes(got), sent


@pytest.mark.parametrize("size,blksize,window", [
    (0, 512, 1), (512, 512, 1), (1024, 512, 4), (1000, 512, 1), (1000, 512, 4), (10_000, 100, 7),
    (8 * 65540 + 3, 8, 1), (8 * 65540, 8, 16),  # block numbers wrap 65535 -> 0
])
def test_transfer_delivers_file(size: int, blksize: int, window: int) -> None:
    data, sent = _run(size, blksize, window)
    assert data == bytes(i % 251 for i in range(size))
    assert sent == size // blksize + 1  # a final short block; empty when size is a multiple (RFC 1350 §6)


def test_window_resends_after_a_lost_block() -> None:
    data, sent = _run(10_000, 100, 8, drop={3})
    assert data == bytes(i % 251 for i in range(10_000))
    assert sent > 101


def test_lockstep_duplicate_ack_sends_nothing() -> None:
    t = Transfer(("c", 1), Content(data=b"x" * 2000, size=2000), 512, "f", oack=None, now=0.0, timeout=1.0)
    assert t.first()[:4] == struct.pack("!HH", 3, 1)
    assert [p[:4] for p in _out(t.on_packet(struct.pack("!HH", 4, 1), 0.1))] == [struct.pack("!HH", 3, 2)]
    assert t.on_packet(struct.pack("!HH", 4, 1), 0.2) is None  # Sorcerer's Apprentice: no resend on a dup
    assert t.on_timeout(0.5, 5) == ()  # not yet
    assert [p[:4] for p in t.on_timeout(1.2, 5)] == [struct.pack("!HH", 3, 2)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_request_never_raises_anything_but_refused(buf: bytes) -> None:
    try:
        r = packet.parse_request(buf)
    except packet.Refused:
        return
    packet.negotiate(r.options, 123)


def test_client_error_ends_the_transfer() -> None:
    """RFC 2347 §2 (ERROR 8 refusing the OACK) and RFC 2349 §3 (ERROR 3, file too large): an ERROR from
    the client ends the transfer; nothing is sent in answer (RFC 1350 §7: errors are not acknowledged)."""
    t = Transfer(("c", 1), Content(data=b"x" * 2000, size=2000), 512, "f", oack=b"\0\6tsize\0" + b"2000\0",
                 now=0.0, timeout=1.0)
    assert t.on_packet(struct.pack("!HH", 5, 8) + b"no\0", 0.1) is None and t.done and not t.complete


def test_window_timeout_resends_the_whole_window_and_ignores_old_acks() -> None:
    """RFC 7440 §4: silence -> the window in flight is sent again; an ACK of a block before the window
    (a duplicate) sends nothing (Sorcerer's Apprentice, RFC 1123 §4.2.3.1)."""
    t = Transfer(("c", 1), Content(data=b"y" * 5000, size=5000), 512, "f", oack=b"\0\6windowsize\0" + b"4\0",
                 now=0.0, timeout=1.0, window=4)
    first = [p[:4] for p in _out(t.on_packet(struct.pack("!HH", 4, 0), 0.0))]
    assert first == [struct.pack("!HH", 3, n) for n in (1, 2, 3, 4)]
    assert t.on_packet(struct.pack("!HH", 4, 0), 0.1) is None  # the OACK's ACK again: a duplicate
    assert [p[:4] for p in t.on_timeout(1.5, 5)] == first
    assert [p[:4] for p in _out(t.on_packet(struct.pack("!HH", 4, 4), 1.6))] == [
        struct.pack("!HH", 3, n) for n in (5, 6, 7, 8)]
    assert t.on_packet(struct.pack("!HH", 4, 3), 1.7) is None  # older than the window
    assert [p[:4] for p in _out(t.on_packet(struct.pack("!HH", 4, 6), 1.8))] == [
        struct.pack("!HH", 3, n) for n in (7, 8, 9, 10)]  # a gap after 6: restart at 7
    assert [p[:4] for p in _out(t.on_packet(struct.pack("!HH", 4, 10), 1.9))] == []  # 10 of 10 blocks: done
    assert t.complete and t.acked_bytes() == 5000
