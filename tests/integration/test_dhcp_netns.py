"""bootsvc's DHCP server against real clients in network namespaces the tests create (prefix ``bd``).

Topology (per test, torn down by the fixture):

    bd<t>c  (dhclient/udhcpc)  bd<t>c0 ---- bd<t>s0 198.18.30.1/24   bd<t>s (bootsvc DHCP)
                                            bd<t>s1 198.18.31.1/24 ---- bd<t>r1 198.18.31.2  bd<t>r (relay:
    bd<t>h  (udhcpc)           bd<t>h0 ---- bd<t>r2 198.18.32.1/24  (dhcrelay -a, or the raw relay client)

Covers: DORA, renew and release with busybox udhcpc and ISC dhclient; the same through ISC
``dhcrelay -a`` (giaddr honoured, option 82 echoed); two VSS-tagged clients in two VRFs getting the
same address; kill -9 during a load run loses no ACKed lease.

This module is also the raw relay-mode client (``python test_dhcp_netns.py relay-client ...``) the
VSS and kill -9 tests run inside a namespace.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.*, when run as a script (relay-client, sniff)

from helpers.netns import Netns, sh, veth  # noqa: E402
from helpers.waits import wait_for  # noqa: E402

from bootsvc.dhcp.packet import (  # noqa: E402
    Packet,
    encode_suboptions,
    ip_bytes,
    ip_str,
    parse,
    parse_suboptions,
)

PY = sys.executable


# ------------------------------------------------------------------------------------------------
# raw relay-mode client (runs inside a namespace)


def relay_dora(sock: socket.socket, server: str, giaddr: str, mac: bytes, subs: list[tuple[int, bytes]],
               xid: int, timeout: float = 2.0) -> tuple[Packet | None, Packet | None]:
    """One DISCOVER/OFFER/REQUEST/ACK as a relay agent would forward it (giaddr, option 82)."""
    def send(mt: int, extra: dict[int, bytes]) -> None:
        o = {53: bytes((mt,)), 55: bytes([1, 3, 6, 51, 54]), 61: b"\x01" + mac}
        o.update(extra)
        if subs:
            o[82] = encode_suboptions(subs)
        sock.sendto(Packet(op=1, xid=xid, hops=1, giaddr=ip_bytes(giaddr), chaddr=mac.ljust(16, b"\0"),
                           options=o).encode(), (server, 67))

    def recv(mt: int) -> Packet | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, _ = sock.recvfrom(4096)
            except TimeoutError:
                return None
            p = parse(data)
            if p.xid == xid and p.msg_type == mt:
                return p
        return None

    send(1, {})
    offer = recv(2)
    if offer is None:
        return None, None
    send(3, {50: offer.yiaddr, 54: offer.options[54]})
    return offer, recv(5)


def relay_burst(sock: socket.socket, server: str, giaddr: str, macs: list[bytes], timeout: float,
                db: str | None = None) -> list[dict[str, object]]:
    """Pipelined relay traffic: every DISCOVER back to back, then a REQUEST for each OFFER as it
    arrives; returns one record per ACK. With ``db`` (the server's SQLite file) each record says
    whether the ACKed lease was already a bound row when the ACK was read."""
    import sqlite3 as _sqlite

    con = _sqlite.connect(db) if db else None
    xids = {0x20000 + i: m for i, m in enumerate(macs)}

    def send(mt: int, xid: int, extra: dict[int, bytes]) -> None:
        o = {53: bytes((mt,)), 55: bytes([1, 3, 6, 51, 54])}
        o.update(extra)
        sock.sendto(Packet(op=1, xid=xid, hops=1, giaddr=ip_bytes(giaddr), chaddr=xids[xid].ljust(16, b"\0"),
                           options=o).encode(), (server, 67))

    for xid in xids:
        send(1, xid, {})
    acks: dict[int, dict[str, object]] = {}
    end = time.monotonic() + timeout
    while len(acks) < len(xids) and time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            data, _ = sock.recvfrom(4096)
        except TimeoutError:
            break
        p = parse(data)
        if p.xid not in xids:
            continue
        if p.msg_type == 2:
            send(3, p.xid, {50: p.yiaddr, 54: p.options[54]})
        elif p.msg_type == 5 and p.xid not in acks:
            mac, addr = xids[p.xid].hex(":"), ip_str(p.yiaddr)
            durable = None
            if con is not None:
                durable = con.execute("SELECT count(*) FROM leases WHERE mac = ? AND address = ? AND state = "
                                      "'bound'", (mac, addr)).fetchone()[0] == 1
            acks[p.xid] = {"mac": mac, "address": addr, "durable": durable}
    if con is not None:
        con.close()
    return list(acks.values())


def relay_client_main(argv: list[str]) -> int:
    """relay-client SERVER GIADDR OUT [--vss VRF --link NET] [--count N --rate R --seconds S]
    Writes one JSON line per ACK (mac, address, option 82 sub-option codes) to OUT, flushed at once."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("giaddr")
    ap.add_argument("out")
    ap.add_argument("--vss")
    ap.add_argument("--link")
    ap.add_argument("--mac-base", type=lambda s: int(s, 16), default=0x02BD00000000)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--burst", action="store_true", help="all --count clients at once (relay_burst)")
    ap.add_argument("--db", help="with --burst: the server's SQLite file, checked as each ACK arrives")
    a = ap.parse_args(argv)
    subs: list[tuple[int, bytes]] = [(1, b"bdtest-port")]
    if a.link:
        subs.append((5, ip_bytes(a.link)))
    if a.vss:
        subs += [(151, b"\x00" + a.vss.encode()), (152, b"")]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.giaddr, 67))
    if a.burst:
        # room for every reply of the burst (the server must not be blamed for our socket's drops)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        macs = [(a.mac_base + i).to_bytes(6, "big") for i in range(a.count)]
        with open(a.out, "a", buffering=1) as out:
            for rec in relay_burst(s, a.server, a.giaddr, macs, a.seconds, a.db):
                out.write(json.dumps(rec) + "\n")
        return 0
    end = time.monotonic() + a.seconds
    with open(a.out, "a", buffering=1) as out:
        for i in range(a.count):
            if time.monotonic() > end:
                break
            mac = (a.mac_base + i).to_bytes(6, "big")
            _offer, ack = relay_dora(s, a.server, a.giaddr, mac, subs, 0x10000 + i, a.timeout)
            if ack is not None:
                codes = [c for c, _ in parse_suboptions(ack.options.get(82, b""))]
                out.write(json.dumps({"mac": mac.hex(":"), "address": ip_str(ack.yiaddr), "sub82": codes,
                                      "server_id": ip_str(ack.options[54])}) + "\n")
    return 0


def sniff_main(argv: list[str]) -> int:
    """sniff IFACE OUT SECONDS: write the hex of every UDP payload from port 67 seen on IFACE."""
    iface, out, secs = argv[0], argv[1], float(argv[2])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((iface, 0))
    s.settimeout(0.2)
    end = time.monotonic() + secs
    Path(out + ".ready").write_text("1")
    with open(out, "a", buffering=1) as f:
        while time.monotonic() < end:
            try:
                frame = s.recv(4096)
            except TimeoutError:
                continue
            if len(frame) < 42 or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            udp = frame[14 + ihl:]
            if int.from_bytes(udp[0:2], "big") == 67:
                f.write(udp[8:].hex() + "\n")
    return 0


# ------------------------------------------------------------------------------------------------
# the lab fixture


class Lab:
    def __init__(self, base: Path) -> None:
        t = uuid.uuid4().hex[:4]
        self.t = t
        self.nets = [Netns(name=f"bd{t}{x}") for x in "scrh"]
        self.s, self.c, self.r, self.h = (n.name for n in self.nets)
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.db = base / "bootsvc.db"
        self.cfg = base / "bootsvc.yaml"
        self.log = base / "server.log"
        self.server: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        t = self.t
        s, c, r, h = (n.add() for n in self.nets)
        veth(s, f"bd{t}s0", c, f"bd{t}c0", a_addr="198.18.30.1/24", b_mac="02:bd:00:00:00:01")
        veth(s, f"bd{t}s1", r, f"bd{t}r1", a_addr="198.18.31.1/24", b_addr="198.18.31.2/24")
        veth(r, f"bd{t}r2", h, f"bd{t}h0", a_addr="198.18.32.1/24", b_mac="02:bd:00:00:00:02")
        s.ip("route", "add", "198.18.32.0/24", "via", "198.18.31.2")
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    def down(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            p.wait()
        for n in self.nets:
            n.delete()

    def write_config(self, unknown: str = "discover") -> None:
        t = self.t
        self.cfg.write_text(f"""
database: {{url: "sqlite:///{self.db}"}}
tenants:
  - {{name: blue, vrf: blue, l3vni: 1001}}
  - {{name: red, vrf: red, l3vni: 1002}}
networks:
  - {{name: lan, zone: 0, cidr: 198.18.30.0/24, gateway: 198.18.30.1, boot_server: 198.18.30.1,
     pools: [{{start: 198.18.30.100, end: 198.18.30.199}}], lease_seconds: 60, domain: bd.test}}
  - {{name: rack, zone: 0, cidr: 198.18.32.0/24, gateway: 198.18.32.1, boot_server: 198.18.31.1,
     relays: [198.18.32.1], pools: [{{start: 198.18.32.100, end: 198.18.32.199}}], lease_seconds: 60}}
  - {{name: transit, zone: 0, cidr: 198.18.31.0/24, boot_server: 198.18.31.1,
     pools: [{{start: 198.18.31.100, end: 198.18.31.199}}], lease_seconds: 600}}
  - {{name: blue-hosts, zone: 1, vrf: blue, cidr: 172.20.0.0/24, gateway: 172.20.0.1, boot_server: 198.18.31.1,
     pools: [{{start: 172.20.0.100, end: 172.20.0.199}}], lease_seconds: 600}}
  - {{name: red-hosts, zone: 1, vrf: red, cidr: 172.20.0.0/24, gateway: 172.20.0.1, boot_server: 198.18.31.1,
     pools: [{{start: 172.20.0.100, end: 172.20.0.199}}], lease_seconds: 600}}
listeners:
  dhcp: [{{interface: bd{t}s0}}, {{interface: bd{t}s1}}]
dhcp: {{unknown_clients: {unknown}, per_relay_rate: 100000, per_mac_rate: 50, discovery_lease_seconds: 60}}
boot: {{http_port: 8080}}
""")

    def enroll(self, name: str, mac: str) -> None:
        code = (
            "import sys; sys.path.insert(0, {!r})\n"
            "from bootsvc import db, inventory\n"
            "from bootsvc.models import Base\n"
            "e = db.make_engine({!r}); Base.metadata.create_all(e)\n"
            "with db.session_factory(e)() as s:\n"
            "    inventory.enroll(s, [inventory.NodeSpec(name={!r}, kind='dpu', serial={!r},"
            " nics=[inventory.NicSpec(mac={!r}, role='oob')])], actor='test')\n"
        ).format(str(ROOT), f"sqlite:///{self.db}", name, "SN-" + name, mac)
        subprocess.run([PY, "-c", code], check=True)

    def start_server(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            p = subprocess.Popen(["ip", "netns", "exec", self.s, PY, "-m", "bootsvc.dhcp.server", str(self.cfg),
                                  "--create-schema", "--log-level", "INFO"], cwd=str(ROOT), stdout=log,
                                 stderr=log)
        self.procs.append(p)
        self.server = p

        def listening() -> bool:
            out = sh("ip", "netns", "exec", self.s, "ss", "-Hlun", "sport = :67", check=False).stdout
            return out.count(":67") >= 2

        wait_for(listening, 20, "bootsvc DHCP to listen on both interfaces")
        return p

    def spawn(self, ns: str, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def leases(self) -> list[dict[str, object]]:
        con = sqlite3.connect(self.db)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM leases")]
        finally:
            con.close()

    def lease(self, mac: str, state: str | None = None) -> dict[str, object] | None:
        for r in self.leases():
            if r["mac"] == mac and (state is None or r["state"] == state):
                return r
        return None

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("udhcpc", "dhclient", "dhcrelay"):
        if not any((Path(d) / tool).exists() for d in ("/usr/sbin", "/sbin", "/usr/bin")):
            pytest.skip(f"{tool} not installed")
    lab = Lab(tmp_path)
    try:
        lab.up()
        lab.write_config()
        yield lab
    finally:
        lab.down()


UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 ip=$ip hostname=$hostname" >> {events}
case "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"
  [ -n "$router" ] && ip route replace default via "${{router%% *}}" dev "$interface";; esac
"""


def events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def udhcpc(lab: Lab, ns: str, iface: str, *, tries: int, wait: int) -> tuple[subprocess.Popen[bytes], Path]:
    """busybox udhcpc in the foreground on ``iface`` (release on exit, ``tries`` DISCOVERs ``wait`` s apart);
    its script appends one line per event ("bound ip=... hostname=...") to the returned file."""
    ev = lab.base / "udhcpc.events"
    script = lab.base / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(events=ev))
    script.chmod(0o755)
    p = lab.spawn(ns, "busybox", "udhcpc", "-f", "-i", iface, "-R", "-s", str(script), "-t", str(tries),
                  "-T", str(wait), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, ev


pytestmark = pytest.mark.netns


def test_udhcpc_obtain_renew_release(lab: Lab) -> None:
    mac = "02:bd:00:00:00:01"
    lab.enroll("dpu-udhcpc", mac)
    lab.start_server()
    p, ev = udhcpc(lab, lab.c, f"bd{lab.t}c0", tries=5, wait=1)
    wait_for(lambda: any(e.startswith("bound") for e in events(ev)), 20, "udhcpc bound")
    bound = next(e for e in events(ev) if e.startswith("bound"))
    assert "ip=198.18.30.1" in bound and "hostname=dpu-udhcpc" in bound  # option 12 for known nodes
    row = lab.lease(mac, "bound")
    assert row is not None and str(row["address"]).startswith("198.18.30.1")
    assert row["network"] == "lan" and row["node_id"] is not None
    # renew: udhcpc unicasts a REQUEST with ciaddr to the server identifier (RENEWING)
    p.send_signal(signal.SIGUSR1)
    wait_for(lambda: any(e.startswith("renew") for e in events(ev)), 15, "udhcpc renew")
    wait_for(lambda: "state=renewing outcome=ack" in lab.logtext(), 5, "a RENEWING ack in the log")
    # release on exit (-R)
    p.send_signal(signal.SIGTERM)
    p.wait(10)
    wait_for(lambda: lab.lease(mac, "released"), 10, "the lease released in the database")


def test_dhclient_obtain_reboot_release(lab: Lab) -> None:
    mac = "02:bd:00:00:00:01"
    lab.enroll("dpu-dhclient", mac)
    lab.start_server()
    lf, pf = lab.base / "dhclient.leases", lab.base / "dhclient.pid"
    args = ["-v", "-pf", str(pf), "-lf", str(lf), f"bd{lab.t}c0"]

    def dhclient(*extra: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", lab.c, "timeout", "40", "dhclient", *extra, *args],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]

    dhclient("-1")  # DORA; dhclient daemonizes once bound
    row = lab.lease(mac, "bound")
    assert row is not None
    addr = row["address"]
    assert f"fixed-address {addr};" in lf.read_text()
    dhclient("-x")  # stop without releasing: the lease stays in dhclient's lease file
    dhclient("-1")  # INIT-REBOOT from the lease file: REQUEST with option 50, no server id
    assert "state=init-reboot outcome=ack" in lab.logtext()
    row2 = lab.lease(mac, "bound")
    assert row2 is not None and row2["address"] == addr
    dhclient("-r")  # RELEASE (and stop the daemon)
    wait_for(lambda: lab.lease(mac, "released"), 10, "released row")
    # the decision line is written after the commit that makes the row visible (server._flush)
    wait_for(lambda: "state=release outcome=released" in lab.logtext(), 5, "the release line in the log")


def test_dhcrelay_giaddr_and_option82(lab: Lab) -> None:
    mac = "02:bd:00:00:00:02"  # not enrolled: unknown_clients=discover gives a short lease + a record
    lab.start_server()
    with open(lab.base / "relay.log", "wb") as rlog:
        relay = lab.spawn(lab.r, "dhcrelay", "-4", "-d", "-a", "-i", f"bd{lab.t}r2", "-i", f"bd{lab.t}r1",
                          "198.18.31.1", stdout=subprocess.DEVNULL, stderr=rlog)
    sniffed = lab.base / "sniffed.hex"
    cap = lab.spawn(lab.r, PY, __file__, "sniff", f"bd{lab.t}r1", str(sniffed), "60")
    wait_for(lambda: Path(str(sniffed) + ".ready").exists(), 20, "sniffer running")
    # ISC dhcrelay -d names each socket it opened, the fallback (UDP 67) last, then relays
    wait_for(lambda: "Socket/fallback" in (lab.base / "relay.log").read_text(errors="replace"), 10,
             "dhcrelay to open its sockets")
    p, ev = udhcpc(lab, lab.h, f"bd{lab.t}h0", tries=8, wait=2)
    wait_for(lambda: any(e.startswith("bound") for e in events(ev)), 30, "udhcpc bound through the relay")
    assert any(e.startswith("bound ip=198.18.32.1") for e in events(ev))
    row = lab.lease(mac, "bound")
    assert row is not None and row["network"] == "rack"
    assert row["relay"] == "198.18.32.1" and row["circuit_id"] == f"bd{lab.t}r2"  # dhcrelay -a circuit-id
    # RENEW: unicast from the client straight to the server identifier (routed via the relay
    # router, no giaddr); the server finds the client's network by ciaddr, not by its interface
    p.send_signal(signal.SIGUSR1)
    wait_for(lambda: any(e.startswith("renew") for e in events(ev)), 15, "udhcpc renew through routing")
    wait_for(lambda: "state=renewing outcome=ack addr=198.18.32.100 net=rack vrf= relay=-" in lab.logtext(), 5,
             "a RENEWING ack for a unicast without giaddr")
    p.send_signal(signal.SIGTERM)
    p.wait(10)
    wait_for(lambda: lab.lease(mac, "released"), 10, "released through routing")
    relay.send_signal(signal.SIGTERM)
    # every reply the server sent to the relay carries the relay's option 82 back (RFC 3046 §2.2)
    wait_for(lambda: sniffed.exists() and len(sniffed.read_text().splitlines()) >= 2, 10, "2 sniffed replies")
    cap.kill()
    seen = [parse(bytes.fromhex(x)) for x in sniffed.read_text().split()]
    replies = [r for r in seen if r.op == 2 and r.giaddr != bytes(4)]  # the RENEW ACK goes direct
    assert len(replies) >= 2  # OFFER and ACK
    assert {r.giaddr for r in replies} == {ip_bytes("198.18.32.1")}  # no NAK to a re-relayed RENEW copy
    assert not [r for r in seen if r.msg_type == 6]
    for rp in replies:
        subs = dict(parse_suboptions(rp.options[82]))
        assert subs[1] == f"bd{lab.t}r2".encode()

    def discovered() -> list[tuple[str, str, str]]:
        con = sqlite3.connect(lab.db)
        try:
            return con.execute("SELECT mac, circuit_id, relay FROM discovered").fetchall()
        finally:
            con.close()

    # unknown clients are recorded off the packet path, by the maintenance thread (every 2 s)
    wait_for(lambda: (mac, f"bd{lab.t}r2", "198.18.32.1") in discovered(), 10, "the discovered row")


def test_vss_same_address_in_two_vrfs(lab: Lab) -> None:
    lab.start_server()
    outs = []
    for vrf, base in (("blue", "02bd0000b000"), ("red", "02bd0000c000")):
        out = lab.base / f"{vrf}.jsonl"
        r = subprocess.run(["ip", "netns", "exec", lab.r, PY, __file__, "relay-client", "198.18.31.1",
                            "198.18.31.2", str(out), "--vss", vrf, "--link", "172.20.0.0", "--mac-base", base,
                            "--timeout", "3"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        outs.append([json.loads(x) for x in out.read_text().splitlines()])
    (blue,), (red,) = outs
    assert blue["address"] == red["address"] == "172.20.0.100"  # the same address, two VRFs
    assert blue["mac"] != red["mac"]
    for ack in (blue, red):
        assert 152 not in ack["sub82"] and 151 in ack["sub82"]  # VSS understood (RFC 6607)
    rows = {(r["vrf"], r["address"], r["mac"]) for r in lab.leases() if r["state"] == "bound"}
    assert ("blue", "172.20.0.100", blue["mac"]) in rows and ("red", "172.20.0.100", red["mac"]) in rows
    # an unknown VRF is dropped, never served from the global pool
    out = lab.base / "green.jsonl"
    subprocess.run(["ip", "netns", "exec", lab.r, PY, __file__, "relay-client", "198.18.31.1", "198.18.31.2",
                    str(out), "--vss", "green", "--link", "172.20.0.0", "--timeout", "1"], timeout=60, check=True)
    assert not out.exists() or out.read_text() == ""


def test_pipelined_burst_every_ack_after_its_commit(lab: Lab) -> None:
    """A relay forwarding 90 clients at once (most of the transit pool's 100): the server takes them
    in coalesced passes and paces each group commit's ACKs out between later packets - every client
    still gets its ACK, every ACK leaves only after its lease row is committed, and no address is
    given twice."""
    lab.start_server()
    out = lab.base / "burst.jsonl"
    r = subprocess.run(["ip", "netns", "exec", lab.r, PY, __file__, "relay-client", "198.18.31.1", "198.18.31.2",
                        str(out), "--burst", "--count", "90", "--seconds", "20", "--db", str(lab.db),
                        "--mac-base", "02bd0000d000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    acks = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(acks) == 90, f"{90 - len(acks)} of 90 clients got no ACK; server log:\n{lab.logtext()[-2000:]}"
    assert all(a["durable"] for a in acks), [a for a in acks if not a["durable"]][:5]
    assert len({a["address"] for a in acks}) == 90


def test_kill9_loses_no_acked_lease(lab: Lab) -> None:
    server = lab.start_server()
    out = lab.base / "acks.jsonl"
    client = lab.spawn(lab.r, PY, __file__, "relay-client", "198.18.31.1", "198.18.31.2", str(out),
                       "--count", "100000", "--seconds", "8", "--timeout", "0.3",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 40, 30, "40 ACKs")
    os.kill(server.pid, signal.SIGKILL)  # ip netns exec execs the server: this PID is the python
    server.wait(10)
    client.wait(30)
    acked = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(acked) >= 40
    rows = {(r["mac"], r["address"]) for r in lab.leases() if r["state"] == "bound"}
    missing = [a for a in acked if (a["mac"], a["address"]) not in rows]
    assert not missing, f"{len(missing)} ACKed leases not in the database: {missing[:5]}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay-client":
        raise SystemExit(relay_client_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "sniff":
        raise SystemExit(sniff_main(sys.argv[2:]))
