"""``/api/v1/nodes`` and ``/api/v1/events``: list, enroll, read, tenant assignment, the operator's
actions and the synchronous power action of one node, and the event log.

Each view parses the request (``schemas``), asks `bootsvc.operations` and shapes the answer; a refusal
is an ``OpError`` that the blueprint's handler turns into JSON with the status its code maps to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import current_app, g, jsonify
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bootsvc import inventory, operations
from bootsvc.models import Event
from bootsvc.states import Trigger
from bootsvc.web import config_of
from bootsvc.web.api.common import (
    NOT_FOUND,
    add_action,
    bp,
    check_bmc,
    driver_factory,
    intent,
    node_out,
    page,
    sessions,
    spec,
    transition_out,
    utc,
)
from bootsvc.web.api.schemas import (
    EventList,
    EventQ,
    NodeIn,
    NodeList,
    NodeOut,
    NodeQ,
    PageQ,
    PowerIn,
    PowerOut,
    TenantAssignIn,
    TransitionIn,
    TransitionOut,
)
from bootsvc.web.auth import ADMIN, ENROLL, LIFECYCLE, OPERATE, READ, TENANT, require
from bootsvc.web.openapi import ConflictOut, ErrorOut, operation, params_of, parse_body, query


@bp.get("/nodes")
@operation("GET", "/api/v1/nodes", "List nodes", tag="nodes", params=params_of(NodeQ),
           responses={200: ("a page of nodes", NodeList)}, roles=READ)
@require(*READ)
def list_nodes() -> Any:
    q = query(NodeQ)
    with sessions() as s:
        rows, total = inventory.list_nodes(s, kind=q.kind, state=q.state, tenant=q.tenant, rack=q.rack,
                                           limit=q.limit, offset=q.offset)
        return page(NodeList, total, q, [node_out(n) for n in rows])


@bp.post("/nodes")
@operation("POST", "/api/v1/nodes", "Enroll one node", tag="nodes", request_model=NodeIn,
           responses={201: ("enrolled", NodeOut), 409: ("name, serial or MAC already enrolled", ErrorOut)},
           roles=ENROLL)
@require(*ENROLL)
def create_node() -> Any:
    body = parse_body(NodeIn)
    check_bmc([("", body)])
    with sessions() as s:
        (n,) = operations.enroll(s, [spec(body, body.kind, tenant=body.tenant, host=body.host)], actor=g.actor)
        return jsonify(node_out(n)), 201


@bp.get("/nodes/<ident>")
@operation("GET", "/api/v1/nodes/<ident>", "One node (by id, name, serial or MAC)", tag="nodes",
           responses={200: ("the node", NodeOut), **NOT_FOUND}, roles=READ)
@require(*READ)
def get_node(ident: str) -> Any:
    with sessions() as s:
        return jsonify(node_out(operations.find_node(s, ident)))


@bp.put("/nodes/<ident>/tenant")
@operation("PUT", "/api/v1/nodes/<ident>/tenant", "Assign (or unassign) the node's tenant", tag="nodes",
           request_model=TenantAssignIn,
           responses={200: ("the node", NodeOut), **NOT_FOUND,
                      409: ("the node is in a state where its tenant cannot change", ConflictOut)},
           description="Allowed while the node rests (registered, available, maintenance, policy_applied, "
                       "a failure state). A DPU in policy_applied gets the new policy from the conductor.",
           roles=TENANT)
@require(*TENANT)
def assign_tenant(ident: str) -> Any:
    body = parse_body(TenantAssignIn)
    with sessions() as s:
        n = operations.find_node(s, ident)
        operations.assign_tenant(s, [n], body.tenant, actor=g.actor)
        return jsonify(node_out(n))


_NODE_ACTIONS: dict[str, tuple[Trigger, str, tuple[str, ...]]] = {
    "provision": (Trigger.PROVISION, "Provision (the conductor carries it out)", LIFECYCLE),
    "release": (Trigger.RELEASE, "Release: power off, wipe, back to available", LIFECYCLE),
    "retry": (Trigger.RETRY, "Retry from a failure state", LIFECYCLE),
    "reprovision": (Trigger.REPROVISION, "Start over from a resting or failed state", OPERATE),
    "maintenance": (Trigger.MAINTENANCE, "Put into maintenance (nothing acts on it)", OPERATE),
    "maintenance-done": (Trigger.MAINTENANCE_DONE, "Take out of maintenance", OPERATE),
    "abort": (Trigger.ABORT, "Stop an in-progress flow (to maintenance)", OPERATE),
    "retire": (Trigger.RETIRE, "Retire for good", ADMIN),
}


def _node_action(action: str, trigger: Trigger, roles: tuple[str, ...]) -> Callable[[str], Any]:
    @require(*roles)
    def view(ident: str) -> Any:
        body = parse_body(TransitionIn)
        with sessions() as s:
            n = operations.find_node(s, ident)
            return jsonify(transition_out(n.name, operations.transition(s, n, trigger, **intent(body))))

    view.__name__ = f"node_{action.replace('-', '_')}"
    return view


for _action, (_trig, _summary, _roles) in _NODE_ACTIONS.items():
    add_action(f"/nodes/<ident>/{_action}", _summary, tag="node actions", roles=_roles, out=TransitionOut,
               view=_node_action(_action, _trig, _roles))


@bp.post("/nodes/<ident>/power")
@operation("POST", "/api/v1/nodes/<ident>/power", "Power action, executed now through the BMC", tag="node actions",
           request_model=PowerIn,
           responses={200: ("done; the power state read back", PowerOut), **NOT_FOUND,
                      409: ("the node is in an active state, or its BMC credential may not be sent to its "
                            "bmc_address", ConflictOut),
                      502: ("the BMC failed", ErrorOut)},
           description="Synchronous, bounded by orchestration.power_timeout_seconds. Refused while the node "
                       "is in an active state (abort it first).", roles=OPERATE)
@require(*OPERATE)
def power(ident: str) -> Any:
    body = parse_body(PowerIn)
    with sessions() as s:
        n = operations.find_node(s, ident)
        state = operations.power(s, n, body.action, actor=g.actor, config=config_of(current_app), via="api",
                                 driver=driver_factory())
        return jsonify(node=n.name, action=body.action, power_state=state)


@bp.get("/nodes/<ident>/events")
@operation("GET", "/api/v1/nodes/<ident>/events", "The node's events, oldest first", tag="events",
           params=params_of(PageQ), responses={200: ("a page of events", EventList), **NOT_FOUND}, roles=READ)
@require(*READ)
def node_events(ident: str) -> Any:
    q = query(PageQ)
    with sessions() as s:
        n = operations.find_node(s, ident)
        return _events(s, q, [Event.node_id == n.id])


def _event_out(e: Event) -> dict[str, Any]:
    return {"id": e.id, "node_id": e.node_id, "at": utc(e.at), "from_state": e.from_state, "to_state": e.to_state,
            "trigger": e.trigger, "actor": e.actor, "detail": e.detail or {}}


def _events(s: Session, q: PageQ, where: list[Any]) -> Any:
    base = select(Event).where(*where)
    total = s.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = s.scalars(base.order_by(Event.id).limit(q.limit).offset(q.offset))
    return page(EventList, total, q, [_event_out(e) for e in rows])


@bp.get("/events")
@operation("GET", "/api/v1/events", "Events of all nodes, oldest first (after_id = cursor)", tag="events",
           params=params_of(EventQ), responses={200: ("a page of events", EventList)}, roles=READ)
@require(*READ)
def events() -> Any:
    q = query(EventQ)
    with sessions() as s:
        where: list[Any] = []
        if q.node is not None:
            n = inventory.get_node(s, q.node) if len(q.node) <= 64 and not (
                q.node.isdigit() and int(q.node) > 2**62) else None
            where.append(Event.node_id == (n.id if n else -1))
        if q.trigger is not None:
            where.append(Event.trigger == q.trigger)
        if q.after_id is not None:
            where.append(Event.id > q.after_id)
        return _events(s, q, where)
