"""``/api/v1/machines``: a host and the DPUs whose ``host_id`` is it, enrolled atomically, assigned to a
tenant together, and provisioned, released or retried as one (`operations.machine_action`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import g, jsonify

from bootsvc import inventory, operations
from bootsvc.web.api.common import (
    NOT_FOUND,
    add_action,
    bp,
    check_bmc,
    intent,
    machine_out,
    page,
    sessions,
    spec,
    transition_out,
)
from bootsvc.web.api.schemas import (
    MachineIn,
    MachineList,
    MachineOut,
    MachineQ,
    MachineTransitionOut,
    TenantAssignIn,
    TransitionIn,
)
from bootsvc.web.auth import ENROLL, LIFECYCLE, READ, TENANT, require
from bootsvc.web.openapi import ConflictOut, ErrorOut, operation, params_of, parse_body, query


@bp.get("/machines")
@operation("GET", "/api/v1/machines", "List machines (a host and its DPUs)", tag="machines",
           params=params_of(MachineQ), responses={200: ("a page of machines", MachineList)}, roles=READ)
@require(*READ)
def list_machines() -> Any:
    q = query(MachineQ)
    with sessions() as s:
        rows, total = inventory.list_nodes(s, kind="host", state=q.state, tenant=q.tenant, rack=q.rack,
                                           limit=q.limit, offset=q.offset)
        return page(MachineList, total, q, [machine_out(s, h) for h in rows])


@bp.post("/machines")
@operation("POST", "/api/v1/machines", "Enroll a machine: its host and DPUs, atomically", tag="machines",
           request_model=MachineIn,
           responses={201: ("enrolled", MachineOut), 409: ("something already enrolled", ErrorOut)}, roles=ENROLL)
@require(*ENROLL)
def create_machine() -> Any:
    body = parse_body(MachineIn)
    check_bmc([("host.", body.host), *((f"dpus.{i}.", d) for i, d in enumerate(body.dpus))])
    with sessions() as s:
        specs = [spec(body.host, "host", tenant=body.tenant, host=None)]
        specs += [spec(d, "dpu", tenant=body.tenant, host=body.host.name) for d in body.dpus]
        nodes = operations.enroll(s, specs, actor=g.actor)
        return jsonify(machine_out(s, nodes[0])), 201


@bp.get("/machines/<ident>")
@operation("GET", "/api/v1/machines/<ident>", "One machine (by its host or one of its DPUs)", tag="machines",
           responses={200: ("the machine", MachineOut), **NOT_FOUND}, roles=READ)
@require(*READ)
def get_machine(ident: str) -> Any:
    with sessions() as s:
        return jsonify(machine_out(s, operations.machine_host(s, ident)))


@bp.put("/machines/<ident>/tenant")
@operation("PUT", "/api/v1/machines/<ident>/tenant", "Assign the tenant of a host and its DPUs", tag="machines",
           request_model=TenantAssignIn,
           responses={200: ("the machine", MachineOut), **NOT_FOUND,
                      409: ("a node of the machine is busy", ConflictOut)}, roles=TENANT)
@require(*TENANT)
def assign_machine_tenant(ident: str) -> Any:
    body = parse_body(TenantAssignIn)
    with sessions() as s:
        host = operations.machine_host(s, ident)
        operations.assign_tenant(s, [host, *operations.machine_dpus(s, host)], body.tenant, actor=g.actor)
        return jsonify(machine_out(s, host))


def _machine_action(action: operations.MachineAction) -> Callable[[str], Any]:
    @require(*LIFECYCLE)
    def view(ident: str) -> Any:
        body = parse_body(TransitionIn)
        with sessions() as s:
            host = operations.machine_host(s, ident)
            evs = operations.machine_action(s, host, action, **intent(body))
            names = {n.id: n.name for n in [host, *operations.machine_dpus(s, host)]}
            return jsonify(results=[transition_out(names[e.node_id], e) for e in evs])

    view.__name__ = f"machine_{action}"
    return view


_MACHINE_ACTIONS: tuple[tuple[operations.MachineAction, str], ...] = (
    ("provision", "Provision the machine: DPUs first, then the host"),
    ("release", "Release the host and its DPUs"),
    ("retry", "Retry every node of the machine that is in a failure state"))
for _action, _summary in _MACHINE_ACTIONS:  # applied all or nothing
    add_action(f"/machines/<ident>/{_action}", _summary, tag="machines", roles=LIFECYCLE, out=MachineTransitionOut,
               view=_machine_action(_action))
