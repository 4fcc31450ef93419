"""Lease allocation and durable lease writes.

Owns: the in-memory lease index per (VRF, address) and (VRF, MAC), choosing a free address per
(VRF, network) that honours reservations (``Nic.ipv4``), config ``reserved`` ranges and quarantine
(DECLINE), holding OFFERs in memory for a short TTL, and writing bindings/releases/declines to the
``leases`` table.

Client identity (RFC 2131 §2, §4.2): a client is its client identifier (option 61, at least 2 bytes,
RFC 2132 §9.14) when it sends one, else its chaddr - :func:`client_key`. Two identifiers behind one
chaddr are two clients with two leases. An identifier that is hardware type 1 + the chaddr itself
(what iPXE and busybox udhcpc send) names the same interface as the chaddr, so it is the chaddr: the
PXE firmware (no option 61) and the iPXE it loads are one client with one address, as in Kea.
``match_client_id=False`` (config ``dhcp.match_client_id``, Kea's ``match-client-id: false``) keys on
chaddr alone. Reservations (``Nic.ipv4``) stay per MAC: they describe hardware. The durable guard
compares the same identity in SQL (``_KEY_SQL``), so two instances sharing a PostgreSQL agree on who
holds a row.

Durability contract (RFC 2131 §3.1 step 4: the server commits the binding to persistent storage, then
answers DHCPACK): an ACK leaves only after its lease row is committed, so a bound lease
survives ``kill -9``. Commits are batched (group commit): :meth:`LeaseStore.commit` takes every
binding collected during a few milliseconds and writes them in one transaction. Several bootsvc
instances may share one PostgreSQL: the unique constraint on (vrf, address) plus a guarded upsert
(``ON CONFLICT ... DO UPDATE ... WHERE`` the row is free or already this client's) makes the database
the arbiter; a row the guard refused comes back as a conflict, the address is marked taken locally
and the client is NAKed so it retries and gets the next free address.

Instances that all receive every packet (a relay forwarding to several helper addresses) would
otherwise walk each pool in the same order and offer the same free address to different clients:
then one of the two bindings loses at the database and its client is NAKed. Instance i of n
(``dhcp.instance_index`` / ``instance_count``) therefore takes new addresses from its own stripe of
each pool first - the offsets o with o mod n == i - and any free address only when its stripe has
none (:meth:`LeaseStore._scan`), the interleaved form of the split scope RFC 2131 §4.2 asks servers
sharing an address space to agree on. A dead instance leaves no hole: the survivors answer its clients.

The writes use the DBAPI connection directly (one prepared statement per batch) because the ORM
costs ~100 µs per row, more than the whole DORA budget (baselines.md §1b).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bootsvc.config import NetworkConfig
from bootsvc.dhcp.decide import LeaseIntent, LeaseView
from bootsvc.dhcp.leasedb import LeaseWriter, client_key, valid_client_id
from bootsvc.models import Lease

__all__ = ["DEFAULT_QUARANTINE_SECONDS", "LeaseStore", "Rec", "client_key", "valid_client_id"]

DEFAULT_QUARANTINE_SECONDS = 3600  # RFC 2131 §3.1.5 leaves the duration to the server
_UTC = dt.UTC
SCAN_BUDGET = 1024  # addresses one DISCOVER may look at for a free one (LeaseStore._scan)


@dataclass(slots=True)
class Rec:
    """In-memory lease record (mutable, owned by the store's lock)."""

    vrf: str
    network: str
    address: int
    mac: str
    state: str  # offered | bound | released | expired | declined
    expires: float
    client_id: bytes | None = None
    durable: bool = False  # a row exists in the database for it
    key: str = "?"  # client_key(): who holds it (always passed; "?" = unknown holder)

    def live(self, now: float) -> bool:
        """Holds the address: a live offer, a bound lease or a quarantine not yet over."""
        return self.state in ("offered", "bound", "declined") and self.expires > now

    def view(self) -> LeaseView:
        return LeaseView(self.address.to_bytes(4, "big"), self.state, self.expires,  # type: ignore[arg-type]
                         self.mac, self.client_id)


@dataclass(slots=True)
class _Pool:
    ranges: list[tuple[int, int]]
    size: int
    cursor: int  # offset into the concatenated ranges; in this instance's stripe
    excluded: set[int]
    spill: int = 0  # cursor of the walk over the whole pool once the stripe is full


def _epoch(v: Any) -> float:
    if isinstance(v, str):
        v = dt.datetime.fromisoformat(v)
    if v.tzinfo is None:
        v = v.replace(tzinfo=_UTC)
    return float(v.timestamp())


class LeaseStore:
    """Thread-safe lease index + durable writer. One per server process."""

    def __init__(self, engine: Engine | None, networks: Sequence[NetworkConfig], *,
                 offer_ttl: float = 30.0, quarantine_seconds: float = DEFAULT_QUARANTINE_SECONDS,
                 match_client_id: bool = True, instance: tuple[int, int] = (0, 1)) -> None:
        self.engine = engine
        self.writer = LeaseWriter(engine, quarantine=quarantine_seconds, match_client_id=match_client_id)
        self.stripe, self.stripes = instance  # this instance's stripe of every pool (module docstring)
        if not 0 <= self.stripe < self.stripes:
            raise ValueError(f"instance {self.stripe} of {self.stripes}")
        self.match_client_id = match_client_id
        self.offer_ttl = offer_ttl
        self.quarantine = quarantine_seconds
        self.lock = threading.Lock()
        self.by_addr: dict[tuple[str, int], Rec] = {}
        self.by_client: dict[tuple[str, str], Rec] = {}  # (vrf, client_key) -> its lease
        self.pools: dict[str, _Pool] = {}
        self.reservations: dict[tuple[str, int], str] = {}  # (vrf, addr) -> mac
        self.dialect = engine.dialect.name if engine is not None else "none"
        self._refreshed_at: dt.datetime | None = None
        for nc in networks:
            self.pools[nc.name] = self._make_pool(nc)
            self.pools[nc.name].cursor = self.stripe

    # ---- set-up -------------------------------------------------------------------------------
    @staticmethod
    def _make_pool(nc: NetworkConfig) -> _Pool:
        ranges = [(int(r.start), int(r.end)) for r in nc.pools]
        excluded: set[int] = {int(nc.cidr.network_address), int(nc.cidr.broadcast_address)}
        if nc.gateway is not None:
            excluded.add(int(nc.gateway))
        if nc.boot_server is not None:
            excluded.add(int(nc.boot_server))
        excluded.update(int(a) for a in nc.boot_servers)  # the other instances' addresses too
        for r in nc.reserved:
            excluded.update(range(int(r.start), int(r.end) + 1))
        return _Pool(ranges, sum(e - s + 1 for s, e in ranges), 0, excluded)

    def set_reservations(self, items: Iterable[tuple[str, str, str]]) -> None:
        """(vrf, address, mac) of every fixed address (Nic.ipv4) known to the inventory."""
        res: dict[tuple[str, int], str] = {}
        for vrf, addr, mac in items:
            a = int.from_bytes(bytes(int(x) for x in addr.split(".")), "big")
            res[(vrf, a)] = mac
        with self.lock:
            self.reservations = res

    def load(self) -> int:
        """Read every lease row into memory (at start-up)."""
        if self.engine is None:
            return 0
        n = 0
        with Session(self.engine) as s:
            rows = s.execute(select(Lease.vrf, Lease.network, Lease.address, Lease.mac, Lease.state,
                                    Lease.expires_at, Lease.client_id, Lease.updated_at)).all()
        latest: dt.datetime | None = None
        with self.lock:
            for vrf, network, address, mac, state, expires, cid, updated in rows:
                self._put(vrf, network, address, mac, state, _epoch(expires), cid)
                n += 1
                u = updated if updated.tzinfo else updated.replace(tzinfo=_UTC)
                latest = u if latest is None or u > latest else latest
        self._refreshed_at = latest
        return n

    def refresh(self) -> int:
        """Pick up rows other instances wrote since the last load/refresh (multi-instance mode)."""
        if self.engine is None:
            return 0
        since = self._refreshed_at or dt.datetime(1970, 1, 1, tzinfo=_UTC)
        arg: Any = since if self.dialect != "sqlite" else since.replace(tzinfo=None)
        with Session(self.engine) as s:
            rows = s.execute(select(Lease.vrf, Lease.network, Lease.address, Lease.mac, Lease.state,
                                    Lease.expires_at, Lease.client_id, Lease.updated_at)
                             .where(Lease.updated_at > arg)).all()
        with self.lock:
            for vrf, network, address, mac, state, expires, cid, updated in rows:
                self._put(vrf, network, address, mac, state, _epoch(expires), cid)
                u = updated if updated.tzinfo else updated.replace(tzinfo=_UTC)
                if self._refreshed_at is None or u > self._refreshed_at:
                    self._refreshed_at = u
        return len(rows)

    def _put(self, vrf: str, network: str, address: str, mac: str, state: str, expires: float,
             cid: str | None) -> None:
        a = int.from_bytes(bytes(int(x) for x in address.split(".")), "big")
        cidb = valid_client_id(bytes.fromhex(cid)) if cid else None
        key = client_key(mac, cidb, self.match_client_id)
        old = self.by_addr.get((vrf, a))
        if old is not None and old.key == key and old.state == state and abs(old.expires - expires) < 1:
            old.durable = True
            return  # our own write coming back from a refresh
        if old is not None and old.key != key and self.by_client.get((vrf, old.key)) is old:
            del self.by_client[(vrf, old.key)]
        rec = Rec(vrf, network, a, mac, state, expires, cidb, True, key)
        self.by_addr[(vrf, a)] = rec
        cur = self.by_client.get((vrf, key))
        if cur is None or state == "bound" or cur.state != "bound":
            self.by_client[(vrf, key)] = rec

    # ---- queries ------------------------------------------------------------------------------
    def key_of(self, mac: str, cid: bytes | None) -> str:
        return client_key(mac, cid, self.match_client_id)

    def lookup(self, vrf: str, client: str) -> LeaseView | None:
        """The lease of a client (``client_key``; a client without identifier is its MAC)."""
        rec = self.by_client.get((vrf, client))
        return rec.view() if rec is not None else None

    def held_by_other(self, vrf: str, addr: bytes, mac: str, now: float, key: str | None = None) -> bool:
        a = int.from_bytes(addr, "big")
        r = self.reservations.get((vrf, a))
        if r is not None and r != mac:
            return True
        rec = self.by_addr.get((vrf, a))
        k = key or mac
        return rec is not None and (rec.key != k or rec.state == "declined") and rec.live(now)

    def _free(self, vrf: str, a: int, key: str, mac: str, now: float) -> bool:
        rec = self.by_addr.get((vrf, a))
        # a quarantined (declined) address is not offered even to the client that declined it
        if rec is not None and (rec.key != key or rec.state == "declined") and rec.live(now):
            return False
        r = self.reservations.get((vrf, a))
        return r is None or r == mac

    def candidate(self, vrf: str, network: str, mac: str, now: float, *,
                  reserved: bytes | None = None, requested: bytes | None = None,
                  key: str | None = None) -> bytes | None:
        """Address to offer: the reservation, else the client's current/previous address, else the
        one it asks for (option 50) if free, else the next free one in the pools. ``key``: the
        client's identity (``client_key``), default its MAC."""
        k = key or mac
        if reserved is not None:
            return reserved if not self.held_by_other(vrf, reserved, mac, now, k) else None
        pool = self.pools.get(network)
        if pool is None:
            return None
        with self.lock:
            rec = self.by_client.get((vrf, k))
            if rec is not None and rec.network == network and rec.state != "declined" \
                    and self._in_pool(pool, rec.address) and self._free(vrf, rec.address, k, mac, now):
                return rec.address.to_bytes(4, "big")
            if requested is not None:
                a = int.from_bytes(requested, "big")
                if self._in_pool(pool, a) and self._free(vrf, a, k, mac, now):
                    return requested
            return self._scan(vrf, pool, k, mac, now)

    @staticmethod
    def _in_pool(pool: _Pool, a: int) -> bool:
        if a in pool.excluded:
            return False
        return any(s <= a <= e for s, e in pool.ranges)

    def _scan(self, vrf: str, pool: _Pool, key: str, mac: str, now: float) -> bytes | None:
        """Next free address from the pool's cursor, looking at no more than ``SCAN_BUDGET`` of them.
        Usually the first one is free (the cursor sits just past the last allocation). In a pool that
        is (nearly) full - a starvation flood of spoofed MACs, RFC 2131 §7 - an unbounded walk would
        cost every further DISCOVER the whole pool (~20 ms for a /16 here); bounded, the DISCOVER
        gets no offer (``pool_exhausted``) and the next one goes on from where this one stopped.
        Several instances: this instance's stripe first, then (its stripe full) the whole pool."""
        if pool.size == 0:
            return None
        n = self.stripes
        if n == 1:
            pool.cursor, a, _ = self._walk(vrf, pool, pool.cursor, 1, min(pool.size, SCAN_BUDGET), key, mac, now)
            return a
        # the stripe's offsets: stripe, stripe + n, ... (< size); its cursor stays in the stripe. Half
        # the budget for it, the rest for the whole pool when it has nothing free
        span = (pool.size - self.stripe + n - 1) // n
        looked = 0
        if span > 0:
            pool.cursor, a, looked = self._walk(vrf, pool, pool.cursor, n, min(span, SCAN_BUDGET // 2),
                                                key, mac, now)
            if a is not None:
                return a
        pool.spill, a, _ = self._walk(vrf, pool, pool.spill, 1, min(pool.size, SCAN_BUDGET - looked),
                                      key, mac, now)
        return a

    def _walk(self, vrf: str, pool: _Pool, off: int, step: int, count: int, key: str, mac: str,
              now: float) -> tuple[int, bytes | None, int]:
        """Look at up to ``count`` offsets from ``off`` in steps of ``step``, wrapping within the
        stripe ``off mod step``: the offset after the last one looked at, the free address found,
        and how many were looked at."""
        size = pool.size
        first = off % step  # the stripe these offsets belong to
        looked = 0
        for looked in range(1, count + 1):
            # map the offset into the concatenated ranges
            o = off
            for s, e in pool.ranges:
                width = e - s + 1
                if o < width:
                    a = s + o
                    break
                o -= width
            off += step
            if off >= size:
                off = first
            if a in pool.excluded:
                continue
            if self._free(vrf, a, key, mac, now):
                return off, a.to_bytes(4, "big"), looked
        return off, None, looked

    # ---- memory updates -----------------------------------------------------------------------
    def offer(self, it: LeaseIntent, now: float) -> None:
        a = int.from_bytes(it.address, "big")
        cid = it.client_id
        if cid is not None and len(cid) < 2:
            cid = None
        key = client_key(it.mac, cid, self.match_client_id)
        with self.lock:
            cur = self.by_addr.get((it.vrf, a))
            if cur is not None and cur.key == key and cur.state == "bound" and cur.live(now):
                return  # re-offering its own bound address: keep the binding
            rec = Rec(it.vrf, it.network, a, it.mac, "offered", now + self.offer_ttl, cid,
                      cur.durable if cur is not None else False, key)
            self._index(rec)

    def unoffer(self, it: LeaseIntent) -> None:
        a = int.from_bytes(it.address, "big")
        key = client_key(it.mac, it.client_id, self.match_client_id)
        with self.lock:
            rec = self.by_addr.get((it.vrf, a))
            if rec is not None and rec.key == key and rec.state == "offered":
                rec.state = "released"
                rec.expires = 0.0

    def _index(self, rec: Rec) -> None:
        key = (rec.vrf, rec.address)
        old = self.by_addr.get(key)
        if old is not None and old.key != rec.key and self.by_client.get((rec.vrf, old.key)) is old:
            del self.by_client[(rec.vrf, old.key)]
        prev = self.by_client.get((rec.vrf, rec.key))
        if (prev is not None and prev.address != rec.address
                and self.by_addr.get((rec.vrf, prev.address)) is prev
                and prev.state in ("offered", "bound")):
                prev.state = "released"
                prev.expires = 0.0
        self.by_addr[key] = rec
        self.by_client[(rec.vrf, rec.key)] = rec

    def stage(self, it: LeaseIntent, now: float) -> tuple[LeaseIntent, int | None]:
        """Apply a bind/release/decline to memory before it is committed; returns the intent and the
        client's previous bound address in that VRF (to release in the same transaction)."""
        a = int.from_bytes(it.address, "big")
        cid = it.client_id
        if cid is not None and len(cid) < 2:
            cid = None
        key = client_key(it.mac, cid, self.match_client_id)
        with self.lock:
            prev = self.by_client.get((it.vrf, key))
            prev_addr = prev.address if prev is not None and prev.state == "bound" and prev.address != a \
                else None
            if it.action == "bind":
                self._index(Rec(it.vrf, it.network, a, it.mac, "bound", it.expires_at, cid, True, key))
            elif it.action == "release":
                rec = self.by_addr.get((it.vrf, a))
                if rec is not None and rec.key == key:
                    rec.state, rec.expires = "released", now
            elif it.action == "decline":
                rec = Rec(it.vrf, it.network, a, it.mac, "declined", now + self.quarantine, cid, True, key)
                self.by_addr[(it.vrf, a)] = rec
                if self.by_client.get((it.vrf, key)) is not None:
                    del self.by_client[(it.vrf, key)]
        return it, prev_addr

    def conflict(self, it: LeaseIntent, now: float) -> None:
        """The database refused a binding: another instance holds the address. Mark it taken here
        (unknown holder) until the next refresh tells us more."""
        a = int.from_bytes(it.address, "big")
        key = client_key(it.mac, it.client_id, self.match_client_id)
        with self.lock:
            rec = Rec(it.vrf, it.network, a, "?", "bound", now + 60.0, None, True, "?")
            self.by_addr[(it.vrf, a)] = rec
            mine = self.by_client.get((it.vrf, key))
            if mine is not None and mine.address == a:
                del self.by_client[(it.vrf, key)]

    # ---- durable writes (bootsvc.dhcp.leasedb) -------------------------------------------------
    def commit(self, batch: Sequence[tuple[LeaseIntent, int | None]], now: float) -> list[bool]:
        """Write a batch in ONE transaction; returns per-item success (False = lost to a conflict).
        Raises on database errors (the caller must then not send the ACKs)."""
        return self.writer.commit(batch, now)

    def checkpoint(self) -> None:
        self.writer.checkpoint()

    def close(self) -> None:
        self.writer.close()
