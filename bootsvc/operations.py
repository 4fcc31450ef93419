"""Machine operations that every front door (CLI, API, UI, webhook) asks for: one rule each, one error type.

Owns: looking a node up (`find_node`), the operator's state changes (`transition` and its named forms
`provision`, `release`, `retry`, `reprovision`, `maintenance`, `maintenance_done`, `abort`, `retire`,
and the machine-wide `machine_action`) with the pre-flight rules of provisioning (`check_provision`),
power actions through the node's BMC (`power`: the ``bootsvc_bmc_*`` metrics and the ``power_action``
event are recorded here, once, whoever asked) and the bounded, cached power read the machine page shows
(`power_status`), tenant assignment (`assign_tenant`), enrollment (`enroll`, `add_tenant`), editing a
node's enrollment (`edit_node`) and deleting a node (`delete_node`).

Every refusal is an `OpError` whose ``code`` (`conflict`, `invalid`, `not_found`, `forbidden`, and
`failed` when an outside system such as the BMC failed) is what a front door maps to its own vocabulary
(exit code 2/1, HTTP 409/400/404/403/502, a flash message) instead of searching the message text; its
``kind`` names the refusal for machines (the API's ``error`` field) and ``extra`` carries what a caller
can act on (``state``/``allowed``, ``fields``, ``retryable``). State changes still go through
`bootsvc.lifecycle` only: an edit or a delete writes no state, and is refused while the service acts
on the node. One module of about 550 lines, on purpose: a front door's author finds every machine rule
here, in the order a machine meets them (lookup, state changes, tenants, enrollment, power).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from bootsvc import inventory, lifecycle, metrics
from bootsvc.config import Config
from bootsvc.models import Event, Nic, Node, Tenant
from bootsvc.power import driver_for
from bootsvc.power.base import BmcError, PowerDriver
from bootsvc.power.credentials import CredentialDestinationError, CredentialError
from bootsvc.states import (
    ACTIVE_STATES,
    FAILED_STATES,
    OPERATOR_TRIGGERS,
    IllegalTransition,
    State,
    Trigger,
    allowed_triggers,
)

log = logging.getLogger("bootsvc.operations")

Code = Literal["conflict", "invalid", "not_found", "forbidden", "failed"]
DriverFactory = Callable[[Node], PowerDriver]


class OpError(Exception):
    """An operation refused, with a code a front door maps and a message a tech can act on.

    ``kind`` is a stable machine-readable name for the refusal (default: the code); ``extra`` holds
    JSON-able facts for the caller (``state`` and ``allowed`` commands, ``fields``, ``retryable``).
    """

    def __init__(self, code: Code, message: str, *, kind: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code: Code = code
        self.kind = kind or code
        self.extra = extra

    @property
    def retryable(self) -> bool:
        """Trying the same thing again may succeed (a race lost, a BMC that did not answer)."""
        return bool(self.extra.get("retryable"))


# Fields `node set` may change, and which of them are identity on the boot plane or the BMC: those are
# frozen while the node is deployed or enforcing a policy (a changed MAC or BMC under a running machine
# would point bootsvc at another machine; a tenant change is a tenant move: release first).
EDITABLE = ("name", "serial", "rack", "slot", "vendor", "model", "arch", "tenant", "host", "bmc_address",
            "bmc_driver", "bmc_credential_ref", "bmc_verify_tls", "provision_method", "image", "nics")
COSMETIC = frozenset({"rack", "slot", "vendor", "model"})
_EDIT_ANY = frozenset({State.REGISTERED, State.AVAILABLE, State.MAINTENANCE}) | FAILED_STATES
_DELETABLE = frozenset({State.REGISTERED, State.RETIRED})


def _spec_of(node: Node) -> inventory.NodeSpec:
    return inventory.NodeSpec(
        name=node.name, kind=node.kind, serial=node.serial,
        nics=[inventory.NicSpec(mac=n.mac, role=n.role, ipv4=n.ipv4) for n in node.nics],
        vendor=node.vendor, model=node.model, rack=node.rack, slot=node.slot, arch=node.arch,
        tenant=node.tenant.name if node.tenant else None,
        host=node.host.name if node.host else None, bmc_address=node.bmc_address,
        bmc_driver=node.bmc_driver or "redfish", bmc_credential_ref=node.bmc_credential_ref,
        bmc_verify_tls=bool(node.bmc_verify_tls), provision_method=node.provision_method or "pxe",
        image=node.image)


def edit_rule(state: str, fields: set[str]) -> str | None:
    """Why these fields may not change in this state, or None. Pure."""
    st = State(state)
    if st in _EDIT_ANY:
        return None
    if st in ACTIVE_STATES:
        return (f"the node is {st.value}: the service is acting on it; wait for it to settle, or "
                f"`bootsvc node abort` it first")
    frozen = sorted(fields - COSMETIC)
    if frozen:
        return (f"{', '.join(frozen)} cannot change while the node is {st.value} "
                f"(only {', '.join(sorted(COSMETIC))} can); release or put it in maintenance first")
    return None


def edit_node(session: Session, node: Node, changes: Mapping[str, Any], *, actor: str) -> Node:
    """Change enrollment fields, validated exactly like enrollment; commits, or raises OpError and changes
    nothing."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise OpError("invalid", f"cannot edit {', '.join(sorted(unknown))}; editable: {', '.join(EDITABLE)}")
    if not changes:
        raise OpError("invalid", "nothing to change: name at least one field")
    why = edit_rule(node.state, set(changes))
    if why:
        raise OpError("conflict", f"{node.name}: {why}")
    spec = dataclasses.replace(_spec_of(node), **changes)
    errs = inventory.validate_spec(spec)
    if errs:
        raise OpError("invalid", "; ".join(str(e) for e in errs), fields=_fields(errs))
    taken = _taken(session, [spec], exclude_id=node.id)
    if taken:
        raise OpError("conflict", "; ".join(str(e) for e in taken), fields=_fields(taken))
    tenant_id = node.tenant_id
    if "tenant" in changes:
        tenant_id = None
        if spec.tenant:
            t = session.scalars(select(Tenant).where(Tenant.name == spec.tenant)).first()
            if t is None:
                raise OpError("invalid", f"no tenant named {spec.tenant!r} (see `bootsvc tenant list`)")
            tenant_id = t.id
    host_id = node.host_id
    if "host" in changes:
        host_id = None
        if spec.host:
            host = inventory.get_node(session, spec.host)
            if host is None or host.kind != "host" or node.kind != "dpu":
                raise OpError("invalid", f"no host node named {spec.host!r} (only a DPU fronts a host)")
            host_id = host.id
    before = {k: getattr(_spec_of(node), k) for k in changes}
    for k in ("name", "serial", "rack", "slot", "vendor", "model", "arch", "bmc_address", "bmc_driver",
              "bmc_credential_ref", "bmc_verify_tls", "provision_method", "image"):
        if k in changes:
            setattr(node, k, getattr(spec, k))
    node.tenant_id, node.host_id = tenant_id, host_id
    if "nics" in changes:
        session.execute(delete(Nic).where(Nic.node_id == node.id))
        session.flush()
        session.expire(node, ["nics"])
        for nic in spec.nics:
            session.add(Nic(node_id=node.id, mac=inventory.normalize_mac(nic.mac), role=nic.role, ipv4=nic.ipv4))
    detail = {k: {"from": _plain(before[k]), "to": _plain(getattr(spec, k))} for k in changes}
    lifecycle.record(session, node, "edited", actor=actor, detail=detail, commit=False)
    session.commit()
    session.refresh(node)
    return node


def _plain(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in v]  # type: ignore[arg-type]
    return v


def delete_node(session: Session, node: Node, *, actor: str) -> None:
    """Remove a registered (never provisioned) or retired node with its NICs and history, freeing its name,
    serial and MACs for a corrected enrollment."""
    if State(node.state) not in _DELETABLE:
        raise OpError("conflict", f"{node.name} is {node.state}: only registered or retired nodes can be deleted "
                                  f"(retire it first: `bootsvc node retire {node.name}`)")
    if node.dpus:
        raise OpError("conflict", f"{node.name} is fronted by {', '.join(d.name for d in node.dpus)}: "
                                  "delete or re-point those DPUs first (`bootsvc node set DPU --host ...`)")
    session.delete(node)
    session.commit()


def check_provision(node: Node, *, manual_power: bool = False, no_dpu: bool = False) -> None:
    """Refuse a provision that would fail later or boot a host without tenant isolation. Pure on the node."""
    if node.kind == "dpu" and not node.bmc_address and not manual_power:
        raise OpError("invalid", f"{node.name} has no BMC, so bootsvc cannot power it or set its boot: add one "
                                 f"(`bootsvc node set {node.name} --bmc https://...`) or pass --manual-power "
                                 "and power it on yourself",
                      fields=[{"field": "manual_power", "reason": "the DPU has no BMC"}])
    if node.kind == "host" and not node.dpus and not no_dpu:
        raise OpError("invalid", f"{node.name} has no DPU, so nothing would isolate its tenant traffic: enroll "
                                 "its DPU with --host, or pass --no-dpu for a host the site declares DPU-less",
                      fields=[{"field": "no_dpu", "reason": "the host has no DPU"}])


# ------------------------------------------------------------------------------------------ lookups
def find_node(session: Session, ident: str) -> Node:
    """A node by id, name, serial or one of its MACs, or OpError not_found."""
    n = None
    if len(ident) <= 128 and not (ident.isdigit() and int(ident) > 2**62):
        n = inventory.get_node(session, ident)
    if n is None:
        raise OpError("not_found", f"no node {ident[:128]!r} (looked up by id, name, serial and MAC; "
                                   "`bootsvc node list` shows them)")
    return n


def machine_host(session: Session, ident: str) -> Node:
    """The host of the machine ``ident`` names (the host itself or one of its DPUs)."""
    n = find_node(session, ident)
    if n.kind == "dpu":
        if n.host is None:
            raise OpError("not_found", f"{n.name} is a DPU without a host: not part of a machine")
        n = n.host
    return n


def machine_dpus(session: Session, host: Node) -> list[Node]:
    return list(session.scalars(select(Node).where(Node.host_id == host.id).order_by(Node.id)))


def find_tenant(session: Session, name: str) -> Tenant:
    t = session.scalars(select(Tenant).where(Tenant.name == name[:64])).first()
    if t is None:
        raise OpError("not_found", f"no tenant named {name[:64]!r} (see `bootsvc tenant list`)")
    return t


# ------------------------------------------------------------------------------------------ state changes
def _operator_allowed(n: Node) -> list[str]:
    return [t.value for t in allowed_triggers(n.kind, n.state) if t in OPERATOR_TRIGGERS]


def transition(session: Session, node: Node, trigger: Trigger, *, actor: str, config: Config,
               detail: Mapping[str, Any] | None = None, manual_power: bool = False, no_dpu: bool = False,
               commit: bool = True) -> Event:
    """Apply an operator's trigger through `lifecycle.apply` (provision and re-provision after
    `check_provision`); refusals as OpError conflict (with ``state`` and ``allowed``) or invalid."""
    if trigger not in OPERATOR_TRIGGERS:
        raise OpError("invalid", f"{trigger.value!r} is the service's own trigger, not a command")
    if trigger in (Trigger.PROVISION, Trigger.REPROVISION):
        check_provision(node, manual_power=manual_power, no_dpu=no_dpu)
    c = config.conductor
    try:
        return lifecycle.apply(session, node, trigger, actor=actor, detail=detail, max_attempts=c.max_attempts,
                               deadlines=c.deadlines, commit=commit)
    except IllegalTransition as e:
        session.rollback()
        raise OpError("conflict", str(e), kind="illegal_transition", state=e.state,
                      allowed=[t.value for t in allowed_triggers(e.kind, e.state)]) from None
    except lifecycle.TransitionConflict as e:
        raise OpError("conflict", f"{e}: someone else changed it at the same moment", kind="changed",
                      state=node.state, allowed=[], retryable=True) from None


def _named(trigger: Trigger) -> Callable[..., Event]:
    def op(session: Session, node: Node, **kw: Any) -> Event:
        return transition(session, node, trigger, **kw)

    op.__name__ = op.__qualname__ = trigger.value
    op.__doc__ = f"`transition` with {trigger.value!r}."
    return op


provision, release, retry = _named(Trigger.PROVISION), _named(Trigger.RELEASE), _named(Trigger.RETRY)
reprovision, retire, abort = _named(Trigger.REPROVISION), _named(Trigger.RETIRE), _named(Trigger.ABORT)
maintenance, maintenance_done = _named(Trigger.MAINTENANCE), _named(Trigger.MAINTENANCE_DONE)


MachineAction = Literal["provision", "release", "retry"]


def machine_action(session: Session, host: Node, action: MachineAction, *, actor: str, config: Config,
                   detail: Mapping[str, Any] | None = None, manual_power: bool = False,
                   no_dpu: bool = False) -> list[Event]:
    """Provision, release or retry a host and its DPUs in one transaction: all of it or nothing."""
    dpus = machine_dpus(session, host)
    kw: dict[str, Any] = {"actor": actor, "config": config, "detail": detail, "commit": False}
    done: list[Event] = []
    if action == "provision":
        if host.tenant is None:
            raise OpError("conflict", f"{host.name} has no tenant: assign one first "
                                      f"(PUT /api/v1/machines/{host.name}/tenant, or `bootsvc node set "
                                      f"{host.name} --tenant NAME`)", kind="no_tenant", state=host.state,
                          allowed=[])
        # the host waits for its DPUs; resting DPUs start now (DPU first, then host)
        done.append(transition(session, host, Trigger.PROVISION, no_dpu=no_dpu, **kw))
        for d in dpus:
            if d.state in (State.REGISTERED, State.AVAILABLE):
                done.append(transition(session, d, Trigger.PROVISION, manual_power=manual_power, **kw))
    elif action == "release":
        # host first: it must not run on a network its DPU is tearing down
        if Trigger.RELEASE in allowed_triggers(host.kind, host.state) or not dpus:
            done.append(transition(session, host, Trigger.RELEASE, **kw))
        done += [transition(session, d, Trigger.RELEASE, **kw) for d in dpus
                 if Trigger.RELEASE in allowed_triggers(d.kind, d.state)]
        if not done:
            done.append(transition(session, host, Trigger.RELEASE, **kw))
    else:  # retry every failed node of the machine
        done += [transition(session, n, Trigger.RETRY, **kw) for n in [*dpus, host]
                 if Trigger.RETRY in allowed_triggers(n.kind, n.state)]
        if not done:
            done.append(transition(session, host, Trigger.RETRY, **kw))
    session.commit()
    return done


# ------------------------------------------------------------------------------------------ tenants
def move_rule(host: Node, tenant_id: int | None, moving: set[int]) -> str | None:
    """Why this deployed host cannot move to ``tenant_id`` without a reinstall, or None. Pure on the node.

    A deployed host's tenant network is its DPUs' policy (docs/fabric.md, "Tenant moves"): moving it is a
    new policy on DPUs resting in policy_applied, which the conductor hands out at its next drift check;
    the agent swaps the VRF and FRR withdraws the host's Type-5 routes from the old VRF and announces
    them in the new one (RFC 9136 §3: a VRF's routes carry its L3VNI and route targets). The host's OS
    and addresses stay; if its DPU cannot apply the new policy, the agent rolls back to the old one and
    the DPU goes to policy_failed with the reason."""
    if tenant_id is None:
        return "a deployed host cannot be left without a tenant (its DPU would cut it off): release it first"
    if not host.dpus:
        return "it has no DPU to move it between VRFs: release it before changing its tenant"
    for d in host.dpus:
        if d.state != State.POLICY_APPLIED:
            return (f"its DPU {d.name} is {d.state}, not policy_applied: a tenant move is a new policy on "
                    "its DPUs; wait for it to settle (or retry the DPU)")
        if d.tenant_id is not None and d.tenant_id != tenant_id and d.id not in moving:
            return (f"its DPU {d.name} has a tenant of its own: move the whole machine "
                    f"(PUT /api/v1/machines/{host.name}/tenant)")
    return None


def assign_tenant(session: Session, nodes: Sequence[Node], tenant: str | None, *, actor: str) -> None:
    """Set the tenant of these nodes (a node, or a host and its DPUs) in one transaction. A deployed
    host moves without a reinstall when its DPUs can carry the move (:func:`move_rule`)."""
    tid = find_tenant(session, tenant).id if tenant is not None else None
    moving = {n.id for n in nodes}
    # a deployed machine's nodes move (event ``tenant_moved``); anything else is (re)assigned
    note = "tenant_moved" if any(n.state == State.DEPLOYED and n.tenant_id != tid for n in nodes) \
        else "tenant_assigned"
    for n in nodes:
        # a host that is installing keeps its VRF: moving it would cut it off mid-install
        why = None
        if State(n.state) in ACTIVE_STATES:
            why = "release it before changing its tenant"
        elif n.state == State.DEPLOYED and n.tenant_id != tid:
            why = move_rule(n, tid, moving)
        if why:
            session.rollback()
            raise OpError("conflict", f"{n.name} is {n.state}: {why}", state=n.state, allowed=_operator_allowed(n))
        if n.tenant_id != tid:
            old = n.tenant.name if n.tenant else None
            n.tenant_id = tid
            session.flush()
            session.expire(n, ["tenant"])
            lifecycle.record(session, n, note, actor=actor, detail={"from": old, "to": tenant}, commit=False)
            log.info("tenant node=%s from=%s to=%s state=%s actor=%s", n.name, old, tenant, n.state, actor)
    session.commit()


def add_tenant(session: Session, name: str, vrf: str, l3vni: int, prefixes: Sequence[str] = (),
               table: int | None = None) -> Tenant:
    """Create a tenant; a taken name, VRF or L3 VNI is a conflict, anything else malformed is invalid."""
    for col, val in (("name", name), ("vrf", vrf), ("l3vni", l3vni)):
        if session.scalars(select(Tenant).where(getattr(Tenant, col) == val)).first() is not None:
            raise OpError("conflict", f"{col}: a tenant with {col} {val!r} exists",
                          fields=[{"field": col, "reason": f"a tenant with {col} {val!r} exists"}])
    try:
        return inventory.add_tenant(session, name, vrf, l3vni, prefixes, table)
    except inventory.InventoryError as e:
        raise OpError("invalid", str(e), fields=[{"field": e.field, "reason": e.reason}]) from None


# ------------------------------------------------------------------------------------------ enrollment
def _taken(session: Session, specs: Sequence[inventory.NodeSpec], *, exclude_id: int | None = None,
           prefix: bool = True) -> list[inventory.InventoryError]:
    """Names, serials and MACs these specs would take that another node holds. One rule for enroll and edit."""
    out: list[inventory.InventoryError] = []
    other = [Node.id != exclude_id] if exclude_id is not None else []
    claimed: dict[str, int] = {}  # within this request: the same name, serial or MAC for two nodes
    for i, s in enumerate(specs):
        p = f"{i}." if prefix and len(specs) > 1 else ""
        for col, val in (("name", s.name), ("serial", s.serial)):
            if claimed.setdefault(f"{col}:{val}", i) != i:
                out.append(inventory.InventoryError(f"{p}{col}", f"{col} {val!r} is given to two nodes"))
                continue
            owner = session.scalars(select(Node).where(getattr(Node, col) == val, *other)).first()
            if owner is not None:
                out.append(inventory.InventoryError(f"{p}{col}", f"a node with {col} {val!r} exists ({owner.name})"))
        for nic in s.nics:
            try:
                m = inventory.normalize_mac(nic.mac)
            except ValueError:
                continue  # validate_spec names it
            if claimed.setdefault(f"mac:{m}", i) != i:
                out.append(inventory.InventoryError(f"{p}nics", f"MAC {m} is given to two nodes"))
                continue
            q = select(Nic).where(Nic.mac == m)
            if exclude_id is not None:
                q = q.where(Nic.node_id != exclude_id)
            if session.scalars(q).first() is not None:
                out.append(inventory.InventoryError(f"{p}nics", f"MAC {m} already belongs to another node"))
    return out


def _fields(errs: Sequence[inventory.InventoryError]) -> list[dict[str, str]]:
    return [{"field": e.field, "reason": e.reason} for e in errs]


def enroll(session: Session, specs: Sequence[inventory.NodeSpec], *, actor: str, commit: bool = True) -> list[Node]:
    """Enroll nodes atomically (`inventory.enroll`): malformed input is invalid (every field listed), a
    name, serial or MAC another node holds is a conflict."""
    errs = [e for i, s in enumerate(specs) for e in inventory.validate_spec(s, f"{i}." if len(specs) > 1 else "")]
    if errs:
        raise OpError("invalid", "; ".join(str(e) for e in errs), fields=_fields(errs))
    taken = _taken(session, specs)
    if taken:
        raise OpError("conflict", "; ".join(str(e) for e in taken), fields=_fields(taken))
    try:
        return inventory.enroll(session, specs, actor=actor, commit=commit)
    except inventory.EnrollError as e:
        # what remains is a missing tenant or host (invalid), or a concurrent enroll of the same
        # name/serial/MAC that the database's unique keys caught (the "(record)" error: a conflict)
        race = any(x.field == "(record)" for x in e.errors)
        raise OpError("conflict" if race else "invalid", str(e), fields=_fields(e.errors),
                      retryable=race) from None


# ------------------------------------------------------------------------------------------ power
PowerAction = Literal["on", "off", "graceful-off", "reset", "cycle"]


def _driver(node: Node, config: Config, factory: DriverFactory | None) -> PowerDriver:
    return factory(node) if factory is not None else driver_for(node, config)


def power(session: Session, node: Node, action: PowerAction, *, actor: str, config: Config, via: str,
          driver: DriverFactory | None = None, wait: float | None = None) -> str:
    """A power action through the node's BMC, now, bounded by ``wait`` seconds (default
    orchestration.power_timeout_seconds; 0 = return once the BMC accepted it); returns the power state
    read back. Refused while the node is in an active state (the conductor owns its power then) and for a
    node without a BMC address (nothing to ask). Every attempt is a ``power_action`` event and counts in
    ``bootsvc_bmc_requests_total``."""
    if State(node.state) in ACTIVE_STATES:
        raise OpError("conflict", f"{node.name} is {node.state}: bootsvc drives its power now; abort it first "
                                  "if you must", state=node.state, allowed=_operator_allowed(node))
    if not node.bmc_address:
        raise OpError("invalid", f"{node.name} has no BMC address, so bootsvc cannot power it: add one with "
                                 f"`bootsvc node set {node.name} --bmc URL`", kind="no_bmc",
                      fields=[{"field": "bmc_address", "reason": "not set"}])
    timeout = config.orchestration.power_timeout_seconds if wait is None else wait
    op = f"power_{action.replace('-', '_')}"
    metrics.counters.inc("bootsvc_bmc_requests_total", {"op": op, "via": via})

    def failed(note: str) -> None:
        forget_power(node.id)
        lifecycle.record(session, node, "power_action", actor=actor, detail={"action": action, "error": note})

    try:
        drv = _driver(node, config, driver)
        if action == "on":
            drv.power_on(wait=timeout)
        elif action in ("off", "graceful-off"):
            drv.power_off(graceful=action == "graceful-off", wait=timeout)
        elif action == "reset":
            drv.reset(wait=timeout)
        else:
            drv.power_cycle(wait=timeout)
        state = str(drv.power_state().value)
    except CredentialDestinationError as e:  # nothing was sent; the reason names only what was enrolled
        failed("credential refused for this bmc_address")
        raise OpError("conflict", f"{e.message}: fix the node's BMC address or ask an admin about the credential",
                      kind="credential_refused", state=node.state, allowed=[]) from None
    except CredentialError as e:
        # The real reason (a file's mode, a missing variable) is for the admin's log, not the caller:
        # otherwise the answer is an oracle on the service's files and environment.
        log.warning("power action node=%s action=%s refused: %s", node.name, action, e.message)
        failed("BMC credential unusable (see the log)")
        raise OpError("failed", f"power {action} of {node.name} not done: its BMC credential cannot be used; "
                                "an admin finds the reason in the bootsvc log", kind="bmc_credential",
                      retryable=False) from None
    except BmcError as e:
        metrics.counters.inc("bootsvc_bmc_errors_total", {"op": op, "class": "retryable" if e.retryable else "fatal"})
        failed(str(e))
        raise OpError("failed", f"power {action} of {node.name} failed: {e}", kind="bmc_error",
                      retryable=e.retryable) from None
    lifecycle.record(session, node, "power_action", actor=actor, detail={"action": action, "power_state": state})
    with _power_lock:
        _power_cache[node.id] = PowerReading(state, None, time.monotonic())
    log.info("power node=%s action=%s state=%s actor=%s", node.name, action, state, actor)
    return state


@dataclasses.dataclass(frozen=True)
class PowerReading:
    """What the BMC said about power, or 'unknown' and why; ``at`` is time.monotonic() of the reading."""

    state: str
    reason: str | None
    at: float


POWER_CACHE_SECONDS = 5.0
POWER_READ_TIMEOUT = 1.5
_power_cache: dict[int, PowerReading] = {}
_power_pending: dict[int, concurrent.futures.Future[PowerReading]] = {}
_power_lock = threading.RLock()  # re-entered: a future that is already done runs its callback at once
# Reads run here so that a BMC that does not answer costs a page at most POWER_READ_TIMEOUT: the read
# itself goes on (bounded by the driver's own timeouts) and fills the cache for the next poll.
_power_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="power-read")


def _read_power(node_name: str, drv: PowerDriver) -> PowerReading:
    try:
        return PowerReading(str(drv.power_state().value), None, time.monotonic())
    except CredentialError:
        return PowerReading("unknown", "its BMC credential cannot be used (see the bootsvc log)", time.monotonic())
    except BmcError as e:
        return PowerReading("unknown", f"the BMC did not answer: {e.message}", time.monotonic())
    except Exception as e:  # a read for display must not take the page down; the log has it
        log.warning("power read node=%s failed: %s: %s", node_name, type(e).__name__, e)
        return PowerReading("unknown", f"reading it failed ({type(e).__name__})", time.monotonic())


def power_status(node: Node, *, config: Config, driver: DriverFactory | None = None,
                 timeout: float = POWER_READ_TIMEOUT, max_age: float = POWER_CACHE_SECONDS) -> PowerReading:
    """The node's power state for display: cached per node for ``max_age`` s, read on demand, never
    waiting more than ``timeout`` s (then 'unknown' with the reason). Writes nothing."""
    return power_statuses([node], config=config, driver=driver, timeout=timeout, max_age=max_age)[node.id]


def power_statuses(nodes: Sequence[Node], *, config: Config, driver: DriverFactory | None = None,
                   timeout: float = POWER_READ_TIMEOUT,
                   max_age: float = POWER_CACHE_SECONDS) -> dict[int, PowerReading]:
    """`power_status` of several nodes, read in parallel under one deadline (a machine page's host and
    DPUs cost at most ``timeout`` together)."""
    out: dict[int, PowerReading] = {}
    waiting: dict[int, concurrent.futures.Future[PowerReading]] = {}
    now = time.monotonic()
    for node in nodes:
        if not node.bmc_address:
            out[node.id] = PowerReading("unknown", "no BMC enrolled for this node", now)
            continue
        with _power_lock:
            hit = _power_cache.get(node.id)
            if hit is not None and now - hit.at < max_age:
                out[node.id] = hit
                continue
            fut = _power_pending.get(node.id)
            if fut is None:
                try:
                    drv = _driver(node, config, driver)  # here: the session's node is not for other threads
                except BmcError as e:
                    out[node.id] = PowerReading("unknown", e.message, now)
                    continue
                fut = _power_pool.submit(_read_power, node.name, drv)
                _power_pending[node.id] = fut
                fut.add_done_callback(functools.partial(_power_done, node.id))
        waiting[node.id] = fut
    end = now + timeout
    for nid, fut in waiting.items():
        try:
            out[nid] = fut.result(timeout=max(0.0, end - time.monotonic()))
        except concurrent.futures.TimeoutError:
            out[nid] = PowerReading("unknown", f"the BMC did not answer within {timeout:g} s", time.monotonic())
    return out


def _power_done(node_id: int, fut: concurrent.futures.Future[PowerReading]) -> None:
    with _power_lock:
        _power_pending.pop(node_id, None)
        if not fut.cancelled() and fut.exception() is None:
            _power_cache[node_id] = fut.result()


def forget_power(node_id: int | None = None) -> None:
    """Drop cached readings (after a power action, so the page shows the new state; tests)."""
    with _power_lock:
        if node_id is None:
            _power_cache.clear()
        else:
            _power_cache.pop(node_id, None)
