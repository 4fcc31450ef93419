"""Two bootsvc DHCP servers (two processes) on one PostgreSQL answering the same relayed clients.

Topology (per test, namespaces ``bd2<t>{a,b,r}`` owned and removed by the fixture):

    bd2<t>a  bootsvc A (instance 0 of 2)  198.18.41.1 ---- 198.18.41.2
                                                              bd2<t>r  the relay: client link 198.18.44.1
    bd2<t>b  bootsvc B (instance 1 of 2)  198.18.42.1 ---- 198.18.42.2    (on lo), two helper addresses

The relay forwards every client packet to both helper addresses, as a leaf relay configured with two
(``ip helper-address`` twice; ISC ``dhcrelay S1 S2``) does. Each server answers the DISCOVERs of its
share of the clients (hash of chaddr) and any client whose secs reached ``dhcp.lb_max_seconds``; the
client takes the first OFFER and names that server in its REQUEST (option 54); the other server
ignores a REQUEST for another server (RFC 2131 §3.1 step 3). Asserted: every client
gets exactly one address, each ACK's lease is already a bound row in PostgreSQL when the ACK arrives
(RFC 2131 §3.1 step 4), no (VRF, address) is ACKed to two clients, and both instances served clients.
A second test kills one instance with SIGKILL mid-storm: the survivor answers the rest, and no ACKed
lease is lost.

This module is also the two-helper relay client (``python test_dhcp_two_instances_pg.py relay2 ...``)
that runs inside the relay namespace.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.*, when run as a script (relay2)

from helpers.netns import Netns, sh, veth  # noqa: E402
from helpers.waits import wait_for  # noqa: E402

from bootsvc.dhcp.packet import Packet, ip_bytes, ip_str, parse  # noqa: E402

PY = sys.executable
GIADDR = "198.18.44.1"
SERVERS = {"a": ("198.18.41.1", "198.18.41.2"), "b": ("198.18.42.1", "198.18.42.2")}

pytestmark = pytest.mark.postgres


# ------------------------------------------------------------------------------------------------
# the relay with two helper addresses (runs inside the relay namespace)


def relay2_main(argv: list[str]) -> int:
    """relay2 DB_URL OUT COUNT SECONDS [PACE_S [LOSE_EVERY]]: COUNT clients, each DISCOVER and REQUEST sent to both
    servers; one JSON line per ACK (mac, address, server id, durable = bound row in the database when
    the ACK was read). PACE_S between two new clients (so a kill can land mid-storm). A client without
    an ACK 1 s after its DISCOVER starts over, as RFC 2131 §4.4.1 has clients do. LOSE_EVERY: the first
    DISCOVER of every n-th client reaches server A only (UDP on the way to B lost it), so the two
    servers' views of the pool drift apart as they do in a real storm."""
    from sqlalchemy import text

    from bootsvc import db

    url, out, count, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    pace = float(argv[4]) if len(argv) > 4 else 0.0
    lose = int(argv[5]) if len(argv) > 5 else 0
    eng = db.make_engine(url)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((GIADDR, 67))
    s.setblocking(False)
    macs = {0x30000 + i: (0x02BD20000000 + i).to_bytes(6, "big") for i in range(count)}

    first: dict[int, float] = {}

    def forward(mt: int, xid: int, extra: dict[int, bytes], only_a: bool = False) -> None:
        o = {53: bytes((mt,)), 55: bytes([1, 3, 6, 51, 54])}
        o.update(extra)
        # secs: seconds since the client began (RFC 2131 §2), what lets the other instance answer
        secs = int(time.monotonic() - first.setdefault(xid, time.monotonic()))
        data = Packet(op=1, xid=xid, secs=secs, hops=1, giaddr=ip_bytes(GIADDR),
                      chaddr=macs[xid].ljust(16, b"\0"), options=o).encode()
        for k, (srv, _peer) in SERVERS.items():  # both helper addresses
            if k == "a" or not only_a:
                s.sendto(data, (srv, 67))

    pending = list(macs)
    requested: set[int] = set()
    started: dict[int, float] = {}
    acks: dict[int, dict[str, object]] = {}
    nxt = time.monotonic()
    end = time.monotonic() + seconds
    with eng.connect() as con, open(out, "a", buffering=1) as f:
        while len(acks) < count and time.monotonic() < end:
            now = time.monotonic()
            while pending and now >= nxt:
                x = pending.pop(0)
                forward(1, x, {}, only_a=bool(lose) and (x - 0x30000) % lose == 0)
                started[x] = now
                nxt = now + pace
            for x, t0 in list(started.items()):
                if x not in acks and now - t0 > 1.0:  # no ACK: start over with a DISCOVER
                    requested.discard(x)
                    started[x] = now
                    forward(1, x, {})
            try:
                data, _ = s.recvfrom(4096)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            p = parse(data)
            if p.xid not in macs:
                continue
            if p.msg_type == 2 and p.xid not in requested:  # the first OFFER wins
                requested.add(p.xid)
                forward(3, p.xid, {50: p.yiaddr, 54: p.options[54]})
            elif p.msg_type == 6:  # NAK: the address was taken (by the other instance); start over
                f.write(json.dumps({"nak": macs[p.xid].hex(":")}) + "\n")
            elif p.msg_type == 5 and p.xid not in acks:
                mac, addr = macs[p.xid].hex(":"), ip_str(p.yiaddr)
                n = con.execute(text("SELECT count(*) FROM leases WHERE mac = :m AND address = :a AND "
                                     "state = 'bound'"), {"m": mac, "a": addr}).scalar_one()
                con.rollback()
                acks[p.xid] = {"mac": mac, "address": addr, "server": ip_str(p.options[54]), "durable": n == 1}
                f.write(json.dumps(acks[p.xid]) + "\n")
    eng.dispose()
    return 0


# ------------------------------------------------------------------------------------------------
# the fixture


class Pair:
    def __init__(self, base: Path, url: str) -> None:
        t = uuid.uuid4().hex[:4]
        self.t = t
        self.nets = {k: Netns(name=f"bd2{t}{k}") for k in ("a", "b", "r")}
        self.ns = {k: n.name for k, n in self.nets.items()}
        self.base = base
        self.url = url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.others: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        t, r = self.t, self.nets["r"]
        for n in self.nets.values():
            n.add()
        r.ip("addr", "add", f"{GIADDR}/32", "dev", "lo")  # the relay's client-link address
        for k, (srv, peer) in SERVERS.items():
            ns = self.nets[k]
            veth(ns, f"bd2{t}{k}0", r, f"bd2{t}{k}1", a_addr=f"{srv}/24", b_addr=f"{peer}/24")
            ns.ip("route", "add", "198.18.44.0/23", "via", peer)
            self.write_config(k, srv)

    def write_config(self, k: str, srv: str) -> None:
        (self.base / f"{k}.yaml").write_text(f"""
database: {{url: "{self.url}"}}
networks:
  - {{name: rack, zone: 0, cidr: 198.18.44.0/23, gateway: {GIADDR}, relays: [{GIADDR}],
     pools: [{{start: 198.18.44.10, end: 198.18.45.250}}], lease_seconds: 600}}
listeners:
  dhcp: [{{interface: bd2{self.t}{k}0}}]
dhcp: {{unknown_clients: serve, per_relay_rate: 100000, per_mac_rate: 50,
        instance_index: {0 if k == "a" else 1}, instance_count: 2}}
""")

    def start(self, k: str) -> None:
        with open(self.base / f"{k}.log", "ab") as log:  # the child keeps its own descriptor
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[k], PY, "-m", "bootsvc.dhcp.server",
                                  str(self.base / f"{k}.yaml"), "--log-level", "WARNING"], cwd=str(ROOT),
                                 stdout=log, stderr=log)
        self.procs[k] = p

        def listening() -> bool:
            return ":67" in sh("ip", "netns", "exec", self.ns[k], "ss", "-Hlun", "sport = :67", check=False).stdout

        wait_for(listening, 20, f"bootsvc DHCP {k} to listen")

    def relay(self, out: Path, count: int, seconds: float, pace: float = 0.0,
              lose: int = 0) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns["r"], PY, __file__, "relay2", self.url, str(out),
                              str(count), str(seconds), str(pace), str(lose)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        self.others.append(p)
        return p

    def logs(self) -> str:
        return "\n".join(f"--- {k}\n" + (self.base / f"{k}.log").read_text(errors="replace")[-1500:]
                         for k in ("a", "b") if (self.base / f"{k}.log").exists())

    def down(self) -> None:
        for p in [*self.others, *self.procs.values()]:
            if p.poll() is None:
                p.kill()
            p.wait()
        for n in self.nets.values():
            n.delete()


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[Pair]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    from bootsvc import db
    from bootsvc.models import Base

    eng = db.make_engine(pg_url)
    Base.metadata.create_all(eng)
    eng.dispose()
    p = Pair(tmp_path, pg_url)
    try:
        p.up()
        yield p
    finally:
        p.down()


def bound_rows(url: str) -> set[tuple[str, str]]:
    from sqlalchemy import text

    from bootsvc import db

    eng = db.make_engine(url)
    try:
        with eng.connect() as c:
            return {(m, a) for m, a in c.execute(text("SELECT mac, address FROM leases WHERE state = 'bound'"))}
    finally:
        eng.dispose()


def test_two_instances_answer_the_same_relayed_clients(pair: Pair) -> None:
    pair.start("a")
    pair.start("b")
    out = pair.base / "acks.jsonl"
    r = pair.relay(out, 200, 40, pace=0.002, lose=5)
    _, err = r.communicate(timeout=90)
    assert r.returncode == 0, err.decode()[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    acks = [x for x in lines if "address" in x]
    assert len(acks) == 200, f"{200 - len(acks)} of 200 clients got no ACK\n{pair.logs()}"
    # each instance offers from its own stripe of the pool: no binding lost to the other, no NAK
    assert not [x for x in lines if "nak" in x], "an instance NAKed a client: the two offered one address"
    assert all(a["durable"] for a in acks), [a for a in acks if not a["durable"]][:5]
    addrs = [a["address"] for a in acks]
    assert len(set(addrs)) == 200, "an address was ACKed to two clients"
    by = {srv: sum(1 for a in acks if a["server"] == srv) for srv, _ in SERVERS.values()}
    assert all(by.values()), f"one instance answered no client: {by}"
    assert {(a["mac"], a["address"]) for a in acks} <= bound_rows(pair.url)


def test_kill9_of_one_instance_mid_storm(pair: Pair) -> None:
    pair.start("a")
    pair.start("b")
    out = pair.base / "acks.jsonl"
    r = pair.relay(out, 150, 60, pace=0.02)  # ~3 s of new clients
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 50, 30, "50 ACKs")
    a = pair.procs["a"]
    os.kill(a.pid, signal.SIGKILL)  # ip netns exec execs the server: this PID is the python
    a.wait(10)
    _, err = r.communicate(timeout=90)
    assert r.returncode == 0, err.decode()[-2000:]
    acks = [x for x in map(json.loads, out.read_text().splitlines()) if "address" in x]
    # clients whose REQUEST named A when it died get no ACK from B (RFC 2131 §3.1: not its offer), and
    # A's share gets no OFFER from B until the client has been trying for lb_max_seconds (3 s); they
    # start over with DISCOVERs every second, which B answers once secs reaches 3
    assert len(acks) == 150, f"only {len(acks)} of 150 clients got an ACK\n{pair.logs()}"
    assert len({a["address"] for a in acks}) == len(acks), "an address was ACKed to two clients"
    assert all(x["server"] == SERVERS["b"][0] for x in acks[70:]), "B did not take over"
    rows = bound_rows(pair.url)
    lost = [x for x in acks if (x["mac"], x["address"]) not in rows]
    assert not lost, f"{len(lost)} ACKed leases not in PostgreSQL: {lost[:5]}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay2":
        raise SystemExit(relay2_main(sys.argv[2:]))
