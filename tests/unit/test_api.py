"""REST API /api/v1: roles, JSON errors, 409 with allowed triggers, atomic machine enrollment,
pagination with total, synchronous power through the driver, and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from helpers.conductor import MACHINE, add_token, app_for, make_db, site_config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc.models import Node
from bootsvc.power.base import FatalBmcError, PowerState
from bootsvc.power.fake import FakePowerDriver


class Env:
    def __init__(self, tmp: Path) -> None:
        self.cfg = site_config(f"sqlite:///{tmp}/db.sqlite", tmp)
        self.sessions: sessionmaker[Session] = make_db(self.cfg)
        self.app = app_for(self.cfg, self.sessions)
        self.drivers: dict[str, FakePowerDriver] = {}
        self.app.config["POWER_DRIVER_FACTORY"] = lambda n, _c: self.drivers.setdefault(
            n.name, FakePowerDriver(f"fake://{n.name}"))
        self.c: FlaskClient = self.app.test_client()
        self.tok = {r: add_token(self.sessions, r) for r in ("admin", "tech", "automation", "agent")}

    def call(self, method: str, path: str, body: Any = None, role: str = "admin") -> Any:
        return self.c.open(path, method=method, json=body, headers={"Authorization": f"Bearer {self.tok[role]}"})

    def nodes(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Node)) or 0)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_auth_and_roles(env: Env) -> None:
    r = env.c.get("/api/v1/nodes")
    assert r.status_code == 401 and r.get_json()["error"] == "unauthenticated"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert env.c.get("/api/v1/nodes", headers={"Authorization": "Bearer bsv_nope"}).status_code == 401
    assert env.call("GET", "/api/v1/nodes", role="agent").status_code == 403
    for role in ("admin", "tech", "automation"):
        assert env.call("GET", "/api/v1/nodes", role=role).status_code == 200
    r = env.call("POST", "/api/v1/tenants", {"name": "x", "vrf": "vrf-x", "l3vni": 9}, role="tech")
    assert r.status_code == 403 and "admin" in r.get_json()["reason"]
    assert env.call("POST", "/api/v1/tenants", {"name": "x", "vrf": "vrf-x", "l3vni": 9}).status_code == 201


def test_machine_enroll_is_atomic(env: Env) -> None:
    bad = {**MACHINE, "dpus": [{**MACHINE["dpus"][0], "nics": [{"mac": "52:54:00:01:00:01", "role": "oob"}]}]}
    r = env.call("POST", "/api/v1/machines", bad, role="automation")
    assert r.status_code == 409 and "52:54:00:01:00:01" in r.get_json()["reason"]
    assert env.nodes() == 0, "no half-enrolled machine"
    r = env.call("POST", "/api/v1/machines", MACHINE, role="automation")
    assert r.status_code == 201, r.get_json()
    m = r.get_json()
    assert m["host"]["name"] == "gpu-01" and [d["name"] for d in m["dpus"]] == ["gpu-01-dpu"]
    assert m["dpus"][0]["host_id"] == m["host"]["id"] and m["host"]["tenant"] == "acme"
    assert m["dpus"][0]["provision_method"] == "pxe"  # site default
    assert env.call("GET", "/api/v1/machines/gpu-01-dpu").get_json()["host"]["name"] == "gpu-01"
    assert env.call("POST", "/api/v1/machines", MACHINE).status_code == 409


def test_validation_lists_every_field(env: Env) -> None:
    r = env.call("POST", "/api/v1/nodes", {"name": "Bad Name", "kind": "router", "serial": "",
                                           "nics": [{"mac": "xx"}], "slot": -1})
    assert r.status_code == 400
    fields = {f["field"] for f in r.get_json()["fields"]}
    assert fields >= {"name", "kind", "serial", "nics.0.mac", "slot"}
    r = env.c.post("/api/v1/nodes", data="not json", headers={"Authorization": f"Bearer {env.tok['admin']}"})
    assert r.status_code == 400 and r.get_json()["error"] == "bad_request"
    r = env.call("GET", "/api/v1/nodes?limit=0&offset=-1")
    assert r.status_code == 400 and {f["field"] for f in r.get_json()["fields"]} == {"limit", "offset"}


def test_illegal_transition_is_409_with_allowed(env: Env) -> None:
    env.call("POST", "/api/v1/machines", MACHINE)
    r = env.call("POST", "/api/v1/nodes/gpu-01/release", {})
    assert r.status_code == 409
    body = r.get_json()
    assert body["error"] == "illegal_transition" and body["state"] == "registered"
    assert set(body["allowed"]) == {"provision", "maintenance", "retire"}
    assert env.call("POST", "/api/v1/nodes/gpu-01/retire", {}, role="tech").status_code == 403
    r = env.call("POST", "/api/v1/nodes/gpu-01-dpu/provision", {"reason": "go"}, role="tech")
    assert r.status_code == 200 and r.get_json()["to_state"] == "dpu_booting"
    assert env.call("GET", "/api/v1/nodes/nope").status_code == 404


def test_machine_without_tenant_is_not_provisioned(env: Env) -> None:
    env.call("POST", "/api/v1/machines", {**MACHINE, "tenant": None})
    r = env.call("POST", "/api/v1/machines/gpu-01/provision", {})
    assert r.status_code == 409 and r.get_json()["error"] == "no_tenant"
    assert env.call("PUT", "/api/v1/machines/gpu-01/tenant", {"tenant": "acme"}).status_code == 200
    assert env.call("POST", "/api/v1/machines/gpu-01/provision", {}).status_code == 200


def test_machine_provision_and_events(env: Env) -> None:
    env.call("POST", "/api/v1/machines", MACHINE)
    r = env.call("POST", "/api/v1/machines/gpu-01/provision", {})
    assert r.status_code == 200
    assert [x["to_state"] for x in r.get_json()["results"]] == ["host_waiting_dpu", "dpu_booting"]
    ev = env.call("GET", "/api/v1/events?trigger=provision").get_json()
    assert ev["total"] == 2 and all(e["trigger"] == "provision" for e in ev["items"])
    first = env.call("GET", "/api/v1/events?limit=1").get_json()
    assert first["total"] >= 4 and len(first["items"]) == 1
    after = env.call("GET", f"/api/v1/events?after_id={first['items'][0]['id']}").get_json()
    assert after["total"] == first["total"] - 1
    nodes = env.call("GET", "/api/v1/nodes?kind=dpu&state=dpu_booting").get_json()
    assert nodes["total"] == 1 and nodes["items"][0]["allowed_triggers"]
    assert env.call("GET", "/api/v1/machines?tenant=acme").get_json()["total"] == 1


def test_power_is_synchronous_and_refused_while_active(env: Env) -> None:
    env.call("POST", "/api/v1/machines", MACHINE)
    r = env.call("POST", "/api/v1/nodes/gpu-01/power", {"action": "on"}, role="tech")
    assert r.status_code == 200 and r.get_json()["power_state"] == "On"
    assert env.drivers["gpu-01"].power_state() is PowerState.ON
    env.drivers["gpu-01"].fail("power_off", FatalBmcError("401 Unauthorized", bmc="fake://gpu-01"))
    r = env.call("POST", "/api/v1/nodes/gpu-01/power", {"action": "off"})
    assert r.status_code == 502 and "401" in r.get_json()["reason"] and r.get_json()["retryable"] is False
    env.call("POST", "/api/v1/nodes/gpu-01-dpu/provision", {})
    r = env.call("POST", "/api/v1/nodes/gpu-01-dpu/power", {"action": "off"})
    assert r.status_code == 409 and "abort" in r.get_json()["allowed"]


def test_subscribers_and_tenants(env: Env) -> None:
    r = env.call("POST", "/api/v1/subscribers", {"name": "noc", "url": "http://127.0.0.1:18199/x",
                                                 "secret_ref": "env:NOC_SECRET"})
    assert r.status_code == 201 and r.get_json()["pending"] == 0
    assert env.call("POST", "/api/v1/subscribers", {"name": "noc", "url": "http://127.0.0.1:1/x",
                                                    "secret_ref": "env:X"}).status_code == 409
    assert env.call("GET", "/api/v1/subscribers", role="automation").status_code == 403
    assert env.call("DELETE", "/api/v1/subscribers/noc").get_json()["active"] is False
    t = env.call("GET", "/api/v1/tenants/acme").get_json()
    assert (t["vrf"], t["l3vni"]) == ("vrf-acme", 5001)
    assert env.call("GET", "/api/v1/tenants?limit=1").get_json()["total"] == 2


def test_openapi_document_lists_every_api_route(env: Env) -> None:
    doc = env.c.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0"
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = set()
    for rule in env.app.url_map.iter_rules():
        if rule.rule.startswith(("/api/v1", "/webhooks")):
            path = rule.rule.replace("<", "{").replace(">", "}")
            for m in rule.methods or ():
                if m not in ("HEAD", "OPTIONS"):
                    served.add((m, path))
    assert served == documented


def test_operations_codes_map_to_http_status_not_message_text(env: Env) -> None:
    """Each OpError code has one status: invalid 400, not_found 404, conflict 409 (fields listed)."""
    assert env.call("POST", "/api/v1/machines", MACHINE).status_code == 201
    taken = {**MACHINE["host"], "name": "other", "nics": []}  # same serial as gpu-01
    r = env.call("POST", "/api/v1/nodes", {**taken, "kind": "host"})
    assert r.status_code == 409 and r.get_json()["error"] == "conflict"
    assert r.get_json()["fields"] == [{"field": "serial", "reason": "a node with serial 'SN-GPU-01' exists (gpu-01)"}]
    r = env.call("POST", "/api/v1/nodes", {**taken, "serial": "NEW", "kind": "host", "tenant": "nope"})
    assert r.status_code == 400 and r.get_json()["error"] == "bad_request"
    assert "no tenant named" in r.get_json()["reason"]
    r = env.call("PUT", "/api/v1/nodes/gpu-01/tenant", {"tenant": "nope"})
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"
    # a tenant's taken VRF is a conflict; a malformed prefix is refused by the schema before operations
    r = env.call("POST", "/api/v1/tenants", {"name": "other", "vrf": "vrf-acme", "l3vni": 4242})
    assert r.status_code == 409 and r.get_json()["fields"][0]["field"] == "vrf", r.get_json()


def test_provision_preflight_refuses_a_dpu_without_bmc_unless_manual_power(env: Env) -> None:
    env.call("POST", "/api/v1/nodes", {"name": "lone", "kind": "dpu", "serial": "MT-LONE"})
    r = env.call("POST", "/api/v1/nodes/lone/provision", {})
    assert r.status_code == 400 and "has no BMC" in r.get_json()["reason"]
    r = env.call("POST", "/api/v1/nodes/lone/provision", {"manual_power": True})
    assert r.status_code == 200 and r.get_json()["to_state"] == "dpu_booting"
    env.call("POST", "/api/v1/machines", {"tenant": "acme", "host": {"name": "solo", "serial": "SN-SOLO"}})
    r = env.call("POST", "/api/v1/machines/solo/provision", {})
    assert r.status_code == 400 and "--no-dpu" in r.get_json()["reason"]
    r = env.call("POST", "/api/v1/machines/solo/provision", {"no_dpu": True})
    assert r.status_code == 200, r.get_json()


def test_power_of_a_node_without_bmc_is_a_400_naming_the_field(env: Env) -> None:
    from bootsvc import metrics

    env.call("POST", "/api/v1/nodes", {"name": "lone", "kind": "dpu", "serial": "MT-LONE"})
    before = metrics.counters.get("bootsvc_bmc_requests_total", {"op": "power_on", "via": "api"})
    r = env.call("POST", "/api/v1/nodes/lone/power", {"action": "on"})
    body = r.get_json()
    assert r.status_code == 400 and body["error"] == "no_bmc" and "bootsvc node set lone --bmc" in body["reason"]
    assert body["fields"] == [{"field": "bmc_address", "reason": "not set"}]
    assert metrics.counters.get("bootsvc_bmc_requests_total", {"op": "power_on", "via": "api"}) == before
    assert "lone" not in env.drivers  # nothing was asked of any BMC


def test_api_power_counts_bmc_metrics_once(env: Env) -> None:
    from bootsvc import metrics

    env.call("POST", "/api/v1/machines", MACHINE)
    req = {"op": "power_on", "via": "api"}
    before = metrics.counters.get("bootsvc_bmc_requests_total", req)
    assert env.call("POST", "/api/v1/nodes/gpu-01/power", {"action": "on"}).status_code == 200
    assert metrics.counters.get("bootsvc_bmc_requests_total", req) == before + 1
    env.drivers["gpu-01"].fail("power_off", FatalBmcError("401 Unauthorized", bmc="fake://gpu-01"))
    err = {"op": "power_off", "class": "fatal"}
    before = metrics.counters.get("bootsvc_bmc_errors_total", err)
    assert env.call("POST", "/api/v1/nodes/gpu-01/power", {"action": "off"}).status_code == 502
    assert metrics.counters.get("bootsvc_bmc_errors_total", err) == before + 1
