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
from sqlalchemy.orm import Session, sessionmaker

from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.leasedb import opaque_text
from bootsvc.dhcp.packet import ZERO_IP, Packet, ip_str
from bootsvc.inventory import node_view
from bootsvc.models import Discovered, Node
from bootsvc.views import NodeView

__all__ = ["DiscoveredClients", "Inventory"]

log = logging.getLogger("bootsvc.dhcp")


class Inventory:
    """MAC -> node view and the reservations, reloaded from the database every few seconds so the
    packet path never queries. Changes (enrollment, new reservations) are seen within one period."""

    def __init__(self, sessions: sessionmaker[Session] | None) -> None:
        self.sessions = sessions
        self.by_mac: dict[str, NodeView] = {}
        self.reservations: list[tuple[str, str, str]] = []  # (vrf, ipv4, mac)

    def reload(self) -> None:
        if self.sessions is None:
            return
        by_mac: dict[str, NodeView] = {}
        res: list[tuple[str, str, str]] = []
        with self.sessions() as s:
            for n in s.scalars(select(Node)):
                v = node_view(n)
                vrf = v.tenant.vrf if (v.kind == "host" and v.tenant is not None) else ""
                for nic in v.nics:
                    by_mac[nic.mac] = v
                    if nic.ipv4:
                        res.append((vrf, nic.ipv4, nic.mac))
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
