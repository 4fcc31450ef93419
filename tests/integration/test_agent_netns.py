"""The DPU agent end to end in network namespaces (prefix ``ba``), with real traffic.

Topology (every packet stays inside these namespaces; no default route leaves the lab):

    ba-boot (Zone 0): bridge baz0 10.98.0.1/24 — DHCP responder (VSS), agent API :8000,
                      HTTP boot :8080 (allowed), HTTP :9090 (not allowed), TFTP :69 (allowed)
      |-- bad1up 10.98.0.11  ba-d1 (DPU, VTEP 10.255.0.11) -- bad1hp ==== bah1e0  ba-h1 (host)
      |-- bad2up 10.98.0.12  ba-d2 (DPU, VTEP 10.255.0.12) -- bad2hp ==== bah2e0  ba-h2 (host)
      |-- bad3up 10.98.0.13  ba-d3 (DPU, VTEP 10.255.0.13) -- bad3hp ==== bah3e0  ba-h3 (host)

Tenants, as bootsvc's policy builder lays them out (anycast gateway 10.0.0.1/24 on every DPU of a
tenant, other DPUs' hosts as /32 peer routes over the L3VNI): A (VRF bavrf-a, table 1001, L3VNI 5001)
on d1 and d3; B (bavrf-b, 1002, 5002) on d2 with the *same* subnet — h1 (A) and h2 (B) both get
10.0.0.101. Each DPU runs the real agent (``python -m bootsvc.agent.main``) polling every second.
The tests run in order on one fabric.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_labsrv import SCRIPT as SRV
from helpers.agent_labsrv import UDHCPC_SCRIPT, node_secret
from helpers.netns import child_env
from helpers.waits import wait_for

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
BOOT = "10.98.0.1"
API = f"http://{BOOT}:8000"
TENANTS = {"a": ("bavrf-a", 1001, 5001), "b": ("bavrf-b", 1002, 5002)}
GW = "10.0.0.1/24"
MACS = {"h1": "02:ba:00:00:00:01", "h2": "02:ba:00:00:00:02", "h3": "02:ba:00:00:00:03"}
# host reservations per tenant (bootsvc reserves host-pf addresses in its inventory the same way)
HOST_IP = {("a", "h1"): "10.0.0.101", ("a", "h2"): "10.0.0.102", ("a", "h3"): "10.0.0.103",
           ("b", "h2"): "10.0.0.101"}
POOLS = {
    f"bavrf-{t}|10.0.0.0/24": {"gateway": "10.0.0.1", "first": 150,
                               "reserved": {MACS[h]: ip for (tt, h), ip in HOST_IP.items() if tt == t}}
    for t in ("a", "b")
}
def _need_root() -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("needs root, iproute2 and nftables")
    if not shutil.which("busybox"):
        pytest.skip("needs busybox (udhcpc, tftp)")


@dataclass
class Fabric:
    lab: Any
    tmp: Path
    assign: dict[str, str | None]  # node -> tenant
    versions: dict[str, int]
    procs: dict[str, Any]

    # ---- helpers --------------------------------------------------------------------------
    def sh(self, ns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        res: subprocess.CompletedProcess[str] = self.lab.exec_in(ns, list(argv), check=False, timeout=timeout)
        return res

    def ok(self, ns: str, *argv: str) -> bool:
        return self.sh(ns, *argv).returncode == 0

    def ping(self, ns: str, dst: str) -> bool:
        return self.ok(ns, "ping", "-c", "1", "-W", "1", dst)

    def drops(self, ns: str, chain: str) -> int:
        """Packets counted by the final ``counter drop`` of one of the agent's chains."""
        out = json.loads(self.sh(ns, "nft", "-j", "list", "chain", "inet", "bootsvc_agent", chain).stdout)
        n = 0
        for item in out["nftables"]:
            for e in item.get("rule", {}).get("expr", []):
                if "counter" in e:
                    n += int(e["counter"]["packets"])
        return n

    def api_state(self) -> dict[str, Any]:
        res = self.sh("boot", "curl", "-sf", "--max-time", "3", f"{API}/test/state")
        return json.loads(res.stdout) if res.returncode == 0 else {}

    def reports(self, node: str) -> list[dict[str, Any]]:
        r: list[dict[str, Any]] = self.api_state().get("reports", {}).get(node, [])
        return r

    def policy(self, node: str) -> dict[str, Any]:
        tenant = self.assign[node]
        i = node[-1]
        gw = GW
        doc: dict[str, Any] = {"schema": 1, "version": str(self.versions[node]), "node": node,
                               "tenant": tenant, "host_port": f"bad{i}hp"}
        if tenant is None:
            return doc
        vrf, table, vni = TENANTS[tenant]
        gwi = IPv4Interface(gw)
        peers = [{"vtep": f"10.255.0.1{o[-1]}", "prefixes": [f"{HOST_IP[(tenant, 'h' + o[-1])]}/32"]}
                 for o, ot in sorted(self.assign.items()) if o != node and ot == tenant]
        doc.update({
            "vrf_name": vrf, "vrf_table": table, "l3vni": vni, "vtep": f"10.255.0.1{i}",
            "vxlan_port": 4789, "host_gateway": gw,
            "flows": [{"zone": 0, "proto": "udp", "dst": f"{BOOT}/32", "dport": 69},
                      {"zone": 0, "proto": "tcp", "dst": f"{BOOT}/32", "dport": 8080},
                      # broad egress like bootsvc's example config: must not capture tenant traffic
                      {"zone": 2, "proto": "tcp", "dst": "0.0.0.0/1", "dport": 443}],
            "relay": {"server": BOOT, "giaddr": None, "link_selection": str(gwi.network.network_address),
                      "server_id_override": str(gwi.ip), "vss_vrf": vrf, "circuit_id": None,
                      "remote_id": None},
            "ra": True, "peers": peers,
        })
        return doc

    def push(self, *nodes: str) -> None:
        for node in nodes:
            self.versions[node] += 1
            body = json.dumps(self.policy(node))
            res = self.sh("boot", "curl", "-sf", "--max-time", "3", "-X", "PUT", "-d", body,
                          f"{API}/test/policy/{node}")
            assert res.returncode == 0, res.stderr

    def wait_report(self, node: str, status: str, timeout: float = 30) -> dict[str, Any]:
        v = str(self.versions[node])

        def found() -> dict[str, Any] | None:
            return next((r for r in self.reports(node)
                         if r["policy_version"] == v and r["status"] == status), None)

        r: dict[str, Any] = wait_for(found, timeout, f"{node} report {status} v{v}")
        return r

    def dhcp(self, host: str) -> str | None:
        """Run a real DHCP client (busybox udhcpc) on the host; returns the bound address."""
        dev = f"ba{host}e0"
        res = self.sh(host, "busybox", "udhcpc", "-i", dev, "-f", "-q", "-n", "-t", "4", "-T", "2",
                      "-s", str(self.tmp / "udhcpc.sh"), timeout=30)
        if res.returncode != 0:
            return None
        out = self.sh(host, "ip", "-j", "-4", "addr", "show", "dev", dev).stdout
        addrs = [a["local"] for li in json.loads(out) for a in li.get("addr_info", [])]
        return addrs[0] if addrs else None

    def dhcp_log(self) -> list[dict[str, Any]]:
        p = self.tmp / "dhcp.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def host_mac(self, host: str) -> str:
        out = json.loads(self.sh(host, "ip", "-j", "link", "show", "dev", f"ba{host}e0").stdout)
        return str(out[0]["address"])

    def start_api(self) -> None:
        self.procs["api"] = self.lab.popen(
            "boot", [sys.executable, str(SRV), "api", BOOT, "8000", str(self.tmp / "api-state.json")],
            env=_env(), stdout=open(self.tmp / "api.log", "ab"))  # noqa: SIM115
        wait_for(lambda: self.ok("boot", "curl", "-sf", "--max-time", "1", f"{API}/test/state"), 15,
                 "agent API up", interval=0.2)


def _env() -> dict[str, str]:
    return child_env()


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    _need_root()
    from bootsvc.lab.netns import Lab, Topology

    tmp = tmp_path_factory.mktemp("ba-agent")
    (tmp / "udhcpc.sh").write_text(UDHCPC_SCRIPT)
    (tmp / "udhcpc.sh").chmod(0o755)
    (tmp / "www").mkdir()
    (tmp / "www" / "boot.ipxe").write_text("#!ipxe\necho tenant boot\n")
    (tmp / "other").mkdir()
    (tmp / "other" / "secret.txt").write_text("zone 0 only\n")
    (tmp / "tftp").mkdir()
    (tmp / "tftp" / "undionly.kpxe").write_bytes(os.urandom(3000))
    nft = shutil.which("nft")
    assert nft

    topo = Topology("ba")
    for ns in ("boot", "d1", "d2", "d3", "h1", "h2", "h3"):
        topo.netns(ns)
    z0 = topo.bridge("boot", "z0", addrs=[f"{BOOT}/24"])
    for i in (1, 2, 3):
        d = f"d{i}"
        topo.veth((d, f"d{i}up"), ("boot", f"d{i}z"), a_addrs=[f"10.98.0.1{i}/24"], b_bridge=z0)
        topo.veth((d, f"d{i}hp"), (f"h{i}", f"h{i}e0"), b_mac=MACS[f"h{i}"])
        for j in (1, 2, 3):
            if j != i:  # underlay: VTEP /32s over the Zone 0 segment
                topo.route(d, f"10.255.0.1{j}/32", via=f"10.98.0.1{j}")
    lab = Lab(topo)
    lab.up()
    fab = Fabric(lab, tmp, {"d1": "a", "d2": "b", "d3": "a"}, {"d1": 0, "d2": 0, "d3": 0}, {})
    try:
        env = _env()
        lab.popen("boot", [sys.executable, str(SRV), "dhcp", BOOT, str(tmp / "dhcp.jsonl"), json.dumps(POOLS)],
                  env=env, stdout=open(tmp / "dhcp.log", "ab"))  # noqa: SIM115
        lab.popen("boot", [sys.executable, "-m", "http.server", "8080", "--bind", BOOT,
                           "--directory", str(tmp / "www")], env=env)
        lab.popen("boot", [sys.executable, "-m", "http.server", "9090", "--bind", BOOT,
                           "--directory", str(tmp / "other")], env=env)
        lab.popen("boot", [sys.executable, "-c",
                           f"import tftpy; tftpy.TftpServer({str(tmp / 'tftp')!r}).listen({BOOT!r}, 69)"],
                  env=env)
        (tmp / "api-state.json").write_text(json.dumps({n: fab.policy(n) for n in ("d1", "d2", "d3")}))
        fab.start_api()
        for i in (1, 2, 3):
            node = f"d{i}"
            wrap = tmp / f"nft-{node}"
            wrap.write_text(f'#!/bin/sh\nif [ -e {tmp}/fail-nft-{node} ] && [ "$1" = "-f" ]; then\n'
                            f'  echo "injected nft failure" >&2; exit 1\nfi\nexec {nft} "$@"\n')
            wrap.chmod(wrap.stat().st_mode | stat.S_IEXEC)
            conf = tmp / f"agent-{node}.conf"
            conf.write_text(
                "[agent]\n"
                f"url = {API}\nnode = {node}\nnode_id = {i}\nsecret = {node_secret(node)}\n"
                f"host_port = bad{i}hp\nuplink = bad{i}up\nserial = MT-D{i}\n"
                f"state_dir = {tmp}/state-{node}\nmode = auto\npoll_interval = 1\nretry_failed = 2\n"
                f"backoff_max = 2\nra_interval = 5\nnft = {wrap}\n")
            fab.procs[node] = lab.popen(
                node, [sys.executable, "-m", "bootsvc.agent.main", "-c", str(conf), "--log-level", "INFO"],
                env=env, cwd=REPO, stdout=open(tmp / f"agent-{node}.log", "ab"))  # noqa: SIM115
        for node in ("d1", "d2", "d3"):
            fab.wait_report(node, "applied")
        yield fab
    finally:
        if os.environ.get("BA_KEEP_LOGS"):
            for f in sorted(tmp.glob("*.log")):
                print(f"==== {f.name}\n{f.read_text()[-4000:]}")
        lab.down()


def test_hosts_get_addresses_via_relay_with_option82_and_vss(fabric: Fabric) -> None:
    f = fabric
    assert f.dhcp("h1") == "10.0.0.101"
    assert f.dhcp("h2") == "10.0.0.101"  # same address, other tenant: overlap works
    assert f.dhcp("h3") == "10.0.0.103"
    log = f.dhcp_log()
    for host, dpu, vrf in (("h1", "d1", "bavrf-a"), ("h2", "d2", "bavrf-b"), ("h3", "d3", "bavrf-a")):
        recs = [r for r in log if r.get("mac") == MACS[host]]
        assert recs, f"server saw nothing from {host}"
        i = dpu[-1]
        for r in recs:
            assert r["vrf"] == vrf
            assert r["vss_control"] is True  # relay asked for VSS confirmation (RFC 6607)
            assert r["circuit_id"] == f"bad{i}hp"
            assert r["remote_id"] == f"MT-D{i}"
            assert r["giaddr"] == r["src"] == f"10.98.0.1{i}"  # Zone 0 address, routable
            assert r["link_selection"] == "10.0.0.0"
            assert r["server_id_override"] == "10.0.0.1"
            assert r["hops"] == 1
        assert {r["msg"] for r in recs} >= {1, 3}  # DISCOVER and REQUEST both relayed

    # checkins carry the health summary, including relay counters
    def health() -> dict[str, Any] | None:
        h: dict[str, Any] = f.api_state()["checkins"]["d1"][-1]["health"]
        return h if (h["relay"] or {}).get("replies", 0) >= 2 else None

    h = wait_for(health, 10, "relay reply counter in d1's health")
    assert h["applied_version"] == str(f.versions["d1"]) and h["mode"] in ("vrf", "table")
    assert h["tenant"] == "a" and h["last_error"] is None and h["relay"]["requests"] >= 2


def test_renewal_is_unicast_to_the_override_and_relayed(fabric: Fabric) -> None:
    """RFC 5107: the client renews with the server-id override (its gateway) as server identifier, so
    the unicast RENEW reaches the agent, which adds option 82 again (RFC 3046 §2.1.1)."""
    f = fabric
    out = f.tmp / "udhcpc-renew.log"
    proc = f.lab.popen("h1", ["busybox", "udhcpc", "-i", "bah1e0", "-f", "-t", "4", "-T", "2",
                              "-s", str(f.tmp / "udhcpc.sh")], stdout=open(out, "ab"))  # noqa: SIM115
    try:
        wait_for(lambda: out.read_text().count("obtained") >= 1, 15, "lease")
        before = len(f.dhcp_log())
        proc.send_signal(10)  # SIGUSR1: renew now
        rec = wait_for(lambda: next((r for r in f.dhcp_log()[before:]
                                     if r.get("mac") == MACS["h1"] and r["ciaddr"] == "10.0.0.101"), None),
                       15, "relayed RENEW")
        assert rec["msg"] == 3 and rec["vrf"] == "bavrf-a" and rec["circuit_id"] == "bad1hp"
        assert rec["giaddr"] == "10.98.0.11"
        wait_for(lambda: out.read_text().count("obtained") >= 2, 15, "renewed lease (ACK delivered to ciaddr)")
    finally:
        f.lab.stop(proc, grace=1)


def test_zones_with_real_traffic(fabric: Fabric) -> None:
    f = fabric
    # Zone 1: tenant A's hosts reach each other across DPUs through the L3VNI (VXLAN), inside one
    # anycast subnet (the DPU answers ARP for the remote host: proxy ARP)
    assert f.ping("h1", "10.0.0.103")
    assert f.ping("h3", "10.0.0.101")
    assert f.ping("h1", "10.0.0.1")  # own gateway
    # tenant B cannot reach tenant A
    assert not f.ping("h2", "10.0.0.103")
    # Zone 0: only the boot endpoints of the policy
    assert f.ok("h1", "curl", "-sf", "--max-time", "3", f"http://{BOOT}:8080/boot.ipxe")
    assert f.ok("boot", "curl", "-sf", "--max-time", "3", f"http://{BOOT}:9090/secret.txt")  # it is up
    fw0, in0 = f.drops("d1", "from_tenant_fw"), f.drops("d1", "from_tenant_in")
    assert not f.ok("h1", "curl", "-sf", "--max-time", "3", f"http://{BOOT}:9090/secret.txt")
    assert not f.ping("h1", BOOT)
    fw1 = f.drops("d1", "from_tenant_fw")
    assert fw1 >= fw0 + 2  # dropped by the zone firewall (not merely unroutable)
    assert not f.ping("h1", "10.98.0.11")  # the DPU's own Zone 0 address
    assert f.drops("d1", "from_tenant_in") > in0
    assert not f.ping("h1", "10.98.0.12")  # another DPU
    # TFTP through conntrack helper + NAT
    got = f.sh("h1", "busybox", "tftp", "-g", "-r", "undionly.kpxe", "-l", str(f.tmp / "got.kpxe"), BOOT)
    assert got.returncode == 0, got.stderr
    assert (f.tmp / "got.kpxe").read_bytes() == (f.tmp / "tftp" / "undionly.kpxe").read_bytes()
    # a service on the DPU itself (listening on all addresses) is not reachable from the host
    listener = f.lab.popen("d1", ["busybox", "nc", "-l", "-p", "7777"])
    try:
        wait_for(lambda: "7777" in f.sh("d1", "ss", "-ltn").stdout, 5, "listener on DPU", interval=0.2)
        in1 = f.drops("d1", "from_tenant_in")
        assert not f.ok("h1", "busybox", "nc", "-w", "2", "10.0.0.1", "7777")
        assert f.drops("d1", "from_tenant_in") > in1
        assert f.ok("boot", "busybox", "nc", "-w", "2", "10.98.0.11", "7777")  # it does answer Zone 0
    finally:
        f.lab.stop(listener, grace=1)
    # IPv6 RA on the host segment (answering a Router Solicitation)
    probe = (
        "import socket,struct,select,sys\n"
        "s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_ICMPV6)\n"
        "s.setsockopt(socket.SOL_SOCKET,25,b'bah1e0')\n"
        "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_MULTICAST_HOPS,255)\n"
        "i=socket.if_nametoindex('bah1e0')\n"
        "s.sendto(struct.pack('!BBHI',133,0,0,0),('ff02::2',0,0,i))\n"
        "import time; end=time.time()+8\n"
        "while time.time()<end:\n"
        "  r,_,_=select.select([s],[],[],end-time.time())\n"
        "  if r:\n"
        "    d,a=s.recvfrom(2048)\n"
        "    if d[0]==134: print('RA',a[0],d[4],d[5]); sys.exit(0)\n"
        "sys.exit(1)\n")
    res = f.sh("h1", sys.executable, "-c", probe)
    assert res.returncode == 0, res.stderr
    _, src, _hop, flags = res.stdout.split()
    assert src.startswith("fe80::") and flags == "0"  # link-local router, no M/O: iPXE stops waiting


def test_tenant_reassignment(fabric: Fabric) -> None:
    f = fabric
    f.assign["d2"] = "a"
    f.push("d2", "d1", "d3")  # d1/d3 learn the new peer
    for node in ("d2", "d1", "d3"):
        f.wait_report(node, "applied")
    assert f.dhcp("h2") == "10.0.0.102"
    assert f.dhcp_log()[-1]["vrf"] == "bavrf-a"
    assert f.ping("h2", "10.0.0.101")
    assert f.ping("h2", "10.0.0.103")
    links = {li["ifname"] for li in f.lab.links("d2")}
    assert "babr5001" in links and "babr5002" not in links  # tenant B's devices are gone


def test_failed_apply_rolls_back_and_is_reported(fabric: Fabric) -> None:
    f = fabric
    marker = f.tmp / "fail-nft-d2"
    marker.write_text("")
    f.assign["d2"] = "b"
    f.push("d2")
    rep = f.wait_report("d2", "failed")
    assert "injected nft failure" in rep["error"]
    assert rep["health"]["applied_version"] == str(f.versions["d2"] - 1)
    # the ip-level half of the failed apply was rolled back: still tenant A, still working
    links = {li["ifname"] for li in f.lab.links("d2")}
    assert "babr5001" in links and "babr5002" not in links
    assert f.ping("h2", "10.0.0.101")
    plan = f.sh("d2", sys.executable, "-m", "bootsvc.agent.main", "-c", str(f.tmp / "agent-d2.conf"), "--plan")
    assert plan.returncode == 0 and plan.stdout.strip() == "", plan.stdout  # kernel == applied policy
    # fault gone: the same version is retried and applied
    marker.unlink()
    f.wait_report("d2", "applied")
    assert f.dhcp("h2") == "10.0.0.101"
    assert f.dhcp_log()[-1]["vrf"] == "bavrf-b"
    assert not f.ping("h2", "10.0.0.103")
    f.push("d1", "d3")  # d1/d3 drop d2 from their peers
    f.wait_report("d1", "applied")
    f.wait_report("d3", "applied")


def test_removal_isolates_the_host(fabric: Fabric) -> None:
    f = fabric
    f.assign["d3"] = None
    f.push("d3", "d1")
    f.wait_report("d3", "applied")
    f.wait_report("d1", "applied")
    assert not f.ping("h3", "10.0.0.1")
    assert not f.ping("h1", "10.0.0.103")
    assert f.dhcp("h3") is None  # no relay any more
    assert not [li for li in f.lab.links("d3") if li.get("ifalias") == "bootsvc-agent"]
    rules = json.loads(f.sh("d3", "ip", "-j", "rule", "show").stdout)
    assert not [r for r in rules if 900 <= r["priority"] < 1000]
    assert "jump from_tenant_fw" in f.sh("d3", "nft", "list", "table", "inet", "bootsvc_agent").stdout


def test_survives_server_outage_repairs_drift_and_catches_up(fabric: Fabric) -> None:
    f = fabric
    f.lab.stop(f.procs.pop("api"), grace=1)
    # the data plane keeps working, and drift is repaired without the server
    f.sh("d1", "ip", "rule", "del", "pref", "960", "iif", "bad1hp", "lookup", "1001")
    wait_for(lambda: "iif bad1hp lookup 1001" in f.sh("d1", "ip", "rule", "show").stdout, 15,
             "agent restores a deleted rule while bootsvc is down", interval=0.2)
    assert f.ping("h1", "10.0.0.1")
    assert f.ok("h1", "curl", "-sf", "--max-time", "3", f"http://{BOOT}:8080/boot.ipxe")
    # while it is down, bootsvc's desired state changes: d3 back into tenant A
    f.assign["d3"] = "a"
    for node in ("d3", "d1"):
        f.versions[node] += 1
    state = json.loads((f.tmp / "api-state.json").read_text())
    state["d3"], state["d1"] = f.policy("d3"), f.policy("d1")
    (f.tmp / "api-state.json").write_text(json.dumps(state))
    f.start_api()
    f.wait_report("d3", "applied", timeout=40)
    f.wait_report("d1", "applied", timeout=40)
    assert f.dhcp("h3") == "10.0.0.103"
    assert f.ping("h3", "10.0.0.101")
