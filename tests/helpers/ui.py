"""The tech UI's test environment (Flask test client on SQLite): tokens per role, a fake BMC every node
shares, `login` through the real login form (returns the session's CSRF token) and `enroll` through the
real enroll form."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import auth_secrets, db, operations
from bootsvc import config as config_mod
from bootsvc.models import ApiToken, Base, Node, Tenant
from bootsvc.power.fake import FakePowerDriver
from bootsvc.web import create_app

TOKENS = {"admin": "tok-admin", "tech": "tok-tech", "automation": "tok-auto", "agent": "tok-agent"}


@dataclass
class Env:
    app: Flask
    sessions: sessionmaker[Session]
    fake: FakePowerDriver

    def client(self) -> FlaskClient:
        return self.app.test_client()

    def node(self, name: str) -> Node:
        with self.sessions() as s:
            return s.scalars(select(Node).where(Node.name == name)).one()

    def logged_in(self, role: str = "tech") -> tuple[FlaskClient, str]:
        """A client logged in with the role's token (`TOKENS`), and its session's CSRF token."""
        c = self.client()
        return c, login(c, role)


def make_env(tmp_path: Path, site: Mapping[str, Any] | None = None) -> Iterator[Env]:
    """A UI app on SQLite with a token per role (`TOKENS`), a revoked one, tenant red, and one fake BMC.
    ``site``: more config sections (its ``networks`` are added to the Zone 0 one)."""
    more = dict(site or {})
    cfg = config_mod.from_mapping({**more,
        "database": {"url": f"sqlite:///{tmp_path / 'ui.db'}"},
        "state_dir": str(tmp_path / "state"),
        "security": {"node_key_ref": f"file:{tmp_path / 'node.key'}"},
        "bmc_credentials": {"lab-bmc": {"ref": "env:U:P"}},
        "networks": [{"name": "oob", "zone": 0, "cidr": "10.77.0.0/24", "gateway": "10.77.0.1",
                      "boot_server": "10.77.0.2"}, *more.get("networks", ())],
        "images": {"catalog": str(tmp_path / "catalog.yaml")},
    }, env={})
    engine = db.make_engine(cfg.database.url)
    Base.metadata.create_all(engine)
    sessions = db.session_factory(engine)
    with sessions() as s:
        for role, tok in TOKENS.items():
            s.add(ApiToken(name=f"t-{role}", role=role, token_hash=auth_secrets.hash_token(tok)))
        s.add(ApiToken(name="t-revoked", role="tech", token_hash=auth_secrets.hash_token("tok-revoked"), revoked=True))
        s.add(Tenant(name="red", vrf="red", l3vni=5001, prefixes=[]))
        s.commit()
    fake = FakePowerDriver("fake://test")
    operations.forget_power()  # node ids repeat across tests' databases
    app = create_app(cfg, sessions)
    app.config.update(TESTING=True, BOOTSVC_METRICS_FLUSH=False,
                      POWER_DRIVER_FACTORY=lambda _node, _cfg: fake)
    yield Env(app, sessions, fake)
    engine.dispose()


def login(c: FlaskClient, role: str = "tech") -> str:
    """Log in with the role's token; return the CSRF token of the session."""
    r = c.get("/ui/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', r.text)
    assert nonce
    r = c.post("/ui/login", data={"token": TOKENS[role], "login_nonce": nonce.group(1), "next": "/ui/"})
    assert r.status_code == 302, r.text
    page = c.get("/ui/enroll").text
    m = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert m
    return m.group(1)


GOOD = {"rack": "R1", "slot": "7", "host_serial": "HS-0001", "host_mac": "AA-BB-CC-00-00-01",
        "dpu_serial": "MT-0001", "dpu_mac": "aabb.cc00.0002", "tenant": "red", "hostname": "",
        "host_bmc": "fake://h1", "dpu_bmc": "fake://d1", "bmc_driver": "fake", "bmc_credential": ""}


def enroll(c: FlaskClient, csrf: str, **over: str) -> Any:
    return c.post("/ui/enroll", data={**GOOD, **over, "csrf_token": csrf})
