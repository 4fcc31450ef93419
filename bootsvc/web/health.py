"""Health and the read-only node listing: the HTTP skeleton every deployment has.

Owns: ``GET /healthz`` and ``GET /health`` (process up + database reachable; ``/health`` adds each
service the supervisor runs, with its restart count, from the status file ``bootsvc serve`` keeps -
``bootsvc.daemon.services_status``), registered on every listener; and ``GET /nodes`` (read-only listing behind
a read token, ``bootsvc.web.auth.READ``; blueprint ``nodes_bp``, ``api`` listeners only).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from bootsvc import inventory
from bootsvc.daemon import services_status
from bootsvc.web import config_of, sessions_of
from bootsvc.web.auth import READ, ApiError, error_response, require

bp = Blueprint("health", __name__)
nodes_bp = Blueprint("nodes", __name__)
nodes_bp.register_error_handler(ApiError, error_response)


def _database() -> tuple[str, int]:
    try:
        with sessions_of(current_app)() as s:
            s.execute(text("SELECT 1"))
    except Exception as e:  # report, don't crash: this is what monitoring polls
        return f"unreachable: {type(e).__name__}", 503
    return "ok", 200


@bp.get("/healthz")
def healthz() -> Any:
    db, code = _database()
    return jsonify(status="ok" if code == 200 else "degraded", database=db), code


@bp.get("/health")
def health() -> Any:
    """Like /healthz, plus the supervisor's view: each service, its pid, state and restarts."""
    db, code = _database()
    services = services_status(config_of(current_app))  # {} outside `bootsvc serve` (tests, run-service)
    restarting = [n for n, s in services.items() if s.get("state") != "running"]
    status = "ok" if code == 200 and not restarting else "degraded"
    return jsonify(status=status, database=db, services=services), code


@nodes_bp.get("/nodes")
@require(*READ)  # names, serials and racks of every node: a read token, like /api/v1/nodes
def nodes() -> Any:
    with sessions_of(current_app)() as s:
        rows, total = inventory.list_nodes(s, limit=1000)
        return jsonify(total=total, items=[
            {"name": n.name, "kind": n.kind, "serial": n.serial, "state": n.state, "rack": n.rack,
             "slot": n.slot} for n in rows])
