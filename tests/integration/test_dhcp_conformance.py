"""bootsvc's DHCP server against clients the rest of the suite does not use, in namespaces this module
creates (prefix ``bdk``): dhcpcd (two client identifiers on one NIC, RFC 2131 §2), nmap's
``broadcast-dhcp-discover`` and ``dhcp-discover`` (DHCPINFORM, RFC 2131 §4.3.5), and hand-built
packets; every reply is taken off the wire (AF_PACKET in the client namespace) and decoded with scapy,
not with bootsvc's codec: option order against the client's parameter request list (RFC 2132 §9.8),
IP datagram size against option 57 (RFC 2132 §9.10). Ends with 100,000 fuzzed packets: no crash, no
traceback in the server's log, and a real client still gets a lease afterwards.

Topology (module-scoped, torn down at the end):

    bdk<t>c (clients, sniffer)  bdk<t>c0 ---- bdk<t>s0 198.18.0.1/16  bdk<t>s (bootsvc DHCP)

This file is also the in-namespace helper: ``python test_dhcp_conformance.py sniff|send|fuzz ...``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.*, when run as a script (sniff, send, fuzz)

from helpers.netns import Netns, sh, veth  # noqa: E402
from helpers.procs import stop  # noqa: E402
from helpers.waits import wait_for  # noqa: E402

PY = sys.executable
SERVER = "198.18.0.1"
CLIENT_MAC = "02:bd:00:00:71:01"

pytestmark = pytest.mark.netns


# ------------------------------------------------------------------------------------------------
# in-namespace helpers (run as ``python this_file.py CMD ...``)


def sniff_main(argv: list[str]) -> int:
    """sniff IFACE OUT: hex of every Ethernet frame carrying UDP 67/68, both directions, until killed."""
    iface, out = argv
    # ETH_P_ALL: dhcpcd sends from its own packet socket, and those frames reach an ETH_P_IP tap
    # without their protocol set
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    s.settimeout(0.2)
    Path(out + ".ready").write_text("1")
    with open(out, "a", buffering=1) as f:
        while True:
            try:
                frame = s.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack("!HH", frame[14 + ihl : 18 + ihl])
            if {sport, dport} & {67, 68}:
                f.write(frame.hex() + "\n")


def send_main(argv: list[str]) -> int:
    """send IFACE HEX...: broadcast each DHCP message from port 68 on IFACE."""
    iface, *hexes = argv
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, iface.encode())  # SO_BINDTODEVICE
    s.bind(("0.0.0.0", 68))
    for h in hexes:
        s.sendto(bytes.fromhex(h), ("255.255.255.255", 67))
    return 0


def _rx_queue(pid: int, port: int) -> int:
    """Bytes waiting in the receive queue of the UDP socket bound to ``port`` in the network namespace
    of process ``pid`` (/proc/PID/net/udp is that namespace's table)."""
    want = f":{port:04X}"
    worst = 0
    with open(f"/proc/{pid}/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want):
                worst = max(worst, int(fields[4].split(":")[1], 16))
    return worst


def fuzz_main(argv: list[str]) -> int:
    """fuzz SERVER N SEED PID: N fuzzed DHCP messages to SERVER:67, paced by the server's receive
    queue (process PID's namespace) so that the server parses every one instead of the kernel
    dropping them; prints the count."""
    server, n, seed, pid = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 68))
    t0 = time.monotonic()
    sent = waits = 0
    for i, data in enumerate(fuzz_packets(n, seed)):
        if i % 16 == 0:
            while _rx_queue(pid, 67) > 128 * 1024:  # ~60 datagrams' truesize; far below shedding
                waits += 1
                time.sleep(0.001)
        s.sendto(data, (server, 67))
        sent += 1
    print(f"sent {sent} in {time.monotonic() - t0:.1f}s (paused {waits} ms for the server)", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# fuzzed packets


def _seed_packets() -> list[bytes]:
    from bootsvc.dhcp.packet import Packet, encode_suboptions

    mac = bytes.fromhex("02bdf0000001")
    common = {55: bytes([1, 121, 33, 3, 6, 12, 15, 26, 28, 51, 54, 58, 59, 119, 66, 67, 43, 175]),
              57: b"\x02\x40", 61: b"\xff\x00\x00\x00\x01\x00\x04" + bytes(16),
              60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\x00\x07", 94: b"\x01\x03\x10",
              97: b"\x00" + bytes(range(16)), 77: b"iPXE", 175: b"\x13\x01\x01"}
    out = []
    for mt in (1, 3, 4, 7, 8):
        o = {53: bytes((mt,)), **common}
        if mt in (3, 4):
            o[50] = bytes((198, 18, 1, 7))
            o[54] = bytes((198, 18, 0, 1))
        out.append(Packet(op=1, xid=0x1234 + mt, chaddr=mac.ljust(16, b"\0"), options=o,
                          ciaddr=bytes((198, 18, 1, 7)) if mt in (7, 8) else bytes(4), flags=0x8000).encode())
    # relay agent information with VSS (RFC 3046, 6607), link selection (RFC 3527), override (RFC 5107)
    o = {53: b"\x01", 82: encode_suboptions([(1, b"port1"), (2, b"sw1"), (5, bytes((198, 18, 0, 0))),
                                             (11, bytes((198, 18, 0, 1))), (151, b"\x00blue"), (152, b"")])}
    out.append(Packet(op=1, xid=9, hops=1, giaddr=bytes((198, 18, 0, 2)), chaddr=mac.ljust(16, b"\0"),
                      options=o).encode())
    # option overload (RFC 2132 §9.3) and a long option split into instances (RFC 3396)
    raw = bytearray(Packet(op=1, xid=10, chaddr=mac.ljust(16, b"\0"), options={53: b"\x01", 52: b"\x03"}).encode())
    raw[108:236] = (bytes((12, 5)) + b"hostA" + b"\xff").ljust(128, b"\0")  # file
    raw[44:108] = (bytes((15, 3)) + b"x.y" + b"\xff").ljust(64, b"\0")  # sname
    out.append(bytes(raw))
    out.append(Packet(op=1, xid=11, chaddr=mac.ljust(16, b"\0"), options={53: b"\x01", 43: bytes(600)}).encode())
    return out


def _scapy_fuzz(n: int, seed: int) -> list[bytes]:
    """scapy's own fuzzer (random values in every field it knows), for ``n`` of the packets."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.packet import fuzz
    from scapy.volatile import RandNum

    random.seed(seed)
    RandNum.state = random.Random(seed)  # type: ignore[attr-defined]
    out = []
    for i in range(n):
        opts: list[Any] = [("message-type", 1 + i % 8), ("param_req_list", list(range(i % 60))),
                           ("max_dhcp_size", 200 + i % 2000), ("client_id", os.urandom(i % 40)), "end"]
        p = fuzz(BOOTP(op=1) / DHCP(options=opts))
        out.append(bytes(p))
    return out


def fuzz_packets(n: int, seed: int) -> Iterator[bytes]:
    """Mutations of real requests (bit flips, truncations, option TLV corruption, overload values,
    random options, hlen/htype) plus scapy ``fuzz()`` packets and noise; reproducible from ``seed``."""
    rnd = random.Random(seed)
    seeds = _seed_packets()
    scapy_part = _scapy_fuzz(min(2000, n // 20), seed)
    for i in range(n):
        k = i % 10
        if k == 0 and scapy_part:
            yield scapy_part[(i // 10) % len(scapy_part)]
            continue
        base = bytearray(rnd.choice(seeds))
        if k == 1:
            yield rnd.randbytes(rnd.randrange(0, 700))
            continue
        # a fresh chaddr most of the time, so per-client rate limits do not hide the parser
        base[28:34] = b"\x02" + rnd.randbytes(5)
        if k == 2:
            for _ in range(rnd.randrange(1, 10)):
                j = rnd.randrange(len(base))
                base[j] ^= 1 << rnd.randrange(8)
        elif k == 3:
            base = base[: rnd.randrange(200, len(base))]
        elif k == 4:  # corrupt an option length inside the options area
            j = rnd.randrange(241, min(len(base), 300))
            base[j] = rnd.choice((0, 1, 2, 4, 0x7F, 0xFF))
        elif k == 5:  # random TLVs, some of them claiming more than is there
            tail = b"".join(bytes((rnd.randrange(1, 255), rnd.randrange(0, 40))) + rnd.randbytes(rnd.randrange(0, 40))
                            for _ in range(rnd.randrange(1, 12)))
            base = base[:243] + tail + (b"\xff" if rnd.random() < 0.7 else b"")
        elif k == 6:  # option overload with any value and garbage in file/sname
            base = base[:240] + bytes((53, 1, rnd.randrange(0, 10), 52, 1, rnd.randrange(0, 6))) + base[240:]
            base[44:236] = rnd.randbytes(192)
        elif k == 7:  # header fields
            base[0] = rnd.choice((1, 2, 3, 0))
            base[1] = rnd.choice((1, 6, 32, 0))
            base[2] = rnd.choice((6, 0, 16, 17, 255))
            base[3] = rnd.randrange(256)
        elif k == 8:  # message types and 57 values at the edges
            base = base[:240] + bytes((53, 1, rnd.randrange(0, 20), 57, 2)) + struct.pack(
                "!H", rnd.choice((0, 1, 575, 576, 577, 1500, 65535))) + base[240:]
        else:  # long options (RFC 3396 concatenation), options 82/43/175 with garbage sub-options
            code = rnd.choice((82, 43, 175, 61, 55, 77, 124, 125))
            val = rnd.randbytes(rnd.randrange(0, 600))
            parts = b"".join(bytes((code, len(val[j:j + 255]))) + val[j:j + 255] for j in range(0, len(val), 255))
            base = base[:243] + parts + base[243:]
        yield bytes(base[:1500])


# ------------------------------------------------------------------------------------------------
# the lab


class Lab:
    def __init__(self, base: Path) -> None:
        t = uuid.uuid4().hex[:4]
        self.t = t
        self.nets = (Netns(name=f"bdk{t}s"), Netns(name=f"bdk{t}c"))
        self.s, self.c = (n.name for n in self.nets)
        self.sif, self.cif = f"bdk{t}s0", f"bdk{t}c0"
        self.base = base
        self.db = base / "b.db"
        self.cfg = base / "cfg.yaml"
        self.log = base / "server.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.server: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        s, c = (n.add() for n in self.nets)
        veth(s, self.sif, c, self.cif, a_addr=f"{SERVER}/16", b_mac=CLIENT_MAC)
        self.cfg.write_text(f"""
database: {{url: "sqlite:///{self.db}"}}
networks:
  - {{name: lan, zone: 0, cidr: 198.18.0.0/16, gateway: {SERVER}, boot_server: {SERVER},
     dns_servers: [{SERVER}], domain: bd.test, lease_seconds: 600,
     pools: [{{start: 198.18.1.0, end: 198.18.255.250}}]}}
listeners:
  dhcp: [{{interface: {self.sif}}}]
dhcp: {{unknown_clients: serve, per_mac_rate: 50, per_relay_rate: 100000, offer_ttl_seconds: 5}}
""")
        with open(self.log, "ab") as log:
            p = subprocess.Popen(["ip", "netns", "exec", self.s, PY, "-m", "bootsvc.dhcp.server", str(self.cfg),
                                  "--create-schema", "--log-level", "INFO"], cwd=str(ROOT), stdout=log, stderr=log)
        self.procs.append(p)
        self.server = p
        wait_for(lambda: ":67" in sh("ip", "netns", "exec", self.s, "ss", "-Hlun", "sport = :67").stdout, 20,
                 "bootsvc DHCP to listen")

    def down(self) -> None:
        for p in reversed(self.procs):
            stop(p, grace=5)
        # anything dhcpcd left in the client namespace (its privileged proxy, listener), by PID
        for n in reversed(self.nets):
            for pid in sh("ip", "netns", "pids", n.name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            n.delete()
        for f in Path("/var/lib/dhcpcd").glob(f"{self.cif}*"):
            f.unlink(missing_ok=True)

    def in_client(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.c, *cmd], capture_output=True, text=True,
                              timeout=timeout, cwd=str(ROOT))

    def sniffer(self, name: str) -> Path:
        out = self.base / f"{name}.hex"
        p = subprocess.Popen(["ip", "netns", "exec", self.c, PY, __file__, "sniff", self.cif, str(out)],
                             cwd=str(ROOT))
        self.procs.append(p)
        wait_for(lambda: Path(str(out) + ".ready").exists(), 10, "the sniffer")
        return out

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=5)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab(tmp_path_factory.mktemp("dhcpconf"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
    assert "Traceback" not in lab.logtext(), lab.logtext()[-3000:]


def frames(path: Path) -> list[Any]:
    from scapy.layers.l2 import Ether

    return [Ether(bytes.fromhex(line)) for line in path.read_text().split()]


def dhcp_codes(pkt: Any) -> list[int]:
    from scapy.layers.dhcp import DHCP, DHCPRevOptions

    out = []
    for o in pkt[DHCP].options:
        if isinstance(o, tuple):
            out.append(o[0] if isinstance(o[0], int) else DHCPRevOptions[o[0]][0])
    return out


def dhcp_opt(pkt: Any, name: str) -> Any:
    from scapy.layers.dhcp import DHCP

    for o in pkt[DHCP].options:
        if isinstance(o, tuple) and o[0] == name:
            return o[1]
    return None


def _msgs(path: Path, mt: int, op: int) -> list[Any]:
    from scapy.layers.dhcp import BOOTP, DHCP

    return [f for f in frames(path) if f.haslayer(DHCP) and f[BOOTP].op == op and dhcp_opt(f, "message-type") == mt]


def dhcpcd(lab: Lab, clientid: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("dhcpcd")
    if exe is None:
        pytest.skip("dhcpcd not installed (Makefile APT_TEST: dhcpcd-base)")
    for f in Path("/var/lib/dhcpcd").glob(f"{lab.cif}*"):
        f.unlink()  # no INIT-REBOOT from an earlier run's lease file
    # -1 one shot, -B foreground, -A no ARP probe, -c /bin/true: no hook script may touch this host
    # (hostname, resolv.conf); -I: the client identifier to send (option 61)
    return lab.in_client(exe, "-4", "-1", "-B", "-A", "-d", "-c", "/bin/true", "-t", "20", "-I", clientid,
                         "-j", str(lab.base / "dhcpcd.log"), lab.cif, timeout=40)


# ------------------------------------------------------------------------------------------------
# tests


def test_dhcpcd_two_client_identifiers_on_one_nic_get_two_addresses(lab: Lab) -> None:
    """RFC 2131 §2: "the client identifier ... MUST be used by the server to identify the client"
    when present: two dhcpcd instances (two identifiers) behind one MAC get two addresses, both
    bound. Each reply is in the order of dhcpcd's parameter request list (RFC 2132 §9.8) and fits
    the option 57 size it announced (RFC 2132 §9.10)."""
    from scapy.layers.dhcp import BOOTP
    from scapy.layers.inet import IP

    cap = lab.sniffer("dhcpcd")
    try:
        r1 = dhcpcd(lab, "ff:00:00:00:01:00:01:aa:bb")
        assert r1.returncode == 0, r1.stdout + r1.stderr
        a1 = lab.in_client("ip", "-4", "-o", "addr", "show", lab.cif).stdout
        lab.in_client("ip", "addr", "flush", "dev", lab.cif)
        r2 = dhcpcd(lab, "ff:00:00:00:02:00:01:cc:dd")
        assert r2.returncode == 0, r2.stdout + r2.stderr
        a2 = lab.in_client("ip", "-4", "-o", "addr", "show", lab.cif).stdout
        lab.in_client("ip", "addr", "flush", "dev", lab.cif)
    finally:
        lab.stop(lab.procs.pop())
    first, second = (x.split()[3].split("/")[0] for x in (a1, a2))
    assert first != second, (a1, a2)
    import sqlite3

    con = sqlite3.connect(lab.db)
    rows = dict(con.execute("SELECT client_id, address FROM leases WHERE mac = ? AND state = 'bound'",
                            (CLIENT_MAC,)).fetchall())
    con.close()
    assert rows == {"ff000000010001aabb": first, "ff000000020001ccdd": second}
    # what went over the wire, decoded by scapy
    requests = {f[BOOTP].xid: f for f in _msgs(cap, 1, 1) + _msgs(cap, 3, 1)}
    replies = _msgs(cap, 2, 2) + _msgs(cap, 5, 2)
    assert len(replies) >= 4
    for rep in replies:
        req = requests[rep[BOOTP].xid]
        prl = list(dhcp_opt(req, "param_req_list"))
        got = dhcp_codes(rep)
        assert got[:2] == [53, 54], got
        # 53 and 54 lead (as ISC dhcpd, Kea and dnsmasq send them), then the client's order
        asked = [c for c in got[2:] if c in prl]
        assert asked == [c for c in prl if c in got[2:]], (prl, got)
        assert got[2 : 2 + len(asked)] == asked  # requested options before any other
        mms = dhcp_opt(req, "max_dhcp_size") or 576
        assert rep[IP].len <= max(576, mms), (rep[IP].len, mms)
        assert dhcp_opt(rep, "client_id") == dhcp_opt(req, "client_id")  # RFC 6842


def test_nmap_broadcast_discover_and_inform(lab: Lab) -> None:
    if shutil.which("nmap") is None:
        pytest.skip("nmap not installed")
    # nmap picks its source from the interface's address: give it one (nmap's DISCOVER still asks
    # for a lease for a random MAC, broadcast)
    lab.in_client("ip", "addr", "add", "198.18.9.9/16", "dev", lab.cif)
    try:
        r = lab.in_client("nmap", "-n", "--script", "broadcast-dhcp-discover", "--script-args",
                          "broadcast-dhcp-discover.timeout=5", "-e", lab.cif, timeout=60)
        out = r.stdout
        assert "DHCP Message Type: DHCPOFFER" in out and f"Server Identifier: {SERVER}" in out, out
        assert "IP Offered: 198.18." in out and "IP Address Lease Time: 10m00s" in out
        # DHCPINFORM (nmap's dhcp-discover default) from a configured address: ACK, no lease time
        # (RFC 2131 §4.3.5 "MUST NOT send a lease expiration time")
        r = lab.in_client("nmap", "-n", "-sU", "-p67", "--script", "dhcp-discover", SERVER, timeout=60)
    finally:
        lab.in_client("ip", "addr", "del", "198.18.9.9/16", "dev", lab.cif)
    out = r.stdout
    assert "DHCP Message Type: DHCPACK" in out and f"Server Identifier: {SERVER}" in out, out
    assert "Lease Time" not in out and "Subnet Mask: 255.255.0.0" in out


@pytest.mark.parametrize("mms", [None, 576, 700])
def test_hand_built_reply_fits_the_ip_datagram_option_57_allows(lab: Lab, mms: int | None) -> None:
    """A client identifier of 253 bytes (echoed, RFC 6842) makes the OFFER 550 bytes of DHCP payload:
    over the 548 a 576-byte datagram leaves. The server overloads file/sname (RFC 2131 §4.1) so the
    IP datagram on the wire is at most 576 (or the larger option 57), and keeps every option."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP

    from bootsvc.dhcp.packet import parse as own_parse  # only to reassemble overloaded areas

    xid = random.randrange(1 << 30)
    opts: list[Any] = [("message-type", "discover"), ("param_req_list", [1, 3, 6, 15, 28, 51, 54]),
                       ("client_id", b"\x00" + b"c" * 252)]
    if mms is not None:
        opts.append(("max_dhcp_size", mms))
    mac = bytes.fromhex(f"02bd0000aa0{0 if mms is None else 1 if mms == 576 else 2}")
    req = BOOTP(op=1, xid=xid, chaddr=mac + bytes(10), flags=0x8000) / DHCP(options=[*opts, "end"])
    cap = lab.sniffer(f"big{mms}")
    try:
        lab.in_client(PY, __file__, "send", lab.cif, bytes(req).hex())
        wait_for(lambda: [f for f in _msgs(cap, 2, 2) if f[BOOTP].xid == xid], 10, "the OFFER")
    finally:
        lab.stop(lab.procs.pop())
    (offer,) = [f for f in _msgs(cap, 2, 2) if f[BOOTP].xid == xid]
    limit = max(576, mms or 576)
    assert offer[IP].len <= limit and len(offer[UDP].payload) + 28 == offer[IP].len
    if limit == 576:
        assert dhcp_opt(offer, "dhcp-option-overload") in (1, 2, 3)
    p = own_parse(bytes(offer[UDP].payload))
    assert p.options[61] == b"\x00" + b"c" * 252 and p.options[15] == b"bd.test" and 51 in p.options


def test_fuzz_100k_packets_then_a_real_client_still_gets_a_lease(lab: Lab) -> None:
    def nstat() -> dict[str, int]:
        out = sh("ip", "netns", "exec", lab.s, "nstat", "-az", "UdpInDatagrams", "UdpRcvbufErrors").stdout
        return {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln and not ln.startswith("#")}

    total = 100_000
    before = nstat()
    lab.in_client("ip", "addr", "add", "198.18.9.10/16", "dev", lab.cif)
    try:
        assert lab.server is not None
        r = lab.in_client(PY, __file__, "fuzz", SERVER, str(total), "14", str(lab.server.pid), timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        lab.in_client("ip", "addr", "del", "198.18.9.10/16", "dev", lab.cif)
    assert lab.server is not None and lab.server.poll() is None, "the server died"
    after = nstat()
    got = after.get("UdpInDatagrams", 0) - before.get("UdpInDatagrams", 0)
    lost = after.get("UdpRcvbufErrors", 0) - before.get("UdpRcvbufErrors", 0)
    log = lab.logtext()
    print(f"\nDHCP fuzz: {r.stdout.strip()}; server namespace UDP datagrams in {got}, "
          f"receive-buffer drops {lost}; 'unexpected error' lines {log.count('unexpected error')}")
    assert "Traceback" not in log and "unexpected error" not in log
    assert got >= total and lost == 0
    # a real client afterwards
    r2 = dhcpcd(lab, "ff:00:00:00:03:00:01:ee:ff")
    assert r2.returncode == 0 and "leased 198.18." in r2.stdout + r2.stderr + (
        lab.base / "dhcpcd.log").read_text(), r2.stdout + r2.stderr
    lab.in_client("ip", "addr", "flush", "dev", lab.cif)


if __name__ == "__main__":
    cmds = {"sniff": sniff_main, "send": send_main, "fuzz": fuzz_main}
    sys.exit(cmds[sys.argv[1]](sys.argv[2:]))
