"""The agent's relay against bootsvc's *own* DHCP server (``python -m bootsvc.dhcp.server``), not a stub.

    bar-boot: barz0 10.98.0.1/24 — bootsvc DHCP (SQLite), agent API :8000 (test server)
      |-- bard1up 10.98.0.11  bar-d1 (tenant A)  -- bard1hp ==== barh1e0  bar-h1
      |-- bard2up 10.98.0.12  bar-d2 (tenant B)  -- bard2hp ==== barh2e0  bar-h2

Both tenants use 10.0.0.0/24 with gateway 10.0.0.1: the server must select the pool by (VSS VRF,
link-selection), reply to the agent's giaddr in Zone 0, echo option 82 without VSS-Control (else the
agent drops the reply), and store one lease per (VRF, address).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_labsrv import SCRIPT as SRV
from helpers.agent_labsrv import UDHCPC_SCRIPT, node_secret
from helpers.netns import REPO, child_env
from helpers.waits import wait_for

pytestmark = pytest.mark.netns

BOOT = "10.98.0.1"
MACS = {"h1": "02:ba:00:00:01:01", "h2": "02:ba:00:00:01:02"}
TENANT = {"d1": ("a", "bavrf-a", 1001, 5001), "d2": ("b", "bavrf-b", 1002, 5002)}

CONFIG = """
database: {{url: "sqlite:///{db}"}}
tenants:
  - {{name: a, vrf: bavrf-a, l3vni: 5001}}
  - {{name: b, vrf: bavrf-b, l3vni: 5002}}
networks:
  - {{name: mgmt, zone: 0, cidr: 10.98.0.0/24, gateway: 10.98.0.1, boot_server: 10.98.0.1,
     pools: [{{start: 10.98.0.100, end: 10.98.0.199}}]}}
  - {{name: a-hosts, zone: 1, vrf: bavrf-a, cidr: 10.0.0.0/24, gateway: 10.0.0.1, boot_server: 10.98.0.1,
     pools: [{{start: 10.0.0.100, end: 10.0.0.199}}], lease_seconds: 600}}
  - {{name: b-hosts, zone: 1, vrf: bavrf-b, cidr: 10.0.0.0/24, gateway: 10.0.0.1, boot_server: 10.98.0.1,
     pools: [{{start: 10.0.0.100, end: 10.0.0.199}}], lease_seconds: 600}}
listeners:
  dhcp: [{{interface: barz0}}]
dhcp: {{unknown_clients: serve, per_relay_rate: 1000, per_mac_rate: 50}}
boot: {{http_port: 8080}}
"""


def policy(node: str) -> dict[str, Any]:
    tenant, vrf, table, vni = TENANT[node]
    i = node[-1]
    return {
        "schema": 1, "version": "1", "node": node, "tenant": tenant, "vrf_name": vrf, "vrf_table": table,
        "l3vni": vni, "vtep": f"10.255.0.2{i}", "vxlan_port": 4789, "host_port": f"bard{i}hp",
        "host_gateway": "10.0.0.1/24",
        "flows": [{"zone": 0, "proto": "tcp", "dst": f"{BOOT}/32", "dport": 8080}],
        "relay": {"server": BOOT, "giaddr": None, "link_selection": "10.0.0.0", "server_id_override": "10.0.0.1",
                  "vss_vrf": vrf, "circuit_id": None, "remote_id": None},
        "ra": False, "peers": [],
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("busybox"):
        pytest.skip("needs root, nftables and busybox")
    from bootsvc.lab.netns import Lab, Topology

    tmp = tmp_path_factory.mktemp("bar")
    (tmp / "udhcpc.sh").write_text(UDHCPC_SCRIPT)
    (tmp / "udhcpc.sh").chmod(0o755)
    (tmp / "bootsvc.yaml").write_text(CONFIG.format(db=tmp / "bootsvc.db"))
    (tmp / "api-state.json").write_text(json.dumps({n: policy(n) for n in TENANT}))
    topo = Topology("bar")
    for ns in ("boot", "d1", "d2", "h1", "h2"):
        topo.netns(ns)
    z0 = topo.bridge("boot", "z0", addrs=[f"{BOOT}/24"])
    for i in (1, 2):
        topo.veth((f"d{i}", f"d{i}up"), ("boot", f"d{i}z"), a_addrs=[f"10.98.0.1{i}/24"], b_bridge=z0)
        topo.veth((f"d{i}", f"d{i}hp"), (f"h{i}", f"h{i}e0"), b_mac=MACS[f"h{i}"])
    env = child_env()
    lab = Lab(topo)
    lab.up()
    lab.tmp = tmp  # type: ignore[attr-defined]
    try:
        lab.popen("boot", [sys.executable, "-m", "bootsvc.dhcp.server", str(tmp / "bootsvc.yaml"), "--create-schema"],
                  env=env, cwd=REPO, stdout=open(tmp / "dhcp.log", "ab"))  # noqa: SIM115
        lab.popen("boot", [sys.executable, str(SRV), "api", BOOT, "8000", str(tmp / "api-state.json")], env=env)
        wait_for(lambda: ":67" in lab.exec_in("boot", ["ss", "-Hlun", "sport = :67"], check=False).stdout, 30,
                 "bootsvc DHCP listening", interval=0.2)
        for i in (1, 2):
            node = f"d{i}"
            conf = tmp / f"agent-{node}.conf"
            conf.write_text(
                f"[agent]\nurl = http://{BOOT}:8000\nnode = {node}\nsecret = {node_secret(node)}\n"
                f"host_port = bard{i}hp\nuplink = bard{i}up\nserial = MT-R{i}\nstate_dir = {tmp}/state-{node}\n"
                "poll_interval = 1\n")
            lab.popen(node, [sys.executable, "-m", "bootsvc.agent.main", "-c", str(conf)], env=env, cwd=REPO,
                      stdout=open(tmp / f"agent-{node}.log", "ab"))  # noqa: SIM115
        for node in TENANT:
            log = tmp / f"agent-{node}.log"

            def applied(log: Path = log) -> bool:
                return "applied policy 1" in log.read_text()

            wait_for(applied, 30, f"{node} applied")
        yield lab
    finally:
        lab.down()


def leases(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM leases")]
    finally:
        con.close()


def test_overlapping_tenants_lease_from_bootsvc_dhcp_through_the_agents(lab: Any) -> None:
    tmp: Path = lab.tmp
    got = {}
    for h in ("h1", "h2"):
        res = lab.exec_in(h, ["busybox", "udhcpc", "-i", f"bar{h}e0", "-f", "-q", "-n", "-t", "5", "-T", "2",
                              "-s", str(tmp / "udhcpc.sh")], check=False, timeout=40)
        assert res.returncode == 0, (res.stdout, res.stderr, (tmp / "dhcp.log").read_text()[-3000:])
        out = json.loads(lab.exec_in(h, ["ip", "-j", "-4", "addr", "show", "dev", f"bar{h}e0"]).stdout)
        got[h] = out[0]["addr_info"][0]["local"]
    assert got["h1"] == got["h2"] == "10.0.0.100"  # the same first address, once per VRF
    rows = {(r["vrf"], r["mac"]): r for r in leases(tmp / "bootsvc.db") if r["state"] == "bound"}
    a, b = rows[("bavrf-a", MACS["h1"])], rows[("bavrf-b", MACS["h2"])]
    assert a["address"] == b["address"] == "10.0.0.100"
    assert (a["relay"], a["circuit_id"], a["remote_id"]) == ("10.98.0.11", "bard1hp", "MT-R1")
    assert (b["relay"], b["circuit_id"], b["remote_id"]) == ("10.98.0.12", "bard2hp", "MT-R2")
    # each host reaches its own gateway (and so is really in its tenant's routing table)
    for h in ("h1", "h2"):
        assert lab.exec_in(h, ["ping", "-c", "1", "-W", "2", "10.0.0.1"], check=False).returncode == 0
