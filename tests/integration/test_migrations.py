"""Alembic: upgrade -> downgrade -> upgrade on SQLite and PostgreSQL, and no model/migration drift."""

from __future__ import annotations

from sqlalchemy import inspect

from bootsvc import db


def test_upgrade_downgrade_upgrade_and_no_drift(any_db_url: str) -> None:
    db.upgrade(any_db_url)
    tables = set(inspect(db.make_engine(any_db_url)).get_table_names())
    assert {"nodes", "nics", "tenants", "images", "leases", "events", "api_tokens"} <= tables
    db.check(any_db_url)
    db.downgrade(any_db_url, "base")
    assert set(inspect(db.make_engine(any_db_url)).get_table_names()) <= {"alembic_version"}
    db.upgrade(any_db_url)
    db.check(any_db_url)
    assert db.current(any_db_url) is not None
