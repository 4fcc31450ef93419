"""The drift feed over resting DPUs (``bootsvc.conductor_scan._drift_due``): a DPU resting in
policy_applied is checked (loaded, its policy built, decided) when one of its policy's inputs changed -
its row, its host's tenant or host addresses (also edited in place), the version its agent reports - or
when it is first seen; a resting fleet whose inputs did not change costs no check, however long the run.
SQLite and PostgreSQL; in-memory BMCs (bootsvc.power.fake)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from helpers.conductor import Clock, enroll_machine, make_db, site_config
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import inventory, operations, orchestrate
from bootsvc.conductor import Conductor
from bootsvc.conductor_scan import DRIFT_FULL_SECONDS, DRIFT_SECONDS, DRIFT_SWEEP_SECONDS
from bootsvc.models import AgentStatus, Node, Tenant
from bootsvc.orchestrate import Op
from bootsvc.power.fake import reset_fakes


class Resting:
    """``count`` machines at rest (host deployed, DPU policy_applied with its agent running the
    wanted policy) and a conductor that has seen each of them once."""

    def __init__(self, url: str, tmp: Path, count: int = 4) -> None:
        reset_fakes()
        self.cfg = site_config(url, tmp, fabric={"gate_boot": False, "asn": 65000})
        self.sessions: sessionmaker[Session] = make_db(self.cfg)
        self.pairs = [enroll_machine(self.sessions, f"m{i}", host_bmc=f"fake://h{i}", dpu_bmc=f"fake://d{i}",
                                     index=i + 1) for i in range(count)]
        with self.sessions() as s:
            s.execute(update(Node).where(Node.kind == "host").values(state="deployed"))
            s.execute(update(Node).where(Node.kind == "dpu").values(state="policy_applied"))
            s.commit()
        self.clock = Clock()
        self.cond = Conductor(self.cfg, self.sessions, name="c-test", clock=self.clock)
        first = self.tick(0)  # first sight: every resting DPU is checked once
        assert sorted(first) == sorted(d for _, d in self.pairs)
        self.wanted = {i: f.policy_version for i, f in first.items()}
        with self.sessions() as s:
            for nid, v in self.wanted.items():
                s.add(AgentStatus(node_id=nid, health={}, applied_version=v, sent_version=v))
            s.commit()

    def tick(self, seconds: float = DRIFT_SECONDS) -> dict[int, Any]:
        """Let ``seconds`` pass and run a pass's candidate search: the facts of the DPUs checked."""
        self.clock.jump(seconds)
        return {f.node_id: f for f in self.cond.candidates()}

    def decision(self, facts: Any) -> orchestrate.Decision:
        return orchestrate.decide(facts)


def sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def test_a_resting_fleet_whose_inputs_did_not_change_is_not_checked(any_db_url: str, tmp_path: Path) -> None:
    """No check of an unchanged resting DPU: not every DRIFT_SECONDS, not after DRIFT_SWEEP_SECONDS,
    not at the full drift scan (DRIFT_FULL_SECONDS), which reads every resting row and finds the keys
    unchanged. Between full scans the feed reads no row on SQLite."""
    r = Resting(any_db_url, tmp_path)
    ticks = int((max(DRIFT_SWEEP_SECONDS + 60, DRIFT_FULL_SECONDS) + 2 * DRIFT_SECONDS) // DRIFT_SECONDS)
    rows = []
    for _ in range(ticks):
        assert r.tick() == {}
        rows.append(r.cond.drift_rows)
    assert max(rows) == len(r.pairs)  # the full drift scan ran, and checked none
    if sqlite(any_db_url):
        assert sorted(rows)[-2] == 0


def test_host_writes_that_are_no_policy_input_check_nothing_a_tenant_move_checks_its_dpu(
        any_db_url: str, tmp_path: Path) -> None:
    """A host's install goes on (its row written, its version bumped): its resting DPU's policy does not
    depend on it. The host moved to another tenant: its DPU is checked and gets the new policy."""
    r = Resting(any_db_url, tmp_path)
    (h0, d0), (h1, _d1) = r.pairs[0], r.pairs[1]
    with r.sessions() as s:
        s.execute(update(Node).where(Node.id.in_([h0, h1])).values(version=Node.version + 1, action_key="x"))
        s.commit()
    assert r.tick() == {}
    with r.sessions() as s:
        globex = s.scalar(select(Tenant.id).where(Tenant.name == "globex"))
        s.execute(update(Node).where(Node.id.in_([h0, d0])).values(tenant_id=globex, version=Node.version + 1))
        s.commit()
    checked = r.tick()
    assert list(checked) == [d0]
    d = r.decision(checked[d0])
    assert d.op is Op.SEND_POLICY and checked[d0].policy_version != r.wanted[d0]
    assert r.tick() == {}  # decided: not again until something else changes


def test_a_host_address_edited_in_place_checks_its_dpu(any_db_url: str, tmp_path: Path) -> None:
    """``node set HOST --mac MAC,host-pf,IP`` changes a NIC row, not the host's version: the edit's event
    bumps the host row's change_seq, the DPU's key (its host's addresses) differs, the DPU is checked
    and its policy exports the new address."""
    r = Resting(any_db_url, tmp_path)
    host, dpu = r.pairs[2]
    with r.sessions() as s:
        s.execute(update(Node).where(Node.id == host).values(state="available"))
        s.commit()
    assert r.tick() == {}  # the host's own state is no input of its DPU's policy
    with r.sessions() as s:
        h = s.get(Node, host)
        assert h is not None
        nics = [inventory.NicSpec(n.mac, n.role, "10.0.0.99" if n.role == "host-pf" else n.ipv4) for n in h.nics]
        version = h.version
        operations.edit_node(s, h, {"nics": nics}, actor="test")
        assert h.version == version  # in place: no version bump
    checked = r.tick()
    assert list(checked) == [dpu]
    assert r.decision(checked[dpu]).op is Op.SEND_POLICY
    with r.sessions() as s:
        from bootsvc.conductor_policy import policy_for

        n = s.get(Node, dpu)
        assert n is not None
        doc, _ = policy_for(s, n, r.cfg)
        assert doc is not None and doc["version"] == checked[dpu].policy_version
        assert "10.0.0.99/32" in str(doc)


def test_an_agent_running_another_version_is_checked_once_per_change(any_db_url: str, tmp_path: Path) -> None:
    """The agent reports another version than the one handed out (agent_status, no node row written):
    its DPU is checked at the next tick and the policy sent again; a mismatch that does not move (an
    agent reporting no version: nothing to send) is not checked again each tick."""
    r = Resting(any_db_url, tmp_path)
    _h, dpu = r.pairs[1]
    with r.sessions() as s:
        s.execute(update(AgentStatus).where(AgentStatus.node_id == dpu).values(applied_version="0000"))
        s.commit()
    checked = r.tick()
    assert list(checked) == [dpu] and r.decision(checked[dpu]).op is Op.SEND_POLICY
    with r.sessions() as s:
        s.execute(update(AgentStatus).where(AgentStatus.node_id == dpu).values(applied_version=None))
        s.commit()
    checked = r.tick()
    assert list(checked) == [dpu] and r.decision(checked[dpu]).op is Op.WAIT
    assert r.tick() == {} and r.tick() == {}


def test_a_change_seen_under_another_conductors_claim_is_checked_when_the_claim_runs_out(
        tmp_path: Path) -> None:
    """Another conductor held the DPU when its change showed in the feed, and died (no more writes):
    the DPU is looked at again each tick and checked once the claim ran out."""
    r = Resting(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path)
    _h, dpu = r.pairs[3]
    with r.sessions() as s:
        globex = s.scalar(select(Tenant.id).where(Tenant.name == "globex"))
        s.execute(update(Node).where(Node.id == dpu).values(
            tenant_id=globex, version=Node.version + 1, claimed_by="other",
            claim_expires=r.clock.t + dt.timedelta(seconds=25)))
        s.commit()
    assert r.tick() == {} and r.tick() == {}
    checked = r.tick(DRIFT_SECONDS)
    assert list(checked) == [dpu] and r.decision(checked[dpu]).op is Op.SEND_POLICY


def test_static_peer_lists_check_every_resting_dpu_when_the_fleet_changes(tmp_path: Path) -> None:
    """Without EVPN every DPU's policy lists its tenant's DPUs: a DPU enrolled (an INSERT, no feed row)
    checks every resting DPU."""
    reset_fakes()
    cfg = site_config(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, fabric={"gate_boot": False})
    sessions = make_db(cfg)
    pairs = [enroll_machine(sessions, f"m{i}", host_bmc=f"fake://h{i}", dpu_bmc=f"fake://d{i}", index=i + 1)
             for i in range(3)]
    with sessions() as s:
        s.execute(update(Node).where(Node.kind == "dpu").values(state="policy_applied"))
        s.commit()
    clock = Clock()
    cond = Conductor(cfg, sessions, name="c-test", clock=clock)
    assert len(cond.candidates()) == 3
    clock.jump(DRIFT_SECONDS)
    assert cond.candidates() == []
    enroll_machine(sessions, "m9", host_bmc="fake://h9", dpu_bmc="fake://d9", index=9)
    clock.jump(DRIFT_SECONDS)
    assert sorted(f.node_id for f in cond.candidates()) == sorted(d for _, d in pairs)


def test_a_dpu_whose_host_waits_for_its_fabric_fails_when_the_gate_expires_though_nothing_changed(
        tmp_path: Path) -> None:
    """docs/fabric.md: the host boots once its DPU reports a real fabric. The DPU was checked while the
    gate was open (no row changes after that): when the gate's deadline passes - a time, on no row -
    it is checked again and fails, and its host is blocked."""
    from helpers.conductor import Lab, state

    from bootsvc.conductor_policy import policy_for

    lab = Lab(tmp_path, fabric={"asn": 65000, "gate_deadline_seconds": 60})
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    lab.dpu_to_applied()
    with lab.sessions() as s:
        n = s.get(Node, lab.dpu)
        assert n is not None
        doc, _ = policy_for(s, n, lab.cfg)
    assert doc is not None
    r = lab.client.post("/api/v1/agent/checkin", headers=lab.agent.headers(),
                        environ_base={"REMOTE_ADDR": lab.agent.addr},
                        json={"health": {"applied_version": doc["version"], "fabric": {}}})
    assert r.status_code == 200
    for _ in range(3):  # drift ticks with the gate still open: the DPU seen and checked
        lab.clock.jump(DRIFT_SECONDS)
        lab.run(2)
    assert state(lab.sessions, lab.dpu) == "policy_applied" and state(lab.sessions, lab.host) == "host_waiting_dpu"
    lab.clock.jump(61)
    lab.until(lab.dpu, "policy_failed")
    lab.until(lab.host, "blocked_by_dpu")


def test_the_policy_memo_keeps_its_newest_documents_up_to_its_limit() -> None:
    """The conductor's memo bridges a DPU's few checks in a row, not the fleet: at its limit the oldest
    document goes (the newest are those a first drift check asks for), never all at once."""
    from bootsvc.conductor import MEMO_DOCS
    from bootsvc.conductor_policy import PolicyMemo

    memo = PolicyMemo(limit=3)
    for i in range(5):
        memo.put((i,), {"version": str(i)})
    assert len(memo) == 3 and memo.get((0,)) is None and memo.get((1,)) is None
    assert [memo.get((i,)) for i in (2, 3, 4)] == [{"version": "2"}, {"version": "3"}, {"version": "4"}]
    assert 1000 <= MEMO_DOCS <= 10_000


def test_dpus_serving_their_hosts_tenant_are_checked_without_a_query_each(tmp_path: Path) -> None:
    """A DPU without a tenant of its own serves its host's: the pass reads those hosts in one IN query
    and keeps them until the facts are built (the session's identity map holds an object only while
    something else does: dropped, each host was lazy-loaded again per DPU, its NICs with it)."""
    from bootsvc import metrics

    reset_fakes()
    cfg = site_config(f"sqlite:///{tmp_path}/bootsvc.db", tmp_path, fabric={"gate_boot": False, "asn": 65000})
    sessions = make_db(cfg)
    for i in range(12):
        enroll_machine(sessions, f"m{i}", host_bmc=f"fake://h{i}", dpu_bmc=f"fake://d{i}", index=i + 1)
    with sessions() as s:
        s.execute(update(Node).where(Node.kind == "host").values(state="deployed"))
        s.execute(update(Node).where(Node.kind == "dpu").values(state="policy_applied", tenant_id=None))
        s.commit()
    cond = Conductor(cfg, sessions, name="c-test", clock=Clock())
    before = metrics.counters.get("bootsvc_db_statements_total")
    facts = cond.candidates()
    spent = metrics.counters.get("bootsvc_db_statements_total") - before
    assert len(facts) == 12 and all(f.policy_version for f in facts)
    assert spent < 12, spent  # a few IN queries for the pass, none per DPU
