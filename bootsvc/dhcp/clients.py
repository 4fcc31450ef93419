"""What the DHCP packet path knows of the inventory, and what it tells the inventory back.

Owns: ``Inventory``, the MAC -> node view cache and the fixed addresses (reloaded by the server's
maintenance thread, so the packet path never queries the database), and ``DiscoveredClients``,
the record of unknown clients seen (config ``dhcp.unknown_clients``: discover/serve) - noted on the
packet path at most once per MAC a minute, written to the ``discovered`` table by the maintenance
thread in one transaction per batch, so a storm of unknown clients never makes the packet path wait
for the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.leasedb import opaque_text
from bootsvc.dhcp.packet import ZERO_IP, Packet, ip_str
from bootsvc.inventory import node_view
from bootsvc.models import Discovered, Nic, Node, Tenant
from bootsvc.views import NodeView

__all__ = ["DiscoveredClients", "Inventory"]

log = logging.getLogger("bootsvc.dhcp")


class Inventory:
    """MAC -> node view and the reservations, refreshed from the database every few seconds so the
    packet path never queries. Changes (enrollment, new reservations) are seen within one period.

    A refresh reads only what DHCP decides on - each node's name, kind, host, tenant (and its VRF)
    and NICs (MAC, role, fixed address) - as plain rows in one query, and builds full views only for
    the nodes where that changed. Building every view each time (ORM objects for 20 000 nodes and
    their NICs) cost ~1 s of CPU per 4 000 nodes here, every 2 s, on the thread that shares the
    interpreter with the packet loop. A view kept from an earlier refresh may show an older
    ``state``; nothing on the DHCP path reads it."""

    def __init__(self, sessions: sessionmaker[Session] | None) -> None:
        self.sessions = sessions
        self.by_mac: dict[str, NodeView] = {}
        self.reservations: list[tuple[str, str, str]] = []  # (vrf, ipv4, mac)
        self._keys: dict[int, tuple[Any, ...]] = {}  # node id -> what DHCP decides on
        self._views: dict[int, NodeView] = {}
        self.rebuilt = 0  # views built by the last reload (for tests and the maintenance log)

    def reload(self) -> None:
        if self.sessions is None:
            return
        with self.sessions() as s:
            rows = s.execute(
                select(Node.id, Node.name, Node.kind, Node.host_id, Node.tenant_id, Tenant.vrf,
                       Nic.mac, Nic.role, Nic.ipv4)
                .outerjoin(Tenant, Tenant.id == Node.tenant_id).outerjoin(Nic, Nic.node_id == Node.id)
                .order_by(Node.id, Nic.mac)).all()
            grouped: dict[int, list[Any]] = {}
            for nid, name, kind, host, tenant, vrf, mac, role, ipv4 in rows:
                g = grouped.get(nid)
                if g is None:
                    g = grouped[nid] = [name, kind, host, tenant, vrf]
                if mac is not None:
                    g.append((mac, role, ipv4))
            keys = {nid: tuple(g) for nid, g in grouped.items()}
            changed = [nid for nid, k in keys.items() if self._keys.get(nid) != k]
            views = {nid: v for nid, v in self._views.items() if nid in keys}
            for k in range(0, len(changed), 500):
                chunk = changed[k : k + 500]
                for n in s.scalars(select(Node).where(Node.id.in_(chunk)).options(selectinload(Node.dpus))):
                    views[n.id] = node_view(n)
        by_mac: dict[str, NodeView] = {}
        res: list[tuple[str, str, str]] = []
        for v in views.values():
            vrf = v.tenant.vrf if (v.kind == "host" and v.tenant is not None) else ""
            for nic in v.nics:
                by_mac[nic.mac] = v
                if nic.ipv4:
                    res.append((vrf, nic.ipv4, nic.mac))
        self._keys, self._views = keys, views
        self.rebuilt = len(changed)
        self.by_mac = by_mac
        self.reservations = res


class DiscoveredClients:
    """Unknown clients to record: ``note`` on the packet path, ``write`` off it."""

    def __init__(self, sessions: sessionmaker[Session] | None, clock: Callable[[], float],
                 count: Callable[[str, int], None]) -> None:
        self.sessions = sessions
        self.clock = clock
        self.count = count
        self._seen: dict[str, float] = {}
        # a deque: appended by the loop thread, emptied by the maintenance thread (both atomic)
        self._rows: deque[dict[str, Any]] = deque()

    def note(self, pkt: Packet, net: dec.NetworkView, sel: dec.Selection, addr: bytes | None) -> None:
        mac = pkt.mac
        now = self.clock()
        last = self._seen.get(mac)
        if last is not None and now - last < 60:
            return
        if len(self._seen) > 100_000:  # a flood of spoofed MACs must not grow it without bound
            self._seen = {m: t for m, t in self._seen.items() if now - t < 60}
        self._seen[mac] = now
        relay = sel.relay
        uuid = pkt.uuid
        uc = pkt.options.get(77)
        self._rows.append({
            "mac": mac, "vrf": sel.vrf, "network": net.name, "address": ip_str(addr) if addr else None,
            "arch": pkt.arch, "vendor_class": pkt.vendor_class[:255] or None,
            "user_class": opaque_text(uc) if uc else None,
            "uuid": str(uuidlib.UUID(bytes=uuid)) if uuid else None,
            "relay": ip_str(pkt.giaddr) if pkt.giaddr != ZERO_IP else None,
            "circuit_id": opaque_text(relay.circuit_id) if relay else None,
            "remote_id": opaque_text(relay.remote_id) if relay else None,
        })

    def pending(self) -> int:
        return len(self._rows)

    def write(self) -> None:
        """Upsert what was noted since the last call (the latest row per MAC), one transaction."""
        items: dict[str, dict[str, Any]] = {}
        rows = self._rows
        while rows:
            row = rows.popleft()
            items[row["mac"]] = row
        if self.sessions is None or not items:
            return
        now = dt.datetime.now(dt.UTC)
        try:
            with self.sessions() as s:
                known = {d.mac: d for d in s.scalars(select(Discovered).where(Discovered.mac.in_(list(items))))}
                for mac, row in items.items():
                    d = known.get(mac)
                    if d is None:
                        s.add(Discovered(first_seen=now, last_seen=now, seen_count=1, **row))
                    else:
                        for k, v in row.items():
                            if v is not None:
                                setattr(d, k, v)
                        d.last_seen = now
                        d.seen_count += 1
                s.commit()
            self.count("discovered_written", len(items))
        except Exception:
            log.exception("dhcp: could not record discovered clients")
            self.count("discovered_errors", 1)
