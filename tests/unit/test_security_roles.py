"""Roles exactly as documented, route by route: every route of the app is called with a token (or UI
session) of every role and must answer 403 exactly where docs/roles.md says the role may not go.
Also: ``GET /nodes`` needs a read token, and docs/roles.md is what the code says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from helpers.conductor import MACHINE, add_token, app_for, make_db, site_config

from bootsvc.power.fake import FakePowerDriver
from bootsvc.web.auth import ROLES, route_matrix

ROOT = Path(__file__).resolve().parents[2]

# The documented policy (auth.py's docstring, docs/roles.md's preamble), written out by hand: the code
# must agree with it, and the requests below must agree with the code.
READ_ONLY = ("admin", "tech", "automation", "viewer")
POLICY: dict[tuple[str, str], set[str]] = {
    ("POST", "/api/v1/nodes/<ident>/power"): {"admin", "tech"},
    ("POST", "/api/v1/nodes/<ident>/maintenance"): {"admin", "tech"},
    ("POST", "/api/v1/nodes/<ident>/maintenance-done"): {"admin", "tech"},
    ("POST", "/api/v1/nodes/<ident>/abort"): {"admin", "tech"},
    ("POST", "/api/v1/nodes/<ident>/reprovision"): {"admin", "tech"},
    ("POST", "/api/v1/nodes/<ident>/retire"): {"admin"},
    ("PUT", "/api/v1/nodes/<ident>/tenant"): {"admin", "automation"},
    ("PUT", "/api/v1/machines/<ident>/tenant"): {"admin", "automation"},
    ("POST", "/api/v1/nodes/<ident>/provision"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/nodes/<ident>/release"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/nodes/<ident>/retry"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/machines/<ident>/provision"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/machines/<ident>/release"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/machines/<ident>/retry"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/nodes"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/machines"): {"admin", "tech", "automation"},
    ("POST", "/api/v1/tenants"): {"admin"},
    ("GET", "/api/v1/subscribers"): {"admin"},
    ("POST", "/api/v1/subscribers"): {"admin"},
    ("DELETE", "/api/v1/subscribers/<name>"): {"admin"},
    ("POST", "/ui/machines/<int:node_id>/act"): {"admin", "tech"},
    ("GET", "/ui/machines/<int:node_id>/confirm"): {"admin", "tech"},
    ("POST", "/ui/enroll"): {"admin", "tech"},
}


class Env:
    def __init__(self, tmp: Path) -> None:
        cfg = site_config(f"sqlite:///{tmp}/db.sqlite", tmp)
        self.sessions = make_db(cfg)
        self.app = app_for(cfg, self.sessions)
        self.app.config["POWER_DRIVER_FACTORY"] = lambda n, _c: FakePowerDriver(f"fake://{n.name}")
        self.tok = {r: add_token(self.sessions, r) for r in ROLES}
        c = self.app.test_client()
        r = c.post("/api/v1/machines", json=MACHINE, headers={"Authorization": f"Bearer {self.tok['admin']}"})
        assert r.status_code == 201, r.get_json()
        self.host_id = r.get_json()["host"]["id"]

    def url(self, path: str) -> str:
        return (path.replace("<ident>", "gpu-01").replace("<int:node_id>", str(self.host_id))
                .replace("/tenants/<name>", "/tenants/acme").replace("<name>", "noc"))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_the_code_says_what_the_documented_policy_says(env: Env) -> None:
    matrix = {(r.method, r.path): r for r in route_matrix(env.app)}
    for key, roles in POLICY.items():
        assert set(matrix[key].roles) == roles, key
    for (method, path), r in matrix.items():
        if r.auth in ("API token", "UI session") and (method, path) not in POLICY:
            assert set(r.roles) == set(READ_ONLY), f"{method} {path} is a read route: every reading role"
    assert all("agent" not in r.roles for r in matrix.values())
    assert matrix[("GET", "/nodes")].auth == "API token"


def test_every_api_route_refuses_exactly_the_roles_the_matrix_leaves_out(env: Env) -> None:
    c = env.app.test_client()
    checked = 0
    for r in route_matrix(env.app):
        if r.auth != "API token":
            continue
        url = env.url(r.path)
        anon = c.open(url, method=r.method, json={})
        assert anon.status_code == 401, (r.method, url)
        for role in ROLES:
            resp = c.open(url, method=r.method, json={}, headers={"Authorization": f"Bearer {env.tok[role]}"})
            if role in r.roles:
                assert resp.status_code not in (401, 403), (r.method, url, role, resp.get_json())
            else:
                assert resp.status_code == 403, (r.method, url, role, resp.status_code)
                assert resp.get_json()["error"] == "forbidden"
            checked += 1
    assert checked >= 30 * len(ROLES)


def _login(c: FlaskClient, token: str) -> str | None:
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', c.get("/ui/login").text)
    assert nonce
    r = c.post("/ui/login", data={"token": token, "login_nonce": nonce.group(1), "next": "/ui/"})
    if r.status_code != 302:
        return None
    m = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/ui/enroll").text)
    assert m
    return m.group(1)


def test_every_ui_route_refuses_exactly_the_roles_the_matrix_leaves_out(env: Env) -> None:
    routes = [r for r in route_matrix(env.app) if r.auth == "UI session" and r.path != "/ui/logout"]
    assert len(routes) >= 8
    for role in ROLES:
        c = env.app.test_client()
        csrf = _login(c, env.tok[role])
        if csrf is None:
            assert all(role not in r.roles for r in routes), role
            continue
        for r in routes:
            url = env.url(r.path)
            data: dict[str, Any] = {"csrf_token": csrf}
            resp = c.get(url) if r.method == "GET" else c.post(url, data=data)
            if role in r.roles:
                assert resp.status_code not in (401, 403) and "/ui/login" not in resp.headers.get("Location", ""), \
                    (r.method, url, role, resp.status_code)
            else:
                assert resp.status_code == 403, (r.method, url, role, resp.status_code)
        assert c.post("/ui/logout", data={"csrf_token": csrf}).status_code == 302


def test_node_listing_needs_a_read_token(env: Env) -> None:
    c = env.app.test_client()
    r = c.get("/nodes")
    assert r.status_code == 401 and r.get_json()["error"] == "unauthenticated"
    assert "gpu-01" not in r.get_data(as_text=True)
    r = c.get("/nodes", headers={"Authorization": f"Bearer {env.tok['viewer']}"})
    assert r.status_code == 200 and r.get_json()["total"] == 2
    assert c.get("/nodes", headers={"Authorization": f"Bearer {env.tok['agent']}"}).status_code == 403


def test_automation_cannot_touch_a_running_machine(env: Env) -> None:
    """The issue's repro: automation powered off, maintained, aborted and re-provisioned."""
    c = env.app.test_client()
    auto = {"Authorization": f"Bearer {env.tok['automation']}"}
    assert c.post("/api/v1/machines/gpu-01/provision", json={}, headers=auto).status_code == 200
    for action, body in (("power", {"action": "off"}), ("abort", {}), ("maintenance", {}), ("reprovision", {})):
        r = c.post(f"/api/v1/nodes/gpu-01-dpu/{action}", json=body, headers=auto)
        assert r.status_code == 403 and "automation" in r.get_json()["reason"], action
    tech = {"Authorization": f"Bearer {env.tok['tech']}"}
    assert c.put("/api/v1/nodes/gpu-01/tenant", json={"tenant": "globex"}, headers=tech).status_code == 403
    assert c.post("/api/v1/nodes/gpu-01-dpu/abort", json={}, headers=tech).status_code == 200


def test_docs_roles_md_is_generated_from_the_code() -> None:
    from bootsvc import docs

    assert (ROOT / "docs" / "roles.md").read_text() == docs.roles_md(), "stale: run `make docs`"


def test_openapi_document_states_the_roles_the_code_enforces(env: Env) -> None:
    doc = env.app.test_client().get("/api/v1/openapi.json").get_json()
    for r in route_matrix(env.app):
        if r.auth != "API token" or not r.path.startswith("/api/v1"):
            continue
        op = doc["paths"][r.path.replace("<", "{").replace(">", "}")][r.method.lower()]
        stated = re.search(r"Roles: ([a-z, ]+)\.", op.get("description", ""))
        assert stated and set(stated.group(1).split(", ")) == set(r.roles), (r.method, r.path)
