"""What the machine page reads from the database for a host and its DPUs: leases, the timeline, the
install percent of the current state, the DPU's last BMC check and fabric report, and which address a
host's callbacks came through. Queries only (a session and the nodes in, plain data out); the page's
request cycle is ``bootsvc/web/ui/__init__.py``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from bootsvc import fabric
from bootsvc.models import AgentStatus, Event, Lease, Node
from bootsvc.states import Trigger


def machine_nodes(s: Session, node: Node) -> list[Node]:
    """The host and its DPUs (a DPU without a host is a machine of its own)."""
    host = node if node.kind == "host" else node.host
    if host is None:
        return [node]
    return [host, *sorted(host.dpus, key=lambda d: d.name)]


def leases(s: Session, nodes: Sequence[Node]) -> dict[int, list[Lease]]:
    ids = [n.id for n in nodes]
    macs = {x.mac: n.id for n in nodes for x in n.nics}
    rows = s.scalars(select(Lease).where(or_(Lease.node_id.in_(ids), Lease.mac.in_(list(macs))),
                                         Lease.state.in_(("offered", "bound")))
                     .order_by(Lease.updated_at.desc()))
    out: dict[int, list[Lease]] = defaultdict(list)
    for lease in rows:
        nid = lease.node_id if lease.node_id in ids else macs.get(lease.mac)
        if nid is not None:
            out[nid].append(lease)
    return out


def events(s: Session, nodes: Sequence[Node], after: int = 0, limit: int = 100) -> list[Event]:
    q = (select(Event).where(Event.node_id.in_([n.id for n in nodes]), Event.id > after)
         .order_by(Event.id.desc()).limit(limit))
    return list(s.scalars(q))


def install_percent(s: Session, n: Node) -> int | None:
    """The last install_progress percent reported since the node entered its current state."""
    if not n.state.endswith("_installing"):
        return None
    ev = s.scalars(select(Event).where(Event.node_id == n.id, Event.trigger == Trigger.INSTALL_PROGRESS.value,
                                       Event.at >= n.state_since).order_by(Event.id.desc()).limit(1)).first()
    raw = (ev.detail or {}).get("percent") if ev is not None else None
    try:
        return max(0, min(100, int(raw))) if raw is not None else None
    except (TypeError, ValueError):
        return None


def dpu_checked(s: Session, n: Node) -> dict[str, Any] | None:
    """DPU mode and Secure Boot as the BMC last reported them (the conductor's ``dpu_checked`` event
    before it provisions; bootsvc/conductor.py ``_dpu_preflight``)."""
    ev = s.scalars(select(Event).where(Event.node_id == n.id, Event.trigger == "dpu_checked")
                   .order_by(Event.id.desc()).limit(1)).first()
    if ev is None or not isinstance(ev.detail, dict):
        return None
    d = ev.detail
    sb = d.get("secure_boot")
    return {"mode": str(d.get("dpu_mode") or "unknown"),
            "secure_boot": "on" if sb is True else "off" if sb is False else "unknown",
            "firmware": d.get("bmc_firmware"), "at": ev.at}


def fabric_panel(s: Session, n: Node) -> dict[str, Any] | None:
    """BGP sessions, L3VNI and Type-5 routes as the DPU's agent last reported them (docs/fabric.md)."""
    st = s.get(AgentStatus, n.id)
    rep = (st.health or {}).get("fabric") if st is not None and isinstance(st.health, dict) else None
    if not isinstance(rep, dict):
        return None
    out = fabric.summary(rep)
    want = fabric.expect_from_report(rep)
    out["verdict"] = fabric.gate(rep, want).reason() if want is not None else None
    out["at"] = st.last_seen if st is not None else None
    return out


def event_addresses(nodes: Sequence[Node], leases: dict[int, list[Lease]]) -> dict[str, Any]:
    """What the timeline shows as a host callback's address. A host's boot traffic reaches Zone 0
    masqueraded to its DPU's address (bootsvc/policy.py; inventory.node_addresses), so the source
    address recorded with its installer's callbacks (web/boot.py ``_detail``) is the DPU's: the timeline
    shows the host's own lease address instead, and names the DPU it came through."""
    via: dict[str, str] = {}  # a DPU's address -> the DPU's name
    for n in nodes:
        if n.kind == "dpu":
            via.update({x.ipv4: n.name for x in n.nics if x.ipv4})
            via.update({lease.address: n.name for lease in leases.get(n.id, [])})
    host_ip = {n.id: next((x.address for x in leases.get(n.id, []) if x.state == "bound"),
                          leases[n.id][0].address if leases.get(n.id) else None)
               for n in nodes if n.kind == "host"}
    return {"via": via, "host_ip": host_ip}
