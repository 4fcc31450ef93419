"""The lab's leaf switch: one FRR instance (zebra + bgpd) in the rack namespace ``<prefix>-leaf``.

Owns: the leaf's part of the rack topology (its namespace, one link per DPU uplink), its ``frr.conf``
and starting its daemons. :mod:`bootsvc.lab.fabric` has the helpers tests use on top of it (commands
on the DPU VMs, captures on the leaf's links, the topology as data).

Topology, per rack machine ``i`` (prefix ``bx``)::

    bx-m<i>   tap bx<i>d2 (the DPU VM's third NIC, eth2: its uplink) --- bridge bx<i>ub --- veth bx<i>u
                                                                                              |
    bx-leaf                                                                          veth bx<i>l

What the leaf does, and why this way:

* **BGP unnumbered** on every link (``neighbor <dev> interface``, peer-group ``remote-as external``):
  IPv6 link-local sessions whose peers are found from router advertisements, carrying IPv4 routes with
  IPv6 next hops (RFC 8950) - the same scheme the DPUs' agent renders (bootsvc/agent/frr.py), as in an
  eBGP Clos fabric (RFC 7938 section 5: one private ASN per tier, here 65000 for the leaf).
* **IPv4 unicast** carries the DPUs' VTEP /32s (underlay); zebra installs them into the leaf's kernel
  with the peers' link-local next hops, so VXLAN packets between two DPUs are routed through the leaf
  (and can be captured on its links).
* **l2vpn evpn** relays the DPUs' EVPN routes (Type-5 IP prefix routes, RFC 9136) from one DPU to the
  others. The leaf imports none of them: it has **no VRF, no VNI and no VXLAN device** (FRR keeps EVPN
  routes it does not import in its global table and re-advertises them to its other eBGP peers, keeping
  the originating VTEP as the next hop). That is why it runs in a namespace of this machine, whose kernel
  lacks ``CONFIG_NET_VRF``: the VRFs, L3VNIs and VXLAN tunnels live only on the DPU VMs, whose kernels
  have them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bootsvc.lab import netns

LEAF = "leaf"  # short namespace name: <prefix>-leaf
LEAF_ASN = 65000  # RFC 6996 private ASN; the DPUs use fabric.asn + node id (config/lab.yaml)
LEAF_ROUTER_ID = "10.255.255.254"  # outside the lab's VTEP network (10.255.0.0/24)
DPU_UPLINK = "eth2"  # the DPU VM's uplink as its kernel names it (config/lab.yaml fabric.uplinks)
FRR_LIB = Path("/usr/lib/frr")
START_TIMEOUT = 30.0
RUN_ROOT = Path("/run/bootsvc-lab-frr")


def leaf_dev(prefix: str, index: int) -> str:
    """The leaf's device facing machine ``index``'s DPU uplink."""
    return f"{prefix}{index}l"


def uplink_tap(prefix: str, index: int) -> str:
    """The tap (in the machine namespace) that is the DPU VM's uplink NIC."""
    return f"{prefix}{index}d2"


def add_to_topology(t: netns.Topology, indexes: Sequence[int]) -> None:
    """The leaf namespace and one link per machine (``indexes``) into ``t``; the taps are declared here
    too (the DPU VM's third NIC). The machine namespaces must already be declared."""
    t.netns(LEAF)
    t.sysctl(LEAF, "net.ipv4.ip_forward", 1)
    t.sysctl(LEAF, "net.ipv6.conf.all.forwarding", 1)
    for i in indexes:
        s = f"m{i}"
        ub = t.bridge(s, f"{i}ub")
        t.tap(s, f"{i}d2", bridge=ub)
        t.veth((s, f"{i}u"), (LEAF, f"{i}l"), a_bridge=ub)


def render_conf(devs: Sequence[str], *, asn: int = LEAF_ASN, router_id: str = LEAF_ROUTER_ID) -> str:
    """The leaf's frr.conf (pure). ``frr defaults datacenter`` (FRR user guide, "Profiles": 3/9 s
    timers, no ``ebgp-requires-policy``) must come before ``router bgp``."""
    lines = ["! bootsvc lab leaf (bootsvc/lab/leaf.py): BGP unnumbered, underlay + EVPN relay, no VRF",
             "frr defaults datacenter", "hostname leaf", "!", f"router bgp {asn}", f" bgp router-id {router_id}",
             " neighbor fabric peer-group", " neighbor fabric remote-as external"]
    lines += [f" neighbor {d} interface peer-group fabric" for d in devs]
    lines += [" !", " address-family ipv4 unicast", "  neighbor fabric activate", " exit-address-family", " !",
              " address-family l2vpn evpn", "  neighbor fabric activate", " exit-address-family", "exit", "!"]
    return "\n".join(lines) + "\n"


def rundir(prefix: str) -> Path:
    """The leaf's FRR run directory (vty sockets, pid files, logs, frr.conf): under /run, because FRR's
    daemons drop to user ``frr``, which must reach it (a rack's workdir may sit in a 0700 temp dir)."""
    return RUN_ROOT / f"{prefix}-{LEAF}"


def vtysh_argv(prefix: str) -> list[str]:
    return ["vtysh", "--vty_socket", str(rundir(prefix))]


def sessions(prefix: str, timeout: float = 20.0) -> dict[str, str] | None:
    """Leaf device -> BGP state of its session (``Established`` when up); None when the leaf's FRR does
    not answer (lab down)."""
    try:
        res = subprocess.run([*vtysh_argv(prefix), "-c", "show bgp neighbors json"], capture_output=True, text=True,
                             timeout=timeout, check=False)
        doc = json.loads(res.stdout) if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {str(k): str(v.get("bgpState", "?")) for k, v in doc.items() if isinstance(v, dict)}


def stop(prefix: str) -> None:
    """Remove the run directory (``rack.down``; the daemons died with the leaf's namespace)."""
    shutil.rmtree(rundir(prefix), ignore_errors=True)


def start(prefix: str, devs: Sequence[str]) -> list[int]:
    """Start zebra + bgpd inside ``<prefix>-leaf`` and load :func:`render_conf`; returns their PIDs
    (the rack records them; ``rack.down`` also kills whatever runs in its namespaces)."""
    if not (FRR_LIB / "bgpd").exists():
        raise netns.LabError("Debian's frr is not installed (/usr/lib/frr/bgpd): apt-get install frr "
                             "(Makefile APT_TEST has it)")
    ns = f"{prefix}-{LEAF}"
    d = rundir(prefix)
    if d.exists():
        shutil.rmtree(d)
    RUN_ROOT.mkdir(mode=0o755, exist_ok=True)
    d.mkdir()
    # the daemons drop to user frr: their directory (and every parent) must be reachable by it
    shutil.chown(d, "frr", "frr")
    os.chmod(d, 0o755)
    common = ["-z", str(d / "zserv.api"), "--vty_socket", str(d), "-f", "/dev/null", "-A", "127.0.0.1", "-P", "0",
              "-d"]
    pids: list[int] = []
    for daemon in ("zebra", "bgpd"):
        extra = ["-p", "179"] if daemon == "bgpd" else []
        res = subprocess.run(["ip", "netns", "exec", ns, str(FRR_LIB / daemon), *common, *extra,
                              "-i", str(d / f"{daemon}.pid"), "--log", f"file:{d / daemon}.log"],
                             capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
        if res.returncode != 0:
            raise netns.LabError(f"leaf {daemon} did not start: {(res.stderr or res.stdout).strip()[-300:]}")
        pids.append(int((d / f"{daemon}.pid").read_text()))
    conf = d / "frr.conf"
    conf.write_text(render_conf(devs))
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # bgpd's vty socket appears a moment after the pid file
        res = subprocess.run([*vtysh_argv(prefix), "-f", str(conf)], capture_output=True, text=True,
                             timeout=START_TIMEOUT, check=False)
        if res.returncode == 0:
            return pids
        if time.monotonic() > deadline:
            raise netns.LabError(f"leaf FRR refused its config: {(res.stderr or res.stdout).strip()[-300:]}")
        time.sleep(0.2)
