"""The agent's DHCP relay with several bootsvc servers (``relay.servers``), on real sockets in network
namespaces this test creates (root; ``netns`` mark).

    <tag>c: host port of a "host" (h0, 10.0.0.50/24)  ==veth==  <tag>d: the DPU's host port (hp, 10.0.0.1/24);
            lo carries giaddr 10.98.0.11 and three "bootsvc instances" 10.98.0.1, .2, .3 (UDP 67)

The DPU side runs :class:`bootsvc.agent.relay.RelayServer` unmodified. The host sends one DISCOVER
(broadcast flag set) on its port; each of the three servers must receive it relayed (hops 1, giaddr,
option 82 with the host port as circuit-id); the second server answers, and the host must get that
OFFER through the relay, without option 82. Every socket lives in the two namespaces; both are deleted
however the test ends.

Also a script: ``python this_file.py dpu|host`` is what runs inside each namespace.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SERVERS = ("10.98.0.1", "10.98.0.2", "10.98.0.3")
GIADDR = "10.98.0.11"
ANSWERS = "10.98.0.2"
MAC = bytes.fromhex("02ab00000001")
XID = 0x5EED


def dpu_side(seconds: float) -> dict[str, object]:
    """Relay + three server sockets; returns what each server saw and the relay's counters."""
    from bootsvc.agent.relay import RelayParams, RelayServer
    from bootsvc.dhcp.packet import MessageType, parse

    servers = {}
    for a in SERVERS:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a, 67))
        servers[a] = s
    relay = RelayServer(RelayParams(host_port="hp", giaddr=IPv4Address(GIADDR),
                                    servers=tuple(IPv4Address(a) for a in SERVERS),
                                    circuit_id=b"hp", remote_id=b"MT-TEST", vss_vrf="vrf-a",
                                    link_selection=IPv4Address("10.0.0.0"),
                                    server_id_override=IPv4Address("10.0.0.1")))
    relay.start()
    print("ready", flush=True)
    seen: dict[str, list[dict[str, object]]] = {a: [] for a in SERVERS}
    deadline = time.monotonic() + seconds
    answered = False
    while time.monotonic() < deadline and not (answered and all(seen.values())):
        ready, _, _ = select.select(list(servers.values()), [], [], 0.2)
        for s in ready:
            data, src = s.recvfrom(4096)
            me = s.getsockname()[0]
            q = parse(data)
            info = q.relay_info()
            seen[me].append({"src": src[0], "hops": q.hops, "giaddr": str(IPv4Address(q.giaddr)),
                             "xid": q.xid, "circuit_id": info.circuit_id.decode() if info else None})
            if me == ANSWERS and not answered and info is not None:
                r = q.reply(MessageType.OFFER)
                r.yiaddr = IPv4Address("10.0.0.100").packed
                r.set(54, IPv4Address("10.0.0.1").packed)
                r.set(82, info.echo())  # RFC 3046 §2.2 echo, minus VSS-Control (RFC 6607 §3.3)
                s.sendto(r.encode(), (str(IPv4Address(q.giaddr)), 67))
                answered = True
    time.sleep(0.5)  # let the relay deliver the answer before it stops
    relay.stop()
    return {"seen": seen, "relay": relay.stats.as_dict()}


def host_side(seconds: float) -> dict[str, object]:
    """One DISCOVER (re-sent every second, as firmware retransmits) until an OFFER comes back."""
    from bootsvc.dhcp.packet import BROADCAST_FLAG, MessageType, Packet, parse

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, b"h0")  # SO_BINDTODEVICE: out of the host port only
    s.bind(("0.0.0.0", 68))
    p = Packet(xid=XID, chaddr=MAC.ljust(16, b"\x00"), flags=BROADCAST_FLAG,
               options={53: bytes([MessageType.DISCOVER]), 55: bytes([1, 3, 54])})
    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline:
        s.sendto(p.encode(), ("255.255.255.255", 67))
        sent += 1
        ready, _, _ = select.select([s], [], [], 1.0)
        if ready:
            data, src = s.recvfrom(4096)
            r = parse(data)
            return {"sent": sent, "got": r.msg_type, "xid": r.xid, "yiaddr": str(IPv4Address(r.yiaddr)),
                    "has_82": 82 in r.options, "src": src[0]}
    return {"sent": sent, "got": None}


@pytest.mark.netns
def test_relay_forwards_to_every_server_and_delivers_the_answer() -> None:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (network namespaces)")
    from helpers.netns import Netns, unique, veth

    tag = unique("rs")
    with Netns(name=f"{tag}d") as d, Netns(name=f"{tag}c") as c:
        veth(c, "h0", d, "hp", a_addr="10.0.0.50/24", b_addr="10.0.0.1/24")
        for a in (GIADDR, *SERVERS):
            d.ip("addr", "add", f"{a}/32", "dev", "lo")
        dp = d.python(HERE, "dpu", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert dp.stdout is not None
            assert dp.stdout.readline().strip() == "ready", dp.stderr.read() if dp.stderr else ""
            host = c.python(HERE, "host", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            hout, herr = host.communicate(timeout=30)
            dout, derr = dp.communicate(timeout=30)
        finally:
            for proc in (dp,):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert host.returncode == 0 and dp.returncode == 0, herr + derr
    h = json.loads(hout)
    got = json.loads(dout)
    for a in SERVERS:  # each server got the relayed request
        reqs = got["seen"][a]
        assert reqs, json.dumps(got)
        assert all(r["src"] == GIADDR and r["giaddr"] == GIADDR and r["hops"] == 1 and r["xid"] == XID
                   and r["circuit_id"] == "hp" for r in reqs), json.dumps(got)
    # the answer of one server came back through the relay, option 82 stripped (RFC 3046 §2.2)
    assert h["got"] == 2 and h["xid"] == XID and h["yiaddr"] == "10.0.0.100" and h["has_82"] is False, h
    assert got["relay"]["replies"] >= 1 and got["relay"]["reasons"] == {}, got


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    role = sys.argv[1]
    print(json.dumps(dpu_side(20.0) if role == "dpu" else host_side(10.0)), flush=True)
