"""A database that cannot be reached is a 503 with a reason and Retry-After, never a 500 or a traceback
(bootsvc/web/__init__.py): firmware, installers and agents retry it while PostgreSQL restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootsvc import config as cfgmod
from bootsvc.web import create_app


def test_an_unreachable_database_is_a_503_with_retry_after(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "catalog.yaml").write_text("images: []\n")
    # a SQLite file in a directory that does not exist: every connection fails (OperationalError)
    cfg = cfgmod.from_mapping({"database": {"url": f"sqlite:///{tmp_path}/gone/db.sqlite"},
                               "state_dir": str(tmp_path / "state"),
                               "images": {"catalog": str(tmp_path / "catalog.yaml"), "root": str(tmp_path)},
                               "security": {"node_key_ref": f"file:{tmp_path}/node.key"}}, env={})
    c = create_app(cfg).test_client()
    r = c.post("/api/v1/agent/checkin", json={"agent_version": "t"},
               headers={"Authorization": "Bearer x", "X-Bootsvc-Node": "n1"})
    assert r.status_code == 503, r.get_data(as_text=True)
    assert r.get_json()["error"] == "database_unavailable"
    assert "retry" in r.get_json()["reason"]
    assert r.headers["Retry-After"] == "5"
    assert "Traceback" not in caplog.text
    assert any("database unavailable" in m for m in caplog.messages)
