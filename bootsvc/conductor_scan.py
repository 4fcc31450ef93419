"""The conductor's change feed and scans: which nodes a pass must decide for again, and in what order
the steps it decided are handed out.

Owns: `ScanSteps`, a mixin of `bootsvc.conductor.Conductor` with ``_changed`` (the working nodes
whose row, or a host's DPUs, changed since their cached decision, or whose due time came),
``_drift_due`` (the drift feed: resting ``policy_applied`` DPUs whose policy inputs changed, read every
DRIFT_SECONDS; with static peer lists each also every DRIFT_SWEEP_SECONDS), the queues of decided
steps not yet taken (``_enqueue``, ``_take``) and their caches (``_sigs``, ``_dirty``, ``_pending``,
``_held``, ``_due``, ``_drift``; ``_decided`` is filled by the conductor's ``_remember``).

Why a feed: a column scan of every working node each pass grew with the fleet in flight (20,000 rows
at 10,000 pairs: ~100 ms a pass, ~10 % of a core all storm long, and decisions later as it grew). Every
UPDATE of a node row sets ``nodes.change_seq`` above the table's highest (``models.NEXT_CHANGE_SEQ``,
an index lookup inside the statement), so a pass reads ``change_seq > mark`` plus the hosts of the
DPUs among those rows, and pops due times from a heap: it costs what changed. A full scan at start and
every FULL_SCAN_SECONDS is the safety net (see ``_since`` for PostgreSQL); another conductor's claim
seen in the feed is looked at again when it runs out. Missing a change can only delay a node, never
misdirect it: a step re-reads its node under its claim and decides again.
"""

from __future__ import annotations

import datetime as dt
import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import String, func, literal, or_, select, type_coerce
from sqlalchemy.orm import Session, aliased

from bootsvc import orchestrate
from bootsvc.conductor_budget import DB_ONLY_OPS, POWER_ON_OPS
from bootsvc.conductor_policy import host_addresses
from bootsvc.config import Config
from bootsvc.models import AgentStatus, Node
from bootsvc.orchestrate import Decision, Facts, Op
from bootsvc.policy import PolicyBuildError, evpn_asn
from bootsvc.states import State

# The change feed's safety net: a full column scan of the working nodes this often (and at start),
# for what the feed cannot see - a PostgreSQL transaction committed more than PG_LAG_SECONDS after it
# wrote (``_since``), a row written around SQLAlchemy (no ``change_seq`` bump), a node deleted.
FULL_SCAN_SECONDS = 30.0
PG_LAG_SECONDS = 5.0
CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's bind-parameter limits

_WORK_STATES = frozenset(x.value for x in orchestrate.WORK_STATES - {State.POLICY_APPLIED})
_OVERRIDE_STATES = frozenset(x.value for x in orchestrate.BOOT_CONSUMED | orchestrate.AFTER_WIPE
                             | {State.POLICY_APPLIED})
# The nodes a pass looks at: working states, and a resting DPU or node whose boot override we set
# (``orchestrate.decide``: CLEAR_BOOT, FINISH_WIPE); ``_working`` is the same test on a fetched row.
_WORK = or_(Node.state.in_(sorted(_WORK_STATES)),
            Node.boot_override_set.is_(True) & Node.state.in_(sorted(_OVERRIDE_STATES)))


def _working(state: str, override: Any) -> bool:
    return state in _WORK_STATES or (bool(override) and state in _OVERRIDE_STATES)


def _parse(stored: Any, default: dt.datetime) -> dt.datetime:
    """A claim expiry as the driver returned it (SQLite: the stored text; PostgreSQL: a datetime)."""
    try:
        t = stored if isinstance(stored, dt.datetime) else dt.datetime.fromisoformat(str(stored))
    except ValueError:
        return default
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


# How often the drift feed reads the resting DPUs (policy_applied) whose policy inputs changed (tenant
# reassigned, a host edited, the agent reporting another version; static peer lists: a peer DPU
# added): a bound on how stale a resting DPU's policy may get. Every DRIFT_FULL_SECONDS the same keys
# of every resting DPU are compared (the feed's safety net); with static peer lists each resting DPU is
# also checked every DRIFT_SWEEP_SECONDS (``_drift_due``).
DRIFT_SECONDS = 10.0
DRIFT_FULL_SECONDS = 300.0
DRIFT_SWEEP_SECONDS = 300.0
_RESTING = (Node.state == State.POLICY_APPLIED) & Node.boot_override_set.is_not(True)
_TOP = select(func.coalesce(func.max(Node.change_seq), 0))
_MISMATCH = select(AgentStatus.node_id, AgentStatus.applied_version, AgentStatus.sent_version) \
    .where(AgentStatus.applied_version.is_distinct_from(AgentStatus.sent_version))
# Aliases are built once: building one costs ~0.5 ms of CPU (a proxy per column), every pass.
_HOST, _FEED_HOST, _FEED_DPU, _DPU_OF = aliased(Node), aliased(Node), aliased(Node), aliased(Node)


class ScanSteps:
    """The scan half of `bootsvc.conductor.Conductor` (which supplies what is declared here)."""

    config: Config
    name: str
    lease: dt.timedelta
    # working node id -> (signature, valid until, facts, decision) of its last decision; the
    # signatures of the free working nodes (kept between passes, updated from the change feed)
    _decided: dict[int, tuple[tuple[Any, ...], dt.datetime, Facts, Decision]]
    _sigs: dict[int, tuple[Any, ...]]
    # the change feed (``_changed``): free working nodes to load and decide again; those whose cached
    # decision is a step not yet taken; others' claims (id -> expiry); due times of cached decisions
    # (a heap: (when, id)); the feed's high-water mark and its recent values (PostgreSQL lag window);
    # when the next full scan is due; rows the last pass's scan read
    _dirty: set[int]
    _pending: dict[int, tuple[int, Facts, Decision]]  # id -> (its entry's token, facts, decision)
    _queues: tuple[list[tuple[tuple[Any, ...], int, int]], list[tuple[tuple[Any, ...], int, int]]]
    _token: int
    _held: dict[int, dt.datetime]
    _due: list[tuple[dt.datetime, int]]
    _mark: int | None
    _marks: deque[tuple[float, int]]
    _full_at: float
    scan_rows: int
    # the drift feed (``_drift_due``): resting DPU id -> its key (its row's and its host's change_seq);
    # the next tick, the next full drift scan, the feed's marks (the one read from, the last one), DPUs
    # another conductor held, agents running another version than the one handed out (id -> (applied,
    # sent)), the fleet's DPU set (static peers) and each resting DPU's next check anyway (static
    # peers: a heap and id -> its current time); rows the last drift read returned
    _drift: dict[int, tuple[Any, ...]]
    _drift_scan_at: dt.datetime | None
    _drift_full_at: dt.datetime | None
    _drift_marks: tuple[int, int]
    _drift_held: set[int]
    _drift_mismatch: dict[int, tuple[Any, Any]]
    _drift_fleet: tuple[Any, ...]
    _drift_sweep: list[tuple[dt.datetime, int]]
    _drift_sweep_at: dict[int, dt.datetime]
    _gated: set[int]  # resting DPUs whose host waits for their fabric (``facts``): checked every tick
    drift_rows: int

    def _is_pg(self, s: Session) -> bool:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _free(self, now: dt.datetime) -> Any:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _changed(self, s: Session, now: dt.datetime, busy: set[int]) -> list[int]:
        """The ids of the nodes a pass must load and decide again (the others keep their cached
        decision; those that are a step not yet taken wait in ``_pending``). Every FULL_SCAN_SECONDS (and first) a
        column scan of every working node compares signatures with the cached decisions; in between a
        pass reads only the change feed - rows whose ``change_seq`` passed the last pass's mark, and
        the hosts of DPUs among them - so it costs what changed, not the fleet. The signature is what
        ``facts`` reads from the row (ORM version, the bookkeeping columns ``_book`` writes without a
        version bump, the tenant) and for a host its DPUs' versions. Nodes in flight (``busy``) stay
        marked and are loaded once their step ended."""
        mono = time.monotonic()
        full = self._mark is None or mono >= self._full_at
        d = _DPU_OF
        cols = (Node.id, Node.version, Node.state, type_coerce(Node.next_check_at, String), Node.action_key,
                Node.bmc_task, Node.boot_override_set, Node.action_failures, Node.tenant_id,
                self._free(now), type_coerce(Node.claim_expires, String), Node.change_seq, d.id, d.version)
        if full:
            top = select(func.coalesce(func.max(Node.change_seq), 0)).scalar_subquery()
            q = select(*cols, top).outerjoin(d, d.host_id == Node.id).where(_WORK)
        else:
            since = self._since(mono)
            h = _FEED_DPU
            feed = or_(Node.change_seq > since,
                       Node.id.in_(select(h.host_id).where(h.change_seq > since, h.host_id.is_not(None))))
            # another conductor's claim ran out (it died?): look at those nodes again
            expired = [i for i, t in self._held.items() if t <= now][:CHUNK]
            for i in expired:
                del self._held[i]
            if expired:
                feed = or_(feed, Node.id.in_(expired))
            q = select(*cols, literal(0)).outerjoin(d, d.host_id == Node.id).where(feed)
        sigs: dict[int, tuple[Any, ...]] = {}
        meta: dict[int, tuple[Any, ...]] = {}  # id -> (state, boot_override_set, free, claim expiry)
        mark = self._mark or 0
        rows = 0
        for r in s.execute(q):
            rows += 1
            if full:
                mark = max(mark, r[14])
            elif r[11] > mark:
                mark = r[11]
            if r[12] is None or r[0] not in sigs:
                sigs[r[0]] = tuple(r[1:9])
                meta[r[0]] = (r[2], r[6], r[9], r[10])
            if r[12] is not None:
                sigs[r[0]] += ((r[12], r[13]),)
        self.scan_rows = rows
        if full:
            self._full_at = mono + FULL_SCAN_SECONDS
            self._rebuild(sigs, meta, now)
        else:
            for nid, sig in sigs.items():
                self._classify(nid, sig, meta[nid], now)
        self._advance(mark, mono, full, self._is_pg(s))
        while self._due and self._due[0][0] <= now:  # due times of cached decisions
            when, nid = heapq.heappop(self._due)
            c = self._decided.get(nid)
            if c is not None and c[1] == when and nid in self._sigs:
                self._dirty.add(nid)
                self._pending.pop(nid, None)
        return [i for i in self._dirty if i not in busy]

    def _classify(self, nid: int, sig: tuple[Any, ...], meta: tuple[Any, ...], now: dt.datetime) -> None:
        """One node's row from the feed: gone from the working states, held by another conductor, or
        free - then decided again if its signature differs from its cached decision's."""
        state, override, free, expires = meta
        if not _working(state, override) or not free:
            self._forget(nid)
            if _working(state, override):
                self._held[nid] = _parse(expires, now + self.lease)
            return
        self._held.pop(nid, None)
        self._sigs[nid] = sig
        c = self._decided.get(nid)
        if c is not None and c[0] == sig and now < c[1]:
            if c[3].op is not Op.WAIT and nid not in self._dirty and nid not in self._pending:
                self._enqueue(c[2], c[3])  # e.g. its step ended without acting (no power token)
            return
        self._dirty.add(nid)
        self._pending.pop(nid, None)

    def _rebuild(self, sigs: dict[int, tuple[Any, ...]], meta: dict[int, tuple[Any, ...]],
                 now: dt.datetime) -> None:
        """A full scan: every working node's signature against its cached decision (the feed's safety
        net), nodes no longer working forgotten."""
        for nid in [i for i in self._sigs if i not in sigs]:
            self._forget(nid)
        self._held = {}
        for nid, sig in sigs.items():
            self._classify(nid, sig, meta[nid], now)
        self._decided = {k: v for k, v in self._decided.items() if k in self._sigs}
        self._due = [(c[1], k) for k, c in self._decided.items()]
        heapq.heapify(self._due)

    def _forget(self, nid: int) -> None:
        self._sigs.pop(nid, None)
        self._decided.pop(nid, None)
        self._pending.pop(nid, None)
        self._dirty.discard(nid)

    def _since(self, mono: float) -> int:
        """The mark the feed reads from. SQLite: the last pass's - ``change_seq`` is computed under its
        one write lock, so a row committed after the last read has a higher value. PostgreSQL: writers
        compute it concurrently (two may take the same value) and commit in another order than they
        computed it, so the feed re-reads PG_LAG_SECONDS back (the mark of that long ago; rows whose
        signature did not change cost a row, not a decision); a transaction that commits later than
        that is caught by the next full scan (FULL_SCAN_SECONDS). Missing a change only delays a
        node: a step re-reads its node under its claim and decides again."""
        assert self._mark is not None
        if not self._marks:
            return self._mark
        while len(self._marks) > 1 and self._marks[1][0] <= mono - PG_LAG_SECONDS:
            self._marks.popleft()
        return self._marks[0][1]

    def _advance(self, mark: int, mono: float, full: bool, pg: bool) -> None:
        self._mark = mark
        if pg:
            if full:  # the scan's snapshot is no older than its mark: keep the window before it
                prior = self._marks[0][1] if self._marks else mark
                self._marks.clear()
                self._marks.append((mono - PG_LAG_SECONDS, min(prior, mark)))
            self._marks.append((mono, mark))

    # -- the steps decided and not yet taken, in the order the pass hands them out ------------------
    def _enqueue(self, f: Facts, d: Decision) -> None:
        """Queue a decided step (database-only or BMC) until a pass takes it (``_take``). The order is
        work in flight before new work (depth first): a step that finishes what a power-on started
        (clear a consumed override, poll a task) before a new power-on, a host's power-on (its DPUs are
        done) before a DPU's, then the oldest state entry. Breadth first, a storm's thousands of DPU
        power-ons would hold back every DPU waiting for its override to be cleared and every host:
        nothing deploys until the last DPU booted. The same for the database-only steps: a host
        provisioning its DPUs starts new work and goes after a DPU handed its policy or a host whose
        DPUs are done. A heap per kind: a pass pops the few it hands out, not the whole backlog."""
        self._token += 1
        self._pending[f.node_id] = (self._token, f, d)
        key = (d.op in POWER_ON_OPS or d.op is Op.PROVISION_DPU, f.kind != "host", f.state_since or f.now,
               f.node_id)
        heapq.heappush(self._queues[d.op not in DB_ONLY_OPS], (key, self._token, f.node_id))

    def _take(self, db_only: bool, room: int, busy: set[int],
              skip: Callable[[Facts, Decision], bool]) -> list[tuple[Facts, Decision]]:
        """Up to ``room`` queued steps of one kind, in order, leaving those ``skip`` refuses (a rack
        whose power budget is spent) and those in flight queued. Taken steps leave the queue: a step
        that ends without a change is queued again from the feed (``_classify``)."""
        heap = self._queues[not db_only]
        out: list[tuple[Facts, Decision]] = []
        back: list[tuple[tuple[Any, ...], int, int]] = []
        while heap and len(out) < room:
            e = heapq.heappop(heap)
            p = self._pending.get(e[2])
            if p is None or p[0] != e[1]:
                continue  # superseded or forgotten
            if e[2] in busy or skip(p[1], p[2]):
                back.append(e)
                continue
            del self._pending[e[2]]
            out.append((p[1], p[2]))
        for e in back:
            heapq.heappush(heap, e)
        if len(heap) > 2 * len(self._pending) + 1000:  # superseded entries: rebuild
            for q in self._queues:
                q[:] = [e for e in q if (p := self._pending.get(e[2])) is not None and p[0] == e[1]]
                heapq.heapify(q)
        return out

    def _note_due(self, nid: int, when: dt.datetime) -> None:
        heapq.heappush(self._due, (when, nid))
        if len(self._due) > 4 * len(self._decided) + 1000:  # superseded entries: rebuild
            self._due = [(c[1], k) for k, c in self._decided.items()]
            heapq.heapify(self._due)

    def _drift_due(self, s: Session, free: Any, now: dt.datetime) -> list[int]:
        """Resting DPUs (``policy_applied``: the whole fleet once deployed) whose policy must be compared
        with the wanted one. Their key is what ``policy_for`` reads besides the fixed config: the DPU's
        row version (its name, serial, tenant and host), its tenant, its host's tenant and the host
        addresses the policy exports. Every DRIFT_SECONDS the drift feed reads the keys of the resting
        DPUs whose own row or whose host's row was written since its last read (``change_seq``: a
        tenant move, an edit - ``operations.edit_node`` records an event, whose row lock bumps it, also
        when only the NICs changed); a DPU is checked when its key differs from the one it was last
        checked with (or it is new), not because its host's install went on. Agents running another
        version than the one handed out (``applied_version`` vs ``sent_version``) are compared in the
        database: only the mismatches come back, and each is checked when it first shows. So a resting
        DPU whose inputs did not change costs nothing: no load, no policy build, no claim, no write.
        Every DRIFT_FULL_SECONDS (and first) one column scan of every resting DPU compares the same keys
        - the net for a PostgreSQL commit later than the lag window and a row written around
        SQLAlchemy. With static peer lists a DPU's policy lists every DPU of its tenant and their host
        addresses: a change of the fleet's DPU set checks every resting DPU, and each is also checked
        every DRIFT_SWEEP_SECONDS (a peer's host address edited in place is on none of this DPU's rows)."""
        if self._drift_scan_at is not None and now < self._drift_scan_at:
            return []
        self._drift_scan_at = now + dt.timedelta(seconds=DRIFT_SECONDS)
        static = not self._evpn()
        fleet: tuple[Any, ...] = ()
        if static:  # static peers: every DPU's policy lists its tenant's DPUs
            fleet = tuple(s.execute(select(func.count(Node.id), func.max(Node.id),
                                           func.sum(func.coalesce(Node.tenant_id, 0) * Node.id))
                                    .where(Node.state != State.RETIRED)).one())
        full = self._drift_full_at is None or now >= self._drift_full_at or fleet != self._drift_fleet
        # read before the feed: on SQLite a row committed after this read has a higher change_seq
        top = int(s.scalar(_TOP) or 0)
        q = select(Node.id, Node.version, Node.tenant_id, Node.host_id, _HOST.tenant_id, free,
                   Node.state == State.POLICY_APPLIED, Node.boot_override_set) \
            .outerjoin(_HOST, Node.host_id == _HOST.id)
        held: list[int] = []
        if full:
            self._drift_full_at = now + dt.timedelta(seconds=DRIFT_FULL_SECONDS)
            q = q.where(_RESTING)
        else:
            since = self._drift_marks[0]
            feed = or_(Node.change_seq > since,
                       Node.host_id.in_(select(_FEED_HOST.id).where(_FEED_HOST.change_seq > since)))
            held = sorted(self._drift_held)[:CHUNK]
            if held:  # claimed by another conductor when last seen (it may die: no write then)
                feed = or_(feed, Node.id.in_(held))
            q = q.where(feed)  # resting is tested below: in SQL, SQLite would read every resting row
        due: set[int] = set()
        seen: dict[int, tuple[Any, ...]] = {}
        taken: set[int] = set()
        rows = s.execute(q).all()
        self.drift_rows = len(rows)
        found = [r[:6] for r in rows if r[6] and not r[7]]
        addresses = host_addresses(s, (r[3] for r in found if r[3] is not None and r[5]))
        for nid, version, tenant, host, host_tenant, is_free in found:
            if not is_free:
                taken.add(nid)
                continue
            key = (version, tenant, host, host_tenant, addresses.get(host, ()) if host is not None else ())
            if self._drift.get(nid) != key or fleet != self._drift_fleet:
                due.add(nid)
            seen[nid] = key
        if full:
            self._drift, self._drift_held = seen, taken
        else:
            self._drift.update(seen)
            self._drift_held = (self._drift_held - set(held) - set(seen)) | taken
        # SQLite: the mark read before this feed; PostgreSQL: the one before that (a tick, DRIFT_SECONDS,
        # is longer than PG_LAG_SECONDS: writers commit in another order than they computed change_seq)
        self._drift_marks = ((self._drift_marks[1] or top) if self._is_pg(s) else top, top)
        self._drift_fleet = fleet
        # the agent runs another version than the one handed out: compared in the database (a scan of
        # the narrow agent_status table; joined with nodes, SQLite would walk every resting row), then
        # the new mismatches of resting DPUs are checked once; those of other nodes are kept out of the
        # memory, to be checked if they come to rest with it
        mism = {nid: (applied, sent) for nid, applied, sent in s.execute(_MISMATCH)}
        new = sorted(nid for nid, v in mism.items() if self._drift_mismatch.get(nid) != v)
        resting: set[int] = set()
        for i in range(0, len(new), CHUNK):
            resting.update(s.scalars(select(Node.id).where(Node.id.in_(new[i:i + CHUNK]), _RESTING, free)))
        due |= resting
        self._drift_mismatch = {k: v for k, v in mism.items() if k in resting or self._drift_mismatch.get(k) == v}
        # a DPU whose host waits for its fabric report fails when the gate's deadline passes: a time,
        # on no row (the hosts waiting are decided every pass, and note them again)
        gated, self._gated = self._gated, set()
        due.update(i for i in gated if i in self._drift)
        if static:
            self._sweep(due, now)
        else:
            self._drift_sweep, self._drift_sweep_at = [], {}
        return sorted(due)

    def _sweep(self, due: set[int], now: dt.datetime) -> None:
        """Static peer lists: each resting DPU is checked at least every DRIFT_SWEEP_SECONDS (spread by
        node id); ``due`` gets those whose time came, and the checked ones their next time."""
        while self._drift_sweep and self._drift_sweep[0][0] <= now:
            when, nid = heapq.heappop(self._drift_sweep)
            if nid in self._drift and self._drift_sweep_at.get(nid) == when:
                due.add(nid)
        for nid in due:
            when = now + dt.timedelta(seconds=DRIFT_SWEEP_SECONDS + nid % 60)
            self._drift_sweep_at[nid] = when
            heapq.heappush(self._drift_sweep, (when, nid))
        if len(self._drift_sweep) > 2 * len(self._drift) + 1000:  # superseded entries: rebuild
            self._drift_sweep_at = {k: v for k, v in self._drift_sweep_at.items() if k in self._drift}
            self._drift_sweep = [(v, k) for k, v in self._drift_sweep_at.items()]
            heapq.heapify(self._drift_sweep)

    def _evpn(self) -> bool:
        try:
            return evpn_asn(self.config, 0) is not None
        except PolicyBuildError:
            return True
