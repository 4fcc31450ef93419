"""What the DHCP packet path knows of the inventory, and what it tells the inventory back.

Owns: ``Inventory``, the MAC -> node view cache and the fixed addresses (kept in step by the server's
maintenance thread - a signature query, then only what changed - so the packet path never queries
the database and the refresh does not grow with the fleet), and ``DiscoveredClients``,
the record of unknown clients seen (config ``dhcp.unknown_clients``: discover/serve) - noted on the
packet path at most once per MAC a minute, written to the ``discovered`` table by the maintenance
thread in one transaction per batch, so a storm of unknown clients never makes the packet path wait
for the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, or_, select
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
    """MAC -> node view and the reservations, kept in step with the database by the maintenance
    thread so the packet path never queries. Enrollments are seen within one period (2 s), edits and
    deletes within five (10 s), anything written behind bootsvc's back within ``full_seconds``.

    What DHCP decides on is each node's name, kind, host, tenant (and its VRF) and NICs (MAC, role,
    fixed address). :meth:`reload` reads all of it as plain rows in one query and builds full views
    only for the nodes where it changed; that query alone costs ~0.2 s of CPU at 20 000 nodes, so
    running it every 2 s made the DHCP server's CPU grow with the fleet (0.003 -> 0.008 s per pair
    from 1k to 10k pairs in bench/storm). :meth:`refresh` (the maintenance thread's call) instead
    reads, four times out of five, the tenant rows and the maximum ids (the last key of each table:
    ~0.4 ms, flat; the row counts, which SQLite takes by walking a b-tree, cost 3.7 ms at 20 000 nodes
    and are left to the signature), and every
    ``edit_every``-th time (or when those moved) a signature: aggregates the database computes over
    the columns above (id sums, id-weighted sums of tenant, host, name length, kind, NIC node, role,
    address length; ~12 ms at 20 000 nodes, no rows to Python). Unchanged: nothing to do. Grown by
    new rows only (enrollment): it reads just the nodes above the last node id and the nodes of NICs
    above the last NIC id, and accepts them if they account for the whole difference in the
    signature. Anything else (an edit, a delete, a tenant's VRF) falls back to the full reload.
    Every ``full_seconds`` a full reload runs anyway: a write that keeps every aggregate (an
    in-place MAC change, an address swapped for one of the same length, a delete and an insert
    reusing the id in one period) is seen then; bootsvc's own edits replace NIC rows (new ids). That
    safety net costs at most ``full_share`` of one core: a reload whose CPU time (without building
    views: what it costs when nothing changed) exceeds ``full_share * full_seconds`` stretches the
    period to ``reload CPU / full_share``. The rows of 20 000 nodes cost ~0.3 s of CPU: every ~600 s
    instead of every 120 s, where that reload was the largest part of the refresh CPU that grew with
    the fleet (refreshes at 2k / 20k nodes: 1.2 / 5.5 ms of CPU per second before, 1.0 / 3.9 after). A
    view kept from an earlier refresh may show an older ``state``; nothing on the DHCP path reads
    it."""

    def __init__(self, sessions: sessionmaker[Session] | None, *, full_seconds: float = 120.0,
                 edit_every: int = 5, clock: Callable[[], float] = time.monotonic,
                 full_share: float = 0.0005, cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.sessions = sessions
        self.full_seconds = full_seconds
        self.full_share = full_share
        self.cpu_clock = cpu_clock
        self.full_every = full_seconds  # full_seconds, or longer when a reload costs more (class docstring)
        self.edit_every = max(1, edit_every)
        self._calls = 0
        self.clock = clock
        self.by_mac: dict[str, NodeView] = {}
        self.reservations: list[tuple[str, str, str]] = []  # (vrf, ipv4, mac)
        self.reservations_gen = 0  # bumped whenever ``reservations`` is replaced
        self._keys: dict[int, tuple[Any, ...]] = {}  # node id -> what DHCP decides on
        self._views: dict[int, NodeView] = {}
        self._sig: _Sig | None = None  # the database's signature the cache matches
        self._full_at = 0.0
        self.rebuilt = 0  # views built by the last reload/refresh (for tests and the maintenance log)
        self.full_reloads = 0
        self.incremental = 0

    # ---- the signature ------------------------------------------------------------------------
    @staticmethod
    def _read_sig(s: Session) -> _Sig:
        z = 0
        nodes = s.execute(select(
            func.count(), func.coalesce(func.sum(Node.id), z), func.coalesce(func.max(Node.id), z),
            func.coalesce(func.sum(func.coalesce(Node.tenant_id, z) * Node.id), z),
            func.coalesce(func.sum(func.coalesce(Node.host_id, z) * Node.id), z),
            func.coalesce(func.sum(func.length(Node.name) * Node.id), z),
            func.coalesce(func.sum(case((Node.kind == "dpu", Node.id), else_=z)), z))).one()
        nics = s.execute(select(
            func.count(), func.coalesce(func.sum(Nic.id), z), func.coalesce(func.max(Nic.id), z),
            func.coalesce(func.sum(Nic.node_id * Nic.id), z),
            func.coalesce(func.sum(func.length(Nic.role) * Nic.id), z),
            func.coalesce(func.sum(func.coalesce(func.length(Nic.ipv4), z) * Nic.id), z))).one()
        tenants = tuple((int(i), str(v)) for i, v in s.execute(select(Tenant.id, Tenant.vrf).order_by(Tenant.id)))
        return _Sig(tenants, tuple(int(x) for x in nodes), tuple(int(x) for x in nics))

    @staticmethod
    def _read_quick(s: Session) -> tuple[Any, ...]:
        """Tenant rows and maximum ids (an index's last key each, whatever the table's size): what an
        enrollment changes."""
        node_max = s.execute(select(func.coalesce(func.max(Node.id), 0))).scalar_one()
        nic_max = s.execute(select(func.coalesce(func.max(Nic.id), 0))).scalar_one()
        tenants = tuple((int(i), str(v)) for i, v in s.execute(select(Tenant.id, Tenant.vrf).order_by(Tenant.id)))
        return tenants, int(node_max), int(nic_max)

    @staticmethod
    def _add_node(agg: list[int], nid: int, name: str, kind: str, host: int | None, tenant: int | None) -> None:
        agg[0] += 1
        agg[1] += nid
        agg[2] = max(agg[2], nid)
        agg[3] += (tenant or 0) * nid
        agg[4] += (host or 0) * nid
        agg[5] += len(name) * nid
        agg[6] += nid if kind == "dpu" else 0

    @staticmethod
    def _add_nic(agg: list[int], nic_id: int, node_id: int, role: str, ipv4: str | None) -> None:
        agg[0] += 1
        agg[1] += nic_id
        agg[2] = max(agg[2], nic_id)
        agg[3] += node_id * nic_id
        agg[4] += len(role) * nic_id
        agg[5] += len(ipv4 or "") * nic_id

    @staticmethod
    def _rows_query() -> Any:
        return (select(Node.id, Node.name, Node.kind, Node.host_id, Node.tenant_id, Tenant.vrf,
                       Nic.mac, Nic.role, Nic.ipv4, Nic.id)
                .outerjoin(Tenant, Tenant.id == Node.tenant_id).outerjoin(Nic, Nic.node_id == Node.id)
                .order_by(Node.id, Nic.mac))

    @staticmethod
    def _group(rows: Any) -> dict[int, list[Any]]:
        grouped: dict[int, list[Any]] = {}
        for nid, name, kind, host, tenant, vrf, mac, role, ipv4, _nic_id in rows:
            g = grouped.get(nid)
            if g is None:
                g = grouped[nid] = [name, kind, host, tenant, vrf]
            if mac is not None:
                g.append((mac, role, ipv4))
        return grouped

    # ---- loads --------------------------------------------------------------------------------
    def reload(self) -> None:
        """Read everything DHCP decides on; rebuild the views of the nodes where it changed."""
        if self.sessions is None:
            return
        cpu0 = self.cpu_clock()
        with self.sessions() as s:
            # the signature first: a write landing between the two reads is then in the rows but
            # not in the signature, and the next refresh sees the difference (never the reverse)
            sig = self._read_sig(s)
            grouped = self._group(s.execute(self._rows_query()).all())
            keys = {nid: tuple(g) for nid, g in grouped.items()}
            changed = [nid for nid, k in keys.items() if self._keys.get(nid) != k]
            views = {nid: v for nid, v in self._views.items() if nid in keys}
            built = self.cpu_clock()
            views.update(self._build(s, changed))
            cpu0 += self.cpu_clock() - built  # what a reload costs when nothing changed: without the builds
        by_mac: dict[str, NodeView] = {}
        for v in views.values():
            for nic in v.nics:
                by_mac[nic.mac] = v
        self._keys, self._views = keys, views
        self.rebuilt = len(changed)
        self.by_mac = by_mac
        self._set_reservations()
        self._sig = sig
        self._full_at = self.clock()
        self.full_reloads += 1
        self.full_every = max(self.full_seconds, (self.cpu_clock() - cpu0) / self.full_share)

    def refresh(self) -> None:
        """The periodic call: nothing, the new rows only, or a full :meth:`reload` (class docstring)."""
        if self.sessions is None:
            return
        old = self._sig
        if old is None or self.clock() - self._full_at >= self.full_every:
            self.reload()
            return
        self._calls += 1
        with self.sessions() as s:
            if self._calls % self.edit_every and self._read_quick(s) == (old.tenants, old.nodes[2], old.nics[2]):
                self.rebuilt = 0  # no row added; edits and deletes are looked for every edit_every calls
                return
            sig = self._read_sig(s)
            if sig == old:
                self.rebuilt = 0
                return
            if sig.tenants == old.tenants and sig.nodes[2] >= old.nodes[2] and sig.nics[2] >= old.nics[2]:
                node_lo, node_hi, nic_lo, nic_hi = old.nodes[2], sig.nodes[2], old.nics[2], sig.nics[2]
                rows = s.execute(self._rows_query().where(or_(
                    and_(Node.id > node_lo, Node.id <= node_hi),
                    Node.id.in_(select(Nic.node_id).where(Nic.id > nic_lo, Nic.id <= nic_hi))))).all()
                nodes, nics = list(old.nodes), list(old.nics)
                seen: set[int] = set()
                for nid, name, kind, host, tenant, _vrf, _mac, role, ipv4, nic_id in rows:
                    if node_lo < nid <= node_hi and nid not in seen:
                        seen.add(nid)
                        self._add_node(nodes, nid, name, kind, host, tenant)
                    if nic_id is not None and nic_lo < nic_id <= nic_hi:
                        self._add_nic(nics, nic_id, nid, role, ipv4)
                if tuple(nodes) == sig.nodes and tuple(nics) == sig.nics:
                    self._apply(s, self._group(rows))
                    self._sig = sig
                    self.incremental += 1
                    return
        self.reload()  # an edit or a delete (or a write racing the reads): read everything

    def _build(self, s: Session, ids: list[int]) -> dict[int, NodeView]:
        views: dict[int, NodeView] = {}
        for k in range(0, len(ids), 500):
            chunk = ids[k : k + 500]
            for n in s.scalars(select(Node).where(Node.id.in_(chunk)).options(selectinload(Node.dpus))):
                views[n.id] = node_view(n)
        return views

    def _apply(self, s: Session, grouped: dict[int, list[Any]]) -> None:
        """Take the rows of some nodes (new ones, or ones with new NICs) into the cache."""
        keys = {nid: tuple(g) for nid, g in grouped.items()}
        changed = {nid for nid, k in keys.items() if self._keys.get(nid) != k}
        # a new DPU changes its host's view (dpu_ids)
        changed.update(k[2] for nid, k in keys.items() if nid in changed and k[2] in self._views)
        views = self._build(s, sorted(changed))
        by_mac = self.by_mac  # changed in place: the packet thread only reads single keys
        res_touched = False
        for nid, v in views.items():
            old = self._views.get(nid)
            if old is not None:
                for nic in old.nics:
                    res_touched |= bool(nic.ipv4)
                    if by_mac.get(nic.mac) is old:
                        del by_mac[nic.mac]
            for nic in v.nics:
                res_touched |= bool(nic.ipv4)
                by_mac[nic.mac] = v
            self._views[nid] = v
        self._keys.update(keys)
        self.rebuilt = len(views)
        if res_touched:
            self._set_reservations()

    def _set_reservations(self) -> None:
        res: list[tuple[str, str, str]] = []
        for v in self._views.values():
            vrf = v.tenant.vrf if (v.kind == "host" and v.tenant is not None) else ""
            for nic in v.nics:
                if nic.ipv4:
                    res.append((vrf, nic.ipv4, nic.mac))
        if res != self.reservations:
            self.reservations = res
            self.reservations_gen += 1


@dataclass(frozen=True, slots=True)
class _Sig:
    """What :meth:`Inventory._read_sig` returns: tenant rows and the aggregates over nodes and NICs."""

    tenants: tuple[tuple[int, str], ...]
    nodes: tuple[int, ...]  # count, sum id, max id, sum tenant*id, sum host*id, sum len(name)*id, sum dpu ids
    nics: tuple[int, ...]  # count, sum id, max id, sum node*id, sum len(role)*id, sum len(ipv4)*id


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
