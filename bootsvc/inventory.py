"""Inventory: read views of nodes/tenants and the enrollment writes (not state changes).

Owns: frozen views handed to protocol servers and the boot plan (``NodeView``), lookups by MAC,
name/serial, and IP, MAC normalisation, and enrolling nodes/tenants atomically — one transaction,
so a failed enroll leaves nothing half-made. State changes are ``bootsvc.lifecycle``'s, not here.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, bindparam, exists, func, literal, or_, select, union_all, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, joinedload, lazyload

from bootsvc.config import Config
from bootsvc.models import Lease, Nic, Node, Tenant
from bootsvc.views import NicView as NicView
from bootsvc.views import NodeView as NodeView
from bootsvc.views import TenantView as TenantView

log = logging.getLogger("bootsvc.inventory")
_MAC_RE = re.compile(r"^[0-9a-f]{12}$")


class InventoryError(ValueError):
    """Bad enrollment input; ``field`` names what is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def normalize_mac(text: str) -> str:
    """'AA-BB-CC-DD-EE-FF', 'aabb.ccdd.eeff', 'aa:bb:...' -> 'aa:bb:cc:dd:ee:ff'."""
    raw = re.sub(r"[^0-9a-fA-F]", "", text).lower()
    if not _MAC_RE.match(raw) or len(re.sub(r"[0-9a-fA-F:.\-\s]", "", text)) != 0:
        raise ValueError(f"not a MAC address: {text!r}")
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


def tenant_view(t: Tenant) -> TenantView:
    return TenantView(t.id, t.name, t.vrf, t.l3vni, t.table, tuple(str(p) for p in t.prefixes or ()))


def node_view(n: Node) -> NodeView:
    return NodeView(
        id=n.id, name=n.name, kind=n.kind, serial=n.serial, state=n.state, arch=n.arch, vendor=n.vendor,
        model=n.model, rack=n.rack, slot=n.slot, tenant=tenant_view(n.tenant) if n.tenant else None,
        host_id=n.host_id, dpu_ids=tuple(sorted(d.id for d in n.dpus)) if n.kind == "host" else (),
        nics=tuple(NicView(x.mac, x.role, x.ipv4) for x in sorted(n.nics, key=lambda x: x.mac)),
        bmc_address=n.bmc_address, bmc_driver=n.bmc_driver, bmc_credential_ref=n.bmc_credential_ref,
        bmc_verify_tls=n.bmc_verify_tls, provision_method=n.provision_method, image=n.image,
        secret_generation=n.secret_generation, deadline=n.deadline, attempts=n.attempts,
        last_error=n.last_error, hint=n.hint, version=n.version, state_since=n.state_since,
    )


@functools.cache
def view_load() -> tuple[Any, ...]:
    """Loader options (built once: building them per query costs more than the read) that read all
    `node_view` needs in the node's own statement: its NICs and (a host) its DPUs' ids, joined, instead
    of one statement for the NICs (selectin) and two for the DPUs (their rows, then their NICs). The
    DPUs' other relationships stay lazy (read on access, never wrong). A query using them must be
    ``.unique()``-d and read whole (``one_or_none``, not ``first``: a node with two NICs is two rows)."""
    return (joinedload(Node.nics),
            joinedload(Node.dpus).load_only(Node.id).options(lazyload(Node.nics), lazyload(Node.tenant)))


def node_by_mac(session: Session, mac: str) -> NodeView | None:
    try:
        m = normalize_mac(mac)
    except ValueError:
        return None
    # one statement (view_load); a MAC belongs to at most one node (nics.mac is unique)
    n = session.scalars(select(Node).where(Node.id == select(Nic.node_id).where(Nic.mac == m).scalar_subquery())
                        .options(*view_load())).unique().one_or_none()
    return node_view(n) if n else None


def get_node(session: Session, ident: str | int) -> Node | None:
    """A node by id, name, serial or one of its MACs."""
    if isinstance(ident, int) or (isinstance(ident, str) and ident.isdigit()):
        n = session.get(Node, int(ident))
        if n is not None:
            return n
    text = str(ident)
    n = session.scalars(select(Node).where((Node.name == text) | (Node.serial == text))).first()
    if n is None:
        try:
            m = normalize_mac(text)
        except ValueError:
            return None
        n = session.scalars(select(Node).join(Nic).where(Nic.mac == m)).first()
    return n


def node_by_name(session: Session, ident: str) -> NodeView | None:
    n = get_node(session, ident)
    return node_view(n) if n else None


def node_by_ip(session: Session, address: str, vrf: str = "") -> NodeView | None:
    lease = session.scalars(select(Lease).where(Lease.vrf == vrf, Lease.address == address,
                                                Lease.state == "bound")).first()
    if lease is not None and lease.node_id is not None:
        n = session.get(Node, lease.node_id)
        return node_view(n) if n else None
    n = session.scalars(select(Node).join(Nic).where(Nic.ipv4 == address)).first()
    return node_view(n) if n else None


def node_addresses(session: Session, node_id: int) -> frozenset[str]:
    """The Zone 0 addresses that may speak for a node (docs/security.md): bound default-VRF leases of
    its MACs and its NICs' reserved addresses - and, for a host, those of the DPUs in front of it (its
    boot traffic reaches Zone 0 masqueraded to its DPU's address, bootsvc/policy.py)."""
    ids = [node_id, *session.scalars(select(Node.id).where(Node.host_id == node_id))]
    nics = session.execute(select(Nic.mac, Nic.ipv4).where(Nic.node_id.in_(ids))).all()
    macs = [m for m, _ in nics]
    out = {ip for _, ip in nics if ip}
    out.update(session.scalars(select(Lease.address).where(
        Lease.vrf == "", Lease.state == "bound", (Lease.mac.in_(macs)) | (Lease.node_id.in_(ids)))))
    return frozenset(out)


@functools.cache
def _holds_query() -> Any:
    """`holds`'s statement, built once (``node_id`` and ``address`` bound): building costs more than
    running it."""
    node_id, address = bindparam("node_id", type_=Integer), bindparam("address", type_=String)
    ids = select(Node.id).where(or_(Node.id == node_id, Node.host_id == node_id)).scalar_subquery()
    macs = select(Nic.mac).where(Nic.node_id.in_(ids)).scalar_subquery()
    return union_all(
        select(literal(1)).select_from(Nic).where(Nic.ipv4 == address, Nic.node_id.in_(ids)),
        select(literal(1)).select_from(Lease).where(
            Lease.vrf == "", Lease.address == address, Lease.state == "bound",
            or_(Lease.mac.in_(macs), Lease.node_id.in_(ids))),
    ).limit(1)


def holds_column(address: Any) -> Any:
    """`holds` as a boolean column of a SELECT FROM nodes, for the row's own node (correlated): the
    boot plane reads a node and whether the request's address holds it in one statement. The same
    rows as `_holds_query`: a NIC of the node (or of a DPU in front of it) reserving the address, or
    the address's bound default-VRF lease of such a NIC's MAC or of such a node."""
    inner = aliased(Node)
    ids = select(inner.id).where(or_(inner.id == Node.id, inner.host_id == Node.id)).correlate(Node)
    macs = select(Nic.mac).where(Nic.node_id.in_(ids.scalar_subquery())).correlate(Node)
    return or_(
        exists().where(Nic.ipv4 == address, Nic.node_id.in_(ids.scalar_subquery())).correlate(Node),
        exists().where(Lease.vrf == "", Lease.address == address, Lease.state == "bound",
                       or_(Lease.mac.in_(macs.scalar_subquery()),
                           Lease.node_id.in_(ids.scalar_subquery()))).correlate(Node),
    )


def holds(session: Session, node_id: int, address: str) -> bool:
    """``address in node_addresses(session, node_id)``, answered by one statement (the boot plane and the
    agent API ask it on every authenticated request): the address's own rows only - its bound
    default-VRF lease (unique per VRF and address) and any NIC reserving it - matched against the node,
    the DPUs in front of it and their MACs."""
    return session.execute(_holds_query(), {"node_id": node_id, "address": address}).first() is not None


def expose_install_secret(session: Session, node_id: int) -> None:
    """The node's current secret just left bootsvc in a bf.cfg (HTTP boot plane, or a BFB pushed
    through its BMC): its agent must trade it at its next check-in (bootsvc/web/agent_api.py), and
    that check-in may end an install. Not committed here."""
    session.execute(update(Node).where(Node.id == node_id).values(agent_generation=None,
                                                                  agent_secret_confirmed=False)
                    .execution_options(synchronize_session=False))


def mac_holds(session: Session, mac: str, address: str) -> bool:
    """``address`` is bound to (or reserved for) ``mac`` in the default VRF."""
    if session.scalars(select(Lease.id).where(Lease.vrf == "", Lease.state == "bound", Lease.mac == mac,
                                              Lease.address == address).limit(1)).first() is not None:
        return True
    return session.scalars(select(Nic.id).where(Nic.mac == mac, Nic.ipv4 == address).limit(1)).first() is not None


def list_nodes(session: Session, *, kind: str | None = None, state: str | None = None,
               tenant: str | None = None, rack: str | None = None, limit: int = 100,
               offset: int = 0) -> tuple[list[Node], int]:
    q = select(Node)
    if kind:
        q = q.where(Node.kind == kind)
    if state:
        q = q.where(Node.state == state)
    if rack:
        q = q.where(Node.rack == rack)
    if tenant:
        q = q.join(Tenant, Node.tenant_id == Tenant.id).where(Tenant.name == tenant)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = list(session.scalars(q.order_by(Node.rack, Node.slot, Node.name).limit(limit).offset(offset)))
    return rows, int(total)


@dataclass(frozen=True)
class NicSpec:
    mac: str
    role: str
    ipv4: str | None = None


@dataclass(frozen=True)
class NodeSpec:
    name: str
    kind: str
    serial: str
    nics: Sequence[NicSpec] = ()
    vendor: str | None = None
    model: str | None = None
    rack: str | None = None
    slot: int | None = None
    arch: str | None = None
    tenant: str | None = None
    host: str | None = None  # for a DPU: name/serial of the host it fronts
    bmc_address: str | None = None
    bmc_driver: str = "redfish"
    bmc_credential_ref: str | None = None
    bmc_verify_tls: bool = True
    provision_method: str = "pxe"
    image: str | None = None


_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_spec(spec: NodeSpec, prefix: str = "") -> list[InventoryError]:
    errs: list[InventoryError] = []
    if not _NAME_RE.match(spec.name or ""):
        errs.append(InventoryError(f"{prefix}name", "use lower-case letters, digits and '-' (a DNS label)"))
    if spec.kind not in ("dpu", "host"):
        errs.append(InventoryError(f"{prefix}kind", "must be 'dpu' or 'host'"))
    if not spec.serial or len(spec.serial) > 64 or not spec.serial.isprintable():
        errs.append(InventoryError(f"{prefix}serial", "required, printable, at most 64 characters"))
    if spec.provision_method not in ("pxe", "redfish"):
        errs.append(InventoryError(f"{prefix}provision_method", "must be 'pxe' or 'redfish'"))
    if spec.bmc_driver not in ("redfish", "fake"):
        errs.append(InventoryError(f"{prefix}bmc_driver", "must be 'redfish' or 'fake'"))
    if spec.slot is not None and not (0 <= spec.slot <= 1000):
        errs.append(InventoryError(f"{prefix}slot", "must be between 0 and 1000"))
    seen: set[str] = set()
    for i, nic in enumerate(spec.nics):
        try:
            m = normalize_mac(nic.mac)
        except ValueError as e:
            errs.append(InventoryError(f"{prefix}nics.{i}.mac", str(e)))
            continue
        if m in seen:
            errs.append(InventoryError(f"{prefix}nics.{i}.mac", f"{m} listed twice"))
        seen.add(m)
        if nic.role not in ("oob", "host-pf", "bmc"):
            errs.append(InventoryError(f"{prefix}nics.{i}.role", "must be 'oob', 'host-pf' or 'bmc'"))
        if nic.ipv4 is not None:
            try:
                ipaddress.IPv4Address(nic.ipv4)
            except ValueError:
                errs.append(InventoryError(f"{prefix}nics.{i}.ipv4", f"not an IPv4 address: {nic.ipv4!r}"))
    return errs


class EnrollError(Exception):
    def __init__(self, errors: list[InventoryError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def enroll(session: Session, specs: Sequence[NodeSpec], *, actor: str, commit: bool = True) -> list[Node]:
    """Create nodes with their NICs in ONE transaction: all of them or none (EnrollError)."""
    from bootsvc import lifecycle

    errs: list[InventoryError] = []
    for i, s in enumerate(specs):
        errs += validate_spec(s, f"{i}." if len(specs) > 1 else "")
    if errs:
        raise EnrollError(errs)
    created: dict[str, Node] = {}
    try:
        for i, s in enumerate(specs):
            p = f"{i}." if len(specs) > 1 else ""
            tenant_id = None
            if s.tenant:
                t = session.scalars(select(Tenant).where(Tenant.name == s.tenant)).first()
                if t is None:
                    raise EnrollError([InventoryError(f"{p}tenant", f"no tenant named {s.tenant!r}")])
                tenant_id = t.id
            for nic in s.nics:
                m = normalize_mac(nic.mac)
                if session.scalars(select(Nic).where(Nic.mac == m)).first() is not None:
                    raise EnrollError([InventoryError(f"{p}nics", f"MAC {m} already belongs to another node")])
            for col, val in (("name", s.name), ("serial", s.serial)):
                if session.scalars(select(Node).where(getattr(Node, col) == val)).first() is not None:
                    raise EnrollError([InventoryError(f"{p}{col}", f"a node with {col} {val!r} exists")])
            n = Node(name=s.name, kind=s.kind, serial=s.serial, vendor=s.vendor, model=s.model, rack=s.rack,
                     slot=s.slot, arch=s.arch or ("aarch64" if s.kind == "dpu" else "x86_64"),
                     state="registered", tenant_id=tenant_id, bmc_address=s.bmc_address,
                     bmc_driver=s.bmc_driver, bmc_credential_ref=s.bmc_credential_ref,
                     bmc_verify_tls=s.bmc_verify_tls, provision_method=s.provision_method, image=s.image,
                     attempts=0, secret_generation=1)
            n.nics = [Nic(mac=normalize_mac(x.mac), role=x.role, ipv4=x.ipv4) for x in s.nics]
            session.add(n)
            created[s.name] = n
        session.flush()
        for i, s in enumerate(specs):
            if s.host:
                host = created.get(s.host) or get_node(session, s.host)
                if host is None or host.kind != "host":
                    raise EnrollError([InventoryError(f"{i}.host" if len(specs) > 1 else "host",
                                                      f"no host node named {s.host!r}")])
                created[s.name].host_id = host.id
        for n in created.values():
            lifecycle.record(session, n, "enrolled", actor=actor, commit=False)
        if commit:
            session.commit()
    except EnrollError:
        session.rollback()
        raise
    except IntegrityError as e:
        session.rollback()
        # The database's own text (constraint and column names) is for the log, not for API callers.
        log.info("enroll conflict with a concurrent write: %s", str(e.orig).splitlines()[0][:200])
        raise EnrollError([InventoryError("(record)", "conflicts with a node enrolled at the same moment "
                                                      "(name, serial or MAC already exists): re-read and retry")]
                          ) from None
    return list(created.values())


def add_tenant(session: Session, name: str, vrf: str, l3vni: int, prefixes: Sequence[str] = (),
               table: int | None = None, *, commit: bool = True) -> Tenant:
    from bootsvc.config import TenantConfig

    try:
        tc = TenantConfig(name=name, vrf=vrf, l3vni=l3vni, prefixes=tuple(prefixes), table=table)  # type: ignore[arg-type]
    except Exception as e:  # pydantic ValidationError: report the first field
        errs: list[Any] = getattr(e, "errors", list)()
        if errs:
            raise InventoryError(".".join(str(x) for x in errs[0]["loc"]), errs[0]["msg"]) from None
        raise InventoryError("tenant", str(e)) from None
    for col, val in (("name", tc.name), ("vrf", tc.vrf), ("l3vni", tc.l3vni)):
        if session.scalars(select(Tenant).where(getattr(Tenant, col) == val)).first() is not None:
            raise InventoryError(col, f"a tenant with {col} {val!r} exists")
    t = Tenant(name=tc.name, vrf=tc.vrf, l3vni=tc.l3vni, table=tc.table,
               prefixes=[str(p) for p in tc.prefixes])
    session.add(t)
    if commit:
        session.commit()
    return t


def sync_tenants(session: Session, config: Config) -> int:
    """Create the config's tenants that the database lacks (config is the site's declaration)."""
    made = 0
    for tc in config.tenants:
        if session.scalars(select(Tenant).where(Tenant.name == tc.name)).first() is None:
            add_tenant(session, tc.name, tc.vrf, tc.l3vni, [str(p) for p in tc.prefixes], tc.table,
                       commit=False)
            made += 1
    session.commit()
    return made
