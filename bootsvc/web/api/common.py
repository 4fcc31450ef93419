"""What every ``/api/v1`` route module shares: the blueprint (with its error handlers: ``ApiError`` and
``operations.OpError`` both become ``{error, reason, ...}`` JSON), the session, the output shapes of a
node and a machine, pages, and the translation of enrollment bodies into `inventory.NodeSpec`."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, g, jsonify
from pydantic import BaseModel
from sqlalchemy.orm import Session

from bootsvc import inventory, operations
from bootsvc.models import Event, Node
from bootsvc.power.base import PowerDriver
from bootsvc.power.credentials import enroll_problem
from bootsvc.states import allowed_triggers
from bootsvc.web import config_of, sessions_of
from bootsvc.web.api.schemas import MachineNodeIn, NicOut, NodeOut, Page, PageQ, TransitionIn
from bootsvc.web.auth import ApiError, error_response, op_error_response
from bootsvc.web.openapi import ConflictOut, ErrorOut, operation

log = logging.getLogger("bootsvc.web.api")
bp = Blueprint("api", __name__, url_prefix="/api/v1")
bp.register_error_handler(ApiError, error_response)
bp.register_error_handler(operations.OpError, op_error_response)

NOT_FOUND = {404: ("no such node", ErrorOut)}
CONFLICT = {409: ("illegal transition; `allowed` lists the triggers allowed in `state`", ConflictOut)}


def sessions() -> Session:
    return sessions_of(current_app)()


def utc(t: dt.datetime | None) -> dt.datetime | None:
    return t.replace(tzinfo=dt.UTC) if t is not None and t.tzinfo is None else t


def node_out(n: Node) -> dict[str, Any]:
    v = inventory.node_view(n)
    return NodeOut(
        id=v.id, name=v.name, kind=v.kind, serial=v.serial, state=v.state,
        allowed_triggers=[t.value for t in allowed_triggers(v.kind, v.state)], arch=v.arch, vendor=v.vendor,
        model=v.model, rack=v.rack, slot=v.slot, tenant=v.tenant.name if v.tenant else None, host_id=v.host_id,
        dpu_ids=list(v.dpu_ids), nics=[NicOut(mac=x.mac, role=x.role, ipv4=x.ipv4) for x in v.nics],
        bmc_address=v.bmc_address, bmc_driver=v.bmc_driver, bmc_credential_ref=v.bmc_credential_ref,
        provision_method=v.provision_method, image=v.image, attempts=v.attempts,
        deadline=utc(v.deadline), state_since=utc(v.state_since), last_error=v.last_error, hint=v.hint,
        version=v.version).model_dump(mode="json")


def machine_out(s: Session, host: Node) -> dict[str, Any]:
    return {"host": node_out(host), "dpus": [node_out(d) for d in operations.machine_dpus(s, host)]}


def page(model: type[Page], total: int, q: PageQ, items: list[Any], **extra: Any) -> Any:
    return jsonify(model.model_validate({"total": total, "limit": q.limit, "offset": q.offset, "items": items,
                                         **extra}).model_dump(mode="json"))


def driver_factory() -> operations.DriverFactory | None:
    """Tests (and the lab) may inject a power driver factory; None: `bootsvc.power.driver_for`."""
    factory = current_app.config.get("POWER_DRIVER_FACTORY")
    if factory is None:
        return None
    cfg = config_of(current_app)

    def make(n: Node) -> PowerDriver:
        return factory(n, cfg)  # type: ignore[no-any-return]

    return make


def intent(body: TransitionIn) -> dict[str, Any]:
    """The keyword arguments of `operations.transition` / `machine_action` for an action's request body."""
    return {"actor": g.actor, "config": config_of(current_app),
            "detail": {"reason": body.reason} if body.reason else None,
            "manual_power": body.manual_power, "no_dpu": body.no_dpu}


def transition_out(node: str, ev: Event) -> dict[str, Any]:
    return {"node": node, "from_state": ev.from_state, "to_state": ev.to_state, "event_id": ev.id}


def add_action(rule: str, summary: str, *, tag: str, roles: tuple[str, ...], out: type[BaseModel],
               view: Callable[[str], Any]) -> None:
    """Register a POST action route (body: TransitionIn) and its OpenAPI operation."""
    operation("POST", f"/api/v1{rule}", summary, tag=tag, request_model=TransitionIn,
              responses={200: ("applied", out), **NOT_FOUND, **CONFLICT}, roles=roles)(lambda: None)
    bp.add_url_rule(rule, view_func=view, methods=["POST"])


def check_bmc(specs: list[tuple[str, MachineNodeIn]]) -> None:
    """Only credential names from the site config, sent only inside their networks (credentials.py)."""
    creds = config_of(current_app).bmc_credentials
    fields = []
    for where, f in specs:
        why = enroll_problem(f.bmc_credential_ref, f.bmc_address, f.bmc_driver, creds)
        if why is not None:
            bad_name = bool(f.bmc_credential_ref) and f.bmc_credential_ref not in creds
            fields.append({"field": f"{where}{'bmc_credential_ref' if bad_name else 'bmc_address'}", "reason": why})
    if fields:
        raise ApiError(400, "bad_request", "; ".join(f"{x['field']}: {x['reason']}" for x in fields), fields=fields)


def spec(f: MachineNodeIn, kind: str, *, tenant: str | None, host: str | None) -> inventory.NodeSpec:
    method = f.provision_method or config_of(current_app).boot.provision_method
    return inventory.NodeSpec(
        name=f.name, kind=kind, serial=f.serial,
        nics=[inventory.NicSpec(mac=x.mac, role=x.role, ipv4=x.ipv4) for x in f.nics],
        vendor=f.vendor, model=f.model, rack=f.rack, slot=f.slot, arch=f.arch, tenant=tenant, host=host,
        bmc_address=f.bmc_address, bmc_driver=f.bmc_driver, bmc_credential_ref=f.bmc_credential_ref,
        bmc_verify_tls=f.bmc_verify_tls, provision_method=method, image=f.image)
