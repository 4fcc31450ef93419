"""Search for the UI: nodes by serial, name, MAC (any format, or its last digits) or IP, and MACs the
DHCP server saw but nobody enrolled."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from bootsvc import inventory
from bootsvc.models import Discovered, Lease, Nic, Node


@dataclass(frozen=True)
class Hit:
    node: Node
    why: str


def search_nodes(s: Session, q: str, limit: int = 50) -> tuple[list[Hit], list[Any]]:
    """Nodes matching ``q`` (serial, name, MAC in any format or its last digits, IP) and unenrolled
    MACs the DHCP server has seen. Exact matches first."""
    q = q.strip()
    hits: dict[int, Hit] = {}
    seen_macs: list[Any] = []

    def add(nodes: Iterable[Node], why: str) -> None:
        for n in nodes:
            hits.setdefault(n.id, Hit(n, why))

    if not q:
        return [], []
    mac: str | None
    try:
        mac = inventory.normalize_mac(q)
    except ValueError:
        mac = None
    if mac:
        add(s.scalars(select(Node).join(Nic).where(Nic.mac == mac)), f"NIC {mac}")
        lease_nodes = s.scalars(select(Node).join(Lease, Lease.node_id == Node.id).where(Lease.mac == mac))
        add(lease_nodes, f"lease for {mac}")
        seen_macs = list(s.scalars(select(Discovered).where(Discovered.mac == mac)))
    try:
        ip = str(ipaddress.IPv4Address(q))
    except ValueError:
        ip = None
    if ip:
        for lease in s.scalars(select(Lease).where(Lease.address == ip).order_by(Lease.updated_at.desc())):
            n = s.get(Node, lease.node_id) if lease.node_id else None
            if n is None:
                n = s.scalars(select(Node).join(Nic).where(Nic.mac == lease.mac)).first()
            if n is not None:
                add([n], f"{lease.state} lease {ip} in VRF {lease.vrf or 'default'}")
        add(s.scalars(select(Node).join(Nic).where(Nic.ipv4 == ip)), f"reserved IP {ip}")
    add(s.scalars(select(Node).where(or_(Node.serial == q, Node.name == q.lower()))), "serial/name")
    hexes = re.sub(r"[:.\-\s]", "", q).lower()
    if not mac and 4 <= len(hexes) < 12 and re.fullmatch(r"[0-9a-f]+", hexes):
        add(s.scalars(select(Node).join(Nic).where(func.replace(Nic.mac, ":", "").contains(hexes)).limit(limit)),
            f"MAC contains {hexes}")
    if len(q) >= 3:
        like = f"%{q.replace('%', '').replace('_', '')}%"
        add(s.scalars(select(Node).where(or_(Node.serial.ilike(like), Node.name.ilike(like))).limit(limit)),
            "serial/name contains")
    return list(hits.values())[:limit], seen_macs
