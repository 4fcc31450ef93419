"""Real FRR (Debian's ``frr`` 8.4) loading the agent's rendered config, in network namespaces.

Topology (test-owned namespaces ``fr<hex>-*``, every daemon started by PID with its own config and
run directory; nothing listens outside these namespaces)::

    leaf (AS 65100)  l1a ==== p0  d1 (AS 65011, VTEP 10.255.0.11 on lo)
                     l1b ==== p1
                     l2a ==== p0  d2 (AS 65012, VTEP 10.255.0.12 on lo)
                     l2b ==== p1

Every link is a veth pair with only IPv6 link-local addresses: BGP unnumbered (``neighbor <if>
interface``), IPv4 routes with IPv6 next hops (RFC 8950). The DPUs' configs are what bootsvc's policy
builder and the agent's renderer produce, loaded with ``frr-reload.py`` (bootsvc.agent.frrd).

What this machine cannot do: its kernel lacks CONFIG_NET_VRF, so the tenant VRF the agent renders is
accepted by FRR but stays inactive (zebra: L3VNI ``Down``, no VXLAN/SVI) - the gate says so (a real
negative). To produce real EVPN Type-5 routes anyway, the test adds an L3VNI to the *default* VRF
(bridge + VXLAN device, ``vrf default / vni 4001``, ``advertise ipv4 unicast``) as a stand-in for the
tenant VRF; the DPU VMs (kernel with VRF) run the agent's config as rendered. ``BOOTSVC_CAPTURE_FRR=1``
rewrites ``tests/data/frr/*.json`` from this run (the unit tests parse those captures).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from helpers.waits import wait_for as shared_wait_for

from bootsvc import config as config_mod
from bootsvc.agent.dataplane import Dataplane, Tools
from bootsvc.agent.fabric_health import report as fabric_report
from bootsvc.agent.fabric_health import vrf_routes
from bootsvc.agent.frr import render
from bootsvc.agent.frrd import QUERIES, VRF_ROUTES, Frr, FrrError, FrrTools
from bootsvc.agent.policy import parse
from bootsvc.fabric import expect_from_policy, gate, session_drops
from bootsvc.policy import Peer, TenantInfo, build

pytestmark = pytest.mark.netns

FRR_LIB = Path("/usr/lib/frr")
DATA = Path(__file__).resolve().parents[1] / "data" / "frr"
LEAF_ASN = 65100
HOST = {"d1": "10.0.0.101/32", "d2": "10.0.0.102/32"}  # reserved host-pf addresses
STANDIN = {"d1": "10.77.0.1/32", "d2": "10.77.0.2/32"}  # default-VRF stand-in host prefixes
STANDIN_VNI = 4001


# every poll runs vtysh or `ip -j` (a process each): four a second, not twenty
wait_for = partial(shared_wait_for, interval=0.25)


def site() -> Any:
    return config_mod.from_mapping({
        "database": {"url": "sqlite:///:memory:"},
        "networks": [
            {"name": "mgmt", "zone": 0, "cidr": "10.98.0.0/24", "gateway": "10.98.0.1", "boot_server": "10.98.0.1"},
            {"name": "acme-hosts", "zone": 1, "vrf": "vrf-acme", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
            {"name": "blue-hosts", "zone": 1, "vrf": "vrf-blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
        ],
        "tenants": [{"name": "acme", "vrf": "vrf-acme", "l3vni": 5001},
                    {"name": "blue", "vrf": "vrf-blue", "l3vni": 5002}],
        "orchestration": {"vtep_network": "10.255.0.0/24"},
        "fabric": {"asn": 65000, "uplinks": ["p0", "p1"]},
    }, "<frr-netns-test>", env={})


def policy_doc(node: str, tenant: str = "acme") -> dict[str, Any]:
    """What bootsvc would send: the full tenant peer list goes in, only this DPU's host comes out."""
    node_id = int(node[1:]) + 10
    vrf, vni = {"acme": ("vrf-acme", 5001), "blue": ("vrf-blue", 5002)}[tenant]
    peers = [Peer(f"10.255.0.{int(n[1:]) + 10}", (HOST[n],)) for n in HOST]
    return build(site(), node_id=node_id, node_name=node, serial="", tenant=TenantInfo(tenant, vrf, vni, None),
                 peers=peers)


@dataclass
class Lab:
    prefix: str
    root: Path
    pids: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=20)

    def nsx(self, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], check=True, capture_output=True,
                              text=True, timeout=20)

    def rundir(self, name: str) -> Path:
        return self.root / name

    def frr(self, name: str) -> Frr:
        d = self.rundir(name)
        return Frr(FrrTools(vty_socket=str(d), conf_dir=str(d / "etc")), d / "state")

    def start_frr(self, name: str, daemons: tuple[str, ...] = ("zebra", "bgpd")) -> None:
        d = self.rundir(name)
        d.mkdir()
        (d / "state").mkdir()
        (d / "etc").mkdir()
        shutil.chown(d, "frr", "frr")
        common = ["-z", str(d / "zserv.api"), "--vty_socket", str(d), "-f", "/dev/null", "-A", "127.0.0.1",
                  "-P", "0", "-d"]
        for daemon in daemons:
            extra = ["-p", "179"] if daemon == "bgpd" else []
            subprocess.run(["ip", "netns", "exec", self.ns(name), str(FRR_LIB / daemon), *common, *extra,
                            "-i", str(d / f"{daemon}.pid"), "--log", f"file:{d / daemon}.log"],
                           check=True, capture_output=True, timeout=30)
            self.pids.append(int((d / f"{daemon}.pid").read_text()))

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        for n in self.namespaces:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=20)


LEAF_CONF = f"""frr defaults datacenter
!
router bgp {LEAF_ASN}
 bgp router-id 10.255.9.1
 neighbor fabric peer-group
 neighbor fabric remote-as external
 neighbor l1a interface peer-group fabric
 neighbor l1b interface peer-group fabric
 neighbor l2a interface peer-group fabric
 neighbor l2b interface peer-group fabric
 address-family l2vpn evpn
  neighbor fabric activate
 exit-address-family
exit
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or not (FRR_LIB / "bgpd").exists() or not (FRR_LIB / "frr-reload.py").exists():
        pytest.skip("needs root and Debian's frr + frr-pythontools (Makefile APT_TEST)")
    # FRR's daemons drop to user frr: their directories must be reachable by it (pytest's tmp is 0700)
    root = Path(tempfile.mkdtemp(prefix="bootsvc-frr-"))
    os.chmod(root, 0o755)
    lab = Lab(f"fr{secrets.token_hex(3)}", root)
    try:
        for n in ("leaf", "d1", "d2", "d3"):
            lab.ip("netns", "add", lab.ns(n))
            lab.namespaces.append(lab.ns(n))
            lab.nsx(n, "ip", "link", "set", "lo", "up")
            lab.nsx(n, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1")
        for d in ("d1", "d2"):
            i = d[1]
            for port, leafport in (("p0", f"l{i}a"), ("p1", f"l{i}b")):
                lab.ip("link", "add", leafport, "netns", lab.ns("leaf"), "type", "veth", "peer", "name", port,
                       "netns", lab.ns(d))
                lab.nsx("leaf", "ip", "link", "set", leafport, "up")
                lab.nsx(d, "ip", "link", "set", port, "up")
            lab.nsx(d, "ip", "addr", "add", f"10.255.0.1{i}/32", "dev", "lo")
        for n in ("leaf", "d1", "d2"):
            lab.start_frr(n)
        lab.start_frr("d3", ("zebra",))  # a DPU image whose FRR has bgpd=no (Debian's default daemons file)
        leaf_conf = lab.rundir("leaf") / "state" / "leaf.conf"
        leaf_conf.write_text(LEAF_CONF)
        subprocess.run(["vtysh", "--vty_socket", str(lab.rundir("leaf")), "-f", str(leaf_conf)], check=True,
                       capture_output=True, timeout=30)
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)


def uplinks_of(f: Frr) -> dict[str, Any]:
    return fabric_report({"summary": f.show(QUERIES["summary"])}, uplink_names=("p0", "p1"), vrf=None,
                         vni=None, host_prefixes=())["uplinks"]


def established(f: Frr) -> bool:
    ups = uplinks_of(f)
    return all(u["state"] == "Established" and u.get("evpn") is not False for u in ups.values())


def capture(name: str, data: Any) -> None:
    if os.environ.get("BOOTSVC_CAPTURE_FRR") == "1":
        DATA.mkdir(parents=True, exist_ok=True)
        (DATA / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def test_agent_config_loads_and_bgp_unnumbered_comes_up(lab: Lab) -> None:
    """The rendered config is accepted by real FRR, BGP unnumbered reaches Established on every
    uplink (with the l2vpn evpn family), a second load changes nothing."""
    t0 = time.monotonic()
    texts = {}
    for d in ("d1", "d2"):
        p = parse(policy_doc(d))
        assert p.tenant is not None and p.tenant.peers == ()  # EVPN: no per-fleet list in the policy
        text = render(p)
        assert text is not None
        texts[d] = text
        lab.frr(d).load(text)
    for d in ("d1", "d2"):
        wait_for(lambda d=d: established(lab.frr(d)), 60, f"{d} BGP Established on p0 and p1")  # type: ignore[misc]
    took = time.monotonic() - t0
    print(f"\nFRR {lab.frr('d1').version()}: config load -> BGP Established on 4 unnumbered uplinks in {took:.1f}s")
    f1 = lab.frr("d1")
    running = f1._run([*f1._vtysh_argv(), "-c", "show running-config"]).stdout
    assert "router bgp 65011 vrf vrf-acme" in running and " vni 5001" in running
    assert "neighbor p0 interface peer-group fabric" in running
    f1.load(texts["d1"])  # idempotent: frr-reload.py finds no delta
    again = f1._run([*f1._vtysh_argv(), "-c", "show running-config"]).stdout
    assert again == running
    summary = f1.show(QUERIES["summary"])
    assert summary["ipv4Unicast"]["peers"]["p0"]["idType"] == "interface"
    capture("show_bgp_summary", summary)
    capture("show_bgp_vrf_all_summary", f1.show(QUERIES["vrf_summary"]))


def test_without_kernel_vrf_the_gate_names_the_l3vni(lab: Lab) -> None:
    """This kernel has no CONFIG_NET_VRF: FRR keeps the tenant VRF inactive, zebra reports its L3VNI
    Down, and the gate says exactly that (sessions fine, l3vni failing, with a hint)."""
    f1 = lab.frr("d1")
    wait_for(lambda: established(f1), 60, "d1 Established")
    doc = policy_doc("d1")
    p = parse(doc)
    assert p.tenant is not None
    outputs, errors = f1.state()
    assert not errors
    capture("show_vrf_vni_inactive", outputs["vrf_vni"])
    capture("show_evpn_vni_inactive", outputs["evpn_vni"])
    rep = fabric_report(outputs, uplink_names=("p0", "p1"), vrf="vrf-acme", vni=5001,
                        host_prefixes=("10.0.0.101/32",), errors=errors)
    rep["policy_version"] = p.version
    want = expect_from_policy(doc)
    assert want is not None
    v = gate(rep, want)
    by = {c.name: c for c in v.checks}
    assert by["bgp_sessions"].ok and not v.ready
    assert v.failed is not None and v.failed.name == "l3vni" and "Down" in v.failed.detail
    print(f"\ngate on real FRR without kernel VRF: {v.reason()}")


def _standin(lab: Lab, d: str) -> None:
    """L3VNI in the default VRF (this kernel has bridge and VXLAN but no VRF devices)."""
    i = d[1]
    vtep = f"10.255.0.1{i}"
    lab.nsx(d, "ip", "link", "add", f"br{STANDIN_VNI}", "type", "bridge")
    lab.nsx(d, "ip", "link", "add", f"vx{STANDIN_VNI}", "type", "vxlan", "id", str(STANDIN_VNI), "local", vtep,
            "dstport", "4789", "nolearning")
    lab.nsx(d, "ip", "link", "set", f"vx{STANDIN_VNI}", "master", f"br{STANDIN_VNI}", "addrgenmode", "none")
    lab.nsx(d, "ip", "link", "set", f"br{STANDIN_VNI}", "addrgenmode", "none")
    lab.nsx(d, "ip", "link", "set", f"vx{STANDIN_VNI}", "up")
    lab.nsx(d, "ip", "link", "set", f"br{STANDIN_VNI}", "up")
    lab.nsx(d, "ip", "addr", "add", STANDIN[d], "dev", "lo")
    asn = 65000 + 10 + int(i)
    subprocess.run(["vtysh", "--vty_socket", str(lab.rundir(d)), "-c", "configure terminal",
                    "-c", "vrf default", "-c", f"vni {STANDIN_VNI}", "-c", "exit-vrf",
                    "-c", f"router bgp {asn}", "-c", "address-family ipv4 unicast",
                    "-c", f"network {STANDIN[d]}", "-c", "exit-address-family",
                    "-c", "address-family l2vpn evpn", "-c", "advertise ipv4 unicast"],
                   check=True, capture_output=True, timeout=30)


def test_type5_routes_cross_the_fabric_and_the_gate_opens(lab: Lab) -> None:
    """With an L3VNI that can come up (default-VRF stand-in), each DPU originates its host prefix as
    an EVPN Type-5 route, the other DPU learns it with the originating VTEP as next hop, and the gate
    passes all three checks."""
    for d in ("d1", "d2"):
        wait_for(lambda d=d: established(lab.frr(d)), 60, f"{d} Established")  # type: ignore[misc]
    t0 = time.monotonic()
    for d in ("d1", "d2"):
        _standin(lab, d)
    f1 = lab.frr("d1")

    def learned() -> Any:
        outputs, _ = f1.state()
        rep = fabric_report(outputs, uplink_names=("p0", "p1"), vrf="default", vni=STANDIN_VNI,
                            host_prefixes=(STANDIN["d1"],))
        remote = {tuple(r) for r in rep["type5"]["remote"]}
        return (outputs, rep) if (STANDIN["d2"], "10.255.0.12") in remote and rep["host_prefixes"][STANDIN["d1"]] \
            and rep["l3vni"]["state"] == "Up" else None

    outputs, rep = wait_for(learned, 60, "d2's Type-5 route on d1")
    print(f"\nType-5 {STANDIN['d2']} from d2 present on d1 {time.monotonic() - t0:.1f}s after the L3VNI came up")
    print("d1 Type-5 local:", rep["type5"]["local"], "remote:", rep["type5"]["remote"])
    for key, name in (("type5", "show_bgp_l2vpn_evpn_route_type_prefix"), ("vrf_vni", "show_vrf_vni_up"),
                      ("evpn_vni", "show_evpn_vni_up"), ("summary", "show_bgp_summary_evpn")):
        capture(name, outputs[key])
    capture("frr_version", {"frr": f1.version(), "source": "Debian 12 frr 8.4.4-1.1~deb12u2"})
    capture("show_bgp_vrf_default_ipv4_unicast", f1.show("show bgp vrf default ipv4 unicast json"))
    capture("show_bgp_vrf_inactive_ipv4_unicast", f1.show("show bgp vrf vrf-acme ipv4 unicast json"))
    from bootsvc.fabric import Expect

    rep["policy_version"] = "standin"
    v = gate(rep, Expect("standin", ("p0", "p1"), "default", STANDIN_VNI, (STANDIN["d1"],)))
    assert v.ready, v.reason()


def _vrf_has(f: Frr, vrf: str, prefix: str) -> bool:
    """Is ``prefix`` in the VRF's BGP IPv4 table (what the DPU forwards on) imported from EVPN? (The
    stand-in's default VRF also learns it over the underlay sessions: those paths do not count.)"""
    table = f.show(VRF_ROUTES.format(vrf=vrf))
    paths = (table.get("routes") or {}).get(prefix) or []
    evpn = [p for p in paths if (p.get("nexthops") or [{}])[0].get("afi") == "ipv4" and p.get("path")]
    return bool(vrf_routes({"routes": {prefix: evpn}}))


def _evpn_rts(f: Frr, prefix: str) -> set[str]:
    """Route targets of the Type-5 routes for ``prefix`` learned from a peer, in the EVPN table
    (``RT:<asn>:<vni>``; the stand-in's default VRF also re-exports what it imported, with no peer)."""
    ip, plen = prefix.split("/")
    out: set[str] = set()
    for body in f.show(QUERIES["type5"]).values():
        route = body.get(f"[5]:[0]:[{plen}]:[{ip}]") if isinstance(body, dict) else None
        for group in (route or {}).get("paths") or []:
            for path in group:
                if path.get("peerId") in (None, "(unspec)"):
                    continue
                out |= {w for w in path.get("extendedCommunity", {}).get("string", "").split() if w.startswith("RT:")}
    return out


def test_tenant_move_withdraws_from_the_old_vrf_within_measured_convergence(lab: Lab) -> None:
    """A tenant move on real FRR, measured: d2 moves its host prefix from L3VNI 4001 to 4002 (the
    default-VRF stand-in changes its L3VNI, as the agent's config moves the prefix to another tenant's
    VRF). d1, a DPU of the old tenant, loses the route from its VRF table, and the EVPN table carries
    it again under the new L3VNI's route target (RFC 9136 §3; FRR auto RT ASN:VNI). Printed: the time
    from the change on d2 until the old peer lost the route, and until the new route was seen."""
    f1, f2 = lab.frr("d1"), lab.frr("d2")
    wait_for(lambda: _vrf_has(f1, "default", STANDIN["d2"]), 60, "d2's stand-in prefix in d1's VRF table")
    assert _evpn_rts(f1, STANDIN["d2"]) == {"RT:65012:4001"}
    new_vni = STANDIN_VNI + 1
    lab.nsx("d2", "ip", "link", "add", f"br{new_vni}", "type", "bridge")
    lab.nsx("d2", "ip", "link", "add", f"vx{new_vni}", "type", "vxlan", "id", str(new_vni), "local", "10.255.0.12",
            "dstport", "4789", "nolearning")
    lab.nsx("d2", "ip", "link", "set", f"vx{new_vni}", "master", f"br{new_vni}", "addrgenmode", "none")
    for dev in (f"vx{new_vni}", f"br{new_vni}"):
        lab.nsx("d2", "ip", "link", "set", dev, "up")
    t0 = time.monotonic()
    subprocess.run(["vtysh", "--vty_socket", str(lab.rundir("d2")), "-c", "configure terminal",
                    "-c", "vrf default", "-c", f"no vni {STANDIN_VNI}", "-c", f"vni {new_vni}", "-c", "exit-vrf"],
                   check=True, capture_output=True, timeout=30)
    gone = wait_for(lambda: not _vrf_has(f1, "default", STANDIN["d2"]) and time.monotonic(), 30,
                    "d1 to lose d2's prefix from the old VRF", interval=0.05) - t0
    new = wait_for(lambda: f"RT:65012:{new_vni}" in _evpn_rts(f1, STANDIN["d2"]) and time.monotonic(), 30,
                   "d2's prefix under the new L3VNI's route target", interval=0.05) - t0
    assert f"RT:65012:{STANDIN_VNI}" not in _evpn_rts(f1, STANDIN["d2"])  # withdrawn, not just shadowed
    assert not _vrf_has(f1, "default", STANDIN["d2"])  # d1 does not import 4002: not its tenant
    print(f"\ntenant move on real FRR: old peer lost the route after {gone * 1000:.0f} ms, "
          f"new L3VNI route seen after {new * 1000:.0f} ms")
    capture("show_bgp_l2vpn_evpn_route_type_prefix_moved", f1.show(QUERIES["type5"]))
    del f2


def test_refused_config_is_reported_and_the_previous_one_restored(lab: Lab) -> None:
    """FRR refuses a config (its own message comes back); loading the previous one restores the
    running config exactly (what the agent's rollback does)."""
    f2 = lab.frr("d2")
    good = f2.applied()
    assert good is not None
    before = f2._run([*f2._vtysh_argv(), "-c", "show running-config"]).stdout
    bad = good.replace(" neighbor p1 interface peer-group fabric\n",
                       " neighbor p1 interface peer-group fabric\n neighbor p9 interface peer-group nosuchgroup\n")
    assert bad != good
    with pytest.raises(FrrError, match="peer-group"):
        f2.load(bad)
    assert f2.applied() == good  # the refused text is not recorded as applied
    f2.load(good)
    after = f2._run([*f2._vtysh_argv(), "-c", "show running-config"]).stdout
    # the stand-in stanza from the previous test was not in the agent's file: frr-reload removed it
    # when restoring, exactly like any config the agent does not own
    assert "nosuchgroup" not in after and "router bgp 65012 vrf vrf-acme" in after
    assert [ln for ln in after.splitlines() if "p9" in ln] == []
    del before


def test_tenant_move_swaps_the_vrf_and_a_session_drop_is_seen(lab: Lab) -> None:
    """Re-render for another tenant: FRR ends up with the new VRF instance and without the old one.
    Then a leaf port goes down: the DPU's report loses that session, session_drops names it."""
    f1 = lab.frr("d1")
    wait_for(lambda: established(f1), 60, "d1 Established")
    old = parse(policy_doc("d1", "acme"))
    new = parse(policy_doc("d1", "blue"))
    t_new = render(new)
    assert t_new is not None
    f1.load(t_new)
    running = f1._run([*f1._vtysh_argv(), "-c", "show running-config"]).stdout
    assert "router bgp 65011 vrf vrf-blue" in running and "router bgp 65011 vrf vrf-acme" not in running
    assert "vrf vrf-acme" not in running
    before = {"uplinks": uplinks_of(f1)}
    assert before["uplinks"]["p0"]["state"] == "Established"
    lab.nsx("leaf", "ip", "link", "set", "l1a", "down")
    after = wait_for(lambda: (a := {"uplinks": uplinks_of(f1)})["uplinks"]["p0"]["state"] != "Established" and a,
                     30, "p0 session down on d1")
    assert session_drops(before, after) == [("p0", "Established", after["uplinks"]["p0"]["state"])]
    capture("show_bgp_summary_p0_down", f1.show(QUERIES["summary"]))
    lab.nsx("leaf", "ip", "link", "set", "l1a", "up")
    del old


def test_without_frr_reload_the_vtysh_fallback_still_removes_the_old_vrf(lab: Lab) -> None:
    """A DPU image without frr-reload.py: vtysh -f only adds, so the agent sends 'no router bgp ...
    vrf' and 'no vrf' for the blocks the new config lacks (bootsvc.agent.frr.diff)."""
    d = lab.rundir("d2")
    f = Frr(FrrTools(vty_socket=str(d), conf_dir=str(d / "etc"), frr_reload=""), d / "state")
    a, b = render(parse(policy_doc("d2", "acme"))), render(parse(policy_doc("d2", "blue")))
    assert a is not None and b is not None
    f.load(a)
    f.load(b)
    running = f._run([*f._vtysh_argv(), "-c", "show running-config"]).stdout
    assert "router bgp 65012 vrf vrf-blue" in running and "vrf-acme" not in running
    wait_for(lambda: established(f), 60, "d2 still Established after the vtysh fallback")


def test_vxlan_capture_is_parsed_with_its_vni(lab: Lab, tmp_path: Path) -> None:
    """A real VXLAN capture for the e2e test's parser (tests/e2e/fabric_proof.py): two VTEPs in this
    test's namespaces (kernel VXLAN devices, VNI 5001 and 5002, static remotes; without kernel VRFs the
    two segments need distinct inner subnets here), pings across, tcpdump on the underlay link. The
    parser finds each VNI in the header and the inner ICMP; ``BOOTSVC_CAPTURE_FRR=1`` keeps the pcap in
    tests/data/frr/ for the unit tests."""
    import sys

    sys_path = str(Path(__file__).resolve().parents[1] / "e2e")
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from fabric_proof import describe, vxlan_packets

    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump not installed")
    a, b = lab.ns("va"), lab.ns("vb")
    for n in (a, b):
        lab.ip("netns", "add", n)
        lab.namespaces.append(n)
    lab.ip("link", "add", "ua", "netns", a, "type", "veth", "peer", "name", "ub", "netns", b)
    for n, dev, me, peer in ((a, "ua", "192.0.2.1", "192.0.2.2"), (b, "ub", "192.0.2.2", "192.0.2.1")):
        x = ("ip", "netns", "exec", n)
        subprocess.run([*x, "ip", "addr", "add", f"{me}/30", "dev", dev], check=True, timeout=20)
        subprocess.run([*x, "ip", "link", "set", dev, "up"], check=True, timeout=20)
        last = me.rsplit(".", 1)[1]
        for vni, inner in ((5001, "10.0.0"), (5002, "10.9.0")):
            subprocess.run([*x, "ip", "link", "add", f"vx{vni}", "type", "vxlan", "id", str(vni), "local", me,
                            "remote", peer, "dstport", "4789", "nolearning"], check=True, timeout=20)
            subprocess.run([*x, "ip", "link", "set", f"vx{vni}", "up"], check=True, timeout=20)
            subprocess.run([*x, "ip", "addr", "add", f"{inner}.{last}/24", "dev", f"vx{vni}"], check=True, timeout=20)
    pcap = tmp_path / "vxlan.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", b, "tcpdump", "-i", "ub", "-U", "-w", str(pcap), "udp", "port",
                             "4789"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pcap.exists(), 10, "tcpdump to open its capture")
        for dst in ("10.0.0.2", "10.9.0.2"):
            subprocess.run(["ip", "netns", "exec", a, "ping", "-c", "2", "-W", "2", "-i", "0.3", dst], check=True,
                           capture_output=True, timeout=20)
        want = {(5001, "10.0.0.1", "10.0.0.2", "icmp echo-request"), (5001, "10.0.0.2", "10.0.0.1", "icmp echo-reply"),
                (5002, "10.9.0.1", "10.9.0.2", "icmp echo-request"), (5002, "10.9.0.2", "10.9.0.1", "icmp echo-reply")}

        def captured() -> bool:  # tcpdump -U writes each packet as it sees it; the last reply may lag
            try:
                pkts, _ = vxlan_packets(pcap)
            except Exception:  # a record half-written at the end of the file: look again
                return False
            return want <= {(p.vni, p.inner_src, p.inner_dst, p.inner_proto) for p in pkts}

        wait_for(captured, 10, "the pings in the capture", interval=0.1)
    finally:
        if dump.poll() is None:
            dump.terminate()
            dump.wait(timeout=10)
    pkts, bad = vxlan_packets(pcap)
    print("\n" + "\n".join(describe(pkts)))
    assert not bad
    assert {(p.outer_src, p.outer_dst) for p in pkts} == {("192.0.2.1", "192.0.2.2"), ("192.0.2.2", "192.0.2.1")}
    if os.environ.get("BOOTSVC_CAPTURE_FRR") == "1":
        shutil.copy(pcap, DATA / "vxlan_icmp_5001_5002.pcap")


def test_frr_cpu_cost(lab: Lab) -> None:
    """Measurement, printed for the closing note: CPU seconds zebra+bgpd used per DPU over this module."""
    tick = os.sysconf("SC_CLK_TCK")
    for n in ("d1", "d2", "leaf"):
        total = 0.0
        for daemon in ("zebra", "bgpd"):
            pid = int((lab.rundir(n) / f"{daemon}.pid").read_text())
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime (proc(5) fields 14, 15)
        print(f"\n{n}: zebra+bgpd CPU {total:.2f}s so far")
        assert total < 60
    f1 = lab.frr("d1")
    t0, c0 = time.monotonic(), os.times()
    for _ in range(3):
        outputs, errors = f1.state()
        assert not errors and set(outputs) == set(QUERIES)
    c1 = os.times()
    child = (c1.children_user + c1.children_system - c0.children_user - c0.children_system) / 3
    print(f"one fabric report (one vtysh run, 5 queries): {(time.monotonic() - t0) / 3 * 1000:.0f} ms wall, "
          f"{child * 1000:.0f} ms CPU in vtysh")


def test_agent_with_frr_that_cannot_take_the_config_rolls_back_and_reports(lab: Lab) -> None:
    """The agent against real FRR whose bgpd is not running: vtysh 'succeeds' (it skips absent
    daemons), the agent sees from the running config that nothing took, rolls back (kernel too) and
    reports the policy failed with the reason; the gate keeps the host from booting."""
    from helpers.agent import make

    from bootsvc.agent.plan import plan

    agent, dp, api = make(lab.root / "agent-d3")
    agent.frr = lab.frr("d3")
    doc = {**policy_doc("d3"), "relay": None, "ra": False}  # no relay/RA sockets: no host port here
    api.set(doc)
    agent.step()
    version, status, error, health = api.reports[-1]
    assert (version, status) == (doc["version"], "failed")
    assert error is not None and "FRR did not take the config" in error and "bgpd" in error
    assert agent.applied.tenant is None  # rolled back to the isolated start policy
    assert plan(agent.applied, agent.env, dp.k.observe()) == []
    assert lab.frr("d3").applied() is None  # nothing recorded as loaded
    want = expect_from_policy(doc)
    assert want is not None
    v = gate(health.get("fabric"), want)
    assert not v.ready and v.failed is not None and v.failed.name == "fabric_report"
    print(f"\nagent on FRR without bgpd: {error}")
    outputs, errors = lab.frr("d3").state()  # the batched run fails; each query is asked alone
    assert "vrf_vni" in outputs and "summary" not in outputs
    assert errors and all("bgpd is not running" in e for e in errors)


def test_asn_renumbering_goes_through_frr_reload(lab: Lab) -> None:
    """A site changing fabric.asn: the default instance and the VRF instance move to the new ASN
    (frr-reload.py removes the VRF instance before the default one), sessions come back."""
    f1 = lab.frr("d1")
    doc = policy_doc("d1")
    f1.load(render(parse(doc)) or "")
    moved = {**doc, "evpn": {**doc["evpn"], "asn": 65111}}
    f1.load(render(parse(moved)) or "")
    running = f1._run([*f1._vtysh_argv(), "-c", "show running-config"]).stdout
    assert "router bgp 65111\n" in running and "router bgp 65111 vrf vrf-acme" in running
    assert "router bgp 65011" not in running
    wait_for(lambda: established(f1), 60, "d1 Established again as AS 65111")


def dataplane_in(lab: Lab, node: str) -> Dataplane:
    """The agent's Dataplane with its ip, bridge and nft run inside ``node``'s namespace (wrapper scripts:
    the agent runs on the DPU itself, this test process in the root namespace)."""
    wrappers = lab.root / f"wrappers-{node}"
    wrappers.mkdir(exist_ok=True)
    for tool in ("ip", "bridge", "nft"):
        w = wrappers / tool
        w.write_text(f'#!/bin/sh\nexec ip netns exec {lab.ns(node)} {shutil.which(tool)} "$@"\n')
        w.chmod(0o755)
    return Dataplane(Tools(ip=str(wrappers / "ip"), bridge=str(wrappers / "bridge"), nft=str(wrappers / "nft")))


def test_agent_does_not_take_zebras_fdb_entries_for_its_own(lab: Lab) -> None:
    """On a real kernel: FDB entries of the kind FRR's zebra programs on the L3VNI VXLAN device (the
    all-zero flood MAC, extern_learn router MACs) are not observed as the agent's, so converging never
    deletes them; the agent's own permanent entries still are."""
    from bootsvc.agent.plan import OWNER_ALIAS, Env

    for argv in (["ip", "link", "add", "babr7", "type", "bridge"],
                 ["ip", "link", "add", "bavx7", "type", "vxlan", "id", "7", "local", "10.255.0.12", "dstport",
                  "4789", "nolearning"],
                 ["ip", "link", "set", "bavx7", "master", "babr7"],
                 ["ip", "link", "set", "babr7", "alias", OWNER_ALIAS],
                 ["ip", "link", "set", "bavx7", "alias", OWNER_ALIAS],
                 ["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "bavx7", "dst", "10.255.0.31", "self",
                  "permanent"],
                 ["bridge", "fdb", "add", "02:00:0a:ff:00:20", "dev", "bavx7", "dst", "10.255.0.32", "self",
                  "extern_learn"],
                 ["bridge", "fdb", "append", "02:00:0a:ff:00:21", "dev", "bavx7", "dst", "10.255.0.33", "self",
                  "permanent"]):
        lab.nsx("d2", *argv)
    obs = dataplane_in(lab, "d2").observe(Env("p0", "p1", "table"))
    assert [(f.mac, f.dst) for f in obs.fdbs if f.dev == "bavx7"] == [("02:00:0a:ff:00:21", "10.255.0.33")]


def test_agent_does_not_take_zebras_bgp_routes_for_its_own(lab: Lab) -> None:
    """On a real kernel with real zebra: the routes zebra installs for BGP (here d1's underlay routes to
    the other VTEP and the stand-in prefixes; in the DPU VMs the Type-5 routes in the tenant VRF) carry
    protocol ``bgp`` (186, FRR zebra/rt_netlink.h RTPROT_BGP). The agent marks its own routes with
    another number, so converging never deletes zebra's (and zebra, which sweeps its own protocols at
    start, never deletes the agent's)."""
    from bootsvc.agent.plan import RT_PROTO, Env

    for d in ("d1", "d2"):
        lab.frr(d).load(render(parse(policy_doc(d))) or "")  # as the agent left it (no-op after earlier tests)
    wait_for(lambda: established(lab.frr("d1")), 60, "d1 Established")
    bgp = wait_for(lambda: json.loads(lab.nsx("d1", "ip", "-j", "-4", "route", "show", "proto", "bgp").stdout),
                   60, "zebra's BGP routes in d1's kernel")
    assert any(r["dst"] == "10.255.0.12" for r in bgp), bgp
    assert RT_PROTO not in ("186", "bgp")
    assert dataplane_in(lab, "d1").observe(Env("p0", "p1", "table")).routes == ()


def test_explicit_route_targets_are_taken_as_rendered(lab: Lab) -> None:
    """fabric.route_target_asn: FRR runs the explicit import/export RTs exactly as rendered (the
    agent's running-config check would refuse the load otherwise)."""
    f1 = lab.frr("d1")
    doc = policy_doc("d1")
    text = render(parse({**doc, "evpn": {**doc["evpn"], "route_target_asn": 65000}}))
    assert text is not None and "route-target import 65000:5001" in text
    f1.load(text)
    running = f1._run([*f1._vtysh_argv(), "-c", "show running-config"]).stdout
    assert "  route-target import 65000:5001\n" in running and "  route-target export 65000:5001\n" in running


def test_a_host_without_an_address_loads(lab: Lab) -> None:
    """A DPU whose host has no reserved address yet: its VRF instance has nothing to announce, and
    real FRR takes the rendered config (no empty address-family that FRR would not print back)."""
    doc = {**policy_doc("d1"), "host_prefixes": []}
    text = render(parse(doc))
    assert text is not None and "network 10.0.0" not in text
    lab.frr("d1").load(text)  # raises FrrError if the read-back finds anything missing
    assert lab.frr("d1").applied() == text
