"""The boot gate on a DPU's fabric report (bootsvc.fabric) and the policy's size with and without EVPN."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.ui import Env, enroll, login, make_env

from bootsvc import config as config_mod
from bootsvc.agent.fabric_health import report
from bootsvc.fabric import Expect, expect_from_policy, gate, session_drops, summary
from bootsvc.policy import Peer, TenantInfo, build

DATA = Path(__file__).resolve().parents[1] / "data" / "frr"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
WANT = Expect("v1", ("p0", "p1"), "default", 4001, ("10.77.0.1/32",))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path)


def cap(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


def rep(summary_cap: str = "show_bgp_summary_evpn", vni_cap: str = "show_vrf_vni_up",
        prefixes: tuple[str, ...] = ("10.77.0.1/32",), version: str = "v1") -> dict[str, Any]:
    """A fabric report as the agent builds it, from real FRR 8.4 output."""
    r = report({"summary": cap(summary_cap), "vrf_vni": cap(vni_cap),
                "type5": cap("show_bgp_l2vpn_evpn_route_type_prefix"),
                "vrf_summary": cap("show_bgp_vrf_all_summary"),
                "vrf_routes": cap("show_bgp_vrf_default_ipv4_unicast")},
               uplink_names=("p0", "p1"), vrf="default", vni=4001, host_prefixes=prefixes)
    r["policy_version"] = version
    r["frr_error"] = None
    return r


def test_all_three_hold_the_host_may_boot() -> None:
    v = gate(rep(), WANT)
    assert v.ready and v.failed is None
    assert [c.name for c in v.checks] == ["fabric_report", "bgp_sessions", "l3vni", "host_prefix"]
    assert "p0 Established, p1 Established" in v.reason()


@pytest.mark.parametrize(("r", "want", "check", "hint"), [
    (None, WANT, "fabric_report", "FRR"),
    (rep(version="v0"), WANT, "fabric_report", "next check-in"),
    ({**rep(), "frr_error": "FRR refused policy v1: % Unknown command"}, WANT, "fabric_report", "refused"),
    (rep("show_bgp_summary_p0_down"), WANT, "bgp_sessions", "BGP unnumbered"),
    (rep(vni_cap="show_vrf_vni_inactive"), Expect("v1", ("p0", "p1"), "vrf-acme", 5001, ("10.77.0.1/32",)),
     "l3vni", "show vrf vni"),
    (rep(prefixes=("10.77.0.9/32",)), Expect("v1", ("p0", "p1"), "default", 4001, ("10.77.0.9/32",)),
     "host_prefix", "advertise ipv4 unicast"),
    (rep(), Expect("v1", ("p0", "p1"), "default", 4001, ()), "host_prefix", "reserve an address"),
    (rep(), Expect("v1", ("p0", "p3"), "default", 4001, ("10.77.0.1/32",)), "bgp_sessions", "fabric.uplinks"),
])
def test_each_failing_check_is_named_with_a_hint(r: Any, want: Expect, check: str, hint: str) -> None:
    v = gate(r, want)
    assert not v.ready and v.failed is not None
    assert v.failed.name == check and hint in v.failed.hint, v.reason()
    assert v.reason().startswith(f"fabric check {check} failed: ")


def test_min_uplinks_lets_one_session_do() -> None:
    r = rep("show_bgp_summary_p0_down")
    assert not gate(r, WANT).ready
    assert gate(r, WANT, min_uplinks=1).ready


def test_a_session_without_evpn_does_not_count() -> None:
    r = rep()
    r["uplinks"]["p1"]["evpn"] = False
    v = gate(r, WANT)
    assert v.failed is not None and v.failed.name == "bgp_sessions" and "l2vpn evpn" in v.failed.hint


def test_deadline() -> None:
    r = rep("show_bgp_summary_p0_down")
    assert not gate(r, WANT, since=T0, now=T0 + dt.timedelta(seconds=299), deadline_seconds=300).expired
    v = gate(r, WANT, since=T0, now=T0 + dt.timedelta(seconds=301), deadline_seconds=300)
    assert v.expired and "bgp_sessions" in v.reason()
    assert not gate(rep(), WANT, since=T0, now=T0 + dt.timedelta(days=1), deadline_seconds=300).expired


def test_session_drops_and_summary() -> None:
    up, down = rep(), rep("show_bgp_summary_p0_down")
    drops = session_drops(up, down)
    assert len(drops) == 1 and drops[0][:2] == ("p0", "Established")
    assert session_drops(down, up) == [] and session_drops(None, up) == [] and session_drops(up, None) == []
    assert session_drops(up, {"uplinks": {"p1": {"state": "Established"}}}) == [("p0", "Established", "unreported")]
    s = summary(up)
    assert [x[:2] for x in s["sessions"]] == [("p0", "Established"), ("p1", "Established")]
    assert ("10.77.0.2/32", "10.255.0.12") in s["remote"] and "10.77.0.1/32" in s["local"]
    assert ("default", "10.77.0.1/32", "0.0.0.0", "local") in s["vrf_routes"]
    assert summary("garbage") == {"sessions": [], "l3vni": None, "local": [], "remote": [], "vrf_routes": [],
                                  "errors": []}
    assert summary({"vrf_routes": {"v": [["x"], "y", None], "w": "z"}})["vrf_routes"] == []


# ------------------------------------------------------------------- the policy: no per-fleet lists -------


def _site(evpn: bool) -> Any:
    return config_mod.from_mapping({
        "database": {"url": "sqlite:///:memory:"},
        "networks": [
            {"name": "mgmt", "zone": 0, "cidr": "10.98.0.0/24", "gateway": "10.98.0.1", "boot_server": "10.98.0.1"},
            {"name": "acme-hosts", "zone": 1, "vrf": "vrf-acme", "cidr": "10.0.0.0/16", "gateway": "10.0.0.1"},
        ],
        "tenants": [{"name": "acme", "vrf": "vrf-acme", "l3vni": 5001}],
        "orchestration": {"vtep_network": "10.255.0.0/16"},
        "fabric": {"asn": 4200000000, "evpn": evpn},
    }, "<fabric-test>", env={})


def _peers(n: int) -> list[Peer]:
    """n DPUs of the tenant (node ids 1..n, host 10.0.x.y/32 each); node 1 is the one asking."""
    return [Peer(f"10.255.{i >> 8}.{i & 255}", (f"10.0.{i >> 8}.{(i & 255) or 1}/32",)) for i in range(1, n + 1)]


def _size(evpn: bool, n: int) -> tuple[int, dict[str, Any]]:
    d = build(_site(evpn), node_id=1, node_name="dpu1", serial="MT1",
              tenant=TenantInfo("acme", "vrf-acme", 5001, None), peers=_peers(n))
    return len(json.dumps(d, separators=(",", ":"))), d


def test_policy_size_is_constant_with_evpn_and_grows_without() -> None:
    e1, d1 = _size(True, 1)
    e1000, d1000 = _size(True, 1000)
    s1, _ = _size(False, 1)
    s1000, sd = _size(False, 1000)
    print(f"\npolicy bytes: EVPN 1 peer {e1}, 1,000 peers {e1000}; static 1 peer {s1}, 1,000 peers {s1000}")
    assert e1 == e1000 and d1["peers"] == [] and d1["host_prefixes"] == ["10.0.0.1/32"]
    assert d1000["evpn"]["asn"] == 4200000001 and d1000["evpn"]["uplinks"] == ["p0", "p1"]
    assert len(sd["peers"]) == 999 and s1000 > 20 * s1  # one entry per other DPU of the tenant
    assert "evpn" not in sd or sd["evpn"] is None
    want = expect_from_policy(d1000)
    assert want == Expect(d1000["version"], ("p0", "p1"), "vrf-acme", 5001, ("10.0.0.1/32",))
    assert expect_from_policy(sd) is None  # static: no gate


def test_tenantless_policy_keeps_the_underlay() -> None:
    d = build(_site(True), node_id=3, node_name="dpu3", serial="", tenant=None)
    assert d["evpn"]["vtep"] == "10.255.0.3" and d["tenant"] is None
    want = expect_from_policy(d)
    assert want is not None and want.vrf is None
    r = rep()
    r["policy_version"] = d["version"]
    assert gate(r, want).ready  # no tenant: only the sessions count


# ------------------------------------------------------------------- a ready DPU loses a session ------------


def test_checkin_with_a_dropped_session_records_an_event_and_counts_it(tmp_path: Path) -> None:
    from helpers.conductor import Agent, app_for, enroll_machine, make_db, site_config
    from sqlalchemy import select

    from bootsvc import metrics
    from bootsvc.models import Event

    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path)
    sessions = make_db(cfg)
    _host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b", index=1)
    c = app_for(cfg, sessions).test_client()
    a = Agent(c, cfg, sessions, dpu)
    a.checkin()  # install secret traded

    def checkin(fab: dict[str, Any]) -> None:
        r = c.post("/api/v1/agent/checkin", headers=a.headers(), environ_base={"REMOTE_ADDR": a.addr},
                   json={"health": {"applied_version": None, "fabric": fab}})
        assert r.status_code == 200, r.get_data(as_text=True)

    before = metrics.counters.get("bootsvc_fabric_session_drops_total", {"uplink": "p0"})
    checkin(rep())
    checkin(rep())  # still up: nothing
    checkin(rep("show_bgp_summary_p0_down"))
    checkin(rep("show_bgp_summary_p0_down"))  # still down: counted once
    checkin({"uplinks": "garbage"})  # a hostile report is not an error
    with sessions() as s:
        evs = s.scalars(select(Event).where(Event.node_id == dpu, Event.trigger == "fabric_session_down")).all()
        assert len(evs) == 1 and evs[0].detail == {"uplinks": {"p0": "Idle"}}
    assert metrics.counters.get("bootsvc_fabric_session_drops_total", {"uplink": "p0"}) == before + 1


def test_machine_page_shows_sessions_and_routes_per_dpu(env: Any) -> None:
    """The machine page's DPU panel: BGP per uplink, L3VNI, Type-5 out and in, the gate's verdict."""
    from sqlalchemy import select

    from bootsvc.models import AgentStatus, Node

    c = env.client()
    assert enroll(c, login(c)).status_code in (200, 302)
    with env.sessions() as s:
        dpu = s.scalars(select(Node).where(Node.kind == "dpu")).one()
        s.add(AgentStatus(node_id=dpu.id, health={"fabric": rep("show_bgp_summary_p0_down")}))
        s.commit()
        host_id = dpu.host_id
    page = c.get(f"/ui/machines/{host_id}").text
    assert "p0</span> BGP Idle" in page and "p1</span> BGP Established" in page
    assert "L3VNI 4001" in page and "10.77.0.2/32</span> <small>via 10.255.0.12" in page
    assert "fabric check bgp_sessions failed" in page
    assert "VRF default routes (4)" in page and "10.77.0.1/32</span> <small>local</small>" in page


def test_dpu_gate_from_site_settings() -> None:
    from bootsvc.fabric import dpu_gate

    site = _site(True)
    _n, doc = _size(True, 3)
    fab = rep(prefixes=("10.0.0.1/32",), version=doc["version"])
    assert dpu_gate(site, doc, {"fabric": fab}, applied_since=T0, now=T0) is not None
    off = site.model_copy(update={"fabric": site.fabric.model_copy(update={"gate_boot": False})})
    assert dpu_gate(off, doc, {}, applied_since=T0, now=T0) is None
    _n, static = _size(False, 3)
    assert dpu_gate(_site(False), static, {}, applied_since=T0, now=T0) is None  # no EVPN: nothing to ask
    late = dpu_gate(site, doc, None, applied_since=T0, now=T0 + dt.timedelta(seconds=301))
    assert late is not None and late.expired and late.failed is not None and late.failed.name == "fabric_report"


def test_asn_schemes() -> None:
    from bootsvc.policy import PolicyBuildError, evpn_asn

    site = _site(True)
    assert evpn_asn(site, 7) == 4200000007  # one private ASN per DPU (RFC 7938 §5.2.1)
    one = site.model_copy(update={"fabric": site.fabric.model_copy(update={"asn_per_dpu": False})})
    assert evpn_asn(one, 7) == 4200000000
    assert evpn_asn(_site(False), 7) is None
    top = site.model_copy(update={"fabric": site.fabric.model_copy(update={"asn": 2**32 - 2})})
    with pytest.raises(PolicyBuildError, match="4-byte ASN"):
        evpn_asn(top, 7)
    legacy = site.model_copy(update={
        "fabric": site.fabric.model_copy(update={"asn": None}),
        "orchestration": site.orchestration.model_copy(update={"evpn_asn": 65011})})
    assert evpn_asn(legacy, 7) == 65011


# ------------------------------------------------------------------- the conductor holds the host ---------


def _good_fabric(doc: dict[str, Any]) -> dict[str, Any]:
    """A report as the agent sends it once FRR is up for ``doc`` (shape: bootsvc.agent.fabric_health)."""
    return {"uplinks": {u: {"state": "Established", "up_ms": 5000, "pfx_rcvd": 3, "evpn_pfx_rcvd": 3}
                        for u in doc["evpn"]["uplinks"]},
            "l3vni": {"vni": doc["l3vni"], "vrf": doc["vrf_name"], "state": "Up",
                      "svi": f"babr{doc['l3vni']}", "vxlan": f"bavx{doc['l3vni']}"},
            "host_prefixes": {p: True for p in doc["host_prefixes"]},
            "type5": {"local": list(doc["host_prefixes"]), "remote": []}, "vrf_instances": ["default"],
            "errors": [], "policy_version": doc["version"], "frr_error": None}


def test_conductor_boots_the_host_only_once_the_dpu_fabric_is_real(tmp_path: Path) -> None:
    from helpers.conductor import Lab, state

    lab = Lab(tmp_path, fabric={"asn": 65000, "gate_deadline_seconds": 600})
    assert lab.api("POST", "/api/v1/machines/m1/provision").status_code == 200
    lab.run()
    lab.dpu_to_applied()  # the agent reported "applied", but no fabric report yet
    doc = lab.agent.policy()
    assert doc["peers"] == [] and doc["host_prefixes"] == ["10.0.0.11/32"]
    lab.run(3)
    assert state(lab.sessions, lab.host) == "host_waiting_dpu"
    assert sum(lab.host_drv.calls.values()) == 0  # host BMC untouched

    def checkin(fab: dict[str, Any]) -> None:
        r = lab.client.post("/api/v1/agent/checkin", headers=lab.agent.headers(),
                            environ_base={"REMOTE_ADDR": lab.agent.addr},
                            json={"health": {"applied_version": doc["version"], "fabric": fab}})
        assert r.status_code == 200

    bad = _good_fabric(doc)
    bad["uplinks"]["p1"] = {"state": "Active"}
    checkin(bad)
    lab.run(3)
    assert state(lab.sessions, lab.host) == "host_waiting_dpu"
    checkin(_good_fabric(doc))
    lab.until(lab.host, "host_booting")
    assert state(lab.sessions, lab.dpu) == "policy_applied"


def test_conductor_fails_the_dpu_when_the_fabric_gate_expires(tmp_path: Path) -> None:
    from helpers.conductor import Lab, state

    from bootsvc.models import Node

    lab = Lab(tmp_path, fabric={"asn": 65000, "gate_deadline_seconds": 60})
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    lab.dpu_to_applied()
    doc = lab.agent.policy()
    fab = _good_fabric(doc)
    fab["l3vni"]["state"] = "Down"
    r = lab.client.post("/api/v1/agent/checkin", headers=lab.agent.headers(),
                        environ_base={"REMOTE_ADDR": lab.agent.addr},
                        json={"health": {"applied_version": doc["version"], "fabric": fab}})
    assert r.status_code == 200
    lab.run(2)
    assert state(lab.sessions, lab.dpu) == "policy_applied"
    lab.clock.jump(61)
    lab.until(lab.dpu, "policy_failed")
    with lab.sessions() as s:
        d = s.get(Node, lab.dpu)
        assert d is not None and d.last_error is not None and "fabric check l3vni failed" in d.last_error
    lab.until(lab.host, "blocked_by_dpu")
    assert sum(lab.host_drv.calls.values()) == 0


def test_decide_holds_the_host_for_the_fabric_and_fails_an_expired_dpu() -> None:
    from dataclasses import replace

    from bootsvc.orchestrate import DpuFacts, Facts, Op, decide
    from bootsvc.states import Trigger

    why = "fabric check l3vni failed: L3VNI 5001 of VRF vrf-acme Down"
    host = Facts(node_id=1, name="h", kind="host", state="host_waiting_dpu", now=T0, tenant="acme",
                 dpus=(DpuFacts(2, "d", "policy_applied", None, why),))
    d = decide(host)
    assert d.op is Op.WAIT and d.reason == f"waiting for the fabric: d: {why}"
    assert decide(replace(host, dpus=(DpuFacts(2, "d", "policy_applied"),))).trigger is Trigger.DPU_READY
    blocked = replace(host, state="blocked_by_dpu", deadline=None)
    assert decide(blocked).op is Op.WAIT
    assert decide(replace(blocked, dpus=(DpuFacts(2, "d", "policy_applied"),))).trigger is Trigger.DPU_READY
    dpu = Facts(node_id=2, name="d", kind="dpu", state="policy_applied", now=T0, fabric_failed=why)
    d = decide(dpu)
    assert d.trigger is Trigger.POLICY_FAILED and d.reason == why
    assert decide(replace(dpu, fabric_failed=None)).op is Op.WAIT


# ------------------------------------------------------------------- a tenant move without reinstall ------


def test_a_deployed_host_moves_to_another_tenant_without_a_reinstall(tmp_path: Path) -> None:
    """PUT .../tenant on a deployed machine: the host stays deployed (no BMC call, no reinstall), its DPU
    gets the new tenant's policy at the next drift check - same host address, announced now in the new
    VRF with the new L3VNI - and the move is in both nodes' event logs."""
    from helpers.conductor import Lab, add_token, state

    from bootsvc.conductor import DRIFT_SECONDS

    lab = Lab(tmp_path, fabric={"asn": 65000, "gate_boot": False})
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    lab.host_to_deployed()
    lab.run(3)  # the post-install clean-up (one-time boot override cleared) happens before the move
    old = lab.agent.policy()
    host_calls = dict(lab.host_drv.calls)
    admin = {"Authorization": f"Bearer {add_token(lab.sessions, 'admin')}"}
    r = lab.client.put("/api/v1/machines/m1/tenant", json={"tenant": "globex"}, headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["host"]["tenant"] == "globex"
    lab.clock.jump(DRIFT_SECONDS)
    lab.until(lab.dpu, "policy_pending")
    new = lab.agent.policy()
    assert (old["tenant"], old["vrf_name"], old["l3vni"]) == ("acme", "vrf-acme", 5001)
    assert (new["tenant"], new["vrf_name"], new["l3vni"]) == ("globex", "vrf-globex", 5002)
    assert new["host_prefixes"] == old["host_prefixes"] == ["10.0.0.11/32"]
    assert new["evpn"] == old["evpn"]  # the underlay (sessions, VTEP) is untouched: only the VRF moves
    lab.agent.sync()
    lab.run(3)
    assert state(lab.sessions, lab.dpu) == "policy_applied" and lab.agent.applied == new["version"]
    assert state(lab.sessions, lab.host) == "deployed"
    assert lab.host_drv.calls == host_calls  # no power cycle, no network boot: no reinstall
    for node_id in (lab.host, lab.dpu):
        moved = [e for e in lab.events(node_id) if e.trigger == "tenant_moved"]
        assert len(moved) == 1 and moved[0].detail == {"from": "acme", "to": "globex"}


def test_a_tenant_move_is_refused_while_the_dpu_cannot_carry_it(tmp_path: Path) -> None:
    """A deployed host moves only through DPUs resting in policy_applied, and never to no tenant;
    every refusal says why and changes nothing."""
    from helpers.conductor import Lab, add_token

    from bootsvc import operations
    from bootsvc.models import Node

    lab = Lab(tmp_path, fabric={"asn": 65000, "gate_boot": False})
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    lab.host_to_deployed()
    admin = {"Authorization": f"Bearer {add_token(lab.sessions, 'admin')}"}
    r = lab.client.put("/api/v1/machines/m1/tenant", json={"tenant": None}, headers=admin)
    assert r.status_code == 409 and "release it first" in r.get_json()["reason"]
    with lab.sessions() as s:  # the DPU has a tenant of its own: moving the host alone would not move it
        d = s.get(Node, lab.dpu)
        assert d is not None
        d.tenant_id = d.host.tenant_id if d.host else None
        s.commit()
    r = lab.client.put("/api/v1/nodes/m1/tenant", json={"tenant": "globex"}, headers=admin)
    assert r.status_code == 409 and "move the whole machine" in r.get_json()["reason"]
    with lab.sessions() as s:
        d = s.get(Node, lab.dpu)
        assert d is not None
        d.state = "policy_pending"  # a policy on its way: the move would race it
        d.tenant_id = None
        s.commit()
        host = operations.find_node(s, "m1")
        with pytest.raises(operations.OpError) as e:
            operations.assign_tenant(s, [host], "globex", actor="t")
        assert e.value.code == "conflict" and "its DPU m1-dpu is policy_pending, not policy_applied" in str(e.value)
    with lab.sessions() as s:
        h = s.get(Node, lab.host)
        assert h is not None and h.tenant is not None and h.tenant.name == "acme"


# ------------------------------------------------------------------- Zone 2 per tenant --------------------


def test_zone2_egress_only_for_the_tenant_whose_config_allows_it() -> None:
    """tenants[].egress adds Zone 2 flows to that tenant's policy only; the site's orchestration.egress
    goes to every tenant; a malformed item is refused at load with the field named."""
    tree = {
        "database": {"url": "sqlite:///:memory:"},
        "networks": [
            {"name": "mgmt", "zone": 0, "cidr": "10.98.0.0/24", "gateway": "10.98.0.1", "boot_server": "10.98.0.1"},
            {"name": "red-hosts", "zone": 1, "vrf": "red", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
            {"name": "blue-hosts", "zone": 1, "vrf": "blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
        ],
        "tenants": [{"name": "red", "vrf": "red", "l3vni": 5001, "egress": ["tcp:192.0.2.10/32:443"]},
                    {"name": "blue", "vrf": "blue", "l3vni": 5002}],
        "orchestration": {"vtep_network": "10.255.0.0/16", "egress": ["udp:198.51.100.0/24:123"]},
        "fabric": {"asn": 65000},
    }
    site = config_mod.from_mapping(tree, "<egress>", env={})

    def zone2(tenant: str, vni: int) -> list[tuple[str, str, int | None]]:
        d = build(site, node_id=1, node_name="d", serial="", tenant=TenantInfo(tenant, tenant, vni, None))
        return [(f["proto"], f["dst"], f["dport"]) for f in d["flows"] if f["zone"] == 2]

    assert zone2("red", 5001) == [("udp", "198.51.100.0/24", 123), ("tcp", "192.0.2.10/32", 443)]
    assert zone2("blue", 5002) == [("udp", "198.51.100.0/24", 123)]
    bad = {**tree, "tenants": [{"name": "red", "vrf": "red", "l3vni": 5001, "egress": ["tcp:192.0.2.10/32:0"]}]}
    with pytest.raises(config_mod.ConfigError, match=r"tenants.*egress"):
        config_mod.from_mapping(bad, "<egress>", env={})
