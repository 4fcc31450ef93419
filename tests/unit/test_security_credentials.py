"""Credential exfiltration, as attacked: an enroll-capable caller points a node at a BMC of its choice
(a fake one on 127.0.0.1) with a raw ``env:``/``file:`` reference or a real credential name, then asks
for a power action. Over the API, the webhook and the UI nothing may reach that BMC, and the errors may
not tell the caller anything about the service's files or environment."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import add_token, app_for, make_db, site_config
from helpers.httpd import LoopbackHttpd, QuietHandler
from sqlalchemy import select

from bootsvc import inventory
from bootsvc.events_out import sign
from bootsvc.models import Event, Node
from bootsvc.power import driver_for
from bootsvc.power.credentials import CredentialDestinationError

SITE_PASSWORD = "site-bmc-pa55word"
WEBHOOK_SECRET = b"hook-s3cret"
ORACLE_WORDS = ("No such file", "mode", "644", "readable", "not set", "environment", "PATH", "lab.cred")


class FakeBmc:
    """Records every request that reaches it (method, path, headers, body) and answers 401."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        bmc = self

        class Handler(QuietHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                bmc.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                     "body": self.rfile.read(n).decode(errors="replace")})
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PATCH = do_DELETE = _any

        self.server = LoopbackHttpd(Handler)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()


class Env:
    def __init__(self, tmp: Path, bmc: FakeBmc, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("BOOTSVC_T_SITE_U", "root")
        monkeypatch.setenv("BOOTSVC_T_SITE_P", SITE_PASSWORD)
        (tmp / "webhook.key").write_bytes(WEBHOOK_SECRET)
        self.tmp, self.bmc = tmp, bmc
        self.cfg = site_config(f"sqlite:///{tmp}/db.sqlite", tmp, bmc_credentials={
            "site": {"ref": "env:BOOTSVC_T_SITE_U:BOOTSVC_T_SITE_P", "networks": ["10.1.0.0/16"]},
            "lab": {"ref": f"file:{tmp}/lab.cred", "networks": [{"cidr": "127.0.0.0/8", "lab": True}]},
            "gone": {"ref": f"file:{tmp}/missing.cred", "networks": [{"cidr": "127.0.0.0/8", "lab": True}]},
        })
        self.sessions = make_db(self.cfg)
        self.app = app_for(self.cfg, self.sessions)  # no POWER_DRIVER_FACTORY: the real driver_for
        self.tok = {r: add_token(self.sessions, r) for r in ("admin", "tech", "automation")}
        self.c = self.app.test_client()

    def api(self, method: str, path: str, body: Any, role: str = "automation") -> Any:
        return self.c.open(path, method=method, json=body, headers={"Authorization": f"Bearer {self.tok[role]}"})

    def cli_enroll(self, name: str, ref: str, address: str) -> None:
        """What the CLI (or a row written before this fix) may hold: not a network front door."""
        with self.sessions() as s:
            inventory.enroll(s, [inventory.NodeSpec(name=name, kind="host", serial=f"SN-{name}",
                                                    bmc_address=address, bmc_credential_ref=ref)], actor="cli")

    def events_text(self) -> str:
        with self.sessions() as s:
            return json.dumps([e.detail for e in s.scalars(select(Event))])


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    bmc = FakeBmc()
    try:
        yield Env(tmp_path, bmc, monkeypatch)
    finally:
        bmc.close()


def _node(name: str, ref: str, address: str) -> dict[str, Any]:
    return {"name": name, "kind": "host", "serial": f"SN-{name}", "bmc_address": address,
            "bmc_driver": "redfish", "bmc_credential_ref": ref}


def test_api_enroll_takes_only_credential_names_bound_to_the_bmc_network(env: Env) -> None:
    for ref in ("env:PATH:HOME", "env:BOOTSVC_T_SITE_U:BOOTSVC_T_SITE_P", "file:/etc/shadow"):
        r = env.api("POST", "/api/v1/nodes", _node("evil", ref, env.bmc.url))
        assert r.status_code == 400, (ref, r.get_json())
        assert r.get_json()["fields"][0]["field"] == "bmc_credential_ref" and "name" in r.get_json()["reason"]
    r = env.api("POST", "/api/v1/nodes", _node("evil", "site", env.bmc.url))  # a real name, a foreign BMC
    assert r.status_code == 400 and r.get_json()["fields"][0]["field"] == "bmc_address"
    assert "outside" in r.get_json()["reason"]
    for addr in ("http://10.1.2.3", "bmc.example.com", "https://10.1.2.3@127.0.0.1"):
        r = env.api("POST", "/api/v1/nodes", _node("evil", "site", addr))
        assert r.status_code == 400, addr
    machine = {"host": _node("evil", "site", "https://10.1.2.3") | {"kind": None},
               "dpus": [_node("evil-dpu", "env:PATH:HOME", env.bmc.url) | {"kind": None}]}
    for part in machine.values():
        for p in (part if isinstance(part, list) else [part]):
            p.pop("kind")
    r = env.api("POST", "/api/v1/machines", machine)
    assert r.status_code == 400 and r.get_json()["fields"][0]["field"] == "dpus.0.bmc_credential_ref"
    assert env.api("POST", "/api/v1/nodes", _node("good", "site", "https://10.1.2.3")).status_code == 201
    assert env.bmc.requests == []


def test_webhook_takes_only_credential_names_bound_to_the_bmc_network(env: Env) -> None:
    for i, (cred, addr) in enumerate((("env:PATH:HOME", env.bmc.url), ("site", env.bmc.url),
                                      (f"file:{env.tmp}/lab.cred", env.bmc.url))):
        payload = {"serial": f"SN-W{i}", "rack": "r1", "slot": i,
                   "host": {"bmc_address": addr, "bmc_credential": cred},
                   "dpus": [{"serial": f"MT-W{i}", "bmc_address": "https://10.1.0.9", "oob_mac": f"52:54:00:0{i}:00:01",
                             "bmc_credential": "site"}]}
        body = json.dumps(payload).encode()
        ts = str(int(time.time()))
        r = env.c.post("/webhooks/onboard", data=body, headers={
            "Content-Type": "application/json", "X-Bootsvc-Timestamp": ts, "X-Bootsvc-Delivery": f"w{i}",
            "X-Bootsvc-Signature": sign(WEBHOOK_SECRET, ts, body)})
        assert r.status_code == 400, (cred, r.get_json())
        assert {f["field"] for f in r.get_json()["fields"]} & {"host.bmc_credential", "host.bmc_address"}
    with env.sessions() as s:
        assert s.scalars(select(Node)).first() is None
    assert env.bmc.requests == []


def _ui_login(env: Env) -> tuple[Any, str]:
    c = env.app.test_client()
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', c.get("/ui/login").text)
    assert nonce
    c.post("/ui/login", data={"token": env.tok["tech"], "login_nonce": nonce.group(1), "next": "/ui/"})
    m = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/ui/enroll").text)
    assert m
    return c, m.group(1)


def test_ui_enroll_refuses_a_credential_outside_its_networks(env: Env) -> None:
    c, csrf = _ui_login(env)
    form = {"rack": "R1", "slot": "7", "host_serial": "HS-1", "host_mac": "52:54:00:00:10:01",
            "dpu_serial": "MT-1", "dpu_mac": "52:54:00:00:10:02", "host_bmc": env.bmc.url,
            "dpu_bmc": "https://10.1.0.7", "bmc_driver": "redfish", "bmc_credential": "site", "csrf_token": csrf}
    r = c.post("/ui/enroll", data=form)
    assert "outside the BMC networks" in r.text
    with env.sessions() as s:
        assert s.scalars(select(Node)).first() is None
    assert env.bmc.requests == []


def test_power_on_a_node_pointing_outside_its_credentials_networks_sends_nothing(env: Env) -> None:
    env.cli_enroll("rogue", "site", env.bmc.url)
    r = env.api("POST", "/api/v1/nodes/rogue/power", {"action": "on"}, role="tech")
    assert r.status_code == 409 and r.get_json()["error"] == "credential_refused", r.get_json()
    with env.sessions() as s:
        n = s.scalars(select(Node).where(Node.name == "rogue")).one()
        with pytest.raises(CredentialDestinationError):
            driver_for(n, env.cfg)  # the conductor's path too
        host_id = n.id
    c, csrf = _ui_login(env)
    r = c.post(f"/ui/machines/{host_id}/act", data={"node": str(host_id), "action": "power_on", "csrf_token": csrf})
    assert r.status_code == 302
    assert env.bmc.requests == [], "the fake BMC must receive nothing"
    assert SITE_PASSWORD not in env.events_text()


def test_credential_errors_are_generic_and_logged_for_the_admin(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    cred = env.tmp / "lab.cred"
    cred.write_text("root:lab-pa55\n")
    cred.chmod(0o644)  # world-readable: refused
    env.cli_enroll("lab-node", "lab", env.bmc.url)
    env.cli_enroll("gone-node", "gone", env.bmc.url)
    with caplog.at_level(logging.WARNING):
        for name in ("lab-node", "gone-node"):
            r = env.api("POST", f"/api/v1/nodes/{name}/power", {"action": "on"}, role="tech")
            assert r.status_code == 502 and r.get_json()["error"] == "bmc_credential"
            text = r.get_data(as_text=True)
            assert not any(w in text for w in ORACLE_WORDS), text
    assert not any(w in env.events_text() for w in ORACLE_WORDS)
    lines = [rec.getMessage() for rec in caplog.records if "bmc credential unusable" in rec.getMessage()]
    assert len(lines) == 2 and "644" in lines[0] and "lab-pa55" not in " ".join(lines)
    assert env.bmc.requests == []
    # control: the same BMC does receive a login once the credential is usable (the test can see one)
    cred.chmod(0o600)
    r = env.api("POST", "/api/v1/nodes/lab-node/power", {"action": "on"}, role="tech")
    assert r.status_code == 502 and env.bmc.requests, r.get_json()
