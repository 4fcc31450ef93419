"""The agent API as a node-name oracle, attacked: an unknown node name and a known DPU's name with a
wrong secret must get the same answer on every agent route (it answered 404 vs 401)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient
from helpers.conductor import app_for, make_db, site_config

from bootsvc import inventory

ROUTES = (("POST", "/api/v1/agent/checkin", {}), ("GET", "/api/v1/agent/policy", None),
          ("POST", "/api/v1/agent/report", {"status": "applied", "policy_version": "x"}))


@pytest.fixture
def c(tmp_path: Path) -> FlaskClient:
    """A test client of the API on a fresh site with one enrolled DPU, ``dpu-real``."""
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path)
    sessions = make_db(cfg)
    with sessions() as s:
        inventory.enroll(s, [inventory.NodeSpec(name="dpu-real", kind="dpu", serial="MT-REAL")], actor="test")
    return app_for(cfg, sessions).test_client()


def test_unknown_node_and_bad_secret_look_the_same(c: FlaskClient) -> None:
    for method, path, body in ROUTES:
        answers = []
        for name in ("dpu-real", "dpu-nope"):
            r = c.open(path, method=method, json=body,
                       headers={"Authorization": "Bearer bsv_guess", "X-Bootsvc-Node": name})
            answers.append((r.status_code, r.get_json()))
        assert answers[0] == answers[1], (path, answers)
        assert answers[0][0] == 401 and "dpu-real" not in str(answers[0][1]), answers


def test_a_non_ascii_secret_is_a_401_not_a_500(c: FlaskClient) -> None:
    r = c.post("/api/v1/agent/checkin", json={},
               headers={"Authorization": "Bearer s\u00e9cret\u00b2", "X-Bootsvc-Node": "dpu-real"})
    assert r.status_code == 401, r.get_json()


def test_a_non_ascii_boot_token_is_refused_not_a_crash() -> None:
    from bootsvc import render

    assert render.token_ok("s3cret", "t\u00f6ken\u00b2") is False
    assert render.token_ok("s3cret", render.boot_token("s3cret")) is True
