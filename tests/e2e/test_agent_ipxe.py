"""Real iPXE (SeaBIOS + Debian's virtio iPXE ROM, QEMU) behind a DPU namespace running the agent.

    bae-boot: baez0 10.98.0.1/24 — VSS DHCP responder, agent API :8000, HTTP :8080 (boot script)
      |-- baed1up 10.98.0.11  bae-d1 (DPU, agent, tenant A, gateway 10.0.0.1/24 on the tap)
                                 |-- baed1tap == QEMU VM (the "host"), run inside bae-d1

The VM's firmware DHCP goes through the agent's relay (option 82 + VSS), its HTTP fetches through the
zone firewall + NAT, and the agent's RA ends iPXE's IPv6 wait: the boot script calls back over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers.agent_labsrv import SCRIPT as SRV
from helpers.agent_labsrv import node_secret
from helpers.waits import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
BOOT = "10.98.0.1"
MAC = "52:54:00:ba:00:01"


def test_ipxe_boots_through_the_agent(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("qemu-system-x86_64") or not shutil.which("nft"):
        pytest.skip("needs root, qemu-system-x86_64 and nftables")
    from bootsvc.lab.netns import Lab, Topology
    from bootsvc.lab.qemu import PXE_ROM, Nic, Vm, VmKind, VmSpec

    if not PXE_ROM.exists():
        pytest.skip(f"{PXE_ROM} missing (Debian ipxe-qemu)")
    www = tmp_path / "www"
    www.mkdir()
    (www / "boot.ipxe").write_text(f"#!ipxe\nchain http://{BOOT}:8080/cb?mac=${{net0/mac}}&ip=${{net0/ip}}\n")
    (www / "cb").write_text("#!ipxe\nshell\n")
    pools = {"bavrf-a|10.0.0.0/24": {"gateway": "10.0.0.1", "first": 100,
                                     "bootfile": f"http://{BOOT}:8080/boot.ipxe"}}
    policy = {
        "schema": 1, "version": "1", "node": "d1", "tenant": "a", "vrf_name": "bavrf-a", "vrf_table": 1001,
        "l3vni": 5001, "vtep": "10.255.0.11", "vxlan_port": 4789, "host_port": "baed1tap",
        "host_gateway": "10.0.0.1/24",
        "flows": [{"zone": 0, "proto": "tcp", "dst": f"{BOOT}/32", "dport": 8080}],
        "relay": {"server": BOOT, "link_selection": "10.0.0.0", "server_id_override": "10.0.0.1",
                  "vss_vrf": "bavrf-a"},
        "ra": True, "peers": [],
    }
    (tmp_path / "api-state.json").write_text(json.dumps({"d1": policy}))
    (tmp_path / "agent.conf").write_text(
        f"[agent]\nurl = http://{BOOT}:8000\nnode = d1\nsecret = {node_secret('d1')}\nhost_port = baed1tap\n"
        f"uplink = baed1up\nserial = MT-D1\nstate_dir = {tmp_path}/state\npoll_interval = 1\n")
    topo = Topology("bae")
    topo.netns("boot")
    topo.netns("d1")
    z0 = topo.bridge("boot", "z0", addrs=[f"{BOOT}/24"])
    topo.veth(("d1", "d1up"), ("boot", "d1z"), a_addrs=["10.98.0.11/24"], b_bridge=z0)
    topo.tap("d1", "d1tap")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with Lab(topo) as lab:
        lab.popen("boot", [sys.executable, str(SRV), "dhcp", BOOT, str(tmp_path / "dhcp.jsonl"),
                           json.dumps(pools)], env=env)
        lab.popen("boot", [sys.executable, str(SRV), "api", BOOT, "8000", str(tmp_path / "api-state.json")],
                  env=env)
        http_log = tmp_path / "http.log"
        lab.popen("boot", [sys.executable, "-u", "-m", "http.server", "8080", "--bind", BOOT,
                           "--directory", str(www)], env=env, stdout=open(http_log, "ab"))  # noqa: SIM115
        lab.popen("d1", [sys.executable, "-m", "bootsvc.agent.main", "-c", str(tmp_path / "agent.conf")],
                  env=env, cwd=REPO, stdout=open(tmp_path / "agent.log", "ab"))  # noqa: SIM115
        wait_for(lambda: "applied policy 1" in (tmp_path / "agent.log").read_text(), 30, "agent applied")
        spec = VmSpec(name="ba-ipxe", kind=VmKind.BIOS, netns=lab.ns("d1"), nics=(Nic(topo.dev("d1tap"), MAC),))
        t0 = time.monotonic()
        with Vm(spec, tmp_path, on_pid=lab.record_pid):
            line = wait_for(lambda: re.search(r"GET /cb\?mac=([0-9a-f:]+)&ip=([0-9.]+)",
                                              unquote(http_log.read_text())),
                            90, "iPXE callback through the DPU")
            elapsed = time.monotonic() - t0
        assert line.group(1) == MAC and line.group(2) == "10.0.0.100"
        recs = [json.loads(x) for x in (tmp_path / "dhcp.jsonl").read_text().splitlines()]
        mine = [r for r in recs if r.get("mac") == MAC]
        assert mine and all(r["vrf"] == "bavrf-a" and r["circuit_id"] == "baed1tap" for r in mine)
        print(f"iPXE callback through the agent after {elapsed:.1f}s")
        # Without the agent's RA iPXE sits ~14 s longer in IPv6 autoconf: measured here under TCG,
        # 6.2 s with RA vs 20.0 s with "ra": false (lab.md §5 saw the same 16 s with dnsmasq).
        assert elapsed < 14
