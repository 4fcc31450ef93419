"""bootsvc.dns.answer against the server-side MUSTs and SHOULDs of RFC 1035, 2181, 2308, 6891 and
4035 §3.1.6, with queries built and replies decoded by dnspython (an independent implementation;
bootsvc itself uses dnslib). Raw byte strings where dnspython refuses to build the hostile input."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsvc import dns as bdns

Z = bdns.build_zone("prov.test", [ipaddress.IPv4Network("10.77.0.0/24")],
                    [("dpu-1", "10.77.0.10")] + [("many", f"10.77.0.{i}") for i in range(100, 160)],
                    boot_servers=["10.77.0.1"], serial=7, names=["enrolled"])


def ask(q: dns.message.Message, *, udp: bool = True) -> dns.message.Message:
    out = bdns.answer(q.to_wire(), Z, udp=udp)
    assert out is not None
    r = dns.message.from_wire(out)
    assert r.id == q.id and r.flags & dns.flags.QR
    return r


def raw(qname_wire: bytes, *, flags: int = 0x0100, qd: int = 1, qtype: int = 1, ar: bytes = b"",
        arcount: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, 0, 0, arcount) + qname_wire + struct.pack("!HH", qtype, 1) + ar


def opt_rr(*, version: int = 0, size: int = 1232, owner: bytes = b"\x00") -> bytes:
    return owner + struct.pack("!HHIH", 41, size, version << 16, 0)


# ---- RFC 2308 §3: negative answers -----------------------------------------------------------


@pytest.mark.parametrize(("name", "rcode"), [("nope.prov.test.", dns.rcode.NXDOMAIN),
                                             ("dpu-1.prov.test.", dns.rcode.NOERROR)])
def test_negative_answer_soa_ttl_is_min_of_ttl_and_minimum(name: str, rcode: int) -> None:
    qtype = "A" if rcode == dns.rcode.NXDOMAIN else "TXT"  # NXDOMAIN / NODATA
    r = ask(dns.message.make_query(name, qtype))
    assert r.rcode() == rcode and not r.answer
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.ttl == min(bdns.TTL, soa[0].minimum)  # RFC 2308 §3
    assert soa.ttl == bdns.NEG_TTL


def test_soa_query_itself_keeps_the_zone_ttl() -> None:
    r = ask(dns.message.make_query("prov.test.", "SOA"))
    assert r.answer[0].ttl == bdns.TTL


# ---- RFC 6891 --------------------------------------------------------------------------------


def test_edns_version_1_gets_badvers_with_opt_version_0() -> None:
    q = dns.message.make_query("dpu-1.prov.test.", "A", use_edns=1)
    r = ask(q)
    assert r.rcode() == dns.rcode.BADVERS  # 16: extended RCODE 1 in OPT, header RCODE 0
    assert r.edns == 0
    assert not r.answer


def test_edns_query_gets_opt_and_plain_query_none() -> None:
    r = ask(dns.message.make_query("dpu-1.prov.test.", "A", use_edns=0, payload=4096))
    assert r.edns == 0 and r.payload == bdns.UDP_MAX and r.rcode() == dns.rcode.NOERROR
    r = ask(dns.message.make_query("dpu-1.prov.test.", "A", use_edns=False))
    assert r.edns == -1  # RFC 6891 §7: no OPT in a reply to a query without one


def test_do_bit_is_copied() -> None:
    r = ask(dns.message.make_query("dpu-1.prov.test.", "A", want_dnssec=True))
    assert r.ednsflags & dns.flags.DO  # RFC 3225 §3
    r = ask(dns.message.make_query("dpu-1.prov.test.", "A", use_edns=0))
    assert not r.ednsflags & dns.flags.DO


def test_formerr_to_an_edns_query_carries_opt() -> None:
    name = b"\x40" + b"a" * 64 + b"\x04prov\x04test\x00"
    out = bdns.answer(raw(name, ar=opt_rr(), arcount=1), Z)
    assert out is not None
    r = dns.message.from_wire(out)
    assert r.rcode() == dns.rcode.FORMERR and r.edns == 0  # RFC 6891 §7


def test_two_opt_records_are_formerr() -> None:
    data = raw(b"\x05dpu-1\x04prov\x04test\x00", ar=opt_rr() + opt_rr(), arcount=2)
    r = dns.message.from_wire(bdns.answer(data, Z) or b"", question_only=True)
    assert r.rcode() == dns.rcode.FORMERR  # RFC 6891 §6.1.1


def test_opt_with_a_non_root_owner_is_formerr() -> None:
    data = raw(b"\x05dpu-1\x04prov\x04test\x00", ar=opt_rr(owner=b"\x01x\x00"), arcount=1)
    r = dns.message.from_wire(bdns.answer(data, Z) or b"", question_only=True)
    assert r.rcode() == dns.rcode.FORMERR  # RFC 6891 §6.1.2: the owner MUST be the root


@pytest.mark.parametrize("payload", [0, 100, 511])
def test_payload_below_512_is_treated_as_512(payload: int) -> None:
    # RFC 6891 §6.2.5; 60 A records are ~1 KB: truncated at 512, not at the advertised size
    r = ask(dns.message.make_query("many.prov.test.", "A", use_edns=0, payload=payload))
    assert r.flags & dns.flags.TC


# ---- RFC 1035 §4.2.1: UDP size and TC ---------------------------------------------------------


def test_large_answer_truncated_over_udp_whole_over_tcp() -> None:
    q = dns.message.make_query("many.prov.test.", "A", use_edns=False)
    out = bdns.answer(q.to_wire(), Z, udp=True)
    assert out is not None and len(out) <= 512
    r = dns.message.from_wire(out)
    assert r.flags & dns.flags.TC and not r.answer and r.question[0].name == q.question[0].name
    r = ask(q, udp=False)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 60
    big = dns.message.make_query("many.prov.test.", "A", use_edns=0, payload=1232)
    r = ask(big)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 60  # fits 1232 bytes


# ---- header bits: RFC 1035 §4.1.1, RFC 4035 §3.1.6 ---------------------------------------------


@pytest.mark.parametrize("rd", [True, False])
@pytest.mark.parametrize("cd", [True, False])
def test_flags_ad_never_set_cd_and_rd_copied_ra_clear(rd: bool, cd: bool) -> None:
    q = dns.message.make_query("dpu-1.prov.test.", "A", use_edns=0)
    q.flags = (dns.flags.AD | (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0))
    r = ask(q)
    assert not r.flags & dns.flags.AD  # RFC 4035 §3.1.6: not without validated DNSSEC data
    assert bool(r.flags & dns.flags.CD) == cd  # RFC 4035 §3.1.6: SHOULD copy CD
    assert bool(r.flags & dns.flags.RD) == rd  # RFC 1035 §4.1.1: RD copied
    assert not r.flags & dns.flags.RA and r.flags & dns.flags.AA


def test_z_bit_is_zero_in_replies() -> None:
    data = raw(b"\x05dpu-1\x04prov\x04test\x00", flags=0x0140)  # RD + the reserved Z bit
    out = bdns.answer(data, Z)
    assert out is not None and struct.unpack("!H", out[2:4])[0] & 0x0040 == 0


def test_question_case_preserved() -> None:
    q = dns.message.make_query("DpU-1.PrOv.TeSt.", "A")
    r = ask(q)
    assert r.question[0].name.to_text() == "DpU-1.PrOv.TeSt."  # RFC 4343 §4.1
    assert r.answer[0][0].address == "10.77.0.10"


# ---- malformed queries --------------------------------------------------------------------------


def test_64_byte_label_is_formerr() -> None:
    out = bdns.answer(raw(b"\x40" + b"a" * 64 + b"\x04prov\x04test\x00"), Z)
    assert out is not None
    assert struct.unpack("!H", out[:2])[0] == 0x1234 and out[3] & 0x0F == dns.rcode.FORMERR
    assert out[2] & 0x80  # QR


def test_name_over_255_bytes_is_formerr() -> None:
    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x04prov\x04test\x00"
    assert len(name) > 255
    out = bdns.answer(raw(name), Z)
    assert out is not None and out[3] & 0x0F == dns.rcode.FORMERR


@pytest.mark.parametrize("qd", [0, 2])
def test_qdcount_other_than_one_is_formerr(qd: int) -> None:
    q = b"\x05dpu-1\x04prov\x04test\x00\x00\x01\x00\x01"
    data = struct.pack("!HHHHHH", 0x1234, 0x0100, qd, 0, 0, 0) + q * qd
    out = bdns.answer(data, Z)
    assert out is not None and out[3] & 0x0F == dns.rcode.FORMERR


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE, 3])
def test_other_opcodes_are_notimp(opcode: int) -> None:
    data = raw(b"\x05dpu-1\x04prov\x04test\x00", flags=0x0100 | (opcode << 11))
    out = bdns.answer(data, Z)
    assert out is not None
    r = dns.message.from_wire(out, question_only=True)
    assert r.rcode() == dns.rcode.NOTIMP and r.opcode() == opcode


def test_responses_are_never_answered() -> None:
    assert bdns.answer(raw(b"\x00", flags=0x8100), Z) is None  # QR set: no reflection loops


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
def test_zone_transfer_refused(qtype: str) -> None:
    r = ask(dns.message.make_query("prov.test.", qtype), udp=False)
    assert r.rcode() == dns.rcode.REFUSED


def test_enrolled_name_without_address_is_nodata_not_nxdomain() -> None:
    r = ask(dns.message.make_query("enrolled.prov.test.", "A"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority  # RFC 2308 §2.2


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_never_raises(data: bytes) -> None:
    out = bdns.answer(data, Z)
    if out is not None:
        assert len(out) <= 512 or (len(data) > 12 and out)  # an answer is a message
        dns.message.from_wire(out, question_only=True)  # and it parses


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=70), min_size=0, max_size=8), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.binary(max_size=40))
def test_fuzz_structured_names_never_raise(labels: list[bytes], flags: int, qtype: int, tail: bytes) -> None:
    name = b"".join(bytes([len(x) & 0xFF]) + x for x in labels) + b"\x00"
    head = struct.pack("!HHHHHH", 1, flags & 0x7FFF, 1, 0, 0, 1 if tail else 0)
    data = head + name + struct.pack("!HH", qtype, 1) + tail
    out = bdns.answer(data, Z)
    if out is not None:
        dns.message.from_wire(out, question_only=True)


def test_rrset_ttls_are_equal_and_below_2_31() -> None:
    r = ask(dns.message.make_query("many.prov.test.", "A"), udp=False)
    (rrset,) = r.answer
    assert len(rrset) == 60 and 0 < rrset.ttl < 2**31  # RFC 2181 §5.2 (one TTL per RRset), §8


def test_other_class_is_refused_not_answered() -> None:
    r = ask(dns.message.make_query("version.bind.", "TXT", rdclass="CH"))
    assert r.rcode() == dns.rcode.REFUSED and not r.answer and not r.flags & dns.flags.AA
    r = ask(dns.message.make_query("dpu-1.prov.test.", "A", rdclass="ANY"))
    assert r.rcode() == dns.rcode.NOERROR and r.answer  # QCLASS * (RFC 1035 §3.2.5) matches IN


def test_unknown_edns_options_are_ignored() -> None:
    cookie = dns.edns.GenericOption(10, b"\x01" * 8)  # RFC 7873 client cookie
    unknown = dns.edns.GenericOption(65001, b"xyz")
    q = dns.message.make_query("dpu-1.prov.test.", "A", use_edns=0, options=[cookie, unknown])
    r = ask(q)
    assert r.rcode() == dns.rcode.NOERROR and r.answer and r.edns == 0  # RFC 6891 §6.1.2
    assert r.ednsflags & 0x7FFF == 0  # no Z flags set (RFC 6891 §6.1.4)
