"""The conductor: a per-node reconciler that carries out what API calls and callbacks asked for.

Owns: finding nodes that need a step, claiming them so no two conductors act on one node at once,
gathering the facts ``bootsvc.orchestrate.decide`` needs, executing its decision (power driver calls,
``lifecycle.apply``), recording the outcome (one structured log line per decision and an event per BMC
action), deadline/BMC-failure backoff bookkeeping, and the service runner ``run(config, index, stop)``
(which also runs the outgoing-event delivery thread, ``bootsvc.events_out.Deliverer``, and prunes old
history every ``retention.interval_seconds`` with ``bootsvc.retention.prune``), and the site power
budget (``PowerBudget``) every BMC step passes through.

API calls and callbacks only record intent and events (``lifecycle.apply``); everything slow or
BMC-facing happens here. All state lives in the database, so a restarted conductor resumes every
node where it was: the per-state-entry ``action_key`` says whether this state's BMC step ran.

Claims. A node is claimed for the duration of one step by setting ``claimed_by``/``claim_expires``
with a conditional UPDATE (``... WHERE claimed_by IS NULL OR claim_expires < now``): exactly one of
several conductors wins, on SQLite and PostgreSQL alike. On PostgreSQL the row is first locked with
``SELECT ... FOR UPDATE SKIP LOCKED`` so a conductor never blocks behind another one's claim. A
claim that outlives a crashed conductor expires after ``orchestration.claim_seconds``; a conductor
restarted under the same name takes its own claims back at start.

Power budget. Powering on a whole data hall at once overloads rack PDUs and the BMC network, so a
BMC step first takes a token of the site-wide concurrency cap (``power.max_concurrent_bmc``, held
for the step) and, when it powers a node on, one of its rack's power-on tokens
(``power.rack_power_ons`` per ``power.rack_window_seconds``). Tokens are rows of ``power_slots``
taken with the same conditional UPDATE as claims, so every conductor on one database shares them;
a step without a token is deferred to a later pass (not failed), counted in
``bootsvc_power_deferred_total``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import fabric, lifecycle, metrics, orchestrate, retention
from bootsvc.config import Config
from bootsvc.db import make_engine, session_factory
from bootsvc.models import AgentStatus, Nic, Node, PowerSlot
from bootsvc.orchestrate import Decision, DpuFacts, Facts, Op
from bootsvc.policy import Peer, PolicyBuildError, TenantInfo, build
from bootsvc.power.base import BmcError, BootTarget, DpuMode, FatalBmcError, PowerDriver, PowerState, TaskHandle
from bootsvc.states import IllegalTransition, State, Trigger, allowed_triggers

log = logging.getLogger("bootsvc.conductor")

DriverFactory = Callable[[Node, Config], PowerDriver]

metrics.describe("bootsvc_power_ons_total", "counter",
                 "Power-ons (network boot, BFB push, erase boot, reboot) sent by this conductor, by rack.")
metrics.describe("bootsvc_power_deferred_total", "counter",
                 "BMC steps put off to a later pass for want of a power-budget token, by reason "
                 "(rack: power.rack_power_ons spent in this window; global: power.max_concurrent_bmc in flight).")
metrics.describe("bootsvc_bmc_in_flight", "gauge", "BMC steps this conductor runs right now.")
metrics.describe("bootsvc_retention_pruned_total", "counter", "Rows pruned by the conductor, by kind.")

# The ops that power a node on (they spend a rack power-on token); every op but these and the pure
# database ones talks to a BMC (and takes a global concurrency token).
POWER_ON_OPS = frozenset({Op.BOOT_NETWORK, Op.PUSH_BFB, Op.WIPE, Op.REBOOT})
DB_ONLY_OPS = frozenset({Op.WAIT, Op.APPLY, Op.PROVISION_DPU, Op.SEND_POLICY})
# After a rack's power-on token was refused, its power-ons are not tried again for this long.
RACK_RECHECK_SECONDS = 1.0


def _default_driver(node: Node, config: Config) -> PowerDriver:
    from bootsvc.power import driver_for

    return driver_for(node, config)


# How often a DPU resting in policy_applied is compared with the policy bootsvc wants now (tenant
# reassigned, a peer DPU added): a bound on how stale a resting DPU's policy may get.
DRIFT_SECONDS = 10.0
# How often a DPU whose BFB was transferred is asked for its OS state (BootProgress.OemLastState is
# refreshed about every 30 s, bluefield-real.md §3.6).
OS_POLL_SECONDS = 15.0


class StepError(Exception):
    """A step that cannot run for a reason other than the BMC (e.g. no image): fail via ``trigger``."""

    def __init__(self, trigger: Trigger, reason: str) -> None:
        super().__init__(reason)
        self.trigger, self.reason = trigger, reason


# ------------------------------------------------------------------------------------------ policy
def tenant_of(node: Node) -> TenantInfo | None:
    """A DPU serves its own tenant, else its host's."""
    t = node.tenant or (node.host.tenant if node.host is not None else None)
    return TenantInfo(t.name, t.vrf, t.l3vni, t.table) if t is not None else None


PeerCache = dict[str, list[Peer]]


def tenant_peers(session: Session, tenant: TenantInfo, config: Config) -> list[Peer]:
    """Every DPU of the tenant (its own or its host's): VTEP and the reserved host addresses behind it.
    Two queries whatever the fleet size; callers filter out the asking DPU's own VTEP."""
    from bootsvc.policy import vtep_for

    dpus = [d for d in session.scalars(select(Node).where(Node.kind == "dpu", Node.state != State.RETIRED)
                                       .order_by(Node.id))
            if (t := tenant_of(d)) is not None and t.name == tenant.name]
    hosts = {d.host_id for d in dpus if d.host_id is not None}
    addrs: dict[int, list[str]] = {}
    if hosts:
        for host_id, ip in session.execute(select(Nic.node_id, Nic.ipv4).where(
                Nic.node_id.in_(hosts), Nic.role == "host-pf", Nic.ipv4.is_not(None))):
            addrs.setdefault(host_id, []).append(f"{ip}/32")
    out: list[Peer] = []
    for d in dpus:
        try:
            vtep = str(vtep_for(config, d.id))
        except PolicyBuildError:
            continue
        out.append(Peer(vtep, tuple(sorted(addrs.get(d.host_id or -1, [])))))
    return out


# A DPU gets its tenant's policy only while it is being or has been set up for the tenant; in every
# other state (installing, released, maintenance ...) the host port stays isolated (fail closed).
TENANT_POLICY_STATES = frozenset({State.DPU_READY, State.POLICY_PENDING, State.POLICY_APPLIED,
                                  State.POLICY_FAILED})


def policy_for(session: Session, node: Node, config: Config,
               cache: PeerCache | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(policy document, None) or (None, why it cannot be built) for a DPU. ``cache``: peers per
    tenant, shared by the policies built in one conductor pass."""
    tenant = tenant_of(node) if node.state in TENANT_POLICY_STATES else None
    try:
        peers: list[Peer] = []
        if tenant is not None:
            if cache is None or tenant.name not in cache:
                found = tenant_peers(session, tenant, config)
                if cache is not None:
                    cache[tenant.name] = found
            else:
                found = cache[tenant.name]
            peers = list(found)
        return build(config, node_id=node.id, node_name=node.name, serial=node.serial, tenant=tenant,
                     peers=peers), None
    except PolicyBuildError as e:
        return None, str(e)


# ------------------------------------------------------------------------------------------ conductor
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes for timezone=True columns; they were written as UTC."""
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=dt.UTC)
    return t


# Host states in which its DPUs' fabric still gates the boot (after that a drop is an event only).
FABRIC_WAITING = frozenset({State.HOST_WAITING_DPU, State.BLOCKED_BY_DPU})
# DPU states whose facts carry the wanted policy and the applied version.
POLICY_FACT_STATES = frozenset({State.DPU_READY, State.POLICY_PENDING, State.POLICY_APPLIED})
PREFETCH_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's bind-parameter limits


@dataclass(frozen=True, slots=True)
class _Prefetched:
    dpus: dict[int, tuple[DpuFacts, ...]]  # host id -> its DPUs, by id
    applied: dict[int, str | None]  # DPU id -> the policy version its agent reported applied


class PowerBudget:
    """Power tokens shared by every conductor on one database (rows of ``power_slots``).

    A scope has ``count`` rows (slot 0..count-1, created on first use); a row is free when its
    ``until`` is NULL or past. ``take`` frees nothing: a rack token stays spent until its window ends,
    a global token until ``give_back`` (or ``until``, if its holder died)."""

    def __init__(self, sessions: sessionmaker[Session], name: str, *, postgres: bool) -> None:
        self.sessions, self.name, self.postgres = sessions, name, postgres
        self._ensured: set[tuple[str, int]] = set()

    def _ensure(self, scope: str, count: int) -> None:
        if (scope, count) in self._ensured:
            return
        with self.sessions() as s:
            have = set(s.scalars(select(PowerSlot.slot).where(PowerSlot.scope == scope, PowerSlot.slot < count)))
            for i in range(count):
                if i in have:
                    continue
                s.add(PowerSlot(scope=scope, slot=i))
                try:
                    s.commit()
                except IntegrityError:  # another conductor created it first: that row is as good
                    s.rollback()
        self._ensured.add((scope, count))

    def take(self, scope: str, count: int, now: dt.datetime, until: dt.datetime) -> int | None:
        """The id of a token of ``scope`` now held until ``until``, or None when all ``count`` are in use."""
        self._ensure(scope, count)
        free = or_(PowerSlot.until.is_(None), PowerSlot.until <= now)
        q = select(PowerSlot.id).where(PowerSlot.scope == scope, PowerSlot.slot < count, free) \
            .order_by(PowerSlot.slot).limit(1)
        if self.postgres:  # skip rows another conductor is taking right now instead of queueing on them
            q = q.with_for_update(skip_locked=True)
        with self.sessions() as s:
            for _ in range(count):
                sid = s.scalar(q)
                if sid is None:
                    s.rollback()
                    return None
                res = s.execute(update(PowerSlot).where(PowerSlot.id == sid, free)
                                .values(holder=self.name, until=until).execution_options(synchronize_session=False))
                s.commit()
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    return int(sid)
            return None

    def restamp(self, slot_id: int, until: dt.datetime) -> None:
        """A spent token stays spent until ``until`` (a rack token: the power-on went out just now)."""
        with self.sessions() as s:
            s.execute(update(PowerSlot).where(PowerSlot.id == slot_id, PowerSlot.holder == self.name)
                      .values(until=until).execution_options(synchronize_session=False))
            s.commit()

    def give_back(self, slot_id: int) -> None:
        with self.sessions() as s:
            s.execute(update(PowerSlot).where(PowerSlot.id == slot_id, PowerSlot.holder == self.name)
                      .values(holder=None, until=None).execution_options(synchronize_session=False))
            s.commit()


class Conductor:
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
        self._drift_checked: dict[int, dt.datetime] = {}
        self._budget: PowerBudget | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._next_prune: float | None = None
        self._rack_of: dict[int, str | None] = {}  # node id -> rack, from the last pass
        self._rack_spent: dict[str, float] = {}  # rack -> monotonic time before which its budget is spent

    # -- facts ---------------------------------------------------------------------------------------
    def facts(self, s: Session, n: Node, now: dt.datetime, *, fresh: bool = False,
              pre: _Prefetched | None = None) -> Facts:
        """``fresh``: build the policy without the pass's peer cache (a step re-reads everything).
        ``pre``: the pass's DPUs-per-host and applied versions, read for all candidates at once."""
        c = self.config.conductor
        dpus: tuple[DpuFacts, ...] = ()
        pv = perr = applied = fabric_failed = None
        if n.kind == "host":
            if pre is not None:
                dpus = pre.dpus.get(n.id, ())
            else:
                dpus = tuple(DpuFacts(d.id, d.name, d.state, d.last_error)
                             for d in s.scalars(select(Node).where(Node.host_id == n.id).order_by(Node.id)))
            if n.state in FABRIC_WAITING:  # docs/fabric.md: the host boots once its DPUs' fabric is real
                dpus = tuple(replace(d, fabric=self._fabric_wait(s, d.id, n, now))
                             if d.state == State.POLICY_APPLIED else d for d in dpus)
        elif n.state in POLICY_FACT_STATES:
            doc, perr = policy_for(s, n, self.config, None if fresh else self._peer_cache)
            pv = doc["version"] if doc else None
            if pre is not None:
                applied = pre.applied.get(n.id)
            else:
                st = s.get(AgentStatus, n.id)
                applied = st.applied_version if st is not None else None
            if n.state == State.POLICY_APPLIED and n.host is not None and n.host.state in FABRIC_WAITING:
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
        now = self.clock()
        with self.sessions() as s:
            if self._is_pg(s):
                locked = s.scalar(select(Node.id).where(Node.id == node_id, self._free(now))
                                  .with_for_update(skip_locked=True))
                if locked is None:
                    s.rollback()
                    return False
            res = s.execute(update(Node).where(Node.id == node_id, self._free(now))
                            .values(claimed_by=self.name, claim_expires=now + self.lease)
                            .execution_options(synchronize_session=False))
            s.commit()
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def release(self, node_id: int) -> None:
        with self.sessions() as s:
            s.execute(update(Node).where(Node.id == node_id, Node.claimed_by == self.name)
                      .values(claimed_by=None, claim_expires=None).execution_options(synchronize_session=False))
            s.commit()

    def reclaim_own(self) -> int:
        """At start: claims held under this conductor's name are from its previous life."""
        with self.sessions() as s:
            res = s.execute(update(Node).where(Node.claimed_by == self.name)
                            .values(claimed_by=None, claim_expires=None).execution_options(synchronize_session=False))
            s.commit()
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # -- one pass ------------------------------------------------------------------------------------
    def candidates(self) -> list[Facts]:
        now = self.clock()
        self._peer_cache = {}
        with self.sessions() as s:
            work = or_(Node.state.in_([x.value for x in orchestrate.WORK_STATES]),
                       Node.boot_override_set.is_(True) & Node.state.in_(
                           [x.value for x in orchestrate.BOOT_CONSUMED | orchestrate.AFTER_WIPE]))
            nodes = s.scalars(select(Node).where(work, self._free(now)).order_by(Node.id)).all()
            todo = []
            for n in nodes:
                if n.state == State.POLICY_APPLIED and not n.boot_override_set:
                    # resting DPUs: look for policy drift every DRIFT_SECONDS, not every pass
                    last = self._drift_checked.get(n.id)
                    if last is not None and (now - last).total_seconds() < DRIFT_SECONDS:
                        continue
                    self._drift_checked[n.id] = now
                todo.append(n)
                self._rack_of[n.id] = n.rack
            pre = self._prefetch(s, todo)
            return [self.facts(s, n, now, pre=pre) for n in todo]

    def _prefetch(self, s: Session, nodes: list[Node]) -> _Prefetched:
        """What ``facts`` needs beyond the node row, for every candidate of a pass in a few queries
        (one per PREFETCH_CHUNK ids) instead of one or two per node: hosts' DPUs, DPUs' applied versions."""
        pre = _Prefetched({}, {})
        hosts = [n.id for n in nodes if n.kind == "host"]
        dpus = [n.id for n in nodes if n.kind != "host" and n.state in POLICY_FACT_STATES]
        for i in range(0, len(hosts), PREFETCH_CHUNK):
            rows = s.execute(select(Node.host_id, Node.id, Node.name, Node.state, Node.last_error)
                             .where(Node.host_id.in_(hosts[i:i + PREFETCH_CHUNK])).order_by(Node.id))
            acc: dict[int, list[DpuFacts]] = {}
            for host_id, dpu_id, name, state, last_error in rows:
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
        taken."""
        todo: list[int] = []
        quick: list[int] = []  # database-only steps (policy, transitions): they run first
        # BMC steps per pass: the power budget's cap, else two per worker. A pass waits for all its
        # steps, so an unbounded one (hundreds of slow BMC steps in a storm) would hold up the quick
        # steps of every other node (a DPU waiting for its policy) until all of them ended.
        cap = self.config.power.max_concurrent_bmc or 2 * self.config.orchestration.workers
        bmc_steps = 0
        mono = time.monotonic()
        for f in self.candidates():
            d = orchestrate.decide(f)
            if d.op is Op.WAIT:
                if self._last_wait.get(f.node_id) != f"{f.state}:{d.reason}":
                    self._last_wait[f.node_id] = f"{f.state}:{d.reason}"
                    self._log(f, d, "waiting")
                continue
            if d.op not in DB_ONLY_OPS:
                # A BMC step that cannot get a power token this pass is not claimed at all (claiming,
                # re-reading and releasing it costs a few queries each, for nothing): at most ``cap``
                # per pass from this conductor, none for a rack whose budget was found spent < 1 s ago.
                rack = self._rack_of.get(f.node_id)
                if bmc_steps >= cap or (
                        d.op in POWER_ON_OPS and rack and self._rack_spent.get(rack, 0.0) > mono):
                    continue
                bmc_steps += 1
            if not self.claim(f.node_id):
                self._log(f, d, "skipped: claimed by another conductor")
                continue
            (todo if d.op not in DB_ONLY_OPS else quick).append(f.node_id)
        todo = quick + todo
        if len(todo) <= 1 or self.config.orchestration.workers == 1:
            return sum(self._claimed_step(i) for i in todo)
        with ThreadPoolExecutor(max_workers=min(len(todo), self.config.orchestration.workers),
                                thread_name_prefix="conductor-step") as pool:
            return sum(pool.map(self._claimed_step, todo))

    def _claimed_step(self, node_id: int) -> int:
        try:
            return self.step(node_id)
        finally:
            self.release(node_id)

    def step(self, node_id: int) -> int:
        """Re-read the claimed node, decide again (it may have moved), execute. 1 if it acted."""
        with self.sessions() as s:
            n = s.get(Node, node_id)
            if n is None:
                return 0
            f = self.facts(s, n, self.clock(), fresh=True)
            d = orchestrate.decide(f)
            if d.op is Op.WAIT:
                return 0
            tokens = self._take_tokens(s, n, f, d)
            if tokens is None:
                return 0
            self._last_wait.pop(node_id, None)
            try:
                outcome = self.execute(s, n, f, d)
            except (lifecycle.TransitionConflict, IllegalTransition) as e:
                s.rollback()
                outcome = f"not applied, will re-read: {e}"
            except Exception as e:  # a bug or a database error: log it, leave the node for the next pass
                s.rollback()
                log.exception("step failed node=%s state=%s action=%s", f.name, f.state, d.describe())
                outcome = f"error: {type(e).__name__}: {e}"
            finally:
                self._give_back(tokens)
            self._log(f, d, outcome)
            return 1

    # -- power budget --------------------------------------------------------------------------------
    def budget(self, s: Session) -> PowerBudget:
        if self._budget is None:
            self._budget = PowerBudget(self.sessions, self.name, postgres=self._is_pg(s))
        return self._budget

    def _take_tokens(self, s: Session, n: Node, f: Facts, d: Decision) -> list[tuple[str, int]] | None:
        """The budget tokens a step needs (global cap, then the rack's power-on token), or None when one
        is missing: the step is deferred to a later pass, logged once per node and reason."""
        if d.op in DB_ONLY_OPS:
            return []
        pc = self.config.power
        now = self.clock()
        held: list[tuple[str, int]] = []
        b = self.budget(s)
        if pc.max_concurrent_bmc > 0:
            g = b.take("global", pc.max_concurrent_bmc, now, now + self.lease)
            if g is None:
                self._defer(f, d, "global", f"{pc.max_concurrent_bmc} BMC actions in flight site-wide "
                                            "(power.max_concurrent_bmc)")
                return None
            held.append(("global", g))
        if d.op in POWER_ON_OPS and pc.rack_power_ons > 0 and n.rack:
            r = b.take(f"rack:{n.rack}", pc.rack_power_ons, now, now + dt.timedelta(seconds=pc.rack_window_seconds))
            if r is None:
                self._give_back(held)
                self._rack_spent[n.rack] = time.monotonic() + RACK_RECHECK_SECONDS
                self._defer(f, d, "rack", f"rack {n.rack} spent its {pc.rack_power_ons} power-ons of the last "
                                          f"{pc.rack_window_seconds:g}s (power.rack_power_ons)")
                return None
            held.append(("rack", r))
        if d.op in POWER_ON_OPS:
            metrics.counters.inc("bootsvc_power_ons_total", {"rack": n.rack or "none"})
        with self._in_flight_lock:
            self._in_flight += 1
            metrics.counters.set("bootsvc_bmc_in_flight", None, self._in_flight)
        held.append(("flight", 0))
        return held

    def _give_back(self, held: list[tuple[str, int]]) -> None:
        for kind, slot in held:
            if kind == "flight":
                with self._in_flight_lock:
                    self._in_flight -= 1
                    metrics.counters.set("bootsvc_bmc_in_flight", None, self._in_flight)
            elif self._budget is not None:
                try:
                    if kind == "rack":
                        # the window counts from when the power-on was sent, not from when the token was
                        # taken: two uses of one token are then a full window apart at the BMCs too
                        self._budget.restamp(slot, self.clock() + dt.timedelta(
                            seconds=self.config.power.rack_window_seconds))
                    else:
                        self._budget.give_back(slot)
                except Exception:  # database down: the token's ``until`` frees it anyway
                    log.exception("power budget: could not give back token %d", slot)

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
               commit: bool = True) -> str:
        c = self.config.conductor
        before = n.state
        ev = lifecycle.apply(s, n, trigger, actor=self.actor, detail={"reason": reason, **(detail or {})},
                             max_attempts=c.max_attempts, deadlines=c.deadlines, commit=commit,
                             now=self.clock())
        if trigger is Trigger.TIMEOUT and ev.to_state == before:
            # retry in place: the step is redone after a backoff (attempts already counts this one)
            self._book(s, n.id, next_check_at=self.clock() + dt.timedelta(
                seconds=orchestrate.retry_delay(c.backoff_seconds, n.attempts - 1)), action_failures=0)
        elif ev.to_state != before:
            self._book(s, n.id, action_failures=0, next_check_at=None, bmc_task=None)
        return f"{ev.from_state} -> {ev.to_state}"

    def _book(self, s: Session, node_id: int, **values: Any) -> None:
        """Conductor bookkeeping without a version bump (it is not a state change)."""
        s.execute(update(Node).where(Node.id == node_id).values(**values)
                  .execution_options(synchronize_session=False))
        s.commit()

    def _record(self, s: Session, n: Node, note: str, detail: dict[str, Any]) -> None:
        lifecycle.record(s, n, note, actor=self.actor, detail=detail, now=self.clock())

    def execute(self, s: Session, n: Node, f: Facts, d: Decision) -> str:
        if d.op is Op.APPLY:
            assert d.trigger is not None
            return self._apply(s, n, d.trigger, d.reason, dict(d.detail))
        if d.op is Op.PROVISION_DPU:
            dpu = s.get(Node, d.target_id)
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

    def _bfb_uri(self, n: Node) -> str:
        """A one-time URL for this node's BMC (`bootsvc.web.bfbpush`: the BFB + the node's bf.cfg)."""
        from bootsvc import auth_secrets, images
        from bootsvc.policy import boot_server
        from bootsvc.power import bfbtoken

        cat = images.load_catalog(self.config.resolve(self.config.images.catalog))
        img = cat.resolve(n.image, "dpu")
        f = img.file("bfb") if img is not None and cat.usable(img) else None
        if f is None:
            raise StepError(Trigger.INSTALL_FAILED, f"no usable BFB image for {n.image or 'the dpu default'} "
                                                    f"in {cat.source}")
        try:
            server = boot_server(self.config)
        except PolicyBuildError as e:
            raise StepError(Trigger.INSTALL_FAILED, str(e)) from None
        key = auth_secrets.read_ref(self.config.security.node_key_ref, create=True)
        token = bfbtoken.mint(key, n.id, bfbtoken.bmc_host(n.bmc_address or ""), now=self.clock().timestamp(),
                              ttl=self.config.power.bfb_url_ttl)
        return bfbtoken.push_url(f"http://{server}:{self.config.boot.http_port}", token, f.name)

    def _dpu_preflight(self, s: Session, n: Node, drv: PowerDriver, *, network_install: bool) -> dict[str, Any]:
        """Mode and Secure Boot before provisioning a DPU (bluefield-real.md §2, §5). Returns what was
        seen for the event; raises StepError with the reason and the way out when it cannot go on."""
        try:
            facts = drv.dpu_facts()
        except FatalBmcError as e:
            if e.status == 404:  # not a BlueField BMC (lab emulators of other kinds): nothing to check
                return {}
            raise
        seen: dict[str, Any] = {"dpu_mode": facts.mode.value, "secure_boot": facts.secure_boot,
                                "bmc_firmware": facts.firmware}
        # what the BMC said, kept whatever follows (the UI machine page shows the latest)
        self._record(s, n, "dpu_checked", {**seen, "os_state": facts.os_state, "http_push": facts.http_push})
        pc = self.config.power
        if facts.mode is DpuMode.NIC:
            if not pc.dpu_mode_switch:
                raise StepError(Trigger.BMC_ERROR if n.state == State.DPU_BOOTING else Trigger.INSTALL_FAILED,
                                "the DPU is in NIC mode: no agent can run on its Arm cores. Switch it to DPU "
                                "mode (Redfish Mode.Set DpuMode, two Arm reboots, a host power cycle) or set "
                                "power.dpu_mode_switch: true, then retry")
            # bluefieldbmcv2510ltsu1, modes of operation: Mode.Set, reboot the Arm twice, power-cycle.
            # The power cycle takes effect only when the host resets (bluefieldbmcv2401), so bootsvc does
            # the first part and asks for the host power cycle. [verify] on a real card.
            drv.set_dpu_mode(DpuMode.DPU)
            drv.reset()
            drv.reset()
            self._record(s, n, "dpu_mode_set", {"from": "NicMode", "to": "DpuMode", "arm_resets": 2})
            raise StepError(Trigger.BMC_ERROR, "DPU mode set (Mode.Set DpuMode, two Arm resets): power-cycle the "
                                               "host to finish the switch, then retry")
        if network_install and facts.secure_boot:
            if not pc.secure_boot_disable:
                raise StepError(Trigger.BMC_ERROR,
                                "UEFI Secure Boot is on: the unsigned network boot loader will not run. Set "
                                "power.secure_boot_disable: true to let bootsvc turn it off, or use "
                                "provision_method redfish (a BFB push through the BMC)")
            drv.set_secure_boot(False)
            seen["secure_boot_disabled"] = True
            log.info("node %s: UEFI Secure Boot turned off for a network install (power.secure_boot_disable)",
                     n.name)
        return seen

    def _erase_image(self) -> None:
        """Fail the wipe at once (WIPE_FAILED) when there is no erase image to boot: a node
        network-booted without one would only loop in the hold script until the deadline."""
        from bootsvc import images

        cat = images.load_catalog(self.config.resolve(self.config.images.catalog))
        img = cat.resolve(None, "wipe")
        if img is None or not cat.usable(img) or img.file("kernel") is None or img.file("initrd") is None:
            raise StepError(Trigger.WIPE_FAILED, f"no usable erase image (catalog defaults.wipe: a kernel + "
                                                 f"initrd) in {cat.source}")

    def _bmc_step(self, s: Session, n: Node, f: Facts, d: Decision) -> str:
        drv = self.driver_factory(n, self.config)
        timeout = self.config.orchestration.power_timeout_seconds
        done: dict[str, Any] = {}
        if d.op is Op.WIPE:
            self._erase_image()
            if f.attempts == 0:
                # Revoke before anything boots: the installed OS/agent held a secret (and boot token)
                # derived from this generation; the erase image gets a token of the new one (rendered
                # when it asks for its script, so the rotation must be committed before power on).
                n.secret_generation += 1
                s.execute(delete(AgentStatus).where(AgentStatus.node_id == n.id))
                s.commit()
                done["secret_rotated"] = True
            done["purpose"] = "erase"
        if d.op in (Op.BOOT_NETWORK, Op.PUSH_BFB, Op.WIPE):
            before = drv.power_state()  # verifies the BMC answers and the credentials work
            done["power_before"] = before.value
            if n.kind == "dpu" and d.op is not Op.WIPE:
                done.update(self._dpu_preflight(s, n, drv, network_install=d.op is Op.BOOT_NETWORK))
            if d.op is Op.PUSH_BFB:
                uri = self._bfb_uri(n)
                task = drv.install_bfb(uri)
                # the URL carries a one-time token: the event names the image, never the token
                done.update(image=uri.rsplit("/", 1)[-1], task=task.uri)
                self._record(s, n, "bmc_bfb_push", done)
                self._book(s, n.id, action_key=d.key, action_failures=0, next_check_at=None, bmc_task=task.uri)
                return f"BFB push started, task {task.uri}"
            ov = drv.boot_once(BootTarget.PXE)
            done["boot_override"] = f"{ov.target}/{ov.enabled}"
            if before is PowerState.ON:
                drv.reset()
                done["power"] = "reset"
            else:
                drv.power_on()
                done["power"] = "on"
            self._record(s, n, "bmc_boot_network", done)
            self._book(s, n.id, action_key=d.key, action_failures=0, next_check_at=None, boot_override_set=True)
            return f"network boot set ({done['boot_override']}), power {done['power']}"
        if d.op is Op.POLL_TASK:
            assert f.bmc_task
            st = drv.task_status(TaskHandle(f.bmc_task, n.bmc_address or ""))
            trig, why = orchestrate.after_task(n.state, st.done, st.ok, st.percent, st.messages)
            out = why
            if trig is not None and trig in allowed_triggers(n.kind, n.state):
                out = self._apply(s, n, trig, why, {"task": f.bmc_task, "percent": st.percent})
            if st.done:
                # a finished transfer is not an installed DPU: wait for its OS (orchestrate.OS_WAIT);
                # booked after the transition, which clears bmc_task
                after = f"{orchestrate.OS_WAIT}{self.clock().timestamp():.0f}" if st.ok and n.kind == "dpu" else None
                if after is not None:
                    # the install has its own deadline (power.install_timeout, checked by decide):
                    # the state's deadline must not cut it short
                    n = s.get(Node, n.id) or n
                    until = self.clock() + dt.timedelta(seconds=self.config.power.install_timeout + 60)
                    cur = _aware(n.deadline)
                    self._book(s, n.id, bmc_task=after, deadline=max(cur, until) if cur else until)
                else:
                    self._book(s, n.id, bmc_task=after)
                if after is not None:
                    n = s.get(Node, n.id) or n
                    self._record(s, n, "bfb_transferred", {"task": f.bmc_task, "percent": st.percent})
            return out
        if d.op is Op.CLEAR_BOOT:
            ov = drv.clear_boot_override()
            self._record(s, n, "bmc_clear_boot", {"boot_override": f"{ov.target}/{ov.enabled}"})
            self._book(s, n.id, action_failures=0, next_check_at=None, boot_override_set=False)
            return "boot override cleared"
        if d.op is Op.POLL_OS:
            os_state = drv.dpu_os_state()
            if os_state == "OsIsRunning":
                return self._apply(s, n, Trigger.INSTALL_DONE, "the DPU OS runs (BootProgress.OemLastState "
                                                               "OsIsRunning)", {"os_state": os_state})
            # OemLastState refreshes about every 30 s (bluefield-real.md §3.6): no need to ask every pass
            self._book(s, n.id, next_check_at=self.clock() + dt.timedelta(seconds=OS_POLL_SECONDS))
            return f"DPU OS state {os_state or 'unknown'}; asking again in {OS_POLL_SECONDS:g}s"
        if d.op is Op.REBOOT:
            drv.clear_boot_override()
            if n.kind == "dpu":
                # ForceRestart: a PowerCycle would wait for the host's PERST while the host runs
                drv.reset()
                self._record(s, n, "bmc_reset", {"reset": "arm"})
                self._book(s, n.id, action_key=d.key, action_failures=0, next_check_at=None,
                           boot_override_set=False)
                return "Arm reset"
            drv.power_cycle()
            self._record(s, n, "bmc_power_cycle", {})
            self._book(s, n.id, action_key=d.key, action_failures=0, next_check_at=None, boot_override_set=False)
            return "power-cycled"
        if d.op is Op.POWER_OFF:
            drv.power_off(wait=timeout)
            self._record(s, n, "bmc_power_off", {})
            self._book(s, n.id, action_key=d.key, action_failures=0, next_check_at=None)
            n = s.get(Node, n.id) or n
            assert d.trigger is not None
            return "powered off; " + self._apply(s, n, d.trigger, d.reason)
        if d.op is Op.FINISH_WIPE:
            # The erase image powers the node off itself; make sure, then drop the (maybe sticky)
            # network boot so the next power-on boots what the next owner installs.
            if drv.power_state() is not PowerState.OFF:
                drv.power_off(wait=timeout)
                done["power"] = "off"
            ov = drv.clear_boot_override()
            done["boot_override"] = f"{ov.target}/{ov.enabled}"
            # the erase image's boot token (on its kernel command line, in its script) must not fetch
            # the next owner's bf.cfg: rotate once more
            n.secret_generation += 1
            s.commit()
            done["secret_rotated"] = True
            self._record(s, n, "wipe_finished", done)
            self._book(s, n.id, action_failures=0, next_check_at=None, boot_override_set=False)
            return "wipe finished: powered off, boot override cleared, secret rotated"
        raise AssertionError(f"unhandled op {d.op}")  # pragma: no cover


# ------------------------------------------------------------------------------------------ service
def run(config: Config, listener_index: int, stop: threading.Event,
        *, driver_factory: DriverFactory = _default_driver) -> None:
    """Service runner (``bootsvc.daemon``): reconcile nodes and deliver events until ``stop`` is set."""
    from bootsvc.events_out import Deliverer

    sessions = session_factory(make_engine(config.database.url))
    name = os.environ.get("BOOTSVC_CONDUCTOR_NAME") or f"{socket.gethostname()}/conductor{listener_index}"
    cond = Conductor(config, sessions, name=name, driver_factory=driver_factory)
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
        try:
            acted = cond.run_once()
        except Exception:  # database down, etc.: keep going, the next pass retries
            log.exception("conductor pass failed")
            acted = 0
        if acted == 0:
            stop.wait(interval)
    t.join(timeout=10)
    log.info("conductor %s stopped", name)
