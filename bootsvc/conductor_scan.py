"""The conductor's signature scan: which working nodes a pass must decide for again.

Owns: `ScanSteps`, a mixin of `bootsvc.conductor.Conductor` with the two column scans of a pass -
``_changed`` (the nodes in a working state whose signature changed since their cached decision, or
whose due time came) and ``_drift_due`` (resting ``policy_applied`` DPUs whose policy inputs changed,
every DRIFT_SECONDS, and each anyway every DRIFT_SWEEP_SECONDS) - and their caches (``_sigs``,
``_drift``, ``_drift_scan_at``; ``_decided`` is filled by the conductor's ``_remember``). A pass
thereby costs one or two column scans plus the rows of what changed, not a load of every node.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import String, func, or_, select, type_coerce
from sqlalchemy.orm import Session, aliased

from bootsvc import orchestrate
from bootsvc.config import Config
from bootsvc.models import AgentStatus, Node
from bootsvc.orchestrate import Decision, Facts, Op
from bootsvc.policy import PolicyBuildError, evpn_asn
from bootsvc.states import State

# How often the resting DPUs (policy_applied) are scanned for a changed policy input (tenant
# reassigned, a peer DPU added, the agent reporting another version): a bound on how stale a resting
# DPU's policy may get. Each is also checked every DRIFT_SWEEP_SECONDS whatever the scan saw.
DRIFT_SECONDS = 10.0
DRIFT_SWEEP_SECONDS = 300.0


class ScanSteps:
    """The scan half of `bootsvc.conductor.Conductor` (which supplies what is declared here)."""

    config: Config
    # working node id -> (signature, valid until, facts, decision) of its last decision, and the
    # signatures of the last scan (``_changed``)
    _decided: dict[int, tuple[tuple[Any, ...], dt.datetime, Facts, Decision]]
    _sigs: dict[int, tuple[Any, ...]]
    # resting DPU id -> (its drift signature, when it is checked anyway); next drift scan
    _drift: dict[int, tuple[tuple[Any, ...], dt.datetime]]
    _drift_scan_at: dt.datetime | None

    def _changed(self, s: Session, free: Any, now: dt.datetime) -> tuple[list[int], list[Facts]]:
        """One column scan of the nodes in a working state: (ids whose signature changed or whose due
        time came, the cached facts of unchanged nodes whose last decision was a step not yet taken).
        The signature is what ``facts`` reads from the row - the ORM version (bumped by every
        transition and API change), the bookkeeping columns ``_book`` writes without a version bump,
        the tenant - and for a host its DPUs' versions (their states)."""
        work = or_(Node.state.in_([x.value for x in orchestrate.WORK_STATES - {State.POLICY_APPLIED}]),
                   (Node.state == State.POLICY_APPLIED) & Node.boot_override_set.is_(True),
                   Node.boot_override_set.is_(True) & Node.state.in_(
                       [x.value for x in orchestrate.BOOT_CONSUMED | orchestrate.AFTER_WIPE]))
        d = aliased(Node)
        # deadline, state_since and attempts change only with the version (lifecycle.apply) or with a
        # column listed here (``_book``); next_check_at is compared as stored (no datetime parsing:
        # a scan of 20,000 rows is most of a pass)
        found = s.execute(select(Node.id, Node.version, Node.state, type_coerce(Node.next_check_at, String),
                                 Node.action_key, Node.bmc_task, Node.boot_override_set, Node.action_failures,
                                 Node.tenant_id, d.id, d.version)
                          .outerjoin(d, d.host_id == Node.id).where(work, free))
        sigs: dict[int, tuple[Any, ...]] = {}
        for r in found:
            if r[9] is None:
                sigs[r[0]] = tuple(r[1:9])
            else:
                sigs[r[0]] = (sigs.get(r[0]) or tuple(r[1:9])) + ((r[9], r[10]),)
        ids: list[int] = []
        kept: list[Facts] = []
        for nid, sig in sigs.items():
            c = self._decided.get(nid)
            if c is not None and c[0] == sig and now < c[1]:
                if c[3].op is not Op.WAIT:
                    kept.append(c[2])
                continue
            ids.append(nid)
        if len(self._decided) > 2 * len(sigs) + 1000:  # nodes that left the working states
            self._decided = {k: v for k, v in self._decided.items() if k in sigs}
        self._sigs = sigs
        return ids, kept

    def _drift_due(self, s: Session, free: Any, now: dt.datetime) -> list[int]:
        """Resting DPUs (``policy_applied``: the whole fleet once deployed) whose policy must be compared
        with the wanted one: every DRIFT_SECONDS one column scan finds those whose inputs changed (the
        DPU's or its host's version - a tenant move bumps it -, the version its agent reports applied,
        and with static peer lists the fleet's DPU set); every DRIFT_SWEEP_SECONDS (spread by node id)
        each is checked anyway (a host address edited in place bumps no version)."""
        if self._drift_scan_at is not None and now < self._drift_scan_at:
            return []
        self._drift_scan_at = now + dt.timedelta(seconds=DRIFT_SECONDS)
        fleet: tuple[Any, ...] = ()
        if not self._evpn():  # static peers: every DPU's policy lists its tenant's DPUs
            fleet = tuple(s.execute(select(func.count(Node.id), func.max(Node.id),
                                           func.sum(func.coalesce(Node.tenant_id, 0) * Node.id))
                                    .where(Node.state != State.RETIRED)).one())
        h = aliased(Node)
        resting = (Node.state == State.POLICY_APPLIED) & Node.boot_override_set.is_not(True)
        due: list[int] = []
        seen: dict[int, tuple[tuple[Any, ...], dt.datetime]] = {}
        for nid, *sig in s.execute(select(Node.id, Node.version, Node.tenant_id, h.version, h.tenant_id,
                                          AgentStatus.applied_version)
                                   .outerjoin(h, Node.host_id == h.id)
                                   .outerjoin(AgentStatus, AgentStatus.node_id == Node.id).where(resting, free)):
            key = (*sig, fleet)
            last = self._drift.get(nid)
            if last is None or last[0] != key or now >= last[1]:
                due.append(nid)
                last = (key, now + dt.timedelta(seconds=DRIFT_SWEEP_SECONDS + nid % 60))
            seen[nid] = last
        self._drift = seen
        return due

    def _evpn(self) -> bool:
        try:
            return evpn_asn(self.config, 0) is not None
        except PolicyBuildError:
            return True
