"""bootsvc's DNS service on loopback against clients the rest of the suite does not use - Knot's
``kdig`` and BIND's ``dig`` with EDNS version 1, AD/CD flags, opcodes, TCP with +keepopen and the TC
retry - and dnspython (an independent implementation) for RFC 7766 TCP behaviour (pipelining, idle
timeout, connection limit), the source address of UDP replies on a wildcard bind (RFC 2181 §4.1, in
a namespace this test owns), and a 100,000-packet fuzz run (no crash, no traceback, still answering).

Also runnable as ``python test_dns_conformance.py serve ADDRESS PORT`` (the server the namespace
test starts).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.*, when run as a script (tests/helpers/netns.py)

from helpers.netns import Netns  # noqa: E402
from helpers.waits import wait_for  # noqa: E402

from bootsvc import dns as bdns  # noqa: E402

Z = bdns.build_zone("prov.test", [ipaddress.IPv4Network("10.77.0.0/24")],
                    [("dpu-1", "10.77.0.10")] + [("many", f"10.77.0.{i}") for i in range(100, 160)],
                    boot_servers=["10.77.0.1"], serial=7)
IDLE = 1.0
MAX_CONN = 4


@pytest.fixture
def server(caplog: pytest.LogCaptureFixture) -> Iterator[bdns.DnsService]:
    caplog.set_level(logging.INFO, logger="bootsvc.dns")
    svc = bdns.DnsService("127.0.0.1", 0, Z, tcp_idle_timeout=IDLE, tcp_max_connections=MAX_CONN)
    stop = threading.Event()
    svc.start(stop)
    try:
        yield svc
    finally:
        stop.set()
        svc.close()
    # hostile input is answered or dropped, never logged as an error with a traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def tool(*args: str) -> str:
    exe = shutil.which(args[0])
    if exe is None:
        pytest.skip(f"{args[0]} not installed (Makefile APT_TEST: knot-dnsutils, dnsutils)")
    r = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=20)
    return r.stdout + r.stderr


def flags_of(out: str, tool_name: str) -> set[str]:
    m = re.search(r";; [Ff]lags: ([a-z ]*);", out)
    assert m, out
    return set(m.group(1).split())


def test_kdig_edns_version_1_gets_badvers(server: bdns.DnsService) -> None:
    out = tool("kdig", "@127.0.0.1", "-p", str(server.port), "+edns=1", "dpu-1.prov.test")
    assert "status: BADVERS" in out, out  # RFC 6891 §6.1.3
    assert re.search(r"Version: 0;", out), out  # with the version we implement
    assert "10.77.0.10" not in out


def test_kdig_adflag_is_not_copied_cdflag_is(server: bdns.DnsService) -> None:
    out = tool("kdig", "@127.0.0.1", "-p", str(server.port), "+adflag", "+cdflag", "dpu-1.prov.test")
    assert "status: NOERROR" in out and "10.77.0.10" in out, out
    f = flags_of(out, "kdig")
    assert "ad" not in f and "cd" in f and "aa" in f and "ra" not in f, f  # RFC 4035 §3.1.6


def test_dig_adflag_and_norecurse(server: bdns.DnsService) -> None:
    out = tool("dig", "@127.0.0.1", "-p", str(server.port), "+adflag", "+norecurse", "dpu-1.prov.test")
    f = flags_of(out, "dig")
    assert "ad" not in f and "rd" not in f and "aa" in f, (f, out)


def test_kdig_negative_answer_soa_ttl(server: bdns.DnsService) -> None:
    out = tool("kdig", "@127.0.0.1", "-p", str(server.port), "nope.prov.test")
    assert "status: NXDOMAIN" in out
    m = re.search(r"^prov\.test\.\s+(\d+)\s+IN\s+SOA\s.*\s(\d+)$", out, re.M)
    assert m, out
    assert int(m.group(1)) == min(bdns.TTL, int(m.group(2))) == bdns.NEG_TTL  # RFC 2308 §3


def test_kdig_tcp_keepopen_answers_several_queries_on_one_connection(server: bdns.DnsService) -> None:
    before = server.counters.get("tcp_connections", 0)
    out = tool("kdig", "@127.0.0.1", "-p", str(server.port), "+tcp", "+keepopen", "dpu-1.prov.test", "A",
               "nope.prov.test", "A", "prov.test", "SOA")
    assert out.count("(TCP)") == 3, out
    assert "status: NOERROR" in out and "status: NXDOMAIN" in out
    assert server.counters.get("tcp_connections", 0) - before == 1  # RFC 7766 §6.2.1: reuse


def test_dig_retries_over_tcp_after_tc(server: bdns.DnsService) -> None:
    out = tool("dig", "@127.0.0.1", "-p", str(server.port), "+noedns", "many.prov.test")
    assert "Truncated, retrying in TCP mode" in out, out  # RFC 1035 §4.2.1 / RFC 7766 §5
    assert "ANSWER: 60" in out
    out = tool("kdig", "@127.0.0.1", "-p", str(server.port), "+bufsize=1232", "many.prov.test")
    assert "ANSWER: 60" in out and "(UDP)" in out  # fits the advertised payload size


@pytest.mark.parametrize("opcode", ["status", "notify", "update"])
def test_dig_other_opcodes_are_notimp(server: bdns.DnsService, opcode: str) -> None:
    out = tool("dig", "@127.0.0.1", "-p", str(server.port), f"+opcode={opcode}", "+noedns", "dpu-1.prov.test")
    assert "status: NOTIMP" in out, out


@pytest.mark.parametrize("name", [
    b"\x40" + b"a" * 64 + b"\x04prov\x04test\x00",  # a 64-byte label
    b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x04prov\x04test\x00",  # a 267-byte name
])
def test_hostile_names_get_formerr_over_udp_and_tcp(server: bdns.DnsService, name: bytes) -> None:
    """The attack: such a name made the server raise (DNSLabelError) and send nothing. Now a
    FORMERR (RFC 1035 §2.3.4, §4.1.1) over UDP and TCP, nothing logged as an error (fixture)."""
    query = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(3)
        u.sendto(query, ("127.0.0.1", server.port))
        out = u.recv(4096)
    r = dns.message.from_wire(out, question_only=True)
    assert r.id == 0xBEEF and r.rcode() == dns.rcode.FORMERR
    s = _tcp_connect(server.port)
    try:
        s.sendall(struct.pack("!H", len(query)) + query)
        assert _read_msg(s).rcode() == dns.rcode.FORMERR
        q = dns.message.make_query("dpu-1.prov.test", "A")  # the connection still works
        dns.query.send_tcp(s, q)
        assert _read_msg(s).answer[0][0].address == "10.77.0.10"
    finally:
        s.close()


# ---- RFC 7766 with dnspython on raw sockets ---------------------------------------------------------


def _tcp_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _read_msg(s: socket.socket, timeout: float = 5.0) -> dns.message.Message:
    s.settimeout(timeout)
    buf = b""
    while len(buf) < 2:
        c = s.recv(2 - len(buf))
        assert c, "closed"
        buf += c
    (n,) = struct.unpack("!H", buf)
    body = b""
    while len(body) < n:
        c = s.recv(n - len(body))
        assert c, "closed mid-message"
        body += c
    return dns.message.from_wire(body)


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_tcp_pipelined_queries_are_all_answered_in_order(server: bdns.DnsService) -> None:
    qs = [dns.message.make_query(n, "A") for n in ("dpu-1.prov.test", "nope.prov.test", "many.prov.test")]
    s = _tcp_connect(server.port)
    try:
        s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in qs)))
        got = [_read_msg(s) for _ in qs]
    finally:
        s.close()
    assert [r.id for r in got] == [q.id for q in qs]
    assert [r.rcode() for r in got] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.NOERROR]
    assert len(got[2].answer[0]) == 60 and not got[2].flags & dns.flags.TC  # no size limit on TCP


def test_tcp_idle_connection_is_closed_by_the_server(server: bdns.DnsService) -> None:
    s = _tcp_connect(server.port)
    try:
        q = dns.message.make_query("dpu-1.prov.test", "A")
        dns.query.send_tcp(s, q)
        assert _read_msg(s).rcode() == dns.rcode.NOERROR
        t0 = time.monotonic()
        assert _closed_within(s, IDLE + 3)  # RFC 7766 §6.2.3
        assert time.monotonic() - t0 >= IDLE * 0.8
    finally:
        s.close()


def test_tcp_half_sent_message_does_not_hold_the_connection(server: bdns.DnsService) -> None:
    s = _tcp_connect(server.port)
    try:
        s.sendall(b"\x00\x40abc")  # announces 64 bytes, sends 3: a slow-read attempt
        assert _closed_within(s, IDLE + 3)
    finally:
        s.close()


def test_tcp_connection_limit_and_recovery(server: bdns.DnsService) -> None:
    held = [_tcp_connect(server.port) for _ in range(MAX_CONN)]
    try:
        wait_for(lambda: server.counters.get("tcp_connections", 0) >= MAX_CONN, 5, "connections accepted")
        extra = _tcp_connect(server.port)
        try:
            assert _closed_within(extra, 3)  # RFC 7766 §6.2.2: the server may limit connections
        finally:
            extra.close()
        assert server.counters.get("tcp_refused", 0) >= 1
    finally:
        for s in held:
            s.close()
    # the slots come back
    q = dns.message.make_query("dpu-1.prov.test", "A")

    def ok() -> bool:
        try:
            return dns.query.tcp(q, "127.0.0.1", port=server.port, timeout=2).rcode() == dns.rcode.NOERROR
        except (OSError, EOFError):
            return False

    wait_for(ok, 5, "a TCP query after the held connections closed")


# ---- RFC 2181 §4.1: reply from the address the query went to -------------------------------------


def serve_main(argv: list[str]) -> int:
    address, port = argv[0], int(argv[1])
    svc = bdns.DnsService(address, port, Z)
    stop = threading.Event()
    svc.start(stop)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    svc.close()
    return 0


@pytest.mark.netns
def test_wildcard_bind_replies_from_the_queried_address(tmp_path: Path) -> None:
    if shutil.which("dig") is None:
        pytest.skip("dig not installed")
    proc: subprocess.Popen[str] | None = None
    with Netns("bdq") as ns:
        try:
            proc = ns.python(__file__, "serve", "0.0.0.0", "5353", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=str(ROOT))
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            for addr in ("127.0.0.1", "127.0.0.2", "127.3.4.5"):
                # dig ignores a reply from another address than the one it asked ("reply from unexpected
                # source") and then times out
                r = ns.run("dig", f"@{addr}", "-p", "5353", "+tries=1", "+time=2", "+noedns", "dpu-1.prov.test",
                           check=False, timeout=20)
                assert "status: NOERROR" in r.stdout and f"SERVER: {addr}#5353(UDP)" in r.stdout.replace(
                    f"({addr})", "(UDP)"), r.stdout + r.stderr
                assert "unexpected source" not in r.stdout + r.stderr
        finally:
            if proc is not None:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---- fuzz ---------------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    out = []
    for name, qtype, edns, flags in [("dpu-1.prov.test", "A", 0, 0), ("many.prov.test", "A", -1, 0),
                                     ("prov.test", "SOA", 0, dns.flags.AD), ("10.0.77.10.in-addr.arpa", "PTR", 0, 0),
                                     ("x.example", "ANY", 1, dns.flags.CD), ("prov.test", "AXFR", -1, 0)]:
        q = dns.message.make_query(name, qtype, use_edns=edns, payload=4096)
        q.flags |= flags
        out.append(q.to_wire())
    return out


def fuzz_packets(n: int, seed: int) -> Iterator[bytes]:
    """Mutations of real queries (bit flips, truncation, splices, count and length fields, label
    bytes, OPT versions and sizes) and pure noise, reproducible from ``seed``."""
    rnd = random.Random(seed)
    seeds = _seeds()
    for i in range(n):
        base = bytearray(rnd.choice(seeds))
        k = i % 8
        if k == 0:
            yield rnd.randbytes(rnd.randrange(0, 600))
            continue
        if k == 1:  # flip bits
            for _ in range(rnd.randrange(1, 8)):
                j = rnd.randrange(len(base))
                base[j] ^= 1 << rnd.randrange(8)
        elif k == 2:  # truncate
            base = base[: rnd.randrange(0, len(base))]
        elif k == 3:  # header counts
            struct.pack_into("!HHHH", base, 4, *(rnd.choice((0, 1, 2, 255, 65535)) for _ in range(4)))
        elif k == 4:  # label length bytes: 64, pointers, reserved 0x40/0x80 types, loops
            base[12] = rnd.choice((0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFF))
            if rnd.random() < 0.5:
                base[13] = rnd.choice((0x0C, 0x00, 0xFF))
        elif k == 5:  # long names: many labels
            labels = b"".join(bytes([rnd.choice((1, 63, 64))]) + b"a" * 64 for _ in range(rnd.randrange(1, 9)))
            base = bytearray(base[:12] + labels[: rnd.randrange(len(labels) + 1)] + b"\x00\x00\x01\x00\x01")
        elif k == 6:  # OPT: versions, sizes, several OPTs, opcodes and flags
            opt = b"\x00" + struct.pack("!HHIH", 41, rnd.randrange(65536), rnd.randrange(1 << 32), 0)
            base = bytearray(bytes(base[:12]) + b"\x05dpu-1\x04prov\x04test\x00\x00\x01\x00\x01"
                             + opt * rnd.randrange(0, 3))
            struct.pack_into("!HHHHH", base, 2, rnd.randrange(65536) & 0x7FFF, 1, 0, 0, len(base) // 50)
        else:  # splice two seeds
            other = rnd.choice(seeds)
            cut = rnd.randrange(len(base))
            base = base[:cut] + other[rnd.randrange(len(other)):]
        yield bytes(base)


def drain(s: socket.socket) -> int:
    """Read every reply already queued on the non-blocking socket ``s``; how many there were."""
    n = 0
    while True:
        try:
            s.recv(4096)
        except BlockingIOError:
            return n
        n += 1


def test_fuzz_100k_packets_no_crash_still_answering(server: bdns.DnsService) -> None:
    total = 100_000
    c = server.counters
    start = c.get("udp_queries", 0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setblocking(False)
    replies = 0
    t0 = time.monotonic()
    tcp_sent = 0
    try:
        for i, data in enumerate(fuzz_packets(total, seed=17)):
            s.sendto(data, ("127.0.0.1", server.port))
            if i % 5000 == 0 and i:  # a few over TCP too (length-prefixed; the connection may be closed)
                with socket.create_connection(("127.0.0.1", server.port), timeout=2) as t:
                    t.sendall(struct.pack("!H", len(data)) + data)
                    tcp_sent += 1
            # keep at most 50 in flight (each costs ~2 KiB of the server's receive buffer): the
            # server must see every packet, not the kernel drop them
            while i + 1 - (c.get("udp_queries", 0) - start) > 50:
                replies += drain(s)
                time.sleep(0.0005)
        wait_for(lambda: c.get("udp_queries", 0) - start >= total, 30, "the server to take every packet")
        replies += drain(s)
    finally:
        s.close()
    secs = time.monotonic() - t0
    seen = c.get("udp_queries", 0) - start
    print(f"\nDNS fuzz: sent {total} UDP (+{tcp_sent} TCP) in {secs:.1f}s, server took {seen}, "
          f"replies read {replies}, dropped (no reply) {c.get('dropped', 0)}, errors {c.get('errors', 0)}")
    assert seen >= total
    assert c.get("errors", 0) == 0
    # still answering, over UDP and TCP
    q = dns.message.make_query("dpu-1.prov.test", "A")
    assert dns.query.udp(q, "127.0.0.1", port=server.port, timeout=2).answer[0][0].address == "10.77.0.10"
    assert dns.query.tcp(q, "127.0.0.1", port=server.port, timeout=2).answer[0][0].address == "10.77.0.10"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(serve_main(sys.argv[2:]))
    sys.exit(2)
