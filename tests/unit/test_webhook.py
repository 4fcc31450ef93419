"""POST /webhooks/onboard: HMAC signature over "timestamp.body", replay window, idempotent delivery
ids, every bad field listed, atomic enrollment of host + DPUs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from helpers.conductor import app_for, make_db, site_config
from helpers.webhook import CREDS, PAYLOAD, SECRET, post
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc.events_out import sign
from bootsvc.models import Node, WebhookDelivery


@pytest.fixture
def env(tmp_path: Path) -> tuple[FlaskClient, sessionmaker[Session]]:
    (tmp_path / "webhook.key").write_bytes(SECRET)
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path, bmc_credentials=CREDS)
    sessions = make_db(cfg)
    return app_for(cfg, sessions).test_client(), sessions


def count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Node)) or 0)


def test_onboard_enrolls_machine(env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, sessions = env
    r = post(c, PAYLOAD)
    assert r.status_code == 201, r.get_json()
    out = r.get_json()
    assert out["status"] == "created" and out["result"]["host"] == "r07-s12"
    assert out["result"]["dpus"][0]["name"] == "r07-s12-dpu0"
    with sessions() as s:
        dpu = s.scalars(select(Node).where(Node.serial == "MT2334XZ0001")).one()
        host = s.scalars(select(Node).where(Node.serial == "SN-R07-S12")).one()
        assert dpu.host_id == host.id and dpu.kind == "dpu" and dpu.tenant and dpu.tenant.name == "acme"
        assert [n.mac for n in dpu.nics] == ["52:54:00:bb:07:12"] and host.bmc_credential_ref == "lab"


def test_duplicate_delivery_changes_nothing_and_says_so(env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, sessions = env
    first = post(c, PAYLOAD, delivery="abc")
    assert first.status_code == 201
    again = post(c, PAYLOAD, delivery="abc", ts=int(time.time()) + 1)
    assert again.status_code == 200
    assert again.get_json()["status"] == "duplicate" and again.get_json()["result"] == first.get_json()["result"]
    assert count(sessions) == 2
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 1


def test_replay_of_signed_message_under_new_delivery_id_is_refused(
        env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, sessions = env
    ts = int(time.time())
    assert post(c, PAYLOAD, delivery="one", ts=ts).status_code == 201
    r = post(c, PAYLOAD, delivery="two", ts=ts)
    assert r.status_code == 409 and r.get_json()["error"] == "replay"
    assert count(sessions) == 2


def test_bad_signature(env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, sessions = env
    r = post(c, PAYLOAD, secret=b"wrong")
    assert r.status_code == 401 and r.get_json()["error"] == "bad_signature"
    r = post(c, PAYLOAD, sig="sha256=" + "0" * 64)
    assert r.status_code == 401
    # body changed after signing
    t = str(int(time.time()))
    r = c.post("/webhooks/onboard", data=json.dumps({**PAYLOAD, "slot": 13}),
               headers={"X-Bootsvc-Timestamp": t, "X-Bootsvc-Delivery": "x", "Content-Type": "application/json",
                        "X-Bootsvc-Signature": sign(SECRET, t, json.dumps(PAYLOAD).encode())})
    assert r.status_code == 401
    r = c.post("/webhooks/onboard", json=PAYLOAD, headers={"X-Bootsvc-Delivery": "y"})
    assert r.status_code == 401 and "X-Bootsvc-Timestamp" in r.get_json()["reason"]
    assert count(sessions) == 0


@pytest.mark.parametrize("skew", [-301, 301, -3600])
def test_stale_timestamp(env: tuple[FlaskClient, sessionmaker[Session]], skew: int) -> None:
    c, sessions = env
    r = post(c, PAYLOAD, ts=int(time.time()) + skew)
    assert r.status_code == 401 and r.get_json()["error"] == "stale"
    assert count(sessions) == 0


def test_timestamp_inside_window_accepted(env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, _ = env
    assert post(c, PAYLOAD, ts=int(time.time()) - 250).status_code == 201


def test_every_bad_field_is_listed(env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, sessions = env
    bad = {"rack": "", "slot": "twelve", "tenant": "nobody",
           "host": {"macs": ["zz:zz"]},
           "dpus": [{"serial": "MT1", "bmc_address": "10.0.0.1", "oob_mac": "not-a-mac"}, {"serial": ""}]}
    r = post(c, bad)
    assert r.status_code == 400
    fields = {f["field"] for f in r.get_json()["fields"]}
    assert fields >= {"serial", "rack", "slot", "tenant", "host.bmc_address", "host.macs.0", "dpus.0.oob_mac",
                      "dpus.1.serial", "dpus.1.bmc_address", "dpus.1.oob_mac"}, fields
    assert count(sessions) == 0
    r = post(c, {**PAYLOAD, "dpus": []}, delivery="d-2")
    assert r.status_code == 400 and [f["field"] for f in r.get_json()["fields"]] == ["dpus"]
    # a rejected delivery is not remembered: the fixed payload under the same id goes through
    assert post(c, PAYLOAD, delivery="d-2").status_code == 201


def test_already_enrolled_is_conflict_and_nothing_half_made(env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    c, sessions = env
    assert post(c, PAYLOAD, delivery="a").status_code == 201
    other = {**PAYLOAD, "serial": "SN-NEW", "name": "fresh-host"}  # its DPU serial is taken
    r = post(c, other, delivery="b")
    assert r.status_code == 409
    assert count(sessions) == 2  # the new host was not created without its DPU


def test_webhook_disabled_without_secret(tmp_path: Path) -> None:
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path, security={"webhook_secret_ref": None})
    c = app_for(cfg, make_db(cfg)).test_client()
    r = post(c, PAYLOAD)
    assert r.status_code == 503 and r.get_json()["error"] == "not_configured"


def test_one_mac_or_name_for_host_and_dpu_is_a_conflict(
        env: tuple[FlaskClient, sessionmaker[Session]]) -> None:
    """The status comes from operations' code: a MAC or a name given to two nodes is 409, nothing kept."""
    c, sessions = env
    twice = {**PAYLOAD, "dpus": [{**PAYLOAD["dpus"][0], "oob_mac": PAYLOAD["host"]["macs"][0]}]}
    r = post(c, twice, delivery="m")
    assert r.status_code == 409 and r.get_json()["fields"] == [
        {"field": "1.nics", "reason": "MAC 52:54:00:aa:07:12 is given to two nodes"}]
    bad_name = {**PAYLOAD, "dpus": [{**PAYLOAD["dpus"][0], "name": "r07-s12"}]}  # the DPU named like its host
    r = post(c, bad_name, delivery="n")
    assert r.status_code == 409 and r.get_json()["fields"][0]["field"] == "1.name"
    assert count(sessions) == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
