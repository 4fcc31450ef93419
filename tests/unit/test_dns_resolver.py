"""bootsvc.dns.answer: the pure resolver (bytes in, bytes out; no sockets)."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from bootsvc import dns

NETS = [ipaddress.IPv4Network("10.77.0.0/24"), ipaddress.IPv4Network("10.77.2.0/23")]
Z = dns.build_zone("Prov.Internal", NETS,
                   [("dpu-1", "10.77.0.10"), ("dpu-1-bmc", "10.77.0.11"), ("host-1", "10.77.2.20"),
                    ("web.rack1", "10.77.0.12"), ("outside", "192.0.2.5")]
                   + [("many", f"10.77.0.{i}") for i in range(100, 160)],
                   boot_servers=["10.77.0.1"], serial=42)


def ask(name: str, qtype: str = "A", *, udp: bool = True, edns: int | None = None) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    out = dns.answer(q.pack(), Z, udp=udp)
    assert out is not None
    r = DNSRecord.parse(out)
    assert r.header.id == q.header.id and r.header.qr == 1
    return r


def test_zones() -> None:
    assert Z.zones == ("prov.internal.", "0.77.10.in-addr.arpa.", "2.77.10.in-addr.arpa.", "3.77.10.in-addr.arpa.")
    assert dns.reverse_zones([ipaddress.IPv4Network("10.0.0.0/16")]) == ["0.10.in-addr.arpa."]
    assert dns.reverse_zones([ipaddress.IPv4Network("10.0.0.128/25")]) == ["0.0.10.in-addr.arpa."]


def test_a_record_authoritative_no_recursion() -> None:
    r = ask("DPU-1.prov.internal")  # case-insensitive
    assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1 and r.header.ra == 0
    assert [str(x.rdata) for x in r.rr] == ["10.77.0.10"] and r.rr[0].rtype == QTYPE.A


def test_ptr_forward_reverse_consistent() -> None:
    r = ask("10.0.77.10.in-addr.arpa", "PTR")
    assert [str(x.rdata) for x in r.rr] == ["dpu-1.prov.internal."]
    assert str(ask("20.2.77.10.in-addr.arpa", "PTR").rr[0].rdata) == "host-1.prov.internal."
    # no PTR outside our reverse zones, even for a name we have
    assert ask("5.2.0.192.in-addr.arpa", "PTR").header.rcode == RCODE.REFUSED


def test_nodata_has_soa_in_authority() -> None:
    r = ask("dpu-1.prov.internal", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    assert len(r.auth) == 1 and r.auth[0].rtype == QTYPE.SOA and str(r.auth[0].rname) == "prov.internal."
    assert r.auth[0].rdata.times[0] == 42 and r.auth[0].rdata.times[4] == dns.NEG_TTL


def test_empty_non_terminal_is_nodata() -> None:
    r = ask("rack1.prov.internal")
    assert r.header.rcode == RCODE.NOERROR and not r.rr and r.auth[0].rtype == QTYPE.SOA


def test_nxdomain_has_soa() -> None:
    r = ask("nope.prov.internal")
    assert r.header.rcode == RCODE.NXDOMAIN and r.header.aa == 1 and r.auth[0].rtype == QTYPE.SOA
    r = ask("99.0.77.10.in-addr.arpa", "PTR")
    assert r.header.rcode == RCODE.NXDOMAIN and str(r.auth[0].rname) == "0.77.10.in-addr.arpa."


def test_refused_outside_our_zones() -> None:
    for name in ("example.com", "internal", "xprov.internal"):
        r = ask(name)
        assert r.header.rcode == RCODE.REFUSED and r.header.aa == 0 and not r.rr


def test_apex_soa_ns_and_boot() -> None:
    assert ask("prov.internal", "SOA").rr[0].rtype == QTYPE.SOA
    assert str(ask("prov.internal", "NS").rr[0].rdata) == "ns.prov.internal."
    assert [str(x.rdata) for x in ask("boot.prov.internal").rr] == ["10.77.0.1"]
    assert {x.rtype for x in ask("prov.internal", "ANY").rr} == {QTYPE.SOA, QTYPE.NS}


def test_udp_truncation_512_and_edns() -> None:
    r = ask("many.prov.internal")  # 60 A records: ~1 KB > 512
    assert r.header.tc == 1 and not r.rr
    r = ask("many.prov.internal", edns=4096)  # fits the EDNS size (capped at 1232)
    assert r.header.tc == 0 and len(r.rr) == 60
    assert any(x.rtype == QTYPE.OPT for x in r.ar)
    r = ask("many.prov.internal", udp=False)  # TCP: no limit
    assert r.header.tc == 0 and len(r.rr) == 60
    assert ask("dpu-1.prov.internal").header.tc == 0


def test_formerr_notimp_and_responses_ignored() -> None:
    q = DNSRecord.question("dpu-1.prov.internal")
    q.header.opcode = 2  # STATUS
    assert DNSRecord.parse(dns.answer(q.pack(), Z)).header.rcode == RCODE.NOTIMP  # type: ignore[arg-type]
    q = DNSRecord.question("dpu-1.prov.internal")
    q.add_question(*DNSRecord.question("host-1.prov.internal").questions)
    assert DNSRecord.parse(dns.answer(q.pack(), Z)).header.rcode == RCODE.FORMERR  # type: ignore[arg-type]
    resp = ask("dpu-1.prov.internal")
    assert dns.answer(resp.pack(), Z) is None  # never answer a response
    assert dns.answer(b"\x12\x34", Z) is None  # too short for a header
    garbage = dns.answer(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", Z)
    assert garbage is not None and DNSRecord.parse(garbage).header.rcode == RCODE.FORMERR


@pytest.mark.parametrize("qtype", ["A", "PTR", "AAAA", "MX", "TXT", "CNAME", "ANY", "SOA", "NS"])
def test_every_type_gets_an_answer(qtype: str) -> None:
    r = ask("host-1.prov.internal", qtype)
    assert r.header.rcode == RCODE.NOERROR
    assert r.rr or r.auth
