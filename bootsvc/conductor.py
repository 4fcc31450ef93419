"""The conductor: a per-node reconciler that carries out what API calls and callbacks asked for.

Owns: finding nodes that need a step, claiming them so no two conductors act on one node at once,
gathering the facts ``bootsvc.orchestrate.decide`` needs, executing its decision (``lifecycle.apply``
here, BMC operations in `bootsvc.conductor_bmc`), recording the outcome (one structured log line per
decision and an event per BMC action), deadline/BMC-failure backoff bookkeeping, taking the site power
budget's tokens (`bootsvc.conductor_budget`), and the service runner ``run(config, index, stop)`` (which
also runs the outgoing-event delivery thread, ``bootsvc.events_out.Deliverer``, and prunes old history
every ``retention.interval_seconds`` with ``bootsvc.retention.prune``). What policy a DPU should run is
`bootsvc.conductor_policy`.

API calls and callbacks only record intent and events (``lifecycle.apply``); everything slow or
BMC-facing happens here. All state lives in the database, so a restarted conductor resumes every
node where it was: the per-state-entry ``action_key`` says whether this state's BMC step ran.

Claims. A node is claimed for the duration of one step by setting ``claimed_by``/``claim_expires``
with a conditional UPDATE (``... WHERE claimed_by IS NULL OR claim_expires < now``): exactly one of
several conductors wins, on SQLite and PostgreSQL alike. On PostgreSQL the row is first locked with
``SELECT ... FOR UPDATE SKIP LOCKED`` so a conductor never blocks behind another one's claim. A
claim that outlives a crashed conductor expires after ``orchestration.claim_seconds``; a conductor
restarted under the same name takes its own claims back at start.

Cost per pass (a storm is thousands of nodes; passes follow each other as steps end, at most every
``conductor.interval_seconds`` when idle): a read of the change feed (`conductor_scan`: the node rows
written since the last pass, and their hosts) gives each a signature (ORM version, bookkeeping
columns, a host's DPUs' versions); only nodes whose signature changed, or whose due time (deadline,
backoff, install timeout, ``DECISION_TTL_SECONDS``) came, are loaded as rows with their facts
prefetched in a few IN queries; the others keep their last decision, and steps decided but not yet
taken wait in a priority queue. A full column scan runs at start and every ``FULL_SCAN_SECONDS``.
Resting DPUs (``policy_applied``, the whole fleet once deployed) are checked when an input of their
policy changed: every ``DRIFT_SECONDS`` a drift feed reads those whose row or host's row was written
and those whose agent runs another version than the one handed out; an unchanged one costs nothing
(`conductor_scan._drift_due`). A step re-reads its node
under its claim and writes its outcome, bookkeeping and claim release in one transaction (SQLite has
one writer: every extra commit is a queue). In the service (``pipelined``) BMC steps run in a
long-lived pool (`conductor_pool`), so a pass never waits for a slow BMC; a pass claims up to
QUEUE_PER_WORKER steps per worker (running plus queued; ``power.max_concurrent_bmc`` when set), work in
flight before new power-ons, and a pool running low wakes the next pass: the pass cadence (its scan at
most a tenth of the time, PASS_SPACING) does not bound BMC steps per second. BMC sessions are kept
between the calls of a step (``power.session_idle_seconds``).

Why these parts are one module: one pass (find, claim, gather facts, decide, execute, book, release)
shares the node's claim, its database session and the bookkeeping columns; what does not share them is
in `conductor_scan` (the signature and drift scans that pick a pass's candidates), `conductor_pool`
(the BMC worker pool), `conductor_bmc` (BMC steps), `conductor_budget` (power tokens) and
`conductor_policy` (the DPU policy).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, lazyload, sessionmaker

from bootsvc import fabric, lifecycle, metrics, orchestrate, retention
from bootsvc.conductor_bmc import CLAIM_RELEASED, RELEASE_CLAIM, BmcSteps, StepError, aware
from bootsvc.conductor_budget import DB_ONLY_OPS, POWER_ON_OPS, BudgetSteps, PowerBudget
from bootsvc.conductor_policy import (
    TENANT_POLICY_STATES,
    PeerCache,
    PolicyMemo,
    host_addresses,
    policy_for,
    tenant_of,
    tenant_peers,
)
from bootsvc.conductor_pool import PoolSteps
from bootsvc.conductor_scan import DRIFT_SECONDS, ScanSteps
from bootsvc.config import Config
from bootsvc.db import make_engine, session_factory
from bootsvc.models import AgentStatus, Node
from bootsvc.orchestrate import Decision, DpuFacts, Facts, Op
from bootsvc.power.base import BmcError, PowerDriver
from bootsvc.states import IllegalTransition, State, Trigger, allowed_triggers

if TYPE_CHECKING:  # the Redfish modules load the redfish library: only when a Redfish BMC is used
    from bootsvc.power.redfish_session import SessionPool

__all__ = ["DRIFT_SECONDS", "TENANT_POLICY_STATES", "Conductor", "PowerBudget", "StepError", "policy_for",
           "run", "tenant_of", "tenant_peers"]

log = logging.getLogger("bootsvc.conductor")

DriverFactory = Callable[[Node, Config], PowerDriver]

metrics.describe("bootsvc_retention_pruned_total", "counter", "Rows pruned by the conductor, by kind.")
metrics.describe("bootsvc_bmc_sessions_total", "counter",
                 "Redfish operations of this conductor by session: login (a new session) or reused "
                 "(one kept from an earlier call, power.session_idle_seconds).")

# The ops that power a node on (they spend a rack power-on token) and those that never talk to a BMC
# live with the budget (conductor_budget).
def _default_driver(node: Node, config: Config) -> PowerDriver:
    from bootsvc.power import driver_for

    return driver_for(node, config)


# A cached decision is taken again at least this often, whatever its due times say: the net for an
# input on no row the signature covers. Every node waiting with a cached decision pays it once per TTL
# (a load, its facts, a decision): in a 10,000-pair storm ~7,000 hosts wait in host_waiting_dpu for
# up to ~850 s - at 120 s that was ~5 re-decisions per pair at 10k and none at 1k (a 70-s run).
DECISION_TTL_SECONDS = 600.0
# Pipelined: BMC steps claimed and handed to the pool per worker, at most (running plus queued). Steps
# against the storm's BMCs take ~10-50 ms each; a pass every ~0.1-1 s must leave enough queued for
# the workers to stay busy until the next one (45 BMC steps/s for 667 pairs/min, four per pair).
QUEUE_PER_WORKER = 4
# Database-only steps claimed and queued for their threads (``conductor_pool.DB_STEP_THREADS``) at
# once: a storm's first pass finds every host provisioning its DPUs; queued behind 10,000 of those, a
# DPU waiting for its policy would wait minutes (and the queued claims outlive their lease).
DB_STEPS_IN_FLIGHT = 64
# Built EVPN policies kept (``conductor_policy.PolicyMemo``): a storm hands out ~12 policies a second,
# and a DPU's first drift check comes within seconds of its dpu_ready build.
MEMO_DOCS = 2048
# Passes are spaced by this many times their scan's duration (``run``): at most a tenth of the time.
PASS_SPACING = 9


# ------------------------------------------------------------------------------------------ conductor
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_aware = aware

# Host states in which its DPUs' fabric still gates the boot (after that a drop is an event only).
FABRIC_WAITING = frozenset({State.HOST_WAITING_DPU, State.BLOCKED_BY_DPU})
# DPU states whose facts carry the wanted policy and the applied version (decide() reads neither in
# policy_pending: the agent has its policy and is applying it).
POLICY_FACT_STATES = frozenset({State.DPU_READY, State.POLICY_APPLIED})
PREFETCH_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's bind-parameter limits
_NODES = Node.metadata.tables["nodes"]  # ``_book``'s Core UPDATE


@dataclass(frozen=True, slots=True)
class _Prefetched:
    dpus: dict[int, tuple[DpuFacts, ...]]  # host id -> its DPUs, by id
    applied: dict[int, str | None]  # DPU id -> the policy version its agent reported applied
    addresses: dict[int, tuple[str, ...]] | None = None  # host id -> host prefixes (EVPN policies)


class Conductor(BmcSteps, BudgetSteps, ScanSteps, PoolSteps):
    def __init__(self, config: Config, sessions: sessionmaker[Session], *, name: str | None = None,
                 driver_factory: DriverFactory = _default_driver,
                 clock: Callable[[], dt.datetime] = _now) -> None:
        self.config, self.sessions = config, sessions
        self.name = name or f"{socket.gethostname()}/conductor"
        self.actor = f"conductor:{self.name}"
        self.driver_factory, self.clock = driver_factory, clock
        self.lease = dt.timedelta(seconds=config.orchestration.claim_seconds)
        self._last_wait: dict[int, str] = {}
        self._postgres: bool | None = None
        self._peer_cache: PeerCache = {}
        # the drift feed over the resting DPUs (``conductor_scan._drift_due``)
        self._drift: dict[int, tuple[Any, ...]] = {}
        self._drift_scan_at: dt.datetime | None = None
        self._drift_full_at: dt.datetime | None = None
        self._drift_marks = (0, 0)
        self._drift_held: set[int] = set()
        self._drift_mismatch: dict[int, tuple[Any, Any]] = {}
        self._drift_fleet: tuple[Any, ...] = ()
        self._drift_sweep: list[tuple[dt.datetime, int]] = []
        self._drift_sweep_at: dict[int, dt.datetime] = {}
        self._gated: set[int] = set()
        self.drift_rows = 0
        # working node id -> (signature, valid until, facts, decision) of its last decision, and the
        # signatures of the last scan (``_changed``)
        self._decided: dict[int, tuple[tuple[Any, ...], dt.datetime, Facts, Decision]] = {}
        self._sigs: dict[int, tuple[Any, ...]] = {}
        # the change feed and what it marked (``conductor_scan``)
        self._dirty: set[int] = set()
        self._pending: dict[int, tuple[int, Facts, Decision]] = {}
        self._queues: tuple[list[tuple[tuple[Any, ...], int, int]], list[tuple[tuple[Any, ...], int, int]]] = ([], [])
        self._token = 0
        self._held: dict[int, dt.datetime] = {}
        self._due: list[tuple[dt.datetime, int]] = []
        self._mark: int | None = None
        self._marks: deque[tuple[float, int]] = deque()
        self._full_at = 0.0
        self.scan_rows = 0
        # pipelined: BMC steps run in a long-lived pool while passes go on (``run_once``)
        self.pipelined = False
        self._pool: ThreadPoolExecutor | None = None
        self._db_pool: ThreadPoolExecutor | None = None
        self._running: set[int] = set()  # node ids with a step in a pool
        self._running_db: set[int] = set()  # those whose step is database-only
        self._running_lock = threading.Lock()
        self.wake = threading.Event()  # set when the pool runs low (``_low_water``): a pass should refill it
        self._low_water = 1
        self.scan_seconds = 0.0  # the last pass's scan and claims (run() spaces passes by it)
        self._budget: PowerBudget | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._next_prune: float | None = None
        self._rack_of: dict[int, str | None] = {}  # node id -> rack, from the last pass
        self._rack_spent: dict[str, float] = {}  # rack -> monotonic time before which its budget is spent
        self._memo = PolicyMemo(limit=MEMO_DOCS)  # built EVPN policies (conductor_policy)
        self.bmc_pool: SessionPool | None = None  # Redfish sessions kept between calls (_default_driver only)
        self._pool_seen = (0, 0)  # (logins, reused) already counted in bootsvc_bmc_sessions_total

    def _driver(self, n: Node) -> PowerDriver:
        """The node's power driver; the default (Redfish) one shares this conductor's session pool."""
        if self.driver_factory is not _default_driver:
            return self.driver_factory(n, self.config)
        from bootsvc.power import driver_for
        from bootsvc.power.redfish_session import SessionPool

        if self.bmc_pool is None and self.config.power.session_idle_seconds > 0:
            self.bmc_pool = SessionPool(idle_seconds=self.config.power.session_idle_seconds,
                                        known_seconds=self.config.power.discovery_seconds)
        return driver_for(n, self.config, pool=self.bmc_pool)

    def bmc_sessions_tick(self, *, close: bool = False) -> None:
        """Log out the BMC sessions idle too long (every pass), or all of them (``close``: at stop),
        and count logins/reuses in bootsvc_bmc_sessions_total."""
        pool = self.bmc_pool
        if pool is None:
            return
        try:
            pool.close() if close else pool.sweep()
        except Exception:  # a BMC gone away: its session expires there on its own
            log.exception("BMC session pool: logout failed")
        logins, reused = pool.logins, pool.reused
        if logins > self._pool_seen[0]:
            metrics.counters.inc("bootsvc_bmc_sessions_total", {"how": "login"}, logins - self._pool_seen[0])
        if reused > self._pool_seen[1]:
            metrics.counters.inc("bootsvc_bmc_sessions_total", {"how": "reused"}, reused - self._pool_seen[1])
        self._pool_seen = (logins, reused)

    # -- facts ---------------------------------------------------------------------------------------
    def facts(self, s: Session, n: Node, now: dt.datetime, *, fresh: bool = False,
              pre: _Prefetched | None = None) -> Facts:
        """``fresh``: a step's re-read (the node's own rows again; the pass's peer lists, at most one
        pass old, are reused: a peer that joined since is caught by the drift check).
        ``pre``: the pass's DPUs-per-host, applied versions and host addresses, read for all candidates
        at once."""
        c = self.config.conductor
        dpus: tuple[DpuFacts, ...] = ()
        pv = perr = applied = fabric_failed = None
        if n.kind == "host":
            if pre is not None:
                dpus = pre.dpus.get(n.id, ())
            else:
                dpus = tuple(DpuFacts(*r) for r in s.execute(  # columns: no DPU rows (and NICs) loaded
                    select(Node.id, Node.name, Node.state, Node.last_error).where(Node.host_id == n.id)
                    .order_by(Node.id)))
            if n.state in FABRIC_WAITING:  # docs/fabric.md: the host boots once its DPUs' fabric is real
                dpus = tuple(replace(d, fabric=self._fabric_wait(s, d.id, n, now))
                             if d.state == State.POLICY_APPLIED else d for d in dpus)
                # such a DPU's own decision depends on the time (its gate's deadline): checked every
                # drift tick while its host waits (``conductor_scan._drift_due``)
                self._gated.update(d.id for d in dpus if d.fabric)
        elif n.state in POLICY_FACT_STATES:
            doc, perr = policy_for(s, n, self.config, self._peer_cache,
                                   addresses=pre.addresses if pre is not None else None, memo=self._memo)
            pv = doc["version"] if doc else None
            if pre is not None:
                applied = pre.applied.get(n.id)
            else:
                st = s.get(AgentStatus, n.id)
                applied = st.applied_version if st is not None else None
            if self.config.fabric.gate_boot and n.state == State.POLICY_APPLIED and n.host is not None \
                    and n.host.state in FABRIC_WAITING:
                v = self._fabric_verdict(s, n, n.host, doc, now)
                fabric_failed = v.reason() if v is not None and v.expired else None
        return Facts(
            node_id=n.id, name=n.name, kind=n.kind, state=n.state, now=now, attempts=n.attempts,
            deadline=_aware(n.deadline), state_since=_aware(n.state_since), action_key=n.action_key,
            action_failures=n.action_failures or 0, next_check_at=_aware(n.next_check_at), bmc_task=n.bmc_task,
            boot_override_set=bool(n.boot_override_set),
            provision_method=n.provision_method or self.config.boot.provision_method, dpus=dpus,
            tenant=n.tenant.name if n.tenant is not None else None,
            policy_version=pv, policy_error=perr, applied_version=applied, fabric_failed=fabric_failed,
            max_attempts=c.max_attempts,
            backoff_seconds=c.backoff_seconds, install_timeout=self.config.power.install_timeout)

    # -- the fabric gate (docs/fabric.md) ------------------------------------------------------------
    def _fabric_verdict(self, s: Session, dpu: Node, host: Node, doc: dict[str, Any] | None,
                        now: dt.datetime) -> fabric.Verdict | None:
        """The DPU's last fabric report against the policy bootsvc wants on it; the deadline counts
        from the later of the DPU's policy_applied and its host starting to wait."""
        st = s.get(AgentStatus, dpu.id)
        since = max((t for t in (_aware(dpu.state_since), _aware(host.state_since)) if t is not None), default=now)
        return fabric.dpu_gate(self.config, doc, st.health if st is not None else None, applied_since=since,
                               now=now)

    def _fabric_wait(self, s: Session, dpu_id: int, host: Node, now: dt.datetime) -> str | None:
        """Why the host may not boot yet although this DPU applied the policy (None: it may)."""
        if not self.config.fabric.gate_boot:  # fabric.dpu_gate: no gate, nothing to read
            return None
        dpu = s.get(Node, dpu_id)
        if dpu is None:
            return None
        doc, _err = policy_for(s, dpu, self.config, self._peer_cache)
        v = self._fabric_verdict(s, dpu, host, doc, now)
        return None if v is None or v.ready else v.reason()

    # -- claims --------------------------------------------------------------------------------------
    def _is_pg(self, s: Session) -> bool:
        if self._postgres is None:
            self._postgres = s.get_bind().dialect.name == "postgresql"
        return self._postgres

    def _free(self, now: dt.datetime) -> Any:
        return or_(Node.claimed_by.is_(None), Node.claim_expires < now, Node.claimed_by == self.name)

    def claim(self, node_id: int) -> bool:
        return node_id in self.claim_many([node_id])

    def claim_many(self, node_ids: list[int]) -> set[int]:
        """Claim the nodes of one pass together: one conditional UPDATE ... RETURNING per
        PREFETCH_CHUNK ids (on PostgreSQL after locking the free ones with SKIP LOCKED), one commit.
        Returns the ids this conductor now holds."""
        now = self.clock()
        won: set[int] = set()
        with self.sessions() as s:
            for i in range(0, len(node_ids), PREFETCH_CHUNK):
                want = node_ids[i:i + PREFETCH_CHUNK]
                if self._is_pg(s):
                    want = list(s.scalars(select(Node.id).where(Node.id.in_(want), self._free(now))
                                          .with_for_update(skip_locked=True)))
                if want:
                    won.update(s.scalars(update(Node).where(Node.id.in_(want), self._free(now))
                                         .values(claimed_by=self.name, claim_expires=now + self.lease)
                                         .returning(Node.id).execution_options(synchronize_session=False)))
            s.commit()
        return won

    def release(self, node_id: int) -> None:
        with self.sessions() as s:
            self._unclaim(s, node_id)
            s.commit()

    def _unclaim(self, s: Session, node_id: int) -> None:
        """Give the claim back in ``s``'s transaction (a step's last write)."""
        s.execute(update(Node).where(Node.id == node_id, Node.claimed_by == self.name)
                  .values(claimed_by=None, claim_expires=None).execution_options(synchronize_session=False))

    def reclaim_own(self) -> int:
        """At start: claims held under this conductor's name are from its previous life."""
        with self.sessions() as s:
            res = s.execute(update(Node).where(Node.claimed_by == self.name)
                            .values(claimed_by=None, claim_expires=None).execution_options(synchronize_session=False))
            s.commit()
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # -- one pass ------------------------------------------------------------------------------------
    def candidates(self, busy: frozenset[int] | set[int] = frozenset()) -> list[Facts]:
        """The facts of every node this pass must decide for: those whose row (or a host's DPUs) changed
        since their last decision, whose due time came, and the resting DPUs whose drift check is due.
        A node decided earlier with the same signature keeps its cached facts (``_decided``): a pass
        costs a read of the change feed plus the rows of what changed (``conductor_scan``), not a load
        of every node in flight. Nodes in ``busy`` (a step in flight) are loaded once it ended."""
        now = self.clock()
        self._peer_cache = {}
        free = self._free(now)
        # Nics are not facts, and a Node's default is to load them with it (an IN query) and its tenant
        # joined (the tenant's JSON prefixes decoded once per row): a pass of thousands of nodes reads
        # plain rows, and a tenant, or the host of a DPU without a tenant of its own, comes from the
        # session's identity map (tenants: one query each; hosts: see below).
        rows = (lazyload(Node.nics), lazyload(Node.tenant), lazyload(Node.host))
        with self.sessions() as s:
            ids = self._changed(s, now, set(busy))
            ids += self._drift_due(s, free, now)
            todo: list[Node] = []
            for i in range(0, len(ids), PREFETCH_CHUNK):
                todo += s.scalars(select(Node).options(*rows).where(Node.id.in_(ids[i:i + PREFETCH_CHUNK])))
            # the hosts of DPUs without a tenant of their own, in one IN query per chunk (not one lazy
            # load per DPU): tenant_of() then finds them in the identity map
            # (held in ``loaded`` until the facts are built: the identity map keeps objects only as long as
            # something else does, and a host dropped here would be lazy-loaded again per DPU, NICs too)
            hosts = sorted({n.host_id for n in todo if n.kind == "dpu" and n.tenant_id is None and n.host_id})
            loaded: list[Node] = []
            for i in range(0, len(hosts), PREFETCH_CHUNK):
                loaded += s.scalars(select(Node).options(*rows).where(Node.id.in_(hosts[i:i + PREFETCH_CHUNK])))
            if len(todo) < len(ids):  # deleted since the feed saw them
                for i in set(ids) - {n.id for n in todo}:
                    self._forget(i)
            for n in todo:
                self._rack_of[n.id] = n.rack
            pre = self._prefetch(s, todo)
            out = [self.facts(s, n, now, pre=pre) for n in todo]
            del loaded
            return out

    def _prefetch(self, s: Session, nodes: list[Node]) -> _Prefetched:
        """What ``facts`` needs beyond the node row, for every candidate of a pass in a few queries
        (one per PREFETCH_CHUNK ids) instead of one or two per node: hosts' DPUs, DPUs' applied versions,
        and with EVPN the host addresses each DPU's policy exports."""
        hosts = [n.id for n in nodes if n.kind == "host"]
        dpu_rows = [n for n in nodes if n.kind != "host" and n.state in POLICY_FACT_STATES]
        dpus = [n.id for n in dpu_rows]
        addresses = host_addresses(s, (n.host_id for n in dpu_rows if n.host_id is not None)) \
            if self._evpn() else None
        pre = _Prefetched({}, {}, addresses)
        for i in range(0, len(hosts), PREFETCH_CHUNK):
            found = s.execute(select(Node.host_id, Node.id, Node.name, Node.state, Node.last_error)
                              .where(Node.host_id.in_(hosts[i:i + PREFETCH_CHUNK])).order_by(Node.id))
            acc: dict[int, list[DpuFacts]] = {}
            for host_id, dpu_id, name, state, last_error in found:
                if host_id is not None:
                    acc.setdefault(host_id, []).append(DpuFacts(dpu_id, name, state, last_error))
            pre.dpus.update((k, tuple(v)) for k, v in acc.items())
        for i in range(0, len(dpus), PREFETCH_CHUNK):
            for node_id, version in s.execute(select(AgentStatus.node_id, AgentStatus.applied_version)
                                              .where(AgentStatus.node_id.in_(dpus[i:i + PREFETCH_CHUNK]))):
                pre.applied[node_id] = version
        return pre

    def run_once(self) -> int:
        """Look at every node that may need a step; act on those that do (claimed nodes in parallel,
        ``orchestration.workers`` at a time: one slow BMC must not hold up the others). Returns steps
        taken (``pipelined``: steps handed to the pools, BMC and database-only).

        Not ``pipelined`` (tests): the pass waits for all its steps. ``pipelined`` (the service): BMC
        steps go to a long-lived pool and the pass returns at once, so the next pass finds the DPUs
        waiting for their policy while slow BMCs are still answering; a node in flight is not looked at
        again until its step ended."""
        todo: list[int] = []
        quick: list[int] = []  # database-only steps (policy, transitions)
        # BMC steps in flight from this conductor (running or claimed and queued for a worker): the power
        # budget's cap (a step beyond it would only be deferred), else QUEUE_PER_WORKER per worker when
        # pipelined - the pool must not run dry between passes -, two per worker when a pass waits for its
        # steps. Without a bound thousands of claimed nodes of a storm would sit in the queue.
        workers = self.config.orchestration.workers
        cap = self.config.power.max_concurrent_bmc or (QUEUE_PER_WORKER if self.pipelined else 2) * workers
        self._low_water = max(1, min(cap // 2, workers))
        with self._running_lock:
            busy = set(self._running)
            db_steps = len(self._running_db)
            bmc_steps = len(busy) - db_steps
        mono = time.monotonic()
        started = mono
        for f in self.candidates(busy):
            if f.node_id in busy:
                continue
            d = orchestrate.decide(f)
            self._remember(f, d)
            if d.op is Op.WAIT and self._last_wait.get(f.node_id) != f"{f.state}:{d.reason}":
                self._last_wait[f.node_id] = f"{f.state}:{d.reason}"
                self._log(f, d, "waiting")
        # Steps decided now or earlier and not yet taken wait in two queues, work in flight first
        # (``conductor_scan._enqueue``). A BMC step that cannot get a power token this pass is not
        # claimed at all (claiming, re-reading and releasing it costs a few queries each, for nothing):
        # at most ``cap`` per pass from this conductor, none for a rack whose budget was found spent
        # < 1 s ago. Database-only steps: at most DB_STEPS_IN_FLIGHT claimed and queued when pipelined.
        def spent(f: Facts, d: Decision) -> bool:
            rack = self._rack_of.get(f.node_id)
            return bool(d.op in POWER_ON_OPS and rack and self._rack_spent.get(rack, 0.0) > mono)

        chosen = self._take(True, DB_STEPS_IN_FLIGHT - db_steps if self.pipelined else len(self._pending),
                            busy, lambda f, d: False)
        chosen += self._take(False, cap - bmc_steps, busy, spent)
        won = self.claim_many([f.node_id for f, _ in chosen])
        for f, d in chosen:
            if f.node_id not in won:
                self._log(f, d, "skipped: claimed by another conductor")
                self._dirty.add(f.node_id)  # read it again (the feed shows the claim; or it is gone)
                continue
            (todo if d.op not in DB_ONLY_OPS else quick).append(f.node_id)
        self.scan_seconds = time.monotonic() - started
        if self.pipelined:
            # BMC steps to their pool, database-only ones to theirs (``conductor_pool``): the pass does
            # not wait for the database's writer either
            for i in todo:
                self._submit(i)
            for i in quick:
                self._submit(i, db_only=True)
            return len(todo) + len(quick)
        todo = quick + todo
        if len(todo) <= 1 or self.config.orchestration.workers == 1:
            return sum(self._claimed_step(i) for i in todo)
        with ThreadPoolExecutor(max_workers=min(len(todo), self.config.orchestration.workers),
                                thread_name_prefix="conductor-step") as pool:
            return sum(pool.map(self._claimed_step, todo))

    def _remember(self, f: Facts, d: Decision) -> None:
        """Keep a decision for the passes that find the node's signature unchanged, until the first
        time it depends on (deadline, backoff, install timeout) or DECISION_TTL_SECONDS. Not kept: a
        DPU handed its policy (short-lived), a host gated by its DPUs' fabric reports (not in the
        signature) and nodes the scan did not see (drift checks)."""
        sig = self._sigs.get(f.node_id)
        self._pending.pop(f.node_id, None)
        if sig is None or f.state == State.DPU_READY or (
                self.config.fabric.gate_boot and f.state in FABRIC_WAITING):
            self._decided.pop(f.node_id, None)  # stays in ``_dirty``: decided again next pass
            if d.op is not Op.WAIT:
                self._enqueue(f, d)  # this pass may take it
            return
        wake = f.now + dt.timedelta(seconds=DECISION_TTL_SECONDS)
        for t in (f.deadline, f.next_check_at):
            if t is not None and t < wake:
                wake = t
        since = orchestrate.os_wait_since(f.bmc_task)
        if since is not None:
            wake = min(wake, dt.datetime.fromtimestamp(since + f.install_timeout, dt.UTC))
        self._decided[f.node_id] = (sig, wake, f, d)
        self._dirty.discard(f.node_id)
        self._note_due(f.node_id, wake)
        if d.op is not Op.WAIT:
            self._enqueue(f, d)

    def _claimed_step(self, node_id: int) -> int:
        try:
            return self.step(node_id, release=True)
        except BaseException:  # the step could not give its claim back in its own commit
            self.release(node_id)
            raise

    def step(self, node_id: int, *, release: bool = False) -> int:
        """Re-read the claimed node, decide again (it may have moved), execute. 1 if it acted.

        The step's outcome - its event, the bookkeeping, and with ``release`` the claim given back - is
        one write transaction (one write lock on SQLite, where every writer queues on one lock); only
        what must be durable before a BMC call commits earlier (the ``~sent`` marker, a secret rotation)."""
        with self.sessions() as s:
            # its NICs are no fact and no BMC step reads them: not loaded (one IN query less per step)
            n = s.get(Node, node_id, options=[lazyload(Node.nics)])
            if n is None:
                return 0
            f = self.facts(s, n, self.clock(), fresh=True)
            d = orchestrate.decide(f)
            tokens = self._take_tokens(s, n, f, d) if d.op is not Op.WAIT else None
            if tokens is None:
                if release:
                    self._unclaim(s, node_id)
                    s.commit()
                return 0
            self._last_wait.pop(node_id, None)
            released = False
            try:
                if release:  # a BMC step's outcome gives the claim back in its own UPDATE (conductor_bmc)
                    s.info[RELEASE_CLAIM] = self.name
                outcome = self.execute(s, n, f, d)
                if release and s.info.pop(CLAIM_RELEASED, None) != node_id:
                    self._unclaim(s, node_id)
                s.commit()
                released = release
            except (lifecycle.TransitionConflict, IllegalTransition) as e:
                s.rollback()
                outcome = f"not applied, will re-read: {e}"
            except Exception as e:  # a bug or a database error: log it, leave the node for the next pass
                s.rollback()
                log.exception("step failed node=%s state=%s action=%s", f.name, f.state, d.describe())
                outcome = f"error: {type(e).__name__}: {e}"
            finally:
                self._give_back(tokens)  # after the commit: the budget's rows are written by other sessions
            if release and not released:
                self._unclaim(s, node_id)
                s.commit()
            self._log(f, d, outcome)
            return 1

    def _defer(self, f: Facts, d: Decision, reason: str, why: str) -> None:
        metrics.counters.inc("bootsvc_power_deferred_total", {"reason": reason})
        if self._last_wait.get(f.node_id) != f"{f.state}:budget:{reason}":
            self._last_wait[f.node_id] = f"{f.state}:budget:{reason}"
            self._log(f, d, f"deferred: {why}")

    # -- retention -----------------------------------------------------------------------------------
    def maybe_prune(self, monotonic: Callable[[], float] = time.monotonic) -> bool:
        """Prune old history (``bootsvc.retention``) at start and then every ``retention.interval_seconds``;
        idempotent, so several conductors doing it is harmless. True if it ran."""
        now = monotonic()
        if self._next_prune is not None and now < self._next_prune:
            return False
        self._next_prune = now + self.config.retention.interval_seconds
        try:
            with self.sessions() as s:
                r = retention.prune(s, self.config.retention)
        except Exception:  # database down: try again at the next interval
            log.exception("retention prune failed; next try in %gs", self.config.retention.interval_seconds)
            return True
        for kind in ("leases_expired", "leases", "outbox", "events", "webhooks", "sessions"):
            if getattr(r, kind):
                metrics.counters.inc("bootsvc_retention_pruned_total", {"kind": kind}, getattr(r, kind))
        return True

    def _log(self, f: Facts, d: Decision, outcome: str) -> None:
        log.info("decision node=%s kind=%s state=%s attempts=%d action=%s reason=%r outcome=%r conductor=%s",
                 f.name, f.kind, f.state, f.attempts, d.describe(), d.reason, outcome, self.name)

    # -- execution -----------------------------------------------------------------------------------
    def _apply(self, s: Session, n: Node, trigger: Trigger, reason: str, detail: dict[str, Any] | None = None,
               commit: bool = False) -> str:
        c = self.config.conductor
        before = n.state
        # the transition and its bookkeeping in one transaction (one write lock on SQLite, not two)
        ev = lifecycle.apply(s, n, trigger, actor=self.actor, detail={"reason": reason, **(detail or {})},
                             max_attempts=c.max_attempts, deadlines=c.deadlines, commit=False,
                             now=self.clock())
        if trigger is Trigger.TIMEOUT and ev.to_state == before:
            # retry in place: the step is redone after a backoff (attempts already counts this one)
            self._book(s, n.id, next_check_at=self.clock() + dt.timedelta(
                seconds=orchestrate.retry_delay(c.backoff_seconds, n.attempts - 1)), action_failures=0,
                commit=False)
        elif ev.to_state != before:
            self._book(s, n.id, action_failures=0, next_check_at=None, bmc_task=None, commit=False)
        if commit:
            s.commit()
        return f"{ev.from_state} -> {ev.to_state}"

    def _book(self, s: Session, node_id: int, *, commit: bool = False, **values: Any) -> None:
        """Conductor bookkeeping without a version bump (it is not a state change). Like ``_apply`` and
        ``_record``, left to ``step``'s one commit unless ``commit`` (a write that must be durable before
        the next BMC call: a step never holds the database's write lock across a BMC call).

        A Core UPDATE of the table (attribute names are column names): the ORM's bulk UPDATE costs about
        twice its CPU (measured ~230 vs ~150 us per statement on SQLite) in evaluating and synchronising
        the session, which a bookkeeping write that never touches the loaded Node does not need. Changes
        pending on loaded objects are flushed first, as the ORM statement's autoflush did: a later flush
        must not overwrite what is booked here."""
        if s.dirty:
            s.flush()
        s.execute(update(_NODES).where(_NODES.c.id == node_id).values(**values))
        if commit:
            s.commit()

    def _record(self, s: Session, n: Node, note: str, detail: dict[str, Any], commit: bool = False) -> None:
        lifecycle.record(s, n, note, actor=self.actor, detail=detail, now=self.clock(), commit=commit)

    def execute(self, s: Session, n: Node, f: Facts, d: Decision) -> str:
        if d.op is Op.APPLY:
            assert d.trigger is not None
            return self._apply(s, n, d.trigger, d.reason, dict(d.detail))
        if d.op is Op.PROVISION_DPU:
            dpu = s.get(Node, d.target_id, options=[lazyload(Node.nics)])
            if dpu is None:
                return "DPU vanished"
            out = self._apply(s, dpu, Trigger.PROVISION, f"host {n.name} waits for it")
            return f"DPU {dpu.name}: {out}"
        if d.op is Op.SEND_POLICY:
            assert d.trigger is not None
            version = d.detail["policy_version"]
            st = s.get(AgentStatus, n.id) or AgentStatus(node_id=n.id, health={})
            st.sent_version = version
            s.add(st)
            return self._apply(s, n, d.trigger, d.reason, dict(d.detail))
        try:
            return self._bmc_step(s, n, f, d)
        except BmcError as e:
            s.rollback()
            n = s.get(Node, n.id) or n
            eo = orchestrate.on_bmc_error(f, d.op, e.retryable, str(e))
            self._record(s, n, "bmc_error", {"action": d.op.value, "error": str(e), "retryable": e.retryable,
                                             "failures": eo.failures})
            if eo.trigger is not None:
                self._book(s, n.id, action_failures=0)
                return "BMC failed: " + self._apply(s, n, eo.trigger, eo.reason, {"action": d.op.value})
            if eo.retry_in is not None:
                self._book(s, n.id, action_failures=eo.failures,
                           next_check_at=self.clock() + dt.timedelta(seconds=eo.retry_in))
                return f"BMC error, retry in {eo.retry_in:g}s: {e}"
            if d.op is Op.FINISH_WIPE:
                # the BMC gave up, the secret rotation must not: the erase token dies with the wipe
                n.secret_generation += 1
                s.commit()
                self._record(s, n, "wipe_finished", {"bmc": "failed", "secret_rotated": True})
                self._book(s, n.id, action_failures=0, boot_override_set=False)
            elif d.op is Op.CLEAR_BOOT:
                self._book(s, n.id, action_failures=0, boot_override_set=False)
            else:
                self._book(s, n.id, action_failures=0, action_key=d.key)
            return f"BMC error, action given up: {eo.reason}"
        except StepError as e:
            s.rollback()
            n = s.get(Node, n.id) or n
            if e.trigger in allowed_triggers(n.kind, n.state):
                return "failed: " + self._apply(s, n, e.trigger, e.reason)
            return f"cannot run: {e.reason}"


# ------------------------------------------------------------------------------------------ service
def default_name(config: Config, listener_index: int) -> str:
    """The conductor's claim name when ``BOOTSVC_CONDUCTOR_NAME`` is unset: stable across restarts of one
    instance (so ``reclaim_own`` takes back its previous run's claims at once) and distinct for instances
    that share a hostname (containers, network namespaces) but not a state directory - two live conductors
    with one name would each treat the other's claims as their own."""
    where = hashlib.sha256(os.path.realpath(config.state_dir).encode()).hexdigest()[:8]
    return f"{socket.gethostname()[:64]}/conductor{listener_index}-{where}"


def run(config: Config, listener_index: int, stop: threading.Event,
        *, driver_factory: DriverFactory = _default_driver) -> None:
    """Service runner (``bootsvc.daemon``): reconcile nodes and deliver events until ``stop`` is set."""
    from bootsvc.events_out import Deliverer

    sessions = session_factory(make_engine(config.database.url))
    name = os.environ.get("BOOTSVC_CONDUCTOR_NAME") or default_name(config, listener_index)
    cond = Conductor(config, sessions, name=name, driver_factory=driver_factory)
    cond.pipelined = True
    taken = cond.reclaim_own()
    log.info("conductor %s started (pid %d), took back %d claim(s) of its previous run", name, os.getpid(), taken)
    o = config.orchestration
    deliverer = Deliverer(sessions, owner=name, timeout=o.delivery_timeout_seconds,
                          backoff_base=o.delivery_backoff_seconds, backoff_max=o.delivery_backoff_max_seconds)
    t = threading.Thread(target=deliverer.run, args=(stop,), name="event-delivery", daemon=True)
    t.start()
    interval = config.conductor.interval_seconds
    while not stop.is_set():
        cond.maybe_prune()
        cond.bmc_sessions_tick()
        cond.scan_seconds = 0.0
        try:
            acted = cond.run_once()
        except Exception:  # database down, etc.: keep going, the next pass retries
            log.exception("conductor pass failed")
            acted = 0
        # A pass (its feed read, decisions and claims, not the steps it hands out) takes at most a tenth
        # of the time, at most 20 passes per second (a full scan, every FULL_SCAN_SECONDS, reads every
        # working node: ~100 ms at 20,000). The BMC pool running low (a pooled step ending with at most
        # ``_low_water`` left) ends the wait early - the pass cadence is not what bounds BMC steps per
        # second - but not sooner than two scans' time; with nothing to do, the wait is the interval.
        scan = cond.scan_seconds
        cond.wake.wait(min(interval, max(0.05, PASS_SPACING * scan)) if acted else interval)
        cond.wake.clear()
        stop.wait(max(0.02, 2 * scan))  # a burst of step ends is one pass, not one each
    cond.close()
    cond.bmc_sessions_tick(close=True)  # no session left open on any BMC
    t.join(timeout=10)
    log.info("conductor %s stopped", name)
