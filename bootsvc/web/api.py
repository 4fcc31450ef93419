"""REST API ``/api/v1``: nodes, machines, tenants, images, leases, events, subscribers, power.

Owns: the JSON resources and their validation (pydantic models, which also generate the OpenAPI
document served at ``/api/v1/openapi.json``), role checks per route (``bootsvc.web.auth``), filters
and limit/offset pagination with ``total``, and turning lifecycle errors into HTTP answers: an
illegal transition is ``409`` with the triggers allowed from the node's state.

Intent, not work: provision/release/retry/... only apply a trigger through ``lifecycle.apply``; the
conductor does the BMC work. The one exception is ``POST /nodes/{ident}/power``: a synchronous power
action through the power driver, bounded by ``orchestration.power_timeout_seconds`` and refused (409)
while the node is in an active state (then the conductor owns its power). Machines (a host and the
DPUs whose ``host_id`` is it) are enrolled atomically through ``inventory.enroll``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Literal

from flask import Blueprint, current_app, g, jsonify
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bootsvc import images as images_mod
from bootsvc import inventory, lifecycle
from bootsvc.models import Event, Lease, Node, Outbox, Subscriber, Tenant
from bootsvc.power.base import BmcError, PowerDriver
from bootsvc.power.credentials import CredentialDestinationError, CredentialError, enroll_problem
from bootsvc.states import ACTIVE_STATES, IllegalTransition, State, Trigger, allowed_triggers
from bootsvc.web import config_of, sessions_of
from bootsvc.web.auth import ADMIN, ENROLL, LIFECYCLE, OPERATE, READ, TENANT, ApiError, error_response, require
from bootsvc.web.openapi import ConflictOut, ErrorOut, document, operation, params_of, parse_body, query

log = logging.getLogger("bootsvc.web.api")
bp = Blueprint("api", __name__, url_prefix="/api/v1")
bp.register_error_handler(ApiError, error_response)

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_PRINTABLE = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"  # printable ASCII, no edge spaces, no NUL


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------ schemas
class NicIn(_In):
    mac: str = Field(max_length=32, description="MAC, any common notation")
    role: Literal["oob", "host-pf", "bmc"] = "oob"
    ipv4: str | None = Field(default=None, max_length=15, description="fixed address reservation")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return inventory.normalize_mac(v)

    @field_validator("ipv4")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return None if v is None else str(ipaddress.IPv4Address(v))


class MachineNodeIn(_In):
    name: str = Field(pattern=_NAME, max_length=63)
    serial: str = Field(min_length=1, max_length=64, pattern=_PRINTABLE)
    nics: list[NicIn] = Field(default_factory=list, max_length=16)
    vendor: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE)
    model: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE)
    rack: str | None = Field(default=None, max_length=32, pattern=_PRINTABLE)
    slot: int | None = Field(default=None, ge=0, le=1000)
    arch: str | None = Field(default=None, max_length=16, pattern=r"^[a-z0-9_]+$")
    bmc_address: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    bmc_driver: Literal["redfish", "fake"] = "redfish"
    bmc_credential_ref: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    bmc_verify_tls: bool = True
    provision_method: Literal["pxe", "redfish"] | None = Field(
        default=None, description="null: the site default (boot.provision_method)")
    image: str | None = Field(default=None, max_length=128, pattern=_PRINTABLE)


class NodeIn(MachineNodeIn):
    kind: Literal["dpu", "host"]
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)
    host: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE,
                             description="for a DPU: name or serial of the host it fronts")


class MachineIn(_In):
    host: MachineNodeIn
    dpus: list[MachineNodeIn] = Field(default_factory=list, max_length=4)
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)


class NicOut(BaseModel):
    mac: str
    role: str
    ipv4: str | None


class NodeOut(BaseModel):
    id: int
    name: str
    kind: str
    serial: str
    state: str
    allowed_triggers: list[str]
    arch: str
    vendor: str | None
    model: str | None
    rack: str | None
    slot: int | None
    tenant: str | None
    host_id: int | None
    dpu_ids: list[int]
    nics: list[NicOut]
    bmc_address: str | None
    bmc_driver: str
    bmc_credential_ref: str | None
    provision_method: str
    image: str | None
    attempts: int
    deadline: dt.datetime | None
    state_since: dt.datetime | None
    last_error: str | None
    hint: str | None
    version: int


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class NodeList(Page):
    items: list[NodeOut]


class MachineOut(BaseModel):
    host: NodeOut
    dpus: list[NodeOut]


class MachineList(Page):
    items: list[MachineOut]


class TenantIn(_In):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    vrf: str = Field(pattern=r"^[A-Za-z0-9_-]{1,15}$")
    l3vni: int = Field(ge=1, le=16_777_215)
    prefixes: list[str] = Field(default_factory=list, max_length=64)
    table: int | None = Field(default=None, ge=1, le=2**31 - 1)

    @field_validator("prefixes")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        return [str(ipaddress.IPv4Network(p, strict=True)) for p in v]


class TenantOut(BaseModel):
    id: int
    name: str
    vrf: str
    l3vni: int
    table: int | None
    prefixes: list[str]
    nodes: int


class TenantList(Page):
    items: list[TenantOut]


class TenantAssignIn(_In):
    tenant: str | None = Field(max_length=63, pattern=_NAME, description="tenant name, or null to unassign")


class TransitionIn(_In):
    reason: str | None = Field(default=None, max_length=500)


class TransitionOut(BaseModel):
    node: str
    from_state: str
    to_state: str
    event_id: int


class MachineTransitionOut(BaseModel):
    results: list[TransitionOut]


class PowerIn(_In):
    action: Literal["on", "off", "graceful-off", "reset", "cycle"]


class PowerOut(BaseModel):
    node: str
    action: str
    power_state: str


class EventOut(BaseModel):
    id: int
    node_id: int
    at: dt.datetime
    from_state: str | None
    to_state: str | None
    trigger: str
    actor: str
    detail: dict[str, Any]


class EventList(Page):
    items: list[EventOut]


class ImageFileOut(BaseModel):
    role: str
    name: str
    sha256: str
    url: str


class ImageOut(BaseModel):
    name: str
    version: str
    kind: str
    files: list[ImageFileOut]


class ImageList(Page):
    defaults: dict[str, str]
    items: list[ImageOut]


class LeaseOut(BaseModel):
    id: int
    vrf: str
    network: str
    address: str
    mac: str
    client_id: str | None
    hostname: str | None
    node_id: int | None
    state: str
    expires_at: dt.datetime
    updated_at: dt.datetime


class LeaseList(Page):
    items: list[LeaseOut]


class SubscriberIn(_In):
    name: str = Field(pattern=_NAME, max_length=63)
    url: str = Field(max_length=1024, pattern=r"^https?://[\x21-\x7e]+$")
    secret_ref: str = Field(max_length=255, pattern=r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/[\x21-\x7e]+)$")
    active: bool = True


class SubscriberOut(BaseModel):
    id: int
    name: str
    url: str
    secret_ref: str
    active: bool
    pending: int


class SubscriberList(Page):
    items: list[SubscriberOut]


# ------------------------------------------------------------------------------------------ queries
class PageQ(_In):
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=10**9)


class NodeQ(PageQ):
    kind: Literal["dpu", "host"] | None = None
    state: Literal[tuple(s.value for s in State)] | None = None  # type: ignore[valid-type]
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)
    rack: str | None = Field(default=None, max_length=32, pattern=_PRINTABLE)


class MachineQ(PageQ):
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)
    rack: str | None = Field(default=None, max_length=32, pattern=_PRINTABLE)
    state: Literal[tuple(s.value for s in State)] | None = Field(  # type: ignore[valid-type]
        default=None, description="state of the host")


class EventQ(PageQ):
    node: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE, description="name, serial or id")
    trigger: str | None = Field(default=None, max_length=32, pattern=r"^[a-z_]+$")
    after_id: int | None = Field(default=None, ge=0, le=2**62, description="cursor: only events with a larger id")


class LeaseQ(PageQ):
    vrf: str | None = Field(default=None, max_length=15, pattern=r"^[A-Za-z0-9_-]*$")
    state: Literal["offered", "bound", "declined", "released", "expired"] | None = None
    mac: str | None = Field(default=None, max_length=32)


# ------------------------------------------------------------------------------------------ helpers
def _sessions() -> Session:
    return sessions_of(current_app)()


def _node_out(n: Node) -> dict[str, Any]:
    v = inventory.node_view(n)
    return NodeOut(
        id=v.id, name=v.name, kind=v.kind, serial=v.serial, state=v.state,
        allowed_triggers=[t.value for t in allowed_triggers(v.kind, v.state)], arch=v.arch, vendor=v.vendor,
        model=v.model, rack=v.rack, slot=v.slot, tenant=v.tenant.name if v.tenant else None, host_id=v.host_id,
        dpu_ids=list(v.dpu_ids), nics=[NicOut(mac=x.mac, role=x.role, ipv4=x.ipv4) for x in v.nics],
        bmc_address=v.bmc_address, bmc_driver=v.bmc_driver, bmc_credential_ref=v.bmc_credential_ref,
        provision_method=v.provision_method, image=v.image, attempts=v.attempts,
        deadline=_utc(v.deadline), state_since=_utc(v.state_since), last_error=v.last_error, hint=v.hint,
        version=v.version).model_dump(mode="json")


def _utc(t: dt.datetime | None) -> dt.datetime | None:
    return t.replace(tzinfo=dt.UTC) if t is not None and t.tzinfo is None else t


def _get_node(s: Session, ident: str) -> Node:
    if len(ident) > 128 or (ident.isdigit() and int(ident) > 2**62):
        raise ApiError(404, "not_found", "no such node")
    n = inventory.get_node(s, ident)
    if n is None:
        raise ApiError(404, "not_found", f"no node {ident!r} (by id, name, serial or MAC)")
    return n


def _machine_host(s: Session, ident: str) -> Node:
    n = _get_node(s, ident)
    if n.kind == "dpu":
        if n.host is None:
            raise ApiError(404, "not_found", f"{n.name} is a DPU without a host: not part of a machine")
        n = n.host
    return n


def _dpus(s: Session, host: Node) -> list[Node]:
    return list(s.scalars(select(Node).where(Node.host_id == host.id).order_by(Node.id)))


def _machine_out(s: Session, host: Node) -> dict[str, Any]:
    return {"host": _node_out(host), "dpus": [_node_out(d) for d in _dpus(s, host)]}


def _apply(s: Session, n: Node, trigger: Trigger, reason: str | None, commit: bool = True) -> dict[str, Any]:
    c = config_of(current_app).conductor
    try:
        ev = lifecycle.apply(s, n, trigger, actor=g.actor, detail={"reason": reason} if reason else None,
                             max_attempts=c.max_attempts, deadlines=c.deadlines, commit=commit)
    except IllegalTransition as e:
        s.rollback()
        raise ApiError(409, "illegal_transition", str(e), state=e.state,
                       allowed=[t.value for t in allowed_triggers(e.kind, e.state)]) from None
    except lifecycle.TransitionConflict as e:
        raise ApiError(409, "conflict", str(e), state=n.state, allowed=[]) from None
    return {"node": n.name, "from_state": ev.from_state, "to_state": ev.to_state, "event_id": ev.id}


def _page(model: type[Page], total: int, q: PageQ, items: list[Any], **extra: Any) -> Any:
    return jsonify(model.model_validate({"total": total, "limit": q.limit, "offset": q.offset, "items": items,
                                         **extra}).model_dump(mode="json"))


def _enroll_errors(e: inventory.EnrollError) -> ApiError:
    fields = [{"field": x.field, "reason": x.reason} for x in e.errors]
    conflict = any("exists" in x.reason or "already" in x.reason or "conflicts" in x.reason for x in e.errors)
    return ApiError(409 if conflict else 400, "conflict" if conflict else "bad_request", str(e), fields=fields)


def _check_bmc(specs: list[tuple[str, MachineNodeIn]]) -> None:
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


def _spec(f: MachineNodeIn, kind: str, *, tenant: str | None, host: str | None) -> inventory.NodeSpec:
    method = f.provision_method or config_of(current_app).boot.provision_method
    return inventory.NodeSpec(
        name=f.name, kind=kind, serial=f.serial,
        nics=[inventory.NicSpec(mac=x.mac, role=x.role, ipv4=x.ipv4) for x in f.nics],
        vendor=f.vendor, model=f.model, rack=f.rack, slot=f.slot, arch=f.arch, tenant=tenant, host=host,
        bmc_address=f.bmc_address, bmc_driver=f.bmc_driver, bmc_credential_ref=f.bmc_credential_ref,
        bmc_verify_tls=f.bmc_verify_tls, provision_method=method, image=f.image)


_NOT_FOUND = {404: ("no such node", ErrorOut)}
_CONFLICT = {409: ("illegal transition; `allowed` lists the triggers allowed in `state`", ConflictOut)}


# ------------------------------------------------------------------------------------------ openapi
@bp.get("/openapi.json")
@operation("GET", "/api/v1/openapi.json", "This document", tag="meta", security=None,
           responses={200: ("OpenAPI 3.1 document", None)})
def openapi() -> Any:
    return jsonify(document())


# ------------------------------------------------------------------------------------------ nodes
@bp.get("/nodes")
@operation("GET", "/api/v1/nodes", "List nodes", tag="nodes", params=params_of(NodeQ),
           responses={200: ("a page of nodes", NodeList)}, roles=READ)
@require(*READ)
def list_nodes() -> Any:
    q = query(NodeQ)
    with _sessions() as s:
        rows, total = inventory.list_nodes(s, kind=q.kind, state=q.state, tenant=q.tenant, rack=q.rack,
                                           limit=q.limit, offset=q.offset)
        return _page(NodeList, total, q, [_node_out(n) for n in rows])


@bp.post("/nodes")
@operation("POST", "/api/v1/nodes", "Enroll one node", tag="nodes", request_model=NodeIn,
           responses={201: ("enrolled", NodeOut), 409: ("name, serial or MAC already enrolled", ErrorOut)},
           roles=ENROLL)
@require(*ENROLL)
def create_node() -> Any:
    body = parse_body(NodeIn)
    _check_bmc([("", body)])
    with _sessions() as s:
        try:
            (n,) = inventory.enroll(s, [_spec(body, body.kind, tenant=body.tenant, host=body.host)], actor=g.actor)
        except inventory.EnrollError as e:
            raise _enroll_errors(e) from None
        return jsonify(_node_out(n)), 201


@bp.get("/nodes/<ident>")
@operation("GET", "/api/v1/nodes/<ident>", "One node (by id, name, serial or MAC)", tag="nodes",
           responses={200: ("the node", NodeOut), **_NOT_FOUND}, roles=READ)
@require(*READ)
def get_node(ident: str) -> Any:
    with _sessions() as s:
        return jsonify(_node_out(_get_node(s, ident)))


@bp.put("/nodes/<ident>/tenant")
@operation("PUT", "/api/v1/nodes/<ident>/tenant", "Assign (or unassign) the node's tenant", tag="nodes",
           request_model=TenantAssignIn,
           responses={200: ("the node", NodeOut), **_NOT_FOUND,
                      409: ("the node is in a state where its tenant cannot change", ConflictOut)},
           description="Allowed while the node rests (registered, available, maintenance, policy_applied, "
                       "a failure state). A DPU in policy_applied gets the new policy from the conductor.",
           roles=TENANT)
@require(*TENANT)
def assign_tenant(ident: str) -> Any:
    body = parse_body(TenantAssignIn)
    with _sessions() as s:
        n = _get_node(s, ident)
        _assign(s, n, body.tenant)
        s.commit()
        return jsonify(_node_out(n))


def _assign(s: Session, n: Node, tenant: str | None) -> None:
    # a host that is installing or deployed keeps its VRF: moving it would cut it off mid-install
    if State(n.state) in ACTIVE_STATES or n.state == State.DEPLOYED:
        raise ApiError(409, "conflict", f"{n.name} is {n.state}: release it before changing its tenant",
                       state=n.state, allowed=[t.value for t in allowed_triggers(n.kind, n.state)])
    tid = None
    if tenant is not None:
        t = s.scalars(select(Tenant).where(Tenant.name == tenant)).first()
        if t is None:
            raise ApiError(404, "not_found", f"no tenant named {tenant!r}")
        tid = t.id
    if n.tenant_id != tid:
        old = n.tenant.name if n.tenant else None
        n.tenant_id = tid
        s.flush()
        s.expire(n, ["tenant"])
        lifecycle.record(s, n, "tenant_assigned", actor=g.actor, detail={"from": old, "to": tenant}, commit=False)


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
        with _sessions() as s:
            n = _get_node(s, ident)
            return jsonify(_apply(s, n, trigger, body.reason))

    view.__name__ = f"node_{action.replace('-', '_')}"
    return view


for _action, (_trig, _summary, _roles) in _NODE_ACTIONS.items():
    operation("POST", f"/api/v1/nodes/<ident>/{_action}", _summary, tag="node actions",
              request_model=TransitionIn, responses={200: ("applied", TransitionOut), **_NOT_FOUND, **_CONFLICT},
              roles=_roles)(lambda: None)
    bp.add_url_rule(f"/nodes/<ident>/{_action}", view_func=_node_action(_action, _trig, _roles), methods=["POST"])


def _driver(n: Node) -> PowerDriver:
    factory = current_app.config.get("POWER_DRIVER_FACTORY")
    if factory is not None:
        return factory(n, config_of(current_app))  # type: ignore[no-any-return]
    from bootsvc.power import driver_for

    return driver_for(n, config_of(current_app))


@bp.post("/nodes/<ident>/power")
@operation("POST", "/api/v1/nodes/<ident>/power", "Power action, executed now through the BMC", tag="node actions",
           request_model=PowerIn,
           responses={200: ("done; the power state read back", PowerOut), **_NOT_FOUND,
                      409: ("the node is in an active state, or its BMC credential may not be sent to its "
                            "bmc_address", ConflictOut),
                      502: ("the BMC failed", ErrorOut)},
           description="Synchronous, bounded by orchestration.power_timeout_seconds. Refused while the node "
                       "is in an active state (abort it first).", roles=OPERATE)
@require(*OPERATE)
def power(ident: str) -> Any:
    body = parse_body(PowerIn)
    timeout = config_of(current_app).orchestration.power_timeout_seconds
    with _sessions() as s:
        n = _get_node(s, ident)
        if State(n.state) in ACTIVE_STATES:
            raise ApiError(409, "conflict", f"{n.name} is {n.state}: the conductor drives its power now",
                           state=n.state, allowed=[t.value for t in allowed_triggers(n.kind, n.state)])
        try:
            drv = _driver(n)
            if body.action == "on":
                drv.power_on(wait=timeout)
            elif body.action in ("off", "graceful-off"):
                drv.power_off(graceful=body.action == "graceful-off", wait=timeout)
            elif body.action == "reset":
                drv.reset(wait=timeout)
            else:
                drv.power_cycle(wait=timeout)
            state = drv.power_state().value
        except CredentialDestinationError as e:  # nothing was sent; the reason names only what was enrolled
            lifecycle.record(s, n, "power_action", actor=g.actor,
                             detail={"action": body.action, "error": "credential refused for this bmc_address"})
            raise ApiError(409, "credential_refused", e.message, state=n.state, allowed=[]) from None
        except CredentialError as e:
            # The real reason (a file's mode, a missing variable) is for the admin's log, not the caller:
            # otherwise the answer is an oracle on the service's files and environment.
            log.warning("power action node=%s action=%s refused: %s", n.name, body.action, e.message)
            lifecycle.record(s, n, "power_action", actor=g.actor,
                             detail={"action": body.action, "error": "BMC credential unusable (see the log)"})
            raise ApiError(502, "bmc_credential", "the node's BMC credential cannot be used; an admin finds "
                           "the reason in the bootsvc log", retryable=False) from None
        except BmcError as e:
            lifecycle.record(s, n, "power_action", actor=g.actor,
                             detail={"action": body.action, "error": str(e)})
            raise ApiError(502, "bmc_error", str(e), retryable=e.retryable) from None
        lifecycle.record(s, n, "power_action", actor=g.actor, detail={"action": body.action, "power_state": state})
        return jsonify(node=n.name, action=body.action, power_state=state)


@bp.get("/nodes/<ident>/events")
@operation("GET", "/api/v1/nodes/<ident>/events", "The node's events, oldest first", tag="events",
           params=params_of(PageQ), responses={200: ("a page of events", EventList), **_NOT_FOUND}, roles=READ)
@require(*READ)
def node_events(ident: str) -> Any:
    q = query(PageQ)
    with _sessions() as s:
        n = _get_node(s, ident)
        return _events(s, q, [Event.node_id == n.id])


def _event_out(e: Event) -> dict[str, Any]:
    return {"id": e.id, "node_id": e.node_id, "at": _utc(e.at), "from_state": e.from_state, "to_state": e.to_state,
            "trigger": e.trigger, "actor": e.actor, "detail": e.detail or {}}


def _events(s: Session, q: PageQ, where: list[Any]) -> Any:
    base = select(Event).where(*where)
    total = s.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = s.scalars(base.order_by(Event.id).limit(q.limit).offset(q.offset))
    return _page(EventList, total, q, [_event_out(e) for e in rows])


@bp.get("/events")
@operation("GET", "/api/v1/events", "Events of all nodes, oldest first (after_id = cursor)", tag="events",
           params=params_of(EventQ), responses={200: ("a page of events", EventList)}, roles=READ)
@require(*READ)
def events() -> Any:
    q = query(EventQ)
    with _sessions() as s:
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


# ------------------------------------------------------------------------------------------ machines
@bp.get("/machines")
@operation("GET", "/api/v1/machines", "List machines (a host and its DPUs)", tag="machines",
           params=params_of(MachineQ), responses={200: ("a page of machines", MachineList)}, roles=READ)
@require(*READ)
def list_machines() -> Any:
    q = query(MachineQ)
    with _sessions() as s:
        rows, total = inventory.list_nodes(s, kind="host", state=q.state, tenant=q.tenant, rack=q.rack,
                                           limit=q.limit, offset=q.offset)
        return _page(MachineList, total, q, [_machine_out(s, h) for h in rows])


@bp.post("/machines")
@operation("POST", "/api/v1/machines", "Enroll a machine: its host and DPUs, atomically", tag="machines",
           request_model=MachineIn,
           responses={201: ("enrolled", MachineOut), 409: ("something already enrolled", ErrorOut)}, roles=ENROLL)
@require(*ENROLL)
def create_machine() -> Any:
    body = parse_body(MachineIn)
    _check_bmc([("host.", body.host), *((f"dpus.{i}.", d) for i, d in enumerate(body.dpus))])
    with _sessions() as s:
        specs = [_spec(body.host, "host", tenant=body.tenant, host=None)]
        specs += [_spec(d, "dpu", tenant=body.tenant, host=body.host.name) for d in body.dpus]
        try:
            nodes = inventory.enroll(s, specs, actor=g.actor)
        except inventory.EnrollError as e:
            raise _enroll_errors(e) from None
        return jsonify(_machine_out(s, nodes[0])), 201


@bp.get("/machines/<ident>")
@operation("GET", "/api/v1/machines/<ident>", "One machine (by its host or one of its DPUs)", tag="machines",
           responses={200: ("the machine", MachineOut), **_NOT_FOUND}, roles=READ)
@require(*READ)
def get_machine(ident: str) -> Any:
    with _sessions() as s:
        return jsonify(_machine_out(s, _machine_host(s, ident)))


@bp.put("/machines/<ident>/tenant")
@operation("PUT", "/api/v1/machines/<ident>/tenant", "Assign the tenant of a host and its DPUs", tag="machines",
           request_model=TenantAssignIn,
           responses={200: ("the machine", MachineOut), **_NOT_FOUND,
                      409: ("a node of the machine is busy", ConflictOut)}, roles=TENANT)
@require(*TENANT)
def assign_machine_tenant(ident: str) -> Any:
    body = parse_body(TenantAssignIn)
    with _sessions() as s:
        host = _machine_host(s, ident)
        for n in [host, *_dpus(s, host)]:
            _assign(s, n, body.tenant)
        s.commit()
        return jsonify(_machine_out(s, host))


def _machine_action(action: str) -> Callable[[str], Any]:
    @require(*LIFECYCLE)
    def view(ident: str) -> Any:
        body = parse_body(TransitionIn)
        with _sessions() as s:
            host = _machine_host(s, ident)
            dpus = _dpus(s, host)
            results: list[dict[str, Any]] = []
            if action == "provision":
                if host.tenant is None:
                    raise ApiError(409, "no_tenant", f"{host.name} has no tenant: assign one first "
                                   f"(PUT /api/v1/machines/{host.name}/tenant)", state=host.state, allowed=[])
                # the host waits for its DPUs; resting DPUs start now (DPU first, then host)
                results.append(_apply(s, host, Trigger.PROVISION, body.reason, commit=False))
                for d in dpus:
                    if d.state in (State.REGISTERED, State.AVAILABLE):
                        results.append(_apply(s, d, Trigger.PROVISION, body.reason, commit=False))
            elif action == "release":
                # host first: it must not run on a network its DPU is tearing down
                if Trigger.RELEASE in allowed_triggers(host.kind, host.state) or not dpus:
                    results.append(_apply(s, host, Trigger.RELEASE, body.reason, commit=False))
                for d in dpus:
                    if Trigger.RELEASE in allowed_triggers(d.kind, d.state):
                        results.append(_apply(s, d, Trigger.RELEASE, body.reason, commit=False))
                if not results:
                    results.append(_apply(s, host, Trigger.RELEASE, body.reason, commit=False))
            else:  # retry every failed node of the machine
                for n in [*dpus, host]:
                    if Trigger.RETRY in allowed_triggers(n.kind, n.state):
                        results.append(_apply(s, n, Trigger.RETRY, body.reason, commit=False))
                if not results:
                    results.append(_apply(s, host, Trigger.RETRY, body.reason, commit=False))
            s.commit()
            return jsonify(results=results)

    view.__name__ = f"machine_{action}"
    return view


for _action, _summary in (("provision", "Provision the machine: DPUs first, then the host"),
                          ("release", "Release the host and its DPUs"),
                          ("retry", "Retry every node of the machine that is in a failure state")):
    operation("POST", f"/api/v1/machines/<ident>/{_action}", _summary, tag="machines", request_model=TransitionIn,
              responses={200: ("applied (all or nothing)", MachineTransitionOut), **_NOT_FOUND, **_CONFLICT},
              roles=LIFECYCLE)(lambda: None)
    bp.add_url_rule(f"/machines/<ident>/{_action}", view_func=_machine_action(_action), methods=["POST"])


# ------------------------------------------------------------------------------------------ tenants
def _tenant_out(s: Session, t: Tenant) -> dict[str, Any]:
    count = s.scalar(select(func.count()).select_from(Node).where(Node.tenant_id == t.id)) or 0
    return {"id": t.id, "name": t.name, "vrf": t.vrf, "l3vni": t.l3vni, "table": t.table,
            "prefixes": list(t.prefixes or []), "nodes": int(count)}


@bp.get("/tenants")
@operation("GET", "/api/v1/tenants", "List tenants", tag="tenants", params=params_of(PageQ),
           responses={200: ("a page of tenants", TenantList)}, roles=READ)
@require(*READ)
def list_tenants() -> Any:
    q = query(PageQ)
    with _sessions() as s:
        total = s.scalar(select(func.count()).select_from(Tenant)) or 0
        rows = s.scalars(select(Tenant).order_by(Tenant.name).limit(q.limit).offset(q.offset))
        return _page(TenantList, total, q, [_tenant_out(s, t) for t in rows])


@bp.post("/tenants")
@operation("POST", "/api/v1/tenants", "Create a tenant", tag="tenants", request_model=TenantIn,
           responses={201: ("created", TenantOut), 409: ("name, VRF or L3 VNI taken", ErrorOut)}, roles=ADMIN)
@require(*ADMIN)
def create_tenant() -> Any:
    body = parse_body(TenantIn)
    with _sessions() as s:
        try:
            t = inventory.add_tenant(s, body.name, body.vrf, body.l3vni, body.prefixes, body.table)
        except inventory.InventoryError as e:
            raise ApiError(409 if "exists" in e.reason else 400, "conflict" if "exists" in e.reason else "bad_request",
                           str(e), fields=[{"field": e.field, "reason": e.reason}]) from None
        return jsonify(_tenant_out(s, t)), 201


@bp.get("/tenants/<name>")
@operation("GET", "/api/v1/tenants/<name>", "One tenant", tag="tenants",
           responses={200: ("the tenant", TenantOut), 404: ("no such tenant", ErrorOut)}, roles=READ)
@require(*READ)
def get_tenant(name: str) -> Any:
    with _sessions() as s:
        t = s.scalars(select(Tenant).where(Tenant.name == name[:64])).first()
        if t is None:
            raise ApiError(404, "not_found", f"no tenant named {name[:64]!r}")
        return jsonify(_tenant_out(s, t))


# ------------------------------------------------------------------------------------------ images, leases
@bp.get("/images")
@operation("GET", "/api/v1/images", "Images of the catalog (read-only)", tag="images", params=params_of(PageQ),
           responses={200: ("a page of images", ImageList)}, roles=READ)
@require(*READ)
def list_images() -> Any:
    q = query(PageQ)
    cfg = config_of(current_app)
    try:
        cat = images_mod.load_catalog(cfg.resolve(cfg.images.catalog))
    except images_mod.CatalogError as e:
        raise ApiError(503, "catalog_unavailable", str(e)) from None
    items = [{"name": i.name, "version": i.version, "kind": i.kind,
              "files": [{"role": f.role, "name": f.name, "sha256": f.sha256,
                         "url": images_mod.url_path(i, f.role) or ""} for f in i.files]}
             for i in sorted(cat.images, key=lambda i: (i.name, i.version))]
    return _page(ImageList, len(items), q, items[q.offset:q.offset + q.limit], defaults=dict(cat.defaults))


@bp.get("/leases")
@operation("GET", "/api/v1/leases", "DHCP leases (read-only)", tag="leases", params=params_of(LeaseQ),
           responses={200: ("a page of leases", LeaseList)}, roles=READ)
@require(*READ)
def list_leases() -> Any:
    q = query(LeaseQ)
    with _sessions() as s:
        base = select(Lease)
        if q.vrf is not None:
            base = base.where(Lease.vrf == q.vrf)
        if q.state is not None:
            base = base.where(Lease.state == q.state)
        if q.mac is not None:
            try:
                base = base.where(Lease.mac == inventory.normalize_mac(q.mac))
            except ValueError as e:
                raise ApiError(400, "bad_request", str(e), fields=[{"field": "mac", "reason": str(e)}]) from None
        total = s.scalar(select(func.count()).select_from(base.subquery())) or 0
        rows = s.scalars(base.order_by(Lease.vrf, Lease.address).limit(q.limit).offset(q.offset))
        items = [{"id": x.id, "vrf": x.vrf, "network": x.network, "address": x.address, "mac": x.mac,
                  "client_id": x.client_id, "hostname": x.hostname, "node_id": x.node_id, "state": x.state,
                  "expires_at": _utc(x.expires_at), "updated_at": _utc(x.updated_at)} for x in rows]
        return _page(LeaseList, total, q, items)


# ------------------------------------------------------------------------------------------ subscribers
def _sub_out(s: Session, x: Subscriber) -> dict[str, Any]:
    pending = s.scalar(select(func.count()).select_from(Outbox).where(
        Outbox.subscriber_id == x.id, Outbox.delivered_at.is_(None))) or 0
    return {"id": x.id, "name": x.name, "url": x.url, "secret_ref": x.secret_ref, "active": x.active,
            "pending": int(pending)}


@bp.get("/subscribers")
@operation("GET", "/api/v1/subscribers", "Event subscribers", tag="subscribers", params=params_of(PageQ),
           responses={200: ("a page of subscribers", SubscriberList)}, roles=ADMIN)
@require(*ADMIN)
def list_subscribers() -> Any:
    q = query(PageQ)
    with _sessions() as s:
        total = s.scalar(select(func.count()).select_from(Subscriber)) or 0
        rows = s.scalars(select(Subscriber).order_by(Subscriber.name).limit(q.limit).offset(q.offset))
        return _page(SubscriberList, total, q, [_sub_out(s, x) for x in rows])


@bp.post("/subscribers")
@operation("POST", "/api/v1/subscribers", "Add an event subscriber (signed POST per state change)",
           tag="subscribers", request_model=SubscriberIn,
           responses={201: ("created", SubscriberOut), 409: ("name taken", ErrorOut)}, roles=ADMIN)
@require(*ADMIN)
def create_subscriber() -> Any:
    body = parse_body(SubscriberIn)
    with _sessions() as s:
        if s.scalars(select(Subscriber).where(Subscriber.name == body.name)).first() is not None:
            raise ApiError(409, "conflict", f"a subscriber named {body.name!r} exists")
        x = Subscriber(name=body.name, url=body.url, secret_ref=body.secret_ref, active=body.active)
        s.add(x)
        s.commit()
        return jsonify(_sub_out(s, x)), 201


@bp.delete("/subscribers/<name>")
@operation("DELETE", "/api/v1/subscribers/<name>", "Deactivate a subscriber (its queue is kept)",
           tag="subscribers", responses={200: ("deactivated", SubscriberOut), 404: ("no such subscriber", ErrorOut)},
           roles=ADMIN)
@require(*ADMIN)
def delete_subscriber(name: str) -> Any:
    with _sessions() as s:
        x = s.scalars(select(Subscriber).where(Subscriber.name == name[:64])).first()
        if x is None:
            raise ApiError(404, "not_found", f"no subscriber named {name[:64]!r}")
        x.active = False
        s.commit()
        return jsonify(_sub_out(s, x))

