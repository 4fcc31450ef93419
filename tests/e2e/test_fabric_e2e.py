"""The tenant fabric with real packets (docs/fabric.md): three lab BlueField pairs behind one FRR leaf.

The lab (config/lab.yaml, bootsvc/lab/rack.py + leaf.py): three arm64 DPU VMs, each with FRR and the
policy agent after a real PXE install, uplink ``eth2`` to the leaf namespace (FRR, BGP unnumbered, EVPN
relay, no VRF); pairs 1 and 2 of tenant red (L3VNI 5001), pair 3 of tenant blue (L3VNI 5002). The
"hosts" are each pair's tenant-side probe namespace on the DPU's host segment (what a deployed host has:
its reserved address, the tenant gateway 10.0.0.1); the host VMs are never powered, so three TCG pairs
fit on two cores. Addresses: A = 10.0.0.11 (red, pair 1), B = 10.0.0.12 (red, pair 2), C = 10.0.0.12
(blue, pair 3: the same address as B, in another VRF).

What is proved, in order (one lab for the module; every step prints its evidence):

1. every DPU's BGP session to the leaf is Established with the l2vpn evpn family; measured: agent
   start -> Established (FRR's ``peerUptimeEstablishedEpoch`` against the agent's process start);
2. B's /32 is absent from DPU 1 (no Type-5 with red's VNI, not in VRF red) until bootsvc gives B its
   address; then DPU 2 announces it and DPU 1 learns it with DPU 2's VTEP as next hop; measured: the
   reservation -> route on DPU 1, and DPU 2's agent start -> Type-5 on DPU 1 (FRR's ``lastUpdate``);
3. A reaches B over VXLAN VNI 5001 (captured on the leaf, VNI parsed from the header); C reaches
   neither (A's address is in another VRF, B's is its own); A's connection to 10.0.0.12 is answered by
   B, never by C;
4. Zone 0 from a tenant: only the boot endpoints the policy allows (HTTP boot port on the boot
   server); bootsvc's other listeners and the DPUs' own addresses refused. Zone 2: red has an egress
   flow to a stand-in external service (tenants[].egress in this test's config), blue has none: A
   gets through, C does not;
5. tenant move: A's machine goes from red to blue through the API; DPU 2 (red) loses A's route, DPU 3
   (blue) gains it, C reaches A and B no longer does; measured: API call -> old peer lost the route;
6. FRR's CPU on each DPU VM.

``BOOTSVC_FABRIC_E2E_CONFIG=<lab config>``: use a lab that is already up with its DPUs provisioned
(e.g. ``bootsvc --config config/lab.yaml lab up --pairs 3`` + provision) instead of building one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).parent))
from fabric_proof import (
    cpu_seconds,
    describe,
    flows,
    learned,
    routes_table,
    start_epoch,
    vxlan_packets,
)
from helpers.conductor import add_token
from helpers.labcfg import lab_tree, write_config
from helpers.waits import wait_for as shared_wait_for

from bootsvc import config as config_mod
from bootsvc import db, inventory, operations
from bootsvc.agent.fabric_health import vrf_routes
from bootsvc.config import Config
from bootsvc.models import Node
from bootsvc.policy import vtep_for
from bootsvc.states import FAILED_STATES, State, Trigger

# the first test carries the lab's bring-up (three TCG DPU installs): its own bound, the others 600 s
pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[2]
PREFIX = os.environ.get("BOOTSVC_FABRIC_E2E_PREFIX", "bz")  # lab.prefix: b + 1-3 chars
BMC_BASE = int(os.environ.get("BOOTSVC_FABRIC_E2E_PORT_BASE", "18500"))
HTTP_PORT = BMC_BASE + 70
ADDR = {1: "10.0.0.11", 2: "10.0.0.12", 3: "10.0.0.12"}  # A, B, C (C overlaps B in another VRF)
GATEWAY = "10.0.0.1"
# Zone 2 stand-in: an "external" service in the lab's Zone 0 namespace, reached through a DPU's own
# routing (its default route) and only by a tenant whose policy has the egress flow (red, below)
ZONE2 = ("192.0.2.10", 443)
ECHO_PORT = 7000  # each probe namespace answers its name here: who really got the connection
VNI = {"red": 5001, "blue": 5002}


def now() -> str:
    return time.strftime("%H:%M:%S")


# every poll runs a command in a DPU VM under TCG (vtysh, a shell): once a second
wait_for = partial(shared_wait_for, interval=1.0)


@dataclass
class Pair:
    index: int
    tenant: str
    dpu: str
    host: str
    probe_ns: str
    probe_dev: str
    vtep: str = ""


@dataclass
class FabricLab:
    cfg: Config
    cfg_path: Path
    plan: Any
    pairs: dict[int, Pair]
    base: str  # bootsvc's loopback HTTP (API)
    token: str
    timings: dict[str, float] = field(default_factory=dict)
    agent_start: dict[int, float] = field(default_factory=dict)  # epoch on each DPU VM's clock
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- the DPUs ----------------------------------------------------------------------------------------
    def vtysh(self, pair: int, command: str) -> Any:
        from bootsvc.lab import fabric

        return fabric.dpu_vtysh_json(self.cfg, self.pairs[pair].dpu, command, timeout=60)

    def sh(self, pair: int, command: str, timeout: float = 60) -> str:
        from bootsvc.lab import fabric

        res = fabric.dpu_exec(self.cfg, self.pairs[pair].dpu, command, timeout=timeout)
        assert res.rc == 0, f"{self.pairs[pair].dpu}: `{command}` exited {res.rc}: {res.output[-500:]}"
        return res.output

    def vrf_table(self, pair: int) -> dict[str, list[str]]:
        """The pair's tenant VRF's BGP table on its DPU: prefix -> [prefix, next hop, local|evpn|bgp]."""
        vrf = next(t.vrf for t in self.cfg.tenants if t.name == self.pairs[pair].tenant)
        return {r[0]: r for r in vrf_routes(self.vtysh(pair, f"show bgp vrf {vrf} ipv4 unicast json"))}

    def type5(self, pair: int) -> Any:
        return self.vtysh(pair, "show bgp l2vpn evpn route type prefix json")

    # -- the hosts (probe namespaces) ---------------------------------------------------------------------
    def nsx(self, pair: int, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.pairs[pair].probe_ns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def ping(self, src: int, dst: str) -> bool:
        return self.nsx(src, "ping", "-c", "2", "-W", "2", "-i", "0.5", dst).returncode == 0

    def who(self, src: int, dst: str, port: int = ECHO_PORT) -> str:
        """Connect from pair ``src``'s host to dst:port; the name the answering end sends, or the error."""
        code = ("import socket,sys\ntry:\n s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=4)\n"
                " print(s.recv(64).decode())\nexcept Exception as e:\n print('refused: '+type(e).__name__)")
        return self.nsx(src, sys.executable, "-c", code, dst, str(port)).stdout.strip()

    def tcp(self, src: int, host: str, port: int) -> str:
        from bootsvc.lab import rack

        r = rack.probe(self.pairs[src].probe_ns, "tcp", host, port, timeout=4)
        return "connected" if r.allowed else f"refused ({r.detail[:60]})"


def lab_config(tmp: Path) -> tuple[Config, Path]:
    """config/lab.yaml with this test's prefix, ports and private state, all three pairs."""
    tree = lab_tree(tmp, prefix=PREFIX, bmc_base=BMC_BASE, http_port=HTTP_PORT)
    for t in tree["tenants"]:  # Zone 2 only for red (tenants[].egress, docs/fabric.md)
        if t["name"] == "red":
            t["egress"] = [f"tcp:{ZONE2[0]}/32:{ZONE2[1]}"]
    assert [m["tenant"] for m in tree["lab"]["machines"][:3]] == ["red", "red", "blue"], tree["lab"]["machines"]
    return write_config(tree, tmp / "fabric-e2e.yaml")


def reserve(cfg: Config, host: str, address: str | None) -> None:
    """Give the host's PF its address (what the DPU announces as a Type-5 /32, docs/fabric.md), or
    take it away (None)."""
    sessions = db.session_factory(db.make_engine(cfg.database.url))
    with sessions() as s:
        n = operations.find_node(s, host)
        nics = [inventory.NicSpec(mac=x.mac, role=x.role, ipv4=address if x.role == "host-pf" else x.ipv4)
                for x in n.nics]
        operations.edit_node(s, n, {"nics": nics}, actor="fabric-e2e")


def admin_token(cfg: Config) -> str:
    return add_token(db.session_factory(db.make_engine(cfg.database.url)), "admin", "fabric-e2e")


def node_error(cfg: Config, name: str) -> str:
    with db.session_factory(db.make_engine(cfg.database.url))() as s:
        return (s.scalars(select(Node).where(Node.name == name)).one().last_error or "")[:400]


def retry(cfg: Config, name: str) -> None:
    with db.session_factory(db.make_engine(cfg.database.url))() as s:
        operations.transition(s, operations.find_node(s, name), Trigger.RETRY, actor="fabric-e2e", config=cfg)


def dpu_states(cfg: Config, names: list[str]) -> dict[str, str]:
    with db.session_factory(db.make_engine(cfg.database.url))() as s:
        return {n.name: n.state for n in s.scalars(select(Node).where(Node.name.in_(names)))}


def fill_vteps(lab: FabricLab) -> None:
    with db.session_factory(db.make_engine(lab.cfg.database.url))() as s:
        for p in lab.pairs.values():
            node = s.scalars(select(Node).where(Node.name == p.dpu)).one()
            p.vtep = str(vtep_for(lab.cfg, node.id))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FabricLab]:
    from bootsvc.lab import demo, rack
    from bootsvc.lab import fabric as lab_fabric

    attach = os.environ.get("BOOTSVC_FABRIC_E2E_CONFIG")
    if attach:
        cfg_path = Path(attach)
        cfg = config_mod.load(cfg_path)
    else:
        cfg, cfg_path = lab_config(tmp_path_factory.mktemp("fabric"))
    topo = lab_fabric.topology(cfg)
    pairs = {p["pair"]: Pair(p["pair"], p["tenant"], p["dpu"], p["host"], p["probe_netns"], p["probe_dev"])
             for p in topo["pairs"][:3]}
    assert [pairs[i].tenant for i in (1, 2, 3)] == ["red", "red", "blue"]
    plan = None
    servers: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        if not attach:
            prep = demo.prepare(cfg, out=lambda s: print(s, flush=True))
            r = rack.up(cfg, arts=prep.arts, machines=3)
            plan = r.plan
            demo.reset_database(cfg)
            demo.load_inventory(cfg, r.plan)
            # A and C get their addresses now (C's overlaps B's); B only later (step 2: its route must be
            # absent until then; the lab enrolls every host PF with an address)
            reserve(cfg, pairs[1].host, ADDR[1])
            reserve(cfg, pairs[2].host, None)
            reserve(cfg, pairs[3].host, ADDR[3])
            demo.start_service(cfg, str(cfg_path), r.plan)
            demo.provision(cfg, [p.dpu for p in pairs.values()], actor="fabric-e2e")
            dpus = [p.dpu for p in pairs.values()]
            retried: set[str] = set()

            def all_applied() -> bool:
                """True once every DPU applied its policy. A DPU that fails is retried once, its reason
                printed (three emulated DPUs on two cores are slow; a second failure fails the test)."""
                states = dpu_states(cfg, dpus)
                for name, state in states.items():
                    if state in {s.value for s in FAILED_STATES}:
                        why = node_error(cfg, name)
                        assert name not in retried, f"{name} failed twice: {state}: {why}"
                        print(f"[{now()}] {name} {state}: {why} - retrying once", flush=True)
                        retry(cfg, name)
                        retried.add(name)
                return set(states.values()) == {State.POLICY_APPLIED.value}

            wait_for(all_applied, 1500, "all three DPUs to apply their tenant policy", interval=5)
        else:
            plan, _ = rack._current_plan(cfg)
        base = f"http://127.0.0.1:{HTTP_PORT}" if not attach else os.environ.get(
            "BOOTSVC_FABRIC_E2E_API", "http://127.0.0.1:8080")
        if attach:  # a lab brought up by `lab up`/`lab demo`: give A and C this test's addresses
            reserve(cfg, pairs[1].host, ADDR[1])
            reserve(cfg, pairs[3].host, ADDR[3])
        fl = FabricLab(cfg, cfg_path, plan, pairs, base, admin_token(cfg), servers=servers)
        fl.timings["lab up, 3 DPUs policy_applied (s)"] = time.monotonic() - t0
        fill_vteps(fl)
        print(f"\n[{now()}] lab up in {time.monotonic() - t0:.0f}s: " + ", ".join(
            f"pair {p.index} {p.tenant} {p.dpu} VTEP {p.vtep}" for p in pairs.values()), flush=True)
        echo = ("import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                "s.bind((sys.argv[2],int(sys.argv[3])));s.listen(8)\nwhile True:\n c,_=s.accept();"
                "c.sendall(sys.argv[1].encode());c.close()")
        prov = f"{plan.prefix}-prov"
        subprocess.run(["ip", "-n", prov, "addr", "replace", f"{ZONE2[0]}/32", "dev", "lo"], check=True)
        servers.append(subprocess.Popen(["ip", "netns", "exec", prov, sys.executable, "-c", echo, "zone2",
                                         ZONE2[0], str(ZONE2[1])], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        for p in pairs.values():  # each host answers its own name: who got a connection, not just "someone"
            rack.probe_setup(plan, next(m for m in plan.machines if m.index == p.index), ADDR[p.index], GATEWAY)
            # and a default route, as a host's DHCP router option gives it: what the policy drops is then
            # dropped by the DPU, not by the probe's own lack of a route
            subprocess.run(["ip", "-n", p.probe_ns, "route", "replace", "default", "via", GATEWAY], check=True)
            servers.append(subprocess.Popen(["ip", "netns", "exec", p.probe_ns, sys.executable, "-c", echo,
                                             f"host-{'ABC'[p.index - 1]}", "0.0.0.0", str(ECHO_PORT)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield fl
        print("\n== fabric e2e measurements ==")
        for k, v in fl.timings.items():
            print(f"  {k}: {v:.1f}")
    finally:
        for proc in servers:  # by PID, the ones this fixture started
            proc.terminate()
            proc.wait(timeout=10)
        if not attach:
            rack.down(cfg)


def api(lab: FabricLab, method: str, path: str, body: Any) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(lab.base + path, method=method, data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {lab.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# ---------------------------------------------------------------------------------------------------- 1
def test_bgp_established_on_every_dpu_uplink(lab: FabricLab) -> None:
    uplink = lab.cfg.fabric.uplinks[0]
    for i, p in lab.pairs.items():
        summary = wait_for(lambda i=i: (s := lab.vtysh(i, "show bgp summary json"))  # type: ignore[misc]
                           .get("l2VpnEvpn", {}).get("peers", {}).get(uplink, {}).get("state") == "Established"
                           and s, 300, f"{p.dpu}: BGP Established on {uplink} with l2vpn evpn", interval=5)
        peer = summary["l2VpnEvpn"]["peers"][uplink]
        out = lab.sh(i, "for d in /proc/[0-9]*; do tr '\\0' ' ' < $d/cmdline 2>/dev/null "
                        "| grep -q 'bootsvc[.]agent[.]main' && { cat $d/stat; break; }; done; "
                        "grep '^btime' /proc/stat | cut -d' ' -f2; getconf CLK_TCK", timeout=180)
        stat, btime, tck = out.strip().splitlines()[-3:]
        agent_start = start_epoch(stat, int(btime), int(tck))
        lab.agent_start[i] = agent_start
        took = peer["peerUptimeEstablishedEpoch"] - agent_start
        lab.timings[f"{p.dpu}: agent start -> BGP Established (s)"] = took
        print(f"[{now()}] {p.dpu} ({p.tenant}): {uplink} {peer['state']} with the leaf (AS {peer['remoteAs']}), "
              f"{peer['pfxRcd']} EVPN routes in; agent start -> Established {took:.1f}s")
        assert peer["remoteAs"] == 65000 and took > 0
    # agent start on DPU 1 -> A's Type-5 route on DPU 2 (FRR's lastUpdate of the path; both VMs keep the
    # host's clock: QEMU's RTC is the host's UTC, so the epochs compare to about a second)
    a = ADDR[1] + "/32"
    detail = wait_for(lambda: lab.vtysh(2, f"show bgp vrf red ipv4 unicast {a} json").get("paths"), 300,
                      f"{a} on DPU 2", interval=5)
    ups = [p["lastUpdate"].get("epoch") for p in detail if isinstance(p.get("lastUpdate"), dict)]
    if not ups:
        print(f"[{now()}] FRR printed no lastUpdate for {a} on {lab.pairs[2].dpu}: not measured ({detail})")
        return
    took = min(ups) - lab.agent_start[1]
    lab.timings[f"{lab.pairs[1].dpu} agent start -> its host's Type-5 on {lab.pairs[2].dpu} (s)"] = took
    print(f"[{now()}] agent start on {lab.pairs[1].dpu} -> {a} in VRF red on {lab.pairs[2].dpu}: {took:.1f}s")


# ---------------------------------------------------------------------------------------------------- 2
def test_type5_route_learned_only_after_the_peer_announces_it(lab: FabricLab) -> None:
    b = ADDR[2] + "/32"
    if learned(lab.type5(1), b, vni=VNI["red"]):  # a lab that was up already: B had its address
        t0 = time.monotonic()
        reserve(lab.cfg, lab.pairs[2].host, None)
        wait_for(lambda: not learned(lab.type5(1), b, vni=VNI["red"]), 240, f"DPU 1 to lose {b}", interval=3)
        lab.timings["B unreserved -> Type-5 withdrawn on DPU 1 (s)"] = time.monotonic() - t0
        print(f"[{now()}] B's address taken away: DPU 1 lost {b} after {time.monotonic() - t0:.1f}s")
    before = lab.type5(1)
    assert learned(before, b, vni=VNI["red"]) == [], routes_table(before)  # C's same /32 is blue's: not this
    assert b not in lab.vrf_table(1)
    print(f"[{now()}] before B has an address: DPU 1 has no red Type-5 for {b}; its Type-5 table:\n  "
          + "\n  ".join(routes_table(before)))
    t0 = time.monotonic()
    reserve(lab.cfg, lab.pairs[2].host, ADDR[2])  # bootsvc re-renders DPU 2's policy with B's /32
    paths = wait_for(lambda: learned(lab.type5(1), b, vni=VNI["red"]), 240,
                     f"DPU 1 to learn {b} from DPU 2", interval=3)
    took = time.monotonic() - t0
    assert {p.nexthop for p in paths} == {lab.pairs[2].vtep}, paths
    row = wait_for(lambda: lab.vrf_table(1).get(b), 60, f"{b} in DPU 1's VRF red")
    assert row[1:] == [lab.pairs[2].vtep, "evpn"], row
    assert not [r for r in lab.vrf_table(1).values() if r[1] == lab.pairs[3].vtep]  # nothing of blue's
    lab.timings["B reserved -> Type-5 on DPU 1 (s)"] = took
    detail = lab.vtysh(1, f"show bgp vrf red ipv4 unicast {b} json")
    upd = [p.get("lastUpdate", {}).get("epoch") for p in detail.get("paths", [])]
    print(f"[{now()}] B reserved -> DPU 1 learned {b} via {paths[0].nexthop} (RT {paths[0].route_targets}) in "
          f"{took:.1f}s; DPU 1 VRF red: {row}; FRR lastUpdate epochs {upd}")
    print("DPU 1 Type-5 table now:\n  " + "\n  ".join(routes_table(lab.type5(1))))


# ---------------------------------------------------------------------------------------------------- 3
def test_red_hosts_talk_over_vxlan_and_blue_reaches_neither(lab: FabricLab, tmp_path: Path) -> None:
    from bootsvc.lab import fabric

    pcap = tmp_path / "leaf.pcapng"  # dumpcap, every leaf link; a packet between two DPUs is seen on both
    with fabric.LeafCapture(lab.cfg, pcap):
        a_b = lab.ping(1, ADDR[2])
        who_ab = lab.who(1, ADDR[2])
        who_ba = lab.who(2, ADDR[1])
        c_a = lab.ping(3, ADDR[1])
        who_ca = lab.who(3, ADDR[1])
    pkts, bad = vxlan_packets(pcap)
    print(f"[{now()}] probes: A->B ping {a_b}, A->B:{ECHO_PORT} answered by {who_ab!r}, B->A answered by "
          f"{who_ba!r}; C->A ping {c_a}, C->A:{ECHO_PORT} {who_ca!r}")
    print(f"leaf capture ({len(pkts)} VXLAN packets, {len(bad)} malformed):\n  " + "\n  ".join(describe(pkts)))
    assert a_b and who_ab == "host-B" and who_ba == "host-A"
    assert not c_a and not who_ca.startswith("host-"), who_ca
    f = flows(pkts)
    v1, v2, v3 = (lab.pairs[i].vtep for i in (1, 2, 3))
    assert any(k[:3] == (VNI["red"], v1, v2) and k[3:5] == (ADDR[1], ADDR[2]) for k in f), f
    assert any(k[:3] == (VNI["red"], v2, v1) and k[3:5] == (ADDR[2], ADDR[1]) for k in f), f
    # nothing of A's or B's traffic went to C's VTEP, and nothing of C's reached red's VNI
    assert not [k for k in f if v3 in (k[1], k[2]) and {k[3], k[4]} & {ADDR[1], ADDR[2]}], f
    assert not [k for k in f if k[0] == VNI["red"] and v3 in (k[1], k[2])], f
    assert not bad


# ---------------------------------------------------------------------------------------------------- 4
def test_zone0_only_through_the_boot_endpoints_and_zone2_only_for_red(lab: FabricLab) -> None:
    boot = "10.77.0.1"
    results = {}
    for i in (1, 3):
        results[i] = {
            f"tcp {boot}:{lab.cfg.boot.http_port} (boot HTTP, allowed)": lab.tcp(i, boot, lab.cfg.boot.http_port),
            f"tcp {boot}:80 (HTTP, not in the policy)": lab.tcp(i, boot, 80),
            f"tcp {boot}:53 (DNS, not in the policy)": lab.tcp(i, boot, 53),
            f"tcp {lab.pairs[2].vtep}:179 (a DPU's BGP)": lab.tcp(i, lab.pairs[2].vtep, 179),
        }
        zone2 = lab.who(i, ZONE2[0], ZONE2[1])
        results[i][f"tcp {ZONE2[0]}:{ZONE2[1]} (Zone 2, egress for red only)"] = zone2
        print(f"[{now()}] from host {'ABC'[i - 1]} ({lab.pairs[i].tenant}):\n  "
              + "\n  ".join(f"{k}: {v}" for k, v in results[i].items()))
    for i in (1, 3):
        got = list(results[i].values())
        assert got[0] == "connected" and all(v != "connected" for v in got[1:-1]), results[i]
    # red's policy has the egress flow (this test's config; a lab attached to may have none)
    red_egress = any(t.egress for t in lab.cfg.tenants if t.name == "red")
    assert (list(results[1].values())[-1] == "zone2") is red_egress, results[1]
    assert not list(results[3].values())[-1].startswith("zone2"), results[3]  # blue's has not


# ---------------------------------------------------------------------------------------------------- 5
def test_tenant_move_withdraws_from_red_and_announces_in_blue(lab: FabricLab) -> None:
    a = ADDR[1] + "/32"
    assert a in lab.vrf_table(2)  # B's DPU has A's route before the move
    # watchers inside the VMs, for sub-second timing the console's round trip (seconds under TCG) cannot
    # give: when A's DPU has A in VRF blue (its FRR took the new config), when B's DPU lost A from red
    # (A's DPU: left red, then in blue; B's DPU: gone from red; C's DPU: arrived in blue)
    for pair, vrf, until, mark in ((1, "red", "!", "left"), (1, "blue", "", "moved"), (2, "red", "!", "gone"),
                                   (3, "blue", "", "arrived")):
        lab.sh(pair, f"rm -f /tmp/fz-{mark}; nohup sh -c 'i=0; while [ $i -lt 3000 ]; do "
                     f"if {until} vtysh -c \"show bgp vrf {vrf} ipv4 unicast {a} json\" | grep -q paths; then "
                     f"date +%s.%N > /tmp/fz-{mark}; break; fi; i=$((i+1)); sleep 0.2; done' "
                     ">/dev/null 2>&1 &")
    t0 = time.monotonic()
    status, body = api(lab, "PUT", f"/api/v1/machines/{lab.pairs[1].host}/tenant", {"tenant": "blue"})
    assert status == 200, body
    gone = wait_for(lambda: a not in lab.vrf_table(2) and time.monotonic(), 300,
                    "DPU 2 (red) to lose A's route", interval=2) - t0

    def dpu1() -> tuple[str, str]:
        with db.session_factory(db.make_engine(lab.cfg.database.url))() as s:
            n = s.scalars(select(Node).where(Node.name == lab.pairs[1].dpu)).one()
            return n.state, (n.last_error or "")[:600]

    def learned_in_blue() -> float | None:
        state, why = dpu1()
        assert state != State.POLICY_FAILED.value, f"{lab.pairs[1].dpu} could not apply the move: {why}"
        r = lab.vrf_table(3).get(a)
        return time.monotonic() if r is not None and r[1] == lab.pairs[1].vtep else None

    here = wait_for(learned_in_blue, 300, "DPU 3 (blue) to learn A's route", interval=2) - t0
    lab.pairs[1].tenant = "blue"
    moved_to = lab.vtysh(1, f"show bgp vrf blue ipv4 unicast {a} json")
    origin = [p.get("lastUpdate", {}).get("epoch") for p in moved_to.get("paths", [])]
    lab.timings["move: API -> old tenant's DPU lost the route (s)"] = gone
    lab.timings["move: API -> new tenant's DPU has the route (s)"] = here
    at = {mark: float(wait_for(lambda pair=pair, mark=mark: lab.sh(pair, f"cat /tmp/fz-{mark} 2>/dev/null || true")
                               .strip(), 60, f"the {mark} watcher"))  # type: ignore[misc]
          for pair, mark in ((1, "left"), (1, "moved"), (2, "gone"), (3, "arrived"))}
    withdraw, announce = at["gone"] - at["left"], at["arrived"] - at["moved"]
    lab.timings["move, BGP: withdrawn on A's DPU -> gone on B's DPU (s)"] = withdraw
    lab.timings["move, BGP: in VRF blue on A's DPU -> learned on C's DPU (s)"] = announce
    print(f"[{now()}] BGP part of the move (VM clocks, 0.2 s polling + a vtysh run each): withdrawal reached B's "
          f"DPU {withdraw:.2f}s after A left VRF red on its DPU; the announcement reached C's DPU {announce:.2f}s "
          f"after A was in VRF blue; A's DPU took {at['moved'] - at['left']:.1f}s from leaving red to being in blue")
    c_a, b_a = lab.who(3, ADDR[1]), lab.who(2, ADDR[1])
    print(f"[{now()}] tenant move of A red -> blue: DPU 2 lost {a} after {gone:.1f}s, DPU 3 learned it after "
          f"{here:.1f}s (A's DPU originated it in VRF blue at epoch {origin}); C->A {c_a!r}, B->A {b_a!r}")
    assert c_a == "host-A" and not b_a.startswith("host-"), (c_a, b_a)


# ---------------------------------------------------------------------------------------------------- 6
def test_frr_cpu_on_the_dpu_vms(lab: FabricLab) -> None:
    for i, p in lab.pairs.items():
        out = lab.sh(i, "for n in zebra bgpd; do for p in $(pidof $n); do cat /proc/$p/stat; done; done; "
                        "cut -d' ' -f1 /proc/uptime; getconf CLK_TCK", timeout=180)
        lines = out.strip().splitlines()
        tck, uptime = int(lines[-1]), float(lines[-2])
        cpu = sum(cpu_seconds(ln, tck) for ln in lines[:-2])
        lab.timings[f"{p.dpu}: zebra+bgpd CPU s over {uptime:.0f}s up"] = cpu
        print(f"[{now()}] {p.dpu}: zebra+bgpd used {cpu:.1f}s CPU in {uptime:.0f}s of uptime "
              f"({100 * cpu / uptime:.2f}% of one core, TCG-emulated arm64)")
        assert len(lines) >= 4, out

