"""The agent's FRR side: rendered config, tenant-move diff, parsing real vtysh JSON, apply/rollback.

The JSON under tests/data/frr/ was printed by FRR 8.4.4 (Debian 12) in tests/integration/
test_frr_netns.py (BGP unnumbered over veth, EVPN Type-5 from a default-VRF L3VNI stand-in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import FakeDataplane, FakeKernel, doc, make, pdoc

from bootsvc.agent.fabric_health import l3vni, report, type5, uplinks, vrf_instances, vrf_routes
from bootsvc.agent.frr import diff, render
from bootsvc.agent.frrd import QUERIES, FrrError, _reason
from bootsvc.agent.plan import plan
from bootsvc.agent.policy import PolicyError, parse

DATA = Path(__file__).resolve().parents[1] / "data" / "frr"
EVPN = {"asn": 65011, "uplinks": ["p0", "p1"], "vtep": "10.255.0.11", "route_target_asn": None}


def cap(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


def evpn_doc(**over: Any) -> dict[str, Any]:
    return doc(**{"peers": [], "evpn": dict(EVPN), "host_prefixes": ["10.0.0.101/32"], **over})


# ---------------------------------------------------------------- rendering -------------------------------


def test_render_underlay_vrf_and_type5_export() -> None:
    text = render(parse(evpn_doc()))
    assert text is not None
    lines = text.splitlines()
    assert lines[2] == "frr defaults datacenter"  # before any "router bgp" (FRR: profile is set first)
    assert lines[lines.index("vrf vrf-a") + 1] == " vni 5001"  # an L3VNI for zebra
    underlay = lines[lines.index("router bgp 65011"):lines.index("router bgp 65011 vrf vrf-a")]
    assert " neighbor fabric remote-as external" in underlay
    assert " neighbor p0 interface peer-group fabric" in underlay  # BGP unnumbered, RFC 8950
    assert " neighbor p1 interface peer-group fabric" in underlay
    assert "  network 10.255.0.11/32" in underlay and "  advertise-all-vni" in underlay
    vrf = lines[lines.index("router bgp 65011 vrf vrf-a"):]
    assert "  network 10.0.0.101/32" in vrf and "  advertise ipv4 unicast" in vrf
    assert not any("route-target" in ln for ln in lines)  # FRR's auto RTs by default
    assert not any("10.0.0.0/24" in ln for ln in lines)  # never the anycast subnet


def test_render_explicit_route_targets_and_no_tenant() -> None:
    text = render(parse(evpn_doc(evpn={**EVPN, "route_target_asn": 65000})))
    assert text is not None
    assert "  route-target import 65000:5001\n  route-target export 65000:5001\n" in text
    bare = render(parse({"schema": 1, "version": "9", "node": "dpu1", "tenant": None, "evpn": EVPN}))
    assert bare is not None and "vrf" not in bare and " neighbor p0 interface peer-group fabric" in bare
    assert render(parse({"schema": 1, "version": "9", "node": "dpu1", "tenant": None})) is None  # not ours


@pytest.mark.parametrize(("over", "field"), [
    ({"evpn": {**EVPN, "uplinks": []}}, "evpn.uplinks"),
    ({"evpn": {**EVPN, "uplinks": ["p0; reboot"]}}, "evpn.uplinks"),
    ({"evpn": {**EVPN, "asn": 0}}, "evpn.asn"),
    ({"evpn": {**EVPN, "vtep": "10.255.0.99"}}, "evpn.vtep"),
    ({"evpn": {**EVPN, "route_target_asn": 70000}}, "route_target_asn"),
    ({"host_prefixes": ["192.0.2.1/32"]}, "outside the host segment"),
    ({"host_prefixes": ["10.0.0.101/24"]}, "host_prefixes"),
])
def test_bad_evpn_blocks_are_refused(over: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError, match=field):
        parse(evpn_doc(**over))


def test_tenant_move_withdraws_from_the_old_vrf_and_announces_in_the_new() -> None:
    a = render(parse(evpn_doc()))
    b = render(parse(evpn_doc(version="2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002)))
    changes = [str(c) for c in diff(a, b)]
    assert "- [vrf vrf-a]" in changes and "- [router bgp 65011 vrf vrf-a]" in changes
    assert "+ [vrf vrf-b] vni 5002" in changes
    assert "+ [router bgp 65011 vrf vrf-b] network 10.0.0.101/32" in changes
    # the underlay is untouched: sessions stay up while the host prefix moves
    assert not [c for c in changes if "[router bgp 65011]" in c]
    assert diff(a, a) == []


# ---------------------------------------------------------------- parsing real vtysh JSON -------------------


def test_uplinks_from_real_summary() -> None:
    up = uplinks(cap("show_bgp_summary_evpn"), ("p0", "p1", "p2"))
    assert up["p0"]["state"] == up["p1"]["state"] == "Established"
    assert isinstance(up["p0"]["up_ms"], int) and up["p0"]["evpn_pfx_rcvd"] >= 1
    assert up["p2"] == {"state": "missing"}
    down = uplinks(cap("show_bgp_summary_p0_down"), ("p0", "p1"))
    assert down["p0"]["state"] != "Established" and down["p1"]["state"] == "Established"
    v4only = {"ipv4Unicast": cap("show_bgp_summary")["ipv4Unicast"]}
    assert uplinks(v4only, ("p0",))["p0"]["evpn"] is False  # a session without l2vpn evpn


def test_l3vni_state_from_real_vrf_vni() -> None:
    assert l3vni(cap("show_vrf_vni_up"), "default", 4001) == {
        "vni": 4001, "vrf": "default", "state": "Up", "svi": "br4001", "vxlan": "vx4001"}
    down = l3vni(cap("show_vrf_vni_inactive"), "vrf-acme", 5001)
    assert down is not None and down["state"] == "Down" and down["svi"] is None  # "None" means none
    assert l3vni(cap("show_vrf_vni_up"), "vrf-x", 9) == {"vni": 9, "vrf": "vrf-x", "state": "missing",
                                                         "svi": None, "vxlan": None}
    assert l3vni({}, None, None) is None


def test_type5_local_and_remote_from_real_routes() -> None:
    local, remote = type5(cap("show_bgp_l2vpn_evpn_route_type_prefix"))
    assert "10.77.0.1/32" in local and "10.77.0.2/32" not in local  # re-exported != originated
    assert ["10.77.0.2/32", "10.255.0.12"] in remote  # learned, next hop = d2's VTEP


def test_vrf_routes_from_real_tables() -> None:
    """The VRF's own table says what it imported: d2's prefix via d2's VTEP (an EVPN import), d1's own
    prefix local; in the stand-in's default VRF the same prefix is also learned over the underlay
    sessions (IPv6 link-local next hop), which is not an EVPN import."""
    routes = {r[0]: r for r in vrf_routes(cap("show_bgp_vrf_default_ipv4_unicast"))}
    assert routes["10.77.0.1/32"][2] == "local"
    assert routes["10.77.0.2/32"][2] in ("evpn", "bgp")  # best path: either, both exist in the capture
    paths = cap("show_bgp_vrf_default_ipv4_unicast")["routes"]["10.77.0.2/32"]
    evpn_only = {"routes": {"10.77.0.2/32": [p for p in paths if p["nexthops"][0]["afi"] == "ipv4"]}}
    assert vrf_routes(evpn_only) == [["10.77.0.2/32", "10.255.0.12", "evpn"]]
    inactive = vrf_routes(cap("show_bgp_vrf_inactive_ipv4_unicast"))  # VRF down: only its own network
    assert inactive == [["10.0.0.101/32", "0.0.0.0", "local"]]
    for junk in (None, [], {"routes": []}, {"routes": {"x": [{}]}}, {"routes": {"10.0.0.0/8": "no"}}):
        assert vrf_routes(junk) == []


def test_report_and_garbage() -> None:
    outputs = {"summary": cap("show_bgp_summary_evpn"), "vrf_vni": cap("show_vrf_vni_up"),
               "type5": cap("show_bgp_l2vpn_evpn_route_type_prefix"), "vrf_summary": cap("show_bgp_vrf_all_summary")}
    rep = report(outputs, uplink_names=("p0", "p1"), vrf="default", vni=4001,
                 host_prefixes=("10.77.0.1/32", "10.77.0.9/32"))
    assert rep["host_prefixes"] == {"10.77.0.1/32": True, "10.77.0.9/32": False}
    assert rep["l3vni"]["state"] == "Up" and "default" in rep["vrf_instances"]
    assert len(json.dumps(rep)) < 4096  # small enough for every check-in
    for junk in (None, [], "x", {"ipv4Unicast": []}, {"vrfs": "no"}, {"rd": {"[5]:x": {"paths": [[{"ip": "z"}]]}}}):
        r = report({"summary": junk, "vrf_vni": junk, "type5": junk, "vrf_summary": junk},
                   uplink_names=("p0",), vrf="v", vni=1, host_prefixes=("10.0.0.1/32",), errors=["e" * 999])
        assert r["uplinks"]["p0"]["state"] == "missing" and r["host_prefixes"] == {"10.0.0.1/32": False}
        assert len(r["errors"][0]) == 300
    assert vrf_instances(cap("show_bgp_vrf_all_summary")) == ["default", "vrf-acme"]


def test_reason_keeps_frrs_own_words() -> None:
    import subprocess

    res = subprocess.CompletedProcess(["frr-reload.py"], 1, stdout="", stderr=(
        "% Can't open configuration file /etc/frr/vtysh.conf due to 'No such file or directory'.\n"
        "% Configure the peer-group first\n"
        "line 2: Failure to communicate[13] to bgpd, line:  neighbor p9 interface peer-group x\n"))
    r = _reason(res)
    assert r.startswith("% Configure the peer-group first; line 2: Failure to communicate[13] to bgpd")
    assert "vtysh.conf" not in r


# ---------------------------------------------------------------- the agent: apply, report, rollback --------


class FakeFrr:
    """Stands in for bootsvc.agent.frrd.Frr: records loads, refuses texts containing ``refuse``,
    answers state queries with the real captures."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self._applied: str | None = None
        self.refuse: str | None = None

    def applied(self) -> str | None:
        return self._applied

    def load(self, text: str) -> None:
        self.loads.append(text)
        if self.refuse and self.refuse in text:
            raise FrrError("% Configure the peer-group first; line 2: Failure to communicate[13] to bgpd")
        self._applied = text

    def state(self, vrf: str | None = None) -> tuple[dict[str, Any], list[str]]:
        self.asked_vrf = vrf
        return {"summary": cap("show_bgp_summary_evpn"), "vrf_vni": cap("show_vrf_vni_inactive"),
                "type5": cap("show_bgp_l2vpn_evpn_route_type_prefix"), "evpn_vni": cap("show_evpn_vni_inactive"),
                "vrf_summary": cap("show_bgp_vrf_all_summary"),
                "vrf_routes": cap("show_bgp_vrf_inactive_ipv4_unicast")}, []


def agent_doc(version: str, **over: Any) -> dict[str, Any]:
    return pdoc(version, **{"peers": [], "evpn": dict(EVPN), "host_prefixes": ["10.0.0.101/32"], **over})


def test_agent_loads_frr_once_and_reports_the_fabric(tmp_path: Path) -> None:
    frr = FakeFrr()
    agent, _dp, api = make(tmp_path)
    agent.frr = frr  # type: ignore[assignment]
    api.set(agent_doc("1"))
    agent.step()
    assert api.reports[-1][:3] == ("1", "applied", None)
    assert len(frr.loads) == 1 and "router bgp 65011 vrf vrf-a" in frr.loads[0]
    fab = api.reports[-1][3]["fabric"]
    assert fab["policy_version"] == "1" and fab["uplinks"]["p0"]["state"] == "Established"
    assert fab["l3vni"]["state"] == "missing" and fab["frr_error"] is None  # capture: other VRF
    agent.step()
    agent.step()
    assert len(frr.loads) == 1  # unchanged config: FRR is not reloaded on every poll
    assert set(QUERIES) == {"summary", "vrf_summary", "vrf_vni", "evpn_vni", "type5"}
    assert frr.asked_vrf == "vrf-a"  # the tenant VRF's own table is asked too
    assert fab["vrf_routes"] == {"vrf-a": [["10.0.0.101/32", "0.0.0.0", "local"]]}


def test_tenant_move_reloads_frr_with_the_new_vrf_and_reports_it(tmp_path: Path) -> None:
    """Policy 2 moves the DPU's host to tenant b: the kernel swaps VRF a for b (same host address), FRR
    is loaded once with the new VRF instance and without the old one (frr-reload.py then withdraws the
    old Type-5 and announces the new), and the fabric report is about policy 2 and VRF b."""
    frr = FakeFrr()
    agent, dp, api = make(tmp_path)
    agent.frr = frr  # type: ignore[assignment]
    api.set(agent_doc("1"))
    agent.step()
    api.set(agent_doc("2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002))
    agent.step()
    assert api.reports[-1][:3] == ("2", "applied", None)
    assert len(frr.loads) == 2
    new = frr.loads[-1]
    assert "router bgp 65011 vrf vrf-b" in new and "vrf-a" not in new and " vni 5002" in new
    assert "  network 10.0.0.101/32" in new.split("router bgp 65011 vrf vrf-b")[1]
    links = dp.k.observe().links  # (the fake kernel has no VRF devices: table mode, L3VNI devices by VNI)
    assert {"babr5002", "bavx5002"} <= set(links) and not {"babr5001", "bavx5001"} & set(links), sorted(links)
    fab = api.reports[-1][3]["fabric"]
    assert fab["policy_version"] == "2" and frr.asked_vrf == "vrf-b"
    assert fab["l3vni"]["vrf"] == "vrf-b" and fab["l3vni"]["vni"] == 5002


def test_frr_refusal_rolls_back_kernel_and_frr_and_reports_why(tmp_path: Path) -> None:
    """FRR refuses policy 2's config: the kernel and FRR go back to policy 1, the report names FRR's
    reason, and the failed version is not retried before retry_failed."""
    frr = FakeFrr()
    agent, dp, api = make(tmp_path)
    agent.frr = frr  # type: ignore[assignment]
    api.set(agent_doc("1"))
    agent.step()
    kernel_1 = dp.k.observe()
    good = frr.applied()
    frr.refuse = "vrf-b"
    api.set(agent_doc("2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002))
    agent.step()
    version, status, error, health = api.reports[-1]
    assert (version, status) == ("2", "failed")
    assert error is not None and "FRR refused policy 2" in error and "peer-group" in error
    assert agent.applied.version == "1" and health["applied_version"] == "1"
    assert frr.applied() == good and frr.loads[-1] == good  # previous FRR config loaded again
    after = dp.k.observe()  # kernel rolled back too (same objects; rule order is insertion order)
    assert set(after.rules) == set(kernel_1.rules) and after.links.keys() == kernel_1.links.keys()
    assert plan(agent.applied, agent.env, after) == []
    n = len(frr.loads)
    agent.step()
    assert len(frr.loads) == n  # not retried before retry_failed


def test_missing_compares_with_the_running_config() -> None:
    """vtysh skips daemons that are not running; the load is judged by ``show running-config``
    (shape as FRR 8.4 prints it: header, version, hostname, blocks closed by exit, end)."""
    from bootsvc.agent.frr import missing

    text = render(parse(evpn_doc()))
    assert text is not None
    head = ("Building configuration...\n\nCurrent configuration:\n!\nfrr version 8.4.4\nfrr defaults "
            "datacenter\nhostname vm\nservice integrated-vtysh-config\n!\n")
    running = head + text.split("datacenter\n!\n")[1] + "end\n"
    assert missing(text, running) == []
    no_bgpd = running.split("router bgp")[0] + "end\n"  # what FRR shows with bgpd down: only zebra's part
    assert missing(text, no_bgpd) == ["[router bgp 65011]", "[router bgp 65011 vrf vrf-a]"]
    assert missing(text, running.replace("  advertise ipv4 unicast\n", "")) == [
        "[router bgp 65011 vrf vrf-a] advertise ipv4 unicast"]


def test_json_stream_splits_vtyshs_concatenated_answers() -> None:
    from bootsvc.agent.frrd import _json_stream

    assert _json_stream('{\n"a":1}\n{"b":[2]}\n\n') == [{"a": 1}, {"b": [2]}]
    assert _json_stream("") == []
    with pytest.raises(ValueError):
        _json_stream('{"a":1}\n% bgpd is not running')


def test_plan_prints_the_frr_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from bootsvc.agent import main as main_mod

    monkeypatch.setattr(main_mod, "Dataplane", lambda _tools: FakeDataplane(FakeKernel()))
    state = tmp_path / "state"
    state.mkdir()
    (state / "applied.json").write_text(json.dumps(agent_doc("7")))
    conf = tmp_path / "agent.conf"
    conf.write_text(f"[agent]\nurl = http://127.0.0.1:9\nnode = dpu1\nsecret = s\nhost_port = pf0hpf\n"
                    f"uplink = p0\nstate_dir = {state}\n")
    assert main_mod.main(["-c", str(conf), "--plan"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "frr: + [router bgp 65011 vrf vrf-a] network 10.0.0.101/32" in out
    assert any(line.startswith("ip link add") for line in out)


def test_a_host_without_an_address_renders_no_empty_address_family() -> None:
    """FRR's running config omits an empty ``address-family ipv4 unicast``; rendering one made the
    agent's read-back check call the load not taken (seen in the lab: a DPU whose host had no address
    went to policy_failed). Without host prefixes the VRF instance still exports (nothing) as Type-5."""
    from bootsvc.agent.frr import blocks, missing

    text = render(parse(evpn_doc(host_prefixes=[])))
    assert text is not None
    body = blocks(text)["router bgp 65011 vrf vrf-a"]
    assert "address-family ipv4 unicast" not in body and "advertise ipv4 unicast" in body
    running = text.replace("frr defaults datacenter\n", "")  # FRR prints what it runs, nothing empty
    assert missing(text, running) == []
