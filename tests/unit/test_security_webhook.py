"""Attacks on POST /webhooks/onboard idempotency: a delivery id reused for another machine, and 20
concurrent copies of one delivery (SQLite and PostgreSQL): exactly one 201, the rest 200 duplicate,
never a database message."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import app_for, make_db, site_config
from helpers.webhook import CREDS, PAYLOAD, SECRET, post
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import db
from bootsvc.events_out import sign
from bootsvc.models import Node, WebhookDelivery

COPIES = 20


def _env(tmp: Path, url: str) -> tuple[Any, sessionmaker[Session]]:
    (tmp / "webhook.key").write_bytes(SECRET)
    cfg = site_config(url, tmp, bmc_credentials=CREDS)
    if not url.startswith("sqlite"):
        db.upgrade(url)
    sessions = make_db(cfg)
    return app_for(cfg, sessions), sessions


def test_same_delivery_id_with_another_body_is_409_and_keeps_the_first(tmp_path: Path) -> None:
    app, sessions = _env(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")
    c = app.test_client()
    assert post(c, PAYLOAD, delivery="d-7").status_code == 201
    other = {**PAYLOAD, "serial": "SN-OTHER", "name": "other-host",
             "host": {**PAYLOAD["host"], "macs": ["52:54:00:aa:07:99"]},
             "dpus": [{"serial": "MT-OTHER", "bmc_address": "https://10.1.7.199", "oob_mac": "52:54:00:bb:07:99"}]}
    r = post(c, other, delivery="d-7")
    assert r.status_code == 409, r.get_json()
    out = r.get_json()
    assert out["error"] == "delivery_mismatch" and "different body" in out["reason"]
    with sessions() as s:
        assert s.scalars(select(Node).where(Node.serial == "SN-OTHER")).first() is None
    # the same body under the same id (re-signed later, as senders redeliver) is still a duplicate
    again = post(c, PAYLOAD, delivery="d-7", ts=int(time.time()) + 1)
    assert again.status_code == 200 and again.get_json()["status"] == "duplicate"


def _race(app: Any, sessions: sessionmaker[Session]) -> None:
    body = json.dumps(PAYLOAD).encode()
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Bootsvc-Timestamp": ts,
               "X-Bootsvc-Signature": sign(SECRET, ts, body), "X-Bootsvc-Delivery": "race-1"}
    barrier = threading.Barrier(COPIES)
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def one() -> None:
        c = app.test_client()
        barrier.wait(timeout=30)
        r = c.post("/webhooks/onboard", data=body, headers=headers)
        with lock:
            results.append((r.status_code, r.get_json()))

    threads = [threading.Thread(target=one) for _ in range(COPIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    codes = sorted(code for code, _ in results)
    assert codes == [200] * (COPIES - 1) + [201], results
    created = next(out for code, out in results if code == 201)
    for code, out in results:
        text = json.dumps(out)
        assert "UNIQUE" not in text and "constraint" not in text.lower() and "internal" not in text
        if code == 200:
            assert out["status"] == "duplicate" and out["result"] == created["result"]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Node)) == 2
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 1


def test_twenty_concurrent_copies_sqlite(tmp_path: Path) -> None:
    _race(*_env(tmp_path, f"sqlite:///{tmp_path}/db.sqlite"))


@pytest.mark.postgres
def test_twenty_concurrent_copies_postgres(tmp_path: Path, pg_url: str) -> None:
    _race(*_env(tmp_path, pg_url))


def test_a_non_ascii_signature_is_a_401_not_a_500(tmp_path: Path) -> None:
    app, _ = _env(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")
    r = post(app.test_client(), PAYLOAD, sig="sha256=\u00e9\u00b2")
    assert r.status_code == 401 and r.get_json()["error"] == "bad_signature"
