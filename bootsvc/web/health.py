"""Health and the read-only node listing: the HTTP skeleton every deployment has.

Owns: ``GET /healthz`` (process up + database reachable) and ``GET /nodes`` (read-only listing).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from bootsvc import inventory
from bootsvc.web import sessions_of

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    try:
        with sessions_of(current_app)() as s:
            s.execute(text("SELECT 1"))
    except Exception as e:  # report, don't crash: this is what monitoring polls
        return jsonify(status="degraded", database=f"unreachable: {type(e).__name__}"), 503
    return jsonify(status="ok", database="ok")


@bp.get("/nodes")
def nodes() -> Any:
    with sessions_of(current_app)() as s:
        rows, total = inventory.list_nodes(s, limit=1000)
        return jsonify(total=total, items=[
            {"name": n.name, "kind": n.kind, "serial": n.serial, "state": n.state, "rack": n.rack,
             "slot": n.slot} for n in rows])
