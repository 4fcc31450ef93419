"""Tokens and UI sessions, attacked: a UI cookie replayed after logout, a cookie of a revoked token, an
expired token on the API and at the UI login; and the CLI that creates (with expiry), lists and
revokes tokens."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from flask.testing import FlaskClient
from helpers.conductor import add_token, app_for, make_db, site_config, site_tree
from sqlalchemy import select

from bootsvc import db
from bootsvc.cli import cli
from bootsvc.models import ApiToken, UiSession


class Env:
    def __init__(self, tmp: Path) -> None:
        self.url = f"sqlite:///{tmp}/db.sqlite"
        db.upgrade(self.url)
        self.cfg = site_config(self.url, tmp)
        self.sessions = make_db(self.cfg)
        self.app = app_for(self.cfg, self.sessions)
        (tmp / "site.yaml").write_text(yaml.safe_dump(site_tree(self.url, tmp, security={"token_ttl_days": 7})))
        self.config_path = str(tmp / "site.yaml")

    def token(self, role: str = "tech", name: str | None = None) -> str:
        return add_token(self.sessions, role, name)

    def login(self, token: str) -> tuple[FlaskClient, str]:
        c = self.app.test_client()
        nonce = re.search(r'name="login_nonce" value="([^"]+)"', c.get("/ui/login").text)
        assert nonce
        r = c.post("/ui/login", data={"token": token, "login_nonce": nonce.group(1), "next": "/ui/"})
        assert r.status_code == 302, r.text
        m = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/ui/enroll").text)
        assert m
        return c, m.group(1)

    def cli(self, *args: str) -> Any:
        return CliRunner().invoke(cli, ["--config", self.config_path, *args], catch_exceptions=False)

    def expire(self, name: str) -> None:
        with self.sessions() as s:
            s.scalars(select(ApiToken).where(ApiToken.name == name)).one().expires_at = \
                dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            s.commit()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_ui_cookie_replayed_after_logout_is_refused(env: Env) -> None:
    c, csrf = env.login(env.token())
    cookie = c.get_cookie("bootsvc_ui", path="/ui")
    assert cookie is not None and c.get("/ui/").status_code == 200
    assert c.post("/ui/logout", data={"csrf_token": csrf}).status_code == 302
    thief = env.app.test_client()  # someone who copied the cookie before the logout
    thief.set_cookie("bootsvc_ui", cookie.value, path="/ui")
    r = thief.get("/ui/")
    assert r.status_code == 302 and "/ui/login" in r.headers["Location"]
    assert thief.get("/ui/machines/1/status.json").status_code == 401
    with env.sessions() as s:
        assert s.scalars(select(UiSession)).one().ended_at is not None


def test_ui_cookie_holds_no_token_and_the_session_lives_server_side(env: Env) -> None:
    tok = env.token()
    c, _ = env.login(tok)
    cookie = c.get_cookie("bootsvc_ui", path="/ui")
    assert cookie is not None and tok not in cookie.value
    with env.sessions() as s:
        row = s.scalars(select(UiSession)).one()
        assert row.ended_at is None and row.expires_at > row.created_at
    with env.sessions() as s:  # the session is the row: delete it and the cookie opens nothing
        s.delete(s.scalars(select(UiSession)).one())
        s.commit()
    assert c.get("/ui/").status_code == 302


def test_revoking_a_token_ends_its_ui_sessions_and_api_access(env: Env) -> None:
    tok = env.token("tech", "ana")
    c, _ = env.login(tok)
    api = {"Authorization": f"Bearer {tok}"}
    assert c.get("/api/v1/nodes", headers=api).status_code == 200
    r = env.cli("token", "revoke", "ana")
    assert r.exit_code == 0 and "1 UI session(s) ended" in r.output
    assert c.get("/ui/").status_code == 302
    r = c.get("/api/v1/nodes", headers=api)
    assert r.status_code == 401 and "revoked" in r.get_json()["reason"]
    with env.sessions() as s:
        t = s.scalars(select(ApiToken).where(ApiToken.name == "ana")).one()
        assert t.revoked and t.revoked_at is not None
        assert s.scalars(select(UiSession)).one().ended_at is not None
    r = env.cli("token", "revoke", "nobody")
    assert r.exit_code == 2 and "token list --all" in r.output


def test_expired_token_is_refused_by_the_api_the_ui_login_and_an_open_ui_session(env: Env) -> None:
    tok = env.token("tech", "bob")
    c, _ = env.login(tok)
    env.expire("bob")
    assert c.get("/ui/").status_code == 302  # the open session ends with its token
    r = env.app.test_client().get("/api/v1/nodes", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 401 and "expired" in r.get_json()["reason"]
    c2 = env.app.test_client()
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', c2.get("/ui/login").text)
    assert nonce
    r = c2.post("/ui/login", data={"token": tok, "login_nonce": nonce.group(1)})
    assert r.status_code == 401 and "expired" in r.text


def test_cli_tokens_expire_by_default_and_list_hides_dead_ones_unless_all(env: Env) -> None:
    r = env.cli("token", "create", "ci-bot", "--role", "automation", "--json")
    out = json.loads(r.output)
    expires = dt.datetime.fromisoformat(out["expires_at"])
    assert dt.timedelta(days=6, hours=23) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=7)
    r = env.cli("token", "create", "forever", "--role", "viewer", "--expires-in", "0")
    assert r.exit_code == 0 and "never expires" in r.output
    env.cli("token", "create", "old", "--role", "tech")
    env.expire("old")
    env.cli("token", "create", "gone", "--role", "tech")
    env.cli("token", "revoke", "gone")
    live = {x["name"]: x for x in json.loads(env.cli("token", "list", "--json").output)}
    assert set(live) == {"ci-bot", "forever"} and live["forever"]["expires"] == "never"
    every = {x["name"]: x["status"] for x in json.loads(env.cli("token", "list", "--all", "--json").output)}
    assert every == {"ci-bot": "active", "forever": "active", "old": "expired", "gone": "revoked"}
    human = env.cli("token", "list", "--all").output
    assert "STATUS" in human and "revoked" in human and "bsv_" not in human
    tok = out["token"]
    assert env.app.test_client().get("/nodes", headers={"Authorization": f"Bearer {tok}"}).status_code == 200
