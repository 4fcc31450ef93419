"""Machine operations that every front door (CLI, API, UI, webhook) asks for: one rule each, one error type.

Owns: editing a node's enrollment (`edit_node`), deleting a node (`delete_node`) and the pre-flight rules of
provisioning (`check_provision`), and `OpError`, whose ``code`` (`conflict`, `invalid`, `not_found`,
`forbidden`) is what a front door maps to its own vocabulary (exit code 2/1, HTTP 409/400/404/403) instead
of searching the message text. State changes still go through `bootsvc.lifecycle` only: an edit or a
delete writes no state, and it is refused while the service is acting on the node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from bootsvc import inventory, lifecycle
from bootsvc.models import Nic, Node, Tenant
from bootsvc.states import ACTIVE_STATES, FAILED_STATES, State

Code = Literal["conflict", "invalid", "not_found", "forbidden"]


class OpError(Exception):
    """An operation refused, with a code a front door maps and a message a tech can act on."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code: Code = code


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
        raise OpError("invalid", "; ".join(str(e) for e in errs))
    for col in ("name", "serial"):
        if col in changes:
            other = session.scalars(select(Node).where(getattr(Node, col) == changes[col], Node.id != node.id)).first()
            if other is not None:
                raise OpError("conflict", f"a node with {col} {changes[col]!r} exists ({other.name})")
    if "nics" in changes:
        for nic in spec.nics:
            m = inventory.normalize_mac(nic.mac)
            owner = session.scalars(select(Nic).where(Nic.mac == m, Nic.node_id != node.id)).first()
            if owner is not None:
                raise OpError("conflict", f"MAC {m} already belongs to another node")
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
                                 "and power it on yourself")
    if node.kind == "host" and not node.dpus and not no_dpu:
        raise OpError("invalid", f"{node.name} has no DPU, so nothing would isolate its tenant traffic: enroll "
                                 "its DPU with --host, or pass --no-dpu for a host the site declares DPU-less")
