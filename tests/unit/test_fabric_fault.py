"""FRR refuses a config, end to end: the real agent (bootsvc.agent.main.Agent, its real API client over
the agent API, an in-memory kernel, FRR answering like FRR) against bootsvc's conductor and in-memory
BMCs. The refusal rolls the DPU back, FRR's reason reaches the DPU's state and event log, the host is
never powered; once FRR takes the config the fabric gate, not the report alone, releases the host.

What FRR says and prints is real: the refusal text is the one FRR 8.4 gives for an unknown peer-group
(tests/integration/test_frr_netns.py sees it from real FRR), the state answers are
tests/data/frr/*.json captured from FRR 8.4.4, re-keyed to this site's VRF where the gate needs an
L3VNI that is Up (this machine's kernel has no VRFs; see that test's docstring).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from helpers.agent import FakeDataplane, FakeKernel
from helpers.conductor import Lab, node_secret, state

from bootsvc.agent.client import AgentApi, ApiError
from bootsvc.agent.frrd import FrrError
from bootsvc.agent.main import Agent, AgentConfig
from bootsvc.models import Event, Node

DATA = Path(__file__).resolve().parents[1] / "data" / "frr"
REFUSAL = "% Configure the peer-group first; line 12: Failure to communicate[13] to bgpd"


def cap(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


class FlaskAgentApi(AgentApi):
    """The agent's real API client (check-in, secret rotation, ETag, report), over Flask's test client
    from the DPU's Zone 0 address instead of a socket."""

    def __init__(self, client: FlaskClient, addr: str, node: str, secret: str) -> None:
        super().__init__("http://bootsvc.invalid", node, secret)
        self.client, self.addr = client, addr

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        h = {"Authorization": f"Bearer {self.secret}", "X-Bootsvc-Node": self.node, **(headers or {})}
        r = self.client.open("/api/v1/agent" + path, method=method, json=body, headers=h,
                             environ_base={"REMOTE_ADDR": self.addr})
        if r.status_code == 304:
            return 304, dict(r.headers), b""
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.get_data(as_text=True)[:500])
        return r.status_code, dict(r.headers), r.get_data()


class Frr:
    """FRR as the agent sees it: refuses any config while ``refusing``; answers state queries with
    real FRR 8.4 output, the L3VNI and the host's Type-5 route re-keyed to ``vrf``/``vni``/``host``."""

    def __init__(self) -> None:
        self.refusing = True
        self.loads: list[str] = []
        self._applied: str | None = None
        self.tenant: tuple[str, int, str] | None = None

    def applied(self) -> str | None:
        return self._applied

    def load(self, text: str) -> None:
        self.loads.append(text)
        if self.refusing and "vrf" in text:
            raise FrrError(REFUSAL)
        self._applied = text

    def state(self, vrf: str | None = None) -> tuple[dict[str, Any], list[str]]:
        out = {"summary": cap("show_bgp_summary_evpn"), "vrf_summary": cap("show_bgp_vrf_all_summary"),
               "evpn_vni": cap("show_evpn_vni_up"), "vrf_vni": cap("show_vrf_vni_inactive"),
               "type5": cap("show_bgp_l2vpn_evpn_route_type_prefix")}
        if self.tenant is not None and not self.refusing:
            name, vni, host = self.tenant
            up = cap("show_vrf_vni_up")
            up["vrfs"] = [{**v, "vrf": name, "vni": vni} for v in up["vrfs"]][:1]
            out["vrf_vni"] = up
            ip = host.split("/")[0]
            t5 = cap("show_bgp_l2vpn_evpn_route_type_prefix")
            rd = next(k for k in t5 if k.startswith("10.255.0.11"))
            path = json.loads(json.dumps(t5[rd]["[5]:[0]:[32]:[10.77.0.1]"]).replace("10.77.0.1", ip))
            t5[rd][f"[5]:[0]:[32]:[{ip}]"] = path
            out["type5"] = t5
        return out, []

    def version(self) -> str:
        return "8.4.4"


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path, fabric={"asn": 65000, "gate_deadline_seconds": 600})


def real_agent(lab: Lab, tmp_path: Path, frr: Frr, monkeypatch: pytest.MonkeyPatch) -> Agent:
    name, secret = node_secret(lab.cfg, lab.sessions, lab.dpu)
    api = FlaskAgentApi(lab.client, lab.agent.addr, name, secret)
    cfg = AgentConfig(url="http://bootsvc.invalid", node=name, secret=secret,
                      host_port=lab.cfg.orchestration.host_port, uplink="p0", state_dir=tmp_path / "agent",
                      retry_failed=0.0)  # the operator's retry is what this test waits for
    agent = Agent(cfg, FakeDataplane(FakeKernel()), api, frr=frr)  # type: ignore[arg-type]
    # the DHCP relay and RA sockets need the DPU's real host port; not what this test is about
    monkeypatch.setattr(agent, "_services", lambda _policy: None)
    return agent


def test_frr_refusal_fails_the_dpu_with_frrs_reason_and_the_host_never_boots(
        lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lab.api("POST", "/api/v1/machines/m1/provision").status_code == 200
    lab.until(lab.dpu, "dpu_booting")
    lab.installer.send(lab.dpu, "started")
    lab.installer.send(lab.dpu, "done")
    frr = Frr()
    agent = real_agent(lab, tmp_path, frr, monkeypatch)
    # first check-in: the DPU is ready and is told its policy version; the agent pulls the tenant policy,
    # FRR refuses it, kernel and FRR are rolled back, "failed" is reported with FRR's words
    agent.step()
    assert agent.applied.tenant is None and frr.applied() is None
    with lab.sessions() as s:
        d = s.get(Node, lab.dpu)
        assert d is not None and d.state == "policy_failed"
        assert d.last_error is not None and "FRR refused policy" in d.last_error and REFUSAL in d.last_error
    lab.until(lab.host, "blocked_by_dpu")
    lab.run(3)
    assert sum(lab.host_drv.calls.values()) == 0  # the host was never powered or network-booted
    failed = [e for e in lab.events(lab.dpu) if e.to_state == "policy_failed"]
    assert failed and "Configure the peer-group first" in json.dumps(failed[-1].detail)

    # FRR fixed (e.g. bgpd enabled), the operator retries the DPU: the apply now succeeds, but the host
    # still waits until the agent's fabric report shows the network is real
    frr.refusing = False
    assert lab.api("POST", "/api/v1/nodes/m1-dpu/retry").status_code == 200
    lab.until(lab.dpu, "policy_pending")
    agent.step()
    assert state(lab.sessions, lab.dpu) == "policy_applied"
    t = agent.applied.tenant
    assert t is not None and frr.applied() is not None and f"vrf {t.vrf_name}" in frr.applied()
    lab.run(3)
    assert state(lab.sessions, lab.host) == "blocked_by_dpu"  # the L3VNI of its VRF is not Up in FRR's answer
    assert sum(lab.host_drv.calls.values()) == 0
    frr.tenant = (t.vrf_name, t.l3vni, str(t.host_prefixes[0]))
    agent.step()  # the next check-in carries the fabric report: sessions, L3VNI Up, host prefix as Type-5
    lab.until(lab.host, "host_booting")
    with lab.sessions() as s:
        evs = s.query(Event).filter(Event.node_id == lab.host, Event.to_state == "host_booting").all()
        assert len(evs) == 1
