"""Shared fixtures: databases (SQLite per test, a fresh PostgreSQL database per test) and markers.

PostgreSQL comes from ``tests/pg.sh start`` (``make test`` runs it and exports BOOTSVC_TEST_PG_URL).
Tests marked ``postgres`` are skipped when it is not set, except in CI where a missing server fails.
Tests marked ``netns``/``qemu`` need root; in CI they must run, elsewhere they skip without root.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from bootsvc import db

IN_CI = os.environ.get("CI") == "true"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.geteuid() == 0
    for item in items:
        if (item.get_closest_marker("netns") or item.get_closest_marker("qemu")) and not root:
            item.add_marker(pytest.mark.skip(reason="needs root (network namespaces)"))


def _pg_admin_url() -> str | None:
    return os.environ.get("BOOTSVC_TEST_PG_URL")


@pytest.fixture
def pg_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped afterwards (engines the test made are disposed)."""
    made: list[Engine] = []
    real_create = db.create_engine

    def recording_create(*a: Any, **kw: Any) -> Engine:
        e = real_create(*a, **kw)
        made.append(e)
        return e

    monkeypatch.setattr(db, "create_engine", recording_create)
    admin = _pg_admin_url()
    if not admin:
        if IN_CI:
            pytest.fail("BOOTSVC_TEST_PG_URL is not set in CI: `make test` should have started PostgreSQL")
        pytest.skip("BOOTSVC_TEST_PG_URL not set (run tests/pg.sh start)")
    name = "t_" + uuid.uuid4().hex[:12]
    eng = create_engine(db.normalize_url(admin), isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(db.normalize_url(admin)).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        for e in made:
            e.dispose()
        with eng.connect() as c:
            c.execute(text(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' "
                "AND pid <> pg_backend_pid()"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        eng.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bootsvc.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bootsvc.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def migrated_url(any_db_url: str) -> str:
    db.upgrade(any_db_url)
    return any_db_url
